"""Triton kernels of spherify with noise: f(f(z) + s*e), e = tl.randn(seed[b], noise_base + j) or given.

Layout: z is [B, L] with row stride ``stride_z`` (unit column stride); outputs are [P, B, L] contiguous with
P = 1 (single) or 2 (the training pair, one read of z for both scales). A sample is split into
``cdiv(L, CHUNK)`` programs that depend on L only, so a sample's result does not depend on the batch.

Two passes each way:
  forward  1. ``spherify_fwd_partials_kernel``: per (sample, chunk) partial sums of z.z, z.e, e.e
              -> partial[B, NSPLIT, 4]
           2. ``spherify_fwd_apply_kernel``: sums the sample's partials, per-sample scalars, out = cz*z + ce*e
  backward 1. ``spherify_bwd_partials_kernel``: z.g_p and e.g_p for p < P
           2. ``spherify_bwd_apply_kernel``: dz = sum_p cg_p*g_p + cz*z + ce*e, and dscale_p
e is regenerated from the seed in every pass and never stored. NOISE: 0 none (plain spherify, s treated as 0),
1 read from ``noise_ptr`` ([B, L] with row stride ``stride_n``), 2 Philox from ``seeds_ptr``.
With a = rsqrt(|z|^2/L + eps), u = a*z + s*e, c = rsqrt(|u|^2/L + eps):
  |u|^2 = a^2 |z|^2 + 2 s a z.e + s^2 |e|^2;  where s == 0 the output is exactly a*z (and ds = 0).
Outputs and dz are rounded once to z's dtype (to nearest even in the interpreter too: EMULATE_BF16, set by the
launcher there for bf16).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sphere_fast.kernels.rounding import to_dtype

NOISE_NONE = 0
NOISE_TENSOR = 1
NOISE_PHILOX = 2


# The stream's offset stream * L: Triton passes an int argument equal to 1 as a constant (a Python int, which has
# no .to), and 16-divisible ones as other variants; the kernels take it as a plain integer always.
NOISE_BASE = ["noise_base"]


@triton.jit
def _load_f32(ptrs, mask):
    """Masked-off lanes read 0, so they drop out of every sum."""
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _noise_tile(noise_row, seed, noise_base, offs, mask, NOISE: tl.constexpr):
    """e for columns ``offs`` of one sample, 0 outside ``mask`` (so it drops out of the sums)."""
    if NOISE == 1:
        e = _load_f32(noise_row + offs, mask)
    else:
        # 64-bit offsets: stream * L + j can pass 2^31 (the noise convention of sphere_fast/ops/philox.py).
        e = tl.randn(seed, noise_base.to(tl.int64) + offs.to(tl.int64))
        e = tl.where(mask, e, 0.0)
    return e


@triton.jit
def _sample_rows(z_ptr, noise_ptr, seeds_ptr, b, stride_z, stride_n, NOISE: tl.constexpr):
    """Sample b's rows of z and noise (64-bit offsets) and its Philox seed (0 unless NOISE == 2)."""
    z_row = z_ptr + b.to(tl.int64) * stride_z
    noise_row = noise_ptr + b.to(tl.int64) * stride_n
    seed = tl.load(seeds_ptr + b) if NOISE == 2 else 0
    return z_row, noise_row, seed


@triton.jit
def _store_partials(partial_ptr, b, k, NSPLIT, s0, s1, s2, s3):
    """Row (b, k) of partial[B, NSPLIT, 4]: what _sample_sums adds up."""
    out = partial_ptr + (b * NSPLIT + k) * 4
    tl.store(out + 0, s0)
    tl.store(out + 1, s1)
    tl.store(out + 2, s2)
    tl.store(out + 3, s3)


@triton.jit
def _sample_sums(partial_ptr, b, NSPLIT, SPLIT_P2: tl.constexpr):
    """The four per-sample sums, added over the sample's chunks in a fixed order (deterministic)."""
    k = tl.arange(0, SPLIT_P2)
    ptrs = partial_ptr + (b * NSPLIT + k) * 4
    m = k < NSPLIT
    s0 = tl.sum(tl.load(ptrs + 0, mask=m, other=0.0), axis=0)
    s1 = tl.sum(tl.load(ptrs + 1, mask=m, other=0.0), axis=0)
    s2 = tl.sum(tl.load(ptrs + 2, mask=m, other=0.0), axis=0)
    s3 = tl.sum(tl.load(ptrs + 3, mask=m, other=0.0), axis=0)
    return s0, s1, s2, s3


@triton.jit
def _times_a(a, x):
    """a * x for x a sum over z, and 0 where a == 0: there |z|^2 overflowed, f(z) = a*z is 0 (the reference's),
    and 0 * inf would make the whole sample NaN."""
    return tl.where(a == 0.0, 0.0, a * x)


@triton.jit
def _fwd_coeffs(a, szz, sze, see, s, L, eps):
    """(cz, ce) with out = cz*z + ce*e for scale s; exactly (a, 0) where s == 0."""
    su = _times_a(a * a, szz) + 2.0 * s * _times_a(a, sze) + s * s * see
    c = tl.rsqrt(su / L + eps)
    cz = tl.where(s == 0.0, a, c * a)
    ce = tl.where(s == 0.0, 0.0, c * s)
    return cz, ce


@triton.jit(do_not_specialize=NOISE_BASE)
def spherify_fwd_partials_kernel(
    z_ptr, noise_ptr, seeds_ptr, partial_ptr,
    L, stride_z, stride_n, noise_base,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, NOISE: tl.constexpr,
):
    b = tl.program_id(0)
    k = tl.program_id(1)
    nsplit = tl.num_programs(1)
    z_row, noise_row, seed = _sample_rows(z_ptr, noise_ptr, seeds_ptr, b, stride_z, stride_n, NOISE)
    cols = tl.arange(0, BLOCK)
    acc_zz = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ze = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ee = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = k * CHUNK + i + cols
        mask = offs < L
        z = _load_f32(z_row + offs, mask)
        acc_zz += z * z
        if NOISE != 0:
            e = _noise_tile(noise_row, seed, noise_base, offs, mask, NOISE)
            acc_ze += z * e
            acc_ee += e * e
    _store_partials(
        partial_ptr, b, k, nsplit, tl.sum(acc_zz, axis=0), tl.sum(acc_ze, axis=0), tl.sum(acc_ee, axis=0), 0.0
    )


@triton.jit(do_not_specialize=NOISE_BASE)
def spherify_fwd_apply_kernel(
    z_ptr, noise_ptr, seeds_ptr, scale_ptr, partial_ptr, out_ptr, stats_ptr,
    B, L, stride_z, stride_n, noise_base, eps,
    SPLIT_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, NOISE: tl.constexpr, PAIR: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    b = tl.program_id(0)
    k = tl.program_id(1)
    nsplit = tl.num_programs(1)
    szz, sze, see, _ = _sample_sums(partial_ptr, b, nsplit, SPLIT_P2)
    a = tl.rsqrt(szz / L + eps)
    if NOISE == 0:
        cz0 = a
        ce0 = 0.0
    else:
        cz0, ce0 = _fwd_coeffs(a, szz, sze, see, tl.load(scale_ptr + b), L, eps)
    if PAIR:
        cz1, ce1 = _fwd_coeffs(a, szz, sze, see, tl.load(scale_ptr + B + b), L, eps)
    # One program per sample saves the sums for backward.
    first = k == 0
    tl.store(stats_ptr + b * 3 + 0, szz, mask=first)
    tl.store(stats_ptr + b * 3 + 1, sze, mask=first)
    tl.store(stats_ptr + b * 3 + 2, see, mask=first)

    z_row, noise_row, seed = _sample_rows(z_ptr, noise_ptr, seeds_ptr, b, stride_z, stride_n, NOISE)
    out0 = out_ptr + b.to(tl.int64) * L
    out1 = out_ptr + (B + b).to(tl.int64) * L
    cols = tl.arange(0, BLOCK)
    for i in range(0, CHUNK, BLOCK):
        offs = k * CHUNK + i + cols
        mask = offs < L
        z = _load_f32(z_row + offs, mask)
        if NOISE == 0:
            y0 = cz0 * z
        else:
            e = _noise_tile(noise_row, seed, noise_base, offs, mask, NOISE)
            y0 = cz0 * z + ce0 * e
            if PAIR:
                y1 = cz1 * z + ce1 * e
                tl.store(out1 + offs, to_dtype(y1, out_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)
        tl.store(out0 + offs, to_dtype(y0, out_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit(do_not_specialize=NOISE_BASE)
def spherify_bwd_partials_kernel(
    g_ptr, z_ptr, noise_ptr, seeds_ptr, partial_ptr,
    B, L, stride_z, stride_n, noise_base,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, NOISE: tl.constexpr, PAIR: tl.constexpr,
):
    b = tl.program_id(0)
    k = tl.program_id(1)
    nsplit = tl.num_programs(1)
    z_row, noise_row, seed = _sample_rows(z_ptr, noise_ptr, seeds_ptr, b, stride_z, stride_n, NOISE)
    g0_row = g_ptr + b.to(tl.int64) * L
    g1_row = g_ptr + (B + b).to(tl.int64) * L
    cols = tl.arange(0, BLOCK)
    acc_zg0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_eg0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_zg1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_eg1 = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = k * CHUNK + i + cols
        mask = offs < L
        z = _load_f32(z_row + offs, mask)
        g0 = _load_f32(g0_row + offs, mask)
        acc_zg0 += z * g0
        if NOISE != 0:
            e = _noise_tile(noise_row, seed, noise_base, offs, mask, NOISE)
            acc_eg0 += e * g0
            if PAIR:
                g1 = _load_f32(g1_row + offs, mask)
                acc_zg1 += z * g1
                acc_eg1 += e * g1
    _store_partials(
        partial_ptr, b, k, nsplit,
        tl.sum(acc_zg0, axis=0), tl.sum(acc_eg0, axis=0), tl.sum(acc_zg1, axis=0), tl.sum(acc_eg1, axis=0),
    )


@triton.jit
def _bwd_coeffs(a, szz, sze, see, s, zg, eg, L, eps):
    """For one output with scale s: (C, K, z.dv, ds) with dv = C*g - K*(a*z + s*e) the grad w.r.t. f(z).

    Where s == 0 the output is f(z) itself: C = 1, K = 0, ds = 0.
    """
    su = _times_a(a * a, szz) + 2.0 * s * _times_a(a, sze) + s * s * see
    c = tl.rsqrt(su / L + eps)
    nz = s != 0.0
    kk = tl.where(nz, c * c * c / L * (_times_a(a, zg) + s * eg), 0.0)
    cc = tl.where(nz, c, 1.0)
    # z.dv counts only times a^3 (in dz): 0 where a == 0, where it may not be finite
    zdv = tl.where(a == 0.0, 0.0, cc * zg - kk * (a * szz + s * sze))
    ds = tl.where(nz, cc * eg - kk * (_times_a(a, sze) + s * see), 0.0)
    return cc, kk, zdv, ds


@triton.jit(do_not_specialize=NOISE_BASE)
def spherify_bwd_apply_kernel(
    g_ptr, z_ptr, noise_ptr, seeds_ptr, scale_ptr, stats_ptr, partial_ptr, dz_ptr, dscale_ptr,
    B, L, stride_z, stride_n, noise_base, eps,
    SPLIT_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, NOISE: tl.constexpr, PAIR: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    b = tl.program_id(0)
    k = tl.program_id(1)
    nsplit = tl.num_programs(1)
    zg0, eg0, zg1, eg1 = _sample_sums(partial_ptr, b, nsplit, SPLIT_P2)
    szz = tl.load(stats_ptr + b * 3 + 0)
    sze = tl.load(stats_ptr + b * 3 + 1)
    see = tl.load(stats_ptr + b * 3 + 2)
    a = tl.rsqrt(szz / L + eps)
    first = k == 0
    if NOISE == 0:
        cg0 = a
        cz = -_times_a(a * a * a / L, zg0)
        ce = 0.0
    else:
        s0 = tl.load(scale_ptr + b)
        c0, k0, zdv, ds0 = _bwd_coeffs(a, szz, sze, see, s0, zg0, eg0, L, eps)
        ksum = k0
        kssum = k0 * s0
        tl.store(dscale_ptr + b, ds0, mask=first)
        if PAIR:
            s1 = tl.load(scale_ptr + B + b)
            c1, k1, zdv1, ds1 = _bwd_coeffs(a, szz, sze, see, s1, zg1, eg1, L, eps)
            ksum += k1
            kssum += k1 * s1
            zdv += zdv1
            tl.store(dscale_ptr + B + b, ds1, mask=first)
            cg1 = a * c1
        cg0 = a * c0
        # dz = a*dv - (a^3/L)(z.dv) z with dv = sum_p C_p g_p - K_p (a z + s_p e)
        cz = -a * a * ksum - a * a * a / L * zdv
        ce = -a * kssum

    z_row, noise_row, seed = _sample_rows(z_ptr, noise_ptr, seeds_ptr, b, stride_z, stride_n, NOISE)
    g0_row = g_ptr + b.to(tl.int64) * L
    g1_row = g_ptr + (B + b).to(tl.int64) * L
    dz_row = dz_ptr + b.to(tl.int64) * L
    cols = tl.arange(0, BLOCK)
    for i in range(0, CHUNK, BLOCK):
        offs = k * CHUNK + i + cols
        mask = offs < L
        z = _load_f32(z_row + offs, mask)
        g0 = _load_f32(g0_row + offs, mask)
        dz = cg0 * g0 + cz * z
        if NOISE != 0:
            e = _noise_tile(noise_row, seed, noise_base, offs, mask, NOISE)
            dz += ce * e
            if PAIR:
                g1 = _load_f32(g1_row + offs, mask)
                dz += cg1 * g1
        tl.store(dz_row + offs, to_dtype(dz, dz_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit(do_not_specialize=NOISE_BASE)
def sphere_noise_kernel(seeds_ptr, out_ptr, L, noise_base, BLOCK: tl.constexpr):
    """The convention's noise materialised (for cross-backend checks): out[b, j] = randn(seeds[b], base + j)."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    seed = tl.load(seeds_ptr + b)
    e = tl.randn(seed, noise_base.to(tl.int64) + offs.to(tl.int64))
    tl.store(out_ptr + b.to(tl.int64) * L + offs, e, mask=mask)


def launch_config(length: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, NSPLIT) for a sample of ``length`` values: a function of L only (batch invariance)."""
    block = min(2048, triton.next_power_of_2(length))
    chunk = block * min(4, triton.cdiv(length, block))
    return block, chunk, triton.cdiv(length, chunk)
