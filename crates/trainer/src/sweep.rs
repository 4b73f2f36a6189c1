//! `rattn sweep`: the window sweep of issue 12 — windows × {SWA, RAttention} plus full attention,
//! in all-local stacks and in the paper's 3:1 stacks, plus the ablations (relu feature map, RLA
//! norm off), several seeds each, every run with the same token budget. It writes a Markdown table
//! (eval loss, recall by distance, KV-cache bytes per sequence) and a PNG of quality against cache
//! bytes (the paper's Pareto figure).
//!
//! Every run is this binary re-run as a supervised child (`rattn sweep --run-one DIR`, see
//! [`crate::supervise`]): a run that fails or crashes (a plugin abort) is reported and the sweep
//! goes on, and no state (PJRT clients, compiled executables, registered fonts) builds up in the
//! parent over dozens of runs. The child reads `DIR/run.json` (config file, overrides, cell),
//! trains, evaluates and writes `DIR/result.json`; a run whose `result.json` exists is skipped when
//! the sweep is restarted, so an interrupted sweep finishes by running the same command again.
//!
//! Recall is bucketed by absolute distance ([`SWEEP_BUCKETS`]), the same buckets for every window,
//! so runs with different windows share columns; the cache bytes are the model's own count
//! ([`model::Model::cost`]), never recomputed here.

use crate::config::RunConfig;
use crate::plot::load_font;
use crate::supervise::{self, ChildError};
use crate::train;
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Distance buckets of the sweep's recall columns, `(lo, hi)` inclusive, the same for every
/// window: the last (`> 128`) is beyond what a 2-layer stack of windows ≤ 64 can relay.
pub const SWEEP_BUCKETS: [(usize, usize); 6] = [
    (1, 8),
    (9, 16),
    (17, 32),
    (33, 64),
    (65, 128),
    (129, usize::MAX),
];

/// The label of a sweep bucket: `1-8`, …, `>128`.
pub fn bucket_label((lo, hi): (usize, usize)) -> String {
    if hi == usize::MAX {
        format!(">{}", lo - 1)
    } else {
        format!("{lo}-{hi}")
    }
}

/// A stack of the sweep: which base config its runs start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Stack {
    /// Every layer local (`configs/tiny.toml`): recall beyond layers × W comes only from RLA.
    Local,
    /// The paper's 3:1 layout (`configs/tiny-3to1.toml`): three local layers, then one global.
    ThreeToOne,
}

impl Stack {
    /// Short name used in directory names and on the command line: `local`, `3to1`.
    pub fn name(self) -> &'static str {
        match self {
            Stack::Local => "local",
            Stack::ThreeToOne => "3to1",
        }
    }

    fn parse(s: &str) -> Result<Stack> {
        match s {
            "local" => Ok(Stack::Local),
            "3to1" => Ok(Stack::ThreeToOne),
            _ => bail!("--stacks: unknown stack {s:?} (use local, 3to1)"),
        }
    }
}

/// What the local layers of a run compute (or full attention everywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Variant {
    /// Local layers are sliding-window attention only.
    Swa,
    /// Local layers are SWA + residual linear attention (the paper's model).
    Rattention,
    /// Every layer global: full causal attention with RoPE on every layer (`model.global_rope`;
    /// the paper's full-attention baseline, the ceiling, and the largest cache).
    Full,
    /// Every layer global without positional encoding (our global layers as the RAttention
    /// stacks use them): the full-attention baseline of sweeps before `global_rope` existed.
    FullNope,
    /// Ablation: RAttention with the relu feature map.
    Relu,
    /// Ablation: RAttention without the RLA branch's GroupRMSNorm.
    NoNorm,
}

impl Variant {
    /// Short name: `swa`, `rattention`, `full`, `full-nope`, `relu`, `nonorm`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Swa => "swa",
            Variant::Rattention => "rattention",
            Variant::Full => "full",
            Variant::FullNope => "full-nope",
            Variant::Relu => "relu",
            Variant::NoNorm => "nonorm",
        }
    }

    fn parse(s: &str) -> Result<Variant> {
        match s {
            "swa" => Ok(Variant::Swa),
            "rattention" => Ok(Variant::Rattention),
            "full" => Ok(Variant::Full),
            "full-nope" => Ok(Variant::FullNope),
            "relu" => Ok(Variant::Relu),
            "nonorm" => Ok(Variant::NoNorm),
            _ => bail!("unknown kind {s:?} (use swa, rattention, full, full-nope, relu, nonorm)"),
        }
    }

    /// Full attention in every layer (no window).
    pub fn is_full(self) -> bool {
        matches!(self, Variant::Full | Variant::FullNope)
    }

    /// What the table calls it.
    pub fn title(self) -> &'static str {
        match self {
            Variant::Swa => "SWA",
            Variant::Rattention => "RAttention",
            Variant::Full => "full attention (RoPE)",
            Variant::FullNope => "full attention, no RoPE",
            Variant::Relu => "RAttention, relu φ",
            Variant::NoNorm => "RAttention, RLA norm off",
        }
    }
}

/// One cell of the grid and one seed: a single training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cell {
    /// Base stack.
    pub stack: Stack,
    /// Local-layer kind (or full attention).
    pub variant: Variant,
    /// Window of the local layers (`None` for full attention).
    pub window: Option<usize>,
    /// Seed of initialisation and data order.
    pub seed: u64,
}

impl Cell {
    /// The run's directory name, e.g. `local-rattention-w16-seed0`, `3to1-full-seed1`.
    pub fn dir_name(&self) -> String {
        match self.window {
            Some(w) => format!(
                "{}-{}-w{w}-seed{}",
                self.stack.name(),
                self.variant.name(),
                self.seed
            ),
            None => format!(
                "{}-{}-seed{}",
                self.stack.name(),
                self.variant.name(),
                self.seed
            ),
        }
    }

    /// `--set` overrides that turn the stack's base config into this run (before the sweep's
    /// own `--steps`/`--set`).
    pub fn overrides(&self) -> Vec<String> {
        let mut o = vec![format!("train.seed={}", self.seed)];
        if let Some(w) = self.window {
            o.push(format!("model.window={w}"));
        }
        match self.variant {
            Variant::Swa => o.push("model.local_kind=\"swa\"".into()),
            Variant::Rattention => o.push("model.local_kind=\"rattention\"".into()),
            Variant::Full => {
                o.push("model.layer_pattern=\"0:1\"".into());
                o.push("model.global_rope=true".into());
            }
            Variant::FullNope => o.push("model.layer_pattern=\"0:1\"".into()),
            Variant::Relu => {
                o.push("model.local_kind=\"rattention\"".into());
                o.push("model.rla.feature_map=\"relu\"".into());
            }
            Variant::NoNorm => {
                o.push("model.local_kind=\"rattention\"".into());
                o.push("model.rla.norm=false".into());
            }
        }
        o
    }
}

/// Which part of the grid to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Windows of the SWA and RAttention cells.
    pub windows: Vec<usize>,
    /// Seeds of every cell.
    pub seeds: Vec<u64>,
    /// Stacks.
    pub stacks: Vec<Stack>,
    /// Main kinds (`swa`, `rattention`, `full`).
    pub kinds: Vec<Variant>,
    /// Ablations (`relu`, `nonorm`), run at `ablation_windows`.
    pub ablations: Vec<Variant>,
    /// Windows of the ablation cells.
    pub ablation_windows: Vec<usize>,
    /// Stacks of the ablation cells.
    pub ablation_stacks: Vec<Stack>,
}

impl Grid {
    /// Every run of the grid, stack by stack (in `stacks` order) and within a stack seed by seed,
    /// so a sweep stopped early has whole stacks with every seed, then whole seeds.
    pub fn cells(&self) -> Vec<Cell> {
        let mut out = Vec::new();
        for &stack in &self.stacks {
            for &seed in &self.seeds {
                let mut push = |variant, window| {
                    let c = Cell {
                        stack,
                        variant,
                        window,
                        seed,
                    };
                    if !out.contains(&c) {
                        out.push(c);
                    }
                };
                for &w in &self.windows {
                    for &k in &self.kinds {
                        if !k.is_full() {
                            push(k, Some(w));
                        }
                    }
                }
                for &k in self.kinds.iter().filter(|k| k.is_full()) {
                    push(k, None);
                }
                let ablate = self.ablation_stacks.contains(&stack);
                for &w in self.ablation_windows.iter().filter(|_| ablate) {
                    for &a in &self.ablations {
                        push(a, Some(w));
                    }
                }
            }
        }
        out
    }
}

/// What a run's child is told (`DIR/run.json`): enough to repeat it with `rattn train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The cell.
    pub cell: Cell,
    /// Base config file.
    pub config: PathBuf,
    /// Overrides applied to it, in order.
    pub overrides: Vec<String>,
    /// Held-out sequences of the evaluation.
    pub eval_sequences: usize,
}

impl RunSpec {
    /// The equivalent `rattn train` command, training into `out` and ending with the same
    /// evaluation (the sweep's run also records `result.json`, which this command does not).
    pub fn train_command(&self, out: &Path) -> String {
        let mut s = format!("rattn train --config {}", self.config.display());
        for o in &self.overrides {
            write!(s, " --set '{o}'").unwrap();
        }
        write!(
            s,
            " --out {} --eval-sequences {}",
            out.display(),
            self.eval_sequences
        )
        .unwrap();
        s
    }
}

/// What a finished run wrote (`DIR/result.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The cell.
    pub cell: Cell,
    /// Steps trained.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence (T).
    pub seq_len: usize,
    /// Loss of the last training step.
    pub final_train_loss: f64,
    /// Held-out loss on the answer tokens.
    pub eval_loss: f64,
    /// `(correct, total)` per [`SWEEP_BUCKETS`] entry.
    pub recall: Vec<(usize, usize)>,
    /// K and V bytes per sequence at `seq_len` ([`model::Model::cost`]).
    pub kv_bytes: u64,
    /// RLA state bytes per sequence.
    pub rla_state_bytes: u64,
    /// Seconds the child took (training, evaluation, compiles).
    pub wall_s: f64,
    /// `/proc/loadavg`'s 1-minute load average when the run ended (NaN where unknown).
    pub load: f64,
}

impl RunResult {
    /// Recall in percent of bucket `i` (NaN when empty).
    pub fn recall_percent(&self, i: usize) -> f64 {
        match self.recall.get(i) {
            Some(&(c, t)) if t > 0 => 100.0 * c as f64 / t as f64,
            _ => f64::NAN,
        }
    }

    /// KV + RLA state bytes per sequence: the x axis of the Pareto figure.
    pub fn cache_bytes(&self) -> u64 {
        self.kv_bytes + self.rla_state_bytes
    }
}

/// Sum `by_distance` (`(correct, total)` at each distance) into [`SWEEP_BUCKETS`].
pub fn bucket_counts(by_distance: &[(usize, usize)]) -> Vec<(usize, usize)> {
    SWEEP_BUCKETS
        .iter()
        .map(|&(lo, hi)| {
            by_distance
                .iter()
                .enumerate()
                .filter(|(d, _)| *d >= lo && *d <= hi)
                .fold((0, 0), |a, (_, &(c, t))| (a.0 + c, a.1 + t))
        })
        .collect()
}

/// The result file of a run directory.
pub fn result_path(dir: &Path) -> PathBuf {
    dir.join("result.json")
}

/// The runs of `cells` still to do under `out`: those without a `result.json`.
pub fn pending(out: &Path, cells: &[Cell]) -> Vec<Cell> {
    cells
        .iter()
        .filter(|c| !result_path(&out.join(c.dir_name())).is_file())
        .copied()
        .collect()
}

/// Refuse to mix budgets: every finished run of `cells` under `out` must have been made from the
/// spec `spec` gives it now (same config file, overrides — steps included — and evaluation).
pub fn check_finished(out: &Path, cells: &[Cell], spec: impl Fn(Cell) -> RunSpec) -> Result<()> {
    let mut stale = Vec::new();
    for &c in cells {
        let dir = out.join(c.dir_name());
        if !result_path(&dir).is_file() {
            continue;
        }
        let had: Option<RunSpec> = std::fs::read_to_string(dir.join("run.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if had.as_ref() != Some(&spec(c)) {
            stale.push(c.dir_name());
        }
    }
    if !stale.is_empty() {
        bail!(
            "{} finished runs in {} were made with other settings (config, --steps, --set or              --eval-sequences) than this sweep gives them: {}; use another --out, or the same options",
            stale.len(),
            out.display(),
            stale.join(", ")
        );
    }
    Ok(())
}

/// Every readable `result.json` of `cells` under `out`.
pub fn collect(out: &Path, cells: &[Cell]) -> Vec<RunResult> {
    cells
        .iter()
        .filter_map(|c| {
            let text = std::fs::read_to_string(result_path(&out.join(c.dir_name()))).ok()?;
            serde_json::from_str(&text).ok()
        })
        .collect()
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The child's work: train and evaluate the run described by `dir/run.json`, write
/// `dir/result.json`.
fn run_one(dir: &Path, plugin: Option<&str>) -> Result<RunResult> {
    let start = std::time::Instant::now();
    let spec: RunSpec = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run.json"))
            .with_context(|| format!("reading {}/run.json", dir.display()))?,
    )
    .with_context(|| format!("parsing {}/run.json", dir.display()))?;
    let cfg = RunConfig::load(&spec.config, &spec.overrides)?;
    let report = train::train(&cfg, plugin, dir, false, true, None)?;
    let ckpt = report
        .last_checkpoint
        .context("the run wrote no checkpoint to evaluate")?;
    let eval = train::eval(&cfg, plugin, &ckpt, spec.eval_sequences)?;
    let cost = model::Model::new(cfg.model.clone())?.cost(cfg.model.seq_len);
    let result = RunResult {
        cell: spec.cell,
        steps: cfg.train.steps,
        batch: cfg.train.batch,
        seq_len: cfg.model.seq_len,
        final_train_loss: report.losses.last().map_or(f64::NAN, |&l| l as f64),
        eval_loss: eval.loss,
        recall: bucket_counts(&eval.by_distance),
        kv_bytes: cost.cache.kv,
        rla_state_bytes: cost.cache.rla_state,
        wall_s: start.elapsed().as_secs_f64(),
        load: load_avg(),
    };
    let path = result_path(dir);
    let partial = dir.join("result.json.partial");
    std::fs::write(&partial, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(result)
}

/// Bytes for an axis label: `512 B`, `4 KiB`, `1.5 MiB`.
fn format_bytes(x: f64) -> String {
    if x >= 1024.0 * 1024.0 {
        format!("{} MiB", trim(x / 1024.0 / 1024.0))
    } else if x >= 1024.0 {
        format!("{} KiB", trim(x / 1024.0))
    } else {
        format!("{x:.0} B")
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

fn fmt_pct(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.1}")
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Results grouped by cell without the seed, in grid order.
fn groups<'a>(cells: &[Cell], results: &'a [RunResult]) -> Vec<(Cell, Vec<&'a RunResult>)> {
    let mut out: Vec<(Cell, Vec<&RunResult>)> = Vec::new();
    for c in cells {
        let key = Cell { seed: 0, ..*c };
        if out.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let rs: Vec<&RunResult> = results
            .iter()
            .filter(|r| Cell { seed: 0, ..r.cell } == key)
            .collect();
        out.push((key, rs));
    }
    out
}

/// The Markdown table of a sweep: one row per cell (mean over its finished seeds, the farthest
/// bucket's per-seed values beside), then one row per run, then what is missing.
pub fn table(cells: &[Cell], results: &[RunResult], failed: &[(Cell, String)]) -> String {
    let mut s = String::new();
    let labels: Vec<String> = SWEEP_BUCKETS.iter().map(|&b| bucket_label(b)).collect();
    if let Some(r) = results.first() {
        let _ = writeln!(
            s,
            "Token budget per run: {} steps × {} sequences × {} tokens = {} tokens. Recall (%) by \
             distance in tokens from the pair's last appearance; chance {:.1} %. Cache: bytes per \
             sequence at T = {} (K and V; + RLA state), the model's own count.\n",
            r.steps,
            r.batch,
            r.seq_len,
            r.steps * r.batch * r.seq_len,
            100.0 / crate::data::synth::N_VALUES as f64,
            r.seq_len
        );
    }
    let _ = writeln!(
        s,
        "| stack | kind | W | seeds | eval loss | {} | far (per seed) | KV bytes | RLA state bytes |",
        labels.join(" | ")
    );
    let _ = writeln!(s, "|{}", "---|".repeat(8 + labels.len()));
    for (key, rs) in groups(cells, results) {
        if rs.is_empty() {
            continue;
        }
        let far = SWEEP_BUCKETS.len() - 1;
        let recall: Vec<String> = (0..SWEEP_BUCKETS.len())
            .map(|i| fmt_pct(mean(rs.iter().map(|r| r.recall_percent(i)))))
            .collect();
        let per_seed: Vec<String> = rs.iter().map(|r| fmt_pct(r.recall_percent(far))).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.4} | {} | {} | {} | {} |",
            key.stack.name(),
            key.variant.title(),
            key.window.map_or("–".into(), |w| w.to_string()),
            rs.len(),
            mean(rs.iter().map(|r| r.eval_loss)),
            recall.join(" | "),
            per_seed.join(", "),
            rs[0].kv_bytes,
            rs[0].rla_state_bytes
        );
    }
    let _ = writeln!(
        s,
        "\nEvery run:\n\n| run | eval loss | final train loss | {} | wall s | load |",
        labels.join(" | ")
    );
    let _ = writeln!(s, "|{}", "---|".repeat(5 + labels.len()));
    for c in cells {
        let Some(r) = results.iter().find(|r| r.cell == *c) else {
            continue;
        };
        let recall: Vec<String> = (0..SWEEP_BUCKETS.len())
            .map(|i| fmt_pct(r.recall_percent(i)))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {:.4} | {:.4} | {} | {:.0} | {:.1} |",
            c.dir_name(),
            r.eval_loss,
            r.final_train_loss,
            recall.join(" | "),
            r.wall_s,
            r.load
        );
    }
    let missing: Vec<String> = cells
        .iter()
        .filter(|c| !results.iter().any(|r| r.cell == **c))
        .map(|c| c.dir_name())
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(
            s,
            "\nNot finished ({}): {}",
            missing.len(),
            missing.join(", ")
        );
    }
    for (c, e) in failed {
        let _ = writeln!(
            s,
            "\nFailed: {}: {}",
            c.dir_name(),
            e.lines().next().unwrap_or("")
        );
    }
    s
}

/// One line of the Pareto figure: a (stack, kind) across windows.
struct Line {
    label: String,
    color: RGBColor,
    /// Drawn with triangles (an ablation), else circles.
    ablation: bool,
    /// `(cache bytes, far recall %, eval loss, window)`, seed means, by cache bytes.
    points: Vec<(f64, f64, f64, Option<usize>)>,
}

fn lines(cells: &[Cell], results: &[RunResult]) -> Vec<Line> {
    let colors = |stack: Stack, v: Variant| -> RGBColor {
        match (stack, v) {
            (Stack::Local, Variant::Rattention) => RGBColor(214, 39, 40),
            (Stack::Local, Variant::Swa) => RGBColor(31, 119, 180),
            (Stack::Local, Variant::Full) => RGBColor(0, 0, 0),
            (Stack::Local, Variant::FullNope) => RGBColor(44, 160, 44),
            (Stack::Local, Variant::Relu) => RGBColor(255, 127, 14),
            (Stack::Local, Variant::NoNorm) => RGBColor(148, 103, 189),
            (Stack::ThreeToOne, Variant::Rattention) => RGBColor(255, 152, 150),
            (Stack::ThreeToOne, Variant::Swa) => RGBColor(158, 202, 225),
            (Stack::ThreeToOne, Variant::Full) => RGBColor(127, 127, 127),
            (Stack::ThreeToOne, Variant::FullNope) => RGBColor(152, 223, 138),
            (Stack::ThreeToOne, Variant::Relu) => RGBColor(253, 208, 162),
            (Stack::ThreeToOne, Variant::NoNorm) => RGBColor(197, 176, 213),
        }
    };
    let far = SWEEP_BUCKETS.len() - 1;
    let mut out: Vec<Line> = Vec::new();
    for (key, rs) in groups(cells, results) {
        if rs.is_empty() {
            continue;
        }
        let point = (
            rs[0].cache_bytes() as f64,
            mean(rs.iter().map(|r| r.recall_percent(far))),
            mean(rs.iter().map(|r| r.eval_loss)),
            key.window,
        );
        let label = format!("{} {}", key.stack.name(), key.variant.title());
        match out.iter_mut().find(|l| l.label == label) {
            Some(l) => l.points.push(point),
            None => out.push(Line {
                label,
                color: colors(key.stack, key.variant),
                ablation: matches!(key.variant, Variant::Relu | Variant::NoNorm),
                points: vec![point],
            }),
        }
    }
    for l in &mut out {
        l.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Draw the Pareto figure into `png`: far-bucket recall (left) and eval loss (right) against
/// KV + RLA-state bytes per sequence (log axis), one line per stack and kind, points labelled by
/// window. Returns whether text was drawn (a font was found).
pub fn pareto_png(
    png: &Path,
    cells: &[Cell],
    results: &[RunResult],
    font: Option<&Path>,
) -> Result<bool> {
    let ls = lines(cells, results);
    if ls.is_empty() {
        bail!("no finished runs to plot into {}", png.display());
    }
    let text = load_font(font)?.is_some();
    draw_pareto(png, &ls, text).map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
    Ok(text)
}

fn draw_pareto(
    png: &Path,
    ls: &[Line],
    text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let xs = ls.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
    let (x0, x1) = (x0 / 1.5, x1 * 1.5);
    let losses = ls.iter().flat_map(|l| l.points.iter().map(|p| p.2));
    let lmax = losses.filter(|x| x.is_finite()).fold(0.1f64, f64::max) * 1.08;
    let root = BitMapBackend::new(png, (1400, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let far = bucket_label(SWEEP_BUCKETS[SWEEP_BUCKETS.len() - 1]);
    let panels = root.split_evenly((1, 2));
    for (i, area) in panels.iter().enumerate() {
        let recall = i == 0;
        let (ylo, yhi) = if recall { (0.0, 105.0) } else { (0.0, lmax) };
        let mut b = ChartBuilder::on(area);
        b.margin(14);
        if text {
            let title = if recall {
                format!("recall at distance {far} tokens (%) vs cache")
            } else {
                "eval loss on answers vs cache".to_string()
            };
            b.caption(title, ("sans-serif", 20))
                .x_label_area_size(44)
                .y_label_area_size(56);
        }
        let mut chart = b.build_cartesian_2d((x0..x1).log_scale().base(2.0), ylo..yhi)?;
        if text {
            chart
                .configure_mesh()
                .x_desc("KV + RLA state bytes per sequence (log)")
                .y_desc(if recall { "recall %" } else { "loss" })
                .x_label_formatter(&|x| format_bytes(*x))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()?;
        } else {
            chart.configure_mesh().x_labels(0).y_labels(0).draw()?;
        }
        for l in ls {
            let pts: Vec<(f64, f64)> = l
                .points
                .iter()
                .map(|p| (p.0, if recall { p.1 } else { p.2 }))
                .filter(|p| p.1.is_finite())
                .collect();
            let color = l.color;
            let drawn = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
            if text && recall {
                drawn.label(l.label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            }
            if l.ablation {
                chart.draw_series(
                    pts.iter()
                        .map(|&p| TriangleMarker::new(p, 7, color.filled())),
                )?;
            } else {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
            if text {
                let labels: Vec<(f64, f64, String)> = l
                    .points
                    .iter()
                    .filter_map(|p| {
                        let y = if recall { p.1 } else { p.2 };
                        let name = p.3.map_or("full".to_string(), |w| format!("W{w}"));
                        y.is_finite().then_some((p.0, y, name))
                    })
                    .collect();
                // The window beside its point, offset so it does not hide the marker.
                chart.draw_series(labels.into_iter().map(|(x, y, s)| {
                    EmptyElement::at((x, y))
                        + Text::new(s, (6, -16), ("sans-serif", 12).into_font().color(&color))
                }))?;
            }
        }
        if text && recall {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

/// `rattn sweep` arguments.
#[derive(clap::Args, Clone)]
pub(crate) struct SweepArgs {
    /// Directory of the sweep: one subdirectory per run, the table `sweep.md` and `sweep.png`.
    #[arg(long, default_value = "runs/sweep")]
    out: PathBuf,
    /// Windows of the SWA and RAttention cells.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64,128")]
    windows: Vec<usize>,
    /// Seeds of every cell.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    seeds: Vec<u64>,
    /// Stacks: local (all-local, --local-config), 3to1 (the paper's 3:1, --three-to-one-config).
    #[arg(long, value_delimiter = ',', default_value = "local,3to1")]
    stacks: Vec<String>,
    /// Kinds at every window: swa, rattention; full (RoPE on every layer, the paper's baseline)
    /// and full-nope (no positional encoding) run once per stack.
    #[arg(long, value_delimiter = ',', default_value = "swa,rattention,full")]
    kinds: Vec<String>,
    /// Ablations run at --ablation-windows: relu (feature map), nonorm (RLA norm off); "" for none.
    #[arg(long, value_delimiter = ',', default_value = "relu,nonorm")]
    ablations: Vec<String>,
    /// Windows of the ablation cells.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    ablation_windows: Vec<usize>,
    /// Stacks of the ablation cells (among --stacks).
    #[arg(long, value_delimiter = ',', default_value = "local")]
    ablation_stacks: Vec<String>,
    /// Training steps of every run (`train.steps`; default: the configs' own).
    #[arg(long)]
    steps: Option<usize>,
    /// Extra override for every run, e.g. `--set train.batch=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Base config of the all-local stack.
    #[arg(long, default_value = "configs/tiny.toml")]
    local_config: PathBuf,
    /// Base config of the 3:1 stack.
    #[arg(long, default_value = "configs/tiny-3to1.toml")]
    three_to_one_config: PathBuf,
    /// Held-out sequences of each run's evaluation.
    #[arg(long, default_value_t = 64)]
    eval_sequences: usize,
    /// Only write the table and the PNG from the finished runs.
    #[arg(long)]
    report_only: bool,
    /// TrueType/OpenType font for the PNG's text (default: a system font, see `rattn plot`).
    #[arg(long)]
    font: Option<PathBuf>,
    /// PJRT plugin of the runs.
    #[arg(long)]
    plugin: Option<String>,
    /// Internal: train and evaluate the run of this directory (the sweep's child process).
    #[arg(long, hide = true)]
    run_one: Option<PathBuf>,
}

impl SweepArgs {
    fn grid(&self) -> Result<Grid> {
        let names = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let kinds = names(&self.kinds)
            .iter()
            .map(|s| match Variant::parse(s)? {
                v @ (Variant::Swa | Variant::Rattention | Variant::Full | Variant::FullNope) => {
                    Ok(v)
                }
                v => bail!(
                    "--kinds: {} is an ablation: give it in --ablations",
                    v.name()
                ),
            })
            .collect::<Result<Vec<_>>>()?;
        let ablations = names(&self.ablations)
            .iter()
            .map(|s| match Variant::parse(s)? {
                v @ (Variant::Relu | Variant::NoNorm) => Ok(v),
                v => bail!(
                    "--ablations: {} is not an ablation (relu, nonorm)",
                    v.name()
                ),
            })
            .collect::<Result<Vec<_>>>()?;
        let stacks = names(&self.stacks)
            .iter()
            .map(|s| Stack::parse(s))
            .collect::<Result<Vec<_>>>()?;
        let ablation_stacks = names(&self.ablation_stacks)
            .iter()
            .map(|s| Stack::parse(s))
            .collect::<Result<Vec<_>>>()?;
        if let Some(w) = self
            .windows
            .iter()
            .chain(&self.ablation_windows)
            .find(|&&w| w == 0)
        {
            bail!("--windows/--ablation-windows: window {w} must be > 0");
        }
        let grid = Grid {
            windows: self.windows.clone(),
            seeds: self.seeds.clone(),
            stacks,
            kinds,
            ablations,
            ablation_windows: self.ablation_windows.clone(),
            ablation_stacks,
        };
        // The keys the grid sets per cell: a --set of one would run every cell with the same
        // value under the cell's label.
        let key = |o: &str| o.split('=').next().unwrap_or("").trim().to_string();
        let grid_keys: std::collections::BTreeSet<String> = grid
            .cells()
            .iter()
            .flat_map(|c| c.overrides())
            .map(|o| key(&o))
            .chain(self.steps.map(|_| "train.steps".to_string()))
            .collect();
        if let Some(o) = self.overrides.iter().find(|o| grid_keys.contains(&key(o))) {
            bail!(
                "--set {o}: the sweep sets {} for each run itself (from --windows, --kinds, \
                 --seeds, --ablations or --steps); drop it from --set",
                key(o)
            );
        }
        Ok(grid)
    }

    fn spec(&self, cell: Cell) -> RunSpec {
        let config = match cell.stack {
            Stack::Local => self.local_config.clone(),
            Stack::ThreeToOne => self.three_to_one_config.clone(),
        };
        let mut overrides = cell.overrides();
        overrides.extend(self.steps.map(|s| format!("train.steps={s}")));
        overrides.extend(self.overrides.iter().cloned());
        RunSpec {
            cell,
            config,
            overrides,
            eval_sequences: self.eval_sequences,
        }
    }
}

/// Write `sweep.md` and `sweep.png` under `out` from the finished runs of `cells`; returns what
/// was written, for the closing line ("sweep.md and sweep.png", or only the table when no run
/// has finished).
fn report(
    out: &Path,
    cells: &[Cell],
    failed: &[(Cell, String)],
    font: Option<&Path>,
) -> Result<String> {
    let results = collect(out, cells);
    let md = out.join("sweep.md");
    std::fs::write(&md, table(cells, &results, failed))
        .with_context(|| format!("writing {}", md.display()))?;
    if results.is_empty() {
        return Ok(format!(
            "{} (no finished run yet, so no sweep.png)",
            md.display()
        ));
    }
    pareto_png(&out.join("sweep.png"), cells, &results, font)?;
    Ok(format!("{} and sweep.png", md.display()))
}

/// Run `rattn sweep`.
pub(crate) fn run(args: &SweepArgs) -> Result<()> {
    if let Some(dir) = &args.run_one {
        // In the child: `serve` sends the outcome to the parent and exits.
        return supervise::serve(|| run_one(dir, args.plugin.as_deref())).map(|_| ());
    }
    let cells = args.grid()?.cells();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let font = args.font.as_deref();
    check_finished(&args.out, &cells, |c| args.spec(c))?;
    if args.report_only {
        println!("wrote {}", report(&args.out, &cells, &[], font)?);
        return Ok(());
    }
    // Every run's config must load before any run starts.
    for &c in &cells {
        let spec = args.spec(c);
        RunConfig::load(&spec.config, &spec.overrides)
            .with_context(|| format!("sweep run {}", c.dir_name()))?;
    }
    let todo = pending(&args.out, &cells);
    println!(
        "sweep: {} runs, {} finished, {} to run, in {}",
        cells.len(),
        cells.len() - todo.len(),
        todo.len(),
        args.out.display()
    );
    let exe = std::env::current_exe().context("locating the rattn binary for the sweep's runs")?;
    let mut failed = Vec::new();
    for (i, &c) in todo.iter().enumerate() {
        let dir = args.out.join(c.dir_name());
        // A run without a result was interrupted or failed: start it again from scratch.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("clearing the unfinished run {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let spec = args.spec(c);
        std::fs::write(dir.join("run.json"), serde_json::to_string_pretty(&spec)?)?;
        std::fs::write(dir.join("command.txt"), spec.train_command(&dir) + "\n")?;
        let stdout = std::fs::File::create(dir.join("stdout.txt"))?;
        let mut child = Command::new(&exe);
        child.arg("sweep").arg("--run-one").arg(&dir).stdout(stdout);
        if let Some(p) = &args.plugin {
            child.arg("--plugin").arg(p);
        }
        let t0 = std::time::Instant::now();
        match supervise::run::<RunResult>(child) {
            Ok(r) => println!(
                "[{}/{}] {}: eval loss {:.4}, recall {} {} %, {:.0} s",
                i + 1,
                todo.len(),
                c.dir_name(),
                r.eval_loss,
                bucket_label(SWEEP_BUCKETS[SWEEP_BUCKETS.len() - 1]),
                fmt_pct(r.recall_percent(SWEEP_BUCKETS.len() - 1)),
                t0.elapsed().as_secs_f64()
            ),
            Err(e) => {
                let msg = match &e {
                    ChildError::Failed(m) => m.clone(),
                    other => other.to_string(),
                };
                println!(
                    "[{}/{}] {}: FAILED after {:.0} s: {msg}",
                    i + 1,
                    todo.len(),
                    c.dir_name(),
                    t0.elapsed().as_secs_f64()
                );
                let _ = std::fs::write(dir.join("failed.txt"), &msg);
                failed.push((c, msg));
            }
        }
        report(&args.out, &cells, &failed, font)?;
    }
    let wrote = report(&args.out, &cells, &failed, font)?;
    println!("wrote {wrote}; {} failed", failed.len());
    if !failed.is_empty() {
        bail!(
            "{} of {} runs failed: {}",
            failed.len(),
            cells.len(),
            failed
                .iter()
                .map(|(c, _)| c.dir_name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
