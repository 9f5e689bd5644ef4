"""Building blocks of the Sphere Encoder ViTs, made only from sphere_fast.ops.

Module and parameter names follow the official implementation so its state_dicts load unchanged."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from sphere_fast import ops
from sphere_fast._context import context_value
from sphere_fast._env import env_switch
from sphere_fast.backend import constant_under_compile, resolve_backend, tracing
from sphere_fast.ops._library import needs_grad, plain_op_call
from sphere_fast.ops.swiglu import AUTO_ORDER as SWIGLU_AUTO_ORDER
from sphere_fast.ops.swiglu_linear import AUTO_ORDER as SWIGLU_LINEAR_AUTO_ORDER
from sphere_fast.ops.swiglu_linear import triton_refusal

T = TypeVar("T")


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (eps 1e-6), optionally without a weight."""

    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.adaln_modulate(x, weight_like(self.weight, x), eps=self.eps)


def weight_like(weight: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A norm weight in the activations' dtype: under autocast the fp32 master weight meets bf16
    activations, and the fused ops take one dtype."""
    return weight if weight is None or weight.dtype == x.dtype else weight.to(x.dtype)


class AdaLNModulation(nn.Sequential):
    """SiLU -> Linear(W, k*W) on the class embedding, split in k chunks (the official adaLN_modulation)."""

    def __init__(self, width: int, chunks: int):
        super().__init__(nn.SiLU(), nn.Linear(width, chunks * width))
        self.chunks = chunks

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().forward(c).chunk(self.chunks, dim=-1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        # [B, N, 3, H, D] viewed as three [B, H, N, D] tensors: no transposing copy before the kernel
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = ops.attention(q, k, v, rope)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


# The fused backends run the SwiGLU hidden width padded to a multiple of this many elements. The official
# int(W * 8/3) is often not a multiple of 8 (Sphere-L: 2730), and bf16 rows that are not 16-byte multiples
# rule out Hopper's wgmma/TMA GEMM kernels (cuBLAS falls back to Ampere ones); 64 also fills whole K tiles.
MLP_ALIGN = 64


@constant_under_compile
def fused_mlp_enabled() -> bool:
    """SPHERE_FAST_FUSED_MLP=1: SwiGLU layers that need no gradient run their first projection and activation as
    one GEMM (``ops.swiglu_linear``) on the triton backend, fp16 / bf16. Off by default: against cuBLAS and the
    SwiGLU kernel on an H200 it was mixed, the sampler within 2% either way (benchmarks/NOTES.md, 2026-11-29). A
    constant under torch.compile."""
    return env_switch("SPHERE_FAST_FUSED_MLP", default=False)


def pad_hidden(t: torch.Tensor, padded: int, halves: bool) -> torch.Tensor:
    """Zero-padded from the hidden width H to ``padded``: each half of w12's rows or of its bias (``halves``), else
    w3's columns."""
    if halves:
        hidden = t.shape[0] // 2
        return F.pad(t.unflatten(0, (2, hidden)), (0, 0) * (t.ndim - 1) + (0, padded - hidden)).flatten(0, 1)
    return F.pad(t, (0, padded - t.shape[-1]))


def unpad_hidden(t: torch.Tensor, hidden: int, halves: bool) -> torch.Tensor:
    """The official-width part of a gradient that ``pad_hidden`` padded."""
    return t.unflatten(0, (2, -1))[:, :hidden].flatten(0, 1) if halves else t[..., :hidden]


def _autocast_cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` as autocast to ``dtype`` (None: off) hands it to F.linear: float64 is not cast."""
    return t if dtype is None or t.dtype == torch.float64 else t.to(dtype)


class _PaddedHiddenLinear(torch.autograd.Function):
    """F.linear(x, pad_hidden(weight), bias, padded as w12's with ``halves``) for training: it keeps the official
    weight for the backward and pads it again there, where F.linear kept the padded copy (under autocast its
    low-precision cast, made afresh at every call): a copy of the layer's weights a call less until the backward
    (Sphere-L in bf16: about 390 MiB a network pass). Autocast's casts are made here, as F.linear's would be (float64
    is not cast)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padded: int, halves: bool):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        x, padded_weight = _autocast_cast(x, dtype), pad_hidden(_autocast_cast(weight, dtype), padded, halves)
        if bias is not None:
            bias = _autocast_cast(bias, dtype)
            bias = pad_hidden(bias, padded, True) if halves else bias
        with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
            out = F.linear(x, padded_weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.dtype, ctx.padded, ctx.halves = dtype, padded, halves
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        hidden = weight.shape[0] // 2 if ctx.halves else weight.shape[1]
        forward_weight = _autocast_cast(weight, ctx.dtype)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dout.matmul(pad_hidden(forward_weight, ctx.padded, ctx.halves))
        rows = dout.reshape(-1, dout.shape[-1])
        if ctx.needs_input_grad[1]:
            dweight = unpad_hidden(rows.t().mm(x.reshape(-1, x.shape[-1])), hidden, ctx.halves)
        if ctx.needs_input_grad[2]:
            dbias = unpad_hidden(rows.sum(0), hidden, True) if ctx.halves else rows.sum(0)
        return dx, dweight, dbias, None, None


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own: forward hooks (weight_norm, spectral_norm and pruning register
    them) or backward hooks. Global module hooks are not counted: tools register them (torch's FlopCounterMode,
    profilers), and every fused path would turn off while one is."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` itself (not a subclass, nor a module in its place such as a LoRA
    adapter, a parametrized or a quantized layer) without hooks: a layer whose weight a fused path may read instead
    of calling it. A weight swapped for a tensor subclass in a plain Linear is read as it is."""
    return type(module) is nn.Linear and not has_hooks(module)


def plain_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an ``RMSNorm`` itself without hooks: a norm whose weight and eps a fused op may read
    instead of calling it (``add_and_norm``)."""
    return type(module) is RMSNorm and not has_hooks(module)


class SwiGLU(nn.Module):
    """Linear(W, 2h) -> silu(a) * b -> Linear(h, W), h = int(W * 8/3), parameters in the official shapes.

    On the fused backends a hidden width that is not a multiple of MLP_ALIGN is zero-padded for the compute
    (w12's a and b halves get zero rows, w3 zero columns; the padded units are silu(0) * 0 = 0), so the
    result is the same up to the GEMMs' rounding, and gradients reach the official parameters through the
    pad. The padded weights are rebuilt on each call (about 17M values a Sphere-L block), or once for a whole
    loop inside ``padded_mlp_weights``; a call that needs a gradient keeps the official weights for its backward
    and pads them again there (``_PaddedHiddenLinear``). With ``fused_mlp_enabled`` and no gradient needed, w12 and the
    activation run as ``ops.swiglu_linear`` on the official w12, which writes the padded width itself.
    ``eager`` runs the official shapes, and so does any backend where w12 or w3 is not a plain ``nn.Linear``
    (``plain_linear``: a LoRA adapter, a parametrized, quantized or hooked layer is called, not bypassed)."""

    def __init__(self, width: int):
        super().__init__()
        hidden = int(width * 8 / 3)
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def computes_padded(self, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
        """Whether a call pads the hidden width (asked of plain layers: ``plain_linear``)."""
        if self.w3.in_features % MLP_ALIGN == 0 or dtype == torch.float64:  # float64 runs the eager swiglu anyway
            return False
        return resolve_backend("swiglu", device, None, SWIGLU_AUTO_ORDER) != "eager"

    def runs_fused(self, x: torch.Tensor) -> bool:
        """Whether this call runs ops.swiglu_linear (see fused_mlp_enabled)."""
        return (
            fused_mlp_enabled()
            and triton_refusal(x, self.w12.weight, self.w12.bias) is None
            and resolve_backend("swiglu_linear", x.device, None, SWIGLU_LINEAR_AUTO_ORDER) == "triton"
        )

    @property
    def padded_hidden(self) -> int:
        """The hidden width rounded up to a multiple of MLP_ALIGN: what the fused backends compute with."""
        return self.w3.in_features + -self.w3.in_features % MLP_ALIGN

    def padded_w12(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w12, b12) with each half zero-padded to a multiple of MLP_ALIGN rows."""
        padded = self.padded_hidden
        return pad_hidden(self.w12.weight, padded, True), pad_hidden(self.w12.bias, padded, True)

    def padded_w3(self) -> torch.Tensor:
        """w3 with zero columns up to a multiple of MLP_ALIGN."""
        return pad_hidden(self.w3.weight, self.padded_hidden, False)

    def _loop_weight(self, name: str, make: Callable[[], T]) -> T:
        """make(), or inside padded_mlp_weights (of this thread or task) its result from the loop's first call."""
        loop = None if tracing() else _loop_weights.get()  # dynamo does not trace the context variable
        if loop is None:
            return make()
        kept = loop.setdefault(self, {})
        if name not in kept:
            kept[name] = make()
        return kept[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = padded = False
        if plain_linear(self.w12) and plain_linear(self.w3):
            fused, padded = self.runs_fused(x), self.computes_padded(x.device, x.dtype)
        if not (fused or padded):
            return self.w3(ops.swiglu(self.w12(x)))
        # grad mode asked first: unpacking the parameters costs microseconds a call (the sampler's loop)
        if padded and torch.is_grad_enabled() and needs_grad(x, *self.parameters()) and not plain_op_call():
            # training: the padded weights are made again in the backward, not kept for it
            h = ops.swiglu(_PaddedHiddenLinear.apply(x, self.w12.weight, self.w12.bias, self.padded_hidden, True))
            return _PaddedHiddenLinear.apply(h, self.w3.weight, self.w3.bias, self.padded_hidden, False)
        w3 = self._loop_weight("w3", self.padded_w3) if padded else self.w3.weight
        if fused:
            w12, b12 = weight_like(self.w12.weight, x), weight_like(self.w12.bias, x)
            h = ops.swiglu_linear(x, w12, b12, out_width=w3.shape[1])
        else:
            h = ops.swiglu(F.linear(x, *self._loop_weight("w12", self.padded_w12)))
        return F.linear(h, w3, self.w3.bias)


# The padded weights of the innermost loop open in this thread or task: layer -> {name: weights}
# (padded_mlp_weights); None outside a loop.
_loop_weights: contextvars.ContextVar[dict[SwiGLU, dict[str, Any]] | None] = contextvars.ContextVar(
    "sphere_fast_loop_weights", default=None
)


@contextlib.contextmanager
def padded_mlp_weights() -> Iterator[None]:
    """Inside, each SwiGLU layer that computes with a padded hidden width pads its weights once, at its first call
    in the block, instead of at every call: for loops over fixed weights, such as sampling. Entering costs the
    same for any model (layers join at their first call: walking Sphere-L's modules cost about 1 ms a loop).
    Inside a CUDA-graph capture the pads are part of the graph (once a replay), so in-place weight updates still
    reach it. The weights are kept in a context variable, not on the layers: other threads calling the same model
    (or changing its weights) neither see them nor disturb them."""
    with context_value(_loop_weights, {}):
        yield


# A block's MLP branch and gate (None unconditional), left for the next block or the head to add to the stream
OpenBranch = tuple[torch.Tensor, torch.Tensor | None]


def add_branch(x: torch.Tensor, opened: OpenBranch) -> torch.Tensor:
    """The stream with an open branch added: x + gate * branch (gate None means 1)."""
    branch, gate = opened
    return x + branch if gate is None else x + gate * branch


def add_and_norm(
    x: torch.Tensor,
    opened: OpenBranch | None,
    norm: nn.Module,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, h): the stream with the open branch added (``opened`` None: as it is) and h = norm(stream) *
    (1 + scale) + shift (shift and scale None: norm(stream)). One fused op reading the norm's weight and eps where
    it is a plain RMSNorm (``plain_norm``); else the norm is called, so that its hooks fire and a module in its
    place runs, and the add and the modulation run apart."""
    if plain_norm(norm):
        weight = weight_like(norm.weight, x)
        if opened is None:
            return x, ops.adaln_modulate(x, weight, shift, scale, norm.eps)
        return ops.gated_residual_adaln(x, *opened, weight, shift, scale, norm.eps)
    if opened is not None:
        x = add_branch(x, opened)
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale)
    return x, h if shift is None else h + shift


class Block(nn.Module):
    """Pre-norm AdaLN block. The residual add that closes each sub-layer runs with the norm that opens the next
    (``add_and_norm``): the attention's add with norm2 here, and the MLP's add with the next block's norm1 there
    (or with the head's norm), so that a block uses only its own parameters."""

    def __init__(self, width: int, heads: int, modulated: bool):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.norm2 = RMSNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = SwiGLU(width)
        self.adaLN_modulation = AdaLNModulation(width, 6) if modulated else None

    def forward(
        self,
        x: torch.Tensor,
        opened: OpenBranch | None,
        c: torch.Tensor | None,
        rope: torch.Tensor,
        modulation: Sequence[torch.Tensor | None] | None = None,
        spherify: bool = False,
    ) -> tuple[torch.Tensor, OpenBranch]:
        """The block on the residual stream ``x``, to which the previous block's MLP branch is still to be added
        (``opened``; None before the first block): returns the stream and this block's own open MLP branch.
        ``modulation``: ``self.modulation(c)`` computed before (the sampler's steps share it), else computed here.
        ``spherify``: the stream is projected to the sphere after adding ``opened`` (spherified blocks)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c) if modulation is None else modulation
        if spherify and opened is not None:
            x, opened = ops.spherify(add_branch(x, opened)), None
        x, h = add_and_norm(x, opened, self.norm1, shift1, scale1)
        x, h = add_and_norm(x, (self.attn(h, rope), gate1), self.norm2, shift2, scale2)
        return x, (self.mlp(h), gate2)

    def modulation(self, c: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """(shift1, scale1, gate1, shift2, scale2, gate2); all None for an unconditional block."""
        if self.adaLN_modulation is None:
            return (None,) * 6
        return self.adaLN_modulation(c)


class ModulatedLinear(nn.Module):
    """The official head: RMSNorm + AdaLN modulation + Linear when conditional, a plain Linear otherwise."""

    norm: RMSNorm | None
    adaLN_modulation: AdaLNModulation | None

    def __init__(self, width: int, out_features: int, modulated: bool):
        super().__init__()
        self.linear = nn.Linear(width, out_features)
        if modulated:
            self.norm = RMSNorm(width)
            self.adaLN_modulation = AdaLNModulation(width, 2)
        else:
            self.norm = None
            self.adaLN_modulation = None

    def forward(
        self,
        x: torch.Tensor,
        opened: OpenBranch,
        c: torch.Tensor | None,
        modulation: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The head on the stream ``x`` with the last block's MLP branch still to be added (``opened``).
        ``modulation``: ``self.adaLN_modulation(c)`` computed before, else computed here."""
        if self.norm is None:
            return self.linear(add_branch(x, opened))
        shift, scale = self.adaLN_modulation(c) if modulation is None else modulation
        return self.linear(add_and_norm(x, opened, self.norm, shift, scale)[1])


class Unpatchify(nn.Module):
    """Tokens [B, g * g, channels * p * p] -> a contiguous image [B, channels, g * p, g * p] (the official
    "b (h w) (c p1 p2) -> b c (h p1) (w p2)"): the first step of the decoder's pixel head (the conv head's tokens
    are one pixel each, p = 1)."""

    def __init__(self, grid: int, patch: int):
        super().__init__()
        self.grid, self.patch = grid, patch

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, g, p = h.shape[0], self.grid, self.patch
        return h.reshape(b, g, g, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, g * p, g * p).contiguous()


class LabelEmbedder(nn.Module):
    """Embedding(num_classes + 1, W); the last row is the null label. Label dropout in training."""

    def __init__(self, num_classes: int, width: int, dropout_prob: float = 0.1):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class TokenMixer(nn.Module):
    def __init__(self, tokens: int):
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(tokens, tokens), nn.SiLU(), nn.Linear(tokens, tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x.transpose(1, 2)).transpose(1, 2)


class ChannelMixer(nn.Module):
    def __init__(self, dim: int, expansion: int = 2):
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(dim, expansion * dim), nn.SiLU(), nn.Linear(expansion * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x)


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.tok_mixer = TokenMixer(tokens)
        self.norm2 = RMSNorm(dim)
        self.chn_mixer = ChannelMixer(dim)
        self.alpha1 = nn.Parameter(torch.zeros(1))
        self.alpha2 = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.alpha1 * self.tok_mixer(self.norm1(x))
        return x + self.alpha2 * self.chn_mixer(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer over a latent [B, N, D], ending in RMSNorm (affine or not)."""

    def __init__(self, tokens: int, dim: int, depth: int, affine: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(MixerBlock(tokens, dim) for _ in range(depth))
        self.norm = RMSNorm(dim, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        for block in self.blocks:
            x = block(x)
        return self.norm(x).to(dtype)


def sincos_pos_embed_2d(width: int, grid: int) -> torch.Tensor:
    """MAE-style fixed 2-D sin-cos position embedding [grid*grid, width] (first half: column, second: row)."""
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for the 2-D sin-cos embedding, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


def rope_2d(head_dim: int, grid: int, theta: float = 10000.0) -> torch.Tensor:
    """2-D axial RoPE table [grid*grid, 2*head_dim] = cos | sin; rows fill the first half of each, columns
    the second; frequencies repeated twice for interleaved pairs."""
    if head_dim % 4:
        raise ValueError(f"head dim must be divisible by 4 for 2-D RoPE, got {head_dim}")
    half = head_dim // 2
    freqs = (1.0 / theta ** (torch.arange(0, half, 2).float() / half)).repeat_interleave(2)
    pos = torch.arange(grid).float()
    f_rows = torch.outer(pos, freqs)[:, None, :].expand(grid, grid, half)
    f_cols = torch.outer(pos, freqs)[None, :, :].expand(grid, grid, half)
    angles = torch.cat([f_rows, f_cols], dim=-1).reshape(grid * grid, head_dim)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def xavier_uniform_flat_(weight: torch.Tensor, gain: float = 1.0) -> None:
    """Xavier-uniform on a conv weight seen as [out, in*kh*kw] (fan computed on the flattened view)."""
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.uniform_(-bound, bound)
