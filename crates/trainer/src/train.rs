//! The training loop and evaluation.

use crate::checkpoint::{self, Checkpoint, NamedTensor};
use crate::config::RunConfig;
use crate::data::{length_buckets, synth, Source};
use crate::mfu::{self, Utilization};
use crate::runtime::{self, upload_f32};
use crate::spmd::{self, Placement};
use crate::step::{self, StateGroup, StateTensor, StepIo, StepShardings};
use anyhow::{bail, Context, Result};
use hlo_builder::Sharding;
use model::Model;
use pjrt::Buffer;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Loss of every step, in order (steps run in this invocation only).
    pub losses: Vec<f32>,
    /// Path of the last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// The step the run ended at (counted from the start of the run, resumed steps included).
    pub last_step: u64,
    /// Tokens/s over the steps of this invocation (checkpoint writes excluded), model FLOP/s and
    /// MFU against the cached peak; `None` when no step ran.
    pub utilization: Option<Utilization>,
}

/// The `[model]` table as TOML, stored in checkpoints and compared on resume.
pub fn model_toml(cfg: &RunConfig) -> String {
    toml::to_string(&cfg.model).unwrap_or_default()
}

/// The batch of sequences `first_sequence .. first_sequence + B`: tokens as s32 `[B, T+1]` and
/// the loss weight of every target as f32 `[B, T]`.
pub fn batch(src: &Source, cfg: &RunConfig, first_sequence: u64) -> (Vec<i32>, Vec<f32>) {
    let (b, t) = (cfg.train.batch, cfg.model.seq_len);
    let (mut tokens, mut weights) = (Vec::new(), Vec::new());
    for i in 0..b as u64 {
        let s = src.sequence(first_sequence + i, t);
        tokens.extend(s.tokens.iter().map(|&x| x as i32));
        weights.extend(s.weights);
    }
    (tokens, weights)
}

/// A fresh run must not write into the directory of an earlier one: its checkpoints would sit
/// beside the new run's (and `--resume` would later pick the wrong one) and metrics would mix.
fn refuse_earlier_run(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {} is a file, not a directory", out.display());
    }
    let metrics = out.join("metrics.jsonl");
    if let Some(p) = checkpoint::newest_any(out)? {
        bail!(
            "{} holds an earlier run (newest checkpoint {}); continue it with --resume, or train \
             into a fresh --out directory",
            out.display(),
            p.display()
        );
    }
    // A run that stopped before its first log line (an error in the first steps) leaves an
    // empty metrics file and nothing to resume: the directory is free.
    if std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0) {
        bail!(
            "{} holds the metrics of an earlier run that left no checkpoint ({}); there is \
             nothing to --resume: remove that file, or train into a fresh --out directory",
            out.display(),
            metrics.display()
        );
    }
    Ok(())
}

/// User + system CPU seconds of this process so far, all threads (exited ones included), from
/// `/proc/self/stat` at its 10 ms resolution; NaN where it cannot be read. `compile_cpu_s` in
/// `metrics.jsonl` is the trace + compile's share: on a loaded machine it measures the work where
/// the wall-clock `compile_s` also measures the other jobs.
pub fn process_cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // The fields after the command name (in parentheses); utime and stime are fields 14 and 15
    // of the whole line, so 11 and 12 (0-based) after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// The mesh `rattn train` runs on: `[mesh]` resolved on `devices` devices (default: the product
/// of its sizes; needed when one size is −1).
pub fn train_mesh(cfg: &RunConfig, devices: Option<usize>) -> Result<model::Mesh> {
    let n = match (devices, cfg.mesh.fixed_device_count()?) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => bail!(
            "one [mesh] size is -1 (the rest of the devices): pass --devices N to say how many"
        ),
    };
    Ok(cfg.mesh.resolve(n)?)
}

/// Train per `cfg` on the devices of its `[mesh]` (`devices`: see [`train_mesh`]), writing
/// checkpoints and `metrics.jsonl` into `out`.
///
/// On a mesh of N > 1 devices the step is compiled for XLA's SPMD partitioner and every device
/// holds only its shard of the parameters, both Adam moments and the token batch, between steps
/// too; on the CPU plugin the client is made with N devices. Checkpoints are gathered to the
/// host and saved whole on one device; on a mesh every process writes the pieces its devices
/// hold ([`checkpoint::sharded`]). `--resume` restores onto any mesh: each device's piece is
/// assembled from the stored pieces, and the data position is global, so the batches continue
/// the same whatever the mesh. With several processes ([`crate::distributed`]) each feeds only
/// its addressable devices.
pub fn train(
    cfg: &RunConfig,
    plugin: Option<&str>,
    out: &Path,
    resume: bool,
    quiet: bool,
    devices: Option<usize>,
) -> Result<TrainReport> {
    if resume && !out.is_dir() {
        bail!(
            "--resume: there is no run directory at {}; drop --resume to start a run there",
            out.display()
        );
    }
    let mesh = train_mesh(cfg, devices)?;
    let model = Model::new(cfg.model.clone())?.with_mesh(mesh.clone())?;
    let m = &cfg.model;
    if m.local_kind == ::model::config::LocalKind::Rattention
        && m.window + 1 >= m.seq_len
        && model.layers().iter().any(|a| a.is_local())
    {
        eprintln!(
            "note: model.window ({}) leaves no token of a {}-token sequence outside the window, \
             so the RLA branch sees nothing in training (it would at longer evaluation lengths)",
            m.window, m.seq_len
        );
    }
    let shardings = step::StepShardings::new(cfg, &model, &mesh)?;
    let specs = model.param_specs();
    let io = StepIo::new(specs.len());
    let state_tensors = step::state_tensors(specs);
    // The data first: a missing corpus is reported before anything is compiled.
    let src = Source::open(&cfg.data, cfg.train.seed, cfg.model.vocab)?;
    let client = spmd::open_client(plugin, mesh.device_count())?;
    let placement = Placement::new(&client, mesh.device_count())?;
    let (t0, cpu0) = (Instant::now(), process_cpu_s());
    let comp = step::build_train_step(cfg, &client.platform_name()?, &mesh)?;
    let exe = crate::profile::span("compile train_step", || placement.compile(&client, &comp))?;
    crate::profile::executable("train_step", &exe);
    let compile_s = t0.elapsed().as_secs_f64();
    let compile_cpu_s = process_cpu_s() - cpu0;
    let dist = crate::distributed::global();
    let (process, processes) = dist.map_or((0, 1), |d| (d.process_id, d.num_processes));
    if !resume {
        refuse_earlier_run(out)?;
    }
    if let Some(d) = dist {
        // Nobody writes into the run directory before every process has looked at it.
        d.barrier("run-dir-checked")?;
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run dir {}", out.display()))?;
    if mesh.device_count() > 1 {
        eprintln!("mesh: {mesh}");
        if let Some(note) = model.seq_global_note_on(&client.platform_name()?) {
            eprintln!("{note}");
        }
    }

    // State: parameters and both moments, as host vectors in spec order.
    let mtoml = model_toml(cfg);
    let (mut start, mut position, mut state) = if resume {
        // Per device, its block of every tensor, assembled from the stored pieces whatever mesh
        // they were saved from (a piece whose checksum fails sends the search to the previous
        // checkpoint).
        let (path, stored, state) = checkpoint::load_newest_usable(out, &mtoml, |path, stored| {
            let seed = stored.meta().seed;
            if seed != cfg.train.seed {
                bail!(
                    "--resume: {} was written by a run with train.seed = {seed}, this command \
                         has {}; the seed fixes the data order, so the run would not continue \
                         the same: drop the override (or pass --seed {seed}), or train into a \
                         fresh --out directory",
                    path.display(),
                    cfg.train.seed,
                );
            }
            restore_state(&client, &placement, stored, &state_tensors, &shardings)
        })?
        .with_context(|| format!("--resume: no usable checkpoint in {}", out.display()))?;
        let meta = stored.meta();
        if process == 0 {
            drop_metrics_after(out, meta.step)?;
        }
        if meta.step >= cfg.train.steps as u64 {
            eprintln!(
                "note: {} is at step {}, and train.steps is {}: nothing to train (raise \
                 train.steps to continue the run)",
                path.display(),
                meta.step,
                cfg.train.steps
            );
        }
        eprintln!("resuming from {} (step {})", path.display(), meta.step);
        if let checkpoint::Stored::Sharded(s) = &stored {
            eprintln!("  saved on {}, restored onto {mesh}", s.mesh);
        }
        (meta.step, meta.data_position, state)
    } else {
        // Parameters from their initialisers, both moments zero.
        let host: Vec<Vec<f32>> = state_tensors
            .iter()
            .map(|t| match t.group {
                StateGroup::Params => model::init_param(t.spec, cfg.train.seed),
                StateGroup::AdamM | StateGroup::AdamV => vec![0.0; t.spec.numel()],
            })
            .collect();
        // Per device, its shard of every state tensor (`state[device][tensor]`).
        let state = upload_state(&client, &placement, &host, &state_tensors, &shardings)?;
        (0, 0, state)
    };

    let total = cfg.train.steps as u64;
    // Without a terminal the bar draws nothing: log lines instead, as with --quiet.
    let quiet = quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    bar.set_position(start);
    // One metrics file per run: process 0 writes it, the others log nowhere.
    let mut metrics: Box<dyn Write> = if process == 0 {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(out.join("metrics.jsonl"))?,
        )
    } else {
        Box::new(std::io::sink())
    };
    let tokens_per_step = (cfg.train.batch * cfg.model.seq_len) as f64;
    // Model FLOPs per token from the model's own count, and the peak only if already measured.
    let flops_per_token = model.cost(cfg.model.seq_len).flops_per_token.total();
    let peak = mfu::cached_peak(&client.platform_name()?).map(|p| p.flops_per_s);
    let mut step_time = 0.0f64;
    let mut losses = Vec::new();
    let mut last_ckpt = checkpoint::latest(out)?;
    let run_start = Instant::now();
    let mut window_start = Instant::now();
    let mut window_steps = 0usize;
    // One device: the checkpoint is one file. A mesh: every process writes its devices' pieces.
    let sharded_save = placement.len() > 1 || processes > 1;
    let layouts: Vec<checkpoint::sharded::TensorLayout> = state_tensors
        .iter()
        .zip(&shardings.state)
        .map(|(t, s)| checkpoint::sharded::TensorLayout {
            name: t.name.clone(),
            shape: t.spec.shape.clone(),
            sharding: s.sharding.clone(),
        })
        .collect();
    let save = |state: &[Vec<Buffer>], step: u64, position: u64| -> Result<PathBuf> {
        let meta = checkpoint::CheckpointMeta {
            step,
            data_position: position,
            seed: cfg.train.seed,
            model_config: mtoml.clone(),
        };
        if sharded_save {
            return save_sharded(
                out,
                &meta,
                &placement,
                state,
                &layouts,
                &mesh,
                cfg.train.keep_checkpoints,
            );
        }
        let mut tensors = Vec::new();
        for (i, (t, s)) in state_tensors.iter().zip(&shardings.state).enumerate() {
            let pieces: Vec<&Buffer> = state.iter().map(|l| &l[i]).collect();
            tensors.push(NamedTensor {
                name: t.name.clone(),
                shape: t.spec.shape.clone(),
                data: Placement::download(&pieces, &t.spec.shape, &s.sharding)?,
            });
        }
        let ck = Checkpoint {
            step: meta.step,
            data_position: meta.data_position,
            seed: meta.seed,
            model_config: meta.model_config,
            tensors,
        };
        checkpoint::save(out, &ck, cfg.train.keep_checkpoints)
    };
    while start < total {
        let step_start = Instant::now();
        let (toks, weights) = batch(&src, cfg, position);
        let (bs, t) = (cfg.train.batch, cfg.model.seq_len);
        // Tokens and answer weights are cut along the batch the same way.
        let tok_bufs = placement.upload(&client, &toks, &[bs, t + 1], &shardings.tokens)?;
        let weight_bufs = placement.upload(&client, &weights, &[bs, t], &shardings.tokens)?;
        let step_bufs = placement.upload(&client, &[start as f32], &[], &Sharding::Replicated)?;
        // Donate the state: the step writes the new parameters and moments into the same memory.
        let args: Vec<Vec<Buffer>> = std::mem::take(&mut state)
            .into_iter()
            .zip(
                step_bufs
                    .into_iter()
                    .zip(tok_bufs.into_iter().zip(weight_bufs)),
            )
            .map(|(s, (st, (tok, w)))| io.arguments(s, st, tok, w))
            .collect();
        let outs = crate::profile::span("train_step", || exe.execute_sharded_donating(args))?
            .into_iter()
            .map(|o| io.outputs(o))
            .collect::<Option<Vec<_>>>()
            .context("the train step returned an unexpected number of results")?;
        // The scalars are replicated: every device holds them; read the first.
        let lr = outs[0].lr.to_host::<f32>()?[0];
        let gnorm = outs[0].grad_norm.to_host::<f32>()?[0];
        let loss = outs[0].loss.to_host::<f32>()?[0];
        if !loss.is_finite() {
            bail!(diverged(out, loss, start, process == 0)?);
        }
        let host_lr = step::lr_at(&cfg.train, start as usize) as f32;
        if (lr - host_lr).abs() > 1e-4 * host_lr.abs().max(1e-12) {
            bail!(
                "in-graph learning rate {lr} differs from the schedule's {host_lr} at step {start}"
            );
        }
        state = outs.into_iter().map(|o| o.state).collect();
        start += 1;
        position += cfg.train.batch as u64;
        losses.push(loss);
        window_steps += 1;
        let tps =
            tokens_per_step * window_steps as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(start);
        bar.set_message(format!("loss {loss:.4}  {tps:.0} tok/s"));
        if start % cfg.train.log_every.max(1) as u64 == 0 || start == total {
            let u = Utilization::new(flops_per_token, tps, peak);
            let mut line = serde_json::json!({
                "step": start, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tps,
                "model_flops_per_s": u.flops_per_s,
                "wall_s": run_start.elapsed().as_secs_f64(), "compile_s": compile_s,
                "compile_cpu_s": compile_cpu_s,
            });
            if let Some(m) = u.mfu {
                line["mfu"] = m.into();
            }
            writeln!(metrics, "{line}")?;
            if quiet {
                eprintln!("step {start}/{total} loss {loss:.4} lr {lr:.2e} grad_norm {gnorm:.3} {tps:.0} tok/s");
            }
            window_start = Instant::now();
            window_steps = 0;
        }
        step_time += step_start.elapsed().as_secs_f64();
        let every = cfg.train.checkpoint_every as u64;
        if (every > 0 && start % every == 0) || start == total {
            last_ckpt = Some(save(&state, start, position)?);
        }
    }
    bar.finish();
    if !bar.is_hidden() {
        // The finished bar stays on its line; what follows starts on the next.
        eprintln!();
    }
    let utilization = (!losses.is_empty()).then(|| {
        let tps = tokens_per_step * losses.len() as f64 / step_time.max(1e-9);
        Utilization::new(flops_per_token, tps, peak)
    });
    Ok(TrainReport {
        losses,
        last_checkpoint: last_ckpt,
        last_step: start,
        utilization,
    })
}

/// Resuming from step `step`: the metrics lines of later steps (written after the checkpoint
/// by a run that went on, or one whose newer checkpoints were moved aside) would come again and
/// twice; they move to `metrics.jsonl.dropped` (appended, kept), the rest stays in place.
fn drop_metrics_after(out: &Path, step: u64) -> Result<()> {
    let path = out.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let later = |l: &str| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v["step"].as_u64())
            .is_some_and(|s| s > step)
    };
    let (drop, keep): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| later(l));
    if drop.is_empty() {
        return Ok(());
    }
    let dropped = out.join("metrics.jsonl.dropped");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&dropped)
        .with_context(|| format!("cannot open {}", dropped.display()))?;
    for l in &drop {
        writeln!(f, "{l}")?;
    }
    f.sync_all()?;
    let tmp = out.join(".metrics.jsonl.tmp");
    std::fs::write(
        &tmp,
        keep.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )?;
    std::fs::rename(&tmp, &path)?;
    eprintln!(
        "moved {} metrics line(s) after step {step} to {}",
        drop.len(),
        dropped.display()
    );
    Ok(())
}

/// The error of a run whose loss came out `loss` (not finite) at 1-based step `done + 1`: the
/// parameters after `done` steps gave it, so their checkpoint (if one was written at `done`) is
/// moved aside to `<name>.nonfinite` by process 0 (kept, but out of `--resume`'s way) and the
/// message names the checkpoint `--resume` continues from.
fn diverged(out: &Path, loss: f32, done: u64, mover: bool) -> Result<String> {
    let mut msg = format!(
        "loss is {loss} at step {} (the parameters after step {done}); stopping.",
        done + 1
    );
    let mut all = checkpoint::list(out)?;
    if let Some((_, path)) = all.pop_if(|(step, _)| *step == done) {
        // A free name: a rerun that diverges at the same step again keeps the earlier copy.
        let aside = (0..)
            .map(|i| match i {
                0 => PathBuf::from(format!("{}.nonfinite", path.display())),
                i => PathBuf::from(format!("{}.nonfinite.{i}", path.display())),
            })
            .find(|p| !p.exists())
            .expect("an unused name");
        if mover {
            std::fs::rename(&path, &aside).with_context(|| {
                format!(
                    "{msg} Cannot move {} aside to {}",
                    path.display(),
                    aside.display()
                )
            })?;
        }
        msg += &format!(
            " Their checkpoint {} is moved to {}.",
            path.display(),
            aside.display()
        );
    }
    msg += &match all.last() {
        Some((step, path)) => format!(
            " `--resume` continues from {} (step {step}); a lower train.lr or a longer \
             train.warmup may get past this point.",
            path.display()
        ),
        None => " No earlier checkpoint: train again into a fresh --out directory, with a lower \
                 train.lr or a longer train.warmup."
            .to_string(),
    };
    Ok(msg)
}

/// Upload the host state (in [`step::state_tensors`] order) as per-device shards:
/// `result[device][tensor]`.
pub fn upload_state(
    client: &pjrt::Client,
    placement: &Placement,
    host: &[Vec<f32>],
    tensors: &[StateTensor<'_>],
    shardings: &StepShardings,
) -> Result<Vec<Vec<Buffer>>> {
    let mut state: Vec<Vec<Buffer>> = placement.local().iter().map(|_| Vec::new()).collect();
    for ((data, t), s) in host.iter().zip(tensors).zip(&shardings.state) {
        let pieces = placement
            .upload(client, data, &t.spec.shape, &s.sharding)
            .with_context(|| format!("uploading {}", t.name))?;
        for (device, piece) in state.iter_mut().zip(pieces) {
            device.push(piece);
        }
    }
    Ok(state)
}

/// Save the state (`state[local][tensor]`, laid out by `layouts`) as a sharded checkpoint:
/// each of this process's devices writes the pieces it owns, straight from its buffers; with
/// several processes they meet at barriers and process 0 commits.
pub fn save_sharded(
    out: &Path,
    meta: &checkpoint::CheckpointMeta,
    placement: &Placement,
    state: &[Vec<Buffer>],
    layouts: &[checkpoint::sharded::TensorLayout],
    mesh: &model::Mesh,
    keep: usize,
) -> Result<PathBuf> {
    let dist = crate::distributed::global();
    let barrier = |what: &str| -> Result<()> {
        match dist {
            Some(d) => d.barrier(what),
            None => Ok(()),
        }
    };
    let writer = checkpoint::sharded::Writer {
        partitions: placement.len(),
        local: placement.local(),
        process: dist.map_or((0, 1), |d| (d.process_id, d.num_processes)),
        barrier: dist.map(|_| &barrier as checkpoint::sharded::Barrier<'_>),
        mesh,
    };
    checkpoint::sharded::save(out, meta, layouts, &writer, keep, |ti, p| {
        let at = placement
            .local()
            .binary_search(&p)
            .map_err(|_| anyhow::anyhow!("partition {p} is not on this process"))?;
        Ok(state[at][ti].to_host::<f32>()?)
    })
}

/// Restore the state from a checkpoint onto this process's devices (`result[local][tensor]`):
/// each device's block of every tensor, under this mesh's sharding, is assembled from the stored
/// pieces (a sharded checkpoint from any mesh, or a single file) and uploaded. Only one block is
/// on the host at a time.
pub fn restore_state(
    client: &pjrt::Client,
    placement: &Placement,
    stored: &checkpoint::Stored,
    tensors: &[StateTensor<'_>],
    shardings: &StepShardings,
) -> Result<Vec<Vec<Buffer>>> {
    let mut state: Vec<Vec<Buffer>> = placement.local().iter().map(|_| Vec::new()).collect();
    for (t, s) in tensors.iter().zip(&shardings.state) {
        match stored.shape(&t.name) {
            Some(shape) if shape == t.spec.shape => {}
            Some(shape) => bail!(
                "checkpoint tensor {} has shape {shape:?}, the model expects {:?}",
                t.name,
                t.spec.shape
            ),
            None => bail!("{}", checkpoint::lacks(&t.name)),
        }
        let dims: Vec<i64> = s.shard_shape.iter().map(|&d| d as i64).collect();
        for (device, &p) in state.iter_mut().zip(placement.local()) {
            let offset = s
                .sharding
                .tile_offset(p as i64, &t.spec.shape)?
                .with_context(|| format!("partition {p} holds no piece of {}", t.name))?;
            let block = stored
                .read_block(&t.name, &offset, &s.shard_shape)
                .with_context(|| format!("restoring {} onto partition {p}", t.name))?;
            device.push(client.buffer_from_host(&block, &dims, Some(placement.device(p)))?);
        }
    }
    Ok(state)
}

/// Recall of one distance bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketRecall {
    /// The bucket ([`crate::data::distance_buckets`], [`length_buckets`]).
    pub label: String,
    /// Answers predicted right (greedy).
    pub correct: usize,
    /// Answers in the bucket.
    pub total: usize,
}

impl BucketRecall {
    /// Correct / total in percent (NaN when the bucket is empty).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            100.0 * self.correct as f64 / self.total as f64
        }
    }
}

/// Results of `rattn eval` at one sequence length.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// The sequence length evaluated at (tokens per input).
    pub seq_len: usize,
    /// Held-out sequences evaluated (whole batches: the request rounded up).
    pub sequences: usize,
    /// Mean next-token loss over the scored targets (the recall task's answers; every token of
    /// text data).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Scored targets (their summed weight).
    pub targets: f64,
    /// Recall task: recall by distance from the pair's last appearance, nearest bucket first.
    pub recall: Vec<BucketRecall>,
    /// Recall task: `(correct, total)` answers at each distance (index = distance in tokens,
    /// `0..=seq_len`), for buckets other than [`crate::data::distance_buckets`] (e.g. `rattn sweep`'s, the same
    /// for every window); empty for text and token data.
    pub by_distance: Vec<(usize, usize)>,
}

/// Index of the first held-out recall sequence (the synthetic held-out stream is also on its own
/// seed; text and token data are read from their held-out tail's first window).
const FIRST_EVAL_SEQUENCE: u64 = 1_000_000_007;

/// Evaluate the newest checkpoint (or a given file) on held-out sequences at the training length.
pub fn eval(
    cfg: &RunConfig,
    plugin: Option<&str>,
    ckpt: &Path,
    sequences: usize,
) -> Result<EvalReport> {
    let mut reports = eval_lengths(cfg, plugin, ckpt, sequences, &[cfg.model.seq_len])?;
    Ok(reports.remove(0))
}

/// Evaluate a checkpoint on `sequences` held-out sequences at each of `lengths` (tokens per
/// input), without retraining: the parameters do not depend on the length (RoPE positions and the
/// RLA state extend), so the forward graph is built again at each length. Prints and returns one
/// report per length. On the recall task the data are generated at that length (query distances
/// grow with it) and, beyond the training length T, recall is reported in extra buckets
/// `T..2T`, `2T..4T`, … ([`length_buckets`]).
pub fn eval_lengths(
    cfg: &RunConfig,
    plugin: Option<&str>,
    ckpt: &Path,
    sequences: usize,
    lengths: &[usize],
) -> Result<Vec<EvalReport>> {
    let client = runtime::open_client(plugin)?;
    let (path, ck) = checkpoint::load_resolved(ckpt, Some(&model_toml(cfg)))?;
    let model = Model::new(cfg.model.clone())?;
    let mut params = Vec::new();
    for t in ck.params(&model)? {
        params.push(upload_f32(&client, &t.data, &t.shape)?);
    }
    let src = Source::held_out(&cfg.data, cfg.train.seed, cfg.model.vocab)?;
    println!("checkpoint {} (step {})", path.display(), ck.step);
    let mut reports = Vec::new();
    for &len in lengths {
        if len == 0 {
            bail!("eval: a sequence length must be > 0 (lengths {lengths:?})");
        }
        let r = eval_at(
            &client,
            &model,
            &params,
            &src,
            len,
            cfg.train.batch,
            sequences,
        )?;
        print_report(
            cfg,
            &model,
            &r,
            lengths.len() > 1 || len != cfg.model.seq_len,
        );
        reports.push(r);
    }
    Ok(reports)
}

/// The distance buckets of the recall evaluation at `len` for `model` (trained at its
/// `seq_len`). A stack without local layers (full attention) gets the buckets of the all-local
/// stack of the same depth, so it can be compared with one.
fn eval_buckets(model: &Model, len: usize) -> (Vec<crate::data::Bucket>, usize) {
    let cfg = model.config();
    let local = model.layers().iter().filter(|a| a.is_local()).count();
    let relay = if local == 0 {
        model.layers().len()
    } else {
        local
    };
    (length_buckets(cfg.window, relay, cfg.seq_len, len), relay)
}

/// Loss (and recall) of `model` with device `params` on `sequences` held-out sequences of `len`
/// tokens from `src`, in batches of at most `batch`.
fn eval_at(
    client: &pjrt::Client,
    model: &Model,
    params: &[Buffer],
    src: &Source,
    len: usize,
    batch: usize,
    sequences: usize,
) -> Result<EvalReport> {
    let (t, v) = (len, model.config().vocab);
    let bs = batch.min(sequences).max(1);
    let platform = client.platform_name()?;
    let exe = runtime::compile(client, &step::build_forward(model, bs, t, &platform)?)
        .with_context(|| format!("compiling the eval forward at batch {bs}, length {t}"))?;
    let synthetic = matches!(src, Source::Synthetic { .. });
    let first_index = if synthetic { FIRST_EVAL_SEQUENCE } else { 0 };
    let (buckets, _) = eval_buckets(model, t);
    let mut hits = vec![(0usize, 0usize); buckets.len()];
    let mut by_distance = vec![(0usize, 0usize); t + 1];
    let (mut nll, mut weight) = (0.0f64, 0.0f64);
    let batches = sequences.div_ceil(bs);
    for bi in 0..batches {
        let first = first_index + (bi * bs) as u64;
        let seqs: Vec<_> = (0..bs as u64).map(|i| src.sequence(first + i, t)).collect();
        let toks: Vec<i32> = seqs
            .iter()
            .flat_map(|s| s.tokens[..t].iter().map(|&x| x as i32))
            .collect();
        let tb = client.buffer_from_host(&toks, &[bs as i64, t as i64], None)?;
        let mut args: Vec<&Buffer> = params.iter().collect();
        args.push(&tb);
        let logits = exe.execute(&args)?.remove(0).to_host::<f32>()?;
        for (si, seq) in seqs.iter().enumerate() {
            let row = |pos: usize| &logits[(si * t + pos) * v..][..v];
            for (pos, &w) in seq.weights.iter().enumerate() {
                if w == 0.0 {
                    continue;
                }
                let r = row(pos);
                let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                nll += w as f64 * (lse - r[seq.tokens[pos + 1] as usize] as f64);
                weight += w as f64;
            }
            for p in &seq.probes {
                // The answer at p.pos is predicted from position p.pos − 1.
                let pred = row(p.pos - 1)
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |a, (i, &x)| if x > a.1 { (i, x) } else { a },
                    )
                    .0;
                let right = pred as u32 == seq.tokens[p.pos];
                if let Some(d) = by_distance.get_mut(p.distance) {
                    d.0 += right as usize;
                    d.1 += 1;
                }
                if let Some(k) = buckets
                    .iter()
                    .position(|b| p.distance >= b.lo && p.distance <= b.hi)
                {
                    hits[k].1 += 1;
                    if pred as u32 == seq.tokens[p.pos] {
                        hits[k].0 += 1;
                    }
                }
            }
        }
    }
    let loss = nll / weight.max(1.0);
    Ok(EvalReport {
        seq_len: t,
        sequences: batches * bs,
        loss,
        perplexity: loss.exp(),
        targets: weight,
        recall: if synthetic {
            buckets
                .iter()
                .zip(&hits)
                .map(|(b, h)| BucketRecall {
                    label: b.label.clone(),
                    correct: h.0,
                    total: h.1,
                })
                .collect()
        } else {
            Vec::new()
        },
        by_distance: if synthetic { by_distance } else { Vec::new() },
    })
}

/// Print one length's report as `rattn eval` shows it, after a line naming the length when
/// `header` (several lengths, or another than the training length).
fn print_report(cfg: &RunConfig, model: &Model, report: &EvalReport, header: bool) {
    let train_len = cfg.model.seq_len;
    if header {
        let ratio = report.seq_len as f64 / train_len as f64;
        println!(
            "at seq_len {} ({ratio}× the training length {train_len}), {} sequences:",
            report.seq_len, report.sequences
        );
    }
    let synthetic = !report.recall.is_empty();
    let what = if synthetic { "answer tokens" } else { "tokens" };
    println!(
        "eval loss {:.4}  perplexity {:.3}  over {} {what}",
        report.loss, report.perplexity, report.targets
    );
    if synthetic {
        let (_, relay) = eval_buckets(model, report.seq_len);
        let local = model.layers().iter().filter(|a| a.is_local()).count();
        let chance = 100.0 / synth::N_VALUES as f64;
        let stack = if local == 0 {
            format!("no local layers: buckets of an all-local stack of {relay}")
        } else {
            format!("{local} local layers")
        };
        println!(
            "recall by distance from the fact's last appearance (W = {}, {stack}: \
             LW = {}; chance {chance:.1} % = 1/{}):",
            cfg.model.window,
            cfg.model.window * relay.max(1),
            synth::N_VALUES
        );
        for r in &report.recall {
            let pct = match r.total {
                0 => "     – %".to_string(),
                _ => format!("{:6.1} %", r.percent()),
            };
            println!("  {:<22} {:>5}/{:<5} {pct}", r.label, r.correct, r.total);
        }
    }
}

#[cfg(test)]
mod layout_tests;
#[cfg(test)]
mod length_tests;
#[cfg(test)]
mod optimizer_tests;
#[cfg(test)]
mod scan_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod zero_tests;
