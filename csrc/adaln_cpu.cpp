// CPU AdaLN kernels: the same row algorithm and math (adaln_math.h) as the CUDA kernels, so the C++ path
// is exercised and compared with eager and Triton on machines without a GPU.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "adaln_math.h"

namespace sphere_fast {
namespace {

template <typename T>
float ld(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

template <typename T>
void st(void* p, int64_t i, float v) {
  static_cast<T*>(p)[i] = static_cast<T>(v);
}

template <typename T>
float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
void fwd(const AdalnFwdParams& p) {
  const int64_t D = p.D;
  at::parallel_for(0, p.B * p.S, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> r(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.S, s = row % p.S;
      const int64_t xo = b * p.sx_b + s * p.sx_s, bro = b * p.sbr_b + s * p.sbr_s, go = b * p.sg_b + s * p.sg_s;
      float sum_sq = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        float v = ld<T>(p.x, xo + d);
        if (p.branch) {
          const float g = p.gate ? ld<T>(p.gate, go + d) : 1.f;
          // Normalise the stored (rounded) residual, as an unfused model would.
          v = round_to<T>(adaln_residual(v, g, ld<T>(p.branch, bro + d)));
          st<T>(p.res, row * D + d, v);
        }
        r[d] = v;
        sum_sq += v * v;
      }
      const float rstd = adaln_rstd(sum_sq, D, p.eps);
      p.rstd[row] = rstd;
      const int64_t sho = b * p.ssh_b + s * p.ssh_s, sco = b * p.ssc_b + s * p.ssc_s;
      for (int64_t d = 0; d < D; ++d) {
        const float w = p.weight ? ld<T>(p.weight, d) : 1.f;
        const float sc = p.scale ? ld<T>(p.scale, sco + d) : 0.f;
        const float sh = p.shift ? ld<T>(p.shift, sho + d) : 0.f;
        st<T>(p.y, row * D + d, adaln_out(r[d], rstd, w, sc, sh));
      }
    }
  });
}

template <typename T>
void bwd(const AdalnBwdParams& p) {
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
          const float dy = ld<T>(p.dy, ro + d);
          const float w = p.weight ? ld<T>(p.weight, d) : 1.f;
          const float one_sc = 1.f + (p.scale ? ld<T>(p.scale, sco + d) : 0.f);
          n[d] = ld<T>(p.res, ro + d) * rstd;
          dn[d] = dy * w * one_sc;
          dot += dn[d] * n[d];
          aw[d] += dy * n[d] * one_sc;
          if (p.scale) {
            if (p.dscale) st<T>(p.dscale, ro + d, dy * n[d] * w);
            else asc[d] += dy * n[d] * w;
          }
          if (p.has_shift) {
            if (p.dshift) st<T>(p.dshift, ro + d, dy);
            else ash[d] += dy;
          }
        }
        const float mean_dn_n = dot / static_cast<float>(D);
        for (int64_t d = 0; d < D; ++d) {
          const float dres = p.dres ? ld<T>(p.dres, ro + d) : 0.f;
          const float dr = adaln_dres(dn[d], n[d], mean_dn_n, rstd, dres);
          st<T>(p.dx, ro + d, dr);
          if (p.branch) {
            const float g = p.gate ? ld<T>(p.gate, go + d) : 1.f;
            st<T>(p.dbranch, ro + d, dr * g);
            if (p.gate) {
              const float dg = dr * ld<T>(p.branch, bro + d);
              if (p.dgate) st<T>(p.dgate, ro + d, dg);
              else ag[d] += dg;
            }
          }
        }
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

}  // namespace sphere_fast
