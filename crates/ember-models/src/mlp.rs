//! The SwiGLU MLP (`down(silu(gate(x)) * up(x))`), used dense and as each MoE expert.

use candle_core::Tensor;
use ember_core::Result;

use crate::linear::{projection_from_weight, Projection, Split};
use crate::lora::{LoraRows, LoraTargets};
use crate::weights::Weights;
use crate::TensorResult;

/// `gate_proj`, `up_proj`, `down_proj` of one MLP.
pub struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

impl Mlp {
    /// Loads the three projections under `weights` (`hidden → intermediate → hidden`).
    pub fn load(weights: &Weights, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: Projection::load(&weights.pp("gate_proj"), hidden, intermediate, false)?,
            up_proj: Projection::load(&weights.pp("up_proj"), hidden, intermediate, false)?,
            down_proj: Projection::load(&weights.pp("down_proj"), intermediate, hidden, false)?,
        })
    }

    /// Loads one rank's share `(start, len)` of the intermediate channels (gate/up by columns,
    /// down by rows: the output is a partial sum), or the whole MLP (`None`).
    pub fn load_split(
        weights: &Weights,
        hidden: usize,
        intermediate: usize,
        channels: Option<(usize, usize)>,
    ) -> Result<Self> {
        let cols = channels.map(|(start, len)| Split::Columns { start, len });
        let rows = channels.map(|(start, len)| Split::Rows { start, len });
        Ok(Self {
            gate_proj: Projection::load_split(
                &weights.pp("gate_proj"),
                hidden,
                intermediate,
                false,
                cols,
            )?,
            up_proj: Projection::load_split(
                &weights.pp("up_proj"),
                hidden,
                intermediate,
                false,
                cols,
            )?,
            down_proj: Projection::load_split(
                &weights.pp("down_proj"),
                intermediate,
                hidden,
                false,
                rows,
            )?,
        })
    }

    /// Loads a dense MLP the way the rank of `weights` holds it: its share of the intermediate
    /// channels on a sharded model (partial output), else whole.
    pub fn load_dense(weights: &Weights, hidden: usize, intermediate: usize) -> Result<Self> {
        let channels = weights
            .rank()
            .map(|r| r.even_share(intermediate, "intermediate_size"))
            .transpose()?;
        Self::load_split(weights, hidden, intermediate, channels)
    }

    /// Builds expert `index` of `experts` (the fused tensors' owner, whose prefix is the module
    /// path adapters name the experts under) from slices of fused tensors (`[out, in]` each) of
    /// an expert of `intermediate` channels, of which a tensor-parallel rank holds `channels`.
    pub fn from_weights(
        experts: &Weights,
        index: usize,
        (gate, up, down): (Tensor, Tensor, Tensor),
        intermediate: usize,
        channels: Option<(usize, usize)>,
    ) -> Result<Self> {
        let hidden = gate.dims2().map(|d| d.1).unwrap_or_default();
        let path = format!("{}.{index}", experts.prefix());
        let cols = channels.map(|(start, len)| Split::Columns { start, len });
        let rows = channels.map(|(start, len)| Split::Rows { start, len });
        let proj = |name: &str, w: Tensor, i: usize, o: usize, split| -> Result<Projection> {
            let layer = projection_from_weight(&experts.pp(index).pp(name), w, None)?;
            Ok(Projection::new(layer, &format!("{path}.{name}"), i, o).with_split(split))
        };
        Ok(Self {
            gate_proj: proj("gate_proj", gate, hidden, intermediate, cols)?,
            up_proj: proj("up_proj", up, hidden, intermediate, cols)?,
            down_proj: proj("down_proj", down, intermediate, hidden, rows)?,
        })
    }

    /// Applies the MLP to `[tokens, hidden]`, each row with its adapter.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows) -> TensorResult {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x, lora)?)?;
        self.down_proj
            .forward(&(gate * self.up_proj.forward(x, lora)?)?, lora)
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
