import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sphere_fast import SphereEncoder, checkpoint
from sphere_fast.checkpoint import (
    OFFICIAL_EMA_KEY,
    ROPE_BUFFERS,
    checkpoint_to_official,
    latest_checkpoint,
    load_checkpoint,
    official_to_checkpoint,
    read_official,
    save_checkpoint,
    verify_checkpoint,
)
from sphere_fast.training import DistInfo, RunConfig, TrainConfig, Trainer, fit, process_seed
from tests import spec_reference
from tests.files import rehash
from tests.tiny import NO_PERCEPTUAL, TINY_CONFIG, tiny_batch, tiny_model


def small_trainer(steps: int = 1) -> Trainer:
    trainer = Trainer(tiny_model(), TrainConfig(global_batch=6, total_steps=10, warmup_steps=2, loss_weights=NO_PERCEPTUAL))
    for _ in range(steps):
        trainer.train_step(*tiny_batch(6))
    return trainer


def test_roundtrip_keeps_weights_ema_optimizer_and_official_keys(tmp_path):
    trainer = small_trainer(2)
    path = save_checkpoint(tmp_path, trainer.model, trainer=trainer, run_config={"data": "synthetic"})
    assert path.name == "step-00000002" and latest_checkpoint(tmp_path) == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and sorted(manifest["files"]) == [
        "config.json", "ema.safetensors", "model.safetensors", "trainer_state.pt"]
    assert load_checkpoint(path)[1]["run"] == {"data": "synthetic"}
    assert set(load_file(str(path / "model.safetensors"))) == set(trainer.model.state_dict())
    other = Trainer(tiny_model(seed=9), TrainConfig(global_batch=6, total_steps=10, warmup_steps=2, loss_weights=NO_PERCEPTUAL))
    load_checkpoint(tmp_path, trainer=other)
    assert other.step == 2
    for a, b in [(trainer.model, other.model), (trainer.ema, other.ema)]:
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    assert other.optimizer.state_dict()["state"][0]["step"] == 2
    ema_model, _ = load_checkpoint(path, ema=True)
    live_model, _ = load_checkpoint(path)
    for (k, ema), live in zip(trainer.ema.state_dict().items(), trainer.model.state_dict().values()):
        torch.testing.assert_close(ema_model.state_dict()[k], ema, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(live_model.state_dict()[k], live, rtol=0, atol=0, msg=k)
    ema_weight, live_weight = ema_model.decoder.ffn.linear.weight, live_model.decoder.ffn.linear.weight
    assert not torch.equal(ema_weight, live_weight), "the EMA and live weights must differ after two steps"


def test_a_strided_weight_is_saved_by_value(tmp_path):
    """safetensors stores contiguous tensors only: a weight held as a transposed view is saved as its values."""
    model = tiny_model()
    weight = model.decoder.blocks[0].attn.proj.weight
    weight.data = weight.data.t().contiguous().t()
    assert not weight.is_contiguous()
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path, model))
    assert torch.equal(loaded.decoder.blocks[0].attn.proj.weight, weight)


def test_resume_gives_the_same_next_losses(tmp_path):
    def run(out: Path, steps: int) -> RunConfig:
        return RunConfig(
            model=TINY_CONFIG,
            train=TrainConfig(global_batch=6, total_steps=steps, warmup_steps=1, base_lr=1e-2, loss_weights=NO_PERCEPTUAL),
            data="synthetic", out=str(out), checkpoint_every=2, workers=1,
        )

    fit(run(tmp_path / "a", 4), progress=False)
    straight = (tmp_path / "a" / "losses.jsonl").read_text().splitlines()
    # interrupted after step 2: only the step-2 checkpoint survives
    fit(run(tmp_path / "b", 4), progress=False)
    ckpts = tmp_path / "b" / "checkpoints"
    (ckpts / "latest").write_text("step-00000002\n")
    shutil.rmtree(ckpts / "step-00000004")
    fit(run(tmp_path / "b", 4), progress=False)
    resumed = (tmp_path / "b" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight[2:], resumed[2:]):
        assert {**json.loads(a), "time": None} == {**json.loads(b), "time": None}  # all but the clock
    # and a different RNG/data position would not have matched
    assert json.loads(straight[2])["loss"] != json.loads(straight[1])["loss"]


KILLED_SAVE = """
import os, sys, time
import sphere_fast.checkpoint as ck
from tests.test_checkpoint import small_trainer
trainer = small_trainer(1)
ck.save_checkpoint(sys.argv[1], trainer.model, trainer=trainer)
trainer.train_step(*__import__("tests.tiny", fromlist=["x"]).tiny_batch(6))
real = ck._fsync
def stall(path):
    real(path)
    if path.name == "model.safetensors":  # mid-save: weights written, the rest not yet
        open(sys.argv[2], "w").close()
        time.sleep(120)
ck._fsync = stall
ck.save_checkpoint(sys.argv[1], trainer.model, trainer=trainer)
"""


def test_process_killed_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    flag = tmp_path / "saving"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "ck"), str(flag)], cwd=root)
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert proc.poll() is None and time.time() < deadline, "the saving process ended early"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert any(p.name.startswith(".tmp-step-00000002") for p in (tmp_path / "ck").iterdir())
    assert latest_checkpoint(tmp_path / "ck").name == "step-00000001"
    trainer = Trainer(tiny_model(seed=3), TrainConfig(global_batch=6, total_steps=10, warmup_steps=2, loss_weights=NO_PERCEPTUAL))
    load_checkpoint(tmp_path / "ck", trainer=trainer)
    assert trainer.step == 1
    # the next save sweeps the debris
    save_checkpoint(tmp_path / "ck", trainer.model, trainer=trainer, name="again")
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "ck").iterdir())


def test_saves_beyond_keep_are_pruned_but_never_the_current_one(tmp_path):
    """The newest ``keep`` step folders stay (by name); the one just written stays even when it is not among them."""
    model = tiny_model()
    for step in range(1, 5):
        save_checkpoint(tmp_path, model, name=f"step-{step:08d}", keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]
    save_checkpoint(tmp_path, model, name="step-00000002", keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_pruning_keeps_two_by_default_and_counts_only_complete_checkpoints(tmp_path):
    model = tiny_model()
    (tmp_path / "step-00000009").mkdir()  # not a checkpoint (no manifest): neither counted nor removed
    for step in range(1, 4):
        save_checkpoint(tmp_path, model, name=f"step-{step:08d}")
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003", "step-00000009"]


def test_saving_a_name_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, tiny_model(seed=1), name="best")
    replacement = tiny_model(seed=2)
    save_checkpoint(tmp_path, replacement, name="best")
    loaded, _ = load_checkpoint(tmp_path / "best")
    assert all(torch.equal(v, replacement.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest"]  # no temporary or old folder left
    # a re-save killed between its two renames leaves the old folder aside: the next save puts it back when the
    # new one never landed, and drops it when it did
    (tmp_path / "best").rename(tmp_path / ".old-best-123")
    shutil.copytree(tmp_path / ".old-best-123", tmp_path / ".old-kept-best-9")
    (tmp_path / "kept-best").mkdir()
    save_checkpoint(tmp_path, tiny_model(seed=3), name="other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "kept-best", "latest", "other"]
    loaded, _ = load_checkpoint(tmp_path / "best")
    assert all(torch.equal(v, replacement.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_resuming_takes_this_process_rng_state_or_seeds_it_afresh_on_another_process_count(tmp_path):
    """A checkpoint of two processes holds two RNG states: rank 1 resumes with the second. On three processes
    the states do not map onto the ranks: each rank is seeded from (seed, rank, step) instead, rank 0 warns
    that the run is no longer bit-identical, and weights, EMA, optimiser and step still carry over."""
    trainer = small_trainer(1)
    path = save_checkpoint(tmp_path, trainer.model, trainer=trainer)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    second = {"torch": torch.Generator().manual_seed(1).get_state()}
    state["rng"] = [state["rng"][0], second]
    torch.save(state, path / "trainer_state.pt")
    rehash(path)
    loaded: dict = {}
    stub = SimpleNamespace(model=tiny_model(seed=3), dist=DistInfo(rank=1, world_size=2), load_state_dict=loaded.update,
                           check_state=lambda state: None)
    load_checkpoint(path, trainer=stub)
    assert torch.equal(loaded["rng"]["torch"], second["torch"]) and loaded["step"] == 1

    after: dict[int, torch.Tensor] = {}
    for rank in (0, 2):
        resumed = small_trainer(0)
        resumed.dist = DistInfo(rank=rank, world_size=3)
        torch.manual_seed(99)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_checkpoint(path, trainer=resumed)
        warned = [str(w.message) for w in caught if "written by 2 processes and resumes on 3" in str(w.message)]
        assert len(warned) == (rank == 0)
        after[rank] = torch.get_rng_state()
        torch.manual_seed(process_seed(resumed.config.seed, rank, 1))
        assert torch.equal(after[rank], torch.get_rng_state())
        assert resumed.step == 1
        for k, v in trainer.ema.state_dict().items():
            assert torch.equal(resumed.ema.state_dict()[k], v), k
        moments = [(a["exp_avg"], b["exp_avg"]) for a, b in
                   zip(resumed.optimizer.state.values(), trainer.optimizer.state.values(), strict=True)]
        assert moments and all(torch.equal(a, b) for a, b in moments)
    assert not torch.equal(after[0], after[2])


def test_a_resume_takes_this_trainer_s_recipe_and_names_what_changed(tmp_path):
    """The optimiser's state would bring back its settings: the resuming trainer's config holds instead, as it
    does for the lr schedule, the EMA decay and the clipping, and the fields that changed are named. The same
    recipe resumes without a word."""
    trainer = small_trainer(1)
    path = save_checkpoint(tmp_path, trainer.model, trainer=trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path, trainer=small_trainer(0))
    changed = dataclasses.replace(trainer.config, betas=(0.5, 0.6), weight_decay=0.25, encoder_lr_scale=0.5)
    resumed = Trainer(tiny_model(), changed)
    named = r"encoder_lr_scale 0.1 -> 0.5, betas \(0.9, 0.95\) -> \(0.5, 0.6\), weight_decay 0.0 -> 0.25$"
    with pytest.warns(UserWarning, match=named):
        load_checkpoint(path, trainer=resumed)
    settings = [(g["lr_scale"], g["betas"], g["weight_decay"]) for g in resumed.optimizer.param_groups]
    assert settings == [(0.5, (0.5, 0.6), 0.25), (1.0, (0.5, 0.6), 0.25)]
    assert resumed.step == 1 and all(
        torch.equal(a["exp_avg"], b["exp_avg"])
        for a, b in zip(resumed.optimizer.state.values(), trainer.optimizer.state.values(), strict=True)
    )


def test_resuming_a_checkpoint_of_the_additive_shuffle_seeds_says_the_data_order_changes(tmp_path):
    """A checkpoint of an older sphere_fast (epoch e shuffled with seed + e) records no derivation: its resume
    reads the rest of the data in another order than its run would have, and says so."""
    trainer = small_trainer(1)
    path = save_checkpoint(tmp_path, trainer.model, trainer=trainer)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    del state["seed_derivation"]
    torch.save(state, path / "trainer_state.pt")
    rehash(path)
    with pytest.warns(UserWarning, match="derived its shuffle seeds as 'seed \\+ epoch', this sphere_fast as 'blake2b"):
        load_checkpoint(path, trainer=small_trainer(0))


def test_a_meta_built_model_takes_the_loaded_weights(tmp_path):
    """README's way to build a big model: on the meta device, then load. A copy into meta tensors is lost (the model
    stayed on meta, and to_empty then gave uninitialised weights): the loaded tensors are taken as they are."""
    saved = tiny_model(seed=4)
    path = save_checkpoint(tmp_path, saved)
    with torch.device("meta"):
        model = SphereEncoder(**TINY_CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns once a key when copying into meta
        load_checkpoint(path, model)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def test_what_would_overwrite_a_trainer_s_weights_wrongly_is_refused_first(tmp_path):
    """ema=True with a trainer would resume from the EMA weights; a weights-only checkpoint cannot resume: both
    are refused before the trainer's weights change."""
    trainer = small_trainer(1)
    full = save_checkpoint(tmp_path / "full", trainer.model, trainer=trainer)
    weights_only = save_checkpoint(tmp_path / "weights", tiny_model(seed=5))
    resumed = small_trainer(0)
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    for path, kwargs, match in ((full, {"ema": True}, "ema=True with a trainer"), (weights_only, {}, "weights only")):
        with pytest.raises(ValueError, match=match):
            load_checkpoint(path, trainer=resumed, **kwargs)
        assert all(torch.equal(v, before[k]) for k, v in resumed.model.state_dict().items())


def test_a_trainer_state_that_does_not_fit_is_refused_before_anything_changes(tmp_path):
    """A resume into a trainer whose trainable parameters differ (one more frozen; or one frozen, another not)
    replaced the weights and the step before the optimiser's load refused the state, or, groups of equal sizes,
    loaded moments of other shapes: a caller who went on trained from a mix. Refused first now."""
    trainer = small_trainer(2)
    path = save_checkpoint(tmp_path, trainer.model, trainer=trainer)
    one_more_frozen = tiny_model(seed=5)
    one_more_frozen.encoder.x_embedder[0].weight.requires_grad_(False)
    another_trained = tiny_model(seed=5)
    another_trained.encoder.x_embedder[0].weight.requires_grad_(False)
    another_trained.encoder.pos_embed.requires_grad_(True)
    for model, match in ((one_more_frozen, r"groups \(encoder, decoder\) of \[\d+, \d+\] tensors, this trainer"),
                         (another_trained, r"exp_avg of parameter \d+ has shape")):
        config = TrainConfig(global_batch=6, total_steps=10, warmup_steps=2, loss_weights=NO_PERCEPTUAL)
        resumed = Trainer(model, config)
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (resumed.model, resumed.ema)]
        with pytest.raises(ValueError, match=match):
            load_checkpoint(path, trainer=resumed)
        assert resumed.step == 0 and not resumed.optimizer.state
        for m, kept in zip((resumed.model, resumed.ema), before):
            assert all(torch.equal(v, kept[k]) for k, v in m.state_dict().items())


def test_a_save_that_fails_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """A save that failed part way (a full disk) left its temporary folder until the next save: a full disk stayed
    full. It is removed, and the latest checkpoint is still the one before."""
    from sphere_fast import checkpoint

    model = tiny_model()
    first = save_checkpoint(tmp_path, model, name="first")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, model, name="second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "latest"] and latest_checkpoint(tmp_path) == first


def test_a_re_save_whose_last_rename_fails_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """A re-save moves the old folder aside, then renames the new one in: a failure there left the name empty
    (latest naming it) until the next save put the old one back. It is put back at once."""
    first = tiny_model(seed=1)
    save_checkpoint(tmp_path, first, name="best")
    rename = os.rename

    def failing_for_the_new_folder(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(5, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_for_the_new_folder)
    with pytest.raises(OSError, match="Input/output error"):
        save_checkpoint(tmp_path, tiny_model(seed=2), name="best")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest"]
    loaded, _ = load_checkpoint(tmp_path)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_save_refuses_what_no_load_would_read_before_writing(tmp_path):
    """A compiled or DDP-wrapped model saves its wrapper's key prefix (the save then moved latest to it and pruned
    loadable ones); keep below 1 and the name of the pointer file are refused too, all before anything is written."""
    model = tiny_model()
    refused = [((torch.compile(model),), {}, TypeError, "model must be a SphereEncoder, got OptimizedModule"),
               (("model",), {}, TypeError, "model must be a SphereEncoder, got str"),
               ((model,), {"keep": 0}, ValueError, "keep must be an int >= 1"),
               ((model,), {"name": "latest"}, ValueError, "name must be a folder name other than 'latest'"),
               ((model,), {"name": "../elsewhere"}, ValueError, "name must be a folder name")]
    wrong_ema = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}  # found at load only
    refused.append(((model,), {"ema_weights": wrong_ema}, ValueError, "ema_weights: state_dict does not match"))
    for args, kwargs, error, match in refused:
        with pytest.raises(error, match=match):
            save_checkpoint(tmp_path / "run", *args, **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_size_by_name_loads_into_the_same_size_as_a_dict_and_a_built_model_samples(tmp_path):
    """A run saved with the size "tiny" was refused for a model built with its dict ({"width": 64, "layers": 2,
    "heads": 2}), the same model; and a model load_checkpoint builds comes back in eval mode, ready to sample
    (every sampling call refuses training mode), while a model given keeps its mode."""
    by_name = tiny_model(vit_enc_model_size="tiny", vit_dec_model_size="tiny")
    path = save_checkpoint(tmp_path, by_name)
    as_dict = tiny_model(1, vit_enc_model_size={"width": 64, "layers": 2, "heads": 2},
                         vit_dec_model_size={"width": 64, "layers": 2, "heads": 2})
    loaded, _ = load_checkpoint(path, as_dict)
    assert loaded is as_dict and loaded.training
    assert all(torch.equal(a, b) for a, b in zip(as_dict.state_dict().values(), by_name.state_dict().values()))
    with pytest.raises(ValueError, match=r"different model config \(vit_dec_model_size: checkpoint 'tiny' vs model"):
        load_checkpoint(path, tiny_model(vit_enc_model_size="tiny", vit_dec_model_size="small"))
    built, _ = load_checkpoint(path)
    assert not built.training
    built.generate(2, seeds=torch.arange(2))


def test_corrupt_incomplete_and_mismatched_checkpoints_are_refused(tmp_path):
    trainer = small_trainer(1)
    path = save_checkpoint(tmp_path, trainer.model, trainer=trainer)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt: model.safetensors"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, trainer.model, trainer=trainer, name="good")
    with pytest.raises(ValueError, match="different model config.*width"):
        load_checkpoint(path, tiny_model(vit_dec_model_size={"width": 64, "layers": 1, "heads": 2}))
    config, saved = path / "config.json", (path / "config.json").read_text()
    config.write_text(saved.replace('"width": 32', '"width": 33', 1))  # hashed like the weights
    with pytest.raises(ValueError, match="corrupt: config.json"):
        load_checkpoint(path)
    config.write_text(saved)
    (path / "ema.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete: ema.safetensors is missing"):
        load_checkpoint(path)
    (path / "manifest.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="manifest.json is corrupt"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a sphere_fast checkpoint"):
        load_checkpoint(path)
    (tmp_path / "latest").write_text("good\n")  # a pointer at a folder without a manifest
    with pytest.raises(ValueError, match="latest names good, which is not a complete checkpoint"):
        latest_checkpoint(tmp_path)
    weights_only = save_checkpoint(tmp_path, trainer.model, name="weights")
    with pytest.raises(ValueError, match="cannot resume"):
        load_checkpoint(weights_only, trainer=small_trainer(0))
    with pytest.raises(ValueError, match="holds no EMA weights"):
        load_checkpoint(weights_only, ema=True)
    config = json.loads((weights_only / "config.json").read_text())
    config["model"]["future_option"] = 1
    (weights_only / "config.json").write_text(json.dumps(config))
    rehash(weights_only)
    with pytest.raises(ValueError, match="different model config.*future_option"):
        load_checkpoint(weights_only, tiny_model())
    with pytest.raises(ValueError, match="config this sphere_fast cannot build: .*'future_option'"):
        load_checkpoint(weights_only)
    manifest = json.loads((weights_only / "manifest.json").read_text())
    (weights_only / "manifest.json").write_text(json.dumps({**manifest, "format": "sphere_fast-checkpoint/0"}))
    with pytest.raises(ValueError, match="unsupported checkpoint format 'sphere_fast-checkpoint/0'"):
        load_checkpoint(weights_only)


def test_a_manifest_must_list_the_files_a_load_reads_and_only_those(tmp_path):
    """The manifest says what is checked: with no files listed, weights replaced by zeros loaded; a name such as
    ../x or /dev/zero was read from elsewhere (and /dev/zero hashed for ever); a manifest of another shape escaped
    the CLI as an AttributeError. A ``latest`` naming a path outside its folder is refused too."""
    path = save_checkpoint(tmp_path, tiny_model(seed=1), name="ckpt")
    manifest = json.loads((path / "manifest.json").read_text())
    (tmp_path / "elsewhere").write_text("{}")
    for files, match in (({}, r"does not list \['model.safetensors', 'config.json'\]"),
                         ({**manifest["files"], "/dev/zero": "0" * 64}, r"lists \['/dev/zero'\], not checkpoint files"),
                         ({**manifest["files"], "../elsewhere": "0" * 64}, r"lists \['../elsewhere'\]")):
        (path / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(ValueError, match=match):
            load_checkpoint(path)
    for bad in ([], {"format": manifest["format"]}, {**manifest, "files": ["model.safetensors"]}):
        (path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="manifest.json is corrupt: not an object with a 'files' object"):
            load_checkpoint(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert load_checkpoint(path)[0].config == tiny_model().config
    for name in ("../ckpt", str(path), "."):
        (tmp_path / "latest").write_text(name + "\n")
        with pytest.raises(ValueError, match=f"latest is corrupt: it names {re.escape(repr(name))}, not a checkpoint"):
            latest_checkpoint(tmp_path)


def test_a_load_hashes_the_files_it_reads(tmp_path):
    """Sampling from a training checkpoint's EMA weights hashed its live weights and trainer state too (three
    quarters of its bytes: minutes for sphere-xl on network storage). A damaged file is refused by the loads that
    read it, and only by those."""
    trainer = small_trainer(1)
    path = save_checkpoint(tmp_path, trainer.model, trainer=trainer)
    for name in ("trainer_state.pt", "model.safetensors"):
        data = bytearray((path / name).read_bytes())
        data[-5] ^= 0xFF
        (path / name).write_bytes(bytes(data))
    ema, _ = load_checkpoint(path, ema=True)
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in trainer.ema.state_dict().items())
    with pytest.raises(ValueError, match="corrupt: model.safetensors"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="corrupt: (model.safetensors|trainer_state.pt)"):
        load_checkpoint(path, trainer=small_trainer(0))
    with pytest.raises(ValueError, match="corrupt: model.safetensors"):
        checkpoint_to_official(path, tmp_path / "back.pth")
    with pytest.raises(ValueError, match="corrupt: trainer_state.pt"):
        verify_checkpoint(path, files=["trainer_state.pt"])
    assert verify_checkpoint(path, files=())["step"] == 1  # the manifest's form only
    for files in (["model.safetensor"], "model.safetensors"):  # a typo, or a str, would check nothing
        with pytest.raises(ValueError, match="files must be a collection of"):
            verify_checkpoint(path, files=files)
    weights_only = save_checkpoint(tmp_path, trainer.model, name="weights")
    with pytest.raises(ValueError, match=r"holds no \['ema.safetensors'\]"):
        verify_checkpoint(weights_only, files=["ema.safetensors"])


def test_a_loaded_model_owns_its_weights(tmp_path):
    """A model built on the meta device took load_file's tensors as they were: views of the file's mapping, so a
    later copy over the file changed its weights, and a truncation crashed the process (SIGBUS). Its weights are
    its own memory, the file's dtype cast to its own (a model built here: the default dtype)."""
    path = save_checkpoint(tmp_path, tiny_model(seed=1).to(torch.bfloat16), name="ckpt")
    other = save_checkpoint(tmp_path, tiny_model(seed=2).to(torch.bfloat16), name="other")
    expected = {k: v.float() for k, v in tiny_model(seed=1).to(torch.bfloat16).state_dict().items()}
    with torch.device("meta"):
        given = SphereEncoder(**TINY_CONFIG).to(torch.bfloat16)
    loaded = [load_checkpoint(path)[0], load_checkpoint(path, given)[0]]
    shutil.copyfile(other / "model.safetensors", path / "model.safetensors")  # the same file, other bytes
    assert {p.dtype for p in loaded[0].parameters()} == {torch.float32} and not loaded[0].training
    assert {p.dtype for p in loaded[1].parameters()} == {torch.bfloat16}
    for model in loaded:
        assert all(torch.equal(v.float(), expected[k]) for k, v in model.state_dict().items())


def test_a_built_model_is_never_initialised_at_full_size(tmp_path, monkeypatch):
    """The model load_checkpoint builds is made on the meta device: no random init of a full-size model (its time,
    and a config asking for any size would allocate it) before the weights are checked and copied in."""
    path = save_checkpoint(tmp_path, tiny_model(seed=1), name="ckpt")
    initialised: list[torch.device] = []
    xavier = torch.nn.init.xavier_uniform_
    monkeypatch.setattr(torch.nn.init, "xavier_uniform_", lambda t, *a, **k: initialised.append(t.device) or xavier(t))
    load_checkpoint(path)
    assert initialised and {d.type for d in initialised} == {"meta"}


def test_weights_that_are_not_what_the_config_describes_are_refused_before_they_are_read(tmp_path, monkeypatch):
    """load_checkpoint built the model of config.json, at full size with its random init, before it read the weights:
    a config edited to ask for a huge model allocated without bound (about 0.8 TB for width 16384), and a mismatch
    came out of load_state_dict as a RuntimeError. The model is built on the meta device, its tensors compared with
    the file's header, and a model built there comes back in the default dtype, as before."""
    path = save_checkpoint(tmp_path, tiny_model(seed=1).to(torch.bfloat16), name="ckpt")
    loaded, _ = load_checkpoint(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32} and not loaded.training
    config = json.loads((path / "config.json").read_text())
    config["model"]["vit_dec_model_size"] = {"width": 1024, "layers": 8, "heads": 8}
    (path / "config.json").write_text(json.dumps(config))
    rehash(path)
    monkeypatch.setattr(checkpoint, "load_file", lambda *a: pytest.fail("the weights are read after the check"))
    with pytest.raises(ValueError, match=r"model.safetensors: state_dict does not match this SphereEncoder; .*shaped"):
        load_checkpoint(path)


def test_converting_into_a_run_s_checkpoints_is_refused(tmp_path):
    """A conversion into a run's checkpoints folder pruned its step checkpoints and pointed latest at weights
    without trainer state (a resume then refused them). An earlier conversion's folder takes a new one."""
    torch.save(tiny_model(seed=1).state_dict(), tmp_path / "official.pth")
    run = tmp_path / "run"
    for step in (500, 1000, 1500):
        save_checkpoint(run, tiny_model(), name=f"step-{step:08d}", keep=5)
    with pytest.raises(ValueError, match=r"holds a run's checkpoints \(step-00000500, step-00001000, step-00001500, "
                                         r"latest\): convert into a folder of its own"):
        official_to_checkpoint(tmp_path / "official.pth", run, TINY_CONFIG)
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-00000500", "step-00001000", "step-00001500"]
    assert latest_checkpoint(run).name == "step-00001500"
    first = official_to_checkpoint(tmp_path / "official.pth", tmp_path / "own", TINY_CONFIG)
    assert official_to_checkpoint(tmp_path / "official.pth", tmp_path / "own", TINY_CONFIG) == first


def test_an_official_file_is_mapped_and_what_read_official_returns_is_a_copy(tmp_path, monkeypatch):
    """An official training checkpoint holds the optimiser's moments beside the weights: read whole, converting
    sphere-xl held about 22 GB to keep 5.6. A path to a zip file is mapped; the legacy format and a file object,
    which cannot be, are read. read_official's tensors do not change when the file is written again."""
    sd = tiny_model(seed=1).state_dict()
    torch.save({"model": sd, "optimizer": {"m": torch.ones(10)}}, tmp_path / "zip.pth")
    torch.save({"model": sd}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    load, mapped = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **k: mapped.append(k.get("mmap")) or load(*a, **k))
    read = {name: read_official(name) for name in (tmp_path / "zip.pth", tmp_path / "legacy.pth")}
    read_official(io.BytesIO((tmp_path / "zip.pth").read_bytes()))
    assert mapped == [True, False, False]
    assert all(torch.equal(read[tmp_path / "legacy.pth"][k], v) for k, v in sd.items())
    torch.save({"model": {k: torch.zeros_like(v) for k, v in sd.items()}}, tmp_path / "zip.pth")
    assert all(torch.equal(read[tmp_path / "zip.pth"][k], v) for k, v in sd.items())
    converted = official_to_checkpoint(tmp_path / "legacy.pth", tmp_path / "ours", TINY_CONFIG)
    assert all(torch.equal(load_checkpoint(converted)[0].state_dict()[k], v) for k, v in sd.items())


def test_a_path_that_is_no_checkpoint_folder_is_named_for_what_it_is(tmp_path):
    """A missing path is not blamed on an interrupted save; a file (most likely an official .pth, the first thing a
    user tries) points at the converter and read_official; a folder given to the .pth reader points back."""
    for read in (load_checkpoint, verify_checkpoint):
        with pytest.raises(FileNotFoundError, match="nope does not exist"):
            read(tmp_path / "nope")
    pth = tmp_path / "official.pth"
    torch.save(tiny_model().state_dict(), pth)
    for read in (load_checkpoint, verify_checkpoint):
        with pytest.raises(ValueError, match="official.pth is a file, .*`sphere-fast convert`.*read_official"):
            read(pth)
    folder = save_checkpoint(tmp_path / "run", tiny_model())
    with pytest.raises(ValueError, match="is a folder, not an official .pth: .* load_checkpoint"):
        read_official(folder)
    with pytest.raises(ValueError, match="is a folder, not an official .pth"):
        official_to_checkpoint(folder, tmp_path / "out", TINY_CONFIG)
    assert not (tmp_path / "out").exists()
    # a file object (a .pth streamed, or read from an archive) is read as torch.load reads it
    buffer = io.BytesIO(pth.read_bytes())
    assert read_official(buffer).keys() == tiny_model().state_dict().keys()


@pytest.mark.parametrize("layout", ["plain", "model_key", "ddp_prefix", "compile_prefix", "compiled_ddp_prefix"])
def test_official_pth_converts_both_ways(tmp_path, layout):
    model = tiny_model()
    sd = model.state_dict()
    obj = {
        "plain": sd,
        "model_key": {"model": sd, "optimizer": {}, "epoch": 3},
        "ddp_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "compile_prefix": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "compiled_ddp_prefix": {f"_orig_mod.module.{k}": v for k, v in sd.items()},  # torch.compile(DDP(model))
    }[layout]
    torch.save(obj, tmp_path / "official.pth")
    path = official_to_checkpoint(tmp_path / "official.pth", tmp_path / "ours", TINY_CONFIG)
    loaded, config = load_checkpoint(path)
    assert config["model"] == json.loads(json.dumps(loaded.config)) and loaded.config["vit_enc_model_size"]["width"] == 32
    back = checkpoint_to_official(path, tmp_path / "back.pth")
    state = torch.load(back, weights_only=True)["model"]
    assert list(state) == list(sd)
    for k in sd:
        torch.testing.assert_close(state[k], sd[k], rtol=0, atol=0)
        torch.testing.assert_close(loaded.state_dict()[k], sd[k], rtol=0, atol=0)
    for bad, holds in (({"weights": 1}, r"keys \['weights'\]"), ({}, r"keys \[\]"), ([1], "a list")):
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=rf"neither a state_dict .* \(it holds {holds}\)"):
            official_to_checkpoint(tmp_path / "bad.pth", tmp_path / "x", TINY_CONFIG)


def test_an_official_bf16_file_converts_in_its_dtype_and_its_rope_tables_are_checked(tmp_path):
    """A bf16 file's weights stay bf16 (they were widened to float32 while the EMA kept bf16: a bigger file that
    was no longer the input); the RoPE tables an official EMA dict holds are compared with the model's, not
    dropped unread."""
    model = tiny_model().to(torch.bfloat16)
    sd = model.state_dict()
    tables = {name: vit.rope_table().unsqueeze(0) for name, vit in zip(ROPE_BUFFERS, (model.encoder, model.decoder))}
    torch.save({"model": sd, OFFICIAL_EMA_KEY: {**sd, **tables}}, tmp_path / "bf16.pth")
    path = official_to_checkpoint(tmp_path / "bf16.pth", tmp_path / "ours", TINY_CONFIG)
    assert {t.dtype for t in load_file(str(path / "model.safetensors")).values()} == {torch.bfloat16}
    back = torch.load(checkpoint_to_official(path, tmp_path / "back.pth"), weights_only=True)
    assert all(torch.equal(back["model"][k], v) and back["model"][k].dtype == v.dtype for k, v in sd.items())
    wrong = {**tables, "decoder.rope": tables["decoder.rope"][:, :-1]}
    torch.save({"model": sd, OFFICIAL_EMA_KEY: {**sd, **wrong}}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="its decoder.rope table differs from this model's RoPE table"):
        official_to_checkpoint(tmp_path / "wrong.pth", tmp_path / "x", TINY_CONFIG)


def test_a_prefix_is_stripped_only_from_keys_that_all_carry_it(tmp_path):
    weights = torch.zeros(1)
    torch.save({"module.encoder.w": weights, "decoder.w": weights}, tmp_path / "mixed.pth")
    assert sorted(read_official(tmp_path / "mixed.pth")) == ["decoder.w", "module.encoder.w"]
    torch.save({"model": weights, "decoder.w": weights}, tmp_path / "named_model.pth")  # a tensor named model
    assert sorted(read_official(tmp_path / "named_model.pth")) == ["decoder.w", "model"]


def test_a_training_checkpoint_converts_with_its_ema_and_any_key(tmp_path):
    """checkpoint_to_official writes the EMA weights where the official training saves them (``ema_model``, every
    parameter and buffer, the RoPE tables [1, N, 2 * head_dim] included: its loader reads that dict strictly);
    official_to_checkpoint reads the state_dict under the key it is given."""
    trainer = small_trainer(2)
    back = torch.load(checkpoint_to_official(save_checkpoint(tmp_path / "run", trainer.model, trainer=trainer),
                                             tmp_path / "back.pth"), weights_only=True)
    assert sorted(back) == ["ema_model", "model"]
    assert list(back["model"]) == list(trainer.model.state_dict())
    assert all(torch.equal(back["model"][k], v) for k, v in trainer.model.state_dict().items())
    ema = {k: v for k, v in back["ema_model"].items() if k not in ("encoder.rope", "decoder.rope")}
    assert list(ema) == list(trainer.ema.state_dict())
    assert all(torch.equal(ema[k], v) for k, v in trainer.ema.state_dict().items())
    grid = TINY_CONFIG["input_size"] // TINY_CONFIG["patch_size"]
    for name, size in (("encoder.rope", "vit_enc_model_size"), ("decoder.rope", "vit_dec_model_size")):
        head_dim = TINY_CONFIG[size]["width"] // TINY_CONFIG[size]["heads"]
        cos, sin = spec_reference.rope_table(head_dim, grid)
        torch.testing.assert_close(back["ema_model"][name], torch.cat([cos, sin], -1)[None], rtol=0, atol=1e-6)
    torch.save({"state": ema, "model": {}}, tmp_path / "keyed.pth")
    converted = official_to_checkpoint(tmp_path / "keyed.pth", tmp_path / "ours", TINY_CONFIG, key="state")
    loaded, _ = load_checkpoint(converted)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())


def test_an_official_training_checkpoint_converts_with_its_ema(tmp_path):
    """The official training's file: the live weights under "model" (saved through DDP), the EMA weights with
    the RoPE tables under "ema_model", and the optimizer and epoch beside them. Both sets of weights convert, and
    back; an EMA dict with other entries than tensors is left out with a warning; a file holding other objects than
    tensors is refused with a ValueError that says what to do."""
    live, averaged = tiny_model(seed=1), tiny_model(seed=2)
    tables = {"encoder.rope": averaged.encoder.rope[None], "decoder.rope": averaged.decoder.rope[None]}
    ema = {**averaged.state_dict(), **tables}
    official = {"model": {f"module.{k}": v for k, v in live.state_dict().items()}, "ema_model": ema, "epoch": 7,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}
    torch.save(official, tmp_path / "ep0007.pth")
    converted = official_to_checkpoint(tmp_path / "ep0007.pth", tmp_path / "ours", TINY_CONFIG)
    for use_ema, expected in ((False, live), (True, averaged)):
        loaded, _ = load_checkpoint(converted, ema=use_ema)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.state_dict().items())
    back = torch.load(checkpoint_to_official(converted, tmp_path / "back.pth"), weights_only=True)
    assert sorted(back["ema_model"]) == sorted(ema)
    assert all(torch.equal(back["ema_model"][k], v) for k, v in ema.items())
    only_ema = official_to_checkpoint(tmp_path / "ep0007.pth", tmp_path / "ema", TINY_CONFIG, key="ema_model")
    assert all(torch.equal(load_checkpoint(only_ema)[0].state_dict()[k], v) for k, v in averaged.state_dict().items())
    torch.save({**official, "ema_model": {**ema, "num_updates": 12}}, tmp_path / "counter.pth")
    with pytest.warns(UserWarning, match="'ema_model' holds other objects than tensors; the weights under 'model'"):
        without_ema = official_to_checkpoint(tmp_path / "counter.pth", tmp_path / "live", TINY_CONFIG)
    assert all(torch.equal(load_checkpoint(without_ema)[0].state_dict()[k], v) for k, v in live.state_dict().items())
    with pytest.raises(ValueError, match="no EMA weights"):
        load_checkpoint(without_ema, ema=True)
    torch.save({**official, "args": SimpleNamespace(lr=1e-4)}, tmp_path / "with_args.pth")
    with pytest.raises(ValueError, match=r"weights_only=False"):
        official_to_checkpoint(tmp_path / "with_args.pth", tmp_path / "x", TINY_CONFIG)
    with pytest.raises(ValueError, match="without a trainer"):
        save_checkpoint(tmp_path / "y", live, trainer=small_trainer(), ema_weights=averaged.state_dict())
