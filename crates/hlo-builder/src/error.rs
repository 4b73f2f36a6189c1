//! The crate's error type.

use crate::shape::ShapeError;

/// Errors of graph construction and module decoding.
///
/// Every construction error names the op, the offending shapes or attributes, the Rust source
/// location of the builder call and the active name scope, e.g.
/// `dot_general: lhs contracting dim 1 (size 3) != rhs contracting dim 0 (size 4): lhs f32[2,3], rhs f32[4,5] (built at crates/model/src/layers.rs:42 in layer_3/rla)`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shape rule rejected the operands or attributes.
    #[error("{source} (built at {location}{})", scope_suffix(scope))]
    Shape {
        /// The rule's error.
        source: ShapeError,
        /// `file:line` of the builder call.
        location: String,
        /// Active name scope (may be empty).
        scope: String,
    },
    /// Any other invalid use of the builder (an op from another builder, a computation from
    /// another module, a bad sharding, ...).
    #[error("{op}: {message} (built at {location}{})", scope_suffix(scope))]
    Invalid {
        /// The builder method.
        op: &'static str,
        /// What is wrong.
        message: String,
        /// `file:line` of the builder call.
        location: String,
        /// Active name scope (may be empty).
        scope: String,
    },
    /// A serialized module could not be decoded.
    #[error("decoding HloModuleProto: {0}")]
    Decode(#[from] prost::DecodeError),
}

fn scope_suffix(scope: &str) -> String {
    if scope.is_empty() {
        String::new()
    } else {
        format!(" in {scope}")
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
