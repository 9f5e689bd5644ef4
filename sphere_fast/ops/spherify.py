"""Spherify f(z) = z * rsqrt(mean(z^2 over non-batch dims) + eps): one sphere of radius sqrt(L) per sample,
and the noisy re-projection f(f(z) + s*e) used by training and sampling."""

from __future__ import annotations

import torch

from sphere_fast.backend import resolve_backend

EPS = 1e-6
AUTO_ORDER = ("triton", "cpp", "eager")


def spherify_reference(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    dims = tuple(range(1, z.ndim))
    m = z.square().mean(dim=dims, keepdim=True)
    return z * torch.rsqrt(m + eps).to(z.dtype)


def _per_sample(scale: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=z.dtype, device=z.device)
    if s.ndim == 0:
        s = s.expand(z.shape[0])
    return s.reshape(-1, *[1] * (z.ndim - 1))


def spherify_noise_reference(z: torch.Tensor, scale: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    v = spherify_reference(z)
    s = _per_sample(scale, z)
    return torch.where(s == 0, v, spherify_reference(v + s * noise))


def spherify(z: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """f(z) for z of shape [B, ...]."""
    if not isinstance(z, torch.Tensor) or z.ndim < 2:
        raise ValueError(f"z must be a tensor of shape [B, ...] with at least 2 dims, got {getattr(z, 'shape', type(z))}")
    resolve_backend("spherify", z.device, backend, AUTO_ORDER)
    return spherify_reference(z)


def spherify_noise(
    z: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    stream: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """f(f(z) + scale[b] * e); e is ``noise`` if given, else drawn from ``seeds`` and ``stream``."""
    resolve_backend("spherify_noise", z.device, backend, AUTO_ORDER)
    if noise is None:
        from sphere_fast.ops.philox import sphere_noise

        noise = sphere_noise(seeds, z.shape[1:], stream=stream).to(z.dtype)
    return spherify_noise_reference(z, scale, noise)


def spherify_noise_pair(
    z: torch.Tensor,
    scale_big: torch.Tensor | float,
    scale_small: torch.Tensor | float,
    *,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    stream: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(f(z) + scale_big*e), f(f(z) + scale_small*e)) with one shared e (the training step)."""
    resolve_backend("spherify_noise_pair", z.device, backend, AUTO_ORDER)
    if noise is None:
        from sphere_fast.ops.philox import sphere_noise

        noise = sphere_noise(seeds, z.shape[1:], stream=stream).to(z.dtype)
    return spherify_noise_reference(z, scale_big, noise), spherify_noise_reference(z, scale_small, noise)
