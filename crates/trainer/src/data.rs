//! Token sources: the embedded synthetic corpus, UTF-8 text with a byte tokenizer, and
//! pre-tokenized little-endian u16/u32 files. Batches come in a deterministic order from the seed,
//! and the position is a single counter so a run can resume exactly.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Special tokens of the synthetic corpus.
pub mod synth {
    /// Beginning of sequence.
    pub const BOS: u32 = 0;
    /// Marks a fact: `KEY k v`.
    pub const KEY: u32 = 1;
    /// Marks a query: `ASK k` → the model should say `v`.
    pub const ASK: u32 = 2;
    /// First filler token; filler tokens are `FILLER..FILLER + N_FILLER`.
    pub const FILLER: u32 = 4;
    /// Number of filler tokens.
    pub const N_FILLER: u32 = 12;
    /// First key token.
    pub const KEYS: u32 = 16;
    /// Number of distinct keys.
    pub const N_KEYS: u32 = 16;
    /// First value token.
    pub const VALUES: u32 = 64;
    /// Number of distinct values (chance recall is 1 / N_VALUES).
    pub const N_VALUES: u32 = 16;
    /// Smallest vocabulary the corpus needs.
    pub const VOCAB: usize = (VALUES + N_VALUES) as usize;
}

/// One query of the synthetic corpus: where the answer is and how far back the fact was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    /// Position of the answer token (the target predicted from position `pos - 1`).
    pub pos: usize,
    /// Distance in tokens from the fact's value token to the answer.
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
}

/// Generate synthetic sequence number `index` of length `len` for `seed` (pure function).
///
/// Filler follows a noisy local rule (next = 3·prev + 1 mod 12 with probability 0.8), which a
/// sliding window learns. Facts `KEY k v` are placed as the sequence goes, and queries `ASK k v`
/// ask for a fact placed earlier, at distances from a few tokens to most of the sequence, so recall
/// beyond the window needs the RLA or global layers.
pub fn synthetic_sequence(seed: u64, index: u64, len: usize) -> (Vec<u32>, Vec<Probe>) {
    use synth::*;
    let mut rng = Rng(mix(seed ^ mix(index.wrapping_add(0x5151))));
    let mut toks = vec![BOS];
    let mut probes = Vec::new();
    let mut facts: Vec<(u32, u32, usize)> = Vec::new(); // key, value, position of value
    let mut filler = rng.below(N_FILLER as u64) as u32;
    while toks.len() < len {
        let r = rng.below(100);
        let room = len - toks.len();
        if r < 10 && room >= 3 && facts.len() < N_KEYS as usize {
            // New fact with a key not used yet in this sequence.
            let mut k = rng.below(N_KEYS as u64) as u32;
            while facts.iter().any(|f| f.0 == k) {
                k = (k + 1) % N_KEYS;
            }
            let v = rng.below(N_VALUES as u64) as u32;
            toks.extend([KEY, KEYS + k, VALUES + v]);
            facts.push((k, v, toks.len() - 1));
        } else if r < 25 && room >= 3 && !facts.is_empty() {
            let (k, v, at) = facts[rng.below(facts.len() as u64) as usize];
            toks.extend([ASK, KEYS + k, VALUES + v]);
            probes.push(Probe {
                pos: toks.len() - 1,
                distance: toks.len() - 1 - at,
            });
        } else {
            filler = if rng.below(10) < 8 {
                (3 * filler + 1) % N_FILLER
            } else {
                rng.below(N_FILLER as u64) as u32
            };
            toks.push(FILLER + filler);
        }
    }
    toks.truncate(len);
    probes.retain(|p| p.pos < len);
    (toks, probes)
}

/// A source of training/eval sequences.
pub enum Source {
    /// The embedded synthetic corpus.
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

    /// Sequence `index` of `len` tokens (inputs and next-token targets share one buffer of `len + 1`).
    pub fn sequence(&self, index: u64, len: usize) -> Vec<u32> {
        match self {
            Source::Synthetic { seed } => synthetic_sequence(*seed, index, len + 1).0,
            Source::Stream { tokens } => {
                let n = tokens.len();
                let span = len + 1;
                let windows = (n.saturating_sub(span) / len).max(1) as u64;
                // Deterministic shuffle of window starts via a multiplicative hash of the index.
                let w = mix(index) % windows;
                let start = (w as usize * len) % n;
                (0..span).map(|i| tokens[(start + i) % n]).collect()
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
    fn synthetic_is_deterministic_and_probes_point_at_their_facts() {
        let (a, pa) = synthetic_sequence(3, 17, 256);
        let (b, _) = synthetic_sequence(3, 17, 256);
        assert_eq!(a, b);
        assert_ne!(a, synthetic_sequence(3, 18, 256).0);
        assert_eq!(a.len(), 256);
        assert!(!pa.is_empty());
        for p in &pa {
            assert_eq!(a[p.pos - 2], synth::ASK);
            let fact = p.pos - p.distance;
            assert_eq!(a[fact - 2], synth::KEY);
            assert_eq!(a[fact - 1], a[p.pos - 1], "same key");
            assert_eq!(a[fact], a[p.pos], "same value");
        }
        // Over many sequences, queries reach well beyond a 32-token window.
        let far = (0..50)
            .flat_map(|i| synthetic_sequence(0, i, 256).1)
            .filter(|p| p.distance > 64)
            .count();
        assert!(far > 50, "{far}");
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
