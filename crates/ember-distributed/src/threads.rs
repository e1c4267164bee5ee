//! [`ThreadGroup`]: a process group whose ranks are threads of one process, for tests and for
//! data parallel on one machine without MPI.

use crate::error::{DistributedError, Result};
use crate::group::{check_rank, ProcessGroup, ReduceOp};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a collective waits for the other ranks by default (torch's NCCL default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// One rank of a group of threads. Ranks meet in a shared hub: each collective is a round to
/// which every rank brings its buffer, and which each rank reduces itself, in rank order, once
/// all have come.
///
/// A rank that panics, or drops its `ThreadGroup` before joining an operation the others wait
/// in, makes their calls return [`DistributedError::RankFailed`]; a rank that never comes makes
/// them return [`DistributedError::Timeout`] after the group's timeout.
///
/// ```
/// use ember_distributed::{ProcessGroup, ReduceOp, ThreadGroup};
/// let sums = ThreadGroup::run(3, |group| {
///     let mut values = vec![group.rank() as f32; 4];
///     group.all_reduce(&mut values, ReduceOp::Sum).unwrap();
///     values
/// });
/// assert!(sums.iter().all(|v| v == &vec![3.0; 4]));
/// ```
pub struct ThreadGroup {
    rank: usize,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for ThreadGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadGroup")
            .field("rank", &self.rank)
            .field("size", &self.hub.size)
            .finish()
    }
}

impl ThreadGroup {
    /// The `size` ranks of a new group, rank `r` at index `r`, each to be moved to its own
    /// thread, with the [`DEFAULT_TIMEOUT`].
    pub fn new_group(size: usize) -> Vec<ThreadGroup> {
        Self::with_timeout(size, DEFAULT_TIMEOUT)
    }

    /// [`new_group`](Self::new_group) whose collectives give up after `timeout`.
    pub fn with_timeout(size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let hub = Arc::new(Hub::new(size, timeout));
        (0..size)
            .map(|rank| ThreadGroup {
                rank,
                hub: Arc::clone(&hub),
            })
            .collect()
    }

    /// Runs `f` on `size` threads, each with its rank of a new group, and returns their
    /// results in rank order. A rank's panic fails the others' pending operations and is
    /// raised again here once every thread has ended.
    pub fn run<T: Send>(size: usize, f: impl Fn(ThreadGroup) -> T + Sync) -> Vec<T> {
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = Self::new_group(size)
                .into_iter()
                .map(|group| s.spawn(move || f(group)))
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        })
    }

    /// Brings `payload` to this rank's next round and returns every rank's, in rank order,
    /// once all have come.
    fn exchange(&self, op: &'static str, payload: Payload) -> Result<(u64, Vec<Arc<Payload>>)> {
        let hub = &self.hub;
        let mut state = hub.lock();
        let seq = state.next_round[self.rank];
        state.next_round[self.rank] += 1;
        let size = hub.size;
        let round = state.rounds.entry(seq).or_insert_with(|| Round {
            slots: vec![None; size],
            unread: size,
        });
        round.slots[self.rank] = Some(Arc::new(payload));
        hub.changed.notify_all();
        let deadline = Instant::now() + hub.timeout;
        loop {
            let round = state
                .rounds
                .get_mut(&seq)
                .expect("a round is kept until all read it");
            if round.slots.iter().all(Option::is_some) {
                let slots: Vec<Arc<Payload>> = round.slots.iter().flatten().cloned().collect();
                round.unread -= 1;
                if round.unread == 0 {
                    state.rounds.remove(&seq);
                }
                return Ok((seq, slots));
            }
            let waiting_for: Vec<usize> = (0..size).filter(|&r| round.slots[r].is_none()).collect();
            let missing = waiting_for.into_iter().find(|&r| state.gone[r]);
            if let Some(rank) = missing {
                return Err(DistributedError::RankFailed { op, rank });
            }
            state = hub.wait(state, deadline, op)?;
        }
    }

    fn floats(&self, op: &'static str, values: &[f32]) -> Result<Vec<Arc<Payload>>> {
        let (_, slots) = self.exchange(op, Payload::Floats(values.to_vec()))?;
        let len = values.len();
        if let Some((rank, other)) = slots
            .iter()
            .enumerate()
            .find(|(_, p)| p.floats().len() != len)
        {
            return Err(DistributedError::InvalidArgument {
                op,
                message: format!(
                    "rank {} gave {len} values, rank {rank} gave {}",
                    self.rank,
                    other.floats().len()
                ),
            });
        }
        Ok(slots)
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        // Whether it panicked or returned, this rank joins no further operation.
        let mut state = self.hub.lock();
        state.gone[self.rank] = true;
        self.hub.changed.notify_all();
    }
}

impl ProcessGroup for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.hub.size
    }

    fn all_reduce(&self, values: &mut [f32], op: ReduceOp) -> Result<()> {
        let slots = self.floats("all_reduce", values)?;
        values.copy_from_slice(slots[0].floats());
        for slot in &slots[1..] {
            op.fold(values, slot.floats());
        }
        op.finish(values, self.hub.size);
        Ok(())
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        check_rank("broadcast", root, self.hub.size)?;
        let slots = self.floats("broadcast", values)?;
        values.copy_from_slice(slots[root].floats());
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        check_rank("broadcast_bytes", root, self.hub.size)?;
        let (_, slots) = self.exchange("broadcast_bytes", Payload::Bytes(bytes.clone()))?;
        match &*slots[root] {
            Payload::Bytes(b) => bytes.clone_from(b),
            _ => unreachable!("every rank brought bytes to this round"),
        }
        Ok(())
    }

    fn all_gather(&self, values: &[f32]) -> Result<Vec<f32>> {
        let slots = self.floats("all_gather", values)?;
        Ok(slots.iter().flat_map(|s| s.floats()).copied().collect())
    }

    fn reduce_scatter(&self, values: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        let size = self.hub.size;
        if !values.len().is_multiple_of(size) {
            return Err(DistributedError::InvalidArgument {
                op: "reduce_scatter",
                message: format!(
                    "{} values do not split into {size} equal parts",
                    values.len()
                ),
            });
        }
        let slots = self.floats("reduce_scatter", values)?;
        let part = values.len() / size;
        let range = self.rank * part..(self.rank + 1) * part;
        let mut out = slots[0].floats()[range.clone()].to_vec();
        for slot in &slots[1..] {
            op.fold(&mut out, &slot.floats()[range.clone()]);
        }
        op.finish(&mut out, size);
        Ok(out)
    }

    fn send(&self, values: &[f32], dst: usize) -> Result<()> {
        check_rank("send", dst, self.hub.size)?;
        let mut state = self.hub.lock();
        state
            .mail
            .entry((self.rank, dst))
            .or_default()
            .push_back(values.to_vec());
        self.hub.changed.notify_all();
        Ok(())
    }

    fn recv(&self, values: &mut [f32], src: usize) -> Result<()> {
        check_rank("recv", src, self.hub.size)?;
        let hub = &self.hub;
        let deadline = Instant::now() + hub.timeout;
        let mut state = hub.lock();
        loop {
            if let Some(message) = state
                .mail
                .get_mut(&(src, self.rank))
                .and_then(VecDeque::pop_front)
            {
                if message.len() != values.len() {
                    return Err(DistributedError::InvalidArgument {
                        op: "recv",
                        message: format!(
                            "rank {src} sent {} values, rank {} expected {}",
                            message.len(),
                            self.rank,
                            values.len()
                        ),
                    });
                }
                values.copy_from_slice(&message);
                return Ok(());
            }
            if state.gone[src] {
                return Err(DistributedError::RankFailed {
                    op: "recv",
                    rank: src,
                });
            }
            state = hub.wait(state, deadline, "recv")?;
        }
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Payload::Floats(Vec::new()))
            .map(|_| ())
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn ProcessGroup>> {
        let (seq, slots) = self.exchange("split", Payload::Split { color, key })?;
        let mut members: Vec<(usize, usize)> = slots
            .iter()
            .enumerate()
            .filter_map(|(rank, p)| match **p {
                Payload::Split { color: c, key } if c == color => Some((key, rank)),
                _ => None,
            })
            .collect();
        members.sort_unstable();
        let rank = members
            .iter()
            .position(|&(_, r)| r == self.rank)
            .expect("this rank is among those of its color");
        let mut state = self.hub.lock();
        let timeout = self.hub.timeout;
        let entry = state
            .splits
            .entry((seq, color))
            .or_insert_with(|| (Arc::new(Hub::new(members.len(), timeout)), members.len()));
        let hub = Arc::clone(&entry.0);
        entry.1 -= 1;
        if entry.1 == 0 {
            state.splits.remove(&(seq, color));
        }
        Ok(Arc::new(ThreadGroup { rank, hub }))
    }
}

/// What a rank brings to a round.
enum Payload {
    Floats(Vec<f32>),
    Bytes(Vec<u8>),
    Split { color: usize, key: usize },
}

impl Payload {
    fn floats(&self) -> &[f32] {
        match self {
            Payload::Floats(v) => v,
            _ => &[],
        }
    }
}

/// One collective operation: the ranks' buffers, and how many ranks have yet to read them.
struct Round {
    slots: Vec<Option<Arc<Payload>>>,
    unread: usize,
}

/// Where the ranks of one group meet.
struct Hub {
    size: usize,
    timeout: Duration,
    state: Mutex<HubState>,
    changed: Condvar,
}

#[derive(Default)]
struct HubState {
    /// Open rounds by sequence number: ranks call collectives in the same order, so a rank's
    /// n-th call belongs to round n.
    rounds: HashMap<u64, Round>,
    /// Each rank's next round.
    next_round: Vec<u64>,
    /// Messages in flight, by (source, destination), oldest first.
    mail: HashMap<(usize, usize), VecDeque<Vec<f32>>>,
    /// Ranks that have left (returned or panicked).
    gone: Vec<bool>,
    /// Groups made by a split, by (round, color), with how many members have yet to take them.
    splits: HashMap<(u64, usize), (Arc<Hub>, usize)>,
}

impl Hub {
    fn new(size: usize, timeout: Duration) -> Self {
        Hub {
            size,
            timeout,
            state: Mutex::new(HubState {
                next_round: vec![0; size],
                gone: vec![false; size],
                ..HubState::default()
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A rank that panicked while holding the lock left the state whole (no operation
        // panics halfway through an update), so the poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a change until `deadline`.
    fn wait<'a>(
        &self,
        state: MutexGuard<'a, HubState>,
        deadline: Instant,
        op: &'static str,
    ) -> Result<MutexGuard<'a, HubState>> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DistributedError::Timeout {
                op,
                seconds: self.timeout.as_secs_f64(),
            });
        }
        let (state, _) = self
            .changed
            .wait_timeout(state, left)
            .unwrap_or_else(|p| p.into_inner());
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| (rank * 100 + i) as f32).collect()
    }

    #[test]
    fn collectives_give_every_rank_the_same_results() {
        let size = 4;
        let out = ThreadGroup::run(size, |g| {
            let r = g.rank();
            let mut sum = values(r, 6);
            g.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
            let mut avg = values(r, 6);
            g.all_reduce(&mut avg, ReduceOp::Avg).unwrap();
            let mut max = values(r, 6);
            g.all_reduce(&mut max, ReduceOp::Max).unwrap();
            let mut b = values(r, 3);
            g.broadcast(&mut b, 2).unwrap();
            let mut bytes = vec![r as u8; r + 1];
            g.broadcast_bytes(&mut bytes, 1).unwrap();
            let gathered = g.all_gather(&values(r, 2)).unwrap();
            let scattered = g.reduce_scatter(&values(r, 8), ReduceOp::Sum).unwrap();
            g.barrier().unwrap();
            (sum, avg, max, b, bytes, gathered, scattered)
        });
        for (r, (sum, avg, max, b, bytes, gathered, scattered)) in out.into_iter().enumerate() {
            let expect_sum: Vec<f32> = (0..6).map(|i| (600 + 4 * i) as f32).collect();
            assert_eq!(sum, expect_sum);
            assert_eq!(avg, expect_sum.iter().map(|v| v / 4.0).collect::<Vec<_>>());
            assert_eq!(max, values(3, 6));
            assert_eq!(b, values(2, 3));
            assert_eq!(bytes, vec![1u8, 1]);
            let expect_gathered: Vec<f32> = (0..size).flat_map(|q| values(q, 2)).collect();
            assert_eq!(gathered, expect_gathered);
            let expect_part: Vec<f32> = (2 * r..2 * r + 2).map(|i| (600 + 4 * i) as f32).collect();
            assert_eq!(scattered, expect_part);
        }
    }

    #[test]
    fn messages_between_two_ranks_arrive_in_order() {
        let out = ThreadGroup::run(2, |g| {
            if g.rank() == 0 {
                g.send(&[1.0, 2.0], 1).unwrap();
                g.send(&[3.0, 4.0], 1).unwrap();
                vec![]
            } else {
                let (mut a, mut b) = ([0.0; 2], [0.0; 2]);
                g.recv(&mut a, 0).unwrap();
                g.recv(&mut b, 0).unwrap();
                vec![a, b]
            }
        });
        assert_eq!(out[1], vec![[1.0, 2.0], [3.0, 4.0]]);
    }

    #[test]
    fn split_groups_ranks_by_color_ordered_by_key() {
        // Six ranks in two colours, keys reversing the order within each.
        let out = ThreadGroup::run(6, |g| {
            let sub = g.split(g.rank() % 2, 10 - g.rank()).unwrap();
            let mut v = vec![g.rank() as f32];
            sub.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            let members = sub.all_gather(&[g.rank() as f32]).unwrap();
            (sub.rank(), sub.size(), v[0], members)
        });
        assert_eq!(out[0], (2, 3, 6.0, vec![4.0, 2.0, 0.0]));
        assert_eq!(out[5], (0, 3, 9.0, vec![5.0, 3.0, 1.0]));
    }

    #[test]
    fn a_failed_rank_ends_the_others_waits_with_an_error() {
        let mut groups = ThreadGroup::new_group(3);
        let third = groups.pop().unwrap();
        let panicking = std::thread::spawn(move || {
            let _g = third;
            panic!("rank 2 fails before the all-reduce");
        });
        assert!(panicking.join().is_err());
        let errors = std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|g| s.spawn(move || g.all_reduce(&mut [1.0], ReduceOp::Sum)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        for e in errors {
            let e = e.unwrap_err();
            assert!(
                matches!(e, DistributedError::RankFailed { rank: 2, .. }),
                "{e}"
            );
            assert_eq!(
                e.to_string(),
                "all_reduce: rank 2 of the group failed before it joined"
            );
        }
    }

    #[test]
    fn a_rank_that_never_comes_times_out() {
        let groups = ThreadGroup::with_timeout(2, Duration::from_millis(50));
        let e = groups[0].barrier().unwrap_err();
        assert!(
            matches!(e, DistributedError::Timeout { op: "barrier", .. }),
            "{e}"
        );
        drop(groups);
    }

    #[test]
    fn mismatched_lengths_and_ranks_are_named() {
        let out = ThreadGroup::run(2, |g| {
            let mut v = vec![0.0; 2 + g.rank()];
            let e = g.all_reduce(&mut v, ReduceOp::Sum).unwrap_err().to_string();
            let r = g.broadcast(&mut [0.0], 5).unwrap_err().to_string();
            (e, r)
        });
        assert!(out[0].0.contains("rank 1 gave 3"), "{}", out[0].0);
        assert_eq!(out[0].1, "broadcast: rank 5 is not in a group of 2");
    }
}
