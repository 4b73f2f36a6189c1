//! Model configuration: what a TOML `[model]` table says, checked on load.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Errors found while checking a configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A value is out of range or inconsistent with another one.
    #[error("invalid model config: {0}")]
    Invalid(String),
}

/// FFN activation of the gated feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnActivation {
    /// SiLU-gated (SwiGLU).
    Swiglu,
    /// GELU-gated (GeGLU, tanh approximation).
    Geglu,
}

/// What a local layer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalKind {
    /// Sliding-window attention plus residual linear attention (the paper's model).
    Rattention,
    /// Sliding-window attention only (the paper's SWA baseline).
    Swa,
}

impl LocalKind {
    /// The config spelling: `"rattention"` or `"swa"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LocalKind::Rattention => "rattention",
            LocalKind::Swa => "swa",
        }
    }
}

/// The kind of one layer in the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// A local layer (see [`LocalKind`]).
    Local,
    /// Full causal attention (without RoPE unless `global_rope`).
    Global,
}

/// The RLA blocks' enums, owned by pallas-port and read from the same config strings:
/// `rla.feature_map` is `"softmax"` or `"relu"` ([`FeatureMap`]), `rla.lowering` is `"auto"`,
/// `"custom_call"`, `"hlo"` or `"mosaic"` ([`Lowering`], resolved for the platform a graph runs
/// on: custom call on CPU, mosaic on TPU, hlo elsewhere).
pub use pallas_port::{FeatureMap, Lowering};

/// How a sequence shard of RLA composes its prefix state (the state of the shards before it):
/// `rla.seq_state` is `"auto"` (the default: the CPU kernels from h0 with the custom-call
/// lowering, graph ops otherwise), `"kernel"` (the kernels; an error with another lowering) or
/// `"hlo"` (graph ops) ([`SeqState`]). Only sequence-parallel meshes read it.
pub use pallas_port::SeqState;

/// How causal softmax attention (global layers and SWA) is lowered: `"auto"` (the default: our
/// CPU kernels as custom calls on the CPU platform, blocked HLO elsewhere), `"hlo"` or
/// `"kernel"` ([`AttentionLowering`], resolved for the platform a graph runs on).
pub use pallas_port::attention::AttentionLowering;

/// How the train loss (softmax cross-entropy), the RMS norms and the token embedding are lowered:
/// `"auto"` (the default: our CPU kernel pairs as custom calls for a graph on one CPU device,
/// element-wise HLO elsewhere, CPU meshes included), `"hlo"` or `"kernel"` ([`KernelLowering`],
/// resolved for the platform and device count a graph runs on). An explicit `"kernel"` under a
/// CPU mesh runs the kernels in manual regions over the rows (batch and sequence pieces); where
/// the mesh cuts a norm's d_model or the loss's vocab (the default rules cut both over
/// `tensor`) it is an error. The embedding gathers its table whole and runs the kernel on any
/// CPU mesh.
pub use pallas_port::kernel_lowering::KernelLowering;

/// Residual-linear-attention options of local layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlaOptions {
    /// Feature map.
    pub feature_map: FeatureMap,
    /// Tokens per saved state.
    pub chunk: usize,
    /// Tokens per sub-chunk (recomputed in the backward).
    pub sub_chunk: usize,
    /// Lowering choice.
    pub lowering: Lowering,
    /// How a sequence shard composes its prefix state ([`SeqState`]: `"auto"`, `"kernel"`,
    /// `"hlo"`); results are equal (fp32 rounding aside), the choice is for A/B measurements.
    /// Read only with the sequence cut over devices. Written out only when not `"auto"`, so the
    /// `[model]` text stored in checkpoints of default models is unchanged.
    #[serde(skip_serializing_if = "SeqState::is_auto")]
    pub seq_state: SeqState,
    /// GroupRMSNorm of the RLA branch before the mix (DESIGN §2; default on). Off is the
    /// ablation of the paper's norm: ctx = GroupRMSNorm_swa(o_swa) + o_rla, and the layer has no
    /// `rla_norm.scale` parameter. Written out only when off, so the `[model]` text stored in
    /// checkpoints of default models is what it was before the switch existed.
    #[serde(skip_serializing_if = "is_true")]
    pub norm: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for RlaOptions {
    fn default() -> Self {
        Self {
            feature_map: FeatureMap::Softmax,
            chunk: 512,
            sub_chunk: 64,
            lowering: Lowering::Auto,
            seq_state: SeqState::Auto,
            norm: true,
        }
    }
}

/// Compute dtype of activations and matmuls (master weights stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 activations and matmuls with f32 master weights, f32 norms/softmax/RLA state.
    Bf16,
}

impl Dtype {
    /// The element type of activations in this mode.
    pub fn element_type(self) -> hlo_builder::ElementType {
        match self {
            Dtype::F32 => hlo_builder::ElementType::F32,
            Dtype::Bf16 => hlo_builder::ElementType::Bf16,
        }
    }
}

/// Layer pattern: a local:global ratio, or an explicit list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerPattern {
    /// A ratio such as `"3:1"`: three local layers then one global, repeated.
    Ratio(String),
    /// An explicit list such as `["local", "local", "global"]`, repeated to fill the stack.
    List(Vec<LayerKind>),
}

impl Default for LayerPattern {
    fn default() -> Self {
        LayerPattern::Ratio("3:1".into())
    }
}

/// A model configuration (`[model]` in a config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Residual width.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Query heads (N).
    pub heads: usize,
    /// Key/value heads (G); `heads % kv_heads == 0`.
    pub kv_heads: usize,
    /// Head dimension (H).
    pub head_dim: usize,
    /// FFN hidden width.
    pub ffn_dim: usize,
    /// FFN activation.
    #[serde(default = "default_ffn")]
    pub ffn_activation: FfnActivation,
    /// Sliding window W of local layers: key s is visible to query t iff t - W <= s <= t.
    pub window: usize,
    /// Local/global pattern.
    #[serde(default)]
    pub layer_pattern: LayerPattern,
    /// RAttention or plain SWA for local layers.
    #[serde(default = "default_local")]
    pub local_kind: LocalKind,
    /// RLA options.
    #[serde(default)]
    pub rla: RlaOptions,
    /// RoPE base of local layers (and of global layers with `global_rope`).
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE on the q and k of global layers too, the same rotation as local layers (base
    /// `rope_theta`, true positions). Off by default: the paper's RAttention stacks (and AXLearn)
    /// use global layers without positional encoding; on, a stack of global layers is the
    /// paper's full-attention baseline. Written out only when on, so the `[model]` text stored in
    /// checkpoints of default models is what it was before the switch existed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub global_rope: bool,
    /// RMSNorm on q and k (per head) before RoPE.
    #[serde(default)]
    pub qk_norm: bool,
    /// Epsilon of the pre-norm RMSNorms.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Share the embedding with the LM head.
    #[serde(default = "default_true")]
    pub tied_embeddings: bool,
    /// Activation dtype.
    #[serde(default)]
    pub dtype: Dtype,
    /// Training sequence length.
    pub seq_len: usize,
    /// Scan over layers (MaxText's `scan_layers`): the parameters of the layers at the same
    /// position of the pattern's period are stored stacked (`scan.{j}.*`, a leading `layers`
    /// axis) and the forward runs one `while` over the periods, so the graph and XLA's
    /// compile time do not grow with depth. The backward pass then always recomputes each
    /// period from its input (like `train.remat = "layer_inputs"`, whatever `remat` says).
    /// Needs `layers` to be a multiple of the period. Written out only when on.
    #[serde(default, skip_serializing_if = "is_false")]
    pub scan_layers: bool,
    /// With `scan_layers`: periods per trip of the layer loop (JAX's `lax.scan(unroll=)`);
    /// must divide the number of periods. 1 (the default) is the plain scan. `rattn compile`
    /// compiles a second program with 2 to estimate the cost of a scanned step (XLA's cost
    /// analysis counts a loop body once). Written out only when not 1.
    #[serde(default = "default_one", skip_serializing_if = "is_one")]
    pub scan_unroll: usize,
    /// Lowering of causal softmax attention (global layers and SWA; see [`AttentionLowering`]).
    /// Sequence-parallel attention and decoding always use the HLO lowering. Written out only
    /// when not `"auto"`.
    #[serde(default, skip_serializing_if = "AttentionLowering::is_auto")]
    pub attention_lowering: AttentionLowering,
    /// Lowering of the train loss (softmax cross-entropy; see [`KernelLowering`]). `"kernel"`
    /// needs the vocab whole on each device (not cut over `tensor`). Written out only when not
    /// `"auto"`.
    #[serde(default, skip_serializing_if = "KernelLowering::is_auto")]
    pub loss_lowering: KernelLowering,
    /// Lowering of the RMS norms of the forward and the train step (see [`KernelLowering`]);
    /// decoding keeps the HLO norms. `"kernel"` needs the normalised dim whole on each device
    /// (`activation_embed` not cut; the mixing's group norms need head dim whole). Written out
    /// only when not `"auto"`.
    #[serde(default, skip_serializing_if = "KernelLowering::is_auto")]
    pub norm_lowering: KernelLowering,
    /// Lowering of the token embedding of the forward and the train step (a gather and its
    /// scatter-add; see [`KernelLowering`]); decoding keeps the HLO gather. Under a mesh the
    /// kernel reads the whole table on every device. Written out only when not `"auto"`.
    #[serde(default, skip_serializing_if = "KernelLowering::is_auto")]
    pub embed_lowering: KernelLowering,
}

fn default_one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn default_ffn() -> FfnActivation {
    FfnActivation::Swiglu
}
fn default_local() -> LocalKind {
    LocalKind::Rattention
}
fn default_theta() -> f64 {
    5e5
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

impl ModelConfig {
    /// Check every constraint, naming the offending fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (name, v) in [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("ffn_dim", self.ffn_dim),
            ("seq_len", self.seq_len),
        ] {
            if v == 0 {
                return bad(format!("{name} must be > 0"));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "heads ({}) must be divisible by kv_heads ({})",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if self.rla.sub_chunk == 0
            || self.rla.chunk == 0
            || !self.rla.chunk.is_multiple_of(self.rla.sub_chunk)
        {
            return bad(format!(
                "rla.chunk ({}) must be a positive multiple of rla.sub_chunk ({})",
                self.rla.chunk, self.rla.sub_chunk
            ));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad(format!("rope_theta ({}) must be > 0", self.rope_theta));
        }
        if self.norm_eps.is_nan() || self.norm_eps < 0.0 {
            return bad(format!("norm_eps ({}) must be >= 0", self.norm_eps));
        }
        let kinds = self.layer_kinds()?;
        if self.global_rope && !kinds.contains(&LayerKind::Global) {
            return bad(format!(
                "global_rope = true has no effect: layer_pattern {} gives no global layer in {} layers \
                 (set global_rope = false, or a pattern with global layers such as \"0:1\")",
                match &self.layer_pattern {
                    LayerPattern::Ratio(r) => format!("{r:?}"),
                    LayerPattern::List(l) => format!("{l:?}"),
                },
                self.layers
            ));
        }
        Ok(())
    }

    /// The kind of every layer, expanding the pattern.
    pub fn layer_kinds(&self) -> Result<Vec<LayerKind>, ConfigError> {
        let unit: Vec<LayerKind> = match &self.layer_pattern {
            LayerPattern::List(l) if l.is_empty() => {
                return Err(ConfigError::Invalid("layer_pattern list is empty".into()))
            }
            LayerPattern::List(l) => l.clone(),
            LayerPattern::Ratio(r) => {
                let parse = || -> Option<(usize, usize)> {
                    let (a, b) = r.split_once(':')?;
                    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
                };
                let (l, g) = parse().ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "layer_pattern {r:?} is not a ratio like \"3:1\" or a list like [\"local\", \"global\"]"
                    ))
                })?;
                if l + g == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "layer_pattern {r:?} has no layers"
                    )));
                }
                std::iter::repeat_n(LayerKind::Local, l)
                    .chain(std::iter::repeat_n(LayerKind::Global, g))
                    .collect()
            }
        };
        Ok((0..self.layers).map(|i| unit[i % unit.len()]).collect())
    }

    /// Query projection width `heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Key/value projection width `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

impl fmt::Display for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "d_model {} layers {} heads {}/{} head_dim {} ffn {} window {} local {} vocab {} seq {}",
            self.d_model,
            self.layers,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.ffn_dim,
            self.window,
            self.local_kind.as_str(),
            self.vocab,
            self.seq_len
        )
    }
}
