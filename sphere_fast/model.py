"""SphereEncoder: a drop-in replacement for the official Sphere Encoder model (``sphere.model.G``).

Same constructor arguments, same state_dict keys and shapes, same encoder/decoder/f/reconstruct/generate
functions; every hot op goes through sphere_fast.ops, so a backend switch swaps the kernels under the
same weights."""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, cast

import torch
import torch.nn as nn

from sphere_fast import ops
from sphere_fast._context import context_value
from sphere_fast.backend import tracing
from sphere_fast.nn.layers import (
    Block,
    LabelEmbedder,
    MLPMixer,
    ModulatedLinear,
    Unpatchify,
    rope_2d,
    sincos_pos_embed_2d,
    xavier_uniform_flat_,
)

# (width, layers, heads) of the official model sizes; "tiny" is the size of the reference golden data.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"width": 64, "layers": 2, "heads": 2},
    "small": {"width": 512, "layers": 8, "heads": 8},
    "base": {"width": 768, "layers": 12, "heads": 12},
    "large": {"width": 1024, "layers": 24, "heads": 16},
    "xlarge": {"width": 1152, "layers": 28, "heads": 16},
    "huge": {"width": 1280, "layers": 32, "heads": 16},
    "giant": {"width": 1664, "layers": 40, "heads": 16},
}


# ViT.conditioning: per block (shift1, scale1, gate1, shift2, scale2, gate2), and the head's (shift, scale)
Conditioning = tuple[list[tuple[torch.Tensor | None, ...]], tuple[torch.Tensor, ...] | None]

_labels_checked: contextvars.ContextVar[bool] = contextvars.ContextVar("sphere_fast_labels_checked", default=False)
_representative_blocks: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sphere_fast_representative_blocks", default=False)


def labels_checked() -> contextlib.AbstractContextManager[bool]:
    """Inside, encoder/decoder calls skip the label range check (a host sync per call): for loops whose
    labels were validated once up front."""
    return context_value(_labels_checked, True)


def representative_blocks() -> contextlib.AbstractContextManager[bool]:
    """Inside, each network runs its first and last blocks only: the blocks between launch the first one's
    kernels, for arguments of the same shapes, dtypes and alignment. For runs that only build kernels, tune
    them or initialise libraries, whose outputs are thrown away (the sampler's compile pass and warm-up)."""
    return context_value(_representative_blocks, True)


def check_label_range(y: torch.Tensor, high: int, name: str = "y") -> None:
    """Labels in [0, high]: one host read (a device sync for labels on a GPU), so loops check once."""
    low, top = torch.stack(torch.aminmax(y)).tolist()
    if low < 0 or top > high:
        raise ValueError(f"{name}: class labels must be in [0, {high}], got values in [{low}, {top}]")


def resolve_model_size(size: str | Mapping[str, int], argument: str) -> dict[str, int]:
    if isinstance(size, str):
        if size not in MODEL_SIZES:
            raise ValueError(f"{argument} must be one of {sorted(MODEL_SIZES)} or a dict, got {size!r}")
        return dict(MODEL_SIZES[size])
    if isinstance(size, Mapping):
        keys = {"width", "layers", "heads"}
        if set(size) != keys or not all(isinstance(size[k], int) and size[k] > 0 for k in keys):
            raise ValueError(f"{argument} as a dict needs positive int 'width', 'layers', 'heads', got {dict(size)}")
        return dict(size)
    raise ValueError(f"{argument} must be a size name or a dict, got {type(size).__name__}")


class ViT(nn.Module):
    """The encoder (pixels -> latent [B, N, C]) or the decoder (latent -> pixels in [-1, 1])."""

    # the encoder's and the decoder's differ: Sequential, Linear, MLPMixer or Identity
    x_embedder: nn.Module
    out: nn.Module

    def __init__(
        self,
        kind: str,
        input_size: int,
        patch_size: int,
        size: dict[str, int],
        token_channels: int,
        num_classes: int,
        mixer_depth: int,
        affine_mixer: bool,
        pixel_head_type: str = "linear",
        spherify_blocks: bool = False,
    ):
        super().__init__()
        self.kind = kind
        self.grid = input_size // patch_size
        self.patch_size = patch_size
        self.num_tokens = self.grid**2
        self.token_channels = token_channels
        self.num_classes = num_classes
        self.spherify_blocks = spherify_blocks
        # training: recompute each block's activations in the backward instead of keeping them (less memory, a
        # second forward of the blocks); set by the Trainer from TrainConfig.activation_checkpointing
        self.activation_checkpointing = False
        width, heads = size["width"], size["heads"]
        modulated = num_classes > 0

        if kind == "encoder":
            self.x_embedder = nn.Sequential(
                nn.Conv2d(3, width, patch_size, patch_size, bias=False), nn.Conv2d(width, width, 1)
            )
        elif mixer_depth > 0:
            self.x_embedder = nn.Sequential(
                nn.Linear(token_channels, width), MLPMixer(self.num_tokens, width, mixer_depth, affine_mixer)
            )
        else:
            self.x_embedder = nn.Linear(token_channels, width)
        # a frozen parameter (not a buffer) because official checkpoints hold it
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, width), requires_grad=False)
        self.y_embedder = LabelEmbedder(num_classes, width) if modulated else None
        self.blocks = nn.ModuleList(Block(width, heads, modulated) for _ in range(size["layers"]))
        # after the blocks, which check that heads divide the width
        self.head_dim = width // heads
        self.register_buffer("rope", self.rope_table(), persistent=False)

        if kind == "encoder":
            self.ffn = ModulatedLinear(width, token_channels, modulated)
            self.out = MLPMixer(self.num_tokens, token_channels, mixer_depth, affine_mixer) if mixer_depth > 0 else nn.Identity()
        else:
            self.pixel_head_type = pixel_head_type
            if pixel_head_type == "linear":
                self.ffn = ModulatedLinear(width, 3 * patch_size**2, modulated)
                # indices 0 and 1 are the parameter-free unpatchify steps of the official Sequential
                self.out = nn.Sequential(
                    Unpatchify(self.grid, patch_size),
                    nn.Identity(),
                    nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
                    nn.Tanh(),
                )
            else:
                self.ffn = ModulatedLinear(width, 32, modulated)
                self.out = nn.Sequential(
                    Unpatchify(self.grid, 1),
                    nn.Identity(),
                    nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"),
                    nn.SiLU(),
                    nn.ConvTranspose2d(32, 3, patch_size + 2, stride=patch_size, padding=1),
                    nn.Tanh(),
                )

    def rope_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The RoPE table [N, 2 * head_dim], float32: a function of the config, so no checkpoint holds it."""
        return rope_2d(self.head_dim, self.grid).to(device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A decoder saved whole (torch.save(model)) before its pixel head's first step was Unpatchify holds an
        # Identity there (the forward unpatchified on its own then): it gets the step a new decoder has.
        head = cast(nn.Sequential, self.out)  # a decoder's
        if self.kind == "decoder" and type(head[0]) is nn.Identity:
            head[0] = Unpatchify(self.grid, self.patch_size if self.pixel_head_type == "linear" else 1)

    def _apply(self, fn, recurse=True):
        before = self.rope
        super()._apply(fn, recurse)
        # A conversion that replaced the table gets it rebuilt: float32 when the model is cast (e.g. to bf16:
        # positions need the precision), and filled after to_empty (the meta-device route to big checkpoints).
        if self.rope is not before:
            self.rope = self.rope_table(self.rope.device)
        return self

    def check_input(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Shapes always; label values only outside graph capture and compilation (they need a sync)."""
        shape: tuple[int, ...]
        if self.kind == "encoder":
            name, shape = "x", (3, self.grid * self.patch_size, self.grid * self.patch_size)
        else:
            name, shape = "z", (self.num_tokens, self.token_channels)
        if not isinstance(x, torch.Tensor) or x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{name} must have shape [B, {', '.join(map(str, shape))}], got {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        weights = self.pos_embed
        if x.device != weights.device:
            raise ValueError(f"{name} is on {x.device} but the {self.kind}'s weights are on {weights.device}")
        if x.dtype != weights.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} has dtype {x.dtype} but the {self.kind}'s weights are {weights.dtype}: cast it, or run under "
                "torch.autocast"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("y (labels) given to an unconditional model (num_classes=0)")
            return
        if not isinstance(y, torch.Tensor) or y.dtype != torch.long or tuple(y.shape) != (x.shape[0],):
            wrong_type = not isinstance(y, torch.Tensor) or y.dtype != torch.long
            raise (TypeError if wrong_type else ValueError)(
                f"y must be an int64 tensor of shape ({x.shape[0]},) with labels in [0, {self.num_classes}] "
                f"({self.num_classes} = null label), got {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}"
            )
        # The range check syncs with the device: skipped while compiling (asked first: dynamo cannot trace the
        # capture query), inside a CUDA-graph capture, and where the caller checked the labels already.
        if tracing() or _labels_checked.get():
            return
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            check_label_range(y, self.num_classes)

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "encoder":
            return self.x_embedder(x).flatten(2).transpose(1, 2)
        return self.x_embedder(x)

    def conditioning(self, y: torch.Tensor | None) -> Conditioning:
        """What a forward computes from the labels alone: each block's AdaLN modulation (shift, scale, gate
        for both sub-layers; Nones when unconditional) and the head's (shift, scale). For passes that share
        labels (the sampler's steps): compute it once, hand it to each ``forward``."""
        c = self.y_embedder(y) if self.y_embedder is not None else None
        head = self.ffn.adaLN_modulation(c) if self.ffn.adaLN_modulation is not None else None
        return [block.modulation(c) for block in self.blocks], head

    def blocks_run(self) -> Sequence[int]:
        """The blocks a forward runs: all of them, or inside ``representative_blocks`` the first and the last
        where the blocks between hold parameters like the first one's."""
        last = len(self.blocks) - 1
        # asked after tracing(): dynamo does not trace the context variable
        representative = last > 1 and not tracing() and _representative_blocks.get()
        if representative and self._blocks_alike():
            return (0, last)
        return range(last + 1)

    def _blocks_alike(self) -> bool:
        """Whether every block's parameters match the first block's in dtype, shape, strides and 16-byte
        alignment (what a Triton kernel is specialised on): then the blocks launch the same kernels."""
        def layout(block: nn.Module) -> list[tuple]:
            return [(p.dtype, p.shape, p.stride(), p.data_ptr() % 16 == 0) for p in block.parameters()]

        first = layout(self.blocks[0])
        return all(layout(block) == first for block in self.blocks[1:])

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, conditioning: Conditioning | None = None
    ) -> torch.Tensor:
        """Encoder: images -> latent; decoder: latent -> images. ``conditioning``: ``self.conditioning(y)``
        computed before for these labels (y is still checked); without it each block computes its own modulation
        (as it reads only its own parameters, FSDP can shard per block)."""
        self.check_input(x, y)
        if conditioning is not None:
            c, (modulations, head_modulation) = None, conditioning
        else:
            c = self.y_embedder(y) if self.y_embedder is not None else None
            modulations, head_modulation = [None] * len(self.blocks), None
        x = self.embed_input(x)
        # the residual stream keeps the embedding's dtype (bf16 under autocast): each fused op takes one dtype
        x = (x + self.pos_embed).to(x.dtype)
        rope, opened = self.rope, None
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for i in self.blocks_run():
            block = self.blocks[i]
            if recompute:
                x, opened = torch.utils.checkpoint.checkpoint(block, x, opened, c, rope, modulations[i],
                                                              self.spherify_blocks, use_reentrant=False)
            else:
                x, opened = block(x, opened, c, rope, modulations[i], self.spherify_blocks)
        return self.out(self.ffn(x, opened, c, head_modulation))


def _read_presets() -> dict[str, dict[str, Any]]:
    return json.loads(resources.files("sphere_fast").joinpath("presets.json").read_text())


PRESETS: dict[str, dict[str, Any]] = _read_presets()


class SphereEncoder(nn.Module):
    """The Sphere Encoder generator: ``encoder``, ``decoder``, the spherify function ``f``, training
    ``forward``, ``reconstruct`` and ``generate``, with the official arguments and checkpoint keys.

    Arguments (the official model's; every bad value is a ValueError naming it):
    ``input_size`` / ``patch_size``: image side and patch side in pixels (N = (input_size / patch_size)**2 tokens).
    ``vit_enc_model_size`` / ``vit_dec_model_size``: a name of ``MODEL_SIZES`` or a dict of width, layers, heads.
    ``token_channels``: C, the latent's channels per token (the sphere's dimension L = N * C).
    ``num_classes``: 0 for an unconditional model; else labels 0 .. num_classes - 1, and num_classes is the null
    label (CFG's unconditional branch).
    ``in_context_size``: must be 0 (the official in-context tokens are not supported).
    ``pixel_head_type``: the decoder's head, ``"linear"`` (256 px models) or ``"conv"`` (CIFAR's).
    ``halve_model_size``: half the layers of both networks.
    ``spherify_model``: spherify the residual stream after each block's MLP (the official variant).
    ``use_pixel_consistency`` / ``use_latent_consistency``: the training forward decodes the small-noise latent as
    well / encodes the big-noise image again, for the consistency losses (on exactly where their weights are not 0).
    ``noise_sigma_max_angle``: alpha_max in degrees (sigma_max = tan(alpha_max)): 80 for 32 px, 85 for 256 px.
    ``vit_enc_latent_mlp_mixer_depth`` / ``vit_dec_latent_mlp_mixer_depth``: MLP-Mixer blocks after the encoder's
    head and before the decoder's blocks (``affine_latent_mlp_mixer``: the mixer's final RMSNorm has a weight).
    ``mix_hard_cases``, ``mix_hard_cases_prob``, ``mix_hard_cases_max_angle``: training's hard cases (spec section
    4): that fraction of the big-noise radii is redrawn up to that angle (default min(alpha_max + 5, 89)).
    """

    config: dict[str, Any]
    encoder: ViT
    decoder: ViT
    latent_shape: tuple[int, int, int]

    def __init__(
        self,
        input_size: int = 256,
        patch_size: int = 16,
        vit_enc_model_size: str | Mapping[str, int] = "base",
        vit_dec_model_size: str | Mapping[str, int] = "base",
        token_channels: int = 16,
        num_classes: int = 0,
        in_context_size: int = 0,
        pixel_head_type: str = "linear",
        halve_model_size: bool = False,
        spherify_model: bool = False,
        use_pixel_consistency: bool = False,
        use_latent_consistency: bool = False,
        noise_sigma_max_angle: float = 85.0,
        vit_enc_latent_mlp_mixer_depth: int = 0,
        vit_dec_latent_mlp_mixer_depth: int = 0,
        affine_latent_mlp_mixer: bool = True,
        mix_hard_cases: bool = False,
        mix_hard_cases_prob: float = 0.1,
        mix_hard_cases_max_angle: float | None = None,
    ):
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("token_channels", token_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be divisible by patch_size ({patch_size})")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if in_context_size != 0:
            raise ValueError(f"in_context_size must be 0 (in-context tokens are not supported by sphere_fast), got "
                             f"{in_context_size!r}")
        switches = {"halve_model_size": halve_model_size, "spherify_model": spherify_model,
                    "use_pixel_consistency": use_pixel_consistency, "use_latent_consistency": use_latent_consistency,
                    "affine_latent_mlp_mixer": affine_latent_mlp_mixer, "mix_hard_cases": mix_hard_cases}
        for name, value in switches.items():  # a truthy "no" would switch it on
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if pixel_head_type not in ("linear", "conv"):
            raise ValueError(f"pixel_head_type must be 'linear' or 'conv', got {pixel_head_type!r}")
        depths = {"vit_enc_latent_mlp_mixer_depth": vit_enc_latent_mlp_mixer_depth,
                  "vit_dec_latent_mlp_mixer_depth": vit_dec_latent_mlp_mixer_depth}
        for name, depth in depths.items():
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
                raise ValueError(f"{name} must be an int >= 0, got {depth!r}")
        check_angle("noise_sigma_max_angle", noise_sigma_max_angle)
        prob = mix_hard_cases_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
            raise ValueError(f"mix_hard_cases_prob must be a number in [0, 1], got {prob!r}")
        if mix_hard_cases_max_angle is None:  # the recipe's rule (spec section 4): 5 degrees past the noise's, <= 89
            mix_hard_cases_max_angle = min(noise_sigma_max_angle + 5, 89)
        check_angle("mix_hard_cases_max_angle", mix_hard_cases_max_angle)
        check_angle("noise_sigma_max_angle", noise_sigma_max_angle, mix_hard_cases_max_angle)
        enc_size = resolve_model_size(vit_enc_model_size, "vit_enc_model_size")
        dec_size = resolve_model_size(vit_dec_model_size, "vit_dec_model_size")
        if halve_model_size:
            for name, size in (("vit_enc_model_size", enc_size), ("vit_dec_model_size", dec_size)):
                if size["layers"] < 2:
                    raise ValueError(
                        f"halve_model_size leaves {name} with {size['layers'] // 2} layers; it needs 2 or more"
                    )
                size["layers"] //= 2

        self.config = {
            "input_size": input_size,
            "patch_size": patch_size,
            "vit_enc_model_size": vit_enc_model_size if isinstance(vit_enc_model_size, str) else dict(vit_enc_model_size),
            "vit_dec_model_size": vit_dec_model_size if isinstance(vit_dec_model_size, str) else dict(vit_dec_model_size),
            "token_channels": token_channels,
            "num_classes": num_classes,
            "in_context_size": in_context_size,
            "pixel_head_type": pixel_head_type,
            "halve_model_size": halve_model_size,
            "spherify_model": spherify_model,
            "use_pixel_consistency": use_pixel_consistency,
            "use_latent_consistency": use_latent_consistency,
            "noise_sigma_max_angle": noise_sigma_max_angle,
            "vit_enc_latent_mlp_mixer_depth": vit_enc_latent_mlp_mixer_depth,
            "vit_dec_latent_mlp_mixer_depth": vit_dec_latent_mlp_mixer_depth,
            "affine_latent_mlp_mixer": affine_latent_mlp_mixer,
            "mix_hard_cases": mix_hard_cases,
            "mix_hard_cases_prob": mix_hard_cases_prob,
            "mix_hard_cases_max_angle": mix_hard_cases_max_angle,
        }
        common = dict(input_size=input_size, patch_size=patch_size, token_channels=token_channels, num_classes=num_classes, affine_mixer=affine_latent_mlp_mixer)
        self.encoder = ViT("encoder", size=enc_size, mixer_depth=vit_enc_latent_mlp_mixer_depth, **common)
        self.decoder = ViT(
            "decoder",
            size=dec_size,
            mixer_depth=vit_dec_latent_mlp_mixer_depth,
            pixel_head_type=pixel_head_type,
            spherify_blocks=spherify_model,
            **common,
        )
        self.input_size = input_size
        self.num_classes = num_classes
        self.latent_shape = (1, self.decoder.num_tokens, token_channels)
        self.use_pix_con = use_pixel_consistency
        self.use_lat_con = use_latent_consistency
        self.mix_hard_cases = mix_hard_cases
        self.mix_hard_cases_prob = mix_hard_cases_prob
        self.mix_hard_cases_max_angle = mix_hard_cases_max_angle
        self.noise_sigma_max_angle = noise_sigma_max_angle
        self.initialize_weights()

    @property
    def noise_sigma_max_angle(self) -> float:
        """The largest noise angle in degrees (sigma_max = tan of it). Settable (to sample at another noise level),
        checked as in the constructor and kept in ``config``, so that a checkpoint saves the angle the model
        samples with."""
        return self._noise_sigma_max_angle

    @noise_sigma_max_angle.setter
    def noise_sigma_max_angle(self, angle: float) -> None:
        check_angle("noise_sigma_max_angle", angle, self.mix_hard_cases_max_angle)
        self._noise_sigma_max_angle = angle
        self.config["noise_sigma_max_angle"] = angle

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SphereEncoder:
        """One of the released configurations (see ``PRESETS``), e.g. ``"sphere-l-imagenet"``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name]["config"], **overrides})

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official init: xavier Linears, N(0,1) decoder input layers, zeroed AdaLN and heads."""
        for vit in (self.encoder, self.decoder):
            for m in vit.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            vit.pos_embed.copy_(sincos_pos_embed_2d(vit.pos_embed.shape[-1], vit.grid).unsqueeze(0))
            if vit.y_embedder is not None:
                nn.init.normal_(vit.y_embedder.embedding_table.weight, std=0.02)
            for block in vit.blocks:
                if block.adaLN_modulation is not None:
                    nn.init.zeros_(block.adaLN_modulation[1].weight)
                    nn.init.zeros_(block.adaLN_modulation[1].bias)
            if vit.ffn.adaLN_modulation is not None:
                nn.init.zeros_(vit.ffn.adaLN_modulation[1].weight)
                nn.init.zeros_(vit.ffn.adaLN_modulation[1].bias)
            nn.init.zeros_(vit.ffn.linear.weight)
            nn.init.zeros_(vit.ffn.linear.bias)
        patch_embed = cast(nn.Sequential, self.encoder.x_embedder)  # the encoder's: two convolutions
        for conv in patch_embed:
            xavier_uniform_flat_(conv.weight)
        nn.init.zeros_(patch_embed[1].bias)
        for m in self.decoder.x_embedder.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight)
                nn.init.zeros_(m.bias)
        for m in cast(nn.Sequential, self.decoder.out):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                xavier_uniform_flat_(m.weight, gain=0.01)
                nn.init.zeros_(m.bias)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load an official (or sphere_fast) state_dict; with ``strict`` the missing, unexpected, mis-shaped and
        non-floating keys are named (the first few of each, with their counts) in one ValueError."""
        if strict:
            own = self.state_dict()
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            shapes = sorted(
                f"{k}: expected {tuple(own[k].shape)}, got {tuple(getattr(state_dict[k], 'shape', ()))}"
                for k in set(own) & set(state_dict)
                if tuple(own[k].shape) != tuple(getattr(state_dict[k], "shape", ()))
            )
            # torch would cast an integer, bool or complex tensor silently (and assign=True keep its dtype)
            kinds = sorted(
                f"{k}: expected a floating tensor, got {getattr(state_dict[k], 'dtype', type(state_dict[k]).__name__)}"
                for k in set(own) & set(state_dict)
                if own[k].is_floating_point() and not (isinstance(state_dict[k], torch.Tensor)
                                                       and state_dict[k].is_floating_point())
            )
            if missing or unexpected or shapes or kinds:
                parts = [_some_keys(what, keys) for what, keys in (
                    ("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes), ("mis-typed", kinds),
                ) if keys]
                raise ValueError("state_dict does not match this SphereEncoder; " + "; ".join(parts) +
                                 _wrapped_hint(state_dict))
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for vit in (self.encoder, self.decoder):  # assign=True into a meta-device model leaves the table on meta
            if vit.rope.device != vit.pos_embed.device:
                vit.rope = vit.rope_table(vit.pos_embed.device)
        return result

    # ---- the three functions of the method ---------------------------------------------------
    @property
    def sigma_max(self) -> float:
        """The largest noise scale: tan(noise_sigma_max_angle), relative to the sphere's radius."""
        return math.tan(math.radians(self.noise_sigma_max_angle))

    def f(self, z: torch.Tensor) -> torch.Tensor:
        """Spherify: project each sample's whole latent onto the sphere of radius sqrt(L)."""
        return ops.spherify(z)

    # ---- training ------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """The official training forward: (decoded images [2B or B, ...], extra losses, re-encoded
        latent of the big-noise images or None, clean latent). See sphere_fast.training for the losses."""
        from sphere_fast.training import noisy_latent_pair

        z = self.encoder(x, y)
        z_clean = z.detach()
        v_big, v_small = noisy_latent_pair(self, z)
        if self.use_pix_con:
            latents = torch.cat([v_big, v_small])
            labels = torch.cat([y, y]) if y is not None else None
        else:
            latents, labels = v_big, y
        images = self.decoder(latents, labels)
        u_big = None
        if self.training and self.use_lat_con:
            u_big = self.encoder(images[: x.shape[0]], y)
        return images, {}, u_big, z_clean

    # ---- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None, noise_scaler: float = 1.0, sampling: bool = False) -> torch.Tensor:
        """E(x, y or null) -> f (-> noisy re-projection when ``sampling``) -> D, as the official ``reconstruct``: x in
        [-1, 1] (the model's input range), the images returned in [0, 1]. ``sphere_fast.editing.reconstruct_images``
        takes and gives [0, 1]."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of images [B, 3, H, W] in [-1, 1], got {type(x).__name__}")
        check_noise_scaler(noise_scaler)
        check_flags(sampling=sampling)
        check_eval_mode(self)
        if y is None and self.num_classes > 0:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        z = self.encoder(x, y)
        if sampling and noise_scaler > 0:
            z = ops.spherify_noise(z, noise_scaler * self.sigma_max, noise=torch.randn_like(z))
        else:
            z = self.f(z)
        return (self.decoder(z, y) * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def generate(
        self,
        batch_size: int,
        y: torch.Tensor | None = None,
        cfg: float = 1.0,
        cfg_position: str = "combo",
        forward_steps: int = 1,
        use_sampling_scheduler: bool = False,
        cache_sampling_noise: bool = False,
        device: torch.device | str | None = None,
        *,
        noise: Sequence[torch.Tensor] | None = None,
        seeds: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample images; returns (first-step image, final image), both [B, 3, H, W] in [0, 1].

        Noise: by default from torch's global generator (like the official code); ``noise`` replays a
        list of draws (the initial point first, then the refinement draws in order); ``seeds`` ([B]
        int64) draws by the sphere_fast convention, so a sample's image depends only on its seed (and its label,
        which ``y`` None draws from the seed).
        ``dtype`` (e.g. torch.bfloat16) runs the networks under autocast; float32 turns off an enclosing
        autocast; None (the default) runs them as called: in their weights' dtype, or an enclosing autocast's."""
        from sphere_fast.sampling import sample

        return sample(
            self,
            batch_size,
            y=y,
            cfg=cfg,
            cfg_position=cfg_position,
            steps=forward_steps,
            scheduler=use_sampling_scheduler,
            cache_noise=cache_sampling_noise,
            device=device,
            noise=noise,
            seeds=seeds,
            dtype=dtype,
        )


def check_angle(name: str, angle: object, at_most: float = 90.0) -> None:
    """An angle in degrees in (0, 90), and at most ``at_most`` (the hard cases' angle bounds the noise's)."""
    if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not 0 < angle < 90:
        raise ValueError(f"{name} must be a number of degrees in (0, 90), got {angle!r}")
    if angle > at_most:
        raise ValueError(f"{name} ({angle}) must be <= mix_hard_cases_max_angle ({at_most})")


# The key prefixes of a state_dict saved through DDP ("module.") or torch.compile ("_orig_mod.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# the RoPE tables an official EMA dict holds by these names (a state_dict leaves them out: non-persistent buffers)
ROPE_BUFFERS = ("encoder.rope", "decoder.rope")


def _some_keys(what: str, keys: list[str], shown: int = 8) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {what} keys: {keys[:shown]}{more}"


def _wrapped_hint(state_dict: Mapping[str, Any]) -> str:
    """A hint where the dict looks like a checkpoint file's rather than a state_dict."""
    keys = list(state_dict)
    wrapped = any(isinstance(v, Mapping) for v in state_dict.values())
    prefixed = bool(keys) and any(all(k.startswith(p) for k in keys) for p in WRAPPER_PREFIXES)
    if set(keys) >= set(ROPE_BUFFERS) and not (wrapped or prefixed):
        return (f"; {', '.join(ROPE_BUFFERS)} are the RoPE tables an official EMA dict holds: read it with "
                "sphere_fast.checkpoint.read_official(path, key='ema_model'), which checks and drops them")
    if not (wrapped or prefixed):
        return ""
    return ("; it looks like a checkpoint file's dict ('model' / 'ema_model' entries, or keys saved through DDP or "
            "torch.compile): read it with sphere_fast.checkpoint.read_official(path)")


def check_noise_scaler(noise_scaler: object) -> None:
    if not isinstance(noise_scaler, (int, float)) or isinstance(noise_scaler, bool):
        raise TypeError(f"noise_scaler must be a finite number >= 0, got {noise_scaler!r}")
    if not math.isfinite(noise_scaler) or noise_scaler < 0:
        raise ValueError(f"noise_scaler must be a finite number >= 0, got {noise_scaler!r}")


def check_flags(**flags: object) -> None:
    """Switches, given by name (``cache_noise=...``): a truthy non-bool is more likely a misplaced argument."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def check_eval_mode(model: SphereEncoder) -> None:
    """Label dropout applies in training mode, set per label embedder: a sample would depend on torch's
    generator, not on its seed."""
    modules = {"model": model, "model.encoder.y_embedder": model.encoder.y_embedder,
               "model.decoder.y_embedder": model.decoder.y_embedder}
    training = [name for name, module in modules.items() if module is not None and module.training]
    if training:
        raise ValueError(f"{training[0]} is in training mode (label dropout would apply): call model.eval() first")


def check_model(model: object) -> SphereEncoder:
    """The sampler and the editing functions run a SphereEncoder's networks: anything else is refused up front."""
    if not isinstance(model, SphereEncoder):
        # torch.compile's wrapper: the sampler runs the networks itself (captured, or compiled per network)
        unwrap = " (a torch.compile'd model: pass the module, model._orig_mod)" if hasattr(model, "_orig_mod") else ""
        raise TypeError(f"model must be a SphereEncoder, got {type(model).__name__}{unwrap}")
    return model
