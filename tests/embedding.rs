//! Token embedding: f64 finite-difference check of the cpu reference backward.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use lora_kernels::adapter::fault;
use lora_kernels::embedding::{
    embedding_backward, embedding_backward_workspace_bytes, embedding_forward,
};
use lora_kernels::{Backend, Cpu};

/// L = Σ out ⊙ G is linear in the table, so central differences (h = 1e-6) reproduce the analytic
/// d_table to rounding (≤ 1e-9 here); repeated ids and a bad id (skipped + fault) included.
#[test]
fn reference_backward_matches_finite_differences() {
    let (vocab, dim, tokens) = (5, 3, 9);
    let ids = vec![4, 0, 4, 2, -1, 4, 0, 7, 2];
    let mut r = rng(11);
    let mut table: Vec<f64> = random_vec(&mut r, vocab * dim);
    let g: Vec<f64> = random_vec(&mut r, tokens * dim);
    let loss = |table: &[f64]| -> f64 {
        let mut out = vec![0.0f64; tokens * dim];
        let mut f = vec![0u32];
        embedding_forward(
            &Cpu,
            vocab,
            dim,
            tokens,
            &ids,
            &table.to_vec(),
            &mut out,
            &mut f,
        )
        .unwrap();
        assert_eq!(f[0], fault::INDEX);
        out.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let mut d_table = vec![f64::NAN; vocab * dim];
    let mut ws = Cpu
        .alloc::<u8>(embedding_backward_workspace_bytes(&Cpu, vocab, dim, tokens))
        .unwrap();
    let mut f = vec![0u32];
    embedding_backward(
        &Cpu,
        vocab,
        dim,
        tokens,
        &ids,
        &g,
        &mut d_table,
        &mut ws,
        &mut f,
    )
    .unwrap();
    assert_eq!(f[0], fault::INDEX);
    let h = 1e-6;
    for k in 0..vocab * dim {
        let old = table[k];
        table[k] = old + h;
        let p = loss(&table);
        table[k] = old - h;
        let m = loss(&table);
        table[k] = old;
        let fd = (p - m) / (2.0 * h);
        assert!(
            (fd - d_table[k]).abs() <= 1e-8,
            "d_table[{k}]: fd {fd} vs {}",
            d_table[k]
        );
    }
    // Row 1 and 3 are used by no token: exactly zero.
    assert!(d_table[dim..2 * dim]
        .iter()
        .chain(&d_table[3 * dim..4 * dim])
        .all(|v| *v == 0.0));
}
