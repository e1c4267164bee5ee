//! Keeping freed memory in the process, so that a training step reuses last step's pages.
//!
//! A training step allocates and frees the same large buffers every step (SmolLM2 at batch 8 ×
//! 256: 400 MB of logits and their gradient, 12-19 MB per layer for MLP activations and
//! attention weights). glibc's malloc serves requests above its mmap threshold (at most 32 MB,
//! and any request from a worker thread's arena that does not fit its 64 MB heap) with fresh
//! `mmap`s and gives them back on free, and it trims freed heap tops back to the system: the
//! next step's first write to each page then faults and the kernel zeroes it. Measured on the
//! LoRA SmolLM2 step: 15-20 % of the step's time in `clear_page`, and the step 12.6 s → 10.1 s
//! with the settings below.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Once;

/// Tells the C allocator to keep freed memory for reuse instead of returning it to the system
/// (glibc on Linux: one arena, no `mmap` for large blocks, no trimming), as PyTorch's caching
/// allocators do for device memory. Idempotent; a no-op on other platforms.
///
/// It changes the whole process's allocator and the memory it holds stays at its peak, so it
/// is the application's choice: `ember` (the CLI), the `Trainer` and the benches call it; a
/// library user calls it once at start-up, before other threads allocate.
pub fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: `mallopt` only changes malloc's parameters; every value is in its range.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // No trimming at all (-1 is read as the largest size). A threshold of `i32::MAX`
            // (2 GiB) let some runs trim: a SmolLM2 step frees more than 2 GiB at its end, and
            // whether that lands in the heap's top chunk depends on the order frees come in.
            // Those runs faulted 2 GiB of pages back in every step (536k faults, 10-15 %
            // slower); with -1 the fault count stays flat after the first steps.
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
            // Grow the heap in large steps, so that `HugePageAlloc`'s advice covers the
            // memory ahead of a large block in one mapping.
            libc::mallopt(libc::M_TOP_PAD, HEAP_STEP as i32);
        }
    });
}

/// A transparent huge page: 2 MiB on x86-64 (and on aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// How far past a large block the advice reaches, and how much glibc's heap grows by at least
/// under [`keep_freed_memory`] (`M_TOP_PAD`). A 2 MiB block can only be a huge page inside one
/// mapping, and advice given range by range splits the heap's mapping where it ends; advising
/// the memory ahead at once keeps the blocks that follow (the next weights) inside one advised
/// mapping.
const HEAP_STEP: usize = 64 << 20;

/// Blocks from this size up are advised onto huge pages.
const ADVISED_SIZE: usize = 1 << 20;

/// The system allocator, with large blocks placed on transparent huge pages (Linux) and
/// middle-sized blocks recycled per thread: a global allocator for applications that decode
/// (`#[global_allocator] static A: HugePageAlloc = HugePageAlloc;`), as `ember` (the CLI) and
/// the benches use it.
///
/// Batch-1 decoding reads every weight once per token, 538 MB for SmolLM2-135M in f32: on
/// 4 KiB pages that is 131,000 TLB misses per token, and the hardware prefetcher stops at
/// every page boundary. Linux backs memory with 2 MiB pages where asked (`MADV_HUGEPAGE`; the
/// common `transparent_hugepage=madvise` setting does nothing otherwise), but only on the first
/// touch of each 2 MiB block, so the advice must come before the block is written. Each block
/// of at least [`ADVISED_SIZE`] is advised as it is handed out, with the [`HEAP_STEP`] bytes
/// after it, rounded out to whole huge pages: the free memory after it is then advised before
/// the next block's header is written there, and blocks allocated one after another in fresh
/// memory (a model's weights as it loads) lie on huge pages. Memory touched before (reused
/// freed blocks) keeps its pages.
///
/// `EMBER_HUGE_PAGES=0` turns the advice off.
///
/// Blocks of 1-256 KiB are served from a per-thread cache of freed ones, by power-of-two
/// class (see `recycle`): a decoding step frees and allocates a few thousand of them, each of
/// which glibc's shared bins served with coalescing. Measured on a 2-core AMD EPYC with
/// SmolLM2 in f32: malloc's share of `ember generate`'s samples 1.9 → 0.6 %, 400 tokens
/// 5.08-5.16 → 4.93-5.11 s (six alternated pairs, each faster), batch-8 generation 2.25 →
/// 2.04-2.05 s; the training and encoder rows unchanged.
///
/// Measured on the 2-core AVX-512 VM with SmolLM2 in f32, alternated with the same code on
/// 4 KiB pages: batch-1 generation 1.41-1.50 → 1.27-1.33 s, batch 8 3.74-3.77 → 3.30-3.35 s,
/// `ember generate` at 272 tokens 6.28-6.85 → 5.91-6.39 s; the training rows unchanged. The
/// bandwidth bound row rises too (16.4-16.7 → 14.9-15.3 ms): reading memory costs less on
/// huge pages whoever reads it. On that VM the first touch of a huge page is sometimes slow
/// (the hypervisor backing fresh memory): one start in six took 1.7 s instead of 0.75 s.
pub struct HugePageAlloc;

// SAFETY: every block comes from `System`: small and large ones as asked, middle-sized ones
// (see `recycle`) at their class's size and alignment, which covers the request, and goes back
// to `System` with the layout it was allocated with, or to the calling thread's cache of its
// class, from which only a request of the same class takes it. Advising a mapped range onto
// huge pages changes neither its contents nor its mapping.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(class) = recycle::class_of(layout) {
            return recycle::take(class).unwrap_or_else(|| {
                // SAFETY: a class layout has a non-zero size.
                unsafe { System.alloc(recycle::layout(class)) }
            });
        }
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(class) = recycle::class_of(layout) {
            if let Some(ptr) = recycle::take(class) {
                // SAFETY: a block of the class's size, at least `layout.size()` bytes.
                unsafe { ptr.write_bytes(0, layout.size()) };
                return ptr;
            }
            // SAFETY: a class layout has a non-zero size.
            return unsafe { System.alloc_zeroed(recycle::layout(class)) };
        }
        // glibc's `calloc` clears only memory it reuses (already touched, so its pages are
        // set); fresh memory from the system is left untouched for the advice to apply.
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(class) = recycle::class_of(layout) {
            if !recycle::keep(class, ptr) {
                // SAFETY: allocated by `alloc` above with the class's layout.
                unsafe { System.dealloc(ptr, recycle::layout(class)) }
            }
            return;
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract: `new_size`, rounded to the alignment, fits `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let (old, new) = (recycle::class_of(layout), recycle::class_of(new_layout));
        if old.is_none() && new.is_none() {
            // SAFETY: the caller's contract, passed on.
            let ptr = unsafe { System.realloc(ptr, layout, new_size) };
            advise(ptr, new_size);
            return ptr;
        }
        if old.is_some() && old == new {
            // The class's block holds the new size already.
            return ptr;
        }
        // A block of a class must keep its class's size: moved, not grown in place.
        // SAFETY: `new_layout` is a valid layout of non-zero size (the caller's contract).
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks hold at least the smaller of the two sizes; they are
            // distinct; the old one is freed with the layout it was allocated with.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        moved
    }
}

/// Per-thread caches of freed middle-sized blocks.
///
/// A decoding step allocates and frees a few thousand tensors of 1-200 KiB (a product's output
/// row, the logits, attention's scores): above glibc's per-thread cache (`tcache`, up to 1,032
/// bytes), each goes through the shared heap's bins, coalescing its neighbours on every free.
/// Here such a block is allocated at the size of its power-of-two class and, when freed, kept
/// for the next request of the class on the same thread, up to [`CLASS_BYTES`] per class.
mod recycle {
    use std::alloc::Layout;
    use std::cell::Cell;

    /// The smallest class: 2 KiB (`tcache` serves up to 1,032 bytes, the bins what is between).
    const FIRST_SHIFT: u32 = 11;
    /// The largest class: 256 KiB (a SmolLM2 logits row is 192 KiB).
    const LAST_SHIFT: u32 = 18;
    const CLASSES: usize = (LAST_SHIFT - FIRST_SHIFT + 1) as usize;
    /// Bytes kept per class and thread, at most (and at least 4 blocks).
    const CLASS_BYTES: usize = 1 << 20;
    /// Blocks kept per class at most: the 2 KiB class's count.
    const MOST_KEPT: usize = CLASS_BYTES >> FIRST_SHIFT;
    /// Every class's block is aligned to this, which covers the SIMD alignments tensors ask.
    const ALIGN: usize = 64;

    /// One class's kept blocks.
    struct Kept {
        blocks: [Cell<*mut u8>; MOST_KEPT],
        len: Cell<usize>,
    }

    thread_local! {
        // No destructor: a thread's kept blocks stay allocated when it ends (a bounded amount;
        // the threads that decode live as long as the process).
        static KEPT: [Kept; CLASSES] = const {
            [const {
                Kept {
                    blocks: [const { Cell::new(std::ptr::null_mut()) }; MOST_KEPT],
                    len: Cell::new(0),
                }
            }; CLASSES]
        };
    }

    /// The class of a request: sizes above 1 KiB up to 256 KiB, aligned to at most 64 bytes.
    pub(super) fn class_of(layout: Layout) -> Option<usize> {
        let size = layout.size();
        if size <= 1 << 10 || size > 1 << LAST_SHIFT || layout.align() > ALIGN {
            return None;
        }
        let shift = size.next_power_of_two().trailing_zeros().max(FIRST_SHIFT);
        Some((shift - FIRST_SHIFT) as usize)
    }

    /// The layout every block of `class` is allocated with.
    pub(super) fn layout(class: usize) -> Layout {
        // SAFETY: a power of two of at most 256 KiB and a power-of-two alignment below it.
        unsafe { Layout::from_size_align_unchecked(1 << (class as u32 + FIRST_SHIFT), ALIGN) }
    }

    /// Blocks kept at most for `class`.
    fn capacity(class: usize) -> usize {
        (CLASS_BYTES >> (class as u32 + FIRST_SHIFT)).max(4)
    }

    /// A kept block of `class`, if this thread has one.
    pub(super) fn take(class: usize) -> Option<*mut u8> {
        KEPT.try_with(|kept| {
            let kept = &kept[class];
            let len = kept.len.get();
            (len > 0).then(|| {
                kept.len.set(len - 1);
                kept.blocks[len - 1].get()
            })
        })
        .ok()
        .flatten()
    }

    /// Keeps a freed block of `class`; `false` when this thread's cache of the class is full.
    pub(super) fn keep(class: usize, ptr: *mut u8) -> bool {
        KEPT.try_with(|kept| {
            let kept = &kept[class];
            let len = kept.len.get();
            if len >= capacity(class) {
                return false;
            }
            kept.blocks[len].set(ptr);
            kept.len.set(len + 1);
            true
        })
        .unwrap_or(false)
    }
}

/// Advises the huge pages around a block of `size` bytes at `ptr` (when it is large).
#[cfg_attr(
    not(all(target_os = "linux", target_env = "gnu")),
    allow(unused_variables)
)]
fn advise(ptr: *mut u8, size: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !ptr.is_null() && size >= ADVISED_SIZE && enabled() {
        let start = ptr as usize / HUGE_PAGE * HUGE_PAGE;
        let end = (ptr as usize + size).next_multiple_of(HUGE_PAGE) + HEAP_STEP;
        // SAFETY: advice only; the range's unmapped parts (past the heap's end) are an error
        // return that leaves the mapped parts advised.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// Whether `EMBER_HUGE_PAGES` leaves the advice on (anything but `0`), read once. `getenv`
/// rather than `std::env`, which would allocate inside the allocator.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn enabled() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
    /// 0: not read yet, 1: on, 2: off.
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: a NUL-terminated name; the value, when set, is read before any other
            // call into the environment could change it (the allocator runs before `main`
            // sets variables, if it ever does).
            let off = unsafe {
                let value = libc::getenv(c"EMBER_HUGE_PAGES".as_ptr());
                !value.is_null() && std::ffi::CStr::from_ptr(value).to_bytes() == b"0"
            };
            STATE.store(if off { 2 } else { 1 }, Relaxed);
            !off
        }
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping holding `address`, from `/proc/self/smaps`.
    fn flags_at(address: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) = (
                        usize::from_str_radix(start, 16),
                        usize::from_str_radix(end, 16),
                    ) {
                        inside = (start..end).contains(&address);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.to_owned());
                }
            }
        }
        None
    }

    /// Runs `f` on a new thread, whose block cache holds no other test's blocks.
    fn on_a_fresh_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(f).join().unwrap();
    }

    #[test]
    fn middle_sized_blocks_are_recycled_on_their_thread_and_zeroed_when_asked() {
        on_a_fresh_thread(|| {
            let layout = Layout::from_size_align(3000, 8).unwrap();
            // SAFETY: non-zero sizes; every block is freed once, with its layout.
            unsafe {
                let first = HugePageAlloc.alloc(layout);
                assert!(!first.is_null());
                assert_eq!(
                    first as usize % 64,
                    0,
                    "a class's blocks are 64-byte aligned"
                );
                first.write_bytes(0xAB, layout.size());
                HugePageAlloc.dealloc(first, layout);
                // The same class (4 KiB), another size and alignment: the kept block.
                let zeroed = Layout::from_size_align(4096, 64).unwrap();
                let again = HugePageAlloc.alloc_zeroed(zeroed);
                assert_eq!(again, first);
                let bytes = std::slice::from_raw_parts(again, zeroed.size());
                assert!(bytes.iter().all(|&b| b == 0));
                // Nothing kept now: a fresh block.
                let other = HugePageAlloc.alloc(layout);
                assert_ne!(other, again);
                HugePageAlloc.dealloc(other, layout);
                HugePageAlloc.dealloc(again, zeroed);
            }
        });
    }

    #[test]
    fn reallocation_keeps_the_contents_across_classes_and_beyond_them() {
        on_a_fresh_thread(|| {
            // From below the classes (512 B) through several classes to above them (1 MiB),
            // then back down.
            let sizes = [512, 1500, 1800, 5000, 300_000, 1 << 20, 70_000, 100];
            let mut layout = Layout::from_size_align(sizes[0], 16).unwrap();
            // SAFETY: non-zero sizes; each reallocation passes the block's current layout.
            unsafe {
                let mut ptr = HugePageAlloc.alloc(layout);
                for i in 0..layout.size() {
                    *ptr.add(i) = (i % 251) as u8;
                }
                for &size in &sizes[1..] {
                    let kept = layout.size().min(size);
                    ptr = HugePageAlloc.realloc(ptr, layout, size);
                    assert!(!ptr.is_null());
                    layout = Layout::from_size_align(size, 16).unwrap();
                    for i in 0..kept {
                        assert_eq!(*ptr.add(i), (i % 251) as u8, "byte {i} after {size}");
                    }
                    for i in kept..size {
                        *ptr.add(i) = (i % 251) as u8;
                    }
                }
                HugePageAlloc.dealloc(ptr, layout);
            }
        });
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_blocks_per_class() {
        on_a_fresh_thread(|| {
            let layout = Layout::from_size_align(200_000, 8).unwrap();
            // SAFETY: non-zero sizes; every block is freed once, with its layout.
            unsafe {
                let blocks: Vec<*mut u8> = (0..10).map(|_| HugePageAlloc.alloc(layout)).collect();
                for &b in &blocks {
                    HugePageAlloc.dealloc(b, layout);
                }
                // The 256 KiB class keeps 4 blocks (1 MiB), the first 4 freed; the other 6 went
                // back to the system. They come back last in, first out.
                let again: Vec<*mut u8> = (0..4).map(|_| HugePageAlloc.alloc(layout)).collect();
                let mut kept = blocks[..4].to_vec();
                kept.reverse();
                assert_eq!(again, kept);
                for b in again {
                    HugePageAlloc.dealloc(b, layout);
                }
            }
        });
    }

    #[test]
    fn large_blocks_are_advised_onto_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        if std::env::var("EMBER_HUGE_PAGES").as_deref() == Ok("0") {
            eprintln!("skipped: EMBER_HUGE_PAGES=0 turns the advice off");
            return;
        }
        let large = Layout::from_size_align(8 * HUGE_PAGE, 64).unwrap();
        // SAFETY: a non-zero size; the block is freed with the same layout below.
        let ptr = unsafe { HugePageAlloc.alloc_zeroed(large) };
        assert!(!ptr.is_null());
        // SAFETY: inside the block just allocated, zeroed.
        let values = unsafe { std::slice::from_raw_parts_mut(ptr, large.size()) };
        assert!(values.iter().all(|&v| v == 0));
        values.fill(7);
        let middle = ptr as usize + 4 * HUGE_PAGE;
        let flags = flags_at(middle).expect("the block's mapping is listed");
        assert!(flags.split_whitespace().any(|f| f == "hg"), "flags {flags}");
        // SAFETY: allocated above with this layout.
        unsafe { HugePageAlloc.dealloc(ptr, large) };
    }
}
