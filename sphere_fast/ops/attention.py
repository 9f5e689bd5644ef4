"""Non-causal attention with 2-D axial RoPE applied to q and k (official layout: cos | sin, interleaved pairs).

Implementations ("impl"), all computing softmax(rope(q) rope(k)^T / sqrt(D)) v on [B, H, N, D]:
  ``sdpa``        RoPE pass + ``torch.nn.functional.scaled_dot_product_attention`` (torch picks its own
                  flash / efficient / cuDNN / math kernel). On backend ``eager`` the RoPE is the eager
                  reference and this is the reference itself.
  ``triton``      the fused Triton RoPE pass (``ops/rope.py``) + the Triton flash-attention kernel in
                  ``kernels/attention.py`` (``torch.ops.sphere_fast.attention_triton_fwd/_bwd``). What backend
                  ``triton`` runs.
  ``flash_attn``  RoPE pass + the flash-attn package, only when it is importable (CUDA, fp16/bf16).
The RoPE pass is the Triton kernel, except on backend ``eager`` (and on CPU under ``auto``), where it is the
eager reference. Attention has no C++ kernel of its own: backend ``cpp`` means the vendor C++/CUDA kernels,
i.e. ``flash_attn`` when usable, else ``sdpa``. ``auto`` (on CUDA) takes ``triton`` when the head dim is
a supported power of two, ``sdpa`` for the other head dims the kernel supports (it pads them: 3x slower than
cuDNN at D = 72), else ``flash_attn``, else ``sdpa``; on CPU it is ``sdpa``. ``impl=`` on a call overrides the
backend. The choice is memoized, logged when first made, and returned by ``attention_impl``. On a GPU the
Triton kernels' launch configs are tuned per call shape (``_candidates``, ``ops/_tuning.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sphere_fast._once import once_per_key
from sphere_fast.backend import (
    EAGER_DTYPES,
    KERNEL_DTYPES,
    auto_order_for,
    autodiff_transform,
    beyond_first_order_reverse,
    constant_under_compile,
    emulate_bf16,
    kernel_dtype_error,
    requested_backend,
    resolve_backend,
    tracing,
    triton_interpreting,
    triton_usable,
)
from sphere_fast.ops._library import call_op, define_op, differentiable_by, first_order_only, needs_grad, plain_op_call
from sphere_fast.ops._tuning import launch_tuned
from sphere_fast.ops._util import bnhd_empty, ceil_div, kernel_runner, next_pow2, on_input_device, unit_last_stride
from sphere_fast.ops.rope import apply_rope_reference, check_rope_table, rope_backend, rope_bwd, rope_fwd, rope_pass

AUTO_ORDER = ("triton", "eager")
IMPLS = ("sdpa", "triton", "flash_attn")
TRITON_HEAD_DIMS = "even head dims from 16 to 128"

logger = logging.getLogger("sphere_fast")


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over [B, H, N, D], q and k first rotated by the RoPE table when given. A row
    whose scores hold an inf is torch SDPA's choice: NaN, except from its CPU kernels in bf16 / fp16 at some sizes,
    which give zeros (the Triton kernel: NaN)."""
    if rope is not None:
        q, k = apply_rope_reference(q, k, rope)
    return _differentiable_sdpa(q, k, v)


def _differentiable_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's SDPA, on its math kernel where a derivative other than a first-order gradient may be taken: float64
    (gradcheck and gradgradcheck), forward-mode AD and the torch.func transforms that take one or nest gradients
    (``beyond_first_order_reverse``). Its flash and efficient kernels (the CPU's too) have neither a forward-mode
    nor a second-order derivative; the math kernel keeps the [B, H, N, N] scores. A first-order gradient in float32
    or a half type that is then differentiated (create_graph=True) needs the caller's
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: the forward cannot know it."""
    if not tracing() and (q.dtype == torch.float64 or beyond_first_order_reverse()):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------------------------------------- checks


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, H, N, D] (4-D), got shape {tuple(t.shape)}")
        if t.dtype not in EAGER_DTYPES:
            raise TypeError(
                f"attention: {name} must be float16, bfloat16, float32 or float64 (sdpa only), got {t.dtype}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"attention: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} must be on q's device {q.device}, got {t.device}")
    if rope is not None:
        check_rope_table(rope, q, "attention")


def triton_supports_head_dim(head_dim: int) -> bool:
    return head_dim % 2 == 0 and 16 <= head_dim <= 128


@functools.cache
def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attn_usable(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    return (
        flash_attn_importable()
        and device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def attention_impls(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, head_dim: int = 64
) -> list[str]:
    """The implementations that can run attention for this device, dtype and head dim."""
    device = torch.device(device)
    names = ["sdpa"]
    if triton_usable(device) and triton_supports_head_dim(head_dim) and dtype in KERNEL_DTYPES:
        names.append("triton")
    if _flash_attn_usable(device.type, dtype, head_dim):
        names.append("flash_attn")
    return names


def auto_takes_triton(head_dim: int) -> bool:
    """Under ``auto``, the Triton kernel runs power-of-two head dims only. Another even head dim runs padded to
    the next power of two (``_head_chunks``): on an H200 at D = 72 its forward took 0.966 ms against 0.313 ms
    for SDPA's cuDNN kernel (at D = 64: 0.212 against 0.201; benchmarks/NOTES.md, 2026-11-29)."""
    return head_dim & (head_dim - 1) == 0


def _tf32_allowed() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


@constant_under_compile
def _choose_impl(device: torch.device, dtype: torch.dtype, head_dim: int, backend: str | None, impl: str | None) -> str:
    # a constant under torch.compile: runs once at trace time, so the logging below breaks no graph
    requested = requested_backend("attention", backend)
    # flash-attn's autograd.Function has neither a jvp nor functorch's setup_context either
    if impl in ("triton", "flash_attn") and (transform := autodiff_transform()) is not None:
        raise NotImplementedError(f"attention: impl {impl!r} cannot run under {transform}; use impl 'sdpa'")
    return _choose(device.type, dtype, head_dim, requested, impl, _tf32_allowed(), triton_interpreting())


@once_per_key
def _choose(
    device_type: str, dtype: torch.dtype, head_dim: int, requested: str, impl: str | None, tf32: bool,
    interpreting: bool,
) -> str:
    # Memoized (every call chooses; the answer depends only on these arguments). Logged when first computed.
    usable = attention_impls(device_type, dtype, head_dim)
    if impl is not None:
        if not isinstance(impl, str):
            raise TypeError(f"attention: impl must be one of {IMPLS}, got {impl!r}")
        if impl not in IMPLS:
            raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")
        if impl not in usable:
            raise ValueError(
                f"attention: impl {impl!r} cannot run on {device_type} with {dtype}, head dim {head_dim} (usable: "
                f"{usable}; triton takes {TRITON_HEAD_DIMS} in fp32/bf16/fp16, flash_attn needs CUDA fp16/bf16)"
            )
        name, why = impl, "impl="
    else:
        order = auto_order_for(dtype, AUTO_ORDER)  # float64: sdpa
        resolved = resolve_backend("attention", torch.device(device_type), requested, order)
        why = f"backend {resolved}" + (" via auto" if requested == "auto" else "")
        if requested == "auto" and resolved == "triton" and dtype == torch.float32 and not tf32:
            # The Triton dots run fp32 in TF32: auto keeps torch's exact fp32 unless the user allowed TF32.
            resolved, why = "eager", why + ", fp32 without TF32 (torch.set_float32_matmul_precision)"
        if resolved == "eager":
            name = "sdpa"
        elif resolved == "cpp":
            name = "flash_attn" if "flash_attn" in usable else "sdpa"
        elif requested == "triton" and dtype not in KERNEL_DTYPES:
            raise kernel_dtype_error("attention", "q", dtype, "triton")
        elif "triton" in usable and (requested == "triton" or auto_takes_triton(head_dim)):
            name = "triton"
        elif requested == "triton":
            raise ValueError(f"attention: head dim {head_dim} is not supported by triton ({TRITON_HEAD_DIMS})")
        elif "triton" in usable:
            name, why = "sdpa", why + f", head dim {head_dim} is not a power of two"
        else:
            name = "flash_attn" if "flash_attn" in usable else "sdpa"
    logger.info("sphere_fast: attention on %s uses impl %s (%s)", device_type, name, why)
    return name


def attention_impl(q: torch.Tensor, *, backend: str | None = None, impl: str | None = None) -> str:
    """Which of ``IMPLS`` ``attention`` runs for inputs like ``q``."""
    # operator.index: a plain int under torch.compile too (dynamic=True makes the head dim symbolic, which a
    # constant-result function cannot take); the graph then guards on it
    return _choose_impl(q.device, q.dtype, operator.index(q.shape[-1]), backend, impl)


# -------------------------------------------------------------------------------------- triton launch


def _head_chunks(head_dim: int) -> tuple[int, int, bool]:
    """(DA, DB, HAS_B): DA = largest power of two <= D; DB = DA when D is not a power of two (the rest is
    masked), as a narrower chunk B (64 + 16 for D = 72 or 80) miscompiled on an H200 with Triton 3.6
    (benchmarks/tune_attention.py times a 32-wide one)."""
    da = 1 << (head_dim.bit_length() - 1)
    return da, da, head_dim != da


Config = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages


class TmaConfig(NamedTuple):
    """A forward launch config of attention_fwd_tma_kernel, which loads the q, k, v tiles through tensor
    descriptors (the TMA on Hopper), with Triton's warp specialization or without. It runs where the pointer
    kernel would take its EVEN_N path on one head-dim chunk: a power-of-two head dim, N a multiple of both
    blocks, and the model's layout (``_config_applies``). With the same blocks as a pointer config
    it computes the same sums in the same order. Not among the default candidates until it is measured:
    benchmarks/tune_attention.py times it."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    warp_specialize: bool


# Hopper fp16/bf16 candidates per padded head width, the default first: tiles that compile for sm_90a without
# local-memory spills and fit shared memory (tests/test_sm90_attention.py checks each).
_HOPPER_CANDIDATES: dict[int, dict[str, tuple[Config, ...]]] = {
    64: {
        "fwd": ((128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)),
        "dkdv": ((32, 128, 8, 3), (32, 64, 4, 3), (32, 128, 4, 3)),
        "dq": ((128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 4, 3)),
    },
    128: {
        "fwd": ((128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)),
        "dkdv": ((32, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2)),
        "dq": ((64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)),
    },
}


def _candidates(head_dim: int, dtype: torch.dtype, interpret: bool | None = None) -> dict[str, tuple[Config, ...]]:
    """Launch configs of the fwd, dkdv and dq kernels, the default first; on a GPU each call shape takes the
    fastest (ops/_tuning.py times them once).

    The candidates of a kernel keep the block it sums over (the key block of fwd and dq, the query block of
    dkdv) and change only the block a program owns, warps and stages, so they all compute the same sums in the
    same order (the tuning drops one that changes a bit; tests/test_tuning.py checks them all on a GPU).
    Interpreter: one small square config (fast on CPU, and N = 17 / 64 exercise tails and several blocks).
    fp32 (a correctness path, TF32 dots): one config that fits shared memory; its backward spills at head
    dims above 64.
    """
    if triton_interpreting() if interpret is None else interpret:
        return {"fwd": ((32, 32, 4, 1),), "dkdv": ((32, 32, 4, 1),), "dq": ((32, 32, 4, 1),)}
    if dtype == torch.float32:
        return {"fwd": ((64, 64, 4, 2),), "dkdv": ((32, 64, 8, 2),), "dq": ((64, 32, 8, 2),)}
    da, db, has_b = _head_chunks(head_dim)
    return _HOPPER_CANDIDATES[64 if (da + db if has_b else da) <= 64 else 128]


def _tile_grid(n: int, block: int, b: int, h: int) -> tuple[int, int, int]:
    """The grid of the kernels in kernels/attention.py: (tiles of ``block`` rows, heads, batch)."""
    return ceil_div(n, block), h, b


# Sequences one launch takes. Grid axis z runs over the batch, and CUDA allows 65535 programs there; a power of two,
# so that each slice of a larger batch starts as aligned as the whole (and runs the same compiled kernel).
LAUNCH_BATCH = 32768


def _over_batch(launch: Callable[..., None], *tensors: torch.Tensor) -> None:
    """``launch(*tensors)`` on the whole batch, or on consecutive slices of LAUNCH_BATCH sequences of each
    tensor where the batch is larger."""
    b = tensors[0].shape[0]
    if b <= LAUNCH_BATCH:
        launch(*tensors)
        return
    for start in range(0, b, LAUNCH_BATCH):
        launch(*(t[start:start + LAUNCH_BATCH] for t in tensors))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _config_applies(config: Config | TmaConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a forward config can run on these inputs: pointer configs always; a TmaConfig where its kernel
    applies (see TmaConfig) and its descriptors can be made: tensors whose memory is a [B*N, H*D] matrix
    (the model's views of its qkv projection: heads adjacent in a token's row, batches N rows apart), 16-byte
    aligned."""
    if not isinstance(config, TmaConfig):
        return True
    h, n, d = q.shape[1:]

    def bnhd(t: torch.Tensor) -> bool:
        sb, sh, sn, sd = t.stride()
        aligned = t.data_ptr() % 16 == 0 and all(stride * t.element_size() % 16 == 0 for stride in (sb, sh, sn))
        return aligned and sd == 1 and sh == d and sn >= h * d and sb == n * sn

    shapes = n % config.block_m == 0 and n % config.block_n == 0 and d & (d - 1) == 0
    return shapes and all(bnhd(t) for t in (q, k, v))


def _descriptors(config: TmaConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list:
    """Descriptors of q, k and v as [B*N, H*D] matrices (rows: tokens; a block: block_m rows of q, block_n of k
    and v, of one head's D columns). 2-D, as Triton's warp specialization rejected the reshape of a 4-D block."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, n, d = q.shape
    return [TensorDescriptor(t, [b * n, h * d], [t.stride(2), 1], [rows, d])
            for t, rows in ((q, config.block_m), (k, config.block_n), (v, config.block_n))]


def _tuning_key(kernel: str, q: torch.Tensor) -> tuple:
    # B*H in powers of two: how many programs fill the GPU decides the best tile, batch by batch bucket
    b, h, n, d = q.shape
    return (kernel, q.device, q.dtype, d, n, next_pow2(b * h))


@on_input_device
def _triton_forward(q, k, v):
    from sphere_fast.kernels.attention import attention_fwd_kernel, attention_fwd_tma_kernel

    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    b, h, n, d = q.shape
    o = bnhd_empty(q)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    da, db, has_b = _head_chunks(d)
    emulate = emulate_bf16(q.dtype)
    qk_scale = math.log2(math.e) / math.sqrt(d)

    def launch(config: Config | TmaConfig, compile_only: bool = False) -> None:
        block_m, block_n, warps, stages = config[:4]

        def on_slice(q, k, v, o, lse) -> None:
            grid = _tile_grid(n, block_m, q.shape[0], h)
            if isinstance(config, TmaConfig):
                kernel_runner(attention_fwd_tma_kernel, grid, compile_only)(
                    *_descriptors(config, q, k, v), o, lse, *_strides(o), h, n, qk_scale,
                    HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, WARP_SPECIALIZE=config.warp_specialize,
                    EMULATE_BF16=emulate, num_warps=warps, num_stages=stages,
                )
                return
            kernel_runner(attention_fwd_kernel, grid, compile_only)(
                q, k, v, o, lse,
                *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                h, n, qk_scale,
                HEAD_DIM=d, DA=da, DB=db, HAS_B=has_b, BLOCK_M=block_m, BLOCK_N=block_n,
                EMULATE_BF16=emulate, EVEN_N=n % block_n == 0, num_warps=warps, num_stages=stages,
            )

        _over_batch(on_slice, q, k, v, o, lse)

    candidates = [c for c in _candidates(d, q.dtype)["fwd"] if _config_applies(c, q, k, v)]
    if not candidates:
        raise ValueError(f"attention: no forward launch config applies to q {tuple(q.shape)}: the tensor-descriptor "
                         "configs need one power-of-two head-dim chunk, N a multiple of their blocks and 16-byte "
                         "aligned [B*N, H*D] memory")
    key = _tuning_key("attention fwd", q)
    launch_tuned(key, candidates, launch, (o, lse))
    return o, lse


@on_input_device
def _triton_backward(do, q, k, v, o, lse):
    from sphere_fast.kernels.attention import (
        attention_bwd_dkdv_kernel,
        attention_bwd_dq_kernel,
        attention_bwd_preprocess_kernel,
    )

    do, q, k, v = (unit_last_stride(t) for t in (do, q, k, v))
    b, h, n, d = q.shape
    dq, dk, dv = bnhd_empty(q), bnhd_empty(q), bnhd_empty(q)
    if q.numel() == 0:
        return dq, dk, dv
    da, db, has_b = _head_chunks(d)
    candidates = _candidates(d, q.dtype)
    emulate = emulate_bf16(q.dtype)
    sm_scale = 1.0 / math.sqrt(d)
    qk_scale = math.log2(math.e) * sm_scale
    common = dict(HEAD_DIM=d, DA=da, DB=db, HAS_B=has_b, EMULATE_BF16=emulate)

    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)

    def preprocess(o, do, delta) -> None:
        kernel_runner(attention_bwd_preprocess_kernel, _tile_grid(n, 64, o.shape[0], h))(
            o, do, delta, *_strides(o), *_strides(do), h, n,
            HEAD_DIM=d, D_PAD=next_pow2(d), BLOCK_M=64,
        )

    _over_batch(preprocess, o, do, delta)

    def launch_dkdv(config: Config, compile_only: bool = False) -> None:
        block_m, block_n, warps, stages = config

        def on_slice(q, k, v, do, dk, dv, lse, delta) -> None:
            kernel_runner(attention_bwd_dkdv_kernel, _tile_grid(n, block_n, q.shape[0], h), compile_only)(
                q, k, v, do, dk, dv, lse, delta,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                h, n, qk_scale, sm_scale,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
            )

        _over_batch(on_slice, q, k, v, do, dk, dv, lse, delta)

    def launch_dq(config: Config, compile_only: bool = False) -> None:
        block_m, block_n, warps, stages = config

        def on_slice(q, k, v, do, dq, lse, delta) -> None:
            kernel_runner(attention_bwd_dq_kernel, _tile_grid(n, block_m, q.shape[0], h), compile_only)(
                q, k, v, do, dq, lse, delta,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                h, n, qk_scale, sm_scale,
                BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=n % block_n == 0, num_warps=warps, num_stages=stages,
                **common,
            )

        _over_batch(on_slice, q, k, v, do, dq, lse, delta)

    for name, launch, outputs in (("dkdv", launch_dkdv, (dk, dv)), ("dq", launch_dq, (dq,))):
        key = _tuning_key(f"attention {name}", q)
        launch_tuned(key, candidates[name], launch, outputs)
    return dq, dk, dv


def _fwd_fake(q, k, v):
    return bnhd_empty(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(do, q, k, v, o, lse):
    return bnhd_empty(q), bnhd_empty(q), bnhd_empty(q)


@define_op("attention_triton_fwd", fake=_fwd_fake, own_autograd=True)
def attention_triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward: (o [B, H, N, D], lse [B, H, N] float32, log2-based)."""
    return _triton_forward(q, k, v)


@define_op("attention_triton_bwd", fake=_bwd_fake)
def attention_triton_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward: (dq, dk, dv)."""
    return _triton_backward(do, q, k, v, o, lse)


class _TritonAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse = call_op(attention_triton_fwd, q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @first_order_only("attention")
    def backward(ctx, do: torch.Tensor, _dlse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, o, lse = ctx.saved_tensors
        return attention_triton_bwd(do, q, k, v, o, lse)


differentiable_by(attention_triton_fwd, _TritonAttentionFunction)


def _triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return call_op(attention_triton_fwd, q, k, v)[0]


class _RopePassAttentionFunction(torch.autograd.Function):
    """Impl ``triton`` with a gradient: the RoPE pass and the kernel as one autograd node that keeps q and k as
    given and rotates them again in the backward, where the two nodes kept the rotated copies: 2 B N H D values
    less a layer until the backward (the model's q and k are views of its qkv projection, which v keeps anyway),
    for one more RoPE pass. The same kernels on the same values: the same bits as the two nodes. As SDPA's, its
    backward refuses q or k changed in place since the forward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        o, lse = call_op(attention_triton_fwd, *call_op(rope_fwd, q, k, rope), v)
        ctx.save_for_backward(q, k, v, o, lse, rope)
        return o

    @staticmethod
    @first_order_only("attention")
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, None]:
        q, k, v, o, lse, rope = ctx.saved_tensors
        dq, dk, dv = attention_triton_bwd(do, *call_op(rope_fwd, q, k, rope), v, o, lse)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):  # v's alone: no RoPE pass back
            return None, None, dv, None
        return *rope_bwd(dq, dk, rope), dv, None


# ------------------------------------------------------------------------------------------ public op


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on [B, H, N, D] (strided views allowed), with q and k rotated by
    ``rope`` [N, 2D] float32 (cos | sin, interleaved pairs) first. ``impl`` forces one of ``IMPLS``. The
    Triton kernel's float32 dots run in TF32, so under ``auto`` float32 inputs take SDPA unless TF32 is
    allowed (``torch.set_float32_matmul_precision("high")``). float64 runs on SDPA only (``auto`` takes it)."""
    _check_inputs(q, k, v, rope)
    name = attention_impl(q, backend=backend, impl=impl)
    if rope is not None:
        one_node = name == "triton" and needs_grad(q, k, v) and not plain_op_call()
        if one_node and rope_backend(q, rope, backend) == "triton":
            return _RopePassAttentionFunction.apply(q, k, v, rope)
        # the requested backend's pass (cpp, with no RoPE kernel: auto's, which takes Triton's on CUDA but for a
        # table that requires grad)
        q, k = rope_pass(q, k, rope, backend)  # inputs checked above
    if name == "triton":
        return _triton_attention(q, k, v)
    if name == "flash_attn":
        from flash_attn import flash_attn_func

        # flash-attn wants [B, N, H, D]: a transpose view, no copy
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return _sdpa(q, k, v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's SDPA, a batch of more than LAUNCH_BATCH sequences in slices: on an H200 (torch 2.11) its cuDNN
    backward failed ("mha_graph.execute ... is_good()") at 65600 sequences a call. Each slice has a backward of
    its own, and each sequence's result is what one call gives."""
    b = q.shape[0]
    if b <= LAUNCH_BATCH:
        return _differentiable_sdpa(q, k, v)
    return torch.cat([_differentiable_sdpa(*(t[i:i + LAUNCH_BATCH] for t in (q, k, v)))
                      for i in range(0, b, LAUNCH_BATCH)])
