/*
 * selftest.h — self-test kernels of the SIMT emulator (and, on a GPU, of the emulator's fidelity).
 *
 * Each launcher exists twice, like those of lora_kernels.h: lk_cuda_selftest_* (nvcc) and
 * lk_emu_selftest_* (g++, run by the emulator). Buffers are device memory for cuda, host memory for emu.
 * Launchers return 0, a CUDA error code, LK_ERR_INVALID_ARGUMENT, or an LK_ERR_EMU_* code.
 *
 * Correct kernels (results must match plain loops on every backend and schedule):
 *   selftest_reduce     out[r] = sum of x[r*n .. r*n+n) (f32; warp shuffles down/xor + shared memory);
 *                       one block of block_threads (a multiple of 32, 32..1024) per row.
 *   selftest_warp_ops   per thread, LK_SELFTEST_WARP_OPS_OUTPUTS int32 results of shuffles (all four
 *                       kinds, widths 1..32, full and partial masks, 4- and 8-byte types) and votes on
 *                       in[]; must match the GPU bit for bit (golden test). Threads = blocks·block_threads,
 *                       block_threads a multiple of 32.
 *   selftest_matmul     C[M,N] = A[M,K]·B[K,N], f32 row-major, 16x16 tiles, any sizes.
 *   selftest_mma_gemm   C[M,N] = A[M,K]·B[K,N], A and B f16 or bf16 row-major (dtype LK_F16/LK_BF16),
 *                       C f32; mma.sync m16n8k16 + ldmatrix + cp.async double buffering; M, N, K multiples of
 *                       16. narrow = 0 loads fragments with ldmatrix .x4/.x4.trans, 1 with .x2/.x1(.trans).
 * Planted bugs (for the emulator's tests; on a GPU their results are undefined):
 *   selftest_bug_missing_barrier  out[i] = 2·x[i-1] (2·x[0] for i = 0) within blocks of block_threads,
 *                       read from shared memory a neighbour wrote, without __syncthreads unless fixed != 0:
 *                       correct under forward order, wrong under reverse and random orders.
 *   selftest_bug_divergent_shuffle  a full-mask __shfl_sync inside `if (lane < 16)` while lanes 16..31
 *                       run a full-mask __ballot_sync → LK_ERR_EMU_WARP.
 *   selftest_bug_barrier_sites      __syncthreads at two call sites in if/else → LK_ERR_EMU_BARRIER (strict).
 *   selftest_bug_missing_cp_async_wait  cp.async into shared memory read without cp_async_wait: reads
 *                       poison, then LK_ERR_EMU_ASYNC_COPY at thread exit.
 *   selftest_bug_off_by_one       out[i] = x[i] + x[i+1] for i < n: reads x[n] (AddressSanitizer's report).
 *   selftest_bug_misaligned_vector out[i] = sum of the 16-byte vector at x + 1 + 4i (i < n/4 - 1): a
 *                       vector load 4 bytes off its 16-byte alignment, a fault on a GPU; UBSan's
 *                       alignment check reports it in the sanitizer build. Never launch it on a GPU.
 */
#ifndef LK_SELFTEST_H
#define LK_SELFTEST_H

#include "lora_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LK_SELFTEST_WARP_OPS_OUTPUTS 80
#define LK_SELFTEST_WARP_OPS_SENTINEL 0x5A5A5A5A /* written by lanes outside a partial mask, and as padding */

typedef struct LkSelftestReduceParams {
  const float* x; /* [rows, n] */
  float* out;     /* [rows] */
  int32_t rows;
  int32_t n;
  int32_t block_threads;
} LkSelftestReduceParams;

typedef struct LkSelftestWarpOpsParams {
  const int32_t* in; /* [blocks * block_threads] */
  int32_t* out;      /* [blocks * block_threads * LK_SELFTEST_WARP_OPS_OUTPUTS] */
  int32_t blocks;
  int32_t block_threads;
} LkSelftestWarpOpsParams;

typedef struct LkSelftestMatmulParams {
  const float* a; /* [m, k] */
  const float* b; /* [k, n] */
  float* c;       /* [m, n] */
  int32_t m;
  int32_t n;
  int32_t k;
} LkSelftestMatmulParams;

typedef struct LkSelftestMmaGemmParams {
  const void* a; /* [m, k] f16 or bf16 */
  const void* b; /* [k, n] same dtype */
  float* c;      /* [m, n] */
  int32_t m;
  int32_t n;
  int32_t k;
  int32_t dtype; /* LK_F16 or LK_BF16 */
  int32_t narrow;
} LkSelftestMmaGemmParams;

typedef struct LkSelftestBugParams {
  const float* x; /* [n] */
  float* out;     /* [n] */
  int32_t n;
  int32_t block_threads; /* missing_barrier only (0 = 256) */
  int32_t fixed;         /* missing_barrier only: 1 = with the barrier */
} LkSelftestBugParams;

/* selftest_launch_config: launches a kernel with exactly this geometry; every thread atomically adds 1
 * to *count (so count = threads run) and touches the last byte of its dynamic shared memory.
 * The kernel's dynamic shared memory limit is first set to smem_bytes if raise_smem_limit != 0, else to
 * the default 48 KiB (the attribute persists per kernel, as on the GPU). */
typedef struct LkSelftestLaunchConfigParams {
  unsigned int* count;
  uint32_t grid[3];
  uint32_t block[3];
  uint64_t smem_bytes;
  int32_t raise_smem_limit;
} LkSelftestLaunchConfigParams;

#define LK_SELFTEST_LAUNCHERS(X)                                  \
  X(selftest_launch_config, LkSelftestLaunchConfigParams)         \
  X(selftest_reduce, LkSelftestReduceParams)                      \
  X(selftest_warp_ops, LkSelftestWarpOpsParams)                   \
  X(selftest_matmul, LkSelftestMatmulParams)                      \
  X(selftest_mma_gemm, LkSelftestMmaGemmParams)                   \
  X(selftest_bug_missing_barrier, LkSelftestBugParams)            \
  X(selftest_bug_divergent_shuffle, LkSelftestBugParams)          \
  X(selftest_bug_barrier_sites, LkSelftestBugParams)              \
  X(selftest_bug_missing_cp_async_wait, LkSelftestBugParams)      \
  X(selftest_bug_off_by_one, LkSelftestBugParams)                 \
  X(selftest_bug_misaligned_vector, LkSelftestBugParams)

#define LK_DECLARE_CUDA_SELFTEST(name, params) int lk_cuda_##name(const params* p, void* stream);
#define LK_DECLARE_EMU_SELFTEST(name, params) int lk_emu_##name(const params* p, void* stream);
LK_SELFTEST_LAUNCHERS(LK_DECLARE_CUDA_SELFTEST)
LK_SELFTEST_LAUNCHERS(LK_DECLARE_EMU_SELFTEST)
#undef LK_DECLARE_CUDA_SELFTEST
#undef LK_DECLARE_EMU_SELFTEST

#ifdef __cplusplus
}
#endif
#endif /* LK_SELFTEST_H */
