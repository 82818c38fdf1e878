//! ember's HTTP side: OpenAI/Fireworks-compatible routes, chat templates, tokenization and
//! incremental detokenization. It never touches tensors; it talks to the engine through
//! [`ember_engine::EngineHandle`].
//!
//! Start a server with [`AppState::new`] and [`serve`] (or mount [`router`] yourself).

pub mod api;
pub mod chat_template;
mod choice;
pub mod detokenizer;
mod endpoints;
mod engine;
pub mod error;
pub mod gbnf;
mod generation;
mod metrics;
/// Splits thinking text from the answer (`<think>...</think>`).
pub mod reasoning_parser;
pub mod routes;
mod sampling;
mod shutdown;
mod state;
/// Structured output: `response_format` compiled by llguidance into engine constraints.
pub mod structured;
mod tiktoken;
pub mod tokenizer;
/// Parses each model family's tool-call output.
pub mod tool_parser;

pub use chat_template::ChatTemplate;
pub use detokenizer::IncrementalDetokenizer;
pub use error::ApiError;
pub use routes::{router, serve, serve_or_stop, serve_until, MAX_BODY_BYTES};
pub use shutdown::DRAIN_TIMEOUT;
pub use state::{AppState, ParserChoice, ServerConfig};
pub use tokenizer::TextTokenizer;

#[cfg(test)]
mod testing;
