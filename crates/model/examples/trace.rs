//! Trace a config's forward + loss + backward graph (no parameters allocated) and report the time,
//! the instruction count and the parameter count.
//!
//! `cargo run --release -p model --example trace -- configs/3b.toml`

use hlo_builder::{Builder, ElementType, Shape};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for path in std::env::args().skip(1) {
        let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&path)?)?;
        let mut cfg: model::ModelConfig =
            t.remove("model").ok_or("no [model] table")?.try_into()?;
        // Trace with the HLO lowering so the count includes the RLA while loops (what TPU gets).
        cfg.rla.lowering = model::config::Lowering::Hlo;
        let m = model::Model::new(cfg)?;
        let cfg = m.config();
        let t0 = Instant::now();
        let b = Builder::new("train_step");
        let (params, named) = m.declare_params(&b)?;
        let tokens = b.parameter(
            Shape::array(ElementType::S32, &[1, cfg.seq_len as i64 + 1]),
            "tokens",
        )?;
        let l = m.loss(&b, &named, tokens, "tpu")?;
        let grads = b.grad(l, &params)?;
        let mut outs = vec![l];
        outs.extend(grads);
        let comp = b.build(b.tuple(&outs)?)?;
        let traced = t0.elapsed();
        let t1 = Instant::now();
        let bytes = comp.to_bytes();
        let ser = t1.elapsed();
        println!(
            "{path}: {} parameters, traced fwd+bwd (T={}) in {:.3} s, {} instructions in the entry computation, serialized {} MB in {:.3} s",
            m.param_count(),
            cfg.seq_len,
            traced.as_secs_f64(),
            comp.instruction_count(),
            bytes.len() / 1_000_000,
            ser.as_secs_f64()
        );
    }
    Ok(())
}
