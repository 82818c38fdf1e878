//! The sparse MoE block of Qwen3-MoE: softmax router, top-k experts per token (optionally
//! renormalised), each expert run once over the tokens routed to it, outputs scattered back.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use ember_core::{EmberError, MoeConfig, Result};

use crate::linear::{load_linear, LinearLayer};
use crate::lora::{LoraRows, LoraTargets};
use crate::mlp::Mlp;
use crate::weights::Weights;
use crate::TensorResult;

/// Which experts each token goes to, grouped by expert (the plan both CPU and CUDA paths run).
#[derive(Debug, Default, PartialEq)]
pub struct ExpertRouting {
    /// For each expert, the batch rows routed to it and their weights.
    pub per_expert: Vec<(Vec<u32>, Vec<f32>)>,
}

/// Softmax top-k routing of Qwen3-MoE over router logits `[tokens, experts]` (f32 rows).
pub fn route_softmax_topk(
    logits: &[Vec<f32>],
    top_k: usize,
    renormalize: bool,
    num_experts: usize,
) -> ExpertRouting {
    let mut per_expert = vec![(Vec::new(), Vec::new()); num_experts];
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    for (row, logit_row) in logits.iter().enumerate() {
        let max = logit_row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logit_row.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        order.clear();
        order.extend(0..logit_row.len());
        // Highest probability first; ties go to the lower expert index, as torch.topk does on CPU.
        order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
        let chosen = &order[..top_k];
        let total: f32 = chosen.iter().map(|&e| exp[e] / sum).sum();
        for &e in chosen {
            let p = exp[e] / sum;
            let w = if renormalize { p / total } else { p };
            per_expert[e].0.push(row as u32);
            per_expert[e].1.push(w);
        }
    }
    ExpertRouting { per_expert }
}

/// `mlp` of a sparse Qwen3-MoE layer.
pub struct SparseMoe {
    gate: Arc<dyn LinearLayer>,
    experts: Experts,
    top_k: usize,
    norm_topk_prob: bool,
}

impl SparseMoe {
    /// Loads the router `gate` and the experts (see [`load_experts`]).
    pub fn load(weights: &Weights, hidden: usize, moe: &MoeConfig) -> Result<Self> {
        let (e, i) = (moe.num_experts, moe.moe_intermediate_size);
        let gate = load_linear(&weights.pp("gate"), hidden, e, false)?;
        let experts = load_experts(&weights.pp("experts"), hidden, e, i)?;
        Ok(Self {
            gate,
            experts,
            top_k: moe.num_experts_per_tok,
            norm_topk_prob: moe.norm_topk_prob,
        })
    }

    /// Applies the block to `[tokens, hidden]`, each row with its adapter.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows) -> TensorResult {
        let logits = self
            .gate
            .forward(x)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let routing = route_softmax_topk(
            &logits,
            self.top_k,
            self.norm_topk_prob,
            self.experts.experts.len(),
        );
        self.experts.run(&routing, x, lora)
    }

    /// Records the experts' projections as LoRA targets.
    pub fn register(&self, targets: &mut LoraTargets) {
        self.experts.register(targets);
    }
}

/// A layer's routed experts, and the module path adapters name them under
/// (`model.layers.1.mlp.experts`, expert `e` at `<path>.<e>`).
pub struct Experts {
    pub path: String,
    pub experts: Vec<Mlp>,
}

impl Experts {
    /// Runs each expert once over the rows routed to it and scatter-adds the weighted outputs.
    pub fn run(&self, routing: &ExpertRouting, x: &Tensor, lora: &LoraRows) -> TensorResult {
        run_experts(&self.experts, routing, x, lora)
    }

    /// Records every expert's projections, and the container for fused expert adapters.
    pub fn register(&self, targets: &mut LoraTargets) {
        targets.add_experts(&self.path, self.experts.len());
        for expert in &self.experts {
            expert.register(targets);
        }
    }
}

/// Loads `e` experts of intermediate size `i`, either one tensor per expert (Hub layout,
/// `experts.{e}.gate_proj.weight`) or fused (`experts.gate_up_proj`, `experts.down_proj`).
pub fn load_experts(experts_w: &Weights, hidden: usize, e: usize, i: usize) -> Result<Experts> {
    let path = experts_w.prefix().to_string();
    let experts = if experts_w.contains("gate_up_proj") && !experts_w.contains("0.gate_proj.weight")
    {
        let gate_up = experts_w.get("gate_up_proj", (e, 2 * i, hidden))?;
        let down = experts_w.get("down_proj", (e, hidden, i))?;
        let fused_err =
            |err: candle_core::Error| EmberError::Weights(format!("fused experts: {err}"));
        (0..e)
            .map(|x| {
                let gu = gate_up.get(x).map_err(fused_err)?;
                Mlp::from_weights(
                    experts_w,
                    x,
                    gu.narrow(0, 0, i).map_err(fused_err)?,
                    gu.narrow(0, i, i).map_err(fused_err)?,
                    down.get(x).map_err(fused_err)?,
                )
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        (0..e)
            .map(|x| Mlp::load(&experts_w.pp(x), hidden, i))
            .collect::<Result<_>>()?
    };
    Ok(Experts { path, experts })
}

/// Runs each expert once over the rows routed to it and scatter-adds the weighted outputs; each
/// row keeps its adapter inside the expert.
pub fn run_experts(
    experts: &[Mlp],
    routing: &ExpertRouting,
    x: &Tensor,
    lora: &LoraRows,
) -> TensorResult {
    let mut out = x.zeros_like()?;
    for (expert, (rows, weights)) in experts.iter().zip(&routing.per_expert) {
        if rows.is_empty() {
            continue;
        }
        let n = rows.len();
        let expert_lora = lora.select(rows, x.device())?;
        let rows = Tensor::from_slice(rows, n, x.device())?;
        let w = Tensor::from_slice(weights, (n, 1), x.device())?.to_dtype(x.dtype())?;
        let y = expert
            .forward(&x.index_select(&rows, 0)?, &expert_lora)?
            .broadcast_mul(&w)?;
        out = out.index_add(&rows, &y, 0)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_top_k_with_and_without_renormalisation() {
        // Probabilities of row 0: softmax([ln 1, ln 2, ln 3, ln 4]) = [.1, .2, .3, .4].
        let logits = vec![vec![1f32.ln(), 2f32.ln(), 3f32.ln(), 4f32.ln()]];
        let plain = route_softmax_topk(&logits, 2, false, 4);
        assert_eq!(plain.per_expert[3].0, vec![0]);
        assert!((plain.per_expert[3].1[0] - 0.4).abs() < 1e-6);
        assert!((plain.per_expert[2].1[0] - 0.3).abs() < 1e-6);
        assert!(plain.per_expert[0].0.is_empty() && plain.per_expert[1].0.is_empty());
        let renorm = route_softmax_topk(&logits, 2, true, 4);
        assert!((renorm.per_expert[3].1[0] - 4.0 / 7.0).abs() < 1e-6);
        assert!((renorm.per_expert[2].1[0] - 3.0 / 7.0).abs() < 1e-6);
    }
}
