//! What a step is besides its tokens: an idle data-parallel rank's placeholder, or a step being
//! captured into a CUDA graph. Set by whoever builds or runs the step and read by the layers
//! through the step's batch, never through thread-locals.

use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex};

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::CudaSlice;

/// How a step runs (see the module doc).
#[derive(Debug, Default)]
pub struct StepMode {
    /// An idle data-parallel rank's placeholder token (see
    /// [`crate::step::batch::DataParallelSplit`]): the MoE layers count no expert load for it
    /// and send its rows to no expert.
    pub placeholder: bool,
    /// Set while the step is captured into a CUDA graph ([`StepMode::capture`]).
    capturing: AtomicBool,
    /// While a graph's step is warmed up and captured: the device count of its live rows, which
    /// the fused MoE's routing reads so the spare rows skip the experts.
    #[cfg(feature = "cuda")]
    live_rows: Mutex<Option<Arc<CudaSlice<u32>>>>,
}

impl StepMode {
    /// An idle data-parallel rank's placeholder step when `placeholder`, else a plain one.
    pub fn placeholder(placeholder: bool) -> Self {
        Self {
            placeholder,
            ..Self::default()
        }
    }

    /// Whether the step is being captured into a CUDA graph now.
    pub fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
    }

    /// Errs while the step is captured: for the code that reads the host's view of a step
    /// (`what`), which a graph would freeze at the capture's values.
    pub fn refuse(&self, what: &str) -> candle_core::Result<()> {
        if self.capturing() {
            candle_core::bail!("{what} cannot run inside a CUDA graph");
        }
        Ok(())
    }

    /// Marks the step as captured until the returned guard drops.
    pub fn capture(&self) -> Capturing<'_> {
        self.capturing.store(true, Ordering::Relaxed);
        Capturing(self)
    }

    /// The live-row count of the graph this step is captured for, if it is.
    #[cfg(feature = "cuda")]
    pub fn live_rows(&self) -> Option<Arc<CudaSlice<u32>>> {
        self.live_rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Hands `live` to [`StepMode::live_rows`] for the rest of the step's life.
    #[cfg(feature = "cuda")]
    pub fn set_live_rows(&self, live: &Arc<CudaSlice<u32>>) {
        *self.live_rows.lock().unwrap_or_else(|p| p.into_inner()) = Some(live.clone());
    }
}

/// A step marked as captured (see [`StepMode::capture`]); unmarks it when dropped.
pub struct Capturing<'a>(&'a StepMode);

impl Drop for Capturing<'_> {
    fn drop(&mut self) {
        self.0.capturing.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_hold_only_while_capturing() {
        let mode = StepMode::default();
        assert!(!mode.capturing());
        mode.refuse("a host walk").unwrap();
        {
            let _mark = mode.capture();
            let err = mode.refuse("a host walk").unwrap_err().to_string();
            assert!(
                err.contains("a host walk cannot run inside a CUDA graph"),
                "{err}"
            );
        }
        assert!(!mode.capturing());
        mode.refuse("a host walk").unwrap();
    }
}
