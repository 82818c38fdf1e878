use super::*;
use ember_kernels::moe_routing;

/// Routing of real layer shapes: (name, config, tokens).
fn routing_cases() -> Vec<(&'static str, moe_routing::RoutingConfig)> {
    use moe_routing::{RoutingConfig, TopkMethod};
    let base = RoutingConfig::softmax_top_k(128, 8);
    vec![
        ("qwen3-30b-a3b softmax top-8", base),
        (
            "deepseek-v3 noaux_tc 8 groups of 32, 4 kept",
            RoutingConfig {
                num_experts: 256,
                n_group: 8,
                topk_group: 4,
                method: TopkMethod::NoauxTc,
                sigmoid: true,
                scaling: 2.5,
                ..base
            },
        ),
        (
            "kimi-k2 noaux_tc 384 experts, one group",
            RoutingConfig {
                num_experts: 384,
                method: TopkMethod::NoauxTc,
                sigmoid: true,
                scaling: 2.827,
                ..base
            },
        ),
        (
            "deepseek-v2 group-limited greedy",
            RoutingConfig {
                num_experts: 160,
                top_k: 6,
                n_group: 8,
                topk_group: 3,
                method: TopkMethod::GroupLimitedGreedy,
                renormalize: false,
                scaling: 16.0,
                ..base
            },
        ),
    ]
}

#[test]
fn moe_routing_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    let st = k.stream();
    for (name, cfg) in routing_cases() {
        for tokens in [1usize, 7, 300] {
            let logits: Vec<f32> = random(&mut rng, tokens * cfg.num_experts, -4.0, 4.0);
            let bias: Vec<f32> = random(&mut rng, cfg.num_experts, -0.1, 0.1);
            let (mut ids, mut w) = (
                vec![0u32; tokens * cfg.top_k],
                vec![0f32; tokens * cfg.top_k],
            );
            moe_routing::route(&logits, &bias, &cfg, &mut ids, &mut w).unwrap();
            let (dl, db) = (
                st.clone_htod(&logits).unwrap(),
                st.clone_htod(&bias).unwrap(),
            );
            let mut dids = st.alloc_zeros::<u32>(ids.len()).unwrap();
            let mut dw = st.alloc_zeros::<f32>(w.len()).unwrap();
            k.moe_routing(&dl.as_view(), &db.as_view(), &cfg, &mut dids, &mut dw, None)
                .unwrap();
            let (gids, gw) = (st.clone_dtoh(&dids).unwrap(), st.clone_dtoh(&dw).unwrap());
            // A graph's spare rows: tokens from `live` on retired, the rest routed the same.
            let live = tokens / 2;
            let dlive = st.clone_htod(&[live as u32]).unwrap();
            let mut rids = st.alloc_zeros::<u32>(ids.len()).unwrap();
            let mut rw = st.alloc_zeros::<f32>(w.len()).unwrap();
            k.moe_routing(
                &dl.as_view(),
                &db.as_view(),
                &cfg,
                &mut rids,
                &mut rw,
                Some(&dlive),
            )
            .unwrap();
            let (mut want_ids, mut want_w) = (gids.clone(), gw.clone());
            moe_routing::retire_rows(&mut want_ids, &mut want_w, &cfg, live);
            assert_eq!(
                st.clone_dtoh(&rids).unwrap(),
                want_ids,
                "{name} x{tokens}: live {live}"
            );
            assert_eq!(
                st.clone_dtoh(&rw).unwrap(),
                want_w,
                "{name} x{tokens}: live {live}"
            );
            // expf differs from the host's exp by an ulp or two and the softmax sums in another
            // order: a near-tie may rank the other way, at most one token in a thousand here.
            let flipped = (0..tokens)
                .filter(|&t| {
                    gids[t * cfg.top_k..][..cfg.top_k] != ids[t * cfg.top_k..][..cfg.top_k]
                })
                .count();
            assert!(
                flipped * 1000 <= tokens,
                "{name} x{tokens}: {flipped} tokens routed differently"
            );
            for t in 0..tokens {
                let r = t * cfg.top_k..(t + 1) * cfg.top_k;
                if gids[r.clone()] != ids[r.clone()] {
                    continue;
                }
                for i in r {
                    let tol = 1e-5 * w[i].abs() + 1e-6;
                    assert!(
                        (gw[i] - w[i]).abs() <= tol,
                        "{name} x{tokens} token {t}: weight GPU {} vs CPU {}",
                        gw[i],
                        w[i]
                    );
                }
            }
            eprintln!("{name} x{tokens}: routing matches");
        }
    }
}
