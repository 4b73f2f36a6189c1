//! The device mesh and the logical-axis rules, in MaxText's style: a mesh of named axes
//! (`data`, `fsdp`, `seq`, `tensor`) with sizes, and a rule table mapping each [`LogicalAxis`] to
//! the mesh axes that shard it. A tensor whose dimensions carry logical names gets its
//! [`PartitionSpec`] and GSPMD [`Sharding`] from the rules alone, so the model is written once and
//! sharded many ways. Nothing here depends on a model: [`Model::param_shardings`] applies it to
//! the parameters.
//!
//! ```
//! use model::sharding::{MeshConfig, MeshAxis};
//! use model::LogicalAxis::{Embed, QHeads};
//! let cfg = MeshConfig { fsdp: -1, tensor: 2, ..MeshConfig::default() };
//! let mesh = cfg.resolve(8)?; // fsdp takes the rest: 4
//! assert_eq!(mesh.size(MeshAxis::Fsdp), 4);
//! let spec = mesh.partition_spec("wq", &[64, 64], &[Embed, QHeads])?;
//! // embed → [fsdp, seq] (seq has size 1 here), q_heads → [tensor]
//! assert_eq!(spec.to_string(), "[(fsdp, seq), tensor]");
//! assert_eq!(mesh.shard_shape(&[64, 64], &spec), vec![16, 32]);
//! # Ok::<(), model::sharding::MeshError>(())
//! ```
//!
//! [`Model::param_shardings`]: crate::Model::param_shardings

use crate::params::LogicalAxis;
use crate::Model;
use hlo_builder::Sharding;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A named axis of the device mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MeshAxis {
    /// Data parallelism: batch shards, parameters replicated.
    Data,
    /// Fully sharded data parallelism: batch shards and parameters sharded over `embed`.
    Fsdp,
    /// Sequence (context) parallelism: positions shard.
    Seq,
    /// Tensor parallelism: heads, FFN width and vocabulary shard.
    Tensor,
}

impl MeshAxis {
    /// Every axis in device order, outermost first: device `i` of the mesh sits at the row-major
    /// coordinates of `i` over these axes, so `tensor` groups are neighbouring devices (MaxText's
    /// order: the axis with the most traffic innermost).
    pub const ALL: [MeshAxis; 4] = [
        MeshAxis::Data,
        MeshAxis::Fsdp,
        MeshAxis::Seq,
        MeshAxis::Tensor,
    ];

    /// The name in the config: `data`, `fsdp`, `seq`, `tensor`.
    pub fn name(self) -> &'static str {
        match self {
            MeshAxis::Data => "data",
            MeshAxis::Fsdp => "fsdp",
            MeshAxis::Seq => "seq",
            MeshAxis::Tensor => "tensor",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for MeshAxis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MeshAxis {
    type Err = MeshError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MeshAxis::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| MeshError::UnknownMeshAxis(s.to_string()))
    }
}

/// Everything that can be wrong with a mesh, its rules, or a tensor's sharding under them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// A mesh size that is neither ≥ 1 nor −1.
    #[error("mesh.{axis} = {size}: a mesh size must be >= 1, or -1 for the rest of the devices")]
    BadSize {
        /// The axis.
        axis: MeshAxis,
        /// Its size.
        size: i64,
    },
    /// More than one −1.
    #[error(
        "mesh.{0} and mesh.{1} are both -1: at most one axis may take the rest of the devices"
    )]
    TwoRest(MeshAxis, MeshAxis),
    /// Resolving against no devices.
    #[error("the mesh needs at least one device, got 0")]
    NoDevices,
    /// The sizes do not multiply to the device count.
    #[error("mesh {sizes} spans {product} devices but there are {devices}: make the product of the sizes {devices}, or set one axis to -1")]
    WrongProduct {
        /// The sizes as written, e.g. `data=2, fsdp=2, seq=1, tensor=1`.
        sizes: String,
        /// Their product.
        product: usize,
        /// The device count.
        devices: usize,
    },
    /// The fixed sizes do not divide the device count, so −1 has no integer size.
    #[error("mesh {sizes}: the fixed sizes multiply to {product}, which does not divide the {devices} devices, so mesh.{rest} = -1 has no size")]
    RestNotDivisible {
        /// The sizes as written.
        sizes: String,
        /// The product of the fixed sizes.
        product: usize,
        /// The device count.
        devices: usize,
        /// The −1 axis.
        rest: MeshAxis,
    },
    /// A rule names an unknown mesh axis.
    #[error("unknown mesh axis {0:?} (known: data, fsdp, seq, tensor)")]
    UnknownMeshAxis(String),
    /// A rule names an unknown logical axis.
    #[error("mesh.rules: unknown logical axis {0:?} (known: {known})", known = LogicalAxis::known())]
    UnknownLogicalAxis(String),
    /// A rule lists a mesh axis twice.
    #[error("mesh.rules.{logical} lists mesh axis {axis} twice")]
    RuleRepeats {
        /// The rule.
        logical: LogicalAxis,
        /// The repeated axis.
        axis: MeshAxis,
    },
    /// A tensor's shape and logical axes differ in rank.
    #[error("{tensor}: shape {shape:?} has {} dims but {} logical axes", shape.len(), axes.len())]
    RankMismatch {
        /// The tensor's name.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Its logical axes.
        axes: Vec<LogicalAxis>,
    },
    /// One mesh axis would shard two dimensions of one tensor.
    #[error("{tensor}: mesh axis {axis} would shard both dim {first} ({first_logical}) and dim {second} ({second_logical}); a mesh axis may shard one dimension of a tensor: change mesh.rules.{first_logical} or mesh.rules.{second_logical}")]
    AxisReused {
        /// The tensor's name.
        tensor: String,
        /// The mesh axis.
        axis: MeshAxis,
        /// The first dim it shards.
        first: usize,
        /// Its logical axis.
        first_logical: LogicalAxis,
        /// The second dim.
        second: usize,
        /// Its logical axis.
        second_logical: LogicalAxis,
    },
    /// A dimension is not divisible by the product of its mesh axes.
    #[error("{tensor}: dim {dim} ({logical}) of size {size} is not divisible by {shards} = {axes} (mesh.rules.{logical})")]
    NotDivisible {
        /// The tensor's name.
        tensor: String,
        /// The dim.
        dim: usize,
        /// Its logical axis.
        logical: LogicalAxis,
        /// Its size.
        size: usize,
        /// The mesh axes with their sizes, e.g. `fsdp 4 × tensor 2`.
        axes: String,
        /// Their product.
        shards: usize,
    },
    /// The sequence length does not split into `seq` whole shards.
    #[error("model.seq_len = {seq_len} is not divisible by mesh.seq = {seq}: each sequence shard holds seq_len / seq tokens")]
    SeqLength {
        /// T.
        seq_len: usize,
        /// The `seq` axis size.
        seq: usize,
    },
    /// `mesh.seq_global = "zigzag"` with an odd shard length.
    #[error("mesh.seq_global = \"zigzag\" needs an even shard length: model.seq_len = {seq_len} over mesh.seq = {seq} gives shards of {shard} tokens, which do not split into the 2 chunks each shard attends for in the global layers ({layers}); use a seq_len divisible by 2 × mesh.seq = {twice}, or mesh.seq_global = \"auto\" or \"dense\"")]
    ZigzagOddShard {
        /// T.
        seq_len: usize,
        /// The `seq` axis size.
        seq: usize,
        /// T / seq.
        shard: usize,
        /// 2 × seq.
        twice: usize,
        /// The layers that attend globally (`layers.3, layers.7`).
        layers: String,
    },
    /// A head dimension would split inside a head.
    #[error("{tensor}: dim {dim} ({logical}) holds {heads} heads, not divisible by {shards} = {axes} (mesh.rules.{logical}): a shard would split a head")]
    HeadsNotDivisible {
        /// The tensor's name.
        tensor: String,
        /// The dim.
        dim: usize,
        /// Its logical axis.
        logical: LogicalAxis,
        /// Heads in the dim.
        heads: usize,
        /// The mesh axes with their sizes.
        axes: String,
        /// Their product.
        shards: usize,
    },
}

/// The logical-axis rules: for each [`LogicalAxis`], the mesh axes that shard it (their product
/// is the number of shards; an empty list replicates the dimension). The order within a list is
/// major to minor: `batch = ["data", "fsdp"]` puts shard `d·fsdp + f` on data index `d`, fsdp
/// index `f`.
///
/// In the config each entry of `[mesh.rules]` replaces the default of its logical axis; the others
/// keep theirs. A rule is a list of mesh axis names or one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisRules(BTreeMap<LogicalAxis, Vec<MeshAxis>>);

impl Default for AxisRules {
    /// `batch → [data, fsdp]`, `length → [seq]`, `vocab → [tensor]`, `embed → [fsdp, seq]`,
    /// `q_heads` / `kv_heads` / `mlp → [tensor]`, `head_dim` / `cache_length` / `feature` /
    /// `layers → []`, `activation_embed → [tensor]` (MaxText's: between layers the residual
    /// stream's width is cut over `tensor`), `norm → [tensor]` (MaxText's: the norm scales follow
    /// the activations they multiply, never cut over fsdp or seq).
    ///
    /// `embed → [fsdp, seq]` is MaxText's FSDP over the context axis: on a mesh with `seq` > 1
    /// the parameters and both Adam moments are cut over `seq` as well (gathered for the matmuls
    /// like fsdp's), instead of replicated on every sequence shard. A dim not divisible by
    /// fsdp · seq is an error naming the parameter ([`MeshError::NotDivisible`]); set
    /// `mesh.rules.embed = ["fsdp"]` to keep the parameters whole over `seq`.
    fn default() -> Self {
        use LogicalAxis as L;
        use MeshAxis::{Data, Fsdp, Seq, Tensor};
        let rules = LogicalAxis::ALL.into_iter().map(|a| {
            let m = match a {
                L::Batch => vec![Data, Fsdp],
                L::Length => vec![Seq],
                L::Vocab | L::QHeads | L::KvHeads | L::Mlp | L::ActivationEmbed | L::Norm => {
                    vec![Tensor]
                }
                L::Embed => vec![Fsdp, Seq],
                L::HeadDim | L::CacheLength | L::Feature | L::Layers => vec![],
            };
            (a, m)
        });
        AxisRules(rules.collect())
    }
}

impl AxisRules {
    /// The mesh axes of `axis`.
    pub fn get(&self, axis: LogicalAxis) -> &[MeshAxis] {
        self.0.get(&axis).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Replace the rule of `axis`; an axis listed twice is an error.
    pub fn set(&mut self, axis: LogicalAxis, mesh_axes: Vec<MeshAxis>) -> Result<(), MeshError> {
        for (i, a) in mesh_axes.iter().enumerate() {
            if mesh_axes[..i].contains(a) {
                return Err(MeshError::RuleRepeats {
                    logical: axis,
                    axis: *a,
                });
            }
        }
        self.0.insert(axis, mesh_axes);
        Ok(())
    }

    /// Every rule, in [`LogicalAxis::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (LogicalAxis, &[MeshAxis])> + '_ {
        self.0.iter().map(|(k, v)| (*k, v.as_slice()))
    }
}

impl fmt::Display for AxisRules {
    /// `batch → [data, fsdp], length → [seq], …`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (l, m)) in self.iter().enumerate() {
            let names: Vec<&str> = m.iter().map(|a| a.name()).collect();
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{l} → [{}]", names.join(", "))?;
        }
        Ok(())
    }
}

impl Serialize for AxisRules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m: BTreeMap<&str, Vec<&str>> = self
            .iter()
            .map(|(l, m)| (l.name(), m.iter().map(|a| a.name()).collect()))
            .collect();
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for AxisRules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let given = BTreeMap::<String, OneOrMany>::deserialize(d)?;
        let mut rules = AxisRules::default();
        for (name, v) in given {
            let logical: LogicalAxis = name
                .parse()
                .map_err(|_| serde::de::Error::custom(MeshError::UnknownLogicalAxis(name)))?;
            let names = match v {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            };
            let axes = names
                .iter()
                .map(|n| n.parse::<MeshAxis>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| serde::de::Error::custom(format!("mesh.rules.{logical}: {e}")))?;
            rules.set(logical, axes).map_err(serde::de::Error::custom)?;
        }
        Ok(rules)
    }
}

/// How global layers (full causal attention) run when the mesh cuts the sequence
/// (`mesh.seq_global`; see [`crate::attention::causal_attention_seq_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeqGlobal {
    /// [`SeqGlobal::Zigzag`] where it is measured to win, [`SeqGlobal::Dense`] elsewhere:
    /// zigzag when the shard length T/S is even and its chunks c = T/(2S) hold at least head
    /// dim H tokens ([`SeqGlobal::pick`]).
    #[default]
    Auto,
    /// Load-balanced: the sequence in 2S chunks, shard i attends for chunks i and 2S−1−i
    /// (queries exchanged by `collective-permute`) over their visible key blocks only:
    /// (2S+1)·c² scores per shard for chunks of c = T/(2S) tokens. Needs an even T/S.
    Zigzag,
    /// Each shard's T/S queries against all T gathered keys with the causal mask (4S·c²
    /// scores per shard: twice the causal work, the upper half masked).
    Dense,
}

impl SeqGlobal {
    /// The scheme global layers run with sequence shards of `shard_len` tokens and head dim
    /// `head_dim`: `Auto` is zigzag when `shard_len` is even and c = `shard_len`/2 ≥
    /// `head_dim`, else dense. Below that, on XLA CPU, zigzag's per-block copies of the
    /// queries and per-block outputs (M·c·R·H values each, M = 2S+1 blocks) outweigh the
    /// scores it saves (M·c·R·c); `cargo bench -p rattention-benches --bench sharded_step`
    /// (c = 16, H = 64) runs faster dense, T = 1024 and 2048 over seq 8 (c = 64, 128) faster
    /// zigzag. `None`: `Zigzag` asked for with an odd `shard_len` (no 2 whole chunks).
    pub fn pick(self, shard_len: usize, head_dim: usize) -> Option<SeqGlobal> {
        let even = shard_len.is_multiple_of(2);
        match self {
            SeqGlobal::Auto if even && shard_len / 2 >= head_dim => Some(SeqGlobal::Zigzag),
            SeqGlobal::Auto | SeqGlobal::Dense => Some(SeqGlobal::Dense),
            SeqGlobal::Zigzag => even.then_some(SeqGlobal::Zigzag),
        }
    }

    /// [`SeqGlobal::pick`] for the attention lowering in use: with the CPU attention kernel
    /// (`kernel`, `model.attention_lowering` auto on CPU) `Auto` is always dense. The kernel at
    /// runtime positions skips the key blocks after each shard, so dense computes no masked
    /// block, and it runs faster than the HLO zigzag: `cargo bench -p rattention-benches
    /// --bench seq_global` (global layer, forward + gradients), CPU ms per call seq 8 dense
    /// against zigzag 53.5 / 70.4 at T = 256 (c = 16) and 78.9 / 107.5 at T = 1024 (c = 64;
    /// docs/results/seq-kernel). An explicit `Zigzag` stays zigzag (HLO).
    pub fn pick_for(self, shard_len: usize, head_dim: usize, kernel: bool) -> Option<SeqGlobal> {
        match self {
            SeqGlobal::Auto if kernel => Some(SeqGlobal::Dense),
            s => s.pick(shard_len, head_dim),
        }
    }
}

impl fmt::Display for SeqGlobal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeqGlobal::Auto => "auto",
            SeqGlobal::Zigzag => "zigzag",
            SeqGlobal::Dense => "dense",
        })
    }
}

/// The `[mesh]` table: a size per mesh axis (at most one −1, "the rest of the devices") and the
/// logical-axis rules. The default is a 1-device mesh with [`AxisRules::default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Data-parallel size.
    pub data: i64,
    /// FSDP size.
    pub fsdp: i64,
    /// Tensor-parallel size.
    pub tensor: i64,
    /// Sequence-parallel size.
    pub seq: i64,
    /// Global layers under sequence parallelism: `"auto"` (default), `"zigzag"` or `"dense"`.
    pub seq_global: SeqGlobal,
    /// ZeRO-1 (MaxText's `shard_optimizer_over_data`): both Adam moments are cut, beyond their
    /// parameter's layout, over every mesh axis the parameter is replicated over (`data` first),
    /// and each device updates only its slice of the parameters ([`Mesh::optimizer_spec`]).
    /// Default false: the moments share their parameter's layout.
    pub shard_optimizer: bool,
    /// Logical-axis rules.
    pub rules: AxisRules,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            data: 1,
            fsdp: 1,
            tensor: 1,
            seq: 1,
            seq_global: SeqGlobal::default(),
            shard_optimizer: false,
            rules: AxisRules::default(),
        }
    }
}

impl MeshConfig {
    /// The size of `axis` as written (−1: the rest).
    pub fn size(&self, axis: MeshAxis) -> i64 {
        match axis {
            MeshAxis::Data => self.data,
            MeshAxis::Fsdp => self.fsdp,
            MeshAxis::Seq => self.seq,
            MeshAxis::Tensor => self.tensor,
        }
    }

    fn sizes_text(&self) -> String {
        let v: Vec<String> = MeshAxis::ALL
            .iter()
            .map(|&a| format!("{a}={}", self.size(a)))
            .collect();
        v.join(", ")
    }

    /// Check the sizes without a device count: each ≥ 1 or −1, at most one −1. Returns the −1
    /// axis, if any.
    pub fn check(&self) -> Result<Option<MeshAxis>, MeshError> {
        let mut rest = None;
        for a in MeshAxis::ALL {
            match self.size(a) {
                1.. => {}
                -1 => match rest {
                    None => rest = Some(a),
                    Some(r) => return Err(MeshError::TwoRest(r, a)),
                },
                size => return Err(MeshError::BadSize { axis: a, size }),
            }
        }
        Ok(rest)
    }

    /// The device count the sizes fix on their own: their product, or `None` when one is −1.
    pub fn fixed_device_count(&self) -> Result<Option<usize>, MeshError> {
        Ok(match self.check()? {
            Some(_) => None,
            None => Some(
                MeshAxis::ALL
                    .iter()
                    .map(|&a| self.size(a) as usize)
                    .product(),
            ),
        })
    }

    /// The mesh on `devices` devices: −1 becomes the rest, and the product must equal `devices`.
    pub fn resolve(&self, devices: usize) -> Result<Mesh, MeshError> {
        let rest = self.check()?;
        if devices == 0 {
            return Err(MeshError::NoDevices);
        }
        let fixed: usize = MeshAxis::ALL
            .iter()
            .filter(|&&a| Some(a) != rest)
            .map(|&a| self.size(a) as usize)
            .product();
        let mut sizes = MeshAxis::ALL.map(|a| self.size(a).max(1) as usize);
        if let Some(r) = rest {
            if !devices.is_multiple_of(fixed) {
                return Err(MeshError::RestNotDivisible {
                    sizes: self.sizes_text(),
                    product: fixed,
                    devices,
                    rest: r,
                });
            }
            sizes[r.index()] = devices / fixed;
        } else if fixed != devices {
            return Err(MeshError::WrongProduct {
                sizes: self.sizes_text(),
                product: fixed,
                devices,
            });
        }
        Ok(Mesh {
            sizes,
            rules: self.rules.clone(),
            seq_global: self.seq_global,
            shard_optimizer: self.shard_optimizer,
        })
    }
}

/// Per tensor dimension, the mesh axes that shard it (major to minor); an empty entry is
/// replicated. Displays like `[fsdp, tensor]`, `[(data, fsdp), -]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionSpec(pub Vec<Vec<MeshAxis>>);

impl fmt::Display for PartitionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self
            .0
            .iter()
            .map(|axes| match axes.as_slice() {
                [] => "-".to_string(),
                [a] => a.to_string(),
                many => {
                    let n: Vec<&str> = many.iter().map(|a| a.name()).collect();
                    format!("({})", n.join(", "))
                }
            })
            .collect();
        write!(f, "[{}]", dims.join(", "))
    }
}

/// A resolved mesh: a size per [`MeshAxis`] (their product is the device count) and the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    sizes: [usize; 4],
    rules: AxisRules,
    seq_global: SeqGlobal,
    shard_optimizer: bool,
}

impl Mesh {
    /// The 1-device mesh with the default rules.
    pub fn single() -> Mesh {
        Mesh {
            sizes: [1; 4],
            rules: AxisRules::default(),
            seq_global: SeqGlobal::default(),
            shard_optimizer: false,
        }
    }

    /// The size of `axis`.
    pub fn size(&self, axis: MeshAxis) -> usize {
        self.sizes[axis.index()]
    }

    /// The number of devices (the product of the sizes).
    pub fn device_count(&self) -> usize {
        self.sizes.iter().product()
    }

    /// The rules.
    pub fn rules(&self) -> &AxisRules {
        &self.rules
    }

    /// How global layers run when the sequence is cut (`mesh.seq_global`).
    pub fn seq_global(&self) -> SeqGlobal {
        self.seq_global
    }

    /// Whether the Adam moments are cut over the axes their parameter is replicated over
    /// (`mesh.shard_optimizer`, ZeRO-1).
    pub fn shard_optimizer(&self) -> bool {
        self.shard_optimizer
    }

    /// The ZeRO-1 layout of an optimizer moment of a parameter of `shape` laid out by `spec`:
    /// every mesh axis of size > 1 that `spec` leaves unused (the parameter is replicated over
    /// it), in the order data, fsdp, seq, tensor, is appended as the minor axis of the first
    /// dim whose shard still divides by the axis's size. Appending it minor keeps each device's
    /// moment piece inside its parameter piece, so taking the parameter's slice is local and
    /// only the updated slices are gathered back. An axis that fits no dim leaves the moment
    /// replicated over it (MaxText's `shard_optimizer_over_data` does the same). Without
    /// `mesh.shard_optimizer` nothing is appended: `spec` is returned as it is.
    pub fn optimizer_spec(&self, shape: &[usize], spec: &PartitionSpec) -> PartitionSpec {
        let mut out = spec.clone();
        if !self.shard_optimizer {
            return out;
        }
        for axis in MeshAxis::ALL {
            let size = self.size(axis);
            if size == 1 || out.0.iter().flatten().any(|&a| a == axis) {
                continue;
            }
            let fits = shape
                .iter()
                .zip(&out.0)
                .position(|(&d, axes)| (d / self.shards(axes)).is_multiple_of(size));
            if let Some(dim) = fits {
                out.0[dim].push(axis);
            }
        }
        out
    }

    fn axes_text(&self, axes: &[MeshAxis]) -> String {
        let v: Vec<String> = axes
            .iter()
            .map(|&a| format!("{a} {}", self.size(a)))
            .collect();
        v.join(" × ")
    }

    fn shards(&self, axes: &[MeshAxis]) -> usize {
        axes.iter().map(|&a| self.size(a)).product()
    }

    /// The partition spec of the tensor `name` with this `shape` and `axes` under the rules:
    /// an error names the tensor when a mesh axis would shard two of its dimensions, or when a
    /// dimension is not divisible by the product of its mesh axes.
    pub fn partition_spec(
        &self,
        name: &str,
        shape: &[usize],
        axes: &[LogicalAxis],
    ) -> Result<PartitionSpec, MeshError> {
        if shape.len() != axes.len() {
            return Err(MeshError::RankMismatch {
                tensor: name.to_string(),
                shape: shape.to_vec(),
                axes: axes.to_vec(),
            });
        }
        let mut owner: BTreeMap<MeshAxis, usize> = BTreeMap::new();
        let mut spec = Vec::with_capacity(axes.len());
        for (dim, (&size, &logical)) in shape.iter().zip(axes).enumerate() {
            let mesh_axes = self.rules.get(logical).to_vec();
            for &m in &mesh_axes {
                if let Some(&first) = owner.get(&m) {
                    return Err(MeshError::AxisReused {
                        tensor: name.to_string(),
                        axis: m,
                        first,
                        first_logical: axes[first],
                        second: dim,
                        second_logical: logical,
                    });
                }
                owner.insert(m, dim);
            }
            let shards = self.shards(&mesh_axes);
            if !size.is_multiple_of(shards) {
                return Err(MeshError::NotDivisible {
                    tensor: name.to_string(),
                    dim,
                    logical,
                    size,
                    axes: self.axes_text(&mesh_axes),
                    shards,
                });
            }
            spec.push(mesh_axes);
        }
        Ok(PartitionSpec(spec))
    }

    /// Check that `count` heads in dim `dim` of `name` split into whole heads under `spec`.
    pub fn check_heads(
        &self,
        name: &str,
        spec: &PartitionSpec,
        dim: usize,
        logical: LogicalAxis,
        count: usize,
    ) -> Result<(), MeshError> {
        let axes = &spec.0[dim];
        let shards = self.shards(axes);
        if !count.is_multiple_of(shards) {
            return Err(MeshError::HeadsNotDivisible {
                tensor: name.to_string(),
                dim,
                logical,
                heads: count,
                axes: self.axes_text(axes),
                shards,
            });
        }
        Ok(())
    }

    /// The shape of one device's shard of a tensor of `shape` under `spec`.
    pub fn shard_shape(&self, shape: &[usize], spec: &PartitionSpec) -> Vec<usize> {
        shape
            .iter()
            .zip(&spec.0)
            .map(|(&d, axes)| d / self.shards(axes))
            .collect()
    }

    /// The GSPMD sharding of `spec` over the mesh's devices `0..device_count` (device `i` at the
    /// row-major coordinates of `i` over [`MeshAxis::ALL`]): dim `k` is cut into the product of
    /// its mesh axes' sizes, and the mesh axes no dim uses become a trailing replication dim
    /// (`last_tile_dim_replicate`). Without any cut the value is [`Sharding::Replicated`].
    ///
    /// The tile assignment lists devices with the mesh axes reordered as the spec uses them
    /// (dim 0's axes, dim 1's, …, then the unused axes in mesh order), row-major — what JAX's
    /// `NamedSharding` gives.
    pub fn sharding(&self, spec: &PartitionSpec) -> Sharding {
        let used: Vec<MeshAxis> = spec.0.iter().flatten().copied().collect();
        let unused: Vec<MeshAxis> = MeshAxis::ALL
            .into_iter()
            .filter(|a| !used.contains(a))
            .collect();
        let mut tile_dims: Vec<i64> = spec.0.iter().map(|a| self.shards(a) as i64).collect();
        if tile_dims.iter().all(|&t| t == 1) {
            return Sharding::Replicated;
        }
        let replicas = self.shards(&unused);
        // Row-major strides of the mesh in device order.
        let mut stride = [0usize; 4];
        let mut s = 1;
        for a in MeshAxis::ALL.into_iter().rev() {
            stride[a.index()] = s;
            s *= self.size(a);
        }
        let order: Vec<MeshAxis> = used.iter().chain(&unused).copied().collect();
        let devices = (0..self.device_count())
            .map(|mut k| {
                let mut id = 0;
                for &a in order.iter().rev() {
                    id += (k % self.size(a)) * stride[a.index()];
                    k /= self.size(a);
                }
                id as i64
            })
            .collect();
        if replicas > 1 {
            tile_dims.push(replicas as i64);
        }
        Sharding::Tiled {
            tile_assignment_dims: tile_dims,
            devices,
            last_tile_dim_replicate: replicas > 1,
        }
    }
}

/// One parameter's sharding under a mesh ([`Model::param_shardings`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSharding {
    /// The parameter's name.
    pub name: String,
    /// Per dim, the mesh axes that shard it.
    pub spec: PartitionSpec,
    /// The GSPMD annotation of the parameter (of both its Adam moments in
    /// [`Model::moment_shardings`]).
    pub sharding: Sharding,
    /// One device's shard.
    pub shard_shape: Vec<usize>,
}

impl ParamSharding {
    /// Elements in one device's shard.
    pub fn shard_numel(&self) -> usize {
        self.shard_shape.iter().product()
    }
}

impl Model {
    /// The sharding of every parameter under `mesh`, in [`Model::param_specs`] order, from the
    /// parameters' logical axes and the mesh's rules. Errors name the parameter: a mesh axis
    /// sharding two of its dims, a dim not divisible by its shards, or a head dim (`q_heads`,
    /// `kv_heads`) whose shards would split a head.
    pub fn param_shardings(&self, mesh: &Mesh) -> Result<Vec<ParamSharding>, MeshError> {
        let cfg = self.config();
        self.param_specs()
            .iter()
            .map(|p| {
                let spec = mesh.partition_spec(&p.name, &p.shape, &p.axes)?;
                for (dim, (&size, &logical)) in p.shape.iter().zip(&p.axes).enumerate() {
                    // A heads dim is `heads` on its own or flattened `heads × head_dim`.
                    let heads = match logical {
                        LogicalAxis::QHeads => cfg.heads,
                        LogicalAxis::KvHeads => cfg.kv_heads,
                        _ => continue,
                    };
                    let heads = if size == heads {
                        heads
                    } else {
                        size / cfg.head_dim
                    };
                    mesh.check_heads(&p.name, &spec, dim, logical, heads)?;
                }
                Ok(ParamSharding {
                    name: p.name.clone(),
                    sharding: mesh.sharding(&spec),
                    shard_shape: mesh.shard_shape(&p.shape, &spec),
                    spec,
                })
            })
            .collect()
    }
}

impl Model {
    /// The sharding of both Adam moments of every parameter under `mesh`, in
    /// [`Model::param_specs`] order: the parameter's ([`Model::param_shardings`]), or with
    /// `mesh.shard_optimizer` its ZeRO-1 layout ([`Mesh::optimizer_spec`]), named like the
    /// parameter.
    pub fn moment_shardings(&self, mesh: &Mesh) -> Result<Vec<ParamSharding>, MeshError> {
        let params = self.param_shardings(mesh)?;
        Ok(params
            .into_iter()
            .zip(self.param_specs())
            .map(|(p, s)| {
                let spec = mesh.optimizer_spec(&s.shape, &p.spec);
                ParamSharding {
                    name: p.name,
                    sharding: mesh.sharding(&spec),
                    shard_shape: mesh.shard_shape(&s.shape, &spec),
                    spec,
                }
            })
            .collect())
    }
}

impl fmt::Display for Mesh {
    /// `8 devices = data 1 × fsdp 4 × seq 1 × tensor 2`, `1 device = data 1 × …`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.device_count();
        let noun = if n == 1 { "device" } else { "devices" };
        write!(f, "{n} {noun} = {}", self.axes_text(&MeshAxis::ALL))
    }
}

mod activations;
#[cfg(test)]
mod tests;
