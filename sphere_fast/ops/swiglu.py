"""SwiGLU activation: silu(a) * b for h = cat(a, b) on the last dim.

The fused kernels read a and b straight out of h (the Linear output), so the split never materialises;
non-eager backends run the ``sphere_fast::swiglu_fwd`` op (autograd: ``_SwiGLUFunction``, see ``ops/_library.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sphere_fast._once import once_per_key
from sphere_fast.backend import EAGER_DTYPES, emulate_bf16, resolve_for_dtype
from sphere_fast.ops._library import call_op, define_op, differentiable_by, first_order_only
from sphere_fast.ops._util import ceil_div, kernel_runner, next_pow2, on_input_device, unit_last_stride

AUTO_ORDER = ("triton", "cpp", "eager")


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for h = cat(a, b) on the last dim, [..., 2H] -> [..., H], in h's dtype (silu(a) is rounded to
    it before the product)."""
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


def _check_input(h: object) -> None:
    if not isinstance(h, Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in EAGER_DTYPES:
        raise TypeError(f"h must be float32, bfloat16, float16 or float64 (eager only), got {h.dtype}")
    if h.ndim < 1 or h.shape[-1] % 2 != 0 or h.shape[-1] == 0:
        raise ValueError(f"h must have an even, non-zero last dim (cat(a, b)), got shape {tuple(h.shape)}")


def _as_rows(h: Tensor) -> Tensor:
    """[M, 2H] view of h with a unit last stride (copies only when no such view exists)."""
    return unit_last_stride(h.reshape(-1, h.shape[-1]))


def _blocks(H: int) -> tuple[int, int]:
    block_n = min(1024, next_pow2(H))
    return max(1, 2048 // block_n), block_n


FLAT_BLOCK = 1024  # elements a program of the flat forward stores (8 a thread over 4 warps)
INT32_LIMIT = 2**31  # offsets from here on need int64 (slower division in the flat forward)


def _rows_aligned(H: int, stride_h: int, element_size: int) -> bool:
    """Whether every row of a, b and out starts 16-byte aligned (with h so aligned): then the row-tiled kernels
    load and store 128 bits at a time; otherwise only an element or two."""
    return (H * element_size) % 16 == 0 and (stride_h * element_size) % 16 == 0


@on_input_device
def _triton_fwd(h: Tensor) -> Tensor:
    from sphere_fast.kernels.swiglu import swiglu_fwd_flat_kernel, swiglu_fwd_kernel

    h2 = _as_rows(h)
    M, H = h2.shape[0], h2.shape[1] // 2
    out = torch.empty((M, H), dtype=h.dtype, device=h.device)
    if M and _rows_aligned(H, h2.stride(0), h.element_size()):
        block_m, block_n = _blocks(H)
        kernel_runner(swiglu_fwd_kernel, (ceil_div(M, block_m), ceil_div(H, block_n)))(
            h2, out, M, H, h2.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, EMULATE_BF16=emulate_bf16(h.dtype),
            num_warps=4,
        )
    elif M:
        # unaligned rows (H = 2731 on an H200: 61% of copy row-tiled, torch.compile's flat kernel 89%): out in
        # order, so at least its stores are whole 128-bit words
        int64 = max(M * H, (M - 1) * h2.stride(0) + 2 * H) + FLAT_BLOCK >= INT32_LIMIT
        kernel_runner(swiglu_fwd_flat_kernel, (ceil_div(M * H, FLAT_BLOCK),))(
            h2, out, M * H, H, h2.stride(0), BLOCK=FLAT_BLOCK, INT64=int64, EMULATE_BF16=emulate_bf16(h.dtype),
            num_warps=4,
        )
    return out.view(*h.shape[:-1], H)


@on_input_device
def _triton_bwd(dout: Tensor, h: Tensor) -> Tensor:
    from sphere_fast.kernels.swiglu import swiglu_bwd_kernel

    h2 = _as_rows(h)
    M, H = h2.shape[0], h2.shape[1] // 2
    dout = dout.reshape(M, H).contiguous()
    dh = torch.empty((M, 2 * H), dtype=h.dtype, device=h.device)
    if M:
        block_m, block_n = _blocks(H)
        kernel_runner(swiglu_bwd_kernel, (ceil_div(M, block_m), ceil_div(H, block_n)))(
            dout, h2, dh, M, H, h2.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, EMULATE_BF16=emulate_bf16(h.dtype),
            num_warps=4,
        )
    return dh.view(h.shape)


@once_per_key
def _cpp_ext():
    from sphere_fast._extension import load_ops

    return load_ops("sphere_fast_swiglu_ext", ("swiglu_binding.cpp", "swiglu_cpu.cpp"), ("swiglu_cuda.cu",),
                    "sphere_fast_swiglu", {"fwd": _fwd_fake, "bwd": _bwd_fake})


# Fake kernels of both the sphere_fast ops and the C++ ones under them ([M, 2H] h, no backend argument).
def _fwd_fake(h, backend=None):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


def _bwd_fake(dout, h, backend=None):
    return h.new_empty(h.shape)


@define_op("swiglu_fwd", fake=_fwd_fake, own_autograd=True)
def _swiglu_fwd(h: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        return _triton_fwd(h)
    if backend == "cpp":
        out = _cpp_ext().fwd(_as_rows(h))
        return out.view(*h.shape[:-1], h.shape[-1] // 2)
    raise ValueError(f"no fused swiglu kernels for backend {backend!r}")


@define_op("swiglu_bwd", fake=_bwd_fake)
def _swiglu_bwd(dout: Tensor, h: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        return _triton_bwd(dout, h)
    if backend == "cpp":
        h2 = _as_rows(h)
        M, H = h2.shape[0], h2.shape[1] // 2  # not reshape(M, -1): -1 is ambiguous when M = 0
        return _cpp_ext().bwd(dout.reshape(M, H).contiguous(), h2).view(h.shape)
    raise ValueError(f"no fused swiglu kernels for backend {backend!r}")


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, backend: str) -> Tensor:
        ctx.save_for_backward(h)
        ctx.backend = backend
        return call_op(_swiglu_fwd, h, backend)

    @staticmethod
    @first_order_only("swiglu")
    def backward(ctx, dout: Tensor) -> tuple[Tensor, None]:
        (h,) = ctx.saved_tensors
        return _swiglu_bwd(dout, h, ctx.backend), None


differentiable_by(_swiglu_fwd, _SwiGLUFunction)


def swiglu(h: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(a) * b for h = cat(a, b) on the last dim: [..., 2H] -> [..., H] (H may be odd)."""
    _check_input(h)
    name = resolve_for_dtype("swiglu", "h", h, backend, AUTO_ORDER)
    if name == "eager":
        return swiglu_reference(h)
    return call_op(_swiglu_fwd, h, name)
