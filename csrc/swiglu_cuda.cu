// CUDA SwiGLU kernels (torch-free; launched from swiglu_binding.cpp), math shared with the CPU kernels
// through swiglu_math.h. Grid: x over rows, y over column blocks, so a and b are read straight out of h.
// Where a row's halves, its stride and every base address are multiples of 16 bytes (the model's widths),
// each thread moves 16-byte vectors of columns; otherwise one column.
#include <cuda_runtime.h>

#include "sf_cuda_util.cuh"
#include "swiglu_math.h"

namespace sphere_fast {
namespace {


template <typename T>
__global__ void swiglu_fwd_kernel(const SwigluParams p) {
  const int64_t m = blockIdx.x, j = static_cast<int64_t>(blockIdx.y) * kSwigluThreads + threadIdx.x;
  if (j >= p.H) return;
  const T* h = static_cast<const T*>(p.h) + m * p.stride_h;
  static_cast<T*>(p.out)[m * p.H + j] = from_f<T>(swiglu_out(to_f(h[j]), to_f(h[p.H + j])));
}

template <typename T>
__global__ void swiglu_bwd_kernel(const SwigluParams p) {
  const int64_t m = blockIdx.x, j = static_cast<int64_t>(blockIdx.y) * kSwigluThreads + threadIdx.x;
  if (j >= p.H) return;
  const T* h = static_cast<const T*>(p.h) + m * p.stride_h;
  float da, db;
  swiglu_grad(to_f(h[j]), to_f(h[p.H + j]), to_f(static_cast<const T*>(p.dout)[m * p.H + j]), &da, &db);
  T* dh = static_cast<T*>(p.dh) + m * 2 * p.H;
  dh[j] = from_f<T>(da);
  dh[p.H + j] = from_f<T>(db);
}

// A thread's vector of columns [j, j + V) of row m, with the a and b halves of h there.
template <typename T>
struct HalvesAt {
  int64_t m, j;
  Vec16<T> a, b;
};

// Reads this thread's HalvesAt; false past the row's end.
template <typename T>
__device__ __forceinline__ bool load_halves(const SwigluParams& p, HalvesAt<T>& at) {
  at.m = blockIdx.x;
  at.j = (static_cast<int64_t>(blockIdx.y) * kSwigluThreads + threadIdx.x) * Vec16<T>::kLen;
  if (at.j >= p.H) return false;
  const T* h = static_cast<const T*>(p.h) + at.m * p.stride_h;
  at.a = load16(h + at.j);
  at.b = load16(h + p.H + at.j);
  return true;
}

template <typename T>
__global__ void swiglu_fwd_vec_kernel(const SwigluParams p) {
  HalvesAt<T> at;
  if (!load_halves(p, at)) return;
  Vec16<T> out;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kLen; ++i) out[i] = from_f<T>(swiglu_out(to_f(at.a[i]), to_f(at.b[i])));
  store16(static_cast<T*>(p.out) + at.m * p.H + at.j, out);
}

template <typename T>
__global__ void swiglu_bwd_vec_kernel(const SwigluParams p) {
  HalvesAt<T> at;
  if (!load_halves(p, at)) return;
  const Vec16<T> dout = load16(static_cast<const T*>(p.dout) + at.m * p.H + at.j);
  Vec16<T> da, db;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kLen; ++i) {
    float fa, fb;
    swiglu_grad(to_f(at.a[i]), to_f(at.b[i]), to_f(dout[i]), &fa, &fb);
    da[i] = from_f<T>(fa);
    db[i] = from_f<T>(fb);
  }
  T* dh = static_cast<T*>(p.dh) + at.m * 2 * p.H;
  store16(dh + at.j, da);
  store16(dh + p.H + at.j, db);
}

// out / dout are [M, H] and dh [M, 2H], contiguous: with H a multiple of the vector, their rows start aligned
// where their bases do.
template <typename T>
bool vectorizable(const SwigluParams& p) {
  constexpr int V = Vec16<T>::kLen;
  return p.H % V == 0 && p.stride_h % V == 0 && aligned16(p.h) && aligned16(p.out) && aligned16(p.dout) &&
         aligned16(p.dh);
}

dim3 grid_for(const SwigluParams& p, int64_t columns_per_thread) {
  const int64_t per_block = kSwigluThreads * columns_per_thread;
  // rows on x: the binding has checked that they fit
  return dim3(static_cast<unsigned>(p.M), static_cast<unsigned>((p.H + per_block - 1) / per_block));
}

template <typename T>
void fwd_launch(const SwigluParams& p, cudaStream_t st) {
  if (vectorizable<T>(p)) swiglu_fwd_vec_kernel<T><<<grid_for(p, Vec16<T>::kLen), kSwigluThreads, 0, st>>>(p);
  else swiglu_fwd_kernel<T><<<grid_for(p, 1), kSwigluThreads, 0, st>>>(p);
}

template <typename T>
void bwd_launch(const SwigluParams& p, cudaStream_t st) {
  if (vectorizable<T>(p)) swiglu_bwd_vec_kernel<T><<<grid_for(p, Vec16<T>::kLen), kSwigluThreads, 0, st>>>(p);
  else swiglu_bwd_kernel<T><<<grid_for(p, 1), kSwigluThreads, 0, st>>>(p);
}

}  // namespace

int swiglu_fwd_cuda(const SwigluParams& p, DType dt, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: fwd_launch<float>(p, st); break;
    case DType::kFloat16: fwd_launch<__half>(p, st); break;
    case DType::kBFloat16: fwd_launch<__nv_bfloat16>(p, st); break;
  }
  return static_cast<int>(cudaGetLastError());
}

int swiglu_bwd_cuda(const SwigluParams& p, DType dt, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: bwd_launch<float>(p, st); break;
    case DType::kFloat16: bwd_launch<__half>(p, st); break;
    case DType::kBFloat16: bwd_launch<__nv_bfloat16>(p, st); break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sphere_fast
