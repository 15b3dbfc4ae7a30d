//! Memory shared across fork and clone (the timing marks of `--trace-timings`), and the
//! monotonic clock every process of a run reads alike.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// `len` zeroed 64-bit words in an anonymous `MAP_SHARED` mapping: a process forked or
/// cloned after this sees the same words (until it execs), so a child's stores reach its
/// parent without a message.
pub struct SharedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the words are atomics; the mapping lives as long as the value.
unsafe impl Send for SharedWords {}
// SAFETY: as above: every access goes through an atomic.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    pub fn new(len: usize) -> io::Result<Self> {
        let bytes = len.max(1) * std::mem::size_of::<AtomicU64>();
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedWords { ptr, len })
    }

    /// The word at `i` (panics out of range).
    pub fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len, "shared word {i} of {}", self.len);
        // SAFETY: in bounds, zero-initialised by the kernel, aligned (page-aligned start).
        unsafe { &*self.ptr.as_ptr().add(i) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().cast(),
                self.len.max(1) * std::mem::size_of::<AtomicU64>(),
            );
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of a run (no time
/// namespace is ever made), so marks of the supervisor and of the job's pid 1 compare.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
