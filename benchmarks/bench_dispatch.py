"""Host cost of one op call at a tiny shape: Python, input checks, backend choice, dispatch and the launch,
with the kernel's own time kept negligible.

The un-captured sampler at batch 1 pays this about 120 times a network pass (five fused ops a block), and so
does a small training step; a replayed CUDA graph pays none of it. Each case makes CALLS back-to-back calls
on tiny inputs (a few-microsecond kernel each, so the host stays the bottleneck), synchronizes once, and
keeps the fastest of REPEATS rounds (host timings only get slower from noise). ``ms`` is per call. The
eager reference (a few torch ops a call) and torch.compile of it are the floors to compare with.
Smoke mode (CPU): a few calls, and Triton in the interpreter: the numbers mean nothing there. On CPU the
real sizes (SPHERE_FAST_BENCH_SMOKE=0 TRITON_INTERPRET=0) time the C++ backend's host cost in float32.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks.bench_attention import split_qkv
from benchmarks.harness import DEVICE, OURS, Timing, gate, impls, pick, record
from sphere_fast import ops
from sphere_fast.ops.rope import rope_table_reference

CALLS = pick(real=2000, smoke=2)
REPEATS = pick(real=5, smoke=1)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # CPU bf16 kernels would time their math
B, N, W, HEADS = 1, 16, 64, 2  # one sample, 16 tokens, width 64: every kernel is a single small block


def host_ms_per_call(fn: Callable[[], object]) -> Timing:
    """Fastest round of CALLS calls, per call, by the host's clock with one synchronize a round."""
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    fn()  # first call: compiles, loads and autotunes outside the timing
    rounds = []
    for _ in range(REPEATS):
        sync()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        sync()
        rounds.append((time.perf_counter() - start) * 1e3 / CALLS)
    return Timing([min(rounds)])


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE)


def qkv_rope() -> tuple[torch.Tensor, ...]:
    """The model's strided q, k, v views of one projection output, and the RoPE table."""
    return *split_qkv(randn(B, N, 3 * W), HEADS), rope_table_reference(N, W // HEADS, DEVICE)


def qk_rope() -> tuple[torch.Tensor, ...]:
    q, k, _, table = qkv_rope()
    return q, k, table


def spherify_noise(z: torch.Tensor, seeds: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    return ops.spherify_noise(z, 0.5, seeds=seeds, stream=1, backend=backend)


# op name -> (sphere_fast op, eager reference, inputs); RoPE has no C++ kernel
CASES: dict[str, tuple[Callable[..., object], Callable[..., object], Callable[[], tuple]]] = {
    "swiglu": (ops.swiglu, ops.swiglu_reference, lambda: (randn(B, N, 2 * W),)),
    "gated_residual_adaln": (
        ops.gated_residual_adaln, ops.gated_residual_adaln_reference,
        lambda: (randn(B, N, W), randn(B, N, W), randn(B, 1, W), randn(W), randn(B, 1, W), randn(B, 1, W)),
    ),
    "apply_rope": (ops.apply_rope, ops.apply_rope_reference, qk_rope),
    "attention": (ops.attention, ops.attention_reference, qkv_rope),
    "spherify_noise": (
        spherify_noise, functools.partial(spherify_noise, backend="eager"),
        lambda: (randn(B, 4, N), torch.arange(B, device=DEVICE)),
    ),
}


def _params() -> list:
    """(op name, Impl) pairs, keeping each impl's skip mark."""
    return [
        pytest.param(name, p.values[0], id=f"{p.id}-{name}", marks=p.marks)
        for name, (op, reference, _) in CASES.items()
        for p in impls(op, reference, backends=("triton",) if name == "apply_rope" else OURS)
    ]


@pytest.mark.parametrize("name, impl", _params())
def test_dispatch(benchmark, name: str, impl) -> None:
    torch.manual_seed(0)
    _, reference, make_inputs = CASES[name]
    inputs = make_inputs()
    with torch.no_grad():  # sampling's regime; a training step adds the autograd record
        gate(impl(*inputs), reference(*inputs), f"{impl.name} {name}", DTYPE)
        ms = host_ms_per_call(lambda: impl(*inputs))
    record(benchmark, op=f"dispatch {name}", impl=impl.name, shape=f"B{B}-N{N}-W{W}", dtype=DTYPE, ms=ms,
           extra={"us_per_call": ms * 1e3})


@pytest.mark.parametrize("impl", impls(ops.gated_residual_adaln, ops.gated_residual_adaln_reference, backends=OURS))
def test_dispatch_with_backward(benchmark, impl) -> None:
    """A training step's host cost of one AdaLN block op: the forward recorded for autograd, then its backward
    (torch.autograd.grad into every input). The op rows of bench_adaln.py time the kernels of such a call with
    up to the harness's head start of host time hidden; this row keeps that host time."""
    torch.manual_seed(0)
    _, reference, make_inputs = CASES["gated_residual_adaln"]
    inputs = [t.requires_grad_() for t in make_inputs()]
    grads_out = (randn(B, N, W), randn(B, N, W))
    gate(impl(*inputs), reference(*inputs), f"{impl.name} gated_residual_adaln", DTYPE)

    def step() -> None:
        torch.autograd.grad(impl(*inputs), inputs, grads_out)

    ms = host_ms_per_call(step)
    record(benchmark, op="dispatch gated_residual_adaln fwd+bwd", impl=impl.name, shape=f"B{B}-N{N}-W{W}",
           dtype=DTYPE, ms=ms, extra={"us_per_call": ms * 1e3})
