/* elementwise.cu — add / swiglu / scale (being written: launchers report "not implemented" for now). */
#include "portable.cuh"

#define LK_EW_STUB(op)                                                                     \
  extern "C" int LK_SYMBOL(op)(const LkElementwiseParams*, void*) {                        \
    return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, #op ": not implemented yet");     \
  }
LK_EW_STUB(elementwise_add)
LK_EW_STUB(elementwise_add_assign)
LK_EW_STUB(elementwise_swiglu_forward)
LK_EW_STUB(elementwise_swiglu_backward)
LK_EW_STUB(elementwise_scale)
