//! GPU trials: elementwise.

use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[];
