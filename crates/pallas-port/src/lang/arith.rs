//! The MLIR `arith` and `math` ops (and comparison predicates) that both MLIR back ends
//! ([`super::triton`], [`super::mosaic`]) emit for the elementwise ops of the IR: one table, so
//! the two cannot drift apart.

use super::ir::{BinOp, CmpOp, UnOp};

/// Which float max/min a back end emits: the NaN-propagating `arith.maximumf`/`minimumf`
/// (Mosaic) or `arith.maxnumf`/`minnumf`
/// (Triton).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloatMinMax {
    /// `arith.maximumf` / `arith.minimumf`.
    Propagating,
    /// `arith.maxnumf` / `arith.minnumf`.
    Num,
}

/// The op of `a op b` on f32 (`float`) or i32/predicate operands.
pub(crate) fn binary(op: BinOp, float: bool, minmax: FloatMinMax) -> &'static str {
    use FloatMinMax::*;
    match (op, float) {
        (BinOp::Add, true) => "arith.addf",
        (BinOp::Sub, true) => "arith.subf",
        (BinOp::Mul, true) => "arith.mulf",
        (BinOp::Div, true) => "arith.divf",
        (BinOp::Max, true) if minmax == Propagating => "arith.maximumf",
        (BinOp::Min, true) if minmax == Propagating => "arith.minimumf",
        (BinOp::Max, true) => "arith.maxnumf",
        (BinOp::Min, true) => "arith.minnumf",
        (BinOp::Add, false) => "arith.addi",
        (BinOp::Sub, false) => "arith.subi",
        (BinOp::Mul, false) => "arith.muli",
        (BinOp::Div, false) => "arith.divsi",
        (BinOp::Max, false) => "arith.maxsi",
        (BinOp::Min, false) => "arith.minsi",
        (BinOp::And, _) => "arith.andi",
    }
}

/// The op of `op x` (f32).
pub(crate) fn unary(op: UnOp) -> &'static str {
    match op {
        UnOp::Exp => "math.exp",
        UnOp::Neg => "arith.negf",
    }
}

/// The comparison op (`arith.cmpf`, ordered, for f32; `arith.cmpi`, signed, otherwise) and its
/// predicate, by name (the generic syntax's keyword) and by value (the attribute's integer).
pub(crate) fn compare(op: CmpOp, float: bool) -> (&'static str, &'static str, i64) {
    let (name, value) = match (op, float) {
        (CmpOp::Eq, false) => ("eq", 0),
        (CmpOp::Ne, false) => ("ne", 1),
        (CmpOp::Lt, false) => ("slt", 2),
        (CmpOp::Le, false) => ("sle", 3),
        (CmpOp::Gt, false) => ("sgt", 4),
        (CmpOp::Ge, false) => ("sge", 5),
        (CmpOp::Eq, true) => ("oeq", 1),
        (CmpOp::Gt, true) => ("ogt", 2),
        (CmpOp::Ge, true) => ("oge", 3),
        (CmpOp::Lt, true) => ("olt", 4),
        (CmpOp::Le, true) => ("ole", 5),
        (CmpOp::Ne, true) => ("one", 6),
    };
    let op = if float { "arith.cmpf" } else { "arith.cmpi" };
    (op, name, value)
}
