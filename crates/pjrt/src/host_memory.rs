//! How the process's C allocator hands host memory to the plugins.
//!
//! The XLA CPU plugin allocates each execution's temporary buffer with `posix_memalign` (708 MB
//! for the train step of `configs/bench.toml` at T = 1024) and frees it when the execution ends.
//! With glibc's defaults that allocation, made on one of the plugin's worker threads, comes from a
//! per-thread arena, which cannot hold chunks above 64 MB, so glibc maps it fresh (`mmap`) and
//! unmaps it on `free`: every step the kernel zero-fills and maps the whole buffer again, page by
//! page (≈ 170,000 page faults a step, ~20 % of the step's CPU time on the 2-core development
//! machine). [`retain_freed_memory`] keeps freed memory mapped so the next execution reuses it.
//!
//! Two allocators are handled. When the process's `malloc` is jemalloc (the `rattn` binary, its
//! examples and the benches link it as their global allocator and export `malloc`, `free` and
//! `mallctl` dynamically, so the plugin's calls bind to it too), freed memory is kept by turning
//! jemalloc's decay off: its per-thread arenas serve the compile threads without a common lock.
//! Otherwise glibc is told to serve every allocation from its one main heap and keep freed memory
//! there; that works too, but the compile's threads then contend for the one arena's lock
//! (the train-step compile takes ~20 % more CPU).

/// The `RATTN_MALLOC` value that leaves glibc's allocator as it is (for comparisons).
pub const DEFAULT_MALLOC: &str = "default";

/// The C allocator this process's `malloc` comes from, as [`malloc_kind`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MallocKind {
    /// jemalloc (its `mallctl` is visible to the dynamic linker).
    Jemalloc,
    /// glibc's `malloc` (Linux with glibc, no jemalloc found).
    Glibc,
    /// Anything else.
    Other,
}

/// Which allocator serves `malloc` in this process: jemalloc when a `mallctl` symbol is visible
/// in the global scope (linked into the executable and exported, or preloaded), else glibc's on
/// Linux with glibc.
pub fn malloc_kind() -> MallocKind {
    imp::malloc_kind()
}

/// Keeps freed host memory for reuse instead of returning it to the kernel; the process's
/// resident memory then stays at its peak.
///
/// - jemalloc ([`MallocKind::Jemalloc`]): dirty and muzzy decay off (`-1`) for every arena,
///   the existing ones and those created later (`arenas.dirty_decay_ms`, `arena.<i>.…`).
/// - glibc: one arena for all threads (`M_ARENA_MAX` 1), no separate mappings for large chunks
///   (`M_MMAP_MAX` 0: they come from the main heap), and no trimming of the heap's free top
///   (`M_TRIM_THRESHOLD` −1).
///
/// Call it first in `main`, before any thread starts (a glibc thread keeps the arena it already
/// has). Does nothing, and returns `false`, when the environment variable `RATTN_MALLOC` is
/// [`DEFAULT_MALLOC`] (`default`: the allocator keeps its own defaults), or off Linux with glibc;
/// otherwise returns whether the allocator accepted every setting.
pub fn retain_freed_memory() -> bool {
    if std::env::var("RATTN_MALLOC").is_ok_and(|v| v == DEFAULT_MALLOC) {
        return false;
    }
    imp::retain_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::MallocKind;
    use std::ffi::{c_char, c_int, c_void};

    // <malloc.h>
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_MAX: c_int = -4;
    const M_ARENA_MAX: c_int = -8;

    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    /// jemalloc's `mallctl(name, oldp, oldlenp, newp, newlen)`.
    type Mallctl =
        unsafe extern "C" fn(*const c_char, *mut c_void, *mut usize, *mut c_void, usize) -> c_int;

    /// jemalloc's `mallctl` if the dynamic linker sees one in the global scope.
    fn mallctl() -> Option<Mallctl> {
        let this = libloading::os::unix::Library::this();
        // SAFETY: a `mallctl` symbol in the global scope is jemalloc's, whose C signature is the
        // type above; the library handle of the process itself is never unloaded, so the
        // function pointer stays valid after `this` is dropped.
        unsafe { this.get::<Mallctl>(b"mallctl\0") }
            .ok()
            .map(|f| *f)
    }

    pub(super) fn malloc_kind() -> MallocKind {
        if mallctl().is_some() {
            MallocKind::Jemalloc
        } else {
            MallocKind::Glibc
        }
    }

    /// Writes a `ssize_t` control; true when jemalloc accepted it.
    fn write_ssize(ctl: Mallctl, name: &str, value: isize) -> bool {
        let Ok(name) = std::ffi::CString::new(name) else {
            return false;
        };
        let mut v = value;
        // SAFETY: `name` is NUL-terminated; `newp` points at a live `ssize_t` of `newlen` bytes
        // (the type of jemalloc's `*_decay_ms` controls); nothing is read back.
        let rc = unsafe {
            ctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&mut v as *mut isize).cast(),
                std::mem::size_of::<isize>(),
            )
        };
        rc == 0
    }

    /// Reads an `unsigned` control.
    fn read_u32(ctl: Mallctl, name: &str) -> Option<u32> {
        let name = std::ffi::CString::new(name).ok()?;
        let (mut v, mut len) = (0u32, std::mem::size_of::<u32>());
        // SAFETY: `oldp`/`oldlenp` point at a live `unsigned` and its size, as the control's
        // type asks; nothing is written.
        let rc = unsafe {
            ctl(
                name.as_ptr(),
                (&mut v as *mut u32).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0).then_some(v)
    }

    fn retain_jemalloc(ctl: Mallctl) -> bool {
        let mut ok = true;
        for kind in ["dirty", "muzzy"] {
            // Arenas created from now on (the per-thread ones, the one for huge allocations).
            ok &= write_ssize(ctl, &format!("arenas.{kind}_decay_ms"), -1);
            // Arenas that exist already; slots not yet initialised refuse and are skipped.
            let n = read_u32(ctl, "arenas.narenas").unwrap_or(1);
            for i in 0..n {
                let set = write_ssize(ctl, &format!("arena.{i}.{kind}_decay_ms"), -1);
                ok &= set || i > 0;
            }
        }
        ok
    }

    pub(super) fn retain_freed_memory() -> bool {
        if let Some(ctl) = mallctl() {
            return retain_jemalloc(ctl);
        }
        [(M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)]
            .into_iter()
            // SAFETY: mallopt only sets glibc allocator parameters; it is thread-safe (it takes
            // the main arena's lock) and these values are documented as valid.
            .all(|(p, v)| unsafe { mallopt(p, v) } == 1)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    use super::MallocKind;

    pub(super) fn malloc_kind() -> MallocKind {
        MallocKind::Other
    }

    pub(super) fn retain_freed_memory() -> bool {
        false
    }
}
