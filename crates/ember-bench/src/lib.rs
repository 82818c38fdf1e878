//! `ember bench`: load generators and their reports. `serve` drives any OpenAI-compatible
//! endpoint (ember, vLLM, SGLang, Fireworks) and computes its metrics exactly as
//! `vllm bench serve` does, so the numbers compare across servers.

pub mod args;
pub mod arrivals;
pub mod dataset;
pub mod metrics;
pub mod report;
pub mod request;
pub mod response_format;
pub mod serve;
pub mod sse;
