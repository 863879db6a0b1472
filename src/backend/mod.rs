//! One API, three executions (DESIGN.md §1):
//! - [`Cpu`]: plain Rust with f64 accumulation — the oracle every other backend is compared with;
//! - [`Emu`]: the CUDA kernel source compiled by the host compiler and run by the SIMT emulator;
//! - `Cuda` (feature `cuda`): the same source compiled by nvcc, on the GPU through cudarc.
//!
//! Backends own buffers, streams and the launch entry points. The safe, validating operations
//! (e.g. [`crate::shrink::shrink_dense`]) are generic over [`Backend`], so one test or training loop
//! runs on all three.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod emu;

pub use cpu::Cpu;
#[cfg(feature = "cuda")]
pub use cuda::Cuda;
pub use emu::{Emu, Schedule};

use std::ffi::c_void;

use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::ffi::Launchers;

/// A place kernels run. Buffers are typed; their length is in elements.
pub trait Backend: Send + Sync {
    type Buffer<T: Element>: Send + Sync;

    /// `"cpu"`, `"emu"` or `"cuda"`.
    fn name(&self) -> &'static str;
    /// Whether this backend's kernels accept `dtype` (only the cpu backend takes f64).
    fn supports(&self, dtype: DType) -> bool;

    /// A zero-filled buffer of `len` elements.
    fn alloc<T: Element>(&self, len: usize) -> Result<Self::Buffer<T>>;
    fn upload<T: Element>(&self, data: &[T]) -> Result<Self::Buffer<T>>;
    /// Copies the buffer to the host (waits for the work queued before it).
    fn download<T: Element>(&self, buf: &Self::Buffer<T>) -> Result<Vec<T>>;
    /// Overwrites the buffer with host data of the same length.
    fn write<T: Element>(&self, buf: &mut Self::Buffer<T>, data: &[T]) -> Result<()>;
    fn len<T: Element>(&self, buf: &Self::Buffer<T>) -> usize;
    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;

    /// The buffer's address as the C launchers take it: host memory for cpu and emu, device
    /// memory for cuda.
    fn raw_ptr<T: Element>(&self, buf: &Self::Buffer<T>) -> *const c_void;
    fn raw_ptr_mut<T: Element>(&self, buf: &mut Self::Buffer<T>) -> *mut c_void;
    /// A host view of the buffer (cpu and emu), for the reference implementations and tests;
    /// `None` for device memory.
    fn host_slice<'b, T: Element>(&self, buf: &'b Self::Buffer<T>) -> Option<&'b [T]>;
    fn host_slice_mut<'b, T: Element>(&self, buf: &'b mut Self::Buffer<T>) -> Option<&'b mut [T]>;

    /// The C launchers that run this backend's kernels; `None` for cpu, whose kernels are the
    /// Rust reference implementations.
    fn launchers(&self) -> Option<&'static Launchers>;
    /// The stream handle launchers take (`cudaStream_t` as `void*`; null for host backends).
    fn raw_stream(&self) -> *mut c_void;
    /// Makes the calling thread ready to launch (cuda: binds the context).
    fn prepare_launch(&self) -> Result<()> {
        Ok(())
    }
}

/// Which backend a program should use by default: cuda when built with it and a GPU is present,
/// else cpu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Emu,
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "emu" => Ok(BackendKind::Emu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(crate::Error::invalid(
                "backend",
                "one of cpu, emu, cuda",
                other,
            )),
        }
    }
}

/// Host-memory buffer plumbing shared by the cpu and emu backends.
pub(crate) mod host {
    use super::*;

    /// The buffer methods of a host-memory backend (`Buffer<T> = Vec<T>`), shared by cpu and emu.
    macro_rules! memory_methods {
        () => {
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
        };
    }
    pub(crate) use memory_methods;

    pub fn alloc<T: Element>(len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }

    pub fn write<T: Element>(buf: &mut [T], data: &[T]) -> Result<()> {
        if buf.len() != data.len() {
            return Err(crate::Error::invalid(
                "data",
                format!("{} elements (the buffer's length)", buf.len()),
                data.len(),
            ));
        }
        buf.copy_from_slice(data);
        Ok(())
    }
}
