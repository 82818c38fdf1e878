//! The paged KV cache: per-layer pools of fixed-size blocks, in the model dtype or fp8.

pub mod fp8_e5m2;
pub mod kv_cache;
