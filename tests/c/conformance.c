/*
 * C-ABI conformance: a plain C99 program that includes lora_kernels.h, links liblora_kernels_emu.a
 * and runs kernels on host buffers, checking them against plain C loops. It grows with each kernel
 * family. Build and run: bash scripts/c-conformance.sh
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
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
