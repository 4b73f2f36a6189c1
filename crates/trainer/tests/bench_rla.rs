//! `rattn bench rla` on the CPU plugin: both lowerings run, and their outputs agree with the CPU
//! kernels run on the host (what the bench reports as errors), at a small shape with several
//! chunks, a window smaller than the chunk, and T not a multiple of the chunk.

mod common;

use common::{ok, rattn};

#[test]
fn bench_rla_runs_every_cpu_lowering_and_checks_it_against_the_host_kernels() {
    let dir = std::env::temp_dir().join(format!("rattn-bench-rla-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("rla.json");
    let out = rattn(&[
        "bench",
        "rla",
        "--seq",
        "200",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "16",
        "--window",
        "24",
        "--chunk",
        "64",
        "--sub-chunk",
        "16",
        "--reps",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let text = ok(&out);
    assert!(text.contains("custom_call vs hlo"), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["platform"], "cpu");
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["lowering"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["custom_call", "hlo"]);
    for row in rows {
        for key in ["fwd_err", "fwd_bwd_err"] {
            for e in row[key].as_array().unwrap() {
                let e = e.as_f64().unwrap();
                assert!(e < 1e-5, "{} {key} {e}: {text}", row["lowering"]);
            }
        }
        assert!(row["fwd_ms"].as_f64().unwrap() > 0.0);
    }
    // A bad lowering name is refused with the list of valid ones.
    let bad = rattn(&["bench", "rla", "--lowering", "nope", "--seq", "64"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("unknown lowering \"nope\"") && err.contains("hlo"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
