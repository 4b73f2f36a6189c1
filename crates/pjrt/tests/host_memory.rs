//! `pjrt::host_memory::retain_freed_memory`: a large buffer allocated, touched and freed on a
//! worker thread (as the XLA CPU plugin does with each execution's temporary buffer) comes back
//! already mapped the next time, instead of costing one page fault per page again. Its own test
//! binary without libtest's harness (`harness = false`): the setting is made first in `main`,
//! before any thread has an arena of its own, as `rattn` does, and no other test's threads add
//! page faults to the count.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
/// Minor page faults of this process so far (`/proc/self/stat` field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesised command name; minflt is field 10, the 8th after it.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    rest.split_whitespace()
        .nth(7)
        .expect("minflt")
        .parse()
        .expect("minflt number")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
/// Allocates `bytes` on a new thread, writes one byte per 4 KiB page, frees it.
fn touch_on_a_thread(bytes: usize) {
    std::thread::spawn(move || {
        let mut v = vec![0u8; bytes];
        for i in (0..bytes).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
    })
    .join()
    .unwrap();
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("host_memory: skipped (glibc on Linux only)");
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    if std::env::var("RATTN_MALLOC").is_ok_and(|v| v == "default") {
        println!("host_memory: skipped (RATTN_MALLOC=default turns retain_freed_memory off)");
        return;
    }
    assert!(pjrt::host_memory::retain_freed_memory());
    let bytes = 256 << 20;
    let pages = (bytes / 4096) as u64;
    touch_on_a_thread(bytes);
    let f0 = minor_faults();
    touch_on_a_thread(bytes);
    let again = minor_faults() - f0;
    // glibc's defaults map the 65,536 pages afresh (one fault each); kept memory needs none
    // beyond the new thread's stack and bookkeeping.
    assert!(
        again < pages / 20,
        "{again} page faults for the second 256 MiB buffer ({pages} pages)"
    );
    println!(
        "host_memory: a_freed_large_buffer_is_reused_without_page_faults ... ok \
         ({again} page faults for {pages} pages)"
    );
}
