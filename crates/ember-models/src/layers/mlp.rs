//! The SwiGLU MLP (`down(silu(gate(x)) * up(x))`), used dense and as each MoE expert.

use candle_core::{DType, Tensor};
use ember_core::{EmberError, Result};

use crate::backends::LayerKernels;
use crate::device::calls::{Kernel, KernelCalls};
use crate::layers::kernel_ops;
use crate::linear::{linear_from_weight, projection_from_weight, Projection};
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::lora::{LoraRows, LoraTargets};
use crate::parallel::Split;
use crate::TensorResult;
use std::sync::Arc;

/// `gate_proj`, `up_proj`, `down_proj` of one MLP.
#[derive(Clone)]
pub struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
    /// Under ember's layer kernels, the gate and up weights as one `[2 · inter, hidden]` tensor
    /// (gate rows first) that `gate_proj` and `up_proj` are views of: one GEMM, then SiLU-and-mul.
    gate_up: Option<Tensor>,
    /// Where the fused path counts its SiLU-and-mul calls.
    calls: Arc<KernelCalls>,
}

impl Mlp {
    /// Loads the three projections under `weights` (`hidden → intermediate → hidden`).
    pub fn load(
        weights: &Weights,
        ctx: &LoadContext,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        Self::load_split(weights, ctx, hidden, intermediate, None)
    }

    /// Loads one rank's share `(start, len)` of the intermediate channels (gate/up by columns,
    /// down by rows: the output is a partial sum), or the whole MLP (`None`).
    pub fn load_split(
        weights: &Weights,
        ctx: &LoadContext,
        hidden: usize,
        intermediate: usize,
        channels: Option<(usize, usize)>,
    ) -> Result<Self> {
        let cols = channels.map(|(start, len)| Split::Columns { start, len });
        let rows = channels.map(|(start, len)| Split::Rows { start, len });
        let proj = |name: &str, in_dim: usize, out_dim: usize, split: Option<Split>| {
            Projection::load_split(&weights.pp(name), ctx, in_dim, out_dim, false, split)
        };
        Self {
            gate_proj: proj("gate_proj", hidden, intermediate, cols)?,
            up_proj: proj("up_proj", hidden, intermediate, cols)?,
            down_proj: proj("down_proj", intermediate, hidden, rows)?,
            gate_up: None,
            calls: ctx.kernel_calls.clone(),
        }
        .fuse_gate_up(ctx)
    }

    /// Loads a dense MLP the way the rank of `weights` holds it: its share of the intermediate
    /// channels on a sharded model (partial output), else whole.
    pub fn load_dense(
        weights: &Weights,
        ctx: &LoadContext,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let channels = ctx
            .rank()
            .map(|r| r.even_share(intermediate, "intermediate_size"))
            .transpose()?;
        Self::load_split(weights, ctx, hidden, intermediate, channels)
    }

    /// Builds expert `index` of `experts` (the fused tensors' owner, whose prefix is the module
    /// path adapters name the experts under) from slices of fused tensors (`[out, in]` each) of
    /// an expert of `intermediate` channels, of which a tensor-parallel rank holds `channels`.
    /// `gate_up`, when given, is the `[gate; up]` tensor `gate` and `up` are views of.
    pub fn from_weights(
        experts: &Weights,
        ctx: &LoadContext,
        index: usize,
        (gate, up, down): (Tensor, Tensor, Tensor),
        intermediate: usize,
        channels: Option<(usize, usize)>,
        gate_up: Option<Tensor>,
    ) -> Result<Self> {
        let hidden = gate.dims2().map(|d| d.1).unwrap_or_default();
        let path = format!("{}.{index}", experts.prefix());
        let cols = channels.map(|(start, len)| Split::Columns { start, len });
        let rows = channels.map(|(start, len)| Split::Rows { start, len });
        let proj = |name: &str, w: Tensor, i: usize, o: usize, split| -> Result<Projection> {
            let layer = projection_from_weight(&experts.pp(index).pp(name), ctx, w, None)?;
            Ok(Projection::new(layer, &format!("{path}.{name}"), i, o).with_split(split))
        };
        let mlp = Self {
            gate_proj: proj("gate_proj", gate, hidden, intermediate, cols)?,
            up_proj: proj("up_proj", up, hidden, intermediate, cols)?,
            down_proj: proj("down_proj", down, intermediate, hidden, rows)?,
            gate_up: None,
            calls: ctx.kernel_calls.clone(),
        };
        match gate_up {
            Some(gate_up) if ctx.backends.layer_kernels == LayerKernels::Ember => Ok(Self {
                gate_up: Some(gate_up),
                ..mlp
            }),
            Some(_) => Ok(mlp),
            None => mlp.fuse_gate_up(ctx),
        }
    }

    /// Under ember's layer kernels, holds the gate and up weights as one tensor (and the two
    /// projections as views of it) when both are dense f32/bf16 weights of one dtype; else as is.
    fn fuse_gate_up(self, ctx: &LoadContext) -> Result<Self> {
        if ctx.backends.layer_kernels != LayerKernels::Ember {
            return Ok(self);
        }
        let (Some(gate), Some(up)) = (self.gate_proj.dense_weight(), self.up_proj.dense_weight())
        else {
            return Ok(self);
        };
        if gate.dtype() != up.dtype() || !matches!(gate.dtype(), DType::F32 | DType::BF16) {
            return Ok(self);
        }
        let fuse = || -> TensorResult<(Tensor, Tensor, Tensor)> {
            let inter = gate.dim(0)?;
            let gate_up = Tensor::cat(&[&gate, &up], 0)?;
            Ok((
                gate_up.narrow(0, 0, inter)?,
                gate_up.narrow(0, inter, inter)?,
                gate_up,
            ))
        };
        let (gate, up, gate_up) = fuse().map_err(|e| {
            EmberError::Weights(format!(
                "{}: fusing gate and up: {e}",
                self.gate_proj.path()
            ))
        })?;
        Ok(Self {
            gate_proj: self.gate_proj.with_base(linear_from_weight(gate)),
            up_proj: self.up_proj.with_base(linear_from_weight(up)),
            gate_up: Some(gate_up),
            ..self
        })
    }

    /// Applies the MLP to `[tokens, hidden]`, each row with its adapter.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows) -> TensorResult {
        if let Some(gate_up) = &self.gate_up {
            if !lora.adapts(self.gate_proj.path()) && !lora.adapts(self.up_proj.path()) {
                let h = x.matmul(&gate_up.t()?)?;
                self.calls.count(Kernel::SiluAndMul);
                return self.down_proj.forward(&kernel_ops::silu_and_mul(&h)?, lora);
            }
        }
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x, lora)?)?;
        self.down_proj
            .forward(&(gate * self.up_proj.forward(x, lora)?)?, lora)
    }

    /// The gate, up and down weights when all three are held packed alone.
    pub fn packed_weights(&self) -> Option<[crate::linear::quantized::packed::PackedWeight; 3]> {
        Some([
            self.gate_proj.packed()?,
            self.up_proj.packed()?,
            self.down_proj.packed()?,
        ])
    }

    /// The same MLP (paths, splits) over other base layers for its three projections.
    pub fn with_bases(self, [gate, up, down]: [Arc<dyn crate::linear::LinearLayer>; 3]) -> Self {
        Self {
            gate_proj: self.gate_proj.with_base(gate),
            up_proj: self.up_proj.with_base(up),
            down_proj: self.down_proj.with_base(down),
            gate_up: None,
            calls: self.calls,
        }
    }

    /// The whole MLP's intermediate channels (a tensor-parallel rank holds a share).
    pub fn intermediate_size(&self) -> usize {
        self.down_proj.dims().0
    }

    /// The gate, up and down weights when all three are held dense without biases.
    pub fn dense_weights(&self) -> Option<(Tensor, Tensor, Tensor)> {
        Some((
            self.gate_proj.dense_weight()?,
            self.up_proj.dense_weight()?,
            self.down_proj.dense_weight()?,
        ))
    }

    /// Records the three projections as LoRA targets.
    pub fn register(&self, targets: &mut LoraTargets) {
        for p in [&self.gate_proj, &self.up_proj, &self.down_proj] {
            p.register(targets);
        }
    }
}
