//! Time to trace, serialize and print a graph of about 100k instructions.
//!
//! `cargo run --release -p hlo-builder --example trace_100k`

use std::time::Instant;

use hlo_builder::{Builder, ElementType, Shape};

fn main() -> hlo_builder::Result<()> {
    let t0 = Instant::now();
    let b = Builder::new("big");
    let mut x = b.parameter(Shape::array(ElementType::F32, &[64, 64]), "x")?;
    let w = b.parameter(Shape::array(ElementType::F32, &[64, 64]), "w")?;
    let mut layer = 0;
    while b.instruction_count() < 100_000 {
        let _s = b.name_scope(&format!("layer_{layer}"));
        let h = b.dot(x, w)?;
        let h = b.add(h, b.scalar(0.5f32)?)?;
        let h = b.tanh(h)?;
        let m = b.reduce_max(h, &[1])?;
        let m = b.broadcast_in_dim(m, &[64, 64], &[0])?;
        x = b.sub(h, m)?;
        layer += 1;
    }
    let comp = b.build(x)?;
    let trace = t0.elapsed();
    let t1 = Instant::now();
    let proto = comp.to_proto();
    let to_proto = t1.elapsed();
    let t2 = Instant::now();
    let bytes = prost::Message::encode_to_vec(&proto);
    let encode = t2.elapsed();
    let t3 = Instant::now();
    let text = hlo_builder::print_module(&proto);
    let print = t3.elapsed();
    println!(
        "{} instructions ({layer} layers): trace {:.1} ms, to_proto {:.1} ms, encode {:.1} ms ({:.1} MB), text {:.1} ms ({:.1} MB)",
        comp.instruction_count(),
        trace.as_secs_f64() * 1e3,
        to_proto.as_secs_f64() * 1e3,
        encode.as_secs_f64() * 1e3,
        bytes.len() as f64 / 1e6,
        print.as_secs_f64() * 1e3,
        text.len() as f64 / 1e6
    );
    Ok(())
}
