//! Where the CUDA plugin finds `ptxas` and libdevice when it compiles. Without ptxas some
//! modules fail cleanly and others silently compile to TileIR with no cubin, so the tools are
//! found before any GPU topology is made.
//!
//! Searched in order: the `--xla_gpu_cuda_data_dir` of `XLA_FLAGS` (then nothing else), the
//! places the plugin searches by itself (`<plugin dir>/../nvidia/cu13`,
//! `<plugin dir>/../../nvidia/cu13`, `/usr/local/cuda`, `/opt/cuda`), and the tools installed
//! in the default [`PluginCache`]. Tools found only in the cache are passed to every compile as
//! the `xla_gpu_cuda_data_dir` option; nothing changes the process environment.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::install::PluginCache;
use crate::plugin::Plugin;

/// Whether `root` holds both tools.
fn has_tools(root: &Path) -> bool {
    root.join("bin").join("ptxas").is_file()
        && root
            .join("nvvm")
            .join("libdevice")
            .join("libdevice.10.bc")
            .is_file()
}

/// Finds the tools for compiling with `plugin` (see the module docs): `None` when the plugin
/// finds them by itself (or through `XLA_FLAGS`), `Some(root)` when each compile must name the
/// CUDA root as `xla_gpu_cuda_data_dir`. Fails with [`Error::CudaToolsNotFound`] naming every
/// place searched.
pub(crate) fn find(plugin: &Plugin) -> Result<Option<PathBuf>> {
    let xla_flags = std::env::var("XLA_FLAGS").unwrap_or_default();
    find_in(
        plugin.path(),
        &xla_flags,
        PluginCache::default().installed_cuda_tools(),
    )
}

fn find_in(
    plugin_path: &Path,
    xla_flags: &str,
    installed: Option<PathBuf>,
) -> Result<Option<PathBuf>> {
    if let Some(dir) = xla_flags
        .split_whitespace()
        .find_map(|f| f.strip_prefix("--xla_gpu_cuda_data_dir="))
    {
        let root = PathBuf::from(dir);
        return if has_tools(&root) {
            Ok(None)
        } else {
            Err(Error::InvalidArgument(format!(
                "XLA_FLAGS sets --xla_gpu_cuda_data_dir={dir}, which lacks bin/ptxas or \
                 nvvm/libdevice/libdevice.10.bc"
            )))
        };
    }
    // The plugin searches these by itself.
    let mut searched: Vec<PathBuf> = Vec::new();
    if let Some(dir) = plugin_path.parent() {
        searched.push(dir.join("..").join("nvidia").join("cu13"));
        searched.push(dir.join("..").join("..").join("nvidia").join("cu13"));
    }
    searched.push(PathBuf::from("/usr/local/cuda"));
    searched.push(PathBuf::from("/opt/cuda"));
    if searched.iter().any(|r| has_tools(r)) {
        return Ok(None);
    }
    if let Some(root) = installed {
        // Installed, but not where this plugin looks: name it in every compile.
        return Ok(Some(root));
    }
    searched.push(PluginCache::default().cuda_tools_root());
    Err(Error::CudaToolsNotFound { searched })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(dir: &Path) -> PathBuf {
        let root = dir.join("nvidia").join("cu13");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("nvvm").join("libdevice")).unwrap();
        std::fs::write(root.join("bin").join("ptxas"), b"").unwrap();
        std::fs::write(
            root.join("nvvm").join("libdevice").join("libdevice.10.bc"),
            b"",
        )
        .unwrap();
        root
    }

    #[test]
    fn tools_are_found_beside_the_plugin_in_xla_flags_or_passed_as_an_option() {
        let tmp = std::env::temp_dir().join(format!("pjrt-cuda-tools-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let beside = tmp.join("cache");
        let root = fake_root(&beside);
        std::fs::create_dir_all(beside.join("jax-cuda13-pjrt")).unwrap();
        let plugin = beside.join("jax-cuda13-pjrt").join("xla_cuda_plugin.so");
        // Beside the plugin: the plugin finds them itself.
        assert!(has_tools(&root));
        assert_eq!(find_in(&plugin, "", None).unwrap(), None);
        // Elsewhere but installed: passed with each compile.
        let elsewhere = tmp.join("elsewhere").join("xla_cuda_plugin.so");
        if !has_tools(Path::new("/usr/local/cuda")) && !has_tools(Path::new("/opt/cuda")) {
            let t = find_in(&elsewhere, "", Some(root.clone())).unwrap();
            assert_eq!(t, Some(root.clone()));
            let e = find_in(&elsewhere, "", None).unwrap_err();
            assert!(matches!(e, Error::CudaToolsNotFound { .. }), "{e}");
            assert!(e.to_string().contains("ptxas"), "{e}");
        }
        // XLA_FLAGS wins, and a wrong directory there is an error.
        let flags = format!("--xla_foo=1 --xla_gpu_cuda_data_dir={}", root.display());
        assert_eq!(find_in(&elsewhere, &flags, None).unwrap(), None);
        let e = find_in(&plugin, "--xla_gpu_cuda_data_dir=/nonexistent", None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent"), "{e}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
