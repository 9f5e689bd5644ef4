// SwiGLU math shared by the CPU (swiglu_cpu.cpp) and CUDA (swiglu_cuda.cu) kernels. Torch-free.
// out = silu(a) * b;  da = dout * b * sig * (1 + a * (1 - sig));  db = dout * silu(a);  sig = sigmoid(a).
#pragma once

#include <cmath>
#include <cstdint>

#include "sf_device.h"

namespace sphere_fast {

SF_HD float swiglu_sigmoid(float a) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + __expf(-a));
#else
  return 1.0f / (1.0f + std::exp(-a));
#endif
}

SF_HD float swiglu_out(float a, float b) { return a * swiglu_sigmoid(a) * b; }

SF_HD void swiglu_grad(float a, float b, float dout, float* da, float* db) {
  const float sig = swiglu_sigmoid(a);
  *da = dout * b * sig * (1.0f + a * (1.0f - sig));
  *db = dout * (a * sig);  // silu(a) first: dout * a may overflow where silu(a) is 0
}

// Threads of a CUDA block: a row's H columns run as ceil(H / (kSwigluThreads * columns a thread)) blocks on grid
// axis y, which the binding checks.
constexpr int kSwigluThreads = 256;

// h is [M, 2H] with row stride stride_h and a unit last stride; out/dout are contiguous [M, H],
// dh contiguous [M, 2H].
struct SwigluParams {
  const void* h;
  const void* dout;
  void* out;
  void* dh;
  int64_t M, H, stride_h;
};

// The CUDA entry points return the launch's cudaError_t as int (0 = success).
void swiglu_fwd_cpu(const SwigluParams& p, DType dt);
void swiglu_bwd_cpu(const SwigluParams& p, DType dt);
int swiglu_fwd_cuda(const SwigluParams& p, DType dt, void* stream);
int swiglu_bwd_cuda(const SwigluParams& p, DType dt, void* stream);

}  // namespace sphere_fast
