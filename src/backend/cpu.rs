//! The cpu backend: host memory; its kernels are the plain-Rust reference implementations (f64
//! accumulation, in each family's `reference` module). It is the oracle the emu and cuda backends
//! are tested against, so it favours obviousness over speed.

use std::ffi::c_void;

use super::{host, Backend};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::ffi::Launchers;

/// The reference backend (host memory, f64 accumulation, f64 dtype supported).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buffer<T: Element> = Vec<T>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn supports(&self, _dtype: DType) -> bool {
        true
    }
    host::memory_methods!();
    fn launchers(&self) -> Option<&'static Launchers> {
        None
    }
    fn raw_stream(&self) -> *mut c_void {
        std::ptr::null_mut()
    }
}
