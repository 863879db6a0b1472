//! Cross-entropy forward/backward and argmax_rows: the cpu reference (f64 finite-difference
//! gradient check, hand-computed cases) and the emulator against it.

mod common;

use common::*;
use lora_kernels::adapter::fault;
use lora_kernels::ffi::sys;
use lora_kernels::loss::{argmax_rows, cross_entropy_backward, cross_entropy_forward, reference};
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, Float, Schedule};
use proptest::prelude::*;
use rand::Rng;

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

// ---- the emulator against the reference ---------------------------------------------------------

const U: f64 = 1.0 / 16_777_216.0; // 2⁻²⁴

/// Threads per row and the row's tree depth in the kernels (cuda/loss.cu): one warp up to vocab
/// 1024, else 512 threads (a warp butterfly, then one over the 16 warp results).
fn group(vocab: usize) -> (usize, usize) {
    if vocab <= 1024 {
        (32, 5)
    } else {
        (512, 10)
    }
}

/// Elements one kernel thread folds into its running (max, sum): chunks of 16/sizeof(T).
fn per_thread<T: Float>(vocab: usize) -> usize {
    let v = 16 / T::DTYPE.size_bytes();
    vocab.div_ceil(v * group(vocab).0) * v
}

/// lse tolerance. The kernel's sum s = Σ expf(x − m) in f32: each expf ≤ 2 ulp (CUDA's bound;
/// glibc < 1), each addition ½ ulp along a chain of `per_thread` terms, each rescale (≤ one per
/// chunk and one per tree level) one expf and one multiply: relative error of s ≤ (2·per_thread +
/// 4·levels + 8)·2⁻²⁴. ln turns that into an absolute error of lse, plus logf (1 ulp), the final
/// add and the reference's rounding to f32 (½ ulp each) of |lse|.
fn lse_tol<T: Float>(vocab: usize, lse: f64) -> f64 {
    let (_, levels) = group(vocab);
    (2 * per_thread::<T>(vocab) + 4 * levels + 8) as f64 * U + 4.0 * U * lse.abs()
}

/// Logits for tests: uniform in [−4, 4) (a spread softmax), rounded to T.
fn logits<T: Float>(seed: u64, n: usize) -> Vec<T> {
    let mut r = rng(seed);
    random_vec::<f64>(&mut r, n)
        .iter()
        .map(|v| T::from_f64(4.0 * v))
        .collect()
}

/// Targets: mostly valid, with an ignored row (−1) and out-of-range ones where `bad`.
fn targets(seed: u64, rows: usize, vocab: usize, bad: bool) -> Vec<i32> {
    let mut r = rng(seed ^ 0x5eed);
    (0..rows)
        .map(|i| match (i % 5, bad) {
            (1, _) => -1,
            (3, true) => {
                if i % 2 == 0 {
                    vocab as i32
                } else {
                    -2 - (i as i32)
                }
            }
            _ => r.random_range(0..vocab as i32),
        })
        .collect()
}

/// Emu vs cpu forward and backward at one shape; outputs poisoned with 3 extra elements that must
/// stay untouched.
fn check_ce<T: Float>(rows: usize, vocab: usize, seed: u64, bad: bool) {
    let x: Vec<T> = logits(seed, rows * vocab);
    let t = targets(seed, rows, vocab, bad);
    // Forward on both, outputs 3 longer than needed.
    let fwd = |emu: bool| -> (Vec<f32>, Vec<f32>, u32) {
        let mut losses = vec![POISON; rows + 3];
        let mut lse = vec![POISON; rows + 3];
        let mut fault = vec![0u32];
        let (xb, tb) = (x.clone(), t.clone());
        if emu {
            cross_entropy_forward(
                &Emu,
                rows,
                vocab,
                &xb,
                &tb,
                &mut losses,
                &mut lse,
                &mut fault,
            )
        } else {
            cross_entropy_forward(
                &Cpu,
                rows,
                vocab,
                &xb,
                &tb,
                &mut losses,
                &mut lse,
                &mut fault,
            )
        }
        .unwrap();
        (losses, lse, fault[0])
    };
    let (el, es, ef) = fwd(true);
    let (cl, cs, cf) = fwd(false);
    assert_eq!(ef, cf, "fault word");
    assert_eq!(ef != 0, bad && rows > 3, "fault iff a bad target");
    for extra in rows..rows + 3 {
        assert_eq!(
            el[extra].to_bits(),
            POISON.to_bits(),
            "losses[{extra}] written"
        );
        assert_eq!(
            es[extra].to_bits(),
            POISON.to_bits(),
            "lse[{extra}] written"
        );
    }
    for r in 0..rows {
        let exact = reference::row_lse(&x[r * vocab..(r + 1) * vocab]);
        let tol = lse_tol::<T>(vocab, exact);
        assert!(
            (es[r] as f64 - cs[r] as f64).abs() <= tol,
            "lse[{r}] emu {} cpu {} tol {tol:e} (vocab {vocab}, {})",
            es[r],
            cs[r],
            T::DTYPE
        );
        if reference::target_valid(t[r], vocab) {
            let xt = x[r * vocab + t[r] as usize].to_f64();
            let ltol = tol + 2.0 * U * (exact.abs() + xt.abs());
            assert!(
                (el[r] as f64 - cl[r] as f64).abs() <= ltol,
                "loss[{r}] emu {} cpu {} tol {ltol:e}",
                el[r],
                cl[r]
            );
        } else {
            assert_eq!((el[r], cl[r]), (0.0, 0.0), "loss of an ignored/bad row");
        }
    }
    // Backward from the cpu's lse on both, so only the backward differs.
    let d_loss = 0.75f32;
    let mut lse_in = cs[..rows].to_vec();
    lse_in.push(POISON); // longer than needed: fine
    let eb = run_backward(&Emu, rows, vocab, &x, &t, &lse_in, d_loss);
    let cb = run_backward(&Cpu, rows, vocab, &x, &t, &lse_in, d_loss);
    let ulp_t = match T::DTYPE {
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        _ => 2f64.powi(-23),
    };
    for r in 0..rows {
        for c in 0..vocab {
            let i = r * vocab + c;
            let (e, w) = (eb[i].to_f64(), cb[i].to_f64());
            if !reference::target_valid(t[r], vocab) {
                assert_eq!(
                    e.to_bits(),
                    0f64.to_bits(),
                    "d_logits[{r},{c}] of a skipped row"
                );
                continue;
            }
            // expf(x − lse): the f32 subtraction (|x − lse|·2⁻²⁴ relative) and expf (2 ulp);
            // the onehot subtraction and the d_loss multiply (½ ulp each); T's rounding of the
            // f32 result vs the reference's single rounding (1 ulp of T, + f16's subnormal step).
            let prob = (x[i].to_f64() - lse_in[r] as f64).exp();
            let diff = (x[i].to_f64() - lse_in[r] as f64).abs();
            let tol = d_loss as f64
                * ((diff + 4.0) * U * prob
                    + 2.0 * U * (prob - if c == t[r] as usize { 1.0 } else { 0.0 }).abs())
                + ulp_t * w.abs()
                + 2f64.powi(-24);
            assert!(
                (e - w).abs() <= tol,
                "d_logits[{r},{c}] emu {e} cpu {w} tol {tol:e} (vocab {vocab}, {})",
                T::DTYPE
            );
        }
    }
}

#[test]
fn emu_matches_cpu_odd_vocabs_f32() {
    for (i, &vocab) in [1usize, 3, 17, 127, 1024, 1025, 4097].iter().enumerate() {
        let rows = if vocab > 1024 { 5 } else { 11 };
        check_ce::<f32>(rows, vocab, 10 + i as u64, true);
    }
    check_ce::<f32>(1, 17, 3, false);
}

/// Llama-2 (32000) and Llama-3 (128256) vocabularies.
#[test]
fn emu_matches_cpu_llama_vocabs() {
    check_ce::<f32>(3, 32000, 61, true);
    check_ce::<bf16>(2, 128_256, 62, false);
}

#[test]
fn emu_matches_cpu_odd_vocabs_f16_bf16() {
    for (i, &vocab) in [1usize, 3, 17, 127, 4097].iter().enumerate() {
        let rows = if vocab > 1024 { 4 } else { 9 };
        check_ce::<f16>(rows, vocab, 30 + i as u64, true);
        check_ce::<bf16>(rows, vocab, 40 + i as u64, true);
    }
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_matches_cpu_random_shapes(
        rows in 1usize..9,
        vocab in prop_oneof![1usize..40, 40usize..1100],
        seed in any::<u64>(),
        dtype in 0..3,
    ) {
        match dtype {
            0 => check_ce::<f32>(rows, vocab, seed, true),
            1 => check_ce::<f16>(rows, vocab, seed, true),
            _ => check_ce::<bf16>(rows, vocab, seed, true),
        }
    }

    #[test]
    fn emu_argmax_matches_cpu_random(
        rows in 1usize..7,
        cols in prop_oneof![1usize..70, 1000usize..1100],
        seed in any::<u64>(),
        plant in 0usize..4,
    ) {
        check_argmax::<f32>(rows, cols, seed, plant);
        check_argmax::<bf16>(rows, cols, seed, plant);
    }
}

/// Large logits (|x| ~ 1e4): the max subtraction keeps every exp finite on both backends.
#[test]
fn emu_large_logits_do_not_overflow() {
    let (rows, vocab) = (3, 130);
    let x: Vec<f32> = logits::<f32>(5, rows * vocab)
        .iter()
        .map(|v| v * 2500.0 + 1e4)
        .collect();
    let t = vec![0, 64, 129];
    let (el, es, _) = run_forward(&Emu, rows, vocab, &x, &t);
    let (cl, cs, _) = run_forward(&Cpu, rows, vocab, &x, &t);
    for r in 0..rows {
        assert!(es[r].is_finite() && el[r].is_finite());
        assert!((es[r] - cs[r]).abs() <= 4.0 * f32::EPSILON * cs[r].abs());
        assert!((el[r] - cl[r]).abs() <= 8.0 * f32::EPSILON * cs[r].abs());
    }
}

/// Non-finite rows give NaN lse on the emulator too (and the backward row is NaN).
#[test]
fn emu_non_finite_rows_are_nan() {
    let vocab = 5;
    let mut x = vec![0.25f32; 4 * vocab];
    x[2] = f32::NAN;
    x[vocab + 4] = f32::INFINITY;
    for v in &mut x[2 * vocab..3 * vocab] {
        *v = f32::NEG_INFINITY;
    }
    let t = vec![0, 0, 0, 0];
    let (el, es, _) = run_forward(&Emu, 4, vocab, &x, &t);
    for r in 0..3 {
        assert!(
            es[r].is_nan() && el[r].is_nan(),
            "row {r}: lse {}, loss {}",
            es[r],
            el[r]
        );
    }
    assert!((es[3] as f64 - (0.25 + 5f64.ln())).abs() < 1e-6);
}

// ---- argmax ------------------------------------------------------------------------------------

/// Random rows with planted ties, ±0, NaN and ±inf; emu must equal the cpu reference exactly.
fn check_argmax<T: Float>(rows: usize, cols: usize, seed: u64, plant: usize) {
    let mut r = rng(seed);
    // Coarse values (multiples of 1/8) make ties common.
    let mut x: Vec<T> = (0..rows * cols)
        .map(|_| T::from_f64((r.random_range(-16..16) as f64) / 8.0))
        .collect();
    for row in 0..rows {
        let at = |r: &mut rand::rngs::StdRng| row * cols + r.random_range(0..cols);
        match (plant + row) % 4 {
            1 => {
                let (a, b) = (at(&mut r), at(&mut r));
                x[a] = T::from_f64(f64::NAN);
                x[b] = T::from_f64(f64::NAN);
            }
            2 => {
                let a = at(&mut r);
                x[a] = T::from_f64(f64::INFINITY);
                let b = at(&mut r);
                x[b] = T::from_f64(f64::NEG_INFINITY);
            }
            3 => {
                for c in 0..cols {
                    x[row * cols + c] = T::from_f64(if c % 2 == 0 { -0.0 } else { 0.0 });
                }
            }
            _ => {}
        }
    }
    let mut got = vec![-5i32; rows + 2];
    let mut want = vec![-5i32; rows + 2];
    argmax_rows(&Emu, rows, cols, &x, &mut got).unwrap();
    argmax_rows(&Cpu, rows, cols, &x, &mut want).unwrap();
    assert_eq!(got, want, "rows {rows} cols {cols} ({})", T::DTYPE);
    assert_eq!(&got[rows..], &[-5, -5], "out past rows written");
}

#[test]
fn emu_argmax_odd_sizes_all_dtypes() {
    for (i, &cols) in [1usize, 3, 17, 127, 1024, 1025, 4097].iter().enumerate() {
        let rows = if cols > 1024 { 4 } else { 9 };
        check_argmax::<f32>(rows, cols, i as u64, i);
        check_argmax::<f16>(rows, cols, 50 + i as u64, i + 1);
        check_argmax::<bf16>(rows, cols, 90 + i as u64, i + 2);
    }
}

/// The maximum is in the last chunk of the last thread, or the first element: index math at the
/// edges.
#[test]
fn emu_argmax_edges() {
    for cols in [1usize, 33, 1025, 4097] {
        for pos in [0, cols / 2, cols - 1] {
            let mut x = vec![-1.0f32; cols];
            x[pos] = 2.0;
            let mut out = vec![-1];
            argmax_rows(&Emu, 1, cols, &x, &mut out).unwrap();
            assert_eq!(out[0], pos as i32, "cols {cols}");
            // A later equal maximum never wins.
            if pos + 1 < cols {
                x[cols - 1] = 2.0;
                argmax_rows(&Emu, 1, cols, &x, &mut out).unwrap();
                assert_eq!(out[0], pos as i32, "tie, cols {cols}");
            }
        }
    }
}

// ---- determinism -----------------------------------------------------------------------------

fn all_outputs(rows: usize, vocab: usize) -> (Vec<u32>, Vec<u32>, Vec<u16>, Vec<i32>) {
    let x: Vec<bf16> = logits(77, rows * vocab);
    let t = targets(77, rows, vocab, true);
    let (l, s, _) = run_forward(&Emu, rows, vocab, &x, &t);
    let d = run_backward(&Emu, rows, vocab, &x, &t, &s, 0.5);
    let mut am = vec![0i32; rows];
    argmax_rows(&Emu, rows, vocab, &x, &mut am).unwrap();
    (
        l.iter().chain(&s).map(|v| v.to_bits()).collect(),
        s.iter().map(|v| v.to_bits()).collect(),
        d.iter().map(|v| v.to_bits()).collect(),
        am,
    )
}

#[test]
fn emu_deterministic_across_runs_and_schedules() {
    for &(rows, vocab) in &[(9usize, 100usize), (2, 2049)] {
        let first = all_outputs(rows, vocab);
        assert_eq!(all_outputs(rows, vocab), first, "run to run");
        for sched in [Schedule::Reverse, Schedule::Random(7)] {
            let other = Emu::with_schedule(sched, || all_outputs(rows, vocab));
            assert_eq!(other, first, "{sched:?}");
        }
    }
}

/// A row's bits do not depend on the rest of the batch or its position (batch invariance): row 0
/// alone equals row 0 of a batch, and a row shifted to an odd position (a misaligned row start:
/// element-by-element loads) equals itself at an aligned one.
#[test]
fn emu_batch_invariant() {
    for vocab in [67usize, 1031] {
        let x: Vec<f32> = logits(3, 4 * vocab);
        let t = vec![1, 2, 3, 4];
        let (l4, s4, _) = run_forward(&Emu, 4, vocab, &x, &t);
        for r in 0..4 {
            let row = x[r * vocab..(r + 1) * vocab].to_vec();
            let (l1, s1, _) = run_forward(&Emu, 1, vocab, &row, &t[r..r + 1]);
            assert_eq!(
                (l1[0].to_bits(), s1[0].to_bits()),
                (l4[r].to_bits(), s4[r].to_bits())
            );
        }
    }
}

// ---- bad inputs --------------------------------------------------------------------------------

fn expect_invalid(r: lora_kernels::Result<()>, want: &str) {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, want),
        other => panic!("expected InvalidArgument({want}), got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_typed_errors_and_write_nothing() {
    let b = Emu;
    let (rows, vocab) = (3usize, 5usize);
    let x = vec![0.5f32; rows * vocab];
    let t = vec![0i32; rows];
    let mut losses = vec![POISON; rows];
    let mut lse = vec![POISON; rows];
    let mut fault = vec![0u32];
    let short_f = vec![0.5f32; rows * vocab - 1];
    let short_t = vec![0i32; rows - 1];
    let big = i32::MAX as usize + 1;
    // forward
    let f =
        |rows: usize, vocab: usize, x: &Vec<f32>, t: &Vec<i32>, nl: usize, ns: usize, nf: usize| {
            let mut l = vec![POISON; nl];
            let mut s = vec![POISON; ns];
            let mut fw = vec![0u32; nf];
            let r = cross_entropy_forward(&b, rows, vocab, x, t, &mut l, &mut s, &mut fw);
            assert!(l.iter().chain(&s).all(|v| v.to_bits() == POISON.to_bits()));
            r
        };
    expect_invalid(f(big, 1, &x, &t, 3, 3, 1), "rows");
    expect_invalid(f(1, big, &x, &t, 3, 3, 1), "vocab");
    expect_invalid(f(3, 0, &x, &t, 3, 3, 1), "vocab");
    expect_invalid(f(3, 5, &short_f, &t, 3, 3, 1), "logits");
    expect_invalid(f(3, 5, &x, &short_t, 3, 3, 1), "targets");
    expect_invalid(f(3, 5, &x, &t, 2, 3, 1), "losses");
    expect_invalid(f(3, 5, &x, &t, 3, 2, 1), "lse");
    expect_invalid(f(3, 5, &x, &t, 3, 3, 0), "fault");
    // rows 0: Ok, nothing written.
    f(0, 0, &x, &t, 3, 3, 1).unwrap();
    let x64 = vec![0.5f64; rows * vocab];
    assert!(matches!(
        cross_entropy_forward(&b, rows, vocab, &x64, &t, &mut losses, &mut lse, &mut fault),
        Err(Error::UnsupportedDtype { arg: "logits", .. })
    ));
    // backward
    let lse_ok = vec![1.0f32; rows];
    let bw =
        |rows: usize, vocab: usize, x: &Vec<f32>, t: &Vec<i32>, s: &Vec<f32>, d: f32, nd: usize| {
            let mut out = vec![POISON; nd];
            let r = cross_entropy_backward(&b, rows, vocab, x, t, s, d, &mut out);
            assert!(out.iter().all(|v| v.to_bits() == POISON.to_bits()));
            r
        };
    expect_invalid(bw(big, 1, &x, &t, &lse_ok, 1.0, 15), "rows");
    expect_invalid(bw(3, 0, &x, &t, &lse_ok, 1.0, 15), "vocab");
    expect_invalid(bw(3, 5, &x, &t, &lse_ok, f32::NAN, 15), "d_loss");
    expect_invalid(bw(3, 5, &x, &t, &lse_ok, f32::INFINITY, 15), "d_loss");
    expect_invalid(bw(3, 5, &short_f, &t, &lse_ok, 1.0, 15), "logits");
    expect_invalid(bw(3, 5, &x, &short_t, &lse_ok, 1.0, 15), "targets");
    expect_invalid(bw(3, 5, &x, &t, &lse_ok[..2].to_vec(), 1.0, 15), "lse");
    expect_invalid(bw(3, 5, &x, &t, &lse_ok, 1.0, 14), "d_logits");
    let mut d64 = vec![0.0f64; 15];
    assert!(matches!(
        cross_entropy_backward(&b, rows, vocab, &x64, &t, &lse_ok, 1.0, &mut d64),
        Err(Error::UnsupportedDtype { arg: "logits", .. })
    ));
    // argmax
    let am = |rows: usize, cols: usize, x: &Vec<f32>, no: usize| {
        let mut out = vec![-9i32; no];
        let r = argmax_rows(&b, rows, cols, x, &mut out);
        assert!(out.iter().all(|&v| v == -9));
        r
    };
    expect_invalid(am(big, 1, &x, 3), "rows");
    expect_invalid(am(1, big, &x, 3), "cols");
    expect_invalid(am(3, 0, &x, 3), "cols");
    expect_invalid(am(3, 5, &short_f, 3), "x");
    expect_invalid(am(3, 5, &x, 2), "out");
    let mut out = vec![0i32; 3];
    assert!(matches!(
        argmax_rows(&b, rows, vocab, &x64, &mut out),
        Err(Error::UnsupportedDtype { arg: "x", .. })
    ));
}

/// The C launchers' own checks (null params, negative sizes, zero columns, bad dtype, null
/// pointers, non-finite d_loss) return LK_ERR codes.
#[test]
fn c_launchers_reject_bad_params() {
    let inv = sys::LK_ERR_INVALID_ARGUMENT as i32;
    let dt = sys::LK_ERR_UNSUPPORTED_DTYPE as i32;
    let x = [0.0f32; 8];
    let t = [0i32; 2];
    let l = [0.0f32; 2];
    let s = [0.0f32; 2];
    let fwd = |rows: i32, vocab: i32, dtype: i32, null: bool| {
        let p = sys::LkCrossEntropyForwardParams {
            logits: if null {
                std::ptr::null()
            } else {
                x.as_ptr().cast()
            },
            targets: t.as_ptr(),
            losses: l.as_ptr() as *mut f32,
            lse: s.as_ptr() as *mut f32,
            fault: std::ptr::null_mut(),
            rows,
            vocab,
            dtype,
        };
        // SAFETY: valid pointers for 2 rows of 4 (the only sizes that reach a kernel).
        unsafe { sys::lk_emu_loss_cross_entropy_forward(&p, std::ptr::null_mut()) }
    };
    // SAFETY: a null params pointer is checked first.
    assert_eq!(
        unsafe { sys::lk_emu_loss_cross_entropy_forward(std::ptr::null(), std::ptr::null_mut()) },
        inv
    );
    assert_eq!(fwd(-1, 4, 0, false), inv);
    assert_eq!(fwd(2, -4, 0, false), inv);
    assert_eq!(fwd(2, 0, 0, false), inv);
    assert_eq!(fwd(2, 4, 7, false), dt);
    assert_eq!(fwd(2, 4, 0, true), inv);
    assert_eq!(fwd(2, 4, 0, false), 0);
    let mut d = [0.0f32; 8];
    let mut bwd = |d_loss: f32, dtype: i32, null: bool| {
        let p = sys::LkCrossEntropyBackwardParams {
            logits: x.as_ptr().cast(),
            targets: t.as_ptr(),
            lse: s.as_ptr(),
            d_logits: if null {
                std::ptr::null_mut()
            } else {
                d.as_mut_ptr().cast()
            },
            rows: 2,
            vocab: 4,
            d_loss,
            dtype,
        };
        // SAFETY: as above.
        unsafe { sys::lk_emu_loss_cross_entropy_backward(&p, std::ptr::null_mut()) }
    };
    assert_eq!(bwd(f32::NAN, 0, false), inv);
    assert_eq!(bwd(1.0, -1, false), dt);
    assert_eq!(bwd(1.0, 0, true), inv);
    // SAFETY: null params.
    assert_eq!(
        unsafe { sys::lk_emu_loss_cross_entropy_backward(std::ptr::null(), std::ptr::null_mut()) },
        inv
    );
    let mut o = [0i32; 2];
    let mut am = |rows: i32, cols: i32, dtype: i32, null: bool| {
        let p = sys::LkArgmaxRowsParams {
            x: x.as_ptr().cast(),
            out: if null {
                std::ptr::null_mut()
            } else {
                o.as_mut_ptr()
            },
            rows,
            cols,
            dtype,
        };
        // SAFETY: as above.
        unsafe { sys::lk_emu_loss_argmax_rows(&p, std::ptr::null_mut()) }
    };
    assert_eq!(am(-2, 4, 0, false), inv);
    assert_eq!(am(2, 0, 0, false), inv);
    assert_eq!(am(2, 4, 3, false), dt);
    assert_eq!(am(2, 4, 0, true), inv);
    assert_eq!(am(0, 0, 0, true), 0);
    // SAFETY: null params.
    assert_eq!(
        unsafe { sys::lk_emu_loss_argmax_rows(std::ptr::null(), std::ptr::null_mut()) },
        inv
    );
}
