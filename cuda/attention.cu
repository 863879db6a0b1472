/*
 * attention.cu — causal varlen attention with grouped KV heads (being written: launchers only).
 */
#include "portable.cuh"

LK_NAMESPACE_BEGIN
constexpr int kDecodeChunk = 256;
LK_NAMESPACE_END

extern "C" size_t LK_SYMBOL(attention_backward_workspace_size)(const LkAttentionBackwardParams* p) {
  if (p == nullptr || p->tokens <= 0 || p->n_heads <= 0) return 0;
  return (static_cast<size_t>(p->tokens) * static_cast<size_t>(p->n_heads) * sizeof(float) + 255) / 256 * 256;
}

extern "C" size_t LK_SYMBOL(attention_decode_workspace_size)(const LkAttentionDecodeParams* p) {
  using namespace lk::LK_NS;
  if (p == nullptr || p->n_seqs <= 0 || p->n_heads <= 0 || p->head_dim <= 0) return 0;
  const int64_t splits = (static_cast<int64_t>(p->max_kv_len) + kDecodeChunk - 1) / kDecodeChunk;
  if (splits <= 1) return 0;
  return static_cast<size_t>(p->n_seqs) * static_cast<size_t>(p->n_heads) * static_cast<size_t>(splits) *
         static_cast<size_t>(p->head_dim + 2) * sizeof(float);
}

extern "C" int LK_SYMBOL(attention_forward)(const LkAttentionForwardParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "attention_forward: not implemented yet");
}
extern "C" int LK_SYMBOL(attention_backward)(const LkAttentionBackwardParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "attention_backward: not implemented yet");
}
extern "C" int LK_SYMBOL(attention_kv_cache_write)(const LkKvCacheWriteParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "attention_kv_cache_write: not implemented yet");
}
extern "C" int LK_SYMBOL(attention_decode)(const LkAttentionDecodeParams*, void*) {
  return lk::LK_NS::set_error(LK_ERR_INVALID_ARGUMENT, "attention_decode: not implemented yet");
}
