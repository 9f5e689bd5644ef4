// AdaLN math shared by the CPU (adaln_cpu.cpp) and CUDA (adaln_cuda.cu) kernels. Torch-free.
//
//   res = x + gate * branch            (gate absent = 1; branch absent: res = x)
//   y   = res * rstd * w * (1 + scale) + shift,   rstd = 1 / sqrt(mean(res^2) + eps)
// Backward, with n = res * rstd and dn = dy * w * (1 + scale):
//   dres_total = rstd * (dn - n * mean(dn * n)) + dres;  dbranch = dres_total * gate;
//   dgate = dres_total * branch;  dshift = dy;  dscale = dy * n * w;  dweight = dy * n * (1 + scale).
// All math is fp32; the operation order matches the eager reference (normalise, * w, * (1+scale), + shift).
#pragma once

#include <cmath>
#include <cstdint>

#include "sf_device.h"

namespace sphere_fast {

// Pointers are nullptr when the input is absent. [B, S, D] tensors are addressed by
// (stride_b, stride_s) with a unit last stride; a (B, 1, D) modulation has stride_s == 0.
struct AdalnFwdParams {
  const void* x;
  const void* branch;
  const void* gate;
  const void* weight;
  const void* shift;
  const void* scale;
  void* res;    // contiguous [B*S, D]; nullptr when branch is absent
  void* y;      // contiguous [B*S, D]
  float* rstd;  // [B*S]
  int64_t B, S, D;
  float eps;
  int64_t sx_b, sx_s, sbr_b, sbr_s, sg_b, sg_s, ssh_b, ssh_s, ssc_b, ssc_s;
};

// Program (b, c) of the backward owns rows [c * rows_per_prog, (c + 1) * rows_per_prog) of sample b and
// writes one row of column partials (pw, pg, psh, psc: fp32 [B * chunks, D]); a second small reduction
// over the B * chunks partials finishes the weight and broadcast-modulation grads.
struct AdalnBwdParams {
  const void* dy;    // contiguous [B*S, D]
  const void* dres;  // contiguous or nullptr
  const void* res;   // contiguous
  const void* branch;
  const void* gate;
  const void* weight;
  const void* scale;
  const float* rstd;
  void* dx;       // contiguous [B*S, D]
  void* dbranch;  // contiguous, nullptr when branch is absent
  void* dgate;    // per-token grads (contiguous [B*S, D]), nullptr when broadcast or absent
  void* dshift;
  void* dscale;
  float* pw;  // partials, nullptr when not needed
  float* pg;
  float* psh;
  float* psc;
  bool has_shift;
  int64_t B, S, D, chunks, rows_per_prog;
  int64_t sbr_b, sbr_s, sg_b, sg_s, ssc_b, ssc_s;
};

SF_HD float adaln_rsqrt(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

SF_HD float adaln_residual(float x, float gate, float branch) { return x + gate * branch; }

SF_HD float adaln_rstd(float sum_sq, int64_t D, float eps) {
  return adaln_rsqrt(sum_sq / static_cast<float>(D) + eps);
}

SF_HD float adaln_out(float r, float rstd, float w, float scale, float shift) {
  return r * rstd * w * (1.0f + scale) + shift;
}

// Gradient reaching res through the normalisation, plus the gradient of res itself.
SF_HD float adaln_dres(float dn, float n, float mean_dn_n, float rstd, float dres) {
  return rstd * (dn - n * mean_dn_n) + dres;
}

// Kernel entry points (adaln_cpu.cpp, adaln_cuda.cu); every tensor shares the dtype `dt`.
void adaln_fwd_cpu(const AdalnFwdParams& p, DType dt);
void adaln_bwd_cpu(const AdalnBwdParams& p, DType dt);
void adaln_fwd_cuda(const AdalnFwdParams& p, DType dt, void* stream);
void adaln_bwd_cuda(const AdalnBwdParams& p, DType dt, void* stream);

}  // namespace sphere_fast
