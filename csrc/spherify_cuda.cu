// CUDA kernels of the spherify ops (torch-free; launched from spherify_binding.cpp). Same two passes each way
// and the same shared math as the CPU path and the Triton kernels:
//   partials: one block per (chunk, sample) reduces z.z, z.e, e.e (forward) or z.g_p, e.g_p (backward) -> partial
//   apply:    each block sums its sample's partials in a fixed order, derives the per-sample coefficients
//             (spherify_math.h) and writes out = cz*z + ce*e (forward) or dz (backward).
// e is regenerated with Philox in both passes and never stored.
#include <cuda_runtime.h>

#include "sf_cuda_util.cuh"
#include "spherify_math.h"
#include "spherify_ops.h"

namespace sphere_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <int MODE>
__device__ __forceinline__ float noise_at(const float* noise, int64_t seed, int64_t base, int64_t b, int64_t length,
                                          int64_t j) {
  if constexpr (MODE == kNoiseTensor) return noise[b * length + j];
  if constexpr (MODE == kNoisePhilox) return philox_randn(seed, base + j);
  return 0.0f;
}

// Sums four per-thread values over the block (fixed order: deterministic); thread 0 writes the totals to
// out[0..3], this (sample, chunk)'s row of the partials that the apply pass adds up.
__device__ __forceinline__ void store_block_sums4(float v[4], float* out) {
  __shared__ float warp_sums[4][kWarps];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < 4; ++i) warp_sums[i][warp] = v[i];
  __syncthreads();
  if (threadIdx.x == 0)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += warp_sums[i][w];
      out[i] = s;
    }
}

__device__ __forceinline__ void sample_sums(const float* partial, int64_t b, int64_t nsplit, float s[4]) {
  for (int i = 0; i < 4; ++i) s[i] = 0.0f;
  for (int64_t k = 0; k < nsplit; ++k)
    for (int i = 0; i < 4; ++i) s[i] += partial[(b * nsplit + k) * 4 + i];
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) fwd_partials(SpherifyArgs a) {
  const int64_t b = blockIdx.x, k = blockIdx.y, nsplit = gridDim.y;
  const T* z = static_cast<const T*>(a.z) + b * a.length;
  const int64_t seed = MODE == kNoisePhilox ? a.seeds[b] : 0;
  const int64_t end = min(a.length, (k + 1) * kChunk);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t j = k * kChunk + threadIdx.x; j < end; j += kThreads) {
    const float zv = to_f(z[j]);
    acc[0] += zv * zv;
    if constexpr (MODE != kNoiseNone) {
      const float e = noise_at<MODE>(a.noise, seed, a.base, b, a.length, j);
      acc[1] += zv * e;
      acc[2] += e * e;
    }
  }
  store_block_sums4(acc, a.partial + (b * nsplit + k) * 4);
}

template <typename T, int MODE, int PAIRS>
__global__ void __launch_bounds__(kThreads) fwd_apply(SpherifyArgs a) {
  const int64_t b = blockIdx.x, k = blockIdx.y, nsplit = gridDim.y;
  __shared__ FwdCoeffs coeffs[PAIRS];
  if (threadIdx.x == 0) {
    float s[4];
    sample_sums(a.partial, b, nsplit, s);
    const float length = static_cast<float>(a.length);
    const float amp = spherify_a(s[0], length);
    for (int p = 0; p < PAIRS; ++p)
      coeffs[p] = MODE == kNoiseNone ? FwdCoeffs{amp, 0.0f}
                                     : fwd_coeffs(amp, s[0], s[1], s[2], a.scales[p * a.batch + b], length);
    if (k == 0)
      for (int i = 0; i < 3; ++i) a.stats_out[b * 3 + i] = s[i];
  }
  __syncthreads();
  const T* z = static_cast<const T*>(a.z) + b * a.length;
  T* out = static_cast<T*>(a.out);
  const int64_t seed = MODE == kNoisePhilox ? a.seeds[b] : 0;
  const int64_t end = min(a.length, (k + 1) * kChunk);
  for (int64_t j = k * kChunk + threadIdx.x; j < end; j += kThreads) {
    const float zv = to_f(z[j]);
    const float e = noise_at<MODE>(a.noise, seed, a.base, b, a.length, j);
#pragma unroll
    for (int p = 0; p < PAIRS; ++p)
      out[(p * a.batch + b) * a.length + j] = from_f<T>(coeffs[p].cz * zv + coeffs[p].ce * e);
  }
}

template <typename T, int MODE, int PAIRS>
__global__ void __launch_bounds__(kThreads) bwd_partials(SpherifyArgs a) {
  const int64_t b = blockIdx.x, k = blockIdx.y, nsplit = gridDim.y;
  const T* z = static_cast<const T*>(a.z) + b * a.length;
  const T* g = static_cast<const T*>(a.grad);
  const int64_t seed = MODE == kNoisePhilox ? a.seeds[b] : 0;
  const int64_t end = min(a.length, (k + 1) * kChunk);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // z.g0, e.g0, z.g1, e.g1
  for (int64_t j = k * kChunk + threadIdx.x; j < end; j += kThreads) {
    const float zv = to_f(z[j]);
    const float e = noise_at<MODE>(a.noise, seed, a.base, b, a.length, j);
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
      const float gv = to_f(g[(p * a.batch + b) * a.length + j]);
      acc[2 * p] += zv * gv;
      acc[2 * p + 1] += e * gv;
    }
  }
  store_block_sums4(acc, a.partial + (b * nsplit + k) * 4);
}

template <typename T, int MODE, int PAIRS>
__global__ void __launch_bounds__(kThreads) bwd_apply(SpherifyArgs a) {
  const int64_t b = blockIdx.x, k = blockIdx.y, nsplit = gridDim.y;
  __shared__ BwdCoeffs coeffs;
  if (threadIdx.x == 0) {
    float s[4];
    sample_sums(a.partial, b, nsplit, s);
    const float length = static_cast<float>(a.length);
    const float szz = a.stats[b * 3], sze = a.stats[b * 3 + 1], see = a.stats[b * 3 + 2];
    const float amp = spherify_a(szz, length);
    BwdTerms terms[PAIRS];
    float sc[PAIRS];
    for (int p = 0; p < PAIRS; ++p) {
      sc[p] = MODE == kNoiseNone ? 0.0f : a.scales[p * a.batch + b];
      terms[p] = bwd_terms(amp, szz, sze, see, sc[p], s[2 * p], s[2 * p + 1], length);
      if (k == 0) a.dscales[p * a.batch + b] = terms[p].ds;
    }
    coeffs = bwd_coeffs(amp, terms, sc, PAIRS, length);
  }
  __syncthreads();
  const T* z = static_cast<const T*>(a.z) + b * a.length;
  const T* g = static_cast<const T*>(a.grad);
  T* dz = static_cast<T*>(a.out) + b * a.length;
  const int64_t seed = MODE == kNoisePhilox ? a.seeds[b] : 0;
  const int64_t end = min(a.length, (k + 1) * kChunk);
  for (int64_t j = k * kChunk + threadIdx.x; j < end; j += kThreads) {
    float acc = coeffs.cz * to_f(z[j]);
    if constexpr (MODE != kNoiseNone) acc += coeffs.ce * noise_at<MODE>(a.noise, seed, a.base, b, a.length, j);
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) acc += coeffs.cg[p] * to_f(g[(p * a.batch + b) * a.length + j]);
    dz[j] = from_f<T>(acc);
  }
}

__global__ void __launch_bounds__(kThreads) noise_kernel(const int64_t* seeds, float* out, int64_t length, int64_t base) {
  const int64_t b = blockIdx.x;
  const int64_t seed = seeds[b];
  for (int64_t j = blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x; j < length;
       j += static_cast<int64_t>(gridDim.y) * kThreads)
    out[b * length + j] = philox_randn(seed, base + j);
}

__global__ void __launch_bounds__(kThreads)
    philox_below_kernel(const int64_t* seeds, int64_t* out, int64_t batch, int64_t counter, int64_t n) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (b < batch) out[b] = philox_below(seeds[b], counter, n);
}

template <typename T, int MODE, int PAIRS>
int launch_fwd(const SpherifyArgs& a, cudaStream_t stream) {
  // batch on x (up to 2^31 - 1 blocks), chunks on y
  const dim3 grid(static_cast<unsigned>(a.batch), static_cast<unsigned>(num_chunks(a.length)));
  fwd_partials<T, MODE><<<grid, kThreads, 0, stream>>>(a);
  fwd_apply<T, MODE, PAIRS><<<grid, kThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int MODE, int PAIRS>
int launch_bwd(const SpherifyArgs& a, cudaStream_t stream) {
  // batch on x (up to 2^31 - 1 blocks), chunks on y
  const dim3 grid(static_cast<unsigned>(a.batch), static_cast<unsigned>(num_chunks(a.length)));
  bwd_partials<T, MODE, PAIRS><<<grid, kThreads, 0, stream>>>(a);
  bwd_apply<T, MODE, PAIRS><<<grid, kThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

// (mode, pairs) -> template instance; plain spherify is mode none with one output.
template <typename T, bool FWD>
int dispatch_mode(const SpherifyArgs& a, cudaStream_t s) {
  auto go = [&](auto mode, auto pairs) {
    constexpr int M = decltype(mode)::value, P = decltype(pairs)::value;
    return FWD ? launch_fwd<T, M, P>(a, s) : launch_bwd<T, M, P>(a, s);
  };
  using std::integral_constant;
  if (a.mode == kNoiseNone) return go(integral_constant<int, kNoiseNone>{}, integral_constant<int, 1>{});
  if (a.mode == kNoiseTensor)
    return a.pairs == 2 ? go(integral_constant<int, kNoiseTensor>{}, integral_constant<int, 2>{})
                        : go(integral_constant<int, kNoiseTensor>{}, integral_constant<int, 1>{});
  return a.pairs == 2 ? go(integral_constant<int, kNoisePhilox>{}, integral_constant<int, 2>{})
                      : go(integral_constant<int, kNoisePhilox>{}, integral_constant<int, 1>{});
}

template <bool FWD>
int dispatch(const SpherifyArgs& a, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.type) {
    case DType::kFloat16: return dispatch_mode<__half, FWD>(a, s);
    case DType::kBFloat16: return dispatch_mode<__nv_bfloat16, FWD>(a, s);
    default: return dispatch_mode<float, FWD>(a, s);
  }
}

}  // namespace

int spherify_fwd_cuda(const SpherifyArgs& args, void* stream) { return dispatch<true>(args, stream); }

int spherify_bwd_cuda(const SpherifyArgs& args, void* stream) { return dispatch<false>(args, stream); }

int sphere_noise_cuda(const int64_t* seeds, float* out, int64_t batch, int64_t length, int64_t base, void* stream) {
  const int64_t blocks = (length + kThreads - 1) / kThreads;
  // batch on x (up to 2^31 - 1 blocks), at most 1024 blocks a sample on y
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(blocks < 1024 ? blocks : 1024));
  noise_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(seeds, out, length, base);
  return static_cast<int>(cudaGetLastError());
}

int philox_below_cuda(const int64_t* seeds, int64_t* out, int64_t batch, int64_t counter, int64_t n, void* stream) {
  const int64_t blocks = (batch + kThreads - 1) / kThreads;
  philox_below_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      seeds, out, batch, counter, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sphere_fast
