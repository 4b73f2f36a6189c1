//! How the process's C allocator hands host memory to the plugins.
//!
//! The XLA CPU plugin allocates each execution's temporary buffer with `posix_memalign` (708 MB
//! for the train step of `configs/bench.toml` at T = 1024) and frees it when the execution ends.
//! With glibc's defaults that allocation, made on one of the plugin's worker threads, comes from a
//! per-thread arena, which cannot hold chunks above 64 MB, so glibc maps it fresh (`mmap`) and
//! unmaps it on `free`: every step the kernel zero-fills and maps the whole buffer again, page by
//! page (≈ 170,000 page faults a step, ~20 % of the step's CPU time on the 2-core development
//! machine). [`retain_freed_memory`] makes glibc serve every allocation from its one main heap
//! and keep freed memory there, so the next execution reuses the pages already mapped.

/// The `RATTN_MALLOC` value that leaves glibc's allocator as it is (for comparisons).
pub const DEFAULT_MALLOC: &str = "default";

/// Tells glibc's `malloc` to keep freed host memory for reuse instead of returning it to the
/// kernel: one arena for all threads (`M_ARENA_MAX` 1), no separate mappings for large chunks
/// (`M_MMAP_MAX` 0: they come from the main heap), and no trimming of the heap's free top
/// (`M_TRIM_THRESHOLD` −1). The process's resident memory then stays at its peak.
///
/// Call it first in `main`, before any thread starts (a thread keeps the arena it already has).
/// Does nothing, and returns `false`, when the environment variable `RATTN_MALLOC` is
/// [`DEFAULT_MALLOC`] (`default`), or off Linux with glibc; otherwise returns whether glibc
/// accepted all three settings.
pub fn retain_freed_memory() -> bool {
    if std::env::var("RATTN_MALLOC").is_ok_and(|v| v == DEFAULT_MALLOC) {
        return false;
    }
    imp::retain_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::os::raw::c_int;

    // <malloc.h>
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_MAX: c_int = -4;
    const M_ARENA_MAX: c_int = -8;

    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    pub(super) fn retain_freed_memory() -> bool {
        [(M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)]
            .into_iter()
            // SAFETY: mallopt only sets glibc allocator parameters; it is thread-safe (it takes
            // the main arena's lock) and these values are documented as valid.
            .all(|(p, v)| unsafe { mallopt(p, v) } == 1)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn retain_freed_memory() -> bool {
        false
    }
}
