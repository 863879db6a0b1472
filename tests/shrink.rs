//! Dense shrink on the emulator (and cpu) against the f64 cpu reference.
//!
//! Tolerance: inputs are rounded to their dtype first and the reference is computed in f64 from the
//! same rounded values, so the only error is the kernel's f32 accumulation: 32 lanes each run an FMA
//! chain over d_in/32 terms, then a 5-level butterfly. Every element must satisfy
//! `|u − ref| ≤ (d_in/32 + 6) · 2⁻²⁴ · Σ|x·a|` (common::dot_tolerance), for every dtype.

mod common;

use common::*;
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{bf16, f16, Backend, Cpu, Emu, Float};
use proptest::prelude::*;

/// Runs the shrink on `backend` and checks it element by element against the reference; padding
/// columns of u (ld_u > rank) must keep their poison bits.
fn check_shrink<B: Backend, TX: Float, TW: Float>(backend: &B, shape: ShrinkDense, seed: u64) {
    let mut r = rng(seed);
    let x: Vec<TX> = random_vec(&mut r, shape.tokens * shape.ld_x);
    let a: Vec<TW> = random_vec(&mut r, shape.rank * shape.lda);
    let u_len = shape.tokens * shape.ld_u;
    let xb = backend.upload(&x).unwrap();
    let ab = backend.upload(&a).unwrap();
    let mut ub = backend.upload(&vec![POISON; u_len]).unwrap();
    shrink_dense(backend, &xb, &ab, &mut ub, &shape).unwrap();
    let u = backend.download(&ub).unwrap();
    for t in 0..shape.tokens {
        for j in 0..shape.ld_u {
            let got = u[t * shape.ld_u + j];
            if j >= shape.rank {
                assert_eq!(
                    got.to_bits(),
                    POISON.to_bits(),
                    "padding u[{t},{j}] was written"
                );
                continue;
            }
            let (mut exact, mut abs_sum) = (0.0f64, 0.0f64);
            for k in 0..shape.d_in {
                let p = x[t * shape.ld_x + k].to_f64() * a[j * shape.lda + k].to_f64();
                exact += p;
                abs_sum += p.abs();
            }
            let tol = dot_tolerance(shape.d_in, 32, 5, abs_sum);
            assert!(
                (got as f64 - exact).abs() <= tol,
                "{} u[{t},{j}] = {got}, reference {exact}, tolerance {tol:e} ({shape:?}, {}×{})",
                backend.name(),
                TX::DTYPE,
                TW::DTYPE
            );
        }
    }
}

fn shapes() -> impl Strategy<Value = ShrinkDense> {
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
    let d_in = prop_oneof![dims.clone(), Just(big)];
    (
        prop_oneof![Just(1usize), Just(3), 1usize..40],
        d_in,
        prop_oneof![Just(1usize), Just(8), Just(17), 1usize..70],
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
    #![proptest_config(proptest_config(64))]

    #[test]
    fn emu_f32_matches_reference(shape in shapes(), seed in any::<u64>()) {
        check_shrink::<_, f32, f32>(&Emu, shape, seed);
    }

    #[test]
    fn emu_f16_matches_reference(shape in shapes(), seed in any::<u64>()) {
        check_shrink::<_, f16, f16>(&Emu, shape, seed);
    }

    #[test]
    fn emu_bf16_matches_reference(shape in shapes(), seed in any::<u64>()) {
        check_shrink::<_, bf16, bf16>(&Emu, shape, seed);
    }

    #[test]
    fn emu_f32_x_with_half_weights(shape in shapes(), seed in any::<u64>()) {
        check_shrink::<_, f32, f16>(&Emu, shape, seed);
        check_shrink::<_, f32, bf16>(&Emu, shape, seed ^ 1);
    }
}

#[test]
fn cpu_reference_in_f64() {
    // The oracle itself against an independent straightforward sum (f64 inputs, f32 output).
    let shape = ShrinkDense::new(3, 19, 5);
    check_shrink::<_, f64, f64>(&Cpu, shape, 7);
}

#[test]
fn emu_large_decode_shape() {
    // Llama-7B decode: d_in 4096, rank 16, a batch of tokens (scaled).
    let shape = ShrinkDense::new(scaled(16, 2), 4096, 16);
    check_shrink::<_, f16, f16>(&Emu, shape, 42);
}

/// A token's bits do not depend on the rest of the batch (DESIGN.md §2 batch invariance).
#[test]
fn emu_batch_invariant_and_deterministic() {
    let (d_in, rank) = (1000, 24);
    let mut r = rng(3);
    let batch = 9;
    let x: Vec<bf16> = random_vec(&mut r, batch * d_in);
    let a: Vec<bf16> = random_vec(&mut r, rank * d_in);
    let run = |x: &[bf16], tokens: usize| {
        let mut u = vec![POISON; tokens * rank];
        shrink_dense(
            &Emu,
            &x.to_vec(),
            &a,
            &mut u,
            &ShrinkDense::new(tokens, d_in, rank),
        )
        .unwrap();
        u
    };
    let full = run(&x, batch);
    assert_eq!(full, run(&x, batch), "same inputs, different bits");
    for t in [0, 4, batch - 1] {
        let alone = run(&x[t * d_in..(t + 1) * d_in], 1);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&alone),
            bits(&full[t * rank..(t + 1) * rank]),
            "token {t} alone differs from in-batch"
        );
    }
}
