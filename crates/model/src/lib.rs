//! The RAttention transformer: configs, parameters, layers, the stack, loss and decode, traced to HLO.
//!
//! [`Model`] is the entry point: it checks a [`ModelConfig`] once and answers everything about the
//! model — its parameters ([`ParamSpec`]: role and logical axes), its graphs (forward, loss,
//! prefill, decode step), its decode cache ([`CacheLayout`]) and its [`Cost`].
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut t: toml::Table = toml::from_str(&std::fs::read_to_string("configs/tiny.toml")?)?;
//! let cfg: model::ModelConfig = t.remove("model").unwrap().try_into()?;
//! let m = model::Model::new(cfg)?;
//! let b = hlo_builder::Builder::new("forward");
//! let (_params, named) = m.declare_params(&b)?;
//! let tokens = b.parameter(hlo_builder::Shape::array(hlo_builder::ElementType::S32, &[2, 64]), "tokens")?;
//! let logits = m.forward(&b, &named, tokens, "cpu")?;
//! let module = b.build(logits)?;
//! println!("{}", module.to_text());
//! println!("{:?}", m.cost(4096).cache);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod attention;
pub mod cache;
pub mod config;
pub mod cost;
pub mod decode;
pub mod layers;
pub mod model;
pub mod params;
pub mod reference;
pub mod sharding;
pub mod transformer;

pub use cache::{CacheBuffer, CacheBytes, CacheLayout, CachePart, LayerCache, LayerCacheOps};
pub use config::{ConfigError, FeatureMap, Lowering, ModelConfig};
pub use cost::{Cost, Costs, Flops};
pub use decode::{DecodeIo, LoopIo};
pub use model::{Attention, Model, Remat};
pub use params::{init_param, Init, LogicalAxis, ParamRole, ParamSpec};
pub use sharding::{
    AxisRules, Mesh, MeshAxis, MeshConfig, MeshError, ParamSharding, PartitionSpec, SeqGlobal,
};
pub use transformer::ParamOps;
