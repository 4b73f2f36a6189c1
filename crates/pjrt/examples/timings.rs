//! Measures plugin load, client creation, compilation and execution latency on the CPU plugin.
//!
//! `cargo run --release -p pjrt --example timings`

use std::time::Instant;

use pjrt::{Client, CompileOptions, Program};

const MODULE: &str = r#"
module @timing {
  func.func public @main(%a: tensor<8xf32>, %b: tensor<8xf32>) -> tensor<8xf32> {
    %0 = stablehlo.add %a, %b : tensor<8xf32>
    %1 = stablehlo.multiply %0, %b : tensor<8xf32>
    return %1 : tensor<8xf32>
  }
}"#;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> pjrt::Result<()> {
    let t = Instant::now();
    let path =
        pjrt::install::PluginCache::default().locate(None, pjrt::install::PluginKind::Cpu)?;
    println!("locate/install CPU plugin: {:.2} ms", ms(t));
    let t = Instant::now();
    let plugin = pjrt::Plugin::load(&path)?;
    println!(
        "plugin load (dlopen + GetPjrtApi + initialize, first in process): {:.2} ms",
        ms(t)
    );
    let t = Instant::now();
    let _again = pjrt::Plugin::load(&path)?;
    println!("plugin load again (cached handle): {:.4} ms", ms(t));

    let t = Instant::now();
    let client = Client::new(&plugin, &[])?;
    println!("client create (first): {:.2} ms", ms(t));
    let t = Instant::now();
    let c2 = Client::new(&plugin, &[])?;
    println!("client create (second): {:.2} ms", ms(t));
    drop(c2);

    for i in 0..3 {
        let t = Instant::now();
        let _exe = client.compile(Program::Mlir(MODULE), &CompileOptions::default())?;
        println!("compile small StableHLO module #{i}: {:.2} ms", ms(t));
    }
    let exe = client.compile(Program::Mlir(MODULE), &CompileOptions::default())?;
    let a = client.buffer_from_host(&[1.0f32; 8], &[8], None)?;
    let b = client.buffer_from_host(&[2.0f32; 8], &[8], None)?;
    for _ in 0..100 {
        exe.execute(&[&a, &b])?;
    }
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        exe.execute(&[&a, &b])?;
    }
    println!(
        "execute f32[8] (inputs on device, outputs awaited): {:.2} us",
        ms(t) * 1e3 / n as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        let a = client.buffer_from_host(&[1.0f32; 8], &[8], None)?;
        let out = exe.execute(&[&a, &b])?;
        let _ = out[0].to_host::<f32>()?;
    }
    println!(
        "H2D + execute + D2H f32[8]: {:.2} us",
        ms(t) * 1e3 / n as f64
    );
    let bytes = exe.serialize()?;
    let t = Instant::now();
    let _d = client.deserialize_executable(&bytes)?;
    println!("deserialize ({} bytes): {:.2} ms", bytes.len(), ms(t));
    Ok(())
}
