//! RoPE: f64 finite-difference check of the cpu reference backward.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use lora_kernels::adapter::fault;
use lora_kernels::rope::{rope_backward, rope_forward, Rope};
use lora_kernels::Cpu;

/// The forward is linear in x; the backward applied to G must equal d(Σ rope(x) ⊙ G)/dx by central
/// differences (h = 1e-6, f64): agreement to ~1e-9. A negative position is skipped + fault in both.
#[test]
fn reference_backward_matches_finite_differences() {
    let s = Rope::new(4, 3, 6, 10000.0);
    let positions = vec![0, 5, -2, 1_000_003];
    let mut r = rng(21);
    let mut x: Vec<f64> = random_vec(&mut r, s.tokens * s.width());
    let g: Vec<f64> = random_vec(&mut r, s.tokens * s.width());
    let loss = |x: &[f64]| -> f64 {
        let mut y = x.to_vec();
        let mut f = vec![0u32];
        rope_forward(&Cpu, &s, &positions, &mut y, &mut f).unwrap();
        assert_eq!(f[0], fault::INDEX);
        y.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let mut dx = g.clone();
    let mut f = vec![0u32];
    rope_backward(&Cpu, &s, &positions, &mut dx, &mut f).unwrap();
    assert_eq!(f[0], fault::INDEX);
    let h = 1e-6;
    for k in 0..x.len() {
        let old = x[k];
        x[k] = old + h;
        let p = loss(&x);
        x[k] = old - h;
        let m = loss(&x);
        x[k] = old;
        let fd = (p - m) / (2.0 * h);
        assert!((fd - dx[k]).abs() <= 1e-8, "dx[{k}]: fd {fd} vs {}", dx[k]);
    }
    // The skipped token's row of G passes through the backward untouched.
    let w = s.width();
    assert_eq!(dx[2 * w..3 * w], g[2 * w..3 * w]);
}
