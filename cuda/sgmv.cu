/*
 * sgmv.cu — SGMV (prefill) LoRA kernels: segmented shrink / expand over a row order, and the planner
 * that builds that order from per-token adapter ids. Contract: cuda/lora_kernels.h, DESIGN.md §2.
 *
 * Layout. Positions p = 0..T of the order row_index (null = identity) form segments
 * [seg_starts[i], seg_starts[i+1]), i < *n_segments, with adapter seg_adapter[i] (−1 = none).
 * Position p reads x[row_index[p]] and writes u[s, row_index[p], 0:rank] (u f32 [n_slices, T, r_cap]) or
 * out[row_index[p], off_s : off_s + n_s]. Table entry of (adapter, slice): table[adapter * n_slices + s].
 *
 * Launch sequence (all geometry from host-known sizes only, CUDA-graph safe):
 *   shrink: validate → shrink main (per (row tile, k split, slice, rank group)) → [split reduce]
 *   expand: validate → expand main (per (row tile, slice column tile))
 *   plan:   count → per-key chunk prefix → key scan + segments → stable scatter
 *
 * Validation pre-pass (sgmv_validate_kernel, 1 + ceil(T/4096) ≤ 32 blocks of 256 threads). Block 0 checks
 * *n_segments ∈ [0, max_segments], seg_starts[0..n] ∈ [0, T] and non-decreasing, seg_adapter[0..n) ∈
 * [−1, n_adapters), and writes the exclusive prefix of per-segment row-tile counts (ceil(len / 32) for
 * adapter ≥ 0, else 0) into the workspace; blocks 1.. check slices of row_index. Each block stores its
 * fault bits in its own verdict word (plain stores: the caller's workspace needs no zeroing) and ORs
 * them into the error word. Every main-kernel thread ORs the ≤ 32 verdict words first and the whole
 * block exits if any is set, so an invalid launch writes nothing.
 *
 * Geometry. Row tiles of BM = 32 positions never straddle segments. With k = min(max_segments, T)
 * non-empty segments at most, Σ ceil(len_i / BM) ≤ floor((T − k) / BM) + k: grid.x is that bound (times
 * the split count for shrink); a block binary-searches the tile prefix for its (segment, tile) and exits
 * if it has none. Rank groups (64 wide, grid.y = n_slices · ceil(r_cap / 64)) and column tiles (64 wide,
 * grid.y = Σ_s ceil(n_s / 64)) beyond the entry's rank / the slice width exit at once: mixed ranks in one
 * launch spend no work on padding; columns [rank, r_cap) of u are never read or written.
 *
 * Shrink, f16/bf16 weights (tensor cores): block 128 threads = 4 warps, tile 32 rows × 64 ranks, K staged
 * 64 at a time through shared memory (zero-filled past the segment, past rank and past the K range);
 * warp w takes k16 step w of each stage (ldmatrix x4 for X and A, mma m16n8k16 f32-accumulate, 2 m-tiles
 * × up to 8 n-tiles), then the four warp partials are summed in shared memory in the fixed order
 * ((w0 + w1) + w2) + w3. f32 x with f16/bf16 weights: x = hi + lo with hi = round(x), lo = round(x − hi),
 * two mma's (acc += hi·A; acc += lo·A) — no f16 intermediates of the data. Split-K: splits =
 * min(ceil(d_in / 1024), 8), chunk = round_up(ceil(d_in / splits), 64) — a function of d_in only.
 * splits = 1 writes u directly; otherwise partials go to the workspace [split][slice][position][r_cap]
 * and sgmv_shrink_reduce_kernel sums them in split order 0, 1, … (no atomics, no grid sync).
 * Tiles are loaded with 16-byte vector loads where base and leading dimension allow it (x: checked on the
 * host; A: per entry, on the device, block-uniform), element loads otherwise; single-buffered (no cp.async
 * pipeline yet: occupancy hides latency).
 * f32 weights (CUDA-core FMA, TF32 would be too inaccurate): same tile, each thread owns 4 × 4 outputs
 * and runs one fmaf chain over its K chunk; same split-K.
 *
 * Expand, f16/bf16 weights: block 128 threads, tile 32 rows × 64 output columns of one slice, K = rank
 * staged 32 at a time; warps 2 × 2, each 16 rows × 32 columns (4 n-tiles); u (f32) split into hi/lo as
 * above (two mma's), B straight from the adapter. Epilogue: add mode out = round(fma(scale, acc, out)),
 * overwrite out = round(scale · acc) (exactly 0 for rank 0; rank 0 in add mode leaves out untouched).
 * f32 weights: FMA path, 4 × 4 outputs per thread, fmaf chain over the rank.
 *
 * Batch invariance: a row's value depends only on its own x/u row and the adapter — mma rows are
 * independent, masked rows are zeros, the k order is fixed by (d_in, rank) alone; tile shapes, split
 * counts and the tensor-core/FMA choice depend only on dtypes, d_in and rank. A token alone or among
 * thousands gets the same bits.
 *
 * Accuracy (emulator vs f64, |err| / Σ|terms|, random data in [−1, 1]): shrink f16·f16, bf16·bf16, f32 x ·
 * f16 (hi/lo) ≤ 6e-8, f32·f32 (FMA) ≤ 2e-7, f32 x · bf16 (hi/lo) ≤ 1.5e-6 (bf16 hi + lo keeps 16
 * significant bits); expand into f32 out: f16 B ≤ 3e-7, f32 ≤ 2e-7, bf16 B ≤ 7e-6. f16 hi/lo: lo is
 * subnormal for |v| < 2^-3, so tiny values keep 2^-25 absolute rather than 22 relative bits; |v| > 65504
 * overflows f16 (inf/NaN) — the bf16 path has the f32 range.
 *
 * Cost of the geometry: grid.x is sized for max_segments (not the device n_segments), so a capacity far
 * above min(T, n_adapters) launches many blocks that exit after reading the verdict and the prefix.
 *
 * Napkin math (Llama-3-8B q/k/v, T = 8192, d_in = 4096, rank 16, f16, 3 slices): shrink reads X once per
 * slice and rank group (3 × 64 MiB, mostly L2 hits after the first) + A per row tile (256 tiles × 128 KiB
 * per slice, from L2), 2·T·d_in·16·3 = 3.2 GFLOP (trivial on tensor cores) → memory/L2-bound, ~30–60 µs.
 * Split partials: 4 × 3 × 8192 × 16 × 4 B = 6 MiB written + read once. Expand: reads u (1.5 MiB), B per
 * row tile (small), reads+writes out (T × 6144 × 2 B × 2 = 192 MiB in add mode) → ~70 µs at 3 TB/s.
 *
 * Planner: chunks of 512 tokens, one warp each. Keys: id ∈ [0, n_adapters) or n_adapters for −1/invalid.
 * (1) per-chunk key counts (warp-level stable match via bit ballots, the group's last lane adds the
 * count; the warp owns its column, so no atomics), (2) per key, exclusive prefix over chunks (in place) and
 * the key total, (3) one block scans the totals into key starts and compacts present keys < n_adapters
 * into segments, (4) each warp re-walks its chunk and scatters token i to key_start + chunk prefix + rank
 * within the 32-token step. Deterministic (a stable counting sort), O(T · log2(n_adapters) / 32) ballots
 * + O(chunks · n_adapters) counter traffic. Workspace: (chunks + 2) · (n_adapters + 1) int32.
 *
 * Tensor parallelism: shrink and expand are separate launches, so a row-parallel layer all-reduces u
 * between them and a column-parallel one shards B (slices / n_s per shard) — nothing here assumes
 * otherwise.
 */
#include <string.h>

#include "portable.cuh"
#include "philox.cuh"

LK_NAMESPACE_BEGIN

constexpr int kBM = 32;             /* rows (positions) per tile: shrink, expand, validation prefix */
constexpr int kThreads = 128;       /* main kernels */
constexpr int kShrinkBN = 64;       /* ranks per block (rank group) */
constexpr int kShrinkBK = 64;       /* K per stage (tensor cores: 4 warps × k16) */
constexpr int kFmaBK = 32;          /* K per stage, FMA paths */
constexpr int kExpandBN = 64;       /* output columns per block */
constexpr int kExpandBK = 32;       /* rank per stage (tensor cores) */
constexpr int kLdsS = kShrinkBK + 8; /* smem row stride (halves): 144 B, 16-byte aligned, ldmatrix conflict-free */
constexpr int kLdsE = kExpandBK + 8; /* 80 B */
constexpr int kSplitTarget = 1024;  /* d_in per split before capping */
constexpr int kMaxSplits = 8;
constexpr int kValidateThreads = 256;
constexpr int kValidateRowsPerBlock = 4096;
constexpr int kMaxVerdicts = 32;
constexpr unsigned kFull = 0xffffffffu;

/* ------------------------------------------------------------------------------------------------
 * Host-side geometry and workspace layout (host-known values only). */
struct SgmvGeometry {
  int64_t tiles;      /* row-tile bound */
  int verdicts;       /* validation blocks = verdict words */
  int row_blocks;     /* validation blocks checking row_index */
  int rows_per_block; /* positions per row_index block */
  size_t prefix_off;  /* bytes */
  size_t part_off;    /* bytes (shrink partials) */
  size_t bytes;       /* total workspace */
};

static inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

static SgmvGeometry sgmv_geometry(int tokens, int max_segments, bool has_row_index) {
  SgmvGeometry g;
  const int64_t t = tokens > 0 ? tokens : 0;
  const int64_t ms = max_segments > 0 ? max_segments : 0;
  const int64_t k = ms < t ? ms : t;
  g.tiles = (t - k) / kBM + k;
  g.row_blocks = (has_row_index && t > 0) ? static_cast<int>((t + kValidateRowsPerBlock - 1) / kValidateRowsPerBlock) : 0;
  if (g.row_blocks > kMaxVerdicts - 1) g.row_blocks = kMaxVerdicts - 1;
  g.rows_per_block = g.row_blocks > 0 ? static_cast<int>((t + g.row_blocks - 1) / g.row_blocks) : 0;
  g.verdicts = 1 + g.row_blocks;
  g.prefix_off = 128; /* kMaxVerdicts uint32 */
  g.part_off = align_up(g.prefix_off + static_cast<size_t>(ms + 1) * sizeof(int32_t), 256);
  g.bytes = g.part_off;
  return g;
}

static inline int shrink_splits(int d_in) {
  int s = (d_in + kSplitTarget - 1) / kSplitTarget;
  if (s < 1) s = 1;
  if (s > kMaxSplits) s = kMaxSplits;
  return s;
}
static inline int shrink_chunk(int d_in, int splits) {
  const int per = (d_in + splits - 1) / splits;
  const int c = (per + kShrinkBK - 1) / kShrinkBK * kShrinkBK;
  return c > 0 ? c : kShrinkBK;
}

/* ------------------------------------------------------------------------------------------------
 * Device helpers. */
struct SegArgs {
  const int32_t* row_index;
  const int32_t* seg_starts;
  const int32_t* seg_adapter;
  const int32_t* n_segments;
  const uint32_t* verdict;
  const int32_t* tile_prefix;
  const LkAdapterEntry* table;
  uint32_t* error_word;
  int tokens;
  int n_verdicts;
  int n_adapters;
  int n_slices;
  int r_cap;
};

struct TileInfo {
  int row0;    /* first position */
  int rows;    /* positions in this tile (1..kBM) */
  int adapter; /* >= 0 */
};

/* Every thread calls this (uniform result). False: the launch is invalid or this block has no tile. */
__device__ __forceinline__ bool sgmv_find_tile(const SegArgs& a, int64_t tile, TileInfo& ti) {
  uint32_t bad = 0;
  for (int i = 0; i < a.n_verdicts; ++i) bad |= a.verdict[i];
  if (bad != 0) return false;
  const int n = *a.n_segments;
  if (n <= 0 || tile >= a.tile_prefix[n]) return false;
  int lo = 0, hi = n - 1; /* largest i with prefix[i] <= tile */
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a.tile_prefix[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int start = a.seg_starts[lo], end = a.seg_starts[lo + 1];
  ti.row0 = start + static_cast<int>(tile - a.tile_prefix[lo]) * kBM;
  ti.rows = end - ti.row0 < kBM ? end - ti.row0 : kBM;
  ti.adapter = a.seg_adapter[lo];
  return ti.rows > 0 && ti.adapter >= 0;
}

/* The table entry of (adapter, slice); false (and LK_FAULT_TABLE_ENTRY, once per block) if invalid. */
__device__ __forceinline__ bool sgmv_entry(const SegArgs& a, int adapter, int slice, LkAdapterEntry& e) {
  e = a.table[static_cast<int64_t>(adapter) * a.n_slices + slice];
  const bool bad = e.rank < 0 || e.rank > a.r_cap || (e.rank > 0 && (e.a == nullptr || e.b == nullptr));
  if (bad && threadIdx.x == 0 && a.error_word != nullptr) atomicOr(a.error_word, static_cast<uint32_t>(LK_FAULT_TABLE_ENTRY));
  return !bad;
}

__device__ __forceinline__ int64_t sgmv_token(const SegArgs& a, int pos) {
  return a.row_index != nullptr ? static_cast<int64_t>(a.row_index[pos]) : static_cast<int64_t>(pos);
}

/* Exclusive scan over the block (blockDim.x a multiple of 32, ≤ 1024); `sums` has 33 ints. */
__device__ __forceinline__ int block_exclusive_scan(int v, int* sums, int* total) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int nw = static_cast<int>(blockDim.x) >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < nw ? sums[lane] : 0;
    int wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFull, wi, o);
      if (lane >= o) wi += n;
    }
    if (lane < nw) sums[lane] = wi - w;
    if (lane == 31) sums[32] = wi;
  }
  __syncthreads();
  const int r = sums[warp] + incl - v;
  *total = sums[32];
  __syncthreads();
  return r;
}

/* hi/lo split of one element into the mma operand type (TX = TW: exact, lo unused). */
template <typename TX, typename TW>
__device__ __forceinline__ void split_hi_lo(TX v, TW& hi, TW& lo);
template <>
__device__ __forceinline__ void split_hi_lo<__half, __half>(__half v, __half& hi, __half& lo) {
  hi = v;
  lo = __float2half(0.0f);
}
template <>
__device__ __forceinline__ void split_hi_lo<__nv_bfloat16, __nv_bfloat16>(__nv_bfloat16 v, __nv_bfloat16& hi,
                                                                          __nv_bfloat16& lo) {
  hi = v;
  lo = __float2bfloat16(0.0f);
}
template <>
__device__ __forceinline__ void split_hi_lo<float, __half>(float v, __half& hi, __half& lo) {
  hi = __float2half(v);
  lo = __float2half(v - __half2float(hi));
}
template <>
__device__ __forceinline__ void split_hi_lo<float, __nv_bfloat16>(float v, __nv_bfloat16& hi, __nv_bfloat16& lo) {
  hi = __float2bfloat16(v);
  lo = __float2bfloat16(v - __bfloat162float(hi));
}

template <typename TW>
__device__ __forceinline__ void mma_tc(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma_tc<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  mma_m16n8k16_f16(d, a, b, d);
}
template <>
__device__ __forceinline__ void mma_tc<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  mma_m16n8k16_bf16(d, a, b, d);
}

template <typename T>
struct IsF32 {
  static constexpr bool value = false;
};
template <>
struct IsF32<float> {
  static constexpr bool value = true;
};

/* ------------------------------------------------------------------------------------------------
 * Validation pre-pass. */
__global__ void __launch_bounds__(kValidateThreads)
    sgmv_validate_kernel(const int32_t* __restrict__ row_index, const int32_t* __restrict__ seg_starts,
                         const int32_t* __restrict__ seg_adapter, const int32_t* __restrict__ n_segments,
                         uint32_t* __restrict__ verdict, int32_t* __restrict__ tile_prefix,
                         uint32_t* __restrict__ error_word, int tokens, int max_segments, int n_adapters,
                         int rows_per_block) {
  __shared__ unsigned s_bad;
  __shared__ int s_sums[33];
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) s_bad = 0u;
  __syncthreads();
  if (blockIdx.x == 0) {
    const int n = *n_segments;
    const bool n_ok = n >= 0 && n <= max_segments;
    unsigned bad = n_ok ? 0u : static_cast<unsigned>(LK_FAULT_SEGMENTS);
    const int n_eff = n_ok ? n : 0;
    if (n_ok) {
      for (int i = tid; i <= n_eff; i += kValidateThreads) {
        const int s = seg_starts[i];
        if (s < 0 || s > tokens) bad = LK_FAULT_SEGMENTS;
        if (i < n_eff) {
          if (s > seg_starts[i + 1]) bad = LK_FAULT_SEGMENTS;
          const int ad = seg_adapter[i];
          if (ad < -1 || ad >= n_adapters) bad = LK_FAULT_SEGMENTS;
        }
      }
    }
    if (bad) atomicOr(&s_bad, bad);
    /* Tile prefix (meaningful only when the metadata is valid; lengths clamped so nothing overflows). */
    const int per = (n_eff + kValidateThreads - 1) / kValidateThreads;
    const int i0 = tid * per < n_eff ? tid * per : n_eff;
    const int i1 = i0 + per < n_eff ? i0 + per : n_eff;
    int local = 0;
    for (int i = i0; i < i1; ++i) {
      int len = seg_starts[i + 1] - seg_starts[i];
      len = len < 0 ? 0 : (len > tokens ? tokens : len);
      if (seg_adapter[i] >= 0) local += (len + kBM - 1) / kBM;
    }
    int total = 0;
    int run = block_exclusive_scan(local, s_sums, &total);
    for (int i = i0; i < i1; ++i) {
      tile_prefix[i] = run;
      int len = seg_starts[i + 1] - seg_starts[i];
      len = len < 0 ? 0 : (len > tokens ? tokens : len);
      if (seg_adapter[i] >= 0) run += (len + kBM - 1) / kBM;
    }
    if (tid == 0) tile_prefix[n_eff] = total;
  } else if (row_index != nullptr) {
    const int64_t p0 = static_cast<int64_t>(blockIdx.x - 1) * rows_per_block;
    int64_t p1 = p0 + rows_per_block;
    if (p1 > tokens) p1 = tokens;
    unsigned bad = 0u;
    for (int64_t p = p0 + tid; p < p1; p += kValidateThreads) {
      const int r = row_index[p];
      if (r < 0 || r >= tokens) bad = LK_FAULT_ROW_INDEX;
    }
    if (bad) atomicOr(&s_bad, bad);
  }
  __syncthreads();
  if (tid == 0) {
    verdict[blockIdx.x] = s_bad;
    if (s_bad != 0u && error_word != nullptr) atomicOr(error_word, s_bad);
  }
}

/* ------------------------------------------------------------------------------------------------
 * Shrink. */
struct ShrinkArgs {
  SegArgs seg;
  const void* x;
  float* u;
  float* part; /* [splits][n_slices][T][r_cap] when splits > 1 */
  int64_t ld_x;
  int d_in;
  int splits;
  int chunk;
  int rank_groups;
  int x_vec_ok; /* x 16-byte aligned and ld_x a multiple of 16 bytes */
  /* Fused dropout (threshold 0 = none): slice s's mask from Philox(seed, drop_offset[s]). */
  uint64_t drop_seed;
  uint64_t drop_offset[LK_MAX_SLICES];
  uint32_t drop_threshold;
  float drop_keep_scale;
};

/* Slice `slice`'s Philox offset, read with static indices only (a kernel-parameter array indexed at
 * run time would be copied to local memory). */
__device__ __forceinline__ uint64_t shrink_drop_offset(const ShrinkArgs& p, int slice) {
  uint64_t off = 0;
#pragma unroll
  for (int i = 0; i < LK_MAX_SLICES; ++i) off = i == slice ? p.drop_offset[i] : off;
  return off;
}

/* Whether element (tok, k) of x survives the dropout whose stream offset is `offset` (always,
 * without dropout). */
__device__ __forceinline__ bool shrink_kept(const ShrinkArgs& p, uint64_t offset, int64_t tok, int k) {
  if (p.drop_threshold == 0u) return true;
  const DropoutRng d{p.drop_seed, offset, p.drop_threshold, p.drop_keep_scale};
  const uint64_t e = static_cast<uint64_t>(tok) * static_cast<uint64_t>(p.d_in) + static_cast<uint64_t>(k);
  return ((dropout_keep_bits(d, e >> 2) >> (e & 3u)) & 1u) != 0u;
}

/* Writes one finished value (split partial or u). */
__device__ __forceinline__ void shrink_store(const ShrinkArgs& p, int slice, int split, int pos, int64_t tok, int j,
                                             float v) {
  const int64_t T = p.seg.tokens;
  if (p.drop_threshold != 0u) v *= p.drop_keep_scale; /* dropout: scale each (partial) dot product once */
  if (p.splits == 1) {
    p.u[(static_cast<int64_t>(slice) * T + tok) * p.seg.r_cap + j] = v;
  } else {
    p.part[((static_cast<int64_t>(split) * p.seg.n_slices + slice) * T + pos) * p.seg.r_cap + j] = v;
  }
}

template <typename TX, typename TW>
__global__ void __launch_bounds__(kThreads) sgmv_shrink_tc_kernel(ShrinkArgs p) {
  constexpr bool kLo = IsF32<TX>::value;
  __shared__ __align__(16) TW xs_hi[kBM][kLdsS];
  __shared__ __align__(16) TW xs_lo[kLo ? kBM : 1][kLdsS];
  __shared__ __align__(16) TW as[kShrinkBN][kLdsS];
  __shared__ float red[kBM][kShrinkBN + 4];
  __shared__ int64_t s_tok[kBM];

  const int splits = p.splits;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) / splits;
  const int split = static_cast<int>(blockIdx.x % static_cast<unsigned>(splits));
  const int slice = static_cast<int>(blockIdx.y) % p.seg.n_slices;
  const int group = static_cast<int>(blockIdx.y) / p.seg.n_slices;
  const uint64_t drop_off = shrink_drop_offset(p, slice);
  TileInfo ti;
  if (!sgmv_find_tile(p.seg, tile, ti)) return;
  LkAdapterEntry e;
  if (!sgmv_entry(p.seg, ti.adapter, slice, e)) return;
  const int j0 = group * kShrinkBN;
  if (j0 >= e.rank) return;
  const int rg = e.rank - j0 < kShrinkBN ? e.rank - j0 : kShrinkBN;
  const int ntiles = (rg + 7) >> 3;
  const int fill_rows = (rg + 15) & ~15;
  const int k_begin = split * p.chunk;
  const int k_end = k_begin + p.chunk < p.d_in ? k_begin + p.chunk : p.d_in;

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  if (tid < kBM) s_tok[tid] = tid < ti.rows ? sgmv_token(p.seg, ti.row0 + tid) : 0;
  __syncthreads();

  const TX* __restrict__ x = static_cast<const TX*>(p.x);
  const TW* __restrict__ aw = static_cast<const TW*>(e.a) + static_cast<int64_t>(j0) * e.lda;
  const TW zero = from_f32<TW>(0.0f);
  const TX zero_x = from_f32<TX>(0.0f);
  constexpr int kVX = 16 / static_cast<int>(sizeof(TX)); /* elements per 16-byte vector */
  /* Uniform per block: 16-byte vectors need aligned bases and leading dimensions. */
  const bool vec_x = p.x_vec_ok;
  const bool vec_a = (reinterpret_cast<uintptr_t>(e.a) & 15u) == 0 && (e.lda & 7) == 0;

  float acc[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  for (int k0 = k_begin; k0 < k_end; k0 += kShrinkBK) {
    /* X tile: 32 × 64, 16-byte vectors along k where the row allows it (else element by element). */
#pragma unroll
    for (int i = 0; i < (kBM * kShrinkBK) / (kVX * kThreads); ++i) {
      const int idx = i * kThreads + tid, r = idx / (kShrinkBK / kVX), c = (idx % (kShrinkBK / kVX)) * kVX, k = k0 + c;
      TX v[kVX];
      if (vec_x && r < ti.rows && k + kVX <= k_end) {
        memcpy(v, __builtin_assume_aligned(static_cast<const void*>(x + s_tok[r] * p.ld_x + k), 16), sizeof v);
      } else {
#pragma unroll
        for (int q = 0; q < kVX; ++q) v[q] = (r < ti.rows && k + q < k_end) ? x[s_tok[r] * p.ld_x + k + q] : zero_x;
      }
      if (p.drop_threshold != 0u && r < ti.rows) {
#pragma unroll
        for (int q = 0; q < kVX; ++q) {
          if (k + q < k_end && !shrink_kept(p, drop_off, s_tok[r], k + q)) v[q] = zero_x;
        }
      }
      TW hi[kVX], lo[kVX];
#pragma unroll
      for (int q = 0; q < kVX; ++q) split_hi_lo<TX, TW>(v[q], hi[q], lo[q]);
      memcpy(__builtin_assume_aligned(static_cast<void*>(&xs_hi[r][c]), sizeof hi), hi, sizeof hi); /* 16 or 8 bytes */
      if constexpr (kLo) memcpy(__builtin_assume_aligned(static_cast<void*>(&xs_lo[r][c]), sizeof lo), lo, sizeof lo);
    }
    /* A tile: ranks [j0, j0 + fill_rows) × 64. */
    for (int idx = tid; idx < fill_rows * (kShrinkBK / 8); idx += kThreads) {
      const int r = idx / (kShrinkBK / 8), c = (idx % (kShrinkBK / 8)) * 8, k = k0 + c;
      const TW* src = aw + static_cast<int64_t>(r) * e.lda + k;
      if (vec_a && r < rg && k + 8 <= k_end) {
        memcpy(__builtin_assume_aligned(static_cast<void*>(&as[r][c]), 16), __builtin_assume_aligned(static_cast<const void*>(src), 16), 16);
      } else {
        TW v[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) v[q] = (r < rg && k + q < k_end) ? src[q] : zero;
        memcpy(__builtin_assume_aligned(static_cast<void*>(&as[r][c]), 16), v, sizeof v);
      }
    }
    __syncthreads();
    if (k0 + warp * 16 < k_end) {
      const int kk = warp * 16;
      uint32_t ah[2][4], al[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        ldmatrix_x4(ah[mt], &xs_hi[mt * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
        if constexpr (kLo) ldmatrix_x4(al[mt], &xs_lo[mt * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
      }
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (np * 2 < ntiles) {
          uint32_t b[4];
          ldmatrix_x4(b, &as[np * 16 + (lane & 7) + ((lane >> 4) << 3)][kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (np * 2 + h < ntiles) {
              const uint32_t bb[2] = {b[2 * h], b[2 * h + 1]};
#pragma unroll
              for (int mt = 0; mt < 2; ++mt) {
                mma_tc<TW>(acc[mt][np * 2 + h], ah[mt], bb);
                if constexpr (kLo) mma_tc<TW>(acc[mt][np * 2 + h], al[mt], bb);
              }
            }
          }
        }
      }
    }
    __syncthreads();
  }

  /* Fixed-order cross-warp reduction: ((w0 + w1) + w2) + w3. */
  const int g = lane >> 2, t = lane & 3;
  for (int w = 0; w < 4; ++w) {
    if (warp == w) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          if (nt < ntiles)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int row = mt * 16 + g + 8 * (i >> 1), col = nt * 8 + 2 * t + (i & 1);
              red[row][col] = w == 0 ? acc[mt][nt][i] : red[row][col] + acc[mt][nt][i];
            }
    }
    __syncthreads();
  }
  for (int idx = tid; idx < ti.rows * rg; idx += kThreads) {
    const int r = idx / rg, c = idx % rg;
    shrink_store(p, slice, split, ti.row0 + r, s_tok[r], j0 + c, red[r][c]);
  }
}

/* f32 weights: CUDA-core FMA. Thread t owns rows (t >> 4) + 8i and ranks (t & 15) + 16j, i, j < 4. */
__global__ void __launch_bounds__(kThreads) sgmv_shrink_fma_kernel(ShrinkArgs p) {
  __shared__ float xs[kBM][kFmaBK + 1];
  __shared__ float as[kShrinkBN][kFmaBK + 1];
  __shared__ int64_t s_tok[kBM];

  const int splits = p.splits;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) / splits;
  const int split = static_cast<int>(blockIdx.x % static_cast<unsigned>(splits));
  const int slice = static_cast<int>(blockIdx.y) % p.seg.n_slices;
  const int group = static_cast<int>(blockIdx.y) / p.seg.n_slices;
  const uint64_t drop_off = shrink_drop_offset(p, slice);
  TileInfo ti;
  if (!sgmv_find_tile(p.seg, tile, ti)) return;
  LkAdapterEntry e;
  if (!sgmv_entry(p.seg, ti.adapter, slice, e)) return;
  const int j0 = group * kShrinkBN;
  if (j0 >= e.rank) return;
  const int rg = e.rank - j0 < kShrinkBN ? e.rank - j0 : kShrinkBN;
  const int fill_rows = (rg + 15) & ~15; /* rows (tc + 16j) the threads read */
  const int k_begin = split * p.chunk;
  const int k_end = k_begin + p.chunk < p.d_in ? k_begin + p.chunk : p.d_in;

  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kBM) s_tok[tid] = tid < ti.rows ? sgmv_token(p.seg, ti.row0 + tid) : 0;
  __syncthreads();
  const float* __restrict__ x = static_cast<const float*>(p.x);
  const float* __restrict__ aw = static_cast<const float*>(e.a) + static_cast<int64_t>(j0) * e.lda;
  const int tr = tid >> 4, tc = tid & 15;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int k0 = k_begin; k0 < k_end; k0 += kFmaBK) {
    const int kn = k_end - k0 < kFmaBK ? k_end - k0 : kFmaBK;
#pragma unroll
    for (int i = 0; i < (kBM * kFmaBK) / kThreads; ++i) {
      const int idx = i * kThreads + tid, r = idx / kFmaBK, c = idx % kFmaBK;
      xs[r][c] = (r < ti.rows && c < kn && shrink_kept(p, drop_off, s_tok[r], k0 + c)) ? x[s_tok[r] * p.ld_x + k0 + c]
                                                                                         : 0.0f;
    }
    for (int idx = tid; idx < fill_rows * kFmaBK; idx += kThreads) {
      const int r = idx / kFmaBK, c = idx % kFmaBK;
      as[r][c] = (r < rg && c < kn) ? aw[static_cast<int64_t>(r) * e.lda + k0 + c] : 0.0f;
    }
    __syncthreads();
    for (int k = 0; k < kn; ++k) {
      float xv[4], av[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = xs[tr + 8 * i][k];
#pragma unroll
      for (int j = 0; j < 4; ++j) av[j] = as[tc + 16 * j < fill_rows ? tc + 16 * j : 0][k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], av[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = tr + 8 * i, c = tc + 16 * j;
      if (r < ti.rows && c < rg) shrink_store(p, slice, split, ti.row0 + r, s_tok[r], j0 + c, acc[i][j]);
    }
}

/* Second phase of split-K: u = Σ_split partial, in split order. grid (tiles, n_slices), 256 threads. */
__global__ void __launch_bounds__(256) sgmv_shrink_reduce_kernel(ShrinkArgs p) {
  const int slice = static_cast<int>(blockIdx.y);
  TileInfo ti;
  if (!sgmv_find_tile(p.seg, static_cast<int64_t>(blockIdx.x), ti)) return;
  LkAdapterEntry e;
  if (!sgmv_entry(p.seg, ti.adapter, slice, e)) return;
  const int rank = e.rank;
  const int64_t T = p.seg.tokens, rc = p.seg.r_cap;
  const int64_t split_stride = static_cast<int64_t>(p.seg.n_slices) * T * rc;
  for (int idx = static_cast<int>(threadIdx.x); idx < ti.rows * rank; idx += static_cast<int>(blockDim.x)) {
    const int r = idx / rank, j = idx % rank;
    const int pos = ti.row0 + r;
    const float* src = p.part + (static_cast<int64_t>(slice) * T + pos) * rc + j;
    float s = src[0];
    for (int sp = 1; sp < p.splits; ++sp) s += src[sp * split_stride];
    p.u[(static_cast<int64_t>(slice) * T + sgmv_token(p.seg, pos)) * rc + j] = s;
  }
}

/* ------------------------------------------------------------------------------------------------
 * Expand. */
struct ExpandArgs {
  SegArgs seg;
  const float* u;
  void* out;
  int64_t ld_out;
  int slice_n[LK_MAX_SLICES];
  int slice_off[LK_MAX_SLICES];
  int col_tile_start[LK_MAX_SLICES + 1];
  int mode;
};

/* Which slice and first column this block's grid.y names (≤ 8 slices: a short scan). */
__device__ __forceinline__ void expand_slice(const ExpandArgs& p, int& slice, int& n0) {
  const int y = static_cast<int>(blockIdx.y);
  slice = 0;
  while (slice + 1 < p.seg.n_slices && y >= p.col_tile_start[slice + 1]) ++slice;
  n0 = (y - p.col_tile_start[slice]) * kExpandBN;
}

template <typename TO>
__device__ __forceinline__ void expand_store(TO* ptr, float acc, float scale, int rank, int mode) {
  if (mode == LK_EXPAND_ADD) {
    *ptr = from_f32<TO>(fmaf(scale, acc, to_f32(*ptr)));
  } else {
    *ptr = from_f32<TO>(rank == 0 ? 0.0f : scale * acc);
  }
}

template <typename TO, typename TW>
__global__ void __launch_bounds__(kThreads) sgmv_expand_tc_kernel(ExpandArgs p) {
  __shared__ __align__(16) TW us_hi[kBM][kLdsE];
  __shared__ __align__(16) TW us_lo[kBM][kLdsE];
  __shared__ __align__(16) TW bs[kExpandBN][kLdsE];
  __shared__ int64_t s_tok[kBM];

  int slice, n0;
  expand_slice(p, slice, n0);
  TileInfo ti;
  if (!sgmv_find_tile(p.seg, static_cast<int64_t>(blockIdx.x), ti)) return;
  LkAdapterEntry e;
  if (!sgmv_entry(p.seg, ti.adapter, slice, e)) return;
  const int rank = e.rank;
  if (rank == 0 && p.mode == LK_EXPAND_ADD) return;
  const int n_s = p.slice_n[slice];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  if (tid < kBM) s_tok[tid] = tid < ti.rows ? sgmv_token(p.seg, ti.row0 + tid) : 0;
  __syncthreads();

  const int64_t T = p.seg.tokens, rc = p.seg.r_cap;
  const float* __restrict__ u = p.u + static_cast<int64_t>(slice) * T * rc;
  const TW* __restrict__ bw = static_cast<const TW*>(e.b) + static_cast<int64_t>(n0) * e.ldb;
  const int ncols = n_s - n0 < kExpandBN ? n_s - n0 : kExpandBN;
  const TW zero = from_f32<TW>(0.0f);
  const int wm = (warp >> 1) * 16, wn = (warp & 1) * 32;

  float acc[4][4];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;

  for (int k0 = 0; k0 < rank; k0 += kExpandBK) {
    const int kn = rank - k0 < kExpandBK ? rank - k0 : kExpandBK;
#pragma unroll
    for (int i = 0; i < (kBM * kExpandBK) / kThreads; ++i) {
      const int idx = i * kThreads + tid, r = idx / kExpandBK, c = idx % kExpandBK;
      TW hi = zero, lo = zero;
      if (r < ti.rows && c < kn) split_hi_lo<float, TW>(u[s_tok[r] * rc + k0 + c], hi, lo);
      us_hi[r][c] = hi;
      us_lo[r][c] = lo;
    }
#pragma unroll 4
    for (int i = 0; i < (kExpandBN * kExpandBK) / kThreads; ++i) {
      const int idx = i * kThreads + tid, n = idx / kExpandBK, c = idx % kExpandBK;
      bs[n][c] = (n < ncols && c < kn) ? bw[static_cast<int64_t>(n) * e.ldb + k0 + c] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kExpandBK / 16; ++ks) {
      const int kk = ks * 16;
      if (kk < kn && wn < ncols) {
        uint32_t ah[4], al[4];
        ldmatrix_x4(ah, &us_hi[wm + (lane & 15)][kk + (lane >> 4) * 8]);
        ldmatrix_x4(al, &us_lo[wm + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          if (wn + np * 16 < ncols) {
            uint32_t b[4];
            ldmatrix_x4(b, &bs[wn + np * 16 + (lane & 7) + ((lane >> 4) << 3)][kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if (wn + np * 16 + h * 8 < ncols) {
                const uint32_t bb[2] = {b[2 * h], b[2 * h + 1]};
                mma_tc<TW>(acc[np * 2 + h], ah, bb);
                mma_tc<TW>(acc[np * 2 + h], al, bb);
              }
            }
          }
        }
      }
    }
    __syncthreads();
  }

  TO* __restrict__ out = static_cast<TO*>(p.out);
  const int off = p.slice_off[slice] + n0;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = wm + g + 8 * (i >> 1), col = wn + nt * 8 + 2 * t + (i & 1);
      if (row < ti.rows && col < ncols)
        expand_store<TO>(out + s_tok[row] * p.ld_out + off + col, acc[nt][i], e.scale, rank, p.mode);
    }
}

/* f32 weights (and f32 out): CUDA-core FMA; thread t owns rows (t >> 4) + 8i, columns (t & 15) + 16j. */
__global__ void __launch_bounds__(kThreads) sgmv_expand_fma_kernel(ExpandArgs p) {
  __shared__ float us[kBM][kFmaBK + 1];
  __shared__ float bs[kExpandBN][kFmaBK + 1];
  __shared__ int64_t s_tok[kBM];

  int slice, n0;
  expand_slice(p, slice, n0);
  TileInfo ti;
  if (!sgmv_find_tile(p.seg, static_cast<int64_t>(blockIdx.x), ti)) return;
  LkAdapterEntry e;
  if (!sgmv_entry(p.seg, ti.adapter, slice, e)) return;
  const int rank = e.rank;
  if (rank == 0 && p.mode == LK_EXPAND_ADD) return;
  const int n_s = p.slice_n[slice];
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kBM) s_tok[tid] = tid < ti.rows ? sgmv_token(p.seg, ti.row0 + tid) : 0;
  __syncthreads();

  const int64_t T = p.seg.tokens, rc = p.seg.r_cap;
  const float* __restrict__ u = p.u + static_cast<int64_t>(slice) * T * rc;
  const float* __restrict__ bw = static_cast<const float*>(e.b) + static_cast<int64_t>(n0) * e.ldb;
  const int ncols = n_s - n0 < kExpandBN ? n_s - n0 : kExpandBN;
  const int tr = tid >> 4, tc = tid & 15;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < rank; k0 += kFmaBK) {
    const int kn = rank - k0 < kFmaBK ? rank - k0 : kFmaBK;
#pragma unroll
    for (int i = 0; i < (kBM * kFmaBK) / kThreads; ++i) {
      const int idx = i * kThreads + tid, r = idx / kFmaBK, c = idx % kFmaBK;
      us[r][c] = (r < ti.rows && c < kn) ? u[s_tok[r] * rc + k0 + c] : 0.0f;
    }
#pragma unroll 4
    for (int i = 0; i < (kExpandBN * kFmaBK) / kThreads; ++i) {
      const int idx = i * kThreads + tid, n = idx / kFmaBK, c = idx % kFmaBK;
      bs[n][c] = (n < ncols && c < kn) ? bw[static_cast<int64_t>(n) * e.ldb + k0 + c] : 0.0f;
    }
    __syncthreads();
    for (int k = 0; k < kn; ++k) {
      float uv[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) uv[i] = us[tr + 8 * i][k];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[tc + 16 * j][k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(uv[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* __restrict__ out = static_cast<float*>(p.out);
  const int off = p.slice_off[slice] + n0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = tr + 8 * i, c = tc + 16 * j;
      if (r < ti.rows && c < ncols) expand_store<float>(out + s_tok[r] * p.ld_out + off + c, acc[i][j], e.scale, rank, p.mode);
    }
}

/* ------------------------------------------------------------------------------------------------
 * Planner. */
constexpr int kPlanChunk = 512;       /* tokens per warp */
constexpr int kPlanWarps = 4;         /* warps per block (count / scatter) */
constexpr int kPlanScanThreads = 1024;
constexpr int kPlanPrefixThreads = 256;

struct PlanArgs {
  const int32_t* token_adapter;
  int32_t* row_index;
  int32_t* seg_starts;
  int32_t* seg_adapter;
  int32_t* n_segments;
  uint32_t* error_word;
  int32_t* counts;    /* [chunks][keys] */
  int32_t* totals;    /* [keys] */
  int32_t* key_start; /* [keys] */
  int tokens;
  int n_adapters;
  int keys;  /* n_adapters + 1 */
  int chunks;
  int key_bits;
};

/* Key of position i (n_adapters = "no adapter"); `valid` lanes only. Flags out-of-range ids. */
__device__ __forceinline__ int plan_key(const PlanArgs& p, int i, bool valid, bool flag) {
  if (!valid) return 0;
  const int id = p.token_adapter[i];
  if (id >= 0 && id < p.n_adapters) return id;
  if (flag && id != -1 && p.error_word != nullptr) atomicOr(p.error_word, static_cast<uint32_t>(LK_FAULT_ADAPTER_ID));
  return p.n_adapters;
}

/* Lanes of the (full, converged) warp holding the same key; restricted to valid lanes. */
__device__ __forceinline__ unsigned plan_peers(int key, bool valid, int key_bits) {
  unsigned peers = __ballot_sync(kFull, valid);
  for (int b = 0; b < key_bits; ++b) {
    const int bit = (key >> b) & 1;
    const unsigned bal = __ballot_sync(kFull, bit);
    peers &= bit ? bal : ~bal;
  }
  return peers;
}

__device__ __forceinline__ int popc32(unsigned v) {
  int c = 0;
  while (v) {
    v &= v - 1u;
    ++c;
  }
  return c;
}

__global__ void __launch_bounds__(kPlanWarps * 32) sgmv_plan_count_kernel(PlanArgs p) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int c = static_cast<int>(blockIdx.x) * kPlanWarps + (static_cast<int>(threadIdx.x) >> 5);
  if (c >= p.chunks) return;
  int32_t* cnt = p.counts + static_cast<int64_t>(c) * p.keys;
  for (int k = lane; k < p.keys; k += 32) cnt[k] = 0;
  __syncwarp();
  const int begin = c * kPlanChunk;
  const int end = begin + kPlanChunk < p.tokens ? begin + kPlanChunk : p.tokens;
  for (int base = begin; base < end; base += 32) {
    const int i = base + lane;
    const bool valid = i < end;
    const int key = plan_key(p, i, valid, true);
    const unsigned peers = plan_peers(key, valid, p.key_bits);
    if (valid && (peers & ((~0u << lane) << 1)) == 0u) cnt[key] += popc32(peers); /* last lane of the group */
    __syncwarp();
  }
}

__global__ void __launch_bounds__(kPlanPrefixThreads) sgmv_plan_prefix_kernel(PlanArgs p) {
  const int key = static_cast<int>(blockIdx.x) * kPlanPrefixThreads + static_cast<int>(threadIdx.x);
  if (key >= p.keys) return;
  int run = 0;
  for (int c = 0; c < p.chunks; ++c) {
    int32_t* q = p.counts + static_cast<int64_t>(c) * p.keys + key;
    const int v = *q;
    *q = run;
    run += v;
  }
  p.totals[key] = run;
}

__global__ void __launch_bounds__(kPlanScanThreads) sgmv_plan_scan_kernel(PlanArgs p) {
  __shared__ int s_sums[33];
  const int tid = static_cast<int>(threadIdx.x);
  const int per = (p.keys + kPlanScanThreads - 1) / kPlanScanThreads;
  const int k0 = tid * per < p.keys ? tid * per : p.keys;
  const int k1 = k0 + per < p.keys ? k0 + per : p.keys;
  int sum = 0, present = 0;
  for (int k = k0; k < k1; ++k) {
    const int v = p.totals[k];
    sum += v;
    present += (k < p.n_adapters && v > 0) ? 1 : 0;
  }
  int total_sum = 0, total_present = 0;
  int run = block_exclusive_scan(sum, s_sums, &total_sum);
  int seg = block_exclusive_scan(present, s_sums, &total_present);
  for (int k = k0; k < k1; ++k) {
    const int v = p.totals[k];
    p.key_start[k] = run;
    if (k < p.n_adapters && v > 0) {
      p.seg_starts[seg] = run;
      p.seg_adapter[seg] = k;
      ++seg;
    }
    run += v;
  }
  if (tid == 0) {
    *p.n_segments = total_present;
    p.seg_starts[total_present] = p.tokens - p.totals[p.n_adapters];
  }
}

__global__ void __launch_bounds__(kPlanWarps * 32) sgmv_plan_scatter_kernel(PlanArgs p) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int c = static_cast<int>(blockIdx.x) * kPlanWarps + (static_cast<int>(threadIdx.x) >> 5);
  if (c >= p.chunks) return;
  int32_t* cur = p.counts + static_cast<int64_t>(c) * p.keys;
  const int begin = c * kPlanChunk;
  const int end = begin + kPlanChunk < p.tokens ? begin + kPlanChunk : p.tokens;
  for (int base = begin; base < end; base += 32) {
    const int i = base + lane;
    const bool valid = i < end;
    const int key = plan_key(p, i, valid, false);
    const unsigned peers = plan_peers(key, valid, p.key_bits);
    int pos = 0;
    if (valid) pos = p.key_start[key] + cur[key] + popc32(peers & ((1u << lane) - 1u));
    __syncwarp();
    if (valid) {
      p.row_index[pos] = i;
      if ((peers & ((~0u << lane) << 1)) == 0u) cur[key] += popc32(peers);
    }
    __syncwarp();
  }
}

/* ------------------------------------------------------------------------------------------------
 * Host launch helpers. */
static int sgmv_check_common(const char* name, int tokens, int max_segments, int n_adapters, int n_slices,
                             int r_cap, const void* seg_starts, const void* seg_adapter, const void* n_segments,
                             const void* table, const void* workspace) {
  if (tokens < 0 || max_segments < 0 || n_adapters < 0 || r_cap < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: negative size (tokens %d, max_segments %d, n_adapters %d, r_cap %d)", name, tokens,
                     max_segments, n_adapters, r_cap);
  }
  if (n_slices < 1 || n_slices > LK_MAX_SLICES) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: n_slices %d outside [1, %d]", name, n_slices, LK_MAX_SLICES);
  }
  if (seg_starts == nullptr || seg_adapter == nullptr || n_segments == nullptr || workspace == nullptr ||
      (table == nullptr && n_adapters > 0)) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: null pointer (seg_starts %p, seg_adapter %p, n_segments %p, table %p, workspace %p)", name,
                     seg_starts, seg_adapter, n_segments, table, workspace);
  }
  return 0;
}

static int sgmv_launch_validate(const SgmvGeometry& g, const SegArgs& s, const int32_t* row_index, int max_segments,
                                void* workspace, void* stream) {
  uint32_t* verdict = static_cast<uint32_t*>(workspace);
  int32_t* prefix = reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + g.prefix_off);
  return launch(sgmv_validate_kernel, dim3(static_cast<unsigned>(g.verdicts)), dim3(kValidateThreads), 0, stream,
                row_index, s.seg_starts, s.seg_adapter, s.n_segments, verdict, prefix, s.error_word, s.tokens,
                max_segments, s.n_adapters, g.rows_per_block);
}

template <typename P>
static SegArgs sgmv_seg_args(const P& p, const SgmvGeometry& g) {
  SegArgs s;
  s.row_index = p.row_index;
  s.seg_starts = p.seg_starts;
  s.seg_adapter = p.seg_adapter;
  s.n_segments = p.n_segments;
  s.verdict = static_cast<const uint32_t*>(p.workspace);
  s.tile_prefix = reinterpret_cast<const int32_t*>(static_cast<const char*>(p.workspace) + g.prefix_off);
  s.table = p.table;
  s.error_word = p.error_word;
  s.tokens = p.tokens;
  s.n_verdicts = g.verdicts;
  s.n_adapters = p.n_adapters;
  s.n_slices = p.n_slices;
  s.r_cap = p.r_cap;
  return s;
}

static size_t shrink_workspace_bytes(const LkSgmvShrinkParams& p) {
  const SgmvGeometry g = sgmv_geometry(p.tokens, p.max_segments, p.row_index != nullptr);
  const int d_in = p.d_in > 0 ? p.d_in : 0;
  const int splits = shrink_splits(d_in);
  size_t bytes = g.bytes;
  if (splits > 1 && p.tokens > 0 && p.r_cap > 0) {
    bytes += static_cast<size_t>(splits) * static_cast<size_t>(p.n_slices > 0 ? p.n_slices : 0) *
             static_cast<size_t>(p.tokens) * static_cast<size_t>(p.r_cap) * sizeof(float);
  }
  return bytes;
}

template <typename TX, typename TW>
static int launch_sgmv_shrink(const LkSgmvShrinkParams& p, const SgmvGeometry& g, void* stream) {
  ShrinkArgs a;
  a.seg = sgmv_seg_args(p, g);
  a.x = p.x;
  a.u = p.u;
  a.part = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + g.part_off);
  a.ld_x = p.ld_x;
  a.d_in = p.d_in;
  a.splits = shrink_splits(p.d_in);
  a.chunk = shrink_chunk(p.d_in, a.splits);
  a.rank_groups = p.r_cap > 0 ? (p.r_cap + kShrinkBN - 1) / kShrinkBN : 1;
  a.x_vec_ok = (reinterpret_cast<uintptr_t>(p.x) & 15u) == 0 && (p.ld_x * static_cast<int64_t>(sizeof(TX))) % 16 == 0;
  a.drop_seed = p.dropout_seed;
  for (int i = 0; i < LK_MAX_SLICES; ++i) a.drop_offset[i] = p.dropout_offset[i];
  a.drop_threshold = p.dropout_threshold;
  a.drop_keep_scale = p.dropout_keep_scale;
  const int64_t gx = g.tiles * a.splits;
  const int64_t gy = static_cast<int64_t>(p.n_slices) * a.rank_groups;
  if (gx > 0x7fffffffLL || gy > 65535) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_shrink: grid too large (%lld x %lld)", static_cast<long long>(gx),
                     static_cast<long long>(gy));
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  int err;
  if constexpr (IsF32<TW>::value) {
    err = launch(sgmv_shrink_fma_kernel, grid, dim3(kThreads), 0, stream, a);
  } else {
    err = launch(sgmv_shrink_tc_kernel<TX, TW>, grid, dim3(kThreads), 0, stream, a);
  }
  if (err != 0 || a.splits == 1) return err;
  return launch(sgmv_shrink_reduce_kernel, dim3(static_cast<unsigned>(g.tiles), static_cast<unsigned>(p.n_slices)),
                dim3(256), 0, stream, a);
}

template <typename TO, typename TW>
static int launch_sgmv_expand(const LkSgmvExpandParams& p, const SgmvGeometry& g, int col_tiles, void* stream) {
  ExpandArgs a;
  a.seg = sgmv_seg_args(p, g);
  a.u = p.u;
  a.out = p.out;
  a.ld_out = p.ld_out;
  a.mode = p.mode;
  int run = 0;
  for (int s = 0; s < LK_MAX_SLICES; ++s) {
    const bool used = s < p.n_slices;
    a.slice_n[s] = used ? p.slices[s].n : 0;
    a.slice_off[s] = used ? p.slices[s].offset : 0;
    a.col_tile_start[s] = run;
    if (used) run += (p.slices[s].n + kExpandBN - 1) / kExpandBN;
  }
  a.col_tile_start[LK_MAX_SLICES] = run;
  const dim3 grid(static_cast<unsigned>(g.tiles), static_cast<unsigned>(col_tiles));
  if constexpr (IsF32<TW>::value) {
    return launch(sgmv_expand_fma_kernel, grid, dim3(kThreads), 0, stream, a);
  } else {
    return launch(sgmv_expand_tc_kernel<TO, TW>, grid, dim3(kThreads), 0, stream, a);
  }
}

struct PlanLayout {
  int chunks;
  int64_t keys;
  size_t counts_off, totals_off, starts_off, bytes;
};

static PlanLayout plan_layout(int tokens, int n_adapters) {
  PlanLayout l;
  l.chunks = tokens > 0 ? (tokens + kPlanChunk - 1) / kPlanChunk : 0;
  l.keys = static_cast<int64_t>(n_adapters > 0 ? n_adapters : 0) + 1;
  const size_t kb = static_cast<size_t>(l.keys) * sizeof(int32_t);
  l.counts_off = 0;
  l.totals_off = align_up(static_cast<size_t>(l.chunks) * kb, 256);
  l.starts_off = align_up(l.totals_off + kb, 256);
  l.bytes = align_up(l.starts_off + kb, 256);
  return l;
}

LK_NAMESPACE_END

/* ------------------------------------------------------------------------------------------------
 * C ABI. */
extern "C" size_t LK_SYMBOL(sgmv_shrink_workspace_size)(const LkSgmvShrinkParams* p) {
  using namespace lk::LK_NS;
  if (p == nullptr) return 0;
  return shrink_workspace_bytes(*p);
}

extern "C" size_t LK_SYMBOL(sgmv_expand_workspace_size)(const LkSgmvExpandParams* p) {
  using namespace lk::LK_NS;
  if (p == nullptr) return 0;
  return sgmv_geometry(p->tokens, p->max_segments, p->row_index != nullptr).bytes;
}

extern "C" size_t LK_SYMBOL(sgmv_plan_workspace_size)(const LkSgmvPlanParams* p) {
  using namespace lk::LK_NS;
  if (p == nullptr) return 0;
  return plan_layout(p->tokens, p->n_adapters).bytes;
}

extern "C" int LK_SYMBOL(sgmv_shrink)(const LkSgmvShrinkParams* p, void* stream) {
  using namespace lk::LK_NS;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_shrink: params is null");
  if (int e = sgmv_check_common("sgmv_shrink", p->tokens, p->max_segments, p->n_adapters, p->n_slices, p->r_cap,
                                p->seg_starts, p->seg_adapter, p->n_segments, p->table, p->workspace))
    return e;
  if (p->d_in < 0) return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_shrink: negative d_in %d", p->d_in);
  if (p->dropout_threshold != 0u && !(p->dropout_keep_scale >= 0.0f && p->dropout_keep_scale <= 3.0e38f)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_shrink: dropout_keep_scale %g is not finite and >= 0",
                     static_cast<double>(p->dropout_keep_scale));
  }
  if (p->ld_x < p->d_in) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_shrink: ld_x %lld < d_in %d", static_cast<long long>(p->ld_x),
                     p->d_in);
  }
  if (p->tokens > 0 && (p->u == nullptr || (p->d_in > 0 && p->x == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_shrink: null pointer (x %p, u %p)", p->x,
                     static_cast<const void*>(p->u));
  }
  const bool ok_dtype = (p->w_dtype == LK_F32 && p->x_dtype == LK_F32) ||
                        ((p->w_dtype == LK_F16 || p->w_dtype == LK_BF16) &&
                         (p->x_dtype == p->w_dtype || p->x_dtype == LK_F32));
  if (!ok_dtype) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE,
                     "sgmv_shrink: x dtype %d with weight dtype %d (x must be the weights' dtype or f32; "
                     "0 = f32, 1 = f16, 2 = bf16)",
                     p->x_dtype, p->w_dtype);
  }
  const SgmvGeometry g = sgmv_geometry(p->tokens, p->max_segments, p->row_index != nullptr);
  const SegArgs s = sgmv_seg_args(*p, g);
  if (int e = sgmv_launch_validate(g, s, p->row_index, p->max_segments, p->workspace, stream)) return e;
  if (p->tokens == 0 || g.tiles == 0 || p->n_adapters == 0) return 0;
  switch (p->w_dtype) {
    case LK_F32:
      return launch_sgmv_shrink<float, float>(*p, g, stream);
    case LK_F16:
      if (p->x_dtype == LK_F16) return launch_sgmv_shrink<__half, __half>(*p, g, stream);
      return launch_sgmv_shrink<float, __half>(*p, g, stream);
    default:
      if (p->x_dtype == LK_BF16) return launch_sgmv_shrink<__nv_bfloat16, __nv_bfloat16>(*p, g, stream);
      return launch_sgmv_shrink<float, __nv_bfloat16>(*p, g, stream);
  }
}

extern "C" int LK_SYMBOL(sgmv_expand)(const LkSgmvExpandParams* p, void* stream) {
  using namespace lk::LK_NS;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_expand: params is null");
  if (int e = sgmv_check_common("sgmv_expand", p->tokens, p->max_segments, p->n_adapters, p->n_slices, p->r_cap,
                                p->seg_starts, p->seg_adapter, p->n_segments, p->table, p->workspace))
    return e;
  if (p->mode != LK_EXPAND_ADD && p->mode != LK_EXPAND_OVERWRITE) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_expand: mode %d is neither LK_EXPAND_ADD nor LK_EXPAND_OVERWRITE",
                     p->mode);
  }
  int64_t col_tiles = 0;
  for (int s = 0; s < p->n_slices; ++s) {
    const LkSlice sl = p->slices[s];
    if (sl.n < 0 || sl.offset < 0 || static_cast<int64_t>(sl.offset) + sl.n > p->ld_out) {
      return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_expand: slice %d (n %d, offset %d) outside ld_out %lld", s, sl.n,
                       sl.offset, static_cast<long long>(p->ld_out));
    }
    col_tiles += (sl.n + kExpandBN - 1) / kExpandBN;
  }
  if (col_tiles > 65535) return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_expand: too many column tiles (%lld)",
                                          static_cast<long long>(col_tiles));
  if (p->tokens > 0 && col_tiles > 0 && (p->out == nullptr || (p->r_cap > 0 && p->u == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_expand: null pointer (u %p, out %p)",
                     static_cast<const void*>(p->u), p->out);
  }
  const bool ok_dtype = (p->w_dtype == LK_F32 && p->out_dtype == LK_F32) ||
                        ((p->w_dtype == LK_F16 || p->w_dtype == LK_BF16) &&
                         (p->out_dtype == p->w_dtype || p->out_dtype == LK_F32));
  if (!ok_dtype) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE,
                     "sgmv_expand: out dtype %d with weight dtype %d (out must be the weights' dtype or f32; "
                     "0 = f32, 1 = f16, 2 = bf16)",
                     p->out_dtype, p->w_dtype);
  }
  const SgmvGeometry g = sgmv_geometry(p->tokens, p->max_segments, p->row_index != nullptr);
  const SegArgs s = sgmv_seg_args(*p, g);
  if (int e = sgmv_launch_validate(g, s, p->row_index, p->max_segments, p->workspace, stream)) return e;
  if (p->tokens == 0 || g.tiles == 0 || col_tiles == 0 || p->n_adapters == 0) return 0;
  const int ct = static_cast<int>(col_tiles);
  switch (p->w_dtype) {
    case LK_F32:
      return launch_sgmv_expand<float, float>(*p, g, ct, stream);
    case LK_F16:
      if (p->out_dtype == LK_F16) return launch_sgmv_expand<__half, __half>(*p, g, ct, stream);
      return launch_sgmv_expand<float, __half>(*p, g, ct, stream);
    default:
      if (p->out_dtype == LK_BF16) return launch_sgmv_expand<__nv_bfloat16, __nv_bfloat16>(*p, g, ct, stream);
      return launch_sgmv_expand<float, __nv_bfloat16>(*p, g, ct, stream);
  }
}

extern "C" int LK_SYMBOL(sgmv_plan)(const LkSgmvPlanParams* p, void* stream) {
  using namespace lk::LK_NS;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_plan: params is null");
  if (p->tokens < 0 || p->n_adapters < 0 || p->max_segments < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_plan: negative size (tokens %d, n_adapters %d, max_segments %d)",
                     p->tokens, p->n_adapters, p->max_segments);
  }
  const int need = p->tokens < p->n_adapters ? p->tokens : p->n_adapters;
  if (p->max_segments < need) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_plan: max_segments %d < min(tokens %d, n_adapters %d)",
                     p->max_segments, p->tokens, p->n_adapters);
  }
  if (p->n_adapters == 0x7fffffff) return set_error(LK_ERR_INVALID_ARGUMENT, "sgmv_plan: n_adapters too large");
  if (p->seg_starts == nullptr || p->seg_adapter == nullptr || p->n_segments == nullptr || p->workspace == nullptr ||
      (p->tokens > 0 && (p->token_adapter == nullptr || p->row_index == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "sgmv_plan: null pointer (token_adapter %p, row_index %p, seg_starts %p, seg_adapter %p, "
                     "n_segments %p, workspace %p)",
                     static_cast<const void*>(p->token_adapter), static_cast<const void*>(p->row_index),
                     static_cast<const void*>(p->seg_starts), static_cast<const void*>(p->seg_adapter),
                     static_cast<const void*>(p->n_segments), p->workspace);
  }
  const PlanLayout l = plan_layout(p->tokens, p->n_adapters);
  PlanArgs a;
  a.token_adapter = p->token_adapter;
  a.row_index = p->row_index;
  a.seg_starts = p->seg_starts;
  a.seg_adapter = p->seg_adapter;
  a.n_segments = p->n_segments;
  a.error_word = p->error_word;
  char* ws = static_cast<char*>(p->workspace);
  a.counts = reinterpret_cast<int32_t*>(ws + l.counts_off);
  a.totals = reinterpret_cast<int32_t*>(ws + l.totals_off);
  a.key_start = reinterpret_cast<int32_t*>(ws + l.starts_off);
  a.tokens = p->tokens;
  a.n_adapters = p->n_adapters;
  a.keys = static_cast<int>(l.keys);
  a.chunks = l.chunks;
  int bits = 1;
  while (bits < 31 && (static_cast<int64_t>(1) << bits) <= p->n_adapters) ++bits;
  a.key_bits = bits;
  const unsigned warp_blocks = static_cast<unsigned>((l.chunks + kPlanWarps - 1) / kPlanWarps);
  if (l.chunks > 0) {
    if (int e = launch(sgmv_plan_count_kernel, dim3(warp_blocks), dim3(kPlanWarps * 32), 0, stream, a)) return e;
  }
  const unsigned key_blocks = static_cast<unsigned>((l.keys + kPlanPrefixThreads - 1) / kPlanPrefixThreads);
  if (int e = launch(sgmv_plan_prefix_kernel, dim3(key_blocks), dim3(kPlanPrefixThreads), 0, stream, a)) return e;
  if (int e = launch(sgmv_plan_scan_kernel, dim3(1), dim3(kPlanScanThreads), 0, stream, a)) return e;
  if (l.chunks > 0) {
    if (int e = launch(sgmv_plan_scatter_kernel, dim3(warp_blocks), dim3(kPlanWarps * 32), 0, stream, a)) return e;
  }
  return 0;
}
