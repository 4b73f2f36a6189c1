//! Unary elementwise math: one table names each op's variant, builder method, XLA opcode and
//! doc; then the shape rule, [`Builder::unary`] and the VJP rule.

use std::panic::Location;

use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::{Family, Kind};
use crate::shape::{expect_array, Shape, ShapeError, ShapeResult};
use crate::{ElementType, Op};

/// Declares [`UnaryOp`], its opcodes and one `Builder` method per op from a single table.
macro_rules! unary_ops {
    ($($(#[$doc:meta])* $variant:ident => $method:ident, $opcode:literal;)*) => {
        /// Elementwise unary opcodes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum UnaryOp {
            $($(#[$doc])* $variant,)*
        }

        impl UnaryOp {
            /// XLA opcode.
            pub fn opcode(self) -> &'static str {
                match self {
                    $(UnaryOp::$variant => $opcode,)*
                }
            }
        }

        impl Builder {
            $(
                $(#[$doc])*
                #[track_caller]
                pub fn $method(&self, x: Op) -> Result<Op> {
                    self.unary(UnaryOp::$variant, x)
                }
            )*
        }
    };
}

unary_ops! {
    /// `-x`.
    Neg => neg, "negate";
    /// `e^x`.
    Exp => exp, "exponential";
    /// `e^x - 1`.
    Expm1 => expm1, "exponential-minus-one";
    /// Natural log.
    Log => log, "log";
    /// `log(1 + x)`.
    Log1p => log1p, "log-plus-one";
    /// Hyperbolic tangent.
    Tanh => tanh, "tanh";
    /// `1 / (1 + e^-x)`.
    Logistic => logistic, "logistic";
    /// `1 / sqrt(x)`.
    Rsqrt => rsqrt, "rsqrt";
    /// Square root.
    Sqrt => sqrt, "sqrt";
    /// Cube root.
    Cbrt => cbrt, "cbrt";
    /// Absolute value.
    Abs => abs, "abs";
    /// Sign (-1, 0, 1).
    Sign => sign, "sign";
    /// Round down.
    Floor => floor, "floor";
    /// Round up.
    Ceil => ceil, "ceil";
    /// Round to nearest, ties to even.
    RoundNearestEven => round_nearest_even, "round-nearest-even";
    /// Cosine.
    Cos => cos, "cosine";
    /// Sine.
    Sin => sin, "sine";
    /// Tangent.
    Tan => tan, "tan";
    /// Logical / bitwise not.
    Not => not, "not";
    /// True where `x` is neither inf nor nan (result pred).
    IsFinite => is_finite, "is-finite";
}

impl UnaryOp {
    fn float_only(self) -> bool {
        !matches!(
            self,
            UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign | UnaryOp::Not
        )
    }
}

/// Shape rule of a unary op.
pub fn unary(op: UnaryOp, x: &Shape) -> ShapeResult {
    let name = op.opcode();
    let (ty, _) = expect_array(name, "operand", x)?;
    if op.float_only() && !ty.is_float() {
        return Err(ShapeError::new(
            name,
            format!("needs a floating-point operand, got {}", x.short()),
        ));
    }
    match op {
        UnaryOp::Not if ty.is_float() => Err(ShapeError::new(
            name,
            format!("needs a pred or integer operand, got {}", x.short()),
        )),
        UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign if ty == ElementType::Pred => Err(
            ShapeError::new(name, format!("needs a numeric operand, got {}", x.short())),
        ),
        UnaryOp::IsFinite => Ok(x.with_ty(ElementType::Pred)),
        _ => Ok(x.clone()),
    }
}

impl Builder {
    /// Any unary elementwise op.
    #[track_caller]
    pub fn unary(&self, op: UnaryOp, x: Op) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, op.opcode(), x)?;
        let out = unary(op, &s).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(loc, Kind::Unary(op), vec![x], out, Vec::new()))
    }
}

impl Family for UnaryOp {
    fn opcode(&self) -> &'static str {
        UnaryOp::opcode(*self)
    }

    /// `y` is the result, `ct` its cotangent.
    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        if !n.need[0] {
            return Ok(vec![None]);
        }
        let x = n.operands[0];
        let y = n.op;
        let c = |v: f64| b.scalar_typed(n.ty(), v);
        let g = match self {
            UnaryOp::Neg => b.neg(ct)?,
            // d exp = exp(x) = y.
            UnaryOp::Exp => b.mul(ct, y)?,
            // d (e^x - 1) = e^x = y + 1.
            UnaryOp::Expm1 => b.mul(ct, b.add(y, c(1.0)?)?)?,
            UnaryOp::Log => b.div(ct, x)?,
            UnaryOp::Log1p => b.div(ct, b.add(x, c(1.0)?)?)?,
            // d tanh = 1 - y^2.
            UnaryOp::Tanh => b.mul(ct, b.sub(c(1.0)?, b.mul(y, y)?)?)?,
            // d sigmoid = y (1 - y).
            UnaryOp::Logistic => b.mul(ct, b.mul(y, b.sub(c(1.0)?, y)?)?)?,
            // d x^(-1/2) = -1/2 x^(-3/2) = -1/2 y^3.
            UnaryOp::Rsqrt => b.mul(ct, b.mul(c(-0.5)?, b.mul(y, b.mul(y, y)?)?)?)?,
            // d sqrt = 1 / (2 y).
            UnaryOp::Sqrt => b.div(b.mul(ct, c(0.5)?)?, y)?,
            // d cbrt = 1 / (3 y^2).
            UnaryOp::Cbrt => b.div(ct, b.mul(c(3.0)?, b.mul(y, y)?)?)?,
            // Subgradient 0 at x = 0.
            UnaryOp::Abs => b.mul(ct, b.sign(x)?)?,
            UnaryOp::Sin => b.mul(ct, b.cos(x)?)?,
            UnaryOp::Cos => b.neg(b.mul(ct, b.sin(x)?)?)?,
            // d tan = 1 + y^2.
            UnaryOp::Tan => b.mul(ct, b.add(c(1.0)?, b.mul(y, y)?)?)?,
            // Piecewise constant (or non-float results): zero.
            UnaryOp::Sign
            | UnaryOp::Floor
            | UnaryOp::Ceil
            | UnaryOp::RoundNearestEven
            | UnaryOp::Not
            | UnaryOp::IsFinite => return Ok(vec![None]),
        };
        Ok(vec![Some(g)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unary_rules() {
        assert!(unary(UnaryOp::Exp, &Shape::array(ElementType::S32, &[2])).is_err());
        assert_eq!(
            unary(UnaryOp::IsFinite, &Shape::array(ElementType::F32, &[2])),
            Ok(Shape::array(ElementType::Pred, &[2]))
        );
    }
}
