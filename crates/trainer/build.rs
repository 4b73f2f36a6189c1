//! Exports jemalloc's `mallctl` from `rattn` and the examples (they link jemalloc as the C
//! allocator: `malloc`/`free` are exported already, as shared libraries use them), so that
//! `pjrt::host_memory` finds it with `dlsym` and tunes the allocator the plugins use too.

fn main() {
    let target = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=mallctl");
        println!("cargo:rustc-link-arg-examples=-Wl,--export-dynamic-symbol=mallctl");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
