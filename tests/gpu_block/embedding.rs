//! GPU trials: embedding. Forward: a copy (bit for bit with cpu). Backward: bit for bit the contract's
//! ordered f32 sum (ascending t per vocab row) — the same bits as the emulator — and rows no token
//! uses exactly +0; bad ids skipped + fault.

use crate::common::{random_vec, rng, POISON};
use crate::GpuTest;
use libtest_mimic::Failed;
use lora_kernels::adapter::fault;
use lora_kernels::embedding::{
    embedding_backward, embedding_backward_workspace_bytes, embedding_forward,
};
use lora_kernels::{bf16, f16, Backend, Cpu, Cuda, Error, Float};
use rand::Rng;

pub const TESTS: &[(&str, GpuTest)] = &[
    ("embedding_f32_matches_cpu", matches_cpu::<f32>),
    ("embedding_f16_matches_cpu", matches_cpu::<f16>),
    ("embedding_bf16_matches_cpu", matches_cpu::<bf16>),
    ("embedding_llama3_shape", llama3_shape),
    ("embedding_deterministic", deterministic),
    ("embedding_rejects_bad_input", rejects_bad_input),
];

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg().into())
    }
}

fn err(e: Error) -> Failed {
    e.to_string().into()
}

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn ids_for(seed: u64, vocab: usize, tokens: usize) -> Vec<i32> {
    let mut r = rng(seed);
    let hot: Vec<i32> = (0..3).map(|_| r.random_range(0..vocab) as i32).collect();
    (0..tokens)
        .map(|_| match r.random_range(0..20) {
            0 => -1,
            1 => vocab as i32,
            2..=9 => hot[r.random_range(0..3)],
            _ => r.random_range(0..vocab) as i32,
        })
        .collect()
}

fn ordered_f32_sum<T: Float>(vocab: usize, dim: usize, ids: &[i32], d_out: &[T]) -> Vec<T> {
    let mut acc = vec![0.0f32; vocab * dim];
    for (t, &id) in ids.iter().enumerate() {
        if id >= 0 && (id as usize) < vocab {
            for c in 0..dim {
                acc[id as usize * dim + c] += d_out[t * dim + c].to_f32();
            }
        }
    }
    acc.into_iter().map(T::from_f32).collect()
}

type Outs<T> = (Vec<T>, u32, Vec<T>, u32);

fn run<B: Backend, T: Float>(
    b: &B,
    vocab: usize,
    dim: usize,
    ids: &[i32],
    table: &[T],
    d_out: &[T],
) -> Result<Outs<T>, Failed> {
    let tokens = ids.len();
    let p = T::from_f32(POISON);
    let (ib, tb, db) = (
        b.upload(ids).map_err(err)?,
        b.upload(table).map_err(err)?,
        b.upload(d_out).map_err(err)?,
    );
    let mut ob = b.upload(&vec![p; tokens * dim]).map_err(err)?;
    let mut f1 = b.upload(&[0u32]).map_err(err)?;
    embedding_forward(b, vocab, dim, tokens, &ib, &tb, &mut ob, &mut f1).map_err(err)?;
    let mut dt = b.upload(&vec![p; vocab * dim]).map_err(err)?;
    let mut f2 = b.upload(&[0u32]).map_err(err)?;
    let mut ws = b
        .alloc::<u8>(embedding_backward_workspace_bytes(b, vocab, dim, tokens))
        .map_err(err)?;
    embedding_backward(b, vocab, dim, tokens, &ib, &db, &mut dt, &mut ws, &mut f2).map_err(err)?;
    Ok((
        b.download(&ob).map_err(err)?,
        b.download(&f1).map_err(err)?[0],
        b.download(&dt).map_err(err)?,
        b.download(&f2).map_err(err)?[0],
    ))
}

fn case<T: Float>(
    dev: &Cuda,
    vocab: usize,
    dim: usize,
    tokens: usize,
    seed: u64,
) -> Result<(), Failed> {
    let ids = ids_for(seed, vocab, tokens);
    let mut r = rng(seed + 1000);
    let table: Vec<T> = random_vec(&mut r, vocab * dim);
    let d_out: Vec<T> = random_vec(&mut r, tokens * dim);
    let (out, f1, dt, f2) = run(dev, vocab, dim, &ids, &table, &d_out)?;
    let want_fault = if ids.iter().any(|&i| i < 0 || i as usize >= vocab) {
        fault::INDEX
    } else {
        0
    };
    check(f1 == want_fault && f2 == want_fault, || {
        format!("fault words {f1} {f2}")
    })?;
    // Forward: the gathered rows; rows of bad ids untouched (poison). Small shapes also vs the cpu backend.
    for (t, &id) in ids.iter().enumerate() {
        let got = &out[t * dim..(t + 1) * dim];
        let ok = if id >= 0 && (id as usize) < vocab {
            bits(got) == bits(&table[id as usize * dim..(id as usize + 1) * dim])
        } else {
            got.iter()
                .all(|v| v.to_f32().to_bits() == T::from_f32(POISON).to_f32().to_bits())
        };
        check(ok, || format!("{} forward row {t} (id {id})", T::DTYPE))?;
    }
    if vocab * dim <= 1 << 20 {
        let (cout, cf1, _, _) = run(&Cpu, vocab, dim, &ids, &table, &d_out)?;
        check(bits(&out) == bits(&cout) && cf1 == f1, || {
            format!("{} forward: cuda ≠ cpu", T::DTYPE)
        })?;
    }
    check(
        bits(&dt) == bits(&ordered_f32_sum(vocab, dim, &ids, &d_out)),
        || {
            format!(
                "{} backward vocab {vocab} dim {dim} tokens {tokens}: not the ordered f32 sum",
                T::DTYPE
            )
        },
    )
}

fn matches_cpu<T: Float>(dev: &Cuda) -> Result<(), Failed> {
    for (i, &(vocab, dim, tokens)) in [
        (1, 1, 1),
        (3, 3, 3),
        (17, 17, 17),
        (127, 64, 1031),
        (1000, 24, 4097),
        (70_000, 8, 3000),
    ]
    .iter()
    .enumerate()
    {
        case::<T>(dev, vocab, dim, tokens, 90 + i as u64)?;
    }
    Ok(())
}

/// Llama-3-8B: vocab 128256, dim 4096, 2048 tokens, bf16 (3 radix passes, 1 GiB d_table).
fn llama3_shape(dev: &Cuda) -> Result<(), Failed> {
    case::<bf16>(dev, 128_256, 4096, 2048, 7)
}

fn deterministic(dev: &Cuda) -> Result<(), Failed> {
    let (vocab, dim, tokens) = (32_000, 256, 8192);
    let ids = ids_for(5, vocab, tokens);
    let mut r = rng(6);
    let table: Vec<f16> = random_vec(&mut r, vocab * dim);
    let d_out: Vec<f16> = random_vec(&mut r, tokens * dim);
    let first = run(dev, vocab, dim, &ids, &table, &d_out)?;
    for _ in 0..2 {
        let again = run(dev, vocab, dim, &ids, &table, &d_out)?;
        check(
            bits(&again.2) == bits(&first.2) && again.0 == first.0,
            || "run-to-run difference".into(),
        )?;
    }
    Ok(())
}

fn rejects_bad_input(dev: &Cuda) -> Result<(), Failed> {
    let ids = dev.upload(&[0i32, 1, 2]).map_err(err)?;
    let table = dev.upload(&[1.0f32; 11]).map_err(err)?;
    let mut out = dev.upload(&[POISON; 9]).map_err(err)?;
    let mut f = dev.upload(&[0u32]).map_err(err)?;
    let e = embedding_forward(dev, 4, 3, 3, &ids, &table, &mut out, &mut f);
    check(
        matches!(e, Err(Error::InvalidArgument { arg: "table", .. })),
        || format!("{e:?}"),
    )?;
    let mut dt = dev.upload(&[POISON; 12]).map_err(err)?;
    let need = embedding_backward_workspace_bytes(dev, 4, 3, 3);
    let mut ws = dev.alloc::<u8>(need - 1).map_err(err)?;
    let e = embedding_backward(dev, 4, 3, 3, &ids, &out, &mut dt, &mut ws, &mut f);
    check(
        matches!(
            e,
            Err(Error::InvalidArgument {
                arg: "workspace",
                ..
            })
        ),
        || format!("{e:?}"),
    )?;
    for v in [&out, &dt] {
        let after = dev.download(v).map_err(err)?;
        check(
            after.iter().all(|v| v.to_bits() == POISON.to_bits()),
            || "output changed on error".into(),
        )?;
    }
    check(dev.download(&f).map_err(err)? == vec![0], || {
        "fault set on error".into()
    })
}
