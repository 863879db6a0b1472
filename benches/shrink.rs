//! Dense shrink `u = x · Aᵀ` (one adapter, f16 x and A, f32 u): the building block of a LoRA
//! layer's forward in training. Bytes = x + A + u (the minimum a shrink must touch), FLOPs =
//! 2·T·d·r on the CUDA-core FMA roofline; memory-bound at every shape here (target ≥ 80 % of the
//! roofline).
//!
//! GPU: d_in 4096 (Llama attention input) and 14336 (Llama-3-8B down_proj input), ranks 16–128,
//! 1–8192 tokens. cpu / emu: d_in 4096, 1 and 16 tokens.

use criterion::Criterion;
use lora_kernels::shrink::{shrink_dense, ShrinkDense};
use lora_kernels::{f16, Backend, Cpu, Emu};

use crate::common::{replicas, zeroed, Case, Compute, Ctx};

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GPU: &[(usize, usize, usize)] = &[
    (1, 4096, 16),
    (16, 4096, 16),
    (256, 4096, 16),
    (256, 4096, 64),
    (4096, 4096, 16),
    (4096, 14336, 16),
    (8192, 4096, 128),
];
const HOST: &[(usize, usize, usize)] = &[(1, 4096, 16), (16, 4096, 16)];

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    if ctx.host {
        on(c, ctx, &Cpu, HOST);
        on(c, ctx, &Emu, HOST);
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &ctx.gpu {
        on(c, ctx, &g.dev, GPU);
    }
    ctx.say_no_gpu("shrink");
}

/// Bytes a dense shrink moves at least.
pub fn bytes(t: usize, d: usize, r: usize) -> u64 {
    ((t * d + r * d) * 2 + t * r * 4) as u64
}

fn on<B: Backend>(c: &mut Criterion, ctx: &Ctx, b: &B, shapes: &[(usize, usize, usize)]) {
    let mut grp = ctx.group(c, format!("shrink/{}", b.name()));
    for &(t, d, r) in shapes {
        let name = format!("dense_f16/t{t}_d{d}_r{r}");
        if !grp.selected(&name) {
            continue;
        }
        let s = ShrinkDense::new(t, d, r);
        let by = bytes(t, d, r);
        let n = ctx.sets(b, by);
        let x = replicas::<B, f16>(b, n, t * d, 1, 1.0).expect("x");
        let a = replicas::<B, f16>(b, n, r * d, 2, 0.01).expect("A");
        let mut u = zeroed::<B, f32>(b, n, t * r).expect("u");
        let case = Case::bytes(by).flops((2 * t * d * r) as u64, Compute::Fma);
        grp.run(b, &name, &case, n, |i| {
            shrink_dense(b, &x[i], &a[i], &mut u[i], &s)?;
            Ok(())
        });
    }
    grp.finish();
}
