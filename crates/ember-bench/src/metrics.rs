//! The figures of a serving benchmark, computed as vLLM's `calculate_metrics` computes them
//! (`vllm/benchmarks/serve.py`), so that a run against ember and one against vLLM compare:
//! the same exclusions, numpy's statistics (population std, linear-interpolated percentiles,
//! 0 for an empty list) and the same goodput rule.

/// What the client measured of one request. Times are in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOutput {
    /// Whether a stream with at least one generated token arrived without an error.
    pub success: bool,
    /// Prompt tokens: the server's `usage.prompt_tokens` when it sent one, else the client's count.
    pub prompt_len: usize,
    /// `usage.completion_tokens`, when the server sent it.
    pub usage_output_tokens: Option<usize>,
    /// Stream chunks that carried generated tokens.
    pub token_chunks: usize,
    /// From sending the request to the first chunk with generated tokens.
    pub ttft: f64,
    /// Gaps between consecutive chunks with generated tokens.
    pub itl: Vec<f64>,
    /// From sending the request to its last chunk with choices.
    pub latency: f64,
    /// When the request was sent, in seconds after the benchmark started.
    pub start_time: f64,
    /// The concatenated text of the stream.
    pub generated_text: String,
    /// Why the request failed; empty when it succeeded.
    pub error: String,
}

impl RequestOutput {
    /// Generated tokens: the server's usage count, else one per token-carrying chunk.
    pub fn output_tokens(&self) -> usize {
        match self.usage_output_tokens {
            Some(n) if n > 0 => n,
            _ => self.token_chunks,
        }
    }
}

/// Mean, median, standard deviation and chosen percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    /// `(percentile, value)` pairs in the order asked for.
    pub percentiles: Vec<(f64, f64)>,
}

impl Summary {
    /// The summary of `seconds` in ms; an empty list summarises as `[0]`, as numpy's `x or 0` does.
    pub fn of_seconds(seconds: &[f64], percentiles: &[f64]) -> Self {
        let mut sorted: Vec<f64> = if seconds.is_empty() {
            vec![0.0]
        } else {
            seconds.to_vec()
        };
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let var = sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean: mean * 1e3,
            median: percentile(&sorted, 50.0) * 1e3,
            std: var.sqrt() * 1e3,
            percentiles: percentiles
                .iter()
                .map(|&p| (p, percentile(&sorted, p) * 1e3))
                .collect(),
        }
    }
}

/// numpy's default (`linear`) percentile `p` in [0, 100] of ascending, non-empty `sorted`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Service-level objectives in ms for goodput (`--goodput ttft:300 tpot:50 e2el:1000`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Goodput {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Goodput {
    /// Parses `KEY:VALUE` pairs; each item may hold several pairs separated by spaces.
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut slo = Self::default();
        for pair in items.iter().flat_map(|s| s.split_whitespace()) {
            let (name, value) = pair.split_once(':').ok_or_else(|| {
                format!("--goodput {pair:?} is not KEY:VALUE; write e.g. ttft:300 (milliseconds)")
            })?;
            let value: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| *v >= 0.0)
                .ok_or_else(|| {
                    format!("--goodput {pair:?}: the value must be a non-negative number of ms")
                })?;
            match name {
                "ttft" => slo.ttft_ms = Some(value),
                "tpot" => slo.tpot_ms = Some(value),
                "e2el" => slo.e2el_ms = Some(value),
                other => return Err(format!("--goodput names {other:?}; use ttft, tpot or e2el")),
            }
        }
        Ok(slo)
    }

    /// Whether no objective is set (then goodput is not reported).
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none() && self.tpot_ms.is_none() && self.e2el_ms.is_none()
    }

    /// Whether a request with these times (seconds) meets every objective set.
    fn is_met(&self, ttft: f64, tpot: f64, e2el: f64) -> bool {
        let ok = |slo: Option<f64>, value: f64| slo.is_none_or(|ms| ms / 1e3 >= value);
        ok(self.ttft_ms, ttft) && ok(self.tpot_ms, tpot) && ok(self.e2el_ms, e2el)
    }
}

/// Everything `calculate_metrics` derives from the outputs of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchmarkMetrics {
    pub completed: usize,
    pub failed: usize,
    pub total_input: usize,
    pub total_output: usize,
    pub request_throughput: f64,
    pub request_goodput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Summary,
    /// Over requests with more than one output token only.
    pub tpot: Summary,
    /// Over every gap of every successful request.
    pub itl: Summary,
    pub e2el: Summary,
    /// Output tokens per request, 0 for a failed one.
    pub output_lens: Vec<usize>,
    /// The most token-carrying chunks that arrived in one second of the run.
    pub max_output_tokens_per_s: f64,
    /// The most requests in flight at once.
    pub max_concurrent_requests: usize,
}

/// vLLM's metrics of `outputs` over a run of `duration_s` seconds.
pub fn calculate_metrics(
    outputs: &[RequestOutput],
    duration_s: f64,
    percentiles: &[f64],
    goodput: &Goodput,
) -> BenchmarkMetrics {
    let mut output_lens = Vec::with_capacity(outputs.len());
    let (mut total_input, mut completed, mut good) = (0, 0, 0);
    let (mut ttfts, mut tpots, mut itls, mut e2els) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for output in outputs {
        if !output.success {
            output_lens.push(0);
            continue;
        }
        let output_len = output.output_tokens();
        output_lens.push(output_len);
        total_input += output.prompt_len;
        // One token has no decode time: no TPOT, and 0 where goodput asks for one.
        let mut tpot = 0.0;
        if output_len > 1 {
            tpot = (output.latency - output.ttft) / (output_len - 1) as f64;
            tpots.push(tpot);
        }
        if !goodput.is_empty() && goodput.is_met(output.ttft, tpot, output.latency) {
            good += 1;
        }
        itls.extend_from_slice(&output.itl);
        ttfts.push(output.ttft);
        e2els.push(output.latency);
        completed += 1;
    }
    let total_output: usize = output_lens.iter().sum();
    let (max_output_tokens_per_s, max_concurrent_requests) = peaks(outputs);
    BenchmarkMetrics {
        completed,
        failed: outputs.len() - completed,
        total_input,
        total_output,
        request_throughput: completed as f64 / duration_s,
        request_goodput: good as f64 / duration_s,
        output_throughput: total_output as f64 / duration_s,
        total_token_throughput: (total_input + total_output) as f64 / duration_s,
        ttft: Summary::of_seconds(&ttfts, percentiles),
        tpot: Summary::of_seconds(&tpots, percentiles),
        itl: Summary::of_seconds(&itls, percentiles),
        e2el: Summary::of_seconds(&e2els, percentiles),
        output_lens,
        max_output_tokens_per_s,
        max_concurrent_requests,
    }
}

/// The busiest one-second bucket of token chunks, and the most requests in flight at once
/// (a sweep over half-open `[start, end)` intervals, ends before starts at equal times).
fn peaks(outputs: &[RequestOutput]) -> (f64, usize) {
    let ok: Vec<&RequestOutput> = outputs.iter().filter(|o| o.success).collect();
    if ok.is_empty() {
        return (0.0, 0);
    }
    let t0 = ok
        .iter()
        .map(|o| o.start_time)
        .fold(f64::INFINITY, f64::min);
    let t1 = ok
        .iter()
        .map(|o| o.start_time + o.latency)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut per_second = vec![0u64; (t1 - t0).ceil() as usize + 1];
    let mut events = Vec::with_capacity(ok.len() * 2);
    for o in &ok {
        let mut t = o.start_time + o.ttft;
        for gap in std::iter::once(&0.0).chain(&o.itl) {
            t += gap;
            if let Some(bucket) = per_second.get_mut((t - t0) as usize) {
                *bucket += 1;
            }
        }
        events.push((o.start_time, 1i64));
        events.push((o.start_time + o.latency, -1i64));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, delta) in events {
        now += delta;
        peak = peak.max(now);
    }
    let max_tokens = per_second.iter().copied().max().unwrap_or(0) as f64;
    (max_tokens, peak as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    fn ok(ttft: f64, latency: f64, tokens: usize, itl: Vec<f64>) -> RequestOutput {
        RequestOutput {
            success: true,
            prompt_len: 10,
            usage_output_tokens: Some(tokens),
            token_chunks: itl.len() + 1,
            ttft,
            itl,
            latency,
            ..Default::default()
        }
    }

    #[test]
    fn percentiles_match_numpy_linear_interpolation() {
        // numpy: np.percentile([1,2,3,4,10], [0,25,50,90,99,100])
        //   -> [1.0, 2.0, 3.0, 7.6, 9.76, 10.0]
        let xs = [1.0, 2.0, 3.0, 4.0, 10.0];
        for (p, want) in [
            (0.0, 1.0),
            (25.0, 2.0),
            (50.0, 3.0),
            (90.0, 7.6),
            (99.0, 9.76),
            (100.0, 10.0),
        ] {
            assert!(
                close(percentile(&xs, p), want),
                "p{p}: {}",
                percentile(&xs, p)
            );
        }
        // np.percentile([0.5, 0.1, 0.3, 0.2], 99.9) = 0.4994 (unsorted input is sorted first).
        let s = Summary::of_seconds(&[0.5, 0.1, 0.3, 0.2], &[99.9]);
        assert!(close(s.percentiles[0].1, 499.4), "{:?}", s.percentiles);
        // np.median = 0.25, np.mean = 0.275, np.std (ddof 0) = 0.14790199457749...
        assert!(close(s.median, 250.0) && close(s.mean, 275.0));
        assert!((s.std - 147.901_994_577_49).abs() < 1e-6, "{}", s.std);
    }

    #[test]
    fn an_empty_list_summarises_as_zero_like_numpy_of_or_zero() {
        let s = Summary::of_seconds(&[], &[50.0, 99.0]);
        assert_eq!((s.mean, s.median, s.std), (0.0, 0.0, 0.0));
        assert_eq!(s.percentiles, vec![(50.0, 0.0), (99.0, 0.0)]);
    }

    #[test]
    fn tpot_excludes_single_token_requests_and_failures() {
        let outputs = vec![
            ok(0.1, 0.5, 5, vec![0.1; 4]),   // tpot (0.5-0.1)/4 = 0.1
            ok(0.2, 0.2, 1, vec![]),         // one token: no tpot
            ok(0.1, 1.1, 3, vec![0.5, 0.5]), // tpot 0.5
            RequestOutput {
                error: "HTTP 500".into(),
                ..Default::default()
            },
        ];
        let m = calculate_metrics(&outputs, 2.0, &[99.0], &Goodput::default());
        assert_eq!((m.completed, m.failed), (3, 1));
        assert_eq!(m.output_lens, vec![5, 1, 3, 0]);
        assert_eq!((m.total_input, m.total_output), (30, 9));
        assert!(close(m.tpot.mean, 300.0), "{}", m.tpot.mean);
        assert!(close(m.ttft.mean, 400.0 / 3.0));
        assert!(close(m.itl.mean, (0.4 + 1.0) / 6.0 * 1e3));
        assert!(close(m.e2el.median, 500.0));
        assert!(close(m.request_throughput, 1.5));
        assert!(close(m.output_throughput, 4.5));
        assert!(close(m.total_token_throughput, 19.5));
    }

    #[test]
    fn output_tokens_fall_back_to_token_chunks_without_usage() {
        let mut o = ok(0.1, 0.4, 0, vec![0.1, 0.1, 0.1]);
        o.usage_output_tokens = None;
        assert_eq!(o.output_tokens(), 4);
        o.usage_output_tokens = Some(0);
        assert_eq!(o.output_tokens(), 4);
        o.usage_output_tokens = Some(7);
        assert_eq!(o.output_tokens(), 7);
    }

    #[test]
    fn goodput_counts_requests_within_every_objective() {
        let slo = Goodput::parse(&["ttft:300 tpot:50".into(), "e2el:1000".into()]).unwrap();
        assert_eq!(
            slo,
            Goodput {
                ttft_ms: Some(300.0),
                tpot_ms: Some(50.0),
                e2el_ms: Some(1000.0)
            }
        );
        let outputs = vec![
            ok(0.3, 0.7, 10, vec![0.04; 9]), // ttft at the limit, tpot 0.044: good
            ok(0.31, 0.4, 2, vec![0.09]),    // ttft over
            ok(0.1, 1.2, 2, vec![1.1]),      // tpot and e2el over
            ok(0.2, 0.2, 1, vec![]),         // one token: tpot counts as 0, good
        ];
        let m = calculate_metrics(&outputs, 4.0, &[99.0], &slo);
        assert!(close(m.request_goodput, 0.5), "{}", m.request_goodput);
        assert!(Goodput::parse(&["ttft=3".into()]).is_err());
        assert!(Goodput::parse(&["itl:3".into()]).is_err());
        assert!(Goodput::parse(&["ttft:-1".into()]).is_err());
    }

    #[test]
    fn peaks_bucket_chunks_per_second_and_sweep_concurrency() {
        let mut a = ok(0.5, 2.5, 3, vec![0.2, 1.5]); // chunks at 0.5, 0.7, 2.2
        a.start_time = 0.0;
        let mut b = ok(0.1, 1.0, 2, vec![0.3]); // starts when a is running: chunks at 1.6, 1.9
        b.start_time = 1.5;
        let mut c = ok(0.1, 0.5, 1, vec![]); // starts exactly when a ends
        c.start_time = 2.5;
        let m = calculate_metrics(&[a, b, c], 3.0, &[99.0], &Goodput::default());
        assert_eq!(m.max_output_tokens_per_s, 2.0);
        assert_eq!(m.max_concurrent_requests, 2);
    }
}
