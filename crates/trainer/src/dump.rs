//! `rattn dump`: the train step (and the decode step, where the model has one) as HLO before and
//! after XLA's optimizations, named like XLA's `--xla_dump_to`, plus a summary of the model's size,
//! FLOPs, compiled memory, KV-cache / RLA-state bytes against the SWA and full-attention baselines,
//! and the `[mesh]`: its sizes, rules and the train state's bytes per device under it (computed
//! from the parameters' shardings; the modules are compiled for one device, `rattn train` runs
//! sharded).
//!
//! Tracing, compiling on the `--plugin` client and writing the modules go through
//! [`crate::inspect`], the path `rattn compile` takes too; the numbers of the model come from
//! [`Model::costs`].

use crate::config::RunConfig;
use crate::inspect::{units, Compiler, Dump, Format, MemoryReport, Module};
use crate::{runtime, step};
use anyhow::{Context, Result};
use model::config::Dtype;
use model::{CacheBytes, Costs, Flops, MeshAxis, Model};
use pjrt::Client;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What `rattn dump` was asked to do.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// Output directory (created).
    pub out: PathBuf,
    /// Context length of the cache numbers (default: the config's `seq_len`).
    pub context: Option<usize>,
    /// Compile the modules (after-optimization files and memory stats); off for models too big
    /// to compile usefully on the host.
    pub compile: bool,
    /// `--plugin` of the compile.
    pub plugin: Option<String>,
    /// Devices the `[mesh]` spans (default: the product of its sizes; needed when one is -1).
    pub devices: Option<usize>,
}

/// One module's files and compiled statistics.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleDump {
    /// `train_step` or `decode_step`.
    pub name: String,
    /// Instructions of the entry computation as we built it.
    pub instructions: usize,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Compiled memory per device, or why there is none.
    pub memory: Result<MemoryReport, String>,
}

/// Cache numbers of one model against its baselines.
#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    /// Context length.
    pub context: usize,
    /// This config ([`Model::cache_bytes`]: a local layer keeps the last W tokens, the paper's
    /// convention; our decode ring buffer holds W+1, one more token per layer).
    pub model: CacheBytes,
    /// Same window, local layers without RLA.
    pub swa: CacheBytes,
    /// Every layer global.
    pub full: CacheBytes,
    /// `1 − kv/kv_swa` in %.
    pub kv_saving_vs_swa_pct: f64,
    /// `1 − kv/kv_full` in %.
    pub kv_saving_vs_full_pct: f64,
    /// `1 − (kv + rla_state)/kv_full` in %.
    pub total_saving_vs_full_pct: f64,
    /// The decode step's own allocation (`CacheLayout::allocated_bytes`: ring buffers of W+1,
    /// all f32).
    pub decode_allocation: Option<CacheBytes>,
}

/// The mesh and the train state's size per device under it.
#[derive(Debug, Clone, Serialize)]
pub struct MeshReport {
    /// Devices.
    pub devices: usize,
    /// Size of each mesh axis.
    pub sizes: BTreeMap<&'static str, usize>,
    /// The logical-axis rules: logical axis → mesh axes.
    pub rules: BTreeMap<&'static str, Vec<&'static str>>,
    /// Parameter bytes of the whole model (f32).
    pub param_bytes: u64,
    /// Parameter bytes on each device.
    pub param_bytes_per_device: u64,
    /// Both Adam moments' bytes on each device (sharded like their parameters).
    pub adam_bytes_per_device: u64,
    /// `text` of the mesh, e.g. `8 devices = data 1 × fsdp 8 × seq 1 × tensor 1`.
    pub text: String,
}

/// The `[mesh]` of `cfg` on `devices` devices (default: the product of its sizes) and the train
/// state's bytes per device: the first errors (mesh, rules, a parameter's dims) end here.
pub fn mesh_report(cfg: &RunConfig, model: &Model, devices: Option<usize>) -> Result<MeshReport> {
    let devices = match (devices, cfg.mesh.fixed_device_count()?) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => anyhow::bail!(
            "one [mesh] size is -1 (the rest of the devices): pass --devices N to say how many"
        ),
    };
    let mesh = cfg.mesh.resolve(devices)?;
    let state = step::state_shardings(model, &mesh)?;
    let f32_bytes = |n: usize| 4 * n as u64;
    let n = model.param_specs().len();
    let (params, adam) = state.split_at(n);
    Ok(MeshReport {
        devices,
        sizes: MeshAxis::ALL
            .into_iter()
            .map(|a| (a.name(), mesh.size(a)))
            .collect(),
        rules: mesh
            .rules()
            .iter()
            .map(|(l, m)| (l.name(), m.iter().map(|a| a.name()).collect()))
            .collect(),
        param_bytes: f32_bytes(model.param_count()),
        param_bytes_per_device: params.iter().map(|p| f32_bytes(p.shard_numel())).sum(),
        adam_bytes_per_device: adam.iter().map(|p| f32_bytes(p.shard_numel())).sum(),
        text: mesh.to_string(),
    })
}

/// Everything `rattn dump` reports (also written as `summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Parameter count.
    pub parameters: u64,
    /// Parameters entering matmuls.
    pub matmul_parameters: u64,
    /// Training FLOPs per token.
    pub flops_per_token: Flops,
    /// Tokens per train step (batch × seq_len).
    pub tokens_per_step: u64,
    /// Modules written.
    pub modules: Vec<ModuleDump>,
    /// Cache sizes per sequence.
    pub cache: CacheReport,
    /// The platform compiled for (None with `--no-compile`).
    pub platform: Option<String>,
    /// The mesh and the state's bytes per device.
    pub mesh: MeshReport,
    /// The train step's rematerialization policy (`[train] remat`).
    pub remat: String,
    /// What that policy keeps for the backward pass, in words.
    pub remat_keeps: String,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * (1.0 - part as f64 / whole as f64)
    }
}

/// Cache numbers of a model against its baselines, from [`Model::costs`].
pub fn cache_report(costs: &Costs) -> CacheReport {
    let (model, swa, full) = (costs.model.cache, costs.swa.cache, costs.full.cache);
    CacheReport {
        context: costs.model.context,
        model,
        swa,
        full,
        kv_saving_vs_swa_pct: pct(model.kv, swa.kv),
        kv_saving_vs_full_pct: pct(model.kv, full.kv),
        total_saving_vs_full_pct: pct(model.total(), full.kv),
        decode_allocation: Some(costs.model.cache_allocated),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Both stages of a module in both formats.
const FORMATS: &[Format] = &[Format::Text, Format::Proto];

/// Write one module's files; compile it when `client` is given (with its lower-case platform).
fn dump_module(out: &Path, module: &Module, client: Option<(&Client, &str)>) -> Result<ModuleDump> {
    let dump = Dump {
        dir: out,
        formats: FORMATS,
    };
    let mut files = dump.before(module)?;
    let memory = match client {
        None => Err("not compiled (--no-compile)".to_string()),
        Some((client, platform)) => {
            let compiled = module
                .compile(Compiler::Client(client))
                .result
                .with_context(|| format!("compiling {}", module.comp.name()))?;
            files.extend(dump.after(module, platform, &compiled)?);
            compiled.memory().map_err(|e| format!("unavailable: {e}"))
        }
    };
    Ok(ModuleDump {
        name: module.name.clone(),
        instructions: module.instructions(),
        files,
        memory,
    })
}

/// Write the dump of `cfg` into `opts.out`; returns the summary (also in `summary.txt` and
/// `summary.json`).
pub fn dump(cfg: &RunConfig, opts: &DumpOptions) -> Result<(Summary, String)> {
    let model = Model::new(cfg.model.clone())?;
    let m = model.config();
    let context = opts.context.unwrap_or(m.seq_len);
    if context == 0 {
        anyhow::bail!("--context must be > 0");
    }
    let mesh = mesh_report(cfg, &model, opts.devices)?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create dump dir {}", opts.out.display()))?;
    let client = if opts.compile {
        Some(runtime::open_client(opts.plugin.as_deref())?)
    } else {
        None
    };
    let platform = match &client {
        Some(c) => Some(c.platform_name()?.to_lowercase()),
        None => None,
    };
    let compile_on = client.as_ref().zip(platform.as_deref());
    // Without a client (`--no-compile`) the graph targets no platform: RLA `auto` lowers to HLO.
    let train = Module::trace(0, "train_step", || {
        step::build_train_step(
            cfg,
            platform.as_deref().unwrap_or(""),
            &model::Mesh::single(),
        )
        .context("building the train step")
    })?;
    let mut modules = vec![dump_module(&opts.out, &train, compile_on)?];
    drop(train);
    // The decode step at batch 1 with a cache of `context` tokens.
    let decode = Module::trace(1, "decode_step", || {
        model
            .decode_step(1, context)
            .context("building the decode step")
    })?;
    modules.push(dump_module(&opts.out, &decode, compile_on)?);
    drop(decode);
    let costs = model.costs(context);
    let summary = Summary {
        parameters: costs.model.parameters,
        matmul_parameters: costs.model.matmul_parameters,
        flops_per_token: costs.model.flops_per_token,
        tokens_per_step: (cfg.train.batch * m.seq_len) as u64,
        modules,
        cache: cache_report(&costs),
        platform,
        mesh,
        remat: cfg.train.remat.to_string(),
        remat_keeps: cfg.train.remat.describe().into(),
    };
    let text = render(cfg, &summary);
    write(&opts.out.join("summary.txt"), text.as_bytes())?;
    let json = serde_json::to_string_pretty(&summary)?;
    write(&opts.out.join("summary.json"), json.as_bytes())?;
    Ok((summary, text))
}

/// The human-readable summary.
fn render(cfg: &RunConfig, s: &Summary) -> String {
    let m = &cfg.model;
    let mut o = String::new();
    let f = &s.flops_per_token;
    let _ = writeln!(o, "model: {m}");
    let _ = writeln!(
        o,
        "parameters: {} ({}); in matmuls: {}",
        s.parameters,
        units::si(s.parameters as f64, ""),
        s.matmul_parameters
    );
    let _ = writeln!(
        o,
        "train FLOPs per token at seq_len {}: {} = dense {} (6·matmul params) + attention {} \
         (12·heads·head_dim·k per layer, k = seq_len global / min(W, seq_len) local, no causal halving) \
         + RLA {} (chunked kernels fwd+bwd, recompute included)",
        m.seq_len,
        units::si(f.total(), "FLOP"),
        units::si(f.dense, "FLOP"),
        units::si(f.attention, "FLOP"),
        units::si(f.rla, "FLOP"),
    );
    let _ = writeln!(
        o,
        "train FLOPs per step ({} tokens): {}",
        s.tokens_per_step,
        units::si(f.total() * s.tokens_per_step as f64, "FLOP")
    );
    for md in &s.modules {
        let _ = writeln!(o, "{}: {} entry instructions", md.name, md.instructions);
        if md.name == "train_step" {
            let _ = writeln!(
                o,
                "  remat: {} (the backward pass keeps {})",
                s.remat, s.remat_keeps
            );
        }
        match &md.memory {
            Ok(ms) => {
                let _ = writeln!(
                    o,
                    "  compiled memory: arguments {}, outputs {}, aliased {}, temp {}, code {}, peak {}",
                    units::bytes_exact(ms.argument_bytes as u64),
                    units::bytes_exact(ms.output_bytes as u64),
                    units::bytes_exact(ms.alias_bytes as u64),
                    units::bytes_exact(ms.temp_bytes as u64),
                    units::bytes_exact(ms.generated_code_bytes as u64),
                    units::bytes_exact(ms.peak_bytes as u64),
                );
            }
            Err(why) => {
                let _ = writeln!(o, "  compiled memory: {why}");
            }
        }
        for p in &md.files {
            let _ = writeln!(o, "  wrote {}", p.display());
        }
    }
    let c = &s.cache;
    let _ = writeln!(
        o,
        "decode cache per sequence at context {} (local layers keep min(W, context) = {} tokens, \
         global layers the context; {} KV):",
        c.context,
        m.window.min(c.context),
        match m.dtype {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    );
    let _ = writeln!(
        o,
        "  this model:     KV {}, RLA state {} (f32)",
        units::bytes_exact(c.model.kv),
        units::bytes_exact(c.model.rla_state)
    );
    let _ = writeln!(o, "  SWA baseline:   KV {}", units::bytes_exact(c.swa.kv));
    let _ = writeln!(o, "  full attention: KV {}", units::bytes_exact(c.full.kv));
    let _ = writeln!(
        o,
        "  KV saving vs SWA: {:.2} % (KV + RLA state vs SWA's KV: {:+.2} %)",
        c.kv_saving_vs_swa_pct,
        -pct(c.model.total(), c.swa.kv)
    );
    let _ = writeln!(
        o,
        "  KV saving vs full attention: {:.2} %",
        c.kv_saving_vs_full_pct
    );
    let _ = writeln!(
        o,
        "  KV + RLA state saving vs full attention: {:.2} %",
        c.total_saving_vs_full_pct
    );
    if let Some(d) = &c.decode_allocation {
        let _ = writeln!(
            o,
            "  decode step's allocation (ring buffers of W+1): KV {}, RLA state {}",
            units::bytes_exact(d.kv),
            units::bytes_exact(d.rla_state)
        );
    }
    let mr = &s.mesh;
    let _ = writeln!(
        o,
        "mesh: {} (device order data, fsdp, seq, tensor; `rattn train` runs on it, dump compiles for 1 device)",
        mr.text
    );
    let rules: Vec<String> = mr
        .rules
        .iter()
        .map(|(logical, axes)| format!("{logical} → [{}]", axes.join(", ")))
        .collect();
    let _ = writeln!(o, "  rules: {}", rules.join(", "));
    let _ = writeln!(
        o,
        "  train state per device (f32): parameters {} of {}, Adam moments {}, total {}",
        units::bytes_exact(mr.param_bytes_per_device),
        units::bytes_exact(mr.param_bytes),
        units::bytes_exact(mr.adam_bytes_per_device),
        units::bytes_exact(mr.param_bytes_per_device + mr.adam_bytes_per_device),
    );
    o
}

/// `rattn dump` arguments.
#[derive(clap::Args)]
pub(crate) struct DumpArgs {
    #[command(flatten)]
    pub(crate) common: crate::Common,
    /// Output directory (files named like XLA's --xla_dump_to).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Context length of the KV-cache / RLA-state numbers (default: model.seq_len).
    #[arg(long)]
    pub(crate) context: Option<usize>,
    /// Do not compile: write only the before-optimization modules and the summary (for models
    /// too big to compile usefully on the host, e.g. configs/12b.toml).
    #[arg(long)]
    pub(crate) no_compile: bool,
    /// Devices the [mesh] spans, for its per-device sizes (default: the product of the mesh
    /// sizes; required when one is -1).
    #[arg(long)]
    pub(crate) devices: Option<usize>,
}

/// Run `rattn dump`: write the files and print the summary.
pub(crate) fn run(args: &DumpArgs) -> Result<()> {
    let cfg = RunConfig::load(&args.common.config, &args.common.overrides)?;
    let (_, text) = dump(
        &cfg,
        &DumpOptions {
            out: args.out.clone(),
            context: args.context,
            compile: !args.no_compile,
            plugin: args.common.plugin.clone(),
            devices: args.devices,
        },
    )?;
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg12b(window: usize) -> Model {
        let mut c = RunConfig::load(
            Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../configs/12b.toml"
            )),
            &[format!("model.window={window}")],
        )
        .unwrap()
        .model;
        c.window = window;
        Model::new(c).unwrap()
    }

    #[test]
    fn kv_savings_of_the_12b_config_at_4k() {
        // 40 layers, 3:1 → 30 local + 10 global; full attention keeps 40 × 4096 tokens.
        for (w, want) in [(1024, 56.25), (512, 65.625)] {
            let r = cache_report(&cfg12b(w).costs(4096));
            assert!(
                (r.kv_saving_vs_full_pct - want).abs() < 1e-9,
                "W={w}: {r:?}"
            );
            // bf16 K and V, 8 kv heads × 128: 4096 B per token per layer.
            assert_eq!(r.full.kv, 40 * 4096 * 4096);
            assert_eq!(r.model.kv, (30 * w as u64 + 10 * 4096) * 4096);
            assert_eq!(r.swa.kv, r.model.kv);
            assert_eq!(r.model.rla_state, 30 * 8 * 256 * 128 * 4);
            assert_eq!(r.swa.rla_state, 0);
        }
    }

    #[test]
    fn dense_flops_exclude_the_untied_input_embedding_only() {
        let m = cfg12b(512);
        let all = m.param_count() as u64;
        let norms: u64 = m
            .param_specs()
            .iter()
            .filter(|s| s.shape.len() < 2 || s.name.ends_with(".scale"))
            .map(|s| s.numel() as u64)
            .sum();
        assert_eq!(m.matmul_params(), all - norms - 32768 * 5120);
    }
}
