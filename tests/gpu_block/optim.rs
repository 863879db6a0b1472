//! GPU trials: optim.

use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[];
