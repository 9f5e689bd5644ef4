"""Non-causal flash attention (Triton, forward and backward) on q and k already rotated by RoPE (impl triton runs
the RoPE pass first, kernels/rope.py).

Layout: q, k, v, o are [B, H, N, D] given by strides (head dim contiguous), so the model's
``qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`` views are read in place.

Head dim: tiles must be powers of two, so the head dim is split into chunk A (the largest power of two
<= D, never masked) and an optional chunk B holding the rest, masked, padded to the width DB the launcher
picks (ops/attention.py: DB = DA; a 16-wide chunk B gave wrong outputs and illegal addresses on an H200
with Triton 3.6). D = 72, 80 and 104 run as 64 + 64; 32, 64, 128 as one chunk. Every product over the
head dim is a sum of one dot per chunk.

Softmax is computed in base 2: scores are multiplied by qk_scale = log2(e)/sqrt(D) and the saved LSE is
log2-based, so the backward recomputes p = exp2(s*qk_scale - lse) exactly as the forward did. EVEN_N (N a
multiple of the key block, as N = 256 and 1024 are) drops the key mask from the score loop: with it, each
score costs one FMA before its exp2 instead of a multiply, a select and a subtraction.

attention_fwd_tma_kernel is the forward for one head-dim chunk and N a multiple of both blocks, its q, k, v
tiles loaded through tensor descriptors (the TMA on Hopper), optionally warp specialized; it sums as
attention_fwd_kernel does. The launcher runs it only for a TmaConfig (ops/attention.py), which no default
candidate list holds until it is measured.

EMULATE_BF16 is only set by the launcher under TRITON_INTERPRET=1 with bf16 inputs (see rounding.to_dtype).
"""

import triton
import triton.language as tl

from sphere_fast.kernels.rounding import desc_load, to_dtype


@triton.jit
def _load_tile(base, stride_n, offs_n, mask_n, offs_d, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr):
    ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :]
    if MASK_D:
        return tl.load(ptrs, mask=mask_n[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return tl.load(ptrs, mask=mask_n[:, None], other=0.0)


@triton.jit
def _load_operand(base, stride_n, offs_n, mask_n, offs_d, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):
    """A dot operand tile: loaded, in fp32 under EMULATE_BF16 (the interpreter's bf16 dot is wrong)."""
    x = _load_tile(base, stride_n, offs_n, mask_n, offs_d, HEAD_DIM, MASK_D)
    if EMULATE_BF16:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(base, stride_n, offs_n, mask_n, offs_d, x, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr,
                EMULATE_BF16: tl.constexpr):
    ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :]
    x = to_dtype(x, base.dtype.element_ty, EMULATE_BF16).to(base.dtype.element_ty)
    if MASK_D:
        tl.store(ptrs, x, mask=mask_n[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, x, mask=mask_n[:, None])


@triton.jit
def _cast(x, like, EMULATE_BF16: tl.constexpr):
    # a dot operand made from an fp32 value (p, ds): rounded to the input dtype, as flash attention does
    return to_dtype(x, like.dtype.element_ty, EMULATE_BF16)


@triton.jit
def _program_tile(H, N):
    """(tile, b, h, start of the head's row in the [B*H, N] LSE and delta arrays) of this program. The grid is
    (tiles, H, B): the launch order of a (tiles, B*H) grid, without a division, and B and H may each reach CUDA's
    limit of 65535 on axes 1 and 2 (a B*H axis would stop at 65535 heads: a 16-head model sampled at batch 2048
    with CFG). b, h and the row start are int64, as batch and head offsets can pass 2**31 elements."""
    b, h = tl.program_id(2), tl.program_id(1)
    return tl.program_id(0), b.to(tl.int64), h.to(tl.int64), (b * H + h).to(tl.int64) * N


@triton.jit
def _qkv_head_bases(Q, K, V, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh):
    return Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh


@triton.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """One key block of the base-2 online softmax over scores s [M, N]: (p, alpha, new row max, new row sum).
    qk_scale > 0, so the scaled max is the max of the scaled scores; every key block holds at least one valid
    key, so it stays finite. s * qk_scale - m is one FMA per score (as the backward recomputes it)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    pid_m, b, h, row_base = _program_tile(H, N)
    q_base, k_base, v_base = _qkv_head_bases(
        Q, K, V, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
    )
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_a = tl.arange(0, DA)
    qa = _load_operand(q_base, stride_qn, offs_m, mask_m, offs_a, HEAD_DIM, False, EMULATE_BF16)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        qb = _load_operand(q_base, stride_qn, offs_m, mask_m, offs_b, HEAD_DIM, True, EMULATE_BF16)
        acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        ka = _load_operand(k_base, stride_kn, offs_n, mask_n, offs_a, HEAD_DIM, False, EMULATE_BF16)
        s = tl.dot(qa, tl.trans(ka))
        if HAS_B:
            kb = _load_operand(k_base, stride_kn, offs_n, mask_n, offs_b, HEAD_DIM, True, EMULATE_BF16)
            s += tl.dot(qb, tl.trans(kb))
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        p_dot = _cast(p, V, EMULATE_BF16)
        va = _load_operand(v_base, stride_vn, offs_n, mask_n, offs_a, HEAD_DIM, False, EMULATE_BF16)
        acc_a = tl.dot(p_dot, va, acc_a * alpha[:, None])
        if HAS_B:
            vb = _load_operand(v_base, stride_vn, offs_n, mask_n, offs_b, HEAD_DIM, True, EMULATE_BF16)
            acc_b = tl.dot(p_dot, vb, acc_b * alpha[:, None])
        m_i = m_new

    inv_l = 1.0 / l_i
    _store_tile(o_base, stride_on, offs_m, mask_m, offs_a, acc_a * inv_l[:, None], HEAD_DIM, False, EMULATE_BF16)
    if HAS_B:
        _store_tile(o_base, stride_on, offs_m, mask_m, offs_b, acc_b * inv_l[:, None], HEAD_DIM, True, EMULATE_BF16)
    tl.store(LSE + row_base + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def attention_fwd_tma_kernel(
    Q_DESC, K_DESC, V_DESC, O, LSE,
    stride_ob, stride_oh, stride_on,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """attention_fwd_kernel's sums in the same order, with the q, k, v tiles loaded through tensor descriptors
    of their [B*N, H*D] matrices (on Hopper the TMA copies them into shared memory), for one head-dim chunk and N
    a multiple of both blocks. WARP_SPECIALIZE has Triton split the key loop into producer
    and consumer warps."""
    pid_m, b, h, row_base = _program_tile(H, N)
    row, col = (b * N).to(tl.int32), (h * HEAD_DIM).to(tl.int32)  # descriptor coordinates of this head's first row
    q = desc_load(Q_DESC, row + pid_m * BLOCK_M, col, EMULATE_BF16)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        s = tl.dot(q, tl.trans(desc_load(K_DESC, row + start_n, col, EMULATE_BF16)))
        p, alpha, m_i_new, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        v = desc_load(V_DESC, row + start_n, col, EMULATE_BF16)
        acc = tl.dot(_cast(p, O, EMULATE_BF16), v, acc * alpha[:, None])
        m_i = m_i_new

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    o_base = O + b * stride_ob + h * stride_oh
    inv_l = 1.0 / l_i
    _store_tile(o_base, stride_on, offs_m, mask_m, tl.arange(0, HEAD_DIM), acc * inv_l[:, None], HEAD_DIM, False,
                EMULATE_BF16)
    tl.store(LSE + row_base + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d o_id * do_id, the softmax-backward row term
    pid_m, b, h, row_base = _program_tile(H, N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, D_PAD)
    o = _load_tile(O + b * stride_ob + h * stride_oh, stride_on, offs_m, mask_m, offs_d, HEAD_DIM, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, stride_don, offs_m, mask_m, offs_d, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_base + offs_m, delta, mask=mask_m)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """One key block per program; loops over all query blocks (transposed scores, no atomics)."""
    pid_n, b, h, row_base = _program_tile(H, N)
    q_base, k_base, v_base = _qkv_head_bases(
        Q, K, V, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
    )
    do_base = DO + b * stride_dob + h * stride_doh

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_a = tl.arange(0, DA)
    ka = _load_operand(k_base, stride_kn, offs_n, mask_n, offs_a, HEAD_DIM, False, EMULATE_BF16)
    va = _load_operand(v_base, stride_vn, offs_n, mask_n, offs_a, HEAD_DIM, False, EMULATE_BF16)
    dk_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        kb = _load_operand(k_base, stride_kn, offs_n, mask_n, offs_b, HEAD_DIM, True, EMULATE_BF16)
        vb = _load_operand(v_base, stride_vn, offs_n, mask_n, offs_b, HEAD_DIM, True, EMULATE_BF16)
        dk_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)

    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        qa = _load_operand(q_base, stride_qn, offs_m, mask_m, offs_a, HEAD_DIM, False, EMULATE_BF16)
        doa = _load_operand(do_base, stride_don, offs_m, mask_m, offs_a, HEAD_DIM, False, EMULATE_BF16)
        s_t = tl.dot(ka, tl.trans(qa))
        dp_t = tl.dot(va, tl.trans(doa))
        if HAS_B:
            qb = _load_operand(q_base, stride_qn, offs_m, mask_m, offs_b, HEAD_DIM, True, EMULATE_BF16)
            dob = _load_operand(do_base, stride_don, offs_m, mask_m, offs_b, HEAD_DIM, True, EMULATE_BF16)
            s_t += tl.dot(kb, tl.trans(qb))
            dp_t += tl.dot(vb, tl.trans(dob))
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        # padded query rows load q = do = 0 and lse = delta = 0: p = 1 there but dv and dk get 0 from them
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        ds_t = p_t * (dp_t - delta[None, :])
        p_dot = _cast(p_t, DO, EMULATE_BF16)
        ds_dot = _cast(ds_t, Q, EMULATE_BF16)
        dv_a = tl.dot(p_dot, doa, dv_a)
        dk_a = tl.dot(ds_dot, qa, dk_a)
        if HAS_B:
            dv_b = tl.dot(p_dot, dob, dv_b)
            dk_b = tl.dot(ds_dot, qb, dk_b)

    dk_base = DK + b * stride_dkb + h * stride_dkh
    dv_base = DV + b * stride_dvb + h * stride_dvh
    _store_tile(dk_base, stride_dkn, offs_n, mask_n, offs_a, dk_a * sm_scale, HEAD_DIM, False, EMULATE_BF16)
    _store_tile(dv_base, stride_dvn, offs_n, mask_n, offs_a, dv_a, HEAD_DIM, False, EMULATE_BF16)
    if HAS_B:
        _store_tile(dk_base, stride_dkn, offs_n, mask_n, offs_b, dk_b * sm_scale, HEAD_DIM, True, EMULATE_BF16)
        _store_tile(dv_base, stride_dvn, offs_n, mask_n, offs_b, dv_b, HEAD_DIM, True, EMULATE_BF16)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """One query block per program; loops over all key blocks."""
    pid_m, b, h, row_base = _program_tile(H, N)
    q_base, k_base, v_base = _qkv_head_bases(
        Q, K, V, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh
    )
    do_base = DO + b * stride_dob + h * stride_doh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_a = tl.arange(0, DA)
    qa = _load_operand(q_base, stride_qn, offs_m, mask_m, offs_a, HEAD_DIM, False, EMULATE_BF16)
    doa = _load_operand(do_base, stride_don, offs_m, mask_m, offs_a, HEAD_DIM, False, EMULATE_BF16)
    dq_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        qb = _load_operand(q_base, stride_qn, offs_m, mask_m, offs_b, HEAD_DIM, True, EMULATE_BF16)
        dob = _load_operand(do_base, stride_don, offs_m, mask_m, offs_b, HEAD_DIM, True, EMULATE_BF16)
        dq_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)

    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        ka = _load_operand(k_base, stride_kn, offs_n, mask_n, offs_a, HEAD_DIM, False, EMULATE_BF16)
        va = _load_operand(v_base, stride_vn, offs_n, mask_n, offs_a, HEAD_DIM, False, EMULATE_BF16)
        s = tl.dot(qa, tl.trans(ka))
        dp = tl.dot(doa, tl.trans(va))
        if HAS_B:
            kb = _load_operand(k_base, stride_kn, offs_n, mask_n, offs_b, HEAD_DIM, True, EMULATE_BF16)
            vb = _load_operand(v_base, stride_vn, offs_n, mask_n, offs_b, HEAD_DIM, True, EMULATE_BF16)
            s += tl.dot(qb, tl.trans(kb))
            dp += tl.dot(dob, tl.trans(vb))
        # padded keys load as 0, so s = 0 and exp2(-lse) overflows to inf when every real score is very
        # negative (inf * 0 = nan in ds @ k): zero them explicitly
        p = tl.exp2(s * qk_scale - lse[:, None])
        if not EVEN_N:
            p = tl.where(mask_n[None, :], p, 0.0)
        ds_dot = _cast(p * (dp - delta[:, None]), K, EMULATE_BF16)
        dq_a = tl.dot(ds_dot, ka, dq_a)
        if HAS_B:
            dq_b = tl.dot(ds_dot, kb, dq_b)

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    _store_tile(dq_base, stride_dqn, offs_m, mask_m, offs_a, dq_a * sm_scale, HEAD_DIM, False, EMULATE_BF16)
    if HAS_B:
        _store_tile(dq_base, stride_dqn, offs_m, mask_m, offs_b, dq_b * sm_scale, HEAD_DIM, True, EMULATE_BF16)
