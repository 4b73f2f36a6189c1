//! pallas-port: the Residual Linear Attention (RLA) blocks of RAttention.
//!
//! - [`config`]: the block contract ([`RlaConfig`] attributes, [`RlaDims`] shapes, [`RlaError`]).
//! - [`kernel`]: fast fp32 CPU kernels `rla_fwd` / `rla_bwd` (chunked scan, DESIGN §3).
//! - [`ffi`]: the kernels as XLA FFI handlers (`rattention.rla_fwd` / `rattention.rla_bwd`).
//! - [`graph`]: [`rla`] adds the block pair to a graph (custom call or HLO lowering, custom VJP).
//! - [`reference`]: naive f64 formulas the kernels are tested against.

#![forbid(unsafe_code)]

pub mod config;
pub mod ffi;
pub mod graph;
pub mod hlo;
pub mod kernel;
pub mod reference;

pub use config::{FeatureMap, RlaConfig, RlaDims, RlaError};
pub use ffi::{kernels_registered, register_cpu_kernels};
pub use graph::{rla, rla_with_state, Lowering, RlaOutputs};
