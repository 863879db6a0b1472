//! GEMM on the emulator against the cpu reference, the reference against an independent f64
//! computation, and the reference's gradients by central finite differences (f64).
//!
//! Tolerance (emu vs cpu, element (i, j)), derived from the kernels' arithmetic:
//! - accumulation: f16/bf16 inputs are exact in f32, f32 inputs are f32; every element is one f32
//!   reduction over k in a fixed order (one fmaf per term on the FMA path; on tensor cores each mma
//!   adds 16 products with at most one rounding per term), so `|acc − exact| ≤ γ_k · Σ|a·b|`
//!   (`common::dot_tolerance(k, 1, 0, Σ|a·b|)`), scaled by |alpha|;
//! - epilogue in f32: `alpha·acc` and `fmaf(beta, c, ·)`: two roundings, each ≤ 2⁻²⁴ ·
//!   (|alpha|·Σ|a·b| + |beta·c|);
//! - both sides round the result to T once: `u_T · (2|ref| + the bound so far)` with u_T = 2⁻²⁴
//!   (f32), 2⁻¹¹ (f16), 2⁻⁸ (bf16), plus one half-ulp of T's smallest subnormal per rounding
//!   (results near 0 in f16).
//!
//! Emulator sizes stay modest (it runs every thread as a fiber); the tile configurations for big
//! shapes (128 × 128 and 64 × 64 blocks) are exercised by `configs_are_batch_invariant`, which also
//! proves that the configuration never changes a result bit.

mod common;

use common::*;
use lora_kernels::gemm::{gemm, Gemm};
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, Float, Schedule};
use proptest::prelude::*;
use rand::Rng;

fn poison<T: Float>() -> T {
    T::from_f32(POISON)
}

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// Runs `gemm` on `b` with C pre-filled from `c0`; returns all of C.
fn run<B: Backend, T: Float>(b: &B, a: &[T], bm: &[T], c0: &[T], s: &Gemm) -> Vec<T> {
    let ab = b.upload(a).unwrap();
    let bb = b.upload(bm).unwrap();
    let mut cb = b.upload(c0).unwrap();
    gemm(b, &ab, &bb, &mut cb, s).unwrap_or_else(|e| panic!("{e} for {s:?}"));
    b.download(&cb).unwrap()
}

/// All four transpose forms of a packed m×n×k problem.
fn forms(m: usize, n: usize, k: usize) -> [Gemm; 4] {
    [
        Gemm::nn(m, n, k),
        Gemm::nt(m, n, k),
        Gemm::tn(m, n, k),
        Gemm::tt(m, n, k),
    ]
}

/// Element `(i, p)` of op(A) / `(p, j)` of op(B), independently of the crate.
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

/// Half an ulp of T's smallest subnormal (the absolute error of rounding a tiny value).
fn tiny<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F16 => f64::powi(2.0, -25),
        _ => f64::powi(2.0, -150),
    }
}

/// The bound of the module docs for element (i, j); `c_in` is C's value before the call.
fn tolerance<T: Float>(
    a: &[T],
    b: &[T],
    s: &Gemm,
    i: usize,
    j: usize,
    c_in: f64,
    reference: f64,
) -> f64 {
    let abs_sum: f64 = (0..s.k)
        .map(|p| (op_a(a, s, i, p) * op_b(b, s, p, j)).abs())
        .sum();
    let alpha = (s.alpha as f64).abs();
    let beta_c = if s.beta == 0.0 {
        0.0
    } else {
        (s.beta as f64 * c_in).abs()
    };
    let f32_part = alpha * dot_tolerance(s.k, 1, 0, abs_sum)
        + 2.0 * f64::powi(2.0, -24) * (alpha * abs_sum + beta_c);
    let u = unit_roundoff(T::DTYPE);
    f32_part + u * (2.0 * reference.abs() + f32_part) + 2.0 * tiny::<T>()
}

/// How C starts.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Every element POISON (NaN): with beta 0 nothing may read it.
    Poison,
    /// Random values in the m×n block, POISON in the padding columns.
    Random,
}

/// emu (or any backend) vs cpu on one problem: every element of the m×n block within the
/// tolerance, every other element of C (padding columns, the tail) bit-identical to before.
fn check_case<B: Backend, T: Float>(backend: &B, s: &Gemm, init: Init, seed: u64) {
    let mut r = rng(seed);
    let a: Vec<T> = random_vec(&mut r, s.a_len().unwrap());
    let b: Vec<T> = random_vec(&mut r, s.b_len().unwrap());
    let c_len = s.c_len().unwrap() + 3; // a tail past the last row: must stay untouched
    let mut c0: Vec<T> = vec![poison::<T>(); c_len];
    if let Init::Random = init {
        for i in 0..s.m {
            for j in 0..s.n {
                c0[i * s.ldc + j] = T::from_f64(r.random_range(-1.0..1.0));
            }
        }
    }
    let got = run(backend, &a, &b, &c0, s);
    let want = run(&Cpu, &a, &b, &c0, s);
    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
        let (i, j) = (idx / s.ldc, idx % s.ldc);
        if i >= s.m || j >= s.n {
            assert_eq!(
                g.to_f64().to_bits(),
                c0[idx].to_f64().to_bits(),
                "{}: C[{idx}] outside the m×n block was written ({s:?})",
                T::DTYPE
            );
            continue;
        }
        let tol = tolerance(&a, &b, s, i, j, c0[idx].to_f64(), w.to_f64());
        let err = (g.to_f64() - w.to_f64()).abs();
        assert!(
            err <= tol,
            "{} C[{i},{j}]: {} {}, cpu {}, |err| {err:e} > tol {tol:e} ({s:?}, {init:?})",
            T::DTYPE,
            backend.name(),
            g.to_f64(),
            w.to_f64()
        );
    }
}

// ---- the reference -------------------------------------------------------------------------------

#[test]
fn reference_matches_naive_f64_all_forms() {
    let (m, n, k) = (5, 7, 9);
    let mut r = rng(1);
    for s in forms(m, n, k) {
        let s = Gemm {
            lda: s.lda + 2,
            ldb: s.ldb + 1,
            ldc: n + 3,
            ..s
        }
        .alpha(0.75)
        .beta(-1.5);
        let a: Vec<f64> = random_vec(&mut r, s.a_len().unwrap());
        let b: Vec<f64> = random_vec(&mut r, s.b_len().unwrap());
        let c0: Vec<f64> = random_vec(&mut r, s.c_len().unwrap());
        let got = run(&Cpu, &a, &b, &c0, &s);
        for (idx, g) in got.iter().enumerate() {
            let (i, j) = (idx / s.ldc, idx % s.ldc);
            if j >= n {
                assert_eq!(g.to_bits(), c0[idx].to_bits(), "padding ({i},{j})");
                continue;
            }
            let acc: f64 = (0..k)
                .map(|p| op_a(&a, &s, i, p) * op_b(&b, &s, p, j))
                .sum();
            let want = 0.75 * acc - 1.5 * c0[idx];
            assert!((g - want).abs() <= 1e-14, "{s:?} ({i},{j}) {g} vs {want}");
        }
    }
}

/// L(A, B) = Σ G ∘ (A·B) for A [m,k], B [k,n] (f64 on the cpu backend).
fn loss(a: &[f64], b: &[f64], g: &[f64], m: usize, n: usize, k: usize) -> f64 {
    let c = run(&Cpu, a, b, &vec![0.0; m * n], &Gemm::nn(m, n, k));
    c.iter().zip(g).map(|(x, y)| x * y).sum()
}

/// The backward of C = A·B is two more GEMMs: dA = G·Bᵀ (nt) and dB = Aᵀ·G (tn). Checked against
/// central differences of L = Σ G ∘ (A·B) with h = 1e-6 (L is bilinear, so the central difference
/// is exact up to rounding: relative error ~1e-9).
#[test]
fn gradients_by_central_differences_f64() {
    let (m, n, k) = (4, 5, 6);
    let mut r = rng(2);
    let a: Vec<f64> = random_vec(&mut r, m * k);
    let b: Vec<f64> = random_vec(&mut r, k * n);
    let g: Vec<f64> = random_vec(&mut r, m * n);
    let da = run(&Cpu, &g, &b, &vec![0.0; m * k], &Gemm::nt(m, k, n));
    let db = run(&Cpu, &a, &g, &vec![0.0; k * n], &Gemm::tn(k, n, m));
    let h = 1e-6;
    for (which, x, grad) in [("A", &a, &da), ("B", &b, &db)] {
        for idx in 0..x.len() {
            let mut plus = x.clone();
            let mut minus = x.clone();
            plus[idx] += h;
            minus[idx] -= h;
            let (lp, lm) = if which == "A" {
                (loss(&plus, &b, &g, m, n, k), loss(&minus, &b, &g, m, n, k))
            } else {
                (loss(&a, &plus, &g, m, n, k), loss(&a, &minus, &g, m, n, k))
            };
            let fd = (lp - lm) / (2.0 * h);
            let rel = (fd - grad[idx]).abs() / grad[idx].abs().max(1e-3);
            assert!(
                rel <= 1e-6,
                "d{which}[{idx}]: fd {fd}, analytic {}, rel {rel:e}",
                grad[idx]
            );
        }
    }
    // The transposed-operand forms give the same gradients from the stored transposes:
    // dA via tt (Gᵀ stored [n,m] is G itself read transposed) must equal the nt result.
    let bt: Vec<f64> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect(); // Bᵀ [n,k]
    let da2 = run(&Cpu, &g, &bt, &vec![0.0; m * k], &Gemm::nn(m, k, n));
    for (x, y) in da.iter().zip(&da2) {
        assert!((x - y).abs() <= 1e-14);
    }
    // beta: ∂C_out/∂C_in = beta.
    let s = Gemm::nn(m, n, k).alpha(0.5).beta(2.0);
    let c0: Vec<f64> = random_vec(&mut r, m * n);
    let base = run(&Cpu, &a, &b, &c0, &s);
    let mut bumped = c0.clone();
    bumped[3] += h;
    let moved = run(&Cpu, &a, &b, &bumped, &s);
    assert!(((moved[3] - base[3]) / h - 2.0).abs() <= 1e-6);
}

// ---- emu vs cpu ------------------------------------------------------------------------------------

/// Every combination of m, n, k ∈ {1, 3, 17, 127} (a 127-wide edge spans several 32-wide tiles
/// with a ragged last one), all four forms, packed, beta 0 over a NaN-poisoned C.
fn odd_sizes<T: Float>() {
    let sizes = [1usize, 3, 17, 127];
    let mut seed = 0;
    for &m in &sizes {
        for &n in &sizes {
            for &k in &sizes {
                for s in forms(m, n, k) {
                    seed += 1;
                    check_case::<_, T>(&Emu, &s, Init::Poison, seed);
                }
            }
        }
    }
}

#[test]
fn emu_odd_sizes_f32() {
    odd_sizes::<f32>();
}
#[test]
fn emu_odd_sizes_f16() {
    odd_sizes::<f16>();
}
#[test]
fn emu_odd_sizes_bf16() {
    odd_sizes::<bf16>();
}

/// alpha/beta combinations, padded leading dimensions (aligned for 16-byte copies and not),
/// k = 290 (10 k-tiles: the 8-stage ring of the small configuration wraps around),
/// random C for beta ≠ 0, NaN C for beta 0; the padding columns are POISON and must stay so.
fn alpha_beta_and_strides<T: Float>() {
    let mut seed = 1000;
    for (alpha, beta) in [
        (1.0, 1.0),
        (0.5, 0.0),
        (-2.0, -0.75),
        (1.0, 0.0),
        (0.0, 1.0),
    ] {
        for (pa, pb, pc) in [(0, 0, 1), (8, 16, 8), (3, 5, 7)] {
            for f in forms(45, 38, 290) {
                seed += 1;
                let s = Gemm {
                    lda: f.lda + pa,
                    ldb: f.ldb + pb,
                    ldc: f.ldc + pc,
                    ..f
                }
                .alpha(alpha)
                .beta(beta);
                let init = if beta == 0.0 {
                    Init::Poison
                } else {
                    Init::Random
                };
                check_case::<_, T>(&Emu, &s, init, seed);
            }
        }
    }
}

#[test]
fn emu_alpha_beta_strides_f32() {
    alpha_beta_and_strides::<f32>();
}
#[test]
fn emu_alpha_beta_strides_f16() {
    alpha_beta_and_strides::<f16>();
}
#[test]
fn emu_alpha_beta_strides_bf16() {
    alpha_beta_and_strides::<bf16>();
}

#[derive(Clone, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    form: usize,
    pads: (usize, usize, usize),
    alpha: f32,
    beta: f32,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        1usize..150,
        1usize..150,
        0usize..150,
        0usize..4,
        (0usize..10, 0usize..10, 0usize..10),
        prop::sample::select(vec![1.0f32, 0.5, -1.25]),
        prop::sample::select(vec![0.0f32, 1.0, -0.5]),
        any::<u64>(),
    )
        .prop_map(|(m, n, k, form, pads, alpha, beta, seed)| Case {
            m,
            n,
            k,
            form,
            pads,
            alpha,
            beta,
            seed,
        })
}

fn run_case<T: Float>(c: &Case) {
    let f = forms(c.m, c.n, c.k)[c.form];
    let s = Gemm {
        lda: f.lda + c.pads.0,
        ldb: f.ldb + c.pads.1,
        ldc: f.ldc + c.pads.2,
        ..f
    }
    .alpha(c.alpha)
    .beta(c.beta);
    let init = if c.beta == 0.0 {
        Init::Poison
    } else {
        Init::Random
    };
    check_case::<_, T>(&Emu, &s, init, c.seed);
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_random_f32(c in cases()) {
        run_case::<f32>(&c);
    }

    #[test]
    fn emu_random_f16(c in cases()) {
        run_case::<f16>(&c);
    }

    #[test]
    fn emu_random_bf16(c in cases()) {
        run_case::<bf16>(&c);
    }
}

/// k = 0: the product is empty, C = beta·C (beta 0: zeros, C never read); m = 0 or n = 0: nothing.
#[test]
fn empty_dimensions() {
    for f in forms(5, 6, 0) {
        let c0 = vec![POISON; 30];
        let got = run::<_, f32>(&Emu, &[], &[], &c0, &f);
        assert!(got.iter().all(|v| v.to_bits() == 0), "{got:?}");
        let c1: Vec<f32> = (0..30).map(|x| x as f32).collect();
        let got = run::<_, f32>(&Emu, &[], &[], &c1, &f.beta(-0.5));
        let want = run::<_, f32>(&Cpu, &[], &[], &c1, &f.beta(-0.5));
        assert_eq!(bits(&got), bits(&want));
        assert_eq!(got[7], -3.5);
    }
    for s in [Gemm::nn(0, 5, 3), Gemm::nt(4, 0, 3), Gemm::tn(0, 0, 0)] {
        let a = vec![1.0f32; s.a_len().unwrap()];
        let b = vec![1.0f32; s.b_len().unwrap()];
        let got = run::<_, f32>(&Emu, &a, &b, &[POISON; 4], &s);
        assert!(got.iter().all(|v| v.to_bits() == POISON.to_bits()));
    }
}

/// The tile configuration depends on (m, n) (128², 64² or 32² blocks on the tensor-core path,
/// likewise on the FMA path), the k order never does: the rows of a 1530 × 1400 product (128²
/// tiles, ragged last tile row and column), of a 760 × 700 one (64²) and of a 16 × 1400 one (32²)
/// are bit-identical where they overlap, and so are the columns of a 1530 × 24 product. k = 170
/// runs the 4-stage ring around more than once and ends on a partial k-tile. The big result is
/// checked against the cpu on a sample of elements.
fn configs_are_batch_invariant<T: Float>(form: usize) {
    let k = 170;
    let (m, n) = (1530, 1400);
    let mut r = rng(77 + form as u64);
    let big = forms(m, n, k)[form];
    // One A/B pair serves all sizes: the smaller problems read a prefix of op(A)'s rows and op(B)'s
    // columns through the big problem's leading dimensions.
    let a: Vec<T> = random_vec(&mut r, big.a_len().unwrap());
    let b: Vec<T> = random_vec(&mut r, big.b_len().unwrap());
    let full = run(&Emu, &a, &b, &vec![poison::<T>(); m * n], &big);
    for (mm, nn) in [(760, 700), (16, 1400), (1530, 24), (1, 1)] {
        let s = Gemm {
            m: mm,
            n: nn,
            ldc: nn,
            ..big
        };
        let part = run(&Emu, &a, &b, &vec![poison::<T>(); mm * nn], &s);
        for i in 0..mm {
            for j in 0..nn {
                assert_eq!(
                    part[i * nn + j].to_f64().to_bits(),
                    full[i * n + j].to_f64().to_bits(),
                    "{} form {form}: C[{i},{j}] of {mm}x{nn} differs from {m}x{n}",
                    T::DTYPE
                );
            }
        }
    }
    // Accuracy of the big one against the cpu reference, on a sample of elements (tolerance
    // sums are the expensive part) plus the last row and column (the ragged edge tiles).
    let want = run(&Cpu, &a, &b, &vec![poison::<T>(); m * n], &big);
    let edges = (0..n)
        .map(|j| (m - 1) * n + j)
        .chain((0..m).map(|i| i * n + n - 1));
    for idx in (0..m * n).step_by(97).chain(edges) {
        let (i, j) = (idx / n, idx % n);
        let tol = tolerance(&a, &b, &big, i, j, 0.0, want[idx].to_f64());
        assert!(
            (full[idx].to_f64() - want[idx].to_f64()).abs() <= tol,
            "{} form {form}: C[{i},{j}] emu {} cpu {}",
            T::DTYPE,
            full[idx].to_f64(),
            want[idx].to_f64()
        );
    }
}

#[test]
fn configs_are_batch_invariant_f16_nt() {
    configs_are_batch_invariant::<f16>(1);
}
#[test]
fn configs_are_batch_invariant_bf16_tn() {
    configs_are_batch_invariant::<bf16>(2);
}
#[test]
fn configs_are_batch_invariant_f32_nn_tt() {
    configs_are_batch_invariant::<f32>(0);
    configs_are_batch_invariant::<f32>(3);
}

/// Same inputs → same bits: twice on the default schedule and under reverse and random thread
/// orders (a missing barrier or a schedule-dependent reduction would show here).
fn deterministic<T: Float>() {
    let mut r = rng(9);
    for (idx, f) in forms(70, 90, 100).into_iter().enumerate() {
        let s = Gemm { ldc: 93, ..f }.alpha(0.5).beta(1.0);
        let a: Vec<T> = random_vec(&mut r, s.a_len().unwrap());
        let b: Vec<T> = random_vec(&mut r, s.b_len().unwrap());
        let c0: Vec<T> = random_vec(&mut r, s.c_len().unwrap());
        let first = run(&Emu, &a, &b, &c0, &s);
        assert_eq!(bits(&first), bits(&run(&Emu, &a, &b, &c0, &s)));
        for sched in [Schedule::Reverse, Schedule::Random(idx as u64 + 5)] {
            let other = Emu::with_schedule(sched, || run(&Emu, &a, &b, &c0, &s));
            assert_eq!(bits(&first), bits(&other), "{} {sched:?} {s:?}", T::DTYPE);
        }
    }
}

#[test]
fn deterministic_across_schedules_f32() {
    deterministic::<f32>();
}
#[test]
fn deterministic_across_schedules_f16() {
    deterministic::<f16>();
}
#[test]
fn deterministic_across_schedules_bf16() {
    deterministic::<bf16>();
}

/// f16 results beyond the range saturate the way rounding says (to ±inf), they never wrap or
/// turn into NaN by themselves; bf16 keeps f32's range.
#[test]
fn f16_overflow_rounds_to_inf() {
    let s = Gemm::nn(2, 2, 64);
    let a = vec![f16::from_f32(100.0); 128];
    let b = vec![f16::from_f32(100.0); 128];
    let got = run(&Emu, &a, &b, &[f16::ZERO; 4], &s);
    assert!(got.iter().all(|v| v.to_f32() == f32::INFINITY), "{got:?}");
    let a = vec![bf16::from_f32(100.0); 128];
    let got = run(&Emu, &a, &a, &[bf16::ZERO; 4], &s);
    let want = bf16::from_f32(640000.0);
    assert!(got.iter().all(|v| *v == want), "{got:?}");
}

// ---- bad input ------------------------------------------------------------------------------------

fn expect_invalid<B: Backend>(b: &B, s: &Gemm, lens: (usize, usize, usize), arg: &str) {
    let a = b.upload(&vec![1.0f32; lens.0]).unwrap();
    let bm = b.upload(&vec![1.0f32; lens.1]).unwrap();
    let mut c = b.upload(&vec![POISON; lens.2]).unwrap();
    let e = gemm(b, &a, &bm, &mut c, s);
    match &e {
        Err(Error::InvalidArgument { arg: got, .. }) if *got == arg => {}
        other => panic!(
            "{}: expected InvalidArgument for `{arg}`, got {other:?} ({s:?})",
            b.name()
        ),
    }
    let after = b.download(&c).unwrap();
    assert!(
        after.iter().all(|v| v.to_bits() == POISON.to_bits()),
        "C written on error"
    );
}

#[test]
fn rejects_bad_input() {
    fn all<B: Backend>(b: &B) {
        let ok = |s: &Gemm| (s.a_len().unwrap(), s.b_len().unwrap(), s.c_len().unwrap());
        // Leading dimensions below the stored width, for every form.
        for f in forms(6, 7, 8) {
            let s = Gemm {
                lda: f.lda - 1,
                ..f
            };
            expect_invalid(b, &s, ok(&f), "lda");
            let s = Gemm {
                ldb: f.ldb - 1,
                ..f
            };
            expect_invalid(b, &s, ok(&f), "ldb");
            let s = Gemm {
                ldc: f.ldc - 1,
                ..f
            };
            expect_invalid(b, &s, ok(&f), "ldc");
            // Buffers one element short.
            let (la, lb, lc) = ok(&f);
            expect_invalid(b, &f, (la - 1, lb, lc), "a");
            expect_invalid(b, &f, (la, lb - 1, lc), "b");
            expect_invalid(b, &f, (la, lb, lc - 1), "c");
            // Padded strides need the padded extent.
            let s = Gemm { ldc: 9, ..f };
            expect_invalid(b, &s, (la, lb, lc), "c");
        }
        // Sizes beyond int32 (rejected before any length check).
        let big = i32::MAX as usize + 1;
        expect_invalid(b, &Gemm::nn(big, 1, 1), (1, 1, 1), "m");
        expect_invalid(b, &Gemm::nn(1, big, 1), (1, 1, 1), "n");
        expect_invalid(b, &Gemm::nn(1, 1, big), (1, 1, 1), "k");
        // Strides beyond int64 and extents that overflow usize.
        let s = Gemm {
            ldc: usize::MAX,
            ..Gemm::nn(2, 1, 1)
        };
        expect_invalid(b, &s, (1, 1, 4), "ldc");
        let s = Gemm {
            lda: 1 << 62,
            ..Gemm::nn(4, 1, 1)
        };
        expect_invalid(b, &s, (1, 1, 4), "a");
    }
    all(&Emu);
    all(&Cpu);
    // f64 is the cpu backend's only.
    let a = vec![1.0f64; 4];
    let mut c = vec![f64::NAN; 4];
    let e = gemm(&Emu, &a, &a, &mut c, &Gemm::nn(2, 2, 2));
    assert!(
        matches!(
            e,
            Err(Error::UnsupportedDtype {
                actual: DType::F64,
                ..
            })
        ),
        "{e:?}"
    );
    assert!(c.iter().all(|v| v.is_nan()));
    assert!(gemm(&Cpu, &a, &a, &mut c, &Gemm::nn(2, 2, 2)).is_ok());
    assert_eq!(c, vec![2.0; 4]);
}

/// The C launcher re-validates what reaches it directly (C users): null pointers, negative sizes,
/// bad transpose flags, short leading dimensions, unknown dtypes.
#[test]
fn launcher_rejects_bad_params() {
    use lora_kernels::ffi::sys;
    let a = [1.0f32; 16];
    let mut c = [POISON; 16];
    let good = sys::LkGemmParams {
        a: a.as_ptr().cast(),
        b: a.as_ptr().cast(),
        c: c.as_mut_ptr().cast(),
        lda: 4,
        ldb: 4,
        ldc: 4,
        m: 4,
        n: 4,
        k: 4,
        a_trans: 0,
        b_trans: 0,
        alpha: 1.0,
        beta: 0.0,
        dtype: sys::LkDtype::LK_F32 as i32,
    };
    let call = |p: &sys::LkGemmParams| unsafe { sys::lk_emu_gemm(p, std::ptr::null_mut()) };
    let invalid = sys::LK_ERR_INVALID_ARGUMENT as i32;
    assert_eq!(
        unsafe { sys::lk_emu_gemm(std::ptr::null(), std::ptr::null_mut()) },
        invalid
    );
    for bad in [
        sys::LkGemmParams { m: -1, ..good },
        sys::LkGemmParams { k: -1, ..good },
        sys::LkGemmParams { a_trans: 2, ..good },
        sys::LkGemmParams { lda: 3, ..good },
        sys::LkGemmParams { ldb: 3, ..good },
        sys::LkGemmParams { ldc: 3, ..good },
        sys::LkGemmParams {
            a: std::ptr::null(),
            ..good
        },
        sys::LkGemmParams {
            c: std::ptr::null_mut(),
            ..good
        },
    ] {
        assert_eq!(call(&bad), invalid, "{bad:?}");
    }
    assert_eq!(
        call(&sys::LkGemmParams { dtype: 7, ..good }),
        sys::LK_ERR_UNSUPPORTED_DTYPE as i32
    );
    assert!(c.iter().all(|v| v.to_bits() == POISON.to_bits()));
    // k = 0 needs no A/B pointers.
    assert_eq!(
        call(&sys::LkGemmParams {
            a: std::ptr::null(),
            b: std::ptr::null(),
            k: 0,
            ..good
        }),
        0
    );
    assert!(c.iter().all(|&v| v == 0.0));
    assert_eq!(call(&good), 0);
    assert!(c.iter().all(|&v| v == 4.0));
}
