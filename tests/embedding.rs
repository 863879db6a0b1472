//! Token embedding forward/backward: emu vs the cpu reference (forward bit-exact; backward bit-exact
//! against the contract's ordered f32 sum, which checks the sort's stability, and within a derived
//! tolerance of the f64 reference), bad ids and the fault word, multi-pass sorts, schedules, bad
//! inputs, and an f64 finite-difference check of the reference backward.

#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use lora_kernels::adapter::fault;
use lora_kernels::embedding::{
    embedding_backward, embedding_backward_workspace_bytes, embedding_forward,
};
use lora_kernels::ffi::sys;
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, Float, Schedule};
use proptest::prelude::*;
use rand::Rng;

/// L = Σ out ⊙ G is linear in the table, so central differences (h = 1e-6) reproduce the analytic
/// d_table to rounding (≤ 1e-9 here); repeated ids and a bad id (skipped + fault) included.
#[test]
fn reference_backward_matches_finite_differences() {
    let (vocab, dim, tokens) = (5, 3, 9);
    let ids = vec![4, 0, 4, 2, -1, 4, 0, 7, 2];
    let mut r = rng(11);
    let mut table: Vec<f64> = random_vec(&mut r, vocab * dim);
    let g: Vec<f64> = random_vec(&mut r, tokens * dim);
    let loss = |table: &[f64]| -> f64 {
        let mut out = vec![0.0f64; tokens * dim];
        let mut f = vec![0u32];
        embedding_forward(
            &Cpu,
            vocab,
            dim,
            tokens,
            &ids,
            &table.to_vec(),
            &mut out,
            &mut f,
        )
        .unwrap();
        assert_eq!(f[0], fault::INDEX);
        out.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let mut d_table = vec![f64::NAN; vocab * dim];
    let mut ws = Cpu
        .alloc::<u8>(embedding_backward_workspace_bytes(&Cpu, vocab, dim, tokens))
        .unwrap();
    let mut f = vec![0u32];
    embedding_backward(
        &Cpu,
        vocab,
        dim,
        tokens,
        &ids,
        &g,
        &mut d_table,
        &mut ws,
        &mut f,
    )
    .unwrap();
    assert_eq!(f[0], fault::INDEX);
    let h = 1e-6;
    for k in 0..vocab * dim {
        let old = table[k];
        table[k] = old + h;
        let p = loss(&table);
        table[k] = old - h;
        let m = loss(&table);
        table[k] = old;
        let fd = (p - m) / (2.0 * h);
        assert!(
            (fd - d_table[k]).abs() <= 1e-8,
            "d_table[{k}]: fd {fd} vs {}",
            d_table[k]
        );
    }
    // Row 1 and 3 are used by no token: exactly zero.
    assert!(d_table[dim..2 * dim]
        .iter()
        .chain(&d_table[3 * dim..4 * dim])
        .all(|v| *v == 0.0));
}

// ---- emu vs cpu ---------------------------------------------------------------------------------

const U: f64 = 5.960464477539063e-8; // 2⁻²⁴

fn unit<T: Float>() -> f64 {
    match T::DTYPE {
        DType::F32 => U,
        DType::F16 => f64::powi(2.0, -11),
        DType::BF16 => f64::powi(2.0, -8),
        DType::F64 => f64::powi(2.0, -53),
    }
}

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn poisoned<T: Float>(n: usize) -> Vec<T> {
    vec![T::from_f32(POISON); n]
}

/// Ids drawn from a few "hot" values (long segments: the 8-row unrolled path), the whole range, and
/// ~5% bad ones (negative or ≥ vocab).
fn ids_for(r: &mut rand::rngs::StdRng, vocab: usize, tokens: usize, bad: bool) -> Vec<i32> {
    let hot: Vec<i32> = (0..3)
        .map(|_| r.random_range(0..vocab.max(1)) as i32)
        .collect();
    (0..tokens)
        .map(|_| match r.random_range(0..20) {
            0 if bad => -1 - r.random_range(0..3),
            1 if bad => vocab as i32 + r.random_range(0..3),
            2..=9 => hot[r.random_range(0..3)],
            _ => r.random_range(0..vocab.max(1)) as i32,
        })
        .map(|id| if vocab == 0 { id.min(-1) } else { id })
        .collect()
}

/// The contract's exact f32 result: per row, 0 + d_out[t] in ascending t (f32 adds), rounded to T.
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

struct Run<T> {
    out: Vec<T>,
    fwd_fault: u32,
    d_table: Vec<T>,
    bwd_fault: u32,
}

const TAIL: usize = 3;

fn run<B: Backend, T: Float>(
    b: &B,
    vocab: usize,
    dim: usize,
    ids: &[i32],
    table: &[T],
    d_out: &[T],
) -> Run<T> {
    let tokens = ids.len();
    let (ib, tb, db) = (
        b.upload(ids).unwrap(),
        b.upload(table).unwrap(),
        b.upload(d_out).unwrap(),
    );
    let mut ob = b.upload(&poisoned::<T>(tokens * dim + TAIL)).unwrap();
    let mut f1 = b.upload(&[0u32]).unwrap();
    embedding_forward(b, vocab, dim, tokens, &ib, &tb, &mut ob, &mut f1).unwrap();
    let mut dt = b.upload(&poisoned::<T>(vocab * dim + TAIL)).unwrap();
    let mut f2 = b.upload(&[0u32]).unwrap();
    let mut ws = b
        .alloc::<u8>(embedding_backward_workspace_bytes(b, vocab, dim, tokens))
        .unwrap();
    embedding_backward(b, vocab, dim, tokens, &ib, &db, &mut dt, &mut ws, &mut f2).unwrap();
    Run {
        out: b.download(&ob).unwrap(),
        fwd_fault: b.download(&f1).unwrap()[0],
        d_table: b.download(&dt).unwrap(),
        bwd_fault: b.download(&f2).unwrap()[0],
    }
}

/// Forward: a copy, bit for bit; bad ids leave their rows (poison) untouched. Backward: emu equals
/// the contract's ordered f32 sum bit for bit (this checks the sort's stability: any other order
/// changes low bits), and the f64 reference within (L − 1)·2⁻²⁴·Σ|d_out| + both roundings to T.
fn check<T: Float>(vocab: usize, dim: usize, tokens: usize, seed: u64) {
    let mut r = rng(seed);
    let ids = ids_for(&mut r, vocab, tokens, true);
    let table: Vec<T> = random_vec(&mut r, vocab * dim);
    let d_out: Vec<T> = random_vec(&mut r, tokens * dim);
    let emu = run(&Emu, vocab, dim, &ids, &table, &d_out);
    let cpu = run(&Cpu, vocab, dim, &ids, &table, &d_out);
    let any_bad = ids.iter().any(|&i| i < 0 || i as usize >= vocab);
    let want_fault = if any_bad { fault::INDEX } else { 0 };
    assert_eq!((emu.fwd_fault, emu.bwd_fault), (want_fault, want_fault));
    assert_eq!((cpu.fwd_fault, cpu.bwd_fault), (want_fault, want_fault));
    assert_eq!(
        bits(&emu.out),
        bits(&cpu.out),
        "{} forward vocab {vocab} dim {dim} tokens {tokens}",
        T::DTYPE
    );
    assert_eq!(
        bits(&emu.d_table[vocab * dim..]),
        bits(&poisoned::<T>(TAIL)),
        "tail written"
    );
    let exact = ordered_f32_sum(vocab, dim, &ids, &d_out);
    assert_eq!(
        bits(&emu.d_table[..vocab * dim]),
        bits(&exact),
        "{} backward vocab {vocab} dim {dim} tokens {tokens}",
        T::DTYPE
    );
    for v in 0..vocab {
        let users: Vec<usize> = (0..tokens).filter(|&t| ids[t] == v as i32).collect();
        for c in 0..dim {
            let k = v * dim + c;
            let (got, want) = (emu.d_table[k].to_f64(), cpu.d_table[k].to_f64());
            if users.is_empty() {
                assert_eq!(
                    emu.d_table[k].to_f64().to_bits(),
                    0,
                    "unused row {v} not +0"
                );
                continue;
            }
            let sabs: f64 = users
                .iter()
                .map(|&t| d_out[t * dim + c].to_f64().abs())
                .sum();
            let tol = 1.01
                * ((users.len() - 1) as f64 * U * sabs + unit::<T>() * (got.abs() + want.abs()))
                + 1e-45;
            assert!(
                (got - want).abs() <= tol,
                "{} d_table[{v},{c}]: {got} vs {want}",
                T::DTYPE
            );
        }
    }
}

#[test]
fn emu_matches_cpu_at_odd_sizes() {
    let mut seed = 0;
    for (vocab, dim, tokens) in [
        (1, 1, 1),
        (3, 3, 3),
        (17, 17, 17),
        (5, 8, 127),
        (40, 16, 300),
        (300, 3, 600),
        (2, 64, 257),
        (7, 0, 9),
        (0, 4, 5),
        (6, 5, 0),
    ] {
        seed += 1;
        check::<f32>(vocab, dim, tokens, seed);
        check::<f16>(vocab, dim, tokens, seed);
        check::<bf16>(vocab, dim, tokens, seed);
    }
}

/// Vocabularies needing 2 and 3 radix passes (sentinel bits 9..16 and 17..24).
#[test]
fn multi_pass_sorts() {
    check::<f32>(1000, 2, 700, 51);
    check::<bf16>(70_000, 1, 300, 52);
}

proptest! {
    #![proptest_config(proptest_config(64))]

    #[test]
    fn emu_matches_cpu_proptest(vocab in 1usize..60, dim in prop_oneof![1usize..10, 1usize..100], tokens in 1usize..400, seed in any::<u64>(), dtype in 0..3) {
        match dtype {
            0 => check::<f32>(vocab, dim, tokens, seed),
            1 => check::<f16>(vocab, dim, tokens, seed),
            _ => check::<bf16>(vocab, dim, tokens, seed),
        }
    }
}

#[test]
fn deterministic_under_other_schedules() {
    let (vocab, dim, tokens) = (300, 16, 700);
    let mut r = rng(61);
    let ids = ids_for(&mut r, vocab, tokens, true);
    let table: Vec<bf16> = random_vec(&mut r, vocab * dim);
    let d_out: Vec<bf16> = random_vec(&mut r, tokens * dim);
    let base = run(&Emu, vocab, dim, &ids, &table, &d_out);
    for sched in [Schedule::Reverse, Schedule::Random(2), Schedule::Random(3)] {
        let o = Emu::with_schedule(sched, || run(&Emu, vocab, dim, &ids, &table, &d_out));
        assert_eq!(bits(&o.d_table), bits(&base.d_table), "{sched:?}");
        assert_eq!(bits(&o.out), bits(&base.out));
        assert_eq!((o.fwd_fault, o.bwd_fault), (base.fwd_fault, base.bwd_fault));
    }
}

// ---- bad inputs ---------------------------------------------------------------------------------

fn expect_invalid(r: lora_kernels::Result<()>, arg: &str) {
    assert!(
        matches!(&r, Err(Error::InvalidArgument { arg: a, .. }) if *a == arg),
        "expected `{arg}`, got {r:?}"
    );
}

#[test]
fn bad_inputs_are_typed_errors_and_write_nothing() {
    fn on<B: Backend>(b: &B) {
        let (vocab, dim, tokens) = (4, 3, 5);
        let ids = b.upload(&[0i32, 1, 2, 3, 0]).unwrap();
        let ids_short = b.upload(&[0i32; 4]).unwrap();
        let table = b.upload(&[1.0f32; 12]).unwrap();
        let table_short = b.upload(&[1.0f32; 11]).unwrap();
        let mut out = b.upload(&[POISON; 15]).unwrap();
        let mut out_short = b.upload(&[POISON; 14]).unwrap();
        let mut dt = b.upload(&[POISON; 12]).unwrap();
        let mut dt_short = b.upload(&[POISON; 11]).unwrap();
        let d_out = b.upload(&[1.0f32; 15]).unwrap();
        let d_out_short = b.upload(&[1.0f32; 14]).unwrap();
        let mut f = b.upload(&[0u32]).unwrap();
        let mut f0 = b.upload::<u32>(&[]).unwrap();
        let need = embedding_backward_workspace_bytes(b, vocab, dim, tokens);
        let mut ws = b.alloc::<u8>(need).unwrap();
        let big = 1usize << 31;
        for (v, d, t, arg) in [
            (big, 1, 1, "vocab"),
            (1, big, 1, "dim"),
            (1, 1, big, "tokens"),
        ] {
            expect_invalid(
                embedding_forward(b, v, d, t, &ids, &table, &mut out, &mut f),
                arg,
            );
            expect_invalid(
                embedding_backward(b, v, d, t, &ids, &d_out, &mut dt, &mut ws, &mut f),
                arg,
            );
        }
        expect_invalid(
            embedding_forward(b, vocab, dim, tokens, &ids_short, &table, &mut out, &mut f),
            "ids",
        );
        expect_invalid(
            embedding_forward(b, vocab, dim, tokens, &ids, &table_short, &mut out, &mut f),
            "table",
        );
        expect_invalid(
            embedding_forward(b, vocab, dim, tokens, &ids, &table, &mut out_short, &mut f),
            "out",
        );
        expect_invalid(
            embedding_forward(b, vocab, dim, tokens, &ids, &table, &mut out, &mut f0),
            "fault",
        );
        expect_invalid(
            embedding_backward(
                b, vocab, dim, tokens, &ids_short, &d_out, &mut dt, &mut ws, &mut f,
            ),
            "ids",
        );
        expect_invalid(
            embedding_backward(
                b,
                vocab,
                dim,
                tokens,
                &ids,
                &d_out_short,
                &mut dt,
                &mut ws,
                &mut f,
            ),
            "d_out",
        );
        expect_invalid(
            embedding_backward(
                b,
                vocab,
                dim,
                tokens,
                &ids,
                &d_out,
                &mut dt_short,
                &mut ws,
                &mut f,
            ),
            "d_table",
        );
        expect_invalid(
            embedding_backward(
                b, vocab, dim, tokens, &ids, &d_out, &mut dt, &mut ws, &mut f0,
            ),
            "fault",
        );
        if need > 0 {
            let mut small = b.alloc::<u8>(need - 1).unwrap();
            expect_invalid(
                embedding_backward(
                    b, vocab, dim, tokens, &ids, &d_out, &mut dt, &mut small, &mut f,
                ),
                "workspace",
            );
        }
        for v in [&out, &out_short, &dt, &dt_short] {
            assert!(
                b.download(v)
                    .unwrap()
                    .iter()
                    .all(|v| v.to_bits() == POISON.to_bits()),
                "{}",
                b.name()
            );
        }
        assert_eq!(b.download(&f).unwrap(), vec![0]);
    }
    on(&Emu);
    on(&Cpu);
    assert!(embedding_backward_workspace_bytes(&Emu, 4, 3, 5) > 0);
    assert_eq!(embedding_backward_workspace_bytes(&Cpu, 4, 3, 5), 0);
    let td = vec![1.0f64; 4];
    let r = embedding_forward(
        &Emu,
        2,
        2,
        1,
        &vec![0],
        &td,
        &mut vec![0.0; 2],
        &mut vec![0],
    );
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "table", .. })),
        "{r:?}"
    );
    let r = embedding_backward(
        &Emu,
        2,
        2,
        1,
        &vec![0],
        &td,
        &mut vec![0.0; 4],
        &mut vec![],
        &mut vec![0],
    );
    assert!(
        matches!(r, Err(Error::UnsupportedDtype { arg: "d_out", .. })),
        "{r:?}"
    );
}

#[test]
fn c_launchers_validate_their_params() {
    let ids = [0i32, 1];
    let table = [1.0f32; 4];
    let mut out = [POISON; 4];
    let fwd = sys::LkEmbeddingForwardParams {
        ids: ids.as_ptr(),
        table: table.as_ptr().cast(),
        out: out.as_mut_ptr().cast(),
        fault: std::ptr::null_mut(),
        vocab: 2,
        dim: 2,
        tokens: 2,
        dtype: 0,
    };
    let call = |m: &dyn Fn(&mut sys::LkEmbeddingForwardParams)| {
        let mut p = fwd;
        m(&mut p);
        // SAFETY: pointers valid for the sizes or rejected before any access.
        unsafe { sys::lk_emu_embedding_forward(&p, std::ptr::null_mut()) }
    };
    let invalid = sys::LK_ERR_INVALID_ARGUMENT as i32;
    assert_eq!(call(&|p| p.vocab = -1), invalid);
    assert_eq!(call(&|p| p.dim = -1), invalid);
    assert_eq!(call(&|p| p.tokens = -1), invalid);
    assert_eq!(call(&|p| p.ids = std::ptr::null()), invalid);
    assert_eq!(call(&|p| p.table = std::ptr::null()), invalid);
    assert_eq!(call(&|p| p.out = std::ptr::null_mut()), invalid);
    assert_eq!(call(&|p| p.dtype = 4), sys::LK_ERR_UNSUPPORTED_DTYPE as i32);
    assert!(out.iter().all(|v| v.to_bits() == POISON.to_bits()));
    let mut dt = [POISON; 4];
    let mut ws = vec![0u32; 1024];
    let bwd = sys::LkEmbeddingBackwardParams {
        ids: ids.as_ptr(),
        d_out: table.as_ptr().cast(),
        d_table: dt.as_mut_ptr().cast(),
        workspace: ws.as_mut_ptr().cast(),
        fault: std::ptr::null_mut(),
        vocab: 2,
        dim: 2,
        tokens: 2,
        dtype: 0,
    };
    let call = |m: &dyn Fn(&mut sys::LkEmbeddingBackwardParams)| {
        let mut p = bwd;
        m(&mut p);
        // SAFETY: as above.
        unsafe { sys::lk_emu_embedding_backward(&p, std::ptr::null_mut()) }
    };
    assert_eq!(call(&|p| p.vocab = -2), invalid);
    assert_eq!(call(&|p| p.tokens = -2), invalid);
    assert_eq!(call(&|p| p.workspace = std::ptr::null_mut()), invalid);
    assert_eq!(
        call(&|p| p.workspace = p.workspace.wrapping_byte_add(1)),
        invalid
    );
    assert_eq!(call(&|p| p.d_out = std::ptr::null()), invalid);
    assert_eq!(call(&|p| p.d_table = std::ptr::null_mut()), invalid);
    assert_eq!(call(&|p| p.ids = std::ptr::null()), invalid);
    assert_eq!(call(&|p| p.dtype = 3), sys::LK_ERR_UNSUPPORTED_DTYPE as i32);
    assert!(dt.iter().all(|v| v.to_bits() == POISON.to_bits()));
    // SAFETY: a pure function of the sizes.
    let need = unsafe { sys::lk_emu_embedding_backward_workspace_size(&bwd) };
    assert!(need > 0 && need <= ws.len() * 4);
    assert_eq!(call(&|_| ()), 0);
    assert_eq!(dt, [1.0; 4]);
}
