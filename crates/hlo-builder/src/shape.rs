//! The error type of the pure shape rules and their small helpers; [`Shape`] itself is
//! `xla_data::Shape`, re-exported here so that `crate::shape::Shape` keeps working.

use crate::ElementType;
pub use xla_data::Shape;

/// A shape-rule violation: the op and a message naming the offending shapes / attributes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {message}")]
pub struct ShapeError {
    /// The op whose rule failed (`"dot_general"`, `"add"`).
    pub op: &'static str,
    /// What is wrong, quoting the operand shapes.
    pub message: String,
}

impl ShapeError {
    /// A new error for `op`.
    pub fn new(op: &'static str, message: impl Into<String>) -> ShapeError {
        ShapeError {
            op,
            message: message.into(),
        }
    }
}

/// Result of a shape rule.
pub type ShapeResult = std::result::Result<Shape, ShapeError>;

/// Require an array operand; returns (type, dims).
pub(crate) fn expect_array<'a>(
    op: &'static str,
    what: &str,
    s: &'a Shape,
) -> Result<(ElementType, &'a [i64]), ShapeError> {
    match s {
        Shape::Array { ty, dims } => Ok((*ty, dims)),
        Shape::Tuple(_) => Err(ShapeError::new(
            op,
            format!("{what} must be an array, got tuple {}", s.short()),
        )),
    }
}

/// Check that `d` is a valid dimension index for rank `rank`.
pub(crate) fn check_dim(
    op: &'static str,
    what: &str,
    d: i64,
    rank: usize,
    s: &Shape,
) -> Result<usize, ShapeError> {
    if d < 0 || d as usize >= rank {
        return Err(ShapeError::new(
            op,
            format!(
                "{what} {d} out of range for rank-{rank} operand {}",
                s.short()
            ),
        ));
    }
    Ok(d as usize)
}
