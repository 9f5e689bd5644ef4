// Declarations shared by the spherify C++ sources: the CPU implementations (spherify_cpu.cpp) and the
// torch-free CUDA launchers (spherify_cuda.cu), both registered in spherify_binding.cpp.
#pragma once

#include <cstdint>
#include <tuple>

#include "sf_device.h"

#ifndef SPHERIFY_CUDA_ONLY
#include <ATen/ATen.h>

namespace sphere_fast {

std::tuple<at::Tensor, at::Tensor> spherify_fwd_cpu(const at::Tensor& z, const c10::optional<at::Tensor>& scales,
                                                    const c10::optional<at::Tensor>& noise,
                                                    const c10::optional<at::Tensor>& seeds, int64_t stream);
std::tuple<at::Tensor, at::Tensor> spherify_bwd_cpu(const at::Tensor& grad, const at::Tensor& z,
                                                    const c10::optional<at::Tensor>& scales,
                                                    const c10::optional<at::Tensor>& noise,
                                                    const c10::optional<at::Tensor>& seeds, const at::Tensor& stats,
                                                    int64_t stream);
at::Tensor sphere_noise_cpu(const at::Tensor& seeds, int64_t length, int64_t stream);
at::Tensor philox_below_cpu(const at::Tensor& seeds, int64_t counter, int64_t n);

}  // namespace sphere_fast
#endif

namespace sphere_fast {

// Problem description passed to the torch-free CUDA launchers. Pointers are device pointers; z and grad rows
// are contiguous [B, L] (grad and out are [P, B, L]); noise is float [B, L] or null; seeds int64 [B] or null.
struct SpherifyArgs {
  const void* z;
  const void* grad;
  const float* noise;
  const int64_t* seeds;
  const float* scales;  // [P, B]
  const float* stats;   // [B, 3] saved by forward (backward input)
  void* out;            // forward: [P, B, L]; backward: dz [B, L]
  float* stats_out;     // forward: [B, 3]
  float* dscales;       // backward: [P, B]
  float* partial;       // workspace [B, num_chunks(L), 4]
  int64_t batch, length, pairs, base;
  int mode;
  DType type;  // of z, out, grad and dz; explicit noise is passed as float
};

// Each returns a cudaError_t as int (0 = success); stream is a cudaStream_t.
int spherify_fwd_cuda(const SpherifyArgs& args, void* stream);
int spherify_bwd_cuda(const SpherifyArgs& args, void* stream);
int sphere_noise_cuda(const int64_t* seeds, float* out, int64_t batch, int64_t length, int64_t base, void* stream);
int philox_below_cuda(const int64_t* seeds, int64_t* out, int64_t batch, int64_t counter, int64_t n, void* stream);

}  // namespace sphere_fast
