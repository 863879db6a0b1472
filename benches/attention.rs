//! Causal attention of the reference block (packed variable-length sequences, grouped KV heads,
//! online softmax): training forward and backward, the KV-cache write and single-token decode.
//!
//! GPU: Llama-3-8B heads (32 q / 8 kv, head_dim 128), f16 (forward also bf16); prefill/training
//! batches of 4 × 2048 and 16 × 512 tokens; decode of 1, 16 and 64 sequences over 4096 cached
//! tokens each (rotating caches). FLOPs: 4·head_dim per (query, key) pair per head forward (QKᵀ and
//! PV; causal: S(S+1)/2 pairs), 10·head_dim backward (QKᵀ again, dV, dP, dQ, dK), on the tensor-core
//! roofline of the dtype; decode is memory-bound (bytes = the K and V rows read once + q + out).
//! cpu / emu: f32, 4 q / 2 kv heads of 16, 2 × 32 tokens; decode 2 sequences × 64.

use criterion::Criterion;
use lora_kernels::attention::{
    attention_backward, attention_backward_workspace_bytes, attention_decode,
    attention_decode_workspace_bytes, attention_forward, kv_cache_write, Attention, AttentionBatch,
};
#[cfg(feature = "cuda")]
use lora_kernels::{bf16, f16};
use lora_kernels::{Backend, Cpu, Emu, Float};

use crate::common::{replicas, upload_vals, zeroed, BenchResult, Case, Compute, Ctx, Per};

struct Shape {
    heads: (usize, usize, usize),
    /// (sequences, tokens each)
    batches: &'static [(usize, usize)],
    /// (sequences, cached tokens each)
    decode: &'static [(usize, usize)],
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU: Shape = Shape {
    heads: (32, 8, 128),
    batches: &[(4, 2048), (16, 512)],
    decode: &[(1, 4096), (16, 4096), (64, 4096)],
};
const HOST: Shape = Shape {
    heads: (4, 2, 16),
    batches: &[(2, 32)],
    decode: &[(2, 64)],
};

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    if ctx.host {
        on::<Cpu, f32>(c, ctx, &Cpu, &HOST, true);
        on::<Emu, f32>(c, ctx, &Emu, &HOST, true);
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &ctx.gpu {
        on::<_, f16>(c, ctx, &g.dev, &GPU, true);
        on::<_, bf16>(c, ctx, &g.dev, &GPU, false);
    }
    ctx.say_no_gpu("attention");
}

fn on<B: Backend, T: Float>(c: &mut Criterion, ctx: &Ctx, b: &B, sh: &Shape, all: bool) {
    let mut grp = ctx.group(c, format!("attention/{}", b.name()));
    let (h, kvh, hd) = sh.heads;
    let shape = Attention::new(h, kvh, hd);
    let (qd, kd) = (shape.q_dim(), shape.kv_dim());
    let e = T::DTYPE.size_bytes();
    let dt = T::DTYPE.name();
    let compute = Compute::tensor_for::<T>();
    for &(n_seqs, len) in sh.batches {
        let tag = format!("{dt}/h{h}_kv{kvh}_d{hd}_{n_seqs}x{len}");
        let (fwd, bwd) = (format!("forward_{tag}"), format!("backward_{tag}"));
        if !(grp.selected(&fwd) || all && grp.selected(&bwd)) {
            continue;
        }
        let t = n_seqs * len;
        let starts: Vec<i32> = (0..=n_seqs).map(|i| (i * len) as i32).collect();
        let seq_starts = b.upload(&starts).expect("seq_starts");
        let batch = AttentionBatch {
            seq_starts: &seq_starts,
            n_seqs,
            tokens: t,
            max_seq_len: len,
        };
        let pairs = (n_seqs * len * (len + 1) / 2) as u64;
        let q = upload_vals::<B, T>(b, t * qd, 1, 1.0).expect("q");
        let k = upload_vals::<B, T>(b, t * kd, 2, 1.0).expect("k");
        let v = upload_vals::<B, T>(b, t * kd, 3, 1.0).expect("v");
        let mut out = b.alloc::<T>(t * qd).expect("out");
        let mut lse = b.alloc::<f32>(t * h).expect("lse");
        let mut fault = b.alloc::<u32>(1).expect("fault");
        let bytes = ((2 * t * qd + 2 * t * kd) * e + t * h * 4) as u64;
        let case = Case::bytes(bytes)
            .flops(4 * hd as u64 * pairs * h as u64, compute)
            .per(Per::Flops);
        grp.run(b, &fwd, &case, 1, |_| -> BenchResult {
            attention_forward(
                b, &shape, &batch, &q, &k, &v, &mut out, &mut lse, &mut fault,
            )?;
            Ok(())
        });
        if !(all && grp.selected(&bwd)) {
            continue;
        }
        // The backward needs the forward's out and lse.
        if let Err(e) = attention_forward(
            b, &shape, &batch, &q, &k, &v, &mut out, &mut lse, &mut fault,
        ) {
            eprintln!(
                "{}: skipped: the forward it needs failed: {e}",
                grp.id(&bwd)
            );
            continue;
        }
        let d_out = upload_vals::<B, T>(b, t * qd, 4, 0.1).expect("d_out");
        let mut dq = b.alloc::<T>(t * qd).expect("dq");
        let mut dk = b.alloc::<T>(t * kd).expect("dk");
        let mut dv = b.alloc::<T>(t * kd).expect("dv");
        let mut ws = b
            .alloc::<u8>(attention_backward_workspace_bytes(b, &shape, &batch).max(1))
            .expect("workspace");
        let bytes = ((4 * t * qd + 4 * t * kd) * e + t * h * 4) as u64;
        let case = Case::bytes(bytes)
            .flops(10 * hd as u64 * pairs * h as u64, compute)
            .per(Per::Flops);
        grp.run(b, &bwd, &case, 1, |_| -> BenchResult {
            attention_backward(
                b, &shape, &batch, &q, &k, &v, &out, &lse, &d_out, &mut dq, &mut dk, &mut dv,
                &mut ws, &mut fault,
            )?;
            Ok(())
        });
    }
    if !all {
        grp.finish();
        return;
    }
    for &(n_seqs, kv_len) in sh.decode {
        let tag = format!("{dt}/h{h}_kv{kvh}_d{hd}_b{n_seqs}_kv{kv_len}");
        let (dec, wr) = (format!("decode_{tag}"), format!("kv_cache_write_{tag}"));
        if !grp.selected(&dec) && !grp.selected(&wr) {
            continue;
        }
        let rows = n_seqs * kv_len;
        let bytes = ((2 * rows * kd + 2 * n_seqs * qd) * e) as u64;
        let sets = ctx.sets(b, bytes);
        let kc = replicas::<B, T>(b, sets, rows * kd, 5, 1.0).expect("k cache");
        let vc = replicas::<B, T>(b, sets, rows * kd, 6, 1.0).expect("v cache");
        let q = replicas::<B, T>(b, sets, n_seqs * qd, 7, 1.0).expect("q");
        let mut out = zeroed::<B, T>(b, sets, n_seqs * qd).expect("out");
        let kv_start = b
            .upload(&(0..n_seqs).map(|i| (i * kv_len) as i32).collect::<Vec<_>>())
            .expect("kv_start");
        let lens = b.upload(&vec![kv_len as i32; n_seqs]).expect("kv_len");
        let mut ws = b
            .alloc::<u8>(attention_decode_workspace_bytes(b, &shape, n_seqs, kv_len).max(1))
            .expect("workspace");
        let mut fault = b.alloc::<u32>(1).expect("fault");
        let flops = (4 * hd * kv_len * h * n_seqs) as u64;
        grp.run(
            b,
            &dec,
            &Case::bytes(bytes).flops(flops, compute),
            sets,
            |i| -> BenchResult {
                attention_decode(
                    b,
                    &shape,
                    n_seqs,
                    kv_len,
                    &q[i],
                    &kc[i],
                    &vc[i],
                    &kv_start,
                    &lens,
                    &mut out[i],
                    &mut ws,
                    &mut fault,
                )?;
                Ok(())
            },
        );
        // One new row per sequence into its cache (the decode step's write).
        let new_rows = upload_vals::<B, T>(b, n_seqs * kd, 8, 1.0).expect("rows");
        let slots = b
            .upload(
                &(0..n_seqs)
                    .map(|i| (i * kv_len + kv_len - 1) as i32)
                    .collect::<Vec<_>>(),
            )
            .expect("slots");
        let mut kc = kc;
        grp.run(
            b,
            &wr,
            &Case::bytes((2 * n_seqs * kd * e + n_seqs * 4) as u64),
            sets,
            |i| -> BenchResult {
                kv_cache_write(b, kd, n_seqs, &new_rows, &slots, &mut kc[i], &mut fault)?;
                Ok(())
            },
        );
    }
    grp.finish();
}
