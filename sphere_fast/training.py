"""Training step pieces of spec section 4."""

from __future__ import annotations

import math

import torch

from sphere_fast import ops


def stratified_radii(batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """[B] radii: B-2 strata r_i = (i + max(u_i, 1e-3)) / (B-2), plus one 1.0 and one 0.0, shuffled."""
    if batch < 3:
        raise ValueError(f"stratified radii need a per-process batch of at least 3, got {batch}")
    m = batch - 2
    u = torch.rand(m, device=device, generator=generator).clamp_min(1e-3)
    r = torch.cat([(torch.arange(m, device=device) + u) / m, torch.tensor([1.0, 0.0], device=device)])
    return r[torch.randperm(batch, device=device, generator=generator)]


def noise_scales(model: torch.nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_big, r_small) per sample, times sigma_max: the hard-case rule and the second stratified draw."""
    sigma = model.sigma_max
    r = stratified_radii(batch, device)
    r_big = r
    if model.mix_hard_cases:
        s = torch.rand(batch, device=device)
        # the same s picks and sizes the hard cases (kept from the official code)
        r_mix = 1 + s * (math.tan(math.radians(model.mix_hard_cases_max_angle)) / sigma - 1)
        r_big = torch.where(s > model.mix_hard_cases_prob, r, r_mix)
    r_small = r * stratified_radii(batch, device) * 0.5
    return r_big * sigma, r_small * sigma


def noisy_latent_pair(model: torch.nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_big, v_small) = f(f(z) + s*e) at the two noise levels, one shared e, one fused op."""
    big, small = noise_scales(model, z.shape[0], z.device)
    return ops.spherify_noise_pair(z, big, small, noise=torch.randn_like(z))
