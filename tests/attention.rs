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

// ---- emulator vs cpu --------------------------------------------------------------------------

use lora_kernels::{bf16, f16, Emu, Error, Schedule};

const U: f64 = 1.0 / (1u64 << 24) as f64; // f32 unit roundoff

/// One test case: heads, sequence lengths (packed in order) and the host bound.
#[derive(Clone, Debug)]
struct Case {
    a: Attention,
    lens: Vec<usize>,
    max_seq_len: usize,
}

impl Case {
    fn new(n_heads: usize, n_kv: usize, hd: usize, lens: &[usize]) -> Self {
        Case {
            a: Attention::new(n_heads, n_kv, hd),
            lens: lens.to_vec(),
            max_seq_len: lens.iter().copied().max().unwrap_or(0),
        }
    }
    fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }
    fn longest(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }
}

struct Inputs<T> {
    starts: Vec<i32>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    d_out: Vec<T>,
}

/// q, k, v, dO uniform in [-1, 1) rounded to T (so every backend sees the same values).
fn inputs<T: Float>(c: &Case, seed: u64) -> Inputs<T> {
    let t = c.tokens();
    let mut r = rng(seed);
    Inputs {
        starts: starts_of(&c.lens),
        q: random_vec(&mut r, t * c.a.q_dim()),
        k: random_vec(&mut r, t * c.a.kv_dim()),
        v: random_vec(&mut r, t * c.a.kv_dim()),
        d_out: random_vec(&mut r, t * c.a.q_dim()),
    }
}

/// One ulp of T in [½, 1) (= ½ ulp at 1): kernel and reference both round a value of magnitude ≤ 1
/// to T, so roundings on either side of a boundary differ by at most this.
fn out_ulp<T: Float>() -> f64 {
    match T::DTYPE {
        lora_kernels::DType::F16 => f64::powi(2.0, -11),
        lora_kernels::DType::BF16 => f64::powi(2.0, -8),
        _ => U,
    }
}

/// Tolerances. Inputs are uniform in [-1, 1] (so |out| ≤ 1) and exactly representable in T; the
/// reference is f64 on the same values, so the error is the kernels' f32 arithmetic plus the
/// rounding of the outputs to T. Worst-case γ_n bounds (|δ(q·k)| ≤ HD·u·Σ|q_d k_d|, …) chained
/// through softmax and the backward's four products are ~10³ above what is observed, and would
/// hide real bugs, so we use Higham's probabilistic model (rounding errors of an n-term f32
/// reduction grow like √n·u) with a safety factor 8:
/// - a score scale·q·k over HD terms: relative error of P ≲ |scale|·HD·u (≤ √HD·u per product
///   times |q·k| ≤ √HD typical), 2 ulp for exp2f;
/// - the sums over ≤ len keys (O and l; per-thread chains + a 4-level butterfly): ≲ √len·u;
/// - out: 8u·(2 + |scale|·HD + √len) + ulp_T([½, 1)); lse: the same absolute, + u·|lse|.
fn fwd_tol<T: Float>(a: &Attention, len: usize) -> (f64, f64) {
    let e = 8.0 * U * (2.0 + (a.scale as f64).abs() * a.head_dim as f64 + (len as f64).sqrt());
    (e + out_ulp::<T>(), e)
}

/// Backward, relative to max |reference| of each gradient (floored at 1): besides the forward's
/// P error, dP = dO·v and D = dO·O are HD-term reductions (≲ HD·u against |dP − D| ≲ √HD·…,
/// counted as HD·u), dq/dk/dv sum ≤ G·len terms (√(G·len)·u), and D uses the stored T-rounded
/// out: ≲ √HD·ulp_T. Tolerance 8u·(4 + |scale|·HD + √(G·len) + HD) + 8·√HD·ulp_T([½, 1)).
fn bwd_tol<T: Float>(a: &Attention, len: usize) -> f64 {
    let hd = a.head_dim as f64;
    let n = (a.group() * len) as f64;
    8.0 * U * (4.0 + (a.scale as f64).abs() * hd + n.sqrt() + hd) + 8.0 * hd.sqrt() * out_ulp::<T>()
}

fn max_abs_diff<T: Float>(got: &[T], want: &[T]) -> f64 {
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

fn check_forward_backward<T: Float>(c: &Case, seed: u64) {
    let x = inputs::<T>(c, seed);
    let t = c.tokens();
    let fe = run_forward(&Emu, &c.a, &x.starts, t, c.max_seq_len, &x.q, &x.k, &x.v);
    let fc = run_forward(&Cpu, &c.a, &x.starts, t, c.max_seq_len, &x.q, &x.k, &x.v);
    assert_eq!((fe.fault, fc.fault), (0, 0), "{c:?}");
    let (to, tl) = fwd_tol::<T>(&c.a, c.longest());
    let eo = max_abs_diff(&fe.out, &fc.out);
    let el = fe
        .lse
        .iter()
        .zip(&fc.lse)
        .map(|(g, w)| {
            let tol = tl + U * (*w as f64).abs();
            assert!(!g.is_nan(), "{c:?}: lse NaN");
            (*g as f64 - *w as f64).abs() / tol
        })
        .fold(0.0, f64::max);
    assert!(eo <= to, "{c:?} {}: out error {eo:e} > {to:e}", T::DTYPE);
    assert!(el <= 1.0, "{c:?}: lse error {el} × tolerance");
    let be = run_backward(
        &Emu,
        &c.a,
        &x.starts,
        t,
        c.max_seq_len,
        &x.q,
        &x.k,
        &x.v,
        &fe,
        &x.d_out,
    );
    let bc = run_backward(
        &Cpu,
        &c.a,
        &x.starts,
        t,
        c.max_seq_len,
        &x.q,
        &x.k,
        &x.v,
        &fc,
        &x.d_out,
    );
    assert_eq!((be.fault, bc.fault), (0, 0));
    let tb = bwd_tol::<T>(&c.a, c.longest());
    let mut worst = 0.0f64;
    for (name, g, w) in [
        ("dq", &be.dq, &bc.dq),
        ("dk", &be.dk, &bc.dk),
        ("dv", &be.dv, &bc.dv),
    ] {
        let scale = w
            .iter()
            .map(|x| x.to_f64().abs())
            .fold(0.0, f64::max)
            .max(1.0);
        let e = max_abs_diff(g, w) / scale;
        worst = worst.max(e / tb);
        assert!(e <= tb, "{c:?} {}: {name} error {e:e} > {tb:e}", T::DTYPE);
    }
    eprintln!(
        "{c:?} {}: out err {:.3e} ({:.3} of tol), bwd {:.3e} ({:.3} of tol) tb {tb:.2e}",
        T::DTYPE,
        eo,
        eo / to,
        worst * tb,
        worst
    );
}

#[test]
fn emu_matches_cpu_f32_odd_sizes() {
    let cases = [
        Case::new(2, 2, 16, &[1]),
        Case::new(4, 2, 16, &[3]),
        Case::new(4, 1, 32, &[17]),
        Case::new(4, 2, 16, &[5, 0, 17, 1, 3]),
        Case::new(2, 2, 32, &[70, 2]),
    ];
    for (i, c) in cases.iter().enumerate() {
        check_forward_backward::<f32>(c, 100 + i as u64);
    }
}

#[test]
fn emu_matches_cpu_f32_head_dim_64_128() {
    // The float4 column path of the P·V / dS·K products (HD ≥ 64) and HD 128's 32-row tiles.
    check_forward_backward::<f32>(&Case::new(2, 1, 64, &[5, 9]), 120);
    check_forward_backward::<f32>(&Case::new(2, 1, 128, &[3, 35]), 121);
    // Several query and key blocks per sequence (64-row query blocks; 64/32-row key blocks).
    check_forward_backward::<f32>(&Case::new(4, 2, 64, &[129, 7]), 122);
    check_forward_backward::<f32>(&Case::new(2, 2, 128, &[70]), 123);
}

#[test]
fn emu_matches_cpu_f16_bf16() {
    check_forward_backward::<f16>(&Case::new(4, 2, 32, &[6, 0, 11]), 130);
    check_forward_backward::<bf16>(&Case::new(4, 2, 16, &[9, 4]), 131);
}

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// Forward + backward on emu: every output's bits.
fn emu_bits(c: &Case, x: &Inputs<f32>) -> Vec<Vec<u64>> {
    let t = c.tokens();
    let f = run_forward(&Emu, &c.a, &x.starts, t, c.max_seq_len, &x.q, &x.k, &x.v);
    let g = run_backward(
        &Emu,
        &c.a,
        &x.starts,
        t,
        c.max_seq_len,
        &x.q,
        &x.k,
        &x.v,
        &f,
        &x.d_out,
    );
    vec![
        bits(&f.out),
        bits(&f.lse),
        bits(&g.dq),
        bits(&g.dk),
        bits(&g.dv),
    ]
}

#[test]
fn emu_deterministic_under_other_schedules() {
    // Same inputs twice → the same bits; and under the reverse and a random thread schedule (every
    // reduction has a fixed order: no atomics, butterflies and loops in fixed order).
    let c = Case::new(4, 2, 16, &[19, 0, 5, 66]);
    let x = inputs::<f32>(&c, 200);
    let base = emu_bits(&c, &x);
    assert_eq!(base, emu_bits(&c, &x));
    for sched in [Schedule::Reverse, Schedule::Random(7)] {
        assert_eq!(
            base,
            Emu::with_schedule(sched, || emu_bits(&c, &x)),
            "{sched:?}"
        );
    }
}

#[test]
fn emu_invalid_sequences_are_skipped_and_flagged() {
    // The same device-side rule as the reference: untouched rows keep their poison bit for bit,
    // written rows agree with the cpu within tolerance, the fault bit is set.
    let a = Attention::new(4, 2, 16);
    let tokens = 12;
    let mut r = rng(300);
    let q: Vec<f32> = random_vec(&mut r, tokens * a.q_dim());
    let k: Vec<f32> = random_vec(&mut r, tokens * a.kv_dim());
    let v: Vec<f32> = random_vec(&mut r, tokens * a.kv_dim());
    let d_out: Vec<f32> = random_vec(&mut r, tokens * a.q_dim());
    let (tol, _) = fwd_tol::<f32>(&a, 12);
    for (starts, max_len) in [
        (vec![0, 3, 2, 12], 12), // non-monotone: seqs 1 and 2 skipped
        (vec![0, 3, 12], 4),     // longer than max_seq_len
        (vec![0, 3, 7], 12),     // s_n < tokens: the tail untouched
        (vec![0, 3, 13], 13),    // past tokens
        (vec![-1, 3, 12], 12),   // negative start: everything skipped
        (vec![1, 3, 12], 12),    // s_0 ≠ 0: flagged, both sequences written
    ] {
        let fe = run_forward(&Emu, &a, &starts, tokens, max_len, &q, &k, &v);
        let fc = run_forward(&Cpu, &a, &starts, tokens, max_len, &q, &k, &v);
        assert_eq!(fe.fault, fault::INDEX, "{starts:?}");
        assert_eq!(fc.fault, fault::INDEX, "{starts:?}");
        for (e, (g, w)) in fe.out.iter().zip(&fc.out).enumerate() {
            if w.is_nan() {
                assert_eq!(g.to_bits(), POISON.to_bits(), "{starts:?} element {e}");
            } else {
                assert!(
                    (g - w).abs() as f64 <= tol,
                    "{starts:?} element {e}: {g} vs {w}"
                );
            }
        }
        for (g, w) in fe.lse.iter().zip(&fc.lse) {
            assert_eq!(g.is_nan(), w.is_nan(), "{starts:?}");
        }
        let be = run_backward(&Emu, &a, &starts, tokens, max_len, &q, &k, &v, &fe, &d_out);
        let bc = run_backward(&Cpu, &a, &starts, tokens, max_len, &q, &k, &v, &fc, &d_out);
        assert_eq!(be.fault, fault::INDEX, "{starts:?}");
        for (g, w) in [(&be.dq, &bc.dq), (&be.dk, &bc.dk), (&be.dv, &bc.dv)] {
            for (x, y) in g.iter().zip(w) {
                if y.is_nan() {
                    assert_eq!(x.to_bits(), POISON.to_bits(), "{starts:?}");
                } else {
                    assert!((x - y).abs() <= 1e-4, "{starts:?}: {x} vs {y}");
                }
            }
        }
    }
}

// ---- KV cache and decode ----------------------------------------------------------------------

#[test]
fn kv_cache_write_emu_equals_cpu_bit_for_bit() {
    // A copy: bit-identical; bad slots (−1, cache_rows) skipped and flagged; other rows untouched.
    let kv_dim = 48;
    let cache_rows = 9;
    let slots = vec![4, -1, 0, 8, 9, 2];
    let tokens = slots.len();
    let mut r = rng(400);
    let rows: Vec<f32> = random_vec(&mut r, tokens * kv_dim);
    let init: Vec<f32> = random_vec(&mut r, cache_rows * kv_dim + 5);
    fn write<B: Backend>(
        b: &B,
        kv_dim: usize,
        rows: &[f32],
        slots: &[i32],
        init: &[f32],
    ) -> (Vec<f32>, u32) {
        let (rb, sb) = (b.upload(rows).unwrap(), b.upload(slots).unwrap());
        let mut cache = b.upload(init).unwrap();
        let mut f = b.alloc::<u32>(1).unwrap();
        kv_cache_write(b, kv_dim, slots.len(), &rb, &sb, &mut cache, &mut f).unwrap();
        (b.download(&cache).unwrap(), b.download(&f).unwrap()[0])
    }
    let emu = write(&Emu, kv_dim, &rows, &slots, &init);
    let cpu = write(&Cpu, kv_dim, &rows, &slots, &init);
    assert_eq!(bits(&emu.0), bits(&cpu.0));
    assert_eq!((emu.1, cpu.1), (fault::INDEX, fault::INDEX));
    for (t, &s) in slots.iter().enumerate() {
        if (0..cache_rows as i32).contains(&s) {
            let s = s as usize;
            assert_eq!(
                &emu.0[s * kv_dim..(s + 1) * kv_dim],
                &rows[t * kv_dim..(t + 1) * kv_dim]
            );
        }
    }
    for row in [1usize, 3, 5, 6, 7] {
        assert_eq!(
            &emu.0[row * kv_dim..(row + 1) * kv_dim],
            &init[row * kv_dim..(row + 1) * kv_dim]
        );
    }
    assert_eq!(&emu.0[cache_rows * kv_dim..], &init[cache_rows * kv_dim..]);
    // f16 and an unaligned kv_dim (the scalar path).
    let rows16: Vec<f16> = random_vec(&mut r, 2 * 3);
    let mut c16 = vec![f16::from_f32(POISON); 4 * 3];
    let mut fb = vec![0u32];
    kv_cache_write(&Emu, 3, 2, &rows16, &vec![3, 1], &mut c16, &mut fb).unwrap();
    assert_eq!(&c16[9..12], &rows16[0..3]);
    assert_eq!(&c16[3..6], &rows16[3..6]);
    assert!(c16[0..3].iter().chain(&c16[6..9]).all(|x| x.is_nan()));
    assert_eq!(fb[0], 0);
}

struct DecodeCase {
    a: Attention,
    max_kv_len: usize,
    cache_rows: usize,
    kv_start: Vec<i32>,
    kv_len: Vec<i32>,
}

/// Runs decode on `b` with out poisoned; returns (out, fault).
fn run_decode<B: Backend, T: Float>(
    b: &B,
    d: &DecodeCase,
    q: &[T],
    kc: &[T],
    vc: &[T],
) -> (Vec<T>, u32) {
    let n = d.kv_start.len();
    let up = |x: &[T]| b.upload(x).unwrap();
    let (qb, kb, vb) = (up(q), up(kc), up(vc));
    let (sb, lb) = (b.upload(&d.kv_start).unwrap(), b.upload(&d.kv_len).unwrap());
    let mut out = up(&vec![T::from_f32(POISON); n * d.a.q_dim()]);
    let mut ws = b
        .alloc::<u8>(attention_decode_workspace_bytes(b, &d.a, n, d.max_kv_len))
        .unwrap();
    let mut f = b.alloc::<u32>(1).unwrap();
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
    .unwrap();
    (b.download(&out).unwrap(), b.download(&f).unwrap()[0])
}

fn check_decode<T: Float>(d: &DecodeCase, seed: u64) -> Vec<T> {
    let n = d.kv_start.len();
    let mut r = rng(seed);
    let q: Vec<T> = random_vec(&mut r, n * d.a.q_dim());
    let kc: Vec<T> = random_vec(&mut r, d.cache_rows * d.a.kv_dim());
    let vc: Vec<T> = random_vec(&mut r, d.cache_rows * d.a.kv_dim());
    let (oe, fe) = run_decode(&Emu, d, &q, &kc, &vc);
    let (oc, fc) = run_decode(&Cpu, d, &q, &kc, &vc);
    assert_eq!(fe, fc);
    let longest = d.kv_len.iter().copied().max().unwrap_or(0).max(0) as usize;
    let (tol, _) = fwd_tol::<T>(&d.a, longest);
    for (e, (g, w)) in oe.iter().zip(&oc).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        if w.is_nan() {
            assert!(
                g.is_nan(),
                "element {e}: {g} written but the sequence is invalid"
            );
        } else {
            assert!(
                (g - w).abs() <= tol,
                "element {e}: {g} vs {w} (tol {tol:e})"
            );
        }
    }
    oe
}

#[test]
fn decode_emu_matches_cpu() {
    // Lengths 0 (zeros), 1, 3, 17 and 300 (two 256-key splits + the combine), GQA 1, 2, 4 and a
    // group of 12 (two head slices of ≤ 8), head dims 16, 32 and 64.
    for (a, seed) in [
        (Attention::new(2, 2, 16), 500),
        (Attention::new(4, 2, 32), 501),
        (Attention::new(8, 2, 16), 502),
        (Attention::new(12, 1, 16), 503),
        (Attention::new(2, 1, 64), 504),
    ] {
        let d = DecodeCase {
            a,
            max_kv_len: 300,
            cache_rows: 340,
            kv_start: vec![5, 0, 30, 339, 12, 40],
            kv_len: vec![0, 300, 17, 1, 3, 258],
        };
        let out = check_decode::<f32>(&d, seed);
        // kv_len 0 → zeros.
        assert!(out[..a.q_dim()].iter().all(|&x| x == 0.0));
    }
    let d = DecodeCase {
        a: Attention::new(4, 2, 32),
        max_kv_len: 20,
        cache_rows: 25,
        kv_start: vec![3, 0],
        kv_len: vec![20, 7],
    };
    check_decode::<f16>(&d, 510);
    check_decode::<bf16>(&d, 511);
}

#[test]
fn decode_bad_ranges_skipped_and_flagged() {
    let d = DecodeCase {
        a: Attention::new(4, 2, 16),
        max_kv_len: 10,
        cache_rows: 20,
        kv_start: vec![-1, 15, 2, 3, 0, 0],
        kv_len: vec![2, 6, 11, -1, 4, 0],
    };
    let out = check_decode::<f32>(&d, 520);
    let qd = d.a.q_dim();
    for s in 0..4 {
        assert!(out[s * qd..(s + 1) * qd]
            .iter()
            .all(|x| x.to_bits() == POISON.to_bits()));
    }
    assert!(out[4 * qd..5 * qd].iter().all(|x| !x.is_nan()));
    assert!(out[5 * qd..].iter().all(|&x| x == 0.0));
    let n = d.kv_start.len();
    let (_, f) = run_decode(
        &Emu,
        &d,
        &vec![0.5f32; n * qd],
        &vec![0.5f32; 20 * d.a.kv_dim()],
        &vec![0.5f32; 20 * d.a.kv_dim()],
    );
    assert_eq!(f, fault::INDEX);
}

#[test]
fn decode_is_batch_invariant_and_deterministic() {
    // A sequence's bits do not depend on max_kv_len (one split written directly vs the combine over
    // partials) nor on the other sequences, nor on the emulator's thread schedule.
    let a = Attention::new(4, 1, 32);
    let mut r = rng(530);
    let rows = 600;
    let q: Vec<f32> = random_vec(&mut r, 2 * a.q_dim());
    let kc: Vec<f32> = random_vec(&mut r, rows * a.kv_dim());
    let vc: Vec<f32> = random_vec(&mut r, rows * a.kv_dim());
    let small = DecodeCase {
        a,
        max_kv_len: 200,
        cache_rows: rows,
        kv_start: vec![7],
        kv_len: vec![200],
    };
    let big = DecodeCase {
        a,
        max_kv_len: 580,
        cache_rows: rows,
        kv_start: vec![7, 10],
        kv_len: vec![200, 580],
    };
    let (o1, _) = run_decode(&Emu, &small, &q[..a.q_dim()], &kc, &vc);
    let (o2, _) = run_decode(&Emu, &big, &q, &kc, &vc);
    assert_eq!(bits(&o1), bits(&o2[..a.q_dim()]));
    // And under other thread schedules (fixed-order reductions only).
    for sched in [Schedule::Reverse, Schedule::Random(11)] {
        let (o3, _) = Emu::with_schedule(sched, || run_decode(&Emu, &big, &q, &kc, &vc));
        assert_eq!(bits(&o2), bits(&o3), "{sched:?}");
    }
}

#[test]
fn emu_decode_of_last_token_equals_forward_last_row() {
    // K/V written into the cache by kv_cache_write (scattered slots), then decode of each
    // sequence's last token over its cached keys = the forward's last row (same math, different
    // reduction order: within the forward tolerance).
    let a = Attention::new(4, 2, 32);
    let lens = [1usize, 17, 3];
    let starts = starts_of(&lens);
    let tokens: usize = lens.iter().sum();
    let mut r = rng(540);
    let q: Vec<f32> = random_vec(&mut r, tokens * a.q_dim());
    let k: Vec<f32> = random_vec(&mut r, tokens * a.kv_dim());
    let v: Vec<f32> = random_vec(&mut r, tokens * a.kv_dim());
    let fwd = run_forward(&Emu, &a, &starts, tokens, 17, &q, &k, &v);
    let base = [40usize, 3, 25];
    let slots: Vec<i32> = (0..lens.len())
        .flat_map(|s| (0..lens[s]).map(move |j| (base[s] + j) as i32))
        .collect();
    let cache_rows = 48;
    let mut kc = vec![POISON; cache_rows * a.kv_dim()];
    let mut vc = vec![POISON; cache_rows * a.kv_dim()];
    let mut f = vec![0u32];
    kv_cache_write(&Emu, a.kv_dim(), tokens, &k, &slots, &mut kc, &mut f).unwrap();
    kv_cache_write(&Emu, a.kv_dim(), tokens, &v, &slots, &mut vc, &mut f).unwrap();
    assert_eq!(f[0], 0);
    let qd: Vec<f32> = (0..lens.len())
        .flat_map(|s| {
            let t = starts[s + 1] as usize - 1;
            q[t * a.q_dim()..(t + 1) * a.q_dim()].to_vec()
        })
        .collect();
    let d = DecodeCase {
        a,
        max_kv_len: 17,
        cache_rows,
        kv_start: base.iter().map(|&x| x as i32).collect(),
        kv_len: lens.iter().map(|&x| x as i32).collect(),
    };
    let (out, fl) = run_decode(&Emu, &d, &qd, &kc, &vc);
    assert_eq!(fl, 0);
    let (tol, _) = fwd_tol::<f32>(&a, 17);
    for s in 0..lens.len() {
        let t = starts[s + 1] as usize - 1;
        for c in 0..a.q_dim() {
            let (x, y) = (out[s * a.q_dim() + c], fwd.out[t * a.q_dim() + c]);
            assert!(
                ((x - y).abs() as f64) <= 2.0 * tol,
                "seq {s} col {c}: {x} vs {y}"
            );
        }
    }
}

// ---- bad inputs -------------------------------------------------------------------------------

fn arg_of(r: lora_kernels::Result<()>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        Err(Error::UnsupportedDtype { .. }) => "dtype",
        other => panic!("expected a typed error, got {other:?}"),
    }
}

/// Forward/backward buffers on emu, with every length overridable.
struct FwdBufs {
    starts: Vec<i32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    d_out: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    ws: Vec<u8>,
    fault: Vec<u32>,
}

fn fwd_bufs(a: &Attention, tokens: usize) -> FwdBufs {
    let (nq, nkv) = (tokens * a.q_dim(), tokens * a.kv_dim());
    FwdBufs {
        starts: vec![0, tokens as i32],
        q: vec![0.5; nq],
        k: vec![0.5; nkv],
        v: vec![0.5; nkv],
        out: vec![POISON; nq],
        lse: vec![POISON; tokens * a.n_heads],
        d_out: vec![0.5; nq],
        dq: vec![POISON; nq],
        dk: vec![POISON; nkv],
        dv: vec![POISON; nkv],
        ws: vec![0; 1 << 16],
        fault: vec![0],
    }
}

fn fwd_with(
    a: &Attention,
    tokens: usize,
    n_seqs: usize,
    x: &mut FwdBufs,
) -> lora_kernels::Result<()> {
    let batch = AttentionBatch::<Emu> {
        seq_starts: &x.starts,
        n_seqs,
        tokens,
        max_seq_len: tokens,
    };
    attention_forward(
        &Emu,
        a,
        &batch,
        &x.q,
        &x.k,
        &x.v,
        &mut x.out,
        &mut x.lse,
        &mut x.fault,
    )
}

fn bwd_with(
    a: &Attention,
    tokens: usize,
    n_seqs: usize,
    x: &mut FwdBufs,
) -> lora_kernels::Result<()> {
    let batch = AttentionBatch::<Emu> {
        seq_starts: &x.starts,
        n_seqs,
        tokens,
        max_seq_len: tokens,
    };
    attention_backward(
        &Emu,
        a,
        &batch,
        &x.q,
        &x.k,
        &x.v,
        &x.out,
        &x.lse,
        &x.d_out,
        &mut x.dq,
        &mut x.dk,
        &mut x.dv,
        &mut x.ws,
        &mut x.fault,
    )
}

#[test]
fn forward_and_backward_reject_bad_input() {
    let a = Attention::new(4, 2, 16);
    let t = 5;
    let untouched = |x: &FwdBufs| {
        x.out
            .iter()
            .chain(&x.lse)
            .chain(&x.dq)
            .chain(&x.dk)
            .chain(&x.dv)
            .all(|v| v.to_bits() == POISON.to_bits())
            && x.fault[0] == 0
    };
    // Head configuration.
    for (bad, arg) in [
        (Attention::new(4, 2, 48), "head_dim"),
        (Attention::new(4, 2, 8), "head_dim"),
        (Attention::new(4, 0, 16), "n_kv_heads"),
        (Attention::new(3, 2, 16), "n_heads"),
        (Attention::new(0, 2, 16), "n_heads"),
        (Attention::new(65536, 1, 16), "n_heads"),
        (
            Attention {
                scale: f32::NAN,
                ..a
            },
            "scale",
        ),
        (
            Attention {
                scale: f32::INFINITY,
                ..a
            },
            "scale",
        ),
    ] {
        let mut x = fwd_bufs(&a, t);
        assert_eq!(arg_of(fwd_with(&bad, t, 1, &mut x)), arg, "{bad:?}");
        assert_eq!(arg_of(bwd_with(&bad, t, 1, &mut x)), arg, "{bad:?}");
        assert!(untouched(&x));
    }
    // Sizes and buffer lengths, one at a time.
    type Edit = fn(&mut FwdBufs);
    let fwd_edits: [(&str, Edit); 7] = [
        ("seq_starts", |x| x.starts.truncate(1)),
        ("q", |x| x.q.truncate(x.q.len() - 1)),
        ("k", |x| x.k.truncate(x.k.len() - 1)),
        ("v", |x| x.v.truncate(x.v.len() - 1)),
        ("out", |x| x.out.truncate(x.out.len() - 1)),
        ("lse", |x| x.lse.truncate(x.lse.len() - 1)),
        ("fault", |x| x.fault.clear()),
    ];
    for (arg, edit) in fwd_edits {
        let mut x = fwd_bufs(&a, t);
        edit(&mut x);
        assert_eq!(arg_of(fwd_with(&a, t, 1, &mut x)), arg);
        assert_eq!(arg_of(bwd_with(&a, t, 1, &mut x)), arg);
        assert!(x.out.iter().all(|v| v.to_bits() == POISON.to_bits()));
    }
    let bwd_edits: [(&str, Edit); 5] = [
        ("d_out", |x| x.d_out.truncate(x.d_out.len() - 1)),
        ("dq", |x| x.dq.truncate(x.dq.len() - 1)),
        ("dk", |x| x.dk.truncate(x.dk.len() - 1)),
        ("dv", |x| x.dv.truncate(x.dv.len() - 1)),
        ("workspace", |x| x.ws.truncate(3)),
    ];
    for (arg, edit) in bwd_edits {
        let mut x = fwd_bufs(&a, t);
        edit(&mut x);
        assert_eq!(arg_of(bwd_with(&a, t, 1, &mut x)), arg);
        assert!(untouched(&x));
    }
    let mut x = fwd_bufs(&a, t);
    assert_eq!(arg_of(fwd_with(&a, 1 << 31, 1, &mut x)), "tokens");
    assert_eq!(arg_of(bwd_with(&a, 1 << 31, 1, &mut x)), "tokens");
    assert_eq!(arg_of(fwd_with(&a, t, i32::MAX as usize, &mut x)), "n_seqs");
    assert!(untouched(&x));
    // f64 has no kernel.
    let starts = vec![0i32, 1];
    let batch = AttentionBatch::<Emu> {
        seq_starts: &starts,
        n_seqs: 1,
        tokens: 1,
        max_seq_len: 1,
    };
    let z = vec![0.0f64; 64];
    let (mut o, mut l, mut f) = (vec![0.0f64; 64], vec![0.0f32; 4], vec![0u32]);
    let r = attention_forward(&Emu, &a, &batch, &z, &z, &z, &mut o, &mut l, &mut f);
    assert!(matches!(r, Err(Error::UnsupportedDtype { arg: "q", .. })));
    // Zero-size work: Ok without touching anything.
    let mut x = fwd_bufs(&a, t);
    fwd_with(&a, t, 0, &mut x).unwrap();
    bwd_with(&a, t, 0, &mut x).unwrap();
    assert!(untouched(&x));
}

#[test]
fn kv_cache_write_rejects_bad_input() {
    let rows = vec![1.0f32; 12];
    let slots = vec![0i32, 1];
    let mut cache = vec![POISON; 24];
    let mut f = vec![0u32];
    let mut run =
        |kv_dim: usize, tokens: usize, rows: &Vec<f32>, slots: &Vec<i32>, f: &mut Vec<u32>| {
            kv_cache_write(&Emu, kv_dim, tokens, rows, slots, &mut cache, f)
        };
    assert_eq!(arg_of(run(0, 2, &rows, &slots, &mut f)), "kv_dim");
    assert_eq!(arg_of(run(1 << 31, 2, &rows, &slots, &mut f)), "kv_dim");
    assert_eq!(arg_of(run(6, 1 << 31, &rows, &slots, &mut f)), "tokens");
    assert_eq!(arg_of(run(7, 2, &rows, &slots, &mut f)), "rows");
    assert_eq!(arg_of(run(6, 2, &rows, &vec![0], &mut f)), "slots");
    assert_eq!(arg_of(run(6, 2, &rows, &slots, &mut vec![])), "fault");
    let r64 = vec![0.0f64; 12];
    let mut c64 = vec![0.0f64; 24];
    let r = kv_cache_write(&Emu, 6, 2, &r64, &slots, &mut c64, &mut f);
    assert!(matches!(
        r,
        Err(Error::UnsupportedDtype { arg: "rows", .. })
    ));
    assert!(cache.iter().all(|v| v.to_bits() == POISON.to_bits()));
    assert_eq!(f[0], 0);
}

#[test]
fn decode_rejects_bad_input() {
    let a = Attention::new(4, 2, 16);
    let n = 2;
    struct D {
        q: Vec<f32>,
        kc: Vec<f32>,
        vc: Vec<f32>,
        ks: Vec<i32>,
        kl: Vec<i32>,
        out: Vec<f32>,
        ws: Vec<u8>,
        f: Vec<u32>,
    }
    let make = || D {
        q: vec![0.5; n * a.q_dim()],
        kc: vec![0.5; 600 * a.kv_dim()],
        vc: vec![0.5; 600 * a.kv_dim()],
        ks: vec![0, 1],
        kl: vec![300, 2],
        out: vec![POISON; n * a.q_dim()],
        ws: vec![0; attention_decode_workspace_bytes(&Emu, &a, n, 300)],
        f: vec![0],
    };
    let run = |a: &Attention, n: usize, max: usize, d: &mut D| {
        attention_decode(
            &Emu, a, n, max, &d.q, &d.kc, &d.vc, &d.ks, &d.kl, &mut d.out, &mut d.ws, &mut d.f,
        )
    };
    assert!(attention_decode_workspace_bytes(&Emu, &a, n, 300) > 0);
    assert_eq!(attention_decode_workspace_bytes(&Emu, &a, n, 256), 0);
    assert_eq!(attention_decode_workspace_bytes(&Cpu, &a, n, 300), 0);
    type Edit = fn(&mut D);
    let edits: [(&str, Edit); 7] = [
        ("q", |d| d.q.truncate(d.q.len() - 1)),
        ("v_cache", |d| d.vc.truncate(d.vc.len() - 1)),
        ("kv_start", |d| d.ks.truncate(1)),
        ("kv_len", |d| d.kl.truncate(1)),
        ("out", |d| d.out.truncate(d.out.len() - 1)),
        ("workspace", |d| d.ws.truncate(d.ws.len() - 1)),
        ("fault", |d| d.f.clear()),
    ];
    for (arg, edit) in edits {
        let mut d = make();
        edit(&mut d);
        assert_eq!(arg_of(run(&a, n, 300, &mut d)), arg);
        assert!(d.out.iter().all(|v| v.to_bits() == POISON.to_bits()));
    }
    let mut d = make();
    assert_eq!(arg_of(run(&a, 1 << 31, 300, &mut d)), "n_seqs");
    assert_eq!(arg_of(run(&a, n, 1 << 31, &mut d)), "max_kv_len");
    assert_eq!(
        arg_of(run(&Attention::new(4, 2, 24), n, 300, &mut d)),
        "head_dim"
    );
    assert_eq!(
        arg_of(run(&Attention::new(4, 3, 16), n, 300, &mut d)),
        "n_heads"
    );
    assert!(d.out.iter().all(|v| v.to_bits() == POISON.to_bits()));
    run(&a, 0, 300, &mut d).unwrap();
    assert!(d.out.iter().all(|v| v.to_bits() == POISON.to_bits()));
    assert_eq!(d.f[0], 0);
}

// ---- property tests ---------------------------------------------------------------------------

use proptest::prelude::*;

proptest! {
    #![proptest_config(proptest_config(24))]

    /// Random packed batches (0–3 sequences of 0–20 tokens, empty ones included), GQA 1/2/4,
    /// head dim 16/32: emu forward and backward vs the cpu reference.
    #[test]
    fn emu_matches_cpu_random_batches(
        lens in proptest::collection::vec(0usize..21, 1..4),
        kv in 1usize..3,
        group_log in 0u32..3,
        hd_big in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let c = Case::new(kv << group_log, kv, if hd_big { 32 } else { 16 }, &lens);
        prop_assume!(c.tokens() > 0);
        check_forward_backward::<f32>(&c, seed);
    }
}
