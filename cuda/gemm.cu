/*
 * gemm.cu — dense GEMM (being written: the launcher validates and reports "not implemented").
 */
#include "portable.cuh"

extern "C" int LK_SYMBOL(gemm)(const LkGemmParams* p, void* stream) {
  using namespace lk::LK_NS;
  (void)stream;
  if (p == nullptr) return set_error(LK_ERR_INVALID_ARGUMENT, "gemm: params is null");
  return set_error(LK_ERR_UNSUPPORTED_DTYPE, "gemm: kernels not implemented yet");
}
