//! In-place merge and unmerge of `scale·B·A` into W (default mode). Memory-bound: W is read and
//! written once (bytes = 2·|W| + |A| + |B|); the target on the H200 is ≥ 85 % of the copy bandwidth.
//! Llama-7B q_proj shape (4096 × 4096, f16) at rank 16 on the GPU; a small shape on cpu and emu.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_kernels::merge::{merge, unmerge, Lora, MergeShape};
use lora_kernels::{f16, Backend, Cpu, Emu};

fn bench_on<B: Backend>(c: &mut Criterion, b: &B, d_out: usize, d_in: usize, rank: usize) {
    let shape = MergeShape::new(d_out, d_in);
    let mut w = b.upload(&vec![f16::from_f32(0.01); d_out * d_in]).unwrap();
    let a = b.upload(&vec![f16::from_f32(0.001); rank * d_in]).unwrap();
    let bb = b.upload(&vec![f16::from_f32(0.002); d_out * rank]).unwrap();
    let lora = Lora::packed(&a, &bb, rank, d_in, 2.0);
    let bytes = (2 * d_out * d_in + rank * (d_in + d_out)) * 2;
    let mut group = c.benchmark_group(format!("merge_f16/{}", b.name()));
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(
        BenchmarkId::new("merge_then_unmerge", format!("{d_out}x{d_in}_r{rank}")),
        |bench| {
            bench.iter(|| {
                merge(b, &mut w, &shape, &lora).unwrap();
                unmerge(b, &mut w, &shape, &lora).unwrap();
                b.synchronize().unwrap();
            })
        },
    );
    group.finish();
}

fn benches(c: &mut Criterion) {
    if std::env::var("LK_BENCH_ONLY_CUDA").map_or(true, |v| v != "1") {
        bench_on(c, &Cpu, 256, 256, 16);
        bench_on(c, &Emu, 256, 256, 16);
    }
    #[cfg(feature = "cuda")]
    match lora_kernels::Cuda::new(0) {
        Ok(dev) => bench_on(c, &dev, 4096, 4096, 16),
        Err(e) => {
            eprintln!("merge bench: {e}: GPU figures need `--features cuda` and a CUDA device")
        }
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!(
        "merge bench: built without `--features cuda`: GPU figures need it and a CUDA device"
    );
}

criterion_group!(name = group; config = Criterion::default().sample_size(10); targets = benches);
criterion_main!(group);
