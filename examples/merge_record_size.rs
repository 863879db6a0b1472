//! Size of an exact-merge correction record on a Llama-shaped weight (the numbers in the
//! `merge` module docs): W 4096 × 4096 ~ N(0, 0.02), A ~ U(±1/√d_in), B ~ N(0, 0.02), rank 16,
//! scale 2 (alpha 32), f16 and bf16, on the cpu reference and the emulator (bit-identical records).
//!
//! `cargo run --release --example merge_record_size [rows] [scale]`

use lora_kernels::merge::{merge_exact, Lora, MergeFloat, MergeRecord, MergeShape};
use lora_kernels::{bf16, f16, Backend, Cpu, Emu};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn normal(r: &mut StdRng, sd: f64) -> f64 {
    let u1: f64 = r.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = r.random_range(0.0..1.0);
    sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn measure<B: Backend, T: MergeFloat>(be: &B, rows: usize, scale: f32) -> lora_kernels::Result<()> {
    let (d_in, rank) = (4096usize, 16usize);
    let mut r = StdRng::seed_from_u64(1);
    let w: Vec<T> = (0..rows * d_in)
        .map(|_| T::from_f64(normal(&mut r, 0.02)))
        .collect();
    let a: Vec<T> = (0..rank * d_in)
        .map(|_| T::from_f64(r.random_range(-1.0..1.0) / (d_in as f64).sqrt()))
        .collect();
    let b: Vec<T> = (0..rows * rank)
        .map(|_| T::from_f64(normal(&mut r, 0.02)))
        .collect();
    let shape = MergeShape::new(rows, d_in);
    let (mut wb, ab, bb) = (be.upload(&w)?, be.upload(&a)?, be.upload(&b)?);
    let lora = Lora::packed(&ab, &bb, rank, d_in, scale);
    let mut rec = MergeRecord::alloc::<T>(be, &shape, rows * d_in / 16)?;
    let t = std::time::Instant::now();
    merge_exact(be, &mut wb, &shape, &lora, &mut rec, false)?;
    let st = rec.state(be)?;
    let host = rec.to_host(be)?;
    let n = rows * d_in;
    println!(
        "{:>3} {:>4} {rows}x{d_in} rank {rank} scale {scale}: exceptions {} ({:.3} %), codes {} KiB, \
         list {} KiB, record {:.3} bits/element, valid {} ({:.1} s)",
        be.name(),
        T::DTYPE,
        st.exceptions,
        100.0 * st.exceptions as f64 / n as f64,
        host.codes.len() * 4 / 1024,
        st.exceptions as usize * 12 / 1024,
        host.used_bytes() as f64 * 8.0 / n as f64,
        st.valid,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> lora_kernels::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let scale = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    measure::<_, f16>(&Cpu, rows, scale)?;
    measure::<_, f16>(&Emu, rows, scale)?;
    measure::<_, bf16>(&Cpu, rows, scale)?;
    measure::<_, bf16>(&Emu, rows, scale)?;
    Ok(())
}
