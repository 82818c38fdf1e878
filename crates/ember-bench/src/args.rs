//! The flags of `ember bench serve`, named and checked as `vllm bench serve` names and checks
//! them, so its users' scripts carry over.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value};

use crate::arrivals::{RampUpStrategy, Traffic};
use crate::report::PERCENTILE_METRICS;
use crate::request::Backend;

/// Where the prompts come from (vLLM's `--dataset-name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    /// Synthetic prompts of --random-input-len tokens.
    Random,
    /// First turns of a ShareGPT JSON file (--dataset-path).
    Sharegpt,
    /// A few shared prefixes with random suffixes, for prefix caching.
    #[value(name = "prefix_repetition", alias = "prefix")]
    PrefixRepetition,
    /// --prompt, or the lines (or JSON lines with "prompt") of --dataset-path.
    #[value(alias = "fixed")]
    Custom,
}

/// Flags of `ember bench serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Server or API base URL, e.g. http://127.0.0.1:8000 (default: http://<host>:<port>).
    #[arg(long)]
    pub base_url: Option<String>,
    /// Server host, when --base-url is not given.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Server port, when --base-url is not given.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Accept any TLS certificate of an https:// server (a self-signed one, say).
    #[arg(long)]
    pub insecure: bool,
    /// A header sent with every request, KEY=VALUE; repeat it or list several. It replaces the
    /// API key's Authorization when it names it; x-request-id is set per request.
    #[arg(long, value_name = "KEY=VALUE", num_args = 0..)]
    pub header: Vec<String>,
    /// API path (default: /v1/completions, or /v1/chat/completions for --backend openai-chat).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Request shape (default: openai-chat when --endpoint ends in chat/completions, else openai).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Model name sent as "model" (and the tokenizer, when it is a local directory).
    #[arg(long)]
    pub model: String,
    /// Name sent as "model" instead of --model.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Directory with tokenizer.json (default: --model, when it is a local directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Where the prompts come from.
    #[arg(long, value_enum, default_value = "random")]
    pub dataset_name: DatasetName,
    /// ShareGPT JSON for sharegpt; a file of prompts for custom.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// The prompt of the custom dataset, sent --num-prompts times.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Requests to send.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Prompt tokens of the random dataset.
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    /// Output tokens of the random dataset.
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are uniform in [len·(1−r), len·(1+r)]; r in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Tokens of a random prefix shared by every random prompt.
    #[arg(long, default_value_t = 0)]
    pub random_prefix_len: usize,
    /// Tokens of each shared prefix (prefix_repetition).
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_prefix_len: usize,
    /// Tokens of each random suffix (prefix_repetition).
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_suffix_len: usize,
    /// Distinct prefixes (prefix_repetition).
    #[arg(long, default_value_t = 10)]
    pub prefix_repetition_num_prefixes: usize,
    /// Output tokens (prefix_repetition).
    #[arg(long, default_value_t = 128)]
    pub prefix_repetition_output_len: usize,
    /// Output tokens for ShareGPT prompts (default: the recorded answer's length).
    #[arg(long)]
    pub sharegpt_output_len: Option<usize>,
    /// Output tokens of the custom dataset.
    #[arg(long, default_value_t = 256)]
    pub custom_output_len: usize,
    /// Requests per second, or inf to send all at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Gamma shape of the gaps between requests: 1 is Poisson, lower is burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Raise the request rate from --ramp-up-start-rps at the first request to
    /// --ramp-up-end-rps at the last, instead of --request-rate.
    #[arg(long, value_enum)]
    pub ramp_up_strategy: Option<RampUpStrategy>,
    /// Requests per second of the first request of a ramp-up.
    #[arg(long, allow_negative_numbers = true)]
    pub ramp_up_start_rps: Option<i64>,
    /// Requests per second of the last request of a ramp-up.
    #[arg(long, allow_negative_numbers = true)]
    pub ramp_up_end_rps: Option<i64>,
    /// Most requests in flight at once (default: no limit).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Seed of the prompts and of the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Requests sent (with the first prompt) before the run and left out of its metrics.
    #[arg(long, default_value_t = 0)]
    pub num_warmups: usize,
    /// Send "ignore_eos": true so every answer runs to its length (always on for random).
    #[arg(long)]
    pub ignore_eos: bool,
    /// "temperature" sent with each request (default: none, so the server's default applies).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// "top_p" sent with each request.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// "top_k" sent with each request (-1: no limit).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    /// "min_p" sent with each request.
    #[arg(long)]
    pub min_p: Option<f64>,
    /// "frequency_penalty" sent with each request.
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f64>,
    /// "presence_penalty" sent with each request.
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f64>,
    /// "repetition_penalty" sent with each request.
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Structured output asked of every request, sent as "response_format": json_object,
    /// json_schema:<file or inline JSON>, grammar:<GBNF file or inline GBNF>, or a whole
    /// response_format object.
    #[arg(long, value_name = "FORMAT", value_parser = crate::response_format::parse_response_format)]
    pub response_format: Option<Value>,
    /// A JSON object merged into every request body, over the sampling flags, e.g.
    /// '{"chat_template_kwargs": {"enable_thinking": false}}'.
    #[arg(long, value_name = "JSON")]
    pub extra_body: Option<String>,
    /// Prefix of each request's x-request-id, which ends in the request's index
    /// (default: bench-<8 random hex digits>-).
    #[arg(long)]
    pub request_id_prefix: Option<String>,
    /// Write the result JSON.
    #[arg(long)]
    pub save_result: bool,
    /// Add the result JSON to the end of the result file, on a new line (implies saving).
    #[arg(long)]
    pub append_result: bool,
    /// Keep the per-request lists (input_lens, output_lens, ttfts, itls, start_times,
    /// generated_texts, errors) in the result JSON.
    #[arg(long)]
    pub save_detailed: bool,
    /// Fields added to the result JSON, KEY=VALUE, e.g. --metadata version=0.3.3 tp=1.
    #[arg(long, value_name = "KEY=VALUE", num_args = 0..)]
    pub metadata: Vec<String>,
    /// File name of the result (default: {label}-{rate}qps[-concurrency{n}]-{model}-{date}.json).
    #[arg(long)]
    pub result_filename: Option<String>,
    /// Directory of the result file (created if missing).
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    /// Label of the result (default: the backend).
    #[arg(long)]
    pub label: Option<String>,
    /// Comma-separated metrics to report statistics of: ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,
    /// Comma-separated percentiles to report, e.g. 50,90,99.
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,
    /// Service-level objectives in ms for goodput, e.g. --goodput ttft:300 tpot:50 e2el:1000.
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub disable_tqdm: bool,
    /// Sent as "Authorization: Bearer <key>".
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl ServeArgs {
    /// `base_url` without a trailing slash.
    pub(crate) fn base_url(&self) -> String {
        match &self.base_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None if self.host.contains(':') => format!("http://[{}]:{}", self.host, self.port),
            None => format!("http://{}:{}", self.host, self.port),
        }
    }

    /// The request shape and the path it is sent to.
    pub(crate) fn backend_and_endpoint(&self) -> (Backend, String) {
        let backend = self.backend.unwrap_or(match &self.endpoint {
            Some(e) if e.trim_end_matches('/').ends_with("chat/completions") => Backend::Chat,
            _ => Backend::Completions,
        });
        let endpoint = self.endpoint.clone().unwrap_or_else(|| match backend {
            Backend::Completions => "/v1/completions".into(),
            Backend::Chat => "/v1/chat/completions".into(),
        });
        (backend, endpoint)
    }

    /// The tokenizer directory, if there is one.
    pub(crate) fn tokenizer_path(&self) -> Option<PathBuf> {
        self.tokenizer.clone().or_else(|| {
            let model = PathBuf::from(&self.model);
            model.join("tokenizer.json").is_file().then_some(model)
        })
    }

    /// The metric names and percentiles to report, checked.
    pub(crate) fn reported(&self) -> Result<(Vec<String>, Vec<f64>)> {
        let metrics: Vec<String> = self
            .percentile_metrics
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        for m in &metrics {
            if !PERCENTILE_METRICS.iter().any(|(key, _, _)| key == m) {
                bail!("--percentile-metrics names {m:?}; use ttft, tpot, itl or e2el");
            }
        }
        let percentiles = self
            .metric_percentiles
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .with_context(|| {
                        format!("--metric-percentiles {p:?} is not a number in 0..100")
                    })
            })
            .collect::<Result<_>>()?;
        Ok((metrics, percentiles))
    }

    /// The rate requests are sent at, checked as vLLM checks the ramp-up flags.
    pub(crate) fn traffic(&self) -> Result<Traffic> {
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            bail!(
                "--request-rate {} must be positive (or inf)",
                self.request_rate
            );
        }
        let Some(strategy) = self.ramp_up_strategy else {
            if self.ramp_up_start_rps.is_some() || self.ramp_up_end_rps.is_some() {
                eprintln!(
                    "warning: --ramp-up-start-rps/--ramp-up-end-rps do nothing without \
                     --ramp-up-strategy linear|exponential"
                );
            }
            return Ok(Traffic::Constant(self.request_rate));
        };
        if self.request_rate.is_finite() {
            bail!(
                "--ramp-up-strategy sets the request rate; remove --request-rate {}",
                self.request_rate
            );
        }
        let (Some(start), Some(end)) = (self.ramp_up_start_rps, self.ramp_up_end_rps) else {
            bail!("--ramp-up-strategy needs both --ramp-up-start-rps and --ramp-up-end-rps");
        };
        if start < 0 || end < 0 {
            bail!("--ramp-up-start-rps {start} and --ramp-up-end-rps {end} must be non-negative");
        }
        if start > end {
            bail!("--ramp-up-start-rps {start} is above --ramp-up-end-rps {end}; a ramp-up rises");
        }
        if start == 0 {
            // vLLM refuses 0 for exponential up front, and for linear fails on the first
            // request, whose rate would be 0.
            bail!(
                "--ramp-up-start-rps 0: the first request would go out at 0 requests/s; \
                 start the {} ramp-up at 1 or more",
                strategy.name()
            );
        }
        Ok(Traffic::RampUp {
            strategy,
            start_rps: start as f64,
            end_rps: end as f64,
        })
    }

    /// What is merged into every request body: the sampling flags and --response-format that
    /// were given, then --extra-body over them.
    pub(crate) fn extra_body(&self) -> Result<Map<String, Value>> {
        let sampling = [
            ("top_p", self.top_p.map(Value::from)),
            ("top_k", self.top_k.map(Value::from)),
            ("min_p", self.min_p.map(Value::from)),
            ("temperature", self.temperature.map(Value::from)),
            ("frequency_penalty", self.frequency_penalty.map(Value::from)),
            ("presence_penalty", self.presence_penalty.map(Value::from)),
            (
                "repetition_penalty",
                self.repetition_penalty.map(Value::from),
            ),
        ];
        let mut body: Map<String, Value> = sampling
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_string(), value?)))
            .collect();
        if let Some(format) = &self.response_format {
            body.insert("response_format".into(), format.clone());
        }
        if let Some(text) = &self.extra_body {
            match serde_json::from_str(text) {
                Ok(Value::Object(extra)) => body.extend(extra),
                Ok(other) => bail!("--extra-body must be a JSON object {{...}}, not {other}"),
                Err(e) => bail!("--extra-body {text:?} is not JSON: {e}"),
            }
        }
        Ok(body)
    }

    /// The prefix of the request ids: the given one, or vLLM's `bench-<8 hex digits>-`.
    pub(crate) fn request_id_prefix(&self) -> String {
        self.request_id_prefix
            .clone()
            .unwrap_or_else(|| format!("bench-{:08x}-", rand::random::<u32>()))
    }
}

/// `KEY=VALUE` items of `flag` as trimmed pairs, split at the first `=`.
pub(crate) fn parse_key_values(flag: &str, items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((key, value)) => Ok((key.trim().to_string(), value.trim().to_string())),
            None => bail!("{flag} {item:?} is not KEY=VALUE"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .unwrap()
            .serve
    }

    #[test]
    fn flags_read_as_vllms() {
        let a = parse(&[
            "--model",
            "m",
            "--request-rate",
            "inf",
            "--goodput",
            "ttft:300",
            "tpot:50",
        ]);
        assert!(a.request_rate.is_infinite());
        assert_eq!(a.goodput, ["ttft:300", "tpot:50"]);
        assert_eq!(a.base_url(), "http://127.0.0.1:8000");
        assert_eq!(
            a.backend_and_endpoint(),
            (Backend::Completions, "/v1/completions".into())
        );
        let a = parse(&[
            "--model",
            "m",
            "--base-url",
            "http://h:1/",
            "--endpoint",
            "/v1/chat/completions",
            "--dataset-name",
            "prefix",
            "--request-rate",
            "2.5",
        ]);
        assert_eq!(a.base_url(), "http://h:1");
        assert_eq!(a.backend_and_endpoint().0, Backend::Chat);
        assert_eq!(a.dataset_name, DatasetName::PrefixRepetition);
        assert_eq!(a.request_rate, 2.5);
        let a = parse(&[
            "--model",
            "m",
            "--backend",
            "openai-chat",
            "--percentile-metrics",
            "ttft,e2el",
            "--metric-percentiles",
            "50,99.9",
        ]);
        assert_eq!(
            a.backend_and_endpoint(),
            (Backend::Chat, "/v1/chat/completions".into())
        );
        assert_eq!(
            a.reported().unwrap(),
            (vec!["ttft".into(), "e2el".into()], vec![50.0, 99.9])
        );
        let bad = parse(&["--model", "m", "--percentile-metrics", "ttft,latency"]);
        assert!(bad.reported().is_err());
    }

    /// The error `traffic()` gives for `args`, or its traffic.
    fn traffic(args: &[&str]) -> std::result::Result<Traffic, String> {
        let base = ["--model", "m"];
        parse(&[&base[..], args].concat())
            .traffic()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn ramp_up_flags_are_checked_as_vllm_checks_them() {
        let ramp = |strategy: &str, start: &str, end: &str| {
            traffic(&[
                "--ramp-up-strategy",
                strategy,
                "--ramp-up-start-rps",
                start,
                "--ramp-up-end-rps",
                end,
            ])
        };
        assert_eq!(
            ramp("linear", "1", "20"),
            Ok(Traffic::RampUp {
                strategy: RampUpStrategy::Linear,
                start_rps: 1.0,
                end_rps: 20.0
            })
        );
        assert_eq!(
            ramp("exponential", "2", "2").map(|t| t.rate(5, 10)),
            Ok(2.0)
        );
        assert_eq!(
            traffic(&["--request-rate", "4"]),
            Ok(Traffic::Constant(4.0))
        );
        let errors = [
            (ramp("linear", "5", "1"), "is above --ramp-up-end-rps 1"),
            (ramp("linear", "-1", "3"), "must be non-negative"),
            (
                ramp("exponential", "0", "3"),
                "start the exponential ramp-up at 1",
            ),
            (ramp("linear", "0", "3"), "start the linear ramp-up at 1"),
            (
                traffic(&["--ramp-up-strategy", "linear", "--ramp-up-end-rps", "3"]),
                "needs both --ramp-up-start-rps and --ramp-up-end-rps",
            ),
            (
                traffic(&[
                    "--ramp-up-strategy",
                    "linear",
                    "--ramp-up-start-rps",
                    "1",
                    "--ramp-up-end-rps",
                    "3",
                    "--request-rate",
                    "2",
                ]),
                "remove --request-rate 2",
            ),
            (traffic(&["--request-rate", "0"]), "must be positive"),
        ];
        for (got, want) in errors {
            let e = got.expect_err(want);
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
        let bad = Cli::try_parse_from(["bench", "--model", "m", "--ramp-up-strategy", "step"]);
        assert!(bad.is_err(), "only linear and exponential");
    }

    #[test]
    fn sampling_flags_and_the_extra_body_make_one_object() {
        let a = parse(&["--model", "m"]);
        assert!(
            a.extra_body().unwrap().is_empty(),
            "nothing is sent unasked"
        );
        let a = parse(&[
            "--model",
            "m",
            "--temperature",
            "0",
            "--top-p",
            "0.9",
            "--top-k",
            "-1",
            "--min-p",
            "0.05",
            "--presence-penalty",
            "-0.5",
            "--extra-body",
            r#"{"top_p": 0.5, "chat_template_kwargs": {"enable_thinking": false}}"#,
        ]);
        assert_eq!(
            Value::Object(a.extra_body().unwrap()),
            serde_json::json!({"temperature": 0.0, "top_p": 0.5, "top_k": -1, "min_p": 0.05,
                               "presence_penalty": -0.5,
                               "chat_template_kwargs": {"enable_thinking": false}}),
            "--extra-body wins over the sampling flags"
        );
        let e = parse(&["--model", "m", "--extra-body", "[1]"])
            .extra_body()
            .unwrap_err();
        assert!(e.to_string().contains("must be a JSON object"), "{e}");
        let e = parse(&["--model", "m", "--extra-body", "{top_p: 1}"])
            .extra_body()
            .unwrap_err();
        assert!(e.to_string().contains("is not JSON"), "{e}");
    }

    #[test]
    fn a_response_format_goes_in_every_body_unless_the_extra_body_sets_one() {
        let a = parse(&[
            "--model",
            "m",
            "--response-format",
            "grammar:root ::= [a-z ]*",
        ]);
        assert_eq!(
            Value::Object(a.extra_body().unwrap()),
            serde_json::json!({"response_format": {"type": "grammar", "grammar": "root ::= [a-z ]*"}})
        );
        let a = parse(&[
            "--model",
            "m",
            "--response-format",
            "json_object",
            "--extra-body",
            r#"{"response_format": {"type": "text"}}"#,
        ]);
        assert_eq!(
            a.extra_body().unwrap()["response_format"],
            serde_json::json!({"type": "text"})
        );
        let bad = Cli::try_parse_from(["bench", "--model", "m", "--response-format", "yaml"]);
        let e = bad.err().expect("an unknown format is refused").to_string();
        assert!(e.contains("expected json_object"), "{e}");
    }

    #[test]
    fn key_value_flags_repeat_and_split_at_the_first_equals_sign() {
        let a = parse(&[
            "--model",
            "m",
            "--header",
            "x-a=1",
            "x-b = 2=3 ",
            "--header",
            "x-c=",
            "--metadata",
            "tp=1",
            "--save-detailed",
            "--append-result",
        ]);
        assert_eq!(
            parse_key_values("--header", &a.header).unwrap(),
            [
                ("x-a".to_string(), "1".to_string()),
                ("x-b".to_string(), "2=3".to_string()),
                ("x-c".to_string(), String::new())
            ]
        );
        assert_eq!(
            parse_key_values("--metadata", &a.metadata).unwrap(),
            [("tp".to_string(), "1".to_string())]
        );
        assert!(a.save_detailed && a.append_result && !a.save_result);
        let e = parse_key_values("--header", &["novalue".to_string()]).unwrap_err();
        assert_eq!(e.to_string(), "--header \"novalue\" is not KEY=VALUE");
    }

    #[test]
    fn request_ids_have_vllms_prefix_unless_given() {
        let prefix = parse(&["--model", "m"]).request_id_prefix();
        assert_eq!(prefix.len(), "bench-".len() + 8 + 1, "{prefix}");
        assert!(prefix.starts_with("bench-") && prefix.ends_with('-'));
        assert!(prefix[6..14].chars().all(|c| c.is_ascii_hexdigit()));
        let given = parse(&["--model", "m", "--request-id-prefix", "run7-"]);
        assert_eq!(given.request_id_prefix(), "run7-");
    }
}
