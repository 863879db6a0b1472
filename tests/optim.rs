//! AdamW and sum_squares: the cpu reference against a direct transcription of torch's AdamW, and
//! the emulator against the cpu reference.

mod common;

use common::*;
use lora_kernels::ffi::sys;
use lora_kernels::optim::{adamw_step, reference, sum_squares, sum_squares_workspace_bytes, AdamW};
use lora_kernels::{bf16, f16, Cpu, DType, Emu, Error, Float, Schedule};
use proptest::prelude::*;

/// `torch/optim/adamw.py::_single_tensor_adamw` transcribed in f64 (Python floats), state in f64.
struct TorchAdamW {
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    step: i32,
}

impl TorchAdamW {
    fn new(cfg: &AdamW, n: usize) -> Self {
        TorchAdamW {
            lr: cfg.lr as f64,
            b1: cfg.beta1 as f64,
            b2: cfg.beta2 as f64,
            eps: cfg.eps as f64,
            wd: cfg.weight_decay as f64,
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    fn step(&mut self, param: &mut [f64], grad: &[f64]) {
        self.step += 1;
        for i in 0..param.len() {
            // param.mul_(1 - lr * weight_decay)
            param[i] *= 1.0 - self.lr * self.wd;
            // exp_avg.lerp_(grad, 1 - beta1)
            self.m[i] += (1.0 - self.b1) * (grad[i] - self.m[i]);
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            self.v[i] = self.v[i] * self.b2 + (1.0 - self.b2) * grad[i] * grad[i];
            let bias_correction1 = 1.0 - self.b1.powi(self.step);
            let bias_correction2 = 1.0 - self.b2.powi(self.step);
            let step_size = self.lr / bias_correction1;
            let bias_correction2_sqrt = bias_correction2.sqrt();
            let denom = self.v[i].sqrt() / bias_correction2_sqrt + self.eps;
            // param.addcdiv_(exp_avg, denom, value=-step_size)
            param[i] += -step_size * self.m[i] / denom;
        }
    }
}

/// Several steps on the cpu backend (f64 params) against the torch transcription. Ours differs
/// only by rounding each host factor to f32 (2⁻²⁴ relative each) and storing m, v in f32 (2⁻²⁴
/// each step): each step's update is off by ≤ ~6·2⁻²⁴ ≈ 4e-7 of its size (|update| ≤ lr·
/// |m̂|/(sqrt(v̂)+eps) ≤ ~3·lr here) and the decay by 2⁻²⁴·|p|. Bound after k steps: k·(4e-7·3·lr
/// + 6e-8·|p|), doubled for the moments' carried rounding.
#[test]
fn cpu_reference_follows_torch_adamw_f64() {
    let cfg = AdamW {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let n = 257;
    let mut r = rng(3);
    let p0: Vec<f64> = random_vec(&mut r, n);
    let mut torch_p = p0.clone();
    let mut torch = TorchAdamW::new(&cfg, n);
    let mut ours = p0.clone();
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let steps = 8;
    let mut gmax = vec![0.0f64; n];
    for step in 1..=steps {
        // Mixed magnitudes, some exact zeros.
        let g: Vec<f64> = random_vec::<f64>(&mut r, n)
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if i % 17 == 0 {
                    0.0
                } else {
                    x * 10f64.powi(i as i32 % 5 - 2)
                }
            })
            .collect();
        for (mx, x) in gmax.iter_mut().zip(&g) {
            *mx = mx.max(x.abs());
        }
        torch.step(&mut torch_p, &g);
        adamw_step(&Cpu, &cfg, step, &mut ours, &g, &mut m, &mut v).unwrap();
        for i in 0..n {
            let tol = 2.0 * step as f64 * (4e-7 * 3.0 * cfg.lr as f64 + 6e-8 * torch_p[i].abs());
            let err = (ours[i] - torch_p[i]).abs();
            assert!(
                err <= tol,
                "step {step} p[{i}]: ours {}, torch {}, err {err:e} > {tol:e}",
                ours[i],
                torch_p[i]
            );
            // m = m + (1−β1)(g − m) can cancel: bound relative to the largest |g| seen.
            let m_err = (m[i] as f64 - torch.m[i]).abs();
            assert!(m_err <= 4.0 * step as f64 * 6e-8 * (torch.m[i].abs() + gmax[i]) + 1e-45);
            let v_err = (v[i] as f64 - torch.v[i]).abs();
            assert!(v_err <= 4.0 * step as f64 * 6e-8 * torch.v[i].abs() + 1e-45);
        }
    }
}

/// Step 1 from zero moments: m̂ = g, v̂ = g², so p ← p·(1 − lr·wd) − lr·g/(|g| + eps).
#[test]
fn first_step_is_signed_lr() {
    let cfg = AdamW {
        weight_decay: 0.0,
        ..AdamW::default()
    };
    let mut p = vec![1.0f32, 1.0, 1.0, 1.0];
    let g = vec![0.5f32, -2.0, 0.0, 1e-3];
    let (mut m, mut v) = (vec![0.0f32; 4], vec![0.0f32; 4]);
    adamw_step(&Cpu, &cfg, 1, &mut p, &g, &mut m, &mut v).unwrap();
    let want = [
        1.0 - 1e-3,
        1.0 + 1e-3,
        1.0,
        1.0 - 1e-3 * 1e-3 / (1e-3 + 1e-8),
    ];
    for (got, want) in p.iter().zip(want) {
        assert!((*got as f64 - want).abs() < 1e-7, "{got} vs {want}");
    }
}

#[test]
fn cpu_sum_squares_and_workspace() {
    assert_eq!(sum_squares_workspace_bytes(&Cpu, 1 << 20), 0);
    let x = vec![3.0f64, -4.0, 0.5];
    let mut out = vec![POISON];
    sum_squares(&Cpu, &x, &mut out, &mut Vec::new()).unwrap();
    assert_eq!(out[0], 25.25);
    sum_squares(&Cpu, &Vec::<f32>::new(), &mut out, &mut Vec::new()).unwrap();
    assert_eq!(out[0], 0.0);
}

// ---- the emulator against the reference --------------------------------------------------------

const U: f64 = 1.0 / 16_777_216.0; // 2⁻²⁴

fn ulp_of(d: DType) -> f64 {
    match d {
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        _ => 2f64.powi(-23),
    }
}

/// A mid-training state: params ~U(−1, 1), grads of mixed magnitude with exact zeros, m ~ g-ish,
/// v ≥ 0 of the right scale.
fn state<T: Float>(seed: u64, n: usize) -> (Vec<T>, Vec<T>, Vec<f32>, Vec<f32>) {
    let mut r = rng(seed);
    let p: Vec<T> = random_vec(&mut r, n);
    let g: Vec<T> = random_vec::<f64>(&mut r, n)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            T::from_f64(if i % 13 == 5 {
                0.0
            } else {
                v * 10f64.powi(i as i32 % 4 - 2)
            })
        })
        .collect();
    let m: Vec<f32> = random_vec::<f64>(&mut r, n)
        .iter()
        .map(|v| (v * 0.1) as f32)
        .collect();
    let v: Vec<f32> = random_vec::<f64>(&mut r, n)
        .iter()
        .map(|v| (v * v * 0.01) as f32)
        .collect();
    (p, g, m, v)
}

/// One step on emu and cpu from the same state. Tolerances (the kernel computes in f32 what the
/// reference computes in f64 from the same f32 factors, both storing m, v in f32):
/// m: g − m and the fmaf round (2 · 2⁻²⁴ of |m| + |(1−β1)(g−m)|) + the reference's rounding;
/// v: g·g, β2·v and the fmaf (3 · 2⁻²⁴ of the terms); the update m/d: sqrt, /, + eps, / and the
/// carried v error (≤ 12 · 2⁻²⁴ relative) plus m's absolute error over d, p·decay and the fmaf (2 · 2⁻²⁴ of |p|), then both
/// round to T: 1 ulp of T apart at most.
fn check_adamw<T: Float>(n: usize, step: u32, seed: u64, cfg: &AdamW) {
    let (p, g, m, v) = state::<T>(seed, n);
    let run = |emu: bool| {
        let (mut p, mut m, mut v) = (p.clone(), m.clone(), v.clone());
        if emu {
            adamw_step(&Emu, cfg, step, &mut p, &g, &mut m, &mut v)
        } else {
            adamw_step(&Cpu, cfg, step, &mut p, &g, &mut m, &mut v)
        }
        .unwrap();
        (p, m, v)
    };
    let (ep, em, ev) = run(true);
    let (cp, cm, cv) = run(false);
    let f = cfg.factors(step).unwrap();
    for i in 0..n {
        let (gi, mi, vi) = (g[i].to_f64(), m[i] as f64, v[i] as f64);
        let m_tol = 3.0 * U * (mi.abs() + (f.one_minus_beta1 as f64 * (gi - mi)).abs()) + 1e-45;
        assert!(
            (em[i] as f64 - cm[i] as f64).abs() <= m_tol,
            "m[{i}] emu {} cpu {}",
            em[i],
            cm[i]
        );
        let v_tol = 4.0 * U * (f.beta2 as f64 * vi + f.one_minus_beta2 as f64 * gi * gi) + 1e-45;
        assert!(
            (ev[i] as f64 - cv[i] as f64).abs() <= v_tol,
            "v[{i}] emu {} cpu {}",
            ev[i],
            cv[i]
        );
        let d = (cv[i] as f64).sqrt() / f.bc2_sqrt as f64 + f.eps as f64;
        let upd = f.step_size as f64 * (cm[i] as f64).abs() / d;
        // m' can cancel (m + (1−β1)(g − m) ≈ 0): its absolute error m_tol carries into m/d.
        let p_tol = 12.0 * U * upd
            + f.step_size as f64 * m_tol / d
            + 3.0 * U * p[i].to_f64().abs()
            + ulp_of(T::DTYPE) * cp[i].to_f64().abs()
            + 1e-40;
        let (e, c) = (ep[i].to_f64(), cp[i].to_f64());
        assert!(
            (e - c).abs() <= p_tol,
            "param[{i}] emu {e} cpu {c} tol {p_tol:e} ({}, n {n}, step {step})",
            T::DTYPE
        );
    }
}

fn cfg_llm() -> AdamW {
    AdamW {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

#[test]
fn emu_adamw_matches_cpu_odd_sizes() {
    for (i, &n) in [1usize, 3, 17, 127, 4097, 100_003].iter().enumerate() {
        for step in [1u32, 2, 1000] {
            check_adamw::<f32>(n, step, i as u64, &cfg_llm());
            check_adamw::<f16>(n, step, 10 + i as u64, &cfg_llm());
            check_adamw::<bf16>(n, step, 20 + i as u64, &cfg_llm());
        }
    }
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_adamw_matches_cpu_random(
        n in 1usize..3000,
        step in 1u32..5000,
        lr in 0.0f32..0.1,
        beta1 in 0.0f32..0.99,
        beta2 in 0.5f32..0.9999,
        eps in prop_oneof![Just(0.0f32), 1e-12f32..1e-3],
        wd in 0.0f32..0.5,
        seed in any::<u64>(),
        dtype in 0..3,
    ) {
        let cfg = AdamW { lr, beta1, beta2, eps, weight_decay: wd };
        match dtype {
            0 => check_adamw::<f32>(n, step, seed, &cfg),
            1 => check_adamw::<f16>(n, step, seed, &cfg),
            _ => check_adamw::<bf16>(n, step, seed, &cfg),
        }
    }

    #[test]
    fn emu_sum_squares_matches_cpu_random(n in 0usize..20_000, seed in any::<u64>(), dtype in 0..3) {
        match dtype {
            0 => check_sum_squares::<f32>(n, seed),
            1 => check_sum_squares::<f16>(n, seed),
            _ => check_sum_squares::<bf16>(n, seed),
        }
    }
}

/// Several emulator steps in f32 follow the torch transcription (f64 state) as the cpu reference
/// does, within the per-step bound of `cpu_reference_follows_torch_adamw_f64` plus 1 ulp of the
/// f32 parameter per step.
#[test]
fn emu_adamw_follows_torch_several_steps() {
    let cfg = cfg_llm();
    let n = 1031;
    let mut r = rng(8);
    let p0: Vec<f32> = random_vec(&mut r, n);
    let mut torch_p: Vec<f64> = p0.iter().map(|&v| v as f64).collect();
    let mut torch = TorchAdamW::new(&cfg, n);
    let mut p = p0.clone();
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    for step in 1..=6u32 {
        let g: Vec<f32> = random_vec(&mut r, n);
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        torch.step(&mut torch_p, &g64);
        adamw_step(&Emu, &cfg, step, &mut p, &g, &mut m, &mut v).unwrap();
        for i in 0..n {
            let tol = step as f64
                * (2.0 * 4e-7 * 3.0 * cfg.lr as f64
                    + 2.0 * 6e-8 * torch_p[i].abs()
                    + U * 2.0 * torch_p[i].abs());
            let err = (p[i] as f64 - torch_p[i]).abs();
            assert!(
                err <= tol,
                "step {step} p[{i}]: emu {} torch {} err {err:e} tol {tol:e}",
                p[i],
                torch_p[i]
            );
        }
    }
}

// ---- sum of squares --------------------------------------------------------------------------

/// Emu vs the f64 reference. The kernel's order: per thread 4 fmaf chains over its chunks, folded
/// (2 levels), a 5-level warp butterfly, 3 levels over the 8 warps; with several blocks a second
/// pass of ⌈blocks/256⌉-long chains and the same 8 levels. All terms are ≥ 0, so the γ bound of
/// common::dot_tolerance applies with chains = min(n, threads·4).
fn check_sum_squares<T: Float>(n: usize, seed: u64) {
    let mut r = rng(seed);
    let x: Vec<T> = random_vec(&mut r, n);
    let ws_bytes = sum_squares_workspace_bytes(&Emu, n);
    let mut ws = vec![0xAAu8; ws_bytes];
    let mut out = vec![POISON, POISON];
    sum_squares(&Emu, &x, &mut out, &mut ws).unwrap();
    assert_eq!(out[1].to_bits(), POISON.to_bits(), "out[1] written");
    let exact = reference::sum_squares(&x);
    let chunk = 16 / T::DTYPE.size_bytes();
    let blocks = n.div_ceil(chunk).div_ceil(1024).clamp(1, 1024);
    let chains = (blocks * 256 * 4).min(n.max(1));
    let levels = 2
        + 5
        + 3
        + if blocks > 1 {
            blocks.div_ceil(256) + 8
        } else {
            0
        };
    let tol = dot_tolerance(n, chains, levels, exact);
    assert!(
        (out[0] as f64 - exact).abs() <= tol,
        "n {n} ({}): emu {} exact {exact} tol {tol:e}",
        T::DTYPE,
        out[0]
    );
    // The workspace serves every dtype: at least this dtype's partials, exactly f32's.
    assert!(ws_bytes >= if blocks > 1 { blocks * 4 } else { 0 });
    if T::DTYPE == DType::F32 {
        assert_eq!(ws_bytes, if blocks > 1 { blocks * 4 } else { 0 });
    }
}

#[test]
fn emu_sum_squares_odd_sizes() {
    for (i, &n) in [0usize, 1, 3, 17, 127, 4097, 8193, 300_007, 5_000_000]
        .iter()
        .enumerate()
    {
        check_sum_squares::<f32>(n, i as u64);
        check_sum_squares::<f16>(n, 10 + i as u64);
        check_sum_squares::<bf16>(n, 20 + i as u64);
    }
}

#[test]
fn emu_sum_squares_workspace_sizes() {
    assert_eq!(sum_squares_workspace_bytes(&Emu, 0), 0);
    assert_eq!(sum_squares_workspace_bytes(&Emu, 4096), 0); // one f32 block
    assert_eq!(sum_squares_workspace_bytes(&Emu, 8192), 4 * 2); // 2 f32 blocks (f16: 1)
                                                                // The block count saturates at 1024.
    assert_eq!(sum_squares_workspace_bytes(&Emu, 1 << 30), 4 * 1024);
}

// ---- determinism -----------------------------------------------------------------------------

fn optim_outputs() -> (Vec<u16>, Vec<u32>, Vec<u32>, Vec<u32>) {
    let (mut p, g, mut m, mut v) = state::<bf16>(4, 5003);
    adamw_step(&Emu, &cfg_llm(), 7, &mut p, &g, &mut m, &mut v).unwrap();
    let x: Vec<f32> = random_vec(&mut rng(9), 70_001);
    let mut ws = vec![0u8; sum_squares_workspace_bytes(&Emu, x.len())];
    let mut out = vec![0.0f32];
    sum_squares(&Emu, &x, &mut out, &mut ws).unwrap();
    (
        p.iter().map(|v| v.to_bits()).collect(),
        m.iter().chain(&v).map(|v| v.to_bits()).collect(),
        vec![out[0].to_bits()],
        Vec::new(),
    )
}

#[test]
fn emu_deterministic_across_runs_and_schedules() {
    let first = optim_outputs();
    assert_eq!(optim_outputs(), first);
    for sched in [Schedule::Reverse, Schedule::Random(3)] {
        assert_eq!(Emu::with_schedule(sched, optim_outputs), first, "{sched:?}");
    }
}

// ---- bad inputs --------------------------------------------------------------------------------

fn expect_invalid(r: lora_kernels::Result<()>, want: &str) {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, want),
        other => panic!("expected InvalidArgument({want}), got {other:?}"),
    }
}

#[test]
fn adamw_bad_inputs_are_typed_errors_and_write_nothing() {
    let b = Emu;
    let ok = cfg_llm();
    let try_step = |cfg: AdamW, step: u32, ng: usize, nm: usize, nv: usize| {
        let mut p = vec![POISON; 5];
        let g = vec![1.0f32; ng];
        let mut m = vec![POISON; nm];
        let mut v = vec![POISON; nv];
        let r = adamw_step(&b, &cfg, step, &mut p, &g, &mut m, &mut v);
        assert!(p
            .iter()
            .chain(&m)
            .chain(&v)
            .all(|x| x.to_bits() == POISON.to_bits()));
        r
    };
    expect_invalid(try_step(ok, 0, 5, 5, 5), "step");
    for (cfg, arg) in [
        (AdamW { lr: -1e-3, ..ok }, "lr"),
        (AdamW { lr: f32::NAN, ..ok }, "lr"),
        (
            AdamW {
                lr: f32::INFINITY,
                ..ok
            },
            "lr",
        ),
        (AdamW { eps: -1.0, ..ok }, "eps"),
        (
            AdamW {
                eps: f32::NAN,
                ..ok
            },
            "eps",
        ),
        (
            AdamW {
                weight_decay: -0.1,
                ..ok
            },
            "weight_decay",
        ),
        (AdamW { beta1: 1.0, ..ok }, "beta1"),
        (AdamW { beta1: -0.1, ..ok }, "beta1"),
        (
            AdamW {
                beta2: f32::NAN,
                ..ok
            },
            "beta2",
        ),
        (AdamW { beta2: 1.5, ..ok }, "beta2"),
    ] {
        expect_invalid(try_step(cfg, 1, 5, 5, 5), arg);
    }
    expect_invalid(try_step(ok, 1, 4, 5, 5), "grad");
    expect_invalid(try_step(ok, 1, 5, 6, 5), "m");
    expect_invalid(try_step(ok, 1, 5, 5, 4), "v");
    let mut p64 = vec![0.0f64; 3];
    let (mut m, mut v) = (vec![0.0f32; 3], vec![0.0f32; 3]);
    assert!(matches!(
        adamw_step(&b, &ok, 1, &mut p64, &vec![0.0f64; 3], &mut m, &mut v),
        Err(Error::UnsupportedDtype { arg: "param", .. })
    ));
    // n = 0: Ok.
    adamw_step(
        &b,
        &ok,
        1,
        &mut Vec::<f32>::new(),
        &Vec::new(),
        &mut Vec::new(),
        &mut Vec::new(),
    )
    .unwrap();
}

#[test]
fn sum_squares_bad_inputs_are_typed_errors() {
    let x = vec![1.0f32; 100_000];
    let need = sum_squares_workspace_bytes(&Emu, x.len());
    assert!(need > 0);
    let mut out = vec![POISON];
    expect_invalid(
        sum_squares(&Emu, &x, &mut out, &mut vec![0u8; need - 1]),
        "workspace",
    );
    expect_invalid(
        sum_squares(&Emu, &x, &mut Vec::new(), &mut vec![0u8; need]),
        "out",
    );
    assert_eq!(out[0].to_bits(), POISON.to_bits());
    assert!(matches!(
        sum_squares(&Emu, &vec![1.0f64; 3], &mut out, &mut Vec::new()),
        Err(Error::UnsupportedDtype { arg: "x", .. })
    ));
}

/// The C launchers' own checks.
#[test]
fn c_launchers_reject_bad_params() {
    let inv = sys::LK_ERR_INVALID_ARGUMENT as i32;
    let dt = sys::LK_ERR_UNSUPPORTED_DTYPE as i32;
    let mut p = [0.0f32; 4];
    let g = [0.0f32; 4];
    let mut m = [0.0f32; 4];
    let mut v = [0.0f32; 4];
    let f = cfg_llm().factors(1).unwrap();
    let base = sys::LkAdamWParams {
        param: p.as_mut_ptr().cast(),
        grad: g.as_ptr().cast(),
        m: m.as_mut_ptr(),
        v: v.as_mut_ptr(),
        n: 4,
        decay: f.decay,
        beta1: f.beta1,
        beta2: f.beta2,
        one_minus_beta1: f.one_minus_beta1,
        one_minus_beta2: f.one_minus_beta2,
        step_size: f.step_size,
        bc2_sqrt: f.bc2_sqrt,
        eps: f.eps,
        dtype: 0,
    };
    // SAFETY: every pointer is valid for 4 elements (or null, which the launcher checks).
    let call =
        |q: sys::LkAdamWParams| unsafe { sys::lk_emu_optim_adamw_step(&q, std::ptr::null_mut()) };
    assert_eq!(call(base), 0);
    assert_eq!(call(sys::LkAdamWParams { n: -1, ..base }), inv);
    assert_eq!(
        call(sys::LkAdamWParams {
            step_size: f32::NAN,
            ..base
        }),
        inv
    );
    assert_eq!(
        call(sys::LkAdamWParams {
            bc2_sqrt: f32::INFINITY,
            ..base
        }),
        inv
    );
    assert_eq!(call(sys::LkAdamWParams { dtype: 5, ..base }), dt);
    assert_eq!(
        call(sys::LkAdamWParams {
            grad: std::ptr::null(),
            ..base
        }),
        inv
    );
    assert_eq!(
        call(sys::LkAdamWParams {
            m: std::ptr::null_mut(),
            ..base
        }),
        inv
    );
    // SAFETY: null params are checked first.
    assert_eq!(
        unsafe { sys::lk_emu_optim_adamw_step(std::ptr::null(), std::ptr::null_mut()) },
        inv
    );

    let x = vec![1.0f32; 100_000];
    let mut out = [0.0f32; 1];
    let sbase = sys::LkSumSquaresParams {
        x: x.as_ptr().cast(),
        out: out.as_mut_ptr(),
        workspace: std::ptr::null_mut(),
        n: 3,
        dtype: 0,
    };
    // SAFETY: as above (n = 3 needs no workspace).
    let scall = |q: sys::LkSumSquaresParams| unsafe {
        sys::lk_emu_optim_sum_squares(&q, std::ptr::null_mut())
    };
    assert_eq!(scall(sbase), 0);
    assert_eq!(scall(sys::LkSumSquaresParams { n: -3, ..sbase }), inv);
    assert_eq!(scall(sys::LkSumSquaresParams { dtype: 9, ..sbase }), dt);
    assert_eq!(
        scall(sys::LkSumSquaresParams {
            out: std::ptr::null_mut(),
            ..sbase
        }),
        inv
    );
    assert_eq!(
        scall(sys::LkSumSquaresParams {
            x: std::ptr::null(),
            ..sbase
        }),
        inv
    );
    // Many blocks but no workspace.
    assert_eq!(
        scall(sys::LkSumSquaresParams {
            n: 100_000,
            ..sbase
        }),
        inv
    );
    let mut ws = vec![0u32; 64];
    let misaligned = (ws.as_mut_ptr() as *mut u8).wrapping_add(1).cast();
    assert_eq!(
        scall(sys::LkSumSquaresParams {
            n: 100_000,
            workspace: misaligned,
            ..sbase
        }),
        inv
    );
    // SAFETY: null params.
    assert_eq!(
        unsafe { sys::lk_emu_optim_sum_squares(std::ptr::null(), std::ptr::null_mut()) },
        inv
    );
    // SAFETY: a pure function; null params give 0.
    assert_eq!(
        unsafe { sys::lk_emu_optim_sum_squares_workspace_size(std::ptr::null()) },
        0
    );
}
