"""Training with the paper's recipe (spec section 4): the loss of one step, the optimiser schedule, EMA,
DistributedDataParallel under torchrun, and the training loop with checkpoints."""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import functools
import gc
import inspect
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import sphere_fast
from sphere_fast import ops
from sphere_fast._checkout import checkout_commit
from sphere_fast._checks import check_int
from sphere_fast._files import os_lock
from sphere_fast._random import SEED_DERIVATION, derive_seed, generator_kwargs
from sphere_fast._warn import warn
from sphere_fast.backend import active_backend
from sphere_fast.data import check_start_method, pixels_to_images
from sphere_fast.model import SphereEncoder, check_label_range, labels_checked
from sphere_fast.perceptual import LPIPS, ConvNeXt, load_state_dict_file
from sphere_fast.sampling import to_device_unsynced

logger = logging.getLogger("sphere_fast")

# the public API (the rest is the library's own)
__all__ = [
    "LOSS_PRESETS", "LossWeights", "RunConfig", "StepLog", "TrainConfig", "Trainer", "fit", "learning_rate",
    "loss_weights", "stratified_radii",
]

# ---- noise levels --------------------------------------------------------------------------------


# the stratified radii's smallest process batch: one r = 0, one r = 1 and at least one stratum
MIN_PROCESS_BATCH = 3
# The Philox stream of the training noise (ops/philox.py's convention): the sampler draws streams 0 (initial
# point), 1 (cached refinement) and t (step t), so training seeds that equal sampling ones still draw other noise.
TRAINING_STREAM = 2**31


def stratified_radii(batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """[B] radii: B-2 strata r_i = (i + max(u_i, 1e-3)) / (B-2), plus one 1.0 and one 0.0, shuffled."""
    if batch < MIN_PROCESS_BATCH:
        raise ValueError(f"stratified radii need a per-process batch of at least {MIN_PROCESS_BATCH}, got {batch}")
    m = batch - 2
    u = torch.rand(m, device=device, **generator_kwargs(generator)).clamp_min(1e-3)
    one_and_zero = torch.arange(1.0, -1.0, -1.0, device=device)  # made there: host data would be a blocking copy
    r = torch.cat([(torch.arange(m, device=device) + u) / m, one_and_zero])
    return r[torch.randperm(batch, device=device, **generator_kwargs(generator))]


def noise_scales(
    model: SphereEncoder, batch: int, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_big, r_small) per sample, times sigma_max: the hard-case rule and the second stratified draw."""
    sigma = model.sigma_max
    r = stratified_radii(batch, device, generator)
    r_big = r
    if model.mix_hard_cases:
        s = torch.rand(batch, device=device, **generator_kwargs(generator))
        # the same s picks and sizes the hard cases (kept from the official code)
        r_mix = 1 + s * (math.tan(math.radians(model.mix_hard_cases_max_angle)) / sigma - 1)
        r_big = torch.where(s > model.mix_hard_cases_prob, r, r_mix)
    r_small = r * stratified_radii(batch, device, generator) * 0.5
    return r_big * sigma, r_small * sigma


def noisy_latent_pair(model: SphereEncoder, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_big, v_small) = f(f(z) + s*e) at the two noise levels, one shared e, one fused op."""
    big, small = noise_scales(model, z.shape[0], z.device)
    return ops.spherify_noise_pair(z, big, small, noise=torch.randn_like(z))


# ---- losses ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    """(w_rd, w_rp, w_cd, w_cp, w_lat): pixel reconstruction distance / perceptual, pixel consistency
    distance / perceptual, latent consistency."""

    recon_dist: float
    recon_perc: float
    con_dist: float
    con_perc: float
    latent: float


LOSS_PRESETS: dict[str, LossWeights] = {
    "cifar10": LossWeights(1.0, 1.0, 0.5, 0.5, 0.1),
    "af-of": LossWeights(25.0, 1.0, 1.0, 1.0, 0.1),  # Animal-Faces and Oxford-Flowers
    "imagenet": LossWeights(50.0, 1.0, 25.0, 1.0, 0.1),
}


def loss_weights(spec: str | Mapping[str, float] | LossWeights) -> LossWeights:
    """A preset name (``LOSS_PRESETS``), a dict with the five ``LossWeights`` fields, or LossWeights."""
    if isinstance(spec, LossWeights):
        return spec
    if isinstance(spec, str):
        if spec not in LOSS_PRESETS:
            raise ValueError(f"loss weights preset must be one of {sorted(LOSS_PRESETS)} or a dict, got {spec!r}")
        return LOSS_PRESETS[spec]
    names = [f.name for f in dataclasses.fields(LossWeights)]
    if not isinstance(spec, Mapping) or set(spec) != set(names):
        raise ValueError(f"custom loss weights need exactly the keys {names}, got {spec!r}")
    values = {k: float(v) for k, v in spec.items()}
    if not all(math.isfinite(v) and v >= 0 for v in values.values()):
        raise ValueError(f"loss weights must be finite and >= 0, got {values}")
    return LossWeights(**values)


def smooth_l1_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean Huber distance (beta 1) between images in [0, 1] (equals 0.5*MSE there)."""
    return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).flatten(1).mean(1)


def latent_cosine_per_sample(u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[B] 1 - cosine similarity of the flattened latents (eps 1e-6)."""
    return 1 - F.cosine_similarity(u.flatten(1), z.flatten(1), dim=1, eps=1e-6)


class PerceptualLoss(nn.Module):
    """perc = (LPIPS-VGG16 + 0.1 * MSE of ConvNeXt-Small ImageNet logits at 224 px) / 1.1, frozen, eval mode.

    The networks are sphere_fast's own (``sphere_fast.perceptual``); their pretrained weights come from local
    files (no network access is assumed): ``torch.load``-able state_dicts of torchvision's ``vgg16`` (its
    ``features``; ``classifier.*`` keys are ignored) and ``convnext_small``, and the ``lpips`` package's
    v0.1 ``vgg.pth`` linear layers. Load them with ``from_files``. ``lpips_vgg(in0, in1)`` gives [B]
    distances between images in [-1, 1], ``convnext`` ImageNet logits of normalised 224 px images."""

    def __init__(self, lpips_vgg: nn.Module, convnext: nn.Module):
        super().__init__()
        self.lpips_vgg = lpips_vgg.eval().requires_grad_(False)
        self.convnext = convnext.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stays in eval mode: the networks are frozen."""
        return super().train(False)

    @classmethod
    def from_files(
        cls,
        paths: Mapping[str, str | os.PathLike] | None = None,
        *,
        vgg16: str | os.PathLike | None = None,
        lpips: str | os.PathLike | None = None,
        convnext_small: str | os.PathLike | None = None,
    ) -> PerceptualLoss:
        """Build both networks and load their weight files strictly: ``paths`` maps the names ``vgg16``,
        ``lpips``, ``convnext_small`` to files, or give them as keywords (which take precedence)."""
        given = {"vgg16": vgg16, "lpips": lpips, "convnext_small": convnext_small}
        paths = {**(paths or {}), **{k: v for k, v in given.items() if v is not None}}
        need = tuple(given)
        missing = [k for k in need if not paths.get(k)]
        if missing:
            raise ValueError(
                f"the perceptual loss needs local weight files for {need}; missing {missing}. Give their paths "
                "(TrainConfig(perceptual_weights={'vgg16': ..., 'lpips': ..., 'convnext_small': ...}); the CLI's "
                "--perceptual-weights vgg16=vgg16.pth lpips=vgg.pth convnext_small=convnext_small.pth) or set the "
                "perceptual loss weights recon_perc and con_perc to 0 (loss_weights as a dict)"
            )
        absent = [f"{k}={paths[k]}" for k in need if not Path(paths[k]).is_file()]
        if absent:
            raise FileNotFoundError(f"perceptual loss weight files not found: {absent}")
        lpips_vgg = LPIPS()
        load_state_dict_file(lpips_vgg.net, paths["vgg16"], "torchvision vgg16", ("classifier.",))
        load_state_dict_file(lpips_vgg.lin, paths["lpips"], "lpips v0.1 vgg.pth")
        convnext = ConvNeXt()
        load_state_dict_file(convnext, paths["convnext_small"], "torchvision convnext_small")
        return cls(lpips_vgg, convnext)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B] perceptual distance between images in [0, 1]."""
        lp = self.lpips_vgg(pred * 2 - 1, target * 2 - 1)  # LPIPS takes [-1, 1]
        both = torch.cat([pred, target])
        img = F.interpolate(both, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        logits = self.convnext((img - self.mean) / self.std)  # one pass over both images
        b = pred.shape[0]
        return (lp + 0.1 * (logits[:b] - logits[b:]).square().mean(1)) / 1.1


def check_weights_match_flags(model: SphereEncoder, weights: LossWeights) -> None:
    """The model's consistency flags decide which terms the loss computes, the weights what each counts. The
    official recipe derives each flag from its weights; a mismatch here would silently train another objective:
    a weighted term never computed, or (pixel consistency on with its weights 0) the reconstruction taken from
    the small noise alone."""
    for flag, on, names in (
        ("use_pixel_consistency", model.use_pix_con, ("con_dist", "con_perc")),
        ("use_latent_consistency", model.use_lat_con, ("latent",)),
    ):
        weighted = {n: getattr(weights, n) for n in names}
        if on != any(weighted.values()):
            raise ValueError(
                f"the model has {flag}={on} but the loss weights give {weighted}: the flag must be on exactly "
                f"when one of these weights is > 0 (as in the official recipe); build the model with "
                f"{flag}={not on} or change the weights"
            )


class SphereLoss(nn.Module):
    """One training step's loss (spec section 4), as a module so DistributedDataParallel can wrap it."""

    def __init__(self, model: SphereEncoder, weights: LossWeights, perceptual: PerceptualLoss | None = None):
        super().__init__()
        if perceptual is None and (weights.recon_perc or weights.con_perc):
            raise ValueError(
                f"loss weights {weights} use the perceptual loss but no perceptual network was given; load it "
                "with PerceptualLoss.from_files or set recon_perc and con_perc to 0"
            )
        check_weights_match_flags(model, weights)
        self.model = model
        self.weights = weights
        # a plain attribute: frozen, so DDP has nothing to broadcast or reduce for it
        self.__dict__["perceptual"] = perceptual

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        scale_big: torch.Tensor,
        scale_small: torch.Tensor,
        noise: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, per-term batch means detached). ``noise`` [B, N, C] or ``seeds`` [B] give e."""
        m, w, b = self.model, self.weights, x.shape[0]
        z = m.encoder(x, y)
        z_clean = z.detach()
        v_big, v_small = ops.spherify_noise_pair(z, scale_big, scale_small, noise=noise, seeds=seeds,
                                                 stream=TRAINING_STREAM)
        if m.use_pix_con:
            out = m.decoder(torch.cat([v_big, v_small]), None if y is None else torch.cat([y, y]))
            x_big, x_small = out[:b], out[b:]
        else:  # the official single-output variant: the big-noise image is the reconstruction
            x_big = x_small = m.decoder(v_big, y)
        # losses in fp32 on [0, 1] images
        target, small, big = (t.float() * 0.5 + 0.5 for t in (x, x_small, x_big))
        terms = {"recon": smooth_l1_per_sample(small, target)}
        total = w.recon_dist * terms["recon"].mean()
        if m.use_pix_con:
            terms["pix_con"] = smooth_l1_per_sample(big, small.detach())
            total = total + w.con_dist * terms["pix_con"].mean()
        if self.perceptual is not None:
            # the perceptual networks too run in fp32: under bf16 autocast their feature differences would be
            # rounded to bf16
            with torch.autocast(x.device.type, enabled=False):
                terms["recon_perc"] = self.perceptual(small, target)
                total = total + w.recon_perc * terms["recon_perc"].mean()
                if m.use_pix_con:
                    terms["pix_con_perc"] = self.perceptual(big, small.detach())
                    total = total + w.con_perc * terms["pix_con_perc"].mean()
        if m.use_lat_con:
            u_big = m.encoder(x_big, y)  # not detached: the gradient reaches D and E
            terms["lat_con"] = latent_cosine_per_sample(u_big.float(), z_clean.float())
            total = total + w.latent * terms["lat_con"].mean()
        return total, {k: v.detach().mean() for k, v in terms.items()}


# ---- optimiser, schedule, EMA -------------------------------------------------------------------


def micro_batches(batch: int, steps: int) -> list[slice]:
    """The rows of each of the ``steps`` equal micro-batches of a process batch of ``batch``."""
    if batch % steps:
        raise ValueError(
            f"the process batch of {batch} does not split into accumulation_steps={steps} equal micro-batches"
        )
    size = batch // steps
    return [slice(k * size, (k + 1) * size) for k in range(steps)]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_counts(config: object, names: tuple[str, ...]) -> None:
    """Refuse the fields ``names`` of ``config`` that are not ints >= 1."""
    for name in names:
        check_int(name, getattr(config, name))


@dataclass
class TrainConfig:
    """The recipe's knobs. Learning rates are per 256 images of global batch (scaled linearly)."""

    global_batch: int = 256
    total_steps: int = 1000
    warmup_steps: int = 100
    base_lr: float = 1e-4
    min_lr: float = 1e-6
    encoder_lr_scale: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9997
    loss_weights: str | Mapping[str, float] | LossWeights = "cifar10"
    perceptual_weights: dict[str, str] | None = None
    autocast: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU; "bf16"; "off"
    seed: int = 0
    # each process's batch runs as this many equal micro-batches, their gradients summed before the update
    accumulation_steps: int = 1
    # recompute each transformer block's activations in the backward instead of keeping them
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_counts(self, ("global_batch", "total_steps", "accumulation_steps"))
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0, 2**64)  # torch.manual_seed's range (it seeds the initial weights)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps must be <= total_steps ({self.total_steps}), got {self.warmup_steps}")
        for name in ("base_lr", "min_lr", "encoder_lr_scale", "weight_decay", "ema_decay", "grad_clip"):
            if not _is_number(getattr(self, name)):
                raise TypeError(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in ("base_lr", "min_lr", "encoder_lr_scale", "weight_decay", "ema_decay"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        # a limit of 0 would scale every gradient to 0: no update at all
        if not self.grad_clip > 0:
            raise ValueError(
                f"grad_clip must be > 0 (the largest gradient norm kept; float('inf') turns clipping off), "
                f"got {self.grad_clip!r}"
            )
        if not self.ema_decay < 1:
            raise ValueError(f"ema_decay must be < 1, got {self.ema_decay}")
        if self.min_lr > self.base_lr:  # the cosine would rise after the warmup
            raise ValueError(f"min_lr ({self.min_lr}) must be <= base_lr ({self.base_lr})")
        if not isinstance(self.betas, (tuple, list)) or not all(_is_number(b) for b in self.betas):
            raise TypeError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise TypeError(f"activation_checkpointing must be a bool, got {self.activation_checkpointing!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        weights = loss_weights(self.loss_weights)
        if self.perceptual_weights and not (weights.recon_perc or weights.con_perc):
            raise ValueError(
                f"perceptual_weights are given but the loss weights {weights} put 0 on both perceptual terms "
                "(recon_perc, con_perc), so they would not be used; choose loss weights with a perceptual term "
                "(e.g. the 'cifar10' preset: --loss-weights cifar10) or leave out the perceptual weights"
            )


def learning_rate(step: int, config: TrainConfig) -> float:
    """Decoder lr at ``step``: linear warmup to base_lr*B/256, then cosine down to min_lr*B/256."""
    scale = config.global_batch / 256
    peak, floor = config.base_lr * scale, config.min_lr * scale
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); a plain run is rank 0 of 1. A group joined
    here is left when the process exits (leave_distributed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(leave_distributed)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def leave_distributed() -> None:
    """Destroy the process group, after a garbage collection has freed what still holds it (a DDP engine in a
    reference cycle). A process that exits with a gloo group alive can abort in the interpreter's teardown
    ("terminate called without an active exception", SIGABRT); a no-op without a group."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def check_process_group(info: DistInfo) -> None:
    """A Trainer of more than one process needs the process group ``info`` describes: without one, DDP would fail
    only after the model was moved and put in train mode."""
    if info.world_size == 1:
        return
    if not dist.is_initialized():
        raise RuntimeError(f"dist_info has world_size={info.world_size} but no process group is initialised: call "
                           "sphere_fast.training.init_distributed() (under torchrun) or "
                           "torch.distributed.init_process_group() first")
    joined = DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
    if joined != info:
        raise ValueError(f"dist_info {info} does not match the process group (rank {joined.rank} of "
                         f"{joined.world_size}); init_distributed() returns the matching one")


def no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's option to skip the buffer broadcast before each forward: ``forward_sync_buffers`` where torch has it
    (2.13 deprecates ``broadcast_buffers`` for it), else ``broadcast_buffers``."""
    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False}


def process_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of process ``rank``'s RNG (noise levels and seeds, flips, label dropout; its data workers' too) in a
    run that starts at ``step``: 0 for a fresh run, the checkpoint's step for one resumed on another number of
    processes (whose saved RNG states do not map onto the new ranks). Unrelated to every other (seed, rank, step)'s
    and to ``seed`` itself, which seeds the initial weights."""
    return derive_seed(seed, "process", rank, step)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a process that saw more GPUs than this one (another node layout) saved states this one has no device for
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


@dataclass
class StepLog:
    """A training step's logged values on their way to the host. On a GPU they are copied into pinned memory
    behind the step's kernels, so the host need not wait: ``read()`` waits for that step only."""

    names: tuple[str, ...]
    values: torch.Tensor  # on the host
    lr: float
    copied: torch.cuda.Event | None  # None when ``values`` are ready (CPU)

    @classmethod
    def start_copy(cls, names: tuple[str, ...], values: torch.Tensor, lr: float) -> StepLog:
        if values.device.type != "cuda":
            return cls(names, values, lr, None)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(names, host, lr, copied)

    def read(self) -> dict[str, float]:
        if self.copied is not None:
            self.copied.synchronize()
        return {**dict(zip(self.names, self.values.tolist())), "lr": self.lr}


# images rounded to bf16 or resized with antialiasing may pass the range by a little
IMAGE_RANGE_SLACK = 1e-2


def check_image_range(x: torch.Tensor) -> None:
    """Refuse images outside [-1, 1] (another convention, [0, 255] say, would train another objective), and warn
    of a batch with no value below 0: images in [0, 1] pass the range but train towards other images."""
    low, high = x.aminmax() if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    if not (-1 - IMAGE_RANGE_SLACK <= float(low) and float(high) <= 1 + IMAGE_RANGE_SLACK):
        raise ValueError(f"x must hold images in [-1, 1] (the datasets' range), got values in "
                         f"[{float(low):.4g}, {float(high):.4g}]")
    if x.numel() and float(low) >= 0:
        warn(f"x holds no value below 0 (values in [{float(low):.4g}, {float(high):.4g}]): images in [0, 1] train "
             "another objective; the datasets' range is [-1, 1] (x * 2 - 1)")


class Trainer:
    """Optimiser, schedule, EMA and (under torchrun) DDP around a SphereEncoder.

    Images are in [-1, 1] (the sampler and the edits take and give [0, 1]), or uint8 pixels, which the step
    converts on the device (the datasets give them); the first host batch of floats (and fit's first) is checked.
    As the official training, a Trainer turns on TF32 for float32 matmuls and convolutions on CUDA, process-wide
    (``torch.backends.cuda.matmul.allow_tf32``, ``cudnn.allow_tf32``).
    ``train_step(x, y)`` draws the noise levels (per process: one r = 0 and one r = 1 in each
    process's batch) and per-sample noise seeds from torch's global RNG, which the checkpoint saves;
    tests inject ``scales`` and ``noise`` (or ``seeds``) instead to make runs comparable across process counts.
    ``launch_step`` is the same step without waiting for it: ``fit`` reads its losses a step later. A step whose
    gradient norm is not finite leaves the weights and the optimiser's moments as they were (its logged values
    show it; ``fit`` warns); the step count, so the lr schedule, goes on, and the EMA takes its usual update
    toward the unchanged weights.
    ``perceptual`` is a ready PerceptualLoss; without it one is loaded from config.perceptual_weights
    when the loss weights use it."""

    model: SphereEncoder
    ema: SphereEncoder
    device: torch.device
    dist: DistInfo
    loss: SphereLoss
    optimizer: torch.optim.AdamW
    step: int
    autocast: Callable[[], contextlib.AbstractContextManager[object]]

    def __init__(
        self,
        model: SphereEncoder,
        config: TrainConfig,
        device: torch.device | str | None = None,
        dist_info: DistInfo | None = None,
        perceptual: PerceptualLoss | None = None,
    ):
        self.config = config
        self.dist = dist_info or DistInfo()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # what the caller's config can fail comes before the model is changed (moved, put in train mode), so such a
        # failed Trainer leaves it as it was
        weights = loss_weights(config.loss_weights)
        check_weights_match_flags(model, weights)
        check_process_group(self.dist)
        if perceptual is None and (weights.recon_perc or weights.con_perc):
            perceptual = PerceptualLoss.from_files(config.perceptual_weights)
        perceptual = None if perceptual is None else perceptual.to(self.device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        self.model = model.to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        for network in (self.model.encoder, self.model.decoder):
            network.activation_checkpointing = config.activation_checkpointing
        self.loss = SphereLoss(self.model, weights, perceptual)
        self.engine: nn.Module = self.loss
        if self.dist.world_size > 1:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            # gradients as views into the all-reduce buckets: no second copy of them; the buffers are constant
            # tables (RoPE, image normalisation), so no broadcast of them before each forward
            self.engine = nn.parallel.DistributedDataParallel(
                self.loss, device_ids=ids, gradient_as_bucket_view=True, **no_forward_buffer_sync()
            )
        encoder = [p for p in self.model.encoder.parameters() if p.requires_grad]
        decoder = [p for p in self.model.decoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": encoder}, {"params": decoder}],
            lr=learning_rate(0, config),
            fused=True,  # the update as one multi-tensor kernel (CUDA and CPU), not a kernel chain per op
        )
        self._set_optimizer_settings()
        self.step = 0
        self._range_checked = False
        use_bf16 = config.autocast == "bf16" or (config.autocast == "auto" and self.device.type == "cuda")
        # a partial, not a lambda over self: that would be a reference cycle keeping the trainer (under torchrun
        # its DDP engine and process group) alive after its last use, until a garbage collection
        bf16 = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
        self.autocast = bf16 if use_bf16 else contextlib.nullcontext

    def train_step(self, x: torch.Tensor, y: torch.Tensor | None, **inputs: Any) -> dict[str, float]:
        """``launch_step(x, y, **inputs)``, then waits for it: its losses before the update (averaged over
        processes), the gradient norm and the lr."""
        return self.launch_step(x, y, **inputs).read()

    def _check_first_batch(self, x: torch.Tensor) -> None:
        """The range of the first images this Trainer is given (on the host), once; uint8 pixels have theirs."""
        if not self._range_checked and x.dtype != torch.uint8:
            check_image_range(x)
            self._range_checked = True

    def launch_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        *,
        scales: tuple[torch.Tensor, torch.Tensor] | None = None,
        noise: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
    ) -> StepLog:
        """Queue one optimiser step on this process's batch, reading nothing back (on a GPU the host does not
        wait for it); ``StepLog.read()`` gives its losses. Labels are range-checked on the host: free for a
        loader's (host) labels, one sync for labels already on the GPU. ``noise`` [B, N, C] or ``seeds`` [B]
        (int64) fix e; by default seeds are drawn. The noise levels are drawn for the whole process batch (one
        r = 0 and one r = 1 in it), which then runs as ``config.accumulation_steps`` micro-batches. Images in
        pinned host memory (a DataLoader's) are copied to the device after the call returns: a buffer of them is
        not to be changed before the step's log is read (pinned labels and seeds are copied on the host first)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of images [B, 3, H, W] in [-1, 1] (or uint8 pixels), got "
                            f"{type(x).__name__}")
        per_sample = {"y": y, "noise": noise, "seeds": seeds}
        if scales is not None:
            per_sample.update(big_scales=scales[0], small_scales=scales[1])
        for name, t in per_sample.items():  # the micro-batches slice them by x's rows: longer ones must not pass
            if isinstance(t, torch.Tensor) and (t.ndim == 0 or t.shape[0] != x.shape[0]):
                raise ValueError(f"{name} must have one row per image ({x.shape[0]}), got shape {tuple(t.shape)}")
        if x.device.type == "cpu":  # a host batch: no device sync
            self._check_first_batch(x)
        if not self.model.training:  # put in eval mode to sample (label dropout off): training needs it back
            self.model.train()
        micro = micro_batches(x.shape[0], self.config.accumulation_steps)
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = pixels_to_images(x)
        if y is not None:
            # checked once, on the host for loader labels: the three network calls below then skip their
            # own check, which would stall the step on a device sync each
            if isinstance(y, torch.Tensor) and y.dtype == torch.long:  # else the model names the wrong type
                check_label_range(y, self.model.num_classes)
            y = to_device_unsynced(y, self.device)
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if scales is None:
            scales = noise_scales(self.model, x.shape[0], self.device)
        if noise is None and seeds is None:  # e is generated from per-sample seeds inside the fused op
            seeds = torch.randint(0, 2**62, (x.shape[0],), dtype=torch.int64, device=self.device)
        elif seeds is not None:
            seeds = to_device_unsynced(seeds, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        logged = None
        for k, rows in enumerate(micro):
            inputs = [None if t is None else t[rows] for t in (x, y, *scales, noise, seeds)]
            # DDP reduces the gradients once, in the last micro-batch's backward
            wait = self.dist.world_size > 1 and k + 1 < len(micro)
            with self.engine.no_sync() if wait else contextlib.nullcontext():
                with self.autocast(), labels_checked():
                    total, terms = self.engine(*inputs)
                # micro-batches of equal size: the batch mean of each term is the mean of their means
                (total / len(micro)).backward()
            means = torch.stack([total.detach(), *terms.values()]) / len(micro)
            logged = means if logged is None else logged + means
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        # A step whose gradients are not finite (a NaN in a batch, a divergence) is skipped on the device, without
        # a host sync: the fused AdamW leaves the weights and its moments as they were where found_inf is 1 (as
        # under torch's GradScaler). Else one NaN would make every weight, the EMA and later checkpoints NaN.
        self.optimizer.found_inf = grad_norm.isfinite().logical_not().float()
        try:
            self.optimizer.step()
        finally:  # as GradScaler does: a later step of the optimiser's own must not read this step's flag
            del self.optimizer.found_inf
        self.step += 1  # with the weights: an EMA update that fails (an interrupt) does not leave it a step behind
        self.update_ema()
        if self.dist.world_size > 1:
            dist.all_reduce(logged)
            logged /= self.dist.world_size
        values = torch.cat([logged, grad_norm.reshape(1).to(logged.dtype)])
        return StepLog.start_copy(("loss", *terms, "grad_norm"), values, lr)

    @torch.no_grad()
    def update_ema(self) -> None:
        ema = list(self.ema.parameters())
        torch._foreach_lerp_(ema, list(self.model.parameters()), 1 - self.config.ema_decay)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the live weights: step, optimiser, EMA weights, this process's RNG, config, and how the
        run's seeds derive."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "rng": rng_state(),
            "train_config": dataclasses.asdict(self.config),
            "seed_derivation": SEED_DERIVATION,
        }

    def _set_optimizer_settings(self) -> None:
        """The config's betas, weight decay and encoder lr scale on the param groups (encoder, decoder)."""
        for group, lr_scale in zip(self.optimizer.param_groups, (self.config.encoder_lr_scale, 1.0), strict=True):
            group.update(lr_scale=lr_scale, betas=self.config.betas, weight_decay=self.config.weight_decay)

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError where ``state`` (``state_dict()``'s) does not fit this trainer: its optimiser's
        parameter groups and per-parameter state, or its EMA's tensors. ``load_state_dict`` checks first, so a
        refused state leaves the trainer as it was (``load_checkpoint``: its model too)."""
        saved = state["optimizer"]
        sizes = [len(group["params"]) for group in self.optimizer.param_groups]
        saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
        if saved_sizes != sizes:
            raise ValueError(f"the optimiser state has parameter groups (encoder, decoder) of {saved_sizes} tensors, "
                             f"this trainer {sizes}: the model's trainable parameters differ")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        ids = [i for group in saved["param_groups"] for i in group["params"]]
        for i, param in zip(ids, params, strict=True):
            for name, value in saved["state"].get(i, {}).items():
                if name != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                    raise ValueError(f"the optimiser state's {name} of parameter {i} has shape {tuple(value.shape)}, "
                                     f"the parameter {tuple(param.shape)}: the model's trainable parameters differ")
        shapes = {name: tuple(t.shape) for name, t in self.ema.state_dict().items()}
        saved_shapes = {name: tuple(t.shape) for name, t in state["ema"].items()}
        if saved_shapes != shapes:
            differ = sorted(set(shapes.items()) ^ set(saved_shapes.items()))[:3]
            raise ValueError(f"the EMA weights do not match the model's tensors (for example {differ})")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s state. This trainer's config holds wherever it differs from the saved one
        (the optimiser's settings included, which its state would bring back), and rank 0 warns naming the
        fields (and where the state's seeds derive otherwise). With ``state["rng"]`` None (a checkpoint of another
        number of processes) this process's RNG is seeded with ``process_seed(config.seed, rank, step)`` instead."""
        self.check_state(state)
        changed = {
            name: (saved, value) for name, value in dataclasses.asdict(self.config).items()
            if (saved := state["train_config"].get(name, value)) != value
        }
        if changed and self.dist.rank == 0:
            # the data order is a function of (seed, step, global_batch): a resume reads other batches after either
            moved = "; the data is read in another order" if {"global_batch", "seed"} & changed.keys() else ""
            warn(
                "resuming with another recipe than the checkpoint's: "
                + ", ".join(f"{name} {saved!r} -> {value!r}" for name, (saved, value) in changed.items())
                + moved
            )
        derivation = state.get("seed_derivation", "seed + epoch")  # older checkpoints' shuffles
        if derivation != SEED_DERIVATION and self.dist.rank == 0:
            warn(f"the checkpoint's run derived its shuffle seeds as {derivation!r}, this sphere_fast as "
                 f"{SEED_DERIVATION!r}: from here on the data is read in another order than the run's")
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._set_optimizer_settings()
        self.ema.load_state_dict(state["ema"])
        if state["rng"] is None:
            torch.manual_seed(process_seed(self.config.seed, self.dist.rank, self.step))
        else:
            set_rng_state(state["rng"])


# ---- the training loop --------------------------------------------------------------------------


@dataclass
class RunConfig:
    """A whole run: model constructor arguments, recipe, data and output options."""

    model: dict[str, Any]
    train: TrainConfig
    data: str = "fashion-mnist"
    out: str = "outputs/run"
    checkpoint_every: int = 500
    log_every: int = 10
    workers: int = 1
    synthetic_fallback: bool = True
    start_method: str | None = None  # the data workers' (data.make_loader): None is Python's default

    def __post_init__(self) -> None:
        _check_counts(self, ("checkpoint_every", "log_every"))
        check_int("workers", self.workers, 0)
        check_start_method(self.start_method)
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(self.train).__name__}")


def _log_lines_before(path: Path, step: int) -> list[str]:
    """The lines of the losses log ``path`` (one per step, in order) for the steps before ``step``: those a run
    resumed at ``step`` keeps. The lines after them were logged past the checkpoint and are not read: the last
    of them may be cut short by whatever ended the run."""
    if not path.exists():
        return []
    kept: list[str] = []
    logged = -1
    # errors="replace": bytes left by a torn write make a line that does not parse, not a decoding error
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if logged == step - 1:  # all kept: the rest lies past the checkpoint, whether it parses or not
            break
        try:
            logged = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError) as err:  # a JSONDecodeError is a ValueError
            raise ValueError(
                f"{path} line {number} is damaged ({err}); it logs a step before {step}, where the run resumes, "
                "so it cannot be dropped: repair or delete that line, then resume"
            ) from None
        if logged >= step:
            break
        kept.append(line)
    return kept


def _check_process_batch(cfg: TrainConfig, world_size: int) -> None:
    """Checked before anything is read or written: the first step would refuse these after fit wrote to out."""
    if cfg.global_batch % world_size:
        raise ValueError(f"global_batch {cfg.global_batch} is not divisible by the {world_size} processes")
    micro_batches(cfg.global_batch // world_size, cfg.accumulation_steps)
    if cfg.global_batch // world_size < MIN_PROCESS_BATCH:
        raise ValueError(f"global_batch {cfg.global_batch} gives {cfg.global_batch // world_size} images a "
                         f"process; the stratified noise radii need at least {MIN_PROCESS_BATCH}")


def _check_same_start(world_size: int, step: int, last: Path | None, data: str, images: int) -> None:
    """Every process starts from the same step and checkpoint, on the same data (a collective: all processes call
    it). A node without the shared run folder starts afresh; one without Fashion-MNIST falls back to synthetic
    shapes, and one with another copy of an image folder indexes other images: each would train on its own."""
    starts = [None] * world_size
    dist.all_gather_object(starts, (step, None if last is None else str(last), data, images))
    if len(set(starts)) > 1:
        raise ValueError(
            "the processes start from different points or data: "
            + ", ".join(f"rank {r} at step {s} ({path or 'no checkpoint'}) on {d!r} ({n} images)"
                        for r, (s, path, d, n) in enumerate(starts))
            + "; every process must see the same run folder and data (on storage all nodes share)"
        )


def _run_environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """What a run ran on and with, for its record: versions, device, processes, command line, start time (UTC) and
    the git commit of the sphere_fast checkout it runs from (None for an installed copy)."""
    return {
        "sphere_fast": sphere_fast.__version__,
        "git_commit": checkout_commit(Path(sphere_fast.__file__).resolve().parent),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "world_size": world_size,
        "backend_requested": active_backend(),  # "auto" mostly: each op's choice is logged (-v)
        "argv": list(sys.argv),
        "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _prepare_run_folder(run: RunConfig, trainer: Trainer, last: Path | None, resume: bool) -> None:
    """Rank 0's writes before training, under the run folder's lock (which made the folder): the run's config
    (``run_config.json``, the latest invocation's), a line for this invocation in the run's history
    (``runs.jsonl``: start step, checkpoint ``last`` resumed from, environment and config), the loss log cut back to
    the start step (read first: a damaged log is refused before any write but the lock's) and, without ``resume``,
    no checkpoints or history of an earlier run."""
    from sphere_fast.checkpoint import remove_checkpoints, replace_text

    out = Path(run.out)
    log_path, history_path = out / "losses.jsonl", out / "runs.jsonl"
    kept = _log_lines_before(log_path, trainer.step)
    if not resume:
        remove_checkpoints(out / "checkpoints")
    config = dataclasses.asdict(run)
    (out / "run_config.json").write_text(json.dumps(config, indent=1))
    resumed_from = None if last is None else last.relative_to(out).as_posix()
    invocation = {"start_step": trainer.step, "resumed_from": resumed_from,
                  "environment": _run_environment(trainer.device, trainer.dist.world_size), "run": config}
    history = history_path.read_text() if resume and history_path.exists() else ""
    replace_text(history_path, history + json.dumps(invocation) + "\n")  # whole: a killed run tears no line
    replace_text(log_path, "".join(line + "\n" for line in kept))
    env = invocation["environment"]
    logger.info("sphere_fast: training %s to step %d from %s on %d process(es), %s", out, run.train.total_steps,
                f"{resumed_from} (step {trainer.step})" if last is not None else "step 0", env["world_size"],
                env["device"])


@contextlib.contextmanager
def _run_folder_lock(out: Path) -> Iterator[None]:
    """Rank 0 holds the run folder's OS lock (``out/.run.lock``, with its pid) from its first write there to its
    end: a second run on the same folder (another job's rank 0, or a command run twice) is refused before it writes
    or deletes anything, where the two would have pruned and overwritten each other's checkpoints and losses."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".run.lock"
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(os_lock(path, wait=False))
        except BlockingIOError:
            holder = path.read_text().strip() or "unknown"
            raise RuntimeError(f"another training run (pid {holder}) is writing to {out}: wait for it to end, or "
                               "give this one another output folder") from None
        held.truncate(0)
        held.write(f"{os.getpid()}\n")
        held.flush()
        yield


def fit(
    run: RunConfig, *, resume: bool = True, progress: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> Trainer:
    """Train ``run`` to ``run.train.total_steps``, resuming from ``out/checkpoints`` when present;
    losses go to ``out/losses.jsonl`` (a line per step; the README lists its fields), checkpoints to
    ``out/checkpoints``, the config to ``out/run_config.json`` and a line per call (start, environment, config) to
    ``out/runs.jsonl``.
    ``resume=False`` starts afresh: the checkpoints, losses and runs.jsonl of an earlier run in ``out`` are deleted.
    One run at a time writes to ``out``: another one there raises RuntimeError before its first write.
    ``progress`` shows a bar on a terminal (or a notebook) and, elsewhere (CI, nohup, SLURM), a line at most every
    30 s. ``on_log`` is called on rank 0 with a copy of each line's dict as it is written (``wandb.log``, say); an
    error it raises ends rank 0's run, and the other processes then wait in their next collective until it times out."""
    info = init_distributed()
    _check_process_batch(run.train, info.world_size)
    run, trainer, loader, last = _start(run, info, resume)
    with _run_folder_lock(Path(run.out)) if info.rank == 0 else contextlib.nullcontext():
        if info.rank == 0:
            _prepare_run_folder(run, trainer, last, resume)
        _train_to_the_end(run, info, trainer, loader, progress, on_log)
    return trainer


def _start(run: RunConfig, info: DistInfo, resume: bool) -> tuple[RunConfig, Trainer, Any, Path | None]:
    """The run as it reads its data (``data`` "synthetic" where Fashion-MNIST fell back to it), its trainer, from
    its latest checkpoint when ``resume`` finds one, its loader from that step, and that checkpoint (or None)."""
    from sphere_fast.checkpoint import latest_checkpoint, load_checkpoint
    from sphere_fast.data import SyntheticShapes, make_loader, open_dataset  # at call time: tests swap them

    cfg = run.train
    device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = SphereEncoder(**run.model)
    dataset = open_dataset(run.data, model.input_size, synthetic_fallback=run.synthetic_fallback)
    fell_back = run.data == "fashion-mnist" and isinstance(dataset, SyntheticShapes)
    if fell_back:
        # the records (run_config.json, checkpoints) name the data read: a resume that finds Fashion-MNIST then
        # warns that the data changes, and the CLI's resume keeps the synthetic shapes
        run = dataclasses.replace(run, data="synthetic")
    if model.num_classes and getattr(dataset, "num_classes", model.num_classes) > model.num_classes:
        raise ValueError(f"the data has {dataset.num_classes} classes but the model only {model.num_classes}")
    trainer = Trainer(model, cfg, device, info)
    last = latest_checkpoint(Path(run.out) / "checkpoints") if resume else None
    if last is not None:
        _, saved = load_checkpoint(last, trainer=trainer)
        saved_data = (saved["run"] or {}).get("data", run.data)
        # a run folder of an older sphere_fast (no runs.jsonl) recorded the data asked for, not a fallback's: its
        # "fashion-mnist" may well have been synthetic shapes too (the fallback has warned already)
        unknown = fell_back and saved_data == "fashion-mnist" and not (Path(run.out) / "runs.jsonl").exists()
        if saved_data != run.data and not unknown and info.rank == 0:
            warn(f"resuming on other data than the checkpoint's: {saved_data!r} -> {run.data!r}")
    else:
        torch.manual_seed(process_seed(cfg.seed, info.rank))  # per-process noise, flips and label dropout
    if info.world_size > 1:  # a process that found another checkpoint or data would train other weights
        _check_same_start(info.world_size, trainer.step, last, run.data, len(dataset))
    loader = make_loader(
        dataset, cfg.global_batch // info.world_size, rank=info.rank, world_size=info.world_size,
        seed=cfg.seed, start_step=trainer.step, workers=run.workers, pin_memory=device.type == "cuda",
        worker_seed=process_seed(cfg.seed, info.rank, trainer.step), start_method=run.start_method,
    )
    return run, trainer, loader, last


def _log_line(step: int, losses: Mapping[str, float]) -> dict[str, Any]:
    """The ``losses.jsonl`` line of update ``step`` (0-based: checkpoint ``step-N`` holds the weights after updates
    0 to N-1): ``time``, when its values reached the host (Unix seconds), the losses, ``grad_norm`` (before
    clipping) and ``lr`` (the decoder's), non-finite values as null (JSON has no NaN: strict parsers refused the
    line), and ``skipped``, true where the update was skipped for gradients that are not finite."""
    finite = {name: value if math.isfinite(value) else None for name, value in losses.items()}
    return {"step": step, "time": round(time.time(), 3), **finite, "skipped": finite["grad_norm"] is None}


class _ProgressLines:
    """fit's progress where stderr is no terminal (CI, nohup, SLURM logs): there a bar is one line that grows by a
    carriage return each redraw (22.8 MB for 200k steps), so a line at most every ``every`` seconds, and the last."""

    def __init__(self, step: int, total: int, every: float = 30.0):
        self.total, self.every = total, every
        self.shown_step, self.shown_at = step, time.monotonic()

    def update(self, line: Mapping[str, Any]) -> None:
        done, now = line["step"] + 1, time.monotonic()
        if now - self.shown_at < self.every and done < self.total:
            return
        rate = (done - self.shown_step) / max(now - self.shown_at, 1e-9)
        loss = float("nan") if line["loss"] is None else line["loss"]
        print(f"train: step {done}/{self.total}, loss {loss:.4f}, lr {line['lr']:.2e}, {rate:.2f} steps/s",
              file=sys.stderr, flush=True)
        self.shown_step, self.shown_at = done, now


def _draws_a_bar(stream: Any) -> bool:
    """A terminal, or a notebook's output (not a terminal, but it draws carriage returns in place)."""
    return bool(getattr(stream, "isatty", lambda: False)()) or type(stream).__module__.startswith("ipykernel")


def _train_to_the_end(
    run: RunConfig, info: DistInfo, trainer: Trainer, loader: Any, progress: bool,
    on_log: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Steps to ``total_steps``: rank 0 logs each step's losses and writes the checkpoints (every process takes part
    in a save)."""
    from tqdm import tqdm

    from sphere_fast.checkpoint import save_checkpoint
    from sphere_fast.data import random_hflip

    cfg, rank, model = run.train, info.rank, trainer.model
    out = Path(run.out)
    batches = iter(loader)
    bar_drawn = progress and rank == 0 and _draws_a_bar(sys.stderr)
    lines = _ProgressLines(trainer.step, cfg.total_steps) if progress and rank == 0 and not bar_drawn else None
    with (
        tqdm(total=cfg.total_steps, initial=trainer.step, desc="train", disable=not bar_drawn,
             dynamic_ncols=True) as bar,
        _workers_stopped_after(batches),
        open(out / "losses.jsonl", "a") if rank == 0 else contextlib.nullcontext() as log,
    ):
        # A step's losses are read once the next step is queued, so the host does not wait for the device
        # mid-run; other processes never read theirs (rank 0 logs the averages).
        unread: list[tuple[int, StepLog]] = []
        while trainer.step < cfg.total_steps:
            x, y = next(batches)
            trainer._check_first_batch(x)  # on the host: a dataset of another range stops here
            x = random_hflip(x.to(trainer.device, non_blocking=True))  # on the device: the pinned batch as is
            step = trainer.step
            unread.append((step, trainer.launch_step(x, y if model.num_classes else None)))
            bar.update(1)
            checkpoint = trainer.step % run.checkpoint_every == 0 or trainer.step == cfg.total_steps
            while len(unread) > (0 if checkpoint else 1):
                step, queued = unread.pop(0)
                if log is not None:
                    losses = queued.read()
                    line = _log_line(step, losses)
                    if line["skipped"]:
                        logger.warning("sphere_fast: step %d's gradients are not finite (loss %s): its update was "
                                       "skipped", step, losses["loss"])
                    log.write(json.dumps(line, allow_nan=False) + "\n")
                    if on_log is not None:
                        on_log(dict(line))  # the caller's copy: wandb's d.pop("step"), say, leaves fit's alone
                    if lines is not None:
                        lines.update(line)
                    if (step + 1) % run.log_every == 0:
                        log.flush()
                        bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{losses['lr']:.2e}")
            if checkpoint:
                if log is not None:
                    log.flush()
                saved = save_checkpoint(out / "checkpoints", model, trainer=trainer, run_config=dataclasses.asdict(run))
                if saved is not None:  # rank 0's
                    logger.info("sphere_fast: saved %s", saved)


@contextlib.contextmanager
def _workers_stopped_after(batches: Iterator[Any]) -> Iterator[None]:
    """Stops a DataLoader iterator's worker processes on the way out, an error's way too: a traceback that a
    notebook keeps would otherwise keep them alive, with their pipes and shared memory."""
    try:
        yield
    finally:
        stop = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator has one
        if stop is not None:
            stop()
