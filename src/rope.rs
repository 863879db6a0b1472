//! Rotary position embedding (RoPE), HF Llama convention (`rotate_half`), in place.
//!
//! x is `[tokens, n_heads · head_dim]` packed row-major; positions i32 `[tokens]` (device-resident).
//! For head h and `i < head_dim/2` the pair `(a, b) = (x[t, h·hd + i], x[t, h·hd + i + hd/2])` is
//! rotated by `angle = f32(pos) · inv_freq[i]` (an f32 product) with
//! `inv_freq[i] = f32(θ^(−2i/hd))` computed in f64 as `exp(−2i · ln(θ)/hd)` ([`inv_freq`]; the kernels
//! evaluate the same f64 expression, with `ln(θ)/hd` from the host, and round it to f32):
//! forward `(a, b) → (a·cos − b·sin, b·cos + a·sin)`; backward uses `−angle` (the transposed
//! rotation, i.e. the gradient of the forward).
//!
//! A negative position skips the token (its row untouched) and ORs
//! [`crate::adapter::fault::INDEX`] into `fault[0]`.
//!
//! Precision: the kernels take sin/cos of the f32 angle with a double-precision reduction and
//! polynomials (≈ correctly rounded to f32; no fast intrinsics, and large positions stay accurate)
//! and rotate in f32; the cpu [`reference`] takes sin/cos of the same f32 angle in f64. So both
//! rotate by the same angle and differ only by rounding: `|Δ| ≤ ~4 · 2⁻²⁴ · (|a| + |b|)` plus the
//! final rounding to T.

use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::{pick_launcher, sys};

/// Sizes of a RoPE application and the base θ (10000 for Llama-2, 500000 for Llama-3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub tokens: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub theta: f32,
}

impl Rope {
    pub fn new(tokens: usize, n_heads: usize, head_dim: usize, theta: f32) -> Self {
        Rope {
            tokens,
            n_heads,
            head_dim,
            theta,
        }
    }

    /// Row width `n_heads · head_dim`.
    pub fn width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn validate(&self) -> Result<()> {
        for (arg, v) in [
            ("tokens", self.tokens),
            ("n_heads", self.n_heads),
            ("head_dim", self.head_dim),
        ] {
            if v > i32::MAX as usize {
                return Err(Error::invalid(
                    arg,
                    format!("≤ {} (int32 size)", i32::MAX),
                    v,
                ));
            }
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::invalid("head_dim", "an even number", self.head_dim));
        }
        let width = self.n_heads.checked_mul(self.head_dim);
        if width.is_none_or(|w| w > i32::MAX as usize) {
            return Err(Error::invalid(
                "n_heads",
                format!("n_heads · head_dim ≤ {}", i32::MAX),
                self.n_heads,
            ));
        }
        if self
            .tokens
            .checked_mul(self.width())
            .is_none_or(|n| n > i64::MAX as usize)
        {
            return Err(Error::invalid(
                "tokens",
                "tokens · n_heads · head_dim ≤ i64::MAX",
                self.tokens,
            ));
        }
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return Err(Error::invalid("theta", "a finite value > 0", self.theta));
        }
        Ok(())
    }
}

/// `inv_freq[i] = θ^(−2i/head_dim)`, evaluated as the kernels do: `exp(−2i · c)` in f64 with
/// `c = ln(θ) / head_dim` (f64), rounded to f32. (The f64 value is within a few f64 ulps of the exact
/// power, so its f32 rounding is the exact power's except in astronomically rare near-ties.)
pub fn inv_freq(theta: f32, head_dim: usize, i: usize) -> f32 {
    let c = (theta as f64).ln() / head_dim as f64;
    (-((2 * i) as f64) * c).exp() as f32
}

/// The rotation angle of position `pos`, pair `i`: the f32 product `f32(pos) · inv_freq[i]`.
pub fn angle(theta: f32, head_dim: usize, pos: i32, i: usize) -> f32 {
    pos as f32 * inv_freq(theta, head_dim, i)
}

fn check_dtype<B: Backend>(b: &B, arg: &'static str, d: DType) -> Result<()> {
    if b.supports(d) {
        Ok(())
    } else {
        Err(Error::UnsupportedDtype {
            arg,
            backend: b.name(),
            actual: d,
            supported: "f32, f16, bf16 (f64 on the cpu backend only)".into(),
        })
    }
}

fn rope_apply<B: Backend, T: Float>(
    b: &B,
    s: &Rope,
    backward: bool,
    positions: &B::Buffer<i32>,
    x: &mut B::Buffer<T>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    let x_arg = if backward { "dx" } else { "x" };
    check_dtype(b, x_arg, T::DTYPE)?;
    s.validate()?;
    if b.len(positions) < s.tokens {
        return Err(Error::invalid(
            "positions",
            format!("a buffer of ≥ {} elements", s.tokens),
            b.len(positions),
        ));
    }
    let need = s.tokens * s.width();
    if b.len(x) < need {
        return Err(Error::invalid(
            x_arg,
            format!("a buffer of ≥ {need} elements"),
            b.len(x),
        ));
    }
    if b.len(fault) == 0 {
        return Err(Error::invalid("fault", "a buffer of ≥ 1 u32", 0));
    }
    if s.tokens == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let positions = b.host_slice(positions).unwrap();
        let x = b.host_slice_mut(x).unwrap();
        let fault = b.host_slice_mut(fault).unwrap();
        fault[0] |= reference::rope(s, backward, positions, x);
        return Ok(());
    };
    let p = sys::LkRopeParams {
        positions: b.raw_ptr(positions).cast(),
        x: b.raw_ptr_mut(x),
        fault: b.raw_ptr_mut(fault).cast(),
        tokens: s.tokens as i32,
        n_heads: s.n_heads as i32,
        head_dim: s.head_dim as i32,
        theta: s.theta,
        dtype: T::DTYPE.ffi_tag().unwrap_or(-1),
    };
    let (op, f): (_, crate::ffi::Launcher<sys::LkRopeParams>) = if backward {
        (
            "rope_backward",
            pick_launcher!(
                launchers,
                sys::lk_emu_rope_backward,
                sys::lk_cuda_rope_backward
            ),
        )
    } else {
        (
            "rope_forward",
            pick_launcher!(
                launchers,
                sys::lk_emu_rope_forward,
                sys::lk_cuda_rope_forward
            ),
        )
    };
    // SAFETY: the dtype and every buffer length were checked above; x and fault are distinct
    // mutable borrows.
    unsafe { crate::ffi::launch(b, launchers, op, f, &p) }
}

/// Rotates x in place by each token's position (module docs); negative positions skipped + fault.
pub fn rope_forward<B: Backend, T: Float>(
    b: &B,
    s: &Rope,
    positions: &B::Buffer<i32>,
    x: &mut B::Buffer<T>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    rope_apply(b, s, false, positions, x, fault)
}

/// The transposed rotation (angle → −angle) in place: the gradient of [`rope_forward`].
pub fn rope_backward<B: Backend, T: Float>(
    b: &B,
    s: &Rope,
    positions: &B::Buffer<i32>,
    dx: &mut B::Buffer<T>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    rope_apply(b, s, true, positions, dx, fault)
}

/// Plain-Rust RoPE (the cpu backend and the tests' oracle): sin/cos of the f32 angle in f64, the
/// rotation in f64, one rounding to T per element.
pub mod reference {
    use super::{angle, Rope};
    use crate::adapter::fault;
    use crate::dtype::Float;

    /// Forward (or, with `backward`, the transposed rotation) in place; returns the fault bits.
    pub fn rope<T: Float>(s: &Rope, backward: bool, positions: &[i32], x: &mut [T]) -> u32 {
        let (hd, half, width) = (s.head_dim, s.head_dim / 2, s.width());
        let mut f = 0;
        for (t, &pos) in positions[..s.tokens].iter().enumerate() {
            if pos < 0 {
                f |= fault::INDEX;
                continue;
            }
            for i in 0..half {
                let a = angle(s.theta, hd, pos, i) as f64;
                let (sin, cos) = a.sin_cos();
                let sin = if backward { -sin } else { sin };
                for h in 0..s.n_heads {
                    let (j1, j2) = (t * width + h * hd + i, t * width + h * hd + i + half);
                    let (u, v) = (x[j1].to_f64(), x[j2].to_f64());
                    x[j1] = T::from_f64(u * cos - v * sin);
                    x[j2] = T::from_f64(v * cos + u * sin);
                }
            }
        }
        f
    }
}
