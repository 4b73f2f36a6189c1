//! `rattn bench peak` measures and caches the matmul peak; `rattn train` reports MFU against it.
//! No timed assertions: only that the numbers exist, are finite and positive, and are reused.

mod common;

use common::ok;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The plugin directory the other tests use (`$RATTN_CACHE/plugins` or the default).
fn real_plugins() -> PathBuf {
    match std::env::var_os("RATTN_CACHE").filter(|v| !v.is_empty()) {
        Some(root) => PathBuf::from(root).join("plugins"),
        None => pjrt::install::PluginCache::default_dir(),
    }
}

/// Runs `rattn args…` from the repository root with `RATTN_CACHE=cache`.
fn rattn_in(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rattn"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .env("RATTN_CACHE", cache)
        .args(args)
        .output()
        .expect("run rattn")
}

fn cached_value(cache: &Path) -> f64 {
    let text = std::fs::read_to_string(cache.join("peak.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["size", "date", "cpu", "threads", "platform"] {
        assert!(v.get(key).is_some(), "peak.json lacks {key}: {text}");
    }
    assert_eq!(v["size"], 256);
    v["flops_per_s"].as_f64().unwrap()
}

#[test]
fn bench_peak_is_cached_and_train_reports_mfu_against_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    // The temporary cache shares the installed plugins.
    std::os::unix::fs::symlink(real_plugins(), cache.join("plugins")).unwrap();

    // Without a peak, train says how to measure one and writes no `mfu`.
    let run0 = dir.path().join("run0");
    let train = |run: &Path| {
        ok(&rattn_in(
            &cache,
            &[
                "train",
                "--out",
                run.to_str().unwrap(),
                "--eval-sequences",
                "0",
                "--quiet",
                "--set",
                "train.steps=3",
                "--set",
                "train.log_every=1",
                "--set",
                "model.seq_len=32",
                "--set",
                "train.batch=2",
            ],
        ))
    };
    let stdout = train(&run0);
    assert!(stdout.contains("final loss"), "{stdout}");
    assert!(
        stdout.contains("MFU: run `rattn bench peak` once"),
        "{stdout}"
    );
    assert!(!cache.join("peak.json").exists(), "train must not measure");
    let metrics = std::fs::read_to_string(run0.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("model_flops_per_s") && !metrics.contains("\"mfu\""));

    // First call measures and writes the cache; the second reuses it.
    let first = ok(&rattn_in(&cache, &["bench", "peak", "--size", "256"]));
    assert!(first.contains("measured now"), "{first}");
    let value = cached_value(&cache);
    assert!(value.is_finite() && value > 0.0, "{value}");
    let second = ok(&rattn_in(&cache, &["bench", "peak", "--size", "256"]));
    assert!(second.contains("cached"), "{second}");
    assert_eq!(cached_value(&cache), value);

    // With a cached peak every metrics line carries a finite positive MFU.
    let run1 = dir.path().join("run1");
    let stdout = train(&run1);
    assert!(
        stdout.contains("final loss") && stdout.contains("MFU "),
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(run1.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        let mfu = l["mfu"].as_f64().expect("mfu in every metrics line");
        let achieved = l["model_flops_per_s"].as_f64().unwrap();
        assert!(mfu.is_finite() && mfu > 0.0, "{l}");
        assert!(achieved.is_finite() && achieved > 0.0, "{l}");
        assert!((mfu * value - achieved).abs() <= 1e-9 * achieved, "{l}");
    }
}
