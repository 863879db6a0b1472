/*
 * portable.cuh — the one header kernel code includes; the only place that knows which compiler runs.
 *
 * The same .cu file (kernels + their C launchers) is compiled twice:
 *   nvcc -DLK_BACKEND_CUDA  → namespace lk::cuda, C symbols lk_cuda_*   (the GPU)
 *   g++  -DLK_BACKEND_EMU   → namespace lk::emu,  C symbols lk_emu_*    (the SIMT emulator, cuda/emu/)
 * The backend is always chosen explicitly, never inferred from __CUDACC__. nvcc compiles each file
 * twice (host pass, device pass: __CUDA_ARCH__ defined); the emulator build includes no CUDA header.
 *
 * What kernel code may use, identically on both backends (inside LK_NAMESPACE_BEGIN/END):
 *   CUDA's own names: __global__ __device__ __host__ __forceinline__ __shared__ __restrict__,
 *     threadIdx blockIdx blockDim gridDim warpSize dim3, __syncthreads __syncwarp,
 *     __shfl_sync __shfl_up_sync __shfl_down_sync __shfl_xor_sync, __ballot_sync __any_sync
 *     __all_sync __activemask, atomicAdd (f32/i32/u32) atomicCAS atomicMax atomicOr, __threadfence,
 *     __half / __nv_bfloat16 with __float2half __half2float __float2bfloat16 __bfloat162float.
 *   Ours (this header): to_f32(x) / from_f32<T>(f) for f32/f16/bf16; LK_DYNAMIC_SMEM(T, name);
 *     mma_m16n8k16_f16 / mma_m16n8k16_bf16; ldmatrix_x1/x2/x4 (and _trans); cp_async_16 / 8 / 4,
 *     cp_async_commit, cp_async_wait<N>, cp_async_wait_all;
 *     launch(kernel, grid, block, smem_bytes, stream, args...) → int (0 or an error code);
 *     set_max_dynamic_smem(kernel, bytes) → int; set_error(code, fmt, ...) → code;
 *     error_message().
 *   Symbols: LK_SYMBOL(name) → lk_cuda_name / lk_emu_name.
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "lora_kernels.h"

#if defined(LK_BACKEND_CUDA) && defined(LK_BACKEND_EMU)
#error "define exactly one of LK_BACKEND_CUDA and LK_BACKEND_EMU"
#elif defined(LK_BACKEND_CUDA)
#define LK_NS cuda
#define LK_SYMBOL(name) lk_cuda_##name
#elif defined(LK_BACKEND_EMU)
#define LK_NS emu
#define LK_SYMBOL(name) lk_emu_##name
#else
#error "define LK_BACKEND_CUDA (nvcc) or LK_BACKEND_EMU (g++): the backend is never inferred"
#endif

#define LK_NAMESPACE_BEGIN \
  namespace lk {           \
  namespace LK_NS {
#define LK_NAMESPACE_END \
  }                      \
  }

#if defined(LK_BACKEND_CUDA)
/* ------------------------------------------------------------------------------------------------
 * GPU: CUDA runtime + inline PTX. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define LK_DYNAMIC_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char lk_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(lk_dynamic_smem)

namespace lk {
namespace cuda {

/* Records a thread-local message for lk_cuda_last_error_message(); returns code. */
int set_error(int code, const char* fmt, ...);
const char* error_message();

template <typename... KernelArgs, typename... Args>
inline int launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, void* stream,
                  Args... args) {
  kernel<<<grid, block, smem_bytes, static_cast<cudaStream_t>(stream)>>>(static_cast<KernelArgs>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return set_error(static_cast<int>(err), "kernel launch failed (grid %u,%u,%u block %u,%u,%u smem %zu): %s",
                     grid.x, grid.y, grid.z, block.x, block.y, block.z, smem_bytes, cudaGetErrorString(err));
  }
  return 0;
}

template <typename... KernelArgs>
inline int set_max_dynamic_smem(void (*kernel)(KernelArgs...), size_t bytes) {
  const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) {
    return set_error(static_cast<int>(err), "cudaFuncSetAttribute(MaxDynamicSharedMemorySize=%zu): %s", bytes,
                     cudaGetErrorString(err));
  }
  return 0;
}

/* D = A·B + C, m16n8k16, row.col, f32 accumulate. Fragments as in the PTX ISA (DESIGN.md §3). */
__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
/* ldmatrix: lane l supplies the address of row (l % 8) of matrix (l / 8); see the PTX ISA. */
__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

/* cp.async (sm_80+): global → shared copies that complete at the matching wait. */
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_address(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_address(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

}  // namespace cuda
}  // namespace lk

#elif defined(LK_BACKEND_EMU) && !defined(__CUDACC__)
/* ------------------------------------------------------------------------------------------------
 * CPU: the SIMT emulator provides every name listed at the top, in namespace lk::emu. */
#include "emu/emu.cuh"
#else
#error "LK_BACKEND_EMU is compiled by a host C++ compiler, not nvcc"
#endif

/* ------------------------------------------------------------------------------------------------
 * Shared by both backends. */
LK_NAMESPACE_BEGIN

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

LK_NAMESPACE_END
