//! Greedy sampling over a batch of logits rows: each row's argmax, so a step where every sequence
//! decodes greedily copies back one token id per sequence rather than its vocab-sized row.
//!
//! The choice, shared by the CPU reference, the host sampler (ember-engine's `sampler`) and
//! `kernels/sampling.cu`: the first index of the largest value; NaN never wins; a row with no
//! number other than NaN gives 0. Exact (no arithmetic), so the kernel must agree bit for bit.

use crate::error::check_shape;
use crate::KernelError;

/// Rows of an argmax call, or why `logits` is not `[rows, vocab]` for `out` `[rows]`.
pub fn argmax_shape(logits_len: usize, vocab: usize, out_len: usize) -> Result<usize, KernelError> {
    check_shape(vocab > 0, "argmax", || "vocab must be positive".to_string())?;
    check_shape(logits_len == out_len * vocab, "argmax", || {
        format!("logits has {logits_len} elements, expected {out_len} rows x vocab {vocab}")
    })?;
    Ok(out_len)
}

/// The first index of the largest value of `values`; NaN never wins; 0 when every value is NaN.
pub fn argmax(values: &[f32]) -> u32 {
    argmax_iter(values.iter().copied())
}

/// [`argmax`] over values read twice from an iterator (a sampler's `(id, logit)` candidates),
/// so callers need not copy them into a slice.
pub fn argmax_iter(values: impl Iterator<Item = f32> + Clone) -> u32 {
    // Two passes, so the max can vectorise.
    let max = values.clone().fold(f32::NEG_INFINITY, f32::max);
    values.into_iter().position(|v| v == max).unwrap_or(0) as u32
}

/// CPU reference: `out[r]` = [`argmax`] of row `r` of `logits` (`[rows, vocab]`).
pub fn argmax_rows(logits: &[f32], vocab: usize, out: &mut [u32]) -> Result<(), KernelError> {
    argmax_shape(logits.len(), vocab, out.len())?;
    for (row, out) in logits.chunks_exact(vocab).zip(out) {
        *out = argmax(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_of_tied_maxima() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), 1);
        assert_eq!(argmax(&[3.0, 3.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, -1e30]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn nan_never_wins() {
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN; 4]), 0);
        assert_eq!(argmax(&[1.0, f32::INFINITY, f32::NAN]), 1);
    }

    #[test]
    fn each_row_gets_its_own_argmax_and_shapes_are_checked() {
        let logits = [1.0, 9.0, 3.0, 7.0, 7.0, 0.0];
        let mut out = [u32::MAX; 2];
        argmax_rows(&logits, 3, &mut out).unwrap();
        assert_eq!(out, [1, 0]);
        assert!(argmax_rows(&logits, 4, &mut out).is_err());
        assert!(argmax_rows(&logits, 0, &mut []).is_err());
    }
}
