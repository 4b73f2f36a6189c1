//! [`Model`]: a checked configuration with its layer list resolved once, and everything derived
//! from it (parameters, RLA block settings, baselines). The tracing methods live beside the code
//! they trace: the stack in [`transformer`](crate::transformer), decoding in
//! [`decode`](crate::decode), costs in [`cost`](crate::cost).

use crate::config::{ConfigError, LayerKind, LayerPattern, LocalKind, ModelConfig};
use crate::params::{self, ParamSpec};
use crate::sharding::Mesh;

/// Where a row-wise op with a CPU kernel pair (a norm, the loss, the embedding) runs in a graph
/// under the model's mesh (`Model::row_kernel`).
#[derive(Debug, Clone, PartialEq)]
pub enum RowKernel {
    /// The HLO lowering (the op's lowering resolved to HLO).
    Hlo,
    /// The kernel pair on the whole operand (one device).
    Whole,
    /// The kernel pair in a manual region over the rows of the operand laid out by this
    /// sharding ([`pallas_port::row_region`]).
    Region(hlo_builder::Sharding),
}

/// What the backward pass keeps of the forward (`[train] remat`, MaxText's `remat_policy`).
///
/// Serialized in snake_case: `"none"`, `"layer_inputs"`, `"dots_saveable"` (alias
/// `"checkpoint_dots"`), `"dots_with_no_batch_dims_saveable"` (aliases `"minimal"`,
/// `"checkpoint_dots_with_no_batch_dims"`): the names of `jax.checkpoint_policies` and
/// MaxText's `remat_policy`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Remat {
    /// Keep every intermediate value the backward pass needs (fastest, most memory).
    #[default]
    None,
    /// Keep only each layer's input: the backward pass traces every block again from its input
    /// and parameters (`hlo_builder::Builder::checkpoint`), about one more forward of compute.
    /// MaxText's `remat_policy = "full"`, JAX's `nothing_saveable`.
    LayerInputs,
    /// Keep each layer's input and the results of all its matmuls (JAX's `dots_saveable`): the
    /// backward pass traces every block again but takes the projections and the attention
    /// scores from the forward; the norms, activations, softmax and RLA blocks are recomputed.
    #[serde(rename = "dots_saveable", alias = "checkpoint_dots")]
    Dots,
    /// Keep each layer's input and the results of its matmuls without batch dimensions: the
    /// projections (q, k, v, o, FFN gate/up/down), not the attention scores (JAX's
    /// `dots_with_no_batch_dims_saveable`, MaxText's `remat_policy = "minimal"`).
    #[serde(
        rename = "dots_with_no_batch_dims_saveable",
        alias = "minimal",
        alias = "checkpoint_dots_with_no_batch_dims"
    )]
    DotsWithNoBatchDims,
}

impl Remat {
    /// Every policy, from the most values kept to the fewest (the compiled memory follows on
    /// TPU; XLA CPU's buffer assignment can rank `dots_with_no_batch_dims_saveable` below
    /// `layer_inputs`).
    pub const ALL: [Remat; 4] = [
        Remat::None,
        Remat::Dots,
        Remat::DotsWithNoBatchDims,
        Remat::LayerInputs,
    ];

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Remat::None => "none",
            Remat::LayerInputs => "layer_inputs",
            Remat::Dots => "dots_saveable",
            Remat::DotsWithNoBatchDims => "dots_with_no_batch_dims_saveable",
        }
    }

    /// What the backward pass keeps, in words (for `rattn compile` and `rattn dump`).
    pub fn describe(self) -> &'static str {
        match self {
            Remat::None => "every intermediate value",
            Remat::LayerInputs => "each layer's input; the blocks are traced again",
            Remat::Dots => {
                "each layer's input and all its matmul results; the rest of each block is traced again"
            }
            Remat::DotsWithNoBatchDims => {
                "each layer's input and its projections (matmuls without batch dims); the rest of \
                 each block, attention scores included, is traced again"
            }
        }
    }

    /// The checkpoint policy of each block (`None`: blocks are not checkpointed).
    pub fn save_policy(self) -> Option<hlo_builder::autodiff::SavePolicy> {
        use hlo_builder::autodiff::SavePolicy;
        match self {
            Remat::None => None,
            Remat::LayerInputs => Some(SavePolicy::Nothing),
            Remat::Dots => Some(SavePolicy::Dots),
            Remat::DotsWithNoBatchDims => Some(SavePolicy::DotsWithNoBatchDims),
        }
    }
}

impl std::fmt::Display for Remat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the attention of one layer computes: the layer pattern and `local_kind`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attention {
    /// Sliding-window attention plus residual linear attention (a RAttention local layer).
    Rattention,
    /// Sliding-window attention only (a local layer of the SWA baseline).
    Swa,
    /// Full causal attention (a global layer; RoPE only with `global_rope`).
    Global,
}

impl Attention {
    /// The attention of a layer of `kind` in a model whose local layers are `local`.
    pub fn resolve(kind: LayerKind, local: LocalKind) -> Attention {
        match (kind, local) {
            (LayerKind::Global, _) => Attention::Global,
            (LayerKind::Local, LocalKind::Rattention) => Attention::Rattention,
            (LayerKind::Local, LocalKind::Swa) => Attention::Swa,
        }
    }

    /// Local (sliding-window) layers: RAttention and SWA.
    pub fn is_local(self) -> bool {
        self != Attention::Global
    }

    /// Layers with an RLA branch (and its state when decoding).
    pub fn has_rla(self) -> bool {
        self == Attention::Rattention
    }
}

/// A model: its configuration, checked once, and the layer list resolved from it.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut t: toml::Table = toml::from_str(&std::fs::read_to_string("configs/tiny.toml")?)?;
/// let cfg: model::ModelConfig = t.remove("model").unwrap().try_into()?;
/// let m = model::Model::new(cfg)?;
/// let b = hlo_builder::Builder::new("forward");
/// let (_params, named) = m.declare_params(&b)?;
/// let tokens = b.parameter(hlo_builder::Shape::array(hlo_builder::ElementType::S32, &[2, 64]), "tokens")?;
/// let logits = m.forward(&b, &named, tokens, "cpu")?;
/// println!("{}", b.build(logits)?.to_text());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    cfg: ModelConfig,
    layers: Vec<Attention>,
    params: Vec<ParamSpec>,
    /// The mesh its graphs are annotated for ([`Model::with_mesh`]; one device by default).
    pub(crate) mesh: Mesh,
    /// What the backward pass keeps ([`Model::with_remat`]).
    remat: Remat,
    /// Layers per scanned period (`model.scan_layers`); 0 when the stack is unrolled.
    period: usize,
}

/// The shortest period `p` of `layers` that divides its length (`layers[i] == layers[i % p]`).
fn scan_period(layers: &[Attention]) -> usize {
    let n = layers.len();
    (1..=n)
        .find(|&p| n.is_multiple_of(p) && (0..n).all(|i| layers[i] == layers[i % p]))
        .unwrap_or(n.max(1))
}

impl Model {
    /// Check `cfg` (naming the offending fields) and resolve its layers.
    pub fn new(cfg: ModelConfig) -> Result<Model, ConfigError> {
        cfg.validate()?;
        let kinds = cfg.layer_kinds()?;
        let m = Model::resolved(cfg, &kinds);
        let u = m.cfg.scan_unroll;
        if let Some(period) = m.scan_period() {
            let periods = m.layers.len() / period;
            if u == 0 || !periods.is_multiple_of(u) {
                return Err(ConfigError::Invalid(format!(
                    "scan_unroll ({u}) must divide the {periods} periods of {period} layers that \
                     scan_layers loops over ({} layers)",
                    m.layers.len()
                )));
            }
        } else if u != 1 {
            return Err(ConfigError::Invalid(format!(
                "scan_unroll ({u}) needs scan_layers = true"
            )));
        }
        Ok(m)
    }

    fn resolved(cfg: ModelConfig, kinds: &[LayerKind]) -> Model {
        let layers = kinds
            .iter()
            .map(|&k| Attention::resolve(k, cfg.local_kind))
            .collect();
        Model::with_layers(cfg, layers)
    }

    fn with_layers(cfg: ModelConfig, layers: Vec<Attention>) -> Model {
        let mut params = params::specs(&cfg, &layers);
        let period = if cfg.scan_layers {
            let p = scan_period(&layers);
            params = params::stack_specs(&params, p, layers.len());
            p
        } else {
            0
        };
        Model {
            cfg,
            layers,
            params,
            mesh: Mesh::single(),
            remat: Remat::None,
            period,
        }
    }

    /// With `model.scan_layers`: the layers of one scanned period (the shortest repeat of the
    /// layer list that divides the depth: 4 for a 3:1 pattern of 56 layers, 1 when every layer
    /// is alike). `None` when the stack is unrolled.
    pub fn scan_period(&self) -> Option<usize> {
        (self.period > 0).then_some(self.period)
    }

    /// The same model with `model.scan_layers = on` (stacked parameters, one loop over the
    /// periods); mesh and remat policy kept.
    pub fn scanned(&self) -> Model {
        self.with_scan(true)
    }

    /// The same model with `model.scan_layers = off` (one parameter set per layer, the stack
    /// unrolled); mesh and remat policy kept.
    pub fn unrolled(&self) -> Model {
        self.with_scan(false)
    }

    fn with_scan(&self, on: bool) -> Model {
        let cfg = ModelConfig {
            scan_layers: on,
            scan_unroll: if on { self.cfg.scan_unroll } else { 1 },
            ..self.cfg.clone()
        };
        Model {
            mesh: self.mesh.clone(),
            remat: self.remat,
            ..Model::with_layers(cfg, self.layers.clone())
        }
    }

    /// This model's parameter values (in [`Model::param_specs`] order) from the values of the
    /// unrolled model's parameters (in [`Model::unrolled`]'s order): stacked parameters are
    /// their layers' values one after the other. The identity for an unrolled model. For tests
    /// and for converting checkpoints between the layouts.
    pub fn stack_params(&self, unrolled: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ConfigError> {
        let flat = self.unrolled();
        let specs = flat.param_specs();
        if unrolled.len() != specs.len() {
            return Err(ConfigError::Invalid(format!(
                "stack_params: {} values for the {} parameters of the unrolled model",
                unrolled.len(),
                specs.len()
            )));
        }
        let by_name: std::collections::HashMap<&str, &Vec<f32>> = specs
            .iter()
            .map(|s| s.name.as_str())
            .zip(unrolled)
            .collect();
        let get = |name: &str| -> Result<&Vec<f32>, ConfigError> {
            by_name
                .get(name)
                .copied()
                .ok_or_else(|| ConfigError::Invalid(format!("stack_params: no parameter {name:?}")))
        };
        self.params
            .iter()
            .map(|s| {
                if s.stacked.is_empty() {
                    return get(&s.name).cloned();
                }
                let mut v = Vec::with_capacity(s.numel());
                for n in &s.stacked {
                    v.extend_from_slice(get(n)?);
                }
                Ok(v)
            })
            .collect()
    }

    /// The inverse of [`Model::stack_params`]: the unrolled model's parameter values (in
    /// [`Model::unrolled`]'s order) from this model's (in [`Model::param_specs`] order).
    pub fn unstack_params(&self, values: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ConfigError> {
        if values.len() != self.params.len() {
            return Err(ConfigError::Invalid(format!(
                "unstack_params: {} values for {} parameters",
                values.len(),
                self.params.len()
            )));
        }
        let mut by_name: std::collections::HashMap<String, Vec<f32>> = Default::default();
        for (s, v) in self.params.iter().zip(values) {
            if s.stacked.is_empty() {
                by_name.insert(s.name.clone(), v.clone());
                continue;
            }
            let row = v.len() / s.stacked.len();
            for (i, n) in s.stacked.iter().enumerate() {
                by_name.insert(n.clone(), v[i * row..(i + 1) * row].to_vec());
            }
        }
        self.unrolled()
            .param_specs()
            .iter()
            .map(|s| {
                by_name.remove(&s.name).ok_or_else(|| {
                    ConfigError::Invalid(format!("unstack_params: no value for {:?}", s.name))
                })
            })
            .collect()
    }

    /// This model with the rematerialization `policy` in its forward graphs (it changes what
    /// the backward pass keeps, never the numbers).
    pub fn with_remat(mut self, policy: Remat) -> Model {
        self.remat = policy;
        self
    }

    /// The rematerialization policy.
    pub fn remat(&self) -> Remat {
        self.remat
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The attention of every layer, in stack order.
    pub fn layers(&self) -> &[Attention] {
        &self.layers
    }

    /// The parameters in a fixed order: the order of every graph's parameter arguments and of
    /// the train step's state.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Total number of parameters.
    pub fn param_count(&self) -> usize {
        self.params.iter().map(ParamSpec::numel).sum()
    }

    /// The RLA block configuration of the local layers (`window` and the `rla.*` options, the
    /// sequence shards' `rla.seq_state` included).
    pub fn rla_config(&self) -> pallas_port::RlaConfig {
        let c = &self.cfg;
        pallas_port::RlaConfig {
            window: c.window,
            sub_chunk: c.rla.sub_chunk,
            chunk: c.rla.chunk,
            feature_map: c.rla.feature_map,
            seq_state: c.rla.seq_state,
        }
    }

    /// The lowering of the RLA blocks in a graph that runs on `platform` (a PJRT platform name
    /// such as `"cpu"`, `"cuda"`, `"tpu"`): `auto` resolves with
    /// [`pallas_port::Lowering::for_platform`].
    pub fn rla_lowering(&self, platform: &str) -> pallas_port::Lowering {
        self.cfg.rla.lowering.for_platform(platform)
    }

    /// The lowering of causal softmax attention in a graph that runs on `platform`: `auto`
    /// resolves with [`pallas_port::attention::AttentionLowering::for_platform`] (our kernels on
    /// `"cpu"`, HLO elsewhere).
    pub fn attention_lowering(&self, platform: &str) -> pallas_port::attention::AttentionLowering {
        self.cfg.attention_lowering.for_platform(platform)
    }

    /// The lowering of the train loss in a graph that runs on `platform`: `auto` resolves with
    /// [`pallas_port::kernel_lowering::KernelLowering::resolve`] (our kernels on one CPU
    /// device, HLO elsewhere). An explicit `"kernel"` under a mesh runs the kernels in manual
    /// regions over the rows, or is an error where the mesh cuts the feature dim
    /// (`Model::row_kernel`).
    pub fn loss_lowering(&self, platform: &str) -> pallas_port::kernel_lowering::KernelLowering {
        self.cfg
            .loss_lowering
            .resolve(platform, self.mesh().device_count())
    }

    /// The lowering of the token embedding in a graph that runs on `platform`, as
    /// [`Model::loss_lowering`] resolves it.
    pub fn embed_lowering(&self, platform: &str) -> pallas_port::kernel_lowering::KernelLowering {
        self.cfg
            .embed_lowering
            .resolve(platform, self.mesh().device_count())
    }

    /// The lowering of the RMS norms in a graph that runs on `platform`, as
    /// [`Model::loss_lowering`] resolves it.
    pub fn norm_lowering(&self, platform: &str) -> pallas_port::kernel_lowering::KernelLowering {
        self.cfg
            .norm_lowering
            .resolve(platform, self.mesh().device_count())
    }

    /// Where one row-wise op whose lowering resolved to the kernel pair runs under this model's
    /// mesh, for its operand `name` of `dims` with logical `axes` (the last the feature dim the
    /// kernel reduces over): on the whole value on one device ([`RowKernel::Whole`]), else in a
    /// manual region over the rows laid out by the rules ([`RowKernel::Region`]; on a mesh only
    /// an explicit `model.{key} = "kernel"` gets here, `auto` resolves to HLO).
    /// `gather_feature`: the op takes the feature dim whole whatever the rules say (the
    /// embedding's result, which the partitioner re-cuts after the region). Errors: a mesh that
    /// cuts the feature dim (naming `op`, the key, the dim and the mesh axes), a dim the rules
    /// do not divide.
    pub(crate) fn row_kernel(
        &self,
        op: &'static str,
        key: &str,
        name: &str,
        dims: &[i64],
        axes: &[crate::params::LogicalAxis],
        gather_feature: bool,
    ) -> Result<RowKernel, String> {
        let mesh = self.mesh();
        if mesh.device_count() == 1 {
            return Ok(RowKernel::Whole);
        }
        let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        let mut spec = mesh
            .partition_spec(name, &shape, axes)
            .map_err(|e| e.to_string())?;
        let last = spec.0.last_mut().expect("row-wise ops have a feature dim");
        let cut: Vec<&str> = last
            .iter()
            .filter(|a| mesh.size(**a) > 1)
            .map(|a| a.name())
            .collect();
        if gather_feature {
            last.clear();
        } else if !cut.is_empty() {
            return Err(format!(
                "{op}: model.{key} = \"kernel\" runs the kernel on each device's rows with \
                     the feature dim whole, but the mesh cuts dim {} of {name} {dims:?} ({}) \
                     over {}; use \"auto\" or \"hlo\" (the HLO lowering)",
                dims.len() - 1,
                axes[axes.len() - 1],
                cut.join(" × ")
            ));
        }
        // Even a layout that cuts nothing (every device holds the whole operand) is a region:
        // outside one the partitioner would see the custom calls.
        Ok(RowKernel::Region(mesh.sharding(&spec)))
    }

    /// The paper's SWA baseline: the same layers and window, local layers without RLA.
    pub fn swa_baseline(&self) -> Model {
        let layers = self
            .layers
            .iter()
            .map(|&a| if a.has_rla() { Attention::Swa } else { a })
            .collect();
        let cfg = ModelConfig {
            local_kind: LocalKind::Swa,
            ..self.cfg.clone()
        };
        Model::with_layers(cfg, layers)
    }

    /// The full-attention baseline: every layer global.
    pub fn full_baseline(&self) -> Model {
        let cfg = ModelConfig {
            layer_pattern: LayerPattern::List(vec![LayerKind::Global]),
            local_kind: LocalKind::Swa,
            ..self.cfg.clone()
        };
        Model::with_layers(cfg, vec![Attention::Global; self.layers.len()])
    }
}
