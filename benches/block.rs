//! The reference block's other kernel families, and whole steps of the reference model.
//!
//! **Kernels** (GPU: Llama-3-8B sizes over 4096 tokens, bf16; cpu / emu: 64 tokens, d 256):
//! RMSNorm forward/backward, RoPE (q, 32 heads × 128), residual add, SwiGLU forward/backward
//! (d_ff 14336), token embedding (vocab 128256), cross-entropy forward/backward and argmax
//! (2048 rows × vocab 128256), AdamW and the gradient norm's sum of squares over the LoRA parameters
//! of Llama-3-8B at rank 16 (42 M f32). All memory-bound: bytes = inputs read once + outputs
//! written once.
//!
//! **Training step** (`train_step/…`): one optimizer step of `lora_kernels::model::TinyLm` (f32,
//! LoRA r16 on all seven projections, dropout 0.05) through `demo::train_step`: forward on the
//! tape, backward, gradient-norm clipping, AdamW — including its host synchronisations. GPU: one
//! Llama-3-8B-sized layer (d 4096, 32/8 heads, d_ff 14336, vocab 32000), 2 × 512 tokens; host: the
//! README demo's model and batch. The roofline is approximate: FLOPs of the linear layers
//! (forward + dX, the base is frozen) and of attention, on the FP32 FMA ceiling. Its **peak memory**
//! is measured once and recorded (`memory/train_step/…`): on cuda the high-water mark of used bytes
//! in the device's default memory pool (cudarc allocates with `cuMemAllocAsync` from it) minus the
//! bytes in use before the step; on cpu/emu the counting global allocator's high-water mark over
//! the step minus the live heap before it (every host buffer is a `Vec`).
//!
//! **Decode step** (`decode_step/…`): one token per sequence through one block as
//! `model::Engine` runs it — RMSNorm, q/k/v GEMMs, BGMV LoRA on every projection (each sequence its
//! own adapter), RoPE, KV-cache write, attention over the cache, o GEMM, residual, RMSNorm,
//! gate/up GEMMs, SwiGLU, down GEMM, residual — in f16, all launches captured in one CUDA graph on
//! the GPU. GPU: Llama-3-8B block, 1 and 64 sequences over 1024 cached tokens, 64 adapters; bytes
//! = the block's weights + the distinct adapters' weights + the K/V rows read once.

use criterion::Criterion;
use lora_kernels::adapter::ExpandMode;
use lora_kernels::attention::{
    attention_decode, attention_decode_workspace_bytes, kv_cache_write, Attention,
};
use lora_kernels::bgmv::Bgmv;
use lora_kernels::elementwise::{add_assign, swiglu_backward, swiglu_forward};
use lora_kernels::embedding::embedding_forward;
use lora_kernels::gemm::{gemm, Gemm};
use lora_kernels::loss::{argmax_rows, cross_entropy_backward, cross_entropy_forward};
use lora_kernels::model::{Batch, LlamaConfig, LoraConfig, TinyLm};
use lora_kernels::norm::{
    rmsnorm_backward, rmsnorm_backward_workspace_bytes, rmsnorm_forward, RmsNorm,
};
use lora_kernels::optim::{adamw_step, sum_squares, sum_squares_workspace_bytes, AdamW};
use lora_kernels::rope::{rope_forward, Rope};
use lora_kernels::{bf16, f16, Backend, Cpu, Emu, Float};
use serde_json::json;

use crate::common::serving::{Pool, Pop};
use crate::common::{
    fmt_bytes, memory_record, replicas, upload_vals, zeroed, BenchResult, Case, Compute, Ctx, Per,
    Rng,
};

/// Sizes of the kernel cases.
struct Sizes {
    tokens: usize,
    d: usize,
    heads: usize,
    head_dim: usize,
    ff: usize,
    vocab: usize,
    ce_rows: usize,
    lora_params: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU: Sizes = Sizes {
    tokens: 4096,
    d: 4096,
    heads: 32,
    head_dim: 128,
    ff: 14336,
    vocab: 128256,
    ce_rows: 2048,
    lora_params: 42_074_112,
};
const HOST: Sizes = Sizes {
    tokens: 64,
    d: 256,
    heads: 4,
    head_dim: 64,
    ff: 512,
    vocab: 1024,
    ce_rows: 64,
    lora_params: 65536,
};

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    if ctx.host {
        kernels::<Cpu, bf16>(c, ctx, &Cpu, &HOST);
        kernels::<Emu, bf16>(c, ctx, &Emu, &HOST);
        train(c, ctx, &Cpu, host_train());
        train(c, ctx, &Emu, host_train());
        decode(c, ctx, &Cpu, &HOST_DECODE);
        decode(c, ctx, &Emu, &HOST_DECODE);
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &ctx.gpu {
        kernels::<_, bf16>(c, ctx, &g.dev, &GPU);
        train(c, ctx, &g.dev, gpu_train());
        decode(c, ctx, &g.dev, &GPU_DECODE);
    }
    ctx.say_no_gpu("block");
}

// ---- kernels -----------------------------------------------------------------------------------

fn kernels<B: Backend, T: Float>(c: &mut Criterion, ctx: &Ctx, b: &B, s: &Sizes) {
    let mut grp = ctx.group(c, format!("block/{}", b.name()));
    let dt = T::DTYPE.name();
    let e = T::DTYPE.size_bytes();
    let (t, d, ff) = (s.tokens, s.d, s.ff);

    let name = |k: &str, shape: String| format!("{k}_{dt}/{shape}");
    let norm_tag = format!("t{t}_d{d}");
    let (nf, nb) = (
        name("rmsnorm_forward", norm_tag.clone()),
        name("rmsnorm_backward", norm_tag),
    );
    if grp.any(&[nf.as_str(), nb.as_str()]) {
        let ns = RmsNorm::new(t, d, 1e-5);
        let by = (2 * t * d * e + d * e + t * 4) as u64;
        let n = ctx.sets(b, by);
        let x = replicas::<B, T>(b, n, t * d, 1, 1.0).expect("x");
        let w = upload_vals::<B, T>(b, d, 2, 1.0).expect("w");
        let mut y = zeroed::<B, T>(b, n, t * d).expect("y");
        let mut rstd = zeroed::<B, f32>(b, n, t).expect("rstd");
        grp.run(b, &nf, &Case::bytes(by), n, |i| {
            rmsnorm_forward(b, &ns, &x[i], &w, &mut y[i], &mut rstd[i])?;
            Ok(())
        });
        let by = (3 * t * d * e + 2 * d * e + t * 4) as u64;
        let mut dw = b.alloc::<T>(d).expect("dw");
        let mut ws = b
            .alloc::<u8>(rmsnorm_backward_workspace_bytes(b, &ns).max(1))
            .expect("ws");
        let mut dx = zeroed::<B, T>(b, n, t * d).expect("dx");
        grp.run(b, &nb, &Case::bytes(by), n, |i| {
            rmsnorm_backward(
                b, &ns, &x[i], &w, &rstd[i], &y[i], &mut dx[i], &mut dw, &mut ws,
            )?;
            Ok(())
        });
    }

    let rn = name("rope_forward", format!("t{t}_h{}_d{}", s.heads, s.head_dim));
    if grp.selected(&rn) {
        let r = Rope::new(t, s.heads, s.head_dim, 500_000.0);
        let by = (2 * t * r.width() * e + t * 4) as u64;
        let n = ctx.sets(b, by);
        let mut q = replicas::<B, T>(b, n, t * r.width(), 3, 1.0).expect("q");
        let pos = b
            .upload(&(0..t as i32).collect::<Vec<_>>())
            .expect("positions");
        let mut fault = b.alloc::<u32>(1).expect("fault");
        grp.run(b, &rn, &Case::bytes(by), n, |i| {
            rope_forward(b, &r, &pos, &mut q[i], &mut fault)?;
            Ok(())
        });
    }

    let an = name("add_assign", format!("t{t}_d{d}"));
    if grp.selected(&an) {
        let by = (3 * t * d * e) as u64;
        let n = ctx.sets(b, by);
        let mut acc = replicas::<B, T>(b, n, t * d, 4, 1.0).expect("acc");
        let x = replicas::<B, T>(b, n, t * d, 5, 1e-3).expect("x");
        grp.run(b, &an, &Case::bytes(by), n, |i| {
            add_assign(b, &mut acc[i], &x[i])?;
            Ok(())
        });
    }

    let (sf, sb) = (
        name("swiglu_forward", format!("t{t}_ff{ff}")),
        name("swiglu_backward", format!("t{t}_ff{ff}")),
    );
    if grp.any(&[sf.as_str(), sb.as_str()]) {
        let by = (3 * t * ff * e) as u64;
        let n = ctx.sets(b, by);
        let g = replicas::<B, T>(b, n, t * ff, 6, 2.0).expect("gate");
        let u = replicas::<B, T>(b, n, t * ff, 7, 2.0).expect("up");
        let mut o = zeroed::<B, T>(b, n, t * ff).expect("out");
        grp.run(b, &sf, &Case::bytes(by), n, |i| {
            swiglu_forward(b, &g[i], &u[i], &mut o[i])?;
            Ok(())
        });
        let by = (5 * t * ff * e) as u64;
        let mut dg = zeroed::<B, T>(b, n, t * ff).expect("d_gate");
        let mut du = zeroed::<B, T>(b, n, t * ff).expect("d_up");
        grp.run(b, &sb, &Case::bytes(by), n, |i| {
            swiglu_backward(b, &g[i], &u[i], &o[i], &mut dg[i], &mut du[i])?;
            Ok(())
        });
    }

    let en = name("embedding_forward", format!("t{t}_vocab{}_d{d}", s.vocab));
    if grp.selected(&en) {
        let table = upload_vals::<B, T>(b, s.vocab * d, 8, 1.0).expect("table");
        let mut rng = Rng::new(3);
        let by = (2 * t * d * e + t * 4) as u64;
        let n = ctx.sets(b, by);
        let ids: Vec<B::Buffer<i32>> = (0..n)
            .map(|_| {
                b.upload(
                    &(0..t)
                        .map(|_| rng.below(s.vocab) as i32)
                        .collect::<Vec<_>>(),
                )
                .expect("ids")
            })
            .collect();
        let mut out = zeroed::<B, T>(b, n, t * d).expect("out");
        let mut fault = b.alloc::<u32>(1).expect("fault");
        grp.run(b, &en, &Case::bytes(by), n, |i| {
            embedding_forward(b, s.vocab, d, t, &ids[i], &table, &mut out[i], &mut fault)?;
            Ok(())
        });
    }

    let rows = s.ce_rows;
    let ce = format!("rows{rows}_vocab{}", s.vocab);
    let (cf, cb, am) = (
        name("cross_entropy_forward", ce.clone()),
        name("cross_entropy_backward", ce.clone()),
        name("argmax", ce),
    );
    if grp.any(&[cf.as_str(), cb.as_str(), am.as_str()]) {
        let logits = upload_vals::<B, T>(b, rows * s.vocab, 9, 4.0).expect("logits");
        let mut rng = Rng::new(4);
        let targets = b
            .upload(
                &(0..rows)
                    .map(|_| rng.below(s.vocab) as i32)
                    .collect::<Vec<_>>(),
            )
            .expect("targets");
        let mut losses = b.alloc::<f32>(rows).expect("losses");
        let mut lse = b.alloc::<f32>(rows).expect("lse");
        let mut fault = b.alloc::<u32>(1).expect("fault");
        let lg = (rows * s.vocab * e) as u64;
        grp.run(b, &cf, &Case::bytes(lg + (rows * 12) as u64), 1, |_| {
            cross_entropy_forward(
                b,
                rows,
                s.vocab,
                &logits,
                &targets,
                &mut losses,
                &mut lse,
                &mut fault,
            )?;
            Ok(())
        });
        let mut dl = b.alloc::<T>(rows * s.vocab).expect("d_logits");
        let d_loss = 1.0 / rows as f32;
        grp.run(b, &cb, &Case::bytes(2 * lg + (rows * 8) as u64), 1, |_| {
            cross_entropy_backward(b, rows, s.vocab, &logits, &targets, &lse, d_loss, &mut dl)?;
            Ok(())
        });
        let mut arg = b.alloc::<i32>(rows).expect("argmax");
        grp.run(b, &am, &Case::bytes(lg + (rows * 4) as u64), 1, |_| {
            argmax_rows(b, rows, s.vocab, &logits, &mut arg)?;
            Ok(())
        });
    }

    let np = s.lora_params;
    let (ad, ss) = (format!("adamw_f32/n{np}"), format!("sum_squares_f32/n{np}"));
    if grp.any(&[ad.as_str(), ss.as_str()]) {
        let by = (7 * np * 4) as u64;
        let n = ctx.sets(b, by);
        let mut p = replicas::<B, f32>(b, n, np, 10, 0.01).expect("params");
        let g = replicas::<B, f32>(b, n, np, 11, 0.01).expect("grads");
        let mut m = zeroed::<B, f32>(b, n, np).expect("m");
        let mut v = zeroed::<B, f32>(b, n, np).expect("v");
        let cfg = AdamW::default();
        grp.run(b, &ad, &Case::bytes(by).per(Per::Bytes), n, |i| {
            adamw_step(b, &cfg, 1, &mut p[i], &g[i], &mut m[i], &mut v[i])?;
            Ok(())
        });
        let mut out = b.alloc::<f32>(1).expect("out");
        let mut ws = b
            .alloc::<u8>(sum_squares_workspace_bytes(b, np).max(1))
            .expect("ws");
        grp.run(
            b,
            &ss,
            &Case::bytes((np * 4) as u64).flops((2 * np) as u64, Compute::Fma),
            n,
            |i| {
                sum_squares(b, &g[i], &mut out, &mut ws)?;
                Ok(())
            },
        );
    }
    grp.finish();
}

// ---- training step -----------------------------------------------------------------------------

struct TrainCfg {
    name: String,
    model: LlamaConfig,
    batch: Batch,
}

fn host_train() -> TrainCfg {
    let demo = lora_kernels::demo::DemoConfig::full();
    let mut rng = lora_kernels::demo::SplitMix::new(7);
    let batch = lora_kernels::demo::make_batch(
        &lora_kernels::demo::PRETRAIN_TASKS,
        demo.batch,
        demo.len,
        &mut rng,
    );
    TrainCfg {
        name: format!(
            "demo_d{}_l{}_t{}",
            demo.model.d_model,
            demo.model.n_layers,
            batch.tokens.len()
        ),
        model: demo.model,
        batch,
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn gpu_train() -> TrainCfg {
    let model = LlamaConfig {
        vocab: 32000,
        d_model: 4096,
        n_layers: 1,
        n_heads: 32,
        n_kv_heads: 8,
        d_ff: 14336,
        rope_theta: 500_000.0,
        norm_eps: 1e-5,
    };
    let (seqs, len) = (2, 512);
    let mut rng = Rng::new(11);
    let tokens: Vec<i32> = (0..seqs * len)
        .map(|_| rng.below(model.vocab) as i32)
        .collect();
    let targets: Vec<i32> = (0..seqs * len)
        .map(|i| {
            if (i + 1) % len == 0 {
                -1
            } else {
                tokens[i + 1]
            }
        })
        .collect();
    TrainCfg {
        name: format!("llama3-8b-layer_vocab32000_t{}", seqs * len),
        model,
        batch: Batch {
            tokens,
            targets,
            lens: vec![len; seqs],
        },
    }
}

fn train<B: Backend>(c: &mut Criterion, ctx: &Ctx, b: &B, cfg: TrainCfg) {
    let mut grp = ctx.group(c, format!("block/{}", b.name()));
    let name = format!("train_step_f32_lora_r16/{}", cfg.name);
    let mem_id = format!("memory/train_step/{}/{}", b.name(), cfg.name);
    if !grp.selected(&name) && !ctx.filter.selects(&mem_id) {
        return;
    }
    if ctx.filter.list {
        grp.run(b, &name, &Case::default(), 1, |_| Ok(()));
        return;
    }
    let m = cfg.model;
    let mut model = match TinyLm::<B, f32>::new(b, m, 1) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{}: skipped: {e}", grp.id(&name));
            return;
        }
    };
    let lora = LoraConfig {
        target_modules: lora_kernels::model::PROJECTIONS.map(String::from).to_vec(),
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        use_rslora: false,
    };
    model.attach_lora(b, lora, 2).expect("attach LoRA");
    let opt = lora_kernels::demo::adamw(1e-4);
    let batch = &cfg.batch;
    let t = batch.tokens.len() as u64;
    let (d, kv, ff, v) = (
        m.d_model as u64,
        m.kv_dim() as u64,
        m.d_ff as u64,
        m.vocab as u64,
    );
    let p_lin = m.n_layers as u64 * (2 * d * d + 2 * d * kv + 3 * d * ff) + v * d;
    let pairs: u64 = batch.lens.iter().map(|&l| (l * (l + 1) / 2) as u64).sum();
    let attn = m.n_layers as u64 * (m.n_heads * m.head_dim()) as u64 * pairs;
    let flops = 4 * t * p_lin + 14 * attn;
    let bytes = 2 * 4 * p_lin;

    // Peak memory of one step (also the warm-up and the error probe).
    let step = |model: &mut TinyLm<B, f32>, k: u64| -> BenchResult {
        lora_kernels::demo::train_step(b, model, batch, &opt, k)?;
        Ok(())
    };
    let before = crate::common::alloc::reset_peak();
    #[cfg(feature = "cuda")]
    let dev_before = if b.name() == "cuda" {
        ctx.gpu.as_ref().and_then(|g| {
            let _ = g.dev.synchronize();
            crate::common::gpu::pool_reset_peak(&g.dev);
            crate::common::gpu::pool_used(&g.dev)
        })
    } else {
        None
    };
    if let Err(e) = step(&mut model, 0) {
        eprintln!("{}: skipped: {e}", grp.id(&name));
        return;
    }
    let host_peak = crate::common::alloc::peak() - before;
    #[allow(unused_mut)]
    let mut record = json!({
        "backend": b.name(),
        "model": format!("{m:?}"),
        "tokens": t,
        "host_heap_peak_bytes": host_peak,
        "host_heap_before_bytes": before,
        "method": "host: counting global allocator, high-water mark over one step minus live heap bytes before it",
    });
    #[allow(unused_mut)]
    let mut line = format!(
        "{mem_id}: host heap peak over the step {}",
        fmt_bytes(host_peak as f64)
    );
    #[cfg(feature = "cuda")]
    if let (Some(g), Some(used)) = (ctx.gpu.as_ref().filter(|_| b.name() == "cuda"), dev_before) {
        let _ = g.dev.synchronize();
        if let Some(peak) = crate::common::gpu::pool_peak(&g.dev) {
            let o = record.as_object_mut().expect("object");
            o.insert("device_peak_bytes".into(), json!(peak.saturating_sub(used)));
            o.insert("device_resident_bytes".into(), json!(used));
            o.insert(
                "method".into(),
                json!("cuda: default memory pool USED_MEM_HIGH over one step (reset before) minus USED_MEM_CURRENT before; host: counting allocator"),
            );
            line = format!(
                "{mem_id}: device peak over the step {} above {} resident (model, optimizer state)",
                fmt_bytes(peak.saturating_sub(used) as f64),
                fmt_bytes(used as f64)
            );
        }
    }
    eprintln!("{line}");
    if ctx.filter.selects(&mem_id) {
        ctx.sidecar.borrow_mut().put(memory_record(&mem_id, record));
    }
    let case = Case::bytes(bytes)
        .flops(flops, Compute::Fma)
        .per(Per::Elements(t))
        .note("approximate roofline: linear layers (forward + dX) and attention FLOPs; f32 model");
    let mut k = 1;
    grp.run(b, &name, &case, 1, |_| {
        k += 1;
        step(&mut model, k)
    });
    grp.finish();
}

// ---- decode step -------------------------------------------------------------------------------

struct DecodeCfg {
    d: usize,
    heads: usize,
    kv_heads: usize,
    ff: usize,
    adapters: usize,
    rank: usize,
    /// (sequences, cached tokens)
    batches: &'static [(usize, usize)],
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU_DECODE: DecodeCfg = DecodeCfg {
    d: 4096,
    heads: 32,
    kv_heads: 8,
    ff: 14336,
    adapters: 64,
    rank: 16,
    batches: &[(1, 1024), (64, 1024)],
};
const HOST_DECODE: DecodeCfg = DecodeCfg {
    d: 64,
    heads: 4,
    kv_heads: 2,
    ff: 128,
    adapters: 4,
    rank: 8,
    batches: &[(2, 32)],
};

fn decode<B: Backend>(c: &mut Criterion, ctx: &Ctx, b: &B, cfg: &DecodeCfg) {
    let mut grp = ctx.group(c, format!("block/{}", b.name()));
    for &(n, kv_len) in cfg.batches {
        let name = format!(
            "decode_step_f16_lora_r{}/d{}_b{n}_kv{kv_len}_{}adapters",
            cfg.rank, cfg.d, cfg.adapters
        );
        if !grp.selected(&name) {
            continue;
        }
        if let Err(e) = decode_case(&mut grp, b, cfg, &name, n, kv_len) {
            eprintln!("{}: skipped: {e}", grp.id(&name));
        }
    }
    grp.finish();
}

fn decode_case<B: Backend>(
    grp: &mut crate::common::Group<'_, '_>,
    b: &B,
    cfg: &DecodeCfg,
    name: &str,
    n: usize,
    kv_len: usize,
) -> BenchResult {
    let (d, ff) = (cfg.d, cfg.ff);
    let hd = d / cfg.heads;
    let kv = cfg.kv_heads * hd;
    let shape = Attention::new(cfg.heads, cfg.kv_heads, hd);
    // Projections: (d_out, d_in) of q, k, v, o, gate, up, down; weights f16 [d_out, d_in].
    let proj = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)];
    let w: Vec<B::Buffer<f16>> = proj
        .iter()
        .enumerate()
        .map(|(i, &(o, k))| upload_vals::<B, f16>(b, o * k, 20 + i as u64, 1.0 / (k as f64).sqrt()))
        .collect::<lora_kernels::Result<_>>()?;
    let norm_w = [
        upload_vals::<B, f16>(b, d, 30, 1.0)?,
        upload_vals::<B, f16>(b, d, 31, 1.0)?,
    ];
    let pools: Vec<Pool<B>> = proj
        .iter()
        .map(|&(o, k)| Pool::new(b, k, &[o], vec![cfg.rank; cfg.adapters]))
        .collect::<lora_kernels::Result<_>>()?;
    let tables = pools
        .iter()
        .map(|p| p.table(b))
        .collect::<lora_kernels::Result<Vec<_>>>()?;
    let host_ids =
        crate::common::serving::id_sets(Pop::Distinct, n, 1, cfg.adapters, 1, 3).remove(0);
    let ids = b.upload(&host_ids)?;
    let mut x = upload_vals::<B, f16>(b, n * d, 32, 1.0)?;
    let mut kc = upload_vals::<B, f16>(b, n * kv_len * kv, 33, 1.0)?;
    let mut vc = upload_vals::<B, f16>(b, n * kv_len * kv, 34, 1.0)?;
    let pos = b.upload(&vec![kv_len as i32 - 1; n])?;
    let slots = b.upload(
        &(0..n)
            .map(|i| (i * kv_len + kv_len - 1) as i32)
            .collect::<Vec<_>>(),
    )?;
    let kv_start = b.upload(&(0..n).map(|i| (i * kv_len) as i32).collect::<Vec<_>>())?;
    let lens = b.upload(&vec![kv_len as i32; n])?;
    let mut h = b.alloc::<f16>(n * d)?;
    let mut rstd = b.alloc::<f32>(n)?;
    let mut outs: Vec<B::Buffer<f16>> = proj
        .iter()
        .map(|&(o, _)| b.alloc::<f16>(n * o))
        .collect::<lora_kernels::Result<_>>()?;
    let mut a = b.alloc::<f16>(n * d)?;
    let mut s = b.alloc::<f16>(n * ff)?;
    let mut u = b.alloc::<f32>(n * cfg.rank)?;
    let mut ws = b.alloc::<u8>(attention_decode_workspace_bytes(b, &shape, n, kv_len).max(1))?;
    let mut fault = b.alloc::<u32>(1)?;
    let nrm = RmsNorm::new(n, d, 1e-5);
    let rope_q = Rope::new(n, cfg.heads, hd, 500_000.0);
    let rope_k = Rope::new(n, cfg.kv_heads, hd, 500_000.0);

    // y = h·Wᵀ + s·B(A·h) for projection m, into outs[m].
    #[allow(clippy::too_many_arguments)]
    fn linear<B: Backend>(
        b: &B,
        m: usize,
        input: &B::Buffer<f16>,
        w: &B::Buffer<f16>,
        (d_out, d_in): (usize, usize),
        table: &lora_kernels::adapter::AdapterTable<'_, B>,
        ids: &B::Buffer<i32>,
        n: usize,
        u: &mut B::Buffer<f32>,
        out: &mut B::Buffer<f16>,
    ) -> BenchResult {
        let _ = m;
        gemm(b, input, w, out, &Gemm::nt(n, d_out, d_in))?;
        let bg = Bgmv::new(b, table, ids, n)?;
        bg.shrink(b, input, d_in, u, None)?;
        bg.expand(b, u, out, d_out, ExpandMode::Add, None)?;
        Ok(())
    }

    let mut step = |_: usize| -> BenchResult {
        rmsnorm_forward(b, &nrm, &x, &norm_w[0], &mut h, &mut rstd)?;
        for m in 0..3 {
            linear(
                b,
                m,
                &h,
                &w[m],
                proj[m],
                &tables[m],
                &ids,
                n,
                &mut u,
                &mut outs[m],
            )?;
        }
        let (q, rest) = outs.split_at_mut(1);
        rope_forward(b, &rope_q, &pos, &mut q[0], &mut fault)?;
        rope_forward(b, &rope_k, &pos, &mut rest[0], &mut fault)?;
        kv_cache_write(b, kv, n, &rest[0], &slots, &mut kc, &mut fault)?;
        kv_cache_write(b, kv, n, &rest[1], &slots, &mut vc, &mut fault)?;
        attention_decode(
            b, &shape, n, kv_len, &q[0], &kc, &vc, &kv_start, &lens, &mut a, &mut ws, &mut fault,
        )?;
        linear(
            b,
            3,
            &a,
            &w[3],
            proj[3],
            &tables[3],
            &ids,
            n,
            &mut u,
            &mut outs[3],
        )?;
        add_assign(b, &mut x, &outs[3])?;
        rmsnorm_forward(b, &nrm, &x, &norm_w[1], &mut h, &mut rstd)?;
        for m in 4..6 {
            linear(
                b,
                m,
                &h,
                &w[m],
                proj[m],
                &tables[m],
                &ids,
                n,
                &mut u,
                &mut outs[m],
            )?;
        }
        swiglu_forward(b, &outs[4], &outs[5], &mut s)?;
        linear(
            b,
            6,
            &s,
            &w[6],
            proj[6],
            &tables[6],
            &ids,
            n,
            &mut u,
            &mut outs[6],
        )?;
        add_assign(b, &mut x, &outs[6])?;
        Ok(())
    };
    let weights: u64 =
        proj.iter().map(|&(o, k)| (o * k * 2) as u64).sum::<u64>() + (2 * d * 2) as u64;
    let lora: u64 = proj
        .iter()
        .map(|&(o, k)| (cfg.rank * (o + k) * 2) as u64)
        .sum::<u64>()
        * n.min(cfg.adapters) as u64;
    let cache = (2 * n * kv_len * kv * 2) as u64;
    let flops = 2 * n as u64 * (weights / 2) + (4 * hd * kv_len * cfg.heads * n) as u64;
    let case = Case::bytes(weights + lora + cache)
        .flops(flops, Compute::TensorF16)
        .per(Per::Elements(n as u64))
        .graph()
        .note("one block, one token per sequence, every launch of the step (timed as one CUDA graph on the GPU)");
    grp.run(b, name, &case, 1, &mut step);
    Ok(())
}
