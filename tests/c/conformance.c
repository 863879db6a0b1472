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

int main(void) {
  test_shrink_dense(1, 1, 1);
  test_shrink_dense(3, 17, 5);
  test_shrink_dense(5, 127, 16);
  test_shrink_dense(2, 4097, 3);
  test_errors();
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
