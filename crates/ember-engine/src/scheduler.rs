//! Decides what runs each step: running sequences decode first, then waiting ones are admitted
//! with (chunked) prefill within a token budget; when blocks run out the newest sequence is
//! preempted and recomputed later. Never touches tensors.
//!
//! Under `--data-parallel-size` each rank has its own KV cache: its own blocks, prefix cache,
//! token budget and sequence cap per step. A sequence is placed when it is admitted, on the rank
//! that caches most of its prompt, else the one with the most free blocks, and stays there until
//! it finishes or is preempted.

use std::collections::VecDeque;

use crate::kv_manager::KvBlockManager;
use crate::sequence::Sequence;

/// Limits of one step.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most tokens (prefill chunks plus decodes) in one forward.
    pub max_num_batched_tokens: usize,
    /// Most sequences in one forward.
    pub max_num_seqs: usize,
    pub block_size: usize,
    /// Reuse KV of identical prompt prefixes across requests.
    pub enable_prefix_caching: bool,
    /// Most distinct LoRA adapters among running sequences (`--max-loras`).
    pub max_loras: usize,
}

/// One sequence's share of a step: what the runner computes for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledSequence {
    pub request_id: u64,
    /// The tokens this step computes, at positions `num_computed..num_computed + token_ids.len()`.
    pub token_ids: Vec<u32>,
    /// Tokens whose K/V are already cached: the position of the first of `token_ids`.
    pub num_computed: usize,
    /// Its blocks of its rank's KV cache, covering every position through this step's.
    pub block_table: Vec<u32>,
    /// The data-parallel rank whose cache holds it (0 without data parallelism).
    pub dp_rank: usize,
}

/// What one step runs, as plain data (vLLM v1's `SchedulerOutput`): the scheduled sequences in
/// batch order, and the requests preempted to make room for them.
#[derive(Debug, Default, PartialEq)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSequence>,
    /// Requests whose blocks were freed this step; they wait to be computed again from scratch.
    pub preempted: Vec<u64>,
}

impl SchedulerOutput {
    /// Tokens the step computes, all sequences together.
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.token_ids.len()).sum()
    }
}

/// Waiting and running sequences plus the blocks they hold; everything else sees plain
/// [`SchedulerOutput`]s and request ids.
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<Sequence>,
    /// Oldest first; a step schedules them in this order, so its output is in this order too.
    running: Vec<Sequence>,
    /// Each data-parallel rank's blocks (one entry without data parallelism).
    kv: Vec<KvBlockManager>,
    /// Sequences preempted so far.
    num_preemptions: u64,
}

impl Scheduler {
    /// An empty scheduler over `num_blocks` cache blocks.
    pub fn new(cfg: SchedulerConfig, num_blocks: usize) -> Self {
        Self::with_ranks(cfg, num_blocks, 1)
    }

    /// An empty scheduler over `ranks` data-parallel ranks of `num_blocks` blocks each.
    pub fn with_ranks(cfg: SchedulerConfig, num_blocks: usize, ranks: usize) -> Self {
        let kv = (0..ranks.max(1))
            .map(|_| KvBlockManager::new(num_blocks, cfg.block_size, cfg.enable_prefix_caching))
            .collect();
        Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv,
            num_preemptions: 0,
        }
    }

    /// Queues a new request behind those already waiting.
    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    /// Whether anything is left to do.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Requests waiting to run (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests running (holding blocks).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences preempted so far.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Blocks of every rank, and how many are free.
    pub fn kv_blocks(&self) -> (usize, usize) {
        self.kv.iter().fold((0, 0), |(n, free), kv| {
            (n + kv.num_blocks(), free + kv.num_free())
        })
    }

    /// Prompt tokens looked up in the prefix caches of every rank, and how many were found.
    pub fn prefix_cache_stats(&self) -> (u64, u64) {
        self.kv.iter().fold((0, 0), |(q, h), kv| {
            let p = kv.stats();
            (q + p.queries, h + p.hits)
        })
    }

    /// Grows `seq`'s block table to cover `tokens` tokens; false when blocks ran out.
    fn reserve(kv: &mut KvBlockManager, seq: &mut Sequence, tokens: usize) -> bool {
        let need = kv.blocks_for(tokens).saturating_sub(seq.block_table.len());
        match kv.allocate(need) {
            Some(new) => {
                seq.block_table.extend(new);
                true
            }
            None => false,
        }
    }

    /// Frees a sequence's blocks and resets it to be computed again from scratch.
    fn preempt(&mut self, index: usize) -> u64 {
        let mut seq = self.running.remove(index);
        self.kv[seq.dp_rank].free(&seq.block_table);
        seq.block_table.clear();
        seq.block_hashes.clear();
        seq.num_computed = 0;
        self.num_preemptions += 1;
        tracing::debug!(request = seq.id, "preempted; will recompute");
        let id = seq.id;
        self.waiting.push_front(seq);
        id
    }

    /// Removes the running sequences at `indices`, freeing their blocks, newest first.
    fn finish_at(&mut self, mut indices: Vec<usize>) -> Vec<Sequence> {
        indices.sort_unstable();
        indices.dedup();
        let mut done = Vec::with_capacity(indices.len());
        for &i in indices.iter().rev() {
            let seq = self.running.remove(i);
            self.kv[seq.dp_rank].free(&seq.block_table);
            done.push(seq);
        }
        done
    }

    /// Removes and returns the running requests `ids`, freeing their blocks.
    pub fn finish(&mut self, ids: &[u64]) -> Vec<Sequence> {
        let indices = (0..self.running.len())
            .filter(|&i| ids.contains(&self.running[i].id))
            .collect();
        self.finish_at(indices)
    }

    /// Drops the requests whose clients went away, waiting or running (freeing their blocks);
    /// returns their ids.
    pub fn abort_abandoned(&mut self) -> Vec<u64> {
        let mut gone = Vec::new();
        self.waiting.retain(|s| {
            let keep = !s.is_abandoned();
            if !keep {
                gone.push(s.id);
            }
            keep
        });
        let running = (0..self.running.len())
            .filter(|&i| self.running[i].is_abandoned())
            .collect();
        gone.extend(self.finish_at(running).iter().map(|s| s.id));
        gone
    }

    /// Removes every request, running (freeing its blocks) and waiting, as when the engine stops.
    pub fn drain(&mut self) -> Vec<Sequence> {
        let mut all = self.finish_at((0..self.running.len()).collect());
        all.extend(self.waiting.drain(..));
        all
    }

    /// When nothing runs, removes the head waiting request: a step that scheduled nothing with
    /// every block free shows it needs more blocks than the cache has.
    pub fn take_unservable(&mut self) -> Option<Sequence> {
        if self.running.is_empty() {
            self.waiting.pop_front()
        } else {
            None
        }
    }

    /// For a sequence starting from scratch, takes the cached blocks of its longest known
    /// prefix; returns how many tokens they hold.
    fn take_cached_prefix(&mut self, seq: &mut Sequence) -> usize {
        if seq.num_computed > 0 || !seq.block_table.is_empty() || !seq.may_use_prefix_cache() {
            return 0;
        }
        let kv = &mut self.kv[seq.dp_rank];
        let (blocks, hashes) = kv.find_cached_prefix(&seq.tokens(0, seq.len()), seq.adapter_id());
        kv.acquire(&blocks);
        let tokens = blocks.len() * kv.block_size();
        seq.block_table = blocks;
        seq.block_hashes = hashes;
        seq.num_computed = tokens;
        if seq.output.is_empty() {
            seq.num_cached_tokens = tokens;
        }
        tokens
    }

    /// Undoes [`Self::take_cached_prefix`] when the sequence cannot be admitted after all.
    fn release_cached_prefix(&mut self, seq: &mut Sequence, hit: usize) {
        if hit == 0 {
            return;
        }
        self.kv[seq.dp_rank].free(&seq.block_table);
        seq.block_table.clear();
        seq.block_hashes.clear();
        seq.num_computed = 0;
        seq.num_cached_tokens = 0;
    }

    /// Registers the newly filled blocks of running sequence `index` in the prefix cache.
    fn cache_computed_blocks(&mut self, index: usize) {
        let seq = &mut self.running[index];
        let kv = &mut self.kv[seq.dp_rank];
        let full = seq.num_computed / kv.block_size();
        if full <= seq.block_hashes.len() {
            return;
        }
        let tokens = seq.tokens(0, full * kv.block_size());
        let adapter = seq.adapter_id();
        kv.cache_full_blocks(&seq.block_table, &mut seq.block_hashes, &tokens, adapter);
    }

    /// Positions in `running` of `out`'s sequences still running, in output order (the order
    /// of `running`, which a step schedules in).
    fn positions(&self, out: &SchedulerOutput) -> Vec<usize> {
        let mut ids = out.scheduled.iter().map(|s| s.request_id).peekable();
        (0..self.running.len())
            .filter(|&i| ids.next_if_eq(&self.running[i].id).is_some())
            .collect()
    }

    /// The requests of `out` still running, in output order, for the engine to sample and
    /// advance.
    pub fn scheduled_mut(&mut self, out: &SchedulerOutput) -> Vec<&mut Sequence> {
        let mut positions = self.positions(out).into_iter().peekable();
        self.running
            .iter_mut()
            .enumerate()
            .filter_map(|(i, seq)| positions.next_if_eq(&i).map(|_| seq))
            .collect()
    }

    /// Ends a step once its sequences have advanced: registers the blocks they filled in the
    /// prefix cache, then finishes the requests `finished`, freeing their blocks.
    pub fn update_from_output(&mut self, out: &SchedulerOutput, finished: &[u64]) {
        for i in self.positions(out) {
            self.cache_computed_blocks(i);
        }
        self.finish(finished);
    }

    /// What running sequence `index` runs this step: its next `n` tokens.
    fn scheduled(&self, index: usize, n: usize) -> ScheduledSequence {
        let seq = &self.running[index];
        ScheduledSequence {
            request_id: seq.id,
            token_ids: seq.tokens(seq.num_computed, seq.num_computed + n),
            num_computed: seq.num_computed,
            block_table: seq.block_table.clone(),
            dp_rank: seq.dp_rank,
        }
    }

    /// Schedules the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let ranks = self.kv.len();
        // Each rank's token budget and sequences this step.
        let mut budget = vec![self.cfg.max_num_batched_tokens; ranks];
        let mut out = SchedulerOutput::default();
        // Running sequences first, oldest first; when a rank's blocks run out, preempt its
        // newest sequence.
        let mut i = 0;
        while i < self.running.len() {
            let rank = self.running[i].dp_rank;
            if budget[rank] == 0 {
                i += 1;
                continue;
            }
            let pending = self.running[i].len() - self.running[i].num_computed;
            let n = pending.min(budget[rank]);
            let target = self.running[i].num_computed + n;
            if Self::reserve(&mut self.kv[rank], &mut self.running[i], target) {
                out.scheduled.push(self.scheduled(i, n));
                budget[rank] -= n;
                i += 1;
                continue;
            }
            // The newest on this rank, at `i` or after it (what is scheduled so far stays).
            let newest = (i..self.running.len())
                .rev()
                .find(|&j| self.running[j].dp_rank == rank)
                .unwrap_or(i);
            out.preempted.push(self.preempt(newest));
            // Preempting `i` itself moves the next sequence to `i`.
        }
        // Then admit waiting sequences while the budget, the sequence cap and the blocks allow.
        // A sequence whose adapter would exceed max_loras distinct adapters waits, and the ones
        // behind it may go first (as vLLM does), keeping their order otherwise.
        let mut adapters: Vec<u64> = Vec::new();
        let mut seqs_on = vec![0usize; ranks];
        for seq in &self.running {
            seqs_on[seq.dp_rank] += 1;
            if seq.adapter.is_some() && !adapters.contains(&seq.adapter_id()) {
                adapters.push(seq.adapter_id());
            }
        }
        let mut skipped: VecDeque<Sequence> = VecDeque::new();
        while (0..ranks).any(|r| budget[r] > 0 && seqs_on[r] < self.cfg.max_num_seqs) {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            // The rank with room that caches most of its prompt, then the one with the most
            // free blocks, then the fewest sequences.
            let cached = |r: usize| match ranks {
                1 => 0,
                _ if seq.may_use_prefix_cache() => {
                    self.kv[r].cached_prefix_blocks(&seq.tokens(0, seq.len()), seq.adapter_id())
                }
                _ => 0,
            };
            let rank = (0..ranks)
                .filter(|&r| budget[r] > 0 && seqs_on[r] < self.cfg.max_num_seqs)
                .max_by_key(|&r| {
                    (
                        cached(r),
                        self.kv[r].num_free(),
                        std::cmp::Reverse(seqs_on[r]),
                        std::cmp::Reverse(r),
                    )
                })
                .unwrap_or(0);
            let adapter = seq.adapter_id();
            if seq.adapter.is_some() && !adapters.contains(&adapter) {
                if adapters.len() >= self.cfg.max_loras {
                    skipped.push_back(seq);
                    continue;
                }
                adapters.push(adapter);
            }
            // A waiting sequence holds no blocks (new, or preempted and freed): it may move.
            if seq.block_table.is_empty() {
                seq.dp_rank = rank;
            }
            let rank = seq.dp_rank;
            let hit = self.take_cached_prefix(&mut seq);
            let n = (seq.len() - seq.num_computed).min(budget[rank]);
            let target = seq.num_computed + n;
            if !Self::reserve(&mut self.kv[rank], &mut seq, target) {
                self.release_cached_prefix(&mut seq, hit);
                self.waiting.push_front(seq);
                break;
            }
            self.running.push(seq);
            out.scheduled
                .push(self.scheduled(self.running.len() - 1, n));
            budget[rank] -= n;
            seqs_on[rank] += 1;
        }
        while let Some(seq) = skipped.pop_back() {
            self.waiting.push_front(seq);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_core::{EngineRequest, SamplingParams};

    fn cfg(budget: usize, max_seqs: usize, block_size: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: max_seqs,
            block_size,
            enable_prefix_caching: true,
            max_loras: 8,
        }
    }

    fn seq(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Sequence {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Keep the receiver alive for the test's duration: the scheduler never looks at it.
        std::mem::forget(rx);
        Sequence::new(EngineRequest {
            id,
            prompt_token_ids: prompt,
            params: SamplingParams::greedy(max_tokens),
            eos_token_ids: vec![],
            lora_name: None,
            output: tx,
        })
    }

    /// (request id, tokens) of each scheduled sequence, in output order.
    fn chunks(out: &SchedulerOutput) -> Vec<(u64, usize)> {
        out.scheduled
            .iter()
            .map(|c| (c.request_id, c.token_ids.len()))
            .collect()
    }

    /// Plays the runner: marks the scheduled tokens computed, "samples" token 7 for caught-up
    /// sequences, finishes those at max_tokens. Returns the finished ids.
    fn run_step(s: &mut Scheduler, out: &SchedulerOutput) -> Vec<u64> {
        let mut done = Vec::new();
        for (seq, chunk) in s.scheduled_mut(out).into_iter().zip(&out.scheduled) {
            seq.num_computed += chunk.token_ids.len();
            if seq.num_computed == seq.len() {
                seq.output.push(7);
                if seq.output.len() >= seq.params.max_tokens {
                    done.push(seq.id);
                }
            }
        }
        s.update_from_output(out, &done);
        done
    }

    #[test]
    fn the_token_budget_chunks_long_prompts_and_decodes_go_first() {
        let mut s = Scheduler::new(cfg(8, 16, 4), 64);
        s.add(seq(1, vec![1; 3], 4));
        let out = s.schedule();
        assert_eq!(chunks(&out), vec![(1, 3)]);
        run_step(&mut s, &out);
        // A 20-token prompt arrives: the running decode takes 1 token, the prompt gets the rest.
        s.add(seq(2, vec![2; 20], 1));
        let out = s.schedule();
        assert_eq!(chunks(&out), vec![(1, 1), (2, 7)]);
        run_step(&mut s, &out);
        let out = s.schedule();
        assert_eq!(chunks(&out), vec![(1, 1), (2, 7)]);
        assert_eq!(out.num_tokens(), 8, "the budget is used, not exceeded");
    }

    /// Data-parallel ranks: sequences spread over the ranks by free blocks, each rank has its
    /// own token budget and blocks, and running out of blocks on one rank preempts only that
    /// rank's newest sequence.
    #[test]
    fn data_parallel_ranks_spread_sequences_and_preempt_within_a_rank() {
        // 2 ranks of 4 blocks of 2 tokens, 6 tokens a rank per step.
        let mut s = Scheduler::with_ranks(cfg(6, 8, 2), 4, 2);
        for id in 0..4 {
            s.add(seq(id, vec![id as u32 + 1; 4], 8));
        }
        let out = s.schedule();
        let ranks: Vec<usize> = s.running.iter().map(|q| q.dp_rank).collect();
        // Alternating by free blocks; each rank's budget of 6 takes one prompt and 2 of the next.
        assert_eq!(ranks, vec![0, 1, 0, 1]);
        assert_eq!(chunks(&out), vec![(0, 4), (1, 4), (2, 2), (3, 2)]);
        assert_eq!(s.kv_blocks(), (8, 2));
        run_step(&mut s, &out);
        // Sequences 0 and 1 take their ranks' last blocks; 2 and 3 then find none on their
        // ranks and give way (each its rank's newest), and neither fits back in this step.
        let out = s.schedule();
        let left: Vec<(u64, usize)> = s.running.iter().map(|q| (q.id, q.dp_rank)).collect();
        assert_eq!(left, vec![(0, 0), (1, 1)]);
        assert_eq!(chunks(&out), vec![(0, 1), (1, 1)]);
        assert_eq!(out.preempted, vec![2, 3]);
        assert_eq!(s.num_preemptions, 2);
        let waiting: Vec<u64> = s.waiting.iter().map(|q| q.id).collect();
        assert_eq!(waiting, vec![3, 2]);
    }

    /// A request whose prompt one rank already caches goes to that rank, though another has more
    /// free blocks, and takes its cached blocks there.
    #[test]
    fn data_parallel_placement_follows_the_prefix_cache() {
        let mut s = Scheduler::with_ranks(cfg(100, 8, 2), 8, 2);
        s.add(seq(0, vec![5, 6, 7, 8, 9], 3));
        let out = s.schedule();
        assert_eq!(s.running[0].dp_rank, 0);
        run_step(&mut s, &out);
        // Sequence 0 still runs on rank 0 (3 of its 8 blocks): rank 1 has more free blocks.
        s.add(seq(1, vec![1, 1, 1], 1));
        s.add(seq(2, vec![5, 6, 7, 8, 3], 1));
        s.schedule();
        let placed: Vec<(u64, usize)> = s.running.iter().map(|q| (q.id, q.dp_rank)).collect();
        // 1 goes to the emptier rank 1; 2 to rank 0, which caches its first two blocks.
        assert_eq!(placed, vec![(0, 0), (1, 1), (2, 0)]);
        assert_eq!(s.running[2].num_cached_tokens, 4);
        assert_eq!(s.kv[0].stats().hits, 4);
        assert_eq!(s.kv[1].stats().hits, 0);
    }

    #[test]
    fn the_sequence_cap_holds_back_admissions() {
        let mut s = Scheduler::new(cfg(100, 2, 4), 64);
        for id in 0..3 {
            s.add(seq(id, vec![1, 2], 5));
        }
        let out = s.schedule();
        assert_eq!(out.scheduled.len(), 2);
        assert_eq!(s.waiting.len(), 1);
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_and_recomputes_it() {
        // 4 blocks of 2 tokens: two 3-token prompts fit (2 blocks each) until they grow.
        let mut s = Scheduler::new(cfg(100, 8, 2), 4);
        s.add(seq(1, vec![1, 2, 3], 3));
        s.add(seq(2, vec![4, 5, 6], 3));
        let out = s.schedule();
        assert_eq!(chunks(&out), vec![(1, 3), (2, 3)]);
        run_step(&mut s, &out);
        // Both now hold 4 tokens: each needs no new block to decode position 3.
        let out = s.schedule();
        assert_eq!(chunks(&out), vec![(1, 1), (2, 1)]);
        run_step(&mut s, &out);
        // Position 4 needs a third block each: the newest (id 2) is preempted.
        let out = s.schedule();
        assert_eq!(chunks(&out), vec![(1, 1)]);
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(s.num_preemptions, 1);
        let preempted = s.waiting.front().unwrap();
        assert_eq!(
            (
                preempted.id,
                preempted.num_computed,
                preempted.block_table.len()
            ),
            (2, 0, 0)
        );
        let finished = run_step(&mut s, &out);
        assert_eq!(finished, vec![1]);
        // Sequence 2 is recomputed from scratch, prompt and outputs alike (prefix hits allowed).
        let out = s.schedule();
        let chunk = &out.scheduled[0];
        assert_eq!(chunk.request_id, 2);
        assert_eq!(chunk.num_computed + chunk.token_ids.len(), 5);
    }

    #[test]
    fn a_shared_prefix_is_computed_once_and_counted() {
        let mut s = Scheduler::new(cfg(100, 8, 4), 16);
        s.add(seq(1, (0..10).collect(), 1));
        let out = s.schedule();
        run_step(&mut s, &out);
        // Same first 8 tokens: two blocks come from the cache.
        let mut prompt: Vec<u32> = (0..8).collect();
        prompt.extend([50, 51, 52]);
        s.add(seq(2, prompt, 1));
        let out = s.schedule();
        assert_eq!(chunks(&out), vec![(2, 3)]);
        assert_eq!(s.running[0].num_cached_tokens, 8);
        run_step(&mut s, &out);
        assert_eq!(s.kv[0].stats().hits, 8);
    }

    #[test]
    fn no_block_leaks_after_finished_aborted_and_preempted_requests() {
        let mut s = Scheduler::new(cfg(16, 8, 2), 12);
        for id in 0..6 {
            s.add(seq(
                id,
                (0..(3 + id as u32)).map(|t| t * 10 + id as u32).collect(),
                4,
            ));
        }
        let mut steps = 0;
        while s.has_work() && steps < 200 {
            let out = s.schedule();
            run_step(&mut s, &out);
            // Abort one request midway, as a disconnecting client would.
            if steps == 3 && !s.running.is_empty() {
                let oldest = s.running[0].id;
                s.finish(&[oldest]);
            }
            steps += 1;
        }
        assert!(!s.has_work(), "did not drain in {steps} steps");
        assert!(s.num_preemptions > 0, "the test should exercise preemption");
        assert_eq!(
            s.kv[0].num_free(),
            12,
            "every block is free (cached or not) once all requests end"
        );
    }
}

#[cfg(test)]
mod lora_tests {
    use std::sync::Arc;

    use ember_core::{EngineRequest, SamplingParams};
    use ember_models::LoraAdapter;

    use super::*;
    use crate::lora::tests::{fixture, manager};
    use crate::lora::LoraConfig;

    /// The tiny attention adapter registered under each of `names` (distinct adapters).
    fn adapters(names: &[&str]) -> Vec<Arc<LoraAdapter>> {
        let m = manager(LoraConfig::default());
        names
            .iter()
            .map(|name| {
                m.load(name, &fixture("qwen3-tiny-attn-r8")).unwrap();
                m.get(name).unwrap()
            })
            .collect()
    }

    fn seq(id: u64, adapter: Option<&Arc<LoraAdapter>>) -> Sequence {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx);
        let request = EngineRequest {
            id,
            prompt_token_ids: vec![1, 2, 3],
            params: SamplingParams::greedy(4),
            eos_token_ids: vec![],
            lora_name: adapter.map(|a| a.name().to_string()),
            output: tx,
        };
        Sequence::with_adapter(request, adapter.cloned())
    }

    #[test]
    fn a_second_adapter_waits_under_max_loras_one_and_others_pass_it_in_order() {
        let a = adapters(&["a", "b"]);
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: 100,
                max_num_seqs: 16,
                block_size: 4,
                enable_prefix_caching: true,
                max_loras: 1,
            },
            64,
        );
        for (id, adapter) in [
            (1, Some(&a[0])),
            (2, Some(&a[1])),
            (3, None),
            (4, Some(&a[0])),
            (5, Some(&a[1])),
        ] {
            s.add(seq(id, adapter));
        }
        s.schedule();
        let running: Vec<u64> = s.running.iter().map(|q| q.id).collect();
        assert_eq!(running, vec![1, 3, 4]);
        let waiting: Vec<u64> = s.waiting.iter().map(|q| q.id).collect();
        assert_eq!(waiting, vec![2, 5], "skipped requests keep their order");
        // Once adapter 1's requests finish, adapter 2's run.
        s.finish(&[1, 4]);
        s.schedule();
        let running: Vec<u64> = s.running.iter().map(|q| q.id).collect();
        assert_eq!(running, vec![3, 2, 5]);
        assert!(s.waiting.is_empty());
    }
}
