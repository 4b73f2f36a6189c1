//! What every `rattn` end-to-end test needs: running the binary from the repository root, and
//! checking that a run succeeded.

#![allow(dead_code)] // each test file uses its own part

use std::process::{Command, Output};

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
