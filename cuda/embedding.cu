/*
 * embedding.cu — token embedding forward and deterministic backward (contract: lora_kernels.h,
 * "embedding").
 *
 *   forward:  out[t, :] = table[ids[t], :]
 *   backward: d_table[v, :] = Σ_{t : ids[t] = v} d_out[t, :], summed in ascending t in f32 (0 if unused)
 * Layout: ids int32 [tokens] (device-resident), table / d_table [vocab, dim], out / d_out [tokens, dim],
 * packed row-major, one dtype (f32, f16, bf16). An id outside [0, vocab) is skipped (forward: row
 * untouched; backward: contributes nothing) and LK_FAULT_INDEX is OR-ed into *fault (null = no reporting).
 * Vector access: groups of VEC = 16 / sizeof(T) columns as one 16-byte load/store when dim % VEC == 0
 * and the row arrays are 16-byte aligned; otherwise VEC = 1.
 *
 * Forward: one thread per (token, column group), grid-stride, 256-thread blocks; consecutive threads
 * take consecutive groups of a row (coalesced). Each token has ≥ 1 item so a bad id is reported even
 * when dim = 0 (by its group-0 thread: one atomicOr per bad token).
 *
 * Backward (no float atomics; every order fixed):
 *  1. A stable LSD radix sort of (key, t) pairs, key = ids[t] if valid else vocab (a sentinel that
 *     sorts last), 8 bits per pass, passes = ⌈bits(vocab)/8⌉ ≥ 1 (3 for a 128K vocabulary). Keys are
 *     cut into tiles of 256 (one per thread of a 256-thread block). Per pass:
 *       hist:    block = tile: digit counts (shared-memory integer atomics: exact) → hist[digit][tile]
 *                (pass 0 also reports bad ids);
 *       scan:    one 1024-thread block turns hist (256 · tiles entries, digit-major) into exclusive
 *                offsets;
 *       scatter: each key goes to offset[digit][tile] + its stable rank in the tile: lanes with the
 *                same digit found with 9 ballots (8 digit bits + validity), rank in warp = popcount of
 *                the lower matching lanes, plus the counts of that digit in the lower warps of the tile.
 *     Stable, so within one id the tokens stay in ascending t; integer-only, so the permutation is the
 *     same under every schedule.
 *  2. One warp per (vocab row, chunk of 32·VEC columns), grid-stride: binary search of the sorted keys
 *     for the row's segment, then every lane sums its VEC columns over the segment's tokens in sorted
 *     (ascending t) order — 8 (f32) or 4 (f16/bf16) token rows loaded ahead, added in order — and stores
 *     them (0 if empty).
 *     A segment is one warp's serial work: an id repeated L times costs ~L/8 (16-bit types: L/4) memory
 *     round trips per chunk (a very common token in a huge batch is the slow case; the order is the
 *     contract).
 * Workspace (bytes, 16-aligned pieces): keys and values twice (ping-pong) 4 · 4 · tokens, plus the
 * histogram 4 · 256 · ⌈tokens/256⌉: ≈ 20 · tokens bytes (0 when tokens = 0).
 *
 * Napkin (H200 ~4.8 TB/s; Llama-3-8B: vocab 128256, dim 4096, 8192 tokens, bf16): the d_table write
 * dominates, 1 GiB → ~220 µs (it is an overwrite of the whole table, as the contract says); d_out read
 * once (64 MiB). The sort moves 3 passes × ~100 KiB: microseconds, launch-bound (9 small launches).
 * The forward is a gather: 2 · tokens · dim · sizeof(T) bytes (128 MiB → ~28 µs).
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN

constexpr int kEmbThreads = 256;
constexpr int kEmbTile = 256;  // keys per sort tile = threads per sort block
constexpr int kEmbWarps = kEmbThreads / 32;
constexpr int kEmbScanThreads = 1024;
constexpr int64_t kEmbMaxBlocks = 1 << 16;

template <class T, int VEC>
struct __align__(16) EmbPack {
  T v[VEC];
};
template <class T>
struct EmbPack<T, 1> {
  T v[1];
};

__device__ __forceinline__ int popcount32(uint32_t v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  v = (v + (v >> 4)) & 0x0f0f0f0fu;
  return static_cast<int>((v * 0x01010101u) >> 24);
}

/* ------------------------------------------------------------------------------------------------
 * Forward. */
template <class T, int VEC>
__global__ void __launch_bounds__(kEmbThreads)
    embedding_forward_kernel(const int32_t* __restrict__ ids, const T* __restrict__ table, T* __restrict__ out,
                             uint32_t* __restrict__ fault, int32_t vocab, int32_t dim, int32_t tokens) {
  using P = EmbPack<T, VEC>;
  const int groups = dim / VEC > 0 ? dim / VEC : 1;
  const int64_t items = static_cast<int64_t>(tokens) * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kEmbThreads;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kEmbThreads + threadIdx.x; it < items; it += stride) {
    const int64_t t = it / groups;
    const int g = static_cast<int>(it - t * groups);
    const int32_t id = ids[t];
    if (id < 0 || id >= vocab) {
      if (g == 0 && fault != nullptr) atomicOr(fault, static_cast<uint32_t>(LK_FAULT_INDEX));
      continue;
    }
    if (static_cast<int64_t>(g) * VEC >= dim) continue;  // dim = 0
    const int64_t off = static_cast<int64_t>(g) * VEC;
    *reinterpret_cast<P*>(out + t * dim + off) =
        *reinterpret_cast<const P*>(table + static_cast<int64_t>(id) * dim + off);
  }
}

/* ------------------------------------------------------------------------------------------------
 * Backward: the stable radix sort. */
struct EmbLayout {
  size_t keys_a, vals_a, keys_b, vals_b, hist, bytes;
  int64_t tiles;
  int passes;
};

inline size_t emb_align16(size_t v) { return (v + 15) / 16 * 16; }

inline EmbLayout emb_layout(int32_t vocab, int32_t tokens) {
  EmbLayout l;
  l.tiles = (static_cast<int64_t>(tokens) + kEmbTile - 1) / kEmbTile;
  int bits = 0;
  while (bits < 32 && (static_cast<uint32_t>(vocab) >> bits) != 0) ++bits;  // bits of the sentinel
  l.passes = bits > 0 ? (bits + 7) / 8 : 1;
  const size_t n = static_cast<size_t>(tokens) * sizeof(uint32_t);
  l.keys_a = 0;
  l.vals_a = emb_align16(l.keys_a + n);
  l.keys_b = emb_align16(l.vals_a + n);
  l.vals_b = emb_align16(l.keys_b + n);
  l.hist = emb_align16(l.vals_b + n);
  l.bytes = tokens > 0 ? emb_align16(l.hist + static_cast<size_t>(256) * l.tiles * sizeof(uint32_t)) : 0;
  return l;
}

/* Key of token t in pass 0 (from ids) or later passes (from the previous pass's output). */
__device__ __forceinline__ uint32_t emb_key0(const int32_t* ids, int64_t t, int32_t vocab) {
  const int32_t id = ids[t];
  return (id >= 0 && id < vocab) ? static_cast<uint32_t>(id) : static_cast<uint32_t>(vocab);
}

template <bool kFirst>
__global__ void __launch_bounds__(kEmbTile)
    embedding_sort_hist_kernel(const int32_t* __restrict__ ids, const uint32_t* __restrict__ keys_in,
                               uint32_t* __restrict__ hist, uint32_t* __restrict__ fault, int32_t vocab,
                               int32_t tokens, int64_t tiles, int shift) {
  __shared__ uint32_t cnt[256];
  const int tid = static_cast<int>(threadIdx.x);
  cnt[tid] = 0u;
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kEmbTile + tid;
  if (t < tokens) {
    uint32_t key;
    if (kFirst) {
      key = emb_key0(ids, t, vocab);
      if (key == static_cast<uint32_t>(vocab) && fault != nullptr) {
        atomicOr(fault, static_cast<uint32_t>(LK_FAULT_INDEX));
      }
    } else {
      key = keys_in[t];
    }
    atomicAdd(&cnt[(key >> shift) & 255u], 1u);
  }
  __syncthreads();
  hist[static_cast<int64_t>(tid) * tiles + blockIdx.x] = cnt[tid];
}

/* Exclusive prefix sum of hist[0 .. n) in place, one block. */
__global__ void __launch_bounds__(kEmbScanThreads) embedding_sort_scan_kernel(uint32_t* __restrict__ hist, int64_t n) {
  __shared__ uint32_t sums[kEmbScanThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t per = (n + kEmbScanThreads - 1) / kEmbScanThreads;
  const int64_t lo = tid * per < n ? tid * per : n;
  const int64_t hi = lo + per < n ? lo + per : n;
  uint32_t s = 0;
  for (int64_t i = lo; i < hi; ++i) s += hist[i];
  sums[tid] = s;
  __syncthreads();
  // Hillis–Steele inclusive scan of the 1024 chunk sums.
  for (int o = 1; o < kEmbScanThreads; o *= 2) {
    const uint32_t add = tid >= o ? sums[tid - o] : 0u;
    __syncthreads();
    sums[tid] += add;
    __syncthreads();
  }
  uint32_t run = tid > 0 ? sums[tid - 1] : 0u;
  for (int64_t i = lo; i < hi; ++i) {
    const uint32_t v = hist[i];
    hist[i] = run;
    run += v;
  }
}

template <bool kFirst>
__global__ void __launch_bounds__(kEmbTile)
    embedding_sort_scatter_kernel(const int32_t* __restrict__ ids, const uint32_t* __restrict__ keys_in,
                                  const uint32_t* __restrict__ vals_in, const uint32_t* __restrict__ offsets,
                                  uint32_t* __restrict__ keys_out, uint32_t* __restrict__ vals_out, int32_t vocab,
                                  int32_t tokens, int64_t tiles, int shift) {
  __shared__ uint32_t wcnt[kEmbWarps][256];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  for (int i = tid; i < kEmbWarps * 256; i += kEmbTile) wcnt[i / 256][i % 256] = 0u;
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kEmbTile + tid;
  const bool valid = t < tokens;
  uint32_t key = 0u, val = 0u;
  if (valid) {
    key = kFirst ? emb_key0(ids, t, vocab) : keys_in[t];
    val = kFirst ? static_cast<uint32_t>(t) : vals_in[t];
  }
  const uint32_t digit = (key >> shift) & 255u;
  uint32_t match = __ballot_sync(0xffffffffu, valid);
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    const uint32_t bit = (digit >> b) & 1u;
    const uint32_t vote = __ballot_sync(0xffffffffu, bit != 0u);
    match &= bit != 0u ? vote : ~vote;
  }
  const uint32_t lower = match & ((1u << lane) - 1u);
  if (valid && lower == 0u) wcnt[warp][digit] = static_cast<uint32_t>(popcount32(match));  // first lane of its digit
  __syncthreads();
  if (valid) {
    uint32_t rank = static_cast<uint32_t>(popcount32(lower));
    for (int w = 0; w < warp; ++w) rank += wcnt[w][digit];
    const uint32_t pos = offsets[static_cast<int64_t>(digit) * tiles + blockIdx.x] + rank;
    keys_out[pos] = key;
    vals_out[pos] = val;
  }
}

/* ------------------------------------------------------------------------------------------------
 * Backward: per (vocab row, 32·VEC-column chunk) sums in sorted order. */

template <class T, int VEC>
__global__ void __launch_bounds__(kEmbThreads)
    embedding_rows_kernel(const uint32_t* __restrict__ keys, const uint32_t* __restrict__ vals,
                          const T* __restrict__ d_out, T* __restrict__ d_table, int32_t vocab, int32_t dim,
                          int32_t tokens) {
  using P = EmbPack<T, VEC>;
  constexpr int kEmbUnroll = VEC >= 8 ? 4 : 8;  // token rows loaded ahead of the (in-order) adds: 64 B
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int groups = dim / VEC;
  const int chunks = (groups + 31) / 32;
  const int64_t items = static_cast<int64_t>(vocab) * chunks;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kEmbWarps;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kEmbWarps + threadIdx.x / 32; w < items; w += stride) {
    const int64_t v = w / chunks;
    const int g = static_cast<int>(w - v * chunks) * 32 + lane;
    if (g >= groups) continue;
    // [lo, end): the sorted positions whose key is v.
    int64_t lo = 0, hi = tokens;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (keys[mid] < static_cast<uint32_t>(v)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    int64_t end = lo, top = tokens;
    while (end < top) {
      const int64_t mid = (end + top) / 2;
      if (keys[mid] <= static_cast<uint32_t>(v)) {
        end = mid + 1;
      } else {
        top = mid;
      }
    }
    const int64_t off = static_cast<int64_t>(g) * VEC;
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
    int64_t i = lo;
    for (; i + kEmbUnroll <= end; i += kEmbUnroll) {
      P src[kEmbUnroll];
#pragma unroll
      for (int u = 0; u < kEmbUnroll; ++u) {
        src[u] = *reinterpret_cast<const P*>(d_out + static_cast<int64_t>(vals[i + u]) * dim + off);
      }
#pragma unroll
      for (int u = 0; u < kEmbUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += to_f32(src[u].v[k]);
      }
    }
    for (; i < end; ++i) {
      const P src = *reinterpret_cast<const P*>(d_out + static_cast<int64_t>(vals[i]) * dim + off);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += to_f32(src.v[k]);
    }
    P o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_f32<T>(acc[k]);
    *reinterpret_cast<P*>(d_table + v * dim + off) = o;
  }
}

/* ------------------------------------------------------------------------------------------------
 * Launchers. */
inline bool emb_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <class T, int VEC>
int launch_forward(const LkEmbeddingForwardParams& p, void* stream) {
  const int groups = p.dim / VEC > 0 ? p.dim / VEC : 1;
  int64_t blocks = (static_cast<int64_t>(p.tokens) * groups + kEmbThreads - 1) / kEmbThreads;
  if (blocks > kEmbMaxBlocks) blocks = kEmbMaxBlocks;
  return launch(embedding_forward_kernel<T, VEC>, dim3(static_cast<unsigned>(blocks)), dim3(kEmbThreads), 0, stream,
                p.ids, static_cast<const T*>(p.table), static_cast<T*>(p.out), p.fault, p.vocab, p.dim, p.tokens);
}

template <class T>
int forward_dtype(const LkEmbeddingForwardParams& p, void* stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (p.dim % kVec == 0 && emb_aligned16(p.table) && emb_aligned16(p.out)) return launch_forward<T, kVec>(p, stream);
  return launch_forward<T, 1>(p, stream);
}

template <class T, int VEC>
int launch_rows(const LkEmbeddingBackwardParams& p, const uint32_t* keys, const uint32_t* vals, void* stream) {
  const int64_t chunks = (p.dim / VEC + 31) / 32;
  int64_t blocks = (static_cast<int64_t>(p.vocab) * chunks + kEmbWarps - 1) / kEmbWarps;
  if (blocks > kEmbMaxBlocks) blocks = kEmbMaxBlocks;
  if (blocks == 0) return 0;
  return launch(embedding_rows_kernel<T, VEC>, dim3(static_cast<unsigned>(blocks)), dim3(kEmbThreads), 0, stream,
                keys, vals, static_cast<const T*>(p.d_out), static_cast<T*>(p.d_table), p.vocab, p.dim, p.tokens);
}

template <class T>
int backward_dtype(const LkEmbeddingBackwardParams& p, void* stream) {
  const EmbLayout l = emb_layout(p.vocab, p.tokens);
  char* ws = static_cast<char*>(p.workspace);
  uint32_t* keys[2] = {nullptr, nullptr};
  uint32_t* vals[2] = {nullptr, nullptr};
  int cur = 0;
  if (p.tokens > 0) {
    keys[0] = reinterpret_cast<uint32_t*>(ws + l.keys_a);
    vals[0] = reinterpret_cast<uint32_t*>(ws + l.vals_a);
    keys[1] = reinterpret_cast<uint32_t*>(ws + l.keys_b);
    vals[1] = reinterpret_cast<uint32_t*>(ws + l.vals_b);
    uint32_t* hist = reinterpret_cast<uint32_t*>(ws + l.hist);
    const dim3 grid(static_cast<unsigned>(l.tiles));
    const int64_t n_hist = 256 * l.tiles;
    for (int pass = 0; pass < l.passes; ++pass) {
      const int shift = 8 * pass;
      const int src = (pass + 1) % 2;  // pass 0 reads ids and writes buffer 0
      const int dst = pass % 2;
      int rc = pass == 0 ? launch(embedding_sort_hist_kernel<true>, grid, dim3(kEmbTile), 0, stream, p.ids,
                                  static_cast<const uint32_t*>(nullptr), hist, p.fault, p.vocab, p.tokens, l.tiles,
                                  shift)
                         : launch(embedding_sort_hist_kernel<false>, grid, dim3(kEmbTile), 0, stream, p.ids,
                                  static_cast<const uint32_t*>(keys[src]), hist,
                                  static_cast<uint32_t*>(nullptr), p.vocab, p.tokens, l.tiles, shift);
      if (rc != 0) return rc;
      rc = launch(embedding_sort_scan_kernel, dim3(1), dim3(kEmbScanThreads), 0, stream, hist, n_hist);
      if (rc != 0) return rc;
      rc = pass == 0 ? launch(embedding_sort_scatter_kernel<true>, grid, dim3(kEmbTile), 0, stream, p.ids,
                              static_cast<const uint32_t*>(nullptr), static_cast<const uint32_t*>(nullptr),
                              static_cast<const uint32_t*>(hist), keys[dst], vals[dst], p.vocab, p.tokens, l.tiles,
                              shift)
                     : launch(embedding_sort_scatter_kernel<false>, grid, dim3(kEmbTile), 0, stream, p.ids,
                              static_cast<const uint32_t*>(keys[src]), static_cast<const uint32_t*>(vals[src]),
                              static_cast<const uint32_t*>(hist), keys[dst], vals[dst], p.vocab, p.tokens, l.tiles,
                              shift);
      if (rc != 0) return rc;
      cur = dst;
    }
  }
  if (p.dim == 0) return 0;
  constexpr int kVec = 16 / sizeof(T);
  if (p.dim % kVec == 0 && emb_aligned16(p.d_out) && emb_aligned16(p.d_table)) {
    return launch_rows<T, kVec>(p, keys[cur], vals[cur], stream);
  }
  return launch_rows<T, 1>(p, keys[cur], vals[cur], stream);
}

inline int check_sizes(const char* op, int32_t vocab, int32_t dim, int32_t tokens) {
  if (vocab < 0 || dim < 0 || tokens < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative size (vocab %d, dim %d, tokens %d)", op, vocab, dim,
                     tokens);
  }
  return 0;
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(embedding_forward)(const LkEmbeddingForwardParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "embedding_forward";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (const int rc = check_sizes(op, p->vocab, p->dim, p->tokens)) return rc;
  if (p->tokens == 0) return 0;
  if (p->ids == nullptr || (p->dim > 0 && (p->out == nullptr || (p->vocab > 0 && p->table == nullptr)))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer (ids %p, table %p, out %p)", op,
                     static_cast<const void*>(p->ids), p->table, p->out);
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

extern "C" size_t LK_SYMBOL(embedding_backward_workspace_size)(const LkEmbeddingBackwardParams* p) {
  if (p == nullptr || p->vocab < 0 || p->dim < 0 || p->tokens < 0) return 0;
  return lk::LK_NS::emb_layout(p->vocab, p->tokens).bytes;
}

extern "C" int LK_SYMBOL(embedding_backward)(const LkEmbeddingBackwardParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "embedding_backward";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (const int rc = check_sizes(op, p->vocab, p->dim, p->tokens)) return rc;
  if (p->tokens == 0 && (p->vocab == 0 || p->dim == 0)) return 0;
  const bool rows = p->vocab > 0 && p->dim > 0;
  if ((p->tokens > 0 && (p->ids == nullptr || p->workspace == nullptr)) ||
      (rows && (p->d_table == nullptr || (p->tokens > 0 && p->d_out == nullptr)))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer (ids %p, d_out %p, d_table %p, workspace %p needing %zu)",
                     op, static_cast<const void*>(p->ids), p->d_out, p->d_table, p->workspace,
                     emb_layout(p->vocab, p->tokens).bytes);
  }
  if (p->tokens > 0 && (reinterpret_cast<uintptr_t>(p->workspace) & 3u) != 0) {
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
