//! Random multi-adapter scenarios for the BGMV/SGMV tests: adapters of mixed ranks (including 0)
//! in separate allocations padded with NaN (a kernel that reads padding produces NaN), 1–3 slices of
//! unequal widths, token ids of several popularity patterns with −1 rows, and the tolerance rules.
#![allow(dead_code, clippy::too_many_arguments)]

use super::{random_vec, rng, scale, unit_roundoff, POISON};
use lora_kernels::adapter::{
    fault, AdapterTable, AdapterTableBuilder, ExpandMode, LoraWeights, Slice,
};
use lora_kernels::bgmv::Bgmv;
use lora_kernels::sgmv::{reference, Sgmv, SgmvPlan};
use lora_kernels::{Backend, DType, Float};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;

/// Per adapter, per slice: the (A, B) weight buffers on a backend.
pub type WeightBufs<B, TW> = Vec<Vec<(<B as Backend>::Buffer<TW>, <B as Backend>::Buffer<TW>)>>;

/// Host data of one scenario (weights as f64 values exactly representable in the weight dtype).
#[derive(Clone, Debug)]
pub struct Scenario {
    pub d_in: usize,
    pub slices: Vec<Slice>,
    pub n_adapters: usize,
    /// `[adapter][slice]`: rank, scale, A (rank × lda, padded), B (n_s × ldb, padded), strides.
    pub weights: Vec<Vec<Weights>>,
    pub ids: Vec<i32>,
    /// Extra output columns right of the slices (must stay untouched).
    pub out_width: usize,
}

#[derive(Clone, Debug)]
pub struct Weights {
    pub rank: usize,
    pub scale: f32,
    pub lda: usize,
    pub ldb: usize,
    /// Allocation of A with NaN in the padding columns and 3 NaN elements after the end.
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

/// Token-id patterns (DESIGN.md §6 popularity: identical, distinct, uniform, zipf; all with −1 rows).
#[derive(Clone, Copy, Debug)]
pub enum Popularity {
    Same,
    Distinct,
    Uniform,
    Zipf,
}

pub fn random_ids(
    rng: &mut StdRng,
    tokens: usize,
    n_adapters: usize,
    pop: Popularity,
    none_fraction: f64,
) -> Vec<i32> {
    let zipf: Vec<f64> = (1..=n_adapters)
        .map(|k| 1.0 / (k as f64).powf(1.5))
        .collect();
    let total: f64 = zipf.iter().sum();
    let same = rng.random_range(0..n_adapters) as i32;
    (0..tokens)
        .map(|t| {
            if rng.random_bool(none_fraction) {
                return -1;
            }
            match pop {
                Popularity::Same => same,
                Popularity::Distinct => (t % n_adapters) as i32,
                Popularity::Uniform => rng.random_range(0..n_adapters) as i32,
                Popularity::Zipf => {
                    let mut r = rng.random_range(0.0..total);
                    for (k, w) in zipf.iter().enumerate() {
                        if r < *w {
                            return k as i32;
                        }
                        r -= w;
                    }
                    (n_adapters - 1) as i32
                }
            }
        })
        .collect()
}

impl Scenario {
    /// `ranks` to pick from (0 = the adapter does not target the slice).
    pub fn random<TW: Float>(
        rng: &mut StdRng,
        d_in: usize,
        widths: &[usize],
        n_adapters: usize,
        ranks: &[usize],
        ids: Vec<i32>,
    ) -> Self {
        let mut slices = Vec::new();
        let mut offset = rng.random_range(0..3usize);
        for &n in widths {
            slices.push(Slice { n, offset });
            offset += n + rng.random_range(0..2usize);
        }
        let out_width = offset + rng.random_range(0..3usize);
        let weights = (0..n_adapters)
            .map(|_| {
                slices
                    .iter()
                    .map(|s| {
                        let rank = ranks[rng.random_range(0..ranks.len())];
                        let lda = d_in + rng.random_range(0..3usize);
                        let ldb = rank + rng.random_range(0..3usize);
                        let value =
                            |rng: &mut StdRng| TW::from_f64(rng.random_range(-1.0..1.0)).to_f64();
                        let mut a = vec![f64::NAN; rank * lda + 3];
                        for j in 0..rank {
                            for k in 0..d_in {
                                a[j * lda + k] = value(rng);
                            }
                        }
                        let mut b = vec![f64::NAN; s.n * ldb + 3];
                        for i in 0..s.n {
                            for j in 0..rank {
                                b[i * ldb + j] = value(rng);
                            }
                        }
                        let scale = if rank == 0 {
                            0.0
                        } else {
                            rng.random_range(0.1f32..2.0)
                        };
                        Weights {
                            rank,
                            scale,
                            lda,
                            ldb,
                            a,
                            b,
                        }
                    })
                    .collect()
            })
            .collect();
        Scenario {
            d_in,
            slices,
            n_adapters,
            weights,
            ids,
            out_width,
        }
    }

    pub fn r_cap(&self) -> usize {
        self.weights
            .iter()
            .flatten()
            .map(|w| w.rank)
            .max()
            .unwrap_or(0)
    }

    /// Uploads every weight allocation to `b` (kept alive by the caller for the table's lifetime).
    pub fn upload<B: Backend, TW: Float>(&self, b: &B) -> WeightBufs<B, TW> {
        let conv = |v: &[f64]| v.iter().map(|&x| TW::from_f64(x)).collect::<Vec<TW>>();
        self.weights
            .iter()
            .map(|per| {
                per.iter()
                    .map(|w| {
                        (
                            b.upload(&conv(&w.a)).unwrap(),
                            b.upload(&conv(&w.b)).unwrap(),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    pub fn builder<'w, B: Backend, TW: Float>(
        &self,
        b: &B,
        bufs: &'w WeightBufs<B, TW>,
    ) -> AdapterTableBuilder<'w, B> {
        let mut builder =
            AdapterTableBuilder::new(self.n_adapters, self.d_in, &self.slices, TW::DTYPE).unwrap();
        for (a, per) in self.weights.iter().enumerate() {
            for (s, w) in per.iter().enumerate() {
                let lw = LoraWeights {
                    rank: w.rank,
                    scale: w.scale,
                    lda: w.lda,
                    ldb: w.ldb,
                };
                builder
                    .set(b, a, s, &bufs[a][s].0, &bufs[a][s].1, lw)
                    .unwrap();
            }
        }
        builder
    }

    pub fn table<'w, B: Backend, TW: Float>(
        &self,
        b: &B,
        bufs: &'w WeightBufs<B, TW>,
    ) -> AdapterTable<'w, B> {
        self.builder(b, bufs).build(b).unwrap()
    }

    /// The rank token `t` has in slice `s` (None: the token is skipped there).
    pub fn rank_of(&self, t: usize, s: usize) -> Option<usize> {
        let id = self.ids[t];
        if id < 0 || id as usize >= self.n_adapters {
            return None;
        }
        Some(self.weights[id as usize][s].rank)
    }
}

/// Spacing of a dtype's subnormals (the absolute rounding error floor near zero).
pub fn subnormal_spacing(d: DType) -> f64 {
    match d {
        DType::F32 => f64::powi(2.0, -149),
        DType::F16 => f64::powi(2.0, -24),
        DType::BF16 => f64::powi(2.0, -133),
        DType::F64 => 0.0,
    }
}

/// Per-element tolerance of an f32-accumulated sum of `n` products with Σ|products| = `abs_sum`:
/// f32 accumulation in any order, (n + 2)·2⁻²⁴·Σ|·|, plus, when an f32 operand must be split into
/// hi + lo halves of the weight dtype for a tensor-core product, the split's error (2⁻²² relative
/// for f16, 2⁻¹⁶ for bf16, plus f16's subnormal spacing 2⁻²⁴ per term).
pub fn sum_tolerance(n: usize, abs_sum: f64, split: Option<DType>) -> f64 {
    let acc = (n as f64 + 2.0) * f64::powi(2.0, -24) * abs_sum;
    let split = match split {
        Some(DType::F16) => f64::powi(2.0, -21) * abs_sum + n as f64 * f64::powi(2.0, -24),
        Some(DType::BF16) => f64::powi(2.0, -15) * abs_sum,
        _ => 0.0,
    };
    acc + split + f64::MIN_POSITIVE
}

/// Checks a shrink result `u` (`[n_slices, tokens, r_cap]`, poisoned before the launch) against an
/// f64 computation from the scenario: covered rows within tolerance, skipped rows untouched (poison
/// bits), columns ≥ rank unspecified. `covered(t)` says whether token t was part of the launch.
pub fn check_shrink_result<TX: Float>(
    sc: &Scenario,
    x: &[TX],
    ld_x: usize,
    u: &[f32],
    r_cap: usize,
    w_dtype: DType,
    covered: &dyn Fn(usize) -> bool,
    what: &str,
) {
    let tokens = sc.ids.len();
    let split = (TX::DTYPE == DType::F32 && w_dtype != DType::F32).then_some(w_dtype);
    for t in 0..tokens {
        for s in 0..sc.slices.len() {
            let row = &u[(s * tokens + t) * r_cap..(s * tokens + t + 1) * r_cap];
            match sc.rank_of(t, s).filter(|_| covered(t)) {
                None => {
                    for (j, v) in row.iter().enumerate() {
                        assert_eq!(
                            v.to_bits(),
                            POISON.to_bits(),
                            "{what}: u[{s},{t},{j}] of a skipped token was written ({v})"
                        );
                    }
                }
                Some(rank) => {
                    let w = &sc.weights[sc.ids[t] as usize][s];
                    for (j, &got) in row.iter().enumerate().take(rank) {
                        let (mut exact, mut abs) = (0.0, 0.0);
                        for k in 0..sc.d_in {
                            let p = x[t * ld_x + k].to_f64() * w.a[j * w.lda + k];
                            exact += p;
                            abs += p.abs();
                        }
                        let tol = sum_tolerance(sc.d_in, abs, split);
                        assert!(
                            (got as f64 - exact).abs() <= tol,
                            "{what}: u[{s},{t},{j}] = {got}, want {exact} ± {tol:e} (rank {rank}, d_in {})",
                            sc.d_in
                        );
                    }
                }
            }
        }
    }
}

/// Checks an expand result against an f64 computation: slice columns of covered tokens within
/// tolerance; everything else (−1 and skipped tokens, columns outside the slices, rank-0 slices in
/// add mode) bit-identical to `before`.
#[allow(clippy::too_many_arguments)]
pub fn check_expand_result<TO: Float>(
    sc: &Scenario,
    u: &[f32],
    r_cap: usize,
    before: &[TO],
    got: &[TO],
    ld_out: usize,
    add: bool,
    w_dtype: DType,
    covered: &dyn Fn(usize) -> bool,
    what: &str,
) {
    let tokens = sc.ids.len();
    let split = (w_dtype != DType::F32).then_some(w_dtype); // u is f32: split for tensor cores
    let u_out = unit_roundoff(TO::DTYPE);
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    for t in 0..tokens {
        let mut expected: Vec<Option<(f64, f64)>> = vec![None; ld_out];
        for (s, slice) in sc.slices.iter().enumerate() {
            let Some(rank) = sc.rank_of(t, s).filter(|_| covered(t)) else {
                continue;
            };
            if rank == 0 && add {
                continue;
            }
            let w = &sc.weights[sc.ids[t] as usize][s];
            for i in 0..slice.n {
                let (mut acc, mut abs) = (0.0, 0.0);
                for j in 0..rank {
                    let p = u[(s * tokens + t) * r_cap + j] as f64 * w.b[i * w.ldb + j];
                    acc += p;
                    abs += p.abs();
                }
                let scale = w.scale as f64;
                let base = if add {
                    before[t * ld_out + slice.offset + i].to_f64()
                } else {
                    0.0
                };
                let want = base + scale * acc;
                let tol = scale * sum_tolerance(rank, abs, split)
                    + (want.abs() + (scale * acc).abs()) * u_out
                    + subnormal_spacing(TO::DTYPE);
                expected[slice.offset + i] = Some((want, tol));
            }
        }
        for (c, e) in expected.iter().enumerate() {
            let g = got[t * ld_out + c];
            match e {
                None => assert!(
                    g.to_f64().to_bits() == before[t * ld_out + c].to_f64().to_bits(),
                    "{what}: out[{t},{c}] must be untouched: was {:?}, now {:?}",
                    before[t * ld_out + c],
                    g
                ),
                Some((want, tol)) => {
                    assert!(
                        (g.to_f64() - want).abs() <= *tol,
                        "{what}: out[{t},{c}] = {g:?}, want {want} ± {tol:e}"
                    );
                    err2 += (g.to_f64() - want).powi(2);
                    ref2 += want.powi(2);
                }
            }
        }
    }
    // The aggregate bound as well: relative Frobenius error per dtype (1e-5 f32, 2e-3 f16,
    // 1e-2 bf16), taking the less precise of the output and the weights (with half weights, f32 u
    // meets them as hi + lo halves on tensor cores, whose lo part loses bits near zero).
    let frob_of = |d: DType| match d {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    };
    let frob = f64::max(frob_of(TO::DTYPE), frob_of(w_dtype));
    if ref2 > 0.0 {
        assert!(
            (err2 / ref2).sqrt() <= frob,
            "{what}: relative Frobenius error {} > {frob}",
            (err2 / ref2).sqrt()
        );
    }
}

/// Runs shrink then expand on `b` and checks both. Returns (u, out, error word).
pub fn run_bgmv<B: Backend, TX: Float, TW: Float, TO: Float>(
    b: &B,
    sc: &Scenario,
    seed: u64,
    mode: ExpandMode,
) -> (Vec<f32>, Vec<TO>, u32) {
    let tokens = sc.ids.len();
    let mut r = rng(seed);
    let ld_x = sc.d_in + (seed % 3) as usize;
    let x: Vec<TX> = random_vec(&mut r, tokens * ld_x);
    let bufs = sc.upload::<B, TW>(b);
    let table = sc.table(b, &bufs);
    let r_cap = table.r_cap();
    let ids = b.upload(&sc.ids).unwrap();
    let batch = Bgmv::new(b, &table, &ids, tokens).unwrap();
    let what = format!(
        "{} bgmv x {} w {} out {} {mode:?}",
        b.name(),
        TX::DTYPE,
        TW::DTYPE,
        TO::DTYPE
    );

    let xb = b.upload(&x).unwrap();
    let mut ub = b
        .upload(&vec![POISON; sc.slices.len() * tokens * r_cap])
        .unwrap();
    let mut err = b.upload(&[0u32]).unwrap();
    batch.shrink(b, &xb, ld_x, &mut ub, Some(&mut err)).unwrap();
    let u = b.download(&ub).unwrap();
    check_shrink_result(
        sc,
        &x,
        ld_x,
        &u,
        r_cap,
        TW::DTYPE,
        &|_| true,
        &format!("{what} shrink"),
    );

    let ld_out = sc.out_width + (seed % 2) as usize;
    let add = mode == ExpandMode::Add;
    let before: Vec<TO> = if add {
        random_vec(&mut r, tokens * ld_out)
    } else {
        vec![TO::from_f64(f64::NAN); tokens * ld_out]
    };
    let mut outb = b.upload(&before).unwrap();
    batch
        .expand(b, &ub, &mut outb, ld_out, mode, Some(&mut err))
        .unwrap();
    let out = b.download(&outb).unwrap();
    check_expand_result(
        sc,
        &u,
        r_cap,
        &before,
        &out,
        ld_out,
        add,
        TW::DTYPE,
        &|_| true,
        &format!("{what} expand"),
    );

    let faults = b.download(&err).unwrap()[0];
    let bad_ids = sc
        .ids
        .iter()
        .any(|&id| id < -1 || id >= sc.n_adapters as i32);
    assert_eq!(
        faults,
        if bad_ids { fault::ADAPTER_ID } else { 0 },
        "{what}: error word"
    );
    (u, out, faults)
}

/// Runs shrink + expand over `plan` and checks them; `sc.ids` are the tokens' effective adapters.
pub fn run_sgmv_with_plan<B: Backend, TX: Float, TW: Float, TO: Float>(
    b: &B,
    sc: &Scenario,
    plan: &SgmvPlan<B>,
    seed: u64,
    mode: ExpandMode,
) -> (Vec<f32>, Vec<TO>) {
    let tokens = sc.ids.len();
    let mut r = rng(seed);
    let ld_x = sc.d_in + (seed % 3) as usize;
    let x: Vec<TX> = random_vec(&mut r, tokens * ld_x);
    let bufs = sc.upload::<B, TW>(b);
    let table = sc.table(b, &bufs);
    let r_cap = table.r_cap();
    let batch = Sgmv::new(&table, plan);
    let what = format!(
        "{} sgmv x {} w {} out {} {mode:?}",
        b.name(),
        TX::DTYPE,
        TW::DTYPE,
        TO::DTYPE
    );
    let mut ws = b
        .alloc::<u8>(
            batch
                .shrink_workspace_bytes::<TX>(b, ld_x)
                .max(batch.expand_workspace_bytes::<TO>(b, sc.out_width + 1, mode)),
        )
        .unwrap();

    let xb = b.upload(&x).unwrap();
    let mut ub = b
        .upload(&vec![POISON; sc.slices.len() * tokens * r_cap])
        .unwrap();
    let mut err = b.upload(&[0u32]).unwrap();
    batch
        .shrink(b, &xb, ld_x, &mut ub, &mut ws, Some(&mut err))
        .unwrap();
    let u = b.download(&ub).unwrap();
    check_shrink_result(
        sc,
        &x,
        ld_x,
        &u,
        r_cap,
        TW::DTYPE,
        &|_| true,
        &format!("{what} shrink"),
    );

    let ld_out = sc.out_width + (seed % 2) as usize;
    let add = mode == ExpandMode::Add;
    let before: Vec<TO> = if add {
        random_vec(&mut r, tokens * ld_out)
    } else {
        vec![TO::from_f64(f64::NAN); tokens * ld_out]
    };
    let mut outb = b.upload(&before).unwrap();
    batch
        .expand(b, &ub, &mut outb, ld_out, mode, &mut ws, Some(&mut err))
        .unwrap();
    let out = b.download(&outb).unwrap();
    check_expand_result(
        sc,
        &u,
        r_cap,
        &before,
        &out,
        ld_out,
        add,
        TW::DTYPE,
        &|_| true,
        &format!("{what} expand"),
    );
    assert_eq!(b.download(&err).unwrap()[0], 0, "{what}: error word");
    (u, out)
}

/// Plans `sc.ids` with the planner on `b`, checks the plan against the reference, then runs.
pub fn run_sgmv_planned<B: Backend, TX: Float, TW: Float, TO: Float>(
    b: &B,
    sc: &Scenario,
    seed: u64,
    mode: ExpandMode,
) {
    let tokens = sc.ids.len();
    let max_segments = tokens.min(sc.n_adapters).max(1);
    let mut plan = SgmvPlan::alloc(b, tokens, max_segments).unwrap();
    let ids = b.upload(&sc.ids).unwrap();
    let mut ws = b
        .alloc::<u8>(plan.plan_workspace_bytes(b, &ids, sc.n_adapters))
        .unwrap();
    let mut err = b.upload(&[0u32]).unwrap();
    plan.plan(b, &ids, sc.n_adapters, &mut ws, Some(&mut err))
        .unwrap();
    let want = reference::plan(&sc.ids, sc.n_adapters);
    let n = b.download(&plan.n_segments).unwrap()[0];
    assert_eq!(
        n as usize,
        want.seg_adapter.len(),
        "{}: n_segments",
        b.name()
    );
    assert_eq!(
        b.download(plan.row_index.as_ref().unwrap()).unwrap(),
        want.row_index,
        "{}: row_index",
        b.name()
    );
    assert_eq!(
        &b.download(&plan.seg_starts).unwrap()[..=n as usize],
        &want.seg_starts[..],
        "{}: seg_starts",
        b.name()
    );
    assert_eq!(
        &b.download(&plan.seg_adapter).unwrap()[..n as usize],
        &want.seg_adapter[..],
        "{}: seg_adapter",
        b.name()
    );
    assert_eq!(
        b.download(&err).unwrap()[0],
        want.faults,
        "{}: planner error word",
        b.name()
    );
    // Tokens with out-of-range ids are in no segment: for the result check they count as −1.
    let mut eff = sc.clone();
    for id in eff.ids.iter_mut() {
        if *id >= sc.n_adapters as i32 || *id < -1 {
            *id = -1;
        }
    }
    run_sgmv_with_plan::<B, TX, TW, TO>(b, &eff, &plan, seed, mode);
}

// ---- proptest strategy shared by the BGMV and SGMV tests ----------------------------------------

#[derive(Clone, Debug)]
pub struct Case {
    pub d_in: usize,
    pub widths: Vec<usize>,
    pub n_adapters: usize,
    pub ranks: Vec<usize>,
    pub tokens: usize,
    pub pop: Popularity,
    pub seed: u64,
    pub add: bool,
}

/// Random layer/batch shapes: odd d_in (up to 4097), 1–3 slices of unequal widths, 1–6 adapters,
/// mixed ranks including 0, 1..max_tokens tokens, every popularity pattern, add or overwrite.
pub fn cases(max_tokens: usize) -> impl Strategy<Value = Case> {
    let big = if scale() >= 1.0 { 4097 } else { 1025 };
    let d_in = prop_oneof![
        Just(1usize),
        Just(2),
        Just(3),
        Just(15),
        Just(17),
        Just(127),
        1usize..300,
        Just(big)
    ];
    let width = prop_oneof![Just(1usize), Just(3), Just(17), 1usize..70];
    let ranks = prop_oneof![
        Just(vec![0usize, 1, 8, 16]),
        Just(vec![4, 8, 17, 33]),
        Just(vec![16]),
        Just(vec![1, 64, 0]),
        Just(vec![2, 3, 128]),
    ];
    let pop = prop_oneof![
        Just(Popularity::Same),
        Just(Popularity::Distinct),
        Just(Popularity::Uniform),
        Just(Popularity::Zipf)
    ];
    (
        d_in,
        prop::collection::vec(width, 1..4),
        1usize..7,
        ranks,
        prop_oneof![Just(1usize), 1usize..max_tokens],
        pop,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(d_in, widths, n_adapters, ranks, tokens, pop, seed, add)| Case {
                d_in,
                widths,
                n_adapters,
                ranks,
                tokens,
                pop,
                seed,
                add,
            },
        )
}

pub fn scenario<TW: Float>(c: &Case, none_fraction: f64) -> Scenario {
    let mut r = rng(c.seed);
    let ids = random_ids(&mut r, c.tokens, c.n_adapters, c.pop, none_fraction);
    Scenario::random::<TW>(&mut r, c.d_in, &c.widths, c.n_adapters, &c.ranks, ids)
}

pub fn mode(add: bool) -> ExpandMode {
    if add {
        ExpandMode::Add
    } else {
        ExpandMode::Overwrite
    }
}
