//! accelerate's `BatchSamplerShard` and `DataLoaderShard`: how a data loader's batches are
//! dealt over the ranks of an [`Accelerator`](super::Accelerator).

#[cfg(doc)]
use super::Accelerator;
use super::Shared;
use crate::error::{Result, TrainError};
use burn::tensor::backend::Backend;
use ember_datasets::{Batch, Collator, DataLoader, DatasetError};
use std::sync::{Arc, Mutex};

/// One row position of a rank's shard: the row of the dataset, and whether it is a repeat
/// that only pads the last batches (accelerate's `even_batches`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) row: usize,
    pub(crate) padding: bool,
}

/// accelerate's `BatchSamplerShard` (`split_batches=False`, `even_batches=True`) over the
/// batches of one process: rank `rank` of `replicas` gets batches `rank, rank + replicas, ...`.
/// Without `drop_last` the epoch's rows are first repeated cyclically from its start to a
/// multiple of `replicas · batch_size`, so that every rank gets as many batches, all full;
/// with it, the batches that cannot give every rank one are dropped.
pub(crate) fn shard_batches(
    batches: &[Vec<usize>],
    batch_size: usize,
    replicas: usize,
    rank: usize,
    drop_last: bool,
) -> Vec<Vec<Slot>> {
    let real = |rows: &Vec<usize>| {
        rows.iter()
            .map(|&row| Slot {
                row,
                padding: false,
            })
            .collect::<Vec<_>>()
    };
    if drop_last {
        let groups = batches.len() / replicas;
        return batches[..groups * replicas]
            .iter()
            .skip(rank)
            .step_by(replicas)
            .map(real)
            .collect();
    }
    let order: Vec<usize> = batches.iter().flatten().copied().collect();
    if order.is_empty() {
        return Vec::new();
    }
    let total_batch = replicas * batch_size;
    let total = order.len().div_ceil(total_batch) * total_batch;
    let slots: Vec<Slot> = order
        .iter()
        .cycle()
        .take(total)
        .enumerate()
        .map(|(position, &row)| Slot {
            row,
            padding: position >= order.len(),
        })
        .collect();
    slots
        .chunks(batch_size)
        .skip(rank)
        .step_by(replicas)
        .map(<[Slot]>::to_vec)
        .collect()
}

/// accelerate's `DataLoaderShard`: rank `process_index`'s batches of a [`DataLoader`]'s epochs.
///
/// The loader's epoch (the same permutation on every rank: it is seeded with `seed + epoch`)
/// is cut into batches of its batch size; batch `k` goes to rank `k % num_processes`. Without
/// `drop_last`, the last batches are completed with rows from the start of the epoch so that
/// every rank gets the same number of full batches (`even_batches`); so the ranks' batches `s`
/// together are batch `s` of one process with `num_processes` times the batch size.
/// [`Accelerator::gather_for_metrics`] drops the repeats again.
#[derive(Clone)]
pub struct DataLoaderShard<C> {
    loader: DataLoader<C>,
    num_processes: usize,
    process_index: usize,
    drop_last: bool,
    /// Batches each epoch starts after ([`Accelerator::skip_first_batches`]).
    pub(super) skip_batches: usize,
    shared: Arc<Mutex<Shared>>,
}

impl<C> std::fmt::Debug for DataLoaderShard<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoaderShard")
            .field("num_processes", &self.num_processes)
            .field("process_index", &self.process_index)
            .field("drop_last", &self.drop_last)
            .field("skip_batches", &self.skip_batches)
            .finish()
    }
}

impl<C: Collator + 'static> DataLoaderShard<C> {
    pub(super) fn new(
        loader: DataLoader<C>,
        num_processes: usize,
        process_index: usize,
        shared: Arc<Mutex<Shared>>,
    ) -> Result<Self> {
        let rows = loader.examples().len();
        let batch_size = loader.batch_size();
        // The loader's own DistributedSampler would split the rows a second time: its epoch no
        // longer holds every row (nor, with padding, only the rows).
        let epoch_rows: usize = loader.batch_indices(0).iter().map(Vec::len).sum();
        // With `drop_last` an epoch reads the full batches only.
        let drop_last = loader.drops_last();
        let expected = if drop_last {
            rows / batch_size * batch_size
        } else {
            rows
        };
        if epoch_rows != expected {
            return Err(TrainError::Argument {
                field: "dataloader".into(),
                message: format!(
                    "the loader reads {epoch_rows} of {rows} rows per epoch: it is already \
                     sharded (DataLoader::distributed); prepare the unsharded loader"
                ),
            });
        }
        Ok(Self {
            loader,
            num_processes,
            process_index,
            drop_last,
            skip_batches: 0,
            shared,
        })
    }

    /// The number of batches this rank reads per epoch (`len(dataloader)`).
    pub fn len(&self) -> usize {
        let batches = self.loader.len();
        let per_rank = batches / self.num_processes;
        if batches.is_multiple_of(self.num_processes) || self.drop_last {
            per_rank
        } else {
            per_rank + 1
        }
    }

    /// True when an epoch has no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// accelerate's `total_batch_size`: the batch size times the number of processes.
    pub fn total_batch_size(&self) -> usize {
        self.loader.batch_size() * self.num_processes
    }

    /// accelerate's `total_dataset_length`: the rows of the whole dataset.
    pub fn total_dataset_length(&self) -> usize {
        self.loader.examples().len()
    }

    /// The loader this shard was made from.
    pub fn base_loader(&self) -> &DataLoader<C> {
        &self.loader
    }

    /// This rank's row indices of each batch of `epoch`, in order (repeats included).
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        self.slots(epoch)
            .into_iter()
            .map(|batch| batch.into_iter().map(|s| s.row).collect())
            .collect()
    }

    pub(crate) fn slots(&self, epoch: u64) -> Vec<Vec<Slot>> {
        shard_batches(
            &self.loader.batch_indices(epoch),
            self.loader.batch_size(),
            self.num_processes,
            self.process_index,
            self.drop_last,
        )
    }

    /// This rank's batches of `epoch` (0, 1, ...) on `device`, in order, after the first
    /// [`Accelerator::skip_first_batches`]. Each batch is collated when asked for. While the
    /// last one is out, [`Accelerator::gather_for_metrics`] trims the repeats and
    /// [`Accelerator::backward`] synchronises.
    pub fn iter<B: Backend>(
        &self,
        epoch: u64,
        device: &B::Device,
    ) -> DataLoaderShardIter<'_, B, C> {
        let batches = self.batch_indices(epoch);
        {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.end_of_dataloader = false;
            shared.remainder =
                (!self.drop_last).then(|| self.total_dataset_length() % self.total_batch_size());
        }
        DataLoaderShardIter {
            shard: self,
            batches,
            next: self.skip_batches,
            epoch,
            device: device.clone(),
        }
    }
}

/// The batches of one epoch of a [`DataLoaderShard`].
pub struct DataLoaderShardIter<'a, B: Backend, C> {
    shard: &'a DataLoaderShard<C>,
    batches: Vec<Vec<usize>>,
    next: usize,
    epoch: u64,
    device: B::Device,
}

impl<B: Backend, C> std::fmt::Debug for DataLoaderShardIter<'_, B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataLoaderShardIter")
            .field("epoch", &self.epoch)
            .field("next", &self.next)
            .field("batches", &self.batches.len())
            .finish()
    }
}

impl<B: Backend, C: Collator + 'static> Iterator for DataLoaderShardIter<'_, B, C> {
    type Item = std::result::Result<Batch<B>, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut shared = self.shard.shared.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rows) = self.batches.get(self.next) else {
            shared.end_of_dataloader = false;
            return None;
        };
        let index = self.next;
        self.next += 1;
        shared.end_of_dataloader = self.next == self.batches.len();
        if let Some(seed) = shared.seed {
            // The batch's place in the run, not a running count: a resumed run (which skips
            // the batches already seen) seeds each batch as an uninterrupted one did.
            let rank = self.shard.process_index as u64;
            B::seed(
                &self.device,
                seed.wrapping_mul(1_000_003)
                    .wrapping_add(self.epoch.wrapping_mul(1 << 20))
                    .wrapping_add(index as u64)
                    .wrapping_add(rank << 40),
            );
        }
        drop(shared);
        let loader = &self.shard.loader;
        Some(
            loader
                .examples()
                .examples(rows)
                .and_then(|rows| loader.collator().collate::<B>(&rows, &self.device)),
        )
    }
}

impl<B: Backend, C> Drop for DataLoaderShardIter<'_, B, C> {
    fn drop(&mut self) {
        // Leaving the loop early leaves no stale end-of-loader flag for the next loader.
        let mut shared = self.shard.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.end_of_dataloader = false;
    }
}

#[cfg(test)]
mod tests {
    use super::{shard_batches, Slot};

    fn rows(shard: &[Vec<Slot>]) -> Vec<Vec<usize>> {
        shard
            .iter()
            .map(|b| b.iter().map(|s| s.row).collect())
            .collect()
    }

    /// accelerate's own `BatchSamplerShard` lists (tests/test_data_loader.py,
    /// `test_batch_sampler_shards_with_no_splits`): 2 processes, batch size 3.
    #[test]
    fn shards_deal_batches_as_accelerate() {
        let batches = |n: usize| -> Vec<Vec<usize>> {
            (0..n)
                .collect::<Vec<_>>()
                .chunks(3)
                .map(<[usize]>::to_vec)
                .collect()
        };
        // 24 rows: a round multiple of the total batch size.
        assert_eq!(
            rows(&shard_batches(&batches(24), 3, 2, 0, false)),
            [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]]
        );
        // 21 rows: a whole number of batches, not of total batches: the last rank loops.
        assert_eq!(
            rows(&shard_batches(&batches(21), 3, 2, 1, false)),
            [[3, 4, 5], [9, 10, 11], [15, 16, 17], [0, 1, 2]]
        );
        // 22 rows: the last batch is incomplete and completed from the start.
        assert_eq!(
            rows(&shard_batches(&batches(22), 3, 2, 1, false)),
            [[3, 4, 5], [9, 10, 11], [15, 16, 17], [21, 0, 1]]
        );
        // 20 rows: rank 0 ends on an incomplete batch, rank 1 on a looped one.
        assert_eq!(
            rows(&shard_batches(&batches(20), 3, 2, 0, false)),
            [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 0]]
        );
        assert_eq!(
            rows(&shard_batches(&batches(20), 3, 2, 1, false)),
            [[3, 4, 5], [9, 10, 11], [15, 16, 17], [1, 2, 3]]
        );
        // 2 rows: fewer than the processes need: repeated until every rank has a batch.
        assert_eq!(
            rows(&shard_batches(&batches(2), 3, 2, 0, false)),
            [[0, 1, 0]]
        );
        assert_eq!(
            rows(&shard_batches(&batches(2), 3, 2, 1, false)),
            [[1, 0, 1]]
        );
        // drop_last: only the batches every rank gets.
        assert_eq!(
            rows(&shard_batches(&batches(21), 3, 2, 0, true)),
            [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
        );
    }
}
