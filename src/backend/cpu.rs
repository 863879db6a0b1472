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
    fn alloc<T: Element>(&self, len: usize) -> Result<Vec<T>> {
        host::alloc(len)
    }
    fn upload<T: Element>(&self, data: &[T]) -> Result<Vec<T>> {
        Ok(data.to_vec())
    }
    fn download<T: Element>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }
    fn write<T: Element>(&self, buf: &mut Vec<T>, data: &[T]) -> Result<()> {
        host::write(buf, data)
    }
    fn len<T: Element>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn raw_ptr<T: Element>(&self, buf: &Vec<T>) -> *const c_void {
        buf.as_ptr().cast()
    }
    fn raw_ptr_mut<T: Element>(&self, buf: &mut Vec<T>) -> *mut c_void {
        buf.as_mut_ptr().cast()
    }
    fn host_slice<'b, T: Element>(&self, buf: &'b Vec<T>) -> Option<&'b [T]> {
        Some(buf)
    }
    fn host_slice_mut<'b, T: Element>(&self, buf: &'b mut Vec<T>) -> Option<&'b mut [T]> {
        Some(buf)
    }
    fn launchers(&self) -> Option<&'static Launchers> {
        None
    }
    fn raw_stream(&self) -> *mut c_void {
        std::ptr::null_mut()
    }
}
