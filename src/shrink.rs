//! Dense single-adapter LoRA shrink, `u = x · Aᵀ` (unscaled; the scale is applied in expand).
//!
//! The plumbing kernel: one safe call validates everything it can see and runs on any backend.
//! The multi-adapter serving forms (BGMV, SGMV) build on it.

use std::ffi::c_void;

use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::sys;
use crate::validate::{check_dtype, check_extent, check_stride, fits_i32, span};

/// Sizes and leading dimensions (in elements) of a dense shrink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShrinkDense {
    pub tokens: usize,
    pub d_in: usize,
    pub rank: usize,
    /// Row stride of x, ≥ d_in.
    pub ld_x: usize,
    /// Row stride of A, ≥ d_in.
    pub lda: usize,
    /// Row stride of u, ≥ rank.
    pub ld_u: usize,
}

impl ShrinkDense {
    /// Packed rows: `ld_x = lda = d_in`, `ld_u = rank`.
    pub fn new(tokens: usize, d_in: usize, rank: usize) -> Self {
        ShrinkDense {
            tokens,
            d_in,
            rank,
            ld_x: d_in,
            lda: d_in,
            ld_u: rank,
        }
    }

    pub(crate) fn validate(&self, x_len: usize, a_len: usize, u_len: usize) -> Result<()> {
        fits_i32("tokens", self.tokens)?;
        fits_i32("d_in", self.d_in)?;
        fits_i32("rank", self.rank)?;
        for (arg, ld, min) in [
            ("ld_x", self.ld_x, self.d_in),
            ("lda", self.lda, self.d_in),
            ("ld_u", self.ld_u, self.rank),
        ] {
            check_stride(arg, ld, min, min)?;
        }
        // With no work (zero tokens or zero rank) nothing is read.
        let x_need = if self.rank == 0 {
            Some(0)
        } else {
            span(self.tokens, self.d_in, self.ld_x)
        };
        let a_need = if self.tokens == 0 {
            Some(0)
        } else {
            span(self.rank, self.d_in, self.lda)
        };
        for (arg, need, have) in [
            ("x", x_need, x_len),
            ("a", a_need, a_len),
            ("u", span(self.tokens, self.rank, self.ld_u), u_len),
        ] {
            check_extent(arg, have, need, format_args!("{self:?}"))?;
        }
        Ok(())
    }

    /// The C params for raw pointers (validated sizes fit their C types).
    pub(crate) fn ffi_params<TX: Float, TW: Float>(
        &self,
        x: *const c_void,
        a: *const c_void,
        u: *mut f32,
    ) -> sys::LkShrinkDenseParams {
        sys::LkShrinkDenseParams {
            x,
            a,
            u,
            ld_x: self.ld_x as i64,
            lda: self.lda as i64,
            ld_u: self.ld_u as i64,
            tokens: self.tokens as i32,
            d_in: self.d_in as i32,
            rank: self.rank as i32,
            x_dtype: TX::DTYPE.ffi_tag().unwrap_or(-1),
            w_dtype: TW::DTYPE.ffi_tag().unwrap_or(-1),
        }
    }
}

/// Checks that x's dtype is the weights' dtype or f32, and that the backend takes both.
pub(crate) fn check_x_w_dtypes<B: Backend>(b: &B, x: DType, w: DType) -> Result<()> {
    for (arg, d) in [("x", x), ("a", w)] {
        check_dtype(b, arg, d)?;
    }
    if x != w && x != DType::F32 {
        return Err(Error::UnsupportedDtype {
            arg: "x",
            backend: b.name(),
            actual: x,
            supported: format!("{w} (the weights' dtype) or f32"),
        });
    }
    Ok(())
}

/// `u[t, j] = Σ_k x[t, k] · A[j, k]` for `t < tokens`, `j < rank`; u's other elements are untouched.
/// x is `[tokens, d_in]` in the weights' dtype or f32, A `[rank, d_in]`, u f32 `[tokens, rank]`.
/// Deterministic and batch-invariant (a token's result does not depend on the other tokens).
pub fn shrink_dense<B: Backend, TX: Float, TW: Float>(
    backend: &B,
    x: &B::Buffer<TX>,
    a: &B::Buffer<TW>,
    u: &mut B::Buffer<f32>,
    shape: &ShrinkDense,
) -> Result<()> {
    check_x_w_dtypes(backend, TX::DTYPE, TW::DTYPE)?;
    shape.validate(backend.len(x), backend.len(a), backend.len(u))?;
    if shape.tokens == 0 || shape.rank == 0 {
        return Ok(());
    }
    let Some(launchers) = backend.launchers() else {
        let (x, a) = (
            backend.host_slice(x).expect("host buffer"),
            backend.host_slice(a).expect("host buffer"),
        );
        let u = backend.host_slice_mut(u).expect("host buffer");
        reference::shrink_dense(x, a, u, shape);
        return Ok(());
    };
    let p = shape.ffi_params::<TX, TW>(
        backend.raw_ptr(x),
        backend.raw_ptr(a),
        backend.raw_ptr_mut(u).cast(),
    );
    // SAFETY: dtypes and every buffer length were checked against `shape` just above.
    unsafe {
        crate::ffi::launch(
            backend,
            launchers,
            "shrink_dense",
            launchers.shrink_dense,
            &p,
        )
    }
}

/// The plain-Rust reference (the cpu backend's kernel): f64 accumulation, one rounding to f32.
pub mod reference {
    use super::ShrinkDense;
    use crate::dtype::Float;

    pub fn shrink_dense<TX: Float, TW: Float>(x: &[TX], a: &[TW], u: &mut [f32], s: &ShrinkDense) {
        for t in 0..s.tokens {
            let x_row = &x[t * s.ld_x..t * s.ld_x + s.d_in];
            for j in 0..s.rank {
                let a_row = &a[j * s.lda..j * s.lda + s.d_in];
                let acc: f64 = x_row
                    .iter()
                    .zip(a_row)
                    .map(|(&xv, &av)| xv.to_f64() * av.to_f64())
                    .sum();
                u[t * s.ld_u + j] = acc as f32;
            }
        }
    }
}
