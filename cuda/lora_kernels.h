/*
 * lora_kernels.h — the C ABI of lora-kernels.
 *
 * Every launcher exists twice, once per backend, with the same parameters:
 *   lk_cuda_<family>_<op>  the GPU build (liblora_kernels_cuda.a / .so, nvcc + cudart_static)
 *   lk_emu_<family>_<op>   the same kernel source run on the CPU by the SIMT emulator
 *                          (liblora_kernels_emu.a, g++)
 * A launcher takes a pointer to its params struct and a stream (a cudaStream_t passed as void*;
 * null = default stream; ignored by emu, which runs synchronously). It returns 0, a CUDA error code,
 * or one of the LK_ERR_* codes below (10000 and up, never colliding with CUDA's), and
 * lk_<backend>_last_error_message() then describes the failure (thread-local; emulator faults name
 * the block and thread). No launcher synchronises, allocates, or reads device memory on the host.
 *
 * This file is plain C (C99 and C++); Rust's bindings are generated from it by bindgen, so no struct
 * layout is ever typed twice.
 */
#ifndef LORA_KERNELS_H
#define LORA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of tensors. Accumulation is always f32. */
typedef enum LkDtype { LK_F32 = 0, LK_F16 = 1, LK_BF16 = 2 } LkDtype;

/* Error codes (0 = success; CUDA error codes pass through unchanged). */
enum {
  LK_OK = 0,
  LK_ERR_INVALID_ARGUMENT = 10001,  /* a params field is out of range (null pointer, negative size) */
  LK_ERR_UNSUPPORTED_DTYPE = 10002, /* dtype combination this launcher does not implement */
  /* SIMT emulator faults: the message names the block and thread. */
  LK_ERR_EMU_LAUNCH_CONFIG = 10100, /* block > 1024 threads, grid x > 2^31-1 or y/z > 65535, smem limits */
  LK_ERR_EMU_BARRIER = 10101,       /* __syncthreads reached at different call sites (strict mode) */
  LK_ERR_EMU_DEADLOCK = 10102,      /* no thread can make progress */
  LK_ERR_EMU_WARP = 10103,          /* warp collective misuse: lane not in mask, exited lane, divergence */
  LK_ERR_EMU_STACK_OVERFLOW = 10104,/* a thread overflowed its fiber stack */
  LK_ERR_EMU_ASYNC_COPY = 10105,    /* cp.async misuse (copies never waited for, bad size/alignment) */
  LK_ERR_EMU_INTERNAL = 10106       /* the emulator itself failed (mmap, thread creation) */
};

/* ---------------------------------------------------------------------------------------------
 * shrink / dense: single-adapter LoRA shrink, u = x · Aᵀ (unscaled; the scale belongs to expand).
 *   x: [tokens, d_in] (row stride ld_x elements), dtype x_dtype (the weights' dtype or LK_F32)
 *   a: [rank, d_in]   (row stride lda elements),  dtype w_dtype
 *   u: [tokens, rank] f32 (row stride ld_u elements), overwritten.
 * Reduction over d_in in a fixed order: results are deterministic and batch-invariant.
 * --------------------------------------------------------------------------------------------- */
typedef struct LkShrinkDenseParams {
  const void* x;
  const void* a;
  float* u;
  int64_t ld_x;
  int64_t lda;
  int64_t ld_u;
  int32_t tokens;
  int32_t d_in;
  int32_t rank;
  int32_t x_dtype; /* LkDtype */
  int32_t w_dtype; /* LkDtype */
} LkShrinkDenseParams;

/* The one list of launchers: X(symbol suffix, params type). Both prefixed sets are declared from it. */
#define LK_LAUNCHERS(X) X(shrink_dense, LkShrinkDenseParams)

#define LK_DECLARE_CUDA_LAUNCHER(name, params) int lk_cuda_##name(const params* p, void* stream);
#define LK_DECLARE_EMU_LAUNCHER(name, params) int lk_emu_##name(const params* p, void* stream);
LK_LAUNCHERS(LK_DECLARE_CUDA_LAUNCHER)
LK_LAUNCHERS(LK_DECLARE_EMU_LAUNCHER)
#undef LK_DECLARE_CUDA_LAUNCHER
#undef LK_DECLARE_EMU_LAUNCHER

/* Thread-local description of the last failure on this host thread ("" if none). */
const char* lk_cuda_last_error_message(void);
const char* lk_emu_last_error_message(void);

/* Emulator only: pins the thread schedule of launches made from the calling host thread, overriding
 * LK_EMU_ORDER / LK_EMU_SEED (order "fwd", "rev" or "rand"); order = NULL returns to the environment's
 * setting. Returns 0 or LK_ERR_INVALID_ARGUMENT. */
int lk_emu_set_schedule(const char* order, uint64_t seed);

#ifdef __cplusplus
}
#endif
#endif /* LORA_KERNELS_H */
