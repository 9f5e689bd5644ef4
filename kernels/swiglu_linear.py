"""Triton kernel for the SwiGLU MLP's first projection and activation in one GEMM:
out = silu(x @ Wa^T + ba) * (x @ Wb^T + bb), where W = cat(Wa, Wb) is the official w12 weight [2H, K].

Raw device code only; the launcher lives in ``sphere_fast/ops/swiglu_linear.py``. Each program owns a
BLOCK_M x BLOCK_N tile of the output and keeps two accumulators, one for the a rows of W and one for the b rows
H further on, so the activation is applied in registers and the [M, 2H] pre-activation is never written
(nor read back by a separate SwiGLU kernel). x and W come in through tensor descriptors (the TMA on Hopper),
optionally warp specialized. The output may be wider than H (``OUT_WIDTH``): those columns are written as zeros,
so the second projection can run on a hidden width padded for aligned GEMMs.

Rows of W read by a tile that reaches past column H of a are rows of b (or, past 2H, zeros from the
descriptor): they only feed output columns >= H, which get zeros.
"""

import triton
import triton.language as tl

from sphere_fast.kernels.rounding import desc_load, to_dtype


@triton.jit
def _grouped_tile(pid, M, WIDTH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``: GROUP_M row tiles sweep the columns together, so the weight
    tiles they share are read from L2 while they are still there."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(WIDTH, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


@triton.jit
def swiglu_linear_kernel(
    X_DESC, W_DESC, BIAS, OUT,
    M, H, K, OUT_WIDTH, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, OUT_WIDTH, BLOCK_M, BLOCK_N, GROUP_M)
    row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        x = desc_load(X_DESC, row, k, EMULATE_BF16)
        acc_a = tl.dot(x, tl.trans(desc_load(W_DESC, col, k, EMULATE_BF16)), acc_a)
        acc_b = tl.dot(x, tl.trans(desc_load(W_DESC, H + col, k, EMULATE_BF16)), acc_b)

    cols = col + tl.arange(0, BLOCK_N)
    in_h = cols < H
    if HAS_BIAS:
        acc_a += tl.load(BIAS + cols, mask=in_h, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(BIAS + H + cols, mask=in_h, other=0.0).to(tl.float32)[None, :]
    out = tl.where(in_h[None, :], acc_a * tl.sigmoid(acc_a) * acc_b, 0.0)
    rows = row + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & (cols < OUT_WIDTH)[None, :]
    out = to_dtype(out, OUT.dtype.element_ty, EMULATE_BF16).to(OUT.dtype.element_ty)
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], out, mask=mask)
