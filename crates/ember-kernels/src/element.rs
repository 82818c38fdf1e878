//! The element types the kernels take: they load as f32, compute in f32 and round once on store.

use half::bf16;

/// A storage dtype of the kernels (f32, bf16): converted to f32 on load and rounded once on store.
pub trait Element: Copy + Send + Sync + 'static {
    /// Suffix of this dtype's kernel names in `kernels/*.cu` (`rms_norm_bf16`).
    const KERNEL_SUFFIX: &'static str;
    /// Widens to f32 (exact for both types).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type, to nearest even (as `__float2bfloat16` does on the GPU).
    fn from_f32(v: f32) -> Self;
    /// The slice itself when the type is f32 (no copy to widen it).
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
}

impl Element for f32 {
    const KERNEL_SUFFIX: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Element for bf16 {
    const KERNEL_SUFFIX: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
