//! `rattn`: train, evaluate, generate, dump, and manage PJRT plugins.

#![forbid(unsafe_code)]

mod bench_rla;
mod checkpoint;
mod compile;
mod data;
mod distributed;
mod dump;
mod generate;
mod inspect;
mod mfu;
mod plot;
mod profile;
mod runtime;
mod spmd;
mod supervise;
mod sweep;
mod train;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use trainer::{config, step};

/// jemalloc is the process's C allocator, the plugins' included (`pjrt::host_memory`).
#[cfg(all(feature = "jemalloc", target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Held-out sequences of `rattn eval` and of the evaluation that ends `rattn train`.
const EVAL_SEQUENCES: usize = 64;

#[derive(Parser)]
#[command(
    name = "rattn",
    version,
    about = "RAttention models traced to XLA HLO and run through PJRT plugins"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Run configuration (TOML with `[model]`, `[train]`, `[data]`, `[mesh]`).
    #[arg(long, default_value = "configs/tiny.toml")]
    config: PathBuf,
    /// Override a config value, e.g. `--set train.steps=50 --set model.window=16`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// PJRT plugin: cpu (default), cuda, tpu, or a path to a plugin .so.
    #[arg(long)]
    plugin: Option<String>,
}

/// Multi-host runs (the settings of `jax.distributed.initialize`); flags override the
/// `RATTN_*` environment variables named.
#[derive(clap::Args, Clone)]
struct DistArgs {
    /// host:port where process 0 serves the coordinator [env: RATTN_COORDINATOR_ADDRESS].
    #[arg(long)]
    coordinator_address: Option<String>,
    /// Number of processes (one per host) [env: RATTN_NUM_PROCESSES].
    #[arg(long)]
    num_processes: Option<usize>,
    /// This process's index, 0..num_processes [env: RATTN_PROCESS_ID].
    #[arg(long)]
    process_id: Option<usize>,
    /// Seconds to wait for the coordinator and the other processes (default 300)
    /// [env: RATTN_DISTRIBUTED_TIMEOUT].
    #[arg(long)]
    distributed_timeout: Option<f64>,
}

impl DistArgs {
    /// Join the multi-process run these settings describe, if any (before any client exists).
    fn initialize(&self) -> Result<()> {
        let cfg = distributed::DistributedConfig::from_flags_and_env(
            self.coordinator_address.clone(),
            self.num_processes,
            self.process_id,
            self.distributed_timeout,
        )?;
        if let Some(cfg) = cfg {
            // Said before the wait, which lasts until every process arrives (up to the timeout).
            eprintln!(
                "process {} of {}: joining the coordinator {}, waiting up to {:.0} s for every \
                 process (--distributed-timeout)",
                cfg.process_id,
                cfg.num_processes,
                cfg.coordinator_address,
                cfg.timeout.as_secs_f64()
            );
            let d = distributed::initialize(&cfg)?;
            eprintln!(
                "process {} of {}: every process arrived at the coordinator {}",
                d.process_id, d.num_processes, d.coordinator_address
            );
        }
        Ok(())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model (default: the tiny config on the embedded synthetic data).
    Train {
        #[command(flatten)]
        common: Common,
        /// Directory for checkpoints and metrics.
        #[arg(long, default_value = "runs/tiny")]
        out: PathBuf,
        /// Resume from the newest checkpoint in --out.
        #[arg(long)]
        resume: bool,
        /// No progress bar: a line per logged step on stderr instead (also what a stderr that is
        /// not a terminal gets); metrics go to metrics.jsonl either way.
        #[arg(long)]
        quiet: bool,
        /// Held-out sequences of the evaluation that ends the run (0: no evaluation).
        #[arg(long, default_value_t = EVAL_SEQUENCES)]
        eval_sequences: usize,
        /// Devices the `[mesh]` spans (default: the product of its sizes; needed when one is -1).
        /// On the CPU plugin the client is made with this many devices.
        #[arg(long)]
        devices: Option<usize>,
        /// Seed of initialisation and data order (the same as `--set train.seed=N`).
        #[arg(long)]
        seed: Option<u64>,
        #[command(flatten)]
        dist: DistArgs,
        /// Write a trace (trace.json: Perfetto / chrome://tracing) with time per HLO op of the
        /// train step, and a summary of the hot ops, into this directory.
        #[arg(long, value_name = "DIR")]
        profile: Option<PathBuf>,
    },
    /// Evaluate a checkpoint: loss, perplexity and (synthetic data) recall by distance.
    Eval {
        #[command(flatten)]
        common: Common,
        /// Checkpoint file, or a run directory (its newest checkpoint).
        #[arg(long, default_value = "runs/tiny")]
        checkpoint: PathBuf,
        /// Number of held-out sequences (at each length).
        #[arg(long, default_value_t = EVAL_SEQUENCES)]
        sequences: usize,
        /// Sequence lengths to evaluate at, e.g. `--seq-len 512,1024,2048` (default: the
        /// training length). The same parameters run at every length; beyond the training
        /// length T recall gets buckets T..2T, 2T..4T, ….
        #[arg(long, value_delimiter = ',')]
        seq_len: Vec<usize>,
    },
    /// Manage PJRT plugins.
    Plugin {
        #[command(subcommand)]
        cmd: PluginCmd,
    },
    /// Compile the model ahead of time for a TPU topology or a GPU (no device needed): compile
    /// time, per-device memory against the device's limit, and on TPU XLA's cost analysis.
    Compile(compile::CompileArgs),
    /// Write the train (and decode) step as HLO before and after XLA's optimizations, plus a
    /// summary: parameters, FLOPs per token, compiled memory, KV-cache / RLA-state bytes.
    Dump(dump::DumpArgs),
    /// Plot a metric (default loss) of metrics.jsonl files against the step into a PNG.
    Plot(plot::PlotArgs),
    /// The window sweep: windows × {SWA, RAttention} + full attention, all-local and 3:1 stacks,
    /// ablations, several seeds; a table and a PNG of quality against KV-cache bytes.
    Sweep(sweep::SweepArgs),
    /// Generate tokens from a checkpoint: prefill the prompt, then decode with on-device caches
    /// (greedy, or temperature + top-k sampling); prints the tokens and tokens/s.
    Generate(generate::GenerateArgs),
    /// Convert a checkpoint between the scanned and unrolled parameter layouts
    /// (`model.scan_layers`): parameters and both Adam moments, written atomically as one file
    /// or as a sharded checkpoint (the source's mesh, or `--set mesh.*`).
    Convert(checkpoint::layout::ConvertArgs),
    /// Measurements of this machine (`rattn bench peak`: the f32 matmul peak MFU is reported
    /// against; `rattn bench rla`: the RLA blocks per lowering, timed and checked).
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Time the replay modules of `--profile` in a child process (see src/profile.rs).
    #[command(hide = true)]
    ProfileReplay {
        /// Directory of op_NNNN.pb modules.
        dir: PathBuf,
        /// PJRT plugin (a path).
        #[arg(long)]
        plugin: Option<String>,
        /// First module number.
        #[arg(long, default_value_t = 0)]
        start: usize,
    },
    /// Show the plugin, its API version, platform and devices.
    Doctor {
        /// PJRT plugin: cpu (default), cuda, tpu, or a path.
        #[arg(long)]
        plugin: Option<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Measure (once; cached) the f32 matmul FLOP/s XLA reaches here on a large `dot`, all
    /// threads: the peak `rattn train` reports MFU against.
    Peak(mfu::PeakArgs),
    /// Time the RLA blocks (forward, forward+backward) for each lowering on one device of the
    /// plugin, and check their outputs against our CPU kernels run on the host.
    Rla(bench_rla::RlaArgs),
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Download (pip download --no-deps), verify and cache a plugin: cpu, cuda or tpu.
    Install {
        /// cpu, cuda or tpu.
        kind: String,
    },
    /// List installed plugins and their PJRT API versions.
    List,
    /// Load one plugin and print its PJRT API version (`plugin list` runs this in a child
    /// process, so what plugins log while they load stays out of the list).
    #[command(hide = true)]
    Probe {
        /// Plugin library.
        path: PathBuf,
    },
}

fn main() {
    // Before anything else, while this is the only thread: the plugins read their environment
    // when they are loaded, and changing it once threads run is unsound.
    if let Err(e) = runtime::prepare_environment().and_then(|()| run(Cli::parse())) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `PJRT API x.y` of the plugin at `path`, loaded in a child `rattn plugin probe` whose stderr
/// (plugins log while they load, some before their logging is configured) is kept out of the
/// list; `cannot load: …` with the child's last error line when it fails or crashes.
fn probe_plugin(path: &std::path::Path) -> String {
    let out = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .args(["plugin", "probe"])
            .arg(path)
            .output()
    });
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| l.starts_with("error:"))
                .or_else(|| err.lines().last())
                .unwrap_or("no output");
            format!("cannot load ({}): {last}", o.status)
        }
        Err(e) => format!("cannot load: cannot start a child rattn: {e}"),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train {
            common,
            out,
            resume,
            quiet,
            eval_sequences,
            devices,
            seed,
            dist,
            profile,
        } => {
            if let Some(dir) = &profile {
                profile::start(dir)?;
            }
            let mut overrides = common.overrides.clone();
            if seed.is_some()
                && overrides
                    .iter()
                    .any(|o| o.split('=').next().map(str::trim) == Some("train.seed"))
            {
                bail!("--seed and --set train.seed both give the seed: pass one of them");
            }
            overrides.extend(seed.map(|s| format!("train.seed={s}")));
            let cfg = config::RunConfig::load(&common.config, &overrides)?;
            if eval_sequences > 0 && cfg.data.kind != "synthetic" && cfg.data.eval_fraction == 0.0 {
                bail!(
                    "data.eval_fraction is 0: no part of the {} data is held out for the \
                     evaluation that ends the run; set data.eval_fraction > 0 or pass \
                     --eval-sequences 0",
                    cfg.data.kind
                );
            }
            dist.initialize()?;
            let report =
                train::train(&cfg, common.plugin.as_deref(), &out, resume, quiet, devices)?;
            profile::finish()?;
            if let Some(last) = report.losses.last() {
                let n = report.losses.len();
                match report.last_step {
                    s if s == n as u64 => println!("final loss {last:.4} after {n} steps"),
                    s => println!("final loss {last:.4} after {n} steps (at step {s})"),
                }
            }
            if let Some(u) = report.utilization {
                println!(
                    "model FLOPs/token {:.4e}, {:.0} tokens/s, achieved {}",
                    u.flops_per_token,
                    u.tokens_per_s,
                    mfu::format_flops(u.flops_per_s)
                );
                match u.mfu {
                    Some(m) => println!(
                        "MFU {:.1} % of the measured peak {}",
                        100.0 * m,
                        mfu::format_flops(u.flops_per_s / m)
                    ),
                    None => {
                        println!("MFU: run `rattn bench peak` once to measure this machine's peak")
                    }
                }
            }
            if let Some(p) = report.last_checkpoint {
                println!("checkpoint: {}", p.display());
                // The evaluation runs on one device: not in a multi-process run (its client
                // is the run's; evaluate the checkpoint afterwards with `rattn eval`).
                if eval_sequences > 0 && distributed::global().is_none() {
                    train::eval(&cfg, common.plugin.as_deref(), &p, eval_sequences)?;
                }
            }
            Ok(())
        }
        Cmd::Eval {
            common,
            checkpoint,
            sequences,
            seq_len,
        } => {
            if sequences == 0 {
                bail!("--sequences 0: give the number of held-out sequences to evaluate (> 0)");
            }
            let cfg = config::RunConfig::load(&common.config, &common.overrides)?;
            let lengths = if seq_len.is_empty() {
                vec![cfg.model.seq_len]
            } else {
                seq_len
            };
            let p = common.plugin.as_deref();
            train::eval_lengths(&cfg, p, &checkpoint, sequences, &lengths).map(|_| ())
        }
        Cmd::Plugin {
            cmd: PluginCmd::Install { kind },
        } => {
            let Some(k) = pjrt::install::PluginKind::from_name(&kind) else {
                bail!("unknown plugin kind {kind:?}: use cpu, cuda or tpu");
            };
            let cache = runtime::plugin_cache();
            let path = cache.install(k)?;
            println!("{} plugin installed at {}", k.name(), path.display());
            if k == pjrt::install::PluginKind::Cuda {
                // The CUDA plugin compiles only with ptxas and libdevice; it finds these beside it.
                let tools = cache.install_cuda_tools()?;
                println!("ptxas and libdevice installed in {}", tools.display());
            }
            Ok(())
        }
        Cmd::Plugin {
            cmd: PluginCmd::List,
        } => {
            let cache = runtime::plugin_cache();
            println!("plugin cache: {}", cache.dir().display());
            let list = cache.list();
            if list.is_empty() {
                println!("no plugins installed (rattn plugin install cpu)");
            }
            for (kind, path) in list {
                println!(
                    "{:<5} {}  {}",
                    kind.name(),
                    probe_plugin(&path),
                    path.display()
                );
            }
            Ok(())
        }
        Cmd::Plugin {
            cmd: PluginCmd::Probe { path },
        } => {
            let p = pjrt::Plugin::load(&path)?;
            println!("PJRT API {}.{}", p.api_version().0, p.api_version().1);
            Ok(())
        }
        Cmd::Compile(args) => compile::run(&args),
        Cmd::Dump(args) => dump::run(&args),
        Cmd::Plot(args) => plot::run(&args),
        Cmd::Sweep(args) => sweep::run(&args),
        Cmd::Bench {
            cmd: BenchCmd::Peak(args),
        } => mfu::run_peak(&args),
        Cmd::Bench {
            cmd: BenchCmd::Rla(args),
        } => bench_rla::run(&args),
        Cmd::Generate(args) => generate::run(&args),
        Cmd::Convert(args) => checkpoint::layout::run(&args).map(|_| ()),
        Cmd::ProfileReplay { dir, plugin, start } => {
            profile::replay_child(&dir, plugin.as_deref(), start)
        }
        Cmd::Doctor { plugin } => {
            let p = runtime::load_plugin(plugin.as_deref())?;
            let (maj, min) = p.api_version();
            println!("plugin:   {}", p.path().display());
            println!("PJRT API: {maj}.{min}");
            let client = pjrt::Client::new(&p, &[]).map_err(|e| {
                anyhow::anyhow!("{e}{}", runtime::no_device_hint(plugin.as_deref()))
            })?;
            println!(
                "platform: {} ({})",
                client.platform_name()?,
                client.platform_version()?
            );
            for d in client.devices()? {
                println!(
                    "device {}: kind {:?}, process {}, addressable {}",
                    d.id(),
                    d.kind(),
                    d.process_index(),
                    d.is_addressable()
                );
            }
            Ok(())
        }
    }
}
