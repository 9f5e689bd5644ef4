"""Shared by the fused-op tests (test_adaln.py, test_swiglu.py, ...): the fused backends to parametrize over, the
tolerance rule they apply (see their module docstrings), and the same-images check of the GPU sampling tests."""

from __future__ import annotations

import pytest
import torch

from sphere_fast.backend import available_backends

FUSED = [pytest.param(b, marks=pytest.mark.skipif(b not in available_backends("cpu"), reason=f"{b} unavailable"))
         for b in ("triton", "cpp")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.float()
    atol = tol * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_images(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """bf16 rounding in other places, never other images: small mean and bounded largest difference."""
    diff = (a.float() - b.float()).abs()
    assert diff.mean() < 2e-3 and diff.max() < 5e-2, f"{what}: mean {diff.mean():.2e}, max {diff.max():.2e}"
