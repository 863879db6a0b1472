/*
 * gemm.cu — dense GEMM for the reference block's projections: C = alpha · op(A) · op(B) + beta · C.
 * Contract: cuda/lora_kernels.h (LkGemmParams), src/gemm.rs.
 *
 * Layout. Row-major, one dtype T for A, B and C. op(A) [m, k] is A stored [m, k] (row stride lda) or,
 * with a_trans, A stored [k, m]; op(B) [k, n] is B stored [k, n] (ldb) or, with b_trans, B stored
 * [n, k]. C [m, n] has row stride ldc; columns [n, ldc) are never touched; beta == 0 never reads C.
 * The four (a_trans, b_trans) combinations are four template instances: the transposition lives
 * only in how a tile is copied into shared memory and how ldmatrix reads it back.
 *
 * f16 / bf16: tensor cores (mma.sync m16n8k16, f32 accumulate).
 *   Block tile BM × BN, K staged kTcBK = 32 at a time through a STAGES-deep cp.async ring. Shared
 *   tiles keep the operand's contiguous dimension contiguous, padded by 8 halves per row (row strides
 *   80 B or (BM|BN)·2 + 16 B: the 8 row addresses of every ldmatrix phase fall in distinct 16-byte
 *   bank groups, no conflicts):
 *     A, a_trans = 0: [BM][32+8] (k contiguous)  → ldmatrix.x4         (A fragment directly)
 *     A, a_trans = 1: [32][BM+8] (m contiguous)  → ldmatrix.x4.trans
 *     B, b_trans = 1: [BN][32+8] (k contiguous)  → ldmatrix.x4         (B "col" fragment directly)
 *     B, b_trans = 0: [32][BN+8] (n contiguous)  → ldmatrix.x4.trans
 *   Copies: every thread owns two (S: one) 8-element chunks per operand and k-tile, planned once per
 *   block (TcLoader: global offset at k = 0, advanced by a uniform step per k-tile). A chunk goes by
 *   one 16-byte cp.async when the operand is 16-byte aligned (base and leading dimension) and the
 *   chunk lies inside k; rows past m (A) or n (B) are clamped to the last valid one — they only feed
 *   accumulators of outputs that are never stored, since mma rows/columns are independent. The rest
 *   (the k edge, which must be zeros, chunks straddling the m/n edge along the contiguous dimension,
 *   misaligned operands) takes an out-of-line element path with zero fill, so the main loop keeps its
 *   registers (no spills at 128 registers).
 *   Warps tile the block (WARPS_M × WARPS_N), each WM × WN = (WM/16) × (WN/8) mma tiles held in f32
 *   registers. Three configurations, picked on the host from (m, n) only:
 *     L: 128 × 128, 8 warps of 64 × 32, 4 stages (80 KiB dynamic smem, 2 blocks/SM)
 *     M:  64 ×  64, 4 warps of 32 × 32, 4 stages (40 KiB)
 *     S:  32 ×  32, 4 warps of 16 × 16, 8 stages (40 KiB: deeper, since few blocks must keep
 *         enough bytes in flight — decode reads B at ~7 × 2 KiB per block ahead)
 *   the largest whose tile count fills one wave of the H200 (132 SMs), else S: small or skinny
 *   shapes (decode m = 1, LoRA-sized n) still spread over the GPU.
 * f32: CUDA-core FMA (tensor-core f32 would be TF32). Block tile BM × BN, K staged BK at a time,
 *   global → registers → shared double buffer (the next tile's loads are in flight while the current
 *   one is consumed; planned like TcLoader with float4 chunks); shared tiles are k-major
 *   ([BK][BM+4], [BK][BN+4]: A and Bᵀ transposed on the way in when stored k-contiguous) so every
 *   thread reads float4 rows; each thread owns TM × TN outputs (4 × 4 blocks spread BM/2, BN/2 apart
 *   for TM = 8). Configurations: 128 × 128 × 8 (8 × 8 per thread, 256 threads), 64 × 64 × 16 (4 × 4,
 *   256 threads), 32 × 32 × 16 (4 × 4, 64 threads), same rule.
 *
 * Grid: one block per output tile, 1-D (x ≤ 2^31 − 1) in grouped order (8 tile rows sweep the tile
 * columns together, so A's tile rows and B's tile columns stay in L2).
 *
 * Determinism and batch invariance. Every C element is accumulated by exactly one thread in one
 * fixed order: k16 steps in increasing k, each one mma (tensor cores; the tail of k zero-padded to
 * 16, a function of k alone), or one fmaf per k in increasing k (f32, the partial last tile walks only
 * its valid k). No split-K, no atomics. The configuration changes which thread holds an element, not
 * its operation sequence, so row i of C has the same bits whatever m is (column j: whatever n is), on
 * any schedule. Epilogue in f32: v = alpha · acc; beta ≠ 0: v = fmaf(beta, c, v); c = round_T(v).
 *
 * Accuracy: f16/bf16 inputs are exact in f32; the f32 accumulation over k gives |acc − exact| ≤
 * γ_k Σ|a b| (each mma adds 16 products to the accumulator with at most one rounding per term), then
 * the f32 epilogue roundings and one rounding to T. f32: one fmaf chain, γ_k as well.
 *
 * Napkin math (H200: ~990 TFLOP/s dense f16 on wgmma, mma.sync reaches roughly two thirds of it;
 * 4.8 TB/s HBM3e; 132 SMs at ~1.98 GHz). 4096³ f16: 137 GFLOP → ~0.2 ms at 650 TFLOP/s. Config L:
 * per k a block loads (128 + 128) × 2 B for 128 × 128 × 2 flop (64 flop/B), so 1024 blocks pull
 * 2 GiB from L2 (~10 TB/s at that rate, ~40 B/clk per SM of the ~64 the L2 → SM path gives) and
 * 64 MiB from HBM: compute-bound with L2 the next limit (Hopper's cuBLAS uses 128 × 256 tiles,
 * TMA multicast and wgmma; that is the gap to close after measuring). Per block and k32 stage:
 * 16 KiB of smem fills, 8 warps × 2 k16 × (4 + 2 ldmatrix.x4, 16 mma). Decode (m = 1, n = 4096,
 * k = 4096): reading B (32 MiB) dominates, ~7 µs at HBM speed; config S gives 128 blocks with
 * 7 × 2 KiB of B in flight each (~1.8 MiB: at ~1 µs latency ~1.8 TB/s, ~18 µs; only 1/32 of each
 * mma is used, irrelevant when memory-bound). f32 4096³ on FMA: ~67 TFLOP/s peak → ~2.5 ms at 80 %.
 */
#include <string.h>

#include "portable.cuh"

LK_NAMESPACE_BEGIN

constexpr int kTcBK = 32;        /* k per stage, tensor cores (two k16 steps) */
constexpr int kPad = 8;          /* halves of padding per shared row */
constexpr int kFmaPad = 4;       /* floats of padding per shared row (keeps float4 alignment) */
constexpr int kGroupM = 8;       /* tile rows per group in the grid order */
constexpr int64_t kWaveBlocks = 132; /* H200 SM count: a configuration must give at least this many tiles */

struct GemmArgs {
  const void* a;
  const void* b;
  void* c;
  int64_t lda, ldb, ldc;
  int64_t tiles_m, tiles_n;
  int m, n, k;
  float alpha, beta;
  int vec_a;  /* A: 16-byte aligned base and lda·sizeof(T) a multiple of 16 */
  int vec_b;
  int pair_c; /* C: two adjacent elements can be stored as one (aligned base, even ldc) */
};

/* The tile this block computes, in grouped order. */
__device__ __forceinline__ void tile_coords(const GemmArgs& p, int64_t& tm, int64_t& tn) {
  const int64_t bid = blockIdx.x;
  const int64_t group_tiles = kGroupM * p.tiles_n;
  const int64_t gi = bid / group_tiles;
  const int64_t first_m = gi * kGroupM;
  const int64_t gsz = p.tiles_m - first_m < kGroupM ? p.tiles_m - first_m : kGroupM;
  const int64_t in = bid - gi * group_tiles;
  tm = first_m + in % gsz;
  tn = in / gsz;
}

/* Epilogue of one element (row < m, col < n checked by the caller). */
template <typename T>
__device__ __forceinline__ T epilogue(float acc, const T* dst, float alpha, float beta) {
  float v = alpha * acc;
  if (beta != 0.0f) v = fmaf(beta, to_f32(*dst), v);
  return from_f32<T>(v);
}

/* Two horizontally adjacent outputs (col, col + 1) of one row. */
template <typename T>
__device__ __forceinline__ void store_pair(const GemmArgs& p, T* c, int64_t row, int64_t col, float v0, float v1) {
  if (row >= p.m || col >= p.n) return;
  T* dst = c + row * p.ldc + col;
  if (p.pair_c && col + 1 < p.n) {
    T out[2];
    out[0] = epilogue<T>(v0, dst, p.alpha, p.beta);
    out[1] = epilogue<T>(v1, dst + 1, p.alpha, p.beta);
    memcpy(__builtin_assume_aligned(static_cast<void*>(dst), sizeof out), out, sizeof out);
  } else {
    dst[0] = epilogue<T>(v0, dst, p.alpha, p.beta);
    if (col + 1 < p.n) dst[1] = epilogue<T>(v1, dst + 1, p.alpha, p.beta);
  }
}

/* ================================================================================================
 * Tensor cores (f16 / bf16). */
template <int BM_, int BN_, int WM_, int WN_, int STAGES_, int MIN_BLOCKS_>
struct TcCfg {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static_assert(NT % 2 == 0, "B fragments are loaded two n-tiles at a time (ldmatrix.x4)");
};
using TcL = TcCfg<128, 128, 64, 32, 4, 2>;
using TcM = TcCfg<64, 64, 32, 32, 4, 4>;
using TcS = TcCfg<32, 32, 16, 16, 8, 4>;

/* Shared-memory geometry of one operand tile: rows × cols (cols contiguous), row stride ld. */
template <int ROWS, int COLS>
struct Tile {
  static constexpr int rows = ROWS, cols = COLS, ld = COLS + kPad, elems = ROWS * (COLS + kPad);
};
template <class C, bool AT>
using ATile = Tile<AT ? kTcBK : C::BM, AT ? C::BM : kTcBK>;
template <class C, bool BT>
using BTile = Tile<BT ? C::BN : kTcBK, BT ? kTcBK : C::BN>;

template <class C, bool AT, bool BT>
constexpr size_t tc_smem_bytes() {
  return static_cast<size_t>(C::STAGES) * (ATile<C, AT>::elems + BTile<C, BT>::elems) * 2;
}

/* The element path of a tile chunk: 8 elements, zero outside [0, k) × [0, mn_lim). Out of line: it
 * is rare (edges, misaligned operands) and must not cost the main loop registers. */
template <typename T, bool KROWS>
__device__ __noinline__ void tc_load_slow(T* dst, const T* __restrict__ g, int64_t ld, int r, int c, int64_t k0,
                                          int64_t k, int64_t mn0, int64_t mn_lim) {
  const T zero = from_f32<T>(0.0f);
  T v[8];
  if (KROWS) {
    const int64_t kk = k0 + r, col = mn0 + c;
#pragma unroll
    for (int q = 0; q < 8; ++q) v[q] = (kk < k && col + q < mn_lim) ? g[kk * ld + col + q] : zero;
  } else {
    const int64_t row = mn0 + r, kk = k0 + c;
#pragma unroll
    for (int q = 0; q < 8; ++q) v[q] = (row < mn_lim && kk + q < k) ? g[row * ld + kk + q] : zero;
  }
  memcpy(__builtin_assume_aligned(static_cast<void*>(dst), 16), v, sizeof v);
}

/* One operand's share of the shared tile copies, planned once per block. The tile is rows × cols of
 * shared memory (cols contiguous); each thread owns kPer 8-element chunks. KROWS: the k dimension runs
 * along the tile's rows (the operand is stored k-major: A with a_trans, B without b_trans), else
 * along its columns. For chunk i the plan keeps the global element offset at k-tile 0 (rows of the
 * m/n dimension beyond its end are clamped to the last one: they only feed outputs that are never
 * stored) and whether a 16-byte copy may serve it in a full k-tile. Everything else — the k edge,
 * chunks straddling the m/n edge, misaligned operands — takes the element path with zero fill. */
template <typename T, class TL, int THREADS, bool KROWS>
struct TcLoader {
  static constexpr int kChunksPerRow = TL::cols / 8;
  static constexpr int kPer = TL::rows * kChunksPerRow / THREADS;
  static_assert(TL::rows * kChunksPerRow % THREADS == 0, "tile chunks must divide evenly among the threads");
  const T* g;
  int64_t ld;
  int64_t off[kPer];
  bool fast[kPer];

  /* row0 / col0: the tile's origin in the non-k dimension (k starts at 0); mn_lim: its extent. */
  __device__ __forceinline__ void plan(const T* base, int64_t ld_, int64_t mn0, int64_t mn_lim, bool vec, int tid) {
    g = base;
    ld = ld_;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = i * THREADS + tid;
      const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
      if (KROWS) { /* rows = k, cols = m/n */
        off[i] = static_cast<int64_t>(r) * ld + mn0 + c;
        fast[i] = vec && mn0 + c + 8 <= mn_lim;
      } else { /* rows = m/n, cols = k */
        const int64_t row = mn0 + r < mn_lim ? mn0 + r : mn_lim - 1;
        off[i] = row * ld + c;
        fast[i] = vec;
      }
    }
  }

  /* k-tile kt (k0 = kt · kTcBK) into shared tile s; full: the whole k-tile lies inside [0, k) (else
   * each chunk checks its own k range). */
  __device__ __forceinline__ void load(T* s, int kt, bool full, int64_t k, int64_t mn0, int64_t mn_lim,
                                       int tid) const {
    const int64_t k0 = static_cast<int64_t>(kt) * kTcBK;
    const int64_t step = KROWS ? k0 * ld : k0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = i * THREADS + tid;
      const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
      T* dst = s + r * TL::ld + c;
      const bool in_k = full || (KROWS ? k0 + r < k : k0 + c + 8 <= k);
      if (in_k && fast[i]) {
        cp_async_16(dst, g + off[i] + step);
      } else {
        tc_load_slow<T, KROWS>(dst, g, ld, r, c, k0, k, mn0, mn_lim);
      }
    }
  }

};

template <typename T>
__device__ __forceinline__ void mma_t(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma_t<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  mma_m16n8k16_f16(d, a, b, d);
}
template <>
__device__ __forceinline__ void mma_t<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  mma_m16n8k16_bf16(d, a, b, d);
}

template <typename T, class C, bool AT, bool BT>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS) gemm_tc_kernel(GemmArgs p) {
  using TA = ATile<C, AT>;
  using TB = BTile<C, BT>;
  constexpr int kStage = TA::elems + TB::elems;
  LK_DYNAMIC_SMEM(T, smem);

  int64_t tm, tn;
  tile_coords(p, tm, tn);
  const int64_t m0 = tm * C::BM, n0 = tn * C::BN;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm = (warp / C::WARPS_N) * C::WM, wn = (warp % C::WARPS_N) * C::WN;
  const T* __restrict__ A = static_cast<const T*>(p.a);
  const T* __restrict__ B = static_cast<const T*>(p.b);
  const bool vec_a = p.vec_a != 0, vec_b = p.vec_b != 0;

  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  const int k_tiles = (p.k + kTcBK - 1) / kTcBK;
  const int full_tiles = p.k / kTcBK; /* k-tiles entirely inside [0, k) */
  TcLoader<T, TA, C::THREADS, AT> la;
  TcLoader<T, TB, C::THREADS, !BT> lb;
  la.plan(A, p.lda, m0, p.m, vec_a, tid);
  lb.plan(B, p.ldb, n0, p.n, vec_b, tid);
  /* Stage s holds k-tile kt: A then B. */
  auto load_stage = [&](int s, int kt) {
    T* as = smem + s * kStage;
    const bool full = kt < full_tiles;
    la.load(as, kt, full, p.k, m0, p.m, tid);
    lb.load(as + TA::elems, kt, full, p.k, n0, p.n, tid);
  };

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  const int q = lane >> 3; /* which 8×8 matrix of an ldmatrix.x4 this lane addresses */
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::STAGES - 2>(); /* this thread's copies of k-tile kt have landed */
    __syncthreads();                /* everyone's have; and stage (kt − 1) % STAGES is free */
    {
      const int nk = kt + C::STAGES - 1;
      if (nk < k_tiles) load_stage(nk % C::STAGES, nk);
      cp_async_commit();
    }
    const T* as = smem + (kt % C::STAGES) * kStage;
    const T* bs = as + TA::elems;
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      uint32_t af[C::MT][4];
      uint32_t bf[C::NT][2];
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        const int mb = wm + mt * 16;
        if (AT) {
          ldmatrix_x4_trans(af[mt], as + (kk + (q >> 1) * 8 + (lane & 7)) * TA::ld + mb + (q & 1) * 8);
        } else {
          ldmatrix_x4(af[mt], as + (mb + (lane & 15)) * TA::ld + kk + (lane >> 4) * 8);
        }
      }
#pragma unroll
      for (int np = 0; np < C::NT / 2; ++np) {
        const int nb = wn + np * 16;
        uint32_t b4[4];
        if (BT) {
          ldmatrix_x4(b4, bs + (nb + (lane & 7) + ((lane >> 4) << 3)) * TB::ld + kk + (q & 1) * 8);
        } else {
          ldmatrix_x4_trans(b4, bs + (kk + (q & 1) * 8 + (lane & 7)) * TB::ld + nb + (q >> 1) * 8);
        }
        bf[2 * np][0] = b4[0];
        bf[2 * np][1] = b4[1];
        bf[2 * np + 1][0] = b4[2];
        bf[2 * np + 1][1] = b4[3];
      }
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) mma_t<T>(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  cp_async_wait_all(); /* only empty groups remain; keeps every thread's copy queue drained */

  T* __restrict__ Cp = static_cast<T*>(p.c);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + wm + mt * 16 + g + 8 * h;
        const int64_t col = n0 + wn + nt * 8 + 2 * t;
        store_pair<T>(p, Cp, row, col, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
      }
}

/* ================================================================================================
 * f32: CUDA-core FMA. */
template <int BM_, int BN_, int BK_, int TM_, int TN_, int MIN_BLOCKS_>
struct FmaCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int TX = BN / TN, TY = BM / TM, THREADS = TX * TY;
  static constexpr int RG = TM / 4, CG = TN / 4; /* groups of 4 rows / columns per thread */
  static constexpr int LDA = BM + kFmaPad, LDB = BN + kFmaPad;
  static_assert(TM % 4 == 0 && TN % 4 == 0, "thread tiles are made of float4 groups");
};
using FmaL = FmaCfg<128, 128, 8, 8, 8, 2>;
using FmaM = FmaCfg<64, 64, 16, 4, 4, 2>;
using FmaS = FmaCfg<32, 32, 16, 4, 4, 8>;

struct F4 {
  float v[4];
};

/* The element path of a 4-float chunk (zero outside [0, k) × [0, mn_lim)); out of line as on the
 * tensor-core path. */
template <bool KROWS>
__device__ __noinline__ F4 fma_load_slow(const float* __restrict__ g, int64_t ld, int r, int c, int64_t k0, int64_t k,
                                         int64_t mn0, int64_t mn_lim) {
  F4 out;
  if (KROWS) {
    const int64_t kk = k0 + r, col = mn0 + c;
#pragma unroll
    for (int q = 0; q < 4; ++q) out.v[q] = (kk < k && col + q < mn_lim) ? g[kk * ld + col + q] : 0.0f;
  } else {
    const int64_t row = mn0 + r, kk = k0 + c;
#pragma unroll
    for (int q = 0; q < 4; ++q) out.v[q] = (row < mn_lim && kk + q < k) ? g[row * ld + kk + q] : 0.0f;
  }
  return out;
}

/* One operand's rows × cols tile (cols contiguous in global memory) → registers → shared, planned
 * once per block like TcLoader (4-float chunks, float4 loads where aligned and inside the tile). */
template <int ROWS, int COLS, int BK, int THREADS, bool KROWS>
struct FmaLoader {
  static constexpr int kChunksPerRow = COLS / 4;
  static constexpr int kPer = ROWS * kChunksPerRow / THREADS;
  static_assert(ROWS * kChunksPerRow % THREADS == 0, "tile chunks must divide evenly among the threads");
  const float* g;
  int64_t ld;
  int64_t off[kPer];
  bool fast[kPer];
  F4 v[kPer];

  __device__ __forceinline__ void plan(const float* base, int64_t ld_, int64_t mn0, int64_t mn_lim, bool vec,
                                       int tid) {
    g = base;
    ld = ld_;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = i * THREADS + tid;
      const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 4;
      if (KROWS) {
        off[i] = static_cast<int64_t>(r) * ld + mn0 + c;
        fast[i] = vec && mn0 + c + 4 <= mn_lim;
      } else {
        const int64_t row = mn0 + r < mn_lim ? mn0 + r : mn_lim - 1;
        off[i] = row * ld + c;
        fast[i] = vec;
      }
    }
  }

  __device__ __forceinline__ void load(int kt, bool full, int64_t k, int64_t mn0, int64_t mn_lim, int tid) {
    const int64_t k0 = static_cast<int64_t>(kt) * BK;
    const int64_t step = KROWS ? k0 * ld : k0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = i * THREADS + tid;
      const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 4;
      const bool in_k = full || (KROWS ? k0 + r < k : k0 + c + 4 <= k);
      if (in_k && fast[i]) {
        memcpy(v[i].v, __builtin_assume_aligned(static_cast<const void*>(g + off[i] + step), 16), 16);
      } else {
        v[i] = fma_load_slow<KROWS>(g, ld, r, c, k0, k, mn0, mn_lim);
      }
    }
  }

  /* Store as loaded: shared [ROWS][ld] (the operand is stored k-major). */
  __device__ __forceinline__ void store_direct(float* s, int lds, int tid) const {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = i * THREADS + tid;
      const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 4;
      memcpy(__builtin_assume_aligned(static_cast<void*>(s + r * lds + c), 16), v[i].v, 16);
    }
  }
  /* Store transposed: shared [COLS][ld] (global rows were m or n, columns k). */
  __device__ __forceinline__ void store_transposed(float* s, int lds, int tid) const {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = i * THREADS + tid;
      const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 4;
#pragma unroll
      for (int e = 0; e < 4; ++e) s[(c + e) * lds + r] = v[i].v[e];
    }
  }
};

template <class C, bool AT, bool BT>
__global__ void __launch_bounds__(C::THREADS, C::MIN_BLOCKS) gemm_fma_kernel(GemmArgs p) {
  __shared__ __align__(16) float as[2][C::BK][C::LDA];
  __shared__ __align__(16) float bs[2][C::BK][C::LDB];
  /* A: k-major already when a_trans ([k][m] rows), else [m][k] rows transposed on the way in. */
  using LoaderA = FmaLoader<AT ? C::BK : C::BM, AT ? C::BM : C::BK, C::BK, C::THREADS, AT>;
  using LoaderB = FmaLoader<BT ? C::BN : C::BK, BT ? C::BK : C::BN, C::BK, C::THREADS, !BT>;

  int64_t tm, tn;
  tile_coords(p, tm, tn);
  const int64_t m0 = tm * C::BM, n0 = tn * C::BN;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % C::TX, ty = tid / C::TX;

  LoaderA la;
  LoaderB lb;
  la.plan(static_cast<const float*>(p.a), p.lda, m0, p.m, p.vec_a != 0, tid);
  lb.plan(static_cast<const float*>(p.b), p.ldb, n0, p.n, p.vec_b != 0, tid);
  const int full_tiles = p.k / C::BK;
  auto load = [&](int kt) {
    la.load(kt, kt < full_tiles, p.k, m0, p.m, tid);
    lb.load(kt, kt < full_tiles, p.k, n0, p.n, tid);
  };
  auto store = [&](int s) {
    if (AT) {
      la.store_direct(&as[s][0][0], C::LDA, tid);
    } else {
      la.store_transposed(&as[s][0][0], C::LDA, tid);
    }
    if (BT) {
      lb.store_transposed(&bs[s][0][0], C::LDB, tid);
    } else {
      lb.store_direct(&bs[s][0][0], C::LDB, tid);
    }
  };

  float acc[C::TM][C::TN];
#pragma unroll
  for (int i = 0; i < C::TM; ++i)
#pragma unroll
    for (int j = 0; j < C::TN; ++j) acc[i][j] = 0.0f;

  /* One k step: rows ty·4 + rg·(BM/RG) + i, columns tx·4 + cg·(BN/CG) + j. */
  auto step = [&](int s, int kk) {
    float av[C::TM], bv[C::TN];
#pragma unroll
    for (int rg = 0; rg < C::RG; ++rg)
      memcpy(&av[rg * 4],
             __builtin_assume_aligned(static_cast<const void*>(&as[s][kk][ty * 4 + rg * (C::BM / C::RG)]), 16), 16);
#pragma unroll
    for (int cg = 0; cg < C::CG; ++cg)
      memcpy(&bv[cg * 4],
             __builtin_assume_aligned(static_cast<const void*>(&bs[s][kk][tx * 4 + cg * (C::BN / C::CG)]), 16), 16);
#pragma unroll
    for (int i = 0; i < C::TM; ++i)
#pragma unroll
      for (int j = 0; j < C::TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  };

  const int k_tiles = (p.k + C::BK - 1) / C::BK;
  if (k_tiles > 0) {
    load(0);
    store(0);
  }
  __syncthreads();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int s = kt & 1;
    if (kt + 1 < k_tiles) load(kt + 1); /* global loads in flight during the FMAs below */
    const int kn = p.k - kt * C::BK;
    if (kn >= C::BK) {
#pragma unroll
      for (int kk = 0; kk < C::BK; ++kk) step(s, kk);
    } else {
      for (int kk = 0; kk < kn; ++kk) step(s, kk); /* the last, partial tile: only valid k */
    }
    if (kt + 1 < k_tiles) store(s ^ 1); /* stage s ^ 1 was last read before the previous barrier */
    __syncthreads();
  }

  float* __restrict__ Cp = static_cast<float*>(p.c);
#pragma unroll
  for (int rg = 0; rg < C::RG; ++rg)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = m0 + ty * 4 + rg * (C::BM / C::RG) + i;
      if (row >= p.m) continue;
#pragma unroll
      for (int cg = 0; cg < C::CG; ++cg)
#pragma unroll
        for (int j = 0; j < 4; j += 2) {
          const int64_t col = n0 + tx * 4 + cg * (C::BN / C::CG) + j;
          store_pair<float>(p, Cp, row, col, acc[rg * 4 + i][cg * 4 + j], acc[rg * 4 + i][cg * 4 + j + 1]);
        }
    }
}

/* ================================================================================================
 * Host side. */
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static inline int64_t tiles_of(const LkGemmParams& p, int bm, int bn) {
  return ceil_div(p.m, bm) * ceil_div(p.n, bn);
}

template <class C>
static int launch_grid(const LkGemmParams& p, GemmArgs& a) {
  a.tiles_m = ceil_div(p.m, C::BM);
  a.tiles_n = ceil_div(p.n, C::BN);
  const int64_t tiles = a.tiles_m * a.tiles_n;
  if (tiles > 0x7fffffffLL) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "gemm: %lld output tiles exceed the grid limit",
                     static_cast<long long>(tiles));
  }
  return 0;
}

template <typename T, class C, bool AT, bool BT>
static int launch_tc(const LkGemmParams& p, GemmArgs a, void* stream) {
  if (int e = launch_grid<C>(p, a)) return e;
  constexpr size_t smem = tc_smem_bytes<C, AT, BT>();
  auto kernel = gemm_tc_kernel<T, C, AT, BT>;
  if (smem > 48 * 1024) {
    if (int e = set_max_dynamic_smem(kernel, smem)) return e;
  }
  return launch(kernel, dim3(static_cast<unsigned>(a.tiles_m * a.tiles_n)), dim3(C::THREADS), smem, stream, a);
}

template <class C, bool AT, bool BT>
static int launch_fma(const LkGemmParams& p, GemmArgs a, void* stream) {
  if (int e = launch_grid<C>(p, a)) return e;
  return launch(gemm_fma_kernel<C, AT, BT>, dim3(static_cast<unsigned>(a.tiles_m * a.tiles_n)), dim3(C::THREADS), 0,
                stream, a);
}

template <typename T, bool AT, bool BT>
static int dispatch_tc(const LkGemmParams& p, const GemmArgs& a, void* stream) {
  if (tiles_of(p, TcL::BM, TcL::BN) >= kWaveBlocks) return launch_tc<T, TcL, AT, BT>(p, a, stream);
  if (tiles_of(p, TcM::BM, TcM::BN) >= kWaveBlocks) return launch_tc<T, TcM, AT, BT>(p, a, stream);
  return launch_tc<T, TcS, AT, BT>(p, a, stream);
}

template <bool AT, bool BT>
static int dispatch_fma(const LkGemmParams& p, const GemmArgs& a, void* stream) {
  if (tiles_of(p, FmaL::BM, FmaL::BN) >= kWaveBlocks) return launch_fma<FmaL, AT, BT>(p, a, stream);
  if (tiles_of(p, FmaM::BM, FmaM::BN) >= kWaveBlocks) return launch_fma<FmaM, AT, BT>(p, a, stream);
  return launch_fma<FmaS, AT, BT>(p, a, stream);
}

template <bool AT, bool BT>
static int dispatch_dtype(const LkGemmParams& p, const GemmArgs& a, void* stream) {
  switch (p.dtype) {
    case LK_F32:
      return dispatch_fma<AT, BT>(p, a, stream);
    case LK_F16:
      return dispatch_tc<__half, AT, BT>(p, a, stream);
    default:
      return dispatch_tc<__nv_bfloat16, AT, BT>(p, a, stream);
  }
}

static bool vec_ok(const void* ptr, int64_t ld, int64_t elem_size) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0 && (ld * elem_size) % 16 == 0;
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(gemm)(const LkGemmParams* p, void* stream) {
  using namespace lk::LK_NS;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "gemm: params is null");
  if (p->m < 0 || p->n < 0 || p->k < 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "gemm: negative size (m %d, n %d, k %d)", p->m, p->n, p->k);
  }
  if ((p->a_trans != 0 && p->a_trans != 1) || (p->b_trans != 0 && p->b_trans != 1)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "gemm: a_trans %d / b_trans %d must be 0 or 1", p->a_trans,
                     p->b_trans);
  }
  const int64_t a_cols = p->a_trans ? p->m : p->k;
  const int64_t b_cols = p->b_trans ? p->k : p->n;
  if (p->lda < a_cols || p->ldb < b_cols || p->ldc < p->n) {
    return set_error(LK_ERR_INVALID_ARGUMENT,
                     "gemm: leading dimension too small (lda %lld < %lld, ldb %lld < %lld or ldc %lld < n %d)",
                     static_cast<long long>(p->lda), static_cast<long long>(a_cols), static_cast<long long>(p->ldb),
                     static_cast<long long>(b_cols), static_cast<long long>(p->ldc), p->n);
  }
  if (p->dtype != LK_F32 && p->dtype != LK_F16 && p->dtype != LK_BF16) {
    return set_error(LK_ERR_UNSUPPORTED_DTYPE, "gemm: dtype %d (0 = f32, 1 = f16, 2 = bf16)", p->dtype);
  }
  if (p->m == 0 || p->n == 0) return 0;
  if (p->c == nullptr || (p->k > 0 && (p->a == nullptr || p->b == nullptr))) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "gemm: null pointer (a %p, b %p, c %p)", p->a, p->b, p->c);
  }
  const int64_t es = p->dtype == LK_F32 ? 4 : 2;
  GemmArgs a;
  a.a = p->a;
  a.b = p->b;
  a.c = p->c;
  a.lda = p->lda;
  a.ldb = p->ldb;
  a.ldc = p->ldc;
  a.tiles_m = a.tiles_n = 0;
  a.m = p->m;
  a.n = p->n;
  a.k = p->k;
  a.alpha = p->alpha;
  a.beta = p->beta;
  a.vec_a = vec_ok(p->a, p->lda, es);
  a.vec_b = vec_ok(p->b, p->ldb, es);
  a.pair_c = (reinterpret_cast<uintptr_t>(p->c) % static_cast<uintptr_t>(2 * es)) == 0 && (p->ldc % 2) == 0;
  const int form = (p->a_trans ? 2 : 0) | (p->b_trans ? 1 : 0);
  switch (form) {
    case 0:
      return dispatch_dtype<false, false>(*p, a, stream);
    case 1:
      return dispatch_dtype<false, true>(*p, a, stream);
    case 2:
      return dispatch_dtype<true, false>(*p, a, stream);
    default:
      return dispatch_dtype<true, true>(*p, a, stream);
  }
}
