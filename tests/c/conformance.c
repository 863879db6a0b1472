/*
 * C-ABI conformance: a plain C99 program that includes lora_kernels.h, links liblora_kernels_emu.a
 * and runs kernels on host buffers, checking them against plain C loops. It grows with each kernel
 * family. Covered: the LoRA kernels (dense shrink, BGMV, SGMV plan/shrink/expand, Philox dropout and
 * the fused dropout shrink, dense backward, merge/unmerge) and every launcher of the reference
 * block's families (gemm incl. f16/bf16, attention forward/backward/kv_cache_write/decode, RMSNorm,
 * embedding, RoPE, elementwise, cross-entropy/argmax, AdamW/sum_squares) with their workspace-size
 * functions, invalid arguments and LK_FAULT_INDEX. Build and run: bash scripts/c-conformance.sh
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora_kernels.h"

static int passed = 0, failed = 0;

static void check(int ok, const char* what) {
  if (ok) {
    passed++;
  } else {
    failed++;
    printf("FAILED: %s (last error: %s)\n", what, lk_emu_last_error_message());
  }
}

/* xorshift: fresh non-zero inputs in [-1, 1). */
static unsigned long long rng_state = 0x9E3779B97F4A7C15ull;
static float random_unit(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (float)((double)(rng_state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static void test_shrink_dense(int tokens, int d_in, int rank) {
  float* x = malloc(sizeof(float) * (size_t)tokens * d_in);
  float* a = malloc(sizeof(float) * (size_t)rank * d_in);
  float* u = malloc(sizeof(float) * (size_t)tokens * (rank + 1));
  for (int i = 0; i < tokens * d_in; i++) x[i] = random_unit();
  for (int i = 0; i < rank * d_in; i++) a[i] = random_unit();
  for (int i = 0; i < tokens * (rank + 1); i++) u[i] = NAN;
  LkShrinkDenseParams p;
  memset(&p, 0, sizeof p);
  p.x = x;
  p.a = a;
  p.u = u;
  p.ld_x = d_in;
  p.lda = d_in;
  p.ld_u = rank + 1; /* one padding column that must stay NaN */
  p.tokens = tokens;
  p.d_in = d_in;
  p.rank = rank;
  p.x_dtype = LK_F32;
  p.w_dtype = LK_F32;
  int rc = lk_emu_shrink_dense(&p, NULL);
  check(rc == 0, "lk_emu_shrink_dense returns 0");
  int ok = 1;
  for (int t = 0; t < tokens; t++) {
    for (int j = 0; j < rank; j++) {
      double ref = 0.0, mag = 0.0;
      for (int k = 0; k < d_in; k++) {
        ref += (double)x[t * d_in + k] * a[j * d_in + k];
        mag += fabs((double)x[t * d_in + k] * a[j * d_in + k]);
      }
      double got = u[t * (rank + 1) + j];
      if (!(fabs(got - ref) <= 1e-6 * (d_in / 32 + 6) * mag + 1e-30)) ok = 0;
    }
    if (!isnan(u[t * (rank + 1) + rank])) ok = 0;
  }
  char what[128];
  snprintf(what, sizeof what, "shrink_dense %dx%dx%d matches the C loop", tokens, d_in, rank);
  check(ok, what);
  free(x);
  free(a);
  free(u);
}

static void test_errors(void) {
  check(lk_emu_shrink_dense(NULL, NULL) == LK_ERR_INVALID_ARGUMENT, "null params → LK_ERR_INVALID_ARGUMENT");
  check(strstr(lk_emu_last_error_message(), "null") != NULL, "null params message");
  LkShrinkDenseParams p;
  memset(&p, 0, sizeof p);
  p.tokens = 1;
  p.d_in = 4;
  p.rank = 1;
  p.ld_x = p.lda = 4;
  p.ld_u = 1;
  float buf[4] = {1, 2, 3, 4}, u = 0;
  p.x = buf;
  p.a = buf;
  p.u = &u;
  p.x_dtype = LK_F16;
  p.w_dtype = LK_BF16;
  check(lk_emu_shrink_dense(&p, NULL) == LK_ERR_UNSUPPORTED_DTYPE, "f16 x with bf16 weights → unsupported");
  p.x_dtype = p.w_dtype = LK_F32;
  check(lk_emu_shrink_dense(&p, NULL) == 0 && u == 30.0f, "1x4x1 shrink = 30");
}

/* ---- multi-adapter serving: 3 adapters (ranks 4, 0, 8 per slice), 2 slices, tokens with -1 ---- */
enum { D_IN = 37, N0 = 11, N1 = 5, OUT_W = 18, T = 9, R_CAP = 8, NA = 3 };
static const int kRanks[NA][2] = {{4, 8}, {0, 3}, {8, 1}};
static const LkSlice kSlices[2] = {{N0, 1}, {N1, 12}};

typedef struct {
  float a[NA][2][R_CAP * D_IN];
  float b[NA][2][N0 * R_CAP];
  LkAdapterEntry table[NA * 2];
  float x[T * D_IN];
  int32_t ids[T];
} Serving;

static void serving_init(Serving* s) {
  for (int ad = 0; ad < NA; ad++)
    for (int sl = 0; sl < 2; sl++) {
      int r = kRanks[ad][sl];
      for (int i = 0; i < R_CAP * D_IN; i++) s->a[ad][sl][i] = random_unit();
      for (int i = 0; i < N0 * R_CAP; i++) s->b[ad][sl][i] = random_unit();
      LkAdapterEntry e = {s->a[ad][sl], s->b[ad][sl], D_IN, r > 0 ? r : 1, r, 0.5f + (float)ad};
      s->table[ad * 2 + sl] = e;
    }
  for (int i = 0; i < T * D_IN; i++) s->x[i] = random_unit();
  const int32_t ids[T] = {2, 0, -1, 1, 0, 2, 2, -1, 0};
  memcpy(s->ids, ids, sizeof ids);
}

/* Expected u and out (add mode, from out0) by plain loops in double. */
static void serving_expect(const Serving* s, double* u, double* out, const float* out0) {
  for (int i = 0; i < T * OUT_W; i++) out[i] = out0[i];
  for (int t = 0; t < T; t++) {
    int ad = s->ids[t];
    if (ad < 0) continue;
    for (int sl = 0; sl < 2; sl++) {
      int r = kRanks[ad][sl];
      const LkAdapterEntry* e = &s->table[ad * 2 + sl];
      for (int j = 0; j < r; j++) {
        double acc = 0;
        for (int k = 0; k < D_IN; k++) acc += (double)s->x[t * D_IN + k] * s->a[ad][sl][j * D_IN + k];
        u[(sl * T + t) * R_CAP + j] = acc;
      }
      for (int i = 0; i < kSlices[sl].n; i++) {
        double acc = 0;
        for (int j = 0; j < r; j++) acc += (float)u[(sl * T + t) * R_CAP + j] * (double)s->b[ad][sl][i * e->ldb + j];
        out[t * OUT_W + kSlices[sl].offset + i] += e->scale * acc;
      }
    }
  }
}

static int close_enough(double got, double want) { return fabs(got - want) <= 1e-5 * (1.0 + fabs(want)); }

static void check_serving(const char* what, const Serving* s, const float* u, const float* out, const float* out0) {
  static double eu[2 * T * R_CAP], eo[T * OUT_W];
  serving_expect(s, eu, eo, out0);
  int ok = 1;
  for (int t = 0; t < T; t++) {
    int ad = s->ids[t];
    for (int sl = 0; sl < 2 && ad >= 0; sl++)
      for (int j = 0; j < kRanks[ad][sl]; j++)
        if (!close_enough(u[(sl * T + t) * R_CAP + j], eu[(sl * T + t) * R_CAP + j])) ok = 0;
    for (int c = 0; c < OUT_W; c++) {
      double want = eo[t * OUT_W + c];
      if (ad < 0 || c == 0 || (c > N0 && c < 12) || c >= 12 + N1) {
        if (memcmp(&out[t * OUT_W + c], &out0[t * OUT_W + c], sizeof(float)) != 0) ok = 0; /* untouched */
      } else if (!close_enough(out[t * OUT_W + c], want)) {
        ok = 0;
      }
    }
  }
  check(ok, what);
}

static void test_bgmv(void) {
  static Serving s;
  serving_init(&s);
  static float u[2 * T * R_CAP], out[T * OUT_W], out0[T * OUT_W];
  for (int i = 0; i < 2 * T * R_CAP; i++) u[i] = NAN;
  for (int i = 0; i < T * OUT_W; i++) out0[i] = out[i] = random_unit();
  uint32_t err = 0;
  LkBgmvShrinkParams sp;
  memset(&sp, 0, sizeof sp);
  sp.x = s.x; sp.u = u; sp.table = s.table; sp.token_adapter = s.ids; sp.error_word = &err;
  sp.ld_x = D_IN; sp.tokens = T; sp.d_in = D_IN; sp.n_adapters = NA; sp.n_slices = 2; sp.r_cap = R_CAP;
  sp.x_dtype = LK_F32; sp.w_dtype = LK_F32;
  check(lk_emu_bgmv_shrink(&sp, NULL) == 0, "lk_emu_bgmv_shrink returns 0");
  LkBgmvExpandParams ep;
  memset(&ep, 0, sizeof ep);
  ep.u = u; ep.out = out; ep.table = s.table; ep.token_adapter = s.ids; ep.error_word = &err;
  ep.ld_out = OUT_W; ep.slices[0] = kSlices[0]; ep.slices[1] = kSlices[1];
  ep.tokens = T; ep.n_adapters = NA; ep.n_slices = 2; ep.r_cap = R_CAP;
  ep.out_dtype = LK_F32; ep.w_dtype = LK_F32; ep.mode = LK_EXPAND_ADD;
  check(lk_emu_bgmv_expand(&ep, NULL) == 0, "lk_emu_bgmv_expand returns 0");
  check(err == 0, "bgmv error word clear");
  check_serving("bgmv shrink + expand match the C loops", &s, u, out, out0);
  s.ids[3] = 7; /* out of range: skipped and flagged */
  check(lk_emu_bgmv_shrink(&sp, NULL) == 0 && err == LK_FAULT_ADAPTER_ID, "bgmv flags an out-of-range id");
  ep.mode = 5;
  check(lk_emu_bgmv_expand(&ep, NULL) == LK_ERR_INVALID_ARGUMENT, "bgmv rejects a bad mode");
}

static void test_sgmv(void) {
  static Serving s;
  serving_init(&s);
  static float u[2 * T * R_CAP], out[T * OUT_W], out0[T * OUT_W];
  for (int i = 0; i < 2 * T * R_CAP; i++) u[i] = NAN;
  for (int i = 0; i < T * OUT_W; i++) out0[i] = out[i] = random_unit();
  uint32_t err = 0;
  int32_t row_index[T], seg_starts[NA + 1], seg_adapter[NA], n_segments = -1;
  LkSgmvPlanParams pp;
  memset(&pp, 0, sizeof pp);
  pp.token_adapter = s.ids; pp.row_index = row_index; pp.seg_starts = seg_starts; pp.seg_adapter = seg_adapter;
  pp.n_segments = &n_segments; pp.error_word = &err; pp.tokens = T; pp.n_adapters = NA; pp.max_segments = NA;
  void* plan_ws = malloc(lk_emu_sgmv_plan_workspace_size(&pp) + 1);
  pp.workspace = plan_ws;
  check(lk_emu_sgmv_plan(&pp, NULL) == 0, "lk_emu_sgmv_plan returns 0");
  /* ids {2, 0, -1, 1, 0, 2, 2, -1, 0}: segments adapter 0 {1, 4, 8}, 1 {3}, 2 {0, 5, 6}; -1 last. */
  const int32_t want_rows[T] = {1, 4, 8, 3, 0, 5, 6, 2, 7};
  check(n_segments == 3 && seg_starts[0] == 0 && seg_starts[1] == 3 && seg_starts[2] == 4 && seg_starts[3] == 7 &&
            seg_adapter[0] == 0 && seg_adapter[1] == 1 && seg_adapter[2] == 2 &&
            memcmp(row_index, want_rows, sizeof want_rows) == 0,
        "sgmv planner: stable sort by adapter");
  LkSgmvShrinkParams sp;
  memset(&sp, 0, sizeof sp);
  sp.x = s.x; sp.u = u; sp.table = s.table; sp.row_index = row_index; sp.seg_starts = seg_starts;
  sp.seg_adapter = seg_adapter; sp.n_segments = &n_segments; sp.error_word = &err; sp.ld_x = D_IN; sp.tokens = T;
  sp.max_segments = NA; sp.d_in = D_IN; sp.n_adapters = NA; sp.n_slices = 2; sp.r_cap = R_CAP;
  sp.x_dtype = LK_F32; sp.w_dtype = LK_F32;
  void* ws = malloc(lk_emu_sgmv_shrink_workspace_size(&sp) + 1);
  sp.workspace = ws;
  check(lk_emu_sgmv_shrink(&sp, NULL) == 0, "lk_emu_sgmv_shrink returns 0");
  LkSgmvExpandParams ep;
  memset(&ep, 0, sizeof ep);
  ep.u = u; ep.out = out; ep.table = s.table; ep.row_index = row_index; ep.seg_starts = seg_starts;
  ep.seg_adapter = seg_adapter; ep.n_segments = &n_segments; ep.error_word = &err; ep.ld_out = OUT_W;
  ep.slices[0] = kSlices[0]; ep.slices[1] = kSlices[1]; ep.tokens = T; ep.max_segments = NA; ep.n_adapters = NA;
  ep.n_slices = 2; ep.r_cap = R_CAP; ep.out_dtype = LK_F32; ep.w_dtype = LK_F32; ep.mode = LK_EXPAND_ADD;
  void* ews = malloc(lk_emu_sgmv_expand_workspace_size(&ep) + 1);
  ep.workspace = ews;
  check(lk_emu_sgmv_expand(&ep, NULL) == 0, "lk_emu_sgmv_expand returns 0");
  check(err == 0, "sgmv error word clear");
  check_serving("sgmv plan + shrink + expand match the C loops", &s, u, out, out0);
  /* Invalid metadata: nothing written, flagged. */
  seg_starts[2] = 1;
  float before = out[0];
  memcpy(out0, out, sizeof out);
  check(lk_emu_sgmv_expand(&ep, NULL) == 0 && (err & LK_FAULT_SEGMENTS) && memcmp(out, out0, sizeof out) == 0 &&
            out[0] == before,
        "sgmv with invalid segments writes nothing and flags it");
  free(plan_ws);
  free(ws);
  free(ews);
}

/* LoRA backward, single adapter, f32: du = s·G·B, dB += s·Gᵀu, dA += duᵀx, dx += du·A vs plain C loops. */
static void test_backward_dense(int tokens, int d_in, int d_out, int rank) {
  const float s = 0.75f;
  size_t nx = (size_t)tokens * d_in, ng = (size_t)tokens * d_out, nu = (size_t)tokens * rank;
  float* x = malloc(sizeof(float) * nx);
  float* g = malloc(sizeof(float) * ng);
  float* u = malloc(sizeof(float) * nu);
  float* a = malloc(sizeof(float) * (size_t)rank * d_in);
  float* b = malloc(sizeof(float) * (size_t)d_out * rank);
  float* da = malloc(sizeof(float) * (size_t)rank * d_in);
  float* db = malloc(sizeof(float) * (size_t)d_out * rank);
  float* du = malloc(sizeof(float) * nu);
  float* dx = malloc(sizeof(float) * nx);
  float* da0 = malloc(sizeof(float) * (size_t)rank * d_in);
  float* db0 = malloc(sizeof(float) * (size_t)d_out * rank);
  float* dx0 = malloc(sizeof(float) * nx);
  for (size_t i = 0; i < nx; i++) x[i] = random_unit();
  for (size_t i = 0; i < ng; i++) g[i] = random_unit();
  for (size_t i = 0; i < nu; i++) u[i] = random_unit();
  for (int i = 0; i < rank * d_in; i++) a[i] = random_unit();
  for (int i = 0; i < d_out * rank; i++) b[i] = random_unit();
  for (int i = 0; i < rank * d_in; i++) da[i] = da0[i] = random_unit();
  for (int i = 0; i < d_out * rank; i++) db[i] = db0[i] = random_unit();
  for (size_t i = 0; i < nx; i++) dx[i] = dx0[i] = random_unit();
  LkBackwardDenseParams p;
  memset(&p, 0, sizeof p);
  p.x = x;
  p.g = g;
  p.u = u;
  p.a = a;
  p.b = b;
  p.da = da;
  p.db = db;
  p.du = du;
  p.dx = dx;
  p.ld_x = p.lda = p.ld_da = p.ld_dx = d_in;
  p.ld_g = d_out;
  p.ld_u = p.ldb = p.ld_db = p.ld_du = rank;
  p.tokens = tokens;
  p.d_in = d_in;
  p.d_out = d_out;
  p.rank = rank;
  p.scale = s;
  p.grad_mode = LK_GRAD_ACCUMULATE;
  p.x_dtype = p.g_dtype = p.dx_dtype = p.w_dtype = LK_F32;
  p.dropout_keep_scale = 1.0f;
  size_t ws_bytes = lk_emu_backward_dense_workspace_size(&p);
  void* ws = ws_bytes ? malloc(ws_bytes) : NULL;
  p.workspace = ws;
  int rc = lk_emu_backward_dense(&p, NULL);
  check(rc == 0, "lk_emu_backward_dense returns 0");
  int ok = 1;
  const double eps = 1.2e-7;
  /* du */
  for (int t = 0; t < tokens; t++) {
    for (int j = 0; j < rank; j++) {
      double ref = 0, mag = 0;
      for (int o = 0; o < d_out; o++) {
        ref += (double)g[t * d_out + o] * b[o * rank + j];
        mag += fabs((double)g[t * d_out + o] * b[o * rank + j]);
      }
      if (!(fabs(du[t * rank + j] - s * ref) <= eps * (d_out / 256 + 12) * s * mag + eps * fabs(s * ref))) ok = 0;
    }
  }
  /* dB */
  for (int o = 0; o < d_out; o++) {
    for (int j = 0; j < rank; j++) {
      double ref = 0, mag = 0;
      for (int t = 0; t < tokens; t++) {
        ref += (double)g[t * d_out + o] * u[t * rank + j];
        mag += fabs((double)g[t * d_out + o] * u[t * rank + j]);
      }
      double want = db0[o * rank + j] + s * ref;
      if (!(fabs(db[o * rank + j] - want) <= eps * (tokens + 3) * s * mag + eps * fabs(want))) ok = 0;
    }
  }
  /* dA and dx from the stored du */
  for (int j = 0; j < rank; j++) {
    for (int k = 0; k < d_in; k++) {
      double ref = 0, mag = 0;
      for (int t = 0; t < tokens; t++) {
        ref += (double)du[t * rank + j] * x[t * d_in + k];
        mag += fabs((double)du[t * rank + j] * x[t * d_in + k]);
      }
      double want = da0[j * d_in + k] + ref;
      if (!(fabs(da[j * d_in + k] - want) <= eps * (tokens + 3) * mag + eps * fabs(want))) ok = 0;
    }
  }
  for (int t = 0; t < tokens; t++) {
    for (int k = 0; k < d_in; k++) {
      double ref = 0, mag = 0;
      for (int j = 0; j < rank; j++) {
        ref += (double)du[t * rank + j] * a[j * d_in + k];
        mag += fabs((double)du[t * rank + j] * a[j * d_in + k]);
      }
      double want = dx0[t * d_in + k] + ref;
      if (!(fabs(dx[t * d_in + k] - want) <= eps * (rank + 3) * mag + eps * fabs(want))) ok = 0;
    }
  }
  char what[128];
  snprintf(what, sizeof what, "backward_dense %dx%dx%dx%d matches the C loops", tokens, d_in, d_out, rank);
  check(ok, what);
  p.dropout_threshold = 1;
  p.dropout_keep_scale = -1.0f;
  check(lk_emu_backward_dense(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "backward_dense rejects a negative keep_scale");
  check(strstr(lk_emu_last_error_message(), "dropout_keep_scale") != NULL, "backward_dense keep_scale message");
  free(x); free(g); free(u); free(a); free(b); free(da); free(db); free(du); free(dx);
  free(da0); free(db0); free(dx0); free(ws);
}

/* ---- merge / unmerge: f32 W, the contract's fmaf sequence written as a plain C loop ---- */
static void merge_c_loop(float* w, const float* a, const float* b, int d_out, int d_in, int rank, int64_t ld_w,
                         int fifo, float s) {
  for (int i = 0; i < d_out; i++)
    for (int j = 0; j < d_in; j++) {
      float acc = 0.0f;
      for (int r = 0; r < rank; r++) acc = fmaf(b[i * rank + r], a[r * d_in + j], acc);
      float* e = fifo ? &w[j * ld_w + i] : &w[i * ld_w + j];
      *e = fmaf(s, acc, *e);
    }
}

static void test_merge(int d_out, int d_in, int rank, int fifo) {
  const int rows = fifo ? d_in : d_out, cols = fifo ? d_out : d_in;
  const int64_t ld_w = cols + 3; /* 3 padding columns that must keep their NaN bits */
  const size_t nw = (size_t)rows * ld_w;
  float* w0 = malloc(sizeof(float) * nw);
  float* w = malloc(sizeof(float) * nw);
  float* want = malloc(sizeof(float) * nw);
  float* a = malloc(sizeof(float) * (size_t)rank * d_in + 4);
  float* b = malloc(sizeof(float) * (size_t)d_out * rank + 4);
  for (size_t i = 0; i < nw; i++) w0[i] = (i % ld_w) < (size_t)cols ? 0.02f * random_unit() : NAN;
  for (int i = 0; i < rank * d_in; i++) a[i] = random_unit() / 8.0f;
  for (int i = 0; i < d_out * rank; i++) b[i] = random_unit();
  const float scale = 1.75f;
  LkMergeParams p;
  memset(&p, 0, sizeof p);
  p.w = w;
  p.a = a;
  p.b = b;
  p.ld_w = ld_w;
  p.lda = d_in;
  p.ldb = rank;
  p.d_out = d_out;
  p.d_in = d_in;
  p.rank = rank;
  p.scale = scale;
  p.w_dtype = LK_F32;
  p.ab_dtype = LK_F32;
  p.fan_in_fan_out = fifo;
  char what[160];
  /* Default merge, then unmerge: bit-identical to the C loop. */
  memcpy(w, w0, sizeof(float) * nw);
  memcpy(want, w0, sizeof(float) * nw);
  p.direction = LK_MERGE_MERGE;
  int rc = lk_emu_merge_apply(&p, NULL);
  merge_c_loop(want, a, b, d_out, d_in, rank, ld_w, fifo, scale);
  snprintf(what, sizeof what, "merge %dx%d rank %d fifo %d: bits equal the C fmaf loop", d_out, d_in, rank, fifo);
  check(rc == 0 && memcmp(w, want, sizeof(float) * nw) == 0, what);
  p.direction = LK_MERGE_UNMERGE;
  rc = lk_emu_merge_apply(&p, NULL);
  merge_c_loop(want, a, b, d_out, d_in, rank, ld_w, fifo, -scale);
  snprintf(what, sizeof what, "unmerge %dx%d rank %d fifo %d: bits equal the C fmaf loop", d_out, d_in, rank, fifo);
  check(rc == 0 && memcmp(w, want, sizeof(float) * nw) == 0, what);
  /* Exact merge + exact unmerge: W restored bit for bit. */
  memcpy(w, w0, sizeof(float) * nw);
  p.direction = LK_MERGE_MERGE;
  p.flags = LK_MERGE_EXACT | LK_MERGE_SAFE;
  const size_t ws_bytes = lk_emu_merge_workspace_size(&p);
  const size_t n_codes = (size_t)rows * ((cols + 15) / 16);
  void* ws = malloc(ws_bytes);
  uint32_t* codes = malloc(sizeof(uint32_t) * n_codes);
  const int64_t cap = (int64_t)rows * cols;
  uint64_t* exc_index = malloc(sizeof(uint64_t) * (size_t)cap);
  uint32_t* exc_bits = malloc(sizeof(uint32_t) * (size_t)cap);
  uint64_t header[2] = {99, 99};
  uint32_t status = 0;
  p.workspace = ws;
  p.codes = codes;
  p.exc_index = exc_index;
  p.exc_bits = exc_bits;
  p.exc_capacity = cap;
  p.record_header = header;
  p.status = &status;
  rc = lk_emu_merge_apply(&p, NULL);
  memcpy(want, w0, sizeof(float) * nw);
  merge_c_loop(want, a, b, d_out, d_in, rank, ld_w, fifo, scale);
  check(rc == 0 && header[1] == 1 && status == 0 && memcmp(w, want, sizeof(float) * nw) == 0,
        "exact merge writes the plain merge and a valid record");
  p.direction = LK_MERGE_UNMERGE;
  p.flags = LK_MERGE_EXACT;
  p.workspace = NULL;
  rc = lk_emu_merge_apply(&p, NULL);
  snprintf(what, sizeof what, "exact round trip %dx%d rank %d fifo %d restores every bit (%llu exceptions)", d_out,
           d_in, rank, fifo, (unsigned long long)header[0]);
  check(rc == 0 && status == 0 && memcmp(w, w0, sizeof(float) * nw) == 0, what);
  free(ws);
  free(codes);
  free(exc_index);
  free(exc_bits);
  free(w0);
  free(w);
  free(want);
  free(a);
  free(b);
}

/* ---- fused Philox dropout: kernels vs a plain C Philox4x32-10 loop (DESIGN.md §2) ---- */
static void philox(const uint32_t ctr_in[4], const uint32_t key_in[2], uint32_t out[4]) {
  uint32_t c[4] = {ctr_in[0], ctr_in[1], ctr_in[2], ctr_in[3]}, k0 = key_in[0], k1 = key_in[1];
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n1 = (uint32_t)p1, n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1,
             n3 = (uint32_t)p0;
    c[0] = n0;
    c[1] = n1;
    c[2] = n2;
    c[3] = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  memcpy(out, c, sizeof c);
}

static int c_keeps(uint64_t seed, uint64_t offset, uint32_t threshold, float keep_scale, uint64_t e) {
  if (keep_scale == 0.0f) return 0;
  if (threshold == 0) return 1;
  uint32_t ctr[4] = {(uint32_t)(e / 4), (uint32_t)((e / 4) >> 32), (uint32_t)offset, (uint32_t)(offset >> 32)};
  uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)}, w[4];
  philox(ctr, key, w);
  return w[e % 4] >= threshold;
}

static void test_philox_kat(void) {
  const uint32_t c1[4] = {0, 0, 0, 0}, k1[2] = {0, 0}, w1[4] = {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8};
  const uint32_t c2[4] = {~0u, ~0u, ~0u, ~0u}, k2[2] = {~0u, ~0u},
                 w2[4] = {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd};
  const uint32_t c3[4] = {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, k3[2] = {0xa4093822, 0x299f31d0},
                 w3[4] = {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1};
  uint32_t out[4];
  philox(c1, k1, out);
  check(memcmp(out, w1, sizeof out) == 0, "C philox KAT 1");
  philox(c2, k2, out);
  check(memcmp(out, w2, sizeof out) == 0, "C philox KAT 2");
  philox(c3, k3, out);
  check(memcmp(out, w3, sizeof out) == 0, "C philox KAT 3");
}

static void test_dropout(double prob, int backward) {
  enum { TOK = 7, DD = 37, LDX = 40, LDY = 38, BASE = 1234567 };
  const uint64_t seed = 0x0123456789abcdefull, offset = 0x1000000005ull;
  double th = floor(prob * 4294967296.0);
  uint32_t threshold = th > 4294967295.0 ? 4294967295u : (uint32_t)th;
  float keep_scale = prob == 1.0 ? 0.0f : (float)(1.0 / (1.0 - prob));
  float x[TOK * LDX], y[TOK * LDY];
  for (int i = 0; i < TOK * LDX; i++) x[i] = random_unit();
  for (int i = 0; i < TOK * LDY; i++) y[i] = NAN;
  LkDropoutParams p;
  memset(&p, 0, sizeof p);
  p.x = x;
  p.y = y;
  p.ld_x = LDX;
  p.ld_y = LDY;
  p.token_base = BASE;
  p.drop.seed = seed;
  p.drop.offset = offset;
  p.drop.threshold = threshold;
  p.drop.keep_scale = keep_scale;
  p.tokens = TOK;
  p.d = DD;
  p.dtype = LK_F32;
  int rc = backward ? lk_emu_dropout_backward(&p, NULL) : lk_emu_dropout_forward(&p, NULL);
  check(rc == 0, "lk_emu_dropout_forward/backward returns 0");
  int ok = 1, kept = 0;
  for (int t = 0; t < TOK; t++) {
    for (int c = 0; c < LDY; c++) {
      float got = y[t * LDY + c];
      if (c >= DD) {
        if (!isnan(got)) ok = 0;
        continue;
      }
      int keep = c_keeps(seed, offset, threshold, keep_scale, (uint64_t)(BASE + t) * DD + c);
      float want = keep ? x[t * LDX + c] * keep_scale : 0.0f;
      kept += keep;
      if (memcmp(&got, &want, sizeof got) != 0) ok = 0;
    }
  }
  char what[160];
  snprintf(what, sizeof what, "dropout %s p=%.2f (kept %d of %d) matches the C Philox loop bit for bit",
           backward ? "backward" : "forward", prob, kept, TOK * DD);
  check(ok, what);

  /* Fused shrink against a C loop over the same mask (f64 reference, shrink tolerance). */
  enum { RANK = 5 };
  float a[RANK * DD], u[TOK * RANK];
  for (int i = 0; i < RANK * DD; i++) a[i] = random_unit();
  LkShrinkDenseDropoutParams q;
  memset(&q, 0, sizeof q);
  q.x = x;
  q.a = a;
  q.u = u;
  q.ld_x = LDX;
  q.lda = DD;
  q.ld_u = RANK;
  q.token_base = BASE;
  q.drop = p.drop;
  q.tokens = TOK;
  q.d_in = DD;
  q.rank = RANK;
  q.x_dtype = q.w_dtype = LK_F32;
  check(lk_emu_dropout_shrink_dense(&q, NULL) == 0, "lk_emu_dropout_shrink_dense returns 0");
  ok = 1;
  for (int t = 0; t < TOK; t++) {
    for (int j = 0; j < RANK; j++) {
      double ref = 0.0, mag = 0.0;
      for (int k = 0; k < DD; k++) {
        int keep = c_keeps(seed, offset, threshold, keep_scale, (uint64_t)(BASE + t) * DD + k);
        float xh = keep ? x[t * LDX + k] * keep_scale : 0.0f;
        ref += (double)xh * a[j * DD + k];
        mag += fabs((double)xh * a[j * DD + k]);
      }
      if (!(fabs(u[t * RANK + j] - ref) <= 1e-6 * (DD / 32 + 6) * mag + 1e-30)) ok = 0;
    }
  }
  snprintf(what, sizeof what, "dropout_shrink_dense p=%.2f matches the C loop", prob);
  check(ok, what);

  /* The launcher validates what kernels must not see: a NaN keep scale, a negative token base. */
  p.drop.keep_scale = NAN;
  check(lk_emu_dropout_forward(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "NaN keep_scale → invalid argument");
  p.drop.keep_scale = keep_scale;
  p.token_base = -1;
  check(lk_emu_dropout_forward(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "negative token_base → invalid argument");
}

/* =============================================================================================
 * The reference transformer block's kernels (lora_kernels.h, the sections gemm … optim): every
 * launcher on small odd sizes with fresh random inputs, overwrite outputs poisoned with NaN, checked
 * against plain C loops in double precision (the math of each family's `pub mod reference` in
 * src/<family>.rs), bit-exact where the header fixes the bits; regions a launcher must not touch
 * are compared bit for bit; one invalid argument per family and, where the family reads
 * device-resident indices, one out-of-range index that must set LK_FAULT_INDEX.
 * ============================================================================================= */
static const double kU = 5.9604644775390625e-8; /* 2^-24: the f32 unit roundoff */

static float* falloc(size_t n) { return malloc(sizeof(float) * (n > 0 ? n : 1)); }

static void fill_random(float* p, size_t n, float scale) {
  for (size_t i = 0; i < n; i++) p[i] = scale * random_unit();
}

static void fill_nan(float* p, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = NAN;
}

static int all_nan(const float* p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!isnan(p[i])) return 0;
  return 1;
}

/* A workspace of what a *_workspace_size function returned: null for 0 bytes, else 16-byte aligned
 * (C99 has no aligned_alloc); free *raw. */
static void* workspace_alloc(size_t bytes, void** raw) {
  if (bytes == 0) {
    *raw = NULL;
    return NULL;
  }
  *raw = malloc(bytes + 16);
  return (void*)(((uintptr_t)*raw + 15) & ~(uintptr_t)15);
}

/* |got − want| ≤ tol (a NaN got fails). */
static int within(double got, double want, double tol) { return fabs(got - want) <= tol; }

/* f16 / bf16 storage as raw uint16, round to nearest even. */
static uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* ≥ 65520: ±inf */
  if (ax < 0x38800000u) {                                   /* below 2^-14: subnormal or zero */
    float a;
    memcpy(&a, &ax, sizeof a);
    return (uint16_t)(sign | (uint16_t)rintf(a * 16777216.0f)); /* units of 2^-24, exact scaling */
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u); /* rebias the exponent (−112 << 23), round half to even */
  return (uint16_t)(sign | (ax >> 13));
}

static float f16_to_f32(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  float f = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 0x400), e - 25);
  return (h & 0x8000u) ? -f : f;
}

static uint16_t f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static float bf16_to_f32(uint16_t h) {
  uint32_t x = (uint32_t)h << 16;
  float f;
  memcpy(&f, &x, sizeof f);
  return f;
}

static size_t dtype_size(int dtype) { return dtype == LK_F32 ? 4 : 2; }

static double load_t(const void* p, int dtype, size_t i) {
  if (dtype == LK_F32) return ((const float*)p)[i];
  const uint16_t h = ((const uint16_t*)p)[i];
  return dtype == LK_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

static void store_t(void* p, int dtype, size_t i, float v) {
  if (dtype == LK_F32)
    ((float*)p)[i] = v;
  else
    ((uint16_t*)p)[i] = dtype == LK_F16 ? f32_to_f16(v) : f32_to_bf16(v);
}

static void test_half_converters(void) {
  check(f32_to_f16(1.0f) == 0x3c00 && f32_to_f16(-2.5f) == 0xc100 && f32_to_f16(65504.0f) == 0x7bff &&
            f32_to_f16(5.9604645e-8f) == 0x0001 && f32_to_f16(1.00048828125f) == 0x3c00 &&
            f32_to_f16(1.00146484375f) == 0x3c02 && f16_to_f32(0x3555) == 0.333251953125f &&
            f16_to_f32(0x0001) == 5.9604645e-8f && isnan(f16_to_f32(f32_to_f16(NAN))),
        "C f16 converter (round half to even, subnormals, NaN)");
  check(f32_to_bf16(1.0f) == 0x3f80 && f32_to_bf16(1.00390625f) == 0x3f80 && f32_to_bf16(1.01171875f) == 0x3f82 &&
            bf16_to_f32(0xc040) == -3.0f && isnan(bf16_to_f32(f32_to_bf16(NAN))),
        "C bf16 converter (round half to even, NaN)");
}

/* ---- gemm: C = alpha·op(A)·op(B) + beta·C; f32 on FMA, f16/bf16 on tensor cores (f32 accumulate) ---- */
/* Tolerance per element: the f32 accumulation over k, 1e-6·(k/32 + 6)·|alpha|·Σ|a·b| (as the shrink
 * test; ordered f32 sums stay far inside it at these k), the epilogue's roundings 2u·|beta·c|, plus
 * the output rounding to T: u (f32), 2^-11 (f16), 2^-8 (bf16) relative, plus half the smallest
 * subnormal of T. Every lda/ldb/ldc padding element holds NaN: A/B padding must not leak into C, C
 * padding columns must keep their bits; beta == 0 starts from an all-NaN C (never read). */
static void test_gemm(int dtype, int m, int n, int k, int at, int bt, float alpha, float beta, int pad) {
  const int a_rows = at ? k : m, a_cols = at ? m : k, b_rows = bt ? n : k, b_cols = bt ? k : n;
  const int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = n + pad;
  const size_t es = dtype_size(dtype), na = (size_t)(a_rows > 0 ? a_rows : 1) * lda,
               nb = (size_t)(b_rows > 0 ? b_rows : 1) * ldb, nc = (size_t)m * ldc;
  void* a = malloc(es * na + 1);
  void* b = malloc(es * nb + 1);
  void* c = malloc(es * nc + 1);
  void* c0 = malloc(es * nc + 1);
  for (size_t i = 0; i < na; i++) store_t(a, dtype, i, (int64_t)(i % lda) < a_cols ? random_unit() : NAN);
  for (size_t i = 0; i < nb; i++) store_t(b, dtype, i, (int64_t)(i % ldb) < b_cols ? random_unit() : NAN);
  for (size_t i = 0; i < nc; i++) store_t(c0, dtype, i, (int64_t)(i % ldc) < n && beta != 0.0f ? random_unit() : NAN);
  memcpy(c, c0, es * nc);
  LkGemmParams p;
  memset(&p, 0, sizeof p);
  p.a = a;
  p.b = b;
  p.c = c;
  p.lda = lda;
  p.ldb = ldb;
  p.ldc = ldc;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a_trans = at;
  p.b_trans = bt;
  p.alpha = alpha;
  p.beta = beta;
  p.dtype = dtype;
  const int rc = lk_emu_gemm(&p, NULL);
  const double out_rel = dtype == LK_F32 ? kU : dtype == LK_F16 ? 0x1p-11 : 0x1p-8;
  const double tiny = dtype == LK_F32 ? 0x1p-150 : dtype == LK_F16 ? 0x1p-25 : 0x1p-134;
  int ok = rc == 0;
  for (int i = 0; i < m && ok; i++) {
    for (int j = 0; j < n; j++) {
      double acc = 0, mag = 0;
      for (int q = 0; q < k; q++) {
        const double x = load_t(a, dtype, at ? (size_t)q * lda + i : (size_t)i * lda + q);
        const double y = load_t(b, dtype, bt ? (size_t)j * ldb + q : (size_t)q * ldb + j);
        acc += x * y;
        mag += fabs(x * y);
      }
      const double cin = beta != 0.0f ? load_t(c0, dtype, (size_t)i * ldc + j) : 0.0;
      const double want = alpha * acc + beta * cin;
      const double tol =
          1e-6 * (k / 32 + 6) * fabs(alpha) * mag + 2 * kU * fabs(beta * cin) + out_rel * fabs(want) + tiny;
      if (!within(load_t(c, dtype, (size_t)i * ldc + j), want, tol)) ok = 0;
    }
    if (memcmp((char*)c + es * ((size_t)i * ldc + n), (char*)c0 + es * ((size_t)i * ldc + n), es * (size_t)pad) != 0)
      ok = 0; /* padding columns untouched */
  }
  char what[160];
  snprintf(what, sizeof what, "gemm %s %dx%dx%d a_trans %d b_trans %d alpha %g beta %g matches the C loop",
           dtype == LK_F32 ? "f32" : dtype == LK_F16 ? "f16" : "bf16", m, n, k, at, bt, alpha, beta);
  check(ok, what);
  if (m > 1) {
    /* Batch invariance: the last row alone (m = 1) has the bits it had in the full product. */
    void* c1 = malloc(es * ldc);
    memcpy(c1, (char*)c0 + es * (size_t)(m - 1) * ldc, es * ldc);
    LkGemmParams p1 = p;
    p1.a = (const char*)a + es * (at ? (size_t)(m - 1) : (size_t)(m - 1) * lda);
    p1.c = c1;
    p1.m = 1;
    snprintf(what, sizeof what, "gemm %dx%dx%d: row %d computed alone has the same bits", m, n, k, m - 1);
    check(lk_emu_gemm(&p1, NULL) == 0 && memcmp(c1, (char*)c + es * (size_t)(m - 1) * ldc, es * ldc) == 0, what);
    free(c1);
  }
  free(a);
  free(b);
  free(c);
  free(c0);
}

static void test_gemm_errors(void) {
  float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 1, 1, 1, 1, 1}, c[4] = {0, 0, 0, 0};
  LkGemmParams p;
  memset(&p, 0, sizeof p);
  p.a = a;
  p.b = b;
  p.c = c;
  p.m = 2;
  p.n = 2;
  p.k = 3;
  p.lda = 3;
  p.ldb = 2;
  p.ldc = 2;
  p.alpha = 1.0f;
  p.dtype = LK_F32;
  check(lk_emu_gemm(&p, NULL) == 0 && c[0] == 6.0f && c[3] == 15.0f, "gemm 2x2x3 = [[6, 6], [15, 15]]");
  p.lda = 2;
  check(lk_emu_gemm(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "gemm rejects lda < k");
  p.lda = 3;
  p.a_trans = 2;
  check(lk_emu_gemm(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "gemm rejects a_trans = 2");
  p.a_trans = 0;
  p.dtype = 3;
  check(lk_emu_gemm(&p, NULL) == LK_ERR_UNSUPPORTED_DTYPE, "gemm rejects dtype 3");
  p.dtype = LK_F32;
  p.c = NULL;
  check(lk_emu_gemm(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "gemm rejects a null C");
}

static void test_gemm_family(void) {
  test_gemm(LK_F32, 1, 1, 1, 0, 0, 1.0f, 0.0f, 0);
  test_gemm(LK_F32, 7, 13, 5, 0, 0, 1.5f, 0.0f, 3);
  test_gemm(LK_F32, 7, 13, 5, 1, 0, 1.0f, -0.5f, 1);
  test_gemm(LK_F32, 7, 13, 5, 0, 1, -0.75f, 0.0f, 2);
  test_gemm(LK_F32, 7, 13, 5, 1, 1, 1.0f, 2.0f, 3);
  test_gemm(LK_F32, 67, 45, 29, 0, 1, 1.0f, 0.0f, 3);
  test_gemm(LK_F32, 40, 36, 64, 0, 0, 0.5f, 1.0f, 4); /* 16-byte rows: the vector loads */
  test_gemm(LK_F32, 3, 5, 0, 0, 0, 1.0f, 0.0f, 1);    /* k = 0 writes zeros over NaN */
  test_gemm(LK_F32, 3, 5, 0, 1, 0, 1.0f, -0.5f, 1);   /* k = 0: C = beta·C */
  test_gemm(LK_F16, 19, 23, 41, 0, 1, 1.0f, 0.0f, 1);
  test_gemm(LK_F16, 24, 16, 32, 1, 0, 1.0f, 0.5f, 8);
  test_gemm(LK_BF16, 33, 17, 40, 1, 0, 0.5f, 0.5f, 1);
  test_gemm(LK_BF16, 9, 11, 7, 1, 1, 1.0f, 0.0f, 2);
  test_gemm_errors();
}

/* ---- attention: causal varlen GQA forward/backward, KV-cache write, decode ---- */
/* 4 query heads over 2 kv heads, head_dim 16, f32. Tolerances as tests/attention.rs derives them
 * (Higham's probabilistic √n·u growth with a safety factor 8; inputs in [-1, 1), so |out| ≤ 1):
 * forward out and lse absolute 8u·(2 + |scale|·HD + √len) (lse + u·|lse|); backward
 * 8u·(4 + |scale|·HD + √(G·len) + HD) relative to max(1, max |reference|) of each gradient. */
enum { AT_H = 4, AT_KV = 2, AT_HD = 16, AT_G = AT_H / AT_KV, AT_QD = AT_H * AT_HD, AT_KD = AT_KV * AT_HD };

static double attn_fwd_tol(float scale, int len) { return 8 * kU * (2 + fabs(scale) * AT_HD + sqrt((double)len)); }

static double dot_f(const float* x, const float* y, int n) {
  double s = 0;
  for (int i = 0; i < n; i++) s += (double)x[i] * y[i];
  return s;
}

/* Softmax attention of one query row qi over keys/values rows [j0, j0 + n) (row stride kd) of kv
 * head kh: o[AT_HD], returns the natural-log lse (−inf for n = 0, o zeros). p: scratch of n. */
static double attn_row(const float* qi, const float* k, const float* v, int j0, int n, int kh, int kd, float scale,
                       double* p, double* o) {
  double mx = -INFINITY, l = 0;
  for (int j = 0; j < n; j++) {
    p[j] = scale * dot_f(qi, k + (size_t)(j0 + j) * kd + kh * AT_HD, AT_HD);
    if (p[j] > mx) mx = p[j];
  }
  for (int j = 0; j < n; j++) l += p[j] = exp(p[j] - mx);
  for (int c = 0; c < AT_HD; c++) {
    double s = 0;
    for (int j = 0; j < n; j++) s += p[j] * v[(size_t)(j0 + j) * kd + kh * AT_HD + c];
    o[c] = n > 0 ? s / l : 0.0;
  }
  return mx + log(l);
}

/* Expected forward over valid sequence rows [s0, s1): out [tokens, AT_QD], lse [tokens, AT_H]. */
static void attn_forward_ref(const float* q, const float* k, const float* v, int s0, int s1, float scale,
                             double* out, double* lse) {
  double p[64];
  for (int i = s0; i < s1; i++)
    for (int h = 0; h < AT_H; h++)
      lse[i * AT_H + h] = attn_row(q + (size_t)i * AT_QD + h * AT_HD, k, v, s0, i - s0 + 1, h / AT_G, AT_KD, scale,
                                   p, out + (size_t)i * AT_QD + h * AT_HD);
}

/* The exact gradient (src/attention.rs reference::backward): P recomputed from q, k; dP = dO·vᵀ,
 * D = Σ P∘dP, dS = P∘(dP − D); dq = scale·dS·K, dk = scale·dSᵀ·Q, dv = Pᵀ·dO (kv heads summed over
 * their group). Rows [s0, s1) of dq, dk, dv written. */
static void attn_backward_ref(const float* q, const float* k, const float* v, const float* dout, int s0, int s1,
                              float scale, double* dq, double* dk, double* dv) {
  double p[64], dp[64];
  for (size_t e = (size_t)s0 * AT_KD; e < (size_t)s1 * AT_KD; e++) dk[e] = dv[e] = 0;
  for (int h = 0; h < AT_H; h++) {
    const int kh = h / AT_G;
    for (int i = s0; i < s1; i++) {
      const float* qi = q + (size_t)i * AT_QD + h * AT_HD;
      const float* doi = dout + (size_t)i * AT_QD + h * AT_HD;
      const int n = i - s0 + 1;
      double mx = -INFINITY, l = 0, d = 0;
      for (int j = 0; j < n; j++) {
        p[j] = scale * dot_f(qi, k + (size_t)(s0 + j) * AT_KD + kh * AT_HD, AT_HD);
        if (p[j] > mx) mx = p[j];
      }
      for (int j = 0; j < n; j++) l += p[j] = exp(p[j] - mx);
      for (int j = 0; j < n; j++) {
        p[j] /= l;
        dp[j] = dot_f(doi, v + (size_t)(s0 + j) * AT_KD + kh * AT_HD, AT_HD);
        d += p[j] * dp[j];
      }
      double* dqi = dq + (size_t)i * AT_QD + h * AT_HD;
      for (int c = 0; c < AT_HD; c++) dqi[c] = 0;
      for (int j = 0; j < n; j++) {
        const double ds = p[j] * (dp[j] - d);
        const size_t kv = (size_t)(s0 + j) * AT_KD + kh * AT_HD;
        for (int c = 0; c < AT_HD; c++) {
          dqi[c] += scale * ds * k[kv + c];
          dk[kv + c] += scale * ds * qi[c];
          dv[kv + c] += p[j] * doi[c];
        }
      }
    }
  }
}

/* got vs want (n values) within tol·max(1, max |want|); NaN fails. */
static int close_rel_max(const float* got, const double* want, size_t n, double tol) {
  double mx = 1;
  for (size_t i = 0; i < n; i++)
    if (fabs(want[i]) > mx) mx = fabs(want[i]);
  for (size_t i = 0; i < n; i++)
    if (!within(got[i], want[i], tol * mx)) return 0;
  return 1;
}

static void test_attention_train(void) {
  /* Sequences [0, 5), [5, 5) (empty), [5, 17); 19 rows, the last 2 outside every sequence. */
  enum { TOK = 19, NS = 3, LONGEST = 12 };
  const int32_t starts[NS + 1] = {0, 5, 5, 17};
  const float scale = 0.3f;
  float *q = falloc(TOK * AT_QD), *k = falloc(TOK * AT_KD), *v = falloc(TOK * AT_KD), *dout = falloc(TOK * AT_QD);
  float *out = falloc(TOK * AT_QD), *lse = falloc(TOK * AT_H);
  float *dq = falloc(TOK * AT_QD), *dk = falloc(TOK * AT_KD), *dv = falloc(TOK * AT_KD);
  double *eo = malloc(sizeof(double) * TOK * AT_QD), *el = malloc(sizeof(double) * TOK * AT_H);
  double *edq = malloc(sizeof(double) * TOK * AT_QD), *edk = malloc(sizeof(double) * TOK * AT_KD),
         *edv = malloc(sizeof(double) * TOK * AT_KD);
  fill_random(q, TOK * AT_QD, 1.0f);
  fill_random(k, TOK * AT_KD, 1.0f);
  fill_random(v, TOK * AT_KD, 1.0f);
  fill_random(dout, TOK * AT_QD, 1.0f);
  fill_nan(out, TOK * AT_QD);
  fill_nan(lse, TOK * AT_H);
  uint32_t fault = 0;
  LkAttentionForwardParams p;
  memset(&p, 0, sizeof p);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.seq_starts = starts;
  p.fault = &fault;
  p.scale = scale;
  p.tokens = 17; /* rows 17, 18 are beyond `tokens`: never touched */
  p.n_seqs = NS;
  p.max_seq_len = LONGEST;
  p.n_heads = AT_H;
  p.n_kv_heads = AT_KV;
  p.head_dim = AT_HD;
  p.dtype = LK_F32;
  check(lk_emu_attention_forward(&p, NULL) == 0 && fault == 0, "lk_emu_attention_forward returns 0, no fault");
  for (int s = 0; s < NS; s++) attn_forward_ref(q, k, v, starts[s], starts[s + 1], scale, eo, el);
  const double tf = attn_fwd_tol(scale, LONGEST);
  int ok = 1;
  for (int i = 0; i < 17 * AT_QD; i++)
    if (!within(out[i], eo[i], tf)) ok = 0;
  for (int i = 0; i < 17 * AT_H; i++)
    if (!within(lse[i], el[i], tf + kU * fabs(el[i]))) ok = 0;
  ok = ok && all_nan(out + 17 * AT_QD, 2 * AT_QD) && all_nan(lse + 17 * AT_H, 2 * AT_H);
  check(ok, "attention_forward (seqs 5, 0, 12; GQA 4/2; hd 16) matches the C softmax loop");

  LkAttentionBackwardParams bp;
  memset(&bp, 0, sizeof bp);
  bp.q = q;
  bp.k = k;
  bp.v = v;
  bp.out = out;
  bp.lse = lse;
  bp.d_out = dout;
  bp.dq = dq;
  bp.dk = dk;
  bp.dv = dv;
  bp.seq_starts = starts;
  bp.fault = &fault;
  bp.scale = scale;
  bp.tokens = 17;
  bp.n_seqs = NS;
  bp.max_seq_len = LONGEST;
  bp.n_heads = AT_H;
  bp.n_kv_heads = AT_KV;
  bp.head_dim = AT_HD;
  bp.dtype = LK_F32;
  void* ws_raw;
  bp.workspace = workspace_alloc(lk_emu_attention_backward_workspace_size(&bp), &ws_raw);
  fill_nan(dq, TOK * AT_QD);
  fill_nan(dk, TOK * AT_KD);
  fill_nan(dv, TOK * AT_KD);
  check(lk_emu_attention_backward(&bp, NULL) == 0 && fault == 0, "lk_emu_attention_backward returns 0, no fault");
  for (int s = 0; s < NS; s++) attn_backward_ref(q, k, v, dout, starts[s], starts[s + 1], scale, edq, edk, edv);
  const double tb = 8 * kU * (4 + fabs(scale) * AT_HD + sqrt((double)AT_G * LONGEST) + AT_HD);
  ok = close_rel_max(dq, edq, 17 * AT_QD, tb) && close_rel_max(dk, edk, 17 * AT_KD, tb) &&
       close_rel_max(dv, edv, 17 * AT_KD, tb) && all_nan(dq + 17 * AT_QD, 2 * AT_QD) &&
       all_nan(dk + 17 * AT_KD, 2 * AT_KD) && all_nan(dv + 17 * AT_KD, 2 * AT_KD);
  check(ok, "attention_backward dq, dk, dv match the C gradient loops");

  /* max_seq_len 11: the 12-row sequence is invalid → its rows untouched, LK_FAULT_INDEX; the
   * others still computed. */
  float* out1 = falloc(TOK * AT_QD);
  float* lse1 = falloc(TOK * AT_H);
  fill_nan(out1, TOK * AT_QD);
  fill_nan(lse1, TOK * AT_H);
  p.out = out1;
  p.lse = lse1;
  p.max_seq_len = 11;
  ok = lk_emu_attention_forward(&p, NULL) == 0 && fault == LK_FAULT_INDEX;
  for (int i = 0; i < 5 * AT_QD; i++)
    if (!within(out1[i], eo[i], tf)) ok = 0;
  for (int i = 0; i < 5 * AT_H; i++)
    if (!within(lse1[i], el[i], tf + kU * fabs(el[i]))) ok = 0;
  check(ok && all_nan(out1 + 5 * AT_QD, (TOK - 5) * AT_QD) && all_nan(lse1 + 5 * AT_H, (TOK - 5) * AT_H),
        "attention_forward: a sequence longer than max_seq_len is skipped and sets LK_FAULT_INDEX");
  fault = 0;
  bp.max_seq_len = 11;
  fill_nan(dq, TOK * AT_QD);
  check(lk_emu_attention_backward(&bp, NULL) == 0 && fault == LK_FAULT_INDEX &&
            all_nan(dq + 5 * AT_QD, (TOK - 5) * AT_QD) && close_rel_max(dq, edq, 5 * AT_QD, tb),
        "attention_backward: the too-long sequence is skipped and flagged, the short one computed");
  /* One sequence [2, 7) of 9 rows: s_0 != 0 and s_n != tokens are flagged, the sequence still runs,
   * the rows outside it stay untouched. */
  const int32_t partial[2] = {2, 7};
  fault = 0;
  fill_nan(out1, TOK * AT_QD);
  fill_nan(lse1, TOK * AT_H);
  p.seq_starts = partial;
  p.n_seqs = 1;
  p.tokens = 9;
  p.max_seq_len = 9;
  ok = lk_emu_attention_forward(&p, NULL) == 0 && fault == LK_FAULT_INDEX;
  attn_forward_ref(q, k, v, 2, 7, scale, eo, el);
  for (int i = 2 * AT_QD; i < 7 * AT_QD; i++)
    if (!within(out1[i], eo[i], tf)) ok = 0;
  for (int i = 2 * AT_H; i < 7 * AT_H; i++)
    if (!within(lse1[i], el[i], tf + kU * fabs(el[i]))) ok = 0;
  check(ok && all_nan(out1, 2 * AT_QD) && all_nan(lse1, 2 * AT_H) && all_nan(out1 + 7 * AT_QD, (TOK - 7) * AT_QD) &&
            all_nan(lse1 + 7 * AT_H, (TOK - 7) * AT_H),
        "attention_forward: seq_starts not from 0 to tokens computes the sequence and sets LK_FAULT_INDEX");
  p.head_dim = 24;
  check(lk_emu_attention_forward(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "attention_forward rejects head_dim 24");
  p.head_dim = AT_HD;
  p.n_kv_heads = 3;
  check(lk_emu_attention_forward(&p, NULL) == LK_ERR_INVALID_ARGUMENT,
        "attention_forward rejects n_heads not a multiple of n_kv_heads");
  bp.max_seq_len = LONGEST;
  bp.workspace = NULL;
  check(lk_emu_attention_backward(&bp, NULL) == LK_ERR_INVALID_ARGUMENT, "attention_backward rejects a null workspace");
  free(q); free(k); free(v); free(dout); free(out); free(lse); free(dq); free(dk); free(dv);
  free(eo); free(el); free(edq); free(edk); free(edv); free(out1); free(lse1); free(ws_raw);
}

static void test_kv_cache_write(void) {
  enum { ROWS = 5, CACHE = 9 };
  float rows[ROWS * AT_KD], cache[CACHE * AT_KD], cache0[CACHE * AT_KD];
  fill_random(rows, ROWS * AT_KD, 1.0f);
  fill_random(cache0, CACHE * AT_KD, 1.0f);
  memcpy(cache, cache0, sizeof cache);
  int32_t slots[ROWS] = {3, 0, 8, 5, 1};
  uint32_t fault = 0;
  LkKvCacheWriteParams p;
  memset(&p, 0, sizeof p);
  p.rows = rows;
  p.slots = slots;
  p.cache = cache;
  p.fault = &fault;
  p.cache_rows = CACHE;
  p.kv_dim = AT_KD;
  p.tokens = ROWS;
  p.dtype = LK_F32;
  int rc = lk_emu_attention_kv_cache_write(&p, NULL);
  int ok = rc == 0 && fault == 0;
  for (int s = 0; s < CACHE; s++) {
    const float* want = cache0 + s * AT_KD;
    for (int t = 0; t < ROWS; t++)
      if (slots[t] == s) want = rows + t * AT_KD;
    if (memcmp(cache + s * AT_KD, want, sizeof(float) * AT_KD) != 0) ok = 0;
  }
  check(ok, "attention_kv_cache_write copies rows to their slots, other cache rows untouched");
  /* Slots 9 (= cache_rows) and −1: skipped, flagged; the valid ones still land. */
  const int32_t bad[ROWS] = {2, 9, -1, 4, 6};
  memcpy(slots, bad, sizeof bad);
  memcpy(cache, cache0, sizeof cache);
  rc = lk_emu_attention_kv_cache_write(&p, NULL);
  ok = rc == 0 && fault == LK_FAULT_INDEX;
  for (int s = 0; s < CACHE; s++) {
    const float* want = s == 2 ? rows : s == 4 ? rows + 3 * AT_KD : s == 6 ? rows + 4 * AT_KD : cache0 + s * AT_KD;
    if (memcmp(cache + s * AT_KD, want, sizeof(float) * AT_KD) != 0) ok = 0;
  }
  check(ok, "attention_kv_cache_write: slots outside [0, cache_rows) skipped, LK_FAULT_INDEX set");
  p.kv_dim = 0;
  check(lk_emu_attention_kv_cache_write(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "kv_cache_write rejects kv_dim 0");
}

/* Decode, 4 sequences over a 300-row cache, head_dim 16, n_heads / n_kv_heads as given. Tolerance:
 * the forward's with len = kv_len. */
static void attn_decode_case(int n_heads, int n_kv_heads, int max_kv_len, const int32_t* kv_start,
                             const int32_t* kv_len, uint32_t want_fault, const char* what) {
  enum { NSQ = 4, CROWS = 300 };
  const float scale = 0.25f;
  const int qd = n_heads * AT_HD, kd = n_kv_heads * AT_HD, group = n_heads / n_kv_heads;
  float* q = falloc((size_t)NSQ * qd);
  float* kc = falloc((size_t)CROWS * kd);
  float* vc = falloc((size_t)CROWS * kd);
  float* out = falloc((size_t)NSQ * qd);
  double* want = malloc(sizeof(double) * AT_HD);
  double* pbuf = malloc(sizeof(double) * CROWS);
  fill_random(q, (size_t)NSQ * qd, 1.0f);
  fill_random(kc, (size_t)CROWS * kd, 1.0f);
  fill_random(vc, (size_t)CROWS * kd, 1.0f);
  fill_nan(out, (size_t)NSQ * qd);
  uint32_t fault = 0;
  LkAttentionDecodeParams p;
  memset(&p, 0, sizeof p);
  p.q = q;
  p.k_cache = kc;
  p.v_cache = vc;
  p.kv_start = kv_start;
  p.kv_len = kv_len;
  p.out = out;
  p.fault = &fault;
  p.cache_rows = CROWS;
  p.scale = scale;
  p.n_seqs = NSQ;
  p.max_kv_len = max_kv_len;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = AT_HD;
  p.dtype = LK_F32;
  void* ws_raw;
  const size_t ws_bytes = lk_emu_attention_decode_workspace_size(&p);
  p.workspace = workspace_alloc(ws_bytes, &ws_raw);
  int ok = lk_emu_attention_decode(&p, NULL) == 0 && fault == want_fault;
  for (int i = 0; i < NSQ; i++) {
    const int s = kv_start[i], n = kv_len[i];
    const int valid = s >= 0 && n >= 0 && n <= max_kv_len && s + n <= CROWS;
    if (!valid) {
      if (!all_nan(out + i * qd, qd)) ok = 0; /* untouched */
      continue;
    }
    for (int h = 0; h < n_heads; h++) {
      attn_row(q + i * qd + h * AT_HD, kc, vc, s, n, h / group, kd, scale, pbuf, want);
      for (int c = 0; c < AT_HD; c++)
        if (!within(out[i * qd + h * AT_HD + c], want[c], n > 0 ? attn_fwd_tol(scale, n) : 0.0)) ok = 0;
    }
  }
  char msg[200];
  snprintf(msg, sizeof msg, "attention_decode %d/%d heads, max_kv_len %d %s (workspace %zu bytes)", n_heads,
           n_kv_heads, max_kv_len, what, ws_bytes);
  check(ok, msg);
  if (ws_bytes > 0) {
    p.workspace = NULL;
    check(lk_emu_attention_decode(&p, NULL) == LK_ERR_INVALID_ARGUMENT,
          "attention_decode rejects a null workspace when it needs one");
  }
  free(q); free(kc); free(vc); free(out); free(want); free(pbuf); free(ws_raw);
}

static void test_attention_family(void) {
  test_attention_train();
  test_kv_cache_write();
  /* max_kv_len 290 > one 256-key chunk: two splits combined through the workspace. */
  const int32_t s1[4] = {0, 7, 20, 299}, l1[4] = {0, 280, 9, 1};
  attn_decode_case(AT_H, AT_KV, 290, s1, l1, 0, "lengths 0, 280, 9, 1 match the C softmax loop (kv_len 0 → zeros)");
  const int32_t s2[4] = {3, 0, 40, 17}, l2[4] = {200, 77, 256, 5};
  attn_decode_case(AT_H, AT_KV, 256, s2, l2, 0, "(one chunk) matches the C softmax loop");
  /* 20 query heads per kv head: more than one CTA's worth of heads per kv head. */
  attn_decode_case(40, 2, 290, s1, l1, 0, "matches the C softmax loop");
  const int32_t s3[4] = {0, 7, 295, -1}, l3[4] = {3, 281, 9, 2};
  attn_decode_case(AT_H, AT_KV, 280, s3, l3, LK_FAULT_INDEX,
                   "past max_kv_len, past the cache, negative start: rows untouched, LK_FAULT_INDEX set");
}

/* ---- norm: RMSNorm forward/backward ---- */
/* Tolerances from worst-case bounds: any order of an f32 sum of n terms errs by ≤ (n − 1)·u·Σ|terms|;
 * plus a few u for rsqrt, products and the output rounding. rstd and y: u·(dim + 8) relative
 * (positive terms); dx: u·(dim + 8)·(|rstd·w·dy| + rstd³/dim·|x|·Σ|dy·w·x|);
 * dw: u·(rows + 8)·Σ|dy·x·rstd|. */
static void test_rmsnorm(int rows, int dim) {
  const float eps = 1e-5f;
  const size_t n = (size_t)rows * dim;
  float *x = falloc(n), *w = falloc(dim), *y = falloc(n + 3), *rstd = falloc(rows + 1), *dy = falloc(n);
  float *dx = falloc(n + 3), *dw = falloc(dim + 3);
  fill_random(x, n, 1.0f);
  for (int j = 0; j < dim; j++) w[j] = 1.0f + 0.5f * random_unit();
  fill_random(dy, n, 1.0f);
  fill_nan(y, n + 3);
  fill_nan(rstd, rows + 1);
  LkRmsNormForwardParams p;
  memset(&p, 0, sizeof p);
  p.x = x;
  p.w = w;
  p.y = y;
  p.rstd = rstd;
  p.rows = rows;
  p.dim = dim;
  p.eps = eps;
  p.dtype = LK_F32;
  int ok = lk_emu_norm_rmsnorm_forward(&p, NULL) == 0;
  const double tol = kU * (dim + 8);
  for (int r = 0; r < rows; r++) {
    double ss = 0;
    for (int j = 0; j < dim; j++) ss += (double)x[r * dim + j] * x[r * dim + j];
    const double rs = 1.0 / sqrt(ss / dim + eps);
    if (!within(rstd[r], rs, tol * rs)) ok = 0;
    for (int j = 0; j < dim; j++) {
      const double want = x[r * dim + j] * rs * w[j];
      if (!within(y[r * dim + j], want, tol * fabs(want) + 0x1p-149)) ok = 0;
    }
  }
  ok = ok && all_nan(y + n, 3) && isnan(rstd[rows]);
  char what[160];
  snprintf(what, sizeof what, "rmsnorm_forward %dx%d matches the C loop", rows, dim);
  check(ok, what);

  LkRmsNormBackwardParams bp;
  memset(&bp, 0, sizeof bp);
  bp.x = x;
  bp.w = w;
  bp.rstd = rstd;
  bp.dy = dy;
  bp.dx = dx;
  bp.dw = dw;
  bp.rows = rows;
  bp.dim = dim;
  bp.dtype = LK_F32;
  void* ws_raw;
  const size_t ws_bytes = lk_emu_norm_rmsnorm_backward_workspace_size(&bp);
  bp.workspace = workspace_alloc(ws_bytes, &ws_raw);
  fill_nan(dx, n + 3);
  fill_nan(dw, dim + 3);
  ok = lk_emu_norm_rmsnorm_backward(&bp, NULL) == 0;
  for (int r = 0; r < rows; r++) {
    const double rs = rstd[r]; /* the saved f32 rstd, as the contract says */
    double c = 0, cmag = 0;
    for (int j = 0; j < dim; j++) {
      c += (double)dy[r * dim + j] * w[j] * x[r * dim + j];
      cmag += fabs((double)dy[r * dim + j] * w[j] * x[r * dim + j]);
    }
    for (int j = 0; j < dim; j++) {
      const double t1 = rs * w[j] * dy[r * dim + j], t2 = rs * rs * rs / dim * x[r * dim + j];
      const double want = t1 - t2 * c, mag = fabs(t1) + fabs(t2) * cmag;
      if (!within(dx[r * dim + j], want, tol * mag + 0x1p-149)) ok = 0;
    }
  }
  for (int j = 0; j < dim; j++) {
    double s = 0, mag = 0;
    for (int r = 0; r < rows; r++) {
      s += (double)dy[r * dim + j] * x[r * dim + j] * rstd[r];
      mag += fabs((double)dy[r * dim + j] * x[r * dim + j] * rstd[r]);
    }
    if (!within(dw[j], s, kU * (rows + 8) * mag + 0x1p-149)) ok = 0;
  }
  ok = ok && all_nan(dx + n, 3) && all_nan(dw + dim, 3);
  snprintf(what, sizeof what, "rmsnorm_backward %dx%d (workspace %zu bytes) matches the C loop", rows, dim, ws_bytes);
  check(ok, what);
  if (ws_bytes > 0) {
    bp.workspace = NULL;
    check(lk_emu_norm_rmsnorm_backward(&bp, NULL) == LK_ERR_INVALID_ARGUMENT,
          "rmsnorm_backward rejects a null workspace when it needs one");
  }
  free(x); free(w); free(y); free(rstd); free(dy); free(dx); free(dw); free(ws_raw);
}

static void test_norm_family(void) {
  test_rmsnorm(1, 1);
  test_rmsnorm(5, 37);
  test_rmsnorm(19, 64); /* 16-byte rows (vector path), three row pieces for dw */
  test_rmsnorm(3, 1500); /* dim > 1024: one block per row */
  /* rows = 0: dw = the empty sum, zeros; the workspace size is 0 and null is fine. */
  float dw[5] = {NAN, NAN, NAN, NAN, NAN};
  LkRmsNormBackwardParams bp;
  memset(&bp, 0, sizeof bp);
  bp.dw = dw;
  bp.rows = 0;
  bp.dim = 4;
  bp.dtype = LK_F32;
  check(lk_emu_norm_rmsnorm_backward_workspace_size(&bp) == 0 && lk_emu_norm_rmsnorm_backward(&bp, NULL) == 0 &&
            dw[0] == 0.0f && dw[1] == 0.0f && dw[2] == 0.0f && dw[3] == 0.0f && isnan(dw[4]),
        "rmsnorm_backward with rows 0 writes dw = 0 without a workspace");
  /* dim = 0: rstd = 1/sqrt(eps). */
  float x = 1.0f, w = 1.0f, y = 0.0f, r[3] = {NAN, NAN, NAN};
  LkRmsNormForwardParams p;
  memset(&p, 0, sizeof p);
  p.x = &x;
  p.w = &w;
  p.y = &y;
  p.rstd = r;
  p.rows = 2;
  p.dim = 0;
  p.eps = 0.25f;
  p.dtype = LK_F32;
  check(lk_emu_norm_rmsnorm_forward(&p, NULL) == 0 && r[0] == 2.0f && r[1] == 2.0f && isnan(r[2]) && y == 0.0f,
        "rmsnorm_forward with dim 0 writes rstd = 1/sqrt(eps)");
  p.rows = 1;
  p.dim = 1;
  p.eps = -1.0f;
  check(lk_emu_norm_rmsnorm_forward(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "rmsnorm_forward rejects eps < 0");
  p.eps = 0.0f;
  p.dtype = 5;
  check(lk_emu_norm_rmsnorm_forward(&p, NULL) == LK_ERR_UNSUPPORTED_DTYPE, "rmsnorm_forward rejects dtype 5");
}

/* ---- embedding: row gather forward, deterministic scatter-add backward ---- */
/* Forward is a copy: bit-exact. Backward: the contract fixes the sum (ascending t, f32), so the C
 * f32 loop must match bit for bit; it is also held to the f64 sum within u·(count)·Σ|terms|. */
static void test_embedding(int vocab, int dim, int tokens) {
  const size_t nt = (size_t)vocab * dim, no = (size_t)tokens * dim;
  int32_t* ids = malloc(sizeof(int32_t) * tokens);
  float *table = falloc(nt), *out = falloc(no + 3), *dout = falloc(no), *dtab = falloc(nt + 3);
  for (int t = 0; t < tokens; t++) ids[t] = (int32_t)((random_unit() + 1.0f) * 0.5f * vocab) % vocab;
  ids[tokens - 1] = ids[0]; /* at least one repeated id */
  fill_random(table, nt, 1.0f);
  fill_random(dout, no, 1.0f);
  for (int pass = 0; pass < (tokens >= 3 ? 2 : 1); pass++) {
    /* pass 1: two ids out of range (vocab, −1): forward leaves their rows, backward skips them. */
    if (pass == 1) {
      ids[1] = vocab;
      ids[tokens / 2] = -1;
    }
    uint32_t fault = 0;
    fill_nan(out, no + 3);
    LkEmbeddingForwardParams p;
    memset(&p, 0, sizeof p);
    p.ids = ids;
    p.table = table;
    p.out = out;
    p.fault = &fault;
    p.vocab = vocab;
    p.dim = dim;
    p.tokens = tokens;
    p.dtype = LK_F32;
    int ok = lk_emu_embedding_forward(&p, NULL) == 0 && fault == (pass ? LK_FAULT_INDEX : 0u);
    for (int t = 0; t < tokens; t++) {
      if (ids[t] < 0 || ids[t] >= vocab) {
        if (!all_nan(out + (size_t)t * dim, dim)) ok = 0;
      } else if (memcmp(out + (size_t)t * dim, table + (size_t)ids[t] * dim, sizeof(float) * dim) != 0) {
        ok = 0;
      }
    }
    ok = ok && all_nan(out + no, 3);
    char what[200];
    snprintf(what, sizeof what, "embedding_forward vocab %d dim %d tokens %d%s", vocab, dim, tokens,
             pass ? ": bad ids leave their rows and set LK_FAULT_INDEX" : " copies the table rows");
    check(ok, what);

    fault = 0;
    fill_nan(dtab, nt + 3);
    LkEmbeddingBackwardParams bp;
    memset(&bp, 0, sizeof bp);
    bp.ids = ids;
    bp.d_out = dout;
    bp.d_table = dtab;
    bp.fault = &fault;
    bp.vocab = vocab;
    bp.dim = dim;
    bp.tokens = tokens;
    bp.dtype = LK_F32;
    void* ws_raw;
    const size_t ws_bytes = lk_emu_embedding_backward_workspace_size(&bp);
    bp.workspace = workspace_alloc(ws_bytes, &ws_raw);
    ok = lk_emu_embedding_backward(&bp, NULL) == 0 && fault == (pass ? LK_FAULT_INDEX : 0u);
    int exact = ok;
    for (int v = 0; v < vocab; v++) {
      for (int c = 0; c < dim; c++) {
        float f = 0.0f;
        double s = 0, mag = 0;
        int count = 0;
        for (int t = 0; t < tokens; t++) {
          if (ids[t] != v) continue;
          f += dout[(size_t)t * dim + c];
          s += dout[(size_t)t * dim + c];
          mag += fabs(dout[(size_t)t * dim + c]);
          count++;
        }
        const float got = dtab[(size_t)v * dim + c];
        if (memcmp(&got, &f, sizeof f) != 0) exact = 0;
        if (!within(got, s, kU * count * mag)) ok = 0;
      }
    }
    ok = ok && all_nan(dtab + nt, 3);
    snprintf(what, sizeof what, "embedding_backward vocab %d dim %d tokens %d (workspace %zu bytes)%s", vocab, dim,
             tokens, ws_bytes, pass ? ": bad ids skipped, LK_FAULT_INDEX set" : " matches the f64 sums");
    check(ok, what);
    snprintf(what, sizeof what, "embedding_backward vocab %d dim %d tokens %d%s: bits of the ascending-t f32 sum",
             vocab, dim, tokens, pass ? " (bad ids)" : "");
    check(exact, what);
    if (pass == 1 && ws_bytes > 0) {
      bp.workspace = NULL;
      check(lk_emu_embedding_backward(&bp, NULL) == LK_ERR_INVALID_ARGUMENT,
            "embedding_backward rejects a null workspace");
    }
    free(ws_raw);
  }
  free(ids); free(table); free(out); free(dout); free(dtab);
}

static void test_embedding_family(void) {
  test_embedding(11, 37, 13);
  test_embedding(300, 8, 700); /* 9-bit ids: two radix passes over three 256-key tiles; vector rows */
  test_embedding(1, 1, 1);
  LkEmbeddingBackwardParams bp;
  memset(&bp, 0, sizeof bp);
  bp.vocab = 7;
  bp.dim = 3;
  bp.dtype = LK_F32;
  check(lk_emu_embedding_backward_workspace_size(&bp) == 0, "embedding_backward workspace is 0 for tokens 0");
  LkEmbeddingForwardParams p;
  memset(&p, 0, sizeof p);
  p.vocab = -1;
  p.dim = 3;
  p.tokens = 1;
  p.dtype = LK_F32;
  check(lk_emu_embedding_forward(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "embedding_forward rejects vocab −1");
}

/* ---- rope: rotate_half RoPE in place, forward and backward (the transposed rotation) ---- */
/* Reference: inv_freq and the f32 angle exactly as the header defines them, sin/cos of that angle
 * and the rotation in double. Tolerance |Δ| ≤ 4u·(|a| + |b|) (src/rope.rs: sin/cos ≈ correctly
 * rounded, then f32 products and one sum). */
static void test_rope(int tokens, int n_heads, int head_dim, float theta, int backward, int with_bad) {
  const int width = n_heads * head_dim, half = head_dim / 2;
  const size_t n = (size_t)tokens * width;
  float *x = falloc(n + 3), *x0 = falloc(n + 3);
  int32_t* pos = malloc(sizeof(int32_t) * tokens);
  fill_random(x0, n, 1.0f);
  fill_nan(x0 + n, 3);
  memcpy(x, x0, sizeof(float) * (n + 3));
  for (int t = 0; t < tokens; t++) pos[t] = (int32_t)((random_unit() + 1.0f) * 2048.0f);
  pos[0] = 0;
  if (tokens > 1) pos[tokens - 1] = 131071 - tokens; /* a large position */
  if (with_bad) pos[tokens / 2] = -3;
  uint32_t fault = 0;
  LkRopeParams p;
  memset(&p, 0, sizeof p);
  p.positions = pos;
  p.x = x;
  p.fault = &fault;
  p.tokens = tokens;
  p.n_heads = n_heads;
  p.head_dim = head_dim;
  p.theta = theta;
  p.dtype = LK_F32;
  const int rc = backward ? lk_emu_rope_backward(&p, NULL) : lk_emu_rope_forward(&p, NULL);
  int ok = rc == 0 && fault == (with_bad ? LK_FAULT_INDEX : 0u);
  const double c = log((double)theta) / head_dim;
  for (int t = 0; t < tokens; t++) {
    if (pos[t] < 0) {
      if (memcmp(x + (size_t)t * width, x0 + (size_t)t * width, sizeof(float) * width) != 0) ok = 0;
      continue;
    }
    for (int i = 0; i < half; i++) {
      const float inv_freq = (float)exp(-(double)(2 * i) * c);
      const float angle = (float)pos[t] * inv_freq;
      const double sn = backward ? -sin((double)angle) : sin((double)angle), cs = cos((double)angle);
      for (int h = 0; h < n_heads; h++) {
        const size_t j1 = (size_t)t * width + h * head_dim + i, j2 = j1 + half;
        const double a = x0[j1], b = x0[j2], tol = 4 * kU * (fabs(a) + fabs(b));
        if (!within(x[j1], a * cs - b * sn, tol) || !within(x[j2], b * cs + a * sn, tol)) ok = 0;
      }
    }
  }
  ok = ok && all_nan(x + n, 3);
  char what[200];
  snprintf(what, sizeof what, "rope_%s %d tokens, %d heads of %d, theta %g%s", backward ? "backward" : "forward",
           tokens, n_heads, head_dim, theta,
           with_bad ? ": a negative position leaves its row and sets LK_FAULT_INDEX" : " matches the C rotation");
  check(ok, what);
  free(x); free(x0); free(pos);
}

static void test_rope_family(void) {
  test_rope(7, 3, 10, 10000.0f, 0, 0); /* half = 5: the scalar path */
  test_rope(7, 3, 10, 10000.0f, 1, 0);
  test_rope(5, 2, 16, 500000.0f, 0, 1); /* half = 8: 16-byte groups */
  test_rope(4, 2, 16, 500000.0f, 1, 1);
  test_rope(3, 2, 128, 500000.0f, 0, 0);
  float x[4] = {1, 2, 3, 4};
  int32_t pos[1] = {1};
  LkRopeParams p;
  memset(&p, 0, sizeof p);
  p.positions = pos;
  p.x = x;
  p.tokens = 1;
  p.n_heads = 1;
  p.head_dim = 3;
  p.theta = 10000.0f;
  p.dtype = LK_F32;
  check(lk_emu_rope_forward(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "rope_forward rejects an odd head_dim");
  p.head_dim = 4;
  p.theta = 0.0f;
  check(lk_emu_rope_backward(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "rope_backward rejects theta 0");
}

/* ---- elementwise: add, add_assign, scale (exactly rounded: bit-exact), swiglu forward/backward ---- */
/* swiglu tolerance: 8u relative to the magnitude of the products (expf within a couple of ulps, the
 * σ reciprocal by Newton steps ~½ ulp, three or four f32 roundings); d_gate's factor 1 + g·(1 − σ)
 * can cancel (g ≈ −1.28), so it is measured against |c·b·σ|·(1 + |g·(1 − σ)|). */
static void sigmoid_pair_ref(double g, double* s, double* sc) {
  const double e = exp(-fabs(g)), big = 1.0 / (1.0 + e), small = e / (1.0 + e);
  *s = g >= 0 ? big : small;
  *sc = g >= 0 ? small : big;
}

static void test_elementwise(int n, int off) {
  const int len = n + 8; /* operands at [off, off + n); the rest must keep its bits */
  float *a = falloc(len), *b = falloc(len), *c = falloc(len), *out = falloc(len), *out2 = falloc(len),
        *o0 = falloc(len);
  fill_random(a, len, 8.0f); /* gates across both σ branches and the tails */
  fill_random(b, len, 1.0f);
  fill_random(c, len, 1.0f);
  fill_random(o0, len, 1.0f);
  LkElementwiseParams p;
  memset(&p, 0, sizeof p);
  p.a = a + off;
  p.b = b + off;
  p.c = c + off;
  p.out = out + off;
  p.out2 = out2 + off;
  p.n = n;
  p.alpha = -1.375f;
  p.dtype = LK_F32;
  char what[160];
  for (int op = 0; op < 5; op++) {
    const int reads_out = op == 1 || op == 2;
    if (reads_out)
      memcpy(out, o0, sizeof(float) * len);
    else
      fill_nan(out, len);
    fill_nan(out2, len);
    int rc;
    const char* name;
    switch (op) {
      case 0: rc = lk_emu_elementwise_add(&p, NULL); name = "add"; break;
      case 1: rc = lk_emu_elementwise_add_assign(&p, NULL); name = "add_assign"; break;
      case 2: rc = lk_emu_elementwise_scale(&p, NULL); name = "scale"; break;
      case 3: rc = lk_emu_elementwise_swiglu_forward(&p, NULL); name = "swiglu_forward"; break;
      default: rc = lk_emu_elementwise_swiglu_backward(&p, NULL); name = "swiglu_backward"; break;
    }
    int ok = rc == 0;
    for (int i = 0; i < len; i++) {
      const int in = i >= off && i < off + n;
      if (!in) {
        if (reads_out ? memcmp(&out[i], &o0[i], sizeof(float)) != 0 : !isnan(out[i])) ok = 0;
        if (!isnan(out2[i])) ok = 0;
        continue;
      }
      if (op <= 2) {
        const float want = op == 0 ? a[i] + b[i] : op == 1 ? o0[i] + a[i] : o0[i] * p.alpha;
        if (memcmp(&out[i], &want, sizeof want) != 0) ok = 0;
        continue;
      }
      double s, sc;
      sigmoid_pair_ref(a[i], &s, &sc);
      if (op == 3) {
        const double want = a[i] * s * b[i];
        if (!within(out[i], want, 8 * kU * fabs(want) + 0x1p-149)) ok = 0;
      } else {
        const double dg = (double)c[i] * b[i] * s * (1.0 + a[i] * sc), du = (double)c[i] * a[i] * s;
        const double dg_mag = fabs((double)c[i] * b[i] * s) * (1.0 + fabs(a[i] * sc));
        if (!within(out[i], dg, 8 * kU * dg_mag + 0x1p-149) || !within(out2[i], du, 8 * kU * fabs(du) + 0x1p-149))
          ok = 0;
      }
      if (op != 4 && !isnan(out2[i])) ok = 0;
    }
    snprintf(what, sizeof what, "elementwise_%s n %d%s %s", name, n, off ? " (misaligned)" : "",
             op <= 2 ? "bit-exact" : "matches the C loop");
    check(ok, what);
  }
  free(a); free(b); free(c); free(out); free(out2); free(o0);
}

static void test_elementwise_family(void) {
  test_elementwise(1, 0);
  test_elementwise(37, 0); /* 16-byte groups and a partial last group */
  test_elementwise(37, 1); /* misaligned: one element per thread */
  test_elementwise(1000, 0);
  float x[2] = {1, 2};
  LkElementwiseParams p;
  memset(&p, 0, sizeof p);
  p.a = p.b = x;
  p.out = x;
  p.n = -1;
  p.dtype = LK_F32;
  check(lk_emu_elementwise_add(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "elementwise_add rejects n = −1");
  p.n = 2;
  p.alpha = INFINITY;
  check(lk_emu_elementwise_scale(&p, NULL) == LK_ERR_INVALID_ARGUMENT && x[0] == 1.0f,
        "elementwise_scale rejects alpha = inf");
  p.alpha = 1.0f;
  p.dtype = 3;
  check(lk_emu_elementwise_swiglu_forward(&p, NULL) == LK_ERR_UNSUPPORTED_DTYPE, "swiglu_forward rejects dtype 3");
}

/* ---- loss: softmax cross-entropy forward/backward, argmax_rows ---- */
/* Tolerances in the attention's probabilistic model (safety factor 8): lse and loss absolute
 * 8u·(4 + max|x − max| + √vocab) plus u·|value|; d_logits |d_loss|·p·u·(8 + 2|x − lse|) (expf of
 * an f32 difference) plus 2u·|value| (subtracting the one-hot, multiplying by d_loss). argmax is
 * exact. */
static void test_cross_entropy(int rows, int vocab, const int32_t* targets, uint32_t want_fault) {
  const size_t nl = (size_t)rows * vocab;
  float *x = falloc(nl), *losses = falloc(rows + 1), *lse = falloc(rows + 1), *dx = falloc(nl + 3);
  fill_random(x, nl, 4.0f);
  fill_nan(losses, rows + 1);
  fill_nan(lse, rows + 1);
  uint32_t fault = 0;
  LkCrossEntropyForwardParams p;
  memset(&p, 0, sizeof p);
  p.logits = x;
  p.targets = targets;
  p.losses = losses;
  p.lse = lse;
  p.fault = &fault;
  p.rows = rows;
  p.vocab = vocab;
  p.dtype = LK_F32;
  int ok = lk_emu_loss_cross_entropy_forward(&p, NULL) == 0 && fault == want_fault;
  for (int r = 0; r < rows; r++) {
    const float* row = x + (size_t)r * vocab;
    double mx = -INFINITY, s = 0, spread = 0;
    for (int c = 0; c < vocab; c++)
      if (row[c] > mx) mx = row[c];
    for (int c = 0; c < vocab; c++) {
      s += exp(row[c] - mx);
      if (mx - row[c] > spread) spread = mx - row[c];
    }
    const double want_lse = mx + log(s), tol = 8 * kU * (4 + spread + sqrt((double)vocab));
    const int valid = targets[r] >= 0 && targets[r] < vocab;
    const double want_loss = valid ? want_lse - row[targets[r]] : 0.0;
    if (!within(lse[r], want_lse, tol + kU * fabs(want_lse))) ok = 0;
    if (valid ? !within(losses[r], want_loss, tol + kU * fabs(want_loss)) : losses[r] != 0.0f) ok = 0;
  }
  ok = ok && isnan(losses[rows]) && isnan(lse[rows]);
  char what[200];
  snprintf(what, sizeof what, "cross_entropy_forward %dx%d%s", rows, vocab,
           want_fault ? ": out-of-range targets give loss 0 and set LK_FAULT_INDEX" : " matches the C loop");
  check(ok, what);

  LkCrossEntropyBackwardParams bp;
  memset(&bp, 0, sizeof bp);
  bp.logits = x;
  bp.targets = targets;
  bp.lse = lse;
  bp.d_logits = dx;
  bp.rows = rows;
  bp.vocab = vocab;
  bp.d_loss = 0.7f;
  bp.dtype = LK_F32;
  fill_nan(dx, nl + 3);
  ok = lk_emu_loss_cross_entropy_backward(&bp, NULL) == 0;
  for (int r = 0; r < rows; r++) {
    const int t = targets[r], valid = t >= 0 && t < vocab;
    for (int c = 0; c < vocab; c++) {
      const float got = dx[(size_t)r * vocab + c];
      if (!valid) {
        if (got != 0.0f) ok = 0;
        continue;
      }
      const double d = (double)x[(size_t)r * vocab + c] - lse[r], pr = exp(d);
      const double want = bp.d_loss * (pr - (c == t ? 1.0 : 0.0));
      if (!within(got, want, fabs(bp.d_loss) * pr * kU * (8 + 2 * fabs(d)) + 2 * kU * fabs(want) + 0x1p-149)) ok = 0;
    }
  }
  ok = ok && all_nan(dx + nl, 3);
  snprintf(what, sizeof what, "cross_entropy_backward %dx%d matches the C loop (zero rows for ignored targets)", rows,
           vocab);
  check(ok, what);
  free(x); free(losses); free(lse); free(dx);
}

static int ranks_above(float a, float b) { return isnan(b) ? 0 : (isnan(a) || a > b); }

static void test_argmax(int rows, int cols) {
  const size_t n = (size_t)rows * cols;
  float* x = falloc(n);
  int32_t* out = malloc(sizeof(int32_t) * (rows + 1));
  fill_random(x, n, 1.0f);
  /* Row 0: random. Row 1: a tie of the maximum (first wins). Row 2: two NaNs (first wins) above a
   * large value. Row 3: −0 and +0 as the maximum of negatives (−0 == +0: the first). */
  if (rows > 1) x[1 * cols + cols / 5] = x[1 * cols + cols - 2] = 5.0f;
  if (rows > 2) {
    x[2 * cols + 1] = 7.0f;
    x[2 * cols + cols / 3] = NAN;
    x[2 * cols + cols - 1] = NAN;
  }
  if (rows > 3) {
    for (int c = 0; c < cols; c++) x[3 * cols + c] = -1.0f - (float)c;
    x[3 * cols + cols / 2] = -0.0f;
    x[3 * cols + cols - 1] = 0.0f;
  }
  for (int r = 0; r <= rows; r++) out[r] = -7;
  LkArgmaxRowsParams p;
  memset(&p, 0, sizeof p);
  p.x = x;
  p.out = out;
  p.rows = rows;
  p.cols = cols;
  p.dtype = LK_F32;
  int ok = lk_emu_loss_argmax_rows(&p, NULL) == 0 && out[rows] == -7;
  for (int r = 0; r < rows; r++) {
    int best = 0;
    for (int c = 1; c < cols; c++)
      if (ranks_above(x[(size_t)r * cols + c], x[(size_t)r * cols + best])) best = c;
    if (out[r] != best) ok = 0;
  }
  if (rows > 3) ok = ok && out[1] == cols / 5 && out[2] == cols / 3 && out[3] == cols / 2;
  char what[160];
  snprintf(what, sizeof what, "argmax_rows %dx%d: first maximum, NaN above all, −0 == +0", rows, cols);
  check(ok, what);
  free(x);
  free(out);
}

static void test_loss_family(void) {
  const int32_t t1[6] = {3, -1, 36, 0, 17, 5};
  test_cross_entropy(6, 37, t1, 0);
  const int32_t t2[3] = {1499, 700, -1};
  test_cross_entropy(3, 1500, t2, 0); /* vocab > 1024: one block per row */
  const int32_t t3[4] = {1, 37, -2, 4};
  test_cross_entropy(4, 37, t3, LK_FAULT_INDEX);
  const int32_t t4[1] = {0};
  test_cross_entropy(1, 1, t4, 0);
  test_argmax(5, 37);
  test_argmax(4, 1500);
  float x[2] = {0, 0}, l = 0, s = 0;
  const int32_t tg[1] = {0};
  LkCrossEntropyForwardParams p;
  memset(&p, 0, sizeof p);
  p.logits = x;
  p.targets = tg;
  p.losses = &l;
  p.lse = &s;
  p.rows = 1;
  p.vocab = 0;
  p.dtype = LK_F32;
  check(lk_emu_loss_cross_entropy_forward(&p, NULL) == LK_ERR_INVALID_ARGUMENT,
        "cross_entropy_forward rejects vocab 0 with rows > 0");
  LkCrossEntropyBackwardParams bp;
  memset(&bp, 0, sizeof bp);
  bp.logits = x;
  bp.targets = tg;
  bp.lse = &s;
  bp.d_logits = x;
  bp.rows = 1;
  bp.vocab = 2;
  bp.d_loss = NAN;
  bp.dtype = LK_F32;
  check(lk_emu_loss_cross_entropy_backward(&bp, NULL) == LK_ERR_INVALID_ARGUMENT,
        "cross_entropy_backward rejects d_loss NaN");
}

/* ---- optim: AdamW step, Σx² ---- */
/* AdamW: the header spells out the f32 operations, so the C transcription (fmaf, sqrtf) must match
 * bit for bit; m', v' are also held to the f64 update within the roundings of the f32 steps
 * (2u of their terms), and the parameter to the f64 update from the stored m', v' within
 * 2u·|p·decay| + 8u·step_size·|m'/d|. */
static void test_adamw(int n, int off) {
  const int len = n + 3;
  const float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, wd = 0.1f;
  const int step = 3;
  LkAdamWParams p;
  memset(&p, 0, sizeof p);
  p.decay = (float)(1.0 - (double)lr * wd);
  p.beta1 = beta1;
  p.beta2 = beta2;
  p.one_minus_beta1 = (float)(1.0 - beta1);
  p.one_minus_beta2 = (float)(1.0 - beta2);
  p.step_size = (float)(lr / (1.0 - pow(beta1, step)));
  p.bc2_sqrt = (float)sqrt(1.0 - pow(beta2, step));
  p.eps = eps;
  p.dtype = LK_F32;
  float *prm = falloc(len), *g = falloc(len), *m = falloc(len), *v = falloc(len);
  float *prm0 = falloc(len), *m0 = falloc(len), *v0 = falloc(len);
  fill_random(prm0, len, 1.0f);
  fill_random(g, len, 1.0f);
  fill_random(m0, len, 0.1f);
  for (int i = 0; i < len; i++) v0[i] = 0.01f * fabsf(random_unit());
  memcpy(prm, prm0, sizeof(float) * len);
  memcpy(m, m0, sizeof(float) * len);
  memcpy(v, v0, sizeof(float) * len);
  p.param = prm + off;
  p.grad = g + off;
  p.m = m + off;
  p.v = v + off;
  p.n = n;
  int ok = lk_emu_optim_adamw_step(&p, NULL) == 0, exact = ok;
  for (int i = 0; i < len; i++) {
    if (i < off || i >= off + n) {
      if (memcmp(&prm[i], &prm0[i], 4) != 0 || memcmp(&m[i], &m0[i], 4) != 0 || memcmp(&v[i], &v0[i], 4) != 0)
        ok = exact = 0;
      continue;
    }
    /* the header's f32 sequence */
    const float pd = prm0[i] * p.decay;
    const float mf = fmaf(p.one_minus_beta1, g[i] - m0[i], m0[i]);
    const float vf = fmaf(p.one_minus_beta2, g[i] * g[i], p.beta2 * v0[i]);
    const float df = sqrtf(vf) / p.bc2_sqrt + p.eps;
    const float pf = fmaf(-p.step_size, mf / df, pd);
    if (memcmp(&prm[i], &pf, 4) != 0 || memcmp(&m[i], &mf, 4) != 0 || memcmp(&v[i], &vf, 4) != 0) exact = 0;
    /* f64 (src/optim.rs reference::adamw_element) */
    const double gm = (double)g[i] - m0[i];
    const double md = m0[i] + (double)p.one_minus_beta1 * gm;
    const double vd = (double)p.beta2 * v0[i] + (double)p.one_minus_beta2 * g[i] * g[i];
    if (!within(m[i], md, 2 * kU * (fabs(p.one_minus_beta1 * gm) + fabs(md)))) ok = 0;
    if (!within(v[i], vd, 2 * kU * ((double)p.one_minus_beta2 * g[i] * g[i] + p.beta2 * v0[i] + vd))) ok = 0;
    const double d = sqrt((double)v[i]) / p.bc2_sqrt + p.eps, q = m[i] / d;
    const double pw = (double)prm0[i] * p.decay - (double)p.step_size * q;
    if (!within(prm[i], pw, 2 * kU * fabs((double)prm0[i] * p.decay) + 8 * kU * p.step_size * fabs(q))) ok = 0;
  }
  char what[160];
  snprintf(what, sizeof what, "adamw_step n %d%s matches the f64 update, rest untouched", n,
           off ? " (misaligned)" : "");
  check(ok, what);
  snprintf(what, sizeof what, "adamw_step n %d%s: bits of the header's fmaf sequence", n, off ? " (misaligned)" : "");
  check(exact, what);
  p.eps = NAN;
  check(lk_emu_optim_adamw_step(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "adamw_step rejects eps NaN");
  p.eps = eps;
  p.dtype = 4;
  check(lk_emu_optim_adamw_step(&p, NULL) == LK_ERR_UNSUPPORTED_DTYPE, "adamw_step rejects dtype 4");
  free(prm); free(g); free(m); free(v); free(prm0); free(m0); free(v0);
}

/* Σx²: tolerance u·(8 + 2√n) relative (rounding errors of an n-term f32 reduction grow like √n·u). */
static void test_sum_squares(int64_t n) {
  float* x = falloc((size_t)n);
  float out[2] = {NAN, NAN};
  fill_random(x, (size_t)n, 1.0f);
  LkSumSquaresParams p;
  memset(&p, 0, sizeof p);
  p.x = x;
  p.out = out;
  p.n = n;
  p.dtype = LK_F32;
  void* ws_raw;
  const size_t ws_bytes = lk_emu_optim_sum_squares_workspace_size(&p);
  p.workspace = workspace_alloc(ws_bytes, &ws_raw);
  double want = 0;
  for (int64_t i = 0; i < n; i++) want += (double)x[i] * x[i];
  char what[160];
  snprintf(what, sizeof what, "sum_squares n %lld (workspace %zu bytes) matches the C sum", (long long)n, ws_bytes);
  check(lk_emu_optim_sum_squares(&p, NULL) == 0 && within(out[0], want, kU * (8 + 2 * sqrt((double)n)) * want) &&
            (n > 0 || memcmp(&out[0], &(float){0.0f}, 4) == 0) && isnan(out[1]),
        what);
  if (ws_bytes > 0) {
    p.workspace = NULL;
    check(lk_emu_optim_sum_squares(&p, NULL) == LK_ERR_INVALID_ARGUMENT,
          "sum_squares rejects a null workspace when it needs one");
  }
  free(x);
  free(ws_raw);
}

static void test_optim_family(void) {
  test_adamw(1, 0);
  test_adamw(37, 0);
  test_adamw(38, 1);
  test_sum_squares(0);
  test_sum_squares(1);
  test_sum_squares(37);
  test_sum_squares(5001); /* several blocks: partials in the workspace */
  LkSumSquaresParams p;
  memset(&p, 0, sizeof p);
  float out = 0;
  p.out = &out;
  p.n = -1;
  p.dtype = LK_F32;
  check(lk_emu_optim_sum_squares(&p, NULL) == LK_ERR_INVALID_ARGUMENT, "sum_squares rejects n = −1");
}

int main(void) {
  test_bgmv();
  test_sgmv();
  test_shrink_dense(1, 1, 1);
  test_shrink_dense(3, 17, 5);
  test_shrink_dense(5, 127, 16);
  test_shrink_dense(2, 4097, 3);
  test_backward_dense(1, 1, 1, 1);
  test_backward_dense(3, 17, 5, 3);
  test_backward_dense(300, 33, 20, 17);
  test_merge(13, 37, 5, 0);
  test_merge(13, 37, 5, 1);
  test_merge(70, 300, 17, 0);
  test_merge(3, 1, 0, 1);
  test_errors();
  test_philox_kat();
  test_dropout(0.0, 0);
  test_dropout(0.3, 0);
  test_dropout(0.3, 1);
  test_dropout(0.9, 1);
  test_dropout(1.0, 0);
  test_half_converters();
  test_gemm_family();
  test_attention_family();
  test_norm_family();
  test_embedding_family();
  test_rope_family();
  test_elementwise_family();
  test_loss_family();
  test_optim_family();
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
