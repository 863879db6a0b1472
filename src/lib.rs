//! # lora-kernels
//!
//! Hand-written CUDA kernels for LoRA (`y = W x + s · B (A · dropout(x))`): training adapters and
//! serving many at once. The same kernel source runs on three backends behind one API
//! ([`backend::Backend`]): `cpu` (plain Rust, the oracle), `emu` (the CUDA source compiled by the
//! host compiler and executed by a SIMT emulator) and `cuda` (the GPU, feature `cuda`).
//!
//! The C ABI (`cuda/lora_kernels.h`) exposes every launcher as `lk_cuda_*` and `lk_emu_*`.
//!
//! The README follows (its Rust examples are compiled and run as doc tests).
#![doc = include_str!("../README.md")]

pub mod adapter;
pub mod attention;
pub mod autograd;
pub mod backend;
pub mod backward;
pub mod bgmv;
pub mod demo;
pub mod dropout;
pub mod dtype;
pub mod elementwise;
pub mod embedding;
pub mod error;
pub mod ffi;
pub mod gemm;
pub mod loss;
pub mod merge;
pub mod model;
pub mod norm;
pub mod optim;
pub mod peft;
pub mod ptxas;
pub mod registry;
pub mod rope;
pub mod sgmv;
pub mod shrink;
mod validate;

#[cfg(feature = "cuda")]
pub use backend::Cuda;
pub use backend::{Backend, BackendKind, Cpu, Emu, Schedule};
#[cfg(feature = "cuda")]
pub use cudarc;
pub use dtype::{bf16, f16, DType, Element, Float};
pub use error::{Error, KernelErrorKind, Result};
