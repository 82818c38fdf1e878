//! The result of a serving benchmark: the JSON `vllm bench serve --save-result` writes (same
//! keys), the table it prints, and the file name it picks.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::metrics::Summary;

/// Requests per second; infinite means all at once. JSON: a number, or `"inf"` as vLLM writes it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "RateJson", try_from = "RateJson")]
pub struct RequestRate(pub f64);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RateJson {
    Number(f64),
    Text(String),
}

impl From<RequestRate> for RateJson {
    fn from(rate: RequestRate) -> Self {
        if rate.0.is_finite() {
            RateJson::Number(rate.0)
        } else {
            RateJson::Text("inf".into())
        }
    }
}

impl TryFrom<RateJson> for RequestRate {
    type Error = String;
    fn try_from(json: RateJson) -> Result<Self, String> {
        match json {
            RateJson::Number(r) => Ok(RequestRate(r)),
            RateJson::Text(t) => t
                .parse()
                .map(RequestRate)
                .map_err(|_| format!("request_rate {t:?} is not a number or \"inf\"")),
        }
    }
}

/// One run's configuration and figures under vLLM's key names. Times in seconds except the
/// `*_ms` statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchmarkResult {
    /// `YYYYMMDD-HHMMSS`, UTC.
    pub date: String,
    pub endpoint_type: String,
    pub backend: String,
    pub label: Option<String>,
    pub model_id: String,
    pub tokenizer_id: Option<String>,
    pub num_prompts: usize,
    pub request_rate: RequestRate,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub duration: f64,
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    /// Only when `--goodput` set objectives.
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub input_lens: Vec<usize>,
    pub output_lens: Vec<usize>,
    pub ttfts: Vec<f64>,
    pub itls: Vec<Vec<f64>>,
    pub latencies: Vec<f64>,
    pub start_times: Vec<f64>,
    pub generated_texts: Vec<String>,
    pub errors: Vec<String>,
    pub max_output_tokens_per_s: f64,
    pub max_concurrent_requests: usize,
    /// `mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms`, `p99_ttft_ms`, ... for the metrics
    /// chosen by `--percentile-metrics`.
    #[serde(flatten)]
    pub stats: BTreeMap<String, f64>,
}

impl BenchmarkResult {
    /// A statistic such as `mean_ttft_ms`, if it was reported.
    pub fn stat(&self, key: &str) -> Option<f64> {
        self.stats.get(key).copied()
    }
}

/// The metrics `--percentile-metrics` may name, in the order they are reported, with the
/// table's short name and heading.
pub const PERCENTILE_METRICS: [(&str, &str, &str); 4] = [
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
];

/// `99` for 99.0, `99.9` for 99.9, as vLLM names percentile keys.
pub fn percentile_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

/// Adds `mean_<m>_ms`, `median_<m>_ms`, `std_<m>_ms` and `p<P>_<m>_ms` of `summary`.
pub fn insert_stats(stats: &mut BTreeMap<String, f64>, metric: &str, summary: &Summary) {
    stats.insert(format!("mean_{metric}_ms"), summary.mean);
    stats.insert(format!("median_{metric}_ms"), summary.median);
    stats.insert(format!("std_{metric}_ms"), summary.std);
    for (p, value) in &summary.percentiles {
        stats.insert(format!("p{}_{metric}_ms", percentile_word(*p)), *value);
    }
}

/// The "Serving Benchmark Result" block, laid out as vLLM prints it.
pub fn render_table(r: &BenchmarkResult, metrics: &[String], percentiles: &[f64]) -> String {
    let mut s = String::new();
    let mut row = |label: &str, value: String| {
        let _ = writeln!(s, "{label:<40} {value:<10}");
    };
    let f2 = |v: f64| format!("{v:.2}");
    row("Successful requests:", r.completed.to_string());
    row("Failed requests:", r.failed.to_string());
    if let Some(c) = r.max_concurrency {
        row("Maximum request concurrency:", c.to_string());
    }
    if r.request_rate.0.is_finite() {
        row("Request rate configured (RPS):", f2(r.request_rate.0));
    }
    row("Benchmark duration (s):", f2(r.duration));
    row("Total input tokens:", r.total_input_tokens.to_string());
    row("Total generated tokens:", r.total_output_tokens.to_string());
    row("Request throughput (req/s):", f2(r.request_throughput));
    if let Some(g) = r.request_goodput {
        row("Request goodput (req/s):", f2(g));
    }
    row("Output token throughput (tok/s):", f2(r.output_throughput));
    row(
        "Peak output token throughput (tok/s):",
        f2(r.max_output_tokens_per_s),
    );
    row(
        "Peak concurrent requests:",
        f2(r.max_concurrent_requests as f64),
    );
    row(
        "Total token throughput (tok/s):",
        f2(r.total_token_throughput),
    );
    let mut out = format!("{:=^50}\n{s}", " Serving Benchmark Result ");
    for (key, name, heading) in PERCENTILE_METRICS {
        if !metrics.iter().any(|m| m == key) {
            continue;
        }
        let _ = writeln!(out, "{:-^50}", heading);
        let mut line = |label: String, stat: String| {
            let value = r.stat(&stat).unwrap_or(0.0);
            let _ = writeln!(out, "{label:<40} {value:<10.2}");
        };
        line(format!("Mean {name} (ms):"), format!("mean_{key}_ms"));
        line(format!("Median {name} (ms):"), format!("median_{key}_ms"));
        for p in percentiles {
            let word = percentile_word(*p);
            line(format!("P{word} {name} (ms):"), format!("p{word}_{key}_ms"));
        }
    }
    out.push_str(&"=".repeat(50));
    out.push('\n');
    out
}

/// vLLM's default result file name: `{label}-{rate}qps[-concurrency{n}]-{model}-{date}.json`.
pub fn default_file_name(
    label: &str,
    rate: f64,
    max_concurrency: Option<usize>,
    model_id: &str,
    date: &str,
) -> String {
    // Python prints floats as 1.0, 2.5, inf.
    let rate = if rate.is_infinite() {
        "inf".to_string()
    } else if rate.fract() == 0.0 {
        format!("{rate:.1}")
    } else {
        format!("{rate}")
    };
    let concurrency = max_concurrency.map_or(String::new(), |c| format!("-concurrency{c}"));
    let model = model_id
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(model_id);
    format!("{label}-{rate}qps{concurrency}-{model}-{date}.json")
}

/// `YYYYMMDD-HHMMSS` of `unix_seconds`, UTC.
pub fn format_date(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let secs = unix_seconds % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_file_names_read_as_vllms() {
        assert_eq!(format_date(0), "19700101-000000");
        // 2024-02-29 13:45:07 UTC
        assert_eq!(format_date(1_709_214_307), "20240229-134507");
        assert_eq!(
            default_file_name(
                "openai",
                f64::INFINITY,
                Some(4),
                "Qwen/Qwen3-30B-A3B",
                "20240229-134507"
            ),
            "openai-infqps-concurrency4-Qwen3-30B-A3B-20240229-134507.json"
        );
        assert_eq!(
            default_file_name("x", 2.0, None, "m", "d"),
            "x-2.0qps-m-d.json"
        );
        assert_eq!(
            default_file_name("x", 2.5, None, "models/m/", "d"),
            "x-2.5qps-m-d.json"
        );
        assert_eq!(percentile_word(99.0), "99");
        assert_eq!(percentile_word(99.9), "99.9");
    }

    #[test]
    fn stats_use_vllm_key_names_and_rates_serialize_like_python() {
        let mut stats = BTreeMap::new();
        let summary = Summary::of_seconds(&[0.1, 0.2], &[50.0, 99.9]);
        insert_stats(&mut stats, "ttft", &summary);
        let keys: Vec<&str> = stats.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "mean_ttft_ms",
                "median_ttft_ms",
                "p50_ttft_ms",
                "p99.9_ttft_ms",
                "std_ttft_ms"
            ]
        );
        assert_eq!(
            serde_json::to_string(&RequestRate(f64::INFINITY)).unwrap(),
            "\"inf\""
        );
        assert_eq!(serde_json::to_string(&RequestRate(2.5)).unwrap(), "2.5");
        let back: RequestRate = serde_json::from_str("\"inf\"").unwrap();
        assert!(back.0.is_infinite());
    }
}
