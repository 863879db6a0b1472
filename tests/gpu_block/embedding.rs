//! GPU trials: embedding.

use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[];
