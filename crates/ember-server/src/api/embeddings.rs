//! `/v1/embeddings` bodies (OpenAI `CreateEmbeddingRequest` / `CreateEmbeddingResponse`) and
//! what turns a model's hidden state into the vector a client gets: Matryoshka truncation to
//! `dimensions`, L2 normalisation, and the `base64` encoding openai-python decodes.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The request body.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// A served model name, or its `accounts/<acct>/models/<name>` form.
    pub model: String,
    /// A string, a list of strings, a list of token ids or a list of token-id lists; checked by
    /// the handler so that every fault is a 400 on `input`.
    #[serde(default)]
    pub input: Option<Value>,
    /// `float` (the default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Keep the first `dimensions` values and re-normalise (Qwen3-Embedding is trained for it).
    #[serde(default)]
    pub dimensions: Option<i64>,
    /// The end user, for abuse monitoring; accepted and not used.
    #[serde(default)]
    pub user: Option<String>,
}

/// How the vectors are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// A JSON array of numbers.
    #[default]
    Float,
    /// The little-endian float32 bytes, base64-encoded.
    Base64,
}

/// One vector in either encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

impl EmbeddingVector {
    /// `values` written as `format` asks.
    pub fn encode(values: Vec<f32>, format: EncodingFormat) -> Self {
        match format {
            EncodingFormat::Float => Self::Float(values),
            EncodingFormat::Base64 => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                Self::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// One input's embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: String,
    /// Position of the input in the request.
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// Token counts of an embeddings response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    /// Tokens of all inputs (with the special tokens the tokenizer added).
    pub prompt_tokens: usize,
    /// The same: embeddings generate nothing.
    pub total_tokens: usize,
}

/// The response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Embedding>,
    /// The model as the request named it.
    pub model: String,
    pub usage: EmbeddingUsage,
}

/// The embedding of a pooled hidden state: its first `dimensions` values (all when `None`),
/// scaled to unit L2 norm. A zero vector stays zero.
pub fn normalised_embedding(hidden: &[f32], dimensions: Option<usize>) -> Vec<f32> {
    let kept = &hidden[..dimensions.unwrap_or(hidden.len()).min(hidden.len())];
    let norm = kept
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    // torch.nn.functional.normalize's floor, so a zero vector is not divided by zero.
    let scale = 1.0 / norm.max(1e-12);
    kept.iter()
        .map(|&x| (f64::from(x) * scale) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_truncated_then_normalised() {
        assert_eq!(
            normalised_embedding(&[3.0, 4.0, 12.0], None),
            [3.0 / 13.0, 4.0 / 13.0, 12.0 / 13.0]
        );
        assert_eq!(normalised_embedding(&[3.0, 4.0, 12.0], Some(2)), [0.6, 0.8]);
        assert_eq!(normalised_embedding(&[0.0, 0.0], None), [0.0, 0.0]);
    }

    #[test]
    fn base64_is_little_endian_float32_as_openai_python_decodes_it() {
        // numpy.frombuffer(base64.b64decode(s), dtype="float32") == [1.0, -2.0]
        let v = EmbeddingVector::encode(vec![1.0, -2.0], EncodingFormat::Base64);
        assert_eq!(v, EmbeddingVector::Base64("AACAPwAAAMA=".into()));
        let v = EmbeddingVector::encode(vec![0.5], EncodingFormat::Float);
        assert_eq!(serde_json::to_string(&v).unwrap(), "[0.5]");
    }

    #[test]
    fn the_request_takes_every_openai_field() {
        let body = r#"{"model":"m","input":["a",[1,2]],"encoding_format":"base64","dimensions":8,"user":"u"}"#;
        let r: EmbeddingRequest = serde_json::from_str(body).unwrap();
        assert_eq!(r.encoding_format, Some(EncodingFormat::Base64));
        assert_eq!((r.dimensions, r.user.as_deref()), (Some(8), Some("u")));
        assert!(serde_json::from_str::<EmbeddingRequest>(
            r#"{"model":"m","encoding_format":"int8"}"#
        )
        .is_err());
    }
}
