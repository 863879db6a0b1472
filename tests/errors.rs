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
