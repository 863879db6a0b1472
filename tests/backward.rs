//! LoRA backward (dense and multi-adapter SGMV) on the emulator and the cpu reference.
//!
//! Every stage is checked against an f64 computation made here from the same rounded inputs, each
//! stage from the backend's own stored f32 du (so a stage's tolerance covers only its own sum):
//! - du = s·G·B: `dot_tolerance(n_s, 256 chains, 10 levels)` of |s|·Σ|G·B|, + one rounding;
//! - dB = s·Gᵀu and dA = duᵀx: f32 accumulation over the T tokens (chains per piece, pieces summed in
//!   order: ≤ T + 3 rounding steps) of Σ|terms|, plus one rounding of the result (accumulate mode adds
//!   the old value: the final fmaf rounds once);
//! - dx += du·A: f32 chains over the rank per slice, slices added, then one rounding to dx's dtype
//!   (unit roundoff u_TD·|result|, plus 2⁻²⁴ absolute for f16 subnormals).
//!
//! Untouched data is compared bit for bit: padding columns, du/dx rows of tokens without an adapter,
//! gradients of adapters that got no tokens (both modes), gradients not wanted (frozen adapters).
//! The cpu reference itself is checked against central finite differences of a tiny loss in f64.

#![allow(
    clippy::too_many_arguments,
    clippy::needless_range_loop,
    clippy::type_complexity
)]

mod common;

use common::*;
use lora_kernels::adapter::{fault, AdapterTableBuilder, LoraWeights, Slice};
use lora_kernels::backward::{
    backward_dense, backward_dense_workspace_bytes, BackwardDense, BackwardSgmv, DenseGrads,
    DenseInputs, Dropout, GradMode, GradTableBuilder, SgmvInputs, SgmvOutputs,
};
use lora_kernels::sgmv::SgmvPlan;
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, Float, Schedule};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::Rng;

/// `|got − exact| ≤ tol` with a readable failure.
fn assert_close(got: f64, exact: f64, tol: f64, what: impl FnOnce() -> String) {
    assert!(
        (got - exact).abs() <= tol,
        "{}: got {got}, exact {exact}, |diff| {:e} > tol {tol:e}",
        what(),
        (got - exact).abs()
    );
}

/// Tolerance of a reduction over the tokens giving `exact_total` (incl. the old value when
/// accumulating).
fn reduce_tol(tokens: usize, abs_sum: f64, exact_total: f64) -> f64 {
    dot_tolerance(tokens, 1, 3, abs_sum) + f64::powi(2.0, -24) * exact_total.abs()
}

// ------------------------------------------------------------------------------------------------
// Dense.

struct DenseRun {
    da: Vec<f32>,
    db: Vec<f32>,
    du: Vec<f32>,
    dx: Vec<u64>,
}

/// Runs the dense backward on `b` with random inputs and checks every output; returns them.
fn check_dense<B: Backend, TX: Float, TG: Float, TW: Float, TD: Float>(
    b: &B,
    s: BackwardDense,
    with_dx: bool,
    seed: u64,
) -> DenseRun {
    let mut r = rng(seed);
    let (t, r_, di, dout) = (s.tokens, s.rank, s.d_in, s.d_out);
    let x: Vec<TX> = random_vec(&mut r, t * s.ld_x);
    let g: Vec<TG> = random_vec(&mut r, t * s.ld_g);
    let u: Vec<f32> = random_vec(&mut r, t * s.ld_u);
    let a: Vec<TW> = random_vec(&mut r, r_ * s.lda);
    let bw: Vec<TW> = random_vec(&mut r, dout * s.ldb);
    let acc = s.mode == GradMode::Accumulate;
    // Gradients: random old values when accumulating, poison when overwriting; padding poisoned.
    let init = |r: &mut rand::rngs::StdRng, rows: usize, cols: usize, ld: usize| -> Vec<f32> {
        let mut v = vec![POISON; rows * ld];
        if acc {
            for i in 0..rows {
                for j in 0..cols {
                    v[i * ld + j] = r.random_range(-1.0..1.0);
                }
            }
        }
        v
    };
    let da0 = init(&mut r, r_, di, s.ld_da);
    let db0 = init(&mut r, dout, r_, s.ld_db);
    let dx0: Vec<TD> = random_vec(&mut r, t * s.ld_dx);
    let (xb, gb, ub, ab, bb) = (
        b.upload(&x).unwrap(),
        b.upload(&g).unwrap(),
        b.upload(&u).unwrap(),
        b.upload(&a).unwrap(),
        b.upload(&bw).unwrap(),
    );
    let mut dab = b.upload(&da0).unwrap();
    let mut dbb = b.upload(&db0).unwrap();
    let mut dub = b.upload(&vec![POISON; t * s.ld_du]).unwrap();
    let mut dxb = b.upload(&dx0).unwrap();
    let mut ws = b
        .alloc::<u8>(backward_dense_workspace_bytes(b, &s))
        .unwrap();
    backward_dense(
        b,
        &s,
        DenseInputs {
            x: &xb,
            g: &gb,
            u: &ub,
            a: &ab,
            b: &bb,
        },
        DenseGrads {
            da: &mut dab,
            db: &mut dbb,
            du: &mut dub,
            dx: if with_dx { Some(&mut dxb) } else { None },
        },
        &mut ws,
    )
    .unwrap();
    let (da, db, du) = (
        b.download(&dab).unwrap(),
        b.download(&dbb).unwrap(),
        b.download(&dub).unwrap(),
    );
    let dx = b.download(&dxb).unwrap();
    let ctx = || {
        format!(
            "{} {}/{}/{}/{} {s:?}",
            b.name(),
            TX::DTYPE,
            TG::DTYPE,
            TW::DTYPE,
            TD::DTYPE
        )
    };
    let sc = s.scale as f64;
    let f = |v: f32| v as f64;
    // The forward's dropout, regenerated from (seed, offset, element) as the kernels must.
    let drop = s.dropout.config(0).unwrap();
    let xhat =
        |ti: usize, k: usize| drop.xhat(x[ti * s.ld_x + k], drop.keeps((ti * di + k) as u64));
    let kept = |ti: usize, k: usize| drop.keeps((ti * di + k) as u64);
    // du
    for ti in 0..t {
        for j in 0..s.ld_du {
            let got = du[ti * s.ld_du + j];
            if j >= r_ {
                assert_eq!(
                    got.to_bits(),
                    POISON.to_bits(),
                    "du padding [{ti},{j}] written ({})",
                    ctx()
                );
                continue;
            }
            let (mut e, mut m) = (0.0, 0.0);
            for o in 0..dout {
                let p = g[ti * s.ld_g + o].to_f64() * bw[o * s.ldb + j].to_f64();
                e += p;
                m += p.abs();
            }
            let tol =
                dot_tolerance(dout, 256, 10, sc.abs() * m) + f64::powi(2.0, -24) * (sc * e).abs();
            assert_close(f(got), sc * e, tol, || format!("du[{ti},{j}] ({})", ctx()));
        }
    }
    // dB and dA (overwrite with zero tokens: zeros)
    let check_grad = |name: &str,
                      got: &[f32],
                      old: &[f32],
                      rows: usize,
                      cols: usize,
                      ld: usize,
                      term: &dyn Fn(usize, usize, usize) -> f64,
                      alpha: f64| {
        for i in 0..rows {
            for j in 0..ld {
                let gv = got[i * ld + j];
                if j >= cols {
                    assert_eq!(
                        gv.to_bits(),
                        POISON.to_bits(),
                        "{name} padding [{i},{j}] written ({})",
                        ctx()
                    );
                    continue;
                }
                let (mut e, mut m) = (0.0, 0.0);
                for ti in 0..t {
                    let p = term(i, j, ti);
                    e += p;
                    m += p.abs();
                }
                let base = if acc { old[i * ld + j] as f64 } else { 0.0 };
                let exact = base + alpha * e;
                let tol = reduce_tol(t, alpha.abs() * m, exact);
                assert_close(f(gv), exact, tol, || format!("{name}[{i},{j}] ({})", ctx()));
            }
        }
    };
    check_grad(
        "dB",
        &db,
        &db0,
        dout,
        r_,
        s.ld_db,
        &|o, j, ti| g[ti * s.ld_g + o].to_f64() * u[ti * s.ld_u + j] as f64,
        sc,
    );
    check_grad(
        "dA",
        &da,
        &da0,
        r_,
        di,
        s.ld_da,
        &|j, k, ti| du[ti * s.ld_du + j] as f64 * xhat(ti, k),
        1.0,
    );
    // dx
    let eps = unit_roundoff(TD::DTYPE);
    for ti in 0..t {
        for k in 0..s.ld_dx {
            let (got, old) = (dx[ti * s.ld_dx + k], dx0[ti * s.ld_dx + k]);
            if !with_dx || k >= di || r_ == 0 {
                assert_eq!(
                    got.to_f64().to_bits(),
                    old.to_f64().to_bits(),
                    "dx[{ti},{k}] changed ({})",
                    ctx()
                );
                continue;
            }
            let (mut e, mut m) = (0.0, 0.0);
            for j in 0..r_ {
                let p = du[ti * s.ld_du + j] as f64 * a[j * s.lda + k].to_f64();
                e += p;
                m += p.abs();
            }
            // dx += m ⊙ (du·A) · keep_scale
            let ks = if kept(ti, k) {
                drop.keep_scale as f64
            } else {
                0.0
            };
            let (e, m) = (e * ks, m * ks);
            let exact = old.to_f64() + e;
            let tol = dot_tolerance(r_, 1, 2, m) + eps * exact.abs() + f64::powi(2.0, -24);
            assert_close(got.to_f64(), exact, tol, || {
                format!("dx[{ti},{k}] ({})", ctx())
            });
        }
    }
    DenseRun {
        da,
        db,
        du,
        dx: dx.iter().map(|v| v.to_f64().to_bits()).collect(),
    }
}

fn dense_shapes() -> impl Strategy<Value = (BackwardDense, bool)> {
    let dims = prop_oneof![
        Just(1usize),
        Just(2),
        Just(3),
        Just(15),
        Just(17),
        Just(127),
        1usize..200
    ];
    // Mostly small token counts (the emulator runs a block per token); some above one piece (256).
    let tokens = prop_oneof![
        6 => prop_oneof![Just(1usize), Just(2), Just(3), Just(17), 1usize..40],
        1 => 257usize..560,
    ];
    (
        tokens,
        dims.clone(),
        dims,
        prop_oneof![Just(1usize), Just(3), Just(16), Just(17), 1usize..40],
        (0usize..2, 0usize..2, 0usize..2, 0usize..2),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0.5f32), Just(-2.0), Just(1.0)],
        (
            prop_oneof![2 => Just(0.0f64), 1 => Just(0.1), 1 => Just(0.5), 1 => Just(1.0)],
            any::<u64>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(t, di, dout, r, (p1, p2, p3, p4), acc, with_dx, scale, (p, seed, offset))| {
                let mut s = BackwardDense::new(t, di, dout, r, scale);
                let mut offsets = [0u64; 8];
                offsets[0] = offset;
                s.dropout = Dropout { p, seed, offsets };
                s.ld_x += p1;
                s.ld_g += p2;
                s.ld_u += p3;
                s.lda += p4;
                s.ldb += p1;
                s.ld_da += p2;
                s.ld_db += p3;
                s.ld_du += p4;
                s.ld_dx += p1;
                s.mode = if acc {
                    GradMode::Accumulate
                } else {
                    GradMode::Overwrite
                };
                (s, with_dx)
            },
        )
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn dense_emu_f32((s, dx) in dense_shapes(), seed in any::<u64>()) {
        check_dense::<_, f32, f32, f32, f32>(&Emu, s, dx, seed);
    }

    #[test]
    fn dense_emu_f16((s, dx) in dense_shapes(), seed in any::<u64>()) {
        check_dense::<_, f16, f16, f16, f16>(&Emu, s, dx, seed);
    }

    #[test]
    fn dense_emu_bf16((s, dx) in dense_shapes(), seed in any::<u64>()) {
        check_dense::<_, bf16, bf16, bf16, bf16>(&Emu, s, dx, seed);
    }

    #[test]
    fn dense_emu_mixed_f32_activations((s, dx) in dense_shapes(), seed in any::<u64>()) {
        check_dense::<_, f32, bf16, bf16, f32>(&Emu, s, dx, seed);
        check_dense::<_, f16, f32, f16, f32>(&Emu, s, dx, seed ^ 1);
    }

    #[test]
    fn dense_cpu_reference((s, dx) in dense_shapes(), seed in any::<u64>()) {
        check_dense::<_, f32, f16, f16, f16>(&Cpu, s, dx, seed);
        check_dense::<_, f64, f64, f64, f64>(&Cpu, s, dx, seed ^ 1);
    }
}

#[test]
fn dense_zero_tokens_and_zero_rank() {
    for b_mode in [GradMode::Overwrite, GradMode::Accumulate] {
        let mut s = BackwardDense::new(0, 5, 3, 2, 0.5);
        s.mode = b_mode;
        let emu = check_dense::<_, f32, f32, f32, f32>(&Emu, s, true, 1);
        let cpu = check_dense::<_, f32, f32, f32, f32>(&Cpu, s, true, 1);
        assert_eq!(bits(&emu.da), bits(&cpu.da));
        let mut s = BackwardDense::new(3, 5, 3, 0, 0.5);
        s.mode = b_mode;
        check_dense::<_, f16, f16, f16, f16>(&Emu, s, true, 2);
    }
}

/// Llama-sized slice: d_in 4096, d_out 1024, rank 16, bf16, a batch of tokens (scaled).
#[test]
fn dense_emu_large() {
    let mut s = BackwardDense::new(scaled(64, 16), 4096, 1024, 16, 2.0);
    s.mode = GradMode::Accumulate;
    check_dense::<_, bf16, bf16, bf16, bf16>(&Emu, s, true, 42);
}

// ------------------------------------------------------------------------------------------------
// Finite differences (cpu, f64).

/// L(x, A, B) = Σ_{t,o} c[t,o] · s · Σ_j (Σ_k x[t,k] A[j,k]) B[o,j], evaluated in f64.
fn loss(
    x: &[f64],
    a: &[f64],
    bw: &[f64],
    c: &[f64],
    t: usize,
    di: usize,
    dout: usize,
    r: usize,
    s: f64,
) -> f64 {
    let mut l = 0.0;
    for ti in 0..t {
        let u: Vec<f64> = (0..r)
            .map(|j| (0..di).map(|k| x[ti * di + k] * a[j * di + k]).sum())
            .collect();
        for o in 0..dout {
            let y: f64 = (0..r).map(|j| u[j] * bw[o * r + j]).sum();
            l += c[ti * dout + o] * s * y;
        }
    }
    l
}

#[test]
fn cpu_gradients_match_central_finite_differences() {
    let (t, di, dout, r, s) = (3, 5, 4, 2, 0.75);
    let mut rg = rng(9);
    let x: Vec<f64> = random_vec(&mut rg, t * di);
    let a: Vec<f64> = random_vec(&mut rg, r * di);
    let bw: Vec<f64> = random_vec(&mut rg, dout * r);
    let c: Vec<f64> = random_vec(&mut rg, t * dout); // G = dL/dout = c
    let u: Vec<f32> = (0..t * r)
        .map(|i| {
            let (ti, j) = (i / r, i % r);
            (0..di).map(|k| x[ti * di + k] * a[j * di + k]).sum::<f64>() as f32
        })
        .collect();
    let shape = BackwardDense::new(t, di, dout, r, s as f32);
    let (mut da, mut db, mut du) = (vec![0f32; r * di], vec![0f32; dout * r], vec![0f32; t * r]);
    let mut dx = vec![0f64; t * di];
    backward_dense(
        &Cpu,
        &shape,
        DenseInputs {
            x: &x,
            g: &c,
            u: &u,
            a: &a,
            b: &bw,
        },
        DenseGrads {
            da: &mut da,
            db: &mut db,
            du: &mut du,
            dx: Some(&mut dx),
        },
        &mut vec![],
    )
    .unwrap();
    let h = 1e-3; // L is linear in each of x, A, B: central differences are exact up to roundoff
    let l = |x: &[f64], a: &[f64], b: &[f64]| loss(x, a, b, &c, t, di, dout, r, s);
    let fd = |v: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
        let (mut p, mut m) = (v.to_vec(), v.to_vec());
        p[i] += h;
        m[i] -= h;
        (f(&p) - f(&m)) / (2.0 * h)
    };
    // Gradients are f32 (u and du stored in f32): relative 1e-6 of the magnitude.
    let tol = |g: f64| 1e-6 * (1.0 + g.abs());
    for i in 0..a.len() {
        let num = fd(&a, i, &|v| l(&x, v, &bw));
        assert_close(da[i] as f64, num, tol(num), || format!("dA[{i}]"));
    }
    for i in 0..bw.len() {
        let num = fd(&bw, i, &|v| l(&x, &a, v));
        assert_close(db[i] as f64, num, tol(num), || format!("dB[{i}]"));
    }
    for i in 0..x.len() {
        let num = fd(&x, i, &|v| l(v, &a, &bw));
        assert_close(dx[i], num, tol(num), || format!("dx[{i}]"));
    }
}

// ------------------------------------------------------------------------------------------------
// Several adapters over SGMV segments.

/// One multi-adapter configuration: `ranks[adapter][slice]`, segments `(len, adapter)` over a
/// (shuffled) row order, which adapters are frozen (no gradient buffers).
#[derive(Clone, Debug)]
struct Multi {
    tokens: usize,
    d_in: usize,
    widths: Vec<usize>,
    ranks: Vec<Vec<usize>>,
    segments: Vec<(usize, i32)>,
    frozen: Vec<usize>,
    shuffle: bool,
    mode: GradMode,
    seed: u64,
    dropout: Dropout,
}

struct MultiResult {
    grads: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    du: Vec<f32>,
    dx: Vec<f64>,
    err: u32,
}

#[allow(clippy::type_complexity)]
fn run_multi<B: Backend, TX: Float, TG: Float, TW: Float, TD: Float>(
    b: &B,
    m: &Multi,
    plan_override: Option<(Vec<i32>, Vec<i32>, i32)>,
    check: bool,
) -> MultiResult {
    let mut r = rng(m.seed);
    let (t, di, ns) = (m.tokens, m.d_in, m.widths.len());
    let na = m.ranks.len();
    let mut slices = Vec::new();
    let mut off = 0;
    for &w in &m.widths {
        slices.push(Slice { n: w, offset: off });
        off += w;
    }
    let ld_g = off + 1;
    let (ld_x, ld_dx) = (di + 2, di + 1);
    let r_cap = m.ranks.iter().flatten().copied().max().unwrap();
    // Plan.
    let mut rows: Vec<i32> = (0..t as i32).collect();
    if m.shuffle {
        rows.shuffle(&mut r);
    }
    let mut starts = vec![0i32];
    let mut eff = vec![-1i32; t];
    let mut pos = 0;
    for &(len, a) in &m.segments {
        for p in pos..pos + len {
            eff[rows[p] as usize] = a;
        }
        pos += len;
        starts.push(pos as i32);
    }
    let mut seg_adapter: Vec<i32> = m.segments.iter().map(|s| s.1).collect();
    let mut n_seg = m.segments.len() as i32;
    starts.push(i32::MIN); // spare capacity holds garbage
    seg_adapter.push(i32::MAX);
    if let Some((st, sa, n)) = plan_override {
        starts = st;
        seg_adapter = sa;
        n_seg = n;
    }
    let plan = SgmvPlan::from_host(
        b,
        m.shuffle.then_some(&rows[..]),
        &starts,
        &seg_adapter,
        n_seg,
        t,
    )
    .unwrap();
    // Weights (own allocations) and the table.
    let mut host_w = Vec::new();
    for a in 0..na {
        let mut per = Vec::new();
        for s in 0..ns {
            let rank = m.ranks[a][s];
            let aw: Vec<TW> = random_vec(&mut r, rank * (di + 1));
            let bw: Vec<TW> = random_vec(&mut r, m.widths[s] * (rank + 1));
            per.push((aw, bw));
        }
        host_w.push(per);
    }
    let dev_w: Vec<Vec<_>> = host_w
        .iter()
        .map(|per| {
            per.iter()
                .map(|(a, bw)| (b.upload(a).unwrap(), b.upload(bw).unwrap()))
                .collect()
        })
        .collect();
    let mut builder = AdapterTableBuilder::new(na, di, &slices, TW::DTYPE).unwrap();
    let scale = |a: usize, s: usize| 0.5 + a as f32 * 0.25 - s as f32;
    for a in 0..na {
        for s in 0..ns {
            let rank = m.ranks[a][s];
            let w = LoraWeights {
                rank,
                scale: scale(a, s),
                lda: di + 1,
                ldb: rank + 1,
            };
            builder
                .set(b, a, s, &dev_w[a][s].0, &dev_w[a][s].1, w)
                .unwrap();
        }
    }
    let table = builder.build(b).unwrap();
    // Gradients.
    let acc = m.mode == GradMode::Accumulate;
    let init = |r: &mut rand::rngs::StdRng, rows: usize, cols: usize, ld: usize| -> Vec<f32> {
        let mut v = vec![POISON; rows * ld];
        if acc {
            for i in 0..rows {
                for j in 0..cols {
                    v[i * ld + j] = r.random_range(-1.0..1.0);
                }
            }
        }
        v
    };
    let mut grads0 = Vec::new();
    for a in 0..na {
        let mut per = Vec::new();
        for s in 0..ns {
            let rank = m.ranks[a][s];
            per.push((
                init(&mut r, rank, di, di + 1),
                init(&mut r, m.widths[s], rank, rank + 2),
            ));
        }
        grads0.push(per);
    }
    let mut dev_g: Vec<Vec<_>> = grads0
        .iter()
        .map(|per| {
            per.iter()
                .map(|(da, db)| (b.upload(da).unwrap(), b.upload(db).unwrap()))
                .collect()
        })
        .collect();
    let x: Vec<TX> = random_vec(&mut r, t * ld_x);
    let g: Vec<TG> = random_vec(&mut r, t * ld_g);
    let u: Vec<f32> = random_vec(&mut r, ns * t * r_cap);
    let dx0: Vec<TD> = random_vec(&mut r, t * ld_dx);
    let (xb, gb, ub) = (
        b.upload(&x).unwrap(),
        b.upload(&g).unwrap(),
        b.upload(&u).unwrap(),
    );
    let mut dub = b.upload(&vec![POISON; ns * t * r_cap]).unwrap();
    let mut dxb = b.upload(&dx0).unwrap();
    let mut errb = b.alloc::<u32>(1).unwrap();
    {
        let mut gt = GradTableBuilder::new(&table);
        for (a, per) in dev_g.iter_mut().enumerate() {
            if m.frozen.contains(&a) {
                continue;
            }
            for (s, (da, db)) in per.iter_mut().enumerate() {
                let rank = m.ranks[a][s];
                gt.set(b, a, s, Some(da), di + 1, Some(db), rank + 2)
                    .unwrap();
            }
        }
        let grads = gt.build(b).unwrap();
        let bw = BackwardSgmv::new(&table, &grads, &plan).unwrap();
        let mut ws = b.alloc::<u8>(bw.workspace_bytes(b)).unwrap();
        bw.run(
            b,
            SgmvInputs {
                x: &xb,
                ld_x,
                g: &gb,
                ld_g,
                u: &ub,
            },
            SgmvOutputs {
                du: &mut dub,
                dx: Some(&mut dxb),
                ld_dx,
            },
            m.mode,
            &m.dropout,
            &mut ws,
            Some(&mut errb),
        )
        .unwrap();
    }
    let grads: Vec<Vec<(Vec<f32>, Vec<f32>)>> = dev_g
        .iter()
        .map(|per| {
            per.iter()
                .map(|(da, db)| (b.download(da).unwrap(), b.download(db).unwrap()))
                .collect()
        })
        .collect();
    let du = b.download(&dub).unwrap();
    let dx = b.download(&dxb).unwrap();
    let err = b.download(&errb).unwrap()[0];
    if check {
        let ctx = || {
            format!(
                "{} {}/{}/{}/{} {m:?}",
                b.name(),
                TX::DTYPE,
                TG::DTYPE,
                TW::DTYPE,
                TD::DTYPE
            )
        };
        assert_eq!(err, 0, "error word ({})", ctx());
        let tokens_of = |a: i32| -> Vec<usize> { (0..t).filter(|&ti| eff[ti] == a).collect() };
        let eps = unit_roundoff(TD::DTYPE);
        for ti in 0..t {
            let a = eff[ti];
            let mut touched = false;
            for s in 0..ns {
                let rank = if a >= 0 { m.ranks[a as usize][s] } else { 0 };
                for j in 0..r_cap {
                    let got = du[(s * t + ti) * r_cap + j];
                    if j >= rank {
                        assert_eq!(
                            got.to_bits(),
                            POISON.to_bits(),
                            "du[{s},{ti},{j}] written ({})",
                            ctx()
                        );
                        continue;
                    }
                    let (aw, bw) = &host_w[a as usize][s];
                    let sc = scale(a as usize, s) as f64;
                    let (mut e, mut mm) = (0.0, 0.0);
                    for o in 0..m.widths[s] {
                        let p = g[ti * ld_g + slices[s].offset + o].to_f64()
                            * bw[o * (rank + 1) + j].to_f64();
                        e += p;
                        mm += p.abs();
                    }
                    let tol = dot_tolerance(m.widths[s], 256, 10, sc.abs() * mm)
                        + f64::powi(2.0, -24) * (sc * e).abs();
                    assert_close(got as f64, sc * e, tol, || {
                        format!("du[{s},{ti},{j}] ({})", ctx())
                    });
                    let _ = aw;
                }
                if rank > 0 {
                    touched = true;
                }
            }
            for k in 0..ld_dx {
                let (got, old) = (dx[ti * ld_dx + k].to_f64(), dx0[ti * ld_dx + k].to_f64());
                if !touched || k >= di {
                    assert_eq!(
                        got.to_bits(),
                        old.to_bits(),
                        "dx[{ti},{k}] changed ({})",
                        ctx()
                    );
                    continue;
                }
                let mut dx_e = (0.0f64, 0.0f64);
                let mut n = 0;
                for s in 0..ns {
                    let rank = m.ranks[a as usize][s];
                    let aw = &host_w[a as usize][s].0;
                    // dx += m_s ⊙ (du_s·A_s) · keep_scale, each slice with its own mask.
                    let dc = m.dropout.config(s).unwrap();
                    let ks = if dc.keeps((ti * di + k) as u64) {
                        dc.keep_scale as f64
                    } else {
                        0.0
                    };
                    for j in 0..rank {
                        let p = du[(s * t + ti) * r_cap + j] as f64
                            * aw[j * (di + 1) + k].to_f64()
                            * ks;
                        dx_e.0 += p;
                        dx_e.1 += p.abs();
                    }
                    n += rank;
                }
                let exact = old + dx_e.0;
                let tol =
                    dot_tolerance(n, 1, ns + 1, dx_e.1) + eps * exact.abs() + f64::powi(2.0, -24);
                assert_close(got, exact, tol, || format!("dx[{ti},{k}] ({})", ctx()));
            }
        }
        for a in 0..na {
            let toks = tokens_of(a as i32);
            for s in 0..ns {
                let rank = m.ranks[a][s];
                let (da, db) = &grads[a][s];
                let (da0, db0) = &grads0[a][s];
                if toks.is_empty() || m.frozen.contains(&a) || rank == 0 {
                    assert_eq!(
                        bits(da),
                        bits(da0),
                        "dA of adapter {a} slice {s} touched ({})",
                        ctx()
                    );
                    assert_eq!(
                        bits(db),
                        bits(db0),
                        "dB of adapter {a} slice {s} touched ({})",
                        ctx()
                    );
                    continue;
                }
                let sc = scale(a, s) as f64;
                let (ld_da, ld_db) = (di + 1, rank + 2);
                for o in 0..m.widths[s] {
                    for j in 0..ld_db {
                        let got = db[o * ld_db + j];
                        if j >= rank {
                            assert_eq!(got.to_bits(), POISON.to_bits(), "dB padding ({})", ctx());
                            continue;
                        }
                        let (mut e, mut mm) = (0.0, 0.0);
                        for &ti in &toks {
                            let p = g[ti * ld_g + slices[s].offset + o].to_f64()
                                * u[(s * t + ti) * r_cap + j] as f64;
                            e += p;
                            mm += p.abs();
                        }
                        let exact = if acc { db0[o * ld_db + j] as f64 } else { 0.0 } + sc * e;
                        assert_close(
                            got as f64,
                            exact,
                            reduce_tol(toks.len(), sc.abs() * mm, exact),
                            || format!("dB[{a},{s}][{o},{j}] ({})", ctx()),
                        );
                    }
                }
                for j in 0..rank {
                    for k in 0..ld_da {
                        let got = da[j * ld_da + k];
                        if k >= di {
                            assert_eq!(got.to_bits(), POISON.to_bits(), "dA padding ({})", ctx());
                            continue;
                        }
                        let (mut e, mut mm) = (0.0, 0.0);
                        for &ti in &toks {
                            let dc = m.dropout.config(s).unwrap();
                            let xh = dc.xhat(x[ti * ld_x + k], dc.keeps((ti * di + k) as u64));
                            let p = du[(s * t + ti) * r_cap + j] as f64 * xh;
                            e += p;
                            mm += p.abs();
                        }
                        let exact = if acc { da0[j * ld_da + k] as f64 } else { 0.0 } + e;
                        assert_close(got as f64, exact, reduce_tol(toks.len(), mm, exact), || {
                            format!("dA[{a},{s}][{j},{k}] ({})", ctx())
                        });
                    }
                }
            }
        }
    }
    MultiResult {
        grads,
        du,
        dx: dx.iter().map(|v| v.to_f64()).collect(),
        err,
    }
}

/// Adapters: 0 and 1 train, 2 is frozen (no gradient buffers), 3 gets no tokens, 4 only an empty
/// segment; a −1 segment, an uncovered tail, mixed ranks including 0 and 17 (two rank groups).
fn multi_config(tokens: usize, long: usize, mode: GradMode, seed: u64) -> Multi {
    // long: how many segments exceed one piece (256 positions).
    let (l0, l1, l2) = match long {
        0 => (5, 3, 7),
        1 => (260, 9, 20),
        _ => (260, 9, 258),
    };
    let lm1 = 4;
    assert!(tokens >= l0 + l1 + l2 + lm1);
    Multi {
        tokens,
        d_in: 19,
        widths: vec![5, 3],
        ranks: vec![vec![3, 2], vec![17, 0], vec![1, 4], vec![2, 2], vec![5, 1]],
        segments: vec![(l0, 0), (0, 4), (lm1, -1), (l1, 1), (0, 3), (l2, 2)],
        frozen: vec![2],
        shuffle: true,
        mode,
        seed,
        dropout: Dropout::NONE,
    }
}

#[test]
fn multi_adapter_segments_emu_and_cpu() {
    for (i, mode) in [GradMode::Accumulate, GradMode::Overwrite]
        .into_iter()
        .enumerate()
    {
        let m = multi_config(23, 0, mode, 11 + i as u64);
        run_multi::<_, f32, f32, f32, f32>(&Emu, &m, None, true);
        run_multi::<_, f16, f16, f16, f16>(&Emu, &m, None, true);
        run_multi::<_, bf16, f32, bf16, bf16>(&Emu, &m, None, true);
        run_multi::<_, f32, bf16, bf16, f32>(&Cpu, &m, None, true);
    }
}

/// Dropout regenerated in the backward: each slice with its own Philox stream, p in (0, 1].
#[test]
fn multi_adapter_dropout_per_slice_streams() {
    for (i, p) in [0.1, 0.5, 1.0].into_iter().enumerate() {
        let mut m = multi_config(23, 0, GradMode::Accumulate, 40 + i as u64);
        let mut offsets = [0u64; 8];
        offsets[0] = 7;
        offsets[1] = 1 << 40;
        m.dropout = Dropout {
            p,
            seed: 0xfeed_0000 + i as u64,
            offsets,
        };
        run_multi::<_, f32, f32, f32, f32>(&Emu, &m, None, true);
        run_multi::<_, bf16, f32, bf16, bf16>(&Emu, &m, None, true);
        run_multi::<_, f16, f16, f16, f32>(&Cpu, &m, None, true);
    }
}

/// Segments longer than one piece (256 positions): partial slots and the ordered second pass.
#[test]
fn multi_adapter_long_segments() {
    let m = multi_config(540, 2, GradMode::Accumulate, 5);
    run_multi::<_, bf16, bf16, bf16, f32>(&Emu, &m, None, true);
    run_multi::<_, f32, f32, f32, f32>(&Cpu, &m, None, true);
}

/// Two runs, and runs under reverse and random thread schedules, are bit-identical.
#[test]
fn deterministic_across_runs_and_schedules() {
    let m = multi_config(300, 1, GradMode::Accumulate, 6);
    let base = run_multi::<_, f16, f16, f16, f16>(&Emu, &m, None, false);
    let same = |o: &MultiResult| {
        assert_eq!(bits(&o.du), bits(&base.du));
        assert_eq!(
            o.dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            base.dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        for (ga, gb) in o.grads.iter().flatten().zip(base.grads.iter().flatten()) {
            assert_eq!(bits(&ga.0), bits(&gb.0));
            assert_eq!(bits(&ga.1), bits(&gb.1));
        }
    };
    same(&run_multi::<_, f16, f16, f16, f16>(&Emu, &m, None, false));
    for sched in [Schedule::Reverse, Schedule::Random(3)] {
        same(&Emu::with_schedule(sched, || {
            run_multi::<_, f16, f16, f16, f16>(&Emu, &m, None, false)
        }));
    }
    let mut s = BackwardDense::new(300, 33, 21, 17, 0.5);
    s.mode = GradMode::Accumulate;
    let d0 = check_dense::<_, bf16, bf16, bf16, bf16>(&Emu, s, true, 8);
    let d1 = Emu::with_schedule(Schedule::Random(9), || {
        check_dense::<_, bf16, bf16, bf16, bf16>(&Emu, s, true, 8)
    });
    assert_eq!(bits(&d0.da), bits(&d1.da));
    assert_eq!(bits(&d0.db), bits(&d1.db));
    assert_eq!(bits(&d0.du), bits(&d1.du));
    assert_eq!(d0.dx, d1.dx);
}

/// Invalid metadata (SGMV's rules, and an adapter in two non-empty segments): nothing is written,
/// the error word says why.
#[test]
fn invalid_metadata_writes_nothing() {
    let m = multi_config(23, 0, GradMode::Accumulate, 21);
    let clean = |b: &dyn Fn(&Multi, Option<(Vec<i32>, Vec<i32>, i32)>) -> MultiResult| {
        let bad_plans = [
            // n_segments above capacity
            (
                vec![0, 5, 5, 9, 12, 12, 19, 0],
                vec![0, 4, -1, 1, 3, 2, 0],
                8,
                fault::SEGMENTS,
            ),
            // decreasing starts
            (
                vec![0, 5, 4, 9, 12, 12, 19],
                vec![0, 4, -1, 1, 3, 2],
                6,
                fault::SEGMENTS,
            ),
            // adapter out of range
            (
                vec![0, 5, 5, 9, 12, 12, 19],
                vec![0, 4, -1, 1, 3, 7],
                6,
                fault::SEGMENTS,
            ),
            // adapter 0 in two non-empty segments
            (
                vec![0, 5, 5, 9, 12, 12, 19],
                vec![0, 4, -1, 1, 3, 0],
                6,
                fault::SEGMENTS,
            ),
        ];
        for (st, sa, n, f) in bad_plans {
            let r = b(&m, Some((st, sa, n)));
            assert_eq!(r.err, f);
            assert!(
                r.du.iter().all(|v| v.to_bits() == POISON.to_bits()),
                "du written"
            );
        }
    };
    let reference = run_multi::<_, f32, f32, f32, f32>(
        &Emu,
        &Multi {
            tokens: 23,
            ..m.clone()
        },
        Some((vec![0, 0], vec![-1], 1)),
        false,
    );
    assert_eq!(reference.err, 0);
    clean(&|m, p| {
        let r = run_multi::<_, f32, f32, f32, f32>(&Emu, m, p, false);
        assert_eq!(
            r.dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            reference.dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "dx written"
        );
        for (ga, gb) in r
            .grads
            .iter()
            .flatten()
            .zip(reference.grads.iter().flatten())
        {
            assert_eq!(bits(&ga.0), bits(&gb.0), "dA written");
            assert_eq!(bits(&ga.1), bits(&gb.1), "dB written");
        }
        r
    });
    clean(&|m, p| run_multi::<_, f32, f32, f32, f32>(&Cpu, m, p, false));
    // A row_index entry out of range.
    let b = &Emu;
    let plan = SgmvPlan::from_host(b, Some(&[0, 1, 9]), &[0, 3], &[0], 1, 3).unwrap();
    let slices = [Slice { n: 2, offset: 0 }];
    let (a, bw) = (vec![1.0f32; 4], vec![1.0f32; 2]);
    let mut builder = AdapterTableBuilder::new(1, 4, &slices, DType::F32).unwrap();
    builder
        .set(b, 0, 0, &a, &bw, LoraWeights::packed(1, 1.0, 4))
        .unwrap();
    let table = builder.build(b).unwrap();
    let mut da = vec![POISON; 4];
    let mut gt = GradTableBuilder::new(&table);
    gt.set(b, 0, 0, Some(&mut da), 4, None, 1).unwrap();
    let grads = gt.build(b).unwrap();
    let bwd = BackwardSgmv::new(&table, &grads, &plan).unwrap();
    let mut ws = vec![0u8; bwd.workspace_bytes(b)];
    let mut du = vec![POISON; 3];
    let mut err = vec![0u32];
    bwd.run(
        b,
        SgmvInputs {
            x: &vec![1.0f32; 12],
            ld_x: 4,
            g: &vec![1.0f32; 6],
            ld_g: 2,
            u: &vec![1.0f32; 3],
        },
        SgmvOutputs::<Emu, f32> {
            du: &mut du,
            dx: None,
            ld_dx: 4,
        },
        GradMode::Overwrite,
        &Dropout::NONE,
        &mut ws,
        Some(&mut err),
    )
    .unwrap();
    assert_eq!(err[0], fault::ROW_INDEX);
    assert!(du.iter().all(|v| v.to_bits() == POISON.to_bits()));
    drop(grads);
    assert!(da.iter().all(|v| v.to_bits() == POISON.to_bits()));
}

/// An invalid table entry (rank above r_cap) is skipped in its slice and flagged; the other slice
/// of the same adapter is computed.
fn invalid_table_entry_case<B: Backend>(b: &B) {
    let slices = [Slice { n: 2, offset: 0 }, Slice { n: 3, offset: 2 }];
    let (a, bw) = (
        b.upload(&[0.5f32; 8]).unwrap(),
        b.upload(&[0.25f32; 6]).unwrap(),
    );
    let mut builder = AdapterTableBuilder::new(1, 4, &slices, DType::F32).unwrap();
    builder
        .set(b, 0, 0, &a, &bw, LoraWeights::packed(2, 1.0, 4))
        .unwrap();
    let entry = lora_kernels::ffi::sys::LkAdapterEntry {
        a: b.raw_ptr(&a),
        b: b.raw_ptr(&bw),
        lda: 4,
        ldb: 5,
        rank: 5,
        scale: 1.0,
    };
    // SAFETY: rank 5 > r_cap 2 makes the entry invalid: kernels must not dereference it.
    unsafe {
        builder.set_raw(0, 1, entry);
    }
    let table = builder.build(b).unwrap();
    let plan = SgmvPlan::from_host(b, None, &[0, 3], &[0], 1, 3).unwrap();
    let mut da = b.upload(&[POISON; 8]).unwrap();
    let mut gt = GradTableBuilder::new(&table);
    gt.set(b, 0, 0, Some(&mut da), 4, None, 2).unwrap();
    let grads = gt.build(b).unwrap();
    let bwd = BackwardSgmv::new(&table, &grads, &plan).unwrap();
    let mut ws = b.alloc::<u8>(bwd.workspace_bytes(b)).unwrap();
    let mut du = b.upload(&[POISON; 2 * 3 * 2]).unwrap();
    let mut err = b.alloc::<u32>(1).unwrap();
    let (x, g, u) = (
        b.upload(&[1.0f32; 12]).unwrap(),
        b.upload(&[1.0f32; 15]).unwrap(),
        b.upload(&[1.0f32; 12]).unwrap(),
    );
    bwd.run(
        b,
        SgmvInputs {
            x: &x,
            ld_x: 4,
            g: &g,
            ld_g: 5,
            u: &u,
        },
        SgmvOutputs::<B, f32> {
            du: &mut du,
            dx: None,
            ld_dx: 4,
        },
        GradMode::Overwrite,
        &Dropout::NONE,
        &mut ws,
        Some(&mut err),
    )
    .unwrap();
    assert_eq!(b.download(&err).unwrap()[0], fault::TABLE_ENTRY);
    let du = b.download(&du).unwrap();
    assert!(du[..6].iter().all(|&v| v == 0.5), "slice 0 du: {du:?}"); // 1.0 · (2 · 0.25)
    assert!(
        du[6..].iter().all(|v| v.to_bits() == POISON.to_bits()),
        "slice 1 du written"
    );
    drop(grads);
    let da = b.download(&da).unwrap();
    assert!(da.iter().all(|&v| v == 1.5), "dA: {da:?}"); // Σ over 3 tokens of 0.5 · 1
}

#[test]
fn invalid_table_entry_is_skipped_and_flagged() {
    invalid_table_entry_case(&Emu);
    invalid_table_entry_case(&Cpu);
}

// ------------------------------------------------------------------------------------------------
// Bad inputs.

fn arg_of(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } | Error::UnsupportedDtype { arg, .. } => arg,
        other => panic!("expected a typed argument error, got {other:?}"),
    }
}

/// Runs a dense backward on Emu with f32 everything and lets `tweak` break one thing; returns the
/// error's argument name, after checking that nothing was written.
fn dense_error(tweak: impl FnOnce(&mut BackwardDense, &mut [usize; 9])) -> &'static str {
    let mut s = BackwardDense::new(300, 4, 3, 2, 1.0);
    let mut lens = [
        300 * 4,
        300 * 3,
        300 * 2,
        2 * 4,
        3 * 2,
        2 * 4,
        3 * 2,
        300 * 2,
        300 * 4,
    ];
    tweak(&mut s, &mut lens);
    let b = &Emu;
    let (x, g, u, a, bw) = (
        vec![1.0f32; lens[0]],
        vec![1.0f32; lens[1]],
        vec![1.0f32; lens[2]],
        vec![1.0f32; lens[3]],
        vec![1.0f32; lens[4]],
    );
    let (mut da, mut db, mut du, mut dx) = (
        vec![POISON; lens[5]],
        vec![POISON; lens[6]],
        vec![POISON; lens[7]],
        vec![POISON; lens[8]],
    );
    let ws_len = backward_dense_workspace_bytes(b, &BackwardDense::new(300, 4, 3, 2, 1.0));
    let mut ws = vec![0u8; if lens[0] == 0 { 0 } else { ws_len }];
    let e = backward_dense(
        b,
        &s,
        DenseInputs {
            x: &x,
            g: &g,
            u: &u,
            a: &a,
            b: &bw,
        },
        DenseGrads {
            da: &mut da,
            db: &mut db,
            du: &mut du,
            dx: Some(&mut dx),
        },
        &mut ws,
    )
    .unwrap_err();
    for v in [&da, &db, &du, &dx] {
        assert!(
            v.iter().all(|f| f.to_bits() == POISON.to_bits()),
            "written on error"
        );
    }
    arg_of(e)
}

#[test]
fn dense_bad_inputs_are_typed_errors() {
    assert_eq!(dense_error(|s, _| s.ld_x = 3), "ld_x");
    assert_eq!(dense_error(|s, _| s.ld_g = 2), "ld_g");
    assert_eq!(dense_error(|s, _| s.ld_u = 1), "ld_u");
    assert_eq!(dense_error(|s, _| s.lda = 1), "lda");
    assert_eq!(dense_error(|s, _| s.ldb = 1), "ldb");
    assert_eq!(dense_error(|s, _| s.ld_da = 1), "ld_da");
    assert_eq!(dense_error(|s, _| s.ld_db = 1), "ld_db");
    assert_eq!(dense_error(|s, _| s.ld_du = 1), "ld_du");
    assert_eq!(dense_error(|s, _| s.ld_dx = 1), "ld_dx");
    assert_eq!(dense_error(|s, _| s.scale = f32::NAN), "scale");
    assert_eq!(dense_error(|s, _| s.dropout.p = 1.5), "dropout.p");
    assert_eq!(dense_error(|s, _| s.dropout.p = f64::NAN), "dropout.p");
    assert_eq!(
        dense_error(|s, _| s.tokens = i32::MAX as usize + 1),
        "tokens"
    );
    assert_eq!(dense_error(|s, _| s.rank = i32::MAX as usize + 1), "rank");
    for (i, name) in ["x", "g", "u", "a", "b", "da", "db", "du", "dx"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(dense_error(|_, l| l[i] -= 1), name);
    }
    assert_eq!(dense_error(|_, l| l[0] = 0), "x"); // also an empty workspace
}

#[test]
fn dense_workspace_and_dtypes_are_checked() {
    let b = &Emu;
    let s = BackwardDense::new(300, 4, 3, 2, 1.0);
    assert!(backward_dense_workspace_bytes(b, &s) > 0);
    assert_eq!(backward_dense_workspace_bytes(&Cpu, &s), 0);
    let x = vec![1.0f32; 1200];
    let (g, u, a, bw) = (
        vec![1.0f32; 900],
        vec![1.0f32; 600],
        vec![f16::ONE; 8],
        vec![f16::ONE; 6],
    );
    let (mut da, mut db, mut du) = (vec![0f32; 8], vec![0f32; 6], vec![0f32; 600]);
    let e = backward_dense(
        b,
        &s,
        DenseInputs {
            x: &x,
            g: &g,
            u: &u,
            a: &a,
            b: &bw,
        },
        DenseGrads::<Emu, f32> {
            da: &mut da,
            db: &mut db,
            du: &mut du,
            dx: None,
        },
        &mut vec![0u8; 3],
    )
    .unwrap_err();
    assert_eq!(arg_of(e), "workspace");
    // x in bf16 with f16 weights.
    let xb = vec![bf16::ONE; 1200];
    let e = backward_dense(
        b,
        &s,
        DenseInputs {
            x: &xb,
            g: &g,
            u: &u,
            a: &a,
            b: &bw,
        },
        DenseGrads::<Emu, f32> {
            da: &mut da,
            db: &mut db,
            du: &mut du,
            dx: None,
        },
        &mut vec![0u8; 1 << 20],
    )
    .unwrap_err();
    assert_eq!(arg_of(e), "x");
    let gb = vec![bf16::ONE; 900];
    let e = backward_dense(
        b,
        &s,
        DenseInputs {
            x: &x,
            g: &gb,
            u: &u,
            a: &a,
            b: &bw,
        },
        DenseGrads::<Emu, f32> {
            da: &mut da,
            db: &mut db,
            du: &mut du,
            dx: None,
        },
        &mut vec![0u8; 1 << 20],
    )
    .unwrap_err();
    assert_eq!(arg_of(e), "g");
    let mut dxb = vec![bf16::ONE; 1200];
    let e = backward_dense(
        b,
        &s,
        DenseInputs {
            x: &x,
            g: &g,
            u: &u,
            a: &a,
            b: &bw,
        },
        DenseGrads {
            da: &mut da,
            db: &mut db,
            du: &mut du,
            dx: Some(&mut dxb),
        },
        &mut vec![0u8; 1 << 20],
    )
    .unwrap_err();
    assert_eq!(arg_of(e), "dx");
    // f64 is a cpu-only dtype.
    let (x64, g64, a64, b64) = (
        vec![1.0f64; 1200],
        vec![1.0f64; 900],
        vec![1.0f64; 8],
        vec![1.0f64; 6],
    );
    let e = backward_dense(
        b,
        &s,
        DenseInputs {
            x: &x64,
            g: &g64,
            u: &u,
            a: &a64,
            b: &b64,
        },
        DenseGrads::<Emu, f64> {
            da: &mut da,
            db: &mut db,
            du: &mut du,
            dx: None,
        },
        &mut vec![0u8; 1 << 20],
    )
    .unwrap_err();
    assert_eq!(arg_of(e), "a");
}

#[test]
fn sgmv_bad_inputs_are_typed_errors() {
    let b = &Emu;
    let slices = [Slice { n: 2, offset: 0 }];
    let (a, bw) = (vec![1.0f32; 8], vec![1.0f32; 4]);
    let mut builder = AdapterTableBuilder::new(2, 4, &slices, DType::F32).unwrap();
    builder
        .set(b, 0, 0, &a, &bw, LoraWeights::packed(2, 1.0, 4))
        .unwrap();
    let table = builder.build(b).unwrap();
    let mut other = AdapterTableBuilder::new(1, 4, &slices, DType::F32).unwrap();
    other
        .set(b, 0, 0, &a, &bw, LoraWeights::packed(2, 1.0, 4))
        .unwrap();
    let other = other.build(b).unwrap();
    let plan = SgmvPlan::from_host(b, None, &[0, 3], &[0], 1, 3).unwrap();
    // Gradient table builder.
    let (mut da, mut db) = (vec![0f32; 8], vec![0f32; 4]);
    {
        let mut gt = GradTableBuilder::new(&table);
        assert_eq!(
            arg_of(gt.set(b, 2, 0, None, 4, None, 2).map(|_| ()).unwrap_err()),
            "adapter"
        );
        assert_eq!(
            arg_of(gt.set(b, 0, 1, None, 4, None, 2).map(|_| ()).unwrap_err()),
            "slice"
        );
        assert_eq!(
            arg_of(gt.set(b, 0, 0, None, 3, None, 2).map(|_| ()).unwrap_err()),
            "ld_da"
        );
        assert_eq!(
            arg_of(gt.set(b, 0, 0, None, 4, None, 1).map(|_| ()).unwrap_err()),
            "ld_db"
        );
        let mut short = vec![0f32; 7];
        assert_eq!(
            arg_of(
                gt.set(b, 0, 0, Some(&mut short), 4, None, 2)
                    .map(|_| ())
                    .unwrap_err()
            ),
            "da"
        );
        let mut short = vec![0f32; 3];
        assert_eq!(
            arg_of(
                gt.set(b, 0, 0, None, 4, Some(&mut short), 2)
                    .map(|_| ())
                    .unwrap_err()
            ),
            "db"
        );
    }
    let mut gt = GradTableBuilder::new(&table);
    gt.set(b, 0, 0, Some(&mut da), 4, Some(&mut db), 2).unwrap();
    let grads = gt.build(b).unwrap();
    assert_eq!(
        arg_of(
            BackwardSgmv::new(&other, &grads, &plan)
                .map(|_| ())
                .unwrap_err()
        ),
        "grads"
    );
    let bwd = BackwardSgmv::new(&table, &grads, &plan).unwrap();
    let ws_len = bwd.workspace_bytes(b);
    assert!(ws_len > 0);
    let (x, g, u) = (vec![1.0f32; 12], vec![1.0f32; 6], vec![1.0f32; 6]);
    let run = |x: &[f32],
               ld_x: usize,
               g: &[f32],
               u: &[f32],
               du_len: usize,
               dx_len: usize,
               ws: usize,
               err: usize,
               p: f64| {
        let mut du = vec![POISON; du_len];
        let mut dx = vec![POISON; dx_len];
        let mut w = vec![0u8; ws];
        let mut e = vec![0u32; err];
        let d = Dropout { p, ..Dropout::NONE };
        let r = bwd.run(
            b,
            SgmvInputs {
                x: &x.to_vec(),
                ld_x,
                g: &g.to_vec(),
                ld_g: 2,
                u: &u.to_vec(),
            },
            SgmvOutputs {
                du: &mut du,
                dx: Some(&mut dx),
                ld_dx: 4,
            },
            GradMode::Accumulate,
            &d,
            &mut w,
            if err > 0 { Some(&mut e) } else { None },
        );
        assert!(
            du.iter()
                .chain(&dx)
                .all(|v| v.to_bits() == POISON.to_bits())
                || r.is_ok()
        );
        r.map_err(arg_of)
    };
    assert_eq!(run(&x, 4, &g, &u, 6, 12, ws_len, 1, 0.0), Ok(()));
    assert_eq!(run(&x[..11], 4, &g, &u, 6, 12, ws_len, 1, 0.0), Err("x"));
    assert_eq!(run(&x, 3, &g, &u, 6, 12, ws_len, 1, 0.0), Err("ld_x"));
    assert_eq!(run(&x, 4, &g[..5], &u, 6, 12, ws_len, 1, 0.0), Err("g"));
    assert_eq!(run(&x, 4, &g, &u[..5], 6, 12, ws_len, 1, 0.0), Err("u"));
    assert_eq!(run(&x, 4, &g, &u, 5, 12, ws_len, 1, 0.0), Err("du"));
    assert_eq!(run(&x, 4, &g, &u, 6, 11, ws_len, 1, 0.0), Err("dx"));
    assert_eq!(
        run(&x, 4, &g, &u, 6, 12, ws_len - 1, 1, 0.0),
        Err("workspace")
    );
    assert_eq!(run(&x, 4, &g, &u, 6, 12, ws_len, 0, 0.0), Ok(()));
    assert_eq!(run(&x, 4, &g, &u, 6, 12, ws_len, 1, 0.5), Ok(()));
    assert_eq!(run(&x, 4, &g, &u, 6, 12, ws_len, 1, 1.5), Err("dropout.p"));
    assert_eq!(
        run(&x, 4, &g, &u, 6, 12, ws_len, 1, f64::NAN),
        Err("dropout.p")
    );
    // dtypes: bf16 x with f32 weights.
    let mut du = vec![0f32; 6];
    let e = bwd
        .run(
            b,
            SgmvInputs {
                x: &vec![bf16::ONE; 12],
                ld_x: 4,
                g: &g,
                ld_g: 2,
                u: &u,
            },
            SgmvOutputs::<Emu, f32> {
                du: &mut du,
                dx: None,
                ld_dx: 4,
            },
            GradMode::Overwrite,
            &Dropout::NONE,
            &mut vec![0u8; ws_len],
            None,
        )
        .unwrap_err();
    assert_eq!(arg_of(e), "x");
}

/// The C launchers validate what they can see (the safe API never reaches these branches).
#[test]
fn c_launcher_validation() {
    use lora_kernels::ffi::sys;
    // SAFETY: the launchers reject these params before touching any pointer.
    unsafe {
        assert_eq!(
            sys::lk_emu_backward_dense(std::ptr::null(), std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        assert_eq!(
            sys::lk_emu_backward_sgmv(std::ptr::null(), std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        let mut p: sys::LkBackwardDenseParams = std::mem::zeroed();
        p.tokens = 1;
        p.d_in = 1;
        p.d_out = 1;
        p.rank = 1;
        p.dropout_keep_scale = 1.0;
        p.ld_x = 1;
        p.ld_g = 1;
        p.ld_u = 1;
        p.lda = 1;
        p.ldb = 1;
        p.ld_da = 1;
        p.ld_db = 1;
        p.ld_du = 1;
        p.ld_dx = 1;
        let mut q = p;
        q.dropout_threshold = 5;
        q.dropout_keep_scale = f32::NAN;
        assert_eq!(
            sys::lk_emu_backward_dense(&q, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        let msg = std::ffi::CStr::from_ptr(sys::lk_emu_last_error_message())
            .to_string_lossy()
            .into_owned();
        assert!(msg.contains("dropout_keep_scale"), "{msg}");
        let mut q = p;
        q.grad_mode = 7;
        assert_eq!(
            sys::lk_emu_backward_dense(&q, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        let mut q = p;
        q.x_dtype = sys::LkDtype::LK_F16 as i32;
        assert_eq!(
            sys::lk_emu_backward_dense(&q, std::ptr::null_mut()),
            sys::LK_ERR_UNSUPPORTED_DTYPE as i32
        );
        let mut q = p;
        q.tokens = -1;
        assert_eq!(
            sys::lk_emu_backward_dense(&q, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        let mut q = p;
        q.ld_db = 0;
        assert_eq!(
            sys::lk_emu_backward_dense(&q, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        // Null x with work to do.
        assert_eq!(
            sys::lk_emu_backward_dense(&p, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        let mut s: sys::LkBackwardSgmvParams = std::mem::zeroed();
        s.tokens = 1;
        s.n_slices = 0;
        s.dropout_keep_scale = 1.0;
        assert_eq!(
            sys::lk_emu_backward_sgmv(&s, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        s.n_slices = 1;
        s.max_segments = 1;
        s.d_in = 1;
        s.ld_x = 1;
        s.ld_dx = 1;
        s.slices[0].n = 1;
        s.ld_g = 1;
        // Null pointers.
        assert_eq!(
            sys::lk_emu_backward_sgmv(&s, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        s.ld_g = 0;
        assert_eq!(
            sys::lk_emu_backward_sgmv(&s, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
        s.ld_g = 1;
        s.slices[0].n = -1;
        assert_eq!(
            sys::lk_emu_backward_sgmv(&s, std::ptr::null_mut()),
            sys::LK_ERR_INVALID_ARGUMENT as i32
        );
    }
}
