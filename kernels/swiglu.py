"""Triton kernels for SwiGLU: out = silu(a) * b where h = cat(a, b) on the last dim.

Raw device code only; launchers and autograd live in ``sphere_fast/ops/swiglu.py``. h is [M, 2H] with row
stride ``stride_h`` and a unit last stride, so the split costs nothing: a is columns [0, H), b is [H, 2H).
Math in fp32, one rounding to the output dtype (to nearest even in the interpreter too: EMULATE_BF16, set by the
launcher there for bf16).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sphere_fast.kernels.rounding import to_dtype


@triton.jit
def swiglu_fwd_kernel(
    H_PTR, OUT, M, H, stride_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    h_off = rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    a = tl.load(H_PTR + h_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(H_PTR + h_off + H, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    out = to_dtype(out, OUT.dtype.element_ty, EMULATE_BF16)
    tl.store(OUT + rows.to(tl.int64)[:, None] * H + cols[None, :], out, mask=mask)


@triton.jit
def swiglu_fwd_flat_kernel(
    H_PTR, OUT, N, H, stride_h, BLOCK: tl.constexpr, INT64: tl.constexpr, EMULATE_BF16: tl.constexpr
):
    """The forward over out's N = M*H elements in order (rows whose bytes are not a multiple of 16): each block
    stores BLOCK contiguous, aligned elements (128-bit stores), and finds its a and b by row and column."""
    start = tl.program_id(0).to(tl.int64) * BLOCK if INT64 else tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    rows = offs // H
    h_off = rows * stride_h + (offs - rows * H)
    a = tl.load(H_PTR + h_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(H_PTR + h_off + H, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, to_dtype(a * tl.sigmoid(a) * b, OUT.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    DOUT, H_PTR, DH, M, H, stride_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_off = r64 * stride_h + cols[None, :]
    a = tl.load(H_PTR + h_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(H_PTR + h_off + H, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + r64 * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    # silu'(a) = sig * (1 + a * (1 - sig))
    da = dout * b * sig * (1.0 + a * (1.0 - sig))
    db = dout * (a * sig)  # silu(a) first: dout * a may overflow where silu(a) is 0
    dh_off = r64 * (2 * H) + cols[None, :]
    tl.store(DH + dh_off, to_dtype(da, DH.dtype.element_ty, EMULATE_BF16), mask=mask)
    tl.store(DH + dh_off + H, to_dtype(db, DH.dtype.element_ty, EMULATE_BF16), mask=mask)
