//! The reference block (issue #7): autograd gradients against central finite differences (cpu,
//! f64) for every op and for whole models; training on emu against cpu; checkpoints; determinism;
//! serving (KV-cache decode, SGMV/BGMV adapters, merged weights) against the training forward; and
//! a reduced demo on the emulator.

mod common;

use common::block::*;

use lora_kernels::attention::Attention;
use lora_kernels::autograd::{LoraLink, ParamId, Params, Tape, Tensor};
use lora_kernels::demo::{self, make_batch, step_seed, DemoConfig, SplitMix, Task};
use lora_kernels::dropout::Dropout;
use lora_kernels::model::{uniform, Batch, LlamaConfig, LoraConfig, TinyLm};
use lora_kernels::{Backend, Cpu, Emu, Result};

type P = Params<Cpu, f64>;

fn random(seed: u64, n: usize, bound: f64) -> Vec<f64> {
    uniform(seed, n, bound)
}

/// Central differences of `loss` with respect to sampled elements of every trainable parameter,
/// against the tape's gradients. `h` and the tolerance are chosen per graph: pure-f64 graphs agree
/// to ~1e-7 relative (truncation O(h²) with h = 1e-5, rounding ~1e-16/h); graphs with LoRA carry
/// the kernels' f32 `u` (relative 2⁻²⁴), whose rounding noise in the loss (~1e-8) divided by h =
/// 1e-3 bounds the difference by ~1e-5 absolute.
#[allow(clippy::type_complexity)]
fn grad_check(
    params: &mut P,
    loss: &dyn Fn(&mut Tape<'_, Cpu, f64>, &P) -> Result<f64>,
    h: f64,
    rel_tol: f64,
    abs_tol: f64,
) {
    grad_check_on(params, |p| p, |tape, p| loss(tape, p), h, rel_tol, abs_tol);
}

/// [`grad_check`] for any state `S` holding the parameters (a model).
fn grad_check_on<S>(
    state: &mut S,
    params_of: impl Fn(&mut S) -> &mut P,
    loss: impl Fn(&mut Tape<'_, Cpu, f64>, &S) -> Result<f64>,
    h: f64,
    rel_tol: f64,
    abs_tol: f64,
) {
    let b = Cpu;
    params_of(state).zero_grad();
    let mut tape = Tape::new(&b).unwrap();
    loss(&mut tape, state).unwrap();
    tape.backward(params_of(state)).unwrap();
    let params = params_of(state);
    let ids: Vec<ParamId> = (0..params.len())
        .map(ParamId)
        .filter(|&i| params.get(i).trainable)
        .collect();
    assert!(!ids.is_empty());
    let mut checked = 0;
    for id in ids {
        let params = params_of(state);
        let n = params.get(id).len();
        let grad = b
            .download(
                params
                    .get(id)
                    .grad
                    .as_ref()
                    .expect("a trainable parameter got a gradient"),
            )
            .unwrap();
        let value = b.download(&params.get(id).value).unwrap();
        // Up to 12 elements per parameter, spread over it.
        let picks: Vec<usize> = if n <= 12 {
            (0..n).collect()
        } else {
            (0..12).map(|i| i * n / 12 + (i % 3)).collect()
        };
        for e in picks {
            let mut eval = |v: f64| -> f64 {
                let mut w = value.clone();
                w[e] = v;
                b.write(&mut params_of(state).get_mut(id).value, &w)
                    .unwrap();
                let mut tape = Tape::new(&b).unwrap();
                loss(&mut tape, state).unwrap()
            };
            let plus = eval(value[e] + h);
            let minus = eval(value[e] - h);
            let params = params_of(state);
            b.write(&mut params.get_mut(id).value, &value).unwrap();
            let fd = (plus - minus) / (2.0 * h);
            let err = (fd - grad[e]).abs();
            assert!(
                err <= abs_tol + rel_tol * fd.abs().max(grad[e].abs()),
                "{}[{e}]: autograd {} vs finite difference {fd} (|diff| {err:e})",
                params.get(id).name,
                grad[e]
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

const VOCAB: usize = 11;
const D: usize = 32;

/// Parameters of the per-op graphs: an embedding table and an output head (both trainable: the
/// table's gradient is the op's input gradient), plus what the op needs.
fn base_params(extra: &[(&str, usize, usize)]) -> P {
    base_params_with_head(D, extra)
}

/// [`base_params`] with a head reading `head_in` features.
fn base_params_with_head(head_in: usize, extra: &[(&str, usize, usize)]) -> P {
    let b = Cpu;
    let mut p = P::new();
    p.add(&b, "embed", VOCAB, D, &random(1, VOCAB * D, 1.0), true)
        .unwrap();
    p.add(
        &b,
        "head",
        VOCAB,
        head_in,
        &random(2, VOCAB * head_in, 0.3),
        true,
    )
    .unwrap();
    for (i, (name, r, c)) in extra.iter().enumerate() {
        let bound = if name.starts_with("norm") {
            0.0
        } else {
            1.0 / (*c as f64).sqrt()
        };
        let data: Vec<f64> = if bound == 0.0 {
            random(10 + i as u64, r * c, 0.5)
                .iter()
                .map(|v| 1.0 + v)
                .collect()
        } else {
            random(10 + i as u64, r * c, bound)
        };
        p.add(&b, *name, *r, *c, &data, true).unwrap();
    }
    p
}

const LENS: [usize; 3] = [5, 1, 7];

fn ids() -> Vec<i32> {
    let n: usize = LENS.iter().sum();
    (0..n).map(|i| ((i * 7 + 3) % VOCAB) as i32).collect()
}

fn targets() -> Vec<i32> {
    let n: usize = LENS.iter().sum();
    (0..n)
        .map(|i| {
            if i % 5 == 2 {
                -1
            } else {
                ((i * 3 + 1) % VOCAB) as i32
            }
        })
        .collect()
}

/// embed → f → head → mean cross-entropy.
fn graph(
    f: impl Fn(&mut Tape<'_, Cpu, f64>, &P, Tensor) -> Result<Tensor>,
) -> impl Fn(&mut Tape<'_, Cpu, f64>, &P) -> Result<f64> {
    move |tape, p| {
        tape.set_batch(&LENS)?;
        let x = tape.embedding(p, p.id("embed").unwrap(), &ids())?;
        let y = f(tape, p, x)?;
        let logits = tape.linear(p, y, p.id("head").unwrap(), None)?;
        exact_loss(tape, logits, &targets())
    }
}

/// Records the cross-entropy on the tape (its backward is what is checked) and returns the mean
/// loss recomputed on the host in f64: the kernels' per-row losses are f32, too coarse for
/// finite differences.
fn exact_loss(tape: &mut Tape<'_, Cpu, f64>, logits: Tensor, targets: &[i32]) -> Result<f64> {
    tape.cross_entropy(logits, targets)?;
    let host = tape.to_host(logits)?;
    let (mut sum, mut n) = (0.0, 0);
    for (row, &t) in host.chunks(logits.cols).zip(targets) {
        if t < 0 {
            continue;
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        sum += lse - row[t as usize];
        n += 1;
    }
    Ok(sum / n as f64)
}

/// A model's loss on `batch` with the host-recomputed f64 value (see [`exact_loss`]).
fn model_loss(
    tape: &mut Tape<'_, Cpu, f64>,
    m: &TinyLm<Cpu, f64>,
    batch: &Batch,
    seed: u64,
) -> Result<f64> {
    let logits = m.forward(tape, &batch.tokens, &batch.lens, seed)?;
    exact_loss(tape, logits, &batch.targets)
}

#[test]
fn grad_embedding_linear_cross_entropy() {
    let mut p = base_params(&[("w", D, D)]);
    grad_check(
        &mut p,
        &graph(|t, p, x| t.linear(p, x, p.id("w").unwrap(), None)),
        1e-5,
        1e-6,
        1e-9,
    );
}

#[test]
fn grad_rmsnorm() {
    let mut p = base_params(&[("norm", 1, D)]);
    grad_check(
        &mut p,
        &graph(|t, p, x| t.rmsnorm(p, x, p.id("norm").unwrap(), 1e-5)),
        1e-5,
        1e-6,
        1e-9,
    );
}

#[test]
fn grad_rope() {
    let mut p = base_params(&[]);
    grad_check(
        &mut p,
        &graph(|t, _, x| t.rope(x, 2, 10_000.0)),
        1e-5,
        1e-6,
        1e-9,
    );
}

#[test]
fn grad_swiglu_and_add() {
    let mut p = base_params(&[("g", D, D), ("u", D, D)]);
    let f = graph(|t, p, x| {
        let g = t.linear(p, x, p.id("g").unwrap(), None)?;
        let u = t.linear(p, x, p.id("u").unwrap(), None)?;
        let s = t.swiglu(g, u)?;
        t.add(x, s)
    });
    grad_check(&mut p, &f, 1e-5, 1e-6, 1e-9);
}

#[test]
fn grad_attention_grouped_heads() {
    // 2 query heads of dim 16 sharing 1 KV head; sequences of 5, 1 and 7 tokens.
    let mut p = base_params(&[("q", D, D), ("k", 16, D), ("v", 16, D)]);
    let f = graph(|t, p, x| {
        let q = t.linear(p, x, p.id("q").unwrap(), None)?;
        let k = t.linear(p, x, p.id("k").unwrap(), None)?;
        let v = t.linear(p, x, p.id("v").unwrap(), None)?;
        let q = t.rope(q, 2, 10_000.0)?;
        let k = t.rope(k, 1, 10_000.0)?;
        t.attention(q, k, v, Attention::new(2, 1, 16))
    });
    grad_check(&mut p, &f, 1e-5, 1e-6, 1e-9);
}

#[test]
fn grad_lora_linear_with_dropout() {
    let mut p = base_params_with_head(24, &[("w", 24, D), ("a", 4, D), ("b", 24, 4)]);
    // W frozen as in LoRA training; A, B and the input (through the embedding) get gradients.
    let w = p.id("w").unwrap();
    p.get_mut(w).trainable = false;
    let f = graph(|t, p, x| {
        let link = LoraLink {
            a: p.id("a").unwrap(),
            b: p.id("b").unwrap(),
            rank: 4,
            scale: 2.0,
            dropout: Dropout {
                p: 0.3,
                seed: 7,
                offset: 11,
            },
        };
        t.linear(p, x, p.id("w").unwrap(), Some(link))
    });
    grad_check(&mut p, &f, 1e-3, 2e-3, 2e-5);
}

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab: VOCAB,
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_ff: 24,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
    }
}

fn tiny_batch() -> Batch {
    Batch {
        tokens: ids(),
        targets: targets(),
        lens: LENS.to_vec(),
    }
}

/// Relative tolerance where the backward reads statistics the forward saved in f32 by the kernels'
/// API (RMSNorm's rstd, attention's lse): each carries a relative error of 2⁻²⁴ ≈ 6e-8 into the
/// recomputed normalisation / probabilities, which a deep graph accumulates to ~1e-6 of a gradient.
const SAVED_F32_TOL: f64 = 2e-5;

#[test]
fn grad_whole_model_pretraining() {
    let b = Cpu;
    let mut m = TinyLm::<Cpu, f64>::new(&b, tiny_config(), 5).unwrap();
    let batch = tiny_batch();
    grad_check_on(
        &mut m,
        |m| &mut m.params,
        |tape, m| model_loss(tape, m, &batch, 0),
        1e-5,
        SAVED_F32_TOL,
        1e-9,
    );
}

#[test]
fn grad_whole_model_lora_all_projections() {
    let b = Cpu;
    let mut m = TinyLm::<Cpu, f64>::new(&b, tiny_config(), 5).unwrap();
    let lora = LoraConfig {
        target_modules: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.2,
        use_rslora: true,
    };
    m.attach_lora(&b, lora, 9).unwrap();
    // B starts at zero (PEFT's init): give it values so that every path carries gradient.
    let names: Vec<(String, usize)> = m
        .params
        .iter()
        .filter(|p| p.name.ends_with("lora_B.weight"))
        .map(|p| (p.name.clone(), p.len()))
        .collect();
    assert_eq!(names.len(), 14);
    for (i, (name, n)) in names.iter().enumerate() {
        m.set_param(&b, name, &random(40 + i as u64, *n, 0.2))
            .unwrap();
    }
    let batch = tiny_batch();
    grad_check_on(
        &mut m,
        |m| &mut m.params,
        |tape, m| model_loss(tape, m, &batch, 3),
        1e-3,
        2e-3,
        2e-5,
    );
}

#[test]
fn emu_training_matches_cpu() {
    // The emulator runs the CUDA kernels (f32 FMA chains in a fixed order); the cpu backend
    // accumulates in f64 and rounds once. After a few AdamW steps the losses agree to ~1e-5
    // relative: each kernel differs from the reference by a few f32 ulps per reduction, and the
    // optimizer's normalised steps do not amplify such differences within 3 steps.
    let cpu = losses_on(&Cpu, 3);
    let emu = losses_on(&Emu, 3);
    for (i, (c, e)) in cpu.iter().zip(&emu).enumerate() {
        assert!(
            (c - e).abs() <= 1e-4 * c.abs(),
            "step {i}: cpu {c} vs emu {e}"
        );
    }
}

#[test]
fn same_seed_same_losses() {
    assert_eq!(losses_on(&Cpu, 2), losses_on(&Cpu, 2));
    let a = losses_on(&Emu, 2);
    let b = losses_on(&Emu, 2);
    assert_eq!(
        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn checkpoint_resumes_bit_for_bit() {
    let b = Cpu;
    let c = small_demo_config();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let step = |m: &mut TinyLm<Cpu, f32>, s: usize| {
        let batch = make_batch(
            &[Task::Copy, Task::Swap],
            3,
            3,
            &mut SplitMix::new(step_seed(1, s)),
        );
        demo::train_step(&b, m, &batch, &demo::adamw(1e-2), step_seed(2, s)).unwrap()
    };
    for with_adapter in [false, true] {
        let mut m = TinyLm::<Cpu, f32>::new(&b, c.model, 3).unwrap();
        if with_adapter {
            m.attach_lora(&b, c.lora.clone(), 4).unwrap();
        }
        for s in 0..2 {
            step(&mut m, s);
        }
        m.save_checkpoint(&b, &path).unwrap();
        let after: Vec<f64> = (2..4).map(|s| step(&mut m, s)).collect();
        let mut r = TinyLm::<Cpu, f32>::new(&b, c.model, 99).unwrap();
        if with_adapter {
            r.attach_lora(&b, c.lora.clone(), 98).unwrap();
        }
        r.load_checkpoint(&b, &path).unwrap();
        let resumed: Vec<f64> = (2..4).map(|s| step(&mut r, s)).collect();
        assert_eq!(
            after.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            resumed.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "adapter {with_adapter}"
        );
    }
}

#[test]
fn serving_matches_training_forward_cpu() {
    serving_matches_training_forward(&Cpu);
}

#[test]
fn serving_matches_training_forward_emu() {
    serving_matches_training_forward(&Emu);
}

#[test]
fn reduced_demo_on_emu() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DemoConfig::reduced();
    cfg.out_dir = dir.path().to_path_buf();
    let report = demo::run(&Emu, &cfg, &mut demo::Quiet).unwrap();
    assert_eq!(report.backend, "emu");
    assert_eq!(report.adapters.len(), 3);
    for a in &report.adapters {
        assert!((0.0..=1.0).contains(&a.accuracy) && (0.0..=1.0).contains(&a.base_accuracy));
        assert!(dir
            .path()
            .join(&a.name)
            .join("adapter_model.safetensors")
            .exists());
    }
    assert!(
        report.merged_max_rel_diff <= 1e-2,
        "{}",
        report.merged_max_rel_diff
    );
    assert!(report.train_tokens_per_s > 0.0 && report.serve_tokens_per_s > 0.0);
    assert!(report.pretrain_losses.iter().all(|l| l.is_finite()));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    for key in [
        "backend",
        "adapters",
        "merged_max_rel_diff",
        "train_tokens_per_s",
        "serve_tokens_per_s",
    ] {
        assert!(json.get(key).is_some(), "report.json lacks {key}");
    }
}
