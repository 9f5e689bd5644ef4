// Shared host/device math of the spherify ops: Triton-compatible Philox4x32-10 normals and the per-sample
// scalar coefficients. Torch-free so nvcc compile-checks it alone; included by spherify_cpu.cpp and
// spherify_cuda.cu, which differ only in how they loop and reduce.
#pragma once

#include <cmath>
#include <cstdint>

#include "sf_device.h"

namespace sphere_fast {

constexpr float kSpherifyEps = 1e-6f;

enum NoiseMode : int { kNoiseNone = 0, kNoiseTensor = 1, kNoisePhilox = 2 };

// Outputs P one op makes from a z: one, or a noise pair (two scales). Per-output values live in arrays this long.
constexpr int kMaxPairs = 2;

SF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Triton's tl.randint4x(seed, offset) words c0, c1: key = (seed lo, seed hi), counter = (offset lo, offset hi, 0, 0).
SF_HD void philox_c0_c1(int64_t seed, int64_t offset, uint32_t& out0, uint32_t& out1) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t o = static_cast<uint64_t>(offset);
  uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  uint32_t c0 = static_cast<uint32_t>(o), c1 = static_cast<uint32_t>(o >> 32), c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t n0 = mulhi32(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi32(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out0 = c0;
  out1 = c1;
}

// Triton's uint_to_uniform_float: bitcast to int32, negative v -> -v - 1 (== ~v), times 4.6566127342e-10f.
SF_HD float uint_to_uniform(uint32_t x) {
  int32_t v = static_cast<int32_t>(x);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// An integer uniform in [0, n) for 0 < n < 2^31: floor(w * n / 2^32) for w the first word at `counter` (the seeded
// labels; the 64-bit product cannot overflow).
SF_HD int64_t philox_below(int64_t seed, int64_t counter, int64_t n) {
  uint32_t w0, w1;
  philox_c0_c1(seed, counter, w0, w1);
  return static_cast<int64_t>((static_cast<uint64_t>(w0) * static_cast<uint64_t>(n)) >> 32);
}

// tl.randn(seed, offset): Box-Muller on the first two words, keeping r * cos(theta).
SF_HD float philox_randn(int64_t seed, int64_t offset) {
  uint32_t w0, w1;
  philox_c0_c1(seed, offset, w0, w1);
  float u1 = uint_to_uniform(w0);
  const float u2 = uint_to_uniform(w1);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(th);
}

// Forward: out = cz * z + ce * e for one scale s, from a = rsqrt(|z|^2/L + eps) and the sums |z|^2, z.e, |e|^2.
// Where s == 0 the output is exactly a * z.
struct FwdCoeffs {
  float cz, ce;
};

SF_HD float rsqrt_f(float x) { return 1.0f / sqrtf(x); }

SF_HD float spherify_a(float szz, float length) { return rsqrt_f(szz / length + kSpherifyEps); }

// a * x for x a sum over z, and 0 where a == 0: there |z|^2 overflowed, f(z) = a*z is 0 (the reference's), and
// 0 * inf would make the whole sample NaN.
SF_HD float times_a(float a, float x) { return a == 0.0f ? 0.0f : a * x; }

SF_HD FwdCoeffs fwd_coeffs(float a, float szz, float sze, float see, float s, float length) {
  if (s == 0.0f) return {a, 0.0f};
  const float su = times_a(a * a, szz) + 2.0f * s * times_a(a, sze) + s * s * see;
  const float c = rsqrt_f(su / length + kSpherifyEps);
  return {c * a, c * s};
}

// Backward for one output with scale s and upstream sums zg = z.g, eg = e.g: dv = C*g - K*(a*z + s*e) is the
// gradient w.r.t. f(z); zdv = z.dv; ds = e.du is the scale gradient (0 where s == 0, as in the reference for a finite
// sample: for a NaN one the reference's torch.where gives NaN).
struct BwdTerms {
  float c, k, zdv, ds;
};

SF_HD BwdTerms bwd_terms(float a, float szz, float sze, float see, float s, float zg, float eg, float length) {
  if (s == 0.0f) return {1.0f, 0.0f, a == 0.0f ? 0.0f : zg, 0.0f};
  const float su = times_a(a * a, szz) + 2.0f * s * times_a(a, sze) + s * s * see;
  const float c = rsqrt_f(su / length + kSpherifyEps);
  const float k = c * c * c / length * (times_a(a, zg) + s * eg);
  // z.dv counts only times a^3 (in dz): 0 where a == 0, where it may not be finite
  const float zdv = a == 0.0f ? 0.0f : c * zg - k * (a * szz + s * sze);
  return {c, k, zdv, c * eg - k * (times_a(a, sze) + s * see)};
}

// dz = sum_p cg_p * g_p + cz * z + ce * e, from the terms of P outputs (dz = a*dv - (a^3/L)(z.dv) z).
struct BwdCoeffs {
  float cg[kMaxPairs];
  float cz, ce;
};

SF_HD BwdCoeffs bwd_coeffs(float a, const BwdTerms* terms, const float* scales, int pairs, float length) {
  BwdCoeffs out{{0.0f, 0.0f}, 0.0f, 0.0f};
  float ksum = 0.0f, kssum = 0.0f, zdv = 0.0f;
  for (int p = 0; p < pairs; ++p) {
    out.cg[p] = a * terms[p].c;
    ksum += terms[p].k;
    kssum += terms[p].k * scales[p];
    zdv += terms[p].zdv;
  }
  out.cz = -a * a * ksum - a * a * a / length * zdv;
  out.ce = -a * kssum;
  return out;
}

// Work split shared by the CPU and CUDA kernels (and the same as the Triton launcher): a function of L only,
// so a sample's result does not depend on the batch.
constexpr int64_t kChunk = 8192;

SF_HD int64_t num_chunks(int64_t length) { return (length + kChunk - 1) / kChunk; }

}  // namespace sphere_fast
