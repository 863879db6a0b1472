//! GPU trials: gemm (cuda vs the cpu reference and the emulator).
//!
//! Tolerances as in tests/gemm.rs: the f32 accumulation bound γ_k·Σ|a·b| (scaled by |alpha|), two
//! f32 epilogue roundings, and one rounding to T on each side. Large shapes compare a sample of
//! output elements with an f64 dot product computed here (the full cpu reference of 4096³ would
//! take minutes) and check that every element was written (no POISON / NaN left).

use std::time::Instant;

use crate::common::*;
use crate::{check, err, GpuTest};
use libtest_mimic::Failed;
use lora_kernels::gemm::{gemm, Gemm};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, DType, Emu, Error, Float};

pub const TESTS: &[(&str, GpuTest)] = &[
    ("gemm_f32_odd_sizes_matches_cpu", odd_sizes::<f32>),
    ("gemm_f16_odd_sizes_matches_cpu", odd_sizes::<f16>),
    ("gemm_bf16_odd_sizes_matches_cpu", odd_sizes::<bf16>),
    ("gemm_f16_4096_cube_all_forms_sampled", |d| {
        large_sampled::<f16>(d, 4096, 4096, 4096, &[0, 1, 2, 3])
    }),
    ("gemm_bf16_4096_cube_nt_sampled", |d| {
        large_sampled::<bf16>(d, 4096, 4096, 4096, &[1])
    }),
    ("gemm_f16_llama_shapes_sampled", llama_shapes),
    ("gemm_f32_2048_all_forms_sampled", |d| {
        large_sampled::<f32>(d, 2048, 1031, 2049, &[0, 1, 2, 3])
    }),
    ("gemm_f32_bits_equal_emu", f32_bits_equal_emu),
    ("gemm_f16_close_to_emu", f16_close_to_emu),
    ("gemm_batch_invariant_across_tile_configs", batch_invariant),
    ("gemm_deterministic_run_to_run", deterministic),
    ("gemm_rejects_bad_input", rejects_bad_input),
    ("gemm_f16_throughput_vs_cublas", throughput_vs_cublas),
];

fn forms(m: usize, n: usize, k: usize) -> [Gemm; 4] {
    [
        Gemm::nn(m, n, k),
        Gemm::nt(m, n, k),
        Gemm::tn(m, n, k),
        Gemm::tt(m, n, k),
    ]
}

fn op_a<T: Float>(a: &[T], s: &Gemm, i: usize, p: usize) -> f64 {
    if s.a_trans {
        a[p * s.lda + i].to_f64()
    } else {
        a[i * s.lda + p].to_f64()
    }
}
fn op_b<T: Float>(b: &[T], s: &Gemm, p: usize, j: usize) -> f64 {
    if s.b_trans {
        b[j * s.ldb + p].to_f64()
    } else {
        b[p * s.ldb + j].to_f64()
    }
}

fn unit_roundoff(d: DType) -> f64 {
    match d {
        DType::F32 => f64::powi(2.0, -24),
        DType::F16 => f64::powi(2.0, -11),
        DType::BF16 => f64::powi(2.0, -8),
        DType::F64 => f64::powi(2.0, -53),
    }
}

/// Exact (f64) value of element (i, j) and its tolerance against a T-rounded kernel result.
fn exact_and_tol<T: Float>(
    a: &[T],
    b: &[T],
    s: &Gemm,
    i: usize,
    j: usize,
    c_in: f64,
) -> (f64, f64) {
    let (mut acc, mut abs_sum) = (0.0f64, 0.0f64);
    for p in 0..s.k {
        let t = op_a(a, s, i, p) * op_b(b, s, p, j);
        acc += t;
        abs_sum += t.abs();
    }
    let beta_c = if s.beta == 0.0 {
        0.0
    } else {
        s.beta as f64 * c_in
    };
    let exact = s.alpha as f64 * acc + beta_c;
    let alpha = (s.alpha as f64).abs();
    let f32_part = alpha * dot_tolerance(s.k, 1, 0, abs_sum)
        + 2.0 * f64::powi(2.0, -24) * (alpha * abs_sum + beta_c.abs());
    let tiny = if T::DTYPE == DType::F16 {
        f64::powi(2.0, -24)
    } else {
        f64::powi(2.0, -140)
    };
    let tol = f32_part + unit_roundoff(T::DTYPE) * (2.0 * exact.abs() + f32_part) + tiny;
    (exact, tol)
}

fn run<B: Backend, T: Float>(
    b: &B,
    a: &[T],
    bm: &[T],
    c0: &[T],
    s: &Gemm,
) -> Result<Vec<T>, Failed> {
    let ab = b.upload(a).map_err(err)?;
    let bb = b.upload(bm).map_err(err)?;
    let mut cb = b.upload(c0).map_err(err)?;
    gemm(b, &ab, &bb, &mut cb, s).map_err(err)?;
    b.download(&cb).map_err(err)
}

fn poison<T: Float>() -> T {
    T::from_f32(POISON)
}

/// cuda vs cpu at odd sizes, every form, alpha/beta, padded strides; untouched padding bit-exact.
fn odd_sizes<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    let mut seed = 500;
    let shapes = [
        (1, 1, 1),
        (3, 17, 127),
        (127, 3, 17),
        (17, 127, 3),
        (129, 257, 1000),
        (1, 4097, 515),
        (1000, 33, 65),
        (300, 400, 0),
    ];
    for &(m, n, k) in &shapes {
        for f in forms(m, n, k) {
            for (alpha, beta, pad) in [(1.0f32, 0.0f32, 0usize), (0.5, 1.0, 3), (-2.0, -0.75, 8)] {
                seed += 1;
                let s = Gemm {
                    lda: f.lda + pad,
                    ldb: f.ldb + pad,
                    ldc: f.ldc + pad,
                    ..f
                }
                .alpha(alpha)
                .beta(beta);
                let mut r = rng(seed);
                let a: Vec<T> = random_vec(&mut r, s.a_len().unwrap());
                let b: Vec<T> = random_vec(&mut r, s.b_len().unwrap());
                let mut c0 = vec![poison::<T>(); s.c_len().unwrap() + 2];
                if beta != 0.0 {
                    for i in 0..m {
                        for j in 0..n {
                            c0[i * s.ldc + j] =
                                T::from_f64(rand::Rng::random_range(&mut r, -1.0..1.0));
                        }
                    }
                }
                let got = run(dev, &a, &b, &c0, &s)?;
                let want = run(&Cpu, &a, &b, &c0, &s)?;
                for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                    let (i, j) = (idx / s.ldc, idx % s.ldc);
                    if i >= m || j >= n {
                        check(g.to_f64().to_bits() == c0[idx].to_f64().to_bits(), || {
                            format!("{}: C[{idx}] outside m×n written ({s:?})", T::DTYPE)
                        })?;
                        continue;
                    }
                    let (_, tol) = exact_and_tol(&a, &b, &s, i, j, c0[idx].to_f64());
                    let tol = tol + unit_roundoff(T::DTYPE) * w.to_f64().abs();
                    check((g.to_f64() - w.to_f64()).abs() <= tol, || {
                        format!(
                            "{} C[{i},{j}]: cuda {}, cpu {}, tol {tol:e} ({s:?})",
                            T::DTYPE,
                            g.to_f64(),
                            w.to_f64()
                        )
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// A large product, beta 0 over a NaN-poisoned C: every element written (finite), ~2000 sampled
/// elements against an f64 dot product.
fn large_check<T: Float>(dev: &Cuda, s: &Gemm, seed: u64) -> Result<(), Failed> {
    let mut r = rng(seed);
    let a: Vec<T> = random_vec(&mut r, s.a_len().unwrap());
    let b: Vec<T> = random_vec(&mut r, s.b_len().unwrap());
    let c0 = vec![poison::<T>(); s.c_len().unwrap()];
    let got = run(dev, &a, &b, &c0, s)?;
    check(got.iter().all(|v| v.to_f64().is_finite()), || {
        format!("{}: unwritten or non-finite elements ({s:?})", T::DTYPE)
    })?;
    let total = s.m * s.n;
    let step = (total / 2000).max(1) | 1;
    // Also the four corners and the last row/column (edge tiles).
    let mut samples: Vec<usize> = (0..total).step_by(step).collect();
    samples.extend([0, s.n - 1, (s.m - 1) * s.n, total - 1]);
    for idx in samples {
        let (i, j) = (idx / s.n, idx % s.n);
        let (exact, tol) = exact_and_tol(&a, &b, s, i, j, 0.0);
        let g = got[i * s.ldc + j].to_f64();
        check((g - exact).abs() <= tol, || {
            format!(
                "{} C[{i},{j}]: cuda {g}, exact {exact}, tol {tol:e} ({s:?})",
                T::DTYPE
            )
        })?;
    }
    Ok(())
}

fn large_sampled<T: Float>(
    dev: &Cuda,
    m: usize,
    n: usize,
    k: usize,
    which: &[usize],
) -> Result<(), Failed> {
    for &w in which {
        large_check::<T>(dev, &forms(m, n, k)[w], 600 + w as u64)?;
    }
    Ok(())
}

/// The block's real projections (Llama-3-8B, 512 tokens): q/k/v/o forward (nt), the MLP's up/down,
/// their input gradients (nn) and weight gradients (tn), decode (m = 1).
fn llama_shapes(dev: &Cuda) -> Result<(), Failed> {
    let t = 512;
    for (i, s) in [
        Gemm::nt(t, 4096, 4096),
        Gemm::nt(t, 1024, 4096),
        Gemm::nt(t, 14336, 4096),
        Gemm::nt(t, 4096, 14336),
        Gemm::nn(t, 4096, 14336),
        Gemm::tn(4096, 1024, t),
        Gemm::nt(1, 4096, 4096),
        Gemm::nt(7, 14336, 4096),
    ]
    .iter()
    .enumerate()
    {
        large_check::<f16>(dev, s, 700 + i as u64)?;
    }
    Ok(())
}

/// The FMA path runs the same fmaf sequence on both (one chain per element, explicit fmaf in the
/// epilogue): identical bits, every form, with alpha/beta and padding.
fn f32_bits_equal_emu(dev: &Cuda) -> Result<(), Failed> {
    for (w, f) in forms(200, 150, 301).into_iter().enumerate() {
        let s = Gemm {
            ldc: f.ldc + 5,
            ..f
        }
        .alpha(0.75)
        .beta(-1.0);
        let mut r = rng(800 + w as u64);
        let a: Vec<f32> = random_vec(&mut r, s.a_len().unwrap());
        let b: Vec<f32> = random_vec(&mut r, s.b_len().unwrap());
        let c0: Vec<f32> = random_vec(&mut r, s.c_len().unwrap());
        let gpu = run(dev, &a, &b, &c0, &s)?;
        let emu = run(&Emu, &a, &b, &c0, &s)?;
        check(
            gpu.iter()
                .map(|v| v.to_bits())
                .eq(emu.iter().map(|v| v.to_bits())),
            || format!("f32 cuda and emu differ ({s:?})"),
        )?;
    }
    Ok(())
}

/// Tensor cores may round differently inside an mma than the emulator (which adds the 16 products
/// exactly): within one f32 rounding per term of each other.
fn f16_close_to_emu(dev: &Cuda) -> Result<(), Failed> {
    for (w, s) in forms(130, 70, 300).into_iter().enumerate() {
        let mut r = rng(850 + w as u64);
        let a: Vec<f16> = random_vec(&mut r, s.a_len().unwrap());
        let b: Vec<f16> = random_vec(&mut r, s.b_len().unwrap());
        let c0 = vec![poison::<f16>(); s.c_len().unwrap()];
        let gpu = run(dev, &a, &b, &c0, &s)?;
        let emu = run(&Emu, &a, &b, &c0, &s)?;
        for idx in 0..gpu.len() {
            let (i, j) = (idx / s.n, idx % s.n);
            let (_, tol) = exact_and_tol(&a, &b, &s, i, j, 0.0);
            check(
                (gpu[idx].to_f64() - emu[idx].to_f64()).abs() <= 2.0 * tol,
                || format!("C[{i},{j}]: cuda {} emu {} ({s:?})", gpu[idx], emu[idx]),
            )?;
        }
    }
    Ok(())
}

/// The tile configuration follows (m, n) — 128² tiles for 4096 rows, 64² for 700, 32² for 1 — but
/// the k order does not: a row's bits are the same in all three.
fn batch_invariant(dev: &Cuda) -> Result<(), Failed> {
    for dtype_case in 0..3 {
        let (m, n, k) = (4096, 4096, 1024);
        let mut r = rng(900 + dtype_case);
        macro_rules! case {
            ($t:ty) => {{
                let big = Gemm::nt(m, n, k);
                let a: Vec<$t> = random_vec(&mut r, big.a_len().unwrap());
                let b: Vec<$t> = random_vec(&mut r, big.b_len().unwrap());
                let full = run(dev, &a, &b, &vec![poison::<$t>(); m * n], &big)?;
                for rows in [700, 1, 33] {
                    let s = Gemm { m: rows, ..big };
                    let part = run(dev, &a, &b, &vec![poison::<$t>(); rows * n], &s)?;
                    check(
                        part.iter()
                            .zip(&full[..rows * n])
                            .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits()),
                        || {
                            format!(
                                "{}: rows of a {rows}-row product differ from the {m}-row one",
                                <$t>::DTYPE
                            )
                        },
                    )?;
                }
            }};
        }
        match dtype_case {
            0 => case!(f16),
            1 => case!(bf16),
            _ => case!(f32),
        }
    }
    Ok(())
}

fn deterministic(dev: &Cuda) -> Result<(), Failed> {
    let s = Gemm::tn(4096, 4096, 4096).beta(1.0);
    let mut r = rng(950);
    let a: Vec<bf16> = random_vec(&mut r, s.a_len().unwrap());
    let b: Vec<bf16> = random_vec(&mut r, s.b_len().unwrap());
    let c0: Vec<bf16> = random_vec(&mut r, s.c_len().unwrap());
    let first = run(dev, &a, &b, &c0, &s)?;
    for _ in 0..3 {
        check(run(dev, &a, &b, &c0, &s)? == first, || {
            "run-to-run difference".into()
        })?;
    }
    Ok(())
}

fn rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let a = dev.upload(&[1.0f32; 40]).map_err(err)?;
    let b = dev.upload(&[1.0f32; 29]).map_err(err)?;
    let mut c = dev.upload(&[POISON; 12]).map_err(err)?;
    // B of nn(4, 3, 10) needs 30 elements.
    let e = gemm(dev, &a, &b, &mut c, &Gemm::nn(4, 3, 10));
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "b", .. })),
        || format!("expected an error for `b`, got {e:?}"),
    )?;
    let s = Gemm {
        ldc: 2,
        ..Gemm::nn(4, 3, 10)
    };
    let e = gemm(dev, &a, &b, &mut c, &s);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "ldc", .. })),
        || format!("expected an error for `ldc`, got {e:?}"),
    )?;
    let after = dev.download(&c).map_err(err)?;
    check(
        after.iter().all(|v| v.to_bits() == POISON.to_bits()),
        || "output changed on error".into(),
    )
}

/// Throughput of the 4096³ and 8192³ f16 products (all four forms) against cuBLAS's HGEMM (f32
/// accumulate, row-major through the usual operand swap). Printed for the record; the test fails
/// only below 10 % of cuBLAS (a kernel fallen off its fast path), not at the 50 % target.
fn throughput_vs_cublas(dev: &Cuda) -> Result<(), Failed> {
    use lora_kernels::cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm as _, GemmConfig};
    // SAFETY: only probes for the library; cudarc would panic on first use without it.
    if !unsafe { lora_kernels::cudarc::cublas::sys::is_culib_present() } {
        eprintln!("gemm throughput: libcublas not found, skipped");
        return Ok(());
    }
    let blas = CudaBlas::new(dev.stream().clone()).map_err(|e| Failed::from(e.to_string()))?;
    let time = |f: &mut dyn FnMut() -> Result<(), Failed>| -> Result<f64, Failed> {
        for _ in 0..3 {
            f()?;
        }
        dev.synchronize().map_err(err)?;
        let iters = 10;
        let t0 = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        dev.synchronize().map_err(err)?;
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    };
    for size in [4096usize, 8192] {
        let (m, n, k) = (size, size, size);
        let a = dev.upload(&vec![f16::from_f32(0.01); m * k]).map_err(err)?;
        let b = dev.upload(&vec![f16::from_f32(0.02); k * n]).map_err(err)?;
        let mut c = dev.alloc::<f16>(m * n).map_err(err)?;
        let flops = 2.0 * (m * n * k) as f64;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: f16::ONE,
            lda: n as i32,
            ldb: k as i32,
            beta: f16::ZERO,
            ldc: n as i32,
        };
        let t_blas = time(&mut || {
            // SAFETY: b, a, c are device matrices of the sizes cfg states.
            unsafe { blas.gemm(cfg, &b, &a, &mut c) }.map_err(|e| Failed::from(e.to_string()))
        })?;
        for s in forms(m, n, k) {
            let t = time(&mut || gemm(dev, &a, &b, &mut c, &s).map_err(err))?;
            let ratio = t_blas / t;
            eprintln!(
                "gemm f16 {m}x{n}x{k} a_trans {} b_trans {}: {:.1} TFLOP/s ({:.3} ms), cuBLAS {:.1} TFLOP/s: {:.0} %",
                s.a_trans,
                s.b_trans,
                flops / t / 1e12,
                t * 1e3,
                flops / t_blas / 1e12,
                100.0 * ratio
            );
            check(ratio >= 0.10, || {
                format!("gemm at {:.0} % of cuBLAS ({s:?})", 100.0 * ratio)
            })?;
        }
    }
    Ok(())
}
