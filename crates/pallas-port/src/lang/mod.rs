//! A small kernel language for the RLA blocks on accelerators (DESIGN §9).
//!
//! - [`ir`]: the kernel program ([`Kernel`]): a grid with per-axis semantics, operands seen
//!   through [`BlockSpec`]s (block shape + index map), scratch buffers, tiles, loops with carried
//!   values, matmul with f32 accumulation, elementwise ops, reductions, iota masks, transpose;
//!   built with [`KernelBuilder`] ([`builder`]), whose every op checks a pure shape rule
//!   ([`rules`]).
//! - [`interp`]: a CPU interpreter that runs a kernel on host slices (the numerics check).
//! - [`triton`]: the Triton back end (textual TTIR in a `__gpu$xla.gpu.triton` custom call).
//! - [`mosaic`]: the Mosaic back end (TPU): MLIR text in a `tpu_custom_call`, with the checks
//!   libtpu does not make; [`rla_mosaic`]: the RLA kernels in the blocked form it needs.
//! - [`rla`]: the RLA forward and backward kernels written in it, and their graph wrappers.
//! - `arith`: the MLIR op and predicate names both MLIR back ends emit for elementwise ops.
//!
//! The IR speaks of blocks and tiles, never pointers, so a Mosaic (TPU) back end can read the
//! same programs.

mod arith;
pub mod builder;
pub mod interp;
pub mod ir;
pub mod mosaic;
pub mod rla;
pub mod rla_mosaic;
pub mod rules;
pub mod triton;

pub use builder::KernelBuilder;
pub use ir::{
    Affine, ArrayDecl, BinOp, Block, BlockSpec, CmpOp, DType, GridAxis, Index, Inst, Kernel,
    LangError, LangResult, Op, Precision, ReduceOp, Ref, Semantics, Type, UnOp, Value,
};

use hlo_builder::{Builder, ElementType, Op as HloOp, Shape};

/// The f32 array shape of `dims`.
fn f32_shape(dims: &[usize]) -> Shape {
    Shape::array(
        ElementType::F32,
        &dims.iter().map(|&x| x as i64).collect::<Vec<_>>(),
    )
}

/// What both back ends' custom calls check before emitting `k`: one f32 operand per kernel input,
/// shaped as declared (errors under `op`, naming the kernel and the operand). Returns the call's
/// result shape: the one output's array, else a tuple of them.
fn call_result_shape(
    b: &Builder,
    op: &'static str,
    k: &Kernel,
    operands: &[HloOp],
) -> hlo_builder::Result<Shape> {
    if operands.len() != k.inputs.len() {
        let names: Vec<&str> = k.inputs.iter().map(|a| a.name.as_str()).collect();
        return Err(b.error(
            op,
            format!(
                "kernel {} takes {} operands ({}), got {}",
                k.name,
                k.inputs.len(),
                names.join(", "),
                operands.len()
            ),
        ));
    }
    for (a, &x) in k.inputs.iter().zip(operands) {
        let (got, want) = (b.shape(x)?, f32_shape(&a.shape));
        if got != want {
            return Err(b.error(
                op,
                format!(
                    "kernel {} operand `{}` must be {}, got {}",
                    k.name,
                    a.name,
                    want.short(),
                    got.short()
                ),
            ));
        }
    }
    Ok(match k.outputs.as_slice() {
        [one] => f32_shape(&one.shape),
        many => Shape::tuple(many.iter().map(|a| f32_shape(&a.shape)).collect()),
    })
}
