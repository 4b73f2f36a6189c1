//! `rattn generate`: prefill a batch of prompts, then decode with the caches kept on the device and
//! donated to every call (updated in place, model::decode). Greedy decoding runs the on-device loop
//! ([`model::Model::decode_loop`]): `--chunk` tokens per dispatch, the argmax on the device;
//! temperature + top-k sampling runs one step per dispatch and picks on the host.

use crate::checkpoint;
use crate::config::RunConfig;
use crate::runtime;
use anyhow::{bail, Context, Result};
use pjrt::Buffer;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `rattn generate`.
#[derive(clap::Args, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    common: crate::Common,
    /// Checkpoint file, or a run directory (its newest checkpoint).
    #[arg(long, default_value = "runs/tiny")]
    checkpoint: PathBuf,
    /// Prompt: text for `text` data (byte tokenizer), else comma-separated token ids.
    #[arg(long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `--tokens 0,1,17,70` (any data kind).
    #[arg(long)]
    tokens: Option<String>,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new: usize,
    /// Sampling temperature; 0 = greedy (argmax).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampler (same seed, same tokens).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decode this many sequences at once: the prompt repeated (sampling draws each row on its
    /// own). Prompts given as `--tokens 1,2;3,4` (equal lengths, `;` between them) set the batch
    /// themselves.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Greedy decoding: tokens produced per dispatch of the on-device loop (0 = all in one).
    #[arg(long, default_value_t = 0)]
    chunk: usize,
    /// Write a trace (trace.json: Perfetto / chrome://tracing) with time per HLO op of the
    /// prefill and the decode step, and a summary of the hot ops, into this directory.
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
}

/// Parse `"0, 1,17"` into token ids below `vocab`.
pub fn parse_ids(s: &str, vocab: usize) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let id: u32 = t
                .parse()
                .with_context(|| format!("prompt token {t:?} is not a non-negative integer"))?;
            if id as usize >= vocab {
                bail!("prompt token {id} is outside the vocabulary (model.vocab = {vocab})");
            }
            Ok(id)
        })
        .collect()
}

/// SplitMix64 stream for sampling.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Pick the next token from one row of logits: argmax when `temperature <= 0`, else a sample from
/// softmax(logits / temperature) restricted to the `top_k` largest (all when 0).
fn pick(logits: &[f32], temperature: f64, top_k: usize, rng: &mut Rng) -> u32 {
    let argmax = |xs: &[f32]| {
        xs.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |a, (i, &x)| if x > a.1 { (i, x) } else { a },
            )
            .0
    };
    if temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if top_k > 0 {
        idx.truncate(top_k);
    }
    let m = logits[idx[0]] as f64;
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - m) / temperature).exp())
        .collect();
    let mut u = rng.uniform() * w.iter().sum::<f64>();
    for (&i, &wi) in idx.iter().zip(&w) {
        if u < wi {
            return i as u32;
        }
        u -= wi;
    }
    idx[idx.len() - 1] as u32
}

/// Run `rattn generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    if let Some(dir) = &args.profile {
        crate::profile::start(dir)?;
    }
    let cfg = RunConfig::load(&args.common.config, &args.common.overrides)?;
    // The checkpoint's own [model] table is authoritative (seq_len etc. do not matter for
    // decoding), but for the parameter layout: the run's `model.scan_layers` decides it, and a
    // checkpoint of the other layout is converted, saying so.
    let (path, ck) = checkpoint::load_resolved(&args.checkpoint, None)?;
    let mut model_cfg: model::ModelConfig =
        toml::from_str(&ck.model_config).with_context(|| {
            format!(
                "checkpoint {} has an unreadable model config",
                path.display()
            )
        })?;
    let ck = if model_cfg.scan_layers != cfg.model.scan_layers {
        model_cfg.scan_layers = cfg.model.scan_layers;
        let (ck, line) = checkpoint::layout::convert(ck, &model_cfg, &path)?;
        eprintln!("{line}");
        ck
    } else {
        ck
    };
    let model = model::Model::new(model_cfg)?;
    if *model.config() != cfg.model {
        eprintln!(
            "note: using the model configuration stored in {} (it differs from {})",
            path.display(),
            args.common.config.display()
        );
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!(
            "--temperature must be a finite number >= 0 (got {})",
            args.temperature
        );
    }
    let vocab = model.config().vocab;
    let text_mode = cfg.data.kind == "text";
    // Text data with a tokenizer.json encodes and decodes through it; otherwise bytes.
    let tokenizer = match (text_mode, &cfg.data.path) {
        (true, Some(path)) => crate::data::find_tokenizer(path, cfg.data.tokenizer.as_deref())
            .map(|tk| {
                tokenizers::Tokenizer::from_file(&tk)
                    .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", tk.display()))
            })
            .transpose()?,
        _ => None,
    };
    let encode = |p: &str| -> Result<Vec<u32>> {
        match &tokenizer {
            Some(t) => t
                .encode(p, false)
                .ok()
                .map(|e| e.get_ids().to_vec())
                .context("tokenizing the prompt"),
            None if text_mode => Ok(p.bytes().map(u32::from).collect()),
            None => parse_ids(p, vocab).with_context(|| {
                format!(
                    "the config's data.kind is {:?}, whose prompts are comma-separated token ids \
                     (e.g. 0,1,17,70); for a model trained on text, pass its config (e.g. \
                     --config configs/text-tiny.toml: the checkpoint keeps [model], not [data])",
                    cfg.data.kind
                )
            }),
        }
    };
    let mut prompts: Vec<Vec<u32>> = match (&args.tokens, &args.prompt) {
        (Some(ids), _) => ids
            .split(';')
            .map(|p| parse_ids(p, vocab))
            .collect::<Result<_>>()?,
        (None, Some(p)) => vec![encode(p)?],
        (None, None) => bail!("give a prompt: --prompt TEXT_OR_IDS or --tokens 0,1,17,70"),
    };
    if prompts.iter().any(Vec::is_empty) {
        bail!("the prompt is empty");
    }
    if prompts.iter().any(|p| p.len() != prompts[0].len()) {
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        bail!("the prompts of a batch must have the same length (got {lens:?} tokens)");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if prompts.len() == 1 {
        prompts = vec![prompts[0].clone(); args.batch];
    } else if args.batch != 1 && args.batch != prompts.len() {
        bail!(
            "--batch {} but {} prompts were given",
            args.batch,
            prompts.len()
        );
    }
    for p in &prompts {
        if let Some(&t) = p.iter().find(|&&t| t as usize >= vocab) {
            bail!("prompt token {t} is outside the vocabulary (model.vocab = {vocab})");
        }
    }
    let bs = prompts.len();
    let prompt = &prompts[0];
    let (l, max_len) = (prompt.len(), prompt.len() + args.max_new);
    if max_len > i32::MAX as usize {
        bail!(
            "--max-new {}: prompt + generated tokens ({max_len}) exceed the decode step's s32 \
             positions ({})",
            args.max_new,
            i32::MAX
        );
    }

    let client = runtime::open_client(args.common.plugin.as_deref())?;
    let mut params = Vec::new();
    for t in ck.params(&model)? {
        params.push(runtime::upload_f32(&client, &t.data, &t.shape)?);
    }
    let greedy = args.temperature <= 0.0;
    // Tokens after the prefill's first one; the loop runs `chunk` of them per dispatch.
    let rest = args.max_new.saturating_sub(1);
    let chunk = if args.chunk == 0 {
        rest
    } else {
        args.chunk.min(rest)
    }
    .max(1);
    let t0 = Instant::now();
    let platform = client.platform_name()?;
    let prefill = runtime::compile(&client, &model.prefill(bs, l, max_len, &platform)?)?;
    let io = model.decode_io(bs, max_len);
    let lio = model.loop_io(bs, max_len);
    // Greedy: loops of `chunk` steps and one of the remainder; sampling: the single step.
    let mut loops = std::collections::BTreeMap::new();
    let step = if greedy {
        for k in [chunk, rest % chunk] {
            if rest > 0 && k > 0 && !loops.contains_key(&k) {
                loops.insert(
                    k,
                    runtime::compile(&client, &model.decode_loop(bs, max_len, k)?)?,
                );
            }
        }
        None
    } else if rest > 0 {
        Some(runtime::compile(&client, &model.decode_step(bs, max_len)?)?)
    } else {
        None
    };
    let compile_s = t0.elapsed().as_secs_f64();
    crate::profile::executable("prefill", &prefill);
    for (k, exe) in &loops {
        crate::profile::executable(&format!("decode_loop_{k}"), exe);
    }
    if let Some(step) = &step {
        crate::profile::executable("decode_step", step);
    } else if crate::profile::active() && rest > 0 {
        // The loop is one `while` op; the step (its body) shows the ops inside it.
        let exe = runtime::compile(&client, &model.decode_step(bs, max_len)?)?;
        crate::profile::executable("decode_step", &exe);
    }

    let v = vocab;
    let mut rng = Rng(args.seed ^ 0x6A09_E667_F3BC_C908);
    // Grown as tokens come: a huge --max-new fails in the cache's allocation with an error, not
    // here with an abort.
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(args.max_new.min(1 << 16)); bs];
    let t0 = Instant::now();
    let ids: Vec<i32> = prompts.iter().flatten().map(|&t| t as i32).collect();
    let tb = client.buffer_from_host(&ids, &[bs as i64, l as i64], None)?;
    let mut call: Vec<&Buffer> = params.iter().collect();
    call.insert(io.prompt, &tb);
    let (logits, mut cache) = io
        .split_results(crate::profile::span("prefill", || prefill.execute(&call))?)
        .context("the prefill returned an unexpected number of results")?;
    let logits = logits.to_host::<f32>()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut dispatches = 0usize;
    if args.max_new > 0 {
        for (bi, o) in out.iter_mut().enumerate() {
            let row = &logits[((bi + 1) * l - 1) * v..][..v];
            o.push(pick(row, args.temperature, args.top_k, &mut rng));
        }
    }
    let donated: Vec<usize> = io.cache.clone().collect();
    while out[0].len() < args.max_new {
        let pos = l + out[0].len() - 1;
        let last: Vec<i32> = out.iter().map(|o| o[o.len() - 1] as i32).collect();
        let tok = client.buffer_from_host(&last, &[bs as i64], None)?;
        let posb = client.buffer_from_host(&[pos as i32], &[], None)?;
        let call = io.step_arguments(params.iter().collect(), cache.iter().collect(), &tok, &posb);
        dispatches += 1;
        if let Some(step) = &step {
            let (logits, next) = io
                .split_results(crate::profile::span("decode_step", || {
                    step.execute_donating_some(&call, &donated)
                })?)
                .context("the decode step returned an unexpected number of results")?;
            let logits = logits.to_host::<f32>()?;
            cache = next;
            for (bi, o) in out.iter_mut().enumerate() {
                o.push(pick(
                    &logits[bi * v..][..v],
                    args.temperature,
                    args.top_k,
                    &mut rng,
                ));
            }
        } else {
            let k = chunk.min(args.max_new - out[0].len());
            let exe = &loops[&k];
            let (tokens, _logits, next) = lio
                .split_results(crate::profile::span(&format!("decode_loop_{k}"), || {
                    exe.execute_donating_some(&call, &donated)
                })?)
                .context("the decode loop returned an unexpected number of results")?;
            let tokens = tokens.to_host::<i32>()?;
            if let Some(t) = tokens.iter().find(|&&t| t < 0 || t as usize >= v) {
                bail!(
                    "the decode loop picked token {t}, outside the vocabulary (model.vocab = \
                     {v}): its logits were not finite"
                );
            }
            cache = next;
            for (bi, o) in out.iter_mut().enumerate() {
                o.extend(tokens[bi * k..(bi + 1) * k].iter().map(|&t| t as u32));
            }
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();

    for o in &out {
        print_sequence(o, tokenizer.as_ref(), text_mode)?;
    }
    let steps = out[0].len().saturating_sub(1);
    let cache_mb = model.cache_layout(bs, max_len).allocated_bytes().total() as f64 / 1e6;
    eprintln!(
        "batch {bs}, prompt {l} tokens, generated {} each | compile {compile_s:.2} s, prefill {:.1} ms ({:.0} tok/s), decode {:.1} tok/s ({:.1} per sequence, {dispatches} dispatch{}), cache {cache_mb:.2} MB",
        out[0].len(),
        prefill_s * 1e3,
        (bs * l) as f64 / prefill_s.max(1e-9),
        (bs * steps) as f64 / decode_s.max(1e-9),
        steps as f64 / decode_s.max(1e-9),
        if dispatches == 1 { "" } else { "es" },
    );
    crate::profile::finish()
}

/// Print one generated sequence: `tokens: a,b,c` and, for text data, `text: ...`.
fn print_sequence(
    out: &[u32],
    tokenizer: Option<&tokenizers::Tokenizer>,
    text_mode: bool,
) -> Result<()> {
    let ids = out.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    println!("tokens: {ids}");
    if let Some(tk) = tokenizer {
        let text = tk
            .decode(out, false)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        println!("text: {text}");
    } else if text_mode {
        let bytes: Vec<u8> = out.iter().map(|&t| t.min(255) as u8).collect();
        println!("text: {}", String::from_utf8_lossy(&bytes));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_top1_sampling_is_greedy() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = Rng(1);
        assert_eq!(pick(&logits, 0.0, 0, &mut rng), 1);
        for _ in 0..20 {
            assert_eq!(pick(&logits, 1.5, 1, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // p ∝ exp(l / T) over the top 2 = {1: 2.0, 3: 1.0} at T = 1: p(1) = e / (e + 1).
        let logits = [0.0f32, 2.0, -5.0, 1.0];
        let mut rng = Rng(7);
        let n = 20_000;
        let hits = (0..n)
            .map(|_| pick(&logits, 1.0, 2, &mut rng))
            .inspect(|&t| assert!(t == 1 || t == 3))
            .filter(|&t| t == 1)
            .count();
        let want = std::f64::consts::E / (std::f64::consts::E + 1.0);
        assert!((hits as f64 / n as f64 - want).abs() < 0.015);
    }

    #[test]
    fn ids_parse_and_are_checked() {
        assert_eq!(parse_ids("0, 1,17,70", 128).unwrap(), [0, 1, 17, 70]);
        assert!(parse_ids("1,x", 128)
            .unwrap_err()
            .to_string()
            .contains("\"x\""));
        assert!(parse_ids("300", 128)
            .unwrap_err()
            .to_string()
            .contains("outside the vocabulary"));
    }
}
