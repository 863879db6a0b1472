/*
 * attention.cu — causal attention over packed variable-length sequences with grouped KV heads
 * (forward + deterministic backward, flash-attention style), the KV-cache write and single-token
 * decode over the cache (flash-decoding). Header: cuda/lora_kernels.h, section "attention".
 *
 * Layout. q [tokens, n_heads·HD], k, v [tokens, n_kv_heads·HD] (row-major, packed: the q/k/v
 * projection outputs), head h uses kv head h / G (G = n_heads / n_kv_heads); sequence i is rows
 * [s_i, s_{i+1}) of seq_starts (device int32, validated on the device: see seq_range below). Storage
 * T ∈ {f32, f16, bf16}, every tile converted to f32 in shared memory; compute and accumulate f32
 * (f32 inputs get no TF32: the demo trains in f32 and wants ~1e-6 relative accuracy).
 *
 * 1. attention_forward: one CTA (256 threads = a 16×16 thread grid) per (query block of BQ = 64 rows,
 *    head, sequence); grid.x = q-blocks × sequences with the heaviest (last) query blocks first, grid.y
 *    = heads. Q tile stays in smem; key blocks of BK rows (64, or 32 for HD = 128 to keep 2 CTAs/SM)
 *    are streamed through smem up to the diagonal. Thread (rg, cg) owns the S micro-tile rows
 *    rg·4 + i (i < 4) × keys cg + 16·j (j < BK/16) and the O micro-tile rows rg·4 + i × HD/16
 *    columns. Online softmax in the exp2 domain (score · scale · log2 e): running max per row
 *    (16-lane xor butterfly), per-thread partial sums combined once at the end by a fixed butterfly,
 *    P through smem for O += P·V. out = O / l, lse = (m + log2 l) · ln 2. No T×T matrix in global.
 *    smem tiles are row-major with a +4 float pad: 128-bit reads of the "column" operand (16
 *    consecutive rows, one per lane) hit distinct banks, the "row" operand is a broadcast.
 *    Napkin (H200, f32 SIMT, 67 TFLOP/s FMA peak): 8 seqs × 512 tokens, 32 heads, HD 128:
 *    4·(512²/2)·128·32·8 ≈ 17 GFLOP → ~0.4 ms at 60 % of peak; per 4-wide k step a warp issues 12
 *    smem wavefronts for 64 FMA instructions (≥ 4:1, so FMA-bound rather than smem-bound).
 * 2. attention_backward: (a) D = rowsum(dO ∘ O), one warp per (token, head) → workspace f32
 *    [tokens, n_heads]; (b) dq: one CTA per (query block, head, sequence): per key block recompute
 *    S = Q·Kᵀ, P = exp2(S·c − lse·log2 e), dP = dO·Vᵀ, dS = P ∘ (dP − D), dq += dS·K (key blocks in
 *    increasing order); (c) dk/dv: one CTA per (key block of 64, kv head, sequence): for each of the
 *    G query heads of the group in increasing order, for each query block from the diagonal on,
 *    Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dv += Pᵀ·dO, dk += dSᵀ·Q. Every accumulator is one thread's register
 *    in a fixed loop order: no atomics, bit-identical run to run. Napkin: 2.5× the forward's FLOPs.
 * 3. kv_cache_write: one 128-thread block per token row, 16-byte vectors when aligned; a slot outside
 *    [0, cache_rows) skips the row + LK_FAULT_INDEX. Memory-bound: 2·tokens·kv_dim·sizeof(T) bytes.
 * 4. attention_decode: keys split in fixed chunks of 256 (flash-decoding); one 128-thread CTA per
 *    (chunk, kv head × group slice of ≤ 8 query heads, sequence): scores (a thread per key, q of
 *    the slice in smem, pre-scaled by scale·log2 e), per-head max/exp/sum (a warp per head), P·V (a
 *    thread per column, keys split over 128/HD thread groups, summed in fixed order). One chunk →
 *    out directly; more → (m, l, o) partials in the workspace and a combine kernel (per (sequence,
 *    head), splits in increasing order; identical arithmetic for one split, so a sequence's bits
 *    never depend on max_kv_len or the batch). Memory-bound: reads K and V of the range once per
 *    group slice (once for G ≤ 8): Llama-3-8B (8 kv heads, HD 128, bf16), 64 seqs × 4096 keys →
 *    1 GiB → ~0.25 ms at 4.3 TB/s.
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN

constexpr int kAttnThreads = 256; /* 16 × 16 thread grid */
constexpr int kPad = 4;           /* smem row pad (floats): 16-byte rows, conflict-free 128-bit reads */
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kDecodeChunk = 256;
constexpr int kDecodeThreads = 128;
constexpr int kDecodeHeads = 8; /* query heads per decode CTA */

__device__ __forceinline__ float neg_inf() { return -__builtin_huge_valf(); }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

/* Tile sizes per head dim: (forward / dq) query rows, key rows; (dk/dv) key rows, query rows. */
template <int HD>
struct Tiles {
  static constexpr int BQ = 64;
  static constexpr int BK = HD == 128 ? 32 : 64;
  static constexpr int KV_BK = 64;
  static constexpr int KV_BQ = HD == 128 ? 32 : 64;
  static constexpr int L = HD + kPad;        /* row stride of Q/K/V/dO tiles */
  static constexpr int VEC = HD >= 64 ? 4 : 1; /* O/dq/dk/dv columns: float4 groups or strided */
  static constexpr int OC = HD / 16;           /* output columns per thread */
};

struct alignas(16) F4 {
  float v[4];
};
__device__ __forceinline__ F4 lds4(const float* p) {
  F4 r;
  memcpy(&r, __builtin_assume_aligned(static_cast<const void*>(p), 16), sizeof r);
  return r;
}
__device__ __forceinline__ void sts4(float* p, const F4& r) {
  memcpy(__builtin_assume_aligned(static_cast<void*>(p), 16), &r, sizeof r);
}

/* Output column of a thread's c-th column (c < HD/16) for thread column cg. */
template <int HD>
__device__ __forceinline__ int out_col(int c, int cg) {
  constexpr int V = Tiles<HD>::VEC;
  return (c / V) * (16 * V) + cg * V + (c % V);
}

/* dst[r][0..HD) (row stride HD + kPad) = r < nvalid ? src[row0 + r][0..HD) : 0, for r < R.
 * src rows have stride ld elements; vec: src, ld and the column offset allow 16-byte vectors. */
template <typename T, int HD>
__device__ __forceinline__ void load_tile(float* dst, int R, const T* src, int64_t ld, int64_t row0, int nvalid,
                                          bool vec) {
  constexpr int L = HD + kPad;
  if (vec) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    constexpr int VPR = HD / V;
    for (int e = static_cast<int>(threadIdx.x); e < R * VPR; e += kAttnThreads) {
      const int r = e / VPR;
      const int c = (e % VPR) * V;
      float* d = dst + r * L + c;
      if (r < nvalid) {
        T t[V];
        memcpy(t, __builtin_assume_aligned(static_cast<const void*>(src + (row0 + r) * ld + c), 16), 16);
#pragma unroll
        for (int i = 0; i < V; i += 4) {
          F4 f;
#pragma unroll
          for (int u = 0; u < 4; ++u) f.v[u] = to_f32(t[i + u]);
          sts4(d + i, f);
        }
      } else {
#pragma unroll
        for (int i = 0; i < V; i += 4) sts4(d + i, F4{{0.0f, 0.0f, 0.0f, 0.0f}});
      }
    }
  } else {
    for (int e = static_cast<int>(threadIdx.x); e < R * HD; e += kAttnThreads) {
      const int r = e / HD;
      const int c = e % HD;
      dst[r * L + c] = r < nvalid ? to_f32(src[(row0 + r) * ld + c]) : 0.0f;
    }
  }
}

/* acc[i][j] += Σ_d A[i·L + d] · B[j·16·L + d], d < K: A = rows of the thread's row group (a
 * broadcast), B = rows cg + 16·j (distinct banks per quarter warp thanks to the pad). */
template <int RM, int CN, int K, int L>
__device__ __forceinline__ void mm_nt(float (&acc)[RM][CN], const float* A, const float* B) {
#pragma unroll 1
  for (int d = 0; d < K; d += 4) {
    F4 a[RM], b[CN];
#pragma unroll
    for (int i = 0; i < RM; ++i) a[i] = lds4(A + i * L + d);
#pragma unroll
    for (int j = 0; j < CN; ++j) b[j] = lds4(B + j * 16 * L + d);
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < CN; ++j)
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[i][j] = fmaf(a[i].v[u], b[j].v[u], acc[i][j]);
  }
}

/* acc[i][c] += Σ_j P[i·LP + j] · V[j·LV + out_col(c)], j < NK (P rows: the thread's row group). */
template <int RM, int HD, int NK, int LP, int LV>
__device__ __forceinline__ void mm_nn(float (&acc)[RM][HD / 16], const float* P, const float* V, int cg) {
  constexpr int OC = HD / 16;
  constexpr int VEC = Tiles<HD>::VEC;
#pragma unroll 1
  for (int j = 0; j < NK; j += 4) {
    F4 p[RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) p[i] = lds4(P + i * LP + j);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float v[OC];
      const float* vr = V + (j + u) * LV;
      if constexpr (VEC == 4) {
#pragma unroll
        for (int c4 = 0; c4 < OC / 4; ++c4) {
          const F4 t = lds4(vr + c4 * 64 + cg * 4);
#pragma unroll
          for (int w = 0; w < 4; ++w) v[c4 * 4 + w] = t.v[w];
        }
      } else {
#pragma unroll
        for (int c = 0; c < OC; ++c) v[c] = vr[c * 16 + cg];
      }
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int c = 0; c < OC; ++c) acc[i][c] = fmaf(p[i].v[u], v[c], acc[i][c]);
    }
  }
}

/* Max / sum over the 16 lanes of a row group (lanes differing in bits 0..3): a fixed butterfly. */
__device__ __forceinline__ float row_max16(float x) {
#pragma unroll
  for (int o = 8; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float row_sum16(float x) {
#pragma unroll
  for (int o = 8; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

struct SeqRange {
  int64_t start;
  int len;
  bool ok;
};

/* Sequence s of seq_starts is valid iff 0 <= s_0 <= s_1 <= ... <= s_{s+1} <= tokens and
 * s_{s+1} − s_s <= max_len (the whole prefix non-decreasing: valid sequences never overlap). Called
 * by every thread with all lanes of each warp active (a warp-wide vote); no barrier. */
__device__ __forceinline__ SeqRange seq_range(const int32_t* starts, int s, int tokens, int max_len) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  bool ok = true;
  for (int base = 0; base <= s; base += 32) {
    const int k = base + lane;
    if (k <= s && starts[k] > starts[k + 1]) ok = false;
  }
  ok = __all_sync(0xffffffffu, ok) != 0;
  const int64_t a = starts[s];
  const int64_t b = starts[s + 1];
  ok = ok && starts[0] >= 0 && b <= tokens && b - a <= max_len;
  SeqRange r;
  r.start = a;
  r.len = ok ? static_cast<int>(b - a) : 0;
  r.ok = ok;
  return r;
}

/* The reporting CTA flags an invalid sequence; CTA (0, 0) also flags s_0 != 0 or s_n != tokens. */
__device__ __forceinline__ void report_seq(const SeqRange& r, bool reporter, const int32_t* starts, int n_seqs,
                                           int tokens, uint32_t* fault) {
  if (fault == nullptr || threadIdx.x != 0) return;
  if (reporter && !r.ok) atomicOr(fault, static_cast<unsigned>(LK_FAULT_INDEX));
  if (blockIdx.x == 0 && blockIdx.y == 0 && (starts[0] != 0 || starts[n_seqs] != tokens)) {
    atomicOr(fault, static_cast<unsigned>(LK_FAULT_INDEX));
  }
}

struct AttnDims {
  const int32_t* seq_starts;
  uint32_t* fault;
  float scale;
  int tokens;
  int n_seqs;
  int max_len;
  int n_heads;
  int n_kv_heads;
  int n_blocks; /* blocks per sequence along grid.x */
  int vec;      /* 16-byte global vectors allowed */
};

/* ------------------------------------------------------------------------------------------------
 * Forward. */
template <typename T, int HD>
__global__ void __launch_bounds__(kAttnThreads, 2)
    attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                    float* __restrict__ lse, AttnDims dm) {
  using Tl = Tiles<HD>;
  constexpr int BQ = Tl::BQ, BK = Tl::BK, L = Tl::L, OC = Tl::OC;
  constexpr int RM = BQ / 16, CN = BK / 16, LP = BK + kPad;
  LK_DYNAMIC_SMEM(float, smem);
  float* qs = smem;
  float* ks = qs + BQ * L;
  float* vs = ks + BK * L;
  float* ps = vs + BK * L;

  const int seq = static_cast<int>(blockIdx.x % static_cast<unsigned>(dm.n_seqs));
  const int qb = dm.n_blocks - 1 - static_cast<int>(blockIdx.x / static_cast<unsigned>(dm.n_seqs));
  const int h = static_cast<int>(blockIdx.y);
  const int kh = h / (dm.n_heads / dm.n_kv_heads);
  const SeqRange sr = seq_range(dm.seq_starts, seq, dm.tokens, dm.max_len);
  report_seq(sr, qb == 0 && h == 0, dm.seq_starts, dm.n_seqs, dm.tokens, dm.fault);
  const int q0 = qb * BQ;
  if (!sr.ok || q0 >= sr.len) return;
  const int nq = imin(BQ, sr.len - q0);
  const int64_t ldq = static_cast<int64_t>(dm.n_heads) * HD;
  const int64_t ldk = static_cast<int64_t>(dm.n_kv_heads) * HD;
  const int tid = static_cast<int>(threadIdx.x);
  const int rg = tid / 16, cg = tid % 16;
  const float c = dm.scale * kLog2e;

  load_tile<T, HD>(qs, BQ, q + h * HD, ldq, sr.start + q0, nq, dm.vec != 0);
  float m[RM], l[RM], o[RM][OC];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    m[i] = neg_inf();
    l[i] = 0.0f;
#pragma unroll
    for (int cc = 0; cc < OC; ++cc) o[i][cc] = 0.0f;
  }
  const int kend = q0 + nq; /* causal: keys < the block's last row + 1 (<= len) */
  for (int k0 = 0; k0 < kend; k0 += BK) {
    const int nk = imin(BK, sr.len - k0);
    __syncthreads(); /* the previous K/V/P tiles are consumed */
    load_tile<T, HD>(ks, BK, k + kh * HD, ldk, sr.start + k0, nk, dm.vec != 0);
    load_tile<T, HD>(vs, BK, v + kh * HD, ldk, sr.start + k0, nk, dm.vec != 0);
    __syncthreads();
    float s[RM][CN];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < CN; ++j) s[i][j] = 0.0f;
    mm_nt<RM, CN, HD, L>(s, qs + rg * RM * L, ks + cg * L);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int row = q0 + rg * RM + i;
      float mx = neg_inf();
#pragma unroll
      for (int j = 0; j < CN; ++j) {
        const int col = k0 + cg + 16 * j;
        s[i][j] = (col <= row && col < sr.len) ? s[i][j] * c : neg_inf();
        mx = fmaxf(mx, s[i][j]);
      }
      const float m_new = fmaxf(m[i], row_max16(mx));
      const float m_use = m_new == neg_inf() ? 0.0f : m_new;
      const float alpha = exp2f(m[i] - m_use);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < CN; ++j) {
        const float p = exp2f(s[i][j] - m_use);
        sum += p;
        ps[(rg * RM + i) * LP + cg + 16 * j] = p;
      }
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
#pragma unroll
      for (int cc = 0; cc < OC; ++cc) o[i][cc] *= alpha;
    }
    __syncthreads();
    mm_nn<RM, HD, BK, LP, L>(o, ps + rg * RM * LP, vs, cg);
  }
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const float lt = row_sum16(l[i]);
    const int r = rg * RM + i;
    if (r < nq) {
      const int64_t t = sr.start + q0 + r;
      const float inv = 1.0f / lt;
#pragma unroll
      for (int cc = 0; cc < OC; ++cc) out[t * ldq + h * HD + out_col<HD>(cc, cg)] = from_f32<T>(o[i][cc] * inv);
      if (cg == 0) lse[t * dm.n_heads + h] = (m[i] + log2f(lt)) * kLn2;
    }
  }
}

/* ------------------------------------------------------------------------------------------------
 * Backward: D = rowsum(dO ∘ O). One warp per (token, head) row, grid-stride. */
template <typename T, int HD>
__global__ void __launch_bounds__(kAttnThreads)
    attn_bwd_dot_kernel(const T* __restrict__ d_out, const T* __restrict__ out, float* __restrict__ dsum,
                        int64_t rows) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kAttnThreads / 32);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (kAttnThreads / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    const T* a = d_out + r * HD;
    const T* b = out + r * HD;
    float s = 0.0f;
#pragma unroll
    for (int c = lane; c < HD; c += 32) s = fmaf(to_f32(a[c]), to_f32(b[c]), s);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) dsum[r] = s;
  }
}

/* dq: one CTA per (query block, head, sequence), key blocks in increasing order. */
template <typename T, int HD>
__global__ void __launch_bounds__(kAttnThreads, 2)
    attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ d_out, const float* __restrict__ lse, const float* __restrict__ dsum,
                       T* __restrict__ dq, AttnDims dm) {
  using Tl = Tiles<HD>;
  constexpr int BQ = Tl::BQ, BK = Tl::BK, L = Tl::L, OC = Tl::OC;
  constexpr int RM = BQ / 16, CN = BK / 16, LP = BK + kPad;
  LK_DYNAMIC_SMEM(float, smem);
  float* qs = smem;
  float* dos = qs + BQ * L;
  float* ks = dos + BQ * L;
  float* vs = ks + BK * L;
  float* dss = vs + BK * L;

  const int seq = static_cast<int>(blockIdx.x % static_cast<unsigned>(dm.n_seqs));
  const int qb = dm.n_blocks - 1 - static_cast<int>(blockIdx.x / static_cast<unsigned>(dm.n_seqs));
  const int h = static_cast<int>(blockIdx.y);
  const int kh = h / (dm.n_heads / dm.n_kv_heads);
  const SeqRange sr = seq_range(dm.seq_starts, seq, dm.tokens, dm.max_len);
  report_seq(sr, qb == 0 && h == 0, dm.seq_starts, dm.n_seqs, dm.tokens, dm.fault);
  const int q0 = qb * BQ;
  if (!sr.ok || q0 >= sr.len) return;
  const int nq = imin(BQ, sr.len - q0);
  const int64_t ldq = static_cast<int64_t>(dm.n_heads) * HD;
  const int64_t ldk = static_cast<int64_t>(dm.n_kv_heads) * HD;
  const int tid = static_cast<int>(threadIdx.x);
  const int rg = tid / 16, cg = tid % 16;
  const float c = dm.scale * kLog2e;

  load_tile<T, HD>(qs, BQ, q + h * HD, ldq, sr.start + q0, nq, dm.vec != 0);
  load_tile<T, HD>(dos, BQ, d_out + h * HD, ldq, sr.start + q0, nq, dm.vec != 0);
  float lse2[RM], dr[RM], acc[RM][OC];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int r = rg * RM + i;
    const int64_t t = sr.start + q0 + r;
    lse2[i] = r < nq ? lse[t * dm.n_heads + h] * kLog2e : 0.0f;
    dr[i] = r < nq ? dsum[t * dm.n_heads + h] : 0.0f;
#pragma unroll
    for (int cc = 0; cc < OC; ++cc) acc[i][cc] = 0.0f;
  }
  const int kend = q0 + nq;
  for (int k0 = 0; k0 < kend; k0 += BK) {
    const int nk = imin(BK, sr.len - k0);
    __syncthreads();
    load_tile<T, HD>(ks, BK, k + kh * HD, ldk, sr.start + k0, nk, dm.vec != 0);
    load_tile<T, HD>(vs, BK, v + kh * HD, ldk, sr.start + k0, nk, dm.vec != 0);
    __syncthreads();
    float s[RM][CN], dp[RM][CN];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < CN; ++j) {
        s[i][j] = 0.0f;
        dp[i][j] = 0.0f;
      }
    mm_nt<RM, CN, HD, L>(s, qs + rg * RM * L, ks + cg * L);
    mm_nt<RM, CN, HD, L>(dp, dos + rg * RM * L, vs + cg * L);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int row = q0 + rg * RM + i;
#pragma unroll
      for (int j = 0; j < CN; ++j) {
        const int col = k0 + cg + 16 * j;
        const bool live = col <= row && col < sr.len && row < sr.len;
        const float p = live ? exp2f(s[i][j] * c - lse2[i]) : 0.0f;
        dss[(rg * RM + i) * LP + cg + 16 * j] = live ? p * (dp[i][j] - dr[i]) : 0.0f;
      }
    }
    __syncthreads();
    mm_nn<RM, HD, BK, LP, L>(acc, dss + rg * RM * LP, ks, cg);
  }
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int r = rg * RM + i;
    if (r < nq) {
      const int64_t t = sr.start + q0 + r;
#pragma unroll
      for (int cc = 0; cc < OC; ++cc) dq[t * ldq + h * HD + out_col<HD>(cc, cg)] = from_f32<T>(acc[i][cc] * dm.scale);
    }
  }
}

/* dk, dv: one CTA per (key block, kv head, sequence); the group's query heads in increasing order,
 * each over its query blocks from the diagonal on, in increasing order. */
template <typename T, int HD>
__global__ void __launch_bounds__(kAttnThreads, 2)
    attn_bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ d_out, const float* __restrict__ lse,
                         const float* __restrict__ dsum, T* __restrict__ dk, T* __restrict__ dv, AttnDims dm) {
  using Tl = Tiles<HD>;
  constexpr int BK = Tl::KV_BK, BQ = Tl::KV_BQ, L = Tl::L, OC = Tl::OC;
  constexpr int RM = BK / 16, CN = BQ / 16, LP = BQ + kPad;
  LK_DYNAMIC_SMEM(float, smem);
  float* ks = smem;
  float* vs = ks + BK * L;
  float* qs = vs + BK * L;
  float* dos = qs + BQ * L;
  float* pts = dos + BQ * L;
  float* dsts = pts + BK * LP;
  float* lse2s = dsts + BK * LP;
  float* ds_s = lse2s + BQ;

  const int seq = static_cast<int>(blockIdx.x % static_cast<unsigned>(dm.n_seqs));
  const int kb = static_cast<int>(blockIdx.x / static_cast<unsigned>(dm.n_seqs));
  const int kh = static_cast<int>(blockIdx.y);
  const int group = dm.n_heads / dm.n_kv_heads;
  const SeqRange sr = seq_range(dm.seq_starts, seq, dm.tokens, dm.max_len);
  const int k0 = kb * BK;
  if (!sr.ok || k0 >= sr.len) return;
  const int nk = imin(BK, sr.len - k0);
  const int64_t ldq = static_cast<int64_t>(dm.n_heads) * HD;
  const int64_t ldk = static_cast<int64_t>(dm.n_kv_heads) * HD;
  const int tid = static_cast<int>(threadIdx.x);
  const int rg = tid / 16, cg = tid % 16;
  const float c = dm.scale * kLog2e;

  load_tile<T, HD>(ks, BK, k + kh * HD, ldk, sr.start + k0, nk, dm.vec != 0);
  load_tile<T, HD>(vs, BK, v + kh * HD, ldk, sr.start + k0, nk, dm.vec != 0);
  float dka[RM][OC], dva[RM][OC];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int cc = 0; cc < OC; ++cc) {
      dka[i][cc] = 0.0f;
      dva[i][cc] = 0.0f;
    }
  for (int g = 0; g < group; ++g) {
    const int h = kh * group + g;
    for (int q0 = (k0 / BQ) * BQ; q0 < sr.len; q0 += BQ) {
      const int nq = imin(BQ, sr.len - q0);
      __syncthreads(); /* the previous Q/dO/Pᵀ/dSᵀ tiles are consumed (and K/V loaded) */
      load_tile<T, HD>(qs, BQ, q + h * HD, ldq, sr.start + q0, nq, dm.vec != 0);
      load_tile<T, HD>(dos, BQ, d_out + h * HD, ldq, sr.start + q0, nq, dm.vec != 0);
      for (int r = tid; r < BQ; r += kAttnThreads) {
        const int64_t t = sr.start + q0 + r;
        lse2s[r] = r < nq ? lse[t * dm.n_heads + h] * kLog2e : 0.0f;
        ds_s[r] = r < nq ? dsum[t * dm.n_heads + h] : 0.0f;
      }
      __syncthreads();
      /* Pᵀ first (stored), then dPᵀ: one RM×CN array live at a time; each thread re-reads only
       * the Pᵀ entries it wrote itself (no barrier needed in between). */
      float st[RM][CN];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CN; ++j) st[i][j] = 0.0f;
      mm_nt<RM, CN, HD, L>(st, ks + rg * RM * L, qs + cg * L);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int key = k0 + rg * RM + i;
#pragma unroll
        for (int j = 0; j < CN; ++j) {
          const int qr = cg + 16 * j;
          const int row = q0 + qr;
          const bool live = key <= row && row < sr.len && key < sr.len;
          pts[(rg * RM + i) * LP + qr] = live ? exp2f(st[i][j] * c - lse2s[qr]) : 0.0f;
        }
      }
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CN; ++j) st[i][j] = 0.0f;
      mm_nt<RM, CN, HD, L>(st, vs + rg * RM * L, dos + cg * L);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int key = k0 + rg * RM + i;
#pragma unroll
        for (int j = 0; j < CN; ++j) {
          const int qr = cg + 16 * j;
          const int row = q0 + qr;
          const bool live = key <= row && row < sr.len && key < sr.len;
          const int e = (rg * RM + i) * LP + qr;
          dsts[e] = live ? pts[e] * (st[i][j] - ds_s[qr]) : 0.0f;
        }
      }
      __syncthreads();
      mm_nn<RM, HD, BQ, LP, L>(dva, pts + rg * RM * LP, dos, cg);
      mm_nn<RM, HD, BQ, LP, L>(dka, dsts + rg * RM * LP, qs, cg);
    }
  }
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int r = rg * RM + i;
    if (r < nk) {
      const int64_t t = sr.start + k0 + r;
#pragma unroll
      for (int cc = 0; cc < OC; ++cc) {
        const int64_t e = t * ldk + kh * HD + out_col<HD>(cc, cg);
        dk[e] = from_f32<T>(dka[i][cc] * dm.scale);
        dv[e] = from_f32<T>(dva[i][cc]);
      }
    }
  }
}

/* ------------------------------------------------------------------------------------------------
 * KV-cache write: one block per token row. */
constexpr int kCacheThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kCacheThreads)
    kv_cache_write_kernel(const T* __restrict__ rows, const int32_t* __restrict__ slots, T* __restrict__ cache,
                          uint32_t* fault, int64_t cache_rows, int kv_dim, int vec) {
  const int64_t t = blockIdx.x;
  const int32_t slot = slots[t];
  if (slot < 0 || slot >= cache_rows) {
    if (threadIdx.x == 0 && fault != nullptr) atomicOr(fault, static_cast<unsigned>(LK_FAULT_INDEX));
    return;
  }
  const T* src = rows + t * kv_dim;
  T* dst = cache + static_cast<int64_t>(slot) * kv_dim;
  if (vec) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    for (int e = static_cast<int>(threadIdx.x) * V; e < kv_dim; e += kCacheThreads * V) {
      memcpy(__builtin_assume_aligned(static_cast<void*>(dst + e), 16),
             __builtin_assume_aligned(static_cast<const void*>(src + e), 16), 16);
    }
  } else {
    for (int e = static_cast<int>(threadIdx.x); e < kv_dim; e += kCacheThreads) dst[e] = src[e];
  }
}

/* ------------------------------------------------------------------------------------------------
 * Decode. */
struct DecodeDims {
  const int32_t* kv_start;
  const int32_t* kv_len;
  uint32_t* fault;
  float* ws_ml;  /* [n_seqs][n_heads][n_splits][2] (m, l), log2 domain */
  float* ws_o;   /* [n_seqs][n_heads][n_splits][HD] unnormalised */
  int64_t cache_rows;
  float scale;
  int n_seqs;
  int max_kv_len;
  int n_heads;
  int n_kv_heads;
  int n_splits;
  int head_slices; /* ceil(group / kDecodeHeads) */
  int vec;         /* k_cache 16-byte aligned: vector key loads */
};

struct KvRange {
  int64_t start;
  int len;
  bool ok;
};

__device__ __forceinline__ KvRange kv_range(const DecodeDims& dm, int seq) {
  const int64_t s = dm.kv_start[seq];
  const int64_t n = dm.kv_len[seq];
  KvRange r;
  r.ok = s >= 0 && n >= 0 && n <= dm.max_kv_len && s + n <= dm.cache_rows;
  r.start = s;
  r.len = r.ok ? static_cast<int>(n) : 0;
  return r;
}

template <typename T, int HD>
__global__ void __launch_bounds__(kDecodeThreads, 4)
    attn_decode_kernel(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                       T* __restrict__ out, DecodeDims dm) {
  constexpr int P = kDecodeThreads / HD; /* thread groups sharing a column in P·V */
  __shared__ __align__(16) float qs[kDecodeHeads][HD];
  __shared__ float ss[kDecodeHeads][kDecodeChunk];
  __shared__ float ml[kDecodeHeads][2];
  __shared__ float red[P][kDecodeHeads][HD];

  const int seq = static_cast<int>(blockIdx.x % static_cast<unsigned>(dm.n_seqs));
  const int split = static_cast<int>(blockIdx.x / static_cast<unsigned>(dm.n_seqs));
  const int group = dm.n_heads / dm.n_kv_heads;
  const int kh = static_cast<int>(blockIdx.y) / dm.head_slices;
  const int g0 = (static_cast<int>(blockIdx.y) % dm.head_slices) * kDecodeHeads;
  const int gh = imin(kDecodeHeads, group - g0);
  const int h0 = kh * group + g0;
  const int tid = static_cast<int>(threadIdx.x);
  const KvRange kr = kv_range(dm, seq);
  if (!kr.ok) {
    if (split == 0 && blockIdx.y == 0 && tid == 0 && dm.fault != nullptr) {
      atomicOr(dm.fault, static_cast<unsigned>(LK_FAULT_INDEX));
    }
    return;
  }
  const int64_t ldq = static_cast<int64_t>(dm.n_heads) * HD;
  const int64_t ldk = static_cast<int64_t>(dm.n_kv_heads) * HD;
  const int j0 = split * kDecodeChunk;
  if (kr.len == 0) {
    /* Zeros (one split writes them; with partials the combine kernel does). */
    if (split == 0 && dm.n_splits == 1) {
      for (int e = tid; e < gh * HD; e += kDecodeThreads) {
        out[seq * ldq + (h0 + e / HD) * HD + e % HD] = from_f32<T>(0.0f);
      }
    }
    return;
  }
  if (j0 >= kr.len) return;
  const int nk = imin(kDecodeChunk, kr.len - j0);
  const float c = dm.scale * kLog2e;
  for (int e = tid; e < kDecodeHeads * HD; e += kDecodeThreads) {
    const int g = e / HD;
    qs[g][e % HD] = g < gh ? to_f32(q[seq * ldq + (h0 + g) * HD + e % HD]) * c : 0.0f;
  }
  __syncthreads();
  /* Scores: a thread per key (16-byte loads of its row when aligned). */
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  for (int j = tid; j < kDecodeChunk; j += kDecodeThreads) {
    if (j < nk) {
      const T* krow = kc + (kr.start + j0 + j) * ldk + kh * HD;
      float acc[kDecodeHeads];
#pragma unroll
      for (int g = 0; g < kDecodeHeads; ++g) acc[g] = 0.0f;
      if (dm.vec) {
#pragma unroll 1
        for (int d = 0; d < HD; d += V) {
          T t[V];
          memcpy(t, __builtin_assume_aligned(static_cast<const void*>(krow + d), 16), 16);
#pragma unroll
          for (int u = 0; u < V; ++u) {
            const float kv = to_f32(t[u]);
#pragma unroll
            for (int g = 0; g < kDecodeHeads; ++g) acc[g] = fmaf(qs[g][d + u], kv, acc[g]);
          }
        }
      } else {
#pragma unroll 4
        for (int d = 0; d < HD; ++d) {
          const float kv = to_f32(krow[d]);
#pragma unroll
          for (int g = 0; g < kDecodeHeads; ++g) acc[g] = fmaf(qs[g][d], kv, acc[g]);
        }
      }
#pragma unroll
      for (int g = 0; g < kDecodeHeads; ++g) ss[g][j] = acc[g];
    } else {
#pragma unroll
      for (int g = 0; g < kDecodeHeads; ++g) ss[g][j] = neg_inf();
    }
  }
  __syncthreads();
  /* Per head: max, exp2, sum (a warp per head, lanes over keys in a fixed order + butterfly). */
  const int warp = tid / 32, lane = tid % 32;
  for (int g = warp; g < gh; g += kDecodeThreads / 32) {
    float mx = neg_inf();
    for (int j = lane; j < kDecodeChunk; j += 32) mx = fmaxf(mx, ss[g][j]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
    for (int j = lane; j < kDecodeChunk; j += 32) {
      const float p = exp2f(ss[g][j] - mx); /* masked: exp2(−inf) = 0 */
      ss[g][j] = p;
      sum += p;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) {
      ml[g][0] = mx;
      ml[g][1] = sum;
    }
  }
  __syncthreads();
  /* P·V: thread (part, col); keys part, part + P, … */
  const int col = tid % HD, part = tid / HD;
  float o[kDecodeHeads];
#pragma unroll
  for (int g = 0; g < kDecodeHeads; ++g) o[g] = 0.0f;
  for (int j = part; j < nk; j += P) {
    const float vv = to_f32(vc[(kr.start + j0 + j) * ldk + kh * HD + col]);
#pragma unroll
    for (int g = 0; g < kDecodeHeads; ++g) o[g] = fmaf(ss[g][j], vv, o[g]);
  }
#pragma unroll
  for (int g = 0; g < kDecodeHeads; ++g) red[part][g][col] = o[g];
  __syncthreads();
  if (part != 0) return;
  for (int g = 0; g < gh; ++g) {
    float acc = red[0][g][col];
#pragma unroll
    for (int pp = 1; pp < P; ++pp) acc += red[pp][g][col];
    const int h = h0 + g;
    if (dm.n_splits == 1) {
      out[seq * ldq + h * HD + col] = from_f32<T>(acc * (1.0f / ml[g][1]));
    } else {
      const int64_t slot = (static_cast<int64_t>(seq) * dm.n_heads + h) * dm.n_splits + split;
      dm.ws_o[slot * HD + col] = acc;
      if (col == 0) {
        dm.ws_ml[slot * 2] = ml[g][0];
        dm.ws_ml[slot * 2 + 1] = ml[g][1];
      }
    }
  }
}

/* Combine the splits of one (sequence, head): a thread per column, splits in increasing order. The
 * arithmetic for a single split is the direct path's: o · (1 / l). */
template <typename T, int HD>
__global__ void __launch_bounds__(HD) attn_decode_combine_kernel(T* __restrict__ out, DecodeDims dm) {
  const int seq = static_cast<int>(blockIdx.x);
  const int h = static_cast<int>(blockIdx.y);
  const int col = static_cast<int>(threadIdx.x);
  const KvRange kr = kv_range(dm, seq);
  if (!kr.ok) return;
  const int64_t ldq = static_cast<int64_t>(dm.n_heads) * HD;
  if (kr.len == 0) {
    out[seq * ldq + h * HD + col] = from_f32<T>(0.0f);
    return;
  }
  const int ns = (kr.len + kDecodeChunk - 1) / kDecodeChunk;
  const int64_t base = (static_cast<int64_t>(seq) * dm.n_heads + h) * dm.n_splits;
  float mx = neg_inf();
  for (int s = 0; s < ns; ++s) mx = fmaxf(mx, dm.ws_ml[(base + s) * 2]);
  float l = 0.0f, o = 0.0f;
  for (int s = 0; s < ns; ++s) {
    const float w = exp2f(dm.ws_ml[(base + s) * 2] - mx);
    l = fmaf(dm.ws_ml[(base + s) * 2 + 1], w, l);
    o = fmaf(dm.ws_o[(base + s) * HD + col], w, o);
  }
  out[seq * ldq + h * HD + col] = from_f32<T>(o * (1.0f / l));
}

/* ------------------------------------------------------------------------------------------------
 * Launchers. */
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline bool scale_ok(float s) {
  return s == s && s <= 3.40282346638528859811704183484516925e38f && s >= -3.40282346638528859811704183484516925e38f;
}

/* Shared checks of the head configuration; returns 0 or an error code. */
inline int check_heads(const char* op, int n_heads, int n_kv_heads, int head_dim, float scale) {
  if (head_dim != 16 && head_dim != 32 && head_dim != 64 && head_dim != 128) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: head_dim %d (supported: 16, 32, 64, 128)", op, head_dim);
  }
  if (n_kv_heads < 1 || n_heads < 1 || n_heads % n_kv_heads != 0 || n_heads > 65535) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "%s: n_heads %d must be a positive multiple of n_kv_heads %d (and <= 65535)", op, n_heads,
                     n_kv_heads);
  }
  if (!scale_ok(scale)) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: scale %g must be finite", op, double(scale));
  return 0;
}

inline int check_dtype(const char* op, int32_t dtype) {
  if (dtype == LK_F32 || dtype == LK_F16 || dtype == LK_BF16) return 0;
  return set_error(LK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d (0 = f32, 1 = f16, 2 = bf16)", op, dtype);
}

template <int HD>
constexpr size_t fwd_smem() {
  using Tl = Tiles<HD>;
  return sizeof(float) * static_cast<size_t>(Tl::BQ * Tl::L + 2 * Tl::BK * Tl::L + Tl::BQ * (Tl::BK + kPad));
}
template <int HD>
constexpr size_t dq_smem() {
  using Tl = Tiles<HD>;
  return sizeof(float) * static_cast<size_t>(2 * Tl::BQ * Tl::L + 2 * Tl::BK * Tl::L + Tl::BQ * (Tl::BK + kPad));
}
template <int HD>
constexpr size_t dkdv_smem() {
  using Tl = Tiles<HD>;
  return sizeof(float) *
         static_cast<size_t>(2 * Tl::KV_BK * Tl::L + 2 * Tl::KV_BQ * Tl::L + 2 * Tl::KV_BK * (Tl::KV_BQ + kPad) +
                             2 * Tl::KV_BQ);
}

template <typename T, int HD>
int forward_hd(const LkAttentionForwardParams& p, AttnDims dm, void* stream) {
  using Tl = Tiles<HD>;
  dm.n_blocks = (dm.max_len + Tl::BQ - 1) / Tl::BQ;
  if (dm.n_blocks < 1) dm.n_blocks = 1;
  const int64_t gx = static_cast<int64_t>(dm.n_blocks) * dm.n_seqs;
  if (gx > 2147483647LL) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "attention_forward: grid too large (%lld blocks)",
                     static_cast<long long>(gx));
  }
  constexpr size_t smem = fwd_smem<HD>();
  if (smem > 48 * 1024) {
    if (int e = set_max_dynamic_smem(attn_fwd_kernel<T, HD>, smem)) return e;
  }
  return launch(attn_fwd_kernel<T, HD>, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(p.n_heads)),
                dim3(kAttnThreads), smem, stream, static_cast<const T*>(p.q), static_cast<const T*>(p.k),
                static_cast<const T*>(p.v), static_cast<T*>(p.out), p.lse, dm);
}

template <typename T>
int forward_t(const LkAttentionForwardParams& p, const AttnDims& dm, void* stream) {
  switch (p.head_dim) {
    case 16:
      return forward_hd<T, 16>(p, dm, stream);
    case 32:
      return forward_hd<T, 32>(p, dm, stream);
    case 64:
      return forward_hd<T, 64>(p, dm, stream);
    default:
      return forward_hd<T, 128>(p, dm, stream);
  }
}

inline size_t align256(size_t v) { return (v + 255) / 256 * 256; }

template <typename T, int HD>
int backward_hd(const LkAttentionBackwardParams& p, AttnDims dm, void* stream) {
  using Tl = Tiles<HD>;
  float* dsum = static_cast<float*>(p.workspace);
  const int64_t rows = static_cast<int64_t>(p.tokens) * p.n_heads;
  int64_t dot_blocks = (rows + kAttnThreads / 32 - 1) / (kAttnThreads / 32);
  if (dot_blocks > 65536) dot_blocks = 65536;
  if (int e = launch(attn_bwd_dot_kernel<T, HD>, dim3(static_cast<unsigned>(dot_blocks)), dim3(kAttnThreads), 0,
                     stream, static_cast<const T*>(p.d_out), static_cast<const T*>(p.out), dsum, rows)) {
    return e;
  }
  AttnDims dq_dm = dm;
  dq_dm.n_blocks = (dm.max_len + Tl::BQ - 1) / Tl::BQ;
  if (dq_dm.n_blocks < 1) dq_dm.n_blocks = 1;
  AttnDims kv_dm = dm;
  kv_dm.n_blocks = (dm.max_len + Tl::KV_BK - 1) / Tl::KV_BK;
  if (kv_dm.n_blocks < 1) kv_dm.n_blocks = 1;
  const int64_t gq = static_cast<int64_t>(dq_dm.n_blocks) * dm.n_seqs;
  const int64_t gk = static_cast<int64_t>(kv_dm.n_blocks) * dm.n_seqs;
  if (gq > 2147483647LL || gk > 2147483647LL) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "attention_backward: grid too large (%lld blocks)",
                     static_cast<long long>(gq));
  }
  constexpr size_t smem_q = dq_smem<HD>();
  constexpr size_t smem_kv = dkdv_smem<HD>();
  if (smem_q > 48 * 1024) {
    if (int e = set_max_dynamic_smem(attn_bwd_dq_kernel<T, HD>, smem_q)) return e;
  }
  if (smem_kv > 48 * 1024) {
    if (int e = set_max_dynamic_smem(attn_bwd_dkdv_kernel<T, HD>, smem_kv)) return e;
  }
  if (int e = launch(attn_bwd_dq_kernel<T, HD>, dim3(static_cast<unsigned>(gq), static_cast<unsigned>(p.n_heads)),
                     dim3(kAttnThreads), smem_q, stream, static_cast<const T*>(p.q), static_cast<const T*>(p.k),
                     static_cast<const T*>(p.v), static_cast<const T*>(p.d_out), p.lse,
                     static_cast<const float*>(dsum), static_cast<T*>(p.dq), dq_dm)) {
    return e;
  }
  return launch(attn_bwd_dkdv_kernel<T, HD>, dim3(static_cast<unsigned>(gk), static_cast<unsigned>(p.n_kv_heads)),
                dim3(kAttnThreads), smem_kv, stream, static_cast<const T*>(p.q), static_cast<const T*>(p.k),
                static_cast<const T*>(p.v), static_cast<const T*>(p.d_out), p.lse, static_cast<const float*>(dsum),
                static_cast<T*>(p.dk), static_cast<T*>(p.dv), kv_dm);
}

template <typename T>
int backward_t(const LkAttentionBackwardParams& p, const AttnDims& dm, void* stream) {
  switch (p.head_dim) {
    case 16:
      return backward_hd<T, 16>(p, dm, stream);
    case 32:
      return backward_hd<T, 32>(p, dm, stream);
    case 64:
      return backward_hd<T, 64>(p, dm, stream);
    default:
      return backward_hd<T, 128>(p, dm, stream);
  }
}

template <typename T>
int kv_cache_write_t(const LkKvCacheWriteParams& p, void* stream) {
  const bool vec = aligned16(p.rows) && aligned16(p.cache) && (p.kv_dim * sizeof(T)) % 16 == 0;
  return launch(kv_cache_write_kernel<T>, dim3(static_cast<unsigned>(p.tokens)), dim3(kCacheThreads), 0, stream,
                static_cast<const T*>(p.rows), p.slots, static_cast<T*>(p.cache), p.fault, p.cache_rows, p.kv_dim,
                vec ? 1 : 0);
}

inline int64_t decode_splits(int max_kv_len) {
  const int64_t s = (static_cast<int64_t>(max_kv_len) + kDecodeChunk - 1) / kDecodeChunk;
  return s < 1 ? 1 : s;
}

inline size_t decode_ml_bytes(const LkAttentionDecodeParams& p) {
  return align256(static_cast<size_t>(p.n_seqs) * static_cast<size_t>(p.n_heads) *
                  static_cast<size_t>(decode_splits(p.max_kv_len)) * 2 * sizeof(float));
}

template <typename T, int HD>
int decode_hd(const LkAttentionDecodeParams& p, DecodeDims dm, void* stream) {
  const int64_t gx = dm.n_splits * static_cast<int64_t>(dm.n_seqs);
  const int64_t gy = static_cast<int64_t>(dm.n_kv_heads) * dm.head_slices;
  if (gx > 2147483647LL || gy > 65535) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "attention_decode: grid too large (%lld × %lld)",
                     static_cast<long long>(gx), static_cast<long long>(gy));
  }
  if (int e = launch(attn_decode_kernel<T, HD>, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                     dim3(kDecodeThreads), 0, stream, static_cast<const T*>(p.q), static_cast<const T*>(p.k_cache),
                     static_cast<const T*>(p.v_cache), static_cast<T*>(p.out), dm)) {
    return e;
  }
  if (dm.n_splits == 1) return 0;
  if (dm.n_seqs > 2147483647 || dm.n_heads > 65535) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "attention_decode: grid too large");
  }
  return launch(attn_decode_combine_kernel<T, HD>,
                dim3(static_cast<unsigned>(dm.n_seqs), static_cast<unsigned>(dm.n_heads)), dim3(HD), 0, stream,
                static_cast<T*>(p.out), dm);
}

template <typename T>
int decode_t(const LkAttentionDecodeParams& p, const DecodeDims& dm, void* stream) {
  switch (p.head_dim) {
    case 16:
      return decode_hd<T, 16>(p, dm, stream);
    case 32:
      return decode_hd<T, 32>(p, dm, stream);
    case 64:
      return decode_hd<T, 64>(p, dm, stream);
    default:
      return decode_hd<T, 128>(p, dm, stream);
  }
}

LK_NAMESPACE_END

/* ------------------------------------------------------------------------------------------------
 * C entry points. */
extern "C" size_t LK_SYMBOL(attention_backward_workspace_size)(const LkAttentionBackwardParams* p) {
  using namespace lk::LK_NS;
  if (p == nullptr || p->tokens <= 0 || p->n_heads <= 0) return 0;
  return align256(static_cast<size_t>(p->tokens) * static_cast<size_t>(p->n_heads) * sizeof(float));
}

extern "C" size_t LK_SYMBOL(attention_decode_workspace_size)(const LkAttentionDecodeParams* p) {
  using namespace lk::LK_NS;
  if (p == nullptr || p->n_seqs <= 0 || p->n_heads <= 0 || p->head_dim <= 0 || p->max_kv_len < 0) return 0;
  const int64_t splits = decode_splits(p->max_kv_len);
  if (splits <= 1) return 0;
  return decode_ml_bytes(*p) + static_cast<size_t>(p->n_seqs) * static_cast<size_t>(p->n_heads) *
                                   static_cast<size_t>(splits) * static_cast<size_t>(p->head_dim) * sizeof(float);
}

extern "C" int LK_SYMBOL(attention_forward)(const LkAttentionForwardParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "attention_forward";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (int e = check_heads(op, p->n_heads, p->n_kv_heads, p->head_dim, p->scale)) return e;
  if (p->tokens < 0 || p->n_seqs < 0 || p->max_seq_len < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative size (tokens %d, n_seqs %d, max_seq_len %d)", op,
                     p->tokens, p->n_seqs, p->max_seq_len);
  }
  if (int e = check_dtype(op, p->dtype)) return e;
  if (p->tokens == 0 || p->n_seqs == 0) return 0;
  if (p->q == nullptr || p->k == nullptr || p->v == nullptr || p->out == nullptr || p->lse == nullptr ||
      p->seq_starts == nullptr) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer", op);
  }
  AttnDims dm;
  dm.seq_starts = p->seq_starts;
  dm.fault = p->fault;
  dm.scale = p->scale;
  dm.tokens = p->tokens;
  dm.n_seqs = p->n_seqs;
  dm.max_len = p->max_seq_len < p->tokens ? p->max_seq_len : p->tokens;
  dm.n_heads = p->n_heads;
  dm.n_kv_heads = p->n_kv_heads;
  dm.n_blocks = 1;
  dm.vec = aligned16(p->q) && aligned16(p->k) && aligned16(p->v);
  switch (p->dtype) {
    case LK_F32:
      return forward_t<float>(*p, dm, stream);
    case LK_F16:
      return forward_t<__half>(*p, dm, stream);
    default:
      return forward_t<__nv_bfloat16>(*p, dm, stream);
  }
}

extern "C" int LK_SYMBOL(attention_backward)(const LkAttentionBackwardParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "attention_backward";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (int e = check_heads(op, p->n_heads, p->n_kv_heads, p->head_dim, p->scale)) return e;
  if (p->tokens < 0 || p->n_seqs < 0 || p->max_seq_len < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative size (tokens %d, n_seqs %d, max_seq_len %d)", op,
                     p->tokens, p->n_seqs, p->max_seq_len);
  }
  if (int e = check_dtype(op, p->dtype)) return e;
  if (p->tokens == 0 || p->n_seqs == 0) return 0;
  if (p->q == nullptr || p->k == nullptr || p->v == nullptr || p->out == nullptr || p->lse == nullptr ||
      p->d_out == nullptr || p->dq == nullptr || p->dk == nullptr || p->dv == nullptr || p->seq_starts == nullptr) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer", op);
  }
  if (p->workspace == nullptr || !aligned16(p->workspace)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: workspace %p must be non-null and 16-byte aligned", op,
                     p->workspace);
  }
  AttnDims dm;
  dm.seq_starts = p->seq_starts;
  dm.fault = p->fault;
  dm.scale = p->scale;
  dm.tokens = p->tokens;
  dm.n_seqs = p->n_seqs;
  dm.max_len = p->max_seq_len < p->tokens ? p->max_seq_len : p->tokens;
  dm.n_heads = p->n_heads;
  dm.n_kv_heads = p->n_kv_heads;
  dm.n_blocks = 1;
  dm.vec = aligned16(p->q) && aligned16(p->k) && aligned16(p->v) && aligned16(p->d_out);
  switch (p->dtype) {
    case LK_F32:
      return backward_t<float>(*p, dm, stream);
    case LK_F16:
      return backward_t<__half>(*p, dm, stream);
    default:
      return backward_t<__nv_bfloat16>(*p, dm, stream);
  }
}

extern "C" int LK_SYMBOL(attention_kv_cache_write)(const LkKvCacheWriteParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "attention_kv_cache_write";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (p->tokens < 0 || p->kv_dim < 1 || p->cache_rows < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: bad size (tokens %d, kv_dim %d >= 1, cache_rows %lld)", op,
                     p->tokens, p->kv_dim, static_cast<long long>(p->cache_rows));
  }
  if (int e = check_dtype(op, p->dtype)) return e;
  if (p->tokens == 0) return 0;
  if (p->rows == nullptr || p->slots == nullptr || (p->cache == nullptr && p->cache_rows > 0)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer", op);
  }
  switch (p->dtype) {
    case LK_F32:
      return kv_cache_write_t<float>(*p, stream);
    case LK_F16:
      return kv_cache_write_t<__half>(*p, stream);
    default:
      return kv_cache_write_t<__nv_bfloat16>(*p, stream);
  }
}

extern "C" int LK_SYMBOL(attention_decode)(const LkAttentionDecodeParams* p, void* stream) {
  using namespace lk::LK_NS;
  const char* op = "attention_decode";
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (int e = check_heads(op, p->n_heads, p->n_kv_heads, p->head_dim, p->scale)) return e;
  if (p->n_seqs < 0 || p->max_kv_len < 0 || p->cache_rows < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative size (n_seqs %d, max_kv_len %d, cache_rows %lld)", op,
                     p->n_seqs, p->max_kv_len, static_cast<long long>(p->cache_rows));
  }
  if (int e = check_dtype(op, p->dtype)) return e;
  if (p->n_seqs == 0) return 0;
  if (p->q == nullptr || p->out == nullptr || p->kv_start == nullptr || p->kv_len == nullptr ||
      (p->cache_rows > 0 && (p->k_cache == nullptr || p->v_cache == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer", op);
  }
  DecodeDims dm;
  dm.kv_start = p->kv_start;
  dm.kv_len = p->kv_len;
  dm.fault = p->fault;
  dm.cache_rows = p->cache_rows;
  dm.scale = p->scale;
  dm.n_seqs = p->n_seqs;
  dm.max_kv_len = p->max_kv_len;
  dm.n_heads = p->n_heads;
  dm.n_kv_heads = p->n_kv_heads;
  dm.n_splits = static_cast<int>(decode_splits(p->max_kv_len));
  const int group = p->n_heads / p->n_kv_heads;
  dm.head_slices = (group + kDecodeHeads - 1) / kDecodeHeads;
  dm.vec = aligned16(p->k_cache);
  dm.ws_ml = nullptr;
  dm.ws_o = nullptr;
  if (dm.n_splits > 1) {
    if (p->workspace == nullptr || !aligned16(p->workspace)) {
      return set_error(LK_ERR_INVALID_ARGUMENT, "%s: workspace %p must be non-null and 16-byte aligned", op,
                       p->workspace);
    }
    dm.ws_ml = static_cast<float*>(p->workspace);
    dm.ws_o = reinterpret_cast<float*>(static_cast<unsigned char*>(p->workspace) + decode_ml_bytes(*p));
  }
  switch (p->dtype) {
    case LK_F32:
      return decode_t<float>(*p, dm, stream);
    case LK_F16:
      return decode_t<__half>(*p, dm, stream);
    default:
      return decode_t<__nv_bfloat16>(*p, dm, stream);
  }
}
