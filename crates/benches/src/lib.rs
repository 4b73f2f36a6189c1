//! Shared pieces of the workspace benches in `/benches`: CPU time of the process, the load
//! average, per-call timing records that survive criterion's runs, the ratio table, and the
//! setup they all start from (`configs/bench.toml` with overrides, the attention kinds compared,
//! compiling and uploading on the CPU plugin, criterion's settings).
//!
//! ```
//! let t = rattention_benches::Timings::default();
//! t.time("x", 3, || {});
//! assert!(t.median_ms("x").is_some());
//! ```

#![forbid(unsafe_code)]

pub use pallas_port::bench_util::{cpu_s, env_list, env_usize, load, Timings};

use hlo_builder::Sharding;
use model::{init_param, Model};
use pjrt::{Buffer, Client, CompileOptions, LoadedExecutable, NamedValue, Program};
use std::time::Duration;
use trainer::config::RunConfig;

/// The attention kinds compared, with their overrides of `configs/bench.toml`: RAttention, SWA
/// (same window, no RLA) and full attention (every layer global).
pub const KINDS: [(&str, &[&str]); 3] = [
    ("rattention", &[]),
    ("swa", &["model.local_kind=swa"]),
    ("full", &["model.layer_pattern=[\"global\"]"]),
];

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[doc(hidden)]
pub use tikv_jemallocator::Jemalloc;

/// Makes jemalloc the bench's C allocator, as in `rattn` (`pjrt::host_memory`): write
/// `rattention_benches::jemalloc_allocator!();` at the top level of a bench file.
#[macro_export]
macro_rules! jemalloc_allocator {
    () => {
        /// jemalloc as the process's C allocator, as in `rattn` (`pjrt::host_memory`).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        #[global_allocator]
        static ALLOCATOR: $crate::Jemalloc = $crate::Jemalloc;
    };
}

/// `configs/bench.toml` with the `--set` style `overrides`.
pub fn bench_config(overrides: &[String]) -> RunConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/bench.toml");
    RunConfig::load(&path, overrides).expect("configs/bench.toml")
}

/// Criterion with 10 samples, `warm_up` and `measurement` seconds, and the command line's flags.
/// Also, as `rattn` does, keeps the plugin's freed per-step buffers mapped
/// ([`pjrt::host_memory::retain_freed_memory`]; `RATTN_MALLOC=default`: the allocator's own
/// defaults): call it first thing in `main`.
pub fn criterion(warm_up: u64, measurement: u64) -> criterion::Criterion {
    pjrt::host_memory::retain_freed_memory();
    criterion::Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(warm_up))
        .measurement_time(Duration::from_secs(measurement))
        .configure_from_args()
}

/// A CPU client with `devices` devices and our CPU kernels registered (the sharded benches).
pub fn cpu_client(devices: usize) -> Client {
    let plugin = pjrt::cpu_plugin().expect("XLA CPU plugin (run `rattn plugin install cpu`)");
    let client = Client::new(
        &plugin,
        &[("cpu_device_count", NamedValue::I64(devices as i64))],
    )
    .unwrap_or_else(|e| panic!("CPU client with {devices} devices: {e}"));
    pallas_port::register_cpu_kernels(&client).expect("register the RLA FFI handlers");
    client
}

/// Compiles serialized HLO (a built computation's `to_bytes`) for one device.
pub fn compile(client: &Client, hlo: &[u8]) -> LoadedExecutable {
    client
        .compile(Program::Hlo(hlo), &CompileOptions::default())
        .expect("compile")
}

/// Compiles serialized HLO for `n` devices: SPMD over devices `0..n` when `n > 1`, as
/// [`compile`] for one.
pub fn compile_spmd(client: &Client, hlo: &[u8], n: usize) -> LoadedExecutable {
    let options = if n > 1 {
        CompileOptions {
            device_assignment: Some(vec![(0..n as i64).collect()]),
            ..CompileOptions::spmd(n)
        }
    } else {
        CompileOptions::default()
    };
    client
        .compile(Program::Hlo(hlo), &options)
        .expect("compile")
}

/// The dims of one device's piece of an array of `dims` laid out by `sharding`.
pub fn piece_dims(sharding: &Sharding, dims: &[usize]) -> Vec<i64> {
    sharding
        .shard_dims(dims)
        .expect("shard dims")
        .iter()
        .map(|&x| x as i64)
        .collect()
}

/// The f32 host array `host` of `dims` cut by `sharding` into the pieces of devices `0..n`, each
/// uploaded to its device (one buffer per device, in device order).
pub fn upload_pieces(
    client: &Client,
    host: &[f32],
    dims: &[usize],
    sharding: &Sharding,
    n: usize,
) -> Vec<Buffer> {
    let devices = client.addressable_devices().expect("devices");
    let piece = piece_dims(sharding, dims);
    sharding
        .split_host(host, dims, n)
        .expect("split")
        .iter()
        .zip(&devices)
        .map(|(x, dev)| {
            client
                .buffer_from_host(x, &piece, Some(dev))
                .expect("upload")
        })
        .collect()
}

/// An f32 buffer of `shape` on the client's first device.
pub fn upload(client: &Client, data: &[f32], shape: &[usize]) -> Buffer {
    let s: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
    client.buffer_from_host(data, &s, None).expect("upload")
}

/// `model`'s parameters from their initialisers (seed 0), in [`Model::param_specs`] order.
pub fn init_params(client: &Client, model: &Model) -> Vec<Buffer> {
    model
        .param_specs()
        .iter()
        .map(|s| upload(client, &init_param(s, 0), &s.shape))
        .collect()
}

/// A zero decode cache of `model` for `batch` sequences of up to `max_len` positions.
pub fn zero_cache(client: &Client, model: &Model, batch: usize, max_len: usize) -> Vec<Buffer> {
    model
        .cache_layout(batch, max_len)
        .buffers()
        .iter()
        .map(|b| upload(client, &vec![0.0; b.shape.iter().product()], &b.shape))
        .collect()
}

/// One row of a ratio table: a label and its (wall ms, CPU ms) per call.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was timed, e.g. `rattention`.
    pub label: String,
    /// Median wall ms per call.
    pub wall_ms: f64,
    /// Median CPU ms per call (all threads).
    pub cpu_ms: f64,
}

impl Row {
    /// The row `label` of the medians [`Timings`] recorded under `id`, if any.
    pub fn median(timings: &Timings, id: &str, label: &str) -> Option<Row> {
        timings.median_ms(id).map(|(wall_ms, cpu_ms)| Row {
            label: label.into(),
            wall_ms,
            cpu_ms,
        })
    }
}

/// A table of `rows` with tokens/s for `tokens` per call and each row's speed relative to the
/// row labelled `base` (`base time / row time`, > 1: faster), on wall and on CPU time.
pub fn ratio_table(title: &str, rows: &[Row], tokens: f64, base: &str) -> String {
    let b = rows.iter().find(|r| r.label == base);
    let mut s = format!(
        "{title}\n  {:<14} {:>11} {:>11} {:>11} {:>10} {:>10}\n",
        "",
        "wall ms",
        "CPU ms",
        "tok/s",
        format!("× {base}"),
        "(CPU)"
    );
    for r in rows {
        let (rw, rc) = b.map_or((f64::NAN, f64::NAN), |b| {
            (b.wall_ms / r.wall_ms, b.cpu_ms / r.cpu_ms)
        });
        s += &format!(
            "  {:<14} {:>11.2} {:>11.2} {:>11.0} {:>10.2} {:>10.2}\n",
            r.label,
            r.wall_ms,
            r.cpu_ms,
            tokens / (r.wall_ms * 1e-3),
            rw,
            rc
        );
    }
    s
}
