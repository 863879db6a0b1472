//! Fused softmax cross-entropy (forward and backward) and row argmax (issue #7; `cuda/loss.cu`).
//!
//! - [`cross_entropy_forward`]: per row r of `logits [rows, vocab]`, `lse[r] = logsumexp(logits[r,
//!   :])` (natural log) and `losses[r] = lse[r] − logits[r, targets[r]]`, both f32. A target of −1
//!   is *ignored* (`losses[r] = 0`); any other target outside `[0, vocab)` also gives `losses[r] =
//!   0` and ORs [`crate::adapter::fault::INDEX`] into `fault[0]`. `lse[r]` is written for every row
//!   (ignored or not). No probabilities are stored.
//! - [`cross_entropy_backward`]: `d_logits[r, c] = d_loss · (exp(logits[r, c] − lse[r]) − [c ==
//!   targets[r]])` (overwrite), the softmax recomputed from the saved `lse`; ignored and
//!   out-of-range rows are written as zeros (the forward already reported the fault).
//! - [`argmax_rows`]: `out[r]` = the *first* index of the maximum of `x[r, :]`, where NaN compares
//!   larger than everything (so a row containing NaN gives the index of its first NaN) and −0 ==
//!   +0 (the first of them wins). Integer results: bit-exact on every backend.
//!
//! **Arithmetic.** Kernels (emu, cuda) read T and compute in f32: an online max / sum-of-exp per
//! thread over a fixed set of elements, then a fixed-order shuffle tree, `lse = max + ln(sum)`
//! (`expf`, `logf`). The cpu reference computes in f64 and rounds `lse` and the loss to f32 once.
//! The backward reference uses the *given* f32 `lse` (as the kernels do), so with f64 logits its
//! softmax is exact to ~|lse|·2⁻²⁴ relative.
//!
//! **Non-finite logits.** A row containing NaN or +inf, or made only of −inf, has `lse = NaN` (and
//! a NaN loss unless ignored) on every backend; its backward row is NaN too.
//!
//! **Sizes.** `rows` and `vocab` (`cols`) must fit int32; `vocab ≥ 1` whenever `rows > 0` (a
//! softmax or a maximum over nothing does not exist). `rows == 0` returns Ok without launching.
//! Determinism: the reduction order depends only on `vocab` (never on `rows`, the row's position
//! or buffer alignment), so results are deterministic and batch-invariant.

use crate::backend::Backend;
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::validate::{check_dtype, check_fault, check_len, elems_i64, fits_i32};

/// rows, cols fit int32, cols ≥ 1 when rows > 0, rows·cols fits int64; returns rows·cols.
fn check_matrix(rows: usize, cols: usize, cols_arg: &'static str) -> Result<usize> {
    fits_i32("rows", rows)?;
    fits_i32(cols_arg, cols)?;
    if rows > 0 && cols == 0 {
        return Err(Error::invalid(cols_arg, "≥ 1 when rows > 0", cols));
    }
    elems_i64("rows", rows, cols)
}

/// Per row: `lse[r] = logsumexp(logits[r, :])`, `losses[r] = lse[r] − logits[r, targets[r]]` (f32
/// overwrite; see the module docs for ignored (−1) and out-of-range targets, which set
/// [`crate::adapter::fault::INDEX`] in `fault[0]`). logits `[rows, vocab]`, targets i32 `[rows]`,
/// losses and lse `[rows]`, fault `[≥ 1]` (caller-zeroed error word).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward<B: Backend, T: Float>(
    b: &B,
    rows: usize,
    vocab: usize,
    logits: &B::Buffer<T>,
    targets: &B::Buffer<i32>,
    losses: &mut B::Buffer<f32>,
    lse: &mut B::Buffer<f32>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    check_dtype(b, "logits", T::DTYPE)?;
    let n = check_matrix(rows, vocab, "vocab")?;
    check_len("logits", b.len(logits), n)?;
    check_len("targets", b.len(targets), rows)?;
    check_len("losses", b.len(losses), rows)?;
    check_len("lse", b.len(lse), rows)?;
    check_fault(b, fault)?;
    if rows == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let logits = b.host_slice(logits).expect("host buffer");
        let targets = b.host_slice(targets).expect("host buffer");
        let losses = b.host_slice_mut(losses).expect("host buffer");
        let lse = b.host_slice_mut(lse).expect("host buffer");
        let fault = b.host_slice_mut(fault).expect("host buffer");
        reference::cross_entropy_forward(rows, vocab, logits, targets, losses, lse, &mut fault[0]);
        return Ok(());
    };
    kernels::cross_entropy_forward(
        b, launchers, rows, vocab, logits, targets, losses, lse, fault,
    )
}

/// `d_logits[r, c] = d_loss · (softmax(logits[r])[c] − [c == targets[r]])` (overwrite), the
/// softmax recomputed as `exp(logits − lse[r])` from the forward's `lse`; rows whose target is −1
/// or out of range are written as zeros. `d_loss` (finite) is the same for every row, e.g.
/// `1 / n_valid` for a mean.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward<B: Backend, T: Float>(
    b: &B,
    rows: usize,
    vocab: usize,
    logits: &B::Buffer<T>,
    targets: &B::Buffer<i32>,
    lse: &B::Buffer<f32>,
    d_loss: f32,
    d_logits: &mut B::Buffer<T>,
) -> Result<()> {
    check_dtype(b, "logits", T::DTYPE)?;
    let n = check_matrix(rows, vocab, "vocab")?;
    if !d_loss.is_finite() {
        return Err(Error::invalid("d_loss", "a finite value", d_loss));
    }
    check_len("logits", b.len(logits), n)?;
    check_len("targets", b.len(targets), rows)?;
    check_len("lse", b.len(lse), rows)?;
    check_len("d_logits", b.len(d_logits), n)?;
    if rows == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let logits = b.host_slice(logits).expect("host buffer");
        let targets = b.host_slice(targets).expect("host buffer");
        let lse = b.host_slice(lse).expect("host buffer");
        let d_logits = b.host_slice_mut(d_logits).expect("host buffer");
        reference::cross_entropy_backward(rows, vocab, logits, targets, lse, d_loss, d_logits);
        return Ok(());
    };
    kernels::cross_entropy_backward(
        b, launchers, rows, vocab, logits, targets, lse, d_loss, d_logits,
    )
}

/// `out[r]` = the first index of the maximum of `x[r, :]` (NaN larger than everything); x `[rows,
/// cols]`, out i32 `[rows]` (overwrite).
pub fn argmax_rows<B: Backend, T: Float>(
    b: &B,
    rows: usize,
    cols: usize,
    x: &B::Buffer<T>,
    out: &mut B::Buffer<i32>,
) -> Result<()> {
    check_dtype(b, "x", T::DTYPE)?;
    let n = check_matrix(rows, cols, "cols")?;
    check_len("x", b.len(x), n)?;
    check_len("out", b.len(out), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let x = b.host_slice(x).expect("host buffer");
        let out = b.host_slice_mut(out).expect("host buffer");
        reference::argmax_rows(rows, cols, x, out);
        return Ok(());
    };
    kernels::argmax_rows(b, launchers, rows, cols, x, out)
}

/// The emu/cuda dispatch (sizes, lengths and dtypes already validated by the callers).
mod kernels {
    use super::*;
    use crate::ffi::{pick_launcher, sys, Launchers};

    fn tag<T: Float>() -> i32 {
        T::DTYPE.ffi_tag().unwrap_or(-1)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn cross_entropy_forward<B: Backend, T: Float>(
        b: &B,
        l: &'static Launchers,
        rows: usize,
        vocab: usize,
        logits: &B::Buffer<T>,
        targets: &B::Buffer<i32>,
        losses: &mut B::Buffer<f32>,
        lse: &mut B::Buffer<f32>,
        fault: &mut B::Buffer<u32>,
    ) -> Result<()> {
        let p = sys::LkCrossEntropyForwardParams {
            logits: b.raw_ptr(logits),
            targets: b.raw_ptr(targets).cast(),
            losses: b.raw_ptr_mut(losses).cast(),
            lse: b.raw_ptr_mut(lse).cast(),
            fault: b.raw_ptr_mut(fault).cast(),
            rows: rows as i32,
            vocab: vocab as i32,
            dtype: tag::<T>(),
        };
        let f = pick_launcher!(
            l,
            sys::lk_emu_loss_cross_entropy_forward,
            sys::lk_cuda_loss_cross_entropy_forward
        );
        // SAFETY: dtype and every buffer length were checked against (rows, vocab) by the caller;
        // the outputs are distinct mutable borrows.
        unsafe { crate::ffi::launch(b, l, "loss_cross_entropy_forward", f, &p) }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn cross_entropy_backward<B: Backend, T: Float>(
        b: &B,
        l: &'static Launchers,
        rows: usize,
        vocab: usize,
        logits: &B::Buffer<T>,
        targets: &B::Buffer<i32>,
        lse: &B::Buffer<f32>,
        d_loss: f32,
        d_logits: &mut B::Buffer<T>,
    ) -> Result<()> {
        let p = sys::LkCrossEntropyBackwardParams {
            logits: b.raw_ptr(logits),
            targets: b.raw_ptr(targets).cast(),
            lse: b.raw_ptr(lse).cast(),
            d_logits: b.raw_ptr_mut(d_logits),
            rows: rows as i32,
            vocab: vocab as i32,
            d_loss,
            dtype: tag::<T>(),
        };
        let f = pick_launcher!(
            l,
            sys::lk_emu_loss_cross_entropy_backward,
            sys::lk_cuda_loss_cross_entropy_backward
        );
        // SAFETY: as above.
        unsafe { crate::ffi::launch(b, l, "loss_cross_entropy_backward", f, &p) }
    }

    pub(super) fn argmax_rows<B: Backend, T: Float>(
        b: &B,
        l: &'static Launchers,
        rows: usize,
        cols: usize,
        x: &B::Buffer<T>,
        out: &mut B::Buffer<i32>,
    ) -> Result<()> {
        let p = sys::LkArgmaxRowsParams {
            x: b.raw_ptr(x),
            out: b.raw_ptr_mut(out).cast(),
            rows: rows as i32,
            cols: cols as i32,
            dtype: tag::<T>(),
        };
        let f = pick_launcher!(
            l,
            sys::lk_emu_loss_argmax_rows,
            sys::lk_cuda_loss_argmax_rows
        );
        // SAFETY: as above.
        unsafe { crate::ffi::launch(b, l, "loss_argmax_rows", f, &p) }
    }
}

/// Plain-Rust references (the cpu backend's kernels and the tests' oracle): f64 arithmetic, generic
/// over T including f64.
pub mod reference {
    use crate::adapter::fault;
    use crate::dtype::Float;

    /// Natural-log log-sum-exp of one row in f64 (`max + ln Σ exp(x − max)`; NaN for a row with NaN
    /// or +inf, or made only of −inf, as the kernels). `row` must not be empty.
    pub fn row_lse<T: Float>(row: &[T]) -> f64 {
        let max = row
            .iter()
            .map(|v| v.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (v.to_f64() - max).exp()).sum();
        max + sum.ln()
    }

    /// Whether `target` selects a class of a `vocab`-wide row.
    pub fn target_valid(target: i32, vocab: usize) -> bool {
        target >= 0 && (target as usize) < vocab
    }

    /// `(loss, lse)` of one row in f64: loss 0 for an ignored (−1) or out-of-range target.
    pub fn row_loss<T: Float>(row: &[T], target: i32) -> (f64, f64) {
        let lse = row_lse(row);
        let loss = if target_valid(target, row.len()) {
            lse - row[target as usize].to_f64()
        } else {
            0.0
        };
        (loss, lse)
    }

    /// The forward: lse and loss per row in f64, rounded once to f32; out-of-range targets other
    /// than −1 set [`fault::INDEX`].
    pub fn cross_entropy_forward<T: Float>(
        rows: usize,
        vocab: usize,
        logits: &[T],
        targets: &[i32],
        losses: &mut [f32],
        lse: &mut [f32],
        fault_word: &mut u32,
    ) {
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let t = targets[r];
            if t != -1 && !target_valid(t, vocab) {
                *fault_word |= fault::INDEX;
            }
            let (l, s) = row_loss(row, t);
            losses[r] = l as f32;
            lse[r] = s as f32;
        }
    }

    /// The backward: `d_loss · (exp(x − lse) − onehot)` in f64 from the given f32 `lse`, rounded
    /// once to T; zero rows for ignored / out-of-range targets.
    pub fn cross_entropy_backward<T: Float>(
        rows: usize,
        vocab: usize,
        logits: &[T],
        targets: &[i32],
        lse: &[f32],
        d_loss: f32,
        d_logits: &mut [T],
    ) {
        let scale = d_loss as f64;
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let out = &mut d_logits[r * vocab..(r + 1) * vocab];
            let t = targets[r];
            if !target_valid(t, vocab) {
                out.fill(T::from_f64(0.0));
                continue;
            }
            let s = lse[r] as f64;
            for (c, (o, x)) in out.iter_mut().zip(row).enumerate() {
                let onehot = if c == t as usize { 1.0 } else { 0.0 };
                *o = T::from_f64(scale * ((x.to_f64() - s).exp() - onehot));
            }
        }
    }

    /// Whether `a` ranks above `b` for argmax: NaN above everything, otherwise `>` (so −0 == +0).
    pub fn ranks_above(a: f64, b: f64) -> bool {
        if b.is_nan() {
            false
        } else {
            a.is_nan() || a > b
        }
    }

    /// First index of the maximum of each row (NaN larger than everything).
    pub fn argmax_rows<T: Float>(rows: usize, cols: usize, x: &[T], out: &mut [i32]) {
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let mut best = 0usize;
            for c in 1..cols {
                if ranks_above(row[c].to_f64(), row[best].to_f64()) {
                    best = c;
                }
            }
            out[r] = best as i32;
        }
    }
}
