use super::*;
use ember_kernels::paged_attention::{self, PagedAttentionBatch, PagedAttentionShape};

/// A batch mix for paged attention: per sequence, its cached positions before the step and the
/// new tokens it brings (1 = a decode), its blocks scattered over a pool.
struct Mix {
    name: &'static str,
    shape: PagedAttentionShape,
    /// (past, new) per sequence.
    seqs: &'static [(usize, usize)],
}

const MIXES: &[Mix] = &[
    Mix {
        // Qwen3-30B-A3B attention: 32 query heads over 4 kv heads of 128; decodes of ragged
        // lengths, one exactly at a block boundary, one past several tiles of 128.
        name: "gqa decode",
        shape: PagedAttentionShape {
            num_heads: 32,
            num_kv_heads: 4,
            head_dim: 128,
            v_dim: 128,
            block_size: 16,
            max_blocks: 0,
        },
        seqs: &[(0, 1), (15, 1), (16, 1), (100, 1), (700, 1)],
    },
    Mix {
        // Long decodes with few heads (a rank's share under tensor parallelism): the kernel
        // splits each context (flash-decoding) to fill the GPU.
        name: "long decodes, few heads",
        shape: PagedAttentionShape {
            num_heads: 4,
            num_kv_heads: 1,
            head_dim: 128,
            v_dim: 128,
            block_size: 16,
            max_blocks: 0,
        },
        seqs: &[(5000, 1), (1500, 1), (40, 1)],
    },
    Mix {
        // Prefill chunks next to decodes: a fresh prompt, a chunk after cached blocks, decodes.
        name: "mixed prefill and decode",
        shape: PagedAttentionShape {
            num_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
            v_dim: 64,
            block_size: 16,
            max_blocks: 0,
        },
        seqs: &[(0, 37), (48, 20), (9, 1), (130, 1)],
    },
    Mix {
        // MLA's absorbed decode shape: one latent "kv head" of 576 (512 + 64 rope) read by 16
        // heads, values 512 wide; block 64 as FlashMLA uses.
        name: "mla-shaped decode",
        shape: PagedAttentionShape {
            num_heads: 16,
            num_kv_heads: 1,
            head_dim: 576,
            v_dim: 512,
            block_size: 64,
            max_blocks: 0,
        },
        seqs: &[(3, 1), (200, 1), (63, 2)],
    },
];

fn check_paged_attention<T: CudaElement>(k: &CudaKernels, rng: &mut StdRng) {
    let st = k.stream();
    let (rel, abs) = paged_attention_tol::<T>();
    for mix in MIXES {
        let mut shape = mix.shape;
        let block = shape.block_size;
        let scattered = ScatteredBatch::new(rng, mix.seqs, block, 7);
        shape.max_blocks = scattered.max_blocks;
        let tokens = scattered.tokens();
        let slots = scattered.pool * block;
        let q: Vec<T> = random(rng, tokens * shape.num_heads * shape.head_dim, -1.0, 1.0);
        let kc: Vec<T> = random(rng, slots * shape.num_kv_heads * shape.head_dim, -1.0, 1.0);
        let vc: Vec<T> = random(rng, slots * shape.num_kv_heads * shape.v_dim, -1.0, 1.0);
        let batch = scattered.batch();
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let mut cpu = vec![T::from_f32(0.0); tokens * shape.num_heads * shape.v_dim];
        paged_attention::paged_attention(&mut cpu, &q, &kc, &vc, &batch, scale, &shape).unwrap();
        let (dq, dk, dv) = (
            st.clone_htod(&q).unwrap(),
            st.clone_htod(&kc).unwrap(),
            st.clone_htod(&vc).unwrap(),
        );
        let dbatch = k
            .upload_paged_batch(&batch, shape.block_size, shape.max_blocks)
            .unwrap();
        let inputs = [&dq.as_view(), &dk.as_view(), &dv.as_view()];
        let auto = paged_attention::paged_attention_splits(&shape, tokens, 132);
        // The split form (flash-decoding), forced: some splits of the short contexts are empty.
        let splits = [2, 7, paged_attention::MAX_SPLITS];
        let runs = split_runs(k, cpu.len(), auto, &splits, |dout, splits| {
            let [q, k_cache, v_cache] = inputs;
            match splits {
                None => k.paged_attention(dout, q, k_cache, v_cache, &dbatch, scale, &shape),
                Some(n) => k.paged_attention_with_splits(dout, inputs, &dbatch, scale, &shape, n),
            }
            .unwrap()
        });
        let what = format!("paged_attention_{} {}", T::KERNEL_SUFFIX, mix.name);
        assert_runs_match(&what, runs, &cpu, (rel, abs), tokens);
    }
}

#[test]
fn paged_attention_matches_the_cpu_reference() {
    check_f32_then_bf16(check_paged_attention::<f32>, check_paged_attention::<bf16>);
}

/// Paged metadata rewritten in place ([`CudaKernels::rewrite_paged_batch`], whole tables or
/// only the columns the contexts need, as a 2D copy) is what the kernel reads next, launched
/// directly and replayed from a CUDA graph captured over the old metadata: a decode graph's
/// mechanism. Within paged attention's tolerance of the CPU
/// reference on the new metadata; rewrites of another size or past the bound are refused.
#[test]
fn a_graph_replays_over_rewritten_paged_metadata() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    let shape = PagedAttentionShape {
        num_heads: 32,
        num_kv_heads: 4,
        head_dim: 128,
        v_dim: 128,
        block_size: 16,
        max_blocks: 64,
    };
    let (rows, pool) = (6usize, 200usize);
    let slots = pool * shape.block_size;
    let kc: Vec<f32> = random(
        &mut rng,
        slots * shape.num_kv_heads * shape.head_dim,
        -1.0,
        1.0,
    );
    let vc: Vec<f32> = random(
        &mut rng,
        slots * shape.num_kv_heads * shape.v_dim,
        -1.0,
        1.0,
    );
    let q: Vec<f32> = random(&mut rng, rows * shape.num_heads * shape.head_dim, -1.0, 1.0);
    let (dq, dk, dv) = (
        st.clone_htod(&q).unwrap(),
        st.clone_htod(&kc).unwrap(),
        st.clone_htod(&vc).unwrap(),
    );
    // One decode per row over a random context of random blocks.
    let step = |rng: &mut StdRng| {
        let mut tables = vec![0u32; rows * shape.max_blocks];
        let mut ctx = Vec::with_capacity(rows);
        for r in 0..rows {
            let len = rng.random_range(1..=shape.max_blocks * shape.block_size);
            for b in 0..len.div_ceil(shape.block_size) {
                tables[r * shape.max_blocks + b] = rng.random_range(0..pool as u32);
            }
            ctx.push(len as u32);
        }
        (tables, ctx)
    };
    let token_seq: Vec<u32> = (0..rows as u32).collect();
    let (tables, ctx) = step(&mut rng);
    fn decodes<'a>(
        tables: &'a [u32],
        token_seq: &'a [u32],
        ctx: &'a [u32],
    ) -> PagedAttentionBatch<'a> {
        PagedAttentionBatch {
            block_tables: tables,
            token_seq,
            token_ctx: ctx,
        }
    }
    let meta = k
        .upload_paged_batch_bounded(
            &decodes(&tables, &token_seq, &ctx),
            16,
            shape.max_blocks,
            pool,
        )
        .unwrap();
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let mut out = st
        .alloc_zeros::<f32>(rows * shape.num_heads * shape.v_dim)
        .unwrap();
    let launch = |out: &mut _| {
        k.paged_attention(
            out,
            &dq.as_view(),
            &dk.as_view(),
            &dv.as_view(),
            &meta,
            scale,
            &shape,
        )
        .unwrap()
    };
    st.synchronize().unwrap();
    st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    launch(&mut out);
    let graph = st
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    let check = |what: &str, gpu: &[f32], tables: &[u32], ctx: &[u32]| {
        let mut cpu = vec![0f32; gpu.len()];
        paged_attention::paged_attention(
            &mut cpu,
            &q,
            &kc,
            &vc,
            &decodes(tables, &token_seq, ctx),
            scale,
            &shape,
        )
        .unwrap();
        assert_within(what, gpu, &cpu, paged_attention_tol::<f32>());
    };
    for round in 0..6 {
        let (tables, ctx) = step(&mut rng);
        // Rounds 2 and up rewrite only the columns their contexts need (the graph path's).
        let width = if round < 2 {
            shape.max_blocks
        } else {
            ctx.iter()
                .map(|&c| (c as usize).div_ceil(shape.block_size))
                .max()
                .unwrap()
        };
        let narrow: Vec<u32> = tables
            .chunks(shape.max_blocks)
            .flat_map(|row| row[..width].to_vec())
            .collect();
        k.rewrite_paged_batch(&meta, &decodes(&narrow, &token_seq, &ctx), width)
            .unwrap();
        if round % 2 == 0 {
            graph.launch().unwrap();
        } else {
            launch(&mut out);
        }
        let gpu = st.clone_dtoh(&out).unwrap();
        check(
            &format!("round {round} ({width} columns)"),
            &gpu,
            &tables,
            &ctx,
        );
    }
    let (mut tables, ctx) = step(&mut rng);
    tables[0] = pool as u32;
    let w = shape.max_blocks;
    let err = k
        .rewrite_paged_batch(&meta, &decodes(&tables, &token_seq, &ctx), w)
        .unwrap_err();
    assert!(err.to_string().contains("bound to 200 blocks"), "{err}");
    let fewer = PagedAttentionBatch {
        block_tables: &tables[..(rows - 1) * w],
        token_seq: &token_seq[..rows - 1],
        token_ctx: &ctx[..rows - 1],
    };
    assert!(
        k.rewrite_paged_batch(&meta, &fewer, w).is_err(),
        "another size"
    );
    // Tables too narrow for a context are refused.
    let (tables, ctx) = step(&mut rng);
    let narrow: Vec<u32> = tables.chunks(w).map(|row| row[0]).collect();
    let long = ctx.iter().any(|&c| c as usize > shape.block_size);
    assert_eq!(
        k.rewrite_paged_batch(&meta, &decodes(&narrow, &token_seq, &ctx), 1)
            .is_err(),
        long
    );
    eprintln!("a graph over rewritten metadata matches the CPU reference, 6 rounds");
}
