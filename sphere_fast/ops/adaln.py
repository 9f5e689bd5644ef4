"""AdaLN ops: RMSNorm -> (1 + scale) -> + shift, and the gated residual that precedes it."""

from __future__ import annotations

import torch

from sphere_fast.backend import resolve_backend

AUTO_ORDER = ("triton", "cpp", "eager")


def adaln_modulate_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if scale is not None:
        y = y * (1 + scale.float())
    if shift is not None:
        y = y + shift.float()
    return y.to(x.dtype)


def gated_residual_adaln_reference(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    res = x + branch if gate is None else x + gate * branch
    return res, adaln_modulate_reference(res, weight, shift, scale, eps)


def adaln_modulate(x, weight=None, shift=None, scale=None, eps: float = 1e-6, *, backend: str | None = None):
    resolve_backend("adaln_modulate", x.device, backend, AUTO_ORDER)
    return adaln_modulate_reference(x, weight, shift, scale, eps)


def gated_residual_adaln(x, branch, gate, weight, shift, scale, eps: float = 1e-6, *, backend: str | None = None):
    resolve_backend("gated_residual_adaln", x.device, backend, AUTO_ORDER)
    return gated_residual_adaln_reference(x, branch, gate, weight, shift, scale, eps)
