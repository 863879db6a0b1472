//! Helpers of the GPU trials (tests/gpu.rs and tests/gpu_block/), which report `Failed` instead
//! of panicking.

use libtest_mimic::Failed;
use lora_kernels::Error;

/// Ok when `cond` holds, else a failure with `msg()`.
pub fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg().into())
    }
}

/// A crate error as a trial failure (for `map_err`).
pub fn err(e: Error) -> Failed {
    e.to_string().into()
}
