//! RMSNorm forward/backward: emu vs the cpu reference with derived tolerances at odd sizes and on
//! every work-split path, NaN-poisoned outputs, schedules, bad inputs, and f64 finite-difference
//! checks of the reference backward (dx and dw).

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use lora_kernels::ffi::sys;
use lora_kernels::norm::{
    rmsnorm_backward, rmsnorm_backward_workspace_bytes, rmsnorm_forward, RmsNorm,
};
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, Float, Schedule};
use proptest::prelude::*;

/// Central finite difference of `f` at `v[k]` with step h.
fn central(v: &mut [f64], k: usize, h: f64, f: &mut dyn FnMut(&[f64]) -> f64) -> f64 {
    let old = v[k];
    v[k] = old + h;
    let plus = f(v);
    v[k] = old - h;
    let minus = f(v);
    v[k] = old;
    (plus - minus) / (2.0 * h)
}

fn loss(s: &RmsNorm, x: &[f64], w: &[f64], g: &[f64]) -> f64 {
    let mut y = vec![0.0f64; s.rows * s.dim];
    let mut rstd = vec![0.0f32; s.rows];
    rmsnorm_forward(&Cpu, s, &x.to_vec(), &w.to_vec(), &mut y, &mut rstd).unwrap();
    y.iter().zip(g).map(|(a, b)| a * b).sum()
}

/// dL/dx and dL/dw of L = Σ y ⊙ G from the reference backward agree with central differences
/// (h = 1e-6, f64). The backward uses the saved f32 rstd (relative error ≤ 2⁻²⁴, entering dx as
/// rstd and rstd³), so agreement is ~1e-7 relative; the bound is 1e-6 · max(1, |analytic|).
#[test]
fn reference_backward_matches_finite_differences() {
    for (rows, dim, eps, seed) in [
        (1, 1, 1e-5f32, 1u64),
        (3, 7, 0.1, 2),
        (4, 33, 1e-6, 3),
        (2, 2, 0.0, 4),
    ] {
        let s = RmsNorm::new(rows, dim, eps);
        let mut r = rng(seed);
        let mut x: Vec<f64> = random_vec(&mut r, rows * dim);
        let mut w: Vec<f64> = random_vec(&mut r, dim);
        let g: Vec<f64> = random_vec(&mut r, rows * dim);
        let mut y = vec![0.0f64; rows * dim];
        let mut rstd = vec![0.0f32; rows];
        rmsnorm_forward(&Cpu, &s, &x, &w, &mut y, &mut rstd).unwrap();
        let (mut dx, mut dw) = (vec![0.0f64; rows * dim], vec![0.0f64; dim]);
        let mut ws = Cpu
            .alloc::<u8>(rmsnorm_backward_workspace_bytes(&Cpu, &s))
            .unwrap();
        rmsnorm_backward(&Cpu, &s, &x, &w, &rstd, &g, &mut dx, &mut dw, &mut ws).unwrap();
        let h = 1e-6;
        for k in 0..rows * dim {
            let wc = w.clone();
            let fd = central(&mut x, k, h, &mut |xv| loss(&s, xv, &wc, &g));
            assert!(
                (fd - dx[k]).abs() <= 1e-6 * dx[k].abs().max(1.0),
                "{s:?} dx[{k}]: fd {fd} vs {}",
                dx[k]
            );
        }
        for j in 0..dim {
            let xc = x.clone();
            let fd = central(&mut w, j, h, &mut |wv| loss(&s, &xc, wv, &g));
            assert!(
                (fd - dw[j]).abs() <= 1e-6 * dw[j].abs().max(1.0),
                "{s:?} dw[{j}]: fd {fd} vs {}",
                dw[j]
            );
        }
    }
}

// ---- emu vs cpu ---------------------------------------------------------------------------------

const U: f64 = 5.960464477539063e-8; // 2⁻²⁴
const TAIL: usize = 3;

fn unit<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => U,
        DType::F16 => f64::powi(2.0, -11),
        DType::BF16 => f64::powi(2.0, -8),
        DType::F64 => f64::powi(2.0, -53),
    }
}

fn tiny<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F16 => f64::powi(2.0, -25),
        DType::BF16 => f64::powi(2.0, -134),
        _ => f64::powi(2.0, -150),
    }
}

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn poisoned<T: Float>(n: usize) -> Vec<T> {
    vec![T::from_f32(POISON); n]
}

struct Out<T> {
    y: Vec<T>,
    rstd: Vec<f32>,
    dx: Vec<T>,
    dw: Vec<T>,
}

/// Forward, then backward with the cpu reference's rstd (so both backends see the same rstd), on
/// `b`; every output poisoned first and TAIL elements longer than needed.
fn run<B: Backend, T: Float>(
    b: &B,
    s: &RmsNorm,
    x: &[T],
    w: &[T],
    dy: &[T],
    rstd_in: &[f32],
) -> Out<T> {
    let n = s.rows * s.dim;
    let (xb, wb, dyb) = (
        b.upload(x).unwrap(),
        b.upload(w).unwrap(),
        b.upload(dy).unwrap(),
    );
    let mut yb = b.upload(&poisoned::<T>(n + TAIL)).unwrap();
    let mut rb = b.upload(&vec![POISON; s.rows + TAIL]).unwrap();
    rmsnorm_forward(b, s, &xb, &wb, &mut yb, &mut rb).unwrap();
    let rin = b.upload(rstd_in).unwrap();
    let mut dxb = b.upload(&poisoned::<T>(n + TAIL)).unwrap();
    let mut dwb = b.upload(&poisoned::<T>(s.dim + TAIL)).unwrap();
    let mut ws = b
        .alloc::<u8>(rmsnorm_backward_workspace_bytes(b, s))
        .unwrap();
    rmsnorm_backward(b, s, &xb, &wb, &rin, &dyb, &mut dxb, &mut dwb, &mut ws).unwrap();
    Out {
        y: b.download(&yb).unwrap(),
        rstd: b.download(&rb).unwrap(),
        dx: b.download(&dxb).unwrap(),
        dw: b.download(&dwb).unwrap(),
    }
}

/// Tolerances (derived; u = 2⁻²⁴, n_t ≤ dim/32 + 8 = the longest per-thread chain):
/// - rstd: Σx² of non-negative terms ≤ (n_t + 13)·u relative (chain + 5 butterfly levels + 7 warp
///   adds), then /dim, +eps, sqrt (halves it), 1/·: ≤ ((n_t + 15)/2 + 3)·u, + u for the reference's
///   own rounding to f32.
/// - y = (x·r)·w: rstd's error + 2u on |x·r·w|, plus both sides' rounding to T: u_T·(|emu| + |cpu|).
/// - dx (both sides use the same saved rstd): the dot c is off by ≤ (n_t + 14)·u·S, S = Σ|dy·w·x|;
///   r³·c/dim and the final combination add ≤ 10 roundings: |Δ| ≤ (|r·w·dy| + r³/dim·|x|·S)·(n_t + 24)·u.
/// - dw: one f32 chain over the rows (pieces in order) of fl(dy·fl(x·r)): ≤ (rows + 3)·u·Σ|dy·x·r|.
fn check<T: Float>(s: RmsNorm, seed: u64) {
    let mut r = rng(seed);
    let n = s.rows * s.dim;
    let x: Vec<T> = random_vec(&mut r, n);
    let w: Vec<T> = random_vec(&mut r, s.dim);
    let dy: Vec<T> = random_vec(&mut r, n);
    let mut rstd_ref = vec![0f32; s.rows];
    let mut y_ref = vec![T::from_f32(0.0); n];
    lora_kernels::norm::reference::rmsnorm_forward(&s, &x, &w, &mut y_ref, &mut rstd_ref);
    let emu = run(&Emu, &s, &x, &w, &dy, &rstd_ref);
    let cpu = run(&Cpu, &s, &x, &w, &dy, &rstd_ref);
    // Nothing beyond the outputs written.
    assert_eq!(bits(&emu.y[n..]), bits(&poisoned::<T>(TAIL)));
    assert_eq!(bits(&emu.dx[n..]), bits(&poisoned::<T>(TAIL)));
    assert_eq!(bits(&emu.dw[s.dim..]), bits(&poisoned::<T>(TAIL)));
    assert!(emu.rstd[s.rows..]
        .iter()
        .all(|v| v.to_bits() == POISON.to_bits()));
    assert_eq!(cpu.rstd[..s.rows], rstd_ref[..]);
    let (d, ut, tt) = (s.dim, unit::<T>(), tiny::<T>());
    let nt = (d / 32 + 8) as f64;
    let r_rel = ((nt + 15.0) / 2.0 + 4.0) * U;
    for row in 0..s.rows {
        let (re, rc) = (emu.rstd[row] as f64, rstd_ref[row] as f64);
        assert!(
            (re - rc).abs() <= 1.01 * r_rel * rc,
            "{} {s:?} rstd[{row}]: {re} vs {rc}",
            T::DTYPE
        );
        let rs = rc;
        let sdot: f64 = (0..d)
            .map(|j| (dy[row * d + j].to_f64() * w[j].to_f64() * x[row * d + j].to_f64()).abs())
            .sum();
        for j in 0..d {
            let k = row * d + j;
            let (xv, wv, dv) = (x[k].to_f64(), w[j].to_f64(), dy[k].to_f64());
            let (got, want) = (emu.y[k].to_f64(), cpu.y[k].to_f64());
            let tol = 1.01 * (xv * rs * wv).abs() * (r_rel + 2.0 * U)
                + 1.01 * ut * (got.abs() + want.abs())
                + 2.0 * tt;
            assert!(
                (got - want).abs() <= tol,
                "{} {s:?} y[{row},{j}]: {got} vs {want} (tol {tol})",
                T::DTYPE
            );
            let (got, want) = (emu.dx[k].to_f64(), cpu.dx[k].to_f64());
            let mag = (rs * wv * dv).abs() + rs * rs * rs / d as f64 * xv.abs() * sdot;
            let tol =
                1.01 * mag * (nt + 24.0) * U + 1.01 * ut * (got.abs() + want.abs()) + 2.0 * tt;
            assert!(
                (got - want).abs() <= tol,
                "{} {s:?} dx[{row},{j}]: {got} vs {want} (tol {tol})",
                T::DTYPE
            );
        }
    }
    for j in 0..d {
        let sabs: f64 = (0..s.rows)
            .map(|row| {
                (dy[row * d + j].to_f64() * x[row * d + j].to_f64() * rstd_ref[row] as f64).abs()
            })
            .sum();
        let (got, want) = (emu.dw[j].to_f64(), cpu.dw[j].to_f64());
        let tol = 1.01 * (s.rows as f64 + 3.0) * U * sabs
            + 1.01 * ut * (got.abs() + want.abs())
            + 2.0 * tt;
        assert!(
            (got - want).abs() <= tol,
            "{} {s:?} dw[{j}]: {got} vs {want} (tol {tol})",
            T::DTYPE
        );
    }
}

#[test]
fn emu_matches_cpu_at_odd_sizes() {
    let mut seed = 0;
    for (rows, dim) in [
        (1, 1),
        (3, 3),
        (17, 17),
        (5, 127),
        (9, 1024),
        (3, 1025),
        (2, 4096),
        (37, 64),
        (127, 8),
        (300, 5),
    ] {
        for eps in [1e-5f32, 0.5] {
            seed += 1;
            check::<f32>(RmsNorm::new(rows, dim, eps), seed);
            check::<f16>(RmsNorm::new(rows, dim, eps), seed);
            check::<bf16>(RmsNorm::new(rows, dim, eps), seed);
        }
    }
}

/// dim·4 > 48 KiB (the launcher raises the dynamic shared memory limit) and > 64 KiB (the
/// accumulator lives in the workspace row).
#[test]
fn large_dims_take_the_big_shared_and_global_accumulators() {
    check::<f32>(RmsNorm::new(3, 13_000, 1e-6), 41);
    check::<bf16>(RmsNorm::new(2, 16_390, 1e-6), 42);
}

proptest! {
    #![proptest_config(proptest_config(64))]

    #[test]
    fn emu_matches_cpu_proptest(rows in 1usize..40, dim in prop_oneof![1usize..40, 1usize..1200], eps in prop_oneof![Just(1e-6f32), 0.0f32..1.0], seed in any::<u64>(), dtype in 0..3) {
        let s = RmsNorm::new(rows, dim, eps);
        match dtype {
            0 => check::<f32>(s, seed),
            1 => check::<f16>(s, seed),
            _ => check::<bf16>(s, seed),
        }
    }
}

/// rows = 0: forward does nothing, backward writes dw = 0. dim = 0: rstd = 1/sqrt(eps).
#[test]
fn empty_rows_and_columns() {
    for on_emu in [true, false] {
        let s = RmsNorm::new(0, 5, 1e-5);
        let (x, w) = (vec![1.0f32; 0], vec![1.0f32; 5]);
        let mut dw = vec![POISON; 5];
        let mut dx = vec![POISON; 0];
        let mut rstd = vec![POISON; 0];
        let mut ws = vec![0u8; 0];
        if on_emu {
            rmsnorm_backward(&Emu, &s, &x, &w, &rstd, &x, &mut dx, &mut dw, &mut ws).unwrap();
        } else {
            rmsnorm_backward(&Cpu, &s, &x, &w, &rstd, &x, &mut dx, &mut dw, &mut ws).unwrap();
        }
        assert!(dw.iter().all(|v| v.to_bits() == 0), "{dw:?}");
        let s = RmsNorm::new(2, 0, 0.25);
        let mut y = vec![0f32; 0];
        rstd = vec![POISON; 2];
        if on_emu {
            rmsnorm_forward(&Emu, &s, &x, &x, &mut y, &mut rstd).unwrap();
        } else {
            rmsnorm_forward(&Cpu, &s, &x, &x, &mut y, &mut rstd).unwrap();
        }
        assert_eq!(rstd, vec![2.0, 2.0]);
    }
}

#[test]
fn deterministic_under_other_schedules() {
    let s = RmsNorm::new(70, 1100, 1e-5);
    let mut r = rng(8);
    let x: Vec<bf16> = random_vec(&mut r, s.rows * s.dim);
    let w: Vec<bf16> = random_vec(&mut r, s.dim);
    let dy: Vec<bf16> = random_vec(&mut r, s.rows * s.dim);
    let mut rstd = vec![0f32; s.rows];
    let mut y = vec![bf16::ZERO; s.rows * s.dim];
    lora_kernels::norm::reference::rmsnorm_forward(&s, &x, &w, &mut y, &mut rstd);
    let base = run(&Emu, &s, &x, &w, &dy, &rstd);
    let same = |o: &Out<bf16>| {
        assert_eq!(bits(&o.y), bits(&base.y));
        assert_eq!(bits(&o.rstd), bits(&base.rstd));
        assert_eq!(bits(&o.dx), bits(&base.dx));
        assert_eq!(bits(&o.dw), bits(&base.dw));
    };
    same(&run(&Emu, &s, &x, &w, &dy, &rstd));
    for sched in [Schedule::Reverse, Schedule::Random(4)] {
        same(&Emu::with_schedule(sched, || {
            run(&Emu, &s, &x, &w, &dy, &rstd)
        }));
    }
}

// ---- bad inputs ---------------------------------------------------------------------------------

fn expect_invalid(r: lora_kernels::Result<()>, arg: &str) {
    assert!(
        matches!(&r, Err(Error::InvalidArgument { arg: a, .. }) if *a == arg),
        "expected `{arg}`, got {r:?}"
    );
}

#[test]
fn bad_inputs_are_typed_errors_and_write_nothing() {
    fn on<B: Backend>(b: &B) {
        let s = RmsNorm::new(3, 4, 1e-5);
        let up = |n: usize| b.upload(&vec![1.0f32; n]).unwrap();
        let pz = |n: usize| b.upload(&vec![POISON; n]).unwrap();
        let (x, w, dy, rstd) = (up(12), up(4), up(12), up(3));
        let (mut y, mut r, mut dx, mut dw) = (pz(12), pz(3), pz(12), pz(4));
        let need = rmsnorm_backward_workspace_bytes(b, &s);
        let mut ws = b.alloc::<u8>(need).unwrap();
        for (bad, arg) in [
            (RmsNorm::new(1 << 31, 1, 1e-5), "rows"),
            (RmsNorm::new(1, 1 << 31, 1e-5), "dim"),
            (RmsNorm::new(3, 4, f32::NAN), "eps"),
            (RmsNorm::new(3, 4, -1e-5), "eps"),
            (RmsNorm::new(3, 4, f32::INFINITY), "eps"),
        ] {
            expect_invalid(rmsnorm_forward(b, &bad, &x, &w, &mut y, &mut r), arg);
            expect_invalid(
                rmsnorm_backward(b, &bad, &x, &w, &rstd, &dy, &mut dx, &mut dw, &mut ws),
                arg,
            );
        }
        let (short11, short3, short2) = (up(11), up(3), up(2));
        expect_invalid(rmsnorm_forward(b, &s, &short11, &w, &mut y, &mut r), "x");
        expect_invalid(rmsnorm_forward(b, &s, &x, &short3, &mut y, &mut r), "w");
        expect_invalid(rmsnorm_forward(b, &s, &x, &w, &mut pz(11), &mut r), "y");
        expect_invalid(rmsnorm_forward(b, &s, &x, &w, &mut y, &mut pz(2)), "rstd");
        expect_invalid(
            rmsnorm_backward(b, &s, &short11, &w, &rstd, &dy, &mut dx, &mut dw, &mut ws),
            "x",
        );
        expect_invalid(
            rmsnorm_backward(b, &s, &x, &short3, &rstd, &dy, &mut dx, &mut dw, &mut ws),
            "w",
        );
        expect_invalid(
            rmsnorm_backward(b, &s, &x, &w, &short2, &dy, &mut dx, &mut dw, &mut ws),
            "rstd",
        );
        expect_invalid(
            rmsnorm_backward(b, &s, &x, &w, &rstd, &short11, &mut dx, &mut dw, &mut ws),
            "dy",
        );
        expect_invalid(
            rmsnorm_backward(b, &s, &x, &w, &rstd, &dy, &mut pz(11), &mut dw, &mut ws),
            "dx",
        );
        expect_invalid(
            rmsnorm_backward(b, &s, &x, &w, &rstd, &dy, &mut dx, &mut pz(3), &mut ws),
            "dw",
        );
        if need > 0 {
            let mut small = b.alloc::<u8>(need - 1).unwrap();
            expect_invalid(
                rmsnorm_backward(b, &s, &x, &w, &rstd, &dy, &mut dx, &mut dw, &mut small),
                "workspace",
            );
        }
        for v in [&y, &r, &dx, &dw] {
            assert!(
                b.download(v)
                    .unwrap()
                    .iter()
                    .all(|v| v.to_bits() == POISON.to_bits()),
                "{}",
                b.name()
            );
        }
    }
    on(&Emu);
    on(&Cpu);
    assert!(rmsnorm_backward_workspace_bytes(&Emu, &RmsNorm::new(3, 4, 1e-5)) > 0);
    assert_eq!(
        rmsnorm_backward_workspace_bytes(&Cpu, &RmsNorm::new(3, 4, 1e-5)),
        0
    );
    let xd = vec![1.0f64; 4];
    let r = rmsnorm_forward(
        &Emu,
        &RmsNorm::new(1, 4, 1e-5),
        &xd,
        &xd,
        &mut vec![0.0; 4],
        &mut vec![0.0; 1],
    );
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "x", .. })),
        "{r:?}"
    );
}

#[test]
fn c_launchers_validate_their_params() {
    let x = [1.0f32; 8];
    let mut y = [POISON; 8];
    let mut rstd = [POISON; 2];
    let fwd = sys::LkRmsNormForwardParams {
        x: x.as_ptr().cast(),
        w: x.as_ptr().cast(),
        y: y.as_mut_ptr().cast(),
        rstd: rstd.as_mut_ptr(),
        rows: 2,
        dim: 4,
        eps: 1e-5,
        dtype: 0,
    };
    let call = |m: &dyn Fn(&mut sys::LkRmsNormForwardParams)| {
        let mut p = fwd;
        m(&mut p);
        // SAFETY: pointers valid for the sizes or rejected before any access.
        unsafe { sys::lk_emu_norm_rmsnorm_forward(&p, std::ptr::null_mut()) }
    };
    let invalid = sys::LK_ERR_INVALID_ARGUMENT as i32;
    assert_eq!(call(&|p| p.rows = -1), invalid);
    assert_eq!(call(&|p| p.dim = -1), invalid);
    assert_eq!(call(&|p| p.eps = f32::NAN), invalid);
    assert_eq!(call(&|p| p.eps = -1.0), invalid);
    assert_eq!(call(&|p| p.x = std::ptr::null()), invalid);
    assert_eq!(call(&|p| p.rstd = std::ptr::null_mut()), invalid);
    assert_eq!(call(&|p| p.dtype = 5), sys::LK_ERR_UNSUPPORTED_DTYPE as i32);
    assert!(y
        .iter()
        .chain(&rstd)
        .all(|v| v.to_bits() == POISON.to_bits()));
    let mut dx = [POISON; 8];
    let mut dw = [POISON; 4];
    let mut ws = vec![0u32; 4096];
    let bwd = sys::LkRmsNormBackwardParams {
        x: x.as_ptr().cast(),
        w: x.as_ptr().cast(),
        rstd: x.as_ptr(),
        dy: x.as_ptr().cast(),
        dx: dx.as_mut_ptr().cast(),
        dw: dw.as_mut_ptr().cast(),
        workspace: ws.as_mut_ptr().cast(),
        rows: 2,
        dim: 4,
        dtype: 0,
    };
    let call = |m: &dyn Fn(&mut sys::LkRmsNormBackwardParams)| {
        let mut p = bwd;
        m(&mut p);
        // SAFETY: as above.
        unsafe { sys::lk_emu_norm_rmsnorm_backward(&p, std::ptr::null_mut()) }
    };
    assert_eq!(call(&|p| p.rows = -1), invalid);
    assert_eq!(call(&|p| p.dim = -4), invalid);
    assert_eq!(call(&|p| p.workspace = std::ptr::null_mut()), invalid);
    assert_eq!(
        call(&|p| p.workspace = p.workspace.wrapping_byte_add(2)),
        invalid
    );
    assert_eq!(call(&|p| p.dw = std::ptr::null_mut()), invalid);
    assert_eq!(call(&|p| p.dy = std::ptr::null()), invalid);
    assert_eq!(
        call(&|p| p.dtype = -1),
        sys::LK_ERR_UNSUPPORTED_DTYPE as i32
    );
    assert!(dx
        .iter()
        .chain(&dw)
        .all(|v| v.to_bits() == POISON.to_bits()));
    // SAFETY: a pure function of the sizes.
    let need = unsafe { sys::lk_emu_norm_rmsnorm_backward_workspace_size(&bwd) };
    assert!(need > 0 && need <= ws.len() * 4);
    assert_eq!(call(&|_| ()), 0);
}
