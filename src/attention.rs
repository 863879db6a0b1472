//! Causal attention with grouped KV heads (fwd/bwd) and decode over a KV cache. (issue #7; being written)
