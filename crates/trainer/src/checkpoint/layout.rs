//! Checkpoints across the two parameter layouts of `model.scan_layers`: stacked per period of
//! the layer pattern (`scan.{j}.*`, a leading `layers` axis) or one set per layer
//! (`layers.{i}.*`). A checkpoint whose `[model]` table differs from the run's in
//! `scan_layers` alone is converted on load (the parameters and both Adam moments, moved where
//! the models' stacking puts them, [`model::ParamSpec::stacked`]; never recomputed), and
//! `rattn convert` writes a converted copy: one file, or a sharded checkpoint for a mesh (read and
//! written block by block, [`Plan`]).

use super::sharded::{TensorLayout, Writer};
use super::{Checkpoint, CheckpointMeta, NamedTensor, Stored};
use crate::step::StateGroup;
use anyhow::{bail, Context, Result};
use hlo_builder::Sharding;
use model::sharding::MeshConfig;
use model::{Mesh, Model, ModelConfig};
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
    let diff = config_differences(stored, expect);
    let hint = diff
        .first()
        .map(|(k, there, _)| format!(" (e.g. --set model.{k}={there})"))
        .unwrap_or_default();
    bail!(
        "checkpoint {} was written for another model configuration; refusing to load it. \
         It differs in {}. Pass the checkpoint's values with --set{hint}, or the config it was \
         trained with",
        path.display(),
        diff.iter()
            .map(|(k, there, here)| format!("model.{k}: {there} in the checkpoint, {here} here"))
            .collect::<Vec<_>>()
            .join("; ")
    )
}

/// The keys (dotted, below `[model]`) whose values differ between two `[model]` tables, with
/// the value in `a` and in `b` (`absent (the default)` where a table lacks the key: tables omit
/// options at their defaults); the whole tables as one
/// entry when either does not parse.
fn config_differences(a: &str, b: &str) -> Vec<(String, String, String)> {
    fn flatten(
        prefix: &str,
        v: &toml::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            v => {
                out.insert(prefix.to_string(), v.to_string());
            }
        }
    }
    let parse = |t: &str| {
        let v: toml::Value = toml::from_str(t).ok()?;
        let mut m = std::collections::BTreeMap::new();
        flatten("", &v, &mut m);
        Some(m)
    };
    let (Some(x), Some(y)) = (parse(a), parse(b)) else {
        return vec![("(table)".into(), a.trim().into(), b.trim().into())];
    };
    let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
    let absent = || "absent (the default)".to_string();
    keys.into_iter()
        .filter(|k| x.get(*k) != y.get(*k))
        .map(|k| {
            (
                k.clone(),
                x.get(k).cloned().unwrap_or_else(absent),
                y.get(k).cloned().unwrap_or_else(absent),
            )
        })
        .collect()
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

/// Where a conversion takes each value from: the source and target models, the state groups the
/// source holds, and for every parameter of the unrolled model the source tensor (without its
/// group prefix) holding it, with its row when that tensor is stacked. The stacking itself is
/// the models' ([`model::ParamSpec::stacked`], as in [`Model::stack_params`]); a [`Plan`] reads
/// any block of a target tensor from the blocks of the source that hold it, so a conversion
/// needs no more memory than one block.
pub struct Plan {
    from: Model,
    to: Model,
    groups: Vec<StateGroup>,
    source: HashMap<String, (String, Option<usize>)>,
    others: Vec<String>,
}

impl Plan {
    /// The plan from `stored` (the checkpoint at `path`) into `target`'s layout: every tensor of
    /// the groups `stored` holds must be there with the shape its `[model]` table gives, and no
    /// other tensor of those groups; `target` must be the same model but perhaps for
    /// `model.scan_layers`.
    pub fn new(stored: &Stored, target: &ModelConfig, path: &Path) -> Result<Plan> {
        let meta = stored.meta();
        let from_cfg: ModelConfig = toml::from_str(&meta.model_config).with_context(|| {
            format!(
                "checkpoint {} has an unreadable [model] table",
                path.display()
            )
        })?;
        if !same_but_layout(&from_cfg, target) {
            bail!(
                "convert: checkpoint {} is of another model than the target (only \
                 model.scan_layers may differ).\ncheckpoint:\n{}\ntarget:\n{}",
                path.display(),
                meta.model_config,
                toml::to_string(target).unwrap_or_default()
            );
        }
        let from = Model::new(from_cfg)?;
        let to = Model::new(target.clone())?;
        let names = stored.names();
        let in_group = |n: &str, g: &StateGroup| n.starts_with(&format!("{}.", g.prefix()));
        let groups: Vec<StateGroup> = StateGroup::ALL
            .into_iter()
            .filter(|g| names.iter().any(|n| in_group(n, g)))
            .collect();
        let mut source = HashMap::new();
        for s in from.param_specs() {
            for g in &groups {
                let name = format!("{}.{}", g.prefix(), s.name);
                let shape = stored
                    .shape(&name)
                    .with_context(|| format!("convert: {}", super::lacks(&name)))?;
                if shape != s.shape {
                    bail!(
                        "convert: checkpoint tensor {name} has shape {shape:?}, its [model] \
                         table says {:?}",
                        s.shape
                    );
                }
            }
            if s.stacked.is_empty() {
                source.insert(s.name.clone(), (s.name.clone(), None));
            }
            for (row, n) in s.stacked.iter().enumerate() {
                source.insert(n.clone(), (s.name.clone(), Some(row)));
            }
        }
        let known: std::collections::HashSet<&str> =
            from.param_specs().iter().map(|s| s.name.as_str()).collect();
        let mut others = Vec::new();
        for n in &names {
            match groups.iter().find(|g| in_group(n, g)) {
                Some(g) if !known.contains(&n[g.prefix().len() + 1..]) => bail!(
                    "convert: checkpoint {} holds {n}, which is not a tensor of its model",
                    path.display()
                ),
                Some(_) => {}
                None if StateGroup::ALL.iter().any(|g| in_group(n, g)) => {}
                None => others.push(n.clone()),
            }
        }
        Ok(Plan {
            from,
            to,
            groups,
            source,
            others,
        })
    }

    /// The target's state tensors the source holds, in state order: `(group, parameter)`.
    pub fn tensors(&self) -> Vec<(StateGroup, &model::ParamSpec)> {
        self.groups
            .iter()
            .flat_map(|&g| self.to.param_specs().iter().map(move |s| (g, s)))
            .collect()
    }

    /// The source's tensors outside the state groups (kept as they are).
    pub fn others(&self) -> &[String] {
        &self.others
    }

    /// The block at `offset` of `shape` of the target's `group` tensor of parameter `spec`
    /// (one of [`Plan::tensors`]), read from `stored`: a stacked target tensor's rows from the
    /// per-layer values wherever they lie, an unstacked one from its value (a row of a stacked
    /// source tensor, or a tensor of the same name).
    pub fn read_block(
        &self,
        stored: &Stored,
        group: StateGroup,
        spec: &model::ParamSpec,
        offset: &[usize],
        shape: &[usize],
    ) -> Result<Vec<f32>> {
        let read = |unrolled: &str, off: &[usize], shp: &[usize]| -> Result<Vec<f32>> {
            let (src, row) = self
                .source
                .get(unrolled)
                .with_context(|| format!("convert: no source of parameter {unrolled}"))?;
            let name = format!("{}.{src}", group.prefix());
            match row {
                None => stored.read_block(&name, off, shp),
                Some(r) => {
                    let o: Vec<usize> = std::iter::once(*r).chain(off.iter().copied()).collect();
                    let s: Vec<usize> = std::iter::once(1).chain(shp.iter().copied()).collect();
                    stored.read_block(&name, &o, &s)
                }
            }
        };
        if spec.stacked.is_empty() {
            return read(&spec.name, offset, shape);
        }
        super::sharded::check_block(&spec.name, &spec.shape, offset, shape)?;
        let mut out = Vec::with_capacity(shape.iter().product());
        for r in offset[0]..offset[0] + shape[0] {
            out.extend(read(&spec.stacked[r], &offset[1..], &shape[1..])?);
        }
        Ok(out)
    }

    /// The line that says what the conversion does (for the user).
    pub fn describe(&self, path: &Path) -> String {
        let groups: Vec<&str> = self.groups.iter().map(|g| g.prefix()).collect();
        describe(path, &self.from, &self.to, &groups)
    }
}

/// `ck` with every parameter tensor and both Adam moments (`{params,adam_m,adam_v}.*`, the
/// groups it holds) moved into the layout of `target` (the model of `ck`'s `[model]` table but
/// perhaps for `model.scan_layers`), its `[model]` table replaced by `target`'s; other tensors
/// are kept. Values are only moved, never computed, so a round trip is bit-exact. Returns the
/// converted checkpoint and one line saying what was done (for the user).
pub fn convert(ck: Checkpoint, target: &ModelConfig, path: &Path) -> Result<(Checkpoint, String)> {
    let stored = Stored::Whole(ck);
    let plan = Plan::new(&stored, target, path)?;
    let whole = |name: &str, shape: &[usize], data: Vec<f32>| NamedTensor {
        name: name.to_string(),
        shape: shape.to_vec(),
        data,
    };
    let mut tensors = Vec::new();
    for (g, s) in plan.tensors() {
        let data = plan.read_block(&stored, g, s, &vec![0; s.shape.len()], &s.shape)?;
        tensors.push(whole(&format!("{}.{}", g.prefix(), s.name), &s.shape, data));
    }
    let Stored::Whole(ck) = stored else {
        unreachable!("made whole above")
    };
    tensors.extend(
        ck.tensors
            .into_iter()
            .filter(|t| plan.others().contains(&t.name)),
    );
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((
        Checkpoint {
            model_config: toml::to_string(target)?,
            tensors,
            ..ck
        },
        plan.describe(path),
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
    /// Where to write the converted checkpoint: a `.safetensors` path (one file), or a directory
    /// that gets `ckpt_<step>/` (sharded: from a sharded checkpoint, or with `--set mesh.*`) or
    /// else `ckpt_<step>.safetensors`. Nothing existing is ever overwritten.
    #[arg(long)]
    pub out: PathBuf,
    /// `model.scan_layers=true|false`: the layout to write (default: the other one than the
    /// checkpoint's); `mesh.KEY=VALUE` (`mesh.fsdp=4`, `mesh.rules.mlp=["tensor"]`, ...): write
    /// a sharded checkpoint for that mesh, the `[mesh]` table of the sharded source (or the
    /// one-device default) with these changes. No other key can be changed.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// The `--set` overrides of `rattn convert`: the `model.scan_layers` value if given, and the
/// `mesh.*` ones; any other key is refused.
fn split_overrides(overrides: &[String]) -> Result<(Option<bool>, Vec<String>)> {
    let mut scan = None;
    let mut mesh = Vec::new();
    for o in overrides {
        let (k, val) = o
            .split_once('=')
            .with_context(|| format!("--set {o:?}: expected KEY=VALUE"))?;
        let k = k.trim();
        if k.starts_with("mesh.") {
            mesh.push(o.clone());
            continue;
        }
        if k != "model.scan_layers" {
            bail!(
                "convert changes only the parameter layout and the mesh: --set \
                 model.scan_layers=true|false, --set mesh.KEY=VALUE (got --set {o})"
            );
        }
        scan = Some(
            val.trim()
                .parse::<bool>()
                .with_context(|| format!("--set {o}: model.scan_layers takes true or false"))?,
        );
    }
    Ok((scan, mesh))
}

/// The mesh a sharded output is written for: `base` (the sharded source's `[mesh]` table, else
/// the one-device default) with the `mesh.*` overrides `sets`; a −1 size takes the rest of the
/// source's `partitions`.
fn output_mesh(base: MeshConfig, sets: &[String], partitions: usize) -> Result<Mesh> {
    let mut root = toml::Value::Table(toml::Table::new());
    if let toml::Value::Table(t) = &mut root {
        t.insert("mesh".into(), toml::Value::try_from(&base)?);
    }
    for o in sets {
        crate::config::apply_override(&mut root, o)?;
    }
    let mesh_value = root
        .get("mesh")
        .cloned()
        .context("convert: no [mesh] table")?;
    let cfg: MeshConfig = mesh_value
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("--set mesh.*: {}", e.to_string().trim()))?;
    let devices = cfg.fixed_device_count()?.unwrap_or(partitions);
    Ok(cfg.resolve(devices)?)
}

/// What `rattn convert` writes.
enum Output {
    /// One safetensors file at this path.
    File(PathBuf),
    /// A sharded checkpoint directory at this path, for this mesh.
    Sharded(PathBuf, Mesh),
}

/// Run `rattn convert`: read the checkpoint (a file, or a sharded directory block by block),
/// move its parameters and both Adam moments into the asked layout, and write it atomically:
/// as one file, or as a sharded checkpoint (what `rattn train` writes on a mesh: shard files,
/// index, commit marker last) for the source's mesh or the one `--set mesh.*` gives. Everything
/// is checked (the layout, the mesh against every tensor, the output path) before anything is
/// written, and nothing existing is overwritten. Returns the path written.
pub fn run(args: &ConvertArgs) -> Result<PathBuf> {
    let (scan, mesh_sets) = split_overrides(&args.overrides)?;
    let path = super::resolve(&args.checkpoint)?;
    let stored = Stored::open(&path, None)?;
    let meta = stored.meta();
    let from: ModelConfig = toml::from_str(&meta.model_config).with_context(|| {
        format!(
            "checkpoint {} has an unreadable [model] table",
            path.display()
        )
    })?;
    let target = ModelConfig {
        scan_layers: scan.unwrap_or(!from.scan_layers),
        ..from
    };
    let plan = Plan::new(&stored, &target, &path)?;
    let one_file = args.out.extension().is_some_and(|e| e == "safetensors") && !args.out.is_dir();
    let refuse = |p: &Path| -> Result<()> {
        if p.exists() {
            bail!(
                "convert: {} exists; refusing to overwrite it (name another --out)",
                p.display()
            );
        }
        Ok(())
    };
    if super::sharded::is_sharded(&args.out) {
        refuse(&args.out)?;
    }
    let sharded_source = match &stored {
        Stored::Sharded(s) => Some(s),
        Stored::Whole(_) => None,
    };
    let output = if one_file {
        if !mesh_sets.is_empty() {
            bail!(
                "convert: --out {} names one file, but --set mesh.* asks for a sharded \
                 checkpoint: name a directory",
                args.out.display()
            );
        }
        Output::File(args.out.clone())
    } else if sharded_source.is_some() || !mesh_sets.is_empty() {
        let base = match sharded_source {
            Some(s) => match &s.mesh_config {
                Some(m) => m.clone(),
                None if mesh_sets.is_empty() => bail!(
                    "convert: checkpoint {} records its mesh only as text ({}), not as a [mesh] \
                     table: give the mesh to write with --set mesh.KEY=VALUE, or write one file \
                     with --out PATH.safetensors",
                    path.display(),
                    s.mesh
                ),
                None => MeshConfig::default(),
            },
            None => MeshConfig::default(),
        };
        let partitions = sharded_source.map_or(1, |s| s.partitions);
        let mesh = output_mesh(base, &mesh_sets, partitions)?;
        Output::Sharded(args.out.join(super::sharded::dir_name(meta.step)), mesh)
    } else {
        Output::File(args.out.join(super::file_name(meta.step)))
    };
    let meta = CheckpointMeta {
        model_config: toml::to_string(&target)?,
        ..meta
    };
    let written = match output {
        Output::File(out) => {
            refuse(&out)?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create directory {}", dir.display()))?;
            }
            let (ck, _) = convert(super::whole_of(stored)?, &target, &path)?;
            super::write_file(&out, &ck)?;
            out
        }
        Output::Sharded(out, mesh) => {
            refuse(&out)?;
            // A failed write leaves no half-written directory behind (it did not exist before:
            // `refuse`), so the retry is not refused.
            if let Err(e) = write_sharded(&stored, &plan, &target, &mesh, &meta, &out) {
                let _ = std::fs::remove_dir_all(&out);
                return Err(e);
            }
            println!("mesh: {mesh}");
            out
        }
    };
    println!("{}", plan.describe(&path));
    println!("wrote {} (step {})", written.display(), meta.step);
    Ok(written)
}

/// Write the conversion `plan` of `stored` as a sharded checkpoint at `out` for `mesh`, through
/// the sharded format's writer ([`super::sharded::write_new`]), one piece at a time. The
/// shardings are those `rattn train` gives the state on `mesh`; a mesh that does not split a
/// tensor is an error naming it, its dim and the mesh axes, before anything is written.
fn write_sharded(
    stored: &Stored,
    plan: &Plan,
    target: &ModelConfig,
    mesh: &Mesh,
    meta: &CheckpointMeta,
    out: &Path,
) -> Result<()> {
    let model = Model::new(target.clone())?
        .with_mesh(mesh.clone())
        .with_context(|| format!("convert: the mesh {mesh} does not fit the model"))?;
    let shardings = crate::step::state_shardings(&model, mesh)
        .with_context(|| format!("convert: the mesh {mesh} does not fit the model"))?;
    let by_name: HashMap<&str, &model::ParamSharding> =
        shardings.iter().map(|s| (s.name.as_str(), s)).collect();
    // Tensor t of `layouts` is `(group, parameter)` of `sources[t]`, or an `others` tensor.
    let sources = plan.tensors();
    let mut layouts = Vec::new();
    for &(g, s) in &sources {
        let name = format!("{}.{}", g.prefix(), s.name);
        let sharding = by_name
            .get(name.as_str())
            .with_context(|| format!("convert: no sharding for {name}"))?
            .sharding
            .clone();
        layouts.push(TensorLayout {
            name,
            shape: s.shape.clone(),
            sharding,
        });
    }
    for n in plan.others() {
        layouts.push(TensorLayout {
            name: n.clone(),
            shape: stored.shape(n).unwrap_or_default(),
            sharding: Sharding::Replicated,
        });
    }
    let partitions = mesh.device_count();
    let local: Vec<usize> = (0..partitions).collect();
    let writer = Writer {
        partitions,
        local: &local,
        process: (0, 1),
        barrier: None,
        mesh,
    };
    super::sharded::write_new(out, meta, &layouts, &writer, |t, p| {
        let l = &layouts[t];
        let offset = l
            .sharding
            .tile_offset(p as i64, &l.shape)?
            .with_context(|| format!("partition {p} holds no piece of {}", l.name))?;
        let shape = l.sharding.shard_dims(&l.shape)?;
        match sources.get(t) {
            Some(&(g, s)) => plan.read_block(stored, g, s, &offset, &shape),
            None => stored.read_block(&l.name, &offset, &shape),
        }
    })
}
