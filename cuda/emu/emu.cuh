/*
 * emu.cuh — the SIMT emulator's side of portable.cuh (included by it when LK_BACKEND_EMU is defined).
 *
 * CUDA C++ kernels are compiled by a host C++17 compiler (g++) and run on the CPU by cuda/emu/runtime.cpp:
 * one fiber per CUDA thread, all fibers of a block on one OS thread, blocks spread over worker threads.
 * Everything lives in namespace lk::emu; no CUDA header is included. See DESIGN.md §3 and the runtime's
 * top comment for the semantics (barriers, warp collectives, cp.async, schedules, environment variables).
 *
 * Names provided (mirroring the CUDA branch of portable.cuh):
 *   macros  __global__ __device__ __host__ __constant__ __forceinline__ __noinline__ __shared__
 *           __align__(n) __launch_bounds__(...) LK_DYNAMIC_SMEM(T, name)   (__restrict__ is g++'s own)
 *   types   uint3 dim3 __half __nv_bfloat16
 *   vars    threadIdx blockIdx blockDim gridDim (per OS thread, switched with the fibers) warpSize
 *   sync    __syncthreads __syncwarp __threadfence
 *   warp    __shfl_sync __shfl_up_sync __shfl_down_sync __shfl_xor_sync (4-/8-byte arithmetic types,
 *           __half, __nv_bfloat16) __ballot_sync __any_sync __all_sync __activemask
 *   atomics atomicAdd (float, int, unsigned, unsigned long long) atomicSub atomicExch atomicCAS
 *           (int, unsigned, unsigned long long) atomicMax atomicMin (int, unsigned) atomicOr atomicAnd
 *           atomicXor (unsigned)
 *   halves  __float2half(_rn) __half2float __float2bfloat16(_rn) __bfloat162float __half_as_ushort
 *           __ushort_as_half __bfloat16_as_ushort __ushort_as_bfloat16
 *   ours    mma_m16n8k16_f16/bf16, ldmatrix_x1/x2/x4(_trans), cp_async_16/8/4, cp_async_commit,
 *           cp_async_wait<N>, cp_async_wait_all, launch, set_max_dynamic_smem, set_error, error_message,
 *           dynamic_smem
 *
 * Collectives, barriers and cp.async take trailing defaulted (file, line) parameters filled by
 * __builtin_FILE()/__builtin_LINE() at the call site: the emulator's error messages and strict-mode
 * checks name the kernel source line. Kernel code never passes them.
 */
#pragma once
#if !defined(LK_BACKEND_EMU) || defined(__CUDACC__)
#error "emu.cuh is the LK_BACKEND_EMU branch of portable.cuh, compiled by a host C++ compiler"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
/* Correct because fibers never migrate between OS threads and a worker runs one block at a time.
 * Static shared memory is not poisoned between blocks (a known blind spot; random schedules help). */
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

#define LK_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::lk::emu::dynamic_smem())

namespace lk {
namespace emu {

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

/* Updated by the scheduler on every switch into a fiber (threadIdx) and at block start (the rest). */
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread dim3 blockDim;
extern __thread dim3 gridDim;
constexpr int warpSize = 32;

/* ------------------------------------------------------------------------------------------------
 * Host half types: bit containers with bit-exact round-to-nearest-even conversions. */
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};

namespace detail {
inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu; /* NaN → canonical NaN (as cvt.rn.f16.f32 and CUDA's host code) */
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u); /* ≥ 65520 rounds to inf */
  if (a >= 0x38800000u) {                                                /* normal half */
    const uint32_t r = a - (112u << 23);
    uint32_t h = r >> 13;
    const uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign); /* ≤ 2^-25 rounds (ties to even) to zero */
  const uint32_t e = a >> 23;                                 /* 102..112 */
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e; /* 14..24 */
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}
inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 0) {
    if (m == 0) return bits_f32(sign);
    int ex = 113; /* value = m · 2^-24; normalise */
    while (!(m & 0x400u)) {
      m <<= 1;
      --ex;
    }
    return bits_f32(sign | (static_cast<uint32_t>(ex) << 23) | ((m & 0x3ffu) << 13));
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu; /* NaN → canonical NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
}  // namespace detail

inline __half __float2half(float f) { return __half{detail::f32_to_f16_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return detail::f16_bits_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{detail::f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return detail::bf16_bits_to_f32(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

/* ------------------------------------------------------------------------------------------------
 * Runtime entry points (runtime.cpp). */
namespace detail {
enum CollKind {
  K_SHFL_IDX = 0,
  K_SHFL_UP,
  K_SHFL_DOWN,
  K_SHFL_XOR,
  K_BALLOT,
  K_ANY,
  K_ALL,
  K_SYNCWARP,
  K_MMA_F16,
  K_MMA_BF16,
  K_LDMATRIX,
  K_ACTIVEMASK,
  K_COUNT
};
uint64_t shfl(int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
unsigned vote(int kind, unsigned mask, int pred, const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
unsigned activemask(const char* file, int line);
void syncthreads(const char* file, int line);
void mma(int kind, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], const char* file,
         int line);
void ldmatrix(int num, bool trans, uint32_t* r, const void* row, const char* file, int line);
void cp_async(int size, void* dst, const void* src, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int n);

struct LaunchDesc {
  const void* kernel_id;
  void (*thunk)(void*);
  void* args;
  dim3 grid, block;
  size_t smem;
};
int launch_impl(const LaunchDesc& d);
int set_max_dynamic_smem_impl(const void* kernel_id, size_t bytes);

template <class T>
struct shfl_type
    : std::integral_constant<bool, (std::is_arithmetic<T>::value && (sizeof(T) == 4 || sizeof(T) == 8)) ||
                                       std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value> {};
template <class T>
inline T shfl_t(int kind, unsigned mask, T var, int arg, int width, const char* file, int line) {
  static_assert(shfl_type<T>::value, "emu shuffles take 4- or 8-byte arithmetic types, __half or __nv_bfloat16");
  uint64_t b = 0;
  memcpy(&b, &var, sizeof(T));
  b = shfl(kind, mask, b, arg, width, file, line);
  T r;
  memcpy(&r, &b, sizeof(T));
  return r;
}
}  // namespace detail

extern __thread unsigned char* tl_dynamic_smem;
/* Dynamic shared memory of the running block: 16-byte (in fact 128-byte) aligned, 0xFF at block start. */
inline void* dynamic_smem() { return tl_dynamic_smem; }

/* ------------------------------------------------------------------------------------------------
 * Barriers and warp collectives. */
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  detail::syncwarp(mask, file, line);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return detail::shfl_t(detail::K_SHFL_IDX, mask, var, srcLane, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return detail::shfl_t(detail::K_SHFL_UP, mask, var, static_cast<int>(delta), width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return detail::shfl_t(detail::K_SHFL_DOWN, mask, var, static_cast<int>(delta), width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return detail::shfl_t(detail::K_SHFL_XOR, mask, var, laneMask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return detail::vote(detail::K_BALLOT, mask, predicate, file, line);
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(detail::vote(detail::K_ANY, mask, predicate, file, line));
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(detail::vote(detail::K_ALL, mask, predicate, file, line));
}
/* A convergence point: the caller waits until no lane of its warp can run, then gets the lanes that wait
 * at this same __activemask call (so a converged warp gets all its live lanes, whatever the schedule). */
inline unsigned __activemask(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return detail::activemask(file, line);
}

/* ------------------------------------------------------------------------------------------------
 * Atomics (GCC __atomic builtins: correct across worker threads). */
inline float atomicAdd(float* addr, float val) {
  /* atom.add.f32 on the GPU: round to nearest even, subnormal inputs and results flushed to ±0. */
  uint32_t* p = reinterpret_cast<uint32_t*>(addr);
  uint32_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
  auto ftz = [](float f) { return (detail::f32_bits(f) & 0x7f800000u) == 0 ? f * 0.0f : f; };
  for (;;) {
    const float sum = ftz(ftz(detail::bits_f32(old)) + ftz(val));
    const uint32_t nb = detail::f32_bits(sum);
    if (__atomic_compare_exchange_n(p, &old, nb, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
      return detail::bits_f32(old);
  }
}
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
inline float atomicExch(float* a, float v) {
  return detail::bits_f32(
      __atomic_exchange_n(reinterpret_cast<uint32_t*>(a), detail::f32_bits(v), __ATOMIC_SEQ_CST));
}
template <class T>
inline T atomic_cas_impl(T* a, T compare, T val) {
  __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare; /* the old value either way */
}
inline int atomicCAS(int* a, int c, int v) { return atomic_cas_impl(a, c, v); }
inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return atomic_cas_impl(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) {
  return atomic_cas_impl(a, c, v);
}
template <class T, bool kMax>
inline T atomic_minmax_impl(T* a, T v) {
  T old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (kMax ? (v > old) : (v < old)) {
    if (__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) break;
  }
  return old;
}
inline int atomicMax(int* a, int v) { return atomic_minmax_impl<int, true>(a, v); }
inline unsigned atomicMax(unsigned* a, unsigned v) { return atomic_minmax_impl<unsigned, true>(a, v); }
inline int atomicMin(int* a, int v) { return atomic_minmax_impl<int, false>(a, v); }
inline unsigned atomicMin(unsigned* a, unsigned v) { return atomic_minmax_impl<unsigned, false>(a, v); }
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAnd(unsigned* a, unsigned v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicXor(unsigned* a, unsigned v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }

/* ------------------------------------------------------------------------------------------------
 * Tensor-core and async-copy wrappers (warp collectives; fragment layouts as in DESIGN.md §3). */
inline void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::mma(detail::K_MMA_F16, d, a, b, c, file, line);
}
inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::mma(detail::K_MMA_BF16, d, a, b, c, file, line);
}
inline void ldmatrix_x1(uint32_t r[1], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  detail::ldmatrix(1, false, r, row, file, line);
}
inline void ldmatrix_x2(uint32_t r[2], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  detail::ldmatrix(2, false, r, row, file, line);
}
inline void ldmatrix_x4(uint32_t r[4], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  detail::ldmatrix(4, false, r, row, file, line);
}
inline void ldmatrix_x1_trans(uint32_t r[1], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  detail::ldmatrix(1, true, r, row, file, line);
}
inline void ldmatrix_x2_trans(uint32_t r[2], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  detail::ldmatrix(2, true, r, row, file, line);
}
inline void ldmatrix_x4_trans(uint32_t r[4], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  detail::ldmatrix(4, true, r, row, file, line);
}

/* cp.async: queued per thread; the bytes land when the matching wait runs (the destination reads
 * 0xFF poison until then). */
inline void cp_async_16(void* smem_dst, const void* gmem_src, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  detail::cp_async(16, smem_dst, gmem_src, file, line);
}
inline void cp_async_8(void* smem_dst, const void* gmem_src, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  detail::cp_async(8, smem_dst, gmem_src, file, line);
}
inline void cp_async_4(void* smem_dst, const void* gmem_src, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  detail::cp_async(4, smem_dst, gmem_src, file, line);
}
inline void cp_async_commit() { detail::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
  detail::cp_async_wait(N);
}
inline void cp_async_wait_all() {
  detail::cp_async_commit();
  detail::cp_async_wait(0);
}

/* ------------------------------------------------------------------------------------------------
 * Host side. */
/* Records a thread-local message (for lk_emu_last_error_message on the calling thread); returns code. */
int set_error(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
const char* error_message();

/* Runs the grid synchronously (stream ignored); returns 0 or an LK_ERR_EMU_* code. */
template <typename... KernelArgs, typename... Args>
inline int launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, void* stream,
                  Args... args) {
  static_assert(sizeof...(KernelArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  (void)stream;
  using Tuple = std::tuple<typename std::decay<KernelArgs>::type...>;
  struct Pack {
    void (*k)(KernelArgs...);
    Tuple a;
  };
  Pack pack{kernel, Tuple(static_cast<KernelArgs>(args)...)};
  detail::LaunchDesc d;
  d.kernel_id = reinterpret_cast<const void*>(kernel);
  d.thunk = [](void* p) {
    Pack* pk = static_cast<Pack*>(p);
    std::apply(pk->k, pk->a);
  };
  d.args = &pack;
  d.grid = grid;
  d.block = block;
  d.smem = smem_bytes;
  return detail::launch_impl(d);
}

/* Per-kernel dynamic shared memory limit (cudaFuncSetAttribute MaxDynamicSharedMemorySize). */
template <typename... KernelArgs>
inline int set_max_dynamic_smem(void (*kernel)(KernelArgs...), size_t bytes) {
  return detail::set_max_dynamic_smem_impl(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace emu
}  // namespace lk
