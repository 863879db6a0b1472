//! SGMV prefill: the device planner, then segment GEMMs (tensor cores for f16) for shrink and
//! expand.
//!
//! GPU: Llama-3-8B's fused qkv (4096 → 4096/1024/1024), rank 16, a pool of 1000 resident adapters,
//! 512–8192 tokens in 16 requests (each request's tokens contiguous, as an engine packs a prefill
//! batch) with adapters identical / distinct / zipf(1.5); mixed ranks (8/16/32/64) at 2048 tokens.
//! `lora/…` (shrink + expand over a plan made beforehand: one plan serves every layer of a step) is
//! compared with the two cuBLAS baselines (`common/serving.rs`); the planner, shrink and expand
//! alone, and the training shrink with fused dropout (p = 0.1, per-slice Philox streams; overhead vs
//! the plain shrink, target ≤ 5 %) are timed for distinct adapters. Bytes = the distinct adapters'
//! weights once + activations; FLOPs on the f16 tensor-core roofline.
//!
//! cpu / emu: 16 adapters on 256 → 256/64/64, 64 tokens in 4 requests.

use criterion::Criterion;
use lora_kernels::adapter::ExpandMode;
use lora_kernels::dropout::LayerDropout;
use lora_kernels::sgmv::{Sgmv, SgmvPlan};
use lora_kernels::{f16, Backend, Cpu, Emu};

use crate::common::serving::{id_sets, lora_cases, Pool, Pop, Sets, Work};
use crate::common::{BenchResult, Case, Compute, Ctx, Per};

struct Shape {
    d_in: usize,
    widths: &'static [usize],
    n_adapters: usize,
    sizes: &'static [usize],
    requests: usize,
    mixed: (usize, &'static [usize], usize),
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU: Shape = Shape {
    d_in: 4096,
    widths: &[4096, 1024, 1024],
    n_adapters: 1000,
    sizes: &[512, 2048, 8192],
    requests: 16,
    mixed: (256, &[8, 16, 32, 64], 2048),
};

const HOST: Shape = Shape {
    d_in: 256,
    widths: &[256, 64, 64],
    n_adapters: 16,
    sizes: &[64],
    requests: 4,
    mixed: (8, &[4, 8, 16], 64),
};

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    if ctx.host {
        on(c, ctx, &Cpu, &HOST);
        on(c, ctx, &Emu, &HOST);
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &ctx.gpu {
        on(c, ctx, &g.dev, &GPU);
    }
    ctx.say_no_gpu("sgmv");
}

/// One plan per rotating set, and a workspace for shrink and expand.
struct Plans<B: Backend> {
    plans: Vec<SgmvPlan<B>>,
    plan_ws: B::Buffer<u8>,
    ws: B::Buffer<u8>,
}

fn plans<B: Backend>(
    b: &B,
    pool: &Pool<B>,
    sets: &Sets<B>,
    table: &lora_kernels::adapter::AdapterTable<'_, B>,
) -> lora_kernels::Result<Plans<B>> {
    let t = sets.tokens;
    let n = pool.n();
    let mut plans = Vec::new();
    let mut plan_ws = b.alloc::<u8>(1)?;
    for ids in &sets.ids {
        let mut p = SgmvPlan::alloc(b, t, t.min(n))?;
        let need = p.plan_workspace_bytes(b, ids, n).max(1);
        if b.len(&plan_ws) < need {
            plan_ws = b.alloc::<u8>(need)?;
        }
        p.plan(b, ids, n, &mut plan_ws, None)?;
        plans.push(p);
    }
    let s = Sgmv::new(table, &plans[0]);
    let ws = b.alloc::<u8>(
        s.shrink_workspace_bytes::<f16>(b, pool.d_in)
            .max(s.expand_workspace_bytes::<f16>(b, pool.out_width(), ExpandMode::Add))
            .max(1),
    )?;
    Ok(Plans { plans, plan_ws, ws })
}

fn on<B: Backend>(c: &mut Criterion, ctx: &Ctx, b: &B, sh: &Shape) {
    let mut grp = ctx.group(c, format!("sgmv/{}", b.name()));
    let tag = |t: usize, pop: Pop| format!("qkv_r16_t{t}_{}", pop.name());
    let whats = [
        "lora",
        "cublas_loop",
        "gather_bmm",
        "plan",
        "shrink",
        "expand",
        "shrink_dropout_p0.1",
    ];
    let mut names = Vec::new();
    for &t in sh.sizes {
        for pop in Pop::ALL {
            for what in whats {
                names.push(format!("{what}/{}", tag(t, pop)));
            }
        }
    }
    if names.iter().any(|n| grp.selected(n)) {
        let pool = Pool::new(b, sh.d_in, sh.widths, vec![16; sh.n_adapters]).expect("adapter pool");
        let table = pool.table(b).expect("adapter table");
        let w = pool.out_width();
        for &t in sh.sizes {
            let req = t / sh.requests;
            for pop in Pop::ALL {
                let tg = tag(t, pop);
                if !whats
                    .iter()
                    .any(|what| grp.selected(&format!("{what}/{tg}")))
                {
                    continue;
                }
                let probe = id_sets(pop, t, req, pool.n(), 1, 17);
                let n_sets = ctx.sets(b, pool.work(&probe[0], Work::Lora).0);
                let mut sets = Sets::new(b, &pool, id_sets(pop, t, req, pool.n(), n_sets, 17), 23)
                    .expect("inputs");
                let mut pl = match plans(b, &pool, &sets, &table) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("{}: skipped: {e}", grp.id(&tg));
                        continue;
                    }
                };
                lora_cases(
                    &mut grp,
                    b,
                    &pool,
                    &mut sets,
                    &tg,
                    Compute::TensorF16,
                    |b, sets, s| {
                        let sg = Sgmv::new(&table, &pl.plans[s]);
                        sg.shrink(b, &sets.x[s], pool.d_in, &mut sets.u[s], &mut pl.ws, None)?;
                        sg.expand(
                            b,
                            &sets.u[s],
                            &mut sets.out[s],
                            w,
                            ExpandMode::Add,
                            &mut pl.ws,
                            None,
                        )?;
                        Ok(())
                    },
                );
                if pop != Pop::Distinct {
                    continue;
                }
                let n_ad = pool.n();
                let plan_case = Case::bytes((t * 4 * 3) as u64)
                    .per(Per::Elements(t as u64))
                    .note("ids read; row_index, segments written");
                grp.run(
                    b,
                    &format!("plan/{tg}"),
                    &plan_case,
                    n_sets,
                    |s| -> BenchResult {
                        pl.plans[s].plan(b, &sets.ids[s], n_ad, &mut pl.plan_ws, None)?;
                        Ok(())
                    },
                );
                let (bytes, flops) = sets.work(&pool, Work::Shrink);
                let shrink_id = grp.id(&format!("shrink/{tg}"));
                grp.run(
                    b,
                    &format!("shrink/{tg}"),
                    &Case::bytes(bytes).flops(flops, Compute::TensorF16),
                    n_sets,
                    |s| {
                        Sgmv::new(&table, &pl.plans[s]).shrink(
                            b,
                            &sets.x[s],
                            pool.d_in,
                            &mut sets.u[s],
                            &mut pl.ws,
                            None,
                        )?;
                        Ok(())
                    },
                );
                let mut drop = LayerDropout::NONE;
                drop.p = 0.1;
                drop.seed = 1234;
                for (s, o) in drop.offsets.iter_mut().enumerate() {
                    *o = s as u64;
                }
                let case = Case::bytes(bytes).flops(flops, Compute::TensorF16).vs(
                    shrink_id,
                    "fused dropout (p = 0.1) over the plain shrink",
                    "overhead",
                );
                grp.run(
                    b,
                    &format!("shrink_dropout_p0.1/{tg}"),
                    &case,
                    n_sets,
                    |s| {
                        Sgmv::new(&table, &pl.plans[s]).shrink_with_dropout(
                            b,
                            &sets.x[s],
                            pool.d_in,
                            &drop,
                            &mut sets.u[s],
                            &mut pl.ws,
                            None,
                        )?;
                        Ok(())
                    },
                );
                let (bytes, flops) = sets.work(&pool, Work::Expand);
                grp.run(
                    b,
                    &format!("expand/{tg}"),
                    &Case::bytes(bytes).flops(flops, Compute::TensorF16),
                    n_sets,
                    |s| {
                        Sgmv::new(&table, &pl.plans[s]).expand(
                            b,
                            &sets.u[s],
                            &mut sets.out[s],
                            w,
                            ExpandMode::Add,
                            &mut pl.ws,
                            None,
                        )?;
                        Ok(())
                    },
                );
            }
        }
    }

    let (n_mixed, ranks, t) = sh.mixed;
    let tg = format!("qkv_mixed_ranks_t{t}_distinct");
    if ["lora", "cublas_loop", "gather_bmm"]
        .iter()
        .any(|w| grp.selected(&format!("{w}/{tg}")))
    {
        let pool = Pool::new(
            b,
            sh.d_in,
            sh.widths,
            (0..n_mixed).map(|i| ranks[i % ranks.len()]).collect(),
        )
        .expect("adapter pool");
        let table = pool.table(b).expect("adapter table");
        let w = pool.out_width();
        let req = t / sh.requests;
        let probe = id_sets(Pop::Distinct, t, req, pool.n(), 1, 19);
        let n_sets = ctx.sets(b, pool.work(&probe[0], Work::Lora).0);
        let mut sets = Sets::new(
            b,
            &pool,
            id_sets(Pop::Distinct, t, req, pool.n(), n_sets, 19),
            29,
        )
        .expect("inputs");
        match plans(b, &pool, &sets, &table) {
            Ok(mut pl) => lora_cases(
                &mut grp,
                b,
                &pool,
                &mut sets,
                &tg,
                Compute::TensorF16,
                |b, sets, s| {
                    let sg = Sgmv::new(&table, &pl.plans[s]);
                    sg.shrink(b, &sets.x[s], pool.d_in, &mut sets.u[s], &mut pl.ws, None)?;
                    sg.expand(
                        b,
                        &sets.u[s],
                        &mut sets.out[s],
                        w,
                        ExpandMode::Add,
                        &mut pl.ws,
                        None,
                    )?;
                    Ok(())
                },
            ),
            Err(e) => eprintln!("{}: skipped: {e}", grp.id(&tg)),
        }
    }
    grp.finish();
}
