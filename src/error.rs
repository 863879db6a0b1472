//! The crate's one error type. Every public entry point returns [`Result`].

use crate::dtype::DType;
use crate::ffi::sys;

/// What kind of failure a kernel launcher reported (its `int` return code, decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelErrorKind {
    InvalidArgument,
    UnsupportedDtype,
    EmuLaunchConfig,
    EmuBarrier,
    EmuDeadlock,
    EmuWarp,
    EmuStackOverflow,
    EmuAsyncCopy,
    EmuInternal,
    /// A CUDA runtime error code (`cudaError_t`).
    Cuda(i32),
    Unknown(i32),
}

impl KernelErrorKind {
    pub fn from_code(code: i32) -> Self {
        // Casts: bindgen gives the anonymous enum's constants an unsigned type.
        match code as u32 {
            sys::LK_ERR_INVALID_ARGUMENT => Self::InvalidArgument,
            sys::LK_ERR_UNSUPPORTED_DTYPE => Self::UnsupportedDtype,
            sys::LK_ERR_EMU_LAUNCH_CONFIG => Self::EmuLaunchConfig,
            sys::LK_ERR_EMU_BARRIER => Self::EmuBarrier,
            sys::LK_ERR_EMU_DEADLOCK => Self::EmuDeadlock,
            sys::LK_ERR_EMU_WARP => Self::EmuWarp,
            sys::LK_ERR_EMU_STACK_OVERFLOW => Self::EmuStackOverflow,
            sys::LK_ERR_EMU_ASYNC_COPY => Self::EmuAsyncCopy,
            sys::LK_ERR_EMU_INTERNAL => Self::EmuInternal,
            c if (1..10000).contains(&c) => Self::Cuda(code),
            _ => Self::Unknown(code),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A size, stride, length or index does not fit what the operation needs.
    #[error("invalid argument `{arg}`: expected {expected}, got {actual}")]
    InvalidArgument {
        arg: &'static str,
        expected: String,
        actual: String,
    },
    /// The operation or backend does not implement this dtype (combination).
    #[error("unsupported dtype for `{arg}` on the {backend} backend: got {actual}, supported: {supported}")]
    UnsupportedDtype {
        arg: &'static str,
        backend: &'static str,
        actual: DType,
        supported: String,
    },
    /// No usable GPU: no driver library, no device, or the crate was built without `cuda`.
    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),
    /// The CUDA driver (through cudarc) failed.
    #[error("CUDA driver error during {during}: {message}")]
    Driver {
        during: &'static str,
        message: String,
    },
    /// A kernel launcher returned a non-zero code.
    #[error("{backend} kernel `{op}` failed with code {code} ({kind:?}): {message}")]
    Kernel {
        backend: &'static str,
        op: &'static str,
        code: i32,
        kind: KernelErrorKind,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(
        arg: &'static str,
        expected: impl Into<String>,
        actual: impl ToString,
    ) -> Self {
        Error::InvalidArgument {
            arg,
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }

    /// The decoded launcher code, for kernel errors.
    pub fn kernel_kind(&self) -> Option<KernelErrorKind> {
        match self {
            Error::Kernel { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}
