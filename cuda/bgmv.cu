/*
 * bgmv.cu — BGMV (decode): multi-adapter LoRA with one adapter id per token, tokens in any order.
 *
 *   shrink: u[s, t, j]            = Σ_k x[t, k] · A(id[t], s)[j, k]                 j < rank(id[t], s)
 *   expand: out[t, off_s + i] (+)= scale(id[t], s) · Σ_j u[s, t, j] · B(id[t], s)[i, j]   i < n_s
 *
 * Layout (lora_kernels.h, DESIGN.md §2): x [tokens, d_in] (ld_x), u f32 [n_slices, tokens, r_cap]
 * (columns ≥ rank never read or written), out [tokens, ld_out], table[adapter * n_slices + slice] =
 * {a [rank, d_in] (lda), b [n_s, rank] (ldb), rank, scale}. u is unscaled; the scale is applied once,
 * in expand. Id −1: the token is untouched (u and out). Id < −1 or ≥ n_adapters: skipped (untouched),
 * LK_FAULT_ADAPTER_ID. An invalid entry (rank < 0, rank > r_cap, null a or b with rank > 0): the token
 * is skipped in that slice (u[s, t, :] and out's slice-s columns untouched, in both kernels alike; its
 * other slices are computed), LK_FAULT_TABLE_ENTRY. Expand rank 0: overwrite writes 0, add leaves the
 * columns alone.
 *
 * ---- shrink: grid (tokens, n_slices · G), block 128 threads (4 warps), no shared memory.
 * One warp per A row j (a row-dot of length d_in); the warps of the G row groups of one (token, slice)
 * take rows gw, gw + 4G, … with gw = 4g + warp, so a rank-8 adapter costs 8 warp-rows even if r_cap is
 * 128 (blocks past the rank exit at once; G is capped so that there are at most ~2048 such blocks).
 * G = min(⌈r_cap / 4⌉, ⌈2048 / (tokens · n_slices)⌉): many row groups at T = 1 (latency), one or two at
 * T = 256 (the token axis fills the machine). G changes only which warp computes a row, never how.
 * Row-dot order (fixed by d_in and the weight dtype alone): with V = 16 / sizeof(w) elements per 16-byte
 * chunk, lane l accumulates chunks c = l, l + 32, … < ⌊d_in / V⌋ in increasing c, elements in increasing
 * k, one fmaf chain; then lane l adds tail element ⌊d_in / V⌋·V + l if it exists; then a xor butterfly
 * (16, 8, 4, 2, 1). Fast path: 16-byte vector loads of A and x (4 chunks in flight per lane) when the A
 * row base (a, lda) and the x row are 16-byte aligned — decided per (token, entry), uniformly per block;
 * otherwise scalar loads in EXACTLY the same fma order. Both paths give identical bits, so an x row
 * whose alignment depends on the token's position (odd ld_x) cannot break batch invariance.
 *
 * ---- expand: grid (tokens, min(C, 65535)), C = Σ_s ⌈n_s / 128⌉ column chunks over all slices (one
 * launch covers q/k/v of unequal widths; y loops if C > 65535), block 128 threads, dynamic smem
 * r_cap · 4 bytes (the token's u row for the slice, loaded once per block).
 * A team of L lanes computes one output element: L = the smallest power of two ≥ ⌈rank / V⌉, at most
 * 32 (L = 1 for rank ≤ V: one thread per output; L = 16 for rank 128 f16). Team lane q accumulates
 * the 16-byte chunks q, q + L, … of B's row i (fmaf chain in increasing j), then a xor butterfly over
 * the team; lane q = 0 owns the output element and writes it once: add `out = round(out + scale·acc)`
 * (one fmaf), overwrite `out = round(scale·acc)`. A team's row chunks are contiguous, and consecutive
 * teams take consecutive rows, so a warp reads 32·16 contiguous bytes of B per instruction when
 * ldb = rank. Each thread handles L rows (128 columns per block), 4 at a time (4 loads in flight).
 * L depends only on rank and the weight dtype; the vector/scalar choice (b, ldb alignment) does not
 * change the order. Every output element is written by exactly one thread: no atomics, deterministic.
 *
 * No reduction order depends on tokens, other tokens, r_cap or G: a token's u and out bits are the same
 * alone or inside any batch (batch invariance). Launch geometry uses host-known sizes only.
 *
 * ---- napkin math (H200: ~4.8 TB/s HBM, 50 MB L2, 132 SMs; Llama-3-8B qkv: d_in 4096, slices
 * 4096/1024/1024, f16). Memory-bound (DESIGN.md §4): bytes ≈ unique adapter weights + activations.
 *   shrink per (adapter, all 3 slices): 3 · rank · 4096 · 2 B = 384 KB at rank 16 (3 MB at rank 128);
 *     x: T · 8 KB; u: T · 3 · rank · 4 B. FLOPs 2 · T · 3 · rank · 4096 (T = 256, r 16: 0.1 GFLOP,
 *     ~2 µs of FP32 FMA at ~60 TFLOP/s — below the memory time at distinct adapters).
 *   expand per adapter: (4096 + 2·1024) · rank · 2 B = 192 KB at rank 16; out (add) T · 6144 · 2 · 2 B.
 *   T = 1: < 1 MB → ~0.2 µs of bandwidth; the launch (~2–4 µs, ~1 µs in a CUDA graph) and a couple of
 *     DRAM round trips (~1 µs each) dominate. Shrink at T = 1, rank 16: 48 warps, each one 8 KB row in
 *     4 × 2 KB rounds; rank 128: 384 warps.
 *   T = 256, distinct adapters, rank 16: shrink 256 · 384 KB ≈ 100 MB → ~21 µs; expand 50 MB + 6 MB
 *     → ~12 µs. Rank 128: ×8 (weights dominate). One shared adapter: HBM sees the weights once
 *     (< 4 MB, ~1 µs); every token re-reads them from L2 (shrink 100 MB, expand 50 MB of L2 traffic at
 *     rank 16, ~5–10 µs) — the BGMV trade-off (as Punica); SGMV is the kernel that reuses a tile
 *     across the tokens of a segment.
 *   In flight per SM (Little's law needs ~4.8 TB/s · ~1 µs / 132 ≈ 36 KB): shrink 4 × 16 B of A per
 *     lane; at 48–92 registers (ptxas, sm_90) 5–10 blocks = 20–40 warps per SM → 40–80 KB. Expand: up
 *     to 4 × 16 B of B per thread (4 rows per thread when rank > 2V, one when rank ≤ V: ~8 KB per
 *     block then, but those adapters are small).
 *
 * Launcher contract beyond lora_kernels.h: r_cap ≤ 1024; expand rejects overlapping non-empty slices
 * (two threads would own one output element). Entry strides lda/ldb are trusted (not checked on the
 * device; shrink cannot see ldb's partner d_in in expand and vice versa).
 *
 * Tensor parallelism: shrink and expand are separate launches, so a row-parallel layer can all-reduce
 * u between them and a column-parallel one shards B (each rank passes its slice widths/offsets).
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN

constexpr int kBgmvMaxRCap = 1024;
constexpr int kShrinkWarps = 4;
constexpr int kShrinkThreads = kShrinkWarps * 32;
constexpr int kShrinkUnroll = 4;            /* 16-byte chunks in flight per lane */
constexpr int64_t kShrinkTargetBlocks = 2048; /* cap on row groups × tokens × slices */
constexpr int kExpandThreads = 128;
constexpr int kExpandCols = 128; /* output columns per block (of one slice) */
constexpr int kExpandGroup = 4;  /* rows per thread in flight */

/* A 16-byte-aligned bundle of N elements (N · sizeof(T) a multiple of 16): loaded with vector loads. */
template <typename T, int N>
struct __align__(16) BgmvPack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ BgmvPack<T, N> bgmv_load_pack(const T* p) {
  return *reinterpret_cast<const BgmvPack<T, N>*>(p);
}

__device__ __forceinline__ bool bgmv_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(15)) == 0;
}

/* An entry is usable iff 0 <= rank <= r_cap and (rank == 0 or both pointers are set). */
__device__ __forceinline__ bool bgmv_entry_ok(int rank, const LkAdapterEntry* e, int r_cap) {
  return rank >= 0 && rank <= r_cap && (rank == 0 || (e->a != nullptr && e->b != nullptr));
}

__device__ __forceinline__ void bgmv_report(uint32_t* error_word, uint32_t bit) {
  if (error_word != nullptr) atomicOr(error_word, bit);
}

/* ------------------------------------------------------------------------------------------------
 * shrink */

/* Lane `lane`'s part of Σ_k x[k] · a[k] over one row, in the fixed order described in the header (the
 * caller adds the 32 parts with a xor butterfly). VEC selects 16-byte loads (x and a 16-byte aligned) or
 * scalar loads; the fma sequence is the same. */
template <bool VEC, typename TX, typename TW>
__device__ __forceinline__ float bgmv_row_dot(const TX* __restrict__ x, const TW* __restrict__ a, int d_in,
                                              int lane) {
  constexpr int V = 16 / static_cast<int>(sizeof(TW));
  constexpr int U = kShrinkUnroll;
  const int nfull = d_in / V;
  float acc = 0.0f;
  int c = lane;
  if (VEC) {
    /* U chunks per step, loads first (U · 16 B of A in flight per lane); the fma order is still c, c+32, … */
    for (; c < nfull; c += 32 * U) {
      BgmvPack<TW, V> pa[U];
      BgmvPack<TX, V> px[U];
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (c + 32 * i < nfull) {
          const int64_t k = static_cast<int64_t>(c + 32 * i) * V;
          pa[i] = bgmv_load_pack<TW, V>(a + k);
          px[i] = bgmv_load_pack<TX, V>(x + k);
        }
      }
#pragma unroll
      for (int i = 0; i < U; ++i) {
        if (c + 32 * i < nfull) {
#pragma unroll
          for (int e = 0; e < V; ++e) acc = fmaf(to_f32(px[i].v[e]), to_f32(pa[i].v[e]), acc);
        }
      }
    }
  } else {
    for (; c < nfull; c += 32) {
      const int64_t k = static_cast<int64_t>(c) * V;
#pragma unroll
      for (int e = 0; e < V; ++e) acc = fmaf(to_f32(x[k + e]), to_f32(a[k + e]), acc);
    }
  }
  if (lane < d_in - nfull * V) { /* the tail: fewer than V elements, one per lane */
    const int64_t k = static_cast<int64_t>(nfull) * V + lane;
    acc = fmaf(to_f32(x[k]), to_f32(a[k]), acc);
  }
  return acc;
}

template <typename TX, typename TW>
__global__ void __launch_bounds__(kShrinkThreads)
    bgmv_shrink_kernel(const TX* __restrict__ x, float* __restrict__ u, const LkAdapterEntry* __restrict__ table,
                       const int32_t* __restrict__ token_adapter, uint32_t* error_word, int64_t ld_x, int tokens,
                       int d_in, int n_adapters, int n_slices, int r_cap, int groups) {
  const int64_t t = blockIdx.x;
  const int s = static_cast<int>(blockIdx.y) % n_slices;
  const int g = static_cast<int>(blockIdx.y) / n_slices;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int id = token_adapter[t];
  if (id < 0 || id >= n_adapters) { /* −1: no adapter; anything else out of range: flagged */
    if (id != -1 && blockIdx.y == 0 && threadIdx.x == 0) bgmv_report(error_word, LK_FAULT_ADAPTER_ID);
    return;
  }
  const LkAdapterEntry* e = table + static_cast<int64_t>(id) * n_slices + s;
  const int rank = e->rank;
  if (!bgmv_entry_ok(rank, e, r_cap)) { /* skipped in this slice */
    if (g == 0 && threadIdx.x == 0) bgmv_report(error_word, LK_FAULT_TABLE_ENTRY);
    return;
  }
  const int first = g * kShrinkWarps + warp;
  if (first >= rank) return; /* no barriers below: whole warps leave */
  const TW* a = static_cast<const TW*>(e->a);
  const int64_t lda = e->lda;
  const TX* x_row = x + t * ld_x;
  float* u_row = u + (static_cast<int64_t>(s) * tokens + t) * r_cap;
  /* Uniform per block: the A row bases and this token's x row are all 16-byte aligned. */
  const bool vec = bgmv_aligned16(a) && (lda * static_cast<int64_t>(sizeof(TW))) % 16 == 0 && bgmv_aligned16(x_row);
  const int stride = groups * kShrinkWarps;
  for (int j = first; j < rank; j += stride) {
    const TW* a_row = a + static_cast<int64_t>(j) * lda;
    float acc = vec ? bgmv_row_dot<true>(x_row, a_row, d_in, lane) : bgmv_row_dot<false>(x_row, a_row, d_in, lane);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) u_row[j] = acc;
  }
}

template <typename TX, typename TW>
int launch_bgmv_shrink(const LkBgmvShrinkParams& p, int groups, void* stream) {
  const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(p.n_slices * groups));
  return launch(bgmv_shrink_kernel<TX, TW>, grid, dim3(kShrinkThreads), 0, stream, static_cast<const TX*>(p.x), p.u,
                p.table, p.token_adapter, p.error_word, p.ld_x, p.tokens, p.d_in, p.n_adapters, p.n_slices, p.r_cap,
                groups);
}

/* ------------------------------------------------------------------------------------------------
 * expand */

/* Host-computed slice geometry, passed by value; indexed only with compile-time indices (no local
 * memory copy of the parameter). chunk_start[s] = Σ_{s' < s} ⌈n_s' / kExpandCols⌉. */
struct BgmvExpandGeom {
  int32_t n[LK_MAX_SLICES];
  int32_t off[LK_MAX_SLICES];
  int32_t chunk_start[LK_MAX_SLICES + 1];
};

template <typename TO, typename TW>
__global__ void __launch_bounds__(kExpandThreads)
    bgmv_expand_kernel(const float* __restrict__ u, TO* __restrict__ out, const LkAdapterEntry* __restrict__ table,
                       const int32_t* __restrict__ token_adapter, uint32_t* error_word, int64_t ld_out,
                       BgmvExpandGeom geom, int total_chunks, int tokens, int n_adapters, int n_slices, int r_cap,
                       int mode) {
  LK_DYNAMIC_SMEM(float, u_s);
  constexpr int V = 16 / static_cast<int>(sizeof(TW));
  constexpr int G = kExpandGroup;
  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const int id = token_adapter[t];
  if (id < 0 || id >= n_adapters) { /* −1: no adapter; anything else out of range: flagged */
    if (id != -1 && blockIdx.y == 0 && tid == 0) bgmv_report(error_word, LK_FAULT_ADAPTER_ID);
    return;
  }
  const bool add = mode == LK_EXPAND_ADD;
  for (int chunk = static_cast<int>(blockIdx.y); chunk < total_chunks; chunk += static_cast<int>(gridDim.y)) {
    /* The slice holding this chunk: the last s < n_slices with chunk_start[s] <= chunk. */
    int s = 0, n = 0, off = 0, cs = 0;
#pragma unroll
    for (int i = 0; i < LK_MAX_SLICES; ++i) {
      if (i < n_slices && chunk >= geom.chunk_start[i]) {
        s = i;
        n = geom.n[i];
        off = geom.off[i];
        cs = geom.chunk_start[i];
      }
    }
    const LkAdapterEntry* e = table + static_cast<int64_t>(id) * n_slices + s;
    const int rank = e->rank;
    if (!bgmv_entry_ok(rank, e, r_cap)) { /* skipped in this slice; uniform per block */
      if (chunk == cs && tid == 0) bgmv_report(error_word, LK_FAULT_TABLE_ENTRY);
      continue;
    }
    const int col0 = (chunk - cs) * kExpandCols;
    const int cols = n - col0; /* columns of this chunk: min(cols, kExpandCols) */
    TO* out_chunk = out + t * ld_out + off + col0;
    if (rank == 0) {
      if (!add && tid < cols) out_chunk[tid] = from_f32<TO>(0.0f);
      continue; /* uniform per block */
    }
    const float scale = e->scale;
    const TW* b = static_cast<const TW*>(e->b);
    const int64_t ldb = e->ldb;
    const TW* b_chunk = b + static_cast<int64_t>(col0) * ldb;
    const float* u_row = u + (static_cast<int64_t>(s) * tokens + t) * r_cap;
    __syncthreads(); /* the previous chunk's readers of u_s are done */
    for (int j = tid; j < rank; j += kExpandThreads) u_s[j] = u_row[j];
    __syncthreads();

    const int nch = (rank + V - 1) / V;
    int L = 1;
    while (L < nch && L < 32) L *= 2;
    const int teams = kExpandThreads / L;
    const int team = tid / L;
    const int q = tid % L;
    const bool vec = bgmv_aligned16(b) && (ldb * static_cast<int64_t>(sizeof(TW))) % 16 == 0;
    /* This team's rows (chunk columns): team + r · teams, r in [0, L): together the block's kExpandCols. */
    for (int r0 = 0; r0 < L; r0 += G) {
      int col[G];
      bool valid[G];
      const TW* b_row[G];
      float acc[G], prev[G];
#pragma unroll
      for (int p = 0; p < G; ++p) {
        col[p] = team + (r0 + p) * teams;
        valid[p] = r0 + p < L && col[p] < cols;
        b_row[p] = b_chunk + static_cast<int64_t>(valid[p] ? col[p] : 0) * ldb;
        acc[p] = 0.0f;
        prev[p] = (add && q == 0 && valid[p]) ? to_f32(out_chunk[col[p]]) : 0.0f;
      }
      /* Rows past the slice's end (col >= cols) read the chunk's row 0 (which exists) and are never
       * written: the loads stay unconditional within the block-uniform r0 + p < L. */
      for (int c = q; c < nch; c += L) {
        const int j0 = c * V;
        if (vec && j0 + V <= rank) {
          const BgmvPack<float, V> uu = bgmv_load_pack<float, V>(u_s + j0);
          BgmvPack<TW, V> bb[G];
#pragma unroll
          for (int p = 0; p < G; ++p) {
            if (r0 + p < L) bb[p] = bgmv_load_pack<TW, V>(b_row[p] + j0);
          }
#pragma unroll
          for (int p = 0; p < G; ++p) {
            if (r0 + p < L) {
#pragma unroll
              for (int i = 0; i < V; ++i) acc[p] = fmaf(uu.v[i], to_f32(bb[p].v[i]), acc[p]);
            }
          }
        } else {
          const int j1 = j0 + V < rank ? j0 + V : rank;
#pragma unroll
          for (int p = 0; p < G; ++p) {
            if (r0 + p < L) {
              for (int j = j0; j < j1; ++j) acc[p] = fmaf(u_s[j], to_f32(b_row[p][j]), acc[p]);
            }
          }
        }
      }
#pragma unroll
      for (int p = 0; p < G; ++p) {
        if (r0 + p < L) { /* uniform per block: every lane of the warp takes part */
          for (int offset = L / 2; offset > 0; offset /= 2) acc[p] += __shfl_xor_sync(0xffffffffu, acc[p], offset);
          if (q == 0 && valid[p]) {
            out_chunk[col[p]] = from_f32<TO>(add ? fmaf(scale, acc[p], prev[p]) : scale * acc[p]);
          }
        }
      }
    }
  }
}

template <typename TO, typename TW>
int launch_bgmv_expand(const LkBgmvExpandParams& p, const BgmvExpandGeom& geom, int total_chunks, void* stream) {
  const unsigned gy = static_cast<unsigned>(total_chunks < 65535 ? total_chunks : 65535);
  const size_t smem = static_cast<size_t>(p.r_cap > 4 ? p.r_cap : 4) * sizeof(float);
  return launch(bgmv_expand_kernel<TO, TW>, dim3(static_cast<unsigned>(p.tokens), gy), dim3(kExpandThreads), smem,
                stream, p.u, static_cast<TO*>(p.out), p.table, p.token_adapter, p.error_word, p.ld_out, geom,
                total_chunks, p.tokens, p.n_adapters, p.n_slices, p.r_cap, p.mode);
}

/* x/out dtype must be the weights' dtype or f32; weights f32/f16/bf16. */
inline bool bgmv_dtypes_ok(int act, int w) {
  return (w == LK_F32 || w == LK_F16 || w == LK_BF16) && (act == w || act == LK_F32);
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(bgmv_shrink)(const LkBgmvShrinkParams* p, void* stream) {
  using namespace lk::LK_NS;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: params is null");
  if (p->tokens < 0 || p->d_in < 0 || p->n_adapters < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: negative size (tokens %d, d_in %d, n_adapters %d)",
                     p->tokens, p->d_in, p->n_adapters);
  }
  if (p->n_slices < 1 || p->n_slices > LK_MAX_SLICES) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: n_slices %d outside 1..%d", p->n_slices, LK_MAX_SLICES);
  }
  if (p->r_cap < 0 || p->r_cap > kBgmvMaxRCap) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: r_cap %d outside 0..%d", p->r_cap, kBgmvMaxRCap);
  }
  if (p->ld_x < p->d_in) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: ld_x %lld < d_in %d", static_cast<long long>(p->ld_x),
                     p->d_in);
  }
  if (!bgmv_dtypes_ok(p->x_dtype, p->w_dtype)) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE,
                     "bgmv_shrink: x_dtype %d with w_dtype %d (weights f32/f16/bf16, x the weights' dtype or f32; "
                     "0 = f32, 1 = f16, 2 = bf16)",
                     p->x_dtype, p->w_dtype);
  }
  if (p->tokens == 0) return 0;
  if (p->token_adapter == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: token_adapter is null");
  if (p->d_in > 0 && p->x == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: x is null");
  if (p->r_cap > 0 && p->u == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: u is null");
  if (p->n_adapters > 0 && p->table == nullptr) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_shrink: table is null (n_adapters %d)", p->n_adapters);
  }
  /* Row groups per (token, slice): enough blocks to fill the GPU at small batches, few empty ones. */
  const int64_t max_groups = (static_cast<int64_t>(p->r_cap) + kShrinkWarps - 1) / kShrinkWarps;
  const int64_t per_group = static_cast<int64_t>(p->tokens) * p->n_slices;
  int64_t groups = (kShrinkTargetBlocks + per_group - 1) / per_group;
  if (groups > max_groups) groups = max_groups;
  if (groups < 1) groups = 1;
  const int gr = static_cast<int>(groups);
  switch (p->w_dtype) {
    case LK_F32:
      return launch_bgmv_shrink<float, float>(*p, gr, stream);
    case LK_F16:
      if (p->x_dtype == LK_F16) return launch_bgmv_shrink<__half, __half>(*p, gr, stream);
      return launch_bgmv_shrink<float, __half>(*p, gr, stream);
    default: /* LK_BF16 */
      if (p->x_dtype == LK_BF16) return launch_bgmv_shrink<__nv_bfloat16, __nv_bfloat16>(*p, gr, stream);
      return launch_bgmv_shrink<float, __nv_bfloat16>(*p, gr, stream);
  }
}

extern "C" int LK_SYMBOL(bgmv_expand)(const LkBgmvExpandParams* p, void* stream) {
  using namespace lk::LK_NS;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: params is null");
  if (p->tokens < 0 || p->n_adapters < 0 || p->ld_out < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: negative size (tokens %d, n_adapters %d, ld_out %lld)",
                     p->tokens, p->n_adapters, static_cast<long long>(p->ld_out));
  }
  if (p->n_slices < 1 || p->n_slices > LK_MAX_SLICES) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: n_slices %d outside 1..%d", p->n_slices, LK_MAX_SLICES);
  }
  if (p->r_cap < 0 || p->r_cap > kBgmvMaxRCap) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: r_cap %d outside 0..%d", p->r_cap, kBgmvMaxRCap);
  }
  if (p->mode != LK_EXPAND_ADD && p->mode != LK_EXPAND_OVERWRITE) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: mode %d is neither LK_EXPAND_ADD (0) nor OVERWRITE (1)",
                     p->mode);
  }
  BgmvExpandGeom geom = {};
  int64_t total_chunks = 0;
  for (int s = 0; s < p->n_slices; ++s) {
    const LkSlice sl = p->slices[s];
    if (sl.n < 0 || sl.offset < 0 || static_cast<int64_t>(sl.offset) + sl.n > p->ld_out) {
      return set_error(LK_ERR_INVALID_ARGUMENT,
                       "bgmv_expand: slices[%d] = {n %d, offset %d} outside [0, ld_out %lld) (need n >= 0, "
                       "offset >= 0, offset + n <= ld_out)",
                       s, sl.n, sl.offset, static_cast<long long>(p->ld_out));
    }
    /* Overlapping slices would have two threads own one output element (a race in add mode). */
    for (int s2 = 0; s2 < s; ++s2) {
      const LkSlice o = p->slices[s2];
      if (sl.n > 0 && o.n > 0 && sl.offset < static_cast<int64_t>(o.offset) + o.n &&
          o.offset < static_cast<int64_t>(sl.offset) + sl.n) {
        return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: slices[%d] {n %d, offset %d} overlaps slices[%d] "
                         "{n %d, offset %d}", s, sl.n, sl.offset, s2, o.n, o.offset);
      }
    }
    geom.n[s] = sl.n;
    geom.off[s] = sl.offset;
    geom.chunk_start[s] = static_cast<int32_t>(total_chunks);
    total_chunks += (static_cast<int64_t>(sl.n) + kExpandCols - 1) / kExpandCols;
  }
  for (int s = p->n_slices; s <= LK_MAX_SLICES; ++s) geom.chunk_start[s] = static_cast<int32_t>(total_chunks);
  if (!bgmv_dtypes_ok(p->out_dtype, p->w_dtype)) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE,
                     "bgmv_expand: out_dtype %d with w_dtype %d (weights f32/f16/bf16, out the weights' dtype or "
                     "f32; 0 = f32, 1 = f16, 2 = bf16)",
                     p->out_dtype, p->w_dtype);
  }
  if (p->tokens == 0 || total_chunks == 0) return 0; /* nothing to write */
  if (p->token_adapter == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: token_adapter is null");
  if (p->out == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: out is null");
  if (p->r_cap > 0 && p->u == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: u is null");
  if (p->n_adapters > 0 && p->table == nullptr) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "bgmv_expand: table is null (n_adapters %d)", p->n_adapters);
  }
  const int tc = static_cast<int>(total_chunks); /* ≤ 8 · ⌈(2^31 − 1) / 128⌉ */
  switch (p->w_dtype) {
    case LK_F32:
      return launch_bgmv_expand<float, float>(*p, geom, tc, stream);
    case LK_F16:
      if (p->out_dtype == LK_F16) return launch_bgmv_expand<__half, __half>(*p, geom, tc, stream);
      return launch_bgmv_expand<float, __half>(*p, geom, tc, stream);
    default: /* LK_BF16 */
      if (p->out_dtype == LK_BF16) return launch_bgmv_expand<__nv_bfloat16, __nv_bfloat16>(*p, geom, tc, stream);
      return launch_bgmv_expand<float, __nv_bfloat16>(*p, geom, tc, stream);
  }
}
