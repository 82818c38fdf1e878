//! When each request is sent, as vLLM's `get_request` schedules them: all at once for an
//! infinite rate, else gamma-distributed gaps (shape = burstiness, scale = 1/(rate·burstiness),
//! so the mean gap is 1/rate; burstiness 1 is a Poisson process). At a constant rate the times
//! are rescaled so the last request goes out at exactly `n / rate`; under a ramp-up each gap is
//! drawn at the rate of its own request and nothing is rescaled.

use rand::Rng;
use rand_distr::{Distribution, Gamma};

/// How the rate rises during a ramp-up (vLLM's `--ramp-up-strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RampUpStrategy {
    /// Evenly spaced rates from start to end.
    Linear,
    /// A constant ratio between neighbouring requests' rates.
    Exponential,
}

impl RampUpStrategy {
    /// vLLM's name of the strategy.
    pub fn name(self) -> &'static str {
        match self {
            RampUpStrategy::Linear => "linear",
            RampUpStrategy::Exponential => "exponential",
        }
    }
}

/// The rate requests are sent at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Traffic {
    /// Requests per second; infinite sends all at once.
    Constant(f64),
    /// From `start_rps` at the first request to `end_rps` at the last.
    RampUp {
        strategy: RampUpStrategy,
        start_rps: f64,
        end_rps: f64,
    },
}

impl Traffic {
    /// The rate of request `i` of `n`.
    pub fn rate(&self, i: usize, n: usize) -> f64 {
        match *self {
            Traffic::Constant(rate) => rate,
            Traffic::RampUp {
                strategy,
                start_rps,
                end_rps,
            } => {
                let progress = i as f64 / n.saturating_sub(1).max(1) as f64;
                match strategy {
                    RampUpStrategy::Linear => start_rps + (end_rps - start_rps) * progress,
                    RampUpStrategy::Exponential => start_rps * (end_rps / start_rps).powf(progress),
                }
            }
        }
    }
}

/// One gap in seconds before a request sent at `rate` per second.
pub fn gap(rate: f64, burstiness: f64, rng: &mut impl Rng) -> f64 {
    if rate.is_infinite() {
        return 0.0;
    }
    if burstiness.is_infinite() {
        return 1.0 / rate;
    }
    match Gamma::new(burstiness, 1.0 / (rate * burstiness)) {
        Ok(gamma) => gamma.sample(rng),
        // Only for a non-positive rate or burstiness, which the caller rejects first.
        Err(_) => 0.0,
    }
}

/// Send times in seconds after the start for `n` requests.
pub fn schedule(n: usize, traffic: &Traffic, burstiness: f64, rng: &mut impl Rng) -> Vec<f64> {
    let mut times: Vec<f64> = (0..n)
        .map(|i| gap(traffic.rate(i, n), burstiness, rng))
        .collect();
    for i in 1..times.len() {
        times[i] += times[i - 1];
    }
    // The sum of random gaps misses n/rate by a few percent; rescaling steadies throughput
    // across seeds.
    if let (Traffic::Constant(rate), Some(&last)) = (traffic, times.last()) {
        if last > 0.0 && rate.is_finite() {
            let scale = n as f64 / rate / last;
            times.iter_mut().for_each(|t| *t *= scale);
        }
    }
    times
}

/// vLLM's `rps_change_events` of a ramp-up: the starting rate at 0 s, then each whole rate
/// the ramp passes, at the send time of the first request that reaches it.
pub fn rps_changes(traffic: &Traffic, schedule: &[f64]) -> Vec<(u64, f64)> {
    let Traffic::RampUp { start_rps, .. } = *traffic else {
        return Vec::new();
    };
    let mut last = start_rps as u64;
    let mut changes = vec![(last, 0.0)];
    for (i, &at) in schedule.iter().enumerate() {
        let rps = traffic.rate(i, schedule.len()) as u64;
        changes.extend((last + 1..=rps).map(|r| (r, at)));
        last = last.max(rps);
    }
    changes
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

    fn ramp(strategy: RampUpStrategy, start_rps: f64, end_rps: f64) -> Traffic {
        Traffic::RampUp {
            strategy,
            start_rps,
            end_rps,
        }
    }

    #[test]
    fn gaps_have_gamma_mean_and_variance() {
        // Gamma(k, θ): mean kθ = 1/rate, variance kθ² = 1/(rate²·burstiness).
        let rate = 4.0;
        for burstiness in [1.0, 0.25, 4.0] {
            let mut rng = StdRng::seed_from_u64(7);
            let gaps: Vec<f64> = (0..200_000)
                .map(|_| gap(rate, burstiness, &mut rng))
                .collect();
            let (mean, var) = mean_var(&gaps);
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
        let t = Traffic::Constant(2.0);
        let a = schedule(50, &t, 1.0, &mut StdRng::seed_from_u64(3));
        let b = schedule(50, &t, 1.0, &mut StdRng::seed_from_u64(3));
        let c = schedule(50, &t, 1.0, &mut StdRng::seed_from_u64(4));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn schedules_rise_and_end_at_n_over_rate() {
        let rng = || StdRng::seed_from_u64(1);
        let times = schedule(100, &Traffic::Constant(10.0), 0.5, &mut rng());
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!((times[99] - 10.0).abs() < 1e-9, "{}", times[99]);
        let all_at_once = Traffic::Constant(f64::INFINITY);
        assert_eq!(schedule(3, &all_at_once, 1.0, &mut rng()), [0.0; 3]);
        let even = schedule(4, &Traffic::Constant(2.0), f64::INFINITY, &mut rng());
        assert_eq!(even, [0.5, 1.0, 1.5, 2.0]);
    }

    #[test]
    fn ramp_up_rates_run_from_start_to_end() {
        let linear = ramp(RampUpStrategy::Linear, 1.0, 9.0);
        let rates: Vec<f64> = (0..5).map(|i| linear.rate(i, 5)).collect();
        assert_eq!(rates, [1.0, 3.0, 5.0, 7.0, 9.0]);
        let exponential = ramp(RampUpStrategy::Exponential, 1.0, 16.0);
        let rates: Vec<f64> = (0..5).map(|i| exponential.rate(i, 5)).collect();
        for (got, want) in rates.iter().zip([1.0, 2.0, 4.0, 8.0, 16.0]) {
            assert!((got - want).abs() < 1e-12, "{rates:?}");
        }
        // One request runs at the start rate, as in vLLM (progress i / max(n - 1, 1)).
        assert_eq!(linear.rate(0, 1), 1.0);
        assert_eq!(Traffic::Constant(3.0).rate(7, 10), 3.0);
    }

    #[test]
    fn ramp_up_gaps_follow_each_requests_rate_without_rescaling() {
        // With infinite burstiness each gap is exactly 1 / rate.
        let t = ramp(RampUpStrategy::Linear, 1.0, 4.0);
        let times = schedule(4, &t, f64::INFINITY, &mut StdRng::seed_from_u64(1));
        let want = [1.0, 1.0 + 0.5, 1.5 + 1.0 / 3.0, 1.5 + 1.0 / 3.0 + 0.25];
        for (got, want) in times.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{times:?}");
        }
        // Poisson gaps: a rising rate packs the later requests closer together.
        let t = ramp(RampUpStrategy::Exponential, 1.0, 100.0);
        let times = schedule(2000, &t, 1.0, &mut StdRng::seed_from_u64(5));
        let (first, last) = (times[100] - times[0], times[1999] - times[1899]);
        assert!(
            first > 10.0 * last,
            "first 100 gaps {first} s, last {last} s"
        );
    }

    #[test]
    fn ramp_up_records_each_whole_rate_it_reaches() {
        let t = ramp(RampUpStrategy::Linear, 1.0, 4.0);
        // Rates 1, 2.5, 4 at 0.5 s, 1 s, 2 s: 2 is passed at the second request.
        let changes = rps_changes(&t, &[0.5, 1.0, 2.0]);
        assert_eq!(changes, [(1, 0.0), (2, 1.0), (3, 2.0), (4, 2.0)]);
        assert!(rps_changes(&Traffic::Constant(4.0), &[0.5, 1.0]).is_empty());
    }
}
