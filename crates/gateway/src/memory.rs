//! Handing freed heap memory back to the operating system.
//!
//! glibc's allocator keeps memory freed by a burst of large transfers in its per-thread arenas,
//! so RSS stays at the burst's peak long after the buffers are gone. `malloc_trim` returns the
//! free pages; it costs a few milliseconds of one thread, so it runs on a slow timer.

/// Returns free heap pages to the OS where the allocator supports it (glibc on Linux).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
