//! GPU trials: norm (RMSNorm). Tolerances as tests/norm.rs (derived there); the backward is given
//! the cpu reference's rstd so both sides use the same saved value.

#![allow(clippy::needless_range_loop)]

use crate::common::{random_vec, rng, POISON};
use crate::GpuTest;
use libtest_mimic::Failed;
use lora_kernels::norm::{
    reference, rmsnorm_backward, rmsnorm_backward_workspace_bytes, rmsnorm_forward, RmsNorm,
};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, DType, Error, Float};

pub const TESTS: &[(&str, GpuTest)] = &[
    ("rmsnorm_f32_matches_cpu", matches_cpu::<f32>),
    ("rmsnorm_f16_matches_cpu", matches_cpu::<f16>),
    ("rmsnorm_bf16_matches_cpu", matches_cpu::<bf16>),
    ("rmsnorm_deterministic", deterministic),
    ("rmsnorm_rejects_bad_input", rejects_bad_input),
];

const U: f64 = 5.960464477539063e-8;

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
        DType::F32 => U,
        DType::F16 => f64::powi(2.0, -11),
        DType::BF16 => f64::powi(2.0, -8),
        DType::F64 => f64::powi(2.0, -53),
    }
}

type Outs<T> = (Vec<T>, Vec<f32>, Vec<T>, Vec<T>);

fn run<B: Backend, T: Float>(
    b: &B,
    s: &RmsNorm,
    x: &[T],
    w: &[T],
    dy: &[T],
    rstd_in: &[f32],
) -> Result<Outs<T>, Failed> {
    let n = s.rows * s.dim;
    let p = T::from_f32(POISON);
    let (xb, wb, dyb) = (
        b.upload(x).map_err(err)?,
        b.upload(w).map_err(err)?,
        b.upload(dy).map_err(err)?,
    );
    let mut yb = b.upload(&vec![p; n]).map_err(err)?;
    let mut rb = b.upload(&vec![POISON; s.rows]).map_err(err)?;
    rmsnorm_forward(b, s, &xb, &wb, &mut yb, &mut rb).map_err(err)?;
    let rin = b.upload(rstd_in).map_err(err)?;
    let mut dxb = b.upload(&vec![p; n]).map_err(err)?;
    let mut dwb = b.upload(&vec![p; s.dim]).map_err(err)?;
    let mut ws = b
        .alloc::<u8>(rmsnorm_backward_workspace_bytes(b, s))
        .map_err(err)?;
    rmsnorm_backward(b, s, &xb, &wb, &rin, &dyb, &mut dxb, &mut dwb, &mut ws).map_err(err)?;
    Ok((
        b.download(&yb).map_err(err)?,
        b.download(&rb).map_err(err)?,
        b.download(&dxb).map_err(err)?,
        b.download(&dwb).map_err(err)?,
    ))
}

fn case<T: Float>(dev: &Cuda, s: RmsNorm, seed: u64) -> Result<(), Failed> {
    let mut r = rng(seed);
    let (n, d) = (s.rows * s.dim, s.dim);
    let x: Vec<T> = random_vec(&mut r, n);
    let w: Vec<T> = random_vec(&mut r, d);
    let dy: Vec<T> = random_vec(&mut r, n);
    let mut rstd = vec![0f32; s.rows];
    let mut y0 = vec![T::from_f32(0.0); n];
    reference::rmsnorm_forward(&s, &x, &w, &mut y0, &mut rstd);
    let (gy, gr, gdx, gdw) = run(dev, &s, &x, &w, &dy, &rstd)?;
    let (cy, _, cdx, cdw) = run(&Cpu, &s, &x, &w, &dy, &rstd)?;
    let ut = unit::<T>();
    let nt = (d / 32 + 8) as f64;
    let r_rel = ((nt + 15.0) / 2.0 + 4.0) * U;
    for row in 0..s.rows {
        let rs = rstd[row] as f64;
        check((gr[row] as f64 - rs).abs() <= 1.01 * r_rel * rs, || {
            format!("{s:?} rstd[{row}]: {} vs {rs}", gr[row])
        })?;
        let sdot: f64 = (0..d)
            .map(|j| (dy[row * d + j].to_f64() * w[j].to_f64() * x[row * d + j].to_f64()).abs())
            .sum();
        for j in 0..d {
            let k = row * d + j;
            let (xv, wv, dv) = (x[k].to_f64(), w[j].to_f64(), dy[k].to_f64());
            let (a, b) = (gy[k].to_f64(), cy[k].to_f64());
            let tol = 1.01 * ((xv * rs * wv).abs() * (r_rel + 2.0 * U) + ut * (a.abs() + b.abs()))
                + 1e-40;
            check((a - b).abs() <= tol, || {
                format!("{} {s:?} y[{row},{j}]: cuda {a} cpu {b}", T::DTYPE)
            })?;
            let (a, b) = (gdx[k].to_f64(), cdx[k].to_f64());
            let mag = (rs * wv * dv).abs() + rs * rs * rs / d as f64 * xv.abs() * sdot;
            let tol = 1.01 * (mag * (nt + 24.0) * U + ut * (a.abs() + b.abs())) + 1e-40;
            check((a - b).abs() <= tol, || {
                format!("{} {s:?} dx[{row},{j}]: cuda {a} cpu {b}", T::DTYPE)
            })?;
        }
    }
    for j in 0..d {
        let sabs: f64 = (0..s.rows)
            .map(|row| {
                (dy[row * d + j].to_f64() * x[row * d + j].to_f64() * rstd[row] as f64).abs()
            })
            .sum();
        let (a, b) = (gdw[j].to_f64(), cdw[j].to_f64());
        let tol = 1.01 * ((s.rows as f64 + 3.0) * U * sabs + ut * (a.abs() + b.abs())) + 1e-40;
        check((a - b).abs() <= tol, || {
            format!("{} {s:?} dw[{j}]: cuda {a} cpu {b}", T::DTYPE)
        })?;
    }
    Ok(())
}

fn matches_cpu<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    for (i, &(rows, dim)) in [
        (1, 1),
        (3, 17),
        (17, 127),
        (127, 1024),
        (33, 1025),
        (1031, 4096),
        (5, 16_390),
        (3, 20_000),
    ]
    .iter()
    .enumerate()
    {
        case::<T>(dev, RmsNorm::new(rows, dim, 1e-5), 70 + i as u64)?;
    }
    Ok(())
}

fn deterministic(dev: &Cuda) -> Result<(), Failed> {
    let s = RmsNorm::new(8192, 4096, 1e-5);
    let mut r = rng(3);
    let x: Vec<bf16> = random_vec(&mut r, s.rows * s.dim);
    let w: Vec<bf16> = random_vec(&mut r, s.dim);
    let dy: Vec<bf16> = random_vec(&mut r, s.rows * s.dim);
    let rstd = vec![1.5f32; s.rows];
    let first = run(dev, &s, &x, &w, &dy, &rstd)?;
    for _ in 0..2 {
        let again = run(dev, &s, &x, &w, &dy, &rstd)?;
        check(again == first, || "run-to-run difference".into())?;
    }
    Ok(())
}

fn rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let s = RmsNorm::new(3, 4, 1e-5);
    let x = dev.upload(&[1.0f32; 12]).map_err(err)?;
    let w = dev.upload(&[1.0f32; 3]).map_err(err)?;
    let mut y = dev.upload(&[POISON; 12]).map_err(err)?;
    let mut r = dev.upload(&[POISON; 3]).map_err(err)?;
    let e = rmsnorm_forward(dev, &s, &x, &w, &mut y, &mut r);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "w", .. })),
        || format!("{e:?}"),
    )?;
    let e = rmsnorm_forward(dev, &RmsNorm::new(3, 4, f32::NAN), &x, &x, &mut y, &mut r);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "eps", .. })),
        || format!("{e:?}"),
    )?;
    let mut dw = dev.upload(&[POISON; 4]).map_err(err)?;
    let mut dx = dev.upload(&[POISON; 12]).map_err(err)?;
    let need = rmsnorm_backward_workspace_bytes(dev, &s);
    let mut ws = dev.alloc::<u8>(need.saturating_sub(1)).map_err(err)?;
    let e = rmsnorm_backward(dev, &s, &x, &x, &r, &x, &mut dx, &mut dw, &mut ws);
    check(
        matches!(
            e,
            Err(Error::InvalidArgument {
                arg: "workspace",
                ..
            })
        ),
        || format!("{e:?}"),
    )?;
    for v in [&y, &dx] {
        let after = dev.download(v).map_err(err)?;
        check(
            after.iter().all(|v| v.to_bits() == POISON.to_bits()),
            || "output changed on error".into(),
        )?;
    }
    Ok(())
}
