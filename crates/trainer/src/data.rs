//! Token sources: the embedded recall task ([`recall_sequence`]), UTF-8 text with a byte
//! tokenizer, and pre-tokenized little-endian u16/u32 files. Batches come in a deterministic order
//! from the seed, and the position is a single counter so a run can resume exactly. Text and token
//! streams are split once: the last `data.eval_fraction` of the stream is held out for
//! evaluation ([`Source::held_out`]) and never trained on.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Tokens of the embedded recall task.
pub mod synth {
    /// Beginning of sequence.
    pub const BOS: u32 = 0;
    /// First filler token; filler tokens are `FILLER..FILLER + N_FILLER`, drawn uniformly.
    pub const FILLER: u32 = 4;
    /// Number of filler tokens.
    pub const N_FILLER: u32 = 12;
    /// First key token: a query is `KEYS + k` followed by its answer, the fact about `k`.
    pub const KEYS: u32 = 16;
    /// Number of distinct keys (at most this many facts per sequence: a key is bound once).
    pub const N_KEYS: u32 = 16;
    /// Values a key can have (chance recall is 1 / N_VALUES).
    pub const N_VALUES: u32 = 16;
    /// First fact token: `FACTS + k·N_VALUES + v` states "key k has value v" in one token.
    pub const FACTS: u32 = 32;
    /// Smallest vocabulary the task needs.
    pub const VOCAB: usize = (FACTS + N_KEYS * N_VALUES) as usize;
    /// Fewest and most facts bound in one sequence (drawn uniformly per sequence).
    pub const FACTS_PER_SEQUENCE: (usize, usize) = (6, 12);
    /// Chance in percent that a free position (no query due) states a new fact while the
    /// sequence's facts last; otherwise it holds one filler token.
    pub const P_FACT: u64 = 25;
    /// Shortest gap between a pair's appearance and its next answer (a query takes 2 tokens).
    pub const MIN_GAP: usize = 2;

    /// The token stating that key `k` has value `v`.
    pub fn fact(k: u32, v: u32) -> u32 {
        FACTS + k * N_VALUES + v
    }
}

/// One query of the recall task: where its answer is and how far back the pair last appeared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    /// Position of the answer token (the target predicted from position `pos - 1`).
    pub pos: usize,
    /// Distance in tokens from the pair's most recent earlier value token (its fact, or an
    /// earlier query of the same key) to the answer: how far back the model must reach.
    pub distance: usize,
}

/// SplitMix64 step, for cheap deterministic randomness.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One sequence of the recall task.
#[derive(Debug, Clone, PartialEq)]
pub struct RecallSequence {
    /// The tokens.
    pub tokens: Vec<u32>,
    /// Every query whose answer lies inside `tokens`, in order.
    pub probes: Vec<Probe>,
}

/// Sequence number `index` of `len` tokens of the recall task for `seed`: a pure function of
/// the three, so the data order depends on nothing but the seed and the step.
///
/// After `BOS`, each position starts a query `k f` (the key token, then the answer: the fact
/// token `f` = [`synth::fact`]`(k, v)` restating the key's value) of a bound key whose query is
/// due, else (with [`synth::P_FACT`] % while the sequence's
/// [`synth::FACTS_PER_SEQUENCE`] last) a fact token [`synth::fact`]`(k, v)` binding a key not
/// bound yet in this sequence to a uniform value, else one uniform filler token. A fact is one
/// token, and every later appearance of the pair is that same token, so one attention layer
/// can look it up: the query's key matches the fact's key part and copies the fact, with no
/// earlier layer needed to bind a key to a value beside it (the induction-head step whose late,
/// seed-dependent formation made recall fragile). Each appearance of a pair schedules the pair's
/// next query a gap later, drawn log-uniformly from [`synth::MIN_GAP`] to `len`, so about as
/// many queries fall within 16 tokens of the pair's last appearance as at 16–64 or at 64–256:
/// near queries teach the lookup, far ones need attention that reaches back. A query's distance
/// is to the pair's most recent appearance (the fact, or an earlier answer restating it). Nothing depends on a model setting, so models
/// with different windows see the same data. Only the answers are predictable, and only they
/// are scored ([`Source::sequence`]).
pub fn recall_sequence(seed: u64, index: u64, len: usize) -> RecallSequence {
    use synth::*;
    let mut rng = Rng(mix(seed ^ mix(index.wrapping_add(0x5151))));
    let (lo, hi) = FACTS_PER_SEQUENCE;
    let n_facts = lo + rng.below((hi - lo + 1) as u64) as usize;
    // Keys in a random order: the sequence's facts take them from the front.
    let mut keys: Vec<u32> = (0..N_KEYS).collect();
    for i in (1..keys.len()).rev() {
        keys.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let span = (len.max(MIN_GAP + 1) as f64 / MIN_GAP as f64).ln();
    let gap = |rng: &mut Rng| (MIN_GAP as f64 * (rng.unit() * span).exp()) as usize;
    let mut tokens = vec![BOS];
    let mut probes = Vec::new();
    // (key, value, position of the pair's most recent appearance, answer position of its next query)
    let mut facts: Vec<(u32, u32, usize, usize)> = Vec::new();
    while tokens.len() + 2 <= len {
        let at = tokens.len();
        let due = (0..facts.len())
            .filter(|&i| facts[i].3 <= at + 1)
            .min_by_key(|&i| facts[i].3);
        if let Some(i) = due {
            let (k, v, last, _) = facts[i];
            tokens.extend([KEYS + k, fact(k, v)]);
            probes.push(Probe {
                pos: at + 1,
                distance: at + 1 - last,
            });
            facts[i].2 = at + 1;
            facts[i].3 = at + 1 + gap(&mut rng);
        } else if facts.len() < n_facts && (facts.is_empty() || rng.below(100) < P_FACT) {
            let (k, v) = (keys[facts.len()], rng.below(N_VALUES as u64) as u32);
            tokens.push(fact(k, v));
            facts.push((k, v, at, at + gap(&mut rng)));
        } else {
            tokens.push(FILLER + rng.below(N_FILLER as u64) as u32);
        }
    }
    while tokens.len() < len {
        tokens.push(FILLER + rng.below(N_FILLER as u64) as u32);
    }
    RecallSequence { tokens, probes }
}

/// A distance bucket of the recall evaluation: answers whose [`Probe::distance`] lies in
/// `lo..=hi`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// What the bucket means, e.g. `2LW..4LW (65..128)`.
    pub label: String,
    /// Smallest distance.
    pub lo: usize,
    /// Largest distance (`usize::MAX`: no limit).
    pub hi: usize,
}

/// The distance buckets of the recall evaluation for local layers of window `window`, `local`
/// of them: inside the window, beyond it but within what a stack of `local` sliding windows
/// can relay (`local × window`, "LW"), then 1–2, 2–4 and more than 4 times that. Empty buckets
/// (`local` ≤ 1) are left out; the last bucket is the farthest.
pub fn distance_buckets(window: usize, local: usize) -> Vec<Bucket> {
    let w = window.max(1);
    let lw = w * local.max(1);
    let mut edges = vec![(format!("<= W ({w})"), 1, w)];
    if lw > w {
        edges.push((format!("W..LW ({}..{lw})", w + 1), w + 1, lw));
    }
    edges.push((format!("LW..2LW ({}..{})", lw + 1, 2 * lw), lw + 1, 2 * lw));
    edges.push((
        format!("2LW..4LW ({}..{})", 2 * lw + 1, 4 * lw),
        2 * lw + 1,
        4 * lw,
    ));
    edges.push((format!("> 4LW (> {})", 4 * lw), 4 * lw + 1, usize::MAX));
    edges
        .into_iter()
        .map(|(label, lo, hi)| Bucket { label, lo, hi })
        .collect()
}

/// The distance buckets of an evaluation at `eval_len` tokens of a model trained at `train_len`:
/// [`distance_buckets`] while `eval_len <= train_len`; beyond, the buckets stop at `train_len`
/// (the farthest is relabelled `..T`) and doubling buckets follow, `T..2T`, `2T..4T`, …, the last
/// reaching `eval_len`: distances no training sequence held.
pub fn length_buckets(
    window: usize,
    local: usize,
    train_len: usize,
    eval_len: usize,
) -> Vec<Bucket> {
    let mut buckets = distance_buckets(window, local);
    if eval_len <= train_len {
        return buckets;
    }
    let t = train_len.max(1);
    buckets.retain(|b| b.lo <= t);
    if let Some(last) = buckets.last_mut() {
        if last.hi > t {
            let name = last.label.split(" (").next().unwrap_or("").to_string();
            let name = name.trim_start_matches("> ");
            last.label = format!("{name}..T ({}..{t})", last.lo);
            last.hi = t;
        }
    }
    let mut k = 1;
    while k * t < eval_len {
        let (lo, hi) = (k * t + 1, 2 * k * t);
        let name = |m: usize| {
            if m == 1 {
                "T".to_string()
            } else {
                format!("{m}T")
            }
        };
        buckets.push(Bucket {
            label: format!("{}..{} ({lo}..{hi})", name(k), name(2 * k)),
            lo,
            hi,
        });
        k *= 2;
    }
    buckets
}

/// One training or evaluation sequence: `len + 1` tokens (inputs are the first `len`, next-token
/// targets the last `len`), the loss weight of each of the `len` targets, and the recall task's
/// queries (none for text and token data).
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// `len + 1` tokens.
    pub tokens: Vec<u32>,
    /// Weight of target `i` (token `i + 1`): 1 on the recall task's answers (0 elsewhere), 1
    /// everywhere for text and token data.
    pub weights: Vec<f32>,
    /// The recall task's queries (answer positions index `tokens`).
    pub probes: Vec<Probe>,
}

/// A source of training/eval sequences.
pub enum Source {
    /// The embedded recall task ([`recall_sequence`]).
    Synthetic {
        /// Seed of the corpus (eval uses a different stream).
        seed: u64,
    },
    /// A flat token stream, cut into windows of `len + 1`.
    Stream {
        /// The tokens of this split.
        tokens: Vec<u32>,
        /// Windows in a hashed order (training); else window `index` in order (evaluation).
        shuffle: bool,
    },
}

/// How a stream of `n` tokens is split: the first `train` tokens are trained on, the rest (the
/// last `eval_fraction`, rounded up) held out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamSplit {
    /// Tokens of the training part (the stream's head).
    pub train: usize,
    /// Tokens of the held-out part (the stream's tail).
    pub held_out: usize,
}

impl StreamSplit {
    /// The split of `n` tokens that holds out `eval_fraction` (in [0, 1)) of them; each part
    /// that exists must hold at least 2 tokens (one input, one target).
    pub fn new(n: usize, eval_fraction: f64) -> Result<StreamSplit> {
        if !(0.0..1.0).contains(&eval_fraction) {
            bail!("data.eval_fraction must be in [0, 1) (got {eval_fraction})");
        }
        let held_out = (n as f64 * eval_fraction).ceil() as usize;
        let train = n - held_out;
        if train < 2 || (eval_fraction > 0.0 && held_out < 2) {
            bail!(
                "a stream of {n} tokens is too short to hold out data.eval_fraction = \
                 {eval_fraction}: {train} tokens left to train on, {held_out} held out \
                 (each part needs at least 2)"
            );
        }
        Ok(StreamSplit { train, held_out })
    }
}

impl Source {
    /// Open the training data described by a data config, checking tokens fit the vocabulary:
    /// the recall task for `seed`, or the head of a text or token stream (all but its last
    /// `eval_fraction`).
    pub fn open(cfg: &crate::config::DataConfig, seed: u64, vocab: usize) -> Result<Source> {
        Self::open_split(cfg, seed, vocab, false)
    }

    /// Open the held-out data of the same config, what `rattn eval` scores: the recall task on
    /// a seed no training run uses (seed ^ 0xE7A1_0000_0000_0001), or the tail of the stream,
    /// read window by window in order. An `eval_fraction` of 0 is refused for streams.
    pub fn held_out(cfg: &crate::config::DataConfig, seed: u64, vocab: usize) -> Result<Source> {
        Self::open_split(cfg, seed, vocab, true)
    }

    fn open_split(
        cfg: &crate::config::DataConfig,
        seed: u64,
        vocab: usize,
        held_out: bool,
    ) -> Result<Source> {
        match cfg.kind.as_str() {
            "synthetic" => {
                if vocab < synth::VOCAB {
                    bail!(
                        "the synthetic corpus needs model.vocab >= {} (got {vocab})",
                        synth::VOCAB
                    );
                }
                Ok(Source::Synthetic {
                    seed: if held_out {
                        seed ^ 0xE7A1_0000_0000_0001
                    } else {
                        seed
                    },
                })
            }
            kind => {
                let path = cfg.path.as_deref().context("data.path is required")?;
                if !path.exists() {
                    let hint = cfg
                        .install
                        .as_deref()
                        .map(|c| format!("; `{c}` installs it"))
                        .unwrap_or_default();
                    bail!(
                        "data.path {} (data.kind = {kind:?}) does not exist{hint}",
                        path.display()
                    );
                }
                let tokens = match kind {
                    "text" => read_text_tokens(path, cfg.tokenizer.as_deref())?,
                    _ => read_tokens(path, cfg.token_bits)?,
                };
                if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
                    bail!(
                        "token {t} in {} is outside the vocabulary (model.vocab = {vocab})",
                        path.display()
                    );
                }
                if tokens.len() < 2 {
                    bail!("{} holds fewer than 2 tokens", path.display());
                }
                let split = StreamSplit::new(tokens.len(), cfg.eval_fraction)
                    .with_context(|| format!("splitting {}", path.display()))?;
                if held_out && split.held_out == 0 {
                    bail!(
                        "data.eval_fraction is 0: no part of {} is held out to evaluate on",
                        path.display()
                    );
                }
                let mut tokens = tokens;
                let part = if held_out {
                    tokens.split_off(split.train)
                } else {
                    tokens.truncate(split.train);
                    tokens
                };
                Ok(Source::Stream {
                    tokens: part,
                    shuffle: !held_out,
                })
            }
        }
    }

    /// Sequence `index` of `len` inputs (and `len` targets: one buffer of `len + 1` tokens), with
    /// its loss weights and (recall task) queries.
    pub fn sequence(&self, index: u64, len: usize) -> Sequence {
        match self {
            Source::Synthetic { seed } => {
                let r = recall_sequence(*seed, index, len + 1);
                let mut weights = vec![0.0; len];
                for p in &r.probes {
                    weights[p.pos - 1] = 1.0;
                }
                Sequence {
                    tokens: r.tokens,
                    weights,
                    probes: r.probes,
                }
            }
            Source::Stream { tokens, shuffle } => {
                let n = tokens.len();
                let span = len + 1;
                let windows = (n.saturating_sub(span) / len).max(1) as u64;
                // Training: a deterministic shuffle of window starts via a hash of the index;
                // evaluation: the windows in order (index 0 is the part's first window).
                let w = if *shuffle { mix(index) } else { index } % windows;
                let start = (w as usize * len) % n;
                Sequence {
                    tokens: (0..span).map(|i| tokens[(start + i) % n]).collect(),
                    weights: vec![1.0; len],
                    probes: Vec::new(),
                }
            }
        }
    }
}

/// The `tokenizer.json` that `text` data at `path` uses: the explicit one, else one inside a
/// `path` directory, else none (the byte tokenizer).
pub fn find_tokenizer(path: &Path, explicit: Option<&Path>) -> Option<std::path::PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| Some(path.join("tokenizer.json")).filter(|p| path.is_dir() && p.is_file()))
}

/// Tokenize UTF-8 text at `path` (a file, or every file of a directory in name order, skipping
/// `tokenizer.json`) with a Hugging Face `tokenizer.json` (see [`find_tokenizer`]) or the byte
/// tokenizer.
pub fn read_text_tokens(path: &Path, tokenizer: Option<&Path>) -> Result<Vec<u32>> {
    let Some(tk) = find_tokenizer(path, tokenizer) else {
        return read_text(path);
    };
    let tok = tokenizers::Tokenizer::from_file(&tk)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", tk.display()))?;
    let mut out = Vec::new();
    for f in text_files(path)? {
        if f.file_name().is_some_and(|n| n == "tokenizer.json") {
            continue;
        }
        let s = std::fs::read_to_string(&f)
            .with_context(|| format!("cannot read text file {}", f.display()))?;
        let enc = tok.encode(s.as_str(), false).map_err(|e| {
            anyhow::anyhow!("tokenizing {} with {}: {e}", f.display(), tk.display())
        })?;
        out.extend_from_slice(enc.get_ids());
    }
    Ok(out)
}

fn text_files(path: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in
            std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
        {
            let p = e?.path();
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// Read a UTF-8 file, or every file in a directory (sorted), as bytes: the byte tokenizer (vocab 256).
pub fn read_text(path: &Path) -> Result<Vec<u32>> {
    let files = text_files(path)?;
    let mut out = Vec::new();
    for f in files {
        let s = std::fs::read_to_string(&f)
            .with_context(|| format!("cannot read text file {}", f.display()))?;
        out.extend(s.bytes().map(u32::from));
    }
    Ok(out)
}

/// Read a little-endian u16 or u32 token file.
pub fn read_tokens(path: &Path, bits: u32) -> Result<Vec<u32>> {
    let b = std::fs::read(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    match bits {
        16 if b.len() % 2 == 0 => Ok(b
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect()),
        32 if b.len() % 4 == 0 => Ok(b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        16 | 32 => bail!(
            "{} has {} bytes, not a whole number of u{bits} tokens",
            path.display(),
            b.len()
        ),
        _ => bail!("data.token_bits must be 16 or 32 (got {bits})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_is_deterministic_and_probes_point_at_their_pairs() {
        let a = recall_sequence(3, 17, 257);
        assert_eq!(a, recall_sequence(3, 17, 257));
        assert_ne!(a.tokens, recall_sequence(3, 18, 257).tokens);
        assert_ne!(a.tokens, recall_sequence(4, 17, 257).tokens);
        assert_eq!(a.tokens.len(), 257);
        assert_eq!(a.tokens[0], synth::BOS);
        assert!(!a.probes.is_empty());
        let is_key = |t: u32| (synth::KEYS..synth::KEYS + synth::N_KEYS).contains(&t);
        for p in &a.probes {
            let (key, answer) = (a.tokens[p.pos - 1], a.tokens[p.pos]);
            assert!(is_key(key));
            assert_eq!((answer - synth::FACTS) / synth::N_VALUES, key - synth::KEYS);
            // The pair's last appearance: the same fact token, not seen in between.
            let last = p.pos - p.distance;
            assert_eq!(a.tokens[last], answer);
            assert!(!a.tokens[last + 1..p.pos].contains(&answer));
            // The first appearance is the fact, not an answer.
            let first = a.tokens.iter().position(|&t| t == answer).unwrap();
            assert!(!is_key(a.tokens[first - 1]));
        }
        // A key is bound once per sequence.
        let facts: Vec<u32> = (1..a.tokens.len())
            .filter(|&i| a.tokens[i] >= synth::FACTS && !is_key(a.tokens[i - 1]))
            .map(|i| (a.tokens[i] - synth::FACTS) / synth::N_VALUES)
            .collect();
        let mut unique = facts.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), facts.len());
        assert!((synth::FACTS_PER_SEQUENCE.0..=synth::FACTS_PER_SEQUENCE.1).contains(&facts.len()));
        // Loss weights: exactly the answers.
        let s = Source::Synthetic { seed: 3 }.sequence(17, 256);
        assert_eq!(s.tokens, a.tokens);
        let scored: Vec<usize> = (0..256).filter(|&i| s.weights[i] == 1.0).collect();
        let answers: Vec<usize> = a.probes.iter().map(|p| p.pos - 1).collect();
        assert_eq!(scored, answers);
        assert_eq!(s.weights.iter().sum::<f32>(), a.probes.len() as f32);
    }

    #[test]
    fn recall_queries_cover_every_distance_bucket() {
        // W = 16, 2 local layers: LW = 32, buckets <= 16, 17..32, 33..64, 65..128, > 128.
        let buckets = distance_buckets(16, 2);
        assert_eq!(
            buckets.iter().map(|b| (b.lo, b.hi)).collect::<Vec<_>>(),
            [(1, 16), (17, 32), (33, 64), (65, 128), (129, usize::MAX)]
        );
        let mut counts = vec![0usize; buckets.len()];
        let mut queries = 0;
        for i in 0..200 {
            for p in recall_sequence(0, i, 257).probes {
                queries += 1;
                counts[buckets
                    .iter()
                    .position(|b| b.lo <= p.distance && p.distance <= b.hi)
                    .unwrap()] += 1;
            }
        }
        eprintln!("{queries} queries in 200 sequences, by bucket: {counts:?}");
        assert!(queries > 200 * 30, "{queries}");
        for c in &counts {
            assert!(*c > queries / 20, "{counts:?}");
        }
        // One local layer: no W..LW bucket.
        assert_eq!(distance_buckets(8, 1).len(), 4);
    }

    #[test]
    fn buckets_beyond_the_training_length_double_up_to_the_eval_length() {
        // At the training length (or below) the buckets are the usual ones.
        assert_eq!(length_buckets(16, 2, 256, 256), distance_buckets(16, 2));
        assert_eq!(length_buckets(16, 2, 256, 100), distance_buckets(16, 2));
        let b = length_buckets(16, 2, 256, 2048);
        let got: Vec<(&str, usize, usize)> =
            b.iter().map(|b| (b.label.as_str(), b.lo, b.hi)).collect();
        assert_eq!(
            got,
            [
                ("<= W (16)", 1, 16),
                ("W..LW (17..32)", 17, 32),
                ("LW..2LW (33..64)", 33, 64),
                ("2LW..4LW (65..128)", 65, 128),
                ("4LW..T (129..256)", 129, 256),
                ("T..2T (257..512)", 257, 512),
                ("2T..4T (513..1024)", 513, 1024),
                ("4T..8T (1025..2048)", 1025, 2048),
            ]
        );
        // An eval length between the powers of two: the last bucket still reaches it.
        let b = length_buckets(16, 2, 256, 600);
        assert_eq!((b.last().unwrap().lo, b.last().unwrap().hi), (513, 1024));
        // A window stack reaching past the training length: buckets beyond T are cut at T.
        let b = length_buckets(64, 2, 256, 512);
        let got: Vec<(usize, usize)> = b.iter().map(|b| (b.lo, b.hi)).collect();
        assert_eq!(got, [(1, 64), (65, 128), (129, 256), (257, 512)]);
        assert_eq!(b[2].label, "LW..2LW (129..256)");
        // Every query of a recall sequence at 8T falls in one of them, and the farthest is used.
        let b = length_buckets(16, 2, 256, 2048);
        let mut far = 0;
        for i in 0..20 {
            for p in recall_sequence(0, i, 2049).probes {
                let k = b
                    .iter()
                    .position(|b| b.lo <= p.distance && p.distance <= b.hi);
                far += usize::from(k == Some(b.len() - 1));
                assert!(k.is_some(), "{p:?}");
            }
        }
        assert!(far > 20, "{far} answers at 1025..2048 in 20 sequences");
    }

    fn text_config(dir: &Path, eval_fraction: f64) -> crate::config::DataConfig {
        crate::config::DataConfig {
            kind: "text".into(),
            path: Some(dir.to_path_buf()),
            eval_fraction,
            install: Some("scripts/get_text.sh".into()),
            ..Default::default()
        }
    }

    #[test]
    fn text_is_split_into_a_training_head_and_a_held_out_tail() {
        let dir = tempfile::tempdir().unwrap();
        // 1000 bytes over two files, read in name order.
        // Letters from a hash, so every 17-token window occurs once.
        let letters = |n: u64, base: u8| -> String {
            (0..n)
                .map(|i| (base + (mix(i + base as u64) % 26) as u8) as char)
                .collect()
        };
        let (a, b) = (letters(600, b'a'), letters(400, b'A'));
        std::fs::write(dir.path().join("1.txt"), &a).unwrap();
        std::fs::write(dir.path().join("2.txt"), &b).unwrap();
        let all: Vec<u32> = format!("{a}{b}").bytes().map(u32::from).collect();
        assert_eq!(
            StreamSplit::new(1000, 0.05).unwrap(),
            StreamSplit {
                train: 950,
                held_out: 50
            }
        );
        let cfg = text_config(dir.path(), 0.05);
        let Source::Stream { tokens: train, .. } = Source::open(&cfg, 0, 256).unwrap() else {
            panic!("text is a stream")
        };
        let held = Source::held_out(&cfg, 0, 256).unwrap();
        let Source::Stream { tokens: tail, .. } = &held else {
            panic!("text is a stream")
        };
        assert_eq!(train, all[..950]);
        assert_eq!(tail[..], all[950..]);
        // Training windows come from the head only, in a hashed order, the same every
        // time; held-out windows are the tail's, in order.
        let src = Source::open(&cfg, 7, 256).unwrap();
        for i in 0..50 {
            let s = src.sequence(i, 16);
            assert_eq!(s, Source::open(&cfg, 7, 256).unwrap().sequence(i, 16));
            assert_eq!(s.tokens.len(), 17);
            assert_eq!(s.weights, vec![1.0; 16]);
            let start = train.windows(17).position(|w| w == s.tokens.as_slice());
            assert!(
                start.is_some_and(|p| p % 16 == 0),
                "window {i} at {start:?}"
            );
        }
        // 50 held-out tokens hold (50 − 17) / 16 = 2 whole windows; index 2 starts over.
        for i in 0..2u64 {
            let s = held.sequence(i, 16);
            let at = 950 + 16 * i as usize;
            assert_eq!(s.tokens, all[at..at + 17], "held-out window {i}");
        }
        assert_eq!(held.sequence(2, 16), held.sequence(0, 16));
        // Nothing held out: eval has no data; a bad fraction is named.
        let err = |r: Result<Source>| r.map(|_| ()).unwrap_err();
        let e = err(Source::held_out(&text_config(dir.path(), 0.0), 0, 256));
        assert!(
            format!("{e:#}").contains("data.eval_fraction is 0"),
            "{e:#}"
        );
        let e = err(Source::open(&text_config(dir.path(), 1.0), 0, 256));
        assert!(
            format!("{e:#}").contains("eval_fraction must be in [0, 1)"),
            "{e:#}"
        );
        let e = err(Source::open(&text_config(dir.path(), 0.999), 0, 256));
        assert!(format!("{e:#}").contains("too short"), "{e:#}");
    }

    #[test]
    fn a_missing_corpus_names_the_script_that_installs_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("shakespeare");
        let e = Source::open(&text_config(&missing, 0.05), 0, 256)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("data.path {} ", missing.display()))
                && e.contains("`scripts/get_text.sh` installs it"),
            "{e}"
        );
        // The shipped text config names it too.
        let cfg = crate::config::RunConfig::load(
            Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../configs/text-tiny.toml"
            )),
            &[],
        )
        .unwrap();
        assert_eq!(cfg.data.install.as_deref(), Some("scripts/get_text.sh"));
        assert!(cfg.model.vocab >= 256, "byte tokens need vocab >= 256");
    }

    #[test]
    fn tokenizer_json_is_used_for_text_directories() {
        use std::collections::HashMap;
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::Whitespace;
        let dir = tempfile::tempdir().unwrap();
        let vocab: HashMap<String, u32> = [("[UNK]", 0), ("the", 1), ("cat", 2), ("sat", 3)]
            .iter()
            .map(|(w, i)| (w.to_string(), *i))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tok = tokenizers::Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(Whitespace {}));
        tok.save(dir.path().join("tokenizer.json"), false).unwrap();
        std::fs::write(dir.path().join("a.txt"), "the cat sat").unwrap();
        std::fs::write(dir.path().join("b.txt"), "the dog").unwrap();
        assert_eq!(
            read_text_tokens(dir.path(), None).unwrap(),
            vec![1, 2, 3, 1, 0]
        );
        // Without a tokenizer.json the byte tokenizer reads the same files.
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        assert_eq!(
            read_text_tokens(dir.path(), None).unwrap().len(),
            "the cat satthe dog".len()
        );
        let e = read_text_tokens(dir.path(), Some(Path::new("/nonexistent/tokenizer.json")))
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tokenizer.json"), "{e}");
    }

    #[test]
    fn token_files_round_trip_and_bad_sizes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.bin");
        std::fs::write(&p, [1u8, 0, 2, 0, 255, 255]).unwrap();
        assert_eq!(read_tokens(&p, 16).unwrap(), vec![1, 2, 65535]);
        let e = read_tokens(&p, 32).unwrap_err().to_string();
        assert!(e.contains("6 bytes"), "{e}");
    }
}
