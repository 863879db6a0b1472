//! Attention (forward, backward, KV-cache write, decode): the cpu reference checked against finite
//! differences, and the emulator against the cpu reference.

mod common;

use common::*;
use lora_kernels::adapter::fault;
use lora_kernels::attention::{
    attention_backward, attention_backward_workspace_bytes, attention_decode,
    attention_decode_workspace_bytes, attention_forward, kv_cache_write, Attention, AttentionBatch,
};
use lora_kernels::{Backend, Cpu, Float};

/// `seq_starts` of consecutive sequences of the given lengths.
fn starts_of(lens: &[usize]) -> Vec<i32> {
    let mut s = vec![0i32];
    for &l in lens {
        s.push(s.last().unwrap() + l as i32);
    }
    s
}

struct FwdOut<T> {
    out: Vec<T>,
    lse: Vec<f32>,
    fault: u32,
}

#[allow(clippy::too_many_arguments)]
fn run_forward<B: Backend, T: Float>(
    b: &B,
    a: &Attention,
    starts: &[i32],
    tokens: usize,
    max_seq_len: usize,
    q: &[T],
    k: &[T],
    v: &[T],
) -> FwdOut<T> {
    let n_seqs = starts.len() - 1;
    let sb = b.upload(starts).unwrap();
    let batch = AttentionBatch::<B> {
        seq_starts: &sb,
        n_seqs,
        tokens,
        max_seq_len,
    };
    let (qb, kb, vb) = (
        b.upload(q).unwrap(),
        b.upload(k).unwrap(),
        b.upload(v).unwrap(),
    );
    let mut out = b
        .upload(&vec![T::from_f32(POISON); tokens * a.q_dim()])
        .unwrap();
    let mut lse = b.upload(&vec![POISON; tokens * a.n_heads]).unwrap();
    let mut f = b.alloc::<u32>(1).unwrap();
    attention_forward(b, a, &batch, &qb, &kb, &vb, &mut out, &mut lse, &mut f).unwrap();
    FwdOut {
        out: b.download(&out).unwrap(),
        lse: b.download(&lse).unwrap(),
        fault: b.download(&f).unwrap()[0],
    }
}

struct BwdOut<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    fault: u32,
}

#[allow(clippy::too_many_arguments)]
fn run_backward<B: Backend, T: Float>(
    b: &B,
    a: &Attention,
    starts: &[i32],
    tokens: usize,
    max_seq_len: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    fwd: &FwdOut<T>,
    d_out: &[T],
) -> BwdOut<T> {
    let n_seqs = starts.len() - 1;
    let sb = b.upload(starts).unwrap();
    let batch = AttentionBatch::<B> {
        seq_starts: &sb,
        n_seqs,
        tokens,
        max_seq_len,
    };
    let up = |x: &[T]| b.upload(x).unwrap();
    let (qb, kb, vb, ob, dob) = (up(q), up(k), up(v), up(&fwd.out), up(d_out));
    let lb = b.upload(&fwd.lse).unwrap();
    let pq = vec![T::from_f32(POISON); tokens * a.q_dim()];
    let pkv = vec![T::from_f32(POISON); tokens * a.kv_dim()];
    let (mut dq, mut dk, mut dv) = (up(&pq), up(&pkv), up(&pkv));
    let mut ws = b
        .alloc::<u8>(attention_backward_workspace_bytes(b, a, &batch))
        .unwrap();
    let mut f = b.alloc::<u32>(1).unwrap();
    attention_backward(
        b, a, &batch, &qb, &kb, &vb, &ob, &lb, &dob, &mut dq, &mut dk, &mut dv, &mut ws, &mut f,
    )
    .unwrap();
    BwdOut {
        dq: b.download(&dq).unwrap(),
        dk: b.download(&dk).unwrap(),
        dv: b.download(&dv).unwrap(),
        fault: b.download(&f).unwrap()[0],
    }
}

// ---- the cpu reference ------------------------------------------------------------------------

/// The forward's out (f64 on the cpu backend), for the finite-difference check.
fn out_of(
    a: &Attention,
    starts: &[i32],
    tokens: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Vec<f64> {
    run_forward(&Cpu, a, starts, tokens, tokens, q, k, v).out
}

/// Central differences (h = 1e-6) of L = Σ out ∘ dO against the reference backward, every element
/// of q, k and v. f64 throughout, and the difference is taken element-wise, Σ dO ∘ (out₊ − out₋) /
/// 2h, so outputs the perturbation does not reach cancel exactly: truncation error O(h²·L''') ~
/// 1e-12 and rounding ~ 1e-16·|out|/h ~ 1e-10 per reached output, so a relative error of 1e-6 (of
/// max(|analytic|, 1e-2)) leaves a wide margin.
fn fd_check(a: Attention, lens: &[usize], seed: u64) {
    let starts = starts_of(lens);
    let tokens = *starts.last().unwrap() as usize;
    let mut r = rng(seed);
    let mut q: Vec<f64> = random_vec(&mut r, tokens * a.q_dim());
    let mut k: Vec<f64> = random_vec(&mut r, tokens * a.kv_dim());
    let mut v: Vec<f64> = random_vec(&mut r, tokens * a.kv_dim());
    // Larger scores than 1/sqrt(hd) would give, so the softmax is far from uniform.
    q.iter_mut().for_each(|x| *x *= 3.0);
    let w: Vec<f64> = random_vec(&mut r, tokens * a.q_dim());
    let fwd = run_forward(&Cpu, &a, &starts, tokens, tokens, &q, &k, &v);
    let g = run_backward(&Cpu, &a, &starts, tokens, tokens, &q, &k, &v, &fwd, &w);
    assert_eq!(g.fault, 0);
    let h = 1e-6;
    let mut worst = 0.0f64;
    for which in 0..3 {
        let n = [q.len(), k.len(), v.len()][which];
        for e in 0..n {
            let at = |x: &mut Vec<f64>, d: f64| x[e] += d;
            let mut eval = |d: f64| {
                match which {
                    0 => at(&mut q, d),
                    1 => at(&mut k, d),
                    _ => at(&mut v, d),
                }
                let l = out_of(&a, &starts, tokens, &q, &k, &v);
                match which {
                    0 => at(&mut q, -d),
                    1 => at(&mut k, -d),
                    _ => at(&mut v, -d),
                }
                l
            };
            let (op, om) = (eval(h), eval(-h));
            let fd = op
                .iter()
                .zip(&om)
                .zip(&w)
                .map(|((p, m), w)| if p == m { 0.0 } else { w * (p - m) })
                .sum::<f64>()
                / (2.0 * h);
            let an = [&g.dq, &g.dk, &g.dv][which][e];
            let rel = (fd - an).abs() / an.abs().max(1e-2);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-6,
                "{} element {e}: finite difference {fd} vs analytic {an} (rel {rel:e})",
                ["dq", "dk", "dv"][which]
            );
        }
    }
    eprintln!("fd check {a:?} lens {lens:?}: worst relative error {worst:e}");
}

#[test]
fn reference_backward_matches_finite_differences_mha() {
    fd_check(Attention::new(2, 2, 16), &[5, 1, 3], 1);
}

#[test]
fn reference_backward_matches_finite_differences_gqa() {
    // Group of 4 query heads per kv head, an empty sequence in the middle, non-default scale.
    let a = Attention {
        scale: 0.37,
        ..Attention::new(4, 1, 16)
    };
    fd_check(a, &[4, 0, 6], 2);
    fd_check(Attention::new(4, 2, 16), &[7], 3);
}

#[test]
fn reference_forward_lse_normalises_the_softmax() {
    // exp(lse) = Σ_j exp(scale·q·k_j): recompute it independently for every row and head.
    let a = Attention::new(4, 2, 16);
    let lens = [3, 1, 6];
    let starts = starts_of(&lens);
    let tokens = 10;
    let mut r = rng(7);
    let q: Vec<f64> = random_vec(&mut r, tokens * a.q_dim());
    let k: Vec<f64> = random_vec(&mut r, tokens * a.kv_dim());
    let v: Vec<f64> = random_vec(&mut r, tokens * a.kv_dim());
    let o = run_forward(&Cpu, &a, &starts, tokens, 6, &q, &k, &v);
    assert_eq!(o.fault, 0);
    for s in 0..lens.len() {
        for i in starts[s] as usize..starts[s + 1] as usize {
            for h in 0..a.n_heads {
                let kh = h / a.group();
                let mut sum = 0.0;
                for j in starts[s] as usize..=i {
                    let d: f64 = (0..16)
                        .map(|c| q[i * a.q_dim() + h * 16 + c] * k[j * a.kv_dim() + kh * 16 + c])
                        .sum();
                    sum += (a.scale as f64 * d).exp();
                }
                let l = o.lse[i * a.n_heads + h] as f64;
                assert!(
                    (l - sum.ln()).abs() <= 1e-6 * (1.0 + l.abs()),
                    "lse row {i} head {h}"
                );
            }
        }
    }
    // A single-token sequence attends only to itself: out = v of its kv head.
    let i = 3;
    for h in 0..a.n_heads {
        for c in 0..16 {
            assert_eq!(
                o.out[i * a.q_dim() + h * 16 + c],
                v[i * a.kv_dim() + (h / 2) * 16 + c]
            );
        }
    }
}

#[test]
fn reference_invalid_sequences_are_skipped_and_flagged() {
    let a = Attention::new(2, 1, 16);
    let tokens = 8;
    let mut r = rng(9);
    let q: Vec<f64> = random_vec(&mut r, tokens * a.q_dim());
    let k: Vec<f64> = random_vec(&mut r, tokens * a.kv_dim());
    let v: Vec<f64> = random_vec(&mut r, tokens * a.kv_dim());
    // seq 1 = [3, 2) invalid; seq 2 = [2, 8) is then invalid too (the prefix is not monotone).
    let o = run_forward(&Cpu, &a, &[0, 3, 2, 8], tokens, 8, &q, &k, &v);
    assert_eq!(o.fault, fault::INDEX);
    assert!(o.out[..3 * a.q_dim()].iter().all(|x| !x.is_nan()));
    assert!(o.out[3 * a.q_dim()..].iter().all(|x| x.is_nan()));
    // Longer than max_seq_len: skipped.
    let o = run_forward(&Cpu, &a, &[0, 3, 8], tokens, 4, &q, &k, &v);
    assert_eq!(o.fault, fault::INDEX);
    assert!(o.out[..3 * a.q_dim()].iter().all(|x| !x.is_nan()));
    assert!(o.out[3 * a.q_dim()..].iter().all(|x| x.is_nan()));
    // s_n ≠ tokens: the valid sequences are written, the tail untouched, flagged.
    let o = run_forward(&Cpu, &a, &[0, 3, 5], tokens, 8, &q, &k, &v);
    assert_eq!(o.fault, fault::INDEX);
    assert!(o.out[..5 * a.q_dim()].iter().all(|x| !x.is_nan()));
    assert!(o.out[5 * a.q_dim()..].iter().all(|x| x.is_nan()));
    // Past tokens.
    let o = run_forward(&Cpu, &a, &[0, 3, 9], tokens, 9, &q, &k, &v);
    assert_eq!(o.fault, fault::INDEX);
    assert!(o.out[3 * a.q_dim()..].iter().all(|x| x.is_nan()));
}

#[test]
fn reference_decode_equals_forward_last_row() {
    // Decode of each sequence's last token over its K/V written into a cache at scattered slots
    // equals the forward's last row (both f64 references: to ~1e-15).
    let a = Attention::new(4, 2, 32);
    let lens = [5usize, 1, 9];
    let starts = starts_of(&lens);
    let tokens = 15;
    let mut r = rng(11);
    let q: Vec<f64> = random_vec(&mut r, tokens * a.q_dim());
    let k: Vec<f64> = random_vec(&mut r, tokens * a.kv_dim());
    let v: Vec<f64> = random_vec(&mut r, tokens * a.kv_dim());
    let fwd = run_forward(&Cpu, &a, &starts, tokens, 9, &q, &k, &v);
    let cache_rows = 40;
    let base = [30usize, 2, 12];
    let slots: Vec<i32> = (0..lens.len())
        .flat_map(|s| (0..lens[s]).map(move |j| (base[s] + j) as i32))
        .collect();
    let b = Cpu;
    let (kb, vb, sb) = (
        b.upload(&k).unwrap(),
        b.upload(&v).unwrap(),
        b.upload(&slots).unwrap(),
    );
    let mut kc = b.alloc::<f64>(cache_rows * a.kv_dim()).unwrap();
    let mut vc = b.alloc::<f64>(cache_rows * a.kv_dim()).unwrap();
    let mut f = b.alloc::<u32>(1).unwrap();
    kv_cache_write(&b, a.kv_dim(), tokens, &kb, &sb, &mut kc, &mut f).unwrap();
    kv_cache_write(&b, a.kv_dim(), tokens, &vb, &sb, &mut vc, &mut f).unwrap();
    assert_eq!(f[0], 0);
    let qd: Vec<f64> = (0..lens.len())
        .flat_map(|s| {
            let t = starts[s + 1] as usize - 1;
            q[t * a.q_dim()..(t + 1) * a.q_dim()].to_vec()
        })
        .collect();
    let ks: Vec<i32> = base.iter().map(|&x| x as i32).collect();
    let kl: Vec<i32> = lens.iter().map(|&x| x as i32).collect();
    let mut out = b.alloc::<f64>(lens.len() * a.q_dim()).unwrap();
    let mut ws = b
        .alloc::<u8>(attention_decode_workspace_bytes(&b, &a, 3, 9))
        .unwrap();
    attention_decode(
        &b, &a, 3, 9, &qd, &kc, &vc, &ks, &kl, &mut out, &mut ws, &mut f,
    )
    .unwrap();
    assert_eq!(f[0], 0);
    for s in 0..lens.len() {
        let t = starts[s + 1] as usize - 1;
        for c in 0..a.q_dim() {
            let (x, y) = (out[s * a.q_dim() + c], fwd.out[t * a.q_dim() + c]);
            assert!((x - y).abs() <= 1e-14, "seq {s} col {c}: {x} vs {y}");
        }
    }
}
