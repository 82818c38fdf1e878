//! Shared test fixtures: a tiny byte-level BPE tokenizer, a scripted fake engine and the
//! server state over them.

use std::sync::{Arc, Mutex};

use ember_core::{EmberError, FinishReason, RequestOutput, SamplingParams, TokenLogprob};
use ember_engine::{LoraConfig, LoraManager, StatsSnapshot};
use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::chat_template::ChatTemplate;
use crate::choice::ChoiceJob;
use crate::engine::{EngineClient, ModelLimits};
use crate::reasoning_parser::ReasoningFormat;
use crate::state::{AppState, ParserChoice, ServerConfig};
use crate::tokenizer::{byte_level_alphabet, TextTokenizer};
use crate::tool_parser::ToolCallFormat;

/// A ChatML template like Qwen's, without the extras.
pub(crate) const CHATML: &str =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
     {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Server state serving `engine` as model `tiny`, with the fixture tokenizer and ChatML.
pub(crate) fn test_state(engine: &Arc<FakeEngine>) -> AppState {
    test_state_with_key(engine, None)
}

/// [`test_state`] reading tool calls in Qwen3's format and `<think>` reasoning.
pub(crate) fn test_state_with_parsers(engine: &Arc<FakeEngine>) -> AppState {
    chatml_state(
        engine,
        ServerConfig {
            tool_call_parser: ParserChoice::Use(ToolCallFormat::Qwen3),
            reasoning_parser: ParserChoice::Use(ReasoningFormat::Think),
            ..tiny_config()
        },
    )
}

/// [`test_state`] guarded by an API key.
pub(crate) fn test_state_with_key(engine: &Arc<FakeEngine>, api_key: Option<&str>) -> AppState {
    chatml_state(
        engine,
        ServerConfig {
            api_key: api_key.map(str::to_string),
            ..tiny_config()
        },
    )
}

/// Serving model `tiny` from `/models/tiny`, the rest as by default.
fn tiny_config() -> ServerConfig {
    ServerConfig {
        served_model_names: vec!["tiny".into()],
        model_dir: "/models/tiny".into(),
        ..ServerConfig::default()
    }
}

/// Server state over `engine` with `config`, the fixture tokenizer and ChatML.
fn chatml_state(engine: &Arc<FakeEngine>, config: ServerConfig) -> AppState {
    let template = match ChatTemplate::new(vec![("default".into(), CHATML.into())], Vec::new()) {
        Ok(t) => t,
        Err(e) => panic!("fixture template: {e}"),
    };
    AppState::from_parts(
        config,
        engine.clone(),
        byte_level_tokenizer(),
        Some(template),
    )
}

/// Ids of the fixture tokenizer's merged and special tokens (0..=255 are the bytes).
pub(crate) const HELLO: u32 = 259;
/// First half of "😀" (bytes F0 9F): a token that is not a whole character.
pub(crate) const EMOJI_HEAD: u32 = 260;
/// Second half of "😀" (bytes 98 80).
pub(crate) const EMOJI_TAIL: u32 = 261;
pub(crate) const ENDOFTEXT: u32 = 262;
pub(crate) const IM_START: u32 = 263;
pub(crate) const IM_END: u32 = 264;

/// A GPT-2 style byte-level BPE tokenizer: one token per byte, plus merges for "hello" and for
/// each half of "😀", plus the Qwen chat specials.
pub(crate) fn byte_level_tokenizer() -> TextTokenizer {
    let alphabet = byte_level_alphabet();
    let piece = |bytes: &[u8]| -> String { bytes.iter().map(|&b| alphabet[b as usize]).collect() };
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(piece(&[b]), json!(b));
    }
    let merges = [
        (piece(b"h"), piece(b"e")),
        (piece(b"l"), piece(b"l")),
        (piece(b"he"), piece(b"ll")),
        (piece(b"hell"), piece(b"o")),
        (piece(&[0xF0]), piece(&[0x9F])),
        (piece(&[0x98]), piece(&[0x80])),
    ];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(256 + i));
    }
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(ENDOFTEXT, "<|endoftext|>"), added(IM_START, "<|im_start|>"), added(IM_END, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    });
    match TextTokenizer::from_json(&tokenizer.to_string()) {
        Ok(t) => t,
        Err(e) => panic!("fixture tokenizer: {e}"),
    }
}

/// Walks `text`'s tokens through a fresh copy of `constraint`: whether every token was allowed
/// and the grammar may end (`eos` allowed, or finished) after them.
pub(crate) fn constraint_accepts(
    constraint: &ember_core::Constraint,
    tokenizer: &TextTokenizer,
    text: &str,
    eos: u32,
) -> bool {
    let mut live = constraint.0.start();
    for id in tokenizer.encode(text).unwrap_or_default() {
        let Ok(mask) = live.allowed_tokens() else {
            return false;
        };
        if !mask.allows(id) || live.accept_token(id).is_err() {
            return false;
        }
    }
    live.is_finished() || live.allowed_tokens().is_ok_and(|m| m.allows(eos))
}

/// A greedy job of `max_tokens` after the prompt "ab", with logprobs, cut at `stop`.
pub(crate) fn test_job(max_tokens: usize, stop: &[&str]) -> ChoiceJob {
    ChoiceJob {
        prompt_ids: vec![b'a' as u32, b'b' as u32],
        params: SamplingParams {
            max_tokens,
            logprobs: Some(1),
            ..SamplingParams::greedy(max_tokens)
        },
        stop: stop.iter().map(|s| s.to_string()).collect(),
        skip_special_tokens: true,
        prompt_only: false,
    }
}

/// Token ids of `text` in the fixture tokenizer when no merge applies: one per byte.
pub(crate) fn script(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// How the fake engine answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The whole script at once, then the finish.
    Finish,
    /// The script without a finish, the channel kept open (a request still running).
    HoldOpen,
    /// Refuse every request: the waiting queue is full.
    Overloaded,
}

/// A fake engine that "generates" a fixed script of tokens, recording what it was asked.
pub(crate) struct FakeEngine {
    pub limits: ModelLimits,
    /// Tokens every request generates, in order, until `max_tokens` or an eos/stop id.
    pub script: Vec<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Every (prompt, params) submitted.
    pub submitted: Mutex<Vec<(Vec<u32>, SamplingParams)>>,
    /// What `stats()` reports.
    pub stats: Mutex<StatsSnapshot>,
    mode: Mode,
    /// Output channels of requests held open.
    senders: Mutex<Vec<UnboundedSender<RequestOutput>>>,
    /// The LoRA manager, over qwen3-tiny's projections; `None` as without `--enable-lora`.
    lora: Option<Arc<LoraManager>>,
    /// The adapter of every request submitted (by name), in order.
    adapters: Mutex<Vec<Option<String>>>,
}

impl FakeEngine {
    /// An engine with a 64-token context that answers every request with `script`.
    pub(crate) fn new(script: Vec<u32>) -> Arc<Self> {
        Self::with_mode(script, Mode::Finish)
    }

    /// An engine that sends `script` but never finishes, keeping each request's channel.
    pub(crate) fn holding_open(script: Vec<u32>) -> Arc<Self> {
        Self::with_mode(script, Mode::HoldOpen)
    }

    /// [`Self::new`] with a context of `max_model_len` tokens.
    pub(crate) fn with_context(script: Vec<u32>, max_model_len: usize) -> Arc<Self> {
        let mut engine = Self::build(script, Mode::Finish);
        engine.limits.max_model_len = max_model_len;
        Arc::new(engine)
    }

    /// An engine whose waiting queue is always full.
    pub(crate) fn overloaded() -> Arc<Self> {
        Self::with_mode(Vec::new(), Mode::Overloaded)
    }

    /// An engine like [`Self::new`] that serves LoRA adapters of `models/qwen3-tiny` within
    /// `config` (adapters are read and checked for real; generation stays scripted).
    pub(crate) fn serving_adapters(script: Vec<u32>, config: LoraConfig) -> Arc<Self> {
        let model_dir = fixture_dir("qwen3-tiny");
        let manager = LoraManager::for_checkpoint(config, &model_dir)
            .unwrap_or_else(|e| panic!("LoRA manager over {}: {e}", model_dir.display()));
        let mut engine = Self::build(script, Mode::Finish);
        engine.lora = Some(Arc::new(manager));
        Arc::new(engine)
    }

    fn with_mode(script: Vec<u32>, mode: Mode) -> Arc<Self> {
        Arc::new(Self::build(script, mode))
    }

    fn build(script: Vec<u32>, mode: Mode) -> Self {
        Self {
            limits: ModelLimits {
                max_model_len: 64,
                vocab_size: 300,
            },
            script,
            eos_token_ids: vec![IM_END],
            submitted: Mutex::new(Vec::new()),
            stats: Mutex::new(StatsSnapshot::default()),
            mode,
            senders: Mutex::new(Vec::new()),
            lora: None,
            adapters: Mutex::new(Vec::new()),
        }
    }

    /// The adapter each submitted request ran with, by name.
    pub(crate) fn adapters(&self) -> Vec<Option<String>> {
        self.adapters.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// What was submitted so far.
    pub(crate) fn requests(&self) -> Vec<(Vec<u32>, SamplingParams)> {
        self.submitted.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The channels of requests held open; `is_closed()` tells whether the server let go.
    pub(crate) fn open_senders(&self) -> Vec<UnboundedSender<RequestOutput>> {
        self.senders.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The fake logprob of the i-th generated token, and the alternatives it reports.
pub(crate) fn fake_logprob(token_id: u32, top: usize) -> TokenLogprob {
    let mut alternatives = vec![(token_id, -0.25), (b'x' as u32, -2.0), (b'y' as u32, -3.0)];
    alternatives.truncate(top);
    TokenLogprob {
        token_id,
        logprob: -0.25,
        top: alternatives,
    }
}

impl EngineClient for FakeEngine {
    fn limits(&self) -> ModelLimits {
        self.limits
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn lora(&self) -> Option<&Arc<LoraManager>> {
        self.lora.as_ref()
    }

    fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<&str>,
    ) -> ember_core::Result<UnboundedReceiver<RequestOutput>> {
        params.validate()?;
        if self.mode == Mode::Overloaded {
            return Err(EmberError::Overloaded(
                "4096 requests are already waiting (--max-waiting-requests 4096); retry later"
                    .into(),
            ));
        }
        if prompt.len() + params.max_tokens > self.limits.max_model_len {
            return Err(EmberError::InvalidRequest("too long".into()));
        }
        if let Ok(mut s) = self.submitted.lock() {
            s.push((prompt.clone(), params.clone()));
        }
        if let Ok(mut a) = self.adapters.lock() {
            a.push(adapter.map(str::to_string));
        }
        let (tx, rx) = unbounded_channel();
        let prompt_logprobs = params.prompt_logprobs.map(|k| {
            std::iter::once(None)
                .chain(prompt[1..].iter().map(|&t| Some(fake_logprob(t, k))))
                .collect()
        });
        let mut first = Some(prompt_logprobs);
        let mut generated = 0;
        // One output per token, then an empty one with the finish reason (the real engine sends
        // the finish with the last token; the server must handle both).
        for &token in self.script.iter().take(params.max_tokens) {
            generated += 1;
            let output = RequestOutput {
                new_token_ids: vec![token],
                new_logprobs: params
                    .logprobs
                    .map(|k| vec![fake_logprob(token, k)])
                    .unwrap_or_default(),
                prompt_logprobs: first.take().flatten(),
                prompt_tokens: prompt.len(),
                cached_prompt_tokens: 2.min(prompt.len()),
                completion_tokens: generated,
                ..Default::default()
            };
            let stops = (!params.ignore_eos && self.eos_token_ids.contains(&token))
                || params.stop_token_ids.contains(&token);
            let finish = if self.mode == Mode::HoldOpen {
                None
            } else if stops && generated >= params.min_tokens {
                Some(FinishReason::Stop)
            } else if generated == params.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            // The receiver may be gone already (a stop string cancelled the request).
            if tx.send(output).is_err() {
                break;
            }
            if let Some(reason) = finish {
                let _ = tx.send(RequestOutput {
                    finish_reason: Some(reason),
                    prompt_tokens: prompt.len(),
                    completion_tokens: generated,
                    ..Default::default()
                });
                break;
            }
        }
        if self.mode == Mode::HoldOpen {
            if let Ok(mut senders) = self.senders.lock() {
                senders.push(tx);
            }
        }
        Ok(rx)
    }
}

/// `models/<name>` of the repository (`lora/<adapter>` for the LoRA fixtures).
pub(crate) fn fixture_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

/// `(model directory, cases)` for every `models/*/reference.json` with a non-empty `key` list
/// (`chat`, `tokenization`), so a new fixture is checked without editing any test.
pub(crate) fn model_reference_cases(
    key: &str,
) -> Vec<(std::path::PathBuf, Vec<serde_json::Value>)> {
    let root = fixture_dir("");
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|dir| dir.join("reference.json").is_file())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .filter_map(|dir| {
            let path = dir.join("reference.json");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let reference: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let cases = reference.get(key)?.as_array()?.clone();
            (!cases.is_empty()).then_some((dir, cases))
        })
        .collect()
}
