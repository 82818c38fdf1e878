//! `GET /v1/models` and `GET /v1/models/{id}`: the base model under each served name, then
//! every registered LoRA adapter with the base model as its `parent`.

use axum::extract::{Path, State};
use axum::Json;
use ember_engine::LoraInfo;

use crate::api::{ModelCard, ModelList};
use crate::error::ApiError;
use crate::state::{AppState, ModelTarget};

fn card(state: &AppState, id: &str) -> ModelCard {
    let shared = state.shared();
    ModelCard {
        id: id.to_string(),
        object: "model".into(),
        created: shared.started,
        owned_by: "ember".into(),
        root: shared.config.model_dir.display().to_string(),
        parent: None,
        max_model_len: shared.engine.limits().max_model_len,
    }
}

/// An adapter's card: its own path and registration time, the canonical base name as parent.
fn adapter_card(state: &AppState, id: &str, info: &LoraInfo) -> ModelCard {
    ModelCard {
        root: info.path.display().to_string(),
        parent: state.served_model_names().first().cloned(),
        created: info.created,
        ..card(state, id)
    }
}

fn adapters(state: &AppState) -> Vec<LoraInfo> {
    state
        .shared()
        .engine
        .lora()
        .map(|m| m.list())
        .unwrap_or_default()
}

/// Every served name, then every adapter.
pub(crate) async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let base = state.served_model_names().iter().map(|n| card(&state, n));
    let adapters = adapters(&state);
    let lora = adapters.iter().map(|a| adapter_card(&state, &a.name, a));
    Json(ModelList {
        object: "list".into(),
        data: base.chain(lora).collect(),
    })
}

/// One model by id, which is echoed as asked; the id arrives percent-decoded, so
/// `accounts%2Fx%2Fmodels%2Fm` works too.
pub(crate) async fn retrieve_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    match state.resolve_model(&id)? {
        ModelTarget::Base => Ok(Json(card(&state, &id))),
        ModelTarget::Adapter(name) => adapters(&state)
            .iter()
            .find(|a| a.name == name)
            .map(|a| Json(adapter_card(&state, &id, a)))
            // Unloaded between the two looks.
            .ok_or_else(|| ApiError::model_not_found(&id, state.served_model_names())),
    }
}
