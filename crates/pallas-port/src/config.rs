//! The RLA block contract: attributes ([`RlaConfig`]), shapes ([`RlaDims`]) and errors ([`RlaError`]).
//!
//! Layouts (all row-major f32, DESIGN §3):
//! - `q`: `[B, T, N, H]`, `k`, `v`: `[B, T, G, H]`; query head `n` uses kv head `n / (N / G)`.
//! - `o`: `[B, T, N, H]`.
//! - `chunk_states`: `[B, G, n_chunks, 2H, H]`, the state entering each chunk of `chunk` tokens.
//! - `final_state`: `[B, G, 2H, H]`, the state after all `T` tokens.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Feature map φ applied to raw queries and keys, mapping the head dim `H` to `2H`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FeatureMap {
    /// φ(x) = [softmax(x), softmax(−x)] over the head dim (max-subtracted, fp32).
    #[default]
    Softmax,
    /// φ(x) = [relu(x), relu(−x)].
    Relu,
}

impl FeatureMap {
    /// The attribute spelling: `"softmax"` or `"relu"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FeatureMap::Softmax => "softmax",
            FeatureMap::Relu => "relu",
        }
    }
}

impl fmt::Display for FeatureMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FeatureMap {
    type Err = RlaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "softmax" => Ok(FeatureMap::Softmax),
            "relu" => Ok(FeatureMap::Relu),
            other => Err(RlaError::UnknownFeatureMap(other.to_string())),
        }
    }
}

/// How [`crate::rla_seq_shard`] composes a sequence shard's prefix state h0 (the state of the
/// shards before it): the [`RlaConfig::seq_state`] attribute, the model config's
/// `rla.seq_state` (serialized as `"auto"`, `"kernel"`, `"hlo"`). Results are equal either way
/// (up to fp32 rounding); the choice is for A/B measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeqState {
    /// [`SeqState::Kernel`] with the custom-call lowering, [`SeqState::Hlo`] with the others.
    #[default]
    Auto,
    /// The CPU kernels: the shard's contribution is `rattention.rla_kv_state` and its scan starts
    /// from h0 in `rattention.rla_fwd_h0` / `rla_bwd_h0` (φ(q)·h0, the saved states' h0 and dh0
    /// inside the kernels). Needs the custom-call lowering; with another one building the graph
    /// is an error naming the lowering.
    Kernel,
    /// Graph ops: φ(q)·h0, the contribution's state dot and their VJPs in HLO around the
    /// window-0 blocks (the composition before the kernels took h0; what every lowering but the
    /// custom call builds).
    Hlo,
}

impl SeqState {
    /// The config spelling: `"auto"`, `"kernel"` or `"hlo"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SeqState::Auto => "auto",
            SeqState::Kernel => "kernel",
            SeqState::Hlo => "hlo",
        }
    }

    /// True for `Auto` (the default, which configs need not write out).
    pub fn is_auto(&self) -> bool {
        *self == SeqState::Auto
    }
}

impl fmt::Display for SeqState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SeqState {
    type Err = RlaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(SeqState::Auto),
            "kernel" => Ok(SeqState::Kernel),
            "hlo" => Ok(SeqState::Hlo),
            other => Err(RlaError::Config {
                op: "SeqState::from_str",
                message: format!("unknown seq_state {other:?}: expected auto, kernel or hlo"),
            }),
        }
    }
}

/// Attributes of the RLA blocks (`window`, `sub_chunk`, `chunk`, `feature_map`) and how a
/// sequence shard composes its prefix state (`seq_state`, graph building only: the kernels do
/// not read it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RlaConfig {
    /// Sliding window W: key `s` contributes to query `t` iff `s <= t - W - 1`. Any value ≥ 0.
    pub window: usize,
    /// Sub-chunk size C of the chunked scan (> 0). Results do not depend on it beyond fp32 rounding.
    pub sub_chunk: usize,
    /// Chunk size (a multiple of `sub_chunk`): one state is saved per chunk.
    pub chunk: usize,
    /// Feature map φ.
    pub feature_map: FeatureMap,
    /// How [`crate::rla_seq_shard`] composes a sequence shard's prefix state ([`SeqState`];
    /// default `Auto`). Unused without sequence shards.
    #[serde(default)]
    pub seq_state: SeqState,
}

impl Default for RlaConfig {
    /// W = 512, sub-chunk 64, chunk 512, softmax, `seq_state` auto.
    ///
    /// Sub-chunk 64 was picked with `benches/rla_kernel.rs` (`RLA_BENCH_SUB_CHUNKS=16,32,64,128`) at
    /// B1 N8 G2 H128 T4096: 32 and 64 are within noise of each other (64 better at T=1024
    /// fwd+bwd), 128 is ~25 % slower (more masked intra-sub-chunk work), 16 is no faster.
    fn default() -> Self {
        RlaConfig {
            window: 512,
            sub_chunk: 64,
            chunk: 512,
            feature_map: FeatureMap::Softmax,
            seq_state: SeqState::Auto,
        }
    }
}

impl RlaConfig {
    /// Checks `sub_chunk > 0`, `chunk > 0` and `chunk % sub_chunk == 0`.
    pub fn validate(&self) -> Result<(), RlaError> {
        self.check("RlaConfig::validate")
    }

    pub(crate) fn check(&self, op: &'static str) -> Result<(), RlaError> {
        if self.sub_chunk == 0 || self.chunk == 0 || !self.chunk.is_multiple_of(self.sub_chunk) {
            return Err(RlaError::Config {
                op,
                message: format!(
                    "need sub_chunk > 0, chunk > 0 and chunk % sub_chunk == 0, got sub_chunk={} chunk={}",
                    self.sub_chunk, self.chunk
                ),
            });
        }
        Ok(())
    }
}

/// Shapes of one RLA call: B, T, N, G, H.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RlaDims {
    /// B.
    pub batch: usize,
    /// T (any length ≥ 1; need not be a multiple of the chunk).
    pub seq: usize,
    /// N query heads.
    pub heads: usize,
    /// G kv heads (`heads % kv_heads == 0`).
    pub kv_heads: usize,
    /// H head dim.
    pub head_dim: usize,
}

impl RlaDims {
    /// Checks that every size is ≥ 1 and `heads % kv_heads == 0`.
    pub fn validate(&self) -> Result<(), RlaError> {
        self.check("RlaDims::validate")
    }

    pub(crate) fn check(&self, op: &'static str) -> Result<(), RlaError> {
        let d = self;
        if d.batch == 0 || d.seq == 0 || d.heads == 0 || d.kv_heads == 0 || d.head_dim == 0 {
            return Err(RlaError::Dims {
                op,
                message: format!("every size must be >= 1, got {d}"),
            });
        }
        if !d.heads.is_multiple_of(d.kv_heads) {
            return Err(RlaError::Dims {
                op,
                message: format!(
                    "heads (N={}) must be a multiple of kv_heads (G={}), got {d}",
                    d.heads, d.kv_heads
                ),
            });
        }
        Ok(())
    }

    /// Query heads per kv head, N / G.
    pub fn group_size(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Number of saved chunk states, ceil(T / chunk).
    pub fn n_chunks(&self, cfg: &RlaConfig) -> usize {
        self.seq.div_ceil(cfg.chunk.max(1))
    }

    /// `[B, T, N, H]`, the shape of `q`, `o`, `d_o` and `dq`.
    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.seq, self.heads, self.head_dim]
    }

    /// `[B, T, G, H]`, the shape of `k`, `v`, `dk`, `dv`.
    pub fn kv_shape(&self) -> [usize; 4] {
        [self.batch, self.seq, self.kv_heads, self.head_dim]
    }

    /// `[B, G, n_chunks, 2H, H]`, the shape of `chunk_states`.
    pub fn chunk_states_shape(&self, cfg: &RlaConfig) -> [usize; 5] {
        [
            self.batch,
            self.kv_heads,
            self.n_chunks(cfg),
            2 * self.head_dim,
            self.head_dim,
        ]
    }

    /// `[B, G, 2H, H]`, the shape of `final_state`.
    pub fn final_state_shape(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, 2 * self.head_dim, self.head_dim]
    }

    /// Element count of `q` (and `o`, `d_o`, `dq`).
    pub fn q_len(&self) -> usize {
        self.q_shape().iter().product()
    }

    /// Element count of `k` (and `v`, `dk`, `dv`).
    pub fn kv_len(&self) -> usize {
        self.kv_shape().iter().product()
    }

    /// Element count of `chunk_states`.
    pub fn chunk_states_len(&self, cfg: &RlaConfig) -> usize {
        self.chunk_states_shape(cfg).iter().product()
    }

    /// Element count of `final_state`.
    pub fn final_state_len(&self) -> usize {
        self.final_state_shape().iter().product()
    }
}

impl fmt::Display for RlaDims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "B={} T={} N={} G={} H={}",
            self.batch, self.seq, self.heads, self.kv_heads, self.head_dim
        )
    }
}

/// Errors of the RLA blocks. Each names the op and the offending values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RlaError {
    /// Invalid attributes (`chunk % sub_chunk != 0`, zero sizes).
    #[error("{op}: invalid config: {message}")]
    Config {
        /// The op or function that rejected the config.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Invalid dims (`N % G != 0`, zero sizes).
    #[error("{op}: invalid dims: {message}")]
    Dims {
        /// The op or function that rejected the dims.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A buffer's length does not match its shape.
    #[error("{op}: buffer `{name}` has {actual} elements, expected {expected} for shape {shape:?} ({dims})")]
    BufferLength {
        /// The op that got the buffer.
        op: &'static str,
        /// The argument name (`q`, `k`, `chunk_states`, ...).
        name: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        actual: usize,
        /// The expected shape.
        shape: Vec<usize>,
        /// The call's dims.
        dims: RlaDims,
    },
    /// A feature map name other than `softmax` / `relu`.
    #[error("unknown RLA feature map `{0}` (expected `softmax` or `relu`)")]
    UnknownFeatureMap(String),
}

/// Checks one buffer length against its shape.
pub(crate) fn check_len(
    op: &'static str,
    name: &'static str,
    actual: usize,
    shape: &[usize],
    dims: &RlaDims,
) -> Result<(), RlaError> {
    let expected: usize = shape.iter().product();
    if actual != expected {
        return Err(RlaError::BufferLength {
            op,
            name,
            expected,
            actual,
            shape: shape.to_vec(),
            dims: *dims,
        });
    }
    Ok(())
}
