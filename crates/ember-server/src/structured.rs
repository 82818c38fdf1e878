//! Structured output: `response_format` (`json_object`, `json_schema`, Fireworks' GBNF
//! `grammar`) and forced tool calls compiled by llguidance into a [`Constraint`] that the engine
//! applies token by token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use ember_core::{Constraint, ConstraintSpec, TokenConstraint, TokenMask};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::gbnf::gbnf_to_lark;
use crate::tokenizer::TextTokenizer;

/// How many compiled grammars a server keeps for requests that send the same format again.
const COMPILED_CACHE_ENTRIES: usize = 128;

/// Compiles grammars for one tokenizer. Building its token trie takes a moment on a large
/// vocabulary, so it is built on first use and then shared.
///
/// Compiled grammars are kept, least recently used dropped first: clients typically send the
/// same schema or grammar with every request, and compiling one costs from about half a
/// millisecond (a small GBNF grammar) to far more for large schemas.
pub(crate) struct GrammarCompiler {
    factory: ParserFactory,
    compiled: Mutex<CompiledCache>,
}

/// Compiled grammars by their serialized form, each with when it was last used.
#[derive(Default)]
struct CompiledCache {
    entries: HashMap<String, (Constraint, u64)>,
    clock: u64,
}

impl CompiledCache {
    fn get(&mut self, key: &str) -> Option<Constraint> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(constraint, used)| {
            *used = clock;
            constraint.clone()
        })
    }

    fn insert(&mut self, key: String, constraint: Constraint) {
        if self.entries.len() >= COMPILED_CACHE_ENTRIES {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        self.entries.insert(key, (constraint, self.clock));
    }
}

impl GrammarCompiler {
    /// A compiler whose masks cover `vocab_size` ids (the model's logits, which may be wider
    /// than the tokenizer) and allow the model's `eos_token_ids` wherever the grammar may end.
    pub fn new(
        tokenizer: &TextTokenizer,
        eos_token_ids: &[u32],
        vocab_size: usize,
    ) -> Result<Self, String> {
        let json = tokenizer.to_json()?;
        let mut bytes = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())
            .map_err(|e| format!("the tokenizer cannot drive structured output: {e}"))?;
        if !eos_token_ids.is_empty() {
            bytes.set_eos_tokens(eos_token_ids);
        }
        let vocab = vocab_size.max(tokenizer.vocab_size());
        let env = bytes
            .into_tok_env(Some(vocab))
            .map_err(|e| format!("the tokenizer cannot drive structured output: {e}"))?;
        let env: TokEnv = Arc::new(TextOnlyTokenizing(env));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| format!("cannot start the grammar engine: {e}"))?;
        factory.quiet();
        Ok(Self {
            factory,
            compiled: Mutex::default(),
        })
    }

    /// Compiles `grammar`, or finds it compiled before; the error says what llguidance could
    /// not accept (refused grammars are not kept).
    pub fn compile(
        &self,
        grammar: TopLevelGrammar,
        describe: String,
    ) -> Result<Constraint, String> {
        // Serializing the grammar (a schema, Lark text and options) is a key that cannot
        // confuse two grammars; it is cheap next to compiling.
        let key = serde_json::to_string(&grammar)
            .ok()
            .map(|g| format!("{describe}\n{g}"));
        let cache = || self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = key.as_deref().and_then(|k| cache().get(k)) {
            return Ok(hit);
        }
        let matcher = Matcher::new(self.factory.create_parser(grammar));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        let constraint = Constraint(Arc::new(CompiledGrammar {
            prototype: Mutex::new(matcher),
            describe,
        }));
        if let Some(key) = key {
            cache().insert(key, constraint.clone());
        }
        Ok(constraint)
    }
}

/// The token environment with forced text tokenized as text only.
///
/// llguidance's trie treats every `<...>` added token (Qwen3's `<think>`, `<tool_call>`) as a
/// special token that grammar text cannot produce, while the Hugging Face tokenizer it asks to
/// tokenize forced text still turns "<think>" into that token: the mask would then allow a token
/// the grammar refuses to consume. Forced text that tokenizes into such a token is tokenized by
/// the trie instead (grammars name those tokens as `<[id]>`).
struct TextOnlyTokenizing(TokEnv);

impl TokenizerEnv for TextOnlyTokenizing {
    fn tok_trie(&self) -> &TokTrie {
        self.0.tok_trie()
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let tokens = self.0.tokenize_bytes(s);
        let trie = self.0.tok_trie();
        if tokens.iter().any(|&t| trie.is_special_token(t)) {
            trie.greedy_tokenize(s)
        } else {
            tokens
        }
    }
}

/// The compiler of a server, built once on first use (`None` until then).
#[derive(Default)]
pub(crate) struct LazyCompiler(OnceLock<Result<GrammarCompiler, String>>);

impl LazyCompiler {
    /// The compiler, building it now if this is the first structured request.
    pub fn get(
        &self,
        tokenizer: &TextTokenizer,
        eos_token_ids: &[u32],
        vocab_size: usize,
    ) -> Result<&GrammarCompiler, ApiError> {
        self.0
            .get_or_init(|| GrammarCompiler::new(tokenizer, eos_token_ids, vocab_size))
            .as_ref()
            .map_err(|e| {
                ApiError::invalid_request(format!("structured output is unavailable: {e}"))
            })
    }
}

/// A compiled grammar; each sequence starts from a copy of its initial matcher.
struct CompiledGrammar {
    prototype: Mutex<Matcher>,
    describe: String,
}

impl ConstraintSpec for CompiledGrammar {
    fn start(&self) -> Box<dyn TokenConstraint> {
        let matcher = match self.prototype.lock() {
            Ok(m) => m.deep_clone(),
            Err(poisoned) => poisoned.into_inner().deep_clone(),
        };
        Box::new(LiveGrammar { matcher })
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// One sequence's position in its grammar.
struct LiveGrammar {
    matcher: Matcher,
}

impl TokenConstraint for LiveGrammar {
    fn allowed_tokens(&mut self) -> Result<TokenMask, String> {
        // Once stopped the mask is the eos set, so the request ends on the model's eos.
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        Ok(TokenMask::from_words(mask.as_slice().to_vec()))
    }

    fn accept_token(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn try_accept_token(&mut self, token: u32) -> Result<bool, String> {
        // Where the grammar forces bytes, the mask holds only their canonical tokenization
        // (and heals the previous token), which checking one token does not see; elsewhere the
        // mask is exactly the tokens the parser accepts next (`compute_bias` of no prefix).
        if !self.matcher.compute_ff_bytes().is_empty() {
            return Ok(false);
        }
        let consumed = self
            .matcher
            .try_consume_tokens(&[token])
            .map_err(|e| e.to_string())?;
        Ok(consumed == 1)
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// What a request's output must follow.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OutputFormat {
    /// Any JSON object (`json_object`).
    JsonObject,
    /// JSON valid under a schema (`json_schema`).
    JsonSchema(Value),
    /// A llguidance Lark grammar (from GBNF or built for tool calls).
    Lark(String),
}

impl OutputFormat {
    /// Reads `response_format`; `None` for plain text. Malformed values are a 400 naming the
    /// problem (a schema or grammar that does not compile is caught by [`Self::grammar`]).
    pub fn from_response_format(value: Option<&Value>) -> Result<Option<Self>, ApiError> {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let invalid = |message: String| ApiError::invalid_param("response_format", message);
        match value.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Self::JsonObject)),
            Some("json_schema") => {
                // OpenAI: {"json_schema": {"name", "schema", "strict"}}; Fireworks also takes
                // the schema at the top level and as a JSON string.
                let schema = value
                    .pointer("/json_schema/schema")
                    .or_else(|| value.get("schema"))
                    .or_else(|| value.get("json_schema").filter(|s| s.get("type").is_some()));
                let schema = match schema {
                    Some(Value::String(text)) => serde_json::from_str(text).map_err(|e| {
                        invalid(format!("Invalid 'response_format': the schema is not JSON: {e}"))
                    })?,
                    Some(schema @ Value::Object(_)) => schema.clone(),
                    Some(Value::Bool(true)) | None => {
                        return Err(invalid(
                            "Invalid 'response_format': type \"json_schema\" needs 'json_schema.schema', a JSON Schema object".into(),
                        ))
                    }
                    Some(other) => {
                        return Err(invalid(format!(
                            "Invalid 'response_format': 'json_schema.schema' must be an object, got {other}"
                        )))
                    }
                };
                Ok(Some(Self::JsonSchema(schema)))
            }
            Some("grammar") => {
                let Some(text) = value.get("grammar").and_then(Value::as_str) else {
                    return Err(invalid(
                        "Invalid 'response_format': type \"grammar\" needs 'grammar', a GBNF grammar string".into(),
                    ));
                };
                let lark = gbnf_to_lark(text)
                    .map_err(|e| invalid(format!("Invalid 'response_format.grammar': {e}")))?;
                Ok(Some(Self::Lark(lark)))
            }
            _ => Err(invalid(
                "Invalid 'response_format': expected an object whose 'type' is \"text\", \"json_object\", \"json_schema\" or \"grammar\"".into(),
            )),
        }
    }

    /// The llguidance grammar and a short description of it.
    fn grammar(&self) -> (TopLevelGrammar, String) {
        match self {
            Self::JsonObject => (
                TopLevelGrammar::from_json_schema(with_json_layout(json!({"type": "object"}))),
                "json_object".into(),
            ),
            Self::JsonSchema(schema) => (
                TopLevelGrammar::from_json_schema(with_json_layout(schema.clone())),
                "json_schema".into(),
            ),
            Self::Lark(lark) => (TopLevelGrammar::from_lark(lark.clone()), "grammar".into()),
        }
    }

    /// Compiles the format; a schema or grammar llguidance rejects is a 400 on `param`.
    pub fn compile(&self, compiler: &GrammarCompiler, param: &str) -> Result<Constraint, ApiError> {
        let (grammar, describe) = self.grammar();
        compiler
            .compile(grammar, describe)
            .map_err(|e| ApiError::invalid_param(param, format!("Invalid '{param}': {e}")))
    }
}

/// Compiles a `response_format` value exactly as the server compiles a request's, for callers
/// outside a server (`ember bench throughput --response-format`): `None` for plain text; the
/// error is the message a request would get in its 400.
pub fn compile_response_format(
    tokenizer: &TextTokenizer,
    eos_token_ids: &[u32],
    vocab_size: usize,
    response_format: &Value,
) -> Result<Option<Constraint>, String> {
    let message = |e: ApiError| e.body.error.message;
    let Some(format) =
        OutputFormat::from_response_format(Some(response_format)).map_err(message)?
    else {
        return Ok(None);
    };
    let compiler = GrammarCompiler::new(tokenizer, eos_token_ids, vocab_size)?;
    format
        .compile(&compiler, "response_format")
        .map(Some)
        .map_err(message)
}

/// JSON is written as `json.dumps` writes it (`", "` and `": "`, no other whitespace) unless
/// the schema sets llguidance's own `x-guidance` options: with free whitespace a model can pad
/// with newlines until `max_tokens`, the failure Fireworks warns JSON-mode users about.
pub(crate) fn with_json_layout(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{constraint_accepts, fixture_dir};

    fn compiler() -> GrammarCompiler {
        let tok = TextTokenizer::from_dir(&fixture_dir("qwen3-moe-tiny")).unwrap();
        GrammarCompiler::new(&tok, &[2], 2048).unwrap()
    }

    fn format(value: Value) -> Result<Option<OutputFormat>, ApiError> {
        OutputFormat::from_response_format(Some(&value))
    }

    fn accepts(constraint: &Constraint, text: &str) -> bool {
        let tok = TextTokenizer::from_dir(&fixture_dir("qwen3-moe-tiny")).unwrap();
        constraint_accepts(constraint, &tok, text, 2)
    }

    #[test]
    fn response_formats_are_read_in_openai_and_fireworks_shapes() {
        assert_eq!(format(json!({"type": "text"})).unwrap(), None);
        assert_eq!(OutputFormat::from_response_format(None).unwrap(), None);
        assert_eq!(
            format(json!({"type": "json_object"})).unwrap(),
            Some(OutputFormat::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        for shape in [
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}),
            json!({"type": "json_schema", "schema": schema}),
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema.to_string()}}),
        ] {
            assert_eq!(
                format(shape).unwrap(),
                Some(OutputFormat::JsonSchema(schema.clone()))
            );
        }
        let message = |v| format(v).unwrap_err().body.error.message;
        assert!(message(json!({"type": "json_schema"})).contains("needs 'json_schema.schema'"));
        assert!(
            message(json!({"type": "json_schema", "json_schema": {"schema": "{"}}))
                .contains("not JSON")
        );
        assert!(message(json!({"type": "grammar"})).contains("needs 'grammar'"));
        assert!(
            message(json!({"type": "grammar", "grammar": "root ::= missing"})).contains("missing")
        );
        assert!(message(json!({"type": "xml"})).contains("expected an object whose 'type'"));
    }

    #[test]
    fn a_gbnf_grammar_admits_exactly_its_language() {
        let c = format(json!({"type": "grammar", "grammar": "root ::= \"yes\" | \"no\""}))
            .unwrap()
            .unwrap()
            .compile(&compiler(), "response_format")
            .unwrap();
        assert!(accepts(&c, "yes") && accepts(&c, "no"));
        assert!(!accepts(&c, "maybe") && !accepts(&c, "yes no"));
    }

    #[test]
    fn a_schema_admits_valid_json_only() {
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
                            "required": ["n", "tag"], "additionalProperties": false});
        let c = OutputFormat::JsonSchema(schema)
            .compile(&compiler(), "response_format")
            .unwrap();
        assert!(accepts(&c, r#"{"n": 3, "tag": "a"}"#));
        assert!(!accepts(&c, r#"{"n": "3", "tag": "a"}"#));
        assert!(!accepts(&c, r#"{"n": 3, "tag": "c"}"#));
        assert!(!accepts(&c, r#"{"n": 3}"#));
        let any = OutputFormat::JsonObject
            .compile(&compiler(), "response_format")
            .unwrap();
        assert!(accepts(&any, r#"{"x": [1, {"y": null}]}"#));
        assert!(!accepts(&any, "[1]") && !accepts(&any, "hello"));
    }

    #[test]
    fn a_response_format_compiles_outside_a_server_as_inside() {
        let tok = TextTokenizer::from_dir(&fixture_dir("qwen3-moe-tiny")).unwrap();
        let compile = |v: Value| compile_response_format(&tok, &[2], 2048, &v);
        assert!(compile(json!({"type": "text"})).unwrap().is_none());
        let words = compile(json!({"type": "grammar", "grammar": "root ::= [a-z ]*"}))
            .unwrap()
            .unwrap();
        assert!(accepts(&words, "hello world") && !accepts(&words, "Hello"));
        let err = compile(json!({"type": "grammar", "grammar": "root ::= missing"})).unwrap_err();
        assert!(
            err.starts_with("Invalid 'response_format.grammar': "),
            "{err}"
        );
    }

    #[test]
    fn every_token_a_mask_allows_is_consumed_even_over_added_tokens() {
        // "<think>" is an added token that llguidance's trie holds as special: grammar text
        // spelling it must be offered as text, never as that token.
        let c = format(
            json!({"type": "grammar", "grammar": "root ::= \"<think>\\n\" [a-z]+ \"</think>\""}),
        )
        .unwrap()
        .unwrap()
        .compile(&compiler(), "response_format")
        .unwrap();
        let mut prefix: Vec<u32> = Vec::new();
        let mut live = c.0.start();
        for _ in 0..10 {
            let mask = live.allowed_tokens().unwrap();
            let allowed: Vec<u32> = (0..2048).filter(|&t| mask.allows(t)).collect();
            assert!(!allowed.is_empty());
            for &t in &allowed {
                let mut probe = c.0.start();
                for &p in &prefix {
                    probe.accept_token(p).unwrap();
                }
                assert!(
                    probe.accept_token(t).is_ok(),
                    "token {t} allowed after {prefix:?} but refused"
                );
            }
            live.accept_token(allowed[0]).unwrap();
            prefix.push(allowed[0]);
        }
    }

    #[test]
    fn a_token_taken_without_the_mask_is_one_the_mask_allows() {
        // The engine keeps a first draw that `try_accept_token` takes, without the mask: it must
        // never take a token the mask refuses, and where it answers at all (no forced bytes) it
        // takes every token the mask allows, or sampling first would never save the mask.
        let compiler = compiler();
        let grammars = [
            json!({"type": "grammar", "grammar": "root ::= [a-z ]*"}),
            json!({"type": "grammar", "grammar":
                "root ::= \"{\\\"items\\\": [\" item (\", \" item)*\nitem ::= \"\\\"\" [a-z ]* \"\\\"\""}),
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "object",
                "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
                "required": ["n", "s"]}}}),
        ];
        for grammar in grammars {
            let (top, _) = format(grammar.clone()).unwrap().unwrap().grammar();
            let mut live = LiveGrammar {
                matcher: Matcher::new(compiler.factory.create_parser(top)),
            };
            let (mut answered, mut forced) = (0, 0);
            for step in 0..16 {
                let mask = live.allowed_tokens().unwrap();
                let allowed: Vec<u32> = (0..2048).filter(|&t| t != 2 && mask.allows(t)).collect();
                let taken: Vec<u32> = (0..2048)
                    .filter(|&t| t != 2)
                    .filter(|&t| {
                        let mut probe = LiveGrammar {
                            matcher: live.matcher.deep_clone(),
                        };
                        probe.try_accept_token(t).unwrap()
                    })
                    .collect();
                if taken.is_empty() {
                    forced += 1;
                } else {
                    assert_eq!(taken, allowed, "{grammar} at step {step}");
                    answered += 1;
                }
                live.accept_token(allowed[step * 7919 % allowed.len()])
                    .unwrap();
            }
            assert!(
                answered > 0,
                "{grammar}: {answered} answered, {forced} forced"
            );
        }
    }

    #[test]
    fn a_format_sent_again_reuses_its_compiled_grammar() {
        let compiler = compiler();
        let lark = |text: &str| TopLevelGrammar::from_lark(text.to_string());
        let a = compiler
            .compile(lark("start: \"yes\" | \"no\""), "grammar".into())
            .unwrap();
        let again = compiler
            .compile(lark("start: \"yes\" | \"no\""), "grammar".into())
            .unwrap();
        let other = compiler
            .compile(lark("start: \"yes\""), "grammar".into())
            .unwrap();
        assert!(a == again && a != other);
        // Each sequence still starts from the grammar's beginning.
        assert!(accepts(&again, "no") && !accepts(&again, "yes no"));
        // A refused grammar is refused again, not remembered as compiled.
        for _ in 0..2 {
            assert!(compiler
                .compile(lark("start: nope"), "grammar".into())
                .is_err());
        }
    }

    #[test]
    fn the_compiled_cache_drops_the_least_recently_used() {
        let compiler = compiler();
        let constraint = compiler
            .compile(
                TopLevelGrammar::from_lark("start: \"a\"".into()),
                "grammar".into(),
            )
            .unwrap();
        let mut cache = CompiledCache::default();
        for i in 0..COMPILED_CACHE_ENTRIES {
            cache.insert(i.to_string(), constraint.clone());
        }
        // "0" was used last, so "1" goes when a new one comes.
        assert!(cache.get("0").is_some());
        cache.insert("new".into(), constraint);
        assert_eq!(cache.entries.len(), COMPILED_CACHE_ENTRIES);
        assert!(cache.get("0").is_some() && cache.get("new").is_some());
        assert!(cache.get("1").is_none() && cache.get("2").is_some());
    }

    #[test]
    fn a_schema_llguidance_rejects_is_a_400_naming_it() {
        let err = OutputFormat::JsonSchema(
            json!({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
        )
        .compile(&compiler(), "response_format")
        .unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert_eq!(err.body.error.param.as_deref(), Some("response_format"));
        assert!(
            err.body
                .error
                .message
                .starts_with("Invalid 'response_format': "),
            "{}",
            err.body.error.message
        );
    }
}
