//! `rattn bench rla`: the RLA blocks on one PJRT device, every lowering side by side, timed and
//! checked against our CPU kernels run directly on host slices.
//!
//! For each lowering the forward graph `(q, k, v) -> (o, chunk_states, final_state)` and the
//! forward+backward graph `(q, k, v, d_o) -> (o, dq, dk, dv)` (built the way a model does it:
//! `o = rla(q, k, v)`, then `grad(sum(o ⊙ d_o))`, so the backward block comes in through the custom
//! VJP) are compiled and run on the plugin's first device. Inputs stay on the device; after a
//! warm-up, `--reps` calls are timed back to back and closed by a read of a small output, so the
//! mean covers the device's work on platforms that run asynchronously. Each lowering's outputs are
//! compared with [`pallas_port::kernel::rla_fwd`] / [`pallas_port::kernel::rla_bwd`] (run here on the
//! host, not through any plugin): the error printed is `max |x − ref| / max |ref|` per array.

use crate::runtime;
use anyhow::{bail, Context, Result};
use hlo_builder::{Builder, ElementType, Op, Shape};
use pallas_port::graph::rla_fwd_block;
use pallas_port::{bench_util, kernel, rla, FeatureMap, Lowering, RlaConfig, RlaDims};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `rattn bench rla`.
#[derive(clap::Args, Clone)]
pub struct RlaArgs {
    /// PJRT plugin: cpu (default), cuda, tpu, or a path to a plugin .so.
    #[arg(long)]
    pub plugin: Option<String>,
    /// Lowerings to run, comma-separated (custom_call, hlo, ...); default: the platform's choice
    /// (`auto` resolved for it) and `hlo`.
    #[arg(long, value_delimiter = ',')]
    pub lowering: Vec<String>,
    /// Batch B.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Sequence length T.
    #[arg(long, default_value_t = 4096)]
    pub seq: usize,
    /// Query heads N.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// KV heads G.
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// Head dim H.
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Sliding window W.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Chunk (one saved state per chunk).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Sub-chunk.
    #[arg(long, default_value_t = RlaConfig::default().sub_chunk)]
    pub sub_chunk: usize,
    /// Feature map: softmax or relu.
    #[arg(long, default_value = "softmax")]
    pub feature_map: String,
    /// Timed calls per graph (after two warm-up calls).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One lowering's results (`None` where that graph failed to compile or run; see `errors`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RlaBenchRow {
    /// The lowering (`custom_call`, `hlo`, ...).
    pub lowering: String,
    /// Mean milliseconds per forward call.
    pub fwd_ms: Option<f64>,
    /// Mean milliseconds per forward+backward call.
    pub fwd_bwd_ms: Option<f64>,
    /// Seconds to compile the forward and the forward+backward graphs (those that compiled).
    pub compile_s: f64,
    /// `max |x − ref| / max |ref|` of o, chunk_states, final_state (forward graph).
    pub fwd_err: Option<[f64; 3]>,
    /// The same for o, dq, dk, dv (forward+backward graph).
    pub fwd_bwd_err: Option<[f64; 4]>,
    /// What failed, one line per graph.
    pub errors: Vec<String>,
}

/// The whole `rattn bench rla` report.
#[derive(Debug, Clone, Serialize)]
pub struct RlaBenchReport {
    /// PJRT platform name.
    pub platform: String,
    /// Device kind of the first device.
    pub device: String,
    /// Dims.
    pub dims: RlaDims,
    /// Config.
    pub config: RlaConfig,
    /// Timed calls per graph.
    pub reps: usize,
    /// Host milliseconds of `kernel::rla_fwd` and of `rla_fwd` + `rla_bwd` (the reference run).
    pub host_kernel_ms: [f64; 2],
    /// One row per lowering.
    pub rows: Vec<RlaBenchRow>,
}

/// `max |x − r| / max |r|` (0 when both are all zero; infinite on a length mismatch or NaN).
fn rel_err(x: &[f32], r: &[f32]) -> f64 {
    if x.len() != r.len() {
        return f64::INFINITY;
    }
    let scale = r.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let mut diff = 0f64;
    for (a, b) in x.iter().zip(r) {
        let d = f64::from(a - b).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        diff = diff.max(d);
    }
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn param(b: &Builder, dims: &[usize], name: &str) -> Result<Op> {
    let d: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
    Ok(b.parameter(Shape::array(ElementType::F32, &d), name)?)
}

fn fwd_graph(cfg: &RlaConfig, d: &RlaDims, lowering: Lowering) -> Result<hlo_builder::Computation> {
    let b = Builder::new("rla_fwd_bench");
    let q = param(&b, &d.q_shape(), "q")?;
    let k = param(&b, &d.kv_shape(), "k")?;
    let v = param(&b, &d.kv_shape(), "v")?;
    let root = rla_fwd_block(&b, q, k, v, cfg, lowering)?;
    Ok(b.build(root)?)
}

fn fwd_bwd_graph(
    cfg: &RlaConfig,
    d: &RlaDims,
    lowering: Lowering,
) -> Result<hlo_builder::Computation> {
    let b = Builder::new("rla_fwd_bwd_bench");
    let q = param(&b, &d.q_shape(), "q")?;
    let k = param(&b, &d.kv_shape(), "k")?;
    let v = param(&b, &d.kv_shape(), "v")?;
    let d_o = param(&b, &d.q_shape(), "d_o")?;
    let o = rla(&b, q, k, v, cfg, lowering)?;
    let loss = b.reduce_sum(b.mul(o, d_o)?, &[0, 1, 2, 3])?;
    let g = b.grad(loss, &[q, k, v])?;
    Ok(b.build(b.tuple(&[o, g[0], g[1], g[2]])?)?)
}

/// Runs `exe` twice to warm up, then `reps` times back to back, closing with a host read of output
/// `sync`; returns the outputs of the last call and the mean seconds per call.
fn time(
    exe: &pjrt::LoadedExecutable,
    args: &[&pjrt::Buffer],
    reps: usize,
    sync: usize,
) -> Result<(Vec<pjrt::Buffer>, f64)> {
    for _ in 0..2 {
        let out = exe.execute(args)?;
        drop(out[sync].to_host::<f32>()?);
    }
    let t0 = Instant::now();
    let mut last = Vec::new();
    for _ in 0..reps {
        last = exe.execute(args)?;
    }
    drop(last[sync].to_host::<f32>()?);
    Ok((last, t0.elapsed().as_secs_f64() / reps as f64))
}

/// One [`measure`] result into `row`: its compile seconds added and `(ms per call, errors)`
/// returned, or its error (`label: what: …`) listed and `(None, None)`.
fn record<const N: usize>(
    row: &mut RlaBenchRow,
    label: &str,
    what: &str,
    measured: Result<(f64, f64, [f64; N])>,
) -> (Option<f64>, Option<[f64; N]>) {
    match measured {
        Ok((c, secs, err)) => {
            row.compile_s += c;
            (Some(secs * 1e3), Some(err))
        }
        Err(e) => {
            let e = e.context(what.to_string());
            row.errors.push(format!("{label}: {e:#}"));
            (None, None)
        }
    }
}

/// Builds `graph` and compiles it (together: the compile seconds), runs it ([`time`] with `reps`
/// and `sync`) and compares its first `N` outputs with `want`: `(compile seconds, seconds per
/// call, relative errors)`.
fn measure<const N: usize>(
    client: &pjrt::Client,
    graph: impl FnOnce() -> Result<hlo_builder::Computation>,
    inputs: &[&pjrt::Buffer],
    reps: usize,
    sync: usize,
    want: [&[f32]; N],
) -> Result<(f64, f64, [f64; N])> {
    let c0 = Instant::now();
    let exe = runtime::compile(client, &graph()?)?;
    let compile_s = c0.elapsed().as_secs_f64();
    let (out, secs) = time(&exe, inputs, reps, sync)?;
    let mut err = [0.0; N];
    for (i, (e, want)) in err.iter_mut().zip(want).enumerate() {
        *e = rel_err(&out[i].to_host::<f32>()?, want);
    }
    Ok((compile_s, secs, err))
}

fn parse_lowering(s: &str) -> Result<Lowering> {
    serde_json::from_value(serde_json::Value::String(s.trim().to_string())).map_err(|_| {
        anyhow::anyhow!(
            "--lowering: unknown lowering {s:?}; use {} (comma-separated)",
            [
                Lowering::CustomCall,
                Lowering::Hlo,
                Lowering::Triton,
                Lowering::Auto
            ]
            .map(|l| l.as_str())
            .join(", ")
        )
    })
}

/// `rattn bench rla`.
pub fn run(args: &RlaArgs) -> Result<()> {
    let d = RlaDims {
        batch: args.batch,
        seq: args.seq,
        heads: args.heads,
        kv_heads: args.kv_heads,
        head_dim: args.head_dim,
    };
    let feature_map: FeatureMap = args
        .feature_map
        .parse()
        .map_err(|e| anyhow::anyhow!("--feature-map: {e}"))?;
    let cfg = RlaConfig {
        window: args.window,
        sub_chunk: args.sub_chunk,
        chunk: args.chunk,
        feature_map,
        ..Default::default()
    };
    d.validate().context("rattn bench rla: bad shape flags")?;
    cfg.validate()
        .context("rattn bench rla: bad config flags")?;
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let client = runtime::open_client(args.plugin.as_deref())?;
    let platform = client.platform_name()?;
    let device = client
        .devices()?
        .first()
        .map(|dev| dev.kind().to_string())
        .unwrap_or_default();
    let mut lowerings: Vec<Lowering> = Vec::new();
    let wanted: Vec<Lowering> = if args.lowering.is_empty() {
        vec![Lowering::Auto, Lowering::Hlo]
    } else {
        args.lowering
            .iter()
            .map(|s| parse_lowering(s))
            .collect::<Result<_>>()?
    };
    for l in wanted {
        let l = l.for_platform(&platform);
        if !lowerings.contains(&l) {
            lowerings.push(l);
        }
    }

    let (q, k, v, d_o) = (
        bench_util::data(d.q_len(), 1),
        bench_util::data(d.kv_len(), 2),
        bench_util::data(d.kv_len(), 3),
        bench_util::data(d.q_len(), 4),
    );
    // The reference: our CPU kernels on host slices.
    let mut o = vec![0.0; d.q_len()];
    let mut cs = vec![0.0; d.chunk_states_len(&cfg)];
    let mut fs = vec![0.0; d.final_state_len()];
    let t0 = Instant::now();
    kernel::rla_fwd(&cfg, &d, &q, &k, &v, &mut o, &mut cs, &mut fs)?;
    let host_fwd = t0.elapsed().as_secs_f64();
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; d.q_len()],
        vec![0.0; d.kv_len()],
        vec![0.0; d.kv_len()],
    );
    let t0 = Instant::now();
    kernel::rla_bwd(&cfg, &d, &q, &k, &v, &cs, &d_o, &mut dq, &mut dk, &mut dv)?;
    let host_bwd = t0.elapsed().as_secs_f64();

    let up = |x: &[f32], s: &[usize]| runtime::upload_f32(&client, x, s);
    let (bq, bk, bv, bdo) = (
        up(&q, &d.q_shape())?,
        up(&k, &d.kv_shape())?,
        up(&v, &d.kv_shape())?,
        up(&d_o, &d.q_shape())?,
    );
    let mut rows = Vec::new();
    let inputs_fwd = [&bq, &bk, &bv];
    let inputs_fb = [&bq, &bk, &bv, &bdo];
    for &lowering in &lowerings {
        let what = format!("lowering {lowering} on {platform}");
        let mut row = RlaBenchRow {
            lowering: lowering.as_str().to_string(),
            ..RlaBenchRow::default()
        };
        // Forward and forward+backward are measured separately: one failing (a kernel over the
        // device's shared memory, say) leaves the other's numbers and is reported beside them.
        let fwd = measure(
            &client,
            || fwd_graph(&cfg, &d, lowering),
            &inputs_fwd,
            args.reps,
            2,
            [&o, &cs, &fs],
        );
        (row.fwd_ms, row.fwd_err) = record(&mut row, "forward", &what, fwd);
        let fb = measure(
            &client,
            || fwd_bwd_graph(&cfg, &d, lowering),
            &inputs_fb,
            args.reps,
            0,
            [&o, &dq, &dk, &dv],
        );
        (row.fwd_bwd_ms, row.fwd_bwd_err) = record(&mut row, "forward+backward", &what, fb);
        rows.push(row);
    }
    let report = RlaBenchReport {
        platform,
        device,
        dims: d,
        config: cfg,
        reps: args.reps,
        host_kernel_ms: [host_fwd * 1e3, (host_fwd + host_bwd) * 1e3],
        rows,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed = report.rows.iter().filter(|r| !r.errors.is_empty()).count();
    if failed > 0 {
        bail!(
            "{failed} of {} lowerings failed (see above)",
            report.rows.len()
        );
    }
    Ok(())
}

fn print_report(r: &RlaBenchReport) {
    let d = &r.dims;
    println!(
        "RLA blocks on {} ({}): B{} T{} N{} G{} H{} W{} chunk {} sub-chunk {} {}; mean of {} calls",
        r.platform,
        r.device,
        d.batch,
        d.seq,
        d.heads,
        d.kv_heads,
        d.head_dim,
        r.config.window,
        r.config.chunk,
        r.config.sub_chunk,
        r.config.feature_map,
        r.reps
    );
    println!(
        "reference: CPU kernels on the host, {:.1} ms fwd, {:.1} ms fwd+bwd (one call, {} threads)",
        r.host_kernel_ms[0],
        r.host_kernel_ms[1],
        std::thread::available_parallelism().map_or(1, |t| t.get())
    );
    println!(
        "{:<12} {:>10} {:>12} {:>10}  {:<30} {:<38}",
        "lowering",
        "fwd ms",
        "fwd+bwd ms",
        "compile s",
        "err fwd (o, states, final)",
        "err fwd+bwd (o, dq, dk, dv)"
    );
    let ms = |x: Option<f64>| x.map_or("failed".to_string(), |v| format!("{v:.2}"));
    let errs = |x: Option<&[f64]>| {
        x.map_or("-".to_string(), |x| {
            x.iter()
                .map(|v| format!("{v:.1e}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
    };
    for row in &r.rows {
        println!(
            "{:<12} {:>10} {:>12} {:>10.1}  {:<30} {:<38}",
            row.lowering,
            ms(row.fwd_ms),
            ms(row.fwd_bwd_ms),
            row.compile_s,
            errs(row.fwd_err.as_ref().map(|e| &e[..])),
            errs(row.fwd_bwd_err.as_ref().map(|e| &e[..]))
        );
        for e in &row.errors {
            println!("  {}: {e}", row.lowering);
        }
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "-".to_string(),
    };
    if let Some(base) = r.rows.iter().find(|x| x.lowering == "hlo") {
        for row in r.rows.iter().filter(|x| x.lowering != "hlo") {
            println!(
                "{} vs hlo: {} fwd, {} fwd+bwd (hlo time / its time)",
                row.lowering,
                ratio(base.fwd_ms, row.fwd_ms),
                ratio(base.fwd_bwd_ms, row.fwd_bwd_ms)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_scaled_by_the_reference_and_catches_nan_and_length() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 4.0]), 0.5);
        assert_eq!(rel_err(&[0.0], &[0.0]), 0.0);
        assert!(rel_err(&[f32::NAN], &[1.0]).is_infinite());
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
        let x = bench_util::data(1000, 7);
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        assert!(x.iter().any(|v| *v < -0.5) && x.iter().any(|v| *v > 0.5));
    }
}
