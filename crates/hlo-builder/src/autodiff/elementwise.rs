//! VJP rules of elementwise ops: unary math, binary arithmetic, select, clamp, convert.
//!
//! `y` below is the op's result, `ct` its cotangent; every rule returns one entry per operand
//! (`None` = zero or not needed).

use super::Node;
use crate::builder::{Builder, Kind};
use crate::error::Result;
use crate::ops::elementwise::{BinaryOp, Cmp, UnaryOp};
use crate::{ElementType, Op};

/// Dispatch on the elementwise kind.
pub(super) fn vjp(b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
    match &n.kind {
        Kind::Unary(u) => Ok(vec![unary(b, *u, n, ct)?]),
        Kind::Binary(op) => binary(b, *op, n, ct),
        Kind::Select => select(b, n, ct),
        Kind::Clamp => clamp(b, n, ct),
        Kind::Convert => {
            let from = n.operand_shapes[0].ty().unwrap_or(ElementType::F32);
            Ok(vec![if n.need[0] && from.is_float() {
                Some(b.convert(ct, from)?)
            } else {
                None
            }])
        }
        _ => Ok(vec![None; n.operands.len()]),
    }
}

fn zeros_like(b: &Builder, n: &Node) -> Result<Op> {
    b.zeros(n.ty(), n.shape.dims())
}

fn unary(b: &Builder, op: UnaryOp, n: &Node, ct: Op) -> Result<Option<Op>> {
    if !n.need[0] {
        return Ok(None);
    }
    let x = n.operands[0];
    let y = n.op;
    let c = |v: f64| b.scalar_typed(n.ty(), v);
    let g = match op {
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
        | UnaryOp::IsFinite => return Ok(None),
    };
    Ok(Some(g))
}

fn binary(b: &Builder, op: BinaryOp, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
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
    let grads = match op {
        BinaryOp::Add => vec![when(nx, &|| Ok(ct))?, when(nw, &|| Ok(ct))?],
        BinaryOp::Sub => vec![when(nx, &|| Ok(ct))?, when(nw, &|| b.neg(ct))?],
        BinaryOp::Mul => vec![when(nx, &|| b.mul(ct, w))?, when(nw, &|| b.mul(ct, x))?],
        BinaryOp::Div => {
            // y = x / w: dx = ct / w, dw = -ct x / w^2 = -(ct / w) y.
            let q = b.div(ct, w)?;
            vec![when(nx, &|| Ok(q))?, when(nw, &|| b.neg(b.mul(q, y)?))?]
        }
        BinaryOp::Max | BinaryOp::Min => {
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
            let zero = zeros_like(b, n)?;
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

/// `select(p, t, f)`: the cotangent goes to the branch that was picked; none to `p`.
fn select(b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
    let p = n.operands[0];
    let zero = zeros_like(b, n)?;
    let gt = if n.need[1] {
        Some(b.select(p, ct, zero)?)
    } else {
        None
    };
    let gf = if n.need[2] {
        Some(b.select(p, zero, ct)?)
    } else {
        None
    };
    Ok(vec![None, gt, gf])
}

/// `clamp(lo, x, hi)`: `x` gets the cotangent where `lo <= x <= hi`, `lo` where `x < lo`, `hi`
/// where `x > hi`.
fn clamp(b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
    let (lo, x, hi) = (n.operands[0], n.operands[1], n.operands[2]);
    let zero = zeros_like(b, n)?;
    let glo = if n.need[0] {
        Some(b.select(b.compare(x, lo, Cmp::Lt)?, ct, zero)?)
    } else {
        None
    };
    let gx = if n.need[1] {
        let inside = b.and(b.compare(x, lo, Cmp::Ge)?, b.compare(x, hi, Cmp::Le)?)?;
        Some(b.select(inside, ct, zero)?)
    } else {
        None
    };
    let ghi = if n.need[2] {
        Some(b.select(b.compare(x, hi, Cmp::Gt)?, ct, zero)?)
    } else {
        None
    };
    Ok(vec![glo, gx, ghi])
}
