// CPU AdaLN kernels: the same row algorithm and math (adaln_math.h) as the CUDA kernels, so the C++ path
// is exercised and compared with eager and Triton on machines without a GPU.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "adaln_math.h"

namespace sphere_fast {
namespace {

// Element access policy of the shared per-column steps (adaln_math.h): T in memory, fp32 in registers.
template <typename T>
struct CpuIO {
  static float ld(const void* p, int64_t i) { return static_cast<float>(static_cast<const T*>(p)[i]); }
  static float st(void* p, int64_t i, float v) {
    const T t = static_cast<T>(v);
    static_cast<T*>(p)[i] = t;
    return static_cast<float>(t);
  }
};

template <typename T>
void fwd(const AdalnFwdParams& p) {
  using IO = CpuIO<T>;
  const int64_t D = p.D;
  at::parallel_for(0, p.B * p.S, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> r(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.S, s = row % p.S, ro = row * D;
      const int64_t xo = b * p.sx_b + s * p.sx_s, bro = b * p.sbr_b + s * p.sbr_s, go = b * p.sg_b + s * p.sg_s;
      float sum_sq = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = adaln_fwd_res_col<IO>(p, d, ro, xo, bro, go);
        r[d] = v;
        sum_sq += v * v;
      }
      const float rstd = adaln_rstd(sum_sq, D, p.eps);
      p.rstd[row] = rstd;
      const int64_t sho = b * p.ssh_b + s * p.ssh_s, sco = b * p.ssc_b + s * p.ssc_s;
      for (int64_t d = 0; d < D; ++d) adaln_fwd_out_col<IO>(p, d, ro, sho, sco, r[d], rstd);
    }
  });
}

template <typename T>
void bwd(const AdalnBwdParams& p) {
  using IO = CpuIO<T>;
  const int64_t D = p.D;
  at::parallel_for(0, p.B * p.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> n(D), dn(D), aw(D), ag(D), ash(D), asc(D);
    for (int64_t prog = begin; prog < end; ++prog) {
      const int64_t b = prog / p.chunks, c = prog % p.chunks;
      const int64_t s_begin = c * p.rows_per_prog;
      const int64_t s_end = std::min(s_begin + p.rows_per_prog, p.S);
      std::fill(aw.begin(), aw.end(), 0.f);
      std::fill(ag.begin(), ag.end(), 0.f);
      std::fill(ash.begin(), ash.end(), 0.f);
      std::fill(asc.begin(), asc.end(), 0.f);
      for (int64_t s = s_begin; s < s_end; ++s) {
        const int64_t row = b * p.S + s, ro = row * D;
        const int64_t sco = b * p.ssc_b + s * p.ssc_s, go = b * p.sg_b + s * p.sg_s, bro = b * p.sbr_b + s * p.sbr_s;
        const float rstd = p.rstd[row];
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float w = p.weight ? IO::ld(p.weight, d) : 1.f;
          adaln_bwd_norm_col<IO>(p, d, ro, sco, w, rstd, n[d], dn[d], dot, aw[d], ash[d], asc[d]);
        }
        const float mean_dn_n = dot / static_cast<float>(D);
        for (int64_t d = 0; d < D; ++d) adaln_bwd_dres_col<IO>(p, d, ro, bro, go, n[d], dn[d], mean_dn_n, rstd, ag[d]);
      }
      const int64_t po = prog * D;
      for (int64_t d = 0; d < D; ++d) {
        if (p.pw) p.pw[po + d] = aw[d];
        if (p.pg) p.pg[po + d] = ag[d];
        if (p.psh) p.psh[po + d] = ash[d];
        if (p.psc) p.psc[po + d] = asc[d];
      }
    }
  });
}

template <typename T>
void finish(const AdalnFinishParams& p) {
  at::parallel_for(0, adaln_finish_programs(p), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int k = 0; k < 3; ++k) {
        const AdalnFinishSum sum = adaln_finish_sum(p, b, k);
        if (!sum.partial) continue;
        for (int64_t d = 0; d < p.D; ++d) {
          float total = 0.f;
          for (int g = 0; g < kAdalnFinishGroups; ++g)
            total += adaln_sum_partial_group(sum.partial, sum.first, sum.n, p.D, d, g);
          CpuIO<T>::st(sum.out, sum.offset + d, total);
        }
      }
    }
  });
}

}  // namespace

void adaln_fwd_cpu(const AdalnFwdParams& p, DType dt) {
  switch (dt) {
    case DType::kFloat32: return fwd<float>(p);
    case DType::kFloat16: return fwd<c10::Half>(p);
    case DType::kBFloat16: return fwd<c10::BFloat16>(p);
  }
}

void adaln_bwd_cpu(const AdalnBwdParams& p, DType dt) {
  switch (dt) {
    case DType::kFloat32: return bwd<float>(p);
    case DType::kFloat16: return bwd<c10::Half>(p);
    case DType::kBFloat16: return bwd<c10::BFloat16>(p);
  }
}

void adaln_finish_cpu(const AdalnFinishParams& p, DType dt) {
  switch (dt) {
    case DType::kFloat32: return finish<float>(p);
    case DType::kFloat16: return finish<c10::Half>(p);
    case DType::kBFloat16: return finish<c10::BFloat16>(p);
  }
}

}  // namespace sphere_fast
