//! `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`: vLLM's run-time adapter
//! API. Success is vLLM's plain-text sentence (clients match on it); failures are OpenAI
//! errors: 400 for a bad request or adapter, 404 for unloading an unknown one.

use std::path::PathBuf;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::run_blocking;
use crate::api::{parse_body, JsonBody};
use crate::error::ApiError;
use crate::state::AppState;

/// The body of `load_lora_adapter`.
#[derive(Debug, Deserialize)]
struct LoadRequest {
    /// The name requests will use as `model`.
    lora_name: Option<String>,
    /// The adapter's directory on the server (`adapter_config.json`, `adapter_model.safetensors`).
    lora_path: Option<String>,
    /// vLLM: replace an adapter of the same name. Not supported: unload it first.
    load_inplace: Option<bool>,
}

/// The body of `unload_lora_adapter`.
#[derive(Debug, Deserialize)]
struct UnloadRequest {
    lora_name: Option<String>,
}

fn success(message: String) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

/// A required string field, present and not empty.
fn required(value: Option<String>, param: &str, message: &str) -> Result<String, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::invalid_param(param, message))
}

/// Reads, checks and registers an adapter; it answers requests as soon as this returns.
pub(crate) async fn load_lora_adapter(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    state.lora_manager().map_err(ApiError::from_ember)?;
    let request: LoadRequest = parse_body(&body)?;
    let both = "Both 'lora_name' and 'lora_path' must be provided.";
    let name = required(request.lora_name, "lora_name", both)?;
    let path = PathBuf::from(required(request.lora_path, "lora_path", both)?);
    if request.load_inplace == Some(true) {
        return Err(ApiError::invalid_param(
            "load_inplace",
            "Invalid 'load_inplace': replacing an adapter in place is not supported; \
             unload it, then load the new one",
        ));
    }
    let info = run_blocking(move || {
        state
            .load_lora_adapter(&name, &path)
            .map_err(ApiError::from_ember)
    })
    .await?;
    Ok(success(format!(
        "Success: LoRA adapter '{}' added successfully.",
        info.name
    )))
}

/// Forgets an adapter; requests already running with it finish, new ones get a 404.
pub(crate) async fn unload_lora_adapter(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    state.lora_manager().map_err(ApiError::from_ember)?;
    let request: UnloadRequest = parse_body(&body)?;
    let name = required(
        request.lora_name,
        "lora_name",
        "'lora_name' must be provided to unload a LoRA adapter.",
    )?;
    state
        .unload_lora_adapter(&name)
        .map_err(ApiError::from_ember)?;
    Ok(success(format!(
        "Success: LoRA adapter '{name}' removed successfully."
    )))
}
