//! `POST /v1/embeddings`: each input runs through the engine as a prompt-only request (batched
//! with whatever else is running) and comes back as its last token's final hidden state, which
//! is truncated to `dimensions`, L2-normalised and written as floats or base64.

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_core::{FinishReason, RequestOutput, SamplingParams};
use tokio::sync::mpsc::UnboundedReceiver;

use super::prompt_input::parse_prompt_input;
use super::run_blocking;
use crate::api::embeddings::{
    normalised_embedding, Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage,
    EmbeddingVector,
};
use crate::api::{parse_body, JsonBody};
use crate::error::ApiError;
use crate::metrics::FinishedRequest;
use crate::state::{AppState, ModelTarget};

/// The handler. Dropping it (the client went away) drops every input's receiver, which aborts
/// their engine requests the next step.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let _in_flight = state.shared().lifecycle.enter()?;
    let request: EmbeddingRequest = parse_body(&body)?;
    let shared = state.shared();
    if let ModelTarget::Adapter(name) = state.resolve_model(&request.model)? {
        return Err(ApiError::invalid_param(
            "model",
            format!("Invalid 'model': the LoRA adapter {name:?} cannot embed; name the base model"),
        ));
    }
    let Some(hidden_size) = shared.engine.embedding_size() else {
        return Err(ApiError::invalid_param(
            "model",
            format!(
                "This model does not support embeddings: {} generates text. Serve an embedding \
                 model (e.g. Qwen3-Embedding) or start ember with --task embed",
                request.model
            ),
        ));
    };
    let dimensions = dimensions(request.dimensions, hidden_size)?;
    let format = request.encoding_format.unwrap_or_default();
    let limits = shared.engine.limits();
    let inputs = {
        let state = state.clone();
        let input = request.input;
        run_blocking(move || {
            let tokenizer = &state.shared().tokenizer;
            parse_prompt_input(
                input,
                "input",
                |text| tokenizer.encode_with_special_tokens(text),
                limits.vocab_size,
            )
        })
        .await?
    };
    if let Some(long) = inputs.iter().find(|i| i.ids.len() > limits.max_model_len) {
        return Err(ApiError::prompt_too_long(
            "input",
            long.ids.len(),
            limits.max_model_len,
        ));
    }
    // Every input is queued before any is awaited, so they share engine steps.
    let receivers = inputs
        .iter()
        .map(|input| {
            shared
                .engine
                .submit(input.ids.clone(), SamplingParams::embedding(), None)
                .map_err(ApiError::from_ember)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut data = Vec::with_capacity(receivers.len());
    for (index, (rx, input)) in receivers.into_iter().zip(&inputs).enumerate() {
        let outcome = last_output(rx).await;
        shared.metrics.record(&FinishedRequest {
            finished_reason: if outcome.is_ok() { "stop" } else { "error" },
            prompt_tokens: input.ids.len(),
            generation_tokens: 0,
            time_to_first_token: None,
            e2e_latency: started.elapsed(),
            lora_name: None,
        });
        let hidden = outcome?;
        data.push(Embedding {
            object: "embedding".into(),
            index,
            embedding: EmbeddingVector::encode(normalised_embedding(&hidden, dimensions), format),
        });
    }
    let prompt_tokens = inputs.iter().map(|i| i.ids.len()).sum();
    Ok(Json(EmbeddingResponse {
        object: "list".into(),
        data,
        model: request.model,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    })
    .into_response())
}

/// `dimensions`: between 1 and the model's hidden size; `None` keeps them all.
fn dimensions(requested: Option<i64>, hidden_size: usize) -> Result<Option<usize>, ApiError> {
    let Some(d) = requested else {
        return Ok(None);
    };
    match usize::try_from(d) {
        Ok(d) if (1..=hidden_size).contains(&d) => Ok(Some(d)),
        _ => Err(ApiError::invalid_param(
            "dimensions",
            format!("Invalid 'dimensions': expected a value between 1 and the model's embedding size {hidden_size}, got {d}"),
        )),
    }
}

/// The hidden state an embedding request ends with.
async fn last_output(mut rx: UnboundedReceiver<RequestOutput>) -> Result<Vec<f32>, ApiError> {
    while let Some(output) = rx.recv().await {
        if output.finish_reason == Some(FinishReason::Error) {
            return Err(ApiError::internal(output.error.unwrap_or_else(|| {
                "the engine failed on the request; see the server log".into()
            })));
        }
        if let Some(embedding) = output.embedding {
            return Ok(embedding);
        }
    }
    Err(ApiError::internal(
        "The engine stopped before finishing the request; see the server log",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_must_fit_the_embedding() {
        assert_eq!(dimensions(None, 64).unwrap(), None);
        assert_eq!(dimensions(Some(1), 64).unwrap(), Some(1));
        assert_eq!(dimensions(Some(64), 64).unwrap(), Some(64));
        for bad in [0, -3, 65] {
            let e = dimensions(Some(bad), 64).unwrap_err();
            assert_eq!(e.body.error.param.as_deref(), Some("dimensions"), "{bad}");
            assert!(
                e.body.error.message.contains("64"),
                "{}",
                e.body.error.message
            );
        }
    }
}
