//! model crate.
