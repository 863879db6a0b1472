//! Token embedding forward and deterministic backward. (issue #7; being written)
