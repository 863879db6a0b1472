//! GPU trials: elementwise (add, add_assign, SwiGLU forward/backward, scale).
//!
//! add/add_assign/scale are exactly rounded on every backend: cuda = cpu bit for bit. SwiGLU: the
//! derived bound of tests/elementwise.rs (8·2⁻²⁴·|g·u| etc. plus both roundings to T).

use crate::common::{random_vec, rng, POISON};
use crate::GpuTest;
use libtest_mimic::Failed;
use lora_kernels::elementwise::{
    add, add_assign, reference::sigmoid_pair, scale, swiglu_backward, swiglu_forward,
};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, DType, Emu, Error, Float};

pub const TESTS: &[(&str, GpuTest)] = &[
    ("elementwise_f32_matches_cpu", matches_cpu::<f32>),
    ("elementwise_f16_matches_cpu", matches_cpu::<f16>),
    ("elementwise_bf16_matches_cpu", matches_cpu::<bf16>),
    ("elementwise_bit_identical_to_emu", bit_identical_to_emu),
    ("elementwise_deterministic", deterministic),
    ("elementwise_rejects_bad_input", rejects_bad_input),
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

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// [add, add_assign, swiglu, d_gate, d_up, scale] on `b`, outputs poisoned first.
fn run_all<B: Backend, T: Float>(
    b: &B,
    x: &[T],
    y: &[T],
    d: &[T],
    alpha: f32,
) -> Result<[Vec<T>; 6], Failed> {
    let n = x.len();
    let p = vec![T::from_f32(POISON); n];
    let (xb, yb, db) = (
        b.upload(x).map_err(err)?,
        b.upload(y).map_err(err)?,
        b.upload(d).map_err(err)?,
    );
    let mut out = b.upload(&p).map_err(err)?;
    add(b, &xb, &yb, &mut out).map_err(err)?;
    let mut acc = b.upload(y).map_err(err)?;
    add_assign(b, &mut acc, &xb).map_err(err)?;
    let mut sw = b.upload(&p).map_err(err)?;
    swiglu_forward(b, &xb, &yb, &mut sw).map_err(err)?;
    let (mut dg, mut du) = (b.upload(&p).map_err(err)?, b.upload(&p).map_err(err)?);
    swiglu_backward(b, &xb, &yb, &db, &mut dg, &mut du).map_err(err)?;
    let mut sc = b.upload(x).map_err(err)?;
    scale(b, &mut sc, alpha).map_err(err)?;
    Ok([
        b.download(&out).map_err(err)?,
        b.download(&acc).map_err(err)?,
        b.download(&sw).map_err(err)?,
        b.download(&dg).map_err(err)?,
        b.download(&du).map_err(err)?,
        b.download(&sc).map_err(err)?,
    ])
}

fn inputs<T: Float>(n: usize, seed: u64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut r = rng(seed);
    let g: Vec<T> = random_vec::<f64>(&mut r, n)
        .iter()
        .enumerate()
        .map(|(i, v)| T::from_f64(if i % 7 == 3 { v * 60.0 } else { v * 6.0 }))
        .collect();
    (g, random_vec(&mut r, n), random_vec(&mut r, n))
}

fn matches_cpu<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    let u = f64::powi(2.0, -24);
    for (i, n) in [1usize, 3, 17, 127, 4097, 1 << 20].into_iter().enumerate() {
        let (x, y, d) = inputs::<T>(n, 10 + i as u64);
        let got = run_all(dev, &x, &y, &d, -0.37)?;
        let want = run_all(&Cpu, &x, &y, &d, -0.37)?;
        for (k, name) in [(0, "add"), (1, "add_assign"), (5, "scale")] {
            check(bits(&got[k]) == bits(&want[k]), || {
                format!("{} {name} n {n}: cuda ≠ cpu", T::DTYPE)
            })?;
        }
        for j in 0..n {
            let (g, uu, dd) = (x[j].to_f64(), y[j].to_f64(), d[j].to_f64());
            let (s, sc) = sigmoid_pair(g);
            for (k, name, e32) in [
                (2, "swiglu", 8.0 * u * (g * uu).abs()),
                (
                    3,
                    "d_gate",
                    12.0 * u * (dd * uu).abs() * s * (1.0 + g.abs() * sc),
                ),
                (4, "d_up", 8.0 * u * (dd * g).abs()),
            ] {
                let (a, b) = (got[k][j].to_f64(), want[k][j].to_f64());
                let tol = 1.01 * (e32 + unit::<T>() * (a.abs() + b.abs())) + 1e-7 * unit::<T>();
                check((a - b).abs() <= tol, || {
                    format!("{} {name}[{j}] n {n}: cuda {a} cpu {b} tol {tol}", T::DTYPE)
                })?;
            }
        }
    }
    Ok(())
}

/// add/add_assign/scale are exactly rounded: the same bits as the emulator too (SwiGLU's expf differs
/// between CUDA and glibc by an ulp, so it is only compared within tolerance above).
fn bit_identical_to_emu(dev: &Cuda) -> Result<(), Failed> {
    let (x, y, d) = inputs::<bf16>(4097, 3);
    let got = run_all(dev, &x, &y, &d, 1.25)?;
    let emu = run_all(&Emu, &x, &y, &d, 1.25)?;
    for k in [0, 1, 5] {
        check(bits(&got[k]) == bits(&emu[k]), || {
            format!("op {k}: cuda ≠ emu")
        })?;
    }
    Ok(())
}

fn deterministic(dev: &Cuda) -> Result<(), Failed> {
    let (x, y, d) = inputs::<f16>(3 << 20, 4);
    let first = run_all(dev, &x, &y, &d, 0.5)?;
    for _ in 0..2 {
        let again = run_all(dev, &x, &y, &d, 0.5)?;
        for k in 0..6 {
            check(bits(&again[k]) == bits(&first[k]), || {
                format!("op {k}: run-to-run difference")
            })?;
        }
    }
    Ok(())
}

fn rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let x = dev.upload(&[1.0f32; 5]).map_err(err)?;
    let short = dev.upload(&[1.0f32; 4]).map_err(err)?;
    let mut out = dev.upload(&[POISON; 5]).map_err(err)?;
    let mut out2 = dev.upload(&[POISON; 5]).map_err(err)?;
    let e = add(dev, &x, &short, &mut out);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "y", .. })),
        || format!("{e:?}"),
    )?;
    let e = swiglu_backward(dev, &x, &x, &short, &mut out, &mut out2);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "d_out", .. })),
        || format!("{e:?}"),
    )?;
    let e = scale(dev, &mut out, f32::NAN);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "alpha", .. })),
        || format!("{e:?}"),
    )?;
    let xd = dev.upload(&[1.0f64; 5]);
    check(xd.is_err() || !dev.supports(DType::F64), || {
        "f64 supported on cuda?".into()
    })?;
    for v in [&out, &out2] {
        let after = dev.download(v).map_err(err)?;
        check(
            after.iter().all(|v| v.to_bits() == POISON.to_bits()),
            || "output changed on error".into(),
        )?;
    }
    Ok(())
}
