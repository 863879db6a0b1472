//! The `lora-kernels` binary on temp dirs: happy paths, and every malformed input exits 1 with a
//! message and leaves `--out` (and the record) absent, with no temporary file behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora_kernels::peft::{MappedTensors, TensorFileWriter};
use safetensors::tensor::Dtype as StDtype;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft")
        .join(case)
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-kernels"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap()
}

fn tensors(path: &Path) -> Vec<(String, StDtype, Vec<usize>, Vec<u8>)> {
    let m = MappedTensors::open(path).unwrap();
    let st = m.parse().unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_tensors(path: &Path, t: Vec<(String, StDtype, Vec<usize>, Vec<u8>)>) {
    let mut w = TensorFileWriter::default();
    for (n, d, s, b) in t {
        w.push(n, d, s, b);
    }
    w.write(&mut std::fs::File::create(path).unwrap(), &mut |_| {})
        .unwrap();
}

fn only_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn merge_unmerge_inspect_happy_paths() {
    for backend in ["cpu", "emu"] {
        for case in ["llama_bf16", "llama_f16_regex", "gpt2_f32_fan_in_fan_out"] {
            let tmp = tempfile::tempdir().unwrap();
            let (out, rec, back) = (
                tmp.path().join("m.safetensors"),
                tmp.path().join("m.rec"),
                tmp.path().join("b.safetensors"),
            );
            let f = fixture(case);
            let o = run(&[
                &"merge",
                &"--base",
                &f.join("base.safetensors"),
                &"--adapter",
                &f.join("adapter"),
                &"--out",
                &out,
                &"--exact-record",
                &rec,
                &"--backend",
                &backend,
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let o = run(&[
                &"unmerge",
                &"--base",
                &out,
                &"--adapter",
                &f.join("adapter"),
                &"--out",
                &back,
                &"--exact-record",
                &rec,
                &"--backend",
                &backend,
                &"-q",
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(
                tensors(&back),
                tensors(&f.join("base.safetensors")),
                "{case} {backend}: bit-exact"
            );
            assert_eq!(
                only_files(tmp.path()),
                ["b.safetensors", "m.rec", "m.safetensors"]
            );
        }
    }
    // Default backend (cpu without a GPU), no record.
    let tmp = tempfile::tempdir().unwrap();
    let f = fixture("llama_bf16");
    let out = tmp.path().join("m.safetensors");
    let o = run(&[
        &"merge",
        &"--base",
        &f.join("base.safetensors"),
        &"--adapter",
        &f.join("adapter"),
        &"--out",
        &out,
    ]);
    assert!(o.status.success());
    assert_eq!(
        tensors(&out).len(),
        tensors(&f.join("base.safetensors")).len()
    );
    let o = run(&[&"inspect", &f.join("adapter"), &"--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["modules"].as_array().unwrap().len(), 6);
    assert_eq!(v["modules"][0]["name"], "model.layers.0.mlp.up_proj");
    assert_eq!(v["modules"][0]["scale"], 0.5);
    let o = run(&[&"inspect", &f.join("adapter")]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("model.layers.1.self_attn.v_proj"));
}

/// Runs a merge that must fail: exit 1, an error message containing `needle`, no output, no temp.
fn expect_failure(tmp: &Path, base: &Path, adapter: &Path, extra: &[&str], needle: &str) {
    let out = tmp.join("out.safetensors");
    let before = only_files(tmp);
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"merge",
        &"--base",
        &base,
        &"--adapter",
        &adapter,
        &"--out",
        &out,
    ];
    for e in extra {
        args.push(e);
    }
    let o = run(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{needle}: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!out.exists(), "{needle}: --out must stay absent");
    assert_eq!(only_files(tmp), before, "{needle}: no temporary file left");
}

fn adapter_copy(
    tmp: &Path,
    edit_cfg: impl FnOnce(&mut serde_json::Value),
    edit: impl FnOnce(&mut Vec<(String, StDtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let src = fixture("llama_bf16").join("adapter");
    let dir = tmp.join(format!("adapter-{}", only_files(tmp).len()));
    std::fs::create_dir(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut t = tensors(&src.join("adapter_model.safetensors"));
    edit(&mut t);
    write_tensors(&dir.join("adapter_model.safetensors"), t);
    dir
}

const QB: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

#[test]
fn every_malformed_input_is_an_error_and_out_stays_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base = fixture("llama_bf16").join("base.safetensors");
    let good = fixture("llama_bf16").join("adapter");
    // Adapter problems.
    let a = adapter_copy(t, |c| c["use_dora"] = true.into(), |_| {});
    expect_failure(t, &base, &a, &[], "use_dora");
    let a = adapter_copy(t, |c| c["bias"] = "all".into(), |_| {});
    expect_failure(t, &base, &a, &[], "bias");
    let a = adapter_copy(
        t,
        |c| {
            c.as_object_mut().unwrap().remove("lora_alpha");
        },
        |_| {},
    );
    expect_failure(t, &base, &a, &[], "lora_alpha");
    let a = adapter_copy(t, |_| {}, |v| v.retain(|x| x.0 != QB));
    expect_failure(t, &base, &a, &[], "missing tensor");
    let a = adapter_copy(t, |c| c["r"] = 8.into(), |_| {});
    expect_failure(t, &base, &a, &[], "rank");
    let a = adapter_copy(
        t,
        |_| {},
        |v| {
            let b = v.iter_mut().find(|x| x.0 == QB).unwrap();
            b.2 = vec![16, 32];
            b.3.truncate(1024);
        },
    );
    expect_failure(t, &base, &a, &[], "shape");
    let a = adapter_copy(
        t,
        |_| {},
        |v| {
            v.iter_mut().find(|x| x.0 == QB).unwrap().3[0..2]
                .copy_from_slice(&0x7fc0u16.to_le_bytes())
        },
    );
    expect_failure(t, &base, &a, &[], "non-finite");
    let a = adapter_copy(t, |_| {}, |_| {});
    let bytes = std::fs::read(a.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        a.join("adapter_model.safetensors"),
        &bytes[..bytes.len() - 3],
    )
    .unwrap();
    expect_failure(t, &base, &a, &[], "invalid safetensors");
    let a = adapter_copy(t, |_| {}, |_| {});
    std::fs::write(a.join("adapter_config.json"), "{not json").unwrap();
    expect_failure(t, &base, &a, &[], "invalid JSON");
    expect_failure(t, &base, &t.join("no-such-dir"), &[], "adapter_config.json");
    // Base problems: truncated, missing module, wrong shape, quantized, absent.
    let bb = std::fs::read(&base).unwrap();
    let trunc = t.join("trunc.bin");
    std::fs::write(&trunc, &bb[..bb.len() / 2]).unwrap();
    expect_failure(t, &trunc, &good, &[], "invalid safetensors");
    let mut bt = tensors(&base);
    bt.retain(|x| x.0 != "model.layers.1.mlp.up_proj.weight");
    let missing = t.join("missing.bin");
    write_tensors(&missing, bt);
    expect_failure(t, &missing, &good, &[], "model.layers.1.mlp.up_proj.weight");
    let mut bt = tensors(&base);
    bt.iter_mut()
        .find(|x| x.0 == "model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .2 = vec![16, 64];
    let shaped = t.join("shaped.bin");
    write_tensors(&shaped, bt);
    expect_failure(t, &shaped, &good, &[], "shape");
    let mut bt = tensors(&base);
    let q = bt
        .iter_mut()
        .find(|x| x.0 == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    q.1 = StDtype::U8;
    q.2 = vec![32, 64];
    let quant = t.join("quant.bin");
    write_tensors(&quant, bt);
    expect_failure(t, &quant, &good, &[], "quantized");
    expect_failure(
        t,
        &t.join("absent.safetensors"),
        &good,
        &[],
        "absent.safetensors",
    );
    // A merge producing non-finite weights (finite but huge B) is refused.
    let a = adapter_copy(
        t,
        |_| {},
        |v| {
            for c in v
                .iter_mut()
                .find(|x| x.0 == QB)
                .unwrap()
                .3
                .chunks_exact_mut(2)
            {
                c.copy_from_slice(&0x7f7fu16.to_le_bytes()); // bf16 max
            }
        },
    );
    expect_failure(t, &base, &a, &[], "non-finite weights");
    // Backend choice.
    #[cfg(not(feature = "cuda"))]
    expect_failure(
        t,
        &base,
        &good,
        &["--backend", "cuda"],
        "without the `cuda` feature",
    );
    // Usage errors exit 2.
    assert_eq!(run(&[&"merge", &"--base", &base]).status.code(), Some(2));
    assert_eq!(
        run(&[&"inspect", &good, &"--backend", &"tpu"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn bad_records_are_errors_and_out_stays_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let f = fixture("llama_bf16");
    let (merged, rec) = (t.join("m.safetensors"), t.join("m.rec"));
    let o = run(&[
        &"merge",
        &"--base",
        &f.join("base.safetensors"),
        &"--adapter",
        &f.join("adapter"),
        &"--out",
        &merged,
        &"--exact-record",
        &rec,
    ]);
    assert!(o.status.success());
    let unmerge = |base: &Path, adapter: &Path, rec: &Path, needle: &str| {
        let out = t.join("u.safetensors");
        let o = run(&[
            &"unmerge",
            &"--base",
            &base,
            &"--adapter",
            &adapter,
            &"--out",
            &out,
            &"--exact-record",
            &rec,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "expected `{needle}` in {err}");
        assert!(!out.exists());
    };
    // A record applied to the base instead of the merged weights.
    unmerge(
        &f.join("base.safetensors"),
        &f.join("adapter"),
        &rec,
        "not the one this record's merge produced",
    );
    // A record of another adapter.
    let other = fixture("llama_f16_regex").join("adapter");
    let o = run(&[
        &"merge",
        &"--base",
        &fixture("llama_f16_regex").join("base.safetensors"),
        &"--adapter",
        &other,
        &"--out",
        &t.join("o.safetensors"),
        &"--exact-record",
        &t.join("o.rec"),
    ]);
    assert!(o.status.success());
    unmerge(
        &merged,
        &f.join("adapter"),
        &t.join("o.rec"),
        "no entry for module",
    );
    // Truncated, absent and non-record files.
    let bytes = std::fs::read(&rec).unwrap();
    std::fs::write(t.join("short.rec"), &bytes[..bytes.len() - 8]).unwrap();
    unmerge(
        &merged,
        &f.join("adapter"),
        &t.join("short.rec"),
        "exact record",
    );
    unmerge(
        &merged,
        &f.join("adapter"),
        &t.join("none.rec"),
        "exact record",
    );
    unmerge(
        &merged,
        &f.join("adapter"),
        &f.join("base.safetensors"),
        "not a `lora-kernels exact merge record v1` file",
    );
}
