/* norm.cu — RMSNorm (being written: launchers report "not implemented" for now). */
#include "portable.cuh"

extern "C" int LK_SYMBOL(norm_rmsnorm_forward)(const LkRmsNormForwardParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "norm_rmsnorm_forward: not implemented yet");
}
extern "C" int LK_SYMBOL(norm_rmsnorm_backward)(const LkRmsNormBackwardParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "norm_rmsnorm_backward: not implemented yet");
}
extern "C" size_t LK_SYMBOL(norm_rmsnorm_backward_workspace_size)(const LkRmsNormBackwardParams*) { return 0; }
