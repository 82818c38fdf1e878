//! Shared types of ember: model configs, sampling parameters, the engine's request and output
//! types, and errors. Knows nothing of tensors or HTTP.

pub mod config;
pub mod constraint;
pub mod error;
pub mod quantization;
pub mod request;
pub mod sampling;
pub mod task;

pub use config::{ModelConfig, ModelFamily, MoeConfig, RopeScaling};
pub use constraint::{Constraint, ConstraintSpec, TokenConstraint, TokenMask};
pub use error::{EmberError, Result};
pub use quantization::{
    KvCacheDtype, Nvfp4Layout, QuantizationRequest, QuantizedModules, WeightQuantization,
};
pub use request::{EngineRequest, FinishReason, RequestOutput, TokenLogprob};
pub use sampling::SamplingParams;
pub use task::ModelTask;
