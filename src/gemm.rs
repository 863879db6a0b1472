//! Tiled GEMM for the base projections (forward and the transposed backward forms). (issue #7; being written)
