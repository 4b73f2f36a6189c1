//! Measuring helpers shared by the workspace's benches (pallas-port's, model's and the
//! workspace-level ones in `/benches`): CPU time of the process, the load average, per-call
//! timing records that survive criterion's runs, environment lists, deterministic inputs.
//!
//! On a machine that other jobs keep busy, wall time measures the scheduler too; CPU time of
//! all threads of the process still measures the work, so the benches print both.
//!
//! ```
//! use pallas_port::bench_util::Timings;
//! let t = Timings::new();
//! t.time("x", 3, || {});
//! assert!(t.median_ms("x").is_some());
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds on the CPU of all threads of this process so far, from
/// `/proc/self/task/*/schedstat` (Linux; NaN elsewhere).
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

/// Minor page faults of this process so far (`/proc/self/stat`, field 10; NaN elsewhere): a
/// kernel that takes fresh zeroed memory on every call shows up here.
pub fn minor_faults() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // The fields after the command name's closing parenthesis start at field 3 (state).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .nth(7)
        .and_then(|x| x.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The 1-minute load average, or `?`.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The number in environment variable `name`, or `default` when it is unset. A value that is
/// not a count stops the bench with a message naming the variable (a typo must not silently
/// measure the default).
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} = {v:?} is not a count"))
    })
}

/// The comma-separated numbers in environment variable `name` (unparsable items skipped).
pub fn env_list(name: &str) -> Option<Vec<usize>> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
}

/// `n` deterministic values in `[-1, 1)` from `seed` (xorshift64).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// [`data`] scaled into `[-a, a)`.
pub fn data_scaled(n: usize, seed: u64, a: f32) -> Vec<f32> {
    data(n, seed).into_iter().map(|v| v * a).collect()
}

/// max |a − b| / max |b| of f32 results `a` against an f64 reference `b`.
pub fn max_rel(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Per-call (wall, CPU) seconds by bench id, recorded inside criterion's `iter_custom`.
#[derive(Debug, Default)]
pub struct Timings(Mutex<BTreeMap<String, Vec<(f64, f64)>>>);

impl Timings {
    /// No records yet (usable in a `static`).
    pub const fn new() -> Self {
        Timings(Mutex::new(BTreeMap::new()))
    }

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
        self.median_ms_of(id, |n| n / 2)
    }

    /// Medians (wall ms, CPU ms) per call over the last `samples` records of `id`.
    pub fn median_ms_last(&self, id: &str, samples: usize) -> Option<(f64, f64)> {
        self.median_ms_of(id, |n| n.saturating_sub(samples))
    }

    /// Medians over the records of `id` from index `first(len)` on.
    fn median_ms_of(&self, id: &str, first: impl Fn(usize) -> usize) -> Option<(f64, f64)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = map.get(id)?;
        let last = &v[first(v.len())..];
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lists_and_data_are_read_and_deterministic() {
        std::env::set_var("RATTN_BENCH_UTIL_TEST_LIST", "1, 4096,x,,8");
        assert_eq!(
            env_list("RATTN_BENCH_UTIL_TEST_LIST"),
            Some(vec![1, 4096, 8])
        );
        assert_eq!(env_list("RATTN_BENCH_UTIL_TEST_UNSET"), None);
        let d = data(1000, 7);
        assert!(d.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_eq!(d, data(1000, 7));
        assert_ne!(d, data(1000, 8));
    }

    #[test]
    fn cpu_time_grows_with_work_and_timings_record_it() {
        let c0 = cpu_s();
        let t = Timings::new();
        let wall = t.time("spin", 4, || {
            let start = Instant::now();
            let mut x = 0u64;
            while start.elapsed() < Duration::from_millis(5) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
        assert!(wall >= Duration::from_millis(20), "{wall:?}");
        assert!(cpu_s() > c0, "no CPU time counted for a busy loop");
        let (w, c) = t.median_ms("spin").unwrap();
        assert!(w >= 5.0 && c > 0.0, "wall {w} ms, cpu {c} ms per call");
        assert_eq!(t.median_ms_last("spin", 1), t.median_ms("spin"));
        assert!(t.median_ms("other").is_none());
    }
}
