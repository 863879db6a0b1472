//! Dense shrink throughput. Bytes moved = x + A + u (the minimum a shrink must touch), so criterion
//! prints GB/s; on the GPU compare with the copy bandwidth (H200 HBM3e: 4.8 TB/s peak).
//!
//! Without a GPU (or without `--features cuda`) this runs the cpu reference and the emulator at
//! small shapes — useful to track the emulator's speed — and says that GPU figures need both.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{f16, Backend, Cpu, Emu};

fn bytes(s: &ShrinkDense, elem: usize) -> u64 {
    ((s.tokens * s.d_in + s.rank * s.d_in) * elem + s.tokens * s.rank * 4) as u64
}

fn bench_on<B: Backend>(c: &mut Criterion, b: &B, shapes: &[ShrinkDense]) {
    let mut group = c.benchmark_group(format!("shrink_dense_f16/{}", b.name()));
    for s in shapes {
        let x: Vec<f16> = (0..s.tokens * s.d_in)
            .map(|i| f16::from_f64(((i % 97) as f64 - 48.0) / 64.0))
            .collect();
        let a: Vec<f16> = (0..s.rank * s.d_in)
            .map(|i| f16::from_f64(((i % 89) as f64 - 44.0) / 64.0))
            .collect();
        let xb = b.upload(&x).unwrap();
        let ab = b.upload(&a).unwrap();
        let mut ub = b.alloc::<f32>(s.tokens * s.rank).unwrap();
        group.throughput(Throughput::Bytes(bytes(s, 2)));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("t{}_d{}_r{}", s.tokens, s.d_in, s.rank)),
            s,
            |bench, s| {
                bench.iter(|| {
                    shrink_dense(b, &xb, &ab, &mut ub, s).unwrap();
                    b.synchronize().unwrap();
                })
            },
        );
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    // LK_BENCH_ONLY_CUDA=1 (the GPU kit) skips the host backends.
    if std::env::var("LK_BENCH_ONLY_CUDA").map_or(true, |v| v != "1") {
        let host_shapes = [
            ShrinkDense::new(1, 4096, 16),
            ShrinkDense::new(16, 4096, 16),
        ];
        bench_on(c, &Cpu, &host_shapes);
        bench_on(c, &Emu, &host_shapes);
    }
    #[cfg(feature = "cuda")]
    match lora_kernels::Cuda::new(0) {
        Ok(dev) => {
            let gpu_shapes = [
                ShrinkDense::new(1, 4096, 16),
                ShrinkDense::new(64, 4096, 16),
                ShrinkDense::new(256, 4096, 64),
                ShrinkDense::new(4096, 4096, 16),
            ];
            bench_on(c, &dev, &gpu_shapes);
        }
        Err(e) => {
            eprintln!("shrink bench: {e}: GPU figures need `--features cuda` and a CUDA device")
        }
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!(
        "shrink bench: built without `--features cuda`: GPU figures need it and a CUDA device"
    );
}

criterion_group!(name = group; config = Criterion::default().sample_size(10); targets = benches);
criterion_main!(group);
