//! PEFT parity (fixtures made by real PEFT: scripts/make-peft-fixtures.sh, versions in
//! tests/fixtures/peft/VERSIONS.json), the loader's validation, and the adapter registry.
//!
//! Tolerances: a merged element must be **as close to the f64 reference** `W + s·B·A` (s = PEFT's
//! f64 scale, inputs the stored values) **as PEFT's** in aggregate (Σ|err| and max |err| per
//! tensor), and within one ulp of the dtype of the reference per element (our merge rounds once;
//! PEFT rounds the delta to the dtype and again on the add). The LoRA forward (BGMV, f32 out) must be
//! within f32 accumulation error of an f64 reference and within the dtype's rounding of PEFT's output
//! (`8 · eps(dtype) · (|y_base| + Σ|s·B·u|)` per element: PEFT's bf16/f16 path rounds x·Aᵀ, the
//! product with B, the scaling and the add, each ≤ ½ eps relative).

use std::path::{Path, PathBuf};

use lora_kernels::adapter::{ExpandMode, Slice};
use lora_kernels::bgmv::Bgmv;
use lora_kernels::peft::{
    decode, merge_file, HostTensor, MappedTensors, MergeOp, MergeOptions, PeftAdapter, PeftError,
    TensorFileWriter,
};
use lora_kernels::registry::{AdapterRegistry, LayerSpec};
use lora_kernels::{bf16, f16, Backend, Cpu, DType, Emu};
use safetensors::tensor::Dtype as StDtype;

const CASES: &[&str] = &[
    "llama_f32_rslora_patterns",
    "llama_f16_regex",
    "llama_bf16",
    "llama_bf16_f32_adapter",
    "gpt2_f32_fan_in_fan_out",
];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft")
        .join(case)
}

/// (dtype, shape, f64 values) of every tensor of a safetensors file.
fn read_all(path: &Path) -> Vec<(String, StDtype, Vec<usize>, Vec<u8>)> {
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

fn dt(d: StDtype) -> DType {
    match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn f64s(d: StDtype, bytes: &[u8]) -> Vec<f64> {
    decode(dt(d), bytes)
        .to_f32()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn eps(d: DType) -> f64 {
    match d {
        DType::F32 => f64::powi(2.0, -23),
        DType::F16 => f64::powi(2.0, -10),
        DType::BF16 => f64::powi(2.0, -7),
        DType::F64 => f64::EPSILON,
    }
}

/// Spacing of the dtype's values at |v| (normal range; subnormal floor).
fn ulp(d: DType, v: f64) -> f64 {
    let min_normal = match d {
        DType::F16 => f64::powi(2.0, -14),
        _ => f64::powi(2.0, -126),
    };
    let e = v.abs().max(min_normal).log2().floor();
    f64::powi(2.0, e as i32) * eps(d)
}

/// (f64 reference, f32 arithmetic bound per element: (rank + 2) · 2⁻²⁴ · |s|·Σ|B·A| — the f32 FMA
/// chain, the scale rounded to f32 and the final FMA).
fn reference_merge(
    base: &[f64],
    m: &lora_kernels::peft::LoraModule,
    fan: bool,
) -> (Vec<f64>, Vec<f64>) {
    let (a, b) = (m.a.to_f32(), m.b.to_f32());
    let mut out = base.to_vec();
    let mut bound = vec![0.0; base.len()];
    for i in 0..m.d_out {
        for j in 0..m.d_in {
            let (mut acc, mut abs) = (0.0f64, 0.0f64);
            for r in 0..m.rank {
                acc += b[i * m.rank + r] as f64 * a[r * m.d_in + j] as f64;
                abs += (b[i * m.rank + r] as f64 * a[r * m.d_in + j] as f64).abs();
            }
            let idx = if fan { j * m.d_out + i } else { i * m.d_in + j };
            out[idx] += m.scale * acc;
            bound[idx] = (m.rank + 2) as f64 * f64::powi(2.0, -24) * m.scale.abs() * abs;
        }
    }
    (out, bound)
}

fn merge_to(backend: &impl Backend, case: &str, dir: &Path, record: Option<PathBuf>) -> PathBuf {
    let adapter = PeftAdapter::load(fixture(case).join("adapter")).unwrap();
    let out = dir.join("merged.safetensors");
    merge_file(
        backend,
        &fixture(case).join("base.safetensors"),
        &adapter,
        &out,
        MergeOp::Merge,
        MergeOptions {
            exact_record: record,
            ..Default::default()
        },
    )
    .unwrap();
    out
}

fn check_merge_parity(backend: &impl Backend, case: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = PeftAdapter::load(fixture(case).join("adapter")).unwrap();
    let ours = read_all(&merge_to(backend, case, tmp.path(), None));
    let base = read_all(&fixture(case).join("base.safetensors"));
    let peft = read_all(&fixture(case).join("merged.safetensors"));
    assert_eq!(ours.len(), base.len(), "{case}: every base tensor copied");
    let mut merged = 0;
    for ((o, b), p) in ours.iter().zip(&base).zip(&peft) {
        assert_eq!(
            (&o.0, o.1, &o.2),
            (&b.0, b.1, &b.2),
            "{case}: names, dtypes, shapes kept"
        );
        assert_eq!(p.0, b.0);
        let module = b.0.strip_suffix(".weight").and_then(|n| adapter.module(n));
        let Some(m) = module else {
            assert_eq!(o.3, b.3, "{case}: untargeted {} copied bit for bit", b.0);
            continue;
        };
        merged += 1;
        let d = dt(b.1);
        let base_v = f64s(b.1, &b.3);
        let (reference, bound) = reference_merge(&base_v, m, adapter.config.fan_in_fan_out);
        let (ov, pv) = (f64s(o.1, &o.3), f64s(p.1, &p.3));
        let (mut o_sum, mut p_sum, mut o_max, mut p_max) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for k in 0..reference.len() {
            let (eo, ep) = ((ov[k] - reference[k]).abs(), (pv[k] - reference[k]).abs());
            assert!(
                eo <= ulp(d, reference[k]) + bound[k],
                "{case} {} [{k}]: ours {} ref {} (> 1 ulp + f32 bound)",
                b.0,
                ov[k],
                reference[k]
            );
            // Sanity: the fixture really is PEFT's merge (within its double rounding).
            // (PEFT rounds the delta to the dtype before the add.)
            assert!(
                ep <= ulp(d, reference[k] - base_v[k])
                    + ulp(d, reference[k])
                    + ulp(d, pv[k])
                    + 4.0 * bound[k],
                "{case} {} [{k}]: PEFT {} ref {}",
                b.0,
                pv[k],
                reference[k]
            );
            o_sum += eo;
            p_sum += ep;
            o_max = o_max.max(eo);
            p_max = p_max.max(ep);
        }
        // Σ|err| always; max |err| too for f16/bf16, where rounding to the dtype dominates. In f32
        // both merges are f32 arithmetic of the same accuracy (PEFT also scales by an f32 scalar),
        // so one element's max is noise; every element is within the bound checked above.
        eprintln!(
            "{case} {}: ours Σ{o_sum:.3e} max {o_max:.3e}; PEFT Σ{p_sum:.3e} max {p_max:.3e}",
            b.0
        );
        assert!(
            o_sum <= p_sum,
            "{case} {}: ours Σ{o_sum:e}, PEFT Σ{p_sum:e}",
            b.0
        );
        assert!(
            d == DType::F32 || o_max <= p_max,
            "{case} {}: ours max {o_max:e}, PEFT max {p_max:e}",
            b.0
        );
    }
    assert_eq!(merged, adapter.modules.len(), "{case}: every module merged");
}

#[test]
fn merge_matches_peft_at_least_as_accurately_cpu() {
    for case in CASES {
        check_merge_parity(&Cpu, case);
    }
}

#[test]
fn merge_matches_peft_at_least_as_accurately_emu() {
    for case in CASES {
        check_merge_parity(&Emu, case);
    }
}

#[test]
fn exact_record_restores_base_bit_for_bit_across_backends() {
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let rec = tmp.path().join("record.safetensors");
        let merged = merge_to(&Emu, case, tmp.path(), Some(rec.clone()));
        // Same merged bits as the default mode, on cpu.
        let plain = tempfile::tempdir().unwrap();
        assert_eq!(
            read_all(&merged),
            read_all(&merge_to(&Cpu, case, plain.path(), None))
        );
        let adapter = PeftAdapter::load(fixture(case).join("adapter")).unwrap();
        let out = tmp.path().join("restored.safetensors");
        merge_file(
            &Cpu,
            &merged,
            &adapter,
            &out,
            MergeOp::Unmerge,
            MergeOptions {
                exact_record: Some(rec),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            read_all(&out),
            read_all(&fixture(case).join("base.safetensors")),
            "{case}"
        );
        // Without the record: within one ulp of max(|W|, |merged W|) per element.
        let approx = tmp.path().join("approx.safetensors");
        merge_file(
            &Cpu,
            &merged,
            &adapter,
            &approx,
            MergeOp::Unmerge,
            MergeOptions::default(),
        )
        .unwrap();
        for ((a, b), m) in read_all(&approx)
            .iter()
            .zip(read_all(&fixture(case).join("base.safetensors")))
            .zip(read_all(&merged))
        {
            if a.1 == StDtype::F32 || a.1 == StDtype::F16 || a.1 == StDtype::BF16 {
                let (av, bv, mv) = (f64s(a.1, &a.3), f64s(b.1, &b.3), f64s(m.1, &m.3));
                for k in 0..av.len() {
                    assert!(
                        (av[k] - bv[k]).abs() <= ulp(dt(a.1), bv[k].abs().max(mv[k].abs())),
                        "{case} {}",
                        a.0
                    );
                }
            }
        }
    }
}

/// One LoRA layer's forward through the registry and BGMV, against PEFT's layer output.
fn check_forward<B: Backend + 'static>(backend: &B, case: &str) {
    let adapter = PeftAdapter::load(fixture(case).join("adapter")).unwrap();
    let fwd = read_all(&fixture(case).join("forward.safetensors"));
    let probes: Vec<String> = fwd
        .iter()
        .filter_map(|t| t.0.strip_suffix(".x").map(str::to_owned))
        .collect();
    assert!(!probes.is_empty());
    let layers: Vec<LayerSpec> = adapter
        .modules
        .iter()
        .map(|m| LayerSpec::single(&m.name, m.d_in, m.d_out))
        .collect();
    match adapter.modules[0].dtype() {
        DType::F32 => forward_with::<B, f32>(backend, case, &adapter, layers, &fwd, &probes),
        DType::F16 => forward_with::<B, f16>(backend, case, &adapter, layers, &fwd, &probes),
        DType::BF16 => forward_with::<B, bf16>(backend, case, &adapter, layers, &fwd, &probes),
        DType::F64 => unreachable!(),
    }
}

fn forward_with<B: Backend + 'static, TW: lora_kernels::Float>(
    backend: &B,
    case: &str,
    adapter: &PeftAdapter,
    layers: Vec<LayerSpec>,
    fwd: &[(String, StDtype, Vec<usize>, Vec<u8>)],
    probes: &[String],
) {
    let mut reg = AdapterRegistry::<B, TW>::new(backend, layers, 3, 16).unwrap();
    let id = reg.add(backend, "a", adapter).unwrap() as i32;
    let get = |k: String| fwd.iter().find(|t| t.0 == k).unwrap();
    for probe in probes {
        let (x, yb, y) = (
            get(format!("{probe}.x")),
            get(format!("{probe}.y_base")),
            get(format!("{probe}.y")),
        );
        let d = dt(x.1);
        let m = adapter.module(probe).unwrap();
        let li = adapter
            .modules
            .iter()
            .position(|mm| &mm.name == probe)
            .unwrap();
        let tokens = x.2[0];
        let xs: Vec<f32> = f64s(x.1, &x.3).iter().map(|&v| v as f32).collect();
        let base: Vec<f32> = f64s(yb.1, &yb.3).iter().map(|&v| v as f32).collect();
        let peft = f64s(y.1, &y.3);
        let table = reg.table(li);
        let ids = backend.upload(&vec![id; tokens]).unwrap();
        let dx = backend.upload(&xs).unwrap();
        let mut u = backend.alloc::<f32>(tokens * table.r_cap()).unwrap();
        let mut out = backend.upload(&base).unwrap();
        let bg = Bgmv::new(backend, table, &ids, tokens).unwrap();
        bg.shrink(backend, &dx, m.d_in, &mut u, None).unwrap();
        bg.expand(backend, &u, &mut out, m.d_out, ExpandMode::Add, None)
            .unwrap();
        let ours = backend.download(&out).unwrap();
        // f64 reference from the same inputs (stored TW weights).
        let a: Vec<f64> = m.a.to::<TW>().iter().map(|v| v.to_f64()).collect();
        let b: Vec<f64> = m.b.to::<TW>().iter().map(|v| v.to_f64()).collect();
        let s = m.scale_f32() as f64;
        for t in 0..tokens {
            let uu: Vec<f64> = (0..m.rank)
                .map(|r| {
                    (0..m.d_in)
                        .map(|j| xs[t * m.d_in + j] as f64 * a[r * m.d_in + j])
                        .sum()
                })
                .collect();
            let uabs: Vec<f64> = (0..m.rank)
                .map(|r| {
                    (0..m.d_in)
                        .map(|j| (xs[t * m.d_in + j] as f64 * a[r * m.d_in + j]).abs())
                        .sum()
                })
                .collect();
            for i in 0..m.d_out {
                let k = t * m.d_out + i;
                let lora: f64 = (0..m.rank).map(|r| b[i * m.rank + r] * uu[r]).sum();
                let mag: f64 = base[k].abs() as f64
                    + (0..m.rank)
                        .map(|r| (s * b[i * m.rank + r]).abs() * uabs[r])
                        .sum::<f64>();
                let reference = base[k] as f64 + s * lora;
                let got = ours[k] as f64;
                assert!(
                    (got - reference).abs()
                        <= 64.0 * f64::powi(2.0, -24) * mag * (m.d_in + m.rank) as f64 / 8.0
                            + 1e-30,
                    "{case} {probe} [{t},{i}]: ours {got} ref {reference}"
                );
                assert!(
                    (got - peft[k]).abs() <= 8.0 * eps(d) * mag,
                    "{case} {probe} [{t},{i}]: ours {got} PEFT {} (tol {})",
                    peft[k],
                    8.0 * eps(d) * mag
                );
            }
        }
    }
}

#[test]
fn lora_forward_matches_peft_layer_outputs() {
    for case in CASES {
        check_forward(&Cpu, case);
        check_forward(&Emu, case);
    }
}

#[test]
fn loader_applies_patterns_like_peft() {
    let a = PeftAdapter::load(fixture("llama_f32_rslora_patterns").join("adapter")).unwrap();
    let c = &a.config;
    // rank_pattern {"down_proj": 2, "layers.1.self_attn.q_proj": 4}; alpha_pattern {"model.layers.0.mlp.up_proj": 40, "v_proj": 4}
    assert_eq!(c.rank_for("model.layers.0.mlp.down_proj"), 2);
    assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 4);
    assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 8);
    // A whole-name key matches ((.*\.)? is optional), a partial component does not.
    assert_eq!(c.alpha_for("model.layers.0.mlp.up_proj"), 40.0);
    assert_eq!(c.alpha_for("model.layers.1.mlp.up_proj"), 16.0);
    assert_eq!(c.alpha_for("model.layers.0.self_attn.v_proj"), 4.0);
    assert_eq!(c.alpha_for("model.layers.0.self_attn.xv_proj"), 16.0);
    let m = a.module("model.layers.1.self_attn.q_proj").unwrap();
    assert_eq!((m.rank, m.scale), (4, 16.0 / 2.0)); // rsLoRA: alpha / sqrt(r)
    let f16a = PeftAdapter::load(fixture("llama_f16_regex").join("adapter")).unwrap();
    assert!(f16a.config.targets("model.layers.0.self_attn.q_proj"));
    assert!(!f16a.config.targets("model.layers.0.self_attn.k_proj"));
    assert!(!f16a.config.targets("q_proj")); // fullmatch: needs the `.` prefix
    assert_eq!(
        f16a.module("model.layers.1.mlp.down_proj").unwrap().scale,
        8.0 / 6.0
    );
}

#[test]
fn save_then_load_round_trips() {
    for case in CASES {
        let a = PeftAdapter::load(fixture(case).join("adapter")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        a.save(tmp.path()).unwrap();
        let b = PeftAdapter::load(tmp.path()).unwrap();
        assert_eq!(a.modules.len(), b.modules.len());
        for (x, y) in a.modules.iter().zip(&b.modules) {
            assert_eq!(
                (&x.name, x.rank, x.scale, &x.a, &x.b),
                (&y.name, y.rank, y.scale, &y.a, &y.b)
            );
        }
    }
}

// ---- malformed adapters: every case a typed error ----

/// A copy of a fixture adapter with its config edited and its tensors filtered / edited.
pub fn broken_adapter(
    dir: &Path,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, StDtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let src = fixture("llama_bf16").join("adapter");
    let out = dir.join("adapter");
    std::fs::create_dir_all(&out).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit_config(&mut cfg);
    std::fs::write(
        out.join("adapter_config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let mut t = read_all(&src.join("adapter_model.safetensors"));
    edit_tensors(&mut t);
    let mut w = TensorFileWriter::default();
    for (n, d, s, b) in t {
        w.push(n, d, s, b);
    }
    let mut f = std::fs::File::create(out.join("adapter_model.safetensors")).unwrap();
    w.write(&mut f, &mut |_| {}).unwrap();
    out
}

fn load_err(
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, StDtype, Vec<usize>, Vec<u8>)>),
) -> PeftError {
    let tmp = tempfile::tempdir().unwrap();
    PeftAdapter::load(broken_adapter(tmp.path(), edit_config, edit_tensors)).unwrap_err()
}

const QA: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const QB: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

#[test]
fn malformed_configs_are_typed_errors_naming_the_field() {
    let unsupported = |e: PeftError| match e {
        PeftError::Unsupported { field, .. } => field,
        other => panic!("expected Unsupported, got {other:?}"),
    };
    let config = |e: PeftError| match e {
        PeftError::Config { field, .. } => field,
        other => panic!("expected Config, got {other:?}"),
    };
    assert_eq!(
        unsupported(load_err(|c| c["use_dora"] = true.into(), |_| {})),
        "use_dora"
    );
    assert_eq!(
        unsupported(load_err(|c| c["bias"] = "all".into(), |_| {})),
        "bias"
    );
    assert_eq!(
        unsupported(load_err(|c| c["bias"] = "lora_only".into(), |_| {})),
        "bias"
    );
    assert_eq!(
        unsupported(load_err(|c| c["lora_bias"] = true.into(), |_| {})),
        "lora_bias"
    );
    assert_eq!(
        unsupported(load_err(
            |c| c["modules_to_save"] = serde_json::json!(["lm_head"]),
            |_| {}
        )),
        "modules_to_save"
    );
    assert_eq!(
        unsupported(load_err(|c| c["peft_type"] = "IA3".into(), |_| {})),
        "peft_type"
    );
    assert_eq!(
        config(load_err(
            |c| {
                c.as_object_mut().unwrap().remove("r");
            },
            |_| {}
        )),
        "r"
    );
    assert_eq!(config(load_err(|c| c["r"] = 0.into(), |_| {})), "r");
    assert_eq!(config(load_err(|c| c["r"] = "8".into(), |_| {})), "r");
    assert_eq!(
        config(load_err(
            |c| c["lora_alpha"] = serde_json::Value::Null,
            |_| {}
        )),
        "lora_alpha"
    );
    assert_eq!(
        config(load_err(|c| c["target_modules"] = 3.into(), |_| {})),
        "target_modules"
    );
    assert_eq!(
        config(load_err(|c| c["target_modules"] = "(".into(), |_| {})),
        "target_modules"
    );
    assert_eq!(
        config(load_err(
            |c| c["rank_pattern"] = serde_json::json!({"q_proj": -1}),
            |_| {}
        )),
        "rank_pattern.q_proj"
    );
    assert_eq!(
        config(load_err(|c| c["lora_dropout"] = 1.5.into(), |_| {})),
        "lora_dropout"
    );
    assert_eq!(
        config(load_err(|c| c["use_rslora"] = "yes".into(), |_| {})),
        "use_rslora"
    );
    // Bad JSON.
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken_adapter(tmp.path(), |_| {}, |_| {});
    std::fs::write(dir.join("adapter_config.json"), "{\"r\": 8,").unwrap();
    assert!(matches!(
        PeftAdapter::load(&dir),
        Err(PeftError::Json { .. })
    ));
    std::fs::write(dir.join("adapter_config.json"), "[1]").unwrap();
    assert!(matches!(
        PeftAdapter::load(&dir),
        Err(PeftError::Json { .. })
    ));
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    assert!(matches!(PeftAdapter::load(&dir), Err(PeftError::Io { .. })));
}

#[test]
fn malformed_tensors_are_typed_errors() {
    // Missing B.
    let e = load_err(|_| {}, |t| t.retain(|x| x.0 != QB));
    assert!(
        matches!(&e, PeftError::MissingTensor { key } if key == QB),
        "{e:?}"
    );
    // Shape mismatch: B's rank column count differs from A's rank.
    let e = load_err(
        |_| {},
        |t| {
            let b = t.iter_mut().find(|x| x.0 == QB).unwrap();
            b.2 = vec![16, 32];
            b.3.truncate(16 * 32 * 2);
        },
    );
    assert!(
        matches!(&e, PeftError::Shape { key, .. } if key == QB),
        "{e:?}"
    );
    // Rank inconsistent with the config (r = 16, tensors rank 16 → config says 8).
    let e = load_err(
        |c| c["rank_pattern"] = serde_json::json!({"layers.0.self_attn.q_proj": 8}),
        |_| {},
    );
    assert!(
        matches!(&e, PeftError::Rank { module, expected: 8, actual: 16 } if module == "model.layers.0.self_attn.q_proj"),
        "{e:?}"
    );
    // Non-finite values (a bf16 NaN and an inf).
    for bits in [0x7fc0u16, 0x7f80] {
        let e = load_err(
            |_| {},
            |t| {
                let a = t.iter_mut().find(|x| x.0 == QA).unwrap();
                a.3[10..12].copy_from_slice(&bits.to_le_bytes());
            },
        );
        assert!(
            matches!(&e, PeftError::NonFinite { key, index: 5 } if key == QA),
            "{e:?}"
        );
    }
    // Unsupported dtype.
    let e = load_err(
        |_| {},
        |t| t.iter_mut().find(|x| x.0 == QA).unwrap().1 = StDtype::I16,
    );
    assert!(
        matches!(&e, PeftError::Dtype { key, .. } if key == QA),
        "{e:?}"
    );
    // A and B of different dtypes.
    let e = load_err(
        |_| {},
        |t| t.iter_mut().find(|x| x.0 == QA).unwrap().1 = StDtype::F16,
    );
    assert!(
        matches!(&e, PeftError::Dtype { key, .. } if key == QB),
        "{e:?}"
    );
    // 1-D tensor.
    let e = load_err(
        |_| {},
        |t| t.iter_mut().find(|x| x.0 == QA).unwrap().2 = vec![16 * 32],
    );
    assert!(matches!(&e, PeftError::Shape { .. }), "{e:?}");
    // Keys we do not understand, or out of scope.
    let extra = |k: &str| {
        let k = k.to_string();
        load_err(
            |_| {},
            move |t| t.push((k, StDtype::BF16, vec![2, 2], vec![0; 8])),
        )
    };
    assert!(matches!(
        extra("model.layers.0.q.lora_A.weight"),
        PeftError::UnexpectedTensor { .. }
    ));
    assert!(matches!(
        extra("base_model.model.model.layers.0.self_attn.q_proj.weight"),
        PeftError::UnexpectedTensor { .. }
    ));
    assert!(matches!(
        extra("base_model.model.model.embed_tokens.lora_embedding_A"),
        PeftError::Unsupported { .. }
    ));
    assert!(
        matches!(extra("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"), PeftError::Unsupported { field, .. } if field == "use_dora")
    );
    assert!(
        matches!(extra("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"), PeftError::Unsupported { field, .. } if field == "lora_bias")
    );
    // A module the config does not target, and lm_head LoRA.
    let e = load_err(
        |_| {},
        |t| {
            for x in t.iter_mut() {
                x.0 = x.0.replace("self_attn.q_proj", "self_attn.k_proj");
            }
        },
    );
    assert!(matches!(e, PeftError::UnexpectedTensor { .. }), "{e:?}");
    let e = load_err(
        |c| c["target_modules"] = serde_json::json!(["q_proj", "v_proj", "up_proj", "lm_head"]),
        |t| {
            let a = t.iter().find(|x| x.0 == QA).unwrap().clone();
            t.push((
                a.0.replace("model.layers.0.self_attn.q_proj", "lm_head"),
                a.1,
                a.2,
                a.3,
            ));
        },
    );
    assert!(
        matches!(&e, PeftError::Unsupported { field, .. } if field == "target_modules"),
        "{e:?}"
    );
    // Truncated and garbage files.
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken_adapter(tmp.path(), |_| {}, |_| {});
    let p = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    for cut in [0, 7, 100, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(
            matches!(PeftAdapter::load(&dir), Err(PeftError::Safetensors { .. })),
            "cut at {cut}"
        );
    }
    std::fs::remove_file(&p).unwrap();
    assert!(matches!(PeftAdapter::load(&dir), Err(PeftError::Io { .. })));
    // An empty adapter.
    let e = load_err(|_| {}, |t| t.clear());
    assert!(matches!(e, PeftError::MissingTensor { .. }), "{e:?}");
}

// ---- the registry ----

fn llama_layers() -> Vec<LayerSpec> {
    let mut v = Vec::new();
    for l in 0..2 {
        let p = |m: &str| format!("model.layers.{l}.{m}");
        // A fused qkv layer: q 32 at 0, k 16 at 32, v 16 at 48.
        v.push(LayerSpec {
            d_in: 32,
            slices: vec![
                (p("self_attn.q_proj"), Slice { n: 32, offset: 0 }),
                (p("self_attn.k_proj"), Slice { n: 16, offset: 32 }),
                (p("self_attn.v_proj"), Slice { n: 16, offset: 48 }),
            ],
        });
        v.push(LayerSpec::single(p("self_attn.o_proj"), 32, 32));
        v.push(LayerSpec::single(p("mlp.gate_proj"), 32, 48));
        v.push(LayerSpec::single(p("mlp.up_proj"), 32, 48));
        v.push(LayerSpec::single(p("mlp.down_proj"), 48, 32));
    }
    v
}

#[test]
fn registry_add_evict_keeps_ids_and_accounts_memory() {
    let b = Emu;
    let bf = PeftAdapter::load(fixture("llama_bf16").join("adapter")).unwrap();
    let f16a = PeftAdapter::load(fixture("llama_f16_regex").join("adapter")).unwrap();
    let f32a = PeftAdapter::load(fixture("llama_f32_rslora_patterns").join("adapter")).unwrap();
    let mut reg = AdapterRegistry::<Emu, bf16>::new(&b, llama_layers(), 3, 16).unwrap();
    assert_eq!((reg.len(), reg.weight_bytes()), (0, 0));
    let ia = reg.add(&b, "bf", &bf).unwrap();
    let ib = reg.add(&b, "f16", &f16a).unwrap();
    let ic = reg.add(&b, "f32", &f32a).unwrap();
    assert_eq!((ia, ib, ic), (0, 1, 2));
    assert_eq!(
        reg.weight_bytes(),
        (bf.bytes() + f16a.bytes() + f32a.bytes() / 2)
    );
    assert_eq!(reg.adapter_bytes(2), Some(f32a.bytes() / 2)); // converted to bf16
                                                              // The fused qkv table of layer 0: per (adapter, slice) rank and scale from the patterns.
    let t = reg.table(0);
    assert_eq!(t.n_adapters(), 3);
    let e = |a: usize, s: usize| t.entries()[a * 3 + s];
    assert_eq!(
        (e(0, 0).rank, e(0, 0).scale, e(0, 1).rank, e(0, 2).rank),
        (16, 2.0, 0, 16)
    );
    assert_eq!((e(1, 0).rank, e(1, 0).scale, e(1, 2).scale), (4, 0.5, 2.0));
    assert_eq!(
        (e(2, 1).rank, e(2, 2).scale),
        (8, (4.0 / 8f64.sqrt()) as f32)
    );
    assert_eq!(reg.table(5).entries()[3 * 2].rank, 4); // layer 1 q_proj of "f32": rank_pattern 4
                                                       // Errors change nothing.
    assert!(reg.add(&b, "more", &bf).is_err()); // full
    assert!(reg.add(&b, "f16", &bf).is_err()); // duplicate name
                                               // Evict the middle one: others keep their ids; the slot is reused.
    let before = reg.table(0).entries()[0];
    assert_eq!(reg.evict(&b, "f16").unwrap(), 1);
    assert_eq!(
        (reg.id("bf"), reg.id("f16"), reg.id("f32")),
        (Some(0), None, Some(2))
    );
    assert_eq!(
        reg.table(0).entries()[0].a,
        before.a,
        "other adapters' weights untouched"
    );
    assert_eq!(
        reg.table(0).entries()[3].rank,
        0,
        "evicted slot is 'not targeted'"
    );
    assert_eq!(reg.weight_bytes(), bf.bytes() + f32a.bytes() / 2);
    assert_eq!(reg.add(&b, "again", &f16a).unwrap(), 1);
    assert_eq!(reg.name(1), Some("again"));
    assert!(reg.evict(&b, "nope").is_err());
    // Budget, r_cap and layer mismatches are errors with nothing loaded.
    let mut small = AdapterRegistry::<Emu, bf16>::new(&b, llama_layers(), 2, 16)
        .unwrap()
        .with_budget(bf.bytes() + 10);
    small.add(&b, "bf", &bf).unwrap();
    assert!(small.add(&b, "f16", &f16a).is_err());
    assert_eq!((small.len(), small.weight_bytes()), (1, bf.bytes()));
    let mut tiny_rank = AdapterRegistry::<Emu, bf16>::new(&b, llama_layers(), 2, 8).unwrap();
    assert!(tiny_rank.add(&b, "bf", &bf).is_err());
    assert!(tiny_rank.is_empty());
    let mut wrong = AdapterRegistry::<Emu, bf16>::new(
        &b,
        vec![LayerSpec::single("model.layers.0.self_attn.q_proj", 32, 16)],
        2,
        16,
    )
    .unwrap();
    assert!(wrong.add(&b, "bf", &bf).is_err());
    assert!(AdapterRegistry::<Emu, bf16>::new(&b, llama_layers(), 0, 16).is_err());
}

#[test]
fn registry_serves_two_adapters_in_one_batch() {
    // Tokens routed to different slots (and to an evicted one) in one BGMV launch.
    let b = Emu;
    let bf = PeftAdapter::load(fixture("llama_bf16").join("adapter")).unwrap();
    let other = PeftAdapter::load(fixture("llama_bf16_f32_adapter").join("adapter")).unwrap();
    let mut reg = AdapterRegistry::<Emu, bf16>::new(&b, llama_layers(), 3, 16).unwrap();
    let (i0, i1) = (
        reg.add(&b, "x", &other).unwrap(),
        reg.add(&b, "y", &bf).unwrap(),
    );
    reg.add(&b, "z", &bf).unwrap();
    reg.evict(&b, "z").unwrap();
    let layer = 3; // layer 0 up_proj: targeted by "y" only
    let t = reg.table(layer);
    let ids = b.upload(&[i1 as i32, i0 as i32, 2, -1]).unwrap();
    let x: Vec<bf16> = (0..4 * 32)
        .map(|k| bf16::from_f32(((k * 7 % 13) as f32 - 6.0) / 8.0))
        .collect();
    let dx = b.upload(&x).unwrap();
    let mut u = b.alloc::<f32>(4 * t.r_cap()).unwrap();
    let mut out = b.upload(&vec![1.0f32; 4 * 48]).unwrap();
    let bg = Bgmv::new(&b, t, &ids, 4).unwrap();
    bg.shrink(&b, &dx, 32, &mut u, None).unwrap();
    bg.expand(&b, &u, &mut out, 48, ExpandMode::Add, None)
        .unwrap();
    let out = b.download(&out).unwrap();
    assert!(out[..48].iter().any(|&v| v != 1.0), "adapter y applies");
    assert!(
        out[48..].iter().all(|&v| v == 1.0),
        "x does not target up_proj; slot 2 evicted; −1"
    );
    let m = bf.module("model.layers.0.mlp.up_proj").unwrap();
    let (a, bw) = (m.a.to_f32(), m.b.to_f32());
    for i in 0..48 {
        let mut y = 0.0f64;
        for r in 0..16 {
            let u: f64 = (0..32).map(|j| x[j].to_f64() * a[r * 32 + j] as f64).sum();
            y += bw[i * 16 + r] as f64 * u;
        }
        let want = 1.0 + m.scale * y;
        assert!(
            (out[i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
            "{i}: {} vs {want}",
            out[i]
        );
    }
    let _ = HostTensor::F32(vec![]);
}
