//! Element types: what buffers hold ([`Element`]) and what kernels compute on ([`Float`]).

use std::fmt::Debug;

pub use half::{bf16, f16};

use crate::ffi::sys;

/// A floating-point storage type. Accumulation is always f32 on the GPU and emulator and f64 in
/// the cpu reference. `F64` exists only on the cpu backend (gradient checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 => 8,
        }
    }

    /// The C ABI tag (`LkDtype`); `None` for f64, which no kernel takes.
    pub fn ffi_tag(self) -> Option<i32> {
        match self {
            DType::F32 => Some(sys::LkDtype::LK_F32 as i32),
            DType::F16 => Some(sys::LkDtype::LK_F16 as i32),
            DType::BF16 => Some(sys::LkDtype::LK_BF16 as i32),
            DType::F64 => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// What the cuda backend needs to put a type in device memory; empty without the `cuda` feature.
#[cfg(feature = "cuda")]
pub trait DeviceRepr: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> DeviceRepr for T {}
/// What the cuda backend needs to put a type in device memory; empty without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub trait DeviceRepr {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceRepr for T {}

/// A type a backend buffer can hold: the float types; i32/u32 for indices and error words; u8 for
/// workspaces; u64 for tables of C structs.
pub trait Element:
    sealed::Sealed + Copy + Default + Debug + PartialEq + Send + Sync + 'static + DeviceRepr
{
}

/// A floating-point element with its dtype tag and exact-as-possible conversions.
pub trait Float: Element {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    /// Rounds to nearest, ties to even.
    fn from_f64(v: f64) -> Self;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

macro_rules! element {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {}
    )*};
}
element!(f32, f64, f16, bf16, i32, u32, u8, u64);

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for f64 {
    const DTYPE: DType = DType::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}

impl Float for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Float for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
