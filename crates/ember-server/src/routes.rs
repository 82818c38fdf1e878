//! The router (OpenAI routes, embeddings included, and vLLM's LoRA load/unload under `/v1` and `/inference/v1`, plus
//! `/health`, `/metrics` and `/version`), API-key auth, request counting, and the server loop
//! with graceful shutdown.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::endpoints::{chat, completions, embeddings, lora, models};
use crate::error::ApiError;
use crate::metrics;
use crate::shutdown::{shutdown_signal, DRAIN_TIMEOUT};
use crate::state::AppState;

/// Largest request body accepted; larger ones get a 413.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Both base paths clients use: the OpenAI SDK's and Fireworks' (`/inference/v1`).
const API_PREFIXES: [&str; 2] = ["/v1", "/inference/v1"];

/// All routes, with OpenAI-shaped errors for unknown paths, wrong methods and oversized bodies.
pub fn router(state: AppState) -> Router {
    let mut api = Router::new();
    for prefix in API_PREFIXES {
        api = api
            .route(
                &format!("{prefix}/chat/completions"),
                post(chat::chat_completions),
            )
            .route(
                &format!("{prefix}/completions"),
                post(completions::completions),
            )
            .route(
                &format!("{prefix}/embeddings"),
                post(embeddings::embeddings),
            )
            .route(&format!("{prefix}/models"), get(models::list_models))
            .route(
                &format!("{prefix}/models/{{*id}}"),
                get(models::retrieve_model),
            )
            .route(
                &format!("{prefix}/load_lora_adapter"),
                post(lora::load_lora_adapter),
            )
            .route(
                &format!("{prefix}/unload_lora_adapter"),
                post(lora::unload_lora_adapter),
            );
    }
    api.route_layer(middleware::from_fn_with_state(
        state.clone(),
        require_api_key,
    ))
    .route("/health", get(health))
    .route("/metrics", get(metrics::metrics))
    .route("/version", get(version))
    .method_not_allowed_fallback(method_not_allowed)
    .fallback(unknown_path)
    .layer(middleware::from_fn_with_state(
        state.clone(),
        count_requests,
    ))
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .with_state(state)
}

/// Serves `state` on `listener` until Ctrl-C or SIGTERM, then drains (see [`serve_until`])
/// for up to [`DRAIN_TIMEOUT`].
pub async fn serve(listener: TcpListener, state: AppState) -> std::io::Result<()> {
    serve_or_stop(listener, state, std::future::pending()).await
}

/// [`serve`], also shutting down (the same drain) when `stop` resolves: the engine stopped for
/// good, so the process should exit rather than answer every request with an error.
pub async fn serve_or_stop(
    listener: TcpListener,
    state: AppState,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let signal = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = stop => {}
        }
    };
    serve_until(listener, state, signal, DRAIN_TIMEOUT).await
}

/// Serves until `signal` resolves, then shuts down gracefully: `/health` answers 503 and new
/// generation requests get a retryable 503 while running ones have `drain_timeout` to finish;
/// then the server stops. A second Ctrl-C or SIGTERM stops it at once.
pub async fn serve_until(
    listener: TcpListener,
    state: AppState,
    signal: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    let draining = state.clone();
    let drained = async move {
        signal.await;
        let lifecycle = &draining.shared().lifecycle;
        lifecycle.begin_drain();
        tracing::info!(
            running = lifecycle.in_flight(),
            "shutting down: refusing new requests, waiting up to {}s for running ones",
            drain_timeout.as_secs()
        );
        if !lifecycle.drained(drain_timeout).await {
            tracing::warn!(
                running = lifecycle.in_flight(),
                "requests still running after {}s; stopping anyway",
                drain_timeout.as_secs()
            );
        }
    };
    // Stream chunks are small writes: without TCP_NODELAY, Nagle's algorithm holds the first
    // token on a kept-alive connection until the client's delayed ACK (~40 ms of TTFT).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set: {e}");
        }
    });
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(drained);
    // Graceful shutdown waits for every open connection; a stream past the deadline (or a
    // second signal) must not keep the process alive.
    let hard_stop = async move {
        state.shared().lifecycle.draining_started().await;
        tokio::select! {
            _ = tokio::time::sleep(drain_timeout + Duration::from_secs(1)) => {}
            _ = shutdown_signal() => tracing::warn!("second shutdown signal: stopping now"),
        }
    };
    tokio::select! {
        result = server.into_future() => result,
        _ = hard_stop => Ok(()),
    }
}

/// 200 while serving, 503 once shutting down (so load balancers stop sending requests).
async fn health(State(state): State<AppState>) -> StatusCode {
    if state.shared().lifecycle.is_draining() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// Counts every answer in `ember:http_requests_total`, by route pattern and status.
async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    state
        .shared()
        .metrics
        .count_http(&endpoint, response.status().as_u16());
    response
}

/// With `--api-key`, every API route needs `Authorization: Bearer <key>`.
async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.shared().config.api_key else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(key) if constant_time_eq(key.as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::invalid_api_key("Incorrect API key provided").into_response(),
        None => ApiError::invalid_api_key(
            "Missing API key: send the header 'Authorization: Bearer <key>'",
        )
        .into_response(),
    }
}

/// Compares keys without leaking, through timing, how long a matching prefix is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn unknown_path(method: Method, uri: Uri) -> ApiError {
    ApiError::unknown_path(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

#[cfg(test)]
mod tests;
