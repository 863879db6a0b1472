//! Causal attention over packed variable-length sequences with grouped KV heads (training forward
//! and backward), the KV-cache write, and single-token decode over the cache (issue #7).
//!
//! **Layout** (as flash-attn's varlen API): q `[tokens, n_heads·head_dim]`, k and v
//! `[tokens, n_kv_heads·head_dim]`, row-major and packed — the rows are exactly the q/k/v projection
//! outputs. Query head `h` uses kv head `h / (n_heads / n_kv_heads)`. The sequences of a batch are
//! the row ranges `[s_i, s_{i+1})` of `seq_starts` (`n_seqs + 1` device-resident i32 entries, `0 =
//! s_0 ≤ s_1 ≤ … ≤ s_n = tokens`); attention is causal within each sequence and never crosses one.
//! Scores are `scale · q·k` (`scale` usually `1/sqrt(head_dim)`).
//!
//! **Device-resident indices.** `seq_starts` is read on the device only. Sequence `i` is *valid*
//! iff `0 ≤ s_0 ≤ s_1 ≤ … ≤ s_{i+1} ≤ tokens` (the whole prefix non-decreasing, so no two valid
//! sequences overlap) and `s_{i+1} − s_i ≤ max_seq_len`. An invalid sequence is skipped (its rows
//! of every output untouched) and [`crate::adapter::fault::INDEX`] is OR-ed into `fault[0]`;
//! `s_0 ≠ 0` or `s_n ≠ tokens` is flagged too (rows outside every sequence are untouched). The same
//! for the decode's `kv_start`/`kv_len` and the cache write's `slots`. `fault` is caller-zeroed;
//! kernels only OR bits into it.
//!
//! **Numerics.** Kernels (emu, cuda) store T ∈ {f32, f16, bf16} and compute in f32: an online
//! (flash-style) softmax in the exp2 domain with a running max and sum per row, so no `T × T` matrix
//! ever reaches global memory; `lse` (natural log, f32) is saved for the backward, which recomputes
//! the probabilities from it. The cpu backend (also f64) is the oracle: plain softmax attention in
//! f64 (see [`reference`]). Every reduction has a fixed order: results are bit-identical run to run
//! and under any emulator schedule.
//!
//! **Backward.** `D = rowsum(dO ∘ O)` goes to the workspace, then one kernel computes dq (per query
//! block, key blocks in increasing order) and one dk/dv (per key block of a kv head: the group's
//! query heads in increasing order, each over its query blocks in increasing order): no float
//! atomics.

use std::ffi::c_void;

use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::{self, pick_launcher, sys};
use crate::validate::{check_dtype, check_fault, check_len, check_workspace, elems_i64, fits_i32};

/// Head dimensions the kernels are instantiated for.
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Keys per decode split (flash-decoding): fixed, so a sequence's result never depends on
/// `max_kv_len` or on the other sequences of the batch.
pub const DECODE_CHUNK: usize = 256;

/// Head configuration of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies every score `q·k`; usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

impl Attention {
    /// `scale = 1/sqrt(head_dim)` (computed in f64, rounded to f32).
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Attention {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: (1.0 / (head_dim.max(1) as f64).sqrt()) as f32,
        }
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads.max(1)
    }

    /// Elements of one q (or out) row: `n_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Elements of one k (or v) row: `n_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    fn validate(&self) -> Result<()> {
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::invalid(
                "head_dim",
                "one of 16, 32, 64, 128",
                self.head_dim,
            ));
        }
        if self.n_kv_heads == 0 {
            return Err(Error::invalid("n_kv_heads", "≥ 1", 0));
        }
        if self.n_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::invalid(
                "n_heads",
                format!("a positive multiple of n_kv_heads = {}", self.n_kv_heads),
                self.n_heads,
            ));
        }
        if self.n_heads > 65535 {
            return Err(Error::invalid("n_heads", "≤ 65535", self.n_heads));
        }
        if self.n_heads * self.head_dim > i32::MAX as usize {
            return Err(Error::invalid(
                "n_heads",
                "n_heads · head_dim ≤ i32::MAX",
                self.n_heads,
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid("scale", "a finite value", self.scale));
        }
        Ok(())
    }
}

/// The packed batch: `seq_starts` (`n_seqs + 1` i32 entries on the device), the total row count
/// and a host-known bound on the sequence lengths (it sizes the grid; longer sequences are
/// skipped and flagged).
pub struct AttentionBatch<'a, B: Backend> {
    pub seq_starts: &'a B::Buffer<i32>,
    pub n_seqs: usize,
    pub tokens: usize,
    pub max_seq_len: usize,
}

impl<B: Backend> AttentionBatch<'_, B> {
    fn validate(&self, b: &B) -> Result<()> {
        fits_i32("tokens", self.tokens)?;
        if self.n_seqs >= i32::MAX as usize {
            return Err(Error::invalid("n_seqs", "< i32::MAX", self.n_seqs));
        }
        check_len("seq_starts", b.len(self.seq_starts), self.n_seqs + 1)?;
        Ok(())
    }

    /// `max_seq_len` clamped to `tokens` (a longer sequence cannot be valid anyway).
    fn max_len(&self) -> usize {
        self.max_seq_len.min(self.tokens)
    }
}

fn tag(d: DType) -> i32 {
    d.ffi_tag().unwrap_or(-1)
}

fn host<'b, B: Backend, T: crate::dtype::Element>(b: &B, buf: &'b B::Buffer<T>) -> &'b [T] {
    b.host_slice(buf).expect("host buffer")
}

fn or_fault<B: Backend>(b: &B, fault: &mut B::Buffer<u32>, bits: u32) {
    b.host_slice_mut(fault).expect("host buffer")[0] |= bits;
}

fn reference_batch<'a, B: Backend>(
    b: &B,
    batch: &'a AttentionBatch<'a, B>,
) -> reference::Batch<'a> {
    reference::Batch {
        seq_starts: host(b, batch.seq_starts),
        n_seqs: batch.n_seqs,
        tokens: batch.tokens,
        max_seq_len: batch.max_seq_len,
    }
}

/// Validates what forward and backward share; returns (q elements, kv elements, lse elements).
fn validate_common<B: Backend, T: Float>(
    b: &B,
    shape: &Attention,
    batch: &AttentionBatch<'_, B>,
) -> Result<(usize, usize, usize)> {
    check_dtype(b, "q", T::DTYPE)?;
    shape.validate()?;
    batch.validate(b)?;
    Ok((
        elems_i64("tokens", batch.tokens, shape.q_dim())?,
        elems_i64("tokens", batch.tokens, shape.kv_dim())?,
        elems_i64("tokens", batch.tokens, shape.n_heads)?,
    ))
}

/// Causal attention forward. `out [tokens, n_heads·head_dim]` overwrite; `lse [tokens, n_heads]`
/// f32 overwrite: the natural-log log-sum-exp of the row's scaled scores, saved for
/// [`attention_backward`]. Online softmax; no `T × T` matrix in global memory. Rows of invalid
/// sequences (module docs) are untouched and flagged in `fault[0]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<B: Backend, T: Float>(
    b: &B,
    shape: &Attention,
    batch: &AttentionBatch<'_, B>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    lse: &mut B::Buffer<f32>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    let (nq, nkv, nl) = validate_common::<B, T>(b, shape, batch)?;
    check_len("q", b.len(q), nq)?;
    check_len("k", b.len(k), nkv)?;
    check_len("v", b.len(v), nkv)?;
    check_len("out", b.len(out), nq)?;
    check_len("lse", b.len(lse), nl)?;
    check_fault(b, fault)?;
    if batch.tokens == 0 || batch.n_seqs == 0 {
        return Ok(());
    }
    let Some(l) = b.launchers() else {
        let bits = reference::forward(
            shape,
            &reference_batch(b, batch),
            host(b, q),
            host(b, k),
            host(b, v),
            b.host_slice_mut(out).expect("host buffer"),
            b.host_slice_mut(lse).expect("host buffer"),
        );
        or_fault(b, fault, bits);
        return Ok(());
    };
    let p = sys::LkAttentionForwardParams {
        q: b.raw_ptr(q),
        k: b.raw_ptr(k),
        v: b.raw_ptr(v),
        out: b.raw_ptr_mut(out),
        lse: b.raw_ptr_mut(lse).cast(),
        seq_starts: b.raw_ptr(batch.seq_starts).cast(),
        fault: b.raw_ptr_mut(fault).cast(),
        scale: shape.scale,
        tokens: batch.tokens as i32,
        n_seqs: batch.n_seqs as i32,
        max_seq_len: batch.max_len() as i32,
        n_heads: shape.n_heads as i32,
        n_kv_heads: shape.n_kv_heads as i32,
        head_dim: shape.head_dim as i32,
        dtype: tag(T::DTYPE),
    };
    let f = pick_launcher!(
        l,
        sys::lk_emu_attention_forward,
        sys::lk_cuda_attention_forward
    );
    // SAFETY: the dtype and every buffer length were checked against the shape and batch above.
    unsafe { ffi::launch(b, l, "attention_forward", f, &p) }
}

#[allow(clippy::too_many_arguments)]
fn backward_params<B: Backend>(
    shape: &Attention,
    batch: &AttentionBatch<'_, B>,
    ptrs: [*const c_void; 6],
    outs: [*mut c_void; 3],
    workspace: *mut c_void,
    seq_starts: *const c_void,
    fault: *mut c_void,
    dtype: DType,
) -> sys::LkAttentionBackwardParams {
    sys::LkAttentionBackwardParams {
        q: ptrs[0],
        k: ptrs[1],
        v: ptrs[2],
        out: ptrs[3],
        lse: ptrs[4].cast(),
        d_out: ptrs[5],
        dq: outs[0],
        dk: outs[1],
        dv: outs[2],
        workspace,
        seq_starts: seq_starts.cast(),
        fault: fault.cast(),
        scale: shape.scale,
        tokens: batch.tokens.min(i32::MAX as usize) as i32,
        n_seqs: batch.n_seqs.min(i32::MAX as usize) as i32,
        max_seq_len: batch.max_len().min(i32::MAX as usize) as i32,
        n_heads: shape.n_heads.min(i32::MAX as usize) as i32,
        n_kv_heads: shape.n_kv_heads.min(i32::MAX as usize) as i32,
        head_dim: shape.head_dim.min(i32::MAX as usize) as i32,
        dtype: tag(dtype),
    }
}

/// Bytes of workspace [`attention_backward`] needs (0 on cpu): `D = rowsum(dO ∘ O)`, f32
/// `[tokens, n_heads]`.
pub fn attention_backward_workspace_bytes<B: Backend>(
    b: &B,
    shape: &Attention,
    batch: &AttentionBatch<'_, B>,
) -> usize {
    b.launchers().map_or(0, |l| {
        let null = std::ptr::null();
        let nullm = std::ptr::null_mut();
        let p = backward_params(
            shape,
            batch,
            [null; 6],
            [nullm; 3],
            nullm,
            null,
            nullm,
            DType::F32,
        );
        let f = pick_launcher!(
            l,
            sys::lk_emu_attention_backward_workspace_size,
            sys::lk_cuda_attention_backward_workspace_size
        );
        // SAFETY: a pure function of the params' sizes.
        unsafe { f(&p) }
    })
}

/// Causal attention backward: dq, dk, dv overwrite (shapes of q, k, v; rows of valid sequences).
/// `out` and `lse` are the forward's. Deterministic (module docs); `workspace` ≥
/// [`attention_backward_workspace_bytes`] bytes, 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<B: Backend, T: Float>(
    b: &B,
    shape: &Attention,
    batch: &AttentionBatch<'_, B>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &B::Buffer<T>,
    lse: &B::Buffer<f32>,
    d_out: &B::Buffer<T>,
    dq: &mut B::Buffer<T>,
    dk: &mut B::Buffer<T>,
    dv: &mut B::Buffer<T>,
    workspace: &mut B::Buffer<u8>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    let (nq, nkv, nl) = validate_common::<B, T>(b, shape, batch)?;
    check_len("q", b.len(q), nq)?;
    check_len("k", b.len(k), nkv)?;
    check_len("v", b.len(v), nkv)?;
    check_len("out", b.len(out), nq)?;
    check_len("lse", b.len(lse), nl)?;
    check_len("d_out", b.len(d_out), nq)?;
    check_len("dq", b.len(dq), nq)?;
    check_len("dk", b.len(dk), nkv)?;
    check_len("dv", b.len(dv), nkv)?;
    let need = attention_backward_workspace_bytes(b, shape, batch);
    check_workspace(b.len(workspace), need, "attention_backward_workspace_bytes")?;
    check_fault(b, fault)?;
    if batch.tokens == 0 || batch.n_seqs == 0 {
        return Ok(());
    }
    let Some(l) = b.launchers() else {
        let bits = reference::backward(
            shape,
            &reference_batch(b, batch),
            reference::Saved {
                q: host(b, q),
                k: host(b, k),
                v: host(b, v),
                d_out: host(b, d_out),
            },
            b.host_slice_mut(dq).expect("host buffer"),
            b.host_slice_mut(dk).expect("host buffer"),
            b.host_slice_mut(dv).expect("host buffer"),
        );
        or_fault(b, fault, bits);
        return Ok(());
    };
    let p = backward_params(
        shape,
        batch,
        [
            b.raw_ptr(q),
            b.raw_ptr(k),
            b.raw_ptr(v),
            b.raw_ptr(out),
            b.raw_ptr(lse),
            b.raw_ptr(d_out),
        ],
        [b.raw_ptr_mut(dq), b.raw_ptr_mut(dk), b.raw_ptr_mut(dv)],
        ffi::workspace_ptr(b, workspace, need),
        b.raw_ptr(batch.seq_starts),
        b.raw_ptr_mut(fault),
        T::DTYPE,
    );
    let f = pick_launcher!(
        l,
        sys::lk_emu_attention_backward,
        sys::lk_cuda_attention_backward
    );
    // SAFETY: the dtype, every buffer length and the workspace size were checked above.
    unsafe { ffi::launch(b, l, "attention_backward", f, &p) }
}

/// KV-cache write: row `t` of `rows` (`[tokens, kv_dim]`) to row `slots[t]` of `cache`
/// (`[cache_rows, kv_dim]`, `cache_rows = len(cache) / kv_dim`). A slot outside `[0, cache_rows)`
/// is skipped and flagged. Slots should be distinct: with duplicates one of the rows lands
/// (on the cpu backend the last; on the GPU unspecified).
pub fn kv_cache_write<B: Backend, T: Float>(
    b: &B,
    kv_dim: usize,
    tokens: usize,
    rows: &B::Buffer<T>,
    slots: &B::Buffer<i32>,
    cache: &mut B::Buffer<T>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    check_dtype(b, "rows", T::DTYPE)?;
    if kv_dim == 0 {
        return Err(Error::invalid("kv_dim", "≥ 1", 0));
    }
    fits_i32("kv_dim", kv_dim)?;
    fits_i32("tokens", tokens)?;
    check_len("rows", b.len(rows), elems_i64("tokens", tokens, kv_dim)?)?;
    check_len("slots", b.len(slots), tokens)?;
    check_fault(b, fault)?;
    let cache_rows = b.len(cache) / kv_dim;
    if tokens == 0 {
        return Ok(());
    }
    let Some(l) = b.launchers() else {
        let bits = reference::kv_cache_write(
            kv_dim,
            tokens,
            host(b, rows),
            host(b, slots),
            b.host_slice_mut(cache).expect("host buffer"),
        );
        or_fault(b, fault, bits);
        return Ok(());
    };
    let p = sys::LkKvCacheWriteParams {
        rows: b.raw_ptr(rows),
        slots: b.raw_ptr(slots).cast(),
        cache: b.raw_ptr_mut(cache),
        fault: b.raw_ptr_mut(fault).cast(),
        cache_rows: cache_rows as i64,
        kv_dim: kv_dim as i32,
        tokens: tokens as i32,
        dtype: tag(T::DTYPE),
    };
    let f = pick_launcher!(
        l,
        sys::lk_emu_attention_kv_cache_write,
        sys::lk_cuda_attention_kv_cache_write
    );
    // SAFETY: dtype and buffer lengths checked; cache_rows is derived from the cache's length.
    unsafe { ffi::launch(b, l, "kv_cache_write", f, &p) }
}

fn decode_params(
    shape: &Attention,
    n_seqs: usize,
    max_kv_len: usize,
    cache_rows: usize,
    dtype: DType,
) -> sys::LkAttentionDecodeParams {
    sys::LkAttentionDecodeParams {
        q: std::ptr::null(),
        k_cache: std::ptr::null(),
        v_cache: std::ptr::null(),
        kv_start: std::ptr::null(),
        kv_len: std::ptr::null(),
        out: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        fault: std::ptr::null_mut(),
        cache_rows: cache_rows.min(i64::MAX as usize) as i64,
        scale: shape.scale,
        n_seqs: n_seqs.min(i32::MAX as usize) as i32,
        max_kv_len: max_kv_len.min(i32::MAX as usize) as i32,
        n_heads: shape.n_heads.min(i32::MAX as usize) as i32,
        n_kv_heads: shape.n_kv_heads.min(i32::MAX as usize) as i32,
        head_dim: shape.head_dim.min(i32::MAX as usize) as i32,
        dtype: tag(dtype),
    }
}

/// Bytes of workspace [`attention_decode`] needs (0 on cpu, and 0 when `max_kv_len ≤`
/// [`DECODE_CHUNK`]): per (sequence, head, split) the partial max, sum and output row, f32.
pub fn attention_decode_workspace_bytes<B: Backend>(
    b: &B,
    shape: &Attention,
    n_seqs: usize,
    max_kv_len: usize,
) -> usize {
    b.launchers().map_or(0, |l| {
        let p = decode_params(shape, n_seqs, max_kv_len, usize::MAX, DType::F32);
        let f = pick_launcher!(
            l,
            sys::lk_emu_attention_decode_workspace_size,
            sys::lk_cuda_attention_decode_workspace_size
        );
        // SAFETY: a pure function of the params' sizes.
        unsafe { f(&p) }
    })
}

/// Decode: one query row per sequence, `q [n_seqs, n_heads·head_dim]`; sequence `i` attends (no
/// mask) to cache rows `[kv_start[i], kv_start[i] + kv_len[i])` of `k_cache`/`v_cache`
/// (`[cache_rows, n_kv_heads·head_dim]`, `cache_rows = len(k_cache) / kv_dim`, v_cache at least as
/// long). Out of range (negative, longer than `max_kv_len`, past the cache) → the row is untouched
/// and flagged; `kv_len 0` → zeros. `out [n_seqs, n_heads·head_dim]` overwrite. Keys are split in
/// chunks of [`DECODE_CHUNK`] (flash-decoding) with a fixed-order combine.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<B: Backend, T: Float>(
    b: &B,
    shape: &Attention,
    n_seqs: usize,
    max_kv_len: usize,
    q: &B::Buffer<T>,
    k_cache: &B::Buffer<T>,
    v_cache: &B::Buffer<T>,
    kv_start: &B::Buffer<i32>,
    kv_len: &B::Buffer<i32>,
    out: &mut B::Buffer<T>,
    workspace: &mut B::Buffer<u8>,
    fault: &mut B::Buffer<u32>,
) -> Result<()> {
    check_dtype(b, "q", T::DTYPE)?;
    shape.validate()?;
    fits_i32("n_seqs", n_seqs)?;
    fits_i32("max_kv_len", max_kv_len)?;
    let nq = elems_i64("n_seqs", n_seqs, shape.q_dim())?;
    check_len("q", b.len(q), nq)?;
    let cache_rows = b.len(k_cache) / shape.kv_dim();
    check_len("v_cache", b.len(v_cache), cache_rows * shape.kv_dim())?;
    check_len("kv_start", b.len(kv_start), n_seqs)?;
    check_len("kv_len", b.len(kv_len), n_seqs)?;
    check_len("out", b.len(out), nq)?;
    let need = attention_decode_workspace_bytes(b, shape, n_seqs, max_kv_len);
    check_workspace(b.len(workspace), need, "attention_decode_workspace_bytes")?;
    check_fault(b, fault)?;
    if n_seqs == 0 {
        return Ok(());
    }
    let Some(l) = b.launchers() else {
        let bits = reference::decode(
            shape,
            n_seqs,
            max_kv_len,
            host(b, q),
            host(b, k_cache),
            host(b, v_cache),
            host(b, kv_start),
            host(b, kv_len),
            b.host_slice_mut(out).expect("host buffer"),
        );
        or_fault(b, fault, bits);
        return Ok(());
    };
    let mut p = decode_params(shape, n_seqs, max_kv_len, cache_rows, T::DTYPE);
    p.q = b.raw_ptr(q);
    p.k_cache = b.raw_ptr(k_cache);
    p.v_cache = b.raw_ptr(v_cache);
    p.kv_start = b.raw_ptr(kv_start).cast();
    p.kv_len = b.raw_ptr(kv_len).cast();
    p.out = b.raw_ptr_mut(out);
    p.workspace = ffi::workspace_ptr(b, workspace, need);
    p.fault = b.raw_ptr_mut(fault).cast();
    let f = pick_launcher!(
        l,
        sys::lk_emu_attention_decode,
        sys::lk_cuda_attention_decode
    );
    // SAFETY: dtype, buffer lengths and workspace size checked; cache_rows derived from k_cache's
    // length and v_cache checked to be at least as long.
    unsafe { ffi::launch(b, l, "attention_decode", f, &p) }
}

/// Plain-Rust references (the cpu backend's kernels and the tests' oracle): softmax attention in
/// f64 from q, k, v, rounded to T once at the end. They return the fault bits they raise.
pub mod reference {
    use std::ops::Range;

    use super::Attention;
    use crate::dtype::Float;
    use crate::ffi::sys;

    const FAULT: u32 = sys::LK_FAULT_INDEX;

    /// A packed batch on the host.
    #[derive(Clone, Copy, Debug)]
    pub struct Batch<'a> {
        pub seq_starts: &'a [i32],
        pub n_seqs: usize,
        pub tokens: usize,
        pub max_seq_len: usize,
    }

    impl Batch<'_> {
        /// Row range of each sequence (`None`: invalid, skipped) and the fault bits (module docs:
        /// the prefix `s_0 ≤ … ≤ s_{i+1}` non-decreasing, `s_0 ≥ 0`, `s_{i+1} ≤ tokens`, length ≤
        /// max_seq_len; `s_0 ≠ 0` or `s_n ≠ tokens` is flagged as well).
        pub fn sequences(&self) -> (Vec<Option<Range<usize>>>, u32) {
            let s = &self.seq_starts[..self.n_seqs + 1];
            let mut fault = 0;
            let mut monotone = s[0] >= 0;
            let mut seqs = Vec::with_capacity(self.n_seqs);
            for i in 0..self.n_seqs {
                monotone &= s[i] <= s[i + 1];
                let ok = monotone
                    && (s[i + 1] as i64) <= self.tokens as i64
                    && (s[i + 1] - s[i]) as i64 <= self.max_seq_len as i64;
                if ok {
                    seqs.push(Some(s[i] as usize..s[i + 1] as usize));
                } else {
                    seqs.push(None);
                    fault = FAULT;
                }
            }
            if s[0] != 0 || s[self.n_seqs] as i64 != self.tokens as i64 {
                fault = FAULT;
            }
            (seqs, fault)
        }
    }

    /// `out[i] = Σ_{j ≤ i} softmax_j(scale · q_i·k_j) v_j` within each sequence, `lse[i] = ln Σ_j
    /// exp(scale · q_i·k_j)` (f64, rounded once).
    pub fn forward<T: Float>(
        a: &Attention,
        batch: &Batch<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        out: &mut [T],
        lse: &mut [f32],
    ) -> u32 {
        let (seqs, fault) = batch.sequences();
        let (hd, qd, kd, g) = (a.head_dim, a.q_dim(), a.kv_dim(), a.group());
        let scale = a.scale as f64;
        let mut p = Vec::new();
        for r in seqs.into_iter().flatten() {
            for h in 0..a.n_heads {
                let kh = h / g;
                for i in r.clone() {
                    let qi = &q[i * qd + h * hd..][..hd];
                    p.clear();
                    for j in r.start..=i {
                        let kj = &k[j * kd + kh * hd..][..hd];
                        p.push(scale * dot(qi, kj));
                    }
                    let m = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let mut l = 0.0;
                    for x in p.iter_mut() {
                        *x = (*x - m).exp();
                        l += *x;
                    }
                    for c in 0..hd {
                        let mut o = 0.0;
                        for (jj, &pj) in p.iter().enumerate() {
                            o += pj * v[(r.start + jj) * kd + kh * hd + c].to_f64();
                        }
                        out[i * qd + h * hd + c] = T::from_f64(o / l);
                    }
                    lse[i * a.n_heads + h] = (m + l.ln()) as f32;
                }
            }
        }
        fault
    }

    /// The forward's inputs and the output gradient, for [`backward`].
    #[derive(Clone, Copy)]
    pub struct Saved<'a, T> {
        pub q: &'a [T],
        pub k: &'a [T],
        pub v: &'a [T],
        pub d_out: &'a [T],
    }

    /// The exact gradient of [`forward`]'s `out` (f64; the softmax is recomputed from q and k, so
    /// the saved `out` and `lse` are not needed here): with `P` the row softmax, `dP = dO·Vᵀ`,
    /// `D_i = Σ_j P_ij dP_ij`, `dS = P ∘ (dP − D)`: `dq = scale · dS·K`, `dk = scale · dSᵀ·Q`,
    /// `dv = Pᵀ·dO`, dk/dv of a kv head summed over its group's query heads.
    pub fn backward<T: Float>(
        a: &Attention,
        batch: &Batch<'_>,
        x: Saved<'_, T>,
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
    ) -> u32 {
        let (seqs, fault) = batch.sequences();
        let (hd, qd, kd, g) = (a.head_dim, a.q_dim(), a.kv_dim(), a.group());
        let scale = a.scale as f64;
        let f = |s: &[T], i: usize| s[i].to_f64();
        for r in seqs.into_iter().flatten() {
            let n = r.len();
            let mut dk_acc = vec![0.0f64; n * kd];
            let mut dv_acc = vec![0.0f64; n * kd];
            let mut dq_row = vec![0.0f64; hd];
            for h in 0..a.n_heads {
                let kh = h / g;
                for (ii, i) in r.clone().enumerate() {
                    let qo = i * qd + h * hd;
                    let qi = &x.q[qo..][..hd];
                    let doi = &x.d_out[qo..][..hd];
                    let cnt = ii + 1;
                    let mut p: Vec<f64> = (0..cnt)
                        .map(|jj| scale * dot(qi, &x.k[(r.start + jj) * kd + kh * hd..][..hd]))
                        .collect();
                    let m = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let mut l = 0.0;
                    for e in p.iter_mut() {
                        *e = (*e - m).exp();
                        l += *e;
                    }
                    p.iter_mut().for_each(|e| *e /= l);
                    let dp: Vec<f64> = (0..cnt)
                        .map(|jj| dot(doi, &x.v[(r.start + jj) * kd + kh * hd..][..hd]))
                        .collect();
                    let d: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    dq_row.iter_mut().for_each(|e| *e = 0.0);
                    for jj in 0..cnt {
                        let ds = p[jj] * (dp[jj] - d);
                        let ko = (r.start + jj) * kd + kh * hd;
                        let acc = jj * kd + kh * hd;
                        for c in 0..hd {
                            dq_row[c] += ds * f(x.k, ko + c);
                            dk_acc[acc + c] += scale * ds * f(x.q, qo + c);
                            dv_acc[acc + c] += p[jj] * f(x.d_out, qo + c);
                        }
                    }
                    for c in 0..hd {
                        dq[qo + c] = T::from_f64(scale * dq_row[c]);
                    }
                }
            }
            for (e, (&kv, &vv)) in dk_acc.iter().zip(&dv_acc).enumerate() {
                dk[r.start * kd + e] = T::from_f64(kv);
                dv[r.start * kd + e] = T::from_f64(vv);
            }
        }
        fault
    }

    /// `cache[slots[t]] = rows[t]` in increasing t (bad slot: skipped + fault).
    pub fn kv_cache_write<T: Float>(
        kv_dim: usize,
        tokens: usize,
        rows: &[T],
        slots: &[i32],
        cache: &mut [T],
    ) -> u32 {
        let cache_rows = cache.len() / kv_dim;
        let mut fault = 0;
        for t in 0..tokens {
            let s = slots[t];
            if s < 0 || s as usize >= cache_rows {
                fault = FAULT;
                continue;
            }
            let s = s as usize;
            cache[s * kv_dim..][..kv_dim].copy_from_slice(&rows[t * kv_dim..][..kv_dim]);
        }
        fault
    }

    /// One query row per sequence over cache rows `[kv_start[i], kv_start[i] + kv_len[i])`
    /// (`cache_rows = len(k_cache) / kv_dim`); softmax in f64, no mask.
    #[allow(clippy::too_many_arguments)]
    pub fn decode<T: Float>(
        a: &Attention,
        n_seqs: usize,
        max_kv_len: usize,
        q: &[T],
        k_cache: &[T],
        v_cache: &[T],
        kv_start: &[i32],
        kv_len: &[i32],
        out: &mut [T],
    ) -> u32 {
        let (hd, qd, kd, g) = (a.head_dim, a.q_dim(), a.kv_dim(), a.group());
        let cache_rows = (k_cache.len() / kd) as i64;
        let scale = a.scale as f64;
        let mut fault = 0;
        for i in 0..n_seqs {
            let (s, n) = (kv_start[i] as i64, kv_len[i] as i64);
            if s < 0 || n < 0 || n > max_kv_len as i64 || s + n > cache_rows {
                fault = FAULT;
                continue;
            }
            let (s, n) = (s as usize, n as usize);
            for h in 0..a.n_heads {
                let kh = h / g;
                let qo = i * qd + h * hd;
                let qi = &q[qo..][..hd];
                let mut p: Vec<f64> = (0..n)
                    .map(|j| scale * dot(qi, &k_cache[(s + j) * kd + kh * hd..][..hd]))
                    .collect();
                let m = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut l = 0.0;
                for e in p.iter_mut() {
                    *e = (*e - m).exp();
                    l += *e;
                }
                for c in 0..hd {
                    let o: f64 = (0..n)
                        .map(|j| p[j] * v_cache[(s + j) * kd + kh * hd + c].to_f64())
                        .sum();
                    out[qo + c] = T::from_f64(if n == 0 { 0.0 } else { o / l });
                }
            }
        }
        fault
    }

    fn dot<T: Float>(a: &[T], b: &[T]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
    }
}
