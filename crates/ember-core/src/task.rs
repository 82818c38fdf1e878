//! What a served model does with a prompt: generate text, or return an embedding.

use crate::error::{EmberError, Result};

/// The job a model is loaded for (vLLM's `--task` / `--runner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelTask {
    /// A causal LM: prompts are continued token by token (`/v1/chat/completions`, `/v1/completions`).
    #[default]
    Generate,
    /// An embedding model: a prompt is run once and its last token's final hidden state is the
    /// embedding (`/v1/embeddings`). The model has no LM head.
    Embed,
}

impl ModelTask {
    /// Parses a `--task` value; `auto` (detect from the checkpoint) is `None`.
    pub fn parse(name: &str) -> Result<Option<Self>> {
        match name.to_ascii_lowercase().as_str() {
            "auto" => Ok(None),
            "generate" | "generation" => Ok(Some(Self::Generate)),
            "embed" | "embedding" | "pooling" => Ok(Some(Self::Embed)),
            other => Err(EmberError::Config(format!(
                "unknown task {other:?}; use auto, generate or embed"
            ))),
        }
    }

    /// The `--task` spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Embed => "embed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_parse_and_round_trip() {
        assert_eq!(ModelTask::parse("auto").unwrap(), None);
        assert_eq!(ModelTask::parse("embed").unwrap(), Some(ModelTask::Embed));
        assert_eq!(ModelTask::parse("pooling").unwrap(), Some(ModelTask::Embed));
        assert_eq!(
            ModelTask::parse("Generate").unwrap(),
            Some(ModelTask::Generate)
        );
        for task in [ModelTask::Generate, ModelTask::Embed] {
            assert_eq!(ModelTask::parse(task.as_str()).unwrap(), Some(task));
        }
        let err = ModelTask::parse("rerank").unwrap_err().to_string();
        assert!(err.contains("rerank") && err.contains("embed"), "{err}");
    }
}
