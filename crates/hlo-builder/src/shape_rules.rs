//! All pure shape-inference rules, one function per op: `(operand shapes, attributes) ->
//! Result<Shape, ShapeError>`. They need no builder, so they can be unit-tested and reused.
//!
//! This module only gathers them under one path; each rule is defined in its op family's file
//! under [`crate::ops`], beside the op's builder method, emission and VJP rule.

pub use crate::ops::collective::{all_gather, collective_permute, reduce_scatter};
pub use crate::ops::constant::iota;
pub use crate::ops::control::{call, conditional, get_tuple_element, while_loop};
pub use crate::ops::dot::dot_general;
pub use crate::ops::elementwise::{
    binary, bitcast_convert, clamp, compare, convert, select, unary,
};
pub use crate::ops::gather::gather;
pub use crate::ops::reduce::reduce;
pub use crate::ops::scatter::scatter;
pub use crate::ops::shape_ops::{
    broadcast_in_dim, concatenate, dynamic_slice, dynamic_update_slice, pad, reshape, reverse,
    slice, transpose,
};
