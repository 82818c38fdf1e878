//! The result of a serving benchmark: the JSON `vllm bench serve --save-result` writes (same
//! keys), the table it prints, and the file name it picks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Seek, SeekFrom, Write as _};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
/// `*_ms` statistics. Reads back a result saved with `--save-detailed` and without `--metadata`.
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
    /// `linear` or `exponential`; the three ramp-up keys only under `--ramp-up-strategy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp_up_strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp_up_start_rps: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp_up_end_rps: Option<i64>,
    /// When the ramp-up reached each whole rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rps_change_events: Option<Vec<RpsChange>>,
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
    /// Per request, like the other lists; those named in [`DETAIL_KEYS`] are saved only with
    /// `--save-detailed`.
    #[serde(default)]
    pub input_lens: Vec<usize>,
    #[serde(default)]
    pub output_lens: Vec<usize>,
    #[serde(default)]
    pub ttfts: Vec<f64>,
    #[serde(default)]
    pub itls: Vec<Vec<f64>>,
    pub latencies: Vec<f64>,
    #[serde(default)]
    pub start_times: Vec<f64>,
    #[serde(default)]
    pub generated_texts: Vec<String>,
    #[serde(default)]
    pub errors: Vec<String>,
    pub max_output_tokens_per_s: f64,
    pub max_concurrent_requests: usize,
    /// `mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms`, `p99_ttft_ms`, ... for the metrics
    /// chosen by `--percentile-metrics`.
    #[serde(flatten)]
    pub stats: BTreeMap<String, f64>,
}

/// One step of a ramp-up: the whole rate reached and when (ISO 8601, UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpsChange {
    pub rps: u64,
    pub timestamp: String,
}

/// The per-request lists vLLM leaves out of the saved result unless `--save-detailed` is given
/// (it keeps `latencies`).
pub const DETAIL_KEYS: [&str; 7] = [
    "input_lens",
    "output_lens",
    "start_times",
    "ttfts",
    "itls",
    "generated_texts",
    "errors",
];

/// The keys vLLM writes before `--metadata`, which a metadata pair of the same name replaces;
/// every later key replaces the metadata pair instead.
const KEYS_BEFORE_METADATA: [&str; 7] = [
    "date",
    "endpoint_type",
    "backend",
    "label",
    "model_id",
    "tokenizer_id",
    "num_prompts",
];

impl BenchmarkResult {
    /// A statistic such as `mean_ttft_ms`, if it was reported.
    pub fn stat(&self, key: &str) -> Option<f64> {
        self.stats.get(key).copied()
    }

    /// The JSON `--save-result` writes: the per-request lists only when `detailed`, and the
    /// `--metadata` pairs as string fields.
    pub fn to_json(&self, detailed: bool, metadata: &[(String, String)]) -> Value {
        let mut fields = match serde_json::to_value(self) {
            Ok(Value::Object(fields)) => fields,
            // A struct of numbers, strings and maps always serialises to an object.
            _ => Map::new(),
        };
        if !detailed {
            for key in DETAIL_KEYS {
                fields.remove(key);
            }
        }
        for (key, value) in metadata {
            if KEYS_BEFORE_METADATA.contains(&key.as_str()) || !fields.contains_key(key) {
                fields.insert(key.clone(), Value::String(value.clone()));
            }
        }
        Value::Object(fields)
    }
}

/// Writes `json` to `path`, or with `append` adds it to the end of what is there, on a new
/// line (vLLM's `--append-result`), so a file of runs holds one JSON object per line.
pub fn write_json(path: &Path, json: &Value, append: bool) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)?;
    if append && file.seek(SeekFrom::End(0))? != 0 {
        file.write_all(b"\n")?;
    }
    serde_json::to_writer(&mut file, json)?;
    file.flush()
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

/// vLLM's default result file name: `{label}-{traffic}[-concurrency{n}]-{model}-{date}.json`
/// with a `traffic` from [`rate_traffic`] or [`ramp_up_traffic`].
pub fn default_file_name(
    label: &str,
    traffic: &str,
    max_concurrency: Option<usize>,
    model_id: &str,
    date: &str,
) -> String {
    let concurrency = max_concurrency.map_or(String::new(), |c| format!("-concurrency{c}"));
    let model = model_id
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(model_id);
    format!("{label}-{traffic}{concurrency}-{model}-{date}.json")
}

/// `{rate}qps` as Python prints the rate: 1.0, 2.5, inf.
pub fn rate_traffic(rate: f64) -> String {
    if rate.is_infinite() {
        "infqps".to_string()
    } else if rate.fract() == 0.0 {
        format!("{rate:.1}qps")
    } else {
        format!("{rate}qps")
    }
}

/// `ramp-up-{strategy}-{start}qps-{end}qps`.
pub fn ramp_up_traffic(strategy: &str, start_rps: i64, end_rps: i64) -> String {
    format!("ramp-up-{strategy}-{start_rps}qps-{end_rps}qps")
}

/// `YYYYMMDD-HHMMSS` of `unix_seconds`, UTC.
pub fn format_date(unix_seconds: u64) -> String {
    let (year, month, day) = civil_date(unix_seconds);
    let secs = unix_seconds % 86_400;
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `YYYY-MM-DDTHH:MM:SS[.ffffff]` of `unix_micros`, UTC, as Python's `isoformat` writes it.
pub fn format_iso_time(unix_micros: u64) -> String {
    let (unix_seconds, micros) = (unix_micros / 1_000_000, unix_micros % 1_000_000);
    let (year, month, day) = civil_date(unix_seconds);
    let secs = unix_seconds % 86_400;
    let fraction = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}")
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Year, month and day of `unix_seconds` (Howard Hinnant's days-to-civil).
fn civil_date(unix_seconds: u64) -> (i64, i64, i64) {
    let z = (unix_seconds / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
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
            format_iso_time(1_709_214_307_000_000),
            "2024-02-29T13:45:07"
        );
        assert_eq!(
            format_iso_time(1_709_214_307_012_345),
            "2024-02-29T13:45:07.012345"
        );
        assert_eq!(
            default_file_name(
                "openai",
                &rate_traffic(f64::INFINITY),
                Some(4),
                "Qwen/Qwen3-30B-A3B",
                "20240229-134507"
            ),
            "openai-infqps-concurrency4-Qwen3-30B-A3B-20240229-134507.json"
        );
        assert_eq!(
            default_file_name("x", &rate_traffic(2.0), None, "m", "d"),
            "x-2.0qps-m-d.json"
        );
        assert_eq!(
            default_file_name("x", &rate_traffic(2.5), None, "models/m/", "d"),
            "x-2.5qps-m-d.json"
        );
        assert_eq!(
            default_file_name("x", &ramp_up_traffic("linear", 1, 20), Some(8), "m", "d"),
            "x-ramp-up-linear-1qps-20qps-concurrency8-m-d.json"
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

    fn result() -> BenchmarkResult {
        BenchmarkResult {
            date: "20240229-134507".into(),
            endpoint_type: "openai".into(),
            backend: "openai".into(),
            label: None,
            model_id: "m".into(),
            tokenizer_id: None,
            num_prompts: 2,
            request_rate: RequestRate(f64::INFINITY),
            burstiness: 1.0,
            max_concurrency: None,
            ramp_up_strategy: None,
            ramp_up_start_rps: None,
            ramp_up_end_rps: None,
            rps_change_events: None,
            duration: 2.0,
            completed: 2,
            failed: 0,
            total_input_tokens: 8,
            total_output_tokens: 6,
            request_throughput: 1.0,
            request_goodput: None,
            output_throughput: 3.0,
            total_token_throughput: 7.0,
            input_lens: vec![4, 4],
            output_lens: vec![3, 3],
            ttfts: vec![0.1, 0.2],
            itls: vec![vec![0.05, 0.05], vec![0.04, 0.06]],
            latencies: vec![0.2, 0.3],
            start_times: vec![0.0, 0.0],
            generated_texts: vec!["abc".into(), "def".into()],
            errors: vec![String::new(), String::new()],
            max_output_tokens_per_s: 4.0,
            max_concurrent_requests: 2,
            stats: BTreeMap::from([("mean_ttft_ms".to_string(), 150.0)]),
        }
    }

    #[test]
    fn per_request_lists_are_saved_only_when_detailed() {
        let r = result();
        let brief = r.to_json(false, &[]);
        for key in DETAIL_KEYS {
            assert!(brief.get(key).is_none(), "{key}");
        }
        assert_eq!(brief["latencies"], serde_json::json!([0.2, 0.3]));
        assert_eq!(brief["mean_ttft_ms"], 150.0);
        assert!(brief.get("ramp_up_strategy").is_none());
        assert!(brief.get("rps_change_events").is_none());

        let detailed = r.to_json(true, &[]);
        assert_eq!(detailed["itls"][1], serde_json::json!([0.04, 0.06]));
        assert_eq!(detailed["generated_texts"][0], "abc");
        let back: BenchmarkResult = serde_json::from_value(detailed).unwrap();
        assert_eq!(back, r);
        let back: BenchmarkResult = serde_json::from_value(brief).unwrap();
        assert!(back.ttfts.is_empty() && back.latencies == r.latencies);
    }

    #[test]
    fn metadata_adds_string_fields_and_replaces_only_the_setup_keys() {
        let pairs = |items: &[(&str, &str)]| -> Vec<(String, String)> {
            items
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let json = result().to_json(
            false,
            &pairs(&[("tp", "1"), ("backend", "mine"), ("duration", "9")]),
        );
        assert_eq!(json["tp"], "1");
        assert_eq!(json["backend"], "mine", "written before metadata in vLLM");
        assert_eq!(
            json["duration"], 2.0,
            "a measured figure wins over metadata"
        );
    }

    #[test]
    fn ramp_up_keys_are_saved_with_a_ramp_up() {
        let mut r = result();
        r.ramp_up_strategy = Some("linear".into());
        r.ramp_up_start_rps = Some(1);
        r.ramp_up_end_rps = Some(3);
        r.rps_change_events = Some(vec![RpsChange {
            rps: 1,
            timestamp: "2024-02-29T13:45:07".into(),
        }]);
        let json = r.to_json(false, &[]);
        assert_eq!(
            (
                &json["ramp_up_strategy"],
                &json["ramp_up_start_rps"],
                &json["ramp_up_end_rps"]
            ),
            (&"linear".into(), &1.into(), &3.into())
        );
        assert_eq!(
            json["rps_change_events"],
            serde_json::json!([{"rps": 1, "timestamp": "2024-02-29T13:45:07"}])
        );
    }

    #[test]
    fn results_are_written_or_appended_one_per_line() {
        let dir = std::env::temp_dir().join(format!("ember-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.json");
        let (a, b) = (serde_json::json!({"run": 1}), serde_json::json!({"run": 2}));
        write_json(&path, &a, false).unwrap();
        write_json(&path, &a, false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), r#"{"run":1}"#);
        write_json(&path, &b, true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"run\":1}\n{\"run\":2}"
        );
        let fresh = dir.join("fresh.json");
        let _ = std::fs::remove_file(&fresh);
        write_json(&fresh, &b, true).unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), r#"{"run":2}"#);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
