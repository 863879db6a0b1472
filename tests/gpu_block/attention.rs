//! GPU trials: attention.

use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[];
