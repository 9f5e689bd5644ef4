// torch binding of the AdaLN kernels: checks, output allocation, the second (small) stage of the
// backward reduction, and TORCH_LIBRARY registration of sphere_fast_adaln::{fwd, bwd} for CPU and CUDA.
// The kernels themselves are torch-free (adaln_cpu.cpp, adaln_cuda.cu, math in adaln_math.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#ifdef SPHERE_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "adaln_math.h"
#include "sf_pymodule.h"

namespace sphere_fast {
namespace {

using OptT = std::optional<at::Tensor>;

DType dtype_tag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "sphere_fast adaln: unsupported dtype ", t.scalar_type());
  }
}

bool has(const OptT& t) { return t.has_value() && t->defined(); }
const void* ptr(const OptT& t) { return has(t) ? t->data_ptr() : nullptr; }

void check_like(const char* name, const OptT& t, const at::Tensor& x) {
  if (!has(t)) return;
  TORCH_CHECK(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type());
  if (t->dim() == 3) TORCH_CHECK(t->stride(2) == 1, name, " needs a unit last stride");
}

// (stride_b, stride_s) of a [B, S|1, D] tensor; a size-1 token dim broadcasts with stride 0.
std::pair<int64_t, int64_t> bs(const OptT& t) {
  if (!has(t)) return {0, 0};
  return {t->stride(0), t->size(1) == 1 ? 0 : t->stride(1)};
}

bool per_token(const OptT& t, int64_t S) { return has(t) && S > 1 && t->size(1) == S; }

int64_t program_target(const at::Tensor& x) {
#ifdef SPHERE_FAST_WITH_CUDA
  if (x.is_cuda()) return 4 * at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount;
#endif
  return 4 * at::get_num_threads();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_fwd(const at::Tensor& x, const OptT& branch, const OptT& gate,
                                                         const OptT& weight, const OptT& shift, const OptT& scale,
                                                         double eps) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [B, S, D] with a unit last stride");
  for (auto [name, t] : {std::pair<const char*, const OptT*>{"branch", &branch}, {"gate", &gate},
                         {"weight", &weight}, {"shift", &shift}, {"scale", &scale}})
    check_like(name, *t, x);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
  auto y = at::empty({B, S, D}, x.options());
  auto res = has(branch) ? at::empty_like(y) : at::empty({0}, x.options());
  auto rstd = at::empty({B, S}, x.options().dtype(at::kFloat));
  AdalnFwdParams p{};
  p.x = x.data_ptr();
  p.branch = ptr(branch);
  p.gate = has(branch) ? ptr(gate) : nullptr;
  // a named tensor: the kernel reads the contiguous copy after this statement
  const at::Tensor weight_c = has(weight) ? weight->contiguous() : at::Tensor();
  p.weight = weight_c.defined() ? weight_c.data_ptr() : nullptr;
  p.shift = ptr(shift);
  p.scale = ptr(scale);
  p.res = has(branch) ? res.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.rstd = rstd.data_ptr<float>();
  p.B = B, p.S = S, p.D = D, p.eps = static_cast<float>(eps);
  p.sx_b = x.stride(0), p.sx_s = S == 1 ? 0 : x.stride(1);
  std::tie(p.sbr_b, p.sbr_s) = bs(branch);
  std::tie(p.sg_b, p.sg_s) = bs(gate);
  std::tie(p.ssh_b, p.ssh_s) = bs(shift);
  std::tie(p.ssc_b, p.ssc_s) = bs(scale);
  if (B * S == 0) return {res, y, rstd};
#ifdef SPHERE_FAST_WITH_CUDA
  if (x.is_cuda()) {
    TORCH_CHECK(D <= 4096, "the CUDA adaln kernels take D <= 4096, got ", D);
    c10::cuda::CUDAGuard guard(x.device());
    adaln_fwd_cuda(p, dtype_tag(x), at::cuda::getCurrentCUDAStream().stream());
    return {res, y, rstd};
  }
#endif
  adaln_fwd_cpu(p, dtype_tag(x));
  return {res, y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_bwd(
    const at::Tensor& dy, const OptT& dres, const at::Tensor& res, const OptT& branch, const OptT& gate,
    const OptT& weight, const OptT& shift, const OptT& scale, const at::Tensor& rstd) {
  TORCH_CHECK(res.dim() == 3 && res.is_contiguous() && dy.is_contiguous() && rstd.is_contiguous(),
              "res, dy, rstd must be contiguous");
  TORCH_CHECK(!has(dres) || dres->is_contiguous(), "dres must be contiguous");
  for (auto [name, t] : {std::pair<const char*, const OptT*>{"branch", &branch}, {"gate", &gate},
                         {"weight", &weight}, {"shift", &shift}, {"scale", &scale}})
    check_like(name, *t, res);
  const int64_t B = res.size(0), S = res.size(1), D = res.size(2);
  const auto opts = res.options();
  const auto f32 = opts.dtype(at::kFloat);
  auto empty0 = at::empty({0}, opts);
  if (B * S == 0) {  // no rows: zero grads (as the Triton path)
    auto zeros = [&](const OptT& t) { return has(t) ? at::zeros_like(*t) : empty0; };
    return {at::zeros_like(res), zeros(branch), zeros(gate), zeros(weight), zeros(shift), zeros(scale)};
  }
  const bool gate_tok = per_token(gate, S), shift_tok = per_token(shift, S), scale_tok = per_token(scale, S);
  const int64_t chunks0 = std::max<int64_t>(1, std::min<int64_t>((program_target(res) + B - 1) / std::max<int64_t>(B, 1), S));
  const int64_t rows_per_prog = std::max<int64_t>(1, (S + chunks0 - 1) / chunks0);
  const int64_t chunks = std::max<int64_t>(1, (S + rows_per_prog - 1) / rows_per_prog);

  auto dx = at::empty({B, S, D}, opts);
  auto dbranch = has(branch) ? at::empty_like(dx) : empty0;
  auto full_or_empty = [&](const OptT& t, bool tok) { return has(t) && tok ? at::empty_like(dx) : empty0; };
  // every program writes its whole row of partials: no zero fill (a memset launch each) needed
  auto partial = [&](const OptT& t, bool tok) {
    return has(t) && !tok ? at::empty({B * chunks, D}, f32) : at::empty({0}, f32);
  };
  auto dgate = full_or_empty(gate, gate_tok), dshift = full_or_empty(shift, shift_tok),
       dscale = full_or_empty(scale, scale_tok);
  auto pw = partial(weight, false), pg = partial(gate, gate_tok), psh = partial(shift, shift_tok),
       psc = partial(scale, scale_tok);
  auto fptr = [](const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };
  auto optr = [](const at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; };

  AdalnBwdParams p{};
  p.dy = dy.data_ptr();
  p.dres = ptr(dres);
  p.res = res.data_ptr();
  p.branch = ptr(branch);
  p.gate = has(branch) ? ptr(gate) : nullptr;
  // a named tensor: the kernel reads the contiguous copy after this statement
  const at::Tensor weight_c = has(weight) ? weight->contiguous() : at::Tensor();
  p.weight = weight_c.defined() ? weight_c.data_ptr() : nullptr;
  p.scale = ptr(scale);
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dbranch = optr(dbranch);
  p.dgate = optr(dgate), p.dshift = optr(dshift), p.dscale = optr(dscale);
  p.pw = fptr(pw), p.pg = fptr(pg), p.psh = fptr(psh), p.psc = fptr(psc);
  p.has_shift = has(shift);
  p.B = B, p.S = S, p.D = D, p.chunks = chunks, p.rows_per_prog = rows_per_prog;
  std::tie(p.sbr_b, p.sbr_s) = bs(branch);
  std::tie(p.sg_b, p.sg_s) = bs(gate);
  std::tie(p.ssc_b, p.ssc_s) = bs(scale);
#ifdef SPHERE_FAST_WITH_CUDA
  if (res.is_cuda()) {
    TORCH_CHECK(D <= 4096, "the CUDA adaln kernels take D <= 4096, got ", D);
    c10::cuda::CUDAGuard guard(res.device());
    adaln_bwd_cuda(p, dtype_tag(res), at::cuda::getCurrentCUDAStream().stream());
  } else
#endif
    adaln_bwd_cpu(p, dtype_tag(res));
  // Second stage, one launch: the B * chunks partial rows -> dweight and the per-sample modulation grads
  // (bounded by the program count, not by B * S). A per-token grad (full) is complete already.
  auto summed = [&](const at::Tensor& part, std::initializer_list<int64_t> shape) {
    return part.numel() ? at::empty(shape, opts) : empty0;
  };
  auto dweight = summed(pw, {D}), dgate_s = summed(pg, {B, 1, D}), dshift_s = summed(psh, {B, 1, D}),
       dscale_s = summed(psc, {B, 1, D});
  AdalnFinishParams f{fptr(pw), fptr(pg), fptr(psh), fptr(psc), optr(dweight), optr(dgate_s), optr(dshift_s),
                      optr(dscale_s), B, chunks, D};
  if (adaln_finish_programs(f) > 0) {
#ifdef SPHERE_FAST_WITH_CUDA
    if (res.is_cuda()) {
      c10::cuda::CUDAGuard guard(res.device());
      adaln_finish_cuda(f, dtype_tag(res), at::cuda::getCurrentCUDAStream().stream());
    } else
#endif
      adaln_finish_cpu(f, dtype_tag(res));
  }
  auto either = [](const at::Tensor& per_sample, const at::Tensor& per_token) {
    return per_sample.numel() ? per_sample : per_token;
  };
  return {dx, dbranch, either(dgate_s, dgate), dweight, either(dshift_s, dshift), either(dscale_s, dscale)};
}

}  // namespace
}  // namespace sphere_fast

TORCH_LIBRARY(sphere_fast_adaln, m) {
  m.def("fwd(Tensor x, Tensor? branch, Tensor? gate, Tensor? weight, Tensor? shift, Tensor? scale, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bwd(Tensor dy, Tensor? dres, Tensor res, Tensor? branch, Tensor? gate, Tensor? weight, Tensor? shift,"
        " Tensor? scale, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sphere_fast_adaln, CPU, m) {
  m.impl("fwd", &sphere_fast::adaln_fwd);
  m.impl("bwd", &sphere_fast::adaln_bwd);
}

#ifdef SPHERE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(sphere_fast_adaln, CUDA, m) {
  m.impl("fwd", &sphere_fast::adaln_fwd);
  m.impl("bwd", &sphere_fast::adaln_bwd);
}
#endif
