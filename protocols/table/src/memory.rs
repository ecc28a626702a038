//! Handing back the heap a whole table freed.

/// Returns to the kernel the memory freed by dropping a whole table and
/// what was built with it (a decoded request, a Kubernetes list, the
/// table's other forms). glibc keeps freed memory in each thread's arena,
/// so without this a process's RSS stays at the peak of its largest table
/// for good; musl's allocator (the static builds) returns it by itself.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
