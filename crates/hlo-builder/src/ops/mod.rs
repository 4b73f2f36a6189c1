//! Op families. Each module holds the family's pure shape rules (re-exported in
//! [`crate::shape_rules`]) next to the [`crate::Builder`] methods that emit the ops.

pub mod constant;
pub mod control;
pub mod custom_call;
pub mod dot;
pub mod elementwise;
pub mod gather;
pub mod reduce;
pub mod rng;
pub mod shape_ops;
