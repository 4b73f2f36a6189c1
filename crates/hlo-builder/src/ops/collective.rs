//! Cross-device collectives for manually partitioned regions (what JAX's `ppermute`,
//! `all_gather` and `psum_scatter` lower to inside `shard_map`, reference/sharding-facts.md §1):
//!
//! ```text
//! collective-permute(x), channel_id=7, source_target_pairs={{0,1},{1,2},{2,3}}
//! all-gather(x), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={1}, use_global_device_ids=true
//! reduce-scatter(x), channel_id=9, replica_groups={{0,1,2,3}}, dimensions={1}, use_global_device_ids=true, to_apply=add
//! ```
//!
//! Ids are global device ids (= partition ids of an SPMD program with one replica). Every
//! collective gets its own `channel_id` (its instruction id, unique in the module), which makes
//! it a cross-partition collective. A device that is no pair's target receives zeros from a
//! `collective-permute`.
//!
//! VJPs: a permute's cotangent goes back along the reversed pairs; `all-gather` and
//! `reduce-scatter` (sum) are each other's transpose.

use std::panic::Location;

use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::elementwise::BinaryOp;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{check_dim, expect_array, Shape, ShapeError, ShapeResult};
use crate::Op;

/// Check replica groups: non-empty, of one size, distinct non-negative ids; returns the size.
fn group_size(op: &'static str, groups: &[Vec<i64>]) -> Result<usize, ShapeError> {
    let Some(first) = groups.first() else {
        return Err(ShapeError::new(op, "needs at least one replica group"));
    };
    let n = first.len();
    let mut seen = std::collections::BTreeSet::new();
    for g in groups {
        if g.len() != n || n == 0 {
            return Err(ShapeError::new(
                op,
                format!("replica groups must be non-empty and of one size, got {groups:?}"),
            ));
        }
        for &d in g {
            if d < 0 || !seen.insert(d) {
                return Err(ShapeError::new(
                    op,
                    format!("device {d} is negative or in two replica groups of {groups:?}"),
                ));
            }
        }
    }
    Ok(n)
}

/// Shape rule of `all_gather`: dim `dim` grows by the group size.
pub fn all_gather(x: &Shape, dim: i64, groups: &[Vec<i64>]) -> ShapeResult {
    const OP: &str = "all_gather";
    let (ty, dims) = expect_array(OP, "operand", x)?;
    let i = check_dim(OP, "gathered dimension", dim, dims.len(), x)?;
    let n = group_size(OP, groups)?;
    let mut out = dims.to_vec();
    out[i] *= n as i64;
    Ok(Shape::array(ty, &out))
}

/// Shape rule of `reduce_scatter`: dim `dim` shrinks by the group size, which must divide it.
pub fn reduce_scatter(x: &Shape, dim: i64, groups: &[Vec<i64>]) -> ShapeResult {
    const OP: &str = "reduce_scatter";
    let (ty, dims) = expect_array(OP, "operand", x)?;
    let i = check_dim(OP, "scattered dimension", dim, dims.len(), x)?;
    let n = group_size(OP, groups)? as i64;
    if dims[i] % n != 0 {
        return Err(ShapeError::new(
            OP,
            format!(
                "dim {dim} of {} does not split into {n} pieces (one per device of a group)",
                x.short()
            ),
        ));
    }
    let mut out = dims.to_vec();
    out[i] /= n;
    Ok(Shape::array(ty, &out))
}

/// Shape rule of `collective_permute`: the operand's shape; every id is the source of at most
/// one pair and the target of at most one.
pub fn collective_permute(x: &Shape, pairs: &[(i64, i64)]) -> ShapeResult {
    const OP: &str = "collective_permute";
    expect_array(OP, "operand", x)?;
    let (mut src, mut dst) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for &(s, t) in pairs {
        if s < 0 || t < 0 || !src.insert(s) || !dst.insert(t) {
            return Err(ShapeError::new(
                OP,
                format!(
                    "pair ({s}, {t}): ids must be non-negative, each a source once and a target \
                     once, in {pairs:?}"
                ),
            ));
        }
    }
    Ok(x.clone())
}

/// The collectives' attributes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Collective {
    /// `collective-permute` with `(source, target)` pairs.
    Permute(Vec<(i64, i64)>),
    /// `all-gather` along a dim within replica groups of global device ids.
    AllGather { dim: i64, groups: Vec<Vec<i64>> },
    /// `reduce-scatter` (sum; the reducer is the called computation) along a dim.
    ReduceScatter { dim: i64, groups: Vec<Vec<i64>> },
}

fn groups_proto(groups: &[Vec<i64>]) -> Vec<proto::ReplicaGroup> {
    groups
        .iter()
        .map(|g| proto::ReplicaGroup {
            replica_ids: g.clone(),
        })
        .collect()
}

impl Family for Collective {
    fn opcode(&self) -> &'static str {
        match self {
            Collective::Permute(_) => "collective-permute",
            Collective::AllGather { .. } => "all-gather",
            Collective::ReduceScatter { .. } => "reduce-scatter",
        }
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        // The instruction id is unique in the module: a channel of its own.
        p.channel_id = p.id;
        match self {
            Collective::Permute(pairs) => {
                p.source_target_pairs = pairs
                    .iter()
                    .map(|&(source, target)| proto::SourceTarget { source, target })
                    .collect();
            }
            Collective::AllGather { dim, groups } | Collective::ReduceScatter { dim, groups } => {
                p.dimensions = vec![*dim];
                p.replica_groups = groups_proto(groups);
                p.use_global_device_ids = true;
            }
        }
    }

    fn array_vjp(&self, b: &Builder, _n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        Ok(vec![Some(match self {
            Collective::Permute(pairs) => {
                let back: Vec<(i64, i64)> = pairs.iter().map(|&(s, t)| (t, s)).collect();
                b.collective_permute(ct, &back)?
            }
            Collective::AllGather { dim, groups } => b.reduce_scatter(ct, *dim, groups)?,
            Collective::ReduceScatter { dim, groups } => b.all_gather(ct, *dim, groups)?,
        })])
    }
}

impl Builder {
    /// `collective-permute`: device `target` receives `x` of device `source` for each pair;
    /// a device that is no target receives zeros. Ids are partition ids.
    #[track_caller]
    pub fn collective_permute(&self, x: Op, pairs: &[(i64, i64)]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "collective_permute", x)?;
        let out = collective_permute(&s, pairs).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Collective(Collective::Permute(pairs.to_vec())),
            vec![x],
            out,
            Vec::new(),
        ))
    }

    /// `all-gather`: within each replica group (global device ids, in order), the devices'
    /// `x` concatenated along `dim`.
    #[track_caller]
    pub fn all_gather(&self, x: Op, dim: i64, groups: &[Vec<i64>]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "all_gather", x)?;
        let out = all_gather(&s, dim, groups).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Collective(Collective::AllGather {
                dim,
                groups: groups.to_vec(),
            }),
            vec![x],
            out,
            Vec::new(),
        ))
    }

    /// `reduce-scatter` with a sum: within each replica group, the devices' `x` summed, and
    /// device `i` of the group keeps piece `i` of the sum along `dim`.
    #[track_caller]
    pub fn reduce_scatter(&self, x: Op, dim: i64, groups: &[Vec<i64>]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "reduce_scatter", x)?;
        let out = reduce_scatter(&s, dim, groups).map_err(|e| self.shape_err(loc, e))?;
        let ty = out.ty().unwrap_or(crate::ElementType::F32);
        let add = self.scalar_reducer(loc, BinaryOp::Add, ty)?;
        Ok(self.push(
            loc,
            Kind::Collective(Collective::ReduceScatter {
                dim,
                groups: groups.to_vec(),
            }),
            vec![x],
            out,
            vec![add],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ElementType::F32;

    #[test]
    fn shape_rules() {
        let x = Shape::array(F32, &[2, 3]);
        let g = vec![vec![0, 1], vec![2, 3]];
        assert_eq!(all_gather(&x, 1, &g).unwrap(), Shape::array(F32, &[2, 6]));
        assert_eq!(
            reduce_scatter(&Shape::array(F32, &[4, 3]), 0, &g).unwrap(),
            Shape::array(F32, &[2, 3])
        );
        let e = reduce_scatter(&x, 1, &g).unwrap_err();
        assert!(e.message.contains("does not split into 2"), "{e}");
        let e = all_gather(&x, 0, &[vec![0, 1], vec![1, 2]]).unwrap_err();
        assert!(e.message.contains("device 1"), "{e}");
        let e = collective_permute(&x, &[(0, 1), (0, 2)]).unwrap_err();
        assert!(e.message.contains("pair (0, 2)"), "{e}");
    }

    #[test]
    fn text_and_vjp() {
        let b = Builder::new("coll");
        let x = b.parameter(Shape::array(F32, &[2, 3]), "x").unwrap();
        let p = b.collective_permute(x, &[(0, 1), (1, 2)]).unwrap();
        let g = b.all_gather(p, 1, &[vec![0, 1, 2]]).unwrap();
        let l = b.reduce_sum(g, &[0, 1]).unwrap();
        let d = b.grad(l, &[x]).unwrap();
        let text = b.build(b.tuple(&[l, d[0]]).unwrap()).unwrap().to_text();
        for want in [
            "source_target_pairs={{0,1},{1,2}}",
            "source_target_pairs={{1,0},{2,1}}",
            "replica_groups={{0,1,2}}",
            "use_global_device_ids=true",
            "reduce-scatter(",
            "channel_id=",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
