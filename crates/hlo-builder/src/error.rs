//! The crate's error type and its constructors: every error names the op, the Rust call site
//! (`#[track_caller]`) and, where a builder is at hand, its current name scope.

use std::panic::Location;

use crate::builder::Builder;
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

impl Error {
    /// An [`Error::Invalid`] for code that has no [`Builder`] at hand: `op` and `message`, the
    /// caller's `file:line`, no name scope. With a builder, prefer [`Builder::error`].
    ///
    /// ```
    /// let e = hlo_builder::Error::invalid("model", "parameter \"w\" is missing");
    /// assert!(e.to_string().starts_with("model: parameter \"w\" is missing (built at "));
    /// ```
    #[track_caller]
    pub fn invalid(op: &'static str, message: impl Into<String>) -> Error {
        Error::invalid_at(Location::caller(), String::new(), op, message)
    }

    /// The one place an [`Error::Invalid`] is put together.
    pub(crate) fn invalid_at(
        loc: &'static Location<'static>,
        scope: String,
        op: &'static str,
        message: impl Into<String>,
    ) -> Error {
        Error::Invalid {
            op,
            message: message.into(),
            location: location(loc),
            scope,
        }
    }
}

/// `file:line` of a call site.
fn location(loc: &Location<'_>) -> String {
    format!("{}:{}", loc.file(), loc.line())
}

impl Builder {
    /// An [`Error::Invalid`] for `op` with the caller's `file:line` and this builder's current
    /// name scope. Code outside this crate (layers, kernels) uses it for its own checks, so its
    /// errors read like the builder's.
    ///
    /// ```
    /// use hlo_builder::Builder;
    /// let b = Builder::new("m");
    /// let _scope = b.name_scope("layer_0");
    /// let e = b.error("rla", "chunk must divide the sequence length");
    /// let text = e.to_string();
    /// assert!(text.starts_with("rla: chunk must divide the sequence length (built at "));
    /// assert!(text.ends_with(" in layer_0)"));
    /// ```
    #[track_caller]
    pub fn error(&self, op: &'static str, message: impl Into<String>) -> Error {
        self.error_at(Location::caller(), op, message)
    }

    /// [`Builder::error`] at an explicit call site (for methods that took their caller early with
    /// `Location::caller()` and report errors from helpers).
    pub fn error_at(
        &self,
        loc: &'static Location<'static>,
        op: &'static str,
        message: impl Into<String>,
    ) -> Error {
        Error::invalid_at(loc, self.current_scope(), op, message)
    }

    /// Turn a shape-rule error into an [`Error::Shape`] with the call site and name scope.
    pub(crate) fn shape_err(&self, loc: &'static Location<'static>, e: ShapeError) -> Error {
        Error::Shape {
            source: e,
            location: location(loc),
            scope: self.current_scope(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::param;
    use crate::ElementType;

    fn location_of(e: &Error) -> &str {
        match e {
            Error::Invalid { location, .. } | Error::Shape { location, .. } => location,
            Error::Decode(_) => "",
        }
    }

    #[test]
    fn constructors_record_the_call_site_and_scope() {
        let here = line!() + 1;
        let e = Error::invalid("model", "bad");
        assert_eq!(location_of(&e), format!("{}:{here}", file!()));
        assert_eq!(
            e.to_string(),
            format!("model: bad (built at {}:{here})", file!())
        );

        let b = Builder::new("b");
        let _scope = b.name_scope("layer_0");
        let here = line!() + 1;
        let e = b.error("rla", "chunk too large");
        assert_eq!(
            e.to_string(),
            format!(
                "rla: chunk too large (built at {}:{here} in layer_0)",
                file!()
            )
        );
    }

    #[test]
    fn alias_errors_name_the_caller() {
        let b = Builder::new("a");
        let x = param(&b, ElementType::F32, &[2], "x");
        let comp = b.build(b.tuple(&[x]).unwrap()).unwrap();
        let here = line!() + 1;
        let e = comp.with_input_output_alias(1, 0).unwrap_err();
        assert_eq!(location_of(&e), format!("{}:{here}", file!()));
    }
}
