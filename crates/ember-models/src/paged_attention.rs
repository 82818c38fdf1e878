//! Paged attention on the CPU, reading keys and values where they sit in the cache.
//!
//! The tensor path gathers each sequence's context out of the pool, transposes it per head and
//! runs small batched matmuls: a dozen candle ops and three copies of the context per sequence
//! and layer, which dominate a decode step of a batch. This kernel walks the block table instead:
//! one task per (sequence, query head), f32 dot products against the cached rows, a numerically
//! stable softmax, and the weighted sum of value rows. It serves f32 caches on the CPU; other
//! dtypes and devices keep the tensor path.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::batch::ForwardBatch;
use crate::kv_cache::LayerKvCache;

type TensorResult<T = Tensor> = candle_core::Result<T>;

/// Whether [`paged_attention`] can serve this cache.
pub fn supported(cache: &LayerKvCache, q: &Tensor) -> bool {
    matches!(cache.k.device(), Device::Cpu)
        && cache.k.dtype() == DType::F32
        && q.dtype() == DType::F32
}

/// `Σ a·b` with eight independent accumulators, so the compiler vectorises it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Runs `f` over the contiguous f32 data of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> TensorResult<R>) -> TensorResult<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("paged attention: the tensor is not on the CPU");
    };
    if !layout.is_contiguous() {
        candle_core::bail!("paged attention: the tensor is not contiguous");
    }
    let data = cpu.as_slice::<f32>()?;
    f(&data[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()])
}

/// Attention of `q` (`[tokens, num_heads, head_dim]`, roped) over each sequence's cached keys
/// (`[slots, num_kv_heads · head_dim]`, key head `h / group` for query head `h`) and values
/// (`[slots, num_kv_heads · v_dim]`), causal within the new tokens. Returns
/// `[tokens, num_heads · v_dim]`.
pub fn paged_attention(
    q: &Tensor,
    cache: &LayerKvCache,
    batch: &ForwardBatch,
    num_kv_heads: usize,
    scale: f32,
) -> TensorResult {
    let (tokens, num_heads, d) = q.dims3()?;
    let group = num_heads / num_kv_heads;
    let k_width = cache.k.dim(1)?;
    let v_width = cache.v.dim(1)?;
    let v_dim = v_width / num_kv_heads;
    let q = q.contiguous()?;
    let tasks: Vec<(usize, usize)> = (0..batch.sequences.len())
        .flat_map(|s| (0..num_heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<Vec<f32>> = with_f32(&q, |q| {
        with_f32(&cache.k, |k| {
            with_f32(&cache.v, |v| {
                Ok(tasks
                    .par_iter()
                    .map(|&(s, h)| {
                        let seq = &batch.sequences[s];
                        let kv = h / group;
                        let past = seq.context_len - seq.query_len;
                        let mut out = vec![0f32; seq.query_len * v_dim];
                        let mut scores = Vec::with_capacity(seq.context_len);
                        for i in 0..seq.query_len {
                            let row = (seq.query_start + i) * num_heads + h;
                            let q_row = &q[row * d..(row + 1) * d];
                            scores.clear();
                            // Causal: token i of the chunk sees the past and itself.
                            for &slot in &seq.context_slots_host[..past + i + 1] {
                                let k_row = &k[slot as usize * k_width + kv * d..][..d];
                                scores.push(dot(q_row, k_row) * scale);
                            }
                            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                            let mut sum = 0f32;
                            for s in scores.iter_mut() {
                                *s = (*s - max).exp();
                                sum += *s;
                            }
                            let o = &mut out[i * v_dim..(i + 1) * v_dim];
                            for (&w, &slot) in scores.iter().zip(&seq.context_slots_host) {
                                let v_row = &v[slot as usize * v_width + kv * v_dim..][..v_dim];
                                let w = w / sum;
                                for (o, &x) in o.iter_mut().zip(v_row) {
                                    *o += w * x;
                                }
                            }
                        }
                        out
                    })
                    .collect())
            })
        })
    })?;
    let mut attn = vec![0f32; tokens * num_heads * v_dim];
    for (&(s, h), out) in tasks.iter().zip(results) {
        let seq = &batch.sequences[s];
        for i in 0..seq.query_len {
            let at = ((seq.query_start + i) * num_heads + h) * v_dim;
            attn[at..at + v_dim].copy_from_slice(&out[i * v_dim..(i + 1) * v_dim]);
        }
    }
    Tensor::from_vec(attn, (tokens, num_heads * v_dim), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SequenceInput;
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
        let (num_heads, kv_heads, d, v_dim, block) = (8, 2, 12, 12, 4);
        let slots = 64;
        let mut rng = StdRng::seed_from_u64(7);
        let mut rand_vec =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let k = rand_vec(slots * kv_heads * d);
        let v = rand_vec(slots * kv_heads * v_dim);
        let cache = LayerKvCache {
            k: Tensor::from_vec(k.clone(), (slots, kv_heads * d), &Device::Cpu).unwrap(),
            v: Tensor::from_vec(v.clone(), (slots, kv_heads * v_dim), &Device::Cpu).unwrap(),
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
        let out = paged_attention(&q_t, &cache, &batch, kv_heads, scale)
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
                        &seq.context_slots_host,
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
