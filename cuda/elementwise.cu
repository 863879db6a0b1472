/*
 * elementwise.cu — the transformer block's pointwise ops (contract: lora_kernels.h, "elementwise").
 *
 *   add            out = a + b                 add_assign  out += a          scale  out *= alpha
 *   swiglu_forward out = silu(g) · u           (a = gate g, b = up u; silu(g) = g · σ(g))
 *   swiglu_backward d_gate = d · u · σ(g) · (1 + g · (1 − σ(g))),  d_up = d · silu(g)   (c = d_out d)
 *
 * Layout: flat arrays of n elements of one dtype T (f32, f16, bf16); f32 arithmetic, one rounding to T
 * per output. σ without overflow: e = expf(−|g|) ∈ [0, 1], σ = 1/(1+e) for g ≥ 0, e/(1+e) for g < 0, and
 * 1 − σ the other of the two (no cancellation for large |g|); 1/(1+e) by Newton steps (recip_1_2, no
 * division). expf is the accurate libm/CUDA function (no fast-math intrinsics), so kernels match the f64
 * reference to a few f32 ulps of the terms.
 * add/add_assign/scale are exactly rounded: bit-identical to the cpu reference.
 *
 * Work split: one thread per 16-byte group of VEC = 16 / sizeof(T) consecutive elements (4 f32, 8 f16 /
 * bf16), loaded and stored as one 128-bit access when every pointer the op touches is 16-byte aligned
 * (checked on the host; otherwise VEC = 1: one element per thread, still coalesced). The last, partial
 * group is done element by element. Grid-stride loop, 256-thread blocks, grid = min(⌈groups/256⌉, 2^16)
 * from n only.
 *
 * Napkin (H200, ~4.8 TB/s HBM3e): every op is memory-bound. Bytes per element: add 3·sizeof(T),
 * add_assign 3·, scale 2·, swiglu_forward 3·, swiglu_backward 5·; swiglu does one expf and ~10 FMAs
 * per element (~40 FP32 ops), far under the ~14 flop/byte balance point. E.g. swiglu_forward on Llama-3-8B
 * MLP activations (8192 tokens × 14336, bf16): 704 MiB → ~150 µs at 4.8 TB/s.
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN

enum EwOp { kEwAdd = 0, kEwAddAssign = 1, kEwSwigluFwd = 2, kEwSwigluBwd = 3, kEwScale = 4 };

constexpr int kEwThreads = 256;
constexpr int64_t kEwMaxBlocks = 1 << 16;

template <class T, int VEC>
struct __align__(16) EwPack {
  T v[VEC];
};
template <class T>
struct EwPack<T, 1> {
  T v[1];
};

/* 1/x for x in [1, 2] without a division (the IEEE f32 division's slow-path call costs a stack frame in
 * unrolled code, which the zero-stack gate forbids): linear start 24/17 − 8x/17 (relative error ≤ 1/17),
 * then 4 Newton steps r += r·(1 − x·r) with explicit fmaf (error squares each step: < 2^-32 after 3;
 * the 4th lands within ~½ ulp). Same fmaf sequence on both backends: the same bits. */
__device__ __forceinline__ float recip_1_2(float x) {
  float r = fmaf(-0.470588237f, x, 1.41176474f);
#pragma unroll
  for (int i = 0; i < 4; ++i) r = fmaf(r, fmaf(-x, r, 1.0f), r);
  return r;
}

/* (σ(g), 1 − σ(g)) without overflow or cancellation: e = exp(−|g|) ∈ [0, 1], 1/(1+e) and e/(1+e). */
__device__ __forceinline__ void sigmoid_pair(float g, float& s, float& sc) {
  const float e = expf(-fabsf(g));
  const float big = recip_1_2(1.0f + e);
  const float small = e * big;
  s = g >= 0.0f ? big : small;
  sc = g >= 0.0f ? small : big;
}

/* One element: inputs a, b, c (those the op reads), the current out value o (add_assign, scale). */
template <int OP>
__device__ __forceinline__ void ew_apply(float a, float b, float c, float o, float alpha, float& r1, float& r2) {
  if (OP == kEwAdd) {
    r1 = a + b;
  } else if (OP == kEwAddAssign) {
    r1 = o + a;
  } else if (OP == kEwScale) {
    r1 = o * alpha;
  } else {
    float s, sc;
    sigmoid_pair(a, s, sc);
    if (OP == kEwSwigluFwd) {
      r1 = a * s * b;
    } else {
      r1 = c * b * (s * (1.0f + a * sc));  // d_gate
      r2 = c * (a * s);                     // d_up
    }
  }
}

template <int OP>
struct EwUses {
  static constexpr bool a = OP != kEwScale;
  static constexpr bool b = OP == kEwAdd || OP == kEwSwigluFwd || OP == kEwSwigluBwd;
  static constexpr bool c = OP == kEwSwigluBwd;
  static constexpr bool out_read = OP == kEwAddAssign || OP == kEwScale;
  static constexpr bool out2 = OP == kEwSwigluBwd;
};

/* Elements [e0, e0 + cnt) of the group, cnt ≤ VEC; full aligned groups use one 16-byte access per array. */
template <class T, int OP, int VEC>
__device__ __forceinline__ void ew_group(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ c,
                                         T* __restrict__ out, T* __restrict__ out2, int64_t e0, int cnt,
                                         float alpha) {
  using U = EwUses<OP>;
  using P = EwPack<T, VEC>;
  if (cnt == VEC) {
    P pa, pb, pc, po, p1, p2;
    if (U::a) pa = *reinterpret_cast<const P*>(a + e0);
    if (U::b) pb = *reinterpret_cast<const P*>(b + e0);
    if (U::c) pc = *reinterpret_cast<const P*>(c + e0);
    if (U::out_read) po = *reinterpret_cast<const P*>(out + e0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float r1 = 0.0f, r2 = 0.0f;
      ew_apply<OP>(U::a ? to_f32(pa.v[i]) : 0.0f, U::b ? to_f32(pb.v[i]) : 0.0f, U::c ? to_f32(pc.v[i]) : 0.0f,
                   U::out_read ? to_f32(po.v[i]) : 0.0f, alpha, r1, r2);
      p1.v[i] = from_f32<T>(r1);
      if (U::out2) p2.v[i] = from_f32<T>(r2);
    }
    *reinterpret_cast<P*>(out + e0) = p1;
    if (U::out2) *reinterpret_cast<P*>(out2 + e0) = p2;
  } else {
    for (int i = 0; i < cnt; ++i) {
      const int64_t e = e0 + i;
      float r1 = 0.0f, r2 = 0.0f;
      ew_apply<OP>(U::a ? to_f32(a[e]) : 0.0f, U::b ? to_f32(b[e]) : 0.0f, U::c ? to_f32(c[e]) : 0.0f,
                   U::out_read ? to_f32(out[e]) : 0.0f, alpha, r1, r2);
      out[e] = from_f32<T>(r1);
      if (U::out2) out2[e] = from_f32<T>(r2);
    }
  }
}

template <class T, int OP, int VEC>
__global__ void __launch_bounds__(kEwThreads)
    elementwise_kernel(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ c, T* __restrict__ out,
                       T* __restrict__ out2, int64_t n, float alpha) {
  const int64_t groups = (n + VEC - 1) / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kEwThreads;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kEwThreads + threadIdx.x; g < groups; g += stride) {
    const int64_t e0 = g * VEC;
    const int cnt = n - e0 < VEC ? static_cast<int>(n - e0) : VEC;
    ew_group<T, OP, VEC>(a, b, c, out, out2, e0, cnt, alpha);
  }
}

template <class T, int OP, int VEC>
int launch_ew(const LkElementwiseParams& p, void* stream) {
  const int64_t groups = (p.n + VEC - 1) / VEC;
  int64_t blocks = (groups + kEwThreads - 1) / kEwThreads;
  if (blocks > kEwMaxBlocks) blocks = kEwMaxBlocks;
  return launch(elementwise_kernel<T, OP, VEC>, dim3(static_cast<unsigned>(blocks)), dim3(kEwThreads), 0, stream,
                static_cast<const T*>(p.a), static_cast<const T*>(p.b), static_cast<const T*>(p.c),
                static_cast<T*>(p.out), static_cast<T*>(p.out2), p.n, p.alpha);
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <class T, int OP>
int dispatch_vec(const LkElementwiseParams& p, void* stream) {
  using U = EwUses<OP>;
  const bool vec = (!U::a || aligned16(p.a)) && (!U::b || aligned16(p.b)) && (!U::c || aligned16(p.c)) &&
                   aligned16(p.out) && (!U::out2 || aligned16(p.out2));
  if (vec) return launch_ew<T, OP, 16 / sizeof(T)>(p, stream);
  return launch_ew<T, OP, 1>(p, stream);
}

template <int OP>
int elementwise(const char* op, const LkElementwiseParams* p, void* stream) {
  using U = EwUses<OP>;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (p->n < 0) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: negative n %lld", op, static_cast<long long>(p->n));
  if (OP == kEwScale && !(p->alpha >= -3.40282346638528859811704183484516925e38f &&
                          p->alpha <= 3.40282346638528859811704183484516925e38f)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: alpha %g must be finite", op, static_cast<double>(p->alpha));
  }
  if (p->n == 0) return 0;
  if ((U::a && p->a == nullptr) || (U::b && p->b == nullptr) || (U::c && p->c == nullptr) || p->out == nullptr ||
      (U::out2 && p->out2 == nullptr)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer (a %p, b %p, c %p, out %p, out2 %p)", op, p->a, p->b,
                     p->c, p->out, p->out2);
  }
  switch (p->dtype) {
    case LK_F32:
      return dispatch_vec<float, OP>(*p, stream);
    case LK_F16:
      return dispatch_vec<__half, OP>(*p, stream);
    case LK_BF16:
      return dispatch_vec<__nv_bfloat16, OP>(*p, stream);
    default:
      return set_error(LK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d (0 = f32, 1 = f16, 2 = bf16)", op, p->dtype);
  }
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(elementwise_add)(const LkElementwiseParams* p, void* stream) {
  return lk::LK_NS::elementwise<lk::LK_NS::kEwAdd>("elementwise_add", p, stream);
}
extern "C" int LK_SYMBOL(elementwise_add_assign)(const LkElementwiseParams* p, void* stream) {
  return lk::LK_NS::elementwise<lk::LK_NS::kEwAddAssign>("elementwise_add_assign", p, stream);
}
extern "C" int LK_SYMBOL(elementwise_swiglu_forward)(const LkElementwiseParams* p, void* stream) {
  return lk::LK_NS::elementwise<lk::LK_NS::kEwSwigluFwd>("elementwise_swiglu_forward", p, stream);
}
extern "C" int LK_SYMBOL(elementwise_swiglu_backward)(const LkElementwiseParams* p, void* stream) {
  return lk::LK_NS::elementwise<lk::LK_NS::kEwSwigluBwd>("elementwise_swiglu_backward", p, stream);
}
extern "C" int LK_SYMBOL(elementwise_scale)(const LkElementwiseParams* p, void* stream) {
  return lk::LK_NS::elementwise<lk::LK_NS::kEwScale>("elementwise_scale", p, stream);
}
