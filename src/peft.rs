//! Hugging Face PEFT LoRA adapters in and out, and merging them into safetensors base weights.
//!
//! **Reading** ([`PeftAdapter::load`]): a directory with `adapter_config.json` and
//! `adapter_model.safetensors` (PEFT's `save_pretrained(safe_serialization=True)`), tensors keyed
//! `base_model.model.<module>.lora_A.weight` (`[r, d_in]`) and `...lora_B.weight` (`[d_out, r]`) in
//! f32, f16 or bf16. Everything is validated before anything is returned: a malformed adapter is a
//! typed [`PeftError`] and nothing is half-loaded.
//!
//! **Config fields implemented** (PEFT 0.15 semantics):
//! - `r`, `lora_alpha` (required); `use_rslora` (scale `lora_alpha / sqrt(r)`, else `lora_alpha / r`,
//!   computed in f64 like PEFT's Python floats and rounded once to f32 for the kernels);
//! - `target_modules`: a list (a module matches if its name equals an entry or ends with
//!   `.entry`), a string (a regex that must match the whole module name, Python's `re.fullmatch`),
//!   or `"all-linear"` (every module but `lm_head`). Every module with tensors must be targeted.
//!   `exclude_modules` (list or regex, PEFT's rule) is honoured the same way;
//! - `rank_pattern` / `alpha_pattern`: for each module, the **first key in file order** whose regex
//!   `^(.*\.)?(key)$` matches the module name (relative to the base model, e.g.
//!   `model.layers.0.self_attn.q_proj`) gives the rank / alpha, looked up separately for rank and
//!   alpha (PEFT ≥ 0.15 `get_pattern_key`). Keys are Rust `regex` syntax, which agrees with Python's
//!   `re` on the plain names and alternations PEFT configs use (no look-around, no back-references);
//! - `fan_in_fan_out` (W stored `[d_in, d_out]`, GPT-2 `Conv1D`), `lora_dropout` (0 ≤ p < 1; kept
//!   for training, irrelevant to merging), `bias` (must be `"none"`).
//!
//! **Out of scope — a [`PeftError::Unsupported`] naming the field:** `use_dora: true`, `bias` other
//! than `"none"`, `lora_bias: true`, `modules_to_save`, `trainable_token_indices`,
//! `layer_replication`, `megatron_config`, non-empty `target_parameters`, embedding and `lm_head`
//! LoRA (`lora_embedding_*` tensors, or a targeted `embed_tokens`/`wte`/`lm_head`…), and quantized
//! bases (a targeted base weight that is not f32/f16/bf16, or that has quantization companions).
//! `layers_to_transform` / `layers_pattern` only restrict which modules PEFT created; the tensors say
//! which exist, so they are accepted and not re-checked.
//!
//! **Merging** ([`merge_file`] / [`unmerge_file`], used by the `lora-kernels` CLI): base key
//! `<module>.weight` pairs with the adapter's `<module>`; every base tensor is copied, targeted
//! weights are merged by [`crate::merge`] (f32 FMA product, one rounding; dtype and shape kept).
//! Files are read memory-mapped and written tensor by tensor to a temporary file in the output's
//! directory that is renamed only when the whole command succeeded.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use regex::Regex;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use serde::Serialize;
use serde_json::Value;

use crate::backend::Backend;
use crate::dtype::{bf16, f16, DType, Float};
use crate::merge::{self, HostRecord, Lora, MergeFloat, MergeRecord, MergeScratch, MergeShape};

/// Everything that can go wrong reading, checking or merging a PEFT adapter.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON (or not an object).
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    /// A config field is missing or has an invalid value.
    #[error("adapter config field `{field}`: expected {expected}, got {actual}")]
    Config {
        field: String,
        expected: String,
        actual: String,
    },
    /// A feature this crate does not implement; `field` names the config field or tensor.
    #[error("unsupported: `{field}` ({detail})")]
    Unsupported { field: String, detail: String },
    /// A safetensors file is truncated or corrupt.
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("missing tensor `{key}`")]
    MissingTensor { key: String },
    #[error("unexpected tensor `{key}`: {why}")]
    UnexpectedTensor { key: String, why: String },
    #[error("tensor `{key}`: expected shape {expected}, got {actual:?}")]
    Shape {
        key: String,
        expected: String,
        actual: Vec<usize>,
    },
    #[error("module `{module}`: the config gives rank {expected} (r / rank_pattern), the tensors have rank {actual}")]
    Rank {
        module: String,
        expected: usize,
        actual: usize,
    },
    #[error("tensor `{key}`: dtype {actual} is not supported (f32, f16, bf16)")]
    Dtype { key: String, actual: String },
    #[error("tensor `{key}`: non-finite value at element {index}")]
    NonFinite { key: String, index: usize },
    /// A merge would produce a non-finite weight (nothing is written).
    #[error("merging module `{module}` would produce non-finite weights")]
    NonFiniteMerge { module: String },
    /// The exact-merge record is missing, corrupt, or does not belong to these files.
    #[error("exact record: {0}")]
    Record(String),
    #[error(transparent)]
    Kernel(#[from] crate::Error),
}

pub type PeftResult<T> = std::result::Result<T, PeftError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PeftError + '_ {
    move |source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cfg_err(field: &str, expected: impl Into<String>, actual: impl ToString) -> PeftError {
    PeftError::Config {
        field: field.into(),
        expected: expected.into(),
        actual: actual.to_string(),
    }
}

fn unsupported(field: &str, detail: impl Into<String>) -> PeftError {
    PeftError::Unsupported {
        field: field.into(),
        detail: detail.into(),
    }
}

/// `target_modules` (or `exclude_modules`) of a PEFT config.
#[derive(Clone, Debug)]
pub enum ModuleSelector {
    /// Names or name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// A regex matched against the whole module name (Python's `re.fullmatch`).
    Regex(String, Regex),
    /// `"all-linear"`: every linear module except `lm_head`.
    AllLinear,
}

impl Serialize for ModuleSelector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ModuleSelector::List(v) => v.serialize(s),
            ModuleSelector::Regex(text, _) => s.serialize_str(text),
            ModuleSelector::AllLinear => s.serialize_str("all-linear"),
        }
    }
}

impl ModuleSelector {
    fn parse(field: &str, v: &Value) -> PeftResult<Self> {
        match v {
            Value::String(s) if s == "all-linear" && field == "target_modules" => {
                Ok(ModuleSelector::AllLinear)
            }
            Value::String(s) => {
                let re = Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| cfg_err(field, "a valid regex", format!("{s:?} ({e})")))?;
                Ok(ModuleSelector::Regex(s.clone(), re))
            }
            Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| cfg_err(field, "a list of strings", i))
                })
                .collect::<PeftResult<Vec<_>>>()
                .map(ModuleSelector::List),
            other => Err(cfg_err(field, "a list of names or a regex string", other)),
        }
    }

    /// PEFT's `check_target_module_exists` (without `layers_to_transform`).
    pub fn matches(&self, module: &str) -> bool {
        match self {
            ModuleSelector::List(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            ModuleSelector::Regex(_, re) => re.is_match(module),
            ModuleSelector::AllLinear => last_component(module) != "lm_head",
        }
    }
}

/// One pattern of `rank_pattern` / `alpha_pattern`: key, compiled `^(?:.*\.)?(?:key)$`, value.
#[derive(Clone, Debug)]
pub struct Pattern<T> {
    pub key: String,
    re: Regex,
    pub value: T,
}

impl<T: Copy> Pattern<T> {
    /// The value of the first pattern (in file order) matching `module`, as PEFT's
    /// `get_pattern_key` picks it.
    pub fn lookup(patterns: &[Pattern<T>], module: &str) -> Option<T> {
        patterns
            .iter()
            .find(|p| p.re.is_match(module))
            .map(|p| p.value)
    }
}

impl<T: Serialize> Serialize for Pattern<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(&self.key, &self.value)?;
        m.end()
    }
}

/// The fields of `adapter_config.json` this crate implements (see the module docs).
#[derive(Clone, Debug, Serialize)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: ModuleSelector,
    pub exclude_modules: Option<ModuleSelector>,
    pub rank_pattern: Vec<Pattern<usize>>,
    pub alpha_pattern: Vec<Pattern<f64>>,
    pub fan_in_fan_out: bool,
    pub lora_dropout: f64,
    pub bias: String,
    pub base_model_name_or_path: Option<String>,
}

fn positive_int(field: &str, v: &Value) -> PeftResult<usize> {
    match v.as_u64() {
        Some(n) if n >= 1 && n <= crate::adapter::MAX_RANK as u64 => Ok(n as usize),
        _ => Err(cfg_err(
            field,
            format!("an integer from 1 to {}", crate::adapter::MAX_RANK),
            v,
        )),
    }
}

fn finite(field: &str, v: &Value) -> PeftResult<f64> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(cfg_err(field, "a finite number", v)),
    }
}

fn bool_field(obj: &serde_json::Map<String, Value>, field: &str) -> PeftResult<bool> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(cfg_err(field, "true or false", other)),
    }
}

/// A value that PEFT treats as "not set": absent, null, false, empty list/object/string.
fn is_unset(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

fn patterns<T>(
    field: &str,
    v: Option<&Value>,
    parse: impl Fn(&str, &Value) -> PeftResult<T>,
) -> PeftResult<Vec<Pattern<T>>> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(o)) => o,
        Some(other) => return Err(cfg_err(field, "an object {module key: value}", other)),
    };
    obj.iter()
        .map(|(k, v)| {
            let name = format!("{field}.{k}");
            let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
                .map_err(|e| cfg_err(&name, "a valid regex key", format!("{k:?} ({e})")))?;
            Ok(Pattern {
                key: k.clone(),
                re,
                value: parse(&name, v)?,
            })
        })
        .collect()
}

impl PeftConfig {
    /// Parses and checks `adapter_config.json`'s text.
    pub fn from_json(text: &str, path: &Path) -> PeftResult<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| PeftError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let Value::Object(obj) = v else {
            return Err(PeftError::Json {
                path: path.to_path_buf(),
                message: "the top level is not an object".into(),
            });
        };
        if let Some(t) = obj.get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(unsupported(
                    "peft_type",
                    format!("only LORA adapters are supported, got {t}"),
                ));
            }
        }
        if bool_field(&obj, "use_dora")? {
            return Err(unsupported("use_dora", "DoRA adapters are not supported"));
        }
        let bias = match obj.get("bias") {
            None | Some(Value::Null) => "none".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(cfg_err("bias", "a string", other)),
        };
        if bias != "none" {
            return Err(unsupported(
                "bias",
                format!("only bias \"none\" is supported, got {bias:?}"),
            ));
        }
        if bool_field(&obj, "lora_bias")? {
            return Err(unsupported(
                "lora_bias",
                "a bias on lora_B is not supported",
            ));
        }
        for field in [
            "modules_to_save",
            "trainable_token_indices",
            "layer_replication",
            "megatron_config",
            "target_parameters",
        ] {
            if !is_unset(obj.get(field)) {
                return Err(unsupported(
                    field,
                    format!("not supported, got {}", obj[field]),
                ));
            }
        }
        let r = positive_int(
            "r",
            obj.get("r")
                .ok_or_else(|| cfg_err("r", "present", "missing"))?,
        )?;
        let lora_alpha = finite(
            "lora_alpha",
            obj.get("lora_alpha")
                .ok_or_else(|| cfg_err("lora_alpha", "present", "missing"))?,
        )?;
        let target_modules = ModuleSelector::parse(
            "target_modules",
            obj.get("target_modules")
                .filter(|v| !v.is_null())
                .ok_or_else(|| cfg_err("target_modules", "present", "missing"))?,
        )?;
        let exclude_modules = match obj.get("exclude_modules") {
            v if is_unset(v) => None,
            Some(v) => Some(ModuleSelector::parse("exclude_modules", v)?),
            None => None,
        };
        let lora_dropout = match obj.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(v) => {
                let p = finite("lora_dropout", v)?;
                if !(0.0..1.0).contains(&p) {
                    return Err(cfg_err("lora_dropout", "0 ≤ p < 1", p));
                }
                p
            }
        };
        let base_model_name_or_path = obj
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(PeftConfig {
            r,
            lora_alpha,
            use_rslora: bool_field(&obj, "use_rslora")?,
            target_modules,
            exclude_modules,
            rank_pattern: patterns("rank_pattern", obj.get("rank_pattern"), positive_int)?,
            alpha_pattern: patterns("alpha_pattern", obj.get("alpha_pattern"), finite)?,
            fan_in_fan_out: bool_field(&obj, "fan_in_fan_out")?,
            lora_dropout,
            bias,
            base_model_name_or_path,
        })
    }

    /// The rank the config gives `module` (`rank_pattern`, else `r`).
    pub fn rank_for(&self, module: &str) -> usize {
        Pattern::lookup(&self.rank_pattern, module).unwrap_or(self.r)
    }
    /// The alpha the config gives `module` (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_for(&self, module: &str) -> f64 {
        Pattern::lookup(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }
    /// PEFT's scaling for `module` in f64: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
    /// Whether PEFT would have put LoRA on `module`.
    pub fn targets(&self, module: &str) -> bool {
        if let Some(ex) = &self.exclude_modules {
            if ex.matches(module) {
                return false;
            }
        }
        self.target_modules.matches(module)
    }
}

/// A host tensor of one of the kernel dtypes.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostTensor {
    pub fn dtype(&self) -> DType {
        match self {
            HostTensor::F32(_) => DType::F32,
            HostTensor::F16(_) => DType::F16,
            HostTensor::BF16(_) => DType::BF16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            HostTensor::F32(v) => v.len(),
            HostTensor::F16(v) => v.len(),
            HostTensor::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Exact widening to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.to::<f32>()
    }
    /// Conversion to `T` (exact when widening, nearest-even otherwise).
    pub fn to<T: Float>(&self) -> Vec<T> {
        match self {
            HostTensor::F32(v) => v.iter().map(|&x| T::from_f32(x)).collect(),
            HostTensor::F16(v) => v.iter().map(|&x| T::from_f32(x.to_f32())).collect(),
            HostTensor::BF16(v) => v.iter().map(|&x| T::from_f32(x.to_f32())).collect(),
        }
    }
    /// The values as `T` without conversion, if that is the dtype.
    pub fn as_slice<T: Float>(&self) -> Option<&[T]> {
        let any: &dyn std::any::Any = match self {
            HostTensor::F32(v) => v,
            HostTensor::F16(v) => v,
            HostTensor::BF16(v) => v,
        };
        any.downcast_ref::<Vec<T>>().map(Vec::as_slice)
    }
}

fn st_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn to_st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
    }
}

/// Decodes little-endian bytes of a float tensor.
pub fn decode(dtype: DType, bytes: &[u8]) -> HostTensor {
    match dtype {
        DType::F32 => HostTensor::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::F16 => HostTensor::F16(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::BF16 => HostTensor::BF16(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::F64 => unreachable!("adapters never hold f64"),
    }
}

/// Little-endian bytes of a float slice.
pub fn encode<T: MergeFloat>(v: &[T]) -> Vec<u8> {
    let n = T::DTYPE.size_bytes();
    let mut out = Vec::with_capacity(v.len() * n);
    for x in v {
        out.extend_from_slice(&x.bits32().to_le_bytes()[..n]);
    }
    out
}

fn first_non_finite(t: &HostTensor) -> Option<usize> {
    match t {
        HostTensor::F32(v) => v.iter().position(|x| !x.is_finite()),
        HostTensor::F16(v) => v.iter().position(|x| !x.is_finite()),
        HostTensor::BF16(v) => v.iter().position(|x| !x.is_finite()),
    }
}

fn last_component(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// Module names whose LoRA is embedding / output-head LoRA (out of scope).
const EMBEDDING_NAMES: &[&str] = &[
    "embed_tokens",
    "wte",
    "wpe",
    "embed_in",
    "embed_out",
    "word_embeddings",
    "lm_head",
];

/// One LoRA module: `W[d_out, d_in] += scale · B · A`.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// Name relative to the base model, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub rank: usize,
    pub alpha: f64,
    /// PEFT's scaling in f64 (the kernels take it rounded to f32: [`LoraModule::scale_f32`]).
    pub scale: f64,
    pub d_in: usize,
    pub d_out: usize,
    /// A `[rank, d_in]`, row-major.
    pub a: HostTensor,
    /// B `[d_out, rank]`, row-major.
    pub b: HostTensor,
}

impl LoraModule {
    pub fn scale_f32(&self) -> f32 {
        self.scale as f32
    }
    pub fn dtype(&self) -> DType {
        self.a.dtype()
    }
    /// Bytes of A and B.
    pub fn bytes(&self) -> usize {
        (self.a.len() + self.b.len()) * self.dtype().size_bytes()
    }
    /// The base-model key of the weight this module modifies.
    pub fn base_key(&self) -> String {
        format!("{}.weight", self.name)
    }
}

/// Prefix PEFT puts before module names in saved adapters.
pub const KEY_PREFIX: &str = "base_model.model.";

/// A fully validated PEFT LoRA adapter in host memory.
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    pub config: PeftConfig,
    /// Sorted by name.
    pub modules: Vec<LoraModule>,
}

/// Splits `base_model.model.<module>.lora_{A,B}.weight` into (module, is_b).
fn parse_key(key: &str) -> PeftResult<(String, bool)> {
    let unexpected = |why: &str| PeftError::UnexpectedTensor {
        key: key.to_string(),
        why: why.into(),
    };
    if key.contains("lora_embedding_") {
        return Err(unsupported(key, "embedding LoRA is not supported"));
    }
    if key.contains("lora_magnitude_vector") {
        return Err(unsupported("use_dora", format!("DoRA tensor `{key}`")));
    }
    if key.contains("modules_to_save") {
        return Err(unsupported("modules_to_save", format!("tensor `{key}`")));
    }
    let rest = key
        .strip_prefix(KEY_PREFIX)
        .ok_or_else(|| unexpected("keys must start with `base_model.model.`"))?;
    for (suffix, is_b) in [(".lora_A.weight", false), (".lora_B.weight", true)] {
        if let Some(module) = rest.strip_suffix(suffix) {
            if module.is_empty() {
                return Err(unexpected("empty module name"));
            }
            return Ok((module.to_string(), is_b));
        }
    }
    if rest.ends_with(".lora_B.bias") {
        return Err(unsupported("lora_bias", format!("tensor `{key}`")));
    }
    Err(unexpected(
        "not a `.lora_A.weight` / `.lora_B.weight` tensor",
    ))
}

/// (key, values, shape) of one adapter tensor while loading.
type KeyedTensor = (String, HostTensor, Vec<usize>);

impl PeftAdapter {
    /// Reads and validates `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: impl AsRef<Path>) -> PeftResult<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
        let config = PeftConfig::from_json(&text, &cfg_path)?;
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(unsupported(
                "adapter_model.bin",
                "pickled adapters are not read; save with safe_serialization=True",
            ));
        }
        let bytes = std::fs::read(&st_path).map_err(io(&st_path))?;
        Self::from_parts(config, &bytes, &st_path)
    }

    /// Validates a config and the bytes of its `adapter_model.safetensors`.
    pub fn from_parts(config: PeftConfig, bytes: &[u8], path: &Path) -> PeftResult<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| PeftError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut pairs: BTreeMap<String, [Option<KeyedTensor>; 2]> = BTreeMap::new();
        let mut names: Vec<String> = st.names().into_iter().cloned().collect();
        names.sort();
        for key in names {
            let view = st.tensor(&key).map_err(|e| PeftError::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            let (module, is_b) = parse_key(&key)?;
            if EMBEDDING_NAMES.contains(&last_component(&module)) {
                return Err(unsupported(
                    "target_modules",
                    format!("embedding / lm_head LoRA (`{module}`) is not supported"),
                ));
            }
            if !config.targets(&module) {
                return Err(PeftError::UnexpectedTensor {
                    key,
                    why: format!("module `{module}` is not selected by target_modules"),
                });
            }
            let dtype = st_dtype(view.dtype()).ok_or_else(|| PeftError::Dtype {
                key: key.clone(),
                actual: format!("{:?}", view.dtype()),
            })?;
            let shape = view.shape().to_vec();
            if shape.len() != 2 || shape.contains(&0) {
                return Err(PeftError::Shape {
                    key,
                    expected: "2 non-zero dimensions".into(),
                    actual: shape,
                });
            }
            let t = decode(dtype, view.data());
            if let Some(index) = first_non_finite(&t) {
                return Err(PeftError::NonFinite { key, index });
            }
            pairs.entry(module).or_default()[is_b as usize] = Some((key, t, shape));
        }
        let mut modules = Vec::with_capacity(pairs.len());
        for (name, [a, b]) in pairs {
            let missing = |s: &str| PeftError::MissingTensor {
                key: format!("{KEY_PREFIX}{name}.lora_{s}.weight"),
            };
            let (_, a, a_shape) = a.ok_or_else(|| missing("A"))?;
            let (b_key, b, b_shape) = b.ok_or_else(|| missing("B"))?;
            let (rank, d_in, d_out) = (a_shape[0], a_shape[1], b_shape[0]);
            if b_shape[1] != rank {
                return Err(PeftError::Shape {
                    key: b_key,
                    expected: format!("[d_out, {rank}] (lora_A's rank)"),
                    actual: b_shape,
                });
            }
            if b.dtype() != a.dtype() {
                return Err(PeftError::Dtype {
                    key: b_key,
                    actual: format!("{} while lora_A is {}", b.dtype(), a.dtype()),
                });
            }
            let expected = config.rank_for(&name);
            if rank != expected {
                return Err(PeftError::Rank {
                    module: name,
                    expected,
                    actual: rank,
                });
            }
            modules.push(LoraModule {
                rank,
                alpha: config.alpha_for(&name),
                scale: config.scale_for(&name),
                d_in,
                d_out,
                a,
                b,
                name,
            });
        }
        if modules.is_empty() {
            return Err(PeftError::MissingTensor {
                key: format!("{KEY_PREFIX}<module>.lora_A.weight (the adapter has no tensors)"),
            });
        }
        Ok(PeftAdapter { config, modules })
    }

    pub fn module(&self, name: &str) -> Option<&LoraModule> {
        self.modules
            .binary_search_by(|m| m.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.modules[i])
    }

    /// Bytes of all A and B tensors.
    pub fn bytes(&self) -> usize {
        self.modules.iter().map(LoraModule::bytes).sum()
    }

    /// Writes the adapter as PEFT does: `adapter_config.json` (the implemented fields plus
    /// `peft_type`) and `adapter_model.safetensors`.
    pub fn save(&self, dir: impl AsRef<Path>) -> PeftResult<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let c = &self.config;
        let pat = |p: Vec<(String, Value)>| Value::Object(p.into_iter().collect());
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "use_rslora": c.use_rslora,
            "target_modules": serde_json::to_value(&c.target_modules).unwrap_or(Value::Null),
            "exclude_modules": serde_json::to_value(&c.exclude_modules).unwrap_or(Value::Null),
            "rank_pattern": pat(c.rank_pattern.iter().map(|p| (p.key.clone(), p.value.into())).collect()),
            "alpha_pattern": pat(c.alpha_pattern.iter().map(|p| (p.key.clone(), p.value.into())).collect()),
            "fan_in_fan_out": c.fan_in_fan_out,
            "lora_dropout": c.lora_dropout,
            "bias": c.bias,
            "use_dora": false,
            "base_model_name_or_path": c.base_model_name_or_path,
        });
        let cfg_path = dir.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&cfg).expect("a JSON value serialises");
        atomic_write(&cfg_path, |f| f.write_all(text.as_bytes()))?;
        let mut w = TensorFileWriter::default();
        for m in &self.modules {
            for (s, t, shape) in [
                ("A", &m.a, [m.rank, m.d_in]),
                ("B", &m.b, [m.d_out, m.rank]),
            ] {
                w.push(
                    format!("{KEY_PREFIX}{}.lora_{s}.weight", m.name),
                    to_st_dtype(t.dtype()),
                    shape.to_vec(),
                    host_bytes(t),
                );
            }
        }
        let path = dir.join("adapter_model.safetensors");
        w.metadata.insert("format".into(), "pt".into());
        atomic_write(&path, |f| w.write(f, &mut |_| {}))
    }
}

fn host_bytes(t: &HostTensor) -> Vec<u8> {
    match t {
        HostTensor::F32(v) => encode(v),
        HostTensor::F16(v) => encode(v),
        HostTensor::BF16(v) => encode(v),
    }
}

/// A safetensors file assembled tensor by tensor (the data may be produced lazily while writing).
#[derive(Default)]
pub struct TensorFileWriter {
    pub metadata: BTreeMap<String, String>,
    entries: Vec<(String, StDtype, Vec<usize>, Vec<u8>)>,
}

impl TensorFileWriter {
    pub fn push(&mut self, name: String, dtype: StDtype, shape: Vec<usize>, data: Vec<u8>) {
        self.entries.push((name, dtype, shape, data));
    }
    /// Writes header and data; `progress` gets the bytes of each tensor written.
    pub fn write(&self, f: &mut dyn Write, progress: &mut dyn FnMut(u64)) -> std::io::Result<()> {
        let specs: Vec<_> = self
            .entries
            .iter()
            .map(|(n, d, s, data)| (n.clone(), *d, s.clone(), data.len()))
            .collect();
        write_header(f, &self.metadata, &specs)?;
        for (_, _, _, data) in &self.entries {
            f.write_all(data)?;
            progress(data.len() as u64);
        }
        Ok(())
    }
}

fn st_dtype_name(d: StDtype) -> String {
    format!("{d:?}")
}

/// Writes a safetensors header for tensors laid out back to back in the given order.
fn write_header(
    f: &mut dyn Write,
    metadata: &BTreeMap<String, String>,
    specs: &[(String, StDtype, Vec<usize>, usize)],
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings serialise"),
        );
    }
    let mut offset = 0usize;
    for (name, dtype, shape, len) in specs {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": st_dtype_name(*dtype),
                "shape": shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut text = serde_json::to_string(&Value::Object(header)).expect("JSON serialises");
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    f.write_all(&(text.len() as u64).to_le_bytes())?;
    f.write_all(text.as_bytes())
}

/// Creates `path` atomically: `fill` writes a temporary file in the same directory, which is
/// synced and renamed over `path` only if everything succeeded (else removed).
pub fn atomic_write(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> PeftResult<()> {
    let tmp = TempOut::create(path)?;
    tmp.finish(fill)
}

/// A temporary sibling of an output file, removed on drop unless persisted.
pub struct TempOut {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl TempOut {
    pub fn create(dest: &Path) -> PeftResult<Self> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .ok_or_else(|| PeftError::Io {
                path: dest.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
            })?
            .to_string_lossy()
            .into_owned();
        for n in 0u32.. {
            let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(_) => {
                    return Ok(TempOut {
                        tmp,
                        dest: dest.to_path_buf(),
                        done: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
                Err(e) => return Err(io(&tmp)(e)),
            }
        }
        unreachable!()
    }
    /// Writes the temporary file and syncs it (not yet renamed).
    pub fn fill(
        &self,
        fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
    ) -> PeftResult<()> {
        let f = File::create(&self.tmp).map_err(io(&self.tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        fill(&mut w).map_err(io(&self.tmp))?;
        let f = w.into_inner().map_err(|e| io(&self.tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&self.tmp))
    }
    /// Renames the temporary file to its destination.
    pub fn persist(mut self) -> PeftResult<()> {
        std::fs::rename(&self.tmp, &self.dest).map_err(io(&self.dest))?;
        self.done = true;
        Ok(())
    }
    fn finish(
        self,
        fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
    ) -> PeftResult<()> {
        self.fill(fill)?;
        self.persist()
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A memory-mapped safetensors file.
pub struct MappedTensors {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl MappedTensors {
    pub fn open(path: impl AsRef<Path>) -> PeftResult<Self> {
        let path = path.as_ref().to_path_buf();
        let f = File::open(&path).map_err(io(&path))?;
        // SAFETY: the file is only read; like every mmap reader we rely on no one truncating it
        // while we run (a concurrent writer could change the bytes we read, never our memory safety
        // beyond a SIGBUS, which is the documented risk of memmap2).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io(&path))?;
        let me = MappedTensors { path, map };
        me.parse()?;
        Ok(me)
    }
    pub fn parse(&self) -> PeftResult<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|e| PeftError::Safetensors {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }
    /// The file's `__metadata__`.
    pub fn metadata(&self) -> PeftResult<BTreeMap<String, String>> {
        let (_, m) = SafeTensors::read_metadata(&self.map).map_err(|e| PeftError::Safetensors {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        Ok(m.metadata()
            .clone()
            .map(|h| h.into_iter().collect())
            .unwrap_or_default())
    }
    /// Tensor names in file (data offset) order.
    pub fn names_in_order(&self) -> PeftResult<Vec<String>> {
        let (_, m) = SafeTensors::read_metadata(&self.map).map_err(|e| PeftError::Safetensors {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let mut v: Vec<(usize, String)> = m
            .tensors()
            .into_iter()
            .map(|(n, info)| (info.data_offsets.0, n))
            .collect();
        v.sort();
        Ok(v.into_iter().map(|(_, n)| n).collect())
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What to do with the adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeOp {
    Merge,
    Unmerge,
}

/// Options of [`merge_file`] / [`unmerge_file`].
#[derive(Default)]
pub struct MergeOptions<'p> {
    /// Exact mode: merge writes this record, unmerge reads it (bit-exact round trip).
    pub exact_record: Option<PathBuf>,
    /// Called with the bytes of each tensor written (progress bars), and once with the total.
    pub on_total: Option<&'p mut dyn FnMut(u64)>,
    pub on_progress: Option<&'p mut dyn FnMut(u64)>,
}

/// What a merge did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MergeSummary {
    pub tensors: usize,
    pub merged: Vec<String>,
    pub bytes_written: u64,
    /// Exceptions in the exact record (0 without one).
    pub record_exceptions: u64,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Checks that a base tensor can take `m` and returns its merge shape.
fn base_shape(
    key: &str,
    dtype: StDtype,
    shape: &[usize],
    m: &LoraModule,
    fan_in_fan_out: bool,
    base: &SafeTensors<'_>,
) -> PeftResult<MergeShape> {
    let quant_companion = [
        "absmax",
        "quant_map",
        "quant_state",
        "SCB",
        "qweight",
        "scales",
    ]
    .iter()
    .any(|s| {
        base.tensor(&format!("{}.{s}", m.name)).is_ok()
            || base.tensor(&format!("{key}.{s}")).is_ok()
    });
    if st_dtype(dtype).is_none() || quant_companion {
        return Err(unsupported(
            key,
            format!("quantized base weights are not supported (dtype {dtype:?})"),
        ));
    }
    let (expected, ms) = if fan_in_fan_out {
        (
            vec![m.d_in, m.d_out],
            MergeShape::fan_in_fan_out(m.d_out, m.d_in),
        )
    } else {
        (vec![m.d_out, m.d_in], MergeShape::new(m.d_out, m.d_in))
    };
    if shape != expected.as_slice() {
        return Err(PeftError::Shape {
            key: key.into(),
            expected: format!(
                "{expected:?} (the adapter's d_out {} × d_in {}{})",
                m.d_out,
                m.d_in,
                if fan_in_fan_out {
                    ", fan_in_fan_out"
                } else {
                    ""
                }
            ),
            actual: shape.to_vec(),
        });
    }
    Ok(ms)
}

/// Exact-record entries of one module (stored in the record file).
struct ModuleRecord {
    host: HostRecord,
    /// FNV-1a of the merged tensor's bytes (checked before an exact unmerge).
    merged_hash: u64,
}

/// Merges (or unmerges) `adapter` into the safetensors file `base`, writing `out` atomically.
pub fn merge_file<B: Backend>(
    backend: &B,
    base: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    op: MergeOp,
    mut opts: MergeOptions<'_>,
) -> PeftResult<MergeSummary> {
    let mapped = MappedTensors::open(base)?;
    let st = mapped.parse()?;
    let fan = adapter.config.fan_in_fan_out;
    // Validate everything before writing anything.
    let mut plan: HashMap<String, (usize, MergeShape)> = HashMap::new();
    for (i, m) in adapter.modules.iter().enumerate() {
        let key = m.base_key();
        let view = st.tensor(&key).map_err(|_| PeftError::MissingTensor {
            key: format!("{key} (in the base file {})", base.display()),
        })?;
        let ms = base_shape(&key, view.dtype(), view.shape(), m, fan, &st)?;
        plan.insert(key, (i, ms));
    }
    let mut records_in: HashMap<String, ModuleRecord> = HashMap::new();
    if op == MergeOp::Unmerge {
        if let Some(p) = &opts.exact_record {
            records_in = read_records(p, adapter)?;
        }
    }
    let names = mapped.names_in_order()?;
    let total: u64 = names
        .iter()
        .map(|n| st.tensor(n).map(|v| v.data().len() as u64).unwrap_or(0))
        .sum();
    if let Some(f) = opts.on_total.as_mut() {
        f(total);
    }
    let specs: Vec<(String, StDtype, Vec<usize>, usize)> = names
        .iter()
        .map(|n| {
            let v = st.tensor(n).expect("listed");
            (n.clone(), v.dtype(), v.shape().to_vec(), v.data().len())
        })
        .collect();
    let mut summary = MergeSummary {
        tensors: names.len(),
        ..Default::default()
    };
    let mut records_out: Vec<(String, ModuleRecord)> = Vec::new();
    let tmp = TempOut::create(out)?;
    let metadata = mapped.metadata()?;
    let mut failure: Option<PeftError> = None;
    let mut progress = opts.on_progress.take();
    tmp.fill(|f| {
        write_header(f, &metadata, &specs)?;
        for name in &names {
            let view = st.tensor(name).expect("listed");
            match plan.get(name) {
                None => f.write_all(view.data())?,
                Some(&(i, ms)) => {
                    let m = &adapter.modules[i];
                    let dtype = st_dtype(view.dtype()).expect("checked");
                    let res = merge_one(
                        backend,
                        m,
                        dtype,
                        view.data(),
                        &ms,
                        op,
                        opts.exact_record.is_some(),
                        records_in.get(&m.name),
                    );
                    match res {
                        Ok((bytes, rec)) => {
                            f.write_all(&bytes)?;
                            if let Some(r) = rec {
                                summary.record_exceptions += r.host.header[0];
                                records_out.push((m.name.clone(), r));
                            }
                            summary.merged.push(m.name.clone());
                        }
                        Err(e) => {
                            failure = Some(e);
                            return Err(std::io::Error::other("merge failed"));
                        }
                    }
                }
            }
            summary.bytes_written += view.data().len() as u64;
            if let Some(p) = progress.as_mut() {
                p(view.data().len() as u64);
            }
        }
        Ok(())
    })
    .map_err(|e| failure.take().unwrap_or(e))?;
    // The record (if any) is renamed into place before the output: a visible output always has
    // its record.
    if op == MergeOp::Merge {
        if let Some(p) = &opts.exact_record {
            let rec_tmp = TempOut::create(p)?;
            rec_tmp.fill(|f| write_records(f, adapter, &records_out))?;
            rec_tmp.persist()?;
        }
    }
    tmp.persist()?;
    Ok(summary)
}

/// [`merge_file`] with [`MergeOp::Unmerge`].
pub fn unmerge_file<B: Backend>(
    backend: &B,
    merged: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    opts: MergeOptions<'_>,
) -> PeftResult<MergeSummary> {
    merge_file(backend, merged, adapter, out, MergeOp::Unmerge, opts)
}

#[allow(clippy::too_many_arguments)]
fn merge_one<B: Backend>(
    backend: &B,
    m: &LoraModule,
    w_dtype: DType,
    w_bytes: &[u8],
    shape: &MergeShape,
    op: MergeOp,
    exact: bool,
    record: Option<&ModuleRecord>,
) -> PeftResult<(Vec<u8>, Option<ModuleRecord>)> {
    fn typed<B: Backend, TW: MergeFloat>(
        backend: &B,
        m: &LoraModule,
        w_bytes: &[u8],
        shape: &MergeShape,
        op: MergeOp,
        exact: bool,
        record: Option<&ModuleRecord>,
    ) -> PeftResult<(Vec<u8>, Option<ModuleRecord>)> {
        let w_host: Vec<TW> = decode(TW::DTYPE, w_bytes).to::<TW>();
        // A and B in W's dtype when they match, else widened to f32 (exact for f16/bf16).
        if let (Some(a), Some(b)) = (m.a.as_slice::<TW>(), m.b.as_slice::<TW>()) {
            with_ab::<B, TW, TW>(backend, m, w_host, a, b, shape, op, exact, record)
        } else {
            let (a, b) = (m.a.to_f32(), m.b.to_f32());
            with_ab::<B, TW, f32>(backend, m, w_host, &a, &b, shape, op, exact, record)
        }
    }
    match w_dtype {
        DType::F32 => typed::<B, f32>(backend, m, w_bytes, shape, op, exact, record),
        DType::F16 => typed::<B, f16>(backend, m, w_bytes, shape, op, exact, record),
        DType::BF16 => typed::<B, bf16>(backend, m, w_bytes, shape, op, exact, record),
        DType::F64 => unreachable!(),
    }
}

#[allow(clippy::too_many_arguments)]
fn with_ab<B: Backend, TW: MergeFloat, TA: Float>(
    backend: &B,
    m: &LoraModule,
    w_host: Vec<TW>,
    a: &[TA],
    b: &[TA],
    shape: &MergeShape,
    op: MergeOp,
    exact: bool,
    record: Option<&ModuleRecord>,
) -> PeftResult<(Vec<u8>, Option<ModuleRecord>)> {
    let mut w = backend.upload(&w_host)?;
    let (da, db) = (backend.upload(a)?, backend.upload(b)?);
    let lora = Lora::packed(&da, &db, m.rank, m.d_in, m.scale_f32());
    let nonfinite = || PeftError::NonFiniteMerge {
        module: m.name.clone(),
    };
    let mut out_rec = None;
    match (op, exact) {
        (MergeOp::Merge, false) => {
            let mut scratch = MergeScratch::alloc::<TW>(backend, shape)?;
            merge::merge_safe(
                backend,
                &mut w,
                shape,
                &lora,
                merge::Direction::Merge,
                &mut scratch,
            )?;
            if scratch.status(backend)? & merge::status::NONFINITE != 0 {
                return Err(nonfinite());
            }
        }
        (MergeOp::Merge, true) => {
            let mut cap = shape.elements() / 64 + 16;
            loop {
                let mut rec = MergeRecord::alloc::<TW>(backend, shape, cap)?;
                let mut attempt = backend.upload(&w_host)?;
                merge::merge_exact(backend, &mut attempt, shape, &lora, &mut rec, true)?;
                let state = rec.state(backend)?;
                if state.status & merge::status::NONFINITE != 0 {
                    return Err(nonfinite());
                }
                if state.valid {
                    w = attempt;
                    let merged = backend.download(&w)?;
                    out_rec = Some(ModuleRecord {
                        host: rec.to_host(backend)?,
                        merged_hash: fnv1a(&encode(&merged)),
                    });
                    break;
                }
                cap = state.exceptions as usize;
            }
        }
        (MergeOp::Unmerge, false) => {
            let mut scratch = MergeScratch::alloc::<TW>(backend, shape)?;
            merge::merge_safe(
                backend,
                &mut w,
                shape,
                &lora,
                merge::Direction::Unmerge,
                &mut scratch,
            )?;
            if scratch.status(backend)? & merge::status::NONFINITE != 0 {
                return Err(nonfinite());
            }
        }
        (MergeOp::Unmerge, true) => {
            let r = record
                .ok_or_else(|| PeftError::Record(format!("no entry for module `{}`", m.name)))?;
            if fnv1a(&encode(&w_host)) != r.merged_hash {
                return Err(PeftError::Record(format!(
                    "module `{}`: the weight is not the one this record's merge produced",
                    m.name
                )));
            }
            if r.host.shape != *shape || r.host.dtype != TW::DTYPE {
                return Err(PeftError::Record(format!(
                    "module `{}`: record for {:?} {}, weight is {:?} {}",
                    m.name,
                    r.host.shape,
                    r.host.dtype,
                    shape,
                    TW::DTYPE
                )));
            }
            let mut rec = MergeRecord::from_host::<TW>(backend, &r.host)?;
            merge::unmerge_exact(backend, &mut w, shape, &lora, &mut rec)?;
            if rec.state(backend)?.status & merge::status::BAD_RECORD != 0 {
                return Err(PeftError::Record(format!(
                    "module `{}`: the record is invalid",
                    m.name
                )));
            }
        }
    }
    let out = backend.download(&w)?;
    Ok((encode(&out), out_rec))
}

const RECORD_FORMAT: &str = "lora-kernels exact merge record v1";

/// The record file: a safetensors file with, per module, `<module>.codes` (U32),
/// `<module>.exc_index` (U64), `<module>.exc_bits` (U32), `<module>.header` (U64 [2]) and metadata
/// (`format`, and per module its shape, dtype, scale bits and merged-weight hash).
fn write_records(
    f: &mut dyn Write,
    adapter: &PeftAdapter,
    recs: &[(String, ModuleRecord)],
) -> std::io::Result<()> {
    let mut w = TensorFileWriter::default();
    w.metadata.insert("format".into(), RECORD_FORMAT.into());
    for (name, r) in recs {
        let h = &r.host;
        let n = (h.header[0] as usize).min(h.exc_index.len());
        let m = adapter.module(name).expect("merged modules exist");
        let meta = serde_json::json!({
            "d_out": h.shape.d_out, "d_in": h.shape.d_in, "ld_w": h.shape.ld_w,
            "fan_in_fan_out": h.shape.fan_in_fan_out, "dtype": h.dtype.name(),
            "scale_bits": m.scale_f32().to_bits(), "rank": m.rank,
            "merged_fnv1a": format!("{:016x}", r.merged_hash),
        });
        w.metadata.insert(name.clone(), meta.to_string());
        let le32 = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let le64 = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        w.push(
            format!("{name}.codes"),
            StDtype::U32,
            vec![h.codes.len()],
            le32(&h.codes),
        );
        w.push(
            format!("{name}.exc_index"),
            StDtype::U64,
            vec![n],
            le64(&h.exc_index[..n]),
        );
        w.push(
            format!("{name}.exc_bits"),
            StDtype::U32,
            vec![n],
            le32(&h.exc_bits[..n]),
        );
        w.push(
            format!("{name}.header"),
            StDtype::U64,
            vec![2],
            le64(&h.header),
        );
    }
    w.write(f, &mut |_| {})
}

fn read_records(path: &Path, adapter: &PeftAdapter) -> PeftResult<HashMap<String, ModuleRecord>> {
    let bad = |m: String| PeftError::Record(format!("{}: {m}", path.display()));
    let mapped = MappedTensors::open(path).map_err(|e| bad(e.to_string()))?;
    let meta = mapped.metadata()?;
    if meta.get("format").map(String::as_str) != Some(RECORD_FORMAT) {
        return Err(bad(format!("not a `{RECORD_FORMAT}` file")));
    }
    let st = mapped.parse()?;
    let mut out = HashMap::new();
    for m in &adapter.modules {
        let text = meta
            .get(&m.name)
            .ok_or_else(|| bad(format!("no entry for module `{}`", m.name)))?;
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let get = |k: &str| {
            v.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("module `{}`: no `{k}`", m.name)))
        };
        let num = |k: &str| -> PeftResult<u64> {
            get(k)?
                .as_u64()
                .ok_or_else(|| bad(format!("module `{}`: `{k}` is not a number", m.name)))
        };
        if num("scale_bits")? != m.scale_f32().to_bits() as u64 || num("rank")? != m.rank as u64 {
            return Err(bad(format!(
                "module `{}`: made with another adapter (rank or scale differ)",
                m.name
            )));
        }
        let dtype = match get("dtype")?.as_str() {
            Some("f32") => DType::F32,
            Some("f16") => DType::F16,
            Some("bf16") => DType::BF16,
            other => return Err(bad(format!("module `{}`: dtype {other:?}", m.name))),
        };
        let shape = MergeShape {
            d_out: num("d_out")? as usize,
            d_in: num("d_in")? as usize,
            ld_w: num("ld_w")? as usize,
            fan_in_fan_out: get("fan_in_fan_out")?.as_bool().unwrap_or(false),
        };
        let hash = get("merged_fnv1a")?
            .as_str()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| bad(format!("module `{}`: bad merged_fnv1a", m.name)))?;
        let tensor = |suffix: &str, want: StDtype| -> PeftResult<Vec<u8>> {
            let key = format!("{}.{suffix}", m.name);
            let t = st
                .tensor(&key)
                .map_err(|_| bad(format!("missing tensor `{key}`")))?;
            if t.dtype() != want {
                return Err(bad(format!("tensor `{key}` has dtype {:?}", t.dtype())));
            }
            Ok(t.data().to_vec())
        };
        let u32s = |b: Vec<u8>| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let u64s = |b: Vec<u8>| -> Vec<u64> {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let header = u64s(tensor("header", StDtype::U64)?);
        let host = HostRecord {
            shape,
            dtype,
            codes: u32s(tensor("codes", StDtype::U32)?),
            exc_index: u64s(tensor("exc_index", StDtype::U64)?),
            exc_bits: u32s(tensor("exc_bits", StDtype::U32)?),
            header: [
                header.first().copied().unwrap_or(0),
                header.get(1).copied().unwrap_or(0),
            ],
        };
        if header.len() != 2
            || host.codes.len() != shape.code_words()
            || host.exc_index.len() != host.exc_bits.len()
            || host.header[0] != host.exc_index.len() as u64
            || host.header[1] != 1
        {
            return Err(bad(format!("module `{}`: inconsistent record", m.name)));
        }
        out.insert(
            m.name.clone(),
            ModuleRecord {
                host,
                merged_hash: hash,
            },
        );
    }
    Ok(out)
}

/// A summary of an adapter for `lora-kernels inspect`.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    pub config: PeftConfig,
    pub modules: Vec<ModuleInfo>,
    pub total_parameters: usize,
    pub total_bytes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModuleInfo {
    pub name: String,
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
    pub d_in: usize,
    pub d_out: usize,
    pub dtype: String,
    pub parameters: usize,
    pub bytes: usize,
}

impl PeftAdapter {
    pub fn inspect(&self) -> Inspection {
        let modules: Vec<ModuleInfo> = self
            .modules
            .iter()
            .map(|m| ModuleInfo {
                name: m.name.clone(),
                rank: m.rank,
                alpha: m.alpha,
                scale: m.scale,
                d_in: m.d_in,
                d_out: m.d_out,
                dtype: m.dtype().name().into(),
                parameters: m.a.len() + m.b.len(),
                bytes: m.bytes(),
            })
            .collect();
        Inspection {
            config: self.config.clone(),
            total_parameters: modules.iter().map(|m| m.parameters).sum(),
            total_bytes: modules.iter().map(|m| m.bytes).sum(),
            modules,
        }
    }
}
