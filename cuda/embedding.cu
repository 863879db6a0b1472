/* embedding.cu — token embedding (being written: launchers report "not implemented" for now). */
#include "portable.cuh"

extern "C" int LK_SYMBOL(embedding_forward)(const LkEmbeddingForwardParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "embedding_forward: not implemented yet");
}
extern "C" int LK_SYMBOL(embedding_backward)(const LkEmbeddingBackwardParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "embedding_backward: not implemented yet");
}
extern "C" size_t LK_SYMBOL(embedding_backward_workspace_size)(const LkEmbeddingBackwardParams*) { return 0; }
