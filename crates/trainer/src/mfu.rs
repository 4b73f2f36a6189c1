//! Model FLOPs utilisation: the machine's measured f32 matmul peak (`rattn bench peak`, cached
//! in `peak.json` under the rattention cache root) and the arithmetic `rattn train` reports with
//! it (achieved FLOP/s = tokens/s × model FLOPs per token, MFU = achieved / peak).
//!
//! The peak is what XLA reaches on one large f32 `dot` compiled through our own stack (hlo-builder
//! and the PJRT client) with all threads, best of a few runs: the sgemm the plugin links is not
//! ours to call, so we measure the one it uses. It is a throughput measured here, not a
//! datasheet figure. Model FLOPs per token come from [`model::Model::cost`] (no recount).

use crate::runtime;
use anyhow::{bail, Context, Result};
use hlo_builder::{Builder, ElementType, Shape};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Default side of the square matrices `rattn bench peak` multiplies.
pub const DEFAULT_SIZE: usize = 2048;

/// A measured matmul peak, as cached in `peak.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    /// Best f32 FLOP/s reached (2·n³ FLOPs per product).
    pub flops_per_s: f64,
    /// Side n of the `[n,n]×[n,n]` product.
    pub size: usize,
    /// Timed repetitions the best was taken from (after one warm-up run).
    pub repetitions: usize,
    /// PJRT platform the product ran on (`cpu`).
    pub platform: String,
    /// CPU model from `/proc/cpuinfo` (`unknown` where it cannot be read).
    pub cpu: String,
    /// Hardware threads available to the process when it was measured.
    pub threads: usize,
    /// UTC date of the measurement, `YYYY-MM-DD`.
    pub date: String,
    /// Seconds since the Unix epoch of the measurement.
    pub unix_time: u64,
}

/// Where the peak is cached: `peak.json` under [`runtime::cache_root`].
pub fn peak_path() -> PathBuf {
    runtime::cache_root().join("peak.json")
}

/// The cached peak for `platform`, if one was measured (never measures: a measurement inside a
/// training run would distort it). An unreadable cache file counts as none.
pub fn cached_peak(platform: &str) -> Option<Peak> {
    let text = std::fs::read_to_string(peak_path()).ok()?;
    let peak: Peak = serde_json::from_str(&text).ok()?;
    (peak.platform == platform && peak.flops_per_s.is_finite() && peak.flops_per_s > 0.0)
        .then_some(peak)
}

/// What a run achieved against the peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Utilization {
    /// Model FLOPs per training token ([`model::Flops::total`]).
    pub flops_per_token: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Achieved model FLOP/s: tokens/s × FLOPs per token.
    pub flops_per_s: f64,
    /// Achieved / peak, when a peak is known.
    pub mfu: Option<f64>,
}

impl Utilization {
    /// Achieved FLOP/s and MFU from FLOPs per token, tokens/s and the peak FLOP/s (if measured).
    pub fn new(flops_per_token: f64, tokens_per_s: f64, peak_flops_per_s: Option<f64>) -> Self {
        let flops_per_s = tokens_per_s * flops_per_token;
        Utilization {
            flops_per_token,
            tokens_per_s,
            flops_per_s,
            mfu: peak_flops_per_s
                .filter(|p| *p > 0.0)
                .map(|p| flops_per_s / p),
        }
    }
}

/// FLOP/s in engineering units: `123.4 GFLOP/s`.
pub fn format_flops(x: f64) -> String {
    let (v, unit) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else {
        (x, "")
    };
    format!("{v:.1} {unit}FLOP/s")
}

/// Arguments of `rattn bench peak`.
#[derive(clap::Args, Clone)]
pub struct PeakArgs {
    /// Side n of the `[n,n]×[n,n]` f32 product (default 2048; small sizes for tests).
    #[arg(long)]
    pub size: Option<usize>,
    /// Timed repetitions; the best is kept.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Measure again even when a peak is cached.
    #[arg(long)]
    pub refresh: bool,
    /// PJRT plugin: cpu (default), cuda, tpu, or a path to a plugin .so.
    #[arg(long)]
    pub plugin: Option<String>,
}

/// `rattn bench peak`: print the cached peak, or measure it (and cache it) when there is none,
/// when `--refresh` asks, or when `--size` differs from the cached size.
pub fn run_peak(args: &PeakArgs) -> Result<()> {
    let client = runtime::open_client(args.plugin.as_deref())?;
    let platform = client.platform_name()?;
    let path = peak_path();
    if !args.refresh {
        if let Some(p) = cached_peak(&platform).filter(|p| args.size.is_none_or(|n| n == p.size)) {
            println!(
                "peak {} (cached in {}, measured {} on {} with {} threads, f32 dot {n}x{n}x{n}; \
                 --refresh re-measures)",
                format_flops(p.flops_per_s),
                path.display(),
                p.date,
                p.cpu,
                p.threads,
                n = p.size,
            );
            return Ok(());
        }
    }
    let n = args.size.unwrap_or(DEFAULT_SIZE);
    let peak = measure(&client, n, args.reps.max(1))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create cache dir {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&peak)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "peak {} (measured now: f32 dot {n}x{n}x{n}, best of {}, {} threads, {}); saved to {}",
        format_flops(peak.flops_per_s),
        peak.repetitions,
        peak.threads,
        peak.cpu,
        path.display()
    );
    Ok(())
}

/// Compiles `[n,n]×[n,n]` f32 `dot` on `client`, runs it once to warm up, then `reps` times, and
/// returns the best FLOP/s.
pub fn measure(client: &pjrt::Client, n: usize, reps: usize) -> Result<Peak> {
    if n == 0 {
        bail!("--size must be positive");
    }
    let b = Builder::new("peak_matmul");
    let shape = Shape::array(ElementType::F32, &[n as i64, n as i64]);
    let x = b.parameter(shape.clone(), "a")?;
    let y = b.parameter(shape, "b")?;
    let exe = runtime::compile(client, &b.build(b.dot(x, y)?)?)?;
    let data: Vec<f32> = (0..n * n).map(|i| (i % 251) as f32 / 251.0 - 0.5).collect();
    let a = runtime::upload_f32(client, &data, &[n, n])?;
    let bb = runtime::upload_f32(client, &data, &[n, n])?;
    // Execution waits for the device to finish, so the wall time of a call is its run time.
    drop(exe.execute(&[&a, &bb])?);
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = exe.execute(&[&a, &bb])?;
        best = best.min(t0.elapsed().as_secs_f64());
        drop(out);
    }
    let flops = 2.0 * (n as f64).powi(3);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Peak {
        flops_per_s: flops / best.max(1e-12),
        size: n,
        repetitions: reps,
        platform: client.platform_name()?,
        cpu: cpu_model(),
        threads: std::thread::available_parallelism().map_or(1, |t| t.get()),
        date: utc_date(now),
        unix_time: now,
    })
}

/// The first `model name` of `/proc/cpuinfo`, else `unknown`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `YYYY-MM-DD` (UTC) of a Unix time, by the proleptic Gregorian calendar.
fn utc_date(unix: u64) -> String {
    // Days since 1970-01-01, shifted to an era calendar starting on 0000-03-01.
    let z = (unix / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn achieved_flops_and_mfu_follow_from_tokens_per_s_and_flops_per_token() {
        // 1,000 tok/s at 6e6 FLOPs per token: 6 GFLOP/s, a quarter of a 24 GFLOP/s peak.
        let u = Utilization::new(6e6, 1_000.0, Some(24e9));
        assert_eq!(u.flops_per_s, 6e9);
        assert_eq!(u.mfu, Some(0.25));
        assert_eq!(Utilization::new(6e6, 1_000.0, None).mfu, None);
        assert_eq!(Utilization::new(6e6, 1_000.0, Some(0.0)).mfu, None);
        assert_eq!(format_flops(6e9), "6.0 GFLOP/s");
        assert_eq!(format_flops(1.5e12), "1.5 TFLOP/s");
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_709_251_199), "2024-02-29");
        assert_eq!(utc_date(1_735_689_600), "2025-01-01");
    }
}
