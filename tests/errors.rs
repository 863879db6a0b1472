//! Bad input never crashes and never corrupts: every validation branch returns a typed error and
//! leaves the output untouched.

mod common;

use common::*;
use lora_kernels::ffi::{self, sys};
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, KernelErrorKind};

fn invalid_arg(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn shrink_rejects<B: Backend>(b: &B) {
    let shape = ShrinkDense::new(4, 10, 3);
    let x = b.upload(&[1.0f32; 40]).unwrap();
    let a = b.upload(&[1.0f32; 30]).unwrap();
    let short_x = b.upload(&[1.0f32; 39]).unwrap();
    let short_a = b.upload(&[1.0f32; 29]).unwrap();
    let mut u = b.upload(&[POISON; 12]).unwrap();
    let mut short_u = b.upload(&[POISON; 11]).unwrap();

    assert_eq!(
        invalid_arg(shrink_dense(b, &short_x, &a, &mut u, &shape).unwrap_err()),
        "x"
    );
    assert_eq!(
        invalid_arg(shrink_dense(b, &x, &short_a, &mut u, &shape).unwrap_err()),
        "a"
    );
    assert_eq!(
        invalid_arg(shrink_dense(b, &x, &a, &mut short_u, &shape).unwrap_err()),
        "u"
    );
    let bad_ld = ShrinkDense { ld_x: 9, ..shape };
    assert_eq!(
        invalid_arg(shrink_dense(b, &x, &a, &mut u, &bad_ld).unwrap_err()),
        "ld_x"
    );
    let bad_lda = ShrinkDense { lda: 3, ..shape };
    assert_eq!(
        invalid_arg(shrink_dense(b, &x, &a, &mut u, &bad_lda).unwrap_err()),
        "lda"
    );
    let bad_ldu = ShrinkDense { ld_u: 2, ..shape };
    assert_eq!(
        invalid_arg(shrink_dense(b, &x, &a, &mut u, &bad_ldu).unwrap_err()),
        "ld_u"
    );
    let huge = ShrinkDense {
        tokens: i32::MAX as usize + 1,
        ..shape
    };
    assert_eq!(
        invalid_arg(shrink_dense(b, &x, &a, &mut u, &huge).unwrap_err()),
        "tokens"
    );
    let overflow = ShrinkDense {
        tokens: 3,
        ld_x: usize::MAX / 2,
        ..shape
    };
    assert_eq!(
        invalid_arg(shrink_dense(b, &x, &a, &mut u, &overflow).unwrap_err()),
        "x"
    );

    // x must be the weights' dtype or f32.
    let x16 = b.upload(&[f16::ONE; 40]).unwrap();
    let abf = b.upload(&[bf16::ONE; 30]).unwrap();
    match shrink_dense(b, &x16, &abf, &mut u, &shape).unwrap_err() {
        Error::UnsupportedDtype {
            arg: "x",
            actual: DType::F16,
            ..
        } => {}
        other => panic!("expected UnsupportedDtype for x, got {other:?}"),
    }
    // Nothing was written by any rejected call.
    assert!(b
        .download(&u)
        .unwrap()
        .iter()
        .all(|v| v.to_bits() == POISON.to_bits()));
    // Empty work is fine and writes nothing.
    shrink_dense(b, &x, &a, &mut u, &ShrinkDense::new(0, 10, 3)).unwrap();
    shrink_dense(b, &x, &a, &mut u, &ShrinkDense::new(4, 10, 0)).unwrap();
    assert!(b
        .download(&u)
        .unwrap()
        .iter()
        .all(|v| v.to_bits() == POISON.to_bits()));
}

#[test]
fn shrink_validation_cpu() {
    shrink_rejects(&Cpu);
}

#[test]
fn shrink_validation_emu() {
    shrink_rejects(&Emu);
}

#[test]
fn f64_only_on_cpu() {
    let x = vec![1.0f64; 4];
    let mut u = vec![0.0f32; 1];
    match shrink_dense(&Emu, &x, &x, &mut u, &ShrinkDense::new(1, 4, 1)).unwrap_err() {
        Error::UnsupportedDtype {
            backend: "emu",
            actual: DType::F64,
            ..
        } => {}
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
    shrink_dense(&Cpu, &x, &x, &mut u, &ShrinkDense::new(1, 4, 1)).unwrap();
    assert_eq!(u, [4.0]);
}

/// The C launcher validates on its own too (C/C++ callers have no Rust in front of them).
#[test]
fn c_launcher_rejects_bad_params_with_a_message() {
    // SAFETY: every pointer in the params below is either null or valid for the sizes it states.
    let call = |p: &sys::LkShrinkDenseParams| unsafe {
        ffi::EMU.call(
            "shrink_dense",
            ffi::EMU.shrink_dense,
            p,
            std::ptr::null_mut(),
        )
    };
    // A default (all-zero) params struct: zero tokens, nothing to do.
    call(&sys::LkShrinkDenseParams::default()).unwrap();
    let mut u = [0.0f32; 4];
    let x = [1.0f32; 4];
    let base = sys::LkShrinkDenseParams {
        x: x.as_ptr().cast(),
        a: x.as_ptr().cast(),
        u: u.as_mut_ptr(),
        ld_x: 4,
        lda: 4,
        ld_u: 1,
        tokens: 1,
        d_in: 4,
        rank: 1,
        x_dtype: sys::LkDtype::LK_F32 as i32,
        w_dtype: sys::LkDtype::LK_F32 as i32,
    };
    let cases = [
        (
            sys::LkShrinkDenseParams { tokens: -1, ..base },
            KernelErrorKind::InvalidArgument,
            "negative",
        ),
        (
            sys::LkShrinkDenseParams { ld_x: 3, ..base },
            KernelErrorKind::InvalidArgument,
            "leading dimension",
        ),
        (
            sys::LkShrinkDenseParams {
                u: std::ptr::null_mut(),
                ..base
            },
            KernelErrorKind::InvalidArgument,
            "null",
        ),
        (
            sys::LkShrinkDenseParams { x_dtype: 7, ..base },
            KernelErrorKind::UnsupportedDtype,
            "dtype",
        ),
        (
            sys::LkShrinkDenseParams {
                x_dtype: sys::LkDtype::LK_F16 as i32,
                w_dtype: sys::LkDtype::LK_BF16 as i32,
                ..base
            },
            KernelErrorKind::UnsupportedDtype,
            "dtype",
        ),
    ];
    for (p, kind, needle) in cases {
        let err = call(&p).unwrap_err();
        assert_eq!(err.kernel_kind(), Some(kind), "{err}");
        assert!(
            err.to_string().contains(needle),
            "message `{err}` should mention `{needle}`"
        );
    }
    // A null params pointer.
    let code = unsafe { sys::lk_emu_shrink_dense(std::ptr::null(), std::ptr::null_mut()) };
    assert_eq!(code as u32, sys::LK_ERR_INVALID_ARGUMENT);
    call(&base).unwrap();
    assert_eq!(u[0], 4.0);
}

/// The serving launchers validate what C callers pass (host-visible fields only) and name the field.
#[test]
fn serving_c_launchers_reject_bad_params() {
    let x = [1.0f32; 64];
    let mut u = [0.0f32; 64];
    let ids = [0i32; 4];
    let table = [sys::LkAdapterEntry {
        a: x.as_ptr().cast(),
        b: x.as_ptr().cast(),
        lda: 4,
        ldb: 2,
        rank: 2,
        scale: 1.0,
    }; 2];
    let shrink = sys::LkBgmvShrinkParams {
        x: x.as_ptr().cast(),
        u: u.as_mut_ptr(),
        table: table.as_ptr(),
        token_adapter: ids.as_ptr(),
        error_word: std::ptr::null_mut(),
        ld_x: 4,
        tokens: 4,
        d_in: 4,
        n_adapters: 1,
        n_slices: 2,
        r_cap: 2,
        x_dtype: sys::LkDtype::LK_F32 as i32,
        w_dtype: sys::LkDtype::LK_F32 as i32,
    };
    // SAFETY: the params point at live host buffers of the sizes they state.
    let call = |p: &sys::LkBgmvShrinkParams| unsafe {
        ffi::EMU.call("bgmv_shrink", ffi::EMU.bgmv_shrink, p, std::ptr::null_mut())
    };
    call(&shrink).unwrap();
    let bad = [
        (
            sys::LkBgmvShrinkParams {
                n_slices: 0,
                ..shrink
            },
            "n_slices",
        ),
        (
            sys::LkBgmvShrinkParams {
                n_slices: 9,
                ..shrink
            },
            "n_slices",
        ),
        (
            sys::LkBgmvShrinkParams {
                r_cap: 5000,
                ..shrink
            },
            "r_cap",
        ),
        (sys::LkBgmvShrinkParams { ld_x: 3, ..shrink }, "ld_x"),
        (
            sys::LkBgmvShrinkParams {
                tokens: -1,
                ..shrink
            },
            "tokens",
        ),
        (
            sys::LkBgmvShrinkParams {
                table: std::ptr::null(),
                ..shrink
            },
            "table",
        ),
        (
            sys::LkBgmvShrinkParams {
                x_dtype: sys::LkDtype::LK_F16 as i32,
                w_dtype: sys::LkDtype::LK_BF16 as i32,
                ..shrink
            },
            "dtype",
        ),
    ];
    for (p, field) in bad {
        let e = call(&p).unwrap_err();
        assert!(
            matches!(
                e.kernel_kind(),
                Some(KernelErrorKind::InvalidArgument | KernelErrorKind::UnsupportedDtype)
            ),
            "{field}: {e}"
        );
        assert!(e.to_string().contains(field), "`{e}` should name {field}");
    }
    let mut out = [0.0f32; 16];
    let mut slices = [sys::LkSlice { n: 0, offset: 0 }; 8];
    slices[0] = sys::LkSlice { n: 2, offset: 0 };
    slices[1] = sys::LkSlice { n: 2, offset: 2 };
    let expand = sys::LkBgmvExpandParams {
        u: u.as_ptr(),
        out: out.as_mut_ptr().cast(),
        table: table.as_ptr(),
        token_adapter: ids.as_ptr(),
        error_word: std::ptr::null_mut(),
        ld_out: 4,
        slices,
        tokens: 4,
        n_adapters: 1,
        n_slices: 2,
        r_cap: 2,
        out_dtype: sys::LkDtype::LK_F32 as i32,
        w_dtype: sys::LkDtype::LK_F32 as i32,
        mode: sys::LK_EXPAND_ADD as i32,
    };
    // SAFETY: as above.
    let call = |p: &sys::LkBgmvExpandParams| unsafe {
        ffi::EMU.call("bgmv_expand", ffi::EMU.bgmv_expand, p, std::ptr::null_mut())
    };
    call(&expand).unwrap();
    let mut overlapping = slices;
    overlapping[1].offset = 1;
    let mut past_end = slices;
    past_end[1].offset = 3;
    let bad = [
        (sys::LkBgmvExpandParams { mode: 7, ..expand }, "mode"),
        (
            sys::LkBgmvExpandParams {
                slices: overlapping,
                ..expand
            },
            "overlap",
        ),
        (
            sys::LkBgmvExpandParams {
                slices: past_end,
                ..expand
            },
            "ld_out",
        ),
        (
            sys::LkBgmvExpandParams {
                out: std::ptr::null_mut(),
                ..expand
            },
            "out",
        ),
    ];
    for (p, field) in bad {
        let e = call(&p).unwrap_err();
        assert_eq!(
            e.kernel_kind(),
            Some(KernelErrorKind::InvalidArgument),
            "{field}: {e}"
        );
        assert!(e.to_string().contains(field), "`{e}` should name {field}");
    }
    // SGMV planner: capacity below min(tokens, n_adapters).
    let (mut rows, mut starts, mut segs, mut n) = ([0i32; 4], [0i32; 3], [0i32; 2], 0i32);
    let plan = sys::LkSgmvPlanParams {
        token_adapter: ids.as_ptr(),
        row_index: rows.as_mut_ptr(),
        seg_starts: starts.as_mut_ptr(),
        seg_adapter: segs.as_mut_ptr(),
        n_segments: &mut n,
        error_word: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        tokens: 4,
        n_adapters: 3,
        max_segments: 2,
    };
    // SAFETY: as above (the launcher must refuse before touching the null workspace).
    let e = unsafe { ffi::EMU.call("sgmv_plan", ffi::EMU.sgmv_plan, &plan, std::ptr::null_mut()) }
        .unwrap_err();
    assert!(e.to_string().contains("max_segments"), "{e}");
}
