//! The `prompt` of `/v1/completions` and the `input` of `/v1/embeddings`: a string, a list of
//! strings, a list of token ids or a list of token-id lists, tokenized and checked. Errors are
//! 400s on the parameter.

use serde_json::Value;

use crate::error::ApiError;

/// One prompt of a request.
pub(crate) struct PromptInput {
    pub ids: Vec<u32>,
    /// The text as sent; `None` when sent as token ids (which are used as they are).
    pub text: Option<String>,
}

/// Parses `value`, the request's `param`, tokenizing texts with `encode`; every prompt must be
/// non-empty and its ids below `vocab_size`.
pub(crate) fn parse_prompt_input(
    value: Option<Value>,
    param: &str,
    encode: impl Fn(&str) -> ember_core::Result<Vec<u32>>,
    vocab_size: usize,
) -> Result<Vec<PromptInput>, ApiError> {
    let invalid = |message: String| ApiError::invalid_param(param, message);
    let shape = format!(
        "Invalid '{param}': expected a string, a list of strings, a list of token ids or a list of token-id lists"
    );
    let text_prompt = |text: String| -> Result<PromptInput, ApiError> {
        // Checked before tokenizing: a post-processor may add tokens to an empty text.
        if text.is_empty() {
            return Err(invalid(format!(
                "Invalid '{param}': a {param} must not be an empty string"
            )));
        }
        let ids = encode(&text).map_err(ApiError::from_ember)?;
        Ok(PromptInput {
            ids,
            text: Some(text),
        })
    };
    let token_prompt = |items: &[Value]| -> Result<PromptInput, ApiError> {
        let ids = items
            .iter()
            .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| invalid(shape.clone()))?;
        Ok(PromptInput { ids, text: None })
    };
    let prompts = match value {
        None | Some(Value::Null) => {
            return Err(invalid(format!("Missing required parameter: '{param}'")))
        }
        Some(Value::String(text)) => vec![text_prompt(text)?],
        Some(Value::Array(items)) => match items.first() {
            None => return Err(invalid(format!("Invalid '{param}': the list is empty"))),
            Some(Value::Number(_)) => vec![token_prompt(&items)?],
            Some(_) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(text) => text_prompt(text),
                    Value::Array(ids) => token_prompt(&ids),
                    _ => Err(invalid(shape.clone())),
                })
                .collect::<Result<_, _>>()?,
        },
        Some(_) => return Err(invalid(shape)),
    };
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.ids.is_empty() {
            return Err(invalid(format!("Invalid '{param}': {param} {i} is empty")));
        }
        if let Some(bad) = prompt.ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(invalid(format!(
                "Invalid '{param}': token id {bad} is outside the vocabulary of {vocab_size}"
            )));
        }
    }
    Ok(prompts)
}
