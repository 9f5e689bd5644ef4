"""SwiGLU activation: silu(a) * b for h = cat(a, b) on the last dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sphere_fast.backend import resolve_backend

AUTO_ORDER = ("triton", "cpp", "eager")


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


def swiglu(h: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    resolve_backend("swiglu", h.device, backend, AUTO_ORDER)
    return swiglu_reference(h)
