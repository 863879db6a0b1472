/*
 * rope.cu — rotary position embedding, HF Llama convention (rotate_half), in place
 * (contract: lora_kernels.h, "rope").
 *
 * For token t (position p = positions[t] ≥ 0), head h and pair index i < half = head_dim / 2:
 *   (a, b) = (x[t, h·hd + i], x[t, h·hd + i + half])
 *   angle  = f32(p) · inv_freq[i]     (an f32 product), inv_freq[i] = f32(exp(−2i · c)) in double with
 *            c = log(theta) / hd computed on the host in double (the kernel has no pow or division: CUDA's
 *            double pow is an out-of-line call with spills on sm_80, which the zero-spill gate forbids)
 *   forward (a, b) → (a·cos − b·sin, b·cos + a·sin); backward: sin → −sin (the transposed rotation).
 * sin/cos come from rope_sincos below (double-precision reduction and polynomials, ~correctly rounded to
 * f32, no local memory): large positions keep their accuracy. A negative
 * position skips the token (row untouched) and ORs LK_FAULT_INDEX into *fault (one atomicOr per token).
 *
 * Layout: x [tokens, n_heads·hd] packed row-major, one dtype (f32, f16, bf16), f32 arithmetic.
 * Work split: one thread per (token, group of VEC consecutive pair indices i); it computes VEC inv_freq
 * (double exp) and sin/cos once and reuses them for every head, loading the VEC a's and VEC b's of each
 * head as one 16-byte access each (VEC = 16 / sizeof(T)) when half % VEC == 0 and x is 16-byte aligned
 * (then every row, head and half offset is a multiple of 16 bytes); otherwise VEC = 1. Consecutive
 * threads take consecutive i-groups of one token: coalesced. Grid-stride, 256-thread blocks, grid from
 * tokens · ⌈half / VEC⌉ only. A token whose half is 0 still gets one item (the fault check).
 *
 * Napkin (H200 ~4.8 TB/s): memory-bound, 2 · tokens · n_heads · hd · sizeof(T) bytes (read + write).
 * Llama-3-8B q at 8192 tokens (32 × 128, bf16): 128 MiB → ~28 µs. Per item VEC double exps + VEC double sin/cos
 * amortised over n_heads heads (e.g. 32): ~10 flops per element, far under the balance point.
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN

constexpr int kRopeThreads = 256;
constexpr int64_t kRopeMaxBlocks = 1 << 16;

template <class T, int VEC>
struct __align__(16) RopePack {
  T v[VEC];
};
template <class T>
struct RopePack<T, 1> {
  T v[1];
};

/* sin and cos of an f32 angle (|angle| < 2^32), accurate to ~1e-16 before the rounding to f32 — i.e.
 * correctly rounded but for ties within 1e-16 — with no local memory (CUDA's sincosf keeps a
 * Payne–Hanek slow path in local memory for |x| > 105615, which the zero-stack gate forbids) and the
 * same operations on both backends as written (nvcc contracts a·b + c into an FMA by default and g++
 * does not, so the GPU may differ from the emulator in the last bit; its trials use tolerances):
 *   k = rint(a·2/π); r = a − k·π/2 with π/2 = P1 + P2 + P3 (30 + 30 + 53 bits) and fma: a − k·P1 is exact
 *   (a multiple of 2^-29 below 4 in magnitude), the other two steps err by ≤ 2^-54; then Taylor
 *   polynomials to r^19 / r^20 on |r| ≤ π/4 + ε (truncation < 1e-17) and the quadrant k mod 4. */
__device__ __forceinline__ void rope_sincos(float angle, float* s_out, float* c_out) {
  const double a = static_cast<double>(angle);
  const double k = rint(a * 0x1.45f306dc9c883p-1);  // 2/π
  double r = fma(-k, 0x1.921fb548p+0, a);
  r = fma(-k, -0x1.de973dc8p-31, r);
  r = fma(-k, -0x1.9d9cceba3f91fp-62, r);
  const double r2 = r * r;
  double sp = -1.0 / 121645100408832000.0;  // −1/19!
  sp = sp * r2 + 1.0 / 355687428096000.0;
  sp = sp * r2 - 1.0 / 1307674368000.0;
  sp = sp * r2 + 1.0 / 6227020800.0;
  sp = sp * r2 - 1.0 / 39916800.0;
  sp = sp * r2 + 1.0 / 362880.0;
  sp = sp * r2 - 1.0 / 5040.0;
  sp = sp * r2 + 1.0 / 120.0;
  sp = sp * r2 - 1.0 / 6.0;
  const double sn = r + r * r2 * sp;
  double cp = 1.0 / 2432902008176640000.0;  // 1/20!
  cp = cp * r2 - 1.0 / 6402373705728000.0;
  cp = cp * r2 + 1.0 / 20922789888000.0;
  cp = cp * r2 - 1.0 / 87178291200.0;
  cp = cp * r2 + 1.0 / 479001600.0;
  cp = cp * r2 - 1.0 / 3628800.0;
  cp = cp * r2 + 1.0 / 40320.0;
  cp = cp * r2 - 1.0 / 720.0;
  cp = cp * r2 + 1.0 / 24.0;
  cp = cp * r2 - 0.5;
  const double cs = 1.0 + r2 * cp;
  const int q = static_cast<int>(static_cast<long long>(k) & 3);
  const double s = q == 0 ? sn : q == 1 ? cs : q == 2 ? -sn : -cs;
  const double c = q == 0 ? cs : q == 1 ? -sn : q == 2 ? -cs : sn;
  *s_out = static_cast<float>(s);
  *c_out = static_cast<float>(c);
}

template <class T, int VEC, bool kBackward>
__global__ void __launch_bounds__(kRopeThreads)
    rope_kernel(const int32_t* __restrict__ positions, T* __restrict__ x, uint32_t* __restrict__ fault,
                int32_t tokens, int32_t n_heads, int32_t head_dim, double log_theta_over_hd) {
  using P = RopePack<T, VEC>;
  const int half = head_dim / 2;
  const int groups = half / VEC > 0 ? half / VEC : 1;  // ≥ 1 item per token: the fault check
  const int64_t width = static_cast<int64_t>(n_heads) * head_dim;
  const int64_t items = static_cast<int64_t>(tokens) * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRopeThreads;
  for (int64_t it = static_cast<int64_t>(blockIdx.x) * kRopeThreads + threadIdx.x; it < items; it += stride) {
    const int64_t t = it / groups;
    const int i0 = static_cast<int>(it - t * groups) * VEC;
    const int32_t pos = positions[t];
    if (pos < 0) {
      if (i0 == 0 && fault != nullptr) atomicOr(fault, static_cast<uint32_t>(LK_FAULT_INDEX));
      continue;
    }
    if (i0 >= half) continue;
    float cs[VEC], sn[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int i = i0 + k;
      const float inv_freq = static_cast<float>(exp(-static_cast<double>(2 * i) * log_theta_over_hd));
      const float angle = static_cast<float>(pos) * inv_freq;
      float s, c;
      rope_sincos(angle, &s, &c);
      cs[k] = c;
      sn[k] = kBackward ? -s : s;
    }
    T* row = x + t * width + i0;
    for (int h = 0; h < n_heads; ++h) {
      T* pa = row + static_cast<int64_t>(h) * head_dim;
      T* pb = pa + half;
      P va = *reinterpret_cast<const P*>(pa);
      P vb = *reinterpret_cast<const P*>(pb);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float a = to_f32(va.v[k]);
        const float b = to_f32(vb.v[k]);
        va.v[k] = from_f32<T>(a * cs[k] - b * sn[k]);
        vb.v[k] = from_f32<T>(b * cs[k] + a * sn[k]);
      }
      *reinterpret_cast<P*>(pa) = va;
      *reinterpret_cast<P*>(pb) = vb;
    }
  }
}

template <class T, int VEC, bool kBackward>
int launch_rope(const LkRopeParams& p, void* stream) {
  const int half = p.head_dim / 2;
  const int groups = half / VEC > 0 ? half / VEC : 1;
  const int64_t items = static_cast<int64_t>(p.tokens) * groups;
  int64_t blocks = (items + kRopeThreads - 1) / kRopeThreads;
  if (blocks > kRopeMaxBlocks) blocks = kRopeMaxBlocks;
  return launch(rope_kernel<T, VEC, kBackward>, dim3(static_cast<unsigned>(blocks)), dim3(kRopeThreads), 0, stream,
                p.positions, static_cast<T*>(p.x), p.fault, p.tokens, p.n_heads, p.head_dim,
                log(static_cast<double>(p.theta)) / static_cast<double>(p.head_dim));
}

template <class T, bool kBackward>
int dispatch_rope(const LkRopeParams& p, void* stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int half = p.head_dim / 2;
  if (half > 0 && half % kVec == 0 && (reinterpret_cast<uintptr_t>(p.x) & 15u) == 0) {
    return launch_rope<T, kVec, kBackward>(p, stream);
  }
  return launch_rope<T, 1, kBackward>(p, stream);
}

template <bool kBackward>
int rope(const char* op, const LkRopeParams* p, void* stream) {
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "%s: params is null", op);
  if (p->tokens < 0 || p->n_heads < 0 || p->head_dim < 0 || p->head_dim % 2 != 0) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: bad size (tokens %d, n_heads %d, head_dim %d: >= 0, head_dim even)",
                     op, p->tokens, p->n_heads, p->head_dim);
  }
  if (static_cast<int64_t>(p->n_heads) * p->head_dim > 2147483647LL) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: n_heads %d · head_dim %d exceeds int32", op, p->n_heads,
                     p->head_dim);
  }
  if (!(p->theta > 0.0f && p->theta <= 3.40282346638528859811704183484516925e38f)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: theta %g must be finite and > 0", op, static_cast<double>(p->theta));
  }
  if (p->tokens == 0) return 0;
  if (p->positions == nullptr || (p->x == nullptr && p->n_heads > 0 && p->head_dim > 0)) {
    return set_error(LK_ERR_INVALID_ARGUMENT, "%s: null pointer (positions %p, x %p)", op,
                     static_cast<const void*>(p->positions), p->x);
  }
  switch (p->dtype) {
    case LK_F32:
      return dispatch_rope<float, kBackward>(*p, stream);
    case LK_F16:
      return dispatch_rope<__half, kBackward>(*p, stream);
    case LK_BF16:
      return dispatch_rope<__nv_bfloat16, kBackward>(*p, stream);
    default:
      return set_error(LK_ERR_UNSUPPORTED_DTYPE, "%s: dtype %d (0 = f32, 1 = f16, 2 = bf16)", op, p->dtype);
  }
}

LK_NAMESPACE_END

extern "C" int LK_SYMBOL(rope_forward)(const LkRopeParams* p, void* stream) {
  return lk::LK_NS::rope<false>("rope_forward", p, stream);
}
extern "C" int LK_SYMBOL(rope_backward)(const LkRopeParams* p, void* stream) {
  return lk::LK_NS::rope<true>("rope_backward", p, stream);
}
