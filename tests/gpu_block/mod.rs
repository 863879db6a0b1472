//! GPU trials of the reference block's kernel families, one module per family; each module
//! exports `TESTS: &[(&str, GpuTest)]` and is listed in [`tests`].

use crate::GpuTest;

mod attention;
mod elementwise;
mod embedding;
mod gemm;
mod loss;
mod model;
mod norm;
mod optim;
mod rope;

/// Every family's GPU trials.
pub fn tests() -> impl Iterator<Item = (&'static str, GpuTest)> {
    let families: &[&[(&'static str, GpuTest)]] = &[
        gemm::TESTS,
        attention::TESTS,
        norm::TESTS,
        embedding::TESTS,
        rope::TESTS,
        elementwise::TESTS,
        loss::TESTS,
        model::TESTS,
        optim::TESTS,
    ];
    families.iter().flat_map(|f| f.iter().copied())
}
