//! Every lora-kernels benchmark, in one criterion binary (one module file per kernel family).
//!
//! ```text
//! cargo bench                                   # cpu + emu at small shapes (+ GPU with --features cuda and a device)
//! cargo bench -- bgmv                           # one family (criterion's regex filter on the ids)
//! cargo bench -- 'sgmv/cuda/lora'               # one family, one backend, one kind of case
//! cargo bench --bench kernels -- emu --warm-up-time 0.2 --measurement-time 0.5   # quick
//! cargo bench --features cuda                   # on a GPU: ceilings first, then every case vs its roofline
//! ```
//!
//! Ids are `{family}/{backend}/{case}/{shape}`. On the GPU each case prints its median, its roofline
//! (max of minimum bytes / measured copy bandwidth and FLOPs / measured cuBLAS rate) and the
//! comparison with its baseline; `lk-bench.jsonl` beside criterion's results records them
//! (`benches/common/mod.rs`). Without a GPU the cpu reference and the SIMT emulator run at small
//! shapes — the emulator's speed — and every family says that GPU figures need `--features cuda`
//! and a device. `LK_BENCH_ONLY_CUDA=1` skips cpu and emu (the GPU kit).

mod common;

#[path = "attention.rs"]
mod attention;
#[path = "backward.rs"]
mod backward;
#[path = "bgmv.rs"]
mod bgmv;
#[path = "block.rs"]
mod block;
#[path = "dropout.rs"]
mod dropout;
#[path = "emu.rs"]
mod emu;
#[path = "gemm.rs"]
mod gemm;
#[path = "merge.rs"]
mod merge;
#[path = "roofline.rs"]
mod roofline;
#[path = "sgmv.rs"]
mod sgmv;
#[path = "shrink.rs"]
mod shrink;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

#[global_allocator]
static ALLOC: common::alloc::Counting = common::alloc::Counting;

type Family = fn(&mut Criterion, &common::Ctx);

fn all(c: &mut Criterion) {
    let ctx = common::Ctx::new();
    // Most important first: a run cut short by a time budget (the GPU kit) keeps these.
    let families: [(&str, Family); 11] = [
        ("roofline", roofline::bench),
        ("bgmv", bgmv::bench),
        ("sgmv", sgmv::bench),
        ("shrink", shrink::bench),
        ("dropout", dropout::bench),
        ("merge", merge::bench),
        ("gemm", gemm::bench),
        ("backward", backward::bench),
        ("attention", attention::bench),
        ("block", block::bench),
        ("emu", emu::bench),
    ];
    for (name, f) in families {
        // One family's failure (e.g. a GPU fault in a kernel under development) must not cost the
        // other families' figures.
        if catch_unwind(AssertUnwindSafe(|| f(c, &ctx))).is_err() {
            eprintln!("{name} bench: panicked; continuing with the next family");
        }
    }
    if ctx.sidecar.borrow().path().exists() {
        eprintln!("bench records: {}", ctx.sidecar.borrow().path().display());
    }
}

criterion_group!(
    name = kernels;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = all
);
criterion_main!(kernels);
