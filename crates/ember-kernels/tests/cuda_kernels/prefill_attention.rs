use super::*;

/// MLA's prefill attention (causal, keys and values contiguous) on bf16 tensor cores against its
/// CPU reference: DeepSeek's heads (keys 192 = 128 + 64 rope, values 128) at a chunk alone, after
/// cached context, past one 64-row block and at 16 heads; the tiny checkpoints' heads (24 and 16,
/// not multiples of 16); one token. Random inputs in [-1, 1]. Tolerance 1e-2 of the largest
/// value (the probabilities round to bf16 before the product: about 2^-8 of it) plus the output's
/// bf16 rounding.
#[test]
fn prefill_attention_matches_the_cpu_reference() {
    use ember_kernels::prefill_attention::{self, PrefillShape};
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    for (q_len, kv_len, heads, dqk, dv) in [
        (37, 37, 3, 192, 128),
        (100, 170, 2, 192, 128),
        (64, 64, 16, 192, 128),
        (130, 131, 2, 24, 16),
        (5, 300, 4, 64, 32),
        (1, 1, 2, 192, 128),
    ] {
        let shape = PrefillShape {
            q_len,
            kv_len,
            heads,
            dqk,
            dv,
        };
        let what = format!("prefill_attention {shape:?}");
        let q: Vec<bf16> = random(&mut rng, q_len * heads * dqk, -1.0, 1.0);
        let kk: Vec<bf16> = random(&mut rng, kv_len * heads * dqk, -1.0, 1.0);
        let v: Vec<bf16> = random(&mut rng, kv_len * heads * dv, -1.0, 1.0);
        let scale = 1.5 / (dqk as f32).sqrt();
        let mut cpu = vec![bf16::ZERO; q_len * heads * dv];
        prefill_attention::prefill_attention(&mut cpu, &q, &kk, &v, &shape, scale).unwrap();
        let (dq, dk, dvv) = (
            st.clone_htod(&q).unwrap(),
            st.clone_htod(&kk).unwrap(),
            st.clone_htod(&v).unwrap(),
        );
        let mut dout = st.alloc_zeros::<bf16>(cpu.len()).unwrap();
        k.prefill_attention(
            &mut dout,
            &dq.as_view(),
            &dk.as_view(),
            &dvv.as_view(),
            &shape,
            scale,
        )
        .unwrap();
        let gpu = st.clone_dtoh(&dout).unwrap();
        let vmax = v.iter().map(|x| x.to_f32().abs()).fold(0f32, f32::max);
        assert_within(&what, &gpu, &cpu, (1.0 / 128.0, 1e-2 * vmax));
        eprintln!("{what}: matches");
    }
}
