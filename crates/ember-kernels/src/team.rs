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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
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
    /// The epoch of the last job whose part for this helper was taken, by the helper or by
    /// the caller: whoever moves it from the job's epoch − 1 to the job's epoch runs the part.
    taken: AtomicUsize,
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
                    taken: AtomicUsize::new(0),
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
/// another size than `parts`. A helper's part that has not started when the caller's own is
/// done is run by the caller. A part's panic is raised again here.
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
    let epoch = team.epoch.fetch_add(1, SeqCst) + 1;
    for helper in &team.helpers {
        if helper.parked.load(SeqCst) {
            if let Some(thread) = helper.thread.get() {
                thread.unpark();
            }
        }
    }
    let mut own = catch_unwind(AssertUnwindSafe(|| f(0)));
    // A helper that has not started its part yet (its virtual core descheduled, or still
    // waking up) would hold the caller until it runs: the caller runs that part itself. The
    // part of a claimed-span job finds nothing left by then, so this costs nothing there.
    for (index, helper) in team.helpers.iter().enumerate() {
        if helper
            .taken
            .compare_exchange(epoch - 1, epoch, SeqCst, SeqCst)
            .is_ok()
        {
            let part = catch_unwind(AssertUnwindSafe(|| f(index + 1)));
            if own.is_ok() {
                own = part;
            }
            team.remaining.fetch_sub(1, SeqCst);
        }
    }
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

/// Cuts `0..n` into one region per part, `align`-aligned, and runs `f` once per part (as
/// [`for_each_part`]) with the [`Claims`] that hand it spans: first its own region's, front to
/// back, then, once that is done, spans taken from the back of the others' regions. Without
/// `balance`, each part is handed its own region whole (a static split).
///
/// A static split ends when its slowest part ends, and on a virtual machine a part is often
/// slower for reasons of its own: in SmolLM2's decoding one product in eight saw a part finish
/// more than 10 µs after the other (44 µs on average when the helper was the late one, a
/// descheduled virtual core), which cost about 4 % of a step. Here the part that is done takes
/// over the rest of the late one's region. Each part still streams its own region front to
/// back, which is what the memory's prefetchers reward; the spans are claimed in eighths of
/// what is left ([`CLAIM_DIVISOR`]), so a region is a dozen claims, not one per column.
///
/// Every index is handed out exactly once, so a caller whose spans write disjoint outputs gets
/// the same values whoever claims a span.
pub(crate) fn for_each_claimed_span(
    n: usize,
    parts: usize,
    align: usize,
    balance: bool,
    f: &(dyn Fn(&mut Claims<'_>) + Sync),
) {
    let parts = parts.max(1);
    if parts == 1 {
        return f(&mut Claims::Whole(Some(0..n)));
    }
    let align = align.max(1);
    let region = n.div_ceil(parts).next_multiple_of(align);
    let block = |p: usize| (p * region).min(n)..((p + 1) * region).min(n);
    // A claim packs its span in 32-bit halves: over 2^32 indices (never a weight's columns)
    // the split stays static.
    let regions = balance
        .then(|| {
            (0..parts)
                .map(|p| {
                    let span = block(p);
                    let (start, end) = (u32::try_from(span.start), u32::try_from(span.end));
                    Some(Region(AtomicU64::new(pack(start.ok()?, end.ok()?))))
                })
                .collect::<Option<Vec<Region>>>()
        })
        .flatten();
    let Some(regions) = regions else {
        return for_each_part(parts, &|p| f(&mut Claims::Whole(Some(block(p)))));
    };
    for_each_part(parts, &|p| {
        f(&mut Claims::Balanced(Balanced {
            regions: &regions,
            own: p,
            align,
        }))
    });
}

/// The spans one part of [`for_each_claimed_span`] is handed, as an iterator.
pub(crate) enum Claims<'a> {
    /// One span, handed out whole (a static split), until taken.
    Whole(Option<std::ops::Range<usize>>),
    /// Spans claimed from the shared regions.
    Balanced(Balanced<'a>),
}

/// One part's view of the shared regions of [`for_each_claimed_span`].
pub(crate) struct Balanced<'a> {
    /// Each region's unclaimed span.
    regions: &'a [Region],
    /// This part's own region.
    own: usize,
    /// Spans start on multiples of this (and end on one, or at the end).
    align: usize,
}

impl Balanced<'_> {
    /// The next span of this part's own region, else one taken from another's.
    fn next_span(&self) -> Option<std::ops::Range<usize>> {
        if let Some(span) = self.claim(self.own, true) {
            return Some(span);
        }
        // Own region done: help the region with the most left, from its back.
        loop {
            let fullest = (0..self.regions.len())
                .filter(|&r| r != self.own)
                .map(|r| {
                    let (start, end) = unpack(self.regions[r].0.load(SeqCst));
                    (end.saturating_sub(start), r)
                })
                .max()?;
            if fullest.0 == 0 {
                return None;
            }
            if let Some(span) = self.claim(fullest.1, false) {
                return Some(span);
            }
        }
    }

    /// Part of what region `r` has left, from its front (its owner, [`CLAIM_DIVISOR`]) or its
    /// back (another part, half), at least `align` and all of it when less; `None` when it
    /// has nothing left.
    fn claim(&self, r: usize, from_front: bool) -> Option<std::ops::Range<usize>> {
        let region = &self.regions[r].0;
        let mut packed = region.load(SeqCst);
        loop {
            let (start, end) = unpack(packed);
            if start >= end {
                return None;
            }
            let left = end - start;
            // The owner claims eighths, a thief half at once: a steal is one claim, so the
            // two threads pass the region's cache line back and forth once, not per eighth.
            let divisor = if from_front { CLAIM_DIVISOR } else { 2 };
            let take = (left / divisor)
                .next_multiple_of(self.align)
                .max(self.align);
            let (span, rest) = match from_front {
                true => {
                    // `start` stays aligned: regions start aligned and takes are multiples.
                    let cut = (start + take).min(end);
                    (start..cut, pack(cut as u32, end as u32))
                }
                false => {
                    // Rounded down to `align`, so that spans never share an aligned block.
                    let cut = (end.saturating_sub(take) / self.align * self.align).max(start);
                    (cut..end, pack(start as u32, cut as u32))
                }
            };
            match region.compare_exchange_weak(packed, rest, SeqCst, SeqCst) {
                Ok(_) => return Some(span),
                Err(now) => packed = now,
            }
        }
    }
}

impl Iterator for Claims<'_> {
    type Item = std::ops::Range<usize>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Claims::Whole(span) => span.take().filter(|s| !s.is_empty()),
            Claims::Balanced(balanced) => balanced.next_span(),
        }
    }
}

/// An owner's claim takes this fraction of what its region has left. SmolLM2's batch-1
/// generation row took 1.45-1.46 s with eighths against 1.48-1.50 s with quarters (a late part
/// holds more that no one can take over) and 1.47-1.51 s with 16ths or 32nds (more claims).
const CLAIM_DIVISOR: usize = 8;

/// A region's unclaimed span `[start, end)`, packed by [`pack`], alone on its cache lines: the
/// owner claims from it a dozen times per product, and a neighbour's claims must not take the
/// line from under it.
#[repr(align(128))]
struct Region(AtomicU64);

/// A span `[start, end)` in one atomic word, so that its owner and a helper claim from either
/// end without a lock.
fn pack(start: u32, end: u32) -> u64 {
    (u64::from(start) << 32) | u64::from(end)
}

fn unpack(packed: u64) -> (usize, usize) {
    ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize)
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
        #[cfg(test)]
        while tests::HOLD_HELPERS.load(SeqCst) {
            std::hint::spin_loop();
        }
        // The part is this helper's unless the caller took it over. The caller then waits for
        // no one and may have posted a newer job since, whose epoch the next look finds.
        if me
            .taken
            .compare_exchange(seen - 1, seen, SeqCst, SeqCst)
            .is_err()
        {
            continue;
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
    fn claimed_spans_cover_every_index_once_aligned() {
        let cases = [
            (0, 16),
            (1, 16),
            (15, 16),
            (16, 16),
            (577, 16),
            (49_152, 16),
            (1000, 1),
            (1000, 7),
        ];
        for balance in [true, false] {
            for parts in [1, 2, size(), 3, 5] {
                for (n, align) in cases {
                    let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                    let spans = AtomicU64::new(0);
                    for_each_claimed_span(n, parts, align, balance, &|claims| {
                        for span in claims {
                            assert!(!span.is_empty(), "an empty span");
                            assert_eq!(span.start % align, 0, "{span:?} starts unaligned");
                            assert!(span.end % align == 0 || span.end == n, "{span:?}");
                            spans.fetch_add(1, SeqCst);
                            for i in span {
                                hits[i].fetch_add(1, SeqCst);
                            }
                        }
                    });
                    for (i, h) in hits.iter().enumerate() {
                        let case = format!("index {i} of {n}, {parts} parts, align {align}");
                        assert_eq!(h.load(SeqCst), 1, "{case}, balance {balance}");
                    }
                    if parts == 1 || !balance {
                        // One span per part, as a static split.
                        assert!(spans.load(SeqCst) <= parts as u64, "{n} in {parts} parts");
                    }
                }
            }
        }
    }

    /// Holds every helper before it takes its part, so that the caller must take it over.
    pub(super) static HOLD_HELPERS: AtomicBool = AtomicBool::new(false);

    /// Taken by the tests that hold the helpers or need them running.
    static HELPER_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn the_caller_runs_the_parts_of_helpers_that_have_not_started() {
        let _alone = HELPER_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let parts = size();
        if parts < 2 {
            return;
        }
        HOLD_HELPERS.store(true, SeqCst);
        let (sender, receiver) = std::sync::mpsc::channel();
        let caller = std::thread::spawn(move || {
            let me = std::thread::current().id();
            // Another test's job may hold the team: try again until this one runs.
            for _ in 0..1000 {
                let by_caller = AtomicU64::new(0);
                let ran = run(parts, &|_| {
                    if std::thread::current().id() == me {
                        by_caller.fetch_add(1, SeqCst);
                    }
                });
                if ran {
                    let _ = sender.send(by_caller.load(SeqCst));
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // Bounded, so that a caller that waits for its helpers fails the test, not hangs it.
        let by_caller = receiver.recv_timeout(Duration::from_secs(5));
        HOLD_HELPERS.store(false, SeqCst);
        caller.join().unwrap();
        let by_caller = by_caller.expect("the caller waited for helpers that had not started");
        assert_eq!(by_caller, parts as u64);
        // The released helpers find their parts taken, and run the next job's.
        let runs: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
        let job = |p: usize| {
            runs[p].fetch_add(1, SeqCst);
        };
        if !run(parts, &job) {
            (0..parts).for_each(job);
        }
        assert!(runs.iter().all(|r| r.load(SeqCst) == 1));
    }

    #[test]
    fn a_part_that_is_done_takes_over_a_late_ones_region() {
        // Part 0 (the caller) is held back until the others have claimed everything they
        // can: they must have taken over most of its region.
        let _alone = HELPER_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let parts = size();
        if parts < 2 {
            return;
        }
        let n = 1024 * parts;
        let by_caller = AtomicU64::new(0);
        let claimed_by_others = AtomicU64::new(0);
        let caller = std::thread::current().id();
        for_each_claimed_span(n, parts, 16, true, &|claims| {
            if std::thread::current().id() == caller {
                // Bounded, so that a scheduler that never steals fails the test, not hangs it.
                let since = Instant::now();
                while claimed_by_others.load(SeqCst) < (n - 1024) as u64 + 512
                    && since.elapsed() < Duration::from_secs(5)
                {
                    std::hint::spin_loop();
                }
                for span in claims {
                    by_caller.fetch_add(span.len() as u64, SeqCst);
                }
            } else {
                for span in claims {
                    claimed_by_others.fetch_add(span.len() as u64, SeqCst);
                }
            }
        });
        assert!(
            by_caller.load(SeqCst) <= 512,
            "the caller still did {}",
            by_caller.load(SeqCst)
        );
        assert_eq!(
            by_caller.load(SeqCst) + claimed_by_others.load(SeqCst),
            n as u64
        );
    }

    #[test]
    fn another_part_count_is_refused() {
        assert!(!run(size() + 1, &|_| {}));
    }
}
