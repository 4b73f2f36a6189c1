//! The RAttention transformer: configs, parameters, layers, the stack, loss and decode, traced to HLO.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg: model::ModelConfig = toml::from_str(&std::fs::read_to_string("configs/tiny.toml")?
//!     .split("[train]").next().unwrap().replace("[model.rla]", "[rla]").replacen("[model]", "", 1))?;
//! let b = hlo_builder::Builder::new("forward");
//! let (_params, named) = model::transformer::declare_params(&b, &cfg)?;
//! let tokens = b.parameter(hlo_builder::Shape::array(hlo_builder::ElementType::S32, &[2, 64]), "tokens")?;
//! let logits = model::transformer::forward(&b, &cfg, &named, tokens, "cpu")?;
//! let module = b.build(logits)?;
//! println!("{}", module.to_text());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod config;
pub mod decode;
pub mod layers;
pub mod params;
pub mod reference;
pub mod transformer;

pub use config::{ConfigError, ModelConfig};
pub use params::{init_param, param_count, param_specs, Init, ParamSpec};
