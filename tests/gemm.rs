//! GEMM: the cpu reference against an independent f64 computation and its gradients by central
//! finite differences (f64); emu vs cpu follows with the kernels.

mod common;

use common::*;
use lora_kernels::gemm::{gemm, Gemm};
use lora_kernels::{Backend, Cpu, Float};

/// Runs `gemm` on `b` with C pre-filled from `c0`; returns all of C.
fn run<B: Backend, T: Float>(b: &B, a: &[T], bm: &[T], c0: &[T], s: &Gemm) -> Vec<T> {
    let ab = b.upload(a).unwrap();
    let bb = b.upload(bm).unwrap();
    let mut cb = b.upload(c0).unwrap();
    gemm(b, &ab, &bb, &mut cb, s).unwrap();
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

/// L(A, B) = Σ G ∘ (A·B) for A [m,k], B [k,n] (the plain product, f64 on the cpu backend).
fn loss(a: &[f64], b: &[f64], g: &[f64], m: usize, n: usize, k: usize) -> f64 {
    let c = run(&Cpu, a, b, &vec![0.0; m * n], &Gemm::nn(m, n, k));
    c.iter().zip(g).map(|(x, y)| x * y).sum()
}

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
        for i in 0..m {
            for j in 0..s.ldc {
                let idx = i * s.ldc + j;
                if idx >= got.len() {
                    continue;
                }
                if j >= n {
                    assert_eq!(got[idx].to_bits(), c0[idx].to_bits(), "padding ({i},{j})");
                    continue;
                }
                let mut acc = 0.0;
                for p in 0..k {
                    let av = if s.a_trans {
                        a[p * s.lda + i]
                    } else {
                        a[i * s.lda + p]
                    };
                    let bv = if s.b_trans {
                        b[j * s.ldb + p]
                    } else {
                        b[p * s.ldb + j]
                    };
                    acc += av * bv;
                }
                let want = 0.75 * acc - 1.5 * c0[idx];
                assert!(
                    (got[idx] - want).abs() <= 1e-14,
                    "{s:?} ({i},{j}) {} vs {want}",
                    got[idx]
                );
            }
        }
    }
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
    // alpha/beta: dC_in = beta·G, and the alpha-scaled product's gradient is alpha·dA.
    let s = Gemm::nn(m, n, k).alpha(0.5).beta(2.0);
    let c0: Vec<f64> = random_vec(&mut r, m * n);
    let base = run(&Cpu, &a, &b, &c0, &s);
    let mut bumped = c0.clone();
    bumped[3] += h;
    let moved = run(&Cpu, &a, &b, &bumped, &s);
    assert!(((moved[3] - base[3]) / h - 2.0).abs() <= 1e-6);
}
