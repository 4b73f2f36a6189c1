//! Reductions: `reduce` with a reducer computation (variadic), and `reduce_sum/max/min`.
//!
//! VJP (single-operand reduces whose reducer is one add, max or min):
//! * add: the cotangent is broadcast back over the reduced dims; the init value gets the sum of
//!   the cotangent.
//! * max/min: the cotangent is split evenly among all positions equal to the result (ties
//!   share); the init value gets none.

use std::panic::Location;

use crate::autodiff::{Ct, Node};
use crate::builder::{Builder, CompData};
use crate::error::Result;
use crate::ops::elementwise::{BinaryOp, Cmp};
use crate::ops::{array_cts, Family, Kind};
use crate::proto;
use crate::shape::{check_dim, expect_array, Shape, ShapeError, ShapeResult};
use crate::{Computation, ElementType, Op};

/// Shape rule of a (variadic) `reduce` of `operands` with `inits` over `dims`, given the
/// reducer's parameter shapes and result shape. The result is an array for one operand, a tuple
/// otherwise.
pub fn reduce(
    operands: &[Shape],
    inits: &[Shape],
    reducer_params: &[Shape],
    reducer_result: &Shape,
    dims: &[i64],
) -> ShapeResult {
    const OP: &str = "reduce";
    let n = operands.len();
    if n == 0 || inits.len() != n {
        return Err(ShapeError::new(
            OP,
            format!(
                "needs as many init values as operands (>= 1), got {n} operands and {} inits",
                inits.len()
            ),
        ));
    }
    let (_, d0) = expect_array(OP, "operand 0", &operands[0])?;
    let mut seen = vec![false; d0.len()];
    for &d in dims {
        let i = check_dim(OP, "reduced dimension", d, d0.len(), &operands[0])?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(ShapeError::new(
                OP,
                format!("dimension {d} reduced twice in {dims:?}"),
            ));
        }
    }
    let mut outs = Vec::with_capacity(n);
    let mut scalars = Vec::with_capacity(n);
    for (i, (x, init)) in operands.iter().zip(inits).enumerate() {
        let (ty, d) = expect_array(OP, "operand", x)?;
        if d != d0 {
            return Err(ShapeError::new(
                OP,
                format!(
                    "operand {i} {} has other dims than operand 0 {}",
                    x.short(),
                    operands[0].short()
                ),
            ));
        }
        if !init.is_scalar() || init.ty() != Some(ty) {
            return Err(ShapeError::new(
                OP,
                format!(
                    "init value {i} must be a scalar {ty}, got {} (operand {})",
                    init.short(),
                    x.short()
                ),
            ));
        }
        scalars.push(Shape::scalar(ty));
        let kept: Vec<i64> = (0..d.len()).filter(|&j| !seen[j]).map(|j| d[j]).collect();
        outs.push(Shape::array(ty, &kept));
    }
    let mut want_params = scalars.clone();
    want_params.extend(scalars.iter().cloned());
    let want_result = if n == 1 {
        scalars[0].clone()
    } else {
        Shape::Tuple(scalars)
    };
    if reducer_params != want_params.as_slice() || reducer_result != &want_result {
        let ps: Vec<String> = reducer_params.iter().map(Shape::short).collect();
        let ws: Vec<String> = want_params.iter().map(Shape::short).collect();
        return Err(ShapeError::new(
            OP,
            format!(
                "reducer must be ({}) -> {}, got ({}) -> {}",
                ws.join(", "),
                want_result.short(),
                ps.join(", "),
                reducer_result.short()
            ),
        ));
    }
    Ok(if n == 1 {
        outs.remove(0)
    } else {
        Shape::Tuple(outs)
    })
}

impl Builder {
    /// Reduce `x` over `dims` with `reducer` (a `(T, T) -> T` computation) starting from `init`.
    #[track_caller]
    pub fn reduce(&self, x: Op, init: Op, reducer: &Computation, dims: &[i64]) -> Result<Op> {
        self.reduce_variadic(&[x], &[init], reducer, dims)
    }

    /// Variadic reduce of several same-dims operands at once; the reducer takes
    /// `(acc_0..acc_n, x_0..x_n)` and returns a tuple. Returns a tuple op for n > 1.
    #[track_caller]
    pub fn reduce_variadic(
        &self,
        xs: &[Op],
        inits: &[Op],
        reducer: &Computation,
        dims: &[i64],
    ) -> Result<Op> {
        let loc = Location::caller();
        let data = self.check_comp(loc, "reduce", reducer)?;
        let mut ops = xs.to_vec();
        ops.extend_from_slice(inits);
        let s = self.shapes_of(loc, "reduce", &ops)?;
        let (xs_s, inits_s) = s.split_at(xs.len());
        self.push_reduce(loc, ops, (xs_s, inits_s), data, dims)
    }

    /// The module's cached `(T, T) -> T` reducer applying `op`.
    #[track_caller]
    pub(crate) fn scalar_reducer(
        &self,
        loc: &'static Location<'static>,
        op: BinaryOp,
        ty: ElementType,
    ) -> Result<i64> {
        if let Some(&id) = self
            .module
            .reducers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(op, ty))
        {
            return Ok(id);
        }
        let name = format!("region_{}_{}", op.opcode(), ty.name());
        let r = self.sub_builder(&name);
        let a = r.parameter(Shape::scalar(ty), "Arg_0")?;
        let b = r.parameter(Shape::scalar(ty), "Arg_1")?;
        let s = r.binary(op, a, b).map_err(|e| match e {
            crate::Error::Shape { source, .. } => self.shape_err(loc, source),
            other => other,
        })?;
        let c = r.build(s)?;
        self.module
            .reducers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((op, ty), c.id());
        Ok(c.id())
    }

    #[track_caller]
    fn reduce_with(&self, op: BinaryOp, init: f64, x: Op, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, op.opcode(), x)?;
        let ty = s.ty().ok_or_else(|| {
            self.shape_err(
                loc,
                ShapeError::new(
                    "reduce",
                    format!("operand must be an array, got {}", s.short()),
                ),
            )
        })?;
        let rid = self.scalar_reducer(loc, op, ty)?;
        let init = self.scalar_typed(ty, init)?;
        let data = self
            .computation_data(rid)
            .ok_or_else(|| self.error_at(loc, "reduce", "cached reducer vanished"))?;
        self.push_reduce(
            loc,
            vec![x, init],
            (&[s], &[Shape::scalar(ty)]),
            &data,
            dims,
        )
    }

    /// Checks a reduce of `ops` (inputs then inits, with these shapes) with `reducer` over `dims`
    /// and appends it.
    fn push_reduce(
        &self,
        loc: &'static Location<'static>,
        ops: Vec<Op>,
        (xs, inits): (&[Shape], &[Shape]),
        reducer: &CompData,
        dims: &[i64],
    ) -> Result<Op> {
        let out = reduce(
            xs,
            inits,
            &reducer.param_shapes(),
            reducer.result_shape(),
            dims,
        )
        .map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Reduce(Reduce(dims.to_vec())),
            ops,
            out,
            vec![reducer.id],
        ))
    }

    /// Sum over `dims`.
    #[track_caller]
    pub fn reduce_sum(&self, x: Op, dims: &[i64]) -> Result<Op> {
        self.reduce_with(BinaryOp::Add, 0.0, x, dims)
    }

    /// Max-subtracted softmax over `axis` (negative counts from the end, as in JAX:
    /// −1 is the last dim): `exp(x − max) / Σ exp(x − max)`, composed of
    /// `reduce_max`, `exp`, `reduce_sum` and `divide` (a composite, not a new opcode). The one
    /// softmax that the model's attention and the RLA feature map use.
    #[track_caller]
    pub fn softmax(&self, x: Op, axis: i64) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "softmax", x)?;
        let dims = s.dims().to_vec();
        let rank = dims.len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&axis) {
            return Err(self.error_at(
                loc,
                "softmax",
                format!("axis {axis} is out of range for {}", s.short()),
            ));
        }
        let keep: Vec<i64> = (0..rank).filter(|&d| d != axis).collect();
        let max = self.broadcast_in_dim(self.reduce_max(x, &[axis])?, &dims, &keep)?;
        let e = self.exp(self.sub(x, max)?)?;
        let z = self.broadcast_in_dim(self.reduce_sum(e, &[axis])?, &dims, &keep)?;
        self.div(e, z)
    }

    /// Maximum over `dims` (init: -inf for floats, the type's minimum for integers).
    #[track_caller]
    pub fn reduce_max(&self, x: Op, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let ty = self.shape_of(loc, "reduce_max", x)?.ty();
        let init = match ty {
            Some(t) if t.is_float() => f64::NEG_INFINITY,
            Some(t) if t.is_signed_integer() => i64::MIN as f64,
            _ => 0.0,
        };
        self.reduce_with(BinaryOp::Max, init, x, dims)
    }

    /// Minimum over `dims` (init: +inf for floats, the type's maximum for integers).
    #[track_caller]
    pub fn reduce_min(&self, x: Op, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let ty = self.shape_of(loc, "reduce_min", x)?.ty();
        let init = match ty {
            Some(t) if t.is_float() => f64::INFINITY,
            _ => u64::MAX as f64,
        };
        self.reduce_with(BinaryOp::Min, init, x, dims)
    }
}

/// Attributes of `reduce`: the reduced dims (the reducer is the called computation).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reduce(pub(crate) Vec<i64>);

impl Family for Reduce {
    fn opcode(&self) -> &'static str {
        "reduce"
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        p.dimensions = self.0.clone();
    }

    fn vjp(&self, b: &Builder, n: &Node, ct: Ct) -> Result<Vec<Option<Ct>>> {
        match ct {
            Ct::Array(ct) => Ok(array_cts(self.array_vjp(b, n, ct)?)),
            // A variadic reduce.
            Ct::Tuple(_) => Err(n.not_differentiable(
                b,
                &format!(
                    "reduce `{}` (built at {}) with this reducer",
                    n.full_name, n.built_at
                ),
            )),
        }
    }

    /// One entry per operand (`[x, init]`).
    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        let dims = &self.0;
        let op = match (n.operands.len(), n.called.first()) {
            (2, Some(&id)) => reducer_op(b, id),
            _ => None,
        };
        let Some(op @ (BinaryOp::Add | BinaryOp::Max | BinaryOp::Min)) = op else {
            return Err(b.error_at(
                n.vjp_caller,
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
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_rule() {
        let f = |d: &[i64]| Shape::array(ElementType::F32, d);
        let sc = Shape::scalar(ElementType::F32);
        assert_eq!(
            reduce(
                &[f(&[2, 3, 4])],
                std::slice::from_ref(&sc),
                &[sc.clone(), sc.clone()],
                &sc,
                &[1]
            ),
            Ok(f(&[2, 4]))
        );
        let e = reduce(
            &[f(&[2, 3])],
            std::slice::from_ref(&sc),
            std::slice::from_ref(&sc),
            &sc,
            &[1],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "reduce: reducer must be (f32[], f32[]) -> f32[], got (f32[]) -> f32[]"
        );
        assert!(reduce(
            &[f(&[2, 3])],
            std::slice::from_ref(&sc),
            &[sc.clone(), sc.clone()],
            &sc,
            &[2]
        )
        .is_err());
        let s = Shape::scalar(ElementType::S32);
        let two = reduce(
            &[f(&[2, 3]), Shape::array(ElementType::S32, &[2, 3])],
            &[sc.clone(), s.clone()],
            &[sc.clone(), s.clone(), sc.clone(), s.clone()],
            &Shape::Tuple(vec![sc, s]),
            &[1],
        );
        assert_eq!(
            two,
            Ok(Shape::Tuple(vec![
                f(&[2]),
                Shape::array(ElementType::S32, &[2])
            ]))
        );
    }
}
