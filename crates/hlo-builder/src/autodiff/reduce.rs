//! VJP rules of `reduce` with an add, max or min reducer.
//!
//! * add: the cotangent is broadcast back over the reduced dims; the init value gets the sum of
//!   the cotangent.
//! * max/min: the cotangent is split evenly among all positions equal to the result (ties share);
//!   the init value gets none.

use std::panic::Location;

use super::Node;
use crate::builder::{Builder, Kind};
use crate::error::Result;
use crate::ops::elementwise::{BinaryOp, Cmp};
use crate::{ElementType, Op};

/// The binary op a reducer computation applies to its two parameters, if it is that simple.
fn reducer_op(b: &Builder, id: i64) -> Option<BinaryOp> {
    let comp = b.computation_data(id)?;
    if comp.params.len() != 2 {
        return None;
    }
    let root = &comp.instrs[comp.root];
    let Kind::Binary(op) = root.kind else {
        return None;
    };
    let mut ops: Vec<usize> = root.operands.iter().map(|o| o.index()).collect();
    ops.sort_unstable();
    let mut params = comp.params.clone();
    params.sort_unstable();
    (ops == params).then_some(op)
}

/// One entry per operand (`[x, init]`).
pub(super) fn vjp(
    b: &Builder,
    loc: &'static Location<'static>,
    n: &Node,
    ct: Op,
) -> Result<Vec<Option<Op>>> {
    let Kind::Reduce(dims) = &n.kind else {
        return Ok(vec![None; n.operands.len()]);
    };
    let op = match (n.operands.len(), n.called.first()) {
        (2, Some(&id)) => reducer_op(b, id),
        _ => None,
    };
    let Some(op @ (BinaryOp::Add | BinaryOp::Max | BinaryOp::Min)) = op else {
        return Err(b.invalid(
            loc,
            "vjp",
            format!(
                "reduce `{}` (built at {}) is not differentiable: only single-operand reduces with an add, max or min reducer are; give the block a custom_vjp",
                n.full_name, n.built_at
            ),
        ));
    };
    let xs = &n.operand_shapes[0];
    let xd = xs.dims();
    let ty = xs.ty().unwrap_or(ElementType::F32);
    let kept: Vec<i64> = (0..xd.len() as i64).filter(|d| !dims.contains(d)).collect();
    let mut out = vec![None, None];
    if op == BinaryOp::Add {
        if n.need[0] {
            out[0] = Some(b.broadcast_in_dim(ct, xd, &kept)?);
        }
        if n.need[1] {
            let all: Vec<i64> = (0..n.shape.rank() as i64).collect();
            out[1] = Some(if all.is_empty() {
                ct
            } else {
                b.reduce_sum(ct, &all)?
            });
        }
        return Ok(out);
    }
    if n.need[0] {
        let x = n.operands[0];
        let yb = b.broadcast_in_dim(n.op, xd, &kept)?;
        let hit = b.convert(b.compare(x, yb, Cmp::Eq)?, ty)?;
        let count = b.reduce_sum(hit, dims)?;
        let share = b.div(ct, count)?;
        out[0] = Some(b.mul(hit, b.broadcast_in_dim(share, xd, &kept)?)?);
    }
    Ok(out)
}
