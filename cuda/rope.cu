/* rope.cu — rotary position embedding (being written: launchers report "not implemented" for now). */
#include "portable.cuh"

extern "C" int LK_SYMBOL(rope_forward)(const LkRopeParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "rope_forward: not implemented yet");
}
extern "C" int LK_SYMBOL(rope_backward)(const LkRopeParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "rope_backward: not implemented yet");
}
