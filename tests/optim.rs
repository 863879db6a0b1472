//! AdamW and sum_squares: the cpu reference against a direct transcription of torch's AdamW, and
//! the emulator against the cpu reference.

mod common;

use common::*;
use lora_kernels::optim::{adamw_step, sum_squares, sum_squares_workspace_bytes, AdamW};
use lora_kernels::{Backend, Cpu, Float};

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

#[allow(dead_code)]
fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

#[allow(dead_code)]
fn upload_all<B: Backend, T: Float>(b: &B, v: &[T]) -> B::Buffer<T> {
    b.upload(v).unwrap()
}
