//! ember's own kernels. Each op has a CPU reference (always built) and, with the `cuda` feature,
//! a CUDA kernel from the top-level `kernels/` with the same signature over device slices.

mod element;
mod error;
pub mod fp8_e5m2;
pub mod fused_moe;
pub mod mla_decode;
pub mod moe_routing;
pub mod paged_attention;
pub mod prefill_attention;
pub mod rms_norm;
pub mod rotary;
pub mod sampling;
pub mod scatter_rows;
pub mod silu_and_mul;
pub mod w4a16;
pub mod w8a16;
pub mod w8a8;
mod weight_gemm;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use element::Element;
pub use error::KernelError;
