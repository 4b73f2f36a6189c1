//! `dot_general` (batched tensor contraction) and the matrix convenience `dot`: dimension
//! numbers, shape rule, builder methods, emission and VJP.
//!
//! VJP: with `out = dot_general(x, y)` laid out as `[batch, x free, y free]`, the cotangent of
//! `x` is `dot_general(ct, y)` contracting the y-free dims of `ct` with y's free dims and
//! batching over the batch dims; that yields `[batch, x free, x contracting (in y's contracting
//! order sorted)]`, which a transpose puts back into x's dim order. Symmetrically for `y`. When
//! the cotangent's type differs from an operand's (a preferred element type), the backward dot
//! runs in the wider of the two and is converted to the operand's type.

use std::panic::Location;

use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::shape_ops::inverse_perm;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{expect_array, Shape, ShapeError, ShapeResult};
use crate::{ElementType, Op};

/// Dimension numbers of [`Builder::dot_general`].
///
/// The result dims are: batch dims, then lhs free dims (in order), then rhs free dims.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DotDims {
    /// Batch dims of lhs.
    pub lhs_batch: Vec<i64>,
    /// Batch dims of rhs (paired with `lhs_batch`).
    pub rhs_batch: Vec<i64>,
    /// Contracting dims of lhs.
    pub lhs_contracting: Vec<i64>,
    /// Contracting dims of rhs (paired with `lhs_contracting`).
    pub rhs_contracting: Vec<i64>,
}

impl DotDims {
    /// Plain matrix product `[m,k] x [k,n]`.
    pub fn matmul() -> DotDims {
        DotDims {
            lhs_contracting: vec![1],
            rhs_contracting: vec![0],
            ..Default::default()
        }
    }

    /// The `DotDimensionNumbers` proto.
    pub fn to_proto(&self) -> proto::DotDimensionNumbers {
        proto::DotDimensionNumbers {
            lhs_contracting_dimensions: self.lhs_contracting.clone(),
            rhs_contracting_dimensions: self.rhs_contracting.clone(),
            lhs_batch_dimensions: self.lhs_batch.clone(),
            rhs_batch_dimensions: self.rhs_batch.clone(),
        }
    }
}

/// Operand precision of a dot (both operands get the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Backend default (may use bf16 passes on some hardware).
    Default,
    /// Higher precision.
    High,
    /// Full precision.
    Highest,
}

impl Precision {
    /// `PrecisionConfig.Precision` number.
    pub fn proto(self) -> i32 {
        match self {
            Precision::Default => 0,
            Precision::High => 1,
            Precision::Highest => 2,
        }
    }
}

/// Shape rule of `dot_general`; `preferred` overrides the result element type.
pub fn dot_general(
    lhs: &Shape,
    rhs: &Shape,
    dims: &DotDims,
    preferred: Option<ElementType>,
) -> ShapeResult {
    const OP: &str = "dot_general";
    let (lt, ld) = expect_array(OP, "lhs", lhs)?;
    let (rt, rd) = expect_array(OP, "rhs", rhs)?;
    let ctx = || format!("lhs {}, rhs {}", lhs.short(), rhs.short());
    if lt != rt && preferred.is_none() {
        return Err(ShapeError::new(
            OP,
            format!(
                "operand element types differ and no preferred type is given: {}",
                ctx()
            ),
        ));
    }
    if dims.lhs_batch.len() != dims.rhs_batch.len()
        || dims.lhs_contracting.len() != dims.rhs_contracting.len()
    {
        return Err(ShapeError::new(
            OP,
            format!(
                "lhs and rhs need the same number of batch and contracting dims ({dims:?}): {}",
                ctx()
            ),
        ));
    }
    let check = |what: &str, side: &str, d: i64, rank: usize| -> Result<usize, ShapeError> {
        if d < 0 || d as usize >= rank {
            Err(ShapeError::new(
                OP,
                format!("{side} {what} dim {d} out of range: {}", ctx()),
            ))
        } else {
            Ok(d as usize)
        }
    };
    let mut lused = vec![false; ld.len()];
    let mut rused = vec![false; rd.len()];
    for (what, lv, rv) in [
        ("batch", &dims.lhs_batch, &dims.rhs_batch),
        ("contracting", &dims.lhs_contracting, &dims.rhs_contracting),
    ] {
        for (&l, &r) in lv.iter().zip(rv) {
            let (li, ri) = (
                check(what, "lhs", l, ld.len())?,
                check(what, "rhs", r, rd.len())?,
            );
            if std::mem::replace(&mut lused[li], true) || std::mem::replace(&mut rused[ri], true) {
                return Err(ShapeError::new(
                    OP,
                    format!("dim used twice in {dims:?}: {}", ctx()),
                ));
            }
            if ld[li] != rd[ri] {
                return Err(ShapeError::new(
                    OP,
                    format!(
                        "lhs {what} dim {l} (size {}) != rhs {what} dim {r} (size {}): {}",
                        ld[li],
                        rd[ri],
                        ctx()
                    ),
                ));
            }
        }
    }
    let mut out: Vec<i64> = dims.lhs_batch.iter().map(|&d| ld[d as usize]).collect();
    out.extend((0..ld.len()).filter(|&i| !lused[i]).map(|i| ld[i]));
    out.extend((0..rd.len()).filter(|&i| !rused[i]).map(|i| rd[i]));
    Ok(Shape::array(preferred.unwrap_or(lt), &out))
}

impl Builder {
    /// General dot product (XLA `dot`): contract `lhs_contracting` with `rhs_contracting`,
    /// batch over `lhs_batch`/`rhs_batch`. Result: batch dims, lhs free dims, rhs free dims.
    #[track_caller]
    pub fn dot_general(
        &self,
        lhs: Op,
        rhs: Op,
        dims: &DotDims,
        precision: Option<Precision>,
        preferred: Option<ElementType>,
    ) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "dot_general", &[lhs, rhs])?;
        let out = dot_general(&s[0], &s[1], dims, preferred).map_err(|e| self.shape_err(loc, e))?;
        // Inside a block of `checkpoint_with_policy` that saves dots: the backward pass's
        // re-trace takes this dot's value from the forward (no second dot).
        if let Some(saved) = self.replay_dot(loc, [lhs, rhs], dims, precision, &out)? {
            return Ok(saved);
        }
        let op = self.push(
            loc,
            Kind::Dot(Dot {
                dims: dims.clone(),
                precision,
            }),
            vec![lhs, rhs],
            out,
            Vec::new(),
        );
        self.record_dot(op, dims);
        Ok(op)
    }

    /// Matrix/vector product: `[m,k]x[k,n]`, `[m,k]x[k]`, `[k]x[k,n]` or `[k]x[k]`.
    #[track_caller]
    pub fn dot(&self, lhs: Op, rhs: Op) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "dot", &[lhs, rhs])?;
        if s[0].rank() == 0 || s[0].rank() > 2 || s[1].rank() == 0 || s[1].rank() > 2 {
            return Err(self.shape_err(
                loc,
                ShapeError::new(
                    "dot",
                    format!(
                        "needs rank-1 or rank-2 operands, got lhs {}, rhs {}",
                        s[0].short(),
                        s[1].short()
                    ),
                ),
            ));
        }
        let dims = DotDims {
            lhs_contracting: vec![s[0].rank() as i64 - 1],
            rhs_contracting: vec![0],
            ..Default::default()
        };
        self.dot_general(lhs, rhs, &dims, None, None)
    }
}

/// Attributes of `dot`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dot {
    pub(crate) dims: DotDims,
    pub(crate) precision: Option<Precision>,
}

impl Family for Dot {
    fn opcode(&self) -> &'static str {
        "dot"
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        p.dot_dimension_numbers = Some(self.dims.to_proto());
        if let Some(pr) = self.precision {
            p.precision_config = Some(proto::PrecisionConfig {
                operand_precision: vec![pr.proto(), pr.proto()],
                algorithm: 0,
            });
        }
    }

    /// One entry per operand (`[lhs, rhs]`).
    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        let [gx, gy] = dot_transpose(
            b,
            (n.operands[0], &n.operand_shapes[0]),
            (n.operands[1], &n.operand_shapes[1]),
            &self.dims,
            self.precision,
            ct,
            [n.need[0], n.need[1]],
        )?;
        Ok(vec![gx, gy])
    }
}

/// The transpose rule of `dot_general(lhs, rhs, dims)`: the cotangents of `[lhs, rhs]` given the
/// result's cotangent `ct`, computed where `need` says so. Shared by the op's VJP and by
/// [`Builder::checkpoint_with_policy`]'s replay of a saved dot, which differentiates a saved
/// result with respect to recomputed operands.
pub(crate) fn dot_transpose(
    b: &Builder,
    (x, xs): (Op, &Shape),
    (y, ys): (Op, &Shape),
    d: &DotDims,
    precision: Option<Precision>,
    ct: Op,
    need: [bool; 2],
) -> Result<[Option<Op>; 2]> {
    let nb = d.lhs_batch.len() as i64;
    let mut lhs = Side::new(x, xs, &d.lhs_batch, &d.lhs_contracting);
    let mut rhs = Side::new(y, ys, &d.rhs_batch, &d.rhs_contracting);
    let (nxf, nyf) = (lhs.free.len() as i64, rhs.free.len() as i64);
    lhs.out_free = (nb..nb + nxf).collect();
    rhs.out_free = (nb + nxf..nb + nxf + nyf).collect();
    let gx = if need[0] {
        Some(side_cotangent(b, ct, &lhs, &rhs, precision)?)
    } else {
        None
    };
    let gy = if need[1] {
        Some(side_cotangent(b, ct, &rhs, &lhs, precision)?)
    } else {
        None
    };
    Ok([gx, gy])
}

/// One operand of a dot as its VJP sees it.
struct Side<'a> {
    op: Op,
    ty: ElementType,
    batch: &'a [i64],
    contracting: &'a [i64],
    /// Dims that are neither batch nor contracting, in order.
    free: Vec<i64>,
    /// The result dims that hold `free` (the result is `[batch, lhs free, rhs free]`).
    out_free: Vec<i64>,
}

impl<'a> Side<'a> {
    fn new(op: Op, shape: &Shape, batch: &'a [i64], contracting: &'a [i64]) -> Side<'a> {
        Side {
            op,
            ty: shape.ty().unwrap_or(ElementType::F32),
            batch,
            contracting,
            free: (0..shape.rank() as i64)
                .filter(|d| !batch.contains(d) && !contracting.contains(d))
                .collect(),
            out_free: Vec::new(),
        }
    }
}

/// The cotangent of side `me`: contract the result dims holding `other`'s free dims with
/// `other`, then transpose back into `me`'s dim order.
///
/// The dot is written with whichever operand order gives `me`'s dims in order, so that no
/// transpose follows it where one order does: for `y = x · w` that is `dw = xᵀ · dy` as
/// `dot(x, dy)` (contracting the rows of both), not `transpose(dot(dy, x))`. XLA CPU turns the
/// latter into a transposing copy of the (large) cotangent before an Eigen dot; the former it
/// runs as a plain row-major matmul after transposing `x`, once for every weight that reads it.
fn side_cotangent(
    b: &Builder,
    ct: Op,
    me: &Side,
    other: &Side,
    precision: Option<Precision>,
) -> Result<Op> {
    // The other side's contracting dims in increasing order, each paired with my contracting dim
    // (the dot's result holds them in that order).
    let mut sorted_oc: Vec<(i64, i64)> = other
        .contracting
        .iter()
        .copied()
        .zip(me.contracting.iter().copied())
        .collect();
    sorted_oc.sort_unstable();
    let paired = sorted_oc.iter().map(|&(_, sc)| sc);
    // dot(ct, other): batch, my free dims, then the paired contracting dims.
    let mut src: Vec<i64> = me.batch.to_vec();
    src.extend_from_slice(&me.free);
    src.extend(paired.clone());
    // dot(other, ct): batch, the paired contracting dims, then my free dims.
    let mut swapped_src: Vec<i64> = me.batch.to_vec();
    swapped_src.extend(paired);
    swapped_src.extend_from_slice(&me.free);
    let in_order = |p: &[i64]| p.iter().enumerate().all(|(i, &d)| d == i as i64);
    let swap = !in_order(&src) && in_order(&swapped_src);
    // Compute in the wider of the two types (they differ under a preferred element type).
    let ct_ty = b.shape(ct)?.ty().unwrap_or(me.ty);
    let wide = if ct_ty.byte_size() >= other.ty.byte_size() {
        ct_ty
    } else {
        other.ty
    };
    let (ctw, ow) = (b.convert(ct, wide)?, b.convert(other.op, wide)?);
    let ct_batch: Vec<i64> = (0..me.batch.len() as i64).collect();
    let r = if swap {
        let dims = DotDims {
            lhs_batch: other.batch.to_vec(),
            rhs_batch: ct_batch,
            lhs_contracting: other.free.clone(),
            rhs_contracting: other.out_free.clone(),
        };
        b.dot_general(ow, ctw, &dims, precision, None)?
    } else {
        let dims = DotDims {
            lhs_batch: ct_batch,
            rhs_batch: other.batch.to_vec(),
            lhs_contracting: other.out_free.clone(),
            rhs_contracting: other.free.clone(),
        };
        let r = b.dot_general(ctw, ow, &dims, precision, None)?;
        b.transpose(r, &inverse_perm(&src))?
    };
    b.convert(r, me.ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(d: &[i64]) -> Shape {
        Shape::array(ElementType::F32, d)
    }

    #[test]
    fn dot_rules() {
        assert_eq!(
            dot_general(&f(&[2, 3]), &f(&[3, 5]), &DotDims::matmul(), None),
            Ok(f(&[2, 5]))
        );
        let e = dot_general(&f(&[2, 3]), &f(&[4, 5]), &DotDims::matmul(), None).unwrap_err();
        assert_eq!(e.to_string(), "dot_general: lhs contracting dim 1 (size 3) != rhs contracting dim 0 (size 4): lhs f32[2,3], rhs f32[4,5]");
        let d = DotDims {
            lhs_batch: vec![0],
            rhs_batch: vec![0],
            lhs_contracting: vec![2],
            rhs_contracting: vec![1],
        };
        assert_eq!(
            dot_general(&f(&[7, 2, 3]), &f(&[7, 3, 4]), &d, None),
            Ok(f(&[7, 2, 4]))
        );
        let d = DotDims {
            lhs_batch: vec![1],
            rhs_batch: vec![0],
            lhs_contracting: vec![2],
            rhs_contracting: vec![2],
        };
        assert_eq!(
            dot_general(&f(&[5, 7, 3]), &f(&[7, 4, 3]), &d, Some(ElementType::F64)),
            Ok(Shape::array(ElementType::F64, &[7, 5, 4]))
        );
        assert!(dot_general(
            &f(&[2, 3]),
            &Shape::array(ElementType::Bf16, &[3, 2]),
            &DotDims::matmul(),
            None
        )
        .is_err());
    }
}
