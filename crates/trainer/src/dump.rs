//! `rattn dump`: the train step (and the decode step, where the model has one) as HLO before and
//! after XLA's optimizations, named like XLA's `--xla_dump_to`, plus a summary of the model's size,
//! FLOPs, compiled memory, KV-cache / RLA-state bytes against the SWA and full-attention baselines,
//! and the `[mesh]`: its sizes, rules and the train state's bytes per device under it (computed
//! from the parameters' shardings). On a mesh of N > 1 devices the train step is traced with its
//! sharding annotations and compiled as `rattn train` compiles it (SPMD over N devices, on a
//! client with N devices: `cpu_device_count = N` on the CPU plugin); its after-optimization files
//! are then one device's partitioned program, and the summary lists the collectives in it. With
//! `--no-compile` the train step is traced for one device. The decode step is compiled for one
//! device.
//!
//! Tracing, compiling on the `--plugin` client and writing the modules go through
//! [`crate::inspect`], the path `rattn compile` takes too; the numbers of the model come from
//! [`Model::costs`].

use crate::config::RunConfig;
use crate::inspect::{units, Compiler, Dump, Format, MemoryReport, Module};
use crate::{spmd, step};
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
    /// Devices the module was compiled for (its partitions; 1 without a mesh).
    pub devices: usize,
    /// Collectives in the optimized program (`all-gather`, `all-reduce`, `reduce-scatter`,
    /// `collective-permute`, `all-to-all`; async `-start` forms counted with their op), by kind;
    /// empty when not compiled or when there are none.
    pub collectives: BTreeMap<String, usize>,
}

/// The collective ops of an HLO text, by kind (an async `-start` counts once, with its op).
pub fn count_collectives(hlo: &str) -> BTreeMap<String, usize> {
    [
        "all-gather",
        "all-reduce",
        "reduce-scatter",
        "collective-permute",
        "all-to-all",
    ]
    .iter()
    .map(|k| {
        let n =
            hlo.matches(&format!(" {k}(")).count() + hlo.matches(&format!(" {k}-start(")).count();
        (k.to_string(), n)
    })
    .filter(|(_, n)| *n > 0)
    .collect()
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
    /// Both Adam moments' bytes on each device (sharded like their parameters, or finer with
    /// `mesh.shard_optimizer`).
    pub adam_bytes_per_device: u64,
    /// `mesh.shard_optimizer` (ZeRO-1).
    pub shard_optimizer: bool,
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
        shard_optimizer: mesh.shard_optimizer(),
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

/// Write one module's files; compile it when `client` is given (with its lower-case platform),
/// for the devices of `placement` (one device when `None`).
fn dump_module(
    out: &Path,
    module: &Module,
    client: Option<(&Client, &str)>,
    placement: Option<&spmd::Placement>,
) -> Result<ModuleDump> {
    let dump = Dump {
        dir: out,
        formats: FORMATS,
    };
    let mut files = dump.before(module)?;
    let devices = placement.map_or(1, spmd::Placement::len);
    let mut collectives = BTreeMap::new();
    let memory = match client {
        None => Err("not compiled (--no-compile)".to_string()),
        Some((client, platform)) => {
            let compilation = match placement {
                Some(p) => module.compile_with(Compiler::Client(client), &p.compile_options()),
                None => module.compile(Compiler::Client(client)),
            };
            let compiled = compilation.result.with_context(|| {
                format!("compiling {} for {devices} device(s)", module.comp.name())
            })?;
            files.extend(dump.after(module, platform, &compiled)?);
            let proto = compiled.optimized_program()?;
            collectives = count_collectives(&hlo_builder::print_module_bytes(&proto)?);
            compiled.memory().map_err(|e| format!("unavailable: {e}"))
        }
    };
    Ok(ModuleDump {
        name: module.name.clone(),
        instructions: module.instructions(),
        files,
        memory,
        devices,
        collectives,
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
    let train_mesh = cfg.mesh.resolve(mesh.devices)?;
    // The model's checks under the mesh (T divisible by seq, …) before anything is written.
    Model::new(cfg.model.clone())?.with_mesh(train_mesh.clone())?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create dump dir {}", opts.out.display()))?;
    let client = if opts.compile {
        Some(spmd::open_client(opts.plugin.as_deref(), mesh.devices)?)
    } else {
        None
    };
    let placement = match &client {
        Some(c) if mesh.devices > 1 => Some(spmd::Placement::new(c, mesh.devices)?),
        _ => None,
    };
    let platform = match &client {
        Some(c) => Some(c.platform_name()?.to_lowercase()),
        None => None,
    };
    let compile_on = client.as_ref().zip(platform.as_deref());
    // The train step is traced on the mesh when it is compiled for it; `--no-compile` keeps the
    // 1-device trace (the mesh's numbers come from the shardings), so a mesh whose batch does
    // not divide (12B at batch 1 on 16 devices) can still be sized.
    let trace_mesh = if placement.is_some() {
        train_mesh.clone()
    } else {
        model::Mesh::single()
    };
    // Without a client (`--no-compile`) the graph targets no platform: RLA `auto` lowers to HLO.
    let train = Module::trace(0, "train_step", || {
        step::build_train_step(cfg, platform.as_deref().unwrap_or(""), &trace_mesh)
            .context("building the train step")
    })?;
    let mut modules = vec![dump_module(
        &opts.out,
        &train,
        compile_on,
        placement.as_ref(),
    )?];
    drop(train);
    // The decode step at batch 1 with a cache of `context` tokens.
    let decode = Module::trace(1, "decode_step", || {
        model
            .decode_step(1, context)
            .context("building the decode step")
    })?;
    modules.push(dump_module(&opts.out, &decode, compile_on, None)?);
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
        remat: crate::step::remat_label(cfg),
        remat_keeps: crate::step::remat_keeps(cfg),
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
         (6·heads·head_dim·k per layer, k = seq_len global / min(W, seq_len) local, causal halving as MaxText) \
         + RLA {} (3× the chunked forward; no recompute)",
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
        if md.devices > 1 {
            let kinds: Vec<String> = md
                .collectives
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(
                o,
                "  SPMD over {} devices; the after-optimization files and the memory are one \
                 device's partitioned program; collectives: {}",
                md.devices,
                if kinds.is_empty() {
                    "none".to_string()
                } else {
                    kinds.join(", ")
                }
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
        "mesh: {} (device order data, fsdp, seq, tensor; `rattn train` runs on it{})",
        mr.text,
        if s.modules.first().is_some_and(|m| m.devices > 1) {
            ", and dump compiled the train step for it"
        } else if mr.devices > 1 {
            "; with --no-compile dump traces the train step for 1 device"
        } else {
            ""
        }
    );
    let rules: Vec<String> = mr
        .rules
        .iter()
        .map(|(logical, axes)| format!("{logical} → [{}]", axes.join(", ")))
        .collect();
    let _ = writeln!(o, "  rules: {}", rules.join(", "));
    if mr.shard_optimizer {
        let _ = writeln!(
            o,
            "  optimizer state: ZeRO-1 (mesh.shard_optimizer): Adam moments cut over the mesh \
             axes each parameter is replicated over"
        );
    }
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
    /// Devices the `[mesh]` spans, for its per-device sizes (default: the product of the mesh
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

    /// A dump of the tiny model (2 layers, T = 64, batch 8) on `mesh` into a fresh directory.
    fn tiny_dump(name: &str, mesh: &[&str]) -> (Summary, String, PathBuf) {
        let mut o: Vec<String> = [
            "model.seq_len=64",
            "model.layers=2",
            "model.layer_pattern=\"1:1\"",
            "train.batch=8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        o.extend(mesh.iter().map(|s| s.to_string()));
        let cfg = RunConfig::load(
            Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../configs/tiny.toml"
            )),
            &o,
        )
        .unwrap();
        let out = std::env::temp_dir().join(format!("rattn-dump-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let opts = DumpOptions {
            out: out.clone(),
            context: None,
            compile: true,
            plugin: None,
            devices: None,
        };
        let (s, text) = dump(&cfg, &opts).unwrap();
        (s, text, out)
    }

    /// `rattn dump` on fsdp 4 × seq 2 (8 CPU devices, `cpu_device_count = 8`): the train step is
    /// the SPMD-partitioned per-device program, its arguments a fraction of the 1-device step's,
    /// and the summary names the mesh and the collectives the optimized program holds.
    #[test]
    fn a_dump_on_a_mesh_writes_the_partitioned_per_device_program() {
        let (one, _, dir1) = tiny_dump("one", &[]);
        let (s, text, dir) = tiny_dump("fsdp4-seq2", &["mesh.fsdp=4", "mesh.seq=2"]);
        print!("{text}");
        let (t1, t8) = (&one.modules[0], &s.modules[0]);
        assert_eq!((t1.devices, t8.devices), (1, 8));
        assert!(t1.collectives.is_empty(), "{:?}", t1.collectives);
        let (a1, a8) = (
            t1.memory.as_ref().unwrap().argument_bytes,
            t8.memory.as_ref().unwrap().argument_bytes,
        );
        eprintln!("train step arguments: {a8} B per device on 8, {a1} B on 1");
        // fsdp 4 × seq 2 cuts every embed dim in 8 (embed → [fsdp, seq]) and the tokens in 4;
        // the bound is fsdp's alone (what it held when embed → [fsdp] was the default).
        assert!(4 * a8 <= a1 + 4 * 4096, "{a8} B per device vs {a1} B");
        // fsdp gathers parameters and reduces gradients; seq exchanges the halo and gathers
        // the global layer's keys and values.
        for kind in ["all-gather", "collective-permute"] {
            assert!(t8.collectives.contains_key(kind), "{:?}", t8.collectives);
        }
        assert!(
            t8.collectives.contains_key("all-reduce")
                || t8.collectives.contains_key("reduce-scatter"),
            "{:?}",
            t8.collectives
        );
        assert!(text.contains("mesh: 8 devices = data 1 × fsdp 4 × seq 2 × tensor 1"));
        assert!(text.contains("SPMD over 8 devices") && text.contains("collective-permute"));
        // The after-optimization text is one device's program: the batch of 8 is 2 there, the
        // 64 tokens 32.
        let after =
            std::fs::read_to_string(dir.join("module_0000.train_step.cpu_after_optimizations.txt"))
                .unwrap();
        assert!(after.contains("s32[2,65]"), "the token batch is not cut");
        assert!(after.contains("num_partitions=8") || after.contains("collective-permute"));
        // The decode step stays a 1-device program.
        assert_eq!(s.modules[1].devices, 1);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&dir1).unwrap();
    }
}
