//! The zero-spill gate: no kernel may spill registers or need a stack frame (local memory traffic
//! on the hot path). The report comes from the nvcc build (`--features cuda`).

use lora_kernels::ptxas::parse_report;

#[test]
fn parser_finds_spills_in_a_spilling_sample() {
    let sample = include_str!("data/ptxas_spill_sample.txt");
    let kernels = parse_report(sample);
    assert_eq!(kernels.len(), 3, "{kernels:#?}");
    let spiller = kernels.iter().find(|k| k.name.contains("spills")).unwrap();
    assert_eq!((spiller.arch.as_str(), spiller.registers), ("sm_90", 255));
    assert_eq!(
        (
            spiller.stack_frame_bytes,
            spiller.spill_store_bytes,
            spiller.spill_load_bytes
        ),
        (1024, 1020, 1016)
    );
    assert!(spiller.uses_local_memory());
    let clean = kernels.iter().find(|k| k.name.contains("clean")).unwrap();
    assert_eq!((clean.registers, clean.shared_bytes), (40, 4096));
    assert!(!clean.uses_local_memory());
    let device_fn = kernels
        .iter()
        .find(|k| k.name == "helper_device_fn")
        .unwrap();
    assert_eq!(device_fn.stack_frame_bytes, 16);
}

#[cfg(feature = "cuda")]
#[test]
fn no_kernel_spills_or_has_a_stack_frame() {
    let report =
        std::fs::read_to_string(env!("LK_PTXAS_REPORT")).expect("ptxas report from the build");
    let kernels = parse_report(&report);
    assert!(
        kernels
            .iter()
            .any(|k| k.name.contains("shrink_dense_kernel")),
        "report has no kernels:\n{report}"
    );
    let bad: Vec<_> = kernels.iter().filter(|k| k.uses_local_memory()).collect();
    assert!(
        bad.is_empty(),
        "kernels using local memory (spills/stack):\n{bad:#?}"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
#[ignore = "kernels are compiled by nvcc only with --features cuda"]
fn no_kernel_spills_or_has_a_stack_frame() {}
