// CPU implementation of the spherify ops: the same two-pass structure and the same shared math
// (spherify_math.h) as the CUDA kernels, so the C++ path is exercised and compared without a GPU.
#include "spherify_ops.h"

#include <ATen/Parallel.h>

#include "spherify_math.h"

namespace sphere_fast {
namespace {

struct Rows {
  int64_t batch, length, pairs, nsplit, base;
  int mode;
};

// e for element j of sample b: explicit noise (already float [B, L]) or the Philox convention.
inline float noise_at(const Rows& r, const float* noise, const int64_t* seeds, int64_t b, int64_t j) {
  if (r.mode == kNoiseTensor) return noise[b * r.length + j];
  return philox_randn(seeds[b], r.base + j);
}

// Runs fn(b, chunk, begin, end) over every (sample, chunk) pair in parallel; results land in per-pair slots
// and are combined in a fixed order, so the output is deterministic and independent of the thread count.
template <typename Fn>
void for_each_chunk(const Rows& r, const Fn& fn) {
  at::parallel_for(0, r.batch * r.nsplit, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / r.nsplit, k = t % r.nsplit;
      fn(b, k, k * kChunk, std::min(r.length, (k + 1) * kChunk));
    }
  });
}

void sample_sums(const Rows& r, const float* partial, int64_t b, float out[4]) {
  for (int i = 0; i < 4; ++i) out[i] = 0.0f;
  for (int64_t k = 0; k < r.nsplit; ++k)
    for (int i = 0; i < 4; ++i) out[i] += partial[(b * r.nsplit + k) * 4 + i];
}

template <typename T>
void fwd_impl(const Rows& r, const T* z, const float* noise, const int64_t* seeds, const float* scales, T* out,
              float* stats) {
  std::vector<float> partial(r.batch * r.nsplit * 4, 0.0f);
  for_each_chunk(r, [&](int64_t b, int64_t k, int64_t begin, int64_t end) {
    double zz = 0.0, ze = 0.0, ee = 0.0;  // host accumulators: double costs nothing here
    for (int64_t j = begin; j < end; ++j) {
      const float zv = static_cast<float>(z[b * r.length + j]);
      zz += zv * zv;
      if (r.mode != kNoiseNone) {
        const float e = noise_at(r, noise, seeds, b, j);
        ze += zv * e;
        ee += e * e;
      }
    }
    float* p = &partial[(b * r.nsplit + k) * 4];
    p[0] = static_cast<float>(zz), p[1] = static_cast<float>(ze), p[2] = static_cast<float>(ee), p[3] = 0.0f;
  });
  const float length = static_cast<float>(r.length);
  std::vector<FwdCoeffs> coeffs(r.batch * r.pairs);
  for (int64_t b = 0; b < r.batch; ++b) {
    float s[4];
    sample_sums(r, partial.data(), b, s);
    const float a = spherify_a(s[0], length);
    for (int64_t p = 0; p < r.pairs; ++p)
      coeffs[p * r.batch + b] = r.mode == kNoiseNone ? FwdCoeffs{a, 0.0f}
                                                     : fwd_coeffs(a, s[0], s[1], s[2], scales[p * r.batch + b], length);
    for (int i = 0; i < 3; ++i) stats[b * 3 + i] = s[i];
  }
  for_each_chunk(r, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float zv = static_cast<float>(z[b * r.length + j]);
      const float e = r.mode == kNoiseNone ? 0.0f : noise_at(r, noise, seeds, b, j);
      for (int64_t p = 0; p < r.pairs; ++p) {
        const FwdCoeffs c = coeffs[p * r.batch + b];
        out[(p * r.batch + b) * r.length + j] = static_cast<T>(r.mode == kNoiseNone ? c.cz * zv : c.cz * zv + c.ce * e);
      }
    }
  });
}

template <typename T>
void bwd_impl(const Rows& r, const T* g, const T* z, const float* noise, const int64_t* seeds, const float* scales,
              const float* stats, T* dz, float* dscales) {
  std::vector<float> partial(r.batch * r.nsplit * 4, 0.0f);
  for_each_chunk(r, [&](int64_t b, int64_t k, int64_t begin, int64_t end) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};  // z.g0, e.g0, z.g1, e.g1
    for (int64_t j = begin; j < end; ++j) {
      const float zv = static_cast<float>(z[b * r.length + j]);
      const float e = r.mode == kNoiseNone ? 0.0f : noise_at(r, noise, seeds, b, j);
      for (int64_t p = 0; p < r.pairs; ++p) {
        const float gv = static_cast<float>(g[(p * r.batch + b) * r.length + j]);
        acc[2 * p] += zv * gv;
        acc[2 * p + 1] += e * gv;
      }
    }
    for (int i = 0; i < 4; ++i) partial[(b * r.nsplit + k) * 4 + i] = static_cast<float>(acc[i]);
  });
  const float length = static_cast<float>(r.length);
  std::vector<BwdCoeffs> coeffs(r.batch);
  for (int64_t b = 0; b < r.batch; ++b) {
    float s[4];
    sample_sums(r, partial.data(), b, s);
    const float szz = stats[b * 3], sze = stats[b * 3 + 1], see = stats[b * 3 + 2];
    const float a = spherify_a(szz, length);
    BwdTerms terms[kMaxPairs];
    float sc[kMaxPairs] = {0.0f, 0.0f};
    for (int64_t p = 0; p < r.pairs; ++p) {
      sc[p] = r.mode == kNoiseNone ? 0.0f : scales[p * r.batch + b];
      terms[p] = bwd_terms(a, szz, sze, see, sc[p], s[2 * p], s[2 * p + 1], length);
      dscales[p * r.batch + b] = terms[p].ds;
    }
    coeffs[b] = bwd_coeffs(a, terms, sc, static_cast<int>(r.pairs), length);
  }
  for_each_chunk(r, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
    const BwdCoeffs c = coeffs[b];
    for (int64_t j = begin; j < end; ++j) {
      const float zv = static_cast<float>(z[b * r.length + j]);
      float acc = c.cz * zv;
      if (r.mode != kNoiseNone) acc += c.ce * noise_at(r, noise, seeds, b, j);
      for (int64_t p = 0; p < r.pairs; ++p) acc += c.cg[p] * static_cast<float>(g[(p * r.batch + b) * r.length + j]);
      dz[b * r.length + j] = static_cast<T>(acc);
    }
  });
}

Rows make_rows(const at::Tensor& z, const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& noise,
               int64_t stream) {
  Rows r;
  r.batch = z.size(0);
  r.length = z.numel() / r.batch;
  r.pairs = scales.has_value() ? scales->size(0) : 1;
  r.nsplit = num_chunks(r.length);
  r.mode = !scales.has_value() ? kNoiseNone : (noise.has_value() ? kNoiseTensor : kNoisePhilox);
  r.base = stream * r.length;
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> spherify_fwd_cpu(const at::Tensor& z, const c10::optional<at::Tensor>& scales,
                                                    const c10::optional<at::Tensor>& noise,
                                                    const c10::optional<at::Tensor>& seeds, int64_t stream) {
  const Rows r = make_rows(z, scales, noise, stream);
  const at::Tensor z2 = z.contiguous();
  const at::Tensor n2 = r.mode == kNoiseTensor ? noise->contiguous().to(at::kFloat) : at::Tensor();
  const at::Tensor sd = r.mode == kNoisePhilox ? seeds->contiguous() : at::Tensor();
  const at::Tensor sc = scales.has_value() ? scales->contiguous().to(at::kFloat) : at::Tensor();
  std::vector<int64_t> out_shape{r.pairs};
  for (int64_t d : z.sizes()) out_shape.push_back(d);
  at::Tensor out = at::empty(out_shape, z.options());
  at::Tensor stats = at::empty({r.batch, 3}, z.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "spherify_fwd_cpu", [&] {
    fwd_impl<scalar_t>(r, z2.data_ptr<scalar_t>(), n2.defined() ? n2.data_ptr<float>() : nullptr,
                       sd.defined() ? sd.data_ptr<int64_t>() : nullptr, sc.defined() ? sc.data_ptr<float>() : nullptr,
                       out.data_ptr<scalar_t>(), stats.data_ptr<float>());
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> spherify_bwd_cpu(const at::Tensor& grad, const at::Tensor& z,
                                                    const c10::optional<at::Tensor>& scales,
                                                    const c10::optional<at::Tensor>& noise,
                                                    const c10::optional<at::Tensor>& seeds, const at::Tensor& stats,
                                                    int64_t stream) {
  const Rows r = make_rows(z, scales, noise, stream);
  const at::Tensor z2 = z.contiguous();
  const at::Tensor g2 = grad.to(z.scalar_type()).contiguous();
  const at::Tensor n2 = r.mode == kNoiseTensor ? noise->contiguous().to(at::kFloat) : at::Tensor();
  const at::Tensor sd = r.mode == kNoisePhilox ? seeds->contiguous() : at::Tensor();
  const at::Tensor sc = scales.has_value() ? scales->contiguous().to(at::kFloat) : at::Tensor();
  const at::Tensor st = stats.contiguous().to(at::kFloat);
  at::Tensor dz = at::empty(z.sizes(), z.options());
  at::Tensor dscales = at::zeros({r.pairs, r.batch}, z.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "spherify_bwd_cpu", [&] {
    bwd_impl<scalar_t>(r, g2.data_ptr<scalar_t>(), z2.data_ptr<scalar_t>(),
                       n2.defined() ? n2.data_ptr<float>() : nullptr, sd.defined() ? sd.data_ptr<int64_t>() : nullptr,
                       sc.defined() ? sc.data_ptr<float>() : nullptr, st.data_ptr<float>(), dz.data_ptr<scalar_t>(),
                       dscales.data_ptr<float>());
  });
  return {dz, dscales};
}

at::Tensor sphere_noise_cpu(const at::Tensor& seeds, int64_t length, int64_t stream) {
  const at::Tensor sd = seeds.contiguous();
  const int64_t batch = sd.size(0);
  at::Tensor out = at::empty({batch, length}, sd.options().dtype(at::kFloat));
  const int64_t* s = sd.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, batch * length, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) o[i] = philox_randn(s[i / length], stream * length + i % length);
  });
  return out;
}

at::Tensor philox_below_cpu(const at::Tensor& seeds, int64_t counter, int64_t n) {
  const at::Tensor sd = seeds.contiguous();
  at::Tensor out = at::empty_like(sd);
  const int64_t* s = sd.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < sd.size(0); ++b) o[b] = philox_below(s[b], counter, n);
  return out;
}

}  // namespace sphere_fast
