//! A layer's routed experts as one fused MoE (`--moe-backend fused`), as vLLM's fused_moe runs
//! them: route on the device (`kernels/moe_routing.cu`), sort the (token, expert) entries by
//! expert into blocks of 64 (`moe_align`), one grouped GEMM over every expert's gate and up rows,
//! SiLU-and-mul, a second grouped GEMM over the down weights, and each token's weighted sum
//! (`kernels/fused_moe.cu`). Router logits stay on the GPU: no host sync per MoE layer.
//!
//! The experts' weights are stacked once at load (`[E, 2I, H]` gate then up rows, `[E, H, I]`
//! down; `I` is a tensor-parallel rank's share) and each expert's projections become views of
//! the stack, so the per-expert path (adapters, the fallback) holds no second copy. Dense f32 /
//! bf16 experts run the grouped GEMM (bf16 on tensor cores); experts held as stored (on CUDA)
//! run the grouped W8A16 GEMM over e4m3 bytes (FP8 checkpoints' block scales, online FP8;
//! `kernels/moe_w8a16.cu`) or the grouped W4A16 GEMM over 4-bit codes (INT4, GPTQ/AWQ without
//! activation order, NVFP4/MXFP4; `kernels/moe_w4a16.cu`).
//! On the CPU, dense and packed experts run ember-kernels' blocked CPU kernel (`moe_cpu`:
//! grouped by expert, each active expert's weights read once, on every core, packed ones decoded
//! in registers by `packed_cpu`; the CPU's default MoE); W8A8 experts run the references the
//! CUDA kernels are tested against.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use ember_core::{EmberError, Result};
use ember_kernels::fused_moe::{GroupedGemmShape, ScaleBlocks, W4Params};
use ember_kernels::moe_routing::RoutingConfig;

use crate::device::calls::{Kernel, KernelCalls};
use crate::layers::mlp::Mlp;
use crate::linear::quantized::packed::{PackedShape, PackedWeight};
use crate::linear::LinearLayer;
use crate::loading::context::LoadContext;
use crate::loading::weights::Weights;
use crate::step::mode::StepMode;
use crate::TensorResult;

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
use cuda::Cuda;

/// Rows of each expert block of the grouped GEMM (its tiles' height).
const BLOCK_M: usize = 64;

/// The stacked weights, dense or e4m3.
enum ExpertWeights {
    Dense {
        /// `[experts, 2 * inter, hidden]`: each expert's gate rows, then its up rows.
        w13: Tensor,
        /// `[experts, hidden, inter]`.
        w2: Tensor,
    },
    Packed(PackedExperts),
}

/// The experts' packed weights, stacked.
struct PackedExperts {
    kind: PackedKind,
    /// `[experts, gate/up bytes]` (u8): the gate's rows, then the up's.
    w13: Tensor,
    /// `[experts, gate/up parameters]` (f32): the gate's, then the up's.
    p13: Tensor,
    /// `[experts, down bytes]` and `[experts, down parameters]`.
    w2: Tensor,
    p2: Tensor,
    /// The model dtype the per-expert layers compute in.
    dtype: DType,
}

impl PackedExperts {
    /// What the kernels read: the gate/up bytes and parameters, the down bytes and parameters.
    fn stacked(&self) -> [&Tensor; 4] {
        [&self.w13, &self.p13, &self.w2, &self.p2]
    }
}

/// How packed experts are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PackedKind {
    /// e4m3 bytes with f32 block scales: the gate/up rows' blocks and the down rows'; `w8a8`:
    /// activations quantized to e4m3 per token and 128-input group, the grouped W8A8 GEMM.
    W8a16 {
        b13: ScaleBlocks,
        b2: ScaleBlocks,
        w8a8: bool,
    },
    /// 4-bit codes with an f32 (scale, zero) pair per group.
    W4a16(W4Params),
}

/// A layer's routed experts stacked for the grouped GEMMs.
pub struct StackedExperts {
    weights: ExpertWeights,
    experts: usize,
    inter: usize,
    hidden: usize,
    /// The layer's per-expert token counters (`/metrics`), when this copy counts: added to on
    /// the CPU; on a GPU the counts accumulate there and are drained into them when read.
    counts: Option<Arc<Vec<AtomicU64>>>,
    /// Where the layer's calls are counted.
    calls: Arc<KernelCalls>,
    #[cfg(feature = "cuda")]
    device_counts: Arc<std::sync::Mutex<Option<DeviceCounts>>>,
}

/// A fused layer's token counters on its GPU.
#[cfg(feature = "cuda")]
struct DeviceCounts {
    kernels: Arc<ember_kernels::cuda::CudaKernels>,
    counts: candle_core::cuda_backend::cudarc::driver::CudaSlice<u64>,
}

impl StackedExperts {
    /// Stacks `mlps` when every projection is a dense f32 or bf16 weight without a bias (the
    /// kernels' types), all of one dtype, or every one a packed weight alike (e4m3 whose gate and
    /// up rows stack on scale-block boundaries, or 4-bit of one encoding); `None` otherwise.
    pub fn stack(mlps: &[Arc<Mlp>]) -> TensorResult<Option<Self>> {
        match Self::stack_dense(mlps)? {
            Some(stack) => Ok(Some(stack)),
            None => Self::stack_packed(mlps),
        }
    }

    /// Stacks `mlps` when every projection is a dense f32 or bf16 weight without a bias, all of
    /// one dtype; `None` otherwise.
    pub fn stack_dense(mlps: &[Arc<Mlp>]) -> TensorResult<Option<Self>> {
        let mut gate_up = Vec::with_capacity(mlps.len());
        let mut down = Vec::with_capacity(mlps.len());
        for mlp in mlps {
            let Some((gate, up, d)) = mlp.dense_weights() else {
                return Ok(None);
            };
            gate_up.push(Tensor::cat(&[gate, up], 0)?);
            down.push(d);
        }
        let Some(first) = gate_up.first() else {
            return Ok(None);
        };
        let dtype = first.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16)
            || gate_up.iter().chain(&down).any(|t| t.dtype() != dtype)
        {
            return Ok(None);
        }
        let w13 = Tensor::stack(&gate_up, 0)?;
        let w2 = Tensor::stack(&down, 0)?;
        let (experts, hidden, inter) = w2.dims3()?;
        Ok(Some(Self::new(
            ExpertWeights::Dense { w13, w2 },
            experts,
            inter,
            hidden,
        )))
    }

    fn stack_packed(mlps: &[Arc<Mlp>]) -> TensorResult<Option<Self>> {
        let (mut w13, mut p13, mut w2, mut p2) = (vec![], vec![], vec![], vec![]);
        let mut layout: Option<(usize, usize, PackedKind, DType)> = None;
        for mlp in mlps {
            let Some([gate, up, down]) = mlp.packed_weights() else {
                return Ok(None);
            };
            let Some(this) = packed_layout(&gate, &up, &down) else {
                return Ok(None);
            };
            // Every expert alike.
            if layout.is_some_and(|l| l != this) {
                return Ok(None);
            }
            layout = Some(this);
            w13.push(Tensor::cat(&[&gate.bytes, &up.bytes], 0)?);
            p13.push(Tensor::cat(&[&gate.params, &up.params], 0)?);
            w2.push(down.bytes);
            p2.push(down.params);
        }
        let Some((inter, hidden, kind, dtype)) = layout else {
            return Ok(None);
        };
        let weights = ExpertWeights::Packed(PackedExperts {
            kind,
            w13: Tensor::stack(&w13, 0)?,
            p13: Tensor::stack(&p13, 0)?,
            w2: Tensor::stack(&w2, 0)?,
            p2: Tensor::stack(&p2, 0)?,
            dtype,
        });
        Ok(Some(Self::new(weights, mlps.len(), inter, hidden)))
    }

    fn new(weights: ExpertWeights, experts: usize, inter: usize, hidden: usize) -> Self {
        Self {
            weights,
            experts,
            inter,
            hidden,
            counts: None,
            calls: Arc::default(),
            #[cfg(feature = "cuda")]
            device_counts: Default::default(),
        }
    }

    /// The same stack, counting its calls in `calls`.
    pub(crate) fn with_calls(self, calls: Arc<KernelCalls>) -> Self {
        Self { calls, ..self }
    }

    /// The same stack, counting the tokens routed to each expert into `counts` (layer `layer`'s
    /// counters of `registry`).
    pub(crate) fn counting(
        self,
        counts: Arc<Vec<AtomicU64>>,
        registry: &crate::parallel::eplb::ExpertLoad,
        layer: usize,
    ) -> Self {
        #[cfg(feature = "cuda")]
        {
            let device_counts = self.device_counts.clone();
            registry.add_drain(
                layer,
                crate::parallel::eplb::CountDrain(Box::new(move || {
                    let mut held = device_counts.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(d) = held.as_mut() else {
                        return Vec::new();
                    };
                    let stream = d.kernels.stream();
                    match stream.clone_dtoh(&d.counts) {
                        Ok(host) => {
                            if let Err(e) = stream.memset_zeros(&mut d.counts) {
                                tracing::warn!("cannot reset the fused MoE's token counts: {e}");
                            }
                            host
                        }
                        Err(e) => {
                            tracing::warn!("cannot read the fused MoE's token counts: {e}");
                            Vec::new()
                        }
                    }
                })),
            );
        }
        #[cfg(not(feature = "cuda"))]
        let _ = (registry, layer);
        Self {
            counts: Some(counts),
            ..self
        }
    }

    /// Experts in the stack.
    pub fn len(&self) -> usize {
        self.experts
    }

    /// Whether the stack holds no expert (never: [`StackedExperts::stack`] refuses none).
    pub fn is_empty(&self) -> bool {
        self.experts == 0
    }

    /// Expert `k` of the layer as `original` is (module paths, tensor-parallel splits) over
    /// views of the stack; `experts_w` and `channels` as [`Mlp::from_weights`] takes them.
    pub fn expert_mlp(
        &self,
        k: usize,
        original: &Mlp,
        experts_w: &Weights,
        ctx: &LoadContext,
        channels: Option<(usize, usize)>,
    ) -> Result<Mlp> {
        let err = |e: candle_core::Error| {
            EmberError::Weights(format!("{}: stacking the experts: {e}", experts_w.prefix()))
        };
        let (i, h) = (self.inter, self.hidden);
        match &self.weights {
            ExpertWeights::Dense { w13, w2 } => {
                let views = || -> TensorResult<_> {
                    let gate_up = w13.get(k)?;
                    Ok((
                        (
                            gate_up.narrow(0, 0, i)?,
                            gate_up.narrow(0, i, i)?,
                            w2.get(k)?,
                        ),
                        gate_up,
                    ))
                };
                let (weights, gate_up) = views().map_err(err)?;
                // Adapters are shaped by the whole expert; the stack holds the rank's channels.
                let whole = original.intermediate_size();
                Mlp::from_weights(experts_w, ctx, k, weights, whole, channels, Some(gate_up))
            }
            ExpertWeights::Packed(packed) => {
                let PackedExperts { kind, w2, p2, .. } = packed;
                let views = || -> TensorResult<[Arc<dyn LinearLayer>; 3]> {
                    let (bytes13, params13) = (packed.w13.get(k)?, packed.p13.get(k)?);
                    let (gate_bytes, gate_params) = (bytes13.dim(0)? / 2, params13.dim(0)? / 2);
                    let (gate, up, down) = kind.shapes(i, h);
                    let part = |bytes: Tensor, params: Tensor, shape| {
                        PackedWeight {
                            bytes,
                            params,
                            shape,
                            dtype: packed.dtype,
                            w8a8: matches!(kind, PackedKind::W8a16 { w8a8: true, .. }),
                        }
                        .layer()
                    };
                    Ok([
                        part(
                            bytes13.narrow(0, 0, gate_bytes)?,
                            params13.narrow(0, 0, gate_params)?,
                            gate,
                        ),
                        part(
                            bytes13.narrow(0, gate_bytes, gate_bytes)?,
                            params13.narrow(0, gate_params, gate_params)?,
                            up,
                        ),
                        part(w2.get(k)?, p2.get(k)?, down),
                    ])
                };
                Ok(original.clone().with_bases(views().map_err(err)?))
            }
        }
    }

    /// The routed experts' output `[tokens, hidden]` for `x` `[tokens, hidden]` and its router
    /// logits `[tokens, experts]` (f32), routed by `routing` (`bias` `[experts]` f32: the
    /// correction bias of `noaux_tc`, ignored by the other methods).
    pub fn forward(
        &self,
        x: &Tensor,
        logits: &Tensor,
        routing: &RoutingConfig,
        bias: &Tensor,
        step: &StepMode,
    ) -> TensorResult {
        if x.dim(0)? == 0 {
            return x.zeros_like();
        }
        let x = x.contiguous()?;
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let op = FusedMoeOp {
            stack: self,
            bias,
            routing: *routing,
            placeholder: step.placeholder,
            #[cfg(feature = "cuda")]
            live_rows: step.live_rows(),
        };
        let y = x.apply_op2_no_bwd(&logits, &op)?;
        self.calls.count(Kernel::FusedMoe);
        Ok(y)
    }
}

struct FusedMoeOp<'a> {
    stack: &'a StackedExperts,
    bias: &'a Tensor,
    routing: RoutingConfig,
    /// An idle data-parallel rank's placeholder step: no expert load is counted.
    placeholder: bool,
    /// Under a CUDA graph, the device count of its live rows: the spare rows skip the experts.
    #[cfg(feature = "cuda")]
    live_rows: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>>,
}

impl FusedMoeOp<'_> {
    /// The two grouped GEMMs' shapes for `tokens` tokens.
    fn shapes(&self, tokens: usize) -> (GroupedGemmShape, GroupedGemmShape) {
        let up = GroupedGemmShape {
            num_experts: self.routing.num_experts,
            k_in: self.stack.hidden,
            n_out: 2 * self.stack.inter,
            block_m: BLOCK_M,
            x_div: self.routing.top_k,
            num_entries: tokens * self.routing.top_k,
        };
        let down = GroupedGemmShape {
            k_in: self.stack.inter,
            n_out: self.stack.hidden,
            x_div: 1,
            ..up
        };
        (up, down)
    }
}

/// A held tensor's CPU storage, or why it is elsewhere.
fn cpu_of(storage: &Storage) -> candle_core::Result<&CpuStorage> {
    match storage {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("fused MoE: a weight is not on the input's device"),
    }
}

/// A held tensor's CUDA storage, or why it is elsewhere.
#[cfg(feature = "cuda")]
fn cuda_of(storage: &Storage) -> candle_core::Result<&candle_core::CudaStorage> {
    match storage {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("fused MoE: a weight is not on the input's device"),
    }
}

/// The elements of a held CPU tensor.
fn held_slice<'s, T: candle_core::WithDType>(
    storage: &'s Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'s [T]> {
    crate::device::kernels::cpu_input(cpu_of(storage)?, layout, what)
}

/// The elements of a held CUDA tensor.
#[cfg(feature = "cuda")]
fn held_view<'s, T: candle_core::cuda_backend::CudaDType>(
    storage: &'s Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'s, T>> {
    crate::device::kernels::cuda_input(cuda_of(storage)?, layout, what)
}

impl CustomOp2 for FusedMoeOp<'_> {
    fn name(&self) -> &'static str {
        "ember-fused-moe"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        logits: &CpuStorage,
        logits_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(x, x_layout, logits, logits_layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        logits: &candle_core::CudaStorage,
        logits_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let wrap = candle_core::Error::wrap;
        let device = x.device().clone();
        let kernels = crate::device::kernels::kernels(&device)?;
        let tokens = x_layout.shape().dims2()?.0;
        let entries = tokens * self.routing.top_k;
        let (bias_guard, bias_layout) = self.bias.storage_and_layout();
        let bias = held_view::<f32>(&bias_guard, bias_layout, "router bias")?;
        let logits =
            logits
                .as_cuda_slice::<f32>()?
                .slice(crate::device::kernels::contiguous_range(
                    logits_layout,
                    "router logits",
                )?);
        let mut ids = device.alloc_zeros::<u32>(entries)?;
        let mut weights = device.alloc_zeros::<f32>(entries)?;
        // Under a CUDA graph, its spare rows skip the experts.
        let live = self.live_rows.clone();
        kernels
            .moe_routing(
                &logits,
                &bias,
                &self.routing,
                &mut ids,
                &mut weights,
                live.as_deref(),
            )
            .map_err(wrap)?;
        let align = kernels
            .moe_align(&ids.as_view(), self.routing.num_experts, BLOCK_M)
            .map_err(wrap)?;
        if self.stack.counts.is_some() && !self.placeholder {
            let mut held = self
                .stack
                .device_counts
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if held.is_none() {
                *held = Some(DeviceCounts {
                    kernels: kernels.clone(),
                    counts: device.alloc_zeros::<u64>(self.routing.num_experts)?,
                });
            }
            if let Some(d) = held.as_mut() {
                kernels
                    .count_experts(&mut d.counts, &ids.as_view())
                    .map_err(wrap)?;
            }
        }
        let x_range = crate::device::kernels::contiguous_range(x_layout, "fused MoE input")?;
        let run = Cuda {
            kernels: &kernels,
            device: &device,
            stack: self.stack,
            align: &align,
            weights: &weights,
            shapes: self.shapes(tokens),
        };
        let out = match x.dtype() {
            DType::F32 => candle_core::CudaStorage::wrap_cuda_slice(
                run.experts::<f32>(x, x_range)?,
                device.clone(),
            ),
            DType::BF16 => candle_core::CudaStorage::wrap_cuda_slice(
                run.experts::<half::bf16>(x, x_range)?,
                device.clone(),
            ),
            other => candle_core::bail!("fused MoE takes f32 or bf16 inputs, not {other:?}"),
        };
        Ok((out, Shape::from((tokens, self.stack.hidden))))
    }
}

impl PackedKind {
    /// Whether the experts multiply by the W8A8 GEMM (activations quantized to e4m3).
    fn w8a8(&self) -> bool {
        matches!(self, PackedKind::W8a16 { w8a8: true, .. })
    }

    /// The gate, up and down weights' shapes for `inter` channels over `hidden`.
    fn shapes(&self, inter: usize, hidden: usize) -> (PackedShape, PackedShape, PackedShape) {
        match *self {
            PackedKind::W8a16 { b13, b2, .. } => {
                let shape = |n, k, b: ScaleBlocks| {
                    PackedShape::W8a16(ember_kernels::w8a16::W8a16Shape {
                        m: 0,
                        n,
                        k,
                        block_n: b.block_n,
                        block_k: b.block_k,
                    })
                };
                (
                    shape(inter, hidden, b13),
                    shape(inter, hidden, b13),
                    shape(hidden, inter, b2),
                )
            }
            PackedKind::W4a16(p) => {
                let shape = |n, k| {
                    PackedShape::W4a16(ember_kernels::w4a16::W4a16Shape {
                        m: 0,
                        n,
                        k,
                        group_size: p.group_size,
                        f16_weights: p.f16_weights,
                        e2m1: p.e2m1,
                        zeros: p.zeros,
                        scales: p.scales,
                    })
                };
                (
                    shape(inter, hidden),
                    shape(inter, hidden),
                    shape(hidden, inter),
                )
            }
        }
    }
}

/// How one expert's packed gate, up and down weights stack: `(inter, hidden, kind, dtype)`, or
/// `None` when they do not. e4m3 gate/up rows must keep their scale blocks when stacked (whole
/// blocks of rows, or a single partial one, which then spans the gate's rows alone); 4-bit ones
/// must share one group size and encoding.
fn packed_layout(
    gate: &PackedWeight,
    up: &PackedWeight,
    down: &PackedWeight,
) -> Option<(usize, usize, PackedKind, DType)> {
    let same_dtype = gate.dtype == up.dtype && up.dtype == down.dtype;
    match (gate.shape, up.shape, down.shape) {
        (PackedShape::W8a16(g), PackedShape::W8a16(u), PackedShape::W8a16(d)) => {
            let blocks = |s: &ember_kernels::w8a16::W8a16Shape| ScaleBlocks {
                block_n: s.block_n,
                block_k: s.block_k,
            };
            let (inter, hidden) = (g.n, g.k);
            let b13 = if inter.is_multiple_of(g.block_n) {
                blocks(&g)
            } else if inter < g.block_n {
                ScaleBlocks {
                    block_n: inter,
                    ..blocks(&g)
                }
            } else {
                return None;
            };
            let fits = (u.n, u.k) == (inter, hidden)
                && blocks(&u) == blocks(&g)
                && (d.n, d.k) == (hidden, inter)
                && same_dtype
                && gate.w8a8 == up.w8a8
                && up.w8a8 == down.w8a8;
            fits.then_some((
                inter,
                hidden,
                PackedKind::W8a16 {
                    b13,
                    b2: blocks(&d),
                    w8a8: gate.w8a8,
                },
                gate.dtype,
            ))
        }
        (PackedShape::W4a16(g), PackedShape::W4a16(u), PackedShape::W4a16(d)) => {
            let (inter, hidden) = (g.n, g.k);
            let params = |s: &ember_kernels::w4a16::W4a16Shape| W4Params {
                group_size: s.group_size,
                f16_weights: s.f16_weights,
                e2m1: s.e2m1,
                zeros: s.zeros,
                scales: s.scales,
            };
            let fits = (u.n, u.k) == (inter, hidden)
                && params(&u) == params(&g)
                && params(&d) == params(&g)
                && (d.n, d.k) == (hidden, inter)
                && same_dtype;
            fits.then_some((inter, hidden, PackedKind::W4a16(params(&g)), gate.dtype))
        }
        _ => None,
    }
}
