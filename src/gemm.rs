//! Dense GEMM for the base projections of the reference block: `C = alpha·op(A)·op(B) + beta·C`,
//! with the transposed forms the backward needs (`y = x·Wᵀ`, `dX = dY·W`, `dW = dYᵀ·X`).
//!
//! Row-major throughout; `op(A)` is `[m, k]`, `op(B)` is `[k, n]`, `C` is `[m, n]`:
//! - `a_trans = false`: A stored `[m, k]` with row stride `lda ≥ k`; `true`: A stored `[k, m]`,
//!   `lda ≥ m` (op(A) = Aᵀ).
//! - `b_trans = false`: B stored `[k, n]` with `ldb ≥ n`; `true`: B stored `[n, k]`, `ldb ≥ k`.
//! - C: row stride `ldc ≥ n`; columns `[n, ldc)` are never touched. `beta == 0` never reads C (it
//!   may hold NaN); otherwise `C ← round(fmaf(beta, C, alpha·acc))` in f32, rounded to T once.
//!
//! Kernels (cuda/gemm.cu): f16/bf16 on tensor cores (`mma.sync` m16n8k16, f32 accumulate), f32 on
//! CUDA-core FMA. Every C element is one fixed-order reduction over k (no split-K), so results are
//! deterministic and batch-invariant: tile shapes change with m and n, the k order never does. The
//! cpu backend is the reference: f64 accumulation, also for `T = f64` (gradient checks).

use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::{pick_launcher, sys};

/// Shape, layout and scalars of one GEMM (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_trans: bool,
    pub b_trans: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    fn packed(m: usize, n: usize, k: usize, a_trans: bool, b_trans: bool) -> Self {
        Gemm {
            m,
            n,
            k,
            a_trans,
            b_trans,
            lda: if a_trans { m } else { k },
            ldb: if b_trans { k } else { n },
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `C[m,n] = A[m,k]·B[k,n]` (packed: lda = k, ldb = n, ldc = n), alpha 1, beta 0.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Self::packed(m, n, k, false, false)
    }

    /// `C[m,n] = A[m,k]·B[n,k]ᵀ` (`y = x·Wᵀ`, the forward of a linear layer; lda = k, ldb = k).
    pub fn nt(m: usize, n: usize, k: usize) -> Self {
        Self::packed(m, n, k, false, true)
    }

    /// `C[m,n] = A[k,m]ᵀ·B[k,n]` (`dW = dYᵀ·X`; lda = m, ldb = n).
    pub fn tn(m: usize, n: usize, k: usize) -> Self {
        Self::packed(m, n, k, true, false)
    }

    /// `C[m,n] = A[k,m]ᵀ·B[n,k]ᵀ` (lda = m, ldb = k).
    pub fn tt(m: usize, n: usize, k: usize) -> Self {
        Self::packed(m, n, k, true, true)
    }

    pub fn alpha(self, alpha: f32) -> Self {
        Gemm { alpha, ..self }
    }

    pub fn beta(self, beta: f32) -> Self {
        Gemm { beta, ..self }
    }

    /// `(rows, cols)` of A as stored.
    pub fn a_dims(&self) -> (usize, usize) {
        if self.a_trans {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// `(rows, cols)` of B as stored.
    pub fn b_dims(&self) -> (usize, usize) {
        if self.b_trans {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Elements A must hold: `(rows − 1)·lda + cols` (0 for an empty matrix).
    pub fn a_len(&self) -> Option<usize> {
        let (r, c) = self.a_dims();
        span(r, c, self.lda)
    }

    pub fn b_len(&self) -> Option<usize> {
        let (r, c) = self.b_dims();
        span(r, c, self.ldb)
    }

    pub fn c_len(&self) -> Option<usize> {
        span(self.m, self.n, self.ldc)
    }

    /// Everything the kernels rely on, checked against the buffers' lengths (in elements).
    fn validate(&self, a_len: usize, b_len: usize, c_len: usize) -> Result<()> {
        for (arg, v) in [("m", self.m), ("n", self.n), ("k", self.k)] {
            if v > i32::MAX as usize {
                return Err(Error::invalid(
                    arg,
                    format!("≤ {} (int32 size)", i32::MAX),
                    v,
                ));
            }
        }
        let (_, a_cols) = self.a_dims();
        let (_, b_cols) = self.b_dims();
        for (arg, ld, cols, what) in [
            (
                "lda",
                self.lda,
                a_cols,
                if self.a_trans { "m (a_trans)" } else { "k" },
            ),
            (
                "ldb",
                self.ldb,
                b_cols,
                if self.b_trans { "k (b_trans)" } else { "n" },
            ),
            ("ldc", self.ldc, self.n, "n"),
        ] {
            if ld < cols {
                return Err(Error::invalid(arg, format!("≥ {what} = {cols}"), ld));
            }
            if ld > i64::MAX as usize {
                return Err(Error::invalid(arg, "≤ i64::MAX", ld));
            }
        }
        for (arg, need, have) in [
            ("a", self.a_len(), a_len),
            ("b", self.b_len(), b_len),
            ("c", self.c_len(), c_len),
        ] {
            let need = need.ok_or_else(|| {
                Error::invalid(arg, "a matrix whose extent fits in usize", "overflow")
            })?;
            if need > i64::MAX as usize {
                return Err(Error::invalid(arg, "an extent ≤ i64::MAX elements", need));
            }
            if have < need {
                return Err(Error::invalid(
                    arg,
                    format!("a buffer of ≥ {need} elements for {self:?}"),
                    have,
                ));
            }
        }
        Ok(())
    }
}

/// Elements a row-major `[rows, cols]` matrix with stride `ld` spans.
fn span(rows: usize, cols: usize, ld: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1).checked_mul(ld)?.checked_add(cols)
}

fn check_dtype<B: Backend>(b: &B, d: DType) -> Result<()> {
    if b.supports(d) {
        Ok(())
    } else {
        Err(Error::UnsupportedDtype {
            arg: "a",
            backend: b.name(),
            actual: d,
            supported: "f32, f16, bf16 (f64 on the cpu backend only)".into(),
        })
    }
}

/// `C = alpha·op(A)·op(B) + beta·C`. op(A) = A stored `[m,k]` (row stride lda) or, with `a_trans`,
/// the transpose of A stored `[k,m]`; op(B) = B stored `[k,n]` or, with `b_trans`, the transpose of
/// B stored `[n,k]`. `beta == 0` never reads C (C may hold NaN). Deterministic: each C element is
/// one fixed-order reduction over k (no split-K atomics). Everything is validated before anything
/// runs (on error C is untouched); `m == 0` or `n == 0` returns Ok without launching, `k == 0`
/// writes `beta·C` (0 for beta 0).
pub fn gemm<B: Backend, T: Float>(
    b: &B,
    a: &B::Buffer<T>,
    bm: &B::Buffer<T>,
    c: &mut B::Buffer<T>,
    shape: &Gemm,
) -> Result<()> {
    check_dtype(b, T::DTYPE)?;
    shape.validate(b.len(a), b.len(bm), b.len(c))?;
    if shape.m == 0 || shape.n == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let (a, bm) = (
            b.host_slice(a).expect("host buffer"),
            b.host_slice(bm).expect("host buffer"),
        );
        let c = b.host_slice_mut(c).expect("host buffer");
        reference::gemm(a, bm, c, shape);
        return Ok(());
    };
    let p = sys::LkGemmParams {
        a: b.raw_ptr(a),
        b: b.raw_ptr(bm),
        c: b.raw_ptr_mut(c),
        lda: shape.lda as i64,
        ldb: shape.ldb as i64,
        ldc: shape.ldc as i64,
        m: shape.m as i32,
        n: shape.n as i32,
        k: shape.k as i32,
        a_trans: shape.a_trans as i32,
        b_trans: shape.b_trans as i32,
        alpha: shape.alpha,
        beta: shape.beta,
        dtype: T::DTYPE.ffi_tag().unwrap_or(-1),
    };
    let f = pick_launcher!(launchers, sys::lk_emu_gemm, sys::lk_cuda_gemm);
    // SAFETY: the dtype and the three buffer lengths were checked against `shape` above; C is a
    // distinct (mutably borrowed) buffer.
    unsafe { crate::ffi::launch(b, launchers, "gemm", f, &p) }
}

/// The plain-Rust reference (the cpu backend's implementation and the tests' oracle).
pub mod reference {
    use super::Gemm;
    use crate::dtype::Float;

    /// Element `(i, p)` of op(A).
    #[inline]
    pub fn op_a<T: Float>(a: &[T], s: &Gemm, i: usize, p: usize) -> T {
        if s.a_trans {
            a[p * s.lda + i]
        } else {
            a[i * s.lda + p]
        }
    }

    /// Element `(p, j)` of op(B).
    #[inline]
    pub fn op_b<T: Float>(b: &[T], s: &Gemm, p: usize, j: usize) -> T {
        if s.b_trans {
            b[j * s.ldb + p]
        } else {
            b[p * s.ldb + j]
        }
    }

    /// `C = alpha·op(A)·op(B) + beta·C` with f64 accumulation (p ascending) and f64 epilogue
    /// `alpha·acc + beta·c`, rounded to T once; beta == 0 never reads C. Only `C[i, j]` for
    /// `i < m, j < n` is written. Assumes validated sizes.
    pub fn gemm<T: Float>(a: &[T], b: &[T], c: &mut [T], s: &Gemm) {
        let (alpha, beta) = (s.alpha as f64, s.beta as f64);
        // op(B) column j gathered once per j would cost n·k extra memory; instead transpose op(B)
        // into [n, k] so the inner loop is contiguous for both operands.
        let mut bt = vec![0.0f64; s.n * s.k];
        for p in 0..s.k {
            for j in 0..s.n {
                bt[j * s.k + p] = op_b(b, s, p, j).to_f64();
            }
        }
        let mut arow = vec![0.0f64; s.k];
        for i in 0..s.m {
            for (p, v) in arow.iter_mut().enumerate() {
                *v = op_a(a, s, i, p).to_f64();
            }
            for j in 0..s.n {
                let col = &bt[j * s.k..(j + 1) * s.k];
                // fold from +0 as the kernels' accumulators do (`sum` starts at −0).
                let acc = arow.iter().zip(col).fold(0.0f64, |s, (x, y)| s + x * y);
                let dst = &mut c[i * s.ldc + j];
                let v = if s.beta == 0.0 {
                    alpha * acc
                } else {
                    alpha * acc + beta * dst.to_f64()
                };
                *dst = T::from_f64(v);
            }
        }
    }
}
