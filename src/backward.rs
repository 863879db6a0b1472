//! LoRA backward with W frozen (DESIGN.md §4).
//!
//! With `x̂ = m ⊙ x / (1 − p)` (dropout), `u = x̂ · Aᵀ` (f32, unscaled, saved by the forward) and
//! `G = dL/dout`:
//!
//! - `du = s · G · B` — `[tokens, rank]` f32, overwritten (scratch, or kept by the caller);
//! - `dB = s · Gᵀ · u` — `[d_out, rank]` f32;
//! - `dA = duᵀ · x̂` — `[rank, d_in]` f32;
//! - `dx += m ⊙ (du · A) / (1 − p)` — accumulated into dx (x's dtype or f32); the `G · W` part
//!   comes from the base layer's GEMM, which runs first.
//!
//! dA and dB are written ([`GradMode::Overwrite`]) or added to existing gradient buffers
//! ([`GradMode::Accumulate`], for gradient accumulation over micro-batches). Only x, u and the
//! dropout seed/offset need to be saved by the forward.
//!
//! Two forms: [`backward_dense`] (one adapter, dense rows) and [`BackwardSgmv`] (several adapters
//! in one batch, over the forward's SGMV plan and adapter table, gradients found through a
//! [`GradTable`]).
//!
//! **Deterministic.** dA and dB reduce over tokens with a fixed split (pieces of
//! `C = max(256, ceil(tokens / 32))` positions, a function of the host-known token count only),
//! partials in the caller's workspace and a fixed-order second pass: no float atomics, so results
//! are bit-identical run to run, under every emulator schedule and on every launch of the same build.
//!
//! **Dropout** is regenerated, never stored: the forward's mask (DESIGN.md §2 Philox mapping, one
//! stream per slice) is recomputed where x is read for dA (x̂ = to_f32(x)·keep_scale for a kept
//! element, as the fused dropout shrink computed it) and where dx is accumulated
//! (`dx += keep_scale · (du·A)` for kept elements). A p outside `[0, 1]` is
//! [`Error::InvalidArgument`] with `arg = "dropout.p"`.
//!
//! **Accuracy.** Every sum is an f32 FMA chain in a fixed order: du over d_out (256 chains + an
//! 8-level tree), dB and dA over the tokens (one chain per piece, pieces summed in order), dx over
//! the rank (one chain per slice). The cpu backend computes the same quantities in f64 from the same
//! inputs (dA and dx from the f32 du it stores, as the kernels do) and rounds once.

use std::ffi::c_void;
use std::marker::PhantomData;

use crate::adapter::{with_weight_type, AdapterTable};
use crate::backend::Backend;
use crate::bgmv::{check_error_word, check_rows, ffi_slices};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::{self, pick_launcher, sys};
use crate::sgmv::SgmvPlan;
use crate::validate::{check_dtype, check_matrix_len, check_workspace, fits_i32, span};

/// How dA and dB are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradMode {
    /// `dA = …`, `dB = …`
    Overwrite,
    /// `dA += …`, `dB += …` (gradient accumulation across micro-batches).
    Accumulate,
}

impl GradMode {
    fn ffi(self) -> i32 {
        match self {
            GradMode::Overwrite => sys::LK_GRAD_OVERWRITE as i32,
            GradMode::Accumulate => sys::LK_GRAD_ACCUMULATE as i32,
        }
    }
}

/// The forward's dropout of a layer (one Philox stream per slice): see [`crate::dropout::LayerDropout`].
pub use crate::dropout::LayerDropout as Dropout;

/// Checks an activation dtype (x, G, dx): the weights' dtype or f32, taken by the backend.
fn check_act<B: Backend>(b: &B, arg: &'static str, act: DType, w: DType) -> Result<()> {
    if (act == w || act == DType::F32) && b.supports(act) {
        return Ok(());
    }
    Err(Error::UnsupportedDtype {
        arg,
        backend: b.name(),
        actual: act,
        supported: format!("{w} (the weights' dtype) or f32"),
    })
}

// ------------------------------------------------------------------------------------------------
// Single adapter.

/// Sizes, strides (elements), scale, gradient mode and dropout of a dense single-adapter backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackwardDense {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    /// The LoRA scale s (alpha / rank, or alpha / sqrt(rank)).
    pub scale: f32,
    pub ld_x: usize,
    pub ld_g: usize,
    pub ld_u: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ld_da: usize,
    pub ld_db: usize,
    pub ld_du: usize,
    pub ld_dx: usize,
    pub mode: GradMode,
    pub dropout: Dropout,
}

impl BackwardDense {
    /// Packed rows, [`GradMode::Overwrite`], no dropout.
    pub fn new(tokens: usize, d_in: usize, d_out: usize, rank: usize, scale: f32) -> Self {
        BackwardDense {
            tokens,
            d_in,
            d_out,
            rank,
            scale,
            ld_x: d_in,
            ld_g: d_out,
            ld_u: rank,
            lda: d_in,
            ldb: rank,
            ld_da: d_in,
            ld_db: rank,
            ld_du: rank,
            ld_dx: d_in,
            mode: GradMode::Overwrite,
            dropout: Dropout::NONE,
        }
    }

    fn validate_sizes(&self) -> Result<()> {
        fits_i32("tokens", self.tokens)?;
        fits_i32("d_in", self.d_in)?;
        fits_i32("d_out", self.d_out)?;
        fits_i32("rank", self.rank)?;
        if !self.scale.is_finite() {
            return Err(Error::invalid("scale", "a finite number", self.scale));
        }
        for (arg, ld, min) in [
            ("ld_x", self.ld_x, self.d_in),
            ("ld_g", self.ld_g, self.d_out),
            ("ld_u", self.ld_u, self.rank),
            ("lda", self.lda, self.d_in),
            ("ldb", self.ldb, self.rank),
            ("ld_da", self.ld_da, self.d_in),
            ("ld_db", self.ld_db, self.rank),
            ("ld_du", self.ld_du, self.rank),
            ("ld_dx", self.ld_dx, self.d_in),
        ] {
            if ld < min {
                return Err(Error::invalid(arg, format!("≥ {min}"), ld));
            }
            if ld > i64::MAX as usize {
                return Err(Error::invalid(arg, "≤ i64::MAX", ld));
            }
        }
        self.dropout.ffi()?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn ffi_params(
        &self,
        x: *const c_void,
        g: *const c_void,
        u: *const f32,
        a: *const c_void,
        b: *const c_void,
        da: *mut f32,
        db: *mut f32,
        du: *mut f32,
        dx: *mut c_void,
        workspace: *mut c_void,
        dtypes: [DType; 4],
    ) -> sys::LkBackwardDenseParams {
        let (threshold, keep) = self.dropout.ffi().unwrap_or((u32::MAX, 0.0));
        let tag = |d: DType| d.ffi_tag().unwrap_or(-1);
        sys::LkBackwardDenseParams {
            x,
            g,
            u,
            a,
            b,
            da,
            db,
            du,
            dx,
            workspace,
            ld_x: self.ld_x as i64,
            ld_g: self.ld_g as i64,
            ld_u: self.ld_u as i64,
            lda: self.lda as i64,
            ldb: self.ldb as i64,
            ld_da: self.ld_da as i64,
            ld_db: self.ld_db as i64,
            ld_du: self.ld_du as i64,
            ld_dx: self.ld_dx as i64,
            dropout_seed: self.dropout.seed,
            dropout_offset: self.dropout.offsets[0],
            tokens: self.tokens as i32,
            d_in: self.d_in as i32,
            d_out: self.d_out as i32,
            rank: self.rank as i32,
            scale: self.scale,
            grad_mode: self.mode.ffi(),
            x_dtype: tag(dtypes[0]),
            g_dtype: tag(dtypes[1]),
            dx_dtype: tag(dtypes[2]),
            w_dtype: tag(dtypes[3]),
            dropout_threshold: threshold,
            dropout_keep_scale: keep,
        }
    }
}

/// What the forward saved and the weights: x `[tokens, d_in]`, G `[tokens, d_out]`, u
/// `[tokens, rank]` f32, A `[rank, d_in]`, B `[d_out, rank]` (strides from [`BackwardDense`]).
pub struct DenseInputs<'a, B: Backend, TX: Float, TG: Float, TW: Float> {
    pub x: &'a B::Buffer<TX>,
    pub g: &'a B::Buffer<TG>,
    pub u: &'a B::Buffer<f32>,
    pub a: &'a B::Buffer<TW>,
    pub b: &'a B::Buffer<TW>,
}

/// Outputs: dA `[rank, d_in]`, dB `[d_out, rank]` (f32, per [`GradMode`]), du `[tokens, rank]` f32
/// (overwritten), dx `[tokens, d_in]` (accumulated; `None` when the input gradient is not wanted —
/// then name `TD`, e.g. `DenseGrads::<_, f32>`).
pub struct DenseGrads<'a, B: Backend, TD: Float> {
    pub da: &'a mut B::Buffer<f32>,
    pub db: &'a mut B::Buffer<f32>,
    pub du: &'a mut B::Buffer<f32>,
    pub dx: Option<&'a mut B::Buffer<TD>>,
}

/// Bytes of workspace [`backward_dense`] needs (0 on cpu; 0 when `tokens ≤ 256`).
pub fn backward_dense_workspace_bytes<B: Backend>(b: &B, shape: &BackwardDense) -> usize {
    b.launchers().map_or(0, |l| {
        let p = shape.ffi_params(
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            [DType::F32; 4],
        );
        let f = pick_launcher!(
            l,
            sys::lk_emu_backward_dense_workspace_size,
            sys::lk_cuda_backward_dense_workspace_size
        );
        // SAFETY: a pure function of the params' sizes.
        unsafe { f(&p) }
    })
}

/// The single-adapter LoRA backward (module docs): du, dB, dA and (if given) dx += du·A.
/// Validates every size, stride, length and dtype first; on error nothing is written.
pub fn backward_dense<B: Backend, TX: Float, TG: Float, TW: Float, TD: Float>(
    b: &B,
    shape: &BackwardDense,
    inputs: DenseInputs<'_, B, TX, TG, TW>,
    grads: DenseGrads<'_, B, TD>,
    workspace: &mut B::Buffer<u8>,
) -> Result<()> {
    let s = shape;
    check_dtype(b, "a", TW::DTYPE)?;
    check_act(b, "x", TX::DTYPE, TW::DTYPE)?;
    check_act(b, "g", TG::DTYPE, TW::DTYPE)?;
    if grads.dx.is_some() {
        check_act(b, "dx", TD::DTYPE, TW::DTYPE)?;
    }
    s.validate_sizes()?;
    let work = s.rank > 0 && s.tokens > 0;
    let (t, r) = (s.tokens, s.rank);
    check_matrix_len(
        "x",
        b.len(inputs.x),
        if work { t } else { 0 },
        s.d_in,
        s.ld_x,
    )?;
    check_matrix_len(
        "g",
        b.len(inputs.g),
        if work { t } else { 0 },
        s.d_out,
        s.ld_g,
    )?;
    check_matrix_len("u", b.len(inputs.u), if work { t } else { 0 }, r, s.ld_u)?;
    check_matrix_len("a", b.len(inputs.a), r, s.d_in, s.lda)?;
    check_matrix_len("b", b.len(inputs.b), s.d_out, r, s.ldb)?;
    check_matrix_len("da", b.len(&*grads.da), r, s.d_in, s.ld_da)?;
    check_matrix_len("db", b.len(&*grads.db), s.d_out, r, s.ld_db)?;
    check_matrix_len("du", b.len(&*grads.du), t, r, s.ld_du)?;
    if let Some(dx) = &grads.dx {
        check_matrix_len("dx", b.len(&**dx), t, s.d_in, s.ld_dx)?;
    }
    let need = backward_dense_workspace_bytes(b, s);
    check_workspace(b.len(workspace), need, "backward_dense_workspace_bytes")?;
    if r == 0 || (t == 0 && s.mode == GradMode::Accumulate) {
        return Ok(());
    }
    let Some(l) = b.launchers() else {
        let io = reference::DenseIo {
            x: b.host_slice(inputs.x).expect("host buffer"),
            g: b.host_slice(inputs.g).expect("host buffer"),
            u: b.host_slice(inputs.u).expect("host buffer"),
            a: b.host_slice(inputs.a).expect("host buffer"),
            b: b.host_slice(inputs.b).expect("host buffer"),
        };
        let da = b.host_slice_mut(grads.da).expect("host buffer");
        let db = b.host_slice_mut(grads.db).expect("host buffer");
        let du = b.host_slice_mut(grads.du).expect("host buffer");
        let dx = grads.dx.map(|d| b.host_slice_mut(d).expect("host buffer"));
        reference::backward_dense(s, &io, da, db, du, dx);
        return Ok(());
    };
    let dx_ptr = match grads.dx {
        Some(d) => b.raw_ptr_mut(d),
        None => std::ptr::null_mut(),
    };
    let p = s.ffi_params(
        b.raw_ptr(inputs.x),
        b.raw_ptr(inputs.g),
        b.raw_ptr(inputs.u).cast(),
        b.raw_ptr(inputs.a),
        b.raw_ptr(inputs.b),
        b.raw_ptr_mut(grads.da).cast(),
        b.raw_ptr_mut(grads.db).cast(),
        b.raw_ptr_mut(grads.du).cast(),
        dx_ptr,
        b.raw_ptr_mut(workspace),
        [TX::DTYPE, TG::DTYPE, TD::DTYPE, TW::DTYPE],
    );
    let f = pick_launcher!(l, sys::lk_emu_backward_dense, sys::lk_cuda_backward_dense);
    // SAFETY: dtypes, every buffer length and the workspace size were checked against `shape`.
    unsafe { ffi::launch(b, l, "backward_dense", f, &p) }
}

// ------------------------------------------------------------------------------------------------
// Several adapters over SGMV segments.

const GRAD_WORDS: usize = std::mem::size_of::<sys::LkAdapterGradEntry>() / 8;
const _: () = assert!(std::mem::size_of::<sys::LkAdapterGradEntry>() == GRAD_WORDS * 8);
const _: () = assert!(std::mem::align_of::<sys::LkAdapterGradEntry>() == 8);

fn empty_grad() -> sys::LkAdapterGradEntry {
    sys::LkAdapterGradEntry {
        da: std::ptr::null_mut(),
        db: std::ptr::null_mut(),
        ld_da: 0,
        ld_db: 0,
    }
}

/// Collects the gradient buffers of an adapter table's (adapter, slice) pairs; every pair starts
/// as "gradient not wanted" (frozen: du and dx still flow through it).
pub struct GradTableBuilder<'g, B: Backend> {
    n_adapters: usize,
    d_in: usize,
    slice_n: Vec<usize>,
    ranks: Vec<i32>,
    entries: Vec<sys::LkAdapterGradEntry>,
    _grads: PhantomData<&'g mut B>,
}

impl<'g, B: Backend> GradTableBuilder<'g, B> {
    /// A gradient table shaped like `table` (same adapters, slices and ranks).
    pub fn new(table: &AdapterTable<'_, B>) -> Self {
        GradTableBuilder {
            n_adapters: table.n_adapters(),
            d_in: table.d_in(),
            slice_n: table.slices().iter().map(|s| s.n).collect(),
            ranks: table.entries().iter().map(|e| e.rank).collect(),
            entries: vec![empty_grad(); table.entries().len()],
            _grads: PhantomData,
        }
    }

    /// Gradient buffers of (adapter, slice): dA `[rank, d_in]` (row stride `ld_da`) and dB
    /// `[n_s, rank]` (row stride `ld_db`), f32; `None` = that gradient is not wanted.
    #[allow(clippy::too_many_arguments)]
    pub fn set(
        &mut self,
        backend: &B,
        adapter: usize,
        slice: usize,
        da: Option<&'g mut B::Buffer<f32>>,
        ld_da: usize,
        db: Option<&'g mut B::Buffer<f32>>,
        ld_db: usize,
    ) -> Result<&mut Self> {
        if adapter >= self.n_adapters {
            return Err(Error::invalid(
                "adapter",
                format!("< {} (n_adapters)", self.n_adapters),
                adapter,
            ));
        }
        if slice >= self.slice_n.len() {
            return Err(Error::invalid(
                "slice",
                format!("< {} (n_slices)", self.slice_n.len()),
                slice,
            ));
        }
        let idx = adapter * self.slice_n.len() + slice;
        let rank = self.ranks[idx].max(0) as usize;
        if ld_da < self.d_in || ld_da > i64::MAX as usize {
            return Err(Error::invalid(
                "ld_da",
                format!("≥ {} (d_in)", self.d_in),
                ld_da,
            ));
        }
        if ld_db < rank || ld_db > i64::MAX as usize {
            return Err(Error::invalid("ld_db", format!("≥ {rank} (rank)"), ld_db));
        }
        let mut e = empty_grad();
        e.ld_da = ld_da as i64;
        e.ld_db = ld_db as i64;
        if let Some(da) = da {
            check_matrix_len("da", backend.len(&*da), rank, self.d_in, ld_da)?;
            e.da = backend.raw_ptr_mut(da).cast();
        }
        if let Some(db) = db {
            check_matrix_len("db", backend.len(&*db), self.slice_n[slice], rank, ld_db)?;
            e.db = backend.raw_ptr_mut(db).cast();
        }
        self.entries[idx] = e;
        Ok(self)
    }

    /// Copies the table into the backend's memory.
    pub fn build(&self, backend: &B) -> Result<GradTable<'g, B>> {
        let mut words = vec![0u64; self.entries.len() * GRAD_WORDS];
        // SAFETY: LkAdapterGradEntry is plain old data of exactly GRAD_WORDS 8-byte words (asserted
        // above), and `words` has room for all entries.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.entries.as_ptr().cast::<u8>(),
                words.as_mut_ptr().cast::<u8>(),
                words.len() * 8,
            );
        }
        Ok(GradTable {
            n_adapters: self.n_adapters,
            n_slices: self.slice_n.len(),
            ranks: self.ranks.clone(),
            entries: self.entries.clone(),
            device: backend.upload(&words)?,
            _grads: PhantomData,
        })
    }
}

/// Gradient buffers per (adapter, slice) in a backend's memory; borrows them mutably, so read the
/// gradients after dropping the table.
pub struct GradTable<'g, B: Backend> {
    n_adapters: usize,
    n_slices: usize,
    ranks: Vec<i32>,
    entries: Vec<sys::LkAdapterGradEntry>,
    device: B::Buffer<u64>,
    _grads: PhantomData<&'g mut B>,
}

impl<B: Backend> GradTable<'_, B> {
    pub fn n_adapters(&self) -> usize {
        self.n_adapters
    }
    pub fn n_slices(&self) -> usize {
        self.n_slices
    }
    /// The host copy of the entries.
    pub fn entries(&self) -> &[sys::LkAdapterGradEntry] {
        &self.entries
    }
}

/// Inputs of a multi-adapter backward: x `[tokens, d_in]` (`ld_x`), G `[tokens, out_width]`
/// (`ld_g`; slice s in columns `[off_s, off_s + n_s)`), u f32 `[n_slices, tokens, r_cap]` (the
/// forward's, indexed by original token).
pub struct SgmvInputs<'a, B: Backend, TX: Float, TG: Float> {
    pub x: &'a B::Buffer<TX>,
    pub ld_x: usize,
    pub g: &'a B::Buffer<TG>,
    pub ld_g: usize,
    pub u: &'a B::Buffer<f32>,
}

/// Outputs of a multi-adapter backward besides the gradient table: du f32
/// `[n_slices, tokens, r_cap]` (written for tokens with an adapter; columns `[rank, r_cap)`
/// untouched) and dx `[tokens, d_in]` (`ld_dx`, accumulated; `None` = not wanted).
pub struct SgmvOutputs<'a, B: Backend, TD: Float> {
    pub du: &'a mut B::Buffer<f32>,
    pub dx: Option<&'a mut B::Buffer<TD>>,
    pub ld_dx: usize,
}

/// One training batch of several adapters: the forward's adapter table and SGMV plan, and the
/// gradient table.
///
/// Contract (see `LkBackwardSgmvParams` in `cuda/lora_kernels.h`): each adapter's tokens must be in
/// one segment — among non-empty segments with an adapter, ids increase strictly (the planner's
/// plans do); otherwise, or with metadata SGMV would reject, nothing is written and
/// [`crate::adapter::fault::SEGMENTS`] (or `ROW_INDEX`) is set. Gradients of (adapter, slice) pairs
/// that receive no token are untouched in both modes; tokens of −1 segments and uncovered
/// positions are untouched (du, dx). Invalid table entries are skipped in their slice and flagged.
pub struct BackwardSgmv<'a, 'w, 'g, B: Backend> {
    table: &'a AdapterTable<'w, B>,
    grads: &'a GradTable<'g, B>,
    plan: &'a SgmvPlan<B>,
}

impl<'a, 'w, 'g, B: Backend> BackwardSgmv<'a, 'w, 'g, B> {
    /// `grads` must be shaped like `table` ([`GradTableBuilder::new`]).
    pub fn new(
        table: &'a AdapterTable<'w, B>,
        grads: &'a GradTable<'g, B>,
        plan: &'a SgmvPlan<B>,
    ) -> Result<Self> {
        let ranks: Vec<i32> = table.entries().iter().map(|e| e.rank).collect();
        if grads.n_adapters != table.n_adapters()
            || grads.n_slices != table.n_slices()
            || grads.ranks != ranks
        {
            return Err(Error::invalid(
                "grads",
                format!(
                    "a gradient table built for this adapter table ({} adapters × {} slices)",
                    table.n_adapters(),
                    table.n_slices()
                ),
                format!("{} adapters × {} slices", grads.n_adapters, grads.n_slices),
            ));
        }
        Ok(BackwardSgmv { table, grads, plan })
    }

    #[allow(clippy::too_many_arguments)]
    fn params(
        &self,
        b: &B,
        x: *const c_void,
        ld_x: usize,
        g: *const c_void,
        ld_g: usize,
        u: *const f32,
        du: *mut f32,
        dx: *mut c_void,
        ld_dx: usize,
        mode: GradMode,
        dropout: &Dropout,
        ws: *mut c_void,
        err: *mut u32,
        dtypes: [DType; 3],
    ) -> sys::LkBackwardSgmvParams {
        let (t, p) = (self.table, self.plan);
        let (threshold, keep) = dropout.ffi().unwrap_or((u32::MAX, 0.0));
        let tag = |d: DType| d.ffi_tag().unwrap_or(-1);
        sys::LkBackwardSgmvParams {
            x,
            g,
            u,
            du,
            dx,
            table: t.raw_table(b),
            grads: b.raw_ptr(&self.grads.device).cast(),
            row_index: p
                .row_index
                .as_ref()
                .map_or(std::ptr::null(), |r| b.raw_ptr(r).cast()),
            seg_starts: b.raw_ptr(&p.seg_starts).cast(),
            seg_adapter: b.raw_ptr(&p.seg_adapter).cast(),
            n_segments: b.raw_ptr(&p.n_segments).cast(),
            error_word: err,
            workspace: ws,
            ld_x: ld_x as i64,
            ld_g: ld_g as i64,
            ld_dx: ld_dx as i64,
            slices: ffi_slices(t),
            dropout_seed: dropout.seed,
            dropout_offset: dropout.offsets,
            tokens: p.tokens() as i32,
            max_segments: p.max_segments() as i32,
            d_in: t.d_in() as i32,
            n_adapters: t.n_adapters() as i32,
            n_slices: t.n_slices() as i32,
            r_cap: t.r_cap() as i32,
            grad_mode: mode.ffi(),
            x_dtype: tag(dtypes[0]),
            g_dtype: tag(dtypes[1]),
            dx_dtype: tag(dtypes[2]),
            w_dtype: tag(t.w_dtype()),
            dropout_threshold: threshold,
            dropout_keep_scale: keep,
        }
    }

    /// Bytes of workspace [`BackwardSgmv::run`] needs (0 on cpu): the validation prefixes
    /// (3 × (max_segments + 1) int32) and ≤ 64 partial slots of `n_slices × r_cap × max(d_in, n_s)`
    /// f32 when some segment is longer than one piece.
    pub fn workspace_bytes(&self, b: &B) -> usize {
        b.launchers().map_or(0, |l| {
            let p = self.params(
                b,
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
                GradMode::Overwrite,
                &Dropout::NONE,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                [DType::F32; 3],
            );
            let f = pick_launcher!(
                l,
                sys::lk_emu_backward_sgmv_workspace_size,
                sys::lk_cuda_backward_sgmv_workspace_size
            );
            // SAFETY: a pure function of the params' sizes.
            unsafe { f(&p) }
        })
    }

    /// du, dA, dB (through the gradient table) and dx for every token with an adapter.
    #[allow(clippy::too_many_arguments)]
    pub fn run<TX: Float, TG: Float, TD: Float>(
        &self,
        b: &B,
        inputs: SgmvInputs<'_, B, TX, TG>,
        outputs: SgmvOutputs<'_, B, TD>,
        mode: GradMode,
        dropout: &Dropout,
        workspace: &mut B::Buffer<u8>,
        mut errors: Option<&mut B::Buffer<u32>>,
    ) -> Result<()> {
        let (t, tokens) = (self.table, self.plan.tokens());
        let w = t.w_dtype();
        check_act(b, "x", TX::DTYPE, w)?;
        check_act(b, "g", TG::DTYPE, w)?;
        if outputs.dx.is_some() {
            check_act(b, "dx", TD::DTYPE, w)?;
        }
        dropout.ffi()?;
        check_rows("x", b.len(inputs.x), tokens, t.d_in(), inputs.ld_x, "ld_x")?;
        check_rows(
            "g",
            b.len(inputs.g),
            tokens,
            t.out_width(),
            inputs.ld_g,
            "ld_g",
        )?;
        let u_need = t
            .n_slices()
            .checked_mul(tokens)
            .and_then(|v| v.checked_mul(t.r_cap()))
            .ok_or_else(|| Error::invalid("u", "a size that fits", "overflow"))?;
        for (arg, have) in [("u", b.len(inputs.u)), ("du", b.len(&*outputs.du))] {
            if have < u_need {
                return Err(Error::invalid(
                    arg,
                    format!(
                        "≥ {u_need} elements ([n_slices {}, tokens {tokens}, r_cap {}] f32)",
                        t.n_slices(),
                        t.r_cap()
                    ),
                    have,
                ));
            }
        }
        if let Some(dx) = &outputs.dx {
            check_rows("dx", b.len(&**dx), tokens, t.d_in(), outputs.ld_dx, "ld_dx")?;
        }
        check_error_word(b, &errors)?;
        let need = self.workspace_bytes(b);
        check_workspace(b.len(workspace), need, "BackwardSgmv::workspace_bytes")?;
        if tokens == 0 {
            return Ok(());
        }
        let Some(l) = b.launchers() else {
            let work = match reference::segment_work(b, self.plan, t.n_adapters()) {
                Ok(w) => w,
                Err(f) => return crate::bgmv::reference::report(b, errors, f),
            };
            let io = reference::SgmvIo {
                x: b.host_slice(inputs.x).expect("host buffer"),
                ld_x: inputs.ld_x,
                g: b.host_slice(inputs.g).expect("host buffer"),
                ld_g: inputs.ld_g,
                u: b.host_slice(inputs.u).expect("host buffer"),
            };
            let du = b.host_slice_mut(outputs.du).expect("host buffer");
            let ld_dx = outputs.ld_dx;
            let dx = outputs
                .dx
                .map(|d| (b.host_slice_mut(d).expect("host buffer"), ld_dx));
            let faults = with_weight_type!(w, TW => reference::backward_sgmv::<B, TX, TG, TW, TD>(
                t, self.grads, &io, du, dx, tokens, mode, dropout, &work));
            return crate::bgmv::reference::report(b, errors, faults);
        };
        let err = errors
            .as_mut()
            .map_or(std::ptr::null_mut(), |e| b.raw_ptr_mut(e).cast());
        let dx_ptr = match outputs.dx {
            Some(d) => b.raw_ptr_mut(d),
            None => std::ptr::null_mut(),
        };
        let p = self.params(
            b,
            b.raw_ptr(inputs.x),
            inputs.ld_x,
            b.raw_ptr(inputs.g),
            inputs.ld_g,
            b.raw_ptr(inputs.u).cast(),
            b.raw_ptr_mut(outputs.du).cast(),
            dx_ptr,
            outputs.ld_dx,
            mode,
            dropout,
            b.raw_ptr_mut(workspace),
            err,
            [TX::DTYPE, TG::DTYPE, TD::DTYPE],
        );
        let f = pick_launcher!(l, sys::lk_emu_backward_sgmv, sys::lk_cuda_backward_sgmv);
        // SAFETY: every buffer length was checked above; the tables' entries when they were set.
        unsafe { ffi::launch(b, l, "backward_sgmv", f, &p) }
    }
}

/// The plain-Rust reference (the cpu backend's kernels): f64 accumulation, one rounding per output.
pub mod reference {
    use super::*;
    use crate::adapter::{fault, host_weights};

    /// Host views of the dense inputs.
    pub struct DenseIo<'a, TX, TG, TW> {
        pub x: &'a [TX],
        pub g: &'a [TG],
        pub u: &'a [f32],
        pub a: &'a [TW],
        pub b: &'a [TW],
    }

    /// One (adapter, slice) worth of backward over `rows`: du rows are written first, then dA, dB
    /// and dx are computed from the stored f32 du (as the kernels do).
    #[allow(clippy::too_many_arguments)]
    fn one<TX: Float, TG: Float, TW: Float>(
        rows: &[usize],
        d_in: usize,
        n_s: usize,
        rank: usize,
        scale: f64,
        x: (&[TX], usize),
        g: (&[TG], usize, usize),
        u: (&[f32], usize),
        a: (&[TW], usize),
        b: (&[TW], usize),
        du: (&mut [f32], usize),
        da: Option<(&mut [f32], usize)>,
        db: Option<(&mut [f32], usize)>,
        dx_acc: &mut [Vec<f64>],
        mode: GradMode,
        drop: &crate::dropout::DropoutConfig,
    ) {
        let (x, ld_x) = x;
        // x̂ of the forward: the kept element times keep_scale (rounded to f32 as the kernels do), or 0.
        let xhat =
            |t: usize, k: usize| drop.xhat(x[t * ld_x + k], drop.keeps((t * d_in + k) as u64));
        let (g, ld_g, off) = g;
        let (u, ld_u) = u;
        let (a, lda) = a;
        let (bw, ldb) = b;
        let (du, ld_du) = du;
        let gv = |t: usize, o: usize| g[t * ld_g + off + o].to_f64();
        for &t in rows {
            for j in 0..rank {
                let s: f64 = (0..n_s)
                    .map(|o| gv(t, o) * bw[o * ldb + j].to_f64())
                    .fold(0.0, |acc, v| acc + v);
                du[t * ld_du + j] = (scale * s) as f32;
            }
        }
        let put = |slot: &mut f32, v: f64| {
            *slot = match mode {
                GradMode::Overwrite => v as f32,
                GradMode::Accumulate => (*slot as f64 + v) as f32,
            }
        };
        if let Some((db, ld_db)) = db {
            for o in 0..n_s {
                for j in 0..rank {
                    let s: f64 = rows
                        .iter()
                        .map(|&t| gv(t, o) * u[t * ld_u + j] as f64)
                        .fold(0.0, |acc, v| acc + v);
                    put(&mut db[o * ld_db + j], scale * s);
                }
            }
        }
        if let Some((da, ld_da)) = da {
            for j in 0..rank {
                for k in 0..d_in {
                    let s: f64 = rows
                        .iter()
                        .map(|&t| du[t * ld_du + j] as f64 * xhat(t, k))
                        .fold(0.0, |acc, v| acc + v);
                    put(&mut da[j * ld_da + k], s);
                }
            }
        }
        for (i, &t) in rows.iter().enumerate() {
            for k in 0..d_in {
                if !drop.keeps((t * d_in + k) as u64) {
                    continue;
                }
                let s: f64 = (0..rank)
                    .map(|j| du[t * ld_du + j] as f64 * a[j * lda + k].to_f64())
                    .fold(0.0, |acc, v| acc + v);
                dx_acc[i][k] += drop.keep_scale as f64 * s;
            }
        }
    }

    /// The dense backward (see the module docs).
    pub fn backward_dense<TX: Float, TG: Float, TW: Float, TD: Float>(
        s: &BackwardDense,
        io: &DenseIo<'_, TX, TG, TW>,
        da: &mut [f32],
        db: &mut [f32],
        du: &mut [f32],
        dx: Option<&mut [TD]>,
    ) {
        let rows: Vec<usize> = (0..s.tokens).collect();
        let mut acc = vec![vec![0.0f64; s.d_in]; s.tokens];
        one::<TX, TG, TW>(
            &rows,
            s.d_in,
            s.d_out,
            s.rank,
            s.scale as f64,
            (io.x, s.ld_x),
            (io.g, s.ld_g, 0),
            (io.u, s.ld_u),
            (io.a, s.lda),
            (io.b, s.ldb),
            (du, s.ld_du),
            Some((da, s.ld_da)),
            Some((db, s.ld_db)),
            &mut acc,
            s.mode,
            &s.dropout.config(0).expect("validated by backward_dense"),
        );
        if let Some(dx) = dx {
            for (t, row) in acc.iter().enumerate() {
                for (k, v) in row.iter().enumerate() {
                    let slot = &mut dx[t * s.ld_dx + k];
                    *slot = TD::from_f64(slot.to_f64() + v);
                }
            }
        }
    }

    /// Validates the plan as the kernels do — SGMV's rules plus strictly increasing adapter ids
    /// among non-empty segments with an adapter — and groups the covered tokens by adapter
    /// (in position order); `Err(fault bits)` if the launch must write nothing.
    pub fn segment_work<B: Backend>(
        b: &B,
        plan: &SgmvPlan<B>,
        n_adapters: usize,
    ) -> std::result::Result<Vec<(i32, Vec<usize>)>, u32> {
        let flat = crate::sgmv::reference::segment_work(b, plan, n_adapters)?;
        let n = b.host_slice(&plan.n_segments).unwrap()[0] as usize;
        let starts = &b.host_slice(&plan.seg_starts).unwrap()[..=n];
        let adapters = &b.host_slice(&plan.seg_adapter).unwrap()[..n];
        let mut last = -1;
        for i in 0..n {
            if adapters[i] >= 0 && starts[i + 1] > starts[i] {
                if adapters[i] <= last {
                    return Err(fault::SEGMENTS);
                }
                last = adapters[i];
            }
        }
        let mut groups: Vec<(i32, Vec<usize>)> = Vec::new();
        for (t, a) in flat {
            match groups.last_mut() {
                Some((ga, rows)) if *ga == a => rows.push(t),
                _ => groups.push((a, vec![t])),
            }
        }
        Ok(groups)
    }

    /// Host views of the multi-adapter inputs.
    pub struct SgmvIo<'a, TX, TG> {
        pub x: &'a [TX],
        pub ld_x: usize,
        pub g: &'a [TG],
        pub ld_g: usize,
        pub u: &'a [f32],
    }

    /// The multi-adapter backward over the grouped work; returns the fault bits.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_sgmv<B: Backend, TX: Float, TG: Float, TW: Float, TD: Float>(
        table: &AdapterTable<'_, B>,
        grads: &GradTable<'_, B>,
        io: &SgmvIo<'_, TX, TG>,
        du: &mut [f32],
        dx: Option<(&mut [TD], usize)>,
        tokens: usize,
        mode: GradMode,
        dropout: &Dropout,
        work: &[(i32, Vec<usize>)],
    ) -> u32 {
        let (ns, rc, d_in) = (table.n_slices(), table.r_cap(), table.d_in());
        let mut faults = 0;
        let mut dx = dx;
        for (adapter, rows) in work {
            let mut acc = vec![vec![0.0f64; d_in]; rows.len()];
            let mut touched = false;
            for (s, sl) in table.slices().iter().enumerate() {
                let idx = *adapter as usize * ns + s;
                let e = &table.entries()[idx];
                if !table.entry_is_valid(e) {
                    faults |= fault::TABLE_ENTRY;
                    continue;
                }
                let rank = e.rank as usize;
                if rank == 0 {
                    continue;
                }
                touched = true;
                // SAFETY: a valid entry of a host-backend table points at host weights.
                let (a, bw) = unsafe { host_weights::<TW>(e, d_in, sl.n) };
                let ge = &grads.entries()[idx];
                // SAFETY: set() checked each non-null gradient buffer against rank, d_in and n_s,
                // and the table holds its mutable borrow.
                let da = (!ge.da.is_null()).then(|| unsafe {
                    let len = span(rank, d_in, ge.ld_da as usize).unwrap();
                    (
                        std::slice::from_raw_parts_mut(ge.da, len),
                        ge.ld_da as usize,
                    )
                });
                // SAFETY: as above.
                let db = (!ge.db.is_null()).then(|| unsafe {
                    let len = span(sl.n, rank, ge.ld_db as usize).unwrap();
                    (
                        std::slice::from_raw_parts_mut(ge.db, len),
                        ge.ld_db as usize,
                    )
                });
                let slice_u = &io.u[s * tokens * rc..(s + 1) * tokens * rc];
                let slice_du = &mut du[s * tokens * rc..(s + 1) * tokens * rc];
                one::<TX, TG, TW>(
                    rows,
                    d_in,
                    sl.n,
                    rank,
                    e.scale as f64,
                    (io.x, io.ld_x),
                    (io.g, io.ld_g, sl.offset),
                    (slice_u, rc),
                    (a, e.lda as usize),
                    (bw, e.ldb as usize),
                    (slice_du, rc),
                    da,
                    db,
                    &mut acc,
                    mode,
                    &dropout.config(s).expect("validated by BackwardSgmv::run"),
                );
            }
            if let (true, Some((dx, ld_dx))) = (touched, dx.as_mut()) {
                for (i, &t) in rows.iter().enumerate() {
                    for k in 0..d_in {
                        let slot = &mut dx[t * *ld_dx + k];
                        *slot = TD::from_f64(slot.to_f64() + acc[i][k]);
                    }
                }
            }
        }
        faults
    }
}
