"""Training-free edits (spec section 7), built on the sampling machinery of sphere_fast.sampling.

Images go in and come out in [0, 1] as [B, 3, H, W] float tensors, so edits compose with the sampler's output.
Noise follows the sphere_fast seed convention (seeds None: fresh ones from torch's generator)."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import SupportsIndex, cast

import torch
import torch.nn as nn

from sphere_fast import ops
from sphere_fast._checks import check_int
from sphere_fast.model import (
    SphereEncoder,
    check_eval_mode,
    check_flags,
    check_model,
    check_noise_scaler,
    labels_checked,
)
from sphere_fast.nn.layers import LabelEmbedder
from sphere_fast.sampling import (
    DrawnNoise,
    GuidedNetworks,
    SeededNoise,
    autocast,
    check_dtype,
    check_sampling_args,
    fresh_seeds,
    refine,
    run_loop,
    sample_labels,
    seeds_on,
    to_unit,
)

# the public API (the rest is the library's own)
__all__ = [
    "CROSSOVER_MASKS", "INTERPOLATIONS", "crossover", "crossover_mask", "interpolate", "manipulate",
    "reconstruct_images",
]

CROSSOVER_MASKS = ("vertical", "horizontal", "upper_triangular", "flipped_triangular")
INTERPOLATIONS = ("lerp", "slerp")


def _device(model: SphereEncoder) -> torch.device:
    return next(model.parameters()).device


def _checked_model(model: object) -> SphereEncoder:
    """A SphereEncoder in eval mode, as every edit needs."""
    checked = check_model(model)
    check_eval_mode(checked)
    return checked


def check_images(model: SphereEncoder, images: object, name: str = "images") -> torch.Tensor:
    """[B, 3, H, W] floating images in [0, 1], checked, as float32 on the model's device."""
    size = _checked_model(model).input_size
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, 3, {size}, {size}], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size) or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B>=1, 3, {size}, {size}], got {tuple(images.shape)}")
    low, high = torch.stack(torch.aminmax(images)).tolist()  # one reduction, one host sync
    if not (0 <= low and high <= 1):  # also refuses NaN
        raise ValueError(f"{name} must hold values in [0, 1], got range [{low}, {high}]")
    return images.to(_device(model), torch.float32)


def model_input(model: SphereEncoder, images: torch.Tensor) -> torch.Tensor:
    """Checked images in [0, 1] -> the model's input range [-1, 1] in its encoder's weight dtype (a model cast
    to bf16 takes bf16 images), rounded once, after the float32 arithmetic."""
    return (images * 2 - 1).to(next(model.encoder.parameters()).dtype)


def _seeds(seeds: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    return fresh_seeds(batch, device) if seeds is None else seeds_on(seeds, batch, device)


def _class_labels(
    model: SphereEncoder, batch: int, labels: SupportsIndex | torch.Tensor, device: torch.device, name: str
) -> torch.Tensor | None:
    """[B] labels, or one class for every image given as an int (numpy's too), checked as sample_labels does."""
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = torch.full((batch,), int(labels), dtype=torch.long)
    return sample_labels(model, batch, labels, device, name=name)


@torch.no_grad()
def reconstruct_images(
    model: SphereEncoder, images: torch.Tensor, labels: SupportsIndex | torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x -> E(x, y) -> f -> D(., y), no noise; y is the null class unless ``labels`` ([B], or an int for every
    image) are given."""
    x = model_input(model, check_images(model, images))
    check_dtype(dtype, model)
    y = None
    if labels is not None:
        y = _class_labels(model, x.shape[0], labels, x.device, "labels")
    # labels range-checked once above, not in each network call (a device sync each)
    with autocast(x.device, dtype), labels_checked():
        return model.reconstruct(x, y).float()


@torch.no_grad()
def manipulate(
    model: SphereEncoder,
    images: torch.Tensor,
    target: SupportsIndex | torch.Tensor | None,
    *,
    steps: int = 4,
    noise_scaler: float = 0.25,
    seeds: torch.Tensor | None = None,
    scheduler: bool = False,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Conditional manipulation: ``images`` take the place of the first decoded image, then ``steps`` steps of
    z = E(x, c); v = f(f(z) + s*r*sigma*e); x = D(v, c) with target class c (an int, [B] labels, or None for
    the null class), noise scaler s, one cached noise draw per sample, no CFG. Returns each step's images."""
    x = model_input(model, check_images(model, images))
    batch, device = x.shape[0], x.device
    check_int("steps", steps)
    check_noise_scaler(noise_scaler)
    check_dtype(dtype, model)
    check_flags(scheduler=scheduler)
    if model.num_classes == 0 and target is not None:
        raise ValueError("target given to an unconditional model (num_classes=0)")
    y = None
    if model.num_classes > 0:
        y = _class_labels(model, batch, model.num_classes if target is None else target, device, "target")
    nets = GuidedNetworks(model, y, None)
    noise = SeededNoise(_seeds(seeds, batch, device), model.latent_shape[1:])
    with autocast(device, dtype), labels_checked():
        # the input image is step 0 of a (steps + 1)-step loop
        run = refine(model, nets, x, noise, steps + 1, scheduler=scheduler, cache_noise=True, noise_scaler=noise_scaler)
        return [to_unit(step) for step in run]


def crossover_mask(kind: str, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[size, size] bool, True where the first image shows: the left half (vertical cut), the top half
    (horizontal cut), on and above the diagonal (upper_triangular) or on and above the anti-diagonal
    (flipped_triangular, the upper-triangular mask mirrored left-right)."""
    if not isinstance(kind, str):  # a tensor's repr would print every element
        raise TypeError(f"mask must be one of the names {CROSSOVER_MASKS}, got a {type(kind).__name__}")
    if kind not in CROSSOVER_MASKS:
        raise ValueError(f"mask must be one of {CROSSOVER_MASKS}, got {kind!r}")
    i = torch.arange(size, device=device)[:, None]
    j = torch.arange(size, device=device)[None, :]
    masks = {
        "vertical": (j < size // 2).expand(size, size),
        "horizontal": (i < size // 2).expand(size, size),
        "upper_triangular": j >= i,
        "flipped_triangular": i + j <= size - 1,
    }
    return masks[kind]


@torch.no_grad()
def crossover(
    model: SphereEncoder,
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    mask: str = "vertical",
    *,
    swap: bool = False,
    steps: int = 1,
    noise_scaler: float = 0.25,
    seeds: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stitch two images (a where the mask holds, b elsewhere; ``swap`` exchanges them) and loop the composite
    through E/D with the null class and ``noise_scaler``. Returns (composite, each step's images)."""
    a = check_images(model, images_a, "images_a")
    b = check_images(model, images_b, "images_b")
    if a.shape != b.shape:
        raise ValueError(f"images_a and images_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    check_flags(swap=swap)
    if swap:
        a, b = b, a
    composite = torch.where(crossover_mask(mask, model.input_size, a.device), a, b)
    steps_out = manipulate(model, composite, None, steps=steps, noise_scaler=noise_scaler, seeds=seeds, dtype=dtype)
    return composite, steps_out


def slerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of each vector over the last dim (lerp where a and b are nearly parallel). The
    vectors keep their norms: the official code's slerp scales each token to unit length first, so its points,
    the corners too, are not the draws ``generate`` makes."""
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    omega = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    # weights divided first, so that w = 0 and w = 1 give a and b exactly
    out = (torch.sin((1 - w) * omega) / sin) * a + (torch.sin(w * omega) / sin) * b
    return torch.where(sin > eps, out, torch.lerp(a, b, w))


def bilinear(corners: torch.Tensor, rows: int, cols: int, method: str = "lerp") -> torch.Tensor:
    """[4, ...] corners (top-left, top-right, bottom-left, bottom-right) -> [rows * cols, ...] grid points,
    row-major; interpolated along each row, then between the rows. Corners come out exactly."""
    if method not in INTERPOLATIONS:
        raise ValueError(f"method must be one of {INTERPOLATIONS}, got {method!r}")
    mix = slerp if method == "slerp" else torch.lerp
    x = corners.float()
    extra = [1] * (x.ndim - 1)
    u = torch.linspace(0, 1, cols, device=x.device).reshape(cols, *extra)
    v = torch.linspace(0, 1, rows, device=x.device).reshape(rows, 1, *extra)
    top, bottom = mix(x[0], x[1], u), mix(x[2], x[3], u)  # [cols, ...]
    return mix(top, bottom, v).reshape(rows * cols, *x.shape[1:])


def bilinear_noise(draws: torch.Tensor, rows: int, cols: int, method: str) -> torch.Tensor:
    """The corners' N(0, I) ``draws`` [4, ...] over the grid, each point N(0, I) too: a lerp of independent
    draws shrinks them (to half their norm at the grid's centre, and the refinement noise level with them), so
    lerp's points are divided by the mix's standard deviation sqrt(((1-u)^2 + u^2) ((1-v)^2 + v^2)); slerp
    keeps the norm as it is. The corners come out exactly."""
    grid = bilinear(draws, rows, cols, method)
    if method == "slerp":
        return grid
    u = torch.linspace(0, 1, cols, device=grid.device)
    v = torch.linspace(0, 1, rows, device=grid.device)
    std = (((1 - v) ** 2 + v**2)[:, None] * ((1 - u) ** 2 + u**2)).sqrt()
    return grid / std.reshape(rows * cols, *[1] * (grid.ndim - 1))


class _GivenEmbedding(nn.Module):
    """Stands in for a ViT's LabelEmbedder: sample b gets ``embeddings[b]`` and the null label keeps its own
    row, so CFG's null branch (labels [B:2B]) is unchanged."""

    def __init__(self, embedder: nn.Module, embeddings: torch.Tensor):
        super().__init__()
        self.embedder = embedder
        self.embeddings = embeddings

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        given = self.embeddings.repeat(labels.shape[0] // self.embeddings.shape[0], 1, 1)
        null = (labels == self.embedder.num_classes)[:, None, None]
        return torch.where(null, self.embedder(labels), given)


@contextlib.contextmanager
def given_class_embeddings(model: SphereEncoder, corner_labels: torch.Tensor, rows: int, cols: int) -> Iterator[None]:
    """Inside the block, sample p of the encoder and the decoder is conditioned on the bilinear (linear)
    interpolation of the corner labels' class embeddings at grid point p (pass any valid labels)."""
    vits = (model.encoder, model.decoder)
    originals = [cast(LabelEmbedder, vit.y_embedder) for vit in vits]  # a conditional model's: labels are given
    try:
        for vit, embedder in zip(vits, originals):
            table = embedder.embedding_table.weight
            grid = bilinear(table[corner_labels], rows, cols).to(table.dtype)
            vit.y_embedder = _GivenEmbedding(embedder, grid.unsqueeze(1))  # type: ignore[assignment]  # a stand-in
        yield
    finally:
        for vit, embedder in zip(vits, originals):
            vit.y_embedder = embedder


@torch.no_grad()
def interpolate(
    model: SphereEncoder,
    seeds: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    rows: int = 5,
    cols: int = 5,
    method: str = "slerp",
    steps: int = 1,
    cfg: float = 1.0,
    cfg_position: str = "combo",
    cache_noise: bool = True,
    scheduler: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample a rows x cols grid between four corners, given as ``seeds`` [4] (top-left, top-right,
    bottom-left, bottom-right) and their ``labels`` [4] (if None, drawn from the seeds as ``generate`` draws
    them). Every noise draw of the loop (the initial point and the refinement noise) is the bilinear
    interpolation of the corners' draws (``lerp``, scaled to keep the draws' variance, or ``slerp`` per token
    over the channel dim, which keeps their norms: ``bilinear_noise``); the class embeddings are interpolated
    linearly. Each point then goes through sampling, so a corner's image is the one ``generate`` makes from its seed and
    label with the same options (note the defaults: cached noise here, fresh draws in ``generate``); a single
    row (column) runs between the top (left) corners only. Returns [rows, cols, 3, H, W] in [0, 1]."""
    device = _device(_checked_model(model))
    check_int("rows", rows)
    check_int("cols", cols)
    points = rows * cols
    check_sampling_args(model, points, cfg, cfg_position, steps, steps_name="steps")
    check_dtype(dtype, model)
    check_flags(cache_noise=cache_noise, scheduler=scheduler)
    seeds = seeds_on(seeds, 4, device)
    corner_labels = sample_labels(model, 4, labels, device, name="labels", seeds=seeds)
    shape = model.latent_shape[1:]
    noise = DrawnNoise(
        lambda stream: bilinear_noise(ops.sphere_noise(seeds, shape, stream=stream), rows, cols, method)
    )
    placeholder = None if corner_labels is None else torch.zeros(points, dtype=torch.long, device=device)
    nets = GuidedNetworks.from_scale(model, placeholder, cfg, cfg_position)
    embeddings = contextlib.nullcontext()
    if corner_labels is not None:
        embeddings = given_class_embeddings(model, corner_labels, rows, cols)
    with embeddings, autocast(device, dtype):
        _, final = run_loop(model, nets, noise, steps, scheduler=scheduler, cache_noise=cache_noise)
    return final.reshape(rows, cols, *final.shape[1:])
