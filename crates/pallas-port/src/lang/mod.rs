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
//!
//! The IR speaks of blocks and tiles, never pointers, so a Mosaic (TPU) back end can read the
//! same programs.

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
