//! Paged attention on the CPU, reading keys and values where they sit in the cache.
//!
//! The tensor path gathers each sequence's context out of the pool, transposes it per head and
//! runs small batched matmuls: a dozen candle ops and three copies of the context per sequence
//! and layer, which dominate a decode step of a batch. This adapter hands the cache and the
//! batch's block tables to `ember_kernels::paged_attention`, which walks the tables instead (the
//! same function the CUDA kernel is tested against). It serves f32 and fp8 (e4m3 or e5m2,
//! converted as it reads) caches of f32 models on the CPU; other dtypes and devices keep the
//! tensor path.

use candle_core::{DType, Device, Storage, Tensor, WithDType};
use ember_kernels::paged_attention::{
    paged_attention_scaled, CacheElement, CacheScales, PagedAttentionBatch, PagedAttentionShape,
};

use crate::cache::kv_cache::{KvScales, LayerKvCache, E5M2_STORAGE};
use crate::step::batch::ForwardBatch;

type TensorResult<T = Tensor> = candle_core::Result<T>;

/// Whether [`paged_attention`] can serve this cache.
pub fn supported(cache: &LayerKvCache, q: &Tensor) -> bool {
    matches!(cache.k.device(), Device::Cpu)
        && matches!(cache.k.dtype(), DType::F32 | DType::F8E4M3 | E5M2_STORAGE)
        && cache.v.dtype() == cache.k.dtype()
        && q.dtype() == DType::F32
}

/// Runs `f` over the contiguous data of a CPU tensor of element type `T`.
fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> TensorResult<R>,
) -> TensorResult<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("paged attention: the tensor is not on the CPU");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("paged attention: the tensor is not contiguous");
    }
    let data = cpu.as_slice::<T>()?;
    f(&data[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()])
}

/// Attention of `q` (`[tokens, num_heads, head_dim]`, roped) over each sequence's cached keys
/// (`[slots, num_kv_heads · head_dim]`, key head `h / group` for query head `h`) and values
/// (`[slots, num_kv_heads · v_dim]`), causal within the new tokens. Returns
/// `[tokens, num_heads · v_dim]`.
pub fn paged_attention(
    q: &Tensor,
    cache: &LayerKvCache,
    scales: &KvScales,
    batch: &ForwardBatch,
    num_kv_heads: usize,
    scale: f32,
) -> TensorResult {
    let host = batch.host_paged();
    let (tokens, shape) = kernel_shape(q, cache, num_kv_heads, batch.block_size, host.max_blocks)?;
    let layer = Attend {
        q: q.contiguous()?,
        cache,
        meta: host.view(),
        shape,
        scale,
    };
    let mut out = vec![0f32; tokens * shape.num_heads * shape.v_dim];
    match cache.k.dtype() {
        DType::F8E4M3 => layer.attend::<float8::F8E4M3>(scales, &mut out)?,
        E5M2_STORAGE => layer.attend::<u8>(scales, &mut out)?,
        _ => layer.attend::<f32>(&KvScales::default(), &mut out)?,
    }
    Tensor::from_vec(out, (tokens, shape.num_heads * shape.v_dim), q.device())
}

/// The paged attention kernels' shape for `q` (`[tokens, num_heads, head_dim]`) over `cache`
/// with `num_kv_heads` heads, under block tables `max_blocks` wide: `(tokens, shape)`.
pub(crate) fn kernel_shape(
    q: &Tensor,
    cache: &LayerKvCache,
    num_kv_heads: usize,
    block_size: usize,
    max_blocks: usize,
) -> TensorResult<(usize, PagedAttentionShape)> {
    let (tokens, num_heads, head_dim) = q.dims3()?;
    let shape = PagedAttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        v_dim: cache.v.dim(1)? / num_kv_heads,
        block_size,
        max_blocks,
    };
    Ok((tokens, shape))
}

/// One layer's [`paged_attention`] before the cache's element type is chosen.
struct Attend<'a> {
    /// Contiguous.
    q: Tensor,
    cache: &'a LayerKvCache,
    meta: PagedAttentionBatch<'a>,
    shape: PagedAttentionShape,
    scale: f32,
}

impl Attend<'_> {
    /// The attention into `out`, over a cache whose elements are `T`.
    fn attend<T: CacheElement + WithDType>(
        &self,
        scales: &KvScales,
        out: &mut [f32],
    ) -> TensorResult<()> {
        let scales = CacheScales {
            k: &scales.k,
            v: &scales.v,
        };
        with_slice::<f32, _>(&self.q, |q| {
            with_slice::<T, _>(&self.cache.k, |k| {
                with_slice::<T, _>(&self.cache.v, |v| {
                    let (meta, shape) = (&self.meta, &self.shape);
                    paged_attention_scaled(out, q, k, v, meta, self.scale, scales, shape)
                        .map_err(candle_core::Error::wrap)
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::batch::SequenceInput;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Straight-line f64 attention over explicit context rows: the reference.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        slots: &[u32],
        past: usize,
        i: usize,
        h: usize,
        dims: (usize, usize, usize, usize),
    ) -> Vec<f64> {
        let (num_heads, kv_heads, d, v_dim) = dims;
        let kv = h / (num_heads / kv_heads);
        let scale = 1.0 / (d as f64).sqrt();
        let visible = &slots[..past + i + 1];
        let scores: Vec<f64> = visible
            .iter()
            .map(|&s| {
                (0..d)
                    .map(|x| q[h * d + x] as f64 * k[s as usize * kv_heads * d + kv * d + x] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        (0..v_dim)
            .map(|x| {
                visible
                    .iter()
                    .zip(&w)
                    .map(|(&s, w)| {
                        w / sum * v[s as usize * kv_heads * v_dim + kv * v_dim + x] as f64
                    })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn matches_a_plain_reference_on_random_gqa_chunks_and_decodes() {
        check_against_reference(DType::F32, KvScales::default());
    }

    #[test]
    fn reads_an_fp8_cache_as_its_e4m3_values() {
        check_against_reference(DType::F8E4M3, KvScales::default());
    }

    #[test]
    fn reads_an_e5m2_cache_as_its_values_with_and_without_scales() {
        check_against_reference(E5M2_STORAGE, KvScales::default());
        check_against_reference(
            E5M2_STORAGE,
            KvScales {
                k: vec![0.5, 2.0],
                v: vec![0.25],
            },
        );
    }

    #[test]
    fn reads_an_fp8_cache_with_per_tensor_and_per_head_scales() {
        for scales in [
            KvScales {
                k: vec![0.05],
                v: vec![3.0],
            },
            KvScales {
                k: vec![0.5, 2.0],
                v: vec![0.25, 4.0],
            },
        ] {
            check_against_reference(DType::F8E4M3, scales);
        }
    }

    /// Runs the kernel over a cache stored in `storage`; the reference sees the stored values,
    /// times their head's scale.
    fn check_against_reference(storage: DType, scales: KvScales) {
        let (num_heads, kv_heads, d, v_dim, block) = (8, 2, 12, 12, 4);
        let slots = 64;
        let mut rng = StdRng::seed_from_u64(7);
        let mut rand_vec =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let stored = |values: Vec<f32>, width: usize| {
            let t = Tensor::from_vec(values, (slots, width), &Device::Cpu).unwrap();
            let (t, seen) = if storage == E5M2_STORAGE {
                let bytes = crate::cache::fp8_e5m2::encode(&t).unwrap();
                let seen = crate::cache::fp8_e5m2::decode(&bytes).unwrap();
                (bytes, seen)
            } else {
                let t = t.to_dtype(storage).unwrap();
                let seen = t.to_dtype(DType::F32).unwrap();
                (t, seen)
            };
            (t, seen.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        let (k_stored, mut k) = stored(rand_vec(slots * kv_heads * d), kv_heads * d);
        let (v_stored, mut v) = stored(rand_vec(slots * kv_heads * v_dim), kv_heads * v_dim);
        for (values, per_head, head_scales) in [(&mut k, d, &scales.k), (&mut v, v_dim, &scales.v)]
        {
            for (i, x) in values.iter_mut().enumerate() {
                let head = i % (kv_heads * per_head) / per_head;
                *x *= KvScales::of_head(head_scales, head, kv_heads);
            }
        }
        let cache = LayerKvCache {
            k: k_stored,
            v: v_stored,
            dtype: DType::F32,
        };
        // A prefill chunk of 3 after 5 cached tokens, a decode after 9, a fresh prompt of 4;
        // block tables scattered over the pool.
        let (t1, t2, t3) = ([9u32, 2, 14], [5u32, 11, 0], [7u32]);
        let (a, b, c) = ([1u32, 2, 3], [4u32], [5u32, 6, 7, 8]);
        let inputs = [
            SequenceInput {
                token_ids: &a,
                num_computed: 5,
                block_table: &t1,
                all_logits: false,
                adapter: None,
            },
            SequenceInput {
                token_ids: &b,
                num_computed: 9,
                block_table: &t2,
                all_logits: false,
                adapter: None,
            },
            SequenceInput {
                token_ids: &c,
                num_computed: 0,
                block_table: &t3,
                all_logits: false,
                adapter: None,
            },
        ];
        let batch = ForwardBatch::new(&inputs, block, &Device::Cpu).unwrap();
        let tokens = batch.num_tokens;
        let q = rand_vec(tokens * num_heads * d);
        let q_t = Tensor::from_vec(q.clone(), (tokens, num_heads, d), &Device::Cpu).unwrap();
        assert!(supported(&cache, &q_t));
        let scale = 1.0 / (d as f32).sqrt();
        let out = paged_attention(&q_t, &cache, &scales, &batch, kv_heads, scale)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut worst = 0f64;
        for seq in &batch.sequences {
            let past = seq.context_len - seq.query_len;
            for i in 0..seq.query_len {
                let row = seq.query_start + i;
                for h in 0..num_heads {
                    let want = reference(
                        &q[row * num_heads * d..],
                        &k,
                        &v,
                        seq.context_slots_host(),
                        past,
                        i,
                        h,
                        (num_heads, kv_heads, d, v_dim),
                    );
                    for (x, w) in out[row][h * v_dim..(h + 1) * v_dim].iter().zip(want) {
                        worst = worst.max((*x as f64 - w).abs());
                    }
                }
            }
        }
        // f32 accumulation over at most 12 context rows: well inside 1e-5.
        assert!(worst < 1e-5, "max |Δ| {worst}");
    }
}
