/*
 * philox.cuh — Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11;
 * Random123) and the dropout mask of DESIGN.md §2, shared by every family that regenerates a mask
 * (fused dropout, LoRA backward). Include after portable.cuh; everything lives in lk::<backend>.
 *
 * Philox4x32 round (Random123's philox4x32round): with M0 = 0xD2511F53, M1 = 0xCD9E8D57,
 *   (hi0, lo0) = M0 · c0, (hi1, lo1) = M1 · c2   (32×32 → 64-bit products)
 *   c ← (hi1 ⊕ c1 ⊕ k0, lo1, hi0 ⊕ c3 ⊕ k1, lo0)
 * ten rounds, the key bumped by (0x9E3779B9, 0xBB67AE85) between rounds. Known answers (Random123
 * KAT; DESIGN.md §4) are tested in Rust (`tests/dropout.rs`), in C (`tests/c/conformance.c`) and
 * through the kernels on every backend.
 *
 * Dropout mapping (DESIGN.md §2, the contract): element e (flat index token · d + col of the original
 * token) uses word e % 4 of philox(counter = (lo32(e/4), hi32(e/4), lo32(offset), hi32(offset)),
 * key = (lo32(seed), hi32(seed))) and is dropped iff word < threshold. The host computes threshold =
 * min(floor(p · 2^32), 2^32 − 1) and keep_scale = 1/(1−p) (0 when p = 1); kernels never see p.
 * Two host-derived shortcuts, both exact consequences of the contract:
 *   threshold == 0 (p < 2^-32, e.g. p = 0): nothing is dropped, no RNG work is done;
 *   keep_scale == 0 (exactly p = 1): everything is dropped, no RNG work is done (this also drops the
 *     one word value 0xFFFFFFFF that `word < 2^32 − 1` would keep, so p = 1 really drops all and a
 *     kept ±inf never meets keep_scale 0 to make a NaN).
 * The 64-bit product is written as a plain uint64 multiply: nvcc emits mul.lo/mul.hi (or mul.wide)
 * for it, g++ a single mul; no intrinsic is needed on either backend.
 */
#pragma once
#include "portable.cuh"

LK_NAMESPACE_BEGIN

struct Philox4 {
  uint32_t w[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                 uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Philox4 r;
  r.w[0] = c0;
  r.w[1] = c1;
  r.w[2] = c2;
  r.w[3] = c3;
  return r;
}

/* The host-computed dropout of one launch (a copy of LkDropoutConfig's fields). */
struct DropoutRng {
  uint64_t seed;
  uint64_t offset;
  uint32_t threshold;
  float keep_scale;
};

/* The four words of Philox group g (elements 4g .. 4g+3). */
__device__ __forceinline__ Philox4 dropout_words(const DropoutRng& d, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(d.offset), static_cast<uint32_t>(d.offset >> 32),
                       static_cast<uint32_t>(d.seed), static_cast<uint32_t>(d.seed >> 32));
}

/* Keep bits of the four elements of group g: bit i set ⇔ element 4g + i is kept. */
__device__ __forceinline__ uint32_t dropout_keep_bits(const DropoutRng& d, uint64_t group) {
  if (d.keep_scale == 0.0f) return 0u;
  if (d.threshold == 0u) return 0xFu;
  const Philox4 r = dropout_words(d, group);
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) bits |= (r.w[i] >= d.threshold ? 1u : 0u) << i;
  return bits;
}

/* x̂ of one element from its keep bit: to_f32(x) · keep_scale rounded to f32, or +0 if dropped. */
__device__ __forceinline__ float dropout_apply(float x, bool keep, float keep_scale) {
  return keep ? x * keep_scale : 0.0f;
}

LK_NAMESPACE_END
