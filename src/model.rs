//! The reference model (issue #7): a tiny Llama-style LM trained and served entirely on this
//! crate's kernels.
//!
//! **Block.** `x → RMSNorm → attention (q, k, v, o; RoPE on q and k; causal; grouped KV heads)
//! → + x → RMSNorm → SwiGLU MLP (gate, up, down) → + …`, then a final RMSNorm and an untied LM
//! head.
//! Weights are named as Hugging Face's `LlamaForCausalLM` names them
//! (`model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.gate_proj`, …), so adapters saved
//! from it are ordinary PEFT adapters.
//!
//! **LoRA** ([`LoraConfig`], PEFT's fields): on any subset of the seven projections; training
//! ([`TinyLm::forward`] on a [`Tape`]) uses the dense single-adapter kernels with the fused dropout
//! shrink and the LoRA backward; [`TinyLm::export_peft`] writes what was trained as a
//! [`PeftAdapter`].
//!
//! **Serving** ([`Engine`]): a mixed batch of requests, each with its own adapter from an
//! [`AdapterRegistry`] or none, prefilled with SGMV (tokens packed, segments planned on the
//! device) and decoded greedily with BGMV, over a KV cache (`kv_cache_write` +
//! `attention_decode`).

use crate::adapter::ExpandMode;
use crate::attention::{self, Attention, AttentionBatch};
use crate::autograd::{LoraLink, ParamId, Params, Tape, Tensor};
use crate::backend::Backend;
use crate::bgmv::Bgmv;
use crate::dropout::Dropout;
use crate::dtype::Float;
use crate::elementwise;
use crate::embedding;
use crate::error::{Error, Result};
use crate::gemm::{gemm, Gemm};
use crate::loss;
use crate::merge::{self, Lora, MergeFloat, MergeShape};
use crate::norm::{self, RmsNorm};
use crate::peft::{HostTensor, LoraModule, ModuleSelector, PeftAdapter, PeftConfig};
use crate::registry::{AdapterRegistry, LayerSpec};
use crate::rope::{self, Rope};
use crate::sgmv::{Sgmv, SgmvPlan};

/// The seven projections LoRA may target, in the order a block runs them.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The module name of projection `m` of layer `layer`, as Hugging Face names it.
pub fn module_name(layer: usize, m: usize) -> String {
    let group = if m <= O { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{group}.{}", PROJECTIONS[m])
}

/// Sizes of the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub rope_theta: f32,
    pub norm_eps: f32,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }
    /// (d_out, d_in) of projection `m`.
    pub fn projection_shape(&self, m: usize) -> (usize, usize) {
        let (d, kv, ff) = (self.d_model, self.kv_dim(), self.d_ff);
        [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)][m]
    }
    fn attention(&self) -> Attention {
        Attention::new(self.n_heads, self.n_kv_heads, self.head_dim())
    }
    fn validate(&self) -> Result<()> {
        if self.n_heads == 0 || self.d_model % self.n_heads != 0 {
            return Err(Error::invalid(
                "n_heads",
                "a divisor of d_model",
                self.n_heads,
            ));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::invalid(
                "n_kv_heads",
                "a divisor of n_heads",
                self.n_kv_heads,
            ));
        }
        if self.vocab == 0 || self.n_layers == 0 || self.d_ff == 0 {
            return Err(Error::invalid(
                "config",
                "non-zero sizes",
                format!("{self:?}"),
            ));
        }
        Ok(())
    }
}

/// LoRA hyper-parameters, as PEFT's `LoraConfig` names them.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Projection names (`"q_proj"`, …) or full module names.
    pub target_modules: Vec<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
    /// Whether a module is targeted (PEFT's list semantics: exact name or `.`-suffix).
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }
}

/// A parameter's ids in a layer.
#[derive(Clone, Debug)]
struct LayerIds {
    attn_norm: ParamId,
    proj: [ParamId; 7],
    mlp_norm: ParamId,
}

/// The trainable adapter currently attached.
#[derive(Clone, Debug)]
struct Attached {
    cfg: LoraConfig,
    /// Per layer, per projection: (A, B).
    links: Vec<[Option<(ParamId, ParamId)>; 7]>,
}

/// Deterministic uniform values in `[-bound, bound)` (SplitMix64): the model's initialisation does
/// not depend on any external RNG's version.
pub fn uniform(seed: u64, n: usize, bound: f64) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound
        })
        .collect()
}

/// A training batch: packed sequences and, per token, the next token to predict (−1 = no loss).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub tokens: Vec<i32>,
    pub targets: Vec<i32>,
    pub lens: Vec<usize>,
}

/// The tiny Llama-style LM.
pub struct TinyLm<B: Backend, T: Float> {
    pub cfg: LlamaConfig,
    pub params: Params<B, T>,
    embed: ParamId,
    layers: Vec<LayerIds>,
    final_norm: ParamId,
    lm_head: ParamId,
    base_len: usize,
    adapter: Option<Attached>,
}

impl<B: Backend, T: Float> TinyLm<B, T> {
    /// A freshly initialised, fully trainable model (PyTorch's default `nn.Linear` bound
    /// `1/sqrt(d_in)`, embeddings `U(-1, 1)`, norm weights 1).
    pub fn new(b: &B, cfg: LlamaConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut params = Params::new();
        let mut n = 0u64;
        let mut init =
            |params: &mut Params<B, T>, name: String, rows: usize, cols: usize, bound: f64| {
                n += 1;
                let data: Vec<T> = if bound == 0.0 {
                    vec![T::from_f64(1.0); rows * cols]
                } else {
                    uniform(seed ^ n.wrapping_mul(0x1000_0001), rows * cols, bound)
                        .into_iter()
                        .map(T::from_f64)
                        .collect()
                };
                params.add(b, name, rows, cols, &data, true)
            };
        let d = cfg.d_model;
        let embed = init(
            &mut params,
            "model.embed_tokens.weight".into(),
            cfg.vocab,
            d,
            1.0,
        )?;
        let mut layers = Vec::new();
        for l in 0..cfg.n_layers {
            let attn_norm = init(
                &mut params,
                format!("model.layers.{l}.input_layernorm.weight"),
                1,
                d,
                0.0,
            )?;
            let mut proj = [ParamId(0); 7];
            for (m, id) in proj.iter_mut().enumerate() {
                let (d_out, d_in) = cfg.projection_shape(m);
                *id = init(
                    &mut params,
                    format!("{}.weight", module_name(l, m)),
                    d_out,
                    d_in,
                    1.0 / (d_in as f64).sqrt(),
                )?;
            }
            let mlp_norm = init(
                &mut params,
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                1,
                d,
                0.0,
            )?;
            layers.push(LayerIds {
                attn_norm,
                proj,
                mlp_norm,
            });
        }
        let final_norm = init(&mut params, "model.norm.weight".into(), 1, d, 0.0)?;
        let lm_head = init(
            &mut params,
            "lm_head.weight".into(),
            cfg.vocab,
            d,
            1.0 / (d as f64).sqrt(),
        )?;
        let base_len = params.len();
        Ok(TinyLm {
            cfg,
            params,
            embed,
            layers,
            final_norm,
            lm_head,
            base_len,
            adapter: None,
        })
    }

    /// Attaches a fresh trainable adapter (A as PEFT initialises it: `U(±1/sqrt(d_in))`; B = 0)
    /// and freezes the base. Replaces an attached adapter.
    pub fn attach_lora(&mut self, b: &B, cfg: LoraConfig, seed: u64) -> Result<()> {
        if cfg.r == 0 || cfg.r > crate::adapter::MAX_RANK {
            return Err(Error::invalid(
                "r",
                format!("1 to {}", crate::adapter::MAX_RANK),
                cfg.r,
            ));
        }
        if !(0.0..1.0).contains(&cfg.lora_dropout) {
            return Err(Error::invalid(
                "lora_dropout",
                "a probability in [0, 1)",
                cfg.lora_dropout,
            ));
        }
        self.detach_lora();
        let base = self.base_len;
        self.params.set_trainable(|_| true, false);
        let mut links = Vec::new();
        for l in 0..self.cfg.n_layers {
            let mut row = [None; 7];
            for (m, link) in row.iter_mut().enumerate() {
                let name = module_name(l, m);
                if !cfg.targets(&name) {
                    continue;
                }
                let (d_out, d_in) = self.cfg.projection_shape(m);
                let a: Vec<T> = uniform(
                    seed ^ ((l * 7 + m) as u64 + 1).wrapping_mul(0x2545_F491),
                    cfg.r * d_in,
                    1.0 / (d_in as f64).sqrt(),
                )
                .into_iter()
                .map(T::from_f64)
                .collect();
                let ia =
                    self.params
                        .add(b, format!("{name}.lora_A.weight"), cfg.r, d_in, &a, true)?;
                let ib = self.params.add(
                    b,
                    format!("{name}.lora_B.weight"),
                    d_out,
                    cfg.r,
                    &vec![T::from_f64(0.0); d_out * cfg.r],
                    true,
                )?;
                *link = Some((ia, ib));
            }
            links.push(row);
        }
        debug_assert!(
            self.params.len() > base || links.iter().all(|r| r.iter().all(Option::is_none))
        );
        self.adapter = Some(Attached { cfg, links });
        Ok(())
    }

    /// Removes the attached adapter's parameters and unfreezes nothing (the base stays as it is).
    pub fn detach_lora(&mut self) {
        self.params.truncate(self.base_len);
        self.adapter = None;
    }

    /// Sets an adapter parameter or base weight by name from host values (tests).
    pub fn set_param(&mut self, b: &B, name: &str, data: &[T]) -> Result<()> {
        let id = self
            .params
            .id(name)
            .ok_or_else(|| Error::invalid("name", "a registered parameter", name))?;
        b.write(&mut self.params.get_mut(id).value, data)
    }

    fn link(&self, layer: usize, m: usize, step_seed: u64) -> Option<LoraLink> {
        let att = self.adapter.as_ref()?;
        let (a, b) = att.links[layer][m]?;
        Some(LoraLink {
            a,
            b,
            rank: att.cfg.r,
            scale: att.cfg.scale() as f32,
            dropout: Dropout {
                p: att.cfg.lora_dropout,
                seed: step_seed,
                offset: (layer * 7 + m) as u64,
            },
        })
    }

    /// Logits `[tokens, vocab]` of a packed batch, recorded on `tape`. `step_seed` seeds the LoRA
    /// dropout masks (each module its own Philox offset).
    pub fn forward(
        &self,
        tape: &mut Tape<'_, B, T>,
        tokens: &[i32],
        lens: &[usize],
        step_seed: u64,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let p = &self.params;
        tape.set_batch(lens)?;
        let mut x = tape.embedding(p, self.embed, tokens)?;
        for (l, ids) in self.layers.iter().enumerate() {
            let h = tape.rmsnorm(p, x, ids.attn_norm, c.norm_eps)?;
            let lin = |tape: &mut Tape<'_, B, T>, h: Tensor, m: usize| {
                tape.linear(p, h, ids.proj[m], self.link(l, m, step_seed))
            };
            let q = lin(tape, h, Q)?;
            let k = lin(tape, h, K)?;
            let v = lin(tape, h, V)?;
            let q = tape.rope(q, c.n_heads, c.rope_theta)?;
            let k = tape.rope(k, c.n_kv_heads, c.rope_theta)?;
            let a = tape.attention(q, k, v, c.attention())?;
            let o = lin(tape, a, O)?;
            x = tape.add(x, o)?;
            let h = tape.rmsnorm(p, x, ids.mlp_norm, c.norm_eps)?;
            let g = lin(tape, h, GATE)?;
            let u = lin(tape, h, UP)?;
            let s = tape.swiglu(g, u)?;
            let dn = lin(tape, s, DOWN)?;
            x = tape.add(x, dn)?;
        }
        let h = tape.rmsnorm(p, x, self.final_norm, c.norm_eps)?;
        tape.linear(p, h, self.lm_head, None)
    }

    /// Mean next-token loss of a batch, recorded on `tape` (call `tape.backward` next).
    pub fn loss(&self, tape: &mut Tape<'_, B, T>, batch: &Batch, step_seed: u64) -> Result<f64> {
        let logits = self.forward(tape, &batch.tokens, &batch.lens, step_seed)?;
        tape.cross_entropy(logits, &batch.targets)
    }

    /// The base model with its weights converted to `U` (nearest even), e.g. to serve an f32-trained
    /// model in bf16 on tensor cores. An attached adapter is not copied.
    pub fn to_dtype<U: Float>(&self, b: &B) -> Result<TinyLm<B, U>> {
        let mut params = Params::new();
        for p in self.params.iter().take(self.base_len) {
            let v: Vec<U> = b
                .download(&p.value)?
                .iter()
                .map(|x| U::from_f64(x.to_f64()))
                .collect();
            params.add(b, p.name.clone(), p.rows, p.cols, &v, p.trainable)?;
        }
        Ok(TinyLm {
            cfg: self.cfg,
            params,
            embed: self.embed,
            layers: self.layers.clone(),
            final_norm: self.final_norm,
            lm_head: self.lm_head,
            base_len: self.base_len,
            adapter: None,
        })
    }

    /// Writes every parameter, the AdamW moments and the step count (safetensors, f64: exact for
    /// every element type), so that training resumes bit for bit.
    pub fn save_checkpoint(&self, b: &B, path: &std::path::Path) -> Result<()> {
        let (step, state) = self.params.state(b)?;
        let bytes: Vec<(String, Vec<u8>, usize)> = state
            .iter()
            .map(|(name, v)| {
                (
                    name.clone(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    v.len(),
                )
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, data, n)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![*n], data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::invalid("checkpoint", "a valid tensor", e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = std::collections::HashMap::from([("step".to_string(), step.to_string())]);
        let out = safetensors::serialize(views, &Some(meta))
            .map_err(|e| Error::invalid("checkpoint", "serialisable", e.to_string()))?;
        std::fs::write(path, out).map_err(|e| Error::invalid("path", "writable", e.to_string()))
    }

    /// Restores [`TinyLm::save_checkpoint`] into a model of the same configuration (and the same
    /// attached adapter, if any).
    pub fn load_checkpoint(&mut self, b: &B, path: &std::path::Path) -> Result<()> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::invalid("path", "readable", e.to_string()))?;
        let bad =
            |e: String| Error::invalid("checkpoint", "a checkpoint written by save_checkpoint", e);
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let step: u32 = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no step".into()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut state = Vec::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F64 {
                return Err(bad(format!("{name} is not f64")));
            }
            let v: Vec<f64> = view
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            state.push((name, v));
        }
        self.params.load_state(b, step, &state)
    }

    /// The attached adapter as a PEFT adapter (f32 tensors).
    pub fn export_peft(&self, b: &B) -> Result<PeftAdapter> {
        let att = self
            .adapter
            .as_ref()
            .ok_or_else(|| Error::invalid("adapter", "an attached adapter", "none"))?;
        let scale = att.cfg.scale();
        let mut modules = Vec::new();
        for (l, row) in att.links.iter().enumerate() {
            for (m, link) in row.iter().enumerate() {
                let Some((a, bb)) = link else { continue };
                let (d_out, d_in) = self.cfg.projection_shape(m);
                let host = |id: &ParamId| -> Result<Vec<f32>> {
                    Ok(b.download(&self.params.get(*id).value)?
                        .iter()
                        .map(|v| v.to_f32())
                        .collect())
                };
                modules.push(LoraModule {
                    name: module_name(l, m),
                    rank: att.cfg.r,
                    alpha: att.cfg.lora_alpha,
                    scale,
                    d_in,
                    d_out,
                    a: HostTensor::F32(host(a)?),
                    b: HostTensor::F32(host(bb)?),
                });
            }
        }
        modules.sort_by(|x, y| x.name.cmp(&y.name));
        let config = PeftConfig {
            r: att.cfg.r,
            lora_alpha: att.cfg.lora_alpha,
            use_rslora: att.cfg.use_rslora,
            target_modules: ModuleSelector::List(att.cfg.target_modules.clone()),
            exclude_modules: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            fan_in_fan_out: false,
            lora_dropout: att.cfg.lora_dropout,
            bias: "none".into(),
            base_model_name_or_path: Some("lora-kernels/tiny-llama".into()),
        };
        Ok(PeftAdapter { config, modules })
    }
}

/// The registry layers a [`TinyLm`] serves: one single-module layer per projection, in the order
/// `layer * 7 + projection`.
pub fn registry_layers(cfg: &LlamaConfig) -> Vec<LayerSpec> {
    (0..cfg.n_layers)
        .flat_map(|l| {
            (0..7).map(move |m| {
                let (d_out, d_in) = cfg.projection_shape(m);
                LayerSpec::single(module_name(l, m), d_in, d_out)
            })
        })
        .collect()
}

/// One generation request: a prompt and the registry slot of its adapter (None: the base model).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub prompt: Vec<i32>,
    pub adapter: Option<usize>,
}

/// What [`Engine::generate`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Per request, the generated tokens.
    pub tokens: Vec<Vec<i32>>,
    /// Prefill logits of every prompt token, `[prompt tokens, vocab]` packed in request order.
    pub prefill_logits: Vec<f32>,
    /// Tokens processed (prompt + generated), for throughput.
    pub processed: usize,
}

/// Serves a [`TinyLm`] whose weights and activations are `T` (f32 by default; f16/bf16 run the GEMMs
/// and SGMV on tensor cores): SGMV prefill, BGMV decode, KV cache, greedy.
pub struct Engine<'m, B: Backend + 'static, T: Float = f32> {
    model: &'m TinyLm<B, T>,
    /// Weights used instead of the model's for some projections (merged adapters): key
    /// `layer * 7 + projection`.
    overrides: Vec<Option<B::Buffer<T>>>,
}

/// Per-layer KV cache: rows `[seq * capacity + position]`.
struct KvCache<B: Backend, T: Float> {
    k: Vec<B::Buffer<T>>,
    v: Vec<B::Buffer<T>>,
}

impl<'m, B: Backend + 'static, T: Float> Engine<'m, B, T> {
    pub fn new(model: &'m TinyLm<B, T>) -> Self {
        Engine {
            model,
            overrides: (0..model.cfg.n_layers * 7).map(|_| None).collect(),
        }
    }

    fn weight(&self, l: usize, m: usize) -> &B::Buffer<T> {
        self.overrides[l * 7 + m]
            .as_ref()
            .unwrap_or(&self.model.params.get(self.model.layers[l].proj[m]).value)
    }

    /// Greedy generation of `max_new` tokens for every request, all in one batch.
    pub fn generate(
        &self,
        b: &B,
        registry: Option<&AdapterRegistry<B, T>>,
        requests: &[Request],
        max_new: usize,
    ) -> Result<Generation> {
        let cfg = &self.model.cfg;
        let n = requests.len();
        if n == 0 {
            return Ok(Generation {
                tokens: Vec::new(),
                prefill_logits: Vec::new(),
                processed: 0,
            });
        }
        for r in requests {
            if r.prompt.is_empty() {
                return Err(Error::invalid("prompt", "at least one token", 0));
            }
            if let (Some(id), Some(reg)) = (r.adapter, registry) {
                if reg.name(id).is_none() {
                    return Err(Error::invalid("adapter", "a loaded registry slot", id));
                }
            } else if r.adapter.is_some() {
                return Err(Error::invalid(
                    "adapter",
                    "a registry to serve adapters from",
                    "none",
                ));
            }
        }
        let capacity = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0) + max_new;
        let mut cache = KvCache {
            k: (0..cfg.n_layers)
                .map(|_| b.alloc(n * capacity * cfg.kv_dim()))
                .collect::<Result<_>>()?,
            v: (0..cfg.n_layers)
                .map(|_| b.alloc(n * capacity * cfg.kv_dim()))
                .collect::<Result<_>>()?,
        };
        let mut fault = b.alloc::<u32>(1)?;

        // Prefill: every prompt token, packed, SGMV for the adapters.
        let lens: Vec<usize> = requests.iter().map(|r| r.prompt.len()).collect();
        let tokens: Vec<i32> = requests
            .iter()
            .flat_map(|r| r.prompt.iter().copied())
            .collect();
        let positions: Vec<i32> = lens.iter().flat_map(|&l| 0..l as i32).collect();
        let slots: Vec<i32> = lens
            .iter()
            .enumerate()
            .flat_map(|(s, &l)| (0..l).map(move |p| (s * capacity + p) as i32))
            .collect();
        let adapter_ids: Vec<i32> = requests
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.adapter.map_or(-1, |a| a as i32), r.prompt.len()))
            .collect();
        let mut starts = vec![0i32];
        for &l in &lens {
            starts.push(starts.last().unwrap() + l as i32);
        }
        let step = Step {
            tokens: tokens.len(),
            positions: b.upload(&positions)?,
            slots: b.upload(&slots)?,
            adapter_ids: b.upload(&adapter_ids)?,
            kind: StepKind::Prefill {
                seq_starts: b.upload(&starts)?,
                n_seqs: n,
                max_len: *lens.iter().max().unwrap(),
            },
        };
        let logits = self.run(b, registry, &step, &tokens, &mut cache, &mut fault)?;
        let prefill_logits: Vec<f32> = b.download(&logits)?.iter().map(|v| v.to_f32()).collect();
        let last_rows: Vec<usize> = starts[1..].iter().map(|&s| s as usize - 1).collect();
        let mut next = self.argmax(b, &logits, tokens.len(), &last_rows)?;
        let mut out: Vec<Vec<i32>> = next.iter().map(|&t| vec![t]).collect();
        let mut processed = tokens.len();

        // Decode: one token per request per step, BGMV for the adapters.
        let seq_adapter: Vec<i32> = requests
            .iter()
            .map(|r| r.adapter.map_or(-1, |a| a as i32))
            .collect();
        let starts_kv: Vec<i32> = (0..n).map(|s| (s * capacity) as i32).collect();
        let kv_start = b.upload(&starts_kv)?;
        for i in 1..max_new {
            let pos: Vec<i32> = lens.iter().map(|&l| (l + i - 1) as i32).collect();
            let slots: Vec<i32> = pos
                .iter()
                .enumerate()
                .map(|(s, &p)| (s * capacity) as i32 + p)
                .collect();
            let kv_len: Vec<i32> = pos.iter().map(|&p| p + 1).collect();
            let step = Step {
                tokens: n,
                positions: b.upload(&pos)?,
                slots: b.upload(&slots)?,
                adapter_ids: b.upload(&seq_adapter)?,
                kind: StepKind::Decode {
                    kv_start: &kv_start,
                    kv_len: b.upload(&kv_len)?,
                    max_kv_len: *kv_len.iter().max().unwrap() as usize,
                },
            };
            let logits = self.run(b, registry, &step, &next, &mut cache, &mut fault)?;
            next = self.argmax(b, &logits, n, &(0..n).collect::<Vec<_>>())?;
            for (o, &t) in out.iter_mut().zip(&next) {
                o.push(t);
            }
            processed += n;
        }
        let f = b.download(&fault)?[0];
        if f != 0 {
            return Err(Error::invalid(
                "serving indices",
                "in range",
                format!("fault word {f:#x}"),
            ));
        }
        Ok(Generation {
            tokens: out,
            prefill_logits,
            processed,
        })
    }

    fn argmax(
        &self,
        b: &B,
        logits: &B::Buffer<T>,
        rows: usize,
        pick: &[usize],
    ) -> Result<Vec<i32>> {
        let mut out = b.alloc::<i32>(rows)?;
        loss::argmax_rows(b, rows, self.model.cfg.vocab, logits, &mut out)?;
        let all = b.download(&out)?;
        Ok(pick.iter().map(|&r| all[r]).collect())
    }

    /// One forward over `ids` (prefill: every prompt token; decode: one per sequence): writes the
    /// new K/V rows to the cache and returns the logits `[tokens, vocab]`.
    fn run(
        &self,
        b: &B,
        registry: Option<&AdapterRegistry<B, T>>,
        step: &Step<'_, B>,
        ids: &[i32],
        cache: &mut KvCache<B, T>,
        fault: &mut B::Buffer<u32>,
    ) -> Result<B::Buffer<T>> {
        let cfg = &self.model.cfg;
        let p = &self.model.params;
        let t = step.tokens;
        let d = cfg.d_model;
        let ids_buf = b.upload(ids)?;
        let mut x = b.alloc::<T>(t * d)?;
        let embed = p.get(self.model.embed);
        embedding::embedding_forward(b, cfg.vocab, d, t, &ids_buf, &embed.value, &mut x, fault)?;
        // The adapters: one SGMV plan per prefill (shared by every layer), BGMV ids for decode.
        let lora = match registry {
            None => None,
            Some(reg) => Some(LoraRouting::new(b, reg, step)?),
        };
        let norm = |x: &B::Buffer<T>, w: ParamId| -> Result<B::Buffer<T>> {
            let mut y = b.alloc(t * d)?;
            let mut rstd = b.alloc(t)?;
            let s = RmsNorm {
                rows: t,
                dim: d,
                eps: cfg.norm_eps,
            };
            norm::rmsnorm_forward(b, &s, x, &p.get(w).value, &mut y, &mut rstd)?;
            Ok(y)
        };
        let lin = |l: usize, m: usize, h: &B::Buffer<T>| -> Result<B::Buffer<T>> {
            let (d_out, d_in) = cfg.projection_shape(m);
            let mut y = b.alloc(t * d_out)?;
            gemm(b, h, self.weight(l, m), &mut y, &Gemm::nt(t, d_out, d_in))?;
            if let Some(r) = &lora {
                r.apply(b, l * 7 + m, h, &mut y)?;
            }
            Ok(y)
        };
        for (l, ids) in self.model.layers.iter().enumerate() {
            let h = norm(&x, ids.attn_norm)?;
            let mut q = lin(l, Q, &h)?;
            let mut k = lin(l, K, &h)?;
            let v = lin(l, V, &h)?;
            let hd = cfg.head_dim();
            rope::rope_forward(
                b,
                &Rope {
                    tokens: t,
                    n_heads: cfg.n_heads,
                    head_dim: hd,
                    theta: cfg.rope_theta,
                },
                &step.positions,
                &mut q,
                fault,
            )?;
            rope::rope_forward(
                b,
                &Rope {
                    tokens: t,
                    n_heads: cfg.n_kv_heads,
                    head_dim: hd,
                    theta: cfg.rope_theta,
                },
                &step.positions,
                &mut k,
                fault,
            )?;
            attention::kv_cache_write(b, cfg.kv_dim(), t, &k, &step.slots, &mut cache.k[l], fault)?;
            attention::kv_cache_write(b, cfg.kv_dim(), t, &v, &step.slots, &mut cache.v[l], fault)?;
            let mut a = b.alloc::<T>(t * d)?;
            match &step.kind {
                StepKind::Prefill {
                    seq_starts,
                    n_seqs,
                    max_len,
                } => {
                    let batch = AttentionBatch {
                        seq_starts,
                        n_seqs: *n_seqs,
                        tokens: t,
                        max_seq_len: *max_len,
                    };
                    let mut lse = b.alloc::<f32>(t * cfg.n_heads)?;
                    attention::attention_forward(
                        b,
                        &cfg.attention(),
                        &batch,
                        &q,
                        &k,
                        &v,
                        &mut a,
                        &mut lse,
                        fault,
                    )?;
                }
                StepKind::Decode {
                    kv_start,
                    kv_len,
                    max_kv_len,
                } => {
                    let ws_bytes = attention::attention_decode_workspace_bytes(
                        b,
                        &cfg.attention(),
                        t,
                        *max_kv_len,
                    );
                    let mut ws = b.alloc::<u8>(ws_bytes)?;
                    attention::attention_decode(
                        b,
                        &cfg.attention(),
                        t,
                        *max_kv_len,
                        &q,
                        &cache.k[l],
                        &cache.v[l],
                        kv_start,
                        kv_len,
                        &mut a,
                        &mut ws,
                        fault,
                    )?;
                }
            }
            let o = lin(l, O, &a)?;
            elementwise::add_assign(b, &mut x, &o)?;
            let h = norm(&x, ids.mlp_norm)?;
            let g = lin(l, GATE, &h)?;
            let u = lin(l, UP, &h)?;
            let mut s = b.alloc::<T>(t * cfg.d_ff)?;
            elementwise::swiglu_forward(b, &g, &u, &mut s)?;
            let dn = lin(l, DOWN, &s)?;
            elementwise::add_assign(b, &mut x, &dn)?;
        }
        let h = norm(&x, self.model.final_norm)?;
        let mut logits = b.alloc::<T>(t * cfg.vocab)?;
        gemm(
            b,
            &h,
            &p.get(self.model.lm_head).value,
            &mut logits,
            &Gemm::nt(t, cfg.vocab, d),
        )?;
        Ok(logits)
    }
}

impl<'m, B: Backend + 'static, T: MergeFloat> Engine<'m, B, T> {
    /// An engine whose base weights have `adapter` merged in (in place, on copies) with the merge
    /// kernel: serving it without LoRA must match serving the adapter unmerged.
    pub fn merged(b: &B, model: &'m TinyLm<B, T>, adapter: &PeftAdapter) -> Result<Self> {
        let mut e = Engine::new(model);
        for l in 0..model.cfg.n_layers {
            for m in 0..7 {
                let Some(module) = adapter.module(&module_name(l, m)) else {
                    continue;
                };
                let (d_out, d_in) = model.cfg.projection_shape(m);
                let mut w =
                    b.upload(&b.download(&model.params.get(model.layers[l].proj[m]).value)?)?;
                let a = b.upload(&module.a.to_f32())?;
                let bm = b.upload(&module.b.to_f32())?;
                let lora = Lora::packed(&a, &bm, module.rank, d_in, module.scale_f32());
                merge::merge(b, &mut w, &MergeShape::new(d_out, d_in), &lora)?;
                e.overrides[l * 7 + m] = Some(w);
            }
        }
        Ok(e)
    }
}

enum StepKind<'c, B: Backend> {
    Prefill {
        seq_starts: B::Buffer<i32>,
        n_seqs: usize,
        max_len: usize,
    },
    Decode {
        kv_start: &'c B::Buffer<i32>,
        kv_len: B::Buffer<i32>,
        max_kv_len: usize,
    },
}

/// One forward step's token metadata.
struct Step<'c, B: Backend> {
    tokens: usize,
    positions: B::Buffer<i32>,
    slots: B::Buffer<i32>,
    adapter_ids: B::Buffer<i32>,
    kind: StepKind<'c, B>,
}

/// How a step's tokens reach their adapters: an SGMV plan (prefill) or BGMV ids (decode).
struct LoraRouting<'r, 'c, B: Backend + 'static, T: Float> {
    registry: &'r AdapterRegistry<B, T>,
    step: &'c Step<'c, B>,
    plan: Option<SgmvPlan<B>>,
}

impl<'r, 'c, B: Backend + 'static, T: Float> LoraRouting<'r, 'c, B, T> {
    fn new(b: &B, registry: &'r AdapterRegistry<B, T>, step: &'c Step<'c, B>) -> Result<Self> {
        let plan = match step.kind {
            StepKind::Decode { .. } => None,
            StepKind::Prefill { .. } => {
                let n_adapters = registry.capacity();
                let mut plan = SgmvPlan::alloc(b, step.tokens, step.tokens.min(n_adapters).max(1))?;
                let ws_bytes = plan.plan_workspace_bytes(b, &step.adapter_ids, n_adapters);
                let mut ws = b.alloc::<u8>(ws_bytes)?;
                plan.plan(b, &step.adapter_ids, n_adapters, &mut ws, None)?;
                Some(plan)
            }
        };
        Ok(LoraRouting {
            registry,
            step,
            plan,
        })
    }

    /// `y += s·(h·Aᵀ)·Bᵀ` of each token's adapter in registry layer `layer`.
    fn apply(&self, b: &B, layer: usize, h: &B::Buffer<T>, y: &mut B::Buffer<T>) -> Result<()> {
        let table = self.registry.table(layer);
        let t = self.step.tokens;
        let mut u = b.alloc::<f32>(table.n_slices() * t * table.r_cap().max(1))?;
        let (d_in, d_out) = (table.d_in(), table.out_width());
        match &self.plan {
            Some(plan) => {
                let sgmv = Sgmv::new(table, plan);
                let mut ws = b.alloc::<u8>(sgmv.shrink_workspace_bytes::<T>(b, d_in))?;
                sgmv.shrink(b, h, d_in, &mut u, &mut ws, None)?;
                let mut ws =
                    b.alloc::<u8>(sgmv.expand_workspace_bytes::<T>(b, d_out, ExpandMode::Add))?;
                sgmv.expand(b, &u, y, d_out, ExpandMode::Add, &mut ws, None)
            }
            None => {
                let bgmv = Bgmv::new(b, table, &self.step.adapter_ids, t)?;
                bgmv.shrink(b, h, d_in, &mut u, None)?;
                bgmv.expand(b, &u, y, d_out, ExpandMode::Add, None)
            }
        }
    }
}
