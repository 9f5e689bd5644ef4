// CPU implementation of the spherify ops: the same two-pass structure and the same shared math
// (spherify_math.h) as the CUDA kernels, so the C++ path is exercised and compared without a GPU.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "spherify_math.h"
#include "spherify_ops.h"

namespace sphere_fast {
namespace {

// e for element j of sample b: explicit noise (already float [B, L]) or the Philox convention.
inline float noise_at(const SpherifyArgs& r, int64_t b, int64_t j) {
  if (r.mode == kNoiseTensor) return r.noise[b * r.length + j];
  return philox_randn(r.seeds[b], r.base + j);
}

// Runs fn(b, chunk, begin, end) over every (sample, chunk) pair in parallel; results land in per-pair slots
// and are combined in a fixed order, so the output is deterministic and independent of the thread count.
template <typename Fn>
void for_each_chunk(const SpherifyArgs& r, const Fn& fn) {
  const int64_t nsplit = num_chunks(r.length);
  at::parallel_for(0, r.batch * nsplit, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / nsplit, k = t % nsplit;
      fn(b, k, k * kChunk, std::min(r.length, (k + 1) * kChunk));
    }
  });
}

void sample_sums(const SpherifyArgs& r, int64_t b, float out[4]) {
  const int64_t nsplit = num_chunks(r.length);
  for (int i = 0; i < 4; ++i) out[i] = 0.0f;
  for (int64_t k = 0; k < nsplit; ++k)
    for (int i = 0; i < 4; ++i) out[i] += r.partial[(b * nsplit + k) * 4 + i];
}

template <typename T>
void fwd_impl(const SpherifyArgs& r) {
  const T* z = static_cast<const T*>(r.z);
  T* out = static_cast<T*>(r.out);
  const int64_t nsplit = num_chunks(r.length);
  for_each_chunk(r, [&](int64_t b, int64_t k, int64_t begin, int64_t end) {
    double zz = 0.0, ze = 0.0, ee = 0.0;  // host accumulators: double costs nothing here
    for (int64_t j = begin; j < end; ++j) {
      const float zv = static_cast<float>(z[b * r.length + j]);
      zz += zv * zv;
      if (r.mode != kNoiseNone) {
        const float e = noise_at(r, b, j);
        ze += zv * e;
        ee += e * e;
      }
    }
    float* p = &r.partial[(b * nsplit + k) * 4];
    p[0] = static_cast<float>(zz), p[1] = static_cast<float>(ze), p[2] = static_cast<float>(ee), p[3] = 0.0f;
  });
  const float length = static_cast<float>(r.length);
  std::vector<FwdCoeffs> coeffs(r.batch * r.pairs);
  for (int64_t b = 0; b < r.batch; ++b) {
    float s[4];
    sample_sums(r, b, s);
    const float a = spherify_a(s[0], length);
    for (int64_t p = 0; p < r.pairs; ++p)
      coeffs[p * r.batch + b] = r.mode == kNoiseNone
                                    ? FwdCoeffs{a, 0.0f}
                                    : fwd_coeffs(a, s[0], s[1], s[2], r.scales[p * r.batch + b], length);
    for (int i = 0; i < 3; ++i) r.stats_out[b * 3 + i] = s[i];
  }
  for_each_chunk(r, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float zv = static_cast<float>(z[b * r.length + j]);
      const float e = r.mode == kNoiseNone ? 0.0f : noise_at(r, b, j);
      for (int64_t p = 0; p < r.pairs; ++p) {
        const FwdCoeffs c = coeffs[p * r.batch + b];
        out[(p * r.batch + b) * r.length + j] = static_cast<T>(r.mode == kNoiseNone ? c.cz * zv : c.cz * zv + c.ce * e);
      }
    }
  });
}

template <typename T>
void bwd_impl(const SpherifyArgs& r) {
  const T* g = static_cast<const T*>(r.grad);
  const T* z = static_cast<const T*>(r.z);
  T* dz = static_cast<T*>(r.out);
  const int64_t nsplit = num_chunks(r.length);
  for_each_chunk(r, [&](int64_t b, int64_t k, int64_t begin, int64_t end) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};  // z.g0, e.g0, z.g1, e.g1
    for (int64_t j = begin; j < end; ++j) {
      const float zv = static_cast<float>(z[b * r.length + j]);
      const float e = r.mode == kNoiseNone ? 0.0f : noise_at(r, b, j);
      for (int64_t p = 0; p < r.pairs; ++p) {
        const float gv = static_cast<float>(g[(p * r.batch + b) * r.length + j]);
        acc[2 * p] += zv * gv;
        acc[2 * p + 1] += e * gv;
      }
    }
    for (int i = 0; i < 4; ++i) r.partial[(b * nsplit + k) * 4 + i] = static_cast<float>(acc[i]);
  });
  const float length = static_cast<float>(r.length);
  std::vector<BwdCoeffs> coeffs(r.batch);
  for (int64_t b = 0; b < r.batch; ++b) {
    float s[4];
    sample_sums(r, b, s);
    const float szz = r.stats[b * 3], sze = r.stats[b * 3 + 1], see = r.stats[b * 3 + 2];
    const float a = spherify_a(szz, length);
    BwdTerms terms[kMaxPairs];
    float sc[kMaxPairs] = {0.0f, 0.0f};
    for (int64_t p = 0; p < r.pairs; ++p) {
      sc[p] = r.mode == kNoiseNone ? 0.0f : r.scales[p * r.batch + b];
      terms[p] = bwd_terms(a, szz, sze, see, sc[p], s[2 * p], s[2 * p + 1], length);
      r.dscales[p * r.batch + b] = terms[p].ds;
    }
    coeffs[b] = bwd_coeffs(a, terms, sc, static_cast<int>(r.pairs), length);
  }
  for_each_chunk(r, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
    const BwdCoeffs c = coeffs[b];
    for (int64_t j = begin; j < end; ++j) {
      const float zv = static_cast<float>(z[b * r.length + j]);
      float acc = c.cz * zv;
      if (r.mode != kNoiseNone) acc += c.ce * noise_at(r, b, j);
      for (int64_t p = 0; p < r.pairs; ++p) acc += c.cg[p] * static_cast<float>(g[(p * r.batch + b) * r.length + j]);
      dz[b * r.length + j] = static_cast<T>(acc);
    }
  });
}

}  // namespace

void spherify_fwd_cpu(const SpherifyArgs& args) {
  switch (args.type) {
    case DType::kFloat32: return fwd_impl<float>(args);
    case DType::kFloat16: return fwd_impl<c10::Half>(args);
    case DType::kBFloat16: return fwd_impl<c10::BFloat16>(args);
  }
}

void spherify_bwd_cpu(const SpherifyArgs& args) {
  switch (args.type) {
    case DType::kFloat32: return bwd_impl<float>(args);
    case DType::kFloat16: return bwd_impl<c10::Half>(args);
    case DType::kBFloat16: return bwd_impl<c10::BFloat16>(args);
  }
}

void sphere_noise_cpu(const int64_t* seeds, float* out, int64_t batch, int64_t length, int64_t base) {
  at::parallel_for(0, batch * length, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) out[i] = philox_randn(seeds[i / length], base + i % length);
  });
}

void philox_below_cpu(const int64_t* seeds, int64_t* out, int64_t batch, int64_t counter, int64_t n) {
  for (int64_t b = 0; b < batch; ++b) out[b] = philox_below(seeds[b], counter, n);
}

}  // namespace sphere_fast
