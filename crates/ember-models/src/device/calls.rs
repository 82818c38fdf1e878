//! How many layer calls each of ember's kernel paths has served for one model: what tests read
//! to know the path they mean is taken. One per model, shared by its layers and ranks, handed to
//! the layers at load ([`crate::loading::context::LoadContext::kernel_calls`]) and kept by
//! [`crate::LoadedModel::kernel_calls`].

use std::sync::atomic::{AtomicU64, Ordering};

/// A kernel path whose calls are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    RmsNorm,
    /// RMSNorm fused with the residual add before it.
    AddRmsNorm,
    SiluAndMul,
    Rotary,
    /// MLA's single-token decodes (`kernels/mla_decode.cu`).
    MlaDecode,
    /// MLA's prefill attention (`kernels/prefill_attention.cu`).
    MlaPrefill,
    FusedMoe,
    /// The fused MoE's blocked CPU kernel (ember-kernels' `moe_cpu`).
    MoeCpu,
}

/// Calls served per [`Kernel`].
#[derive(Debug, Default)]
pub struct KernelCalls([AtomicU64; 8]);

impl KernelCalls {
    /// Counts one call of `kernel`.
    pub fn count(&self, kernel: Kernel) {
        self.0[kernel as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls of `kernel` so far.
    pub fn get(&self, kernel: Kernel) -> u64 {
        self.0[kernel as usize].load(Ordering::Relaxed)
    }
}
