//! A layer's routed experts as one fused MoE (`--moe-backend fused`), as vLLM's fused_moe runs
//! them: route on the device (`kernels/moe_routing.cu`), sort the (token, expert) entries by
//! expert into blocks of 64 (`moe_align`), one grouped GEMM over every expert's gate and up rows,
//! SiLU-and-mul, a second grouped GEMM over the down weights, and each token's weighted sum
//! (`kernels/fused_moe.cu`). Router logits stay on the GPU: no host sync per MoE layer.
//!
//! The experts' weights are stacked once at load (`[E, 2I, H]` gate then up rows, `[E, H, I]`
//! down; `I` is a tensor-parallel rank's share) and each expert's projections become views of
//! the stack, so the per-expert path (adapters, the fallback) holds no second copy.
//! On the CPU the same op runs ember-kernels' references, the oracle the CUDA kernels are tested
//! against; it is there to test the wiring, not to be fast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use ember_core::{EmberError, Result};
use ember_kernels::fused_moe::{self, GroupedGemmShape, MoeAlignment};
use ember_kernels::moe_routing::{self, RoutingConfig};
use ember_kernels::{silu_and_mul, Element};

use crate::mlp::Mlp;
use crate::TensorResult;

/// Layers run through the fused MoE since start (tests check the path they mean is taken).
static CALLS: AtomicU64 = AtomicU64::new(0);

/// How many layer calls the fused MoE has served in this process.
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Rows of each expert block of the grouped GEMM (its tiles' height).
const BLOCK_M: usize = 64;

/// Which implementation runs a layer's routed experts (`--moe-backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MoeBackend {
    /// Each expert's MLP over the rows routed to it, routed on the host: the default until the
    /// fused kernels have been run on a GPU.
    #[default]
    Experts,
    /// The fused MoE above where it serves the layer (dense f32/bf16 experts, not expert
    /// parallel, no adapter on the experts in the step); elsewhere as `Experts`.
    Fused,
}

impl MoeBackend {
    /// Parses `--moe-backend`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "experts" | "auto" => Ok(Self::Experts),
            "fused" => Ok(Self::Fused),
            other => Err(EmberError::Config(format!(
                "unknown --moe-backend {other:?}; use experts or fused"
            ))),
        }
    }
}

/// A layer's routed experts stacked for the grouped GEMMs.
pub struct StackedExperts {
    /// `[experts, 2 * inter, hidden]`: each expert's gate rows, then its up rows.
    w13: Tensor,
    /// `[experts, hidden, inter]`.
    w2: Tensor,
    inter: usize,
}

impl StackedExperts {
    /// Stacks `mlps` when every projection is a dense f32 or bf16 weight without a bias (the
    /// kernels' types), all of one dtype; `None` otherwise (held quantized, say).
    pub fn stack(mlps: &[Arc<Mlp>]) -> TensorResult<Option<Self>> {
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
        let inter = w2.dim(2)?;
        Ok(Some(Self { w13, w2, inter }))
    }

    /// Experts in the stack.
    pub fn len(&self) -> usize {
        self.w13.dims().first().copied().unwrap_or(0)
    }

    /// Whether the stack holds no expert (never: [`StackedExperts::stack`] refuses none).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert `k`'s gate and up rows `[2 · inter, hidden]`: a view of the stack.
    pub fn gate_up(&self, k: usize) -> TensorResult {
        self.w13.get(k)
    }

    /// Expert `k`'s gate `[inter, hidden]`, up and down `[hidden, inter]` weights: views of
    /// the stack.
    pub fn expert(&self, k: usize) -> TensorResult<(Tensor, Tensor, Tensor)> {
        let gate_up = self.w13.get(k)?;
        Ok((
            gate_up.narrow(0, 0, self.inter)?,
            gate_up.narrow(0, self.inter, self.inter)?,
            self.w2.get(k)?,
        ))
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
    ) -> TensorResult {
        if x.dim(0)? == 0 {
            return x.zeros_like();
        }
        let x = x.contiguous()?;
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let op = FusedMoeOp {
            w13: &self.w13,
            w2: &self.w2,
            bias,
            routing: *routing,
            inter: self.inter,
            hidden: self.w2.dim(1)?,
        };
        let y = x.apply_op2_no_bwd(&logits, &op)?;
        CALLS.fetch_add(1, Ordering::Relaxed);
        Ok(y)
    }
}

struct FusedMoeOp<'a> {
    w13: &'a Tensor,
    w2: &'a Tensor,
    bias: &'a Tensor,
    routing: RoutingConfig,
    inter: usize,
    hidden: usize,
}

impl FusedMoeOp<'_> {
    /// The two grouped GEMMs' shapes for `tokens` tokens.
    fn shapes(&self, tokens: usize) -> (GroupedGemmShape, GroupedGemmShape) {
        let up = GroupedGemmShape {
            num_experts: self.routing.num_experts,
            k_in: self.hidden,
            n_out: 2 * self.inter,
            block_m: BLOCK_M,
            x_div: self.routing.top_k,
            num_entries: tokens * self.routing.top_k,
        };
        let down = GroupedGemmShape {
            k_in: self.inter,
            n_out: self.hidden,
            x_div: 1,
            ..up
        };
        (up, down)
    }
}

/// The fused MoE on the CPU references, after routing.
fn experts_cpu<T: Element + candle_core::WithDType>(
    x: &[T],
    w13: &[T],
    w2: &[T],
    align: &MoeAlignment,
    weights: &[f32],
    (up, down): (GroupedGemmShape, GroupedGemmShape),
) -> std::result::Result<Vec<T>, ember_kernels::KernelError> {
    let zero = T::from_f32(0.0);
    let mut h = vec![zero; up.num_entries * up.n_out];
    fused_moe::grouped_gemm(&mut h, x, w13, align, &up)?;
    let mut act = vec![zero; up.num_entries * down.k_in];
    silu_and_mul::silu_and_mul(&h, down.k_in, &mut act)?;
    let mut y = vec![zero; down.num_entries * down.n_out];
    fused_moe::grouped_gemm(&mut y, &act, w2, align, &down)?;
    let mut out = vec![zero; up.num_entries / up.x_div * down.n_out];
    fused_moe::moe_sum(&mut out, &y, weights, up.x_div, down.n_out)?;
    Ok(out)
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
        let wrap = candle_core::Error::wrap;
        let logits =
            &logits.as_slice::<f32>()?[crate::contiguous_range(logits_layout, "router logits")?];
        let tokens = x_layout.shape().dims2()?.0;
        let entries = tokens * self.routing.top_k;
        let (bias, bias_layout) = self.bias.storage_and_layout();
        let bias = &cpu_of(&bias)?.as_slice::<f32>()?
            [crate::contiguous_range(bias_layout, "router bias")?];
        let (mut ids, mut weights) = (vec![0u32; entries], vec![0f32; entries]);
        moe_routing::route(logits, bias, &self.routing, &mut ids, &mut weights).map_err(wrap)?;
        let align = fused_moe::moe_align(&ids, self.routing.num_experts, BLOCK_M).map_err(wrap)?;
        let (w13_guard, w13_layout) = self.w13.storage_and_layout();
        let (w2_guard, w2_layout) = self.w2.storage_and_layout();
        let (w13, w2) = (cpu_of(&w13_guard)?, cpu_of(&w2_guard)?);
        let x_range = crate::contiguous_range(x_layout, "fused MoE input")?;
        let w13_range = crate::contiguous_range(w13_layout, "stacked gate/up weights")?;
        let w2_range = crate::contiguous_range(w2_layout, "stacked down weights")?;
        let shapes = self.shapes(tokens);
        let out = match (x, w13, w2) {
            (CpuStorage::F32(x), CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(
                experts_cpu(
                    &x[x_range],
                    &a[w13_range],
                    &b[w2_range],
                    &align,
                    &weights,
                    shapes,
                )
                .map_err(wrap)?,
            ),
            (CpuStorage::BF16(x), CpuStorage::BF16(a), CpuStorage::BF16(b)) => CpuStorage::BF16(
                experts_cpu(
                    &x[x_range],
                    &a[w13_range],
                    &b[w2_range],
                    &align,
                    &weights,
                    shapes,
                )
                .map_err(wrap)?,
            ),
            _ => candle_core::bail!(
                "fused MoE takes f32 or bf16 inputs of the experts' dtype, not {:?}",
                candle_core::backend::BackendStorage::dtype(x)
            ),
        };
        Ok((out, Shape::from((tokens, self.hidden))))
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
        let kernels = crate::cuda_attention::kernels(&device)?;
        let tokens = x_layout.shape().dims2()?.0;
        let entries = tokens * self.routing.top_k;
        let (bias_guard, bias_layout) = self.bias.storage_and_layout();
        let bias = cuda_of(&bias_guard)?
            .as_cuda_slice::<f32>()?
            .slice(crate::contiguous_range(bias_layout, "router bias")?);
        let logits = logits
            .as_cuda_slice::<f32>()?
            .slice(crate::contiguous_range(logits_layout, "router logits")?);
        let mut ids = device.alloc_zeros::<u32>(entries)?;
        let mut weights = device.alloc_zeros::<f32>(entries)?;
        kernels
            .moe_routing(&logits, &bias, &self.routing, &mut ids, &mut weights)
            .map_err(wrap)?;
        let align = kernels
            .moe_align(&ids.as_view(), self.routing.num_experts, BLOCK_M)
            .map_err(wrap)?;
        let (w13_guard, w13_layout) = self.w13.storage_and_layout();
        let (w2_guard, w2_layout) = self.w2.storage_and_layout();
        let (w13, w2) = (cuda_of(&w13_guard)?, cuda_of(&w2_guard)?);
        let ranges = [
            crate::contiguous_range(x_layout, "fused MoE input")?,
            crate::contiguous_range(w13_layout, "stacked gate/up weights")?,
            crate::contiguous_range(w2_layout, "stacked down weights")?,
        ];
        let shapes = self.shapes(tokens);
        let out = match (x.dtype(), w13.dtype(), w2.dtype()) {
            (DType::F32, DType::F32, DType::F32) => candle_core::CudaStorage::wrap_cuda_slice(
                experts_cuda::<f32>(
                    &kernels,
                    &device,
                    [x, w13, w2],
                    ranges,
                    &align,
                    &weights,
                    shapes,
                )?,
                device,
            ),
            (DType::BF16, DType::BF16, DType::BF16) => candle_core::CudaStorage::wrap_cuda_slice(
                experts_cuda::<half::bf16>(
                    &kernels,
                    &device,
                    [x, w13, w2],
                    ranges,
                    &align,
                    &weights,
                    shapes,
                )?,
                device,
            ),
            (other, ..) => candle_core::bail!(
                "fused MoE takes f32 or bf16 inputs of the experts' dtype, not {other:?}"
            ),
        };
        Ok((out, Shape::from((tokens, self.hidden))))
    }
}

/// The fused MoE's kernels on the GPU, after routing: `[x, w13, w2]` and their element ranges.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn experts_cuda<T: ember_kernels::cuda::CudaElement + candle_core::cuda_backend::CudaDType>(
    kernels: &ember_kernels::cuda::CudaKernels,
    device: &candle_core::CudaDevice,
    [x, w13, w2]: [&candle_core::CudaStorage; 3],
    [x_range, w13_range, w2_range]: [std::ops::Range<usize>; 3],
    align: &ember_kernels::cuda::DeviceAlignment,
    weights: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    (up, down): (GroupedGemmShape, GroupedGemmShape),
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    let wrap = candle_core::Error::wrap;
    let x = x.as_cuda_slice::<T>()?.slice(x_range);
    let w13 = w13.as_cuda_slice::<T>()?.slice(w13_range);
    let w2 = w2.as_cuda_slice::<T>()?.slice(w2_range);
    let mut h = device.alloc_zeros::<T>(up.num_entries * up.n_out)?;
    kernels
        .grouped_gemm(&mut h, &x, &w13, align, &up)
        .map_err(wrap)?;
    let mut act = device.alloc_zeros::<T>(up.num_entries * down.k_in)?;
    kernels
        .silu_and_mul(&h.as_view(), down.k_in, &mut act)
        .map_err(wrap)?;
    drop(h);
    let mut y = device.alloc_zeros::<T>(down.num_entries * down.n_out)?;
    kernels
        .grouped_gemm(&mut y, &act.as_view(), &w2, align, &down)
        .map_err(wrap)?;
    let mut out = device.alloc_zeros::<T>(up.num_entries / up.x_div * down.n_out)?;
    kernels
        .moe_sum(
            &mut out,
            &y.as_view(),
            &weights.as_view(),
            up.x_div,
            down.n_out,
        )
        .map_err(wrap)?;
    Ok(out)
}
