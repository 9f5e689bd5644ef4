// torch.library registration of the spherify C++ ops (namespace sphere_fast_cpp): schemas, argument checks, the CPU
// implementations and, when built with CUDA (SPHERE_FAST_WITH_CUDA), the CUDA launchers of spherify_cuda.cu.
// Python (sphere_fast/ops/spherify.py) validates the public API's inputs, adds fake kernels and autograd.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <vector>

#include "spherify_math.h"
#include "spherify_ops.h"

#ifdef SPHERE_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "sf_cuda_launch.h"
#endif

namespace sphere_fast {
namespace {

using OptT = c10::optional<at::Tensor>;

void check_device(const char* name, const at::Tensor& t, const at::Tensor& z) {
  TORCH_CHECK(t.device() == z.device(), name, " is on ", t.device(), " but z is on ", z.device());
}

// The kernels read z as [B, L] rows (L = numel / B), scales as [P, B] with P <= kMaxPairs and noise from a tensor of
// z's shape or from int64 [B] seeds. Checked here too: a call of the registered op skips the Python checks. Returns P.
int64_t check_inputs(const at::Tensor& z, const OptT& scales, const OptT& noise, const OptT& seeds) {
  TORCH_CHECK(z.dim() >= 1 && z.numel() > 0, "z must be a non-empty [B, ...] tensor, got shape ", z.sizes());
  const int64_t batch = z.size(0);
  if (noise.has_value()) {
    check_device("noise", *noise, z);
    TORCH_CHECK(noise->sizes() == z.sizes(), "noise must have z's shape ", z.sizes(), ", got ", noise->sizes());
  }
  if (seeds.has_value()) {
    check_device("seeds", *seeds, z);
    TORCH_CHECK(seeds->scalar_type() == at::kLong && seeds->dim() == 1 && seeds->size(0) == batch,
                "seeds must be an int64 [B] = [", batch, "] tensor, got ", seeds->scalar_type(), " of shape ",
                seeds->sizes());
  }
  if (!scales.has_value()) return 1;
  check_device("scales", *scales, z);
  TORCH_CHECK(scales->dim() == 2 && scales->size(0) >= 1 && scales->size(0) <= kMaxPairs && scales->size(1) == batch,
              "scales must be [P, B] with P = 1 or ", kMaxPairs, " and B = ", batch, ", got ", scales->sizes());
  TORCH_CHECK(noise.has_value() || seeds.has_value(), "scales need noise or seeds to draw the noise from");
  return scales->size(0);
}

// The backward's own inputs: grad [P, *z.shape] and the forward's stats [B, 3].
void check_bwd_inputs(const at::Tensor& grad, const at::Tensor& z, int64_t pairs, const at::Tensor& stats) {
  std::vector<int64_t> grad_shape{pairs};
  grad_shape.insert(grad_shape.end(), z.sizes().begin(), z.sizes().end());
  check_device("grad", grad, z);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(grad_shape), "grad must be [P, *z.shape] = ",
              at::IntArrayRef(grad_shape), ", got ", grad.sizes());
  check_device("stats", stats, z);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == z.size(0) && stats.size(1) == 3, "stats must be [B, 3] = [",
              z.size(0), ", 3], got ", stats.sizes());
}

DType elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "spherify kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The kernels' arguments: contiguous inputs (float noise and scales) and the partial-sums workspace, kept alive
// in `keep` until the kernels are done with them.
SpherifyArgs make_args(const at::Tensor& z, const OptT& scales, const OptT& noise, const OptT& seeds, int64_t stream,
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

#ifdef SPHERE_FAST_WITH_CUDA
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

// The forward or backward kernels for `a` on z's device: the CUDA launcher (its grid checked against CUDA's limits
// first) or the CPU implementation.
void run_spherify(const at::Tensor& z, const SpherifyArgs& a, bool forward) {
#ifdef SPHERE_FAST_WITH_CUDA
  if (z.is_cuda()) {
    check_grid_x(a.batch, "spherify: samples B");
    check_grid_y(num_chunks(a.length), "spherify: chunks of a sample's values");
    const cudaStream_t stream = current_stream();
    check_launch(forward ? spherify_fwd_cuda(a, stream) : spherify_bwd_cuda(a, stream),
                 forward ? "spherify_fwd" : "spherify_bwd");
    return;
  }
#endif
  if (forward) {
    spherify_fwd_cpu(a);
  } else {
    spherify_bwd_cpu(a);
  }
}

std::tuple<at::Tensor, at::Tensor> spherify_fwd_op(const at::Tensor& z, const OptT& scales, const OptT& noise,
                                                   const OptT& seeds, int64_t stream) {
  check_inputs(z, scales, noise, seeds);
  const c10::OptionalDeviceGuard guard(z.device());
  std::vector<at::Tensor> keep;
  SpherifyArgs a = make_args(z, scales, noise, seeds, stream, keep);
  std::vector<int64_t> out_shape{a.pairs};
  for (int64_t d : z.sizes()) out_shape.push_back(d);
  at::Tensor out = at::empty(out_shape, z.options());
  at::Tensor stats = at::empty({a.batch, 3}, z.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  a.stats_out = stats.data_ptr<float>();
  run_spherify(z, a, /*forward=*/true);
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> spherify_bwd_op(const at::Tensor& grad, const at::Tensor& z, const OptT& scales,
                                                   const OptT& noise, const OptT& seeds, const at::Tensor& stats,
                                                   int64_t stream) {
  check_bwd_inputs(grad, z, check_inputs(z, scales, noise, seeds), stats);
  const c10::OptionalDeviceGuard guard(z.device());
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
  run_spherify(z, a, /*forward=*/false);
  return {dz, dscales};
}

// The seeds of the Philox draws on their own (the noise alone, the labels): int64 [B].
void check_seeds(const at::Tensor& seeds) {
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.dim() == 1, "seeds must be an int64 [B] tensor, got ",
              seeds.scalar_type(), " of shape ", seeds.sizes());
}

at::Tensor sphere_noise_op(const at::Tensor& seeds, int64_t length, int64_t stream) {
  check_seeds(seeds);
  TORCH_CHECK(length >= 0, "length must be >= 0, got ", length);
  const c10::OptionalDeviceGuard guard(seeds.device());
  const at::Tensor sd = seeds.contiguous();
  at::Tensor out = at::empty({sd.size(0), length}, sd.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;  // on CUDA a grid with no blocks is an invalid launch
#ifdef SPHERE_FAST_WITH_CUDA
  if (sd.is_cuda()) {
    check_grid_x(sd.size(0), "sphere_noise: seeds");
    check_launch(sphere_noise_cuda(sd.data_ptr<int64_t>(), out.data_ptr<float>(), sd.size(0), length, stream * length,
                                   current_stream()),
                 "sphere_noise");
    return out;
  }
#endif
  sphere_noise_cpu(sd.data_ptr<int64_t>(), out.data_ptr<float>(), sd.size(0), length, stream * length);
  return out;
}

// Integers uniform in [0, n), one a seed: Philox's first word at `counter` (an unsigned 64-bit counter) scaled by
// multiply-shift. n < 2^31 keeps the 64-bit product exact.
at::Tensor philox_below_op(const at::Tensor& seeds, int64_t counter, int64_t n) {
  check_seeds(seeds);
  TORCH_CHECK(n >= 1 && n < (int64_t{1} << 31), "n must be in [1, 2^31), got ", n);
  const c10::OptionalDeviceGuard guard(seeds.device());
  const at::Tensor sd = seeds.contiguous();
  at::Tensor out = at::empty_like(sd);
  if (out.numel() == 0) return out;  // on CUDA a grid with no blocks is an invalid launch
#ifdef SPHERE_FAST_WITH_CUDA
  if (sd.is_cuda()) {
    check_launch(philox_below_cuda(sd.data_ptr<int64_t>(), out.data_ptr<int64_t>(), sd.size(0), counter, n,
                                   current_stream()),
                 "philox_below");
    return out;
  }
#endif
  philox_below_cpu(sd.data_ptr<int64_t>(), out.data_ptr<int64_t>(), sd.size(0), counter, n);
  return out;
}

}  // namespace
}  // namespace sphere_fast

TORCH_LIBRARY(sphere_fast_cpp, m) {
  m.def("spherify_fwd(Tensor z, Tensor? scales, Tensor? noise, Tensor? seeds, int stream) -> (Tensor, Tensor)");
  m.def(
      "spherify_bwd(Tensor grad, Tensor z, Tensor? scales, Tensor? noise, Tensor? seeds, Tensor stats, int stream) "
      "-> (Tensor, Tensor)");
  m.def("sphere_noise(Tensor seeds, int length, int stream) -> Tensor");
  m.def("philox_below(Tensor seeds, int counter, int n) -> Tensor");
}

// No derivatives here (sphere_fast's ops hold the autograd): a call that needs a gradient fails at its
// backward, where torch's default fallback warned and gave no gradient.
TORCH_LIBRARY_IMPL(sphere_fast_cpp, Autograd, m) {
  m.impl("spherify_fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("spherify_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("sphere_noise", torch::autograd::autogradNotImplementedFallback());
  m.impl("philox_below", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(sphere_fast_cpp, CPU, m) {
  m.impl("spherify_fwd", &sphere_fast::spherify_fwd_op);
  m.impl("spherify_bwd", &sphere_fast::spherify_bwd_op);
  m.impl("sphere_noise", &sphere_fast::sphere_noise_op);
  m.impl("philox_below", &sphere_fast::philox_below_op);
}

#ifdef SPHERE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(sphere_fast_cpp, CUDA, m) {
  m.impl("spherify_fwd", &sphere_fast::spherify_fwd_op);
  m.impl("spherify_bwd", &sphere_fast::spherify_bwd_op);
  m.impl("sphere_noise", &sphere_fast::sphere_noise_op);
  m.impl("philox_below", &sphere_fast::philox_below_op);
}
#endif

// load() imports the library as a Python module; the ops live in torch.ops.sphere_fast_cpp.
#include "sf_pymodule.h"
