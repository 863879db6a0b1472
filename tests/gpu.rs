//! GPU tests: one binary with a custom harness (libtest-mimic), so that on a machine without a GPU
//! every test is reported as *ignored, "no CUDA device"* at run time — never as passed — and on a
//! machine with one, plain `cargo test --features cuda` runs them all.

mod common;

use common::*;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, Emu, Error, Float};

type GpuTest = fn(&Cuda) -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let probe = Cuda::new(0);
    match &probe {
        Ok(dev) => eprintln!(
            "gpu tests: running on {}",
            dev.device_name().unwrap_or_else(|e| e.to_string())
        ),
        Err(e) => eprintln!("gpu tests: {e}; every GPU test is ignored"),
    }
    let available = probe.is_ok();
    drop(probe);
    let tests: &[(&str, GpuTest)] = &[
        (
            "shrink_dense_f32_matches_cpu",
            shrink_matches_cpu::<f32, f32>,
        ),
        (
            "shrink_dense_f16_matches_cpu",
            shrink_matches_cpu::<f16, f16>,
        ),
        (
            "shrink_dense_bf16_matches_cpu",
            shrink_matches_cpu::<bf16, bf16>,
        ),
        (
            "shrink_dense_f32_x_f16_w_matches_cpu",
            shrink_matches_cpu::<f32, f16>,
        ),
        (
            "shrink_dense_bit_identical_to_emu",
            shrink_bit_identical_to_emu,
        ),
        ("shrink_dense_deterministic", shrink_deterministic),
        ("shrink_dense_rejects_bad_input", shrink_rejects_bad_input),
    ];
    let trials = tests
        .iter()
        .map(|&(name, f)| {
            Trial::ignorable_test(name, move || {
                if !available {
                    return Ok(Completion::ignored_with("no CUDA device"));
                }
                let dev = Cuda::new(0).map_err(|e| Failed::from(e.to_string()))?;
                f(&dev).map(|()| Completion::Completed)
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

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

fn run_shrink<B: Backend, TX: Float, TW: Float>(
    b: &B,
    x: &[TX],
    a: &[TW],
    s: &ShrinkDense,
) -> Result<Vec<f32>, Failed> {
    let xb = b.upload(x).map_err(err)?;
    let ab = b.upload(a).map_err(err)?;
    let mut ub = b.upload(&vec![POISON; s.tokens * s.ld_u]).map_err(err)?;
    shrink_dense(b, &xb, &ab, &mut ub, s).map_err(err)?;
    b.download(&ub).map_err(err)
}

fn shrink_matches_cpu<TX: Float, TW: Float>(dev: &Cuda) -> Result<(), Failed> {
    for (i, &(tokens, d_in, rank)) in [
        (1, 1, 1),
        (3, 17, 5),
        (17, 127, 16),
        (64, 4097, 33),
        (256, 4096, 16),
    ]
    .iter()
    .enumerate()
    {
        let s = ShrinkDense {
            ld_u: rank + 1,
            ..ShrinkDense::new(tokens, d_in, rank)
        };
        let mut r = rng(100 + i as u64);
        let x: Vec<TX> = random_vec(&mut r, tokens * d_in);
        let a: Vec<TW> = random_vec(&mut r, rank * d_in);
        let got = run_shrink(dev, &x, &a, &s)?;
        let want = run_shrink(&Cpu, &x, &a, &s)?;
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            if k % s.ld_u == rank {
                check(g.to_bits() == POISON.to_bits(), || {
                    format!("padding u[{k}] written")
                })?;
                continue;
            }
            let (t, j) = (k / s.ld_u, k % s.ld_u);
            let abs_sum: f64 = (0..d_in)
                .map(|c| (x[t * d_in + c].to_f64() * a[j * d_in + c].to_f64()).abs())
                .sum();
            let tol = dot_tolerance(d_in, 32, 5, abs_sum) + (*w as f64).abs() * f64::powi(2.0, -24);
            check((*g as f64 - *w as f64).abs() <= tol, || {
                format!("u[{t},{j}]: cuda {g}, cpu {w}, tol {tol:e} ({s:?})")
            })?;
        }
    }
    Ok(())
}

/// Same fixed reduction order on both (lane-strided FMA chains + xor butterfly): same bits.
fn shrink_bit_identical_to_emu(dev: &Cuda) -> Result<(), Failed> {
    let s = ShrinkDense::new(7, 1031, 12);
    let mut r = rng(5);
    let x: Vec<bf16> = random_vec(&mut r, 7 * 1031);
    let a: Vec<bf16> = random_vec(&mut r, 12 * 1031);
    let gpu = run_shrink(dev, &x, &a, &s)?;
    let emu = run_shrink(&Emu, &x, &a, &s)?;
    check(
        gpu.iter()
            .map(|v| v.to_bits())
            .eq(emu.iter().map(|v| v.to_bits())),
        || "cuda and emu differ".into(),
    )
}

fn shrink_deterministic(dev: &Cuda) -> Result<(), Failed> {
    let s = ShrinkDense::new(128, 4096, 64);
    let mut r = rng(6);
    let x: Vec<f16> = random_vec(&mut r, 128 * 4096);
    let a: Vec<f16> = random_vec(&mut r, 64 * 4096);
    let first = run_shrink(dev, &x, &a, &s)?;
    for _ in 0..3 {
        check(run_shrink(dev, &x, &a, &s)? == first, || {
            "run-to-run difference".into()
        })?;
    }
    Ok(())
}

fn shrink_rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let x = dev.upload(&[1.0f32; 40]).map_err(err)?;
    let a = dev.upload(&[1.0f32; 29]).map_err(err)?;
    let mut u = dev.upload(&[POISON; 12]).map_err(err)?;
    let e = shrink_dense(dev, &x, &a, &mut u, &ShrinkDense::new(4, 10, 3));
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "a", .. })),
        || format!("expected an error for `a`, got {e:?}"),
    )?;
    let after = dev.download(&u).map_err(err)?;
    check(
        after.iter().all(|v| v.to_bits() == POISON.to_bits()),
        || "output changed on error".into(),
    )
}
