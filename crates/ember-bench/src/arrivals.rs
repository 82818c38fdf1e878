//! When each request is sent, as vLLM's `get_request` schedules them: all at once for an
//! infinite rate, else gamma-distributed gaps (shape = burstiness, scale = 1/(rate·burstiness),
//! so the mean gap is 1/rate; burstiness 1 is a Poisson process), rescaled so the last request
//! goes out at exactly `n / rate`.

use rand::Rng;
use rand_distr::{Distribution, Gamma};

/// Gaps in seconds before each of `n` requests, before rescaling.
pub fn intervals(n: usize, rate: f64, burstiness: f64, rng: &mut impl Rng) -> Vec<f64> {
    if rate.is_infinite() {
        return vec![0.0; n];
    }
    if burstiness.is_infinite() {
        return vec![1.0 / rate; n];
    }
    match Gamma::new(burstiness, 1.0 / (rate * burstiness)) {
        Ok(gamma) => (0..n).map(|_| gamma.sample(rng)).collect(),
        // Only for a non-positive rate or burstiness, which the caller rejects first.
        Err(_) => vec![0.0; n],
    }
}

/// Send times in seconds after the start for `n` requests at `rate` per second.
pub fn schedule(n: usize, rate: f64, burstiness: f64, rng: &mut impl Rng) -> Vec<f64> {
    let mut times = intervals(n, rate, burstiness, rng);
    for i in 1..times.len() {
        times[i] += times[i - 1];
    }
    // The sum of random gaps misses n/rate by a few percent; rescaling steadies throughput
    // across seeds.
    if let Some(&last) = times.last() {
        if last > 0.0 && rate.is_finite() {
            let scale = n as f64 / rate / last;
            times.iter_mut().for_each(|t| *t *= scale);
        }
    }
    times
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        (mean, xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n)
    }

    #[test]
    fn gaps_have_gamma_mean_and_variance() {
        // Gamma(k, θ): mean kθ = 1/rate, variance kθ² = 1/(rate²·burstiness).
        let rate = 4.0;
        for burstiness in [1.0, 0.25, 4.0] {
            let mut rng = StdRng::seed_from_u64(7);
            let (mean, var) = mean_var(&intervals(200_000, rate, burstiness, &mut rng));
            let want_var = 1.0 / (rate * rate * burstiness);
            assert!(
                (mean - 0.25).abs() < 0.25 * 0.02,
                "b {burstiness}: mean {mean}"
            );
            assert!(
                (var - want_var).abs() < want_var * 0.05,
                "b {burstiness}: var {var} vs {want_var}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a = schedule(50, 2.0, 1.0, &mut StdRng::seed_from_u64(3));
        let b = schedule(50, 2.0, 1.0, &mut StdRng::seed_from_u64(3));
        let c = schedule(50, 2.0, 1.0, &mut StdRng::seed_from_u64(4));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn schedules_rise_and_end_at_n_over_rate() {
        let times = schedule(100, 10.0, 0.5, &mut StdRng::seed_from_u64(1));
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!((times[99] - 10.0).abs() < 1e-9, "{}", times[99]);
        assert_eq!(
            schedule(3, f64::INFINITY, 1.0, &mut StdRng::seed_from_u64(1)),
            [0.0; 3]
        );
        let even = schedule(4, 2.0, f64::INFINITY, &mut StdRng::seed_from_u64(1));
        assert_eq!(even, [0.5, 1.0, 1.5, 2.0]);
    }
}
