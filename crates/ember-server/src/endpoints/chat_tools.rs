//! The tool and thinking parts of a chat request: which tools the template sees, whether a call
//! is forced (and the grammar that forces one in the family's own syntax), and how
//! `reasoning_effort` / `thinking` switch a thinking model's template.

use serde_json::{json, Map, Value};

use crate::api::chat::ChatFields;
use crate::error::ApiError;
use crate::structured::with_json_layout;
use crate::tokenizer::TextTokenizer;
use crate::tool_parser::ToolCallFormat;

/// Longest tool name (OpenAI's and Fireworks' limit).
const MAX_NAME_LEN: usize = 64;
/// Most calls a forced Kimi K2 reply may make (its grammar unrolls each call with its index).
const KIMI_MAX_CALLS: usize = 8;

/// What the request's tools ask of the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    /// No tool may be called (and the template is not shown the tools).
    None,
    /// The model decides.
    Auto,
    /// At least one call, to any of the tools.
    Required,
    /// A call to this tool.
    Function(String),
}

/// One function tool, as the grammar needs it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FunctionTool {
    pub name: String,
    /// The arguments' JSON schema (an empty object schema when the tool gives none).
    pub parameters: Value,
}

/// The tools of a request, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolRequest {
    /// The `tools` list in OpenAI form (converted from `functions`), for the template.
    pub listed: Vec<Value>,
    pub tools: Vec<FunctionTool>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true).
    pub parallel: bool,
    /// Tool calls earlier in the conversation (Kimi K2 numbers calls across it).
    pub first_call_index: usize,
}

impl ToolRequest {
    /// Reads `tools` / `functions`, `tool_choice` / `function_call` and `parallel_tool_calls`;
    /// `None` when the request has no tools (or an empty list) and forces nothing.
    pub fn from_fields(fields: &ChatFields) -> Result<Option<Self>, ApiError> {
        let (listed, param) = match (&fields.tools, &fields.functions) {
            (Some(tools), Some(functions)) if !tools.is_empty() && !functions.is_empty() => {
                return Err(ApiError::invalid_param(
                    "functions",
                    "Invalid 'functions': send either 'tools' or the deprecated 'functions', not both",
                ))
            }
            (Some(tools), _) if !tools.is_empty() => (tools.clone(), "tools"),
            (_, Some(functions)) if !functions.is_empty() => (
                functions
                    .iter()
                    .map(|f| json!({"type": "function", "function": f}))
                    .collect(),
                "functions",
            ),
            _ => (Vec::new(), "tools"),
        };
        let tools = listed
            .iter()
            .enumerate()
            .map(|(i, tool)| function_tool(tool, param, i))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, tool) in tools.iter().enumerate() {
            if tools[..i].iter().any(|t| t.name == tool.name) {
                return Err(ApiError::invalid_param(
                    param,
                    format!(
                        "Invalid '{param}': the tool name {:?} is given twice",
                        tool.name
                    ),
                ));
            }
        }
        let choice = tool_choice(fields)?;
        if let ToolChoice::Function(name) = &choice {
            if !tools.iter().any(|t| &t.name == name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("Invalid 'tool_choice': no tool is named {name:?}"),
                ));
            }
        }
        if tools.is_empty() {
            return match choice {
                ToolChoice::Required | ToolChoice::Function(_) => Err(ApiError::invalid_param(
                    "tool_choice",
                    "Invalid 'tool_choice': a call can only be required when 'tools' are given",
                )),
                ToolChoice::None | ToolChoice::Auto => Ok(None),
            };
        }
        Ok(Some(Self {
            listed,
            tools,
            choice,
            parallel: fields.parallel_tool_calls.unwrap_or(true),
            first_call_index: fields
                .messages
                .iter()
                .flatten()
                .filter_map(|m| m.get("tool_calls")?.as_array().map(Vec::len))
                .sum(),
        }))
    }

    /// The tools the template renders: none when no call may be made.
    pub fn template_tools(&self) -> Option<Value> {
        (self.choice != ToolChoice::None).then(|| Value::Array(self.listed.clone()))
    }

    /// Whether the reply must be a call.
    pub fn forced(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Function(_))
    }

    /// The tools a forced reply may call.
    fn callable(&self) -> Vec<&FunctionTool> {
        match &self.choice {
            ToolChoice::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            _ => self.tools.iter().collect(),
        }
    }
}

/// `tools[i]` checked: `{type: "function", function: {name, parameters?}}`.
fn function_tool(tool: &Value, param: &str, i: usize) -> Result<FunctionTool, ApiError> {
    let invalid =
        |what: String| ApiError::invalid_param(param, format!("Invalid '{param}[{i}]{what}"));
    let kind = tool
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    if kind != "function" {
        return Err(invalid(format!(
            "': only tools of type \"function\" are supported, got {kind:?}"
        )));
    }
    let Some(function) = tool.get("function").filter(|f| f.is_object()) else {
        return Err(invalid(
            "': expected {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
        ));
    };
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    let valid_name = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid_name {
        return Err(invalid(format!(
            ".function.name': {name:?} must be 1 to {MAX_NAME_LEN} letters, digits, '_' or '-'"
        )));
    }
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(schema @ Value::Object(_)) => schema.clone(),
        Some(other) => {
            return Err(invalid(format!(
                ".function.parameters': expected a JSON Schema object, got {other}"
            )))
        }
    };
    Ok(FunctionTool {
        name: name.to_string(),
        parameters,
    })
}

/// `tool_choice`, or the deprecated `function_call` when it is absent.
fn tool_choice(fields: &ChatFields) -> Result<ToolChoice, ApiError> {
    let (value, param) = match (&fields.tool_choice, &fields.function_call) {
        (Some(v), _) if !v.is_null() => (v, "tool_choice"),
        (_, Some(v)) if !v.is_null() => (v, "function_call"),
        _ => return Ok(ToolChoice::Auto),
    };
    let name = value
        .pointer("/function/name")
        .or_else(|| value.get("name"))
        .and_then(Value::as_str);
    match (value.as_str(), name) {
        (Some("none"), _) => Ok(ToolChoice::None),
        (Some("auto"), _) => Ok(ToolChoice::Auto),
        (Some("required" | "any"), _) if param == "tool_choice" => Ok(ToolChoice::Required),
        (None, Some(name)) if value.get("type").is_none_or(|t| t == "function") => {
            Ok(ToolChoice::Function(name.to_string()))
        }
        _ => Err(ApiError::invalid_param(
            param,
            format!(
                "Invalid '{param}': expected \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {value}"
            ),
        )),
    }
}

/// Where a forced reply starts relative to the model's thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThinkingPrefix {
    /// No thinking before the call.
    None,
    /// The reply may think first (`<think> ... </think>`).
    Optional,
    /// The prompt opened `<think>`: the reply thinks, closes it, then calls.
    Open,
}

/// The llguidance Lark grammar of a reply that is only tool calls in `format`'s syntax, the
/// arguments held to each tool's schema. Markers that are one token in the vocabulary are
/// matched as that token (DeepSeek's and Kimi's are special tokens).
pub(crate) fn forced_call_grammar(
    request: &ToolRequest,
    format: ToolCallFormat,
    tokenizer: &TextTokenizer,
    thinking: ThinkingPrefix,
    eos_token_ids: &[u32],
) -> String {
    let marker = |text: &str| match tokenizer.token_id(text) {
        Some(id) => format!("<[{id}]>"),
        None => lark_string(text),
    };
    let mut rules = Vec::new();
    let mut alternatives = Vec::new();
    for (i, tool) in request.callable().into_iter().enumerate() {
        let arguments = with_json_layout(tool.parameters.clone());
        let body = match format {
            ToolCallFormat::Qwen3 => {
                let call = with_json_layout(json!({
                    "type": "object",
                    "properties": {"name": {"const": tool.name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                }));
                format!("%json {call}")
            }
            ToolCallFormat::DeepSeekV3 => format!(
                "{} {} {} %json {arguments} {}",
                lark_string("function"),
                marker("<｜tool▁sep｜>"),
                lark_string(&format!("{}\n```json\n", tool.name)),
                lark_string("\n```")
            ),
            ToolCallFormat::DeepSeekV31 => format!(
                "{} {} %json {arguments}",
                lark_string(&tool.name),
                marker("<｜tool▁sep｜>")
            ),
            // Kimi's call ids carry the call's index in the conversation: the calls are
            // unrolled below, each with its own index.
            ToolCallFormat::KimiK2 => format!("%json {arguments}"),
        };
        rules.push(format!("fn_{i}: {body}"));
        alternatives.push(format!("fn_{i}"));
    }
    let function = alternatives.join(" | ");
    let repeat = |call: &str, gap: &str| {
        if request.parallel {
            format!("{call} ({gap}{call})*")
        } else {
            call.to_string()
        }
    };
    let (calls, call) = match format {
        ToolCallFormat::Qwen3 => (
            repeat("call", "\"\\n\" "),
            format!(
                "call: {} \"\\n\" ({function}) \"\\n\" {}",
                marker("<tool_call>"),
                marker("</tool_call>")
            ),
        ),
        ToolCallFormat::DeepSeekV3 | ToolCallFormat::DeepSeekV31 => (
            format!(
                "{} {} {}",
                marker("<｜tool▁calls▁begin｜>"),
                repeat("call", "\"\\n\"? "),
                marker("<｜tool▁calls▁end｜>")
            ),
            format!(
                "call: {} ({function}) {}",
                marker("<｜tool▁call▁begin｜>"),
                marker("<｜tool▁call▁end｜>")
            ),
        ),
        ToolCallFormat::KimiK2 => {
            let count = if request.parallel { KIMI_MAX_CALLS } else { 1 };
            let mut calls = String::new();
            for k in (0..count).rev() {
                let index = request.first_call_index + k;
                let alternatives: Vec<String> = request
                    .callable()
                    .iter()
                    .enumerate()
                    .map(|(i, tool)| {
                        format!(
                            "{} {} fn_{i}",
                            lark_string(&format!("functions.{}:{index}", tool.name)),
                            marker("<|tool_call_argument_begin|>")
                        )
                    })
                    .collect();
                let call = format!(
                    "{} ({}) {}",
                    marker("<|tool_call_begin|>"),
                    alternatives.join(" | "),
                    marker("<|tool_call_end|>")
                );
                calls = if calls.is_empty() {
                    format!("({call})")
                } else {
                    format!("({call} {calls}?)")
                };
            }
            (
                format!(
                    "{} {calls} {}",
                    marker("<|tool_calls_section_begin|>"),
                    marker("<|tool_calls_section_end|>")
                ),
                String::new(),
            )
        }
    };
    let think = thinking_rule(tokenizer, thinking, eos_token_ids);
    let mut grammar = match &think {
        Some(_) => format!("start: think {calls}\n"),
        None => format!("start: {calls}\n"),
    };
    if let Some(think) = think {
        grammar.push_str(&think);
        grammar.push('\n');
    }
    grammar.push_str(&call);
    grammar.push('\n');
    for rule in rules {
        grammar.push_str(&rule);
        grammar.push('\n');
    }
    grammar.push_str("GAP: /[ \\t\\r\\n]+/\n");
    grammar
}

/// The `think` rule for a forced reply, when thinking may come first and its tags are tokens:
/// any tokens but the closing tag and the eos, then the closing tag.
fn thinking_rule(
    tokenizer: &TextTokenizer,
    thinking: ThinkingPrefix,
    eos_token_ids: &[u32],
) -> Option<String> {
    let close = tokenizer.token_id("</think>")?;
    let excluded: Vec<String> = std::iter::once(close)
        .chain(eos_token_ids.iter().copied())
        .map(|id| id.to_string())
        .collect();
    let body = format!("<[^{}]>* <[{close}]> GAP?", excluded.join(","));
    match thinking {
        ThinkingPrefix::None => None,
        ThinkingPrefix::Open => Some(format!("think: {body}")),
        ThinkingPrefix::Optional => {
            let open = tokenizer.token_id("<think>")?;
            Some(format!("think: (<[{open}]> {body})?"))
        }
    }
}

/// A Lark string literal of `text`.
fn lark_string(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

/// Whether thinking is on, from `reasoning_effort` (`none` / `false` / `0` turn it off) or
/// Fireworks' `thinking`; `None` when the request leaves it to the model.
pub(crate) fn thinking_requested(fields: &ChatFields) -> Result<Option<bool>, ApiError> {
    let effort = fields.reasoning_effort.as_ref().filter(|v| !v.is_null());
    let thinking = fields.thinking.as_ref().filter(|v| !v.is_null());
    if effort.is_some() && thinking.is_some() {
        return Err(ApiError::invalid_param(
            "thinking",
            "Invalid 'thinking': it cannot be combined with 'reasoning_effort'",
        ));
    }
    if let Some(effort) = effort {
        let on = match effort {
            Value::Bool(on) => *on,
            Value::String(level) => match level.as_str() {
                "none" => false,
                "minimal" | "low" | "medium" | "high" | "xhigh" | "max" => true,
                _ => return Err(ApiError::invalid_param(
                    "reasoning_effort",
                    format!("Invalid 'reasoning_effort': expected none, low, medium or high, got {level:?}"),
                )),
            },
            Value::Number(n) if n.as_u64().is_some() => n.as_u64() != Some(0),
            other => {
                return Err(ApiError::invalid_param(
                    "reasoning_effort",
                    format!("Invalid 'reasoning_effort': expected none, low, medium, high or a boolean, got {other}"),
                ))
            }
        };
        return Ok(Some(on));
    }
    if let Some(thinking) = thinking {
        return match thinking.get("type").and_then(Value::as_str) {
            Some("enabled") => Ok(Some(true)),
            Some("disabled") => Ok(Some(false)),
            _ => Err(ApiError::invalid_param(
                "thinking",
                format!("Invalid 'thinking': expected {{\"type\": \"enabled\"}} or {{\"type\": \"disabled\"}}, got {thinking}"),
            )),
        };
    }
    Ok(None)
}

/// The template variables that switch thinking: Qwen3 reads `enable_thinking`, DeepSeek V3.1
/// `thinking`. The request's own `chat_template_kwargs` win.
pub(crate) fn thinking_kwargs(kwargs: &mut Map<String, Value>, on: bool) {
    for name in ["enable_thinking", "thinking"] {
        kwargs.entry(name).or_insert(Value::Bool(on));
    }
}

/// Whether thinking is on for a prompt rendered with `kwargs` (templates think by default,
/// except DeepSeek V3.1's, which waits for `thinking`).
pub(crate) fn thinking_enabled(kwargs: &Map<String, Value>) -> bool {
    kwargs
        .get("enable_thinking")
        .or_else(|| kwargs.get("thinking"))
        .is_none_or(|v| v != &Value::Bool(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_body;
    use crate::structured::{GrammarCompiler, OutputFormat};
    use crate::testing::{constraint_accepts, fixture_dir};
    use crate::tool_parser::parse_tool_calls;

    fn fields(body: Value) -> ChatFields {
        parse_body(body.to_string().as_bytes()).unwrap()
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"], "additionalProperties": false}}})
    }

    fn request(body: Value) -> ToolRequest {
        ToolRequest::from_fields(&fields(body)).unwrap().unwrap()
    }

    fn error_param(body: Value) -> String {
        ToolRequest::from_fields(&fields(body))
            .unwrap_err()
            .body
            .error
            .param
            .unwrap_or_default()
    }

    #[test]
    fn tools_and_choices_are_read_in_every_form() {
        let r = request(json!({"tools": [weather()]}));
        assert_eq!(r.choice, ToolChoice::Auto);
        assert!(r.parallel && !r.forced());
        assert_eq!(r.tools[0].name, "get_weather");
        for (choice, expected) in [
            (json!("required"), ToolChoice::Required),
            (json!("any"), ToolChoice::Required),
            (json!("none"), ToolChoice::None),
            (
                json!({"type": "function", "function": {"name": "get_weather"}}),
                ToolChoice::Function("get_weather".into()),
            ),
            (
                json!({"type": "function", "name": "get_weather"}),
                ToolChoice::Function("get_weather".into()),
            ),
        ] {
            let r = request(json!({"tools": [weather()], "tool_choice": choice}));
            assert_eq!(r.choice, expected);
        }
        assert_eq!(
            request(json!({"tools": [weather()], "tool_choice": "none"})).template_tools(),
            None
        );
        // The deprecated functions / function_call become tools.
        let r = request(
            json!({"functions": [weather()["function"]], "function_call": {"name": "get_weather"}}),
        );
        assert_eq!(r.listed, vec![weather()]);
        assert_eq!(r.choice, ToolChoice::Function("get_weather".into()));
        assert!(!request(json!({"tools": [weather()], "parallel_tool_calls": false})).parallel);
        // No tools and nothing forced: nothing to do.
        assert!(
            ToolRequest::from_fields(&fields(json!({"tools": [], "tool_choice": "auto"})))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_tools_are_400_by_name() {
        assert_eq!(
            error_param(json!({"tools": [{"type": "function"}]})),
            "tools"
        );
        assert_eq!(
            error_param(json!({"tools": [{"type": "function", "function": {"name": "a b"}}]})),
            "tools"
        );
        assert_eq!(
            error_param(json!({"tools": [{"type": "retrieval", "function": {"name": "a"}}]})),
            "tools"
        );
        assert_eq!(
            error_param(json!({"tools": [weather(), weather()]})),
            "tools"
        );
        assert_eq!(
            error_param(
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]})
            ),
            "tools"
        );
        assert_eq!(
            error_param(
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}})
            ),
            "tool_choice"
        );
        assert_eq!(
            error_param(json!({"tool_choice": "required"})),
            "tool_choice"
        );
        assert_eq!(
            error_param(json!({"tools": [weather()], "tool_choice": "sometimes"})),
            "tool_choice"
        );
        assert_eq!(
            error_param(json!({"tools": [weather()], "functions": [{"name": "f"}]})),
            "functions"
        );
    }

    #[test]
    fn reasoning_effort_and_thinking_switch_thinking() {
        let on = |body: Value| thinking_requested(&fields(body)).unwrap();
        assert_eq!(on(json!({})), None);
        assert_eq!(on(json!({"reasoning_effort": "none"})), Some(false));
        assert_eq!(on(json!({"reasoning_effort": "low"})), Some(true));
        assert_eq!(on(json!({"reasoning_effort": true})), Some(true));
        assert_eq!(on(json!({"reasoning_effort": false})), Some(false));
        assert_eq!(on(json!({"reasoning_effort": 0})), Some(false));
        assert_eq!(on(json!({"thinking": {"type": "disabled"}})), Some(false));
        assert_eq!(
            on(json!({"thinking": {"type": "enabled", "budget_tokens": 2048}})),
            Some(true)
        );
        let param = |body: Value| {
            thinking_requested(&fields(body))
                .unwrap_err()
                .body
                .error
                .param
        };
        assert_eq!(
            param(json!({"reasoning_effort": "extreme"})).as_deref(),
            Some("reasoning_effort")
        );
        assert_eq!(
            param(json!({"reasoning_effort": "low", "thinking": {"type": "enabled"}})).as_deref(),
            Some("thinking")
        );
        let mut kwargs = Map::new();
        kwargs.insert("enable_thinking".into(), json!(true));
        thinking_kwargs(&mut kwargs, false);
        assert_eq!(kwargs["enable_thinking"], json!(true));
        assert_eq!(kwargs["thinking"], json!(false));
        assert!(thinking_enabled(&Map::new()));
    }

    /// Walks `text`'s tokens through the grammar: whether every token is allowed and the
    /// grammar is complete after them.
    fn accepts(tok: &TextTokenizer, grammar: &str, text: &str) -> bool {
        let eos = tok.token_id("<|im_end|>").unwrap();
        let compiler = GrammarCompiler::new(tok, &[eos], 2048).unwrap();
        let constraint = OutputFormat::Lark(grammar.to_string())
            .compile(&compiler, "tools")
            .unwrap_or_else(|e| panic!("{grammar}\n{}", e.body.error.message));
        constraint_accepts(&constraint, tok, text, eos)
    }

    #[test]
    fn a_forced_qwen3_call_admits_exactly_valid_calls() {
        let tok = TextTokenizer::from_dir(&fixture_dir("qwen3-moe-tiny")).unwrap();
        let call = |args: &str| {
            format!(
                "<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {args}}}\n</tool_call>"
            )
        };
        let good = call(r#"{"city": "Paris", "days": 3}"#);
        assert_eq!(parse_tool_calls(ToolCallFormat::Qwen3, &good).1.len(), 1);
        let single = request(
            json!({"tools": [weather()], "tool_choice": "required", "parallel_tool_calls": false}),
        );
        let g = forced_call_grammar(
            &single,
            ToolCallFormat::Qwen3,
            &tok,
            ThinkingPrefix::None,
            &[1993],
        );
        assert!(accepts(&tok, &g, &good), "{g}");
        assert!(!accepts(&tok, &g, &call(r#"{"city": "Paris"}"#)));
        assert!(!accepts(&tok, &g, &call(r#"{"city": 3, "days": 3}"#)));
        assert!(!accepts(&tok, &g, "Sure! I will call it."));
        assert!(!accepts(&tok, &g, &format!("{good}\n{good}")));
        let parallel = request(json!({"tools": [weather()], "tool_choice": "required"}));
        let g = forced_call_grammar(
            &parallel,
            ToolCallFormat::Qwen3,
            &tok,
            ThinkingPrefix::None,
            &[1993],
        );
        assert!(accepts(&tok, &g, &format!("{good}\n{good}")));
        // A thinking model may think first, then must call.
        let g = forced_call_grammar(
            &parallel,
            ToolCallFormat::Qwen3,
            &tok,
            ThinkingPrefix::Optional,
            &[1993],
        );
        assert!(accepts(
            &tok,
            &g,
            &format!("<think>\nhmm, weather\n</think>\n\n{good}")
        ));
        assert!(accepts(&tok, &g, &good));
        assert!(!accepts(&tok, &g, "<think>\nhmm\n</think>\n\nNo."));
        let g = forced_call_grammar(
            &parallel,
            ToolCallFormat::Qwen3,
            &tok,
            ThinkingPrefix::Open,
            &[1993],
        );
        assert!(accepts(&tok, &g, &format!("hmm\n</think>\n\n{good}")));
        assert!(!accepts(&tok, &g, &good));
    }

    #[test]
    fn a_named_choice_admits_only_that_tool() {
        let tok = TextTokenizer::from_dir(&fixture_dir("qwen3-moe-tiny")).unwrap();
        let time = json!({"type": "function", "function": {"name": "get_time"}});
        let r = request(
            json!({"tools": [weather(), time], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
        );
        let g = forced_call_grammar(
            &r,
            ToolCallFormat::Qwen3,
            &tok,
            ThinkingPrefix::None,
            &[1993],
        );
        assert!(accepts(
            &tok,
            &g,
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"
        ));
        assert!(!accepts(&tok, &g, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"a\", \"days\": 1}}\n</tool_call>"));
    }

    #[test]
    fn kimi_call_ids_count_on_from_the_calls_in_the_conversation() {
        let tok = TextTokenizer::from_dir(&fixture_dir("qwen3-moe-tiny")).unwrap();
        let earlier = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "functions.get_weather:1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]});
        let r = request(
            json!({"tools": [weather()], "tool_choice": "required", "messages": [
            {"role": "user", "content": "a"}, earlier, {"role": "tool", "content": "x"}]}),
        );
        assert_eq!(r.first_call_index, 2);
        let g = forced_call_grammar(
            &r,
            ToolCallFormat::KimiK2,
            &tok,
            ThinkingPrefix::None,
            &[1993],
        );
        let call = |i: usize| {
            format!("<|tool_call_begin|>functions.get_weather:{i}<|tool_call_argument_begin|>{{\"city\": \"a\", \"days\": 1}}<|tool_call_end|>")
        };
        let section =
            |calls: &str| format!("<|tool_calls_section_begin|>{calls}<|tool_calls_section_end|>");
        assert!(accepts(&tok, &g, &section(&call(2))));
        assert!(accepts(
            &tok,
            &g,
            &section(&format!("{}{}", call(2), call(3)))
        ));
        assert!(!accepts(&tok, &g, &section(&call(0))));
        assert!(!accepts(
            &tok,
            &g,
            &section(&format!("{}{}", call(2), call(2)))
        ));
    }

    #[test]
    fn forced_calls_of_every_family_parse_back() {
        // The tiny tokenizer has none of DeepSeek's or Kimi's markers as tokens, so they are
        // matched as text; what the grammar admits must be what the family's parser reads.
        let tok = TextTokenizer::from_dir(&fixture_dir("qwen3-moe-tiny")).unwrap();
        let r = request(json!({"tools": [weather()], "tool_choice": "required"}));
        let args = r#"{"city": "Paris", "days": 3}"#;
        for (format, text) in [
            (ToolCallFormat::DeepSeekV3, format!("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{args}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")),
            (ToolCallFormat::DeepSeekV31, format!("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{args}<｜tool▁call▁end｜><｜tool▁calls▁end｜>")),
            (ToolCallFormat::KimiK2, format!("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{args}<|tool_call_end|><|tool_calls_section_end|>")),
        ] {
            let g = forced_call_grammar(&r, format, &tok, ThinkingPrefix::None, &[1993]);
            assert!(accepts(&tok, &g, &text), "{format:?}\n{g}");
            let (content, calls) = parse_tool_calls(format, &text);
            assert_eq!((content, calls.len()), (None, 1), "{format:?}");
            assert_eq!(calls[0].arguments, r#"{"city":"Paris","days":3}"#);
            assert!(!accepts(&tok, &g, &text.replace("Paris\"", "Paris\", \"x\": 1")), "{format:?}");
        }
    }
}
