//! GPU trials: loss (cross-entropy forward/backward, argmax_rows) against the cpu reference, on
//! odd and Llama-sized vocabularies; argmax bit-exact against cpu and emu; run-to-run determinism;
//! bad input.
//!
//! Tolerances as tests/loss.rs (derived there): lse within (2·per_thread + 4·levels + 8)·2⁻²⁴ +
//! 4·2⁻²⁴·|lse| (CUDA's expf ≤ 2 ulp, logf ≤ 1 ulp); backward within d_loss·((|x − lse| + 4)·2⁻²⁴·p +
//! 2·2⁻²⁴·|p − onehot|) + 1 ulp of T.

use crate::common::*;
use crate::{check, err, GpuTest};
use libtest_mimic::Failed;
use lora_kernels::adapter::fault;
use lora_kernels::loss::{argmax_rows, cross_entropy_backward, cross_entropy_forward, reference};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, DType, Emu, Error, Float};
use rand::Rng;

pub const TESTS: &[(&str, GpuTest)] = &[
    ("loss_cross_entropy_f32_matches_cpu", ce_matches_cpu::<f32>),
    ("loss_cross_entropy_f16_matches_cpu", ce_matches_cpu::<f16>),
    (
        "loss_cross_entropy_bf16_matches_cpu",
        ce_matches_cpu::<bf16>,
    ),
    ("loss_argmax_bit_exact_cpu_emu", argmax_bit_exact),
    ("loss_deterministic", deterministic),
    ("loss_rejects_bad_input", rejects_bad_input),
];

const U: f64 = 1.0 / 16_777_216.0;

fn group(vocab: usize) -> (usize, usize) {
    if vocab <= 1024 {
        (32, 5)
    } else {
        (512, 10)
    }
}

fn lse_tol<T: Float>(vocab: usize, lse: f64) -> f64 {
    let v = 16 / T::DTYPE.size_bytes();
    let (g, levels) = group(vocab);
    let per_thread = vocab.div_ceil(v * g) * v;
    (2 * per_thread + 4 * levels + 8) as f64 * U + 4.0 * U * lse.abs()
}

fn inputs<T: Float>(seed: u64, rows: usize, vocab: usize) -> (Vec<T>, Vec<i32>) {
    let mut r = rng(seed);
    let x = random_vec::<f64>(&mut r, rows * vocab)
        .iter()
        .map(|v| T::from_f64(4.0 * v))
        .collect();
    let t = (0..rows)
        .map(|i| match i % 7 {
            1 => -1,
            4 => vocab as i32 + i as i32,
            _ => r.random_range(0..vocab as i32),
        })
        .collect();
    (x, t)
}

struct Fwd {
    losses: Vec<f32>,
    lse: Vec<f32>,
    fault: u32,
}

fn forward<B: Backend, T: Float>(
    b: &B,
    rows: usize,
    vocab: usize,
    x: &[T],
    t: &[i32],
) -> Result<Fwd, Failed> {
    let xb = b.upload(x).map_err(err)?;
    let tb = b.upload(t).map_err(err)?;
    let mut l = b.upload(&vec![POISON; rows + 1]).map_err(err)?;
    let mut s = b.upload(&vec![POISON; rows + 1]).map_err(err)?;
    let mut f = b.upload(&[0u32]).map_err(err)?;
    cross_entropy_forward(b, rows, vocab, &xb, &tb, &mut l, &mut s, &mut f).map_err(err)?;
    Ok(Fwd {
        losses: b.download(&l).map_err(err)?,
        lse: b.download(&s).map_err(err)?,
        fault: b.download(&f).map_err(err)?[0],
    })
}

#[allow(clippy::too_many_arguments)]
fn backward<B: Backend, T: Float>(
    b: &B,
    rows: usize,
    vocab: usize,
    x: &[T],
    t: &[i32],
    lse: &[f32],
    d_loss: f32,
) -> Result<Vec<T>, Failed> {
    let xb = b.upload(x).map_err(err)?;
    let tb = b.upload(t).map_err(err)?;
    let sb = b.upload(lse).map_err(err)?;
    let mut d = b
        .upload(&vec![T::from_f32(POISON); rows * vocab + 1])
        .map_err(err)?;
    cross_entropy_backward(b, rows, vocab, &xb, &tb, &sb, d_loss, &mut d).map_err(err)?;
    b.download(&d).map_err(err)
}

fn ce_matches_cpu<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    let ulp_t = match T::DTYPE {
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        _ => 2f64.powi(-23),
    };
    for (i, &(rows, vocab)) in [
        (1usize, 1usize),
        (5, 3),
        (17, 17),
        (9, 127),
        (33, 1024),
        (7, 1025),
        (7, 4097),
        (64, 32000),
        (8, 128_256),
    ]
    .iter()
    .enumerate()
    {
        let (x, t) = inputs::<T>(200 + i as u64, rows, vocab);
        let g = forward(dev, rows, vocab, &x, &t)?;
        let c = forward(&Cpu, rows, vocab, &x, &t)?;
        check(g.fault == c.fault, || {
            format!("fault {} vs cpu {}", g.fault, c.fault)
        })?;
        check(
            g.losses[rows].to_bits() == POISON.to_bits()
                && g.lse[rows].to_bits() == POISON.to_bits(),
            || "wrote past rows".into(),
        )?;
        for r in 0..rows {
            let exact = reference::row_lse(&x[r * vocab..(r + 1) * vocab]);
            let tol = lse_tol::<T>(vocab, exact);
            check((g.lse[r] as f64 - c.lse[r] as f64).abs() <= tol, || {
                format!(
                    "lse[{r}] cuda {} cpu {} tol {tol:e} (vocab {vocab})",
                    g.lse[r], c.lse[r]
                )
            })?;
            let ltol = if reference::target_valid(t[r], vocab) {
                tol + 2.0 * U * (exact.abs() + x[r * vocab + t[r] as usize].to_f64().abs())
            } else {
                0.0
            };
            check(
                (g.losses[r] as f64 - c.losses[r] as f64).abs() <= ltol,
                || {
                    format!(
                        "loss[{r}] cuda {} cpu {} tol {ltol:e}",
                        g.losses[r], c.losses[r]
                    )
                },
            )?;
        }
        let lse = &c.lse[..rows];
        let d_loss = 1.0 / rows as f32;
        let gd = backward(dev, rows, vocab, &x, &t, lse, d_loss)?;
        let cd = backward(&Cpu, rows, vocab, &x, &t, lse, d_loss)?;
        check(gd[rows * vocab].to_f64().is_nan(), || {
            "d_logits written past the end".into()
        })?;
        for r in 0..rows {
            for col in 0..vocab {
                let k = r * vocab + col;
                let (e, w) = (gd[k].to_f64(), cd[k].to_f64());
                if !reference::target_valid(t[r], vocab) {
                    check(e.to_bits() == 0, || format!("skipped row {r} not zero"))?;
                    continue;
                }
                let diff = (x[k].to_f64() - lse[r] as f64).abs();
                let prob = (x[k].to_f64() - lse[r] as f64).exp();
                let onehot = if col == t[r] as usize { 1.0 } else { 0.0 };
                let tol = d_loss as f64
                    * ((diff + 4.0) * U * prob + 2.0 * U * (prob - onehot).abs())
                    + ulp_t * w.abs()
                    + 2f64.powi(-24);
                check((e - w).abs() <= tol, || {
                    format!("d_logits[{r},{col}] cuda {e} cpu {w} tol {tol:e} (vocab {vocab})")
                })?;
            }
        }
    }
    Ok(())
}

fn argmax_on<B: Backend, T: Float>(
    b: &B,
    rows: usize,
    cols: usize,
    x: &[T],
) -> Result<Vec<i32>, Failed> {
    let xb = b.upload(x).map_err(err)?;
    let mut o = b.upload(&vec![-3i32; rows + 1]).map_err(err)?;
    argmax_rows(b, rows, cols, &xb, &mut o).map_err(err)?;
    b.download(&o).map_err(err)
}

/// Ties, NaN, ±inf and ±0 planted; integers must agree exactly on all three backends.
fn argmax_bit_exact(dev: &Cuda) -> Result<(), Failed> {
    for (i, &(rows, cols)) in [
        (9usize, 1usize),
        (9, 3),
        (9, 17),
        (9, 127),
        (8, 1025),
        (8, 4097),
        (16, 32000),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(300 + i as u64);
        let mut x: Vec<bf16> = (0..rows * cols)
            .map(|_| bf16::from_f64(r.random_range(-8..8) as f64 / 4.0))
            .collect();
        for row in 0..rows {
            let at = row * cols + r.random_range(0..cols);
            x[at] = match row % 4 {
                1 => bf16::from_f64(f64::NAN),
                2 => bf16::from_f64(f64::INFINITY),
                3 => bf16::from_f64(-0.0),
                _ => x[at],
            };
        }
        let g = argmax_on(dev, rows, cols, &x)?;
        let c = argmax_on(&Cpu, rows, cols, &x)?;
        let e = argmax_on(&Emu, rows, cols, &x)?;
        check(g == c && g == e, || {
            format!("argmax {rows}x{cols}: cuda {g:?} cpu {c:?} emu {e:?}")
        })?;
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        check(argmax_on(dev, rows, cols, &xf)? == c, || {
            "f32 argmax differs".into()
        })?;
    }
    Ok(())
}

fn deterministic(dev: &Cuda) -> Result<(), Failed> {
    let (rows, vocab) = (1024, 32000);
    let (x, t) = inputs::<bf16>(7, rows, vocab);
    let first = forward(dev, rows, vocab, &x, &t)?;
    let d_first = backward(dev, rows, vocab, &x, &t, &first.lse[..rows], 1e-3)?;
    check(first.fault == fault::INDEX, || "fault not reported".into())?;
    for _ in 0..3 {
        let again = forward(dev, rows, vocab, &x, &t)?;
        check(
            again
                .lse
                .iter()
                .map(|v| v.to_bits())
                .eq(first.lse.iter().map(|v| v.to_bits()))
                && again
                    .losses
                    .iter()
                    .map(|v| v.to_bits())
                    .eq(first.losses.iter().map(|v| v.to_bits())),
            || "forward differs run to run".into(),
        )?;
        let d = backward(dev, rows, vocab, &x, &t, &first.lse[..rows], 1e-3)?;
        check(
            d.iter()
                .map(|v| v.to_bits())
                .eq(d_first.iter().map(|v| v.to_bits())),
            || "backward differs run to run".into(),
        )?;
    }
    // Batch invariance: a row alone gives the same bits as inside the batch.
    for r in [0usize, 513, 1023] {
        let one = forward(dev, 1, vocab, &x[r * vocab..(r + 1) * vocab], &t[r..r + 1])?;
        check(one.lse[0].to_bits() == first.lse[r].to_bits(), || {
            format!("row {r}: alone {} vs batch {}", one.lse[0], first.lse[r])
        })?;
    }
    Ok(())
}

fn rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let x = dev.upload(&[0.5f32; 15]).map_err(err)?;
    let t = dev.upload(&[0i32; 3]).map_err(err)?;
    let mut l = dev.upload(&[POISON; 3]).map_err(err)?;
    let mut s = dev.upload(&[POISON; 3]).map_err(err)?;
    let mut f = dev.upload(&[0u32]).map_err(err)?;
    let e = cross_entropy_forward(dev, 3, 6, &x, &t, &mut l, &mut s, &mut f);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "logits", .. })),
        || format!("expected `logits`, got {e:?}"),
    )?;
    let e = cross_entropy_forward(dev, 3, 0, &x, &t, &mut l, &mut s, &mut f);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "vocab", .. })),
        || format!("expected `vocab`, got {e:?}"),
    )?;
    let mut d = dev.upload(&[POISON; 15]).map_err(err)?;
    let e = cross_entropy_backward(dev, 3, 5, &x, &t, &s, f32::NAN, &mut d);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "d_loss", .. })),
        || format!("expected `d_loss`, got {e:?}"),
    )?;
    let mut o = dev.upload(&[7i32; 2]).map_err(err)?;
    let e = argmax_rows(dev, 3, 5, &x, &mut o);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "out", .. })),
        || format!("expected `out`, got {e:?}"),
    )?;
    let untouched = dev
        .download(&l)
        .map_err(err)?
        .iter()
        .all(|v| v.to_bits() == POISON.to_bits())
        && dev
            .download(&d)
            .map_err(err)?
            .iter()
            .all(|v| v.to_bits() == POISON.to_bits())
        && dev.download(&o).map_err(err)? == vec![7, 7];
    check(untouched, || "an output changed on error".into())?;
    let x16 = dev.upload(&[f16::from_f32(1.0); 4]).map_err(err)?;
    let mut o = dev.upload(&[0i32; 1]).map_err(err)?;
    argmax_rows(dev, 1, 4, &x16, &mut o).map_err(err)?;
    check(dev.download(&o).map_err(err)? == vec![0], || {
        "f16 argmax".into()
    })
}
