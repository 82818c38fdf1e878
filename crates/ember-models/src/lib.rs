//! ember's model families and the loading of Hugging Face checkpoints.
//!
//! A model runs one forward over a [`ForwardBatch`] (the flattened new tokens of many
//! sequences) against a paged [`KvCachePool`], and returns logits (or, for an
//! embedding model, final hidden states) for the rows the batch asks for.
//!
//! The crate's rooms, each a folder: `families` (the models and the [`CausalLm`] trait),
//! `attention`, `moe`, `layers`, `linear` (the one linear-layer interface and the quantized
//! weight formats behind it), `lora`, `cache`, `step` (one forward step's batch, metadata and
//! mode; CUDA graphs), `parallel`, `loading`, `device`; beside them `backends` (the
//! implementations chosen at load), `loader` (the one loader path), `sharded` (a model over
//! several ranks) and `sampling` (sampling on the device). No import cycle crosses two of them
//! (`tests/layout.rs`).

pub mod attention;
pub mod backends;
pub mod cache;
pub mod device;
pub mod families;
pub mod layers;
pub mod linear;
pub mod loader;
pub mod loading;
pub mod lora;
pub mod moe;
pub mod parallel;
pub mod sampling;
pub mod sharded;
pub mod step;

use candle_core::Tensor;

pub use cache::kv_cache::KvCachePool;
pub use families::CausalLm;
pub use loader::{load_model, LoadOptions, LoadedModel};
pub use loading::weights::LoadFormat;
pub use lora::{LoraAdapter, LoraTargets};
pub use step::batch::{ForwardBatch, SequenceInput};

/// Result of candle tensor code inside layers; converted to [`ember_core::EmberError`] at the model edge.
pub type TensorResult<T = Tensor> = candle_core::Result<T>;
