//! Rotary position embedding forward/backward. (issue #7; being written)
