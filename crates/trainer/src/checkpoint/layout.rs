//! Checkpoints across the two parameter layouts of `model.scan_layers`: stacked per period of
//! the layer pattern (`scan.{j}.*`, a leading `layers` axis) or one set per layer
//! (`layers.{i}.*`). A checkpoint whose `[model]` table differs from the run's in
//! `scan_layers` alone is converted on load (the parameters and both Adam moments, through
//! [`model::Model::stack_params`] / [`model::Model::unstack_params`], which only move values), and
//! `rattn convert` writes a converted copy.

use super::{Checkpoint, NamedTensor};
use crate::step::StateGroup;
use anyhow::{bail, Context, Result};
use model::{Model, ModelConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How a checkpoint's `[model]` table compares with the one a run expects.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigMatch {
    /// The same table.
    Same,
    /// The same model in the other parameter layout: the checkpoint's parameters need
    /// [`convert`] into `target`'s.
    OtherLayout {
        /// The run's model configuration.
        target: ModelConfig,
    },
}

/// Compare the checkpoint at `path`'s `[model]` table `stored` with the run's `expect`: the
/// same, the same but for `model.scan_layers`, or an error showing both.
pub fn compare(path: &Path, stored: &str, expect: &str) -> Result<ConfigMatch> {
    if expect.trim() == stored.trim() {
        return Ok(ConfigMatch::Same);
    }
    let parse = |t: &str| toml::from_str::<ModelConfig>(t).ok();
    if let (Some(a), Some(b)) = (parse(stored), parse(expect)) {
        if same_but_layout(&a, &b) {
            // `scan_unroll` alone changes the traced loop, not the parameters.
            return Ok(if a.scan_layers == b.scan_layers {
                ConfigMatch::Same
            } else {
                ConfigMatch::OtherLayout { target: b }
            });
        }
    }
    bail!(
        "checkpoint {} was written for another model configuration; refusing to load it.\n\
         checkpoint:\n{stored}\ncurrent:\n{expect}",
        path.display()
    )
}

/// Whether `a` and `b` are the same model but perhaps for `scan_layers` and `scan_unroll`
/// (how many periods one trip of the layer loop runs; the parameters do not depend on it).
fn same_but_layout(a: &ModelConfig, b: &ModelConfig) -> bool {
    ModelConfig {
        scan_layers: b.scan_layers,
        scan_unroll: b.scan_unroll,
        ..a.clone()
    } == *b
}

/// `ck` with every parameter tensor and both Adam moments (`{params,adam_m,adam_v}.*`, the
/// groups it holds) moved into the layout of `target` (the model of `ck`'s `[model]` table but
/// perhaps for `model.scan_layers`), its `[model]` table replaced by `target`'s; other tensors
/// are kept. Values are only moved, never computed, so a round trip is bit-exact. Returns the
/// converted checkpoint and one line saying what was done (for the user).
pub fn convert(ck: Checkpoint, target: &ModelConfig, path: &Path) -> Result<(Checkpoint, String)> {
    let from_cfg: ModelConfig = toml::from_str(&ck.model_config).with_context(|| {
        format!(
            "checkpoint {} has an unreadable [model] table",
            path.display()
        )
    })?;
    if !same_but_layout(&from_cfg, target) {
        bail!(
            "convert: checkpoint {} is of another model than the target (only model.scan_layers \
             may differ).\ncheckpoint:\n{}\ntarget:\n{}",
            path.display(),
            ck.model_config,
            toml::to_string(target).unwrap_or_default()
        );
    }
    let from = Model::new(from_cfg)?;
    let to = Model::new(target.clone())?;
    let mut by_name: HashMap<String, NamedTensor> = ck
        .tensors
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let mut tensors = Vec::new();
    let mut groups = Vec::new();
    for group in StateGroup::ALL {
        let prefix = group.prefix();
        if !by_name.keys().any(|n| n.starts_with(&format!("{prefix}."))) {
            continue;
        }
        let values = from
            .param_specs()
            .iter()
            .map(|s| {
                let name = format!("{prefix}.{}", s.name);
                let t = by_name
                    .remove(&name)
                    .with_context(|| format!("convert: {}", super::lacks(&name)))?;
                if t.shape != s.shape || t.data.len() != s.numel() {
                    bail!(
                        "convert: checkpoint tensor {name} has shape {:?} ({} values), its \
                         [model] table says {:?}",
                        t.shape,
                        t.data.len(),
                        s.shape
                    );
                }
                Ok(t.data)
            })
            .collect::<Result<Vec<_>>>()?;
        let unrolled = from.unstack_params(&values)?;
        for (s, data) in to.param_specs().iter().zip(to.stack_params(&unrolled)?) {
            tensors.push(NamedTensor {
                name: format!("{prefix}.{}", s.name),
                shape: s.shape.clone(),
                data,
            });
        }
        groups.push(prefix);
    }
    if let Some(extra) = by_name.keys().find(|n| {
        StateGroup::ALL
            .iter()
            .any(|g| n.starts_with(&format!("{}.", g.prefix())))
    }) {
        bail!(
            "convert: checkpoint {} holds {extra}, which is not a tensor of its model",
            path.display()
        );
    }
    tensors.extend(by_name.into_values());
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let line = describe(path, &from, &to, &groups);
    Ok((
        Checkpoint {
            model_config: toml::to_string(target)?,
            tensors,
            ..ck
        },
        line,
    ))
}

/// The line that says what [`convert`] did.
fn describe(path: &Path, from: &Model, to: &Model, groups: &[&str]) -> String {
    let what = if groups.len() == StateGroup::ALL.len() {
        "the parameters and both Adam moments"
    } else {
        "the parameters"
    };
    let n = from.layers().len();
    let stacked = |m: &Model| {
        m.scan_period().map(|p| {
            let s = if p == 1 { "" } else { "s" };
            format!(
                "scanned layout (scan.{{j}}.*: {} periods of {p} layer{s})",
                n / p
            )
        })
    };
    match (stacked(from), stacked(to)) {
        (Some(f), None) => format!(
            "checkpoint {} is in the {f}; unstacked {what} into {n} layers (layers.{{i}}.*)",
            path.display()
        ),
        (None, Some(t)) => format!(
            "checkpoint {} is in the unrolled layout (layers.{{i}}.*); stacked {what} into the \
             {t}",
            path.display()
        ),
        (Some(f), Some(_)) => format!(
            "checkpoint {} is already in the {f}; {what} unchanged",
            path.display()
        ),
        (None, None) => format!(
            "checkpoint {} is already in the unrolled layout (layers.{{i}}.*); {what} unchanged",
            path.display()
        ),
    }
}

/// `rattn convert`: a checkpoint written in the other parameter layout.
#[derive(clap::Args, Clone, Debug)]
pub struct ConvertArgs {
    /// Checkpoint file, sharded checkpoint directory, or run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where to write the converted checkpoint (always one file): a `.safetensors` path, or a
    /// directory that gets `ckpt_<step>.safetensors`. An existing file is never overwritten.
    #[arg(long)]
    pub out: PathBuf,
    /// `model.scan_layers=true|false`: the layout to write (default: the other one than the
    /// checkpoint's). No other key can be changed.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// The `model.scan_layers` value of `--set` overrides, if given; any other key is refused.
fn scan_layers_override(overrides: &[String]) -> Result<Option<bool>> {
    let mut v = None;
    for o in overrides {
        let (k, val) = o
            .split_once('=')
            .with_context(|| format!("--set {o:?}: expected KEY=VALUE"))?;
        if k.trim() != "model.scan_layers" {
            bail!(
                "convert changes only the parameter layout: --set model.scan_layers=true|false \
                 (got --set {o})"
            );
        }
        v = Some(
            val.trim()
                .parse::<bool>()
                .with_context(|| format!("--set {o}: model.scan_layers takes true or false"))?,
        );
    }
    Ok(v)
}

/// Run `rattn convert`: read the checkpoint (a file or a sharded directory), move its
/// parameters and both Adam moments into the asked layout, and write it atomically as one file.
/// Returns the path written.
pub fn run(args: &ConvertArgs) -> Result<PathBuf> {
    let scan = scan_layers_override(&args.overrides)?;
    let path = super::resolve(&args.checkpoint)?;
    let ck = super::load(&path, None)?;
    let from: ModelConfig = toml::from_str(&ck.model_config).with_context(|| {
        format!(
            "checkpoint {} has an unreadable [model] table",
            path.display()
        )
    })?;
    let target = ModelConfig {
        scan_layers: scan.unwrap_or(!from.scan_layers),
        ..from
    };
    let (ck, line) = convert(ck, &target, &path)?;
    let out = if args.out.is_dir() || args.out.extension().is_none_or(|e| e != "safetensors") {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("cannot create directory {}", args.out.display()))?;
        args.out.join(super::file_name(ck.step))
    } else {
        args.out.clone()
    };
    if out.exists() {
        bail!(
            "convert: {} exists; refusing to overwrite it (name another --out)",
            out.display()
        );
    }
    super::write_file(&out, &ck)?;
    println!("{line}");
    println!("wrote {} (step {})", out.display(), ck.step);
    Ok(out)
}
