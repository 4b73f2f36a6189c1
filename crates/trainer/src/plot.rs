//! `rattn plot`: a numeric field of `metrics.jsonl` files (loss by default) against the step, one
//! line per file, into a PNG.
//!
//! Text (title, axis labels, legend) is drawn with a TrueType font found at run time (`--font`, then
//! common system locations); without one the plot is drawn without text and the colour of each run
//! is printed instead, so no system font library is needed.

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// What `rattn plot` was asked to do.
#[derive(Debug, Clone)]
pub struct PlotOptions {
    /// Output PNG.
    pub out: PathBuf,
    /// JSON field plotted against `step`.
    pub metric: String,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// TrueType/OpenType font for the text (default: the first of a few system locations).
    pub font: Option<PathBuf>,
    /// Draw no text at all.
    pub no_text: bool,
}

/// One plotted line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label: the run directory's name.
    pub label: String,
    /// `(step, value)` in file order.
    pub points: Vec<(f64, f64)>,
    /// Line colour `(r, g, b)`.
    pub color: (u8, u8, u8),
}

/// Line colours, in file order (then repeated).
const COLORS: [(u8, u8, u8); 8] = [
    (214, 39, 40),
    (31, 119, 180),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
];

/// Font files tried when `--font` is not given.
const SYSTEM_FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The labels of metrics files: the name of the directory holding each (a relative path is
/// resolved first, so `metrics.jsonl` given from inside a run is labelled by the run), with as
/// many directories above it as it takes to tell runs of the same name apart (`a/run`, `b/run`).
pub fn run_labels(paths: &[PathBuf]) -> Vec<String> {
    let dirs: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
            let mut parts: Vec<String> = dir
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            if parts.is_empty() {
                parts.push(p.display().to_string());
            }
            parts
        })
        .collect();
    let label = |d: &[String], n: usize| d[d.len().saturating_sub(n)..].join("/");
    (0..dirs.len())
        .map(|i| {
            let mut n = 1;
            while n < dirs[i].len()
                && (0..dirs.len()).any(|j| j != i && label(&dirs[j], n) == label(&dirs[i], n))
            {
                n += 1;
            }
            label(&dirs[i], n)
        })
        .collect()
}

/// `(step, metric)` of every line of a metrics file that has both as numbers.
pub fn read_series(path: &Path, metric: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read metrics file {}", path.display()))?;
    let mut points = Vec::new();
    let mut fields = std::collections::BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON line", path.display(), i + 1))?;
        let Some(obj) = v.as_object() else {
            bail!("{}:{}: not a JSON object", path.display(), i + 1);
        };
        fields.extend(
            obj.iter()
                .filter(|(_, v)| v.is_number())
                .map(|(k, _)| k.clone()),
        );
        if let (Some(s), Some(y)) = (
            obj.get("step").and_then(|s| s.as_f64()),
            obj.get(metric).and_then(|y| y.as_f64()),
        ) {
            if y.is_finite() {
                points.push((s, y));
            }
        }
    }
    if points.is_empty() {
        bail!(
            "{} has no line with numeric \"step\" and {metric:?} (numeric fields: {})",
            path.display(),
            fields.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(points)
}

/// Find and register a font for plotters' text; `None` when none can be loaded.
pub(crate) fn load_font(explicit: Option<&Path>) -> Result<Option<PathBuf>> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => SYSTEM_FONTS.iter().map(PathBuf::from).collect(),
    };
    for p in candidates {
        let Ok(bytes) = std::fs::read(&p) else {
            if explicit.is_some() {
                bail!("cannot read font {}", p.display());
            }
            continue;
        };
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        match plotters::style::register_font("sans-serif", FontStyle::Normal, bytes) {
            Ok(()) => return Ok(Some(p)),
            Err(_) if explicit.is_some() => {
                bail!("{} is not a TrueType/OpenType font", p.display())
            }
            Err(_) => continue,
        }
    }
    Ok(None)
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

/// Plot `files` per `opts`; returns the plotted series and whether text was drawn.
pub fn plot(files: &[PathBuf], opts: &PlotOptions) -> Result<(Vec<Series>, bool)> {
    if files.is_empty() {
        bail!("give at least one metrics.jsonl file");
    }
    if opts.width < 64 || opts.height < 64 || opts.width > 16384 || opts.height > 16384 {
        bail!(
            "--width/--height must be within 64..=16384 pixels (got {}x{})",
            opts.width,
            opts.height
        );
    }
    if opts.out.extension().and_then(|e| e.to_str()) != Some("png") {
        bail!("--out {} must end in .png", opts.out.display());
    }
    let labels = run_labels(files);
    let series: Vec<Series> = files
        .iter()
        .zip(labels)
        .enumerate()
        .map(|(i, (f, label))| {
            Ok(Series {
                label,
                points: read_series(f, &opts.metric)?,
                color: COLORS[i % COLORS.len()],
            })
        })
        .collect::<Result<_>>()?;
    let text = !opts.no_text && load_font(opts.font.as_deref())?.is_some();
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    draw(&series, opts, text).map_err(|e| anyhow!("drawing {}: {e}", opts.out.display()))?;
    Ok((series, text))
}

fn draw(
    series: &[Series],
    opts: &PlotOptions,
    text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let (x0, x1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (y0, y1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let pad = (y1 - y0) * 0.05;
    let root = BitMapBackend::new(&opts.out, (opts.width, opts.height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(12);
    if text {
        builder
            .caption(format!("{} vs step", opts.metric), ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(64);
    }
    let mut chart = builder.build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(opts.metric.as_str())
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
    } else {
        chart
            .configure_mesh()
            .x_labels(0)
            .y_labels(0)
            .disable_x_mesh()
            .disable_y_mesh()
            .draw()?;
    }
    for s in series {
        let (r, g, b) = s.color;
        let color = RGBColor(r, g, b);
        let drawn = chart.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))?;
        if text {
            drawn.label(s.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// `rattn plot` arguments.
#[derive(clap::Args)]
pub(crate) struct PlotArgs {
    /// metrics.jsonl files (one line each, labelled by the run directory's name).
    #[arg(required = true)]
    pub(crate) files: Vec<PathBuf>,
    /// Output PNG.
    #[arg(long, default_value = "loss.png")]
    pub(crate) out: PathBuf,
    /// Numeric field to plot against `step`.
    #[arg(long, default_value = "loss")]
    pub(crate) metric: String,
    /// Width in pixels.
    #[arg(long, default_value_t = 960)]
    pub(crate) width: u32,
    /// Height in pixels.
    #[arg(long, default_value_t = 600)]
    pub(crate) height: u32,
    /// TrueType/OpenType font for the text (default: a system font such as DejaVu Sans, if any).
    #[arg(long)]
    pub(crate) font: Option<PathBuf>,
    /// Draw no text (title, axes labels, legend); run colours are printed instead.
    #[arg(long)]
    pub(crate) no_text: bool,
}

/// Run `rattn plot`: write the PNG and print each run's colour and point count.
pub(crate) fn run(args: &PlotArgs) -> Result<()> {
    let (series, text) = plot(
        &args.files,
        &PlotOptions {
            out: args.out.clone(),
            metric: args.metric.clone(),
            width: args.width,
            height: args.height,
            font: args.font.clone(),
            no_text: args.no_text,
        },
    )?;
    for s in &series {
        let (r, g, b) = s.color;
        let last = s.points.last().map(|p| p.1).unwrap_or(f64::NAN);
        println!(
            "{}: #{r:02x}{g:02x}{b:02x}, {} points, last {} {last:.4}",
            s.label,
            s.points.len(),
            args.metric
        );
    }
    if !text && !args.no_text {
        println!("no TrueType font found (give --font PATH): plotted without text");
    }
    println!(
        "wrote {} ({}x{})",
        args.out.display(),
        args.width,
        args.height
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_tell_runs_of_the_same_name_apart() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = ["a/run", "b/run", "c/other"]
            .iter()
            .map(|d| {
                let d = dir.path().join(d);
                std::fs::create_dir_all(&d).unwrap();
                let f = d.join("metrics.jsonl");
                std::fs::write(&f, "").unwrap();
                f
            })
            .collect();
        assert_eq!(run_labels(&files), ["a/run", "b/run", "other"]);
        assert_eq!(run_labels(&files[2..]), ["other"]);
    }
}
