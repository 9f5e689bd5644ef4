// CPU SwiGLU kernels sharing swiglu_math.h with the CUDA kernels.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "swiglu_math.h"

namespace sphere_fast {
namespace {

template <typename T>
void fwd(const SwigluParams& p) {
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* hr = h + m * p.stride_h;
      for (int64_t j = 0; j < p.H; ++j) {
        out[m * p.H + j] = static_cast<T>(swiglu_out(static_cast<float>(hr[j]), static_cast<float>(hr[p.H + j])));
      }
    }
  });
}

template <typename T>
void bwd(const SwigluParams& p) {
  const T* h = static_cast<const T*>(p.h);
  const T* dout = static_cast<const T*>(p.dout);
  T* dh = static_cast<T*>(p.dh);
  at::parallel_for(0, p.M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* hr = h + m * p.stride_h;
      T* dr = dh + m * 2 * p.H;
      for (int64_t j = 0; j < p.H; ++j) {
        float da, db;
        swiglu_grad(static_cast<float>(hr[j]), static_cast<float>(hr[p.H + j]),
                    static_cast<float>(dout[m * p.H + j]), &da, &db);
        dr[j] = static_cast<T>(da);
        dr[p.H + j] = static_cast<T>(db);
      }
    }
  });
}

}  // namespace

void swiglu_fwd_cpu(const SwigluParams& p, DType dt) {
  switch (dt) {
    case DType::kFloat32: return fwd<float>(p);
    case DType::kFloat16: return fwd<c10::Half>(p);
    case DType::kBFloat16: return fwd<c10::BFloat16>(p);
  }
}

void swiglu_bwd_cpu(const SwigluParams& p, DType dt) {
  switch (dt) {
    case DType::kFloat32: return bwd<float>(p);
    case DType::kFloat16: return bwd<c10::Half>(p);
    case DType::kBFloat16: return bwd<c10::BFloat16>(p);
  }
}

}  // namespace sphere_fast
