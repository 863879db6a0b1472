//! GPU trials: loss.

use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[];
