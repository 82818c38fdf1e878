//! Collectives between the ranks of a tensor- or expert-parallel group.
//!
//! [`Communicator`] is what sharded layers call (one all-reduce per block for tensor parallelism,
//! all-to-all for expert dispatch). [`ThreadGroup`] implements it for ranks that are threads of
//! one process over CPU tensors, so every parallel code path runs in CI; NCCL implements the
//! same trait on GPUs. Reductions add in rank order, so every rank gets bit-identical results.

pub mod eplb;
pub mod flat;
pub mod memory_plan;
#[cfg(feature = "cuda")]
pub mod nccl;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use candle_core::{Device, Result, Tensor};

/// The collectives one rank of a group takes part in. Every rank of the group must make the same
/// calls in the same order; a rank that fails calls [`Communicator::abort`] so the others return
/// an error instead of waiting for it forever.
pub trait Communicator: Send + Sync {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn world_size(&self) -> usize;

    /// The element-wise sum of every rank's `tensor` (same shape everywhere), on every rank.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor>;

    /// Every rank's `tensor` concatenated along `dim` in rank order, on every rank.
    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor>;

    /// [`Communicator::all_gather`] where the caller knows every rank's `tensor` has the same
    /// shape (an even split, such as the vocabulary-parallel logits): a backend may then skip
    /// learning the others' shapes (NCCL's header exchange, a host read).
    fn all_gather_equal(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        self.all_gather(tensor, dim)
    }

    /// The sum of every rank's `tensor`, split evenly along `dim`: rank r keeps the r-th piece.
    fn reduce_scatter_sum(&self, tensor: &Tensor, dim: usize) -> Result<Tensor>;

    /// `send[r]` goes to rank r (any shape, possibly empty); the result's entry r is what rank r
    /// sent to this one.
    fn all_to_all(&self, send: Vec<Tensor>) -> Result<Vec<Tensor>>;

    /// `root`'s `tensor` on every rank (other ranks pass `None`).
    fn broadcast(&self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor>;

    /// Marks the group failed: collectives waiting now or later return an error naming `reason`.
    fn abort(&self, reason: &str);
}

/// Where one rank sits in a sharded model: its collectives, and how its layers are split.
/// Handed to the layers in their [`crate::loading::context::LoadContext`]; every layer that shards
/// reads its slice of the checkpoint by it.
#[derive(Clone)]
pub struct RankContext {
    pub comm: Arc<dyn Communicator>,
    /// `--enable-expert-parallel`: routed experts are partitioned across the ranks (tokens sent
    /// to their experts' owners by all-to-all) instead of each expert being split like an MLP.
    pub expert_parallel: bool,
    /// `--num-redundant-experts`: extra expert slots over the expert-parallel ranks, holding
    /// copies of the hottest experts (see [`crate::parallel::eplb::ExpertPlacement`]).
    pub redundant_experts: usize,
    /// `--data-parallel-size`: the ranks run different sequences (each its own share of a
    /// step, attending over its own KV cache) with every layer whole, and meet only in the
    /// routed experts when those are partitioned (`expert_parallel`).
    pub data_parallel: bool,
    /// Under expert parallelism over tensor-parallel replicas (`--data-parallel-size` with
    /// `--tensor-parallel-size`): every rank of every replica, over which the experts are
    /// partitioned and the tokens dispatched, while `comm` is the rank's replica.
    pub experts_comm: Option<Arc<dyn Communicator>>,
}

impl RankContext {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// This rank's even share `start..start + len` of `n` items (heads, channels, vocabulary
    /// rows), or an error naming `what` when `n` does not split evenly.
    pub fn even_share(&self, n: usize, what: &str) -> ember_core::Result<(usize, usize)> {
        even_share(n, self.rank(), self.world_size(), what)
    }
}

/// Expert slots each of `world` expert-parallel ranks holds: `experts` routed experts plus
/// `redundant` copies (`--num-redundant-experts`), which must split evenly.
pub fn expert_slots_per_rank(
    experts: usize,
    redundant: usize,
    world: usize,
) -> ember_core::Result<usize> {
    let slots = experts + redundant;
    if world == 0 || !slots.is_multiple_of(world) {
        let copies = if redundant > 0 {
            format!(" plus {redundant} redundant copies")
        } else {
            String::new()
        };
        return Err(ember_core::EmberError::Config(format!(
            "the {experts} routed experts{copies} do not split evenly over {world} expert-parallel ranks"
        )));
    }
    Ok(slots / world)
}

/// One rank's part of a projection `[out, in]` under tensor parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Output channels `start..start + len` (column-parallel: q/k/v, gate/up).
    Columns { start: usize, len: usize },
    /// Input channels `start..start + len` (row-parallel: o_proj, down_proj); partial sums.
    Rows { start: usize, len: usize },
}

impl Split {
    /// The weight's dimension and range the split takes.
    pub fn range(self) -> (usize, usize, usize) {
        match self {
            Split::Columns { start, len } => (0, start, len),
            Split::Rows { start, len } => (1, start, len),
        }
    }
}

/// Rank `rank`'s share `(start, len)` of `n` items split evenly over `world` ranks.
pub fn even_share(
    n: usize,
    rank: usize,
    world: usize,
    what: &str,
) -> ember_core::Result<(usize, usize)> {
    if world == 0 || !n.is_multiple_of(world) {
        return Err(ember_core::EmberError::Config(format!(
            "{what} ({n}) does not split evenly over {world} ranks; choose a parallel size that divides it"
        )));
    }
    let len = n / world;
    Ok((rank * len, len))
}

/// Rank `rank`'s contiguous share of `n` rows when they need not split evenly (the tokens of a
/// step): the first `n % world` ranks take one more.
pub fn uneven_share(n: usize, rank: usize, world: usize) -> (usize, usize) {
    let (base, extra) = (n / world, n % world);
    (
        rank * base + rank.min(extra),
        base + usize::from(rank < extra),
    )
}

/// Which of `kv_heads` key/value heads a rank of `world` attends with: an even share when there
/// are at least as many heads as ranks, else the one head its group of `world / kv_heads` ranks
/// shares (replicated, as vLLM does). `(first head, heads)`.
pub fn kv_head_share(
    kv_heads: usize,
    rank: usize,
    world: usize,
) -> ember_core::Result<(usize, usize)> {
    if kv_heads >= world {
        return even_share(kv_heads, rank, world, "num_key_value_heads");
    }
    if !world.is_multiple_of(kv_heads) {
        return Err(ember_core::EmberError::Config(format!(
            "{kv_heads} key/value heads cannot be replicated evenly over {world} ranks; choose a              tensor parallel size that divides or is a multiple of num_key_value_heads"
        )));
    }
    Ok((rank / (world / kv_heads), 1))
}

/// How long a rank waits for the others before the group is declared failed.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A group of ranks that are threads of this process; hand one [`ThreadRank`] to each thread.
pub struct ThreadGroup;

impl ThreadGroup {
    /// `world_size` ranks sharing one exchange.
    pub fn ranks(world_size: usize) -> Vec<ThreadRank> {
        Self::with_timeout(world_size, DEFAULT_TIMEOUT)
    }

    /// One rank per device of `devices` (rank r on `devices[r]`): what each rank receives is
    /// copied to its device. Ranks on different GPUs without NCCL exchange through the host.
    pub fn on_devices(devices: &[Device]) -> Vec<ThreadRank> {
        let mut ranks = Self::ranks(devices.len());
        for (rank, device) in ranks.iter_mut().zip(devices) {
            rank.device = Some(device.clone());
        }
        ranks
    }

    /// [`Self::ranks`] where a rank gives up on the others after `timeout`.
    pub fn with_timeout(world_size: usize, timeout: Duration) -> Vec<ThreadRank> {
        let exchange = Arc::new(Exchange {
            state: Mutex::new(State {
                slots: vec![None; world_size],
                arrived: 0,
                departed: 0,
                generation: 0,
                failed: None,
            }),
            changed: Condvar::new(),
            world_size,
            timeout,
        });
        (0..world_size)
            .map(|rank| ThreadRank {
                rank,
                exchange: exchange.clone(),
                device: None,
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`].
pub struct ThreadRank {
    rank: usize,
    exchange: Arc<Exchange>,
    /// Where this rank's results go, when the ranks are on different devices.
    device: Option<Device>,
}

struct Exchange {
    state: Mutex<State>,
    changed: Condvar,
    world_size: usize,
    timeout: Duration,
}

/// One collective at a time: every rank puts its contribution in its slot, waits until all have,
/// reads all slots, and the last to leave clears them for the next collective.
struct State {
    slots: Vec<Option<Vec<Tensor>>>,
    arrived: usize,
    departed: usize,
    /// Counts finished collectives, so a waiter knows its own one completed.
    generation: u64,
    failed: Option<String>,
}

fn group_error(reason: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("the parallel group failed: {reason}"))
}

impl Exchange {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the condition until `done` holds, the group fails or the timeout passes.
    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        what: &str,
        done: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            if let Some(reason) = &state.failed {
                return Err(group_error(reason));
            }
            if done(&state) {
                return Ok(state);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                let reason = format!("a rank waited {:?} for the others at {what}", self.timeout);
                state.failed = Some(reason.clone());
                self.changed.notify_all();
                return Err(group_error(&reason));
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Deposits `mine` as `rank`'s contribution and returns every rank's, in rank order.
    fn exchange(&self, rank: usize, mine: Vec<Tensor>, what: &str) -> Result<Vec<Vec<Tensor>>> {
        let mut state = self.lock();
        // A rank fast enough to start the next collective waits for the last one to empty.
        state = self.wait_until(state, what, |s| s.departed == 0 && s.slots[rank].is_none())?;
        let generation = state.generation;
        state.slots[rank] = Some(mine);
        state.arrived += 1;
        if state.arrived == self.world_size {
            self.changed.notify_all();
        }
        state = self.wait_until(state, what, |s| {
            s.arrived == self.world_size || s.generation != generation
        })?;
        let all: Vec<Vec<Tensor>> = state.slots.iter().flatten().cloned().collect();
        state.departed += 1;
        if state.departed == self.world_size {
            state.slots.iter_mut().for_each(|slot| *slot = None);
            state.arrived = 0;
            state.departed = 0;
            state.generation += 1;
            self.changed.notify_all();
        }
        Ok(all)
    }
}

impl ThreadRank {
    /// Every rank's contribution, in rank order, on this rank's device.
    fn gather(&self, mine: Vec<Tensor>, what: &str) -> Result<Vec<Vec<Tensor>>> {
        let all = self.exchange.exchange(self.rank, mine, what)?;
        match &self.device {
            None => Ok(all),
            Some(device) => all
                .into_iter()
                .map(|sent| sent.iter().map(|t| t.to_device(device)).collect())
                .collect(),
        }
    }
}

/// Adds tensors in order (the same order on every rank, so the sums are bit-identical).
fn sum_in_order(tensors: impl IntoIterator<Item = Tensor>) -> Result<Tensor> {
    let mut tensors = tensors.into_iter();
    let Some(first) = tensors.next() else {
        return Err(candle_core::Error::Msg("a collective over no ranks".into()));
    };
    tensors.try_fold(first, |acc, t| acc + t)
}

impl Communicator for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.exchange.world_size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let all = self.gather(vec![tensor.clone()], "all_reduce")?;
        sum_in_order(all.into_iter().flatten())
    }

    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        let all: Vec<Tensor> = self
            .gather(vec![tensor.clone()], "all_gather")?
            .into_iter()
            .flatten()
            .collect();
        Tensor::cat(&all, dim)
    }

    fn reduce_scatter_sum(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        let n = self.world_size();
        let len = tensor.dim(dim)?;
        if len % n != 0 {
            return Err(candle_core::Error::Msg(format!(
                "reduce_scatter: dim {dim} of size {len} does not split over {n} ranks"
            )));
        }
        let piece = len / n;
        let all = self.gather(vec![tensor.clone()], "reduce_scatter")?;
        let mine = all
            .into_iter()
            .flatten()
            .map(|t| t.narrow(dim, self.rank * piece, piece));
        sum_in_order(mine.collect::<Result<Vec<_>>>()?)
    }

    fn all_to_all(&self, send: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let n = self.world_size();
        if send.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "all_to_all: {} tensors for {n} ranks",
                send.len()
            )));
        }
        let all = self.gather(send, "all_to_all")?;
        Ok(all
            .into_iter()
            .map(|sent| sent[self.rank].clone())
            .collect())
    }

    fn broadcast(&self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let mine: Vec<Tensor> = tensor.into_iter().cloned().collect();
        if (self.rank == root) != (mine.len() == 1) {
            let reason = format!("broadcast: rank {} disagrees about root {root}", self.rank);
            self.abort(&reason);
            return Err(group_error(&reason));
        }
        let mut all = self.gather(mine, "broadcast")?;
        all.swap_remove(root)
            .pop()
            .ok_or_else(|| group_error("broadcast: the root sent nothing"))
    }

    fn abort(&self, reason: &str) {
        let mut state = self.exchange.lock();
        state
            .failed
            .get_or_insert_with(|| format!("rank {}: {reason}", self.rank));
        self.exchange.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// Runs `f` on every rank of a group of `n` threads and returns the results in rank order.
    fn on_ranks<T: Send>(n: usize, f: impl Fn(&ThreadRank) -> Result<T> + Sync) -> Vec<Result<T>> {
        let ranks = ThreadGroup::with_timeout(n, Duration::from_secs(20));
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks.iter().map(|r| s.spawn(|| f(r))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// A fresh random tensor per (rank, salt).
    fn random(rank: usize, salt: usize, shape: &[usize]) -> Tensor {
        let t = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
        // randn is seeded per thread; mix in the rank so ranks differ even if seeds collide.
        (t + (rank * 7 + salt) as f64).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn collectives_agree_with_their_definitions_on_2_3_and_4_ranks() {
        for n in [2, 3, 4] {
            let results = on_ranks(n, |r| {
                let mut out = Vec::new();
                for round in 0..5 {
                    let x = random(r.rank(), round, &[4, 6]);
                    let sum = r.all_reduce_sum(&x)?;
                    let gathered = r.all_gather(&x, 1)?;
                    // n copies of x stacked: rank r's piece of the sum is the sum of the x's.
                    let copies = vec![&x; n];
                    let scattered = r.reduce_scatter_sum(&Tensor::cat(&copies, 0)?, 0)?;
                    let sent: Vec<Tensor> = (0..n)
                        .map(|to| {
                            Tensor::full((r.rank() * 10 + to) as f32, (to + 1,), &Device::Cpu)
                        })
                        .collect::<Result<_>>()?;
                    let received = r.all_to_all(sent)?;
                    let root = round % n;
                    let b = r.broadcast((r.rank() == root).then_some(&x), root)?;
                    out.push((x, sum, gathered, scattered, received, b));
                }
                Ok(out)
            });
            let results: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
            for round in 0..5 {
                let xs: Vec<&Tensor> = results.iter().map(|r| &r[round].0).collect();
                let mut expected = xs[0].clone();
                for x in &xs[1..] {
                    expected = (expected + *x).unwrap();
                }
                let gathered = Tensor::cat(&xs, 1).unwrap();
                for (rank, r) in results.iter().enumerate() {
                    let (_, sum, g, scattered, received, b) = &r[round];
                    // Bit-identical on every rank: the sum is taken in rank order.
                    assert_eq!(values(sum), values(&expected), "n {n} rank {rank}");
                    assert_eq!(values(g), values(&gathered));
                    assert_eq!(values(scattered), values(&expected));
                    for (from, t) in received.iter().enumerate() {
                        assert_eq!(values(t), vec![(from * 10 + rank) as f32; rank + 1]);
                    }
                    assert_eq!(values(b), values(xs[round % n]));
                }
            }
        }
    }

    #[test]
    fn a_failing_rank_releases_the_others_with_its_reason() {
        let results = on_ranks(3, |r| {
            let x = Tensor::ones((2,), DType::F32, &Device::Cpu)?;
            r.all_reduce_sum(&x)?;
            if r.rank() == 1 {
                r.abort("out of memory");
                return Err(candle_core::Error::Msg("rank 1 stopped".into()));
            }
            // The others are in the next collective when rank 1 gives up.
            r.all_reduce_sum(&x)
        });
        for (rank, result) in results.iter().enumerate() {
            let message = result.as_ref().unwrap_err().to_string();
            if rank != 1 {
                assert!(message.contains("rank 1: out of memory"), "{message}");
            }
        }
    }

    #[test]
    fn a_rank_that_never_comes_times_out_instead_of_hanging() {
        let ranks = ThreadGroup::with_timeout(2, Duration::from_millis(200));
        let x = Tensor::ones((2,), DType::F32, &Device::Cpu).unwrap();
        let error = ranks[0].all_reduce_sum(&x).unwrap_err().to_string();
        assert!(error.contains("waited"), "{error}");
        // The group stays failed for everyone.
        assert!(ranks[1].all_reduce_sum(&x).is_err());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let results = on_ranks(2, |r| {
            let odd = Tensor::ones((3, 2), DType::F32, &Device::Cpu)?;
            assert!(r.reduce_scatter_sum(&odd, 0).is_err());
            assert!(r.all_to_all(vec![odd.clone()]).is_err());
            Ok(())
        });
        assert!(results.iter().all(|r| r.is_ok()));
    }
}
