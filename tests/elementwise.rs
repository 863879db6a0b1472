//! Elementwise ops: f64 finite-difference check of the cpu reference SwiGLU backward.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use lora_kernels::elementwise::{swiglu_backward, swiglu_forward};
use lora_kernels::Cpu;

/// d_gate and d_up of L = Σ swiglu(gate, up) ⊙ G by central differences (h = 1e-6, f64), gates
/// spanning [-30, 30] (both branches of the stable sigmoid): relative agreement ≤ 1e-6.
#[test]
fn reference_swiglu_backward_matches_finite_differences() {
    let n = 64;
    let mut r = rng(31);
    let mut gate: Vec<f64> = random_vec::<f64>(&mut r, n)
        .iter()
        .map(|v| v * 30.0)
        .collect();
    gate[0] = 0.0;
    gate[1] = -1e-3;
    let mut up: Vec<f64> = random_vec(&mut r, n);
    let g: Vec<f64> = random_vec(&mut r, n);
    let loss = |gate: &[f64], up: &[f64]| -> f64 {
        let mut out = vec![0.0f64; n];
        swiglu_forward(&Cpu, &gate.to_vec(), &up.to_vec(), &mut out).unwrap();
        out.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let (mut dg, mut du) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    swiglu_backward(&Cpu, &gate, &up, &g, &mut dg, &mut du).unwrap();
    let h = 1e-6;
    for k in 0..n {
        let old = gate[k];
        gate[k] = old + h;
        let p = loss(&gate, &up);
        gate[k] = old - h;
        let m = loss(&gate, &up);
        gate[k] = old;
        let fd = (p - m) / (2.0 * h);
        assert!(
            (fd - dg[k]).abs() <= 1e-6 * dg[k].abs().max(1.0),
            "d_gate[{k}] (g {old}): fd {fd} vs {}",
            dg[k]
        );
        let old = up[k];
        up[k] = old + h;
        let p = loss(&gate, &up);
        up[k] = old - h;
        let m = loss(&gate, &up);
        up[k] = old;
        let fd = (p - m) / (2.0 * h);
        assert!(
            (fd - du[k]).abs() <= 1e-6 * du[k].abs().max(1.0),
            "d_up[{k}]: fd {fd} vs {}",
            du[k]
        );
    }
}
