//! Each CUDA kernel against its CPU reference on fresh random inputs (the seed is printed, so a
//! failure can be replayed with EMBER_KERNEL_TEST_SEED). Skipped, saying so, without a GPU.
//! Tolerance: f32 within 2e-5 relative (plus 1e-6 absolute): only the order of the f32 sum and
//! rsqrtf/expf differ; bf16 within one bf16 ulp of the reference (2^-7 relative, plus 1e-6).
//! Paged attention sums softmax-weighted rows in tiles (online rescaling, __expf): f32 within
//! 1e-4 relative plus 1e-5 absolute, bf16 one ulp plus 1e-3 absolute (outputs are O(1)).
//! RoPE does the same f32 products and sums on both sides (no FMA on the GPU): bit-identical.
//! Argmax only compares: exact, ties (lowest id) and NaN included. e5m2 conversions are exact too.
//! W4A16 GEMM dequantizes exactly and sums in another order: within 1e-5 of the sum of the
//! terms' magnitudes (plus one bf16 ulp of the result for bf16); W8A16 (e4m3 weights, block
//! scales) the same.
//!
//! One file per op beside this one, as in `src/`; the fixtures they share are here.
#![cfg(feature = "cuda")]

mod fp8_e5m2;
mod fused_moe;
mod mla_decode;
mod moe_routing;
mod paged_attention;
mod prefill_attention;
mod rms_norm;
mod rotary;
mod sampling;
mod scatter_rows;
mod silu_and_mul;
mod staging;
mod w4a16;
mod w8a16;
mod w8a8;

use cudarc::driver::CudaSlice;
use ember_kernels::cuda::{CudaElement, CudaKernels, DeviceAlignment};
use ember_kernels::fused_moe::{moe_align, GroupedGemmShape, MoeAlignment};
use ember_kernels::paged_attention::PagedAttentionBatch;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Shapes (rows, hidden): one row, sizes under a warp, not a multiple of 32, and real hidden sizes.
const SHAPES: &[(usize, usize)] = &[(1, 8), (3, 33), (7, 1000), (64, 2048), (5, 4096), (2, 7168)];

fn kernels() -> Option<CudaKernels> {
    match CudaKernels::new(0) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("skipping: no usable CUDA GPU 0 ({e})");
            None
        }
    }
}

/// Runs an op's check for f32, then for bf16, on GPU 0 with one seeded rng; skipped without a GPU.
fn check_f32_then_bf16(
    check_f32: fn(&CudaKernels, &mut StdRng),
    check_bf16: fn(&CudaKernels, &mut StdRng),
) {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_f32(&k, &mut rng);
    check_bf16(&k, &mut rng);
}

fn rng() -> StdRng {
    let seed = std::env::var("EMBER_KERNEL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("EMBER_KERNEL_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn random<T: CudaElement>(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(lo..hi)))
        .collect()
}

/// Relative tolerance of one element type (see the file's doc).
fn rel_tol<T: CudaElement>() -> f32 {
    if T::KERNEL_SUFFIX == "bf16" {
        1.0 / 128.0
    } else {
        2e-5
    }
}

fn assert_close<T: CudaElement>(what: &str, gpu: &[T], cpu: &[T]) {
    assert_eq!(gpu.len(), cpu.len());
    assert_within(what, gpu, cpu, (rel_tol::<T>(), 1e-6));
}

/// Each element of `gpu` within `rel · |cpu| + abs` of `cpu`'s.
fn assert_within<T: CudaElement>(what: &str, gpu: &[T], cpu: &[T], (rel, abs): (f32, f32)) {
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let (g, c) = (g.to_f32(), c.to_f32());
        let tol = rel * c.abs() + abs;
        assert!(
            (g - c).abs() <= tol,
            "{what}[{i}]: GPU {g} vs CPU {c} (tolerance {tol})"
        );
    }
}

/// Paged attention's and MLA decode's tolerance `(rel, abs)` (see the file's doc).
fn paged_attention_tol<T: CudaElement>() -> (f32, f32) {
    if T::KERNEL_SUFFIX == "bf16" {
        (1.0 / 128.0, 1e-3)
    } else {
        (1e-4, 1e-5)
    }
}

/// GEMM outputs `[m, n]` within `sum_tol` of the sum of their terms' magnitudes
/// (`magnitude(row, column)`: the sums run in another order), plus one bf16 ulp of the result
/// for bf16.
fn assert_gemm_close<T: CudaElement>(
    what: &str,
    [m, n]: [usize; 2],
    gpu: &[T],
    cpu: &[T],
    sum_tol: f32,
    magnitude: impl Fn(usize, usize) -> f32,
) {
    for r in 0..m {
        for j in 0..n {
            let (g, c) = (gpu[r * n + j].to_f32(), cpu[r * n + j].to_f32());
            let ulp = if T::KERNEL_SUFFIX == "bf16" {
                c.abs() / 128.0
            } else {
                0.0
            };
            let tol = sum_tol * magnitude(r, j) + ulp + 1e-6;
            assert!(
                (g - c).abs() <= tol,
                "{what}[{r}, {j}]: GPU {g} vs CPU {c} (tolerance {tol})"
            );
        }
    }
}

/// A grouped GEMM's entries for a test: `tokens · top_k` of them on random experts, the shape of
/// a GEMM over them (`x_div` entries to an `x` row), and their alignment on the host and, by
/// `moe_align`, on the GPU.
struct RandomEntries {
    ids: Vec<u32>,
    shape: GroupedGemmShape,
    align: MoeAlignment,
    dalign: DeviceAlignment,
}

impl RandomEntries {
    fn new(
        k: &CudaKernels,
        rng: &mut StdRng,
        [tokens, top_k, experts]: [usize; 3],
        [n_out, k_in]: [usize; 2],
        x_div: usize,
    ) -> Self {
        let n = tokens * top_k;
        let ids: Vec<u32> = (0..n)
            .map(|_| rng.random_range(0..experts as u32))
            .collect();
        let shape = GroupedGemmShape {
            num_experts: experts,
            k_in,
            n_out,
            block_m: 64,
            x_div,
            num_entries: n,
        };
        let align = moe_align(&ids, experts, 64).unwrap();
        let dids = k.stream().clone_htod(&ids).unwrap();
        let dalign = k.moe_align(&dids.as_view(), experts, 64).unwrap();
        RandomEntries {
            ids,
            shape,
            align,
            dalign,
        }
    }
}

/// The same bits, element by element.
fn assert_bits_equal<T: CudaElement>(what: &str, gpu: &[T], cpu: &[T]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert_eq!(g.to_f32().to_bits(), c.to_f32().to_bits(), "{what}[{i}]");
    }
}

#[test]
fn ptxas_reported_every_kernel_for_every_architecture_without_spills() {
    let report = ember_kernels::cuda::PTXAS_RESOURCE_USAGE;
    for kernel in [
        "rms_norm_f32",
        "rms_norm_bf16",
        "fused_add_rms_norm_f32",
        "silu_and_mul_bf16",
        "rotary_embedding_f32",
        "rotary_embedding_bf16",
        "argmax_f32",
        "e5m2_from_f32",
        "e5m2_to_f32",
        "scatter_rows_u8",
        "w4a16_gemm_f32",
        "w4a16_gemm_bf16",
        "w8a16_gemm_f32",
        "w8a16_gemm_bf16",
        "w4a16_dequant_bf16",
        "w8a16_dequant_bf16",
        "mla_decode_f32",
        "mla_decode_bf16",
        "grouped_w8a16_f32",
        "grouped_w8a16_bf16",
        "grouped_w4a16_f32",
        "grouped_w4a16_bf16",
        "sample_rows_f32",
        "quant_fp8_groups_bf16",
        "w8a8_gemm_bf16",
        "grouped_w8a8_bf16",
        "rotary_embedding_rows_bf16",
        "paged_attention_bf16",
        "paged_attention_split_bf16",
        "paged_attention_merge_bf16",
        "mla_decode_split_bf16",
        "mla_decode_merge_bf16",
    ] {
        assert!(
            report.contains(&format!("::{kernel} ")),
            "{kernel} missing from:\n{report}"
        );
    }
    assert!(!report.contains("SPILL"), "a kernel spills:\n{report}");
}

/// A step's paged metadata for sequences of `(past, new)` tokens (1 new: a decode) in blocks of
/// `block` positions, each sequence's blocks drawn in a random order from a pool of `spare`
/// blocks more than they need.
struct ScatteredBatch {
    tables: Vec<u32>,
    token_seq: Vec<u32>,
    token_ctx: Vec<u32>,
    /// Blocks of the longest sequence: the tables' width.
    max_blocks: usize,
    /// Blocks in the pool.
    pool: usize,
}

impl ScatteredBatch {
    fn new(rng: &mut StdRng, seqs: &[(usize, usize)], block: usize, spare: usize) -> Self {
        let blocks = |&(past, new): &(usize, usize)| (past + new).div_ceil(block);
        let max_blocks = seqs.iter().map(blocks).max().unwrap();
        let pool = seqs.iter().map(blocks).sum::<usize>() + spare;
        let mut free: Vec<u32> = (0..pool as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.random_range(0..=i));
        }
        let mut tables = vec![0u32; seqs.len() * max_blocks];
        let (mut token_seq, mut token_ctx) = (vec![], vec![]);
        for (s, &(past, new)) in seqs.iter().enumerate() {
            for b in 0..(past + new).div_ceil(block) {
                tables[s * max_blocks + b] = free.pop().unwrap();
            }
            for i in 0..new {
                token_seq.push(s as u32);
                token_ctx.push((past + i + 1) as u32);
            }
        }
        ScatteredBatch {
            tables,
            token_seq,
            token_ctx,
            max_blocks,
            pool,
        }
    }

    fn batch(&self) -> PagedAttentionBatch<'_> {
        PagedAttentionBatch {
            block_tables: &self.tables,
            token_seq: &self.token_seq,
            token_ctx: &self.token_ctx,
        }
    }

    fn tokens(&self) -> usize {
        self.token_seq.len()
    }
}

/// A paged kernel's runs for [`assert_runs_match`]: `launch(out, None)` as the kernel picks its
/// splits (`auto` of them on 132 SMs), then `launch(out, Some(n))` forced to each of `splits`,
/// each into fresh zeros of `len`.
fn split_runs<T: CudaElement>(
    k: &CudaKernels,
    len: usize,
    auto: usize,
    splits: &[usize],
    launch: impl Fn(&mut CudaSlice<T>, Option<usize>),
) -> Vec<(String, Vec<T>)> {
    let st = k.stream();
    let run = |splits| {
        let mut dout = st.alloc_zeros::<T>(len).unwrap();
        launch(&mut dout, splits);
        st.clone_dtoh(&dout).unwrap()
    };
    let mut runs = vec![(format!("auto ({auto} splits on 132 SMs)"), run(None))];
    for &n in splits {
        runs.push((format!("{n} splits"), run(Some(n))));
    }
    runs
}

/// Each GPU run (how it was launched, its output) within `rel · |cpu| + abs` of `cpu`.
fn assert_runs_match<T: CudaElement>(
    what: &str,
    runs: Vec<(String, Vec<T>)>,
    cpu: &[T],
    (rel, abs): (f32, f32),
    tokens: usize,
) {
    for (how, gpu) in runs {
        assert_within(&format!("{what}, {how}"), &gpu, cpu, (rel, abs));
        eprintln!("{what}, {how}: {tokens} tokens match");
    }
}
