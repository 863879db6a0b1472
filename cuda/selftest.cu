/*
 * selftest.cu — self-test kernels of the SIMT emulator (see selftest.h for what each one computes).
 * Compiled unchanged by nvcc (-DLK_BACKEND_CUDA) and g++ (-DLK_BACKEND_EMU).
 */
#include <string.h>

#include "portable.cuh"
#include "selftest.h"

LK_NAMESPACE_BEGIN

/* ------------------------------------------------------------------------------------------------
 * (1) Block reduction: one block per row; warp shuffles (down, then xor) and shared memory. */
__global__ void selftest_reduce_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float partial[32];
  const float* row = x + static_cast<size_t>(blockIdx.x) * static_cast<size_t>(n);
  float v = 0.0f;
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) v += row[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x >> 5);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = static_cast<int>(blockDim.x >> 5);
    v = lane < nwarps ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

extern "C" int LK_SYMBOL(selftest_reduce)(const LkSelftestReduceParams* p, void* stream) {
  if (!p || !p->x || !p->out || p->rows < 0 || p->n < 0 || p->block_threads < 32 || p->block_threads > 1024 ||
      p->block_threads % 32 != 0)
    return set_error(LK_ERR_INVALID_ARGUMENT, "selftest_reduce: invalid params");
  if (p->rows == 0) return 0;
  return launch(selftest_reduce_kernel, dim3(static_cast<unsigned>(p->rows)),
                dim3(static_cast<unsigned>(p->block_threads)), 0, stream, p->x, p->out, p->n);
}

/* ------------------------------------------------------------------------------------------------
 * (2) Warp-op exerciser: its output is compared with the GPU's bit for bit. */
__device__ __forceinline__ int selftest_f32_bits(float f) {
  int i;
  memcpy(&i, &f, sizeof i);
  return i;
}

__global__ void selftest_warp_ops_kernel(const int32_t* __restrict__ in, int32_t* __restrict__ out) {
  const int tid = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const unsigned full = 0xffffffffu;
  const int v = in[tid];
  int32_t* o = out + static_cast<size_t>(tid) * LK_SELFTEST_WARP_OPS_OUTPUTS;
  int k = 0;
  for (int width = 1; width <= 32; width <<= 1) { /* 6 widths x 8 = 48 */
    o[k++] = __shfl_sync(full, v, lane * 3 + 1, width);
    o[k++] = __shfl_sync(full, v, 31 - lane, width);
    o[k++] = __shfl_up_sync(full, v, 1u, width);
    o[k++] = __shfl_up_sync(full, v, 3u, width);
    o[k++] = __shfl_down_sync(full, v, 1u, width);
    o[k++] = __shfl_down_sync(full, v, 5u, width);
    o[k++] = __shfl_xor_sync(full, v, 1, width);
    o[k++] = __shfl_xor_sync(full, v, 6, width);
  }
  { /* 8-byte and float shuffles: 5 */
    const long long v64 = static_cast<long long>((static_cast<unsigned long long>(static_cast<unsigned>(v)) << 32) |
                                                 static_cast<unsigned>(v * 7 + 1));
    const long long r64 = __shfl_xor_sync(full, v64, 5, 16);
    o[k++] = static_cast<int32_t>(r64 & 0xffffffffll);
    o[k++] = static_cast<int32_t>(r64 >> 32);
    const double rd = __shfl_down_sync(full, static_cast<double>(v) * 0.5, 2u, 8);
    int32_t w2[2];
    memcpy(w2, &rd, sizeof w2);
    o[k++] = w2[0];
    o[k++] = w2[1];
    o[k++] = selftest_f32_bits(__shfl_up_sync(full, static_cast<float>(v) * 0.25f, 2u));
  }
  const int p1 = v & 1, p2 = v > 0;
  /* votes, full mask: 6 */
  o[k++] = static_cast<int32_t>(__ballot_sync(full, p1));
  o[k++] = __any_sync(full, p1);
  o[k++] = __all_sync(full, p1);
  o[k++] = __all_sync(full, 1);
  o[k++] = __any_sync(full, 0);
  o[k++] = static_cast<int32_t>(__ballot_sync(full, p2));
  /* lanes 0..15 only, mask 0x0000ffff: 7 */
  if (lane < 16) {
    const unsigned m = 0x0000ffffu;
    o[k + 0] = __shfl_sync(m, v, lane + 5, 16);
    o[k + 1] = __shfl_xor_sync(m, v, 3, 8);
    o[k + 2] = __shfl_down_sync(m, v, 2u, 16);
    o[k + 3] = __shfl_up_sync(m, v, 2u, 16);
    __syncwarp(m);
    o[k + 4] = static_cast<int32_t>(__ballot_sync(m, p1));
    o[k + 5] = __any_sync(m, p2);
    o[k + 6] = __all_sync(m, p2);
  } else {
    for (int j = 0; j < 7; ++j) o[k + j] = LK_SELFTEST_WARP_OPS_SENTINEL;
  }
  k += 7;
  /* odd lanes only, mask 0xaaaaaaaa: 5 */
  if (lane & 1) {
    const unsigned m = 0xaaaaaaaau;
    o[k + 0] = __shfl_xor_sync(m, v, 2);
    o[k + 1] = __shfl_sync(m, v, (lane * 5) | 1);
    o[k + 2] = static_cast<int32_t>(__ballot_sync(m, p1));
    o[k + 3] = __all_sync(m, p2);
    o[k + 4] = __shfl_down_sync(m, v, 4u, 16);
  } else {
    for (int j = 0; j < 5; ++j) o[k + j] = LK_SELFTEST_WARP_OPS_SENTINEL;
  }
  k += 5;
  __syncwarp();
  while (k < LK_SELFTEST_WARP_OPS_OUTPUTS) o[k++] = LK_SELFTEST_WARP_OPS_SENTINEL;
}

extern "C" int LK_SYMBOL(selftest_warp_ops)(const LkSelftestWarpOpsParams* p, void* stream) {
  if (!p || !p->in || !p->out || p->blocks < 0 || p->block_threads < 32 || p->block_threads > 1024 ||
      p->block_threads % 32 != 0)
    return set_error(LK_ERR_INVALID_ARGUMENT, "selftest_warp_ops: invalid params");
  if (p->blocks == 0) return 0;
  return launch(selftest_warp_ops_kernel, dim3(static_cast<unsigned>(p->blocks)),
                dim3(static_cast<unsigned>(p->block_threads)), 0, stream, p->in, p->out);
}

/* ------------------------------------------------------------------------------------------------
 * (3) Tiled f32 matmul, 16x16 tiles, any sizes. */
__global__ void selftest_matmul_kernel(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                                       int M, int N, int K) {
  __shared__ float As[16][16];
  __shared__ float Bs[16][16];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int row = static_cast<int>(blockIdx.y) * 16 + ty, col = static_cast<int>(blockIdx.x) * 16 + tx;
  float acc = 0.0f;
  for (int k0 = 0; k0 < K; k0 += 16) {
    As[ty][tx] = (row < M && k0 + tx < K) ? A[static_cast<size_t>(row) * K + k0 + tx] : 0.0f;
    Bs[ty][tx] = (col < N && k0 + ty < K) ? B[static_cast<size_t>(k0 + ty) * N + col] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 16; ++k) acc += As[ty][k] * Bs[k][tx];
    __syncthreads();
  }
  if (row < M && col < N) C[static_cast<size_t>(row) * N + col] = acc;
}

extern "C" int LK_SYMBOL(selftest_matmul)(const LkSelftestMatmulParams* p, void* stream) {
  if (!p || !p->a || !p->b || !p->c || p->m < 0 || p->n < 0 || p->k < 0)
    return set_error(LK_ERR_INVALID_ARGUMENT, "selftest_matmul: invalid params");
  if (p->m == 0 || p->n == 0) return 0;
  const dim3 grid(static_cast<unsigned>((p->n + 15) / 16), static_cast<unsigned>((p->m + 15) / 16));
  return launch(selftest_matmul_kernel, grid, dim3(16, 16), 0, stream, p->a, p->b, p->c, p->m, p->n, p->k);
}

/* ------------------------------------------------------------------------------------------------
 * (4) Tensor-core GEMM: 32x32 block tile, 4 warps of 16x16 (two m16n8k16 each), BK = 16, cp.async
 * double buffering, ldmatrix fragments (A row-major → .x4; B row-major [k][n] → .trans). */
constexpr int kMmaBM = 32, kMmaBN = 32, kMmaBK = 16, kMmaAPad = 24, kMmaBPad = 40; /* rows stay 16-byte aligned */

__device__ __forceinline__ void selftest_mma_load_tile(uint16_t (*As)[kMmaAPad], uint16_t (*Bs)[kMmaBPad],
                                                       const uint16_t* __restrict__ A, const uint16_t* __restrict__ B,
                                                       int M, int N, int K, int m0, int n0, int k0, int tid) {
  if (tid < 64) { /* A: 32 rows x 2 chunks of 8 halves */
    const int r = tid >> 1, c = (tid & 1) * 8;
    uint16_t* dst = &As[r][c];
    if (m0 + r < M) {
      cp_async_16(dst, A + static_cast<size_t>(m0 + r) * K + k0 + c);
    } else {
      uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
      d32[0] = d32[1] = d32[2] = d32[3] = 0u;
    }
  } else { /* B: 16 rows x 4 chunks of 8 halves */
    const int t = tid - 64, r = t >> 2, c = (t & 3) * 8;
    uint16_t* dst = &Bs[r][c];
    if (n0 + c < N) {
      cp_async_16(dst, B + static_cast<size_t>(k0 + r) * N + n0 + c);
    } else {
      uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
      d32[0] = d32[1] = d32[2] = d32[3] = 0u;
    }
  }
}

template <bool kBf16>
__global__ void selftest_mma_gemm_kernel(const uint16_t* __restrict__ A, const uint16_t* __restrict__ B,
                                         float* __restrict__ C, int M, int N, int K, int narrow) {
  __shared__ __align__(16) uint16_t As[2][kMmaBM][kMmaAPad];
  __shared__ __align__(16) uint16_t Bs[2][kMmaBK][kMmaBPad];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int m0 = static_cast<int>(blockIdx.y) * kMmaBM, n0 = static_cast<int>(blockIdx.x) * kMmaBN;
  const int wm = (warp >> 1) * 16, wn = (warp & 1) * 16;
  const int nk = K / kMmaBK;
  float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  if (nk > 0) selftest_mma_load_tile(As[0], Bs[0], A, B, M, N, K, m0, n0, 0, tid);
  cp_async_commit();
  for (int kt = 0; kt < nk; ++kt) {
    const int cur = kt & 1;
    if (kt + 1 < nk) selftest_mma_load_tile(As[cur ^ 1], Bs[cur ^ 1], A, B, M, N, K, m0, n0, (kt + 1) * kMmaBK, tid);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    uint32_t a[4], b[4];
    if (!narrow) {
      ldmatrix_x4(a, &As[cur][wm + (lane & 15)][(lane >> 4) * 8]);
      ldmatrix_x4_trans(b, &Bs[cur][lane & 15][wn + (lane >> 4) * 8]);
    } else {
      ldmatrix_x2(a, &As[cur][wm + (lane & 15)][0]);
      ldmatrix_x2(a + 2, &As[cur][wm + (lane & 15)][8]);
      ldmatrix_x1_trans(b, &Bs[cur][lane & 7][wn]);
      ldmatrix_x1_trans(b + 1, &Bs[cur][8 + (lane & 7)][wn]);
      ldmatrix_x2_trans(b + 2, &Bs[cur][lane & 15][wn + 8]);
    }
    const uint32_t b0[2] = {b[0], b[1]};
    const uint32_t b1[2] = {b[2], b[3]};
    if (kBf16) {
      mma_m16n8k16_bf16(acc[0], a, b0, acc[0]);
      mma_m16n8k16_bf16(acc[1], a, b1, acc[1]);
    } else {
      mma_m16n8k16_f16(acc[0], a, b0, acc[0]);
      mma_m16n8k16_f16(acc[1], a, b1, acc[1]);
    }
    __syncthreads();
  }
  cp_async_wait_all();
  const int g = lane >> 2, t = lane & 3;
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) {
      const int row = m0 + wm + g + 8 * (i >> 1), col = n0 + wn + nt * 8 + 2 * t + (i & 1);
      if (row < M && col < N) C[static_cast<size_t>(row) * N + col] = acc[nt][i];
    }
}

extern "C" int LK_SYMBOL(selftest_mma_gemm)(const LkSelftestMmaGemmParams* p, void* stream) {
  if (!p || !p->a || !p->b || !p->c || p->m < 0 || p->n < 0 || p->k < 0 || p->m % 16 || p->n % 16 || p->k % 16 ||
      (p->narrow != 0 && p->narrow != 1))
    return set_error(LK_ERR_INVALID_ARGUMENT, "selftest_mma_gemm: invalid params (m, n, k multiples of 16)");
  if (p->dtype != LK_F16 && p->dtype != LK_BF16)
    return set_error(LK_ERR_UNSUPPORTED_DTYPE, "selftest_mma_gemm: dtype must be LK_F16 or LK_BF16");
  if (p->m == 0 || p->n == 0) return 0;
  const dim3 grid(static_cast<unsigned>((p->n + kMmaBN - 1) / kMmaBN), static_cast<unsigned>((p->m + kMmaBM - 1) / kMmaBM));
  const uint16_t* a = static_cast<const uint16_t*>(p->a);
  const uint16_t* b = static_cast<const uint16_t*>(p->b);
  if (p->dtype == LK_BF16)
    return launch(selftest_mma_gemm_kernel<true>, grid, dim3(128), 0, stream, a, b, p->c, p->m, p->n, p->k, p->narrow);
  return launch(selftest_mma_gemm_kernel<false>, grid, dim3(128), 0, stream, a, b, p->c, p->m, p->n, p->k, p->narrow);
}

/* ------------------------------------------------------------------------------------------------
 * (4b) Launch geometry: the emulator must enforce the GPU's limits and run every thread. */
__global__ void selftest_launch_config_kernel(unsigned int* count, size_t smem_bytes) {
  LK_DYNAMIC_SMEM(unsigned char, smem);
  if (smem_bytes > 0) smem[smem_bytes - 1] = 1;
  atomicAdd(count, 1u);
}

extern "C" int LK_SYMBOL(selftest_launch_config)(const LkSelftestLaunchConfigParams* p, void* stream) {
  if (!p || !p->count) return set_error(LK_ERR_INVALID_ARGUMENT, "selftest_launch_config: invalid params");
  /* The limit is a persistent per-kernel attribute (as on the GPU): set it on every call. */
  const size_t limit = p->raise_smem_limit ? static_cast<size_t>(p->smem_bytes) : 48 * 1024;
  if (int e = set_max_dynamic_smem(selftest_launch_config_kernel, limit)) return e;
  return launch(selftest_launch_config_kernel, dim3(p->grid[0], p->grid[1], p->grid[2]),
                dim3(p->block[0], p->block[1], p->block[2]), static_cast<size_t>(p->smem_bytes), stream, p->count,
                static_cast<size_t>(p->smem_bytes));
}

/* ------------------------------------------------------------------------------------------------
 * (5) Planted bugs. */
static int selftest_bug_check(const LkSelftestBugParams* p, const char* name) {
  if (!p || !p->x || !p->out || p->n < 0) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: invalid params", name);
  return 0;
}

/* out[i] = 2·x[i-1] if i-1 is in the same block, else 2·x[i]; the neighbour's slot is read without a barrier. */
__global__ void selftest_bug_missing_barrier_kernel(const float* __restrict__ x, float* __restrict__ out, int n,
                                                    int fixed) {
  LK_DYNAMIC_SMEM(float, s);
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  s[threadIdx.x] = i < n ? 2.0f * x[i] : 0.0f;
  if (fixed) __syncthreads();
  if (i < n) out[i] = s[threadIdx.x == 0 ? 0 : threadIdx.x - 1];
}

extern "C" int LK_SYMBOL(selftest_bug_missing_barrier)(const LkSelftestBugParams* p, void* stream) {
  if (int e = selftest_bug_check(p, "selftest_bug_missing_barrier")) return e;
  const int bt = p->block_threads ? p->block_threads : 256;
  if (bt < 1 || bt > 1024) return set_error(LK_ERR_INVALID_ARGUMENT, "selftest_bug_missing_barrier: block_threads");
  if (p->n == 0) return 0;
  return launch(selftest_bug_missing_barrier_kernel, dim3(static_cast<unsigned>((p->n + bt - 1) / bt)),
                dim3(static_cast<unsigned>(bt)), sizeof(float) * static_cast<size_t>(bt), stream, p->x, p->out, p->n,
                p->fixed);
}

/* A full-mask shuffle that only lanes 0..15 execute, while lanes 16..31 execute a full-mask ballot: the
 * lanes of the mask meet at collectives of different kinds, which never complete on the GPU (a hang or
 * undefined results). (Had lanes 16..31 simply exited, it would be legal: shfl.sync waits only for the
 * non-exited lanes of its mask, and reading an exited lane is merely undefined.) */
__global__ void selftest_bug_divergent_shuffle_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int lane = static_cast<int>(threadIdx.x & 31u);
  float v = i < n ? x[i] : 0.0f;
  if (lane < 16) {
    v = __shfl_sync(0xffffffffu, v, lane + 16);
  } else {
    v = static_cast<float>(__ballot_sync(0xffffffffu, v > 0.0f));
  }
  if (i < n) out[i] = v;
}

extern "C" int LK_SYMBOL(selftest_bug_divergent_shuffle)(const LkSelftestBugParams* p, void* stream) {
  if (int e = selftest_bug_check(p, "selftest_bug_divergent_shuffle")) return e;
  if (p->n == 0) return 0;
  return launch(selftest_bug_divergent_shuffle_kernel, dim3(static_cast<unsigned>((p->n + 31) / 32)), dim3(32), 0,
                stream, p->x, p->out, p->n);
}

/* __syncthreads in both branches of an if/else: two barriers to the emulator's strict mode. */
__global__ void selftest_bug_barrier_sites_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float s[64];
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  s[threadIdx.x] = i < n ? x[i] : 0.0f;
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  if (i < n) out[i] = s[63 - threadIdx.x];
}

extern "C" int LK_SYMBOL(selftest_bug_barrier_sites)(const LkSelftestBugParams* p, void* stream) {
  if (int e = selftest_bug_check(p, "selftest_bug_barrier_sites")) return e;
  if (p->n == 0) return 0;
  return launch(selftest_bug_barrier_sites_kernel, dim3(static_cast<unsigned>((p->n + 63) / 64)), dim3(64), 0, stream,
                p->x, p->out, p->n);
}

/* cp.async into shared memory, read after a barrier but without cp_async_wait. */
__global__ void selftest_bug_missing_cp_async_wait_kernel(const float* __restrict__ x, float* __restrict__ out,
                                                          int n) {
  __shared__ __align__(16) float s[64];
  const int base = static_cast<int>(blockIdx.x) * 64;
  const int i = base + static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) {
    const int c = base + static_cast<int>(threadIdx.x) * 4;
    if (c + 4 <= n) {
      cp_async_16(&s[threadIdx.x * 4], x + c);
    } else {
      for (int j = 0; j < 4; ++j) s[threadIdx.x * 4 + j] = c + j < n ? x[c + j] : 0.0f;
    }
  }
  cp_async_commit();
  /* BUG: cp_async_wait_all() missing here */
  __syncthreads();
  if (i < n) out[i] = s[threadIdx.x];
}

extern "C" int LK_SYMBOL(selftest_bug_missing_cp_async_wait)(const LkSelftestBugParams* p, void* stream) {
  if (int e = selftest_bug_check(p, "selftest_bug_missing_cp_async_wait")) return e;
  if (p->n == 0) return 0;
  return launch(selftest_bug_missing_cp_async_wait_kernel, dim3(static_cast<unsigned>((p->n + 63) / 64)), dim3(64), 0,
                stream, p->x, p->out, p->n);
}

/* out[i] = x[i] + x[i+1] for every i < n: the last thread reads one element past x. */
__global__ void selftest_bug_off_by_one_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = x[i] + x[i + 1];
}

extern "C" int LK_SYMBOL(selftest_bug_off_by_one)(const LkSelftestBugParams* p, void* stream) {
  if (int e = selftest_bug_check(p, "selftest_bug_off_by_one")) return e;
  if (p->n == 0) return 0;
  return launch(selftest_bug_off_by_one_kernel, dim3(static_cast<unsigned>((p->n + 127) / 128)), dim3(128), 0, stream,
                p->x, p->out, p->n);
}

/* A 16-byte vector, as the kernels' packed loads use. */
struct alignas(16) SelftestVec4 {
  float v[4];
};

/* out[i] = sum of the vector at x + 1 + 4i: every load is 4 bytes past a 16-byte boundary (x itself
 * is 16-byte aligned). */
__global__ void selftest_bug_misaligned_vector_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n / 4 - 1) {
    const SelftestVec4 q = *reinterpret_cast<const SelftestVec4*>(x + 1 + 4 * i);
    out[i] = q.v[0] + q.v[1] + q.v[2] + q.v[3];
  }
}

extern "C" int LK_SYMBOL(selftest_bug_misaligned_vector)(const LkSelftestBugParams* p, void* stream) {
  if (int e = selftest_bug_check(p, "selftest_bug_misaligned_vector")) return e;
  if (p->n < 8) return 0;
  return launch(selftest_bug_misaligned_vector_kernel, dim3(static_cast<unsigned>((p->n / 4 + 127) / 128)), dim3(128), 0,
                stream, p->x, p->out, p->n);
}

LK_NAMESPACE_END
