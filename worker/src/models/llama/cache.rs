//! The paged KV cache: every rank holds, per layer, keys and values for its own KV heads
//! in `blocks * block_size` rows (plus one padding row that is never allocated). A
//! sequence owns whole blocks; its position `p` lives in row
//! `blocks[p / block_size] * block_size + p % block_size`. Blocks are lent out by rank
//! 0's [`BlockAllocator`] as a sequence grows and all come back the step it ends, so a
//! cache of N tokens serves any mix of sequences whose lengths sum to about N, with at
//! most one partly filled block per sequence (vLLM's paging, without its copy-on-write).
//!
//! Followers never decide anything: rank 0 sends them the rows to write and the rows to
//! read in each [`super::Step`].

use tch::{Device, Kind, Tensor};

use crate::models::kernels;

pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: usize,
    blocks: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        blocks: usize,
        block_size: usize,
        kv_heads: i64,
        head_dim: i64,
        (kind, device): (Kind, Device),
    ) -> Self {
        let rows = (blocks * block_size + 1) as i64;
        let make = || Tensor::zeros([rows, kv_heads, head_dim], (kind, device));
        Self {
            keys: (0..layers).map(|_| make()).collect(),
            values: (0..layers).map(|_| make()).collect(),
            block_size,
            blocks,
        }
    }

    /// The row that pads a sequence's row list; its contents are masked out.
    pub fn padding_row(&self) -> i64 {
        (self.blocks * self.block_size) as i64
    }

    /// Stores the keys and values of a step's tokens at `rows`, in the cache's kind:
    /// `qkv` is the step's `[tokens, (heads + 2 · kv heads) · d]` product, keys and values
    /// its last `2 · kv heads · d` columns.
    pub fn write(&mut self, layer: usize, rows: &Tensor, qkv: &Tensor) {
        let width = qkv.size()[1];
        let kv = self.keys[layer].size()[1] * self.keys[layer].size()[2];
        let from = width - 2 * kv;
        for (i, cache) in [&mut self.keys[layer], &mut self.values[layer]]
            .into_iter()
            .enumerate()
        {
            let start = from + i as i64 * kv;
            if kernels::on_host(qkv) {
                kernels::write_rows(cache, rows, qkv, start as usize, kv as usize);
            } else {
                let new = qkv
                    .narrow(1, start, kv)
                    .view([-1, cache.size()[1], cache.size()[2]]);
                let _ = cache.index_copy_(0, rows, &new.to_kind(cache.kind()));
            }
        }
    }

    /// One layer's keys and values, `[rows, kv heads, d]` each.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Bytes the cache holds on this rank.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}

/// Rank 0's record of which cache blocks are free.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
    pub block_size: usize,
}

impl BlockAllocator {
    pub fn new(blocks: usize, block_size: usize) -> Self {
        Self {
            // Popped from the end: lowest blocks first.
            free: (0..blocks as u32).rev().collect(),
            total: blocks,
            block_size,
        }
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn free_tokens(&self) -> usize {
        self.free.len() * self.block_size
    }

    pub fn total_tokens(&self) -> usize {
        self.total * self.block_size
    }

    /// Blocks that hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `owned` so it holds `tokens` tokens; false (and no change) if the cache is
    /// short.
    pub fn grow(&mut self, owned: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(owned.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            owned.push(self.free.pop().expect("counted"));
        }
        true
    }

    pub fn release(&mut self, owned: &mut Vec<u32>) {
        self.free.append(owned);
    }

    /// The cache row of position `pos` of a sequence owning `blocks`.
    pub fn row(&self, blocks: &[u32], pos: usize) -> i64 {
        (blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_lent_and_returned_whole() {
        let mut a = BlockAllocator::new(4, 16);
        let mut s = Vec::new();
        assert!(a.grow(&mut s, 17));
        assert_eq!(s, vec![0, 1]);
        assert_eq!(a.row(&s, 16), 16);
        assert!(a.grow(&mut s, 32), "still two blocks");
        assert_eq!(a.free_tokens(), 32);
        let mut t = Vec::new();
        assert!(!a.grow(&mut t, 33), "three blocks do not fit in two");
        assert!(t.is_empty());
        a.release(&mut s);
        assert_eq!(a.free_tokens(), a.total_tokens());
    }

    #[test]
    fn rows_follow_the_block_table() {
        let a = BlockAllocator::new(8, 4);
        let blocks = [5, 2];
        let rows: Vec<i64> = (0..8).map(|p| a.row(&blocks, p)).collect();
        assert_eq!(rows, vec![20, 21, 22, 23, 8, 9, 10, 11]);
    }
}
