//! Where a model's tensors come from: finding a checkpoint, reading its tensors (or dummy
//! ones), and which task it is for. The loader that builds models from them is [`crate::loader`].

pub mod checkpoint;
pub mod context;
mod dummy;
pub mod task;
pub mod weights;
