//! Expert routing of one MoE layer for a batch of tokens: router logits `[tokens, experts]` (f32)
//! to the `top_k` chosen experts of each token and their weights, as Qwen3-MoE (softmax top-k)
//! and DeepSeek-V2/V3 / Kimi K2 (sigmoid or softmax scores; plain, group-limited, or
//! bias-corrected group-limited top-k) route. The model's host-side routers
//! (`ember-models`' `route_softmax_topk` and `ExpertRouter`) are the same rules.
//!
//! Rules, shared by the CPU reference and `kernels/moe_routing.cu`:
//! - scores: `sigmoid(l) = 1 / (1 + exp(-l))`, or a max-subtracted softmax over all experts;
//! - `Greedy`: the `top_k` best scores; `GroupLimitedGreedy`: the same inside the `topk_group`
//!   groups (of `experts / n_group` consecutive experts) whose best score is highest; `NoauxTc`:
//!   choice scores `score + bias`, groups ranked by the sum of their two best choice scores, the
//!   `top_k` best choice scores inside the kept groups;
//! - every ranking takes the larger value first and, on ties, the lower index;
//! - weights are the chosen experts' scores (never the bias), divided by their sum plus 1e-20
//!   when `renormalize`, times `scaling`; ids and weights come out best first.

use crate::error::check_shape;
use crate::KernelError;

/// How a token's experts are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    Greedy,
    GroupLimitedGreedy,
    NoauxTc,
}

/// One layer's routing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub method: TopkMethod,
    /// Sigmoid scores; softmax otherwise.
    pub sigmoid: bool,
    pub renormalize: bool,
    pub scaling: f32,
}

impl RoutingConfig {
    /// Qwen3-MoE's routing: a softmax over all `num_experts`, the `top_k` best, their weights
    /// renormalised to sum to 1.
    pub fn softmax_top_k(num_experts: usize, top_k: usize) -> Self {
        RoutingConfig {
            num_experts,
            top_k,
            n_group: 1,
            topk_group: 1,
            method: TopkMethod::Greedy,
            sigmoid: false,
            renormalize: true,
            scaling: 1.0,
        }
    }
}

/// Most experts, experts per token and groups the CUDA kernel holds per token (its shared memory);
/// the checks apply to the reference too, so both take the same calls.
pub const MAX_EXPERTS: usize = 1024;
pub const MAX_TOP_K: usize = 32;
pub const MAX_GROUPS: usize = 64;

/// Tokens of a routing call, or why the buffers don't fit `cfg`.
pub fn routing_shape(
    cfg: &RoutingConfig,
    logits_len: usize,
    bias_len: usize,
    ids_len: usize,
    weights_len: usize,
) -> Result<usize, KernelError> {
    const OP: &str = "moe_routing";
    let e = cfg.num_experts;
    check_shape(
        e > 0 && e <= MAX_EXPERTS && cfg.top_k > 0 && cfg.top_k <= e.min(MAX_TOP_K),
        OP,
        || {
            format!(
                "{e} experts (1 to {MAX_EXPERTS}), top_k {} (1 to {MAX_TOP_K})",
                cfg.top_k
            )
        },
    )?;
    let grouped = cfg.method != TopkMethod::Greedy;
    check_shape(
        !grouped
            || (cfg.n_group > 0
                && cfg.n_group <= MAX_GROUPS
                && e.is_multiple_of(cfg.n_group)
                && cfg.topk_group > 0
                && cfg.topk_group <= cfg.n_group
                && cfg.top_k <= cfg.topk_group * (e / cfg.n_group)),
        OP,
        || {
            format!(
                "{e} experts in {} groups, {} kept, top_k {}",
                cfg.n_group, cfg.topk_group, cfg.top_k
            )
        },
    )?;
    check_shape(
        cfg.method != TopkMethod::NoauxTc || (bias_len == e && e / cfg.n_group >= 2),
        OP,
        || format!("noaux_tc needs a bias per expert ({bias_len} of {e}) and groups of 2+"),
    )?;
    check_shape(logits_len.is_multiple_of(e), OP, || {
        format!("logits have {logits_len} elements, not a multiple of {e} experts")
    })?;
    let tokens = logits_len / e;
    check_shape(
        ids_len == tokens * cfg.top_k && weights_len == tokens * cfg.top_k,
        OP,
        || {
            format!(
                "{tokens} tokens x top_k {} but ids {ids_len}, weights {weights_len}",
                cfg.top_k
            )
        },
    )?;
    Ok(tokens)
}

/// Indices of the `k` largest of `values`, largest first, ties to the lower index.
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// What the kernel does to tokens from `live` on (a CUDA graph's spare rows, given `live`): routes
/// them to no expert, id `num_experts` with weight 0, which the fused MoE leaves out.
pub fn retire_rows(ids: &mut [u32], weights: &mut [f32], cfg: &RoutingConfig, live: usize) {
    let from = live * cfg.top_k;
    if let Some(rest) = ids.get_mut(from..) {
        rest.fill(cfg.num_experts as u32);
    }
    if let Some(rest) = weights.get_mut(from..) {
        rest.fill(0.0);
    }
}

/// CPU reference: each token's chosen experts (`ids`, `[tokens, top_k]`) and weights.
pub fn route(
    logits: &[f32],
    bias: &[f32],
    cfg: &RoutingConfig,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<(), KernelError> {
    routing_shape(cfg, logits.len(), bias.len(), ids.len(), weights.len())?;
    let e = cfg.num_experts;
    for ((row, ids), weights) in logits
        .chunks_exact(e)
        .zip(ids.chunks_exact_mut(cfg.top_k))
        .zip(weights.chunks_exact_mut(cfg.top_k))
    {
        let scores: Vec<f32> = if cfg.sigmoid {
            row.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect()
        } else {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            exp.iter().map(|x| x / sum).collect()
        };
        let per_group = if cfg.method == TopkMethod::Greedy {
            e
        } else {
            e / cfg.n_group
        };
        let mut choice: Vec<f32> = match cfg.method {
            TopkMethod::NoauxTc => scores.iter().zip(bias).map(|(s, b)| s + b).collect(),
            _ => scores.clone(),
        };
        if cfg.method != TopkMethod::Greedy {
            let group_score: Vec<f32> = choice
                .chunks(per_group)
                .map(|g| match cfg.method {
                    TopkMethod::NoauxTc => top_k_indices(g, 2).iter().map(|&i| g[i]).sum(),
                    _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                })
                .collect();
            let kept = top_k_indices(&group_score, cfg.topk_group);
            for (g, chunk) in choice.chunks_mut(per_group).enumerate() {
                if !kept.contains(&g) {
                    chunk.fill(f32::NEG_INFINITY);
                }
            }
        }
        let chosen = top_k_indices(&choice, cfg.top_k);
        let total = chosen.iter().map(|&x| scores[x]).sum::<f32>() + 1e-20;
        for ((id, w), &x) in ids.iter_mut().zip(weights.iter_mut()).zip(&chosen) {
            *id = x as u32;
            let s = if cfg.renormalize {
                scores[x] / total
            } else {
                scores[x]
            };
            *w = s * cfg.scaling;
        }
    }
    Ok(())
}

/// The launcher: [`route`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

    use super::{routing_shape, RoutingConfig, TopkMethod};
    use crate::cuda::{block_per_row, CudaKernels};
    use crate::KernelError;

    impl CudaKernels {
        /// [`crate::moe_routing::route`] on the GPU: f32 router logits `[tokens, experts]` to each
        /// token's chosen expert ids and weights (`[tokens, top_k]`, best first). `bias` may be
        /// empty unless the method is `NoauxTc`.
        ///
        /// With `live`, a device count: tokens from it on are routed to no expert
        /// ([`crate::moe_routing::retire_rows`]); how a CUDA graph's spare rows skip the experts.
        pub fn moe_routing(
            &self,
            logits: &CudaView<f32>,
            bias: &CudaView<f32>,
            cfg: &RoutingConfig,
            ids: &mut CudaSlice<u32>,
            weights: &mut CudaSlice<f32>,
            live: Option<&CudaSlice<u32>>,
        ) -> Result<(), KernelError> {
            let tokens = routing_shape(cfg, logits.len(), bias.len(), ids.len(), weights.len())?;
            if tokens == 0 {
                return Ok(());
            }
            let threads = cfg.num_experts.next_multiple_of(32).clamp(32, 1024) as u32;
            let launch_cfg = block_per_row("moe_routing", "tokens", tokens, threads)?;
            let method: i32 = match cfg.method {
                TopkMethod::Greedy => 0,
                TopkMethod::GroupLimitedGreedy => 1,
                TopkMethod::NoauxTc => 2,
            };
            // Sizes are bounded by routing_shape (at most 1024 experts).
            let ints = [
                cfg.num_experts as i32,
                cfg.top_k as i32,
                cfg.n_group as i32,
                cfg.topk_group as i32,
                method,
                cfg.sigmoid as i32,
                cfg.renormalize as i32,
            ];
            let f = self.moe_routing.load_function("moe_routing")?;
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(ids).arg(weights).arg(logits).arg(bias);
            for i in &ints {
                launch.arg(i);
            }
            launch.arg(&cfg.scaling);
            let null = 0u64;
            match live {
                Some(live) => launch.arg(live),
                None => launch.arg(&null),
            };
            // SAFETY: matches moe_routing(unsigned*, float*, const float*, const float*, int x 7,
            // float, const unsigned*) in kernels/moe_routing.cu (a null pointer for no `live`,
            // which else holds at least the one u32 the kernel reads); routing_shape bounds the
            // experts, groups and top_k by the kernel's shared arrays and every buffer by the token
            // count.
            unsafe { launch.launch(launch_cfg) }?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_rows_go_to_no_expert() {
        let cfg = RoutingConfig::softmax_top_k(8, 2);
        let (mut ids, mut w) = (vec![1u32, 2, 3, 4, 5, 6], vec![0.5f32; 6]);
        retire_rows(&mut ids, &mut w, &cfg, 1);
        assert_eq!(ids, [1, 2, 8, 8, 8, 8]);
        assert_eq!(w, [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]);
        retire_rows(&mut ids, &mut w, &cfg, 5);
        assert_eq!(
            ids,
            [1, 2, 8, 8, 8, 8],
            "live past the tokens retires nothing more"
        );
    }

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn noaux_tc_keeps_groups_by_their_two_best_biased_scores() {
        // ember-models' routing test, here: chosen {4, 2} (best first) though expert 0 scores .9.
        let p = [0.9, 0.1, 0.6, 0.5, 0.7, 0.45, 0.2, 0.3];
        let logits: Vec<f32> = p.iter().map(|&p| logit(p)).collect();
        let mut bias = vec![0f32; 8];
        bias[7] = 0.3;
        let cfg = RoutingConfig {
            num_experts: 8,
            top_k: 2,
            n_group: 4,
            topk_group: 2,
            method: TopkMethod::NoauxTc,
            sigmoid: true,
            renormalize: true,
            scaling: 2.5,
        };
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        route(&logits, &bias, &cfg, &mut ids, &mut w).unwrap();
        assert_eq!(ids, [4, 2]);
        assert!((w[0] - 0.7 / 1.3 * 2.5).abs() < 1e-5 && (w[1] - 0.6 / 1.3 * 2.5).abs() < 1e-5);
    }

    #[test]
    fn softmax_top_k_takes_the_lower_index_on_ties() {
        let cfg = RoutingConfig {
            renormalize: false,
            ..RoutingConfig::softmax_top_k(4, 2)
        };
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        route(&[0.0, 1.0, 1.0, 0.5], &[], &cfg, &mut ids, &mut w).unwrap();
        assert_eq!(ids, [1, 2]);
        assert!((w[0] - w[1]).abs() < 1e-7);
        let err = route(
            &[0.0; 4],
            &[],
            &RoutingConfig { top_k: 5, ..cfg },
            &mut ids,
            &mut w,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("top_k 5"), "{err}");
    }
}
