//! BGMV shrink/expand on the emulator and the cpu reference, against an independent f64
//! computation from the same rounded inputs (common::serving). Tolerances are per element
//! (`sum_tolerance`: f32 accumulation of n products, plus the hi/lo split error when an f32 operand
//! meets half-precision weights on tensor cores, plus one rounding of the output dtype) and, for
//! expand, also the relative Frobenius bound of the output dtype (1e-5 f32, 2e-3 f16, 1e-2 bf16).
//! Overwrite outputs are NaN-poisoned first; add outputs start random and every element that must
//! stay untouched is compared bit for bit.

mod common;

use common::serving::*;
use common::*;
use lora_kernels::adapter::{fault, AdapterTableBuilder, ExpandMode, LoraWeights, Slice};
use lora_kernels::bgmv::Bgmv;
use lora_kernels::ffi::sys;
use lora_kernels::{bf16, f16, Backend, Cpu, Emu, Error};
use proptest::prelude::*;

proptest! {
    #![proptest_config(proptest_config(48))]

    #[test]
    fn emu_f32(c in cases(40)) {
        run_bgmv::<_, f32, f32, f32>(&Emu, &scenario::<f32>(&c, 0.2), c.seed, mode(c.add));
    }

    #[test]
    fn emu_f16(c in cases(40)) {
        run_bgmv::<_, f16, f16, f16>(&Emu, &scenario::<f16>(&c, 0.2), c.seed, mode(c.add));
    }

    #[test]
    fn emu_bf16(c in cases(40)) {
        run_bgmv::<_, bf16, bf16, bf16>(&Emu, &scenario::<bf16>(&c, 0.2), c.seed, mode(c.add));
    }

    #[test]
    fn emu_f32_activations_half_weights(c in cases(40)) {
        run_bgmv::<_, f32, f16, f32>(&Emu, &scenario::<f16>(&c, 0.2), c.seed, mode(c.add));
        run_bgmv::<_, f32, bf16, bf16>(&Emu, &scenario::<bf16>(&c, 0.2), c.seed ^ 1, mode(!c.add));
    }

    #[test]
    fn cpu_reference(c in cases(40)) {
        run_bgmv::<_, f32, bf16, f32>(&Cpu, &scenario::<bf16>(&c, 0.2), c.seed, mode(c.add));
        run_bgmv::<_, f16, f16, f16>(&Cpu, &scenario::<f16>(&c, 0.2), c.seed ^ 2, mode(!c.add));
    }
}

#[test]
fn llama3_qkv_slices_mixed_ranks() {
    // Llama-3-8B's fused qkv (4096 → 4096/1024/1024), scaled down on the emulator by LK_TEST_SCALE.
    let d = scaled(1024, 256);
    let mut r = rng(8);
    let ids = random_ids(&mut r, scaled(16, 4), 5, Popularity::Uniform, 0.25);
    let sc = Scenario::random::<f16>(&mut r, d, &[d, d / 4, d / 4], 5, &[8, 16, 64, 0], ids);
    run_bgmv::<_, f16, f16, f16>(&Emu, &sc, 8, ExpandMode::Add);
}

#[test]
fn thousands_of_adapters() {
    let mut r = rng(9);
    let ids = random_ids(&mut r, 48, 2000, Popularity::Uniform, 0.1);
    let sc = Scenario::random::<bf16>(&mut r, 40, &[24], 2000, &[1, 4, 8], ids);
    run_bgmv::<_, bf16, bf16, bf16>(&Emu, &sc, 9, ExpandMode::Overwrite);
}

#[test]
fn out_of_range_ids_are_skipped_and_flagged() {
    let mut r = rng(10);
    let mut ids = random_ids(&mut r, 12, 3, Popularity::Uniform, 0.2);
    ids[2] = -2;
    ids[5] = 3;
    ids[7] = i32::MIN;
    ids[8] = i32::MAX;
    let sc = Scenario::random::<f32>(&mut r, 33, &[9, 5], 3, &[2, 8], ids);
    for mode in [ExpandMode::Add, ExpandMode::Overwrite] {
        let (_, _, faults) = run_bgmv::<_, f32, f32, f32>(&Emu, &sc, 10, mode);
        assert_eq!(faults, fault::ADAPTER_ID);
        let (_, _, faults) = run_bgmv::<_, f32, f32, f32>(&Cpu, &sc, 10, mode);
        assert_eq!(faults, fault::ADAPTER_ID);
    }
}

/// Invalid table entries (rank > r_cap, rank < 0, null pointers with rank > 0): tokens using them
/// are skipped in that slice and flagged; the other slices and tokens are computed.
fn invalid_entries_on<B: Backend>(b: &B) {
    let mut r = rng(11);
    let (d_in, tokens) = (20, 9);
    let ids: Vec<i32> = (0..tokens as i32).map(|t| t % 3).collect();
    let sc = Scenario::random::<f32>(&mut r, d_in, &[6, 4], 3, &[4], ids);
    let bufs = sc.upload::<B, f32>(b);
    let mut builder = sc.builder(b, &bufs);
    let good = sys::LkAdapterEntry {
        a: b.raw_ptr(&bufs[0][0].0),
        b: b.raw_ptr(&bufs[0][0].1),
        lda: 20,
        ldb: 4,
        rank: 4,
        scale: 1.0,
    };
    // SAFETY: each of these is invalid by rank or pointer, so kernels must not dereference them.
    unsafe {
        builder.set_raw(0, 0, sys::LkAdapterEntry { rank: 5, ..good }); // > r_cap (4)
        builder.set_raw(1, 1, sys::LkAdapterEntry { rank: -1, ..good });
        builder.set_raw(
            2,
            0,
            sys::LkAdapterEntry {
                a: std::ptr::null(),
                ..good
            },
        );
    }
    let table = builder.build(b).unwrap();
    assert_eq!(table.r_cap(), 4);
    let skipped = |t: usize, s: usize| matches!((t % 3, s), (0, 0) | (1, 1) | (2, 0));
    let x: Vec<f32> = random_vec(&mut r, tokens * d_in);
    let idb = b.upload(&sc.ids).unwrap();
    let batch = Bgmv::new(b, &table, &idb, tokens).unwrap();
    let mut u = b.upload(&vec![POISON; 2 * tokens * 4]).unwrap();
    let mut err = b.upload(&[0u32]).unwrap();
    batch
        .shrink(b, &b.upload(&x).unwrap(), d_in, &mut u, Some(&mut err))
        .unwrap();
    let uh = b.download(&u).unwrap();
    for t in 0..tokens {
        for s in 0..2 {
            let row = &uh[(s * tokens + t) * 4..(s * tokens + t + 1) * 4];
            assert_eq!(
                row.iter().all(|v| v.to_bits() == POISON.to_bits()),
                skipped(t, s),
                "{}: token {t} slice {s}",
                b.name()
            );
        }
    }
    let before: Vec<f32> = random_vec(&mut r, tokens * sc.out_width);
    let mut out = b.upload(&before).unwrap();
    batch
        .expand(
            b,
            &u,
            &mut out,
            sc.out_width,
            ExpandMode::Add,
            Some(&mut err),
        )
        .unwrap();
    let oh = b.download(&out).unwrap();
    for t in 0..tokens {
        for (s, sl) in sc.slices.iter().enumerate() {
            let cols = t * sc.out_width + sl.offset..t * sc.out_width + sl.offset + sl.n;
            let same = oh[cols.clone()]
                .iter()
                .zip(&before[cols])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert_eq!(
                same,
                skipped(t, s),
                "{}: out token {t} slice {s} changed = {}",
                b.name(),
                !same
            );
        }
    }
    assert_eq!(b.download(&err).unwrap()[0], fault::TABLE_ENTRY);
}

#[test]
fn invalid_table_entries_are_skipped_and_flagged() {
    invalid_entries_on(&Emu);
    invalid_entries_on(&Cpu);
}

/// A token's bits do not depend on the rest of the batch: alone, and inside three different batches.
#[test]
fn batch_invariance_bit_identical() {
    let mut r = rng(12);
    let (d_in, n_adapters) = (300, 4);
    let sc0 = Scenario::random::<bf16>(&mut r, d_in, &[40, 24], n_adapters, &[8, 16, 33], vec![0]);
    let bufs = sc0.upload::<Emu, bf16>(&Emu);
    let table = sc0.table(&Emu, &bufs);
    let r_cap = table.r_cap();
    let token: Vec<bf16> = random_vec(&mut r, d_in);
    let width = sc0.out_width;
    let run = |ids: &[i32], pos: usize| -> (Vec<u32>, Vec<u16>) {
        let tokens = ids.len();
        let mut x: Vec<bf16> = random_vec(&mut rng(ids.len() as u64), tokens * d_in);
        x[pos * d_in..(pos + 1) * d_in].copy_from_slice(&token);
        let idb = Emu.upload(ids).unwrap();
        let batch = Bgmv::new(&Emu, &table, &idb, tokens).unwrap();
        let mut u = vec![POISON; 2 * tokens * r_cap];
        batch.shrink(&Emu, &x, d_in, &mut u, None).unwrap();
        let mut out = vec![bf16::from_f32(0.5); tokens * width];
        batch
            .expand(&Emu, &u, &mut out, width, ExpandMode::Add, None)
            .unwrap();
        let rank = sc0.weights[ids[pos] as usize]
            .iter()
            .map(|w| w.rank)
            .collect::<Vec<_>>();
        let mut ubits = Vec::new();
        for (s, &rk) in rank.iter().enumerate() {
            ubits.extend(
                u[(s * tokens + pos) * r_cap..(s * tokens + pos) * r_cap + rk]
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
    assert_eq!(alone, run(&[2, 2, 2, 2, 2, 2, 2], 6));
    assert_eq!(
        alone,
        run(&[-1, 3, 2, 1, 0, -1, 2, 3, 1, 0, 2, 2, 1, 3, 0, -1, 2], 6)
    );
}

#[test]
fn deterministic_run_to_run() {
    let mut r = rng(13);
    let ids = random_ids(&mut r, 30, 4, Popularity::Zipf, 0.1);
    let sc = Scenario::random::<f16>(&mut r, 257, &[33, 17], 4, &[8, 16], ids);
    let a = run_bgmv::<_, f16, f16, f32>(&Emu, &sc, 13, ExpandMode::Overwrite);
    let b = Emu::with_schedule(lora_kernels::Schedule::Random(77), || {
        run_bgmv::<_, f16, f16, f32>(&Emu, &sc, 13, ExpandMode::Overwrite)
    });
    assert!(a
        .0
        .iter()
        .zip(&b.0)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(a
        .1
        .iter()
        .zip(&b.1)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
}

fn invalid_arg(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } => arg,
        Error::UnsupportedDtype { arg, .. } => arg,
        other => panic!("expected a typed argument error, got {other:?}"),
    }
}

/// Every validation branch: a typed error naming the argument, and nothing written.
fn validation_on<B: Backend>(b: &B) {
    let (d_in, tokens) = (16, 4);
    let slices = [Slice { n: 8, offset: 0 }, Slice { n: 4, offset: 8 }];
    let a = b.upload(&[0.5f32; 8 * 16]).unwrap();
    let bw = b.upload(&[0.25f32; 8 * 8]).unwrap();
    let short = b.upload(&[0.25f32; 8 * 8 - 1]).unwrap();
    let mut builder =
        AdapterTableBuilder::<B>::new(2, d_in, &slices, lora_kernels::DType::F32).unwrap();
    let w = LoraWeights::packed(8, 2.0, d_in);
    assert_eq!(
        invalid_arg(builder.set(b, 0, 0, &a, &short, w).map(|_| ()).unwrap_err()),
        "b"
    );
    assert_eq!(
        invalid_arg(builder.set(b, 2, 0, &a, &bw, w).map(|_| ()).unwrap_err()),
        "adapter"
    );
    assert_eq!(
        invalid_arg(builder.set(b, 0, 2, &a, &bw, w).map(|_| ()).unwrap_err()),
        "slice"
    );
    assert_eq!(
        invalid_arg(
            builder
                .set(b, 0, 0, &a, &bw, LoraWeights { lda: 15, ..w })
                .map(|_| ())
                .unwrap_err()
        ),
        "lda"
    );
    assert_eq!(
        invalid_arg(
            builder
                .set(b, 0, 0, &a, &bw, LoraWeights { ldb: 7, ..w })
                .map(|_| ())
                .unwrap_err()
        ),
        "ldb"
    );
    assert_eq!(
        invalid_arg(
            builder
                .set(
                    b,
                    0,
                    0,
                    &a,
                    &bw,
                    LoraWeights {
                        scale: f32::NAN,
                        ..w
                    }
                )
                .map(|_| ())
                .unwrap_err()
        ),
        "scale"
    );
    assert_eq!(
        invalid_arg(
            builder
                .set(b, 0, 0, &a, &bw, LoraWeights { rank: 2000, ..w })
                .map(|_| ())
                .unwrap_err()
        ),
        "rank"
    );
    let a16 = b.upload(&[f16::ONE; 8 * 16]).unwrap();
    assert_eq!(
        invalid_arg(builder.set(b, 0, 0, &a16, &a16, w).map(|_| ()).unwrap_err()),
        "a"
    );
    assert_eq!(
        invalid_arg(
            AdapterTableBuilder::<B>::new(2, d_in, &[], lora_kernels::DType::F32)
                .map(|_| ())
                .unwrap_err()
        ),
        "slices"
    );
    assert_eq!(
        invalid_arg(
            AdapterTableBuilder::<B>::new(0, d_in, &slices, lora_kernels::DType::F32)
                .map(|_| ())
                .unwrap_err()
        ),
        "n_adapters"
    );
    builder.set(b, 0, 0, &a, &bw, w).unwrap();
    builder
        .set(b, 1, 1, &a, &bw, LoraWeights::packed(8, 1.0, d_in))
        .unwrap();
    let table = builder.build(b).unwrap();

    let ids = b.upload(&[0, 1, -1, 0]).unwrap();
    assert_eq!(
        invalid_arg(Bgmv::new(b, &table, &ids, 5).map(|_| ()).unwrap_err()),
        "token_adapter"
    );
    let batch = Bgmv::new(b, &table, &ids, tokens).unwrap();
    let x = b.upload(&[1.0f32; 4 * 16]).unwrap();
    let short_x = b.upload(&[1.0f32; 4 * 16 - 1]).unwrap();
    let mut u = b.upload(&[POISON; 2 * 4 * 8]).unwrap();
    let mut short_u = b.upload(&[POISON; 2 * 4 * 8 - 1]).unwrap();
    let mut empty_err = b.upload::<u32>(&[]).unwrap();
    assert_eq!(
        invalid_arg(batch.shrink(b, &short_x, 16, &mut u, None).unwrap_err()),
        "x"
    );
    assert_eq!(
        invalid_arg(batch.shrink(b, &x, 15, &mut u, None).unwrap_err()),
        "ld_x"
    );
    assert_eq!(
        invalid_arg(batch.shrink(b, &x, 16, &mut short_u, None).unwrap_err()),
        "u"
    );
    assert_eq!(
        invalid_arg(
            batch
                .shrink(b, &x, 16, &mut u, Some(&mut empty_err))
                .unwrap_err()
        ),
        "error_word"
    );
    let xbf = b.upload(&[bf16::ONE; 4 * 16]).unwrap();
    assert_eq!(
        invalid_arg(batch.shrink(b, &xbf, 16, &mut u, None).unwrap_err()),
        "x"
    );
    assert!(
        b.download(&u)
            .unwrap()
            .iter()
            .all(|v| v.to_bits() == POISON.to_bits()),
        "a rejected shrink wrote u"
    );

    let before = [7.0f32; 4 * 12];
    let mut out = b.upload(&before).unwrap();
    let mut short_out = b.upload(&[7.0f32; 4 * 12 - 1]).unwrap();
    assert_eq!(
        invalid_arg(
            batch
                .expand(b, &u, &mut short_out, 12, ExpandMode::Add, None)
                .unwrap_err()
        ),
        "out"
    );
    assert_eq!(
        invalid_arg(
            batch
                .expand(b, &u, &mut out, 11, ExpandMode::Add, None)
                .unwrap_err()
        ),
        "ld_out"
    );
    assert_eq!(
        invalid_arg(
            batch
                .expand(b, &short_u, &mut out, 12, ExpandMode::Add, None)
                .unwrap_err()
        ),
        "u"
    );
    let mut out16 = b.upload(&[f16::ONE; 4 * 12]).unwrap();
    assert_eq!(
        invalid_arg(
            batch
                .expand(b, &u, &mut out16, 12, ExpandMode::Add, None)
                .unwrap_err()
        ),
        "out"
    );
    assert_eq!(
        b.download(&out).unwrap(),
        before,
        "a rejected expand wrote out"
    );
}

#[test]
fn validation_errors_emu() {
    validation_on(&Emu);
}

#[test]
fn validation_errors_cpu() {
    validation_on(&Cpu);
}

#[test]
fn more_tokens_than_a_grid_y_dimension() {
    let mut r = rng(65537);
    let ids = random_ids(&mut r, 65_537, 3, Popularity::Uniform, 0.05);
    let sc = Scenario::random::<f16>(&mut r, 4, &[2], 3, &[1], ids);
    run_bgmv::<_, f16, f16, f16>(&Emu, &sc, 1, ExpandMode::Add);
}

#[test]
fn rank_256_mixed() {
    let mut r = rng(256);
    let ids = random_ids(&mut r, 20, 3, Popularity::Uniform, 0.1);
    let sc = Scenario::random::<bf16>(&mut r, 130, &[20, 9], 3, &[256, 1, 100], ids);
    run_bgmv::<_, bf16, bf16, f32>(&Emu, &sc, 2, ExpandMode::Overwrite);
}
