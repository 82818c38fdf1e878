//! What `--load-format dummy` holds: seeded random tensors in the shapes a real checkpoint of the
//! config has, with nothing read but config.json. Unquantized tensors are small uniform floats
//! (norm scales are ones). Under a `quantization_config`, each linear module the checkpoint
//! quantizes ([`QuantizedModules`]) holds the tensors its format stores, with the same names,
//! dtypes and shapes. Their codes are random. Their scales are positive (and their zero points
//! in range) so that the dequantized weight has the magnitude of an unquantized dummy weight.
//! Every tensor depends only on the seed and its name.

use candle_core::{DType, Device, Shape, Tensor};
use ember_core::{EmberError, Nvfp4Layout, QuantizedModules, Result, WeightQuantization};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// float8_e4m3fn's largest finite value.
const E4M3_MAX: f32 = 448.0;
/// e2m1's largest magnitude.
const E2M1_MAX: f32 = 6.0;

/// Tensor names the quantized formats store beside (or instead of) a linear module's `weight`.
const FORMAT_NAMES: &[&str] = &[
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    "weight_global_scale",
    "weight_scale_2",
    "weight_scale_inv",
    "input_scale",
    "qweight",
    "qzeros",
    "scales",
    "g_idx",
];

/// A checkpoint of random tensors: its seed, and how it stores its linear modules.
pub(crate) struct DummyCheckpoint {
    seed: u64,
    scheme: Option<WeightQuantization>,
    modules: QuantizedModules,
}

/// How one stored tensor of a quantized module is filled.
enum Fill {
    /// Random bits: packed integer or e2m1 codes, where every bit pattern is a valid code.
    Bits,
    /// Uniform in `[low, high)`, rounded to the dtype: scales, and e4m3 weights.
    Uniform(f32, f32),
    Constant(f32),
    /// Zero points, `bits` wide, uniform in `low..=high` and packed from each int32's lowest
    /// bits (stored less one under GPTQ's v1). In packings where fields straddle words (3, 5,
    /// 6 and 7 bits), a straddling field takes whatever value its bits make, still in range.
    ZeroPoints {
        bits: u32,
        low: u32,
        high: u32,
        less_one: bool,
    },
    /// e8m0 exponents uniform in `low..=high`.
    Exponents(u8, u8),
    /// The weight's `[out, in]` (compressed-tensors' `weight_shape`).
    WeightShape([usize; 2]),
    /// Each input's group, in order (GPTQ's `g_idx` without activation order).
    GroupIndex(Option<usize>),
}

/// One tensor a quantized linear module stores.
struct StoredTensor {
    dtype: DType,
    shape: Vec<usize>,
    fill: Fill,
}

/// Tensor `name`, stored in `dtype` and `shape`, filled by `fill`.
fn stored(
    name: &'static str,
    dtype: DType,
    shape: &[usize],
    fill: Fill,
) -> (&'static str, StoredTensor) {
    let tensor = StoredTensor {
        dtype,
        shape: shape.to_vec(),
        fill,
    };
    (name, tensor)
}

/// Positive scales, at most `top` and at least half of it.
fn scales(top: f32) -> Fill {
    Fill::Uniform(0.5 * top, top)
}

/// The tensors `scheme` stores for a linear weight `[out, in]`, by name. `t` is the unquantized
/// dummy's bound (`1 / sqrt(in)`); each format's largest code times its largest scale is about
/// `t`.
fn format_tensors(
    scheme: WeightQuantization,
    [out, inputs]: [usize; 2],
) -> Vec<(&'static str, StoredTensor)> {
    use DType::{BF16, F16, F32, F8E4M3, I32, I64, U8};
    let t = 1.0 / (inputs.max(1) as f32).sqrt();
    let groups = |size: Option<usize>| size.map_or(1, |g| inputs.div_ceil(g));
    // Integer zero points in the middle half of their range, so `q - z` stays within it.
    let zero_points = |bits: u32, less_one: bool| Fill::ZeroPoints {
        bits,
        low: 1 << bits >> 2,
        high: (3 << bits >> 2) - 1,
        less_one,
    };
    match scheme {
        WeightQuantization::PackedInt {
            num_bits,
            group_size,
            symmetric,
        } => {
            let (bits, g) = (num_bits as usize, groups(group_size));
            let half = (1u32 << (num_bits - 1)) as f32;
            let mut tensors = vec![
                stored(
                    "weight_packed",
                    I32,
                    &[out, (inputs * bits).div_ceil(32)],
                    Fill::Bits,
                ),
                stored("weight_scale", BF16, &[out, g], scales(t / half)),
                stored("weight_shape", I64, &[2], Fill::WeightShape([out, inputs])),
            ];
            if !symmetric {
                let shape = [(out * bits).div_ceil(32), g];
                let zeros = zero_points(num_bits, false);
                tensors.push(stored("weight_zero_point", I32, &shape, zeros));
            }
            tensors
        }
        WeightQuantization::Gptq {
            bits,
            group_size,
            v1,
        } => {
            let (per_word, g) = ((32 / bits) as usize, groups(group_size));
            let half = (1u32 << (bits - 1)) as f32;
            vec![
                stored(
                    "qweight",
                    I32,
                    &[inputs.div_ceil(per_word), out],
                    Fill::Bits,
                ),
                stored(
                    "qzeros",
                    I32,
                    &[g, out.div_ceil(per_word)],
                    zero_points(bits, v1),
                ),
                stored("scales", F16, &[g, out], scales(t / half)),
                stored("g_idx", I32, &[inputs], Fill::GroupIndex(group_size)),
            ]
        }
        WeightQuantization::Awq { group_size } => {
            let g = groups(Some(group_size));
            vec![
                stored("qweight", I32, &[inputs, out.div_ceil(8)], Fill::Bits),
                stored("qzeros", I32, &[g, out.div_ceil(8)], zero_points(4, false)),
                stored("scales", F16, &[g, out], scales(t / 8.0)),
            ]
        }
        WeightQuantization::Nvfp4(layout) => {
            // w = e2m1 · scale / global (compressed-tensors) or · scale · scale_2 (ModelOpt).
            let codes = [out, inputs.div_ceil(2)];
            let scale = stored(
                "weight_scale",
                F8E4M3,
                &[out, inputs.div_ceil(16)],
                scales(E4M3_MAX),
            );
            let global = E2M1_MAX * E4M3_MAX / t;
            match layout {
                Nvfp4Layout::CompressedTensors => vec![
                    stored("weight_packed", U8, &codes, Fill::Bits),
                    scale,
                    stored("weight_global_scale", F32, &[1], Fill::Constant(global)),
                ],
                Nvfp4Layout::ModelOpt => vec![
                    stored("weight", U8, &codes, Fill::Bits),
                    scale,
                    stored("weight_scale_2", F32, &[], Fill::Constant(1.0 / global)),
                    stored("input_scale", F32, &[], Fill::Constant(1.0)),
                ],
            }
        }
        WeightQuantization::Mxfp4 => {
            // The largest power of two p with 6p <= t, and half of it.
            let top = (127.0 + (t / E2M1_MAX).log2().floor()).clamp(2.0, 254.0) as u8;
            vec![
                stored("weight_packed", U8, &[out, inputs.div_ceil(2)], Fill::Bits),
                stored(
                    "weight_scale",
                    U8,
                    &[out, inputs.div_ceil(32)],
                    Fill::Exponents(top - 1, top),
                ),
            ]
        }
        WeightQuantization::Fp8Block([block_rows, block_cols]) => {
            let blocks = [out.div_ceil(block_rows), inputs.div_ceil(block_cols)];
            vec![
                stored(
                    "weight",
                    F8E4M3,
                    &[out, inputs],
                    Fill::Uniform(-E4M3_MAX, E4M3_MAX),
                ),
                stored("weight_scale_inv", F32, &blocks, scales(t / E4M3_MAX)),
            ]
        }
    }
}

impl DummyCheckpoint {
    /// Unquantized random weights from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            seed,
            scheme: None,
            modules: QuantizedModules::default(),
        }
    }

    /// The same checkpoint storing the linear modules `modules` names in `scheme`.
    pub(crate) fn quantized(
        self,
        scheme: Option<WeightQuantization>,
        modules: QuantizedModules,
    ) -> Self {
        Self {
            scheme,
            modules,
            ..self
        }
    }

    /// The tensors stored for the module at `module`, when it is a linear one (`linear`: its
    /// weight's `[out, in]`) that the checkpoint quantizes.
    fn module_tensors(
        &self,
        module: &str,
        linear: Option<[usize; 2]>,
    ) -> Option<Vec<(&'static str, StoredTensor)>> {
        let (scheme, shape) = (self.scheme?, linear?);
        self.modules
            .quantizes(module)
            .then(|| format_tensors(scheme, shape))
    }

    fn stored_tensor(
        &self,
        module: &str,
        linear: Option<[usize; 2]>,
        name: &str,
    ) -> Option<StoredTensor> {
        self.module_tensors(module, linear)?
            .into_iter()
            .find_map(|(n, t)| (n == name).then_some(t))
    }

    /// The dtype tensor `name` of `module` is stored in, when quantized storage (else `None`,
    /// as for any unquantized tensor).
    pub(crate) fn stored_dtype(
        &self,
        module: &str,
        linear: Option<[usize; 2]>,
        name: &str,
    ) -> Option<DType> {
        self.stored_tensor(module, linear, name).map(|t| t.dtype)
    }

    /// Whether the checkpoint holds tensor `name` of `module`: a quantized linear module holds
    /// its format's tensors and no other format's (nor a float `weight`, when the format
    /// replaces it); any other module holds everything but quantized storage.
    pub(crate) fn contains(&self, module: &str, linear: Option<[usize; 2]>, name: &str) -> bool {
        if linear.is_none() {
            return true;
        }
        match self.module_tensors(module, linear) {
            Some(tensors) => {
                tensors.iter().any(|(n, _)| *n == name)
                    || !(name == "weight" || FORMAT_NAMES.contains(&name))
            }
            None => !FORMAT_NAMES.contains(&name),
        }
    }

    /// Tensor `name` of `module` as its format stores it, on the CPU; `None` when it is not
    /// quantized storage.
    pub(crate) fn load_stored(
        &self,
        module: &str,
        linear: Option<[usize; 2]>,
        name: &str,
    ) -> Option<Result<Tensor>> {
        let tensor = self.stored_tensor(module, linear, name)?;
        Some(self.fill(&full_name(module, name), &tensor))
    }

    fn fill(&self, name: &str, tensor: &StoredTensor) -> Result<Tensor> {
        let len = tensor.shape.iter().product();
        let shape = Shape::from(tensor.shape.clone());
        let cpu = &Device::Cpu;
        let seed = self.seed;
        let made = match tensor.fill {
            Fill::Bits if tensor.dtype == DType::U8 => Tensor::from_vec(
                random_values(len, seed, name, |r| r.random::<u8>()),
                shape,
                cpu,
            ),
            Fill::Bits => Tensor::from_vec(
                random_values(len, seed, name, |r| r.random::<u32>() as i32),
                shape,
                cpu,
            ),
            Fill::Uniform(low, high) => Tensor::from_vec(
                random_values(len, seed, name, |r| r.random_range(low..high)),
                shape,
                cpu,
            ),
            Fill::Constant(v) => Tensor::from_vec(vec![v; len], shape, cpu),
            Fill::ZeroPoints {
                bits,
                low,
                high,
                less_one,
            } => {
                let word = move |r: &mut StdRng| {
                    (0..32 / bits).fold(0u32, |w, k| {
                        let z = r.random_range(low..=high) - u32::from(less_one);
                        w | z << (k * bits)
                    }) as i32
                };
                Tensor::from_vec(random_values(len, seed, name, word), shape, cpu)
            }
            Fill::Exponents(low, high) => Tensor::from_vec(
                random_values(len, seed, name, |r| r.random_range(low..=high)),
                shape,
                cpu,
            ),
            Fill::WeightShape([out, inputs]) => {
                Tensor::from_vec(vec![out as i64, inputs as i64], shape, cpu)
            }
            Fill::GroupIndex(size) => {
                let groups = (0..len).map(|i| size.map_or(0, |g| i / g) as i32).collect();
                Tensor::from_vec::<_, i32>(groups, shape, cpu)
            }
        };
        made.and_then(|t| t.to_dtype(tensor.dtype))
            .map_err(|e| EmberError::Tensor(format!("dummy tensor `{name}`: {e}")))
    }

    /// An unquantized tensor `name` (its full name): norm scales are ones (as initialised models
    /// have them); other weights uniform in `±1 / sqrt(fan_in)`, f32.
    pub(crate) fn float_tensor(
        &self,
        name: &str,
        shape: &Shape,
        device: &Device,
    ) -> Result<Tensor> {
        let made = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, device)
        } else {
            let fan_in = *shape.dims().last().unwrap_or(&1) as f32;
            let scale = 1.0 / fan_in.sqrt();
            let values = random_values(shape.elem_count(), self.seed, name, |r| {
                r.random_range(-scale..scale)
            });
            Tensor::from_vec(values, shape.clone(), device)
        };
        made.map_err(|e| EmberError::Tensor(e.to_string()))
    }
}

/// `module.name`.
fn full_name(module: &str, name: &str) -> String {
    if module.is_empty() {
        name.to_string()
    } else {
        format!("{module}.{name}")
    }
}

/// `len` values drawn by `draw`, from one random stream per tensor name and chunk, so values
/// depend neither on load order nor on threads.
fn random_values<T: Copy + Default + Send>(
    len: usize,
    seed: u64,
    name: &str,
    draw: impl Fn(&mut StdRng) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut values = vec![T::default(); len];
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = StdRng::seed_from_u64(
                seed ^ name_hash ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            chunk.iter_mut().for_each(|v| *v = draw(&mut rng));
        });
    values
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use ember_core::quantization::parse_quantized_modules;
    use ember_core::{Nvfp4Layout, QuantizedModules, WeightQuantization};
    use serde_json::json;

    use crate::linear::quantized::dequantize_weight;
    use crate::loading::context::LoadContext;
    use crate::loading::weights::Weights;

    /// A linear weight `[OUT, IN]`: every format's groups and packings divide it.
    const IN: usize = 64;
    const OUT: usize = 48;
    const EXPERT: &str = "model.layers.0.mlp.experts.3.down_proj";

    fn checkpoint(seed: u64, scheme: WeightQuantization, modules: QuantizedModules) -> Weights {
        Weights::dummy_quantized(seed, Some(scheme), modules, DType::F32, &Device::Cpu)
    }

    fn linear(weights: &Weights, path: &str) -> Weights {
        weights.pp(path).as_linear(IN, OUT)
    }

    /// A stored tensor's name, dtype and shape.
    type Stored = (&'static str, DType, Vec<usize>);

    /// Each format with the tensors a real checkpoint of it stores for an `[OUT, IN]` weight.
    fn formats() -> Vec<(WeightQuantization, Vec<Stored>)> {
        use DType::{BF16, F16, F32, F8E4M3, I32, I64, U8};
        vec![
            (
                WeightQuantization::PackedInt {
                    num_bits: 4,
                    group_size: Some(32),
                    symmetric: true,
                },
                vec![
                    ("weight_packed", I32, vec![OUT, IN / 8]),
                    ("weight_scale", BF16, vec![OUT, 2]),
                    ("weight_shape", I64, vec![2]),
                ],
            ),
            (
                WeightQuantization::PackedInt {
                    num_bits: 8,
                    group_size: None,
                    symmetric: false,
                },
                vec![
                    ("weight_packed", I32, vec![OUT, IN / 4]),
                    ("weight_scale", BF16, vec![OUT, 1]),
                    ("weight_shape", I64, vec![2]),
                    ("weight_zero_point", I32, vec![OUT / 4, 1]),
                ],
            ),
            (
                WeightQuantization::Gptq {
                    bits: 4,
                    group_size: Some(32),
                    v1: true,
                },
                vec![
                    ("qweight", I32, vec![IN / 8, OUT]),
                    ("qzeros", I32, vec![2, OUT / 8]),
                    ("scales", F16, vec![2, OUT]),
                    ("g_idx", I32, vec![IN]),
                ],
            ),
            (
                WeightQuantization::Awq { group_size: 32 },
                vec![
                    ("qweight", I32, vec![IN, OUT / 8]),
                    ("qzeros", I32, vec![2, OUT / 8]),
                    ("scales", F16, vec![2, OUT]),
                ],
            ),
            (
                WeightQuantization::Nvfp4(Nvfp4Layout::CompressedTensors),
                vec![
                    ("weight_packed", U8, vec![OUT, IN / 2]),
                    ("weight_scale", F8E4M3, vec![OUT, IN / 16]),
                    ("weight_global_scale", F32, vec![1]),
                ],
            ),
            (
                WeightQuantization::Nvfp4(Nvfp4Layout::ModelOpt),
                vec![
                    ("weight", U8, vec![OUT, IN / 2]),
                    ("weight_scale", F8E4M3, vec![OUT, IN / 16]),
                    ("weight_scale_2", F32, vec![]),
                    ("input_scale", F32, vec![]),
                ],
            ),
            (
                WeightQuantization::Mxfp4,
                vec![
                    ("weight_packed", U8, vec![OUT, IN / 2]),
                    ("weight_scale", U8, vec![OUT, IN / 32]),
                ],
            ),
            (
                WeightQuantization::Fp8Block([128, 128]),
                vec![
                    ("weight", F8E4M3, vec![OUT, IN]),
                    ("weight_scale_inv", F32, vec![1, 1]),
                ],
            ),
        ]
    }

    #[test]
    fn each_format_stores_its_tensors_by_name_dtype_and_shape() {
        for (scheme, expected) in formats() {
            let w = linear(&checkpoint(0, scheme, Default::default()), EXPERT);
            for (name, dtype, shape) in &expected {
                assert!(w.contains(name), "{scheme:?} {name}");
                assert_eq!(w.stored_dtype(name), Some(*dtype), "{scheme:?} {name}");
                let t = w.get_stored(name).unwrap();
                assert_eq!(
                    (t.dtype(), t.dims()),
                    (*dtype, shape.as_slice()),
                    "{scheme:?} {name}"
                );
            }
            // No other format's tensors, and no float `weight` where the format replaces it.
            for (_, others) in formats() {
                for (name, _, _) in others {
                    let stored = expected.iter().any(|(n, ..)| *n == name);
                    assert_eq!(w.contains(name), stored, "{scheme:?} {name}");
                }
            }
        }
        // Compressed-tensors' `weight_shape` holds the weight's shape; GPTQ's `g_idx` each
        // input's group.
        let w = linear(&checkpoint(0, formats()[0].0, Default::default()), EXPERT);
        let shape = w
            .get_stored("weight_shape")
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(shape, [OUT as i64, IN as i64]);
        let w = linear(&checkpoint(0, formats()[2].0, Default::default()), EXPERT);
        let g_idx = w.get_stored("g_idx").unwrap().to_vec1::<i32>().unwrap();
        assert_eq!((g_idx[31], g_idx[32], g_idx[63]), (0, 1, 1));
    }

    #[test]
    fn dequantized_dummy_weights_are_finite_with_the_unquantized_magnitude() {
        // Unquantized dummy weights are uniform in ±t: mean |w| = t / 2.
        let t = 1.0 / (IN as f32).sqrt();
        for (scheme, _) in formats() {
            let weights = checkpoint(5, scheme, Default::default());
            let ctx = LoadContext {
                quantization: Some(scheme),
                ..LoadContext::default()
            };
            let w = dequantize_weight(&linear(&weights, EXPERT), &ctx, IN, OUT)
                .unwrap()
                .unwrap();
            assert_eq!(w.dims(), [OUT, IN]);
            let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{scheme:?}");
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mean = values.iter().map(|v| v.abs()).sum::<f32>() / values.len() as f32;
            assert!(max <= 1.5 * t, "{scheme:?}: max |w| {max} against t {t}");
            assert!(
                (0.1 * t..0.6 * t).contains(&mean),
                "{scheme:?}: mean |w| {mean} against t {t}"
            );
        }
    }

    #[test]
    fn scales_are_positive_and_zero_points_in_the_middle_of_their_range() {
        let gptq = WeightQuantization::Gptq {
            bits: 4,
            group_size: Some(32),
            v1: true,
        };
        let w = linear(&checkpoint(1, gptq, Default::default()), EXPERT);
        let scales = w.get_stored("scales").unwrap();
        let scales = scales.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        assert!(scales
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|s| *s > 0.0 && s.is_finite()));
        // v1 stores each zero point less one: 4..=11 as 3..=10.
        let zeros = w.get_stored("qzeros").unwrap().flatten_all().unwrap();
        for word in zeros.to_vec1::<i32>().unwrap() {
            for k in 0..8 {
                let z = (word as u32 >> (4 * k)) & 15;
                assert!((3..=10).contains(&z), "{word:#x}");
            }
        }
    }

    #[test]
    fn ignored_and_non_linear_modules_stay_unquantized() {
        // RedHatAI's Qwen3-30B-A3B W4A16 keeps the LM head and the routers in 16 bits.
        let qc = json!({"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:.*mlp.gate$"],
            "config_groups": {"group_0": {"targets": ["Linear"]}}});
        let modules = parse_quantized_modules(Some(&qc)).unwrap();
        let scheme = formats()[0].0;
        let weights = checkpoint(0, scheme, modules);
        let ctx = LoadContext {
            quantization: Some(scheme),
            ..LoadContext::default()
        };
        for kept in ["lm_head", "model.layers.0.mlp.gate"] {
            let w = linear(&weights, kept);
            assert!(
                !w.contains("weight_packed") && w.contains("weight"),
                "{kept}"
            );
            assert_eq!(w.stored_dtype("weight"), None, "{kept}");
            assert!(
                dequantize_weight(&w, &ctx, IN, OUT).unwrap().is_none(),
                "{kept}"
            );
            assert_eq!(w.get("weight", (OUT, IN)).unwrap().dtype(), DType::F32);
        }
        assert!(linear(&weights, EXPERT).contains("weight_packed"));
        // Embeddings and norms are no linear modules: read as floats, whatever the lists say.
        let embed = weights.pp("model.embed_tokens");
        assert!(embed.contains("weight"));
        assert_eq!(embed.stored_dtype("weight"), None);
        let norm = weights.pp("model.norm").get("weight", 8).unwrap();
        assert_eq!(norm.to_vec1::<f32>().unwrap(), vec![1.0; 8]);
    }

    #[test]
    fn the_same_seed_and_name_give_the_same_tensors() {
        let scheme = formats()[4].0;
        let bytes = |seed: u64, path: &str, name: &str| -> Vec<u8> {
            let w = linear(&checkpoint(seed, scheme, Default::default()), path);
            let t: Tensor = w.get_stored(name).unwrap();
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        for name in ["weight_packed", "weight_scale"] {
            assert_eq!(bytes(7, EXPERT, name), bytes(7, EXPERT, name), "{name}");
            assert_ne!(bytes(7, EXPERT, name), bytes(8, EXPERT, name), "{name}");
            let other = "model.layers.1.mlp.experts.3.down_proj";
            assert_ne!(bytes(7, EXPERT, name), bytes(7, other, name), "{name}");
        }
    }
}
