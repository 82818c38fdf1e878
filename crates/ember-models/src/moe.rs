//! The sparse MoE block of Qwen3-MoE: softmax router, top-k experts per token (optionally
//! renormalised), each expert run once over the tokens routed to it, outputs scattered back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use ember_core::{EmberError, MoeConfig, Result};

use crate::linear::{load_linear, LinearLayer};
use crate::lora::{LoraRows, LoraTargets};
use crate::mlp::Mlp;
use crate::parallel::{uneven_share, RankContext};
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

/// Tokens routed to each expert of each MoE layer since the model loaded (the load-balance
/// statistics of `/metrics`), shared by every rank's copy of a layer.
#[derive(Debug, Default)]
pub struct ExpertLoad {
    layers: Mutex<BTreeMap<usize, Arc<Vec<AtomicU64>>>>,
    /// Experts each rank owns under expert parallelism; 0 otherwise.
    experts_per_rank: AtomicUsize,
}

impl ExpertLoad {
    /// The counters of layer `layer` (created on first use, `experts` of them).
    fn layer(&self, layer: usize, experts: usize) -> Arc<Vec<AtomicU64>> {
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .entry(layer)
            .or_insert_with(|| Arc::new((0..experts).map(|_| AtomicU64::new(0)).collect()))
            .clone()
    }

    /// Tokens per expert, by layer index, in layer order.
    pub fn snapshot(&self) -> Vec<(usize, Vec<u64>)> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .iter()
            .map(|(&l, c)| (l, c.iter().map(|n| n.load(Ordering::Relaxed)).collect()))
            .collect()
    }

    /// Under expert parallelism, how many consecutive experts each rank owns.
    pub fn experts_per_rank(&self) -> Option<usize> {
        Some(self.experts_per_rank.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }
}

/// The decoder layer index in a module path (`model.layers.3.mlp.experts` → 3).
fn layer_index(path: &str) -> usize {
    path.split('.')
        .skip_while(|p| *p != "layers")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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
            self.experts.num_experts,
        );
        self.experts.run(&routing, x, lora)
    }

    /// Whether the block's output is a rank's partial sum (tensor parallelism).
    pub fn output_is_partial(&self, rank: Option<&RankContext>) -> bool {
        self.experts.output_is_partial(rank)
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
    /// The experts this rank runs: every expert (whole, or under tensor parallelism each one's
    /// share of its intermediate channels), or under expert parallelism the rank's own range.
    pub experts: Vec<Mlp>,
    /// Experts in the layer, on all ranks together.
    pub num_experts: usize,
    /// Set under expert parallelism: `experts` are experts `rank * len..`, tokens travel.
    expert_parallel: Option<RankContext>,
    /// Tokens routed to each expert of the layer (all ranks' copies share them).
    load: Arc<Vec<AtomicU64>>,
    /// Whether this copy counts: every rank under expert parallelism (each its own experts'
    /// tokens), rank 0 alone under tensor parallelism (every rank routes every token).
    counts_load: bool,
}

impl Experts {
    /// Runs each expert once over the rows routed to it and scatter-adds the weighted outputs.
    /// Under expert parallelism the result is whole on every rank; under tensor parallelism it
    /// is this rank's partial sum.
    pub fn run(&self, routing: &ExpertRouting, x: &Tensor, lora: &LoraRows) -> TensorResult {
        match &self.expert_parallel {
            None => {
                if self.counts_load {
                    for (count, (rows, _)) in self.load.iter().zip(&routing.per_expert) {
                        count.fetch_add(rows.len() as u64, Ordering::Relaxed);
                    }
                }
                run_experts(&self.experts, routing, x, lora)
            }
            Some(ctx) => self.run_expert_parallel(ctx, routing, x, lora),
        }
    }

    /// Whether [`Experts::run`] returns a partial sum that the ranks must add up.
    pub fn output_is_partial(&self, rank: Option<&RankContext>) -> bool {
        rank.is_some() && self.expert_parallel.is_none()
    }

    /// Expert parallelism: each rank sends the rows of its share of the step's tokens to the
    /// ranks owning their experts (all-to-all), runs its experts over what it received, sends
    /// the weighted outputs back (all-to-all), adds them up for its rows, and the shares are
    /// gathered so every rank holds the whole result. Routing is computed on every rank alike.
    /// Each row travels with its index in the step, so the owner applies the row's adapter
    /// (every rank holds the step's `lora` rows alike).
    fn run_expert_parallel(
        &self,
        ctx: &RankContext,
        routing: &ExpertRouting,
        x: &Tensor,
        lora: &LoraRows,
    ) -> TensorResult {
        let (tokens, hidden) = x.dims2()?;
        let (world, device, dtype) = (ctx.world_size(), x.device(), x.dtype());
        let (first, mine) = uneven_share(tokens, ctx.rank(), world);
        let per_rank = self.experts.len();
        let mut send_rows: Vec<Vec<u32>> = vec![Vec::new(); world];
        let mut send_meta: Vec<Vec<f32>> = vec![Vec::new(); world];
        for (expert, (rows, weights)) in routing.per_expert.iter().enumerate() {
            let owner = expert / per_rank;
            for (&row, &weight) in rows.iter().zip(weights) {
                if (first..first + mine).contains(&(row as usize)) {
                    send_rows[owner].push(row);
                    // f32 holds row indices exactly up to 2^24 tokens a step.
                    send_meta[owner].extend([
                        (expert - owner * per_rank) as f32,
                        weight,
                        row as f32,
                    ]);
                }
            }
        }
        let rows_of = |rows: &[u32]| -> TensorResult {
            if rows.is_empty() {
                return Tensor::zeros((0, hidden), dtype, device);
            }
            x.index_select(&Tensor::from_slice(rows, rows.len(), device)?, 0)
        };
        let hidden_out = send_rows
            .iter()
            .map(|r| rows_of(r))
            .collect::<TensorResult<Vec<_>>>()?;
        let meta_out = send_meta
            .iter()
            .map(|m| Tensor::from_slice(m, (m.len() / 3, 3), device))
            .collect::<TensorResult<Vec<_>>>()?;
        let hidden_in = ctx.comm.all_to_all(hidden_out)?;
        let meta_in = ctx.comm.all_to_all(meta_out)?;

        // Everything received, as one batch of rows for the local experts.
        let counts: Vec<usize> = hidden_in
            .iter()
            .map(|t| t.dim(0))
            .collect::<TensorResult<_>>()?;
        let mut local = ExpertRouting {
            per_expert: vec![(Vec::new(), Vec::new()); per_rank],
        };
        let mut row = 0u32;
        let mut step_rows = Vec::new();
        for meta in &meta_in {
            if meta.dim(0)? == 0 {
                continue;
            }
            for triple in meta.to_vec2::<f32>()? {
                let expert = &mut local.per_expert[triple[0] as usize];
                expert.0.push(row);
                expert.1.push(triple[1]);
                step_rows.push(triple[2] as u32);
                row += 1;
            }
        }
        for (k, (rows, _)) in local.per_expert.iter().enumerate() {
            self.load[ctx.rank() * per_rank + k].fetch_add(rows.len() as u64, Ordering::Relaxed);
        }
        let received: Vec<Tensor> = hidden_in
            .into_iter()
            .filter(|t| t.dim(0).is_ok_and(|n| n > 0))
            .collect();
        let outputs = if received.is_empty() {
            Tensor::zeros((0, hidden), dtype, device)?
        } else {
            run_experts(
                &self.experts,
                &local,
                &Tensor::cat(&received, 0)?,
                &lora.select(&step_rows, device)?,
            )?
        };
        let mut back = Vec::with_capacity(world);
        let mut offset = 0;
        for &n in &counts {
            back.push(if n == 0 {
                Tensor::zeros((0, hidden), dtype, device)?
            } else {
                outputs.narrow(0, offset, n)?
            });
            offset += n;
        }
        let returned = ctx.comm.all_to_all(back)?;

        let mut combined = Tensor::zeros((mine, hidden), dtype, device)?;
        for (rows, y) in send_rows.iter().zip(&returned) {
            if rows.is_empty() {
                continue;
            }
            let local_rows: Vec<u32> = rows.iter().map(|&r| r - first as u32).collect();
            let index = Tensor::from_slice(&local_rows, local_rows.len(), device)?;
            combined = combined.index_add(&index, y, 0)?;
        }
        ctx.comm.all_gather(&combined, 0)
    }

    /// Records every expert's projections, and the container for fused expert adapters.
    pub fn register(&self, targets: &mut LoraTargets) {
        // All of the layer's experts: fused adapters split over them whichever rank runs each.
        targets.add_experts(&self.path, self.num_experts);
        for expert in &self.experts {
            expert.register(targets);
        }
    }
}

/// Loads `e` experts of intermediate size `i`, either one tensor per expert (Hub layout,
/// `experts.{e}.gate_proj.weight`) or fused (`experts.gate_up_proj`, `experts.down_proj`). On a
/// rank of a sharded model: under expert parallelism the rank's range of whole experts, else
/// every expert's share of the intermediate channels (see [`Mlp::load_split`]).
pub fn load_experts(experts_w: &Weights, hidden: usize, e: usize, i: usize) -> Result<Experts> {
    let path = experts_w.prefix().to_string();
    let rank = experts_w.rank();
    let expert_parallel = rank.filter(|r| r.expert_parallel).cloned();
    let (first, count) = match &expert_parallel {
        Some(ctx) => ctx.even_share(e, "the number of routed experts")?,
        None => (0, e),
    };
    let channels = match rank {
        Some(ctx) if expert_parallel.is_none() => Some(ctx.even_share(i, "moe_intermediate_size")?),
        _ => None,
    };
    let experts = if experts_w.contains("gate_up_proj") && !experts_w.contains("0.gate_proj.weight")
    {
        let fused_err =
            |err: candle_core::Error| EmberError::Weights(format!("fused experts: {err}"));
        // Only the rank's part is read: its experts (expert parallel), or every expert's share
        // of the intermediate channels (tensor parallel), gate rows first then up rows.
        let (gate_up_shape, down_shape) = ((e, 2 * i, hidden), (e, hidden, i));
        let (gate, up, down) = match channels {
            Some((c0, cn)) => (
                experts_w.get_slice("gate_up_proj", gate_up_shape, 1, c0, cn)?,
                experts_w.get_slice("gate_up_proj", gate_up_shape, 1, i + c0, cn)?,
                experts_w.get_slice("down_proj", down_shape, 2, c0, cn)?,
            ),
            None => {
                let gate_up =
                    experts_w.get_slice("gate_up_proj", gate_up_shape, 0, first, count)?;
                let (gate, up) = (
                    gate_up.narrow(1, 0, i).map_err(fused_err)?,
                    gate_up.narrow(1, i, i).map_err(fused_err)?,
                );
                let down = experts_w.get_slice("down_proj", down_shape, 0, first, count)?;
                (gate, up, down)
            }
        };
        (0..count)
            .map(|k| {
                let expert = |t: &Tensor| t.get(k).and_then(|t| t.contiguous()).map_err(fused_err);
                Mlp::from_weights(
                    experts_w,
                    first + k,
                    (expert(&gate)?, expert(&up)?, expert(&down)?),
                    i,
                    channels,
                )
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        (first..first + count)
            .map(|x| Mlp::load_split(&experts_w.pp(x), hidden, i, channels))
            .collect::<Result<_>>()?
    };
    let registry = experts_w.expert_load();
    if expert_parallel.is_some() {
        registry.experts_per_rank.store(count, Ordering::Relaxed);
    }
    Ok(Experts {
        load: registry.layer(layer_index(&path), e),
        counts_load: expert_parallel.is_some() || rank.is_none_or(|r| r.rank() == 0),
        path,
        experts,
        num_experts: e,
        expert_parallel,
    })
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
