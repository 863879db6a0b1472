//! Causal attention with grouped KV heads (fwd/bwd) and decode over a KV cache. (issue #7)
//! GPU trials: cuda vs the f64 cpu reference (odd sizes, f16/bf16, a realistic Llama-3-8B-like
//! shape on sampled (sequence, kv group) sub-problems), determinism, device-side faults, bad
//! input. Tolerances: the probabilistic model of tests/attention.rs (8u·(…), see there).

use std::time::Instant;

use libtest_mimic::Failed;
use lora_kernels::adapter::fault;
use lora_kernels::attention::{
    attention_backward, attention_backward_workspace_bytes, attention_decode,
    attention_decode_workspace_bytes, attention_forward, kv_cache_write, Attention, AttentionBatch,
};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, DType, Error, Float};

use crate::common::{random_vec, rng, POISON};
use crate::GpuTest;

pub const TESTS: &[(&str, GpuTest)] = &[
    ("attention_f32_odd_sizes_match_cpu", odd_sizes::<f32>),
    ("attention_f16_odd_sizes_match_cpu", odd_sizes::<f16>),
    ("attention_bf16_odd_sizes_match_cpu", odd_sizes::<bf16>),
    (
        "attention_f32_llama3_shape_sampled_match_cpu",
        realistic::<f32>,
    ),
    (
        "attention_bf16_llama3_shape_sampled_match_cpu",
        realistic::<bf16>,
    ),
    ("attention_deterministic", deterministic),
    ("attention_bad_sequences_flagged", bad_sequences),
    ("attention_rejects_bad_input", rejects_bad_input),
    ("attention_kv_cache_write_bits_equal_cpu", kv_write),
    ("attention_decode_f32_matches_cpu", decode_case::<f32>),
    ("attention_decode_bf16_matches_cpu", decode_case::<bf16>),
    (
        "attention_decode_equals_forward_last_row",
        decode_vs_forward,
    ),
];

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn out_ulp<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F16 => f64::powi(2.0, -11),
        DType::BF16 => f64::powi(2.0, -8),
        _ => U,
    }
}

/// |out − ref| (inputs in [-1, 1]): 8u·(2 + |scale|·HD + √len) + ulp_T([½, 1)) (both sides are
/// rounded to T).
fn fwd_tol<T: Float>(a: &Attention, len: usize) -> f64 {
    8.0 * U * (2.0 + (a.scale as f64).abs() * a.head_dim as f64 + (len as f64).sqrt())
        + out_ulp::<T>()
}

/// Relative to max |ref| (≥ 1): 8u·(4 + |scale|·HD + √(G·len) + HD) + 8·√HD·ulp_T([½, 1)).
fn bwd_tol<T: Float>(a: &Attention, len: usize) -> f64 {
    let hd = a.head_dim as f64;
    let n = (a.group() * len) as f64;
    8.0 * U * (4.0 + (a.scale as f64).abs() * hd + n.sqrt() + hd) + 8.0 * hd.sqrt() * out_ulp::<T>()
}

fn e(x: Error) -> Failed {
    x.to_string().into()
}

fn starts_of(lens: &[usize]) -> Vec<i32> {
    let mut s = vec![0i32];
    for &l in lens {
        s.push(s.last().unwrap() + l as i32);
    }
    s
}

struct Problem<T> {
    a: Attention,
    lens: Vec<usize>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    d_out: Vec<T>,
}

impl<T: Float> Problem<T> {
    fn new(a: Attention, lens: &[usize], seed: u64) -> Self {
        let t: usize = lens.iter().sum();
        let mut r = rng(seed);
        Problem {
            a,
            lens: lens.to_vec(),
            q: random_vec(&mut r, t * a.q_dim()),
            k: random_vec(&mut r, t * a.kv_dim()),
            v: random_vec(&mut r, t * a.kv_dim()),
            d_out: random_vec(&mut r, t * a.q_dim()),
        }
    }
    fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }
}

/// out, lse, dq, dk, dv, fault (outputs poisoned first).
struct Results<T> {
    out: Vec<T>,
    lse: Vec<f32>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    fault: u32,
}

fn run<B: Backend, T: Float>(
    b: &B,
    p: &Problem<T>,
    starts: &[i32],
    max_seq_len: usize,
    timing: Option<&str>,
) -> Result<Results<T>, Failed> {
    let a = &p.a;
    let t = p.tokens();
    let sb = b.upload(starts).map_err(e)?;
    let batch = AttentionBatch::<B> {
        seq_starts: &sb,
        n_seqs: starts.len() - 1,
        tokens: t,
        max_seq_len,
    };
    let up = |x: &[T]| b.upload(x).map_err(e);
    let (q, k, v, dout) = (up(&p.q)?, up(&p.k)?, up(&p.v)?, up(&p.d_out)?);
    let pq = vec![T::from_f32(POISON); t * a.q_dim()];
    let pkv = vec![T::from_f32(POISON); t * a.kv_dim()];
    let mut out = up(&pq)?;
    let mut lse = b.upload(&vec![POISON; t * a.n_heads]).map_err(e)?;
    let (mut dq, mut dk, mut dv) = (up(&pq)?, up(&pkv)?, up(&pkv)?);
    let mut ws = b
        .alloc::<u8>(attention_backward_workspace_bytes(b, a, &batch))
        .map_err(e)?;
    let mut f = b.alloc::<u32>(1).map_err(e)?;
    b.synchronize().map_err(e)?;
    let t0 = Instant::now();
    attention_forward(b, a, &batch, &q, &k, &v, &mut out, &mut lse, &mut f).map_err(e)?;
    b.synchronize().map_err(e)?;
    let t1 = Instant::now();
    attention_backward(
        b, a, &batch, &q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, &mut ws, &mut f,
    )
    .map_err(e)?;
    b.synchronize().map_err(e)?;
    let t2 = Instant::now();
    if let Some(name) = timing {
        eprintln!(
            "{name}: forward {:.3} ms, backward {:.3} ms (first call, includes launch setup)",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3
        );
    }
    Ok(Results {
        out: b.download(&out).map_err(e)?,
        lse: b.download(&lse).map_err(e)?,
        dq: b.download(&dq).map_err(e)?,
        dk: b.download(&dk).map_err(e)?,
        dv: b.download(&dv).map_err(e)?,
        fault: b.download(&f).map_err(e)?[0],
    })
}

fn max_abs<T: Float>(got: &[T], want: &[T]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let (g, w) = (g.to_f64(), w.to_f64());
            if g.is_nan() || w.is_nan() {
                f64::INFINITY
            } else {
                (g - w).abs()
            }
        })
        .fold(0.0, f64::max)
}

/// Compares every output of `got` with `want` (same problem) within the tolerances.
fn compare<T: Float>(
    what: &str,
    a: &Attention,
    len: usize,
    got: &Results<T>,
    want: &Results<T>,
) -> Result<(), Failed> {
    let to = fwd_tol::<T>(a, len);
    let eo = max_abs(&got.out, &want.out);
    if eo > to {
        return Err(format!("{what}: out error {eo:e} > {to:e}").into());
    }
    for (g, w) in got.lse.iter().zip(&want.lse) {
        let tol = fwd_tol::<f32>(a, len) + U * (*w as f64).abs();
        if g.is_nan() || ((*g - *w) as f64).abs() > tol {
            return Err(format!("{what}: lse {g} vs {w}").into());
        }
    }
    let tb = bwd_tol::<T>(a, len);
    for (name, g, w) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        let scale = w
            .iter()
            .map(|x| x.to_f64().abs())
            .fold(0.0, f64::max)
            .max(1.0);
        let err = max_abs(g, w) / scale;
        if err > tb {
            return Err(format!("{what}: {name} relative error {err:e} > {tb:e}").into());
        }
    }
    eprintln!("{what}: out error {eo:.2e} (tol {to:.1e})");
    Ok(())
}

fn odd_sizes<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    odd_sizes_on::<_, T>(dev)
}

pub(crate) fn odd_sizes_on<B: Backend, T: Float>(dev: &B) -> Result<(), Failed> {
    for (a, lens, seed) in [
        (Attention::new(8, 2, 64), vec![1, 3, 17, 0, 127, 200], 1u64),
        (Attention::new(4, 4, 16), vec![65, 1, 63], 2),
        (Attention::new(6, 3, 32), vec![129, 5], 3),
        (Attention::new(4, 1, 128), vec![33, 97, 2], 4),
    ] {
        let p = Problem::<T>::new(a, &lens, seed);
        let starts = starts_of(&lens);
        let longest = *lens.iter().max().unwrap();
        let g = run(dev, &p, &starts, longest, None)?;
        let w = run(&Cpu, &p, &starts, longest, None)?;
        if g.fault != 0 {
            return Err("unexpected fault".into());
        }
        compare(&format!("{a:?} {lens:?} {}", T::DTYPE), &a, longest, &g, &w)?;
    }
    Ok(())
}

/// Columns `[h·hd, (h+1)·hd)` for the heads in `heads` of a `[tokens, n·hd]` tensor, rows `rows`.
fn gather<T: Float>(
    x: &[T],
    n: usize,
    hd: usize,
    rows: std::ops::Range<usize>,
    heads: &[usize],
) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * heads.len() * hd);
    for t in rows {
        for &h in heads {
            out.extend_from_slice(&x[(t * n + h) * hd..(t * n + h + 1) * hd]);
        }
    }
    out
}

/// Llama-3-8B-like: 8 sequences × 512 tokens, 32 query heads, 8 kv heads, head_dim 128. The cpu
/// reference (f64, O(len²·hd) per head) runs on sampled sub-problems: sequence s and kv head kh
/// with its 4 query heads, extracted as an Attention(4, 1, 128) problem over that sequence's rows
/// (attention never crosses sequences or kv groups, so the sub-problem's exact answer is the
/// full problem's). Prints the GPU time of one forward and one backward.
fn realistic<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    realistic_on::<_, T>(dev, 8, 512, &[(0, 0), (3, 5), (7, 7)])
}

/// `n_seqs` sequences of `len` tokens; `samples`: (sequence, kv head) sub-problems checked.
pub(crate) fn realistic_on<B: Backend, T: Float>(
    dev: &B,
    n_seqs: usize,
    len: usize,
    samples: &[(usize, usize)],
) -> Result<(), Failed> {
    let a = Attention::new(32, 8, 128);
    let lens = vec![len; n_seqs];
    let p = Problem::<T>::new(a, &lens, 10);
    let starts = starts_of(&lens);
    // Warm-up (module load, smem attribute), then the timed run.
    run(dev, &p, &starts, len, None)?;
    let label = format!(
        "{n_seqs}×{len} tokens, 32/8 heads, hd 128, {} on {}",
        T::DTYPE,
        dev.name()
    );
    let g = run(dev, &p, &starts, len, Some(&label))?;
    if g.fault != 0 {
        return Err("unexpected fault".into());
    }
    let sub = Attention::new(4, 1, 128);
    for &(s, kh) in samples {
        let rows = s * len..(s + 1) * len;
        let heads: Vec<usize> = (kh * 4..kh * 4 + 4).collect();
        let sp = Problem {
            a: sub,
            lens: vec![len],
            q: gather(&p.q, 32, 128, rows.clone(), &heads),
            k: gather(&p.k, 8, 128, rows.clone(), &[kh]),
            v: gather(&p.v, 8, 128, rows.clone(), &[kh]),
            d_out: gather(&p.d_out, 32, 128, rows.clone(), &heads),
        };
        let w = run(&Cpu, &sp, &[0, len as i32], len, None)?;
        let got = Results {
            out: gather(&g.out, 32, 128, rows.clone(), &heads),
            lse: rows
                .clone()
                .flat_map(|t| heads.iter().map(move |&h| (t, h)))
                .map(|(t, h)| g.lse[t * 32 + h])
                .collect(),
            dq: gather(&g.dq, 32, 128, rows.clone(), &heads),
            dk: gather(&g.dk, 8, 128, rows.clone(), &[kh]),
            dv: gather(&g.dv, 8, 128, rows.clone(), &[kh]),
            fault: 0,
        };
        compare(
            &format!("llama3 seq {s} kv head {kh} {}", T::DTYPE),
            &sub,
            512,
            &got,
            &w,
        )?;
    }
    Ok(())
}

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn deterministic(dev: &Cuda) -> Result<(), Failed> {
    deterministic_on(dev)
}

pub(crate) fn deterministic_on<B: Backend>(dev: &B) -> Result<(), Failed> {
    let a = Attention::new(16, 4, 64);
    let lens = [300usize, 1, 77, 512];
    let p = Problem::<f32>::new(a, &lens, 20);
    let starts = starts_of(&lens);
    let r1 = run(dev, &p, &starts, 512, None)?;
    let r2 = run(dev, &p, &starts, 512, None)?;
    for (name, x, y) in [
        ("out", bits(&r1.out), bits(&r2.out)),
        ("lse", bits(&r1.lse), bits(&r2.lse)),
        ("dq", bits(&r1.dq), bits(&r2.dq)),
        ("dk", bits(&r1.dk), bits(&r2.dk)),
        ("dv", bits(&r1.dv), bits(&r2.dv)),
    ] {
        if x != y {
            return Err(format!("{name} differs between two identical runs").into());
        }
    }
    Ok(())
}

fn bad_sequences(dev: &Cuda) -> Result<(), Failed> {
    bad_sequences_on(dev)
}

pub(crate) fn bad_sequences_on<B: Backend>(dev: &B) -> Result<(), Failed> {
    let a = Attention::new(4, 2, 32);
    let p = Problem::<f32>::new(a, &[12], 30);
    for (starts, max_len) in [
        (vec![0, 3, 2, 12], 12usize),
        (vec![0, 3, 12], 4),
        (vec![0, 3, 7], 12),
        (vec![-1, 3, 12], 12),
    ] {
        let g = run(dev, &p, &starts, max_len, None)?;
        let w = run(&Cpu, &p, &starts, max_len, None)?;
        if g.fault != fault::INDEX || w.fault != fault::INDEX {
            return Err(format!("{starts:?}: fault {} / {}", g.fault, w.fault).into());
        }
        for (x, y) in g.out.iter().zip(&w.out) {
            let ok = if y.is_nan() {
                x.to_bits() == POISON.to_bits()
            } else {
                ((x - y) as f64).abs() <= fwd_tol::<f32>(&a, 12)
            };
            if !ok {
                return Err(format!("{starts:?}: out {x} vs {y}").into());
            }
        }
        for (x, y) in g.dk.iter().zip(&w.dk) {
            if y.is_nan() != (x.to_bits() == POISON.to_bits()) {
                return Err(format!("{starts:?}: dk {x} vs {y}").into());
            }
        }
    }
    Ok(())
}

fn rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    rejects_bad_input_on(dev)
}

pub(crate) fn rejects_bad_input_on<B: Backend>(dev: &B) -> Result<(), Failed> {
    let a = Attention::new(4, 2, 48);
    let starts = dev.upload(&[0i32, 4]).map_err(e)?;
    let batch = AttentionBatch::<B> {
        seq_starts: &starts,
        n_seqs: 1,
        tokens: 4,
        max_seq_len: 4,
    };
    let x = dev.alloc::<f32>(4 * 4 * 48).map_err(e)?;
    let mut out = dev.alloc::<f32>(4 * 4 * 48).map_err(e)?;
    let mut lse = dev.alloc::<f32>(16).map_err(e)?;
    let mut f = dev.alloc::<u32>(1).map_err(e)?;
    let r = attention_forward(dev, &a, &batch, &x, &x, &x, &mut out, &mut lse, &mut f);
    if !matches!(
        r,
        Err(Error::InvalidArgument {
            arg: "head_dim",
            ..
        })
    ) {
        return Err(format!("head_dim 48: {r:?}").into());
    }
    let a = Attention::new(4, 2, 16);
    let short = dev.alloc::<f32>(10).map_err(e)?;
    let r = attention_forward(dev, &a, &batch, &short, &x, &x, &mut out, &mut lse, &mut f);
    if !matches!(r, Err(Error::InvalidArgument { arg: "q", .. })) {
        return Err(format!("short q: {r:?}").into());
    }
    let z = dev.alloc::<f64>(64).map_err(e)?;
    let mut zo = dev.alloc::<f64>(64).map_err(e)?;
    let r = attention_forward(dev, &a, &batch, &z, &z, &z, &mut zo, &mut lse, &mut f);
    if !matches!(r, Err(Error::UnsupportedDtype { .. })) {
        return Err(format!("f64: {r:?}").into());
    }
    Ok(())
}

fn kv_write(dev: &Cuda) -> Result<(), Failed> {
    kv_write_on(dev)
}

pub(crate) fn kv_write_on<B: Backend>(dev: &B) -> Result<(), Failed> {
    let kv_dim = 1024;
    let cache_rows = 3000;
    let tokens = 777;
    let mut r = rng(40);
    let rows: Vec<bf16> = random_vec(&mut r, tokens * kv_dim);
    let mut slots: Vec<i32> = (0..tokens as i32)
        .map(|t| (t * 7 + 3) % cache_rows as i32)
        .collect();
    slots[5] = -1;
    slots[6] = cache_rows as i32;
    let init: Vec<bf16> = random_vec(&mut r, cache_rows * kv_dim);
    let mut results = Vec::new();
    for on_gpu in [true, false] {
        let (c, f) = if on_gpu {
            let rb = dev.upload(&rows).map_err(e)?;
            let sb = dev.upload(&slots).map_err(e)?;
            let mut cb = dev.upload(&init).map_err(e)?;
            let mut fb = dev.alloc::<u32>(1).map_err(e)?;
            kv_cache_write(dev, kv_dim, tokens, &rb, &sb, &mut cb, &mut fb).map_err(e)?;
            (
                dev.download(&cb).map_err(e)?,
                dev.download(&fb).map_err(e)?[0],
            )
        } else {
            let mut cb = init.clone();
            let mut fb = vec![0u32];
            kv_cache_write(&Cpu, kv_dim, tokens, &rows, &slots, &mut cb, &mut fb).map_err(e)?;
            (cb, fb[0])
        };
        results.push((bits(&c), f));
    }
    if results[0] != results[1] || results[0].1 != fault::INDEX {
        return Err("kv_cache_write: cuda ≠ cpu (or no fault for the bad slots)".into());
    }
    Ok(())
}

struct Decode {
    a: Attention,
    max_kv_len: usize,
    kv_start: Vec<i32>,
    kv_len: Vec<i32>,
}

fn run_decode<B: Backend, T: Float>(
    b: &B,
    d: &Decode,
    q: &[T],
    kc: &[T],
    vc: &[T],
) -> Result<(Vec<T>, u32), Failed> {
    let n = d.kv_start.len();
    let up = |x: &[T]| b.upload(x).map_err(e);
    let (qb, kb, vb) = (up(q)?, up(kc)?, up(vc)?);
    let sb = b.upload(&d.kv_start).map_err(e)?;
    let lb = b.upload(&d.kv_len).map_err(e)?;
    let mut out = up(&vec![T::from_f32(POISON); n * d.a.q_dim()])?;
    let mut ws = b
        .alloc::<u8>(attention_decode_workspace_bytes(b, &d.a, n, d.max_kv_len))
        .map_err(e)?;
    let mut f = b.alloc::<u32>(1).map_err(e)?;
    attention_decode(
        b,
        &d.a,
        n,
        d.max_kv_len,
        &qb,
        &kb,
        &vb,
        &sb,
        &lb,
        &mut out,
        &mut ws,
        &mut f,
    )
    .map_err(e)?;
    Ok((b.download(&out).map_err(e)?, b.download(&f).map_err(e)?[0]))
}

/// 16 sequences over a shared cache (Llama-3-8B heads), lengths 0 … 4096 (up to 16 splits), one
/// bad range (flagged, row untouched).
fn decode_case<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    decode_case_on::<_, T>(dev)
}

pub(crate) fn decode_case_on<B: Backend, T: Float>(dev: &B) -> Result<(), Failed> {
    let a = Attention::new(32, 8, 128);
    let lens: Vec<i32> = vec![
        0, 1, 3, 17, 255, 256, 257, 1000, 4096, 4095, 2048, 77, 513, 31, 3000, 5000,
    ];
    let cache_rows = 6000usize;
    let d = Decode {
        a,
        max_kv_len: 4096,
        kv_start: lens
            .iter()
            .enumerate()
            .map(|(i, &l)| ((i * 97) % (cache_rows - l.min(4096) as usize)) as i32)
            .collect(),
        kv_len: lens.clone(),
    };
    let n = lens.len();
    let mut r = rng(50);
    let q: Vec<T> = random_vec(&mut r, n * a.q_dim());
    let kc: Vec<T> = random_vec(&mut r, cache_rows * a.kv_dim());
    let vc: Vec<T> = random_vec(&mut r, cache_rows * a.kv_dim());
    let (g, fg) = run_decode(dev, &d, &q, &kc, &vc)?;
    let (w, fw) = run_decode(&Cpu, &d, &q, &kc, &vc)?;
    if fg != fault::INDEX || fw != fault::INDEX {
        return Err(format!("fault {fg} / {fw} (5000 > max_kv_len must be flagged)").into());
    }
    let tol = fwd_tol::<T>(&a, 4096);
    for (i, (x, y)) in g.iter().zip(&w).enumerate() {
        let (x, y) = (x.to_f64(), y.to_f64());
        let ok = if y.is_nan() {
            x.is_nan()
        } else {
            (x - y).abs() <= tol
        };
        if !ok {
            return Err(format!("decode element {i}: {x} vs {y} (tol {tol:e})").into());
        }
    }
    Ok(())
}

fn decode_vs_forward(dev: &Cuda) -> Result<(), Failed> {
    decode_vs_forward_on(dev)
}

pub(crate) fn decode_vs_forward_on<B: Backend>(dev: &B) -> Result<(), Failed> {
    let a = Attention::new(32, 8, 128);
    let lens = [1usize, 300, 64, 513];
    let p = Problem::<f32>::new(a, &lens, 60);
    let starts = starts_of(&lens);
    let t = p.tokens();
    let fwd = run(dev, &p, &starts, 513, None)?;
    // K/V into a cache at shifted slots with kv_cache_write, then decode each last token.
    let cache_rows = t + 100;
    let slots: Vec<i32> = (0..t as i32).map(|x| x + 50).collect();
    let kb = dev.upload(&p.k).map_err(e)?;
    let vb = dev.upload(&p.v).map_err(e)?;
    let sb = dev.upload(&slots).map_err(e)?;
    let mut kc = dev.alloc::<f32>(cache_rows * a.kv_dim()).map_err(e)?;
    let mut vc = dev.alloc::<f32>(cache_rows * a.kv_dim()).map_err(e)?;
    let mut f = dev.alloc::<u32>(1).map_err(e)?;
    kv_cache_write(dev, a.kv_dim(), t, &kb, &sb, &mut kc, &mut f).map_err(e)?;
    kv_cache_write(dev, a.kv_dim(), t, &vb, &sb, &mut vc, &mut f).map_err(e)?;
    let qd: Vec<f32> = (0..lens.len())
        .flat_map(|s| {
            let r = starts[s + 1] as usize - 1;
            p.q[r * a.q_dim()..(r + 1) * a.q_dim()].to_vec()
        })
        .collect();
    let d = Decode {
        a,
        max_kv_len: 513,
        kv_start: starts[..lens.len()].iter().map(|&s| s + 50).collect(),
        kv_len: lens.iter().map(|&l| l as i32).collect(),
    };
    let kch = dev.download(&kc).map_err(e)?;
    let vch = dev.download(&vc).map_err(e)?;
    let (out, fl) = run_decode(dev, &d, &qd, &kch, &vch)?;
    if fl != 0 || dev.download(&f).map_err(e)?[0] != 0 {
        return Err("unexpected fault".into());
    }
    let tol = 2.0 * fwd_tol::<f32>(&a, 513);
    for s in 0..lens.len() {
        let r = starts[s + 1] as usize - 1;
        for c in 0..a.q_dim() {
            let (x, y) = (out[s * a.q_dim() + c], fwd.out[r * a.q_dim() + c]);
            if ((x - y) as f64).abs() > tol {
                return Err(format!("seq {s} col {c}: decode {x} vs forward {y}").into());
            }
        }
    }
    Ok(())
}
