//! The training loop and evaluation.

use crate::checkpoint::{self, Checkpoint, NamedTensor};
use crate::config::RunConfig;
use crate::data::{distance_buckets, synth, Source};
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
    let newest = checkpoint::latest(out)?;
    let metrics = out.join("metrics.jsonl");
    if newest.is_some() || metrics.exists() {
        let what = newest.map_or_else(
            || format!("{}", metrics.display()),
            |p| format!("checkpoints (newest {})", p.display()),
        );
        bail!(
            "{} holds an earlier run ({what}); continue it with --resume, or train into a fresh \
             --out directory",
            out.display()
        );
    }
    Ok(())
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
/// host and saved whole (sharded checkpoints are issue 11 item 7).
pub fn train(
    cfg: &RunConfig,
    plugin: Option<&str>,
    out: &Path,
    resume: bool,
    quiet: bool,
    devices: Option<usize>,
) -> Result<TrainReport> {
    let mesh = train_mesh(cfg, devices)?;
    let model = Model::new(cfg.model.clone())?.with_mesh(mesh.clone())?;
    let shardings = step::StepShardings::new(cfg, &model, &mesh)?;
    let specs = model.param_specs();
    let io = StepIo::new(specs.len());
    let state_tensors = step::state_tensors(specs);
    let client = spmd::open_client(plugin, mesh.device_count())?;
    let placement = Placement::new(&client, mesh.device_count())?;
    let t0 = Instant::now();
    let comp = step::build_train_step(cfg, &client.platform_name()?, &mesh)?;
    let exe = placement.compile(&client, &comp)?;
    let compile_s = t0.elapsed().as_secs_f64();
    let src = Source::open(&cfg.data, cfg.train.seed, cfg.model.vocab)?;
    if !resume {
        refuse_earlier_run(out)?;
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run dir {}", out.display()))?;
    if mesh.device_count() > 1 {
        eprintln!("mesh: {mesh}");
    }

    // State: parameters and both moments, as host vectors in spec order.
    let mtoml = model_toml(cfg);
    let (mut start, mut position, host): (u64, u64, Vec<Vec<f32>>) = if resume {
        let (path, ck) = checkpoint::load_newest_valid(out, &mtoml)?
            .with_context(|| format!("--resume: no checkpoint in {}", out.display()))?;
        let find = |name: &str| -> Result<Vec<f32>> {
            Ok(ck
                .tensors
                .iter()
                .find(|t| t.name == name)
                .with_context(|| format!("checkpoint lacks {name}"))?
                .data
                .clone())
        };
        let mut v = Vec::new();
        for t in &state_tensors {
            let d = find(&t.name)?;
            if d.len() != t.spec.numel() {
                bail!(
                    "checkpoint tensor {} has {} values, expected {}",
                    t.name,
                    d.len(),
                    t.spec.numel()
                );
            }
            v.push(d);
        }
        eprintln!("resuming from {} (step {})", path.display(), ck.step);
        (ck.step, ck.data_position, v)
    } else {
        // Parameters from their initialisers, both moments zero.
        let v: Vec<Vec<f32>> = state_tensors
            .iter()
            .map(|t| match t.group {
                StateGroup::Params => model::init_param(t.spec, cfg.train.seed),
                StateGroup::AdamM | StateGroup::AdamV => vec![0.0; t.spec.numel()],
            })
            .collect();
        (0, 0, v)
    };
    // Per device, its shard of every state tensor (`state[device][tensor]`).
    let mut state = upload_state(&client, &placement, &host, &state_tensors, &shardings)?;
    drop(host);

    let total = cfg.train.steps as u64;
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
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))?;
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
    // Checkpoints are gathered to the host and written whole.
    let save = |state: &[Vec<Buffer>], step: u64, position: u64| -> Result<PathBuf> {
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
            step,
            data_position: position,
            seed: cfg.train.seed,
            model_config: mtoml.clone(),
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
        let outs = exe
            .execute_sharded_donating(args)?
            .into_iter()
            .map(|o| io.outputs(o))
            .collect::<Option<Vec<_>>>()
            .context("the train step returned an unexpected number of results")?;
        // The scalars are replicated: every device holds them; read the first.
        let lr = outs[0].lr.to_host::<f32>()?[0];
        let gnorm = outs[0].grad_norm.to_host::<f32>()?[0];
        let loss = outs[0].loss.to_host::<f32>()?[0];
        if !loss.is_finite() {
            bail!(
                "loss is {loss} at step {start}; stopping. Last good checkpoint: {}",
                last_ckpt
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            );
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
    let utilization = (!losses.is_empty()).then(|| {
        let tps = tokens_per_step * losses.len() as f64 / step_time.max(1e-9);
        Utilization::new(flops_per_token, tps, peak)
    });
    Ok(TrainReport {
        losses,
        last_checkpoint: last_ckpt,
        utilization,
    })
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
    let mut state: Vec<Vec<Buffer>> = (0..placement.len()).map(|_| Vec::new()).collect();
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

/// Recall of one distance bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketRecall {
    /// The bucket ([`distance_buckets`]).
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

/// Results of `rattn eval`.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Mean next-token loss over the scored targets (the recall task's answers; every token of
    /// text data).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Recall task: recall by distance from the pair's last appearance, nearest bucket first.
    pub recall: Vec<BucketRecall>,
    /// Recall task: `(correct, total)` answers at each distance (index = distance in tokens,
    /// `0..=seq_len`), for buckets other than [`distance_buckets`] (e.g. `rattn sweep`'s, the same
    /// for every window); empty for text and token data.
    pub by_distance: Vec<(usize, usize)>,
}

/// Evaluate the newest checkpoint (or a given file) on held-out sequences.
pub fn eval(
    cfg: &RunConfig,
    plugin: Option<&str>,
    ckpt: &Path,
    sequences: usize,
) -> Result<EvalReport> {
    let client = runtime::open_client(plugin)?;
    let path = if ckpt.is_dir() {
        checkpoint::latest(ckpt)?.with_context(|| format!("no checkpoint in {}", ckpt.display()))?
    } else {
        ckpt.to_path_buf()
    };
    let ck = checkpoint::load(&path, Some(&model_toml(cfg)))?;
    let model = Model::new(cfg.model.clone())?;
    let mut params = Vec::new();
    for t in ck.params(&model)? {
        params.push(upload_f32(&client, &t.data, &t.shape)?);
    }
    let (bs, t, v) = (cfg.train.batch, cfg.model.seq_len, cfg.model.vocab);
    let platform = client.platform_name()?;
    let exe = runtime::compile(&client, &step::build_forward(&model, bs, t, &platform)?)?;
    // Held-out stream: a different seed for synthetic data, the tail of the stream otherwise.
    let src = match Source::open(&cfg.data, cfg.train.seed, v)? {
        Source::Synthetic { seed } => Source::Synthetic {
            seed: seed ^ 0xE7A1_0000_0000_0001,
        },
        s => s,
    };
    let synthetic = matches!(src, Source::Synthetic { .. });
    let local = model.layers().iter().filter(|a| a.is_local()).count();
    let buckets = distance_buckets(cfg.model.window, local);
    let mut hits = vec![(0usize, 0usize); buckets.len()];
    let mut by_distance = vec![(0usize, 0usize); t + 1];
    let (mut nll, mut weight) = (0.0f64, 0.0f64);
    let batches = sequences.div_ceil(bs);
    for bi in 0..batches {
        let first = 1_000_000_007u64 + (bi * bs) as u64;
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
    let report = EvalReport {
        loss,
        perplexity: loss.exp(),
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
    };
    println!("checkpoint {} (step {})", path.display(), ck.step);
    let what = if synthetic { "answer tokens" } else { "tokens" };
    println!(
        "eval loss {:.4}  perplexity {:.3}  over {weight} {what}",
        report.loss, report.perplexity
    );
    if synthetic {
        let chance = 100.0 / synth::N_VALUES as f64;
        println!(
            "recall by distance from the fact's last appearance (W = {}, {local} local layers: \
             LW = {}; chance {chance:.1} % = 1/{}):",
            cfg.model.window,
            cfg.model.window * local.max(1),
            synth::N_VALUES
        );
        for r in &report.recall {
            println!(
                "  {:<22} {:>5}/{:<5} {:6.1} %",
                r.label,
                r.correct,
                r.total,
                r.percent()
            );
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
