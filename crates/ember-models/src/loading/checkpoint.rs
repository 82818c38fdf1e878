//! Finding a Hugging Face checkpoint on disk: a directory, or a Hub id in the local cache.

use std::path::{Path, PathBuf};

use ember_core::{EmberError, Result};

/// Resolves `--model` to a directory holding config.json.
///
/// A path that exists is used as is; otherwise `owner/name` is looked up in the Hugging Face
/// cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), taking the
/// snapshot named by `refs/main` or, failing that, the only snapshot present.
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        if !path.join("config.json").is_file() {
            return Err(EmberError::Config(format!(
                "{} has no config.json; --model must name a Hugging Face checkpoint directory",
                path.display()
            )));
        }
        return Ok(path.to_path_buf());
    }
    let cache = hub_cache_dir();
    let repo_dir = cache.join(format!("models--{}", model.replace('/', "--")));
    match snapshot_in(&repo_dir) {
        Some(dir) => Ok(dir),
        None => Err(EmberError::Config(format!(
            "model {model:?} is neither a directory nor in the Hugging Face cache (looked in {}); \
             download it with `huggingface-cli download {model}` or pass a local path",
            repo_dir.display()
        ))),
    }
}

fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

fn snapshot_in(repo_dir: &Path) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs/main")) {
        let dir = snapshots.join(commit.trim());
        if dir.join("config.json").is_file() {
            return Some(dir);
        }
    }
    let mut found = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file());
    let first = found.next()?;
    // With several snapshots and no refs/main the choice would be a guess: refuse it.
    found.next().is_none().then_some(first)
}

/// Lists the safetensors files of a checkpoint: those named by `model.safetensors.index.json`,
/// else `model.safetensors`, else every `*.safetensors` in the directory.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| EmberError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            EmberError::Weights(format!("{} is not valid JSON: {e}", index.display()))
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                EmberError::Weights(format!("{} has no `weight_map` object", index.display()))
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(EmberError::Weights(format!(
                "shard {} named in {} is missing",
                missing.display(),
                index.display()
            )));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EmberError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EmberError::Weights(format!(
            "no *.safetensors weights in {}; pass --load-format dummy for random weights",
            dir.display()
        )));
    }
    Ok(files)
}

/// The floating-point dtype most of a checkpoint's parameters are stored in (counted in
/// elements over the safetensors headers of `files`, nothing read; 8-bit floats and integer
/// codes are not counted), or `None` when it stores none.
pub fn stored_float_dtype(files: &[PathBuf]) -> Result<Option<candle_core::DType>> {
    use candle_core::DType;
    // SAFETY: mapped read-only to read the headers; see `Weights::from_safetensors`.
    let mmap = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .map_err(|e| EmberError::Weights(format!("cannot read safetensors {files:?}: {e}")))?;
    let mut elements: [(DType, u64); 3] = [(DType::F32, 0), (DType::BF16, 0), (DType::F16, 0)];
    for (_, t) in mmap.tensors() {
        let Ok(dtype) = DType::try_from(t.dtype()) else {
            continue;
        };
        if let Some(slot) = elements.iter_mut().find(|(d, _)| *d == dtype) {
            slot.1 += t.shape().iter().product::<usize>() as u64;
        }
    }
    let (dtype, count) = elements
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .unwrap_or((DType::F32, 0));
    Ok((count > 0).then_some(dtype))
}

/// Bytes a load that holds quantized projections packed takes for the checkpoint in `files`
/// (from their headers, nothing read): every tensor stored in integers or 8-bit floats (packed
/// codes, e4m3 weights, scale bytes) as stored, every float one (unquantized modules, scales)
/// in `dtype`.
pub fn packed_held_bytes(files: &[PathBuf], dtype: candle_core::DType) -> Result<u64> {
    use candle_core::DType;
    // SAFETY: mapped read-only to read the headers; see `Weights::from_safetensors`.
    let mmap = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .map_err(|e| EmberError::Weights(format!("cannot read safetensors {files:?}: {e}")))?;
    Ok(mmap
        .tensors()
        .iter()
        .map(|(_, t)| match DType::try_from(t.dtype()) {
            Ok(DType::F64 | DType::F32 | DType::F16 | DType::BF16) => {
                t.shape().iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64
            }
            _ => t.data().len() as u64,
        })
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_resolve_through_refs_main() {
        let root = std::env::temp_dir().join(format!("ember-hub-{}", std::process::id()));
        let repo = root.join("models--acme--tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(snapshot_in(&repo), Some(snap));
        assert_eq!(snapshot_in(&root.join("models--acme--other")), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_model_names_where_it_looked() {
        let err = resolve_model_dir("nobody/no-such-model-anywhere").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("models--nobody--no-such-model-anywhere"),
            "{msg}"
        );
    }
}
