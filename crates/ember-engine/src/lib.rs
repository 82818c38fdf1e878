//! ember's engine: turns requests into batched forward steps and sampled tokens.

mod constrained;
pub mod engine;
pub mod handle;
pub mod kv_manager;
pub mod lora;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stats;

pub use engine::{Engine, EngineConfig};
pub use handle::{EngineHandle, ModelInfo};
pub use lora::{LoraConfig, LoraInfo, LoraManager};
pub use stats::{ExpertLoadSnapshot, StatsSnapshot, FORWARD_PHASE, STEP_PHASES};
