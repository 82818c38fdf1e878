//! The model's chat template (Jinja, from the model directory) rendered with minijinja the way
//! transformers' `apply_chat_template` renders it with jinja2.

mod python_json;
mod strftime;

use std::path::Path;

use ember_core::{EmberError, Result};
use minijinja::value::ValueKind;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};

/// The special-token names transformers passes to every template (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Names a message's reasoning may come under; templates read `reasoning_content` (or
/// `thinking`, for gpt-oss), so transformers fills those from whichever one is set.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The `default` template's source (parsers are picked by what it renders).
    source: String,
    has_tool_use: bool,
    special_tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("has_tool_use", &self.has_tool_use)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl ChatTemplate {
    /// Loads the template of a model directory: `chat_template.jinja` (plus named ones in
    /// `additional_chat_templates/`) if present, else `tokenizer_config.json`'s `chat_template`.
    /// `Ok(None)` when the model has none (a base model).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Map<String, Json> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| EmberError::io(&config_path, e))?;
            serde_json::from_str(&text).map_err(|e| {
                EmberError::Config(format!("{}: invalid JSON: {e}", config_path.display()))
            })?
        } else {
            Map::new()
        };

        let mut templates: Vec<(String, String)> = Vec::new();
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source =
                std::fs::read_to_string(&jinja_path).map_err(|e| EmberError::io(&jinja_path, e))?;
            templates.push((DEFAULT.into(), source));
            templates.extend(additional_templates(
                &dir.join("additional_chat_templates"),
            )?);
        } else {
            templates = config_templates(&config, &config_path)?;
        }
        if templates.is_empty() {
            return Ok(None);
        }
        let special_tokens = SPECIAL_TOKEN_NAMES
            .iter()
            .filter_map(|&name| Some((name.to_string(), token_content(config.get(name)?)?)))
            .collect();
        Self::new(templates, special_tokens).map(Some)
    }

    /// Compiles named templates (one must be `default`) with the special tokens given to them.
    pub fn new(
        templates: Vec<(String, String)>,
        special_tokens: Vec<(String, String)>,
    ) -> Result<Self> {
        if !templates.iter().any(|(name, _)| name == DEFAULT) {
            let names: Vec<&str> = templates.iter().map(|(n, _)| n.as_str()).collect();
            return Err(EmberError::Config(format!(
                "the model has several chat templates ({}) and none is named \"default\"",
                names.join(", ")
            )));
        }
        let mut env = template_environment();
        let has_tool_use = templates.iter().any(|(name, _)| name == TOOL_USE);
        let source = templates
            .iter()
            .find(|(name, _)| name == DEFAULT)
            .map(|(_, source)| source.clone())
            .unwrap_or_default();
        for (name, source) in templates {
            env.add_template_owned(name.clone(), source).map_err(|e| {
                EmberError::Config(format!("chat template {name:?} does not compile: {e}"))
            })?;
        }
        Ok(Self {
            env,
            source,
            has_tool_use,
            special_tokens,
        })
    }

    /// The source of the default template.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (an array of message objects) to the prompt text. `extra_kwargs`
    /// (the request's `chat_template_kwargs`, e.g. `enable_thinking`) are template variables.
    /// A failing template (e.g. `raise_exception`) is an [`EmberError::InvalidRequest`].
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        extra_kwargs: &Map<String, Json>,
    ) -> Result<String> {
        let Some(messages) = messages.as_array() else {
            return Err(EmberError::InvalidRequest(
                "'messages' must be an array".into(),
            ));
        };
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| match m.as_object() {
                Some(m) => Ok(Json::Object(template_message(m))),
                None => Err(EmberError::InvalidRequest(format!(
                    "'messages[{i}]' must be an object"
                ))),
            })
            .collect::<Result<Vec<Json>>>()?;

        // Later entries win, as in transformers: special tokens < kwargs < the named arguments.
        let mut context: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        context.extend(
            extra_kwargs
                .iter()
                .map(|(k, v)| (k.clone(), Value::from_serialize(v))),
        );
        context.push(("messages".into(), Value::from_serialize(&messages)));
        context.push((
            "tools".into(),
            tools.map_or(Value::from(()), Value::from_serialize),
        ));
        context.push(("documents".into(), Value::from(())));
        context.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let context: Value = context.into_iter().collect();

        let name = if tools.is_some() && self.has_tool_use {
            TOOL_USE
        } else {
            DEFAULT
        };
        self.env
            .get_template(name)
            .and_then(|t| t.render(context))
            .map_err(|e| EmberError::InvalidRequest(render_error_message(&e)))
    }
}

/// A message as transformers hands it to the template: null-valued keys dropped, and the
/// reasoning aliased under every name templates read. A null `content` stays `none`: DeepSeek's
/// templates tell a tool-call turn by `message['content'] is none` and fail on a missing key.
fn template_message(message: &Map<String, Json>) -> Map<String, Json> {
    let message: Map<String, Json> = message
        .iter()
        .filter(|(k, v)| !v.is_null() || k.as_str() == "content")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let Some(reasoning) = REASONING_FIELDS
        .iter()
        .find_map(|k| message.get(*k))
        .cloned()
    else {
        return message;
    };
    // Python: {"thinking": reasoning, **message, "reasoning_content": reasoning}
    let mut aliased = Map::new();
    aliased.insert("thinking".into(), reasoning.clone());
    aliased.extend(message);
    aliased.insert("reasoning_content".into(), reasoning);
    aliased
}

/// The environment transformers builds: jinja2 with `trim_blocks`, `lstrip_blocks`, loop
/// controls, Python string methods, its own `tojson`, `raise_exception` and `strftime_now`.
fn template_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", python_json::tojson_filter);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| {
        strftime::strftime_now(&format)
    });
    env.set_formatter(|out, state, value| {
        // Python prints None, True and False capitalised.
        let python = match value.kind() {
            ValueKind::None => "None",
            ValueKind::Bool if value.is_true() => "True",
            ValueKind::Bool => "False",
            _ => return minijinja::escape_formatter(out, state, value),
        };
        out.write_str(python)
            .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write template output"))
    });
    env
}

fn render_error_message(e: &Error) -> String {
    let location = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
    match (e.kind(), e.detail()) {
        // raise_exception: the template author's message, as is.
        (ErrorKind::InvalidOperation, Some(detail)) => format!("chat template error: {detail}"),
        _ => format!("chat template error{location}: {e}"),
    }
}

/// `tokenizer_config.json`'s `chat_template`: a string, or a list of `{name, template}`.
fn config_templates(config: &Map<String, Json>, path: &Path) -> Result<Vec<(String, String)>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::String(source)) => Ok(vec![(DEFAULT.into(), source.clone())]),
        Some(Json::Array(list)) => list
            .iter()
            .map(|entry| {
                let name = entry.get("name").and_then(Json::as_str);
                let source = entry.get("template").and_then(Json::as_str);
                match (name, source) {
                    (Some(n), Some(s)) => Ok((n.to_string(), s.to_string())),
                    _ => Err(EmberError::Config(format!(
                        "{}: each chat_template entry needs a \"name\" and a \"template\" string",
                        path.display()
                    ))),
                }
            })
            .collect(),
        Some(_) => Err(EmberError::Config(format!(
            "{}: chat_template must be a string or a list of {{name, template}}",
            path.display()
        ))),
    }
}

/// `additional_chat_templates/<name>.jinja`, the named templates transformers 5 saves.
fn additional_templates(dir: &Path) -> Result<Vec<(String, String)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| EmberError::io(dir, e))?;
    let mut templates = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| EmberError::io(dir, e))?.path();
        let name = path.file_stem().and_then(|s| s.to_str());
        if let (Some(name), Some("jinja")) = (name, path.extension().and_then(|e| e.to_str())) {
            let source = std::fs::read_to_string(&path).map_err(|e| EmberError::io(&path, e))?;
            templates.push((name.to_string(), source));
        }
    }
    Ok(templates)
}

/// A special token as tokenizer_config.json stores it: a string or `{"content": ...}`.
fn token_content(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
