//! `ember bench serve`: send a dataset's prompts to an OpenAI-compatible endpoint at a chosen
//! rate and concurrency, stream every answer, and report vLLM's serving metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::Semaphore;

use crate::args::{parse_key_values, DatasetName, ServeArgs};
use crate::arrivals::Traffic;
use crate::dataset::{self, PrefixRepetition, PromptTokenizer, RandomLengths, SampleRequest};
use crate::metrics::{calculate_metrics, Goodput, RequestOutput};
use crate::report::{self, BenchmarkResult, RequestRate, RpsChange};
use crate::request::{self, RequestInput, RequestTemplate};
use crate::{arrivals, metrics};

/// Runs the benchmark, prints its table and, with --save-result, writes its JSON.
pub async fn run(args: ServeArgs) -> Result<BenchmarkResult> {
    if args.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1");
    }
    let traffic = args.traffic()?;
    if args.burstiness.is_nan() || args.burstiness <= 0.0 {
        bail!("--burstiness {} must be positive", args.burstiness);
    }
    let (backend, endpoint) = args.backend_and_endpoint();
    let api_url = format!("{}{endpoint}", args.base_url());
    let goodput = Goodput::parse(&args.goodput).map_err(anyhow::Error::msg)?;
    let (metric_names, percentiles) = args.reported()?;
    let headers = request::run_headers(
        args.api_key.as_deref(),
        &parse_key_values("--header", &args.header)?,
    )?;
    let metadata = parse_key_values("--metadata", &args.metadata)?;
    let extra_body = args.extra_body()?;
    if !extra_body.contains_key("temperature") {
        eprintln!(
            "note: no --temperature, so the server's default sampling applies; \
             pass --temperature 0 for greedy decoding"
        );
    }
    let tokenizer_path = args.tokenizer_path();
    let tokenizer = tokenizer_path
        .as_deref()
        .map(PromptTokenizer::from_path)
        .transpose()?;
    let requests = sample(&args, tokenizer.as_ref())?;
    // As vLLM does: random prompts run to their length.
    let ignore_eos = args.ignore_eos || args.dataset_name == DatasetName::Random;
    let template = Arc::new(RequestTemplate {
        api_url,
        backend,
        model: args.served_model_name.clone().unwrap_or(args.model.clone()),
        ignore_eos,
        headers,
        extra_body,
    });
    let prefix = args.request_id_prefix();
    let inputs: Vec<RequestInput> = requests
        .into_iter()
        .enumerate()
        .map(|(i, r)| RequestInput {
            prompt: r.prompt,
            prompt_len: r.prompt_len,
            output_len: r.output_len,
            request_id: Some(format!("{prefix}{i}")),
        })
        .collect();
    let client = request::client(args.insecure).context("cannot build the HTTP client")?;

    if args.num_warmups > 0 {
        eprintln!("Warming up with {} requests...", args.num_warmups);
        // As vLLM's: the first prompt, without a request id.
        let warmup = RequestInput {
            request_id: None,
            ..inputs[0].clone()
        };
        let warmups = vec![warmup; args.num_warmups];
        let schedule = vec![0.0; warmups.len()];
        let run = Run {
            client: &client,
            template: &template,
            max_concurrency: args.max_concurrency,
            quiet: args.disable_tqdm,
        };
        run.drive(warmups, &schedule).await;
    }
    let distribution = if args.burstiness == 1.0 {
        "Poisson process"
    } else {
        "Gamma distribution"
    };
    match traffic {
        Traffic::Constant(rate) => eprintln!("Traffic request rate: {rate}"),
        Traffic::RampUp {
            strategy,
            start_rps,
            end_rps,
        } => {
            eprintln!("Traffic ramp-up strategy: {}.", strategy.name());
            eprintln!(
                "Will increase RPS from {start_rps} to {end_rps} RPS over the duration of the \
                 benchmark."
            );
        }
    }
    eprintln!("Burstiness factor: {} ({distribution})", args.burstiness);
    eprintln!("Maximum request concurrency: {:?}", args.max_concurrency);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let schedule = arrivals::schedule(inputs.len(), &traffic, args.burstiness, &mut rng);
    let start_micros = unix_micros();
    let start = Instant::now();
    let run = Run {
        client: &client,
        template: &template,
        max_concurrency: args.max_concurrency,
        quiet: args.disable_tqdm,
    };
    let outputs = run.drive(inputs, &schedule).await;
    let duration = start.elapsed().as_secs_f64();
    let rps_change_events: Vec<RpsChange> = arrivals::rps_changes(&traffic, &schedule)
        .into_iter()
        .map(|(rps, at)| RpsChange {
            rps,
            timestamp: report::format_iso_time(start_micros + (at * 1e6) as u64),
        })
        .collect();

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
    let result = BenchmarkResult {
        date: report::format_date(unix_micros() / 1_000_000),
        endpoint_type: backend.name().into(),
        backend: backend.name().into(),
        label: args.label.clone(),
        model_id: args.model.clone(),
        tokenizer_id: tokenizer_path.map(|p| p.to_string_lossy().into_owned()),
        num_prompts: args.num_prompts,
        request_rate: RequestRate(args.request_rate),
        burstiness: args.burstiness,
        max_concurrency: args.max_concurrency,
        ramp_up_strategy: args.ramp_up_strategy.map(|s| s.name().to_string()),
        ramp_up_start_rps: args.ramp_up_strategy.and(args.ramp_up_start_rps),
        ramp_up_end_rps: args.ramp_up_strategy.and(args.ramp_up_end_rps),
        rps_change_events: (!rps_change_events.is_empty()).then_some(rps_change_events),
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
    if args.save_result || args.append_result {
        save(&args, &result, &metadata)?;
    }
    Ok(result)
}

/// Microseconds since the Unix epoch, now.
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
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

/// What every request of one batch of sends shares.
struct Run<'a> {
    client: &'a reqwest::Client,
    template: &'a Arc<RequestTemplate>,
    max_concurrency: Option<usize>,
    /// No progress bar.
    quiet: bool,
}

impl Run<'_> {
    /// Sends `inputs[i]` at `schedule[i]` seconds, at most `max_concurrency` at once; the
    /// outputs in input order.
    async fn drive(&self, inputs: Vec<RequestInput>, schedule: &[f64]) -> Vec<RequestOutput> {
        let bar = if self.quiet {
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
            self.max_concurrency.unwrap_or(Semaphore::MAX_PERMITS),
        ));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(inputs.len());
        for (input, &at) in inputs.into_iter().zip(schedule) {
            tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
            let (client, template) = (self.client.clone(), self.template.clone());
            let (limit, bar) = (limit.clone(), bar.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire_owned().await;
                let output = request::send(&client, &template, &input, start).await;
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
}

/// Writes `result` where --result-dir / --result-filename say, or adds it there with
/// --append-result.
fn save(args: &ServeArgs, result: &BenchmarkResult, metadata: &[(String, String)]) -> Result<()> {
    let label = args.label.clone().unwrap_or_else(|| result.backend.clone());
    let name = args.result_filename.clone().unwrap_or_else(|| {
        let traffic = match (
            &result.ramp_up_strategy,
            result.ramp_up_start_rps,
            result.ramp_up_end_rps,
        ) {
            (Some(strategy), Some(start), Some(end)) => {
                report::ramp_up_traffic(strategy, start, end)
            }
            _ => report::rate_traffic(args.request_rate),
        };
        report::default_file_name(
            &label,
            &traffic,
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
    let json = result.to_json(args.save_detailed, metadata);
    report::write_json(&path, &json, args.append_result)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("Saved the result to {}", path.display());
    Ok(())
}
