//! Shared by tests/block.rs (cpu, emu) and the GPU trials (tests/gpu_block/model.rs): training
//! losses of the reference model, and serving checked against the training forward.

use lora_kernels::autograd::Tape;
use lora_kernels::demo::{self, make_batch, step_seed, DemoConfig, SplitMix, Task};
use lora_kernels::model::{registry_layers, Engine, Request, TinyLm};
use lora_kernels::registry::AdapterRegistry;
use lora_kernels::Backend;

pub fn small_demo_config() -> DemoConfig {
    let mut c = DemoConfig::reduced();
    c.model.n_layers = 2;
    c
}

/// Losses of `steps` training steps of a fresh model on backend `b` (pretraining, then with an
/// adapter with dropout), same data for every backend.
pub fn losses_on<B: Backend>(b: &B, steps: usize) -> Vec<f64> {
    let c = small_demo_config();
    let mut m = TinyLm::<B, f32>::new(b, c.model, 3).unwrap();
    let mut out = Vec::new();
    for phase in 0..2 {
        if phase == 1 {
            m.attach_lora(b, c.lora.clone(), 4).unwrap();
        }
        for s in 0..steps {
            let batch = make_batch(
                &[Task::Copy, Task::Reverse],
                3,
                3,
                &mut SplitMix::new(step_seed(phase, s)),
            );
            out.push(
                demo::train_step(
                    b,
                    &mut m,
                    &batch,
                    &demo::adamw(1e-2),
                    step_seed(phase + 7, s),
                )
                .unwrap(),
            );
        }
    }
    out
}

/// Greedy continuation by recomputing the whole sequence each step through the training forward
/// (no KV cache), the reference for the engine's decode.
pub fn greedy_by_recompute<B: Backend>(
    b: &B,
    m: &TinyLm<B, f32>,
    prompt: &[i32],
    n: usize,
) -> Vec<i32> {
    let mut seq = prompt.to_vec();
    let vocab = m.cfg.vocab;
    for _ in 0..n {
        let mut tape = Tape::no_grad(b).unwrap();
        let logits = m.forward(&mut tape, &seq, &[seq.len()], 0).unwrap();
        let host = tape.to_host(logits).unwrap();
        let last = &host[(seq.len() - 1) * vocab..seq.len() * vocab];
        let mut best = 0;
        for (i, &v) in last.iter().enumerate() {
            if v > last[best] {
                best = i;
            }
        }
        seq.push(best as i32);
    }
    seq[prompt.len()..].to_vec()
}

pub fn serving_matches_training_forward<B: Backend + 'static>(b: &B) {
    let c = small_demo_config();
    let mut m = TinyLm::<B, f32>::new(b, c.model, 3).unwrap();
    // Train the adapter a little so that B is not zero, export it, reattach nothing.
    m.attach_lora(b, c.lora.clone(), 4).unwrap();
    for s in 0..2 {
        let batch = make_batch(&[Task::Reverse], 3, 3, &mut SplitMix::new(step_seed(5, s)));
        demo::train_step(b, &mut m, &batch, &demo::adamw(3e-2), step_seed(6, s)).unwrap();
    }
    let peft = m.export_peft(b).unwrap();
    let prompts: Vec<Vec<i32>> = vec![
        vec![1, 5, 20, 21, 22, 2],
        vec![1, 3, 9, 2],
        vec![1, 6, 30, 31, 40, 41, 42, 2],
    ];
    // Reference continuations: the training forward with the adapter (dropout is off in no_grad).
    let with: Vec<Vec<i32>> = prompts
        .iter()
        .map(|p| greedy_by_recompute(b, &m, p, 4))
        .collect();
    m.detach_lora();
    let without: Vec<Vec<i32>> = prompts
        .iter()
        .map(|p| greedy_by_recompute(b, &m, p, 4))
        .collect();

    let mut registry =
        AdapterRegistry::<B, f32>::new(b, registry_layers(&c.model), 2, c.lora.r).unwrap();
    let id = registry.add(b, "a", &peft).unwrap();
    let requests: Vec<Request> = prompts
        .iter()
        .flat_map(|p| {
            [
                Request {
                    prompt: p.clone(),
                    adapter: Some(id),
                },
                Request {
                    prompt: p.clone(),
                    adapter: None,
                },
            ]
        })
        .collect();
    let engine = Engine::new(&m);
    let g = engine.generate(b, Some(&registry), &requests, 4).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(g.tokens[2 * i], with[i], "prompt {p:?} with the adapter");
        assert_eq!(g.tokens[2 * i + 1], without[i], "prompt {p:?} without");
    }
    // Merged weights serve the same logits as the unmerged adapter.
    let only: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            adapter: Some(id),
        })
        .collect();
    let unmerged = engine
        .generate(b, Some(&registry), &only, 1)
        .unwrap()
        .prefill_logits;
    let plain: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            adapter: None,
        })
        .collect();
    let merged = Engine::merged(b, &m, &peft)
        .unwrap()
        .generate(b, None, &plain, 1)
        .unwrap()
        .prefill_logits;
    let scale = unmerged.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (u, v) in unmerged.iter().zip(&merged) {
        assert!((u - v).abs() <= 1e-4 * scale, "merged {v} vs unmerged {u}");
    }
}
