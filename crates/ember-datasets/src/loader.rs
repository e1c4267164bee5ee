//! [`DataLoader`]: batches of a tokenized [`Dataset`], shuffled per epoch and collated ahead of
//! use by background workers, as torch's `DataLoader` does for the HF `Trainer`.

use crate::collate::{Batch, Collator, ExampleDataset};
use crate::dataset::Dataset;
use crate::error::{DatasetError, Result};
use burn::tensor::backend::Backend;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// torch's `DataLoader(dataset, batch_size, shuffle, drop_last, num_workers, prefetch_factor,
/// collate_fn)` over a tokenized [`Dataset`].
///
/// * Batches hold `batch_size` consecutive rows of the epoch's order; the last one may be
///   smaller unless `drop_last`.
/// * With `shuffle`, each epoch has its own permutation, drawn from `StdRng` seeded with
///   `seed + epoch` (as torch's `DistributedSampler`): the same seed and epoch always give the
///   same order, and two epochs give different orders. (Ember's permutation, not torch's.)
/// * With `num_workers > 0`, that many threads read the rows and collate the batches (padding
///   and tensor creation) ahead of the consumer, each keeping up to `prefetch_factor` finished
///   batches in a bounded queue. Batch `k` is made by worker `k % num_workers`, and batches come
///   out in order: the same batches as with `num_workers = 0`, which collates on the calling
///   thread when a batch is asked for.
///
/// ```
/// use burn::backend::Flex;
/// use ember_datasets::{DataCollatorWithPadding, DataLoader, Dataset};
/// use serde_json::json;
/// let ds = Dataset::from_json_rows(&[
///     json!({"input_ids": [101, 7, 102], "label": 1}),
///     json!({"input_ids": [101, 102], "label": 0}),
///     json!({"input_ids": [101, 8, 9, 102], "label": 1}),
/// ])?;
/// let loader = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 2)?
///     .shuffle(true)
///     .seed(42)
///     .num_workers(2);
/// assert_eq!(loader.len(), 2);
/// for epoch in 0..2 {
///     for batch in loader.iter::<Flex>(epoch, &Default::default()) {
///         let batch = batch?;
///         assert!(batch.batch_size() <= 2);
///     }
/// }
/// # Ok::<(), ember_datasets::DatasetError>(())
/// ```
#[derive(Debug, Clone)]
pub struct DataLoader<C> {
    examples: Arc<ExampleDataset>,
    collator: Arc<C>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
    num_workers: usize,
    prefetch_factor: usize,
    /// `(num_replicas, rank)` of a [`DataLoader::distributed`] loader.
    shard: Option<(usize, usize)>,
}

impl<C: Collator + 'static> DataLoader<C> {
    /// A loader over the rows of `dataset` (read as [`ExampleDataset::new`] does), in order, on
    /// the calling thread. Errors: those of [`ExampleDataset::new`] (a missing `input_ids`
    /// column is [`DatasetError::MissingColumn`]), and [`DatasetError::InvalidArgument`] for a
    /// `batch_size` of 0.
    pub fn new(dataset: &Dataset, collator: C, batch_size: usize) -> Result<Self> {
        Self::from_examples(ExampleDataset::new(dataset)?, collator, batch_size)
    }

    /// A loader over rows already read.
    pub fn from_examples(examples: ExampleDataset, collator: C, batch_size: usize) -> Result<Self> {
        if batch_size == 0 {
            return Err(DatasetError::InvalidArgument {
                name: "batch_size",
                value: "0".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(Self {
            examples: Arc::new(examples),
            collator: Arc::new(collator),
            batch_size,
            shuffle: false,
            seed: 42,
            drop_last: false,
            num_workers: 0,
            prefetch_factor: 2,
            shard: None,
        })
    }

    /// Makes this loader rank `rank`'s of `num_replicas`, as torch's `DistributedSampler`
    /// under it: each epoch's order (the same permutation on every rank) is padded by
    /// repeating its first rows to a multiple of `num_replicas`, or, with `drop_last`, cut to
    /// one; rank `r` then takes positions `r, r + num_replicas, ...` and batches them. So the
    /// ranks' batches `k` together hold the rows of batch `k` of a loader of
    /// `num_replicas · batch_size` on one process (when the length divides evenly).
    ///
    /// Errors: [`DatasetError::InvalidArgument`] for `num_replicas` of 0 or a `rank` not below
    /// it.
    pub fn distributed(mut self, num_replicas: usize, rank: usize) -> Result<Self> {
        if num_replicas == 0 || rank >= num_replicas {
            return Err(DatasetError::InvalidArgument {
                name: "rank",
                value: rank.to_string(),
                message: format!("must be below num_replicas ({num_replicas})"),
            });
        }
        self.shard = (num_replicas > 1).then_some((num_replicas, rank));
        Ok(self)
    }

    /// The rows of `epoch` this loader reads, in order: the whole (shuffled) dataset, or this
    /// rank's share of it ([`DataLoader::distributed`]).
    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let n = self.examples.len();
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(self.seed.wrapping_add(epoch)));
        }
        let Some((replicas, rank)) = self.shard else {
            return order;
        };
        // torch's DistributedSampler: total_size = num_samples · num_replicas.
        let per_rank = self.rows_per_epoch();
        let total = per_rank * replicas;
        if total > n && n > 0 {
            let padding: Vec<usize> = order.iter().copied().cycle().take(total - n).collect();
            order.extend(padding);
        }
        order.truncate(total);
        order.into_iter().skip(rank).step_by(replicas).collect()
    }

    /// The number of rows an epoch reads (this rank's share for a distributed loader).
    fn rows_per_epoch(&self) -> usize {
        let n = self.examples.len();
        match self.shard {
            None => n,
            Some((replicas, _)) if self.drop_last && !n.is_multiple_of(replicas) => {
                n.saturating_sub(replicas).div_ceil(replicas)
            }
            Some((replicas, _)) => n.div_ceil(replicas),
        }
    }

    /// Sets `shuffle`: a new random order each epoch (default false: dataset order).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Sets the `seed` of the shuffle (default 42, as HF `TrainingArguments.seed`).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets `drop_last`: leave out the last batch when it is smaller than `batch_size`.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Sets `num_workers`: background threads that collate batches ahead (default 0: collate
    /// on the calling thread).
    pub fn num_workers(mut self, num_workers: usize) -> Self {
        self.num_workers = num_workers;
        self
    }

    /// Sets `prefetch_factor`: batches each worker prepares ahead (default 2, as torch; at
    /// least 1, a 0 counts as 1).
    pub fn prefetch_factor(mut self, prefetch_factor: usize) -> Self {
        self.prefetch_factor = prefetch_factor.max(1);
        self
    }

    /// `len(dataloader)`: the number of batches per epoch.
    pub fn len(&self) -> usize {
        let n = self.rows_per_epoch();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// True when an epoch has no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `batch_size`.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// torch's `dataloader.drop_last`: whether an epoch leaves out its last, smaller batch
    /// (set with [`DataLoader::drop_last`], whose name the builder already takes).
    pub fn drops_last(&self) -> bool {
        self.drop_last
    }

    /// The rows.
    pub fn examples(&self) -> &ExampleDataset {
        &self.examples
    }

    /// The collator.
    pub fn collator(&self) -> &C {
        &self.collator
    }

    /// The row indices of each batch of `epoch`, in order: what torch's `BatchSampler` yields.
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        self.epoch_order(epoch)
            .chunks(self.batch_size)
            .filter(|c| !self.drop_last || c.len() == self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The batches of `epoch` (0, 1, ...) as burn tensors on `device`, in order.
    ///
    /// The iterator yields `Err` for a batch the collator refuses (or whose worker panicked),
    /// and then ends. Dropping it early stops the workers.
    pub fn iter<B: Backend>(&self, epoch: u64, device: &B::Device) -> DataLoaderIter<B> {
        let indices = Arc::new(self.batch_indices(epoch));
        let total = indices.len();
        let examples = Arc::clone(&self.examples);
        let collator = Arc::clone(&self.collator);
        let device = device.clone();
        let make: MakeBatch<B> = Arc::new(move |k: usize| {
            let rows = examples.examples(&indices[k])?;
            collator.collate::<B>(&rows, &device)
        });
        let workers = self.num_workers.min(total);
        let source = if workers == 0 {
            Source::Inline(make)
        } else {
            match Workers::spawn(make.clone(), workers, total, self.prefetch_factor) {
                Some(w) => Source::Workers(w),
                // The system refused a thread: collate on this one instead (same batches).
                None => Source::Inline(make),
            }
        };
        DataLoaderIter {
            source,
            next: 0,
            total,
            done: false,
        }
    }
}

/// Makes batch `k` of an epoch.
type MakeBatch<B> = Arc<dyn Fn(usize) -> Result<Batch<B>> + Send + Sync>;

/// Calls `make(k)`, turning a panic into an error.
fn make_guarded<B: Backend>(make: &MakeBatch<B>, k: usize) -> Result<Batch<B>> {
    catch_unwind(AssertUnwindSafe(|| make(k))).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(DatasetError::Shape(format!(
            "collating batch {k} panicked: {message}"
        )))
    })
}

/// Background threads collating batches ahead.
struct Workers<B: Backend> {
    receivers: Vec<Receiver<Result<Batch<B>>>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl<B: Backend> Workers<B> {
    /// Starts `n` workers; `None` when a thread cannot be started (the others are stopped).
    fn spawn(make: MakeBatch<B>, n: usize, total: usize, prefetch: usize) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Workers {
            receivers: Vec::with_capacity(n),
            handles: Vec::with_capacity(n),
            stop: Arc::clone(&stop),
        };
        for w in 0..n {
            let (tx, rx) = sync_channel(prefetch);
            let make = Arc::clone(&make);
            let stop = Arc::clone(&stop);
            let spawned = std::thread::Builder::new()
                .name(format!("ember-dataloader-{w}"))
                .spawn(move || {
                    for k in (w..total).step_by(n) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let batch = make_guarded(&make, k);
                        let failed = batch.is_err();
                        // A closed channel means the iterator was dropped.
                        if tx.send(batch).is_err() || failed {
                            break;
                        }
                    }
                });
            match spawned {
                Ok(handle) => {
                    workers.receivers.push(rx);
                    workers.handles.push(handle);
                }
                Err(_) => return None, // `workers` is dropped: the started ones stop.
            }
        }
        Some(workers)
    }

    /// Stops the workers and waits for them.
    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers wakes workers blocked on a full queue.
        self.receivers.clear();
        for handle in self.handles.drain(..) {
            // A worker cannot panic outside `make_guarded`; nothing to report if it did.
            let _ = handle.join();
        }
    }
}

impl<B: Backend> Drop for Workers<B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

enum Source<B: Backend> {
    Inline(MakeBatch<B>),
    Workers(Workers<B>),
}

/// The batches of one epoch of a [`DataLoader`], in order: `Ok(batch)` for each, or one `Err`
/// (then the end) for a batch that could not be made.
pub struct DataLoaderIter<B: Backend> {
    source: Source<B>,
    next: usize,
    total: usize,
    done: bool,
}

impl<B: Backend> DataLoaderIter<B> {
    fn finish(&mut self) {
        self.done = true;
        if let Source::Workers(w) = &mut self.source {
            w.shutdown();
        }
    }
}

impl<B: Backend> std::fmt::Debug for DataLoaderIter<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let workers = match &self.source {
            Source::Inline(_) => 0,
            Source::Workers(w) => w.handles.len(),
        };
        f.debug_struct("DataLoaderIter")
            .field("next", &self.next)
            .field("total", &self.total)
            .field("workers", &workers)
            .field("done", &self.done)
            .finish()
    }
}

impl<B: Backend> Iterator for DataLoaderIter<B> {
    type Item = Result<Batch<B>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next >= self.total {
            self.done = true;
            return None;
        }
        let k = self.next;
        let batch = match &self.source {
            Source::Inline(make) => make_guarded(make, k),
            Source::Workers(w) => {
                let worker = k % w.receivers.len();
                w.receivers[worker].recv().unwrap_or_else(|_| {
                    Err(DatasetError::Shape(format!(
                        "data loader worker {worker} stopped before batch {k}"
                    )))
                })
            }
        };
        self.next += 1;
        if batch.is_err() {
            self.finish();
        }
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            (0, Some(0))
        } else {
            (0, Some(self.total - self.next))
        }
    }
}
