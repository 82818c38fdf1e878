//! `ember bench serve`: send a dataset's prompts to an OpenAI-compatible endpoint at a chosen
//! rate and concurrency, stream every answer, and report vLLM's serving metrics. The flags
//! are `vllm bench serve`'s, so its users' scripts carry over.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::Semaphore;

use crate::dataset::{self, PrefixRepetition, PromptTokenizer, RandomLengths, SampleRequest};
use crate::metrics::{calculate_metrics, Goodput, RequestOutput};
use crate::report::{self, BenchmarkResult, RequestRate, PERCENTILE_METRICS};
use crate::request::{self, Backend, RequestInput};
use crate::{arrivals, metrics};

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
    /// Sampling temperature sent with each request.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Write the result JSON.
    #[arg(long)]
    pub save_result: bool,
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
    fn base_url(&self) -> String {
        match &self.base_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None if self.host.contains(':') => format!("http://[{}]:{}", self.host, self.port),
            None => format!("http://{}:{}", self.host, self.port),
        }
    }

    /// The request shape and the path it is sent to.
    fn backend_and_endpoint(&self) -> (Backend, String) {
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
    fn tokenizer_path(&self) -> Option<PathBuf> {
        self.tokenizer.clone().or_else(|| {
            let model = PathBuf::from(&self.model);
            model.join("tokenizer.json").is_file().then_some(model)
        })
    }

    /// The metric names and percentiles to report, checked.
    fn reported(&self) -> Result<(Vec<String>, Vec<f64>)> {
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
}

/// Runs the benchmark, prints its table and, with --save-result, writes its JSON.
pub async fn run(args: ServeArgs) -> Result<BenchmarkResult> {
    if args.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1");
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        bail!(
            "--request-rate {} must be positive (or inf)",
            args.request_rate
        );
    }
    if args.burstiness.is_nan() || args.burstiness <= 0.0 {
        bail!("--burstiness {} must be positive", args.burstiness);
    }
    let base_url = args.base_url();
    if base_url.starts_with("https://") {
        bail!("{base_url}: this build of ember speaks plain http only; put a TLS proxy in front");
    }
    let (backend, endpoint) = args.backend_and_endpoint();
    let api_url = format!("{base_url}{endpoint}");
    let goodput = Goodput::parse(&args.goodput).map_err(anyhow::Error::msg)?;
    let (metric_names, percentiles) = args.reported()?;
    let tokenizer_path = args.tokenizer_path();
    let tokenizer = tokenizer_path
        .as_deref()
        .map(PromptTokenizer::from_path)
        .transpose()?;
    let requests = sample(&args, tokenizer.as_ref())?;
    // As vLLM does: random prompts run to their length.
    let ignore_eos = args.ignore_eos || args.dataset_name == DatasetName::Random;
    let model = args.served_model_name.clone().unwrap_or(args.model.clone());
    let inputs: Vec<RequestInput> = requests
        .into_iter()
        .map(|r| RequestInput {
            api_url: api_url.clone(),
            backend,
            model: model.clone(),
            prompt: r.prompt,
            prompt_len: r.prompt_len,
            output_len: r.output_len,
            ignore_eos,
            temperature: Some(args.temperature),
            api_key: args.api_key.clone(),
        })
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(6 * 3600))
        .build()
        .context("cannot build the HTTP client")?;

    if args.num_warmups > 0 {
        eprintln!("Warming up with {} requests...", args.num_warmups);
        let warmups = vec![inputs[0].clone(); args.num_warmups];
        let schedule = vec![0.0; warmups.len()];
        drive(&client, warmups, &schedule, args.max_concurrency, true).await;
    }
    let distribution = if args.burstiness == 1.0 {
        "Poisson process"
    } else {
        "Gamma distribution"
    };
    eprintln!("Traffic request rate: {}", args.request_rate);
    eprintln!("Burstiness factor: {} ({distribution})", args.burstiness);
    eprintln!("Maximum request concurrency: {:?}", args.max_concurrency);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let schedule = arrivals::schedule(inputs.len(), args.request_rate, args.burstiness, &mut rng);
    let start = Instant::now();
    let outputs = drive(
        &client,
        inputs,
        &schedule,
        args.max_concurrency,
        args.disable_tqdm,
    )
    .await;
    let duration = start.elapsed().as_secs_f64();

    let failures: Vec<&RequestOutput> = outputs.iter().filter(|o| !o.success).collect();
    if !failures.is_empty() {
        eprintln!(
            "Failed requests during the benchmark (first 10 of {}):",
            failures.len()
        );
        for (i, f) in failures.iter().take(10).enumerate() {
            eprintln!("Error {i}: {}", f.error);
        }
    }
    let m = calculate_metrics(&outputs, duration, &percentiles, &goodput);
    let mut stats = std::collections::BTreeMap::new();
    for name in &metric_names {
        let summary: &metrics::Summary = match name.as_str() {
            "ttft" => &m.ttft,
            "tpot" => &m.tpot,
            "itl" => &m.itl,
            _ => &m.e2el,
        };
        report::insert_stats(&mut stats, name, summary);
    }
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let result = BenchmarkResult {
        date: report::format_date(unix),
        endpoint_type: backend.name().into(),
        backend: backend.name().into(),
        label: args.label.clone(),
        model_id: args.model.clone(),
        tokenizer_id: tokenizer_path.map(|p| p.to_string_lossy().into_owned()),
        num_prompts: args.num_prompts,
        request_rate: RequestRate(args.request_rate),
        burstiness: args.burstiness,
        max_concurrency: args.max_concurrency,
        duration,
        completed: m.completed,
        failed: m.failed,
        total_input_tokens: m.total_input,
        total_output_tokens: m.total_output,
        request_throughput: m.request_throughput,
        request_goodput: (!goodput.is_empty()).then_some(m.request_goodput),
        output_throughput: m.output_throughput,
        total_token_throughput: m.total_token_throughput,
        input_lens: outputs.iter().map(|o| o.prompt_len).collect(),
        output_lens: m.output_lens,
        ttfts: outputs.iter().map(|o| o.ttft).collect(),
        itls: outputs.iter().map(|o| o.itl.clone()).collect(),
        latencies: outputs.iter().map(|o| o.latency).collect(),
        start_times: outputs.iter().map(|o| o.start_time).collect(),
        generated_texts: outputs.iter().map(|o| o.generated_text.clone()).collect(),
        errors: outputs.iter().map(|o| o.error.clone()).collect(),
        max_output_tokens_per_s: m.max_output_tokens_per_s,
        max_concurrent_requests: m.max_concurrent_requests,
        stats,
    };
    print!(
        "{}",
        report::render_table(&result, &metric_names, &percentiles)
    );
    if args.save_result {
        save(&args, &result)?;
    }
    Ok(result)
}

/// The prompts of the chosen dataset.
fn sample(args: &ServeArgs, tokenizer: Option<&PromptTokenizer>) -> Result<Vec<SampleRequest>> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let need_tokenizer = || {
        tokenizer.with_context(|| {
            format!(
                "--dataset-name {} needs a tokenizer: pass --tokenizer <dir with tokenizer.json> \
                 (--model {} is not a local directory with one)",
                args.dataset_name
                    .to_possible_value()
                    .map_or(String::new(), |v| v.get_name().to_string()),
                args.model
            )
        })
    };
    let requests = match args.dataset_name {
        DatasetName::Random => dataset::random(
            need_tokenizer()?,
            args.num_prompts,
            RandomLengths {
                input_len: args.random_input_len,
                output_len: args.random_output_len,
                range_ratio: args.random_range_ratio,
                prefix_len: args.random_prefix_len,
            },
            &mut rng,
        )?,
        DatasetName::PrefixRepetition => dataset::prefix_repetition(
            need_tokenizer()?,
            args.num_prompts,
            PrefixRepetition {
                prefix_len: args.prefix_repetition_prefix_len,
                suffix_len: args.prefix_repetition_suffix_len,
                num_prefixes: args.prefix_repetition_num_prefixes,
                output_len: args.prefix_repetition_output_len,
            },
            &mut rng,
        )?,
        DatasetName::Sharegpt => {
            let path = args
                .dataset_path
                .as_deref()
                .context("--dataset-name sharegpt needs --dataset-path <ShareGPT JSON>")?;
            dataset::sharegpt(
                path,
                need_tokenizer()?,
                args.num_prompts,
                args.sharegpt_output_len,
                &mut rng,
            )?
        }
        DatasetName::Custom => {
            let prompts = match (&args.prompt, &args.dataset_path) {
                (Some(p), _) => vec![p.clone()],
                (None, Some(path)) => dataset::read_prompts(path)?,
                (None, None) => bail!("--dataset-name custom needs --prompt or --dataset-path"),
            };
            dataset::custom(
                &prompts,
                tokenizer,
                args.num_prompts,
                args.custom_output_len,
            )?
        }
    };
    if requests.is_empty() {
        bail!("no requests to send; raise --num-prompts");
    }
    Ok(requests)
}

/// Sends `inputs[i]` at `schedule[i]` seconds, at most `max_concurrency` at once; the outputs
/// in input order.
async fn drive(
    client: &reqwest::Client,
    inputs: Vec<RequestInput>,
    schedule: &[f64],
    max_concurrency: Option<usize>,
    quiet: bool,
) -> Vec<RequestOutput> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(inputs.len() as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}]",
        ) {
            bar.set_style(style);
        }
        bar
    };
    let limit = Arc::new(Semaphore::new(
        max_concurrency.unwrap_or(Semaphore::MAX_PERMITS),
    ));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(inputs.len());
    for (input, &at) in inputs.into_iter().zip(schedule) {
        tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
        let (client, limit, bar) = (client.clone(), limit.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            let output = request::send(&client, &input, start).await;
            bar.inc(1);
            output
        }));
    }
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.unwrap_or_else(|e| RequestOutput {
            error: format!("the request task failed: {e}"),
            ..Default::default()
        }));
    }
    bar.finish_and_clear();
    outputs
}

/// Writes `result` where --result-dir / --result-filename say.
fn save(args: &ServeArgs, result: &BenchmarkResult) -> Result<()> {
    let label = args.label.clone().unwrap_or_else(|| result.backend.clone());
    let name = args.result_filename.clone().unwrap_or_else(|| {
        report::default_file_name(
            &label,
            args.request_rate,
            args.max_concurrency,
            &args.model,
            &result.date,
        )
    });
    let path = match &args.result_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create --result-dir {}", dir.display()))?;
            dir.join(name)
        }
        None => PathBuf::from(name),
    };
    let json = serde_json::to_string(result).context("cannot serialise the result")?;
    std::fs::write(&path, json).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("Saved the result to {}", path.display());
    Ok(())
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
}
