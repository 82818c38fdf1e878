//! Where a model's tensors come from: memory-mapped safetensors shards, or random values
//! for `--load-format dummy` (stored as the config's `quantization_config` says, see
//! [`super::dummy`]). Layers ask for tensors by checkpoint name through a [`Weights`] prefix, so
//! each weight name is written once, next to the module that owns it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};

use ember_core::{EmberError, QuantizedModules, Result, WeightQuantization};

use super::dummy::DummyCheckpoint;

/// How weights are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFormat {
    /// Read the checkpoint's safetensors files.
    Safetensors,
    /// Random weights of the right shapes; nothing is read but config.json.
    Dummy,
}

enum Source {
    Mmap(MmapedSafetensors),
    Dummy(DummyCheckpoint),
}

/// A view of the checkpoint's tensors under a name prefix, converted to one dtype on one device.
#[derive(Clone)]
pub struct Weights {
    source: Arc<Source>,
    prefix: String,
    dtype: DType,
    device: Device,
    /// Bytes of the tensors the model keeps, counted as they are handed out (the memory report).
    held: Arc<AtomicI64>,
    /// `[out, in]` when the prefix is a linear module (see [`Weights::as_linear`]).
    linear: Option<[usize; 2]>,
}

fn tensor_err(e: candle_core::Error) -> EmberError {
    EmberError::Tensor(e.to_string())
}

impl Weights {
    /// Memory-maps the given safetensors files.
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        // SAFETY: the files are mapped read-only; ember never writes to checkpoints, and a file
        // changed under a running server is outside what any loader can guard against.
        let mmap = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| EmberError::Weights(format!("cannot read safetensors {files:?}: {e}")))?;
        Ok(Self::over(Source::Mmap(mmap), dtype, device))
    }

    /// Random weights (seeded), for benchmarks of real shapes without a download.
    pub fn dummy(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::over(Source::Dummy(DummyCheckpoint::new(seed)), dtype, device)
    }

    /// Random weights (seeded) whose linear modules named by `modules` are stored in `scheme`,
    /// as a real checkpoint of that `quantization_config` stores them.
    pub fn dummy_quantized(
        seed: u64,
        scheme: Option<WeightQuantization>,
        modules: QuantizedModules,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let checkpoint = DummyCheckpoint::new(seed).quantized(scheme, modules);
        Self::over(Source::Dummy(checkpoint), dtype, device)
    }

    /// Weights from `source` with every option at its default.
    fn over(source: Source, dtype: DType, device: &Device) -> Self {
        Self {
            source: Arc::new(source),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            held: Arc::default(),
            linear: None,
        }
    }

    /// The same checkpoint, read onto `device` (a rank's own GPU when the ranks of a sharded
    /// model are spread over several), counting its own held bytes (each rank's memory report).
    pub fn on_device(&self, device: &Device) -> Self {
        Self {
            device: device.clone(),
            held: Arc::default(),
            ..self.clone()
        }
    }

    /// Bytes of the tensors handed out by [`Weights::get`] and [`Weights::get_as`], less those
    /// released by layers that replaced them (online FP8), plus those layers noted as held.
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed).max(0) as u64
    }

    /// Counts `bytes` more (or, negative, fewer) as held by the model.
    pub fn note_held(&self, bytes: i64) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The same view, known to be the linear module `[out_dim, in_dim]` at the prefix: dummy
    /// weights then hold it as the checkpoint's quantization format stores a linear layer.
    pub fn as_linear(&self, in_dim: usize, out_dim: usize) -> Self {
        Self {
            linear: Some([out_dim, in_dim]),
            ..self.clone()
        }
    }

    /// The stored dtype of tensor `name`, if the checkpoint holds it (dummy weights: only for
    /// their quantized storage).
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        match self.source.as_ref() {
            Source::Mmap(m) => {
                let view = m.get(&self.full_name(name)).ok()?;
                DType::try_from(view.dtype()).ok()
            }
            Source::Dummy(d) => d.stored_dtype(&self.prefix, self.linear, name),
        }
    }

    /// Loads tensor `name` as stored (its own dtype and shape), on the CPU: the packed storage
    /// of a quantized weight, read by the dequantizers.
    pub fn get_stored(&self, name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        let m = match self.source.as_ref() {
            Source::Mmap(m) => m,
            Source::Dummy(d) => {
                return d
                    .load_stored(&self.prefix, self.linear, name)
                    .unwrap_or_else(|| {
                        Err(EmberError::Weights(format!(
                            "tensor `{full}`: dummy weights store it unquantized"
                        )))
                    })
            }
        };
        m.get(&full).map_err(|_| {
            EmberError::Weights(format!("tensor `{full}` is missing from the checkpoint"))
        })?;
        m.load(&full, &Device::Cpu)
            .map_err(|e| EmberError::Weights(format!("tensor `{full}` cannot be loaded: {e}")))
    }

    /// The same weights with `name` appended to the prefix (`model` → `model.layers`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            linear: None,
            ..self.clone()
        }
    }

    /// The name prefix (the module path, e.g. `model.layers.0.self_attn.q_proj`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether the checkpoint holds `name` (dummy weights hold everything but the quantized
    /// storage their linear modules lack).
    pub fn contains(&self, name: &str) -> bool {
        match self.source.as_ref() {
            Source::Mmap(m) => m.get(&self.full_name(name)).is_ok(),
            Source::Dummy(d) => d.contains(&self.prefix, self.linear, name),
        }
    }

    /// Loads tensor `name` (relative to the prefix), checks its shape and converts its dtype.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// Like [`Weights::get`], converting to `dtype` instead of the model dtype.
    pub fn get_as(&self, name: &str, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        let t = self.read_as(name, shape, dtype)?;
        self.note_held(tensor_bytes(&t));
        Ok(t)
    }

    /// Like [`Weights::get_as`] for a tensor only read at load (a dequantizer's input), so not
    /// counted as held.
    pub(crate) fn read_as(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        dtype: DType,
    ) -> Result<Tensor> {
        let full = self.full_name(name);
        let shape = shape.into();
        let tensor = match self.source.as_ref() {
            Source::Mmap(m) => {
                let view = m.get(&full).map_err(|_| {
                    EmberError::Weights(format!("tensor `{full}` is missing from the checkpoint"))
                })?;
                if view.shape() != shape.dims() {
                    return Err(EmberError::Weights(format!(
                        "tensor `{full}` has shape {:?}, expected {:?}",
                        view.shape(),
                        shape.dims()
                    )));
                }
                m.load(&full, &self.device).map_err(|e| {
                    EmberError::Weights(format!("tensor `{full}` cannot be loaded: {e}"))
                })?
            }
            Source::Dummy(d) => match d.load_stored(&self.prefix, self.linear, name) {
                Some(stored) => {
                    let stored = stored?;
                    if stored.dims() != shape.dims() {
                        return Err(EmberError::Weights(format!(
                            "tensor `{full}` has shape {:?}, expected {:?}",
                            stored.dims(),
                            shape.dims()
                        )));
                    }
                    stored.to_device(&self.device).map_err(tensor_err)?
                }
                None => d.float_tensor(&full, &shape, &self.device)?,
            },
        };
        tensor.to_dtype(dtype).map_err(tensor_err)
    }
}

impl Weights {
    /// Loads `len` entries from `start` along `dim` of tensor `name`, whose whole shape is
    /// `full` (checked), in the model dtype: one rank's shard. From a checkpoint only the
    /// slice's bytes are read (the rest of the mapping is never touched); dummy weights make the
    /// whole tensor and cut it, so a shard holds what the unsharded model holds there.
    pub fn get_slice(
        &self,
        name: &str,
        full: impl Into<Shape>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Tensor> {
        let full = full.into();
        let dims = full.dims().to_vec();
        let whole = || EmberError::Weights(format!("tensor `{}`", self.full_name(name)));
        if dim >= dims.len() || start + len > dims[dim] {
            return Err(EmberError::Weights(format!(
                "{}: cannot take {start}..{} along dim {dim} of {dims:?}",
                whole(),
                start + len
            )));
        }
        if start == 0 && len == dims[dim] {
            return self.get(name, full);
        }
        let t = match self.source.as_ref() {
            Source::Mmap(m) => {
                let full_name = self.full_name(name);
                let view = m.get(&full_name).map_err(|_| {
                    EmberError::Weights(format!(
                        "tensor `{full_name}` is missing from the checkpoint"
                    ))
                })?;
                if view.shape() != dims.as_slice() {
                    return Err(EmberError::Weights(format!(
                        "tensor `{full_name}` has shape {:?}, expected {dims:?}",
                        view.shape()
                    )));
                }
                let stored = DType::try_from(view.dtype())
                    .map_err(|e| EmberError::Weights(format!("tensor `{full_name}`: {e}")))?;
                let elem = stored.size_in_bytes();
                let outer: usize = dims[..dim].iter().product();
                let inner: usize = dims[dim + 1..].iter().product::<usize>() * elem;
                let data = view.data();
                let mut raw = Vec::with_capacity(outer * len * inner);
                for o in 0..outer {
                    let base = (o * dims[dim] + start) * inner;
                    raw.extend_from_slice(&data[base..base + len * inner]);
                }
                let mut shape = dims.clone();
                shape[dim] = len;
                Tensor::from_raw_buffer(&raw, stored, &shape, &self.device)
                    .and_then(|t| t.to_dtype(self.dtype))
                    .map_err(|e| {
                        EmberError::Weights(format!("tensor `{full_name}` cannot be loaded: {e}"))
                    })?
            }
            Source::Dummy(_) => self
                .read_as(name, full, self.dtype)?
                .narrow(dim, start, len)
                .and_then(|t| t.contiguous())
                .map_err(tensor_err)?,
        };
        self.note_held(tensor_bytes(&t));
        Ok(t)
    }
}

/// Bytes a tensor's elements take.
pub fn tensor_bytes(t: &Tensor) -> i64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as i64
}
