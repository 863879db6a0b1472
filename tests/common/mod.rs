//! Shared test utilities: the size knob, random inputs, poisoning and tolerance checks.
#![allow(dead_code)]

use lora_kernels::Float;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `LK_TEST_SCALE` (default 1.0) shrinks or grows test sizes and case counts, so CI stays within
/// its time budget by shrinking sizes, never by skipping kernels.
pub fn scale() -> f64 {
    std::env::var("LK_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(1.0)
}

/// `n` scaled, at least `min`.
pub fn scaled(n: usize, min: usize) -> usize {
    ((n as f64 * scale()).round() as usize).max(min)
}

/// Proptest config with `cases` scaled.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: scaled(cases as usize, 4) as u32,
        ..Default::default()
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform in [-1, 1), rounded to T: fresh random, never zeros.
pub fn random_vec<T: Float>(rng: &mut StdRng, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f64(rng.random_range(-1.0..1.0)))
        .collect()
}

/// f32 NaN with a recognisable payload: an unwritten element shows up as this exact bit pattern.
pub const POISON: f32 = f32::from_bits(0x7fc0_dead);

/// Tolerance for an f32-accumulated dot product of `n` terms computed as `chains` sequential FMA
/// chains combined by a `levels`-deep tree: |got − exact| ≤ (n/chains + levels + 1) · 2⁻²⁴ · Σ|xᵢyᵢ|
/// (the standard γ bound for recursive summation, with inputs exact in f32). `abs_sum` is Σ|xᵢyᵢ|.
pub fn dot_tolerance(n: usize, chains: usize, levels: usize, abs_sum: f64) -> f64 {
    let steps = n.div_ceil(chains.max(1)) + levels + 1;
    1.01 * steps as f64 * f64::powi(2.0, -24) * abs_sum + f64::MIN_POSITIVE
}
pub mod block;
pub mod selftest;
pub mod serving;
