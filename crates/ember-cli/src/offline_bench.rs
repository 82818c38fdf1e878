//! `ember bench throughput` and `ember bench latency`: the engine measured in-process, without
//! HTTP. Flags and JSON keys follow `vllm bench throughput` / `vllm bench latency`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use ember_core::{Constraint, FinishReason, SamplingParams};
use ember_engine::runner::ModelRunner;
use ember_engine::{Engine, StatsSnapshot, FORWARD_PHASE, STEP_PHASES};
use ember_models::SequenceInput;
use ember_server::detokenizer::IncrementalDetokenizer;
use ember_server::tokenizer::TextTokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::args::ModelArgs;

/// Flags of `ember bench throughput`.
#[derive(Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens per request (random ids from the tokenizer's vocabulary, specials excluded).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Tokens generated per request (end-of-sequence ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Lengths vary uniformly in [len·(1−r), len·(1+r)].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    #[arg(long, default_value_t = 100)]
    pub num_prompts: usize,
    /// Skip turning output ids into text (by default it is done as the server would, and timed).
    #[arg(long)]
    pub disable_detokenize: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    /// LoRA adapters (`name=path` or vLLM's JSON form; needs --enable-lora): requests are given
    /// to them in turn, so the batch mixes as many distinct adapters as are listed.
    #[arg(long, num_args = 1.., value_parser = crate::args::parse_lora_module)]
    pub lora_modules: Vec<crate::args::LoraModule>,
    /// vLLM's form: one adapter directory registered --max-loras times under distinct ids
    /// (distinct adapters to the engine, equal weights); requests are given to them in turn.
    #[arg(long, conflicts_with = "lora_modules")]
    pub lora_path: Option<PathBuf>,
    /// Structured output for every request, compiled as the server compiles `response_format`:
    /// json_object, json_schema:<file or inline JSON>, grammar:<GBNF file or inline GBNF>, or a
    /// whole response_format object. A grammar that completes ends its request early.
    #[arg(long, value_name = "FORMAT", value_parser = ember_bench::response_format::parse_response_format)]
    pub response_format: Option<serde_json::Value>,
}

/// Flags of `ember bench latency`.
#[derive(Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences in the batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub input_len: usize,
    /// Tokens generated per sequence (the first comes from the prefill step).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    pub num_iters_warmup: usize,
    /// Timed iterations.
    #[arg(long, default_value_t = 5)]
    pub num_iters: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

/// The `p`-th percentile (0–100) of unsorted `values`, as numpy computes it; 0 when empty.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    ember_bench::metrics::percentile(&sorted, p)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Random prompt ids: uniform over the tokenizer's ordinary tokens (or the model's vocabulary
/// when there is no tokenizer), so every engine sees the same kind of input.
struct PromptSampler {
    vocab: Vec<u32>,
    rng: StdRng,
}

impl PromptSampler {
    fn new(tokenizer: Option<&TextTokenizer>, model_vocab: usize, seed: u64) -> Result<Self> {
        let vocab: Vec<u32> = match tokenizer {
            Some(t) => (0..t.vocab_size().min(model_vocab) as u32)
                .filter(|&id| !t.is_special(id))
                .collect(),
            None => (0..model_vocab as u32).collect(),
        };
        if vocab.is_empty() {
            bail!("no ordinary token ids to build prompts from");
        }
        Ok(Self {
            vocab,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    fn length(&mut self, len: usize, ratio: f64) -> usize {
        let lo = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as usize;
        let hi = ((len as f64) * (1.0 + ratio)).ceil().max(lo as f64) as usize;
        self.rng.random_range(lo..=hi)
    }

    fn prompt(&mut self, len: usize) -> Vec<u32> {
        (0..len)
            .map(|_| self.vocab[self.rng.random_range(0..self.vocab.len())])
            .collect()
    }
}

fn load_tokenizer(args: &ModelArgs, model_dir: &std::path::Path) -> Option<TextTokenizer> {
    let dir = args.tokenizer_dir(model_dir);
    match TextTokenizer::from_dir(&dir) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("no tokenizer ({e}); prompts use random ids over the model's vocabulary and outputs are not detokenized");
            None
        }
    }
}

fn write_json(path: &Option<PathBuf>, value: &serde_json::Value) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

/// The engine's step-phase seconds between two snapshots.
fn phase_seconds(before: &StatsSnapshot, after: &StatsSnapshot) -> [f64; 5] {
    std::array::from_fn(|i| after.step_time_seconds[i] - before.step_time_seconds[i])
}

/// Runs `ember bench throughput`.
pub fn run_throughput(args: ThroughputArgs) -> Result<()> {
    let loaded = ember_models::load_model(&args.model.load_options()?)?;
    let tokenizer = load_tokenizer(&args.model, &loaded.dir).map(Arc::new);
    let mut sampler = PromptSampler::new(
        tokenizer.as_deref(),
        loaded.config.vocab_size,
        args.model.seed,
    )?;
    let constraint = throughput_constraint(&args, tokenizer.as_deref(), &loaded)?;
    let requests: Vec<(Vec<u32>, usize)> = (0..args.num_prompts)
        .map(|_| {
            let input = sampler.length(args.input_len, args.random_range_ratio);
            let output = sampler.length(args.output_len, args.random_range_ratio);
            (sampler.prompt(input), output)
        })
        .collect();
    let handle = Engine::start(loaded, args.model.engine_config()?)?;
    let adapters = throughput_adapters(&args, &handle)?;
    let before = handle.stats();
    let start = Instant::now();
    let mut receivers = Vec::with_capacity(requests.len());
    for (i, (prompt, output_len)) in requests.iter().enumerate() {
        let params = SamplingParams {
            max_tokens: *output_len,
            ignore_eos: true,
            constraint: constraint.clone(),
            ..SamplingParams::default()
        };
        let adapter = (!adapters.is_empty()).then(|| adapters[i % adapters.len()].name.as_str());
        receivers.push(handle.submit_with_adapter(prompt.clone(), params, adapter)?);
    }
    let mut detokenize = Duration::ZERO;
    let mut output_tokens = 0usize;
    let mut stopped_early = 0usize;
    for ((prompt, _), mut rx) in requests.iter().zip(receivers) {
        let mut detok = tokenizer
            .as_ref()
            .filter(|_| !args.disable_detokenize)
            .map(|t| IncrementalDetokenizer::new(t.clone(), prompt, true));
        while let Some(out) = rx.blocking_recv() {
            output_tokens += out.new_token_ids.len();
            if let Some(d) = detok.as_mut() {
                let t = Instant::now();
                for &id in &out.new_token_ids {
                    d.push(id);
                }
                detokenize += t.elapsed();
            }
            if let Some(err) = out.error {
                bail!("request failed: {err}");
            }
            if let Some(reason) = out.finish_reason {
                stopped_early += usize::from(reason == FinishReason::Stop);
                break;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The last step publishes its counters just after sending its tokens: wait for them.
    let mut after = handle.stats();
    let waited = Instant::now();
    while (after.running > 0 || after.waiting > 0) && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
        after = handle.stats();
    }
    let phases = phase_seconds(&before, &after);
    let steps = after.steps - before.steps;
    let busy: f64 = phases.iter().sum();
    let prompt_tokens: usize = requests.iter().map(|(p, _)| p.len()).sum();
    let total_tokens = prompt_tokens + output_tokens;
    println!("============ Offline Throughput Benchmark ============");
    println!("{:<40}{:>12}", "Requests:", requests.len());
    if !adapters.is_empty() {
        println!("{:<40}{:>12}", "Distinct LoRA adapters:", adapters.len());
    }
    if let Some(format) = &args.response_format {
        println!(
            "{:<40}{:>12}",
            "Response format:",
            format["type"].as_str().unwrap_or("?")
        );
        println!(
            "{:<40}{:>12}",
            "Requests its grammar ended early:", stopped_early
        );
    }
    println!("{:<40}{:>12.2}", "Elapsed time (s):", elapsed);
    println!("{:<40}{:>12}", "Prompt tokens:", prompt_tokens);
    println!("{:<40}{:>12}", "Output tokens:", output_tokens);
    println!(
        "{:<40}{:>12.2}",
        "Requests/s:",
        requests.len() as f64 / elapsed
    );
    println!(
        "{:<40}{:>12.2}",
        "Output tokens/s:",
        output_tokens as f64 / elapsed
    );
    println!(
        "{:<40}{:>12.2}",
        "Total tokens/s:",
        total_tokens as f64 / elapsed
    );
    println!("------------------ Engine steps ----------------------");
    println!("{:<40}{:>12}", "Steps:", steps);
    println!(
        "{:<40}{:>12.3}",
        "Mean step (ms):",
        busy / steps.max(1) as f64 * 1e3
    );
    for (name, secs) in STEP_PHASES.iter().zip(phases) {
        println!(
            "{:<40}{:>12.3}{:>8.1}%",
            format!("  {name} per step (ms):"),
            secs / steps.max(1) as f64 * 1e3,
            secs / busy.max(f64::MIN_POSITIVE) * 100.0
        );
    }
    println!(
        "{:<40}{:>12.1}%",
        "Outside the forward pass:",
        (1.0 - phases[FORWARD_PHASE] / busy.max(f64::MIN_POSITIVE)) * 100.0
    );
    if tokenizer.is_some() && !args.disable_detokenize {
        println!(
            "{:<40}{:>12.3}{:>8.1}%",
            "Detokenize total (s), share of elapsed:",
            detokenize.as_secs_f64(),
            detokenize.as_secs_f64() / elapsed * 100.0
        );
    }
    println!("======================================================");
    let step_ms: serde_json::Map<String, serde_json::Value> = STEP_PHASES
        .iter()
        .zip(phases)
        .map(|(n, s)| (n.to_string(), json!(s / steps.max(1) as f64 * 1e3)))
        .collect();
    write_json(
        &args.output_json,
        &json!({
            "elapsed_time": elapsed,
            "num_requests": requests.len(),
            "total_num_tokens": total_tokens,
            "total_output_tokens": output_tokens,
            "requests_per_second": requests.len() as f64 / elapsed,
            "tokens_per_second": total_tokens as f64 / elapsed,
            "output_tokens_per_second": output_tokens as f64 / elapsed,
            "num_steps": steps,
            "mean_step_ms": busy / steps.max(1) as f64 * 1e3,
            "step_phase_ms": step_ms,
            "overhead_fraction": 1.0 - phases[FORWARD_PHASE] / busy.max(f64::MIN_POSITIVE),
            "detokenize_seconds": detokenize.as_secs_f64(),
            "num_lora_adapters": adapters.len(),
            "lora_max_rank": adapters.iter().map(|a| a.max_rank).max(),
            "response_format": args.response_format,
            "num_stopped_early": stopped_early,
        }),
    )
}

/// `--response-format` compiled through the server's own path (same tokenizer, eos ids and
/// vocabulary width as `ember serve` gives it); `None` without the flag or for plain text.
fn throughput_constraint(
    args: &ThroughputArgs,
    tokenizer: Option<&TextTokenizer>,
    loaded: &ember_models::LoadedModel,
) -> Result<Option<Constraint>> {
    let Some(format) = &args.response_format else {
        return Ok(None);
    };
    let tokenizer = tokenizer.ok_or_else(|| {
        anyhow!("--response-format needs the model's tokenizer; pass --tokenizer <dir with tokenizer.json>")
    })?;
    ember_server::structured::compile_response_format(
        tokenizer,
        &loaded.eos_token_ids,
        loaded.config.vocab_size,
        format,
    )
    .map_err(|e| anyhow!("--response-format: {e}"))
}

/// The adapters `--lora-modules` / `--lora-path` name, registered with the engine.
fn throughput_adapters(
    args: &ThroughputArgs,
    handle: &ember_engine::EngineHandle,
) -> Result<Vec<ember_engine::LoraInfo>> {
    let modules: Vec<(String, PathBuf)> = match &args.lora_path {
        Some(path) => (1..=args.model.lora.max_loras)
            .map(|i| (format!("lora-{i}"), path.clone()))
            .collect(),
        None => args
            .lora_modules
            .iter()
            .map(|m| (m.name.clone(), m.path.clone()))
            .collect(),
    };
    if modules.is_empty() {
        return Ok(Vec::new());
    }
    let lora = handle
        .lora()
        .ok_or_else(|| anyhow!("--lora-modules and --lora-path need --enable-lora"))?;
    modules
        .iter()
        .map(|(name, path)| {
            lora.load(name, path)
                .with_context(|| format!("LoRA adapter {name} ({})", path.display()))
        })
        .collect()
}

/// Timings of one latency iteration.
struct Iteration {
    prefill: f64,
    decode_steps: Vec<f64>,
}

/// Runs one fixed batch through the model runner: a prefill step of every prompt, then one
/// decode step per further token, greedy.
fn run_batch(
    runner: &ModelRunner,
    prompts: &[Vec<u32>],
    output_len: usize,
    blocks_per_seq: usize,
) -> Result<Iteration> {
    let block_tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|b| ((b * blocks_per_seq) as u32..((b + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let argmax = |rows: &Vec<Vec<f32>>| -> Result<u32> {
        let row = rows.last().ok_or_else(|| anyhow!("no logits"))?;
        Ok(row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0))
    };
    let start = Instant::now();
    let inputs: Vec<SequenceInput<'_>> = prompts
        .iter()
        .zip(&block_tables)
        .map(|(p, table)| SequenceInput {
            token_ids: p,
            num_computed: 0,
            block_table: table,
            all_logits: false,
            adapter: None,
        })
        .collect();
    let logits = runner.execute(&inputs)?;
    let mut next: Vec<[u32; 1]> = logits
        .iter()
        .map(|rows| argmax(rows).map(|t| [t]))
        .collect::<Result<_>>()?;
    let prefill = start.elapsed().as_secs_f64();
    let mut decode_steps = Vec::with_capacity(output_len.saturating_sub(1));
    for step in 1..output_len {
        let start = Instant::now();
        let inputs: Vec<SequenceInput<'_>> = prompts
            .iter()
            .zip(&block_tables)
            .zip(&next)
            .map(|((p, table), token)| SequenceInput {
                token_ids: token,
                num_computed: p.len() + step - 1,
                block_table: table,
                all_logits: false,
                adapter: None,
            })
            .collect();
        let logits = runner.execute(&inputs)?;
        next = logits
            .iter()
            .map(|rows| argmax(rows).map(|t| [t]))
            .collect::<Result<_>>()?;
        decode_steps.push(start.elapsed().as_secs_f64());
    }
    Ok(Iteration {
        prefill,
        decode_steps,
    })
}

/// Runs `ember bench latency`.
pub fn run_latency(args: LatencyArgs) -> Result<()> {
    if args.batch_size == 0 || args.input_len == 0 || args.output_len == 0 || args.num_iters == 0 {
        bail!("--batch-size, --input-len, --output-len and --num-iters must be positive");
    }
    let loaded = ember_models::load_model(&args.model.load_options()?)?;
    let total_len = args.input_len + args.output_len;
    if total_len > loaded.max_model_len {
        bail!(
            "--input-len + --output-len ({total_len}) exceed the model's context ({})",
            loaded.max_model_len
        );
    }
    let tokenizer = load_tokenizer(&args.model, &loaded.dir);
    let mut sampler = PromptSampler::new(
        tokenizer.as_ref(),
        loaded.config.vocab_size,
        args.model.seed,
    )?;
    let prompts: Vec<Vec<u32>> = (0..args.batch_size)
        .map(|_| sampler.prompt(args.input_len))
        .collect();
    let block_size = args.model.block_size;
    let blocks_per_seq = total_len.div_ceil(block_size);
    // The one batch's size is all the graphs need: the sizes up to the first that holds it.
    let mut graph_sizes = args.model.cuda_graph_sizes()?;
    graph_sizes.sort_unstable();
    if let Some(fits) = graph_sizes.iter().position(|&s| s >= args.batch_size) {
        graph_sizes.truncate(fits + 1);
    }
    let runner = ModelRunner::new(
        loaded,
        blocks_per_seq * args.batch_size,
        block_size,
        &graph_sizes,
    )?;
    runner.capture_graphs();
    for _ in 0..args.num_iters_warmup {
        run_batch(&runner, &prompts, args.output_len, blocks_per_seq)?;
    }
    let mut iterations = Vec::with_capacity(args.num_iters);
    for i in 0..args.num_iters {
        let it = run_batch(&runner, &prompts, args.output_len, blocks_per_seq)?;
        eprintln!(
            "iteration {}/{}: prefill {:.1} ms, decode {:.2} ms/step",
            i + 1,
            args.num_iters,
            it.prefill * 1e3,
            mean(&it.decode_steps) * 1e3
        );
        iterations.push(it);
    }
    let latencies: Vec<f64> = iterations
        .iter()
        .map(|it| it.prefill + it.decode_steps.iter().sum::<f64>())
        .collect();
    let prefills: Vec<f64> = iterations.iter().map(|it| it.prefill).collect();
    let steps: Vec<f64> = iterations
        .iter()
        .flat_map(|it| it.decode_steps.iter().copied())
        .collect();
    let (b, i) = (args.batch_size as f64, args.input_len as f64);
    let pcts = [10.0, 25.0, 50.0, 75.0, 90.0, 99.0];
    println!("============ Latency Benchmark ============");
    println!(
        "batch {} × input {} → output {}; {} iterations",
        args.batch_size, args.input_len, args.output_len, args.num_iters
    );
    println!(
        "{:<36}{:>12.2}",
        "Avg latency (ms):",
        mean(&latencies) * 1e3
    );
    println!(
        "{:<36}{:>12.2}",
        "Prefill (ms), mean:",
        mean(&prefills) * 1e3
    );
    println!(
        "{:<36}{:>12.1}",
        "Prefill tokens/s:",
        b * i / mean(&prefills)
    );
    if !steps.is_empty() {
        println!(
            "{:<36}{:>12.3}",
            "Decode step (ms), mean:",
            mean(&steps) * 1e3
        );
        for p in [50.0, 90.0, 99.0] {
            println!(
                "{:<36}{:>12.3}",
                format!("Decode step (ms), p{p}:"),
                percentile(&steps, p) * 1e3
            );
        }
        println!(
            "{:<36}{:>12.1}",
            "Decode tokens/s (batch):",
            b / mean(&steps)
        );
        println!(
            "{:<36}{:>12.1}",
            "Decode tokens/s (per sequence):",
            1.0 / mean(&steps)
        );
    }
    // Warm-up steps included: whether decode steps ran as CUDA graphs at all.
    let graph_steps = runner.graph_steps();
    println!(
        "{:<36}{:>12}",
        "Decode steps from CUDA graphs:", graph_steps
    );
    println!("===========================================");
    let percentiles: serde_json::Map<String, serde_json::Value> = pcts
        .iter()
        .map(|&p| (format!("{p}"), json!(percentile(&latencies, p))))
        .collect();
    write_json(
        &args.output_json,
        &json!({
            "avg_latency": mean(&latencies),
            "latencies": latencies,
            "percentiles": percentiles,
            "batch_size": args.batch_size,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "avg_prefill_latency": mean(&prefills),
            "prefill_latencies": prefills,
            "prefill_tokens_per_second": b * i / mean(&prefills),
            "avg_decode_step_latency": mean(&steps),
            "p50_decode_step_latency": percentile(&steps, 50.0),
            "p99_decode_step_latency": percentile(&steps, 99.0),
            "decode_tokens_per_second": if steps.is_empty() { 0.0 } else { b / mean(&steps) },
            "cuda_graph_steps": graph_steps,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lengths_stay_in_range_and_avoid_specials() {
        let mut s = PromptSampler {
            vocab: vec![3, 5, 7],
            rng: StdRng::seed_from_u64(1),
        };
        for _ in 0..200 {
            let n = s.length(100, 0.25);
            assert!((75..=125).contains(&n), "{n}");
        }
        assert!(s.prompt(50).iter().all(|t| [3, 5, 7].contains(t)));
        assert_eq!(s.length(16, 0.0), 16);
    }
}
