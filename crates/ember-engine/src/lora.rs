//! The LoRA manager: which adapters are registered, which are resident in memory, and the limits
//! that bound them. Shared by the HTTP side (load, unload, look up) and the engine thread.
//!
//! Registered adapters stay known by name and path; at most `max_cpu_loras` of them are held in
//! memory, least recently used evicted first (an adapter a running request holds is never
//! dropped: the request owns an `Arc` of it) and read from disk again on next use.
//! `max_loras` bounds how many distinct adapters one step may mix (the scheduler enforces it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device};
use ember_core::{EmberError, Result};
use ember_models::{LoraAdapter, LoraTargets};

/// Limits of `--enable-lora`.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Distinct adapters one step may mix (`--max-loras`).
    pub max_loras: usize,
    /// Adapters kept in host memory (`--max-cpu-loras`); more may be registered.
    pub max_cpu_loras: usize,
    /// Largest rank accepted (`--max-lora-rank`).
    pub max_lora_rank: usize,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            max_loras: 8,
            max_cpu_loras: 32,
            max_lora_rank: 64,
        }
    }
}

/// A registered adapter as the API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInfo {
    pub name: String,
    pub id: u64,
    pub path: PathBuf,
    /// Unix seconds when it was registered.
    pub created: u64,
    /// Its largest rank over the modules it adapts.
    pub max_rank: usize,
}

struct Entry {
    info: LoraInfo,
    resident: Option<Arc<LoraAdapter>>,
    last_used: u64,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, Entry>,
    next_id: u64,
    clock: u64,
}

/// Registered adapters and their residency; cheap to share behind an `Arc`.
pub struct LoraManager {
    config: LoraConfig,
    targets: LoraTargets,
    dtype: DType,
    device: Device,
    state: Mutex<State>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LoraManager {
    /// A manager for adapters of a model with these `targets`, stored in `dtype` on `device`.
    pub(crate) fn new(
        config: LoraConfig,
        targets: LoraTargets,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        if config.max_loras == 0 || config.max_cpu_loras < config.max_loras {
            return Err(EmberError::Config(format!(
                "--max-loras must be at least 1 and --max-cpu-loras at least --max-loras (got {} and {})",
                config.max_loras, config.max_cpu_loras
            )));
        }
        if config.max_lora_rank == 0 {
            return Err(EmberError::Config(
                "--max-lora-rank must be at least 1".into(),
            ));
        }
        Ok(Self {
            config,
            targets,
            dtype,
            device,
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
        })
    }

    /// A manager for adapters of the checkpoint in `model_dir`, held in f32 on the CPU, for tools
    /// and tests that check adapters without an engine (the model is loaded once, to learn which
    /// projections adapters may target).
    pub fn for_checkpoint(config: LoraConfig, model_dir: &Path) -> Result<Self> {
        let mut opts = ember_models::LoadOptions::new(model_dir.to_string_lossy());
        opts.dtype = Some(DType::F32);
        let loaded = ember_models::load_model(&opts)?;
        Self::new(
            config,
            loaded.model.lora_targets().clone(),
            DType::F32,
            Device::Cpu,
        )
    }

    /// The limits it was built with.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self, name: &str, id: u64, path: &Path) -> Result<Arc<LoraAdapter>> {
        let adapter = LoraAdapter::load(path, name, id, &self.targets, self.dtype, &self.device)?;
        if adapter.max_rank() > self.config.max_lora_rank {
            return Err(EmberError::AdapterLoad(format!(
                "LoRA adapter {name} has rank {}, above --max-lora-rank {}",
                adapter.max_rank(),
                self.config.max_lora_rank
            )));
        }
        Ok(Arc::new(adapter))
    }

    /// Reads, checks and registers the adapter in `path` as `name`. Errors (all client faults):
    /// the name is taken, the path is not an adapter directory, the adapter does not fit the
    /// model, or its rank is above `max_lora_rank`.
    pub fn load(&self, name: &str, path: &Path) -> Result<LoraInfo> {
        if name.is_empty() {
            return Err(EmberError::InvalidRequest(
                "lora_name must not be empty".into(),
            ));
        }
        if self.contains(name) {
            return Err(EmberError::InvalidRequest(format!(
                "The lora adapter '{name}' has already been loaded."
            )));
        }
        if !path.is_dir() {
            return Err(EmberError::AdapterLoad(format!(
                "lora_path {} is not a directory holding adapter_config.json and adapter_model.safetensors",
                path.display()
            )));
        }
        let path = path.canonicalize().map_err(|source| EmberError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let id = {
            let mut state = self.lock();
            state.next_id += 1;
            state.next_id - 1
        };
        let adapter = self.read(name, id, &path)?;
        let mut state = self.lock();
        if state.entries.contains_key(name) {
            return Err(EmberError::InvalidRequest(format!(
                "The lora adapter '{name}' has already been loaded."
            )));
        }
        state.clock += 1;
        let info = LoraInfo {
            name: name.to_string(),
            id,
            path,
            created: unix_now(),
            max_rank: adapter.max_rank(),
        };
        tracing::info!(
            adapter = name,
            id,
            rank = adapter.max_rank(),
            modules = adapter.num_modules(),
            "LoRA adapter loaded from {}",
            info.path.display()
        );
        let last_used = state.clock;
        state.entries.insert(
            name.to_string(),
            Entry {
                info: info.clone(),
                resident: Some(adapter),
                last_used,
            },
        );
        self.evict(&mut state, name);
        Ok(info)
    }

    /// Forgets `name`; requests already running with it finish. Error when it is not registered.
    pub fn unload(&self, name: &str) -> Result<()> {
        match self.lock().entries.remove(name) {
            Some(_) => {
                tracing::info!(adapter = name, "LoRA adapter unloaded");
                Ok(())
            }
            None => Err(not_found(name)),
        }
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().entries.contains_key(name)
    }

    /// Registered adapters, by name.
    pub fn list(&self) -> Vec<LoraInfo> {
        self.lock()
            .entries
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    /// Number of adapters resident in memory.
    pub fn num_resident(&self) -> usize {
        self.lock()
            .entries
            .values()
            .filter(|e| e.resident.is_some())
            .count()
    }

    /// Reads adapter `name` back into memory if it was evicted, so that a request naming it
    /// starts without a file read. Blocks on file reads then: call it off async executors.
    /// A `NotFound` error when it is not registered.
    pub fn make_resident(&self, name: &str) -> Result<()> {
        self.get(name).map(drop)
    }

    /// The adapter registered as `name`, read from disk again if it was evicted. Blocks on file
    /// reads in that case.
    pub(crate) fn get(&self, name: &str) -> Result<Arc<LoraAdapter>> {
        let (id, path) = {
            let mut state = self.lock();
            state.clock += 1;
            let clock = state.clock;
            let entry = state.entries.get_mut(name).ok_or_else(|| not_found(name))?;
            entry.last_used = clock;
            if let Some(adapter) = &entry.resident {
                return Ok(adapter.clone());
            }
            (entry.info.id, entry.info.path.clone())
        };
        let adapter = self.read(name, id, &path)?;
        let mut state = self.lock();
        match state.entries.get_mut(name) {
            // Unloaded (or replaced) while it was being read: the request still gets what it asked for.
            Some(entry) if entry.info.id == id => {
                let adapter = entry.resident.get_or_insert(adapter).clone();
                self.evict(&mut state, name);
                Ok(adapter)
            }
            _ => Err(not_found(name)),
        }
    }

    /// Drops the least recently used resident adapters beyond `max_cpu_loras` that no request
    /// holds, never `keep` (the one just loaded or asked for).
    fn evict(&self, state: &mut State, keep: &str) {
        loop {
            let resident: Vec<(&String, u64)> = state
                .entries
                .iter()
                .filter(|(_, e)| e.resident.is_some())
                .map(|(n, e)| (n, e.last_used))
                .collect();
            if resident.len() <= self.config.max_cpu_loras {
                return;
            }
            let victim = resident
                .iter()
                .filter(|(n, _)| {
                    n.as_str() != keep
                        && state.entries[*n]
                            .resident
                            .as_ref()
                            .is_some_and(|a| Arc::strong_count(a) == 1)
                })
                .min_by_key(|(_, used)| *used)
                .map(|(n, _)| (*n).clone());
            let Some(victim) = victim else { return };
            tracing::debug!(adapter = victim, "LoRA adapter evicted from memory");
            if let Some(e) = state.entries.get_mut(&victim) {
                e.resident = None;
            }
        }
    }
}

fn not_found(name: &str) -> EmberError {
    EmberError::NotFound(format!("The lora adapter '{name}' cannot be found."))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `models/lora/<name>`.
    pub(crate) fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/lora")
            .join(name)
    }

    /// A manager over `models/qwen3-tiny`.
    pub(crate) fn manager(config: LoraConfig) -> LoraManager {
        let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen3-tiny");
        LoraManager::for_checkpoint(config, &model).unwrap()
    }

    #[test]
    fn registers_evicts_least_recently_used_and_reloads_on_demand() {
        let m = manager(LoraConfig {
            max_loras: 1,
            max_cpu_loras: 1,
            max_lora_rank: 16,
        });
        m.load("attn", &fixture("qwen3-tiny-attn-r8")).unwrap();
        let held = m.get("attn").unwrap();
        m.load("mlp", &fixture("qwen3-tiny-mlp-r4-rslora")).unwrap();
        // "attn" is held by a request: it stays resident over the limit.
        assert_eq!(m.num_resident(), 2);
        drop(held);
        m.load("all", &fixture("qwen3-tiny-all-r16")).unwrap();
        assert_eq!(m.num_resident(), 1);
        // Evicted ones come back from disk with the same id.
        let attn = m.get("attn").unwrap();
        assert_eq!(attn.id(), m.list()[1].id);
        assert_eq!(attn.max_rank(), 8);
        assert_eq!(m.num_resident(), 1);
        assert!(m.load("attn", &fixture("qwen3-tiny-attn-r8")).is_err());
        m.unload("attn").unwrap();
        assert!(matches!(m.get("attn"), Err(EmberError::NotFound(_))));
        assert!(matches!(m.unload("attn"), Err(EmberError::NotFound(_))));
        // The request that held it keeps working with it.
        assert_eq!(attn.name(), "attn");
    }

    #[test]
    fn rejects_ranks_above_the_limit_wrong_bases_and_non_adapters() {
        let m = manager(LoraConfig {
            max_lora_rank: 8,
            ..LoraConfig::default()
        });
        let err = m
            .load("all", &fixture("qwen3-tiny-all-r16"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rank 16") && err.contains("--max-lora-rank 8"),
            "{err}"
        );
        let err = m
            .load("ds", &fixture("deepseek-v3-tiny-mla"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("q_a_proj") || err.contains("kv_a_proj"),
            "{err}"
        );
        let err = m.load("x", &fixture("missing")).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        let err = m
            .load("x", &PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("adapter_config.json"), "{err}");
        assert!(m.list().is_empty());
    }
}
