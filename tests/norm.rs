//! RMSNorm: f64 finite-difference checks of the cpu reference backward.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use lora_kernels::norm::{
    rmsnorm_backward, rmsnorm_backward_workspace_bytes, rmsnorm_forward, RmsNorm,
};
use lora_kernels::{Backend, Cpu};

/// Central finite difference of `f` at `v[k]` with step h.
fn central(v: &mut [f64], k: usize, h: f64, f: &mut dyn FnMut(&[f64]) -> f64) -> f64 {
    let old = v[k];
    v[k] = old + h;
    let plus = f(v);
    v[k] = old - h;
    let minus = f(v);
    v[k] = old;
    (plus - minus) / (2.0 * h)
}

fn loss(s: &RmsNorm, x: &[f64], w: &[f64], g: &[f64]) -> f64 {
    let mut y = vec![0.0f64; s.rows * s.dim];
    let mut rstd = vec![0.0f32; s.rows];
    rmsnorm_forward(&Cpu, s, &x.to_vec(), &w.to_vec(), &mut y, &mut rstd).unwrap();
    y.iter().zip(g).map(|(a, b)| a * b).sum()
}

/// dL/dx and dL/dw of L = Σ y ⊙ G from the reference backward agree with central differences
/// (h = 1e-6, f64). The backward uses the saved f32 rstd (relative error ≤ 2⁻²⁴, entering dx as
/// rstd and rstd³), so agreement is ~1e-7 relative; the bound is 1e-6 · max(1, |analytic|).
#[test]
fn reference_backward_matches_finite_differences() {
    for (rows, dim, eps, seed) in [
        (1, 1, 1e-5f32, 1u64),
        (3, 7, 0.1, 2),
        (4, 33, 1e-6, 3),
        (2, 2, 0.0, 4),
    ] {
        let s = RmsNorm::new(rows, dim, eps);
        let mut r = rng(seed);
        let mut x: Vec<f64> = random_vec(&mut r, rows * dim);
        let mut w: Vec<f64> = random_vec(&mut r, dim);
        let g: Vec<f64> = random_vec(&mut r, rows * dim);
        let mut y = vec![0.0f64; rows * dim];
        let mut rstd = vec![0.0f32; rows];
        rmsnorm_forward(&Cpu, &s, &x, &w, &mut y, &mut rstd).unwrap();
        let (mut dx, mut dw) = (vec![0.0f64; rows * dim], vec![0.0f64; dim]);
        let mut ws = Cpu
            .alloc::<u8>(rmsnorm_backward_workspace_bytes(&Cpu, &s))
            .unwrap();
        rmsnorm_backward(&Cpu, &s, &x, &w, &rstd, &g, &mut dx, &mut dw, &mut ws).unwrap();
        let h = 1e-6;
        for k in 0..rows * dim {
            let wc = w.clone();
            let fd = central(&mut x, k, h, &mut |xv| loss(&s, xv, &wc, &g));
            assert!(
                (fd - dx[k]).abs() <= 1e-6 * dx[k].abs().max(1.0),
                "{s:?} dx[{k}]: fd {fd} vs {}",
                dx[k]
            );
        }
        for j in 0..dim {
            let xc = x.clone();
            let fd = central(&mut w, j, h, &mut |wv| loss(&s, &xc, wv, &g));
            assert!(
                (fd - dw[j]).abs() <= 1e-6 * dw[j].abs().max(1.0),
                "{s:?} dw[{j}]: fd {fd} vs {}",
                dw[j]
            );
        }
    }
}
