//! LoRA backward with W frozen (du = s·G·B, dB = s·Gᵀu, dA = duᵀ·x̂, dx += du·A; the dropout mask
//! regenerated from the forward's seed), and the activation memory a LoRA layer keeps for it.
//!
//! **Timed.** Dense single-adapter backward (bf16 x, G, W; f32 u and gradients; p = 0.1) at Llama
//! shapes — attention (4096 → 4096), gate (4096 → 14336), down (14336 → 4096) — with 4096 tokens,
//! rank 16; and the multi-adapter backward over SGMV segments (f16, fused qkv 4096 → 4096/1024/1024,
//! 4 adapters training at once, 4096 tokens). Bytes: x, G, u, A, B read; dA, dB, du written; dx
//! read and written. FLOPs 4·T·r·(d_in + d_out) per (adapter, slice) on the FMA roofline.
//! cpu / emu: 256 tokens, 256 → 256, rank 16.
//!
//! **Memory report** (`memory/activations/…`, computed — no device needed — printed and recorded
//! in the sidecar): bytes a LoRA fine-tune of Llama-3-8B (32 layers, LoRA on q, k, v, o, gate, up,
//! down) keeps between forward and backward for its LoRA branches, bf16 activations:
//! - ours: each distinct layer input x once (q/k/v share the normed hidden state, gate/up the
//!   second one; o takes the attention output, down the SwiGLU output) + u `[T, r]` f32 per module +
//!   16 bytes (seed, offset); the mask is regenerated from Philox, x̂ never stored;
//! - PEFT with `lora_dropout > 0` (one `nn.Dropout` per module) — and LoRAFusion as issue #8
//!   describes it, storing the mask and the dropped-out input: per module the mask (torch.bool, 1
//!   byte per element), x̂ `[T, d_in]` bf16 (saved by `lora_A`) and u `[T, r]` bf16 (saved by
//!   `lora_B`); a frozen base `nn.Linear` saves no input;
//! - both at p = 0 (PEFT's `nn.Identity`: x is shared like ours, u in bf16).

use criterion::Criterion;
use lora_kernels::backward::{
    backward_dense, backward_dense_workspace_bytes, BackwardDense, BackwardSgmv, DenseGrads,
    DenseInputs, Dropout, GradMode, GradTableBuilder, SgmvInputs, SgmvOutputs,
};
use lora_kernels::sgmv::SgmvPlan;
use lora_kernels::{bf16, f16, Backend, Cpu, Emu};
use serde_json::json;

use crate::common::serving::{id_sets, Pool, Pop};
use crate::common::{fmt_bytes, memory_record, replicas, upload_vals, zeroed, Case, Compute, Ctx};

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU_DENSE: &[(&str, usize, usize, usize, usize)] = &[
    ("attn", 4096, 4096, 4096, 16),
    ("gate", 4096, 4096, 14336, 16),
    ("down", 4096, 14336, 4096, 16),
];
const HOST_DENSE: &[(&str, usize, usize, usize, usize)] = &[("square", 256, 256, 256, 16)];

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    activation_report(ctx);
    if ctx.host {
        on(c, ctx, &Cpu, HOST_DENSE, (256, &[256, 64, 64], 4, 64));
        on(c, ctx, &Emu, HOST_DENSE, (256, &[256, 64, 64], 4, 64));
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &ctx.gpu {
        on(
            c,
            ctx,
            &g.dev,
            GPU_DENSE,
            (4096, &[4096, 1024, 1024], 4, 4096),
        );
    }
    ctx.say_no_gpu("backward");
}

fn dropout(p: f64) -> Dropout {
    let mut d = Dropout::NONE;
    d.p = p;
    d.seed = 99;
    for (s, o) in d.offsets.iter_mut().enumerate() {
        *o = s as u64;
    }
    d
}

#[allow(clippy::type_complexity)]
fn on<B: Backend>(
    c: &mut Criterion,
    ctx: &Ctx,
    b: &B,
    dense: &[(&str, usize, usize, usize, usize)],
    sgmv: (usize, &[usize], usize, usize),
) {
    let mut grp = ctx.group(c, format!("backward/{}", b.name()));
    for &(what, t, d_in, d_out, r) in dense {
        let name = format!("dense_bf16_p0.1/{what}_t{t}_{d_in}x{d_out}_r{r}");
        if !grp.selected(&name) {
            continue;
        }
        let mut shape = BackwardDense::new(t, d_in, d_out, r, 2.0);
        shape.dropout = dropout(0.1);
        shape.mode = GradMode::Overwrite;
        let bytes = ((t * d_in + t * d_out) * 2
            + t * r * 4
            + (r * d_in + d_out * r) * 2
            + (r * d_in + d_out * r) * 4
            + t * r * 4
            + 2 * t * d_in * 2) as u64;
        let flops = (4 * t * r * (d_in + d_out)) as u64;
        let n = ctx.sets(b, bytes);
        let x = replicas::<B, bf16>(b, n, t * d_in, 1, 1.0).expect("x");
        let g = replicas::<B, bf16>(b, n, t * d_out, 2, 0.1).expect("g");
        let u = replicas::<B, f32>(b, n, t * r, 3, 0.5).expect("u");
        let a = replicas::<B, bf16>(b, n, r * d_in, 4, 0.01).expect("a");
        let bw = replicas::<B, bf16>(b, n, d_out * r, 5, 0.01).expect("b");
        let mut da = zeroed::<B, f32>(b, n, r * d_in).expect("da");
        let mut db = zeroed::<B, f32>(b, n, d_out * r).expect("db");
        let mut du = zeroed::<B, f32>(b, n, t * r).expect("du");
        let mut dx = zeroed::<B, bf16>(b, n, t * d_in).expect("dx");
        let mut ws = b
            .alloc::<u8>(backward_dense_workspace_bytes(b, &shape).max(1))
            .expect("ws");
        grp.run(
            b,
            &name,
            &Case::bytes(bytes).flops(flops, Compute::Fma),
            n,
            |i| {
                backward_dense(
                    b,
                    &shape,
                    DenseInputs {
                        x: &x[i],
                        g: &g[i],
                        u: &u[i],
                        a: &a[i],
                        b: &bw[i],
                    },
                    DenseGrads {
                        da: &mut da[i],
                        db: &mut db[i],
                        du: &mut du[i],
                        dx: Some(&mut dx[i]),
                    },
                    &mut ws,
                )?;
                Ok(())
            },
        );
    }

    // Several adapters training in one batch, over the forward's SGMV plan.
    let (d_in, widths, n_ad, t) = sgmv;
    let name = format!("sgmv_f16_p0.1/qkv_r16_t{t}_{n_ad}adapters");
    if grp.selected(&name) {
        if let Err(e) = sgmv_case(&mut grp, ctx, b, &name, d_in, widths, n_ad, t) {
            eprintln!("{}: skipped: {e}", grp.id(&name));
        }
    }
    grp.finish();
}

#[allow(clippy::too_many_arguments)]
fn sgmv_case<B: Backend>(
    grp: &mut crate::common::Group<'_, '_>,
    ctx: &Ctx,
    b: &B,
    name: &str,
    d_in: usize,
    widths: &[usize],
    n_ad: usize,
    t: usize,
) -> crate::common::BenchResult {
    let r = 16;
    let pool = Pool::new(b, d_in, widths, vec![r; n_ad])?;
    let table = pool.table(b)?;
    let w = pool.out_width();
    let ns = widths.len();
    let ids = b.upload(&id_sets(Pop::Distinct, t, t / n_ad, n_ad, 1, 5)[0])?;
    let mut plan = SgmvPlan::alloc(b, t, t.min(n_ad))?;
    let mut pws = b.alloc::<u8>(plan.plan_workspace_bytes(b, &ids, n_ad).max(1))?;
    plan.plan(b, &ids, n_ad, &mut pws, None)?;
    let mut grads: Vec<(B::Buffer<f32>, B::Buffer<f32>)> = Vec::new();
    for _ in 0..n_ad {
        for &n_s in widths {
            grads.push((b.alloc::<f32>(r * d_in)?, b.alloc::<f32>(n_s * r)?));
        }
    }
    let mut gb = GradTableBuilder::new(&table);
    for (k, (da, db)) in grads.iter_mut().enumerate() {
        gb.set(b, k / ns, k % ns, Some(da), d_in, Some(db), r)?;
    }
    let gt = gb.build(b)?;
    let bw = BackwardSgmv::new(&table, &gt, &plan)?;
    let x = upload_vals::<B, f16>(b, t * d_in, 1, 1.0)?;
    let g = upload_vals::<B, f16>(b, t * w, 2, 0.1)?;
    let u = upload_vals::<B, f32>(b, ns * t * r, 3, 0.5)?;
    let mut du = b.alloc::<f32>(ns * t * r)?;
    let mut dx = b.alloc::<f16>(t * d_in)?;
    let mut ws = b.alloc::<u8>(bw.workspace_bytes(b).max(1))?;
    let drop = dropout(0.1);
    let weights = (n_ad * (ns * r * d_in + w * r) * 2) as u64;
    let bytes = weights
        + ((t * d_in + t * w) * 2
            + 2 * ns * t * r * 4
            + n_ad * (ns * r * d_in + w * r) * 4
            + 2 * t * d_in * 2) as u64;
    let flops: u64 = widths
        .iter()
        .map(|&n_s| (4 * t * r * (n_s + d_in)) as u64)
        .sum();
    let _ = ctx;
    grp.run(
        b,
        name,
        &Case::bytes(bytes).flops(flops, Compute::Fma),
        1,
        |_| {
            bw.run(
                b,
                SgmvInputs {
                    x: &x,
                    ld_x: d_in,
                    g: &g,
                    ld_g: w,
                    u: &u,
                },
                SgmvOutputs {
                    du: &mut du,
                    dx: Some(&mut dx),
                    ld_dx: d_in,
                },
                GradMode::Overwrite,
                &drop,
                &mut ws,
                None,
            )?;
            Ok(())
        },
    );
    Ok(())
}

/// The computed activation-memory comparison (module docs).
fn activation_report(ctx: &Ctx) {
    // Llama-3-8B: d 4096, kv 1024, d_ff 14336, 32 layers.
    let (d, kv, ff, layers) = (4096u64, 1024u64, 14336u64, 32u64);
    // (module, d_in, d_out, input tensor)
    let modules = [
        ("q_proj", d, d, "h_attn"),
        ("k_proj", d, kv, "h_attn"),
        ("v_proj", d, kv, "h_attn"),
        ("o_proj", d, d, "attn_out"),
        ("gate_proj", d, ff, "h_mlp"),
        ("up_proj", d, ff, "h_mlp"),
        ("down_proj", ff, d, "swiglu_out"),
    ];
    let inputs = [
        ("h_attn", d),
        ("attn_out", d),
        ("h_mlp", d),
        ("swiglu_out", ff),
    ];
    let mut printed = false;
    for (t, r, p) in [
        (4096u64, 16u64, 0.05),
        (16384, 16, 0.05),
        (4096, 64, 0.05),
        (4096, 16, 0.0),
    ] {
        let id = format!("memory/activations/llama3-8b/t{t}_r{r}_bf16_p{p}");
        if !ctx.filter.selects(&id) {
            continue;
        }
        let x_shared: u64 = inputs.iter().map(|(_, w)| t * w * 2).sum();
        let ours_u: u64 = modules.iter().map(|_| t * r * 4 + 16).sum();
        let ours = x_shared + ours_u;
        let peft: u64 = if p > 0.0 {
            modules
                .iter()
                .map(|&(_, d_in, _, _)| t * d_in * 2 + t * d_in + t * r * 2)
                .sum()
        } else {
            x_shared + modules.iter().map(|_| t * r * 2).sum::<u64>()
        };
        if !printed {
            eprintln!(
                "LoRA activation memory kept for the backward, Llama-3-8B (32 layers, LoRA on all 7 projections, bf16), computed:"
            );
            printed = true;
        }
        eprintln!(
            "  T={t:>5} r={r:>2} p={p:<4}: ours {:>9}/layer, {:>9}/model | PEFT/LoRAFusion (mask + x̂ per module) {:>9}/layer, {:>9}/model | ours = {:.2}× theirs",
            fmt_bytes(ours as f64),
            fmt_bytes((ours * layers) as f64),
            fmt_bytes(peft as f64),
            fmt_bytes((peft * layers) as f64),
            ours as f64 / peft as f64
        );
        ctx.sidecar.borrow_mut().put(memory_record(
            &id,
            json!({
                "model": "Llama-3-8B", "layers": layers, "tokens": t, "rank": r, "dropout": p,
                "dtype": "bf16",
                "ours_bytes_per_layer": ours, "theirs_bytes_per_layer": peft,
                "ours_bytes": ours * layers, "theirs_bytes": peft * layers,
                "ours": "distinct layer inputs x once (h_attn, attn_out, h_mlp, swiglu_out; bf16) + u [T, r] f32 and a 16-byte seed/offset per module",
                "theirs": if p > 0.0 { "per module: mask (torch.bool) + dropped-out x̂ [T, d_in] bf16 + u [T, r] bf16 (PEFT lora_dropout > 0; LoRAFusion as issue #8 describes it)" } else { "PEFT with lora_dropout = 0: x shared (nn.Identity) + u [T, r] bf16 per module" },
                "method": "computed from the shapes (no device)",
            }),
        ));
    }
}
