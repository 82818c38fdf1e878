//! Attention over the paged KV cache: Qwen3's grouped-query attention and DeepSeek's multi-head
//! latent attention, each with its CPU path and its CUDA hook-up side by side.

pub mod gqa;
pub mod mla;
pub mod mla_decode;
pub mod paged;
#[cfg(feature = "cuda")]
pub mod paged_cuda;
