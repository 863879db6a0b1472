//! GPU trials: rope.

use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[];
