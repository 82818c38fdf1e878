//! W4A16 and W8A16 on the CPU at memory speed: the packed weights of [`crate::w4a16`] (4-bit
//! integer or e2m1 codes) and [`crate::w8a16`] (e4m3 bytes) multiplied as stored, never expanded
//! to f32 in memory.
//!
//! Their rows are [`WeightRows`] sources ([`W4Rows`], [`W8Rows`]) for the blocked kernels of a
//! decode step's few rows (up to [`FEW_ROWS`]: [`crate::linear_cpu`]'s, and the fused MoE's
//! [`crate::moe_cpu::fused_moe_rows`]): up to 4 rows multiply each 8 weights decoded in
//! registers from their codes and their group's (or scale block's) parameters; more rows decode
//! the weight rows once into an f32 row in cache and run the dense tiles over it. Many rows
//! (prefill) dequantize a block of weight rows at a time into an f32 tile in cache and multiply
//! it with every row by a cache-blocked GEMM (the `gemm` crate's, as candle's matmul), each core
//! its own blocks: never the whole weight.
//!
//! Numerics: each weight decodes to exactly the references' f32 value ([`crate::w4a16::weight`],
//! [`crate::w8a16::weight`]: the same operations, float16 rounding included), except that a
//! single row in registers multiplies each group's (or block's) sum by its scale once rather
//! than every integer or e4m3 weight by it; and the sums run in another order (lanes of 8, then
//! across them). So results agree with the references to f32 rounding of the sum, then one
//! rounding to the storage dtype. One exception: e4m3's NaN codes (`S.1111.111`, which no
//! checkpoint or quantizer writes: [`crate::w8a16`]'s scales bound the weights by 448) decode in
//! the AVX2 tiles as ±480 times their scale, not NaN.

use std::borrow::Cow;
use std::cell::RefCell;

use rayon::prelude::*;

use crate::cpu_dot::{run_task, tile_rows, use_fma, DenseRows, Task, WeightRows, ROW_TILE};
use crate::linear_cpu::linear_rows;
use crate::w4a16::{w4a16_shape, W4a16Shape};
use crate::w8a16::{w8a16_shape, W8a16Shape, E4M3_REBIAS};
use crate::{Element, KernelError};

mod spans;
use spans::{span_rows, span_tile, W4Spans};

/// Rows up to which the GEMMs decode the weights in registers; more rows dequantize blocks of
/// weight rows into a tile for a dense GEMM.
pub const FEW_ROWS: usize = 32;

/// Weight rows dequantized into one tile for the dense GEMM (at most: fewer to give every
/// thread blocks).
const TILE_ROWS: usize = 128;

/// [`crate::w4a16::w4a16_gemm`] at memory speed (see the module doc); `shape.m` rows.
pub fn w4a16_cpu<T: Element>(
    x: &[T],
    codes: &[u8],
    qparams: &[f32],
    shape: &W4a16Shape,
    y: &mut [T],
) -> Result<(), KernelError> {
    w4a16_shape(shape, x.len(), codes.len(), qparams.len(), y.len())?;
    gemm(
        use_fma(),
        &W4Rows::new(codes, qparams, shape)?,
        x,
        y,
        shape.m,
    );
    Ok(())
}

/// [`crate::w8a16::w8a16_gemm`] at memory speed (see the module doc); `shape.m` rows.
pub fn w8a16_cpu<T: Element>(
    x: &[T],
    w: &[u8],
    scales: &[f32],
    shape: &W8a16Shape,
    y: &mut [T],
) -> Result<(), KernelError> {
    w8a16_shape(shape, x.len(), w.len(), scales.len(), y.len())?;
    gemm(use_fma(), &W8Rows::new(w, scales, shape)?, x, y, shape.m);
    Ok(())
}

/// `y = x · Wᵀ` over the `m` rows of `x`, in registers or by tiles (see the module doc),
/// compiled for AVX2, FMA and F16C when `fma`.
fn gemm<T: Element, P: PackedRows>(fma: bool, w: &P, x: &[T], y: &mut [T], m: usize) {
    if m <= FEW_ROWS {
        linear_rows(fma, y, x, w, m);
    } else {
        tiled(fma && w.simd(), w, x, y, m);
    }
}

thread_local! {
    /// Each thread's dequantized weight rows (a tile, or the rows of one call of
    /// [`packed_row_dots`]), kept between calls (a fresh one would be zeroed pages).
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`WeightRows::row_dots`] over a packed weight: up to a tile of rows decode the weights in
/// registers; more decode each weight row once into the thread's f32 rows and multiply those,
/// rather than decoding them again for every tile of rows.
#[inline(always)]
fn packed_row_dots<'x, const C: usize, const FMA: bool, P: PackedRows>(
    w: &P,
    row: &impl Fn(usize) -> &'x [f32],
    rows: std::ops::Range<usize>,
    js: [usize; C],
    emit: impl FnMut(usize, [f32; C]),
) {
    if rows.len() <= ROW_TILE {
        return tile_rows::<C, FMA, P>(w, row, rows, js, emit);
    }
    let k = w.k();
    TILE.with_borrow_mut(|tile| {
        tile.resize(C * k, 0.0);
        for (q, &j) in js.iter().enumerate() {
            w.dequantize::<FMA>(j, &mut tile[q * k..(q + 1) * k]);
        }
        let dense = DenseRows::new(&tile[..C * k], k);
        tile_rows::<C, FMA, _>(&dense, row, rows, std::array::from_fn(|q| q), emit);
    });
}

/// The many-row GEMM: in parallel over blocks of output channels, each block's weight rows
/// dequantized into the thread's tile and multiplied with every row of `x`.
fn tiled<T: Element, P: PackedRows>(fma: bool, w: &P, x: &[T], y: &mut [T], m: usize) {
    let (n, k) = (w.n(), w.k());
    if m == 0 || n == 0 {
        return;
    }
    let xf: Cow<[f32]> = match T::as_f32_slice(x) {
        Some(x) => Cow::Borrowed(x),
        None => Cow::Owned(x.iter().map(|v| v.to_f32()).collect()),
    };
    let block = n.div_ceil(rayon::current_num_threads()).clamp(1, TILE_ROWS);
    // Block-major ([blocks][m][rows]) so that each task owns one contiguous part of the output.
    let mut y_b = vec![0f32; m * n];
    y_b.par_chunks_mut(block * m)
        .enumerate()
        .for_each(|(b, out)| {
            let rows = out.len() / m;
            TILE.with_borrow_mut(|tile| {
                tile.resize(rows * k, 0.0);
                let tile = &mut tile[..rows * k];
                run_task(fma, &Dequantize { w, j0: b * block }, tile);
                // SAFETY: `out` is `[m, rows]` row-major, `xf` `[m, k]`, `tile` `[rows, k]` read
                // as its transpose `[k, rows]`: every index within the slices.
                unsafe {
                    gemm::gemm(
                        m,
                        rows,
                        k,
                        out.as_mut_ptr(),
                        1,
                        rows as isize,
                        false,
                        xf.as_ptr(),
                        1,
                        k as isize,
                        tile.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
    for (b, part) in y_b.chunks(block * m).enumerate() {
        let rows = part.len() / m;
        for (r, vals) in part.chunks_exact(rows).enumerate() {
            for (o, &v) in y[r * n + b * block..][..rows].iter_mut().zip(vals) {
                *o = T::from_f32(v);
            }
        }
    }
}

/// One tile task: the weight rows from `j0` on dequantized into the task's block.
struct Dequantize<'a, P> {
    w: &'a P,
    j0: usize,
}

impl<P: PackedRows> Task for Dequantize<'_, P> {
    #[inline(always)]
    fn run<const FMA: bool>(&self, tile: &mut [f32]) {
        self.w.dequantize::<FMA>(self.j0, tile);
    }
}

/// The rows of a [`crate::w4a16`] weight `[n, k]`: codes and their groups' parameters.
#[derive(Debug, Clone, Copy)]
pub struct W4Rows<'a> {
    codes: &'a [u8],
    qparams: &'a [f32],
    shape: W4a16Shape,
    /// Bytes of a row of `codes`, and groups of a row: what every span would divide for.
    row_bytes: usize,
    groups: usize,
}

impl<'a> W4Rows<'a> {
    /// The weight `shape` (`m` ignored) describes, checked against its buffers.
    pub fn new(
        codes: &'a [u8],
        qparams: &'a [f32],
        shape: &W4a16Shape,
    ) -> Result<Self, KernelError> {
        let shape = W4a16Shape { m: 0, ..*shape };
        w4a16_shape(&shape, 0, codes.len(), qparams.len(), 0)?;
        Ok(Self {
            codes,
            qparams,
            shape,
            row_bytes: shape.row_bytes(),
            groups: shape.k / shape.group_size,
        })
    }
}

/// The rows of a [`crate::w8a16`] weight `[n, k]`: e4m3 bytes and their blocks' scales.
#[derive(Debug, Clone, Copy)]
pub struct W8Rows<'a> {
    w: &'a [u8],
    scales: &'a [f32],
    shape: W8a16Shape,
    /// Every scale times 2^120 is finite: the AVX2 decoding folds that factor into the scale.
    simd: bool,
}

impl<'a> W8Rows<'a> {
    /// The weight `shape` (`m` ignored) describes, checked against its buffers.
    pub fn new(w: &'a [u8], scales: &'a [f32], shape: &W8a16Shape) -> Result<Self, KernelError> {
        let shape = W8a16Shape { m: 0, ..*shape };
        w8a16_shape(&shape, 0, w.len(), scales.len(), 0)?;
        let simd = scales.iter().all(|s| (s * E4M3_REBIAS).is_finite());
        Ok(Self {
            w,
            scales,
            shape,
            simd,
        })
    }
}

/// A packed weight source: its tiles, and its rows dequantized for the many-row GEMM.
trait PackedRows: WeightRows {
    /// Rows `j0..` dequantized into `tile` (`[rows, k]`), with AVX2 when `FMA`.
    fn dequantize<const FMA: bool>(&self, j0: usize, tile: &mut [f32]);
}

/// Calls `$f::<spans type>($spans, args)` with `$rows`' spans typed by its encoding.
macro_rules! with_w4_spans {
    ($rows:expr, $f:ident::<$($c:tt),*>($($arg:expr),*)) => {
        match ($rows.shape.e2m1, $rows.shape.f16_weights) {
            (false, false) => $f::<$($c,)* W4Spans<false, false>>(&W4Spans($rows), $($arg),*),
            (false, true) => $f::<$($c,)* W4Spans<false, true>>(&W4Spans($rows), $($arg),*),
            (true, false) => $f::<$($c,)* W4Spans<true, false>>(&W4Spans($rows), $($arg),*),
            (true, true) => $f::<$($c,)* W4Spans<true, true>>(&W4Spans($rows), $($arg),*),
        }
    };
}

impl WeightRows for W4Rows<'_> {
    fn n(&self) -> usize {
        self.shape.n
    }

    fn k(&self) -> usize {
        self.shape.k
    }

    #[inline(always)]
    fn tile<const R: usize, const C: usize, const FMA: bool>(
        &self,
        xs: [&[f32]; R],
        js: [usize; C],
    ) -> [[f32; C]; R] {
        with_w4_spans!(self, span_tile::<R, C, FMA>(xs, js))
    }

    #[inline(always)]
    fn row_dots<'x, const C: usize, const FMA: bool>(
        &self,
        row: &impl Fn(usize) -> &'x [f32],
        rows: std::ops::Range<usize>,
        js: [usize; C],
        emit: impl FnMut(usize, [f32; C]),
    ) {
        packed_row_dots::<C, FMA, Self>(self, row, rows, js, emit)
    }
}

impl PackedRows for W4Rows<'_> {
    #[inline(always)]
    fn dequantize<const FMA: bool>(&self, j0: usize, tile: &mut [f32]) {
        with_w4_spans!(self, span_rows::<FMA>(j0, tile))
    }
}

impl WeightRows for W8Rows<'_> {
    fn n(&self) -> usize {
        self.shape.n
    }

    fn k(&self) -> usize {
        self.shape.k
    }

    fn simd(&self) -> bool {
        self.simd
    }

    #[inline(always)]
    fn tile<const R: usize, const C: usize, const FMA: bool>(
        &self,
        xs: [&[f32]; R],
        js: [usize; C],
    ) -> [[f32; C]; R] {
        span_tile::<R, C, FMA, Self>(self, xs, js)
    }

    #[inline(always)]
    fn row_dots<'x, const C: usize, const FMA: bool>(
        &self,
        row: &impl Fn(usize) -> &'x [f32],
        rows: std::ops::Range<usize>,
        js: [usize; C],
        emit: impl FnMut(usize, [f32; C]),
    ) {
        packed_row_dots::<C, FMA, Self>(self, row, rows, js, emit)
    }
}

impl PackedRows for W8Rows<'_> {
    #[inline(always)]
    fn dequantize<const FMA: bool>(&self, j0: usize, tile: &mut [f32]) {
        span_rows::<FMA, Self>(self, j0, tile)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::w4a16::{self, W4Scales};
    use crate::w8a16;

    /// A 4-bit weight of `shape` with random codes and parameters as its layout holds them:
    /// scales of both signs, whole zero points around 8, scale bytes of any finite value.
    pub(crate) fn w4_weight(shape: &W4a16Shape, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (n, k, g) = (shape.n, shape.k, shape.group_size);
        let codes: Vec<u8> = (0..n * k).map(|_| rng.random_range(0..16)).collect();
        let packed = w4a16::pack_codes(&codes, k);
        let scale = |rng: &mut rand::rngs::StdRng| rng.random_range(-0.05f32..0.05);
        match shape.scales {
            W4Scales::F32 => {
                let params = (0..n * k / g)
                    .flat_map(|_| {
                        let s = scale(&mut rng);
                        let z = rng.random_range(5..12) as f32;
                        if shape.zeros {
                            vec![s, z]
                        } else {
                            vec![s]
                        }
                    })
                    .collect();
                (packed, params)
            }
            kind => {
                // e4m3 bytes without NaN (0x7F / 0xFF), e8m0 exponents near 1.
                let bytes: Vec<u8> = (0..n * k / g)
                    .map(|_| match kind {
                        W4Scales::Ue8m0 => rng.random_range(118..136),
                        _ => rng.random_range(0..0x7F) | rng.random_range(0..2u8) << 7,
                    })
                    .collect();
                let globals = (0..n).map(|_| rng.random_range(0.5f32..2.0)).collect();
                (w4a16::with_scale_bytes(&packed, &bytes, n, k), globals)
            }
        }
    }

    /// An e4m3 weight of `shape`: random bytes without NaN, scales of both signs.
    pub(crate) fn w8_weight(shape: &W8a16Shape, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let bytes = (0..shape.n * shape.k)
            .map(|_| rng.random_range(0..0x7F) | rng.random_range(0..2u8) << 7)
            .collect();
        let scales = (0..shape.scale_len())
            .map(|_| rng.random_range(-0.01f32..0.01))
            .collect();
        (bytes, scales)
    }

    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Every 4-bit encoding: integers with zero points, symmetric, float16-rounded (GPTQ, AWQ),
    /// e2m1 with f32 scales and with each kind of scale byte; groups of 2 (no full lanes), 6
    /// (lanes straddling groups), 16, 32 and the whole row; `m` set per call.
    fn w4_shapes() -> Vec<W4a16Shape> {
        let base = W4a16Shape {
            m: 0,
            n: 37,
            k: 96,
            group_size: 32,
            f16_weights: false,
            e2m1: false,
            zeros: true,
            scales: W4Scales::F32,
        };
        vec![
            base,
            W4a16Shape {
                zeros: false,
                group_size: 16,
                ..base
            },
            W4a16Shape {
                f16_weights: true,
                group_size: 6,
                ..base
            },
            W4a16Shape {
                f16_weights: true,
                zeros: false,
                group_size: 96,
                ..base
            },
            W4a16Shape {
                group_size: 2,
                n: 5,
                k: 10,
                ..base
            },
            W4a16Shape {
                e2m1: true,
                zeros: false,
                group_size: 16,
                ..base
            },
            W4a16Shape {
                e2m1: true,
                zeros: false,
                scales: W4Scales::E4m3Times,
                group_size: 16,
                ..base
            },
            W4a16Shape {
                e2m1: true,
                zeros: false,
                scales: W4Scales::E4m3Over,
                group_size: 16,
                ..base
            },
            W4a16Shape {
                e2m1: true,
                zeros: false,
                scales: W4Scales::Ue8m0,
                ..base
            },
        ]
    }

    /// e4m3 blocks: DeepSeek's 128 x 128 with ragged edges, small ones that split lanes, one
    /// scale per output channel over a `k` off the lanes.
    fn w8_shapes() -> Vec<W8a16Shape> {
        let shape = |n, k, block_n, block_k| W8a16Shape {
            m: 0,
            n,
            k,
            block_n,
            block_k,
        };
        vec![
            shape(200, 300, 128, 128),
            shape(9, 20, 2, 3),
            shape(33, 67, 1, 67),
        ]
    }

    /// The decoded weights (the many-row GEMM's tiles), AVX2 and portable, are the references'
    /// bit for bit, for every encoding.
    #[test]
    fn dequantized_rows_are_the_references_bit_for_bit() {
        for fma in [use_fma(), false] {
            for (i, shape) in w4_shapes().iter().enumerate() {
                let (codes, qparams) = w4_weight(shape, i as u64);
                let rows = W4Rows::new(&codes, &qparams, shape).unwrap();
                let (n, k) = (shape.n, shape.k);
                let mut tile = vec![0f32; (n - 1) * k];
                gemm_task(fma, &rows, 1, &mut tile);
                for (p, got) in tile.iter().enumerate() {
                    let want = w4a16::weight(&codes, &qparams, shape, 1 + p / k, p % k);
                    assert_eq!(got.to_bits(), want.to_bits(), "fma {fma}, {shape:?} at {p}");
                }
            }
            for (i, shape) in w8_shapes().iter().enumerate() {
                let (w, scales) = w8_weight(shape, 50 + i as u64);
                let rows = W8Rows::new(&w, &scales, shape).unwrap();
                let mut tile = vec![0f32; shape.n * shape.k];
                gemm_task(fma, &rows, 0, &mut tile);
                for (p, got) in tile.iter().enumerate() {
                    let want = w8a16::weight(&w, &scales, shape, p / shape.k, p % shape.k);
                    assert_eq!(got.to_bits(), want.to_bits(), "fma {fma}, {shape:?} at {p}");
                }
            }
        }
    }

    /// Rows from `j0` dequantized as the tile task does.
    fn gemm_task<P: PackedRows>(fma: bool, w: &P, j0: usize, tile: &mut [f32]) {
        run_task(fma && w.simd(), &Dequantize { w, j0 }, tile);
    }

    /// `y` against the reference `want`: within 1e-5 of the sum of the products' magnitudes
    /// (the same weights, summed in another order) plus, for bf16, one rounding (2⁻⁸).
    fn assert_close(what: &str, got: &[f32], want: &[f32], magnitude: &[f32], bf16: bool) {
        for (p, ((g, w), mag)) in got.iter().zip(want).zip(magnitude).enumerate() {
            let tol = 1e-5 * mag + 1e-7 + if bf16 { w.abs() / 256.0 } else { 0.0 };
            assert!((g - w).abs() <= tol, "{what} at {p}: {g} vs {w}");
        }
    }

    /// `Σ_c |x[r, c] · w(j, c)|` for every output.
    fn magnitudes(x: &[f32], [m, n, k]: [usize; 3], w: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|c| (x[r * k + c] * w(j, c)).abs()).sum();
            }
        }
        out
    }

    /// Row counts through every path: in registers (1, 3, 4 rows: every tile height), decoded
    /// once per weight row for more (5, and the most), by tiles past that.
    const ROWS: [usize; 6] = [1, 3, 4, 5, FEW_ROWS, FEW_ROWS + 1];

    /// W4A16, every encoding, both paths, AVX2 and portable, f32 and bf16 activations: the
    /// reference's outputs to f32 rounding of the sums.
    #[test]
    fn w4a16_matches_the_reference() {
        for (i, base) in w4_shapes().iter().enumerate() {
            let (codes, qparams) = w4_weight(base, 100 + i as u64);
            let rows = W4Rows::new(&codes, &qparams, base).unwrap();
            for m in ROWS {
                let shape = W4a16Shape { m, ..*base };
                let x = uniform(m * shape.k, 200 + m as u64);
                let mut want = vec![0f32; m * shape.n];
                w4a16::w4a16_gemm(&x, &codes, &qparams, &shape, &mut want).unwrap();
                let mag = magnitudes(&x, [m, shape.n, shape.k], |j, c| {
                    w4a16::weight(&codes, &qparams, &shape, j, c)
                });
                for fma in [use_fma(), false] {
                    let mut got = vec![0f32; want.len()];
                    gemm(fma, &rows, &x, &mut got, m);
                    assert_close(&format!("fma {fma} {shape:?}"), &got, &want, &mag, false);
                }
                let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let xw: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
                let mut want = vec![0f32; m * shape.n];
                w4a16::w4a16_gemm(&xw, &codes, &qparams, &shape, &mut want).unwrap();
                let mut got = vec![half::bf16::ZERO; want.len()];
                w4a16_cpu(&xb, &codes, &qparams, &shape, &mut got).unwrap();
                let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
                assert_close(&format!("bf16 {shape:?}"), &got, &want, &mag, true);
            }
        }
    }

    /// W8A16, block and per-channel scales, both paths, AVX2 and portable (and portable when a
    /// scale is too large to fold 2^120 into): the reference's outputs to f32 rounding.
    #[test]
    fn w8a16_matches_the_reference() {
        for (i, base) in w8_shapes().iter().enumerate() {
            let (w, mut scales) = w8_weight(base, 300 + i as u64);
            if i == 1 {
                scales[0] = 1e30;
            }
            let rows = W8Rows::new(&w, &scales, base).unwrap();
            assert_eq!(rows.simd(), i != 1);
            for m in ROWS {
                let shape = W8a16Shape { m, ..*base };
                let x = uniform(m * shape.k, 400 + m as u64);
                let mut want = vec![0f32; m * shape.n];
                w8a16::w8a16_gemm(&x, &w, &scales, &shape, &mut want).unwrap();
                let mag = magnitudes(&x, [m, shape.n, shape.k], |j, c| {
                    w8a16::weight(&w, &scales, &shape, j, c)
                });
                for fma in [use_fma(), false] {
                    let mut got = vec![0f32; want.len()];
                    gemm(fma, &rows, &x, &mut got, m);
                    assert_close(&format!("fma {fma} {shape:?}"), &got, &want, &mag, false);
                }
                let mut got = vec![0f32; want.len()];
                w8a16_cpu(&x, &w, &scales, &shape, &mut got).unwrap();
                assert_close(&format!("{shape:?}"), &got, &want, &mag, false);
            }
        }
    }

    #[test]
    fn buffers_that_do_not_fit_the_shape_are_refused() {
        let shape = W8a16Shape {
            m: 2,
            n: 3,
            k: 4,
            block_n: 1,
            block_k: 4,
        };
        let mut y = [0f32; 6];
        let err = w8a16_cpu(&[0f32; 8], &[0u8; 11], &[1.0; 3], &shape, &mut y)
            .unwrap_err()
            .to_string();
        assert!(err.contains("w has 11"), "{err}");
    }
}
