//! An adapter registry for serving: PEFT adapters loaded into a backend's memory and the
//! DESIGN.md §2 adapter tables of every LoRA layer kept up to date as adapters come and go.
//!
//! **Model.** A registry serves a fixed set of *layers* (one adapter table each), declared up front
//! with [`LayerSpec`]: a layer has an input width and up to `MAX_SLICES` output slices, each slice
//! named by the PEFT module it corresponds to (a plain layer is one slice; a fused qkv layer is
//! three, `q_proj`/`k_proj`/`v_proj`). Tables have a fixed number of adapter *slots*
//! (`capacity`): a token's adapter id is a slot index.
//!
//! **Ownership.** The registry owns every weight buffer (A and B per (adapter, slice), in the
//! registry's weight dtype `TW`; adapters in another dtype are converted, nearest-even) and one
//! table per layer whose entries point into them. [`AdapterRegistry::table`] lends a table for as
//! long as the registry is borrowed, so no buffer can be freed while a kernel may use the table.
//!
//! **Add / evict.** [`AdapterRegistry::add`] validates the whole adapter against the layers (every
//! module must belong to a declared slice, with matching d_in and d_out; the configured rank and
//! scale come from PEFT's `r` / `rank_pattern` / `alpha_pattern`), uploads its weights, takes the
//! lowest free slot and rebuilds (re-uploads) the small tables; on any error nothing changes.
//! [`AdapterRegistry::evict`] frees a slot: its entries become rank 0 ("not targeted": tokens
//! routed to it get no LoRA contribution), its buffers are released, and the slot is reused by a
//! later add. The ids of other adapters never change.
//!
//! **Memory accounting.** [`AdapterRegistry::weight_bytes`] (per adapter and total) and
//! [`AdapterRegistry::table_bytes`]; an optional budget ([`AdapterRegistry::with_budget`]) makes an
//! add that would exceed it fail with nothing loaded.

use std::collections::HashMap;

use crate::adapter::{AdapterTable, AdapterTableBuilder, LoraWeights, Slice, MAX_SLICES};
use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::ffi::sys;
use crate::peft::{LoraModule, PeftAdapter};

/// One LoRA layer: its input width and its output slices, each named by a PEFT module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    pub d_in: usize,
    /// (module name relative to the base model, slice of the layer's output).
    pub slices: Vec<(String, Slice)>,
}

impl LayerSpec {
    /// A layer that is one module: `module` with output width `d_out`.
    pub fn single(module: impl Into<String>, d_in: usize, d_out: usize) -> Self {
        LayerSpec {
            d_in,
            slices: vec![(
                module.into(),
                Slice {
                    n: d_out,
                    offset: 0,
                },
            )],
        }
    }
}

struct SliceWeights<B: Backend, TW: Float> {
    a: B::Buffer<TW>,
    b: B::Buffer<TW>,
    rank: usize,
    scale: f32,
}

struct Loaded<B: Backend, TW: Float> {
    name: String,
    /// Per layer, per slice: the weights (None = not targeted).
    weights: Vec<Vec<Option<SliceWeights<B, TW>>>>,
    bytes: usize,
}

/// Adapters resident in a backend's memory, with one adapter table per layer.
pub struct AdapterRegistry<B: Backend + 'static, TW: Float> {
    layers: Vec<LayerSpec>,
    capacity: usize,
    r_cap: usize,
    slots: Vec<Option<Loaded<B, TW>>>,
    by_name: HashMap<String, usize>,
    /// module name → (layer, slice)
    module_index: HashMap<String, (usize, usize)>,
    /// `'static` because the registry owns what the entries point at; only ever lent out with the
    /// registry's borrow (see [`AdapterRegistry::table`]).
    tables: Vec<AdapterTable<'static, B>>,
    budget: Option<usize>,
}

impl<B: Backend + 'static, TW: Float> AdapterRegistry<B, TW> {
    /// A registry with `capacity` slots over `layers`; `r_cap` is the largest rank it accepts (the
    /// u row width of every table, so u buffers can be allocated once).
    pub fn new(backend: &B, layers: Vec<LayerSpec>, capacity: usize, r_cap: usize) -> Result<Self> {
        if !matches!(TW::DTYPE, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::UnsupportedDtype {
                arg: "TW",
                backend: backend.name(),
                actual: TW::DTYPE,
                supported: "f32, f16, bf16".into(),
            });
        }
        if capacity == 0 || capacity > i32::MAX as usize / MAX_SLICES {
            return Err(Error::invalid(
                "capacity",
                format!("1 to {}", i32::MAX as usize / MAX_SLICES),
                capacity,
            ));
        }
        if layers.is_empty() {
            return Err(Error::invalid("layers", "at least one layer", 0));
        }
        if r_cap == 0 || r_cap > crate::adapter::MAX_RANK {
            return Err(Error::invalid(
                "r_cap",
                format!("1 to {}", crate::adapter::MAX_RANK),
                r_cap,
            ));
        }
        let mut module_index = HashMap::new();
        for (li, l) in layers.iter().enumerate() {
            if l.slices.is_empty() || l.slices.len() > MAX_SLICES {
                return Err(Error::invalid(
                    "layers",
                    format!("1 to {MAX_SLICES} slices per layer"),
                    l.slices.len(),
                ));
            }
            for (si, (m, _)) in l.slices.iter().enumerate() {
                if module_index.insert(m.clone(), (li, si)).is_some() {
                    return Err(Error::invalid("layers", "each module in one slice only", m));
                }
            }
        }
        let mut r = AdapterRegistry {
            layers,
            capacity,
            r_cap,
            slots: (0..capacity).map(|_| None).collect(),
            by_name: HashMap::new(),
            module_index,
            tables: Vec::new(),
            budget: None,
        };
        r.tables = r.build_tables(backend, None)?;
        Ok(r)
    }

    /// Limits the adapter weights' total bytes.
    pub fn with_budget(mut self, bytes: usize) -> Self {
        self.budget = Some(bytes);
        self
    }

    pub fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn r_cap(&self) -> usize {
        self.r_cap
    }
    /// Adapters loaded.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
    /// The slot (token adapter id) of a loaded adapter.
    pub fn id(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
    /// The name of the adapter in slot `id`.
    pub fn name(&self, id: usize) -> Option<&str> {
        self.slots.get(id)?.as_ref().map(|l| l.name.as_str())
    }
    /// Bytes of the adapter's weights in the backend's memory (`None`: empty slot).
    pub fn adapter_bytes(&self, id: usize) -> Option<usize> {
        self.slots.get(id)?.as_ref().map(|l| l.bytes)
    }
    /// Bytes of all adapters' weights.
    pub fn weight_bytes(&self) -> usize {
        self.slots.iter().flatten().map(|l| l.bytes).sum()
    }
    /// Bytes of the adapter tables.
    pub fn table_bytes(&self) -> usize {
        self.tables.len() * self.capacity * std::mem::size_of::<sys::LkAdapterEntry>()
    }
    /// The table of layer `layer`, for BGMV / SGMV launches; valid while the registry is borrowed.
    pub fn table(&self, layer: usize) -> &AdapterTable<'_, B> {
        &self.tables[layer]
    }

    /// Loads `adapter` under `name` into the lowest free slot and returns the slot (the id tokens
    /// use). Nothing changes on error.
    pub fn add(&mut self, backend: &B, name: &str, adapter: &PeftAdapter) -> Result<usize> {
        if self.by_name.contains_key(name) {
            return Err(Error::invalid("name", "a name not yet loaded", name));
        }
        let slot = self.slots.iter().position(Option::is_none).ok_or_else(|| {
            Error::invalid(
                "capacity",
                format!("a free slot (all {} in use)", self.capacity),
                name,
            )
        })?;
        // fan_in_fan_out only transposes the base W; A and B are stored the same way.
        let mut bytes = 0usize;
        for m in &adapter.modules {
            self.check_module(m)?;
            bytes += (m.a.len() + m.b.len()) * TW::DTYPE.size_bytes();
        }
        if let Some(budget) = self.budget {
            if self.weight_bytes() + bytes > budget {
                return Err(Error::invalid(
                    "budget",
                    format!(
                        "≤ {budget} bytes of adapter weights ({} in use)",
                        self.weight_bytes()
                    ),
                    self.weight_bytes() + bytes,
                ));
            }
        }
        let mut weights: Vec<Vec<Option<SliceWeights<B, TW>>>> = self
            .layers
            .iter()
            .map(|l| l.slices.iter().map(|_| None).collect())
            .collect();
        for m in &adapter.modules {
            let (li, si) = self.module_index[&m.name];
            weights[li][si] = Some(SliceWeights {
                a: backend.upload(&m.a.to::<TW>())?,
                b: backend.upload(&m.b.to::<TW>())?,
                rank: m.rank,
                scale: m.scale_f32(),
            });
        }
        let loaded = Loaded {
            name: name.to_string(),
            weights,
            bytes,
        };
        let tables = self.build_tables(backend, Some((slot, &loaded)))?;
        self.slots[slot] = Some(loaded);
        self.tables = tables;
        self.by_name.insert(name.to_string(), slot);
        Ok(slot)
    }

    /// Unloads the adapter `name`; its slot becomes free (tokens still routed to it get no LoRA
    /// contribution). Other ids are unchanged. Returns the freed slot.
    pub fn evict(&mut self, backend: &B, name: &str) -> Result<usize> {
        let slot = self
            .id(name)
            .ok_or_else(|| Error::invalid("name", "a loaded adapter", name))?;
        // Build the new tables while the old buffers still exist, then swap: the kernels never see
        // a table pointing at freed memory.
        let old = self.slots[slot].take();
        match self.build_tables(backend, None) {
            Ok(t) => self.tables = t,
            Err(e) => {
                self.slots[slot] = old;
                return Err(e);
            }
        }
        backend.synchronize()?;
        drop(old);
        self.by_name.remove(name);
        Ok(slot)
    }

    fn check_module(&self, m: &LoraModule) -> Result<()> {
        let Some(&(li, si)) = self.module_index.get(&m.name) else {
            return Err(Error::invalid(
                "adapter",
                "modules that are slices of the registry's layers",
                &m.name,
            ));
        };
        let layer = &self.layers[li];
        let n = layer.slices[si].1.n;
        if m.d_in != layer.d_in || m.d_out != n {
            return Err(Error::invalid(
                "adapter",
                format!("module `{}` of d_in {} × d_out {n}", m.name, layer.d_in),
                format!("d_in {} × d_out {}", m.d_in, m.d_out),
            ));
        }
        if m.rank > self.r_cap {
            return Err(Error::invalid(
                "rank",
                format!("≤ {} (the registry's r_cap)", self.r_cap),
                m.rank,
            ));
        }
        if !m.scale_f32().is_finite() {
            return Err(Error::invalid("scale", "finite in f32", m.scale));
        }
        Ok(())
    }

    /// Builds every layer's table from the slots (plus `extra` in its slot).
    fn build_tables(
        &self,
        backend: &B,
        extra: Option<(usize, &Loaded<B, TW>)>,
    ) -> Result<Vec<AdapterTable<'static, B>>> {
        let mut out = Vec::with_capacity(self.layers.len());
        for (li, layer) in self.layers.iter().enumerate() {
            let slices: Vec<Slice> = layer.slices.iter().map(|(_, s)| *s).collect();
            let mut builder = AdapterTableBuilder::<'static, B>::new(
                self.capacity,
                layer.d_in,
                &slices,
                TW::DTYPE,
            )?;
            builder.r_cap(self.r_cap)?;
            for slot in 0..self.capacity {
                let loaded = match extra {
                    Some((s, l)) if s == slot => Some(l),
                    _ => self.slots[slot].as_ref(),
                };
                let Some(loaded) = loaded else { continue };
                for (si, w) in loaded.weights[li].iter().enumerate() {
                    let Some(w) = w else { continue };
                    let lw = LoraWeights::packed(w.rank, w.scale, layer.d_in);
                    let entry = sys::LkAdapterEntry {
                        a: backend.raw_ptr(&w.a),
                        b: backend.raw_ptr(&w.b),
                        lda: lw.lda as i64,
                        ldb: lw.ldb as i64,
                        rank: lw.rank as i32,
                        scale: lw.scale,
                    };
                    // SAFETY: the entry points at buffers of this backend holding A [rank, d_in]
                    // and B [n_s, rank] of TW (uploaded from checked shapes in `add`), owned by
                    // the registry until the slot is evicted, which first replaces this table;
                    // rank ≤ r_cap was checked in `check_module`.
                    unsafe {
                        builder.set_raw(slot, si, entry);
                    }
                }
            }
            out.push(builder.build(backend)?);
        }
        Ok(out)
    }
}
