//! The emu backend: the CUDA kernel source (`cuda/*.cu`) compiled by the host C++ compiler and run by
//! the SIMT emulator (`cuda/emu/`), on host memory. Launches are synchronous.
//!
//! Environment, read at each launch: `LK_EMU_ORDER=fwd|rev|rand`, `LK_EMU_SEED=<u64>`,
//! `LK_EMU_WORKERS=<n>`, `LK_EMU_STRICT=0|1`; at build time `LK_EMU_SANITIZE=address`.

use std::ffi::c_void;
use std::ptr;

use super::{host, Backend};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::ffi::{self, Launchers};

/// The SIMT-emulator backend (host memory; f32/f16/bf16).
#[derive(Clone, Copy, Debug, Default)]
pub struct Emu;

impl Backend for Emu {
    type Buffer<T: Element> = Vec<T>;

    fn name(&self) -> &'static str {
        "emu"
    }
    fn supports(&self, dtype: DType) -> bool {
        dtype != DType::F64
    }
    host::memory_methods!();
    fn launchers(&self) -> Option<&'static Launchers> {
        Some(&ffi::EMU)
    }
    fn raw_stream(&self) -> *mut c_void {
        ptr::null_mut()
    }
}

/// A thread schedule of the emulator: which runnable CUDA thread runs next at every scheduling
/// point (barrier, warp collective, exit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Lowest linear thread id first (the default).
    Forward,
    /// Highest first.
    Reverse,
    /// Uniformly random, seeded (per block, so reproducible whatever the worker count).
    Random(u64),
}

impl Emu {
    /// Runs `f` with every emulator launch made from this thread using `schedule`, overriding
    /// `LK_EMU_ORDER` / `LK_EMU_SEED` (no process-environment changes, so tests can do this in
    /// parallel). The previous setting (the environment's) is restored afterwards, also on panic.
    pub fn with_schedule<R>(schedule: Schedule, f: impl FnOnce() -> R) -> R {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                // SAFETY: a null order only clears this thread's override.
                unsafe { ffi::sys::lk_emu_set_schedule(ptr::null(), 0) };
            }
        }
        let (order, seed) = match schedule {
            Schedule::Forward => (c"fwd", 0),
            Schedule::Reverse => (c"rev", 0),
            Schedule::Random(seed) => (c"rand", seed),
        };
        // SAFETY: a valid NUL-terminated order name; the call only sets a thread-local.
        let rc = unsafe { ffi::sys::lk_emu_set_schedule(order.as_ptr(), seed) };
        assert_eq!(rc, 0, "lk_emu_set_schedule rejected a valid order");
        let _reset = Reset;
        f()
    }
}
