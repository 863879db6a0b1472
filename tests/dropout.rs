//! Fused Philox dropout on the emulator and the cpu reference.
//!
//! Masks are compared bit for bit (they are integer decisions from the same Philox words), and so
//! is `dropout_forward`/`dropout_backward`'s output: both backends compute `x̂ = to_f32(x) ·
//! keep_scale` with one f32 rounding, then round to the dtype. Statistical checks use 6-sigma
//! binomial bounds (a false failure has probability ~2·10⁻⁹ per check; the seeds are fixed anyway).
//!
//! Fused shrink tolerance: the reference accumulates the same f32 x̂ in f64, so the only error is
//! the kernel's f32 accumulation (32 lane chains of d_in/32 FMAs + a 5-level butterfly):
//! `|u − ref| ≤ (d_in/32 + 6) · 2⁻²⁴ · Σ|x̂·a|` (common::dot_tolerance), for every dtype. On emu the
//! fused shrink must also equal `shrink_dense` run on the explicit f32 x̂, bit for bit.

mod common;

use common::*;
use lora_kernels::dropout::{
    dropout_backward, dropout_forward, philox4x32_10, shrink_dense_dropout, Dropout, DropoutShape,
};
use lora_kernels::ffi::sys;
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{bf16, f16, Backend, Cpu, Emu, Error, Float};
use proptest::prelude::*;

/// Runs `dropout_forward` (or backward) on `b` with y pre-filled with poison; returns all of y.
fn run_scale<B: Backend, T: Float>(
    b: &B,
    drop: &Dropout,
    x: &[T],
    s: &DropoutShape,
    backward: bool,
) -> Vec<T> {
    let y_len = if s.tokens == 0 {
        0
    } else {
        (s.tokens - 1) * s.ld_y + s.d
    };
    let xb = b.upload(x).unwrap();
    let mut yb = b.upload(&vec![poison::<T>(); y_len + 3]).unwrap();
    if backward {
        dropout_backward(b, drop, &xb, &mut yb, s).unwrap();
    } else {
        dropout_forward(b, drop, &xb, &mut yb, s).unwrap();
    }
    b.download(&yb).unwrap()
}

/// The keep mask of a `[tokens, d]` tensor (row t = original token token_base + t), row-major,
/// read from `dropout_forward` of an all-ones input (kept → keep_scale ≠ 0, dropped → 0).
fn mask_of<B: Backend>(b: &B, drop: &Dropout, s: &DropoutShape) -> Vec<bool> {
    let x = vec![
        1.0f32;
        if s.tokens == 0 {
            0
        } else {
            (s.tokens - 1) * s.ld_x + s.d
        }
    ];
    let y = run_scale(b, drop, &x, s, false);
    let mut m = Vec::with_capacity(s.tokens * s.d);
    for t in 0..s.tokens {
        for c in 0..s.d {
            m.push(y[t * s.ld_y + c] != 0.0);
        }
    }
    m
}

// ---- Philox and the host-side mapping ---------------------------------------------------------

#[test]
fn philox_known_answer_vectors() {
    // Random123 KAT (DESIGN.md §4).
    assert_eq!(
        philox4x32_10([0, 0, 0, 0], [0, 0]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

#[test]
fn kernel_mask_is_the_philox_mapping() {
    // The kernels' mask, element by element, against the contract written out here from the KAT'd
    // generator: e uses word e % 4 of philox((lo(e/4), hi(e/4), lo(off), hi(off)), (lo(seed), hi(seed))).
    let (seed, offset) = (0x0123_4567_89ab_cdefu64, 0xfedc_ba98_7654_3210u64);
    let drop = Dropout::new(0.37, seed, offset).unwrap();
    let threshold = (0.37f64 * 4294967296.0).floor() as u32;
    let s = DropoutShape {
        token_base: (1usize << 33) / 7, // e/4 beyond 2^32: exercises hi32(e/4)
        ..DropoutShape::new(5, 7)
    };
    for b in [&mask_of(&Emu, &drop, &s), &mask_of(&Cpu, &drop, &s)] {
        for (i, &kept) in b.iter().enumerate() {
            let e = (s.token_base * s.d + i) as u64;
            let w = philox4x32_10(
                [
                    (e / 4) as u32,
                    ((e / 4) >> 32) as u32,
                    offset as u32,
                    (offset >> 32) as u32,
                ],
                [seed as u32, (seed >> 32) as u32],
            )[(e % 4) as usize];
            assert_eq!(kept, w >= threshold, "element {e}");
        }
    }
}

#[test]
fn host_threshold_and_keep_scale() {
    let c = |p: f64| {
        let c = Dropout::new(p, 1, 2).unwrap().config().unwrap();
        (c.threshold, c.keep_scale)
    };
    assert_eq!(c(0.0), (0, 1.0));
    assert_eq!(c(0.5), (1 << 31, 2.0));
    assert_eq!(c(0.25), (1 << 30, 4.0 / 3.0));
    assert_eq!(c(0.1), (429_496_729, (1.0f64 / 0.9) as f32));
    assert_eq!(c(1.0), (u32::MAX, 0.0));
    // Just below 1: floor(p · 2^32) = 2^32 − 1 is the cap, keep_scale large but finite.
    let below = 1.0 - f64::EPSILON / 2.0;
    assert_eq!(c(below).0, u32::MAX);
    assert!(c(below).1.is_finite() && c(below).1 > 1e15);
    // Below 2^-32: threshold 0 (nothing dropped), keep_scale rounds to exactly 1.
    assert_eq!(c(1e-10), (0, 1.0));
}

#[test]
fn invalid_p_is_a_typed_error() {
    for p in [
        -0.1,
        -0.0 - 1e-300,
        1.0 + 1e-15,
        2.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        let e = Dropout::new(p, 0, 0);
        assert!(
            matches!(e, Err(Error::InvalidArgument { arg: "p", .. })),
            "p = {p}: {e:?}"
        );
        // Public fields: every op validates again, and writes nothing.
        let drop = Dropout {
            p,
            seed: 0,
            offset: 0,
        };
        let x = vec![1.0f32; 6];
        let mut y = vec![POISON; 6];
        for r in [
            dropout_forward(&Emu, &drop, &x, &mut y, &DropoutShape::new(2, 3)),
            dropout_backward(&Cpu, &drop, &x, &mut y, &DropoutShape::new(2, 3)),
        ] {
            assert!(matches!(r, Err(Error::InvalidArgument { arg: "p", .. })));
        }
        let mut u = vec![POISON; 2];
        let r = shrink_dense_dropout(&Emu, &drop, &x, &x, &mut u, &ShrinkDense::new(2, 3, 1), 0);
        assert!(matches!(r, Err(Error::InvalidArgument { arg: "p", .. })));
        assert!(y.iter().chain(&u).all(|v| v.to_bits() == POISON.to_bits()));
    }
}

// ---- standalone dropout ------------------------------------------------------------------------

#[test]
fn keep_rate_within_binomial_bound() {
    let s = DropoutShape::new(scaled(64, 16), 1000);
    let n = (s.tokens * s.d) as f64;
    for (i, p) in [0.01, 0.1, 0.3, 0.5, 0.75, 0.9].into_iter().enumerate() {
        let drop = Dropout::new(p, 1234 + i as u64, 7).unwrap();
        let m = mask_of(&Emu, &drop, &s);
        let kept = m.iter().filter(|&&k| k).count() as f64;
        let (mean, sigma) = (n * (1.0 - p), (n * p * (1.0 - p)).sqrt());
        assert!(
            (kept - mean).abs() <= 6.0 * sigma,
            "p {p}: kept {kept} of {n}, expected {mean} ± 6·{sigma}"
        );
        assert_eq!(
            m,
            mask_of(&Cpu, &drop, &s),
            "p {p}: emu and cpu masks differ"
        );
    }
}

#[test]
fn different_offsets_and_seeds_give_independent_masks() {
    let s = DropoutShape::new(scaled(32, 8), 1000);
    let n = (s.tokens * s.d) as f64;
    for p in [0.1, 0.5] {
        let base = mask_of(&Emu, &Dropout::new(p, 99, 0).unwrap(), &s);
        for (seed, offset) in [(99, 1), (99, 1 << 32), (100, 0), (99 | 1 << 40, 0)] {
            let other = mask_of(&Emu, &Dropout::new(p, seed, offset).unwrap(), &s);
            let agree = base.iter().zip(&other).filter(|(a, b)| a == b).count() as f64;
            let q = p * p + (1.0 - p) * (1.0 - p);
            let sigma = (n * q * (1.0 - q)).sqrt();
            assert!(
                (agree - n * q).abs() <= 6.0 * sigma,
                "p {p}, seed {seed}, offset {offset}: agreement {agree} of {n}, expected {} ± 6·{sigma}",
                n * q
            );
        }
    }
}

#[test]
fn forward_and_backward_regenerate_the_same_mask() {
    fn case<T: Float>(seed: u64) {
        let s = DropoutShape {
            ld_x: 35,
            ld_y: 37,
            token_base: 5,
            ..DropoutShape::new(17, 33)
        };
        let drop = Dropout::new(0.4, seed, 3).unwrap();
        let mut r = rng(seed);
        let x: Vec<T> = random_vec(&mut r, (s.tokens - 1) * s.ld_x + s.d);
        let dy: Vec<T> = random_vec(&mut r, (s.tokens - 1) * s.ld_x + s.d);
        let y = run_scale(&Emu, &drop, &x, &s, false);
        let dx = run_scale(&Emu, &drop, &dy, &s, true);
        let cfg = drop.config().unwrap();
        let mut kept = 0;
        for t in 0..s.tokens {
            for c in 0..s.d {
                let (yv, dxv) = (y[t * s.ld_y + c].to_f64(), dx[t * s.ld_y + c].to_f64());
                assert_eq!(yv != 0.0, dxv != 0.0, "{} [{t},{c}]", T::DTYPE);
                let keep = yv != 0.0;
                kept += keep as usize;
                // Values: exactly the documented rounding.
                let want_y = cfg.apply(x[t * s.ld_x + c], keep);
                let want_dx = cfg.apply(dy[t * s.ld_x + c], keep);
                assert_eq!(bits(&[y[t * s.ld_y + c]]), bits(&[want_y]));
                assert_eq!(bits(&[dx[t * s.ld_y + c]]), bits(&[want_dx]));
            }
        }
        assert!(kept > 0 && kept < s.tokens * s.d);
    }
    case::<f32>(1);
    case::<f16>(2);
    case::<bf16>(3);
}

#[test]
fn mask_depends_only_on_the_flat_index() {
    let drop = Dropout::new(0.3, 42, 11).unwrap();
    // [12, 35] in one launch …
    let full = mask_of(&Emu, &drop, &DropoutShape::new(12, 35));
    assert_eq!(full, mask_of(&Cpu, &drop, &DropoutShape::new(12, 35)));
    // … equals the same flat range under other shapes: [6, 70], [60, 7], [420, 1] …
    for (tokens, d) in [(6, 70), (60, 7), (420, 1), (1, 420), (140, 3)] {
        assert_eq!(
            mask_of(&Emu, &drop, &DropoutShape::new(tokens, d)),
            full,
            "[{tokens}, {d}]"
        );
    }
    // … with padded leading dimensions …
    let padded = DropoutShape {
        ld_x: 40,
        ld_y: 36,
        ..DropoutShape::new(12, 35)
    };
    assert_eq!(mask_of(&Emu, &drop, &padded), full);
    // … and split into sub-batches that keep their original token indices.
    let mut split = Vec::new();
    for (base, tokens) in [(0, 1), (1, 4), (5, 2), (7, 5)] {
        split.extend(mask_of(
            &Emu,
            &drop,
            &DropoutShape {
                token_base: base,
                ..DropoutShape::new(tokens, 35)
            },
        ));
    }
    assert_eq!(split, full);
}

#[test]
fn p_zero_is_identity_and_p_one_is_all_zero() {
    let s = DropoutShape {
        ld_x: 20,
        ld_y: 19,
        ..DropoutShape::new(9, 19)
    };
    let mut r = rng(8);
    let mut x: Vec<bf16> = random_vec(&mut r, 8 * 20 + 19);
    x[3] = bf16::INFINITY;
    x[25] = bf16::NEG_INFINITY;
    let zero = Dropout::new(0.0, 5, 5).unwrap();
    let one = Dropout::new(1.0, 5, 5).unwrap();
    for y in [
        run_scale(&Emu, &zero, &x, &s, false),
        run_scale(&Cpu, &zero, &x, &s, true),
    ] {
        for t in 0..s.tokens {
            assert_eq!(
                bits(&y[t * s.ld_y..t * s.ld_y + s.d]),
                bits(&x[t * s.ld_x..t * s.ld_x + s.d])
            );
        }
    }
    for y in [
        run_scale(&Emu, &one, &x, &s, false),
        run_scale(&Emu, &one, &x, &s, true),
        run_scale(&Cpu, &one, &x, &s, false),
    ] {
        for t in 0..s.tokens {
            for v in &y[t * s.ld_y..t * s.ld_y + s.d] {
                assert_eq!(v.to_bits(), 0, "p = 1 must give +0 (no NaN from 0·inf)");
            }
        }
    }
}

fn scale_shapes() -> impl Strategy<Value = DropoutShape> {
    let dims = prop_oneof![
        Just(1usize),
        Just(2),
        Just(3),
        Just(4),
        Just(15),
        Just(17),
        Just(127),
        1usize..600
    ];
    (
        prop_oneof![Just(1usize), Just(3), 1usize..40],
        dims,
        0usize..3,
        0usize..3,
        prop_oneof![Just(0usize), 0usize..1000, Just(1usize << 31)],
    )
        .prop_map(|(tokens, d, px, py, token_base)| DropoutShape {
            tokens,
            d,
            ld_x: d + px,
            ld_y: d + py,
            token_base,
        })
}

fn check_scale_emu_vs_cpu<T: Float>(s: DropoutShape, p: f64, seed: u64, backward: bool) {
    let drop = Dropout::new(p, seed, seed.rotate_left(17)).unwrap();
    let mut r = rng(seed);
    let x: Vec<T> = random_vec(&mut r, (s.tokens - 1) * s.ld_x + s.d);
    let emu = run_scale(&Emu, &drop, &x, &s, backward);
    let cpu = run_scale(&Cpu, &drop, &x, &s, backward);
    // Whole buffers: values and untouched padding/tail (poison) bit for bit.
    assert_eq!(bits(&emu), bits(&cpu), "{} {s:?} p {p}", T::DTYPE);
    let tail = &emu[emu.len() - 3..];
    assert_eq!(bits(tail), bits(&[poison::<T>(); 3]), "tail written");
    for t in 0..s.tokens {
        for v in &emu[t * s.ld_y + s.d..((t + 1) * s.ld_y).min(emu.len())] {
            assert_eq!(bits(&[*v]), bits(&[poison::<T>()]), "padding written");
        }
    }
}

proptest! {
    #![proptest_config(proptest_config(48))]

    #[test]
    fn emu_scale_bit_identical_to_cpu(
        s in scale_shapes(),
        p in prop_oneof![Just(0.0), Just(1.0), Just(0.5), 0.0f64..1.0],
        seed in any::<u64>(),
        backward in any::<bool>(),
        dtype in 0..3,
    ) {
        match dtype {
            0 => check_scale_emu_vs_cpu::<f32>(s, p, seed, backward),
            1 => check_scale_emu_vs_cpu::<f16>(s, p, seed, backward),
            _ => check_scale_emu_vs_cpu::<bf16>(s, p, seed, backward),
        }
    }
}

#[test]
fn scale_bad_inputs_are_typed_errors_and_write_nothing() {
    let drop = Dropout::new(0.5, 1, 1).unwrap();
    let x = vec![1.0f32; 30];
    let mut y = vec![POISON; 30];
    let cases: [(DropoutShape, usize, &str); 6] = [
        (
            DropoutShape {
                ld_x: 4,
                ..DropoutShape::new(3, 5)
            },
            30,
            "ld_x",
        ),
        (
            DropoutShape {
                ld_y: 2,
                ..DropoutShape::new(3, 5)
            },
            30,
            "ld_y",
        ),
        (DropoutShape::new(7, 5), 30, "x"),
        (DropoutShape::new(3, 5), 14, "y"),
        (
            DropoutShape {
                token_base: usize::MAX / 4,
                ..DropoutShape::new(3, 5)
            },
            30,
            "token_base",
        ),
        (DropoutShape::new(1 << 31, 0), 30, "tokens"),
    ];
    for (s, y_len, arg) in cases {
        for backend in 0..2 {
            let mut yv = y[..y_len].to_vec();
            let r = if backend == 0 {
                dropout_forward(&Emu, &drop, &x, &mut yv, &s)
            } else {
                dropout_forward(&Cpu, &drop, &x, &mut yv, &s)
            };
            assert!(
                matches!(&r, Err(Error::InvalidArgument { arg: a, .. }) if *a == arg),
                "{s:?}: expected `{arg}`, got {r:?}"
            );
            assert!(yv.iter().all(|v| v.to_bits() == POISON.to_bits()));
        }
    }
    // Backward names its own buffers.
    let r = dropout_backward(
        &Emu,
        &drop,
        &x[..10].to_vec(),
        &mut y,
        &DropoutShape::new(3, 5),
    );
    assert!(
        matches!(r, Err(Error::InvalidArgument { arg: "dy", .. })),
        "{r:?}"
    );
    let r = dropout_backward(
        &Emu,
        &drop,
        &x,
        &mut y[..10].to_vec(),
        &DropoutShape::new(3, 5),
    );
    assert!(
        matches!(r, Err(Error::InvalidArgument { arg: "dx", .. })),
        "{r:?}"
    );
    // f64 runs on cpu only.
    let xd = vec![1.0f64; 6];
    let mut yd = vec![0.0f64; 6];
    let r = dropout_forward(&Emu, &drop, &xd, &mut yd, &DropoutShape::new(2, 3));
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "x", .. })),
        "{r:?}"
    );
    dropout_forward(&Cpu, &drop, &xd, &mut yd, &DropoutShape::new(2, 3)).unwrap();
    assert!(yd.iter().all(|&v| v == 0.0 || v == 2.0));
    assert!(y.iter().all(|v| v.to_bits() == POISON.to_bits()));
}

#[test]
fn c_launcher_validates_its_params() {
    // What the safe API cannot produce: a bad keep_scale, a negative token_base, a bad dtype tag.
    let x = [1.0f32; 4];
    let mut y = [POISON; 4];
    let good = sys::LkDropoutParams {
        x: x.as_ptr().cast(),
        y: y.as_mut_ptr().cast(),
        ld_x: 4,
        ld_y: 4,
        token_base: 0,
        drop: sys::LkDropoutConfig {
            seed: 1,
            offset: 2,
            threshold: 1 << 31,
            keep_scale: 2.0,
        },
        tokens: 1,
        d: 4,
        dtype: 0,
    };
    let bad = |mutate: &dyn Fn(&mut sys::LkDropoutParams)| {
        let mut p = good;
        mutate(&mut p);
        // SAFETY: the pointers are valid for the stated sizes (or rejected before any access).
        unsafe { sys::lk_emu_dropout_forward(&p, std::ptr::null_mut()) }
    };
    let invalid = sys::LK_ERR_INVALID_ARGUMENT as i32;
    assert_eq!(bad(&|p| p.drop.keep_scale = f32::NAN), invalid);
    assert_eq!(bad(&|p| p.drop.keep_scale = f32::INFINITY), invalid);
    assert_eq!(bad(&|p| p.drop.keep_scale = -1.0), invalid);
    assert_eq!(bad(&|p| p.token_base = -1), invalid);
    assert_eq!(bad(&|p| p.token_base = i64::MAX - 1), invalid);
    assert_eq!(bad(&|p| p.tokens = -1), invalid);
    assert_eq!(bad(&|p| p.ld_y = 3), invalid);
    assert_eq!(bad(&|p| p.x = std::ptr::null()), invalid);
    assert_eq!(bad(&|p| p.dtype = 7), sys::LK_ERR_UNSUPPORTED_DTYPE as i32);
    assert!(y.iter().all(|v| v.to_bits() == POISON.to_bits()));
    // SAFETY: null params are rejected before any access.
    assert_eq!(
        unsafe { sys::lk_emu_dropout_backward(std::ptr::null(), std::ptr::null_mut()) },
        invalid
    );
    assert_eq!(
        unsafe { sys::lk_emu_dropout_shrink_dense(std::ptr::null(), std::ptr::null_mut()) },
        invalid
    );
    assert_eq!(bad(&|_| ()), 0);
}

// ---- fused shrink ------------------------------------------------------------------------------

/// x̂ as an explicit f32 tensor `[tokens, ld_x]`: `to_f32(x) · keep_scale` or +0.
fn explicit_xhat<TX: Float>(drop: &Dropout, x: &[TX], s: &ShrinkDense, base: usize) -> Vec<f32> {
    let cfg = drop.config().unwrap();
    let mut xh = vec![0.0f32; x.len()];
    for t in 0..s.tokens {
        for k in 0..s.d_in {
            let keep = cfg.keeps(((base + t) * s.d_in + k) as u64);
            xh[t * s.ld_x + k] = cfg.xhat(x[t * s.ld_x + k], keep) as f32;
        }
    }
    xh
}

fn run_fused<B: Backend, TX: Float, TW: Float>(
    b: &B,
    drop: &Dropout,
    x: &[TX],
    a: &[TW],
    s: &ShrinkDense,
    base: usize,
) -> Vec<f32> {
    let xb = b.upload(x).unwrap();
    let ab = b.upload(a).unwrap();
    let mut ub = b.upload(&vec![POISON; s.tokens * s.ld_u]).unwrap();
    shrink_dense_dropout(b, drop, &xb, &ab, &mut ub, s, base).unwrap();
    b.download(&ub).unwrap()
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn check_fused<TX: Float, TW: Float>(s: ShrinkDense, p: f64, base: usize, seed: u64) {
    let drop = Dropout::new(p, seed, seed ^ 0x5555).unwrap();
    let mut r = rng(seed);
    let x: Vec<TX> = random_vec(&mut r, s.tokens * s.ld_x);
    let a: Vec<TW> = random_vec(&mut r, s.rank * s.lda);
    let got = run_fused(&Emu, &drop, &x, &a, &s, base);
    let xh = explicit_xhat(&drop, &x, &s, base);
    // Bit-identical to shrink_dense on the explicit f32 x̂ (same FMA chains, same butterfly) …
    let mut ub = vec![POISON; s.tokens * s.ld_u];
    shrink_dense(&Emu, &xh, &a, &mut ub, &s).unwrap();
    assert_eq!(
        f32_bits(&got),
        f32_bits(&ub),
        "{s:?} p {p}: fused ≠ shrink_dense(x̂)"
    );
    // … and deterministic.
    assert_eq!(
        f32_bits(&got),
        f32_bits(&run_fused(&Emu, &drop, &x, &a, &s, base))
    );
    // Against the cpu reference (f64 accumulation of the same x̂) within the shrink tolerance.
    let want = run_fused(&Cpu, &drop, &x, &a, &s, base);
    for t in 0..s.tokens {
        for j in 0..s.ld_u {
            let (g, w) = (got[t * s.ld_u + j], want[t * s.ld_u + j]);
            if j >= s.rank {
                assert_eq!(g.to_bits(), POISON.to_bits(), "padding u[{t},{j}] written");
                assert_eq!(
                    w.to_bits(),
                    POISON.to_bits(),
                    "cpu padding u[{t},{j}] written"
                );
                continue;
            }
            let abs_sum: f64 = (0..s.d_in)
                .map(|k| (xh[t * s.ld_x + k] as f64 * a[j * s.lda + k].to_f64()).abs())
                .sum();
            let tol =
                dot_tolerance(s.d_in, 32, 5, abs_sum) + (w as f64).abs() * f64::powi(2.0, -24);
            assert!(
                (g as f64 - w as f64).abs() <= tol,
                "u[{t},{j}] = {g}, reference {w}, tol {tol:e} ({s:?}, p {p}, {}×{})",
                TX::DTYPE,
                TW::DTYPE
            );
        }
    }
}

fn fused_shapes() -> impl Strategy<Value = ShrinkDense> {
    let dims = prop_oneof![
        Just(1usize),
        Just(2),
        Just(3),
        Just(15),
        Just(17),
        Just(127),
        1usize..300
    ];
    let big = if scale() >= 1.0 { 4097 } else { 1025 };
    (
        prop_oneof![Just(1usize), Just(3), 1usize..24],
        prop_oneof![dims, Just(big), Just(1024), Just(2049)],
        prop_oneof![Just(1usize), Just(8), Just(32), Just(33), 1usize..70],
        0usize..3,
        0usize..3,
        0usize..3,
    )
        .prop_map(|(tokens, d_in, rank, px, pa, pu)| ShrinkDense {
            tokens,
            d_in,
            rank,
            ld_x: d_in + px,
            lda: d_in + pa,
            ld_u: rank + pu,
        })
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_fused_shrink_f32(s in fused_shapes(), p in 0.0f64..0.95, base in 0usize..5000, seed in any::<u64>()) {
        check_fused::<f32, f32>(s, p, base, seed);
    }

    #[test]
    fn emu_fused_shrink_f16(s in fused_shapes(), p in 0.0f64..0.95, base in 0usize..5000, seed in any::<u64>()) {
        check_fused::<f16, f16>(s, p, base, seed);
    }

    #[test]
    fn emu_fused_shrink_bf16_and_f32_x(s in fused_shapes(), p in 0.0f64..0.95, seed in any::<u64>()) {
        check_fused::<bf16, bf16>(s, p, 0, seed);
        check_fused::<f32, bf16>(s, p, 3, seed ^ 1);
    }
}

#[test]
fn fused_shrink_p_zero_equals_shrink_dense_and_p_one_is_zero() {
    let s = ShrinkDense {
        ld_x: 1030,
        ld_u: 41,
        ..ShrinkDense::new(5, 1029, 40)
    };
    let mut r = rng(12);
    let x: Vec<f16> = random_vec(&mut r, s.tokens * s.ld_x);
    let a: Vec<f16> = random_vec(&mut r, s.rank * s.lda);
    let mut plain = vec![POISON; s.tokens * s.ld_u];
    shrink_dense(&Emu, &x, &a, &mut plain, &s).unwrap();
    let zero = Dropout::new(0.0, 3, 4).unwrap();
    assert_eq!(
        f32_bits(&run_fused(&Emu, &zero, &x, &a, &s, 17)),
        f32_bits(&plain),
        "p = 0 must be exactly shrink_dense"
    );
    let mut plain_cpu = vec![POISON; s.tokens * s.ld_u];
    shrink_dense(&Cpu, &x, &a, &mut plain_cpu, &s).unwrap();
    assert_eq!(
        f32_bits(&run_fused(&Cpu, &zero, &x, &a, &s, 17)),
        f32_bits(&plain_cpu)
    );
    let one = Dropout::new(1.0, 3, 4).unwrap();
    let mut xi = x.clone();
    xi[7] = f16::INFINITY;
    for u in [
        run_fused(&Emu, &one, &xi, &a, &s, 0),
        run_fused(&Cpu, &one, &xi, &a, &s, 0),
    ] {
        for t in 0..s.tokens {
            for j in 0..s.rank {
                assert_eq!(u[t * s.ld_u + j], 0.0, "p = 1: u[{t},{j}]");
            }
            assert_eq!(u[t * s.ld_u + s.rank].to_bits(), POISON.to_bits());
        }
    }
}

/// A token's bits do not depend on the rest of the batch, given its original index.
#[test]
fn fused_shrink_batch_invariant() {
    let (d_in, rank, batch) = (1000, 36, 9);
    let drop = Dropout::new(0.2, 77, 1).unwrap();
    let mut r = rng(13);
    let x: Vec<bf16> = random_vec(&mut r, batch * d_in);
    let a: Vec<bf16> = random_vec(&mut r, rank * d_in);
    let full = run_fused(&Emu, &drop, &x, &a, &ShrinkDense::new(batch, d_in, rank), 0);
    for t in [0, 4, batch - 1] {
        let alone = run_fused(
            &Emu,
            &drop,
            &x[t * d_in..(t + 1) * d_in],
            &a,
            &ShrinkDense::new(1, d_in, rank),
            t,
        );
        assert_eq!(
            f32_bits(&alone),
            f32_bits(&full[t * rank..(t + 1) * rank]),
            "token {t}"
        );
    }
}

#[test]
fn fused_shrink_mask_matches_the_standalone_mask() {
    // The fused kernel drops exactly the elements dropout_forward drops: with A = e_k rows picking
    // single columns, u[t, j] = x̂[t, k_j].
    let (tokens, d_in) = (6, 45);
    let drop = Dropout::new(0.5, 9, 9).unwrap();
    let mut r = rng(14);
    let x: Vec<f32> = random_vec(&mut r, tokens * d_in);
    let mut a = vec![0.0f32; d_in * d_in];
    for k in 0..d_in {
        a[k * d_in + k] = 1.0;
    }
    let u = run_fused(
        &Emu,
        &drop,
        &x,
        &a,
        &ShrinkDense::new(tokens, d_in, d_in),
        2,
    );
    let s = DropoutShape {
        token_base: 2,
        ..DropoutShape::new(tokens, d_in)
    };
    let y = run_scale(&Emu, &drop, &x, &s, false);
    assert_eq!(f32_bits(&u), f32_bits(&y[..tokens * d_in]));
}

#[test]
fn fused_shrink_bad_inputs_are_typed_errors() {
    let drop = Dropout::new(0.5, 1, 1).unwrap();
    let x = vec![1.0f32; 40];
    let a = vec![1.0f32; 29];
    let mut u = vec![POISON; 12];
    let s = ShrinkDense::new(4, 10, 3);
    let r = shrink_dense_dropout(&Emu, &drop, &x, &a, &mut u, &s, 0);
    assert!(
        matches!(r, Err(Error::InvalidArgument { arg: "a", .. })),
        "{r:?}"
    );
    let r = shrink_dense_dropout(&Cpu, &drop, &x[..39].to_vec(), &a, &mut u, &s, 0);
    assert!(
        matches!(r, Err(Error::InvalidArgument { arg: "x", .. })),
        "{r:?}"
    );
    let r = shrink_dense_dropout(&Emu, &drop, &x, &x, &mut u, &s, usize::MAX - 2);
    assert!(
        matches!(
            r,
            Err(Error::InvalidArgument {
                arg: "token_base",
                ..
            })
        ),
        "{r:?}"
    );
    let bad_ld = ShrinkDense { ld_u: 2, ..s };
    let r = shrink_dense_dropout(&Emu, &drop, &x, &x, &mut u, &bad_ld, 0);
    assert!(
        matches!(r, Err(Error::InvalidArgument { arg: "ld_u", .. })),
        "{r:?}"
    );
    let xh = vec![f16::ONE; 40];
    let ab = vec![bf16::ONE; 30];
    let r = shrink_dense_dropout(&Emu, &drop, &xh, &ab, &mut u, &s, 0);
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "x", .. })),
        "{r:?}"
    );
    assert!(u.iter().all(|v| v.to_bits() == POISON.to_bits()));
}
