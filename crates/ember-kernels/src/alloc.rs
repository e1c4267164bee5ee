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

/// The system allocator, with large blocks placed on transparent huge pages (Linux): a global
/// allocator for applications that decode (`#[global_allocator] static A: HugePageAlloc =
/// HugePageAlloc;`), as `ember` (the CLI) and the benches use it.
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
/// `EMBER_HUGE_PAGES=0` turns the advice off (the allocator is then `System`).
///
/// Measured on the 2-core AVX-512 VM with SmolLM2 in f32, alternated with the same code on
/// 4 KiB pages: batch-1 generation 1.41-1.50 → 1.27-1.33 s, batch 8 3.74-3.77 → 3.30-3.35 s,
/// `ember generate` at 272 tokens 6.28-6.85 → 5.91-6.39 s; the training rows unchanged. The
/// bandwidth bound row rises too (16.4-16.7 → 14.9-15.3 ms): reading memory costs less on
/// huge pages whoever reads it. On that VM the first touch of a huge page is sometimes slow
/// (the hypervisor backing fresh memory): one start in six took 1.7 s instead of 0.75 s.
pub struct HugePageAlloc;

// SAFETY: every call is passed on to `System` unchanged; advising a mapped range onto huge
// pages changes neither its contents nor its mapping.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // glibc's `calloc` clears only memory it reuses (already touched, so its pages are
        // set); fresh memory from the system is left untouched for the advice to apply.
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { System.realloc(ptr, layout, new_size) };
        advise(ptr, new_size);
        ptr
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
