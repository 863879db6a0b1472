//! The adapter table (DESIGN.md §2): how multi-adapter kernels find LoRA weights.
//!
//! One entry per (adapter, slice), indexed `adapter * n_slices + slice`, holding the addresses of
//! A `[rank, d_in]` and B `[n_s, rank]`, their row strides, the rank and the scale. Adapters of
//! different ranks live in their own allocations: no memory and no work is spent on padding. The
//! table lives in the backend's memory (device memory for cuda) and borrows the weight buffers, so
//! they outlive it.

use std::marker::PhantomData;

use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::sys;
use crate::validate::span;

/// Output columns `[offset, offset + n)` of a layer's output belong to one slice (e.g. Llama-3's
/// fused qkv projection: q 4096 at 0, k 1024 at 4096, v 1024 at 5120).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub n: usize,
    pub offset: usize,
}

/// Most slices one launch handles (`LK_MAX_SLICES`).
pub const MAX_SLICES: usize = sys::LK_MAX_SLICES as usize;
/// Largest rank the kernels accept.
pub const MAX_RANK: usize = 1024;

/// Rank, scale and row strides of one (adapter, slice) weight pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraWeights {
    pub rank: usize,
    /// `alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA); applied once, in expand.
    pub scale: f32,
    /// Row stride of A, ≥ d_in.
    pub lda: usize,
    /// Row stride of B, ≥ rank.
    pub ldb: usize,
}

impl LoraWeights {
    /// Packed A `[rank, d_in]` and B `[n_s, rank]`.
    pub fn packed(rank: usize, scale: f32, d_in: usize) -> Self {
        LoraWeights {
            rank,
            scale,
            lda: d_in,
            ldb: rank,
        }
    }
}

const ENTRY_WORDS: usize = std::mem::size_of::<sys::LkAdapterEntry>() / 8;
const _: () = assert!(std::mem::size_of::<sys::LkAdapterEntry>() == ENTRY_WORDS * 8);
const _: () = assert!(std::mem::align_of::<sys::LkAdapterEntry>() == 8);

fn empty_entry() -> sys::LkAdapterEntry {
    sys::LkAdapterEntry {
        a: std::ptr::null(),
        b: std::ptr::null(),
        lda: 0,
        ldb: 0,
        rank: 0,
        scale: 0.0,
    }
}

/// Collects the entries of an [`AdapterTable`]; every entry starts as "not targeted" (rank 0).
pub struct AdapterTableBuilder<'w, B: Backend> {
    n_adapters: usize,
    d_in: usize,
    slices: Vec<Slice>,
    w_dtype: DType,
    entries: Vec<sys::LkAdapterEntry>,
    max_valid_rank: usize,
    r_cap: Option<usize>,
    _weights: PhantomData<&'w B>,
}

impl<'w, B: Backend> AdapterTableBuilder<'w, B> {
    /// A table for `n_adapters` adapters of a layer with input width `d_in` and output `slices`,
    /// weights of dtype `w_dtype`.
    pub fn new(n_adapters: usize, d_in: usize, slices: &[Slice], w_dtype: DType) -> Result<Self> {
        if slices.is_empty() || slices.len() > MAX_SLICES {
            return Err(Error::invalid(
                "slices",
                format!("1 to {MAX_SLICES} slices"),
                slices.len(),
            ));
        }
        if n_adapters == 0 || n_adapters > i32::MAX as usize / slices.len() {
            return Err(Error::invalid(
                "n_adapters",
                format!("1 to {}", i32::MAX as usize / slices.len()),
                n_adapters,
            ));
        }
        if d_in > i32::MAX as usize {
            return Err(Error::invalid("d_in", format!("≤ {}", i32::MAX), d_in));
        }
        for s in slices {
            if s.n > i32::MAX as usize || s.offset > i32::MAX as usize - s.n {
                return Err(Error::invalid(
                    "slices",
                    "n and offset + n ≤ i32::MAX",
                    format!("{s:?}"),
                ));
            }
        }
        if w_dtype == DType::F64 {
            return Err(Error::UnsupportedDtype {
                arg: "w_dtype",
                backend: "any",
                actual: w_dtype,
                supported: "f32, f16, bf16".into(),
            });
        }
        Ok(AdapterTableBuilder {
            n_adapters,
            d_in,
            slices: slices.to_vec(),
            w_dtype,
            entries: vec![empty_entry(); n_adapters * slices.len()],
            max_valid_rank: 0,
            r_cap: None,
            _weights: PhantomData,
        })
    }

    /// Sets adapter `adapter`'s weights for slice `slice`: A `[rank, d_in]` in `a`, B `[n_s, rank]`
    /// in `b` (both of the table's dtype), after checking that the buffers hold them.
    pub fn set<TW: Float>(
        &mut self,
        backend: &B,
        adapter: usize,
        slice: usize,
        a: &'w B::Buffer<TW>,
        b: &'w B::Buffer<TW>,
        w: LoraWeights,
    ) -> Result<&mut Self> {
        if TW::DTYPE != self.w_dtype {
            return Err(Error::UnsupportedDtype {
                arg: "a",
                backend: backend.name(),
                actual: TW::DTYPE,
                supported: format!("{} (the table's dtype)", self.w_dtype),
            });
        }
        if adapter >= self.n_adapters {
            return Err(Error::invalid(
                "adapter",
                format!("< {} (n_adapters)", self.n_adapters),
                adapter,
            ));
        }
        if slice >= self.slices.len() {
            return Err(Error::invalid(
                "slice",
                format!("< {} (n_slices)", self.slices.len()),
                slice,
            ));
        }
        if w.rank > MAX_RANK {
            return Err(Error::invalid("rank", format!("≤ {MAX_RANK}"), w.rank));
        }
        if !w.scale.is_finite() {
            return Err(Error::invalid("scale", "a finite number", w.scale));
        }
        if w.lda < self.d_in || w.lda > i64::MAX as usize {
            return Err(Error::invalid(
                "lda",
                format!("≥ {} (d_in)", self.d_in),
                w.lda,
            ));
        }
        if w.ldb < w.rank || w.ldb > i64::MAX as usize {
            return Err(Error::invalid("ldb", format!("≥ {} (rank)", w.rank), w.ldb));
        }
        let n_s = self.slices[slice].n;
        let need_a = span(w.rank, self.d_in, w.lda)
            .ok_or_else(|| Error::invalid("lda", "no overflow", w.lda))?;
        let need_b =
            span(n_s, w.rank, w.ldb).ok_or_else(|| Error::invalid("ldb", "no overflow", w.ldb))?;
        if backend.len(a) < need_a {
            return Err(Error::invalid(
                "a",
                format!("≥ {need_a} elements (rank {} × d_in {})", w.rank, self.d_in),
                backend.len(a),
            ));
        }
        if backend.len(b) < need_b {
            return Err(Error::invalid(
                "b",
                format!("≥ {need_b} elements (n_s {n_s} × rank {})", w.rank),
                backend.len(b),
            ));
        }
        let (a_ptr, b_ptr) = if w.rank == 0 {
            (std::ptr::null(), std::ptr::null())
        } else {
            (backend.raw_ptr(a), backend.raw_ptr(b))
        };
        self.entries[adapter * self.slices.len() + slice] = sys::LkAdapterEntry {
            a: a_ptr,
            b: b_ptr,
            lda: w.lda as i64,
            ldb: w.ldb as i64,
            rank: w.rank as i32,
            scale: w.scale,
        };
        self.max_valid_rank = self.max_valid_rank.max(w.rank);
        Ok(self)
    }

    /// Writes a raw entry, unchecked — for testing how kernels handle corrupt tables (they must
    /// skip and flag entries with rank < 0, rank > r_cap, or null pointers with rank > 0).
    ///
    /// # Safety
    /// An entry with 0 ≤ rank ≤ r_cap and non-null pointers must point at memory of the backend
    /// holding A `[rank, d_in]` (stride lda) and B `[n_s, rank]` (stride ldb) of the table's dtype
    /// for as long as the table is used.
    pub unsafe fn set_raw(
        &mut self,
        adapter: usize,
        slice: usize,
        entry: sys::LkAdapterEntry,
    ) -> &mut Self {
        self.entries[adapter * self.slices.len() + slice] = entry;
        self
    }

    /// Sets r_cap (the u row width) above the largest rank, e.g. to share u buffers between tables.
    pub fn r_cap(&mut self, r_cap: usize) -> Result<&mut Self> {
        if r_cap < self.max_valid_rank || r_cap > MAX_RANK {
            return Err(Error::invalid(
                "r_cap",
                format!(
                    "{} to {MAX_RANK} (the largest rank set)",
                    self.max_valid_rank
                ),
                r_cap,
            ));
        }
        self.r_cap = Some(r_cap);
        Ok(self)
    }

    /// Copies the table into the backend's memory.
    pub fn build(&self, backend: &B) -> Result<AdapterTable<'w, B>> {
        let r_cap = self
            .r_cap
            .unwrap_or(self.max_valid_rank)
            .max(self.max_valid_rank);
        let mut words = vec![0u64; self.entries.len() * ENTRY_WORDS];
        // SAFETY: LkAdapterEntry is plain old data of exactly ENTRY_WORDS 8-byte words (asserted
        // above), and `words` has room for all entries.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.entries.as_ptr().cast::<u8>(),
                words.as_mut_ptr().cast::<u8>(),
                words.len() * 8,
            );
        }
        Ok(AdapterTable {
            n_adapters: self.n_adapters,
            d_in: self.d_in,
            slices: self.slices.clone(),
            w_dtype: self.w_dtype,
            r_cap,
            entries: self.entries.clone(),
            device: backend.upload(&words)?,
            _weights: PhantomData,
        })
    }
}

/// An adapter table in a backend's memory, borrowing the weight buffers it points into.
pub struct AdapterTable<'w, B: Backend> {
    n_adapters: usize,
    d_in: usize,
    slices: Vec<Slice>,
    w_dtype: DType,
    r_cap: usize,
    entries: Vec<sys::LkAdapterEntry>,
    device: B::Buffer<u64>,
    _weights: PhantomData<&'w B>,
}

impl<B: Backend> AdapterTable<'_, B> {
    pub fn n_adapters(&self) -> usize {
        self.n_adapters
    }
    pub fn n_slices(&self) -> usize {
        self.slices.len()
    }
    pub fn slices(&self) -> &[Slice] {
        &self.slices
    }
    pub fn d_in(&self) -> usize {
        self.d_in
    }
    pub fn w_dtype(&self) -> DType {
        self.w_dtype
    }
    /// The u row width: the largest rank (or what [`AdapterTableBuilder::r_cap`] set).
    pub fn r_cap(&self) -> usize {
        self.r_cap
    }
    /// The host copy of the entries.
    pub fn entries(&self) -> &[sys::LkAdapterEntry] {
        &self.entries
    }
    /// Columns of the output the slices span (max offset + n).
    pub fn out_width(&self) -> usize {
        self.slices
            .iter()
            .map(|s| s.offset + s.n)
            .max()
            .unwrap_or(0)
    }
    /// The table's address in the backend's memory (for the C launchers).
    pub fn raw_table(&self, backend: &B) -> *const sys::LkAdapterEntry {
        backend.raw_ptr(&self.device).cast()
    }
    /// Whether the entry is one kernels use (DESIGN.md §2); invalid ones are skipped and flagged.
    pub fn entry_is_valid(&self, e: &sys::LkAdapterEntry) -> bool {
        e.rank >= 0
            && e.rank as usize <= self.r_cap
            && (e.rank == 0 || (!e.a.is_null() && !e.b.is_null()))
    }
}

/// Typed host views of one entry's weights, for the reference implementations.
///
/// # Safety
/// The entry must be valid ([`AdapterTable::entry_is_valid`]) and point at host memory holding its
/// A and B (guaranteed by [`AdapterTableBuilder::set`] on a host backend; `set_raw`'s contract).
pub(crate) unsafe fn host_weights<TW: Float>(
    e: &sys::LkAdapterEntry,
    d_in: usize,
    n_s: usize,
) -> (&[TW], &[TW]) {
    let rank = e.rank as usize;
    if rank == 0 {
        return (&[], &[]);
    }
    let a_len = span(rank, d_in, e.lda as usize).unwrap();
    let b_len = span(n_s, rank, e.ldb as usize).unwrap();
    (
        std::slice::from_raw_parts(e.a.cast::<TW>(), a_len),
        std::slice::from_raw_parts(e.b.cast::<TW>(), b_len),
    )
}

/// How expand writes its columns of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpandMode {
    /// `out += scale · u · Bᵀ`
    Add,
    /// `out = scale · u · Bᵀ` (rank 0 writes zeros)
    Overwrite,
}

impl ExpandMode {
    pub(crate) fn ffi(self) -> i32 {
        match self {
            ExpandMode::Add => sys::LK_EXPAND_ADD as i32,
            ExpandMode::Overwrite => sys::LK_EXPAND_OVERWRITE as i32,
        }
    }
}

/// Bits of the error word (DESIGN.md §2): the caller zeroes it, kernels OR bits in.
pub mod fault {
    use crate::ffi::sys;
    /// A token's adapter id was < −1 or ≥ n_adapters: the token was skipped.
    pub const ADAPTER_ID: u32 = sys::LK_FAULT_ADAPTER_ID;
    /// A used table entry was invalid: the token was skipped in that slice.
    pub const TABLE_ENTRY: u32 = sys::LK_FAULT_TABLE_ENTRY;
    /// SGMV segment metadata was invalid: the launch wrote nothing.
    pub const SEGMENTS: u32 = sys::LK_FAULT_SEGMENTS;
    /// An SGMV row_index entry was out of range: the launch wrote nothing.
    pub const ROW_INDEX: u32 = sys::LK_FAULT_ROW_INDEX;
    /// A device-resident index of the block's kernels (token id, target, position, KV-cache slot)
    /// was out of range: that element was skipped.
    pub const INDEX: u32 = sys::LK_FAULT_INDEX;
}

/// Checks that an activation dtype is the weights' dtype or f32 (never f64) and that the backend
/// takes it.
pub(crate) fn check_activation_dtype<B: Backend>(
    b: &B,
    arg: &'static str,
    act: DType,
    w: DType,
) -> Result<()> {
    if (act == w || act == DType::F32) && b.supports(act) && act != DType::F64 {
        return Ok(());
    }
    Err(Error::UnsupportedDtype {
        arg,
        backend: b.name(),
        actual: act,
        supported: format!("{w} (the weights' dtype) or f32"),
    })
}

/// Runs `$body` with `$TW` bound to the Rust type of the runtime weight dtype `$dtype`.
macro_rules! with_weight_type {
    ($dtype:expr, $TW:ident => $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                type $TW = f32;
                $body
            }
            $crate::dtype::DType::F16 => {
                type $TW = $crate::dtype::f16;
                $body
            }
            $crate::dtype::DType::BF16 => {
                type $TW = $crate::dtype::bf16;
                $body
            }
            $crate::dtype::DType::F64 => unreachable!("tables never hold f64 weights"),
        }
    };
}
pub(crate) use with_weight_type;
