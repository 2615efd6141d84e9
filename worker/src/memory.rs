//! The host allocator, tuned for a worker's pattern: the same large
//! buffers (activations of tens to hundreds of MiB) allocated and freed at
//! every forward.
//!
//! glibc serves allocations over its mmap threshold with a fresh `mmap` and
//! returns them with `munmap` when freed, so each forward page-faults and
//! zeroes every page of every activation again; profiles of tiled jobs are
//! dominated by `clear_page_erms` and `exc_page_fault`. Served from the
//! heap instead and kept there while a job runs, freed buffers are reused
//! as they are. Once the worker has been idle for [`IDLE_TRIM`], what was
//! freed is given back to the system (`malloc_trim`, which also releases
//! free pages in the middle of the heap), so an idle model holds what it
//! holds, not its last job's peak.

use std::time::Duration;

/// Allocations above this still get a mapping of their own, returned when
/// freed: the few buffers that large (a blend window over a wide output)
/// would otherwise stay in the heap as holes a later, larger one cannot use
/// (with no mapping at all, the 8192² test's worker peaked 600 MiB higher;
/// at 160 MiB it is within 100 MiB of glibc's default, and tiles keep most
/// of the speed: waifu2x activations of a 512 tile are at most ~130 MiB).
const MMAP_ABOVE: libc::c_int = 160 << 20;

/// Idle this long after work, the worker gives freed memory back.
pub const IDLE_TRIM: Duration = Duration::from_secs(1);

/// Keeps freed memory in the heap for reuse: no mmap per allocation up to
/// [`MMAP_ABOVE`], no automatic trimming. Called once, before anything is
/// allocated.
pub fn keep_freed_memory() {
    // SAFETY: mallopt only changes glibc's malloc parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_ABOVE);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Gives memory freed since the last trim back to the system.
pub fn return_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
