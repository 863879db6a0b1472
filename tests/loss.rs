//! Cross-entropy forward/backward and argmax_rows: the cpu reference (f64 finite-difference
//! gradient check, hand-computed cases) and the emulator against it.

mod common;

use common::*;
use lora_kernels::adapter::fault;
use lora_kernels::loss::{argmax_rows, cross_entropy_backward, cross_entropy_forward, reference};
use lora_kernels::{Backend, Cpu, Float};

/// Runs the forward on `b`; returns (losses, lse, fault word). Outputs start poisoned.
fn run_forward<B: Backend, T: Float>(
    b: &B,
    rows: usize,
    vocab: usize,
    logits: &[T],
    targets: &[i32],
) -> (Vec<f32>, Vec<f32>, u32) {
    let lb = b.upload(logits).unwrap();
    let tb = b.upload(targets).unwrap();
    let mut losses = b.upload(&vec![POISON; rows]).unwrap();
    let mut lse = b.upload(&vec![POISON; rows]).unwrap();
    let mut f = b.upload(&[0u32]).unwrap();
    cross_entropy_forward(b, rows, vocab, &lb, &tb, &mut losses, &mut lse, &mut f).unwrap();
    (
        b.download(&losses).unwrap(),
        b.download(&lse).unwrap(),
        b.download(&f).unwrap()[0],
    )
}

/// Runs the backward on `b` with d_logits poisoned.
fn run_backward<B: Backend, T: Float>(
    b: &B,
    rows: usize,
    vocab: usize,
    logits: &[T],
    targets: &[i32],
    lse: &[f32],
    d_loss: f32,
) -> Vec<T> {
    let lb = b.upload(logits).unwrap();
    let tb = b.upload(targets).unwrap();
    let sb = b.upload(lse).unwrap();
    let mut d = b.upload(&vec![T::from_f32(POISON); rows * vocab]).unwrap();
    cross_entropy_backward(b, rows, vocab, &lb, &tb, &sb, d_loss, &mut d).unwrap();
    b.download(&d).unwrap()
}

// ---- the cpu reference ------------------------------------------------------------------------

/// Central finite differences of L = d_loss · Σ_r loss_r (f64 losses from the reference) against
/// the cpu backend's backward (f64 logits, the forward's f32 lse). h = 1e-6: truncation error
/// O(h²) ≈ 1e-12, round-off ≈ 2⁻⁵³·|L|/h ≈ 1e-10; the analytic side's error is the f32 rounding
/// of lse, |lse|·2⁻²⁴ ≈ 2e-7 relative on each softmax value (|lse| ≤ 4 here). Bound: 1e-6·|d_loss|.
#[test]
fn backward_matches_central_finite_differences_f64() {
    let (rows, vocab) = (4, 9);
    let mut r = rng(11);
    let logits: Vec<f64> = random_vec::<f64>(&mut r, rows * vocab)
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    let targets = [3, -1, 0, 8];
    let d_loss = 0.37f32;
    let (_, lse, f) = run_forward(&Cpu, rows, vocab, &logits, &targets);
    assert_eq!(f, 0);
    let analytic = run_backward(&Cpu, rows, vocab, &logits, &targets, &lse, d_loss);
    let total = |x: &[f64]| -> f64 {
        (0..rows)
            .map(|row| reference::row_loss(&x[row * vocab..(row + 1) * vocab], targets[row]).0)
            .sum::<f64>()
            * d_loss as f64
    };
    let h = 1e-6;
    let mut x = logits.clone();
    for i in 0..rows * vocab {
        x[i] = logits[i] + h;
        let up = total(&x);
        x[i] = logits[i] - h;
        let down = total(&x);
        x[i] = logits[i];
        let fd = (up - down) / (2.0 * h);
        let err = (fd - analytic[i]).abs();
        assert!(
            err <= 1e-6 * d_loss as f64,
            "d_logits[{i}]: fd {fd}, analytic {}, err {err:e}",
            analytic[i]
        );
    }
    // The ignored row's gradient is exactly zero.
    assert!(analytic[vocab..2 * vocab].iter().all(|&v| v == 0.0));
}

#[test]
fn reference_hand_cases() {
    // Uniform logits: lse = ln(vocab) + c, loss = ln(vocab).
    let (losses, lse, f) = run_forward(&Cpu, 1, 4, &[2.0f64; 4], &[1]);
    assert_eq!(f, 0);
    assert!((losses[0] as f64 - 4f64.ln()).abs() < 1e-6);
    assert!((lse[0] as f64 - (2.0 + 4f64.ln())).abs() < 1e-6);
    // Vocab 1: lse = x, loss 0.
    let (losses, lse, _) = run_forward(&Cpu, 1, 1, &[-3.5f32], &[0]);
    assert_eq!((losses[0], lse[0]), (0.0, -3.5));
    // Large logits do not overflow (max subtracted).
    let (losses, lse, _) = run_forward(&Cpu, 1, 2, &[1000.0f32, 1000.0], &[0]);
    assert!((losses[0] as f64 - 2f64.ln()).abs() < 1e-6);
    assert!((lse[0] as f64 - (1000.0 + 2f64.ln())).abs() < 1e-3);
    // Ignored and bad targets: loss 0, lse still written; bad ones fault, −1 does not.
    let x = [0.5f32, -0.25, 1.0];
    let (losses, lse, f) = run_forward(&Cpu, 1, 3, &x, &[-1]);
    assert_eq!((losses[0], f), (0.0, 0));
    assert!((lse[0] as f64 - reference::row_lse(&x)).abs() < 1e-6);
    for bad in [3, -2, i32::MAX, i32::MIN] {
        let (losses, _, f) = run_forward(&Cpu, 1, 3, &x, &[bad]);
        assert_eq!((losses[0], f), (0.0, fault::INDEX), "target {bad}");
    }
    // Non-finite rows give NaN lse.
    for row in [
        [f32::NAN, 0.0],
        [f32::INFINITY, 0.0],
        [f32::NEG_INFINITY; 2],
    ] {
        let (_, lse, _) = run_forward(&Cpu, 1, 2, &row, &[0]);
        assert!(lse[0].is_nan(), "{row:?}");
    }
}

#[test]
fn reference_argmax_semantics() {
    let nan = f32::NAN;
    let cases: &[(&[f32], i32)] = &[
        (&[1.0], 0),
        (&[1.0, 3.0, 3.0, 2.0], 1),
        (&[-0.0, 0.0], 0),
        (&[0.0, -0.0], 0),
        (&[1.0, nan, 5.0, nan], 1),
        (&[f32::NEG_INFINITY, f32::NEG_INFINITY], 0),
        (&[f32::NEG_INFINITY, -1e30, f32::INFINITY, f32::INFINITY], 2),
        (&[nan], 0),
    ];
    for (row, want) in cases {
        let mut out = vec![-7];
        argmax_rows(&Cpu, 1, row.len(), &row.to_vec(), &mut out).unwrap();
        assert_eq!(out[0], *want, "{row:?}");
    }
}
