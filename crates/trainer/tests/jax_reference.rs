//! The JAX model of scripts/jax (an independent implementation of DESIGN §2 in plain JAX) against
//! `rattn train`: same checkpoint, same batch, the loss within 1e-6 relative, the gradient norm
//! within 1e-4 and the AdamW update within 1e-3 of its size (scripts/jax/check.py decides).
//!
//! Skipped, saying so, when no Python with jax is found: CI does not install jax. Install it with
//! `bash scripts/jax/install.sh` (a venv in scripts/jax/.venv), or point `RATTN_JAX_PYTHON` at a
//! Python that has jax and safetensors.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn jax_model_matches_rattn_train_on_the_same_checkpoint() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let python = std::env::var_os("RATTN_JAX_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("scripts/jax/.venv/bin/python"));
    let has_jax = Command::new(&python)
        .args(["-c", "import jax, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_jax {
        eprintln!(
            "skipped: no Python with jax and safetensors at {} (bash scripts/jax/install.sh, or set RATTN_JAX_PYTHON)",
            python.display()
        );
        return;
    }
    let out = Command::new(&python)
        .current_dir(&root)
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .args([
            "scripts/jax/check.py",
            "--rattn",
            env!("CARGO_BIN_EXE_rattn"),
            "--case",
            "rattention",
            "--case",
            "rattention-qknorm-untied-geglu-relu",
        ])
        .output()
        .expect("run scripts/jax/check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "scripts/jax/check.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 passed, 0 failed"),
        "unexpected summary:\n{stdout}"
    );
}
