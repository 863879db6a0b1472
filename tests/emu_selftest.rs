//! The SIMT emulator's self-tests: correct kernels against plain-Rust references, and planted bugs
//! the emulator must catch (each test fails if it stops catching its bug).
//!
//! Tolerances: reduce and matmul are f32 sums of exact-in-f32 inputs, so each result must lie within
//! (terms + tree depth + 1) · 2⁻²⁴ · Σ|terms| of the f64 sum (common::dot_tolerance). The mma GEMM's
//! inputs are exact in f16/bf16 and their products exact in f32; the emulator adds each 16-term dot
//! product exactly, so the bound is one f32 rounding per k-step of 16.

mod common;

use common::selftest::*;
use common::*;
use lora_kernels::ffi::sys;
use lora_kernels::{bf16, f16, Emu, Float, KernelErrorKind, Schedule};

const SCHEDULES: [Schedule; 4] = [
    Schedule::Forward,
    Schedule::Reverse,
    Schedule::Random(1),
    Schedule::Random(0xfeed),
];

#[test]
fn block_reduce_with_shuffles() {
    for schedule in SCHEDULES {
        for (rows, n, bt) in [
            (3, 1000, 256),
            (2, 33, 32),
            (1, 4099, 1024),
            (5, 1, 96),
            (1, 0, 64),
        ] {
            let mut r = rng(rows as u64 * 31 + n as u64);
            let x: Vec<f32> = random_vec(&mut r, rows * n);
            let got = Emu::with_schedule(schedule, || run_reduce(&Emu, &x, rows, n, bt)).unwrap();
            for row in 0..rows {
                let xs = &x[row * n..(row + 1) * n];
                let exact: f64 = xs.iter().map(|&v| v as f64).sum();
                let abs: f64 = xs.iter().map(|&v| (v as f64).abs()).sum();
                let tol = dot_tolerance(n, bt as usize, 10, abs);
                assert!(
                    (got[row] as f64 - exact).abs() <= tol,
                    "{schedule:?} row {row}: {} vs {exact}",
                    got[row]
                );
            }
        }
    }
}

#[test]
fn warp_ops_match_the_ptx_definition() {
    let (blocks, bt) = (3, 96);
    let mut r = rng(11);
    // Small magnitudes: the kernel computes v·7+1 in int32.
    let input: Vec<i32> = (0..blocks * bt)
        .map(|_| rand::Rng::random_range(&mut r, -(1 << 20)..(1 << 20)))
        .collect();
    let want = warp_ops_reference(&input, blocks, bt);
    for schedule in SCHEDULES {
        let got = Emu::with_schedule(schedule, || run_warp_ops(&Emu, &input, blocks, bt)).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let (thread, slot) = (i / WARP_OPS_OUTPUTS, i % WARP_OPS_OUTPUTS);
            assert_eq!(
                g, w,
                "{schedule:?}: thread {thread} output {slot}: got {g:#x}, want {w:#x}"
            );
        }
    }
}

#[test]
fn tiled_matmul_odd_sizes() {
    for (m, n, k) in [(77, 45, 70), (1, 1, 1), (17, 3, 33), (16, 16, 0)] {
        let mut r = rng((m * n * k) as u64);
        let a: Vec<f32> = random_vec(&mut r, m * k);
        let b: Vec<f32> = random_vec(&mut r, k * n);
        for schedule in [Schedule::Forward, Schedule::Random(5)] {
            let c = Emu::with_schedule(schedule, || run_matmul(&Emu, &a, &b, m, n, k)).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64);
                    let exact: f64 = terms.clone().sum();
                    let abs: f64 = terms.map(f64::abs).sum();
                    let tol = dot_tolerance(k, 1, 0, abs);
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= tol,
                        "{m}x{n}x{k} C[{i},{j}] = {got}, want {exact}"
                    );
                }
            }
        }
    }
}

fn check_mma<T: Float>(dtype: i32) {
    for (m, n, k) in [(16, 16, 16), (64, 32, 48), (32, 80, 128)] {
        let mut r = rng((m + n + k) as u64);
        let a: Vec<T> = random_vec(&mut r, m * k);
        let b: Vec<T> = random_vec(&mut r, k * n);
        let bits = |v: &[T]| -> Vec<u16> {
            v.iter()
                .map(|x| {
                    if T::DTYPE == lora_kernels::DType::F16 {
                        f16::from_f64(x.to_f64()).to_bits()
                    } else {
                        bf16::from_f64(x.to_f64()).to_bits()
                    }
                })
                .collect()
        };
        let (ab, bb) = (bits(&a), bits(&b));
        for narrow in [false, true] {
            let c = Emu::with_schedule(Schedule::Random(9), || {
                run_mma_gemm(&Emu, &ab, &bb, m, n, k, dtype, narrow)
            })
            .unwrap();
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|p| a[i * k + p].to_f64() * b[p * n + j].to_f64());
                    let exact: f64 = terms.clone().sum();
                    let abs: f64 = terms.map(f64::abs).sum();
                    let tol = dot_tolerance(k / 16, 1, 0, abs);
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= tol,
                        "{} {m}x{n}x{k} narrow {narrow}: C[{i},{j}] = {got}, want {exact}",
                        T::DTYPE
                    );
                }
            }
        }
    }
}

#[test]
fn mma_gemm_f16() {
    check_mma::<f16>(sys::LkDtype::LK_F16 as i32);
}

#[test]
fn mma_gemm_bf16() {
    check_mma::<bf16>(sys::LkDtype::LK_BF16 as i32);
}

// ---- planted bugs ---------------------------------------------------------------------------

#[test]
fn planted_missing_barrier_is_exposed_by_reverse_and_random_orders() {
    let mut r = rng(1);
    let x: Vec<f32> = random_vec(&mut r, 1000);
    let want: Vec<f32> = (0..x.len())
        .map(|i| {
            if i % 256 == 0 {
                2.0 * x[i]
            } else {
                2.0 * x[i - 1]
            }
        })
        .collect();
    let run = |schedule, fixed| {
        Emu::with_schedule(schedule, || {
            run_bug(sys::lk_emu_selftest_bug_missing_barrier, &x, 256, fixed)
        })
    };
    // With the barrier: right under every schedule.
    for schedule in SCHEDULES {
        let (res, out) = run(schedule, true);
        res.unwrap();
        assert_eq!(out, want, "{schedule:?} with the barrier");
    }
    // Without it, forward order happens to hide the race (each thread runs to its end in order)...
    let (res, out) = run(Schedule::Forward, false);
    res.unwrap();
    assert_eq!(
        out, want,
        "forward order is expected to hide the missing barrier"
    );
    // ...and reverse and random orders expose it, every seed.
    let mut exposing = vec![Schedule::Reverse];
    exposing.extend((0..scaled(20, 5) as u64).map(Schedule::Random));
    for schedule in exposing {
        let (res, out) = run(schedule, false);
        res.unwrap();
        assert_ne!(out, want, "{schedule:?} did not expose the missing barrier");
    }
}

#[test]
fn planted_divergent_full_mask_shuffle_is_an_error() {
    let x = vec![1.0f32; 64];
    for schedule in SCHEDULES {
        let (res, _) = Emu::with_schedule(schedule, || {
            run_bug(sys::lk_emu_selftest_bug_divergent_shuffle, &x, 0, false)
        });
        let e = res.expect_err("divergent shuffle not caught");
        assert_eq!(
            e.kernel_kind(),
            Some(KernelErrorKind::EmuWarp),
            "{schedule:?}: {e}"
        );
        assert!(
            e.to_string().contains("block (") && e.to_string().contains("thread ("),
            "message names no block/thread: {e}"
        );
    }
}

#[test]
fn planted_barriers_at_different_call_sites_are_an_error() {
    let x = vec![1.0f32; 64];
    for schedule in SCHEDULES {
        let (res, _) = Emu::with_schedule(schedule, || {
            run_bug(sys::lk_emu_selftest_bug_barrier_sites, &x, 0, false)
        });
        let e = res.expect_err("barrier divergence not caught");
        assert_eq!(
            e.kernel_kind(),
            Some(KernelErrorKind::EmuBarrier),
            "{schedule:?}: {e}"
        );
        assert!(
            e.to_string().contains("selftest.cu"),
            "message names no source line: {e}"
        );
    }
}

#[test]
fn planted_missing_cp_async_wait_is_caught() {
    let mut r = rng(2);
    let x: Vec<f32> = random_vec(&mut r, 256);
    for schedule in SCHEDULES {
        let (res, out) = Emu::with_schedule(schedule, || {
            run_bug(sys::lk_emu_selftest_bug_missing_cp_async_wait, &x, 0, false)
        });
        // Either the un-landed copy is read (poison) or the un-awaited copy is reported at exit.
        let caught = match &res {
            Err(e) => e.kernel_kind() == Some(KernelErrorKind::EmuAsyncCopy),
            Ok(()) => out.iter().zip(&x).any(|(o, v)| o != v),
        };
        assert!(
            caught,
            "{schedule:?}: missing cp.async wait not caught ({res:?})"
        );
    }
}

/// The off-by-one read runs in a child process (an ASan report aborts the process); the parent
/// checks that ASan named the kernel's source line. Only meaningful in the ASan build
/// (`LK_EMU_SANITIZE=address`); without it the read is silently in bounds of the allocator's slack.
#[test]
#[cfg_attr(
    not(lk_emu_asan),
    ignore = "needs the AddressSanitizer build: LK_EMU_SANITIZE=address"
)]
fn planted_off_by_one_read_is_caught_by_asan() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "off_by_one_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LK_OFF_BY_ONE_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the child survived an out-of-bounds read:\n{stderr}"
    );
    assert!(
        stderr.contains("AddressSanitizer") && stderr.contains("heap-buffer-overflow"),
        "no ASan report:\n{stderr}"
    );
    assert!(
        stderr.contains("selftest.cu:"),
        "the report does not name the kernel line:\n{stderr}"
    );
}

/// Child half of the test above (does nothing unless spawned by it).
#[test]
#[ignore = "run as a child process by planted_off_by_one_read_is_caught_by_asan"]
fn off_by_one_child() {
    if std::env::var_os("LK_OFF_BY_ONE_CHILD").is_none() {
        return;
    }
    let x: Vec<f32> = vec![1.0; 37];
    let (res, _) = run_bug(sys::lk_emu_selftest_bug_off_by_one, &x, 0, false);
    eprintln!("child finished without a report: {res:?}");
}

/// A vector load 4 bytes off its 16-byte alignment faults on a GPU but works on x86: the sanitizer
/// build checks alignment (UBSan) so that the emulator refuses it too. Child process as above.
#[test]
#[cfg_attr(
    not(lk_emu_asan),
    ignore = "needs the sanitizer build: LK_EMU_SANITIZE=address"
)]
fn planted_misaligned_vector_load_is_caught() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "misaligned_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LK_MISALIGNED_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the child survived a misaligned vector load:\n{stderr}"
    );
    assert!(
        stderr.contains("misaligned address") && stderr.contains("selftest.cu:"),
        "no alignment report naming the kernel line:\n{stderr}"
    );
}

/// Child half of the test above (does nothing unless spawned by it).
#[test]
#[ignore = "run as a child process by planted_misaligned_vector_load_is_caught"]
fn misaligned_child() {
    if std::env::var_os("LK_MISALIGNED_CHILD").is_none() {
        return;
    }
    // A Vec<f32> from the system allocator is 16-byte aligned on x86-64 Linux (glibc malloc).
    let x: Vec<f32> = vec![1.0; 64];
    assert_eq!(x.as_ptr() as usize % 16, 0);
    let (res, _) = run_bug(sys::lk_emu_selftest_bug_misaligned_vector, &x, 0, false);
    eprintln!("child finished without a report: {res:?}");
}

// ---- misuse reported, not hidden --------------------------------------------------------------

fn launch(
    grid: [u32; 3],
    block: [u32; 3],
    smem_bytes: u64,
    raise: bool,
) -> Result<u32, lora_kernels::Error> {
    let mut count = 0u32;
    let p = sys::LkSelftestLaunchConfigParams {
        count: &mut count,
        grid,
        block,
        smem_bytes,
        raise_smem_limit: raise as i32,
    };
    check_code(&Emu, unsafe {
        sys::lk_emu_selftest_launch_config(&p, std::ptr::null_mut())
    })?;
    Ok(count)
}

#[test]
fn launch_geometry_runs_every_thread() {
    assert_eq!(launch([3, 2, 2], [8, 4, 2], 0, false).unwrap(), 12 * 64);
    assert_eq!(
        launch([1, 1, 1], [1024, 1, 1], 48 * 1024, false).unwrap(),
        1024
    );
    assert_eq!(launch([1, 1, 1], [1, 1, 64], 0, false).unwrap(), 64);
}

/// grid, block, dynamic shared memory bytes, raise the limit first, what the message must name.
type LimitCase = ([u32; 3], [u32; 3], u64, bool, &'static str);

#[test]
fn launch_limits_are_errors_naming_the_limit() {
    let cases: [LimitCase; 7] = [
        ([1, 1, 1], [1025, 1, 1], 0, false, "block"),
        ([1, 1, 1], [32, 32, 2], 0, false, "block"),
        ([1, 1, 1], [1, 1, 65], 0, false, "block"),
        ([1, 65536, 1], [1, 1, 1], 0, false, "grid"),
        ([1, 1, 65536], [1, 1, 1], 0, false, "grid"),
        ([1, 1, 1], [32, 1, 1], 48 * 1024 + 1, false, "shared memory"),
        ([1, 1, 1], [32, 1, 1], 227 * 1024 + 1, true, "shared memory"),
    ];
    for (grid, block, smem, raise, needle) in cases {
        let e = launch(grid, block, smem, raise).expect_err("limit not enforced");
        assert!(
            matches!(
                e.kernel_kind(),
                Some(KernelErrorKind::EmuLaunchConfig | KernelErrorKind::InvalidArgument)
            ),
            "grid {grid:?} block {block:?} smem {smem}: {e}"
        );
        assert!(
            e.to_string().contains(needle),
            "grid {grid:?} block {block:?} smem {smem}: `{e}` should mention {needle}"
        );
    }
    // Raising the limit makes the same launch legal (only this test uses > 48 KiB: the limit is
    // process-wide per kernel).
    assert_eq!(launch([2, 1, 1], [33, 1, 1], 100 * 1024, true).unwrap(), 66);
    assert!(launch([2, 1, 1], [33, 1, 1], 100 * 1024, false).is_err());
    // An empty grid is refused, as on the GPU.
    assert!(launch([0, 1, 1], [32, 1, 1], 0, false).is_err());
}
