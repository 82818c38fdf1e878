//! The packed weights read span by span (a group of a 4-bit row, a scale block of an e4m3 one):
//! each span's parameters read once, its weights decoded 8 at a time in registers (AVX2) or one
//! by one (portable), as [`super::PackedRows`]' tiles and dequantized rows.

use super::{W4Rows, W8Rows, E4M3_REBIAS};

/// A packed weight read span by span: runs of a row's inputs that share their parameters (a
/// group of a 4-bit weight, a scale block of an e4m3 one).
pub(super) trait Spans: Sync {
    type Span<'s>: Span
    where
        Self: 's;
    /// `(n, k)`.
    fn dims(&self) -> (usize, usize);
    /// Inputs per span (the last of a row may be shorter).
    fn span_len(&self) -> usize;
    /// Row `j`'s span `s`, its parameters read.
    fn span(&self, j: usize, s: usize) -> Self::Span<'_>;
}

/// One row's span, ready to decode; inputs `c` count from the row's start.
pub(super) trait Span: Copy {
    /// The weight at input `c`, as the reference computes it.
    fn weight(&self, c: usize) -> f32;

    /// The 8 weights from input `c`, each as [`Span::weight`].
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; inputs `c..c + 8` in the row.
    #[cfg(target_arch = "x86_64")]
    unsafe fn lanes(&self, c: usize) -> std::arch::x86_64::__m256;

    /// Whether the span's weights are [`Span::unscaled`] times [`Span::factor`], so that a
    /// one-row tile may multiply the span's sum by the factor once instead of every weight.
    const FACTORED: bool = false;

    /// The span's common factor (with [`Span::FACTORED`]).
    fn factor(&self) -> f32 {
        1.0
    }

    /// The 8 weights from input `c` before [`Span::factor`] (with [`Span::FACTORED`]).
    ///
    /// # Safety
    /// As [`Span::lanes`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unscaled(&self, c: usize) -> std::arch::x86_64::__m256 {
        self.lanes(c)
    }
}

/// A 4-bit weight's spans, its encoding in the type: e2m1 codes or integers, float16 rounding.
pub(super) struct W4Spans<'r, 'a, const E2M1: bool, const F16: bool>(pub(super) &'r W4Rows<'a>);

/// A 4-bit row's group: the row's bytes, the group's scale and zero point.
#[derive(Clone, Copy)]
pub(super) struct W4Span<'a, const E2M1: bool, const F16: bool> {
    row: &'a [u8],
    scale: f32,
    zero: f32,
}

impl<const E2M1: bool, const F16: bool> Spans for W4Spans<'_, '_, E2M1, F16> {
    type Span<'s>
        = W4Span<'s, E2M1, F16>
    where
        Self: 's;

    fn dims(&self) -> (usize, usize) {
        (self.0.shape.n, self.0.shape.k)
    }

    fn span_len(&self) -> usize {
        self.0.shape.group_size
    }

    /// The group's parameters as [`W4a16Shape::group_params`] reads them, without dividing.
    #[inline(always)]
    fn span(&self, j: usize, g: usize) -> W4Span<'_, E2M1, F16> {
        let w = self.0;
        let row = &w.codes[j * w.row_bytes..][..w.row_bytes];
        let (scale, zero) = if w.shape.scales.in_bytes() {
            let byte = row[w.shape.k / 2 + g];
            (w.shape.scales.value(byte, w.qparams[j]), 8.0)
        } else if w.shape.zeros {
            let p = 2 * (j * w.groups + g);
            (w.qparams[p], w.qparams[p + 1])
        } else {
            (w.qparams[j * w.groups + g], 8.0)
        };
        W4Span { row, scale, zero }
    }
}

impl<const E2M1: bool, const F16: bool> Span for W4Span<'_, E2M1, F16> {
    #[inline(always)]
    fn weight(&self, c: usize) -> f32 {
        let byte = self.row[c / 2];
        let code = if c.is_multiple_of(2) {
            byte & 15
        } else {
            byte >> 4
        };
        let w = crate::w4a16::code_value(code, self.zero, E2M1) * self.scale;
        if F16 {
            half::f16::from_f32(w).to_f32()
        } else {
            w
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes(&self, c: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let codes = self.codes(c);
        let w = if E2M1 {
            // Magnitude from the scaled table by the low 3 bits, then bit 3 as the sign:
            // -(m · s) is (-m) · s exactly.
            let e2m1 = _mm256_loadu_ps(crate::w4a16::E2M1.as_ptr());
            let table = _mm256_mul_ps(e2m1, _mm256_set1_ps(self.scale));
            let magnitude = _mm256_permutevar8x32_ps(table, codes);
            let sign =
                _mm256_and_si256(_mm256_slli_epi32::<28>(codes), _mm256_set1_epi32(i32::MIN));
            _mm256_xor_ps(magnitude, _mm256_castsi256_ps(sign))
        } else {
            _mm256_mul_ps(self.unscaled(c), _mm256_set1_ps(self.scale))
        };
        if F16 {
            _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(w))
        } else {
            w
        }
    }

    /// Integers less their zero point, unrounded: the scale factors out.
    const FACTORED: bool = !E2M1 && !F16;

    fn factor(&self) -> f32 {
        self.scale
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unscaled(&self, c: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_sub_ps(_mm256_cvtepi32_ps(self.codes(c)), _mm256_set1_ps(self.zero))
    }
}

impl<const E2M1: bool, const F16: bool> W4Span<'_, E2M1, F16> {
    /// The 8 codes from input `c`, one per lane.
    ///
    /// # Safety
    /// AVX2 present; inputs `c..c + 8` in the row, `c` even.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes(&self, c: usize) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // Inputs c..c + 8 are the nibbles of the 4 bytes from c / 2, low nibble first.
        debug_assert!(c.is_multiple_of(2) && c / 2 + 4 <= self.row.len());
        let word = self.row.as_ptr().add(c / 2).cast::<i32>().read_unaligned();
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts),
            _mm256_set1_epi32(15),
        )
    }
}

/// An e4m3 row's scale block: the row's bytes, the block's scale and that times 2^120.
#[derive(Clone, Copy)]
pub(super) struct W8Span<'a> {
    row: &'a [u8],
    scale: f32,
    wide: f32,
}

impl Spans for W8Rows<'_> {
    type Span<'s>
        = W8Span<'s>
    where
        Self: 's;

    fn dims(&self) -> (usize, usize) {
        (self.shape.n, self.shape.k)
    }

    fn span_len(&self) -> usize {
        self.shape.block_k
    }

    #[inline(always)]
    fn span(&self, j: usize, b: usize) -> W8Span<'_> {
        let s = &self.shape;
        let scale = self.scales[(j / s.block_n) * s.k.div_ceil(s.block_k) + b];
        W8Span {
            row: &self.w[j * s.k..][..s.k],
            scale,
            wide: scale * E4M3_REBIAS,
        }
    }
}

impl Span for W8Span<'_> {
    #[inline(always)]
    fn weight(&self, c: usize) -> f32 {
        crate::w8a16::e4m3_to_f32(self.row[c]) * self.scale
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes(&self, c: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // The 2^120 that rebiases the fields is in `wide`, and both factors are exact, so the
        // one rounding is the reference's.
        _mm256_mul_ps(self.unscaled(c), _mm256_set1_ps(self.wide))
    }

    /// The e4m3 values times 2^-120, exact: `wide` factors out.
    const FACTORED: bool = true;

    fn factor(&self) -> f32 {
        self.wide
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unscaled(&self, c: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        debug_assert!(c + 8 <= self.row.len());
        // Sign-extended bytes shifted so that sign, exponent and mantissa land in an f32's
        // fields (`w8a16::e4m3_bits`).
        let bytes = _mm_loadl_epi64(self.row.as_ptr().add(c).cast::<__m128i>());
        let fields = _mm256_and_si256(
            _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(bytes)),
            _mm256_set1_epi32(0x87F0_0000u32 as i32),
        );
        _mm256_castsi256_ps(fields)
    }
}

/// The dot products of the `R` rows of `xs` with weight rows `js` of `p`, span by span.
#[inline(always)]
pub(super) fn span_tile<const R: usize, const C: usize, const FMA: bool, P: Spans>(
    p: &P,
    xs: [&[f32]; R],
    js: [usize; C],
) -> [[f32; C]; R] {
    let (_, k) = p.dims();
    assert!(xs.iter().all(|x| x.len() >= k));
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA tasks run only where `use_fma` found AVX2, FMA and F16C; every row holds
        // `k`. One or two rows keep two accumulators per weight row to hide the FMA latency.
        return unsafe {
            if R <= 2 {
                x86::tile::<R, C, 2, P>(p, xs, js)
            } else {
                x86::tile::<R, C, 1, P>(p, xs, js)
            }
        };
    }
    let mut sums = [[0f32; C]; R];
    for_spans(p, |s, c0, c1| {
        let spans = js.map(|j| p.span(j, s));
        for c in c0..c1 {
            for (q, span) in spans.iter().enumerate() {
                let w = span.weight(c);
                for (sum, x) in sums.iter_mut().zip(&xs) {
                    sum[q] += x[c] * w;
                }
            }
        }
    });
    sums
}

/// Rows `j0..` of `p` dequantized into `tile` (`[rows, k]`).
#[inline(always)]
pub(super) fn span_rows<const FMA: bool, P: Spans>(p: &P, j0: usize, tile: &mut [f32]) {
    let (_, k) = p.dims();
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA tasks run only where `use_fma` found AVX2, FMA and F16C.
        unsafe { x86::rows(p, j0, tile) };
        return;
    }
    for (i, out) in tile.chunks_exact_mut(k).enumerate() {
        for_spans(p, |s, c0, c1| {
            let span = p.span(j0 + i, s);
            for (o, c) in out[c0..c1].iter_mut().zip(c0..) {
                *o = span.weight(c);
            }
        });
    }
}

/// Calls `f(span, first input, end)` for each span of a row.
#[inline(always)]
fn for_spans<P: Spans>(p: &P, mut f: impl FnMut(usize, usize, usize)) {
    let (_, k) = p.dims();
    let len = p.span_len().max(1);
    for (s, c0) in (0..k).step_by(len).enumerate() {
        f(s, c0, (c0 + len).min(k));
    }
}

/// The AVX2 tiles: 8 weights decoded per step into a register, multiplied with every row.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Span, Spans};
    use crate::cpu_dot::x86::sum;

    /// See [`super::span_tile`]; `U` accumulators per (row, weight row).
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; every row of `xs` at least `k` long.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<const R: usize, const C: usize, const U: usize, P: Spans>(
        p: &P,
        xs: [&[f32]; R],
        js: [usize; C],
    ) -> [[f32; C]; R] {
        let (_, k) = p.dims();
        let len = p.span_len().max(1);
        // One row multiplies a factored span's weights unscaled and its sum by the factor: a
        // multiply per span rather than per 8 weights (more rows share each decoded weight).
        let factored = <P::Span<'_> as Span>::FACTORED && R == 1;
        let mut acc = [[[_mm256_setzero_ps(); U]; C]; R];
        let mut tail = [[0f32; C]; R];
        let (mut c0, mut s) = (0, 0);
        while c0 < k {
            let c1 = (c0 + len).min(k);
            // Not `js.map`: its closure would not be inlined here, and every span would cost
            // a call and a store-forwarding stall.
            let mut spans = [p.span(js[0], s); C];
            for q in 1..C {
                spans[q] = p.span(js[q], s);
            }
            let mut part = [[[_mm256_setzero_ps(); U]; C]; R];
            let sums = if factored { &mut part } else { &mut acc };
            let mut c = c0;
            while c + 8 * U <= c1 {
                for u in 0..U {
                    step::<R, C, U, P>(&spans, &xs, c + 8 * u, u, factored, sums);
                }
                c += 8 * U;
            }
            while c + 8 <= c1 {
                step::<R, C, U, P>(&spans, &xs, c, 0, factored, sums);
                c += 8;
            }
            if factored {
                for q in 0..C {
                    let mut v = part[0][q][0];
                    for &a in &part[0][q][1..] {
                        v = _mm256_add_ps(v, a);
                    }
                    let factor = _mm256_set1_ps(spans[q].factor());
                    acc[0][q][0] = _mm256_fmadd_ps(v, factor, acc[0][q][0]);
                }
            }
            for c in c..c1 {
                for (q, span) in spans.iter().enumerate() {
                    let w = span.weight(c);
                    for (t, x) in tail.iter_mut().zip(&xs) {
                        t[q] = x[c].mul_add(w, t[q]);
                    }
                }
            }
            (c0, s) = (c1, s + 1);
        }
        let mut sums = [[0f32; C]; R];
        for r in 0..R {
            for q in 0..C {
                let mut v = acc[r][q][0];
                for &a in &acc[r][q][1..] {
                    v = _mm256_add_ps(v, a);
                }
                sums[r][q] = sum(v) + tail[r][q];
            }
        }
        sums
    }

    /// One step of 8 inputs from `c`: each weight row's 8 weights decoded once (`unscaled`:
    /// before their span's factor), multiplied with every row into accumulator `u`.
    #[inline(always)]
    unsafe fn step<const R: usize, const C: usize, const U: usize, P: Spans>(
        spans: &[P::Span<'_>; C],
        xs: &[&[f32]; R],
        c: usize,
        u: usize,
        unscaled: bool,
        acc: &mut [[[__m256; U]; C]; R],
    ) {
        let mut w = [_mm256_setzero_ps(); C];
        for q in 0..C {
            w[q] = if unscaled {
                spans[q].unscaled(c)
            } else {
                spans[q].lanes(c)
            };
        }
        for r in 0..R {
            let x = _mm256_loadu_ps(xs[r].as_ptr().add(c));
            for q in 0..C {
                acc[r][q][u] = _mm256_fmadd_ps(x, w[q], acc[r][q][u]);
            }
        }
    }

    /// See [`super::span_rows`].
    ///
    /// # Safety
    /// AVX2, FMA and F16C present.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows<P: Spans>(p: &P, j0: usize, tile: &mut [f32]) {
        let (_, k) = p.dims();
        let len = p.span_len().max(1);
        for (i, out) in tile.chunks_exact_mut(k).enumerate() {
            let (mut c0, mut s) = (0, 0);
            while c0 < k {
                let c1 = (c0 + len).min(k);
                let span = p.span(j0 + i, s);
                let mut c = c0;
                while c + 8 <= c1 {
                    _mm256_storeu_ps(out.as_mut_ptr().add(c), span.lanes(c));
                    c += 8;
                }
                for (o, c) in out[c..c1].iter_mut().zip(c..) {
                    *o = span.weight(c);
                }
                (c0, s) = (c1, s + 1);
            }
        }
    }
}
