//! Binary elementwise arithmetic and logic: one table names each op's variant, builder method,
//! XLA opcode and doc; then the shape rule, [`Builder::binary`] with its implicit scalar
//! broadcast, and the VJP rule.

use std::panic::Location;

use super::Cmp;
use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::shape_ops::ShapeOp;
use crate::ops::{Family, Kind};
use crate::shape::{expect_array, Shape, ShapeError, ShapeResult};
use crate::{ElementType, Op};

/// Declares [`BinaryOp`], its opcodes and one `Builder` method per op from a single table.
macro_rules! binary_ops {
    ($($(#[$doc:meta])* $variant:ident => $method:ident, $opcode:literal;)*) => {
        /// Elementwise binary opcodes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum BinaryOp {
            $($(#[$doc])* $variant,)*
        }

        impl BinaryOp {
            /// XLA opcode.
            pub fn opcode(self) -> &'static str {
                match self {
                    $(BinaryOp::$variant => $opcode,)*
                }
            }
        }

        impl Builder {
            $(
                $(#[$doc])*
                #[track_caller]
                pub fn $method(&self, a: Op, b: Op) -> Result<Op> {
                    self.binary(BinaryOp::$variant, a, b)
                }
            )*
        }
    };
}

binary_ops! {
    /// `a + b`.
    Add => add, "add";
    /// `a - b`.
    Sub => sub, "subtract";
    /// `a * b`.
    Mul => mul, "multiply";
    /// `a / b` (integer division truncates).
    Div => div, "divide";
    /// Elementwise maximum.
    Max => max, "maximum";
    /// Elementwise minimum.
    Min => min, "minimum";
    /// `a ^ b`.
    Pow => pow, "power";
    /// Remainder with the sign of `a`.
    Rem => rem, "remainder";
    /// `atan2(a, b)`.
    Atan2 => atan2, "atan2";
    /// Logical / bitwise and.
    And => and, "and";
    /// Logical / bitwise or.
    Or => or, "or";
    /// Logical / bitwise xor.
    Xor => xor, "xor";
    /// `a << b`.
    ShiftLeft => shift_left, "shift-left";
    /// Logical `a >> b`.
    ShiftRightLogical => shift_right_logical, "shift-right-logical";
    /// Arithmetic `a >> b`.
    ShiftRightArithmetic => shift_right_arithmetic, "shift-right-arithmetic";
}

/// Shape rule of a binary op on equal shapes (after implicit scalar broadcast).
pub fn binary(op: BinaryOp, a: &Shape, b: &Shape) -> ShapeResult {
    let name = op.opcode();
    let (ta, da) = expect_array(name, "lhs", a)?;
    let (tb, db) = expect_array(name, "rhs", b)?;
    if ta != tb {
        return Err(ShapeError::new(
            name,
            format!(
                "operand element types differ: lhs {}, rhs {}",
                a.short(),
                b.short()
            ),
        ));
    }
    if da != db {
        return Err(ShapeError::new(
            name,
            format!("incompatible shapes: lhs {}, rhs {}", a.short(), b.short()),
        ));
    }
    let ok = match op {
        BinaryOp::And | BinaryOp::Or | BinaryOp::Xor => !ta.is_float(),
        BinaryOp::ShiftLeft | BinaryOp::ShiftRightLogical | BinaryOp::ShiftRightArithmetic => {
            ta.is_integer()
        }
        BinaryOp::Atan2 => ta.is_float(),
        _ => ta != ElementType::Pred,
    };
    if !ok {
        return Err(ShapeError::new(
            name,
            format!(
                "element type {ta} not supported: lhs {}, rhs {}",
                a.short(),
                b.short()
            ),
        ));
    }
    Ok(a.clone())
}

impl Builder {
    /// If exactly one of two array operands is rank 0 and the other is not, broadcast it.
    pub(crate) fn implicit_broadcast(
        &self,
        loc: &'static Location<'static>,
        target: &Shape,
        x: Op,
        xs: &Shape,
    ) -> Op {
        if xs.is_scalar() && !target.is_scalar() && target.is_array() {
            if let Some(ty) = xs.ty() {
                let out = Shape::array(ty, target.dims());
                let kind = Kind::Shape(ShapeOp::Broadcast(Vec::new()));
                return self.push(loc, kind, vec![x], out, Vec::new());
            }
        }
        x
    }

    /// Broadcast whichever of `a`, `b` is rank 0 to the other's shape; the ops and shapes after.
    pub(super) fn broadcast_pair(
        &self,
        loc: &'static Location<'static>,
        name: &'static str,
        a: Op,
        b: Op,
    ) -> Result<(Op, Op, Shape, Shape)> {
        let s = self.shapes_of(loc, name, &[a, b])?;
        let (sa, sb) = (&s[0], &s[1]);
        let a2 = self.implicit_broadcast(loc, sb, a, sa);
        let b2 = self.implicit_broadcast(loc, sa, b, sb);
        let sa2 = if a2 != a {
            sa.with_dims(sb.dims())
        } else {
            sa.clone()
        };
        let sb2 = if b2 != b {
            sb.with_dims(sa.dims())
        } else {
            sb.clone()
        };
        Ok((a2, b2, sa2, sb2))
    }

    /// Any binary elementwise op (rank-0 operands are broadcast).
    #[track_caller]
    pub fn binary(&self, op: BinaryOp, a: Op, b: Op) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, op.opcode(), &[a, b])?;
        // Check types before emitting any broadcast so that errors leave no debris.
        if s[0].is_array() && s[1].is_array() && (s[0].is_scalar() || s[1].is_scalar()) {
            let (big, small) = if s[0].is_scalar() {
                (&s[1], &s[0])
            } else {
                (&s[0], &s[1])
            };
            binary(
                op,
                big,
                &big.with_ty(small.ty().unwrap_or(ElementType::F32)),
            )
            .map_err(|e| self.shape_err(loc, e))?;
        }
        let (a, b, sa, sb) = self.broadcast_pair(loc, op.opcode(), a, b)?;
        let out = binary(op, &sa, &sb).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(loc, Kind::Binary(op), vec![a, b], out, Vec::new()))
    }
}

impl Family for BinaryOp {
    fn opcode(&self) -> &'static str {
        BinaryOp::opcode(*self)
    }

    /// `y = op(x, w)`; `max`/`min` ties split the cotangent evenly.
    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        let (x, w) = (n.operands[0], n.operands[1]);
        let (nx, nw) = (n.need[0], n.need[1]);
        let y = n.op;
        let ty = n.ty();
        let c = |v: f64| b.scalar_typed(ty, v);
        let when = |need: bool, f: &dyn Fn() -> Result<Op>| -> Result<Option<Op>> {
            if need {
                f().map(Some)
            } else {
                Ok(None)
            }
        };
        let grads = match *self {
            BinaryOp::Add => vec![when(nx, &|| Ok(ct))?, when(nw, &|| Ok(ct))?],
            BinaryOp::Sub => vec![when(nx, &|| Ok(ct))?, when(nw, &|| b.neg(ct))?],
            BinaryOp::Mul => vec![when(nx, &|| b.mul(ct, w))?, when(nw, &|| b.mul(ct, x))?],
            BinaryOp::Div => {
                // y = x / w: dx = ct / w, dw = -ct x / w^2 = -(ct / w) y.
                let q = b.div(ct, w)?;
                vec![when(nx, &|| Ok(q))?, when(nw, &|| b.neg(b.mul(q, y)?))?]
            }
            op @ (BinaryOp::Max | BinaryOp::Min) => {
                // The strict winner gets the cotangent; ties split it evenly.
                let dir = if op == BinaryOp::Max {
                    Cmp::Gt
                } else {
                    Cmp::Lt
                };
                let wins = b.convert(b.compare(x, w, dir)?, ty)?;
                let tie = b.convert(b.compare(x, w, Cmp::Eq)?, ty)?;
                let share = b.add(wins, b.mul(tie, c(0.5)?)?)?;
                let gx = b.mul(ct, share)?;
                vec![when(nx, &|| Ok(gx))?, when(nw, &|| b.sub(ct, gx))?]
            }
            BinaryOp::Pow => {
                // y = x^w: dx = w x^(w-1) (0 where w == 0), dw = y log x (0 where x == 0).
                let zero = b.zeros(n.ty(), n.shape.dims())?;
                let gx = when(nx, &|| {
                    let d = b.mul(w, b.pow(x, b.sub(w, c(1.0)?)?)?)?;
                    let d = b.select(b.compare(w, zero, Cmp::Eq)?, zero, d)?;
                    b.mul(ct, d)
                })?;
                let gw = when(nw, &|| {
                    let d = b.mul(y, b.log(x)?)?;
                    let d = b.select(b.compare(x, zero, Cmp::Eq)?, zero, d)?;
                    b.mul(ct, d)
                })?;
                vec![gx, gw]
            }
            BinaryOp::Atan2 => {
                // y = atan2(x, w): dx = w / (x^2 + w^2), dw = -x / (x^2 + w^2).
                let r = b.div(ct, b.add(b.mul(x, x)?, b.mul(w, w)?)?)?;
                vec![
                    when(nx, &|| b.mul(r, w))?,
                    when(nw, &|| b.neg(b.mul(r, x)?))?,
                ]
            }
            BinaryOp::Rem => {
                // y = x - w trunc(x / w): dx = ct, dw = -ct trunc(x / w).
                let gw = when(nw, &|| {
                    let q = b.div(x, w)?;
                    let t = b.mul(b.sign(q)?, b.floor(b.abs(q)?)?)?;
                    b.neg(b.mul(ct, t)?)
                })?;
                vec![when(nx, &|| Ok(ct))?, gw]
            }
            // Bitwise / logical ops only exist on integers and preds, which carry no cotangent.
            BinaryOp::And
            | BinaryOp::Or
            | BinaryOp::Xor
            | BinaryOp::ShiftLeft
            | BinaryOp::ShiftRightLogical
            | BinaryOp::ShiftRightArithmetic => vec![None, None],
        };
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(d: &[i64]) -> Shape {
        Shape::array(ElementType::F32, d)
    }

    #[test]
    fn binary_rules() {
        assert_eq!(
            binary(BinaryOp::Add, &f32s(&[2, 3]), &f32s(&[2, 3])),
            Ok(f32s(&[2, 3]))
        );
        let e = binary(BinaryOp::Add, &f32s(&[2, 3]), &f32s(&[3, 2])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "add: incompatible shapes: lhs f32[2,3], rhs f32[3,2]"
        );
        let e = binary(BinaryOp::And, &f32s(&[2]), &f32s(&[2])).unwrap_err();
        assert!(
            e.to_string().contains("element type f32 not supported"),
            "{e}"
        );
        let e = binary(
            BinaryOp::Add,
            &f32s(&[2]),
            &Shape::array(ElementType::S32, &[2]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("element types differ"), "{e}");
    }
}
