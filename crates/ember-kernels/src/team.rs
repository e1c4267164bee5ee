//! A team of helper threads that spin between jobs, for decoding's many small parallel products.
//!
//! A decoding step runs about 210 products of one row against a weight, each split over the
//! cores and each taking 50-150 µs. rayon's idle workers go to sleep within microseconds, so
//! every product paid a futex wake-up of its helper: on a virtual machine (an inter-processor
//! interrupt through the hypervisor) measured at one voluntary context switch per product and
//! about a third of the step. OpenMP, which PyTorch uses, keeps its threads spinning for a
//! while after a parallel region (`KMP_BLOCKTIME`, 200 ms); this team does the same for at most
//! [`SPIN`] after its last job, yielding the core every few microseconds so that rayon's own
//! workers still run, then parks.
//!
//! One job at a time: a caller that finds the team busy (another thread decoding at once) or
//! the job's part count different from the team's size gets `false` and runs the parts itself.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper spins after its last job before it parks.
const SPIN: Duration = Duration::from_millis(2);
/// Spin iterations between two looks at the clock (and a yield of the core).
const SPINS_PER_YIELD: u32 = 256;

/// A job: `f(part)` for the helper's part. Only read by helpers while the caller waits for them.
type Job = *const (dyn Fn(usize) + Sync);

/// One helper's hand-off state.
struct Helper {
    /// The thread, to unpark it.
    thread: OnceLock<Thread>,
    /// The helper is parked (or about to be): posting a job must unpark it.
    parked: AtomicBool,
}

/// The team: `helpers.len()` threads beside the caller.
struct Team {
    /// A caller holds the team.
    busy: AtomicBool,
    /// Jobs posted so far; a helper runs a job when it sees this change.
    epoch: AtomicUsize,
    /// The current job, written by the caller before it bumps `epoch`.
    job: UnsafeCell<Option<Job>>,
    /// Helpers that have not finished the current job.
    remaining: AtomicUsize,
    /// A helper's part panicked.
    panicked: AtomicBool,
    helpers: Vec<Helper>,
}

// SAFETY: `job` is written only by the caller holding `busy`, before `epoch` is bumped
// (SeqCst), and read by helpers only after they see the bump and before they decrement
// `remaining`, which the caller waits for before it returns or writes `job` again.
unsafe impl Sync for Team {}

/// The team, sized to rayon's pool (the caller is one of its threads); `None` for one thread.
fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
    *TEAM.get_or_init(|| {
        let size = rayon::current_num_threads();
        if size < 2 {
            return None;
        }
        let team: &'static Team = Box::leak(Box::new(Team {
            busy: AtomicBool::new(false),
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            helpers: (1..size)
                .map(|_| Helper {
                    thread: OnceLock::new(),
                    parked: AtomicBool::new(false),
                })
                .collect(),
        }));
        for index in 0..team.helpers.len() {
            let spawned = std::thread::Builder::new()
                .name(format!("ember-team-{}", index + 1))
                .spawn(move || helper_loop(team, index));
            match spawned {
                Ok(handle) => {
                    let _ = team.helpers[index].thread.set(handle.thread().clone());
                }
                // Without all its threads the team is never used (callers run the parts).
                Err(_) => return None,
            }
        }
        Some(team)
    })
}

/// The number of parts a job must have to run on the team (rayon's thread count), or 1.
#[cfg(test)]
fn size() -> usize {
    team().map_or(1, |t| t.helpers.len() + 1)
}

/// Runs `f(0)` on the calling thread and `f(1)`..`f(parts - 1)` on the team's helpers, and
/// returns when all are done; `false` (nothing run) when the team is busy, absent, or of
/// another size than `parts`. A part's panic is raised again here.
pub(crate) fn run(parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    let Some(team) = team() else {
        return false;
    };
    if parts != team.helpers.len() + 1
        || team
            .busy
            .compare_exchange(false, true, SeqCst, SeqCst)
            .is_err()
    {
        return false;
    }
    // SAFETY: the lifetime is erased; every helper is done with `f` (`remaining` is zero)
    // before this function returns.
    let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
    // SAFETY: this caller holds `busy`; no helper reads `job` until `epoch` moves.
    unsafe { *team.job.get() = Some(job) };
    team.panicked.store(false, SeqCst);
    team.remaining.store(team.helpers.len(), SeqCst);
    team.epoch.fetch_add(1, SeqCst);
    for helper in &team.helpers {
        if helper.parked.load(SeqCst) {
            if let Some(thread) = helper.thread.get() {
                thread.unpark();
            }
        }
    }
    let own = catch_unwind(AssertUnwindSafe(|| f(0)));
    let mut spins = 0u32;
    while team.remaining.load(SeqCst) != 0 {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_YIELD) {
            // A helper may be waiting for this core.
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    let helper_panicked = team.panicked.load(SeqCst);
    team.busy.store(false, SeqCst);
    if let Err(payload) = own {
        std::panic::resume_unwind(payload);
    }
    assert!(!helper_panicked, "a part of a parallel product panicked");
    true
}

/// `f(p)` for every part `p < parts`: on the spinning team when it has that many threads and
/// is free (decoding's products come faster than rayon's workers wake up), else on rayon.
pub(crate) fn for_each_part(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    use rayon::prelude::*;
    if parts > 1 && run(parts, f) {
        return;
    }
    (0..parts).into_par_iter().for_each(f);
}

/// A helper: waits for a new epoch (spinning for up to [`SPIN`] since its last job, then
/// parked), runs its part, reports it done.
fn helper_loop(team: &'static Team, index: usize) {
    let me = &team.helpers[index];
    // Epoch 0 has no job; a job may be posted before this thread first looks.
    let mut seen = 0;
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = team.epoch.load(SeqCst);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(SPINS_PER_YIELD) {
                std::hint::spin_loop();
                continue;
            }
            if idle_since.elapsed() < SPIN {
                std::thread::yield_now();
                continue;
            }
            // Park; a caller that bumps the epoch after this store sees `parked` and unparks
            // (both SeqCst: one of the two sees the other's write).
            me.parked.store(true, SeqCst);
            if team.epoch.load(SeqCst) == seen {
                std::thread::park();
            }
            me.parked.store(false, SeqCst);
            idle_since = Instant::now();
        }
        // SAFETY: the caller wrote the job before bumping the epoch and keeps it alive until
        // `remaining` reaches zero.
        let job = unsafe { (*team.job.get()).expect("a job is posted with its epoch") };
        // SAFETY: as above: `f` lives until this helper decrements `remaining`.
        let f = unsafe { &*job };
        if catch_unwind(AssertUnwindSafe(|| f(index + 1))).is_err() {
            team.panicked.store(true, SeqCst);
        }
        team.remaining.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_once_per_job_and_the_caller_waits_for_all() {
        let parts = size();
        for round in 0..2000u64 {
            let sums: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
            let job = |p: usize| {
                sums[p].fetch_add(round + p as u64, SeqCst);
            };
            if !run(parts, &job) {
                // One thread, or the team busy with another test: the caller's fallback.
                (0..parts).for_each(job);
            }
            for (p, s) in sums.iter().enumerate() {
                assert_eq!(s.load(SeqCst), round + p as u64, "part {p}, round {round}");
            }
            if round % 500 == 0 {
                // Let the helpers park, then wake them again.
                std::thread::sleep(SPIN * 2);
            }
        }
    }

    #[test]
    fn another_part_count_is_refused() {
        assert!(!run(size() + 1, &|_| {}));
    }
}
