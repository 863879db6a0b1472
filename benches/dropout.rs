//! Fused dropout-shrink vs plain shrink (the target: ≤ 5 % overhead on the GPU), and the standalone
//! dropout forward. Bytes = x + A + u for the shrinks, x + y for the standalone kernel.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_kernels::dropout::{dropout_forward, shrink_dense_dropout, Dropout, DropoutShape};
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{f16, Backend, Cpu, Emu};

fn bench_on<B: Backend>(c: &mut Criterion, b: &B, tokens: usize, d_in: usize, rank: usize) {
    let s = ShrinkDense::new(tokens, d_in, rank);
    let x = b.upload(&vec![f16::from_f32(0.5); tokens * d_in]).unwrap();
    let a = b.upload(&vec![f16::from_f32(0.25); rank * d_in]).unwrap();
    let mut u = b.alloc::<f32>(tokens * rank).unwrap();
    let mut y = b.alloc::<f16>(tokens * d_in).unwrap();
    let drop = Dropout::new(0.1, 42, 7).unwrap();
    let id = format!("t{tokens}_d{d_in}_r{rank}");
    let mut group = c.benchmark_group(format!("dropout_f16/{}", b.name()));
    group.throughput(Throughput::Bytes(
        ((tokens * d_in + rank * d_in) * 2 + tokens * rank * 4) as u64,
    ));
    group.bench_function(BenchmarkId::new("shrink_plain", &id), |bench| {
        bench.iter(|| {
            shrink_dense(b, &x, &a, &mut u, &s).unwrap();
            b.synchronize().unwrap();
        })
    });
    group.bench_function(
        BenchmarkId::new("shrink_fused_dropout_p0.1", &id),
        |bench| {
            bench.iter(|| {
                shrink_dense_dropout(b, &drop, &x, &a, &mut u, &s, 0).unwrap();
                b.synchronize().unwrap();
            })
        },
    );
    group.throughput(Throughput::Bytes((2 * tokens * d_in * 2) as u64));
    group.bench_function(BenchmarkId::new("forward_p0.1", &id), |bench| {
        bench.iter(|| {
            dropout_forward(b, &drop, &x, &mut y, &DropoutShape::new(tokens, d_in)).unwrap();
            b.synchronize().unwrap();
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    if std::env::var("LK_BENCH_ONLY_CUDA").map_or(true, |v| v != "1") {
        bench_on(c, &Cpu, 8, 1024, 16);
        bench_on(c, &Emu, 8, 1024, 16);
    }
    #[cfg(feature = "cuda")]
    match lora_kernels::Cuda::new(0) {
        Ok(dev) => bench_on(c, &dev, 4096, 4096, 16),
        Err(e) => {
            eprintln!("dropout bench: {e}: GPU figures need `--features cuda` and a CUDA device")
        }
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!(
        "dropout bench: built without `--features cuda`: GPU figures need it and a CUDA device"
    );
}

criterion_group!(name = group; config = Criterion::default().sample_size(10); targets = benches);
criterion_main!(group);
