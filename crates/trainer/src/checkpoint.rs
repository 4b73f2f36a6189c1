//! Checkpoints in safetensors: parameters, optimiser moments, step, data position, config and seed.
//!
//! Two layouts, both read everywhere: one file `ckpt_<step>.safetensors` holding every tensor
//! whole (1-device runs), and a sharded directory `ckpt_<step>/` where every process writes the
//! pieces its devices hold, with an index and a commit marker ([`sharded`]; runs on a mesh).
//! Writes are atomic (temp file in the same directory, fsync, rename, fsync of the directory), the
//! last K checkpoints are kept, and loading refuses a truncated or corrupt file, or one written for
//! another model configuration, with a message that says which. A checkpoint of the same model in
//! the other `model.scan_layers` layout is converted on load, saying so ([`layout`]).

pub mod layout;
pub mod sharded;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A named f32 host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Dotted name (`params.layers.0.attn.wq`, `adam_m.…`, `adam_v.…`).
    pub name: String,
    /// Row-major dims.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

/// What a checkpoint records besides its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointMeta {
    /// Optimiser steps taken.
    pub step: u64,
    /// Next data index (global: the same on every mesh).
    pub data_position: u64,
    /// Seed of the run.
    pub seed: u64,
    /// The `[model]` table as TOML (must match to resume).
    pub model_config: String,
}

/// `format` of single-file checkpoints.
pub const FORMAT: &str = "rattention-checkpoint-v1";

/// Everything needed to resume bit-exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Optimiser steps taken.
    pub step: u64,
    /// Next data index.
    pub data_position: u64,
    /// Seed of the run.
    pub seed: u64,
    /// The `[model]` table as TOML (must match to resume).
    pub model_config: String,
    /// Tensors.
    pub tensors: Vec<NamedTensor>,
}

impl Checkpoint {
    /// The parameter tensors (`params.<name>`) of `model`, in [`model::Model::param_specs`] order,
    /// each checked for presence, shape, element count and finite values (a run that diverged
    /// leaves NaN or infinite parameters, which would evaluate to NaN and generate no token).
    pub fn params(&self, model: &model::Model) -> Result<Vec<&NamedTensor>> {
        model
            .param_specs()
            .iter()
            .map(|s| {
                let name = format!("params.{}", s.name);
                let t = self
                    .tensors
                    .iter()
                    .find(|t| t.name == name)
                    .with_context(|| lacks(&name))?;
                if t.shape != s.shape || t.data.len() != s.numel() {
                    bail!(
                        "checkpoint tensor {name} has shape {:?} ({} values), the model expects {:?}",
                        t.shape,
                        t.data.len(),
                        s.shape
                    );
                }
                if let Some(bad) = non_finite(&t.data) {
                    bail!(
                        "checkpoint tensor {name} (step {}) {bad}: the run diverged before this \
                         checkpoint was written; use an earlier checkpoint of the run",
                        self.step
                    );
                }
                Ok(t)
            })
            .collect()
    }
}

/// The metadata key of a tensor's CRC-32 (of its little-endian bytes, as 8 hex digits).
/// Checkpoints written before checksums existed have none and load unchecked.
fn checksum_key(name: &str) -> String {
    format!("crc32.{name}")
}

/// CRC-32 (IEEE) of `bytes`.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The error for stored bytes whose CRC-32 is not the recorded one.
pub(crate) fn checksum_mismatch(name: &str, stored: u32, bytes: &[u8]) -> Option<String> {
    let found = crc32(bytes);
    (found != stored).then(|| {
        format!(
            "tensor {name}: its bytes have CRC-32 {found:08x}, the checkpoint recorded \
             {stored:08x} (the file changed after it was written)"
        )
    })
}

/// `None` when every value is finite, else a description of the non-finite ones ("holds 3
/// non-finite values, the first NaN at index 7").
pub fn non_finite(data: &[f32]) -> Option<String> {
    let first = data.iter().position(|x| !x.is_finite())?;
    let count = data.iter().filter(|x| !x.is_finite()).count();
    Some(format!(
        "holds {count} non-finite value{}, the first {} at index {first}",
        if count == 1 { "" } else { "s" },
        data[first]
    ))
}

/// File name of the checkpoint at `step`.
pub fn file_name(step: u64) -> String {
    format!("ckpt_{step:08}.safetensors")
}

/// Write atomically into `dir` and keep the newest `keep` checkpoints. Returns the path.
pub fn save(dir: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create checkpoint dir {}", dir.display()))?;
    let path = dir.join(file_name(ckpt.step));
    write_file(&path, ckpt)?;
    rotate(dir, ckpt.step, keep)?;
    Ok(path)
}

/// Write `ckpt` as one safetensors file at `path`, atomically: a temp file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub fn write_file(path: &Path, ckpt: &Checkpoint) -> Result<()> {
    let bytes: Vec<Vec<u8>> = ckpt
        .tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = ckpt
        .tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            Ok((
                t.name.clone(),
                TensorView::new(Dtype::F32, t.shape.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta: HashMap<String, String> = [
        ("format".to_string(), FORMAT.to_string()),
        ("step".to_string(), ckpt.step.to_string()),
        ("data_position".to_string(), ckpt.data_position.to_string()),
        ("seed".to_string(), ckpt.seed.to_string()),
        ("model_config".to_string(), ckpt.model_config.clone()),
    ]
    .into_iter()
    .chain(
        ckpt.tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| (checksum_key(&t.name), format!("{:08x}", crc32(b)))),
    )
    .collect();
    let data = safetensors::serialize(views, &Some(meta))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("checkpoint path {} names no file", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename into {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// One checkpoint of a run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    step: u64,
    path: PathBuf,
    /// A single file, or a sharded directory with its commit marker.
    complete: bool,
}

/// Every checkpoint in `dir` (files, sharded directories committed or not), oldest first.
fn entries(dir: &Path) -> Result<Vec<Entry>> {
    let mut v = Vec::new();
    if !dir.exists() {
        return Ok(v);
    }
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(rest) = name.strip_prefix("ckpt_") else {
            continue;
        };
        if let Some(step) = rest.strip_suffix(".safetensors") {
            if let Ok(step) = step.parse() {
                v.push(Entry {
                    step,
                    path: p,
                    complete: true,
                });
            }
        } else if p.is_dir() {
            if let Ok(step) = rest.parse() {
                let complete = p.join(sharded::COMMIT).exists();
                v.push(Entry {
                    step,
                    path: p,
                    complete,
                });
            }
        }
    }
    v.sort_by(|a, b| (a.step, &a.path).cmp(&(b.step, &b.path)));
    Ok(v)
}

/// After saving `step`: keep the newest `keep` complete checkpoints, and remove unfinished
/// sharded saves older than `step` (a process killed while saving).
pub(crate) fn rotate(dir: &Path, step: u64, keep: usize) -> Result<()> {
    let remove = |p: &Path| -> Result<()> {
        if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        }
        .with_context(|| format!("cannot remove old checkpoint {}", p.display()))
    };
    let all = entries(dir)?;
    for e in all.iter().filter(|e| !e.complete && e.step < step) {
        remove(&e.path)?;
    }
    let complete: Vec<&Entry> = all.iter().filter(|e| e.complete).collect();
    let extra = complete.len().saturating_sub(keep.max(1));
    for e in &complete[..extra] {
        remove(&e.path)?;
    }
    Ok(())
}

/// Complete checkpoints in `dir` (files, and sharded directories with their commit marker),
/// oldest first, as (step, path).
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    Ok(entries(dir)?
        .into_iter()
        .filter(|e| e.complete)
        .map(|e| (e.step, e.path))
        .collect())
}

/// The newest checkpoint in `dir`, finished or not (a fresh run refuses a directory with one).
pub fn newest_any(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(entries(dir)?.pop().map(|e| e.path))
}

/// The newest complete checkpoint in `dir`, if any; `dir` itself when it is a sharded
/// checkpoint.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    if sharded::is_sharded(dir) {
        return Ok(Some(dir.to_path_buf()));
    }
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// The checkpoint `path` names: a file or a sharded directory itself, else the newest complete
/// checkpoint of the run directory `path` (an error when it holds none).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        latest(path)?.with_context(|| format!("no checkpoint in {}", path.display()))
    } else {
        Ok(path.to_path_buf())
    }
}

/// [`resolve`] then [`load`], for `eval` and `generate`: where `arg` is a run directory whose
/// newest checkpoint is corrupt, the error names the run's previous checkpoint to pass instead.
pub fn load_resolved(
    arg: &Path,
    expect_model_config: Option<&str>,
) -> Result<(PathBuf, Checkpoint)> {
    let path = resolve(arg)?;
    match load(&path, expect_model_config) {
        Ok(ck) => Ok((path, ck)),
        Err(e) if e.downcast_ref::<Corrupt>().is_some() && path != arg => {
            let older = list(arg)?
                .into_iter()
                .rev()
                .find(|(_, p)| *p != path)
                .map(|(_, p)| p);
            Err(match older {
                Some(p) => anyhow::anyhow!(
                    "{e:#}; the run's previous checkpoint is {0}: pass it with --checkpoint {0} \
                     (`rattn train --resume` moves the corrupt one aside)",
                    p.display()
                ),
                None => e,
            })
        }
        Err(e) => Err(e),
    }
}

/// A checkpoint file that cannot be read back (truncated, not safetensors, missing metadata).
#[derive(Debug)]
pub struct Corrupt {
    /// The file.
    pub path: PathBuf,
    /// What was wrong.
    pub reason: String,
}

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint {} is truncated or corrupt ({}); nothing was loaded",
            self.path.display(),
            self.reason
        )
    }
}

impl std::error::Error for Corrupt {}

/// A checkpoint opened for restoring: a single file read whole, or a sharded directory whose
/// pieces are read on demand.
pub enum Stored {
    /// A single-file checkpoint.
    Whole(Checkpoint),
    /// A sharded checkpoint.
    Sharded(sharded::ShardedCheckpoint),
}

impl Stored {
    /// Step, data position, seed and `[model]` table.
    pub fn meta(&self) -> CheckpointMeta {
        match self {
            Stored::Whole(c) => CheckpointMeta {
                step: c.step,
                data_position: c.data_position,
                seed: c.seed,
                model_config: c.model_config.clone(),
            },
            Stored::Sharded(s) => s.meta.clone(),
        }
    }

    /// Open the checkpoint at `path` (a file or a sharded directory), refusing one of another
    /// `[model]` table when `expect_model_config` is given. One of the same model in the other
    /// `model.scan_layers` layout is read whole and converted ([`layout::convert`]), saying so.
    pub fn open(path: &Path, expect_model_config: Option<&str>) -> Result<Stored> {
        if path.is_dir() {
            let s = sharded::ShardedCheckpoint::open(path)?;
            if let Some(expect) = expect_model_config {
                if let layout::ConfigMatch::OtherLayout { target } =
                    layout::compare(path, &s.meta.model_config, expect)?
                {
                    return Ok(Stored::Whole(to_layout(whole(&s)?, &target, path)?));
                }
            }
            Ok(Stored::Sharded(s))
        } else {
            Ok(Stored::Whole(load(path, expect_model_config)?))
        }
    }

    /// The block of tensor `name` at `offset` with `shape`: one device's piece on the mesh being
    /// restored onto (whatever mesh the checkpoint was saved from), or the whole tensor.
    pub fn read_block(&self, name: &str, offset: &[usize], shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            Stored::Sharded(s) => s.read_block(name, offset, shape),
            Stored::Whole(c) => {
                let t = c
                    .tensors
                    .iter()
                    .find(|t| t.name == name)
                    .with_context(|| lacks(name))?;
                if t.data.len() != t.shape.iter().product::<usize>() {
                    bail!(
                        "checkpoint tensor {name} has {} values for shape {:?}",
                        t.data.len(),
                        t.shape
                    );
                }
                sharded::check_block(name, &t.shape, offset, shape)?;
                let mut out = vec![0f32; shape.iter().product()];
                sharded::copy_box(
                    &t.data,
                    &t.shape,
                    &vec![0; t.shape.len()],
                    &mut out,
                    shape,
                    offset,
                );
                Ok(out)
            }
        }
    }

    /// The names of its tensors.
    pub fn names(&self) -> Vec<String> {
        match self {
            Stored::Sharded(s) => s.tensors.keys().cloned().collect(),
            Stored::Whole(c) => c.tensors.iter().map(|t| t.name.clone()).collect(),
        }
    }

    /// The global shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Stored::Sharded(s) => s.tensors.get(name).map(|t| t.shape.clone()),
            Stored::Whole(c) => c
                .tensors
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.shape.clone()),
        }
    }
}

/// "checkpoint lacks NAME", with a hint when NAME is a layer parameter of one layout
/// (`model.scan_layers`: stacked `scan.{j}.*` or per-layer `layers.{i}.*`; `rattn convert`
/// moves a checkpoint between them).
pub fn lacks(name: &str) -> String {
    let layer = |p: &str| name.contains(&format!(".{p}.")) || name.starts_with(&format!("{p}."));
    if layer("scan") || layer("layers") {
        format!(
            "checkpoint lacks {name}: was it written with the other model.scan_layers setting? \
             (stacked parameters are scan.{{j}}.*, per-layer ones layers.{{i}}.*; `rattn convert` \
             writes a checkpoint in the other layout)"
        )
    } else {
        format!("checkpoint lacks {name}")
    }
}

/// `ck` converted into `target`'s parameter layout, saying so on stderr.
fn to_layout(ck: Checkpoint, target: &model::ModelConfig, path: &Path) -> Result<Checkpoint> {
    let (ck, line) = layout::convert(ck, target, path)?;
    eprintln!("{line}");
    Ok(ck)
}

/// The newest checkpoint in `dir` that loads, for `--resume`, with what `use_it` made of it
/// (the restored state). A sharded directory without its commit marker (a save that did not
/// finish) is skipped, saying so; a corrupt newer one (a crash during a copy, a full disk, bytes
/// whose checksum fails, in the header [`Stored::open`] reads or in the tensors `use_it` reads)
/// is moved aside to `<name>.corrupt`, kept for inspection and out of the rotation, and the next
/// older one is tried, saying so on stderr. Any other error (a checkpoint of another model
/// configuration) stops the search.
pub fn load_newest_usable<T>(
    dir: &Path,
    model_config: &str,
    mut use_it: impl FnMut(&Path, &Stored) -> Result<T>,
) -> Result<Option<(PathBuf, Stored, T)>> {
    let mut all = entries(dir)?;
    while let Some(Entry { path, complete, .. }) = all.pop() {
        if !complete {
            eprintln!(
                "warning: {}; skipping it and trying the previous checkpoint",
                sharded::Uncommitted { path }
            );
            continue;
        }
        let opened = Stored::open(&path, Some(model_config))
            .and_then(|ck| use_it(&path, &ck).map(|t| (ck, t)));
        match opened {
            Ok((ck, t)) => return Ok(Some((path, ck, t))),
            Err(e) => {
                let Some(c) = e.downcast_ref::<Corrupt>() else {
                    return Err(e);
                };
                let aside = PathBuf::from(format!("{}.corrupt", path.display()));
                std::fs::rename(&path, &aside)
                    .with_context(|| format!("{c}; cannot move it aside to {}", aside.display()))?;
                eprintln!(
                    "warning: {c}; moved it to {} and trying the previous checkpoint",
                    aside.display()
                );
            }
        }
    }
    Ok(None)
}

/// Load and check a checkpoint (a file, or a sharded directory assembled whole).
/// `expect_model_config`: the current `[model]` TOML; a mismatch is refused, except one in
/// `model.scan_layers` alone: then the tensors are converted into the current layout
/// ([`layout::convert`]), saying so on stderr.
pub fn load(path: &Path, expect_model_config: Option<&str>) -> Result<Checkpoint> {
    let (ck, found) = if path.is_dir() {
        let s = sharded::ShardedCheckpoint::open(path)?;
        let found = compare(path, &s.meta.model_config, expect_model_config)?;
        (whole(&s)?, found)
    } else {
        read_file(path, expect_model_config)?
    };
    match found {
        layout::ConfigMatch::Same => Ok(ck),
        layout::ConfigMatch::OtherLayout { target } => to_layout(ck, &target, path),
    }
}

/// [`layout::compare`] when a `[model]` table is expected; `Same` when none is.
fn compare(path: &Path, stored: &str, expect: Option<&str>) -> Result<layout::ConfigMatch> {
    match expect {
        Some(expect) => layout::compare(path, stored, expect),
        None => Ok(layout::ConfigMatch::Same),
    }
}

/// Read a single-file checkpoint, comparing its `[model]` table with `expect_model_config`
/// before its tensors are read.
fn read_file(
    path: &Path,
    expect_model_config: Option<&str>,
) -> Result<(Checkpoint, layout::ConfigMatch)> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let corrupt = |e: &dyn std::fmt::Display| {
        anyhow::Error::new(Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(&e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&e))?;
    let md = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        md.get(k)
            .cloned()
            .ok_or_else(|| corrupt(&format!("metadata key {k:?} missing")))
    };
    if get("format")? != FORMAT {
        bail!("{} is not a rattention checkpoint", path.display());
    }
    let model_config = get("model_config")?;
    let found = compare(path, &model_config, expect_model_config)?;
    let num = |k: &str| -> Result<u64> { get(k)?.parse().map_err(|e| corrupt(&e)) };
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = st.tensor(&name).map_err(|e| corrupt(&e))?;
        if t.dtype() != Dtype::F32 {
            return Err(corrupt(&format!(
                "tensor {name} is {:?}, expected F32",
                t.dtype()
            )));
        }
        if let Some(hex) = md.get(&checksum_key(&name)) {
            let stored = u32::from_str_radix(hex, 16)
                .map_err(|e| corrupt(&format!("checksum of {name} {hex:?}: {e}")))?;
            if let Some(m) = checksum_mismatch(&name, stored, t.data()) {
                return Err(corrupt(&m));
            }
        }
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push(NamedTensor {
            name,
            shape: t.shape().to_vec(),
            data,
        });
    }
    let ck = Checkpoint {
        step: num("step")?,
        data_position: num("data_position")?,
        seed: num("seed")?,
        model_config,
        tensors,
    };
    Ok((ck, found))
}

/// The checkpoint `stored` whole on the host (a sharded one assembled, see [`whole`]).
pub(crate) fn whole_of(stored: Stored) -> Result<Checkpoint> {
    match stored {
        Stored::Whole(c) => Ok(c),
        Stored::Sharded(s) => whole(&s),
    }
}

/// A sharded checkpoint assembled whole on the host (every tensor, names sorted): for `eval`,
/// `generate` and `convert`, which run on one device.
fn whole(s: &sharded::ShardedCheckpoint) -> Result<Checkpoint> {
    let tensors = s
        .tensors
        .iter()
        .map(|(name, t)| {
            Ok(NamedTensor {
                name: name.clone(),
                shape: t.shape.clone(),
                data: s.read_block(name, &vec![0; t.shape.len()], &t.shape)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Checkpoint {
        step: s.meta.step,
        data_position: s.meta.data_position,
        seed: s.meta.seed,
        model_config: s.meta.model_config.clone(),
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ck(step: u64) -> Checkpoint {
        Checkpoint {
            step,
            data_position: step * 8,
            seed: 5,
            model_config: "d_model = 4".into(),
            tensors: vec![
                NamedTensor {
                    name: "params.w".into(),
                    shape: vec![2, 2],
                    data: vec![1.0, -2.5, 3.0, f32::MIN_POSITIVE],
                },
                NamedTensor {
                    name: "adam_m.w".into(),
                    shape: vec![2, 2],
                    data: vec![0.1; 4],
                },
            ],
        }
    }

    #[test]
    fn round_trip_keep_last_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        for s in 1..=5 {
            save(dir.path(), &ck(s), 2).unwrap();
        }
        let l = list(dir.path()).unwrap();
        assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 5]);
        let back = load(&l[1].1, Some("d_model = 4")).unwrap();
        let mut want = ck(5);
        want.tensors.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back, want);
        let e = load(&l[1].1, Some("d_model = 8")).unwrap_err().to_string();
        assert!(e.contains("another model configuration"), "{e}");
        // Truncate a copy: refused, and the original is untouched.
        let bytes = std::fs::read(&l[1].1).unwrap();
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, &bytes[..bytes.len() - 3]).unwrap();
        let e = load(&bad, None).unwrap_err().to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
        assert!(load(&l[1].1, None).is_ok());
    }
}
