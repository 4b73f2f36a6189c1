//! Exports jemalloc's `mallctl` from the benches (they link jemalloc as the C allocator, as
//! `rattn` does), so that `pjrt::host_memory` finds it with `dlsym` and tunes the allocator the
//! plugins use too.

fn main() {
    let target = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-benches=-Wl,--export-dynamic-symbol=mallctl");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
