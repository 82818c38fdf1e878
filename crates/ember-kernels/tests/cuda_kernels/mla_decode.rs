use super::*;
use ember_kernels::paged_attention::PagedAttentionBatch;

/// MLA in the absorbed form: DeepSeek-V3 / Kimi K2 latents (rank 512, rope 64) with a rank's 16
/// heads at TP 8 and all 128, decodes of ragged lengths (at and across block boundaries, past
/// several tiles of 128) next to a prefill chunk, blocks scattered over a pool; each launched as
/// the kernel picks, and split 3 and 32 ways (flash-decoding), a long TP 8 decode splitting by
/// itself. Random latents in [-1, 1] and queries scaled as the model's softmax scale does;
/// tolerance as paged attention's:
/// f32 1e-4 relative + 1e-5, bf16 1/128 relative + 1e-3 (one rounding of 8 significant bits).
type MlaMix = (&'static str, usize, &'static [(usize, usize)]);

fn check_mla_decode<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    use ember_kernels::mla_decode::{self, MlaShape};
    let st = k.stream();
    let (rel, abs) = if T::KERNEL_SUFFIX == "bf16" {
        (1.0 / 128.0, 1e-3)
    } else {
        (1e-4, 1e-5)
    };
    let block = 16;
    let mixes: [MlaMix; 3] = [
        (
            "tp8 decodes",
            16,
            &[(0, 1), (15, 1), (16, 1), (300, 1), (1000, 1)],
        ),
        // One long decode of a rank's 16 heads: split to fill the GPU.
        ("tp8 long decode", 16, &[(6000, 1)]),
        (
            "all heads, prefill chunk and decodes",
            128,
            &[(40, 9), (127, 1), (128, 1)],
        ),
    ];
    for (name, num_heads, seqs) in mixes {
        let max_blocks = seqs
            .iter()
            .map(|(p, n)| (p + n).div_ceil(block))
            .max()
            .unwrap();
        let shape = MlaShape {
            num_heads,
            rank: 512,
            rope_dim: 64,
            block_size: block,
            max_blocks,
        };
        let needed: usize = seqs.iter().map(|(p, n)| (p + n).div_ceil(block)).sum();
        let pool = needed + 5;
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
        let tokens = token_seq.len();
        let slots = pool * block;
        let q: Vec<T> = random(rng, tokens * num_heads * 576, -1.0, 1.0);
        let latent: Vec<T> = random(rng, slots * 512, -1.0, 1.0);
        let rope: Vec<T> = random(rng, slots * 64, -1.0, 1.0);
        let batch = PagedAttentionBatch {
            block_tables: &tables,
            token_seq: &token_seq,
            token_ctx: &token_ctx,
        };
        let scale = 1.0 / (192f32).sqrt();
        let mut cpu = vec![T::from_f32(0.0); tokens * num_heads * 512];
        mla_decode::mla_decode(&mut cpu, &q, &latent, &rope, &batch, scale, &shape).unwrap();
        let (dq, dl, dr) = (
            st.clone_htod(&q).unwrap(),
            st.clone_htod(&latent).unwrap(),
            st.clone_htod(&rope).unwrap(),
        );
        let dbatch = k.upload_paged_batch(&batch, block, max_blocks).unwrap();
        let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
        k.mla_decode(
            &mut dout,
            &dq.as_view(),
            &dl.as_view(),
            &dr.as_view(),
            &dbatch,
            scale,
            &shape,
        )
        .unwrap();
        let auto = mla_decode::mla_decode_splits(&shape, tokens, 132);
        let mut runs = vec![(
            format!("auto ({auto} splits on 132 SMs)"),
            st.clone_dtoh(&dout).unwrap(),
        )];
        // The split form, forced: the short contexts' last splits are empty.
        for splits in [3usize, 32] {
            let mut dout = st.alloc_zeros::<T>(cpu.len()).unwrap();
            k.mla_decode_with_splits(
                &mut dout,
                &dq.as_view(),
                &dl.as_view(),
                &dr.as_view(),
                &dbatch,
                scale,
                &shape,
                splits,
            )
            .unwrap();
            runs.push((format!("{splits} splits"), st.clone_dtoh(&dout).unwrap()));
        }
        let what = format!("mla_decode_{} {name}", T::KERNEL_SUFFIX);
        assert_runs_match(&what, runs, &cpu, (rel, abs), tokens);
    }
}

#[test]
fn mla_decode_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    check_mla_decode::<f32>(&k, &mut rng);
    check_mla_decode::<bf16>(&k, &mut rng);
}
