//! The SIMT emulator's own speed (a reference figure, not a timed test): a 256³ tiled f32 matmul
//! (16×16 tiles, 256-thread blocks, two __syncthreads per tile: 256 blocks × 256 fibers × 32
//! barriers) per schedule, and a 256³ mma.sync GEMM. Throughput is in multiply-adds (m·n·k) per
//! second. A prototype reached ~60 ms for the matmul on one core. Host only (skipped with
//! `LK_BENCH_ONLY_CUDA=1`).

use criterion::Criterion;
use lora_kernels::ffi::sys;
use lora_kernels::{f16, Emu, Schedule};

use crate::common::{Case, Ctx, Per};

const N: usize = 256;

fn matmul(a: &[f32], b: &[f32], c: &mut [f32]) -> crate::common::BenchResult {
    let p = sys::LkSelftestMatmulParams {
        a: a.as_ptr(),
        b: b.as_ptr(),
        c: c.as_mut_ptr(),
        m: N as i32,
        n: N as i32,
        k: N as i32,
    };
    // SAFETY: a, b, c are N×N host buffers, as the params state.
    let rc = unsafe { sys::lk_emu_selftest_matmul(&p, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!("lk_emu_selftest_matmul returned {rc}").into());
    }
    Ok(())
}

fn mma(a: &[f16], b: &[f16], c: &mut [f32]) -> crate::common::BenchResult {
    let p = sys::LkSelftestMmaGemmParams {
        a: a.as_ptr().cast(),
        b: b.as_ptr().cast(),
        c: c.as_mut_ptr(),
        m: N as i32,
        n: N as i32,
        k: N as i32,
        dtype: sys::LkDtype::LK_F16 as i32,
        narrow: 0,
    };
    // SAFETY: a, b are N×N f16 and c N×N f32 host buffers, as the params state.
    let rc = unsafe { sys::lk_emu_selftest_mma_gemm(&p, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!("lk_emu_selftest_mma_gemm returned {rc}").into());
    }
    Ok(())
}

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    if !ctx.host {
        eprintln!("emu bench: skipped (LK_BENCH_ONLY_CUDA=1); it measures the CPU emulator, no CUDA device involved");
        return;
    }
    let mut grp = ctx.group(c, "emu/selftest".into());
    let a: Vec<f32> = (0..N * N).map(|i| ((i % 13) as f32 - 6.0) / 8.0).collect();
    let b: Vec<f32> = (0..N * N).map(|i| ((i % 7) as f32 - 3.0) / 4.0).collect();
    let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
    let b16: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
    let mut out = vec![0.0f32; N * N];
    let case = Case::default().per(Per::Elements((N * N * N) as u64));
    for (name, schedule) in [
        ("fwd", Schedule::Forward),
        ("rev", Schedule::Reverse),
        ("rand", Schedule::Random(1)),
    ] {
        Emu::with_schedule(schedule, || {
            grp.run(
                &Emu,
                &format!("tiled_matmul_f32_256/{name}"),
                &case,
                1,
                |_| matmul(&a, &b, &mut out),
            );
        });
    }
    Emu::with_schedule(Schedule::Forward, || {
        grp.run(&Emu, "mma_gemm_f16_256/fwd", &case, 1, |_| {
            mma(&a16, &b16, &mut out)
        });
    });
    grp.finish();
}
