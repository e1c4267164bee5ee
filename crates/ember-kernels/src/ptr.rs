//! Raw pointers that parallel tasks may share.
//!
//! The kernels hand one buffer to several rayon tasks: inputs that every task reads, and an
//! output of which each task writes its own disjoint part (its rows, columns or heads). Rust's
//! references cannot say "disjoint strided parts", so the tasks get these pointer wrappers,
//! and each kernel states at its `unsafe` blocks why its offsets stay inside the buffer and
//! apart from the other tasks'.

/// A pointer into a buffer that the tasks only read while they run.
#[derive(Clone, Copy)]
pub(crate) struct Shared(*const f32);
// SAFETY: the buffer is not written while the tasks run.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Wraps a pointer to a buffer that stays unwritten while the tasks run.
    pub(crate) fn new(p: *const f32) -> Self {
        Self(p)
    }

    /// The pointer `n` elements further on.
    ///
    /// # Safety
    /// The result must stay inside the buffer.
    pub(crate) unsafe fn at(self, n: isize) -> *const f32 {
        unsafe { self.0.offset(n) }
    }
}

/// A pointer into an output buffer of which each task writes a part no other task touches.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
// SAFETY: the tasks write disjoint elements (each kernel says which).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Wraps a pointer to an output buffer that the tasks split between them.
    pub(crate) fn new(p: *mut f32) -> Self {
        Self(p)
    }

    /// The pointer `n` elements further on.
    ///
    /// # Safety
    /// The result must stay inside the buffer, in the part this task writes.
    pub(crate) unsafe fn at(self, n: isize) -> *mut f32 {
        unsafe { self.0.offset(n) }
    }
}
