//! The cuda backend: kernels compiled by nvcc (`liblora_kernels_cuda.a`), device memory and streams
//! from cudarc (primary context; the launchers take cudarc's raw stream as their `cudaStream_t`).
//!
//! No GPU is an error value, never a panic: cudarc panics when libcuda is missing, so
//! [`Cuda::new`] checks for the library first.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::Backend;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ffi::{self, Launchers};

/// A GPU and one stream on it; every launch and copy of this backend is queued on that stream.
/// Use a backend's buffers only with that backend (its stream orders all their uses; cudarc's
/// cross-stream event tracking is switched off so that launches can be captured in CUDA graphs).
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

fn driver(during: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Driver {
        during,
        message: e.to_string(),
    }
}

impl Cuda {
    /// Opens device `ordinal` (primary context) with a new stream. Errors with
    /// [`Error::NoCudaDevice`] when there is no driver library or no such device.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen libcuda; cudarc would panic on first use without it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoCudaDevice(
                "the CUDA driver library (libcuda.so) is not installed".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoCudaDevice(format!("cuInit/cuDeviceGetCount: {e}")))?;
        if count <= 0 {
            return Err(Error::NoCudaDevice(
                "the driver reports no CUDA device".into(),
            ));
        }
        if ordinal >= count as usize {
            return Err(Error::invalid(
                "ordinal",
                format!("< {count} (devices present)"),
                ordinal,
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating the context"))?;
        // Every buffer of this backend is used on its one stream, so cudarc's cross-stream event
        // tracking is not needed — and its event waits would break CUDA-graph capture.
        // SAFETY: buffers allocated by this backend are only used on `stream` (documented above).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("creating a stream"))?;
        Ok(Cuda { ctx, stream })
    }

    /// Whether a usable CUDA device is present (never panics).
    pub fn is_available() -> bool {
        Cuda::new(0).is_ok()
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> Result<String> {
        self.ctx.name().map_err(driver("reading the device name"))
    }
}

impl Backend for Cuda {
    type Buffer<T: Element> = CudaSlice<T>;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn supports(&self, dtype: DType) -> bool {
        dtype != DType::F64
    }
    fn alloc<T: Element>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(driver("allocating device memory"))
    }
    fn upload<T: Element>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(driver("copying host to device"))
    }
    fn download<T: Element>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(driver("copying device to host"))
    }
    fn write<T: Element>(&self, buf: &mut CudaSlice<T>, data: &[T]) -> Result<()> {
        if buf.len() != data.len() {
            return Err(Error::invalid(
                "data",
                format!("{} elements (the buffer's length)", buf.len()),
                data.len(),
            ));
        }
        self.stream
            .memcpy_htod(data, buf)
            .map_err(driver("copying host to device"))
    }
    fn len<T: Element>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }
    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver("synchronizing the stream"))
    }

    fn raw_ptr<T: Element>(&self, buf: &CudaSlice<T>) -> *const c_void {
        // One stream per backend: the read-event guard can be dropped at once, stream order does
        // the rest.
        buf.device_ptr(&self.stream).0 as *const c_void
    }
    fn raw_ptr_mut<T: Element>(&self, buf: &mut CudaSlice<T>) -> *mut c_void {
        buf.device_ptr_mut(&self.stream).0 as *mut c_void
    }
    fn host_slice<'b, T: Element>(&self, _buf: &'b CudaSlice<T>) -> Option<&'b [T]> {
        None
    }
    fn host_slice_mut<'b, T: Element>(&self, _buf: &'b mut CudaSlice<T>) -> Option<&'b mut [T]> {
        None
    }
    fn launchers(&self) -> Option<&'static Launchers> {
        Some(&ffi::CUDA)
    }
    fn raw_stream(&self) -> *mut c_void {
        self.stream.cu_stream() as *mut c_void
    }
    fn prepare_launch(&self) -> Result<()> {
        // The launchers use the CUDA runtime, which runs on the context current to the thread.
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context to this thread"))
    }
}
