//! Fused Philox dropout (DESIGN.md §2 "Dropout"): masks are regenerated from `(seed, offset,
//! element)`, never stored.
//!
//! - [`philox4x32_10`]: the counter-based generator, bit-identical to `cuda/philox.cuh`.
//! - [`Dropout`] `{ p, seed, offset }` → [`DropoutConfig`]: the host-computed `threshold =
//!   min(⌊p · 2³²⌋, 2³² − 1)` (in f64) and `keep_scale = 1/(1−p)` rounded to f32 (0 when p = 1).
//!   Kernels never see p.
//! - [`dropout_forward`] / [`dropout_backward`]: `y = m ⊙ x · keep_scale`, `dx = m ⊙ dy · keep_scale`.
//! - [`shrink_dense_dropout`]: the training shrink `u = drop(x) · Aᵀ` with the mask regenerated while
//!   loading x.
//!
//! **The mask.** Element `e` — flat index `token · d + col` with the *original* token index
//! (`token_base + row`) — uses word `e % 4` of Philox4x32-10 with counter `(lo32(e/4), hi32(e/4),
//! lo32(offset), hi32(offset))` and key `(lo32(seed), hi32(seed))`, and is dropped iff `word <
//! threshold`. `threshold = 0` (p < 2⁻³², e.g. p = 0) drops nothing and `keep_scale = 0` (p = 1)
//! drops everything, both without RNG work. A mask bit depends only on `(seed, offset, e)`: not on
//! tiling, launch geometry, leading dimensions, batch splits or backend.
//!
//! **Rounding.** A kept element becomes `x̂ = to_f32(x) · keep_scale` (one f32 multiply, round to
//! nearest even), a dropped one `+0`. `dropout_forward` stores `x̂` rounded to the tensor's dtype
//! (so the cpu, emu and cuda results are bit-identical); the fused shrink feeds the f32 `x̂` into the
//! same `fmaf` chains as [`crate::shrink::shrink_dense`], so on emu and cuda it is bit-identical to
//! `shrink_dense` applied to the f32 tensor `x̂` (the cpu reference accumulates `x̂` in f64). On the
//! cpu backend an f64 tensor is scaled in f64 (`x · (keep_scale as f64)`).

use crate::adapter::MAX_SLICES;
use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::{pick_launcher, sys};
use crate::shrink::{check_x_w_dtypes, ShrinkDense};
use crate::validate::{check_dtype, check_extent, check_stride, fits_i32, span};

/// Philox multipliers and Weyl key increments (Random123).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32-10 of one counter under one key (Salmon et al., SC'11; Random123's
/// `philox4x32_R(10, …)`).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let p0 = PHILOX_M0 as u64 * c0 as u64;
        let p1 = PHILOX_M1 as u64 * c2 as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
        k0 = k0.wrapping_add(PHILOX_W0);
        k1 = k1.wrapping_add(PHILOX_W1);
    }
    [c0, c1, c2, c3]
}

/// Dropout of one target module in one step: drop probability `p`, the run's `seed` and this
/// module's `offset` (each module its own stream, as PEFT has one `nn.Dropout` per LoRA layer).
/// Fields are public; every operation validates them through [`Dropout::config`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
    pub offset: u64,
}

/// The host-computed form kernels take (DESIGN.md §2): `threshold` and `keep_scale`, never p.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutConfig {
    pub seed: u64,
    pub offset: u64,
    /// `min(⌊p · 2³²⌋, 2³² − 1)`, computed in f64.
    pub threshold: u32,
    /// `1/(1−p)` computed in f64 and rounded to f32; 0 when p = 1.
    pub keep_scale: f32,
}

impl Dropout {
    /// A validated dropout (`0 ≤ p ≤ 1`, p finite).
    pub fn new(p: f64, seed: u64, offset: u64) -> Result<Self> {
        let d = Dropout { p, seed, offset };
        d.config()?;
        Ok(d)
    }

    /// Threshold and keep scale; `Error::InvalidArgument { arg: "p" }` unless `0 ≤ p ≤ 1`.
    pub fn config(&self) -> Result<DropoutConfig> {
        let p = self.p;
        if !p.is_finite() || !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid("p", "a finite probability in [0, 1]", p));
        }
        let threshold = (p * 4_294_967_296.0).floor().min(4_294_967_295.0) as u32;
        let keep_scale = if p == 1.0 {
            0.0
        } else {
            (1.0 / (1.0 - p)) as f32
        };
        Ok(DropoutConfig {
            seed: self.seed,
            offset: self.offset,
            threshold,
            keep_scale,
        })
    }
}

impl DropoutConfig {
    /// The four Philox words of group `g` (elements `4g .. 4g + 3`).
    pub fn words(&self, group: u64) -> [u32; 4] {
        philox4x32_10(
            [
                group as u32,
                (group >> 32) as u32,
                self.offset as u32,
                (self.offset >> 32) as u32,
            ],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }

    /// Whether flat element `e` is kept (the reference mask).
    pub fn keeps(&self, e: u64) -> bool {
        if self.keep_scale == 0.0 {
            return false;
        }
        if self.threshold == 0 {
            return true;
        }
        self.words(e / 4)[(e % 4) as usize] >= self.threshold
    }

    /// `x̂` of one element: `to_f32(x) · keep_scale` rounded to f32 then to T (f64: in f64), or +0.
    pub fn apply<T: Float>(&self, x: T, keep: bool) -> T {
        if !keep {
            T::from_f32(0.0)
        } else if T::DTYPE == DType::F64 {
            T::from_f64(x.to_f64() * self.keep_scale as f64)
        } else {
            T::from_f32(x.to_f32() * self.keep_scale)
        }
    }

    /// `x̂` as the fused shrink uses it (not rounded to T): `to_f32(x) · keep_scale` in f32 (f64: in
    /// f64), or +0.
    pub fn xhat<T: Float>(&self, x: T, keep: bool) -> f64 {
        if !keep {
            0.0
        } else if T::DTYPE == DType::F64 {
            x.to_f64() * self.keep_scale as f64
        } else {
            (x.to_f32() * self.keep_scale) as f64
        }
    }

    pub(crate) fn ffi(&self) -> sys::LkDropoutConfig {
        sys::LkDropoutConfig {
            seed: self.seed,
            offset: self.offset,
            threshold: self.threshold,
            keep_scale: self.keep_scale,
        }
    }
}

/// Sizes of a standalone dropout: x and y are `[tokens, d]` with row strides `ld_x`, `ld_y`
/// (elements); row `t` is the original token `token_base + t` (a sub-batch keeps its masks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutShape {
    pub tokens: usize,
    pub d: usize,
    pub ld_x: usize,
    pub ld_y: usize,
    pub token_base: usize,
}

impl DropoutShape {
    /// Packed rows, `token_base = 0`.
    pub fn new(tokens: usize, d: usize) -> Self {
        DropoutShape {
            tokens,
            d,
            ld_x: d,
            ld_y: d,
            token_base: 0,
        }
    }

    fn validate(&self, x_len: usize, y_len: usize) -> Result<()> {
        fits_i32("tokens", self.tokens)?;
        fits_i32("d", self.d)?;
        for (arg, ld) in [("ld_x", self.ld_x), ("ld_y", self.ld_y)] {
            check_stride(arg, ld, self.d, format_args!("d = {}", self.d))?;
        }
        check_flat_index(self.token_base, self.tokens, self.d)?;
        for (arg, ld, have) in [("x", self.ld_x, x_len), ("y", self.ld_y, y_len)] {
            check_extent(
                arg,
                have,
                span(self.tokens, self.d, ld),
                format_args!("{self:?}"),
            )?;
        }
        Ok(())
    }
}

/// Every flat index `(token_base + t) · d + col` must fit int64 (the kernels' index type).
fn check_flat_index(token_base: usize, tokens: usize, d: usize) -> Result<()> {
    let end = token_base
        .checked_add(tokens)
        .and_then(|n| n.checked_mul(d.max(1)));
    match end {
        Some(e) if e <= i64::MAX as usize => Ok(()),
        _ => Err(Error::invalid(
            "token_base",
            format!("(token_base + tokens) · d ≤ i64::MAX (tokens {tokens}, d {d})"),
            token_base,
        )),
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Backward,
}

fn dropout_scale<B: Backend, T: Float>(
    backend: &B,
    dir: Direction,
    drop: &Dropout,
    x: &B::Buffer<T>,
    y: &mut B::Buffer<T>,
    shape: &DropoutShape,
) -> Result<()> {
    let cfg = drop.config()?;
    let (in_arg, out_arg) = match dir {
        Direction::Forward => ("x", "y"),
        Direction::Backward => ("dy", "dx"),
    };
    check_dtype(backend, in_arg, T::DTYPE)?;
    shape
        .validate(backend.len(x), backend.len(y))
        .map_err(|e| match e {
            Error::InvalidArgument {
                arg,
                expected,
                actual,
            } => Error::InvalidArgument {
                arg: match arg {
                    "x" => in_arg,
                    "y" => out_arg,
                    other => other,
                },
                expected,
                actual,
            },
            other => other,
        })?;
    if shape.tokens == 0 || shape.d == 0 {
        return Ok(());
    }
    let Some(launchers) = backend.launchers() else {
        let x = backend.host_slice(x).expect("host buffer");
        let y = backend.host_slice_mut(y).expect("host buffer");
        reference::dropout_scale(&cfg, x, y, shape);
        return Ok(());
    };
    let p = sys::LkDropoutParams {
        x: backend.raw_ptr(x),
        y: backend.raw_ptr_mut(y),
        ld_x: shape.ld_x as i64,
        ld_y: shape.ld_y as i64,
        token_base: shape.token_base as i64,
        drop: cfg.ffi(),
        tokens: shape.tokens as i32,
        d: shape.d as i32,
        dtype: T::DTYPE.ffi_tag().unwrap_or(-1),
    };
    let (op, f): (_, crate::ffi::Launcher<sys::LkDropoutParams>) = match dir {
        Direction::Forward => (
            "dropout_forward",
            pick_launcher!(
                launchers,
                sys::lk_emu_dropout_forward,
                sys::lk_cuda_dropout_forward
            ),
        ),
        Direction::Backward => (
            "dropout_backward",
            pick_launcher!(
                launchers,
                sys::lk_emu_dropout_backward,
                sys::lk_cuda_dropout_backward
            ),
        ),
    };
    // SAFETY: the dtype and both buffer lengths were checked against `shape` above; x and y are
    // distinct buffers (a shared and a mutable borrow).
    unsafe { crate::ffi::launch(backend, launchers, op, f, &p) }
}

/// `y[t, c] = m[t, c] · x[t, c] · keep_scale` for `t < tokens`, `c < d` (overwrite; y's padding
/// columns untouched). The mask is the one of DESIGN.md §2 (see the module docs).
pub fn dropout_forward<B: Backend, T: Float>(
    backend: &B,
    drop: &Dropout,
    x: &B::Buffer<T>,
    y: &mut B::Buffer<T>,
    shape: &DropoutShape,
) -> Result<()> {
    dropout_scale(backend, Direction::Forward, drop, x, y, shape)
}

/// `dx[t, c] = m[t, c] · dy[t, c] · keep_scale` (overwrite), the mask regenerated from the same
/// `(seed, offset, element)` as [`dropout_forward`]; `shape.ld_x` is dy's stride, `ld_y` dx's.
pub fn dropout_backward<B: Backend, T: Float>(
    backend: &B,
    drop: &Dropout,
    dy: &B::Buffer<T>,
    dx: &mut B::Buffer<T>,
    shape: &DropoutShape,
) -> Result<()> {
    dropout_scale(backend, Direction::Backward, drop, dy, dx, shape)
}

/// The training shrink with dropout fused into the load of x: `u[t, j] = Σ_k x̂[t, k] · A[j, k]`,
/// `x̂ = m ⊙ x · keep_scale` (unscaled u, f32), element `(t, k)` at flat index
/// `(token_base + t) · d_in + k`. Layout and dtypes as [`crate::shrink::shrink_dense`]; u's other
/// elements are untouched. No mask and no x̂ is written. On emu and cuda the result is bit-identical
/// to `shrink_dense` applied to the f32 tensor `x̂` (deterministic, batch-invariant); the cpu backend
/// accumulates the same f32 `x̂` in f64.
pub fn shrink_dense_dropout<B: Backend, TX: Float, TW: Float>(
    backend: &B,
    drop: &Dropout,
    x: &B::Buffer<TX>,
    a: &B::Buffer<TW>,
    u: &mut B::Buffer<f32>,
    shape: &ShrinkDense,
    token_base: usize,
) -> Result<()> {
    let cfg = drop.config()?;
    check_x_w_dtypes(backend, TX::DTYPE, TW::DTYPE)?;
    shape.validate(backend.len(x), backend.len(a), backend.len(u))?;
    check_flat_index(token_base, shape.tokens, shape.d_in)?;
    if shape.tokens == 0 || shape.rank == 0 {
        return Ok(());
    }
    let Some(launchers) = backend.launchers() else {
        let (x, a) = (
            backend.host_slice(x).expect("host buffer"),
            backend.host_slice(a).expect("host buffer"),
        );
        let u = backend.host_slice_mut(u).expect("host buffer");
        reference::shrink_dense_dropout(&cfg, x, a, u, shape, token_base);
        return Ok(());
    };
    let base = shape.ffi_params::<TX, TW>(
        backend.raw_ptr(x),
        backend.raw_ptr(a),
        backend.raw_ptr_mut(u).cast(),
    );
    let p = sys::LkShrinkDenseDropoutParams {
        x: base.x,
        a: base.a,
        u: base.u,
        ld_x: base.ld_x,
        lda: base.lda,
        ld_u: base.ld_u,
        token_base: token_base as i64,
        drop: cfg.ffi(),
        tokens: base.tokens,
        d_in: base.d_in,
        rank: base.rank,
        x_dtype: base.x_dtype,
        w_dtype: base.w_dtype,
    };
    let f = pick_launcher!(
        launchers,
        sys::lk_emu_dropout_shrink_dense,
        sys::lk_cuda_dropout_shrink_dense
    );
    // SAFETY: dtypes and every buffer length were checked against `shape` just above.
    unsafe { crate::ffi::launch(backend, launchers, "dropout_shrink_dense", f, &p) }
}

/// Plain-Rust references (the cpu backend's kernels); the mask comes from [`philox4x32_10`].
pub mod reference {
    use super::{DropoutConfig, DropoutShape};
    use crate::dtype::Float;
    use crate::shrink::ShrinkDense;

    /// `y = m ⊙ x · keep_scale`, element by element (bit-exact with the kernels).
    pub fn dropout_scale<T: Float>(cfg: &DropoutConfig, x: &[T], y: &mut [T], s: &DropoutShape) {
        for t in 0..s.tokens {
            let e0 = ((s.token_base + t) * s.d) as u64;
            for c in 0..s.d {
                let keep = cfg.keeps(e0 + c as u64);
                y[t * s.ld_y + c] = cfg.apply(x[t * s.ld_x + c], keep);
            }
        }
    }

    /// `u = x̂ · Aᵀ` with `x̂` from [`DropoutConfig::apply`] and f64 accumulation.
    pub fn shrink_dense_dropout<TX: Float, TW: Float>(
        cfg: &DropoutConfig,
        x: &[TX],
        a: &[TW],
        u: &mut [f32],
        s: &ShrinkDense,
        token_base: usize,
    ) {
        let mut xhat = vec![0.0f64; s.d_in];
        for t in 0..s.tokens {
            let e0 = ((token_base + t) * s.d_in) as u64;
            for (k, v) in xhat.iter_mut().enumerate() {
                let keep = cfg.keeps(e0 + k as u64);
                *v = cfg.xhat(x[t * s.ld_x + k], keep);
            }
            for j in 0..s.rank {
                let a_row = &a[j * s.lda..j * s.lda + s.d_in];
                let acc: f64 = xhat
                    .iter()
                    .zip(a_row)
                    .map(|(&xv, &av)| xv * av.to_f64())
                    .sum();
                u[t * s.ld_u + j] = acc as f32;
            }
        }
    }
}

/// A layer's dropout: probability, seed and one Philox offset per slice (every target module has
/// its own stream, as PEFT has one `nn.Dropout` per LoRA layer; single-slice ops use `offsets[0]`).
/// Used by the fused SGMV shrink and by the LoRA backward, which regenerates the same masks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerDropout {
    pub p: f64,
    pub seed: u64,
    pub offsets: [u64; MAX_SLICES],
}

impl LayerDropout {
    /// No dropout (`p = 0`).
    pub const NONE: LayerDropout = LayerDropout {
        p: 0.0,
        seed: 0,
        offsets: [0; MAX_SLICES],
    };

    /// The kernels' `(threshold, keep_scale)` for p (DESIGN.md §2): `Error::InvalidArgument` with
    /// `arg = "dropout.p"` unless `0 ≤ p ≤ 1`.
    pub(crate) fn ffi(&self) -> Result<(u32, f32)> {
        let c = self.config(0)?;
        Ok((c.threshold, c.keep_scale))
    }

    /// The mask of slice `slice` (its own Philox offset), exactly as the forward drew it.
    pub fn config(&self, slice: usize) -> Result<crate::dropout::DropoutConfig> {
        let d = crate::dropout::Dropout {
            p: self.p,
            seed: self.seed,
            offset: self.offsets[slice],
        };
        d.config()
            .map_err(|_| Error::invalid("dropout.p", "a finite probability in [0, 1]", self.p))
    }
}

impl Default for LayerDropout {
    fn default() -> Self {
        LayerDropout::NONE
    }
}
