//! RMSNorm forward/backward. (issue #7; being written)
