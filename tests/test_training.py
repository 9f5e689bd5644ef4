import contextlib
import copy
import dataclasses
import errno
import gc
import importlib
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import weakref
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from tests.files import rehash, write_fashion_mnist
from tests.tiny import NO_PERCEPTUAL, TINY_CONFIG, no_label_dropout, tiny_batch, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import sphere_fast
from sphere_fast import ops, training, use_backend
from sphere_fast.checkpoint import resume_point
from sphere_fast.ops import spherify_noise_reference, spherify_reference
from sphere_fast.training import (
    LOSS_PRESETS,
    DistInfo,
    RunConfig,
    SphereLoss,
    StepLog,
    TrainConfig,
    Trainer,
    fit,
    learning_rate,
    loss_weights,
    noise_scales,
    noisy_latent_pair,
    process_seed,
    stratified_radii,
)


def test_stratified_radii_one_per_stratum_plus_zero_and_one():
    for b in (3, 8, 33):
        r = stratified_radii(b, generator=torch.Generator().manual_seed(b))
        assert r.shape == (b,)
        assert (r == 0).sum() == 1 and (r == 1).sum() == 1
        inner = r[(r != 0) & (r != 1)].sort().values
        m = b - 2
        # stratum i holds exactly one value in [(i + 1e-3)/M, (i + 1)/M)
        assert torch.all(inner >= (torch.arange(m) + 1e-3) / m) and torch.all(inner < (torch.arange(m) + 1) / m)
    with pytest.raises(ValueError, match="at least 3"):
        stratified_radii(2)


def test_stratified_radii_are_shuffled():
    """The strata and the added 1 and 0 land at random rows: no row always gets the same noise level (with
    gradient accumulation, a micro-batch would otherwise always get the same strata)."""
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stratified_radii(8, generator=g) for _ in range(20)])
    assert len(set((draws == 1).int().argmax(1).tolist())) > 1 and len(set((draws == 0).int().argmax(1).tolist())) > 1
    assert not all(torch.equal(d, d.sort().values) or torch.equal(d, d.sort(descending=True).values) for d in draws)


def test_stratified_radii_keep_off_the_strata_floors(monkeypatch):
    """An offset u below 1e-3 is raised to it (r_i = (i + max(u_i, 1e-3)) / M): with every u drawn as 0, the
    strata give (i + 1e-3) / M, and the only 0 is the one the recipe adds."""
    monkeypatch.setattr(torch, "rand", lambda n, **kwargs: torch.zeros(n))
    r = stratified_radii(5).sort().values
    torch.testing.assert_close(r, torch.tensor([0.0, 1e-3 / 3, 1.001 / 3, 2.001 / 3, 1.0]), atol=1e-7, rtol=0)


def test_noise_scales_follow_the_hard_case_rule():
    model = tiny_model()
    b, sigma = 16, model.sigma_max
    big, small = noise_scales(model, b, torch.device("cpu"), torch.Generator().manual_seed(5))
    # replay the same draws by hand: r, then s, then the second stratified draw
    g = torch.Generator().manual_seed(5)
    r = stratified_radii(b, generator=g)
    s = torch.rand(b, generator=g)
    r2 = stratified_radii(b, generator=g)
    r_mix = 1 + s * (math.tan(math.radians(85.0)) / sigma - 1)
    torch.testing.assert_close(big, torch.where(s > 0.1, r, r_mix) * sigma)
    torch.testing.assert_close(small, r * r2 * 0.5 * sigma)  # uses r, not r_big


def test_noisy_latent_pair_spherifies_one_draw_at_both_noise_levels():
    """The training forward's pair: the noise levels of ``noise_scales``, then one e for both, big first."""
    model = tiny_model()
    z = torch.randn(5, 16, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    v_big, v_small = noisy_latent_pair(model, z)
    torch.manual_seed(7)
    big, small = noise_scales(model, 5, torch.device("cpu"))
    e = torch.randn_like(z)
    torch.testing.assert_close(v_big, spherify_noise_reference(z, big, e), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_small, spherify_noise_reference(z, small, e), rtol=1e-5, atol=1e-5)


def hand_losses(model, x, y, big, small, e, w):
    """Spec section 4 written out with reference ops only."""
    z = model.encoder(x, y)
    v = spherify_reference(z)
    v_big = torch.where(big.view(-1, 1, 1) == 0, v, spherify_reference(v + big.view(-1, 1, 1) * e))
    v_small = torch.where(small.view(-1, 1, 1) == 0, v, spherify_reference(v + small.view(-1, 1, 1) * e))
    out = model.decoder(torch.cat([v_big, v_small]), torch.cat([y, y]))
    x_big, x_small = out.chunk(2)
    t, s_, b_ = x * 0.5 + 0.5, x_small * 0.5 + 0.5, x_big * 0.5 + 0.5
    recon = (0.5 * (s_ - t) ** 2).mean((1, 2, 3)).mean()  # |d| < 1 on [0, 1]: Huber = 0.5 d^2
    pix = (0.5 * (b_ - s_.detach()) ** 2).mean((1, 2, 3)).mean()
    u = model.encoder(x_big, y).flatten(1)
    zc = z.detach().flatten(1)
    lat = (1 - (u * zc).sum(1) / (u.norm(dim=1) * zc.norm(dim=1))).mean()
    total = w["recon_dist"] * recon + w["con_dist"] * pix + w["latent"] * lat
    return total, {"recon": recon, "pix_con": pix, "lat_con": lat}


def test_one_step_losses_and_gradients_match_hand_computation():
    x, y = tiny_batch(6)
    big = torch.tensor([0.0, 0.3, 1.2, 5.67, 0.9, 2.0])
    small = torch.tensor([0.1, 0.0, 0.4, 2.0, 0.05, 1.0])
    e = torch.randn(6, 16, 4, generator=torch.Generator().manual_seed(3))

    hand_model = no_label_dropout(tiny_model()).train()
    total, terms = hand_losses(hand_model, x, y, big, small, e, NO_PERCEPTUAL)
    total.backward()

    model = no_label_dropout(tiny_model())
    trainer = Trainer(model, TrainConfig(global_batch=6, total_steps=4, warmup_steps=1, loss_weights=NO_PERCEPTUAL, grad_clip=1e9))
    loss_module = SphereLoss(model, loss_weights(NO_PERCEPTUAL))
    ours, our_terms = loss_module(x, y, big, small, e)
    ours.backward()
    for k in terms:
        torch.testing.assert_close(our_terms[k], terms[k].detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in hand_model.named_parameters() if p.grad is not None}
    assert any(n.startswith("decoder.") for n in grads) and any(n.startswith("encoder.") for n in grads)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)

    model.zero_grad()
    logged = trainer.train_step(x, y, scales=(big, small), noise=e)
    assert logged["loss"] == pytest.approx(total.item(), rel=1e-5)
    for k in terms:
        assert logged[k] == pytest.approx(terms[k].item(), rel=1e-5, abs=1e-7)


def test_single_output_variant_reconstructs_from_the_big_noise():
    """use_pixel_consistency=False (the official single-output variant): one decoder pass, on v_big."""
    model = no_label_dropout(tiny_model(use_pixel_consistency=False, use_latent_consistency=False))
    x, y = tiny_batch(4)
    big, small = torch.tensor([0.5, 1.0, 2.0, 0.0]), torch.tensor([0.1, 0.2, 0.3, 0.0])
    e = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(3))
    only_recon = {**{k: 0.0 for k in NO_PERCEPTUAL}, "recon_dist": 2.0}
    total, terms = SphereLoss(model, loss_weights(only_recon))(x, y, big, small, e)
    v_big = spherify_noise_reference(model.encoder(x, y), big, e)
    recon = (0.5 * ((model.decoder(v_big, y) - x) * 0.5) ** 2).mean((1, 2, 3)).mean()
    assert set(terms) == {"recon"}
    torch.testing.assert_close(terms["recon"], recon.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, 2.0 * recon, rtol=1e-5, atol=1e-7)


def test_train_step_takes_seeds_as_the_noise_they_draw():
    """Seeds draw the training stream (not the sampler's 0, 1, t: ops/philox.py's convention), so a training seed
    equal to a sampling one draws other noise."""
    x, y = tiny_batch(4)
    scales = (torch.full((4,), 0.9), torch.full((4,), 0.3))
    seeds = torch.tensor([5, 6, 7, 2**40], dtype=torch.int64)
    config = TrainConfig(global_batch=4, total_steps=4, warmup_steps=1, loss_weights=NO_PERCEPTUAL)
    noise = ops.sphere_noise(seeds, tiny_model().latent_shape[1:], stream=2**31)
    from_noise = Trainer(no_label_dropout(tiny_model()), config).train_step(x, y, scales=scales, noise=noise)
    from_seeds = Trainer(no_label_dropout(tiny_model()), config).train_step(x, y, scales=scales, seeds=seeds)
    assert from_seeds == pytest.approx(from_noise, rel=1e-5)
    other = Trainer(no_label_dropout(tiny_model()), config).train_step(x, y, scales=scales, seeds=seeds + 1)
    assert other["loss"] != pytest.approx(from_noise["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="noise"):
        Trainer(tiny_model(), config).train_step(x, y, scales=scales, noise=noise, seeds=seeds)


def test_train_step_takes_uint8_pixels_as_the_images_they_convert_to():
    """The datasets give uint8 pixels (a quarter of float32's bytes through shared memory and the copy to the
    device): the step converts them as the float images, x / 127.5 - 1, and trains the same weights."""
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _, y = tiny_batch(4)
    scales = (torch.full((4,), 0.9), torch.full((4,), 0.3))
    seeds = torch.tensor([5, 6, 7, 8], dtype=torch.int64)
    config = TrainConfig(global_batch=4, total_steps=4, warmup_steps=1, loss_weights=NO_PERCEPTUAL)
    trainers = [Trainer(no_label_dropout(tiny_model()), config) for _ in range(2)]
    from_pixels = trainers[0].train_step(pixels, y, scales=scales, seeds=seeds)
    from_images = trainers[1].train_step(pixels.float() / 127.5 - 1, y, scales=scales, seeds=seeds)
    assert from_pixels == from_images
    for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_step_refuses_per_sample_inputs_of_another_length():
    """The micro-batches slice every per-sample input by the images' rows: a longer one (a stale label tensor) would
    be cut to fit without a word, so each is refused by name; a batch that is no tensor is a TypeError."""
    x, y = tiny_batch(6)
    config = TrainConfig(global_batch=6, total_steps=4, warmup_steps=1, loss_weights=NO_PERCEPTUAL)
    trainer = Trainer(tiny_model(), config)
    longer = {"y": torch.cat([y, y[:2]]), "seeds": torch.arange(8), "noise": torch.randn(8, 16, 4),
              "scales": (torch.ones(8), torch.ones(6))}
    for name, value in longer.items():
        named = "big_scales" if name == "scales" else name
        with pytest.raises(ValueError, match=rf"{named} must have one row per image \(6\), got shape \(8"):
            trainer.train_step(x, **({"y": value} if name == "y" else {"y": y, name: value}))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        trainer.train_step(x.numpy(), y)
    # [-1, 1], checked on the first step: images in another range (here [0, 5]) train another objective
    with pytest.raises(ValueError, match=r"x must hold images in \[-1, 1\].*got values in \[0.0\d*, 4.9"):
        trainer.train_step((x + 1) * 2.5, y)
    assert trainer.step == 0


def test_a_step_after_sampling_in_eval_mode_trains_with_label_dropout():
    """Sampling the live weights needs model.eval() (no label dropout); the next step puts the model back in
    training mode, so the null class keeps being trained."""
    config = TrainConfig(global_batch=6, total_steps=4, warmup_steps=1, loss_weights=NO_PERCEPTUAL)
    trainer = Trainer(tiny_model(), config)
    trainer.model.eval().generate(2, seeds=torch.tensor([1, 2]))
    dropped = []
    embedder = trainer.model.decoder.y_embedder
    embedder.register_forward_hook(lambda module, args, out: dropped.append(module.training))
    trainer.train_step(*tiny_batch(6))
    assert trainer.model.training and dropped and all(dropped)


def record_drawn_seeds(monkeypatch) -> list[torch.Tensor]:
    """The seeds each training step hands the fused noise op, in call order."""
    drawn: list[torch.Tensor] = []
    pair = ops.spherify_noise_pair
    monkeypatch.setattr(ops, "spherify_noise_pair", lambda *a, **k: drawn.append(k["seeds"]) or pair(*a, **k))
    return drawn


def test_train_step_draws_a_seed_per_sample_from_the_global_generator(monkeypatch):
    """Without given noise or seeds each sample gets its own seed, new each step, from torch's global RNG
    (which the checkpoint saves, so a resumed run draws the same)."""
    drawn = record_drawn_seeds(monkeypatch)
    config = TrainConfig(global_batch=6, total_steps=4, warmup_steps=1, loss_weights=NO_PERCEPTUAL)
    x, y = tiny_batch(6)
    for _ in range(2):
        torch.manual_seed(3)
        trainer = Trainer(no_label_dropout(tiny_model()), config)
        trainer.train_step(x, y)
        trainer.train_step(x, y)
    first, second, again, _ = drawn
    assert first.dtype == torch.int64 and first.shape == (6,) and len(set(first.tolist())) == 6
    assert not torch.equal(first, second) and torch.equal(first, again)


def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    x, y = tiny_batch(6)
    g = torch.Generator().manual_seed(3)
    scales = (torch.rand(6, generator=g) * 3, torch.rand(6, generator=g))
    seeds = torch.arange(6, dtype=torch.int64) + 11
    steps = {}
    for accumulation in (1, 3):
        config = TrainConfig(global_batch=6, total_steps=4, warmup_steps=1, loss_weights=NO_PERCEPTUAL,
                             accumulation_steps=accumulation)
        trainer = Trainer(no_label_dropout(tiny_model()), config)
        logged = trainer.train_step(x, y, scales=scales, seeds=seeds)
        steps[accumulation] = logged, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    (whole, whole_grads), (micro, micro_grads) = steps[1], steps[3]
    assert micro == pytest.approx(whole, rel=1e-5)
    assert whole_grads.keys() == micro_grads.keys() and any(g.abs().sum() > 0 for g in whole_grads.values())
    for name, grad in whole_grads.items():
        torch.testing.assert_close(micro_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="accumulation_steps"):
        TrainConfig(accumulation_steps=0)
    with pytest.raises(ValueError, match="batch of 6 does not split into accumulation_steps=4"):
        Trainer(tiny_model(), TrainConfig(loss_weights=NO_PERCEPTUAL, accumulation_steps=4)).train_step(x, y)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_activation_checkpointing_keeps_the_gradients_and_fewer_activations(backend):
    """Also through the fused ops' autograd functions (cpp: their CPU kernels; triton: the interpreter, whose time
    grows with the batch: 2 samples)."""
    x, y = tiny_batch(2)
    scales = (torch.full((2,), 2.0), torch.full((2,), 0.5))
    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(4))
    runs = {}
    for recompute in (False, True):
        config = TrainConfig(global_batch=2, loss_weights=NO_PERCEPTUAL, activation_checkpointing=recompute)
        three_blocks = {"width": 32, "layers": 3, "heads": 2}
        model = tiny_model(vit_enc_model_size=three_blocks, vit_dec_model_size=three_blocks)
        trainer = Trainer(no_label_dropout(model), config)
        saved = []
        with use_backend(backend):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                total, _ = trainer.loss(x, y, *scales, noise)
            total.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        runs[recompute] = total.item(), grads, sum(saved)
    (loss, grads, kept), (loss_cp, grads_cp, kept_cp) = runs[False], runs[True]
    assert loss_cp == loss and grads_cp.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_cp[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert kept_cp < kept / 2, (kept_cp, kept)
    with pytest.raises(TypeError, match="activation_checkpointing must be a bool"):
        TrainConfig(activation_checkpointing=1)


def test_activation_checkpointing_recomputes_only_where_gradients_are_taken(monkeypatch):
    """A model trained with activation checkpointing runs its blocks plainly under no_grad (sample grids, the
    EMA's evaluation): nothing would be recomputed there."""
    model = tiny_model()
    model.decoder.activation_checkpointing = True
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    latent = torch.randn(2, *model.latent_shape[1:])
    with torch.no_grad():
        model.decoder(latent, torch.tensor([1, 2]))
    assert calls == []
    model.decoder(latent, torch.tensor([1, 2]))
    assert len(calls) == len(model.decoder.blocks)


def test_latent_consistency_gradient_reaches_the_decoder():
    model = no_label_dropout(tiny_model(use_pixel_consistency=False))
    x, y = tiny_batch(4)
    only_latent = {**{k: 0.0 for k in NO_PERCEPTUAL}, "latent": 1.0}
    total, _ = SphereLoss(model, loss_weights(only_latent))(x, y, torch.full((4,), 0.5), torch.full((4,), 0.2), torch.randn(4, 16, 4))
    total.backward()
    assert model.decoder.blocks[0].mlp.w3.weight.grad.abs().sum() > 0


def test_an_interrupted_ema_update_leaves_the_step_count_with_the_weights(monkeypatch):
    """The step count rose after the EMA update: an interrupt there left the weights stepped and the count a step
    behind, so a checkpoint saved then resumed with the step's batch and learning rate again."""
    config = TrainConfig(global_batch=6, total_steps=10, warmup_steps=2, loss_weights=NO_PERCEPTUAL)
    trainer = Trainer(tiny_model(), config)

    def interrupted(self) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "update_ema", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_step(*tiny_batch(6))
    assert trainer.step == 1 == trainer.optimizer.state_dict()["state"][0]["step"]


def test_a_step_with_non_finite_gradients_is_skipped():
    """One NaN pixel made every weight NaN (a NaN clip coefficient in the update), then the EMA, then every later
    checkpoint. Such a step leaves the weights and the optimiser's moments as they were; the next step trains."""
    assert_a_non_finite_step_is_skipped(torch.device("cpu"))


def assert_a_non_finite_step_is_skipped(device: torch.device) -> None:
    """A step on a batch with one NaN pixel changes no weight and no moment (the fused AdamW's found_inf, on
    ``device``), logs its NaN, and the next step trains."""
    trainer = Trainer(no_label_dropout(tiny_model()), TrainConfig(global_batch=6, total_steps=10, warmup_steps=2,
                                                                    loss_weights=NO_PERCEPTUAL), device=device)
    x, y = tiny_batch(6)
    trainer.train_step(x, y)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    skipped = trainer.train_step(bad, y)
    assert math.isnan(skipped["loss"]) and not math.isfinite(skipped["grad_norm"]) and trainer.step == 2
    assert not hasattr(trainer.optimizer, "found_inf")  # a later step of the optimiser's own is not skipped
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    for i, state in trainer.optimizer.state_dict()["state"].items():
        assert all(torch.equal(v, moments[i][k]) for k, v in state.items())
    assert all(bool(p.isfinite().all()) for p in trainer.ema.parameters())
    assert math.isfinite(trainer.train_step(x, y)["loss"])
    assert not all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())


def test_fit_s_progress_off_a_terminal_is_lines_not_a_bar(tmp_path, capfd):
    """stderr to a file (CI, nohup, SLURM): a bar there is one line growing by a carriage return each redraw, with
    no line to grep; a line at most every 30 s and the last one instead. On a terminal, the bar."""
    fit(synthetic_run(tmp_path / "file", 3), progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err
    assert re.fullmatch(r"train: step 3/3, loss \d+\.\d{4}, lr \d\.\d\de-\d\d, \d+\.\d\d steps/s\n", err), err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    with contextlib.redirect_stderr(terminal):
        fit(synthetic_run(tmp_path / "terminal", 3), progress=True)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue() and "train: step" not in terminal.getvalue()


def test_progress_lines_come_at_most_every_interval_and_at_the_end(monkeypatch, capsys):
    clock = iter([100.0, 110.0, 131.0, 140.0, 150.0])  # the start, then one reading per update
    monkeypatch.setattr(training.time, "monotonic", lambda: next(clock))
    lines = training._ProgressLines(step=10, total=14, every=30.0)
    for step in range(10, 14):
        lines.update({"step": step, "loss": None if step == 13 else 0.5, "lr": 1e-4})
    shown = capsys.readouterr().err.splitlines()
    assert shown == ["train: step 12/14, loss 0.5000, lr 1.00e-04, 0.06 steps/s",  # 2 steps in 31 s
                     "train: step 14/14, loss nan, lr 1.00e-04, 0.11 steps/s"]  # the last, 2 steps in 19 s


def test_fit_hands_each_log_line_to_on_log(tmp_path):
    """A copy: wandb's usual d.pop("step") took the step from the line fit's progress lines read next (a KeyError
    off a terminal, CI's and SLURM's case)."""
    seen: list[dict] = []
    fit(synthetic_run(tmp_path / "a", 3), progress=False, on_log=seen.append)
    assert seen == [json.loads(line) for line in (tmp_path / "a" / "losses.jsonl").read_text().splitlines()]
    assert [line["step"] for line in seen] == [0, 1, 2]
    steps: list[int] = []
    fit(synthetic_run(tmp_path / "b", 3), progress=True, on_log=lambda line: steps.append(line.pop("step")))
    assert steps == [0, 1, 2]


def test_fit_warns_of_a_skipped_step_and_logs_it_as_strict_json(tmp_path, monkeypatch, caplog):
    """fit names a step whose gradient norm it reads as not finite (here the second's, made so, with an infinite
    loss). Its line marks it skipped and holds null for those values: the NaN and Infinity that json.dumps writes by
    default are not JSON (JavaScript's JSON.parse and Go's encoding/json refused the line)."""
    read, reads = StepLog.read, []

    def second_not_finite(self):
        losses = read(self)
        reads.append(losses)
        return {**losses, "loss": float("inf"), "grad_norm": float("nan")} if len(reads) == 2 else losses

    monkeypatch.setattr(StepLog, "read", second_not_finite)
    with caplog.at_level(logging.WARNING, logger="sphere_fast"):
        fit(synthetic_run(tmp_path, 3), progress=False)
    warned = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert warned == ["sphere_fast: step 1's gradients are not finite (loss inf): its update was skipped"]

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    lines = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [line["skipped"] for line in lines] == [False, True, False]
    assert lines[1]["loss"] is None and lines[1]["grad_norm"] is None and lines[1]["recon"] == reads[1]["recon"]


def test_rng_states_of_more_gpus_than_this_process_sees_restore_those_it_has(monkeypatch):
    """A checkpoint of processes that each saw 8 GPUs, resumed on a node where each sees 4: restoring all 8 states
    failed on device 4, after the weights and the optimiser were loaded."""
    from sphere_fast.training import set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    set_rng_state({"torch": torch.get_rng_state(), "cuda": states})
    assert restored == states[:4]


def test_learning_rate_schedule_and_encoder_scale():
    cfg = TrainConfig(global_batch=512, total_steps=100, warmup_steps=10)
    assert learning_rate(0, cfg) == pytest.approx(2e-4 / 10)
    assert learning_rate(9, cfg) == pytest.approx(2e-4)
    assert learning_rate(55, cfg) == pytest.approx(1e-6 * 2 + 0.5 * (2e-4 - 2e-6))
    assert learning_rate(100, cfg) == pytest.approx(2e-6)
    assert learning_rate(150, cfg) == pytest.approx(2e-6)  # past the end (a run extended on resume) it stays there
    trainer = Trainer(tiny_model(), TrainConfig(global_batch=6, total_steps=10, warmup_steps=2, loss_weights=NO_PERCEPTUAL))
    trainer.train_step(*tiny_batch(6))
    enc, dec = trainer.optimizer.param_groups
    assert enc["lr"] == pytest.approx(0.1 * dec["lr"]) and dec["lr"] == pytest.approx(learning_rate(0, trainer.config))
    assert dec["betas"] == (0.9, 0.95) and dec["weight_decay"] == 0
    decayed = Trainer(tiny_model().eval(), TrainConfig(global_batch=6, weight_decay=0.05, loss_weights=NO_PERCEPTUAL))
    assert [group["weight_decay"] for group in decayed.optimizer.param_groups] == [0.05, 0.05]
    assert decayed.model.training and not decayed.ema.training  # a model handed over in eval mode trains


def test_ema_and_grad_clip():
    """The gradient is clipped to grad_clip; the EMA moves (1 - ema_decay) of the way to the updated weights. A
    large lr and a low decay make the step show: the weights move by about the lr (Adam's first step), far more
    than the tolerance."""
    model = tiny_model()
    config = TrainConfig(global_batch=6, total_steps=10, warmup_steps=1, loss_weights=NO_PERCEPTUAL, grad_clip=1e-3,
                         base_lr=0.1, ema_decay=0.75)
    trainer = Trainer(model, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logged = trainer.train_step(*tiny_batch(6))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert logged["grad_norm"] > 1e-3
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 1e-3 * 1.001
    ema = dict(trainer.ema.named_parameters())
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-3
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema[n], 0.75 * before[n] + 0.25 * p.detach(), atol=1e-6, rtol=1e-6)


def test_an_infinite_grad_clip_keeps_the_gradients():
    """grad_clip=inf is the way to turn clipping off (0 is refused: it would zero every update)."""
    trainer = Trainer(tiny_model(), TrainConfig(global_batch=6, total_steps=2, warmup_steps=1,
                                                loss_weights=NO_PERCEPTUAL, grad_clip=math.inf))
    logged = trainer.train_step(*tiny_batch(6))
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert logged["grad_norm"] > 0
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item() == \
        pytest.approx(logged["grad_norm"], rel=1e-5)


def test_bf16_autocast_on_cpu_gives_finite_losses():
    def first_step(autocast: str) -> dict[str, float]:
        config = TrainConfig(global_batch=6, total_steps=3, warmup_steps=1, loss_weights=NO_PERCEPTUAL,
                             autocast=autocast)
        scales = (torch.full((6,), 0.9), torch.full((6,), 0.3))
        trainer = Trainer(no_label_dropout(tiny_model()), config)
        return trainer.train_step(*tiny_batch(6), scales=scales, seeds=torch.arange(6))

    bf16, fp32 = first_step("bf16"), first_step("auto")  # auto: fp32 on the CPU
    assert all(math.isfinite(v) for v in bf16.values())
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05) and bf16["loss"] != fp32["loss"]  # bf16 ran


@pytest.mark.parametrize("autocast", ["bf16", "off"])
def test_a_trainer_is_freed_with_its_last_reference(autocast):
    """No reference cycle through the trainer: its model, EMA and optimizer state (on a GPU, memory) and under
    torchrun its DDP engine, which holds the process group, go when it does, not at some later collection."""
    config = TrainConfig(global_batch=6, total_steps=3, warmup_steps=1, loss_weights=NO_PERCEPTUAL, autocast=autocast)
    Trainer(no_label_dropout(tiny_model()), config)  # torch's one-time set-up of the fused AdamW, outside the check
    gc.collect()
    gc.disable()
    try:
        trainer = Trainer(no_label_dropout(tiny_model()), config)
        trainer.train_step(*tiny_batch(6), scales=(torch.full((6,), 0.9), torch.full((6,), 0.3)), seeds=torch.arange(6))
        engine = weakref.ref(trainer.engine)
        del trainer
        assert engine() is None
    finally:
        gc.enable()


def test_train_step_checks_labels_once(monkeypatch):
    """One range check per step, before the transfer; the networks' per-call check (a device sync each on a
    GPU) is skipped. Bad labels are still refused, naming them."""
    trainer = Trainer(tiny_model(), TrainConfig(global_batch=6, total_steps=3, warmup_steps=1, loss_weights=NO_PERCEPTUAL))
    calls = []
    original = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, y = tiny_batch(6)
    trainer.train_step(x, y)
    assert calls == [1]
    with pytest.raises(ValueError, match="labels must be in"):
        trainer.train_step(x, torch.tensor([0, 1, 2, 3, 4, 11]))
    with pytest.raises(TypeError, match="int64"):
        trainer.train_step(x, y.int())


def stack_names() -> list[str]:
    return [frame.name for frame in traceback.extract_stack()]


class HostReads(TorchDispatchMode):
    """Records the functions on the stack at each op that reads a tensor's values on the host (``item``,
    ``bool``, ``float``) or builds a tensor from host data: on a GPU each is a device sync."""

    OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default)

    def __init__(self) -> None:
        super().__init__()
        self.stacks: list[list[str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.stacks.append(stack_names())
        return func(*args, **(kwargs or {}))


def test_a_launched_step_reads_nothing_back(monkeypatch):
    """launch_step queues the whole step: nothing in it reads the device's values on the host, but the range
    checks of the loader's labels and (at the first step) images, which are still on the host then. The fused
    ops' value checks (CPU only) are switched off, as on a GPU."""
    monkeypatch.setattr(importlib.import_module("sphere_fast.ops.spherify"), "_values_checkable", lambda t: False)
    trainer = Trainer(tiny_model(), TrainConfig(global_batch=6, total_steps=3, warmup_steps=1, loss_weights=NO_PERCEPTUAL))
    x, y = tiny_batch(6)
    tolist = torch.Tensor.tolist
    with HostReads() as reads, monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", lambda t: reads.stacks.append(stack_names()) or tolist(t))
        log = trainer.launch_step(x, y)
    host_checks = ("check_label_range", "check_image_range")  # on the loader's host batch: no device sync
    assert [stack for stack in reads.stacks if not any(name in stack for name in host_checks)] == []
    assert any("check_label_range" in stack for stack in reads.stacks)
    reads.stacks.clear()
    with HostReads() as reads:
        trainer.launch_step(x, y)
    assert all("check_label_range" in stack for stack in reads.stacks)  # the images checked once, at the first
    losses = log.read()
    assert list(losses) == ["loss", "recon", "pix_con", "lat_con", "grad_norm", "lr"]
    assert losses["grad_norm"] > 0 and losses["lr"] == learning_rate(0, trainer.config)


def test_fit_reads_each_step_s_losses_after_queuing_the_next(tmp_path, monkeypatch):
    """The loop never waits for the step it just queued (but at a checkpoint), and logs every step's own
    losses under its number."""
    events, logs, steps = [], {}, {}
    launch_step, read = Trainer.launch_step, StepLog.read

    def spy_launch(self, *args, **kwargs):
        step = self.step
        log = launch_step(self, *args, **kwargs)
        events.append(("queue", step))
        steps[id(log)], logs[step] = step, read(log)
        return log

    def spy_read(self):
        events.append(("read", steps[id(self)]))
        return read(self)

    monkeypatch.setattr(Trainer, "launch_step", spy_launch)
    monkeypatch.setattr(StepLog, "read", spy_read)
    train = TrainConfig(global_batch=6, total_steps=4, warmup_steps=1, loss_weights=NO_PERCEPTUAL)
    fit(RunConfig(model=TINY_CONFIG, train=train, data="synthetic", out=str(tmp_path), checkpoint_every=3, workers=0),
        progress=False)
    assert events == [("queue", 0), ("queue", 1), ("read", 0), ("queue", 2), ("read", 1), ("read", 2),
                      ("queue", 3), ("read", 3)]
    written = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k not in ("time", "skipped")} for line in written] == [
        {"step": step, **losses} for step, losses in sorted(logs.items())]
    assert not any(line["skipped"] for line in written)
    assert all(0 < a["time"] <= b["time"] <= time.time() for a, b in itertools.pairwise(written))
    assert written[0]["loss"] != written[1]["loss"]


def synthetic_run(out, steps: int, **model) -> RunConfig:
    """A run of the tiny model (its config updated by ``model``) on the synthetic data, batch 6, no warmup."""
    train = TrainConfig(global_batch=6, total_steps=steps, warmup_steps=0, loss_weights=NO_PERCEPTUAL)
    return RunConfig(model={**TINY_CONFIG, **model}, train=train, data="synthetic", out=str(out), workers=0)


def test_a_failed_fit_stops_its_data_workers(tmp_path):
    """A fit that raises after its loader started (here its first checkpoint: the folder's name is taken by a file)
    stops the loader's worker processes, though the traceback, which a notebook keeps, holds the loader."""
    import multiprocessing

    run = dataclasses.replace(synthetic_run(tmp_path, 2), checkpoint_every=1, workers=1)
    (tmp_path / "checkpoints").write_text("")
    before = set(multiprocessing.active_children())  # other tests' processes, if any are left
    with pytest.raises(OSError) as kept:
        fit(run, progress=False)
    assert kept.value.__traceback__ is not None and set(multiprocessing.active_children()) <= before


def test_fit_starts_its_data_workers_by_the_runs_start_method(tmp_path, monkeypatch):
    from sphere_fast import data

    asked = []
    make_loader = data.make_loader
    monkeypatch.setattr(data, "make_loader", lambda *a, **k: asked.append(k["start_method"]) or make_loader(*a, **k))
    fit(dataclasses.replace(synthetic_run(tmp_path, 1), start_method="spawn"), progress=False)
    assert asked == ["spawn"]


def test_fit_refuses_data_with_more_classes_than_the_model(tmp_path):
    with pytest.raises(ValueError, match="the data has 10 classes but the model only 5"):
        fit(synthetic_run(tmp_path, 1, num_classes=5), progress=False)


def test_process_seeds_are_unrelated_to_each_other_and_to_the_run_seed():
    """seed + 1000 * rank + 1_000_000 * step made run 1000's rank 0 run 0's rank 1, and rank 0's seed the run's own:
    its first noise draws redrew the numbers that had initialised the weights."""
    seeds = [process_seed(seed, rank, step) for seed in range(1001) for rank in range(2) for step in range(2)]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & set(range(1001))
    assert all(0 <= s < 2**63 for s in seeds) and process_seed(7, 1, 3) == process_seed(7, 1, 3)


def test_fit_under_torchrun_builds_the_same_weights_and_draws_other_noise_on_each_process(tmp_path, monkeypatch):
    """Every process builds its model from the run's seed (the Trainer copies the EMA from it before DDP
    broadcasts rank 0's weights), then draws its own noise. The global batch must split evenly over the
    processes; rank 0 alone logs. Each rank runs here as one process of its own (no process group)."""
    training = importlib.import_module("sphere_fast.training")
    built = {}

    def single_process_trainer(model, config, device, info):
        built[info.rank] = {k: v.clone() for k, v in model.state_dict().items()}
        return Trainer(model, config, device)

    seeds = record_drawn_seeds(monkeypatch)
    monkeypatch.setattr(training, "Trainer", single_process_trainer)
    from sphere_fast import data

    worker_seeds = []
    make_loader = data.make_loader
    monkeypatch.setattr(
        data, "make_loader", lambda *a, **k: worker_seeds.append(k["worker_seed"]) or make_loader(*a, **k)
    )
    # no process group: the ranks' start points are gathered as if the others agreed
    monkeypatch.setattr(
        training.dist, "all_gather_object", lambda starts, start: starts.__setitem__(slice(None), [start] * 2)
    )
    for rank in (0, 1):
        monkeypatch.setattr(training, "init_distributed", lambda: DistInfo(rank, 2, rank))
        fit(synthetic_run(tmp_path / str(rank), 1), progress=False)
    assert built[0].keys() == built[1].keys()
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])
    assert seeds[0].shape == seeds[1].shape == (3,) and not set(seeds[0].tolist()) & set(seeds[1].tolist())
    assert worker_seeds == [process_seed(0, 0), process_seed(0, 1)]  # data workers of their own too
    assert (tmp_path / "0" / "losses.jsonl").is_file() and not (tmp_path / "1" / "losses.jsonl").exists()
    monkeypatch.setattr(training, "init_distributed", lambda: DistInfo(0, 4, 0))
    with pytest.raises(ValueError, match="global_batch 6 is not divisible by the 4 processes"):
        fit(synthetic_run(tmp_path, 1), progress=False)
    monkeypatch.setattr(training, "init_distributed", lambda: DistInfo(0, 2, 0))
    monkeypatch.setattr(training, "Trainer", lambda *a: pytest.fail("refused before the trainer is built"))
    split = synthetic_run(tmp_path, 1)
    split.train = dataclasses.replace(split.train, accumulation_steps=2)  # 6 = 2 x 3: each process's 3 do not split
    with pytest.raises(ValueError, match="the process batch of 3 does not split into accumulation_steps=2"):
        fit(split, progress=False)
    small = synthetic_run(tmp_path / "small", 1)
    small.train = dataclasses.replace(small.train, global_batch=4)  # 2 a process: the radii need 3
    with pytest.raises(ValueError, match="global_batch 4 gives 2 images a process; the stratified noise radii"):
        fit(small, progress=False)
    assert not (tmp_path / "small").exists()  # nothing written (a run folder's config was overwritten before)


def test_fit_flips_each_batch_and_trains_an_unconditional_model_on_labelled_data(tmp_path, monkeypatch):
    """Each batch goes through the random flip on its way to the step; an unconditional model gets no labels."""
    from sphere_fast import data

    flipped = []
    monkeypatch.setattr(data, "random_hflip", lambda x: flipped.append(x.shape) or x.flip(-1))
    assert fit(synthetic_run(tmp_path, 2, num_classes=0), progress=False).step == 2
    assert flipped == [(6, 3, 16, 16)] * 2


def test_fit_without_resume_starts_afresh(tmp_path, monkeypatch):
    """resume=False (the CLI's --no-resume) trains from step 0 where the run folder holds a longer run's
    checkpoints already: those are deleted (pruning would keep their higher steps over the new run's), and the
    losses log restarts."""
    from sphere_fast import data

    fit(dataclasses.replace(synthetic_run(tmp_path, 4), checkpoint_every=2), progress=False)
    flipped = []
    monkeypatch.setattr(data, "random_hflip", lambda x: flipped.append(1) or x)
    fresh = dataclasses.replace(synthetic_run(tmp_path, 3), checkpoint_every=1)
    assert fit(fresh, resume=False, progress=False).step == 3
    assert len(flipped) == 3
    assert [json.loads(line)["step"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()] == [0, 1, 2]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000003"


def test_a_run_that_fell_back_to_synthetic_data_records_it_and_a_resume_warns_when_the_data_changes(
    tmp_path, monkeypatch
):
    """Without Fashion-MNIST the default data falls back to synthetic shapes: run_config.json and the checkpoint
    say "synthetic" (they said "fashion-mnist", so a resume that found Fashion-MNIST switched data silently). A
    resume that falls back again gives no other-data warning; one that finds Fashion-MNIST warns of the change."""
    from sphere_fast import data

    fashion, out = tmp_path / "fashion-mnist", tmp_path / "run"
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", fashion)
    run = dataclasses.replace(synthetic_run(out, 2), data="fashion-mnist", checkpoint_every=2)
    assert run.synthetic_fallback
    with pytest.warns(UserWarning, match="falling back to synthetic shapes"):
        fit(run, progress=False)
    assert json.loads((out / "run_config.json").read_text())["data"] == "synthetic"
    assert resume_point(out / "checkpoints") == (2, json.loads((out / "run_config.json").read_text()))
    assert run.data == "fashion-mnist"  # the caller's config is left as it is
    with pytest.warns(UserWarning) as warned:
        fit(dataclasses.replace(run, train=dataclasses.replace(run.train, total_steps=4)), progress=False)
    messages = [str(w.message) for w in warned]
    assert any("falling back" in m for m in messages) and not any("other data" in m for m in messages)
    write_fashion_mnist(fashion)
    with pytest.warns(UserWarning) as warned:
        fit(dataclasses.replace(run, train=dataclasses.replace(run.train, total_steps=5)), progress=False)
    messages = [str(w.message) for w in warned]
    assert "resuming on other data than the checkpoint's: 'synthetic' -> 'fashion-mnist'" in messages
    assert not any("falling back" in m for m in messages)
    assert json.loads((out / "run_config.json").read_text())["data"] == "fashion-mnist"
    history = [json.loads(line)["run"]["data"] for line in (out / "runs.jsonl").read_text().splitlines()]
    assert history == ["synthetic", "synthetic", "fashion-mnist"]


def test_resuming_an_older_run_that_fell_back_does_not_claim_the_data_changed(tmp_path, monkeypatch):
    """A run folder of an older sphere_fast (no runs.jsonl) recorded "fashion-mnist" where it fell back to synthetic
    shapes: a resume that falls back again did not change the data, and does not say it did (the fallback warns)."""
    from sphere_fast import data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "missing")
    run = dataclasses.replace(synthetic_run(tmp_path, 2), data="fashion-mnist", checkpoint_every=2)
    with pytest.warns(UserWarning, match="falling back"):
        fit(run, progress=False)
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    config = json.loads((checkpoint / "config.json").read_text())
    config["run"]["data"] = "fashion-mnist"  # as the older version recorded it
    (checkpoint / "config.json").write_text(json.dumps(config))
    rehash(checkpoint)
    (tmp_path / "runs.jsonl").unlink()
    with pytest.warns(UserWarning) as warned:
        fit(dataclasses.replace(run, train=dataclasses.replace(run.train, total_steps=3)), progress=False)
    messages = [str(w.message) for w in warned]
    assert any("falling back" in m for m in messages) and not any("other data" in m for m in messages)


def test_runs_jsonl_keeps_a_line_per_call_with_its_start_and_environment(tmp_path):
    """Each fit appends its start step, the checkpoint it resumed from, its environment and its config to
    runs.jsonl (run_config.json, overwritten, holds the latest config only, readable as a RunConfig); a fit
    without resume starts the history afresh, as it does the checkpoints and losses."""
    fit(dataclasses.replace(synthetic_run(tmp_path, 2), checkpoint_every=2), progress=False)
    with pytest.warns(UserWarning, match="total_steps 2 -> 3"):
        fit(synthetic_run(tmp_path, 3), progress=False)
    calls = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(c["start_step"], c["resumed_from"]) for c in calls] == [(0, None), (2, "checkpoints/step-00000002")]
    assert [c["run"]["train"]["total_steps"] for c in calls] == [2, 3]
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config == calls[1]["run"]
    assert RunConfig(**{**config, "train": TrainConfig(**config["train"])}) == synthetic_run(tmp_path, 3)
    env = calls[1]["environment"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    assert env["sphere_fast"] == sphere_fast.__version__ and env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda and env["python"] == platform.python_version()
    assert env["device"] == device and env["world_size"] == 1 and env["argv"] == sys.argv
    assert env["backend_requested"] == sphere_fast.active_backend()
    started = [datetime.fromisoformat(c["environment"]["start_time"]) for c in calls]
    assert all(t.tzinfo == timezone.utc for t in started) and started[0] <= started[1]
    root = Path(sphere_fast.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a git checkout
        assert head.stdout.strip() in env["git_commit"]
    fit(synthetic_run(tmp_path, 1), resume=False, progress=False)
    calls = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(c["start_step"], c["resumed_from"]) for c in calls] == [(0, None)]


# A process that holds a run folder's lock (argv[1]) as a training run does, until its stdin closes.
HOLD_RUN_FOLDER = """
import sys
from pathlib import Path
from sphere_fast.training import _run_folder_lock
with _run_folder_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_the_same_folder_is_refused_before_it_changes_anything(tmp_path):
    """A run holds its folder's OS lock while it trains: another run there (here a process that holds the lock) is
    refused with the holder's pid before it writes or deletes anything (resume=False would delete the
    checkpoints); the lock goes with its holder."""
    fit(synthetic_run(tmp_path, 2), progress=False)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".run.lock"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN_FOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = rf"another training run \(pid {holder.pid}\) is writing to {re.escape(str(tmp_path))}"
        with pytest.raises(RuntimeError, match=refused):
            fit(synthetic_run(tmp_path, 3), resume=False, progress=False)
        assert {p: p.read_bytes() for p in files} == files
    finally:
        holder.stdin.close()
        holder.wait()
    assert fit(synthetic_run(tmp_path, 2), progress=False).step == 2
    assert fit(synthetic_run(tmp_path, 2), progress=False).step == 2  # a finished run let the lock go


def test_a_run_folder_on_a_filesystem_without_locks_is_named(tmp_path, monkeypatch):
    """NFS without lockd (ENOLCK) or Lustre mounted noflock (ENOSYS): the error names the lock file and the cause,
    not a bare "[Errno 37] No locks available"; other errors of flock pass as they are."""
    from sphere_fast import _files
    from sphere_fast.training import _run_folder_lock

    for code in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
        def flock(fd, operation, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(_files.fcntl, "flock", flock)
        named = rf"cannot lock {re.escape(str(tmp_path / '.run.lock'))} .*filesystem offers no file locks"
        with pytest.raises(OSError, match=named if code != errno.EBADF else rf"^\[Errno {code}\] ") as refused:
            with _run_folder_lock(tmp_path):
                pass
        assert refused.value.errno == code


def test_resume_keeps_the_log_lines_before_its_step_only_across_a_gap(tmp_path):
    """A log missing the line before the resume step (trimmed by hand, damaged) still loses the resume step's own
    line: the resumed run logs that step again."""
    from sphere_fast.training import _log_lines_before

    log = tmp_path / "losses.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (0, 1, 2, 4, 5)))
    assert [json.loads(line)["step"] for line in _log_lines_before(log, 4)] == [0, 1, 2]


def test_resume_drops_a_torn_log_line_past_the_checkpoint(tmp_path, monkeypatch):
    """A line cut short past the last checkpoint (a run killed mid-write) is dropped on resume, as every line past
    it is; a damaged line before it is refused, naming it. The log is rewritten atomically: a run killed during
    the rewrite leaves it whole."""
    fit(synthetic_run(tmp_path, 2), progress=False)  # checkpoint at step 2, lines for steps 0 and 1
    log = tmp_path / "losses.jsonl"
    first, second = log.read_text().splitlines()
    log.write_text(f"{first}\n{second[:20]}\n{second}\n")
    with pytest.raises(ValueError, match="losses.jsonl line 2 is damaged"):
        fit(synthetic_run(tmp_path, 3), progress=False)
    torn = f'{first}\n{second}\n{{"step": 2, "lo'
    log.write_text(torn)
    write_text = type(log).write_text

    def killed_mid_write(path, text, *args, **kwargs):
        if "losses.jsonl" in path.name:  # the log or a temporary file for it
            write_text(path, text[: len(text) // 2], *args, **kwargs)
            raise RuntimeError("killed")
        return write_text(path, text, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(log), "write_text", killed_mid_write)
        with pytest.raises(RuntimeError, match="killed"):
            fit(synthetic_run(tmp_path, 3), progress=False)
    assert log.read_text() == torn
    assert fit(synthetic_run(tmp_path, 3), progress=False).step == 3
    written = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in written] == [0, 1, 2] and all("loss" in line for line in written)


def test_loss_weight_presets_and_validation():
    # (w_rd, w_rp, w_cd, w_cp, w_lat) as the spec's section 4 gives them
    spec = {"cifar10": (1, 1, 0.5, 0.5, 0.1), "af-of": (25, 1, 1, 1, 0.1), "imagenet": (50, 1, 25, 1, 0.1)}
    assert {name: dataclasses.astuple(loss_weights(name)) for name in LOSS_PRESETS} == spec
    with pytest.raises(ValueError, match="preset"):
        loss_weights("mnist")
    with pytest.raises(ValueError, match="keys"):
        loss_weights({"recon_dist": 1.0})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            loss_weights({**NO_PERCEPTUAL, "latent": bad})
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(total_steps=5, warmup_steps=10)


@pytest.mark.parametrize(
    "field,value,match",
    [("ema_decay", 1.0, "ema_decay must be < 1"), ("autocast", "fp16", "autocast must be"),
     ("grad_clip", -1.0, "grad_clip"), ("grad_clip", 0.0, r"grad_clip must be > 0 .*float\('inf'\) turns clipping off"),
     ("global_batch", 0, "global_batch"), ("loss_weights", "mnist", "preset"),
     ("seed", -1, r"seed must be an int in \[0, 18446744073709551616\), got -1"),
     ("seed", 2**64, "seed must be an int in .*, got 18446744073709551616"),  # torch.manual_seed's: else fit failed
     ("betas", (0.9,), r"betas must be two numbers in \[0, 1\)"), ("betas", (0.9, 1.0), "betas must be two numbers"),
     ("warmup_steps", -1, "warmup_steps must be an int >= 0")],
)
def test_train_config_refuses_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value",
    [("activation_checkpointing", 1), ("warmup_steps", 2.0), ("base_lr", "1e-4"), ("ema_decay", True),
     ("ema_decay", False), ("grad_clip", None), ("seed", None), ("seed", 1.5), ("betas", 0.9),
     ("betas", (0.9, "0.95"))],
)
def test_train_config_refuses_bad_types(field, value):
    """A wrong type is a TypeError naming the field, up front (seed None failed in fit; ema_decay False was taken as
    0: an EMA equal to the live weights)."""
    with pytest.raises(TypeError, match=f"{field} must be"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field", ["checkpoint_every", "log_every"])
@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError)])
def test_run_config_refuses_bad_intervals(field, value, error):
    """Refused up front: 0 would fail after the first step (a modulo by zero), a negative value save nothing."""
    with pytest.raises(error, match=f"{field} must be an int >= 1, got {value}"):
        RunConfig(model=TINY_CONFIG, train=TrainConfig(), **{field: value})


def test_run_config_refuses_bad_workers_and_train():
    for value, error in ((-1, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match=f"workers must be an int >= 0, got {value}"):
            RunConfig(model=TINY_CONFIG, train=TrainConfig(), workers=value)
    with pytest.raises(TypeError, match="train must be a TrainConfig, got dict"):
        RunConfig(model=TINY_CONFIG, train={})
    with pytest.raises(ValueError, match="start_method must be None or one of"):
        RunConfig(model=TINY_CONFIG, train=TrainConfig(), start_method="thread")


def test_train_config_betas_become_a_tuple():
    """A config read back from JSON (the run config, a checkpoint's) holds lists: it compares equal to the original."""
    assert TrainConfig(betas=[0.8, 0.9]) == TrainConfig(betas=(0.8, 0.9))


def test_perceptual_loss_without_weight_files_is_a_clear_error(tmp_path):
    for term in ("recon_perc", "con_perc"):  # either perceptual weight alone needs the networks
        with pytest.raises(ValueError, match="no perceptual network was given"):
            SphereLoss(tiny_model(), loss_weights({**NO_PERCEPTUAL, term: 1.0}))
    with pytest.raises(ValueError, match=r"local weight files.*\(TrainConfig\(perceptual_weights=.*recon_perc and "
                                         r"con_perc to 0"):  # the Python names, not only the CLI's
        Trainer(tiny_model(), TrainConfig(global_batch=6, loss_weights="cifar10"))
    paths = {"vgg16": tmp_path / "nope.pth", "lpips": tmp_path / "vgg.pth", "convnext_small": tmp_path / "c.pth"}
    with pytest.raises(ValueError, match="perceptual_weights are given but .* would not be used"):
        TrainConfig(loss_weights=NO_PERCEPTUAL, perceptual_weights={k: str(v) for k, v in paths.items()})
    model = tiny_model().eval()
    config = TrainConfig(global_batch=6, loss_weights="cifar10", activation_checkpointing=True,
                         perceptual_weights={k: str(v) for k, v in paths.items()})
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Trainer(model, config)
    # a Trainer that could not be made left the model as it was: not in train mode, no activation checkpointing
    assert not model.training and not model.encoder.activation_checkpointing


def test_a_trainer_of_several_processes_needs_their_process_group():
    """dist_info of two processes without a process group, or not the group's: refused before the model is changed
    (DDP would raise only after the model was moved and put in train mode)."""
    model = tiny_model().eval()
    config = TrainConfig(global_batch=6, loss_weights=NO_PERCEPTUAL, activation_checkpointing=True)
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match=r"world_size=2 but no process group is initialised: call "
                                           r"sphere_fast.training.init_distributed\(\)"):
        Trainer(model, config, dist_info=DistInfo(0, 2, 0))
    assert not model.training and not model.encoder.activation_checkpointing
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"does not match the process group \(rank 0 of 1\)"):
            Trainer(model, config, dist_info=DistInfo(1, 2, 1))
        assert not model.training and not model.encoder.activation_checkpointing
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "flags, weights, match",
    [
        ({"use_pixel_consistency": False}, {"con_dist": 0.5}, r"use_pixel_consistency=False .*'con_dist': 0.5"),
        ({"use_pixel_consistency": False}, {"con_dist": 0.0}, None),
        ({"use_latent_consistency": False}, {"latent": 0.1}, r"use_latent_consistency=False .*'latent': 0.1"),
        ({}, {"con_dist": 0.0, "con_perc": 0.0}, r"use_pixel_consistency=True .*'con_dist': 0.0, 'con_perc': 0.0"),
        ({}, {"latent": 0.0}, r"use_latent_consistency=True .*'latent': 0.0"),
    ],
)
def test_loss_weights_must_match_the_consistency_flags(flags, weights, match):
    """A weight on a term the model's flags leave out would be dropped silently, and pixel consistency on with
    its weights 0 takes the reconstruction from the small noise alone: both refused (the official recipe derives
    each flag from its weights)."""
    model = tiny_model(**flags)
    all_weights = loss_weights({**NO_PERCEPTUAL, "latent": 0.0 if flags.get("use_latent_consistency") is False else 0.7,
                                **weights})
    if match is None:
        SphereLoss(model, all_weights)
        return
    with pytest.raises(ValueError, match=match):
        SphereLoss(model, all_weights)
    with pytest.raises(ValueError, match=match):
        Trainer(model, TrainConfig(global_batch=4, total_steps=2, warmup_steps=0, loss_weights=all_weights))


def test_images_in_0_1_warn_and_fit_checks_the_first_batch_once(tmp_path, monkeypatch):
    """Images in [0, 1] pass the range but train towards other images: a first batch with no value below 0
    warns. fit checked its first batch, and then train_step checked it again on a CPU run (one check now)."""
    trainer = Trainer(tiny_model(), TrainConfig(global_batch=6, total_steps=2, warmup_steps=1,
                                                loss_weights=NO_PERCEPTUAL))
    x, y = tiny_batch(6)
    with pytest.warns(UserWarning, match=r"x holds no value below 0 .*images in \[0, 1\] train another objective"):
        trainer.train_step((x + 1) / 2, y)
    checked = []
    check = training.check_image_range
    monkeypatch.setattr(training, "check_image_range", lambda images: checked.append(1) or check(images))
    fit(synthetic_run(tmp_path, 2), progress=False)
    assert checked == [1]


def test_fit_refuses_a_dataset_of_another_image_range(tmp_path, monkeypatch):
    """A dataset giving [0, 255] images (say) stops at its first batch, checked on the host before any step."""
    from sphere_fast import data

    open_dataset = data.open_dataset

    class Scaled(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner, self.num_classes = inner, inner.num_classes

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            x, y = self.inner[i]
            return (x + 1) * 127.5, y

    monkeypatch.setattr(data, "open_dataset", lambda *a, **k: Scaled(open_dataset(*a, **k)))
    monkeypatch.setattr(Trainer, "launch_step", lambda *a, **k: pytest.fail("no step before the check"))
    with pytest.raises(ValueError, match=r"x must hold images in \[-1, 1\]"):
        fit(synthetic_run(tmp_path, 1), progress=False)


def test_a_trainer_turns_tf32_on_for_its_process():
    """As the official training does; the next test checks that no later test inherits it."""
    Trainer(tiny_model(), TrainConfig(loss_weights=NO_PERCEPTUAL))
    assert torch.get_float32_matmul_precision() == "high"


def test_a_test_after_a_trainer_runs_with_torch_s_float32_defaults():
    """The root conftest's keep_float32_precision restored them (on a GPU, float32 attention under ``auto`` would
    otherwise take the TF32 kernel in every test after the first Trainer)."""
    assert torch.get_float32_matmul_precision() == "highest"
