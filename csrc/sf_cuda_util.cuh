// Small device helpers shared by sphere_fast's torch-free CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sphere_fast {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of T (8 bf16 / fp16 or 4 fp32), loaded and stored as one 128-bit access (LDG.E.128 / STG.E.128):
// an eighth of the memory instructions of 16-bit accesses. Held as a uint4, its elements reached through
// operator[]. The store is written in PTX: nvcc splits a C++ store of a value built element by element into
// four 32-bit stores (and __stwb's st.global.wb becomes a STRONG.SM store).
template <typename T>
struct Vec16 {
  static constexpr int kLen = 16 / sizeof(T);
  uint4 bits;
  __device__ __forceinline__ T& operator[](int i) { return reinterpret_cast<T*>(&bits)[i]; }
  __device__ __forceinline__ const T& operator[](int i) const { return reinterpret_cast<const T*>(&bits)[i]; }
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  return Vec16<T>{*reinterpret_cast<const uint4*>(p)};
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
  asm("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.bits.x), "r"(v.bits.y), "r"(v.bits.z),
      "r"(v.bits.w) : "memory");
}

// Whether p may be read or written with 16-byte accesses.
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Sum over a block whose size is a multiple of 32; every thread gets the total. `smem` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // smem may still be read by the previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace sphere_fast
