//! What one collective costs on the CPU plugin's 8 in-process devices on this machine: a
//! manually partitioned program that passes an `f32[ELEMS]` piece per device around a ring
//! `N` times (`collective-permute` then `+ 1`, so nothing folds), against the same program with
//! the permutes left out (`N` adds alone). The difference over `N` is one permute's rendezvous
//! and copy, what the sequence meshes' halo and prefix-sum exchanges pay each:
//!
//! ```sh
//! cargo run --release -p pallas-port --example collective_time
//! ```
//! `N` (default 40, about what one seq 8 train step of `configs/bench.toml` holds), `ELEMS`
//! (default 65536 floats = 256 KiB per device), `REPS` (default 50), `OP=all-gather` for an
//! all-gather of the pieces over the 8 devices (then the device's own slice of it, so the
//! size stays) instead of the permute. Prints the wall and the process's CPU time per run (mean
//! over `REPS` after a warm-up) for both programs.

use hlo_builder::{Builder, ElementType, Shape, Sharding};
use std::time::Instant;

const DEVICES: usize = 8;

/// The ring program with `n` rounds, each `x = permute(x) + 1` (with `gather`: `x = (the
/// all-gather of x)[a slice of x's size] + 1`; `x = x + 1` alone when `collective` is false).
fn program(n: usize, elems: i64, collective: bool, gather: bool) -> hlo_builder::Computation {
    let b = Builder::new("ring");
    let full = [DEVICES as i64 * elems];
    let x = b
        .parameter(Shape::array(ElementType::F32, &full), "x")
        .unwrap();
    let cut = Sharding::tiled(&[DEVICES as i64]);
    b.set_sharding(x, cut.clone()).unwrap();
    let piece = b.full_to_shard(x, cut.clone()).unwrap();
    let out = {
        let _m = b.manual_scope();
        let ring: Vec<(i64, i64)> = (0..DEVICES as i64)
            .map(|d| (d, (d + 1) % DEVICES as i64))
            .collect();
        let mut y = piece;
        for _ in 0..n {
            if collective && gather {
                let all = b
                    .all_gather(y, 0, &[(0..DEVICES as i64).collect()])
                    .unwrap();
                y = b.slice_in_dim(all, elems, 2 * elems, 0).unwrap();
            } else if collective {
                y = b.collective_permute(y, &ring).unwrap();
            }
            y = b.add(y, b.scalar(1.0f32).unwrap()).unwrap();
        }
        y
    };
    let root = b.shard_to_full(out, cut.clone(), &full).unwrap();
    b.set_sharding(root, cut).unwrap();
    b.build(root).unwrap()
}

fn main() {
    let env = pallas_port::bench_util::env_usize;
    let (n, elems, reps) = (env("N", 40), env("ELEMS", 65536), env("REPS", 50));
    let gather = std::env::var("OP").is_ok_and(|o| o == "all-gather");
    let name = if gather {
        "all-gather"
    } else {
        "collective-permute"
    };
    let client = pjrt::Client::new(
        &pjrt::cpu_plugin().expect("the CPU plugin: rattn plugin install cpu"),
        &[("cpu_device_count", pjrt::NamedValue::I64(DEVICES as i64))],
    )
    .expect("client");
    let devices = client.addressable_devices().expect("devices");
    let options = pjrt::CompileOptions {
        device_assignment: Some(vec![(0..DEVICES as i64).collect()]),
        ..pjrt::CompileOptions::spmd(DEVICES)
    };
    let data = vec![0.5f32; elems];
    let args: Vec<pjrt::Buffer> = devices
        .iter()
        .map(|d| {
            client
                .buffer_from_host(&data, &[elems as i64], Some(d))
                .expect("buffer")
        })
        .collect();
    let lists: Vec<Vec<&pjrt::Buffer>> = args.iter().map(|a| vec![a]).collect();
    let mut per_run = Vec::new();
    for collective in [false, true] {
        let comp = program(n, elems as i64, collective, gather);
        let exe = client
            .compile(pjrt::Program::Hlo(&comp.to_bytes()), &options)
            .expect("compile");
        exe.execute_sharded(&lists).expect("warm-up");
        let (t0, c0) = (Instant::now(), pallas_port::bench_util::cpu_s());
        for _ in 0..reps {
            exe.execute_sharded(&lists).expect("execute");
        }
        let wall = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let cpu = (pallas_port::bench_util::cpu_s() - c0) * 1e3 / reps as f64;
        let what = if collective { name } else { "adds alone" };
        println!(
            "{n} rounds, {elems} floats per device, {what:18} wall {wall:8.3} ms  CPU {cpu:8.3} ms per run"
        );
        per_run.push((wall, cpu));
    }
    let (w, c) = (
        (per_run[1].0 - per_run[0].0) / n as f64,
        (per_run[1].1 - per_run[0].1) / n as f64,
    );
    println!("one {name} over {DEVICES} devices: wall {w:.3} ms, CPU {c:.3} ms");
}
