/*
 * merge.cu — in-place merge / unmerge of scale·B·A into W (DESIGN.md §2 "Merge"; C ABI and record
 * format in lora_kernels.h, section "In-place merge / unmerge").
 *
 * Arithmetic (identical on cpu, emu and cuda, so all three produce the same bits): for W element
 * (i, j): acc = 0; for r in 0..rank: acc = fmaf(B[i, r], A[r, j], acc); then
 * W = round(fmaf(±scale, acc, W)) with one rounding to W's dtype (NaN → canonical NaN). No other
 * float op touches the value (no contraction can change it: every multiply-add is an explicit fmaf).
 *
 * Layout: the kernels work on the *stored* matrix, rows × cols with row stride ld_w: [d_out, d_in]
 * (row p = i, col q = j), or with fan_in_fan_out [d_in, d_out] (row p = j, col q = i). The delta of
 * stored element (p, q) is Σ_r R[p, r] · C[r, q] with a "row operand" R and a "column operand" C
 * given by pointer + two strides each: R = B, C = A normally; R = Aᵀ, C = Bᵀ (strided views, no copy)
 * with fan_in_fan_out. fmaf(x, y, acc) = fmaf(y, x, acc) exactly, so both layouts run the same ops.
 *
 * Work split: a 256-thread block owns a tile of 16 stored rows × 32·VEC columns (VEC = 16 bytes of W:
 * 8 f16/bf16 or 4 f32 elements); warp w owns rows 2w, 2w + 1 of the tile, lane l owns VEC contiguous
 * columns of each, loaded and stored with one 16-byte vector access when W and ld_w are 16-byte
 * aligned (else element by element). The row operand's 16 × 16 and the column operand's 16 × 32·VEC
 * chunk of the rank are staged through shared memory (any rank: a loop over chunks of 16, each
 * element's FMA chain still runs in increasing r). Grid: one block per tile, on x (≤ 2^31 − 1).
 *
 * Napkin math (H200, 4.8 TB/s): 4096 × 4096 f16 W = 32 MiB read + 32 MiB written ≈ 14 µs; A and B
 * (rank 16: 256 KiB) come from L2. FMAs: rank per element = 268 M at rank 16 (≈ 4 µs of the SMs' f32
 * rate, hidden under the memory time with the W loads issued before the rank loop), but at rank 256
 * the 4.3 G FMAs (≈ 70 µs) dominate: there merge is compute-bound. Tensor cores cannot be used: their
 * accumulation order is not the contract's fmaf chain. Each W element is read once and written once
 * in the default mode; safe and exact merges read W twice (check pass, then write pass).
 *
 * Safe / exact merge = three launches, graph-safe, no host sync:
 *  1. check: computes every would-be result (and, exact, the would-be unmerge u and its correction
 *     code); per (stored row, column tile) one warp writes its exception count | non-finite << 31 into
 *     the workspace (plain stores: the workspace needs no zeroing);
 *  2. scan (one block): exclusive prefix of those counts in (row, tile) order = increasing flat index;
 *     decides the gate (exceptions > capacity, or safe and non-finite → closed), writes the record
 *     header and ORs status bits;
 *  3. write: if the gate is open, recomputes, writes W, the 2-bit codes and the exceptions at
 *     prefix + the lane's exclusive warp prefix: exceptions land ordered by index, deterministically.
 * Exact unmerge = two launches: the element pass (codes 0–2 decoded, code 3 left merged) and a scatter
 * of the exception list (grid-stride over the capacity, host-known).
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN
namespace merge_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 2;
constexpr int kTileRows = kWarps * kRowsPerWarp;  // 16
constexpr int kRankChunk = 16;
static_assert(kTileRows * kRankChunk == kThreads, "one row-operand element per thread per chunk");
constexpr int kScanThreads = 1024;
constexpr int kScatterThreads = 256;
constexpr int64_t kWorkspaceHeader = 16;

enum { kDirect = 0, kCheck = 1, kWrite = 2, kUnmergeExact = 3 };

template <class T>
constexpr int kVecOf = static_cast<int>(16 / sizeof(T));

/* Bit patterns of W's element type (held in uint32). */
template <class T>
struct Bits;
template <>
struct Bits<float> {
  static constexpr uint32_t kSign = 0x80000000u;
  static constexpr uint32_t kExp = 0x7f800000u;
  __device__ __forceinline__ static uint32_t get(float f) {
    union {
      float f;
      uint32_t u;
    } x;
    x.f = f;
    return x.u;
  }
  __device__ __forceinline__ static float make(uint32_t u) {
    union {
      float f;
      uint32_t u;
    } x;
    x.u = u;
    return x.f;
  }
  /* Round f32 → this type (identity), canonical NaN. */
  __device__ __forceinline__ static uint32_t round(float v) { return v != v ? 0x7fffffffu : get(v); }
};
template <>
struct Bits<__half> {
  static constexpr uint32_t kSign = 0x8000u;
  static constexpr uint32_t kExp = 0x7c00u;
  __device__ __forceinline__ static uint32_t get(__half h) { return __half_as_ushort(h); }
  __device__ __forceinline__ static __half make(uint32_t u) {
    return __ushort_as_half(static_cast<unsigned short>(u));
  }
  /* __float2half: nearest-even, NaN → 0x7fff on both backends. */
  __device__ __forceinline__ static uint32_t round(float v) { return __half_as_ushort(__float2half(v)); }
};
template <>
struct Bits<__nv_bfloat16> {
  static constexpr uint32_t kSign = 0x8000u;
  static constexpr uint32_t kExp = 0x7f80u;
  __device__ __forceinline__ static uint32_t get(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }
  __device__ __forceinline__ static __nv_bfloat16 make(uint32_t u) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(u));
  }
  __device__ __forceinline__ static uint32_t round(float v) { return __bfloat16_as_ushort(__float2bfloat16(v)); }
};

template <class T>
__device__ __forceinline__ float bits_f32(uint32_t b) {
  return to_f32(Bits<T>::make(b));
}

/* Order-preserving integer of a bit pattern: mag for sign 0, −mag − 1 for sign 1 (−0 just below +0). */
template <class T>
__device__ __forceinline__ int64_t order_key(uint32_t b) {
  const uint32_t mag = b & ~Bits<T>::kSign;
  return (b & Bits<T>::kSign) ? -static_cast<int64_t>(mag) - 1 : static_cast<int64_t>(mag);
}
template <class T>
__device__ __forceinline__ uint32_t from_key(int64_t k) {
  return k >= 0 ? static_cast<uint32_t>(k) : (Bits<T>::kSign | static_cast<uint32_t>(-(k + 1)));
}
/* Correction code restoring w from u: 0 = u, 1 = one step up, 2 = one step down, 3 = exception. */
template <class T>
__device__ __forceinline__ uint32_t correction_code(uint32_t w, uint32_t u) {
  if (w == u) return 0u;
  const int64_t k = order_key<T>(u);
  if (from_key<T>(k + 1) == w) return 1u;
  if (from_key<T>(k - 1) == w) return 2u;
  return 3u;
}
template <class T>
__device__ __forceinline__ uint32_t apply_code(uint32_t u, uint32_t code) {
  if (code == 0u) return u;
  return from_key<T>(order_key<T>(u) + (code == 1u ? 1 : -1));
}

struct __align__(16) Vec16 {
  uint32_t x[4];
};

struct Args {
  void* w;
  const void* rowop;
  const void* colop;
  uint32_t* status;
  const uint32_t* gate;
  uint32_t* counts;
  const uint64_t* offsets;
  uint32_t* codes;
  uint64_t* exc_index;
  uint32_t* exc_bits;
  const uint64_t* header;
  int64_t ld_w;
  int64_t rs_p, rs_r;  // row operand R[p, r] at rowop[p·rs_p + r·rs_r]
  int64_t cs_r, cs_q;  // column operand C[r, q] at colop[r·cs_r + q·cs_q]
  int64_t rows, cols;
  int64_t capacity;
  int64_t words_per_row;
  int64_t n_tile_cols;
  int rank;
  float s_fwd;  // +scale (merge) or −scale (unmerge)
  int vec_ok;   // W and ld_w 16-byte aligned
};

/* Element e of a 16-byte vector of T (T's bits, zero-extended). */
template <class T>
__device__ __forceinline__ uint32_t elem(const Vec16& v, int e) {
  return sizeof(T) == 4 ? v.x[e] : ((v.x[e / 2] >> (16 * (e & 1))) & 0xffffu);
}

/* W[p, qv .. qv + VEC) packed as a Vec16 (columns ≥ cols read as 0). */
template <class T>
__device__ __forceinline__ Vec16 load_w(const Args& g, int64_t p, int64_t qv) {
  constexpr int kVec = kVecOf<T>;
  const T* row = static_cast<const T*>(g.w) + p * g.ld_w;
  if (g.vec_ok && qv + kVec <= g.cols) return *reinterpret_cast<const Vec16*>(row + qv);
  Vec16 v;
#pragma unroll
  for (int i = 0; i < 4; ++i) v.x[i] = 0u;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const uint32_t b = qv + e < g.cols ? Bits<T>::get(row[qv + e]) : 0u;
    if (sizeof(T) == 4) {
      v.x[e] = b;
    } else {
      v.x[e / 2] |= b << (16 * (e & 1));
    }
  }
  return v;
}

template <class T>
__device__ __forceinline__ void store_w(const Args& g, int64_t p, int64_t qv, const uint32_t (&ob)[kVecOf<T>]) {
  constexpr int kVec = kVecOf<T>;
  T* row = static_cast<T*>(g.w) + p * g.ld_w;
  if (g.vec_ok && qv + kVec <= g.cols) {
    Vec16 v;
#pragma unroll
    for (int e = 0; e < 4; ++e) v.x[e] = sizeof(T) == 4 ? ob[e] : (ob[2 * e] | (ob[2 * e + 1] << 16));
    *reinterpret_cast<Vec16*>(row + qv) = v;
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (qv + e < g.cols) row[qv + e] = Bits<T>::make(ob[e]);
    }
  }
}

template <class TW, class TA, int kMode, bool kExact>
__global__ void __launch_bounds__(kThreads, 2) merge_kernel(Args g) {
  constexpr int kVec = kVecOf<TW>;
  constexpr int kTileCols = 32 * kVec;
  constexpr int kGroup = 16 / kVec;  // lanes sharing one 32-bit word of 2-bit codes
  __shared__ float rs[kTileRows][kRankChunk + 1];
  __shared__ __align__(16) float cs[kRankChunk][kTileCols];

  if (kMode == kWrite && *g.gate != 0u) return;  // the check pass closed the gate: write nothing
  if (kMode == kUnmergeExact && !(g.header[1] == 1u && g.header[0] <= static_cast<uint64_t>(g.capacity))) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && g.status != nullptr) atomicOr(g.status, LK_MERGE_STATUS_BAD_RECORD);
    return;
  }
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t tile = blockIdx.x;
  const int64_t tile_row = tile / g.n_tile_cols;
  const int64_t tile_col = tile % g.n_tile_cols;
  const int64_t p0 = tile_row * kTileRows;
  const int64_t qv = tile_col * kTileCols + lane * kVec;

  Vec16 wv[kRowsPerWarp];  // W, packed: loaded before the rank loop so the loads overlap it
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t p = p0 + warp * kRowsPerWarp + k;
    if (p < g.rows) {
      wv[k] = load_w<TW>(g, p, qv);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) wv[k].x[i] = 0u;
    }
  }

  float acc[kRowsPerWarp][kVec];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[k][e] = 0.0f;
  }
  const TA* rowop = static_cast<const TA*>(g.rowop);
  const TA* colop = static_cast<const TA*>(g.colop);
  for (int r0 = 0; r0 < g.rank; r0 += kRankChunk) {
    __syncthreads();  // the previous chunk is consumed
    {
      const int pp = static_cast<int>(threadIdx.x) / kRankChunk;
      const int rr = static_cast<int>(threadIdx.x) % kRankChunk;
      const int64_t p = p0 + pp;
      const int r = r0 + rr;
      rs[pp][rr] = (p < g.rows && r < g.rank) ? to_f32(rowop[p * g.rs_p + r * g.rs_r]) : 0.0f;
    }
    for (int idx = static_cast<int>(threadIdx.x); idx < kRankChunk * kTileCols; idx += kThreads) {
      const int rr = idx / kTileCols;
      const int qq = idx % kTileCols;
      const int64_t q = tile_col * kTileCols + qq;
      const int r = r0 + rr;
      cs[rr][qq] = (q < g.cols && r < g.rank) ? to_f32(colop[r * g.cs_r + q * g.cs_q]) : 0.0f;
    }
    __syncthreads();
    const int nr = g.rank - r0 < kRankChunk ? g.rank - r0 : kRankChunk;
    for (int rr = 0; rr < nr; ++rr) {
      float c[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) c[e] = cs[rr][lane * kVec + e];
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const float b = rs[warp * kRowsPerWarp + k][rr];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[k][e] = fmaf(b, c[e], acc[k][e]);
      }
    }
  }

#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t p = p0 + warp * kRowsPerWarp + k;
    if (p >= g.rows) continue;  // uniform across the warp: the shuffles below see full warps
    uint32_t ob[kVec];
    uint32_t code_word = 0u;  // this lane's codes at their bit positions in the row's code word
    int n_exc = 0;
    uint32_t nonfinite = 0u;
    if (kMode == kUnmergeExact) {
      const uint32_t word = qv < g.cols ? g.codes[p * g.words_per_row + qv / 16] : 0u;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int64_t q = qv + e;
        const uint32_t u = Bits<TW>::round(fmaf(g.s_fwd, acc[k][e], bits_f32<TW>(elem<TW>(wv[k], e))));
        const uint32_t code = (word >> (2 * (q % 16))) & 3u;
        ob[e] = code == 3u ? elem<TW>(wv[k], e) : apply_code<TW>(u, code);  // code 3: the scatter writes it
      }
      store_w<TW>(g, p, qv, ob);
      continue;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t q = qv + e;
      const uint32_t m = Bits<TW>::round(fmaf(g.s_fwd, acc[k][e], bits_f32<TW>(elem<TW>(wv[k], e))));
      ob[e] = m;
      if (q < g.cols) {
        nonfinite |= (m & Bits<TW>::kExp) == Bits<TW>::kExp ? 1u : 0u;
        if (kExact) {
          const uint32_t u = Bits<TW>::round(fmaf(-g.s_fwd, acc[k][e], bits_f32<TW>(m)));
          const uint32_t code = correction_code<TW>(elem<TW>(wv[k], e), u);
          code_word |= code << (2 * (q % 16));
          n_exc += code == 3u ? 1 : 0;
        }
      }
    }
    if (kMode == kDirect) {
      store_w<TW>(g, p, qv, ob);
      continue;
    }
    if (kMode == kCheck) {
      int total = n_exc;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);
      const int any_nonfinite = __any_sync(0xffffffffu, nonfinite != 0u);
      if (lane == 0) {
        g.counts[p * g.n_tile_cols + tile_col] =
            static_cast<uint32_t>(total) | (any_nonfinite ? 0x80000000u : 0u);
      }
      continue;
    }
    // kWrite (gate open).
    store_w<TW>(g, p, qv, ob);
    if (kExact) {
      uint32_t word = code_word;
#pragma unroll
      for (int off = 1; off < kGroup; off *= 2) word |= __shfl_xor_sync(0xffffffffu, word, off);
      if (lane % kGroup == 0 && qv < g.cols) g.codes[p * g.words_per_row + qv / 16] = word;
      int incl = n_exc;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const int y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      uint64_t slot = g.offsets[p * g.n_tile_cols + tile_col] + static_cast<uint64_t>(incl - n_exc);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int64_t q = qv + e;
        if (q < g.cols && ((code_word >> (2 * (q % 16))) & 3u) == 3u) {
          g.exc_index[slot] = static_cast<uint64_t>(p * g.cols + q);
          g.exc_bits[slot] = elem<TW>(wv[k], e);
          ++slot;
        }
      }
    }
  }
}

/* One block: exclusive prefix of the per-(row, tile) exception counts (bit 31 = non-finite), the
 * gate, the record header and the status bits. */
__global__ void __launch_bounds__(kScanThreads)
    merge_scan_kernel(const uint32_t* counts, uint64_t* offsets, int64_t n, uint32_t* gate, uint64_t* header,
                      uint32_t* status, int64_t capacity, int safe, int exact) {
  __shared__ uint64_t warp_total[kScanThreads / 32];
  __shared__ unsigned any_nonfinite;
  const int t = static_cast<int>(threadIdx.x);
  const int warp = t / 32;
  const int lane = t % 32;
  if (t == 0) any_nonfinite = 0u;
  __syncthreads();
  const int64_t chunk = (n + kScanThreads - 1) / kScanThreads;
  const int64_t begin = t * chunk < n ? t * chunk : n;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  uint64_t sum = 0;
  unsigned nonfinite = 0u;
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t c = counts[i];
    sum += c & 0x7fffffffu;
    nonfinite |= c >> 31;
  }
  if (nonfinite) atomicOr(&any_nonfinite, 1u);
  uint64_t incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const uint64_t y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    uint64_t w = warp_total[lane];
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const uint64_t y = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += y;
    }
    warp_total[lane] = w;
  }
  __syncthreads();
  uint64_t base = incl - sum + (warp > 0 ? warp_total[warp - 1] : 0u);
  for (int64_t i = begin; i < end; ++i) {
    offsets[i] = base;
    base += counts[i] & 0x7fffffffu;
  }
  if (t == kScanThreads - 1) {
    const uint64_t total = warp_total[kScanThreads / 32 - 1];
    const bool overflow = exact && total > static_cast<uint64_t>(capacity);
    const bool refused_nonfinite = safe && any_nonfinite != 0u;
    const bool closed = overflow || refused_nonfinite;
    *gate = closed ? 1u : 0u;
    if (exact) {
      header[0] = total;
      header[1] = closed ? 0u : 1u;
    }
    if (status != nullptr) {
      if (overflow) atomicOr(status, LK_MERGE_STATUS_OVERFLOW);
      if (refused_nonfinite) atomicOr(status, LK_MERGE_STATUS_NONFINITE);
    }
  }
}

/* Exact unmerge, second launch: the exceptions' original bits. */
template <class TW>
__global__ void __launch_bounds__(kScatterThreads)
    merge_scatter_kernel(void* w, const uint64_t* exc_index, const uint32_t* exc_bits, const uint64_t* header,
                         uint32_t* status, int64_t capacity, int64_t rows, int64_t cols, int64_t ld_w) {
  if (!(header[1] == 1u && header[0] <= static_cast<uint64_t>(capacity))) return;  // reported by the first launch
  const uint64_t n = header[0];
  const uint64_t elements = static_cast<uint64_t>(rows) * static_cast<uint64_t>(cols);
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kScatterThreads;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * kScatterThreads + threadIdx.x; i < n; i += stride) {
    const uint64_t e = exc_index[i];
    if (e >= elements) {
      if (status != nullptr) atomicOr(status, LK_MERGE_STATUS_BAD_RECORD);
      continue;
    }
    const int64_t p = static_cast<int64_t>(e / static_cast<uint64_t>(cols));
    const int64_t q = static_cast<int64_t>(e % static_cast<uint64_t>(cols));
    static_cast<TW*>(w)[p * ld_w + q] = Bits<TW>::make(exc_bits[i]);
  }
}

struct Geometry {
  int64_t rows, cols, n_tile_cols, n_tiles, words_per_row;
  int64_t counts_off, offsets_off, workspace_bytes;
};

inline int vec_for_dtype(int dtype) { return dtype == LK_F32 ? 4 : 8; }

inline Geometry geometry(const LkMergeParams& p) {
  Geometry g;
  g.rows = p.fan_in_fan_out ? p.d_in : p.d_out;
  g.cols = p.fan_in_fan_out ? p.d_out : p.d_in;
  const int64_t tile_cols = 32 * vec_for_dtype(p.w_dtype);
  g.n_tile_cols = (g.cols + tile_cols - 1) / tile_cols;
  g.n_tiles = ((g.rows + kTileRows - 1) / kTileRows) * g.n_tile_cols;
  g.words_per_row = (g.cols + 15) / 16;
  const int64_t s = g.rows * g.n_tile_cols;
  g.counts_off = kWorkspaceHeader;
  g.offsets_off = (g.counts_off + 4 * s + 7) / 8 * 8;
  g.workspace_bytes = g.offsets_off + 8 * s;
  return g;
}

inline bool needs_workspace(const LkMergeParams& p) {
  return p.direction == LK_MERGE_MERGE ? p.flags != 0 : p.flags == LK_MERGE_SAFE;
}

template <class TW, class TA>
int run(const LkMergeParams& p, const Geometry& geo, void* stream) {
  Args g;
  g.w = p.w;
  const bool fifo = p.fan_in_fan_out != 0;
  g.rowop = fifo ? p.a : p.b;
  g.colop = fifo ? p.b : p.a;
  g.rs_p = fifo ? 1 : p.ldb;
  g.rs_r = fifo ? p.lda : 1;
  g.cs_r = fifo ? 1 : p.lda;
  g.cs_q = fifo ? p.ldb : 1;
  g.status = p.status;
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  g.gate = ws != nullptr ? reinterpret_cast<const uint32_t*>(ws) : nullptr;
  g.counts = ws != nullptr ? reinterpret_cast<uint32_t*>(ws + geo.counts_off) : nullptr;
  g.offsets = ws != nullptr ? reinterpret_cast<const uint64_t*>(ws + geo.offsets_off) : nullptr;
  g.codes = p.codes;
  g.exc_index = p.exc_index;
  g.exc_bits = p.exc_bits;
  g.header = p.record_header;
  g.ld_w = p.ld_w;
  g.rows = geo.rows;
  g.cols = geo.cols;
  g.capacity = p.exc_capacity;
  g.words_per_row = geo.words_per_row;
  g.n_tile_cols = geo.n_tile_cols > 0 ? geo.n_tile_cols : 1;
  g.rank = p.rank;
  g.s_fwd = p.direction == LK_MERGE_MERGE ? p.scale : -p.scale;
  g.vec_ok = (reinterpret_cast<uintptr_t>(p.w) % 16 == 0 && (p.ld_w * static_cast<int64_t>(sizeof(TW))) % 16 == 0)
                 ? 1
                 : 0;
  const dim3 grid(static_cast<unsigned>(geo.n_tiles));
  const dim3 block(kThreads);
  const bool exact = (p.flags & LK_MERGE_EXACT) != 0;
  const bool safe = (p.flags & LK_MERGE_SAFE) != 0;
  int rc = 0;
  if (p.direction == LK_MERGE_UNMERGE && exact) {
    if (geo.n_tiles > 0) rc = launch(merge_kernel<TW, TA, kUnmergeExact, false>, grid, block, 0, stream, g);
    if (rc == 0 && p.exc_capacity > 0) {
      int64_t blocks = (p.exc_capacity + kScatterThreads - 1) / kScatterThreads;
      if (blocks > 4096) blocks = 4096;
      rc = launch(merge_scatter_kernel<TW>, dim3(static_cast<unsigned>(blocks)), dim3(kScatterThreads), 0, stream,
                  p.w, static_cast<const uint64_t*>(p.exc_index), static_cast<const uint32_t*>(p.exc_bits),
                  static_cast<const uint64_t*>(p.record_header), p.status, p.exc_capacity, geo.rows, geo.cols,
                  p.ld_w);
    }
    return rc;
  }
  if (!exact && !safe) {
    return geo.n_tiles > 0 ? launch(merge_kernel<TW, TA, kDirect, false>, grid, block, 0, stream, g) : 0;
  }
  // Safe and/or exact: check → scan → write.
  if (geo.n_tiles > 0) {
    rc = exact ? launch(merge_kernel<TW, TA, kCheck, true>, grid, block, 0, stream, g)
               : launch(merge_kernel<TW, TA, kCheck, false>, grid, block, 0, stream, g);
    if (rc != 0) return rc;
  }
  rc = launch(merge_scan_kernel, dim3(1), dim3(kScanThreads), 0, stream, static_cast<const uint32_t*>(g.counts),
              reinterpret_cast<uint64_t*>(ws + geo.offsets_off), geo.rows * geo.n_tile_cols,
              reinterpret_cast<uint32_t*>(ws), p.record_header, p.status, p.exc_capacity, safe ? 1 : 0,
              exact ? 1 : 0);
  if (rc != 0 || geo.n_tiles == 0) return rc;
  return exact ? launch(merge_kernel<TW, TA, kWrite, true>, grid, block, 0, stream, g)
               : launch(merge_kernel<TW, TA, kWrite, false>, grid, block, 0, stream, g);
}

}  // namespace merge_detail
LK_NAMESPACE_END

extern "C" size_t LK_SYMBOL(merge_workspace_size)(const LkMergeParams* p) {
  using namespace lk::LK_NS::merge_detail;
  if (p == nullptr || p->d_out < 0 || p->d_in < 0 || !needs_workspace(*p)) return 0;
  return static_cast<size_t>(geometry(*p).workspace_bytes);
}

extern "C" int LK_SYMBOL(merge_apply)(const LkMergeParams* p, void* stream) {
  using namespace lk::LK_NS;
  using namespace lk::LK_NS::merge_detail;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: params is null");
  if (p->d_out < 0 || p->d_in < 0 || p->rank < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: negative size (d_out %d, d_in %d, rank %d)", p->d_out,
                     p->d_in, p->rank);
  }
  if (p->direction != LK_MERGE_MERGE && p->direction != LK_MERGE_UNMERGE) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: direction %d (0 = merge, 1 = unmerge)", p->direction);
  }
  if (p->fan_in_fan_out != 0 && p->fan_in_fan_out != 1) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: fan_in_fan_out %d (0 or 1)", p->fan_in_fan_out);
  }
  if ((p->flags & ~(LK_MERGE_SAFE | LK_MERGE_EXACT)) != 0 ||
      (p->direction == LK_MERGE_UNMERGE && p->flags == (LK_MERGE_SAFE | LK_MERGE_EXACT))) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "merge_apply: flags %d (LK_MERGE_SAFE | LK_MERGE_EXACT; an exact unmerge takes no SAFE)", p->flags);
  }
  const float z = p->scale - p->scale;
  if (!(z == 0.0f)) return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: scale %g is not finite", p->scale);
  const int64_t cols = p->fan_in_fan_out ? p->d_out : p->d_in;
  if (p->ld_w < cols || p->lda < p->d_in || p->ldb < p->rank) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "merge_apply: leading dimension too small (ld_w %lld >= %lld, lda %lld >= d_in %d, ldb %lld >= "
                     "rank %d)",
                     static_cast<long long>(p->ld_w), static_cast<long long>(cols), static_cast<long long>(p->lda),
                     p->d_in, static_cast<long long>(p->ldb), p->rank);
  }
  if (p->exc_capacity < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: exc_capacity %lld < 0",
                     static_cast<long long>(p->exc_capacity));
  }
  const bool tw_ok = p->w_dtype == LK_F32 || p->w_dtype == LK_F16 || p->w_dtype == LK_BF16;
  if (!tw_ok || (p->ab_dtype != p->w_dtype && p->ab_dtype != LK_F32)) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE,
                     "merge_apply: W dtype %d with A/B dtype %d (W: f32, f16 or bf16; A/B: W's dtype or f32; "
                     "0 = f32, 1 = f16, 2 = bf16)",
                     p->w_dtype, p->ab_dtype);
  }
  const Geometry geo = geometry(*p);
  if (geo.n_tiles > 0x7fffffffLL) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: %lld tiles exceed the grid limit 2^31 - 1",
                     static_cast<long long>(geo.n_tiles));
  }
  const bool exact = (p->flags & LK_MERGE_EXACT) != 0;
  const bool n_pos = geo.rows > 0 && geo.cols > 0;
  if ((n_pos && p->w == nullptr) || (n_pos && p->rank > 0 && (p->a == nullptr || p->b == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: null pointer (w %p, a %p, b %p)", p->w, p->a, p->b);
  }
  if (needs_workspace(*p) && p->workspace == nullptr) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: workspace is null (safe and exact merges need %zu bytes)",
                     static_cast<size_t>(geo.workspace_bytes));
  }
  /* The workspace holds 64-bit offsets: a misaligned base would fault on the GPU (not on a CPU). */
  if (needs_workspace(*p) && (reinterpret_cast<uintptr_t>(p->workspace) & 7u) != 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "merge_apply: workspace %p is not 8-byte aligned", p->workspace);
  }
  if (exact && (p->record_header == nullptr || (n_pos && p->codes == nullptr) ||
                (p->exc_capacity > 0 && (p->exc_index == nullptr || p->exc_bits == nullptr)))) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "merge_apply: exact mode needs record_header, codes and (capacity > 0) exc_index/exc_bits");
  }
  if (!n_pos && !(exact && p->direction == LK_MERGE_MERGE)) return 0;  // nothing to do (an exact merge still writes the header)
  switch (p->w_dtype) {
    case LK_F32:
      return run<float, float>(*p, geo, stream);
    case LK_F16:
      return p->ab_dtype == LK_F32 ? run<__half, float>(*p, geo, stream) : run<__half, __half>(*p, geo, stream);
    default:
      return p->ab_dtype == LK_F32 ? run<__nv_bfloat16, float>(*p, geo, stream)
                                   : run<__nv_bfloat16, __nv_bfloat16>(*p, geo, stream);
  }
}
