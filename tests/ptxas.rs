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

/// `__global__` kernels of `cuda/*.cu` as (file, name, has `__launch_bounds__`), from the source.
fn kernels_in_source() -> Vec<(String, String, bool)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    for path in files {
        let src = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for (at, _) in src.match_indices("__global__") {
            // `__global__ void [__launch_bounds__(...)] name(`: the name is the identifier before
            // the first `(` that does not open the launch bounds.
            let rest = src[at + "__global__".len()..].trim_start();
            let rest = rest.strip_prefix("void").unwrap_or(rest).trim_start();
            let bounded = rest.starts_with("__launch_bounds__");
            let rest = if bounded {
                let mut depth = 0;
                let end = rest
                    .char_indices()
                    .find(|&(_, c)| {
                        match c {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            _ => return false,
                        }
                        c == ')' && depth == 0
                    })
                    .map(|(i, _)| i + 1)
                    .unwrap();
                rest[end..].trim_start()
            } else {
                rest
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                !name.is_empty(),
                "{file}: cannot parse the kernel after byte {at}"
            );
            out.push((file.clone(), name, bounded));
        }
    }
    out
}

/// Registers × threads per block must fit the SM's 64 Ki registers or the launch fails on the GPU
/// ("too many resources requested for launch") — the emulator cannot see it. `__launch_bounds__(N)`
/// makes ptxas itself keep every launch of ≤ N threads within the budget, so every library kernel
/// declares it; only the emulator self-test kernels (cuda/selftest.cu) go without.
#[test]
fn every_library_kernel_declares_launch_bounds() {
    let kernels = kernels_in_source();
    assert!(kernels.len() > 40, "parsed only {kernels:?}");
    let missing: Vec<_> = kernels
        .iter()
        .filter(|(file, _, bounded)| !bounded && file != "selftest.cu")
        .collect();
    assert!(
        missing.is_empty(),
        "kernels without __launch_bounds__ (add it, with the block size they are launched with): {missing:?}"
    );
}

/// Kernels without launch bounds may be launched with up to 1024 threads: that needs ≤ 64 registers
/// per thread (64 × 1024 = the SM's 65 536).
#[cfg(feature = "cuda")]
#[test]
fn kernels_without_launch_bounds_fit_1024_threads() {
    let report =
        std::fs::read_to_string(env!("LK_PTXAS_REPORT")).expect("ptxas report from the build");
    let compiled = parse_report(&report);
    let mut checked = 0;
    for (file, name, bounded) in kernels_in_source() {
        if bounded {
            continue;
        }
        // Itanium mangling: the identifier appears as <length><name>.
        let needle = format!("{}{}", name.len(), name);
        for k in compiled.iter().filter(|k| k.name.contains(&needle)) {
            checked += 1;
            assert!(
                k.registers * 1024 <= 65536,
                "{file}: {name} ({}) uses {} registers and has no __launch_bounds__: a 1024-thread \
                 launch would fail on the GPU",
                k.arch,
                k.registers
            );
        }
    }
    assert!(checked > 0, "no unbounded kernel found in the report");
}
