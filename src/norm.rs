//! RMSNorm forward/backward (Llama's `LlamaRMSNorm`):
//!
//! - [`rmsnorm_forward`]: `y[r, :] = x[r, :] · rstd[r] · w`, `rstd[r] = 1/sqrt(mean(x[r, :]²) + eps)`
//!   (rstd saved in f32 for the backward).
//! - [`rmsnorm_backward`]: with `c[r] = Σ_j dy[r, j]·w[j]·x[r, j]`,
//!   `dx[r, k] = rstd·w[k]·dy[r, k] − (rstd³/dim)·x[r, k]·c[r]` and
//!   `dw[j] = Σ_r dy[r, j]·x[r, j]·rstd[r]` (a deterministic fixed-order reduction over rows).
//!
//! Layout: x, y, dy, dx `[rows, dim]` packed row-major; w, dw `[dim]`; rstd `[rows]` f32.
//! Storage T is f32, f16 or bf16 on emu/cuda (f32 arithmetic, one rounding to T at the end of each
//! element), and also f64 on the cpu backend, whose [`reference`] accumulates in f64. The backward
//! uses the *saved* rstd as given (not recomputed from x).
//!
//! Determinism: every row reduction is a fixed tree (per-thread chains in column order, a warp xor
//! butterfly, warp partials summed in warp order); dw is reduced over a fixed split of the rows
//! (a function of `rows` only) into workspace partials summed in piece order. Same inputs → the
//! same bits, under any emulator schedule and run to run on the GPU.

use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::{pick_launcher, sys};
use crate::validate::{check_dtype, check_len, check_workspace, elems_i64, fits_i32};

/// Sizes of an RMSNorm: `rows` vectors of length `dim`, and the epsilon added to the mean square.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsNorm {
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

impl RmsNorm {
    pub fn new(rows: usize, dim: usize, eps: f32) -> Self {
        RmsNorm { rows, dim, eps }
    }

    fn validate(&self) -> Result<()> {
        fits_i32("rows", self.rows)?;
        fits_i32("dim", self.dim)?;
        elems_i64("rows", self.rows, self.dim)?;
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid("eps", "a finite value ≥ 0", self.eps));
        }
        Ok(())
    }

    fn elems(&self) -> usize {
        self.rows * self.dim
    }

    fn ffi_forward(&self, dtype: DType) -> sys::LkRmsNormForwardParams {
        sys::LkRmsNormForwardParams {
            x: std::ptr::null(),
            w: std::ptr::null(),
            y: std::ptr::null_mut(),
            rstd: std::ptr::null_mut(),
            rows: self.rows as i32,
            dim: self.dim as i32,
            eps: self.eps,
            dtype: dtype.ffi_tag().unwrap_or(-1),
        }
    }

    fn ffi_backward(&self, dtype: DType) -> sys::LkRmsNormBackwardParams {
        sys::LkRmsNormBackwardParams {
            x: std::ptr::null(),
            w: std::ptr::null(),
            rstd: std::ptr::null(),
            dy: std::ptr::null(),
            dx: std::ptr::null_mut(),
            dw: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            rows: self.rows as i32,
            dim: self.dim as i32,
            dtype: dtype.ffi_tag().unwrap_or(-1),
        }
    }
}

/// `y = x · rstd · w` per row, rstd saved (see the module docs). y and rstd are overwritten.
pub fn rmsnorm_forward<B: Backend, T: Float>(
    b: &B,
    s: &RmsNorm,
    x: &B::Buffer<T>,
    w: &B::Buffer<T>,
    y: &mut B::Buffer<T>,
    rstd: &mut B::Buffer<f32>,
) -> Result<()> {
    check_dtype(b, "x", T::DTYPE)?;
    s.validate()?;
    check_len("x", b.len(x), s.elems())?;
    check_len("w", b.len(w), s.dim)?;
    check_len("y", b.len(y), s.elems())?;
    check_len("rstd", b.len(rstd), s.rows)?;
    if s.rows == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let (x, w) = (b.host_slice(x).unwrap(), b.host_slice(w).unwrap());
        let y = b.host_slice_mut(y).unwrap();
        let rstd = b.host_slice_mut(rstd).unwrap();
        reference::rmsnorm_forward(s, x, w, y, rstd);
        return Ok(());
    };
    let mut p = s.ffi_forward(T::DTYPE);
    p.x = b.raw_ptr(x);
    p.w = b.raw_ptr(w);
    p.y = b.raw_ptr_mut(y);
    p.rstd = b.raw_ptr_mut(rstd).cast();
    let f = pick_launcher!(
        launchers,
        sys::lk_emu_norm_rmsnorm_forward,
        sys::lk_cuda_norm_rmsnorm_forward
    );
    // SAFETY: the dtype and every buffer length were checked against `s` above; y and rstd are
    // distinct mutable borrows.
    unsafe { crate::ffi::launch(b, launchers, "norm_rmsnorm_forward", f, &p) }
}

/// Bytes of workspace [`rmsnorm_backward`] needs (0 on cpu): the dw partials of the fixed row split.
pub fn rmsnorm_backward_workspace_bytes<B: Backend>(b: &B, s: &RmsNorm) -> usize {
    if s.validate().is_err() {
        return 0;
    }
    b.launchers().map_or(0, |l| {
        let p = s.ffi_backward(DType::F32);
        let f = pick_launcher!(
            l,
            sys::lk_emu_norm_rmsnorm_backward_workspace_size,
            sys::lk_cuda_norm_rmsnorm_backward_workspace_size
        );
        // SAFETY: a pure function of the params' sizes.
        unsafe { f(&p) }
    })
}

/// dx `[rows, dim]` and dw `[dim]` overwritten (module docs); `rstd` is the forward's.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<B: Backend, T: Float>(
    b: &B,
    s: &RmsNorm,
    x: &B::Buffer<T>,
    w: &B::Buffer<T>,
    rstd: &B::Buffer<f32>,
    dy: &B::Buffer<T>,
    dx: &mut B::Buffer<T>,
    dw: &mut B::Buffer<T>,
    workspace: &mut B::Buffer<u8>,
) -> Result<()> {
    check_dtype(b, "x", T::DTYPE)?;
    s.validate()?;
    check_len("x", b.len(x), s.elems())?;
    check_len("w", b.len(w), s.dim)?;
    check_len("rstd", b.len(rstd), s.rows)?;
    check_len("dy", b.len(dy), s.elems())?;
    check_len("dx", b.len(dx), s.elems())?;
    check_len("dw", b.len(dw), s.dim)?;
    let need = rmsnorm_backward_workspace_bytes(b, s);
    check_workspace(b.len(workspace), need, "rmsnorm_backward_workspace_bytes")?;
    if s.dim == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let (x, w) = (b.host_slice(x).unwrap(), b.host_slice(w).unwrap());
        let (rstd, dy) = (b.host_slice(rstd).unwrap(), b.host_slice(dy).unwrap());
        let dx = b.host_slice_mut(dx).unwrap();
        let dw = b.host_slice_mut(dw).unwrap();
        reference::rmsnorm_backward(s, x, w, rstd, dy, dx, dw);
        return Ok(());
    };
    let mut p = s.ffi_backward(T::DTYPE);
    p.x = b.raw_ptr(x);
    p.w = b.raw_ptr(w);
    p.rstd = b.raw_ptr(rstd).cast();
    p.dy = b.raw_ptr(dy);
    p.dx = b.raw_ptr_mut(dx);
    p.dw = b.raw_ptr_mut(dw);
    p.workspace = crate::ffi::workspace_ptr(b, workspace, need);
    let f = pick_launcher!(
        launchers,
        sys::lk_emu_norm_rmsnorm_backward,
        sys::lk_cuda_norm_rmsnorm_backward
    );
    // SAFETY: the dtype, every buffer length and the workspace size were checked above; the
    // outputs and the workspace are distinct mutable borrows.
    unsafe { crate::ffi::launch(b, launchers, "norm_rmsnorm_backward", f, &p) }
}

/// Plain-Rust RMSNorm (the cpu backend and the tests' oracle): f64 arithmetic, one rounding to T
/// per output element; rstd rounded to f32.
pub mod reference {
    use super::RmsNorm;
    use crate::dtype::Float;

    /// Forward; `rstd[r]` is the f64 value rounded to f32, y uses the unrounded f64 rstd. The mean
    /// square of an empty row (dim = 0) is 0.
    pub fn rmsnorm_forward<T: Float>(s: &RmsNorm, x: &[T], w: &[T], y: &mut [T], rstd: &mut [f32]) {
        let d = s.dim;
        for r in 0..s.rows {
            let xr = &x[r * d..(r + 1) * d];
            let ss: f64 = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            let mean = if d == 0 { 0.0 } else { ss / d as f64 };
            let rs = 1.0 / (mean + s.eps as f64).sqrt();
            rstd[r] = rs as f32;
            for j in 0..d {
                y[r * d + j] = T::from_f64(xr[j].to_f64() * rs * w[j].to_f64());
            }
        }
    }

    /// Backward with the saved (f32) rstd; dw summed over rows in f64.
    pub fn rmsnorm_backward<T: Float>(
        s: &RmsNorm,
        x: &[T],
        w: &[T],
        rstd: &[f32],
        dy: &[T],
        dx: &mut [T],
        dw: &mut [T],
    ) {
        let d = s.dim;
        let mut dw_acc = vec![0.0f64; d];
        for r in 0..s.rows {
            let rs = rstd[r] as f64;
            let (xr, dyr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            let c: f64 = (0..d)
                .map(|j| dyr[j].to_f64() * w[j].to_f64() * xr[j].to_f64())
                .sum();
            let k = rs * rs * rs / d as f64 * c;
            for j in 0..d {
                let (xv, dyv, wv) = (xr[j].to_f64(), dyr[j].to_f64(), w[j].to_f64());
                dx[r * d + j] = T::from_f64(rs * wv * dyv - k * xv);
                dw_acc[j] += dyv * xv * rs;
            }
        }
        for j in 0..d {
            dw[j] = T::from_f64(dw_acc[j]);
        }
    }
}
