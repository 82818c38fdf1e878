//! The sparse MoE block of Qwen3-MoE: softmax router, top-k experts per token (optionally
//! renormalised), each expert run once over the tokens routed to it, outputs scattered back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use candle_core::{DType, Tensor};
use ember_core::{EmberError, MoeConfig, Result};
use ember_kernels::moe_routing::{RoutingConfig, TopkMethod as KernelTopk};

use crate::fused_moe::{MoeBackend, StackedExperts};
use crate::linear::{load_linear, LinearLayer};
use crate::lora::{LoraRows, LoraTargets};
use crate::mlp::Mlp;
use crate::parallel::{expert_slots_per_rank, uneven_share, RankContext};
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
/// statistics of `/metrics`), shared by every rank's copy of a layer; under expert parallelism
/// also each rank's tokens and, per layer, where the experts' copies are ([`ExpertPlacement`]).
#[derive(Debug, Default)]
pub struct ExpertLoad {
    layers: Mutex<BTreeMap<usize, Arc<Vec<AtomicU64>>>>,
    /// Counts kept elsewhere (a fused MoE layer's, on its GPU), drained into `layers` when read.
    drains: Mutex<Vec<(usize, CountDrain)>>,
    /// Under expert parallelism, tokens each rank's experts processed (all layers).
    rank_tokens: OnceLock<Vec<AtomicU64>>,
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
    fn layer(&self, layer: usize, experts: usize) -> Arc<Vec<AtomicU64>> {
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .entry(layer)
            .or_insert_with(|| Arc::new((0..experts).map(|_| AtomicU64::new(0)).collect()))
            .clone()
    }

    /// Layer `layer`'s placement of `experts` experts over `world` ranks of `slots` slots each
    /// (created on first use: expert `p % experts` in slot `p`, so the copies beyond the
    /// experts start as experts 0, 1, …).
    fn placement(
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
    map: RwLock<Arc<Vec<usize>>>,
    /// Bumped at each change, so each rank knows to reload its slots.
    version: AtomicU64,
    /// The layer's per-expert token counts at the last rebalance (its window starts there).
    window_start: Mutex<Vec<u64>>,
    slots_per_rank: usize,
}

impl ExpertPlacement {
    fn map(&self) -> Arc<Vec<usize>> {
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
    /// Zeros `[experts]` f32 on the device (the routing kernel's unused bias) when the experts
    /// are stacked for the fused MoE.
    fused_bias: Option<Tensor>,
}

impl SparseMoe {
    /// Loads the router `gate` and the experts (see [`load_experts`]).
    pub fn load(weights: &Weights, hidden: usize, moe: &MoeConfig) -> Result<Self> {
        let (e, i) = (moe.num_experts, moe.moe_intermediate_size);
        let gate = load_linear(&weights.pp("gate"), hidden, e, false)?;
        let experts = load_experts(&weights.pp("experts"), hidden, e, i)?;
        let fused_bias = experts
            .is_stacked()
            .then(|| Tensor::zeros(e, DType::F32, weights.device()))
            .transpose()
            .map_err(|err| EmberError::Tensor(err.to_string()))?;
        Ok(Self {
            gate,
            experts,
            fused_bias,
            top_k: moe.num_experts_per_tok,
            norm_topk_prob: moe.norm_topk_prob,
        })
    }

    /// Applies the block to `[tokens, hidden]`, each row with its adapter.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows) -> TensorResult {
        let logits = self.gate.forward(x)?.to_dtype(DType::F32)?;
        if let Some(bias) = &self.fused_bias {
            let routing = RoutingConfig {
                num_experts: self.experts.num_experts,
                top_k: self.top_k,
                n_group: 1,
                topk_group: 1,
                method: KernelTopk::Greedy,
                sigmoid: false,
                renormalize: self.norm_topk_prob,
                scaling: 1.0,
            };
            if let Some(y) = self.experts.run_fused(x, &logits, &routing, bias, lora)? {
                return Ok(y);
            }
        }
        let logits = logits.to_vec2::<f32>()?;
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
    /// share of its intermediate channels), or under expert parallelism those of its slots.
    slots: RwLock<RankSlots>,
    /// Experts in the layer, on all ranks together.
    pub num_experts: usize,
    /// Set under expert parallelism: the rank holds whole experts, tokens travel to them.
    expert_parallel: Option<Box<ExpertParallel>>,
    /// Tokens routed to each expert of the layer (all ranks' copies share them).
    load: Arc<Vec<AtomicU64>>,
    /// Whether this copy counts: every rank under expert parallelism (each its own experts'
    /// tokens), rank 0 alone under tensor parallelism (every rank routes every token).
    counts_load: bool,
    /// The experts stacked for the fused MoE (`--moe-backend fused`, dense experts, not expert
    /// parallel); the slots' MLPs are then views of it.
    stacked: Option<StackedExperts>,
}

/// The experts one rank holds, slot by slot, as loaded for one version of the placement.
struct RankSlots {
    version: u64,
    /// The expert in each slot.
    experts: Vec<usize>,
    mlps: Vec<Arc<Mlp>>,
}

impl RankSlots {
    /// None yet: [`RankSlots::load`] fills every slot.
    fn empty() -> Self {
        Self {
            version: u64::MAX,
            experts: Vec::new(),
            mlps: Vec::new(),
        }
    }

    /// The slots of `ep`'s rank under placement `version`: the experts `held` already has are
    /// kept, the others read from the checkpoint.
    fn load(ep: &ExpertParallel, version: u64, held: &RankSlots) -> Result<Self> {
        let per_rank = ep.placement.slots_per_rank;
        let rank = ep.ctx.rank();
        let experts = ep.placement.map()[rank * per_rank..(rank + 1) * per_rank].to_vec();
        let mut mlps: Vec<Arc<Mlp>> = Vec::with_capacity(per_rank);
        for &x in &experts {
            mlps.push(match held.experts.iter().position(|&h| h == x) {
                Some(j) => held.mlps[j].clone(),
                None => Arc::new(ep.source.load(x)?),
            });
        }
        Ok(Self {
            version,
            experts,
            mlps,
        })
    }
}

/// What a rank needs under expert parallelism: its group, the layer's placement, and where to
/// read an expert the placement moves to it.
struct ExpertParallel {
    /// The ranks the experts are partitioned over (placement, dispatch and return).
    ctx: RankContext,
    /// The ranks that hold the same tokens, which split them and gather the results: all of
    /// `ctx`'s under expert parallelism alone, the rank's tensor-parallel replica over
    /// replicas, none under data parallelism (each rank brings its own tokens).
    share: Option<Arc<dyn crate::parallel::Communicator>>,
    placement: Arc<ExpertPlacement>,
    registry: Arc<ExpertLoad>,
    source: ExpertSource,
}

/// The checkpoint tensors of a layer's experts (memory-mapped: reading one expert reads its bytes).
struct ExpertSource {
    weights: Weights,
    hidden: usize,
    intermediate: usize,
    experts: usize,
}

impl ExpertSource {
    /// Expert `x`, whole.
    fn load(&self, x: usize) -> Result<Mlp> {
        let (w, i, hidden) = (&self.weights, self.intermediate, self.hidden);
        if !is_fused(w) {
            return Mlp::load_split(&w.pp(x), hidden, i, None);
        }
        let fused_err =
            |err: candle_core::Error| EmberError::Weights(format!("fused experts: {err}"));
        let e = self.experts;
        let gate_up = w.get_slice("gate_up_proj", (e, 2 * i, hidden), 0, x, 1)?;
        let down = w.get_slice("down_proj", (e, hidden, i), 0, x, 1)?;
        let part = |t: &Tensor, start: usize, len: usize| {
            t.get(0)
                .and_then(|t| t.narrow(0, start, len))
                .and_then(|t| t.contiguous())
                .map_err(fused_err)
        };
        let down = down
            .get(0)
            .and_then(|t| t.contiguous())
            .map_err(fused_err)?;
        Mlp::from_weights(
            w,
            x,
            (part(&gate_up, 0, i)?, part(&gate_up, i, i)?, down),
            i,
            None,
            None,
        )
    }
}

/// Whether the experts are stored fused (`gate_up_proj`, `down_proj`) rather than one by one.
fn is_fused(experts_w: &Weights) -> bool {
    experts_w.contains("gate_up_proj") && !experts_w.contains("0.gate_proj.weight")
}

impl Experts {
    /// Runs each expert once over the rows routed to it and scatter-adds the weighted outputs.
    /// Under expert parallelism the result is whole on every rank; under tensor parallelism it
    /// is this rank's partial sum.
    pub fn run(&self, routing: &ExpertRouting, x: &Tensor, lora: &LoraRows) -> TensorResult {
        match &self.expert_parallel {
            None => {
                if self.counts_load && !crate::sharded::placeholder_step() {
                    for (count, (rows, _)) in self.load.iter().zip(&routing.per_expert) {
                        count.fetch_add(rows.len() as u64, Ordering::Relaxed);
                    }
                }
                let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
                run_experts(&slots.mlps, routing, x, lora)
            }
            Some(ep) => self.run_expert_parallel(ep, routing, x, lora),
        }
    }

    /// The routed experts' output through the fused MoE (see [`crate::fused_moe`]) for `x` and
    /// its router `logits` `[tokens, experts]`, routed by `routing` (`bias` `[experts]` f32), as
    /// [`Experts::run`] would give it; `None` where the fused MoE does not serve this layer (not
    /// stacked) or this step (an adapter of the step adapts these experts).
    pub fn run_fused(
        &self,
        x: &Tensor,
        logits: &Tensor,
        routing: &RoutingConfig,
        bias: &Tensor,
        lora: &LoraRows,
    ) -> TensorResult<Option<Tensor>> {
        match &self.stacked {
            Some(stack) if !lora.adapts_under(&self.path) => {
                stack.forward(x, logits, routing, bias).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Whether the experts are stacked for the fused MoE.
    pub fn is_stacked(&self) -> bool {
        self.stacked.is_some()
    }

    /// Whether [`Experts::run`] returns a partial sum that the ranks must add up.
    pub fn output_is_partial(&self, rank: Option<&RankContext>) -> bool {
        rank.is_some() && self.expert_parallel.is_none()
    }

    /// Brings this rank's slots up to the placement's version (see [`RankSlots::load`]).
    fn refresh_slots(&self, ep: &ExpertParallel) -> TensorResult<()> {
        let version = ep.placement.version.load(Ordering::Acquire);
        if self.slots.read().unwrap_or_else(|p| p.into_inner()).version == version {
            return Ok(());
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        *slots = RankSlots::load(ep, version, &slots).map_err(candle_core::Error::wrap)?;
        Ok(())
    }

    /// Expert parallelism: each rank sends the rows of its share of the step's tokens to the
    /// ranks holding a copy of their experts (all-to-all; with several copies, row `r` goes to
    /// copy `r % copies`), runs its slots' experts over what it received, sends the weighted
    /// outputs back (all-to-all), adds them up for its rows, and the shares are gathered so every
    /// rank holds the whole result. Routing is computed on every rank alike. Each row travels
    /// with its index in the step, so the owner applies the row's adapter (every rank holds the
    /// step's `lora` rows alike).
    fn run_expert_parallel(
        &self,
        ep: &ExpertParallel,
        routing: &ExpertRouting,
        x: &Tensor,
        lora: &LoraRows,
    ) -> TensorResult {
        self.refresh_slots(ep)?;
        let ctx = &ep.ctx;
        let (tokens, hidden) = x.dims2()?;
        let (world, device, dtype) = (ctx.world_size(), x.device(), x.dtype());
        // Under data parallelism every rank brings its own tokens; else each takes a share of
        // the tokens its sharing ranks hold alike.
        let (first, mine) = match &ep.share {
            None => (0, tokens),
            Some(share) => uneven_share(tokens, share.rank(), share.world_size()),
        };
        let per_rank = ep.placement.slots_per_rank;
        let mut copies: Vec<Vec<usize>> = vec![Vec::new(); self.num_experts];
        for (slot, &expert) in ep.placement.map().iter().enumerate() {
            copies[expert].push(slot);
        }
        let mut send_rows: Vec<Vec<u32>> = vec![Vec::new(); world];
        let mut send_meta: Vec<Vec<f32>> = vec![Vec::new(); world];
        // An idle data-parallel rank's placeholder token goes to no expert (its output is
        // dropped): the rank only takes part in the all-to-alls.
        let placeholder = crate::sharded::placeholder_step();
        for (expert, (rows, weights)) in routing
            .per_expert
            .iter()
            .enumerate()
            .filter(|_| !placeholder)
        {
            let slots = &copies[expert];
            for (&row, &weight) in rows.iter().zip(weights) {
                if (first..first + mine).contains(&(row as usize)) {
                    let slot = slots[row as usize % slots.len()];
                    let owner = slot / per_rank;
                    send_rows[owner].push(row);
                    // f32 holds row indices exactly up to 2^24 tokens a step.
                    send_meta[owner].extend([
                        (slot - owner * per_rank) as f32,
                        weight,
                        lora.step_row(row) as f32,
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

        // Everything received, as one batch of rows for the local slots.
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
                let slot = &mut local.per_expert[triple[0] as usize];
                slot.0.push(row);
                slot.1.push(triple[1]);
                step_rows.push(triple[2] as u32);
                row += 1;
            }
        }
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        for (&expert, (rows, _)) in slots.experts.iter().zip(&local.per_expert) {
            self.load[expert].fetch_add(rows.len() as u64, Ordering::Relaxed);
        }
        if let Some(rank_tokens) = ep.registry.rank_tokens.get() {
            rank_tokens[ctx.rank()].fetch_add(u64::from(row), Ordering::Relaxed);
        }
        let received: Vec<Tensor> = hidden_in
            .into_iter()
            .filter(|t| t.dim(0).is_ok_and(|n| n > 0))
            .collect();
        let outputs = if received.is_empty() {
            Tensor::zeros((0, hidden), dtype, device)?
        } else {
            run_experts(
                &slots.mlps,
                &local,
                &Tensor::cat(&received, 0)?,
                &lora.select_step_rows(&step_rows, device)?,
            )?
        };
        drop(slots);
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
        match &ep.share {
            None => Ok(combined),
            Some(share) => share.all_gather(&combined, 0),
        }
    }

    /// Records every expert's projections, and the container for fused expert adapters.
    pub fn register(&self, targets: &mut LoraTargets) {
        // All of the layer's experts: fused adapters split over them whichever rank runs each.
        targets.add_experts(&self.path, self.num_experts);
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        for expert in &slots.mlps {
            expert.register(targets);
        }
    }
}

/// Loads `e` experts of intermediate size `i`, either one tensor per expert (Hub layout,
/// `experts.{e}.gate_proj.weight`) or fused (`experts.gate_up_proj`, `experts.down_proj`). On a
/// rank of a sharded model: under expert parallelism the whole experts of the rank's slots (see
/// [`ExpertPlacement`]), else every expert's share of the intermediate channels (see
/// [`Mlp::load_split`]).
pub fn load_experts(experts_w: &Weights, hidden: usize, e: usize, i: usize) -> Result<Experts> {
    let path = experts_w.prefix().to_string();
    let rank = experts_w.rank();
    let registry = experts_w.expert_load();
    let load = registry.layer(layer_index(&path), e);
    if let Some(rank_ctx) = experts_w.expert_rank().filter(|r| r.expert_parallel) {
        // Dispatch over every rank holding experts; split tokens with the ranks holding the same.
        let ctx = RankContext {
            comm: rank_ctx
                .experts_comm
                .clone()
                .unwrap_or_else(|| rank_ctx.comm.clone()),
            ..rank_ctx.clone()
        };
        let share = (!rank_ctx.data_parallel).then(|| rank_ctx.comm.clone());
        let ctx = &ctx;
        let world = ctx.world_size();
        let per_rank = expert_slots_per_rank(e, ctx.redundant_experts, world)?;
        let placement = registry.placement(layer_index(&path), e, per_rank, world);
        let source = ExpertSource {
            weights: experts_w.clone(),
            hidden,
            intermediate: i,
            experts: e,
        };
        let ep = ExpertParallel {
            ctx: ctx.clone(),
            share,
            placement,
            registry: registry.clone(),
            source,
        };
        let version = ep.placement.version.load(Ordering::Acquire);
        let slots = RankSlots::load(&ep, version, &RankSlots::empty())?;
        return Ok(Experts {
            slots: RwLock::new(slots),
            load,
            counts_load: true,
            path,
            num_experts: e,
            expert_parallel: Some(Box::new(ep)),
            stacked: None,
        });
    }
    let channels = match rank {
        Some(ctx) => Some(ctx.even_share(i, "moe_intermediate_size")?),
        None => None,
    };
    let mlps = if is_fused(experts_w) {
        let fused_err =
            |err: candle_core::Error| EmberError::Weights(format!("fused experts: {err}"));
        // Only the rank's part is read: every expert's share of the intermediate channels
        // (tensor parallel), gate rows first then up rows.
        let (gate_up_shape, down_shape) = ((e, 2 * i, hidden), (e, hidden, i));
        let (gate, up, down) = match channels {
            Some((c0, cn)) => (
                experts_w.get_slice("gate_up_proj", gate_up_shape, 1, c0, cn)?,
                experts_w.get_slice("gate_up_proj", gate_up_shape, 1, i + c0, cn)?,
                experts_w.get_slice("down_proj", down_shape, 2, c0, cn)?,
            ),
            None => {
                let gate_up = experts_w.get_slice("gate_up_proj", gate_up_shape, 0, 0, e)?;
                let (gate, up) = (
                    gate_up.narrow(1, 0, i).map_err(fused_err)?,
                    gate_up.narrow(1, i, i).map_err(fused_err)?,
                );
                let down = experts_w.get_slice("down_proj", down_shape, 0, 0, e)?;
                (gate, up, down)
            }
        };
        (0..e)
            .map(|k| {
                let expert = |t: &Tensor| t.get(k).and_then(|t| t.contiguous()).map_err(fused_err);
                Mlp::from_weights(
                    experts_w,
                    k,
                    (expert(&gate)?, expert(&up)?, expert(&down)?),
                    i,
                    channels,
                    None,
                )
                .map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        (0..e)
            .map(|x| Mlp::load_split(&experts_w.pp(x), hidden, i, channels).map(Arc::new))
            .collect::<Result<_>>()?
    };
    let counts_load = rank.is_none_or(|r| r.rank() == 0);
    let (mlps, stacked) = match experts_w.moe_backend() {
        MoeBackend::Fused => stack_experts(experts_w, mlps, channels)?,
        MoeBackend::Experts => (mlps, None),
    };
    // A fused layer counts its tokens itself (the routing never leaves the device).
    let stacked = stacked.map(|s| {
        if counts_load {
            s.counting(load.clone(), registry, layer_index(&path))
        } else {
            s
        }
    });
    Ok(Experts {
        stacked,
        slots: RwLock::new(RankSlots {
            version: 0,
            experts: (0..e).collect(),
            mlps,
        }),
        load,
        counts_load,
        path,
        num_experts: e,
        expert_parallel: None,
    })
}

/// The layer's experts stacked for the fused MoE, and MLPs over views of the stack in place of
/// `mlps`; `mlps` unchanged (and no stack) when the experts do not stack (see
/// [`StackedExperts::stack`]).
fn stack_experts(
    experts_w: &Weights,
    mlps: Vec<Arc<Mlp>>,
    channels: Option<(usize, usize)>,
) -> Result<(Vec<Arc<Mlp>>, Option<StackedExperts>)> {
    let err = |e: candle_core::Error| {
        EmberError::Weights(format!("{}: stacking the experts: {e}", experts_w.prefix()))
    };
    let Some(stack) = StackedExperts::stack(&mlps).map_err(err)? else {
        tracing::info!(
            experts = experts_w.prefix(),
            "--moe-backend fused: the experts are neither dense f32/bf16 nor e4m3 held as stored; they run one by one"
        );
        return Ok((mlps, None));
    };
    let views = mlps
        .iter()
        .enumerate()
        .map(|(k, mlp)| stack.expert_mlp(k, mlp, experts_w, channels).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    Ok((views, Some(stack)))
}

/// Runs each expert once over the rows routed to it and scatter-adds the weighted outputs; each
/// row keeps its adapter inside the expert.
pub fn run_experts(
    experts: &[Arc<Mlp>],
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
