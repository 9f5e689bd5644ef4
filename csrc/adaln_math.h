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

// The backward's second stage: the B * chunks partial rows -> dweight [D] (all rows) and the per-sample dgate,
// dshift, dscale [B, D] (sample b's chunks rows each), summed in fp32 (in adaln_sum_partial_group's order) and
// rounded to the dtype. A partial is nullptr when its grad is not summed here (absent, or per token); its grad
// pointer then too.
struct AdalnFinishParams {
  const float* pw;
  const float* pg;
  const float* psh;
  const float* psc;
  void* dweight;
  void* dgate;
  void* dshift;
  void* dscale;
  int64_t B, chunks, D;
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

// Backward, first pass, on one column's values (one_sc = 1 + scale): the normalised n, dn = dy * w * one_sc, and
// the column's terms of the weight's and the scale's grads.
struct AdalnNormGrads {
  float n, dn, dweight, dscale;
};

SF_HD AdalnNormGrads adaln_norm_grads(float dy, float res, float rstd, float w, float one_sc) {
  const float n = res * rstd;
  return {n, dy * w * one_sc, dy * n * one_sc, dy * n * w};
}

// Per-column steps of the kernels, which keep their own loops and row reductions. d is the column; ro is the
// row's offset into the contiguous [B*S, D] outputs (and dy, dres, res), xo / bro / go / sho / sco its offsets
// into x, branch, gate, shift and scale. IO is the kernel file's element access policy:
//   IO::ld(ptr, i) -> float:     element i of the kernels' dtype, as fp32
//   IO::st(ptr, i, v) -> float:  stores v rounded to the dtype and returns the stored value as fp32

// Forward, first pass: the residual that is normalised, x + gate * branch rounded to the dtype and stored to
// res (as an unfused model would normalise the stored residual), or x when there is no branch.
template <class IO>
SF_HD float adaln_fwd_res_col(const AdalnFwdParams& p, int64_t d, int64_t ro, int64_t xo, int64_t bro, int64_t go) {
  const float x = IO::ld(p.x, xo + d);
  if (!p.branch) return x;
  const float g = p.gate ? IO::ld(p.gate, go + d) : 1.f;
  return IO::st(p.res, ro + d, adaln_residual(x, g, IO::ld(p.branch, bro + d)));
}

// Forward, second pass: y of the column from its residual r.
template <class IO>
SF_HD void adaln_fwd_out_col(const AdalnFwdParams& p, int64_t d, int64_t ro, int64_t sho, int64_t sco, float r,
                             float rstd) {
  const float w = p.weight ? IO::ld(p.weight, d) : 1.f;
  const float sc = p.scale ? IO::ld(p.scale, sco + d) : 0.f;
  const float sh = p.shift ? IO::ld(p.shift, sho + d) : 0.f;
  IO::st(p.y, ro + d, adaln_out(r, rstd, w, sc, sh));
}

// Backward, first pass (w: the column's weight): n = res * rstd and dn = dy * w * (1 + scale); adds dn * n to
// the row's dot and the column's weight, shift and scale grads to aw, ash, asc, except that per-token
// dshift / dscale are stored instead.
template <class IO>
SF_HD void adaln_bwd_norm_col(const AdalnBwdParams& p, int64_t d, int64_t ro, int64_t sco, float w, float rstd,
                              float& n, float& dn, float& dot, float& aw, float& ash, float& asc) {
  const float dy = IO::ld(p.dy, ro + d);
  const float one_sc = 1.f + (p.scale ? IO::ld(p.scale, sco + d) : 0.f);
  const AdalnNormGrads g = adaln_norm_grads(dy, IO::ld(p.res, ro + d), rstd, w, one_sc);
  n = g.n;
  dn = g.dn;
  dot += dn * n;
  aw += g.dweight;
  if (p.scale) {
    if (p.dscale) IO::st(p.dscale, ro + d, g.dscale);
    else asc += g.dscale;
  }
  if (p.has_shift) {
    if (p.dshift) IO::st(p.dshift, ro + d, dy);
    else ash += dy;
  }
}

// Backward, second pass (mean_dn_n: the row's dot / D): stores dx = adaln_dres and, with a branch,
// dbranch = dx * gate; with a gate, dgate = dx * branch is stored per token or added to the column's ag.
template <class IO>
SF_HD void adaln_bwd_dres_col(const AdalnBwdParams& p, int64_t d, int64_t ro, int64_t bro, int64_t go, float n,
                              float dn, float mean_dn_n, float rstd, float& ag) {
  const float dres = p.dres ? IO::ld(p.dres, ro + d) : 0.f;
  const float dr = adaln_dres(dn, n, mean_dn_n, rstd, dres);
  IO::st(p.dx, ro + d, dr);
  if (!p.branch) return;
  const float g = p.gate ? IO::ld(p.gate, go + d) : 1.f;
  IO::st(p.dbranch, ro + d, dr * g);
  if (p.gate) {
    const float dg = dr * IO::ld(p.branch, bro + d);
    if (p.dgate) IO::st(p.dgate, ro + d, dg);
    else ag += dg;
  }
}

// A column's sum in the second stage splits its rows into kAdalnFinishGroups strided groups (group g: rows
// first + g, first + g + G, ...), sums each in row order, then adds the groups' sums in group order. The CUDA
// kernel sums the groups side by side (a warp each, so a column's rows are read G at a time), the CPU one after
// another: the same bits.
constexpr int kAdalnFinishGroups = 8;

SF_HD float adaln_sum_partial_group(const float* partial, int64_t first, int64_t n, int64_t D, int64_t d, int g) {
  float sum = 0.f;
  for (int64_t r = first + g; r < first + n; r += kAdalnFinishGroups) sum += partial[r * D + d];
  return sum;
}

SF_HD bool adaln_finish_per_sample(const AdalnFinishParams& p) { return p.pg || p.psh || p.psc; }

// Programs of the second stage: one per sample when a modulation's grad is summed per sample, one for dweight.
SF_HD int64_t adaln_finish_programs(const AdalnFinishParams& p) {
  return (adaln_finish_per_sample(p) ? p.B : 0) + (p.pw ? 1 : 0);
}

// One sum of the second stage: rows [first, first + n) of `partial`, each column into out[offset + column].
struct AdalnFinishSum {
  const float* partial;
  int64_t first, n;
  void* out;
  int64_t offset;
};

// Sum k (0, 1, 2) of program b: sample b's dgate, dshift, dscale, or, in the program after the samples', dweight
// (k = 0). Its partial is nullptr where program b has no sum k (a grad absent or per token).
SF_HD AdalnFinishSum adaln_finish_sum(const AdalnFinishParams& p, int64_t b, int k) {
  if (adaln_finish_per_sample(p) && b < p.B) {
    const float* partial = k == 0 ? p.pg : k == 1 ? p.psh : p.psc;
    void* out = k == 0 ? p.dgate : k == 1 ? p.dshift : p.dscale;
    return {partial, b * p.chunks, p.chunks, out, b * p.D};
  }
  return {k == 0 ? p.pw : nullptr, 0, p.B * p.chunks, p.dweight, 0};
}

// The widest row D the CUDA kernels take: 16 columns a thread over 256 threads. The binding refuses wider rows,
// and so does sphere_fast/ops/adaln.py (CPP_CUDA_MAX_WIDTH) before any work; the CPU kernels take any D.
constexpr int64_t kAdalnCudaMaxWidth = 4096;

// Kernel entry points (adaln_cpu.cpp, adaln_cuda.cu); every tensor shares the dtype `dt`. The CUDA ones return
// the launches' cudaError_t as int (0 = success).
void adaln_fwd_cpu(const AdalnFwdParams& p, DType dt);
void adaln_bwd_cpu(const AdalnBwdParams& p, DType dt);
void adaln_finish_cpu(const AdalnFinishParams& p, DType dt);
int adaln_fwd_cuda(const AdalnFwdParams& p, DType dt, void* stream);
int adaln_bwd_cuda(const AdalnBwdParams& p, DType dt, void* stream);
int adaln_finish_cuda(const AdalnFinishParams& p, DType dt, void* stream);

}  // namespace sphere_fast
