//! Multi-adapter serving cases shared by `bgmv.rs` and `sgmv.rs`: a pool of adapters on one
//! Llama-shaped layer (e.g. Llama-3-8B's fused qkv, 4096 → 4096/1024/1024), token → adapter ids by
//! popularity (DESIGN.md §6: identical / distinct / zipf(1.5)), rotating input sets, the minimum
//! bytes and FLOPs of a launch, and — on the GPU — the two baselines a user would otherwise run:
//!
//! - **cuBLAS per adapter** (`cublas_loop`): for each run of equal adapter ids in token order (a
//!   prefill request, or consecutive decode tokens), one cuBLAS shrink GEMM (the slices' A stacked,
//!   `[n_slices·r, d_in]`; per slice when ranks differ) into an f16 u, then one expand GEMM per slice
//!   (`beta = 1`) into the output columns. No gather; eager host loop (or a graph when our case was
//!   timed by graph replays).
//! - **gather + strided-batched** (`gather_bmm`): the tokens of each adapter present gathered into a
//!   zero-padded `[adapters, max tokens, d_in]` block, the adapters' A and B gathered into stacks
//!   (PyTorch's `A[idx]`), one strided-batched shrink, one strided-batched expand per slice, and an
//!   f16 scatter-add of the rows back (`index_add_`). Mixed ranks are padded to the largest (as vLLM
//!   pads to `max_lora_rank`). The gather/scatter kernels are bench-only PTX (`benches/baseline/`);
//!   the index arrays are prepared on the host before timing (as our SGMV plan is timed separately).
//!
//! The weights are one stacked allocation: A `[n, n_slices, r_max, d_in]` and per slice B
//! `[n, n_s, r_max]` (rows/columns beyond an adapter's rank are zero); our adapter table points
//! into them (`set_raw`: a stacked tensor is a table whose pointers advance by a stride), so ours
//! and the baselines read the same bytes.

use lora_kernels::adapter::{AdapterTable, AdapterTableBuilder, Slice};
use lora_kernels::ffi::sys;
use lora_kernels::{f16, Backend, DType};

use super::{vals, BenchResult, Case, Compute, Group, Rng};

/// Token → adapter popularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pop {
    /// Every token the same adapter.
    Identical,
    /// Every request its own adapter.
    Distinct,
    /// Requests draw adapters with p(rank k) ∝ k^−1.5.
    Zipf,
}

impl Pop {
    pub const ALL: [Pop; 3] = [Pop::Identical, Pop::Distinct, Pop::Zipf];
    pub fn name(self) -> &'static str {
        match self {
            Pop::Identical => "identical",
            Pop::Distinct => "distinct",
            Pop::Zipf => "zipf1.5",
        }
    }
}

/// `n` adapters on one layer, stacked (see the module docs).
pub struct Pool<B: Backend> {
    pub d_in: usize,
    pub slices: Vec<Slice>,
    /// Rank of each adapter (every slice alike).
    pub ranks: Vec<usize>,
    pub r_max: usize,
    pub scale: f32,
    /// A `[n, n_slices, r_max, d_in]`.
    pub a: B::Buffer<f16>,
    /// Per slice, B `[n, n_s, r_max]`.
    pub b: Vec<B::Buffer<f16>>,
}

impl<B: Backend> Pool<B> {
    /// `ranks.len()` adapters on `d_in → widths` (one slice per width), values ~ U(±0.01) (small, so
    /// that an output accumulated over a whole measurement stays finite in f16).
    pub fn new(
        b: &B,
        d_in: usize,
        widths: &[usize],
        ranks: Vec<usize>,
    ) -> lora_kernels::Result<Self> {
        let mut off = 0;
        let slices: Vec<Slice> = widths
            .iter()
            .map(|&n| {
                let s = Slice { n, offset: off };
                off += n;
                s
            })
            .collect();
        let r_max = *ranks.iter().max().expect("at least one adapter");
        let n = ranks.len();
        let ns = slices.len();
        let mut a = vals::<f16>(n * ns * r_max * d_in, 11, 0.01);
        let mut bs: Vec<Vec<f16>> = slices
            .iter()
            .enumerate()
            .map(|(s, sl)| vals::<f16>(n * sl.n * r_max, 12 + s as u64, 0.01))
            .collect();
        // Zero what lies beyond each adapter's rank (the padded baseline then computes exactly).
        for (i, &r) in ranks.iter().enumerate() {
            if r == r_max {
                continue;
            }
            for s in 0..ns {
                let base = (i * ns + s) * r_max * d_in;
                a[base + r * d_in..base + r_max * d_in].fill(f16::ZERO);
            }
            for (s, sl) in slices.iter().enumerate() {
                for row in 0..sl.n {
                    let base = (i * sl.n + row) * r_max;
                    bs[s][base + r..base + r_max].fill(f16::ZERO);
                }
            }
        }
        Ok(Pool {
            d_in,
            slices,
            ranks,
            r_max,
            scale: 2.0,
            a: b.upload(&a)?,
            b: bs
                .iter()
                .map(|v| b.upload(v))
                .collect::<lora_kernels::Result<_>>()?,
        })
    }

    pub fn n(&self) -> usize {
        self.ranks.len()
    }

    pub fn out_width(&self) -> usize {
        self.slices.iter().map(|s| s.n).sum()
    }

    /// The adapter table over the stacked weights.
    pub fn table(&self, b: &B) -> lora_kernels::Result<AdapterTable<'_, B>> {
        let ns = self.slices.len();
        let mut t = AdapterTableBuilder::<B>::new(self.n(), self.d_in, &self.slices, DType::F16)?;
        let a0 = b.raw_ptr(&self.a).cast::<u8>();
        for (i, &r) in self.ranks.iter().enumerate() {
            for (s, sl) in self.slices.iter().enumerate() {
                let b0 = b.raw_ptr(&self.b[s]).cast::<u8>();
                let entry = sys::LkAdapterEntry {
                    a: a0
                        .wrapping_add((i * ns + s) * self.r_max * self.d_in * 2)
                        .cast(),
                    b: b0.wrapping_add(i * sl.n * self.r_max * 2).cast(),
                    lda: self.d_in as i64,
                    ldb: self.r_max as i64,
                    rank: r as i32,
                    scale: self.scale,
                };
                // SAFETY: the entry points into this pool's live stacked buffers: A rows
                // [rank, d_in] at stride d_in and B [n_s, rank] at stride r_max, f16, of the
                // backend that owns them; the table borrows the pool.
                unsafe { t.set_raw(i, s, entry) };
            }
        }
        t.r_cap(self.r_max)?;
        t.build(b)
    }

    /// Minimum bytes and FLOPs of a launch over `ids`: the distinct adapters' weights once (at their
    /// ranks), x read, u written/read (shrink/expand alone), out read and written (add mode).
    pub fn work(&self, ids: &[i32], what: Work) -> (u64, u64) {
        let (d, w, ns) = (
            self.d_in as u64,
            self.out_width() as u64,
            self.slices.len() as u64,
        );
        let mut seen = vec![false; self.n()];
        let (mut weights_a, mut weights_b, mut u, mut fl_s, mut fl_e, mut t) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for &id in ids {
            if id < 0 {
                continue;
            }
            t += 1;
            let r = self.ranks[id as usize] as u64;
            u += ns * r * 4;
            fl_s += 2 * ns * r * d;
            fl_e += 2 * r * w;
            if !seen[id as usize] {
                seen[id as usize] = true;
                weights_a += ns * r * d * 2;
                weights_b += w * r * 2;
            }
        }
        let (x, out) = (t * d * 2, 2 * t * w * 2);
        match what {
            Work::Shrink => (weights_a + x + u, fl_s),
            Work::Expand => (weights_b + u + out, fl_e),
            Work::Lora => (weights_a + weights_b + x + out, fl_s + fl_e),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    Shrink,
    Expand,
    /// Shrink then expand (u need not reach memory in the minimum).
    Lora,
}

/// Adapter ids of `tokens` tokens in requests of `req_len` tokens (1 = decode), drawn from `n`
/// adapters by `pop`; a fresh random mapping per call so that rotating sets use other adapters.
pub fn draw_ids(pop: Pop, tokens: usize, req_len: usize, n: usize, rng: &mut Rng) -> Vec<i32> {
    let reqs = tokens.div_ceil(req_len.max(1));
    let mut perm: Vec<i32> = (0..n as i32).collect();
    rng.shuffle(&mut perm);
    let zipf_cdf: Vec<f64> = {
        let mut acc = 0.0;
        let w: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-1.5)).collect();
        let total: f64 = w.iter().sum();
        w.iter()
            .map(|x| {
                acc += x / total;
                acc
            })
            .collect()
    };
    let per_req: Vec<i32> = (0..reqs)
        .map(|r| match pop {
            Pop::Identical => perm[0],
            Pop::Distinct => perm[r % n],
            Pop::Zipf => {
                let u = rng.unit();
                let k = zipf_cdf.partition_point(|&c| c < u).min(n - 1);
                perm[k]
            }
        })
        .collect();
    (0..tokens).map(|t| per_req[t / req_len.max(1)]).collect()
}

/// Rotating input sets of one case: ids, x, u and out per set.
pub struct Sets<B: Backend> {
    pub tokens: usize,
    pub host_ids: Vec<Vec<i32>>,
    pub ids: Vec<B::Buffer<i32>>,
    pub x: Vec<B::Buffer<f16>>,
    pub u: Vec<B::Buffer<f32>>,
    pub out: Vec<B::Buffer<f16>>,
}

impl<B: Backend> Sets<B> {
    pub fn new(
        b: &B,
        pool: &Pool<B>,
        host_ids: Vec<Vec<i32>>,
        seed: u64,
    ) -> lora_kernels::Result<Self> {
        let tokens = host_ids[0].len();
        let (d, w, ns) = (pool.d_in, pool.out_width(), pool.slices.len());
        let mut s = Sets {
            tokens,
            host_ids: Vec::new(),
            ids: Vec::new(),
            x: Vec::new(),
            u: Vec::new(),
            out: Vec::new(),
        };
        for (i, ids) in host_ids.into_iter().enumerate() {
            s.ids.push(b.upload(&ids)?);
            s.x.push(b.upload(&vals::<f16>(tokens * d, seed + i as u64, 1.0))?);
            s.u.push(b.alloc::<f32>(ns * tokens * pool.r_max)?);
            s.out.push(b.alloc::<f16>(tokens * w)?);
            s.host_ids.push(ids);
        }
        Ok(s)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Mean minimum (bytes, FLOPs) over the sets.
    pub fn work(&self, pool: &Pool<B>, what: Work) -> (u64, u64) {
        let n = self.host_ids.len() as u64;
        let (b, f) = self
            .host_ids
            .iter()
            .map(|ids| pool.work(ids, what))
            .fold((0, 0), |a, w| (a.0 + w.0, a.1 + w.1));
        (b / n, f / n)
    }
}

/// `n_sets` id vectors (one per rotating set) for a case.
pub fn id_sets(
    pop: Pop,
    tokens: usize,
    req_len: usize,
    n: usize,
    n_sets: usize,
    seed: u64,
) -> Vec<Vec<i32>> {
    let mut rng = Rng::new(seed);
    (0..n_sets)
        .map(|_| draw_ids(pop, tokens, req_len, n, &mut rng))
        .collect()
}

/// Registers `lora/{tag}` (ours: shrink then expand, add mode) and, on the GPU, the two baselines
/// `cublas_loop/{tag}` and `gather_bmm/{tag}` — each first checked once against ours on set 0 from
/// a zeroed output (the relative difference is printed and recorded in the case's note).
#[allow(clippy::too_many_arguments)]
pub fn lora_cases<B: Backend>(
    grp: &mut Group<'_, '_>,
    b: &B,
    pool: &Pool<B>,
    sets: &mut Sets<B>,
    tag: &str,
    compute: Compute,
    mut ours: impl FnMut(&B, &mut Sets<B>, usize) -> BenchResult,
) {
    let (bytes, flops) = sets.work(pool, Work::Lora);
    let n_sets = sets.len();
    let case = Case::bytes(bytes).flops(flops, compute);
    grp.run(b, &format!("lora/{tag}"), &case, n_sets, |s| {
        ours(b, sets, s)
    });
    #[cfg(feature = "cuda")]
    if b.name() == "cuda" {
        let names = [format!("cublas_loop/{tag}"), format!("gather_bmm/{tag}")];
        if !names.iter().any(|n| grp.selected(n)) {
            return;
        }
        let Some(gpu) = grp.ctx.gpu.as_ref() else {
            return;
        };
        let ours_id = grp.id(&format!("lora/{tag}"));
        let base = match Baselines::new(b, pool, sets) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("{}: baselines skipped: {e}", grp.id(tag));
                return;
            }
        };
        let checks = [0, 1].map(|which| {
            check(b, pool, sets, &mut ours, |b, sets, out| {
                if which == 0 {
                    base.cublas_loop(b, gpu, pool, sets, out, 0)
                } else {
                    base.gather_bmm(b, gpu, pool, sets, out, 0)
                }
            })
        });
        let labels = [
            "cuBLAS GEMM per adapter run",
            "gather + cuBLAS strided-batched GEMM",
        ];
        for (which, name) in names.iter().enumerate() {
            let note = match &checks[which] {
                Ok(d) => format!("vs ours on set 0: max |diff| / max |ours| = {d:.1e}"),
                Err(e) => format!("check failed: {e}"),
            };
            eprintln!("  {}: {note}", grp.id(name));
            let case = Case::bytes(bytes)
                .flops(flops, compute)
                .vs(ours_id.clone(), labels[which], "baseline")
                .note(note);
            grp.run(b, name, &case, n_sets, |s| {
                let out = b.raw_ptr(&sets.out[s]) as u64;
                if which == 0 {
                    base.cublas_loop(b, gpu, pool, sets, out, s)
                } else {
                    base.gather_bmm(b, gpu, pool, sets, out, s)
                }
            });
        }
    }
}

/// Runs ours and `theirs` on set 0 from a zeroed output; returns max |diff| / max |ours|.
#[cfg(feature = "cuda")]
fn check<B: Backend>(
    b: &B,
    pool: &Pool<B>,
    sets: &mut Sets<B>,
    ours: &mut impl FnMut(&B, &mut Sets<B>, usize) -> BenchResult,
    theirs: impl FnOnce(&B, &Sets<B>, u64) -> BenchResult,
) -> Result<f64, Box<dyn std::error::Error>> {
    let zeros = vec![f16::ZERO; sets.tokens * pool.out_width()];
    b.write(&mut sets.out[0], &zeros)?;
    ours(b, sets, 0)?;
    let want = b.download(&sets.out[0])?;
    b.write(&mut sets.out[0], &zeros)?;
    let out = b.raw_ptr(&sets.out[0]) as u64;
    theirs(b, sets, out)?;
    let got = b.download(&sets.out[0])?;
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.to_f64().abs()));
    let diff = want
        .iter()
        .zip(&got)
        .fold(0.0f64, |m, (a, c)| m.max((a.to_f64() - c.to_f64()).abs()));
    if !diff.is_finite() {
        return Err("non-finite output".into());
    }
    Ok(diff / scale)
}

#[cfg(feature = "cuda")]
pub use baseline::Baselines;

#[cfg(feature = "cuda")]
mod baseline {
    use super::*;
    use crate::common::gpu::{Gpu, RowGemm};
    use crate::common::BenchResult;

    /// Per-set host-prepared metadata of both baselines.
    struct SetMeta<B: Backend> {
        /// (first token, tokens, adapter) of each run of equal ids.
        runs: Vec<(usize, usize, usize)>,
        /// Adapters present; rows per adapter in the padded layout.
        present: usize,
        max_len: usize,
        /// [present · max_len] source token of each padded row (−1 = padding).
        tok_idx: B::Buffer<i32>,
        /// [present] adapter of each batch entry.
        ad_idx: B::Buffer<i32>,
    }

    /// Scratch and metadata for the cuBLAS baselines of one case.
    pub struct Baselines<B: Backend> {
        meta: Vec<SetMeta<B>>,
        u16: B::Buffer<f16>,
        x_pad: B::Buffer<f16>,
        u_pad: B::Buffer<f16>,
        y_pad: B::Buffer<f16>,
        a_g: B::Buffer<f16>,
        b_g: Vec<B::Buffer<f16>>,
    }

    fn p<B: Backend, T: lora_kernels::Element>(b: &B, buf: &B::Buffer<T>) -> u64 {
        b.raw_ptr(buf) as u64
    }

    impl<B: Backend> Baselines<B> {
        pub fn new(b: &B, pool: &Pool<B>, sets: &Sets<B>) -> lora_kernels::Result<Self> {
            let (d, w, ns, rm) = (pool.d_in, pool.out_width(), pool.slices.len(), pool.r_max);
            let mut meta = Vec::new();
            let (mut max_rows, mut max_present) = (1, 1);
            for ids in &sets.host_ids {
                let mut runs = Vec::new();
                let mut t = 0;
                while t < ids.len() {
                    let mut e = t + 1;
                    while e < ids.len() && ids[e] == ids[t] {
                        e += 1;
                    }
                    if ids[t] >= 0 {
                        runs.push((t, e - t, ids[t] as usize));
                    }
                    t = e;
                }
                let mut order: Vec<usize> = Vec::new();
                let mut rows: Vec<Vec<i32>> = Vec::new();
                let mut slot = vec![usize::MAX; pool.n()];
                for (tok, &id) in ids.iter().enumerate() {
                    if id < 0 {
                        continue;
                    }
                    if slot[id as usize] == usize::MAX {
                        slot[id as usize] = order.len();
                        order.push(id as usize);
                        rows.push(Vec::new());
                    }
                    rows[slot[id as usize]].push(tok as i32);
                }
                let max_len = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
                let mut tok_idx = vec![-1i32; order.len().max(1) * max_len];
                for (i, r) in rows.iter().enumerate() {
                    tok_idx[i * max_len..i * max_len + r.len()].copy_from_slice(r);
                }
                let ad: Vec<i32> = if order.is_empty() {
                    vec![-1]
                } else {
                    order.iter().map(|&a| a as i32).collect()
                };
                max_rows = max_rows.max(order.len() * max_len);
                max_present = max_present.max(order.len());
                meta.push(SetMeta {
                    runs,
                    present: order.len(),
                    max_len,
                    tok_idx: b.upload(&tok_idx)?,
                    ad_idx: b.upload(&ad)?,
                });
            }
            Ok(Baselines {
                meta,
                u16: b.alloc(sets.tokens * ns * rm)?,
                x_pad: b.alloc(max_rows * d)?,
                u_pad: b.alloc(max_rows * ns * rm)?,
                y_pad: b.alloc(max_rows * w)?,
                a_g: b.alloc(max_present * ns * rm * d)?,
                b_g: pool
                    .slices
                    .iter()
                    .map(|s| b.alloc(max_present * s.n * rm))
                    .collect::<lora_kernels::Result<_>>()?,
            })
        }

        /// One cuBLAS shrink (+ one expand per slice) per run of equal ids, in token order.
        pub fn cublas_loop(
            &self,
            b: &B,
            gpu: &Gpu,
            pool: &Pool<B>,
            sets: &Sets<B>,
            out: u64,
            s: usize,
        ) -> BenchResult {
            let blas = gpu.blas.as_ref().ok_or("no cuBLAS")?;
            let (d, w, ns, rm) = (pool.d_in, pool.out_width(), pool.slices.len(), pool.r_max);
            let ld_u = ns * rm;
            let (x, a, u) = (p(b, &sets.x[s]), p(b, &pool.a), p(b, &self.u16));
            for &(start, len, ad) in &self.meta[s].runs {
                let r = pool.ranks[ad];
                let xs = x + (start * d * 2) as u64;
                let us = u + (start * ld_u * 2) as u64;
                let a_ad = a + (ad * ns * rm * d * 2) as u64;
                // SAFETY: every address below lies in the pool's stacked weights, this set's x, the
                // u16 scratch ([tokens, ld_u]) or the output rows [start, start + len).
                unsafe {
                    if r == rm {
                        let mut g = RowGemm::nt(DType::F16, len, ns * rm, d);
                        g.ldc = ld_u;
                        blas.gemm(&g, xs, a_ad, us)?;
                    } else {
                        for sl in 0..ns {
                            let mut g = RowGemm::nt(DType::F16, len, r, d);
                            g.ldc = ld_u;
                            blas.gemm(
                                &g,
                                xs,
                                a_ad + (sl * rm * d * 2) as u64,
                                us + (sl * rm * 2) as u64,
                            )?;
                        }
                    }
                    for (sl, slice) in pool.slices.iter().enumerate() {
                        let mut g = RowGemm::nt(DType::F16, len, slice.n, r);
                        g.lda = ld_u;
                        g.ldb = rm;
                        g.ldc = w;
                        g.alpha = pool.scale;
                        g.beta = 1.0;
                        let bs = p(b, &pool.b[sl]) + (ad * slice.n * rm * 2) as u64;
                        let os = out + ((start * w + slice.offset) * 2) as u64;
                        blas.gemm(&g, us + (sl * rm * 2) as u64, bs, os)?;
                    }
                }
            }
            Ok(())
        }

        /// Gather tokens and weights per adapter, strided-batched GEMMs, scatter-add back.
        pub fn gather_bmm(
            &self,
            b: &B,
            gpu: &Gpu,
            pool: &Pool<B>,
            sets: &Sets<B>,
            out: u64,
            s: usize,
        ) -> BenchResult {
            let blas = gpu.blas.as_ref().ok_or("no cuBLAS")?;
            let k = gpu.kernels.as_ref().ok_or("no bench PTX kernels")?;
            let m = &self.meta[s];
            if m.present == 0 {
                return Ok(());
            }
            let (d, w, ns, rm) = (pool.d_in, pool.out_width(), pool.slices.len(), pool.r_max);
            let (rows, ml, np) = (m.present * m.max_len, m.max_len, m.present);
            let (tok, ad) = (p(b, &m.tok_idx), p(b, &m.ad_idx));
            let (xp, up, yp, ag) = (
                p(b, &self.x_pad),
                p(b, &self.u_pad),
                p(b, &self.y_pad),
                p(b, &self.a_g),
            );
            k.gather_rows(p(b, &sets.x[s]), xp, tok, rows, d * 2)?;
            k.gather_rows(p(b, &pool.a), ag, ad, np, ns * rm * d * 2)?;
            for (sl, slice) in pool.slices.iter().enumerate() {
                k.gather_rows(
                    p(b, &pool.b[sl]),
                    p(b, &self.b_g[sl]),
                    ad,
                    np,
                    slice.n * rm * 2,
                )?;
            }
            // SAFETY: the padded scratch holds np × ml rows; the gathered stacks np adapters.
            unsafe {
                let g = RowGemm::nt(DType::F16, ml, ns * rm, d);
                blas.gemm_batched(&g, xp, ag, up, np, [ml * d, ns * rm * d, ml * ns * rm])?;
                for (sl, slice) in pool.slices.iter().enumerate() {
                    let mut g = RowGemm::nt(DType::F16, ml, slice.n, rm);
                    g.lda = ns * rm;
                    g.ldb = rm;
                    g.ldc = w;
                    g.alpha = pool.scale;
                    blas.gemm_batched(
                        &g,
                        up + (sl * rm * 2) as u64,
                        p(b, &self.b_g[sl]),
                        yp + (slice.offset * 2) as u64,
                        np,
                        [ml * ns * rm, slice.n * rm, ml * w],
                    )?;
                }
            }
            k.scatter_add_rows_f16(yp, out, tok, rows, w)?;
            Ok(())
        }
    }
}
