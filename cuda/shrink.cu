/*
 * shrink.cu — dense single-adapter LoRA shrink: u[t, j] = Σ_k x[t, k] · A[j, k]   (u = x · Aᵀ)
 *
 * Layout: x [tokens, d_in] (row stride ld_x), A [rank, d_in] (row stride lda), u [tokens, rank] f32
 * (row stride ld_u). u is unscaled: the LoRA scale is applied once, in expand (DESIGN.md §2).
 *
 * Work split: one 256-thread block per token (grid.x = tokens, so up to 2^31 − 1 tokens); warp w
 * computes ranks j = w, w + 8, …; lane l sums k ≡ l (mod 32) in increasing k, then a fixed xor
 * butterfly adds the 32 partials. The order depends only on d_in, never on tokens or other rows:
 * deterministic and batch-invariant.
 *
 * Napkin math: reads tokens·d_in x elements and rank·d_in A elements (A re-read per token, from L2),
 * 2·tokens·rank·d_in FLOPs. At decode (tokens ≤ 256, rank 16, d_in 4096) that is ~0.1–2 MB: memory-
 * and latency-bound. This is the plumbing kernel the serving family (BGMV/SGMV) grows from.
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN

constexpr int kShrinkDenseThreads = 256;
constexpr int kWarps = kShrinkDenseThreads / 32;

template <typename TX, typename TW>
__global__ void __launch_bounds__(kShrinkDenseThreads)
    shrink_dense_kernel(const TX* __restrict__ x, const TW* __restrict__ a, float* __restrict__ u, int64_t ld_x,
                        int64_t lda, int64_t ld_u, int d_in, int rank) {
  const int64_t token = blockIdx.x;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const TX* x_row = x + token * ld_x;
  for (int j = warp; j < rank; j += kWarps) {
    const TW* a_row = a + static_cast<int64_t>(j) * lda;
    float acc = 0.0f;
    for (int k = lane; k < d_in; k += 32) {
      acc = fmaf(to_f32(x_row[k]), to_f32(a_row[k]), acc);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    if (lane == 0) {
      u[token * ld_u + j] = acc;
    }
  }
}

template <typename TX, typename TW>
int launch_shrink_dense(const LkShrinkDenseParams& p, void* stream) {
  return launch(shrink_dense_kernel<TX, TW>, dim3(static_cast<unsigned>(p.tokens)), dim3(kShrinkDenseThreads), 0,
                stream, static_cast<const TX*>(p.x), static_cast<const TW*>(p.a), p.u, p.ld_x, p.lda, p.ld_u, p.d_in,
                p.rank);
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(shrink_dense)(const LkShrinkDenseParams* p, void* stream) {
  using namespace lk::LK_NS;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "shrink_dense: params is null");
  if (p->tokens < 0 || p->d_in < 0 || p->rank < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "shrink_dense: negative size (tokens %d, d_in %d, rank %d)", p->tokens,
                     p->d_in, p->rank);
  }
  if (p->ld_x < p->d_in || p->lda < p->d_in || p->ld_u < p->rank) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "shrink_dense: leading dimension too small (ld_x %lld, lda %lld >= d_in %d; ld_u %lld >= rank %d)",
                     static_cast<long long>(p->ld_x), static_cast<long long>(p->lda), p->d_in,
                     static_cast<long long>(p->ld_u), p->rank);
  }
  if (p->tokens == 0 || p->rank == 0) return 0;
  if (p->u == nullptr || (p->d_in > 0 && (p->x == nullptr || p->a == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "shrink_dense: null pointer (x %p, a %p, u %p)", p->x, p->a,
                     static_cast<const void*>(p->u));
  }
  switch (p->w_dtype) {
    case LK_F32:
      if (p->x_dtype == LK_F32) return launch_shrink_dense<float, float>(*p, stream);
      break;
    case LK_F16:
      if (p->x_dtype == LK_F16) return launch_shrink_dense<__half, __half>(*p, stream);
      if (p->x_dtype == LK_F32) return launch_shrink_dense<float, __half>(*p, stream);
      break;
    case LK_BF16:
      if (p->x_dtype == LK_BF16) return launch_shrink_dense<__nv_bfloat16, __nv_bfloat16>(*p, stream);
      if (p->x_dtype == LK_F32) return launch_shrink_dense<float, __nv_bfloat16>(*p, stream);
      break;
    default:
      break;
  }
  return set_error(LK_ERR_UNSUPPORTED_DTYPE,
                   "shrink_dense: x dtype %d with weight dtype %d (x must be the weights' dtype or f32; "
                   "0 = f32, 1 = f16, 2 = bf16)",
                   p->x_dtype, p->w_dtype);
}
