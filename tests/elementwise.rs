//! Elementwise ops (add, add_assign, SwiGLU forward/backward, scale): emu vs the cpu reference
//! (bit-exact where the op is exactly rounded, derived tolerances for SwiGLU), NaN-poisoned outputs,
//! the misaligned scalar path, schedules, bad inputs, and an f64 finite-difference check of the
//! reference SwiGLU backward.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use lora_kernels::elementwise::{add, add_assign, scale, swiglu_backward, swiglu_forward};
use lora_kernels::ffi::sys;
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, Float, Schedule};
use proptest::prelude::*;

/// d_gate and d_up of L = Σ swiglu(gate, up) ⊙ G by central differences (h = 1e-6, f64), gates
/// spanning [-30, 30] (both branches of the stable sigmoid): relative agreement ≤ 1e-6.
#[test]
fn reference_swiglu_backward_matches_finite_differences() {
    let n = 64;
    let mut r = rng(31);
    let mut gate: Vec<f64> = random_vec::<f64>(&mut r, n)
        .iter()
        .map(|v| v * 30.0)
        .collect();
    gate[0] = 0.0;
    gate[1] = -1e-3;
    let mut up: Vec<f64> = random_vec(&mut r, n);
    let g: Vec<f64> = random_vec(&mut r, n);
    let loss = |gate: &[f64], up: &[f64]| -> f64 {
        let mut out = vec![0.0f64; n];
        swiglu_forward(&Cpu, &gate.to_vec(), &up.to_vec(), &mut out).unwrap();
        out.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let (mut dg, mut du) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    swiglu_backward(&Cpu, &gate, &up, &g, &mut dg, &mut du).unwrap();
    let h = 1e-6;
    for k in 0..n {
        let old = gate[k];
        gate[k] = old + h;
        let p = loss(&gate, &up);
        gate[k] = old - h;
        let m = loss(&gate, &up);
        gate[k] = old;
        let fd = (p - m) / (2.0 * h);
        assert!(
            (fd - dg[k]).abs() <= 1e-6 * dg[k].abs().max(1.0),
            "d_gate[{k}] (g {old}): fd {fd} vs {}",
            dg[k]
        );
        let old = up[k];
        up[k] = old + h;
        let p = loss(&gate, &up);
        up[k] = old - h;
        let m = loss(&gate, &up);
        up[k] = old;
        let fd = (p - m) / (2.0 * h);
        assert!(
            (fd - du[k]).abs() <= 1e-6 * du[k].abs().max(1.0),
            "d_up[{k}]: fd {fd} vs {}",
            du[k]
        );
    }
}

// ---- emu vs cpu ---------------------------------------------------------------------------------

/// Unit roundoff of T's storage (relative error of one rounding to T).
fn unit<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => f64::powi(2.0, -24),
        DType::F16 => f64::powi(2.0, -11),
        DType::BF16 => f64::powi(2.0, -8),
        DType::F64 => f64::powi(2.0, -53),
    }
}

/// Half the smallest subnormal of T: the absolute error of rounding a tiny value to T.
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

const U32: f64 = 5.960464477539063e-8; // 2⁻²⁴

/// Gates over a wide range: the sigmoid's both branches, saturation (|g| up to 60) and 0.
fn gates<T: Float>(r: &mut rand::rngs::StdRng, n: usize) -> Vec<T> {
    let mut g: Vec<T> = random_vec::<f64>(r, n)
        .iter()
        .enumerate()
        .map(|(i, v)| T::from_f64(if i % 7 == 3 { v * 60.0 } else { v * 6.0 }))
        .collect();
    if n > 2 {
        g[n / 2] = T::from_f64(0.0);
    }
    g
}

/// The whole op set on backend `b`, outputs poisoned first; returns (add, add_assign, swiglu out,
/// d_gate, d_up, scale).
#[allow(clippy::type_complexity)]
fn run_all<B: Backend, T: Float>(b: &B, x: &[T], y: &[T], d: &[T], alpha: f32) -> [Vec<T>; 6] {
    let n = x.len();
    let (xb, yb, db) = (
        b.upload(x).unwrap(),
        b.upload(y).unwrap(),
        b.upload(d).unwrap(),
    );
    let mut out = b.upload(&poisoned::<T>(n)).unwrap();
    add(b, &xb, &yb, &mut out).unwrap();
    let add_out = b.download(&out).unwrap();
    let mut acc = b.upload(y).unwrap();
    add_assign(b, &mut acc, &xb).unwrap();
    let acc = b.download(&acc).unwrap();
    let mut sw = b.upload(&poisoned::<T>(n)).unwrap();
    swiglu_forward(b, &xb, &yb, &mut sw).unwrap();
    let sw = b.download(&sw).unwrap();
    let mut dg = b.upload(&poisoned::<T>(n)).unwrap();
    let mut du = b.upload(&poisoned::<T>(n)).unwrap();
    swiglu_backward(b, &xb, &yb, &db, &mut dg, &mut du).unwrap();
    let (dg, du) = (b.download(&dg).unwrap(), b.download(&du).unwrap());
    let mut sc = b.upload(x).unwrap();
    scale(b, &mut sc, alpha).unwrap();
    let sc = b.download(&sc).unwrap();
    [add_out, acc, sw, dg, du, sc]
}

/// Tolerances (derived): the kernels compute in f32 with one rounding to T per output.
/// - add, add_assign, scale: exactly rounded on both sides → bit-identical.
/// - swiglu: expf (≤ 2 ulp on CUDA, < 1 on glibc), 1 + e, one division and ≤ 4 multiplies, each
///   ≤ 1 f32 rounding on non-negative magnitudes; `1 + g·(1−σ)` can cancel, so the error is bounded
///   against the magnitudes of the terms: |out − ref| ≤ 8·2⁻²⁴·|g·u|; d_up ≤ 8·2⁻²⁴·|d·g|;
///   d_gate ≤ 12·2⁻²⁴·|d·u|·σ·(1 + |g|·(1−σ)); plus one rounding to T: u_T·|ref| + tiny_T.
fn check_emu_vs_cpu<T: Float>(n: usize, seed: u64) {
    let mut r = rng(seed);
    let x = gates::<T>(&mut r, n);
    let y: Vec<T> = random_vec(&mut r, n);
    let d: Vec<T> = random_vec(&mut r, n);
    let alpha = -0.7_f32 - seed as f32 * 1e-3;
    let emu = run_all(&Emu, &x, &y, &d, alpha);
    let cpu = run_all(&Cpu, &x, &y, &d, alpha);
    for (k, name) in [(0, "add"), (1, "add_assign"), (5, "scale")] {
        assert_eq!(bits(&emu[k]), bits(&cpu[k]), "{} {name} n {n}", T::DTYPE);
    }
    let (ut, tt) = (unit::<T>(), tiny::<T>());
    for i in 0..n {
        let (g, u, dd) = (x[i].to_f64(), y[i].to_f64(), d[i].to_f64());
        let (s, sc) = lora_kernels::elementwise::reference::sigmoid_pair(g);
        let checks = [
            (2, "swiglu", 8.0 * U32 * (g * u).abs()),
            (
                3,
                "d_gate",
                12.0 * U32 * (dd * u).abs() * s * (1.0 + g.abs() * sc),
            ),
            (4, "d_up", 8.0 * U32 * (dd * g).abs()),
        ];
        for (k, name, err32) in checks {
            let (got, want) = (emu[k][i].to_f64(), cpu[k][i].to_f64());
            // cpu[k] is itself rounded to T: compare against it with both roundings allowed.
            let tol = 1.01 * (err32 + 2.0 * ut * want.abs()) + 2.0 * tt;
            assert!(
                (got - want).abs() <= tol,
                "{} {name}[{i}] n {n}: g {g} u {u} d {dd}: emu {got} cpu {want} (tol {tol})",
                T::DTYPE
            );
        }
    }
}

#[test]
fn emu_matches_cpu_at_odd_sizes() {
    for (i, n) in [1usize, 3, 17, 127, 4097].into_iter().enumerate() {
        check_emu_vs_cpu::<f32>(n, 100 + i as u64);
        check_emu_vs_cpu::<f16>(n, 200 + i as u64);
        check_emu_vs_cpu::<bf16>(n, 300 + i as u64);
    }
}

proptest! {
    #![proptest_config(proptest_config(64))]

    #[test]
    fn emu_matches_cpu_proptest(n in prop_oneof![1usize..40, 1usize..2000], seed in any::<u64>(), dtype in 0..3) {
        match dtype {
            0 => check_emu_vs_cpu::<f32>(n, seed),
            1 => check_emu_vs_cpu::<f16>(n, seed),
            _ => check_emu_vs_cpu::<bf16>(n, seed),
        }
    }
}

/// Saturated and tiny gates: no overflow inside σ, finite results where the math is finite.
#[test]
fn swiglu_is_safe_at_extreme_gates() {
    let g = vec![
        -1e30f32, -1e4, -100.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 100.0, 1e4, 3e38,
    ];
    let u = vec![1.0f32; g.len()];
    let d = vec![1.0f32; g.len()];
    for b in [0, 1] {
        let (sw, dg, du) = if b == 0 {
            let r = run_all(&Emu, &g, &u, &d, 1.0);
            (r[2].clone(), r[3].clone(), r[4].clone())
        } else {
            let r = run_all(&Cpu, &g, &u, &d, 1.0);
            (r[2].clone(), r[3].clone(), r[4].clone())
        };
        for i in 0..g.len() {
            assert!(
                sw[i].is_finite() && dg[i].is_finite() && du[i].is_finite(),
                "g {}: {} {} {}",
                g[i],
                sw[i],
                dg[i],
                du[i]
            );
        }
        // silu(−large) → −0 / tiny, silu(+large) = g, dsilu(+large) = 1, dsilu(−large) → 0.
        assert!(sw[0].abs() <= f32::MIN_POSITIVE && sw[12] == 3e38);
        assert_eq!(dg[11], 1.0);
        assert!(dg[1].abs() < 1e-30);
    }
}

/// Misaligned pointers take the one-element-per-thread path: same results as the aligned launch
/// (bit for bit: the arithmetic does not depend on the path). Calls the C launcher directly.
#[test]
fn misaligned_buffers_take_the_scalar_path() {
    fn case<T: Float>() {
        let n = 37;
        let mut r = rng(7);
        let x = gates::<T>(&mut r, n + 1);
        let y: Vec<T> = random_vec(&mut r, n + 1);
        let d: Vec<T> = random_vec(&mut r, n + 1);
        let want = run_all(&Emu, &x[1..], &y[1..], &d[1..], 1.5);
        let mut dg = poisoned::<T>(n + 1);
        let mut du = poisoned::<T>(n + 1);
        let p = sys::LkElementwiseParams {
            a: x[1..].as_ptr().cast(),
            b: y[1..].as_ptr().cast(),
            c: d[1..].as_ptr().cast(),
            out: dg[1..].as_mut_ptr().cast(),
            out2: du[1..].as_mut_ptr().cast(),
            n: n as i64,
            alpha: 0.0,
            dtype: T::DTYPE.ffi_tag().unwrap(),
        };
        // SAFETY: every pointer is valid for n elements.
        assert_eq!(
            unsafe { sys::lk_emu_elementwise_swiglu_backward(&p, std::ptr::null_mut()) },
            0
        );
        assert_eq!(bits(&dg[1..]), bits(&want[3]));
        assert_eq!(bits(&du[1..]), bits(&want[4]));
        assert_eq!(
            bits(&dg[..1]),
            bits(&poisoned::<T>(1)),
            "element before the output written"
        );
        let mut sc = x.clone();
        let p = sys::LkElementwiseParams {
            out: sc[1..].as_mut_ptr().cast(),
            alpha: 1.5,
            ..p
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { sys::lk_emu_elementwise_scale(&p, std::ptr::null_mut()) },
            0
        );
        assert_eq!(bits(&sc[1..]), bits(&want[5]));
        assert_eq!(bits(&sc[..1]), bits(&x[..1]));
    }
    case::<f32>();
    case::<f16>();
    case::<bf16>();
}

#[test]
fn deterministic_under_other_schedules() {
    let mut r = rng(9);
    let x = gates::<bf16>(&mut r, 4097);
    let y: Vec<bf16> = random_vec(&mut r, 4097);
    let d: Vec<bf16> = random_vec(&mut r, 4097);
    let base = run_all(&Emu, &x, &y, &d, 0.3);
    let again = run_all(&Emu, &x, &y, &d, 0.3);
    let rev = Emu::with_schedule(Schedule::Reverse, || run_all(&Emu, &x, &y, &d, 0.3));
    let rnd = Emu::with_schedule(Schedule::Random(5), || run_all(&Emu, &x, &y, &d, 0.3));
    for k in 0..6 {
        assert_eq!(bits(&base[k]), bits(&again[k]));
        assert_eq!(bits(&base[k]), bits(&rev[k]));
        assert_eq!(bits(&base[k]), bits(&rnd[k]));
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
        let x = b.upload(&[1.0f32; 5]).unwrap();
        let short = b.upload(&[1.0f32; 4]).unwrap();
        let p = POISON.to_bits();
        let mut out = b.upload(&[POISON; 5]).unwrap();
        let mut out_short = b.upload(&[POISON; 4]).unwrap();
        let mut out2 = b.upload(&[POISON; 5]).unwrap();
        expect_invalid(add(b, &x, &short, &mut out), "y");
        expect_invalid(add(b, &x, &x, &mut out_short), "out");
        expect_invalid(add_assign(b, &mut out, &short), "x");
        expect_invalid(swiglu_forward(b, &x, &short, &mut out), "up");
        expect_invalid(swiglu_forward(b, &x, &x, &mut out_short), "out");
        expect_invalid(
            swiglu_backward(b, &x, &short, &x, &mut out, &mut out2),
            "up",
        );
        expect_invalid(
            swiglu_backward(b, &x, &x, &short, &mut out, &mut out2),
            "d_out",
        );
        expect_invalid(
            swiglu_backward(b, &x, &x, &x, &mut out_short, &mut out2),
            "d_gate",
        );
        expect_invalid(
            swiglu_backward(b, &x, &x, &x, &mut out, &mut out_short),
            "d_up",
        );
        for a in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            expect_invalid(scale(b, &mut out, a), "alpha");
        }
        for v in [&out, &out_short, &out2] {
            assert!(
                b.download(v).unwrap().iter().all(|v| v.to_bits() == p),
                "{}: written",
                b.name()
            );
        }
        // Zero length: Ok, nothing to do.
        let e = b.upload::<f32>(&[]).unwrap();
        let mut eo = b.upload::<f32>(&[]).unwrap();
        add(b, &e, &e, &mut eo).unwrap();
        scale(b, &mut eo, 2.0).unwrap();
    }
    on(&Emu);
    on(&Cpu);
    // f64 is the cpu backend's only.
    let xd = vec![1.0f64; 3];
    let mut od = vec![0.0f64; 3];
    let r = add(&Emu, &xd, &xd, &mut od);
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "x", .. })),
        "{r:?}"
    );
    let r = swiglu_forward(&Emu, &xd, &xd, &mut od);
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "gate", .. })),
        "{r:?}"
    );
    let r = scale(&Emu, &mut od, 2.0);
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "x", .. })),
        "{r:?}"
    );
    let r = add_assign(&Emu, &mut od, &xd);
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "acc", .. })),
        "{r:?}"
    );
    add(&Cpu, &xd, &xd, &mut od).unwrap();
    assert_eq!(od, vec![2.0; 3]);
}

#[test]
fn c_launcher_validates_its_params() {
    let x = [1.0f32; 4];
    let mut o = [POISON; 4];
    let good = sys::LkElementwiseParams {
        a: x.as_ptr().cast(),
        b: x.as_ptr().cast(),
        c: x.as_ptr().cast(),
        out: o.as_mut_ptr().cast(),
        out2: std::ptr::null_mut(),
        n: 4,
        alpha: 1.0,
        dtype: 0,
    };
    let call =
        |f: unsafe extern "C" fn(*const sys::LkElementwiseParams, *mut std::ffi::c_void) -> i32,
         mutate: &dyn Fn(&mut sys::LkElementwiseParams)| {
            let mut p = good;
            mutate(&mut p);
            // SAFETY: pointers valid for n elements or rejected before any access.
            unsafe { f(&p, std::ptr::null_mut()) }
        };
    let invalid = sys::LK_ERR_INVALID_ARGUMENT as i32;
    assert_eq!(call(sys::lk_emu_elementwise_add, &|p| p.n = -1), invalid);
    assert_eq!(
        call(sys::lk_emu_elementwise_add, &|p| p.b = std::ptr::null()),
        invalid
    );
    assert_eq!(
        call(sys::lk_emu_elementwise_add, &|p| p.out =
            std::ptr::null_mut()),
        invalid
    );
    assert_eq!(
        call(sys::lk_emu_elementwise_swiglu_backward, &|_| ()),
        invalid
    ); // out2 null
    assert_eq!(
        call(sys::lk_emu_elementwise_swiglu_backward, &|p| {
            p.out2 = p.out;
            p.c = std::ptr::null();
        }),
        invalid
    );
    assert_eq!(
        call(sys::lk_emu_elementwise_scale, &|p| p.alpha = f32::NAN),
        invalid
    );
    assert_eq!(
        call(sys::lk_emu_elementwise_add_assign, &|p| p.a =
            std::ptr::null()),
        invalid
    );
    assert_eq!(
        call(sys::lk_emu_elementwise_swiglu_forward, &|p| p.dtype = 3),
        sys::LK_ERR_UNSUPPORTED_DTYPE as i32
    );
    assert!(o.iter().all(|v| v.to_bits() == POISON.to_bits()));
    // n = 0 with null pointers is a no-op.
    assert_eq!(
        call(sys::lk_emu_elementwise_add, &|p| {
            p.n = 0;
            p.a = std::ptr::null();
        }),
        0
    );
}
