"""Shared by the fused-op tests (test_adaln.py, test_swiglu.py, ...): the fused backends to parametrize over, the
tolerance rule they apply (see their module docstrings), inputs off a 16-byte boundary or with other strides, a
spy on the ops' kernel launches, the check of a single rounding to nearest (and the AdaLN reference it takes), the
same-images check of the GPU sampling tests, and a stand-in timer for the launch-config tuning on CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from sphere_fast.backend import available_backends
from sphere_fast.ops import _tuning
from sphere_fast.ops.adaln import adaln_modulate_reference

FUSED = [pytest.param(b, marks=pytest.mark.skipif(b not in available_backends("cpu"), reason=f"{b} unavailable"))
         for b in ("triton", "cpp")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.float()
    atol = tol * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def off_16_byte_boundaries(t: torch.Tensor) -> torch.Tensor:
    """t's values (differentiably) in memory that starts one element past a 16-byte boundary."""
    memory = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return memory[1:].view(t.shape).copy_(t)


@dataclass(frozen=True)
class Launch:
    kernel: str
    compile_only: bool
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def record_launches(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Launch]:
    """Spies on ``module.kernel_runner`` (how every op starts a Triton kernel): the launches and precompiles of
    the module's ops, in order, with their arguments; the kernels still run."""
    launches: list[Launch] = []
    runner = module.kernel_runner

    def recording_runner(kernel, grid, compile_only=False):
        run = runner(kernel, grid, compile_only)

        def recorded(*args, **kwargs):
            launches.append(Launch(kernel.__name__, compile_only, args, kwargs))
            return run(*args, **kwargs)

        return recorded

    monkeypatch.setattr(module, "kernel_runner", recording_runner)
    return launches


def swapped_in_memory(t: torch.Tensor, dim0: int, dim1: int) -> torch.Tensor:
    """t's values (differentiably) in memory laid out with dims ``dim0`` and ``dim1`` swapped: the same tensor
    with other strides."""
    return t.transpose(dim0, dim1).contiguous().transpose(dim0, dim1)


def assert_rounded_to_nearest(
    actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, atol: float = 0.0, what: str = ""
) -> None:
    """``actual`` (in ``dtype``) is ``exact`` rounded once, to nearest: within half an ulp of each exact value (plus
    0.1% of that for float32 sums that contract or reorder, and ``atol``); a truncation is off by a whole ulp."""
    binade = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(torch.finfo(dtype).tiny))))
    bound = torch.finfo(dtype).eps / 2 * binade * (1 + 1e-3) + atol
    excess = (actual.to(exact.dtype) - exact).abs() / bound
    past = int((excess > 1).sum())
    assert not past, f"{what}: {past} of {excess.numel()} elements past the bound (the worst {excess.max():.3g}x it)"


def stored_residual_reference(dtype: torch.dtype):
    """gated_residual_adaln_reference for float32 inputs that normalises the residual rounded to ``dtype``, as the
    fused kernels normalise the residual they store (the rounding's gradient passed straight through): the exact
    values a single rounding of each output and gradient is checked against."""

    def reference(x, branch, gate, weight, shift, scale):
        res = x + branch if gate is None else x + gate * branch
        rounded = res + (res.to(dtype).float() - res).detach()
        return res, adaln_modulate_reference(rounded, weight, shift, scale)

    return reference


def assert_gradient_penalty_eager_only(backend: str, loss: torch.Tensor, leaf: torch.Tensor) -> None:
    """A gradient penalty (a loss on ``leaf``'s gradient of ``loss``, taken with create_graph=True): eager
    differentiates it; the fused backward kernels have no gradient of their own, so the fused backends raise
    rather than silently leave out their second-order terms."""

    def penalty_backward() -> None:
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        grad.square().sum().backward()

    if backend != "eager":
        with pytest.raises(RuntimeError, match="no second-order gradient"):
            penalty_backward()
        return
    penalty_backward()
    assert leaf.grad.abs().max() > 0


def assert_same_images(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """bf16 rounding in other places, never other images: small mean and bounded largest difference."""
    diff = (a.float() - b.float()).abs()
    assert diff.mean() < 2e-3 and diff.max() < 5e-2, f"{what}: mean {diff.mean():.2e}, max {diff.max():.2e}"


def last_is_fastest(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """On CPU: a stand-in for the tuning's time_launch_ms that runs the launch and reports each one faster than
    the last; the returned list grows by one per timed launch."""
    timed: list[int] = []

    def timer(launch) -> float:
        launch()
        timed.append(1)
        return 1.0 / len(timed)

    monkeypatch.setattr(_tuning, "time_launch_ms", timer)
    return timed
