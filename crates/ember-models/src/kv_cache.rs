//! The paged KV cache: one preallocated pool of fixed-size blocks per layer. Sequences own
//! blocks through block tables (kept by the engine); the model only reads and writes slots.
//! The pool stores rows in the model dtype or, under `--kv-cache-dtype fp8`, in e4m3 with one
//! scale per tensor (quantized when written, dequantized when read).

use candle_core::{DType, Device, Tensor};
use ember_core::{EmberError, Result};

use crate::quantized::fp8::E4M3_MAX;
use crate::TensorResult;

/// Keys and values of one layer: `k` is `[slots, k_width]`, `v` is `[slots, v_width]`. The model
/// decides what a row holds (see `ModelConfig::kv_cache_row_widths`): per-head keys and values for
/// grouped-query attention, the latent and the rope key for MLA.
pub struct LayerKvCache {
    pub k: Tensor,
    pub v: Tensor,
    /// The dtype rows are written in and read back as (the model dtype); `k` and `v` hold it
    /// too unless the cache is fp8.
    pub dtype: DType,
    /// Per-tensor scales of an e4m3 cache: `stored = sat(x / scale)`, `x = stored · scale`.
    /// 1.0, vLLM's default for checkpoints that ship no `k_scale`/`v_scale` (none of ember's do).
    pub k_scale: f32,
    pub v_scale: f32,
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
        if storage != dtype && storage != DType::F8E4M3 {
            return Err(EmberError::Config(format!(
                "a KV cache of {storage:?} for a {dtype:?} model is not supported; use auto or fp8"
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
                    k_scale: 1.0,
                    v_scale: 1.0,
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
    /// `slot_mapping` (`[tokens]` u32), quantized if the cache is fp8.
    pub fn write(&self, k: &Tensor, v: &Tensor, slot_mapping: &Tensor) -> TensorResult<()> {
        let tokens = slot_mapping.dim(0)?;
        for (pool, rows, scale) in [(&self.k, k, self.k_scale), (&self.v, v, self.v_scale)] {
            let index = slot_mapping
                .unsqueeze(1)?
                .broadcast_as((tokens, pool.dim(1)?))?
                .contiguous()?;
            let rows = if pool.dtype() == DType::F8E4M3 {
                quantize_rows(rows, scale)?
            } else {
                rows.contiguous()?
            };
            pool.scatter_set(&index, &rows, 0)?;
        }
        Ok(())
    }

    /// Reads the rows of `slots` (`[n]` u32) as `([n, k_width], [n, v_width])` in the model
    /// dtype (dequantized if the cache is fp8).
    pub fn gather(&self, slots: &Tensor) -> TensorResult<(Tensor, Tensor)> {
        let read = |pool: &Tensor, scale: f32| -> TensorResult {
            let rows = pool.index_select(slots, 0)?;
            if pool.dtype() != DType::F8E4M3 {
                return Ok(rows);
            }
            let rows = rows.to_dtype(DType::F32)?;
            let rows = if scale == 1.0 {
                rows
            } else {
                rows.affine(scale as f64, 0.0)?
            };
            rows.to_dtype(self.dtype)
        };
        Ok((read(&self.k, self.k_scale)?, read(&self.v, self.v_scale)?))
    }
}

/// `sat(x / scale)` in e4m3, rounded to nearest even: out-of-range values saturate to ±448, as
/// vLLM's cache writes do (`__NV_SATFINITE`).
fn quantize_rows(rows: &Tensor, scale: f32) -> TensorResult {
    let rows = rows.to_dtype(DType::F32)?;
    let rows = if scale == 1.0 {
        rows
    } else {
        (rows / scale as f64)?
    };
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
        layer.write(&k, &v, &slot).unwrap();
        let (k_read, v_read) = layer.gather(&slot).unwrap();
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
}
