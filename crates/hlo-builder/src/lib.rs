//! An XlaBuilder-like graph API that emits XLA's `HloModuleProto` (the `prost` messages of
//! `xla-data`) and XLA HLO text.
//!
//! * [`Builder`] makes instructions through `&self` methods that return cheap [`Op`] handles;
//!   every method checks its operands with a pure shape rule ([`shape_rules`]) and reports
//!   errors that name the op, the shapes, the Rust call site and the name scope.
//! * [`Builder::build`] turns a root op into a [`Computation`]; sub-computations (reducers, loop
//!   bodies, branches) come from [`Builder::sub_builder`] and share the module's id space.
//! * [`Computation::to_bytes`] gives the serialized module for PJRT (`format = "hlo"`), and
//!   [`Computation::to_text`] / [`print_module`] print XLA HLO text (for any module, including
//!   XLA's optimized ones).
//!
//! ```
//! use hlo_builder::{Builder, ElementType, Shape};
//!
//! let b = Builder::new("softmax");
//! let x = b.parameter(Shape::array(ElementType::F32, &[4, 8]), "x").unwrap();
//! let _scope = b.name_scope("softmax");
//! let m = b.reduce_max(x, &[1]).unwrap();
//! let m = b.broadcast_in_dim(m, &[4, 8], &[0]).unwrap();
//! let e = b.exp(b.sub(x, m).unwrap()).unwrap();
//! let s = b.broadcast_in_dim(b.reduce_sum(e, &[1]).unwrap(), &[4, 8], &[0]).unwrap();
//! let y = b.div(e, s).unwrap();
//! let comp = b.build(y).unwrap();
//! assert_eq!(comp.program_shape().1, Shape::array(ElementType::F32, &[4, 8]));
//! let bytes = comp.to_bytes();
//! assert!(!bytes.is_empty());
//! assert!(comp.to_text().contains("op_name=\"softmax/divide."));
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod autodiff;
mod builder;
mod error;
pub mod ops;
pub mod proto;
mod shape;
pub mod shape_rules;
mod sharding;
mod text;

pub use builder::{Builder, Computation, Op, ScopeGuard, ShardingScope};
pub use error::{Error, Result};
pub use ops::custom_call::{mlir_dictionary, Attr};
pub use ops::dot::{DotDims, Precision};
pub use ops::elementwise::{BinaryOp, Cmp, UnaryOp};
pub use ops::gather::{GatherDims, ScatterDims, ScatterUpdate};
pub use ops::rng::threefry2x32_host;
pub use shape::{Shape, ShapeError, ShapeResult};
pub use sharding::Sharding;
pub use text::{print_module, shape_to_string};
pub use xla_data::{ElementType, NativeType};

/// Decode a serialized `HloModuleProto` (e.g. an optimized module from PJRT) and print it.
pub fn print_module_bytes(bytes: &[u8]) -> Result<String> {
    let m: proto::HloModuleProto = prost::Message::decode(bytes)?;
    Ok(print_module(&m))
}

/// Helpers for the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::{Builder, ElementType, Op, Shape};

    /// A parameter of type `ty` and dims `dims` named `name`.
    pub(crate) fn param(b: &Builder, ty: ElementType, dims: &[i64], name: &str) -> Op {
        b.parameter(Shape::array(ty, dims), name).unwrap()
    }
}
