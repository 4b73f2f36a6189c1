//! `rattn train --profile DIR` on the CPU plugin: a tiny run writes a Chrome trace (Perfetto opens
//! it) that parses, holds the measured train-step dispatches and names HLO ops of the optimized
//! train step (fusions, dots, the RLA custom calls) with durations, plus the summary of hot ops.

mod common;

use common::{ok, rattn};

#[test]
fn train_profile_writes_a_trace_with_op_durations() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let prof = dir.path().join("prof");
    let out = rattn(&[
        "train",
        "--out",
        run.to_str().unwrap(),
        "--set",
        "model.seq_len=32",
        "--set",
        "train.batch=2",
        "--set",
        "train.steps=2",
        "--eval-sequences",
        "0",
        "--quiet",
        "--profile",
        prof.to_str().unwrap(),
    ]);
    ok(&out);
    let text = std::fs::read_to_string(prof.join("trace.json")).unwrap();
    let trace: serde_json::Value = serde_json::from_str(&text).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let complete: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    // Two measured dispatches of the step on the host track.
    let steps = complete
        .iter()
        .filter(|e| e["pid"] == 1 && e["name"] == "train_step")
        .count();
    assert_eq!(steps, 2, "{text:.2000}");
    // Replayed ops: named, with an opcode and a positive duration; fusions among them, and the
    // RLA blocks as custom calls.
    let ops: Vec<&&serde_json::Value> = complete.iter().filter(|e| e["pid"] != 1).collect();
    assert!(ops.len() > 20, "{} ops", ops.len());
    for e in &ops {
        assert!(e["dur"].as_f64().unwrap() > 0.0, "{e}");
        assert!(!e["name"].as_str().unwrap().is_empty(), "{e}");
    }
    assert!(ops.iter().any(|e| e["args"]["opcode"] == "fusion"));
    assert!(ops.iter().any(|e| e["args"]["detail"]
        .as_str()
        .unwrap_or("")
        .starts_with("rattention.rla_")));
    // Ops follow one another in program order.
    let mut t = 0.0;
    for e in &ops {
        let ts = e["ts"].as_f64().unwrap();
        assert!((ts - t).abs() < 1e-6 * t.max(1.0), "{e}");
        t = ts + e["dur"].as_f64().unwrap();
    }
    let summary = std::fs::read_to_string(prof.join("summary.txt")).unwrap();
    assert!(
        summary.contains("train_step:") && summary.contains("replayed sum"),
        "{summary}"
    );
    assert!(summary.contains("no PJRT profiler extension"), "{summary}");
}
