//! GPU trials: norm.

use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[];
