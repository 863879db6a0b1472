//! AdamW and the gradient-norm helper (issue #7; `cuda/optim.cu`).
//!
//! - [`adamw_step`]: one `torch.optim.AdamW` step (decoupled weight decay, bias correction) on
//!   `param` (T) with f32 moments `m`, `v`, elementwise, in place.
//! - [`sum_squares`]: `out[0] = Σ x²` in f32, deterministic (a fixed split of x over blocks that
//!   depends only on its length, block partials in the caller's workspace, a fixed-order second
//!   pass), for global-norm gradient clipping.
//!
//! **AdamW arithmetic.** torch's single-tensor update (`torch/optim/adamw.py`, `_single_tensor_adamw`)
//! is
//! ```text
//! p ← p · (1 − lr·wd)
//! m ← m.lerp(g, 1 − β1)                 = m + (1 − β1)·(g − m)
//! v ← v · β2 + (1 − β2) · g · g
//! p ← p − (lr / (1 − β1^step)) · m / (sqrt(v) / sqrt(1 − β2^step) + eps)
//! ```
//! with every scalar factor computed in Python floats (f64). Here the host computes the same
//! factors in f64 from the f32 config fields (widened exactly) and rounds each to f32 once
//! ([`AdamWFactors`]): `decay = 1 − lr·wd`, `1 − β1`, `1 − β2`, `step_size = lr / (1 − β1^step)`,
//! `bc2_sqrt = sqrt(1 − β2^step)`. The kernels then compute, in f32 with explicit fused
//! multiply-adds (so emu and cuda give the same bits):
//! ```text
//! p  = to_f32(param) · decay
//! m' = fmaf(1 − β1, g − m, m)
//! v' = fmaf(1 − β2, g · g, β2 · v)
//! d  = sqrt(v') / bc2_sqrt + eps
//! param = round_T(fmaf(−step_size, m' / d, p))
//! ```
//! The cpu reference does the same steps in f64 from the same f32 factors, rounding m', v' to f32
//! (they are stored so) and the parameter to T once.
//!
//! **Validation** (as torch's constructor): `lr ≥ 0`, `eps ≥ 0`, `weight_decay ≥ 0`, `0 ≤ β < 1`, all
//! finite; `step ≥ 1`. `param`, `grad`, `m`, `v` must have the same length; n = 0 returns Ok.
//!
//! **sum_squares** of an empty x writes `out[0] = 0`.

use crate::backend::Backend;
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::validate::{check_dtype, check_workspace};

/// torch.optim.AdamW hyper-parameters (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// torch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2.
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The per-step scalar factors the kernels take, each computed in f64 and rounded to f32 once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWFactors {
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `1 − β1`.
    pub one_minus_beta1: f32,
    /// `1 − β2`.
    pub one_minus_beta2: f32,
    /// `lr / (1 − β1^step)`.
    pub step_size: f32,
    /// `sqrt(1 − β2^step)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamW {
    /// Checks the hyper-parameters (`Error::InvalidArgument` naming the field).
    pub fn validate(&self) -> Result<()> {
        let nonneg = |arg: &'static str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(arg, "finite and ≥ 0", v))
            }
        };
        nonneg("lr", self.lr)?;
        nonneg("eps", self.eps)?;
        nonneg("weight_decay", self.weight_decay)?;
        for (arg, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::invalid(arg, "in [0, 1)", beta));
            }
        }
        Ok(())
    }

    /// The factors of step `step` (≥ 1), computed in f64 (see the module docs).
    pub fn factors(&self, step: u32) -> Result<AdamWFactors> {
        self.validate()?;
        if step == 0 {
            return Err(Error::invalid("step", "≥ 1 (the first step is 1)", step));
        }
        let (lr, b1, b2) = (self.lr as f64, self.beta1 as f64, self.beta2 as f64);
        let bc1 = 1.0 - b1.powi(step.min(i32::MAX as u32) as i32);
        let bc2 = 1.0 - b2.powi(step.min(i32::MAX as u32) as i32);
        Ok(AdamWFactors {
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps,
        })
    }
}

/// One AdamW step (module docs) on `param` with gradient `grad` and f32 moments `m`, `v`, all of
/// the same length, in place. `step` counts from 1.
pub fn adamw_step<B: Backend, T: Float>(
    b: &B,
    cfg: &AdamW,
    step: u32,
    param: &mut B::Buffer<T>,
    grad: &B::Buffer<T>,
    m: &mut B::Buffer<f32>,
    v: &mut B::Buffer<f32>,
) -> Result<()> {
    let f = cfg.factors(step)?;
    check_dtype(b, "param", T::DTYPE)?;
    let n = b.len(param);
    for (arg, len) in [("grad", b.len(grad)), ("m", b.len(m)), ("v", b.len(v))] {
        if len != n {
            return Err(Error::invalid(
                arg,
                format!("{n} elements (param's length)"),
                len,
            ));
        }
    }
    if n > i64::MAX as usize {
        return Err(Error::invalid("param", "≤ i64::MAX elements", n));
    }
    if n == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let grad = b.host_slice(grad).expect("host buffer");
        let param = b.host_slice_mut(param).expect("host buffer");
        let m = b.host_slice_mut(m).expect("host buffer");
        let v = b.host_slice_mut(v).expect("host buffer");
        reference::adamw_step(&f, param, grad, m, v);
        return Ok(());
    };
    kernels::adamw_step(b, launchers, &f, param, grad, m, v)
}

/// Bytes of workspace [`sum_squares`] needs for `n` elements (0 on cpu, and 0 whenever one block
/// does the whole sum).
pub fn sum_squares_workspace_bytes<B: Backend>(b: &B, n: usize) -> usize {
    b.launchers()
        .map_or(0, |l| kernels::sum_squares_workspace_bytes(l, n))
}

/// `out[0] = Σ x²` over all of x, f32, deterministic (fixed split + fixed-order second pass); `out`
/// has ≥ 1 element, `workspace` ≥ [`sum_squares_workspace_bytes`] bytes.
pub fn sum_squares<B: Backend, T: Float>(
    b: &B,
    x: &B::Buffer<T>,
    out: &mut B::Buffer<f32>,
    workspace: &mut B::Buffer<u8>,
) -> Result<()> {
    check_dtype(b, "x", T::DTYPE)?;
    let n = b.len(x);
    if n > i64::MAX as usize {
        return Err(Error::invalid("x", "≤ i64::MAX elements", n));
    }
    if b.len(out) < 1 {
        return Err(Error::invalid("out", "a buffer of ≥ 1 element", 0));
    }
    let need = sum_squares_workspace_bytes(b, n);
    check_workspace(b.len(workspace), need, "sum_squares_workspace_bytes")?;
    if need > 0 && (b.raw_ptr(workspace) as usize) % 4 != 0 {
        return Err(Error::invalid(
            "workspace",
            "a 4-byte aligned buffer",
            format!("{:p}", b.raw_ptr(workspace)),
        ));
    }
    let Some(launchers) = b.launchers() else {
        let x = b.host_slice(x).expect("host buffer");
        let out = b.host_slice_mut(out).expect("host buffer");
        out[0] = reference::sum_squares(x) as f32;
        return Ok(());
    };
    kernels::sum_squares(b, launchers, x, out, workspace)
}

/// The emu/cuda dispatch (lengths and dtypes already validated by the callers).
mod kernels {
    use super::*;
    use crate::ffi::{pick_launcher, sys, Launchers};

    pub(super) fn adamw_step<B: Backend, T: Float>(
        b: &B,
        l: &'static Launchers,
        f: &AdamWFactors,
        param: &mut B::Buffer<T>,
        grad: &B::Buffer<T>,
        m: &mut B::Buffer<f32>,
        v: &mut B::Buffer<f32>,
    ) -> Result<()> {
        let p = sys::LkAdamWParams {
            param: b.raw_ptr_mut(param),
            grad: b.raw_ptr(grad),
            m: b.raw_ptr_mut(m).cast(),
            v: b.raw_ptr_mut(v).cast(),
            n: b.len(param) as i64,
            decay: f.decay,
            beta1: f.beta1,
            beta2: f.beta2,
            one_minus_beta1: f.one_minus_beta1,
            one_minus_beta2: f.one_minus_beta2,
            step_size: f.step_size,
            bc2_sqrt: f.bc2_sqrt,
            eps: f.eps,
            dtype: T::DTYPE.ffi_tag().unwrap_or(-1),
        };
        let launcher = pick_launcher!(
            l,
            sys::lk_emu_optim_adamw_step,
            sys::lk_cuda_optim_adamw_step
        );
        // SAFETY: the four buffers have the same length n (checked by the caller) and are distinct.
        unsafe { crate::ffi::launch(b, l, "optim_adamw_step", launcher, &p) }
    }

    fn sum_params<T: Float>(n: usize) -> sys::LkSumSquaresParams {
        sys::LkSumSquaresParams {
            x: std::ptr::null(),
            out: std::ptr::null_mut(),
            workspace: std::ptr::null_mut(),
            n: n as i64,
            dtype: T::DTYPE.ffi_tag().unwrap_or(-1),
        }
    }

    /// The workspace of the widest-chunk dtype's split is the largest: sizes are computed for f16
    /// (8 elements per 128-bit chunk) and f32 and the maximum is returned, so one size serves every
    /// kernel dtype.
    pub(super) fn sum_squares_workspace_bytes(l: &'static Launchers, n: usize) -> usize {
        let f = pick_launcher!(
            l,
            sys::lk_emu_optim_sum_squares_workspace_size,
            sys::lk_cuda_optim_sum_squares_workspace_size
        );
        let n = n.min(i64::MAX as usize);
        // SAFETY: a pure function of the params' sizes.
        unsafe { f(&sum_params::<f32>(n)).max(f(&sum_params::<crate::dtype::f16>(n))) }
    }

    pub(super) fn sum_squares<B: Backend, T: Float>(
        b: &B,
        l: &'static Launchers,
        x: &B::Buffer<T>,
        out: &mut B::Buffer<f32>,
        workspace: &mut B::Buffer<u8>,
    ) -> Result<()> {
        let p = sys::LkSumSquaresParams {
            x: b.raw_ptr(x),
            out: b.raw_ptr_mut(out).cast(),
            workspace: b.raw_ptr_mut(workspace),
            ..sum_params::<T>(b.len(x))
        };
        let f = pick_launcher!(
            l,
            sys::lk_emu_optim_sum_squares,
            sys::lk_cuda_optim_sum_squares
        );
        // SAFETY: out has ≥ 1 element and the workspace ≥ sum_squares_workspace_bytes(n) bytes
        // (checked by the caller); x holds n elements.
        unsafe { crate::ffi::launch(b, l, "optim_sum_squares", f, &p) }
    }
}

/// Plain-Rust references (the cpu backend's kernels and the tests' oracle), generic over T
/// including f64.
pub mod reference {
    use super::AdamWFactors;
    use crate::dtype::Float;

    /// One element's update in f64 from the f32 factors; returns `(param, m, v)` with m and v
    /// rounded to f32 (as stored) and the parameter in f64 (the caller rounds it to T).
    pub fn adamw_element(f: &AdamWFactors, p: f64, g: f64, m: f32, v: f32) -> (f64, f32, f32) {
        let p = p * f.decay as f64;
        let m = (m as f64 + f.one_minus_beta1 as f64 * (g - m as f64)) as f32;
        let v = (f.beta2 as f64 * v as f64 + f.one_minus_beta2 as f64 * g * g) as f32;
        let denom = (v as f64).sqrt() / f.bc2_sqrt as f64 + f.eps as f64;
        let p = p - f.step_size as f64 * (m as f64 / denom);
        (p, m, v)
    }

    /// One AdamW step over whole buffers (equal lengths).
    pub fn adamw_step<T: Float>(
        f: &AdamWFactors,
        param: &mut [T],
        grad: &[T],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        for i in 0..param.len() {
            let (p, mi, vi) = adamw_element(f, param[i].to_f64(), grad[i].to_f64(), m[i], v[i]);
            param[i] = T::from_f64(p);
            m[i] = mi;
            v[i] = vi;
        }
    }

    /// `Σ x²` in f64.
    pub fn sum_squares<T: Float>(x: &[T]) -> f64 {
        x.iter().map(|v| v.to_f64() * v.to_f64()).sum()
    }
}
