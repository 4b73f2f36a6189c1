//! `rattn compile`: trace the model's train step (and, with `--decode`, its decode step), compile
//! it ahead of time for a TPU topology (libtpu) or a GPU (the CUDA plugin) that is not attached,
//! and report compile time, per-device memory against the device's limit, and on TPU XLA's cost
//! analysis (FLOPs, bytes accessed, optimal seconds, implied tokens/s).
//!
//! The plugin work runs in a child process (this binary re-invoked with a hidden flag, supervised
//! by [`crate::supervise`]), so a plugin that aborts (a CHECK failure, SIGFPE) turns into a clear
//! error instead of a crash. Tracing, compiling and dumping go through [`crate::inspect`], the
//! path `rattn dump` takes too.
//! The train step is traced for the target's platform, so RLA `auto` lowers to pure HLO (and
//! `custom_call` is refused): the typed-FFI custom calls exist only in our CPU plugin process.

mod scan_estimate;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use model::config::Lowering;
use pjrt::install::PluginKind;
use pjrt::topology::{Topology, TopologyKind};
use pjrt::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::RunConfig;
use crate::inspect::{units, Compiler, Dump, Format, MemoryReport, Module};
use crate::supervise::{self, ChildError};
pub use scan_estimate::ScanEstimate;

/// Arguments of `rattn compile`.
#[derive(clap::Args, Clone, Debug)]
pub struct CompileArgs {
    /// Target: `tpu:<topology>` (e.g. `tpu:v5p:2x2x1`, `tpu:v5e:2x2`, `tpu:v6e:1x1`) or
    /// `gpu:<name>[:<shape>]` (e.g. `gpu:h100`, `gpu:a100`, `gpu:h100:1x1x8`).
    #[arg(long)]
    pub target: String,
    /// Run configuration (TOML with `[model]`, `[train]`, `[data]`).
    #[arg(long, default_value = "configs/tiny.toml")]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set model.layers=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Compile the train step sharded over a mesh of the topology's devices, e.g.
    /// `--mesh fsdp=4` or `--mesh data=2,tensor=2` (sizes of the `[mesh]` axes data, fsdp,
    /// tensor, seq; one may be -1 for the rest). The product must be the topology's device
    /// count. Memory is per chip; tokens/s is for the whole slice and per chip.
    #[arg(long, value_name = "AXIS=N,...")]
    pub mesh: Option<String>,
    /// Sequences per step (overrides `train.batch`).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Also compile the one-token decode step (`rattn generate`'s).
    #[arg(long)]
    pub decode: bool,
    /// Write the optimized programs as HLO text into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// With `model.scan_layers`: skip the second, cost-only compile (the same step with twice
    /// the periods per trip of the layer loop) that estimates the step's FLOPs, bytes, optimal
    /// seconds and tokens/s (XLA's cost analysis counts the loop's body once).
    #[arg(long)]
    pub no_scan_estimate: bool,
    /// Take the train step's compile (memory, verdict, cost) from this earlier `--json` report
    /// of the same target, config, batch and mesh instead of compiling it again: the program is
    /// traced and must have the same HLO size. Only the scan estimate's compile runs.
    #[arg(long, value_name = "FILE")]
    pub base_report: Option<PathBuf>,
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
            Some(("tpu", rest)) if !rest.is_empty() => {
                // The name is checked here, before any plugin is looked for, so a bad generation
                // is named as such even where libtpu is not installed.
                pjrt::tpu::check_tpu_name(rest)
                    .map_err(|e| anyhow::anyhow!("--target {s:?}: {e}"))?;
                Ok(Target::Tpu(rest.to_string()))
            }
            Some(("gpu", rest)) if !rest.is_empty() => {
                let (name, shape) = rest.split_once(':').unwrap_or((rest, "1x1x1"));
                if name.is_empty() || shape.is_empty() {
                    bail!("--target {s:?}: {usage}");
                }
                pjrt::gpu::builtin_spec(name)
                    .map_err(|e| anyhow::anyhow!("--target {s:?}: {e}"))?;
                pjrt::gpu::parse_gpu_shape(shape)
                    .map_err(|e| anyhow::anyhow!("--target {s:?}: {e}"))?;
                Ok(Target::Gpu {
                    name: name.to_string(),
                    shape: shape.to_string(),
                })
            }
            _ => bail!("--target {s:?}: {usage}"),
        }
    }

    /// The PJRT platform name of the target's plugin (`tpu`, `cuda`), which resolves the RLA
    /// lowering `auto` exactly as on a client of that plugin (Mosaic on TPU, Triton on CUDA).
    fn pjrt_platform(&self) -> &'static str {
        match self {
            Target::Tpu(_) => "tpu",
            Target::Gpu { .. } => "cuda",
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

/// XLA's cost analysis of one program (TPU only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostReport {
    /// Floating-point operations.
    pub flops: Option<f64>,
    /// Bytes read and written.
    pub bytes_accessed: Option<f64>,
    /// Transcendental operations.
    pub transcendentals: Option<f64>,
    /// XLA's lower bound on the step time, in seconds (`None` where the plugin gave none or a
    /// negative value).
    pub optimal_seconds: Option<f64>,
    /// `batch · tokens per sequence / optimal_seconds` (the whole step, all chips: an SPMD
    /// program's cost analysis is one partition's, and every partition runs at once).
    pub tokens_per_second: Option<f64>,
    /// `tokens_per_second` divided by the chips of the mesh.
    pub tokens_per_second_per_chip: Option<f64>,
    /// Every property the plugin reported, except the per-unit `utilization*` entries.
    pub properties: std::collections::BTreeMap<String, f64>,
    /// Why the figures above are not the step's, where they are not: XLA's cost analysis
    /// counts a `while` body once, so with `model.scan_layers` the layer loop counts as one
    /// trip (no tokens/s is derived then; see [`ProgramReport::scan_estimate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What one compiled program looked like.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// The Mosaic kernels (`tpu_custom_call`, the `mosaic` RLA lowering) in the program.
    pub mosaic_kernels: Option<KernelVmemReport>,
    /// A scanned train step's cost over all periods of the layer loop, from a second compile
    /// ([`ScanEstimate`]); memory stays this program's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_estimate: Option<ScanEstimate>,
}

/// VMEM of the Mosaic kernels of a compiled TPU program, as libtpu reports it per kernel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelVmemReport {
    /// Number of `tpu_custom_call`s.
    pub calls: usize,
    /// Smallest VMEM use of one kernel, bytes.
    pub min_vmem_bytes: usize,
    /// Largest VMEM use of one kernel, bytes.
    pub max_vmem_bytes: usize,
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
    /// Devices in the topology (the train step uses `mesh_devices` of them).
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
    /// The train step's rematerialization policy (`[train] remat`).
    pub remat: String,
    /// What that policy keeps for the backward pass, in words.
    pub remat_keeps: String,
    /// The mesh the train step is sharded over (`1 device = …` without `--mesh`).
    pub mesh: String,
    /// Devices the train step runs on (the mesh's).
    pub mesh_devices: usize,
    /// The logical-axis rules that differ from the defaults (`mesh.rules`), e.g.
    /// `embed → [fsdp] (default [fsdp, seq])`; empty when all are the defaults.
    pub mesh_rules: Vec<String>,
    /// Whether the Adam moments are cut over the axes their parameters are replicated over
    /// (`mesh.shard_optimizer`, ZeRO-1).
    pub shard_optimizer: bool,
    /// How the global layers attend when the mesh cuts the sequence (`mesh.seq_global` resolved
    /// for this T and head dim, and why); `None` without a `seq` cut or global layers.
    pub seq_global: Option<String>,
    /// One entry per compiled program.
    pub programs: Vec<ProgramReport>,
    /// Things skipped, in words.
    pub notes: Vec<String>,
}

/// The CPU-only custom-call targets of our RLA kernels.
const CPU_ONLY_TARGETS: &[&str] = &[pallas_port::ffi::FWD_TARGET, pallas_port::ffi::BWD_TARGET];

/// Load the config and apply `--batch` and the lowering policy for an accelerator target: `auto`
/// stays (tracing for the target's platform resolves it: `mosaic` on TPU, `hlo` elsewhere);
/// `custom_call` is refused, naming the CPU-only custom calls; `mosaic` only on TPU.
pub fn prepare_config(args: &CompileArgs, target: &Target) -> Result<RunConfig> {
    let mut overrides = args.overrides.clone();
    if let Some(m) = &args.mesh {
        let mut seen = Vec::new();
        for part in m.split(',').filter(|p| !p.trim().is_empty()) {
            let Some((axis, size)) = part.split_once('=') else {
                bail!("--mesh {m:?}: expected AXIS=N[,AXIS=N…], e.g. fsdp=4 or data=2,tensor=2");
            };
            let axis = axis.trim();
            if !["data", "fsdp", "tensor", "seq"].contains(&axis) {
                bail!("--mesh {m:?}: unknown mesh axis {axis:?} (data, fsdp, tensor or seq)");
            }
            if seen.contains(&axis) {
                bail!("--mesh {m:?} gives {axis} twice");
            }
            seen.push(axis);
            overrides.push(format!("mesh.{axis}={}", size.trim()));
        }
        if seen.is_empty() {
            bail!("--mesh {m:?}: expected AXIS=N[,AXIS=N…], e.g. fsdp=4 or data=2,tensor=2");
        }
    }
    let mut cfg = RunConfig::load(&args.config, &overrides)?;
    if let Some(b) = args.batch {
        if b == 0 {
            bail!("--batch must be > 0");
        }
        cfg.train.batch = b;
    }
    match cfg.model.rla.lowering {
        Lowering::Hlo | Lowering::Auto => {}
        Lowering::Triton if matches!(target, Target::Gpu { .. }) => {}
        Lowering::Triton => bail!(
            "model.rla.lowering = \"triton\" emits Triton GPU kernels, which {} cannot compile; use \
             model.rla.lowering = \"hlo\" or \"auto\"",
            target.platform().to_uppercase()
        ),
        Lowering::Mosaic if target.platform() == "tpu" => {}
        Lowering::Mosaic => bail!(
            "model.rla.lowering = \"mosaic\" lowers RLA to TPU kernels (tpu_custom_call), which {} cannot \
             run; use \"hlo\" or \"auto\"",
            target.platform().to_uppercase()
        ),
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
    // The kernels that only our CPU FFI handlers serve: (on, key, what it lowers, targets).
    use model::config::{AttentionLowering, KernelLowering::Kernel};
    use pallas_port::{cross_entropy as xent, embed, ffi_attention as attn, rms_norm as norm};
    let m = &cfg.model;
    let cpu_kernels = [
        (
            m.attention_lowering == AttentionLowering::Kernel,
            "attention_lowering",
            "attention",
            [attn::ATTN_FWD_TARGET, attn::ATTN_BWD_TARGET],
        ),
        (
            m.loss_lowering == Kernel,
            "loss_lowering",
            "the loss",
            [xent::XENT_FWD_TARGET, xent::XENT_BWD_TARGET],
        ),
        (
            m.norm_lowering == Kernel,
            "norm_lowering",
            "the RMS norms",
            [norm::RMS_NORM_FWD_TARGET, norm::RMS_NORM_BWD_TARGET],
        ),
        (
            m.embed_lowering == Kernel,
            "embed_lowering",
            "the token embedding",
            [embed::EMBED_FWD_TARGET, embed::EMBED_BWD_TARGET],
        ),
    ];
    for (on, key, what, [fwd, bwd]) in cpu_kernels {
        if on {
            bail!(
                "model.{key} = \"kernel\" lowers {what} to the custom calls {fwd:?} and {bwd:?}, \
                 which are served only by our CPU FFI kernels; {} has no handler for them. Use \
                 model.{key} = \"hlo\" or \"auto\" (auto picks the HLO lowering there)",
                target.platform().to_uppercase(),
            );
        }
    }
    Ok(cfg)
}

/// `rattn compile`: in the parent, re-run this binary as a supervised child that does the plugin
/// work; with `--in-process`, do it here.
pub fn run(args: &CompileArgs) -> Result<()> {
    let target = Target::parse(&args.target)?;
    // Config errors are cheap to find here, without a child process.
    prepare_config(args, &target)?;
    if args.in_process {
        // In a child, `serve` sends the outcome to the parent and exits.
        return supervise::serve(|| run_in_process(args, &target));
    }
    let exe = std::env::current_exe()
        .context("locating the rattn binary to run the compile in a child")?;
    let mut child = Command::new(&exe);
    child.args(std::env::args_os().skip(1)).arg("--in-process");
    supervise::run::<()>(child).map_err(|e| child_error(&args.target, e))
}

/// The error of a compile child that failed: its own error as it is; a child that died (a plugin
/// CHECK failure, a crash, a kill) named with the plugin, the target and its last log lines.
fn child_error(target: &str, e: ChildError) -> anyhow::Error {
    match e {
        ChildError::Failed(message) => anyhow!("{message}"),
        ChildError::Died { how, log_tail } => anyhow!(
            "the {} plugin {how} while compiling for {target} (a plugin CHECK failure or crash, or the \
             process was killed; it ran in a child process). Last lines of its log:\n{}",
            if target.starts_with("tpu") {
                "TPU (libtpu)"
            } else {
                "CUDA"
            },
            supervise::log_tail_text(&log_tail)
        ),
        ChildError::Supervisor(e) => e.context(format!("running the compile for {target}")),
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
    let device_kind = topo
        .devices()
        .first()
        .map(|d| d.kind.clone())
        .unwrap_or_default();
    let device_memory_bytes = topo.device_memory_bytes().unwrap_or(0);
    // The mesh: `-1` is the rest of the topology's devices; a mesh must cover them all.
    let mesh = if cfg.mesh.fixed_device_count()? == Some(1) {
        if let (Some(m), n @ 2..) = (&args.mesh, topo.devices().len()) {
            bail!(
                "--mesh {m:?} covers 1 device, but {} has {n}: the product of the sizes must be \
                 {n} (or leave --mesh out to compile for one chip)",
                args.target
            );
        }
        model::Mesh::single()
    } else {
        cfg.mesh
            .resolve(topo.devices().len())
            .with_context(|| format!("--mesh for {}", args.target))?
    };
    let model = model::Model::new(cfg.model.clone())?;
    let param_count = model.param_count();
    let defaults = model::AxisRules::default();
    let mesh_rules = mesh
        .rules()
        .iter()
        .filter(|&(l, m)| defaults.get(l) != m)
        .map(|(l, m)| {
            format!(
                "{l} → {} (default {})",
                axes_list(m),
                axes_list(defaults.get(l))
            )
        })
        .collect();
    // The scheme of the global layers (checked again, with the parameters, when the step is traced).
    let seq_global = model
        .clone()
        .with_mesh(mesh.clone())
        .ok()
        .and_then(|m| m.seq_global_note());
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
        rla_lowering: model.rla_lowering(target.pjrt_platform()).as_str().into(),
        remat: crate::step::remat_label(&cfg),
        remat_keeps: crate::step::remat_keeps(&cfg),
        mesh: mesh.to_string(),
        mesh_devices: mesh.device_count(),
        mesh_rules,
        shard_optimizer: mesh.shard_optimizer(),
        seq_global,
        programs: Vec::new(),
        notes: Vec::new(),
    };
    if !args.json {
        print_header(&report);
    }
    let dump = match &args.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating --out directory {}", dir.display()))?;
            Some(Dump {
                dir,
                formats: &[Format::Text],
            })
        }
        None => None,
    };

    // What a --base-report is checked against (the closure below holds `report`).
    let header = report.clone();
    let mut add = |p: ProgramReport| {
        if !args.json {
            print_program(&p, report.device_memory_bytes);
        }
        report.programs.push(p);
    };
    let train = Module::trace(0, "train_step", || {
        crate::step::build_train_step(&cfg, target.pjrt_platform(), &mesh)
            .context("tracing the train step")
    })?;
    let tokens = cfg.train.batch * cfg.model.seq_len;
    // SPMD over the first N devices of the topology, partition p on device p.
    let options = if mesh.device_count() > 1 {
        pjrt::CompileOptions {
            device_assignment: Some(vec![topo
                .devices()
                .iter()
                .take(mesh.device_count())
                .map(|d| d.id as i64)
                .collect()]),
            ..pjrt::CompileOptions::spmd(mesh.device_count())
        }
    } else {
        pjrt::CompileOptions::default()
    };
    let mut train_report = match &args.base_report {
        Some(path) => base_report(path, &header, &train)?,
        None => compile_program(
            &topo,
            target,
            &train,
            tokens,
            mesh.device_count(),
            &options,
            dump.as_ref(),
        )?,
    };
    drop(train);
    // A scanned step: the cost analysis counts one trip of the layer loop; a second compile
    // with more periods per trip separates the loop's cost from the rest.
    let periods = model
        .scan_period()
        .map_or(0, |p| cfg.model.layers / p.max(1));
    let u0 = cfg.model.scan_unroll;
    let second = scan_estimate::second_unroll(periods, u0);
    let trips = periods / u0.max(1);
    if let (Some(c), true) = (&mut train_report.cost, trips > 1) {
        c.note = Some(format!(
            "model.scan_layers: XLA's cost analysis counts the layer loop's body once, so FLOPs \
             and optimal seconds here cover {u0} of the {periods} periods plus the rest, not the \
             step; no tokens/s from them ({})",
            match second {
                _ if args.no_scan_estimate => "--no-scan-estimate: no estimate".to_string(),
                Some(u1) =>
                    format!("scan_estimate: from a second compile with {u1} periods per trip"),
                None => format!(
                    "no estimate: {trips} trips is prime, so no second program with more periods \
                     per trip and at least 2 trips exists; set model.scan_unroll or compile with \
                     model.scan_layers = false"
                ),
            }
        ));
        c.tokens_per_second = None;
        c.tokens_per_second_per_chip = None;
        if let (false, Some(u1)) = (args.no_scan_estimate, second) {
            let mut cfg2 = cfg.clone();
            cfg2.model.scan_unroll = u1;
            let module = Module::trace(0, "train_step", || {
                crate::step::build_train_step(&cfg2, target.pjrt_platform(), &mesh)
                    .context("tracing the train step with model.scan_unroll for the estimate")
            })?;
            let r2 = compile_program(
                &topo,
                target,
                &module,
                tokens,
                mesh.device_count(),
                &options,
                None,
            )?;
            train_report.scan_estimate = Some(ScanEstimate::new(
                periods,
                (u0, u1),
                &train_report,
                &r2,
                tokens,
                mesh.device_count(),
            ));
        }
    }
    add(train_report);
    if args.decode {
        // One new token per sequence against caches sized for `seq_len` tokens.
        let decode = Module::trace(1, "decode_step", || {
            model
                .decode_step(cfg.train.batch, cfg.model.seq_len)
                .context("tracing the decode step")
        })?;
        add(compile_program(
            &topo,
            target,
            &decode,
            cfg.train.batch,
            1,
            &pjrt::CompileOptions::default(),
            dump.as_ref(),
        )?);
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

/// Mesh axes as `[fsdp, seq]`.
fn axes_list(axes: &[model::MeshAxis]) -> String {
    let names: Vec<&str> = axes.iter().map(|a| a.name()).collect();
    format!("[{}]", names.join(", "))
}

/// The train step's report from an earlier `rattn compile --json` output at `path`, checked
/// against this run: the same target, batch, sequence length, mesh and rules (a report from
/// before `mesh_rules` / `seq_global` existed counts as the defaults), and a traced program of
/// the same size in bytes (`hlo_bytes`), so that the program compiled then is this one.
fn base_report(path: &Path, now: &Report, train: &Module) -> Result<ProgramReport> {
    let what = || format!("--base-report {}", path.display());
    let text = std::fs::read_to_string(path).with_context(what)?;
    let v: Value = serde_json::from_str(&text).with_context(what)?;
    if let Some(why) = header_differs(&v, now) {
        bail!("{}: {why}; compile without --base-report", what());
    }
    let p: ProgramReport = serde_json::from_value(v["programs"][0].clone())
        .with_context(|| format!("{}: reading programs[0]", what()))?;
    let bytes = train.comp.to_bytes().len();
    if p.name != "train_step" || p.hlo_bytes != bytes {
        bail!(
            "{}: its {} had {} bytes of HLO, the train step traced now has {bytes}: not the same \
             program; compile without --base-report",
            what(),
            p.name,
            p.hlo_bytes
        );
    }
    Ok(ProgramReport {
        trace_seconds: train.trace_seconds,
        ..p
    })
}

/// Where the report `v` (an earlier `--json` output) was made for another target, batch, T, mesh,
/// mesh rules, global-layer scheme or model than `now`: `"KEY is X there but Y here"`. A report
/// from before `mesh_rules` and `seq_global` existed counts as the defaults (no rules changed,
/// no seq scheme).
fn header_differs(v: &Value, now: &Report) -> Option<String> {
    let want = [
        ("target", Value::from(now.target.clone())),
        ("batch", Value::from(now.batch)),
        ("seq_len", Value::from(now.seq_len)),
        ("mesh", Value::from(now.mesh.clone())),
        ("mesh_rules", Value::from(now.mesh_rules.clone())),
        ("seq_global", Value::from(now.seq_global.clone())),
        ("param_count", Value::from(now.param_count)),
    ];
    want.into_iter().find_map(|(key, value)| {
        let absent = match key {
            "mesh_rules" => Value::Array(Vec::new()),
            _ => Value::Null,
        };
        let there = v.get(key).cloned().unwrap_or(absent);
        (there != value).then(|| format!("{key} is {there} there but {value} here"))
    })
}

/// Compiles `module` for the topology and reports its memory, whether it fits, the TPU cost
/// analysis of `tokens` tokens per step, and the optimized HLO written to `dump`.
fn compile_program(
    topo: &Topology,
    target: &Target,
    module: &Module,
    tokens: usize,
    devices: usize,
    options: &pjrt::CompileOptions,
    dump: Option<&Dump<'_>>,
) -> Result<ProgramReport> {
    let name = &module.name;
    let compilation = module.compile_with(Compiler::Topology(topo), options);
    let mut p = ProgramReport {
        name: name.clone(),
        trace_seconds: module.trace_seconds,
        hlo_bytes: compilation.hlo_bytes,
        compile_seconds: compilation.seconds,
        memory: None,
        fits: false,
        verdict: String::new(),
        cost: None,
        optimized_hlo: None,
        mosaic_kernels: None,
        scan_estimate: None,
    };
    let compiled = match compilation.result {
        Ok(compiled) => compiled,
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
    let Some(exe) = compiled.unloaded() else {
        bail!("{name} was not compiled for a topology");
    };
    let memory = compiled.memory()?;
    p.memory = Some(memory);
    match exe.check_fits_in_device_memory() {
        Ok(headroom) => {
            p.fits = true;
            p.verdict = format!("fits, {} free", units::bytes(headroom));
        }
        Err(pjrt::Error::Pjrt {
            code: ErrorCode::ResourceExhausted,
            ..
        }) => {
            p.verdict = format!(
                "does not fit: needs {} per device, a {} has {}",
                units::bytes(memory.peak_bytes),
                topo.devices()
                    .first()
                    .map(|d| d.kind.as_str())
                    .unwrap_or("device"),
                units::bytes(topo.device_memory_bytes().unwrap_or(0))
            );
        }
        Err(e) => return Err(e.into()),
    }
    if topo.kind() == TopologyKind::Tpu {
        let c = exe.cost_analysis()?;
        // libtpu's cost model can return a negative bound (v5e:8x8 gave -19.0): no estimate.
        let opt = c.optimal_seconds().filter(|&s| s >= 0.0);
        p.cost = Some(CostReport {
            flops: c.flops(),
            bytes_accessed: c.bytes_accessed(),
            transcendentals: c.transcendentals(),
            optimal_seconds: opt,
            tokens_per_second: opt.filter(|&s| s > 0.0).map(|s| tokens as f64 / s),
            tokens_per_second_per_chip: opt
                .filter(|&s| s > 0.0)
                .map(|s| tokens as f64 / s / devices as f64),
            properties: c
                .properties
                .iter()
                .filter(|(k, _)| !k.starts_with("utilization"))
                .cloned()
                .collect(),
            note: None,
        });
    }
    if topo.kind() == TopologyKind::Tpu {
        let vmem = pallas_port::lang::mosaic::compiled_vmem(&exe.optimized_program()?);
        if let (Some(&min), Some(&max)) = (vmem.iter().min(), vmem.iter().max()) {
            p.mosaic_kernels = Some(KernelVmemReport {
                calls: vmem.len(),
                min_vmem_bytes: min,
                max_vmem_bytes: max,
            });
        }
    }
    if let Some(dump) = dump {
        let files = dump.after(module, target.platform(), &compiled)?;
        p.optimized_hlo = files.into_iter().next();
    }
    Ok(p)
}

fn print_header(r: &Report) {
    println!(
        "target {}: {} × {} ({} per device), {}",
        r.target,
        r.topology_devices,
        r.device_kind,
        units::bytes(r.device_memory_bytes),
        r.platform_version.lines().next().unwrap_or("")
    );
    println!(
        "model: {} parameters ({} as f32 params + Adam m, v), batch {} × {} tokens, RLA lowering {}, \
         remat {} (keeps {}); {}",
        r.param_count,
        units::bytes(r.param_and_adam_bytes as i64),
        r.batch,
        r.seq_len,
        r.rla_lowering,
        r.remat,
        r.remat_keeps,
        if r.mesh_devices == 1 {
            "compiled for one device (num_partitions 1)".to_string()
        } else {
            format!("train step sharded over the mesh {} (GSPMD, num_partitions {})", r.mesh, r.mesh_devices)
        }
    );
    if !r.mesh_rules.is_empty() {
        println!("mesh rules: {}", r.mesh_rules.join(", "));
    }
    if r.shard_optimizer {
        println!(
            "optimizer state: ZeRO-1 (mesh.shard_optimizer): Adam moments cut over the mesh axes \
             each parameter is replicated over"
        );
    }
    if let Some(note) = &r.seq_global {
        println!("{note}");
    }
}

fn print_program(p: &ProgramReport, limit: i64) {
    println!(
        "{}: traced in {:.2} s ({} HLO), compiled in {:.1} s",
        p.name,
        p.trace_seconds,
        units::bytes(p.hlo_bytes as i64),
        p.compile_seconds
    );
    if let Some(m) = &p.memory {
        println!(
            "  memory per device: arguments {}, outputs {} (aliased {}), temporaries {}, code {}, peak {} of {}",
            units::bytes(m.argument_bytes),
            units::bytes(m.output_bytes),
            units::bytes(m.alias_bytes),
            units::bytes(m.temp_bytes),
            units::bytes(m.generated_code_bytes),
            units::bytes(m.peak_bytes),
            units::bytes(limit)
        );
    }
    println!("  {}", p.verdict);
    if let Some(c) = &p.cost {
        println!(
            "  cost: {} FLOPs, {} bytes accessed, optimal {}, {}",
            units::scientific(c.flops),
            units::scientific(c.bytes_accessed),
            c.optimal_seconds
                .map_or("time: no estimate".into(), |s| format!("{s:.4} s")),
            match (c.tokens_per_second, c.tokens_per_second_per_chip) {
                (Some(t), Some(pc)) if (t - pc).abs() > 1e-9 * t => {
                    format!("{t:.0} tokens/s ({pc:.0} per chip)")
                }
                (Some(t), _) => format!("{t:.0} tokens/s"),
                _ => "no tokens/s estimate".into(),
            }
        );
        if let Some(n) = &c.note {
            println!("  note: {n}");
        }
    }
    if let Some(e) = &p.scan_estimate {
        match &e.cost {
            Some(c) => println!(
                "  scan estimate (all {} periods): {} FLOPs, {} bytes accessed, optimal {}, {} \
                 (second compile with {} periods per trip: {:.1} s)",
                e.periods,
                units::scientific(c.flops),
                units::scientific(c.bytes_accessed),
                c.optimal_seconds
                    .map_or("time: no estimate".into(), |s| format!("{s:.4} s")),
                match (e.tokens_per_second, e.tokens_per_second_per_chip) {
                    (Some(t), Some(pc)) => format!("{t:.0} tokens/s ({pc:.0} per chip)"),
                    _ => "no tokens/s estimate".into(),
                },
                e.second_unroll,
                e.second_compile_seconds
            ),
            None => println!("  scan estimate: none ({})", e.method),
        }
    }
    if let Some(k) = &p.mosaic_kernels {
        println!(
            "  Mosaic kernels: {} tpu_custom_calls, VMEM {} to {} per kernel (libtpu's figure)",
            k.calls,
            units::bytes(k.min_vmem_bytes as i64),
            units::bytes(k.max_vmem_bytes as i64)
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
        // Names are checked without any plugin: the bad part is named.
        let e = Target::parse("tpu:v9:2x2").unwrap_err().to_string();
        assert!(
            e.contains("unknown TPU generation \"v9\"") && e.contains("v5p"),
            "{e}"
        );
        let e = Target::parse("gpu:h200").unwrap_err().to_string();
        assert!(
            e.contains("unknown GPU \"h200\"") && e.contains("h100, a100"),
            "{e}"
        );
        let e = Target::parse("gpu:h100:1x8").unwrap_err().to_string();
        assert!(e.contains("GPU topology shape \"1x8\""), "{e}");
    }

    fn report(mesh_rules: Vec<String>, seq_global: Option<String>) -> Report {
        Report {
            target: "tpu:v5p:2x2x1".into(),
            platform: "tpu".into(),
            device_kind: "TPU v5".into(),
            topology_devices: 4,
            device_memory_bytes: 1,
            platform_version: String::new(),
            param_count: 10,
            param_and_adam_bytes: 120,
            batch: 4,
            seq_len: 64,
            rla_lowering: "mosaic".into(),
            remat: "none".into(),
            remat_keeps: String::new(),
            mesh: "4 devices = data 1 × fsdp 2 × seq 2 × tensor 1".into(),
            mesh_devices: 4,
            mesh_rules,
            shard_optimizer: false,
            seq_global,
            programs: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn a_base_report_must_have_the_same_rules_and_seq_scheme() {
        let rules = vec!["embed → [fsdp, seq] (default [fsdp])".to_string()];
        let zigzag = Some("global layers: zigzag (mesh.seq_global = auto; …)".to_string());
        let now = report(rules.clone(), zigzag.clone());
        let same = serde_json::to_value(&now).unwrap();
        assert_eq!(header_differs(&same, &now), None);
        // Other rules, or the default ones: refused, naming the key.
        let other = serde_json::to_value(report(Vec::new(), zigzag.clone())).unwrap();
        let why = header_differs(&other, &now).unwrap();
        assert!(why.starts_with("mesh_rules is [] there"), "{why}");
        let dense = Some("global layers: dense (mesh.seq_global = dense; …)".to_string());
        let other = serde_json::to_value(report(rules, dense)).unwrap();
        let why = header_differs(&other, &now).unwrap();
        assert!(
            why.starts_with("seq_global is \"global layers: dense"),
            "{why}"
        );
        // A report from before the two keys existed is the defaults: it matches a run with
        // default rules and no seq scheme, not this one.
        let mut old = serde_json::to_value(report(Vec::new(), None)).unwrap();
        let o = old.as_object_mut().unwrap();
        o.remove("mesh_rules");
        o.remove("seq_global");
        assert_eq!(header_differs(&old, &report(Vec::new(), None)), None);
        assert!(header_differs(&old, &now).is_some());
        // Another batch: named.
        let mut b = same.clone();
        b["batch"] = 8.into();
        assert_eq!(
            header_differs(&b, &now).unwrap(),
            "batch is 8 there but 4 here"
        );
    }

    /// A child that dies the way a plugin CHECK failure kills the compile child.
    fn aborting_child() -> ChildError {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            "ulimit -c 0; echo 'F0000 check failed: shape' >&2; kill -ABRT $$",
        ]);
        supervise::run::<()>(sh).unwrap_err()
    }

    #[test]
    fn a_plugin_crash_in_the_child_becomes_an_error() {
        // A child that dies by a signal must give an error naming the signal, the target and
        // the plugin's last log lines, not kill the command.
        let e = child_error("tpu:v6e:1x1", aborting_child()).to_string();
        for needle in [
            "TPU (libtpu) plugin",
            "SIGABRT",
            "tpu:v6e:1x1",
            "child process",
            "F0000 check failed: shape",
        ] {
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
        let e = child_error("gpu:h100", aborting_child()).to_string();
        assert!(e.contains("CUDA plugin was killed by SIGABRT (6)"), "{e}");
        // The child's own error passes through as it is.
        let e = child_error(
            "gpu:h100",
            ChildError::Failed("train_step: does not fit".into()),
        );
        assert_eq!(e.to_string(), "train_step: does not fit");
    }
}
