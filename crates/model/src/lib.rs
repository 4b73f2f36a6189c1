//! The RAttention transformer: configs, parameters, layers, the stack, loss and decode, traced to HLO.

pub mod config;
pub mod params;
pub mod reference;

pub use config::{ConfigError, ModelConfig};
pub use params::{init_param, param_count, param_specs, Init, ParamSpec};
