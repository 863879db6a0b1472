//! `lora-kernels`: merge PEFT LoRA adapters into safetensors base weights (and back) without Python.
//!
//! ```text
//! lora-kernels merge   --base BASE.safetensors   --adapter DIR --out OUT.safetensors [--exact-record FILE]
//! lora-kernels unmerge --base MERGED.safetensors --adapter DIR --out OUT.safetensors [--exact-record FILE]
//! lora-kernels inspect DIR [--json]
//! ```
//! Every command takes `--backend cpu|emu|cuda` (default: cuda when built with it and a GPU is
//! present, else cpu). Nothing is written to `--out` (or the record) unless the command succeeded.
//! Exit status: 0 success, 1 error (message on stderr), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lora_kernels::peft::{self, MergeOp, MergeOptions, PeftAdapter, PeftError};
use lora_kernels::{Backend, Cpu, Emu};

#[derive(Parser)]
#[command(
    name = "lora-kernels",
    version,
    about = "Merge, unmerge and inspect PEFT LoRA adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum BackendArg {
    Cpu,
    Emu,
    Cuda,
}

#[derive(clap::Args)]
struct Common {
    /// Where kernels run (default: cuda when built with it and a GPU is present, else cpu).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The base (for unmerge: the merged) weights.
    #[arg(long)]
    base: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output safetensors file (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Exact mode: merge writes this correction record; unmerge reads it and restores the base
    /// bit for bit.
    #[arg(long)]
    exact_record: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
enum Command {
    /// Merge the adapter into the base weights (PEFT's merge_and_unload).
    Merge(MergeArgs),
    /// Remove a merged adapter (bit-exact with the record from `merge --exact-record`).
    Unmerge(MergeArgs),
    /// Show an adapter's config, modules, ranks, scales and sizes.
    Inspect {
        adapter: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), PeftError> {
    match cli.command {
        Command::Merge(a) => merge(&*backend(a.common.backend)?, &a, MergeOp::Merge),
        Command::Unmerge(a) => merge(&*backend(a.common.backend)?, &a, MergeOp::Unmerge),
        Command::Inspect {
            adapter,
            json,
            common,
        } => {
            // Inspect runs no kernel, but the backend is still resolved so a bad choice errors.
            backend(common.backend)?;
            inspect(&adapter, json)
        }
    }
}

/// The chosen backend.
fn backend(choice: Option<BackendArg>) -> Result<Box<dyn AnyBackend>, PeftError> {
    match choice {
        Some(BackendArg::Cpu) => Ok(Box::new(Owned(Cpu))),
        Some(BackendArg::Emu) => Ok(Box::new(Owned(Emu))),
        Some(BackendArg::Cuda) => cuda(true),
        None => cuda(false),
    }
}

#[cfg(feature = "cuda")]
fn cuda(explicit: bool) -> Result<Box<dyn AnyBackend>, PeftError> {
    match lora_kernels::Cuda::new(0) {
        Ok(c) => Ok(Box::new(Owned(c))),
        Err(e) if explicit => Err(e.into()),
        Err(_) => Ok(Box::new(Owned(Cpu))),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(explicit: bool) -> Result<Box<dyn AnyBackend>, PeftError> {
    if explicit {
        return Err(lora_kernels::Error::NoCudaDevice(
            "this lora-kernels was built without the `cuda` feature".into(),
        )
        .into());
    }
    Ok(Box::new(Owned(Cpu)))
}

/// What the commands need from a backend, object-safe.
trait AnyBackend {
    fn merge_file(
        &self,
        base: &std::path::Path,
        adapter: &PeftAdapter,
        out: &std::path::Path,
        op: MergeOp,
        opts: MergeOptions<'_>,
    ) -> Result<peft::MergeSummary, PeftError>;
}
struct Owned<B: Backend>(B);
impl<B: Backend> AnyBackend for Owned<B> {
    fn merge_file(
        &self,
        base: &std::path::Path,
        adapter: &PeftAdapter,
        out: &std::path::Path,
        op: MergeOp,
        opts: MergeOptions<'_>,
    ) -> Result<peft::MergeSummary, PeftError> {
        peft::merge_file(&self.0, base, adapter, out, op, opts)
    }
}

fn merge(b: &dyn AnyBackend, a: &MergeArgs, op: MergeOp) -> Result<(), PeftError> {
    let adapter = PeftAdapter::load(&a.adapter)?;
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(match op {
        MergeOp::Merge => "merging",
        MergeOp::Unmerge => "unmerging",
    });
    let (b1, b2) = (bar.clone(), bar.clone());
    let mut on_total = move |n| b1.set_length(n);
    let mut on_progress = move |n| b2.inc(n);
    let summary = b.merge_file(
        &a.base,
        &adapter,
        &a.out,
        op,
        MergeOptions {
            exact_record: a.exact_record.clone(),
            on_total: Some(&mut on_total),
            on_progress: Some(&mut on_progress),
        },
    );
    bar.finish_and_clear();
    let s = summary?;
    if !a.quiet {
        eprintln!(
            "{} {} of {} tensors into {} ({} bytes){}",
            match op {
                MergeOp::Merge => "merged",
                MergeOp::Unmerge => "unmerged",
            },
            s.merged.len(),
            s.tensors,
            a.out.display(),
            s.bytes_written,
            match (&a.exact_record, op) {
                (Some(p), MergeOp::Merge) => format!(
                    "; exact record {} ({} exceptions)",
                    p.display(),
                    s.record_exceptions
                ),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

fn inspect(dir: &std::path::Path, json: bool) -> Result<(), PeftError> {
    let adapter = PeftAdapter::load(dir)?;
    let info = adapter.inspect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).expect("serialisable")
        );
        return Ok(());
    }
    let c = &info.config;
    println!("adapter: {}", dir.display());
    println!(
        "r = {}, lora_alpha = {}, use_rslora = {}, fan_in_fan_out = {}, lora_dropout = {}, bias = {}",
        c.r, c.lora_alpha, c.use_rslora, c.fan_in_fan_out, c.lora_dropout, c.bias
    );
    println!(
        "target_modules = {}",
        serde_json::to_string(&c.target_modules).unwrap_or_default()
    );
    if !c.rank_pattern.is_empty() {
        println!(
            "rank_pattern = {}",
            serde_json::to_string(&c.rank_pattern).unwrap_or_default()
        );
    }
    if !c.alpha_pattern.is_empty() {
        println!(
            "alpha_pattern = {}",
            serde_json::to_string(&c.alpha_pattern).unwrap_or_default()
        );
    }
    println!(
        "{:<48} {:>5} {:>8} {:>10} {:>6} {:>6} {:>5} {:>10}",
        "module", "rank", "alpha", "scale", "d_in", "d_out", "dtype", "bytes"
    );
    for m in &info.modules {
        println!(
            "{:<48} {:>5} {:>8} {:>10.6} {:>6} {:>6} {:>5} {:>10}",
            m.name, m.rank, m.alpha, m.scale, m.d_in, m.d_out, m.dtype, m.bytes
        );
    }
    println!(
        "{} modules, {} parameters, {} bytes",
        info.modules.len(),
        info.total_parameters,
        info.total_bytes
    );
    Ok(())
}
