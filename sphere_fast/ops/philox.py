"""Pure-torch Philox4x32-10 normal draws, bit-identical to Triton's ``tl.randn(seed, offset)``.

Noise element j of sample b in stream k is ``tl.randn(seeds[b], k * L + j)`` (design.md)."""

from __future__ import annotations

import torch


def philox_randn(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """tl.randn(seed, offset) elementwise: seed and offset int64 tensors broadcast together."""
    raise NotImplementedError


def sphere_noise(seeds: torch.Tensor, shape, stream: int = 0) -> torch.Tensor:
    """[B, *shape] float32 noise of the sphere_fast convention for per-sample ``seeds`` [B] (int64)."""
    raise NotImplementedError
