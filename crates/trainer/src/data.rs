//! Token sources: the embedded recall task ([`recall_sequence`]), UTF-8 text with a byte
//! tokenizer, and pre-tokenized little-endian u16/u32 files. Batches come in a deterministic order
//! from the seed, and the position is a single counter so a run can resume exactly.

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
        /// All tokens.
        tokens: Vec<u32>,
    },
}

impl Source {
    /// Open the source described by a data config, checking tokens fit the vocabulary.
    pub fn open(cfg: &crate::config::DataConfig, seed: u64, vocab: usize) -> Result<Source> {
        match cfg.kind.as_str() {
            "synthetic" => {
                if vocab < synth::VOCAB {
                    bail!(
                        "the synthetic corpus needs model.vocab >= {} (got {vocab})",
                        synth::VOCAB
                    );
                }
                Ok(Source::Synthetic { seed })
            }
            kind => {
                let path = cfg.path.as_deref().context("data.path is required")?;
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
                Ok(Source::Stream { tokens })
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
            Source::Stream { tokens } => {
                let n = tokens.len();
                let span = len + 1;
                let windows = (n.saturating_sub(span) / len).max(1) as u64;
                // Deterministic shuffle of window starts via a multiplicative hash of the index.
                let w = mix(index) % windows;
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
