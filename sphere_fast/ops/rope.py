"""2-D axial RoPE on q and k (official layout: a [N, 2D] float32 table cos | sin, interleaved pairs).

``apply_rope(q, k, rope)`` rotates both in one pass: [B, H, N, D] strided views in (the model's views of its
qkv projection), two [B, H, N, D] tensors with [B, N, H, D] memory out, in the input dtype (fp32 math, one
rounding, as the reference's ``.to(dtype)``). Attention runs it before a RoPE-free kernel. Backend ``triton``
runs the Triton kernel (``kernels/rope.py``) as the ``sphere_fast::rope_fwd`` op, whose backward
(``_RopeFunction``) is the same kernel transposed; ``eager`` is the reference below (float64 too, in float64);
``auto`` is triton on CUDA but for float64, eager on CPU. There is no C++ kernel for RoPE: ``cpp`` is resolved as
``auto`` (``requested_cpp_as_auto``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sphere_fast.backend import (
    EAGER_DTYPES,
    emulate_bf16,
    requested_cpp_as_auto,
    resolve_for_dtype,
    triton_interpreting,
)
from sphere_fast.ops._library import call_op, define_op, differentiable_by, first_order_only, grad_only_from
from sphere_fast.ops._util import bnhd_empty, ceil_div, kernel_runner, next_pow2, on_input_device, unit_last_stride

AUTO_ORDER = ("triton", "eager")


def rotate_pairs(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on interleaved pairs of the last dim."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotate_reference(x: Tensor, rope: Tensor) -> Tensor:
    """x [B, H, N, D], rope [N, 2D] = cos | sin; float32 out for float32 rope (round it to x's dtype)."""
    cos, sin = rope.chunk(2, dim=-1)
    return x * cos + rotate_pairs(x) * sin


def apply_rope_reference(q: Tensor, k: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
    """q and k rotated in float32 (float64 in float64) and rounded back to their dtype (what attention's reference
    does)."""
    return rotate_reference(q, rope).to(q.dtype), rotate_reference(k, rope).to(k.dtype)


def rope_table_reference(n: int, d: int, device: torch.device | str) -> Tensor:
    """The official 2-D axial RoPE [n, 2d] (cos | sin) for n tokens on a ceil(sqrt(n))-wide grid, any n: half = d/2,
    freqs = 1/10000^(arange(0, half, 2)/half) repeated twice; rows fill the first half, columns the last.
    Built in float64 (tests and benchmarks compare against it), returned as float32."""
    if d % 4:  # rows and columns each take d/2 columns of interleaved pairs
        raise ValueError(f"rope_table_reference: d must be divisible by 4 for 2-D RoPE, got {d}")
    half = d // 2
    freqs = (1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float64) / half)).repeat_interleave(2)
    side = math.ceil(math.sqrt(n))
    idx = torch.arange(n, dtype=torch.float64)
    angles = torch.cat([(idx // side)[:, None] * freqs, (idx % side)[:, None] * freqs], dim=-1)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(device)


def check_rope_table(rope: object, q: Tensor, op: str) -> None:
    """The table ``op`` needs for q [B, H, N, D]: a float32 tensor [N, 2D] on q's device, D even."""
    if not isinstance(rope, Tensor):
        raise TypeError(f"{op}: rope must be a torch.Tensor or None, got {type(rope).__name__}")
    n, d = q.shape[2], q.shape[3]
    if d % 2:
        raise ValueError(f"{op}: rope needs an even head dim (interleaved pairs), got head dim {d}")
    if tuple(rope.shape) != (n, 2 * d):
        raise ValueError(f"{op}: rope must be [N, 2*D] = [{n}, {2 * d}] (cos | sin), got {tuple(rope.shape)}")
    if rope.dtype != torch.float32:
        raise TypeError(f"{op}: rope must be float32, got {rope.dtype}")
    if rope.device != q.device:
        raise ValueError(f"{op}: rope must be on q's device {q.device}, got {rope.device}")


def _check_inputs(q: object, k: object, rope: object) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"apply_rope: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"apply_rope: {name} must be [B, H, N, D] (4-D), got shape {tuple(t.shape)}")
        if t.dtype not in EAGER_DTYPES:
            raise TypeError(
                f"apply_rope: {name} must be float16, bfloat16, float32 or float64 (eager only), got {t.dtype}"
            )
    if k.dtype != q.dtype:
        raise TypeError(f"apply_rope: k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.shape != q.shape or k.device != q.device:
        raise ValueError(
            f"apply_rope: k must match q's shape and device {tuple(q.shape)} {q.device}, "
            f"got {tuple(k.shape)} {k.device}"
        )
    check_rope_table(rope, q, "apply_rope")


def _launch_config(head_dim: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_N, D_PAD): about 4096 elements a tile on the GPU, small tiles in the interpreter."""
    d_pad = next_pow2(head_dim)
    return (16 if interpret else max(16, 4096 // d_pad)), d_pad


@on_input_device
def _triton_rope(q: Tensor, k: Tensor, rope: Tensor, transpose: bool) -> tuple[Tensor, Tensor]:
    from sphere_fast.kernels.rope import rope_kernel

    q, k = unit_last_stride(q), unit_last_stride(k)
    qo, ko = bnhd_empty(q), bnhd_empty(q)
    b, h, n, d = q.shape
    if qo.numel():
        block_n, d_pad = _launch_config(d, triton_interpreting())
        kernel_runner(rope_kernel, (b * h, ceil_div(n, block_n)))(
            q, k, qo, ko, rope.contiguous(),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2),
            h, n, HEAD_DIM=d, D_PAD=d_pad, BLOCK_N=block_n, TRANSPOSE=transpose,
            EMULATE_BF16=emulate_bf16(q.dtype), num_warps=4,
        )
    return qo, ko


def _rope_fake(q, k, rope):
    return bnhd_empty(q), bnhd_empty(q)


@define_op("rope_fwd", fake=_rope_fake, own_autograd=True)
def rope_fwd(q: Tensor, k: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
    """(R q, R k) with R the rotation of ``rope``: the fused Triton pass."""
    return _triton_rope(q, k, rope, False)


@define_op("rope_bwd", fake=_rope_fake)
def rope_bwd(dq: Tensor, dk: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
    """(R^T dq, R^T dk): the gradients w.r.t. the un-rotated q and k."""
    return _triton_rope(dq, dk, rope, True)


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(rope)
        return call_op(rope_fwd, q, k, rope)

    @staticmethod
    @first_order_only("apply_rope")
    def backward(ctx, dq: Tensor, dk: Tensor) -> tuple[Tensor, Tensor, None]:
        # an output the loss does not use arrives as zeros (autograd materialises them: materialize_grads)
        (rope,) = ctx.saved_tensors
        return *rope_bwd(dq, dk, rope), None


differentiable_by(rope_fwd, _RopeFunction, constants=("rope",))


def apply_rope(q: Tensor, k: Tensor, rope: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """q and k [B, H, N, D] (strided views allowed, same shape and dtype) rotated by ``rope`` [N, 2D] float32
    (cos | sin, interleaved pairs): (q_rot, k_rot) in q's dtype. The table is a constant: no gradient. Backend
    ``cpp`` (no C++ kernel for RoPE) runs what ``auto`` does: the Triton kernel on CUDA, the reference on CPU."""
    _check_inputs(q, k, rope)
    return rope_pass(q, k, rope, backend)


def rope_backend(q: Tensor, rope: Tensor, backend: str | None) -> str:
    """The backend ``rope_pass`` runs for these (checked) inputs: "eager" or "triton"."""
    requested = requested_cpp_as_auto("rope", backend)
    table_needs_grad = rope.requires_grad and torch.is_grad_enabled()
    # auto must not refuse what eager takes: a table that needs a gradient goes to the reference (as float64 does)
    name = resolve_for_dtype("rope", "q", q, requested, () if table_needs_grad and requested == "auto" else AUTO_ORDER)
    if name != "eager" and table_needs_grad:
        raise ValueError("apply_rope: rope must not require grad on the fused backends (it is a constant table)")
    return name


def rope_pass(q: Tensor, k: Tensor, rope: Tensor, backend: str | None) -> tuple[Tensor, Tensor]:
    """``apply_rope`` without its input checks, for a caller that made them (attention, on every call)."""
    if rope_backend(q, rope, backend) == "eager":
        return apply_rope_reference(q, k, rope)
    q_rot, k_rot = call_op(rope_fwd, q, k, rope)
    return grad_only_from(q_rot, q), grad_only_from(k_rot, k)
