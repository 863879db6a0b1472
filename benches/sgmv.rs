//! SGMV prefill (planner, shrink, expand) at Llama-3-8B's fused qkv (4096 → 4096/1024/1024),
//! rank 16, 512–8192 tokens over 8 adapters (uniform). Throughput = minimum bytes (the adapters'
//! weights once + activations); these GEMMs are tall-skinny, so bytes bound them too.
//! Without a GPU: cpu and emu at a small shape, and a note.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_kernels::adapter::ExpandMode;
use lora_kernels::sgmv::{Sgmv, SgmvPlan};
use lora_kernels::{f16, Backend, Cpu, Emu};

include!("common/serving.rs");
use serving_common::*;

fn bench_on<B: Backend>(c: &mut Criterion, b: &B, d_in: usize, widths: &[usize], sizes: &[usize]) {
    let n_adapters = 8;
    let layer = layer(b, d_in, widths, 16, n_adapters);
    let table = layer.table(b);
    let mut group = c.benchmark_group(format!("sgmv_f16_r16/{}", b.name()));
    for &tokens in sizes {
        let ids: Vec<i32> = (0..tokens)
            .map(|t| ((t * 7919) % n_adapters) as i32)
            .collect();
        let ids = b.upload(&ids).unwrap();
        let x = b.upload(&vec![f16::from_f32(0.5); tokens * d_in]).unwrap();
        let mut u = b.alloc::<f32>(widths.len() * tokens * 16).unwrap();
        let mut out = b.alloc::<f16>(tokens * layer.out_width()).unwrap();
        let mut plan = SgmvPlan::alloc(b, tokens, n_adapters).unwrap();
        let mut pws = b
            .alloc::<u8>(plan.plan_workspace_bytes(b, &ids, n_adapters))
            .unwrap();
        plan.plan(b, &ids, n_adapters, &mut pws, None).unwrap();
        let id = format!("d{d_in}_t{tokens}");
        group.throughput(Throughput::Elements(tokens as u64));
        group.bench_function(BenchmarkId::new("plan", &id), |bench| {
            bench.iter(|| {
                plan.plan(b, &ids, n_adapters, &mut pws, None).unwrap();
                b.synchronize().unwrap();
            })
        });
        let batch = Sgmv::new(&table, &plan);
        let width = layer.out_width();
        let mut ws = b
            .alloc::<u8>(
                batch
                    .shrink_workspace_bytes::<f16>(b, d_in)
                    .max(batch.expand_workspace_bytes::<f16>(b, width, ExpandMode::Add)),
            )
            .unwrap();
        group.throughput(Throughput::Bytes(layer.bytes(tokens, n_adapters, true)));
        group.bench_function(BenchmarkId::new("shrink", &id), |bench| {
            bench.iter(|| {
                batch.shrink(b, &x, d_in, &mut u, &mut ws, None).unwrap();
                b.synchronize().unwrap();
            })
        });
        group.throughput(Throughput::Bytes(layer.bytes(tokens, n_adapters, false)));
        group.bench_function(BenchmarkId::new("expand", &id), |bench| {
            bench.iter(|| {
                batch
                    .expand(b, &u, &mut out, width, ExpandMode::Add, &mut ws, None)
                    .unwrap();
                b.synchronize().unwrap();
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    if host_backends() {
        bench_on(c, &Cpu, 256, &[256, 64, 64], &[32]);
        bench_on(c, &Emu, 256, &[256, 64, 64], &[32]);
    }
    #[cfg(feature = "cuda")]
    match lora_kernels::Cuda::new(0) {
        Ok(dev) => bench_on(c, &dev, 4096, &[4096, 1024, 1024], &[512, 2048, 8192]),
        Err(e) => {
            eprintln!("sgmv bench: {e}: GPU figures need `--features cuda` and a CUDA device")
        }
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("sgmv bench: built without `--features cuda`: GPU figures need it and a CUDA device");
}

criterion_group!(name = group; config = Criterion::default().sample_size(10); targets = benches);
criterion_main!(group);
