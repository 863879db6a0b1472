//! SGMV shrink/expand and the planner on the emulator and the cpu reference, against an independent
//! f64 computation (common::serving; tolerances documented there and in tests/bgmv.rs). Segment
//! layouts: planner output for every popularity pattern, and host-made plans with empty, length-1,
//! very skewed and −1 segments, uncovered positions and shuffled row orders. Invalid metadata must
//! leave u and out bit-identical and set the error word.

mod common;

use common::serving::*;
use common::*;
use lora_kernels::adapter::{fault, ExpandMode};
use lora_kernels::sgmv::{reference, Sgmv, SgmvPlan};
use lora_kernels::{bf16, f16, Backend, Cpu, Emu, Error, Float};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::Rng;

/// A host-made plan: segments `(length, adapter)` laid out in order over a shuffled (or identity)
/// row order; positions past the last segment are uncovered. Returns the plan's arrays and each
/// token's effective adapter (−1 when no segment with an adapter covers it).
struct HostPlan {
    row_index: Option<Vec<i32>>,
    seg_starts: Vec<i32>,
    seg_adapter: Vec<i32>,
    n_segments: i32,
    effective: Vec<i32>,
}

fn host_plan(
    r: &mut rand::rngs::StdRng,
    tokens: usize,
    segments: &[(usize, i32)],
    shuffle: bool,
    spare: usize,
) -> HostPlan {
    let mut rows: Vec<i32> = (0..tokens as i32).collect();
    if shuffle {
        rows.shuffle(r);
    }
    let mut seg_starts = vec![0i32];
    let mut effective = vec![-1; tokens];
    let mut pos = 0usize;
    for &(len, a) in segments {
        for p in pos..pos + len {
            effective[rows[p] as usize] = a;
        }
        pos += len;
        seg_starts.push(pos as i32);
    }
    assert!(pos <= tokens);
    let n = segments.len();
    // Capacity beyond n_segments holds garbage the kernels must not read.
    seg_starts.extend(std::iter::repeat_n(i32::MIN, spare));
    let mut seg_adapter: Vec<i32> = segments.iter().map(|s| s.1).collect();
    seg_adapter.extend(std::iter::repeat_n(i32::MAX, spare));
    HostPlan {
        row_index: shuffle.then_some(rows),
        seg_starts,
        seg_adapter,
        n_segments: n as i32,
        effective,
    }
}

proptest! {
    #![proptest_config(proptest_config(40))]

    #[test]
    fn emu_f32(c in cases(70)) {
        run_sgmv_planned::<_, f32, f32, f32>(&Emu, &scenario::<f32>(&c, 0.15), c.seed, mode(c.add));
    }

    #[test]
    fn emu_f16(c in cases(70)) {
        run_sgmv_planned::<_, f16, f16, f16>(&Emu, &scenario::<f16>(&c, 0.15), c.seed, mode(c.add));
    }

    #[test]
    fn emu_bf16(c in cases(70)) {
        run_sgmv_planned::<_, bf16, bf16, bf16>(&Emu, &scenario::<bf16>(&c, 0.15), c.seed, mode(c.add));
    }

    #[test]
    fn emu_f32_activations_half_weights(c in cases(70)) {
        run_sgmv_planned::<_, f32, f16, f32>(&Emu, &scenario::<f16>(&c, 0.15), c.seed, mode(c.add));
        run_sgmv_planned::<_, f32, bf16, bf16>(&Emu, &scenario::<bf16>(&c, 0.15), c.seed ^ 1, mode(!c.add));
    }

    #[test]
    fn cpu_reference(c in cases(70)) {
        run_sgmv_planned::<_, f32, bf16, f32>(&Cpu, &scenario::<bf16>(&c, 0.15), c.seed, mode(c.add));
    }
}

/// Host-made plans: empty, length-1, very skewed and −1 segments, uncovered tail, shuffled rows.
fn layouts_on<B: Backend>(b: &B) {
    let tokens = 40;
    let layouts: Vec<Vec<(usize, i32)>> = vec![
        vec![(0, 1), (1, 0), (0, 2), (38, 1), (1, 2)],
        vec![(40, 2)],
        vec![(1, 0), (1, 1), (1, 2), (1, -1), (30, 0)],
        vec![(5, -1), (0, -1), (20, 2)],
        vec![],
    ];
    for (i, segs) in layouts.iter().enumerate() {
        for shuffle in [false, true] {
            let mut r = rng(100 + i as u64);
            let hp = host_plan(&mut r, tokens, segs, shuffle, 2);
            let sc = Scenario::random::<f16>(
                &mut r,
                70,
                &[24, 8],
                3,
                &[0, 4, 16, 33],
                hp.effective.clone(),
            );
            let plan = SgmvPlan::from_host(
                b,
                hp.row_index.as_deref(),
                &hp.seg_starts,
                &hp.seg_adapter,
                hp.n_segments,
                tokens,
            )
            .unwrap();
            run_sgmv_with_plan::<B, f16, f16, f16>(b, &sc, &plan, i as u64, ExpandMode::Add);
            run_sgmv_with_plan::<B, f32, f16, f32>(b, &sc, &plan, i as u64, ExpandMode::Overwrite);
        }
    }
}

#[test]
fn segment_layouts_emu() {
    layouts_on(&Emu);
}

#[test]
fn segment_layouts_cpu() {
    layouts_on(&Cpu);
}

/// Invalid metadata: the launch writes nothing (u and out bit-identical) and flags it.
fn invalid_metadata_on<B: Backend>(b: &B) {
    let tokens = 12;
    let mut r = rng(7);
    let good = host_plan(&mut r, tokens, &[(4, 0), (5, 1), (3, 2)], true, 1);
    let sc = Scenario::random::<bf16>(&mut r, 33, &[16, 8], 3, &[4, 8], good.effective.clone());
    let bufs = sc.upload::<B, bf16>(b);
    let table = sc.table(b, &bufs);
    let r_cap = table.r_cap();
    type Mutate = fn(&mut HostPlan);
    let cases: [(&str, Mutate, u32); 8] = [
        (
            "n_segments > max_segments",
            |p| p.n_segments = 5,
            fault::SEGMENTS,
        ),
        ("n_segments < 0", |p| p.n_segments = -1, fault::SEGMENTS),
        (
            "seg_starts decreasing",
            |p| p.seg_starts[2] = 3,
            fault::SEGMENTS,
        ),
        (
            "seg_starts past tokens",
            |p| p.seg_starts[3] = 13,
            fault::SEGMENTS,
        ),
        (
            "seg_starts negative",
            |p| p.seg_starts[0] = -1,
            fault::SEGMENTS,
        ),
        (
            "adapter out of range",
            |p| p.seg_adapter[1] = 3,
            fault::SEGMENTS,
        ),
        ("adapter < -1", |p| p.seg_adapter[0] = -2, fault::SEGMENTS),
        (
            "row_index out of range",
            |p| p.row_index.as_mut().unwrap()[5] = 12,
            fault::ROW_INDEX,
        ),
    ];
    for (name, mutate, want) in cases {
        let mut hp = host_plan(&mut rng(7), tokens, &[(4, 0), (5, 1), (3, 2)], true, 1);
        mutate(&mut hp);
        let plan = SgmvPlan::from_host(
            b,
            hp.row_index.as_deref(),
            &hp.seg_starts,
            &hp.seg_adapter,
            hp.n_segments,
            tokens,
        )
        .unwrap();
        let batch = Sgmv::new(&table, &plan);
        let x: Vec<bf16> = random_vec(&mut r, tokens * 33);
        let mut ws = b
            .alloc::<u8>(
                batch
                    .shrink_workspace_bytes::<bf16>(b, 33)
                    .max(batch.expand_workspace_bytes::<bf16>(b, sc.out_width, ExpandMode::Add)),
            )
            .unwrap();
        let u0 = vec![POISON; 2 * tokens * r_cap];
        let mut u = b.upload(&u0).unwrap();
        let mut err = b.upload(&[0u32]).unwrap();
        batch
            .shrink(
                b,
                &b.upload(&x).unwrap(),
                33,
                &mut u,
                &mut ws,
                Some(&mut err),
            )
            .unwrap();
        assert!(
            b.download(&u)
                .unwrap()
                .iter()
                .all(|v| v.to_bits() == POISON.to_bits()),
            "{}: {name}: shrink wrote u",
            b.name()
        );
        assert_eq!(
            b.download(&err).unwrap()[0],
            want,
            "{}: {name}: shrink error word",
            b.name()
        );
        let u_vals: Vec<f32> = random_vec(&mut r, u0.len());
        let before: Vec<bf16> = random_vec(&mut r, tokens * sc.out_width);
        let mut out = b.upload(&before).unwrap();
        let mut err = b.upload(&[0u32]).unwrap();
        batch
            .expand(
                b,
                &b.upload(&u_vals).unwrap(),
                &mut out,
                sc.out_width,
                ExpandMode::Add,
                &mut ws,
                Some(&mut err),
            )
            .unwrap();
        assert_eq!(
            b.download(&out).unwrap(),
            before,
            "{}: {name}: expand wrote out",
            b.name()
        );
        assert_eq!(
            b.download(&err).unwrap()[0],
            want,
            "{}: {name}: expand error word",
            b.name()
        );
    }
}

#[test]
fn invalid_metadata_writes_nothing_emu() {
    invalid_metadata_on(&Emu);
}

#[test]
fn invalid_metadata_writes_nothing_cpu() {
    invalid_metadata_on(&Cpu);
}

/// The planner on many tokens (multi-chunk sorting) and many adapters, with invalid ids flagged.
#[test]
fn planner_large_and_invalid_ids() {
    let mut r = rng(3);
    for (tokens, n_adapters) in [(scaled(5000, 1500), 700), (1, 1), (3, 1000), (257, 2)] {
        let mut ids = random_ids(&mut r, tokens, n_adapters, Popularity::Zipf, 0.1);
        if tokens > 2 {
            ids[1] = n_adapters as i32;
            ids[2] = -7;
        }
        for b in [&Emu as &dyn PlanOn, &Cpu] {
            b.check(&ids, n_adapters);
        }
    }
}

trait PlanOn {
    fn check(&self, ids: &[i32], n_adapters: usize);
}

impl<B: Backend> PlanOn for B {
    fn check(&self, ids: &[i32], n_adapters: usize) {
        let tokens = ids.len();
        let mut plan = SgmvPlan::alloc(self, tokens, tokens.min(n_adapters)).unwrap();
        let idb = self.upload(ids).unwrap();
        let mut ws = self
            .alloc::<u8>(plan.plan_workspace_bytes(self, &idb, n_adapters))
            .unwrap();
        let mut err = self.upload(&[0u32]).unwrap();
        plan.plan(self, &idb, n_adapters, &mut ws, Some(&mut err))
            .unwrap();
        let want = reference::plan(ids, n_adapters);
        let n = self.download(&plan.n_segments).unwrap()[0] as usize;
        assert_eq!(
            self.download(plan.row_index.as_ref().unwrap()).unwrap(),
            want.row_index,
            "{}",
            self.name()
        );
        assert_eq!(
            &self.download(&plan.seg_starts).unwrap()[..=n],
            &want.seg_starts[..],
            "{}",
            self.name()
        );
        assert_eq!(
            &self.download(&plan.seg_adapter).unwrap()[..n],
            &want.seg_adapter[..],
            "{}",
            self.name()
        );
        assert_eq!(
            self.download(&err).unwrap()[0],
            want.faults,
            "{}",
            self.name()
        );
    }
}

/// A token's bits do not depend on the rest of the batch or the segment it shares.
#[test]
fn batch_invariance_bit_identical() {
    let mut r = rng(12);
    let (d_in, n_adapters) = (200, 4);
    let sc0 = Scenario::random::<f16>(&mut r, d_in, &[40, 24], n_adapters, &[8, 16, 33], vec![2]);
    let bufs = sc0.upload::<Emu, f16>(&Emu);
    let table = sc0.table(&Emu, &bufs);
    let r_cap = table.r_cap();
    let token: Vec<f16> = random_vec(&mut r, d_in);
    let width = sc0.out_width;
    let run = |ids: &[i32], pos: usize| -> (Vec<u32>, Vec<u16>) {
        let tokens = ids.len();
        let mut x: Vec<f16> = random_vec(&mut rng(tokens as u64), tokens * d_in);
        x[pos * d_in..(pos + 1) * d_in].copy_from_slice(&token);
        let mut plan = SgmvPlan::alloc(&Emu, tokens, tokens.min(n_adapters)).unwrap();
        let mut ws = vec![0u8; plan.plan_workspace_bytes(&Emu, &ids.to_vec(), n_adapters)];
        plan.plan(&Emu, &ids.to_vec(), n_adapters, &mut ws, None)
            .unwrap();
        let batch = Sgmv::new(&table, &plan);
        let mut ws = vec![
            0u8;
            batch.shrink_workspace_bytes::<f16>(&Emu, d_in).max(
                batch.expand_workspace_bytes::<f16>(&Emu, width, ExpandMode::Add)
            )
        ];
        let mut u = vec![POISON; 2 * tokens * r_cap];
        batch.shrink(&Emu, &x, d_in, &mut u, &mut ws, None).unwrap();
        let mut out = vec![f16::from_f32(0.5); tokens * width];
        batch
            .expand(&Emu, &u, &mut out, width, ExpandMode::Add, &mut ws, None)
            .unwrap();
        let mut ubits = Vec::new();
        for (s, w) in sc0.weights[2].iter().enumerate() {
            ubits.extend(
                u[(s * tokens + pos) * r_cap..(s * tokens + pos) * r_cap + w.rank]
                    .iter()
                    .map(|v| v.to_bits()),
            );
        }
        (
            ubits,
            out[pos * width..(pos + 1) * width]
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        )
    };
    let alone = run(&[2], 0);
    assert_eq!(alone, run(&[1, 2, 0], 1));
    assert_eq!(alone, run(&[2; 37], 20));
    let mixed: Vec<i32> = (0..61)
        .map(|i| if i == 33 { 2 } else { r.random_range(-1..4) })
        .collect();
    assert_eq!(alone, run(&mixed, 33));
}

fn invalid_arg(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } | Error::UnsupportedDtype { arg, .. } => arg,
        other => panic!("expected a typed argument error, got {other:?}"),
    }
}

#[test]
fn validation_errors() {
    let b = &Emu;
    let mut r = rng(1);
    let sc = Scenario::random::<f32>(&mut r, 16, &[8], 2, &[4], vec![0, 1, 0, 1]);
    let bufs = sc.upload::<Emu, f32>(b);
    let table = sc.table(b, &bufs);
    assert_eq!(
        invalid_arg(
            SgmvPlan::from_host(b, Some(&[0, 1, 2]), &[0, 4], &[0], 1, 4)
                .map(|_| ())
                .unwrap_err()
        ),
        "row_index"
    );
    assert_eq!(
        invalid_arg(
            SgmvPlan::from_host(b, None, &[0, 4, 4], &[0], 1, 4)
                .map(|_| ())
                .unwrap_err()
        ),
        "seg_starts"
    );
    assert_eq!(
        invalid_arg(SgmvPlan::<Emu>::alloc(b, 4, 0).map(|_| ()).unwrap_err()),
        "max_segments"
    );
    let mut small = SgmvPlan::alloc(b, 4, 1).unwrap();
    let mut ws = vec![0u8; 1 << 16];
    assert_eq!(
        invalid_arg(
            small
                .plan(b, &vec![0, 1, 0, 1], 2, &mut ws, None)
                .unwrap_err()
        ),
        "max_segments"
    );
    assert_eq!(
        invalid_arg(small.plan(b, &vec![0, 1, 0], 2, &mut ws, None).unwrap_err()),
        "token_adapter"
    );
    let plan = SgmvPlan::from_host(b, None, &[0, 4], &[0], 1, 4).unwrap();
    let batch = Sgmv::new(&table, &plan);
    let x = vec![1.0f32; 4 * 16];
    let mut u = vec![POISON; 4 * table.r_cap()];
    assert_eq!(
        invalid_arg(
            batch
                .shrink(b, &x[1..].to_vec(), 16, &mut u, &mut ws, None)
                .unwrap_err()
        ),
        "x"
    );
    assert_eq!(
        invalid_arg(
            batch
                .shrink(b, &x, 16, &mut u[1..].to_vec(), &mut ws, None)
                .unwrap_err()
        ),
        "u"
    );
    assert_eq!(
        invalid_arg(
            batch
                .shrink(b, &vec![f16::ONE; 64], 16, &mut u, &mut ws, None)
                .unwrap_err()
        ),
        "x"
    );
    let need = batch.shrink_workspace_bytes::<f32>(b, 16);
    if need > 0 {
        assert_eq!(
            invalid_arg(
                batch
                    .shrink(b, &x, 16, &mut u, &mut vec![0u8; need - 1], None)
                    .unwrap_err()
            ),
            "workspace"
        );
    }
    let mut out = vec![0.0f32; 4 * sc.out_width];
    assert_eq!(
        invalid_arg(
            batch
                .expand(
                    b,
                    &u,
                    &mut out,
                    table.out_width() - 1,
                    ExpandMode::Add,
                    &mut ws,
                    None
                )
                .unwrap_err()
        ),
        "ld_out"
    );
    assert!(u.iter().all(|v| v.to_bits() == POISON.to_bits()));
    assert!(out.iter().all(|&v| v == 0.0));
}

/// More tokens than a grid's y or z dimension can hold (65 535): planner, shrink and expand still
/// cover every token (large dimensions live on grid x).
#[test]
fn more_tokens_than_a_grid_y_dimension() {
    let mut r = rng(65537);
    let tokens = 65_537;
    let ids = random_ids(&mut r, tokens, 3, Popularity::Uniform, 0.05);
    let sc = Scenario::random::<bf16>(&mut r, 8, &[4], 3, &[1, 2], ids);
    run_sgmv_planned::<_, bf16, bf16, bf16>(&Emu, &sc, 1, ExpandMode::Add);
}

/// Ranks up to 256 mixed in one launch (and the f32 FMA path at rank 256).
#[test]
fn rank_256_mixed() {
    let mut r = rng(256);
    let ids = random_ids(&mut r, 40, 3, Popularity::Uniform, 0.1);
    let sc = Scenario::random::<f16>(&mut r, 130, &[20, 9], 3, &[256, 1, 100], ids);
    run_sgmv_planned::<_, f16, f16, f16>(&Emu, &sc, 2, ExpandMode::Overwrite);
    let sc = Scenario::random::<f32>(&mut r, 70, &[12], 3, &[256, 3], sc.ids.clone());
    run_sgmv_planned::<_, f32, f32, f32>(&Emu, &sc, 3, ExpandMode::Add);
}

/// The training shrink with dropout fused into the load of x: every slice draws its own mask from
/// its Philox offset (checked here against the Rust Philox, element by element), the keep scale is
/// applied once per dot product, p = 0 is bit-identical to the plain shrink, p = 1 gives zeros.
fn dropout_shrink_on<B: Backend, TX: Float, TW: Float>(b: &B, p: f64, seed: u64) {
    use lora_kernels::dropout::LayerDropout;
    let mut r = rng(seed);
    let tokens = 37;
    let ids = random_ids(&mut r, tokens, 3, Popularity::Uniform, 0.1);
    let sc = Scenario::random::<TW>(&mut r, 150, &[20, 7], 3, &[1, 8, 17], ids);
    let bufs = sc.upload::<B, TW>(b);
    let table = sc.table(b, &bufs);
    let r_cap = table.r_cap();
    let mut plan = SgmvPlan::alloc(b, tokens, 3).unwrap();
    let idb = b.upload(&sc.ids).unwrap();
    let mut pws = b
        .alloc::<u8>(plan.plan_workspace_bytes(b, &idb, 3))
        .unwrap();
    plan.plan(b, &idb, 3, &mut pws, None).unwrap();
    let batch = Sgmv::new(&table, &plan);
    let x: Vec<TX> = random_vec(&mut r, tokens * sc.d_in);
    let xb = b.upload(&x).unwrap();
    let mut ws = b
        .alloc::<u8>(batch.shrink_workspace_bytes::<TX>(b, sc.d_in))
        .unwrap();
    let mut offsets = [0u64; 8];
    offsets[0] = seed ^ 0x55;
    offsets[1] = (1 << 33) + 3;
    let drop = LayerDropout { p, seed, offsets };
    let mut ub = b.upload(&vec![POISON; 2 * tokens * r_cap]).unwrap();
    batch
        .shrink_with_dropout(b, &xb, sc.d_in, &drop, &mut ub, &mut ws, None)
        .unwrap();
    let u = b.download(&ub).unwrap();
    let split = (TX::DTYPE == lora_kernels::DType::F32 && TW::DTYPE != lora_kernels::DType::F32)
        .then_some(TW::DTYPE);
    for t in 0..tokens {
        for s in 0..2 {
            let Some(rank) = sc.rank_of(t, s) else {
                continue;
            };
            let cfg = drop.config(s).unwrap();
            let ks = if cfg.threshold == 0 {
                1.0
            } else {
                cfg.keep_scale as f64
            };
            let w = &sc.weights[sc.ids[t] as usize][s];
            for j in 0..rank {
                let (mut e, mut m) = (0.0, 0.0);
                for k in 0..sc.d_in {
                    if cfg.keeps((t * sc.d_in + k) as u64) {
                        let v = x[t * sc.d_in + k].to_f64() * w.a[j * w.lda + k];
                        e += v;
                        m += v.abs();
                    }
                }
                let (exact, tol) = (
                    ks * e,
                    ks * sum_tolerance(sc.d_in, m, split) + ks * e.abs() * f64::powi(2.0, -24),
                );
                let got = u[(s * tokens + t) * r_cap + j] as f64;
                assert!(
                    (got - exact).abs() <= tol,
                    "{} p {p}: u[{s},{t},{j}] = {got}, want {exact} ± {tol:e}",
                    b.name()
                );
            }
        }
    }
    if p == 0.0 {
        let mut plain = b.upload(&vec![POISON; 2 * tokens * r_cap]).unwrap();
        batch
            .shrink(b, &xb, sc.d_in, &mut plain, &mut ws, None)
            .unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(
            bits(b.download(&plain).unwrap()),
            bits(u),
            "p = 0 must be the plain shrink"
        );
    }
}

#[test]
fn dropout_fused_shrink_per_slice_masks() {
    for (i, p) in [0.0, 0.1, 0.5, 1.0].into_iter().enumerate() {
        let seed = 900 + i as u64;
        dropout_shrink_on::<_, f16, f16>(&Emu, p, seed);
        dropout_shrink_on::<_, f32, bf16>(&Emu, p, seed);
        dropout_shrink_on::<_, f32, f32>(&Emu, p, seed);
        dropout_shrink_on::<_, bf16, bf16>(&Cpu, p, seed);
    }
    // An invalid probability is a typed error naming it.
    let b = &Emu;
    let sc = Scenario::random::<f32>(&mut rng(1), 8, &[4], 1, &[2], vec![0, 0]);
    let bufs = sc.upload::<Emu, f32>(b);
    let table = sc.table(b, &bufs);
    let plan = SgmvPlan::from_host(b, None, &[0, 2], &[0], 1, 2).unwrap();
    let batch = Sgmv::new(&table, &plan);
    let drop = lora_kernels::dropout::LayerDropout {
        p: 1.5,
        ..lora_kernels::dropout::LayerDropout::NONE
    };
    let mut u = vec![POISON; 2 * table.r_cap()];
    let mut ws = vec![0u8; batch.shrink_workspace_bytes::<f32>(b, 8)];
    let e = batch
        .shrink_with_dropout(b, &vec![1.0f32; 16], 8, &drop, &mut u, &mut ws, None)
        .unwrap_err();
    assert_eq!(invalid_arg(e), "dropout.p");
}
