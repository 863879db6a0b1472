//! Residual add, accumulate and SwiGLU forward/backward. (issue #7; being written)
