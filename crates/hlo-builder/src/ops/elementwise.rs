//! Elementwise ops: unary math, binary arithmetic/logic, compare, select, clamp, convert.
//!
//! Binary ops take operands of equal shape; a rank-0 operand is broadcast implicitly (the
//! builder emits a `broadcast` instruction for it).

use std::panic::Location;

use crate::builder::{Builder, Kind};
use crate::error::Result;
use crate::shape::{expect_array, Shape, ShapeError, ShapeResult};
use crate::{ElementType, Op};

/// Elementwise unary opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `-x`.
    Neg,
    /// `e^x`.
    Exp,
    /// `e^x - 1`.
    Expm1,
    /// Natural log.
    Log,
    /// `log(1 + x)`.
    Log1p,
    /// Hyperbolic tangent.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Logistic,
    /// `1 / sqrt(x)`.
    Rsqrt,
    /// Square root.
    Sqrt,
    /// Cube root.
    Cbrt,
    /// Absolute value.
    Abs,
    /// Sign (-1, 0, 1).
    Sign,
    /// Round down.
    Floor,
    /// Round up.
    Ceil,
    /// Round to nearest, ties to even.
    RoundNearestEven,
    /// Cosine.
    Cos,
    /// Sine.
    Sin,
    /// Tangent.
    Tan,
    /// Logical / bitwise not.
    Not,
    /// `x` is neither inf nor nan (result pred).
    IsFinite,
}

impl UnaryOp {
    /// XLA opcode.
    pub fn opcode(self) -> &'static str {
        match self {
            UnaryOp::Neg => "negate",
            UnaryOp::Exp => "exponential",
            UnaryOp::Expm1 => "exponential-minus-one",
            UnaryOp::Log => "log",
            UnaryOp::Log1p => "log-plus-one",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Logistic => "logistic",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Cbrt => "cbrt",
            UnaryOp::Abs => "abs",
            UnaryOp::Sign => "sign",
            UnaryOp::Floor => "floor",
            UnaryOp::Ceil => "ceil",
            UnaryOp::RoundNearestEven => "round-nearest-even",
            UnaryOp::Cos => "cosine",
            UnaryOp::Sin => "sine",
            UnaryOp::Tan => "tan",
            UnaryOp::Not => "not",
            UnaryOp::IsFinite => "is-finite",
        }
    }

    fn float_only(self) -> bool {
        !matches!(
            self,
            UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign | UnaryOp::Not
        )
    }
}

/// Elementwise binary opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b` (integer division truncates).
    Div,
    /// Elementwise maximum.
    Max,
    /// Elementwise minimum.
    Min,
    /// `a ^ b`.
    Pow,
    /// Remainder with the sign of `a`.
    Rem,
    /// `atan2(a, b)`.
    Atan2,
    /// Logical / bitwise and.
    And,
    /// Logical / bitwise or.
    Or,
    /// Logical / bitwise xor.
    Xor,
    /// `a << b`.
    ShiftLeft,
    /// Logical `a >> b`.
    ShiftRightLogical,
    /// Arithmetic `a >> b`.
    ShiftRightArithmetic,
}

impl BinaryOp {
    /// XLA opcode.
    pub fn opcode(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "subtract",
            BinaryOp::Mul => "multiply",
            BinaryOp::Div => "divide",
            BinaryOp::Max => "maximum",
            BinaryOp::Min => "minimum",
            BinaryOp::Pow => "power",
            BinaryOp::Rem => "remainder",
            BinaryOp::Atan2 => "atan2",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
            BinaryOp::Xor => "xor",
            BinaryOp::ShiftLeft => "shift-left",
            BinaryOp::ShiftRightLogical => "shift-right-logical",
            BinaryOp::ShiftRightArithmetic => "shift-right-arithmetic",
        }
    }
}

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

macro_rules! unary_methods {
    ($($(#[$doc:meta])* $name:ident => $variant:ident),* $(,)?) => {
        impl Builder {
            $(
                $(#[$doc])*
                #[track_caller]
                pub fn $name(&self, x: Op) -> Result<Op> {
                    self.unary(UnaryOp::$variant, x)
                }
            )*
        }
    };
}

unary_methods! {
    /// `-x`.
    neg => Neg,
    /// `e^x`.
    exp => Exp,
    /// `e^x - 1`.
    expm1 => Expm1,
    /// Natural log.
    log => Log,
    /// `log(1 + x)`.
    log1p => Log1p,
    /// `tanh(x)`.
    tanh => Tanh,
    /// `1 / (1 + e^-x)`.
    logistic => Logistic,
    /// `1 / sqrt(x)`.
    rsqrt => Rsqrt,
    /// `sqrt(x)`.
    sqrt => Sqrt,
    /// Cube root.
    cbrt => Cbrt,
    /// `|x|`.
    abs => Abs,
    /// Sign of `x`.
    sign => Sign,
    /// Round down.
    floor => Floor,
    /// Round up.
    ceil => Ceil,
    /// Round to nearest even.
    round_nearest_even => RoundNearestEven,
    /// `cos(x)`.
    cos => Cos,
    /// `sin(x)`.
    sin => Sin,
    /// `tan(x)`.
    tan => Tan,
    /// Logical / bitwise not.
    not => Not,
    /// True where `x` is finite.
    is_finite => IsFinite,
}

macro_rules! binary_methods {
    ($($(#[$doc:meta])* $name:ident => $variant:ident),* $(,)?) => {
        impl Builder {
            $(
                $(#[$doc])*
                #[track_caller]
                pub fn $name(&self, a: Op, b: Op) -> Result<Op> {
                    self.binary(BinaryOp::$variant, a, b)
                }
            )*
        }
    };
}

binary_methods! {
    /// `a + b`.
    add => Add,
    /// `a - b`.
    sub => Sub,
    /// `a * b`.
    mul => Mul,
    /// `a / b`.
    div => Div,
    /// Elementwise maximum.
    max => Max,
    /// Elementwise minimum.
    min => Min,
    /// `a ^ b`.
    pow => Pow,
    /// Remainder (sign of `a`).
    rem => Rem,
    /// `atan2(a, b)`.
    atan2 => Atan2,
    /// Logical / bitwise and.
    and => And,
    /// Logical / bitwise or.
    or => Or,
    /// Logical / bitwise xor.
    xor => Xor,
    /// `a << b`.
    shift_left => ShiftLeft,
    /// Logical `a >> b`.
    shift_right_logical => ShiftRightLogical,
    /// Arithmetic `a >> b`.
    shift_right_arithmetic => ShiftRightArithmetic,
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
                return self.push(loc, Kind::Broadcast(Vec::new()), vec![x], out, Vec::new());
            }
        }
        x
    }

    fn broadcast_pair(
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
        Ok(self.push(loc, Kind::Compare(dir), vec![a, b], out, Vec::new()))
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
        Ok(self.push(loc, Kind::Select, vec![p, t, f], out, Vec::new()))
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
        Ok(self.push(loc, Kind::Clamp, vec![l, x, h], out, Vec::new()))
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
        Ok(self.push(loc, Kind::Convert, vec![x], out, Vec::new()))
    }

    /// Reinterpret the bits as another element type of the same width.
    #[track_caller]
    pub fn bitcast_convert(&self, x: Op, ty: ElementType) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "bitcast_convert", x)?;
        let out = bitcast_convert(&s, ty).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(loc, Kind::BitcastConvert, vec![x], out, Vec::new()))
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

    #[test]
    fn unary_and_compare_rules() {
        assert!(unary(UnaryOp::Exp, &Shape::array(ElementType::S32, &[2])).is_err());
        assert_eq!(
            unary(UnaryOp::IsFinite, &f32s(&[2])),
            Ok(Shape::array(ElementType::Pred, &[2]))
        );
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
