//! A layer's routed experts: loading them (one tensor per expert or fused, a rank's share or
//! whole experts under expert parallelism), and running each expert once over the rows routed
//! to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::Tensor;
use ember_core::{EmberError, Result};
use ember_kernels::moe_routing::RoutingConfig;

use crate::backends::MoeBackend;
use crate::layers::mlp::Mlp;
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::lora::{LoraRows, LoraTargets};
use crate::moe::fused::StackedExperts;
use crate::moe::router::ExpertRouting;
use crate::parallel::eplb::{layer_index, ExpertLoad, ExpertPlacement};
use crate::parallel::{expert_slots_per_rank, uneven_share, RankContext};
use crate::step::mode::StepMode;
use crate::TensorResult;

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
    /// The experts stacked for the fused MoE (`--moe-backend fused`, or on the CPU `auto`; not
    /// expert parallel); the slots' MLPs are then views of it.
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
    /// What the experts are loaded for (their rank's backends and options).
    ctx: LoadContext,
}

impl ExpertSource {
    /// Expert `x`, whole.
    fn load(&self, x: usize) -> Result<Mlp> {
        let (w, ctx, i, hidden) = (&self.weights, &self.ctx, self.intermediate, self.hidden);
        if !is_fused(w) {
            return Mlp::load_split(&w.pp(x), ctx, hidden, i, None);
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
            ctx,
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
    pub fn run(
        &self,
        routing: &ExpertRouting,
        x: &Tensor,
        lora: &LoraRows,
        step: &StepMode,
    ) -> TensorResult {
        match &self.expert_parallel {
            None => {
                if self.counts_load && !step.placeholder {
                    for (count, (rows, _)) in self.load.iter().zip(&routing.per_expert) {
                        count.fetch_add(rows.len() as u64, Ordering::Relaxed);
                    }
                }
                let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
                run_experts(&slots.mlps, routing, x, lora)
            }
            Some(ep) => self.run_expert_parallel(ep, routing, x, lora, step),
        }
    }

    /// The routed experts' output through the fused MoE (see [`crate::moe::fused`]) for `x` and
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
        step: &StepMode,
    ) -> TensorResult<Option<Tensor>> {
        match &self.stacked {
            Some(stack) if !lora.adapts_under(&self.path) => {
                stack.forward(x, logits, routing, bias, step).map(Some)
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
        step: &StepMode,
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
        for (expert, (rows, weights)) in routing
            .per_expert
            .iter()
            .enumerate()
            .filter(|_| !step.placeholder)
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
pub fn load_experts(
    experts_w: &Weights,
    ctx: &LoadContext,
    hidden: usize,
    e: usize,
    i: usize,
) -> Result<Experts> {
    let path = experts_w.prefix().to_string();
    let rank = ctx.rank();
    let registry = &ctx.expert_load;
    let load = registry.layer(layer_index(&path), e);
    if let Some(rank_ctx) = ctx.expert_rank().filter(|r| r.expert_parallel) {
        // Dispatch over every rank holding experts; split tokens with the ranks holding the same.
        let dispatch = RankContext {
            comm: rank_ctx
                .experts_comm
                .clone()
                .unwrap_or_else(|| rank_ctx.comm.clone()),
            ..rank_ctx.clone()
        };
        let share = (!rank_ctx.data_parallel).then(|| rank_ctx.comm.clone());
        let world = dispatch.world_size();
        let per_rank = expert_slots_per_rank(e, dispatch.redundant_experts, world)?;
        let placement = registry.placement(layer_index(&path), e, per_rank, world);
        let source = ExpertSource {
            weights: experts_w.clone(),
            hidden,
            intermediate: i,
            experts: e,
            ctx: ctx.clone(),
        };
        let ep = ExpertParallel {
            ctx: dispatch,
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
        Some(r) => Some(r.even_share(i, "moe_intermediate_size")?),
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
                    ctx,
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
            .map(|x| Mlp::load_split(&experts_w.pp(x), ctx, hidden, i, channels).map(Arc::new))
            .collect::<Result<_>>()?
    };
    let counts_load = rank.is_none_or(|r| r.rank() == 0);
    let (mlps, stacked) = match ctx.backends.moe {
        // The CPU's default too: dense and packed experts run as the blocked CPU kernel.
        MoeBackend::Fused => stack_experts(experts_w, ctx, mlps, channels)?,
        MoeBackend::Auto if experts_w.device().is_cpu() => {
            stack_experts(experts_w, ctx, mlps, channels)?
        }
        MoeBackend::Auto | MoeBackend::Experts => (mlps, None),
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
    ctx: &LoadContext,
    mlps: Vec<Arc<Mlp>>,
    channels: Option<(usize, usize)>,
) -> Result<(Vec<Arc<Mlp>>, Option<StackedExperts>)> {
    let err = |e: candle_core::Error| {
        EmberError::Weights(format!("{}: stacking the experts: {e}", experts_w.prefix()))
    };
    let Some(stack) = StackedExperts::stack(&mlps).map_err(err)? else {
        tracing::info!(
            experts = experts_w.prefix(),
            "the fused MoE does not serve these experts (neither dense f32/bf16 nor packed alike, \
             or inputs gathered in activation order); they run one by one"
        );
        return Ok((mlps, None));
    };
    let stack = stack.with_calls(ctx.kernel_calls.clone());
    let views = mlps
        .iter()
        .enumerate()
        .map(|(k, mlp)| {
            stack
                .expert_mlp(k, mlp, experts_w, ctx, channels)
                .map(Arc::new)
        })
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
