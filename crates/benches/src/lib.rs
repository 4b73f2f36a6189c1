//! Shared pieces of the workspace benches in `/benches`: CPU time of the process, the load
//! average, per-call timing records that survive criterion's runs, and the ratio table.
//!
//! ```
//! let t = rattention_benches::Timings::default();
//! t.time("x", 3, || {});
//! assert!(t.median_ms("x").is_some());
//! ```

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds on the CPU of all threads of this process so far, from
/// `/proc/self/task/*/schedstat` (Linux; NaN elsewhere). On a machine other jobs keep busy, wall
/// time measures the scheduler too; CPU time still measures the work.
pub fn cpu_s() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ns = 0u64;
    for e in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 * 1e-9
}

/// The 1-minute load average, or `?`.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The comma-separated numbers in environment variable `name` (unparsable items skipped).
pub fn env_list(name: &str) -> Option<Vec<usize>> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
}

/// Per-call (wall, CPU) seconds by bench id, recorded inside criterion's `iter_custom`.
#[derive(Debug, Default)]
pub struct Timings(Mutex<BTreeMap<String, Vec<(f64, f64)>>>);

impl Timings {
    /// Times `iters` calls of `f`, records wall and CPU seconds per call under `id`, and returns
    /// the wall time (what `iter_custom` wants).
    pub fn time(&self, id: &str, iters: u64, mut f: impl FnMut()) -> Duration {
        let c0 = cpu_s();
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        let el = start.elapsed();
        let n = iters.max(1) as f64;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .push((el.as_secs_f64() / n, (cpu_s() - c0) / n));
        el
    }

    /// Medians (wall ms, CPU ms) per call over the second half of the records of `id`
    /// (criterion's measurement samples; the first half holds its warm-up).
    pub fn median_ms(&self, id: &str) -> Option<(f64, f64)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = map.get(id)?;
        let last = &v[v.len() / 2..];
        let med = |mut x: Vec<f64>| {
            x.sort_by(|a, b| a.total_cmp(b));
            x.get(x.len() / 2).map_or(f64::NAN, |s| s * 1e3)
        };
        Some((
            med(last.iter().map(|t| t.0).collect()),
            med(last.iter().map(|t| t.1).collect()),
        ))
    }
}

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
