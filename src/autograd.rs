//! A minimal reverse-mode autograd over this crate's kernels, generic over the backend: enough to
//! train a Llama-style block (issue #7), small enough to read in one sitting.
//!
//! - [`Params`]: named parameters (values, gradients, AdamW moments, a `trainable` flag: frozen
//!   parameters get no gradient), the optimizer step with global-norm clipping, checkpoints.
//! - [`Tape`]: records each op's inputs and what its backward needs (rstd, lse, the LoRA `u`…);
//!   [`Tape::backward`] walks it in reverse and **accumulates** gradients (a tensor used twice gets
//!   the sum). [`Tape::no_grad`] records nothing (evaluation).
//!
//! Every activation is a 2-D `[tokens, width]` tensor (tokens of all sequences packed, as the
//! kernels take them). Each op runs one family's kernel; nothing here touches element values, so
//! the same code trains on cpu (the f64-accumulating reference, also in f64 for gradient checks),
//! emu and cuda.
//!
//! **LoRA.** [`Tape::linear`] with a [`LoraLink`] is `y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ`: the base GEMM,
//! the fused dropout shrink (`u` f32, the only thing saved besides x and the dropout seed), and a
//! GEMM `y += s·u·Bᵀ`; its backward is the base GEMM for dx (and dW when W is trainable) followed by
//! [`crate::backward::backward_dense`], which regenerates the dropout mask. The LoRA kernels keep `u`,
//! dA and dB in f32: with T = f32 they are used in place; with another T (f64 gradient checks on the
//! cpu backend) they are converted on the host.

use std::collections::HashMap;

use crate::attention::{self, Attention, AttentionBatch};
use crate::backend::Backend;
use crate::backward::{self, BackwardDense, DenseGrads, DenseInputs, GradMode};
use crate::dropout::{self, Dropout, LayerDropout};
use crate::dtype::{DType, Float};
use crate::elementwise;
use crate::embedding;
use crate::error::{Error, Result};
use crate::gemm::{gemm, Gemm};
use crate::loss;
use crate::norm::{self, RmsNorm};
use crate::optim::{self, AdamW};
use crate::rope::{self, Rope};
use crate::shrink::{shrink_dense, ShrinkDense};

/// A parameter's handle in its [`Params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// One parameter: a `[rows, cols]` matrix (a vector is `[1, n]`).
pub struct Param<B: Backend, T: Float> {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub value: B::Buffer<T>,
    /// Summed over the backward passes since the last [`Params::zero_grad`].
    pub grad: Option<B::Buffer<T>>,
    pub trainable: bool,
    /// AdamW's first and second moments (allocated at the first step).
    moments: Option<(B::Buffer<f32>, B::Buffer<f32>)>,
}

impl<B: Backend, T: Float> Param<B, T> {
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A model's parameters, in registration order.
pub struct Params<B: Backend, T: Float> {
    list: Vec<Param<B, T>>,
    by_name: HashMap<String, ParamId>,
    /// Optimizer steps taken (AdamW's bias correction).
    step: u32,
}

impl<B: Backend, T: Float> Default for Params<B, T> {
    fn default() -> Self {
        Params {
            list: Vec::new(),
            by_name: HashMap::new(),
            step: 0,
        }
    }
}

impl<B: Backend, T: Float> Params<B, T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `[rows, cols]` values under a unique name.
    pub fn add(
        &mut self,
        b: &B,
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        data: &[T],
        trainable: bool,
    ) -> Result<ParamId> {
        let name = name.into();
        if data.len() != rows * cols {
            return Err(Error::invalid(
                "data",
                format!("{} values for {name} [{rows}, {cols}]", rows * cols),
                data.len(),
            ));
        }
        if self.by_name.contains_key(&name) {
            return Err(Error::invalid("name", "a name not yet registered", name));
        }
        let id = ParamId(self.list.len());
        self.list.push(Param {
            name: name.clone(),
            rows,
            cols,
            value: b.upload(data)?,
            grad: None,
            trainable,
            moments: None,
        });
        self.by_name.insert(name, id);
        Ok(id)
    }

    /// Removes every parameter registered after the first `len` (e.g. an adapter's, to train the
    /// next one on the same base).
    pub fn truncate(&mut self, len: usize) {
        for p in self.list.drain(len.min(self.list.len())..) {
            self.by_name.remove(&p.name);
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
    pub fn get(&self, id: ParamId) -> &Param<B, T> {
        &self.list[id.0]
    }
    pub fn get_mut(&mut self, id: ParamId) -> &mut Param<B, T> {
        &mut self.list[id.0]
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Param<B, T>> {
        self.list.iter()
    }
    pub fn step(&self) -> u32 {
        self.step
    }

    /// Freezes or unfreezes every parameter whose name satisfies `pred`.
    pub fn set_trainable(&mut self, mut pred: impl FnMut(&str) -> bool, trainable: bool) {
        for p in &mut self.list {
            if pred(&p.name) {
                p.trainable = trainable;
            }
        }
    }

    /// (trainable elements, all elements), as PEFT's `print_trainable_parameters()` counts them.
    pub fn counts(&self) -> (usize, usize) {
        let all = self.list.iter().map(Param::len).sum();
        let trainable = self
            .list
            .iter()
            .filter(|p| p.trainable)
            .map(Param::len)
            .sum();
        (trainable, all)
    }

    /// Drops every gradient (the next backward writes fresh ones).
    pub fn zero_grad(&mut self) {
        for p in &mut self.list {
            p.grad = None;
        }
    }

    /// Adds `g` to a parameter's gradient (a trainable one only).
    fn accumulate(&mut self, b: &B, id: ParamId, g: B::Buffer<T>) -> Result<()> {
        let p = &mut self.list[id.0];
        if !p.trainable {
            return Ok(());
        }
        match &mut p.grad {
            None => p.grad = Some(g),
            Some(acc) => elementwise::add_assign(b, acc, &g)?,
        }
        Ok(())
    }

    /// The gradient buffer of a trainable parameter, zero-filled when absent.
    fn grad_mut(&mut self, b: &B, id: ParamId) -> Result<&mut B::Buffer<T>> {
        let p = &mut self.list[id.0];
        if p.grad.is_none() {
            p.grad = Some(b.alloc(p.rows * p.cols)?);
        }
        Ok(p.grad.as_mut().expect("just set"))
    }

    /// ‖g‖₂ over every trainable parameter's gradient (a parameter without one counts 0).
    /// Deterministic: per-parameter fixed-order sums, added on the host in registration order.
    pub fn grad_norm(&self, b: &B) -> Result<f64> {
        let mut total = 0.0f64;
        let mut out = b.alloc::<f32>(1)?;
        for p in self.list.iter().filter(|p| p.trainable) {
            let Some(g) = &p.grad else { continue };
            let mut ws = b.alloc::<u8>(optim::sum_squares_workspace_bytes(b, p.len()))?;
            optim::sum_squares(b, g, &mut out, &mut ws)?;
            total += b.download(&out)?[0] as f64;
        }
        Ok(total.sqrt())
    }

    /// One AdamW step on every trainable parameter that has a gradient, after scaling the
    /// gradients so that their global norm is at most `max_grad_norm` (if given). Returns the norm
    /// before clipping.
    pub fn adamw_step(&mut self, b: &B, cfg: &AdamW, max_grad_norm: Option<f64>) -> Result<f64> {
        let norm = self.grad_norm(b)?;
        if !norm.is_finite() {
            return Err(Error::invalid(
                "gradients",
                "finite values (the step was not taken)",
                norm,
            ));
        }
        let clip = match max_grad_norm {
            Some(max) if norm > max => Some((max / (norm + 1e-6)) as f32),
            _ => None,
        };
        self.step += 1;
        for p in self.list.iter_mut().filter(|p| p.trainable) {
            let Some(g) = &mut p.grad else { continue };
            if let Some(c) = clip {
                elementwise::scale(b, g, c)?;
            }
            if p.moments.is_none() {
                p.moments = Some((b.alloc(p.rows * p.cols)?, b.alloc(p.rows * p.cols)?));
            }
            let (m, v) = p.moments.as_mut().expect("just set");
            optim::adamw_step(b, cfg, self.step, &mut p.value, g, m, v)?;
        }
        Ok(norm)
    }

    /// Everything training state consists of: values, moments and the step, as named host tensors
    /// of f64 (exact for every element type), for a checkpoint that resumes bit for bit.
    #[allow(clippy::type_complexity)]
    pub fn state(&self, b: &B) -> Result<(u32, Vec<(String, Vec<f64>)>)> {
        let mut out = Vec::new();
        for p in &self.list {
            out.push((p.name.clone(), to_f64(&b.download(&p.value)?)));
            if let Some((m, v)) = &p.moments {
                out.push((format!("{}.exp_avg", p.name), to_f64(&b.download(m)?)));
                out.push((format!("{}.exp_avg_sq", p.name), to_f64(&b.download(v)?)));
            }
        }
        Ok((self.step, out))
    }

    /// Restores [`Params::state`] (names must match the registered parameters).
    pub fn load_state(&mut self, b: &B, step: u32, state: &[(String, Vec<f64>)]) -> Result<()> {
        let map: HashMap<&str, &Vec<f64>> = state.iter().map(|(k, v)| (k.as_str(), v)).collect();
        for p in &mut self.list {
            let n = p.rows * p.cols;
            let get = |key: String| -> Result<&Vec<f64>> {
                let v = map
                    .get(key.as_str())
                    .ok_or_else(|| Error::invalid("checkpoint", "every parameter", key.clone()))?;
                if v.len() != n {
                    return Err(Error::invalid("checkpoint", format!("{n} values"), key));
                }
                Ok(v)
            };
            let value: Vec<T> = get(p.name.clone())?
                .iter()
                .map(|&x| T::from_f64(x))
                .collect();
            let moments = match (
                map.get(format!("{}.exp_avg", p.name).as_str()),
                map.get(format!("{}.exp_avg_sq", p.name).as_str()),
            ) {
                (Some(_), Some(_)) => {
                    let m: Vec<f32> = get(format!("{}.exp_avg", p.name))?
                        .iter()
                        .map(|&x| x as f32)
                        .collect();
                    let v: Vec<f32> = get(format!("{}.exp_avg_sq", p.name))?
                        .iter()
                        .map(|&x| x as f32)
                        .collect();
                    Some((b.upload(&m)?, b.upload(&v)?))
                }
                _ => None,
            };
            b.write(&mut p.value, &value)?;
            p.moments = moments;
            p.grad = None;
        }
        self.step = step;
        Ok(())
    }
}

fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// An activation on a tape: `[rows, cols]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    id: usize,
    pub rows: usize,
    pub cols: usize,
}

/// LoRA on a linear layer: A `[rank, d_in]`, B `[d_out, rank]`, scale s and its dropout stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraLink {
    pub a: ParamId,
    pub b: ParamId,
    pub rank: usize,
    pub scale: f32,
    pub dropout: Dropout,
}

/// What each op's backward needs.
enum Op<B: Backend> {
    Embedding {
        table: ParamId,
        vocab: usize,
        ids: B::Buffer<i32>,
    },
    RmsNorm {
        x: Tensor,
        w: ParamId,
        rstd: B::Buffer<f32>,
        eps: f32,
    },
    Linear {
        x: Tensor,
        w: ParamId,
        lora: Option<(LoraLink, B::Buffer<f32>)>,
    },
    Rope {
        x: Tensor,
        shape: Rope,
    },
    Attention {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        shape: Attention,
        lse: B::Buffer<f32>,
    },
    SwiGlu {
        gate: Tensor,
        up: Tensor,
    },
    Add {
        a: Tensor,
        b: Tensor,
    },
}

struct Node<B: Backend, T: Float> {
    value: B::Buffer<T>,
    /// None: a constant (nothing upstream needs a gradient).
    op: Option<Op<B>>,
}

/// The packed batch the tape's sequence ops see: sequence lengths → token positions and starts.
struct Batch<B: Backend> {
    lens: Vec<usize>,
    positions: B::Buffer<i32>,
    seq_starts: B::Buffer<i32>,
    tokens: usize,
    max_len: usize,
}

/// A recorded forward pass.
pub struct Tape<'a, B: Backend, T: Float> {
    b: &'a B,
    nodes: Vec<Node<B, T>>,
    record: bool,
    batch: Option<Batch<B>>,
    /// The device fault word the kernels OR bad indices into (checked by [`Tape::check_faults`]).
    fault: B::Buffer<u32>,
    /// The loss node: (logits, targets, lse, rows counted in the mean).
    #[allow(clippy::type_complexity)]
    loss: Option<(Tensor, B::Buffer<i32>, B::Buffer<f32>, usize)>,
}

impl<'a, B: Backend, T: Float> Tape<'a, B, T> {
    /// A tape that records for [`Tape::backward`].
    pub fn new(b: &'a B) -> Result<Self> {
        Self::with_recording(b, true)
    }

    /// Evaluation: ops compute values and save nothing; backward is refused.
    pub fn no_grad(b: &'a B) -> Result<Self> {
        Self::with_recording(b, false)
    }

    fn with_recording(b: &'a B, record: bool) -> Result<Self> {
        Ok(Tape {
            b,
            nodes: Vec::new(),
            record,
            batch: None,
            fault: b.alloc(1)?,
            loss: None,
        })
    }

    pub fn backend(&self) -> &'a B {
        self.b
    }

    /// Declares the packed sequences (lengths, in order) the following sequence ops (RoPE,
    /// attention) see; positions restart at 0 in each sequence.
    pub fn set_batch(&mut self, lens: &[usize]) -> Result<()> {
        let tokens: usize = lens.iter().sum();
        if tokens > i32::MAX as usize {
            return Err(Error::invalid("lens", "≤ i32::MAX tokens in all", tokens));
        }
        let positions: Vec<i32> = lens.iter().flat_map(|&l| 0..l as i32).collect();
        let mut starts = vec![0i32];
        for &l in lens {
            starts.push(starts.last().unwrap() + l as i32);
        }
        self.batch = Some(Batch {
            lens: lens.to_vec(),
            positions: self.b.upload(&positions)?,
            seq_starts: self.b.upload(&starts)?,
            tokens,
            max_len: lens.iter().copied().max().unwrap_or(0),
        });
        Ok(())
    }

    /// The value of a tensor.
    pub fn value(&self, t: Tensor) -> &B::Buffer<T> {
        &self.nodes[t.id].value
    }

    /// Downloads a tensor.
    pub fn to_host(&self, t: Tensor) -> Result<Vec<T>> {
        self.b.download(self.value(t))
    }

    fn push(&mut self, rows: usize, cols: usize, value: B::Buffer<T>, op: Op<B>) -> Tensor {
        let id = self.nodes.len();
        self.nodes.push(Node {
            value,
            op: self.record.then_some(op),
        });
        Tensor { id, rows, cols }
    }

    fn needs_grad(&self, t: Tensor) -> bool {
        self.nodes[t.id].op.is_some()
    }

    /// A constant input (no gradient flows into it).
    pub fn constant(&mut self, rows: usize, cols: usize, data: &[T]) -> Result<Tensor> {
        if data.len() != rows * cols {
            return Err(Error::invalid(
                "data",
                format!("{} values", rows * cols),
                data.len(),
            ));
        }
        let id = self.nodes.len();
        self.nodes.push(Node {
            value: self.b.upload(data)?,
            op: None,
        });
        Ok(Tensor { id, rows, cols })
    }

    /// `out[t] = table[ids[t]]`.
    pub fn embedding(
        &mut self,
        params: &Params<B, T>,
        table: ParamId,
        ids: &[i32],
    ) -> Result<Tensor> {
        let p = params.get(table);
        let (vocab, dim, tokens) = (p.rows, p.cols, ids.len());
        let ids_buf = self.b.upload(ids)?;
        let mut out = self.b.alloc(tokens * dim)?;
        embedding::embedding_forward(
            self.b,
            vocab,
            dim,
            tokens,
            &ids_buf,
            &p.value,
            &mut out,
            &mut self.fault,
        )?;
        let recorded = p.trainable;
        let t = self.push(
            tokens,
            dim,
            out,
            Op::Embedding {
                table,
                vocab,
                ids: ids_buf,
            },
        );
        if !recorded {
            self.nodes[t.id].op = None;
        }
        Ok(t)
    }

    /// RMSNorm over each row with weight `w` (`[1, cols]`).
    pub fn rmsnorm(
        &mut self,
        params: &Params<B, T>,
        x: Tensor,
        w: ParamId,
        eps: f32,
    ) -> Result<Tensor> {
        let s = RmsNorm {
            rows: x.rows,
            dim: x.cols,
            eps,
        };
        let mut y = self.b.alloc(x.rows * x.cols)?;
        let mut rstd = self.b.alloc(x.rows)?;
        norm::rmsnorm_forward(
            self.b,
            &s,
            self.value(x),
            &params.get(w).value,
            &mut y,
            &mut rstd,
        )?;
        let grad = self.needs_grad(x) || params.get(w).trainable;
        let t = self.push(x.rows, x.cols, y, Op::RmsNorm { x, w, rstd, eps });
        if !grad {
            self.nodes[t.id].op = None;
        }
        Ok(t)
    }

    /// `y = x·Wᵀ` (W `[d_out, d_in]`), plus `s·(drop(x)·Aᵀ)·Bᵀ` with LoRA.
    pub fn linear(
        &mut self,
        params: &Params<B, T>,
        x: Tensor,
        w: ParamId,
        lora: Option<LoraLink>,
    ) -> Result<Tensor> {
        let wp = params.get(w);
        let (d_out, d_in) = (wp.rows, wp.cols);
        if x.cols != d_in {
            return Err(Error::invalid(
                "x",
                format!("{d_in} columns ({}'s d_in)", wp.name),
                x.cols,
            ));
        }
        let tokens = x.rows;
        let mut y = self.b.alloc(tokens * d_out)?;
        gemm(
            self.b,
            self.value(x),
            &wp.value,
            &mut y,
            &Gemm::nt(tokens, d_out, d_in),
        )?;
        let mut saved = None;
        if let Some(l) = lora {
            let (a, bm) = (&params.get(l.a).value, &params.get(l.b).value);
            let mut u = self.b.alloc::<f32>(tokens * l.rank)?;
            let shape = ShrinkDense::new(tokens, d_in, l.rank);
            if l.dropout.p > 0.0 && self.record {
                dropout::shrink_dense_dropout(
                    self.b,
                    &l.dropout,
                    self.value(x),
                    a,
                    &mut u,
                    &shape,
                    0,
                )?;
            } else {
                shrink_dense(self.b, self.value(x), a, &mut u, &shape)?;
            }
            let converted;
            let u_t = match f32_as::<B, T>(&u) {
                Some(u_t) => u_t,
                None => {
                    converted = convert_on_host::<B, f32, T>(self.b, &u)?;
                    &converted
                }
            };
            gemm(
                self.b,
                u_t,
                bm,
                &mut y,
                &Gemm::nt(tokens, d_out, l.rank).alpha(l.scale).beta(1.0),
            )?;
            saved = Some((l, u));
        }
        let trainable = wp.trainable
            || lora.is_some_and(|l| params.get(l.a).trainable || params.get(l.b).trainable);
        let grad = self.needs_grad(x) || trainable;
        let t = self.push(tokens, d_out, y, Op::Linear { x, w, lora: saved });
        if !grad {
            self.nodes[t.id].op = None;
        }
        Ok(t)
    }

    /// Rotary embedding (HF rotate_half) of `x` viewed as `[tokens, n_heads, head_dim]`, positions
    /// from the batch.
    pub fn rope(&mut self, x: Tensor, n_heads: usize, theta: f32) -> Result<Tensor> {
        if n_heads == 0 || x.cols % n_heads != 0 {
            return Err(Error::invalid(
                "n_heads",
                format!("a divisor of {}", x.cols),
                n_heads,
            ));
        }
        let shape = Rope {
            tokens: x.rows,
            n_heads,
            head_dim: x.cols / n_heads,
            theta,
        };
        let mut y = self.copy(x)?;
        let batch = batch_of(self.batch.as_ref(), x.rows)?;
        rope::rope_forward(self.b, &shape, &batch.positions, &mut y, &mut self.fault)?;
        let grad = self.needs_grad(x);
        let t = self.push(x.rows, x.cols, y, Op::Rope { x, shape });
        if !grad {
            self.nodes[t.id].op = None;
        }
        Ok(t)
    }

    fn copy(&self, x: Tensor) -> Result<B::Buffer<T>> {
        let mut y = self.b.alloc(x.rows * x.cols)?;
        elementwise::add_assign(self.b, &mut y, self.value(x))?;
        Ok(y)
    }

    /// Causal attention with grouped KV heads within each sequence of the batch.
    pub fn attention(
        &mut self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        shape: Attention,
    ) -> Result<Tensor> {
        let tokens = q.rows;
        let mut out = self.b.alloc(tokens * q.cols)?;
        let mut lse = self.b.alloc(tokens * shape.n_heads)?;
        let batch = batch_of(self.batch.as_ref(), tokens)?;
        let ab = AttentionBatch {
            seq_starts: &batch.seq_starts,
            n_seqs: batch.lens.len(),
            tokens,
            max_seq_len: batch.max_len,
        };
        attention::attention_forward(
            self.b,
            &shape,
            &ab,
            &self.nodes[q.id].value,
            &self.nodes[k.id].value,
            &self.nodes[v.id].value,
            &mut out,
            &mut lse,
            &mut self.fault,
        )?;
        let grad = self.needs_grad(q) || self.needs_grad(k) || self.needs_grad(v);
        let t = self.push(
            tokens,
            q.cols,
            out,
            Op::Attention {
                q,
                k,
                v,
                shape,
                lse,
            },
        );
        if !grad {
            self.nodes[t.id].op = None;
        }
        Ok(t)
    }

    /// `silu(gate) · up`.
    pub fn swiglu(&mut self, gate: Tensor, up: Tensor) -> Result<Tensor> {
        let mut out = self.b.alloc(gate.rows * gate.cols)?;
        elementwise::swiglu_forward(self.b, self.value(gate), self.value(up), &mut out)?;
        let grad = self.needs_grad(gate) || self.needs_grad(up);
        let t = self.push(gate.rows, gate.cols, out, Op::SwiGlu { gate, up });
        if !grad {
            self.nodes[t.id].op = None;
        }
        Ok(t)
    }

    /// `a + b` (the residual connection).
    pub fn add(&mut self, a: Tensor, b: Tensor) -> Result<Tensor> {
        if (a.rows, a.cols) != (b.rows, b.cols) {
            return Err(Error::invalid(
                "b",
                format!("[{}, {}] (a's shape)", a.rows, a.cols),
                format!("[{}, {}]", b.rows, b.cols),
            ));
        }
        let mut out = self.b.alloc(a.rows * a.cols)?;
        elementwise::add(self.b, self.value(a), self.value(b), &mut out)?;
        let grad = self.needs_grad(a) || self.needs_grad(b);
        let t = self.push(a.rows, a.cols, out, Op::Add { a, b });
        if !grad {
            self.nodes[t.id].op = None;
        }
        Ok(t)
    }

    /// Mean softmax cross-entropy of `logits` rows against `targets` (−1 = not counted); the loss
    /// [`Tape::backward`] starts from. Returns the mean over the counted rows (f64 sum on the host
    /// of the per-row f32 losses, in row order).
    pub fn cross_entropy(&mut self, logits: Tensor, targets: &[i32]) -> Result<f64> {
        if targets.len() != logits.rows {
            return Err(Error::invalid(
                "targets",
                format!("{} entries (one per row)", logits.rows),
                targets.len(),
            ));
        }
        let t_buf = self.b.upload(targets)?;
        let mut losses = self.b.alloc::<f32>(logits.rows)?;
        let mut lse = self.b.alloc::<f32>(logits.rows)?;
        loss::cross_entropy_forward(
            self.b,
            logits.rows,
            logits.cols,
            &self.nodes[logits.id].value,
            &t_buf,
            &mut losses,
            &mut lse,
            &mut self.fault,
        )?;
        self.check_faults()?;
        let counted = targets.iter().filter(|&&t| t >= 0).count();
        let sum: f64 = self.b.download(&losses)?.iter().map(|&l| l as f64).sum();
        if self.record {
            self.loss = Some((logits, t_buf, lse, counted));
        }
        Ok(if counted == 0 {
            0.0
        } else {
            sum / counted as f64
        })
    }

    /// Fails if a kernel reported an out-of-range device index since the tape was made.
    pub fn check_faults(&self) -> Result<()> {
        check_fault_word(self.b, &self.fault)
    }

    /// Back-propagates the mean cross-entropy into the trainable parameters' gradients (added to
    /// what they hold). Consumes the tape.
    pub fn backward(self, params: &mut Params<B, T>) -> Result<()> {
        let Tape {
            b,
            nodes,
            batch,
            mut fault,
            loss,
            record,
        } = self;
        let Some((logits, targets, lse, counted)) = loss else {
            return Err(Error::invalid(
                "tape",
                "a recorded cross_entropy loss",
                if record { "no loss" } else { "a no_grad tape" },
            ));
        };
        let cx = Backward {
            b,
            nodes: &nodes,
            batch: batch.as_ref(),
        };
        let mut grads: Vec<Option<B::Buffer<T>>> = (0..nodes.len()).map(|_| None).collect();
        let mut d_logits = b.alloc(logits.rows * logits.cols)?;
        let d_loss = if counted == 0 {
            0.0
        } else {
            1.0 / counted as f32
        };
        loss::cross_entropy_backward(
            b,
            logits.rows,
            logits.cols,
            cx.value(logits),
            &targets,
            &lse,
            d_loss,
            &mut d_logits,
        )?;
        grads[logits.id] = Some(d_logits);
        for id in (0..nodes.len()).rev() {
            let Some(g) = grads[id].take() else { continue };
            let Some(op) = &nodes[id].op else { continue };
            cx.op(id, op, g, &mut grads, params, &mut fault)?;
        }
        check_fault_word(b, &fault)
    }
}

fn check_fault_word<B: Backend>(b: &B, fault: &B::Buffer<u32>) -> Result<()> {
    let f = b.download(fault)?[0];
    if f != 0 {
        return Err(Error::invalid(
            "indices",
            "token ids, targets and positions in range",
            format!("fault word {f:#x}"),
        ));
    }
    Ok(())
}

fn batch_of<B: Backend>(batch: Option<&Batch<B>>, rows: usize) -> Result<&Batch<B>> {
    let batch = batch
        .ok_or_else(|| Error::invalid("batch", "set_batch() before sequence ops", "no batch"))?;
    if batch.tokens != rows {
        return Err(Error::invalid(
            "x",
            format!("{} rows (the batch's tokens)", batch.tokens),
            rows,
        ));
    }
    Ok(batch)
}

/// `u` (f32) as a `T` buffer: the same buffer when T is f32.
fn f32_as<B: Backend, T: Float>(u: &B::Buffer<f32>) -> Option<&B::Buffer<T>> {
    // SAFETY: `Float` is sealed and f32 is its only type with DType::F32, so T is f32 and both
    // references have the same type.
    (T::DTYPE == DType::F32)
        .then(|| unsafe { &*(u as *const B::Buffer<f32>).cast::<B::Buffer<T>>() })
}

/// A `T` buffer as f32: the same buffer when T is f32.
fn as_f32_mut<B: Backend, T: Float>(x: &mut B::Buffer<T>) -> Option<&mut B::Buffer<f32>> {
    // SAFETY: as in `f32_as`.
    (T::DTYPE == DType::F32)
        .then(|| unsafe { &mut *(x as *mut B::Buffer<T>).cast::<B::Buffer<f32>>() })
}

/// Converts between element types through host memory (cpu and emu only; used when T is not f32,
/// e.g. f64 gradient checks on the cpu backend).
fn convert_on_host<B: Backend, S: Float, D: Float>(
    b: &B,
    x: &B::Buffer<S>,
) -> Result<B::Buffer<D>> {
    let host = b.host_slice(x).ok_or(Error::UnsupportedDtype {
        arg: "T",
        backend: b.name(),
        actual: D::DTYPE,
        supported: "f32 (LoRA layers keep u, dA and dB in f32)".into(),
    })?;
    let v: Vec<D> = host.iter().map(|x| D::from_f64(x.to_f64())).collect();
    b.upload(&v)
}

/// What the backward pass reads: the recorded nodes and the batch.
struct Backward<'t, B: Backend, T: Float> {
    b: &'t B,
    nodes: &'t [Node<B, T>],
    batch: Option<&'t Batch<B>>,
}

impl<B: Backend, T: Float> Backward<'_, B, T> {
    fn value(&self, t: Tensor) -> &B::Buffer<T> {
        &self.nodes[t.id].value
    }

    fn needs_grad(&self, t: Tensor) -> bool {
        self.nodes[t.id].op.is_some()
    }

    /// Adds `g` to tensor `t`'s gradient if anything upstream of `t` needs one.
    fn send(&self, grads: &mut [Option<B::Buffer<T>>], t: Tensor, g: B::Buffer<T>) -> Result<()> {
        if !self.needs_grad(t) {
            return Ok(());
        }
        match &mut grads[t.id] {
            None => grads[t.id] = Some(g),
            Some(acc) => elementwise::add_assign(self.b, acc, &g)?,
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn op(
        &self,
        id: usize,
        op: &Op<B>,
        g: B::Buffer<T>,
        grads: &mut [Option<B::Buffer<T>>],
        params: &mut Params<B, T>,
        fault: &mut B::Buffer<u32>,
    ) -> Result<()> {
        let b = self.b;
        match op {
            Op::Embedding { table, vocab, ids } => {
                let dim = params.get(*table).cols;
                let tokens = b.len(ids);
                let mut d_table = b.alloc(vocab * dim)?;
                let ws_bytes =
                    embedding::embedding_backward_workspace_bytes(b, *vocab, dim, tokens);
                let mut ws = b.alloc::<u8>(ws_bytes)?;
                embedding::embedding_backward(
                    b,
                    *vocab,
                    dim,
                    tokens,
                    ids,
                    &g,
                    &mut d_table,
                    &mut ws,
                    fault,
                )?;
                params.accumulate(b, *table, d_table)?;
            }
            Op::RmsNorm { x, w, rstd, eps } => {
                let s = RmsNorm {
                    rows: x.rows,
                    dim: x.cols,
                    eps: *eps,
                };
                let mut dx = b.alloc(x.rows * x.cols)?;
                let mut dw = b.alloc(x.cols)?;
                let mut ws = b.alloc::<u8>(norm::rmsnorm_backward_workspace_bytes(b, &s))?;
                norm::rmsnorm_backward(
                    b,
                    &s,
                    self.value(*x),
                    &params.get(*w).value,
                    rstd,
                    &g,
                    &mut dx,
                    &mut dw,
                    &mut ws,
                )?;
                params.accumulate(b, *w, dw)?;
                self.send(grads, *x, dx)?;
            }
            Op::Linear { x, w, lora } => {
                let (d_out, d_in, tokens) = (params.get(*w).rows, params.get(*w).cols, x.rows);
                let mut dx = if self.needs_grad(*x) {
                    let mut dx = b.alloc(tokens * d_in)?;
                    let w_val = &params.get(*w).value;
                    gemm(b, &g, w_val, &mut dx, &Gemm::nn(tokens, d_in, d_out))?;
                    Some(dx)
                } else {
                    None
                };
                if params.get(*w).trainable {
                    let beta = if params.get(*w).grad.is_some() {
                        1.0
                    } else {
                        0.0
                    };
                    let dw = params.grad_mut(b, *w)?;
                    gemm(
                        b,
                        &g,
                        self.value(*x),
                        dw,
                        &Gemm::tn(d_out, d_in, tokens).beta(beta),
                    )?;
                }
                if let Some((l, u)) = lora {
                    self.lora(params, *x, l, u, &g, dx.as_mut(), (tokens, d_in, d_out))?;
                }
                if let Some(dx) = dx {
                    self.send(grads, *x, dx)?;
                }
            }
            Op::Rope { x, shape } => {
                let mut dx = g;
                let batch = batch_of(self.batch, x.rows)?;
                rope::rope_backward(b, shape, &batch.positions, &mut dx, fault)?;
                self.send(grads, *x, dx)?;
            }
            Op::Attention {
                q,
                k,
                v,
                shape,
                lse,
            } => {
                let batch = batch_of(self.batch, q.rows)?;
                let ab = AttentionBatch {
                    seq_starts: &batch.seq_starts,
                    n_seqs: batch.lens.len(),
                    tokens: q.rows,
                    max_seq_len: batch.max_len,
                };
                let mut dq = b.alloc(q.rows * q.cols)?;
                let mut dk = b.alloc(k.rows * k.cols)?;
                let mut dv = b.alloc(v.rows * v.cols)?;
                let ws_bytes = attention::attention_backward_workspace_bytes(b, shape, &ab);
                let mut ws = b.alloc::<u8>(ws_bytes)?;
                attention::attention_backward(
                    b,
                    shape,
                    &ab,
                    self.value(*q),
                    self.value(*k),
                    self.value(*v),
                    &self.nodes[id].value,
                    lse,
                    &g,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    &mut ws,
                    fault,
                )?;
                self.send(grads, *q, dq)?;
                self.send(grads, *k, dk)?;
                self.send(grads, *v, dv)?;
            }
            Op::SwiGlu { gate, up } => {
                let n = gate.rows * gate.cols;
                let (mut dg, mut du) = (b.alloc(n)?, b.alloc(n)?);
                elementwise::swiglu_backward(
                    b,
                    self.value(*gate),
                    self.value(*up),
                    &g,
                    &mut dg,
                    &mut du,
                )?;
                self.send(grads, *gate, dg)?;
                self.send(grads, *up, du)?;
            }
            Op::Add { a, b: rhs } => {
                if self.needs_grad(*a) {
                    let mut ga = b.alloc(a.rows * a.cols)?;
                    elementwise::add_assign(b, &mut ga, &g)?;
                    self.send(grads, *a, ga)?;
                }
                self.send(grads, *rhs, g)?;
            }
        }
        Ok(())
    }

    /// The LoRA part of a linear layer's backward: dA, dB (added to the parameters' gradients)
    /// and `dx += m ⊙ (du·A)·keep_scale` (the mask regenerated), after the base GEMM wrote dx.
    #[allow(clippy::too_many_arguments)]
    fn lora(
        &self,
        params: &mut Params<B, T>,
        x: Tensor,
        l: &LoraLink,
        u: &B::Buffer<f32>,
        g: &B::Buffer<T>,
        dx: Option<&mut B::Buffer<T>>,
        (tokens, d_in, d_out): (usize, usize, usize),
    ) -> Result<()> {
        let b = self.b;
        let mut shape = BackwardDense::new(tokens, d_in, d_out, l.rank, l.scale);
        if l.dropout.p > 0.0 {
            let mut offsets = [0u64; crate::adapter::MAX_SLICES];
            offsets[0] = l.dropout.offset;
            shape.dropout = LayerDropout {
                p: l.dropout.p,
                seed: l.dropout.seed,
                offsets,
            };
        }
        let mut ws = b.alloc::<u8>(backward::backward_dense_workspace_bytes(b, &shape))?;
        let mut du = b.alloc::<f32>(tokens * l.rank)?;
        // The gradients are taken out of `params` so that A, B and their gradients can be
        // borrowed together.
        let mut ga = params.get_mut(l.a).grad.take();
        let mut gb = params.get_mut(l.b).grad.take();
        let (na, nb) = (params.get(l.a).len(), params.get(l.b).len());
        let in_place = T::DTYPE == DType::F32;
        let (mut da32, mut db32) = if in_place {
            shape.mode = GradMode::Accumulate;
            if ga.is_none() {
                ga = Some(b.alloc(na)?);
            }
            if gb.is_none() {
                gb = Some(b.alloc(nb)?);
            }
            (None, None)
        } else {
            (Some(b.alloc::<f32>(na)?), Some(b.alloc::<f32>(nb)?))
        };
        let result = {
            let da = match &mut da32 {
                Some(d) => d,
                None => as_f32_mut::<B, T>(ga.as_mut().expect("allocated")).expect("T is f32"),
            };
            let db = match &mut db32 {
                Some(d) => d,
                None => as_f32_mut::<B, T>(gb.as_mut().expect("allocated")).expect("T is f32"),
            };
            backward::backward_dense(
                b,
                &shape,
                DenseInputs {
                    x: self.value(x),
                    g,
                    u,
                    a: &params.get(l.a).value,
                    b: &params.get(l.b).value,
                },
                DenseGrads {
                    da,
                    db,
                    du: &mut du,
                    dx,
                },
                &mut ws,
            )
        };
        params.get_mut(l.a).grad = ga;
        params.get_mut(l.b).grad = gb;
        result?;
        if let (Some(da), Some(db)) = (da32, db32) {
            params.accumulate(b, l.a, convert_on_host::<B, f32, T>(b, &da)?)?;
            params.accumulate(b, l.b, convert_on_host::<B, f32, T>(b, &db)?)?;
        }
        Ok(())
    }
}
