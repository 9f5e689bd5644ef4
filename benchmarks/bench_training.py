"""Training-step benchmark: one optimiser step of the paper's recipe (``training.Trainer.launch_step``) on
sphere-l-imagenet at 256 px, in bf16 autocast with fp32 weights, as ``sphere-fast train`` queues it on a GPU.

A step is the encoder on x, the decoder on both noise levels (one batch of 2B), the encoder on the big-noise
images (latent consistency), their backward, gradient clipping, AdamW and the EMA update; the perceptual
terms are off (they need weight files), the other loss terms are the ImageNet preset's. Implementations:
  eager    the step on sphere_fast's ``eager`` backend: the official model's plain PyTorch ops
  compile  that step with the loss module (forward and backward) under torch.compile(mode=
           "max-autotune-no-cudagraphs", fullgraph=True); the optimiser and EMA stay eager in every row
  fused    the step on the default backend (``auto``): the Triton / C++ kernels (smoke mode: ``cpp``)
Each implementation starts from the same weights and draws the same noise (the seed convention's: inside the
fused op, else one kernel a step), and its first step (inputs, noise levels and seeds fixed) is the gate: its
loss and gradient norm must match the eager step's. Model FLOP utilisation divides the spec's FLOPs (decoder /
encoder pass per image: 671 / 623 GFLOP; a step runs 2 decoder and 2 encoder passes, their backward twice
that) by the step time, against the bf16 matmul rate measured in the same run.
Smoke mode (CPU): a tiny float32 model, one timed step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch

from benchmarks.bench_sampling import PASS_GFLOP, random_model
from benchmarks.harness import DEVICE, SMOKE, PeakMemory, cuda_time_ms, pick, record, timed_with_clocks
from sphere_fast import SphereEncoder, ops, use_backend
from sphere_fast.training import LOSS_PRESETS, TRAINING_STREAM, StepLog, TrainConfig, Trainer, noise_scales

MODELS = pick(real=["sphere-l-imagenet"], smoke=["tiny"])
BATCHES = pick(real=[16], smoke=[3])
IMPLS = ("eager", "compile", "fused")
TIMED_STEPS = pick(real=5, smoke=1)
# the first step's loss and gradient norm against the eager step's: bf16 autocast on the GPU, float32 on the CPU
GATE_RTOL = pick(real=0.05, smoke=1e-4)
DTYPE_LABEL = pick(real="bf16 autocast", smoke="fp32")
# the fused row's backend: on the CPU, auto is eager, so smoke mode runs the C++ kernels' CPU implementation
FUSED_BACKEND = pick(real="auto", smoke="cpp")
LOSS_WEIGHTS = dataclasses.replace(LOSS_PRESETS["imagenet"], recon_perc=0.0, con_perc=0.0)


def flops_per_image(name: str) -> int | None:
    """Two decoder and two encoder passes forward, twice that backward; None without spec FLOPs."""
    if name not in PASS_GFLOP:
        return None
    dec, enc = PASS_GFLOP[name]
    return int(3 * 2 * (dec + enc) * 1e9)


def make_step(impl: str, trainer: Trainer) -> Callable[..., StepLog]:
    """``step(x, y, scales, seeds)`` -> the queued step's losses (``launch_step``, as ``fit`` runs it: no
    device sync in the timed calls), on the implementation's backend."""
    if impl == "compile":
        # On CPU (smoke) aot_eager traces forward and backward without minutes of C++ compilation.
        options = {"backend": "aot_eager"} if DEVICE.type == "cpu" else {"mode": "max-autotune-no-cudagraphs"}
        trainer.engine = torch.compile(trainer.loss, fullgraph=True, dynamic=False, **options)
    latent = trainer.model.latent_shape[1:]

    def fused(x: torch.Tensor, y: torch.Tensor, scales: tuple[torch.Tensor, ...], seeds: torch.Tensor) -> StepLog:
        with use_backend(FUSED_BACKEND):
            return trainer.launch_step(x, y, scales=scales, seeds=seeds)  # e drawn inside the fused op

    def plain(x: torch.Tensor, y: torch.Tensor, scales: tuple[torch.Tensor, ...], seeds: torch.Tensor) -> StepLog:
        # The seeds' noise drawn in one kernel, as the official step draws torch.randn: the seed convention's
        # pure-torch Philox (about 200 small kernels) would slow these baselines for no reason their users have.
        noise = ops.sphere_noise(seeds, latent, stream=TRAINING_STREAM, backend="auto")
        with use_backend("eager"):
            return trainer.launch_step(x, y, scales=scales, noise=noise)

    return fused if impl == "fused" else plain


def step_inputs(model: SphereEncoder, batch: int) -> tuple[torch.Tensor, ...]:
    """Images in [-1, 1] (on the device), labels (on the host), both noise levels and the noise seeds, from a
    fixed seed."""
    torch.manual_seed(1)
    size = model.input_size
    x = torch.rand(batch, 3, size, size, device=DEVICE) * 2 - 1
    y = torch.randint(0, model.num_classes, (batch,))  # on the host, as a loader's: range-checked without a sync
    seeds = torch.randint(0, 2**62, (batch,), dtype=torch.int64, device=DEVICE)
    return x, y, noise_scales(model, batch, DEVICE), seeds


def gate_step(step: Callable[..., StepLog], inputs: tuple) -> dict[str, float]:
    """The first step's losses, from the same global RNG state (the model's label dropout draws from it)."""
    torch.manual_seed(2)
    return step(*inputs).read()


_eager_first_step: dict[tuple[str, int], dict[str, float]] = {}


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("impl", [pytest.param(i, id=i, marks=[pytest.mark.slow] if i == "compile" and not SMOKE
                                                else []) for i in IMPLS])
def test_train_step(benchmark, ceilings, impl: str, name: str, batch: int) -> None:
    weights = dataclasses.asdict(LOSS_WEIGHTS)
    config = TrainConfig(global_batch=batch, total_steps=100, warmup_steps=0, loss_weights=weights)
    if impl != "eager" and (name, batch) not in _eager_first_step:  # the eager row (first) is its own reference
        reference = Trainer(random_model(name), config, device=DEVICE)
        _eager_first_step[name, batch] = gate_step(make_step("eager", reference), step_inputs(reference.model, batch))
        del reference
    trainer = Trainer(random_model(name), config, device=DEVICE)
    inputs = step_inputs(trainer.model, batch)
    memory = PeakMemory()  # above the weights and their EMA: gradients, optimiser state, activations
    step = make_step(impl, trainer)
    first = gate_step(step, inputs)  # compiles / autotunes, and the gate
    expected = _eager_first_step.setdefault((name, batch), first)
    for term in ("loss", "grad_norm"):  # the forward's and the backward's summary
        assert math.isclose(first[term], expected[term], rel_tol=GATE_RTOL), (
            f"{impl} step: {term} {first[term]} against eager's {expected[term]}"
        )
    ms, clocks = timed_with_clocks(lambda: cuda_time_ms(lambda: step(*inputs), warmup=pick(real=2, smoke=0),
                                                        rep=TIMED_STEPS, flush_l2=False))
    flops = flops_per_image(name)
    record(benchmark, op=f"train step {name}", impl=impl, shape=f"b{batch}", dtype=DTYPE_LABEL, ms=ms,
           flops=flops * batch if flops else None, ceilings=ceilings,
           extra={"images_per_s": batch / (ms * 1e-3), "loss": first["loss"], "peak_gb": memory.gb(),
                  **({"clocks_while_timed": clocks} if clocks else {})})
