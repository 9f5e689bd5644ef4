// CUDA SwiGLU kernels (torch-free; launched from swiglu_binding.cpp), math shared with the CPU kernels
// through swiglu_math.h. Grid: x over rows, y over column blocks, so a and b are read straight out of h.
#include <cuda_runtime.h>

#include "sf_cuda_util.cuh"
#include "swiglu_math.h"

namespace sphere_fast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void swiglu_fwd_kernel(const SwigluParams p) {
  const int64_t m = blockIdx.x, j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (j >= p.H) return;
  const T* h = static_cast<const T*>(p.h) + m * p.stride_h;
  static_cast<T*>(p.out)[m * p.H + j] = from_f<T>(swiglu_out(to_f(h[j]), to_f(h[p.H + j])));
}

template <typename T>
__global__ void swiglu_bwd_kernel(const SwigluParams p) {
  const int64_t m = blockIdx.x, j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (j >= p.H) return;
  const T* h = static_cast<const T*>(p.h) + m * p.stride_h;
  float da, db;
  swiglu_grad(to_f(h[j]), to_f(h[p.H + j]), to_f(static_cast<const T*>(p.dout)[m * p.H + j]), &da, &db);
  T* dh = static_cast<T*>(p.dh) + m * 2 * p.H;
  dh[j] = from_f<T>(da);
  dh[p.H + j] = from_f<T>(db);
}

dim3 grid_for(const SwigluParams& p) {
  return dim3(static_cast<unsigned>(p.M), static_cast<unsigned>((p.H + kThreads - 1) / kThreads));
}

}  // namespace

void swiglu_fwd_cuda(const SwigluParams& p, DType dt, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: return swiglu_fwd_kernel<float><<<grid_for(p), kThreads, 0, st>>>(p);
    case DType::kFloat16: return swiglu_fwd_kernel<__half><<<grid_for(p), kThreads, 0, st>>>(p);
    case DType::kBFloat16: return swiglu_fwd_kernel<__nv_bfloat16><<<grid_for(p), kThreads, 0, st>>>(p);
  }
}

void swiglu_bwd_cuda(const SwigluParams& p, DType dt, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: return swiglu_bwd_kernel<float><<<grid_for(p), kThreads, 0, st>>>(p);
    case DType::kFloat16: return swiglu_bwd_kernel<__half><<<grid_for(p), kThreads, 0, st>>>(p);
    case DType::kBFloat16: return swiglu_bwd_kernel<__nv_bfloat16><<<grid_for(p), kThreads, 0, st>>>(p);
  }
}

}  // namespace sphere_fast
