//! The dot-product tiles the blocked CPU kernels ([`crate::moe_cpu`], [`crate::linear_cpu`]) are
//! made of: a few f32 rows against a few weight rows, compiled twice (portable, and for AVX2
//! with FMA and F16C, chosen at run time). The weight rows come from a [`WeightRows`] source:
//! dense f32 or bf16 rows widened on load ([`DenseRows`]), or packed ones decoded in registers
//! ([`crate::packed_cpu`]).
//!
//! Numerics: products summed in f32 in 8 lanes then across them (another order than a plain
//! loop's, so results differ from a sequential sum by rounding only).

use half::bf16;

use crate::Element;

/// A weight dtype the CPU kernels read (f32, bf16), widened to f32 in registers.
pub trait DotWeight: Element {
    /// Whether the weights are bf16 (else f32): how the AVX2 tile widens 8 of them.
    const BF16: bool;
    /// Widens to f32 (bf16: a shift).
    fn widen(self) -> f32;
}

impl DotWeight for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl DotWeight for bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// f32 lanes of the dot products' accumulators.
const LANES: usize = 8;

/// Whether this CPU has AVX2, FMA and F16C (then the tasks run compiled for them).
pub(crate) fn use_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A task of a blocked kernel, compiled twice: portable, and for AVX2 with FMA and F16C.
pub(crate) trait Task: Sync {
    fn run<const FMA: bool>(&self, block: &mut [f32]);
}

/// Runs `task` over `block`, compiled for AVX2, FMA and F16C when `fma` (see [`use_fma`]).
pub(crate) fn run_task<T: Task>(fma: bool, task: &T, block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if fma {
        /// # Safety: only called after [`use_fma`] found AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<T: Task>(task: &T, block: &mut [f32]) {
            task.run::<true>(block)
        }
        // SAFETY: `fma` is `use_fma()`: this CPU has AVX2, FMA and F16C.
        unsafe { avx2(task, block) };
        return;
    }
    let _ = fma;
    task.run::<false>(block);
}

/// The dot products of `R` rows of `xs` with `C` weight rows of `ws` (all at least `k` long),
/// with AVX2 and FMA when `FMA` (the task runs compiled for them).
#[inline(always)]
fn tile<const R: usize, const C: usize, const FMA: bool, W: DotWeight>(
    xs: [&[f32]; R],
    ws: [&[W]; C],
    k: usize,
) -> [[f32; C]; R] {
    assert!(xs.iter().all(|x| x.len() >= k) && ws.iter().all(|w| w.len() >= k));
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA tasks run only where `use_fma` found AVX2 and FMA; every row holds `k`.
        return unsafe { x86::tile(xs, ws, k) };
    }
    let mut sums = [[0f32; C]; R];
    for (sum_r, x) in sums.iter_mut().zip(&xs) {
        for (sum, w) in sum_r.iter_mut().zip(&ws) {
            *sum = x[..k].iter().zip(&w[..k]).map(|(a, b)| a * b.widen()).sum();
        }
    }
    sums
}

/// A weight `[n, k]` whose rows the blocked kernels multiply: dense rows widened on load
/// ([`DenseRows`]) or packed ones decoded in registers ([`crate::packed_cpu`]).
pub trait WeightRows: Sync {
    /// Rows (output channels).
    fn n(&self) -> usize;
    /// Inputs per row.
    fn k(&self) -> usize;
    /// Whether the AVX2/FMA tiles may read it; `false` sends it to the portable ones.
    fn simd(&self) -> bool {
        true
    }
    /// The dot products of the `R` rows of `xs` (each at least `k` long) with weight rows `js`,
    /// with AVX2, FMA and F16C when `FMA` (only inside a task that runs compiled for them).
    fn tile<const R: usize, const C: usize, const FMA: bool>(
        &self,
        xs: [&[f32]; R],
        js: [usize; C],
    ) -> [[f32; C]; R];

    /// The dot products of rows `rows` (`row(r)`) with weight rows `js` (`C` ≤ 2 keeps a
    /// 4-row tile in AVX2's 16 registers): `emit(r, [dot with js[0], ...])`. By default in
    /// tiles of up to 4 rows ([`tile_rows`]).
    #[inline(always)]
    fn row_dots<'x, const C: usize, const FMA: bool>(
        &self,
        row: &impl Fn(usize) -> &'x [f32],
        rows: std::ops::Range<usize>,
        js: [usize; C],
        emit: impl FnMut(usize, [f32; C]),
    ) where
        Self: Sized,
    {
        tile_rows::<C, FMA, Self>(self, row, rows, js, emit)
    }
}

/// Dense weight rows, f32 or bf16, `[n, k]` row-major.
#[derive(Debug, Clone, Copy)]
pub struct DenseRows<'a, W> {
    w: &'a [W],
    k: usize,
}

impl<'a, W: DotWeight> DenseRows<'a, W> {
    /// The rows of `w`, `k` inputs each (`w.len()` a multiple of `k`).
    pub fn new(w: &'a [W], k: usize) -> Self {
        assert!(
            k > 0 && w.len().is_multiple_of(k),
            "{} weights in rows of {k}",
            w.len()
        );
        Self { w, k }
    }
}

impl<W: DotWeight> WeightRows for DenseRows<'_, W> {
    fn n(&self) -> usize {
        self.w.len() / self.k
    }

    fn k(&self) -> usize {
        self.k
    }

    #[inline(always)]
    fn tile<const R: usize, const C: usize, const FMA: bool>(
        &self,
        xs: [&[f32]; R],
        js: [usize; C],
    ) -> [[f32; C]; R] {
        let k = self.k;
        tile::<R, C, FMA, W>(xs, js.map(|j| &self.w[j * k..][..k]), k)
    }
}

/// Rows multiplied together against the same weight rows by [`tile_rows`].
pub(crate) const ROW_TILE: usize = 4;

/// [`WeightRows::row_dots`] in tiles of up to 4 rows, each of which reads the weight rows once.
#[inline(always)]
pub(crate) fn tile_rows<'x, const C: usize, const FMA: bool, S: WeightRows>(
    w: &S,
    row: &impl Fn(usize) -> &'x [f32],
    rows: std::ops::Range<usize>,
    js: [usize; C],
    mut emit: impl FnMut(usize, [f32; C]),
) {
    let mut r = rows.start;
    while r < rows.end {
        let tile_rows = (rows.end - r).min(ROW_TILE);
        match tile_rows {
            4 => w
                .tile::<4, C, FMA>([row(r), row(r + 1), row(r + 2), row(r + 3)], js)
                .into_iter()
                .enumerate()
                .for_each(|(q, d)| emit(r + q, d)),
            3 => w
                .tile::<3, C, FMA>([row(r), row(r + 1), row(r + 2)], js)
                .into_iter()
                .enumerate()
                .for_each(|(q, d)| emit(r + q, d)),
            2 => w
                .tile::<2, C, FMA>([row(r), row(r + 1)], js)
                .into_iter()
                .enumerate()
                .for_each(|(q, d)| emit(r + q, d)),
            _ => emit(r, w.tile::<1, C, FMA>([row(r)], js)[0]),
        }
        r += tile_rows;
    }
}

/// The AVX2/FMA tile: 8 lanes of f32 accumulators per (row, weight row), weights widened on
/// load.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{DotWeight, LANES};

    /// How far ahead of the loads weight rows are prefetched.
    const PREFETCH_BYTES: usize = 2048;

    /// 8 weights from `w` as f32.
    ///
    /// # Safety
    /// AVX2 present; `w` points at 8 readable weights.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load<W: DotWeight>(w: *const W) -> __m256 {
        if W::BF16 {
            let halves = _mm_loadu_si128(w.cast::<__m128i>());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
        } else {
            _mm256_loadu_ps(w.cast::<f32>())
        }
    }

    /// The sum of the 8 lanes.
    ///
    /// # Safety
    /// AVX2 present.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// See [`super::tile`].
    ///
    /// # Safety
    /// AVX2 and FMA present; every row of `xs` and `ws` at least `k` long.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize, const C: usize, W: DotWeight>(
        xs: [&[f32]; R],
        ws: [&[W]; C],
        k: usize,
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = k / LANES * LANES;
        let mut c0 = 0;
        let ahead = PREFETCH_BYTES / std::mem::size_of::<W>();
        while c0 < full {
            let mut w = [_mm256_setzero_ps(); C];
            for c in 0..C {
                // Each weight row is read once: fetch ahead of the loads, past the end of the row
                // into the rows stored after it (a row or two is a page, where the hardware
                // prefetcher stops and ramps up again). A prefetch never faults.
                if (c0 * std::mem::size_of::<W>()).is_multiple_of(64) {
                    _mm_prefetch::<_MM_HINT_T0>(
                        ws[c].as_ptr().wrapping_add(c0 + ahead).cast::<i8>(),
                    );
                }
                w[c] = load(ws[c].as_ptr().add(c0));
            }
            for r in 0..R {
                let x = _mm256_loadu_ps(xs[r].as_ptr().add(c0));
                for c in 0..C {
                    acc[r][c] = _mm256_fmadd_ps(x, w[c], acc[r][c]);
                }
            }
            c0 += LANES;
        }
        let mut sums = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                let mut v = sum(acc[r][c]);
                for i in full..k {
                    v = xs[r][i].mul_add(ws[c][i].widen(), v);
                }
                sums[r][c] = v;
            }
        }
        sums
    }
}
