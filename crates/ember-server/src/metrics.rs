//! `/metrics` in the Prometheus (OpenMetrics) text format: the engine's counters, read at
//! scrape time, and the server's own request counters and latency histograms. Names follow
//! vLLM's `vllm:*` metrics with the `ember:` prefix.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use ember_engine::ExpertLoadSnapshot;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::EngineClient;
use crate::state::AppState;

/// Content type of the OpenMetrics text format, which Prometheus scrapes natively.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Seconds from a request's arrival to its first generated token (vLLM's buckets).
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Seconds per generated token after the first (vLLM's buckets).
const TPOT_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Seconds from arrival to the last token (vLLM's buckets).
const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishLabels {
    finished_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpertLabels {
    layer: usize,
    expert: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabels {
    rank: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoraLabels {
    lora_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    endpoint: String,
    status: u16,
}

/// How one engine request (one choice) went, for the histograms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FinishedRequest<'a> {
    /// `stop`, `length`, `error`, or `abort` when the client left first.
    pub finished_reason: &'static str,
    pub prompt_tokens: usize,
    pub generation_tokens: usize,
    /// From arrival to the first output; `None` when none came.
    pub time_to_first_token: Option<Duration>,
    /// From arrival to the end.
    pub e2e_latency: Duration,
    /// The LoRA adapter it ran with; `None` for the base model.
    pub lora_name: Option<&'a str>,
}

/// The server's metrics and the registry that renders them with the engine's.
pub(crate) struct ServerMetrics {
    registry: Registry,
    request_success: Family<FinishLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    e2e_request_latency: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    lora_requests: Family<LoraLabels, Counter>,
    lora_prompt_tokens: Family<LoraLabels, Counter>,
    lora_generation_tokens: Family<LoraLabels, Counter>,
}

impl ServerMetrics {
    /// Metrics over `engine`; token-count buckets go up to the context window.
    pub fn new(engine: Arc<dyn EngineClient>) -> Self {
        let max_model_len = engine.limits().max_model_len;
        let mut registry = Registry::default();
        registry.register_collector(Box::new(EngineCollector(engine)));
        let request_success = Family::<FinishLabels, Counter>::default();
        registry.register(
            "ember:request_success",
            "Finished requests (one per choice) by finish reason: stop, length, error, abort",
            request_success.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "ember:http_requests",
            "HTTP requests by route and status code",
            http_requests.clone(),
        );
        let mut per_adapter = |name: &str, help: &str| {
            let family = Family::<LoraLabels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let lora_requests = per_adapter(
            "ember:lora_requests",
            "Finished requests (one per choice, as ember:request_success) by LoRA adapter",
        );
        let lora_prompt_tokens = per_adapter(
            "ember:lora_prompt_tokens",
            "Prompt tokens of finished requests by LoRA adapter (prefix-cache hits included)",
        );
        let lora_generation_tokens = per_adapter(
            "ember:lora_generation_tokens",
            "Tokens generated by finished requests by LoRA adapter",
        );
        let mut histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::new(buckets.iter().copied());
            registry.register(name, help, h.clone());
            h
        };
        let token_buckets = one_two_five_buckets(max_model_len);
        Self {
            time_to_first_token: histogram(
                "ember:time_to_first_token_seconds",
                "Seconds from a request's arrival to its first generated token",
                &TTFT_BUCKETS,
            ),
            time_per_output_token: histogram(
                "ember:time_per_output_token_seconds",
                "Mean seconds per generated token after the first, per request",
                &TPOT_BUCKETS,
            ),
            e2e_request_latency: histogram(
                "ember:e2e_request_latency_seconds",
                "Seconds from a request's arrival to its last token",
                &E2E_BUCKETS,
            ),
            request_prompt_tokens: histogram(
                "ember:request_prompt_tokens",
                "Prompt tokens per request",
                &token_buckets,
            ),
            request_generation_tokens: histogram(
                "ember:request_generation_tokens",
                "Generated tokens per request",
                &token_buckets,
            ),
            registry,
            request_success,
            http_requests,
            lora_requests,
            lora_prompt_tokens,
            lora_generation_tokens,
        }
    }

    /// Records a finished (or abandoned) engine request.
    pub fn record(&self, request: &FinishedRequest<'_>) {
        self.request_success
            .get_or_create(&FinishLabels {
                finished_reason: request.finished_reason.to_string(),
            })
            .inc();
        self.request_prompt_tokens
            .observe(request.prompt_tokens as f64);
        self.request_generation_tokens
            .observe(request.generation_tokens as f64);
        self.e2e_request_latency
            .observe(request.e2e_latency.as_secs_f64());
        if let Some(ttft) = request.time_to_first_token {
            self.time_to_first_token.observe(ttft.as_secs_f64());
            if request.generation_tokens > 1 {
                let decode = request.e2e_latency.saturating_sub(ttft);
                self.time_per_output_token
                    .observe(decode.as_secs_f64() / (request.generation_tokens - 1) as f64);
            }
        }
        if let Some(name) = request.lora_name {
            let labels = LoraLabels {
                lora_name: name.to_string(),
            };
            self.lora_requests.get_or_create(&labels).inc();
            self.lora_prompt_tokens
                .get_or_create(&labels)
                .inc_by(request.prompt_tokens as u64);
            self.lora_generation_tokens
                .get_or_create(&labels)
                .inc_by(request.generation_tokens as u64);
        }
    }

    /// Counts an HTTP answer; `endpoint` is the route's pattern, not the raw path.
    pub fn count_http(&self, endpoint: &str, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                endpoint: endpoint.to_string(),
                status,
            })
            .inc();
    }

    /// The exposition text.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// 1, 2, 5, 10, 20, 50, ... up to `max` (vLLM's token-count buckets).
fn one_two_five_buckets(max: usize) -> Vec<f64> {
    let mut buckets = Vec::new();
    let mut scale = 1usize;
    'outer: loop {
        for step in [1, 2, 5] {
            let bound = step * scale;
            if bound > max {
                break 'outer;
            }
            buckets.push(bound as f64);
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => break,
        };
    }
    buckets
}

/// Load balance of a MoE model: tokens per expert of each layer, and under expert parallelism
/// tokens per rank (all layers), whose spread redundant experts even out, and each expert's copies.
fn encode_expert_load(e: &mut DescriptorEncoder, load: &ExpertLoadSnapshot) -> fmt::Result {
    let layers = &load.layers;
    if layers.is_empty() {
        return Ok(());
    }
    let mut family = e.encode_descriptor(
        "ember:moe_expert_tokens",
        "Tokens routed to each expert of each MoE layer (a token counts once per expert it picks).",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (layer, experts) in layers {
        for (expert, &tokens) in experts.iter().enumerate() {
            ConstCounter::new(tokens).encode(family.encode_family(&ExpertLabels {
                layer: *layer,
                expert,
            })?)?;
        }
    }
    if let Some(ranks) = &load.rank_tokens {
        let mut family = e.encode_descriptor(
            "ember:ep_rank_tokens",
            "Expert-parallel ranks: tokens their experts processed, all MoE layers together.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (rank, &tokens) in ranks.iter().enumerate() {
            ConstCounter::new(tokens).encode(family.encode_family(&RankLabels { rank })?)?;
        }
        let mut family = e.encode_descriptor(
            "ember:moe_expert_replicas",
            "Expert-parallel copies of each expert of each MoE layer (above 1 with --num-redundant-experts).",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (layer, experts) in &load.replicas {
            for (expert, &copies) in experts.iter().enumerate() {
                ConstGauge::new(copies as i64).encode(family.encode_family(&ExpertLabels {
                    layer: *layer,
                    expert,
                })?)?;
            }
        }
    }
    Ok(())
}

/// Reads the engine's counters on each scrape.
struct EngineCollector(Arc<dyn EngineClient>);

impl fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EngineCollector")
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = self.0.stats();
        let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let e = &mut encoder;
        gauge(
            e,
            "ember:num_requests_running",
            "Requests in the engine's running batch.",
            count(s.running),
        )?;
        gauge(
            e,
            "ember:num_requests_waiting",
            "Requests waiting for room (new or preempted).",
            count(s.waiting),
        )?;
        gauge(
            e,
            "ember:kv_cache_usage_perc",
            "Fraction of KV cache blocks held by requests, 0 to 1 (cached but free blocks count as free).",
            s.kv_usage(),
        )?;
        gauge(
            e,
            "ember:kv_cache_blocks_used",
            "KV cache blocks held by requests.",
            count(s.kv_blocks_used),
        )?;
        gauge(
            e,
            "ember:kv_cache_blocks_total",
            "KV cache blocks in the pool.",
            count(s.kv_blocks_total),
        )?;
        // Counter names get `_total` appended by the encoder.
        let counters = [
            (
                "ember:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
            ),
            (
                "ember:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_cache_hits,
            ),
            (
                "ember:num_preemptions",
                "Requests preempted to free KV cache blocks.",
                s.preemptions,
            ),
            (
                "ember:request_aborted",
                "Requests dropped by the engine because their client went away.",
                s.aborted_requests,
            ),
            (
                "ember:prompt_tokens",
                "Prompt tokens run through the model (prefix-cache hits excluded, recomputation included).",
                s.prompt_tokens_computed,
            ),
            ("ember:generation_tokens", "Tokens generated.", s.generation_tokens),
            (
                "ember:device_sampled_steps",
                "Engine steps whose tokens were all chosen greedily on the model's device.",
                s.device_sampled_steps,
            ),
            (
                "ember:cuda_graph_steps",
                "Engine steps whose forward replayed a CUDA graph (decode steps; --enforce-eager turns them off).",
                s.graph_steps,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(e.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let mut family = e.encode_descriptor(
            "ember:engine_step_seconds",
            "Engine loop wall time by phase: schedule (admission, blocks, tokens), prepare (batch tensors), forward (model), \
             sample (sampling, sending tokens, finishing), other (new requests, counters).",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (phase, seconds) in ember_engine::STEP_PHASES.iter().zip(s.step_time_seconds) {
            ConstCounter::new(seconds).encode(family.encode_family(&PhaseLabels { phase })?)?;
        }
        if let Some(load) = self.0.expert_load() {
            encode_expert_load(e, &load)?;
        }
        if let Some(lora) = self.0.lora() {
            gauge(
                e,
                "ember:lora_adapters_registered",
                "LoRA adapters registered (--lora-modules and load_lora_adapter, less unloaded ones).",
                count(lora.list().len() as u64),
            )?;
            gauge(
                e,
                "ember:lora_adapters_resident",
                "Registered LoRA adapters held in host memory (at most --max-cpu-loras unless requests hold more).",
                count(lora.num_resident() as u64),
            )?;
        }
        Ok(())
    }
}

/// Writes one gauge read at scrape time.
fn gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    match state.shared().metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => crate::error::ApiError::internal("cannot render the metrics").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_run_one_two_five_up_to_the_context() {
        assert_eq!(one_two_five_buckets(64), [1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        assert_eq!(one_two_five_buckets(100).last(), Some(&100.0));
    }
}
