//! Expert routing: which experts each token goes to, and with what weight. Qwen3-MoE's softmax
//! top-k, and DeepSeek's router: sigmoid (or softmax) scores, then the bias-corrected,
//! group-limited top-k of DeepSeek-V3 / Kimi K2 (`noaux_tc`), plain top-k (`greedy`, V2-Lite),
//! or top-k inside the groups holding the best single scores (`group_limited_greedy`, V2).
//! Both run on host f32 rows and yield the same [`ExpertRouting`] plan.

use ember_core::config::{DeepseekConfig, ScoringFunc, TopkMethod};
use ember_kernels::moe_routing::{self, RoutingConfig, TopkMethod as KernelTopk};

use crate::TensorResult;

/// Which experts each token goes to, grouped by expert (the plan both CPU and CUDA paths run).
#[derive(Debug, Default, PartialEq)]
pub struct ExpertRouting {
    /// For each expert, the batch rows routed to it and their weights.
    pub per_expert: Vec<(Vec<u32>, Vec<f32>)>,
}

impl ExpertRouting {
    /// Routes router logits `[tokens][experts]` (f32) by `cfg`'s rules through ember-kernels'
    /// routing, the reference `kernels/moe_routing.cu` is tested against, so the host's plan and
    /// the fused MoE's agree. `bias` is `e_score_correction_bias` (`noaux_tc` only).
    pub fn route(logits: &[Vec<f32>], bias: &[f32], cfg: &RoutingConfig) -> TensorResult<Self> {
        let flat: Vec<f32> = logits.concat();
        let entries = logits.len() * cfg.top_k;
        let (mut ids, mut weights) = (vec![0u32; entries], vec![0f32; entries]);
        moe_routing::route(&flat, bias, cfg, &mut ids, &mut weights)
            .map_err(candle_core::Error::wrap)?;
        let mut per_expert = vec![(Vec::new(), Vec::new()); cfg.num_experts];
        for (entry, (&e, &w)) in ids.iter().zip(&weights).enumerate() {
            per_expert[e as usize].0.push((entry / cfg.top_k) as u32);
            per_expert[e as usize].1.push(w);
        }
        Ok(Self { per_expert })
    }
}

/// Softmax top-k routing of Qwen3-MoE over router logits `[tokens, experts]` (f32 rows).
pub fn route_softmax_topk(
    logits: &[Vec<f32>],
    top_k: usize,
    renormalize: bool,
    num_experts: usize,
) -> TensorResult<ExpertRouting> {
    let cfg = RoutingConfig {
        num_experts,
        top_k,
        n_group: 1,
        topk_group: 1,
        method: KernelTopk::Greedy,
        sigmoid: false,
        renormalize,
        scaling: 1.0,
    };
    ExpertRouting::route(logits, &[], &cfg)
}

/// The routing settings of one DeepSeek MoE layer.
#[derive(Debug, Clone)]
pub struct ExpertRouter {
    pub num_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

impl ExpertRouter {
    /// The router of `cfg`.
    pub fn new(cfg: &DeepseekConfig) -> Self {
        Self {
            num_experts: cfg.n_routed_experts,
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            topk_method: cfg.topk_method,
            scoring_func: cfg.scoring_func,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
        }
    }

    /// The same rules as the routing kernel's settings (`kernels/moe_routing.cu`).
    pub fn kernel_config(&self) -> RoutingConfig {
        use KernelTopk as K;
        RoutingConfig {
            num_experts: self.num_experts,
            top_k: self.top_k,
            n_group: self.n_group,
            topk_group: self.topk_group,
            method: match self.topk_method {
                TopkMethod::Greedy => K::Greedy,
                TopkMethod::GroupLimitedGreedy => K::GroupLimitedGreedy,
                TopkMethod::NoauxTc => K::NoauxTc,
            },
            sigmoid: self.scoring_func == ScoringFunc::Sigmoid,
            renormalize: self.norm_topk_prob,
            scaling: self.routed_scaling_factor,
        }
    }

    /// Routes router logits `[tokens][experts]` (f32). `bias` is `e_score_correction_bias`
    /// (used by `noaux_tc` only to choose; weights come from the unbiased scores).
    pub fn route(&self, logits: &[Vec<f32>], bias: &[f32]) -> TensorResult<ExpertRouting> {
        ExpertRouting::route(logits, bias, &self.kernel_config())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    fn router(method: TopkMethod, scoring: ScoringFunc, norm: bool) -> ExpertRouter {
        ExpertRouter {
            num_experts: 8,
            top_k: 2,
            n_group: 4,
            topk_group: 2,
            topk_method: method,
            scoring_func: scoring,
            norm_topk_prob: norm,
            routed_scaling_factor: 2.5,
        }
    }

    /// The weights of `routing` as (expert, weight) pairs of token 0, by expert.
    fn chosen(routing: &ExpertRouting) -> Vec<(usize, f32)> {
        routing
            .per_expert
            .iter()
            .enumerate()
            .filter(|(_, (rows, _))| !rows.is_empty())
            .map(|(e, (_, w))| (e, w[0]))
            .collect()
    }

    #[test]
    fn noaux_tc_picks_by_group_then_biased_score_and_weighs_by_unbiased_score() {
        // Sigmoid scores per group (2 experts each): g0 [.9 .1], g1 [.6 .5], g2 [.7 .45], g3 [.2 .3].
        // Bias +.3 on expert 7 lifts g3 to .2+.6 = .8: group scores 1.0, 1.1, 1.15, .8 → keep g2, g1.
        // Biased choice inside them: e4 .7, e2 .6 → chosen {2, 4} although e0 (.9) scores highest.
        let p = [0.9, 0.1, 0.6, 0.5, 0.7, 0.45, 0.2, 0.3];
        let logits = vec![p.iter().map(|&p| logit(p)).collect::<Vec<f32>>()];
        let mut bias = vec![0f32; 8];
        bias[7] = 0.3;
        let plain = router(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, false)
            .route(&logits, &bias)
            .unwrap();
        let got = chosen(&plain);
        assert_eq!(got.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4]);
        assert!((got[0].1 - 0.6 * 2.5).abs() < 1e-5 && (got[1].1 - 0.7 * 2.5).abs() < 1e-5);
        // Renormalised: .6/1.3 and .7/1.3, times the scaling factor.
        let norm = router(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true)
            .route(&logits, &bias)
            .unwrap();
        let got = chosen(&norm);
        assert!((got[0].1 - 0.6 / 1.3 * 2.5).abs() < 1e-5, "{got:?}");
        assert!((got[1].1 - 0.7 / 1.3 * 2.5).abs() < 1e-5, "{got:?}");
    }

    #[test]
    fn the_bias_only_chooses_it_never_weighs() {
        // One group: bias +1 on expert 1 makes it chosen over expert 2, with its own score .1.
        let mut r = router(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, false);
        (r.n_group, r.topk_group, r.routed_scaling_factor) = (1, 1, 1.0);
        let p = [0.9, 0.1, 0.5, 0.2, 0.2, 0.2, 0.2, 0.2];
        let logits = vec![p.iter().map(|&p| logit(p)).collect::<Vec<f32>>()];
        let mut bias = vec![0f32; 8];
        bias[1] = 1.0;
        let got = chosen(&r.route(&logits, &bias).unwrap());
        assert_eq!(got.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((got[1].1 - 0.1).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn greedy_softmax_routing_of_v2_lite() {
        // softmax(ln [1..8]) = i/36: top-2 are experts 7 (8/36) and 6 (7/36), times 2.5.
        let logits = vec![(1..=8).map(|i| (i as f32).ln()).collect::<Vec<f32>>()];
        let got = chosen(
            &router(TopkMethod::Greedy, ScoringFunc::Softmax, false)
                .route(&logits, &[])
                .unwrap(),
        );
        assert_eq!(got.iter().map(|c| c.0).collect::<Vec<_>>(), vec![6, 7]);
        assert!((got[0].1 - 7.0 / 36.0 * 2.5).abs() < 1e-6);
        assert!((got[1].1 - 8.0 / 36.0 * 2.5).abs() < 1e-6);
    }

    #[test]
    fn group_limited_greedy_keeps_the_groups_of_the_best_single_experts() {
        // Softmax weights (out of 32) in groups of 2: g0 [1 9], g1 [6 6], g2 [8 1], g3 [1 0].
        // Group maxima 9, 6, 8, 1 keep g0 and g2, so the top-2 are experts 1 (9) and 4 (8).
        // Ranking groups by their top-2 sum (10, 12, 9, 1) would pick g1's 6s instead.
        let w = [1.0f32, 9.0, 6.0, 6.0, 8.0, 1.0, 1.0, 0.0];
        let logits = vec![w.iter().map(|w| w.ln()).collect::<Vec<f32>>()];
        let r = router(TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, false);
        let got = chosen(&r.route(&logits, &[]).unwrap());
        assert_eq!(got.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 4]);
        assert!((got[0].1 - 9.0 / 32.0 * 2.5).abs() < 1e-6, "{got:?}");
        assert!((got[1].1 - 8.0 / 32.0 * 2.5).abs() < 1e-6, "{got:?}");
    }

    /// ember-kernels' routing reference (the CUDA kernel's oracle) routes as this router and
    /// as Qwen3-MoE's softmax top-k do, on random logits of every method.
    #[test]
    fn the_kernels_routing_reference_agrees_with_the_model_routers() {
        use ember_kernels::moe_routing::{route, RoutingConfig, TopkMethod as K};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (tokens, e) = (50, 64);
        let logits: Vec<Vec<f32>> = (0..tokens)
            .map(|_| (0..e).map(|_| rng.random_range(-4.0f32..4.0)).collect())
            .collect();
        let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let flat: Vec<f32> = logits.concat();
        let as_pairs = |routing: &ExpertRouting| -> Vec<Vec<(usize, f32)>> {
            let mut per_token = vec![vec![]; tokens];
            for (x, (rows, weights)) in routing.per_expert.iter().enumerate() {
                for (&r, &w) in rows.iter().zip(weights) {
                    per_token[r as usize].push((x, w));
                }
            }
            per_token
        };
        let cases = [
            (TopkMethod::NoauxTc, K::NoauxTc, ScoringFunc::Sigmoid, true),
            (TopkMethod::Greedy, K::Greedy, ScoringFunc::Softmax, false),
            (
                TopkMethod::GroupLimitedGreedy,
                K::GroupLimitedGreedy,
                ScoringFunc::Softmax,
                true,
            ),
        ];
        for (method, kmethod, scoring, norm) in cases {
            let r = ExpertRouter {
                num_experts: e,
                top_k: 6,
                n_group: 8,
                topk_group: 3,
                topk_method: method,
                scoring_func: scoring,
                norm_topk_prob: norm,
                routed_scaling_factor: 2.5,
            };
            let cfg = RoutingConfig {
                num_experts: e,
                top_k: 6,
                n_group: 8,
                topk_group: 3,
                method: kmethod,
                sigmoid: scoring == ScoringFunc::Sigmoid,
                renormalize: norm,
                scaling: 2.5,
            };
            // The fused MoE hands the kernel these settings.
            assert_eq!(r.kernel_config(), cfg, "{method:?}");
            let (mut ids, mut w) = (vec![0u32; tokens * 6], vec![0f32; tokens * 6]);
            route(&flat, &bias, &cfg, &mut ids, &mut w).unwrap();
            for (t, mut want) in as_pairs(&r.route(&logits, &bias).unwrap())
                .into_iter()
                .enumerate()
            {
                let mut got: Vec<(usize, f32)> = (0..6)
                    .map(|i| (ids[t * 6 + i] as usize, w[t * 6 + i]))
                    .collect();
                got.sort_by_key(|p| p.0);
                want.sort_by_key(|p| p.0);
                assert_eq!(got, want, "{method:?} token {t}");
            }
        }
        // Qwen3-MoE: softmax over all experts, top-k, renormalised.
        let qwen = route_softmax_topk(&logits, 8, true, e).unwrap();
        let cfg = RoutingConfig {
            num_experts: e,
            top_k: 8,
            n_group: 1,
            topk_group: 1,
            method: K::Greedy,
            sigmoid: false,
            renormalize: true,
            scaling: 1.0,
        };
        let (mut ids, mut w) = (vec![0u32; tokens * 8], vec![0f32; tokens * 8]);
        route(&flat, &[], &cfg, &mut ids, &mut w).unwrap();
        for (t, mut want) in as_pairs(&qwen).into_iter().enumerate() {
            let mut got: Vec<(usize, f32)> = (0..8)
                .map(|i| (ids[t * 8 + i] as usize, w[t * 8 + i]))
                .collect();
            got.sort_by_key(|p| p.0);
            want.sort_by_key(|p| p.0);
            for ((ge, gw), (we, ww)) in got.iter().zip(&want) {
                assert_eq!(ge, we, "qwen3 token {t}");
                // Qwen3 renormalises p / Σp of probabilities already divided by the sum.
                assert!(
                    (gw - ww).abs() <= 1e-6 * ww.abs(),
                    "qwen3 token {t}: {gw} vs {ww}"
                );
            }
        }
    }

    #[test]
    fn routes_top_k_with_and_without_renormalisation() {
        // Probabilities of row 0: softmax([ln 1, ln 2, ln 3, ln 4]) = [.1, .2, .3, .4].
        let logits = vec![vec![1f32.ln(), 2f32.ln(), 3f32.ln(), 4f32.ln()]];
        let plain = route_softmax_topk(&logits, 2, false, 4).unwrap();
        assert_eq!(plain.per_expert[3].0, vec![0]);
        assert!((plain.per_expert[3].1[0] - 0.4).abs() < 1e-6);
        assert!((plain.per_expert[2].1[0] - 0.3).abs() < 1e-6);
        assert!(plain.per_expert[0].0.is_empty() && plain.per_expert[1].0.is_empty());
        let renorm = route_softmax_topk(&logits, 2, true, 4).unwrap();
        assert!((renorm.per_expert[3].1[0] - 4.0 / 7.0).abs() < 1e-6);
        assert!((renorm.per_expert[2].1[0] - 3.0 / 7.0).abs() < 1e-6);
    }
}
