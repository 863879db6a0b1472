//! Argument checks shared by the kernel families (crate-private).
//!
//! Every check returns [`Error::InvalidArgument`] or [`Error::UnsupportedDtype`] naming the
//! caller's `arg`, so callers (and the tests) can tell which argument was rejected.

use std::fmt::Display;

use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// What [`check_dtype`] reports as supported.
const FLOAT_DTYPES: &str = "f32, f16, bf16 (f64 on the cpu backend only)";

/// `v` fits the kernels' int32 sizes and indices.
pub(crate) fn fits_i32(arg: &'static str, v: usize) -> Result<()> {
    if v > i32::MAX as usize {
        Err(Error::invalid(arg, format!("≤ {} (int32)", i32::MAX), v))
    } else {
        Ok(())
    }
}

/// `a · b`, or InvalidArgument on `arg` when it does not fit i64 (the kernels' flat index type).
pub(crate) fn elems_i64(arg: &'static str, a: usize, b: usize) -> Result<usize> {
    match a.checked_mul(b) {
        Some(n) if n <= i64::MAX as usize => Ok(n),
        _ => Err(Error::invalid(
            arg,
            format!("a size that fits in i64 ({a} · {b})"),
            "overflow",
        )),
    }
}

/// A buffer of `have` elements holds at least `need`.
pub(crate) fn check_len(arg: &'static str, have: usize, need: usize) -> Result<()> {
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

/// Like [`check_len`] for a computed requirement: `need` is None when it overflowed usize, and
/// `detail` (the shape it came from) goes into the message.
pub(crate) fn check_extent(
    arg: &'static str,
    have: usize,
    need: Option<usize>,
    detail: impl Display,
) -> Result<()> {
    let need = need.ok_or_else(|| Error::invalid(arg, "a size that fits in usize", "overflow"))?;
    if have < need {
        return Err(Error::invalid(
            arg,
            format!("a buffer of ≥ {need} elements ({detail})"),
            have,
        ));
    }
    Ok(())
}

/// Elements a row-major `[rows, cols]` matrix with row stride `ld` spans (None on overflow).
pub(crate) fn span(rows: usize, cols: usize, ld: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1).checked_mul(ld)?.checked_add(cols)
}

/// A buffer of `have` elements holds a row-major `[rows, cols]` matrix with row stride `ld`.
pub(crate) fn check_matrix_len(
    arg: &'static str,
    have: usize,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<()> {
    check_extent(
        arg,
        have,
        span(rows, cols, ld),
        format_args!("{rows} rows of {cols}, stride {ld}"),
    )
}

/// A row stride: at least the row length `min` (`what` names it in the message) and ≤ i64::MAX.
pub(crate) fn check_stride(
    arg: &'static str,
    ld: usize,
    min: usize,
    what: impl Display,
) -> Result<()> {
    if ld < min {
        return Err(Error::invalid(arg, format!("≥ {what}"), ld));
    }
    if ld > i64::MAX as usize {
        return Err(Error::invalid(arg, "≤ i64::MAX", ld));
    }
    Ok(())
}

/// The backend takes the element dtype `d` (f32, f16, bf16; f64 on cpu only).
pub(crate) fn check_dtype<B: Backend>(b: &B, arg: &'static str, d: DType) -> Result<()> {
    if b.supports(d) {
        Ok(())
    } else {
        Err(Error::UnsupportedDtype {
            arg,
            backend: b.name(),
            actual: d,
            supported: FLOAT_DTYPES.into(),
        })
    }
}

/// A status / fault word buffer (`have` u32s) holds its one word.
pub(crate) fn check_word(arg: &'static str, have: usize) -> Result<()> {
    if have == 0 {
        Err(Error::invalid(arg, "a buffer of ≥ 1 u32", 0))
    } else {
        Ok(())
    }
}

/// The `fault` word buffer the index-checking kernels OR their fault bits into.
pub(crate) fn check_fault<B: Backend>(b: &B, fault: &B::Buffer<u32>) -> Result<()> {
    check_word("fault", b.len(fault))
}

/// A `workspace` of `have` bytes holds the `need` bytes that `sizer` (the function that computes
/// it, or a hint) asks for.
pub(crate) fn check_workspace(have: usize, need: usize, sizer: &str) -> Result<()> {
    if have < need {
        Err(Error::invalid(
            "workspace",
            format!("≥ {need} bytes ({sizer})"),
            have,
        ))
    } else {
        Ok(())
    }
}
