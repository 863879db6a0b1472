// Bench-only helper kernels for the "gather + cuBLAS strided-batched GEMM" baseline
// (benches/common/gpu.rs). Not part of the library: they stand in for the row gather / scatter-add
// a PyTorch user gets from `index_select` / `index_add_`. Compiled to PTX by
// `bash scripts/bench-ptx.sh` (the pinned nvcc; the driver JIT-compiles the PTX at run time, so
// the GPU machine needs no NVRTC); CI checks that benches/baseline/kernels.ptx is current.
#include <cuda_fp16.h>

// dst[r, :] = src[idx[r], :] (or zeros when idx[r] < 0), rows of `row_vecs` 16-byte vectors.
// grid = (ceil(row_vecs / blockDim.x), rows).
extern "C" __global__ void lk_bench_gather_rows(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                                const int* __restrict__ idx, long long row_vecs) {
  long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= row_vecs) return;
  long long r = blockIdx.y;
  int s = idx[r];
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (s >= 0) v = src[(long long)s * row_vecs + c];
  dst[r * row_vecs + c] = v;
}

// dst[idx[r], :] += src[r, :] for idx[r] >= 0 (f16, added in f32, one rounding); rows of `row_h2`
// half2 pairs. Targets must be distinct (no atomics). grid = (ceil(row_h2 / blockDim.x), rows).
extern "C" __global__ void lk_bench_scatter_add_rows_f16(const __half2* __restrict__ src, __half2* __restrict__ dst,
                                                         const int* __restrict__ idx, long long row_h2) {
  long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= row_h2) return;
  long long r = blockIdx.y;
  int s = idx[r];
  if (s < 0) return;
  float2 a = __half22float2(dst[(long long)s * row_h2 + c]);
  float2 b = __half22float2(src[r * row_h2 + c]);
  dst[(long long)s * row_h2 + c] = __floats2half2_rn(a.x + b.x, a.y + b.y);
}

// An empty kernel: the per-node floor of a CUDA-graph replay.
extern "C" __global__ void lk_bench_empty() {}
