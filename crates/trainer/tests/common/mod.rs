//! What every `rattn` end-to-end test needs: running the binary from the repository root,
//! checking that a run succeeded, and the plugins of the ahead-of-time compile tests.

#![allow(dead_code)] // each test file uses its own part

use std::process::{Command, Output};

use pjrt::install::{PluginCache, PluginKind};

/// Runs `rattn args…` from the repository root, with the plugins' INFO logging off.
pub fn rattn(args: &[&str]) -> Output {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    Command::new(env!("CARGO_BIN_EXE_rattn"))
        .current_dir(root)
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .args(args)
        .output()
        .expect("run rattn")
}

/// Asserts that the run succeeded (showing its stderr if not) and returns its stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "rattn failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The plugin cache `rattn` uses: `$RATTN_CACHE/plugins`, else pjrt's default.
pub fn plugin_cache() -> PluginCache {
    match std::env::var_os("RATTN_CACHE").filter(|v| !v.is_empty()) {
        Some(root) => PluginCache::new(std::path::PathBuf::from(root).join("plugins")),
        None => PluginCache::default(),
    }
}

/// Whether test `test` can use plugin `kind` from [`plugin_cache`]
/// ([`PluginCache::ready_for_test`]: installs with `RATTN_AOT_TESTS=1`, else prints a skip line
/// when it is missing).
pub fn have_plugin(kind: PluginKind, test: &str) -> bool {
    plugin_cache()
        .ready_for_test(kind, test)
        .unwrap_or_else(|e| panic!("installing the {kind:?} plugin for {test}: {e}"))
}
