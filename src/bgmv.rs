//! BGMV (decode): batched gather matrix-vector LoRA, one adapter id per token (−1 = none), tokens
//! in any order, mixed ranks and 1–8 slices in one launch (DESIGN.md §2).
//!
//! - shrink: `u[s, t, 0:rank] = x[t] · A(id[t], s)ᵀ` (f32, unscaled);
//! - expand: `out[t, off_s : off_s + n_s] (+)= scale(id[t], s) · u[s, t, 0:rank] · B(id[t], s)ᵀ`.
//!
//! u is f32 `[n_slices, tokens, r_cap]`; its columns `[rank, r_cap)` are unspecified and never read.
//! Tokens with id −1 are untouched. Ids out of range and invalid table entries are skipped and
//! reported in the optional error word ([`crate::adapter::fault`]), never dereferenced.

use crate::adapter::{check_activation_dtype, with_weight_type, AdapterTable, ExpandMode};
use crate::backend::Backend;
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::ffi::{self, sys};
use crate::validate::{check_extent, check_matrix_len, check_stride, check_word, fits_i32};

/// One decode batch: the adapter table, each token's adapter id, and the token count.
pub struct Bgmv<'a, 'w, B: Backend> {
    table: &'a AdapterTable<'w, B>,
    token_adapter: &'a B::Buffer<i32>,
    tokens: usize,
}

pub(crate) fn check_u_len<B: Backend>(
    b: &B,
    table: &AdapterTable<B>,
    tokens: usize,
    u_len: usize,
) -> Result<()> {
    let need = table
        .n_slices()
        .checked_mul(tokens)
        .and_then(|v| v.checked_mul(table.r_cap()));
    let _ = b;
    check_extent(
        "u",
        u_len,
        need,
        format_args!(
            "[n_slices {}, tokens {tokens}, r_cap {}] f32",
            table.n_slices(),
            table.r_cap()
        ),
    )
}

pub(crate) fn check_rows(
    arg: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    ld_arg: &'static str,
) -> Result<()> {
    check_stride(ld_arg, ld, cols, cols)?;
    check_matrix_len(arg, len, rows, cols, ld)
}

pub(crate) fn check_error_word<B: Backend>(
    b: &B,
    errors: &Option<&mut B::Buffer<u32>>,
) -> Result<()> {
    match errors {
        Some(e) => check_word("error_word", b.len(&**e)),
        None => Ok(()),
    }
}

impl<'a, 'w, B: Backend> Bgmv<'a, 'w, B> {
    /// `token_adapter` holds `tokens` adapter ids (device-resident: never read on the host).
    pub fn new(
        backend: &B,
        table: &'a AdapterTable<'w, B>,
        token_adapter: &'a B::Buffer<i32>,
        tokens: usize,
    ) -> Result<Self> {
        fits_i32("tokens", tokens)?;
        if backend.len(token_adapter) < tokens {
            return Err(Error::invalid(
                "token_adapter",
                format!("≥ {tokens} ids (one per token)"),
                backend.len(token_adapter),
            ));
        }
        Ok(Bgmv {
            table,
            token_adapter,
            tokens,
        })
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `u[s, t, 0:rank] = x[t] · A(id[t], s)ᵀ` for every token with a valid adapter.
    /// x: `[tokens, d_in]` with row stride `ld_x`, in the weights' dtype or f32.
    pub fn shrink<TX: Float>(
        &self,
        b: &B,
        x: &B::Buffer<TX>,
        ld_x: usize,
        u: &mut B::Buffer<f32>,
        mut errors: Option<&mut B::Buffer<u32>>,
    ) -> Result<()> {
        let t = self.table;
        check_activation_dtype(b, "x", TX::DTYPE, t.w_dtype())?;
        check_rows("x", b.len(x), self.tokens, t.d_in(), ld_x, "ld_x")?;
        check_u_len(b, t, self.tokens, b.len(u))?;
        check_error_word(b, &errors)?;
        if self.tokens == 0 {
            return Ok(());
        }
        let Some(l) = b.launchers() else {
            let ids = b.host_slice(self.token_adapter).expect("host buffer");
            let work: Vec<(usize, i32)> = ids[..self.tokens].iter().copied().enumerate().collect();
            let x = b.host_slice(x).expect("host buffer");
            let u = b.host_slice_mut(u).expect("host buffer");
            let faults = with_weight_type!(t.w_dtype(), TW => reference::shrink::<B, TX, TW>(t, x, ld_x, u, self.tokens, &work, &crate::dropout::LayerDropout::NONE));
            return reference::report(b, errors, faults);
        };
        let error_word = errors
            .as_mut()
            .map_or(std::ptr::null_mut(), |e| b.raw_ptr_mut(e).cast());
        let p = sys::LkBgmvShrinkParams {
            x: b.raw_ptr(x),
            u: b.raw_ptr_mut(u).cast(),
            table: t.raw_table(b),
            token_adapter: b.raw_ptr(self.token_adapter).cast(),
            error_word,
            ld_x: ld_x as i64,
            tokens: self.tokens as i32,
            d_in: t.d_in() as i32,
            n_adapters: t.n_adapters() as i32,
            n_slices: t.n_slices() as i32,
            r_cap: t.r_cap() as i32,
            x_dtype: TX::DTYPE.ffi_tag().unwrap(),
            w_dtype: t.w_dtype().ffi_tag().unwrap(),
        };
        // SAFETY: every buffer length was checked above; the table's entries were checked when set.
        unsafe { ffi::launch(b, l, "bgmv_shrink", l.bgmv_shrink, &p) }
    }

    /// `out[t, off_s : off_s + n_s] (+)= scale · u[s, t, 0:rank] · B(id[t], s)ᵀ` for every token with
    /// a valid adapter. out: `[tokens, ld_out]` in the weights' dtype or f32.
    pub fn expand<TO: Float>(
        &self,
        b: &B,
        u: &B::Buffer<f32>,
        out: &mut B::Buffer<TO>,
        ld_out: usize,
        mode: ExpandMode,
        mut errors: Option<&mut B::Buffer<u32>>,
    ) -> Result<()> {
        let t = self.table;
        check_activation_dtype(b, "out", TO::DTYPE, t.w_dtype())?;
        check_rows(
            "out",
            b.len(out),
            self.tokens,
            t.out_width(),
            ld_out,
            "ld_out",
        )?;
        check_u_len(b, t, self.tokens, b.len(u))?;
        check_error_word(b, &errors)?;
        if self.tokens == 0 {
            return Ok(());
        }
        let Some(l) = b.launchers() else {
            let ids = b.host_slice(self.token_adapter).expect("host buffer");
            let work: Vec<(usize, i32)> = ids[..self.tokens].iter().copied().enumerate().collect();
            let u = b.host_slice(u).expect("host buffer");
            let out = b.host_slice_mut(out).expect("host buffer");
            let faults = with_weight_type!(t.w_dtype(), TW => reference::expand::<B, TO, TW>(t, u, out, ld_out, self.tokens, mode, &work));
            return reference::report(b, errors, faults);
        };
        let error_word = errors
            .as_mut()
            .map_or(std::ptr::null_mut(), |e| b.raw_ptr_mut(e).cast());
        let p = sys::LkBgmvExpandParams {
            u: b.raw_ptr(u).cast(),
            out: b.raw_ptr_mut(out),
            table: t.raw_table(b),
            token_adapter: b.raw_ptr(self.token_adapter).cast(),
            error_word,
            ld_out: ld_out as i64,
            slices: ffi_slices(t),
            tokens: self.tokens as i32,
            n_adapters: t.n_adapters() as i32,
            n_slices: t.n_slices() as i32,
            r_cap: t.r_cap() as i32,
            out_dtype: TO::DTYPE.ffi_tag().unwrap(),
            w_dtype: t.w_dtype().ffi_tag().unwrap(),
            mode: mode.ffi(),
        };
        // SAFETY: every buffer length was checked above; the table's entries were checked when set.
        unsafe { ffi::launch(b, l, "bgmv_expand", l.bgmv_expand, &p) }
    }
}

pub(crate) fn ffi_slices<B: Backend>(
    t: &AdapterTable<B>,
) -> [sys::LkSlice; crate::adapter::MAX_SLICES] {
    let mut s = [sys::LkSlice { n: 0, offset: 0 }; crate::adapter::MAX_SLICES];
    for (dst, src) in s.iter_mut().zip(t.slices()) {
        *dst = sys::LkSlice {
            n: src.n as i32,
            offset: src.offset as i32,
        };
    }
    s
}

/// The plain-Rust reference (the cpu backend's kernels), shared with SGMV: a list of
/// (token, adapter id) pairs to compute, f64 accumulation, one rounding per output.
pub mod reference {
    use crate::adapter::{fault, host_weights, AdapterTable, ExpandMode};
    use crate::backend::Backend;
    use crate::dtype::Float;
    use crate::error::Result;

    /// ORs `faults` into the error word (host memory).
    pub(crate) fn report<B: Backend>(
        b: &B,
        errors: Option<&mut B::Buffer<u32>>,
        faults: u32,
    ) -> Result<()> {
        if let Some(e) = errors {
            b.host_slice_mut(e).expect("host buffer")[0] |= faults;
        }
        Ok(())
    }

    /// The entry `(id, s)` if `id` names an adapter and the entry is valid; else the fault.
    fn entry<'t, B: Backend>(
        t: &'t AdapterTable<B>,
        id: i32,
        s: usize,
    ) -> std::result::Result<Option<&'t crate::ffi::sys::LkAdapterEntry>, u32> {
        if id == -1 {
            return Ok(None);
        }
        if id < -1 || id as usize >= t.n_adapters() {
            return Err(fault::ADAPTER_ID);
        }
        let e = &t.entries()[id as usize * t.n_slices() + s];
        if !t.entry_is_valid(e) {
            return Err(fault::TABLE_ENTRY);
        }
        Ok(Some(e))
    }

    /// Shrink for each `(token, id)` in `work`; returns the faults.
    /// With `drop` (the fused training shrink), slice s keeps element (tok, k) iff its mask does,
    /// and the sum of the kept products is scaled by keep_scale.
    pub fn shrink<B: Backend, TX: Float, TW: Float>(
        t: &AdapterTable<B>,
        x: &[TX],
        ld_x: usize,
        u: &mut [f32],
        tokens: usize,
        work: &[(usize, i32)],
        drop: &crate::dropout::LayerDropout,
    ) -> u32 {
        let (d_in, r_cap) = (t.d_in(), t.r_cap());
        let mut faults = 0;
        for &(tok, id) in work {
            for s in 0..t.n_slices() {
                let e = match entry(t, id, s) {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(f) => {
                        faults |= f;
                        continue;
                    }
                };
                let cfg = drop.config(s).expect("dropout validated by the caller");
                let scale = if cfg.threshold == 0 {
                    1.0
                } else {
                    cfg.keep_scale as f64
                };
                // SAFETY: a valid entry of a table built on a host backend.
                let (a, _) = unsafe { host_weights::<TW>(e, d_in, t.slices()[s].n) };
                let xr = &x[tok * ld_x..tok * ld_x + d_in];
                for j in 0..e.rank as usize {
                    let ar = &a[j * e.lda as usize..j * e.lda as usize + d_in];
                    let acc: f64 = xr
                        .iter()
                        .zip(ar)
                        .enumerate()
                        .filter(|(k, _)| cfg.threshold == 0 || cfg.keeps((tok * d_in + k) as u64))
                        .map(|(_, (&xv, &av))| xv.to_f64() * av.to_f64())
                        .sum();
                    u[(s * tokens + tok) * r_cap + j] = (scale * acc) as f32;
                }
            }
        }
        faults
    }

    /// Expand for each `(token, id)` in `work`; returns the faults.
    #[allow(clippy::too_many_arguments)]
    pub fn expand<B: Backend, TO: Float, TW: Float>(
        t: &AdapterTable<B>,
        u: &[f32],
        out: &mut [TO],
        ld_out: usize,
        tokens: usize,
        mode: ExpandMode,
        work: &[(usize, i32)],
    ) -> u32 {
        let (d_in, r_cap) = (t.d_in(), t.r_cap());
        let mut faults = 0;
        for &(tok, id) in work {
            for (s, slice) in t.slices().iter().enumerate() {
                let e = match entry(t, id, s) {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(f) => {
                        faults |= f;
                        continue;
                    }
                };
                let rank = e.rank as usize;
                if rank == 0 && mode == ExpandMode::Add {
                    continue;
                }
                // SAFETY: a valid entry of a table built on a host backend.
                let (_, bw) = unsafe { host_weights::<TW>(e, d_in, slice.n) };
                let ur = &u[(s * tokens + tok) * r_cap..(s * tokens + tok) * r_cap + rank];
                for i in 0..slice.n {
                    let br = if rank == 0 {
                        &[][..]
                    } else {
                        &bw[i * e.ldb as usize..i * e.ldb as usize + rank]
                    };
                    let acc: f64 = ur
                        .iter()
                        .zip(br)
                        .map(|(&uv, &bv)| uv as f64 * bv.to_f64())
                        .sum();
                    let delta = e.scale as f64 * acc;
                    let o = &mut out[tok * ld_out + slice.offset + i];
                    *o = match mode {
                        ExpandMode::Add => TO::from_f64(o.to_f64() + delta),
                        ExpandMode::Overwrite => TO::from_f64(delta),
                    };
                }
            }
        }
        faults
    }
}
