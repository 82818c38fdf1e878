//! LoRA adapters in PEFT's format, applied per row of a batch without merging weights.
//!
//! An adapter maps module paths of the base model (`model.layers.0.self_attn.q_proj`, routed
//! experts as `model.layers.1.mlp.experts.3.gate_proj`) to low-rank factors. A batch may mix
//! adapters and the base model: [`LoraRows`] says which adapter each row of a projection's input
//! uses, and [`crate::layers::linear::Projection`] adds `scaling · (x Aᵀ) Bᵀ` to the rows of each adapter
//! (segmented, SGMV-style: one pair of small GEMMs per adapter present, never a merged weight).
//! Rows of the base model cost nothing.
//!
//! `models/lora/FORMAT.md` documents PEFT's layout, including transformers-5 fused experts
//! (`target_parameters`), which are split into per-expert factors here at load.

mod adapter;
mod rows;

pub use adapter::LoraAdapter;
pub use rows::{LoraRows, NO_ADAPTER};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{Device, DeviceLocation, Tensor};

use crate::parallel::Split;
use crate::TensorResult;

/// The low-rank factors of one adapted projection, transposed for `x · Aᵀ · Bᵀ`, with the
/// adapter's scaling folded into B.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `Aᵀ`, `[in, r]`.
    pub a_t: Tensor,
    /// `scaling · Bᵀ`, `[r, out]`.
    pub b_t: Tensor,
    /// `(a_t, b_t)` copied to each other device a rank runs on, made on its first use there.
    copies: Arc<Mutex<Vec<(DeviceLocation, Tensor, Tensor)>>>,
}

impl LoraFactors {
    /// Factors `Aᵀ` `[in, r]` and `scaling · Bᵀ` `[r, out]`.
    pub fn new(a_t: Tensor, b_t: Tensor) -> Self {
        Self {
            a_t,
            b_t,
            copies: Arc::default(),
        }
    }

    /// `(Aᵀ, s Bᵀ)` on `device`: the adapter's own, or a copy kept for a rank on another GPU.
    fn on(&self, device: &Device) -> TensorResult<(Tensor, Tensor)> {
        if self.a_t.device().same_device(device) {
            return Ok((self.a_t.clone(), self.b_t.clone()));
        }
        let mut copies = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        let at = device.location();
        if let Some((_, a, b)) = copies.iter().find(|(loc, ..)| *loc == at) {
            return Ok((a.clone(), b.clone()));
        }
        let (a, b) = (self.a_t.to_device(device)?, self.b_t.to_device(device)?);
        copies.push((at, a.clone(), b.clone()));
        Ok((a, b))
    }

    /// `(x Aᵀ) (s Bᵀ)` for `x` `[rows, in]`.
    pub fn delta(&self, x: &Tensor) -> TensorResult {
        let (a_t, b_t) = self.on(x.device())?;
        x.matmul(&a_t)?.matmul(&b_t)
    }

    /// [`LoraFactors::delta`] for a tensor-parallel rank's part of the projection: its output
    /// columns of `B` (column-parallel), or its input rows of `A` (row-parallel, a partial sum
    /// the ranks add up like the base output).
    pub fn delta_part(&self, x: &Tensor, split: Option<Split>) -> TensorResult {
        let (a_t, b_t) = self.on(x.device())?;
        match split {
            None => x.matmul(&a_t)?.matmul(&b_t),
            Some(Split::Columns { start, len }) => x
                .matmul(&a_t)?
                .matmul(&b_t.narrow(1, start, len)?.contiguous()?),
            Some(Split::Rows { start, len }) => x
                .matmul(&a_t.narrow(0, start, len)?.contiguous()?)?
                .matmul(&b_t),
        }
    }

    /// The adapter's rank on this projection.
    pub fn rank(&self) -> usize {
        self.b_t.dims()[0]
    }
}

/// The projections of a model that adapters may target: module path → `[in, out]`.
#[derive(Debug, Clone, Default)]
pub struct LoraTargets {
    modules: BTreeMap<String, [usize; 2]>,
    /// Routed-expert containers (`model.layers.1.mlp.experts`) → number of experts, for
    /// transformers-5 fused adapters (`mlp.experts.lora_A`) that cover all experts at once.
    experts: BTreeMap<String, usize>,
}

impl LoraTargets {
    /// Records a projection the model runs through [`crate::layers::linear::Projection`].
    pub fn add(&mut self, path: &str, in_dim: usize, out_dim: usize) {
        self.modules.insert(path.to_string(), [in_dim, out_dim]);
    }

    /// Records a routed-expert container of `num_experts` experts.
    pub fn add_experts(&mut self, path: &str, num_experts: usize) {
        self.experts.insert(path.to_string(), num_experts);
    }

    /// Adds `other`'s projections and expert containers (the ranks of a sharded model).
    pub fn merge(&mut self, other: &LoraTargets) {
        self.modules
            .extend(other.modules.iter().map(|(k, v)| (k.clone(), *v)));
        self.experts
            .extend(other.experts.iter().map(|(k, v)| (k.clone(), *v)));
    }

    /// `[in, out]` of the projection at `path`.
    pub fn dims(&self, path: &str) -> Option<[usize; 2]> {
        self.modules.get(path).copied()
    }

    /// Number of adaptable projections.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether the model has no adaptable projection.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}
