//! Shared pieces of the workspace benches in `/benches`: CPU time of the process, the load
//! average, per-call timing records that survive criterion's runs, and the ratio table.
//!
//! ```
//! let t = rattention_benches::Timings::default();
//! t.time("x", 3, || {});
//! assert!(t.median_ms("x").is_some());
//! ```

#![forbid(unsafe_code)]

pub use pallas_port::bench_util::{cpu_s, env_list, load, Timings};

/// One row of a ratio table: a label and its (wall ms, CPU ms) per call.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was timed, e.g. `rattention`.
    pub label: String,
    /// Median wall ms per call.
    pub wall_ms: f64,
    /// Median CPU ms per call (all threads).
    pub cpu_ms: f64,
}

/// A table of `rows` with tokens/s for `tokens` per call and each row's speed relative to the
/// row labelled `base` (`base time / row time`, > 1: faster), on wall and on CPU time.
pub fn ratio_table(title: &str, rows: &[Row], tokens: f64, base: &str) -> String {
    let b = rows.iter().find(|r| r.label == base);
    let mut s = format!(
        "{title}\n  {:<14} {:>11} {:>11} {:>11} {:>10} {:>10}\n",
        "",
        "wall ms",
        "CPU ms",
        "tok/s",
        format!("× {base}"),
        "(CPU)"
    );
    for r in rows {
        let (rw, rc) = b.map_or((f64::NAN, f64::NAN), |b| {
            (b.wall_ms / r.wall_ms, b.cpu_ms / r.cpu_ms)
        });
        s += &format!(
            "  {:<14} {:>11.2} {:>11.2} {:>11.0} {:>10.2} {:>10.2}\n",
            r.label,
            r.wall_ms,
            r.cpu_ms,
            tokens / (r.wall_ms * 1e-3),
            rw,
            rc
        );
    }
    s
}
