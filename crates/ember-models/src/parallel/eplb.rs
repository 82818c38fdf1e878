//! Expert load and its balancing: tokens routed to each expert of each MoE layer (the
//! statistics of `/metrics`), and under expert parallelism where each expert's copies live
//! ([`ExpertPlacement`]), re-placed from the load as DeepSeek's EPLB does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// Tokens routed to each expert of each MoE layer since the model loaded (the load-balance
/// statistics of `/metrics`), shared by every rank's copy of a layer; under expert parallelism
/// also each rank's tokens and, per layer, where the experts' copies are ([`ExpertPlacement`]).
#[derive(Debug, Default)]
pub struct ExpertLoad {
    layers: Mutex<BTreeMap<usize, Arc<Vec<AtomicU64>>>>,
    /// Counts kept elsewhere (a fused MoE layer's, on its GPU), drained into `layers` when read.
    drains: Mutex<Vec<(usize, CountDrain)>>,
    /// Under expert parallelism, tokens each rank's experts processed (all layers).
    pub(crate) rank_tokens: OnceLock<Vec<AtomicU64>>,
    placements: Mutex<BTreeMap<usize, Arc<ExpertPlacement>>>,
}

/// Takes the tokens counted since the last call, per expert, and resets them.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct CountDrain(pub(crate) Box<dyn Fn() -> Vec<u64> + Send + Sync>);

impl std::fmt::Debug for CountDrain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountDrain")
    }
}

impl ExpertLoad {
    /// Adds counts of layer `layer` kept elsewhere, read (and reset) by `drain` whenever the
    /// counters are read.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn add_drain(&self, layer: usize, drain: CountDrain) {
        self.drains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((layer, drain));
    }

    /// The counters of layer `layer` (created on first use, `experts` of them).
    pub(crate) fn layer(&self, layer: usize, experts: usize) -> Arc<Vec<AtomicU64>> {
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .entry(layer)
            .or_insert_with(|| Arc::new((0..experts).map(|_| AtomicU64::new(0)).collect()))
            .clone()
    }

    /// Layer `layer`'s placement of `experts` experts over `world` ranks of `slots` slots each
    /// (created on first use: expert `p % experts` in slot `p`, so the copies beyond the
    /// experts start as experts 0, 1, …).
    pub(crate) fn placement(
        &self,
        layer: usize,
        experts: usize,
        slots: usize,
        world: usize,
    ) -> Arc<ExpertPlacement> {
        self.rank_tokens
            .get_or_init(|| (0..world).map(|_| AtomicU64::new(0)).collect());
        let mut placements = self.placements.lock().unwrap_or_else(|p| p.into_inner());
        placements
            .entry(layer)
            .or_insert_with(|| {
                Arc::new(ExpertPlacement {
                    map: RwLock::new(Arc::new((0..slots * world).map(|p| p % experts).collect())),
                    version: AtomicU64::new(0),
                    window_start: Mutex::new(vec![0; experts]),
                    slots_per_rank: slots,
                })
            })
            .clone()
    }

    /// Tokens per expert, by layer index, in layer order.
    pub fn snapshot(&self) -> Vec<(usize, Vec<u64>)> {
        for (layer, drain) in self.drains.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let counts = (drain.0)();
            let counters = self.layer(*layer, counts.len());
            for (c, n) in counters.iter().zip(counts) {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers.iter().map(|(&l, c)| (l, read_counts(c))).collect()
    }

    /// Under expert parallelism, tokens each rank's experts processed, all layers together.
    pub fn rank_tokens(&self) -> Option<Vec<u64>> {
        self.rank_tokens.get().map(|r| read_counts(r))
    }

    /// Under expert parallelism, each layer's placement: the expert in each slot, ranks in order.
    pub fn placements(&self) -> Vec<(usize, Vec<usize>)> {
        let placements = self.placements.lock().unwrap_or_else(|p| p.into_inner());
        placements
            .iter()
            .map(|(&layer, placement)| (layer, placement.map().to_vec()))
            .collect()
    }

    /// Under expert parallelism, each layer's copies of each expert (1 without redundancy).
    pub fn replicas(&self) -> Vec<(usize, Vec<usize>)> {
        let placements = self.placements.lock().unwrap_or_else(|p| p.into_inner());
        placements
            .iter()
            .map(|(&layer, placement)| {
                let experts = placement.window_start.lock().map_or(0, |w| w.len());
                let mut copies = vec![0; experts];
                for &e in placement.map().iter() {
                    copies[e] += 1;
                }
                (layer, copies)
            })
            .collect()
    }

    /// Starts every layer's load window now: the next [`ExpertLoad::rebalance`] weighs only the
    /// tokens routed from here on (`--eplb-window-size`).
    pub fn start_window(&self) {
        let placements = self.placements.lock().unwrap_or_else(|p| p.into_inner());
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        for (layer, placement) in placements.iter() {
            if let Some(counts) = layers.get(layer) {
                *placement
                    .window_start
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = read_counts(counts);
            }
        }
    }

    /// Re-places every layer's expert copies for the load seen since its window started (its
    /// last rebalance, or [`ExpertLoad::start_window`] after it; see
    /// [`eplb_placement`]); each rank loads the experts of its changed slots at its next run of
    /// the layer. Call only between steps, when no rank is running. Returns the layers changed.
    pub fn rebalance(&self) -> usize {
        let placements: Vec<(usize, Arc<ExpertPlacement>)> = {
            let p = self.placements.lock().unwrap_or_else(|p| p.into_inner());
            p.iter().map(|(&l, p)| (l, p.clone())).collect()
        };
        let mut changed = 0;
        for (layer, placement) in placements {
            let now: Vec<u64> = {
                let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
                match layers.get(&layer) {
                    Some(c) => read_counts(c),
                    None => continue,
                }
            };
            let mut start = placement
                .window_start
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let window: Vec<u64> = now.iter().zip(start.iter()).map(|(n, s)| n - s).collect();
            *start = now;
            if window.iter().all(|&n| n == 0) {
                continue;
            }
            let world = placement.map().len() / placement.slots_per_rank;
            let map = eplb_placement(&window, placement.slots_per_rank, world);
            if map != **placement.map() {
                *placement.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
                placement.version.fetch_add(1, Ordering::Release);
                changed += 1;
            }
        }
        changed
    }
}

/// Where the copies of one MoE layer's experts live under expert parallelism: `map[p]` is the
/// expert in physical slot `p`, rank `r` holding slots `r * slots_per_rank..`. With
/// `--num-redundant-experts` there are more slots than experts and hot experts get several
/// copies; a token routed to an expert goes to one of its copies. Every rank's copy of the layer
/// reads this one, so they agree on where each token goes.
#[derive(Debug)]
pub struct ExpertPlacement {
    pub(crate) map: RwLock<Arc<Vec<usize>>>,
    /// Bumped at each change, so each rank knows to reload its slots.
    pub(crate) version: AtomicU64,
    /// The layer's per-expert token counts at the last rebalance (its window starts there).
    window_start: Mutex<Vec<u64>>,
    pub(crate) slots_per_rank: usize,
}

impl ExpertPlacement {
    pub(crate) fn map(&self) -> Arc<Vec<usize>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A placement of `load.len()` experts into `world` ranks of `slots` slots each, for the
/// tokens each expert received (`load`), as DeepSeek's EPLB balances them: the spare slots go one
/// by one to the expert with the most tokens per copy, then the copies (each carrying its
/// expert's tokens over its copies) are packed heaviest first onto the least-loaded rank with a
/// free slot, a rank not yet holding that expert first. Deterministic: ties go to the lower
/// expert and rank. Returns the expert of each slot, ranks in order, each rank's slots sorted.
pub fn eplb_placement(load: &[u64], slots: usize, world: usize) -> Vec<usize> {
    let experts = load.len();
    let total = slots * world;
    assert!(
        total >= experts && experts > 0,
        "{total} slots for {experts} experts"
    );
    let mut copies = vec![1usize; experts];
    for _ in experts..total {
        // Most tokens per copy: compare load[a] / copies[a] with load[b] / copies[b] exactly.
        let hot = (0..experts)
            .max_by(|&a, &b| {
                (load[a] as u128 * copies[b] as u128)
                    .cmp(&(load[b] as u128 * copies[a] as u128))
                    .then(b.cmp(&a))
            })
            .expect("at least one expert");
        copies[hot] += 1;
    }
    let mut items: Vec<(usize, f64)> = (0..experts)
        .flat_map(|e| std::iter::repeat_n((e, load[e] as f64 / copies[e] as f64), copies[e]))
        .collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut ranks: Vec<(f64, Vec<usize>)> = vec![(0.0, Vec::with_capacity(slots)); world];
    for (expert, weight) in items {
        let pick = |distinct: bool| {
            (0..world)
                .filter(|&r| {
                    ranks[r].1.len() < slots && !(distinct && ranks[r].1.contains(&expert))
                })
                .min_by(|&a, &b| ranks[a].0.total_cmp(&ranks[b].0).then(a.cmp(&b)))
        };
        let r = pick(true).or_else(|| pick(false)).expect("a free slot");
        ranks[r].0 += weight;
        ranks[r].1.push(expert);
    }
    ranks
        .into_iter()
        .flat_map(|(_, mut held)| {
            held.sort_unstable();
            held
        })
        .collect()
}

/// The current values of a layer's counters.
fn read_counts(counts: &[AtomicU64]) -> Vec<u64> {
    counts.iter().map(|n| n.load(Ordering::Relaxed)).collect()
}

/// The decoder layer index in a module path (`model.layers.3.mlp.experts` → 3).
pub(crate) fn layer_index(path: &str) -> usize {
    path.split('.')
        .skip_while(|p| *p != "layers")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies per expert and tokens per rank of a placement (each copy carrying its expert's
    /// tokens over its copies).
    fn copies_and_rank_loads(map: &[usize], load: &[u64], slots: usize) -> (Vec<usize>, Vec<f64>) {
        let mut copies = vec![0; load.len()];
        for &e in map {
            copies[e] += 1;
        }
        let ranks = map
            .chunks(slots)
            .map(|held| {
                held.iter()
                    .map(|&e| load[e] as f64 / copies[e] as f64)
                    .sum()
            })
            .collect();
        (copies, ranks)
    }

    #[test]
    fn eplb_copies_the_hottest_experts_and_balances_the_ranks() {
        // Expert 3 takes most tokens: both spare slots go to it (100, then 50 tokens per copy,
        // beat expert 6's 40).
        let load = [5, 5, 5, 100, 5, 5, 40, 5];
        let map = eplb_placement(&load, 5, 2);
        assert_eq!(map.len(), 10);
        let (copies, ranks) = copies_and_rank_loads(&map, &load, 5);
        assert_eq!(copies, [1, 1, 1, 3, 1, 1, 1, 1]);
        // Without copies one rank would carry expert 3's 100 tokens; now 170 tokens split
        // within the weight of one copy.
        assert!((ranks[0] - ranks[1]).abs() <= 100.0 / 3.0, "{ranks:?}");
        for held in map.chunks(5) {
            assert!(
                held.windows(2).all(|w| w[0] <= w[1]),
                "slots sorted: {map:?}"
            );
        }
        // Two hot experts, four spare slots over four ranks: each hot one on distinct ranks.
        let load = [90, 1, 1, 1, 1, 1, 1, 90];
        let map = eplb_placement(&load, 3, 4);
        let (copies, _) = copies_and_rank_loads(&map, &load, 3);
        assert_eq!(copies, [3, 1, 1, 1, 1, 1, 1, 3]);
        for hot in [0, 7] {
            let ranks: Vec<usize> = (0..4)
                .filter(|r| map[r * 3..r * 3 + 3].contains(&hot))
                .collect();
            assert_eq!(ranks.len(), 3, "copies of {hot} spread over ranks: {map:?}");
        }
    }

    #[test]
    fn rebalancing_weighs_only_the_window() {
        let load = ExpertLoad::default();
        let counts = load.layer(3, 4);
        let placement = load.placement(3, 4, 3, 2);
        assert_eq!(*placement.map(), [0, 1, 2, 3, 0, 1]);
        // Expert 0 was hot before the window, expert 2 within it: the copies follow expert 2.
        counts[0].fetch_add(1000, Ordering::Relaxed);
        load.start_window();
        counts[2].fetch_add(90, Ordering::Relaxed);
        counts[1].fetch_add(5, Ordering::Relaxed);
        assert_eq!(load.rebalance(), 1);
        assert_eq!(load.replicas(), [(3, vec![1, 1, 3, 1])]);
        assert_eq!(placement.version.load(Ordering::Relaxed), 1);
        // Nothing routed since: the placement stays.
        assert_eq!(load.rebalance(), 0);
    }

    #[test]
    fn eplb_without_spare_slots_only_balances() {
        let load = [8, 7, 6, 5, 4, 3, 2, 1];
        let map = eplb_placement(&load, 4, 2);
        let mut sorted = map.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
        let (_, ranks) = copies_and_rank_loads(&map, &load, 4);
        assert_eq!(ranks, [18.0, 18.0], "{map:?}");
    }
}
