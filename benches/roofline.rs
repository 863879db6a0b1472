//! The ceilings every other case is judged against. They are measured once per run, before any
//! case, by `common::gpu::Gpu::new` (and printed, and recorded in the sidecar as `ceilings/cuda`);
//! this family times them again as ordinary criterion cases so that they appear in the results:
//! - `copy_d2d_256MiB`: device-to-device copy (bytes = read + write; H200 HBM3e peak 4.8 TB/s);
//! - `launch_and_sync`: one empty launch + stream synchronize, host clock (the floor of an eager
//!   decode step that waits for its result);
//! - `graph_node`: one empty kernel inside a CUDA-graph replay (the floor of a captured kernel);
//! - `cublas_gemm_{f16,bf16,f32}_8192`: cuBLAS `GemmEx` 8192³ on random data (FLOPs; f32 is
//!   FP32 FMA, no TF32): the tensor-core and CUDA-core rooflines.
//!
//! Without a GPU this only says that the ceilings need `--features cuda` and a device.

use criterion::Criterion;

use crate::common::Ctx;

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &ctx.gpu {
        gpu_cases(c, ctx, gpu);
        return;
    }
    let _ = c;
    ctx.say_no_gpu("roofline");
}

#[cfg(feature = "cuda")]
fn gpu_cases(c: &mut Criterion, ctx: &Ctx, gpu: &crate::common::gpu::Gpu) {
    use crate::common::gpu::RowGemm;
    use crate::common::{vals, Case, Compute, Per};
    use lora_kernels::ffi::sys;
    use lora_kernels::{bf16, f16, Backend, DType};

    let dev = &gpu.dev;
    let mut grp = ctx.group(c, "roofline/cuda".into());
    if grp.selected("copy_d2d_256MiB") {
        let n = 64usize << 20;
        let src = dev.alloc::<f32>(n).expect("alloc");
        let mut dst = dev.alloc::<f32>(n).expect("alloc");
        let stream = dev.stream().clone();
        grp.run(
            dev,
            "copy_d2d_256MiB",
            &Case::bytes((2 * n * 4) as u64),
            1,
            |_| {
                stream.memcpy_dtod(&src, &mut dst)?;
                Ok(())
            },
        );
    }
    if grp.selected("launch_and_sync") {
        let mut count = dev.alloc::<u32>(1).expect("alloc");
        let p = sys::LkSelftestLaunchConfigParams {
            count: dev.raw_ptr_mut(&mut count).cast(),
            grid: [1, 1, 1],
            block: [32, 1, 1],
            smem_bytes: 0,
            raise_smem_limit: 0,
        };
        grp.g.throughput(criterion::Throughput::Elements(1));
        grp.g.bench_function("launch_and_sync", |b| {
            b.iter(|| {
                dev.prepare_launch().expect("context");
                // SAFETY: `count` is a live device u32, as the params state.
                assert_eq!(
                    unsafe { sys::lk_cuda_selftest_launch_config(&p, dev.raw_stream()) },
                    0
                );
                dev.synchronize().expect("synchronize");
            })
        });
    }
    if let Some(k) = &gpu.kernels {
        grp.run(
            dev,
            "graph_node",
            &Case::default().per(Per::Elements(1)),
            1,
            |_| k.empty(),
        );
    }
    if let Some(blas) = &gpu.blas {
        let m = 8192usize;
        let flops = (2 * m * m * m) as u64;
        for (dt, compute) in [
            (DType::F16, Compute::TensorF16),
            (DType::BF16, Compute::TensorBf16),
            (DType::F32, Compute::Fma),
        ] {
            let name = format!("cublas_gemm_{}_8192", dt.name());
            if !grp.selected(&name) {
                continue;
            }
            let bytes = (3 * m * m * dt.size_bytes()) as u64;
            let case = Case::bytes(bytes).flops(flops, compute).per(Per::Flops);
            let g = RowGemm::nt(dt, m, m, m);
            macro_rules! run {
                ($t:ty) => {{
                    let a = dev.upload(&vals::<$t>(m * m, 1, 1.0)).expect("upload");
                    let b = dev.upload(&vals::<$t>(m * m, 2, 1.0)).expect("upload");
                    let mut cm = dev.alloc::<$t>(m * m).expect("alloc");
                    let (pa, pb, pc) = (
                        dev.raw_ptr(&a) as u64,
                        dev.raw_ptr(&b) as u64,
                        dev.raw_ptr_mut(&mut cm) as u64,
                    );
                    // SAFETY: three m×m matrices of the GEMM's dtype.
                    grp.run(dev, &name, &case, 1, |_| unsafe {
                        blas.gemm(&g, pa, pb, pc)
                    });
                }};
            }
            match dt {
                DType::F16 => run!(f16),
                DType::BF16 => run!(bf16),
                _ => run!(f32),
            }
        }
    }
    grp.finish();
}
