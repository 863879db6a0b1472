//! Elementwise ops of the transformer block: residual add, gradient accumulation, SwiGLU forward
//! and backward, scaling.
//!
//! Every op takes buffers of one length n (the element count; a mismatch is
//! `Error::InvalidArgument`). Emu/cuda compute in f32 with one rounding to T per output; the cpu
//! [`reference`] is generic over T including f64.
//!
//! - [`add`] `out = x + y`, [`add_assign`] `acc += x`: the f32 sum of two values of T rounded to T
//!   equals the exactly rounded sum (f32 has more than 2p + 2 bits for f16/bf16), so all backends
//!   agree bit for bit.
//! - [`scale`] `x *= alpha`: one f32 multiply rounded to T (the reference does the same f32 multiply;
//!   f64 in f64), bit-identical across backends. `alpha` must be finite.
//! - [`swiglu_forward`] `out = silu(gate) · up`, `silu(g) = g · σ(g)`;
//!   [`swiglu_backward`] `d_up = d_out · silu(g)`, `d_gate = d_out · up · σ(g) · (1 + g · (1 − σ(g)))`.
//!   σ is evaluated without overflow: `e = exp(−|g|)`, `σ = 1/(1+e)` for g ≥ 0 and `e/(1+e)` for
//!   g < 0, and `1 − σ` is computed directly the other way round (no cancellation). The kernels use
//!   f32 `expf` (a few ulp), so they match the f64 reference to a few f32 ulps of the terms.

use crate::backend::Backend;
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::ffi::{pick_launcher, sys};
use crate::validate::check_dtype;

/// All buffers have `n` elements (the first one's length).
fn check_same_len(n: usize, others: &[(&'static str, usize)]) -> Result<()> {
    for &(arg, len) in others {
        if len != n {
            return Err(Error::invalid(
                arg,
                format!("{n} elements (the length of the first operand)"),
                len,
            ));
        }
    }
    if n > i64::MAX as usize {
        return Err(Error::invalid("n", "≤ i64::MAX elements", n));
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    AddAssign,
    SwigluForward,
    SwigluBackward,
    Scale,
}

/// Launches `op` with the params' pointers filled in by the caller.
fn launch<B: Backend, T: Float>(
    b: &B,
    op: Op,
    mut p: sys::LkElementwiseParams,
    n: usize,
) -> Result<()> {
    let launchers = b.launchers().expect("a launching backend");
    p.n = n as i64;
    p.dtype = T::DTYPE.ffi_tag().unwrap_or(-1);
    let (name, f): (_, crate::ffi::Launcher<sys::LkElementwiseParams>) = match op {
        Op::Add => (
            "elementwise_add",
            pick_launcher!(
                launchers,
                sys::lk_emu_elementwise_add,
                sys::lk_cuda_elementwise_add
            ),
        ),
        Op::AddAssign => (
            "elementwise_add_assign",
            pick_launcher!(
                launchers,
                sys::lk_emu_elementwise_add_assign,
                sys::lk_cuda_elementwise_add_assign
            ),
        ),
        Op::SwigluForward => (
            "elementwise_swiglu_forward",
            pick_launcher!(
                launchers,
                sys::lk_emu_elementwise_swiglu_forward,
                sys::lk_cuda_elementwise_swiglu_forward
            ),
        ),
        Op::SwigluBackward => (
            "elementwise_swiglu_backward",
            pick_launcher!(
                launchers,
                sys::lk_emu_elementwise_swiglu_backward,
                sys::lk_cuda_elementwise_swiglu_backward
            ),
        ),
        Op::Scale => (
            "elementwise_scale",
            pick_launcher!(
                launchers,
                sys::lk_emu_elementwise_scale,
                sys::lk_cuda_elementwise_scale
            ),
        ),
    };
    // SAFETY: callers checked the dtype and that every buffer holds n elements; outputs are
    // distinct mutable borrows from the inputs.
    unsafe { crate::ffi::launch(b, launchers, name, f, &p) }
}

fn params() -> sys::LkElementwiseParams {
    sys::LkElementwiseParams {
        a: std::ptr::null(),
        b: std::ptr::null(),
        c: std::ptr::null(),
        out: std::ptr::null_mut(),
        out2: std::ptr::null_mut(),
        n: 0,
        alpha: 0.0,
        dtype: 0,
    }
}

/// `out = x + y` (overwrite).
pub fn add<B: Backend, T: Float>(
    b: &B,
    x: &B::Buffer<T>,
    y: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
) -> Result<()> {
    check_dtype(b, "x", T::DTYPE)?;
    let n = b.len(x);
    check_same_len(n, &[("y", b.len(y)), ("out", b.len(out))])?;
    if n == 0 {
        return Ok(());
    }
    if b.launchers().is_none() {
        let (x, y) = (b.host_slice(x).unwrap(), b.host_slice(y).unwrap());
        reference::add(x, y, b.host_slice_mut(out).unwrap());
        return Ok(());
    }
    let mut p = params();
    p.a = b.raw_ptr(x);
    p.b = b.raw_ptr(y);
    p.out = b.raw_ptr_mut(out);
    launch::<B, T>(b, Op::Add, p, n)
}

/// `acc += x` (gradient accumulation, residual).
pub fn add_assign<B: Backend, T: Float>(
    b: &B,
    acc: &mut B::Buffer<T>,
    x: &B::Buffer<T>,
) -> Result<()> {
    check_dtype(b, "acc", T::DTYPE)?;
    let n = b.len(acc);
    check_same_len(n, &[("x", b.len(x))])?;
    if n == 0 {
        return Ok(());
    }
    if b.launchers().is_none() {
        let x = b.host_slice(x).unwrap();
        reference::add_assign(b.host_slice_mut(acc).unwrap(), x);
        return Ok(());
    }
    let mut p = params();
    p.a = b.raw_ptr(x);
    p.out = b.raw_ptr_mut(acc);
    launch::<B, T>(b, Op::AddAssign, p, n)
}

/// `out = silu(gate) · up` (overwrite).
pub fn swiglu_forward<B: Backend, T: Float>(
    b: &B,
    gate: &B::Buffer<T>,
    up: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
) -> Result<()> {
    check_dtype(b, "gate", T::DTYPE)?;
    let n = b.len(gate);
    check_same_len(n, &[("up", b.len(up)), ("out", b.len(out))])?;
    if n == 0 {
        return Ok(());
    }
    if b.launchers().is_none() {
        let (g, u) = (b.host_slice(gate).unwrap(), b.host_slice(up).unwrap());
        reference::swiglu_forward(g, u, b.host_slice_mut(out).unwrap());
        return Ok(());
    }
    let mut p = params();
    p.a = b.raw_ptr(gate);
    p.b = b.raw_ptr(up);
    p.out = b.raw_ptr_mut(out);
    launch::<B, T>(b, Op::SwigluForward, p, n)
}

/// `d_gate`, `d_up` overwritten with the gradients of [`swiglu_forward`] (module docs).
pub fn swiglu_backward<B: Backend, T: Float>(
    b: &B,
    gate: &B::Buffer<T>,
    up: &B::Buffer<T>,
    d_out: &B::Buffer<T>,
    d_gate: &mut B::Buffer<T>,
    d_up: &mut B::Buffer<T>,
) -> Result<()> {
    check_dtype(b, "gate", T::DTYPE)?;
    let n = b.len(gate);
    check_same_len(
        n,
        &[
            ("up", b.len(up)),
            ("d_out", b.len(d_out)),
            ("d_gate", b.len(d_gate)),
            ("d_up", b.len(d_up)),
        ],
    )?;
    if n == 0 {
        return Ok(());
    }
    if b.launchers().is_none() {
        let (g, u, d) = (
            b.host_slice(gate).unwrap(),
            b.host_slice(up).unwrap(),
            b.host_slice(d_out).unwrap(),
        );
        let dg = b.host_slice_mut(d_gate).unwrap();
        reference::swiglu_backward(g, u, d, dg, b.host_slice_mut(d_up).unwrap());
        return Ok(());
    }
    let mut p = params();
    p.a = b.raw_ptr(gate);
    p.b = b.raw_ptr(up);
    p.c = b.raw_ptr(d_out);
    p.out = b.raw_ptr_mut(d_gate);
    p.out2 = b.raw_ptr_mut(d_up);
    launch::<B, T>(b, Op::SwigluBackward, p, n)
}

/// `x *= alpha` (alpha finite).
pub fn scale<B: Backend, T: Float>(b: &B, x: &mut B::Buffer<T>, alpha: f32) -> Result<()> {
    check_dtype(b, "x", T::DTYPE)?;
    if !alpha.is_finite() {
        return Err(Error::invalid("alpha", "a finite value", alpha));
    }
    let n = b.len(x);
    check_same_len(n, &[])?;
    if n == 0 {
        return Ok(());
    }
    if b.launchers().is_none() {
        reference::scale(b.host_slice_mut(x).unwrap(), alpha);
        return Ok(());
    }
    let mut p = params();
    p.out = b.raw_ptr_mut(x);
    p.alpha = alpha;
    launch::<B, T>(b, Op::Scale, p, n)
}

/// Plain-Rust elementwise ops (the cpu backend and the tests' oracle).
pub mod reference {
    use crate::dtype::{DType, Float};

    /// `(σ(g), 1 − σ(g))` without overflow or cancellation (f64).
    pub fn sigmoid_pair(g: f64) -> (f64, f64) {
        let e = (-g.abs()).exp();
        let (big, small) = (1.0 / (1.0 + e), e / (1.0 + e));
        if g >= 0.0 {
            (big, small)
        } else {
            (small, big)
        }
    }

    /// `g · σ(g)` in f64.
    pub fn silu(g: f64) -> f64 {
        g * sigmoid_pair(g).0
    }

    pub fn add<T: Float>(x: &[T], y: &[T], out: &mut [T]) {
        for ((o, a), b) in out.iter_mut().zip(x).zip(y) {
            *o = T::from_f64(a.to_f64() + b.to_f64());
        }
    }

    pub fn add_assign<T: Float>(acc: &mut [T], x: &[T]) {
        for (o, a) in acc.iter_mut().zip(x) {
            *o = T::from_f64(o.to_f64() + a.to_f64());
        }
    }

    /// One f32 multiply rounded to T (f64: in f64), exactly as the kernels.
    pub fn scale<T: Float>(x: &mut [T], alpha: f32) {
        for v in x.iter_mut() {
            *v = if T::DTYPE == DType::F64 {
                T::from_f64(v.to_f64() * alpha as f64)
            } else {
                T::from_f32(v.to_f32() * alpha)
            };
        }
    }

    pub fn swiglu_forward<T: Float>(gate: &[T], up: &[T], out: &mut [T]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = T::from_f64(silu(g.to_f64()) * u.to_f64());
        }
    }

    pub fn swiglu_backward<T: Float>(
        gate: &[T],
        up: &[T],
        d_out: &[T],
        d_gate: &mut [T],
        d_up: &mut [T],
    ) {
        for i in 0..gate.len() {
            let (g, u, d) = (gate[i].to_f64(), up[i].to_f64(), d_out[i].to_f64());
            let (s, sc) = sigmoid_pair(g);
            d_up[i] = T::from_f64(d * g * s);
            d_gate[i] = T::from_f64(d * u * s * (1.0 + g * sc));
        }
    }
}
