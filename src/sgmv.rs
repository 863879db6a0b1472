//! SGMV (prefill): segmented gather matrix multiply. Positions `0..tokens` of a row order
//! (`row_index`, the planner's output; identity when absent) form segments sharing one adapter, so
//! each segment is a tall-skinny GEMM that runs on tensor cores (f16/bf16) or FMA (f32):
//!
//! - shrink: `u[s, row_index[p], 0:rank] = x[row_index[p]] · A(seg_adapter[i], s)ᵀ`;
//! - expand: `out[row_index[p], off_s : off_s + n_s] (+)= scale · u[s, row_index[p], 0:rank] · Bᵀ`.
//!
//! u and out are indexed by the original token, exactly as for BGMV, so the two paths are
//! interchangeable per batch. The segment metadata is device-resident (a CUDA graph can replay a
//! plan made on the device); if it is invalid anywhere the launch writes nothing and sets a bit
//! in the error word.

use crate::adapter::{check_activation_dtype, fault, with_weight_type, AdapterTable, ExpandMode};
use crate::dropout::LayerDropout;

/// Dropout fields of a launch without dropout (threshold 0).
const NO_DROPOUT: (u64, [u64; crate::adapter::MAX_SLICES], u32, f32) =
    (0, [0; crate::adapter::MAX_SLICES], 0, 1.0);
use crate::backend::Backend;
use crate::bgmv::{check_error_word, check_rows, check_u_len, ffi_slices};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::ffi::{self, sys};
use crate::validate::{check_workspace, fits_i32};

/// SGMV segment metadata in a backend's memory: the planner writes it, or an engine uploads its own.
pub struct SgmvPlan<B: Backend> {
    /// `[tokens]`: position → original token (None = identity).
    pub row_index: Option<B::Buffer<i32>>,
    /// `[max_segments + 1]`: segment i covers positions `[seg_starts[i], seg_starts[i + 1])`.
    pub seg_starts: B::Buffer<i32>,
    /// `[max_segments]`: each segment's adapter id (−1 = none).
    pub seg_adapter: B::Buffer<i32>,
    /// `[1]`: how many segments are in use (≤ max_segments).
    pub n_segments: B::Buffer<i32>,
    max_segments: usize,
    tokens: usize,
}

fn check_plan_sizes(tokens: usize, max_segments: usize) -> Result<()> {
    fits_i32("tokens", tokens)?;
    if max_segments == 0 || max_segments >= i32::MAX as usize {
        return Err(Error::invalid(
            "max_segments",
            format!("1 to {}", i32::MAX - 1),
            max_segments,
        ));
    }
    Ok(())
}

impl<B: Backend> SgmvPlan<B> {
    /// Room for a plan of `tokens` tokens in at most `max_segments` segments (for the planner:
    /// ≥ min(tokens, n_adapters)).
    pub fn alloc(b: &B, tokens: usize, max_segments: usize) -> Result<Self> {
        check_plan_sizes(tokens, max_segments)?;
        Ok(SgmvPlan {
            row_index: Some(b.alloc(tokens)?),
            seg_starts: b.alloc(max_segments + 1)?,
            seg_adapter: b.alloc(max_segments)?,
            n_segments: b.alloc(1)?,
            max_segments,
            tokens,
        })
    }

    /// A plan made on the host (uploaded as is: the kernels validate it on the device).
    /// `seg_starts` has `max_segments + 1` entries and `seg_adapter` `max_segments`.
    pub fn from_host(
        b: &B,
        row_index: Option<&[i32]>,
        seg_starts: &[i32],
        seg_adapter: &[i32],
        n_segments: i32,
        tokens: usize,
    ) -> Result<Self> {
        let max_segments = seg_adapter.len();
        check_plan_sizes(tokens, max_segments)?;
        if seg_starts.len() != max_segments + 1 {
            return Err(Error::invalid(
                "seg_starts",
                format!("{} entries (max_segments + 1)", max_segments + 1),
                seg_starts.len(),
            ));
        }
        if let Some(r) = row_index {
            if r.len() != tokens {
                return Err(Error::invalid(
                    "row_index",
                    format!("{tokens} entries (one per token)"),
                    r.len(),
                ));
            }
        }
        Ok(SgmvPlan {
            row_index: row_index.map(|r| b.upload(r)).transpose()?,
            seg_starts: b.upload(seg_starts)?,
            seg_adapter: b.upload(seg_adapter)?,
            n_segments: b.upload(&[n_segments])?,
            max_segments,
            tokens,
        })
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn max_segments(&self) -> usize {
        self.max_segments
    }

    fn plan_params(
        &mut self,
        b: &B,
        ids: &B::Buffer<i32>,
        n_adapters: usize,
        ws: *mut std::ffi::c_void,
        err: *mut u32,
    ) -> sys::LkSgmvPlanParams {
        sys::LkSgmvPlanParams {
            token_adapter: b.raw_ptr(ids).cast(),
            row_index: self
                .row_index
                .as_mut()
                .map_or(std::ptr::null_mut(), |r| b.raw_ptr_mut(r).cast()),
            seg_starts: b.raw_ptr_mut(&mut self.seg_starts).cast(),
            seg_adapter: b.raw_ptr_mut(&mut self.seg_adapter).cast(),
            n_segments: b.raw_ptr_mut(&mut self.n_segments).cast(),
            error_word: err,
            workspace: ws,
            tokens: self.tokens as i32,
            n_adapters: n_adapters as i32,
            max_segments: self.max_segments as i32,
        }
    }

    /// Bytes of workspace [`SgmvPlan::plan`] needs.
    pub fn plan_workspace_bytes(
        &mut self,
        b: &B,
        token_adapter: &B::Buffer<i32>,
        n_adapters: usize,
    ) -> usize {
        match b.launchers() {
            None => 0,
            Some(l) => {
                let p = self.plan_params(
                    b,
                    token_adapter,
                    n_adapters,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                );
                // SAFETY: a pure function of the params' sizes.
                unsafe { (l.sgmv_plan_workspace_size)(&p) }
            }
        }
    }

    /// The planner, on the device: a stable sort of the tokens by adapter id and one segment per
    /// adapter present, in increasing id; tokens with id −1 (or an out-of-range id, flagged with
    /// [`fault::ADAPTER_ID`]) are left out of the segments.
    pub fn plan(
        &mut self,
        b: &B,
        token_adapter: &B::Buffer<i32>,
        n_adapters: usize,
        workspace: &mut B::Buffer<u8>,
        mut errors: Option<&mut B::Buffer<u32>>,
    ) -> Result<()> {
        if b.len(token_adapter) < self.tokens {
            return Err(Error::invalid(
                "token_adapter",
                format!("≥ {} ids", self.tokens),
                b.len(token_adapter),
            ));
        }
        fits_i32("n_adapters", n_adapters)?;
        if self.max_segments < self.tokens.min(n_adapters) {
            return Err(Error::invalid(
                "max_segments",
                format!(
                    "≥ min(tokens, n_adapters) = {}",
                    self.tokens.min(n_adapters)
                ),
                self.max_segments,
            ));
        }
        if self.row_index.is_none() {
            self.row_index = Some(b.alloc(self.tokens)?);
        }
        check_error_word(b, &errors)?;
        let need = self.plan_workspace_bytes(b, token_adapter, n_adapters);
        check_workspace(b.len(workspace), need, "plan_workspace_bytes")?;
        let Some(l) = b.launchers() else {
            let ids = &b.host_slice(token_adapter).expect("host buffer")[..self.tokens];
            let r = reference::plan(ids, n_adapters);
            b.host_slice_mut(self.row_index.as_mut().unwrap())
                .unwrap()
                .copy_from_slice(&r.row_index);
            let starts = b.host_slice_mut(&mut self.seg_starts).unwrap();
            starts[..r.seg_starts.len()].copy_from_slice(&r.seg_starts);
            b.host_slice_mut(&mut self.seg_adapter).unwrap()[..r.seg_adapter.len()]
                .copy_from_slice(&r.seg_adapter);
            b.host_slice_mut(&mut self.n_segments).unwrap()[0] = r.seg_adapter.len() as i32;
            return crate::bgmv::reference::report(b, errors, r.faults);
        };
        let ws = b.raw_ptr_mut(workspace);
        let err = errors
            .as_mut()
            .map_or(std::ptr::null_mut(), |e| b.raw_ptr_mut(e).cast());
        let p = self.plan_params(b, token_adapter, n_adapters, ws, err);
        if self.tokens == 0 {
            // Nothing to sort; n_segments must still become 0.
            b.write(&mut self.n_segments, &[0])?;
            return Ok(());
        }
        // SAFETY: every buffer was sized above.
        unsafe { ffi::launch(b, l, "sgmv_plan", l.sgmv_plan, &p) }
    }
}

/// One prefill batch: the adapter table and the segment plan.
pub struct Sgmv<'a, 'w, B: Backend> {
    table: &'a AdapterTable<'w, B>,
    plan: &'a SgmvPlan<B>,
}

impl<'a, 'w, B: Backend> Sgmv<'a, 'w, B> {
    pub fn new(table: &'a AdapterTable<'w, B>, plan: &'a SgmvPlan<B>) -> Self {
        Sgmv { table, plan }
    }

    #[allow(clippy::too_many_arguments)]
    fn shrink_params<TX: Float>(
        &self,
        b: &B,
        x: *const std::ffi::c_void,
        ld_x: usize,
        u: *mut f32,
        ws: *mut std::ffi::c_void,
        err: *mut u32,
        drop: (u64, [u64; crate::adapter::MAX_SLICES], u32, f32),
    ) -> sys::LkSgmvShrinkParams {
        let (t, p) = (self.table, self.plan);
        sys::LkSgmvShrinkParams {
            x,
            u,
            table: t.raw_table(b),
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
            tokens: p.tokens as i32,
            max_segments: p.max_segments as i32,
            d_in: t.d_in() as i32,
            n_adapters: t.n_adapters() as i32,
            n_slices: t.n_slices() as i32,
            r_cap: t.r_cap() as i32,
            x_dtype: TX::DTYPE.ffi_tag().unwrap_or(-1),
            w_dtype: t.w_dtype().ffi_tag().unwrap(),
            dropout_seed: drop.0,
            dropout_offset: drop.1,
            dropout_threshold: drop.2,
            dropout_keep_scale: drop.3,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn expand_params<TO: Float>(
        &self,
        b: &B,
        u: *const f32,
        out: *mut std::ffi::c_void,
        ld_out: usize,
        mode: ExpandMode,
        ws: *mut std::ffi::c_void,
        err: *mut u32,
    ) -> sys::LkSgmvExpandParams {
        let (t, p) = (self.table, self.plan);
        sys::LkSgmvExpandParams {
            u,
            out,
            table: t.raw_table(b),
            row_index: p
                .row_index
                .as_ref()
                .map_or(std::ptr::null(), |r| b.raw_ptr(r).cast()),
            seg_starts: b.raw_ptr(&p.seg_starts).cast(),
            seg_adapter: b.raw_ptr(&p.seg_adapter).cast(),
            n_segments: b.raw_ptr(&p.n_segments).cast(),
            error_word: err,
            workspace: ws,
            ld_out: ld_out as i64,
            slices: ffi_slices(t),
            tokens: p.tokens as i32,
            max_segments: p.max_segments as i32,
            n_adapters: t.n_adapters() as i32,
            n_slices: t.n_slices() as i32,
            r_cap: t.r_cap() as i32,
            out_dtype: TO::DTYPE.ffi_tag().unwrap_or(-1),
            w_dtype: t.w_dtype().ffi_tag().unwrap(),
            mode: mode.ffi(),
        }
    }

    /// Bytes of workspace [`Sgmv::shrink`] needs for x of dtype `TX` (0 on cpu).
    pub fn shrink_workspace_bytes<TX: Float>(&self, b: &B, ld_x: usize) -> usize {
        b.launchers().map_or(0, |l| {
            let p = self.shrink_params::<TX>(
                b,
                std::ptr::null(),
                ld_x,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                NO_DROPOUT,
            );
            // SAFETY: a pure function of the params' sizes.
            unsafe { (l.sgmv_shrink_workspace_size)(&p) }
        })
    }

    /// Bytes of workspace [`Sgmv::expand`] needs for out of dtype `TO` (0 on cpu).
    pub fn expand_workspace_bytes<TO: Float>(
        &self,
        b: &B,
        ld_out: usize,
        mode: ExpandMode,
    ) -> usize {
        b.launchers().map_or(0, |l| {
            let p = self.expand_params::<TO>(
                b,
                std::ptr::null(),
                std::ptr::null_mut(),
                ld_out,
                mode,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            // SAFETY: a pure function of the params' sizes.
            unsafe { (l.sgmv_expand_workspace_size)(&p) }
        })
    }

    /// Shrink over the plan's segments (see the module docs).
    pub fn shrink<TX: Float>(
        &self,
        b: &B,
        x: &B::Buffer<TX>,
        ld_x: usize,
        u: &mut B::Buffer<f32>,
        workspace: &mut B::Buffer<u8>,
        errors: Option<&mut B::Buffer<u32>>,
    ) -> Result<()> {
        self.shrink_with_dropout(b, x, ld_x, &LayerDropout::NONE, u, workspace, errors)
    }

    /// The training shrink: `u = drop(x) · Aᵀ` with the dropout fused into the load of x — slice s
    /// draws its mask from `dropout.offsets[s]` (DESIGN.md §2), no mask and no x̂ are written, and
    /// the keep scale multiplies each finished dot product once (`u = keep_scale · Σ_kept x·a`).
    /// The LoRA backward regenerates the same masks ([`crate::backward`]).
    #[allow(clippy::too_many_arguments)]
    pub fn shrink_with_dropout<TX: Float>(
        &self,
        b: &B,
        x: &B::Buffer<TX>,
        ld_x: usize,
        dropout: &LayerDropout,
        u: &mut B::Buffer<f32>,
        workspace: &mut B::Buffer<u8>,
        mut errors: Option<&mut B::Buffer<u32>>,
    ) -> Result<()> {
        let (t, tokens) = (self.table, self.plan.tokens);
        let (threshold, keep_scale) = dropout.ffi()?;
        check_activation_dtype(b, "x", TX::DTYPE, t.w_dtype())?;
        check_rows("x", b.len(x), tokens, t.d_in(), ld_x, "ld_x")?;
        check_u_len(b, t, tokens, b.len(u))?;
        check_error_word(b, &errors)?;
        let need = self.shrink_workspace_bytes::<TX>(b, ld_x);
        check_workspace(b.len(workspace), need, "shrink_workspace_bytes")?;
        if tokens == 0 {
            return Ok(());
        }
        let Some(l) = b.launchers() else {
            let work = match reference::segment_work(b, self.plan, t.n_adapters()) {
                Ok(w) => w,
                Err(f) => return crate::bgmv::reference::report(b, errors, f),
            };
            let x = b.host_slice(x).unwrap();
            let u = b.host_slice_mut(u).unwrap();
            let faults = with_weight_type!(t.w_dtype(), TW => crate::bgmv::reference::shrink::<B, TX, TW>(t, x, ld_x, u, tokens, &work, dropout));
            return crate::bgmv::reference::report(b, errors, faults);
        };
        let err = errors
            .as_mut()
            .map_or(std::ptr::null_mut(), |e| b.raw_ptr_mut(e).cast());
        let p = self.shrink_params::<TX>(
            b,
            b.raw_ptr(x),
            ld_x,
            b.raw_ptr_mut(u).cast(),
            b.raw_ptr_mut(workspace),
            err,
            (dropout.seed, dropout.offsets, threshold, keep_scale),
        );
        // SAFETY: every buffer length was checked above; the table's entries when they were set.
        unsafe { ffi::launch(b, l, "sgmv_shrink", l.sgmv_shrink, &p) }
    }

    /// Expand over the plan's segments (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub fn expand<TO: Float>(
        &self,
        b: &B,
        u: &B::Buffer<f32>,
        out: &mut B::Buffer<TO>,
        ld_out: usize,
        mode: ExpandMode,
        workspace: &mut B::Buffer<u8>,
        mut errors: Option<&mut B::Buffer<u32>>,
    ) -> Result<()> {
        let (t, tokens) = (self.table, self.plan.tokens);
        check_activation_dtype(b, "out", TO::DTYPE, t.w_dtype())?;
        check_rows("out", b.len(out), tokens, t.out_width(), ld_out, "ld_out")?;
        check_u_len(b, t, tokens, b.len(u))?;
        check_error_word(b, &errors)?;
        let need = self.expand_workspace_bytes::<TO>(b, ld_out, mode);
        check_workspace(b.len(workspace), need, "expand_workspace_bytes")?;
        if tokens == 0 {
            return Ok(());
        }
        let Some(l) = b.launchers() else {
            let work = match reference::segment_work(b, self.plan, t.n_adapters()) {
                Ok(w) => w,
                Err(f) => return crate::bgmv::reference::report(b, errors, f),
            };
            let u = b.host_slice(u).unwrap();
            let out = b.host_slice_mut(out).unwrap();
            let faults = with_weight_type!(t.w_dtype(), TW => crate::bgmv::reference::expand::<B, TO, TW>(t, u, out, ld_out, tokens, mode, &work));
            return crate::bgmv::reference::report(b, errors, faults);
        };
        let err = errors
            .as_mut()
            .map_or(std::ptr::null_mut(), |e| b.raw_ptr_mut(e).cast());
        let p = self.expand_params::<TO>(
            b,
            b.raw_ptr(u).cast(),
            b.raw_ptr_mut(out),
            ld_out,
            mode,
            b.raw_ptr_mut(workspace),
            err,
        );
        // SAFETY: every buffer length was checked above; the table's entries when they were set.
        unsafe { ffi::launch(b, l, "sgmv_expand", l.sgmv_expand, &p) }
    }
}

/// The plain-Rust reference: metadata validation, the planner, and the (token, adapter) work
/// list that the BGMV reference then computes.
pub mod reference {
    use super::*;

    /// Validates the plan as the kernels must (DESIGN.md §2) and lists `(token, adapter)` for every
    /// covered position with an adapter; `Err(fault bits)` if the launch must write nothing.
    pub fn segment_work<B: Backend>(
        b: &B,
        plan: &SgmvPlan<B>,
        n_adapters: usize,
    ) -> std::result::Result<Vec<(usize, i32)>, u32> {
        let tokens = plan.tokens;
        let n = b.host_slice(&plan.n_segments).unwrap()[0];
        if n < 0 || n as usize > plan.max_segments {
            return Err(fault::SEGMENTS);
        }
        let n = n as usize;
        let starts = &b.host_slice(&plan.seg_starts).unwrap()[..=n];
        let adapters = &b.host_slice(&plan.seg_adapter).unwrap()[..n];
        if starts.iter().any(|&s| s < 0 || s as usize > tokens)
            || starts.windows(2).any(|w| w[0] > w[1])
        {
            return Err(fault::SEGMENTS);
        }
        if adapters
            .iter()
            .any(|&a| a < -1 || (a >= 0 && a as usize >= n_adapters))
        {
            return Err(fault::SEGMENTS);
        }
        let rows: Vec<usize> = match &plan.row_index {
            None => (0..tokens).collect(),
            Some(r) => {
                let r = &b.host_slice(r).unwrap()[..tokens];
                if r.iter().any(|&v| v < 0 || v as usize >= tokens) {
                    return Err(fault::ROW_INDEX);
                }
                r.iter().map(|&v| v as usize).collect()
            }
        };
        let mut work = Vec::new();
        for (i, &a) in adapters.iter().enumerate() {
            if a == -1 {
                continue;
            }
            for &row in &rows[starts[i] as usize..starts[i + 1] as usize] {
                work.push((row, a));
            }
        }
        Ok(work)
    }

    /// What the planner produces.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Plan {
        pub row_index: Vec<i32>,
        /// `n_segments + 1` entries.
        pub seg_starts: Vec<i32>,
        pub seg_adapter: Vec<i32>,
        pub faults: u32,
    }

    /// A stable sort of the tokens by adapter id, −1 (and out-of-range ids, flagged) last.
    pub fn plan(ids: &[i32], n_adapters: usize) -> Plan {
        let mut faults = 0;
        let key = |id: i32| -> Option<i32> {
            if id >= 0 && (id as usize) < n_adapters {
                Some(id)
            } else {
                None
            }
        };
        for &id in ids {
            if id < -1 || (id >= 0 && id as usize >= n_adapters) {
                faults |= fault::ADAPTER_ID;
            }
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&t| (key(ids[t]).is_none(), key(ids[t]).unwrap_or(0)));
        let row_index: Vec<i32> = order.iter().map(|&t| t as i32).collect();
        let (mut seg_starts, mut seg_adapter) = (vec![0], Vec::new());
        for (pos, &t) in order.iter().enumerate() {
            let Some(a) = key(ids[t]) else { break };
            if seg_adapter.last() != Some(&a) {
                if !seg_adapter.is_empty() {
                    seg_starts.push(pos as i32);
                }
                seg_adapter.push(a);
            }
        }
        let covered = order.iter().take_while(|&&t| key(ids[t]).is_some()).count();
        if !seg_adapter.is_empty() {
            seg_starts.push(covered as i32);
        }
        Plan {
            row_index,
            seg_starts,
            seg_adapter,
            faults,
        }
    }
}
