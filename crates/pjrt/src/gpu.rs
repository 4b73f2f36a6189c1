//! GPUs through the CUDA plugin: built-in target specs, topology shapes, the plugin's log
//! environment, and [`Topology::gpu`] (and its variants). A GPU topology needs no GPU: it is
//! made from a `GpuTargetConfigProto` spec ([`crate::gpu_spec`]), and compiling for it needs
//! `ptxas` and libdevice ([`crate::install::PluginCache::install_cuda_tools`]).
//!
//! # Environment
//! The CUDA plugin logs at INFO level unless `TF_CPP_MIN_LOG_LEVEL` says otherwise, and reads it
//! once. [`set_environment`] sets `TF_CPP_MIN_LOG_LEVEL=1` where unset; call it first thing in
//! `main`, before any thread starts.

use std::path::Path;

use crate::cuda_tools;
use crate::error::{Error, Result};
use crate::gpu_spec::validate_gpu_spec;
use crate::plugin::{set_unset_env, NamedValue, Plugin};
use crate::topology::{Topology, TopologyKind};

/// Built-in GPU target specs (`stream_executor.GpuTargetConfigProto` text), by name.
pub const GPU_SPECS: &[(&str, &str)] = &[("h100", H100_SXM), ("a100", A100_SXM_40)];

/// The NVIDIA H100 80GB HBM3 (SXM) target spec, CUDA 13 runtime.
pub const H100_SXM: &str = r#"gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 13 minor: 0 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 12 }
device_description_str: "NVIDIA H100 80GB HBM3"
"#;

/// The NVIDIA A100-SXM4-40GB target spec, CUDA 13 runtime.
pub const A100_SXM_40: &str = r#"gpu_device_info {
  cuda_compute_capability { major: 8 minor: 0 }
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 166912
  shared_memory_per_core: 167936
  threads_per_core_limit: 2048
  core_count: 108
  fpus_per_core: 64
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 1555200000000
  l2_cache_size: 41943040
  clock_rate_ghz: 1.41
  device_memory_size: 42298834944
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
runtime_version { major: 13 }
device_description_str: "NVIDIA A100-SXM4-40GB"
"#;

/// The variables the CUDA plugin should find when it is loaded: `TF_CPP_MIN_LOG_LEVEL=1`
/// (warnings and errors, no INFO lines).
pub fn environment() -> Vec<(&'static str, &'static str)> {
    vec![("TF_CPP_MIN_LOG_LEVEL", "1")]
}

/// Sets each variable of [`environment`] that is unset. Call it first thing in `main`, before any
/// thread starts (see [`crate::tpu::set_environment`] for why); fails with
/// [`Error::Environment`], changing nothing, when the process already runs other threads.
pub fn set_environment() -> Result<()> {
    set_unset_env(&environment(), "pjrt::gpu::set_environment")
}

/// The built-in spec text of [`GPU_SPECS`] named `gpu` (case-insensitive); an error listing the
/// built-in names otherwise. Needs no plugin.
pub fn builtin_spec(gpu: &str) -> Result<&'static str> {
    GPU_SPECS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(gpu))
        .map(|(_, s)| *s)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown GPU {gpu:?}; built-in specs: {}",
                GPU_SPECS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Parses a GPU topology shape `"<partitions>x<hosts per partition>x<devices per host>"`
/// (positive integers); needs no plugin, so callers can check a target before loading one.
pub fn parse_gpu_shape(shape: &str) -> Result<[u32; 3]> {
    let parts: Vec<&str> = shape.split('x').collect();
    let parsed: Vec<u32> = parts
        .iter()
        .filter_map(|p| p.parse::<u32>().ok().filter(|&v| v > 0))
        .collect();
    if parts.len() != 3 || parsed.len() != 3 {
        return Err(Error::InvalidArgument(format!(
            "GPU topology shape {shape:?}: expected \"<partitions>x<hosts per partition>x<devices per host>\" \
             with positive integers, e.g. \"1x1x1\" (one GPU) or \"1x1x8\" (one host with 8 GPUs)"
        )));
    }
    Ok([parsed[0], parsed[1], parsed[2]])
}

/// The CUDA major version the plugin reports (`cuda_version` attribute, e.g. 13000 → 13).
fn plugin_cuda_major(plugin: &Plugin) -> Option<i64> {
    plugin
        .attributes()
        .ok()?
        .into_iter()
        .find_map(|(n, v)| match (n.as_str(), v) {
            ("cuda_version", NamedValue::I64(v)) if v > 0 => Some(v / 1000),
            _ => None,
        })
}

impl Topology {
    /// A GPU topology from a text `GpuTargetConfigProto` file (XLA's `gpu_specs/*.txtpb`) and a
    /// shape `"<partitions>x<hosts per partition>x<devices per host>"` such as `"1x1x1"` or
    /// `"1x1x8"`. The spec is validated first ([`validate_gpu_spec`]); the plugin is the CUDA
    /// plugin ([`crate::install::PluginCache::load`]`(PluginKind::Cuda)`).
    pub fn gpu(plugin: &Plugin, spec_file: &Path, topology: &str) -> Result<Topology> {
        let text = std::fs::read_to_string(spec_file).map_err(|e| {
            Error::io(
                format!("reading GPU target spec {}", spec_file.display()),
                e,
            )
        })?;
        Self::gpu_from_spec(plugin, &text, topology).map_err(|e| match e {
            Error::InvalidArgument(m) => {
                Error::InvalidArgument(format!("{m} (file {})", spec_file.display()))
            }
            other => other,
        })
    }

    /// [`Topology::gpu`] for a built-in spec by name: one of [`GPU_SPECS`] (`"h100"`, `"a100"`).
    pub fn gpu_named(plugin: &Plugin, gpu: &str, topology: &str) -> Result<Topology> {
        Self::gpu_from_spec(plugin, builtin_spec(gpu)?, topology)
    }

    /// [`Topology::gpu`] from the spec text itself.
    pub fn gpu_from_spec(plugin: &Plugin, spec: &str, topology: &str) -> Result<Topology> {
        let summary = validate_gpu_spec(spec)?;
        parse_gpu_shape(topology)?;
        if let (Some(spec_major), Some(plugin_major)) =
            (summary.runtime_major, plugin_cuda_major(plugin))
        {
            if spec_major != plugin_major {
                return Err(Error::InvalidArgument(format!(
                    "GPU target spec {:?} is for CUDA runtime {spec_major} but the plugin {} is built for CUDA {plugin_major}",
                    summary.device,
                    plugin.path().display()
                )));
            }
        }
        let cuda_data_dir = cuda_tools::find(plugin)?;
        let values = [
            ("target_config", NamedValue::Str(spec.to_string())),
            ("topology", NamedValue::Str(topology.to_string())),
        ];
        let name = if summary.device.is_empty() {
            "gpu".to_string()
        } else {
            summary.device.clone()
        };
        Self::create(plugin, &name, &values, TopologyKind::Gpu, cuda_data_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_specs_are_complete() {
        let h = validate_gpu_spec(H100_SXM).unwrap();
        assert_eq!(h.compute_capability, (9, 0));
        assert_eq!(h.core_count, 132);
        assert_eq!(h.device_memory_size, 84_929_347_584);
        assert_eq!(h.runtime_major, Some(13));
        assert_eq!(h.device, "NVIDIA H100 80GB HBM3");
        let a = validate_gpu_spec(A100_SXM_40).unwrap();
        assert_eq!(a.compute_capability, (8, 0));
        assert_eq!(a.core_count, 108);
    }

    #[test]
    fn gpu_shapes_are_checked() {
        assert_eq!(parse_gpu_shape("1x1x8").unwrap(), [1, 1, 8]);
        for bad in ["", "8", "1x8", "1x1x0", "axbxc", "1x1x1x1"] {
            assert!(parse_gpu_shape(bad).is_err(), "{bad}");
        }
    }
}
