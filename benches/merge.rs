//! In-place merge and unmerge of `scale·B·A` into W (default mode: f32 FMA chain over the rank,
//! one rounding). Memory-bound: W is read and written once (bytes = 2·|W| + |A| + |B|; target on
//! the H200 ≥ 85 % of the copy bandwidth); FLOPs 2·d_out·d_in·r on the FMA roofline.
//!
//! GPU: Llama q_proj (4096 × 4096, f16) at ranks 16 and 64, Llama-3-8B gate_proj (14336 × 4096,
//! bf16) at rank 16. cpu / emu: 256 × 256, rank 16.

use criterion::Criterion;
#[cfg(feature = "cuda")]
use lora_kernels::bf16;
use lora_kernels::merge::{merge, unmerge, Lora, MergeFloat, MergeShape};
use lora_kernels::{f16, Backend, Cpu, Emu, Float};

use crate::common::{replicas, Case, Compute, Ctx};

pub fn bench(c: &mut Criterion, ctx: &Ctx) {
    if ctx.host {
        on::<Cpu, f16>(c, ctx, &Cpu, 256, 256, 16, "w");
        on::<Emu, f16>(c, ctx, &Emu, 256, 256, 16, "w");
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &ctx.gpu {
        on::<_, f16>(c, ctx, &g.dev, 4096, 4096, 16, "q_proj");
        on::<_, f16>(c, ctx, &g.dev, 4096, 4096, 64, "q_proj");
        on::<_, bf16>(c, ctx, &g.dev, 14336, 4096, 16, "gate_proj");
    }
    ctx.say_no_gpu("merge");
}

#[allow(clippy::too_many_arguments)]
fn on<B: Backend, T: MergeFloat + Float>(
    c: &mut Criterion,
    ctx: &Ctx,
    b: &B,
    d_out: usize,
    d_in: usize,
    rank: usize,
    what: &str,
) {
    let mut grp = ctx.group(c, format!("merge/{}", b.name()));
    let tag = format!("{}_{what}_{d_out}x{d_in}_r{rank}", T::DTYPE.name());
    let names = [format!("merge/{tag}"), format!("unmerge/{tag}")];
    if names.iter().any(|n| grp.selected(n)) {
        let shape = MergeShape::new(d_out, d_in);
        let bytes = ((2 * d_out * d_in + rank * (d_in + d_out)) * T::DTYPE.size_bytes()) as u64;
        let n = ctx.sets(b, bytes);
        let mut w = replicas::<B, T>(b, n, d_out * d_in, 1, 0.02).expect("W");
        let a = replicas::<B, T>(b, n, rank * d_in, 2, 0.01).expect("A");
        let bm = replicas::<B, T>(b, n, d_out * rank, 3, 0.01).expect("B");
        let case = Case::bytes(bytes).flops((2 * d_out * d_in * rank) as u64, Compute::Fma);
        grp.run(b, &names[0], &case, n, |i| {
            merge(
                b,
                &mut w[i],
                &shape,
                &Lora::packed(&a[i], &bm[i], rank, d_in, 2.0),
            )?;
            Ok(())
        });
        grp.run(b, &names[1], &case, n, |i| {
            unmerge(
                b,
                &mut w[i],
                &shape,
                &Lora::packed(&a[i], &bm[i], rank, d_in, 2.0),
            )?;
            Ok(())
        });
    }
    grp.finish();
}
