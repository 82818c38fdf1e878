//! OpenAI-shaped errors: `{"error":{"message","type","param","code"}}` with the right status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_core::EmberError;
use serde::{Deserialize, Serialize};

/// The body of an error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

/// What went wrong; all four keys are always present (`param` and `code` may be null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Human-readable; names the bad value and what to do.
    pub message: String,
    /// `invalid_request_error` for client faults, `server_error` for ours.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// Machine-readable code, e.g. `context_length_exceeded`.
    pub code: Option<String>,
}

/// An error response: a status and an OpenAI error body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status; 4xx for anything the client can fix.
    pub status: StatusCode,
    /// The JSON body.
    pub body: ErrorBody,
    /// Seconds a client should wait before retrying (the `Retry-After` header), for 429 and 503.
    pub retry_after: Option<u32>,
}

const INVALID_REQUEST: &str = "invalid_request_error";
/// What 429 and 503 answers tell clients to wait; openai-python honours it when it retries.
const RETRY_AFTER_SECONDS: u32 = 1;

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &str,
        message: String,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message,
                    kind: kind.to_string(),
                    param: param.map(str::to_string),
                    code: code.map(str::to_string),
                },
            },
            retry_after: None,
        }
    }

    /// 429 `rate_limit_exceeded` with `Retry-After`: the waiting queue is full.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(RETRY_AFTER_SECONDS),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                message.into(),
                None,
                Some("rate_limit_exceeded"),
            )
        }
    }

    /// 503 `service_unavailable` with `Retry-After`: the engine stopped or the server is
    /// shutting down; another replica (or this one, later) may serve the request.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(RETRY_AFTER_SECONDS),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                message.into(),
                None,
                Some("service_unavailable"),
            )
        }
    }

    /// 400 for a bad value of request parameter `param`.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
            message.into(),
            Some(param),
            None,
        )
    }

    /// 400 for a request that is wrong as a whole (malformed JSON, ...).
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
            message.into(),
            None,
            None,
        )
    }

    /// 400 `context_length_exceeded`: the prompt alone does not fit the context window.
    pub fn prompt_too_long(param: &str, prompt_tokens: usize, max_model_len: usize) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
            format!("The prompt is too long: {prompt_tokens}, model maximum context length: {max_model_len}"),
            Some(param),
            Some("context_length_exceeded"),
        )
    }

    /// 400 `context_length_exceeded`: prompt plus requested completion exceed the window and the
    /// caller asked for an error rather than a shorter completion.
    pub fn completion_too_long(
        param: &str,
        prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    ) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID_REQUEST,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens \
                 ({prompt_tokens} in the prompt, {max_tokens} in the completion). Please reduce the prompt or max_tokens.",
                prompt_tokens + max_tokens
            ),
            Some(param),
            Some("context_length_exceeded"),
        )
    }

    /// 404 `model_not_found` for a `model` this server does not serve.
    pub fn model_not_found(model: &str, served: &[String]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            format!(
                "The model `{model}` does not exist. This server serves: {}",
                served.join(", ")
            ),
            Some("model"),
            Some("model_not_found"),
        )
    }

    /// 404 `model_not_found` for another named thing that does not exist (a LoRA adapter).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            message.into(),
            None,
            Some("model_not_found"),
        )
    }

    /// 401 `invalid_api_key`.
    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            INVALID_REQUEST,
            message.into(),
            None,
            Some("invalid_api_key"),
        )
    }

    /// 404 for a path that is not an endpoint.
    pub fn unknown_path(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            format!(
                "Unknown request URL: {method} {path}. Endpoints live under /v1 and /inference/v1."
            ),
            None,
            Some("unknown_url"),
        )
    }

    /// 405 for a known path called with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID_REQUEST,
            format!("Method {method} is not allowed for {path}"),
            None,
            Some("method_not_allowed"),
        )
    }

    /// A client fault with its own status (413 payload too large, 415 unsupported media type).
    pub fn client_status(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, INVALID_REQUEST, message.into(), None, None)
    }

    /// 500: our fault, never the client's.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            message.into(),
            None,
            None,
        )
    }

    /// Maps a library error: a request the engine or template refused is the client's fault
    /// (400, naming the parameter when the message quotes one); a missing adapter is 404; a
    /// full queue is 429 and a stopped engine 503, both retryable; the rest are ours.
    pub fn from_ember(error: EmberError) -> Self {
        match error {
            EmberError::InvalidRequest(message) => {
                let param = quoted_param(&message).map(str::to_string);
                Self::new(
                    StatusCode::BAD_REQUEST,
                    INVALID_REQUEST,
                    message,
                    param.as_deref(),
                    None,
                )
            }
            EmberError::NotFound(message) => Self::not_found(message),
            // Fireworks answers a LoRA that failed to load with 412 (API.md, status codes).
            EmberError::AdapterLoad(message) => Self::new(
                StatusCode::PRECONDITION_FAILED,
                INVALID_REQUEST,
                message,
                None,
                Some("lora_load_failed"),
            ),
            EmberError::Overloaded(message) => Self::overloaded(message),
            EmberError::Unavailable(message) => Self::unavailable(message),
            other => Self::internal(other.to_string()),
        }
    }
}

/// `Invalid 'temperature': ...` names the parameter between quotes.
fn quoted_param(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("Invalid '")?;
    rest.split_once('\'').map(|(param, _)| param)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_overflow_matches_the_spec() {
        let e = ApiError::prompt_too_long("messages", 262377, 262143);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let json = serde_json::to_value(&e.body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "The prompt is too long: 262377, model maximum context length: 262143",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
        );
    }

    #[test]
    fn null_param_and_code_are_present() {
        let json = serde_json::to_value(ApiError::invalid_request("bad").body).unwrap();
        assert_eq!(json["error"]["param"], serde_json::Value::Null);
        assert!(json["error"].as_object().unwrap().contains_key("code"));
    }

    #[test]
    fn engine_validation_errors_are_400_naming_the_param() {
        let e = ApiError::from_ember(EmberError::InvalidRequest(
            "Invalid 'top_p': must be greater than 0".into(),
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body.error.param.as_deref(), Some("top_p"));
        let e = ApiError::from_ember(EmberError::Tensor("oops".into()));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.body.error.kind, "server_error");
        assert_eq!(e.retry_after, None);
    }

    #[test]
    fn a_missing_adapter_is_a_404_shaped_like_model_not_found() {
        let e = ApiError::from_ember(EmberError::NotFound(
            "The lora adapter 'x' cannot be found.".into(),
        ));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(
            serde_json::to_value(&e.body).unwrap(),
            serde_json::json!({"error": {"message": "The lora adapter 'x' cannot be found.",
                "type": "invalid_request_error", "param": null, "code": "model_not_found"}})
        );
    }

    #[test]
    fn a_full_queue_is_429_and_a_stopped_engine_503_both_with_retry_after() {
        let e = ApiError::from_ember(EmberError::Overloaded("4096 requests are waiting".into()));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            serde_json::to_value(&e.body).unwrap(),
            serde_json::json!({"error": {"message": "4096 requests are waiting",
                "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}})
        );
        let response = e.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");

        let e = ApiError::from_ember(EmberError::Unavailable("the engine has stopped".into()));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.body.error.code.as_deref(), Some("service_unavailable"));
        assert_eq!(e.into_response().headers()[header::RETRY_AFTER], "1");
    }
}
