//! GPU tests: one binary with a custom harness (libtest-mimic), so that on a machine without a GPU
//! every test is reported as *ignored, "no CUDA device"* at run time — never as passed — and on a
//! machine with one, plain `cargo test --features cuda` runs them all.

/// The reference block's kernel families (issue #7): one file per family under tests/gpu_block/.
#[path = "gpu_block/mod.rs"]
mod block;
mod common;

use common::gpu::{check, err};
use common::selftest::*;
use common::serving::*;
use common::*;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use lora_kernels::adapter::{AdapterTableBuilder, LoraWeights, Slice};
use lora_kernels::backward::{
    backward_dense, backward_dense_workspace_bytes, BackwardDense, BackwardSgmv, DenseGrads,
    DenseInputs, Dropout as BackwardDropout, GradMode, GradTableBuilder, SgmvInputs, SgmvOutputs,
};
use lora_kernels::dropout::{
    dropout_backward, dropout_forward, shrink_dense_dropout, Dropout, DropoutShape,
};
use lora_kernels::merge::{
    self, merge_exact, merge_safe, status as merge_status, unmerge_exact, Direction, HostRecord,
    Lora, MergeFloat, MergeRecord, MergeScratch, MergeShape,
};
use lora_kernels::sgmv::SgmvPlan;
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, DType, Emu, Error, Float};

pub(crate) type GpuTest = fn(&Cuda) -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let probe = Cuda::new(0);
    match &probe {
        Ok(dev) => eprintln!(
            "gpu tests: running on {}",
            dev.device_name().unwrap_or_else(|e| e.to_string())
        ),
        Err(e) => eprintln!("gpu tests: {e}; every GPU test is ignored"),
    }
    let available = probe.is_ok();
    drop(probe);
    let tests: &[(&str, GpuTest)] = &[
        (
            "shrink_dense_f32_matches_cpu",
            shrink_matches_cpu::<f32, f32>,
        ),
        (
            "shrink_dense_f16_matches_cpu",
            shrink_matches_cpu::<f16, f16>,
        ),
        (
            "shrink_dense_bf16_matches_cpu",
            shrink_matches_cpu::<bf16, bf16>,
        ),
        (
            "shrink_dense_f32_x_f16_w_matches_cpu",
            shrink_matches_cpu::<f32, f16>,
        ),
        (
            "shrink_dense_bit_identical_to_emu",
            shrink_bit_identical_to_emu,
        ),
        ("shrink_dense_deterministic", shrink_deterministic),
        ("shrink_dense_rejects_bad_input", shrink_rejects_bad_input),
        ("emu_golden_warp_ops_bit_exact", golden_warp_ops),
        ("emu_golden_reduce", golden_reduce),
        ("emu_golden_matmul", golden_matmul),
        ("emu_golden_mma_gemm_f16", golden_mma::<f16>),
        ("emu_golden_mma_gemm_bf16", golden_mma::<bf16>),
        ("launch_error_is_reported", launch_error_is_reported),
        ("bgmv_f16_llama3_qkv", |d| {
            bgmv_case::<f16, f16, f16>(d, 4096, &[4096, 1024, 1024], 64, 1)
        }),
        ("bgmv_bf16_odd_sizes", |d| {
            bgmv_case::<bf16, bf16, bf16>(d, 4097, &[17, 3, 127], 33, 2)
        }),
        ("bgmv_f32", |d| {
            bgmv_case::<f32, f32, f32>(d, 1031, &[515, 100], 256, 3)
        }),
        ("bgmv_f32_x_f16_w_f32_out", |d| {
            bgmv_case::<f32, f16, f32>(d, 4096, &[1024], 17, 4)
        }),
        ("sgmv_f16_llama3_qkv_prefill", |d| {
            sgmv_case::<f16, f16, f16>(d, 4096, &[4096, 1024, 1024], 512, 5)
        }),
        ("sgmv_bf16_odd_sizes", |d| {
            sgmv_case::<bf16, bf16, bf16>(d, 4097, &[17, 3, 127], 300, 6)
        }),
        ("sgmv_f32", |d| {
            sgmv_case::<f32, f32, f32>(d, 515, &[257], 129, 7)
        }),
        ("sgmv_f32_x_bf16_w_bf16_out", |d| {
            sgmv_case::<f32, bf16, bf16>(d, 2048, &[512, 256], 200, 8)
        }),
        ("serving_cuda_graph_replay_bit_identical", cuda_graph_replay),
        (
            "dropout_f32_bits_cuda_eq_emu_eq_cpu",
            dropout_bits_match::<f32>,
        ),
        (
            "dropout_f16_bits_cuda_eq_emu_eq_cpu",
            dropout_bits_match::<f16>,
        ),
        (
            "dropout_bf16_bits_cuda_eq_emu_eq_cpu",
            dropout_bits_match::<bf16>,
        ),
        ("dropout_large_mask_and_keep_rate", dropout_large_mask),
        (
            "dropout_shrink_f16_matches_cpu_and_emu",
            dropout_shrink_case::<f16, f16>,
        ),
        (
            "dropout_shrink_bf16_matches_cpu_and_emu",
            dropout_shrink_case::<bf16, bf16>,
        ),
        (
            "dropout_shrink_f32_matches_cpu_and_emu",
            dropout_shrink_case::<f32, f32>,
        ),
        (
            "dropout_shrink_f32_x_f16_w_matches_cpu_and_emu",
            dropout_shrink_case::<f32, f16>,
        ),
        (
            "backward_dense_f32_matches_cpu",
            backward_dense_matches_cpu::<f32, f32>,
        ),
        (
            "backward_dense_f16_matches_cpu",
            backward_dense_matches_cpu::<f16, f16>,
        ),
        (
            "backward_dense_bf16_matches_cpu",
            backward_dense_matches_cpu::<bf16, bf16>,
        ),
        (
            "backward_dense_f32_act_bf16_w_matches_cpu",
            backward_dense_matches_cpu::<f32, bf16>,
        ),
        (
            "backward_dense_bit_identical_to_emu",
            backward_dense_bit_identical_to_emu,
        ),
        ("backward_dense_deterministic", backward_dense_deterministic),
        (
            "backward_sgmv_f16_matches_cpu",
            backward_sgmv_matches_cpu::<f16>,
        ),
        (
            "backward_sgmv_bf16_matches_cpu",
            backward_sgmv_matches_cpu::<bf16>,
        ),
        ("backward_rejects_bad_input", backward_rejects_bad_input),
        ("merge_f16_llama_bits_equal_cpu", |d| {
            merge_case::<f16, f16>(d, MergeShape::new(4096, 4096), 16, 31)
        }),
        ("merge_bf16_odd_bits_equal_cpu", |d| {
            merge_case::<bf16, bf16>(d, MergeShape::new(4097, 1031), 33, 32)
        }),
        ("merge_f32_fan_in_fan_out_rank256_bits_equal_cpu", |d| {
            merge_case::<f32, f32>(d, MergeShape::fan_in_fan_out(1031, 515), 256, 33)
        }),
        ("merge_bf16_w_f32_adapters_bits_equal_cpu", |d| {
            merge_case::<bf16, f32>(d, MergeShape::new(1024, 4096), 64, 34)
        }),
        ("merge_safe_refuses_non_finite", merge_safe_refuses),
    ];
    let trials = tests
        .iter()
        .copied()
        .chain(block::tests())
        .map(|(name, f)| {
            Trial::ignorable_test(name, move || {
                if !available {
                    return Ok(Completion::ignored_with("no CUDA device"));
                }
                let dev = Cuda::new(0).map_err(|e| Failed::from(e.to_string()))?;
                f(&dev).map(|()| Completion::Completed)
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn run_shrink<B: Backend, TX: Float, TW: Float>(
    b: &B,
    x: &[TX],
    a: &[TW],
    s: &ShrinkDense,
) -> Result<Vec<f32>, Failed> {
    let xb = b.upload(x).map_err(err)?;
    let ab = b.upload(a).map_err(err)?;
    let mut ub = b.upload(&vec![POISON; s.tokens * s.ld_u]).map_err(err)?;
    shrink_dense(b, &xb, &ab, &mut ub, s).map_err(err)?;
    b.download(&ub).map_err(err)
}

fn shrink_matches_cpu<TX: Float, TW: Float>(dev: &Cuda) -> Result<(), Failed> {
    for (i, &(tokens, d_in, rank)) in [
        (1, 1, 1),
        (3, 17, 5),
        (17, 127, 16),
        (64, 4097, 33),
        (256, 4096, 16),
    ]
    .iter()
    .enumerate()
    {
        let s = ShrinkDense {
            ld_u: rank + 1,
            ..ShrinkDense::new(tokens, d_in, rank)
        };
        let mut r = rng(100 + i as u64);
        let x: Vec<TX> = random_vec(&mut r, tokens * d_in);
        let a: Vec<TW> = random_vec(&mut r, rank * d_in);
        let got = run_shrink(dev, &x, &a, &s)?;
        let want = run_shrink(&Cpu, &x, &a, &s)?;
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            if k % s.ld_u == rank {
                check(g.to_bits() == POISON.to_bits(), || {
                    format!("padding u[{k}] written")
                })?;
                continue;
            }
            let (t, j) = (k / s.ld_u, k % s.ld_u);
            let abs_sum: f64 = (0..d_in)
                .map(|c| (x[t * d_in + c].to_f64() * a[j * d_in + c].to_f64()).abs())
                .sum();
            let tol = dot_tolerance(d_in, 32, 5, abs_sum) + (*w as f64).abs() * f64::powi(2.0, -24);
            check((*g as f64 - *w as f64).abs() <= tol, || {
                format!("u[{t},{j}]: cuda {g}, cpu {w}, tol {tol:e} ({s:?})")
            })?;
        }
    }
    Ok(())
}

/// Same fixed reduction order on both (lane-strided FMA chains + xor butterfly): same bits.
fn shrink_bit_identical_to_emu(dev: &Cuda) -> Result<(), Failed> {
    let s = ShrinkDense::new(7, 1031, 12);
    let mut r = rng(5);
    let x: Vec<bf16> = random_vec(&mut r, 7 * 1031);
    let a: Vec<bf16> = random_vec(&mut r, 12 * 1031);
    let gpu = run_shrink(dev, &x, &a, &s)?;
    let emu = run_shrink(&Emu, &x, &a, &s)?;
    check(
        gpu.iter()
            .map(|v| v.to_bits())
            .eq(emu.iter().map(|v| v.to_bits())),
        || "cuda and emu differ".into(),
    )
}

fn shrink_deterministic(dev: &Cuda) -> Result<(), Failed> {
    let s = ShrinkDense::new(128, 4096, 64);
    let mut r = rng(6);
    let x: Vec<f16> = random_vec(&mut r, 128 * 4096);
    let a: Vec<f16> = random_vec(&mut r, 64 * 4096);
    let first = run_shrink(dev, &x, &a, &s)?;
    for _ in 0..3 {
        check(run_shrink(dev, &x, &a, &s)? == first, || {
            "run-to-run difference".into()
        })?;
    }
    Ok(())
}

fn shrink_rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let x = dev.upload(&[1.0f32; 40]).map_err(err)?;
    let a = dev.upload(&[1.0f32; 29]).map_err(err)?;
    let mut u = dev.upload(&[POISON; 12]).map_err(err)?;
    let e = shrink_dense(dev, &x, &a, &mut u, &ShrinkDense::new(4, 10, 3));
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "a", .. })),
        || format!("expected an error for `a`, got {e:?}"),
    )?;
    let after = dev.download(&u).map_err(err)?;
    check(
        after.iter().all(|v| v.to_bits() == POISON.to_bits()),
        || "output changed on error".into(),
    )
}

// ---- the emulator's golden test: the self-test kernels on the GPU and on the emulator -----------

/// Integer shuffles and votes: GPU = emulator = the PTX-definition reference, bit for bit. This is
/// the hardware check of the emulator's shuffle/vote semantics.
fn golden_warp_ops(dev: &Cuda) -> Result<(), Failed> {
    let (blocks, bt) = (4, 128);
    let mut r = rng(21);
    let input: Vec<i32> = (0..blocks * bt)
        .map(|_| rand::Rng::random_range(&mut r, -(1 << 20)..(1 << 20)))
        .collect();
    let gpu = run_warp_ops(dev, &input, blocks, bt).map_err(err)?;
    let emu = run_warp_ops(&Emu, &input, blocks, bt).map_err(err)?;
    let reference = warp_ops_reference(&input, blocks, bt);
    for (i, ((g, e), w)) in gpu.iter().zip(&emu).zip(&reference).enumerate() {
        let (thread, slot) = (i / WARP_OPS_OUTPUTS, i % WARP_OPS_OUTPUTS);
        check(g == e && g == w, || {
            format!("thread {thread} output {slot}: gpu {g:#x}, emu {e:#x}, reference {w:#x}")
        })?;
    }
    Ok(())
}

fn golden_reduce(dev: &Cuda) -> Result<(), Failed> {
    for (rows, n, bt) in [(3, 1000, 256), (2, 4099, 1024), (4, 33, 32)] {
        let mut r = rng(n as u64);
        let x: Vec<f32> = random_vec(&mut r, rows * n);
        let gpu = run_reduce(dev, &x, rows, n, bt).map_err(err)?;
        let emu = run_reduce(&Emu, &x, rows, n, bt).map_err(err)?;
        // Same order of f32 additions on both (the kernel contains no multiply to contract).
        check(
            gpu.iter()
                .map(|v| v.to_bits())
                .eq(emu.iter().map(|v| v.to_bits())),
            || format!("reduce {rows}x{n}: gpu {gpu:?} emu {emu:?}"),
        )?;
    }
    Ok(())
}

fn golden_matmul(dev: &Cuda) -> Result<(), Failed> {
    let (m, n, k) = (77, 45, 70);
    let mut r = rng(77);
    let a: Vec<f32> = random_vec(&mut r, m * k);
    let b: Vec<f32> = random_vec(&mut r, k * n);
    let gpu = run_matmul(dev, &a, &b, m, n, k).map_err(err)?;
    let emu = run_matmul(&Emu, &a, &b, m, n, k).map_err(err)?;
    for i in 0..m * n {
        let (row, col) = (i / n, i % n);
        let abs: f64 = (0..k)
            .map(|p| (a[row * k + p] as f64 * b[p * n + col] as f64).abs())
            .sum();
        // nvcc may contract the multiply-add into an FMA; the emulator's g++ build does not.
        let tol = 2.0 * dot_tolerance(k, 1, 0, abs);
        check((gpu[i] as f64 - emu[i] as f64).abs() <= tol, || {
            format!("C[{row},{col}]: gpu {} emu {}", gpu[i], emu[i])
        })?;
    }
    Ok(())
}

fn golden_mma<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    let dtype = T::DTYPE.ffi_tag().unwrap();
    for (m, n, k) in [(16, 16, 16), (64, 32, 48), (128, 96, 256)] {
        let mut r = rng((m * 7 + n * 3 + k) as u64);
        let a: Vec<T> = random_vec(&mut r, m * k);
        let b: Vec<T> = random_vec(&mut r, k * n);
        let bits = |v: &[T]| -> Vec<u16> { v.iter().map(|x| half_bits(*x)).collect() };
        for narrow in [false, true] {
            let gpu =
                run_mma_gemm(dev, &bits(&a), &bits(&b), m, n, k, dtype, narrow).map_err(err)?;
            let emu =
                run_mma_gemm(&Emu, &bits(&a), &bits(&b), m, n, k, dtype, narrow).map_err(err)?;
            for i in 0..m * n {
                let (row, col) = (i / n, i % n);
                let abs: f64 = (0..k)
                    .map(|p| (a[row * k + p].to_f64() * b[p * n + col].to_f64()).abs())
                    .sum();
                // Tensor cores round (and may truncate) inside a k-step; allow one f32 rounding per term.
                let tol = dot_tolerance(k, 1, 0, abs);
                check((gpu[i] as f64 - emu[i] as f64).abs() <= tol, || {
                    format!("{} {m}x{n}x{k} narrow {narrow} C[{row},{col}]: gpu {} emu {} (fragment layout?)", T::DTYPE, gpu[i], emu[i])
                })?;
            }
        }
    }
    Ok(())
}

fn half_bits<T: Float>(x: T) -> u16 {
    match T::DTYPE {
        lora_kernels::DType::BF16 => bf16::from_f64(x.to_f64()).to_bits(),
        _ => f16::from_f64(x.to_f64()).to_bits(),
    }
}

/// A launch the GPU refuses (a block of 2048 threads) is a CUDA error code with a message, and the
/// next launch works.
fn launch_error_is_reported(dev: &Cuda) -> Result<(), Failed> {
    let mut count = dev.alloc::<u32>(1).map_err(err)?;
    let mut p = lora_kernels::ffi::sys::LkSelftestLaunchConfigParams {
        count: dev.ptr_mut(&mut count).cast(),
        grid: [1, 1, 1],
        block: [2048, 1, 1],
        smem_bytes: 0,
        raise_smem_limit: 0,
    };
    let code =
        unsafe { lora_kernels::ffi::sys::lk_cuda_selftest_launch_config(&p, Target::stream(dev)) };
    check(code != 0 && code < 10000, || {
        format!("expected a CUDA error code, got {code}")
    })?;
    check(dev.last_error().contains("launch"), || {
        format!("message: {}", dev.last_error())
    })?;
    p.block = [256, 1, 1];
    p.grid = [3, 1, 1];
    let code =
        unsafe { lora_kernels::ffi::sys::lk_cuda_selftest_launch_config(&p, Target::stream(dev)) };
    check(code == 0, || {
        format!("a valid launch after an invalid one failed: {code}")
    })?;
    let n = dev.download(&count).map_err(err)?;
    check(n == [768], || format!("count {n:?}, want 768"))
}

// ---- serving kernels --------------------------------------------------------------------------

fn serving_scenario<TW: Float>(
    d_in: usize,
    widths: &[usize],
    tokens: usize,
    seed: u64,
) -> Scenario {
    let mut r = rng(seed);
    let n_adapters = 12;
    let ids = random_ids(&mut r, tokens, n_adapters, Popularity::Zipf, 0.1);
    Scenario::random::<TW>(&mut r, d_in, widths, n_adapters, &[0, 8, 16, 64, 128], ids)
}

/// Panics inside the shared checkers become test failures.
fn catching(f: impl FnOnce() + std::panic::UnwindSafe) -> Result<(), Failed> {
    std::panic::catch_unwind(f).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
        Failed::from(msg.unwrap_or_else(|| "panic".into()))
    })
}

fn bgmv_case<TX: Float, TW: Float, TO: Float>(
    dev: &Cuda,
    d_in: usize,
    widths: &[usize],
    tokens: usize,
    seed: u64,
) -> Result<(), Failed> {
    let sc = serving_scenario::<TW>(d_in, widths, tokens, seed);
    let dev = std::panic::AssertUnwindSafe(dev);
    catching(move || {
        for mode in [
            lora_kernels::adapter::ExpandMode::Add,
            lora_kernels::adapter::ExpandMode::Overwrite,
        ] {
            let first = run_bgmv::<Cuda, TX, TW, TO>(&dev, &sc, seed, mode);
            let again = run_bgmv::<Cuda, TX, TW, TO>(&dev, &sc, seed, mode);
            assert!(
                first
                    .0
                    .iter()
                    .zip(&again.0)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "bgmv shrink not deterministic"
            );
        }
    })
}

fn sgmv_case<TX: Float, TW: Float, TO: Float>(
    dev: &Cuda,
    d_in: usize,
    widths: &[usize],
    tokens: usize,
    seed: u64,
) -> Result<(), Failed> {
    let sc = serving_scenario::<TW>(d_in, widths, tokens, seed);
    let dev = std::panic::AssertUnwindSafe(dev);
    catching(move || {
        for mode in [
            lora_kernels::adapter::ExpandMode::Add,
            lora_kernels::adapter::ExpandMode::Overwrite,
        ] {
            run_sgmv_planned::<Cuda, TX, TW, TO>(&dev, &sc, seed, mode);
        }
    })
}

/// Planner + SGMV shrink/expand + BGMV shrink/expand captured in one CUDA graph and replayed: the
/// same bits as the eager launches (nothing in a launch syncs, allocates or reads device memory
/// on the host).
fn cuda_graph_replay(dev: &Cuda) -> Result<(), Failed> {
    use lora_kernels::adapter::ExpandMode;
    use lora_kernels::bgmv::Bgmv;
    use lora_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use lora_kernels::cudarc::driver::CudaSlice;
    use lora_kernels::sgmv::{Sgmv, SgmvPlan};
    let (d_in, tokens) = (1024, 96);
    let sc = serving_scenario::<f16>(d_in, &[512, 128], tokens, 9);
    let bufs = sc.upload::<Cuda, f16>(dev);
    let table = sc.table(dev, &bufs);
    let r_cap = table.r_cap();
    let x: Vec<f16> = random_vec(&mut rng(9), tokens * d_in);
    let xb = dev.upload(&x).map_err(err)?;
    let ids = dev.upload(&sc.ids).map_err(err)?;
    let n_adapters = sc.n_adapters;
    let mut plan = SgmvPlan::alloc(dev, tokens, tokens.min(n_adapters)).map_err(err)?;
    let mut plan_ws = dev
        .alloc::<u8>(plan.plan_workspace_bytes(dev, &ids, n_adapters).max(1))
        .map_err(err)?;
    let u_len = 2 * tokens * r_cap;
    let width = sc.out_width;
    let u_s = dev.upload(&vec![0.0f32; u_len]).map_err(err)?;
    let u_b = dev.upload(&vec![0.0f32; u_len]).map_err(err)?;
    let out_s = dev.upload(&vec![f16::ZERO; tokens * width]).map_err(err)?;
    let out_b = dev.upload(&vec![f16::ZERO; tokens * width]).map_err(err)?;
    let errw = dev.upload(&[0u32]).map_err(err)?;
    // Workspace sizes depend only on host-known sizes: query them before capture.
    plan.plan(dev, &ids, n_adapters, &mut plan_ws, None)
        .map_err(err)?;
    let ws_len = {
        let s = Sgmv::new(&table, &plan);
        s.shrink_workspace_bytes::<f16>(dev, d_in)
            .max(s.expand_workspace_bytes::<f16>(dev, width, ExpandMode::Overwrite))
            .max(1)
    };
    let ws = dev.alloc::<u8>(ws_len).map_err(err)?;
    struct State {
        plan_ws: CudaSlice<u8>,
        ws: CudaSlice<u8>,
        u_s: CudaSlice<f32>,
        u_b: CudaSlice<f32>,
        out_s: CudaSlice<f16>,
        out_b: CudaSlice<f16>,
        errw: CudaSlice<u32>,
    }
    let mut st = State {
        plan_ws,
        ws,
        u_s,
        u_b,
        out_s,
        out_b,
        errw,
    };
    let step =
        |dev: &Cuda, plan: &mut SgmvPlan<Cuda>, st: &mut State| -> lora_kernels::Result<()> {
            plan.plan(dev, &ids, n_adapters, &mut st.plan_ws, Some(&mut st.errw))?;
            let s = Sgmv::new(&table, plan);
            s.shrink(dev, &xb, d_in, &mut st.u_s, &mut st.ws, Some(&mut st.errw))?;
            s.expand(
                dev,
                &st.u_s,
                &mut st.out_s,
                width,
                ExpandMode::Overwrite,
                &mut st.ws,
                Some(&mut st.errw),
            )?;
            let bg = Bgmv::new(dev, &table, &ids, tokens)?;
            bg.shrink(dev, &xb, d_in, &mut st.u_b, Some(&mut st.errw))?;
            bg.expand(
                dev,
                &st.u_b,
                &mut st.out_b,
                width,
                ExpandMode::Overwrite,
                Some(&mut st.errw),
            )
        };
    step(dev, &mut plan, &mut st).map_err(err)?;
    let eager = (
        dev.download(&st.out_s).map_err(err)?,
        dev.download(&st.out_b).map_err(err)?,
    );
    dev.write(&mut st.out_s, &vec![f16::NAN; tokens * width])
        .map_err(err)?;
    dev.write(&mut st.out_b, &vec![f16::NAN; tokens * width])
        .map_err(err)?;
    dev.synchronize().map_err(err)?;
    let stream = dev.stream().clone();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| Failed::from(e.to_string()))?;
    let captured = step(dev, &mut plan, &mut st);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .map_err(|e| Failed::from(e.to_string()))?;
    captured.map_err(err)?;
    let graph = graph.ok_or_else(|| Failed::from("empty graph"))?;
    for _ in 0..3 {
        graph.launch().map_err(|e| Failed::from(e.to_string()))?;
    }
    dev.synchronize().map_err(err)?;
    let replay = (
        dev.download(&st.out_s).map_err(err)?,
        dev.download(&st.out_b).map_err(err)?,
    );
    let errw = st.errw;
    let bits = |v: &[f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    check(bits(&eager.0) == bits(&replay.0), || {
        "SGMV: graph replay differs from eager".into()
    })?;
    check(bits(&eager.1) == bits(&replay.1), || {
        "BGMV: graph replay differs from eager".into()
    })?;
    check(dev.download(&errw).map_err(err)?[0] == 0, || {
        "error word set".into()
    })
}

// ---- fused Philox dropout ------------------------------------------------------------------------

fn run_dropout<B: Backend, T: Float>(
    b: &B,
    drop: &Dropout,
    x: &[T],
    s: &DropoutShape,
    backward: bool,
) -> Result<Vec<T>, Failed> {
    let xb = b.upload(x).map_err(err)?;
    let mut yb = b
        .upload(&vec![T::from_f32(POISON); (s.tokens - 1) * s.ld_y + s.d])
        .map_err(err)?;
    if backward {
        dropout_backward(b, drop, &xb, &mut yb, s).map_err(err)?;
    } else {
        dropout_forward(b, drop, &xb, &mut yb, s).map_err(err)?;
    }
    b.download(&yb).map_err(err)
}

/// The mask (and the values: one f32 multiply, one rounding) on cuda == emu == cpu, bit for bit,
/// forward and backward, for p = 0, 1 and in between; e/4 beyond 2^32 (token_base large).
fn dropout_bits_match<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    let s = DropoutShape {
        ld_x: 4101,
        ld_y: 4100,
        token_base: (1 << 33) / 4099 + 3,
        ..DropoutShape::new(67, 4099)
    };
    let mut r = rng(31);
    let x: Vec<T> = random_vec(&mut r, (s.tokens - 1) * s.ld_x + s.d);
    for (i, p) in [0.0, 0.1, 0.5, 0.9, 1.0].into_iter().enumerate() {
        let drop =
            Dropout::new(p, 0xdead_beef_0000_0001 + i as u64, 1 << 40 | i as u64).map_err(err)?;
        for backward in [false, true] {
            let gpu = run_dropout(dev, &drop, &x, &s, backward)?;
            let emu = run_dropout(&Emu, &drop, &x, &s, backward)?;
            let cpu = run_dropout(&Cpu, &drop, &x, &s, backward)?;
            let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            check(bits(&gpu) == bits(&emu), || {
                format!("p {p} backward {backward}: cuda and emu differ")
            })?;
            check(bits(&gpu) == bits(&cpu), || {
                format!("p {p} backward {backward}: cuda and cpu differ")
            })?;
        }
    }
    Ok(())
}

/// A training-sized tensor (4096 × 4096): the cuda mask equals the Rust Philox mask everywhere and
/// the keep rate lies within 6 binomial sigma.
fn dropout_large_mask(dev: &Cuda) -> Result<(), Failed> {
    let s = DropoutShape::new(4096, 4096);
    let drop = Dropout::new(0.1, 2024, 7).map_err(err)?;
    let cfg = drop.config().map_err(err)?;
    let ones = vec![f16::from_f32(1.0); s.tokens * s.d];
    let y = run_dropout(dev, &drop, &ones, &s, false)?;
    let mut kept = 0usize;
    for (e, v) in y.iter().enumerate() {
        let k = v.to_f32() != 0.0;
        kept += k as usize;
        check(k == cfg.keeps(e as u64), || {
            format!("element {e}: cuda mask differs")
        })?;
    }
    let n = (s.tokens * s.d) as f64;
    let (mean, sigma) = (0.9 * n, (n * 0.09).sqrt());
    check((kept as f64 - mean).abs() <= 6.0 * sigma, || {
        format!("kept {kept} of {n}, expected {mean} ± 6·{sigma}")
    })
}

fn run_dropout_shrink<B: Backend, TX: Float, TW: Float>(
    b: &B,
    drop: &Dropout,
    x: &[TX],
    a: &[TW],
    s: &ShrinkDense,
    base: usize,
) -> Result<Vec<f32>, Failed> {
    let xb = b.upload(x).map_err(err)?;
    let ab = b.upload(a).map_err(err)?;
    let mut ub = b.upload(&vec![POISON; s.tokens * s.ld_u]).map_err(err)?;
    shrink_dense_dropout(b, drop, &xb, &ab, &mut ub, s, base).map_err(err)?;
    b.download(&ub).map_err(err)
}

/// Fused shrink on cuda: within the shrink tolerance of the cpu reference, bit-identical to emu
/// (same FMA chains), to shrink_dense on the explicit f32 x̂, and run to run; batch-invariant.
fn dropout_shrink_case<TX: Float, TW: Float>(dev: &Cuda) -> Result<(), Failed> {
    for (i, &(tokens, d_in, rank)) in [
        (1, 1, 1),
        (3, 17, 5),
        (17, 1025, 33),
        (64, 4097, 16),
        (256, 4096, 64),
    ]
    .iter()
    .enumerate()
    {
        let s = ShrinkDense {
            ld_x: d_in + 1,
            ld_u: rank + 1,
            ..ShrinkDense::new(tokens, d_in, rank)
        };
        let base = 1000 * i;
        let drop = Dropout::new(0.1 + 0.1 * i as f64, 55 + i as u64, 3).map_err(err)?;
        let cfg = drop.config().map_err(err)?;
        let mut r = rng(200 + i as u64);
        let x: Vec<TX> = random_vec(&mut r, tokens * s.ld_x);
        let a: Vec<TW> = random_vec(&mut r, rank * d_in);
        let gpu = run_dropout_shrink(dev, &drop, &x, &a, &s, base)?;
        let again = run_dropout_shrink(dev, &drop, &x, &a, &s, base)?;
        let emu = run_dropout_shrink(&Emu, &drop, &x, &a, &s, base)?;
        let cpu = run_dropout_shrink(&Cpu, &drop, &x, &a, &s, base)?;
        let mut xh = vec![0.0f32; x.len()];
        for t in 0..tokens {
            for k in 0..d_in {
                let keep = cfg.keeps(((base + t) * d_in + k) as u64);
                xh[t * s.ld_x + k] = cfg.xhat(x[t * s.ld_x + k], keep) as f32;
            }
        }
        let plain = run_shrink(dev, &xh, &a, &s)?;
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        check(bits(&gpu) == bits(&again), || {
            "run-to-run difference".into()
        })?;
        check(bits(&gpu) == bits(&emu), || {
            format!("{s:?}: cuda and emu differ")
        })?;
        check(bits(&gpu) == bits(&plain), || {
            format!("{s:?}: fused differs from shrink_dense(x̂)")
        })?;
        for (k, (g, w)) in gpu.iter().zip(&cpu).enumerate() {
            let (t, j) = (k / s.ld_u, k % s.ld_u);
            if j == rank {
                check(g.to_bits() == POISON.to_bits(), || {
                    format!("padding u[{k}] written")
                })?;
                continue;
            }
            let abs_sum: f64 = (0..d_in)
                .map(|c| (xh[t * s.ld_x + c] as f64 * a[j * d_in + c].to_f64()).abs())
                .sum();
            let tol = dot_tolerance(d_in, 32, 5, abs_sum) + (*w as f64).abs() * f64::powi(2.0, -24);
            check((*g as f64 - *w as f64).abs() <= tol, || {
                format!("u[{t},{j}]: cuda {g}, cpu {w}, tol {tol:e} ({s:?})")
            })?;
        }
        // Batch invariance: the last token alone, with its original index.
        let t = tokens - 1;
        let alone = run_dropout_shrink(
            dev,
            &drop,
            &x[t * s.ld_x..(t + 1) * s.ld_x],
            &a,
            &ShrinkDense { tokens: 1, ..s },
            base + t,
        )?;
        check(
            bits(&alone) == bits(&gpu[t * s.ld_u..(t + 1) * s.ld_u]),
            || format!("{s:?}: token {t} alone differs"),
        )?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// LoRA backward (tests/backward.rs has the per-element tolerance analysis on the emulator). Here the
// GPU is compared with the cpu reference per output: |cuda − cpu| ≤ u_out·|cpu| + 2⁻¹⁴·max|cpu| —
// f32 accumulation over ≤ 4096 terms of random sign stays far inside 2⁻¹⁴ of the output's scale.

struct BwdOut {
    da: Vec<f32>,
    db: Vec<f32>,
    du: Vec<f32>,
    dx: Vec<f64>,
}

struct BwdData<TX, TW> {
    x: Vec<TX>,
    g: Vec<TX>,
    u: Vec<f32>,
    a: Vec<TW>,
    b: Vec<TW>,
    da: Vec<f32>,
    db: Vec<f32>,
    dx: Vec<TX>,
}

fn bwd_data<TX: Float, TW: Float>(s: &BackwardDense, seed: u64) -> BwdData<TX, TW> {
    let mut r = rng(seed);
    BwdData {
        x: random_vec(&mut r, s.tokens * s.ld_x),
        g: random_vec(&mut r, s.tokens * s.ld_g),
        u: random_vec(&mut r, s.tokens * s.ld_u),
        a: random_vec(&mut r, s.rank * s.lda),
        b: random_vec(&mut r, s.d_out * s.ldb),
        da: random_vec(&mut r, s.rank * s.ld_da),
        db: random_vec(&mut r, s.d_out * s.ld_db),
        dx: random_vec(&mut r, s.tokens * s.ld_dx),
    }
}

fn run_bwd_dense<B: Backend, TX: Float, TW: Float>(
    b: &B,
    s: &BackwardDense,
    d: &BwdData<TX, TW>,
) -> Result<BwdOut, Failed> {
    let up = |v: &[f32]| b.upload(v).map_err(err);
    let (x, g, a, bw) = (
        b.upload(&d.x).map_err(err)?,
        b.upload(&d.g).map_err(err)?,
        b.upload(&d.a).map_err(err)?,
        b.upload(&d.b).map_err(err)?,
    );
    let u = up(&d.u)?;
    let (mut da, mut db, mut du) = (
        up(&d.da)?,
        up(&d.db)?,
        up(&vec![POISON; s.tokens * s.ld_du])?,
    );
    let mut dx = b.upload(&d.dx).map_err(err)?;
    let mut ws = b
        .alloc::<u8>(backward_dense_workspace_bytes(b, s))
        .map_err(err)?;
    backward_dense(
        b,
        s,
        DenseInputs {
            x: &x,
            g: &g,
            u: &u,
            a: &a,
            b: &bw,
        },
        DenseGrads {
            da: &mut da,
            db: &mut db,
            du: &mut du,
            dx: Some(&mut dx),
        },
        &mut ws,
    )
    .map_err(err)?;
    Ok(BwdOut {
        da: b.download(&da).map_err(err)?,
        db: b.download(&db).map_err(err)?,
        du: b.download(&du).map_err(err)?,
        dx: b
            .download(&dx)
            .map_err(err)?
            .iter()
            .map(|v| v.to_f64())
            .collect(),
    })
}

fn compare(name: &str, got: &[f64], want: &[f64], u_out: f64) -> Result<(), Failed> {
    let scale = want
        .iter()
        .filter(|v| !v.is_nan())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            check(g.is_nan(), || {
                format!("{name}[{i}]: cuda wrote {g} over poison")
            })?;
            continue;
        }
        let tol = u_out * w.abs() + f64::powi(2.0, -14) * scale;
        check((g - w).abs() <= tol, || {
            format!("{name}[{i}]: cuda {g}, cpu {w}, tol {tol:e}")
        })?;
    }
    Ok(())
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn unit_out(d: DType) -> f64 {
    match d {
        DType::F16 => f64::powi(2.0, -11),
        DType::BF16 => f64::powi(2.0, -8),
        _ => f64::powi(2.0, -24),
    }
}

fn backward_dense_matches_cpu<TX: Float, TW: Float>(dev: &Cuda) -> Result<(), Failed> {
    for (i, &(t, di, dout, r, acc)) in [
        (1, 1, 1, 1, false),
        (3, 17, 5, 3, true),
        (300, 127, 33, 17, false),
        (1000, 4096, 1024, 16, true),
        (4097, 515, 257, 64, true),
    ]
    .iter()
    .enumerate()
    {
        let mut s = BackwardDense::new(t, di, dout, r, 0.5);
        s.ld_du = r + 1;
        s.mode = if acc {
            GradMode::Accumulate
        } else {
            GradMode::Overwrite
        };
        let d = bwd_data::<TX, TW>(&s, 300 + i as u64);
        let got = run_bwd_dense(dev, &s, &d)?;
        let want = run_bwd_dense(&Cpu, &s, &d)?;
        compare("du", &f64s(&got.du), &f64s(&want.du), 0.0)?;
        compare("dA", &f64s(&got.da), &f64s(&want.da), 0.0)?;
        compare("dB", &f64s(&got.db), &f64s(&want.db), 0.0)?;
        compare("dx", &got.dx, &want.dx, unit_out(TX::DTYPE))?;
    }
    Ok(())
}

/// Same fixed orders and explicit fmaf on both: the same bits.
fn backward_dense_bit_identical_to_emu(dev: &Cuda) -> Result<(), Failed> {
    let mut s = BackwardDense::new(300, 131, 70, 17, 0.5);
    s.mode = GradMode::Accumulate;
    let d = bwd_data::<bf16, bf16>(&s, 7);
    let gpu = run_bwd_dense(dev, &s, &d)?;
    let emu = run_bwd_dense(&Emu, &s, &d)?;
    let same = |a: &[f32], b: &[f32]| {
        a.iter()
            .map(|v| v.to_bits())
            .eq(b.iter().map(|v| v.to_bits()))
    };
    check(same(&gpu.du, &emu.du), || "du: cuda and emu differ".into())?;
    check(same(&gpu.da, &emu.da), || "dA: cuda and emu differ".into())?;
    check(same(&gpu.db, &emu.db), || "dB: cuda and emu differ".into())?;
    check(gpu.dx == emu.dx, || "dx: cuda and emu differ".into())
}

fn backward_dense_deterministic(dev: &Cuda) -> Result<(), Failed> {
    let mut s = BackwardDense::new(8192, 4096, 4096, 16, 2.0);
    s.mode = GradMode::Accumulate;
    let d = bwd_data::<f16, f16>(&s, 8);
    let first = run_bwd_dense(dev, &s, &d)?;
    for _ in 0..2 {
        let again = run_bwd_dense(dev, &s, &d)?;
        check(
            again.da == first.da
                && again.db == first.db
                && again.du == first.du
                && again.dx == first.dx,
            || "run-to-run difference".into(),
        )?;
    }
    Ok(())
}

/// Several adapters (mixed ranks, a −1 segment, an adapter without tokens, a segment longer than one
/// piece) in one launch, two slices.
fn backward_sgmv_matches_cpu<TW: Float>(dev: &Cuda) -> Result<(), Failed> {
    fn run<B: Backend, TW: Float>(b: &B, seed: u64) -> Result<Vec<Vec<f64>>, Failed> {
        let (t, di) = (2000usize, 1031usize);
        let slices = [
            Slice { n: 515, offset: 0 },
            Slice {
                n: 129,
                offset: 515,
            },
        ];
        let ranks = [[16usize, 8], [33, 0], [4, 4], [8, 8]];
        let mut r = rng(seed);
        let w: Vec<Vec<(Vec<TW>, Vec<TW>)>> = ranks
            .iter()
            .map(|rk| {
                (0..2)
                    .map(|s| {
                        (
                            random_vec(&mut r, rk[s] * di),
                            random_vec(&mut r, slices[s].n * rk[s]),
                        )
                    })
                    .collect()
            })
            .collect();
        let dw: Vec<Vec<_>> = w
            .iter()
            .map(|p| {
                p.iter()
                    .map(|(a, bb)| (b.upload(a).unwrap(), b.upload(bb).unwrap()))
                    .collect()
            })
            .collect();
        let mut builder = AdapterTableBuilder::new(4, di, &slices, TW::DTYPE).map_err(err)?;
        for (a, rk) in ranks.iter().enumerate() {
            for s in 0..2 {
                builder
                    .set(
                        b,
                        a,
                        s,
                        &dw[a][s].0,
                        &dw[a][s].1,
                        LoraWeights::packed(rk[s], 0.5 + a as f32, di),
                    )
                    .map_err(err)?;
            }
        }
        let table = builder.build(b).map_err(err)?;
        let mut rows: Vec<i32> = (0..t as i32).collect();
        use rand::seq::SliceRandom;
        rows.shuffle(&mut r);
        // segments: adapter 0: 1200 (5 pieces of 256), −1: 100, adapter 1: 300, adapter 2: 0, adapter 3: 400.
        let starts = [0, 1200, 1300, 1600, 1600, 2000];
        let plan =
            SgmvPlan::from_host(b, Some(&rows), &starts, &[0, -1, 1, 2, 3], 5, t).map_err(err)?;
        let mut grads: Vec<Vec<_>> = ranks
            .iter()
            .map(|rk| {
                (0..2)
                    .map(|s| {
                        let da: Vec<f32> = random_vec(&mut r, rk[s] * di);
                        let db: Vec<f32> = random_vec(&mut r, slices[s].n * rk[s]);
                        (b.upload(&da).unwrap(), b.upload(&db).unwrap())
                    })
                    .collect()
            })
            .collect();
        let x: Vec<TW> = random_vec(&mut r, t * di);
        let g: Vec<TW> = random_vec(&mut r, t * 644);
        let u: Vec<f32> = random_vec(&mut r, 2 * t * 33);
        let dx0: Vec<f32> = random_vec(&mut r, t * di);
        let (x, g, u) = (
            b.upload(&x).map_err(err)?,
            b.upload(&g).map_err(err)?,
            b.upload(&u).map_err(err)?,
        );
        let mut du = b.upload(&vec![POISON; 2 * t * 33]).map_err(err)?;
        let mut dx = b.upload(&dx0).map_err(err)?;
        let mut errw = b.alloc::<u32>(1).map_err(err)?;
        {
            let mut gt = GradTableBuilder::new(&table);
            for (a, p) in grads.iter_mut().enumerate() {
                for (s, (da, db)) in p.iter_mut().enumerate() {
                    gt.set(b, a, s, Some(da), di, Some(db), ranks[a][s])
                        .map_err(err)?;
                }
            }
            let gtab = gt.build(b).map_err(err)?;
            let bwd = BackwardSgmv::new(&table, &gtab, &plan).map_err(err)?;
            let mut ws = b.alloc::<u8>(bwd.workspace_bytes(b)).map_err(err)?;
            bwd.run(
                b,
                SgmvInputs {
                    x: &x,
                    ld_x: di,
                    g: &g,
                    ld_g: 644,
                    u: &u,
                },
                SgmvOutputs {
                    du: &mut du,
                    dx: Some(&mut dx),
                    ld_dx: di,
                },
                GradMode::Accumulate,
                &BackwardDropout::NONE,
                &mut ws,
                Some(&mut errw),
            )
            .map_err(err)?;
        }
        let mut out = vec![
            f64s(&b.download(&du).map_err(err)?),
            f64s(&b.download(&dx).map_err(err)?),
            vec![b.download(&errw).map_err(err)?[0] as f64],
        ];
        for p in &grads {
            for (da, db) in p {
                out.push(f64s(&b.download(da).map_err(err)?));
                out.push(f64s(&b.download(db).map_err(err)?));
            }
        }
        Ok(out)
    }
    let got = run::<Cuda, TW>(dev, 77)?;
    let want = run::<Cpu, TW>(&Cpu, 77)?;
    check(got[2] == vec![0.0] && want[2] == vec![0.0], || {
        format!("error words {:?} {:?}", got[2], want[2])
    })?;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        compare(&format!("output {i}"), g, w, 0.0)?;
    }
    Ok(())
}

fn backward_rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let mut s = BackwardDense::new(4, 8, 8, 2, 1.0);
    s.dropout.p = -0.5;
    let d = bwd_data::<f32, f32>(&s, 1);
    match run_bwd_dense(dev, &s, &d) {
        Err(e) => check(format!("{e:?}").contains("dropout.p"), || {
            format!("unexpected error {e:?}")
        }),
        Ok(_) => Err("dropout p = -0.5 was accepted".into()),
    }
}

/// Merge on the GPU: cuda bits == cpu bits (merge and unmerge), exact records identical, and the
/// exact round trip restores W bit for bit on cuda, also with the record applied crosswise.
fn merge_case<TW: MergeFloat, TA: Float>(
    dev: &Cuda,
    shape: MergeShape,
    rank: usize,
    seed: u64,
) -> Result<(), Failed> {
    let mut r = rng(seed);
    let (rows, cols) = shape.stored();
    let w: Vec<TW> = (0..rows * cols)
        .map(|_| TW::from_f64(rand::Rng::random_range(&mut r, -0.05..0.05)))
        .collect();
    let a: Vec<TA> = random_vec(&mut r, rank * shape.d_in);
    let b: Vec<TA> = random_vec(&mut r, shape.d_out * rank);
    let bits = |v: &[TW]| v.iter().map(|x| x.bits32()).collect::<Vec<_>>();
    let scale = 0.5f32;
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn go<B: Backend, TW: MergeFloat, TA: Float>(
        be: &B,
        w: &[TW],
        a: &[TA],
        b: &[TA],
        shape: &MergeShape,
        rank: usize,
        scale: f32,
        rec_in: Option<&HostRecord>,
    ) -> lora_kernels::Result<(Vec<TW>, Vec<TW>, HostRecord, Vec<TW>)> {
        let (ab, bb) = (be.upload(a)?, be.upload(b)?);
        let l = Lora::packed(&ab, &bb, rank, shape.d_in, scale);
        let mut wb = be.upload(w)?;
        merge::merge(be, &mut wb, shape, &l)?;
        let merged = be.download(&wb)?;
        merge::unmerge(be, &mut wb, shape, &l)?;
        let back = be.download(&wb)?;
        let mut we = be.upload(w)?;
        let mut rec = MergeRecord::alloc::<TW>(be, shape, shape.elements() / 8)?;
        merge_exact(be, &mut we, shape, &l, &mut rec, false)?;
        let host = rec.to_host(be)?;
        let mut rec = match rec_in {
            Some(h) => MergeRecord::from_host::<TW>(be, h)?,
            None => rec,
        };
        unmerge_exact(be, &mut we, shape, &l, &mut rec)?;
        Ok((merged, back, host, be.download(&we)?))
    }
    let (gm, gb, grec, gexact) = go(dev, &w, &a, &b, &shape, rank, scale, None).map_err(err)?;
    let (cm, cb, crec, _) = go(&Cpu, &w, &a, &b, &shape, rank, scale, Some(&grec)).map_err(err)?;
    check(bits(&gm) == bits(&cm), || {
        "merge: cuda bits != cpu bits".into()
    })?;
    check(bits(&gb) == bits(&cb), || {
        "unmerge: cuda bits != cpu bits".into()
    })?;
    check(grec == crec, || {
        format!(
            "records differ (cuda {:?}, cpu {:?})",
            grec.header, crec.header
        )
    })?;
    check(grec.header[1] == 1, || "record invalid".into())?;
    check(bits(&gexact) == bits(&w), || "cuda exact round trip".into())?;
    // cpu record on cuda.
    let (_, _, _, cross) = go(dev, &w, &a, &b, &shape, rank, scale, Some(&crec)).map_err(err)?;
    check(bits(&cross) == bits(&w), || {
        "cpu record applied on cuda".into()
    })
}

fn merge_safe_refuses(dev: &Cuda) -> Result<(), Failed> {
    let shape = MergeShape::new(300, 1031);
    let mut r = rng(40);
    let w: Vec<f16> = random_vec(&mut r, 300 * 1031);
    let a: Vec<f16> = random_vec(&mut r, 8 * 1031);
    let mut b: Vec<f16> = random_vec(&mut r, 300 * 8);
    b[17] = f16::INFINITY;
    let (ab, bb) = (dev.upload(&a).map_err(err)?, dev.upload(&b).map_err(err)?);
    let l = Lora::packed(&ab, &bb, 8, 1031, 1.0);
    let mut wb = dev.upload(&w).map_err(err)?;
    let mut scratch = MergeScratch::alloc::<f16>(dev, &shape).map_err(err)?;
    merge_safe(dev, &mut wb, &shape, &l, Direction::Merge, &mut scratch).map_err(err)?;
    let st = scratch.status(dev).map_err(err)?;
    check(st == merge_status::NONFINITE, || format!("status {st}"))?;
    let got = dev.download(&wb).map_err(err)?;
    check(
        got.iter()
            .map(|x| x.to_bits())
            .eq(w.iter().map(|x| x.to_bits())),
        || "refused safe merge wrote W".into(),
    )
}
