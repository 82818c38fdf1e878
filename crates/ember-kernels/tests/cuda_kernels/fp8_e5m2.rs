use super::*;
use ember_kernels::fp8_e5m2;

/// e5m2 both ways over every magnitude it holds (subnormals to beyond its range, so saturation),
/// exact ties, infinities and NaN; and every one of the 256 codes decoded.
#[test]
fn e5m2_conversions_match_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    let s = k.stream();
    let mut x: Vec<f32> = (0..100_003)
        .map(|_| {
            let sign = if rng.random::<bool>() { -1.0 } else { 1.0 };
            sign * 2f32.powf(rng.random_range(-20.0..17.0)) * rng.random_range(1.0..2.0)
        })
        .collect();
    // Ties between neighbours (1.125 sits halfway between 1.0 and 1.25), specials.
    x.extend([
        1.125,
        1.375,
        2f32.powi(-17),
        3.0 * 2f32.powi(-17),
        53248.0,
        61440.0,
        0.0,
        -0.0,
    ]);
    x.extend([
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
    ]);
    let mut cpu = vec![0u8; x.len()];
    fp8_e5m2::encode_slice(&x, &mut cpu).unwrap();
    let dx = s.clone_htod(&x).unwrap();
    let mut dout = s.alloc_zeros::<u8>(x.len()).unwrap();
    k.e5m2_from_f32(&dx.as_view(), &mut dout).unwrap();
    let gpu = s.clone_dtoh(&dout).unwrap();
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        assert_eq!(g, c, "e5m2 of {:e} (element {i})", x[i]);
    }
    let codes: Vec<u8> = (0..=255).collect();
    let mut cpu = vec![0f32; 256];
    fp8_e5m2::decode_slice(&codes, &mut cpu).unwrap();
    let dcodes = s.clone_htod(&codes).unwrap();
    let mut dout = s.alloc_zeros::<f32>(256).unwrap();
    k.e5m2_to_f32(&dcodes.as_view(), &mut dout).unwrap();
    for (b, (g, c)) in s.clone_dtoh(&dout).unwrap().iter().zip(&cpu).enumerate() {
        assert!(
            g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()),
            "code {b}: {g} vs {c}"
        );
    }
}
