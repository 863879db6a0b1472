//! In-place merge / unmerge of `scale · B · A` into a frozen weight W (DESIGN.md §2 "Merge").
//!
//! W is `d_out × d_in`, stored row-major `[d_out, d_in]` or, with `fan_in_fan_out` (GPT-2's
//! `Conv1D`), `[d_in, d_out]`; f32, f16 or bf16. A is `[rank, d_in]` (row stride `lda`), B is
//! `[d_out, rank]` (`ldb`). **A and B share one dtype: W's dtype or f32** (an adapter trained in f32
//! merges into a bf16 base without a cast pass).
//!
//! **Arithmetic — the same ops on every backend, so cpu, emu and cuda produce the same bits** (this
//! op is exempt from the cpu backend's f64 rule): for W element `(i, j)`
//! ```text
//! acc = 0.0f32; for r in 0..rank { acc = B[i, r].mul_add(A[r, j], acc) }     // fmaf, increasing r
//! merge:   W[i, j] = round(( scale).mul_add(acc, W[i, j]))
//! unmerge: W[i, j] = round((-scale).mul_add(acc, W[i, j]))
//! ```
//! `round` is f32 → W's dtype, nearest-even (the identity for f32); a NaN result is stored as the
//! canonical NaN (`0x7fff` f16/bf16, `0x7fff_ffff` f32), as the GPU's conversions do. For f16/bf16 the
//! fmaf rounds to f32 first and the store rounds again: that is the contract's sequence, and the
//! round-trip bound below accounts for it.
//!
//! **Round trip (default mode).** merge then unmerge leaves every element within **one ulp of
//! `max(|W|, |merged W|)`** (ulp in W's dtype). Not within one ulp of W: where `|s·B·A| ≫ |W|`, the
//! merged value's rounding error is many ulps of W (DESIGN.md §4). Proof sketch: unmerge computes
//! `m − d` from the same f32 `d = s·acc`, and `m = w + d + e` with `|e| ≤ ½ ulp(m)` (+ the f32 step);
//! the result is the representable value nearest `w + e`, so `|u − w| ≤ |e| + ½ ulp(w)`, and as a
//! multiple of the finer spacing it is at most one ulp of the larger. Tested on every element.
//!
//! **Stacks.** [`merge_stack`] applies adapters in order (one launch each, one rounding per adapter
//! per element), [`unmerge_stack`] removes them in reverse.
//!
//! **Safe mode** ([`merge_safe`], PEFT's `safe_merge` without a copy of W): a check pass computes every
//! would-be result; if any is non-finite nothing is written and [`status::NONFINITE`] is set in the
//! scratch's status word (read on request: [`MergeScratch::status`]). Graph-safe: the write pass reads
//! the verdict from a device word.
//!
//! **Exact mode** ([`merge_exact`] / [`unmerge_exact`]): the merge also writes a [`MergeRecord`]
//! from which unmerge restores W **bit for bit**: 2 bits per element (the unmerged value is right,
//! or one step up, or one step down in W's bit order) plus a list of exceptions `(flat index,
//! original bits)` in increasing index. The list has a fixed capacity; if a merge needs more, it
//! writes nothing at all (W untouched), the record says how many it needed, and the caller retries
//! with [`MergeRecord::alloc`] of that capacity — never a silent loss. Records are
//! backend-independent: one made on emu restores W on cpu and vice versa ([`HostRecord`]).
//!
//! **Record size on Llama-shaped weights** (measured with `cargo run --release --example
//! merge_record_size`: W 4096 × 4096 ~ N(0, 0.02), A ~ U(±1/√d_in), B ~ N(0, 0.02), rank 16; the
//! cpu reference and the emulator produce bit-identical records):
//!
//! | W | scale | exceptions | codes | exception list | record |
//! |---|---|---|---|---|---|
//! | f16 | 2 (alpha 32) | 142 314 (0.85 %) | 4 MiB | 1.63 MiB | 2.81 bits/element |
//! | bf16 | 2 | 151 645 (0.90 %) | 4 MiB | 1.74 MiB | 2.87 bits/element |
//! | f16 | 0.5 (alpha 8) | 23 209 (0.14 %) | 4 MiB | 0.27 MiB | 2.13 bits/element |
//! | bf16 | 0.5 | 38 123 (0.23 %) | 4 MiB | 0.44 MiB | 2.22 bits/element |
//!
//! (W itself: 32 MiB.) The exceptions are the elements with `|W| ≪ |s·B·A|`, whose round-trip error
//! is many steps of W (DESIGN.md §4); each costs 12 bytes (u64 index + u32 bits). A capacity of
//! `elements / 64` (1.6 %) covered these cases; the record reports the exact count needed otherwise.
//! `tests/merge.rs` (`llama_like_record_is_small_and_backend_independent`) checks a scaled-down
//! version (4096 columns) on every run.

use crate::backend::Backend;
use crate::dtype::{bf16, f16, DType, Float};
use crate::error::{Error, Result};
use crate::ffi::{self, pick_launcher, sys};
use crate::validate::{self, check_extent, check_stride, fits_i32, span};

/// Bits of the status word (an error word: bits ORed in by the kernels, never cleared by them).
pub mod status {
    use crate::ffi::sys;
    /// Safe mode: a would-be result was non-finite; W was left untouched.
    pub const NONFINITE: u32 = sys::LK_MERGE_STATUS_NONFINITE;
    /// Exact merge: the exceptions did not fit the record's capacity; W was left untouched.
    pub const OVERFLOW: u32 = sys::LK_MERGE_STATUS_OVERFLOW;
    /// Exact unmerge: the record was invalid (W untouched) or held an out-of-range index.
    pub const BAD_RECORD: u32 = sys::LK_MERGE_STATUS_BAD_RECORD;
}

/// W element types merge takes, with their bit patterns (held in a u32).
pub trait MergeFloat: Float {
    /// Sign bit and exponent mask of the bit pattern.
    const SIGN: u32;
    const EXP: u32;
    fn bits32(self) -> u32;
    fn from_bits32(b: u32) -> Self;
    /// f32 → Self, nearest-even; NaN → the canonical NaN.
    fn round_bits(v: f32) -> u32;
}

impl MergeFloat for f32 {
    const SIGN: u32 = 0x8000_0000;
    const EXP: u32 = 0x7f80_0000;
    fn bits32(self) -> u32 {
        self.to_bits()
    }
    fn from_bits32(b: u32) -> Self {
        f32::from_bits(b)
    }
    fn round_bits(v: f32) -> u32 {
        if v.is_nan() {
            0x7fff_ffff
        } else {
            v.to_bits()
        }
    }
}
impl MergeFloat for f16 {
    const SIGN: u32 = 0x8000;
    const EXP: u32 = 0x7c00;
    fn bits32(self) -> u32 {
        self.to_bits() as u32
    }
    fn from_bits32(b: u32) -> Self {
        f16::from_bits(b as u16)
    }
    fn round_bits(v: f32) -> u32 {
        if v.is_nan() {
            0x7fff
        } else {
            f16::from_f32(v).to_bits() as u32
        }
    }
}
impl MergeFloat for bf16 {
    const SIGN: u32 = 0x8000;
    const EXP: u32 = 0x7f80;
    fn bits32(self) -> u32 {
        self.to_bits() as u32
    }
    fn from_bits32(b: u32) -> Self {
        bf16::from_bits(b as u16)
    }
    fn round_bits(v: f32) -> u32 {
        if v.is_nan() {
            0x7fff
        } else {
            bf16::from_f32(v).to_bits() as u32
        }
    }
}

/// W's shape and layout. `ld_w` is the row stride of the *stored* matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeShape {
    pub d_out: usize,
    pub d_in: usize,
    pub ld_w: usize,
    /// W stored `[d_in, d_out]` (PEFT's `fan_in_fan_out`, GPT-2 `Conv1D`).
    pub fan_in_fan_out: bool,
}

impl MergeShape {
    /// Row-major `[d_out, d_in]`, packed.
    pub fn new(d_out: usize, d_in: usize) -> Self {
        MergeShape {
            d_out,
            d_in,
            ld_w: d_in,
            fan_in_fan_out: false,
        }
    }
    /// Stored `[d_in, d_out]`, packed.
    pub fn fan_in_fan_out(d_out: usize, d_in: usize) -> Self {
        MergeShape {
            d_out,
            d_in,
            ld_w: d_out,
            fan_in_fan_out: true,
        }
    }
    /// (rows, cols) of the stored matrix.
    pub fn stored(&self) -> (usize, usize) {
        if self.fan_in_fan_out {
            (self.d_in, self.d_out)
        } else {
            (self.d_out, self.d_in)
        }
    }
    pub fn elements(&self) -> usize {
        self.d_out * self.d_in
    }
    /// u32 words of 2-bit codes in a record: `rows · ceil(cols / 16)`.
    pub fn code_words(&self) -> usize {
        let (rows, cols) = self.stored();
        rows * cols.div_ceil(16)
    }
}

/// One adapter: A `[rank, d_in]` (row stride `lda`), B `[d_out, rank]` (`ldb`), and its scale.
pub struct Lora<'a, B: Backend, TA: Float> {
    pub a: &'a B::Buffer<TA>,
    pub b: &'a B::Buffer<TA>,
    pub rank: usize,
    pub lda: usize,
    pub ldb: usize,
    /// `alpha / rank` (or `alpha / sqrt(rank)`); must be finite.
    pub scale: f32,
}

impl<B: Backend, TA: Float> Clone for Lora<'_, B, TA> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend, TA: Float> Copy for Lora<'_, B, TA> {}

impl<'a, B: Backend, TA: Float> Lora<'a, B, TA> {
    /// Packed A (`lda = d_in`) and B (`ldb = rank`).
    pub fn packed(
        a: &'a B::Buffer<TA>,
        b: &'a B::Buffer<TA>,
        rank: usize,
        d_in: usize,
        scale: f32,
    ) -> Self {
        Lora {
            a,
            b,
            rank,
            lda: d_in,
            ldb: rank,
            scale,
        }
    }
}

/// Merge (`W += s·B·A`) or unmerge (`W −= s·B·A`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Merge,
    Unmerge,
}

const TILE_ROWS: usize = 16;

fn tile_cols(dtype: DType) -> usize {
    32 * (16 / dtype.size_bytes())
}

/// Everything checked before any launch; in-place ops mutate nothing on error.
fn validate<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &B::Buffer<TW>,
    shape: &MergeShape,
    lora: &Lora<'_, B, TA>,
) -> Result<()> {
    if !matches!(TW::DTYPE, DType::F32 | DType::F16 | DType::BF16) || !backend.supports(TW::DTYPE) {
        return Err(Error::UnsupportedDtype {
            arg: "w",
            backend: backend.name(),
            actual: TW::DTYPE,
            supported: "f32, f16, bf16".into(),
        });
    }
    if TA::DTYPE != TW::DTYPE && TA::DTYPE != DType::F32 {
        return Err(Error::UnsupportedDtype {
            arg: "a",
            backend: backend.name(),
            actual: TA::DTYPE,
            supported: format!("{} (W's dtype) or f32", TW::DTYPE),
        });
    }
    if !lora.scale.is_finite() {
        return Err(Error::invalid("scale", "a finite value", lora.scale));
    }
    for (arg, v) in [
        ("d_out", shape.d_out),
        ("d_in", shape.d_in),
        ("rank", lora.rank),
    ] {
        fits_i32(arg, v)?;
    }
    let (rows, cols) = shape.stored();
    for (arg, ld, min) in [
        ("ld_w", shape.ld_w, cols),
        ("lda", lora.lda, shape.d_in),
        ("ldb", lora.ldb, lora.rank),
    ] {
        check_stride(arg, ld, min, min)?;
    }
    let tiles = rows.div_ceil(TILE_ROWS) * cols.div_ceil(tile_cols(TW::DTYPE));
    if tiles > i32::MAX as usize {
        return Err(Error::invalid(
            "w",
            "at most 2^31 − 1 tiles of 16 rows × 16 bytes · 32",
            tiles,
        ));
    }
    check_extent(
        "w",
        backend.len(w),
        span(rows, cols, shape.ld_w),
        "the stored W",
    )?;
    let used = shape.elements() > 0;
    check_extent(
        "a",
        backend.len(lora.a),
        if used {
            span(lora.rank, shape.d_in, lora.lda)
        } else {
            Some(0)
        },
        "A [rank, d_in]",
    )?;
    check_extent(
        "b",
        backend.len(lora.b),
        if used {
            span(shape.d_out, lora.rank, lora.ldb)
        } else {
            Some(0)
        },
        "B [d_out, rank]",
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn params<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    lora: &Lora<'_, B, TA>,
    direction: Direction,
    flags: u32,
) -> sys::LkMergeParams {
    sys::LkMergeParams {
        w: backend.raw_ptr_mut(w),
        a: backend.raw_ptr(lora.a),
        b: backend.raw_ptr(lora.b),
        status: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        codes: std::ptr::null_mut(),
        exc_index: std::ptr::null_mut(),
        exc_bits: std::ptr::null_mut(),
        record_header: std::ptr::null_mut(),
        ld_w: shape.ld_w as i64,
        lda: lora.lda as i64,
        ldb: lora.ldb as i64,
        exc_capacity: 0,
        d_out: shape.d_out as i32,
        d_in: shape.d_in as i32,
        rank: lora.rank as i32,
        scale: lora.scale,
        w_dtype: TW::DTYPE.ffi_tag().unwrap_or(-1),
        ab_dtype: TA::DTYPE.ffi_tag().unwrap_or(-1),
        direction: match direction {
            Direction::Merge => sys::LK_MERGE_MERGE as i32,
            Direction::Unmerge => sys::LK_MERGE_UNMERGE as i32,
        },
        fan_in_fan_out: shape.fan_in_fan_out as i32,
        flags: flags as i32,
    }
}

/// Workspace bytes a safe or exact merge of this shape and W dtype needs on `backend` (0 on cpu).
pub fn workspace_bytes<B: Backend, TW: MergeFloat>(backend: &B, shape: &MergeShape) -> usize {
    let Some(l) = backend.launchers() else {
        return 0;
    };
    let (rows, cols) = shape.stored();
    let p = sys::LkMergeParams {
        w: std::ptr::null_mut(),
        a: std::ptr::null(),
        b: std::ptr::null(),
        status: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        codes: std::ptr::null_mut(),
        exc_index: std::ptr::null_mut(),
        exc_bits: std::ptr::null_mut(),
        record_header: std::ptr::null_mut(),
        ld_w: cols as i64,
        lda: 0,
        ldb: 0,
        exc_capacity: 0,
        d_out: shape.d_out.min(i32::MAX as usize) as i32,
        d_in: shape.d_in.min(i32::MAX as usize) as i32,
        rank: 0,
        scale: 1.0,
        w_dtype: TW::DTYPE.ffi_tag().unwrap_or(-1),
        ab_dtype: TW::DTYPE.ffi_tag().unwrap_or(-1),
        direction: sys::LK_MERGE_MERGE as i32,
        fan_in_fan_out: shape.fan_in_fan_out as i32,
        flags: sys::LK_MERGE_EXACT as i32,
    };
    let _ = rows;
    let f = pick_launcher!(
        l,
        sys::lk_emu_merge_workspace_size,
        sys::lk_cuda_merge_workspace_size
    );
    // SAFETY: a pure function of the params' sizes.
    unsafe { f(&p) }
}

/// Runs the launcher (emu / cuda).
///
/// # Safety
/// Every pointer in `p` valid for the sizes it states (the callers validated them).
unsafe fn launch<B: Backend>(backend: &B, p: &sys::LkMergeParams) -> Result<()> {
    let l = backend.launchers().expect("device backend");
    let f = pick_launcher!(l, sys::lk_emu_merge_apply, sys::lk_cuda_merge_apply);
    ffi::launch(backend, l, "merge_apply", f, p)
}

/// `W ← round(W ± scale·B·A)` in one pass (the default mode). Non-finite results are written as
/// they come; see [`merge_safe`] to refuse them.
pub fn apply<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    lora: &Lora<'_, B, TA>,
    direction: Direction,
) -> Result<()> {
    validate(backend, w, shape, lora)?;
    if backend.launchers().is_none() {
        let (a, bm) = host_ab(backend, lora);
        let w = backend.host_slice_mut(w).expect("host buffer");
        reference::direct(w, a, bm, shape, &dims(lora), s_fwd(lora.scale, direction));
        return Ok(());
    }
    let p = params(backend, w, shape, lora, direction, 0);
    // SAFETY: every length was validated against the shape above.
    unsafe { launch(backend, &p) }
}

/// [`apply`] with [`Direction::Merge`].
pub fn merge<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    lora: &Lora<'_, B, TA>,
) -> Result<()> {
    apply(backend, w, shape, lora, Direction::Merge)
}

/// [`apply`] with [`Direction::Unmerge`].
pub fn unmerge<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    lora: &Lora<'_, B, TA>,
) -> Result<()> {
    apply(backend, w, shape, lora, Direction::Unmerge)
}

/// Merges the adapters in order (one rounding per adapter and element).
pub fn merge_stack<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    loras: &[Lora<'_, B, TA>],
) -> Result<()> {
    for l in loras {
        validate(backend, w, shape, l)?;
    }
    loras.iter().try_for_each(|l| merge(backend, w, shape, l))
}

/// Unmerges the adapters of a [`merge_stack`] in reverse order.
pub fn unmerge_stack<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    loras: &[Lora<'_, B, TA>],
) -> Result<()> {
    for l in loras {
        validate(backend, w, shape, l)?;
    }
    loras
        .iter()
        .rev()
        .try_for_each(|l| unmerge(backend, w, shape, l))
}

/// Workspace and status word of safe merges (reusable across calls of the same shape and dtype).
pub struct MergeScratch<B: Backend> {
    workspace: B::Buffer<u8>,
    status: B::Buffer<u32>,
}

impl<B: Backend> MergeScratch<B> {
    pub fn alloc<TW: MergeFloat>(backend: &B, shape: &MergeShape) -> Result<Self> {
        Ok(MergeScratch {
            workspace: backend.alloc(workspace_bytes::<B, TW>(backend, shape).max(1))?,
            status: backend.alloc(1)?,
        })
    }
    /// The status word ([`status`] bits ORed by every safe merge since the last clear).
    pub fn status(&self, backend: &B) -> Result<u32> {
        Ok(backend.download(&self.status)?[0])
    }
    pub fn clear_status(&mut self, backend: &B) -> Result<()> {
        backend.write(&mut self.status, &[0])
    }
}

fn check_workspace<B: Backend, TW: MergeFloat>(
    backend: &B,
    ws: &B::Buffer<u8>,
    shape: &MergeShape,
) -> Result<()> {
    let need = workspace_bytes::<B, TW>(backend, shape);
    validate::check_workspace(
        backend.len(ws),
        need,
        "allocate the scratch for this shape and dtype",
    )
}

/// Safe merge / unmerge: a check pass first; if any result would be non-finite, W is left
/// bit-identical and [`status::NONFINITE`] is set in `scratch`'s status word (read it with
/// [`MergeScratch::status`]; clear it yourself). Graph-safe (no host sync).
pub fn merge_safe<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    lora: &Lora<'_, B, TA>,
    direction: Direction,
    scratch: &mut MergeScratch<B>,
) -> Result<()> {
    validate(backend, w, shape, lora)?;
    check_workspace::<B, TW>(backend, &scratch.workspace, shape)?;
    if backend.launchers().is_none() {
        let (a, bm) = host_ab(backend, lora);
        let st = backend.host_slice_mut(&mut scratch.status).expect("host");
        let w = backend.host_slice_mut(w).expect("host buffer");
        let s = s_fwd(lora.scale, direction);
        let (_, nonfinite) = reference::check(w, a, bm, shape, &dims(lora), s, false);
        if nonfinite {
            st[0] |= status::NONFINITE;
        } else {
            reference::direct(w, a, bm, shape, &dims(lora), s);
        }
        return Ok(());
    }
    let mut p = params(backend, w, shape, lora, direction, sys::LK_MERGE_SAFE);
    p.workspace = backend.raw_ptr_mut(&mut scratch.workspace);
    p.status = backend.raw_ptr_mut(&mut scratch.status).cast();
    // SAFETY: lengths validated above; the workspace has the launcher's size.
    unsafe { launch(backend, &p) }
}

/// The correction record of one exact merge (see the module docs for the format).
pub struct MergeRecord<B: Backend> {
    codes: B::Buffer<u32>,
    exc_index: B::Buffer<u64>,
    exc_bits: B::Buffer<u32>,
    header: B::Buffer<u64>,
    workspace: B::Buffer<u8>,
    status: B::Buffer<u32>,
    shape: MergeShape,
    dtype: DType,
    capacity: usize,
}

/// What a record says, read on request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordState {
    /// Exceptions the merge found (needed capacity; may exceed the record's).
    pub exceptions: u64,
    /// The merge was written and the record restores W.
    pub valid: bool,
    /// [`status`] bits of the launches that used this record.
    pub status: u32,
}

/// A record in host memory: the backend-independent form (same format everywhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRecord {
    pub shape: MergeShape,
    pub dtype: DType,
    pub codes: Vec<u32>,
    pub exc_index: Vec<u64>,
    pub exc_bits: Vec<u32>,
    pub header: [u64; 2],
}

impl HostRecord {
    /// Bytes the record occupies: codes + exceptions in use + header.
    pub fn used_bytes(&self) -> usize {
        self.codes.len() * 4 + (self.header[0] as usize).min(self.exc_index.len()) * 12 + 16
    }
}

impl<B: Backend> MergeRecord<B> {
    /// A record for exact merges of W (`TW`) with this shape, holding up to `capacity` exceptions.
    pub fn alloc<TW: MergeFloat>(backend: &B, shape: &MergeShape, capacity: usize) -> Result<Self> {
        if capacity > i64::MAX as usize {
            return Err(Error::invalid("capacity", "≤ i64::MAX", capacity));
        }
        Ok(MergeRecord {
            codes: backend.alloc(shape.code_words().max(1))?,
            exc_index: backend.alloc(capacity.max(1))?,
            exc_bits: backend.alloc(capacity.max(1))?,
            header: backend.alloc(2)?,
            workspace: backend.alloc(workspace_bytes::<B, TW>(backend, shape).max(1))?,
            status: backend.alloc(1)?,
            shape: *shape,
            dtype: TW::DTYPE,
            capacity,
        })
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn shape(&self) -> MergeShape {
        self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Reads the header and status word (synchronises with the queued work).
    pub fn state(&self, backend: &B) -> Result<RecordState> {
        let h = backend.download(&self.header)?;
        Ok(RecordState {
            exceptions: h[0],
            valid: h[1] == 1,
            status: backend.download(&self.status)?[0],
        })
    }
    pub fn clear_status(&mut self, backend: &B) -> Result<()> {
        backend.write(&mut self.status, &[0])
    }
    /// Copies the record to the host.
    pub fn to_host(&self, backend: &B) -> Result<HostRecord> {
        let h = backend.download(&self.header)?;
        let mut exc_index = backend.download(&self.exc_index)?;
        let mut exc_bits = backend.download(&self.exc_bits)?;
        exc_index.truncate(self.capacity);
        exc_bits.truncate(self.capacity);
        let mut codes = backend.download(&self.codes)?;
        codes.truncate(self.shape.code_words());
        Ok(HostRecord {
            shape: self.shape,
            dtype: self.dtype,
            codes,
            exc_index,
            exc_bits,
            header: [h[0], h[1]],
        })
    }
    /// A record on `backend` from its host form (e.g. made on another backend).
    pub fn from_host<TW: MergeFloat>(backend: &B, host: &HostRecord) -> Result<Self> {
        if host.dtype != TW::DTYPE {
            return Err(Error::UnsupportedDtype {
                arg: "record",
                backend: backend.name(),
                actual: host.dtype,
                supported: format!("{} (W's dtype)", TW::DTYPE),
            });
        }
        if host.codes.len() != host.shape.code_words()
            || host.exc_index.len() != host.exc_bits.len()
        {
            return Err(Error::invalid(
                "record",
                format!(
                    "{} code words and equal exception arrays",
                    host.shape.code_words()
                ),
                format!(
                    "{} code words, {} / {} exceptions",
                    host.codes.len(),
                    host.exc_index.len(),
                    host.exc_bits.len()
                ),
            ));
        }
        let mut r = Self::alloc::<TW>(backend, &host.shape, host.exc_index.len())?;
        let pad = |v: &[u32]| {
            let mut v = v.to_vec();
            v.resize(v.len().max(1), 0);
            v
        };
        backend.write(&mut r.codes, &pad(&host.codes))?;
        let mut idx = host.exc_index.clone();
        idx.resize(idx.len().max(1), 0);
        backend.write(&mut r.exc_index, &idx)?;
        backend.write(&mut r.exc_bits, &pad(&host.exc_bits))?;
        backend.write(&mut r.header, &host.header)?;
        Ok(r)
    }

    fn check_for<TW: MergeFloat>(&self, shape: &MergeShape) -> Result<()> {
        if self.shape != *shape {
            return Err(Error::invalid(
                "record",
                format!("a record of shape {shape:?}"),
                format!("{:?}", self.shape),
            ));
        }
        if self.dtype != TW::DTYPE {
            return Err(Error::invalid(
                "record",
                format!("a record of {} W", TW::DTYPE),
                self.dtype,
            ));
        }
        Ok(())
    }

    fn fill_params(&mut self, backend: &B, p: &mut sys::LkMergeParams) {
        p.codes = backend.raw_ptr_mut(&mut self.codes).cast();
        p.exc_index = backend.raw_ptr_mut(&mut self.exc_index).cast();
        p.exc_bits = backend.raw_ptr_mut(&mut self.exc_bits).cast();
        p.record_header = backend.raw_ptr_mut(&mut self.header).cast();
        p.workspace = backend.raw_ptr_mut(&mut self.workspace);
        p.status = backend.raw_ptr_mut(&mut self.status).cast();
        p.exc_capacity = self.capacity as i64;
    }
}

/// Exact merge: `W ← round(W + s·B·A)` and a correction record so that [`unmerge_exact`] restores
/// W bit for bit. If the exceptions exceed the record's capacity — or, with `safe`, a result would
/// be non-finite — nothing is written; [`MergeRecord::state`] then reports `valid: false`, the
/// exceptions needed and the [`status`] bit. Graph-safe (no host sync); read the state on request.
pub fn merge_exact<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    lora: &Lora<'_, B, TA>,
    record: &mut MergeRecord<B>,
    safe: bool,
) -> Result<()> {
    validate(backend, w, shape, lora)?;
    record.check_for::<TW>(shape)?;
    check_workspace::<B, TW>(backend, &record.workspace, shape)?;
    if backend.launchers().is_none() {
        let (a, bm) = host_ab(backend, lora);
        let w = backend.host_slice_mut(w).expect("host buffer");
        let s = s_fwd(lora.scale, Direction::Merge);
        let d = dims(lora);
        let (needed, nonfinite) = reference::check(w, a, bm, shape, &d, s, true);
        let overflow = needed > record.capacity as u64;
        let refused = overflow || (safe && nonfinite);
        let st = backend.host_slice_mut(&mut record.status).expect("host");
        if overflow {
            st[0] |= status::OVERFLOW;
        }
        if safe && nonfinite {
            st[0] |= status::NONFINITE;
        }
        backend.host_slice_mut(&mut record.header).expect("host")[..2]
            .copy_from_slice(&[needed, u64::from(!refused)]);
        if !refused {
            let codes = backend.host_slice_mut(&mut record.codes).expect("host");
            let idx = backend.host_slice_mut(&mut record.exc_index).expect("host");
            let bits = backend.host_slice_mut(&mut record.exc_bits).expect("host");
            reference::write_exact(w, a, bm, shape, &d, s, codes, idx, bits);
        }
        return Ok(());
    }
    let flags = sys::LK_MERGE_EXACT | if safe { sys::LK_MERGE_SAFE } else { 0 };
    let mut p = params(backend, w, shape, lora, Direction::Merge, flags);
    record.fill_params(backend, &mut p);
    // SAFETY: lengths validated above; the record's buffers were sized for this shape at alloc.
    unsafe { launch(backend, &p) }
}

/// Exact unmerge: restores the W that [`merge_exact`] saw, bit for bit, using its record (made on
/// any backend). An invalid record (the merge was refused) writes nothing and sets
/// [`status::BAD_RECORD`] in the record's status word.
pub fn unmerge_exact<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    lora: &Lora<'_, B, TA>,
    record: &mut MergeRecord<B>,
) -> Result<()> {
    validate(backend, w, shape, lora)?;
    record.check_for::<TW>(shape)?;
    if backend.launchers().is_none() {
        let (a, bm) = host_ab(backend, lora);
        let w = backend.host_slice_mut(w).expect("host buffer");
        let h = backend.host_slice(&record.header).expect("host");
        let (n, valid) = (h[0], h[1] == 1);
        if !valid || n > record.capacity as u64 {
            backend.host_slice_mut(&mut record.status).expect("host")[0] |= status::BAD_RECORD;
            return Ok(());
        }
        let s = s_fwd(lora.scale, Direction::Unmerge);
        let codes = backend.host_slice(&record.codes).expect("host");
        let idx = &backend.host_slice(&record.exc_index).expect("host")[..n as usize];
        let bits = &backend.host_slice(&record.exc_bits).expect("host")[..n as usize];
        let bad = reference::unmerge_exact(w, a, bm, shape, &dims(lora), s, codes, idx, bits);
        if bad {
            backend.host_slice_mut(&mut record.status).expect("host")[0] |= status::BAD_RECORD;
        }
        return Ok(());
    }
    let mut p = params(
        backend,
        w,
        shape,
        lora,
        Direction::Unmerge,
        sys::LK_MERGE_EXACT,
    );
    record.fill_params(backend, &mut p);
    // SAFETY: as in merge_exact.
    unsafe { launch(backend, &p) }
}

/// Exact merges of a stack, in order, each with its own record (same length as `loras`). Eager:
/// reads each record's state. If adapter k is refused (capacity, or non-finite with `safe`), the
/// adapters before it are unmerged exactly (W is restored bit for bit) and `Ok(Some(k))` is
/// returned: retry with a larger record k ([`RecordState::exceptions`]). `Ok(None)`: all merged.
pub fn merge_stack_exact<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    loras: &[Lora<'_, B, TA>],
    records: &mut [MergeRecord<B>],
    safe: bool,
) -> Result<Option<usize>> {
    if records.len() != loras.len() {
        return Err(Error::invalid(
            "records",
            format!("{} records (one per adapter)", loras.len()),
            records.len(),
        ));
    }
    for (l, r) in loras.iter().zip(records.iter()) {
        validate(backend, w, shape, l)?;
        r.check_for::<TW>(shape)?;
    }
    for k in 0..loras.len() {
        merge_exact(backend, w, shape, &loras[k], &mut records[k], safe)?;
        if !records[k].state(backend)?.valid {
            for j in (0..k).rev() {
                unmerge_exact(backend, w, shape, &loras[j], &mut records[j])?;
            }
            return Ok(Some(k));
        }
    }
    Ok(None)
}

/// Exact unmerges of a [`merge_stack_exact`], in reverse order.
pub fn unmerge_stack_exact<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    w: &mut B::Buffer<TW>,
    shape: &MergeShape,
    loras: &[Lora<'_, B, TA>],
    records: &mut [MergeRecord<B>],
) -> Result<()> {
    if records.len() != loras.len() {
        return Err(Error::invalid(
            "records",
            format!("{} records (one per adapter)", loras.len()),
            records.len(),
        ));
    }
    for (l, r) in loras.iter().zip(records.iter()) {
        validate(backend, w, shape, l)?;
        r.check_for::<TW>(shape)?;
    }
    for k in (0..loras.len()).rev() {
        unmerge_exact(backend, w, shape, &loras[k], &mut records[k])?;
    }
    Ok(())
}

fn s_fwd(scale: f32, d: Direction) -> f32 {
    match d {
        Direction::Merge => scale,
        Direction::Unmerge => -scale,
    }
}

fn dims<B: Backend, TA: Float>(l: &Lora<'_, B, TA>) -> reference::Dims {
    reference::Dims {
        rank: l.rank,
        lda: l.lda,
        ldb: l.ldb,
    }
}

fn host_ab<'l, B: Backend, TA: Float>(backend: &B, l: &Lora<'l, B, TA>) -> (&'l [TA], &'l [TA]) {
    (
        backend.host_slice(l.a).expect("host buffer"),
        backend.host_slice(l.b).expect("host buffer"),
    )
}

/// The plain-Rust reference (the cpu backend's kernel): exactly the contract's ops, in f32 with
/// `f32::mul_add`, so its bits equal the emu's and cuda's.
pub mod reference {
    use super::{MergeFloat, MergeShape};
    use crate::dtype::Float;

    /// A's and B's rank and row strides.
    #[derive(Clone, Copy, Debug)]
    pub struct Dims {
        pub rank: usize,
        pub lda: usize,
        pub ldb: usize,
    }

    /// `acc = Σ_r B[i, r] · A[r, j]` as the fixed chain of fused multiply-adds, increasing r.
    pub fn delta<TA: Float>(a: &[TA], b: &[TA], d: &Dims, i: usize, j: usize) -> f32 {
        let mut acc = 0.0f32;
        for r in 0..d.rank {
            acc = b[i * d.ldb + r]
                .to_f32()
                .mul_add(a[r * d.lda + j].to_f32(), acc);
        }
        acc
    }

    /// `round(s.mul_add(acc, w))` as bits of TW.
    pub fn step<TW: MergeFloat>(w_bits: u32, s: f32, acc: f32) -> u32 {
        TW::round_bits(s.mul_add(acc, TW::from_bits32(w_bits).to_f32()))
    }

    /// Order-preserving integer of a bit pattern (−0 just below +0).
    pub fn order_key<TW: MergeFloat>(b: u32) -> i64 {
        let mag = (b & !TW::SIGN) as i64;
        if b & TW::SIGN != 0 {
            -mag - 1
        } else {
            mag
        }
    }
    pub fn from_key<TW: MergeFloat>(k: i64) -> u32 {
        if k >= 0 {
            k as u32
        } else {
            TW::SIGN | (-(k + 1)) as u32
        }
    }
    /// 0: w = u; 1: one step up; 2: one step down; 3: exception.
    pub fn correction_code<TW: MergeFloat>(w: u32, u: u32) -> u32 {
        if w == u {
            return 0;
        }
        let k = order_key::<TW>(u);
        if from_key::<TW>(k + 1) == w {
            1
        } else if from_key::<TW>(k - 1) == w {
            2
        } else {
            3
        }
    }
    pub fn apply_code<TW: MergeFloat>(u: u32, code: u32) -> u32 {
        match code {
            0 => u,
            1 => from_key::<TW>(order_key::<TW>(u) + 1),
            _ => from_key::<TW>(order_key::<TW>(u) - 1),
        }
    }

    /// Calls `f(p, q, i, j)` for every stored element in increasing flat index.
    fn for_each(shape: &MergeShape, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (rows, cols) = shape.stored();
        for p in 0..rows {
            for q in 0..cols {
                let (i, j) = if shape.fan_in_fan_out { (q, p) } else { (p, q) };
                f(p, q, i, j);
            }
        }
    }

    /// One pass: `W ← round(W + s·acc)` (s = ±scale).
    pub fn direct<TW: MergeFloat, TA: Float>(
        w: &mut [TW],
        a: &[TA],
        b: &[TA],
        shape: &MergeShape,
        d: &Dims,
        s: f32,
    ) {
        for_each(shape, |p, q, i, j| {
            let k = p * shape.ld_w + q;
            w[k] = TW::from_bits32(step::<TW>(w[k].bits32(), s, delta(a, b, d, i, j)));
        });
    }

    /// The check pass: (exceptions an exact record needs — counted only if `exact`, any non-finite
    /// result). Reads W only.
    pub fn check<TW: MergeFloat, TA: Float>(
        w: &[TW],
        a: &[TA],
        b: &[TA],
        shape: &MergeShape,
        d: &Dims,
        s: f32,
        exact: bool,
    ) -> (u64, bool) {
        let (mut n, mut nonfinite) = (0u64, false);
        for_each(shape, |p, q, i, j| {
            let wb = w[p * shape.ld_w + q].bits32();
            let acc = delta(a, b, d, i, j);
            let m = step::<TW>(wb, s, acc);
            nonfinite |= m & TW::EXP == TW::EXP;
            if exact && correction_code::<TW>(wb, step::<TW>(m, -s, acc)) == 3 {
                n += 1;
            }
        });
        (n, nonfinite)
    }

    /// The write pass of an exact merge: W, the codes and the exceptions (capacity checked before).
    #[allow(clippy::too_many_arguments)]
    pub fn write_exact<TW: MergeFloat, TA: Float>(
        w: &mut [TW],
        a: &[TA],
        b: &[TA],
        shape: &MergeShape,
        d: &Dims,
        s: f32,
        codes: &mut [u32],
        exc_index: &mut [u64],
        exc_bits: &mut [u32],
    ) {
        let (_, cols) = shape.stored();
        let wpr = cols.div_ceil(16);
        codes[..shape.code_words()].fill(0);
        let mut slot = 0;
        for_each(shape, |p, q, i, j| {
            let k = p * shape.ld_w + q;
            let wb = w[k].bits32();
            let acc = delta(a, b, d, i, j);
            let m = step::<TW>(wb, s, acc);
            let code = correction_code::<TW>(wb, step::<TW>(m, -s, acc));
            codes[p * wpr + q / 16] |= code << (2 * (q % 16));
            if code == 3 {
                exc_index[slot] = (p * cols + q) as u64;
                exc_bits[slot] = wb;
                slot += 1;
            }
            w[k] = TW::from_bits32(m);
        });
    }

    /// Exact unmerge from a valid record; returns whether an exception index was out of range.
    #[allow(clippy::too_many_arguments)]
    pub fn unmerge_exact<TW: MergeFloat, TA: Float>(
        w: &mut [TW],
        a: &[TA],
        b: &[TA],
        shape: &MergeShape,
        d: &Dims,
        s: f32,
        codes: &[u32],
        exc_index: &[u64],
        exc_bits: &[u32],
    ) -> bool {
        let (rows, cols) = shape.stored();
        let wpr = cols.div_ceil(16);
        for_each(shape, |p, q, i, j| {
            let k = p * shape.ld_w + q;
            let code = (codes[p * wpr + q / 16] >> (2 * (q % 16))) & 3;
            if code != 3 {
                let u = step::<TW>(w[k].bits32(), s, delta(a, b, d, i, j));
                w[k] = TW::from_bits32(apply_code::<TW>(u, code));
            }
        });
        let mut bad = false;
        for (&e, &bits) in exc_index.iter().zip(exc_bits) {
            if e >= (rows * cols) as u64 {
                bad = true;
                continue;
            }
            let (p, q) = (e as usize / cols, e as usize % cols);
            w[p * shape.ld_w + q] = TW::from_bits32(bits);
        }
        bad
    }
}
