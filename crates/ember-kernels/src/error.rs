//! Errors of the kernels: bad shapes from the caller, and (with `cuda`) the driver's errors.

/// What went wrong in a kernel call or while loading the kernels.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The buffers' lengths do not fit the op's shape contract.
    #[error("{op}: {message}")]
    Shape {
        /// The op that refused the call (`rms_norm`).
        op: &'static str,
        /// Which lengths disagree, with their values.
        message: String,
    },
    /// The CUDA driver library (libcuda.so.1) could not be loaded: no NVIDIA driver on this machine.
    #[cfg(feature = "cuda")]
    #[error("no CUDA driver library on this machine (is the NVIDIA driver installed?): {0}")]
    NoDriver(String),
    /// A CUDA driver call failed (no device, module load, launch, copy).
    #[cfg(feature = "cuda")]
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
}

/// Returns a [`KernelError::Shape`] for `op` unless `ok`.
pub(crate) fn check_shape(
    ok: bool,
    op: &'static str,
    message: impl FnOnce() -> String,
) -> Result<(), KernelError> {
    if ok {
        Ok(())
    } else {
        Err(KernelError::Shape {
            op,
            message: message(),
        })
    }
}
