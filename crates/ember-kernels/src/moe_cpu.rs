//! The fused MoE on the CPU: one layer's routed experts for one step as blocked GEMMs that read
//! each active expert's weights once, on every core (rayon).
//!
//! The step's (token, expert) entries are grouped by expert ([`group_by_expert`], the CPU twin
//! of `moe_align` without the padding to GPU blocks). Then, in parallel over (expert, block of
//! intermediate channels), each block's gate and up rows are multiplied with all the expert's
//! rows at once and SiLU-and-mul is applied on the spot; and in parallel over blocks of output
//! channels, each block's down rows of every active expert are multiplied with the expert's
//! activations and added into the tokens' outputs with their routing weights. Tiles of rows x
//! weight rows keep the rows in cache while a weight row streams by once.
//!
//! The experts' weights are any [`WeightRows`] source: dense f32 / bf16 ([`fused_moe_cpu`]), or
//! packed 4-bit / e4m3 ones decoded in registers ([`fused_moe_rows`] over
//! [`crate::packed_cpu`]'s sources).
//!
//! Numerics: inputs and weights widened (or decoded) to f32, products summed in f32 (in lanes of
//! 8, so in another order than [`crate::fused_moe`]'s references), one rounding of the output.

use rayon::prelude::*;

use crate::cpu_dot::{run_task, use_fma, DenseRows, DotWeight, Task, WeightRows};
use crate::error::check_shape;
use crate::{Element, KernelError};

/// Sizes of one fused MoE call: `tokens` rows of `hidden`, each routed to `top_k` of
/// `num_experts` experts whose gate/up weights are `[num_experts, 2 * inter, hidden]` (gate rows,
/// then up rows) and down weights `[num_experts, hidden, inter]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeCpuShape {
    pub tokens: usize,
    pub top_k: usize,
    pub num_experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

/// The step's entries grouped by expert: expert `e`'s entry ids are
/// `entries[offsets[e]..offsets[e + 1]]`, in increasing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertGroups {
    pub offsets: Vec<usize>,
    pub entries: Vec<u32>,
}

/// Groups entries `0..topk_ids.len()` by their expert (a counting sort).
pub fn group_by_expert(topk_ids: &[u32], num_experts: usize) -> Result<ExpertGroups, KernelError> {
    if let Some(bad) = topk_ids.iter().find(|&&e| e as usize >= num_experts) {
        return Err(KernelError::Shape {
            op: "moe_cpu",
            message: format!("expert id {bad} of {num_experts} experts"),
        });
    }
    let mut offsets = vec![0usize; num_experts + 1];
    for &e in topk_ids {
        offsets[e as usize + 1] += 1;
    }
    for e in 0..num_experts {
        offsets[e + 1] += offsets[e];
    }
    let mut next = offsets.clone();
    let mut entries = vec![0u32; topk_ids.len()];
    for (id, &e) in topk_ids.iter().enumerate() {
        entries[next[e as usize]] = id as u32;
        next[e as usize] += 1;
    }
    Ok(ExpertGroups { offsets, entries })
}

/// Intermediate channels per gate/up task: 32 gate and 32 up rows.
const INTER_BLOCK: usize = 32;
/// Output channels per down task.
const HIDDEN_BLOCK: usize = 32;

/// `out[t] = Σ_j topk_weights[t·top_k + j] · down_e(silu(gate_e(x[t])) · up_e(x[t]))`, `e` =
/// `topk_ids[t·top_k + j]`: the routed experts' weighted sum for every token, over dense
/// weights: `w13` `[num_experts, 2 * inter, hidden]` and `w2` `[num_experts, hidden, inter]`.
pub fn fused_moe_cpu<T: Element, W: DotWeight>(
    out: &mut [T],
    x: &[T],
    topk_ids: &[u32],
    topk_weights: &[f32],
    w13: &[W],
    w2: &[W],
    s: &MoeCpuShape,
) -> Result<(), KernelError> {
    let (e, h, i) = (s.num_experts, s.hidden, s.inter);
    check_shape(
        w13.len() == e * 2 * i * h && w2.len() == e * h * i,
        "moe_cpu",
        || {
            format!(
                "{s:?} needs w13 of {}, w2 of {}; got w13 {}, w2 {}",
                e * 2 * i * h,
                e * h * i,
                w13.len(),
                w2.len()
            )
        },
    )?;
    if h == 0 || i == 0 {
        out.iter_mut().for_each(|v| *v = T::from_f32(0.0));
        return Ok(());
    }
    let w13: Vec<_> = w13
        .chunks_exact(2 * i * h)
        .map(|w| DenseRows::new(w, h))
        .collect();
    let w2: Vec<_> = w2
        .chunks_exact(h * i)
        .map(|w| DenseRows::new(w, i))
        .collect();
    fused_moe_rows(out, x, topk_ids, topk_weights, &w13, &w2, s)
}

/// [`fused_moe_cpu`] over any weight-row source: expert `e`'s gate then up rows are `w13[e]`
/// (`[2 * inter, hidden]`), its down rows `w2[e]` (`[hidden, inter]`).
pub fn fused_moe_rows<T: Element, R: WeightRows>(
    out: &mut [T],
    x: &[T],
    topk_ids: &[u32],
    topk_weights: &[f32],
    w13: &[R],
    w2: &[R],
    s: &MoeCpuShape,
) -> Result<(), KernelError> {
    fused_moe(use_fma(), out, x, (topk_ids, topk_weights), (w13, w2), s)
}

/// [`fused_moe_rows`], compiled for AVX2 and FMA when `fma` and every source allows it.
fn fused_moe<T: Element, R: WeightRows>(
    fma: bool,
    out: &mut [T],
    x: &[T],
    (topk_ids, topk_weights): (&[u32], &[f32]),
    (w13, w2): (&[R], &[R]),
    s: &MoeCpuShape,
) -> Result<(), KernelError> {
    let entries = s.tokens * s.top_k;
    let (e, h, i) = (s.num_experts, s.hidden, s.inter);
    let fits = |w: &[R], n, k| w.len() == e && w.iter().all(|w| (w.n(), w.k()) == (n, k));
    check_shape(
        out.len() == s.tokens * h
            && x.len() == s.tokens * h
            && topk_ids.len() == entries
            && topk_weights.len() == entries
            && fits(w13, 2 * i, h)
            && fits(w2, h, i),
        "moe_cpu",
        || {
            format!(
                "{s:?} needs out and x of {}, ids and weights of {entries}, {e} experts' \
                 [{}, {h}] gate/up and [{h}, {i}] down rows; got out {}, x {}, ids {}, \
                 weights {}, {} gate/up and {} down sources",
                s.tokens * h,
                2 * i,
                out.len(),
                x.len(),
                topk_ids.len(),
                topk_weights.len(),
                w13.len(),
                w2.len()
            )
        },
    )?;
    if s.tokens == 0 {
        return Ok(());
    }
    let groups = group_by_expert(topk_ids, s.num_experts)?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let fma = fma && w13.iter().chain(w2).all(|w| w.simd());

    // Gate/up and SiLU-and-mul, each expert's activations channel-major ([inter][rows]) so that
    // every task owns one contiguous block of them.
    let mut act_t = vec![0f32; topk_ids.len() * i];
    let mut tasks = Vec::new();
    let mut rest = act_t.as_mut_slice();
    for e in 0..s.num_experts {
        let rows = &groups.entries[groups.offsets[e]..groups.offsets[e + 1]];
        let (mine, tail) = rest.split_at_mut(rows.len() * i);
        rest = tail;
        if rows.is_empty() {
            continue;
        }
        for (b, block) in mine.chunks_mut(INTER_BLOCK * rows.len()).enumerate() {
            tasks.push((e, b * INTER_BLOCK, rows, block));
        }
    }
    tasks.into_par_iter().for_each(|(e, j0, rows, block)| {
        let job = GateUp {
            x: &xf,
            hidden: h,
            inter: i,
            top_k: s.top_k,
            rows,
            w: &w13[e],
            j0,
        };
        run_task(fma, &job, block);
    });

    // Each expert's activations row-major, for the down GEMM's dot products.
    let mut act = vec![0f32; act_t.len()];
    for e in 0..s.num_experts {
        let (o, m) = (groups.offsets[e], groups.offsets[e + 1] - groups.offsets[e]);
        for (j, col) in act_t[o * i..(o + m) * i].chunks_exact(m.max(1)).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                act[(o + r) * i + j] = v;
            }
        }
    }

    // Down and the weighted sum, output channel-major ([hidden][tokens]).
    let mut out_t = vec![0f32; s.tokens * h];
    out_t
        .par_chunks_mut(HIDDEN_BLOCK * s.tokens)
        .enumerate()
        .for_each(|(b, block)| {
            let job = Down {
                act: &act,
                inter: i,
                top_k: s.top_k,
                tokens: s.tokens,
                groups: &groups,
                weights: topk_weights,
                w2,
                n0: b * HIDDEN_BLOCK,
            };
            run_task(fma, &job, block);
        });
    for (n, col) in out_t.chunks_exact(s.tokens).enumerate() {
        for (t, &v) in col.iter().enumerate() {
            out[t * h + n] = T::from_f32(v);
        }
    }
    Ok(())
}

/// One gate/up task: a block of intermediate channels of one expert over all its rows.
struct GateUp<'a, R> {
    /// The step's rows, f32.
    x: &'a [f32],
    hidden: usize,
    inter: usize,
    top_k: usize,
    /// The expert's entry ids.
    rows: &'a [u32],
    /// The expert's gate rows, then its up rows.
    w: &'a R,
    /// The block's first intermediate channel.
    j0: usize,
}

impl<R: WeightRows> Task for GateUp<'_, R> {
    /// Writes `silu(gate) · up` of the block's channels, channel-major, into `block`.
    #[inline(always)]
    fn run<const FMA: bool>(&self, block: &mut [f32]) {
        let (h, m) = (self.hidden, self.rows.len());
        let row = |r: usize| &self.x[self.rows[r] as usize / self.top_k * h..][..h];
        for (j, out) in block.chunks_exact_mut(m).enumerate() {
            let js = [self.j0 + j, self.inter + self.j0 + j];
            self.w
                .row_dots::<2, FMA>(&row, 0..m, js, |r, [g, u]| out[r] = silu(g) * u);
        }
    }
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// One down task: a block of output channels over every active expert.
struct Down<'a, R> {
    /// Each expert's activations, row-major, in grouped order.
    act: &'a [f32],
    inter: usize,
    top_k: usize,
    tokens: usize,
    groups: &'a ExpertGroups,
    weights: &'a [f32],
    /// Each expert's down rows.
    w2: &'a [R],
    /// The block's first output channel.
    n0: usize,
}

impl<R: WeightRows> Task for Down<'_, R> {
    /// Adds the block's channels of every entry's weighted down projection into `block`
    /// (`[channels][tokens]`).
    #[inline(always)]
    fn run<const FMA: bool>(&self, block: &mut [f32]) {
        let (i, g) = (self.inter, self.groups);
        let channels = block.len() / self.tokens;
        for e in 0..g.offsets.len() - 1 {
            let (o, end) = (g.offsets[e], g.offsets[e + 1]);
            if o == end {
                continue;
            }
            let w = &self.w2[e];
            let row = |p: usize| &self.act[p * i..][..i];
            let mut add = |p: usize, n: usize, v: f32| {
                let id = g.entries[p] as usize;
                let t = id / self.top_k;
                block[n * self.tokens + t] += self.weights[id] * v;
            };
            for n in (0..channels).step_by(2) {
                let j = self.n0 + n;
                if n + 1 < channels {
                    w.row_dots::<2, FMA>(&row, o..end, [j, j + 1], |p, [a, b]| {
                        add(p, n, a);
                        add(p, n + 1, b);
                    });
                } else {
                    w.row_dots::<1, FMA>(&row, o..end, [j], |p, [a]| add(p, n, a));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::fused_moe::{self, GroupedGemmShape};
    use crate::silu_and_mul::silu_and_mul;

    /// The per-expert references of [`crate::fused_moe`] composed (align, grouped GEMM,
    /// SiLU-and-mul, grouped GEMM, weighted sum), in f32.
    fn reference(
        x: &[f32],
        ids: &[u32],
        weights: &[f32],
        w13: &[f32],
        w2: &[f32],
        s: &MoeCpuShape,
    ) -> Vec<f32> {
        let entries = ids.len();
        let align = fused_moe::moe_align(ids, s.num_experts, 64).unwrap();
        let up = GroupedGemmShape {
            num_experts: s.num_experts,
            k_in: s.hidden,
            n_out: 2 * s.inter,
            block_m: 64,
            x_div: s.top_k,
            num_entries: entries,
        };
        let down = GroupedGemmShape {
            k_in: s.inter,
            n_out: s.hidden,
            x_div: 1,
            ..up
        };
        let mut h = vec![0f32; entries * 2 * s.inter];
        let mut act = vec![0f32; entries * s.inter];
        let mut y = vec![0f32; entries * s.hidden];
        fused_moe::grouped_gemm(&mut h, x, w13, &align, &up).unwrap();
        silu_and_mul(&h, s.inter, &mut act).unwrap();
        fused_moe::grouped_gemm(&mut y, &act, w2, &align, &down).unwrap();
        let mut out = vec![0f32; s.tokens * s.hidden];
        fused_moe::moe_sum(&mut out, &y, weights, s.top_k, s.hidden).unwrap();
        out
    }

    /// Fresh random inputs for `s`: x, distinct experts per token, weights, w13, w2.
    #[allow(clippy::type_complexity)]
    fn inputs(s: &MoeCpuShape, seed: u64) -> (Vec<f32>, Vec<u32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut uniform = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| rng.random_range(-scale..scale))
                .collect::<Vec<_>>()
        };
        let x = uniform(s.tokens * s.hidden, 1.0);
        let w13 = uniform(s.num_experts * 2 * s.inter * s.hidden, 0.2);
        let w2 = uniform(s.num_experts * s.hidden * s.inter, 0.2);
        let weights = uniform(s.tokens * s.top_k, 1.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
        let mut ids = Vec::with_capacity(s.tokens * s.top_k);
        for _ in 0..s.tokens {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < s.top_k {
                let e = rng.random_range(0..s.num_experts as u32);
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            ids.extend(chosen);
        }
        (x, ids, weights, w13, w2)
    }

    /// Shapes with edges: rows per expert from 0 to past a tile, channels not a multiple of
    /// the lanes or blocks, one token, many tokens.
    const SHAPES: [MoeCpuShape; 3] = [
        MoeCpuShape {
            tokens: 1,
            top_k: 2,
            num_experts: 4,
            hidden: 40,
            inter: 24,
        },
        MoeCpuShape {
            tokens: 13,
            top_k: 3,
            num_experts: 5,
            hidden: 67,
            inter: 45,
        },
        MoeCpuShape {
            tokens: 40,
            top_k: 4,
            num_experts: 8,
            hidden: 130,
            inter: 70,
        },
    ];

    /// f32: within 1e-4 of the references' output plus 1e-4 of its size (sums in another
    /// order).
    #[test]
    fn f32_matches_the_per_expert_references() {
        for (n, s) in SHAPES.iter().enumerate() {
            let (x, ids, weights, w13, w2) = inputs(s, 7 + n as u64);
            let want = reference(&x, &ids, &weights, &w13, &w2, s);
            let mut got = vec![0f32; want.len()];
            fused_moe_cpu(&mut got, &x, &ids, &weights, &w13, &w2, s).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 + 1e-4 * w.abs(), "{s:?}: {g} vs {w}");
            }
        }
    }

    /// bf16 inputs and weights: within one bf16 rounding of the output (2⁻⁸ relative) plus
    /// 1e-4 of the references run in f32 on the same (widened) values.
    #[test]
    fn bf16_matches_the_per_expert_references_within_one_rounding() {
        for (n, s) in SHAPES.iter().enumerate() {
            let (x, ids, weights, w13, w2) = inputs(s, 70 + n as u64);
            let to_bf16 = |v: &[f32]| v.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
            let widen = |v: &[bf16]| v.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
            let (xb, w13b, w2b) = (to_bf16(&x), to_bf16(&w13), to_bf16(&w2));
            let want = reference(&widen(&xb), &ids, &weights, &widen(&w13b), &widen(&w2b), s);
            let mut got = vec![bf16::ZERO; want.len()];
            fused_moe_cpu(&mut got, &xb, &ids, &weights, &w13b, &w2b, s).unwrap();
            for (g, w) in got.iter().zip(&want) {
                let g = g.to_f32();
                assert!(
                    (g - w).abs() <= 1e-4 + (1e-4 + 1.0 / 256.0) * w.abs(),
                    "{s:?}: {g} vs {w}"
                );
            }
        }
    }

    /// Packed experts (4-bit integers with zero points, e2m1 under e4m3 scale bytes, e4m3 in
    /// 16 x 16 blocks) through [`fused_moe_rows`]: the f32 path over the same weights
    /// dequantized, within 1e-4 plus 1e-4 of the output (sums in another order). One token
    /// decodes the weights in registers; 13 tokens give experts more rows than a tile.
    #[test]
    fn packed_experts_match_their_dequantized_weights() {
        use crate::packed_cpu::tests::{w4_weight, w8_weight};
        use crate::packed_cpu::{W4Rows, W8Rows};
        use crate::w4a16::{self, W4Scales, W4a16Shape};
        use crate::w8a16::{self, W8a16Shape};

        let w4 = |n, k, e2m1| W4a16Shape {
            m: 0,
            n,
            k,
            group_size: 16,
            f16_weights: false,
            e2m1,
            zeros: !e2m1,
            scales: if e2m1 {
                W4Scales::E4m3Times
            } else {
                W4Scales::F32
            },
        };
        let w8 = |n, k| W8a16Shape {
            m: 0,
            n,
            k,
            block_n: 16,
            block_k: 16,
        };
        for tokens in [1, 13] {
            let s = MoeCpuShape {
                tokens,
                top_k: 3,
                num_experts: 5,
                hidden: 64,
                inter: 48,
            };
            let (x, ids, weights, _, _) = inputs(&s, 30 + tokens as u64);
            let (e, h, i) = (s.num_experts, s.hidden, s.inter);
            let mut want_w = (Vec::new(), Vec::new());
            for e2m1 in [false, true] {
                let (s13, s2) = (w4(2 * i, h, e2m1), w4(h, i, e2m1));
                let w13: Vec<_> = (0..e).map(|x| w4_weight(&s13, x as u64)).collect();
                let w2: Vec<_> = (0..e).map(|x| w4_weight(&s2, 10 + x as u64)).collect();
                let dense = |(c, q): &(Vec<u8>, Vec<f32>), sh: &W4a16Shape| {
                    let mut out = vec![0f32; sh.n * sh.k];
                    w4a16::dequantize(c, q, sh, &mut out).unwrap();
                    out
                };
                want_w.0 = w13.iter().flat_map(|w| dense(w, &s13)).collect();
                want_w.1 = w2.iter().flat_map(|w| dense(w, &s2)).collect();
                let r13: Vec<_> = w13
                    .iter()
                    .map(|(c, q)| W4Rows::new(c, q, &s13).unwrap())
                    .collect();
                let r2: Vec<_> = w2
                    .iter()
                    .map(|(c, q)| W4Rows::new(c, q, &s2).unwrap())
                    .collect();
                check_packed(&s, (&x, &ids, &weights), &want_w, (&r13, &r2));
            }
            let (s13, s2) = (w8(2 * i, h), w8(h, i));
            let w13: Vec<_> = (0..e).map(|x| w8_weight(&s13, 20 + x as u64)).collect();
            let w2: Vec<_> = (0..e).map(|x| w8_weight(&s2, 30 + x as u64)).collect();
            let dense = |(b, sc): &(Vec<u8>, Vec<f32>), sh: &W8a16Shape| {
                let mut out = vec![0f32; sh.n * sh.k];
                w8a16::dequantize(b, sc, sh, &mut out).unwrap();
                out
            };
            want_w.0 = w13.iter().flat_map(|w| dense(w, &s13)).collect();
            want_w.1 = w2.iter().flat_map(|w| dense(w, &s2)).collect();
            let r13: Vec<_> = w13
                .iter()
                .map(|(b, sc)| W8Rows::new(b, sc, &s13).unwrap())
                .collect();
            let r2: Vec<_> = w2
                .iter()
                .map(|(b, sc)| W8Rows::new(b, sc, &s2).unwrap())
                .collect();
            check_packed(&s, (&x, &ids, &weights), &want_w, (&r13, &r2));
        }
    }

    /// [`fused_moe_rows`] over packed `rows` against the reference over their dequantized
    /// weights `(w13, w2)`, with AVX2 where the CPU has it and portable.
    fn check_packed<R: WeightRows>(
        s: &MoeCpuShape,
        (x, ids, weights): (&[f32], &[u32], &[f32]),
        (w13, w2): &(Vec<f32>, Vec<f32>),
        (r13, r2): (&[R], &[R]),
    ) {
        let want = reference(x, ids, weights, w13, w2, s);
        for fma in [use_fma(), false] {
            let mut got = vec![0f32; want.len()];
            fused_moe(fma, &mut got, x, (ids, weights), (r13, r2), s).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 + 1e-4 * w.abs(),
                    "fma {fma}, {s:?}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn entries_are_grouped_by_expert_in_order() {
        let g = group_by_expert(&[2, 0, 2, 1, 0, 2], 4).unwrap();
        assert_eq!(g.offsets, [0, 2, 3, 6, 6]);
        assert_eq!(g.entries, [1, 4, 3, 0, 2, 5]);
        let err = group_by_expert(&[4], 4).unwrap_err().to_string();
        assert!(err.contains("expert id 4 of 4 experts"), "{err}");
    }

    #[test]
    fn a_wrong_length_is_refused() {
        let s = SHAPES[0];
        let (x, ids, weights, w13, w2) = inputs(&s, 1);
        let mut out = vec![0f32; s.tokens * s.hidden + 1];
        let err = fused_moe_cpu(&mut out, &x, &ids, &weights, &w13, &w2, &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("got out 41"), "{err}");
    }
}
