//! KV cache blocks with prefix caching: full blocks are keyed by a hash chain of
//! (parent hash, token ids, adapter id), shared by reference count, and kept after their last
//! user leaves until the space is needed (least recently freed first).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Hash of a full block given its parent's hash, its tokens and the adapter that computed it.
pub fn block_hash(parent: Option<u64>, tokens: &[u32], adapter: u64) -> u64 {
    // SipHash with fixed keys: stable within a process, which is all a cache key needs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    adapter.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default, Clone)]
struct Block {
    ref_count: u32,
    /// Set once the block is full and registered in the prefix cache.
    hash: Option<u64>,
    /// The block's tokens, compared on a hit so a hash collision can never share wrong KV.
    tokens: Vec<u32>,
    /// Position in the free queue while `ref_count == 0`.
    free_stamp: Option<u64>,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up in the cache.
    pub queries: u64,
    /// Of those, tokens found.
    pub hits: u64,
}

/// The block pool of one engine.
#[derive(Debug)]
pub struct KvBlockManager {
    blocks: Vec<Block>,
    /// Free blocks by the order they were freed (oldest first); cached ones are evicted from here.
    free_queue: BTreeMap<u64, u32>,
    next_stamp: u64,
    cached: HashMap<u64, u32>,
    block_size: usize,
    enable_prefix_caching: bool,
    stats: PrefixCacheStats,
}

impl KvBlockManager {
    /// `num_blocks` free blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        let mut manager = Self {
            blocks: vec![Block::default(); num_blocks],
            free_queue: BTreeMap::new(),
            next_stamp: 0,
            cached: HashMap::new(),
            block_size,
            enable_prefix_caching,
            stats: PrefixCacheStats::default(),
        };
        for id in 0..num_blocks as u32 {
            manager.push_free(id);
        }
        manager
    }

    fn push_free(&mut self, id: u32) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.free_queue.insert(stamp, id);
        self.blocks[id as usize].free_stamp = Some(stamp);
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (free, including evictable cached ones).
    pub fn num_free(&self) -> usize {
        self.free_queue.len()
    }

    /// Fraction of blocks in use by running sequences.
    pub fn usage(&self) -> f64 {
        1.0 - self.num_free() as f64 / self.blocks.len().max(1) as f64
    }

    /// Prefix-cache hit counters.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The longest cached prefix of `tokens` in whole blocks, leaving at least one token to
    /// compute. Returns the blocks (not yet referenced) and their hashes.
    pub fn find_cached_prefix(&mut self, tokens: &[u32], adapter: u64) -> (Vec<u32>, Vec<u64>) {
        let (blocks, hashes) = self.cached_prefix(tokens, adapter);
        if self.enable_prefix_caching {
            self.stats.queries += tokens.len() as u64;
            self.stats.hits += (blocks.len() * self.block_size) as u64;
        }
        (blocks, hashes)
    }

    /// Blocks of the longest cached prefix of `tokens`, as [`Self::find_cached_prefix`] would
    /// take them, without counting the lookup (to compare ranks before admitting).
    pub fn cached_prefix_blocks(&self, tokens: &[u32], adapter: u64) -> usize {
        self.cached_prefix(tokens, adapter).0.len()
    }

    fn cached_prefix(&self, tokens: &[u32], adapter: u64) -> (Vec<u32>, Vec<u64>) {
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        if !self.enable_prefix_caching {
            return (blocks, hashes);
        }
        // The last token must run to produce logits, so a prompt never hits in full.
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks(self.block_size).take(max_blocks) {
            let hash = block_hash(parent, chunk, adapter);
            match self.cached.get(&hash) {
                Some(&id) if self.blocks[id as usize].tokens == chunk => {
                    blocks.push(id);
                    hashes.push(hash);
                    parent = Some(hash);
                }
                _ => break,
            }
        }
        (blocks, hashes)
    }

    /// Takes a reference on cached blocks found by [`Self::find_cached_prefix`].
    pub fn acquire(&mut self, blocks: &[u32]) {
        for &id in blocks {
            let block = &mut self.blocks[id as usize];
            if let Some(stamp) = block.free_stamp.take() {
                self.free_queue.remove(&stamp);
            }
            block.ref_count += 1;
        }
    }

    /// Whether `n` new blocks can be allocated now.
    pub fn can_allocate(&self, n: usize) -> bool {
        self.free_queue.len() >= n
    }

    /// Takes `n` fresh blocks (evicting the least recently freed cached ones); `None`, with
    /// nothing taken, when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if !self.can_allocate(n) {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, id) = self.free_queue.pop_first()?;
            let block = &mut self.blocks[id as usize];
            if let Some(hash) = block.hash.take() {
                if self.cached.get(&hash) == Some(&id) {
                    self.cached.remove(&hash);
                }
            }
            block.tokens.clear();
            block.free_stamp = None;
            block.ref_count = 1;
            out.push(id);
        }
        Some(out)
    }

    /// Registers the full blocks of a sequence (those past `hashes.len()`) in the prefix cache,
    /// extending `hashes`. `tokens` are the sequence's computed tokens.
    pub fn cache_full_blocks(
        &mut self,
        block_table: &[u32],
        hashes: &mut Vec<u64>,
        tokens: &[u32],
        adapter: u64,
    ) {
        if !self.enable_prefix_caching {
            return;
        }
        let full = tokens.len() / self.block_size;
        for i in hashes.len()..full.min(block_table.len()) {
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = block_hash(hashes.last().copied(), chunk, adapter);
            hashes.push(hash);
            let id = block_table[i];
            let block = &mut self.blocks[id as usize];
            if block.hash.is_none() {
                block.hash = Some(hash);
                block.tokens = chunk.to_vec();
                // A block computed twice (two requests racing on one prefix) keeps the first entry.
                self.cached.entry(hash).or_insert(id);
            }
        }
    }

    /// Drops a sequence's references; blocks nobody uses go to the free queue, tail first so
    /// that the ends of prefixes are evicted before their beginnings.
    pub fn free(&mut self, block_table: &[u32]) {
        for &id in block_table.iter().rev() {
            let block = &mut self.blocks[id as usize];
            debug_assert!(block.ref_count > 0, "block {id} freed twice");
            block.ref_count = block.ref_count.saturating_sub(1);
            if block.ref_count == 0 {
                self.push_free(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_all_or_nothing_and_frees_return_blocks() {
        let mut kv = KvBlockManager::new(4, 2, true);
        let a = kv.allocate(3).unwrap();
        assert!(kv.allocate(2).is_none());
        assert_eq!(kv.num_free(), 1);
        kv.free(&a);
        assert_eq!(kv.num_free(), 4);
        assert_eq!(kv.blocks_for(5), 3);
    }

    #[test]
    fn a_shared_prefix_hits_whole_blocks_and_never_the_last_token() {
        let mut kv = KvBlockManager::new(8, 2, true);
        let prompt = [1, 2, 3, 4, 5];
        let table = kv.allocate(3).unwrap();
        let mut hashes = Vec::new();
        kv.cache_full_blocks(&table, &mut hashes, &prompt, 0);
        assert_eq!(hashes.len(), 2);
        // Same first four tokens: two blocks hit.
        let (hit, _) = kv.find_cached_prefix(&[1, 2, 3, 4, 9], 0);
        assert_eq!(hit, table[..2].to_vec());
        // A prompt equal to the cached blocks leaves its last block to compute.
        let (hit, _) = kv.find_cached_prefix(&[1, 2, 3, 4], 0);
        assert_eq!(hit, table[..1].to_vec());
        // Another adapter never shares.
        assert!(kv.find_cached_prefix(&[1, 2, 3, 4, 9], 7).0.is_empty());
        // A different first block breaks the chain even if the second block matches.
        assert!(kv.find_cached_prefix(&[0, 2, 3, 4, 9], 0).0.is_empty());
        assert_eq!(kv.stats().hits, 6);
    }

    #[test]
    fn ref_counts_keep_shared_blocks_until_the_last_user_leaves() {
        let mut kv = KvBlockManager::new(4, 2, true);
        let table = kv.allocate(2).unwrap();
        let mut hashes = Vec::new();
        kv.cache_full_blocks(&table, &mut hashes, &[1, 2, 3, 4], 0);
        let (hit, _) = kv.find_cached_prefix(&[1, 2, 3, 4, 5], 0);
        kv.acquire(&hit);
        kv.free(&table);
        // The second user still holds both blocks.
        assert_eq!(kv.num_free(), 2);
        kv.free(&hit);
        assert_eq!(kv.num_free(), 4);
        // Freed but still cached: a later request hits without recomputing.
        assert_eq!(kv.find_cached_prefix(&[1, 2, 3, 4, 5], 0).0.len(), 2);
    }

    #[test]
    fn eviction_takes_the_least_recently_freed_blocks_first() {
        let mut kv = KvBlockManager::new(4, 1, true);
        let old = kv.allocate(2).unwrap();
        let mut h_old = Vec::new();
        kv.cache_full_blocks(&old, &mut h_old, &[1, 2], 0);
        let new = kv.allocate(2).unwrap();
        let mut h_new = Vec::new();
        kv.cache_full_blocks(&new, &mut h_new, &[7, 8], 0);
        kv.free(&old);
        kv.free(&new);
        // Two fresh blocks evict the older prefix; the newer stays cached.
        let _taken = kv.allocate(2).unwrap();
        assert!(kv.find_cached_prefix(&[1, 2, 3], 0).0.is_empty());
        assert_eq!(kv.find_cached_prefix(&[7, 8, 9], 0).0.len(), 2);
    }

    #[test]
    fn disabled_prefix_caching_never_hits() {
        let mut kv = KvBlockManager::new(4, 2, false);
        let table = kv.allocate(2).unwrap();
        let mut hashes = Vec::new();
        kv.cache_full_blocks(&table, &mut hashes, &[1, 2, 3, 4], 0);
        assert!(kv.find_cached_prefix(&[1, 2, 3, 4, 5], 0).0.is_empty());
    }
}
