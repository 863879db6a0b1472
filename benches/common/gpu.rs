//! The GPU side of the benches (feature `cuda`, only when `Cuda::new(0)` succeeds):
//! - **ceilings**, measured once per run before any case: device-to-device copy bandwidth (256 MiB,
//!   far beyond L2), the eager launch + synchronize floor, the per-node floor of a CUDA-graph
//!   replay, and cuBLAS GEMM throughput at 8192³ for f16, bf16 (tensor cores) and f32 (FP32 FMA,
//!   no TF32) on random data;
//! - **timing** ([`run`]): every input set once (warm-up and error probe), then an eager probe of
//!   the per-launch time; below [`GRAPH_BELOW_NS`] the case is captured into a CUDA graph (all
//!   rotating sets, one node group each) and timed by graph replays, so the host's launch cost is
//!   not in the figure (the launch floors are reported separately); otherwise back-to-back eager
//!   launches between two CUDA events. A baseline is timed the way the case it is compared with
//!   was. Criterion takes a median over samples of these averages.
//! - **rotating inputs**: a case whose working set is small runs over `⌈3·L2 / bytes⌉` (≤ 1024)
//!   independent input sets in turn, so it does not read what the previous launch left in L2;
//! - **baselines**: cuBLAS (row-major wrappers over `cublasGemmEx` / strided-batched) and two
//!   bench-only PTX kernels (row gather, f16 scatter-add) loaded through the driver's JIT.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora_kernels::cudarc::cublas::{self, CudaBlas};
use lora_kernels::cudarc::driver::sys as dsys;
use lora_kernels::cudarc::driver::{
    CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, LaunchConfig,
    PushKernelArg,
};
use lora_kernels::cudarc::nvrtc::Ptx;
use lora_kernels::ffi::sys;
use lora_kernels::{bf16, f16, Backend, Cuda, DType, Float};
use serde_json::json;

use super::{vals, BenchResult, Case, Compute, Group, Sidecar};

/// Cases faster than this per launch are timed by CUDA-graph replays.
pub const GRAPH_BELOW_NS: f64 = 10_000.0;
/// Most input sets a case rotates through.
pub const MAX_SETS: usize = 1024;

type Err = Box<dyn std::error::Error>;

// ---- ceilings ----------------------------------------------------------------------------------

/// The measured limits every case is judged against.
#[derive(Clone, Debug, Default)]
pub struct Ceilings {
    /// Device-to-device copy: (read + write) bytes per ns (= GB/s).
    pub copy_gb_s: f64,
    /// One empty launch + stream synchronize, host wall clock (median), ns.
    pub launch_sync_ns: f64,
    /// One empty kernel node of a CUDA-graph replay, ns.
    pub graph_node_ns: Option<f64>,
    /// cuBLAS GEMM 8192³: FLOP per ns (= GFLOP/s) for f16, bf16, f32.
    pub f16_gflop_s: Option<f64>,
    pub bf16_gflop_s: Option<f64>,
    pub f32_gflop_s: Option<f64>,
}

impl Ceilings {
    fn flop_rate(&self, c: Compute) -> Option<f64> {
        match c {
            Compute::Memory => None,
            Compute::Fma => self.f32_gflop_s,
            Compute::TensorF16 => self.f16_gflop_s,
            Compute::TensorBf16 => self.bf16_gflop_s,
        }
    }

    /// `(roofline ns, what bounds it)`: max(bytes / copy bandwidth, FLOPs / the case's FLOP rate).
    pub fn roofline(&self, case: &Case) -> (f64, &'static str) {
        let mem = case.bytes as f64 / self.copy_gb_s;
        match self.flop_rate(case.compute) {
            Some(rate) if case.flops > 0 => {
                let comp = case.flops as f64 / rate;
                if comp > mem {
                    (comp, "compute")
                } else {
                    (mem, "memory")
                }
            }
            _ => (mem, "memory"),
        }
    }
}

// ---- cuBLAS ------------------------------------------------------------------------------------

/// cuBLAS on the backend's stream with an explicit workspace (so that GEMMs can be captured in a
/// graph without allocating), called with row-major shapes and raw device addresses.
pub struct Blas {
    inner: CudaBlas,
    _workspace: CudaSlice<u8>,
}

fn data_type(d: DType) -> cublas::sys::cudaDataType {
    match d {
        DType::F16 => cublas::sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => cublas::sys::cudaDataType::CUDA_R_16BF,
        _ => cublas::sys::cudaDataType::CUDA_R_32F,
    }
}

fn op(trans: bool) -> cublas::sys::cublasOperation_t {
    if trans {
        cublas::sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        cublas::sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// A row-major GEMM `C[m,n] = alpha·op(A)·op(B) + beta·C` as `lora_kernels::gemm::Gemm` describes
/// it (A stored `[m,k]`, or `[k,m]` with `a_trans`; B `[k,n]`, or `[n,k]` with `b_trans`).
#[derive(Clone, Copy, Debug)]
pub struct RowGemm {
    pub dtype: DType,
    pub a_trans: bool,
    pub b_trans: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl RowGemm {
    /// `C[m,n] = alpha · X[m,k] · W[n,k]ᵀ + beta · C` (a linear layer's forward), packed.
    pub fn nt(dtype: DType, m: usize, n: usize, k: usize) -> Self {
        RowGemm {
            dtype,
            a_trans: false,
            b_trans: true,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            lda: k,
            ldb: k,
            ldc: n,
        }
    }
}

impl Blas {
    pub fn new(dev: &Cuda) -> Result<Self, Err> {
        // SAFETY: only probes for the library; cudarc would panic on first use without it.
        if !unsafe { cublas::sys::is_culib_present() } {
            return Err(
                "libcublas not found (install the nvidia-cublas wheel or a CUDA toolkit)".into(),
            );
        }
        let inner = CudaBlas::new(dev.stream().clone())?;
        let bytes = 64 << 20;
        let mut ws = dev.alloc::<u8>(bytes)?;
        let p = dev.raw_ptr_mut(&mut ws);
        // SAFETY: a live device allocation of `bytes` bytes, kept alive as long as the handle.
        unsafe { cublas::sys::cublasSetWorkspace_v2(*inner.handle(), p, bytes).result()? };
        Ok(Blas {
            inner,
            _workspace: ws,
        })
    }

    /// Row-major C = A·B as cuBLAS's column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ` (FP32 accumulation;
    /// f32 data uses FP32 FMA, no TF32).
    ///
    /// # Safety
    /// `a`, `b`, `c` must be device addresses of matrices that `g` describes.
    pub unsafe fn gemm(&self, g: &RowGemm, a: u64, b: u64, c: u64) -> BenchResult {
        self.gemm_batched(g, a, b, c, 1, [0, 0, 0])
    }

    /// `batch` GEMMs of shape `g`, matrix `i` at `a + i·strides[0]` (elements) etc.
    ///
    /// # Safety
    /// As [`Blas::gemm`], for every matrix of the batch.
    pub unsafe fn gemm_batched(
        &self,
        g: &RowGemm,
        a: u64,
        b: u64,
        c: u64,
        batch: usize,
        strides: [usize; 3],
    ) -> BenchResult {
        let t = data_type(g.dtype);
        let (alpha, beta) = (g.alpha, g.beta);
        let h = *self.inner.handle();
        let compute = cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        if batch == 1 {
            cublas::result::gemm_ex(
                h,
                op(g.b_trans),
                op(g.a_trans),
                g.n as i32,
                g.m as i32,
                g.k as i32,
                (&alpha as *const f32).cast(),
                b as *const c_void,
                t,
                g.ldb as i32,
                a as *const c_void,
                t,
                g.lda as i32,
                (&beta as *const f32).cast(),
                c as *mut c_void,
                t,
                g.ldc as i32,
                compute,
                algo,
            )?;
        } else {
            cublas::result::gemm_strided_batched_ex(
                h,
                op(g.b_trans),
                op(g.a_trans),
                g.n as i32,
                g.m as i32,
                g.k as i32,
                (&alpha as *const f32).cast(),
                b as *const c_void,
                t,
                g.ldb as i32,
                strides[1] as i64,
                a as *const c_void,
                t,
                g.lda as i32,
                strides[0] as i64,
                (&beta as *const f32).cast(),
                c as *mut c_void,
                t,
                g.ldc as i32,
                strides[2] as i64,
                batch as i32,
                compute,
                algo,
            )?;
        }
        Ok(())
    }
}

// ---- bench-only PTX kernels --------------------------------------------------------------------

/// `benches/baseline/kernels.ptx` (from `kernels.cu` by `scripts/bench-ptx.sh`).
const PTX: &str = include_str!("../baseline/kernels.ptx");

pub struct Kernels {
    _module: Arc<CudaModule>,
    gather: CudaFunction,
    scatter_add_f16: CudaFunction,
    empty: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernels {
    pub fn new(dev: &Cuda) -> Result<Self, Err> {
        let module = dev.context().load_module(Ptx::from_src(PTX))?;
        Ok(Kernels {
            gather: module.load_function("lk_bench_gather_rows")?,
            scatter_add_f16: module.load_function("lk_bench_scatter_add_rows_f16")?,
            empty: module.load_function("lk_bench_empty")?,
            _module: module,
            stream: dev.stream().clone(),
        })
    }

    /// `dst[r] = src[idx[r]]` (zeros for idx < 0), `rows` rows of `row_bytes` bytes (multiple of 16,
    /// 16-byte aligned addresses).
    pub fn gather_rows(
        &self,
        src: u64,
        dst: u64,
        idx: u64,
        rows: usize,
        row_bytes: usize,
    ) -> BenchResult {
        assert_eq!(row_bytes % 16, 0, "gather rows are whole 16-byte vectors");
        let vecs = (row_bytes / 16) as i64;
        for start in (0..rows).step_by(65535) {
            let n = (rows - start).min(65535);
            let (d, i) = (dst + (start * row_bytes) as u64, idx + (start * 4) as u64);
            let mut l = self.stream.launch_builder(&self.gather);
            l.arg(&src).arg(&d).arg(&i).arg(&vecs);
            let cfg = LaunchConfig {
                grid_dim: ((vecs as u32).div_ceil(256), n as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the caller's addresses hold `rows` index entries and the rows they name.
            unsafe { l.launch(cfg) }?;
        }
        Ok(())
    }

    /// `dst[idx[r]] += src[r]` for idx ≥ 0 (f16 rows of `row_elems` elements, even; distinct
    /// targets).
    pub fn scatter_add_rows_f16(
        &self,
        src: u64,
        dst: u64,
        idx: u64,
        rows: usize,
        row_elems: usize,
    ) -> BenchResult {
        assert_eq!(row_elems % 2, 0, "scatter-add rows are whole half2 pairs");
        let h2 = (row_elems / 2) as i64;
        for start in (0..rows).step_by(65535) {
            let n = (rows - start).min(65535);
            let (s, i) = (
                src + (start * row_elems * 2) as u64,
                idx + (start * 4) as u64,
            );
            let mut l = self.stream.launch_builder(&self.scatter_add_f16);
            l.arg(&s).arg(&dst).arg(&i).arg(&h2);
            let cfg = LaunchConfig {
                grid_dim: ((h2 as u32).div_ceil(256), n as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as gather_rows.
            unsafe { l.launch(cfg) }?;
        }
        Ok(())
    }

    pub fn empty(&self) -> BenchResult {
        let mut l = self.stream.launch_builder(&self.empty);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel takes no arguments and touches no memory.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }
}

// ---- the GPU context ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Events,
    Graph,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Events => "events",
            Mode::Graph => "graph",
        }
    }
}

struct Done {
    mode: Mode,
    median_ns: f64,
}

pub struct Gpu {
    pub dev: Cuda,
    pub blas: Option<Blas>,
    pub kernels: Option<Kernels>,
    pub ceilings: Ceilings,
    pub l2_bytes: u64,
    pub name: String,
    done: RefCell<HashMap<String, Done>>,
}

fn event(stream: &Arc<CudaStream>) -> Result<CudaEvent, Err> {
    Ok(stream.record_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))?)
}

fn elapsed_ns(a: &CudaEvent, b: &CudaEvent) -> Result<f64, Err> {
    Ok(a.elapsed_ms(b)? as f64 * 1e6)
}

impl Gpu {
    /// Opens cuBLAS and the PTX kernels (each optional) and measures the ceilings.
    pub fn new(dev: Cuda, sidecar: &mut Sidecar) -> Result<Self, Err> {
        let name = dev.device_name().unwrap_or_else(|_| "unknown GPU".into());
        let l2_bytes = dev
            .context()
            .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_or(60 << 20, |v| v as u64);
        let blas = Blas::new(&dev)
            .map_err(|e| {
                eprintln!("benches: no cuBLAS ({e}): no GEMM ceilings, no cuBLAS baselines")
            })
            .ok();
        let kernels = Kernels::new(&dev)
            .map_err(|e| {
                eprintln!("benches: bench PTX kernels failed to load ({e}): no gather baselines")
            })
            .ok();
        let mut gpu = Gpu {
            dev,
            blas,
            kernels,
            ceilings: Ceilings::default(),
            l2_bytes,
            name,
            done: RefCell::new(HashMap::new()),
        };
        gpu.ceilings = gpu.measure()?;
        let c = &gpu.ceilings;
        let tf = |v: Option<f64>| v.map_or("–".to_string(), |r| format!("{:.1}", r / 1e3));
        eprintln!(
            "ceilings on {} (L2 {} MiB): copy {:.0} GB/s (read + write), launch + sync {:.2} µs, \
             graph node {} ns; cuBLAS 8192³ TFLOP/s: f16 {}, bf16 {}, f32 {}",
            gpu.name,
            gpu.l2_bytes >> 20,
            c.copy_gb_s,
            c.launch_sync_ns / 1e3,
            c.graph_node_ns.map_or("–".into(), |v| format!("{v:.0}")),
            tf(c.f16_gflop_s),
            tf(c.bf16_gflop_s),
            tf(c.f32_gflop_s),
        );
        sidecar.put(json!({
            "kind": "ceilings",
            "id": "ceilings/cuda",
            "device": gpu.name,
            "l2_bytes": gpu.l2_bytes,
            "copy_gb_s": c.copy_gb_s,
            "launch_sync_ns": c.launch_sync_ns,
            "graph_node_ns": c.graph_node_ns,
            "tflops_f16": c.f16_gflop_s.map(|v| v / 1e3),
            "tflops_bf16": c.bf16_gflop_s.map(|v| v / 1e3),
            "tflops_f32": c.f32_gflop_s.map(|v| v / 1e3),
            "method": "copy: 10 × 256 MiB cuMemcpyDtoD between events; launch: median of 300 \
                       launch + synchronize (host clock); graph node: 200 empty kernels per graph, \
                       20 replays; GEMM: cuBLAS GemmEx 8192³ on random data, 5 runs between events",
        }));
        Ok(gpu)
    }

    /// Input sets for a working set of `bytes`: enough that they do not all fit in L2 three times.
    pub fn sets_for(&self, bytes: u64) -> usize {
        if bytes == 0 {
            return 1;
        }
        ((3 * self.l2_bytes).div_ceil(bytes) as usize).clamp(1, MAX_SETS)
    }

    fn measure(&self) -> Result<Ceilings, Err> {
        let dev = &self.dev;
        let stream = dev.stream().clone();
        let mut c = Ceilings::default();

        // Copy bandwidth.
        {
            let n = 64usize << 20;
            let src = dev.alloc::<f32>(n)?;
            let mut dst = dev.alloc::<f32>(n)?;
            for _ in 0..2 {
                stream.memcpy_dtod(&src, &mut dst)?;
            }
            let reps = 10;
            let e0 = event(&stream)?;
            for _ in 0..reps {
                stream.memcpy_dtod(&src, &mut dst)?;
            }
            let e1 = event(&stream)?;
            c.copy_gb_s = (2 * n * 4 * reps) as f64 / elapsed_ns(&e0, &e1)?;
        }

        // Launch + synchronize floor (host wall clock).
        {
            let mut count = dev.alloc::<u32>(1)?;
            let p = sys::LkSelftestLaunchConfigParams {
                count: dev.raw_ptr_mut(&mut count).cast(),
                grid: [1, 1, 1],
                block: [32, 1, 1],
                smem_bytes: 0,
                raise_smem_limit: 0,
            };
            let mut t = Vec::with_capacity(300);
            for i in 0..350 {
                let t0 = Instant::now();
                dev.prepare_launch()?;
                // SAFETY: `count` is a live device u32, as the params state.
                let rc = unsafe { sys::lk_cuda_selftest_launch_config(&p, dev.raw_stream()) };
                if rc != 0 {
                    return Err(format!("selftest launch failed: {rc}").into());
                }
                dev.synchronize()?;
                if i >= 50 {
                    t.push(t0.elapsed().as_nanos() as f64);
                }
            }
            c.launch_sync_ns = median(&mut t);
        }

        // Graph node floor.
        if let Some(k) = &self.kernels {
            let nodes = 200;
            let graph = capture(&stream, &mut |_| k.empty(), nodes)?;
            let reps = 20;
            let e0 = event(&stream)?;
            for _ in 0..reps {
                graph.launch()?;
            }
            let e1 = event(&stream)?;
            c.graph_node_ns = Some(elapsed_ns(&e0, &e1)? / (reps * nodes) as f64);
        }

        // cuBLAS GEMM ceilings.
        if let Some(blas) = &self.blas {
            c.f16_gflop_s = gemm_rate::<f16>(dev, blas)
                .map_err(|e| eprintln!("f16 GEMM ceiling: {e}"))
                .ok();
            c.bf16_gflop_s = gemm_rate::<bf16>(dev, blas)
                .map_err(|e| eprintln!("bf16 GEMM ceiling: {e}"))
                .ok();
            c.f32_gflop_s = gemm_rate::<f32>(dev, blas)
                .map_err(|e| eprintln!("f32 GEMM ceiling: {e}"))
                .ok();
        }
        Ok(c)
    }
}

/// cuBLAS GEMM 8192³ (row-major `X·Wᵀ`) on random data: GFLOP/s.
fn gemm_rate<T: Float>(dev: &Cuda, blas: &Blas) -> Result<f64, Err> {
    let m = 8192;
    let a = dev.upload(&vals::<T>(m * m, 1, 1.0))?;
    let b = dev.upload(&vals::<T>(m * m, 2, 1.0))?;
    let mut cm = dev.alloc::<T>(m * m)?;
    let g = RowGemm::nt(T::DTYPE, m, m, m);
    let (pa, pb, pc) = (
        dev.raw_ptr(&a) as u64,
        dev.raw_ptr(&b) as u64,
        dev.raw_ptr_mut(&mut cm) as u64,
    );
    let stream = dev.stream().clone();
    for _ in 0..2 {
        // SAFETY: three m×m device matrices, as g describes.
        unsafe { blas.gemm(&g, pa, pb, pc)? };
    }
    let reps = 5;
    let e0 = event(&stream)?;
    for _ in 0..reps {
        // SAFETY: as above.
        unsafe { blas.gemm(&g, pa, pb, pc)? };
    }
    let e1 = event(&stream)?;
    Ok((2 * m * m * m * reps) as f64 / elapsed_ns(&e0, &e1)?)
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Captures `f(0..sets)` on `stream` into a graph, uploads it and replays it once.
fn capture(
    stream: &Arc<CudaStream>,
    f: &mut dyn FnMut(usize) -> BenchResult,
    sets: usize,
) -> Result<CudaGraph, Err> {
    stream.begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let mut failed = None;
    for s in 0..sets {
        if let Err(e) = f(s) {
            failed = Some(e);
            break;
        }
    }
    let graph = stream.end_capture(dsys::CUgraphInstantiate_flags(0));
    if let Some(e) = failed {
        return Err(e);
    }
    let graph = graph?.ok_or("the capture recorded nothing")?;
    graph.upload()?;
    graph.launch()?;
    stream.synchronize()?;
    Ok(graph)
}

/// Eager launches `f(next…)` between two events: ns per launch.
fn time_eager(
    stream: &Arc<CudaStream>,
    f: &mut dyn FnMut(usize) -> BenchResult,
    next: &mut usize,
    sets: usize,
    iters: u64,
) -> Result<f64, Err> {
    let e0 = event(stream)?;
    for _ in 0..iters {
        f(*next % sets)?;
        *next += 1;
    }
    let e1 = event(stream)?;
    Ok(elapsed_ns(&e0, &e1)? / iters as f64)
}

/// Graph replays (each one launch per set) between two events: ns per launch.
fn time_graph(
    stream: &Arc<CudaStream>,
    g: &CudaGraph,
    sets: usize,
    iters: u64,
) -> Result<f64, Err> {
    let reps = iters.div_ceil(sets as u64).max(1);
    let e0 = event(stream)?;
    for _ in 0..reps {
        g.launch()?;
    }
    let e1 = event(stream)?;
    Ok(elapsed_ns(&e0, &e1)? / (reps * sets as u64) as f64)
}

/// Benchmarks one case on the GPU (see the module docs) and records it in the sidecar.
pub fn run(
    grp: &mut Group<'_, '_>,
    gpu: &Gpu,
    id: &str,
    name: &str,
    case: &Case,
    sets: usize,
    mut f: impl FnMut(usize) -> BenchResult,
) {
    let stream = gpu.dev.stream().clone();
    let sets = sets.max(1);
    let f: &mut dyn FnMut(usize) -> BenchResult = &mut f;
    // Every set once: warm-up, and a case that cannot run here is skipped with its reason.
    let t0 = Instant::now();
    for s in 0..sets {
        if let Err(e) = f(s) {
            let _ = stream.synchronize();
            eprintln!("{id}: skipped: {e}");
            return;
        }
    }
    if let Err(e) = stream.synchronize() {
        eprintln!("{id}: failed: {e}");
        return;
    }
    let first = t0.elapsed().as_nanos() as f64 / sets as f64;
    let mut next = 0usize;
    // The eager per-launch time (a slow case's first pass already says it is far from 10 µs).
    let eager = if first > 100.0 * GRAPH_BELOW_NS {
        first
    } else {
        match time_eager(&stream, f, &mut next, sets, (2 * sets as u64).clamp(8, 64)) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{id}: failed: {e}");
                return;
            }
        }
    };
    let follow = case
        .vs
        .as_ref()
        .and_then(|v| gpu.done.borrow().get(&v.id).map(|d| d.mode));
    let want = follow.unwrap_or(if eager < GRAPH_BELOW_NS || case.graph {
        Mode::Graph
    } else {
        Mode::Events
    });
    let graph = if want == Mode::Graph {
        match capture(&stream, f, sets) {
            Ok(g) => Some(g),
            Err(e) => {
                let _ = stream.synchronize();
                eprintln!("{id}: CUDA-graph capture failed ({e}): timing eager launches");
                None
            }
        }
    } else {
        None
    };
    let mode = if graph.is_some() {
        Mode::Graph
    } else {
        Mode::Events
    };
    let mut per_iter: Vec<f64> = Vec::new();
    grp.g.bench_function(name, |bench| {
        bench.iter_custom(|iters| {
            let ns = match &graph {
                Some(g) => time_graph(&stream, g, sets, iters),
                None => time_eager(&stream, f, &mut next, sets, iters),
            }
            .unwrap_or_else(|e| panic!("{id}: {e}"));
            per_iter.push(ns);
            Duration::from_secs_f64(ns * iters as f64 * 1e-9)
        })
    });
    if per_iter.is_empty() {
        return; // --list
    }
    let keep = grp.ctx.filter.sample_size.min(per_iter.len());
    let tail = per_iter.len() - keep;
    let med = median(&mut per_iter[tail..]);
    gpu.done.borrow_mut().insert(
        id.to_string(),
        Done {
            mode,
            median_ns: med,
        },
    );
    let (roof, bound) = gpu.ceilings.roofline(case);
    let rotation = sets as u64 * case.bytes;
    let l2_resident = rotation < 2 * gpu.l2_bytes;
    let mut line = format!(
        "  {id}: {:.2} µs, roofline {:.2} µs ({bound}) = {:.0} % of roofline, {:.0} GB/s",
        med / 1e3,
        roof / 1e3,
        100.0 * roof / med,
        case.bytes as f64 / med,
    );
    if case.flops > 0 {
        line += &format!(", {:.1} TFLOP/s", case.flops as f64 / med / 1e3);
    }
    line += &format!(" [{}, {sets} set(s)]", mode.name());
    let mut vs_json = serde_json::Value::Null;
    if let Some(v) = &case.vs {
        if let Some(other) = gpu.done.borrow().get(&v.id) {
            let r = med / other.median_ns;
            line += &match v.relation {
                "overhead" => format!("; {:+.1} % vs {}", 100.0 * (r - 1.0), v.id),
                _ => format!("; {}: {r:.2}× our time ({})", v.label, v.id),
            };
        }
        vs_json = json!({ "id": v.id, "label": v.label, "relation": v.relation });
    }
    eprintln!("{line}");
    grp.ctx.sidecar.borrow_mut().put(json!({
        "kind": "case",
        "id": id,
        "backend": "cuda",
        "bytes": case.bytes,
        "flops": case.flops,
        "compute": case.compute.name(),
        "roofline_ns": roof,
        "bound": bound,
        "timing": mode.name(),
        "eager_ns": eager,
        "median_ns_events": med,
        "sets": sets,
        "l2_resident": l2_resident,
        "vs": vs_json,
        "note": case.note,
    }));
}

// ---- device memory -----------------------------------------------------------------------------

/// The device's default memory pool (cudarc allocates with `cuMemAllocAsync` from it).
fn pool(dev: &Cuda) -> Option<dsys::CUmemoryPool> {
    let mut p: dsys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one pool handle for a valid device.
    let rc = unsafe { dsys::cuDeviceGetDefaultMemPool(&mut p, dev.context().cu_device()) };
    (rc == dsys::CUresult::CUDA_SUCCESS && !p.is_null()).then_some(p)
}

/// Bytes in use in the default pool now.
pub fn pool_used(dev: &Cuda) -> Option<u64> {
    let p = pool(dev)?;
    let mut v = 0u64;
    // SAFETY: USED_MEM_CURRENT is a cuuint64_t attribute.
    let rc = unsafe {
        dsys::cuMemPoolGetAttribute(
            p,
            dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            (&mut v as *mut u64).cast(),
        )
    };
    (rc == dsys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// Restarts the pool's high-water mark of used bytes at the current value.
pub fn pool_reset_peak(dev: &Cuda) -> bool {
    let Some(p) = pool(dev) else { return false };
    let mut zero = 0u64;
    // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute; 0 resets it to the current value.
    let rc = unsafe {
        dsys::cuMemPoolSetAttribute(
            p,
            dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
    };
    rc == dsys::CUresult::CUDA_SUCCESS
}

/// The pool's high-water mark of used bytes since the last reset.
pub fn pool_peak(dev: &Cuda) -> Option<u64> {
    let p = pool(dev)?;
    let mut v = 0u64;
    // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
    let rc = unsafe {
        dsys::cuMemPoolGetAttribute(
            p,
            dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut v as *mut u64).cast(),
        )
    };
    (rc == dsys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// `cuMemGetInfo`: (free, total) bytes.
pub fn mem_info(dev: &Cuda) -> Option<(usize, usize)> {
    dev.context().mem_get_info().ok()
}
