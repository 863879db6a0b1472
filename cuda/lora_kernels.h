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
 * Launchers that need scratch take `workspace` of lk_<backend>_sgmv_*_workspace_size(p) bytes
 * (every workspace of this header: at least 8-byte aligned; cudaMalloc's 256-byte alignment is ideal).
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
  /* Fused dropout (training; DESIGN.md §2): u = drop(x) · Aᵀ with slice s's mask drawn from
   * Philox(seed, dropout_offset[s]) at element token · d_in + col, and the keep scale applied once to
   * each finished dot product (u = keep_scale · Σ_kept x·a). dropout_threshold = 0 means no dropout
   * (zero-initialised params have none); p = 1 is threshold 2^32 − 1 with keep_scale 0. */
  uint64_t dropout_seed;
  uint64_t dropout_offset[LK_MAX_SLICES];
  uint32_t dropout_threshold;
  float dropout_keep_scale;
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
 *
 * The host turns p into `threshold` = min(floor(p · 2^32), 2^32 − 1) (in f64) and `keep_scale` =
 * 1/(1−p) rounded to f32 (0 when p = 1); kernels never see p. Element e — flat index
 * token · d + col with the ORIGINAL token index (token_base + row) — uses word e % 4 of
 * Philox4x32-10(counter (lo32(e/4), hi32(e/4), lo32(offset), hi32(offset)), key (lo32(seed),
 * hi32(seed))) and is dropped iff word < threshold. threshold = 0 drops nothing and keep_scale = 0
 * drops everything, both without RNG work. So a mask depends only on (seed, offset, e): never on
 * tiling, launch geometry, leading dimensions or backend. Kept elements become
 * x̂ = to_f32(x) · keep_scale (one f32 multiply, round to nearest even), dropped ones +0.
 * ============================================================================================= */

/* The host-computed dropout of one launch (one target module's stream: its own offset). */
typedef struct LkDropoutConfig {
  uint64_t seed;
  uint64_t offset;
  uint32_t threshold;
  float keep_scale; /* finite, >= 0 */
} LkDropoutConfig;

/* dropout_forward:  y[t, c] = m[t, c] · x[t, c] · keep_scale      (overwrite)
 * dropout_backward: dx[t, c] = m[t, c] · dy[t, c] · keep_scale    (the same mask, regenerated)
 * x: [tokens, d] (row stride ld_x), y: [tokens, d] (row stride ld_y), both of dtype `dtype`;
 * y = from_dtype(to_f32(x) · keep_scale) or +0. Row t is original token token_base + t.
 * In place is allowed (x == y with ld_x == ld_y); otherwise x and y must not overlap. For backward,
 * x is dy and y is dx. */
typedef struct LkDropoutParams {
  const void* x;
  void* y;
  int64_t ld_x;
  int64_t ld_y;
  int64_t token_base; /* original index of row 0 (a sub-batch keeps its tokens' masks) */
  LkDropoutConfig drop;
  int32_t tokens;
  int32_t d;
  int32_t dtype; /* LkDtype, for x and y */
} LkDropoutParams;

/* dropout_shrink_dense: the training shrink with dropout fused into the load of x,
 *   u[t, j] = Σ_k x̂[t, k] · A[j, k],   x̂ = m ⊙ x · keep_scale   (u unscaled, f32)
 * Layout and dtypes as LkShrinkDenseParams; element (t, k) has flat index
 * (token_base + t) · d_in + k. No mask and no x̂ is ever written. Bit-identical to shrink_dense run
 * on the f32 tensor x̂ (same per-lane FMA chains over k ≡ lane (mod 32), same xor butterfly):
 * deterministic and batch-invariant. */
typedef struct LkShrinkDenseDropoutParams {
  const void* x;
  const void* a;
  float* u;
  int64_t ld_x;
  int64_t lda;
  int64_t ld_u;
  int64_t token_base;
  LkDropoutConfig drop;
  int32_t tokens;
  int32_t d_in;
  int32_t rank;
  int32_t x_dtype; /* LkDtype: the weights' dtype or LK_F32 */
  int32_t w_dtype; /* LkDtype */
} LkShrinkDenseDropoutParams;

#define LK_DROPOUT_LAUNCHERS(X)             \
  X(dropout_forward, LkDropoutParams)       \
  X(dropout_backward, LkDropoutParams)      \
  X(dropout_shrink_dense, LkShrinkDenseDropoutParams)

/* =============================================================================================
 * Training: LoRA backward with W frozen (DESIGN.md §4). List: LK_BACKWARD_LAUNCHERS.
 *
 * With x̂ = m ⊙ x / (1 − p) (dropout), u = x̂ · Aᵀ (f32, unscaled, saved by the forward), G = dL/dout:
 *   du = s · G · B          [tokens, rank] f32 (overwritten)
 *   dB = s · Gᵀ · u         [d_out, rank]  f32 (overwritten, or accumulated: dB += …)
 *   dA = duᵀ · x̂            [rank, d_in]   f32 (overwritten, or accumulated)
 *   dx += m ⊙ (du · A) / (1 − p)           (accumulated; the G · W part is the base GEMM's)
 * dA and dB reduce over tokens with a fixed split (pieces of C = max(256, ceil(tokens / 32)) tokens,
 * partials in the workspace, summed in piece order by a second pass): no float atomics, bit-identical
 * run to run and under any schedule. x, G and dx are each in the weights' dtype or f32.
 *
 * Dropout (seed, offset per slice, threshold, keep_scale; DESIGN.md §2 "Dropout"): the forward's mask is
 * regenerated, never stored — x̂ = to_f32(x) · keep_scale for kept elements (the fused dropout shrink's
 * f32 product), and dx += keep_scale · (du · A) for kept elements. Threshold 0 with keep_scale 1 is no
 * dropout (no RNG work, bit-identical); keep_scale must be finite and ≥ 0.
 * ============================================================================================= */

/* Gradient mode of dA / dB. */
enum { LK_GRAD_OVERWRITE = 0, LK_GRAD_ACCUMULATE = 1 };

/* Single adapter, dense rows. Leading dimensions in elements. */
typedef struct LkBackwardDenseParams {
  const void* x;   /* [tokens, d_in]  (ld_x),  x_dtype: the layer input the forward saw */
  const void* g;   /* [tokens, d_out] (ld_g),  g_dtype: dL/dout */
  const float* u;  /* [tokens, rank]  (ld_u),  f32: the forward's unscaled x̂ · Aᵀ */
  const void* a;   /* [rank, d_in]    (lda),   w_dtype */
  const void* b;   /* [d_out, rank]   (ldb),   w_dtype */
  float* da;       /* [rank, d_in]    (ld_da), f32 */
  float* db;       /* [d_out, rank]   (ld_db), f32 */
  float* du;       /* [tokens, rank]  (ld_du), f32, overwritten (scratch or returned) */
  void* dx;        /* [tokens, d_in]  (ld_dx), dx_dtype, accumulated; null = input gradient not wanted */
  void* workspace; /* lk_<backend>_backward_dense_workspace_size(p) bytes (null when that is 0) */
  int64_t ld_x;
  int64_t ld_g;
  int64_t ld_u;
  int64_t lda;
  int64_t ldb;
  int64_t ld_da;
  int64_t ld_db;
  int64_t ld_du;
  int64_t ld_dx;
  uint64_t dropout_seed;   /* the forward's dropout seed */
  uint64_t dropout_offset; /* the forward's Philox offset (this target module's stream) */
  int32_t tokens;
  int32_t d_in;
  int32_t d_out;
  int32_t rank;
  float scale;        /* s = alpha / rank (or alpha / sqrt(rank)) */
  int32_t grad_mode;  /* LK_GRAD_OVERWRITE or LK_GRAD_ACCUMULATE (dA, dB) */
  int32_t x_dtype;    /* LkDtype: the weights' dtype or LK_F32 */
  int32_t g_dtype;    /* LkDtype: the weights' dtype or LK_F32 */
  int32_t dx_dtype;   /* LkDtype: the weights' dtype or LK_F32 (ignored when dx is null) */
  int32_t w_dtype;    /* LkDtype */
  uint32_t dropout_threshold; /* min(floor(p · 2^32), 2^32 − 1); 0 = no dropout */
  float dropout_keep_scale;   /* 1/(1−p) (0 when p = 1) */
} LkBackwardDenseParams;

/* Gradient buffers of one (adapter, slice), indexed like the adapter table (adapter * n_slices + slice).
 *   da: [rank, d_in] f32, row stride ld_da >= d_in;  db: [n_s, rank] f32, row stride ld_db >= rank.
 * A null da (db) means that gradient is not wanted (e.g. a frozen adapter in the batch): du and dx are
 * still computed. */
typedef struct LkAdapterGradEntry {
  float* da;
  float* db;
  int64_t ld_da;
  int64_t ld_db;
} LkAdapterGradEntry;

/* Several adapters in one batch, over SGMV segments (the same plan as the forward's SGMV: row_index,
 * seg_starts, seg_adapter, n_segments; see "SGMV" above). u and du are f32 [n_slices, tokens, r_cap]
 * indexed by the original token, as the forward's u; G's slice s is columns [off_s, off_s + n_s) of
 * g (ld_g). dx[t] += Σ_s du_s[t] · A_s. Backward needs each adapter's tokens in one segment: among the
 * non-empty segments with an adapter >= 0 the adapter ids must increase strictly (the planner's output
 * does); otherwise, or if the metadata is invalid as for SGMV, the launch writes nothing and sets
 * LK_FAULT_SEGMENTS (LK_FAULT_ROW_INDEX). row_index must be a permutation (as for SGMV).
 * Gradients of (adapter, slice) pairs that receive no token are untouched in both grad modes (zero them
 * first when overwriting); tokens in −1 segments or uncovered are untouched (du, dx). An invalid table
 * entry is skipped in that slice and flagged (LK_FAULT_TABLE_ENTRY), as in the forward. */
typedef struct LkBackwardSgmvParams {
  const void* x;
  const void* g;
  const float* u;
  float* du;
  void* dx;                        /* null = input gradient not wanted */
  const LkAdapterEntry* table;     /* [n_adapters * n_slices] */
  const LkAdapterGradEntry* grads; /* [n_adapters * n_slices] */
  const int32_t* row_index;        /* [tokens] or null */
  const int32_t* seg_starts;       /* [max_segments + 1] */
  const int32_t* seg_adapter;      /* [max_segments] */
  const int32_t* n_segments;       /* device scalar */
  uint32_t* error_word;
  void* workspace;                 /* lk_<backend>_backward_sgmv_workspace_size(p) bytes */
  int64_t ld_x;
  int64_t ld_g;
  int64_t ld_dx;
  LkSlice slices[LK_MAX_SLICES];
  uint64_t dropout_seed;                   /* the forward's dropout seed */
  uint64_t dropout_offset[LK_MAX_SLICES];  /* one Philox stream per slice (target module) */
  int32_t tokens;
  int32_t max_segments;
  int32_t d_in;
  int32_t n_adapters;
  int32_t n_slices;
  int32_t r_cap;
  int32_t grad_mode;
  int32_t x_dtype;
  int32_t g_dtype;
  int32_t dx_dtype;
  int32_t w_dtype;
  uint32_t dropout_threshold; /* min(floor(p · 2^32), 2^32 − 1); 0 = no dropout */
  float dropout_keep_scale;   /* 1/(1−p) (0 when p = 1) */
} LkBackwardSgmvParams;

size_t lk_cuda_backward_dense_workspace_size(const LkBackwardDenseParams* p);
size_t lk_emu_backward_dense_workspace_size(const LkBackwardDenseParams* p);
size_t lk_cuda_backward_sgmv_workspace_size(const LkBackwardSgmvParams* p);
size_t lk_emu_backward_sgmv_workspace_size(const LkBackwardSgmvParams* p);

#define LK_BACKWARD_LAUNCHERS(X)               \
  X(backward_dense, LkBackwardDenseParams)     \
  X(backward_sgmv, LkBackwardSgmvParams)

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

/* =============================================================================================
 * The reference transformer block's kernels (issue #7): one section per family, each defining its
 * LK_<FAMILY>_LAUNCHERS list. Faults from device-resident indices (token ids, targets, positions,
 * KV-cache slots) are OR-ed into a caller-zeroed uint32 error word: the element is skipped.
 * ============================================================================================= */
enum {
  LK_FAULT_INDEX = 1u << 4 /* a device-resident index (token id, target, position, slot) out of range: skipped */
};

/* ---- gemm (cuda/gemm.cu) ---- */
/* C = alpha · op(A) · op(B) + beta · C, all row-major, one dtype (f32, f16 or bf16), f32 accumulate.
 *   op(A) [m, k]: a_trans = 0: A stored [m, k] (row stride lda >= k); 1: A stored [k, m] (lda >= m).
 *   op(B) [k, n]: b_trans = 0: B stored [k, n] (ldb >= n);             1: B stored [n, k] (ldb >= k).
 *   C [m, n] (row stride ldc >= n): columns [n, ldc) are never touched. beta == 0 never reads C.
 * Epilogue in f32: c = round_T(fmaf(beta, c, alpha · acc)) (beta == 0: round_T(alpha · acc)).
 * Each C element is one fixed-order reduction over k (no split-K): deterministic and batch-invariant
 * (row i's bits do not depend on m, column j's not on n). f16/bf16 on tensor cores, f32 on FMA. */
typedef struct LkGemmParams {
  const void* a;
  const void* b;
  void* c;
  int64_t lda;
  int64_t ldb;
  int64_t ldc;
  int32_t m;
  int32_t n;
  int32_t k;
  int32_t a_trans; /* 0 or 1 */
  int32_t b_trans; /* 0 or 1 */
  float alpha;
  float beta;
  int32_t dtype; /* LkDtype */
} LkGemmParams;

#define LK_GEMM_LAUNCHERS(X) X(gemm, LkGemmParams)
/* ---- end gemm ---- */

/* ---- attention (cuda/attention.cu) ---- */
/* Causal attention over packed variable-length sequences with grouped KV heads (flash-attn varlen
 * layout). q [tokens, n_heads·head_dim], k, v [tokens, n_kv_heads·head_dim], row-major packed; head h
 * uses kv head h / (n_heads / n_kv_heads). seq_starts [n_seqs + 1] (device, int32): sequence i is
 * rows [s_i, s_{i+1}); it is valid iff 0 <= s_0 <= s_1 <= ... <= s_{i+1} <= tokens and
 * s_{i+1} - s_i <= max_seq_len. An invalid sequence is skipped (its rows untouched) and
 * LK_FAULT_INDEX is OR-ed into *fault (null = no reporting); s_0 != 0 or s_n != tokens is flagged too.
 * head_dim in {16, 32, 64, 128}; dtype (LkDtype) is the storage type of every T tensor, compute f32.
 * The scores are scale · q·k. */
typedef struct LkAttentionForwardParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;                 /* [tokens, n_heads·head_dim] T, overwrite */
  float* lse;                /* [tokens, n_heads] f32, natural-log logsumexp of the scaled scores */
  const int32_t* seq_starts; /* [n_seqs + 1] */
  uint32_t* fault;           /* error word, may be null */
  float scale;
  int32_t tokens;
  int32_t n_seqs;
  int32_t max_seq_len;
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t head_dim;
  int32_t dtype;
} LkAttentionForwardParams;

/* dq, dk, dv [same shapes as q, k, v] overwrite (rows of valid sequences). Deterministic: D =
 * rowsum(dO∘O) into the workspace, then one kernel for dq (per query block, key blocks in order) and
 * one for dk/dv (per key block: the group's query heads in increasing order, query blocks in order). */
typedef struct LkAttentionBackwardParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const float* lse;
  const void* d_out;
  void* dq;
  void* dk;
  void* dv;
  void* workspace; /* lk_<backend>_attention_backward_workspace_size(p) bytes, 16-byte aligned */
  const int32_t* seq_starts;
  uint32_t* fault;
  float scale;
  int32_t tokens;
  int32_t n_seqs;
  int32_t max_seq_len;
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t head_dim;
  int32_t dtype;
} LkAttentionBackwardParams;

/* cache [cache_rows, kv_dim] row t of rows [tokens, kv_dim] → cache row slots[t]; a slot outside
 * [0, cache_rows) is skipped + LK_FAULT_INDEX. Duplicate slots: one of the rows lands (unspecified). */
typedef struct LkKvCacheWriteParams {
  const void* rows;
  const int32_t* slots;
  void* cache;
  uint32_t* fault;
  int64_t cache_rows;
  int32_t kv_dim;
  int32_t tokens;
  int32_t dtype;
} LkKvCacheWriteParams;

/* Decode: q [n_seqs, n_heads·head_dim]; sequence i attends (no mask) to cache rows
 * [kv_start[i], kv_start[i] + kv_len[i]) of k_cache, v_cache [cache_rows, n_kv_heads·head_dim].
 * kv_start < 0, kv_len < 0, kv_len > max_kv_len or past cache_rows: row untouched + LK_FAULT_INDEX;
 * kv_len 0: output row zeros. Keys are split in fixed chunks (flash-decoding); partials in the
 * workspace, combined in a fixed order. */
typedef struct LkAttentionDecodeParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int32_t* kv_start;
  const int32_t* kv_len;
  void* out;
  void* workspace; /* lk_<backend>_attention_decode_workspace_size(p) bytes, 16-byte aligned */
  uint32_t* fault;
  int64_t cache_rows;
  float scale;
  int32_t n_seqs;
  int32_t max_kv_len;
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t head_dim;
  int32_t dtype;
} LkAttentionDecodeParams;

size_t lk_cuda_attention_backward_workspace_size(const LkAttentionBackwardParams* p);
size_t lk_emu_attention_backward_workspace_size(const LkAttentionBackwardParams* p);
size_t lk_cuda_attention_decode_workspace_size(const LkAttentionDecodeParams* p);
size_t lk_emu_attention_decode_workspace_size(const LkAttentionDecodeParams* p);

#define LK_ATTENTION_LAUNCHERS(X)                        \
  X(attention_forward, LkAttentionForwardParams)         \
  X(attention_backward, LkAttentionBackwardParams)       \
  X(attention_kv_cache_write, LkKvCacheWriteParams)      \
  X(attention_decode, LkAttentionDecodeParams)
/* ---- end attention ---- */

/* ---- norm (cuda/norm.cu) ---- */
/* RMSNorm (Llama): x, y, dy, dx [rows, dim] packed row-major; w, dw [dim]; rstd [rows] f32.
 *   forward:  rstd[r] = 1/sqrt(mean_j x[r,j]^2 + eps) (1/sqrt(eps) when dim = 0); y = x · rstd · w.
 *   backward: c[r] = sum_j dy·w·x; dx = rstd·w·dy − (rstd^3/dim)·x·c; dw[j] = sum_r dy·x·rstd
 *             (fixed split over rows into workspace partials, summed in piece order: deterministic).
 * One dtype for x, w, y, dy, dx, dw (LkDtype); f32 arithmetic. eps finite and >= 0. The backward's
 * workspace: lk_<backend>_norm_rmsnorm_backward_workspace_size(p) bytes, 4-byte aligned (may be 0: then
 * null is fine). */
typedef struct LkRmsNormForwardParams {
  const void* x;
  const void* w;
  void* y;
  float* rstd;
  int32_t rows;
  int32_t dim;
  float eps;
  int32_t dtype; /* LkDtype */
} LkRmsNormForwardParams;

typedef struct LkRmsNormBackwardParams {
  const void* x;
  const void* w;
  const float* rstd;
  const void* dy;
  void* dx;
  void* dw;
  void* workspace;
  int32_t rows;
  int32_t dim;
  int32_t dtype; /* LkDtype */
} LkRmsNormBackwardParams;

size_t lk_cuda_norm_rmsnorm_backward_workspace_size(const LkRmsNormBackwardParams* p);
size_t lk_emu_norm_rmsnorm_backward_workspace_size(const LkRmsNormBackwardParams* p);

#define LK_NORM_LAUNCHERS(X)                         \
  X(norm_rmsnorm_forward, LkRmsNormForwardParams)    \
  X(norm_rmsnorm_backward, LkRmsNormBackwardParams)
/* ---- end norm ---- */

/* ---- embedding (cuda/embedding.cu) ---- */
/* Token embedding: ids int32 [tokens] (device-resident), table / d_table [vocab, dim], out / d_out
 * [tokens, dim], one dtype (LkDtype). An id outside [0, vocab) is skipped and LK_FAULT_INDEX is OR-ed
 * into *fault (caller-zeroed; null = no reporting).
 *   forward:  out[t, :] = table[ids[t], :] (a bad id leaves row t untouched).
 *   backward: d_table[v, :] = sum over t with ids[t] = v of d_out[t, :], summed in ascending t in f32
 *             (deterministic: a stable device radix sort of the ids into the workspace, then one
 *             pass per vocab row); rows no token uses become 0. Workspace:
 *             lk_<backend>_embedding_backward_workspace_size(p) bytes (about 20·tokens), 4-byte
 *             aligned; 0 (null allowed) when tokens = 0. */
typedef struct LkEmbeddingForwardParams {
  const int32_t* ids;
  const void* table;
  void* out;
  uint32_t* fault;
  int32_t vocab;
  int32_t dim;
  int32_t tokens;
  int32_t dtype; /* LkDtype */
} LkEmbeddingForwardParams;

typedef struct LkEmbeddingBackwardParams {
  const int32_t* ids;
  const void* d_out;
  void* d_table;
  void* workspace;
  uint32_t* fault;
  int32_t vocab;
  int32_t dim;
  int32_t tokens;
  int32_t dtype; /* LkDtype */
} LkEmbeddingBackwardParams;

size_t lk_cuda_embedding_backward_workspace_size(const LkEmbeddingBackwardParams* p);
size_t lk_emu_embedding_backward_workspace_size(const LkEmbeddingBackwardParams* p);

#define LK_EMBEDDING_LAUNCHERS(X)                      \
  X(embedding_forward, LkEmbeddingForwardParams)       \
  X(embedding_backward, LkEmbeddingBackwardParams)
/* ---- end embedding ---- */

/* ---- rope (cuda/rope.cu) ---- */
/* Rotary position embedding, HF Llama convention (rotate_half), in place on x [tokens, n_heads·head_dim]
 * (one dtype, LkDtype). For head h and i < head_dim/2 the pair (x[h·hd + i], x[h·hd + i + hd/2]) is
 * rotated by angle = f32(pos) · inv_freq[i] (an f32 product), inv_freq[i] = f32(exp(−2i · log(theta)/hd))
 * computed in double (= f32(theta^(−2i/hd)) but for astronomically rare near-ties): forward (a, b) → (a·cos − b·sin, b·cos + a·sin); backward uses −angle (the transpose).
 * positions int32 [tokens] (device-resident): a negative one skips the token (row untouched) and ORs
 * LK_FAULT_INDEX into *fault (null = no reporting). head_dim even; theta finite and > 0. */
typedef struct LkRopeParams {
  const int32_t* positions;
  void* x;
  uint32_t* fault;
  int32_t tokens;
  int32_t n_heads;
  int32_t head_dim;
  float theta;
  int32_t dtype; /* LkDtype */
} LkRopeParams;

#define LK_ROPE_LAUNCHERS(X)       \
  X(rope_forward, LkRopeParams)    \
  X(rope_backward, LkRopeParams)
/* ---- end rope ---- */

/* ---- elementwise (cuda/elementwise.cu) ---- */
/* Elementwise ops over n elements of one dtype (LkDtype), f32 arithmetic, one rounding per output:
 *   elementwise_add:             out = a + b
 *   elementwise_add_assign:      out += a                      (out is the accumulator)
 *   elementwise_swiglu_forward:  out = silu(a) · b            (a = gate, b = up; silu(g) = g·sigmoid(g))
 *   elementwise_swiglu_backward: out = c · b · sigmoid(a)·(1 + a·(1 − sigmoid(a))), out2 = c · silu(a)
 *                                (c = d_out; out = d_gate, out2 = d_up)
 *   elementwise_scale:           out *= alpha
 * sigmoid is evaluated without overflow (exp of a non-positive argument only). Outputs may not
 * overlap inputs except where an op updates in place. */
typedef struct LkElementwiseParams {
  const void* a;
  const void* b;
  const void* c;
  void* out;
  void* out2;
  int64_t n;
  float alpha;
  int32_t dtype; /* LkDtype */
} LkElementwiseParams;

#define LK_ELEMENTWISE_LAUNCHERS(X)                              \
  X(elementwise_add, LkElementwiseParams)                        \
  X(elementwise_add_assign, LkElementwiseParams)                 \
  X(elementwise_swiglu_forward, LkElementwiseParams)             \
  X(elementwise_swiglu_backward, LkElementwiseParams)            \
  X(elementwise_scale, LkElementwiseParams)
/* ---- end elementwise ---- */

/* ---- loss (cuda/loss.cu) ---- */
/* Softmax cross-entropy and row argmax. logits / x: [rows, cols] packed row-major (row stride =
 * vocab / cols elements), dtype LkDtype; compute and accumulate in f32. rows, vocab/cols >= 0, and
 * >= 1 column when rows > 0. Reductions run in a fixed order that depends only on vocab/cols:
 * deterministic and batch-invariant.
 * Forward: lse[r] = ln Σ_c exp(logits[r, c]) and losses[r] = lse[r] − logits[r, targets[r]]
 *   (overwrite). targets[r] == −1: ignored, losses[r] = 0. Any other target outside [0, vocab):
 *   losses[r] = 0 and LK_FAULT_INDEX is OR-ed into *fault (null = no reporting). lse is written for
 *   every row. */
typedef struct LkCrossEntropyForwardParams {
  const void* logits;     /* [rows, vocab] */
  const int32_t* targets; /* [rows] */
  float* losses;          /* [rows] */
  float* lse;             /* [rows] */
  uint32_t* fault;        /* error word, may be null */
  int32_t rows;
  int32_t vocab;
  int32_t dtype; /* LkDtype of logits */
} LkCrossEntropyForwardParams;

/* Backward: d_logits[r, c] = d_loss · (exp(logits[r, c] − lse[r]) − [c == targets[r]]) (overwrite);
 * rows whose target is outside [0, vocab) (−1 included) are written as zeros. */
typedef struct LkCrossEntropyBackwardParams {
  const void* logits;     /* [rows, vocab] */
  const int32_t* targets; /* [rows] */
  const float* lse;       /* [rows], from the forward */
  void* d_logits;         /* [rows, vocab], the logits' dtype */
  int32_t rows;
  int32_t vocab;
  float d_loss; /* finite */
  int32_t dtype;
} LkCrossEntropyBackwardParams;

/* out[r] = the first index of the maximum of x[r, :]; NaN compares larger than everything (the first
 * NaN wins), −0 == +0. */
typedef struct LkArgmaxRowsParams {
  const void* x; /* [rows, cols] */
  int32_t* out;  /* [rows] */
  int32_t rows;
  int32_t cols;
  int32_t dtype;
} LkArgmaxRowsParams;

#define LK_LOSS_LAUNCHERS(X)                                     \
  X(loss_cross_entropy_forward, LkCrossEntropyForwardParams)    \
  X(loss_cross_entropy_backward, LkCrossEntropyBackwardParams)  \
  X(loss_argmax_rows, LkArgmaxRowsParams)
/* ---- end loss ---- */

/* ---- optim (cuda/optim.cu) ---- */
/* AdamW (torch.optim.AdamW semantics), elementwise in place over n elements: param (dtype), grad
 * (dtype), m and v (f32). The host computes the step's factors in f64 and rounds each to f32 once;
 * per element, in f32 with explicit fused multiply-adds (the same bits on emu and cuda):
 *   p = param · decay;  m = fmaf(one_minus_beta1, g − m, m);  v = fmaf(one_minus_beta2, g·g, beta2·v);
 *   d = sqrt(v) / bc2_sqrt + eps;  param = round(fmaf(−step_size, m / d, p)). */
typedef struct LkAdamWParams {
  void* param;
  const void* grad;
  float* m;
  float* v;
  int64_t n;
  float decay;           /* 1 − lr·weight_decay */
  float beta1;
  float beta2;
  float one_minus_beta1; /* 1 − beta1 */
  float one_minus_beta2; /* 1 − beta2 */
  float step_size;       /* lr / (1 − beta1^step) */
  float bc2_sqrt;        /* sqrt(1 − beta2^step) */
  float eps;
  int32_t dtype; /* LkDtype of param and grad */
} LkAdamWParams;

/* *out = Σ x[i]² (f32), deterministic: a block count that depends only on n, block partials in the
 * workspace (lk_<backend>_optim_sum_squares_workspace_size(p) bytes, 4-byte aligned; 0 when one block
 * suffices) and a fixed-order second pass. n = 0 writes 0. */
typedef struct LkSumSquaresParams {
  const void* x; /* [n] */
  float* out;    /* [1] */
  void* workspace;
  int64_t n;
  int32_t dtype;
} LkSumSquaresParams;

size_t lk_cuda_optim_sum_squares_workspace_size(const LkSumSquaresParams* p);
size_t lk_emu_optim_sum_squares_workspace_size(const LkSumSquaresParams* p);

#define LK_OPTIM_LAUNCHERS(X)                 \
  X(optim_adamw_step, LkAdamWParams)          \
  X(optim_sum_squares, LkSumSquaresParams)
/* ---- end optim ---- */

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
  LK_MERGE_LAUNCHERS(X)                   \
  LK_GEMM_LAUNCHERS(X)                   \
  LK_ATTENTION_LAUNCHERS(X)              \
  LK_NORM_LAUNCHERS(X)                   \
  LK_EMBEDDING_LAUNCHERS(X)              \
  LK_ROPE_LAUNCHERS(X)                   \
  LK_ELEMENTWISE_LAUNCHERS(X)            \
  LK_LOSS_LAUNCHERS(X)                   \
  LK_OPTIM_LAUNCHERS(X)                 

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
