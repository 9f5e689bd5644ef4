// CUDA AdaLN kernels (torch-free; launched from adaln_binding.cpp). Math in adaln_math.h, shared with
// the CPU kernels. Thread t of a block owns columns t, t + blockDim, ... (at most MAXC of them), so a row
// lives in registers between its reduction and its output pass and every access is coalesced. Where every
// row and modulation is 16-byte aligned (the model's widths), a forward or backward thread t owns 16-byte vectors
// of columns instead: vector t, t + blockDim, ... (at most MAXV of them).
#include <cuda_runtime.h>

#include <initializer_list>

#include "adaln_math.h"
#include "sf_cuda_util.cuh"

namespace sphere_fast {
namespace {

// At most 256 threads per block, so that up to 255 registers per thread still fit an SM.
constexpr int kMaxThreads = 256;
static_assert(16 * kMaxThreads >= kAdalnCudaMaxWidth, "the 16-column kernels cover every row the binding takes");

// Element access policy of the shared per-column steps (adaln_math.h): T in memory, fp32 in registers.
template <typename T>
struct CudaIO {
  static __device__ __forceinline__ float ld(const void* p, int64_t i) { return to_f(static_cast<const T*>(p)[i]); }
  static __device__ __forceinline__ float st(void* p, int64_t i, float v) {
    const T t = from_f<T>(v);
    static_cast<T*>(p)[i] = t;
    return to_f(t);
  }
};

// One block per row.
template <typename T, int MAXC>
__global__ __launch_bounds__(kMaxThreads) void adaln_fwd_kernel(const AdalnFwdParams p) {
  using IO = CudaIO<T>;
  __shared__ float smem[32];
  const int64_t row = blockIdx.x, D = p.D;
  const int64_t b = row / p.S, s = row % p.S;
  const int64_t xo = b * p.sx_b + s * p.sx_s, bro = b * p.sbr_b + s * p.sbr_s, go = b * p.sg_b + s * p.sg_s;
  float r[MAXC];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < MAXC; ++i) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    r[i] = 0.f;
    if (d < D) {
      const float v = adaln_fwd_res_col<IO>(p, d, row * D, xo, bro, go);
      r[i] = v;
      sum_sq += v * v;
    }
  }
  const float rstd = adaln_rstd(block_sum(sum_sq, smem), D, p.eps);
  if (threadIdx.x == 0) p.rstd[row] = rstd;
  const int64_t sho = b * p.ssh_b + s * p.ssh_s, sco = b * p.ssc_b + s * p.ssc_s;
#pragma unroll
  for (int i = 0; i < MAXC; ++i) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (d < D) adaln_fwd_out_col<IO>(p, d, row * D, sho, sco, r[i], rstd);
  }
}

// V columns of an input at element offset o as fp32, or `fill` where the input is absent (nullptr).
template <typename T>
__device__ __forceinline__ void load_columns(const void* input, int64_t o, float fill, float (&out)[Vec16<T>::kLen]) {
  if (input == nullptr) {
#pragma unroll
    for (int k = 0; k < Vec16<T>::kLen; ++k) out[k] = fill;
    return;
  }
  const Vec16<T> v = load16(static_cast<const T*>(input) + o);
#pragma unroll
  for (int k = 0; k < Vec16<T>::kLen; ++k) out[k] = to_f(v[k]);
}

// V fp32 values to 16-byte aligned memory, four at a time.
template <int V>
__device__ __forceinline__ void store_floats(float* out, const float (&v)[V]) {
  static_assert(V % 4 == 0, "whole 16-byte vectors of fp32");
#pragma unroll
  for (int j = 0; j < V; j += 4) {
    Vec16<float> f;
#pragma unroll
    for (int k = 0; k < 4; ++k) f[k] = v[j + k];
    store16(out + j, f);
  }
}

// V values rounded to T, as one 16-byte store.
template <typename T>
__device__ __forceinline__ void store_columns(void* out, int64_t o, const float (&v)[Vec16<T>::kLen]) {
  Vec16<T> t;
#pragma unroll
  for (int k = 0; k < Vec16<T>::kLen; ++k) t[k] = from_f<T>(v[k]);
  store16(static_cast<T*>(out) + o, t);
}

// adaln_fwd_kernel on 16-byte vectors: the same per-column math (adaln_fwd_res_col, adaln_fwd_out_col).
template <typename T, int MAXV>
__global__ __launch_bounds__(kMaxThreads) void adaln_fwd_vec_kernel(const AdalnFwdParams p) {
  constexpr int V = Vec16<T>::kLen;
  __shared__ float smem[32];
  const int64_t row = blockIdx.x, D = p.D;
  const int64_t b = row / p.S, s = row % p.S;
  const int64_t xo = b * p.sx_b + s * p.sx_s, bro = b * p.sbr_b + s * p.sbr_s, go = b * p.sg_b + s * p.sg_s;
  float r[MAXV][V];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int64_t d = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * V;
    if (d >= D) {
#pragma unroll
      for (int k = 0; k < V; ++k) r[i][k] = 0.f;
      continue;
    }
    load_columns<T>(p.x, xo + d, 0.f, r[i]);
    if (p.branch) {  // the residual, rounded to the dtype as it is stored
      float g[V], br[V];
      load_columns<T>(p.gate, go + d, 1.f, g);
      load_columns<T>(p.branch, bro + d, 0.f, br);
      Vec16<T> res;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        res[k] = from_f<T>(adaln_residual(r[i][k], g[k], br[k]));
        r[i][k] = to_f(res[k]);
      }
      store16(static_cast<T*>(p.res) + row * D + d, res);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) sum_sq += r[i][k] * r[i][k];
  }
  const float rstd = adaln_rstd(block_sum(sum_sq, smem), D, p.eps);
  if (threadIdx.x == 0) p.rstd[row] = rstd;
  const int64_t sho = b * p.ssh_b + s * p.ssh_s, sco = b * p.ssc_b + s * p.ssc_s;
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int64_t d = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * V;
    if (d >= D) continue;
    float w[V], sc[V], sh[V], y[V];
    load_columns<T>(p.weight, d, 1.f, w);
    load_columns<T>(p.scale, sco + d, 0.f, sc);
    load_columns<T>(p.shift, sho + d, 0.f, sh);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = adaln_out(r[i][k], rstd, w[k], sc[k], sh[k]);
    store_columns<T>(p.y, row * D + d, y);
  }
}

// Block (b, c) walks rows [c * rows_per_prog, ...) of sample b and writes one row of column partials.
template <typename T, int MAXC>
__global__ __launch_bounds__(kMaxThreads) void adaln_bwd_kernel(const AdalnBwdParams p) {
  using IO = CudaIO<T>;
  __shared__ float smem[32];
  const int64_t b = blockIdx.x, c = blockIdx.y, D = p.D;
  const int64_t s_begin = c * p.rows_per_prog;
  const int64_t s_end = s_begin + p.rows_per_prog < p.S ? s_begin + p.rows_per_prog : p.S;
  float w[MAXC], aw[MAXC], ag[MAXC], ash[MAXC], asc[MAXC];
#pragma unroll
  for (int i = 0; i < MAXC; ++i) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    w[i] = (p.weight && d < D) ? IO::ld(p.weight, d) : 1.f;
    aw[i] = ag[i] = ash[i] = asc[i] = 0.f;
  }
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int64_t row = b * p.S + s, ro = row * D;
    const int64_t sco = b * p.ssc_b + s * p.ssc_s, go = b * p.sg_b + s * p.sg_s, bro = b * p.sbr_b + s * p.sbr_s;
    const float rstd = p.rstd[row];
    float n[MAXC], dn[MAXC];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < MAXC; ++i) {
      const int64_t d = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      n[i] = dn[i] = 0.f;
      if (d < D) adaln_bwd_norm_col<IO>(p, d, ro, sco, w[i], rstd, n[i], dn[i], dot, aw[i], ash[i], asc[i]);
    }
    const float mean_dn_n = block_sum(dot, smem) / static_cast<float>(D);
#pragma unroll
    for (int i = 0; i < MAXC; ++i) {
      const int64_t d = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (d < D) adaln_bwd_dres_col<IO>(p, d, ro, bro, go, n[i], dn[i], mean_dn_n, rstd, ag[i]);
    }
  }
  const int64_t po = (b * p.chunks + c) * D;
#pragma unroll
  for (int i = 0; i < MAXC; ++i) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (d < D) {
      if (p.pw) p.pw[po + d] = aw[i];
      if (p.pg) p.pg[po + d] = ag[i];
      if (p.psh) p.psh[po + d] = ash[i];
      if (p.psc) p.psc[po + d] = asc[i];
    }
  }
}

// adaln_bwd_kernel on 16-byte vectors: the same per-column math (adaln_norm_grads, adaln_dres).
template <typename T, int MAXV>
__global__ __launch_bounds__(kMaxThreads) void adaln_bwd_vec_kernel(const AdalnBwdParams p) {
  constexpr int V = Vec16<T>::kLen;
  __shared__ float smem[32];
  const int64_t b = blockIdx.x, c = blockIdx.y, D = p.D;
  const int64_t s_begin = c * p.rows_per_prog;
  const int64_t s_end = s_begin + p.rows_per_prog < p.S ? s_begin + p.rows_per_prog : p.S;
  float w[MAXV][V], aw[MAXV][V], ag[MAXV][V], ash[MAXV][V], asc[MAXV][V];
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int64_t d = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * V;
    load_columns<T>(d < D ? p.weight : nullptr, d, 1.f, w[i]);
#pragma unroll
    for (int k = 0; k < V; ++k) aw[i][k] = ag[i][k] = ash[i][k] = asc[i][k] = 0.f;
  }
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int64_t row = b * p.S + s, ro = row * D;
    const int64_t sco = b * p.ssc_b + s * p.ssc_s, go = b * p.sg_b + s * p.sg_s, bro = b * p.sbr_b + s * p.sbr_s;
    const float rstd = p.rstd[row];
    float n[MAXV][V], dn[MAXV][V];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int64_t d = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * V;
      if (d >= D) continue;
      float dy[V], res[V], sc[V], dscale[V];
      load_columns<T>(p.dy, ro + d, 0.f, dy);
      load_columns<T>(p.res, ro + d, 0.f, res);
      load_columns<T>(p.scale, sco + d, 0.f, sc);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const AdalnNormGrads g = adaln_norm_grads(dy[k], res[k], rstd, w[i][k], 1.f + sc[k]);
        n[i][k] = g.n;
        dn[i][k] = g.dn;
        dot += g.dn * g.n;
        aw[i][k] += g.dweight;
        dscale[k] = g.dscale;
        asc[i][k] += g.dscale;  // left unwritten when scale is absent or per token
        ash[i][k] += dy[k];     // likewise for shift
      }
      if (p.dscale) store_columns<T>(p.dscale, ro + d, dscale);
      if (p.dshift) store_columns<T>(p.dshift, ro + d, dy);
    }
    const float mean_dn_n = block_sum(dot, smem) / static_cast<float>(D);
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int64_t d = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * V;
      if (d >= D) continue;
      float dres[V], dr[V];
      load_columns<T>(p.dres, ro + d, 0.f, dres);
#pragma unroll
      for (int k = 0; k < V; ++k) dr[k] = adaln_dres(dn[i][k], n[i][k], mean_dn_n, rstd, dres[k]);
      store_columns<T>(p.dx, ro + d, dr);
      if (!p.branch) continue;
      float g[V], br[V], dbranch[V], dgate[V];
      load_columns<T>(p.gate, go + d, 1.f, g);
      load_columns<T>(p.gate ? p.branch : nullptr, bro + d, 0.f, br);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        dbranch[k] = dr[k] * g[k];
        dgate[k] = dr[k] * br[k];
        ag[i][k] += dgate[k];  // left unwritten without a gate or when it is per token
      }
      store_columns<T>(p.dbranch, ro + d, dbranch);
      if (p.dgate) store_columns<T>(p.dgate, ro + d, dgate);
    }
  }
  const int64_t po = (b * p.chunks + c) * D;
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int64_t d = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * V;
    if (d >= D) continue;
    if (p.pw) store_floats(p.pw + po + d, aw[i]);
    if (p.pg) store_floats(p.pg + po + d, ag[i]);
    if (p.psh) store_floats(p.psh + po + d, ash[i]);
    if (p.psc) store_floats(p.psc + po + d, asc[i]);
  }
}

// The backward's second stage: block (b, j) sums columns [j * kFinishColumns, ...) of program b's sums
// (adaln_math.h), warp g of the block group g of their rows.
constexpr int kFinishColumns = 32;

template <typename T>
__global__ __launch_bounds__(kFinishColumns * kAdalnFinishGroups) void adaln_finish_kernel(const AdalnFinishParams p) {
  __shared__ float shares[kAdalnFinishGroups][kFinishColumns];
  const int g = threadIdx.x / kFinishColumns, c = threadIdx.x % kFinishColumns;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kFinishColumns + c;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const AdalnFinishSum sum = adaln_finish_sum(p, blockIdx.x, k);
    if (!sum.partial) continue;  // the same for the whole block
    // chosen at run time among the params' pointers, which nvcc then no longer knows are global (LD.E, not LDG.E)
    __builtin_assume(__isGlobal(sum.partial) && __isGlobal(sum.out));
    shares[g][c] = d < p.D ? adaln_sum_partial_group(sum.partial, sum.first, sum.n, p.D, d, g) : 0.f;
    __syncthreads();
    if (g == 0 && d < p.D) {
      float total = 0.f;
      for (int i = 0; i < kAdalnFinishGroups; ++i) total += shares[i][c];
      CudaIO<T>::st(sum.out, sum.offset + d, total);
    }
    __syncthreads();
  }
}

// Threads per block for MAXC columns per thread: a multiple of 32, at most kMaxThreads.
unsigned threads_for(int64_t D, int maxc) {
  const int64_t t = (D + maxc - 1) / maxc;
  return static_cast<unsigned>(((t + 31) / 32) * 32);
}

// Whether every row starts 16-byte aligned: the element counts (D, row strides) multiples of a 16-byte vector of
// T and every base aligned (an absent tensor has a null base and zero strides).
template <typename T>
bool rows_aligned16(std::initializer_list<int64_t> counts, std::initializer_list<const void*> bases) {
  for (const int64_t n : counts)
    if (n % Vec16<T>::kLen != 0) return false;
  for (const void* base : bases)
    if (!aligned16(base)) return false;
  return true;
}

template <typename T>
bool fwd_vectorizable(const AdalnFwdParams& p) {
  return rows_aligned16<T>({p.D, p.sx_b, p.sx_s, p.sbr_b, p.sbr_s, p.sg_b, p.sg_s, p.ssh_b, p.ssh_s, p.ssc_b, p.ssc_s},
                           {p.x, p.branch, p.gate, p.weight, p.shift, p.scale, p.res, p.y});
}

template <typename T>
void fwd_launch(const AdalnFwdParams& p, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>(p.B * p.S));  // the binding has checked that the rows fit axis x
  if (fwd_vectorizable<T>(p)) {
    const int64_t vectors = p.D / Vec16<T>::kLen;  // at most 1024 (fp32 at D = 4096)
    if (vectors <= kMaxThreads) adaln_fwd_vec_kernel<T, 1><<<grid, threads_for(vectors, 1), 0, st>>>(p);
    else if (vectors <= 2 * kMaxThreads) adaln_fwd_vec_kernel<T, 2><<<grid, threads_for(vectors, 2), 0, st>>>(p);
    else adaln_fwd_vec_kernel<T, 4><<<grid, threads_for(vectors, 4), 0, st>>>(p);
  } else if (p.D <= 4 * kMaxThreads) adaln_fwd_kernel<T, 4><<<grid, threads_for(p.D, 4), 0, st>>>(p);
  else if (p.D <= 8 * kMaxThreads) adaln_fwd_kernel<T, 8><<<grid, threads_for(p.D, 8), 0, st>>>(p);
  else adaln_fwd_kernel<T, 16><<<grid, threads_for(p.D, 16), 0, st>>>(p);
}

// The contiguous [B*S, D] tensors' rows are aligned when D and their bases are.
template <typename T>
bool bwd_vectorizable(const AdalnBwdParams& p) {
  return rows_aligned16<T>({p.D, p.sbr_b, p.sbr_s, p.sg_b, p.sg_s, p.ssc_b, p.ssc_s},
                           {p.dy, p.dres, p.res, p.branch, p.gate, p.weight, p.scale, p.dx, p.dbranch, p.dgate,
                            p.dshift, p.dscale, p.pw, p.pg, p.psh, p.psc});
}

template <typename T>
void bwd_launch(const AdalnBwdParams& p, cudaStream_t st) {
  // batch on x (up to 2^31 - 1 blocks; y and z stop at 65535), chunks on y
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>(p.chunks));
  if (bwd_vectorizable<T>(p)) {
    const int64_t vectors = p.D / Vec16<T>::kLen;
    if (vectors <= kMaxThreads) {
      adaln_bwd_vec_kernel<T, 1><<<grid, threads_for(vectors, 1), 0, st>>>(p);
      return;
    }
    // Four vectors a thread only in fp32 (D = 4096 is 1024 of its vectors): 16-bit types have at most 512, and
    // their four-vector kernel would spill.
    if constexpr (sizeof(T) == 4) {
      if (vectors > 2 * kMaxThreads) {
        adaln_bwd_vec_kernel<T, 4><<<grid, threads_for(vectors, 4), 0, st>>>(p);
        return;
      }
    }
    adaln_bwd_vec_kernel<T, 2><<<grid, threads_for(vectors, 2), 0, st>>>(p);
  } else if (p.D <= 4 * kMaxThreads) adaln_bwd_kernel<T, 4><<<grid, threads_for(p.D, 4), 0, st>>>(p);
  else if (p.D <= 8 * kMaxThreads) adaln_bwd_kernel<T, 8><<<grid, threads_for(p.D, 8), 0, st>>>(p);
  else adaln_bwd_kernel<T, 16><<<grid, threads_for(p.D, 16), 0, st>>>(p);
}

}  // namespace

// The binding guarantees D <= kAdalnCudaMaxWidth.
int adaln_fwd_cuda(const AdalnFwdParams& p, DType dt, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: fwd_launch<float>(p, st); break;
    case DType::kFloat16: fwd_launch<__half>(p, st); break;
    case DType::kBFloat16: fwd_launch<__nv_bfloat16>(p, st); break;
  }
  return static_cast<int>(cudaGetLastError());
}

int adaln_bwd_cuda(const AdalnBwdParams& p, DType dt, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: bwd_launch<float>(p, st); break;
    case DType::kFloat16: bwd_launch<__half>(p, st); break;
    case DType::kBFloat16: bwd_launch<__nv_bfloat16>(p, st); break;
  }
  return static_cast<int>(cudaGetLastError());
}

int adaln_finish_cuda(const AdalnFinishParams& p, DType dt, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  // programs on x (up to 2^31 - 1), column blocks on y
  const dim3 grid(static_cast<unsigned>(adaln_finish_programs(p)),
                  static_cast<unsigned>((p.D + kFinishColumns - 1) / kFinishColumns));
  constexpr int threads = kFinishColumns * kAdalnFinishGroups;
  switch (dt) {
    case DType::kFloat32: adaln_finish_kernel<float><<<grid, threads, 0, st>>>(p); break;
    case DType::kFloat16: adaln_finish_kernel<__half><<<grid, threads, 0, st>>>(p); break;
    case DType::kBFloat16: adaln_finish_kernel<__nv_bfloat16><<<grid, threads, 0, st>>>(p); break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sphere_fast
