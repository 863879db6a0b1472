//! RoPE (HF rotate_half): emu vs the cpu reference with a derived tolerance, skipped rows and the
//! fault word, both load paths, schedules, bad inputs, and an f64 finite-difference check of the
//! reference backward.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use lora_kernels::adapter::fault;
use lora_kernels::ffi::sys;
use lora_kernels::rope::{rope_backward, rope_forward, Rope};
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, Float, Schedule};
use proptest::prelude::*;
use rand::Rng;

/// The forward is linear in x; the backward applied to G must equal d(Σ rope(x) ⊙ G)/dx by central
/// differences (h = 1e-6, f64): agreement to ~1e-9. A negative position is skipped + fault in both.
#[test]
fn reference_backward_matches_finite_differences() {
    let s = Rope::new(4, 3, 6, 10000.0);
    let positions = vec![0, 5, -2, 1_000_003];
    let mut r = rng(21);
    let mut x: Vec<f64> = random_vec(&mut r, s.tokens * s.width());
    let g: Vec<f64> = random_vec(&mut r, s.tokens * s.width());
    let loss = |x: &[f64]| -> f64 {
        let mut y = x.to_vec();
        let mut f = vec![0u32];
        rope_forward(&Cpu, &s, &positions, &mut y, &mut f).unwrap();
        assert_eq!(f[0], fault::INDEX);
        y.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let mut dx = g.clone();
    let mut f = vec![0u32];
    rope_backward(&Cpu, &s, &positions, &mut dx, &mut f).unwrap();
    assert_eq!(f[0], fault::INDEX);
    let h = 1e-6;
    for k in 0..x.len() {
        let old = x[k];
        x[k] = old + h;
        let p = loss(&x);
        x[k] = old - h;
        let m = loss(&x);
        x[k] = old;
        let fd = (p - m) / (2.0 * h);
        assert!((fd - dx[k]).abs() <= 1e-8, "dx[{k}]: fd {fd} vs {}", dx[k]);
    }
    // The skipped token's row of G passes through the backward untouched.
    let w = s.width();
    assert_eq!(dx[2 * w..3 * w], g[2 * w..3 * w]);
}

// ---- emu vs cpu ---------------------------------------------------------------------------------

fn unit<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => f64::powi(2.0, -24),
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

/// Runs forward (or backward) on `b`; returns (x after, fault word).
fn run<B: Backend, T: Float>(
    b: &B,
    s: &Rope,
    backward: bool,
    pos: &[i32],
    x: &[T],
) -> (Vec<T>, u32) {
    let pb = b.upload(pos).unwrap();
    let mut xb = b.upload(x).unwrap();
    let mut fb = b.upload(&[0u32]).unwrap();
    if backward {
        rope_backward(b, s, &pb, &mut xb, &mut fb).unwrap();
    } else {
        rope_forward(b, s, &pb, &mut xb, &mut fb).unwrap();
    }
    (b.download(&xb).unwrap(), b.download(&fb).unwrap()[0])
}

fn positions(r: &mut rand::rngs::StdRng, tokens: usize, with_bad: bool) -> Vec<i32> {
    (0..tokens)
        .map(|t| match r.random_range(0..10) {
            0 if with_bad => -1 - r.random_range(0..5),
            1 => i32::MAX - r.random_range(0..3),
            2 => t as i32,
            _ => r.random_range(0..200_000),
        })
        .collect()
}

/// Tolerance (derived): both sides rotate by the same f32 angle (inv_freq from the same f64 exp, the
/// same f32 product). The kernel's sin/cos are within ~½ f32 ulp (≤ 2⁻²⁴ absolute, since |sin| and
/// |cos| are at most 1) and the rotation a·c − b·s adds ≤ 3 roundings of magnitude ≤ |a| + |b|:
/// |Δ| ≤ 4·2⁻²⁴·(|a| + |b|), 8 used (margin for the GPU's exp). Both outputs are rounded to T:
/// + u_T·(|emu| + |cpu|) + 2·tiny_T. Rows with a negative position are untouched: bit for bit.
fn check<T: Float>(s: Rope, seed: u64, backward: bool) {
    let mut r = rng(seed);
    let pos = positions(&mut r, s.tokens, true);
    let x: Vec<T> = random_vec(&mut r, s.tokens * s.width());
    let (emu, fe) = run(&Emu, &s, backward, &pos, &x);
    let (cpu, fc) = run(&Cpu, &s, backward, &pos, &x);
    assert_eq!(fe, fc, "fault words");
    let bad = pos.iter().any(|&p| p < 0);
    assert_eq!(fe, if bad { fault::INDEX } else { 0 });
    let (w, hd, half) = (s.width(), s.head_dim, s.head_dim / 2);
    for t in 0..s.tokens {
        if pos[t] < 0 {
            assert_eq!(
                bits(&emu[t * w..(t + 1) * w]),
                bits(&x[t * w..(t + 1) * w]),
                "skipped row {t} written"
            );
            continue;
        }
        for h in 0..s.n_heads {
            for i in 0..half {
                let (j1, j2) = (t * w + h * hd + i, t * w + h * hd + i + half);
                let mag = x[j1].to_f64().abs() + x[j2].to_f64().abs();
                for j in [j1, j2] {
                    let (got, want) = (emu[j].to_f64(), cpu[j].to_f64());
                    let tol = 8.0 * f64::powi(2.0, -24) * mag
                        + 1.01 * unit::<T>() * (got.abs() + want.abs())
                        + 2.0 * tiny::<T>();
                    assert!(
                        (got - want).abs() <= tol,
                        "{} {s:?} bwd {backward} t {t} (pos {}) h {h} i {i}: emu {got} cpu {want} tol {tol}",
                        T::DTYPE,
                        pos[t]
                    );
                }
            }
        }
    }
}

#[test]
fn emu_matches_cpu_at_odd_sizes() {
    let mut seed = 0;
    for (tokens, n_heads, head_dim) in [
        (1, 1, 2),
        (3, 1, 6),
        (17, 3, 16),
        (5, 2, 128),
        (3, 3, 64),
        (127, 1, 8),
        (2, 0, 8),
        (4, 2, 0),
    ] {
        for theta in [10_000.0f32, 500_000.0] {
            let s = Rope::new(tokens, n_heads, head_dim, theta);
            seed += 1;
            check::<f32>(s, seed, false);
            check::<f16>(s, seed, true);
            check::<bf16>(s, seed, seed % 2 == 0);
            check::<f32>(s, seed, true);
        }
    }
}

proptest! {
    #![proptest_config(proptest_config(64))]

    #[test]
    fn emu_matches_cpu_proptest(
        tokens in 1usize..24,
        n_heads in 1usize..5,
        half in prop_oneof![1usize..10, Just(32usize), Just(64usize)],
        theta in prop_oneof![Just(10_000.0f32), 1.5f32..1e6],
        seed in any::<u64>(),
        backward in any::<bool>(),
        dtype in 0..3,
    ) {
        let s = Rope::new(tokens, n_heads, 2 * half, theta);
        match dtype {
            0 => check::<f32>(s, seed, backward),
            1 => check::<f16>(s, seed, backward),
            _ => check::<bf16>(s, seed, backward),
        }
    }
}

/// Backward ∘ forward is the identity up to rounding (f32: a few ulps of |a| + |b|).
#[test]
fn backward_inverts_forward() {
    let s = Rope::new(9, 2, 64, 500_000.0);
    let mut r = rng(5);
    let pos = positions(&mut r, s.tokens, false);
    let x: Vec<f32> = random_vec(&mut r, s.tokens * s.width());
    let (y, _) = run(&Emu, &s, false, &pos, &x);
    let (back, _) = run(&Emu, &s, true, &pos, &y);
    for (a, b) in x.iter().zip(&back) {
        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
    }
}

/// The 16-byte path and the one-pair-per-thread path (a misaligned x, via the C launcher) give the
/// same bits; elements outside the rows are untouched.
#[test]
fn misaligned_x_takes_the_scalar_path() {
    fn case<T: Float>() {
        let s = Rope::new(5, 3, 32, 10_000.0);
        let mut r = rng(77);
        let pos = positions(&mut r, s.tokens, true);
        let n = s.tokens * s.width();
        let x: Vec<T> = random_vec(&mut r, n + 1);
        let (want, fw) = run(&Emu, &s, false, &pos, &x[1..]);
        let mut xm = x.clone();
        let mut f = [0u32];
        let p = sys::LkRopeParams {
            positions: pos.as_ptr(),
            x: xm[1..].as_mut_ptr().cast(),
            fault: f.as_mut_ptr(),
            tokens: s.tokens as i32,
            n_heads: s.n_heads as i32,
            head_dim: s.head_dim as i32,
            theta: s.theta,
            dtype: T::DTYPE.ffi_tag().unwrap(),
        };
        // SAFETY: x holds tokens · width elements after the offset, positions tokens.
        assert_eq!(
            unsafe { sys::lk_emu_rope_forward(&p, std::ptr::null_mut()) },
            0
        );
        assert_eq!(bits(&xm[1..]), bits(&want));
        assert_eq!(bits(&xm[..1]), bits(&x[..1]));
        assert_eq!(f[0], fw);
    }
    case::<f32>();
    case::<f16>();
    case::<bf16>();
}

#[test]
fn deterministic_under_other_schedules() {
    let s = Rope::new(33, 4, 64, 10_000.0);
    let mut r = rng(3);
    let pos = positions(&mut r, s.tokens, true);
    let x: Vec<bf16> = random_vec(&mut r, s.tokens * s.width());
    let base = run(&Emu, &s, false, &pos, &x);
    assert_eq!(bits(&base.0), bits(&run(&Emu, &s, false, &pos, &x).0));
    for sched in [Schedule::Reverse, Schedule::Random(11)] {
        let other = Emu::with_schedule(sched, || run(&Emu, &s, false, &pos, &x));
        assert_eq!(bits(&base.0), bits(&other.0), "{sched:?}");
        assert_eq!(base.1, other.1);
    }
}

// ---- bad inputs ---------------------------------------------------------------------------------

#[test]
fn bad_inputs_are_typed_errors_and_write_nothing() {
    fn on<B: Backend>(b: &B) {
        let good = Rope::new(2, 2, 4, 10_000.0);
        let pos = b.upload(&[1i32, 2]).unwrap();
        let pos_short = b.upload(&[1i32]).unwrap();
        let mut x = b.upload(&[POISON; 16]).unwrap();
        let mut x_short = b.upload(&[POISON; 15]).unwrap();
        let mut f = b.upload(&[0u32]).unwrap();
        let mut f_empty = b.upload::<u32>(&[]).unwrap();
        let cases: [(Rope, &str); 7] = [
            (
                Rope {
                    head_dim: 3,
                    ..good
                },
                "head_dim",
            ),
            (Rope { theta: 0.0, ..good }, "theta"),
            (
                Rope {
                    theta: -1.0,
                    ..good
                },
                "theta",
            ),
            (
                Rope {
                    theta: f32::NAN,
                    ..good
                },
                "theta",
            ),
            (
                Rope {
                    theta: f32::INFINITY,
                    ..good
                },
                "theta",
            ),
            (
                Rope {
                    tokens: 1 << 31,
                    ..good
                },
                "tokens",
            ),
            (
                Rope {
                    n_heads: 1 << 30,
                    ..good
                },
                "n_heads",
            ),
        ];
        for (s, arg) in cases {
            for backward in [false, true] {
                let r = if backward {
                    rope_backward(b, &s, &pos, &mut x, &mut f)
                } else {
                    rope_forward(b, &s, &pos, &mut x, &mut f)
                };
                assert!(
                    matches!(&r, Err(Error::InvalidArgument { arg: a, .. }) if *a == arg),
                    "{s:?}: {r:?}"
                );
            }
        }
        let r = rope_forward(b, &good, &pos_short, &mut x, &mut f);
        assert!(
            matches!(
                r,
                Err(Error::InvalidArgument {
                    arg: "positions",
                    ..
                })
            ),
            "{r:?}"
        );
        let r = rope_forward(b, &good, &pos, &mut x_short, &mut f);
        assert!(
            matches!(r, Err(Error::InvalidArgument { arg: "x", .. })),
            "{r:?}"
        );
        let r = rope_backward(b, &good, &pos, &mut x_short, &mut f);
        assert!(
            matches!(r, Err(Error::InvalidArgument { arg: "dx", .. })),
            "{r:?}"
        );
        let r = rope_forward(b, &good, &pos, &mut x, &mut f_empty);
        assert!(
            matches!(r, Err(Error::InvalidArgument { arg: "fault", .. })),
            "{r:?}"
        );
        for v in [&x, &x_short] {
            assert!(b
                .download(v)
                .unwrap()
                .iter()
                .all(|v| v.to_bits() == POISON.to_bits()));
        }
        assert_eq!(b.download(&f).unwrap(), vec![0]);
        // Zero tokens: Ok, nothing touched.
        rope_forward(b, &Rope::new(0, 2, 4, 1e4), &pos, &mut x, &mut f).unwrap();
    }
    on(&Emu);
    on(&Cpu);
    let mut xd = vec![0.0f64; 8];
    let r = rope_forward(
        &Emu,
        &Rope::new(1, 2, 4, 1e4),
        &vec![0],
        &mut xd,
        &mut vec![0u32],
    );
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "x", .. })),
        "{r:?}"
    );
}

#[test]
fn c_launcher_validates_its_params() {
    let pos = [0i32, 1];
    let mut x = [POISON; 8];
    let good = sys::LkRopeParams {
        positions: pos.as_ptr(),
        x: x.as_mut_ptr().cast(),
        fault: std::ptr::null_mut(),
        tokens: 2,
        n_heads: 1,
        head_dim: 4,
        theta: 1e4,
        dtype: 0,
    };
    let call = |mutate: &dyn Fn(&mut sys::LkRopeParams)| {
        let mut p = good;
        mutate(&mut p);
        // SAFETY: pointers valid for the sizes, or rejected before any access.
        unsafe { sys::lk_emu_rope_forward(&p, std::ptr::null_mut()) }
    };
    let invalid = sys::LK_ERR_INVALID_ARGUMENT as i32;
    assert_eq!(call(&|p| p.tokens = -1), invalid);
    assert_eq!(call(&|p| p.n_heads = -1), invalid);
    assert_eq!(call(&|p| p.head_dim = 5), invalid);
    assert_eq!(call(&|p| p.head_dim = -2), invalid);
    assert_eq!(
        call(&|p| {
            p.n_heads = 1 << 20;
            p.head_dim = 1 << 12;
        }),
        invalid
    );
    assert_eq!(call(&|p| p.theta = f32::NAN), invalid);
    assert_eq!(call(&|p| p.theta = 0.0), invalid);
    assert_eq!(call(&|p| p.positions = std::ptr::null()), invalid);
    assert_eq!(call(&|p| p.x = std::ptr::null_mut()), invalid);
    assert_eq!(call(&|p| p.dtype = 9), sys::LK_ERR_UNSUPPORTED_DTYPE as i32);
    assert!(x.iter().all(|v| v.to_bits() == POISON.to_bits()));
    // A null fault pointer disables reporting; the bad token is still skipped.
    let neg = [-1i32, 0];
    let mut x2 = [1.0f32; 8];
    let x2p = x2.as_mut_ptr();
    assert_eq!(
        call(&|p| {
            p.positions = neg.as_ptr();
            p.x = x2p.cast();
        }),
        0
    );
    assert_eq!(&x2[..4], &[1.0; 4]);
}
