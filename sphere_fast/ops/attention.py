"""Non-causal attention with 2-D axial RoPE applied to q and k (official layout: cos | sin, interleaved pairs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sphere_fast.backend import resolve_backend

AUTO_ORDER = ("triton", "eager")


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on interleaved pairs of the last dim."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope_reference(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D], rope [N, 2D] = cos | sin."""
    cos, sin = rope.chunk(2, dim=-1)
    return x * cos + rotate_pairs(x) * sin


def attention_reference(q, k, v, rope=None):
    if rope is not None:
        q = apply_rope_reference(q, rope).to(v.dtype)
        k = apply_rope_reference(k, rope).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def attention(q, k, v, rope=None, *, backend: str | None = None):
    """softmax(q k^T / sqrt(D)) v on [B, H, N, D], with q and k rotated by ``rope`` first."""
    resolve_backend("attention", q.device, backend, AUTO_ORDER)
    return attention_reference(q, k, v, rope)
