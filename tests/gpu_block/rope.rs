//! GPU trials: rope. Tolerance as tests/rope.rs: 8·2⁻²⁴·(|a| + |b|) + both roundings to T; rows of
//! negative positions untouched bit for bit and the fault word set.

#![allow(clippy::needless_range_loop)]

use crate::common::{random_vec, rng, POISON};
use crate::GpuTest;
use libtest_mimic::Failed;
use lora_kernels::adapter::fault;
use lora_kernels::rope::{rope_backward, rope_forward, Rope};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, DType, Error, Float};
use rand::Rng;

pub const TESTS: &[(&str, GpuTest)] = &[
    ("rope_f32_matches_cpu", matches_cpu::<f32>),
    ("rope_f16_matches_cpu", matches_cpu::<f16>),
    ("rope_bf16_matches_cpu", matches_cpu::<bf16>),
    ("rope_deterministic", deterministic),
    ("rope_rejects_bad_input", rejects_bad_input),
];

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg().into())
    }
}

fn err(e: Error) -> Failed {
    e.to_string().into()
}

fn unit<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => f64::powi(2.0, -24),
        DType::F16 => f64::powi(2.0, -11),
        DType::BF16 => f64::powi(2.0, -8),
        DType::F64 => f64::powi(2.0, -53),
    }
}

fn run<B: Backend, T: Float>(
    b: &B,
    s: &Rope,
    bwd: bool,
    pos: &[i32],
    x: &[T],
) -> Result<(Vec<T>, u32), Failed> {
    let pb = b.upload(pos).map_err(err)?;
    let mut xb = b.upload(x).map_err(err)?;
    let mut fb = b.upload(&[0u32]).map_err(err)?;
    if bwd {
        rope_backward(b, s, &pb, &mut xb, &mut fb).map_err(err)?;
    } else {
        rope_forward(b, s, &pb, &mut xb, &mut fb).map_err(err)?;
    }
    Ok((
        b.download(&xb).map_err(err)?,
        b.download(&fb).map_err(err)?[0],
    ))
}

fn positions(seed: u64, tokens: usize) -> Vec<i32> {
    let mut r = rng(seed);
    (0..tokens)
        .map(|t| match r.random_range(0..10) {
            0 => -1,
            1 => i32::MAX - r.random_range(0..3),
            2 => t as i32,
            _ => r.random_range(0..200_000),
        })
        .collect()
}

fn matches_cpu<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    for (i, &(tokens, n_heads, hd, theta)) in [
        (1, 1, 2, 10_000.0f32),
        (3, 3, 6, 10_000.0),
        (17, 5, 64, 500_000.0),
        (127, 32, 128, 500_000.0),
        (1031, 8, 128, 10_000.0),
    ]
    .iter()
    .enumerate()
    {
        let s = Rope::new(tokens, n_heads, hd, theta);
        let pos = positions(i as u64, tokens);
        let x: Vec<T> = random_vec(&mut rng(50 + i as u64), tokens * s.width());
        for bwd in [false, true] {
            let (got, fg) = run(dev, &s, bwd, &pos, &x)?;
            let (want, fw) = run(&Cpu, &s, bwd, &pos, &x)?;
            check(
                fg == fw && fg == fault::INDEX * pos.iter().any(|&p| p < 0) as u32,
                || format!("fault words cuda {fg} cpu {fw}"),
            )?;
            let (w, half) = (s.width(), hd / 2);
            for t in 0..tokens {
                for h in 0..n_heads {
                    for k in 0..half {
                        let (j1, j2) = (t * w + h * hd + k, t * w + h * hd + k + half);
                        let mag = x[j1].to_f64().abs() + x[j2].to_f64().abs();
                        for j in [j1, j2] {
                            let (a, b) = (got[j].to_f64(), want[j].to_f64());
                            if pos[t] < 0 {
                                check(a.to_bits() == x[j].to_f64().to_bits(), || {
                                    format!("skipped row {t} written")
                                })?;
                                continue;
                            }
                            let tol = 8.0 * f64::powi(2.0, -24) * mag
                                + 1.01 * unit::<T>() * (a.abs() + b.abs())
                                + 1e-40;
                            check((a - b).abs() <= tol, || {
                                format!(
                                    "{} {s:?} bwd {bwd} [{t},{j}] pos {}: cuda {a} cpu {b}",
                                    T::DTYPE,
                                    pos[t]
                                )
                            })?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn deterministic(dev: &Cuda) -> Result<(), Failed> {
    let s = Rope::new(8192, 32, 128, 500_000.0);
    let pos = positions(9, s.tokens);
    let x: Vec<bf16> = random_vec(&mut rng(9), s.tokens * s.width());
    let first = run(dev, &s, false, &pos, &x)?;
    for _ in 0..2 {
        let again = run(dev, &s, false, &pos, &x)?;
        check(again.0 == first.0 && again.1 == first.1, || {
            "run-to-run difference".into()
        })?;
    }
    Ok(())
}

fn rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let pos = dev.upload(&[0i32, 1]).map_err(err)?;
    let mut x = dev.upload(&[POISON; 16]).map_err(err)?;
    let mut f = dev.upload(&[0u32]).map_err(err)?;
    let e = rope_forward(dev, &Rope::new(2, 2, 3, 1e4), &pos, &mut x, &mut f);
    check(
        matches!(
            e,
            Err(Error::InvalidArgument {
                arg: "head_dim",
                ..
            })
        ),
        || format!("{e:?}"),
    )?;
    let e = rope_backward(dev, &Rope::new(2, 2, 4, -1.0), &pos, &mut x, &mut f);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "theta", .. })),
        || format!("{e:?}"),
    )?;
    let e = rope_forward(dev, &Rope::new(3, 2, 4, 1e4), &pos, &mut x, &mut f);
    check(
        matches!(
            e,
            Err(Error::InvalidArgument {
                arg: "positions",
                ..
            })
        ),
        || format!("{e:?}"),
    )?;
    let after = dev.download(&x).map_err(err)?;
    check(
        after.iter().all(|v| v.to_bits() == POISON.to_bits()),
        || "x changed on error".into(),
    )
}
