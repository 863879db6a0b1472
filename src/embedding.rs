//! Token embedding forward and deterministic backward.
//!
//! - [`embedding_forward`]: `out[t, :] = table[ids[t], :]`.
//! - [`embedding_backward`]: `d_table[v, :] = Σ_{t: ids[t] = v} d_out[t, :]`, summed in ascending t
//!   (f32 on emu/cuda, f64 in the cpu [`reference`]); rows no token uses become 0.
//!
//! Layout: ids i32 `[tokens]` (device-resident, never read on the host), table / d_table
//! `[vocab, dim]`, out / d_out `[tokens, dim]`, packed row-major. An id outside `[0, vocab)` is
//! skipped (forward: its out row is untouched; backward: it contributes nothing) and
//! [`crate::adapter::fault::INDEX`] is OR-ed into `fault[0]` (the caller zeroes it).
//!
//! The backward is deterministic: the kernels sort the token indices by id with a stable device
//! radix sort into the workspace ([`embedding_backward_workspace_bytes`]), then one warp per (vocab
//! row, column chunk) sums that row's tokens in ascending t. No float atomics.

use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::{pick_launcher, sys};

fn fits_i32(arg: &'static str, v: usize) -> Result<()> {
    if v > i32::MAX as usize {
        Err(Error::invalid(
            arg,
            format!("≤ {} (int32 size)", i32::MAX),
            v,
        ))
    } else {
        Ok(())
    }
}

fn check_len(arg: &'static str, have: usize, need: usize) -> Result<()> {
    if have < need {
        Err(Error::invalid(
            arg,
            format!("a buffer of ≥ {need} elements"),
            have,
        ))
    } else {
        Ok(())
    }
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

/// Sizes: each fits i32, `vocab · dim` and `tokens · dim` fit i64.
fn check_sizes(vocab: usize, dim: usize, tokens: usize) -> Result<()> {
    fits_i32("vocab", vocab)?;
    fits_i32("dim", dim)?;
    fits_i32("tokens", tokens)?;
    for (arg, rows) in [("vocab", vocab), ("tokens", tokens)] {
        if rows.checked_mul(dim).is_none_or(|n| n > i64::MAX as usize) {
            return Err(Error::invalid(arg, format!("{arg} · dim ≤ i64::MAX"), rows));
        }
    }
    Ok(())
}

fn check_fault<B: Backend>(b: &B, fault: &B::Buffer<u32>) -> Result<()> {
    if b.len(fault) == 0 {
        Err(Error::invalid("fault", "a buffer of ≥ 1 u32", 0))
    } else {
        Ok(())
    }
}

/// `out[t, :] = table[ids[t], :]` (overwrite); a bad id leaves row t untouched and sets
/// `fault::INDEX`.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward<B: Backend, T: Float>(
    b: &B,
    vocab: usize,
    dim: usize,
    tokens: usize,
    ids: &B::Buffer<i32>,
    table: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    check_dtype(b, "table", T::DTYPE)?;
    check_sizes(vocab, dim, tokens)?;
    check_len("ids", b.len(ids), tokens)?;
    check_len("table", b.len(table), vocab * dim)?;
    check_len("out", b.len(out), tokens * dim)?;
    check_fault(b, fault)?;
    if tokens == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let (ids, table) = (b.host_slice(ids).unwrap(), b.host_slice(table).unwrap());
        let out = b.host_slice_mut(out).unwrap();
        let fault = b.host_slice_mut(fault).unwrap();
        fault[0] |= reference::embedding_forward(vocab, dim, tokens, ids, table, out);
        return Ok(());
    };
    let p = sys::LkEmbeddingForwardParams {
        ids: b.raw_ptr(ids).cast(),
        table: b.raw_ptr(table),
        out: b.raw_ptr_mut(out),
        fault: b.raw_ptr_mut(fault).cast(),
        vocab: vocab as i32,
        dim: dim as i32,
        tokens: tokens as i32,
        dtype: T::DTYPE.ffi_tag().unwrap_or(-1),
    };
    let f = pick_launcher!(
        launchers,
        sys::lk_emu_embedding_forward,
        sys::lk_cuda_embedding_forward
    );
    // SAFETY: the dtype and every buffer length were checked above; out and fault are distinct
    // mutable borrows.
    unsafe { crate::ffi::launch(b, launchers, "embedding_forward", f, &p) }
}

fn backward_params(vocab: usize, dim: usize, tokens: usize) -> sys::LkEmbeddingBackwardParams {
    sys::LkEmbeddingBackwardParams {
        ids: std::ptr::null(),
        d_out: std::ptr::null(),
        d_table: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        fault: std::ptr::null_mut(),
        vocab: vocab as i32,
        dim: dim as i32,
        tokens: tokens as i32,
        dtype: 0,
    }
}

/// Bytes of workspace [`embedding_backward`] needs (0 on cpu): the sort's keys, values and digit
/// histograms (about `20 · tokens` bytes).
pub fn embedding_backward_workspace_bytes<B: Backend>(
    b: &B,
    vocab: usize,
    dim: usize,
    tokens: usize,
) -> usize {
    if check_sizes(vocab, dim, tokens).is_err() {
        return 0;
    }
    b.launchers().map_or(0, |l| {
        let p = backward_params(vocab, dim, tokens);
        let f = pick_launcher!(
            l,
            sys::lk_emu_embedding_backward_workspace_size,
            sys::lk_cuda_embedding_backward_workspace_size
        );
        // SAFETY: a pure function of the params' sizes.
        unsafe { f(&p) }
    })
}

/// `d_table` `[vocab, dim]` overwritten: row v = Σ of the d_out rows of the tokens with id v, in
/// ascending t (0 for unused rows); bad ids are skipped and set `fault::INDEX`.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward<B: Backend, T: Float>(
    b: &B,
    vocab: usize,
    dim: usize,
    tokens: usize,
    ids: &B::Buffer<i32>,
    d_out: &B::Buffer<T>,
    d_table: &mut B::Buffer<T>,
    workspace: &mut B::Buffer<u8>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    check_dtype(b, "d_out", T::DTYPE)?;
    check_sizes(vocab, dim, tokens)?;
    check_len("ids", b.len(ids), tokens)?;
    check_len("d_out", b.len(d_out), tokens * dim)?;
    check_len("d_table", b.len(d_table), vocab * dim)?;
    check_fault(b, fault)?;
    let need = embedding_backward_workspace_bytes(b, vocab, dim, tokens);
    if b.len(workspace) < need {
        return Err(Error::invalid(
            "workspace",
            format!("≥ {need} bytes (embedding_backward_workspace_bytes)"),
            b.len(workspace),
        ));
    }
    if tokens == 0 && vocab * dim == 0 {
        return Ok(());
    }
    let Some(launchers) = b.launchers() else {
        let (ids, d_out) = (b.host_slice(ids).unwrap(), b.host_slice(d_out).unwrap());
        let d_table = b.host_slice_mut(d_table).unwrap();
        let fault = b.host_slice_mut(fault).unwrap();
        fault[0] |= reference::embedding_backward(vocab, dim, tokens, ids, d_out, d_table);
        return Ok(());
    };
    let mut p = backward_params(vocab, dim, tokens);
    p.ids = b.raw_ptr(ids).cast();
    p.d_out = b.raw_ptr(d_out);
    p.d_table = b.raw_ptr_mut(d_table);
    p.workspace = if need == 0 {
        std::ptr::null_mut()
    } else {
        b.raw_ptr_mut(workspace)
    };
    p.fault = b.raw_ptr_mut(fault).cast();
    p.dtype = T::DTYPE.ffi_tag().unwrap_or(-1);
    let f = pick_launcher!(
        launchers,
        sys::lk_emu_embedding_backward,
        sys::lk_cuda_embedding_backward
    );
    // SAFETY: the dtype, every buffer length and the workspace size were checked above; d_table,
    // workspace and fault are distinct mutable borrows.
    unsafe { crate::ffi::launch(b, launchers, "embedding_backward", f, &p) }
}

/// Plain-Rust embedding (the cpu backend and the tests' oracle). Both functions return the fault
/// bits to OR into the error word.
pub mod reference {
    use crate::adapter::fault;
    use crate::dtype::Float;

    fn valid(id: i32, vocab: usize) -> bool {
        id >= 0 && (id as usize) < vocab
    }

    /// Row copies; a bad id leaves its row untouched.
    pub fn embedding_forward<T: Float>(
        vocab: usize,
        dim: usize,
        tokens: usize,
        ids: &[i32],
        table: &[T],
        out: &mut [T],
    ) -> u32 {
        let mut f = 0;
        for t in 0..tokens {
            let id = ids[t];
            if !valid(id, vocab) {
                f |= fault::INDEX;
                continue;
            }
            let v = id as usize;
            out[t * dim..(t + 1) * dim].copy_from_slice(&table[v * dim..(v + 1) * dim]);
        }
        f
    }

    /// f64 sums in ascending t, rounded to T once per element.
    pub fn embedding_backward<T: Float>(
        vocab: usize,
        dim: usize,
        tokens: usize,
        ids: &[i32],
        d_out: &[T],
        d_table: &mut [T],
    ) -> u32 {
        let mut f = 0;
        let mut acc = vec![0.0f64; vocab * dim];
        for t in 0..tokens {
            let id = ids[t];
            if !valid(id, vocab) {
                f |= fault::INDEX;
                continue;
            }
            let v = id as usize;
            for c in 0..dim {
                acc[v * dim + c] += d_out[t * dim + c].to_f64();
            }
        }
        for (o, a) in d_table[..vocab * dim].iter_mut().zip(&acc) {
            *o = T::from_f64(*a);
        }
        f
    }
}
