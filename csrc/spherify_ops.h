// Declarations shared by the spherify C++ sources: the torch-free CPU implementations (spherify_cpu.cpp) and CUDA
// launchers (spherify_cuda.cu), both given plain pointers by spherify_binding.cpp, which registers the ops.
#pragma once

#include <cstdint>

#include "sf_device.h"

namespace sphere_fast {

// Problem description passed to the CPU implementations and the CUDA launchers. Pointers are of the device the
// op runs on; z and grad rows are contiguous [B, L] (grad and out are [P, B, L]); noise is float [B, L] or null;
// seeds int64 [B] or null.
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

void spherify_fwd_cpu(const SpherifyArgs& args);
void spherify_bwd_cpu(const SpherifyArgs& args);
void sphere_noise_cpu(const int64_t* seeds, float* out, int64_t batch, int64_t length, int64_t base);
void philox_below_cpu(const int64_t* seeds, int64_t* out, int64_t batch, int64_t counter, int64_t n);

// Each returns a cudaError_t as int (0 = success); stream is a cudaStream_t.
int spherify_fwd_cuda(const SpherifyArgs& args, void* stream);
int spherify_bwd_cuda(const SpherifyArgs& args, void* stream);
int sphere_noise_cuda(const int64_t* seeds, float* out, int64_t batch, int64_t length, int64_t base, void* stream);
int philox_below_cuda(const int64_t* seeds, int64_t* out, int64_t batch, int64_t counter, int64_t n, void* stream);

}  // namespace sphere_fast
