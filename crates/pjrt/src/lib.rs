//! Safe Rust bindings to the PJRT C API, loaded at run time from an XLA plugin.
//!
//! All `unsafe` code of the workspace lives in this crate.

pub mod dtype;

pub use dtype::{ElementType, NativeType};
