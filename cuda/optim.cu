/*
 * optim.cu — AdamW step and Σx² (global gradient norm for clipping).
 *
 * 1. optim_adamw_step: torch.optim.AdamW, elementwise in place over n elements:
 *      p = param · decay;  m = fmaf(1−β1, g − m, m);  v = fmaf(1−β2, g·g, β2·v);
 *      d = sqrt(v) / bc2_sqrt + eps;  param = round_T(fmaf(−step_size, m / d, p))
 *    with the step's factors computed on the host in f64 and rounded to f32 (src/optim.rs). Every
 *    multiply-add is an explicit fmaf and `/`, sqrtf are IEEE-exact on both compilers (nvcc's
 *    defaults -prec-div, -prec-sqrt), so emu and cuda produce the same bits.
 *    Layout: param, grad [n] (T = f32/f16/bf16), m, v [n] f32.
 *    Work split: thread ↔ a chunk of 2 consecutive elements (m/v: one 64-bit load each; param/grad:
 *    64-bit (f32) or 32-bit (f16/bf16); why not 4: see kAdamVec), grid-stride, 256-thread blocks,
 *    grid = min(⌈chunks/256⌉, 2^16). Misaligned buffers or a partial last chunk go element by
 *    element (same arithmetic, same bits).
 *    Napkin (H200 ~4.8 TB/s): f32 params: 4+4 (param r/w) + 4 (grad) + 16 (m, v r/w) = 28 B/element:
 *    a 40M-parameter LoRA step moves 1.1 GB ≈ 0.23 ms; ~12 flops/element, far under compute.
 *
 * 2. optim_sum_squares: *out = Σ x² in f32. The element → thread map is fixed by n alone: chunks of
 *    V = 16/sizeof(T) elements (one 128-bit load), chunk c → global thread c mod (blocks·256), each
 *    thread visiting its chunks in increasing c with 4 running sums (element k of a chunk → sum
 *    k mod 4, fmaf(x, x, acc)), folded ((s0+s1)+(s2+s3)); a fixed xor butterfly per warp, the 8 warp
 *    sums by warp 0's butterfly → one partial per block. blocks = clamp(⌈chunks/(256·4)⌉, 1, 1024),
 *    a function of n only. One block writes *out directly (no workspace); otherwise partials go to
 *    the workspace (blocks floats) and a one-block second pass sums them in a fixed order (thread t:
 *    partials t, t+256, …; then the same block tree). No atomics: bit-identical run to run and
 *    between emu and cuda.
 *    Napkin: memory-bound, n·sizeof(T) bytes (40M f32: 160 MB ≈ 35 µs + one tiny second launch).
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN

/* ---- AdamW -------------------------------------------------------------------------------------- */

constexpr int kAdamThreads = 256;
constexpr int64_t kAdamMaxBlocks = 1 << 16;
/* Elements per thread iteration. Two, not four: the IEEE `/` and sqrtf have out-of-line slow paths
 * (ptxas subroutine calls), and with four elements' state live across those calls ptxas spills
 * (bf16, sm_80 and sm_90). Two elements keep every load 64-bit (f32) / 32-bit (f16, bf16) and fully
 * coalesced, which a streaming kernel at full occupancy needs more than 128-bit width. */
constexpr int kAdamVec = 2;

struct AdamWFactors {
  float decay, beta2, omb1, omb2, step_size, bc2_sqrt, eps;
};

template <typename T, int N>
struct alignas(N * sizeof(T)) PackN {
  T v[N];
};

__device__ __forceinline__ bool aligned_to(const void* p, uintptr_t a) {
  return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0;
}

__device__ __forceinline__ float adamw_element(const AdamWFactors& f, float param, float g, float& m, float& v) {
  const float p = param * f.decay;
  m = fmaf(f.omb1, g - m, m);
  v = fmaf(f.omb2, g * g, f.beta2 * v);
  const float d = sqrtf(v) / f.bc2_sqrt + f.eps;
  return fmaf(-f.step_size, m / d, p);
}

template <typename T>
__global__ void __launch_bounds__(kAdamThreads)
    adamw_kernel(T* __restrict__ param, const T* __restrict__ grad, float* __restrict__ m, float* __restrict__ v,
                 int64_t n, AdamWFactors f) {
  constexpr int kN = kAdamVec;
  const int64_t chunks = (n + kN - 1) / kN;
  const bool vec_ok = aligned_to(param, kN * sizeof(T)) && aligned_to(grad, kN * sizeof(T)) &&
                      aligned_to(m, kN * sizeof(float)) && aligned_to(v, kN * sizeof(float));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kAdamThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kAdamThreads + threadIdx.x; c < chunks; c += stride) {
    const int64_t e0 = c * kN;
    if (vec_ok && e0 + kN <= n) {
      PackN<T, kN> p = *reinterpret_cast<const PackN<T, kN>*>(param + e0);
      const PackN<T, kN> g = *reinterpret_cast<const PackN<T, kN>*>(grad + e0);
      PackN<float, kN> mm = *reinterpret_cast<const PackN<float, kN>*>(m + e0);
      PackN<float, kN> vv = *reinterpret_cast<const PackN<float, kN>*>(v + e0);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        p.v[k] = from_f32<T>(adamw_element(f, to_f32(p.v[k]), to_f32(g.v[k]), mm.v[k], vv.v[k]));
      }
      *reinterpret_cast<PackN<T, kN>*>(param + e0) = p;
      *reinterpret_cast<PackN<float, kN>*>(m + e0) = mm;
      *reinterpret_cast<PackN<float, kN>*>(v + e0) = vv;
    } else {
      const int64_t e1 = e0 + kN < n ? e0 + kN : n;
      for (int64_t e = e0; e < e1; ++e) {
        float mi = m[e], vi = v[e];
        param[e] = from_f32<T>(adamw_element(f, to_f32(param[e]), to_f32(grad[e]), mi, vi));
        m[e] = mi;
        v[e] = vi;
      }
    }
  }
}

template <typename T>
int launch_adamw(const LkAdamWParams& p, void* stream) {
  const int64_t chunks = (p.n + kAdamVec - 1) / kAdamVec;
  int64_t blocks = (chunks + kAdamThreads - 1) / kAdamThreads;
  if (blocks > kAdamMaxBlocks) blocks = kAdamMaxBlocks;
  const AdamWFactors f{p.decay, p.beta2, p.one_minus_beta1, p.one_minus_beta2, p.step_size, p.bc2_sqrt, p.eps};
  return launch(adamw_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kAdamThreads), 0, stream,
                static_cast<T*>(p.param), static_cast<const T*>(p.grad), p.m, p.v, p.n, f);
}

/* ---- sum of squares ----------------------------------------------------------------------------- */

constexpr int kSumThreads = 256;
constexpr int kSumWarps = kSumThreads / 32;
constexpr int64_t kSumChunksPerThread = 4;
constexpr int64_t kSumMaxBlocks = 1024;

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

/* The block's fixed-order total (valid in thread 0). */
__device__ __forceinline__ float block_sum(float s) {
  __shared__ float warp_sums[kSumWarps];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  s = warp_sum(s);
  if (lane == 0) warp_sums[warp] = s;
  __syncthreads();
  float t = 0.0f;
  if (warp == 0) t = warp_sum(lane < kSumWarps ? warp_sums[lane] : 0.0f);
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    sum_squares_kernel(const T* __restrict__ x, int64_t n, float* __restrict__ dst) {
  constexpr int kN = 16 / static_cast<int>(sizeof(T));
  const int64_t chunks = (n + kN - 1) / kN;
  const bool vec_ok = aligned_to(x, 16);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSumThreads;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x; c < chunks; c += stride) {
    const int64_t e0 = c * kN;
    if (vec_ok && e0 + kN <= n) {
      const PackN<T, kN> p = *reinterpret_cast<const PackN<T, kN>*>(x + e0);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const float xv = to_f32(p.v[k]);
        acc[k % 4] = fmaf(xv, xv, acc[k % 4]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (e0 + k < n) {
          const float xv = to_f32(x[e0 + k]);
          acc[k % 4] = fmaf(xv, xv, acc[k % 4]);
        }
      }
    }
  }
  const float total = block_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  if (threadIdx.x == 0) dst[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const float* __restrict__ partials, int32_t count, float* __restrict__ out) {
  float s = 0.0f;
  for (int i = static_cast<int>(threadIdx.x); i < count; i += kSumThreads) s += partials[i];
  const float total = block_sum(s);
  if (threadIdx.x == 0) out[0] = total;
}

inline int64_t sum_blocks(int64_t n, int dtype_bytes) {
  const int64_t per_chunk = 16 / dtype_bytes;
  const int64_t chunks = (n + per_chunk - 1) / per_chunk;
  int64_t blocks = (chunks + kSumThreads * kSumChunksPerThread - 1) / (kSumThreads * kSumChunksPerThread);
  if (blocks < 1) blocks = 1;
  if (blocks > kSumMaxBlocks) blocks = kSumMaxBlocks;
  return blocks;
}

inline int dtype_bytes(int32_t d) { return d == LK_F32 ? 4 : (d == LK_F16 || d == LK_BF16) ? 2 : 0; }

size_t sum_squares_workspace(const LkSumSquaresParams* p) {
  if (p == nullptr || p->n < 0 || dtype_bytes(p->dtype) == 0) return 0;
  const int64_t blocks = sum_blocks(p->n, dtype_bytes(p->dtype));
  return blocks > 1 ? static_cast<size_t>(blocks) * sizeof(float) : 0;
}

template <typename T>
int launch_sum_squares(const LkSumSquaresParams& p, void* stream) {
  const int64_t blocks = sum_blocks(p.n, static_cast<int>(sizeof(T)));
  const T* x = static_cast<const T*>(p.x);
  if (blocks == 1) {
    return launch(sum_squares_kernel<T>, dim3(1), dim3(kSumThreads), 0, stream, x, p.n, p.out);
  }
  float* partials = static_cast<float*>(p.workspace);
  if (int e = launch(sum_squares_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kSumThreads), 0, stream, x,
                     p.n, partials)) {
    return e;
  }
  return launch(sum_partials_kernel, dim3(1), dim3(kSumThreads), 0, stream, static_cast<const float*>(partials),
                static_cast<int32_t>(blocks), p.out);
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(optim_adamw_step)(const LkAdamWParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "optim_adamw_step";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (p->n < 0) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative n %lld", op, static_cast<long long>(p->n));
  const float factors[] = {p->decay,     p->beta1,     p->beta2,    p->one_minus_beta1, p->one_minus_beta2,
                           p->step_size, p->bc2_sqrt, p->eps};
  for (float f : factors) {
    if (!(f - f == 0.0f)) {
      return set_error(LK_ERR_INVALID_ARGUMENT, "%s: non-finite factor %g", op, static_cast<double>(f));
    }
  }
  if (dtype_bytes(p->dtype) == 0) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d (0 = f32, 1 = f16, 2 = bf16)", op, p->dtype);
  }
  if (p->n == 0) return 0;
  if (p->param == nullptr || p->grad == nullptr || p->m == nullptr || p->v == nullptr) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer (param %p, grad %p, m %p, v %p)", op, p->param,
                     p->grad, static_cast<const void*>(p->m), static_cast<const void*>(p->v));
  }
  switch (p->dtype) {
    case LK_F32:
      return launch_adamw<float>(*p, stream);
    case LK_F16:
      return launch_adamw<__half>(*p, stream);
    default:
      return launch_adamw<__nv_bfloat16>(*p, stream);
  }
}

extern "C" size_t LK_SYMBOL(optim_sum_squares_workspace_size)(const LkSumSquaresParams* p) {
  return lk::LK_NS::sum_squares_workspace(p);
}

extern "C" int LK_SYMBOL(optim_sum_squares)(const LkSumSquaresParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "optim_sum_squares";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (p->n < 0) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative n %lld", op, static_cast<long long>(p->n));
  if (dtype_bytes(p->dtype) == 0) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d (0 = f32, 1 = f16, 2 = bf16)", op, p->dtype);
  }
  if (p->out == nullptr || (p->n > 0 && p->x == nullptr)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer (x %p, out %p)", op, p->x,
                     static_cast<const void*>(p->out));
  }
  if (sum_squares_workspace(p) > 0 &&
      (p->workspace == nullptr || (reinterpret_cast<uintptr_t>(p->workspace) & 3u) != 0)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: workspace %p must be non-null and 4-byte aligned", op,
                     p->workspace);
  }
  switch (p->dtype) {
    case LK_F32:
      return launch_sum_squares<float>(*p, stream);
    case LK_F16:
      return launch_sum_squares<__half>(*p, stream);
    default:
      return launch_sum_squares<__nv_bfloat16>(*p, stream);
  }
}
