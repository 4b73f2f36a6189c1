//! Elementwise ops. Unary math ([`unary`](mod@unary)) and binary arithmetic/logic
//! ([`binary`](mod@binary)) have their own files; this one holds `compare`, `select`, `clamp`,
//! `convert` and `bitcast-convert`.
//!
//! Binary ops take operands of equal shape; a rank-0 operand is broadcast implicitly (the
//! builder emits a `broadcast` instruction for it).

pub mod binary;
pub mod unary;

use std::panic::Location;

use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{expect_array, Shape, ShapeError, ShapeResult};
use crate::{ElementType, Op};

pub use binary::{binary, BinaryOp};
pub use unary::{unary, UnaryOp};

/// Comparison directions of [`Builder::compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cmp {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

impl Cmp {
    /// XLA's `comparison_direction` spelling.
    pub fn direction(self) -> &'static str {
        match self {
            Cmp::Eq => "EQ",
            Cmp::Ne => "NE",
            Cmp::Lt => "LT",
            Cmp::Le => "LE",
            Cmp::Gt => "GT",
            Cmp::Ge => "GE",
        }
    }
}

/// Shape rule of `compare`: equal shapes, result `pred`.
pub fn compare(a: &Shape, b: &Shape) -> ShapeResult {
    let (ta, da) = expect_array("compare", "lhs", a)?;
    let (tb, db) = expect_array("compare", "rhs", b)?;
    if ta != tb || da != db {
        return Err(ShapeError::new(
            "compare",
            format!(
                "operands must have equal shapes: lhs {}, rhs {}",
                a.short(),
                b.short()
            ),
        ));
    }
    Ok(a.with_ty(ElementType::Pred))
}

/// Shape rule of `select(pred, on_true, on_false)`.
pub fn select(p: &Shape, t: &Shape, f: &Shape) -> ShapeResult {
    let (tp, dp) = expect_array("select", "pred", p)?;
    if tp != ElementType::Pred {
        return Err(ShapeError::new(
            "select",
            format!("pred must have element type pred, got {}", p.short()),
        ));
    }
    if t != f {
        return Err(ShapeError::new(
            "select",
            format!(
                "branches must have equal shapes: on_true {}, on_false {}",
                t.short(),
                f.short()
            ),
        ));
    }
    let (_, dt) = expect_array("select", "on_true", t)?;
    if dp != dt {
        return Err(ShapeError::new(
            "select",
            format!(
                "pred {} does not match branch shape {}",
                p.short(),
                t.short()
            ),
        ));
    }
    Ok(t.clone())
}

/// Shape rule of `clamp(lo, x, hi)` (all equal shapes after scalar broadcast).
pub fn clamp(lo: &Shape, x: &Shape, hi: &Shape) -> ShapeResult {
    expect_array("clamp", "operand", x)?;
    if lo != x || hi != x {
        return Err(ShapeError::new(
            "clamp",
            format!(
                "shapes must be equal: min {}, operand {}, max {}",
                lo.short(),
                x.short(),
                hi.short()
            ),
        ));
    }
    Ok(x.clone())
}

/// Shape rule of `convert` (any array to any element type).
pub fn convert(x: &Shape, ty: ElementType) -> ShapeResult {
    expect_array("convert", "operand", x)?;
    Ok(x.with_ty(ty))
}

/// Shape rule of `bitcast-convert` between types of equal width.
pub fn bitcast_convert(x: &Shape, ty: ElementType) -> ShapeResult {
    let (from, _) = expect_array("bitcast_convert", "operand", x)?;
    if from.byte_size() != ty.byte_size() {
        return Err(ShapeError::new(
            "bitcast_convert",
            format!("{} and {ty} have different bit widths", x.short()),
        ));
    }
    Ok(x.with_ty(ty))
}

impl Builder {
    /// Elementwise comparison; result has element type `pred`.
    #[track_caller]
    pub fn compare(&self, a: Op, b: Op, dir: Cmp) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "compare", &[a, b])?;
        if s[0].ty() != s[1].ty() {
            return Err(self.shape_err(
                loc,
                ShapeError::new(
                    "compare",
                    format!(
                        "operand element types differ: lhs {}, rhs {}",
                        s[0].short(),
                        s[1].short()
                    ),
                ),
            ));
        }
        let (a, b, sa, sb) = self.broadcast_pair(loc, "compare", a, b)?;
        let out = compare(&sa, &sb).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Elementwise(Elementwise::Compare(dir)),
            vec![a, b],
            out,
            Vec::new(),
        ))
    }

    /// `pred ? on_true : on_false` elementwise (a rank-0 pred or branch is broadcast).
    #[track_caller]
    pub fn select(&self, pred: Op, on_true: Op, on_false: Op) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "select", &[pred, on_true, on_false])?;
        let target = [&s[1], &s[2], &s[0]]
            .into_iter()
            .find(|x| !x.is_scalar())
            .cloned()
            .unwrap_or_else(|| s[1].clone());
        if s[1].ty() != s[2].ty() || s[0].ty() != Some(ElementType::Pred) {
            return Err(self.shape_err(
                loc,
                select(&s[0], &s[1], &s[2])
                    .err()
                    .unwrap_or_else(|| ShapeError::new("select", "type mismatch")),
            ));
        }
        let p = self.implicit_broadcast(loc, &target, pred, &s[0]);
        let t = self.implicit_broadcast(loc, &target, on_true, &s[1]);
        let f = self.implicit_broadcast(loc, &target, on_false, &s[2]);
        let sp = if p != pred {
            s[0].with_dims(target.dims())
        } else {
            s[0].clone()
        };
        let st = if t != on_true {
            s[1].with_dims(target.dims())
        } else {
            s[1].clone()
        };
        let sf = if f != on_false {
            s[2].with_dims(target.dims())
        } else {
            s[2].clone()
        };
        let out = select(&sp, &st, &sf).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Elementwise(Elementwise::Select),
            vec![p, t, f],
            out,
            Vec::new(),
        ))
    }

    /// `min(max(x, lo), hi)` elementwise (rank-0 bounds are broadcast).
    #[track_caller]
    pub fn clamp(&self, lo: Op, x: Op, hi: Op) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "clamp", &[lo, x, hi])?;
        if s[0].ty() != s[1].ty() || s[2].ty() != s[1].ty() {
            return Err(self.shape_err(
                loc,
                ShapeError::new(
                    "clamp",
                    format!(
                        "element types differ: min {}, operand {}, max {}",
                        s[0].short(),
                        s[1].short(),
                        s[2].short()
                    ),
                ),
            ));
        }
        let l = self.implicit_broadcast(loc, &s[1], lo, &s[0]);
        let h = self.implicit_broadcast(loc, &s[1], hi, &s[2]);
        let sl = if l != lo { s[1].clone() } else { s[0].clone() };
        let sh = if h != hi { s[1].clone() } else { s[2].clone() };
        let out = clamp(&sl, &s[1], &sh).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Elementwise(Elementwise::Clamp),
            vec![l, x, h],
            out,
            Vec::new(),
        ))
    }

    /// Convert element type (value-preserving where possible).
    #[track_caller]
    pub fn convert(&self, x: Op, ty: ElementType) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "convert", x)?;
        let out = convert(&s, ty).map_err(|e| self.shape_err(loc, e))?;
        if out == s {
            return Ok(x);
        }
        Ok(self.push(
            loc,
            Kind::Elementwise(Elementwise::Convert),
            vec![x],
            out,
            Vec::new(),
        ))
    }

    /// Reinterpret the bits as another element type of the same width.
    #[track_caller]
    pub fn bitcast_convert(&self, x: Op, ty: ElementType) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "bitcast_convert", x)?;
        let out = bitcast_convert(&s, ty).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Elementwise(Elementwise::BitcastConvert),
            vec![x],
            out,
            Vec::new(),
        ))
    }
}

/// Attributes of the elementwise ops other than unary and binary math.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Elementwise {
    /// `compare` in a direction.
    Compare(Cmp),
    /// `select(pred, on_true, on_false)`.
    Select,
    /// `clamp(lo, x, hi)`.
    Clamp,
    /// `convert` to the result's element type.
    Convert,
    /// `bitcast-convert` to the result's element type.
    BitcastConvert,
}

impl Family for Elementwise {
    fn opcode(&self) -> &'static str {
        match self {
            Elementwise::Compare(_) => "compare",
            Elementwise::Select => "select",
            Elementwise::Clamp => "clamp",
            Elementwise::Convert => "convert",
            Elementwise::BitcastConvert => "bitcast-convert",
        }
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        if let Elementwise::Compare(c) = self {
            p.comparison_direction = c.direction().to_string();
        }
    }

    /// `select`: the cotangent goes to the branch that was picked, none to the predicate.
    /// `clamp(lo, x, hi)`: `x` gets it where `lo <= x <= hi`, `lo` where `x < lo`, `hi` where
    /// `x > hi`. `convert`: converted back to a float operand's type.
    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        let zeros = || b.zeros(n.ty(), n.shape.dims());
        let o = &n.operands;
        Ok(match self {
            Elementwise::Select => {
                let zero = zeros()?;
                let gt = when(n.need[1], || b.select(o[0], ct, zero))?;
                let gf = when(n.need[2], || b.select(o[0], zero, ct))?;
                vec![None, gt, gf]
            }
            Elementwise::Clamp => {
                let (lo, x, hi) = (o[0], o[1], o[2]);
                let zero = zeros()?;
                let glo = when(n.need[0], || b.select(b.compare(x, lo, Cmp::Lt)?, ct, zero))?;
                let gx = when(n.need[1], || {
                    let inside = b.and(b.compare(x, lo, Cmp::Ge)?, b.compare(x, hi, Cmp::Le)?)?;
                    b.select(inside, ct, zero)
                })?;
                let ghi = when(n.need[2], || b.select(b.compare(x, hi, Cmp::Gt)?, ct, zero))?;
                vec![glo, gx, ghi]
            }
            Elementwise::Convert => {
                let from = n.operand_shapes[0].ty().unwrap_or(ElementType::F32);
                vec![when(n.need[0] && from.is_float(), || b.convert(ct, from))?]
            }
            // A compare's result is `pred` and never on a path; a float-to-float bitcast is
            // refused rather than guessed.
            Elementwise::Compare(_) | Elementwise::BitcastConvert => {
                return Err(n.not_differentiable(b, &n.describe()))
            }
        })
    }
}

/// `Some(f())` when `need`, else `None`.
fn when(need: bool, f: impl FnOnce() -> Result<Op>) -> Result<Option<Op>> {
    if need {
        f().map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(d: &[i64]) -> Shape {
        Shape::array(ElementType::F32, d)
    }

    #[test]
    fn compare_select_convert_rules() {
        assert_eq!(
            compare(&f32s(&[4]), &f32s(&[4])),
            Ok(Shape::array(ElementType::Pred, &[4]))
        );
        let p = Shape::array(ElementType::Pred, &[4]);
        assert!(select(&p, &f32s(&[4]), &f32s(&[4])).is_ok());
        assert!(select(&p, &f32s(&[3]), &f32s(&[3])).is_err());
        assert!(bitcast_convert(&f32s(&[2]), ElementType::U32).is_ok());
        assert!(bitcast_convert(&f32s(&[2]), ElementType::U64).is_err());
    }
}
