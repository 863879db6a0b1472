//! GPU trials: optim. AdamW and sum_squares use the same f32 operation sequence on emu and cuda
//! (explicit fmaf, IEEE `/` and sqrtf, fixed reduction order), so cuda must equal emu bit for bit;
//! against the cpu reference the tolerances of tests/optim.rs apply (checked there on emu, so
//! bit-equality with emu implies them).

use crate::common::*;
use crate::{check, err, GpuTest};
use libtest_mimic::Failed;
use lora_kernels::optim::{adamw_step, reference, sum_squares, sum_squares_workspace_bytes, AdamW};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, Emu, Error, Float};

pub const TESTS: &[(&str, GpuTest)] = &[
    ("optim_adamw_f32_bit_identical_to_emu", adamw_vs_emu::<f32>),
    ("optim_adamw_f16_bit_identical_to_emu", adamw_vs_emu::<f16>),
    (
        "optim_adamw_bf16_bit_identical_to_emu",
        adamw_vs_emu::<bf16>,
    ),
    ("optim_adamw_near_cpu_reference", adamw_near_cpu),
    ("optim_sum_squares_bit_identical_to_emu", sum_squares_vs_emu),
    ("optim_sum_squares_deterministic_large", sum_squares_large),
    ("optim_rejects_bad_input", rejects_bad_input),
];

fn cfg() -> AdamW {
    AdamW {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

type State<T> = (Vec<T>, Vec<f32>, Vec<f32>);

/// `steps` AdamW steps on `b` from a fixed state with fresh gradients each step.
fn run_adamw<B: Backend, T: Float>(
    b: &B,
    n: usize,
    steps: u32,
    seed: u64,
) -> Result<State<T>, Failed> {
    let mut r = rng(seed);
    let mut p = b.upload(&random_vec::<T>(&mut r, n)).map_err(err)?;
    let mut m = b.alloc::<f32>(n).map_err(err)?;
    let mut v = b.alloc::<f32>(n).map_err(err)?;
    for step in 1..=steps {
        let g = b.upload(&random_vec::<T>(&mut r, n)).map_err(err)?;
        adamw_step(b, &cfg(), step, &mut p, &g, &mut m, &mut v).map_err(err)?;
    }
    Ok((
        b.download(&p).map_err(err)?,
        b.download(&m).map_err(err)?,
        b.download(&v).map_err(err)?,
    ))
}

fn bits_eq<T: Float>(a: &[T], b: &[T]) -> bool {
    a.iter()
        .map(|x| x.to_f64().to_bits())
        .eq(b.iter().map(|x| x.to_f64().to_bits()))
}

fn adamw_vs_emu<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    for (i, &n) in [1usize, 3, 17, 127, 4097, 1_000_003].iter().enumerate() {
        let g = run_adamw::<_, T>(dev, n, 3, 40 + i as u64)?;
        let e = run_adamw::<_, T>(&Emu, n, 3, 40 + i as u64)?;
        check(
            bits_eq(&g.0, &e.0) && bits_eq(&g.1, &e.1) && bits_eq(&g.2, &e.2),
            || format!("n {n}: cuda and emu differ ({})", T::DTYPE),
        )?;
    }
    Ok(())
}

/// A loose sanity bound against the f64 reference (the tight one is checked on emu): after 3
/// steps every parameter within 1e-6 + 2 ulp of f32.
fn adamw_near_cpu(dev: &Cuda) -> Result<(), Failed> {
    let n = 100_003;
    let g = run_adamw::<_, f32>(dev, n, 3, 1)?;
    let c = run_adamw::<_, f32>(&Cpu, n, 3, 1)?;
    for i in 0..n {
        let tol = 1e-6 + 2.0 * f32::EPSILON as f64 * (c.0[i] as f64).abs();
        check((g.0[i] as f64 - c.0[i] as f64).abs() <= tol, || {
            format!("p[{i}] cuda {} cpu {}", g.0[i], c.0[i])
        })?;
    }
    Ok(())
}

fn sum_on<B: Backend, T: Float>(b: &B, x: &[T]) -> Result<f32, Failed> {
    let xb = b.upload(x).map_err(err)?;
    let mut ws = b
        .alloc::<u8>(sum_squares_workspace_bytes(b, x.len()).max(1))
        .map_err(err)?;
    let mut out = b.upload(&[POISON]).map_err(err)?;
    sum_squares(b, &xb, &mut out, &mut ws).map_err(err)?;
    Ok(b.download(&out).map_err(err)?[0])
}

fn sum_squares_vs_emu(dev: &Cuda) -> Result<(), Failed> {
    for (i, &n) in [0usize, 1, 3, 17, 127, 4097, 300_007, 3_000_001]
        .iter()
        .enumerate()
    {
        let mut r = rng(60 + i as u64);
        let x: Vec<f32> = random_vec(&mut r, n);
        let xb: Vec<bf16> = random_vec(&mut r, n);
        for (g, e, what) in [
            (sum_on(dev, &x)?, sum_on(&Emu, &x)?, "f32"),
            (sum_on(dev, &xb)?, sum_on(&Emu, &xb)?, "bf16"),
        ] {
            check(g.to_bits() == e.to_bits(), || {
                format!("n {n} {what}: cuda {g} emu {e}")
            })?;
        }
        let exact = reference::sum_squares(&x);
        let g = sum_on(dev, &x)?;
        check((g as f64 - exact).abs() <= 1e-5 * exact + 1e-30, || {
            format!("n {n}: cuda {g} exact {exact}")
        })?;
    }
    Ok(())
}

/// 64M f32 elements (the 1024-block cap): run to run identical, near the f64 sum.
fn sum_squares_large(dev: &Cuda) -> Result<(), Failed> {
    let n = 64 << 20;
    let mut r = rng(70);
    let x: Vec<f32> = random_vec(&mut r, n);
    let first = sum_on(dev, &x)?;
    for _ in 0..3 {
        let again = sum_on(dev, &x)?;
        check(again.to_bits() == first.to_bits(), || {
            format!("run to run: {again} vs {first}")
        })?;
    }
    let exact = reference::sum_squares(&x);
    check((first as f64 - exact).abs() <= 1e-5 * exact, || {
        format!("cuda {first} exact {exact}")
    })
}

fn rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let mut p = dev.upload(&[POISON; 8]).map_err(err)?;
    let g = dev.upload(&[1.0f32; 8]).map_err(err)?;
    let mut m = dev.upload(&[POISON; 8]).map_err(err)?;
    let mut v = dev.upload(&[POISON; 7]).map_err(err)?;
    let e = adamw_step(dev, &cfg(), 1, &mut p, &g, &mut m, &mut v);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "v", .. })),
        || format!("expected `v`, got {e:?}"),
    )?;
    let mut v = dev.upload(&[POISON; 8]).map_err(err)?;
    let e = adamw_step(dev, &cfg(), 0, &mut p, &g, &mut m, &mut v);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "step", .. })),
        || format!("expected `step`, got {e:?}"),
    )?;
    let untouched = [&p, &m, &v].iter().all(|b| {
        dev.download(b)
            .map(|h| h.iter().all(|x| x.to_bits() == POISON.to_bits()))
            .unwrap_or(false)
    });
    check(untouched, || "an output changed on error".into())?;
    let x = dev.upload(&vec![1.0f32; 1 << 20]).map_err(err)?;
    let need = sum_squares_workspace_bytes(dev, 1 << 20);
    let mut ws = dev.alloc::<u8>(need - 1).map_err(err)?;
    let mut out = dev.upload(&[POISON]).map_err(err)?;
    let e = sum_squares(dev, &x, &mut out, &mut ws);
    check(
        matches!(
            e,
            Err(Error::InvalidArgument {
                arg: "workspace",
                ..
            })
        ),
        || format!("expected `workspace`, got {e:?}"),
    )
}
