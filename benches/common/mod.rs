//! What every family module of `benches/kernels.rs` shares:
//! - [`Filter`]: criterion's own name filter, parsed again so that a family skips the *setup* of
//!   cases the filter excludes (criterion only skips their timing);
//! - [`Ctx`] and [`Group`]: one call, [`Group::run`], benchmarks a case on any backend — cpu/emu with
//!   `Bencher::iter`, cuda with CUDA events or CUDA-graph replays over rotating input sets
//!   (`gpu.rs`) — and records its minimum bytes, FLOPs and roofline in the sidecar;
//! - [`Sidecar`]: `lk-bench.jsonl` beside criterion's results (`$CRITERION_HOME`, else
//!   `$CARGO_TARGET_DIR/criterion`, else `target/criterion`): one JSON object per line, keyed by
//!   `id` = criterion's `full_id`; `scripts/gpu-kit-run.sh` folds it into `results.json`;
//! - data helpers and a counting global allocator (host memory of a training step).

#![allow(dead_code)]

pub mod alloc;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod serving;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use lora_kernels::{Backend, Float};
use serde_json::{json, Value};

/// What a case returns: kernels' [`lora_kernels::Error`], cudarc's and cuBLAS's errors alike.
pub type BenchResult = Result<(), Box<dyn std::error::Error>>;

/// Whether to run the host backends (the GPU kit sets `LK_BENCH_ONLY_CUDA=1`).
pub fn host_backends() -> bool {
    std::env::var("LK_BENCH_ONLY_CUDA").map_or(true, |v| v != "1")
}

// ---- criterion's name filter -------------------------------------------------------------------

enum FilterKind {
    All,
    Regex(regex::Regex),
    Exact(String),
    None,
}

/// Criterion's command-line filter (`cargo bench -- <FILTER> [--exact]`), parsed the way criterion
/// 0.7 parses it, so that setup is skipped for cases criterion would skip. A regex this crate's
/// `regex` build cannot compile selects everything (criterion still filters the timing).
pub struct Filter {
    kind: FilterKind,
    /// `--list`: criterion only prints ids.
    pub list: bool,
    /// `--test`: every routine runs once.
    pub test: bool,
    /// `--sample-size` (criterion's samples per case; ours: 10 unless given).
    pub sample_size: usize,
}

impl Filter {
    pub fn from_args() -> Self {
        // Options of criterion 0.7 that take a value (the next argument unless given with `=`).
        const WITH_VALUE: &[&str] = &[
            "-c",
            "--color",
            "--colour",
            "-s",
            "--save-baseline",
            "-b",
            "--baseline",
            "--baseline-lenient",
            "--format",
            "--profile-time",
            "--load-baseline",
            "--sample-size",
            "--warm-up-time",
            "--measurement-time",
            "--nresamples",
            "--noise-threshold",
            "--confidence-level",
            "--significance-level",
            "--plotting-backend",
            "--output-format",
        ];
        let args: Vec<String> = std::env::args().skip(1).collect();
        let (mut filter, mut exact, mut ignored) = (None, false, false);
        let mut f = Filter {
            kind: FilterKind::All,
            list: false,
            test: false,
            sample_size: 10,
        };
        let mut i = 0;
        while i < args.len() {
            let a = args[i].as_str();
            if let Some((key, value)) = a.split_once('=').filter(|_| a.starts_with("--")) {
                if key == "--sample-size" {
                    f.sample_size = value.parse().unwrap_or(f.sample_size);
                }
            } else if WITH_VALUE.contains(&a) {
                if a == "--sample-size" {
                    if let Some(v) = args.get(i + 1) {
                        f.sample_size = v.parse().unwrap_or(f.sample_size);
                    }
                }
                i += 1;
            } else if a == "--exact" {
                exact = true;
            } else if a == "--ignored" {
                ignored = true;
            } else if a == "--list" {
                f.list = true;
            } else if a == "--test" {
                f.test = true;
            } else if !a.starts_with('-') && filter.is_none() {
                filter = Some(a.to_string());
            }
            i += 1;
        }
        f.kind = match (ignored, filter, exact) {
            (true, _, _) => FilterKind::None,
            (false, None, _) => FilterKind::All,
            (false, Some(s), true) => FilterKind::Exact(s),
            (false, Some(s), false) => match regex::Regex::new(&s) {
                Ok(r) => FilterKind::Regex(r),
                Err(_) => FilterKind::All,
            },
        };
        f
    }

    /// Whether criterion will run the case whose full id is `id`.
    pub fn selects(&self, id: &str) -> bool {
        match &self.kind {
            FilterKind::All => true,
            FilterKind::Regex(r) => r.is_match(id),
            FilterKind::Exact(s) => s == id,
            FilterKind::None => false,
        }
    }
}

// ---- cases -------------------------------------------------------------------------------------

/// Which ceiling bounds a case's arithmetic (with the copy bandwidth bounding its bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compute {
    /// Bytes only (copies, elementwise work).
    #[default]
    Memory,
    /// CUDA-core FMA: bounded by the measured cuBLAS SGEMM rate (FP32, no TF32).
    Fma,
    /// Tensor cores, f16 inputs: the measured cuBLAS HGEMM rate.
    TensorF16,
    /// Tensor cores, bf16 inputs: the measured cuBLAS bf16 GEMM rate.
    TensorBf16,
}

impl Compute {
    pub fn name(self) -> &'static str {
        match self {
            Compute::Memory => "memory",
            Compute::Fma => "fma_f32",
            Compute::TensorF16 => "tensor_f16",
            Compute::TensorBf16 => "tensor_bf16",
        }
    }
    /// Tensor cores for a 16-bit type, FMA for f32.
    pub fn tensor_for<T: Float>() -> Self {
        match T::DTYPE {
            lora_kernels::DType::F16 => Compute::TensorF16,
            lora_kernels::DType::BF16 => Compute::TensorBf16,
            _ => Compute::Fma,
        }
    }
}

/// How a case relates to another one (recorded; the live print and `results-to-md.py` show it).
#[derive(Clone, Debug)]
pub struct Vs {
    /// Full id of the case this one is compared with.
    pub id: String,
    /// What this case is, e.g. "cuBLAS GEMM per adapter".
    pub label: &'static str,
    /// `"baseline"`: this case is someone else's way to do `id`'s work (speedup = this / ours);
    /// `"overhead"`: this case is `id` plus extra work (overhead = this / that − 1).
    pub relation: &'static str,
}

/// What criterion's throughput line shows.
#[derive(Clone, Copy, Debug, Default)]
pub enum Per {
    /// GB/s of the minimum bytes.
    #[default]
    Bytes,
    /// "elements"/s = FLOP/s.
    Flops,
    /// elements/s of this many elements (tokens, launches, …).
    Elements(u64),
}

/// The minimum work of one launch of a case (what its roofline is computed from).
#[derive(Clone, Debug, Default)]
pub struct Case {
    /// Bytes a launch must move at least (inputs read once, outputs written once).
    pub bytes: u64,
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: u64,
    pub compute: Compute,
    pub per: Per,
    pub vs: Option<Vs>,
    /// Free text recorded with the case.
    pub note: String,
    /// Time by CUDA-graph replays whatever the launch time (a whole decode step: the case graphs
    /// exist for).
    pub graph: bool,
}

impl Case {
    pub fn bytes(bytes: u64) -> Self {
        Case {
            bytes,
            ..Default::default()
        }
    }
    pub fn flops(mut self, flops: u64, compute: Compute) -> Self {
        self.flops = flops;
        self.compute = compute;
        self
    }
    pub fn per(mut self, per: Per) -> Self {
        self.per = per;
        self
    }
    pub fn vs(mut self, id: String, label: &'static str, relation: &'static str) -> Self {
        self.vs = Some(Vs {
            id,
            label,
            relation,
        });
        self
    }
    pub fn graph(mut self) -> Self {
        self.graph = true;
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
    fn throughput(&self) -> Throughput {
        match self.per {
            Per::Bytes if self.bytes > 0 => Throughput::Bytes(self.bytes),
            Per::Flops if self.flops > 0 => Throughput::Elements(self.flops),
            Per::Elements(n) => Throughput::Elements(n),
            _ => Throughput::Elements(1),
        }
    }
}

// ---- the run context ---------------------------------------------------------------------------

/// One per `cargo bench` run.
pub struct Ctx {
    pub filter: Filter,
    /// Run the cpu and emu backends (not in the GPU kit).
    pub host: bool,
    pub sidecar: RefCell<Sidecar>,
    /// The GPU, its ceilings and baselines (None: no device, with the reason in `no_gpu`).
    #[cfg(feature = "cuda")]
    pub gpu: Option<gpu::Gpu>,
    /// Why GPU figures are missing ("" when a GPU is in use).
    pub no_gpu: String,
}

impl Ctx {
    pub fn new() -> Self {
        let filter = Filter::from_args();
        #[allow(unused_mut)]
        let mut sidecar = Sidecar::open();
        let host = host_backends();
        #[cfg(feature = "cuda")]
        let (gpu, no_gpu) = match lora_kernels::Cuda::new(0) {
            Ok(dev) => match gpu::Gpu::new(dev, &mut sidecar) {
                Ok(g) => (Some(g), String::new()),
                Err(e) => (None, format!("GPU setup failed: {e}")),
            },
            Err(e) => (
                None,
                format!("{e}: GPU figures need `--features cuda` and a CUDA device"),
            ),
        };
        #[cfg(not(feature = "cuda"))]
        let no_gpu = "built without `--features cuda`: GPU figures need it and a CUDA device \
                      (no CUDA device in use)"
            .to_string();
        if !no_gpu.is_empty() {
            eprintln!("lora-kernels benches: {no_gpu}");
        }
        if !host {
            eprintln!("lora-kernels benches: LK_BENCH_ONLY_CUDA=1: cpu and emu cases skipped");
        }
        Ctx {
            filter,
            host,
            sidecar: RefCell::new(sidecar),
            #[cfg(feature = "cuda")]
            gpu,
            no_gpu,
        }
    }

    /// Whether any of these full ids is selected.
    pub fn any(&self, ids: &[String]) -> bool {
        ids.iter().any(|id| self.filter.selects(id))
    }

    /// Whether any id starting with `prefix` could be selected: a quick check for a whole group
    /// (exact for `--exact` and no filter; for a regex, tests the prefix and a few suffixes).
    pub fn group_selected(&self, prefix: &str, names: &[String]) -> bool {
        self.any(
            &names
                .iter()
                .map(|n| format!("{prefix}/{n}"))
                .collect::<Vec<_>>(),
        )
    }

    pub fn group<'c, 'a>(&'c self, c: &'a mut Criterion, name: String) -> Group<'c, 'a> {
        Group {
            g: c.benchmark_group(name.clone()),
            name,
            ctx: self,
        }
    }

    /// A family's "GPU figures missing" line (printed once per family when no GPU is in use).
    pub fn say_no_gpu(&self, family: &str) {
        if !self.no_gpu.is_empty() {
            eprintln!("{family} bench: {}", self.no_gpu);
        }
    }

    /// Input sets to rotate through so that a case's working set does not stay in L2 (1 on the
    /// host backends).
    pub fn sets<B: Backend>(&self, b: &B, working_set_bytes: u64) -> usize {
        #[cfg(feature = "cuda")]
        if b.name() == "cuda" {
            if let Some(g) = &self.gpu {
                return g.sets_for(working_set_bytes);
            }
        }
        let _ = (b, working_set_bytes);
        1
    }
}

/// A criterion group with its name (ids are `"{group}/{case}"`, criterion's `full_id`).
pub struct Group<'c, 'a> {
    pub g: BenchmarkGroup<'a, WallTime>,
    pub name: String,
    pub ctx: &'c Ctx,
}

impl Group<'_, '_> {
    pub fn id(&self, case: &str) -> String {
        format!("{}/{case}", self.name)
    }

    pub fn selected(&self, case: &str) -> bool {
        self.ctx.filter.selects(&self.id(case))
    }

    /// Whether any of these cases is selected.
    pub fn any(&self, cases: &[&str]) -> bool {
        cases.iter().any(|c| self.selected(c))
    }

    /// Benchmarks `f` (one launch of the case on input set `i`) as `{group}/{name}` if the filter
    /// selects it. `f(0)` runs once first: an error (e.g. a kernel family that is not implemented
    /// on this backend yet) skips the case with a message instead of failing the run. On cuda the
    /// case is timed by `gpu::run` (events or graph replays, rotating over `sets`); elsewhere by
    /// criterion's wall clock.
    pub fn run<B: Backend>(
        &mut self,
        b: &B,
        name: &str,
        case: &Case,
        sets: usize,
        mut f: impl FnMut(usize) -> BenchResult,
    ) {
        let id = self.id(name);
        if !self.ctx.filter.selects(&id) {
            return;
        }
        self.g.throughput(case.throughput());
        if self.ctx.filter.list {
            // `--list`: criterion only prints the id; run nothing.
            self.g.bench_function(name, |bench| bench.iter(|| ()));
            return;
        }
        #[cfg(feature = "cuda")]
        if b.name() == "cuda" {
            if let Some(gpu) = &self.ctx.gpu {
                gpu::run(self, gpu, &id, name, case, sets, f);
                return;
            }
        }
        let _ = sets;
        if let Err(e) = f(0) {
            eprintln!("{id}: skipped: {e}");
            return;
        }
        if let Err(e) = b.synchronize() {
            eprintln!("{id}: skipped: {e}");
            return;
        }
        self.g.bench_function(name, |bench| {
            bench.iter(|| {
                f(0).expect("the case ran once before");
                b.synchronize().expect("synchronize");
            })
        });
    }

    pub fn finish(self) {
        self.g.finish();
    }
}

// ---- the sidecar -------------------------------------------------------------------------------

/// `lk-bench.jsonl` beside criterion's results: records keyed by `id`, merged with what earlier
/// (filtered) runs left there, rewritten after every record.
pub struct Sidecar {
    path: PathBuf,
    records: BTreeMap<String, Value>,
}

/// Criterion's output directory, as criterion 0.7 picks it (without its `cargo metadata` step).
pub fn criterion_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CRITERION_HOME") {
        PathBuf::from(h)
    } else if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        PathBuf::from(t).join("criterion")
    } else {
        PathBuf::from("target/criterion")
    }
}

impl Sidecar {
    pub fn open() -> Self {
        let path = criterion_home().join("lk-bench.jsonl");
        let mut records = BTreeMap::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    if let Some(id) = v.get("id").and_then(Value::as_str) {
                        records.insert(id.to_string(), v);
                    }
                }
            }
        }
        Sidecar { path, records }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Stores `record` (which must have an `id`) and rewrites the file.
    pub fn put(&mut self, record: Value) {
        let Some(id) = record.get("id").and_then(Value::as_str) else {
            return;
        };
        self.records.insert(id.to_string(), record);
        let text: String = self.records.values().map(|v| format!("{v}\n")).collect();
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&self.path, text) {
            eprintln!("sidecar {}: {e}", self.path.display());
        }
    }

    pub fn get(&self, id: &str) -> Option<&Value> {
        self.records.get(id)
    }
}

/// A memory record (`kind: "memory"`): computed or measured bytes, with how they were obtained.
pub fn memory_record(id: &str, fields: Value) -> Value {
    let mut v = json!({ "kind": "memory", "id": id });
    if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    v
}

// ---- data --------------------------------------------------------------------------------------

/// `n` deterministic values in `[-scale, scale)` (xorshift; beyond 2²⁰ elements the first 2²⁰
/// repeat, which costs nothing to generate and is all a timing needs).
pub fn vals<T: Float>(n: usize, seed: u64, scale: f64) -> Vec<T> {
    const PATTERN: usize = 1 << 20;
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let m = n.min(PATTERN);
    let mut v: Vec<T> = (0..m)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f64(((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale)
        })
        .collect();
    v.reserve(n - m);
    while v.len() < n {
        let k = (n - v.len()).min(m);
        v.extend_from_within(..k);
    }
    v
}

/// A buffer of [`vals`].
pub fn upload_vals<B: Backend, T: Float>(
    b: &B,
    n: usize,
    seed: u64,
    scale: f64,
) -> lora_kernels::Result<B::Buffer<T>> {
    b.upload(&vals::<T>(n, seed, scale))
}

/// A small deterministic generator for ids and shuffles (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Human-readable bytes.
pub fn fmt_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

/// `n` buffers of [`vals`] (one per rotating input set; seeds differ).
pub fn replicas<B: Backend, T: Float>(
    b: &B,
    n: usize,
    len: usize,
    seed: u64,
    scale: f64,
) -> lora_kernels::Result<Vec<B::Buffer<T>>> {
    (0..n)
        .map(|i| upload_vals::<B, T>(b, len, seed + 1000 * i as u64, scale))
        .collect()
}

/// `n` zeroed buffers (outputs of rotating input sets).
pub fn zeroed<B: Backend, T: lora_kernels::Element>(
    b: &B,
    n: usize,
    len: usize,
) -> lora_kernels::Result<Vec<B::Buffer<T>>> {
    (0..n).map(|_| b.alloc::<T>(len)).collect()
}
