//! Sharded checkpoints: every process writes the pieces its devices hold, nothing is gathered.
//!
//! A checkpoint is a directory `ckpt_<step>/`:
//!
//! ```text
//! ckpt_00000020/
//!   shard_00000.safetensors   the pieces partition 0 owns (one safetensors tensor per state tensor)
//!   shard_00001.safetensors   …
//!   index_00000.json          process 0's index: every tensor's global shape, dtype, and where
//!                             each of its pieces lies (file, offset, shape); the mesh; step, data
//!                             position, seed and [model] table
//!   COMMITTED                 written last, by process 0, once every process wrote its index
//! ```
//!
//! A piece is written once, by the lowest partition that holds it (replicated tensors by one
//! partition, not by every device). Every file is written to a temporary name, synced and
//! renamed, and the commit marker comes last, so a process killed during a save leaves a
//! directory without `COMMITTED`, which loading skips (saying so) in favour of the previous
//! checkpoint.
//!
//! Loading onto any mesh ([`ShardedCheckpoint::read_block`]) assembles a device's block from the
//! stored pieces that overlap it, reading only those pieces' bytes from their files; nothing
//! larger than one stored piece plus the block being assembled is in memory at a time.

use super::{CheckpointMeta, Corrupt};
use anyhow::{bail, Context, Result};
use hlo_builder::Sharding;
use model::sharding::{MeshAxis, MeshConfig};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `format` of a sharded checkpoint's index files and commit marker.
pub const INDEX_FORMAT: &str = "rattention-sharded-checkpoint-v1";
/// The commit marker's file name.
pub const COMMIT: &str = "COMMITTED";
/// Test hook: milliseconds to sleep after each shard file is written (lets a test kill a
/// process in the middle of a save). Unset in normal runs.
pub const SHARD_DELAY_ENV: &str = "RATTN_TEST_CKPT_SHARD_DELAY_MS";

/// Name of the directory of the sharded checkpoint at `step`.
pub fn dir_name(step: u64) -> String {
    format!("ckpt_{step:08}")
}

fn shard_file(partition: usize) -> String {
    format!("shard_{partition:05}.safetensors")
}

fn index_file(process: usize) -> String {
    format!("index_{process:05}.json")
}

/// How one tensor of the state is laid out across the partitions of the mesh it is saved from.
#[derive(Debug, Clone)]
pub struct TensorLayout {
    /// Checkpoint name (`params.…`, `adam_m.…`, `adam_v.…`).
    pub name: String,
    /// Global shape.
    pub shape: Vec<usize>,
    /// Its sharding over partitions `0..partitions`.
    pub sharding: Sharding,
}

/// Waits until every process reached the point its argument names.
pub type Barrier<'a> = &'a (dyn Fn(&str) -> Result<()> + Sync);

/// Which part of the mesh this process writes, and how it waits for the others.
pub struct Writer<'a> {
    /// Partitions of the mesh (devices of the program).
    pub partitions: usize,
    /// The partitions whose devices this process holds.
    pub local: &'a [usize],
    /// This process's index and the number of processes.
    pub process: (usize, usize),
    /// Waits until every process reached the point named by the argument (multi-process only;
    /// `None` with one process).
    pub barrier: Option<Barrier<'a>>,
    /// The mesh, recorded in the index: as text for people (`8 devices = data 2 × …`), and as
    /// its `[mesh]` table (sizes and rules) for `rattn convert`, which keeps it by default.
    pub mesh: &'a model::Mesh,
}

/// Where one stored piece of a tensor lies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceEntry {
    /// The shard file holding it.
    pub file: String,
    /// The partition it was saved from.
    pub partition: usize,
    /// Offset of the piece in the global tensor, per dim.
    pub offset: Vec<usize>,
    /// Shape of the piece.
    pub shape: Vec<usize>,
    /// CRC-32 of the piece's little-endian bytes, checked whenever the whole piece is read
    /// (absent in checkpoints written before checksums existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

/// One tensor in an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Global shape.
    pub shape: Vec<usize>,
    /// Element type (`F32`).
    pub dtype: String,
    /// Its pieces; together they cover the tensor exactly once.
    pub pieces: Vec<PieceEntry>,
}

/// A process's index file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    /// [`INDEX_FORMAT`].
    pub format: String,
    /// The process that wrote it, and the process count.
    pub process: usize,
    /// Processes that wrote the checkpoint.
    pub process_count: usize,
    /// Partitions (devices) of the mesh it was saved from.
    pub partitions: usize,
    /// The mesh it was saved from.
    pub mesh: String,
    /// The same mesh as a `[mesh]` table (sizes and logical-axis rules); absent in indexes
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_config: Option<MeshConfig>,
    /// Step, data position, seed, [model] table.
    pub step: u64,
    /// Next data index.
    pub data_position: u64,
    /// Seed of the run.
    pub seed: u64,
    /// The `[model]` table as TOML.
    pub model_config: String,
    /// Size in bytes of each shard file this process wrote.
    pub files: BTreeMap<String, u64>,
    /// The pieces this process wrote, by tensor name.
    pub tensors: BTreeMap<String, TensorEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Commit {
    format: String,
    step: u64,
    indexes: Vec<String>,
}

/// The partition that writes the piece partition `p` holds: the lowest partition holding the
/// same tile (replicas are written once).
fn owner(sharding: &Sharding, shape: &[usize], p: usize, partitions: usize) -> Result<usize> {
    let mine = sharding.tile_offset(p as i64, shape)?;
    for q in 0..p {
        if sharding.tile_offset(q as i64, shape)? == mine {
            return Ok(q);
        }
    }
    debug_assert!(p < partitions);
    Ok(p)
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, synced, renamed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .context("a checkpoint file needs a directory")?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("checkpoint file name")?;
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename into {}", path.display()))?;
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The `[mesh]` table of `mesh` (its sizes, rules, `seq_global` and `shard_optimizer`).
pub fn mesh_config(mesh: &model::Mesh) -> MeshConfig {
    MeshConfig {
        data: mesh.size(MeshAxis::Data) as i64,
        fsdp: mesh.size(MeshAxis::Fsdp) as i64,
        tensor: mesh.size(MeshAxis::Tensor) as i64,
        seq: mesh.size(MeshAxis::Seq) as i64,
        seq_global: mesh.seq_global(),
        shard_optimizer: mesh.shard_optimizer(),
        rules: mesh.rules().clone(),
    }
}

/// Save a sharded checkpoint of `tensors` into `run_dir/ckpt_<step>/`. `piece(t, p)` returns
/// partition `p`'s piece of tensor `t` (row-major, the sharding's shard shape); it is called only
/// for this process's partitions, and only for the pieces they own. Returns the directory.
///
/// Process 0 writes the commit marker after every process wrote its index ([`Writer::barrier`]),
/// then keeps the newest `keep` checkpoints and removes unfinished saves older than this one.
pub fn save(
    run_dir: &Path,
    meta: &CheckpointMeta,
    tensors: &[TensorLayout],
    writer: &Writer<'_>,
    keep: usize,
    piece: impl FnMut(usize, usize) -> Result<Vec<f32>>,
) -> Result<PathBuf> {
    let dir = run_dir.join(dir_name(meta.step));
    let rotate = || super::rotate(run_dir, meta.step, keep);
    write_dir(&dir, meta, tensors, writer, Start::Replace, piece, rotate)?;
    Ok(dir)
}

/// Write a sharded checkpoint of `tensors` into the new directory `dir` (its parent is created
/// if needed), like [`save`] but never over anything: when `dir` exists already this is an error
/// naming it, and nothing is written. No other checkpoint is touched (no rotation). For
/// `rattn convert`.
pub fn write_new(
    dir: &Path,
    meta: &CheckpointMeta,
    tensors: &[TensorLayout],
    writer: &Writer<'_>,
    piece: impl FnMut(usize, usize) -> Result<Vec<f32>>,
) -> Result<()> {
    write_dir(dir, meta, tensors, writer, Start::New, piece, || Ok(()))
}

/// What [`write_dir`] does with a directory already at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Remove it: an unfinished save, or an older run's save of the step being re-saved.
    Replace,
    /// Refuse to write.
    New,
}

/// The format's one writer: shard files, this process's index, then (process 0, once every
/// process wrote its index) the commit marker and `after_commit`.
fn write_dir(
    dir: &Path,
    meta: &CheckpointMeta,
    tensors: &[TensorLayout],
    writer: &Writer<'_>,
    start: Start,
    mut piece: impl FnMut(usize, usize) -> Result<Vec<f32>>,
    after_commit: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let parent = match dir.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (process, process_count) = writer.process;
    let barrier = |what: &str| -> Result<()> {
        match writer.barrier {
            Some(b) => b(&format!("ckpt/{}/{what}", meta.step)),
            None => Ok(()),
        }
    };
    if process == 0 {
        // A directory of this step already there is an unfinished save (a process killed while
        // saving) or an older run's save of the step being re-saved: start it afresh, so no file
        // of another mesh stays beside the new ones.
        if start == Start::Replace && dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove the old {}", dir.display()))?;
        }
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory {}", parent.display()))?;
        // `create_dir` (not `_all`) fails on an existing directory: nothing is written over.
        if let Err(e) = std::fs::create_dir(dir) {
            if e.kind() == std::io::ErrorKind::AlreadyExists && start == Start::New {
                bail!(
                    "{} exists; refusing to overwrite it (name another output)",
                    dir.display()
                );
            }
            return Err(e)
                .with_context(|| format!("cannot create checkpoint dir {}", dir.display()));
        }
        sync_dir(parent);
    }
    barrier("begin")?;
    let delay = std::env::var(SHARD_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let mut index = Index {
        format: INDEX_FORMAT.to_string(),
        process,
        process_count,
        partitions: writer.partitions,
        mesh: writer.mesh.to_string(),
        mesh_config: Some(mesh_config(writer.mesh)),
        step: meta.step,
        data_position: meta.data_position,
        seed: meta.seed,
        model_config: meta.model_config.clone(),
        files: BTreeMap::new(),
        tensors: BTreeMap::new(),
    };
    for t in tensors {
        index.tensors.insert(
            t.name.clone(),
            TensorEntry {
                shape: t.shape.clone(),
                dtype: "F32".into(),
                pieces: Vec::new(),
            },
        );
    }
    for &p in writer.local {
        let file = shard_file(p);
        let mut names = Vec::new();
        let mut datas = Vec::new();
        let mut shapes = Vec::new();
        for (ti, t) in tensors.iter().enumerate() {
            if owner(&t.sharding, &t.shape, p, writer.partitions)? != p {
                continue;
            }
            let offset = t
                .sharding
                .tile_offset(p as i64, &t.shape)?
                .with_context(|| format!("partition {p} holds no piece of {}", t.name))?;
            let shape = t.sharding.shard_dims(&t.shape)?;
            let data =
                piece(ti, p).with_context(|| format!("reading {} from partition {p}", t.name))?;
            if data.len() != shape.iter().product::<usize>() {
                bail!(
                    "partition {p}'s piece of {} has {} values, its shape {shape:?} needs {}",
                    t.name,
                    data.len(),
                    shape.iter().product::<usize>()
                );
            }
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            index
                .tensors
                .get_mut(&t.name)
                .expect("inserted above")
                .pieces
                .push(PieceEntry {
                    file: file.clone(),
                    partition: p,
                    offset,
                    shape: shape.clone(),
                    crc32: Some(super::crc32(&bytes)),
                });
            names.push(t.name.clone());
            datas.push(bytes);
            shapes.push(shape);
        }
        if names.is_empty() {
            continue;
        }
        let views = names
            .iter()
            .zip(&datas)
            .zip(&shapes)
            .map(|((n, d), s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), d)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let meta_st: HashMap<String, String> = [
            ("format".to_string(), "rattention-shard-v1".to_string()),
            ("step".to_string(), meta.step.to_string()),
            ("partition".to_string(), p.to_string()),
        ]
        .into_iter()
        .collect();
        let bytes = safetensors::serialize(views, &Some(meta_st))?;
        write_atomic(&dir.join(&file), &bytes)?;
        index.files.insert(file, bytes.len() as u64);
        if let Some(ms) = delay {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    write_atomic(
        &dir.join(index_file(process)),
        serde_json::to_string(&index)?.as_bytes(),
    )?;
    barrier("written")?;
    if process == 0 {
        let commit = Commit {
            format: INDEX_FORMAT.to_string(),
            step: meta.step,
            indexes: (0..process_count).map(index_file).collect(),
        };
        write_atomic(
            &dir.join(COMMIT),
            serde_json::to_string(&commit)?.as_bytes(),
        )?;
        after_commit()?;
    }
    barrier("committed")?;
    Ok(())
}

/// Whether `dir` is a sharded checkpoint directory (committed or not).
pub fn is_sharded(dir: &Path) -> bool {
    dir.is_dir() && (dir.join(COMMIT).exists() || dir.join(index_file(0)).exists())
}

/// A checkpoint directory without its commit marker: a save that did not finish.
#[derive(Debug)]
pub struct Uncommitted {
    /// The directory.
    pub path: PathBuf,
}

impl std::fmt::Display for Uncommitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint {} has no commit marker ({COMMIT}): its save did not finish",
            self.path.display()
        )
    }
}

impl std::error::Error for Uncommitted {}

/// Where a shard file's tensors lie: the start of its data and each tensor's byte range.
struct FileHeader {
    data_start: u64,
    tensors: HashMap<String, (Vec<usize>, u64, u64)>,
}

/// An opened sharded checkpoint: its merged index; pieces are read on demand.
pub struct ShardedCheckpoint {
    dir: PathBuf,
    /// Step, data position, seed, [model] table.
    pub meta: CheckpointMeta,
    /// Partitions of the mesh it was saved from.
    pub partitions: usize,
    /// The mesh it was saved from.
    pub mesh: String,
    /// That mesh's `[mesh]` table, when its index records it.
    pub mesh_config: Option<MeshConfig>,
    /// Every tensor, merged over the processes' indexes.
    pub tensors: BTreeMap<String, TensorEntry>,
    headers: Mutex<HashMap<String, std::sync::Arc<FileHeader>>>,
}

impl ShardedCheckpoint {
    /// Open the checkpoint in `dir`: the commit marker must be there ([`Uncommitted`] if not),
    /// every index it names must read, every shard file must have the size its index recorded,
    /// and every tensor's pieces must cover it exactly ([`Corrupt`] if not).
    pub fn open(dir: &Path) -> Result<ShardedCheckpoint> {
        let corrupt = |e: &dyn std::fmt::Display| {
            anyhow::Error::new(Corrupt {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let marker = dir.join(COMMIT);
        if !marker.exists() {
            return Err(anyhow::Error::new(Uncommitted {
                path: dir.to_path_buf(),
            }));
        }
        let commit: Commit = serde_json::from_slice(
            &std::fs::read(&marker).with_context(|| format!("cannot read {}", marker.display()))?,
        )
        .map_err(|e| corrupt(&format!("{COMMIT}: {e}")))?;
        if commit.format != INDEX_FORMAT {
            bail!("{} is not a rattention checkpoint", dir.display());
        }
        let mut merged: Option<ShardedCheckpoint> = None;
        for name in &commit.indexes {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| corrupt(&format!("{name}: {e}")))?;
            let idx: Index =
                serde_json::from_slice(&bytes).map_err(|e| corrupt(&format!("{name}: {e}")))?;
            for (file, &size) in &idx.files {
                let got = std::fs::metadata(dir.join(file))
                    .map_err(|e| corrupt(&format!("{file}: {e}")))?
                    .len();
                if got != size {
                    return Err(corrupt(&format!(
                        "{file} has {got} bytes, its index recorded {size}"
                    )));
                }
            }
            let m = merged.get_or_insert_with(|| ShardedCheckpoint {
                dir: dir.to_path_buf(),
                meta: CheckpointMeta {
                    step: idx.step,
                    data_position: idx.data_position,
                    seed: idx.seed,
                    model_config: idx.model_config.clone(),
                },
                partitions: idx.partitions,
                mesh: idx.mesh.clone(),
                mesh_config: idx.mesh_config.clone(),
                tensors: BTreeMap::new(),
                headers: Mutex::new(HashMap::new()),
            });
            if m.meta.step != idx.step || m.partitions != idx.partitions {
                return Err(corrupt(&format!(
                    "{name} is of step {} on {} partitions, another index of step {} on {}",
                    idx.step, idx.partitions, m.meta.step, m.partitions
                )));
            }
            for (t, e) in idx.tensors {
                match m.tensors.get_mut(&t) {
                    Some(have) => {
                        if have.shape != e.shape {
                            return Err(corrupt(&format!(
                                "{t} has shape {:?} in one index and {:?} in {name}",
                                have.shape, e.shape
                            )));
                        }
                        have.pieces.extend(e.pieces);
                    }
                    None => {
                        m.tensors.insert(t, e);
                    }
                }
            }
        }
        let ck = merged.ok_or_else(|| corrupt(&"the commit marker names no index"))?;
        for (name, t) in &ck.tensors {
            if t.dtype != "F32" {
                return Err(corrupt(&format!("{name} is {}, expected F32", t.dtype)));
            }
            let covered: usize = t
                .pieces
                .iter()
                .map(|p| p.shape.iter().product::<usize>())
                .sum();
            let numel: usize = t.shape.iter().product();
            let inside = t.pieces.iter().all(|p| {
                p.offset.len() == t.shape.len()
                    && p.shape.len() == t.shape.len()
                    && p.offset
                        .iter()
                        .zip(&p.shape)
                        .zip(&t.shape)
                        .all(|((&o, &s), &d)| o + s <= d)
            });
            // Pieces are disjoint tiles of one sharding, so covering the element count exactly
            // while staying inside means covering the tensor.
            if covered != numel || !inside {
                return Err(corrupt(&format!(
                    "the pieces of {name} cover {covered} of its {numel} values"
                )));
            }
            // Every piece is where its index says (reads only the files' headers).
            for p in &t.pieces {
                let h = ck.header(&p.file)?;
                if h.tensors.get(name).map(|e| &e.0) != Some(&p.shape) {
                    return Err(anyhow::Error::new(Corrupt {
                        path: dir.join(&p.file),
                        reason: format!("{name} of shape {:?} is not there", p.shape),
                    }));
                }
            }
        }
        Ok(ck)
    }

    fn header(&self, file: &str) -> Result<std::sync::Arc<FileHeader>> {
        if let Some(h) = self.headers.lock().expect("header cache").get(file) {
            return Ok(h.clone());
        }
        let path = self.dir.join(file);
        let corrupt = |e: &dyn std::fmt::Display| {
            anyhow::Error::new(Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })
        };
        let mut f = std::fs::File::open(&path).map_err(|e| corrupt(&e))?;
        let len = f.metadata()?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| corrupt(&e))?;
        let n = u64::from_le_bytes(n);
        if n > len.saturating_sub(8) || n > 100 << 20 {
            return Err(corrupt(&format!("header of {n} bytes in a file of {len}")));
        }
        let mut text = vec![0u8; n as usize];
        f.read_exact(&mut text).map_err(|e| corrupt(&e))?;
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| corrupt(&e))?;
        let obj = v
            .as_object()
            .ok_or_else(|| corrupt(&"header is not an object"))?;
        let data_start = 8 + n;
        let mut tensors = HashMap::new();
        for (name, e) in obj {
            if name == "__metadata__" {
                continue;
            }
            let bad = || corrupt(&format!("header entry of {name}"));
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(bad)?;
            let off = e["data_offsets"].as_array().ok_or_else(bad)?;
            let (b, en) = (
                off.first().and_then(|x| x.as_u64()).ok_or_else(bad)?,
                off.get(1).and_then(|x| x.as_u64()).ok_or_else(bad)?,
            );
            if e["dtype"].as_str() != Some("F32")
                || en < b
                || data_start + en > len
                || (en - b) != 4 * shape.iter().product::<usize>() as u64
            {
                return Err(bad());
            }
            tensors.insert(name.clone(), (shape, b, en));
        }
        let h = std::sync::Arc::new(FileHeader {
            data_start,
            tensors,
        });
        self.headers
            .lock()
            .expect("header cache")
            .insert(file.to_string(), h.clone());
        Ok(h)
    }

    /// Read rows `rows` (of its first dim; all of a scalar) of one stored piece of `name`: a
    /// contiguous range of its bytes, so a block of a few rows of a stacked tensor (one layer
    /// of `scan.{j}.*`) reads only those.
    fn read_piece(
        &self,
        name: &str,
        piece: &PieceEntry,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let h = self.header(&piece.file)?;
        let path = self.dir.join(&piece.file);
        let (shape, b, e) = h.tensors.get(name).ok_or_else(|| {
            anyhow::Error::new(Corrupt {
                path: path.clone(),
                reason: format!("{name} is not in the file its index names"),
            })
        })?;
        if *shape != piece.shape {
            return Err(anyhow::Error::new(Corrupt {
                path,
                reason: format!(
                    "{name} has shape {shape:?} there, its index says {:?}",
                    piece.shape
                ),
            }));
        }
        let row_bytes = 4 * piece.shape.iter().skip(1).product::<usize>() as u64;
        let (first, len) = match piece.shape.first() {
            Some(_) => (rows.start as u64 * row_bytes, rows.len() as u64 * row_bytes),
            None => (0, e - b),
        };
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(h.data_start + b + first))?;
        let mut bytes = vec![0u8; len as usize];
        f.read_exact(&mut bytes)
            .with_context(|| format!("reading {name} from {}", path.display()))?;
        let whole = len == e - b;
        if let (true, Some(stored)) = (whole, piece.crc32) {
            if let Some(reason) = super::checksum_mismatch(name, stored, &bytes) {
                return Err(anyhow::Error::new(Corrupt { path, reason }));
            }
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The block of tensor `name` at `offset` with `shape` (any block: a device's piece under
    /// another mesh, or the whole tensor), assembled from the stored pieces that overlap it.
    pub fn read_block(&self, name: &str, offset: &[usize], shape: &[usize]) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("checkpoint {} lacks {name}", self.dir.display()))?;
        check_block(name, &t.shape, offset, shape)?;
        let mut out = vec![0f32; shape.iter().product()];
        for p in &t.pieces {
            if !overlaps(&p.offset, &p.shape, offset, shape) {
                continue;
            }
            // Only the rows of the piece the block needs.
            let (mut sub_off, mut sub_shape) = (p.offset.clone(), p.shape.clone());
            let rows = match (p.offset.first(), p.shape.first()) {
                (Some(&po), Some(&ps)) => {
                    let lo = po.max(offset[0]);
                    let hi = (po + ps).min(offset[0] + shape[0]);
                    sub_off[0] = lo;
                    sub_shape[0] = hi - lo;
                    lo - po..hi - po
                }
                _ => 0..1,
            };
            let data = self.read_piece(name, p, rows)?;
            copy_box(&data, &sub_shape, &sub_off, &mut out, shape, offset);
        }
        Ok(out)
    }
}

/// Refuse a block that does not fit inside a tensor of `dims`.
pub(crate) fn check_block(
    name: &str,
    dims: &[usize],
    offset: &[usize],
    shape: &[usize],
) -> Result<()> {
    if offset.len() != dims.len()
        || shape.len() != dims.len()
        || offset
            .iter()
            .zip(shape)
            .zip(dims)
            .any(|((&o, &s), &d)| o + s > d)
    {
        bail!("block at {offset:?} of shape {shape:?} does not fit {name} of shape {dims:?}");
    }
    Ok(())
}

fn overlaps(a_off: &[usize], a_shape: &[usize], b_off: &[usize], b_shape: &[usize]) -> bool {
    (0..a_off.len()).all(|i| a_off[i] < b_off[i] + b_shape[i] && b_off[i] < a_off[i] + a_shape[i])
}

/// Copy the intersection of the block `src` (shape `src_shape` at global offset `src_off`) into
/// the block `dst` (shape `dst_shape` at `dst_off`); both row-major, the same rank.
pub fn copy_box<T: Copy>(
    src: &[T],
    src_shape: &[usize],
    src_off: &[usize],
    dst: &mut [T],
    dst_shape: &[usize],
    dst_off: &[usize],
) {
    let rank = src_shape.len();
    if rank == 0 {
        dst[0] = src[0];
        return;
    }
    let lo: Vec<usize> = (0..rank).map(|i| src_off[i].max(dst_off[i])).collect();
    let hi: Vec<usize> = (0..rank)
        .map(|i| (src_off[i] + src_shape[i]).min(dst_off[i] + dst_shape[i]))
        .collect();
    if (0..rank).any(|i| lo[i] >= hi[i]) {
        return;
    }
    let strides = |shape: &[usize]| {
        let mut s = vec![1usize; rank];
        for i in (0..rank - 1).rev() {
            s[i] = s[i + 1] * shape[i + 1];
        }
        s
    };
    let (ss, ds) = (strides(src_shape), strides(dst_shape));
    let run = hi[rank - 1] - lo[rank - 1];
    let mut idx = lo.clone();
    loop {
        let si: usize = (0..rank).map(|i| (idx[i] - src_off[i]) * ss[i]).sum();
        let di: usize = (0..rank).map(|i| (idx[i] - dst_off[i]) * ds[i]).sum();
        dst[di..di + run].copy_from_slice(&src[si..si + run]);
        // Next row: advance the dims before the last, row-major.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < hi[d] {
                break;
            }
            idx[d] = lo[d];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive reference: element-by-element with explicit global coordinates.
    fn naive_block(full: &[f32], dims: &[usize], off: &[usize], shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|mut k| {
                let mut g = 0;
                let mut stride = 1;
                let mut coords = vec![0; shape.len()];
                for i in (0..shape.len()).rev() {
                    coords[i] = k % shape[i];
                    k /= shape[i];
                }
                for i in (0..dims.len()).rev() {
                    g += (coords[i] + off[i]) * stride;
                    stride *= dims[i];
                }
                full[g]
            })
            .collect()
    }

    /// A [6, 4] tensor cut 2 × 2 over 4 partitions (tile (i, j) on partition 2i + j) and a
    /// replicated [3] one, saved from host data by one process.
    fn save_step(dir: &Path, step: u64, keep: usize) -> (Vec<f32>, Vec<f32>) {
        let a: Vec<f32> = (0..24).map(|x| x as f32 * 0.5 + step as f32).collect();
        let b = vec![1.5, -2.0, step as f32];
        let layouts = [
            TensorLayout {
                name: "params.a".into(),
                shape: vec![6, 4],
                sharding: Sharding::tiled(&[2, 2]),
            },
            TensorLayout {
                name: "params.b".into(),
                shape: vec![3],
                sharding: Sharding::Replicated,
            },
        ];
        let meta = CheckpointMeta {
            step,
            data_position: 10 * step,
            seed: 1,
            model_config: "d = 1".into(),
        };
        let mesh = MeshConfig {
            fsdp: 4,
            ..MeshConfig::default()
        }
        .resolve(4)
        .unwrap();
        let writer = Writer {
            partitions: 4,
            local: &[0, 1, 2, 3],
            process: (0, 1),
            barrier: None,
            mesh: &mesh,
        };
        let (a2, b2) = (a.clone(), b.clone());
        save(dir, &meta, &layouts, &writer, keep, |t, p| {
            Ok(if t == 0 {
                // Partition p's tile: rows 3(p/2).., cols 2(p%2)..
                let (r0, c0) = (3 * (p / 2), 2 * (p % 2));
                (0..3)
                    .flat_map(|r| (0..2).map(move |c| (r, c)))
                    .map(|(r, c)| a2[(r0 + r) * 4 + c0 + c])
                    .collect()
            } else {
                assert_eq!(p, 0, "a replicated tensor is written by partition 0 only");
                b2.clone()
            })
        })
        .unwrap();
        (a, b)
    }

    #[test]
    fn sharded_save_keeps_the_last_k_and_reads_any_block() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for step in 1..=3 {
            save_step(dir, step, 2);
        }
        // An unfinished save older than the next one is removed by it.
        std::fs::create_dir_all(dir.join("ckpt_00000004")).unwrap();
        std::fs::write(
            dir.join("ckpt_00000004/shard_00000.safetensors"),
            b"partial",
        )
        .unwrap();
        let (a, b) = save_step(dir, 5, 2);
        let names: Vec<String> = super::super::list(dir)
            .unwrap()
            .iter()
            .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["ckpt_00000003", "ckpt_00000005"]);
        assert!(!dir.join("ckpt_00000004").exists());
        let ck = ShardedCheckpoint::open(&dir.join("ckpt_00000005")).unwrap();
        assert_eq!(ck.meta.data_position, 50);
        // Blocks of another layout: rows 1..5 × cols 1..4 (crosses all four tiles), the whole.
        let block = ck.read_block("params.a", &[1, 1], &[4, 3]).unwrap();
        let want: Vec<f32> = (1..5)
            .flat_map(|r| (1..4).map(move |c| (r, c)))
            .map(|(r, c)| a[r * 4 + c])
            .collect();
        assert_eq!(block, want);
        assert_eq!(ck.read_block("params.a", &[0, 0], &[6, 4]).unwrap(), a);
        assert_eq!(ck.read_block("params.b", &[0], &[3]).unwrap(), b);
        let e = ck
            .read_block("params.a", &[4, 0], &[3, 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit params.a"), "{e}");
        // A shard file gone: the checkpoint is corrupt, named.
        std::fs::remove_file(dir.join("ckpt_00000005/shard_00003.safetensors")).unwrap();
        let e = ShardedCheckpoint::open(&dir.join("ckpt_00000005"))
            .err()
            .unwrap();
        assert!(e.downcast_ref::<Corrupt>().is_some(), "{e}");
        assert!(e.to_string().contains("shard_00003.safetensors"), "{e}");
        // No commit marker: skipped as unfinished.
        std::fs::remove_file(dir.join("ckpt_00000003").join(COMMIT)).unwrap();
        let e = ShardedCheckpoint::open(&dir.join("ckpt_00000003"))
            .err()
            .unwrap();
        assert!(e.downcast_ref::<Uncommitted>().is_some(), "{e}");
    }

    #[test]
    fn a_changed_byte_in_a_piece_fails_its_checksum_when_the_piece_is_read_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, _) = save_step(tmp.path(), 1, 1);
        let ckdir = tmp.path().join("ckpt_00000001");
        // Partition 3's tile of params.a (rows 3..6, cols 2..4) holds a[23] as its last value:
        // change that value's bytes in place (the file stays well-formed).
        let file = ckdir.join("shard_00003.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let last = a[23].to_le_bytes();
        let at = bytes
            .windows(4)
            .rposition(|w| w == last)
            .expect("the value's bytes");
        bytes[at..at + 4].copy_from_slice(&7.25f32.to_le_bytes());
        std::fs::write(&file, bytes).unwrap();
        let ck = ShardedCheckpoint::open(&ckdir).unwrap();
        let e = ck.read_block("params.a", &[0, 0], &[6, 4]).unwrap_err();
        let c = e.downcast_ref::<Corrupt>().expect("a Corrupt error");
        assert!(c.reason.contains("params.a: its bytes have CRC-32"), "{c}");
        // A block that reads only rows of other pieces is not affected.
        assert_eq!(
            ck.read_block("params.a", &[0, 0], &[3, 4]).unwrap(),
            a[..12]
        );
    }

    #[test]
    fn copy_box_copies_the_intersection() {
        let dims = [5, 6, 3];
        let full: Vec<f32> = (0..90).map(|x| x as f32).collect();
        // src = block at [1,2,0] of [3,4,3]; dst = block at [2,0,1] of [3,5,2].
        let src = naive_block(&full, &dims, &[1, 2, 0], &[3, 4, 3]);
        let mut dst = vec![-1.0; 30];
        copy_box(
            &src,
            &[3, 4, 3],
            &[1, 2, 0],
            &mut dst,
            &[3, 5, 2],
            &[2, 0, 1],
        );
        let want = naive_block(&full, &dims, &[2, 0, 1], &[3, 5, 2]);
        for (k, (&g, &w)) in dst.iter().zip(&want).enumerate() {
            let (a, b) = (k / 10 + 2, (k / 2) % 5);
            let inside = (1..4).contains(&a) && (2..6).contains(&b);
            assert_eq!(g, if inside { w } else { -1.0 }, "element {k}");
        }
    }
}
