//! Which adapter each row of a batch uses, grouped by adapter, and the segmented low-rank
//! update `scaling · (x Aᵀ) Bᵀ` added to the rows of each.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::lora::LoraAdapter;
use crate::parallel::Split;
use crate::TensorResult;

/// Which adapter each row of a projection's input uses, grouped by adapter.
#[derive(Debug, Clone, Default)]
pub struct LoraRows {
    /// Adapter index of each row (`NO_ADAPTER` for the base model), for [`LoraRows::select`].
    row_adapter: Vec<u16>,
    adapters: Vec<Arc<LoraAdapter>>,
    groups: Vec<LoraGroup>,
    /// On a data-parallel rank, the whole step's rows (host side) and each of this rank's rows'
    /// index among them: expert-parallel rows travel with their step index, which the experts'
    /// owner resolves here (see [`LoraRows::step_row`]).
    step: Option<Arc<(LoraRows, Vec<u32>)>>,
}

#[derive(Debug, Clone)]
struct LoraGroup {
    adapter: usize,
    rows: GroupRows,
}

#[derive(Debug, Clone)]
enum GroupRows {
    /// `start..start + len`.
    Range(usize, usize),
    /// `[n]` u32 row indices, and the same on the host.
    Indices(Tensor),
}

/// Row marker for the base model in [`LoraRows`].
pub const NO_ADAPTER: u16 = u16::MAX;

impl LoraRows {
    /// No adapter on any row.
    pub fn none() -> Self {
        Self::default()
    }

    /// Rows using `adapters[row_adapter[i]]`, or none where `row_adapter[i] == NO_ADAPTER`.
    pub fn new(
        adapters: Vec<Arc<LoraAdapter>>,
        row_adapter: Vec<u16>,
        device: &Device,
    ) -> TensorResult<Self> {
        let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); adapters.len()];
        for (row, &a) in row_adapter.iter().enumerate() {
            if a != NO_ADAPTER {
                rows_of[a as usize].push(row as u32);
            }
        }
        let mut groups = Vec::new();
        for (adapter, rows) in rows_of.into_iter().enumerate() {
            let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
                continue;
            };
            let rows = if (last - first) as usize + 1 == rows.len() {
                GroupRows::Range(first as usize, rows.len())
            } else {
                // Staged like the step's other metadata: an asynchronous copy.
                GroupRows::Indices(crate::device::kernels::upload(rows, device)?)
            };
            groups.push(LoraGroup { adapter, rows });
        }
        Ok(Self {
            row_adapter,
            adapters,
            groups,
            step: None,
        })
    }

    /// All `rows` rows use `adapter`.
    pub fn uniform(adapter: &Arc<LoraAdapter>, rows: usize) -> Self {
        Self {
            row_adapter: vec![0; rows],
            adapters: vec![adapter.clone()],
            groups: vec![LoraGroup {
                adapter: 0,
                rows: GroupRows::Range(0, rows),
            }],
            step: None,
        }
    }

    /// Whether no row uses an adapter (projections then cost exactly the base GEMM).
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether a row's adapter adapts the projection at `path`.
    pub fn adapts(&self, path: &str) -> bool {
        self.groups
            .iter()
            .any(|g| self.adapters[g.adapter].modules.contains_key(path))
    }

    /// Whether a row's adapter adapts a projection under the module path `prefix` (a layer's
    /// experts, `model.layers.3.mlp.experts`).
    pub fn adapts_under(&self, prefix: &str) -> bool {
        self.groups
            .iter()
            .any(|g| self.adapters[g.adapter].prefixes.contains(prefix))
    }

    /// The same rows, with their index tensors on `device` (a rank's copy of a step).
    pub fn to_device(&self, device: &Device) -> TensorResult<Self> {
        let mut rows = if self.is_empty() {
            Self::none()
        } else {
            Self::new(self.adapters.clone(), self.row_adapter.clone(), device)?
        };
        rows.step = self.step.clone();
        Ok(rows)
    }

    /// These rows as a data-parallel rank's share of a step whose rows are `step`: this rank's
    /// row i is the step's row `step_rows[i]`.
    pub fn within_step(self, step: &LoraRows, step_rows: Vec<u32>) -> Self {
        let whole = LoraRows {
            row_adapter: step.row_adapter.clone(),
            adapters: step.adapters.clone(),
            groups: Vec::new(),
            step: None,
        };
        Self {
            step: Some(Arc::new((whole, step_rows))),
            ..self
        }
    }

    /// Row `row`'s index in the step: itself, or its index in the whole step on a
    /// data-parallel rank.
    pub fn step_row(&self, row: u32) -> u32 {
        match &self.step {
            Some(step) => step.1[row as usize],
            None => row,
        }
    }

    /// [`LoraRows::select`] of step rows (from [`LoraRows::step_row`], possibly another
    /// rank's).
    pub fn select_step_rows(&self, rows: &[u32], device: &Device) -> TensorResult<Self> {
        match &self.step {
            Some(step) if !step.0.adapters.is_empty() => {
                let row_adapter = rows
                    .iter()
                    .map(|&r| step.0.row_adapter[r as usize])
                    .collect();
                Self::new(step.0.adapters.clone(), row_adapter, device)
            }
            Some(_) => Ok(Self::none()),
            None => self.select(rows, device),
        }
    }

    /// The rows `rows` of this set, renumbered `0..rows.len()` (the tokens routed to one expert).
    pub fn select(&self, rows: &[u32], device: &Device) -> TensorResult<Self> {
        if self.is_empty() {
            return Ok(Self::none());
        }
        let row_adapter = rows.iter().map(|&r| self.row_adapter[r as usize]).collect();
        Self::new(self.adapters.clone(), row_adapter, device)
    }

    /// `y + Σ_adapters scaling · (x_rows Aᵀ) Bᵀ` for the projection at `path`, over the rows of
    /// each adapter that adapts it. `x` is `[rows, in]`, `y` the base output `[rows, out]`.
    pub fn apply(&self, path: &str, x: &Tensor, y: Tensor, split: Option<Split>) -> TensorResult {
        let mut y = y;
        let mut scattered: Vec<(Tensor, Tensor)> = Vec::new();
        for group in &self.groups {
            let Some(factors) = self.adapters[group.adapter].factors(path) else {
                continue;
            };
            match &group.rows {
                GroupRows::Range(start, len) if *start == 0 && *len == x.dim(0)? => {
                    y = (y + factors.delta_part(x, split)?)?;
                }
                GroupRows::Range(start, len) => {
                    let delta = factors.delta_part(&x.narrow(0, *start, *len)?, split)?;
                    let rows = Tensor::arange(*start as u32, (*start + *len) as u32, x.device())?;
                    scattered.push((rows, delta));
                }
                GroupRows::Indices(rows) => {
                    let delta = factors.delta_part(&x.index_select(rows, 0)?, split)?;
                    scattered.push((rows.clone(), delta));
                }
            }
        }
        match scattered.len() {
            0 => Ok(y),
            1 => y.index_add(&scattered[0].0, &scattered[0].1, 0),
            _ => {
                let (rows, deltas): (Vec<Tensor>, Vec<Tensor>) = scattered.into_iter().unzip();
                y.index_add(&Tensor::cat(&rows, 0)?, &Tensor::cat(&deltas, 0)?, 0)
            }
        }
    }

    /// The adapter of row `row`, if any.
    pub fn adapter_of(&self, row: usize) -> Option<&Arc<LoraAdapter>> {
        let a = *self.row_adapter.get(row)?;
        (a != NO_ADAPTER).then(|| &self.adapters[a as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::adapter::module_prefixes;
    use crate::lora::LoraFactors;
    use std::collections::HashMap;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn adapter(id: u64, path: &str, rank: usize, seed: u64) -> Arc<LoraAdapter> {
        let factors = LoraFactors::new(random((6, rank), seed), random((rank, 5), seed + 1));
        let modules = HashMap::from([(path.to_string(), factors)]);
        Arc::new(LoraAdapter {
            id,
            name: format!("a{id}"),
            prefixes: module_prefixes(&modules),
            modules,
            max_rank: rank,
            num_parameters: 0,
        })
    }

    /// Mixed rows: each row's output equals the merged weight `W + Bᵀ·Aᵀ` of its own adapter
    /// (or W), whatever the grouping (ranges, scattered rows, base rows in between).
    #[test]
    fn mixed_rows_match_per_row_merged_weights() {
        let (x, w) = (random((7, 6), 1), random((6, 5), 2));
        let adapters = vec![
            adapter(1, "p", 2, 10),
            adapter(2, "p", 4, 20),
            adapter(3, "q", 3, 30),
        ];
        let row_adapter = vec![0, 0, NO_ADAPTER, 1, 0, 2, 1];
        let rows = LoraRows::new(adapters.clone(), row_adapter.clone(), &Device::Cpu).unwrap();
        let got = rows.apply("p", &x, x.matmul(&w).unwrap(), None).unwrap();
        for (row, &a) in row_adapter.iter().enumerate() {
            let merged = match a {
                // Adapter 2 targets "q", not "p": its rows get the base output.
                NO_ADAPTER | 2 => w.clone(),
                a => {
                    let f = adapters[a as usize].factors("p").unwrap();
                    (&w + f.a_t.matmul(&f.b_t).unwrap()).unwrap()
                }
            };
            let want = x.narrow(0, row, 1).unwrap().matmul(&merged).unwrap();
            let diff = (got.narrow(0, row, 1).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "row {row}: {diff}");
        }
        // Selecting rows (an expert's tokens) keeps each row's adapter.
        let sub = rows.select(&[5, 3, 2], &Device::Cpu).unwrap();
        assert_eq!(sub.adapter_of(0).unwrap().id(), 3);
        assert_eq!(sub.adapter_of(1).unwrap().id(), 2);
        assert!(sub.adapter_of(2).is_none());
        assert!(LoraRows::none()
            .select(&[0], &Device::Cpu)
            .unwrap()
            .is_empty());
    }
}
