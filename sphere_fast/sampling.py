"""Few-step sampling (spec section 6): decode a random point of the sphere, then refine with
encode -> noisy re-projection -> decode. Both CFG branches run as one batch of 2B."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from sphere_fast import ops

CFG_POSITIONS = ("enc", "dec", "combo")


def check_sampling_args(batch_size: int, cfg: float, cfg_position: str, steps: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 1:
        raise ValueError(f"cfg must be a finite number >= 1, got {cfg!r}")
    if cfg_position not in CFG_POSITIONS:
        raise ValueError(f"cfg_position must be one of {CFG_POSITIONS}, got {cfg_position!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"forward_steps must be an int >= 1, got {steps!r}")


def check_seeds(seeds: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.shape != (batch_size,):
        raise TypeError(f"seeds must be an int64 tensor of shape ({batch_size},), got {getattr(seeds, 'dtype', type(seeds).__name__)} {tuple(getattr(seeds, 'shape', ()))}")
    return seeds.to(device)


def sample_labels(model: torch.nn.Module, batch_size: int, y: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Given labels (checked) or uniform random ones; None for an unconditional model."""
    if model.num_classes == 0:
        if y is not None:
            raise ValueError("y (labels) given to an unconditional model (num_classes=0)")
        return None
    if y is None:
        return torch.randint(0, model.num_classes, (batch_size,), device=device)
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != (batch_size,):
        raise TypeError(f"y must be an int64 tensor of shape ({batch_size},), got {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if int(y.min()) < 0 or int(y.max()) >= model.num_classes:
        raise ValueError(f"y labels must be in [0, {model.num_classes - 1}], got range [{int(y.min())}, {int(y.max())}]")
    return y.to(device)


class GuidedNetworks:
    """E and D with classifier-free guidance: the conditional and null branches run as one 2B batch."""

    def __init__(self, model: torch.nn.Module, y: torch.Tensor | None, cfg: float, cfg_position: str):
        use_cfg = cfg > 1 and y is not None
        self.model = model
        self.y = y
        self.enc_cfg = use_cfg and cfg_position in ("enc", "combo")
        self.dec_cfg = use_cfg and cfg_position in ("dec", "combo")
        # combo guides in both places with sqrt(w) each, to avoid double dipping
        self.w = math.sqrt(cfg) if cfg_position == "combo" else cfg
        self.y2 = torch.cat([y, torch.full_like(y, model.num_classes)]) if use_cfg else None

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        if not self.dec_cfg:
            return self.model.decoder(v, self.y)
        cond, uncond = self.model.decoder(torch.cat([v, v]), self.y2).chunk(2)
        return torch.lerp(uncond, cond, self.w).clamp(-1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enc_cfg:
            return self.model.encoder(x, self.y)
        cond, uncond = self.model.encoder(torch.cat([x, x]), self.y2).chunk(2)
        return torch.lerp(uncond, cond, self.w)


def noise_stream(
    model: torch.nn.Module, batch_size: int, device: torch.device, noise: Sequence[torch.Tensor] | None
) -> Iterator[torch.Tensor]:
    """N(0, I) latents [B, N, C]: the recorded draws in order, else torch's global generator (the
    official order: the initial point drawn on the CPU generator, refinements on the device)."""
    shape = (batch_size, *model.latent_shape[1:])
    if noise is not None:
        for i, e in enumerate(noise):
            if not isinstance(e, torch.Tensor) or tuple(e.shape) != shape:
                raise ValueError(f"noise[{i}] must have shape {shape}, got {tuple(getattr(e, 'shape', ()))}")
            yield e.to(device=device, dtype=torch.float32)
        raise ValueError(f"noise holds {len(noise)} draws, fewer than this sampling run needs")
    yield torch.randn(shape).to(device)
    while True:
        yield torch.randn(shape, device=device)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    batch_size: int,
    *,
    y: torch.Tensor | None = None,
    cfg: float = 1.0,
    cfg_position: str = "combo",
    steps: int = 1,
    scheduler: bool = False,
    cache_noise: bool = False,
    device: torch.device | str | None = None,
    noise: Sequence[torch.Tensor] | None = None,
    seeds: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The un-captured sampling loop; returns (first-step image, final image) in [0, 1]."""
    check_sampling_args(batch_size, cfg, cfg_position, steps)
    if noise is not None and seeds is not None:
        raise ValueError("give at most one of noise and seeds")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    y = sample_labels(model, batch_size, y, device)
    nets = GuidedNetworks(model, y, cfg, cfg_position)
    sigma = model.sigma_max
    if seeds is not None:
        seeds = check_seeds(seeds, batch_size, device)
        draws = None
    else:
        draws = noise_stream(model, batch_size, device, noise)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        shape = model.latent_shape[1:]
        e0 = ops.sphere_noise(seeds, shape, stream=0).to(device) if draws is None else next(draws)
        x = nets.decode(model.f(e0))
        first = (x.float() * 0.5 + 0.5).clamp(0, 1)
        cached = None
        for t in range(1, steps):
            z = nets.encode(x)
            r = 1 - t / steps if scheduler else 1.0
            stream = 1 if cache_noise else t
            if draws is None:
                v = ops.spherify_noise(z, r * sigma, seeds=seeds, stream=stream)
            else:
                if cached is None or not cache_noise:
                    cached = next(draws)
                v = ops.spherify_noise(z, r * sigma, noise=cached.to(z.dtype))
            x = nets.decode(v)
    return first, (x.float() * 0.5 + 0.5).clamp(0, 1)
