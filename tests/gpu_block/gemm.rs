//! GPU trials: gemm.

use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[];
