//! The parts of `rattn` other crates build on: run configs ([`config`]) and the train-step graph
//! ([`step`]). The workspace benches (`benches/` at the repository root) compile the same train
//! step that `rattn train` runs.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let cfg = trainer::config::RunConfig::load(
//!     std::path::Path::new("configs/bench.toml"),
//!     &["model.seq_len=1024".to_string()],
//! )?;
//! let step = trainer::step::build_train_step(&cfg, "cpu", &model::Mesh::single())?;
//! println!("{}", step.name());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod config;
pub mod step;
