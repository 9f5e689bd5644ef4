// torch binding of the AdaLN kernels: checks, output allocation, the second (small) stage of the
// backward reduction, and TORCH_LIBRARY registration of sphere_fast_adaln::{fwd, bwd} for CPU and CUDA.
// The kernels themselves are torch-free (adaln_cpu.cpp, adaln_cuda.cu, math in adaln_math.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <optional>
#include <tuple>

#ifdef SPHERE_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "sf_cuda_launch.h"
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

// The kernels step along a row by 1; the stride of a size-1 last dim is never used.
bool unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) == 1; }

// An optional input of x's device and dtype, of shape `shape` or (a modulation) `or_shape`; a [B, S|1, D] one with a
// unit last stride (the binding reads weight through a contiguous copy).
void check_like(const char* name, const OptT& t, const at::Tensor& x, at::IntArrayRef shape,
                at::IntArrayRef or_shape = {}) {
  if (!has(t)) return;
  TORCH_CHECK(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type());
  TORCH_CHECK(t->sizes() == shape || (!or_shape.empty() && t->sizes() == or_shape), name, " must have shape ", shape,
              or_shape.empty() ? std::string() : c10::str(" or ", or_shape), ", got ", t->sizes());
  if (t->dim() == 3) TORCH_CHECK(unit_last_stride(*t), name, " needs a unit last stride");
}

// branch [B, S, D]; gate, shift and scale [B, 1, D] or [B, S, D]; weight [D]; for x [B, S, D] (res in the backward).
void check_inputs(const at::Tensor& x, const OptT& branch, const OptT& gate, const OptT& weight, const OptT& shift,
                  const OptT& scale) {
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
  // no kernel reads a gate without a branch (the backward would return its gradient unwritten), nor a row of 0
  TORCH_CHECK(!has(gate) || has(branch), "a gate needs a branch (res = x + gate * branch)");
  TORCH_CHECK(D > 0, "the rows must have a width D > 0, got ", D);
  check_like("branch", branch, x, {B, S, D});
  check_like("weight", weight, x, {D});
  for (auto [name, t] : {std::pair<const char*, const OptT*>{"gate", &gate}, {"shift", &shift}, {"scale", &scale}})
    check_like(name, *t, x, {B, 1, D}, {B, S, D});
}

// An upstream gradient: res's sizes, dtype and device, contiguous.
void check_grad(const char* name, const at::Tensor& g, const at::Tensor& res) {
  TORCH_CHECK(g.device() == res.device(), name, " is on ", g.device(), " but res is on ", res.device());
  TORCH_CHECK_TYPE(g.scalar_type() == res.scalar_type(), name, " must have res's dtype ", res.scalar_type(), ", got ",
                   g.scalar_type());
  TORCH_CHECK(g.sizes() == res.sizes() && g.is_contiguous(), name, " must be a contiguous tensor of res's shape ",
              res.sizes(), ", got ", g.sizes());
}

// (stride_b, stride_s) of a [B, S|1, D] tensor; a size-1 token dim broadcasts with stride 0.
std::pair<int64_t, int64_t> bs(const OptT& t) {
  if (!has(t)) return {0, 0};
  return {t->stride(0), t->size(1) == 1 ? 0 : t->stride(1)};
}

bool per_token(const OptT& t, int64_t S) { return has(t) && S > 1 && t->size(1) == S; }

// Programs the backward spreads a batch over on the CPU: a constant, as the split fixes the order of the fp32 partial
// sums, so the grads have the same bits for any thread count (at::parallel_for shares the programs out).
constexpr int64_t kCpuPrograms = 64;

int64_t program_target(const at::Tensor& x) {
#ifdef SPHERE_FAST_WITH_CUDA
  if (x.is_cuda()) return 4 * at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount;
#endif
  return kCpuPrograms;
}

#ifdef SPHERE_FAST_WITH_CUDA
// Checked before any output is allocated: the CUDA kernels' widest row, and `blocks` on grid axis x.
void check_cuda_launchable(int64_t D, int64_t blocks, const char* what) {
  TORCH_CHECK(D <= kAdalnCudaMaxWidth, "the CUDA adaln kernels take D <= ", kAdalnCudaMaxWidth, ", got ", D);
  check_grid_x(blocks, what);
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_fwd(const at::Tensor& x, const OptT& branch, const OptT& gate,
                                                         const OptT& weight, const OptT& shift, const OptT& scale,
                                                         double eps) {
  TORCH_CHECK(x.dim() == 3 && unit_last_stride(x), "x must be [B, S, D] with a unit last stride, got shape ",
              x.sizes(), " and strides ", x.strides());
  check_inputs(x, branch, gate, weight, shift, scale);
  const DType dt = dtype_tag(x);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
#ifdef SPHERE_FAST_WITH_CUDA
  if (x.is_cuda()) check_cuda_launchable(D, B * S, "adaln forward: rows B * S");
#endif
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
    c10::cuda::CUDAGuard guard(x.device());
    check_launch(adaln_fwd_cuda(p, dt, at::cuda::getCurrentCUDAStream().stream()), "adaln forward");
    return {res, y, rstd};
  }
#endif
  adaln_fwd_cpu(p, dt);
  return {res, y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_bwd(
    const at::Tensor& dy, const OptT& dres, const at::Tensor& res, const OptT& branch, const OptT& gate,
    const OptT& weight, const OptT& shift, const OptT& scale, const at::Tensor& rstd) {
  TORCH_CHECK(res.dim() == 3 && res.is_contiguous(), "res must be a contiguous [B, S, D] tensor, got shape ",
              res.sizes());
  check_grad("dy", dy, res);
  if (has(dres)) check_grad("dres", *dres, res);
  const int64_t B = res.size(0), S = res.size(1), D = res.size(2);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.device() == res.device() &&
                  rstd.dim() == 2 && rstd.size(0) == B && rstd.size(1) == S && rstd.is_contiguous(),
              "rstd must be a contiguous float32 [B, S] = [", B, ", ", S, "] tensor on res's device ", res.device(),
              ", got ", rstd.scalar_type(), " ", rstd.sizes(), " on ", rstd.device());
  check_inputs(res, branch, gate, weight, shift, scale);
  const DType dt = dtype_tag(res);
#ifdef SPHERE_FAST_WITH_CUDA
  // the second stage's programs: one a sample and one for dweight
  if (res.is_cuda()) check_cuda_launchable(D, B + 1, "adaln backward: samples B + 1");
#endif
  const auto opts = res.options();
  const auto f32 = opts.dtype(at::kFloat);
  // a fresh tensor for every absent grad: the schema's outputs must not alias each other
  auto empty = [&] { return at::empty({0}, opts); };
  if (B * S == 0) {  // no rows: zero grads (as the Triton path)
    auto zeros = [&](const OptT& t) { return has(t) ? at::zeros_like(*t) : empty(); };
    return {at::zeros_like(res), zeros(branch), zeros(gate), zeros(weight), zeros(shift), zeros(scale)};
  }
  const bool gate_tok = per_token(gate, S), shift_tok = per_token(shift, S), scale_tok = per_token(scale, S);
  const int64_t chunks0 = std::max<int64_t>(1, std::min<int64_t>((program_target(res) + B - 1) / B, S));
  const int64_t rows_per_prog = std::max<int64_t>(1, (S + chunks0 - 1) / chunks0);
  const int64_t chunks = std::max<int64_t>(1, (S + rows_per_prog - 1) / rows_per_prog);

  auto dx = at::empty({B, S, D}, opts);
  auto dbranch = has(branch) ? at::empty_like(dx) : empty();
  auto full_or_empty = [&](const OptT& t, bool tok) { return has(t) && tok ? at::empty_like(dx) : empty(); };
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
    c10::cuda::CUDAGuard guard(res.device());
    check_launch(adaln_bwd_cuda(p, dt, at::cuda::getCurrentCUDAStream().stream()), "adaln backward");
  } else
#endif
    adaln_bwd_cpu(p, dt);
  // Second stage, one launch: the B * chunks partial rows -> dweight and the per-sample modulation grads
  // (bounded by the program count, not by B * S). A per-token grad (full) is complete already.
  auto summed = [&](const at::Tensor& part, std::initializer_list<int64_t> shape) {
    return part.numel() ? at::empty(shape, opts) : empty();
  };
  auto dweight = summed(pw, {D}), dgate_s = summed(pg, {B, 1, D}), dshift_s = summed(psh, {B, 1, D}),
       dscale_s = summed(psc, {B, 1, D});
  AdalnFinishParams f{fptr(pw), fptr(pg), fptr(psh), fptr(psc), optr(dweight), optr(dgate_s), optr(dshift_s),
                      optr(dscale_s), B, chunks, D};
  if (adaln_finish_programs(f) > 0) {
#ifdef SPHERE_FAST_WITH_CUDA
    if (res.is_cuda()) {
      c10::cuda::CUDAGuard guard(res.device());
      check_launch(adaln_finish_cuda(f, dt, at::cuda::getCurrentCUDAStream().stream()), "adaln backward, stage 2");
    } else
#endif
      adaln_finish_cpu(f, dt);
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

// No derivatives here (sphere_fast's ops hold the autograd): a call that needs a gradient fails at its
// backward, where torch's default fallback warned and gave no gradient.
TORCH_LIBRARY_IMPL(sphere_fast_adaln, Autograd, m) {
  m.impl("fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("bwd", torch::autograd::autogradNotImplementedFallback());
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
