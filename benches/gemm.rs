//! The reference block's dense GEMM (`lora_kernels::gemm`: tensor cores for f16/bf16, FP32 FMA for
//! f32; deterministic, no split-K) against cuBLAS (`GemmEx`, FP32 accumulation, no TF32) at the
//! same shape and layout — target: ours ≥ 50 % of cuBLAS.
//!
//! GPU: Llama-3-8B projections over 4096 tokens (`y = x·Wᵀ`: qkv 4096 → 6144, o 4096 → 4096,
//! gate+up 4096 → 28672, down 14336 → 4096), the backward forms of o_proj (`dX = dY·W`, `dW =
//! dYᵀ·X`), and a decode-sized qkv (16 tokens: memory-bound, rotating weights) — f16 and bf16;
//! f32 at qkv, o and decode. FLOPs 2·m·n·k on the measured cuBLAS roofline of the dtype; bytes =
//! A + B + C. cpu / emu: 64 × 96 × 128 in every layout and dtype.

use criterion::Criterion;
use lora_kernels::gemm::{gemm, Gemm};
use lora_kernels::{bf16, f16, Backend, Cpu, Emu, Float};

use crate::common::{replicas, zeroed, Case, Compute, Ctx, Per};

/// (name, layout, m, n, k)
type Shape = (&'static str, &'static str, usize, usize, usize);

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU_16: &[Shape] = &[
    ("qkv_t4096", "nt", 4096, 6144, 4096),
    ("o_t4096", "nt", 4096, 4096, 4096),
    ("gate_up_t4096", "nt", 4096, 28672, 4096),
    ("down_t4096", "nt", 4096, 4096, 14336),
    ("o_dx_t4096", "nn", 4096, 4096, 4096),
    ("o_dw_t4096", "tn", 4096, 4096, 4096),
    ("qkv_t16", "nt", 16, 6144, 4096),
];
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU_32: &[Shape] = &[
    ("qkv_t4096", "nt", 4096, 6144, 4096),
    ("o_t4096", "nt", 4096, 4096, 4096),
    ("qkv_t16", "nt", 16, 6144, 4096),
];
const HOST: &[Shape] = &[
    ("small", "nt", 64, 96, 128),
    ("small", "nn", 64, 96, 128),
    ("small", "tn", 64, 96, 128),
];

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    if ctx.host {
        on::<Cpu, f32>(c, ctx, &Cpu, HOST);
        on::<Cpu, f16>(c, ctx, &Cpu, &HOST[..1]);
        on::<Cpu, bf16>(c, ctx, &Cpu, &HOST[..1]);
        on::<Emu, f32>(c, ctx, &Emu, HOST);
        on::<Emu, f16>(c, ctx, &Emu, &HOST[..1]);
        on::<Emu, bf16>(c, ctx, &Emu, &HOST[..1]);
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &ctx.gpu {
        on::<_, f16>(c, ctx, &g.dev, GPU_16);
        on::<_, bf16>(c, ctx, &g.dev, GPU_16);
        on::<_, f32>(c, ctx, &g.dev, GPU_32);
    }
    ctx.say_no_gpu("gemm");
}

fn layout(l: &str, m: usize, n: usize, k: usize) -> Gemm {
    match l {
        "nn" => Gemm::nn(m, n, k),
        "tn" => Gemm::tn(m, n, k),
        "tt" => Gemm::tt(m, n, k),
        _ => Gemm::nt(m, n, k),
    }
}

fn on<B: Backend, T: Float>(c: &mut Criterion, ctx: &Ctx, b: &B, shapes: &[Shape]) {
    let mut grp = ctx.group(c, format!("gemm/{}", b.name()));
    let dt = T::DTYPE.name();
    for &(what, l, m, n, k) in shapes {
        let tag = format!("{dt}_{l}/{what}_{m}x{n}x{k}");
        let ours = format!("ours_{tag}");
        let theirs = format!("cublas_{tag}");
        if !grp.selected(&ours) && !grp.selected(&theirs) {
            continue;
        }
        let g = layout(l, m, n, k);
        let e = T::DTYPE.size_bytes();
        let bytes = ((m * k + k * n + m * n) * e) as u64;
        let flops = (2 * m * n * k) as u64;
        let compute = Compute::tensor_for::<T>();
        let sets = ctx.sets(b, bytes);
        let a = replicas::<B, T>(b, sets, g.a_len().unwrap_or(0), 1, 1.0).expect("A");
        let bm = replicas::<B, T>(b, sets, g.b_len().unwrap_or(0), 2, 0.05).expect("B");
        let mut cm = zeroed::<B, T>(b, sets, g.c_len().unwrap_or(0)).expect("C");
        let case = Case::bytes(bytes).flops(flops, compute).per(Per::Flops);
        grp.run(b, &ours, &case, sets, |i| {
            gemm(b, &a[i], &bm[i], &mut cm[i], &g)?;
            Ok(())
        });
        #[cfg(feature = "cuda")]
        if b.name() == "cuda" && grp.selected(&theirs) {
            let Some(blas) = grp.ctx.gpu.as_ref().and_then(|g| g.blas.as_ref()) else {
                continue;
            };
            let rg = crate::common::gpu::RowGemm {
                dtype: T::DTYPE,
                a_trans: g.a_trans,
                b_trans: g.b_trans,
                m,
                n,
                k,
                alpha: g.alpha,
                beta: g.beta,
                lda: g.lda,
                ldb: g.ldb,
                ldc: g.ldc,
            };
            // Same output on set 0 (where our kernel exists): a check of both conventions.
            let note = check::<B, T>(b, blas, &rg, &a[0], &bm[0], &g);
            if !note.is_empty() {
                eprintln!("  {}: {note}", grp.id(&theirs));
            }
            let case = case
                .clone()
                .vs(grp.id(&ours), "cuBLAS GemmEx", "baseline")
                .note(note);
            let ptrs: Vec<(u64, u64, u64)> = (0..sets)
                .map(|i| {
                    (
                        b.raw_ptr(&a[i]) as u64,
                        b.raw_ptr(&bm[i]) as u64,
                        b.raw_ptr(&cm[i]) as u64,
                    )
                })
                .collect();
            // SAFETY: the matrices of set i, as `rg` (= `g`) describes them.
            grp.run(b, &theirs, &case, sets, |i| unsafe {
                blas.gemm(&rg, ptrs[i].0, ptrs[i].1, ptrs[i].2)
            });
        }
    }
    grp.finish();
}

/// Runs ours and cuBLAS on the same inputs; "" if ours cannot run, else the relative difference.
#[cfg(feature = "cuda")]
fn check<B: Backend, T: Float>(
    b: &B,
    blas: &crate::common::gpu::Blas,
    rg: &crate::common::gpu::RowGemm,
    a: &B::Buffer<T>,
    bm: &B::Buffer<T>,
    g: &Gemm,
) -> String {
    let run = || -> Result<String, Box<dyn std::error::Error>> {
        let len = g.c_len().unwrap_or(0);
        let mut c1 = b.alloc::<T>(len)?;
        let mut c2 = b.alloc::<T>(len)?;
        if gemm(b, a, bm, &mut c1, g).is_err() {
            return Ok(String::new());
        }
        let p2 = b.raw_ptr_mut(&mut c2) as u64;
        // SAFETY: a, bm and c2 are the matrices rg describes.
        unsafe { blas.gemm(rg, b.raw_ptr(a) as u64, b.raw_ptr(bm) as u64, p2)? };
        let (x, y) = (b.download(&c1)?, b.download(&c2)?);
        let scale = x.iter().fold(1e-6f64, |m, v| m.max(v.to_f64().abs()));
        let diff = x
            .iter()
            .zip(&y)
            .fold(0.0f64, |m, (p, q)| m.max((p.to_f64() - q.to_f64()).abs()));
        Ok(format!(
            "vs ours: max |diff| / max |ours| = {:.1e}",
            diff / scale
        ))
    };
    run().unwrap_or_else(|e| format!("check failed: {e}"))
}
