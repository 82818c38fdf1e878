//! Rotary position embeddings in `config.json`: plain, linear or YaRN scaling, under the older
//! `rope_theta`/`rope_scaling` keys or transformers-5's `rope_parameters`.

use serde_json::Value;

use super::RawConfig;
use crate::error::{EmberError, Result};

/// How rotary position embeddings scale beyond the trained context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: default`).
    None,
    /// Position interpolation: positions divided by `factor`.
    Linear { factor: f64 },
    /// YaRN (`rope_type: yarn`): inv_freq blended between interpolation and extrapolation, cos/sin
    /// scaled by an attention factor; DeepSeek also scales the softmax by `mscale(factor, mscale_all_dim)²`.
    Yarn(YarnScaling),
}

/// The YaRN parameters, with transformers' defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Explicit cos/sin factor; when absent it is derived from `factor`, `mscale`, `mscale_all_dim`.
    pub attention_factor: Option<f64>,
    /// Round the correction range to whole dimensions (transformers' default).
    pub truncate: bool,
}

/// YaRN's magnitude correction `0.1 · mscale · ln(scale) + 1` (1 when `scale ≤ 1`).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl YarnScaling {
    /// The factor cos/sin are multiplied by, as transformers derives it.
    pub fn cos_sin_factor(&self) -> f64 {
        if let Some(f) = self.attention_factor {
            return f;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                yarn_get_mscale(self.factor, m) / yarn_get_mscale(self.factor, all)
            }
            _ => yarn_get_mscale(self.factor, 1.0),
        }
    }
}

pub(super) fn parse_rope(raw: &RawConfig) -> Result<(f64, RopeScaling)> {
    // transformers 5 folds theta and scaling into `rope_parameters`; older configs split them.
    let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
    let theta = raw
        .rope_theta
        .or_else(|| {
            raw.rope_parameters
                .as_ref()
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10_000.0);
    let Some(params) = params.filter(|p| !p.is_null()) else {
        return Ok((theta, RopeScaling::None));
    };
    let rope_type = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => {
            let factor = params
                .get("factor")
                .and_then(Value::as_f64)
                .ok_or_else(|| {
                    EmberError::Config("linear rope scaling needs a numeric `factor`".into())
                })?;
            RopeScaling::Linear { factor }
        }
        "yarn" => {
            let num = |k: &str| params.get(k).and_then(Value::as_f64);
            let factor = num("factor").ok_or_else(|| {
                EmberError::Config("yarn rope scaling needs a numeric `factor`".into())
            })?;
            let original = params
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .or(raw.max_position_embeddings.map(|m| m as u64))
                .ok_or_else(|| {
                    EmberError::Config(
                        "yarn rope scaling needs `original_max_position_embeddings`".into(),
                    )
                })? as usize;
            RopeScaling::Yarn(YarnScaling {
                factor,
                original_max_position_embeddings: original,
                // transformers treats 0 / null as "use the default" (`or 32`, `or 1`).
                beta_fast: num("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: num("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0),
                mscale: num("mscale"),
                mscale_all_dim: num("mscale_all_dim"),
                attention_factor: num("attention_factor"),
                truncate: params
                    .get("truncate")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            })
        }
        other => {
            return Err(EmberError::Config(format!(
                "rope_type {other:?} is not supported yet; supported: default, linear, yarn"
            )))
        }
    };
    Ok((theta, scaling))
}
