//! BGMV decode: shrink then expand for one token per sequence, each token with its own adapter.
//!
//! GPU: Llama-3-8B's fused qkv (4096 → 4096/1024/1024), rank 16, a pool of 1000 resident adapters
//! (590 MB), batches of 1–256 tokens with adapters identical / distinct / zipf(1.5) (a fresh
//! mapping per rotating set, so launches do not find their adapters in L2); mixed ranks
//! (8/16/32/64 over 256 adapters) at 64 distinct tokens. Each `lora/…` case (shrink + expand, add
//! mode) is compared with the two cuBLAS baselines (`common/serving.rs`); shrink and expand are
//! also timed alone for distinct adapters. Bytes = the distinct adapters' weights once +
//! activations: memory-bound, so the figure to watch is % of the copy bandwidth (target ≥ 85 %).
//!
//! cpu / emu: 16 adapters on 256 → 256/64/64, 4 tokens.

use criterion::Criterion;
use lora_kernels::adapter::ExpandMode;
use lora_kernels::bgmv::Bgmv;
use lora_kernels::{Backend, Cpu, Emu};

use crate::common::serving::{id_sets, lora_cases, Pool, Pop, Sets, Work};
use crate::common::{Case, Compute, Ctx};

struct Shape {
    d_in: usize,
    widths: &'static [usize],
    n_adapters: usize,
    batches: &'static [usize],
    mixed: (usize, &'static [usize], usize),
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU: Shape = Shape {
    d_in: 4096,
    widths: &[4096, 1024, 1024],
    n_adapters: 1000,
    batches: &[1, 16, 64, 256],
    mixed: (256, &[8, 16, 32, 64], 64),
};

const HOST: Shape = Shape {
    d_in: 256,
    widths: &[256, 64, 64],
    n_adapters: 16,
    batches: &[4],
    mixed: (8, &[4, 8, 16], 4),
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
    ctx.say_no_gpu("bgmv");
}

fn on<B: Backend>(c: &mut Criterion, ctx: &Ctx, b: &B, sh: &Shape) {
    let mut grp = ctx.group(c, format!("bgmv/{}", b.name()));
    let tag = |t: usize, pop: Pop| format!("qkv_r16_t{t}_{}", pop.name());
    let mut names = Vec::new();
    for &t in sh.batches {
        for pop in Pop::ALL {
            for what in ["lora", "cublas_loop", "gather_bmm", "shrink", "expand"] {
                names.push(format!("{what}/{}", tag(t, pop)));
            }
        }
    }
    if names.iter().any(|n| grp.selected(n)) {
        let pool = Pool::new(b, sh.d_in, sh.widths, vec![16; sh.n_adapters]).expect("adapter pool");
        let table = pool.table(b).expect("adapter table");
        let w = pool.out_width();
        for &t in sh.batches {
            for pop in Pop::ALL {
                let tg = tag(t, pop);
                let mine: Vec<&String> = names
                    .iter()
                    .filter(|n| n.ends_with(&format!("/{tg}")))
                    .collect();
                if !mine.iter().any(|n| grp.selected(n)) {
                    continue;
                }
                // Working set of one set: estimated from a draw, then as many sets as L2 needs.
                let probe = id_sets(pop, t, 1, pool.n(), 1, 7);
                let n_sets = ctx.sets(b, pool.work(&probe[0], Work::Lora).0);
                let mut sets = Sets::new(b, &pool, id_sets(pop, t, 1, pool.n(), n_sets, 7), 3)
                    .expect("inputs");
                lora_cases(
                    &mut grp,
                    b,
                    &pool,
                    &mut sets,
                    &tg,
                    Compute::Fma,
                    |b, sets, s| {
                        let bg = Bgmv::new(b, &table, &sets.ids[s], t)?;
                        bg.shrink(b, &sets.x[s], pool.d_in, &mut sets.u[s], None)?;
                        bg.expand(b, &sets.u[s], &mut sets.out[s], w, ExpandMode::Add, None)?;
                        Ok(())
                    },
                );
                if pop == Pop::Distinct {
                    let (bytes, flops) = sets.work(&pool, Work::Shrink);
                    grp.run(
                        b,
                        &format!("shrink/{tg}"),
                        &Case::bytes(bytes).flops(flops, Compute::Fma),
                        n_sets,
                        |s| {
                            Bgmv::new(b, &table, &sets.ids[s], t)?.shrink(
                                b,
                                &sets.x[s],
                                pool.d_in,
                                &mut sets.u[s],
                                None,
                            )?;
                            Ok(())
                        },
                    );
                    let (bytes, flops) = sets.work(&pool, Work::Expand);
                    grp.run(
                        b,
                        &format!("expand/{tg}"),
                        &Case::bytes(bytes).flops(flops, Compute::Fma),
                        n_sets,
                        |s| {
                            Bgmv::new(b, &table, &sets.ids[s], t)?.expand(
                                b,
                                &sets.u[s],
                                &mut sets.out[s],
                                w,
                                ExpandMode::Add,
                                None,
                            )?;
                            Ok(())
                        },
                    );
                }
            }
        }
    }

    // Mixed ranks: one launch over the table's ranks (no padding work).
    let (n_mixed, ranks, t) = sh.mixed;
    let tg = format!("qkv_mixed_ranks_t{t}_distinct");
    let mixed_names = ["lora", "cublas_loop", "gather_bmm"].map(|w| format!("{w}/{tg}"));
    if mixed_names.iter().any(|n| grp.selected(n)) {
        let pool = Pool::new(
            b,
            sh.d_in,
            sh.widths,
            (0..n_mixed).map(|i| ranks[i % ranks.len()]).collect(),
        )
        .expect("adapter pool");
        let table = pool.table(b).expect("adapter table");
        let w = pool.out_width();
        let probe = id_sets(Pop::Distinct, t, 1, pool.n(), 1, 9);
        let n_sets = ctx.sets(b, pool.work(&probe[0], Work::Lora).0);
        let mut sets = Sets::new(
            b,
            &pool,
            id_sets(Pop::Distinct, t, 1, pool.n(), n_sets, 9),
            5,
        )
        .expect("inputs");
        lora_cases(
            &mut grp,
            b,
            &pool,
            &mut sets,
            &tg,
            Compute::Fma,
            |b, sets, s| {
                let bg = Bgmv::new(b, &table, &sets.ids[s], t)?;
                bg.shrink(b, &sets.x[s], pool.d_in, &mut sets.u[s], None)?;
                bg.expand(b, &sets.u[s], &mut sets.out[s], w, ExpandMode::Add, None)?;
                Ok(())
            },
        );
    }
    grp.finish();
}
