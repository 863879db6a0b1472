//! GEMM test helpers shared by tests/gemm.rs and the GPU trials (tests/gpu_block/gemm.rs).

use lora_kernels::gemm::Gemm;
use lora_kernels::Float;

/// All four transpose forms of a packed m×n×k problem.
pub fn forms(m: usize, n: usize, k: usize) -> [Gemm; 4] {
    [
        Gemm::nn(m, n, k),
        Gemm::nt(m, n, k),
        Gemm::tn(m, n, k),
        Gemm::tt(m, n, k),
    ]
}

/// Element `(i, p)` of op(A), independently of the crate.
pub fn op_a<T: Float>(a: &[T], s: &Gemm, i: usize, p: usize) -> f64 {
    if s.a_trans {
        a[p * s.lda + i].to_f64()
    } else {
        a[i * s.lda + p].to_f64()
    }
}

/// Element `(p, j)` of op(B), independently of the crate.
pub fn op_b<T: Float>(b: &[T], s: &Gemm, p: usize, j: usize) -> f64 {
    if s.b_trans {
        b[j * s.ldb + p].to_f64()
    } else {
        b[p * s.ldb + j].to_f64()
    }
}
