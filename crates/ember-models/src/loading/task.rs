//! Which task a checkpoint is for. Embedding checkpoints say so in sentence-transformers files
//! (`modules.json` naming a Pooling module, whose `config.json` names the pooling mode) or by a
//! bare `*Model` architecture with no LM head; everything else generates.

use std::path::Path;

use ember_core::{EmberError, ModelConfig, ModelTask, Result};
use serde_json::Value;

/// The sentence-transformers Pooling module's type in `modules.json`.
const POOLING_MODULE: &str = "sentence_transformers.models.Pooling";

/// The task of the checkpoint in `dir`: `requested` when given, else detected. An embedding
/// checkpoint must pool its last token, the only pooling ember does (Qwen3-Embedding's).
pub fn resolve_task(
    dir: &Path,
    cfg: &ModelConfig,
    requested: Option<ModelTask>,
) -> Result<ModelTask> {
    let pooling = pooling_mode(dir)?;
    let task = requested.unwrap_or_else(|| {
        let bare = !cfg.architectures.is_empty()
            && cfg
                .architectures
                .iter()
                .all(|a| a.ends_with("Model") && !a.ends_with("ForCausalLM"));
        if pooling.is_some() || bare {
            ModelTask::Embed
        } else {
            ModelTask::Generate
        }
    });
    if task == ModelTask::Embed {
        if let Some(mode) = pooling.filter(|m| m != "lasttoken") {
            return Err(EmberError::Config(format!(
                "{} pools with {mode:?}; ember embeds with last-token pooling only \
                 (pooling_mode_lasttoken, as Qwen3-Embedding)",
                dir.display()
            )));
        }
    }
    Ok(task)
}

/// The pooling mode (`lasttoken`, `mean`, `cls`, ...) of the Pooling module that `modules.json`
/// lists, or `None` when the checkpoint has no sentence-transformers pooling.
fn pooling_mode(dir: &Path) -> Result<Option<String>> {
    let Some(modules) = read_json(&dir.join("modules.json"))? else {
        return Ok(None);
    };
    let pooling = modules
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["type"].as_str() == Some(POOLING_MODULE));
    let Some(pooling) = pooling else {
        return Ok(None);
    };
    let sub_dir = pooling["path"].as_str().unwrap_or("1_Pooling");
    let config_path = dir.join(sub_dir).join("config.json");
    let Some(config) = read_json(&config_path)? else {
        return Err(EmberError::Config(format!(
            "modules.json names a Pooling module but {} is missing",
            config_path.display()
        )));
    };
    let mode = config
        .as_object()
        .into_iter()
        .flatten()
        .find(|(key, on)| key.starts_with("pooling_mode_") && on.as_bool() == Some(true))
        .map(|(key, _)| key.trim_start_matches("pooling_mode_").to_string());
    mode.map(Some).ok_or_else(|| {
        EmberError::Config(format!(
            "{} turns on no pooling_mode_*; set pooling_mode_lasttoken",
            config_path.display()
        ))
    })
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| EmberError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EmberError::Config(format!("{} is not valid JSON: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(architecture: &str) -> ModelConfig {
        let json = format!(
            r#"{{"architectures":["{architecture}"],"model_type":"qwen3","vocab_size":64,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "head_dim":4,"max_position_embeddings":32}}"#
        );
        ModelConfig::from_json_str(&json).unwrap()
    }

    /// A directory holding only the sentence-transformers files for `pooling` (none for `None`).
    struct Checkpoint(std::path::PathBuf);

    impl Checkpoint {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Checkpoint {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn checkpoint(pooling: Option<&str>) -> Checkpoint {
        let name = format!(
            "ember-task-{}-{}",
            std::process::id(),
            pooling.unwrap_or("none")
        );
        let dir = Checkpoint(std::env::temp_dir().join(name));
        let _ = std::fs::remove_dir_all(dir.path());
        std::fs::create_dir_all(dir.path()).unwrap();
        if let Some(key) = pooling {
            let modules = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#;
            std::fs::write(dir.path().join("modules.json"), modules).unwrap();
            std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
            let pooling = format!(r#"{{"pooling_mode_cls_token":false,"{key}":true}}"#);
            std::fs::write(dir.path().join("1_Pooling/config.json"), pooling).unwrap();
        }
        dir
    }

    #[test]
    fn sentence_transformers_pooling_or_a_bare_model_means_embed() {
        let causal = config("Qwen3ForCausalLM");
        let plain = checkpoint(None);
        assert_eq!(
            resolve_task(plain.path(), &causal, None).unwrap(),
            ModelTask::Generate
        );
        let st = checkpoint(Some("pooling_mode_lasttoken"));
        assert_eq!(
            resolve_task(st.path(), &causal, None).unwrap(),
            ModelTask::Embed
        );
        let bare = config("Qwen3Model");
        assert_eq!(
            resolve_task(plain.path(), &bare, None).unwrap(),
            ModelTask::Embed
        );
        // --task wins over what the files say.
        let forced = resolve_task(st.path(), &causal, Some(ModelTask::Generate)).unwrap();
        assert_eq!(forced, ModelTask::Generate);
        let forced = resolve_task(plain.path(), &causal, Some(ModelTask::Embed)).unwrap();
        assert_eq!(forced, ModelTask::Embed);
    }

    #[test]
    fn pooling_other_than_last_token_is_refused_by_name() {
        let mean = checkpoint(Some("pooling_mode_mean_tokens"));
        let err = resolve_task(mean.path(), &config("Qwen3ForCausalLM"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mean_tokens") && err.contains("last-token"),
            "{err}"
        );
    }
}
