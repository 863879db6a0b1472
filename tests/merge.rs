//! Merge / unmerge on the emulator and the cpu reference.
//!
//! No tolerances here: the contract (DESIGN.md §2 "Merge") fixes the f32 fmaf sequence, so cpu and
//! emu must agree **bit for bit**, and the checks are exact properties:
//! - default round trip: `|unmerge(merge(W)) − W| ≤ 1 ulp of max(|W|, |merged W|)` in W's dtype, on
//!   every element (ulp = the spacing of W's dtype at that magnitude, the subnormal spacing below
//!   the normal range);
//! - exact mode restores every bit, also with the record made on one backend and applied on the other;
//! - padding columns of W (ld_w > cols) are NaN-poisoned and must keep their bits.

mod common;

use common::*;
use lora_kernels::ffi::sys;
use lora_kernels::merge::{self, *};
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu, Error, Float};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;

const POISON_BITS: u32 = 0x7fc0_dead;

fn poison<TW: MergeFloat>() -> TW {
    TW::from_bits32(if TW::DTYPE == DType::F32 {
        POISON_BITS
    } else {
        0x7dea
    })
}

/// Box–Muller normal.
fn normal(r: &mut StdRng, sd: f64) -> f64 {
    let u1: f64 = r.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = r.random_range(0.0..1.0);
    sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[derive(Clone, Debug)]
struct Case {
    shape: MergeShape,
    rank: usize,
    lda: usize,
    ldb: usize,
    scale: f32,
}

/// Host inputs: W (stored, padding poisoned), A, B.
struct Inputs<TW, TA> {
    w: Vec<TW>,
    a: Vec<TA>,
    b: Vec<TA>,
}

fn inputs<TW: MergeFloat, TA: Float>(c: &Case, seed: u64, w_sd: f64, ab_sd: f64) -> Inputs<TW, TA> {
    let mut r = rng(seed);
    let (rows, cols) = c.shape.stored();
    let mut w = vec![poison::<TW>(); rows.max(1) * c.shape.ld_w];
    for p in 0..rows {
        for q in 0..cols {
            w[p * c.shape.ld_w + q] = TW::from_f64(normal(&mut r, w_sd));
        }
    }
    let a = (0..c.rank * c.lda)
        .map(|_| TA::from_f64(r.random_range(-1.0..1.0) / (c.shape.d_in as f64).sqrt()))
        .collect();
    let b = (0..c.shape.d_out * c.ldb)
        .map(|_| TA::from_f64(normal(&mut r, ab_sd)))
        .collect();
    Inputs { w, a, b }
}

fn bits<TW: MergeFloat>(v: &[TW]) -> Vec<u32> {
    v.iter().map(|x| x.bits32()).collect()
}

/// Spacing of TW's values at magnitude |x| (finite x).
fn ulp<TW: MergeFloat>(x: f64) -> f64 {
    let (mant, min_exp) = match TW::DTYPE {
        DType::F32 => (23, -126),
        DType::F16 => (10, -14),
        _ => (7, -126),
    };
    let e = if x == 0.0 {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - mant)
}

fn run<B: Backend, TW: MergeFloat, TA: Float>(
    be: &B,
    w: &[TW],
    inp: &Inputs<TW, TA>,
    c: &Case,
    dir: Direction,
) -> Vec<TW> {
    let mut wb = be.upload(w).unwrap();
    let (a, b) = (be.upload(&inp.a).unwrap(), be.upload(&inp.b).unwrap());
    let l = Lora {
        a: &a,
        b: &b,
        rank: c.rank,
        lda: c.lda,
        ldb: c.ldb,
        scale: c.scale,
    };
    merge::apply(be, &mut wb, &c.shape, &l, dir).unwrap();
    be.download(&wb).unwrap()
}

/// Exact merge on `B`: (merged W, host record).
fn run_exact<B: Backend, TW: MergeFloat, TA: Float>(
    be: &B,
    inp: &Inputs<TW, TA>,
    c: &Case,
    capacity: usize,
) -> (Vec<TW>, HostRecord, RecordState) {
    let mut wb = be.upload(&inp.w).unwrap();
    let (a, b) = (be.upload(&inp.a).unwrap(), be.upload(&inp.b).unwrap());
    let l = Lora {
        a: &a,
        b: &b,
        rank: c.rank,
        lda: c.lda,
        ldb: c.ldb,
        scale: c.scale,
    };
    let mut rec = MergeRecord::alloc::<TW>(be, &c.shape, capacity).unwrap();
    merge_exact(be, &mut wb, &c.shape, &l, &mut rec, false).unwrap();
    let st = rec.state(be).unwrap();
    (be.download(&wb).unwrap(), rec.to_host(be).unwrap(), st)
}

fn unmerge_with<B: Backend, TW: MergeFloat, TA: Float>(
    be: &B,
    w: &[TW],
    inp: &Inputs<TW, TA>,
    c: &Case,
    rec: &HostRecord,
) -> Vec<TW> {
    let mut wb = be.upload(w).unwrap();
    let (a, b) = (be.upload(&inp.a).unwrap(), be.upload(&inp.b).unwrap());
    let l = Lora {
        a: &a,
        b: &b,
        rank: c.rank,
        lda: c.lda,
        ldb: c.ldb,
        scale: c.scale,
    };
    let mut r = MergeRecord::from_host::<TW>(be, rec).unwrap();
    unmerge_exact(be, &mut wb, &c.shape, &l, &mut r).unwrap();
    assert_eq!(r.state(be).unwrap().status, 0, "status after exact unmerge");
    be.download(&wb).unwrap()
}

fn check_case<TW: MergeFloat, TA: Float>(c: &Case, seed: u64) {
    // Large-ish deltas relative to W so that the round trip is not trivially exact.
    let inp = inputs::<TW, TA>(c, seed, 0.02, 0.5);
    let merged_cpu = run(&Cpu, &inp.w, &inp, c, Direction::Merge);
    let merged_emu = run(&Emu, &inp.w, &inp, c, Direction::Merge);
    assert_eq!(
        bits(&merged_cpu),
        bits(&merged_emu),
        "cpu and emu merges differ ({c:?}, {})",
        TW::DTYPE
    );
    let back = run(&Emu, &merged_emu, &inp, c, Direction::Unmerge);
    assert_eq!(
        bits(&back),
        bits(&run(&Cpu, &merged_cpu, &inp, c, Direction::Unmerge)),
        "cpu and emu unmerges differ"
    );
    let (rows, cols) = c.shape.stored();
    for p in 0..rows {
        for q in 0..c.shape.ld_w {
            let k = p * c.shape.ld_w + q;
            if q >= cols {
                assert_eq!(back[k].bits32(), poison::<TW>().bits32(), "padding written");
                continue;
            }
            let (w, m, u) = (inp.w[k].to_f64(), merged_emu[k].to_f64(), back[k].to_f64());
            if !m.is_finite() {
                continue;
            }
            let bound = ulp::<TW>(w.abs().max(m.abs()));
            assert!(
                (u - w).abs() <= bound,
                "round trip at ({p},{q}): w {w:e} merged {m:e} back {u:e}, bound {bound:e} ({c:?})"
            );
        }
    }
    // Exact mode: records bit-identical across backends, bits restored, also crosswise.
    let cap = c.shape.elements();
    let (m_cpu, rec_cpu, st_cpu) = run_exact(&Cpu, &inp, c, cap);
    let (m_emu, rec_emu, st_emu) = run_exact(&Emu, &inp, c, cap);
    assert!(st_emu.valid && st_cpu.valid);
    assert_eq!(st_cpu, st_emu);
    assert_eq!(
        bits(&m_cpu),
        bits(&merged_cpu),
        "exact merge writes the plain merge"
    );
    assert_eq!(bits(&m_emu), bits(&merged_cpu));
    let n = rec_cpu.header[0] as usize;
    assert_eq!(rec_cpu.codes, rec_emu.codes, "codes differ");
    assert_eq!(rec_cpu.exc_index[..n], rec_emu.exc_index[..n]);
    assert_eq!(rec_cpu.exc_bits[..n], rec_emu.exc_bits[..n]);
    assert!(
        rec_emu.exc_index[..n].windows(2).all(|w| w[0] < w[1]),
        "exceptions not ordered"
    );
    let want = bits(&inp.w);
    assert_eq!(
        bits(&unmerge_with(&Emu, &m_emu, &inp, c, &rec_emu)),
        want,
        "emu exact"
    );
    assert_eq!(
        bits(&unmerge_with(&Cpu, &m_cpu, &inp, c, &rec_cpu)),
        want,
        "cpu exact"
    );
    assert_eq!(
        bits(&unmerge_with(&Cpu, &m_emu, &inp, c, &rec_emu)),
        want,
        "emu → cpu"
    );
    assert_eq!(
        bits(&unmerge_with(&Emu, &m_cpu, &inp, c, &rec_cpu)),
        want,
        "cpu → emu"
    );
}

fn cases() -> impl Strategy<Value = Case> {
    let dims = prop_oneof![
        Just(1usize),
        Just(2),
        Just(3),
        Just(15),
        Just(17),
        Just(127),
        1usize..300
    ];
    let big = if scale() >= 1.0 { 4097 } else { 1025 };
    (
        dims.clone(),
        prop_oneof![dims, Just(big)],
        prop_oneof![
            Just(0usize),
            Just(1),
            Just(3),
            Just(16),
            Just(17),
            1usize..40
        ],
        0usize..3,
        0usize..3,
        0usize..3,
        any::<bool>(),
        prop_oneof![Just(1.0f32), Just(-0.37), Just(2.0), Just(16.0)],
    )
        .prop_filter("small enough for the emulator", |t| t.0 * t.1 <= 60_000)
        .prop_map(|(d_out, d_in, rank, pw, pa, pb, fifo, scale)| {
            let mut shape = if fifo {
                MergeShape::fan_in_fan_out(d_out, d_in)
            } else {
                MergeShape::new(d_out, d_in)
            };
            shape.ld_w += pw;
            Case {
                shape,
                rank,
                lda: d_in + pa,
                ldb: rank + pb,
                scale,
            }
        })
}

proptest! {
    #![proptest_config(proptest_config(16))]

    #[test]
    fn f32_merge_bits_round_trip_exact(c in cases(), seed in any::<u64>()) {
        check_case::<f32, f32>(&c, seed);
    }

    #[test]
    fn f16_merge_bits_round_trip_exact(c in cases(), seed in any::<u64>()) {
        check_case::<f16, f16>(&c, seed);
    }

    #[test]
    fn bf16_merge_bits_round_trip_exact(c in cases(), seed in any::<u64>()) {
        check_case::<bf16, bf16>(&c, seed);
    }

    #[test]
    fn half_w_with_f32_adapters(c in cases(), seed in any::<u64>()) {
        check_case::<f16, f32>(&c, seed);
        check_case::<bf16, f32>(&c, seed ^ 1);
    }
}

/// fan_in_fan_out: W stored `[d_in, d_out]` gives, transposed, the row-major result bit for bit.
#[test]
fn fan_in_fan_out_equals_transposed() {
    let (d_out, d_in, rank) = (37, 301, 13);
    let row = Case {
        shape: MergeShape::new(d_out, d_in),
        rank,
        lda: d_in,
        ldb: rank,
        scale: 1.5,
    };
    let fifo = Case {
        shape: MergeShape::fan_in_fan_out(d_out, d_in),
        ..row.clone()
    };
    let inp = inputs::<bf16, bf16>(&row, 9, 0.02, 0.5);
    let mut wt = vec![bf16::ZERO; d_in * d_out];
    for i in 0..d_out {
        for j in 0..d_in {
            wt[j * d_out + i] = inp.w[i * d_in + j];
        }
    }
    let a = run(&Emu, &inp.w, &inp, &row, Direction::Merge);
    let t_emu = run(&Emu, &wt, &inp, &fifo, Direction::Merge);
    let t_cpu = run(&Cpu, &wt, &inp, &fifo, Direction::Merge);
    assert_eq!(bits(&t_emu), bits(&t_cpu));
    for i in 0..d_out {
        for j in 0..d_in {
            assert_eq!(
                a[i * d_in + j].to_bits(),
                t_emu[j * d_out + i].to_bits(),
                "({i},{j})"
            );
        }
    }
}

fn safe_case<B: Backend>(be: &B) {
    let c = Case {
        shape: MergeShape::new(33, 70),
        rank: 5,
        lda: 70,
        ldb: 5,
        scale: 2.0,
    };
    let mut inp = inputs::<f16, f16>(&c, 4, 0.02, 0.5);
    inp.b[3 * 5 + 2] = f16::INFINITY; // row 3 of the delta becomes ±inf / NaN
    let mut w = be.upload(&inp.w).unwrap();
    let (a, b) = (be.upload(&inp.a).unwrap(), be.upload(&inp.b).unwrap());
    let l = Lora::packed(&a, &b, 5, 70, 2.0);
    let mut scratch = MergeScratch::alloc::<f16>(be, &c.shape).unwrap();
    merge_safe(be, &mut w, &c.shape, &l, Direction::Merge, &mut scratch).unwrap();
    assert_eq!(
        bits(&be.download(&w).unwrap()),
        bits(&inp.w),
        "{}: W written",
        be.name()
    );
    assert_eq!(scratch.status(be).unwrap(), status::NONFINITE);
    // A finite adapter with a huge scale overflows f16: refused too.
    let inp2 = inputs::<f16, f16>(&c, 5, 0.02, 0.5);
    let (a2, b2) = (be.upload(&inp2.a).unwrap(), be.upload(&inp2.b).unwrap());
    let huge = Lora::packed(&a2, &b2, 5, 70, 1e30);
    scratch.clear_status(be).unwrap();
    merge_safe(
        be,
        &mut w,
        &c.shape,
        &huge,
        Direction::Unmerge,
        &mut scratch,
    )
    .unwrap();
    assert_eq!(bits(&be.download(&w).unwrap()), bits(&inp.w));
    assert_eq!(scratch.status(be).unwrap(), status::NONFINITE);
    // A finite merge goes through and equals the default mode.
    scratch.clear_status(be).unwrap();
    let ok = Lora::packed(&a2, &b2, 5, 70, 2.0);
    merge_safe(be, &mut w, &c.shape, &ok, Direction::Merge, &mut scratch).unwrap();
    assert_eq!(scratch.status(be).unwrap(), 0);
    let want = run(
        &Cpu,
        &inp.w,
        &Inputs {
            w: vec![],
            a: inp2.a.clone(),
            b: inp2.b.clone(),
        },
        &c,
        Direction::Merge,
    );
    assert_eq!(bits(&be.download(&w).unwrap()), bits(&want));
    // Exact + safe with the inf adapter: refused, record invalid, W untouched.
    let mut w = be.upload(&inp.w).unwrap();
    let mut rec = MergeRecord::alloc::<f16>(be, &c.shape, 1000).unwrap();
    merge_exact(be, &mut w, &c.shape, &l, &mut rec, true).unwrap();
    let st = rec.state(be).unwrap();
    assert!(!st.valid && st.status & status::NONFINITE != 0, "{st:?}");
    assert_eq!(bits(&be.download(&w).unwrap()), bits(&inp.w));
    // Applying an invalid record writes nothing and reports it.
    unmerge_exact(be, &mut w, &c.shape, &l, &mut rec).unwrap();
    assert_eq!(
        rec.state(be).unwrap().status & status::BAD_RECORD,
        status::BAD_RECORD
    );
    assert_eq!(bits(&be.download(&w).unwrap()), bits(&inp.w));
}

#[test]
fn safe_mode_refuses_non_finite_emu() {
    safe_case(&Emu);
}

#[test]
fn safe_mode_refuses_non_finite_cpu() {
    safe_case(&Cpu);
}

/// Capacity too small: nothing written, the needed count reported; a retry with that capacity
/// succeeds and restores W exactly.
fn overflow_case<B: Backend>(be: &B) {
    let c = Case {
        shape: MergeShape::new(64, 300),
        rank: 16,
        lda: 300,
        ldb: 16,
        scale: 40.0,
    };
    let inp = inputs::<bf16, bf16>(&c, 11, 0.02, 0.5);
    let (m, _, st) = run_exact(be, &inp, &c, 0);
    assert!(
        !st.valid && st.exceptions > 0,
        "{st:?}: the test needs exceptions"
    );
    assert_eq!(st.status, status::OVERFLOW);
    assert_eq!(bits(&m), bits(&inp.w), "refused merge wrote W");
    let need = st.exceptions as usize;
    let (m, _, st) = run_exact(be, &inp, &c, need - 1);
    assert!(!st.valid && st.exceptions as usize == need);
    assert_eq!(bits(&m), bits(&inp.w));
    let (m, rec, st) = run_exact(be, &inp, &c, need);
    assert!(st.valid && st.status == 0);
    assert_eq!(bits(&unmerge_with(be, &m, &inp, &c, &rec)), bits(&inp.w));
}

#[test]
fn exact_capacity_overflow_emu() {
    overflow_case(&Emu);
}

#[test]
fn exact_capacity_overflow_cpu() {
    overflow_case(&Cpu);
}

/// Several adapters merged in stack order, unmerged in reverse: exact restores the bits; the
/// default stack is bit-identical on cpu and emu and within the bound adapter by adapter.
#[test]
fn stack_of_adapters() {
    let shape = MergeShape::new(45, 200);
    let ranks = [8usize, 3, 17];
    let mut r = rng(21);
    let w0: Vec<f16> = (0..45 * 200)
        .map(|_| f16::from_f64(normal(&mut r, 0.02)))
        .collect();
    let ab: Vec<(Vec<f16>, Vec<f16>)> = ranks
        .iter()
        .map(|&k| {
            (
                (0..k * 200)
                    .map(|_| f16::from_f64(r.random_range(-0.07..0.07)))
                    .collect(),
                (0..45 * k)
                    .map(|_| f16::from_f64(normal(&mut r, 0.5)))
                    .collect(),
            )
        })
        .collect();
    let mut out = Vec::new();
    for name in ["cpu", "emu"] {
        let run_stack = |w: &mut Vec<f16>| {
            macro_rules! go {
                ($be:expr) => {{
                    let be = $be;
                    let bufs: Vec<_> = ab
                        .iter()
                        .map(|(a, b)| (be.upload(a).unwrap(), be.upload(b).unwrap()))
                        .collect();
                    let loras: Vec<_> = bufs
                        .iter()
                        .zip(ranks)
                        .map(|((a, b), k)| Lora::packed(a, b, k, 200, 2.0 / k as f32))
                        .collect();
                    let mut wb = be.upload(w).unwrap();
                    merge_stack(&be, &mut wb, &shape, &loras).unwrap();
                    let merged = be.download(&wb).unwrap();
                    let mut recs: Vec<_> = ranks
                        .iter()
                        .map(|_| MergeRecord::alloc::<f16>(&be, &shape, 45 * 200 / 4).unwrap())
                        .collect();
                    let mut we = be.upload(w).unwrap();
                    assert_eq!(
                        merge_stack_exact(&be, &mut we, &shape, &loras, &mut recs, true).unwrap(),
                        None
                    );
                    assert_eq!(bits(&be.download(&we).unwrap()), bits(&merged));
                    unmerge_stack_exact(&be, &mut we, &shape, &loras, &mut recs).unwrap();
                    assert_eq!(bits(&be.download(&we).unwrap()), bits(w), "exact stack");
                    // A record too small for the second adapter: the first is rolled back.
                    recs[1] = MergeRecord::alloc::<f16>(&be, &shape, 0).unwrap();
                    let mut big = loras.clone();
                    big[1].scale *= 300.0;
                    let mut wr = be.upload(w).unwrap();
                    let got =
                        merge_stack_exact(&be, &mut wr, &shape, &big, &mut recs, false).unwrap();
                    assert_eq!(got, Some(1));
                    assert_eq!(bits(&be.download(&wr).unwrap()), bits(w), "rollback");
                    unmerge_stack(&be, &mut wb, &shape, &loras).unwrap();
                    *w = merged;
                    be.download(&wb).unwrap()
                }};
            }
            if name == "cpu" {
                go!(Cpu)
            } else {
                go!(Emu)
            }
        };
        let mut w = w0.clone();
        let back = run_stack(&mut w);
        out.push((w, back));
    }
    assert_eq!(bits(&out[0].0), bits(&out[1].0), "stack merge cpu vs emu");
    assert_eq!(bits(&out[0].1), bits(&out[1].1), "stack unmerge cpu vs emu");
}

/// Record size at a Llama-like shape (scaled rows; 4096 columns): the numbers in the module docs
/// come from `cargo run --release --example merge_record_size` at 4096 × 4096.
#[test]
fn llama_like_record_is_small_and_backend_independent() {
    let rows = scaled(64, 16);
    for dt in [DType::F16, DType::BF16] {
        let c = Case {
            shape: MergeShape::new(rows, 4096),
            rank: 16,
            lda: 4096,
            ldb: 16,
            scale: 2.0,
        };
        let (n_cpu, n_emu, codes) = match dt {
            DType::F16 => {
                let inp = inputs::<f16, f16>(&c, 77, 0.02, 0.02);
                let (_, rc, sc) = run_exact(&Cpu, &inp, &c, rows * 4096 / 16);
                let (_, re, se) = run_exact(&Emu, &inp, &c, rows * 4096 / 16);
                assert_eq!(rc, re);
                (sc.exceptions, se.exceptions, rc.codes.len())
            }
            _ => {
                let inp = inputs::<bf16, bf16>(&c, 77, 0.02, 0.02);
                let (_, rc, sc) = run_exact(&Cpu, &inp, &c, rows * 4096 / 16);
                let (_, re, se) = run_exact(&Emu, &inp, &c, rows * 4096 / 16);
                assert_eq!(rc, re);
                (sc.exceptions, se.exceptions, rc.codes.len())
            }
        };
        assert_eq!(n_cpu, n_emu);
        assert_eq!(codes, rows * 4096 / 16);
        // Measured ≈ 0.9 % (f16) at 4096 × 4096: the elements with |W| ≪ |s·B·A| (DESIGN.md §4).
        assert!(
            (n_cpu as usize) * 40 <= rows * 4096,
            "{dt}: {n_cpu} exceptions in {} elements",
            rows * 4096
        );
    }
}

fn invalid_arg(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn rejects<B: Backend>(be: &B) {
    let shape = MergeShape::new(4, 10);
    let w0 = vec![f16::from_f32(0.5); 40];
    let mut w = be.upload(&w0).unwrap();
    let a = be.upload(&[f16::ONE; 30]).unwrap();
    let b = be.upload(&[f16::ONE; 12]).unwrap();
    let short_a = be.upload(&[f16::ONE; 29]).unwrap();
    let short_b = be.upload(&[f16::ONE; 11]).unwrap();
    let good = Lora::packed(&a, &b, 3, 10, 1.0);
    let err = |r: lora_kernels::Result<()>| invalid_arg(r.unwrap_err());
    assert_eq!(
        err(merge::merge(
            be,
            &mut w,
            &shape,
            &Lora::packed(&short_a, &b, 3, 10, 1.0)
        )),
        "a"
    );
    assert_eq!(
        err(merge::merge(
            be,
            &mut w,
            &shape,
            &Lora::packed(&a, &short_b, 3, 10, 1.0)
        )),
        "b"
    );
    assert_eq!(
        err(merge::merge(
            be,
            &mut w,
            &shape,
            &Lora {
                scale: f32::NAN,
                ..good
            }
        )),
        "scale"
    );
    assert_eq!(
        err(merge::merge(
            be,
            &mut w,
            &shape,
            &Lora {
                scale: f32::INFINITY,
                ..good
            }
        )),
        "scale"
    );
    assert_eq!(
        err(merge::merge(be, &mut w, &shape, &Lora { lda: 9, ..good })),
        "lda"
    );
    assert_eq!(
        err(merge::merge(be, &mut w, &shape, &Lora { ldb: 2, ..good })),
        "ldb"
    );
    assert_eq!(
        err(merge::merge(
            be,
            &mut w,
            &MergeShape { ld_w: 9, ..shape },
            &good
        )),
        "ld_w"
    );
    // fan_in_fan_out stores [d_in, d_out]: ld_w ≥ d_out.
    assert_eq!(
        err(merge::merge(
            be,
            &mut w,
            &MergeShape {
                ld_w: 3,
                ..MergeShape::fan_in_fan_out(4, 10)
            },
            &good
        )),
        "ld_w"
    );
    let mut short_w = be.upload(&w0[..39]).unwrap();
    assert_eq!(err(merge::merge(be, &mut short_w, &shape, &good)), "w");
    let huge = MergeShape::new(i32::MAX as usize + 1, 1);
    assert_eq!(err(merge::merge(be, &mut w, &huge, &good)), "d_out");
    // Dtypes: A/B must be W's dtype or f32.
    let a_bf = be.upload(&[bf16::ONE; 30]).unwrap();
    let b_bf = be.upload(&[bf16::ONE; 12]).unwrap();
    assert!(matches!(
        merge::merge(be, &mut w, &shape, &Lora::packed(&a_bf, &b_bf, 3, 10, 1.0)),
        Err(Error::UnsupportedDtype { arg: "a", .. })
    ));
    // Records and scratch of another shape or dtype.
    let mut rec = MergeRecord::alloc::<f16>(be, &MergeShape::new(4, 9), 4).unwrap();
    assert_eq!(
        err(merge_exact(be, &mut w, &shape, &good, &mut rec, false)),
        "record"
    );
    let mut rec = MergeRecord::alloc::<bf16>(be, &shape, 4).unwrap();
    assert_eq!(
        err(unmerge_exact(be, &mut w, &shape, &good, &mut rec)),
        "record"
    );
    let mut recs = vec![MergeRecord::alloc::<f16>(be, &shape, 4).unwrap()];
    assert_eq!(
        invalid_arg(
            merge_stack_exact(be, &mut w, &shape, &[good, good], &mut recs, false).unwrap_err()
        ),
        "records"
    );
    if be.launchers().is_some() {
        let mut small = MergeScratch::alloc::<f16>(be, &MergeShape::new(1, 1)).unwrap();
        assert_eq!(
            err(merge_safe(
                be,
                &mut w,
                &MergeShape::new(4, 10),
                &good,
                Direction::Merge,
                &mut small
            )),
            "workspace"
        );
    }
    assert_eq!(
        bits(&be.download(&w).unwrap()),
        bits(&w0),
        "rejected calls wrote W"
    );
}

#[test]
fn rejects_bad_input_emu() {
    rejects(&Emu);
}

#[test]
fn rejects_bad_input_cpu() {
    rejects(&Cpu);
}

/// The C launcher's own validation (what a C caller meets).
#[test]
fn c_launcher_validation() {
    let mut w = vec![0.5f32; 40];
    let a = [1.0f32; 30];
    let b = [1.0f32; 12];
    let base = sys::LkMergeParams {
        w: w.as_mut_ptr().cast(),
        a: a.as_ptr().cast(),
        b: b.as_ptr().cast(),
        status: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        codes: std::ptr::null_mut(),
        exc_index: std::ptr::null_mut(),
        exc_bits: std::ptr::null_mut(),
        record_header: std::ptr::null_mut(),
        ld_w: 10,
        lda: 10,
        ldb: 3,
        exc_capacity: 0,
        d_out: 4,
        d_in: 10,
        rank: 3,
        scale: 1.0,
        w_dtype: sys::LkDtype::LK_F32 as i32,
        ab_dtype: sys::LkDtype::LK_F32 as i32,
        direction: 0,
        fan_in_fan_out: 0,
        flags: 0,
    };
    let call = |p: &sys::LkMergeParams| unsafe { sys::lk_emu_merge_apply(p, std::ptr::null_mut()) };
    let inv = sys::LK_ERR_INVALID_ARGUMENT as i32;
    let mut ws = vec![0u64; 1024];
    assert_eq!(
        unsafe { sys::lk_emu_merge_apply(std::ptr::null(), std::ptr::null_mut()) },
        inv
    );
    for p in [
        sys::LkMergeParams { d_out: -1, ..base },
        sys::LkMergeParams {
            direction: 2,
            ..base
        },
        sys::LkMergeParams {
            fan_in_fan_out: 2,
            ..base
        },
        sys::LkMergeParams { flags: 4, ..base },
        sys::LkMergeParams {
            flags: 3,
            direction: 1,
            ..base
        },
        sys::LkMergeParams {
            scale: f32::INFINITY,
            ..base
        },
        sys::LkMergeParams { ld_w: 9, ..base },
        sys::LkMergeParams { lda: 9, ..base },
        sys::LkMergeParams { ldb: 2, ..base },
        sys::LkMergeParams {
            exc_capacity: -1,
            ..base
        },
        sys::LkMergeParams {
            w: std::ptr::null_mut(),
            ..base
        },
        sys::LkMergeParams { flags: 1, ..base }, // safe without workspace
        sys::LkMergeParams {
            flags: 1,
            workspace: ws.as_mut_ptr().cast::<u8>().wrapping_add(4).cast(),
            ..base
        }, // safe with a misaligned workspace (64-bit offsets inside: a GPU fault)
        sys::LkMergeParams {
            flags: 2,
            workspace: w.as_mut_ptr().cast(),
            ..base
        }, // exact without record
    ] {
        assert_eq!(call(&p), inv, "{p:?}");
    }
    let p = sys::LkMergeParams {
        w_dtype: 1,
        ab_dtype: 2,
        ..base
    };
    assert_eq!(call(&p), sys::LK_ERR_UNSUPPORTED_DTYPE as i32);
    assert_eq!(call(&base), 0);
    assert!(w.iter().all(|&v| v == 3.5), "0.5 + 3 · 1 · 1 = 3.5");
}
