"""Triton kernel for 2-D RoPE on q and k in one pass (and its transpose, for the backward).

Raw device code only; launchers and autograd live in ``sphere_fast/ops/rope.py``. q and k are [B, H, N, D]
given by strides (head dim contiguous), so the model's strided views of the qkv projection are read in
place; the two outputs share one layout. ``rope`` is [N, 2D] float32, cos | sin, official interleaved pairs.

On each pair (e, o) = (x[2j], x[2j+1]) with the table's (c_e, c_o), (s_e, s_o) at the same places:
forward (x*cos + rotate(x)*sin, rotate: (e, o) -> (-o, e)): (e*c_e - o*s_e, o*c_o + e*s_o);
transpose (R^T g = g*cos - rotate(g*sin)): (e*c_e + o*s_o, o*c_o - e*s_e).
Pairs are split in registers (reshape to [.., D/2, 2]): full-width vector loads, no shared memory (sm_90a
SASS: 128-bit loads and stores only; a second load at offs ^ 1 for the partner compiled to scalar loads
and a shared-memory layout change). Math in fp32, one rounding to the output dtype (round to nearest even
in the interpreter too: EMULATE_BF16, set by the launcher there for bf16).
"""

import triton
import triton.language as tl

from sphere_fast.kernels.rounding import to_dtype


@triton.jit
def _pairs(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    return tl.split(tl.reshape(x, (ROWS, COLS // 2, 2)))


@triton.jit
def _rotate_rows(X, stride_xn, OUT, stride_on, rows, offs_d, mask, cos_e, cos_o, sin_e, sin_o,
                 BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, TRANSPOSE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    x = tl.load(X + rows[:, None] * stride_xn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    even, odd = _pairs(x, BLOCK_N, D_PAD)
    if TRANSPOSE:
        out_e = even * cos_e + odd * sin_o
        out_o = odd * cos_o - even * sin_e
    else:
        out_e = even * cos_e - odd * sin_e
        out_o = odd * cos_o + even * sin_o
    out = tl.reshape(tl.join(out_e, out_o), (BLOCK_N, D_PAD))
    out = to_dtype(out, OUT.dtype.element_ty, EMULATE_BF16).to(OUT.dtype.element_ty)
    tl.store(OUT + rows[:, None] * stride_on + offs_d[None, :], out, mask=mask)


@triton.jit
def rope_kernel(
    Q, K, QO, KO, ROPE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_on,
    H, N,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    # axis 0 runs over B*H, so neighbouring programs share a cos / sin tile in L2 and read neighbouring heads
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask = (rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = rows.to(tl.int64)
    # one cos / sin tile serves q and k
    cos_rows = ROPE + rows[:, None] * (2 * HEAD_DIM)
    cos_e, cos_o = _pairs(tl.load(cos_rows + offs_d[None, :], mask=mask, other=0.0), BLOCK_N, D_PAD)
    sin_e, sin_o = _pairs(tl.load(cos_rows + HEAD_DIM + offs_d[None, :], mask=mask, other=0.0), BLOCK_N, D_PAD)
    out_offset = b * stride_ob + h * stride_oh
    _rotate_rows(Q + b * stride_qb + h * stride_qh, stride_qn, QO + out_offset, stride_on, rows, offs_d, mask,
                 cos_e, cos_o, sin_e, sin_o, BLOCK_N, D_PAD, TRANSPOSE, EMULATE_BF16)
    _rotate_rows(K + b * stride_kb + h * stride_kh, stride_kn, KO + out_offset, stride_on, rows, offs_d, mask,
                 cos_e, cos_o, sin_e, sin_o, BLOCK_N, D_PAD, TRANSPOSE, EMULATE_BF16)
