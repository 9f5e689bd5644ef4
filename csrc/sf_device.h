// Shared by the torch-free math headers of sphere_fast: host/device qualifiers and the dtype tag the
// bindings pass to torch-free kernels.
#pragma once

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace sphere_fast {
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
}  // namespace sphere_fast
