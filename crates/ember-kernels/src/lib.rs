//! ember's own kernels. Each op has a CPU reference (always built) and, with the `cuda` feature,
//! a CUDA kernel from the top-level `kernels/` with the same signature over device slices.
//!
//! One module per op: its reference, then its launcher, an `impl` block of
//! [`cuda::CudaKernels`] in a `cuda` submodule at the end of the op's file (before the tests),
//! or in the op's folder where the two together would be too long (`paged_attention/cuda.rs`,
//! `fused_moe/cuda.rs`). What every launcher shares (loading the fatbins, the stream, the pinned
//! staging buffers, the 32-bit argument checks) is `cuda.rs`.

pub mod cpu_dot;
mod element;
mod error;
pub mod fp8_e5m2;
pub mod fused_moe;
pub mod linear_cpu;
pub mod mla_decode;
pub mod moe_cpu;
pub mod moe_routing;
pub mod packed_cpu;
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
