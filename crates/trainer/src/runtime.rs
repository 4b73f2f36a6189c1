//! The `rattn` side of the PJRT runtime: the process environment the plugins read, the plugin
//! cache and discovery as the `RATTN_*` variables configure them, `--plugin cpu|cuda|tpu|PATH`,
//! the install hints of plugin errors, and compiling our graphs on a client.
//!
//! Variables: `RATTN_CACHE` (cache root; plugins in `$RATTN_CACHE/plugins`, else the `pjrt`
//! default), `RATTN_PIP` (the pip program to download with), `RATTN_PJRT_PLUGIN` (a plugin
//! library used for `--plugin cpu|cuda|tpu` instead of the cache), `RATTN_MALLOC=default`
//! (leave glibc's allocator as it is; see [`prepare_environment`]).

use anyhow::{anyhow, bail, Context, Result};
use hlo_builder::Computation;
use pjrt::install::{PluginCache, PluginKind};
use pjrt::{Client, CompileOptions, LoadedExecutable, Plugin, Program};
use std::path::{Path, PathBuf};

/// Sets the environment libtpu and the CUDA plugin read when they are loaded (variables already
/// set are kept), and makes glibc keep freed host memory for reuse
/// ([`pjrt::host_memory::retain_freed_memory`]; `RATTN_MALLOC=default` leaves it as it is), so
/// the CPU plugin's per-step buffers are not mapped afresh every step. Must run first in `main`,
/// before any thread starts.
pub fn prepare_environment() -> Result<()> {
    pjrt::host_memory::retain_freed_memory();
    pjrt::tpu::set_environment()?;
    pjrt::gpu::set_environment()?;
    Ok(())
}

/// The rattention cache root: `$RATTN_CACHE` if set, else the directory above the default plugin
/// cache (`$XDG_CACHE_HOME/rattention` or `~/.cache/rattention`). Plugins live in its `plugins`
/// folder, the measured matmul peak in `peak.json`.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("RATTN_CACHE").filter(|v| !v.is_empty()) {
        Some(root) => PathBuf::from(root),
        None => {
            let plugins = PluginCache::default_dir();
            plugins.parent().map(Path::to_path_buf).unwrap_or(plugins)
        }
    }
}

/// The plugin cache: `$RATTN_CACHE/plugins` if `RATTN_CACHE` is set, else the default
/// (`$XDG_CACHE_HOME/rattention/plugins` or `~/.cache/rattention/plugins`); downloads with
/// `$RATTN_PIP` first when set.
pub fn plugin_cache() -> PluginCache {
    let mut cache = match std::env::var_os("RATTN_CACHE").filter(|v| !v.is_empty()) {
        Some(_) => PluginCache::new(cache_root().join("plugins")),
        None => PluginCache::default(),
    };
    if let Some(pip) = std::env::var_os("RATTN_PIP").filter(|v| !v.is_empty()) {
        cache = cache.with_pip(pip);
    }
    cache
}

/// Adds the `rattn` command that fixes a missing plugin or missing CUDA tools.
pub fn with_install_hint(e: pjrt::Error) -> anyhow::Error {
    match &e {
        pjrt::Error::NotInstalled { kind, .. } => {
            anyhow!("{e}. Install it once with `rattn plugin install {kind}`")
        }
        pjrt::Error::CudaToolsNotFound { .. } => {
            anyhow!("{e}. `rattn plugin install cuda` installs them with the CUDA plugin")
        }
        _ => anyhow!(e),
    }
}

/// Resolve `--plugin` (a kind name or a path; default cpu) to a plugin library: a path as given;
/// a kind from `RATTN_PJRT_PLUGIN` if set, else from the cache (installing the CPU plugin on
/// first use).
pub fn locate_plugin(arg: Option<&str>) -> Result<PathBuf> {
    let arg = arg.unwrap_or("cpu");
    let cache = plugin_cache();
    let Some(kind) = PluginKind::from_name(arg) else {
        let path = Path::new(arg);
        if !path.is_file() {
            bail!(
                "--plugin {arg}: not a plugin kind (cpu, cuda or tpu) and not an existing file \
                 (a path to a PJRT plugin library)"
            );
        }
        return Ok(cache.locate(Some(path), PluginKind::Cpu)?);
    };
    if let Some(p) = std::env::var_os("RATTN_PJRT_PLUGIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "RATTN_PJRT_PLUGIN={} does not name an existing file",
                p.display()
            );
        }
        return Ok(p);
    }
    cache.locate(None, kind).map_err(|e| match e {
        pjrt::Error::NotInstalled { .. } => anyhow!(
            "{}, or point RATTN_PJRT_PLUGIN at a plugin library",
            with_install_hint(e)
        ),
        e => with_install_hint(e),
    })
}

/// Resolve `--plugin` (a kind name or a path; default cpu) to a loaded plugin.
pub fn load_plugin(arg: Option<&str>) -> Result<Plugin> {
    let path = locate_plugin(arg)?;
    Plugin::load(&path).with_context(|| format!("loading PJRT plugin {}", path.display()))
}

/// A client on `--plugin`, with our RLA kernels registered where the platform is the host.
///
/// In a multi-process run ([`crate::distributed::global`]) the client is created with the
/// coordinator's key-value store behind the plugin's callbacks and `node_id` / `num_nodes`
/// options, as `jax.distributed` does; the CPU plugin cannot join processes and is refused.
pub fn open_client(arg: Option<&str>) -> Result<Client> {
    let plugin = load_plugin(arg)?;
    let client = match crate::distributed::global() {
        Some(d) => {
            if matches!(arg, None | Some("cpu")) {
                bail!(
                    "the CPU plugin cannot run multi-process programs ({} processes were asked \
                     for); use --plugin tpu or --plugin cuda on every host, or one process with \
                     --devices N",
                    d.num_processes
                );
            }
            let options = [
                ("node_id", pjrt::NamedValue::I64(d.process_id as i64)),
                ("num_nodes", pjrt::NamedValue::I64(d.num_processes as i64)),
            ];
            Client::new_with_kv(&plugin, &options, d.plugin_store()).with_context(|| {
                format!(
                    "creating the {} client of process {} of {}",
                    plugin.path().display(),
                    d.process_id,
                    d.num_processes
                )
            })?
        }
        None => Client::new(&plugin, &[]).map_err(|e| anyhow!("{e}{}", no_device_hint(arg)))?,
    };
    if client.platform_name()? == "cpu" {
        pallas_port::register_cpu_kernels(&client).context("registering the RLA CPU kernels")?;
    }
    Ok(client)
}

/// What to add to a failed client creation on `--plugin tpu` or `cuda`: the device must be on
/// this machine, and the command that compiles for one without it.
pub fn no_device_hint(arg: Option<&str>) -> &'static str {
    match arg {
        Some("tpu") => {
            " (a TPU client needs a TPU on this machine; `rattn compile --target tpu:v5p:2x2x1` \
             compiles for one without it)"
        }
        Some("cuda") => {
            " (a CUDA client needs an NVIDIA GPU and its driver on this machine; `rattn compile \
             --target gpu:h100` compiles for one without it)"
        }
        _ => "",
    }
}

/// Compile a built computation for one device.
pub fn compile(client: &Client, comp: &Computation) -> Result<LoadedExecutable> {
    let bytes = comp.to_bytes();
    client
        .compile(Program::Hlo(&bytes), &CompileOptions::default())
        .with_context(|| format!("compiling {}", comp.name()))
}

/// Uploads a row-major f32 host tensor of `shape` to the client's first device.
pub fn upload_f32(client: &Client, data: &[f32], shape: &[usize]) -> Result<pjrt::Buffer> {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Ok(client.buffer_from_host(data, &dims, None)?)
}
