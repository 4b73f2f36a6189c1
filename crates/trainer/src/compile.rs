//! `rattn compile`: trace the model's train step (and, with `--decode`, its decode step), compile
//! it ahead of time for a TPU topology (libtpu) or a GPU (the CUDA plugin) that is not attached,
//! and report compile time, per-device memory against the device's limit, and on TPU XLA's cost
//! analysis (FLOPs, bytes accessed, optimal seconds, implied tokens/s).
//!
//! The plugin work runs in a child process (this binary re-invoked with a hidden flag), so a
//! plugin that aborts (a CHECK failure, SIGFPE) turns into a clear error instead of a crash.
//! The train step is traced for the target's platform, so RLA `auto` lowers to pure HLO (and
//! `custom_call` is refused): the typed-FFI custom calls exist only in our CPU plugin process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use hlo_builder::Computation;
use model::config::Lowering;
use pjrt::install::PluginKind;
use pjrt::topology::{Topology, TopologyKind};
use pjrt::{CompileOptions, ErrorCode, Program};
use serde::Serialize;

use crate::config::RunConfig;

/// Arguments of `rattn compile`.
#[derive(clap::Args, Clone, Debug)]
pub struct CompileArgs {
    /// Target: `tpu:<topology>` (e.g. `tpu:v5p:2x2x1`, `tpu:v5e:2x2`, `tpu:v6e:1x1`) or
    /// `gpu:<name>[:<shape>]` (e.g. `gpu:h100`, `gpu:a100`, `gpu:h100:1x1x8`).
    #[arg(long)]
    pub target: String,
    /// Run configuration (TOML with [model], [train], [data]).
    #[arg(long, default_value = "configs/tiny.toml")]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set model.layers=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Sequences per step (overrides `train.batch`).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Also compile the decode step (needs `model::decode`).
    #[arg(long)]
    pub decode: bool,
    /// Write the optimized programs as HLO text into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Internal: do the plugin work in this process (the parent runs us as a child).
    #[arg(long, hide = true)]
    pub in_process: bool,
}

/// A parsed `--target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TPU topology name such as `v5p:2x2x1`.
    Tpu(String),
    /// A built-in GPU spec name and a topology shape (`1x1x1` by default).
    Gpu {
        /// `h100`, `a100`.
        name: String,
        /// `<partitions>x<hosts per partition>x<devices per host>`.
        shape: String,
    },
}

impl Target {
    /// Parse `tpu:<topology>` or `gpu:<name>[:<shape>]`.
    pub fn parse(s: &str) -> Result<Target> {
        let usage = "expected tpu:<topology> (e.g. tpu:v5p:2x2x1, tpu:v5e:2x2, tpu:v6e:1x1) or \
                     gpu:<name>[:<shape>] (e.g. gpu:h100, gpu:a100, gpu:h100:1x1x8)";
        match s.split_once(':') {
            Some(("tpu", rest)) if !rest.is_empty() => Ok(Target::Tpu(rest.to_string())),
            Some(("gpu", rest)) if !rest.is_empty() => {
                let (name, shape) = rest.split_once(':').unwrap_or((rest, "1x1x1"));
                if name.is_empty() || shape.is_empty() {
                    bail!("--target {s:?}: {usage}");
                }
                Ok(Target::Gpu {
                    name: name.to_string(),
                    shape: shape.to_string(),
                })
            }
            _ => bail!("--target {s:?}: {usage}"),
        }
    }

    /// `tpu` or `gpu` (the suffix of XLA's dump names).
    fn platform(&self) -> &'static str {
        match self {
            Target::Tpu(_) => "tpu",
            Target::Gpu { .. } => "gpu",
        }
    }
}

/// Memory of one compiled program on one device, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Arguments (parameters, Adam moments, tokens).
    pub argument_bytes: i64,
    /// Outputs.
    pub output_bytes: i64,
    /// Outputs that alias arguments.
    pub alias_bytes: i64,
    /// Temporaries.
    pub temp_bytes: i64,
    /// Generated code (0 on GPU).
    pub generated_code_bytes: i64,
    /// Peak: the plugin's peak, or arguments + outputs + temporaries - aliases if larger.
    pub peak_bytes: i64,
}

/// XLA's cost analysis of one program (TPU only).
#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    /// Floating-point operations.
    pub flops: Option<f64>,
    /// Bytes read and written.
    pub bytes_accessed: Option<f64>,
    /// Transcendental operations.
    pub transcendentals: Option<f64>,
    /// XLA's lower bound on the step time, in seconds.
    pub optimal_seconds: Option<f64>,
    /// `batch · tokens per sequence / optimal_seconds`.
    pub tokens_per_second: Option<f64>,
    /// Every property the plugin reported, except the per-unit `utilization*` entries.
    pub properties: std::collections::BTreeMap<String, f64>,
}

/// What one compiled program looked like.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramReport {
    /// `train_step` or `decode_step`.
    pub name: String,
    /// Tracing with the HLO builder, seconds.
    pub trace_seconds: f64,
    /// Size of the serialized HloModuleProto we sent.
    pub hlo_bytes: usize,
    /// The plugin's compile, seconds (also on failure).
    pub compile_seconds: f64,
    /// Memory per device; `None` when the compiler refused the program.
    pub memory: Option<MemoryReport>,
    /// Whether it fits in one device's memory.
    pub fits: bool,
    /// Why it does not fit (or why it failed), in words.
    pub verdict: String,
    /// TPU cost analysis.
    pub cost: Option<CostReport>,
    /// Where the optimized HLO text was written.
    pub optimized_hlo: Option<PathBuf>,
}

/// The whole report of one `rattn compile`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The `--target` as given.
    pub target: String,
    /// `tpu` or `gpu`.
    pub platform: String,
    /// Device kind, e.g. `TPU v5`.
    pub device_kind: String,
    /// Devices in the topology (the program uses one).
    pub topology_devices: usize,
    /// Memory of one device, bytes.
    pub device_memory_bytes: i64,
    /// The plugin's platform version string.
    pub platform_version: String,
    /// Model parameters.
    pub param_count: usize,
    /// Parameters and both Adam moments in f32: `4 · 3 · param_count`.
    pub param_and_adam_bytes: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// The RLA lowering used.
    pub rla_lowering: String,
    /// One entry per compiled program.
    pub programs: Vec<ProgramReport>,
    /// Things skipped, in words.
    pub notes: Vec<String>,
}

/// Marks the child's error on its stderr.
const CHILD_ERROR: &str = "rattn-compile-child-error: ";

/// The CPU-only custom-call targets of our RLA kernels.
const CPU_ONLY_TARGETS: &[&str] = &[pallas_port::ffi::FWD_TARGET, pallas_port::ffi::BWD_TARGET];

/// Load the config and apply `--batch` and the lowering policy for an accelerator target: `auto`
/// stays (tracing for the target's platform resolves it to `hlo`); `custom_call` is refused,
/// naming the CPU-only custom calls.
pub fn prepare_config(args: &CompileArgs, target: &Target) -> Result<RunConfig> {
    let mut cfg = RunConfig::load(&args.config, &args.overrides)?;
    if let Some(b) = args.batch {
        if b == 0 {
            bail!("--batch must be > 0");
        }
        cfg.train.batch = b;
    }
    match cfg.model.rla.lowering {
        Lowering::Hlo | Lowering::Auto => {}
        Lowering::CustomCall => bail!(
            "model.rla.lowering = \"custom_call\" lowers RLA to the custom calls {}, which are served only by \
             our CPU FFI kernels (registered with the PJRT CPU plugin); {} has no handler for them. Use \
             model.rla.lowering = \"hlo\" or \"auto\" (auto picks the HLO lowering for {})",
            CPU_ONLY_TARGETS
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(" and "),
            target.platform().to_uppercase(),
            target.platform().to_uppercase(),
        ),
    }
    Ok(cfg)
}

/// `rattn compile`: in the parent, re-run this binary as a child that does the plugin work;
/// with `--in-process`, do it here.
pub fn run(args: &CompileArgs) -> Result<()> {
    let target = Target::parse(&args.target)?;
    // Config errors are cheap to find here, without a child process.
    prepare_config(args, &target)?;
    if args.in_process {
        // The parent finds our own error by this marker among the plugins' log lines.
        if let Err(e) = run_in_process(args, &target) {
            eprintln!("{CHILD_ERROR}{e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    run_child(args)
}

fn run_child(args: &CompileArgs) -> Result<()> {
    let exe = std::env::current_exe()
        .context("locating the rattn binary to run the compile in a child")?;
    let mut cmd = Command::new(&exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--in-process")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let out = cmd
        .spawn()
        .and_then(|c| c.wait_with_output())
        .with_context(|| format!("running {} for the compile", exe.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprint!("{stderr}");
        return Ok(());
    }
    // The child's own error follows its marker; everything before is plugin logging.
    if let Some(pos) = stderr.rfind(CHILD_ERROR) {
        eprint!("{}", &stderr[..pos]);
        let msg = stderr[pos + CHILD_ERROR.len()..].trim_end();
        return Err(anyhow!("{msg}"));
    }
    let how = describe_exit(&out.status);
    let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    bail!(
        "the {} plugin {how} while compiling for {} (a plugin CHECK failure or crash, or the process was \
         killed; it ran in a child process). Last lines of its log:\n{}",
        if args.target.starts_with("tpu") {
            "TPU (libtpu)"
        } else {
            "CUDA"
        },
        args.target,
        if tail.is_empty() {
            "(none)".to_string()
        } else {
            tail.join("\n")
        }
    )
}

fn describe_exit(status: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                6 => "SIGABRT",
                8 => "SIGFPE",
                9 => "SIGKILL",
                11 => "SIGSEGV",
                15 => "SIGTERM",
                _ => "signal",
            };
            return format!("was killed by {name} ({sig})");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "ended abnormally".into(),
    }
}

fn open_topology(target: &Target) -> Result<Topology> {
    let cache = crate::runtime::plugin_cache();
    let hint = crate::runtime::with_install_hint;
    Ok(match target {
        Target::Tpu(name) => Topology::tpu(&cache.load(PluginKind::Tpu).map_err(hint)?, name)?,
        Target::Gpu { name, shape } => {
            Topology::gpu_named(&cache.load(PluginKind::Cuda).map_err(hint)?, name, shape)
                .map_err(hint)?
        }
    })
}

fn run_in_process(args: &CompileArgs, target: &Target) -> Result<()> {
    let cfg = prepare_config(args, target)?;
    let topo = open_topology(target)?;
    if std::env::var_os("RATTN_COMPILE_TEST_ABORT").is_some() {
        // Test hook: die the way a plugin CHECK failure does, after the plugin is loaded.
        eprintln!("RATTN_COMPILE_TEST_ABORT is set: aborting the compile child");
        std::process::abort();
    }
    let device_kind = topo
        .devices()
        .first()
        .map(|d| d.kind.clone())
        .unwrap_or_default();
    let device_memory_bytes = topo.device_memory_bytes().unwrap_or(0);
    let model = model::Model::new(cfg.model.clone())?;
    let param_count = model.param_count();
    let mut report = Report {
        target: args.target.clone(),
        platform: target.platform().into(),
        device_kind,
        topology_devices: topo.devices().len(),
        device_memory_bytes,
        platform_version: topo.platform_version().unwrap_or_default(),
        param_count,
        param_and_adam_bytes: 4 * 3 * param_count,
        batch: cfg.train.batch,
        seq_len: cfg.model.seq_len,
        rla_lowering: "hlo".into(),
        programs: Vec::new(),
        notes: Vec::new(),
    };
    if !args.json {
        print_header(&report);
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating --out directory {}", dir.display()))?;
    }

    let t0 = Instant::now();
    let comp =
        crate::step::build_train_step(&cfg, target.platform()).context("tracing the train step")?;
    let trace_seconds = t0.elapsed().as_secs_f64();
    let tokens = cfg.train.batch * cfg.model.seq_len;
    let p = compile_program(
        &topo,
        target,
        &comp,
        "train_step",
        0,
        trace_seconds,
        tokens,
        args.out.as_deref(),
    )?;
    if !args.json {
        print_program(&p, report.device_memory_bytes);
    }
    report.programs.push(p);

    if args.decode {
        // One new token per sequence against caches sized for `seq_len` tokens.
        let t0 = Instant::now();
        let comp = model
            .decode_step(cfg.train.batch, cfg.model.seq_len)
            .context("tracing the decode step")?;
        let p = compile_program(
            &topo,
            target,
            &comp,
            "decode_step",
            1,
            t0.elapsed().as_secs_f64(),
            cfg.train.batch,
            args.out.as_deref(),
        )?;
        if !args.json {
            print_program(&p, report.device_memory_bytes);
        }
        report.programs.push(p);
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    let failed: Vec<&ProgramReport> = report.programs.iter().filter(|p| !p.fits).collect();
    if let Some(p) = failed.first() {
        bail!("{} for {}: {}", p.name, args.target, p.verdict);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn compile_program(
    topo: &Topology,
    target: &Target,
    comp: &Computation,
    name: &str,
    index: usize,
    trace_seconds: f64,
    tokens: usize,
    out: Option<&Path>,
) -> Result<ProgramReport> {
    let bytes = comp.to_bytes();
    let t0 = Instant::now();
    let compiled = topo.compile(Program::Hlo(&bytes), &CompileOptions::default());
    let compile_seconds = t0.elapsed().as_secs_f64();
    let mut p = ProgramReport {
        name: name.into(),
        trace_seconds,
        hlo_bytes: bytes.len(),
        compile_seconds,
        memory: None,
        fits: false,
        verdict: String::new(),
        cost: None,
        optimized_hlo: None,
    };
    let exe = match compiled {
        Ok(exe) => exe,
        Err(pjrt::Error::Pjrt {
            code: ErrorCode::ResourceExhausted,
            message,
            ..
        }) => {
            // The TPU compiler enforces HBM itself.
            p.verdict = format!("does not fit: the compiler refused it: {message}");
            return Ok(p);
        }
        Err(e) => return Err(anyhow!(e).context(format!("compiling {name} for {}", topo.name()))),
    };
    let s = exe.memory_stats()?;
    let peak = s.peak_bytes();
    p.memory = Some(MemoryReport {
        argument_bytes: s.argument_size_in_bytes,
        output_bytes: s.output_size_in_bytes,
        alias_bytes: s.alias_size_in_bytes,
        temp_bytes: s.temp_size_in_bytes,
        generated_code_bytes: s.generated_code_size_in_bytes,
        peak_bytes: peak,
    });
    match exe.check_fits_in_device_memory() {
        Ok(headroom) => {
            p.fits = true;
            p.verdict = format!("fits, {} free", gib(headroom));
        }
        Err(pjrt::Error::Pjrt {
            code: ErrorCode::ResourceExhausted,
            ..
        }) => {
            p.verdict = format!(
                "does not fit: needs {} per device, a {} has {}",
                gib(peak),
                topo.devices()
                    .first()
                    .map(|d| d.kind.as_str())
                    .unwrap_or("device"),
                gib(topo.device_memory_bytes().unwrap_or(0))
            );
        }
        Err(e) => return Err(e.into()),
    }
    if topo.kind() == TopologyKind::Tpu {
        let c = exe.cost_analysis()?;
        let opt = c.optimal_seconds();
        p.cost = Some(CostReport {
            flops: c.flops(),
            bytes_accessed: c.bytes_accessed(),
            transcendentals: c.transcendentals(),
            optimal_seconds: opt,
            tokens_per_second: opt.filter(|&s| s > 0.0).map(|s| tokens as f64 / s),
            properties: c
                .properties
                .iter()
                .filter(|(k, _)| !k.starts_with("utilization"))
                .cloned()
                .collect(),
        });
    }
    if let Some(dir) = out {
        let proto = exe.optimized_program()?;
        let text = hlo_builder::print_module_bytes(&proto)
            .with_context(|| format!("printing the optimized {name}"))?;
        let path = dir.join(format!(
            "module_{index:04}.{name}.{}_after_optimizations.txt",
            target.platform()
        ));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        p.optimized_hlo = Some(path);
    }
    Ok(p)
}

/// Bytes in GiB, or MiB/KiB for small amounts.
fn gib(b: i64) -> String {
    let x = b as f64;
    if x.abs() >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", x / (1u64 << 30) as f64)
    } else if x.abs() >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", x / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", x / 1024.0)
    }
}

fn print_header(r: &Report) {
    println!(
        "target {}: {} × {} ({} per device), {}",
        r.target,
        r.topology_devices,
        r.device_kind,
        gib(r.device_memory_bytes),
        r.platform_version.lines().next().unwrap_or("")
    );
    println!(
        "model: {} parameters ({} as f32 params + Adam m, v), batch {} × {} tokens, RLA lowering {}; \
         compiled for one device (num_partitions 1)",
        r.param_count,
        gib(r.param_and_adam_bytes as i64),
        r.batch,
        r.seq_len,
        r.rla_lowering
    );
}

fn print_program(p: &ProgramReport, limit: i64) {
    println!(
        "{}: traced in {:.2} s ({} MB HLO), compiled in {:.1} s",
        p.name,
        p.trace_seconds,
        p.hlo_bytes / 1_000_000,
        p.compile_seconds
    );
    if let Some(m) = &p.memory {
        println!(
            "  memory per device: arguments {}, outputs {} (aliased {}), temporaries {}, code {}, peak {} of {}",
            gib(m.argument_bytes),
            gib(m.output_bytes),
            gib(m.alias_bytes),
            gib(m.temp_bytes),
            gib(m.generated_code_bytes),
            gib(m.peak_bytes),
            gib(limit)
        );
    }
    println!("  {}", p.verdict);
    if let Some(c) = &p.cost {
        let f = |v: Option<f64>| {
            v.map(|x| format!("{x:.4e}"))
                .unwrap_or_else(|| "n/a".into())
        };
        println!(
            "  cost: {} FLOPs, {} bytes accessed, optimal {} s, {} tokens/s",
            f(c.flops),
            f(c.bytes_accessed),
            c.optimal_seconds
                .map(|s| format!("{s:.4}"))
                .unwrap_or_else(|| "n/a".into()),
            c.tokens_per_second
                .map(|t| format!("{t:.0}"))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    if let Some(path) = &p.optimized_hlo {
        println!("  optimized HLO: {}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_are_explained() {
        assert_eq!(
            Target::parse("tpu:v5p:2x2x1").unwrap(),
            Target::Tpu("v5p:2x2x1".into())
        );
        assert_eq!(
            Target::parse("gpu:h100").unwrap(),
            Target::Gpu {
                name: "h100".into(),
                shape: "1x1x1".into()
            }
        );
        assert_eq!(
            Target::parse("gpu:a100:1x1x8").unwrap(),
            Target::Gpu {
                name: "a100".into(),
                shape: "1x1x8".into()
            }
        );
        for bad in ["", "tpu", "tpu:", "h100", "cpu:x", "gpu::1x1x1"] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains("tpu:<topology>"), "{bad:?}: {e}");
        }
    }
}
