//! hlo-builder crate.
