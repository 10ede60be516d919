//! Collectives between the ranks of a group.
//!
//! Models are written against [`Collective`] so that the same forward pass runs on one
//! rank (this module's [`SingleRank`]) or on a tensor-parallel group whose collectives
//! go through torch c10d.

pub mod c10d;
pub mod observed;

use tch::Tensor;

/// Where this process sits in its group: rank `rank` of `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The trivial layout: the whole model on one rank.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    /// The `[start, start + len)` slice of `total` items that this rank owns.
    /// `total` must be divisible by `world` (checked when a model is built).
    pub fn range(&self, total: i64) -> (i64, i64) {
        let len = total / self.world as i64;
        (self.rank as i64 * len, len)
    }
}

/// A failed collective: the group can no longer compute together.
#[derive(Debug, thiserror::Error)]
#[error("collective {op} failed: {message}")]
pub struct CollectiveError {
    pub op: &'static str,
    pub message: String,
}

/// The collectives a tensor-parallel forward pass needs.
pub trait Collective: Send {
    fn shard(&self) -> Shard;
    /// Where the tensors this group exchanges must live (CUDA for NCCL).
    fn device(&self) -> tch::Device;
    /// Sums `tensor` over all ranks, in place.
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError>;
    /// Copies `tensor` from rank `root` to every rank, in place.
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError>;
}

/// A group of one, on `device`: every collective is the identity.
#[derive(Debug)]
pub struct SingleRank(pub tch::Device);

impl Collective for SingleRank {
    fn shard(&self) -> Shard {
        Shard::SINGLE
    }

    fn device(&self) -> tch::Device {
        self.0
    }

    fn all_reduce_sum(&self, _tensor: &mut Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tile_the_total() {
        let ranges: Vec<_> = (0..3).map(|rank| Shard { rank, world: 3 }.range(12)).collect();
        assert_eq!(ranges, vec![(0, 4), (4, 4), (8, 4)]);
        assert_eq!(Shard::SINGLE.range(384), (0, 384));
    }
}
