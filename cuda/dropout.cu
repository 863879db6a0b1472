/*
 * dropout.cu — fused Philox dropout (DESIGN.md §2 "Dropout"; the mapping lives in philox.cuh).
 *
 * 1. dropout_forward / dropout_backward: y = m ⊙ x · keep_scale (backward: dx = m ⊙ dy · keep_scale,
 *    the same kernel: the mask is regenerated from (seed, offset, element), never stored).
 *    Layout: x [tokens, d] (row stride ld_x), y [tokens, d] (row stride ld_y), one dtype, overwrite.
 *    Work split: thread ↔ one Philox group (4 consecutive flat elements e = 4g .. 4g+3 of the
 *    original-token flat index space, clipped to this launch's rows [token_base, token_base+tokens)),
 *    so each Philox call is made exactly once; a group may straddle two rows (or more when d < 4): the
 *    thread walks col/row from one 64-bit division. Grid-stride over groups, 256-thread blocks,
 *    grid = min(⌈groups/256⌉, 2^16): host-known sizes only.
 *    Napkin: memory-bound elementwise, 2·tokens·d·sizeof(T) bytes; Philox4x32-10 is ~10·(2 IMAD.WIDE +
 *    4 LOP) per 4 elements ≈ 20 integer ops per element, far under the H200's ops:byte balance.
 *
 * 2. dropout_shrink_dense: u = drop(x) · Aᵀ (unscaled, f32) for one adapter, dropout fused into the
 *    load of x; no mask and no x̂ is written.
 *    Work split: one 256-thread block per token (grid.x = tokens), as shrink_dense. The block walks
 *    d_in in chunks of 1024: all threads build x̂ of the chunk in shared memory (one Philox call per
 *    group of 4 elements; x̂ = to_f32(x) · keep_scale rounded to f32, or +0), then warp w accumulates
 *    ranks j ≡ w (mod 8), 4 at a time (32 ranks per pass over x; rank > 32 regenerates the mask once
 *    per extra pass: ⌈rank/32⌉ passes). Lane l accumulates k ≡ l (mod 32) in increasing k with fmaf,
 *    across chunks (1024 is a multiple of 32), then the same xor butterfly as shrink_dense. So every
 *    u[t, j] is bit-identical to shrink_dense applied to the f32 tensor x̂: deterministic and
 *    batch-invariant (a token's bits depend only on its row, d_in and (seed, offset, token index)).
 *    Shared memory: 4 KiB static. Napkin (d_in 4096, rank 16): per token 1024 Philox calls (~80K int
 *    ops) + 65K FMAs; bytes = x row once + A (from L2): still memory/latency-bound like shrink_dense.
 */
#include "philox.cuh"

LK_NAMESPACE_BEGIN

constexpr int kDropoutThreads = 256;
constexpr int64_t kDropoutMaxBlocks = 1 << 16;

template <typename T>
__global__ void __launch_bounds__(kDropoutThreads)
    dropout_scale_kernel(const T* x, T* y, int64_t ld_x, int64_t ld_y, int64_t token_base, DropoutRng drop,
                         int64_t tokens, int64_t d) {
  const int64_t e_begin = token_base * d;             // first flat element of this launch
  const int64_t e_end = (token_base + tokens) * d;    // one past the last
  const int64_t g_first = e_begin / 4;
  const int64_t n_groups = (e_end - 1) / 4 - g_first + 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kDropoutThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kDropoutThreads + threadIdx.x; i < n_groups; i += stride) {
    const int64_t g = g_first + i;
    const uint32_t keep = dropout_keep_bits(drop, static_cast<uint64_t>(g));
    int64_t e = g * 4 > e_begin ? g * 4 : e_begin;
    const int64_t e_stop = g * 4 + 4 < e_end ? g * 4 + 4 : e_end;
    int64_t row = e / d - token_base;
    int64_t col = e % d;
    for (; e < e_stop; ++e) {
      const bool kept = ((keep >> (e & 3)) & 1u) != 0;
      const float v = kept ? to_f32(x[row * ld_x + col]) * drop.keep_scale : 0.0f;
      y[row * ld_y + col] = from_f32<T>(v);
      if (++col == d) {
        col = 0;
        ++row;
      }
    }
  }
}

constexpr int kShrinkDropThreads = 256;
constexpr int kShrinkDropWarps = kShrinkDropThreads / 32;
constexpr int kShrinkDropRanksPerWarp = 4;
constexpr int kShrinkDropRanksPerPass = kShrinkDropWarps * kShrinkDropRanksPerWarp;
constexpr int kShrinkDropChunk = 1024;  // multiple of 32: lane chains continue across chunks
static_assert(kShrinkDropChunk % 32 == 0, "chunk must keep k ≡ lane (mod 32)");

template <typename TX, typename TW>
__global__ void __launch_bounds__(kShrinkDropThreads)
    shrink_dense_dropout_kernel(const TX* __restrict__ x, const TW* __restrict__ a, float* __restrict__ u,
                                int64_t ld_x, int64_t lda, int64_t ld_u, int64_t token_base, DropoutRng drop,
                                int d_in, int rank) {
  __shared__ float xs[kShrinkDropChunk];
  const int64_t token = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const TX* x_row = x + token * ld_x;
  const int64_t e_row = (token_base + token) * static_cast<int64_t>(d_in);
  for (int j0 = 0; j0 < rank; j0 += kShrinkDropRanksPerPass) {
    float acc[kShrinkDropRanksPerWarp];
#pragma unroll
    for (int i = 0; i < kShrinkDropRanksPerWarp; ++i) acc[i] = 0.0f;
    for (int k0 = 0; k0 < d_in; k0 += kShrinkDropChunk) {
      const int len = d_in - k0 < kShrinkDropChunk ? d_in - k0 : kShrinkDropChunk;
      __syncthreads();  // the previous chunk has been consumed
      const int64_t e_lo = e_row + k0;
      const int64_t g_lo = e_lo / 4;
      const int n_groups = static_cast<int>((e_lo + len - 1) / 4 - g_lo + 1);
      for (int i = tid; i < n_groups; i += kShrinkDropThreads) {
        const int64_t g = g_lo + i;
        const uint32_t keep = dropout_keep_bits(drop, static_cast<uint64_t>(g));
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t kk = g * 4 + q - e_lo;  // position inside the chunk
          if (kk >= 0 && kk < len) {
            const bool kept = ((keep >> q) & 1u) != 0;
            xs[kk] = kept ? to_f32(x_row[k0 + kk]) * drop.keep_scale : 0.0f;
          }
        }
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kShrinkDropRanksPerWarp; ++i) {
        const int j = j0 + warp + kShrinkDropWarps * i;
        if (j < rank) {  // warp-uniform
          const TW* a_row = a + static_cast<int64_t>(j) * lda + k0;
          float s = acc[i];
          for (int k = lane; k < len; k += 32) s = fmaf(xs[k], to_f32(a_row[k]), s);
          acc[i] = s;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kShrinkDropRanksPerWarp; ++i) {
      const int j = j0 + warp + kShrinkDropWarps * i;
      if (j < rank) {  // warp-uniform: the full-mask butterfly is legal
        float s = acc[i];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
        if (lane == 0) u[token * ld_u + j] = s;
      }
    }
  }
}

inline DropoutRng rng_of(const LkDropoutConfig& c) {
  DropoutRng r;
  r.seed = c.seed;
  r.offset = c.offset;
  r.threshold = c.threshold;
  r.keep_scale = c.keep_scale;
  return r;
}

template <typename T>
int launch_dropout_scale(const LkDropoutParams& p, void* stream) {
  const int64_t groups = ((p.token_base + p.tokens) * static_cast<int64_t>(p.d) - 1) / 4 -
                         p.token_base * static_cast<int64_t>(p.d) / 4 + 1;
  int64_t blocks = (groups + kDropoutThreads - 1) / kDropoutThreads;
  if (blocks > kDropoutMaxBlocks) blocks = kDropoutMaxBlocks;
  return launch(dropout_scale_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kDropoutThreads), 0, stream,
                static_cast<const T*>(p.x), static_cast<T*>(p.y), p.ld_x, p.ld_y, p.token_base, rng_of(p.drop),
                static_cast<int64_t>(p.tokens), static_cast<int64_t>(p.d));
}

template <typename TX, typename TW>
int launch_shrink_dense_dropout(const LkShrinkDenseDropoutParams& p, void* stream) {
  return launch(shrink_dense_dropout_kernel<TX, TW>, dim3(static_cast<unsigned>(p.tokens)),
                dim3(kShrinkDropThreads), 0, stream, static_cast<const TX*>(p.x), static_cast<const TW*>(p.a), p.u,
                p.ld_x, p.lda, p.ld_u, p.token_base, rng_of(p.drop), p.d_in, p.rank);
}

/* keep_scale finite and >= 0 (NaN fails both comparisons). */
inline bool keep_scale_ok(float s) { return s >= 0.0f && s <= 3.40282346638528859811704183484516925e38f; }

/* token_base >= 0 and (token_base + tokens) · d fits int64 (the flat index of every element). */
inline bool flat_index_fits(int64_t token_base, int32_t tokens, int32_t d) {
  if (token_base < 0) return false;
  const int64_t max = 9223372036854775807LL;
  if (token_base > max - tokens) return false;
  return d == 0 || token_base + tokens <= max / d;
}

int dropout_scale(const char* op, const LkDropoutParams* p, void* stream) {
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (p->tokens < 0 || p->d < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative size (tokens %d, d %d)", op, p->tokens, p->d);
  }
  if (p->ld_x < p->d || p->ld_y < p->d) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: leading dimension too small (ld_x %lld, ld_y %lld >= d %d)", op,
                     static_cast<long long>(p->ld_x), static_cast<long long>(p->ld_y), p->d);
  }
  if (!flat_index_fits(p->token_base, p->tokens, p->d)) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: token_base %lld must be >= 0 with (token_base + tokens) * d within int64", op,
                     static_cast<long long>(p->token_base));
  }
  if (!keep_scale_ok(p->drop.keep_scale)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: drop.keep_scale %g must be finite and >= 0", op,
                     static_cast<double>(p->drop.keep_scale));
  }
  if (p->tokens == 0 || p->d == 0) return 0;
  if (p->x == nullptr || p->y == nullptr) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer (x %p, y %p)", op, p->x, p->y);
  }
  switch (p->dtype) {
    case LK_F32:
      return launch_dropout_scale<float>(*p, stream);
    case LK_F16:
      return launch_dropout_scale<__half>(*p, stream);
    case LK_BF16:
      return launch_dropout_scale<__nv_bfloat16>(*p, stream);
    default:
      return set_error(LK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d (0 = f32, 1 = f16, 2 = bf16)", op, p->dtype);
  }
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(dropout_forward)(const LkDropoutParams* p, void* stream) {
  return lk::LK_NS::dropout_scale("dropout_forward", p, stream);
}

extern "C" int LK_SYMBOL(dropout_backward)(const LkDropoutParams* p, void* stream) {
  return lk::LK_NS::dropout_scale("dropout_backward", p, stream);
}

extern "C" int LK_SYMBOL(dropout_shrink_dense)(const LkShrinkDenseDropoutParams* p, void* stream) {
  using namespace lk::LK_NS;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "dropout_shrink_dense: params is null");
  if (p->tokens < 0 || p->d_in < 0 || p->rank < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "dropout_shrink_dense: negative size (tokens %d, d_in %d, rank %d)",
                     p->tokens, p->d_in, p->rank);
  }
  if (p->ld_x < p->d_in || p->lda < p->d_in || p->ld_u < p->rank) {
    return set_error(
        LK_ERR_INVALID_ARGUMENT,
        "dropout_shrink_dense: leading dimension too small (ld_x %lld, lda %lld >= d_in %d; ld_u %lld >= rank %d)",
        static_cast<long long>(p->ld_x), static_cast<long long>(p->lda), p->d_in, static_cast<long long>(p->ld_u),
        p->rank);
  }
  if (!flat_index_fits(p->token_base, p->tokens, p->d_in)) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "dropout_shrink_dense: token_base %lld must be >= 0 with (token_base + tokens) * d_in within "
                     "int64",
                     static_cast<long long>(p->token_base));
  }
  if (!keep_scale_ok(p->drop.keep_scale)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "dropout_shrink_dense: drop.keep_scale %g must be finite and >= 0",
                     static_cast<double>(p->drop.keep_scale));
  }
  if (p->tokens == 0 || p->rank == 0) return 0;
  if (p->u == nullptr || (p->d_in > 0 && (p->x == nullptr || p->a == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "dropout_shrink_dense: null pointer (x %p, a %p, u %p)", p->x, p->a,
                     static_cast<const void*>(p->u));
  }
  switch (p->w_dtype) {
    case LK_F32:
      if (p->x_dtype == LK_F32) return launch_shrink_dense_dropout<float, float>(*p, stream);
      break;
    case LK_F16:
      if (p->x_dtype == LK_F16) return launch_shrink_dense_dropout<__half, __half>(*p, stream);
      if (p->x_dtype == LK_F32) return launch_shrink_dense_dropout<float, __half>(*p, stream);
      break;
    case LK_BF16:
      if (p->x_dtype == LK_BF16) return launch_shrink_dense_dropout<__nv_bfloat16, __nv_bfloat16>(*p, stream);
      if (p->x_dtype == LK_F32) return launch_shrink_dense_dropout<float, __nv_bfloat16>(*p, stream);
      break;
    default:
      break;
  }
  return set_error(LK_ERR_UNSUPPORTED_DTYPE,
                   "dropout_shrink_dense: x dtype %d with weight dtype %d (x must be the weights' dtype or f32; "
                   "0 = f32, 1 = f16, 2 = bf16)",
                   p->x_dtype, p->w_dtype);
}
