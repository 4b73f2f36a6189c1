//! The parameter tree: names, shapes, roles, logical axes and initialisers, without allocating
//! anything. [`Model::param_specs`](crate::Model::param_specs) lists a model's parameters.

use crate::config::ModelConfig;
use crate::model::Attention;
use std::fmt;
use std::str::FromStr;

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every element is 1 (norm scales).
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f32),
}

/// What a parameter is to the model: decides weight decay, FLOP counts and (later) sharding
/// defaults, so nothing downstream guesses from names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// The token embedding `[vocab, embed]`: a gather in the input, and the LM head's matrix when
    /// embeddings are tied.
    Embedding,
    /// A weight matrix entering a matmul (attention and FFN projections, an untied LM head).
    Matrix,
    /// An RMSNorm scale (pre-norms, qk-norm, the RAttention mixing norms, the final norm).
    NormScale,
}

/// The logical name of one tensor dimension, in MaxText's style: a sharding rule table maps these
/// names to mesh axes, so the model is written once and sharded many ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogicalAxis {
    /// Sequences of a batch (activations, tokens, caches).
    Batch,
    /// Positions of a sequence (activations, tokens).
    Length,
    /// The vocabulary.
    Vocab,
    /// The residual width `d_model` of the parameters that project it.
    Embed,
    /// The `d_model` dim of an RMSNorm scale (the pre-norms, the final norm): MaxText's `norm`,
    /// ruled apart from `embed` so the scales follow the activations they multiply (default
    /// `[tensor]`, like `activation_embed`) instead of being cut over fsdp and seq, where every
    /// use would gather a vector of d_model floats.
    Norm,
    /// Query heads; a flattened `heads × head_dim` projection dim is named by its heads.
    QHeads,
    /// Key/value heads; a flattened `kv_heads × head_dim` projection dim is named by its heads.
    KvHeads,
    /// The head dim H on its own (per-head norm scales).
    HeadDim,
    /// The FFN hidden width.
    Mlp,
    /// The slots of a decode cache: the W+1 ring-buffer entries of a local layer, the `max_len`
    /// positions of a global layer.
    CacheLength,
    /// The feature dim 2H of φ (rows of the RLA state `[B, G, 2H, H]`).
    Feature,
    /// The residual width `d_model` of activations `[batch, length, activation_embed]` at layer
    /// boundaries (MaxText's `activation_embed`): its own rule, because `embed` shards the
    /// parameters over `fsdp`, which already cuts the activations' batch.
    ActivationEmbed,
    /// The leading axis of a parameter stacked over the periods of the layer pattern
    /// (`model.scan_layers`): one row per period. Never sharded by the default rules (each
    /// device holds every layer's piece; the other axes shard as usual).
    Layers,
}

impl LogicalAxis {
    /// Every axis, in declaration order.
    pub const ALL: [LogicalAxis; 13] = [
        LogicalAxis::Batch,
        LogicalAxis::Length,
        LogicalAxis::Vocab,
        LogicalAxis::Embed,
        LogicalAxis::Norm,
        LogicalAxis::QHeads,
        LogicalAxis::KvHeads,
        LogicalAxis::HeadDim,
        LogicalAxis::Mlp,
        LogicalAxis::CacheLength,
        LogicalAxis::Feature,
        LogicalAxis::ActivationEmbed,
        LogicalAxis::Layers,
    ];

    /// The name a config rule table keys on: `batch`, `length`, `vocab`, `embed`, `norm`, `q_heads`,
    /// `kv_heads`, `head_dim`, `mlp`, `cache_length`, `feature`, `activation_embed`, `layers`.
    pub fn name(self) -> &'static str {
        match self {
            LogicalAxis::Batch => "batch",
            LogicalAxis::Length => "length",
            LogicalAxis::Vocab => "vocab",
            LogicalAxis::Embed => "embed",
            LogicalAxis::Norm => "norm",
            LogicalAxis::QHeads => "q_heads",
            LogicalAxis::KvHeads => "kv_heads",
            LogicalAxis::HeadDim => "head_dim",
            LogicalAxis::Mlp => "mlp",
            LogicalAxis::CacheLength => "cache_length",
            LogicalAxis::Feature => "feature",
            LogicalAxis::ActivationEmbed => "activation_embed",
            LogicalAxis::Layers => "layers",
        }
    }
}

impl LogicalAxis {
    /// Every axis name, comma-separated, for errors that list them.
    pub fn known() -> String {
        let names: Vec<&str> = LogicalAxis::ALL.iter().map(|a| a.name()).collect();
        names.join(", ")
    }
}

impl fmt::Display for LogicalAxis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`LogicalAxis`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown logical axis {0:?} (known: {known})", known = LogicalAxis::known())]
pub struct UnknownAxis(pub String);

impl FromStr for LogicalAxis {
    type Err = UnknownAxis;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LogicalAxis::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownAxis(s.to_string()))
    }
}

/// One named parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Dotted name, e.g. `layers.3.attn.wq`.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// What the parameter is.
    pub role: ParamRole,
    /// The logical axis of every dimension (`axes.len() == shape.len()`).
    pub axes: Vec<LogicalAxis>,
    /// Initialiser.
    pub init: Init,
    /// For a parameter stacked over the periods of the layer pattern (`model.scan_layers`):
    /// the names of the unrolled model's parameters it holds, row `i` of dim 0 being
    /// `stacked[i]` (`scan.0.attn.wq` holds `layers.0.attn.wq`, `layers.4.attn.wq`, ... for a
    /// period of 4). Empty for an ordinary parameter.
    pub stacked: Vec<String>,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The parameters of a model with these resolved `layers`, in a fixed order (the order of the
/// train step's arguments).
pub(crate) fn specs(cfg: &ModelConfig, layers: &[Attention]) -> Vec<ParamSpec> {
    use LogicalAxis::{Embed, HeadDim, KvHeads, Mlp, Norm, QHeads, Vocab};
    let d = cfg.d_model;
    let std = 0.02f32;
    let out_std = std / (2.0 * cfg.layers as f32).sqrt();
    let mut v = Vec::new();
    let mut push =
        |name: String, dims: &[(usize, LogicalAxis)], (role, init): (ParamRole, Init)| {
            v.push(ParamSpec {
                name,
                shape: dims.iter().map(|x| x.0).collect(),
                role,
                axes: dims.iter().map(|x| x.1).collect(),
                init,
                stacked: Vec::new(),
            })
        };
    // Matrices are drawn with std 0.02, the output projections (wo, w_down) scaled down by
    // sqrt(2·layers); norm scales start at 1.
    let (matrix, out) = (
        (ParamRole::Matrix, Init::Normal(std)),
        (ParamRole::Matrix, Init::Normal(out_std)),
    );
    let scale = (ParamRole::NormScale, Init::Ones);
    let (embed, vocab, mlp) = ((d, Embed), (cfg.vocab, Vocab), (cfg.ffn_dim, Mlp));
    let norm = (d, Norm);
    let (q, kv) = ((cfg.q_dim(), QHeads), (cfg.kv_dim(), KvHeads));
    let head_dim = (cfg.head_dim, HeadDim);
    push(
        "embed".into(),
        &[vocab, embed],
        (ParamRole::Embedding, Init::Normal(std)),
    );
    for (i, attn) in layers.iter().enumerate() {
        let p = format!("layers.{i}");
        push(format!("{p}.attn_norm.scale"), &[norm], scale);
        push(format!("{p}.attn.wq"), &[embed, q], matrix);
        push(format!("{p}.attn.wk"), &[embed, kv], matrix);
        push(format!("{p}.attn.wv"), &[embed, kv], matrix);
        push(format!("{p}.attn.wo"), &[q, embed], out);
        if cfg.qk_norm {
            push(format!("{p}.attn.q_norm.scale"), &[head_dim], scale);
            push(format!("{p}.attn.k_norm.scale"), &[head_dim], scale);
        }
        if attn.has_rla() {
            let heads = [(cfg.heads, QHeads), head_dim];
            push(format!("{p}.attn.swa_norm.scale"), &heads, scale);
            if cfg.rla.norm {
                push(format!("{p}.attn.rla_norm.scale"), &heads, scale);
            }
        }
        push(format!("{p}.ffn_norm.scale"), &[norm], scale);
        push(format!("{p}.ffn.w_gate"), &[embed, mlp], matrix);
        push(format!("{p}.ffn.w_up"), &[embed, mlp], matrix);
        push(format!("{p}.ffn.w_down"), &[mlp, embed], out);
    }
    push("final_norm.scale".into(), &[norm], scale);
    if !cfg.tied_embeddings {
        push("lm_head".into(), &[embed, vocab], matrix);
    }
    v
}

/// The parameters of `unrolled` (from [`specs`]) with the layers stacked over the periods of
/// the layer pattern: `layers.{p·period + j}.X` become row `p` of `scan.{j}.X`, of shape
/// `[layers / period, ...]` with a leading [`LogicalAxis::Layers`]. The other parameters keep
/// their place; the stacked ones take the place of layer 0's.
pub(crate) fn stack_specs(
    unrolled: &[ParamSpec],
    period: usize,
    n_layers: usize,
) -> Vec<ParamSpec> {
    let periods = n_layers / period;
    let mut v = Vec::new();
    for spec in unrolled {
        let Some((layer, rest)) = layer_of(&spec.name) else {
            v.push(spec.clone());
            continue;
        };
        if layer >= period {
            continue;
        }
        let mut shape = vec![periods];
        shape.extend(&spec.shape);
        let mut axes = vec![LogicalAxis::Layers];
        axes.extend(&spec.axes);
        v.push(ParamSpec {
            name: format!("scan.{layer}.{rest}"),
            shape,
            role: spec.role,
            axes,
            init: spec.init,
            stacked: (0..periods)
                .map(|p| format!("layers.{}.{rest}", p * period + layer))
                .collect(),
        });
    }
    v
}

/// `layers.{i}.rest` as `(i, rest)`.
pub(crate) fn layer_of(name: &str) -> Option<(usize, &str)> {
    let (i, rest) = name.strip_prefix("layers.")?.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// SplitMix64: a tiny counter-based generator, so initialisation depends only on (seed, name, index).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across platforms and Rust versions (unlike DefaultHasher).
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Deterministic host initialisation of one parameter from `seed`: the same (seed, name) always gives
/// the same values, whatever else the model contains.
///
/// A stacked parameter (`model.scan_layers`) is its unrolled parameters' values one after the
/// other, so a scanned model starts from exactly the unrolled model's weights.
pub fn init_param(spec: &ParamSpec, seed: u64) -> Vec<f32> {
    if !spec.stacked.is_empty() {
        let row = ParamSpec {
            shape: spec.shape[1..].to_vec(),
            axes: spec.axes[1..].to_vec(),
            stacked: Vec::new(),
            ..spec.clone()
        };
        return spec
            .stacked
            .iter()
            .flat_map(|name| {
                init_param(
                    &ParamSpec {
                        name: name.clone(),
                        ..row.clone()
                    },
                    seed,
                )
            })
            .collect();
    }
    let n = spec.numel();
    match spec.init {
        Init::Ones => vec![1.0; n],
        Init::Normal(std) => {
            let base = splitmix64(seed ^ name_hash(&spec.name));
            (0..n)
                .map(|i| {
                    // Box–Muller on two 53-bit uniforms in (0, 1].
                    let a = splitmix64(base ^ (2 * i as u64));
                    let b = splitmix64(base ^ (2 * i as u64 + 1));
                    let u1 = ((a >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                    let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (z * std as f64) as f32
                })
                .collect()
        }
    }
}
