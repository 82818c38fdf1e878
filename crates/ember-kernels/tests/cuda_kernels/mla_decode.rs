use super::*;

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
    let (rel, abs) = paged_attention_tol::<T>();
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
        let scattered = ScatteredBatch::new(rng, seqs, block, 5);
        let max_blocks = scattered.max_blocks;
        let shape = MlaShape {
            num_heads,
            rank: 512,
            rope_dim: 64,
            block_size: block,
            max_blocks,
        };
        let tokens = scattered.tokens();
        let slots = scattered.pool * block;
        let q: Vec<T> = random(rng, tokens * num_heads * 576, -1.0, 1.0);
        let latent: Vec<T> = random(rng, slots * 512, -1.0, 1.0);
        let rope: Vec<T> = random(rng, slots * 64, -1.0, 1.0);
        let batch = scattered.batch();
        let scale = 1.0 / (192f32).sqrt();
        let mut cpu = vec![T::from_f32(0.0); tokens * num_heads * 512];
        mla_decode::mla_decode(&mut cpu, &q, &latent, &rope, &batch, scale, &shape).unwrap();
        let (dq, dl, dr) = (
            st.clone_htod(&q).unwrap(),
            st.clone_htod(&latent).unwrap(),
            st.clone_htod(&rope).unwrap(),
        );
        let dbatch = k.upload_paged_batch(&batch, block, max_blocks).unwrap();
        let inputs = [&dq.as_view(), &dl.as_view(), &dr.as_view()];
        let auto = mla_decode::mla_decode_splits(&shape, tokens, 132);
        // The split form, forced: the short contexts' last splits are empty.
        let runs = split_runs(k, cpu.len(), auto, &[3, 32], |dout, splits| {
            let [q, latent, rope] = inputs;
            match splits {
                None => k.mla_decode(dout, q, latent, rope, &dbatch, scale, &shape),
                Some(n) => k.mla_decode_with_splits(dout, inputs, &dbatch, scale, &shape, n),
            }
            .unwrap()
        });
        let what = format!("mla_decode_{} {name}", T::KERNEL_SUFFIX);
        assert_runs_match(&what, runs, &cpu, (rel, abs), tokens);
    }
}

#[test]
fn mla_decode_matches_the_cpu_reference() {
    check_f32_then_bf16(check_mla_decode::<f32>, check_mla_decode::<bf16>);
}
