//! The README demo: train LoRA adapters on a tiny Llama-style LM and serve them together, entirely
//! on this crate's kernels. `cargo run --release --example demo -- --help`.
//!
//! Writes `target/demo/report.json` and the adapters (PEFT format) under `target/demo/`.

use std::process::ExitCode;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lora_kernels::demo::{self, DemoConfig, Progress, Report};
use lora_kernels::{Backend, BackendKind, Cpu, Emu};

#[derive(Parser, Debug)]
#[command(about = "Train LoRA adapters on a tiny Llama-style LM and serve them in one mixed batch")]
struct Args {
    /// cpu, emu or cuda (default: cuda when built with it and a GPU is present, else cpu).
    #[arg(long)]
    backend: Option<BackendKind>,
    /// A few steps of everything (what CI runs on the emulator).
    #[arg(long)]
    reduced: bool,
    /// Override the pretraining steps.
    #[arg(long)]
    pretrain_steps: Option<usize>,
    /// Override each adapter's training steps.
    #[arg(long)]
    adapter_steps: Option<usize>,
    /// Output directory (adapters and report.json).
    #[arg(long, default_value = "target/demo")]
    out: std::path::PathBuf,
    /// Seed for data and initialisation.
    #[arg(long)]
    seed: Option<u64>,
}

struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn start(&mut self, phase: &str, total: usize) {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(phase.to_string());
        self.bar = Some(bar);
    }
    fn step(&mut self, loss: f64) {
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {loss:.4}"));
            b.inc(1);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
    fn say(&mut self, line: &str) {
        println!("{line}");
    }
}

fn print_report(r: &Report) {
    println!();
    println!(
        "{:<18} {:<8} {:>16} {:>16}",
        "adapter", "task", "accuracy", "base accuracy"
    );
    for a in &r.adapters {
        println!(
            "{:<18} {:<8} {:>16.3} {:>16.3}",
            a.name, a.task, a.accuracy, a.base_accuracy
        );
    }
    println!();
    println!(
        "merged vs unmerged logits: max |merged − unmerged| / max |unmerged| = {:.3e}",
        r.merged_max_rel_diff
    );
    println!(
        "training {:.0} tokens/s, serving {:.0} tokens/s ({} backend)",
        r.train_tokens_per_s, r.serve_tokens_per_s, r.backend
    );
}

fn run_on<B: Backend + 'static>(b: &B, cfg: &DemoConfig) -> lora_kernels::Result<Report> {
    demo::run(b, cfg, &mut Bars { bar: None })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut cfg = if args.reduced {
        DemoConfig::reduced()
    } else {
        DemoConfig::full()
    };
    if let Some(s) = args.pretrain_steps {
        cfg.pretrain_steps = s;
    }
    if let Some(s) = args.adapter_steps {
        cfg.adapter_steps = s;
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    cfg.out_dir = args.out.clone();
    let kind = args.backend.unwrap_or_else(default_backend);
    let result = match kind {
        BackendKind::Cpu => run_on(&Cpu, &cfg),
        BackendKind::Emu => run_on(&Emu, &cfg),
        BackendKind::Cuda => run_cuda(&cfg),
    };
    match result {
        Ok(report) => {
            print_report(&report);
            println!("report: {}", cfg.out_dir.join("report.json").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "cuda")]
fn default_backend() -> BackendKind {
    match lora_kernels::Cuda::new(0) {
        Ok(_) => BackendKind::Cuda,
        Err(_) => BackendKind::Cpu,
    }
}

#[cfg(not(feature = "cuda"))]
fn default_backend() -> BackendKind {
    BackendKind::Cpu
}

#[cfg(feature = "cuda")]
fn run_cuda(cfg: &DemoConfig) -> lora_kernels::Result<Report> {
    let dev = lora_kernels::Cuda::new(0)?;
    run_on(&dev, cfg)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &DemoConfig) -> lora_kernels::Result<Report> {
    Err(lora_kernels::Error::NoCudaDevice(
        "this build has no CUDA support: rebuild with --features cuda".into(),
    ))
}
