// torch.library registration of the spherify C++ ops (namespace sphere_fast_cpp): schemas, the CPU
// implementations and, when built with CUDA (SPHERE_FAST_WITH_CUDA), the CUDA launchers of spherify_cuda.cu.
// Python (sphere_fast/ops/spherify.py) validates inputs, adds fake kernels and autograd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "spherify_math.h"
#include "spherify_ops.h"

#ifdef SPHERE_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace sphere_fast {
namespace {

#ifdef SPHERE_FAST_WITH_CUDA
DType elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "spherify CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

SpherifyArgs make_args(const at::Tensor& z, const c10::optional<at::Tensor>& scales,
                       const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& seeds, int64_t stream,
                       std::vector<at::Tensor>& keep) {
  SpherifyArgs a{};
  a.batch = z.size(0);
  a.length = z.numel() / a.batch;
  a.pairs = scales.has_value() ? scales->size(0) : 1;
  a.mode = !scales.has_value() ? kNoiseNone : (noise.has_value() ? kNoiseTensor : kNoisePhilox);
  a.base = stream * a.length;
  a.type = elem_type(z);
  keep.push_back(z.contiguous());
  a.z = keep.back().data_ptr();
  if (a.mode == kNoiseTensor) {
    keep.push_back(noise->contiguous().to(at::kFloat));
    a.noise = keep.back().data_ptr<float>();
  }
  if (a.mode == kNoisePhilox) {
    keep.push_back(seeds->contiguous());
    a.seeds = keep.back().data_ptr<int64_t>();
  }
  if (scales.has_value()) {
    keep.push_back(scales->contiguous().to(at::kFloat));
    a.scales = keep.back().data_ptr<float>();
  }
  keep.push_back(at::empty({a.batch, num_chunks(a.length), 4}, z.options().dtype(at::kFloat)));
  a.partial = keep.back().data_ptr<float>();
  return a;
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<at::Tensor, at::Tensor> spherify_fwd_cuda_op(const at::Tensor& z, const c10::optional<at::Tensor>& scales,
                                                        const c10::optional<at::Tensor>& noise,
                                                        const c10::optional<at::Tensor>& seeds, int64_t stream) {
  const c10::cuda::CUDAGuard guard(z.device());
  std::vector<at::Tensor> keep;
  SpherifyArgs a = make_args(z, scales, noise, seeds, stream, keep);
  std::vector<int64_t> out_shape{a.pairs};
  for (int64_t d : z.sizes()) out_shape.push_back(d);
  at::Tensor out = at::empty(out_shape, z.options());
  at::Tensor stats = at::empty({a.batch, 3}, z.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  a.stats_out = stats.data_ptr<float>();
  check_launch(spherify_fwd_cuda(a, c10::cuda::getCurrentCUDAStream().stream()), "spherify_fwd");
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> spherify_bwd_cuda_op(const at::Tensor& grad, const at::Tensor& z,
                                                        const c10::optional<at::Tensor>& scales,
                                                        const c10::optional<at::Tensor>& noise,
                                                        const c10::optional<at::Tensor>& seeds, const at::Tensor& stats,
                                                        int64_t stream) {
  const c10::cuda::CUDAGuard guard(z.device());
  std::vector<at::Tensor> keep;
  SpherifyArgs a = make_args(z, scales, noise, seeds, stream, keep);
  keep.push_back(grad.to(z.scalar_type()).contiguous());
  a.grad = keep.back().data_ptr();
  keep.push_back(stats.contiguous().to(at::kFloat));
  a.stats = keep.back().data_ptr<float>();
  at::Tensor dz = at::empty(z.sizes(), z.options());
  at::Tensor dscales = at::zeros({a.pairs, a.batch}, z.options().dtype(at::kFloat));
  a.out = dz.data_ptr();
  a.dscales = dscales.data_ptr<float>();
  check_launch(spherify_bwd_cuda(a, c10::cuda::getCurrentCUDAStream().stream()), "spherify_bwd");
  return {dz, dscales};
}

at::Tensor sphere_noise_cuda_op(const at::Tensor& seeds, int64_t length, int64_t stream) {
  const c10::cuda::CUDAGuard guard(seeds.device());
  const at::Tensor sd = seeds.contiguous();
  at::Tensor out = at::empty({sd.size(0), length}, sd.options().dtype(at::kFloat));
  check_launch(sphere_noise_cuda(sd.data_ptr<int64_t>(), out.data_ptr<float>(), sd.size(0), length, stream * length,
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "sphere_noise");
  return out;
}
#endif

}  // namespace
}  // namespace sphere_fast

TORCH_LIBRARY(sphere_fast_cpp, m) {
  m.def("spherify_fwd(Tensor z, Tensor? scales, Tensor? noise, Tensor? seeds, int stream) -> (Tensor, Tensor)");
  m.def(
      "spherify_bwd(Tensor grad, Tensor z, Tensor? scales, Tensor? noise, Tensor? seeds, Tensor stats, int stream) "
      "-> (Tensor, Tensor)");
  m.def("sphere_noise(Tensor seeds, int length, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(sphere_fast_cpp, CPU, m) {
  m.impl("spherify_fwd", &sphere_fast::spherify_fwd_cpu);
  m.impl("spherify_bwd", &sphere_fast::spherify_bwd_cpu);
  m.impl("sphere_noise", &sphere_fast::sphere_noise_cpu);
}

#ifdef SPHERE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(sphere_fast_cpp, CUDA, m) {
  m.impl("spherify_fwd", &sphere_fast::spherify_fwd_cuda_op);
  m.impl("spherify_bwd", &sphere_fast::spherify_bwd_cuda_op);
  m.impl("sphere_noise", &sphere_fast::sphere_noise_cuda_op);
}
#endif

// load() imports the library as a Python module; the ops live in torch.ops.sphere_fast_cpp.
#include "sf_pymodule.h"
