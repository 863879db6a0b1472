/*
 * backward.cu — LoRA backward with W frozen (DESIGN.md §4), single adapter (dense rows) and several
 * adapters over SGMV segments. Contract: cuda/lora_kernels.h ("Training: LoRA backward").
 *
 *   du = s · G · B            [T, rank]  f32          (per token: a GEMV against B)
 *   dB = s · Gᵀ · u           [d_out, rank]          (reduction over tokens)
 *   dA = duᵀ · x̂              [rank, d_in]           (reduction over tokens)
 *   dx += m ⊙ (du · A) / (1 − p)                     (per token; G · W is the base GEMM's)
 * Dropout: the forward's mask is regenerated here (philox.cuh, DESIGN.md §2: element row · d_in + col of
 * slice s's stream, offset dropout_offset[s]) where x is read by the dA pass (x̂ = to_f32(x) · keep_scale
 * for a kept element, 0 otherwise — the same f32 product the fused dropout shrink used) and where dx is
 * accumulated (dx += keep_scale · (du·A) for kept elements); no mask is stored. p = 0 (threshold 0,
 * keep_scale 1) does no RNG work and multiplies by 1: bit-identical to no dropout.
 *
 * One code path for both variants: the dense launcher is the multi-adapter machinery with one segment
 * [0, T), adapter 0, identity rows and the entry passed by value (BwdArgs.dense = 1), so there is no
 * table and no validation pass. Multi-adapter: position p of segment i reads row row_index[p] (identity
 * when null) of x / G / u and writes du / dx rows there; slice s uses G columns [off_s, off_s + n_s),
 * u_s, du_s and the table entries (adapter, s).
 *
 * Launch sequence (geometry from host-known sizes only: CUDA-graph safe, no host sync or allocation):
 *   [validate] → du → dB pieces → [dB finalize] → dA pieces → [dA finalize] → dx (if dx != null)
 *
 * Deterministic reductions (dA, dB). Tokens are cut into pieces of C = max(256, ceil(T / 32)) positions
 * (a function of T only); each segment is split into ceil(len / C) pieces. A block computes one (piece,
 * slice, rank group of 16, 256-wide tile of the long dimension): each thread owns one long index (o for
 * dB, k for dA) and 16 accumulators and runs one fmaf chain over the piece's positions in order (the short
 * operand, u or du, staged 32 positions at a time in shared memory; the long operand, G or x, read
 * coalesced). A segment of one piece writes its gradient directly; otherwise every piece writes its
 * partial to a workspace slot and a finalize pass sums the slots in piece order. Final value:
 * overwrite g = α · Σ, accumulate g = fmaf(α, Σ, g) (α = s for dB, 1 for dA). No float atomics, no
 * order that depends on scheduling: bit-identical run to run, under every emulator schedule, and on
 * any GPU of the same build. (The reduction order does depend on T through C — gradients are sums over
 * the batch, there is no batch invariance to keep.)
 * Workspace bounds: pieces ≤ floor((T − k) / C) + k with k = min(max_segments, T) non-empty segments
 * (dense: ceil(T / C) ≤ 32); multi-piece segments have len > C, so at most floor(T / (C + 1)) of them
 * and < 2T / C slots (≤ 64; dense ≤ 32). Slot layout [slot][slice][r_cap][long], long = max(d_in, n_s).
 *
 * du: one 256-thread block per position; thread o strides over the slice's n_s outputs with 16 rank
 * accumulators (B row o read as 16 contiguous values), then a fixed xor butterfly per warp and the 8
 * warp partials summed in warp order; du = s · Σ.
 * dx: one block per (position, 256 columns of d_in); du row staged in shared memory; per slice one fmaf
 * chain over the rank in order (A read coalesced along k); the slices' sums added in slice order; dx =
 * round(dx + Σ). Tokens without an adapter, and all-rank-0 tokens, leave dx bit-identical.
 * Multi-adapter validation (one block): *n_segments, seg_starts, seg_adapter and row_index as SGMV, plus
 * strictly increasing adapter ids among non-empty segments with an adapter (so two segments never
 * reduce into the same gradient); it writes a verdict word and the piece / multi-piece / slot prefixes
 * to the workspace. Every later block reads the verdict first and exits if it is set: an invalid launch
 * writes nothing. The single-block check of row_index costs O(T / 256) per thread — fine to ~10^6 tokens.
 *
 * Napkin math (Llama-2-7B q_proj, T = 8192, d_in = d_out = 4096, rank 16, bf16; H200 ~4.8 TB/s,
 * ~60 TFLOP/s f32 FMA): every GEMM here is tall-skinny with K or N = rank.
 *   du: reads G (64 MiB) + B per block (128 KiB, L2) → ~15 µs memory; 2·T·d_out·r = 1.1 GFLOP.
 *   dB: reads G once per rank group (64 MiB) + u (0.5 MiB); 1.1 GFLOP on FMA ≈ 20 µs at full rate.
 *   dA: reads x (64 MiB) + du; 1.1 GFLOP.   dx: reads A per block (L2), read+write dx (128 MiB).
 *   Total ≈ 4.3 GFLOP, ~320 MiB of DRAM traffic → ~70–100 µs memory-bound at best; the FMA inner
 *   loops (16 FMAs per load + 16 shared loads) make dA/dB ~FMA-bound at ~2× that. Workspace traffic:
 *   ≤ 32 slots × 16 × 4096 × 4 B = 8 MiB per pass. A tensor-core path for f16/bf16 (mma.sync m16n8k16
 *   through portable.cuh, with the u/du f32 operand split hi/lo as in SGMV) would make dA/dB/du
 *   memory-bound; this first version is FMA only, correct and deterministic.
 */
#include <string.h>

#include "portable.cuh"
#include "philox.cuh"

LK_NAMESPACE_BEGIN

namespace bwd {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRG = 16;        /* ranks per group (accumulators per thread) */
constexpr int kStage = 32;     /* positions staged per step in the reductions */
constexpr int kChunkMin = 256; /* C = max(kChunkMin, ceil(T / kMaxPieces)) */
constexpr int kMaxPieces = 32;
constexpr unsigned kFull = 0xffffffffu;

/* ------------------------------------------------------------------------------------------------
 * Host-side geometry (host-known values only). */
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

/* Block size of the du, dx and reduction kernels: the long dimension rounded up to a warp, at most
 * kThreads (small layers do not pay for idle threads; a function of host-known sizes only). */
static inline int threads_for(int64_t n) {
  const int64_t t = (n + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : (t > kThreads ? kThreads : t));
}

static inline int chunk_of(int tokens) {
  const int64_t c = ceil_div(tokens > 0 ? tokens : 0, kMaxPieces);
  return static_cast<int>(c > kChunkMin ? c : kChunkMin);
}

struct Geometry {
  int chunk;
  int64_t pieces;      /* bound on pieces (grid of the reduction passes) */
  int64_t multi;       /* bound on segments with > 1 piece (grid of the finalize passes) */
  int64_t slots;       /* bound on partial slots */
  int64_t long_max;    /* max(d_in, max n_s) */
  size_t prefix_off;   /* piece prefix (multi only) */
  size_t multi_off;    /* multi-piece prefix */
  size_t slot_off;     /* slot prefix */
  size_t part_off;     /* partials */
  size_t bytes;
};

static Geometry geometry(bool dense, int tokens, int max_segments, int n_slices, int r_cap, int d_in, int max_n) {
  Geometry g;
  const int64_t t = tokens > 0 ? tokens : 0;
  g.chunk = chunk_of(tokens);
  const int64_t c = g.chunk;
  if (dense) {
    const int64_t p = ceil_div(t, c);
    g.pieces = p > 1 ? p : 1; /* T = 0 still has one (empty) piece: overwrite mode writes zeros */
    g.multi = g.pieces > 1 ? 1 : 0;
    g.slots = g.pieces > 1 ? g.pieces : 0;
  } else {
    const int64_t ms = max_segments > 0 ? max_segments : 0;
    const int64_t k = ms < t ? ms : t;
    g.pieces = (t - k) / c + k;
    g.multi = t / (c + 1);
    const int64_t s2 = (2 * t) / c;
    g.slots = g.multi > 0 ? (s2 < g.pieces ? s2 : g.pieces) : 0;
  }
  g.long_max = d_in > max_n ? d_in : max_n;
  if (g.long_max < 0) g.long_max = 0;
  size_t off = 0;
  if (!dense) {
    const size_t n1 = static_cast<size_t>(max_segments > 0 ? max_segments : 0) + 1;
    g.prefix_off = 16; /* verdict word at 0 */
    g.multi_off = g.prefix_off + n1 * sizeof(int32_t);
    g.slot_off = g.multi_off + n1 * sizeof(int32_t);
    off = align_up(g.slot_off + n1 * sizeof(int32_t), 256);
  } else {
    g.prefix_off = g.multi_off = g.slot_off = 0;
  }
  g.part_off = off;
  g.bytes = off + static_cast<size_t>(g.slots) * static_cast<size_t>(n_slices > 0 ? n_slices : 0) *
                      static_cast<size_t>(r_cap > 0 ? r_cap : 0) * static_cast<size_t>(g.long_max) * sizeof(float);
  return g;
}

/* ------------------------------------------------------------------------------------------------
 * Kernel arguments (one struct for every pass). */
struct BwdArgs {
  const int32_t* row_index;
  const int32_t* seg_starts;
  const int32_t* seg_adapter;
  const int32_t* n_segments;
  const uint32_t* verdict;
  const int32_t* piece_prefix;
  const int32_t* multi_prefix;
  const int32_t* slot_prefix;
  const LkAdapterEntry* table;
  const LkAdapterGradEntry* grads;
  uint32_t* error_word;
  LkAdapterEntry e0;     /* dense: the entry */
  LkAdapterGradEntry g0; /* dense: the gradients */
  const void* x;
  const void* g;
  const float* u;
  float* du;
  void* dx;
  float* part;
  int64_t ld_x, ld_g, ld_dx, ld_u, ld_du, u_slice, du_slice;
  int64_t long_max;
  int slice_n[LK_MAX_SLICES];
  int slice_off[LK_MAX_SLICES];
  int dense;
  int tokens, d_in, n_adapters, n_slices, r_cap, chunk, accumulate;
  int rank_groups, long_tiles, k_tiles; /* long_tiles, k_tiles: set per pass */
  uint64_t drop_seed;
  uint64_t drop_offset[LK_MAX_SLICES];
  uint32_t drop_threshold;
  float drop_keep_scale;
};

/* The forward's dropout factor of element (row, col) of slice s: keep_scale if kept, else 0. */
__device__ __forceinline__ float drop_factor(const BwdArgs& a, int s, int64_t row, int64_t col) {
  if (a.drop_threshold == 0u && a.drop_keep_scale != 0.0f) return a.drop_keep_scale; /* nothing dropped */
  const DropoutRng d{a.drop_seed, a.drop_offset[s], a.drop_threshold, a.drop_keep_scale};
  const uint64_t e = static_cast<uint64_t>(row) * static_cast<uint64_t>(a.d_in) + static_cast<uint64_t>(col);
  return ((dropout_keep_bits(d, e >> 2) >> (e & 3u)) & 1u) != 0u ? a.drop_keep_scale : 0.0f;
}

__device__ __forceinline__ bool launch_ok(const BwdArgs& a) { return a.dense != 0 || *a.verdict == 0u; }

__device__ __forceinline__ int64_t row_of(const BwdArgs& a, int pos) {
  return a.row_index != nullptr ? static_cast<int64_t>(a.row_index[pos]) : static_cast<int64_t>(pos);
}

/* Adapter of the segment covering position pos, or −1 (uncovered, −1 segment). */
__device__ __forceinline__ int position_adapter(const BwdArgs& a, int pos) {
  if (a.dense != 0) return 0;
  const int n = *a.n_segments;
  if (n <= 0 || pos < a.seg_starts[0] || pos >= a.seg_starts[n]) return -1;
  int lo = 0, hi = n - 1; /* largest i with seg_starts[i] <= pos */
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a.seg_starts[mid] <= pos) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return a.seg_adapter[lo];
}

/* The (adapter, slice) entry and its gradients; false if invalid (flagged once per block if report). */
__device__ __forceinline__ bool entry_of(const BwdArgs& a, int adapter, int slice, LkAdapterEntry& e,
                                         LkAdapterGradEntry& ge, bool report) {
  if (a.dense != 0) {
    e = a.e0;
    ge = a.g0;
    return true;
  }
  const int64_t idx = static_cast<int64_t>(adapter) * a.n_slices + slice;
  e = a.table[idx];
  ge = a.grads[idx];
  const bool bad = e.rank < 0 || e.rank > a.r_cap || (e.rank > 0 && (e.a == nullptr || e.b == nullptr));
  if (bad && report && threadIdx.x == 0 && a.error_word != nullptr) {
    atomicOr(a.error_word, static_cast<uint32_t>(LK_FAULT_TABLE_ENTRY));
  }
  return !bad;
}

/* Largest i in [0, n) with prefix[i] <= v (prefix non-decreasing, prefix[0] = 0 <= v). */
__device__ __forceinline__ int search_prefix(const int32_t* prefix, int n, int64_t v) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= v) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

struct Piece {
  int p0, p1;   /* positions */
  int adapter;
  int q;        /* piece index within its segment */
  int n_pieces; /* pieces of the segment */
  int slot0;    /* first partial slot of the segment (if n_pieces > 1) */
};

__device__ __forceinline__ bool find_piece(const BwdArgs& a, int64_t piece, Piece& pc) {
  const int64_t c = a.chunk;
  if (a.dense != 0) {
    const int64_t np = (static_cast<int64_t>(a.tokens) + c - 1) / c;
    pc.n_pieces = np > 1 ? static_cast<int>(np) : 1;
    if (piece >= pc.n_pieces) return false;
    pc.q = static_cast<int>(piece);
    pc.adapter = 0;
    pc.slot0 = 0;
    const int64_t p0 = piece * c, p1 = p0 + c;
    pc.p0 = static_cast<int>(p0 < a.tokens ? p0 : a.tokens);
    pc.p1 = static_cast<int>(p1 < a.tokens ? p1 : a.tokens);
    return true;
  }
  if (*a.verdict != 0u) return false;
  const int n = *a.n_segments;
  if (n <= 0 || piece >= a.piece_prefix[n]) return false;
  const int i = search_prefix(a.piece_prefix, n, piece);
  pc.q = static_cast<int>(piece - a.piece_prefix[i]);
  pc.n_pieces = a.piece_prefix[i + 1] - a.piece_prefix[i];
  pc.slot0 = a.slot_prefix[i];
  pc.adapter = a.seg_adapter[i];
  const int64_t start = a.seg_starts[i], end = a.seg_starts[i + 1];
  const int64_t p0 = start + pc.q * c, p1 = p0 + c;
  pc.p0 = static_cast<int>(p0);
  pc.p1 = static_cast<int>(p1 < end ? p1 : end);
  return pc.adapter >= 0;
}

/* The m-th segment with more than one piece. */
__device__ __forceinline__ bool find_multi(const BwdArgs& a, int64_t m, int& adapter, int& n_pieces, int& slot0) {
  if (a.dense != 0) {
    const int64_t np = (static_cast<int64_t>(a.tokens) + a.chunk - 1) / a.chunk;
    if (m != 0 || np <= 1) return false;
    adapter = 0;
    n_pieces = static_cast<int>(np);
    slot0 = 0;
    return true;
  }
  if (*a.verdict != 0u) return false;
  const int n = *a.n_segments;
  if (n <= 0 || m >= a.multi_prefix[n]) return false;
  const int i = search_prefix(a.multi_prefix, n, m);
  adapter = a.seg_adapter[i];
  n_pieces = a.piece_prefix[i + 1] - a.piece_prefix[i];
  slot0 = a.slot_prefix[i];
  return adapter >= 0 && n_pieces > 1;
}

/* ------------------------------------------------------------------------------------------------
 * Validation and prefixes (multi-adapter only): one block. */
/* Exclusive scan of one int per thread (thread 0 sums the kThreads values serially: fixed order). */
__device__ __forceinline__ int64_t block_exclusive_sum(int64_t v, int64_t* sh, int64_t* total) {
  const int tid = static_cast<int>(threadIdx.x);
  __syncthreads();
  sh[tid] = v;
  __syncthreads();
  if (tid == 0) {
    int64_t run = 0;
    for (int i = 0; i < kThreads; ++i) {
      const int64_t w = sh[i];
      sh[i] = run;
      run += w;
    }
    sh[kThreads] = run;
  }
  __syncthreads();
  *total = sh[kThreads];
  return sh[tid];
}
__device__ __forceinline__ int64_t block_exclusive_max(int64_t v, int64_t* sh) {
  const int tid = static_cast<int>(threadIdx.x);
  __syncthreads();
  sh[tid] = v;
  __syncthreads();
  if (tid == 0) {
    int64_t run = -1;
    for (int i = 0; i < kThreads; ++i) {
      const int64_t w = sh[i];
      sh[i] = run;
      run = w > run ? w : run;
    }
  }
  __syncthreads();
  return sh[tid];
}

/* Length of segment i, clamped (meaningful only for valid metadata; never overflows). */
__device__ __forceinline__ int64_t seg_len(const int32_t* starts, int i, int tokens) {
  int64_t len = static_cast<int64_t>(starts[i + 1]) - starts[i];
  return len < 0 ? 0 : (len > tokens ? tokens : len);
}

__global__ void __launch_bounds__(kThreads)
    bwd_validate_kernel(const int32_t* __restrict__ row_index, const int32_t* __restrict__ seg_starts,
                        const int32_t* __restrict__ seg_adapter, const int32_t* __restrict__ n_segments,
                        uint32_t* __restrict__ verdict, int32_t* __restrict__ piece_prefix,
                        int32_t* __restrict__ multi_prefix, int32_t* __restrict__ slot_prefix,
                        uint32_t* __restrict__ error_word, int tokens, int max_segments, int n_adapters, int chunk) {
  __shared__ unsigned s_bad;
  __shared__ int64_t s_scan[kThreads + 1];
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) s_bad = 0u;
  __syncthreads();
  const int n = *n_segments;
  const bool n_ok = n >= 0 && n <= max_segments;
  unsigned bad = n_ok ? 0u : static_cast<unsigned>(LK_FAULT_SEGMENTS);
  const int n_eff = n_ok ? n : 0;
  for (int i = tid; i <= n_eff; i += kThreads) {
    const int s = seg_starts[i];
    if (s < 0 || s > tokens) bad |= LK_FAULT_SEGMENTS;
    if (i < n_eff) {
      if (s > seg_starts[i + 1]) bad |= LK_FAULT_SEGMENTS;
      const int ad = seg_adapter[i];
      if (ad < -1 || ad >= n_adapters) bad |= LK_FAULT_SEGMENTS;
    }
  }
  if (row_index != nullptr) {
    for (int64_t p = tid; p < tokens; p += kThreads) {
      const int r = row_index[p];
      if (r < 0 || r >= tokens) bad |= LK_FAULT_ROW_INDEX;
    }
  }
  /* Each thread owns a contiguous run of segments. */
  const int per = (n_eff + kThreads - 1) / kThreads;
  const int i0 = tid * per < n_eff ? tid * per : n_eff;
  const int i1 = i0 + per < n_eff ? i0 + per : n_eff;
  /* Strictly increasing adapter ids among non-empty segments with an adapter. */
  int64_t local_max = -1;
  for (int i = i0; i < i1; ++i) {
    const int ad = seg_adapter[i];
    if (ad >= 0 && seg_len(seg_starts, i, tokens) > 0) {
      if (ad <= local_max) bad |= LK_FAULT_SEGMENTS;
      local_max = ad;
    }
  }
  const int64_t run_max = block_exclusive_max(local_max, s_scan);
  for (int i = i0; i < i1; ++i) {
    const int ad = seg_adapter[i];
    if (ad >= 0 && seg_len(seg_starts, i, tokens) > 0) {
      if (ad <= run_max) bad |= LK_FAULT_SEGMENTS;
      break; /* the first one decides against the earlier threads; later ones were checked above */
    }
  }
  /* Prefixes: pieces, multi-piece segments, slots. */
  int64_t lp = 0, lm = 0, ls = 0;
  for (int i = i0; i < i1; ++i) {
    const int64_t len = seg_len(seg_starts, i, tokens);
    const int64_t pieces = seg_adapter[i] >= 0 ? (len + chunk - 1) / chunk : 0;
    lp += pieces;
    lm += pieces > 1 ? 1 : 0;
    ls += pieces > 1 ? pieces : 0;
  }
  int64_t tp, tm, ts;
  int64_t rp = block_exclusive_sum(lp, s_scan, &tp);
  int64_t rm = block_exclusive_sum(lm, s_scan, &tm);
  int64_t rs = block_exclusive_sum(ls, s_scan, &ts);
  for (int i = i0; i < i1; ++i) {
    piece_prefix[i] = static_cast<int32_t>(rp);
    multi_prefix[i] = static_cast<int32_t>(rm);
    slot_prefix[i] = static_cast<int32_t>(rs);
    const int64_t len = seg_len(seg_starts, i, tokens);
    const int64_t pieces = seg_adapter[i] >= 0 ? (len + chunk - 1) / chunk : 0;
    rp += pieces;
    rm += pieces > 1 ? 1 : 0;
    rs += pieces > 1 ? pieces : 0;
  }
  if (tid == 0) {
    piece_prefix[n_eff] = static_cast<int32_t>(tp);
    multi_prefix[n_eff] = static_cast<int32_t>(tm);
    slot_prefix[n_eff] = static_cast<int32_t>(ts);
  }
  if (bad != 0u) atomicOr(&s_bad, bad);
  __syncthreads();
  if (tid == 0) {
    verdict[0] = s_bad;
    if (s_bad != 0u && error_word != nullptr) atomicOr(error_word, s_bad);
  }
}

/* ------------------------------------------------------------------------------------------------
 * du = s · G · B: one block per position. */
template <typename TG, typename TW>
__global__ void __launch_bounds__(kThreads) bwd_du_kernel(BwdArgs a) {
  __shared__ float red[kWarps][kRG];
  if (!launch_ok(a)) return;
  const int pos = static_cast<int>(blockIdx.x);
  const int adapter = position_adapter(a, pos);
  if (adapter < 0) return;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int64_t row = row_of(a, pos);
  const TG* __restrict__ grow = static_cast<const TG*>(a.g) + row * a.ld_g;
  for (int s = 0; s < a.n_slices; ++s) {
    LkAdapterEntry e;
    LkAdapterGradEntry ge;
    if (!entry_of(a, adapter, s, e, ge, true)) continue;
    const int rank = e.rank;
    const int n_s = a.slice_n[s];
    const TG* __restrict__ gs = grow + a.slice_off[s];
    const TW* __restrict__ bw = static_cast<const TW*>(e.b);
    float* __restrict__ du = a.du + s * a.du_slice + row * a.ld_du;
    for (int j0 = 0; j0 < rank; j0 += kRG) {
      const int rg = rank - j0 < kRG ? rank - j0 : kRG;
      float acc[kRG];
#pragma unroll
      for (int i = 0; i < kRG; ++i) acc[i] = 0.0f;
      for (int o = tid; o < n_s; o += static_cast<int>(blockDim.x)) {
        const float gv = to_f32(gs[o]);
        const TW* __restrict__ brow = bw + static_cast<int64_t>(o) * e.ldb + j0;
#pragma unroll
        for (int i = 0; i < kRG; ++i) {
          if (i < rg) acc[i] = fmaf(gv, to_f32(brow[i]), acc[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < kRG; ++i) {
#pragma unroll
        for (int off = 16; off > 0; off /= 2) acc[i] += __shfl_xor_sync(kFull, acc[i], off);
      }
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < kRG; ++i) red[warp][i] = acc[i];
      }
      __syncthreads();
      if (tid < rg) {
        float sum = red[0][tid];
        const int warps = static_cast<int>(blockDim.x) / 32;
        for (int w = 1; w < warps; ++w) sum += red[w][tid];
        du[j0 + tid] = e.scale * sum;
      }
      __syncthreads();
    }
  }
}

/* ------------------------------------------------------------------------------------------------
 * (Launch bounds (256, 1): with the default bound ptxas caps this kernel at 64 registers and spills on
 * sm_80; it needs ~88 — 16 accumulators + addressing — i.e. 2 blocks of 256 per SM.)
 * dB (kDA = false: long = o over n_s, long operand G, short u, α = s) and dA (kDA = true: long = k over
 * d_in, long operand x̂, short du, α = 1): one block per (piece, rank group, long tile) × slice. */
template <typename TL, bool kDA>
__global__ void __launch_bounds__(kThreads, 1) bwd_reduce_kernel(BwdArgs a) {
  __shared__ float s_short[kStage][kRG];
  __shared__ int32_t s_row[kStage];
  const int s = static_cast<int>(blockIdx.y);
  const int64_t bx = blockIdx.x;
  const int lt = static_cast<int>(bx % a.long_tiles);
  const int64_t rest = bx / a.long_tiles;
  const int rgi = static_cast<int>(rest % a.rank_groups);
  const int64_t piece = rest / a.rank_groups;
  Piece pc;
  if (!find_piece(a, piece, pc)) return;
  LkAdapterEntry e;
  LkAdapterGradEntry ge;
  if (!entry_of(a, pc.adapter, s, e, ge, false)) return;
  const int j0 = rgi * kRG;
  if (j0 >= e.rank) return;
  float* __restrict__ out = kDA ? ge.da : ge.db;
  if (out == nullptr) return; /* gradient not wanted */
  const int rg = e.rank - j0 < kRG ? e.rank - j0 : kRG;
  const int n_long = kDA ? a.d_in : a.slice_n[s];
  const int tid = static_cast<int>(threadIdx.x);
  const int b = lt * static_cast<int>(blockDim.x) + tid;
  const TL* __restrict__ lng = static_cast<const TL*>(kDA ? a.x : a.g) + (kDA ? 0 : a.slice_off[s]);
  const int64_t ld_long = kDA ? a.ld_x : a.ld_g;
  const float* __restrict__ shrt = (kDA ? a.du + s * a.du_slice : a.u + s * a.u_slice) + j0;
  const int64_t ld_short = kDA ? a.ld_du : a.ld_u;
  float acc[kRG];
#pragma unroll
  for (int i = 0; i < kRG; ++i) acc[i] = 0.0f;
  for (int p0 = pc.p0; p0 < pc.p1; p0 += kStage) {
    const int n = pc.p1 - p0 < kStage ? pc.p1 - p0 : kStage;
    __syncthreads();
    if (tid < n) s_row[tid] = static_cast<int32_t>(row_of(a, p0 + tid));
    __syncthreads();
    for (int idx = tid; idx < kStage * kRG; idx += static_cast<int>(blockDim.x)) {
      const int r = idx / kRG, i = idx % kRG;
      s_short[r][i] = (r < n && i < rg) ? shrt[static_cast<int64_t>(s_row[r]) * ld_short + i] : 0.0f;
    }
    __syncthreads();
    if (b < n_long) {
      for (int r = 0; r < n; ++r) {
        float v = to_f32(lng[static_cast<int64_t>(s_row[r]) * ld_long + b]);
        if (kDA) {
          /* x̂ of the forward (dropout regenerated; keep_scale 1 and no RNG work when p = 0). */
          const float f = drop_factor(a, s, s_row[r], b);
          v = f != 0.0f ? v * f : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < kRG; ++i) acc[i] = fmaf(v, s_short[r][i], acc[i]);
      }
    }
  }
  if (b >= n_long) return;
  const float alpha = kDA ? 1.0f : e.scale;
  if (pc.n_pieces == 1) {
#pragma unroll
    for (int i = 0; i < kRG; ++i) {
      if (i < rg) {
        float* o = kDA ? out + static_cast<int64_t>(j0 + i) * ge.ld_da + b : out + static_cast<int64_t>(b) * ge.ld_db + j0 + i;
        *o = a.accumulate != 0 ? fmaf(alpha, acc[i], *o) : alpha * acc[i];
      }
    }
  } else {
    float* __restrict__ part =
        a.part + ((static_cast<int64_t>(pc.slot0 + pc.q) * a.n_slices + s) * a.r_cap + j0) * a.long_max + b;
#pragma unroll
    for (int i = 0; i < kRG; ++i) {
      if (i < rg) part[static_cast<int64_t>(i) * a.long_max] = acc[i];
    }
  }
}

/* Second pass for segments of several pieces: Σ over the pieces in order. Grid as the reduction, over
 * multi-piece segments instead of pieces. */
template <bool kDA>
__global__ void __launch_bounds__(kThreads) bwd_finalize_kernel(BwdArgs a) {
  const int s = static_cast<int>(blockIdx.y);
  const int64_t bx = blockIdx.x;
  const int lt = static_cast<int>(bx % a.long_tiles);
  const int64_t rest = bx / a.long_tiles;
  const int rgi = static_cast<int>(rest % a.rank_groups);
  const int64_t m = rest / a.rank_groups;
  int adapter, n_pieces, slot0;
  if (!find_multi(a, m, adapter, n_pieces, slot0)) return;
  LkAdapterEntry e;
  LkAdapterGradEntry ge;
  if (!entry_of(a, adapter, s, e, ge, false)) return;
  const int j0 = rgi * kRG;
  if (j0 >= e.rank) return;
  float* __restrict__ out = kDA ? ge.da : ge.db;
  if (out == nullptr) return;
  const int rg = e.rank - j0 < kRG ? e.rank - j0 : kRG;
  const int n_long = kDA ? a.d_in : a.slice_n[s];
  const int b = lt * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
  if (b >= n_long) return;
  const float alpha = kDA ? 1.0f : e.scale;
  const int64_t slot_stride = static_cast<int64_t>(a.n_slices) * a.r_cap * a.long_max;
  for (int i = 0; i < rg; ++i) {
    const float* __restrict__ part =
        a.part + ((static_cast<int64_t>(slot0) * a.n_slices + s) * a.r_cap + j0 + i) * a.long_max + b;
    float sum = part[0];
    for (int q = 1; q < n_pieces; ++q) sum += part[q * slot_stride];
    float* o = kDA ? out + static_cast<int64_t>(j0 + i) * ge.ld_da + b : out + static_cast<int64_t>(b) * ge.ld_db + j0 + i;
    *o = a.accumulate != 0 ? fmaf(alpha, sum, *o) : alpha * sum;
  }
}

/* ------------------------------------------------------------------------------------------------
 * dx += Σ_s du_s · A_s: one block per (position, 256 columns). */
template <typename TD, typename TW>
__global__ void __launch_bounds__(kThreads) bwd_dx_kernel(BwdArgs a) {
  __shared__ float s_du[kThreads];
  if (!launch_ok(a)) return;
  const int64_t bx = blockIdx.x;
  const int pos = static_cast<int>(bx / a.k_tiles);
  const int kt = static_cast<int>(bx % a.k_tiles);
  const int adapter = position_adapter(a, pos);
  if (adapter < 0) return;
  const int tid = static_cast<int>(threadIdx.x);
  const int nt = static_cast<int>(blockDim.x);
  const int k = kt * nt + tid;
  const int64_t row = row_of(a, pos);
  float total = 0.0f;
  bool touched = false;
  for (int s = 0; s < a.n_slices; ++s) {
    LkAdapterEntry e;
    LkAdapterGradEntry ge;
    if (!entry_of(a, adapter, s, e, ge, false) || e.rank == 0) continue;
    touched = true;
    const float* __restrict__ du = a.du + s * a.du_slice + row * a.ld_du;
    const TW* __restrict__ aw = static_cast<const TW*>(e.a) + k;
    float acc = 0.0f;
    for (int j0 = 0; j0 < e.rank; j0 += nt) {
      const int n = e.rank - j0 < nt ? e.rank - j0 : nt;
      __syncthreads();
      if (tid < n) s_du[tid] = du[j0 + tid];
      __syncthreads();
      if (k < a.d_in) {
        for (int j = 0; j < n; ++j) acc = fmaf(s_du[j], to_f32(aw[static_cast<int64_t>(j0 + j) * e.lda]), acc);
      }
    }
    if (k < a.d_in) {
      const float f = drop_factor(a, s, row, k); /* dx += m ⊙ (du·A) / (1 − p) */
      total += f != 0.0f ? acc * f : 0.0f;
    }
  }
  if (touched && k < a.d_in) {
    TD* p = static_cast<TD*>(a.dx) + row * a.ld_dx + k;
    *p = from_f32<TD>(to_f32(*p) + total);
  }
}

/* ------------------------------------------------------------------------------------------------
 * Host: dispatch. */
static inline bool dtype_ok(int d) { return d == LK_F32 || d == LK_F16 || d == LK_BF16; }

/* Runs every pass after validation. TW: the weights' type; act dtypes are TW or f32. */
template <typename TW>
static int run_passes(BwdArgs a, const Geometry& g, int x_dtype, int g_dtype, int dx_dtype, void* stream) {
  int max_n = 0;
  for (int s = 0; s < a.n_slices; ++s) max_n = a.slice_n[s] > max_n ? a.slice_n[s] : max_n;
  int err = 0;
  if (a.tokens > 0) {
    const dim3 grid(static_cast<unsigned>(a.tokens)), block(threads_for(max_n));
    err = g_dtype == LK_F32 ? launch(bwd_du_kernel<float, TW>, grid, block, 0, stream, a)
                            : launch(bwd_du_kernel<TW, TW>, grid, block, 0, stream, a);
    if (err != 0) return err;
  }
  if (g.pieces > 0 && a.rank_groups > 0) {
    for (int pass = 0; pass < 2; ++pass) {
      const bool da = pass == 1;
      const int64_t n_long = da ? a.d_in : max_n;
      if (n_long == 0) continue;
      const int threads = threads_for(n_long);
      a.long_tiles = static_cast<int>(ceil_div(n_long, threads));
      const int64_t per = static_cast<int64_t>(a.rank_groups) * a.long_tiles;
      const dim3 grid(static_cast<unsigned>(g.pieces * per), static_cast<unsigned>(a.n_slices)), block(threads);
      const int act = da ? x_dtype : g_dtype;
      if (da) {
        err = act == LK_F32 ? launch(bwd_reduce_kernel<float, true>, grid, block, 0, stream, a)
                            : launch(bwd_reduce_kernel<TW, true>, grid, block, 0, stream, a);
      } else {
        err = act == LK_F32 ? launch(bwd_reduce_kernel<float, false>, grid, block, 0, stream, a)
                            : launch(bwd_reduce_kernel<TW, false>, grid, block, 0, stream, a);
      }
      if (err != 0) return err;
      if (g.multi > 0) {
        const dim3 fgrid(static_cast<unsigned>(g.multi * per), static_cast<unsigned>(a.n_slices));
        err = da ? launch(bwd_finalize_kernel<true>, fgrid, block, 0, stream, a)
                 : launch(bwd_finalize_kernel<false>, fgrid, block, 0, stream, a);
        if (err != 0) return err;
      }
    }
  }
  if (a.dx != nullptr && a.tokens > 0 && a.d_in > 0) {
    const int threads = threads_for(a.d_in);
    a.k_tiles = static_cast<int>(ceil_div(a.d_in, threads));
    const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(a.tokens) * a.k_tiles)), block(threads);
    err = dx_dtype == LK_F32 ? launch(bwd_dx_kernel<float, TW>, grid, block, 0, stream, a)
                             : launch(bwd_dx_kernel<TW, TW>, grid, block, 0, stream, a);
  }
  return err;
}

static int dispatch(const BwdArgs& a, const Geometry& g, int w_dtype, int x_dtype, int g_dtype, int dx_dtype,
                    void* stream) {
  switch (w_dtype) {
    case LK_F32:
      return run_passes<float>(a, g, x_dtype, g_dtype, dx_dtype, stream);
    case LK_F16:
      return run_passes<__half>(a, g, x_dtype, g_dtype, dx_dtype, stream);
    default:
      return run_passes<__nv_bfloat16>(a, g, x_dtype, g_dtype, dx_dtype, stream);
  }
}

/* Checks shared by both launchers; 0 or an error code. */
static int check_common(const char* name, int w_dtype, int x_dtype, int g_dtype, int dx_dtype, bool has_dx,
                        int grad_mode, uint32_t threshold, float keep_scale) {
  const bool ok = dtype_ok(w_dtype) && (x_dtype == w_dtype || x_dtype == LK_F32) &&
                  (g_dtype == w_dtype || g_dtype == LK_F32) &&
                  (!has_dx || dx_dtype == w_dtype || dx_dtype == LK_F32);
  if (!ok) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE,
                     "%s: dtypes x %d, g %d, dx %d with weight dtype %d (each of x, g, dx must be the weights' dtype "
                     "or f32; 0 = f32, 1 = f16, 2 = bf16)",
                     name, x_dtype, g_dtype, dx_dtype, w_dtype);
  }
  if (grad_mode != LK_GRAD_OVERWRITE && grad_mode != LK_GRAD_ACCUMULATE) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: grad_mode %d is neither LK_GRAD_OVERWRITE nor LK_GRAD_ACCUMULATE",
                     name, grad_mode);
  }
  if (!(keep_scale >= 0.0f) || keep_scale > 3.0e38f || (threshold == 0u && keep_scale != 1.0f && keep_scale != 0.0f)) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: dropout_keep_scale %g with dropout_threshold %u (want 1/(1-p), finite, >= 0; 1 when the "
                     "threshold is 0)",
                     name, static_cast<double>(keep_scale), threshold);
  }
  return 0;
}

}  // namespace bwd

LK_NAMESPACE_END

using namespace lk::LK_NS;
using namespace lk::LK_NS::bwd;

static Geometry dense_geometry(const LkBackwardDenseParams& p) {
  return geometry(true, p.tokens, 1, 1, p.rank, p.d_in, p.d_out);
}

extern "C" size_t LK_SYMBOL(backward_dense_workspace_size)(const LkBackwardDenseParams* p) {
  if (p == nullptr) return 0;
  return dense_geometry(*p).bytes;
}

extern "C" int LK_SYMBOL(backward_dense)(const LkBackwardDenseParams* p, void* stream) {
  const char* name = "backward_dense";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", name);
  if (p->tokens < 0 || p->d_in < 0 || p->d_out < 0 || p->rank < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative size (tokens %d, d_in %d, d_out %d, rank %d)", name,
                     p->tokens, p->d_in, p->d_out, p->rank);
  }
  const int rc = check_common(name, p->w_dtype, p->x_dtype, p->g_dtype, p->dx_dtype, p->dx != nullptr, p->grad_mode,
                              p->dropout_threshold, p->dropout_keep_scale);
  if (rc != 0) return rc;
  const int64_t ld[9] = {p->ld_x, p->ld_g, p->ld_u, p->lda, p->ldb, p->ld_da, p->ld_db, p->ld_du, p->ld_dx};
  const int64_t need[9] = {p->d_in, p->d_out, p->rank, p->d_in, p->rank, p->d_in, p->rank, p->rank,
                           p->dx != nullptr ? p->d_in : 0};
  const char* names[9] = {"ld_x", "ld_g", "ld_u", "lda", "ldb", "ld_da", "ld_db", "ld_du", "ld_dx"};
  for (int i = 0; i < 9; ++i) {
    if (ld[i] < need[i]) {
      return set_error(LK_ERR_INVALID_ARGUMENT, "%s: %s %lld is below its row width %lld", name, names[i],
                       static_cast<long long>(ld[i]), static_cast<long long>(need[i]));
    }
  }
  if (p->rank == 0 || (p->tokens == 0 && p->grad_mode == LK_GRAD_ACCUMULATE)) return 0;
  const Geometry g = dense_geometry(*p);
  if ((p->tokens > 0 && (p->x == nullptr || p->g == nullptr || p->u == nullptr || p->du == nullptr)) ||
      p->a == nullptr || p->b == nullptr || p->da == nullptr || p->db == nullptr ||
      (g.bytes > 0 && p->workspace == nullptr)) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: null pointer (x %p, g %p, u %p, a %p, b %p, da %p, db %p, du %p, workspace %p needing %zu "
                     "bytes)",
                     name, p->x, p->g, static_cast<const void*>(p->u), p->a, p->b, static_cast<void*>(p->da),
                     static_cast<void*>(p->db), static_cast<void*>(p->du), p->workspace, g.bytes);
  }
  const int64_t k_tiles = ceil_div(p->d_in, kThreads);
  if (static_cast<int64_t>(p->tokens) * k_tiles > 0x7fffffffLL ||
      g.pieces * ceil_div(p->rank, kRG) * ceil_div(p->d_in > p->d_out ? p->d_in : p->d_out, kThreads) > 0x7fffffffLL) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: grid too large (tokens %d, d_in %d, d_out %d, rank %d)", name,
                     p->tokens, p->d_in, p->d_out, p->rank);
  }
  BwdArgs a;
  memset(&a, 0, sizeof a);
  a.dense = 1;
  a.drop_seed = p->dropout_seed;
  a.drop_offset[0] = p->dropout_offset;
  a.drop_threshold = p->dropout_threshold;
  a.drop_keep_scale = p->dropout_keep_scale;
  a.e0.a = p->a;
  a.e0.b = p->b;
  a.e0.lda = p->lda;
  a.e0.ldb = p->ldb;
  a.e0.rank = p->rank;
  a.e0.scale = p->scale;
  a.g0.da = p->da;
  a.g0.db = p->db;
  a.g0.ld_da = p->ld_da;
  a.g0.ld_db = p->ld_db;
  a.x = p->x;
  a.g = p->g;
  a.u = p->u;
  a.du = p->du;
  a.dx = p->dx;
  a.part = reinterpret_cast<float*>(static_cast<char*>(p->workspace) + g.part_off);
  a.ld_x = p->ld_x;
  a.ld_g = p->ld_g;
  a.ld_dx = p->ld_dx;
  a.ld_u = p->ld_u;
  a.ld_du = p->ld_du;
  a.long_max = g.long_max;
  a.slice_n[0] = p->d_out;
  a.tokens = p->tokens;
  a.d_in = p->d_in;
  a.n_adapters = 1;
  a.n_slices = 1;
  a.r_cap = p->rank;
  a.chunk = g.chunk;
  a.accumulate = p->grad_mode == LK_GRAD_ACCUMULATE ? 1 : 0;
  a.rank_groups = static_cast<int>(ceil_div(p->rank, kRG));
  return dispatch(a, g, p->w_dtype, p->x_dtype, p->g_dtype, p->dx_dtype, stream);
}

static Geometry sgmv_geometry_of(const LkBackwardSgmvParams& p) {
  int max_n = 0;
  for (int s = 0; s < p.n_slices && s < LK_MAX_SLICES; ++s) max_n = p.slices[s].n > max_n ? p.slices[s].n : max_n;
  return geometry(false, p.tokens, p.max_segments, p.n_slices, p.r_cap, p.d_in, max_n);
}

extern "C" size_t LK_SYMBOL(backward_sgmv_workspace_size)(const LkBackwardSgmvParams* p) {
  if (p == nullptr) return 0;
  return sgmv_geometry_of(*p).bytes;
}

extern "C" int LK_SYMBOL(backward_sgmv)(const LkBackwardSgmvParams* p, void* stream) {
  const char* name = "backward_sgmv";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", name);
  if (p->tokens < 0 || p->max_segments < 0 || p->d_in < 0 || p->n_adapters < 0 || p->r_cap < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: negative size (tokens %d, max_segments %d, d_in %d, n_adapters %d, r_cap %d)", name,
                     p->tokens, p->max_segments, p->d_in, p->n_adapters, p->r_cap);
  }
  if (p->n_slices < 1 || p->n_slices > LK_MAX_SLICES) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: n_slices %d outside [1, %d]", name, p->n_slices, LK_MAX_SLICES);
  }
  int64_t width = 0;
  for (int s = 0; s < p->n_slices; ++s) {
    if (p->slices[s].n < 0 || p->slices[s].offset < 0) {
      return set_error(LK_ERR_INVALID_ARGUMENT, "%s: slice %d has n %d, offset %d", name, s, p->slices[s].n,
                       p->slices[s].offset);
    }
    const int64_t end = static_cast<int64_t>(p->slices[s].n) + p->slices[s].offset;
    width = end > width ? end : width;
  }
  const int rc = check_common(name, p->w_dtype, p->x_dtype, p->g_dtype, p->dx_dtype, p->dx != nullptr, p->grad_mode,
                              p->dropout_threshold, p->dropout_keep_scale);
  if (rc != 0) return rc;
  if (p->ld_x < p->d_in || p->ld_g < width || (p->dx != nullptr && p->ld_dx < p->d_in)) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: leading dimension too small (ld_x %lld, ld_dx %lld >= d_in %d; ld_g %lld >= %lld)", name,
                     static_cast<long long>(p->ld_x), static_cast<long long>(p->ld_dx), p->d_in,
                     static_cast<long long>(p->ld_g), static_cast<long long>(width));
  }
  if (p->tokens == 0) return 0;
  const Geometry g = sgmv_geometry_of(*p);
  if (p->seg_starts == nullptr || p->seg_adapter == nullptr || p->n_segments == nullptr || p->workspace == nullptr ||
      (p->n_adapters > 0 && (p->table == nullptr || p->grads == nullptr)) || p->x == nullptr || p->g == nullptr ||
      p->u == nullptr || p->du == nullptr) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: null pointer (x %p, g %p, u %p, du %p, table %p, grads %p, seg_starts %p, seg_adapter %p, "
                     "n_segments %p, workspace %p)",
                     name, p->x, p->g, static_cast<const void*>(p->u), static_cast<void*>(p->du),
                     static_cast<const void*>(p->table), static_cast<const void*>(p->grads),
                     static_cast<const void*>(p->seg_starts), static_cast<const void*>(p->seg_adapter),
                     static_cast<const void*>(p->n_segments), p->workspace);
  }
  const int64_t k_tiles = ceil_div(p->d_in, kThreads);
  const int64_t rank_groups = ceil_div(p->r_cap, kRG);
  if (static_cast<int64_t>(p->tokens) * k_tiles > 0x7fffffffLL ||
      g.pieces * rank_groups * ceil_div(g.long_max, kThreads) > 0x7fffffffLL) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: grid too large (tokens %d, max_segments %d, d_in %d, r_cap %d)",
                     name, p->tokens, p->max_segments, p->d_in, p->r_cap);
  }
  char* ws = static_cast<char*>(p->workspace);
  uint32_t* verdict = reinterpret_cast<uint32_t*>(ws);
  int32_t* piece_prefix = reinterpret_cast<int32_t*>(ws + g.prefix_off);
  int32_t* multi_prefix = reinterpret_cast<int32_t*>(ws + g.multi_off);
  int32_t* slot_prefix = reinterpret_cast<int32_t*>(ws + g.slot_off);
  int err = launch(bwd_validate_kernel, dim3(1), dim3(kThreads), 0, stream, p->row_index, p->seg_starts,
                   p->seg_adapter, p->n_segments, verdict, piece_prefix, multi_prefix, slot_prefix, p->error_word,
                   p->tokens, p->max_segments, p->n_adapters, g.chunk);
  if (err != 0) return err;
  BwdArgs a;
  memset(&a, 0, sizeof a);
  a.drop_seed = p->dropout_seed;
  for (int s = 0; s < LK_MAX_SLICES; ++s) a.drop_offset[s] = p->dropout_offset[s];
  a.drop_threshold = p->dropout_threshold;
  a.drop_keep_scale = p->dropout_keep_scale;
  a.row_index = p->row_index;
  a.seg_starts = p->seg_starts;
  a.seg_adapter = p->seg_adapter;
  a.n_segments = p->n_segments;
  a.verdict = verdict;
  a.piece_prefix = piece_prefix;
  a.multi_prefix = multi_prefix;
  a.slot_prefix = slot_prefix;
  a.table = p->table;
  a.grads = p->grads;
  a.error_word = p->error_word;
  a.x = p->x;
  a.g = p->g;
  a.u = p->u;
  a.du = p->du;
  a.dx = p->dx;
  a.part = reinterpret_cast<float*>(ws + g.part_off);
  a.ld_x = p->ld_x;
  a.ld_g = p->ld_g;
  a.ld_dx = p->ld_dx;
  a.ld_u = p->r_cap;
  a.ld_du = p->r_cap;
  a.u_slice = static_cast<int64_t>(p->tokens) * p->r_cap;
  a.du_slice = a.u_slice;
  a.long_max = g.long_max;
  for (int s = 0; s < p->n_slices; ++s) {
    a.slice_n[s] = p->slices[s].n;
    a.slice_off[s] = p->slices[s].offset;
  }
  a.tokens = p->tokens;
  a.d_in = p->d_in;
  a.n_adapters = p->n_adapters;
  a.n_slices = p->n_slices;
  a.r_cap = p->r_cap;
  a.chunk = g.chunk;
  a.accumulate = p->grad_mode == LK_GRAD_ACCUMULATE ? 1 : 0;
  a.rank_groups = static_cast<int>(rank_groups);
  return dispatch(a, g, p->w_dtype, p->x_dtype, p->g_dtype, p->dx_dtype, stream);
}
