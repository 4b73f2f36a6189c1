//! The parameters' gathers in one collective (`mesh.param_gather`).
//!
//! Under the default rules a parameter is cut over `fsdp` and `seq` (its `embed` dim), and XLA's
//! SPMD partitioner gathers each one where a matmul needs it: one `all-gather` per parameter.
//! XLA's TPU and GPU pipelines combine those gathers; the CPU pipeline combines only
//! all-reduces, so a seq-8 train step of the bench model runs 38 parameter all-gathers, each a
//! rendezvous of 8 device threads (reference: `docs/results/seq-kernel/README.md` §4).
//! [`Model::gather_params`] gathers them all at the start of the step in a manually partitioned
//! region: each device flattens its pieces into one buffer, one `all-gather` per group of
//! parameters cut over the same mesh axes exchanges them, and each parameter is put back
//! together by slices, a transpose and reshapes. The result is the parameter laid out with the
//! gathered axes removed from its spec (the `tensor` cuts stay), so the rest of the step is
//! unchanged.
//!
//! The block is the identity on values; its VJP is the cotangent constrained to the parameter's
//! own sharding, so the partitioner reduces the gradients as it did before (one combined
//! all-reduce on CPU). It holds every gathered parameter for the whole step, which is what a
//! small model on CPU devices wants and what FSDP on a pod does not (a 12B layer stack would be
//! whole on every chip): `auto` combines only on the CPU platform.

use super::{Mesh, MeshAxis, MeshError, PartitionSpec};
use crate::Model;
use hlo_builder::{Builder, Op};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// How a train step gathers the parameters cut over `data`, `fsdp` or `seq`
/// (`mesh.param_gather`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamGather {
    /// [`ParamGather::Combined`] on the CPU platform, [`ParamGather::PerUse`] elsewhere.
    #[default]
    Auto,
    /// All at the start of the step, one all-gather per set of gathered mesh axes
    /// ([`Model::gather_params`]); every gathered parameter stays whole (over those axes) on each
    /// device for the whole step.
    Combined,
    /// Where each use needs it, as the SPMD partitioner places them (FSDP's memory: one layer's
    /// parameters whole at a time).
    PerUse,
}

impl ParamGather {
    /// The concrete choice for a graph of the PJRT platform `platform`: `Auto` is `Combined` on
    /// the CPU platform, `PerUse` elsewhere.
    ///
    /// ```
    /// use model::sharding::ParamGather as G;
    /// assert_eq!(G::Auto.resolve("cpu"), G::Combined);
    /// assert_eq!(G::Auto.resolve("tpu"), G::PerUse);
    /// assert_eq!(G::PerUse.resolve("cpu"), G::PerUse);
    /// ```
    pub fn resolve(self, platform: &str) -> ParamGather {
        match self {
            ParamGather::Auto if pallas_port::graph::is_host_platform(platform) => {
                ParamGather::Combined
            }
            ParamGather::Auto => ParamGather::PerUse,
            g => g,
        }
    }
}

impl fmt::Display for ParamGather {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParamGather::Auto => "auto",
            ParamGather::Combined => "combined",
            ParamGather::PerUse => "per_use",
        })
    }
}

/// The mesh axes a combined gather removes from a parameter's spec: every axis but `tensor`.
fn gathered(axis: MeshAxis) -> bool {
    axis != MeshAxis::Tensor
}

/// How one parameter is gathered: the gathered axes (mesh order), and the spec after it.
struct Plan {
    axes: Vec<MeshAxis>,
    after: PartitionSpec,
}

/// The plan for a parameter laid out by `spec`, or `None` when it is not cut over a gathered
/// axis, or when a dim lists a kept axis after a gathered one (gathering would not give a
/// contiguous block; the partitioner gathers such a parameter where it is used).
fn plan(mesh: &Mesh, spec: &PartitionSpec) -> Option<Plan> {
    let mut axes = Vec::new();
    for dim in &spec.0 {
        let cut: Vec<MeshAxis> = dim.iter().copied().filter(|&a| mesh.size(a) > 1).collect();
        let first_gathered = cut.iter().position(|&a| gathered(a));
        if let Some(i) = first_gathered {
            if cut[i..].iter().any(|&a| !gathered(a)) {
                return None;
            }
            axes.extend_from_slice(&cut[i..]);
        }
    }
    if axes.is_empty() {
        return None;
    }
    axes.sort();
    let after = PartitionSpec(
        spec.0
            .iter()
            .map(|dim| dim.iter().copied().filter(|&a| !gathered(a)).collect())
            .collect(),
    );
    Some(Plan { axes, after })
}

impl Mesh {
    /// The replica groups of a collective over `axes` (mesh order): one group per position of
    /// the other axes, its devices ordered row-major by their coordinates on `axes`.
    fn groups_over(&self, axes: &[MeshAxis]) -> Vec<Vec<i64>> {
        let coords = |id: usize| -> [usize; 4] {
            let mut c = [0; 4];
            let mut rest = id;
            for a in MeshAxis::ALL.into_iter().rev() {
                c[a.index()] = rest % self.size(a);
                rest /= self.size(a);
            }
            c
        };
        let mut groups: std::collections::BTreeMap<Vec<usize>, Vec<(Vec<usize>, i64)>> =
            Default::default();
        for id in 0..self.device_count() {
            let c = coords(id);
            let (mut key, mut pos) = (Vec::new(), Vec::new());
            for a in MeshAxis::ALL {
                if axes.contains(&a) {
                    pos.push(c[a.index()]);
                } else {
                    key.push(c[a.index()]);
                }
            }
            groups.entry(key).or_default().push((pos, id as i64));
        }
        groups
            .into_values()
            .map(|mut g| {
                g.sort();
                g.into_iter().map(|(_, id)| id).collect()
            })
            .collect()
    }
}

impl Model {
    /// `params` (in [`Model::param_specs`] order, annotated with [`Model::param_shardings`]) with
    /// every cut over `data`, `fsdp` and `seq` gathered at once ([`ParamGather::Combined`], the
    /// module docs): the same values, laid out with only their `tensor` cuts. A parameter not cut
    /// over those axes comes back as it is; so does everything on one device. Parameters cut
    /// over the same axes share one `all-gather`.
    pub fn gather_params(&self, b: &Builder, params: &[Op]) -> hlo_builder::Result<Vec<Op>> {
        let mesh = self.mesh();
        let mut out = params.to_vec();
        if mesh.device_count() == 1 {
            return Ok(out);
        }
        let shardings = self
            .param_shardings(mesh)
            .map_err(|e: MeshError| hlo_builder::Error::invalid("gather_params", e.to_string()))?;
        let specs = self.param_specs();
        // Parameters by the axes they are gathered over.
        let mut buckets: std::collections::BTreeMap<Vec<MeshAxis>, Vec<(usize, Plan)>> =
            Default::default();
        for (i, s) in shardings.iter().enumerate() {
            if let Some(p) = plan(mesh, &s.spec) {
                buckets.entry(p.axes.clone()).or_default().push((i, p));
            }
        }
        let _scope = b.name_scope("gather_params");
        for (axes, members) in buckets {
            let inputs: Vec<Op> = members.iter().map(|(i, _)| params[*i]).collect();
            let pieces = members
                .iter()
                .map(|(i, _)| b.full_to_shard(params[*i], shardings[*i].sharding.clone()))
                .collect::<hlo_builder::Result<Vec<Op>>>()?;
            let placed = {
                let _manual = b.manual_scope();
                let mut flat = Vec::with_capacity(members.len());
                for (&piece, (i, _)) in pieces.iter().zip(&members) {
                    let n: usize = shardings[*i].shard_shape.iter().product();
                    flat.push(b.reshape(piece, &[1, n as i64])?);
                }
                let all = b.concatenate(&flat, 1)?;
                let groups = mesh.groups_over(&axes);
                let all = b.all_gather(all, 0, &groups)?;
                let n_dev = groups[0].len() as i64;
                let mut offset = 0i64;
                let mut placed = Vec::with_capacity(members.len());
                for (i, _) in &members {
                    let piece = &shardings[*i].shard_shape;
                    let numel = piece.iter().product::<usize>() as i64;
                    let part = b.slice(all, &[0, offset], &[n_dev, offset + numel], &[1, 1])?;
                    offset += numel;
                    placed.push(self.place(b, mesh, part, &axes, &shardings[*i].spec, piece)?);
                }
                placed
            };
            let mut gathered = Vec::with_capacity(members.len());
            for (&x, (i, p)) in placed.iter().zip(&members) {
                let full: Vec<i64> = specs[*i].shape.iter().map(|&d| d as i64).collect();
                gathered.push(b.shard_to_full(x, mesh.sharding(&p.after), &full)?);
            }
            let tuple = b.tuple(&gathered)?;
            let own: Vec<hlo_builder::Sharding> = members
                .iter()
                .map(|(i, _)| shardings[*i].sharding.clone())
                .collect();
            let rule = move |b: &Builder, _ins: &[Op], _out: Op, ct: &[Option<Op>]| {
                ct.iter()
                    .zip(&own)
                    .map(|(c, s)| c.map(|c| b.sharding_constraint(c, s.clone())).transpose())
                    .collect()
            };
            b.custom_vjp(&inputs, tuple, Arc::new(rule))?;
            for (k, (i, _)) in members.iter().enumerate() {
                out[*i] = b.get_tuple_element(tuple, k)?;
            }
        }
        Ok(out)
    }

    /// One device's piece of a parameter after the gather, from `part` `[n, numel]`: row `r`
    /// holds the piece (of shape `piece`, laid out by `spec`) of the `r`-th device of the group
    /// over `axes` (row-major by their coordinates, mesh order). Each gathered axis moves in
    /// front of its dim's piece, in the order the spec lists it, and merges into that dim.
    fn place(
        &self,
        b: &Builder,
        mesh: &Mesh,
        part: Op,
        axes: &[MeshAxis],
        spec: &PartitionSpec,
        piece: &[usize],
    ) -> hlo_builder::Result<Op> {
        let mut dims: Vec<i64> = axes.iter().map(|&a| mesh.size(a) as i64).collect();
        dims.extend(piece.iter().map(|&d| d as i64));
        let x = b.reshape(part, &dims)?;
        let rank = piece.len();
        let mut perm = Vec::with_capacity(dims.len());
        let mut merged = Vec::with_capacity(rank);
        for (d, cut) in spec.0.iter().enumerate() {
            let mut size = piece[d] as i64;
            for a in cut.iter().filter(|&&a| gathered(a) && mesh.size(a) > 1) {
                let k = axes.iter().position(|x| x == a).expect("planned axis");
                perm.push(k as i64);
                size *= mesh.size(*a) as i64;
            }
            perm.push((axes.len() + d) as i64);
            merged.push(size);
        }
        let x = b.transpose(x, &perm)?;
        b.reshape(x, &merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharding::MeshConfig;

    #[test]
    fn groups_follow_the_mesh_order() {
        let cfg = MeshConfig {
            data: 2,
            seq: 2,
            tensor: 2,
            ..MeshConfig::default()
        };
        let mesh = cfg.resolve(8).unwrap();
        // Device id = data·4 + seq·2 + tensor.
        assert_eq!(
            mesh.groups_over(&[MeshAxis::Data, MeshAxis::Seq]),
            vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]
        );
        assert_eq!(
            mesh.groups_over(&[MeshAxis::Seq]),
            vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
        );
    }

    #[test]
    fn plans_drop_the_gathered_axes_and_refuse_a_kept_axis_after_one() {
        let cfg = MeshConfig {
            fsdp: 2,
            seq: 2,
            tensor: 2,
            ..MeshConfig::default()
        };
        let mesh = cfg.resolve(8).unwrap();
        use MeshAxis::{Fsdp, Seq, Tensor};
        let p = plan(&mesh, &PartitionSpec(vec![vec![Fsdp, Seq], vec![Tensor]])).unwrap();
        assert_eq!(p.axes, vec![Fsdp, Seq]);
        assert_eq!(p.after, PartitionSpec(vec![vec![], vec![Tensor]]));
        assert!(plan(&mesh, &PartitionSpec(vec![vec![Fsdp, Tensor]])).is_none());
        assert!(plan(&mesh, &PartitionSpec(vec![vec![Tensor], vec![]])).is_none());
        let p = plan(&mesh, &PartitionSpec(vec![vec![Tensor, Seq], vec![Fsdp]])).unwrap();
        assert_eq!(p.axes, vec![Fsdp, Seq]);
    }
}
