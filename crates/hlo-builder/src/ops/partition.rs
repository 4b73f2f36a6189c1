//! The SPMD partitioner's annotations as ops: a sharding constraint, and the two ends of a
//! manually partitioned region — what JAX's `shard_map` lowers to in GSPMD mode
//! (reference/sharding-facts.md §1):
//!
//! ```text
//! s0 = f32[8,4] custom-call(x),  custom_call_target="Sharding",             sharding={devices=[4,1]<=[4]}
//! s1 = f32[2,4] custom-call(s0), custom_call_target="SPMDFullToShardShape", sharding={manual}
//! ... the body on per-device shapes, every instruction {manual} ...
//! s3 = f32[2,4] custom-call(s2), custom_call_target="Sharding",             sharding={manual}
//! o  = f32[8,4] custom-call(s3), custom_call_target="SPMDShardToFullShape", sharding={devices=[4,1]<=[4]}
//! ```
//!
//! The partitioner replaces these custom calls; no backend ever runs them. Inside the region
//! the partitioner leaves every instruction as it is, so ops it cannot split (our RLA custom
//! calls) run on each device's piece. [`Builder::manual_scope`] gives the body's instructions
//! their `{manual}` sharding.
//!
//! VJPs: a constraint's cotangent gets the same constraint; the cotangent of a full→shard is
//! taken back with shard→full and vice versa, so a region's backward pass is a region too.

use std::panic::Location;

use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{expect_array, Shape, ShapeError, ShapeResult};
use crate::sharding::Sharding;
use crate::Op;

/// Shape rule of `full_to_shard`: the array's dims divided by the sharding's tiles.
pub fn full_to_shard(x: &Shape, sharding: &Sharding) -> ShapeResult {
    const OP: &str = "full_to_shard";
    let (ty, dims) = expect_array(OP, "operand", x)?;
    sharding
        .validate(x)
        .map_err(|e| ShapeError::new(OP, e.message))?;
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let shard = sharding
        .shard_dims(&dims)
        .map_err(|e| ShapeError::new(OP, format!("{}: {}", x.short(), e.message)))?;
    let shard: Vec<i64> = shard.iter().map(|&d| d as i64).collect();
    Ok(Shape::array(ty, &shard))
}

/// Shape rule of `shard_to_full`: `full` must split into pieces of the operand's shape.
pub fn shard_to_full(x: &Shape, sharding: &Sharding, full: &[i64]) -> ShapeResult {
    const OP: &str = "shard_to_full";
    let (ty, _) = expect_array(OP, "operand", x)?;
    let whole = Shape::array(ty, full);
    let piece = full_to_shard(&whole, sharding).map_err(|e| ShapeError::new(OP, e.message))?;
    if &piece != x {
        return Err(ShapeError::new(
            OP,
            format!(
                "{} split by {sharding:?} gives pieces {}, but the operand is {}",
                whole.short(),
                piece.short(),
                x.short()
            ),
        ));
    }
    Ok(whole)
}

/// The partitioner annotations.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Partition {
    /// `custom-call "Sharding"`: the value has this sharding here.
    Constraint(Sharding),
    /// `custom-call "SPMDFullToShardShape"`: from the full value of this sharding to one
    /// device's piece, `{manual}`.
    FullToShard(Sharding),
    /// `custom-call "SPMDShardToFullShape"`: from `{manual}` pieces to the full value of this
    /// sharding.
    ShardToFull(Sharding),
}

impl Partition {
    fn target(&self) -> &'static str {
        match self {
            Partition::Constraint(_) => "Sharding",
            Partition::FullToShard(_) => "SPMDFullToShardShape",
            Partition::ShardToFull(_) => "SPMDShardToFullShape",
        }
    }

    /// The sharding of the instruction itself.
    fn instruction_sharding(&self) -> Sharding {
        match self {
            Partition::Constraint(s) | Partition::ShardToFull(s) => s.clone(),
            Partition::FullToShard(_) => Sharding::Manual,
        }
    }
}

impl Family for Partition {
    fn opcode(&self) -> &'static str {
        "custom-call"
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        p.custom_call_target = self.target().to_string();
        // API_VERSION_ORIGINAL, as XLA's own builders make these; the partitioner removes them
        // before any backend sees them.
        p.custom_call_api_version = 1;
        p.sharding = Some(self.instruction_sharding().to_proto());
    }

    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        Ok(vec![Some(match self {
            Partition::Constraint(s) => b.sharding_constraint(ct, s.clone())?,
            Partition::FullToShard(s) => {
                b.shard_to_full(ct, s.clone(), n.operand_shapes[0].dims())?
            }
            Partition::ShardToFull(s) => b.full_to_shard(ct, s.clone())?,
        })])
    }
}

impl Builder {
    fn push_partition(
        &self,
        loc: &'static Location<'static>,
        p: Partition,
        x: Op,
        shape: Shape,
    ) -> Op {
        let sharding = p.instruction_sharding();
        let op = self.push(loc, Kind::Partition(p), vec![x], shape, Vec::new());
        self.set_sharding_unchecked(op, sharding);
        op
    }

    /// Constrain `x` to `sharding` (`custom-call "Sharding"`): the partitioner lays the value out
    /// so at this point, whatever it would have chosen. `Sharding::Manual` marks a value inside
    /// a manual region.
    #[track_caller]
    pub fn sharding_constraint(&self, x: Op, sharding: Sharding) -> Result<Op> {
        let loc = Location::caller();
        let shape = self.shape_of(loc, "sharding_constraint", x)?;
        expect_array("sharding_constraint", "operand", &shape)
            .map_err(|e| self.shape_err(loc, e))?;
        sharding
            .validate(&shape)
            .map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push_partition(loc, Partition::Constraint(sharding), x, shape))
    }

    /// Enter a manual region: `x`, laid out by `sharding`, becomes one device's piece (its dims
    /// divided by the tiles), `{manual}`. Emits the constraint and `SPMDFullToShardShape`.
    #[track_caller]
    pub fn full_to_shard(&self, x: Op, sharding: Sharding) -> Result<Op> {
        let loc = Location::caller();
        let shape = self.shape_of(loc, "full_to_shard", x)?;
        let piece = full_to_shard(&shape, &sharding).map_err(|e| self.shape_err(loc, e))?;
        let pinned = self.push_partition(loc, Partition::Constraint(sharding.clone()), x, shape);
        Ok(self.push_partition(loc, Partition::FullToShard(sharding), pinned, piece))
    }

    /// Leave a manual region: the per-device pieces `x` (`{manual}`) become the full value of
    /// dims `full` laid out by `sharding`. Emits the `{manual}` constraint and
    /// `SPMDShardToFullShape`.
    #[track_caller]
    pub fn shard_to_full(&self, x: Op, sharding: Sharding, full: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let shape = self.shape_of(loc, "shard_to_full", x)?;
        let whole = shard_to_full(&shape, &sharding, full).map_err(|e| self.shape_err(loc, e))?;
        let pinned = self.push_partition(loc, Partition::Constraint(Sharding::Manual), x, shape);
        Ok(self.push_partition(loc, Partition::ShardToFull(sharding), pinned, whole))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ElementType::F32;

    #[test]
    fn pieces_divide_the_full_shape() {
        let s = Sharding::Tiled {
            tile_assignment_dims: vec![2, 1, 2],
            devices: vec![0, 1, 2, 3],
            last_tile_dim_replicate: true,
        };
        let x = Shape::array(F32, &[8, 6]);
        assert_eq!(full_to_shard(&x, &s).unwrap(), Shape::array(F32, &[4, 6]));
        assert_eq!(
            shard_to_full(&Shape::array(F32, &[4, 6]), &s, &[8, 6]).unwrap(),
            x
        );
        let e = full_to_shard(&Shape::array(F32, &[7, 6]), &s).unwrap_err();
        assert!(e.message.contains("dim 0 of size 7"), "{e}");
        let e = shard_to_full(&Shape::array(F32, &[4, 3]), &s, &[8, 6]).unwrap_err();
        assert!(e.message.contains("operand is f32[4,3]"), "{e}");
        assert_eq!(
            full_to_shard(&x, &Sharding::Replicated).unwrap(),
            x,
            "a replicated value is its own piece"
        );
    }

    #[test]
    fn a_region_emits_the_partitioner_custom_calls_and_differentiates() {
        let b = Builder::new("region");
        let x = b.parameter(Shape::array(F32, &[4, 2]), "x").unwrap();
        let s = Sharding::tiled(&[2, 1]);
        let local = b.full_to_shard(x, s.clone()).unwrap();
        assert_eq!(b.shape(local).unwrap(), Shape::array(F32, &[2, 2]));
        let y = {
            let _m = b.manual_scope();
            b.mul(local, local).unwrap()
        };
        assert_eq!(b.sharding(y).unwrap(), Some(Sharding::Manual));
        let full = b.shard_to_full(y, s, &[4, 2]).unwrap();
        let l = b.reduce_sum(full, &[0, 1]).unwrap();
        let g = b.grad(l, &[x]).unwrap();
        let text = b.build(b.tuple(&[l, g[0]]).unwrap()).unwrap().to_text();
        for want in [
            "custom_call_target=\"Sharding\", sharding={devices=[2,1]0,1}",
            "custom_call_target=\"SPMDFullToShardShape\", sharding={manual}",
            "custom_call_target=\"SPMDShardToFullShape\", sharding={devices=[2,1]0,1}",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        // Two regions: the forward one and its transpose in the backward pass.
        assert_eq!(text.matches("SPMDFullToShardShape").count(), 2, "{text}");
        assert_eq!(text.matches("SPMDShardToFullShape").count(), 2, "{text}");
    }
}
