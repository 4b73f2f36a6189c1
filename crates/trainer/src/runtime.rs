//! Opening a PJRT client for `--plugin cpu|cuda|tpu|PATH` and compiling our graphs on it.

use anyhow::{Context, Result};
use hlo_builder::Computation;
use pjrt::install::PluginKind;
use pjrt::{Client, CompileOptions, LoadedExecutable, Plugin, Program};
use std::path::Path;

/// Resolve `--plugin` (a kind name or a path; default cpu) to a loaded plugin.
pub fn load_plugin(arg: Option<&str>) -> Result<Plugin> {
    let arg = arg.unwrap_or("cpu");
    let path = match PluginKind::from_name(arg) {
        Some(kind) => pjrt::install::locate(None, kind)?,
        None => pjrt::install::locate(Some(Path::new(arg)), PluginKind::Cpu)?,
    };
    Plugin::load(&path).with_context(|| format!("loading PJRT plugin {}", path.display()))
}

/// A client on `--plugin`, with our RLA kernels registered where the platform is the host.
pub fn open_client(arg: Option<&str>) -> Result<Client> {
    let plugin = load_plugin(arg)?;
    let client = Client::new(&plugin, &[])?;
    if client.platform_name()? == "cpu" {
        pallas_port::register_cpu_kernels(&client).context("registering the RLA CPU kernels")?;
    }
    Ok(client)
}

/// Compile a built computation for one device.
pub fn compile(client: &Client, comp: &Computation) -> Result<LoadedExecutable> {
    let bytes = comp.to_bytes();
    client
        .compile(Program::Hlo(&bytes), &CompileOptions::default())
        .with_context(|| format!("compiling {}", comp.name()))
}
