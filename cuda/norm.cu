/*
 * norm.cu — RMSNorm forward and backward (contract: lora_kernels.h, "norm").
 *
 *   forward:  rstd[r] = 1/sqrt(Σ_j x[r,j]² / dim + eps)  (f32, saved),  y[r,j] = (x[r,j]·rstd[r])·w[j]
 *   backward: c[r] = Σ_j dy·w·x,  dx[r,k] = rstd·w[k]·dy[r,k] − (rstd³·c/dim)·x[r,k],
 *             dw[j] = Σ_r dy[r,j]·(x[r,j]·rstd[r])
 * Layout: x, y, dy, dx [rows, dim] packed row-major, w, dw [dim], rstd [rows] f32; one storage dtype
 * (f32, f16, bf16), f32 arithmetic, one rounding to T per output. 1/sqrt is an IEEE sqrtf and division
 * (no rsqrtf approximation), so emu and cuda compute the same rstd from the same sum.
 *
 * Vector access: groups of VEC = 16 / sizeof(T) consecutive columns as one 16-byte load/store when
 * dim % VEC == 0 and every pointer is 16-byte aligned (then every row is); otherwise VEC = 1.
 *
 * Forward work split (by dim only): dim ≤ 1024 → one warp per row, 8 rows per 256-thread block;
 * larger → one 256-thread block per row. Each thread sums x² of its groups (g ≡ lane mod G) in column
 * order with fmaf, then a warp xor butterfly (every lane gets the same bits), and for block rows the 8
 * warp sums are added in warp order by every thread. The second pass re-reads x (L1/L2 hit) and w.
 *
 * Backward work split: rows are cut into P pieces of C = max(8, ⌈rows/1024⌉) consecutive rows (a
 * function of rows only, P ≤ 1024); block p (256 threads) walks its rows in order, one row at a time:
 * c by the same per-thread chain + butterfly + warp-order reduction, then dx, and each thread adds
 * dy·(x·rstd) of its own columns into a per-block f32 accumulator (dynamic shared memory, dim·4 bytes,
 * up to 64 KiB; above that the block's workspace row itself, in global memory). Thread ownership of
 * columns is fixed, so no synchronisation or atomics touch the accumulators. The accumulator is stored
 * to workspace row p, and a finalize kernel sums the P rows in piece order: dw[j] = Σ_p part[p][j].
 * Deterministic (fixed order everywhere, independent of the schedule) and bit-identical run to run.
 * rows = 0 skips the row pass; the finalize then writes dw = 0.
 * Workspace: P·dim·4 bytes of f32 partials (0 when rows = 0), 4-byte aligned.
 *
 * Napkin (H200 ~4.8 TB/s; Llama-3-8B 8192 × 4096 bf16): forward reads x (64 MiB) once from DRAM
 * (+ an L1/L2 re-read) and writes y (64 MiB) → ~28 µs. Backward reads x, dy (128 MiB), writes dx (64
 * MiB), workspace 1024 × 4096 × 4 = 16 MiB written + read by the finalize → ~45 µs. Arithmetic is a few
 * FMAs per element: memory-bound. Backward with small dim (< 256·VEC) leaves threads idle; LLM norms
 * have dim ≥ 2048.
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN

constexpr int kNormThreads = 256;
constexpr int kNormWarps = kNormThreads / 32;
constexpr int kNormWarpRowMaxDim = 1024;
constexpr int kNormMinRowsPerPiece = 8;
constexpr int kNormMaxPieces = 1024;
constexpr size_t kNormMaxSmemAcc = 64 * 1024;

template <class T, int VEC>
struct __align__(16) NormPack {
  T v[VEC];
};
template <class T>
struct NormPack<T, 1> {
  T v[1];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* Sum over the 256 threads of the block: butterfly per warp, then the 8 warp sums in warp order (all
 * threads get the same bits). `red` is shared scratch of kNormWarps floats; safe to call repeatedly. */
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float s = red[0];
#pragma unroll
  for (int w = 1; w < kNormWarps; ++w) s += red[w];
  __syncthreads();  // red is reused by the next call
  return s;
}

/* Forward: G = 32 (warp per row, 8 rows per block) or 256 (block per row). */
template <class T, int VEC, int G>
__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                           float* __restrict__ rstd, int32_t rows, int32_t dim, float eps) {
  using P = NormPack<T, VEC>;
  __shared__ float red[kNormWarps];
  const int lane = G == 32 ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x);
  const int64_t row =
      G == 32 ? static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32 : static_cast<int64_t>(blockIdx.x);
  if (G == 32 && row >= rows) return;  // warp-uniform; block rows always exist (grid = rows)
  const int groups = dim / VEC;
  const T* xr = x + row * dim;
  T* yr = y + row * dim;
  float ss = 0.0f;
  for (int g = lane; g < groups; g += G) {
    const P v = *reinterpret_cast<const P*>(xr + static_cast<int64_t>(g) * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float f = to_f32(v.v[k]);
      ss = fmaf(f, f, ss);
    }
  }
  ss = G == 32 ? warp_sum(ss) : block_sum(ss, red);
  const float mean = dim > 0 ? ss / static_cast<float>(dim) : 0.0f;
  const float r = 1.0f / sqrtf(mean + eps);
  if (lane == 0) rstd[row] = r;
  for (int g = lane; g < groups; g += G) {
    const int64_t off = static_cast<int64_t>(g) * VEC;
    const P v = *reinterpret_cast<const P*>(xr + off);
    const P wv = *reinterpret_cast<const P*>(w + off);
    P o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_f32<T>((to_f32(v.v[k]) * r) * to_f32(wv.v[k]));
    *reinterpret_cast<P*>(yr + off) = o;
  }
}

struct NormSplit {
  int64_t rows_per_piece;
  int64_t pieces;
};

inline NormSplit norm_split(int32_t rows) {
  NormSplit s;
  int64_t c = (static_cast<int64_t>(rows) + kNormMaxPieces - 1) / kNormMaxPieces;
  if (c < kNormMinRowsPerPiece) c = kNormMinRowsPerPiece;
  s.rows_per_piece = c;
  s.pieces = rows > 0 ? (rows + c - 1) / c : 0;
  return s;
}

/* Backward row pass: block p owns rows [p·C, min((p+1)·C, rows)). dx written; the dw partial of the
 * piece written to part[p][:]. kSmemAcc: accumulate in dynamic shared memory, else in part[p] directly. */
template <class T, int VEC, bool kSmemAcc>
__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_backward_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
                            const T* __restrict__ dy, T* __restrict__ dx, float* __restrict__ part, int32_t rows,
                            int32_t dim, int64_t rows_per_piece) {
  using P = NormPack<T, VEC>;
  __shared__ float red[kNormWarps];
  LK_DYNAMIC_SMEM(float, smem_acc);
  const int tid = static_cast<int>(threadIdx.x);
  const int groups = dim / VEC;
  float* acc = kSmemAcc ? smem_acc : part + static_cast<int64_t>(blockIdx.x) * dim;
  for (int g = tid; g < groups; g += kNormThreads) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[g * VEC + k] = 0.0f;
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_piece;
  const int64_t r1 = r0 + rows_per_piece < rows ? r0 + rows_per_piece : rows;
  const float inv_dim = 1.0f / static_cast<float>(dim);
  for (int64_t row = r0; row < r1; ++row) {
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    const float r = rstd[row];
    float c = 0.0f;
    for (int g = tid; g < groups; g += kNormThreads) {
      const int64_t off = static_cast<int64_t>(g) * VEC;
      const P xv = *reinterpret_cast<const P*>(xr + off);
      const P dv = *reinterpret_cast<const P*>(dyr + off);
      const P wv = *reinterpret_cast<const P*>(w + off);
#pragma unroll
      for (int k = 0; k < VEC; ++k) c = fmaf(to_f32(dv.v[k]) * to_f32(wv.v[k]), to_f32(xv.v[k]), c);
    }
    c = block_sum(c, red);
    const float kc = (r * r * r) * c * inv_dim;
    T* dxr = dx + row * dim;
    for (int g = tid; g < groups; g += kNormThreads) {
      const int64_t off = static_cast<int64_t>(g) * VEC;
      const P xv = *reinterpret_cast<const P*>(xr + off);
      const P dv = *reinterpret_cast<const P*>(dyr + off);
      const P wv = *reinterpret_cast<const P*>(w + off);
      P o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xf = to_f32(xv.v[k]);
        const float df = to_f32(dv.v[k]);
        o.v[k] = from_f32<T>((r * to_f32(wv.v[k])) * df - kc * xf);
        acc[g * VEC + k] = fmaf(df, xf * r, acc[g * VEC + k]);
      }
      *reinterpret_cast<P*>(dxr + off) = o;
    }
  }
  if (kSmemAcc) {
    float* dst = part + static_cast<int64_t>(blockIdx.x) * dim;
    for (int g = tid; g < groups; g += kNormThreads) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) dst[g * VEC + k] = acc[g * VEC + k];
    }
  }
}

/* dw[j] = Σ_p part[p][j] in piece order (0 when there are no pieces). */
template <class T>
__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_dw_finalize_kernel(const float* __restrict__ part, T* __restrict__ dw, int32_t dim, int64_t pieces) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kNormThreads + threadIdx.x;
  if (j >= dim) return;
  float s = 0.0f;
  for (int64_t p = 0; p < pieces; ++p) s += part[p * dim + j];
  dw[j] = from_f32<T>(s);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <class T, int VEC>
int launch_forward(const LkRmsNormForwardParams& p, void* stream) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  T* y = static_cast<T*>(p.y);
  if (p.dim <= kNormWarpRowMaxDim) {
    const int64_t blocks = (static_cast<int64_t>(p.rows) + kNormWarps - 1) / kNormWarps;
    return launch(rmsnorm_forward_kernel<T, VEC, 32>, dim3(static_cast<unsigned>(blocks)), dim3(kNormThreads), 0,
                  stream, x, w, y, p.rstd, p.rows, p.dim, p.eps);
  }
  return launch(rmsnorm_forward_kernel<T, VEC, kNormThreads>, dim3(static_cast<unsigned>(p.rows)),
                dim3(kNormThreads), 0, stream, x, w, y, p.rstd, p.rows, p.dim, p.eps);
}

template <class T>
int forward_dtype(const LkRmsNormForwardParams& p, void* stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (p.dim % kVec == 0 && aligned16(p.x) && aligned16(p.w) && aligned16(p.y)) {
    return launch_forward<T, kVec>(p, stream);
  }
  return launch_forward<T, 1>(p, stream);
}

template <class T, int VEC>
int launch_backward(const LkRmsNormBackwardParams& p, void* stream) {
  const NormSplit s = norm_split(p.rows);
  float* part = static_cast<float*>(p.workspace);
  if (s.pieces > 0) {
    const size_t smem = static_cast<size_t>(p.dim) * sizeof(float);
    int rc;
    if (smem <= kNormMaxSmemAcc) {
      if (smem > 48 * 1024) {
        rc = set_max_dynamic_smem(rmsnorm_backward_kernel<T, VEC, true>, smem);
        if (rc != 0) return rc;
      }
      rc = launch(rmsnorm_backward_kernel<T, VEC, true>, dim3(static_cast<unsigned>(s.pieces)), dim3(kNormThreads),
                  smem, stream, static_cast<const T*>(p.x), static_cast<const T*>(p.w), p.rstd,
                  static_cast<const T*>(p.dy), static_cast<T*>(p.dx), part, p.rows, p.dim, s.rows_per_piece);
    } else {
      rc = launch(rmsnorm_backward_kernel<T, VEC, false>, dim3(static_cast<unsigned>(s.pieces)), dim3(kNormThreads),
                  0, stream, static_cast<const T*>(p.x), static_cast<const T*>(p.w), p.rstd,
                  static_cast<const T*>(p.dy), static_cast<T*>(p.dx), part, p.rows, p.dim, s.rows_per_piece);
    }
    if (rc != 0) return rc;
  }
  const int64_t blocks = (static_cast<int64_t>(p.dim) + kNormThreads - 1) / kNormThreads;
  return launch(rmsnorm_dw_finalize_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kNormThreads), 0, stream,
                static_cast<const float*>(part), static_cast<T*>(p.dw), p.dim, s.pieces);
}

template <class T>
int backward_dtype(const LkRmsNormBackwardParams& p, void* stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (p.dim % kVec == 0 && aligned16(p.x) && aligned16(p.w) && aligned16(p.dy) && aligned16(p.dx)) {
    return launch_backward<T, kVec>(p, stream);
  }
  return launch_backward<T, 1>(p, stream);
}

inline size_t backward_workspace(int32_t rows, int32_t dim) {
  if (rows <= 0 || dim <= 0) return 0;
  return static_cast<size_t>(norm_split(rows).pieces) * static_cast<size_t>(dim) * sizeof(float);
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(norm_rmsnorm_forward)(const LkRmsNormForwardParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "norm_rmsnorm_forward";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (p->rows < 0 || p->dim < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative size (rows %d, dim %d)", op, p->rows, p->dim);
  }
  if (!(p->eps >= 0.0f && p->eps <= 3.40282346638528859811704183484516925e38f)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: eps %g must be finite and >= 0", op, static_cast<double>(p->eps));
  }
  if (p->rows == 0) return 0;
  if (p->rstd == nullptr || (p->dim > 0 && (p->x == nullptr || p->w == nullptr || p->y == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer (x %p, w %p, y %p, rstd %p)", op, p->x, p->w, p->y,
                     static_cast<void*>(p->rstd));
  }
  switch (p->dtype) {
    case LK_F32:
      return forward_dtype<float>(*p, stream);
    case LK_F16:
      return forward_dtype<__half>(*p, stream);
    case LK_BF16:
      return forward_dtype<__nv_bfloat16>(*p, stream);
    default:
      return set_error(LK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d (0 = f32, 1 = f16, 2 = bf16)", op, p->dtype);
  }
}

extern "C" size_t LK_SYMBOL(norm_rmsnorm_backward_workspace_size)(const LkRmsNormBackwardParams* p) {
  return p == nullptr ? 0 : lk::LK_NS::backward_workspace(p->rows, p->dim);
}

extern "C" int LK_SYMBOL(norm_rmsnorm_backward)(const LkRmsNormBackwardParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "norm_rmsnorm_backward";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (p->rows < 0 || p->dim < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative size (rows %d, dim %d)", op, p->rows, p->dim);
  }
  if (p->dim == 0) return 0;
  const bool has_rows = p->rows > 0;
  if (p->dw == nullptr || (has_rows && (p->x == nullptr || p->w == nullptr || p->rstd == nullptr ||
                                        p->dy == nullptr || p->dx == nullptr || p->workspace == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: null pointer (x %p, w %p, rstd %p, dy %p, dx %p, dw %p, workspace %p needing %zu bytes)", op,
                     p->x, p->w, static_cast<const void*>(p->rstd), p->dy, p->dx, p->dw, p->workspace,
                     backward_workspace(p->rows, p->dim));
  }
  if (has_rows && (reinterpret_cast<uintptr_t>(p->workspace) & 3u) != 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: workspace %p must be 4-byte aligned", op, p->workspace);
  }
  switch (p->dtype) {
    case LK_F32:
      return backward_dtype<float>(*p, stream);
    case LK_F16:
      return backward_dtype<__half>(*p, stream);
    case LK_BF16:
      return backward_dtype<__nv_bfloat16>(*p, stream);
    default:
      return set_error(LK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d (0 = f32, 1 = f16, 2 = bf16)", op, p->dtype);
  }
}
