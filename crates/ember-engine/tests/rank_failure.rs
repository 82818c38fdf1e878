//! A model whose parallel group has failed cannot run again: the engine ends every request it
//! holds with the reason, reports it through the handle (the server then shuts down), and stops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::Tensor;
use ember_core::{EmberError, FinishReason, ModelConfig, RequestOutput, Result, SamplingParams};
use ember_engine::{Engine, EngineConfig};
use ember_models::{load_model, CausalLm, ForwardBatch, KvCachePool, LoadOptions, LoraTargets};
use tokio::sync::mpsc::UnboundedReceiver;

/// A real two-rank model whose group "fails" at step `fail_at`, as a dead rank would leave it.
struct FailsAtStep {
    inner: Box<dyn CausalLm>,
    steps: AtomicUsize,
    fail_at: usize,
    failed: Mutex<Option<String>>,
}

impl CausalLm for FailsAtStep {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn lora_targets(&self) -> &LoraTargets {
        self.inner.lora_targets()
    }

    fn kv_cache_shards(&self) -> Vec<(usize, usize)> {
        self.inner.kv_cache_shards()
    }

    fn forward(&self, batch: &ForwardBatch, caches: &[KvCachePool]) -> Result<Tensor> {
        if self.steps.fetch_add(1, Ordering::SeqCst) + 1 >= self.fail_at {
            let reason = "rank 1 failed: device lost".to_string();
            *self.failed.lock().unwrap() = Some(reason.clone());
            return Err(EmberError::Tensor(reason));
        }
        self.inner.forward(batch, caches)
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }
}

fn last(mut rx: UnboundedReceiver<RequestOutput>) -> RequestOutput {
    let mut tokens = 0;
    loop {
        let out = rx.blocking_recv().expect("the engine ends every request");
        tokens += out.new_token_ids.len();
        if out.finish_reason.is_some() {
            assert!(tokens < 40, "the request ran to its end");
            return out;
        }
    }
}

#[test]
fn a_failed_group_ends_every_request_with_its_reason_and_stops_the_engine() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen3-tiny");
    let mut opts = LoadOptions::new(dir.to_string_lossy());
    opts.dtype = Some(candle_core::DType::F32);
    opts.tensor_parallel_size = 2;
    opts.max_model_len = Some(256);
    let mut loaded = load_model(&opts).unwrap();
    loaded.model = Box::new(FailsAtStep {
        inner: loaded.model,
        steps: AtomicUsize::new(0),
        fail_at: 4,
        failed: Mutex::new(None),
    });
    let engine = Engine::start(
        loaded,
        EngineConfig {
            num_blocks: Some(64),
            max_num_seqs: 1,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert_eq!(engine.failure(), None);
    // One runs (max_num_seqs 1) while the other waits: both must end with the reason.
    let mut params = SamplingParams::greedy(40);
    params.ignore_eos = true;
    let running = engine.submit(vec![3, 14, 15, 92], params.clone()).unwrap();
    let waiting = engine.submit(vec![65, 35, 89], params).unwrap();
    for out in [last(running), last(waiting)] {
        assert_eq!(out.finish_reason, Some(FinishReason::Error));
        let error = out.error.unwrap_or_default();
        assert!(error.contains("rank 1 failed: device lost"), "{error}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.failure().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        engine.failure().as_deref(),
        Some("rank 1 failed: device lost")
    );
    // The engine thread is gone: a new request is refused or ends in an error, never hangs.
    if let Ok(rx) = engine.submit(vec![1, 2], SamplingParams::greedy(2)) {
        let mut rx = rx;
        match rx.blocking_recv() {
            None => {}
            Some(out) => assert_eq!(out.finish_reason, Some(FinishReason::Error)),
        }
    }
}
