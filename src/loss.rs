//! Fused softmax cross-entropy forward/backward and row argmax. (issue #7; being written)
