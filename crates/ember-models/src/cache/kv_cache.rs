//! The paged KV cache: one preallocated pool of fixed-size blocks per layer. Sequences own
//! blocks through block tables (kept by the engine); the model only reads and writes slots.
//! The pool stores rows in the model dtype or, under `--kv-cache-dtype fp8` / `fp8_e5m2`, in
//! e4m3 / e5m2 with a scale per tensor or per head (quantized when written, dequantized when
//! read). Candle has no e5m2 dtype: such a pool is `U8` ([`E5M2_STORAGE`]) holding e5m2 bytes.

use candle_core::{DType, Device, Tensor};
use ember_core::{EmberError, Result};

use ember_kernels::scatter_rows::scatter_rows;

use crate::linear::quantized::fp8::E4M3_MAX;
use crate::loading::weights::Weights;
use crate::TensorResult;

/// The storage dtype of an e5m2 cache: its bytes (see [`crate::cache::fp8_e5m2`]).
pub const E5M2_STORAGE: DType = DType::U8;

/// Whether a pool of `storage` holds fp8 (e4m3 or e5m2 bytes), quantized with scales.
pub fn is_fp8(storage: DType) -> bool {
    matches!(storage, DType::F8E4M3 | E5M2_STORAGE)
}

/// Keys and values of one layer: `k` is `[slots, k_width]`, `v` is `[slots, v_width]`. The model
/// decides what a row holds (see `ModelConfig::kv_cache_row_widths`): per-head keys and values for
/// grouped-query attention, the latent and the rope key for MLA.
pub struct LayerKvCache {
    pub k: Tensor,
    pub v: Tensor,
    /// The dtype rows are written in and read back as (the model dtype); `k` and `v` hold it
    /// too unless the cache is fp8.
    pub dtype: DType,
}

/// Scales of an e4m3 cache's rows, `stored = sat(x / scale)` and `x = stored · scale`: one for the
/// whole tensor, or one per head (a row's columns split evenly among them). They belong to the
/// attention layer that writes and reads the rows, from the checkpoint's `k_scale`/`v_scale`, or
/// 1.0 (vLLM's default) where it ships none. Caches in the model dtype ignore them.
#[derive(Debug, Clone, PartialEq)]
pub struct KvScales {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl Default for KvScales {
    fn default() -> Self {
        Self {
            k: vec![1.0],
            v: vec![1.0],
        }
    }
}

impl KvScales {
    /// Reads an attention layer's cache scales under `weights` (its `self_attn` prefix), as
    /// compressed-tensors (`k_scale`, `v_scale`), ModelOpt (`k_proj.k_scale`, `v_proj.v_scale`)
    /// and older FP8 checkpoints (`kv_scale`, both) store them: a scalar, or one per key/value
    /// head of `kv_heads`, of which this rank keeps `local` (`(first, count)`). `None` when the
    /// checkpoint has none (and for dummy weights).
    pub fn load(weights: &Weights, kv_heads: usize, local: (usize, usize)) -> Result<Option<Self>> {
        const NAMES: [&str; 5] = [
            "k_scale",
            "v_scale",
            "k_proj.k_scale",
            "v_proj.v_scale",
            "kv_scale",
        ];
        if NAMES.iter().all(|n| weights.stored_dtype(n).is_none()) {
            return Ok(None);
        }
        let read = |names: &[&str]| -> Result<Vec<f32>> {
            let Some(name) = names.iter().find(|n| weights.stored_dtype(n).is_some()) else {
                return Ok(vec![1.0]);
            };
            let what = format!("`{}.{name}`", weights.prefix());
            let values = weights
                .get_stored(name)?
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| EmberError::Weights(format!("KV cache scale {what}: {e}")))?;
            if let Some(bad) = values.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                return Err(EmberError::Weights(format!(
                    "KV cache scale {what} holds {bad}; scales must be positive and finite"
                )));
            }
            match values.len() {
                1 => Ok(values),
                n if n == kv_heads => Ok(values[local.0..local.0 + local.1].to_vec()),
                n => Err(EmberError::Weights(format!(
                    "KV cache scale {what} has {n} values; expected 1 (per tensor) or {kv_heads} \
                     (per key/value head)"
                ))),
            }
        };
        Ok(Some(Self {
            k: read(&["k_scale", "k_proj.k_scale", "kv_scale"])?,
            v: read(&["v_scale", "v_proj.v_scale", "kv_scale"])?,
        }))
    }

    /// The scale of head `head` of `heads` in a row.
    pub fn of_head(scales: &[f32], head: usize, heads: usize) -> f32 {
        ember_kernels::paged_attention::CacheScales::of_head(scales, head, heads)
    }

    /// `[1, width]` factors of `scales` over a row's columns; `None` when every one is 1.0.
    fn columns(scales: &[f32], width: usize, device: &Device) -> TensorResult<Option<Tensor>> {
        if scales.iter().all(|&s| s == 1.0) {
            return Ok(None);
        }
        let per = width / scales.len();
        let factors: Vec<f32> = (0..width).map(|c| scales[c / per]).collect();
        Tensor::from_vec(factors, (1, width), device).map(Some)
    }
}

/// Ranges vLLM's `--calculate-kv-scales` maps the first batch's largest |key| and |value| to
/// (`K_SCALE_CONSTANT`, `V_SCALE_CONSTANT`): scale = amax / range, leaving e4m3 headroom above.
pub const CALCULATED_K_RANGE: f32 = 200.0;
pub const CALCULATED_V_RANGE: f32 = 100.0;

/// An attention layer's cache scales: fixed (the checkpoint's, or 1.0), or under
/// `--calculate-kv-scales` computed once, per tensor, from the first keys and values the layer
/// writes into an fp8 cache, then kept for every later write and read.
#[derive(Debug)]
pub struct LayerKvScales {
    fixed: KvScales,
    /// `Some(one_scale)` when calculated; `one_scale`: both parts of a row take the key scale
    /// (MLA's cache of latent and rope key, as vLLM scales it).
    calculate: Option<bool>,
    calculated: std::sync::OnceLock<KvScales>,
}

impl LayerKvScales {
    pub fn fixed(scales: KvScales) -> Self {
        Self {
            fixed: scales,
            calculate: None,
            calculated: std::sync::OnceLock::new(),
        }
    }

    /// Scales computed from the first write; with `one_scale`, the key scale serves both parts.
    pub fn calculated(one_scale: bool) -> Self {
        Self {
            calculate: Some(one_scale),
            ..Self::fixed(KvScales::default())
        }
    }

    /// The scales to write `k` and `v` into `cache` with and read it back with: the fixed ones,
    /// or, for a calculated layer's fp8 cache, those of its first write (computed now if this
    /// is it). A zero or non-finite amax keeps 1.0.
    pub fn resolve(&self, cache: &LayerKvCache, k: &Tensor, v: &Tensor) -> TensorResult<&KvScales> {
        let Some(one_scale) = self.calculate else {
            return Ok(&self.fixed);
        };
        if !is_fp8(cache.k.dtype()) {
            return Ok(&self.fixed);
        }
        if let Some(scales) = self.calculated.get() {
            return Ok(scales);
        }
        let scale = |t: &Tensor, range: f32| -> TensorResult<f32> {
            let amax = t
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            let s = amax / range;
            Ok(if s.is_finite() && s > 0.0 { s } else { 1.0 })
        };
        let k_scale = scale(k, CALCULATED_K_RANGE)?;
        let v_scale = if one_scale {
            k_scale
        } else {
            scale(v, CALCULATED_V_RANGE)?
        };
        tracing::debug!(
            k_scale,
            v_scale,
            "calculated the KV cache scales of a layer"
        );
        Ok(self.calculated.get_or_init(|| KvScales {
            k: vec![k_scale],
            v: vec![v_scale],
        }))
    }
}

/// Every layer's KV pool.
pub struct KvCachePool {
    pub layers: Vec<LayerKvCache>,
    pub block_size: usize,
    pub num_blocks: usize,
    row_widths: (usize, usize),
}

impl KvCachePool {
    /// Bytes one block takes across all layers (K rows and V rows).
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        (k_width, v_width): (usize, usize),
        dtype: DType,
    ) -> usize {
        num_layers * block_size * (k_width + v_width) * dtype.size_in_bytes()
    }

    /// Allocates `num_blocks` blocks of `block_size` tokens for `num_layers` layers, storing
    /// rows in `dtype`.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        row_widths: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::with_storage(
            num_layers, num_blocks, block_size, row_widths, dtype, dtype, device,
        )
    }

    /// Like [`KvCachePool::new`] for rows computed in `dtype` and stored in `storage` (the
    /// model dtype, or `F8E4M3` for an fp8 cache).
    pub fn with_storage(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        row_widths: (usize, usize),
        dtype: DType,
        storage: DType,
        device: &Device,
    ) -> Result<Self> {
        if storage != dtype && !is_fp8(storage) {
            return Err(EmberError::Config(format!(
                "a KV cache of {storage:?} for a {dtype:?} model is not supported; use auto, fp8 or fp8_e5m2"
            )));
        }
        let (k_width, v_width) = row_widths;
        let slots = num_blocks * block_size;
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerKvCache {
                    k: Tensor::zeros((slots, k_width), storage, device)?,
                    v: Tensor::zeros((slots, v_width), storage, device)?,
                    dtype,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| EmberError::Tensor(format!("cannot allocate the KV cache: {e}")))?;
        Ok(Self {
            layers,
            block_size,
            num_blocks,
            row_widths,
        })
    }

    /// Widths of one cached K row and one V row.
    pub fn row_widths(&self) -> (usize, usize) {
        self.row_widths
    }
}

impl LayerKvCache {
    /// Writes `k` (`[tokens, k_width]`) and `v` (`[tokens, v_width]`) into the slots of
    /// `slot_mapping` (`[tokens]` u32), quantized with `scales` if the cache is fp8.
    pub fn write(
        &self,
        k: &Tensor,
        v: &Tensor,
        slot_mapping: &Tensor,
        scales: &KvScales,
    ) -> TensorResult<()> {
        let tokens = slot_mapping.dim(0)?;
        for (pool, rows, scale) in [(&self.k, k, &scales.k), (&self.v, v, &scales.v)] {
            if is_fp8(pool.dtype()) {
                // candle's CUDA scatter has no float8 kernel: fp8 rows go through ember's.
                let rows = quantize_rows(rows, scale, pool.dtype())?;
                let op = ScatterRows {
                    row_len: pool.dim(1)?,
                };
                pool.inplace_op3(&rows, &slot_mapping.contiguous()?, &op)?;
                continue;
            }
            let index = slot_mapping
                .unsqueeze(1)?
                .broadcast_as((tokens, pool.dim(1)?))?
                .contiguous()?;
            pool.scatter_set(&index, &rows.contiguous()?, 0)?;
        }
        Ok(())
    }

    /// Reads the rows of `slots` (`[n]` u32) as `([n, k_width], [n, v_width])` in the model
    /// dtype (dequantized with `scales` if the cache is fp8).
    pub fn gather(&self, slots: &Tensor, scales: &KvScales) -> TensorResult<(Tensor, Tensor)> {
        let read = |pool: &Tensor, scale: &[f32]| -> TensorResult {
            let rows = pool.index_select(slots, 0)?;
            let rows = match pool.dtype() {
                DType::F8E4M3 => rows.to_dtype(DType::F32)?,
                E5M2_STORAGE => crate::cache::fp8_e5m2::decode(&rows)?,
                _ => return Ok(rows),
            };
            let rows = match KvScales::columns(scale, rows.dim(1)?, rows.device())? {
                None => rows,
                Some(factors) => rows.broadcast_mul(&factors)?,
            };
            rows.to_dtype(self.dtype)
        };
        Ok((read(&self.k, &scales.k)?, read(&self.v, &scales.v)?))
    }
}

/// Writes fp8 rows `[tokens, row_len]` into the pool rows of their slots (`[tokens]` u32):
/// ember-kernels' `scatter_rows`, its reference on the CPU and its kernel on CUDA. A slot past
/// the pool is not written.
struct ScatterRows {
    row_len: usize,
}

impl candle_core::InplaceOp3 for ScatterRows {
    fn name(&self) -> &'static str {
        "ember-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        pool: &mut candle_core::CpuStorage,
        pool_l: &candle_core::Layout,
        rows: &candle_core::CpuStorage,
        rows_l: &candle_core::Layout,
        slots: &candle_core::CpuStorage,
        slots_l: &candle_core::Layout,
    ) -> TensorResult<()> {
        use candle_core::CpuStorage as S;
        let range = |l: &candle_core::Layout| {
            crate::device::kernels::contiguous_range(l, "a KV cache write")
        };
        let (pr, rr) = (range(pool_l)?, range(rows_l)?);
        let slots = &slots.as_slice::<u32>()?[range(slots_l)?];
        let wrap = candle_core::Error::wrap;
        match (pool, rows) {
            (S::U8(p), S::U8(r)) => {
                scatter_rows(&mut p[pr], &r[rr], slots, self.row_len).map_err(wrap)?;
            }
            (S::F8E4M3(p), S::F8E4M3(r)) => {
                scatter_rows(&mut p[pr], &r[rr], slots, self.row_len).map_err(wrap)?;
            }
            _ => candle_core::bail!(
                "a KV cache write of fp8 rows into an fp8 pool of the same dtype"
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pool_l: &candle_core::Layout,
        rows: &candle_core::CudaStorage,
        rows_l: &candle_core::Layout,
        slots: &candle_core::CudaStorage,
        slots_l: &candle_core::Layout,
    ) -> TensorResult<()> {
        use candle_core::backend::BackendStorage;
        let range = |l: &candle_core::Layout| {
            crate::device::kernels::contiguous_range(l, "a KV cache write")
        };
        if range(pool_l)?.start != 0 {
            candle_core::bail!("a KV cache write needs the pool from its start");
        }
        let kernels = crate::device::kernels::kernels(pool.device())?;
        let slots = slots.as_cuda_slice::<u32>()?.slice(range(slots_l)?);
        let rr = range(rows_l)?;
        let wrap = candle_core::Error::wrap;
        match rows.dtype() {
            DType::U8 => {
                let r = rows.as_cuda_slice::<u8>()?.slice(rr);
                let p = pool.as_cuda_slice_mut::<u8>()?;
                kernels
                    .scatter_rows(p, &r, &slots, self.row_len)
                    .map_err(wrap)
            }
            DType::F8E4M3 => {
                let r = rows.as_cuda_slice::<float8::F8E4M3>()?.slice(rr);
                let p = pool.as_cuda_slice_mut::<float8::F8E4M3>()?;
                kernels
                    .scatter_rows(p, &r, &slots, self.row_len)
                    .map_err(wrap)
            }
            other => candle_core::bail!("a KV cache write of {other:?} rows"),
        }
    }
}

/// `sat(x / scale)` in e4m3 or e5m2 (`storage`; a scale per tensor or per head), rounded to
/// nearest even: out-of-range values saturate to ±448 / ±57344, as vLLM's cache writes do
/// (`__NV_SATFINITE`).
fn quantize_rows(rows: &Tensor, scales: &[f32], storage: DType) -> TensorResult {
    let rows = rows.to_dtype(DType::F32)?;
    let rows = match KvScales::columns(scales, rows.dim(1)?, rows.device())? {
        None => rows,
        Some(factors) => rows.broadcast_div(&factors)?,
    };
    if storage == E5M2_STORAGE {
        return crate::cache::fp8_e5m2::encode(&rows);
    }
    rows.clamp(-E4M3_MAX, E4M3_MAX)?
        .contiguous()?
        .to_dtype(DType::F8E4M3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fp8_cache_stores_e4m3_rounded_saturated_rows_and_reads_them_back_in_the_model_dtype() {
        let pool =
            KvCachePool::with_storage(1, 2, 2, (3, 2), DType::F32, DType::F8E4M3, &Device::Cpu)
                .unwrap();
        let layer = &pool.layers[0];
        assert_eq!(layer.k.dtype(), DType::F8E4M3);
        // 1.0625 lies halfway between e4m3's 1.0 and 1.125: ties go to the even code (1.0).
        let k = Tensor::new(&[[0.1f32, -1000.0, 1.0625]], &Device::Cpu).unwrap();
        let v = Tensor::new(&[[3.3f32, -0.001]], &Device::Cpu).unwrap();
        let slot = Tensor::new(&[2u32], &Device::Cpu).unwrap();
        let unit = KvScales::default();
        layer.write(&k, &v, &slot, &unit).unwrap();
        let (k_read, v_read) = layer.gather(&slot, &unit).unwrap();
        assert_eq!(k_read.dtype(), DType::F32);
        assert_eq!(k_read.to_vec2::<f32>().unwrap(), [[0.1015625, -448.0, 1.0]]);
        // 0.001 rounds to e4m3's smallest subnormal, 2^-9.
        assert_eq!(v_read.to_vec2::<f32>().unwrap(), [[3.25, -0.001953125]]);
        // One byte per element: half of bf16, a quarter of f32.
        assert_eq!(
            KvCachePool::bytes_per_block(1, 2, (3, 2), DType::F8E4M3),
            KvCachePool::bytes_per_block(1, 2, (3, 2), DType::F32) / 4
        );
    }

    #[test]
    fn an_e5m2_cache_stores_bytes_and_reads_back_scaled_values() {
        let pool =
            KvCachePool::with_storage(1, 2, 2, (3, 2), DType::F32, E5M2_STORAGE, &Device::Cpu)
                .unwrap();
        let layer = &pool.layers[0];
        assert_eq!(layer.k.dtype(), DType::U8);
        // 1000 (e4m3 would saturate at 448) is held: e5m2 has 1024 and 896 around it.
        let k = Tensor::new(&[[0.1f32, -1000.0, 1.125]], &Device::Cpu).unwrap();
        let v = Tensor::new(&[[3.3f32, 1e6]], &Device::Cpu).unwrap();
        let slot = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let scales = KvScales {
            k: vec![1.0],
            v: vec![2.0],
        };
        layer.write(&k, &v, &slot, &scales).unwrap();
        let (k_read, v_read) = layer.gather(&slot, &scales).unwrap();
        assert_eq!(k_read.dtype(), DType::F32);
        assert_eq!(k_read.to_vec2::<f32>().unwrap(), [[0.09375, -1024.0, 1.0]]);
        // 3.3 / 2 = 1.65 rounds to 1.75 (x 2 = 3.5); 1e6 / 2 saturates at 57344 (x 2).
        assert_eq!(v_read.to_vec2::<f32>().unwrap(), [[3.5, 114688.0]]);
        assert_eq!(
            KvCachePool::bytes_per_block(1, 2, (3, 2), E5M2_STORAGE),
            KvCachePool::bytes_per_block(1, 2, (3, 2), DType::F32) / 4
        );
        // Calculated scales apply to an e5m2 cache too.
        let calc = LayerKvScales::calculated(false);
        assert_eq!(calc.resolve(layer, &k, &v).unwrap().k, vec![1000.0 / 200.0]);
    }

    #[test]
    fn calculated_scales_come_from_the_first_write_and_stay() {
        let fp8 =
            KvCachePool::with_storage(1, 1, 4, (2, 2), DType::F32, DType::F8E4M3, &Device::Cpu)
                .unwrap();
        let layer = &fp8.layers[0];
        let k = Tensor::new(&[[1.0f32, -40.0], [3.0, 2.0]], &Device::Cpu).unwrap();
        let v = Tensor::new(&[[0.5f32, 0.25], [-5.0, 1.0]], &Device::Cpu).unwrap();
        let scales = LayerKvScales::calculated(false);
        let first = scales.resolve(layer, &k, &v).unwrap().clone();
        assert_eq!(
            first,
            KvScales {
                k: vec![40.0 / 200.0],
                v: vec![5.0 / 100.0]
            }
        );
        // Later writes keep them, however large.
        let big = (&k * 100.0).unwrap();
        assert_eq!(scales.resolve(layer, &big, &big).unwrap(), &first);
        // MLA: one scale, the latent's, for both parts; an all-zero first write keeps 1.0.
        let one = LayerKvScales::calculated(true);
        assert_eq!(one.resolve(layer, &k, &v).unwrap().v, vec![0.2]);
        let zero = LayerKvScales::calculated(false);
        let zeros = k.zeros_like().unwrap();
        assert_eq!(
            zero.resolve(layer, &zeros, &zeros).unwrap(),
            &KvScales::default()
        );
        // A cache in the model dtype has no scales to calculate.
        let f32_pool = KvCachePool::new(1, 1, 4, (2, 2), DType::F32, &Device::Cpu).unwrap();
        let plain = LayerKvScales::calculated(false);
        assert_eq!(
            plain.resolve(&f32_pool.layers[0], &k, &v).unwrap(),
            &KvScales::default()
        );
    }

    #[test]
    fn per_head_scales_divide_each_heads_columns_when_written_and_multiply_when_read() {
        // Two heads of width 2 in K, one scale for V.
        let pool =
            KvCachePool::with_storage(1, 1, 2, (4, 2), DType::F32, DType::F8E4M3, &Device::Cpu)
                .unwrap();
        let layer = &pool.layers[0];
        let scales = KvScales {
            k: vec![0.5, 4.0],
            v: vec![0.25],
        };
        // 300 / 0.5 = 600 saturates at 448 (x 0.5 = 224); 320 / 4 = 80 is exact in e4m3.
        let k = Tensor::new(&[[0.75f32, 300.0, 320.0, -1.0]], &Device::Cpu).unwrap();
        let v = Tensor::new(&[[0.1f32, -50.0]], &Device::Cpu).unwrap();
        let slot = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        layer.write(&k, &v, &slot, &scales).unwrap();
        let (k_read, v_read) = layer.gather(&slot, &scales).unwrap();
        assert_eq!(
            k_read.to_vec2::<f32>().unwrap(),
            [[0.75, 224.0, 320.0, -1.0]]
        );
        // 0.1 / 0.25 = 0.4 rounds to e4m3's 0.40625; -200 is a tie between -192 and -208: even.
        assert_eq!(v_read.to_vec2::<f32>().unwrap(), [[0.1015625, -48.0]]);
    }
}
