//! Fused Philox dropout: the training shrink `u = drop(x) · Aᵀ` (mask regenerated while loading x,
//! no mask and no x̂ stored) against the plain shrink at the same shape — the overhead of the RNG
//! (target on the GPU: ≤ 5 %) — and the standalone dropout forward/backward (bytes = x + y).
//! The SGMV form (per-slice streams) is in `sgmv.rs` (`shrink_dropout_p0.1/…`).
//!
//! GPU: d_in 4096, rank 16, 256–8192 tokens. cpu / emu: 8 tokens, d_in 1024.

use criterion::Criterion;
use lora_kernels::dropout::{
    dropout_backward, dropout_forward, shrink_dense_dropout, Dropout, DropoutShape,
};
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{f16, Backend, Cpu, Emu};

use crate::common::{replicas, zeroed, Case, Compute, Ctx};

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU: &[(usize, usize, usize)] = &[(256, 4096, 16), (4096, 4096, 16), (8192, 4096, 16)];
const HOST: &[(usize, usize, usize)] = &[(8, 1024, 16)];

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    if ctx.host {
        on(c, ctx, &Cpu, HOST);
        on(c, ctx, &Emu, HOST);
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &ctx.gpu {
        on(c, ctx, &g.dev, GPU);
    }
    ctx.say_no_gpu("dropout");
}

fn on<B: Backend>(c: &mut Criterion, ctx: &Ctx, b: &B, shapes: &[(usize, usize, usize)]) {
    let mut grp = ctx.group(c, format!("dropout/{}", b.name()));
    let drop = Dropout::new(0.1, 42, 7).expect("p = 0.1");
    for &(t, d, r) in shapes {
        let tag = format!("t{t}_d{d}_r{r}");
        let names = [
            "shrink_plain",
            "shrink_fused_p0.1",
            "forward_p0.1",
            "backward_p0.1",
        ]
        .map(|n| format!("{n}/{tag}"));
        if !names.iter().any(|n| grp.selected(n)) {
            continue;
        }
        let s = ShrinkDense::new(t, d, r);
        let by = crate::shrink::bytes(t, d, r);
        let n = ctx.sets(b, by);
        let x = replicas::<B, f16>(b, n, t * d, 1, 1.0).expect("x");
        let a = replicas::<B, f16>(b, n, r * d, 2, 0.01).expect("A");
        let mut u = zeroed::<B, f32>(b, n, t * r).expect("u");
        let case = Case::bytes(by).flops((2 * t * d * r) as u64, Compute::Fma);
        grp.run(b, &names[0], &case, n, |i| {
            shrink_dense(b, &x[i], &a[i], &mut u[i], &s)?;
            Ok(())
        });
        let fused = case.clone().vs(
            grp.id(&names[0]),
            "fused dropout (p = 0.1) over the plain shrink",
            "overhead",
        );
        grp.run(b, &names[1], &fused, n, |i| {
            shrink_dense_dropout(b, &drop, &x[i], &a[i], &mut u[i], &s, 0)?;
            Ok(())
        });
        drop_standalone(&mut grp, ctx, b, &names[2..], t, d, &drop);
    }
    grp.finish();
}

fn drop_standalone<B: Backend>(
    grp: &mut crate::common::Group<'_, '_>,
    ctx: &Ctx,
    b: &B,
    names: &[String],
    t: usize,
    d: usize,
    drop: &Dropout,
) {
    if !names.iter().any(|n| grp.selected(n)) {
        return;
    }
    let by = (2 * t * d * 2) as u64;
    let n = ctx.sets(b, by);
    let x = replicas::<B, f16>(b, n, t * d, 5, 1.0).expect("x");
    let mut y = zeroed::<B, f16>(b, n, t * d).expect("y");
    let shape = DropoutShape::new(t, d);
    grp.run(b, &names[0], &Case::bytes(by), n, |i| {
        dropout_forward(b, drop, &x[i], &mut y[i], &shape)?;
        Ok(())
    });
    grp.run(b, &names[1], &Case::bytes(by), n, |i| {
        dropout_backward(b, drop, &x[i], &mut y[i], &shape)?;
        Ok(())
    });
}
