//! BGMV decode (shrink and expand) at Llama-3-8B's fused qkv (4096 → 4096/1024/1024), rank 16,
//! batches of 1–256 tokens with all-distinct adapters (the memory-bound worst case: every token
//! reads its own A and B). Throughput = minimum bytes (distinct adapters' weights once + activations),
//! so criterion's GB/s compares with the copy bandwidth (H200 HBM3e peak 4.8 TB/s).
//! Without a GPU: cpu and emu at a small shape (the emulator's speed), and a note.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_kernels::adapter::ExpandMode;
use lora_kernels::bgmv::Bgmv;
use lora_kernels::{f16, Backend, Cpu, Emu};

include!("common/serving.rs");
use serving_common::*;

fn bench_on<B: Backend>(
    c: &mut Criterion,
    b: &B,
    d_in: usize,
    widths: &[usize],
    batches: &[usize],
) {
    let max_t = *batches.iter().max().unwrap();
    let layer = layer(b, d_in, widths, 16, max_t);
    let table = layer.table(b);
    let mut group = c.benchmark_group(format!("bgmv_f16_r16/{}", b.name()));
    for &tokens in batches {
        let ids: Vec<i32> = (0..tokens as i32).collect();
        let ids = b.upload(&ids).unwrap();
        let x = b.upload(&vec![f16::from_f32(0.5); tokens * d_in]).unwrap();
        let mut u = b.alloc::<f32>(widths.len() * tokens * 16).unwrap();
        let mut out = b.alloc::<f16>(tokens * layer.out_width()).unwrap();
        let batch = Bgmv::new(b, &table, &ids, tokens).unwrap();
        let id = format!("d{d_in}_t{tokens}");
        group.throughput(Throughput::Bytes(layer.bytes(tokens, tokens, true)));
        group.bench_function(BenchmarkId::new("shrink", &id), |bench| {
            bench.iter(|| {
                batch.shrink(b, &x, d_in, &mut u, None).unwrap();
                b.synchronize().unwrap();
            })
        });
        group.throughput(Throughput::Bytes(layer.bytes(tokens, tokens, false)));
        group.bench_function(BenchmarkId::new("expand", &id), |bench| {
            bench.iter(|| {
                batch
                    .expand(b, &u, &mut out, layer.out_width(), ExpandMode::Add, None)
                    .unwrap();
                b.synchronize().unwrap();
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    if host_backends() {
        bench_on(c, &Cpu, 512, &[512, 128, 128], &[4]);
        bench_on(c, &Emu, 512, &[512, 128, 128], &[4]);
    }
    #[cfg(feature = "cuda")]
    match lora_kernels::Cuda::new(0) {
        Ok(dev) => bench_on(c, &dev, 4096, &[4096, 1024, 1024], &[1, 16, 64, 256]),
        Err(e) => {
            eprintln!("bgmv bench: {e}: GPU figures need `--features cuda` and a CUDA device")
        }
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("bgmv bench: built without `--features cuda`: GPU figures need it and a CUDA device");
}

criterion_group!(name = group; config = Criterion::default().sample_size(10); targets = benches);
criterion_main!(group);
