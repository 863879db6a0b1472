/*
 * errors.cu — lk_cuda_last_error_message() and the thread-local message behind it.
 * The emulator build gets the same functions for lk::emu from its runtime (cuda/emu/runtime.cpp),
 * so this file is empty there.
 */
#include <stdarg.h>
#include <stdio.h>

#include "portable.cuh"

#if defined(LK_BACKEND_CUDA)
namespace lk {
namespace cuda {
namespace {
thread_local char g_message[1024] = "";
}

int set_error(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_message, sizeof g_message, fmt, args);
  va_end(args);
  return code;
}

const char* error_message() { return g_message; }

}  // namespace cuda
}  // namespace lk

extern "C" const char* lk_cuda_last_error_message(void) { return lk::cuda::error_message(); }
#endif
