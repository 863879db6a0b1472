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
  LK_ERR_EMU_WARP = 10103,          /* warp collective misuse: lane not in its mask, mismatched collectives */
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

/* =============================================================================================
 * Multi-adapter serving (DESIGN.md §2). Shared pieces first.
 * ============================================================================================= */

/* One LoRA weight pair of one (adapter, slice); the table is indexed adapter * n_slices + slice.
 *   a: [rank, d_in] row-major, row stride lda >= d_in       (dtype: the launch's w_dtype)
 *   b: [n_s, rank]  row-major, row stride ldb >= rank       (n_s: the slice's width)
 * rank = 0: this adapter does not target this slice (no work, contributes zero).
 * An entry with rank < 0, rank > r_cap, or a null a/b with rank > 0 is invalid: tokens using it are
 * skipped in that slice (their u and out columns of the slice untouched) and LK_FAULT_TABLE_ENTRY is
 * set. Adapters of different ranks live in their own allocations:
 * no memory and no work is spent on padding up to r_cap. */
typedef struct LkAdapterEntry {
  const void* a;
  const void* b;
  int64_t lda;
  int64_t ldb;
  int32_t rank;
  float scale; /* alpha / rank, or alpha / sqrt(rank) with rsLoRA; applied once, in expand */
} LkAdapterEntry;

/* Output columns [offset, offset + n) of out belong to a slice (e.g. Llama-3 q/k/v: 4096/1024/1024). */
typedef struct LkSlice {
  int32_t n;
  int32_t offset;
} LkSlice;

#define LK_MAX_SLICES 8

/* Expand modes. */
enum { LK_EXPAND_ADD = 0, LK_EXPAND_OVERWRITE = 1 };

/* Error word bits (a uint32 the caller zeroes; kernels atomically OR bits in and never clear them). */
enum {
  LK_FAULT_ADAPTER_ID = 1u << 0,  /* a token's adapter id < -1 or >= n_adapters: token skipped */
  LK_FAULT_TABLE_ENTRY = 1u << 1, /* a used table entry is invalid (see LkAdapterEntry): token skipped */
  LK_FAULT_SEGMENTS = 1u << 2,    /* SGMV metadata invalid: the whole launch wrote nothing */
  LK_FAULT_ROW_INDEX = 1u << 3    /* SGMV row_index entry outside [0, tokens): the whole launch wrote nothing */
};

/* ---------------------------------------------------------------------------------------------
 * BGMV (decode): one adapter id per token, tokens in any order.
 *   shrink: u[s, t, 0:rank] = x[t, :] · A(id[t], s)ᵀ            (f32, unscaled)
 *   expand: out[t, off_s : off_s + n_s] (+)= scale(id[t], s) · u[s, t, 0:rank] · B(id[t], s)ᵀ
 * u is f32 [n_slices, tokens, r_cap] (element (s, t, j) at (s * tokens + t) * r_cap + j); its columns
 * [rank, r_cap) are unspecified and never read. Tokens with id -1 are untouched (u and out).
 * x: [tokens, d_in] (ld_x), out: [tokens, ld_out]; x/out dtype = the weights' dtype or LK_F32.
 * --------------------------------------------------------------------------------------------- */
typedef struct LkBgmvShrinkParams {
  const void* x;
  float* u;
  const LkAdapterEntry* table;  /* device array [n_adapters * n_slices] */
  const int32_t* token_adapter; /* device array [tokens] */
  uint32_t* error_word;         /* device; null = no reporting */
  int64_t ld_x;
  int32_t tokens;
  int32_t d_in;
  int32_t n_adapters;
  int32_t n_slices;
  int32_t r_cap;
  int32_t x_dtype;
  int32_t w_dtype;
} LkBgmvShrinkParams;

typedef struct LkBgmvExpandParams {
  const float* u;
  void* out;
  const LkAdapterEntry* table;
  const int32_t* token_adapter;
  uint32_t* error_word;
  int64_t ld_out;
  LkSlice slices[LK_MAX_SLICES];
  int32_t tokens;
  int32_t n_adapters;
  int32_t n_slices;
  int32_t r_cap;
  int32_t out_dtype;
  int32_t w_dtype;
  int32_t mode; /* LK_EXPAND_ADD or LK_EXPAND_OVERWRITE */
} LkBgmvExpandParams;

/* ---------------------------------------------------------------------------------------------
 * SGMV (prefill): positions 0..tokens of a row order row_index (null = identity) form segments
 * [seg_starts[i], seg_starts[i+1]) sharing adapter seg_adapter[i] (-1 = none), i < *n_segments.
 * Position p reads x[row_index[p]] and writes u[s, row_index[p], :] / out[row_index[p]], so u and out
 * are indexed by the original token, exactly as for BGMV. If the metadata is invalid anywhere
 * (*n_segments > max_segments or < 0, seg_starts not non-decreasing or outside [0, tokens], an adapter
 * id out of range, a row_index entry outside [0, tokens)) the whole launch writes nothing and sets
 * LK_FAULT_SEGMENTS (or LK_FAULT_ROW_INDEX). f16/bf16 run on tensor cores (mma.sync), f32 on FMA.
 * Launchers that need scratch take `workspace` of lk_<backend>_sgmv_*_workspace_size(p) bytes.
 * --------------------------------------------------------------------------------------------- */
typedef struct LkSgmvShrinkParams {
  const void* x;
  float* u;
  const LkAdapterEntry* table;
  const int32_t* row_index;   /* [tokens] or null */
  const int32_t* seg_starts;  /* [max_segments + 1] */
  const int32_t* seg_adapter; /* [max_segments] */
  const int32_t* n_segments;  /* device scalar */
  uint32_t* error_word;
  void* workspace;
  int64_t ld_x;
  int32_t tokens;
  int32_t max_segments;
  int32_t d_in;
  int32_t n_adapters;
  int32_t n_slices;
  int32_t r_cap;
  int32_t x_dtype;
  int32_t w_dtype;
} LkSgmvShrinkParams;

typedef struct LkSgmvExpandParams {
  const float* u;
  void* out;
  const LkAdapterEntry* table;
  const int32_t* row_index;
  const int32_t* seg_starts;
  const int32_t* seg_adapter;
  const int32_t* n_segments;
  uint32_t* error_word;
  void* workspace;
  int64_t ld_out;
  LkSlice slices[LK_MAX_SLICES];
  int32_t tokens;
  int32_t max_segments;
  int32_t n_adapters;
  int32_t n_slices;
  int32_t r_cap;
  int32_t out_dtype;
  int32_t w_dtype;
  int32_t mode;
} LkSgmvExpandParams;

/* The planner: per-token adapter ids → a stable sort of the tokens by adapter (row_index) and the SGMV
 * segments, on the device, graph-safe. Segments are in increasing adapter id, one per adapter present
 * (tokens with id -1 form no segment and are left out of row_index's first *n_segments segments: they
 * are placed after the last segment). Ids outside [-1, n_adapters) are treated as -1 and flagged
 * (LK_FAULT_ADAPTER_ID). max_segments must be >= min(tokens, n_adapters). */
typedef struct LkSgmvPlanParams {
  const int32_t* token_adapter; /* [tokens] */
  int32_t* row_index;           /* out [tokens] */
  int32_t* seg_starts;          /* out [max_segments + 1] */
  int32_t* seg_adapter;         /* out [max_segments] */
  int32_t* n_segments;          /* out, device scalar */
  uint32_t* error_word;
  void* workspace;
  int32_t tokens;
  int32_t n_adapters;
  int32_t max_segments;
} LkSgmvPlanParams;

size_t lk_cuda_sgmv_shrink_workspace_size(const LkSgmvShrinkParams* p);
size_t lk_emu_sgmv_shrink_workspace_size(const LkSgmvShrinkParams* p);
size_t lk_cuda_sgmv_expand_workspace_size(const LkSgmvExpandParams* p);
size_t lk_emu_sgmv_expand_workspace_size(const LkSgmvExpandParams* p);
size_t lk_cuda_sgmv_plan_workspace_size(const LkSgmvPlanParams* p);
size_t lk_emu_sgmv_plan_workspace_size(const LkSgmvPlanParams* p);

/* =============================================================================================
 * Training: fused Philox dropout (DESIGN.md §2 "Dropout"). Params and launchers: see below; the
 * family's list of launchers is LK_DROPOUT_LAUNCHERS.
 * ============================================================================================= */
#define LK_DROPOUT_LAUNCHERS(X)

/* =============================================================================================
 * Training: LoRA backward with W frozen (DESIGN.md §4). List: LK_BACKWARD_LAUNCHERS.
 * ============================================================================================= */
#define LK_BACKWARD_LAUNCHERS(X)

/* =============================================================================================
 * In-place merge / unmerge of scale·B·A into W (DESIGN.md §2 "Merge"). List: LK_MERGE_LAUNCHERS.
 *
 * W is d_out × d_in. Stored layout: row-major [d_out, d_in] (row stride ld_w ≥ d_in), or with
 * fan_in_fan_out = 1 (GPT-2 Conv1D) [d_in, d_out] (row stride ld_w ≥ d_out). "Stored rows/cols"
 * below are those of the stored matrix; the flat index of a stored element (row p, col q) is
 * e = p · cols + q (no padding). A is [rank, d_in] (lda ≥ d_in), B is [d_out, rank] (ldb ≥ rank);
 * A and B share one dtype: W's dtype or LK_F32. W is f32, f16 or bf16.
 *
 * Arithmetic (the same ops on cpu, emu and cuda: the same bits): for W element (i, j)
 *   acc = 0; for r in 0..rank: acc = fmaf(B[i, r], A[r, j], acc)          (f32, increasing r)
 *   merge:   W[i, j] = round(fmaf( scale, acc, W[i, j]))
 *   unmerge: W[i, j] = round(fmaf(-scale, acc, W[i, j]))
 * round = f32 → W's dtype, nearest-even; NaN results are stored as the canonical NaN (0x7fff for
 * f16/bf16, 0x7fffffff for f32). scale must be finite.
 *
 * Modes (flags):
 *  0                one pass, writes W.
 *  LK_MERGE_SAFE    a check pass computes every would-be result; if any is non-finite, nothing is
 *                   written and LK_MERGE_STATUS_NONFINITE is set in *status. Needs the workspace.
 *  LK_MERGE_EXACT   direction MERGE: also writes a correction record so that an exact unmerge
 *                   restores W bit for bit; needs the workspace. If the exceptions do not fit in
 *                   exc_capacity, NOTHING is written (W untouched), record_header[0] holds the number
 *                   needed and LK_MERGE_STATUS_OVERFLOW is set: retry with a larger capacity.
 *                   Combines with LK_MERGE_SAFE.
 *                   direction UNMERGE: applies the record (no workspace; SAFE not allowed).
 * Correction record of a merge with stored shape rows × cols:
 *   codes[rows * ceil(cols / 16)]  2 bits per element, element (p, q) in word p·ceil(cols/16) + q/16
 *       at bit 2·(q % 16). With u = the plain unmerge of the merged value and key() the order-
 *       preserving integer of W's bit pattern (key = mag for sign 0, −mag − 1 for sign 1, so −0 < +0):
 *       0: W = u;  1: W = from_key(key(u) + 1);  2: W = from_key(key(u) − 1);  3: exception.
 *   exc_index[exc_capacity] (u64 flat index e), exc_bits[exc_capacity] (the original bit pattern,
 *       zero-extended): the exceptions, in increasing e.
 *   record_header[2] (u64): [0] = number of exceptions (needed, even beyond capacity),
 *       [1] = 1 if the record is valid (the merge was written), else 0.
 * A record made on one backend applies on any other (same format, same bits).
 * Graph-safe: geometry from host-known sizes; the write pass reads the check's verdict from the
 * workspace on the device; *status is an error word (bits ORed in, never cleared: the caller zeroes
 * it; null = no reporting).
 * ============================================================================================= */
enum { LK_MERGE_MERGE = 0, LK_MERGE_UNMERGE = 1 };
enum { LK_MERGE_SAFE = 1, LK_MERGE_EXACT = 2 };
enum {
  LK_MERGE_STATUS_NONFINITE = 1u << 0, /* safe mode: a result was non-finite; W untouched */
  LK_MERGE_STATUS_OVERFLOW = 1u << 1,  /* exact merge: exceptions exceed exc_capacity; W untouched */
  LK_MERGE_STATUS_BAD_RECORD = 1u << 2 /* exact unmerge: record invalid (W untouched) or an index out
                                          of range (that exception skipped) */
};

typedef struct LkMergeParams {
  void* w;
  const void* a;
  const void* b;
  uint32_t* status;         /* error word, may be null */
  void* workspace;          /* lk_<backend>_merge_workspace_size(p) bytes (safe / exact merge) */
  uint32_t* codes;          /* exact */
  uint64_t* exc_index;      /* exact: [exc_capacity] */
  uint32_t* exc_bits;       /* exact: [exc_capacity] */
  uint64_t* record_header;  /* exact: [2] */
  int64_t ld_w;
  int64_t lda;
  int64_t ldb;
  int64_t exc_capacity;
  int32_t d_out;
  int32_t d_in;
  int32_t rank;
  float scale;
  int32_t w_dtype;         /* LkDtype */
  int32_t ab_dtype;        /* LkDtype: w_dtype or LK_F32 */
  int32_t direction;       /* LK_MERGE_MERGE or LK_MERGE_UNMERGE */
  int32_t fan_in_fan_out;  /* 0: W stored [d_out, d_in]; 1: [d_in, d_out] */
  int32_t flags;           /* LK_MERGE_SAFE | LK_MERGE_EXACT */
} LkMergeParams;

size_t lk_cuda_merge_workspace_size(const LkMergeParams* p);
size_t lk_emu_merge_workspace_size(const LkMergeParams* p);

#define LK_MERGE_LAUNCHERS(X) X(merge_apply, LkMergeParams)

/* The one list of launchers: X(symbol suffix, params type). Both prefixed sets are declared from it. */
#define LK_LAUNCHERS(X)                     \
  X(shrink_dense, LkShrinkDenseParams)      \
  X(bgmv_shrink, LkBgmvShrinkParams)        \
  X(bgmv_expand, LkBgmvExpandParams)        \
  X(sgmv_shrink, LkSgmvShrinkParams)        \
  X(sgmv_expand, LkSgmvExpandParams)        \
  X(sgmv_plan, LkSgmvPlanParams)          \
  LK_DROPOUT_LAUNCHERS(X)                 \
  LK_BACKWARD_LAUNCHERS(X)                \
  LK_MERGE_LAUNCHERS(X)

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
