//! The model's graphs under a mesh: [`Model::with_mesh`] picks the mesh, and the tracing code
//! names the logical axes of its activations ([`Model::constrain`]) and of the RLA blocks'
//! operands ([`Model::rla_sharding`]); the rules decide the rest. On one device nothing is
//! annotated, so 1-device graphs are exactly what they were.

use super::{Mesh, MeshAxis, MeshError, PartitionSpec};
use crate::params::LogicalAxis;
use crate::Model;
use hlo_builder::{Builder, Op, Sharding};

impl Mesh {
    /// The sharding of an array of `shape` whose dim 0 is the batch and whose other dims are
    /// not cut (the token batch `[B, T+1]`); an error names `name` when B does not divide.
    pub fn batch_sharding(&self, name: &str, shape: &[usize]) -> Result<Sharding, MeshError> {
        let mut spec = vec![Vec::new(); shape.len()];
        if let Some(first) = spec.first_mut() {
            *first = self.rules().get(LogicalAxis::Batch).to_vec();
        }
        let spec = PartitionSpec(spec);
        // The spec of the batch dim alone, checked like any tensor's.
        if let Some(&b) = shape.first() {
            self.partition_spec(name, &[b], &[LogicalAxis::Batch])?;
        }
        Ok(self.sharding(&spec))
    }
}

impl Model {
    /// This model with its graphs annotated for `mesh`: parameters, activations at layer
    /// boundaries and the RLA blocks' manual regions follow the mesh's rules. Checks every
    /// parameter's sharding first (errors name the parameter), and with `seq` > 1 that the
    /// sequence length splits into whole shards.
    pub fn with_mesh(mut self, mesh: Mesh) -> Result<Model, MeshError> {
        let seq = mesh.size(MeshAxis::Seq);
        let t = self.config().seq_len;
        if !t.is_multiple_of(seq) {
            return Err(MeshError::SeqLength { seq_len: t, seq });
        }
        let cfg = self.config();
        let global: Vec<String> = self
            .layers()
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.is_local() || cfg.window + 1 >= t)
            .map(|(i, _)| format!("layers.{i}"))
            .collect();
        if seq > 1 && !global.is_empty() && mesh.seq_global().pick(t / seq, cfg.head_dim).is_none()
        {
            return Err(MeshError::ZigzagOddShard {
                seq_len: t,
                seq,
                shard: t / seq,
                twice: 2 * seq,
                layers: global.join(", "),
            });
        }
        self.param_shardings(&mesh)?;
        self.mesh = mesh;
        Ok(self)
    }

    /// How the global layers attend when the mesh cuts the sequence: the scheme
    /// `mesh.seq_global` resolves to ([`super::SeqGlobal::pick`]) for this T and head dim, and
    /// why; `None` without a `seq` cut or without global layers. This is the HLO lowering's
    /// choice; [`Model::seq_global_note_on`] gives the one for a platform.
    pub fn seq_global_note(&self) -> Option<String> {
        self.seq_global_note_with(false)
    }

    /// [`Model::seq_global_note`] for the graph built for `platform`: with the CPU attention
    /// kernel (`model.attention_lowering` auto on CPU) `auto` is dense
    /// ([`super::SeqGlobal::pick_for`]).
    pub fn seq_global_note_on(&self, platform: &str) -> Option<String> {
        let kernel =
            self.attention_lowering(platform) == pallas_port::attention::AttentionLowering::Kernel;
        self.seq_global_note_with(kernel)
    }

    fn seq_global_note_with(&self, kernel: bool) -> Option<String> {
        let seq = self.mesh.size(MeshAxis::Seq);
        let cfg = self.config();
        let t = cfg.seq_len;
        let global = self
            .layers()
            .iter()
            .any(|a| !a.is_local() || cfg.window + 1 >= t);
        if seq <= 1 || !global {
            return None;
        }
        let asked = self.mesh.seq_global();
        let picked = asked.pick_for(t / seq, cfg.head_dim, kernel)?;
        let shard = t / seq;
        let why = if kernel && asked == super::SeqGlobal::Auto {
            "the attention kernel at runtime positions skips the masked blocks".to_string()
        } else if shard % 2 == 1 {
            format!("shards of {shard} tokens, odd: no 2 whole chunks")
        } else {
            format!(
                "chunks of T/(2·seq) = {} tokens, head dim {}",
                shard / 2,
                cfg.head_dim
            )
        };
        Some(format!(
            "global layers: {picked} (mesh.seq_global = {asked}; {why})"
        ))
    }

    /// The mesh the graphs are annotated for (one device unless [`Model::with_mesh`]).
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// The sharding of the activation `name` of `dims` with these logical `axes` under the
    /// model's mesh.
    pub fn activation_sharding(
        &self,
        name: &str,
        dims: &[i64],
        axes: &[LogicalAxis],
    ) -> Result<Sharding, MeshError> {
        let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        let spec = self.mesh.partition_spec(name, &shape, axes)?;
        Ok(self.mesh.sharding(&spec))
    }

    /// Constrain the activation `x` (named `name` in errors) with logical `axes` to its sharding
    /// under the rules (a `Sharding` custom call the partitioner keeps). Nothing on one device.
    pub fn constrain(
        &self,
        b: &Builder,
        x: Op,
        name: &str,
        axes: &[LogicalAxis],
    ) -> hlo_builder::Result<Op> {
        if self.mesh.device_count() == 1 {
            return Ok(x);
        }
        let dims = b.shape(x)?.dims().to_vec();
        let s = self
            .activation_sharding(name, &dims, axes)
            .map_err(|e| b.error("constrain", e.to_string()))?;
        b.sharding_constraint(x, s)
    }

    /// Columns `lo..hi` of the token array `tokens [B, L]` (inputs or targets), laid out as the
    /// token batch arrives: cut by the `batch` rule, whole along the sequence. Without the
    /// constraint the partitioner gives the slice the sequence cut of the activations it feeds
    /// and reshards the `[B, T+1]` batch to reach it (a padded copy, a collective-permute and
    /// an all-gather of the ids on a `seq` mesh); from the whole ids each device later takes
    /// its own columns in place. A plain slice on one device.
    pub fn token_columns(
        &self,
        b: &Builder,
        tokens: Op,
        (lo, hi): (i64, i64),
    ) -> hlo_builder::Result<Op> {
        let cols = b.slice_in_dim(tokens, lo, hi, 1)?;
        if self.mesh.device_count() == 1 {
            return Ok(cols);
        }
        let dims: Vec<usize> = b.shape(cols)?.dims().iter().map(|&d| d as usize).collect();
        let s = self
            .mesh
            .batch_sharding("tokens", &dims)
            .map_err(|e| b.error("token_columns", e.to_string()))?;
        b.sharding_constraint(cols, s)
    }

    /// The layout of the attention regions' q `[B,T,N,H]` (and k, v) when the mesh cuts the
    /// sequence (`seq` > 1 and the `length` rule uses it): [`Model::rla_sharding`]. `None`
    /// otherwise; attention is then left to the partitioner.
    pub fn seq_region(&self, q_dims: &[i64]) -> Result<Option<Sharding>, MeshError> {
        let cuts_t = self
            .mesh
            .rules()
            .get(LogicalAxis::Length)
            .iter()
            .any(|&a| self.mesh.size(a) > 1);
        if !cuts_t {
            return Ok(None);
        }
        self.rla_sharding(q_dims)
    }

    /// The layout of the RLA blocks' q `[B,T,N,H]` (and k, v `[B,T,G,H]`) of `q_dims` under
    /// the mesh: sequences by the `batch` rule, q and kv heads both by the `kv_heads` rule (so
    /// a query head stays with its kv head), T by the `length` rule (sequence parallelism,
    /// [`pallas_port::rla_in_region`]), H whole. `None` on one device; the blocks then run
    /// without a region.
    pub fn rla_sharding(&self, q_dims: &[i64]) -> Result<Option<Sharding>, MeshError> {
        if self.mesh.device_count() == 1 {
            return Ok(None);
        }
        use LogicalAxis::{Batch, HeadDim, KvHeads, Length};
        let shape: Vec<usize> = q_dims.iter().map(|&d| d as usize).collect();
        let spec = self
            .mesh
            .partition_spec("rla.q", &shape, &[Batch, Length, KvHeads, HeadDim])?;
        let kv_heads = self.config().kv_heads;
        self.mesh
            .check_heads("rla.k", &spec, 2, KvHeads, kv_heads)?;
        Ok(Some(self.mesh.sharding(&spec)))
    }
}
