//! The ceilings every other bench is judged against, measured once per run on the GPU:
//! - device-to-device copy bandwidth (bytes = read + write): the memory roofline of BGMV, merge and
//!   the other bandwidth-bound kernels (H200 HBM3e peak: 4.8 TB/s);
//! - the empty-launch latency floor (a one-block launch plus stream synchronize): the floor for small
//!   decode batches;
//! - cuBLAS f16 GEMM throughput (throughput in elements = FLOPs): the tensor-core roofline SGMV and the
//!   block's GEMM are compared with (the "cuBLAS GEMM per adapter" baseline at its best case).
//!
//! Without a GPU this prints that the ceilings need `--features cuda` and a device.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[cfg(feature = "cuda")]
fn ceilings(c: &mut Criterion, dev: &lora_kernels::Cuda) {
    use lora_kernels::cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
    use lora_kernels::ffi::sys;
    use lora_kernels::{f16, Backend};
    let stream = dev.stream().clone();
    let mut group = c.benchmark_group("roofline/cuda");

    let n = 64 << 20; // 256 MiB of f32: far beyond L2 (H200: 60 MiB)
    let src = dev.alloc::<f32>(n).unwrap();
    let mut dst = dev.alloc::<f32>(n).unwrap();
    group.throughput(Throughput::Bytes((2 * n * 4) as u64));
    group.bench_function("copy_d2d_256MiB", |b| {
        b.iter(|| {
            stream.memcpy_dtod(&src, &mut dst).unwrap();
            stream.synchronize().unwrap();
        })
    });

    let mut count = dev.alloc::<u32>(1).unwrap();
    let p = sys::LkSelftestLaunchConfigParams {
        count: dev.raw_ptr_mut(&mut count).cast(),
        grid: [1, 1, 1],
        block: [32, 1, 1],
        smem_bytes: 0,
        raise_smem_limit: 0,
    };
    group.throughput(Throughput::Elements(1));
    group.bench_function("launch_and_sync_floor", |b| {
        b.iter(|| {
            // SAFETY: `count` is a live device u32, as the params state.
            assert_eq!(
                unsafe { sys::lk_cuda_selftest_launch_config(&p, dev.raw_stream()) },
                0
            );
            dev.synchronize().unwrap();
        })
    });

    // SAFETY: only probes for the library; cudarc would panic on first use without it.
    if unsafe { lora_kernels::cudarc::cublas::sys::is_culib_present() } {
        let blas = CudaBlas::new(stream.clone()).unwrap();
        let m = 8192;
        let a = dev.upload(&vec![f16::from_f32(0.01); m * m]).unwrap();
        let bm = dev.upload(&vec![f16::from_f32(0.02); m * m]).unwrap();
        let mut cm = dev.alloc::<f16>(m * m).unwrap();
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: m as i32,
            n: m as i32,
            k: m as i32,
            alpha: f16::ONE,
            lda: m as i32,
            ldb: m as i32,
            beta: f16::ZERO,
            ldc: m as i32,
        };
        group.throughput(Throughput::Elements((2 * m * m * m) as u64));
        group.bench_function("cublas_hgemm_8192", |b| {
            b.iter(|| {
                // SAFETY: a, b, c are m×m device matrices matching cfg.
                unsafe { blas.gemm(cfg, &a, &bm, &mut cm) }.unwrap();
                stream.synchronize().unwrap();
            })
        });
    } else {
        eprintln!("roofline: libcublas not found: no tensor-core ceiling (install nvidia-cublas)");
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "cuda")]
    match lora_kernels::Cuda::new(0) {
        Ok(dev) => ceilings(c, &dev),
        Err(e) => {
            eprintln!("roofline bench: {e}: the ceilings need `--features cuda` and a CUDA device")
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = c;
        eprintln!("roofline bench: built without `--features cuda`: the ceilings need it and a CUDA device");
    }
}

criterion_group!(name = group; config = Criterion::default().sample_size(10); targets = benches);
criterion_main!(group);
