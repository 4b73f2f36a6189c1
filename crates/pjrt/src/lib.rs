//! Safe Rust bindings to the PJRT C API, loaded at run time from an XLA plugin, plus safe XLA FFI
//! custom-call handlers.
//!
//! All `unsafe` code of the workspace lives in this crate. The C layouts follow the PJRT 0.114
//! header (checked against the 0.115 CPU plugin) and XLA FFI 0.3; see
//! `shared/reference/pjrt-ffi-facts.md`.
//!
//! # Modules
//! * [`plugin`]: loading a plugin, its function table, named values; [`install`]: the pinned
//!   wheels and the [`install::PluginCache`] they are installed into.
//! * [`client`] (clients and their devices), [`device`] (device descriptions, shared with
//!   topologies), [`buffer`], [`dtype`], [`options`] (programs and compile options).
//! * [`executable`]: loaded executables (run on a client's devices) and unloaded ones (compiled
//!   for a topology), with one memory-statistics type and one set of queries.
//! * Ahead of time, without the hardware: [`topology`] (the wrapper and its compile),
//!   [`tpu`] (libtpu: generations, names, environment), [`gpu`] (built-in specs, shapes,
//!   environment), [`gpu_spec`] (spec checks and the text-format reader); the CUDA tool search
//!   is private.
//! * [`ffi`]: safe XLA FFI handlers; [`error`]: the crate's error type; [`host_memory`]: glibc's
//!   allocator set to keep the CPU plugin's per-execution buffers mapped.
//!
//! Nothing here reads a program's own configuration: callers pass caches, paths and options,
//! and set the plugins' environment with [`tpu::set_environment`] / [`gpu::set_environment`]
//! before any thread starts.
//!
//! # Plugins
//! ```no_run
//! // Install (pip download + unzip + SHA-256 check, cached) and load the CPU plugin once.
//! let plugin = pjrt::cpu_plugin()?;
//! assert_eq!(plugin.api_version().0, 0);
//! // Or a specific file:
//! let same = pjrt::Plugin::load(plugin.path())?;
//! # Ok::<(), pjrt::Error>(())
//! ```
//!
//! # Clients and devices
//! ```no_run
//! use pjrt::{Client, NamedValue};
//! let client = Client::new(&pjrt::cpu_plugin()?, &[("cpu_device_count", NamedValue::I64(8))])?;
//! assert_eq!(client.platform_name()?, "cpu");
//! assert_eq!(client.addressable_devices()?.len(), 8);
//! # Ok::<(), pjrt::Error>(())
//! ```
//!
//! # Compile and execute
//! ```no_run
//! use pjrt::{Client, CompileOptions, Program};
//! let client = Client::cpu()?;
//! let module = r#"
//! func.func @main(%a: tensor<4xf32>, %b: tensor<4xf32>) -> tensor<4xf32> {
//!   %0 = stablehlo.add %a, %b : tensor<4xf32>
//!   return %0 : tensor<4xf32>
//! }"#;
//! let exe = client.compile(Program::Mlir(module), &CompileOptions::default())?;
//! let a = client.buffer_from_host(&[1.0f32, 2.0, 3.0, 4.0], &[4], None)?;
//! let b = client.buffer_from_host(&[10.0f32; 4], &[4], None)?;
//! let out = exe.execute(&[&a, &b])?;
//! assert_eq!(out[0].to_host::<f32>()?, vec![11.0, 12.0, 13.0, 14.0]);
//! // Save and reload.
//! let exe2 = client.deserialize_executable(&exe.serialize()?)?;
//! # Ok::<(), pjrt::Error>(())
//! ```
//!
//! # SPMD
//! ```no_run
//! # use pjrt::{Client, CompileOptions, Program};
//! # let client = Client::cpu()?; let module = "";
//! // A module whose parameters carry `mhlo.sharding = "{devices=[4]<=[4]}"`:
//! let exe = client.compile(Program::Mlir(module), &CompileOptions::spmd(4))?;
//! let devices = client.addressable_devices()?;
//! let shards: Vec<_> = devices.iter().enumerate()
//!     .map(|(i, d)| client.buffer_from_host(&[i as f32; 4], &[4], Some(d)))
//!     .collect::<Result<_, _>>()?;
//! let outs = exe.execute_sharded(&shards.iter().map(|b| vec![b]).collect::<Vec<_>>())?;
//! # Ok::<(), pjrt::Error>(())
//! ```
//!
//! # Ahead-of-time compilation for TPU and GPU (no accelerator needed)
//! ```no_run
//! use pjrt::install::{PluginCache, PluginKind};
//! use pjrt::{CompileOptions, Program, Topology};
//! // First thing in main, before any thread starts: libtpu and the CUDA plugin read these.
//! pjrt::tpu::set_environment()?;
//! pjrt::gpu::set_environment()?;
//! let cache = PluginCache::default();
//! cache.install(PluginKind::Tpu)?; // once, cached
//! let v5e = Topology::tpu(&cache.load(PluginKind::Tpu)?, "v5e:2x2")?;
//! let exe = v5e.compile(Program::Mlir("module { ... }"), &CompileOptions::default())?;
//! exe.check_fits_in_device_memory()?; // peak bytes vs the chip's HBM
//! let flops = exe.cost_analysis()?.flops();
//! // or Topology::gpu(plugin, spec file, shape)
//! let h100 = Topology::gpu_named(&cache.load(PluginKind::Cuda)?, "h100", "1x1x8")?;
//! # Ok::<(), pjrt::Error>(())
//! ```
//!
//! # FFI handlers
//! ```no_run
//! use pjrt::ffi::{CallFrame, FfiError};
//! fn double(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
//!     let x = frame.arg(0)?.as_slice::<f32>()?;
//!     let mut y = frame.ret(0)?;
//!     for (o, i) in y.as_mut_slice::<f32>()?.iter_mut().zip(x) { *o = 2.0 * i; }
//!     Ok(())
//! }
//! pjrt::ffi_handler!(DOUBLE, double);
//! let client = pjrt::Client::cpu()?;
//! // Registers (process-global) and proves XLA can find the target.
//! client.register_ffi_handler("my_double", DOUBLE)?;
//! # Ok::<(), pjrt::Error>(())
//! ```

#![warn(missing_docs)]

pub mod buffer;
pub mod client;
mod compile;
mod cuda_tools;
pub mod device;
pub mod dtype;
pub mod error;
pub mod executable;
pub mod ffi;
pub mod gpu;
pub mod gpu_spec;
pub mod host_memory;
pub mod install;
pub mod kv;
pub mod options;
pub mod plugin;
mod sys;
pub mod topology;
pub mod tpu;

use std::sync::{Mutex, OnceLock};

pub use buffer::Buffer;
pub use client::{Client, Device};
pub use device::DeviceDescription;
pub use dtype::{ElementType, NativeType};
pub use error::{Error, ErrorCode, Result};
pub use executable::{CompiledMemoryStats, CostAnalysis, Executable, LoadedExecutable};
pub use ffi::FfiHandlerFn;
pub use kv::{KeyValueStore, KvError};
pub use options::{CompileOptions, OptionOverride, Program};
pub use plugin::{NamedValue, Plugin};
pub use topology::Topology;

/// The CPU plugin of the default cache ([`install::PluginCache::default`]), installed there on
/// first use and loaded once per process. Concurrent first calls wait for one installation.
pub fn cpu_plugin() -> Result<Plugin> {
    static CPU: OnceLock<Plugin> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(p) = CPU.get() {
        return Ok(p.clone());
    }
    let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = CPU.get() {
        return Ok(p.clone());
    }
    let plugin = install::PluginCache::default().load(install::PluginKind::Cpu)?;
    let _ = CPU.set(plugin.clone());
    Ok(plugin)
}
