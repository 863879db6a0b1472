//! The README demo (issue #7), as a library so that CI runs a reduced version as a test:
//! pretrain a tiny Llama-style LM on a mixture of procedural tasks, freeze it, train one LoRA
//! adapter per task on new tasks, save each as a PEFT adapter, load them into an
//! [`AdapterRegistry`] and serve one mixed batch (each request with its adapter or none) with SGMV
//! prefill and BGMV decode over a KV cache; compare merged and unmerged logits.
//!
//! **Data** is generated in-process from a seed: a sequence is
//! `[BOS, task, x₁ … x_L, SEP, y₁ … y_L]`; the loss covers the `y` tokens only. Pretraining tasks:
//! `copy` and `swap` (swap adjacent pairs). Adapter tasks (tokens the base never saw): `reverse`
//! (letters), `sort` (digits, ascending) and `shift` (each letter +1, z → a).
//! **Accuracy** is exact match of the whole generated `y` (greedy decoding).

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::autograd::Tape;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{registry_layers, Batch, Engine, LlamaConfig, LoraConfig, Request, TinyLm};
use crate::optim::AdamW;
use crate::peft::PeftAdapter;
use crate::registry::AdapterRegistry;

pub const PAD: i32 = 0;
pub const BOS: i32 = 1;
pub const SEP: i32 = 2;
const TASK_BASE: i32 = 3;
const DIGIT_BASE: i32 = 8;
const LETTER_BASE: i32 = 18;
/// Tokens: PAD, BOS, SEP, 5 task tokens, 10 digits, 26 letters (44), padded to 48.
pub const VOCAB: usize = 48;

/// The procedural tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Copy,
    Swap,
    Reverse,
    Sort,
    Shift,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Copy => "copy",
            Task::Swap => "swap",
            Task::Reverse => "reverse",
            Task::Sort => "sort",
            Task::Shift => "shift",
        }
    }
    fn token(self) -> i32 {
        TASK_BASE
            + match self {
                Task::Copy => 0,
                Task::Swap => 1,
                Task::Reverse => 2,
                Task::Sort => 3,
                Task::Shift => 4,
            }
    }
    /// (input, expected output) of one example.
    fn example(self, rng: &mut SplitMix, len: usize) -> (Vec<i32>, Vec<i32>) {
        let letters = |rng: &mut SplitMix| -> Vec<i32> {
            (0..len)
                .map(|_| LETTER_BASE + rng.below(26) as i32)
                .collect()
        };
        let digits = |rng: &mut SplitMix| -> Vec<i32> {
            (0..len)
                .map(|_| DIGIT_BASE + rng.below(10) as i32)
                .collect()
        };
        match self {
            Task::Copy => {
                let x = if rng.below(2) == 0 {
                    letters(rng)
                } else {
                    digits(rng)
                };
                (x.clone(), x)
            }
            Task::Swap => {
                let x = if rng.below(2) == 0 {
                    letters(rng)
                } else {
                    digits(rng)
                };
                let mut y = x.clone();
                for pair in y.chunks_mut(2) {
                    pair.reverse();
                }
                (x, y)
            }
            Task::Reverse => {
                let x = letters(rng);
                (x.clone(), x.into_iter().rev().collect())
            }
            Task::Sort => {
                let x = digits(rng);
                let mut y = x.clone();
                y.sort_unstable();
                (x, y)
            }
            Task::Shift => {
                let x = letters(rng);
                let y = x
                    .iter()
                    .map(|&c| LETTER_BASE + (c - LETTER_BASE + 1) % 26)
                    .collect();
                (x, y)
            }
        }
    }
    /// The prompt `[BOS, task, x…, SEP]`.
    fn prompt(self, x: &[i32]) -> Vec<i32> {
        let mut p = vec![BOS, self.token()];
        p.extend_from_slice(x);
        p.push(SEP);
        p
    }
}

/// A small deterministic generator (SplitMix64) for the data.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A training batch of `n` examples drawn from `tasks` (uniformly).
pub fn make_batch(tasks: &[Task], n: usize, len: usize, rng: &mut SplitMix) -> Batch {
    let mut batch = Batch::default();
    for _ in 0..n {
        let task = tasks[rng.below(tasks.len() as u64) as usize];
        let (x, y) = task.example(rng, len);
        let mut seq = task.prompt(&x);
        let prompt_len = seq.len();
        seq.extend_from_slice(&y);
        // Position i predicts token i + 1; only the answer is scored.
        let targets: Vec<i32> = (0..seq.len())
            .map(|i| {
                if i + 1 >= prompt_len && i + 1 < seq.len() {
                    seq[i + 1]
                } else {
                    -1
                }
            })
            .collect();
        batch.lens.push(seq.len());
        batch.tokens.extend_from_slice(&seq);
        batch.targets.extend_from_slice(&targets);
    }
    batch
}

/// Demo sizes and schedule.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub model: LlamaConfig,
    pub lora: LoraConfig,
    /// Length of every task's input and output.
    pub len: usize,
    pub batch: usize,
    pub pretrain_steps: usize,
    pub pretrain_lr: f32,
    pub adapter_steps: usize,
    pub adapter_lr: f32,
    /// Requests per task served (with its adapter, and the same prompts again without).
    pub eval_per_task: usize,
    pub seed: u64,
    /// Where adapters and the report go.
    pub out_dir: PathBuf,
}

impl DemoConfig {
    /// The README demo.
    pub fn full() -> Self {
        DemoConfig {
            model: LlamaConfig {
                vocab: VOCAB,
                d_model: 64,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                d_ff: 128,
                rope_theta: 10_000.0,
                norm_eps: 1e-5,
            },
            lora: LoraConfig {
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
                r: 8,
                lora_alpha: 16.0,
                lora_dropout: 0.05,
                use_rslora: false,
            },
            len: 5,
            batch: 32,
            pretrain_steps: 400,
            pretrain_lr: 3e-3,
            adapter_steps: 300,
            adapter_lr: 5e-3,
            eval_per_task: 64,
            seed: 2026,
            out_dir: PathBuf::from("target/demo"),
        }
    }

    /// A few steps of everything (CI on the emulator): exercises every kernel, trains nothing to
    /// accuracy.
    pub fn reduced() -> Self {
        let mut c = Self::full();
        c.model.d_model = 32;
        c.model.n_heads = 2;
        c.model.n_kv_heads = 1;
        c.model.d_ff = 48;
        c.model.n_layers = 1;
        c.len = 3;
        c.batch = 4;
        c.pretrain_steps = 2;
        c.adapter_steps = 2;
        c.eval_per_task = 2;
        c
    }
}

/// One adapter's line in the report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AdapterResult {
    pub name: String,
    pub task: String,
    pub accuracy: f64,
    pub base_accuracy: f64,
}

/// `target/demo/report.json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub backend: String,
    pub adapters: Vec<AdapterResult>,
    pub merged_max_rel_diff: f64,
    pub train_tokens_per_s: f64,
    pub serve_tokens_per_s: f64,
    /// Losses: pretraining (every step), then each adapter's.
    pub pretrain_losses: Vec<f64>,
    pub adapter_losses: Vec<Vec<f64>>,
}

/// What the demo tells its caller while it runs (the CLI draws progress bars from it).
pub trait Progress {
    /// A phase starts (`total` steps).
    fn start(&mut self, phase: &str, total: usize);
    /// A step ended with this loss.
    fn step(&mut self, loss: f64);
    /// The phase ended.
    fn finish(&mut self);
    /// A line of output.
    fn say(&mut self, line: &str);
}

/// Progress that only prints the lines.
pub struct Quiet;
impl Progress for Quiet {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self, _: f64) {}
    fn finish(&mut self) {}
    fn say(&mut self, _: &str) {}
}

/// The adapter tasks, in order.
pub const ADAPTER_TASKS: [Task; 3] = [Task::Reverse, Task::Sort, Task::Shift];
/// The pretraining mixture.
pub const PRETRAIN_TASKS: [Task; 2] = [Task::Copy, Task::Swap];

/// Cosine decay with a short linear warm-up.
fn lr_at(base: f32, step: usize, total: usize) -> f32 {
    let warm = (total / 10).max(1);
    if step < warm {
        return base * (step + 1) as f32 / warm as f32;
    }
    let t = (step - warm) as f32 / (total - warm).max(1) as f32;
    base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * t).cos()))
}

/// The demo's optimizer settings at learning rate `lr`.
pub fn adamw(lr: f32) -> AdamW {
    AdamW {
        lr,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: 0.0,
    }
}

/// One optimizer step: forward, backward, AdamW with the gradient norm clipped to 1. Returns the
/// step's loss (before the update).
pub fn train_step<B: Backend>(
    b: &B,
    model: &mut TinyLm<B, f32>,
    batch: &Batch,
    opt: &AdamW,
    seed: u64,
) -> Result<f64> {
    let mut tape = Tape::new(b)?;
    let loss = model.loss(&mut tape, batch, seed)?;
    tape.backward(&mut model.params)?;
    model.params.adamw_step(b, opt, Some(1.0))?;
    model.params.zero_grad();
    Ok(loss)
}

/// The seed of step `step` of a run seeded `seed` (data and dropout).
pub fn step_seed(seed: u64, step: usize) -> u64 {
    SplitMix::new(seed ^ (step as u64).wrapping_mul(0xA24B_AED4_963E_E407)).next_u64()
}

/// Trains `model`'s trainable parameters on `tasks` for `steps` steps; returns the losses.
#[allow(clippy::too_many_arguments)]
pub fn train<B: Backend>(
    b: &B,
    model: &mut TinyLm<B, f32>,
    tasks: &[Task],
    cfg: &DemoConfig,
    steps: usize,
    lr: f32,
    seed: u64,
    progress: &mut dyn Progress,
) -> Result<(Vec<f64>, usize)> {
    let mut losses = Vec::with_capacity(steps);
    let mut tokens = 0;
    for step in 0..steps {
        // Each step's data and dropout masks depend only on (seed, step): a run resumed from a
        // checkpoint sees the same batches.
        let batch = make_batch(
            tasks,
            cfg.batch,
            cfg.len,
            &mut SplitMix::new(step_seed(seed, step)),
        );
        tokens += batch.tokens.len();
        let opt = adamw(lr_at(lr, step, steps));
        let loss = train_step(b, model, &batch, &opt, step_seed(seed, step))?;
        losses.push(loss);
        progress.step(loss);
    }
    Ok((losses, tokens))
}

/// `print_trainable_parameters()` as PEFT prints it.
pub fn trainable_line(trainable: usize, all: usize) -> String {
    let group = |n: usize| {
        let s = n.to_string();
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        out
    };
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        group(trainable),
        group(all),
        100.0 * trainable as f64 / all.max(1) as f64
    )
}

/// Runs the whole demo on backend `b`.
pub fn run<B: Backend + 'static>(
    b: &B,
    cfg: &DemoConfig,
    progress: &mut dyn Progress,
) -> Result<Report> {
    std::fs::create_dir_all(&cfg.out_dir)
        .map_err(|e| Error::invalid("out_dir", "a writable directory", e.to_string()))?;
    let mut model = TinyLm::<B, f32>::new(b, cfg.model, cfg.seed)?;
    let (n_train, n_all) = model.params.counts();
    progress.say(&format!("backend: {}", b.name()));
    progress.say(&format!("base model: {n_all} parameters ({:?})", cfg.model));

    let train_start = Instant::now();
    progress.start("pretrain (copy, swap)", cfg.pretrain_steps);
    let (pretrain_losses, mut train_tokens) = train(
        b,
        &mut model,
        &PRETRAIN_TASKS,
        cfg,
        cfg.pretrain_steps,
        cfg.pretrain_lr,
        cfg.seed,
        progress,
    )?;
    progress.finish();
    debug_assert_eq!(n_train, n_all);

    let mut adapters = Vec::new();
    let mut adapter_losses = Vec::new();
    for (i, task) in ADAPTER_TASKS.iter().enumerate() {
        let seed = cfg.seed + 101 * (i as u64 + 1);
        model.attach_lora(b, cfg.lora.clone(), seed)?;
        let (t, a) = model.params.counts();
        progress.say(&format!(
            "adapter `{}`: {}",
            task.name(),
            trainable_line(t, a)
        ));
        progress.start(&format!("adapter {}", task.name()), cfg.adapter_steps);
        let (losses, tokens) = train(
            b,
            &mut model,
            &[*task],
            cfg,
            cfg.adapter_steps,
            cfg.adapter_lr,
            seed,
            progress,
        )?;
        progress.finish();
        train_tokens += tokens;
        adapter_losses.push(losses);
        let peft = model.export_peft(b)?;
        let dir = cfg.out_dir.join(format!("adapter-{}", task.name()));
        peft.save(&dir)
            .map_err(|e| Error::invalid("adapter dir", "writable", e.to_string()))?;
        adapters.push((*task, dir));
        model.detach_lora();
    }
    let train_secs = train_start.elapsed().as_secs_f64();

    // Serve: load the saved adapters into a registry and run one mixed batch.
    let mut registry =
        AdapterRegistry::<B, f32>::new(b, registry_layers(&cfg.model), adapters.len(), cfg.lora.r)?;
    let mut loaded = Vec::new();
    for (task, dir) in &adapters {
        let peft = PeftAdapter::load(dir)
            .map_err(|e| Error::invalid("adapter", "a loadable PEFT adapter", e.to_string()))?;
        let id = registry.add(b, task.name(), &peft)?;
        loaded.push((*task, id, peft));
    }
    let mut rng = SplitMix::new(cfg.seed ^ 0xE7A1);
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for (task, id, _) in &loaded {
        for _ in 0..cfg.eval_per_task {
            let (x, y) = task.example(&mut rng, cfg.len);
            for adapter in [Some(*id), None] {
                requests.push(Request {
                    prompt: task.prompt(&x),
                    adapter,
                });
                expected.push(y.clone());
            }
        }
    }
    // Interleave so that the batch really mixes adapters.
    let order: Vec<usize> = {
        let mut o: Vec<usize> = (0..requests.len()).collect();
        for i in (1..o.len()).rev() {
            o.swap(i, rng.below(i as u64 + 1) as usize);
        }
        o
    };
    let shuffled: Vec<Request> = order.iter().map(|&i| requests[i].clone()).collect();
    let engine = Engine::new(&model);
    let serve_start = Instant::now();
    let generated = engine.generate(b, Some(&registry), &shuffled, cfg.len)?;
    let serve_secs = serve_start.elapsed().as_secs_f64();
    let mut correct = vec![[0usize; 2]; loaded.len()];
    for (k, &i) in order.iter().enumerate() {
        let task_index = i / (2 * cfg.eval_per_task);
        let with_adapter = i % 2 == 0;
        if generated.tokens[k] == expected[i] {
            correct[task_index][usize::from(!with_adapter)] += 1;
        }
    }

    // Merged vs unmerged: the same prompts served through the registry and through weights with
    // the adapter merged in.
    let mut merged_max_rel_diff = 0.0f64;
    for (task, id, peft) in &loaded {
        let prompts: Vec<Request> = (0..cfg.eval_per_task.min(16))
            .map(|_| {
                let (x, _) = task.example(&mut rng, cfg.len);
                Request {
                    prompt: task.prompt(&x),
                    adapter: Some(*id),
                }
            })
            .collect();
        let unmerged = engine
            .generate(b, Some(&registry), &prompts, 1)?
            .prefill_logits;
        let plain: Vec<Request> = prompts
            .iter()
            .map(|r| Request {
                prompt: r.prompt.clone(),
                adapter: None,
            })
            .collect();
        let merged = Engine::merged(b, &model, peft)?
            .generate(b, None, &plain, 1)?
            .prefill_logits;
        let max_abs = unmerged
            .iter()
            .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
        let max_diff = unmerged
            .iter()
            .zip(&merged)
            .fold(0.0f64, |m, (&u, &v)| m.max((u as f64 - v as f64).abs()));
        merged_max_rel_diff = merged_max_rel_diff.max(max_diff / max_abs.max(f64::MIN_POSITIVE));
    }

    let results: Vec<AdapterResult> = loaded
        .iter()
        .zip(&correct)
        .map(|((task, _, _), c)| AdapterResult {
            name: format!("adapter-{}", task.name()),
            task: task.name().into(),
            accuracy: c[0] as f64 / cfg.eval_per_task as f64,
            base_accuracy: c[1] as f64 / cfg.eval_per_task as f64,
        })
        .collect();
    let report = Report {
        backend: b.name().into(),
        adapters: results,
        merged_max_rel_diff,
        train_tokens_per_s: train_tokens as f64 / train_secs.max(1e-9),
        serve_tokens_per_s: generated.processed as f64 / serve_secs.max(1e-9),
        pretrain_losses,
        adapter_losses,
    };
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    std::fs::write(cfg.out_dir.join("report.json"), json)
        .map_err(|e| Error::invalid("out_dir", "a writable directory", e.to_string()))?;
    Ok(report)
}
