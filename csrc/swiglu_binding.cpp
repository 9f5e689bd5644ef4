// torch binding of the SwiGLU kernels (swiglu_cpu.cpp, swiglu_cuda.cu): checks, allocation and
// TORCH_LIBRARY registration of sphere_fast_swiglu::{fwd, bwd} for CPU and CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#ifdef SPHERE_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "sf_cuda_launch.h"
#endif

#include "swiglu_math.h"
#include "sf_pymodule.h"

namespace sphere_fast {
namespace {

DType dtype_tag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "sphere_fast swiglu: unsupported dtype ", t.scalar_type());
  }
}

SwigluParams params(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0 && h.stride(1) == 1,
              "h must be [M, 2H] with a unit last stride, got ", h.sizes());
#ifdef SPHERE_FAST_WITH_CUDA
  if (h.is_cuda()) {
    check_grid_x(h.size(0), "swiglu: rows of h");
    // one column a thread at most (the kernels for unaligned rows): the most blocks a row can take
    check_grid_y((h.size(1) / 2 + kSwigluThreads - 1) / kSwigluThreads, "swiglu: column blocks of H");
  }
#endif
  SwigluParams p{};
  p.h = h.data_ptr();
  p.M = h.size(0), p.H = h.size(1) / 2, p.stride_h = h.stride(0);
  return p;
}

at::Tensor swiglu_fwd(const at::Tensor& h) {
  SwigluParams p = params(h);
  auto out = at::empty({p.M, p.H}, h.options());
  p.out = out.data_ptr();
  if (out.numel() == 0) return out;
#ifdef SPHERE_FAST_WITH_CUDA
  if (h.is_cuda()) {
    c10::cuda::CUDAGuard guard(h.device());
    check_launch(swiglu_fwd_cuda(p, dtype_tag(h), at::cuda::getCurrentCUDAStream().stream()), "swiglu forward");
    return out;
  }
#endif
  swiglu_fwd_cpu(p, dtype_tag(h));
  return out;
}

at::Tensor swiglu_bwd(const at::Tensor& dout, const at::Tensor& h) {
  SwigluParams p = params(h);
  TORCH_CHECK(dout.dim() == 2 && dout.is_contiguous() && dout.size(0) == p.M && dout.size(1) == p.H &&
                  dout.scalar_type() == h.scalar_type() && dout.device() == h.device(),
              "dout must be a contiguous [M, H] tensor like h");
  auto dh = at::empty({p.M, 2 * p.H}, h.options());
  p.dout = dout.data_ptr();
  p.dh = dh.data_ptr();
  if (dh.numel() == 0) return dh;
#ifdef SPHERE_FAST_WITH_CUDA
  if (h.is_cuda()) {
    c10::cuda::CUDAGuard guard(h.device());
    check_launch(swiglu_bwd_cuda(p, dtype_tag(h), at::cuda::getCurrentCUDAStream().stream()), "swiglu backward");
    return dh;
  }
#endif
  swiglu_bwd_cpu(p, dtype_tag(h));
  return dh;
}

}  // namespace
}  // namespace sphere_fast

TORCH_LIBRARY(sphere_fast_swiglu, m) {
  m.def("fwd(Tensor h) -> Tensor");
  m.def("bwd(Tensor dout, Tensor h) -> Tensor");
}

// No derivatives here (sphere_fast's ops hold the autograd): a call that needs a gradient fails at its
// backward, where torch's default fallback warned and gave no gradient.
TORCH_LIBRARY_IMPL(sphere_fast_swiglu, Autograd, m) {
  m.impl("fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("bwd", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(sphere_fast_swiglu, CPU, m) {
  m.impl("fwd", &sphere_fast::swiglu_fwd);
  m.impl("bwd", &sphere_fast::swiglu_bwd);
}

#ifdef SPHERE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(sphere_fast_swiglu, CUDA, m) {
  m.impl("fwd", &sphere_fast::swiglu_fwd);
  m.impl("bwd", &sphere_fast::swiglu_bwd);
}
#endif
