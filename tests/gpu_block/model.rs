//! GPU trials: the reference model (issue #7) trained and served on cuda against the cpu backend.

use crate::common::block::*;
use crate::GpuTest;
use libtest_mimic::Failed;
use lora_kernels::demo::{self, DemoConfig};
use lora_kernels::Cpu;

pub const TESTS: &[(&str, GpuTest)] = &[
    ("block_training_losses_match_cpu", |d| {
        // Tolerance as tests/block.rs::emu_training_matches_cpu (f32 FMA chains vs f64).
        let cpu = losses_on(&Cpu, 3);
        let gpu = losses_on(d, 3);
        for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            if (c - g).abs() > 1e-4 * c.abs() {
                return Err(Failed::from(format!("step {i}: cpu {c} vs cuda {g}")));
            }
        }
        Ok(())
    }),
    ("block_same_seed_same_losses", |d| {
        let a: Vec<u64> = losses_on(d, 2).iter().map(|v| v.to_bits()).collect();
        let b: Vec<u64> = losses_on(d, 2).iter().map(|v| v.to_bits()).collect();
        if a != b {
            return Err(Failed::from(format!("{a:?} vs {b:?}")));
        }
        Ok(())
    }),
    ("block_serving_matches_training_forward", |d| {
        serving_matches_training_forward(d);
        Ok(())
    }),
    ("block_reduced_demo", |d| {
        let dir = tempfile::tempdir().map_err(|e| Failed::from(e.to_string()))?;
        let mut cfg = DemoConfig::reduced();
        cfg.out_dir = dir.path().to_path_buf();
        let r = demo::run(d, &cfg, &mut demo::Quiet).map_err(|e| Failed::from(e.to_string()))?;
        if r.backend != "cuda" || r.adapters.len() != 3 || r.merged_max_rel_diff > 1e-2 {
            return Err(Failed::from(format!("{r:?}")));
        }
        Ok(())
    }),
];
