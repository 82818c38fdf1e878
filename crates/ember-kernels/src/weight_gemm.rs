//! The CPU references' shared loops over a weight given element by element (the packed
//! formats' dequantizers): the weight itself in a storage dtype, and `y = x · Wᵀ` summed in f32
//! in input order.

use crate::Element;

/// `out[j, c] = weight(j, c)` for `[n, k]`, rounded once to `T`.
pub(crate) fn dequantize_into<T: Element>(
    k: usize,
    weight: impl Fn(usize, usize) -> f32,
    out: &mut [T],
) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = T::from_f32(weight(i / k, i % k));
    }
}

/// `y[r, j] = Σ_c x[r, c] · weight(j, c)` for `x` `[m, k]` and `y` `[m, n]`, in f32 in input
/// order, rounded once to `T`.
pub(crate) fn gemm<T: Element>(
    x: &[T],
    [m, n, k]: [usize; 3],
    weight: impl Fn(usize, usize) -> f32,
    y: &mut [T],
) {
    let w: Vec<f32> = (0..n * k).map(|i| weight(i / k, i % k)).collect();
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for j in 0..n {
            let sum = xr
                .iter()
                .zip(&w[j * k..(j + 1) * k])
                .fold(0f32, |acc, (&a, &b)| acc + a.to_f32() * b);
            y[r * n + j] = T::from_f32(sum);
        }
    }
}
