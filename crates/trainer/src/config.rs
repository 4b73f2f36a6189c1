//! Run configuration: a TOML file with `[model]`, `[train]`, `[data]` and `[mesh]` tables, plus
//! `key=value` overrides from the command line (`--set train.steps=50 --set model.window=16
//! --set mesh.fsdp=8 --set 'mesh.rules.embed=["fsdp"]'`).

use anyhow::{anyhow, bail, Context, Result};
use model::{MeshConfig, ModelConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Optimiser and schedule settings (`[train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per step.
    pub batch: usize,
    /// Total optimiser steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Final learning rate of the cosine decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay (AdamW), applied to matrices only.
    pub weight_decay: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub clip_norm: f64,
    /// Seed of initialisation and data.
    pub seed: u64,
    /// Steps between metrics lines.
    pub log_every: usize,
    /// Steps between checkpoints (0: only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// What the backward pass keeps of the forward: `none` (everything), `layer_inputs` (each
    /// layer's input; the blocks are traced again in the backward pass), `dots_saveable` (also
    /// every matmul result of the blocks) or `dots_with_no_batch_dims_saveable` (alias
    /// `minimal`: also the projections, not the attention scores). See [`model::Remat`].
    pub remat: model::Remat,
    /// How the AdamW update (with the gradient norm) is lowered: `auto` (the `kernel` on one
    /// CPU device, else `hlo`), `hlo` (element-wise HLO, any platform and mesh) or `kernel`
    /// (the `rattention.adamw` custom call: CPU, one device). See [`OptimizerLowering`].
    pub optimizer_lowering: OptimizerLowering,
}

/// The lowering of the train step's optimizer (`[train] optimizer_lowering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerLowering {
    /// [`OptimizerLowering::Kernel`] for a graph on CPU devices (one or a mesh), else
    /// [`OptimizerLowering::Hlo`].
    #[default]
    Auto,
    /// Element-wise HLO that XLA fuses and compiles (every platform, sharded meshes too).
    Hlo,
    /// The CPU kernel (`pallas_port::adamw`): nothing for XLA to compile. One in-place custom
    /// call on one device; on a mesh, a manual region where each device sums its gradient
    /// pieces' squares, the partials are all-gathered into the global norm, and each device
    /// updates its pieces in place. CPU only.
    Kernel,
}

impl OptimizerLowering {
    /// Whether `platform` (a PJRT platform name) is the host CPU, where the kernel runs.
    pub fn is_cpu(platform: &str) -> bool {
        pallas_port::graph::is_host_platform(platform)
    }

    /// The concrete lowering for a graph on `platform` (a PJRT platform name) over `devices`
    /// devices: `auto` becomes `kernel` on `"cpu"`/`"host"` (one device or a mesh), else `hlo`.
    /// (`_devices` is kept for callers; the kernel covers any device count.)
    pub fn resolve(self, platform: &str, _devices: usize) -> OptimizerLowering {
        match self {
            OptimizerLowering::Auto if Self::is_cpu(platform) => OptimizerLowering::Kernel,
            OptimizerLowering::Auto => OptimizerLowering::Hlo,
            l => l,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch: 8,
            steps: 100,
            lr: 1e-3,
            warmup: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip_norm: 1.0,
            seed: 0,
            log_every: 10,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            remat: model::Remat::None,
            optimizer_lowering: OptimizerLowering::Auto,
        }
    }
}

/// Where the tokens come from (`[data]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `synthetic` (embedded generator), `text` (UTF-8 file or directory, byte tokenizer or a
    /// `tokenizer.json`), `tokens` (pre-tokenized little-endian u16/u32 file).
    pub kind: String,
    /// Path of the text or token data (not used for `synthetic`).
    pub path: Option<PathBuf>,
    /// A Hugging Face `tokenizer.json` for `text` data. When unset, a `tokenizer.json` inside a
    /// `path` directory is used, else the byte tokenizer (vocab 256).
    pub tokenizer: Option<PathBuf>,
    /// Token width of a `tokens` file: 16 or 32.
    pub token_bits: u32,
    /// Fraction of a text or token stream held out for `rattn eval` (its tail; never trained on).
    pub eval_fraction: f64,
    /// The command that installs the data at `path` (e.g. `scripts/get_text.sh`), named in the
    /// error when `path` does not exist.
    pub install: Option<String>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: "synthetic".into(),
            path: None,
            tokenizer: None,
            token_bits: 16,
            eval_fraction: 0.05,
            install: None,
        }
    }
}

/// A whole run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The model.
    pub model: ModelConfig,
    /// Training.
    #[serde(default)]
    pub train: TrainConfig,
    /// Data.
    #[serde(default)]
    pub data: DataConfig,
    /// The device mesh and the logical-axis rules (default: one device): `rattn train` runs the
    /// step sharded on it (`--devices N` when a size is −1); `rattn dump` reports it.
    #[serde(default)]
    pub mesh: MeshConfig,
}

/// A float option's check: key under `train.`, value, the range in words, the test.
type RangeCheck = (&'static str, f64, &'static str, fn(f64) -> bool);

impl RunConfig {
    /// Load a TOML file and apply `key=value` overrides, then check everything.
    pub fn load(path: &Path, overrides: &[String]) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).with_context(|| {
            let hint = if path.is_relative() {
                format!(
                    " (relative to {}; the configs live in the repository's configs/: run from its \
                     root or pass --config PATH)",
                    std::env::current_dir()
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|_| "the current directory".into())
                )
            } else {
                String::new()
            };
            format!("cannot read config file {}{hint}", path.display())
        })?;
        Self::from_toml(&text, overrides).with_context(|| match overrides.len() {
            0 => format!("in config {}", path.display()),
            _ => format!("in config {} with the --set overrides", path.display()),
        })
    }

    /// Parse TOML text and apply overrides.
    pub fn from_toml(text: &str, overrides: &[String]) -> Result<RunConfig> {
        let mut value: toml::Value = toml::from_str(text).context("config is not valid TOML")?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: RunConfig = value
            .try_into()
            // The message and, on a second line, the key it is about ("in `model.rla.norm`").
            .map_err(|e: toml::de::Error| {
                anyhow!("{}", e.to_string().trim_end().replace('\n', " "))
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check the model and training settings.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let t = &self.train;
        for (key, v) in [
            ("batch", t.batch),
            ("steps", t.steps),
            ("log_every", t.log_every),
            ("keep_checkpoints", t.keep_checkpoints),
        ] {
            if v == 0 {
                bail!("train.{key} must be > 0 (got 0)");
            }
        }
        // Each float with the range it must lie in (NaN lies in none).
        let ranges: [RangeCheck; 8] = [
            ("lr", t.lr, "> 0", |x| x > 0.0),
            ("eps", t.eps, "> 0", |x| x > 0.0),
            ("beta1", t.beta1, "in [0, 1)", |x| (0.0..1.0).contains(&x)),
            ("beta2", t.beta2, "in [0, 1)", |x| (0.0..1.0).contains(&x)),
            ("min_lr_ratio", t.min_lr_ratio, "in [0, 1]", |x| {
                (0.0..=1.0).contains(&x)
            }),
            ("weight_decay", t.weight_decay, ">= 0", |x| x >= 0.0),
            (
                "clip_norm",
                t.clip_norm,
                ">= 0 (0 disables clipping)",
                |x| x >= 0.0,
            ),
            ("lr", t.lr, "finite", f64::is_finite),
        ];
        for (key, v, want, ok) in ranges {
            if !ok(v) {
                bail!("train.{key} must be {want} (got {v})");
            }
        }
        if !["synthetic", "text", "tokens"].contains(&self.data.kind.as_str()) {
            bail!(
                "data.kind must be one of synthetic, text, tokens (got {:?})",
                self.data.kind
            );
        }
        if self.data.kind != "synthetic" && self.data.path.is_none() {
            bail!("data.kind = {:?} needs data.path", self.data.kind);
        }
        self.mesh.check()?;
        Ok(())
    }
}

/// Apply one `a.b.c=value` override. The value is parsed as a TOML value (`16`, `1e-3`, `true`,
/// `"x"`, `[1, 2]`); anything that does not parse is taken as a string.
pub fn apply_override(root: &mut toml::Value, o: &str) -> Result<()> {
    let (key, raw) = o
        .split_once('=')
        .ok_or_else(|| anyhow!("override {o:?} is not key=value (e.g. train.steps=50)"))?;
    let key = key.trim();
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("override key {key:?} is malformed");
    }
    let mut cur = root;
    for p in &parts[..parts.len() - 1] {
        let table = cur
            .as_table_mut()
            .ok_or_else(|| anyhow!("override {key:?}: {p:?} is not a table"))?;
        cur = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = cur
        .as_table_mut()
        .ok_or_else(|| anyhow!("override {key:?}: parent is not a table"))?;
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/tiny.toml"
        ))
        .unwrap()
    }

    #[test]
    fn overrides_apply_and_unknown_keys_are_named() {
        let cfg = RunConfig::from_toml(&tiny(), &["train.steps=7".into(), "model.window=5".into()])
            .unwrap();
        assert_eq!(cfg.train.steps, 7);
        assert_eq!(cfg.model.window, 5);
        let err = RunConfig::from_toml(&tiny(), &["model.windw=5".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("windw"), "{err:#}");
        let err = RunConfig::from_toml(&tiny(), &["train.steps".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("key=value"), "{err:#}");
        let err = RunConfig::from_toml(&tiny(), &["model.kv_heads=3".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("divisible"), "{err:#}");
    }

    #[test]
    fn rla_seq_state_override_parses_and_bad_values_list_the_choices() {
        use model::config::SeqState;
        let cfg = RunConfig::from_toml(&tiny(), &[]).unwrap();
        assert_eq!(cfg.model.rla.seq_state, SeqState::Auto);
        let cfg = RunConfig::from_toml(&tiny(), &["model.rla.seq_state=hlo".into()]).unwrap();
        assert_eq!(cfg.model.rla.seq_state, SeqState::Hlo);
        let err = RunConfig::from_toml(&tiny(), &["model.rla.seq_state=fast".into()]).unwrap_err();
        let e = format!("{err:#}");
        eprintln!("{e}");
        assert!(
            e.contains("fast") && e.contains("`auto`, `kernel`, `hlo`"),
            "{e}"
        );
    }

    #[test]
    fn mesh_defaults_to_one_device_and_takes_overrides() {
        use model::{LogicalAxis, MeshAxis};
        let cfg = RunConfig::from_toml(&tiny(), &[]).unwrap();
        assert_eq!(cfg.mesh, MeshConfig::default());
        assert_eq!(cfg.mesh.fixed_device_count().unwrap(), Some(1));
        let cfg = RunConfig::from_toml(
            &tiny(),
            &[
                "mesh.fsdp=-1".into(),
                "mesh.tensor=2".into(),
                r#"mesh.rules.embed=["fsdp", "data"]"#.into(),
                "mesh.rules.mlp=[]".into(),
                "mesh.rules.vocab=fsdp".into(),
            ],
        )
        .unwrap();
        assert_eq!((cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.data), (-1, 2, 1));
        let r = &cfg.mesh.rules;
        assert_eq!(r.get(LogicalAxis::Embed), [MeshAxis::Fsdp, MeshAxis::Data]);
        assert_eq!(r.get(LogicalAxis::Mlp), []);
        assert_eq!(r.get(LogicalAxis::Vocab), [MeshAxis::Fsdp]);
        assert_eq!(r.get(LogicalAxis::QHeads), [MeshAxis::Tensor]);
        assert_eq!(cfg.mesh.resolve(16).unwrap().size(MeshAxis::Fsdp), 8);
        // The same in a config file.
        let text = format!("{}\n[mesh]\nfsdp = 4\n[mesh.rules]\nembed = []\n", tiny());
        let cfg = RunConfig::from_toml(&text, &[]).unwrap();
        assert_eq!(cfg.mesh.fsdp, 4);
        assert_eq!(cfg.mesh.rules.get(LogicalAxis::Embed), []);
    }

    #[test]
    fn bad_meshes_are_refused_at_load() {
        let err = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            format!("{:#}", RunConfig::from_toml(&tiny(), &o).unwrap_err())
        };
        let e = err(&["mesh.data=0"]);
        assert!(
            e.contains("mesh.data = 0: a mesh size must be >= 1, or -1"),
            "{e}"
        );
        let e = err(&["mesh.data=-1", "mesh.seq=-1"]);
        assert!(e.contains("mesh.data and mesh.seq are both -1"), "{e}");
        let e = err(&["mesh.rules.embd=[]"]);
        assert!(e.contains("unknown logical axis \"embd\""), "{e}");
        let e = err(&[r#"mesh.rules.embed=["model"]"#]);
        assert!(
            e.contains(
                "mesh.rules.embed: unknown mesh axis \"model\" (known: data, fsdp, seq, tensor)"
            ),
            "{e}"
        );
        let e = err(&[r#"mesh.rules.batch=["data", "data"]"#]);
        assert!(
            e.contains("mesh.rules.batch lists mesh axis data twice"),
            "{e}"
        );
        let e = err(&["mesh.pipeline=2"]);
        assert!(e.contains("pipeline"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = |o: &str| {
            format!(
                "{:#}",
                RunConfig::from_toml(&tiny(), &[o.into()]).unwrap_err()
            )
        };
        let e = err(r#"model.rla.norm="off""#);
        assert!(e.contains("expected a boolean in `model.rla.norm`"), "{e}");
        let e = err(r#"model.rla.feature_map="gelu""#);
        assert!(e.contains("model.rla.feature_map"), "{e}");
        let cfg = RunConfig::from_toml(&tiny(), &["model.rla.norm=false".into()]).unwrap();
        assert!(!cfg.model.rla.norm);
        assert!(RunConfig::from_toml(&tiny(), &[]).unwrap().model.rla.norm);
    }

    #[test]
    fn every_shipped_config_loads() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs");
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            RunConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        }
    }
}
