//! One forward step: the flattened batch every layer reads, and decode steps replayed as CUDA
//! graphs.

pub mod batch;
pub mod cuda_graph;
pub mod metadata;
pub mod mode;
