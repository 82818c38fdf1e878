//! The layers models are built of: linear projections, the MLP, RMSNorm and rotary embeddings,
//! and ember's kernels for them as candle ops.

pub mod kernel_ops;

pub mod mlp;
pub mod norm;
pub mod rope;
