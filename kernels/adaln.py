"""Triton kernels for AdaLN: res = x + gate*branch; y = RMSNorm(res; w) * (1 + scale) + shift.

Raw device code only; launchers, autograd and checks live in ``sphere_fast/ops/adaln.py``.

Layout: x, branch are [B, S, D] addressed by (stride_b, stride_s) with a unit last stride; gate, shift,
scale are addressed the same way, so a (B, 1, D) modulation simply has stride_s == 0 (broadcast by stride,
nothing is expanded in memory). Outputs res, y are contiguous [B*S, D]; rstd is [B*S] fp32. Math in fp32, one
rounding to the output dtype (to nearest even in the interpreter too: EMULATE_BF16, set by the launcher there for
bf16).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sphere_fast.kernels.rounding import to_dtype


@triton.jit
def _row_offsets(rows, S, stride_b, stride_s):
    # int64 so that B*S*D beyond 2**31 elements still addresses correctly.
    rows = rows.to(tl.int64)
    return (rows // S) * stride_b + (rows % S) * stride_s


@triton.jit
def adaln_fwd_kernel(
    X, BR, G, W, SH, SC,  # inputs (BR, G, W, SH, SC may be dummies when their HAS_* flag is off)
    RES, Y, RSTD,  # outputs
    M, S, D, eps,
    sx_b, sx_s, sbr_b, sbr_s, sg_b, sg_s, ssh_b, ssh_s, ssc_b, ssc_s,
    HAS_BRANCH: tl.constexpr, HAS_GATE: tl.constexpr, HAS_W: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < D)
    c2 = cols[None, :]
    out_off = rows.to(tl.int64)[:, None] * D + c2

    r = tl.load(X + _row_offsets(rows, S, sx_b, sx_s)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        br = tl.load(BR + _row_offsets(rows, S, sbr_b, sbr_s)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(G + _row_offsets(rows, S, sg_b, sg_s)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
            br = g * br
        res = to_dtype(r + br, RES.dtype.element_ty, EMULATE_BF16)
        tl.store(RES + out_off, res, mask=mask)
        # Normalise the stored (rounded) residual, exactly what an unfused model would read back.
        r = res.to(tl.float32)

    rstd = tl.rsqrt(tl.sum(r * r, axis=1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=rmask)
    y = r * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        sc = tl.load(SC + _row_offsets(rows, S, ssc_b, ssc_s)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
        y = y * (1.0 + sc)
    if HAS_SHIFT:
        y += tl.load(SH + _row_offsets(rows, S, ssh_b, ssh_s)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + out_off, to_dtype(y, Y.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit
def adaln_bwd_kernel(
    DY, DRES, RES, BR, G, W, SC, RSTD,  # inputs (contiguous [B*S, D] for DY, DRES, RES)
    DX, DBR, DG, DSH, DSC,  # per-element outputs (contiguous [B*S, D]); DG/DSH/DSC used when per-token
    PW, PG, PSH, PSC,  # fp32 partial sums [B * CHUNKS, D] (weight always; gate/shift/scale when broadcast)
    S, D, rows_per_prog, CHUNKS,
    sbr_b, sbr_s, sg_b, sg_s, ssc_b, ssc_s,
    HAS_DRES: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_GATE: tl.constexpr, HAS_W: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    GATE_TOK: tl.constexpr, SHIFT_TOK: tl.constexpr, SCALE_TOK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """Program (b, c) walks rows [c*rows_per_prog, (c+1)*rows_per_prog) of sample b.

    Column sums (dweight and broadcast dgate/dshift/dscale) stay in registers and are written once per
    program as partials; the caller adds the B*CHUNKS partials (a second, small reduction), so no single
    program ever walks a whole column. STAGES > 1 pipelines the row loop: the next rows' loads are issued (into
    shared memory) while the current ones are computed; the sums and their order stay the same.
    """
    b = tl.program_id(0)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    c2 = cols[None, :]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_D,), 1.0, tl.float32)

    acc_w = tl.zeros((BLOCK_D,), tl.float32)
    acc_g = tl.zeros((BLOCK_D,), tl.float32)
    acc_sh = tl.zeros((BLOCK_D,), tl.float32)
    acc_sc = tl.zeros((BLOCK_D,), tl.float32)
    s_begin = c * rows_per_prog
    s_end = tl.minimum(s_begin + rows_per_prog, S)
    for s0 in tl.range(s_begin, s_end, BLOCK_M, num_stages=STAGES):
        s = s0 + tl.arange(0, BLOCK_M)
        rmask = s < s_end
        mask = rmask[:, None] & cmask[None, :]
        rows = b.to(tl.int64) * S + s
        off = rows[:, None] * D + c2

        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        n = tl.load(RES + off, mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
        dn = dy * w[None, :]
        if HAS_SCALE:
            sc_off = b.to(tl.int64) * ssc_b + s.to(tl.int64) * ssc_s
            one_sc = 1.0 + tl.load(SC + sc_off[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
            dn = dn * one_sc
            dsc = dy * n * w[None, :]
            if SCALE_TOK:
                tl.store(DSC + off, to_dtype(dsc, DSC.dtype.element_ty, EMULATE_BF16), mask=mask)
            else:
                acc_sc += tl.sum(dsc, axis=0)
            acc_w += tl.sum(dy * n * one_sc, axis=0)
        else:
            acc_w += tl.sum(dy * n, axis=0)
        if HAS_SHIFT:
            if SHIFT_TOK:
                tl.store(DSH + off, to_dtype(dy, DSH.dtype.element_ty, EMULATE_BF16), mask=mask)
            else:
                acc_sh += tl.sum(dy, axis=0)

        # d(res) = rstd * (dn - n * mean(dn * n)) from the chain rule through rsqrt(mean(res^2) + eps).
        dr = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
        if HAS_DRES:
            dr += tl.load(DRES + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, to_dtype(dr, DX.dtype.element_ty, EMULATE_BF16), mask=mask)
        if HAS_BRANCH:
            if HAS_GATE:
                g_off = b.to(tl.int64) * sg_b + s.to(tl.int64) * sg_s
                g = tl.load(G + g_off[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
                br_off = b.to(tl.int64) * sbr_b + s.to(tl.int64) * sbr_s
                br = tl.load(BR + br_off[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
                tl.store(DBR + off, to_dtype(dr * g, DBR.dtype.element_ty, EMULATE_BF16), mask=mask)
                if GATE_TOK:
                    tl.store(DG + off, to_dtype(dr * br, DG.dtype.element_ty, EMULATE_BF16), mask=mask)
                else:
                    acc_g += tl.sum(dr * br, axis=0)
            else:
                tl.store(DBR + off, to_dtype(dr, DBR.dtype.element_ty, EMULATE_BF16), mask=mask)

    p_off = (b.to(tl.int64) * CHUNKS + c) * D + cols
    if HAS_W:
        tl.store(PW + p_off, acc_w, mask=cmask)
    if HAS_GATE and not GATE_TOK:
        tl.store(PG + p_off, acc_g, mask=cmask)
    if HAS_SHIFT and not SHIFT_TOK:
        tl.store(PSH + p_off, acc_sh, mask=cmask)
    if HAS_SCALE and not SCALE_TOK:
        tl.store(PSC + p_off, acc_sc, mask=cmask)


@triton.jit
def _sum_partial_rows(P, first, n, cols, cmask, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # rows [first, first + n) of the fp32 partials [.., D], summed over rows: BLOCK_R rows a step, in a fixed order
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for r0 in range(0, n, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < n)[:, None] & cmask[None, :]
        acc += tl.load(P + (first + r.to(tl.int64))[:, None] * D + cols[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def adaln_bwd_finish_kernel(
    PW, PG, PSH, PSC,  # the backward's fp32 partial sums [B * CHUNKS, D] (dummies when their HAS_* flag is off)
    DW, DG, DSH, DSC,  # the grads, in the inputs' dtype: DW [D]; DG, DSH, DSC [B, D] (of (B, 1, D) modulations)
    B, CHUNKS, D, SAMPLE_PROGRAMS,
    HAS_W: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """The backward's second stage in one launch. Program (i, j) owns columns [j*BLOCK_D, (j+1)*BLOCK_D): for
    i < SAMPLE_PROGRAMS (B, or 0 when no modulation is per sample) it sums sample i's CHUNKS partial rows of
    the gate's, shift's and scale's grads; the program after them sums all B*CHUNKS rows of the weight's."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    if i < SAMPLE_PROGRAMS:
        first = i.to(tl.int64) * CHUNKS
        out = i.to(tl.int64) * D + cols
        if HAS_GATE:
            dg = _sum_partial_rows(PG, first, CHUNKS, cols, cmask, D, BLOCK_R, BLOCK_D)
            tl.store(DG + out, to_dtype(dg, DG.dtype.element_ty, EMULATE_BF16), mask=cmask)
        if HAS_SHIFT:
            dsh = _sum_partial_rows(PSH, first, CHUNKS, cols, cmask, D, BLOCK_R, BLOCK_D)
            tl.store(DSH + out, to_dtype(dsh, DSH.dtype.element_ty, EMULATE_BF16), mask=cmask)
        if HAS_SCALE:
            dsc = _sum_partial_rows(PSC, first, CHUNKS, cols, cmask, D, BLOCK_R, BLOCK_D)
            tl.store(DSC + out, to_dtype(dsc, DSC.dtype.element_ty, EMULATE_BF16), mask=cmask)
    elif HAS_W:
        dw = _sum_partial_rows(PW, 0, B * CHUNKS, cols, cmask, D, BLOCK_R, BLOCK_D)
        tl.store(DW + cols, to_dtype(dw, DW.dtype.element_ty, EMULATE_BF16), mask=cmask)
