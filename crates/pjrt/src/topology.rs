//! Ahead-of-time compilation for hardware that is not attached: TPU topologies by name (libtpu)
//! and GPU topologies from a target spec (the CUDA plugin), compiled with the client-less
//! `PJRT_Compile`. Nothing is executed; the result is an unloaded [`Executable`] whose memory
//! statistics, cost analysis, optimized HLO and serialized form can be inspected.
//!
//! ```no_run
//! use pjrt::topology::{tpu_plugin, Topology};
//! use pjrt::{CompileOptions, Program};
//! let topo = Topology::tpu(&tpu_plugin()?, "v5e:2x2")?;
//! assert_eq!(topo.devices().len(), 4);
//! let exe = topo.compile(Program::Mlir("module { ... }"), &CompileOptions::default())?;
//! let stats = exe.memory_stats()?;
//! exe.check_fits_in_device_memory()?;
//! println!("{} flops", exe.cost_analysis()?.flops().unwrap_or(0.0));
//! # Ok::<(), pjrt::Error>(())
//! ```
//!
//! # What is refused before calling the plugin
//! Some inputs make the plugins abort the whole process (a CHECK failure or SIGFPE) instead of
//! returning an error. They are refused here with an [`Error`] naming the problem:
//! * more replicas × partitions than the topology has devices (libtpu CHECK-fails; the CUDA plugin
//!   silently compiles against a single-device topology);
//! * the Shardy partitioner on GSPMD shardings ([`CompileOptions::validate_for_program`]);
//! * an incomplete GPU target spec (the CUDA plugin divides by zero at compile time);
//! * unknown TPU generations and the empty name (which libtpu silently turns into TPU v2).
//!
//! Known aborts are all covered by these checks; an unknown one would still end the process, as
//! for any in-process compiler. Callers that must survive that (CI drivers compiling untrusted
//! graphs) should run the compile in a child process; this module has no child mode yet.
//!
//! # Environment
//! libtpu reads its environment at initialisation. [`tpu_plugin`] sets, when unset,
//! `TPU_SKIP_MDS_QUERY=1` (otherwise initialisation spends minutes querying a cloud metadata
//! server), `ALLOW_MULTIPLE_LIBTPU_LOAD=1` (so parallel test processes do not collide on
//! `/tmp/libtpu_lockfile`) and `TPU_STDERR_LOG_LEVEL=3`/`TPU_MIN_LOG_LEVEL=3` (quiet logs, no log
//! files under `/tmp/tpu_logs`), plus `TPU_ACCELERATOR_TYPE=v5litepod-4` and
//! `TPU_WORKER_HOSTNAMES=localhost` (which only silence two start-up warnings), then loads the
//! plugin. On a machine with TPU chips only the multi-process and log settings are made
//! ([`Plugin::load`] itself still sets `TPU_SKIP_MDS_QUERY=1` for any libtpu when unset).
//! [`gpu_plugin`] sets `TF_CPP_MIN_LOG_LEVEL=1` when unset. These are process-wide `setenv` calls
//! made before the plugin is loaded; the GPU path may also append `--xla_gpu_cuda_data_dir` to
//! `XLA_FLAGS` when the CUDA plugin is not beside the installed `ptxas` (see
//! [`install::install_cuda_tools`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorCode, Result};
use crate::executable::{copy_bytes, run_deleter, CompiledMemoryStats, ExecHandle};
use crate::install::{self, PluginKind};
use crate::options::{CompileOptions, Program};
use crate::plugin::{copy_string, NamedValue, Plugin, RawNamedValues};
use crate::sys::{self, slot, Ptr};

/// TPU generations that libtpu 0.0.52 accepts in a topology name (`<generation>:<dims>`).
pub const TPU_GENERATIONS: &[&str] = &["v2", "v3", "v4", "v5e", "v5p", "v5", "v6e", "tpu7x"];

/// Example TPU topology names, shown in errors.
pub const TPU_EXAMPLES: &[&str] = &[
    "v5e:2x2",
    "v5e:2x4",
    "v5p:2x2x1",
    "v6e:1x1",
    "v6e:2x2",
    "v4:2x2x1",
    "tpu7x:2x2x1",
];

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

/// Fields of `gpu_device_info` that must be present and positive: the CUDA plugin divides by
/// some of them, and a spec without them kills the process (SIGFPE) at compile time.
const GPU_REQUIRED_FIELDS: &[&str] = &[
    "threads_per_block_limit",
    "threads_per_warp",
    "shared_memory_per_block",
    "shared_memory_per_block_optin",
    "shared_memory_per_core",
    "threads_per_core_limit",
    "core_count",
    "fpus_per_core",
    "block_dim_limit_x",
    "block_dim_limit_y",
    "block_dim_limit_z",
    "memory_bandwidth",
    "l2_cache_size",
    "clock_rate_ghz",
    "device_memory_size",
    "registers_per_core_limit",
    "registers_per_block_limit",
];

fn set_env_if_unset(key: &str, value: &str) {
    if std::env::var_os(key).is_none() {
        std::env::set_var(key, value);
    }
}

/// Whether this machine has TPU chips (a PCI device of Google's vendor id 0x1ae0).
pub fn tpu_chips_present() -> bool {
    let Ok(entries) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        std::fs::read_to_string(e.path().join("vendor")).is_ok_and(|v| v.trim() == "0x1ae0")
    })
}

/// Sets the environment libtpu needs on a machine without TPUs (see the module docs); variables
/// already set are left alone. On a machine with TPU chips ([`tpu_chips_present`]) only the
/// multi-process and log settings are made, so libtpu initialises the real chips as usual.
/// Called by [`tpu_plugin`]; call it yourself before [`Plugin::load`] on a libtpu found elsewhere.
pub fn set_tpu_environment() {
    set_env_if_unset("ALLOW_MULTIPLE_LIBTPU_LOAD", "1");
    set_env_if_unset("TPU_STDERR_LOG_LEVEL", "3");
    set_env_if_unset("TPU_MIN_LOG_LEVEL", "3");
    if !tpu_chips_present() {
        set_env_if_unset("TPU_SKIP_MDS_QUERY", "1");
        // Without these two, libtpu prints start-up warnings that no log level silences. They do
        // not restrict the topologies one can compile for (measured: v4, v5p, v6e, tpu7x).
        set_env_if_unset("TPU_ACCELERATOR_TYPE", "v5litepod-4");
        set_env_if_unset("TPU_WORKER_HOSTNAMES", "localhost");
    }
}

/// The installed libtpu (see [`install::install`]), loaded once per process after
/// [`set_tpu_environment`]. Fails with [`Error::Install`] if it is not installed (it is large,
/// so it is never downloaded implicitly).
pub fn tpu_plugin() -> Result<Plugin> {
    let path = installed_or_error(PluginKind::Tpu)?;
    set_tpu_environment();
    Plugin::load(path)
}

/// The installed CUDA plugin, loaded once per process (`TF_CPP_MIN_LOG_LEVEL=1` when unset).
/// Compiling also needs `ptxas` and libdevice: [`install::install_cuda_tools`].
pub fn gpu_plugin() -> Result<Plugin> {
    let path = installed_or_error(PluginKind::Cuda)?;
    set_env_if_unset("TF_CPP_MIN_LOG_LEVEL", "1");
    Plugin::load(path)
}

fn installed_or_error(kind: PluginKind) -> Result<PathBuf> {
    install::installed(kind).ok_or_else(|| {
        Error::Install(format!(
            "the {kind} plugin ({}=={}) is not installed in {}; install it once with \
             pjrt::install::install(PluginKind::{kind:?})",
            kind.pin().package,
            kind.pin().version,
            install::cache_dir().display()
        ))
    })
}

/// Options of a TPU topology (`PJRT_TopologyDescription_Create` create options). All optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TpuTopologyOptions {
    /// `"megacore"` or `"default"`: on v4 the default is one core per device, on v5p megacore
    /// (two cores per device).
    pub chip_config_name: Option<String>,
    /// Chips per host, e.g. `[2, 2, 1]` (needed for shapes that do not divide the default).
    pub chips_per_host_bounds: Option<[i64; 3]>,
    /// Number of slices (multi-slice); devices get ids from 100000 on.
    pub num_slices: Option<i64>,
}

/// Which kind of accelerator a topology describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyKind {
    /// A TPU topology from libtpu.
    Tpu,
    /// A GPU topology from the CUDA plugin and a target spec.
    Gpu,
}

/// One device of a topology, read once when the topology is created.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDescription {
    /// Global device id.
    pub id: i32,
    /// Index of the process (host) that owns the device.
    pub process_index: i32,
    /// Device kind, e.g. `"TPU v5 lite"`, `"NVIDIA H100 80GB HBM3"`.
    pub kind: String,
    /// The plugin's debug string, e.g. `"TPU_0(process=0,(0,0,0,0))"`.
    pub debug_string: String,
    /// Platform-specific attributes: TPU `coords`, `core_on_chip`, `num_cores`,
    /// `device_memory_bytes_limit`; GPU `compute_capability`, `core_count`,
    /// `device_memory_bytes_limit`, ...
    pub attributes: Vec<(String, NamedValue)>,
}

impl DeviceDescription {
    /// The attribute `name`, if present.
    pub fn attribute(&self, name: &str) -> Option<&NamedValue> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    fn int_attribute(&self, name: &str) -> Option<i64> {
        match self.attribute(name)? {
            NamedValue::I64(v) => Some(*v),
            _ => None,
        }
    }

    /// Device memory (HBM) in bytes (`device_memory_bytes_limit`).
    pub fn memory_bytes_limit(&self) -> Option<i64> {
        self.int_attribute("device_memory_bytes_limit")
    }

    /// TensorCores per device on TPU (`num_cores`: 2 for megacore), SMs on GPU (`core_count`).
    pub fn num_cores(&self) -> Option<i64> {
        self.int_attribute("num_cores")
            .or_else(|| self.int_attribute("core_count"))
    }
}

/// A device topology (`PJRT_TopologyDescription`) to compile for, without the devices.
///
/// Cheap to clone; `Send + Sync` (concurrent compiles against one topology work). Destroyed
/// when the last clone and every [`Executable`] compiled from it are dropped.
#[derive(Clone)]
pub struct Topology {
    inner: Arc<TopologyInner>,
}

struct TopologyInner {
    plugin: Plugin,
    raw: Ptr,
    kind: TopologyKind,
    name: String,
    devices: Vec<DeviceDescription>,
}

// SAFETY: a PJRT_TopologyDescription is immutable after creation and the PJRT C API allows
// concurrent use from several threads (measured: concurrent PJRT_Compile on libtpu and CUDA).
unsafe impl Send for TopologyInner {}
// SAFETY: see `Send`.
unsafe impl Sync for TopologyInner {}

impl Drop for TopologyInner {
    fn drop(&mut self) {
        let mut a = sys::HandleArgs::new();
        a.handle = self.raw;
        // SAFETY: the topology is owned by us and destroyed exactly once; every executable holds
        // an `Arc` of this inner value, so none outlives it.
        let _ = unsafe {
            self.plugin.call(
                slot::TOPOLOGY_DESTROY,
                "PJRT_TopologyDescription_Destroy",
                &mut a,
            )
        };
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("kind", &self.inner.kind)
            .field("name", &self.inner.name)
            .field("devices", &self.inner.devices.len())
            .finish()
    }
}

/// Checks `<generation>[:=_]<A>x<B>[x<C>][_twisted|_untwisted]` against [`TPU_GENERATIONS`].
fn check_tpu_name(name: &str) -> Result<()> {
    let known = || {
        format!(
            "known generations: {}; examples: {}. GCP accelerator types (v5litepod-4, v6e-8, v7x) \
             are not topology names",
            TPU_GENERATIONS.join(", "),
            TPU_EXAMPLES.join(", ")
        )
    };
    let bad =
        |why: String| Error::InvalidArgument(format!("TPU topology {name:?}: {why}; {}", known()));
    let Some(sep) = name.find([':', '=', '_']) else {
        return Err(bad(
            "expected <generation>:<dims> such as \"v5e:2x2\" (an empty name would silently mean TPU v2)"
                .into(),
        ));
    };
    let generation = &name[..sep];
    if !TPU_GENERATIONS
        .iter()
        .any(|g| g.eq_ignore_ascii_case(generation))
    {
        return Err(bad(format!("unknown TPU generation {generation:?}")));
    }
    let rest = &name[sep + 1..];
    let dims = rest
        .strip_suffix("_untwisted")
        .or_else(|| rest.strip_suffix("_twisted"))
        .unwrap_or(rest);
    let parts: Vec<&str> = dims.split('x').collect();
    let dims_ok = (2..=3).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|v| v > 0)
        });
    if !dims_ok {
        return Err(bad(format!(
            "the chip grid {dims:?} must be 2 or 3 positive integers joined by 'x' (\"2x2\", \"2x2x1\")"
        )));
    }
    Ok(())
}

/// Parses a GPU topology shape `"<partitions>x<hosts per partition>x<devices per host>"`.
fn parse_gpu_shape(shape: &str) -> Result<[u32; 3]> {
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

/// What [`validate_gpu_spec`] learned from a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSpecSummary {
    /// `device_description_str`, e.g. `"NVIDIA H100 80GB HBM3"` (empty if absent).
    pub device: String,
    /// `cuda_compute_capability` `(major, minor)`.
    pub compute_capability: (i64, i64),
    /// Streaming multiprocessors (`core_count`).
    pub core_count: i64,
    /// `device_memory_size` in bytes.
    pub device_memory_size: i64,
    /// `runtime_version.major` (the CUDA major version), if given.
    pub runtime_major: Option<i64>,
}

/// Checks that a text `GpuTargetConfigProto` is complete enough to compile against: it parses,
/// `platform_name` is `"CUDA"`, and `gpu_device_info` has every field the compiler divides by,
/// with positive values, plus `cuda_compute_capability.major`. An incomplete spec is accepted by
/// the plugin's topology call and then kills the process with SIGFPE during compilation.
pub fn validate_gpu_spec(text: &str) -> Result<GpuSpecSummary> {
    use textproto::Value;
    let bad = |why: String| Error::InvalidArgument(format!("GPU target spec: {why}"));
    let fields = textproto::parse(text).map_err(|e| bad(format!("not valid text format: {e}")))?;
    let find = |fields: &'_ [(String, Value)], name: &str| -> Option<Value> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    match find(&fields, "platform_name") {
        Some(Value::Scalar(s)) if s == "CUDA" => {}
        Some(other) => {
            return Err(bad(format!(
                "platform_name is {other:?}; the CUDA plugin needs \"CUDA\""
            )))
        }
        None => return Err(bad("platform_name: \"CUDA\" is missing".into())),
    }
    let Some(Value::Message(info)) = find(&fields, "gpu_device_info") else {
        return Err(bad(
            "gpu_device_info { ... } is missing (compiling without it kills the process with SIGFPE)".into(),
        ));
    };
    let number = |fields: &[(String, Value)], name: &str| -> Option<f64> {
        match find(fields, name)? {
            Value::Scalar(s) => s.parse::<f64>().ok(),
            Value::Message(_) => None,
        }
    };
    let mut missing: Vec<String> = GPU_REQUIRED_FIELDS
        .iter()
        .filter(|f| !number(&info, f).is_some_and(|v| v > 0.0))
        .map(|f| f.to_string())
        .collect();
    let cc = match find(&info, "cuda_compute_capability") {
        Some(Value::Message(cc)) => {
            let major = number(&cc, "major").unwrap_or(0.0) as i64;
            let minor = number(&cc, "minor").unwrap_or(0.0) as i64;
            (major, minor)
        }
        _ => (0, 0),
    };
    if cc.0 <= 0 {
        missing.push("cuda_compute_capability.major".into());
    }
    if !missing.is_empty() {
        return Err(bad(format!(
            "gpu_device_info lacks or has non-positive {} (the CUDA plugin would crash on it); start from a \
             complete spec such as pjrt::topology::H100_SXM",
            missing.join(", ")
        )));
    }
    let runtime_major = match find(&fields, "runtime_version") {
        Some(Value::Message(rv)) => number(&rv, "major").map(|v| v as i64),
        _ => None,
    };
    let device = match find(&fields, "device_description_str") {
        Some(Value::Scalar(s)) => s,
        _ => String::new(),
    };
    Ok(GpuSpecSummary {
        device,
        compute_capability: cc,
        core_count: number(&info, "core_count").unwrap_or(0.0) as i64,
        device_memory_size: number(&info, "device_memory_size").unwrap_or(0.0) as i64,
        runtime_major,
    })
}

/// Where the CUDA plugin will find `ptxas`, or an error telling how to provide it. Without ptxas
/// some modules fail cleanly and others silently compile to TileIR with no cubin, so this is
/// checked before any GPU compile.
fn ensure_cuda_tools(plugin: &Plugin) -> Result<PathBuf> {
    let has_tools = |root: &Path| {
        root.join("bin").join("ptxas").is_file()
            && root
                .join("nvvm")
                .join("libdevice")
                .join("libdevice.10.bc")
                .is_file()
    };
    if let Some(flags) = std::env::var_os("XLA_FLAGS") {
        let flags = flags.to_string_lossy().into_owned();
        if let Some(dir) = flags
            .split_whitespace()
            .find_map(|f| f.strip_prefix("--xla_gpu_cuda_data_dir="))
        {
            let root = PathBuf::from(dir);
            return if has_tools(&root) {
                Ok(root)
            } else {
                Err(Error::InvalidArgument(format!(
                    "XLA_FLAGS sets --xla_gpu_cuda_data_dir={dir}, which lacks bin/ptxas or \
                     nvvm/libdevice/libdevice.10.bc"
                )))
            };
        }
    }
    // The plugin searches these by itself.
    let plugin_dir = plugin.path().parent().map(Path::to_path_buf);
    let mut searched: Vec<PathBuf> = Vec::new();
    if let Some(dir) = &plugin_dir {
        searched.push(dir.join("..").join("nvidia").join("cu13"));
        searched.push(dir.join("..").join("..").join("nvidia").join("cu13"));
    }
    searched.push(PathBuf::from("/usr/local/cuda"));
    searched.push(PathBuf::from("/opt/cuda"));
    if let Some(root) = searched.iter().find(|r| has_tools(r)) {
        return Ok(root.clone());
    }
    if let Some(root) = install::installed_cuda_tools() {
        // Installed, but not beside this plugin: point XLA at it.
        let mut flags = std::env::var("XLA_FLAGS").unwrap_or_default();
        if !flags.is_empty() {
            flags.push(' ');
        }
        flags.push_str(&format!("--xla_gpu_cuda_data_dir={}", root.display()));
        std::env::set_var("XLA_FLAGS", flags);
        return Ok(root);
    }
    Err(Error::Install(format!(
        "the CUDA plugin needs ptxas and libdevice to compile; none found in {}. Install them once with \
         pjrt::install::install_cuda_tools() (PyPI nvidia-cuda-nvcc and nvidia-nvvm 13.0.88), or set \
         XLA_FLAGS=--xla_gpu_cuda_data_dir=<dir with bin/ptxas and nvvm/libdevice/libdevice.10.bc>",
        searched
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

impl Topology {
    /// A TPU topology by name, e.g. `"v5e:2x2"` (4 chips), `"v5p:2x2x1"`, `"v6e:1x1"`. See
    /// [`TPU_GENERATIONS`]; the plugin should come from [`tpu_plugin`].
    pub fn tpu(plugin: &Plugin, name: &str) -> Result<Topology> {
        Self::tpu_with(plugin, name, &TpuTopologyOptions::default())
    }

    /// [`Topology::tpu`] with create options (megacore, chips per host, slices).
    pub fn tpu_with(plugin: &Plugin, name: &str, options: &TpuTopologyOptions) -> Result<Topology> {
        check_tpu_name(name)?;
        let mut values: Vec<(&str, NamedValue)> = Vec::new();
        if let Some(c) = &options.chip_config_name {
            if c != "megacore" && c != "default" {
                return Err(Error::InvalidArgument(format!(
                    "TPU chip_config_name {c:?}: expected \"megacore\" or \"default\""
                )));
            }
            values.push(("chip_config_name", NamedValue::Str(c.clone())));
        }
        if let Some(b) = options.chips_per_host_bounds {
            if b.iter().any(|&v| v <= 0) {
                return Err(Error::InvalidArgument(format!(
                    "TPU chips_per_host_bounds {b:?} must be positive"
                )));
            }
            values.push(("chips_per_host_bounds", NamedValue::I64List(b.to_vec())));
        }
        if let Some(n) = options.num_slices {
            if n <= 0 {
                return Err(Error::InvalidArgument(format!(
                    "TPU num_slices {n} must be positive"
                )));
            }
            values.push(("num_slices", NamedValue::I64(n)));
        }
        let topo = Self::create(plugin, name, &values, TopologyKind::Tpu).map_err(|e| match e {
            Error::Pjrt {
                code,
                function,
                message,
            } if code == ErrorCode::InvalidArgument => Error::Pjrt {
                code,
                function,
                message: format!(
                    "{message} (topology {name:?}; known generations: {}; examples: {})",
                    TPU_GENERATIONS.join(", "),
                    TPU_EXAMPLES.join(", ")
                ),
            },
            other => other,
        })?;
        let platform = topo.platform_name()?;
        if platform != "tpu" {
            return Err(Error::InvalidArgument(format!(
                "plugin {} made a {platform:?} topology for {name:?}; Topology::tpu needs libtpu (pjrt::topology::tpu_plugin())",
                plugin.path().display()
            )));
        }
        Ok(topo)
    }

    /// A GPU topology from a text `GpuTargetConfigProto` file (XLA's `gpu_specs/*.txtpb`) and a
    /// shape `"<partitions>x<hosts per partition>x<devices per host>"` such as `"1x1x1"` or
    /// `"1x1x8"`. The spec is validated first ([`validate_gpu_spec`]).
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
        let spec = GPU_SPECS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(gpu))
            .map(|(_, s)| *s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown GPU {gpu:?}; built-in specs: {} (or pass a GpuTargetConfigProto file to Topology::gpu)",
                    GPU_SPECS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ))
            })?;
        Self::gpu_from_spec(plugin, spec, topology)
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
        ensure_cuda_tools(plugin)?;
        let values = [
            ("target_config", NamedValue::Str(spec.to_string())),
            ("topology", NamedValue::Str(topology.to_string())),
        ];
        let name = if summary.device.is_empty() {
            "gpu".to_string()
        } else {
            summary.device.clone()
        };
        let topo = Self::create(plugin, &name, &values, TopologyKind::Gpu)?;
        let platform = topo.platform_name()?;
        if platform != "cuda" {
            return Err(Error::InvalidArgument(format!(
                "plugin {} made a {platform:?} topology; Topology::gpu needs the CUDA plugin (pjrt::topology::gpu_plugin())",
                plugin.path().display()
            )));
        }
        Ok(topo)
    }

    fn create(
        plugin: &Plugin,
        name: &str,
        values: &[(&str, NamedValue)],
        kind: TopologyKind,
    ) -> Result<Topology> {
        let raw_values = RawNamedValues::new(values);
        let mut a = sys::TopologyCreateArgs::new();
        a.topology_name = name.as_ptr();
        a.topology_name_size = name.len();
        a.create_options = raw_values.raw.as_ptr();
        a.num_options = raw_values.raw.len();
        // SAFETY: slot 82 takes PJRT_TopologyDescription_Create_Args; the name and options
        // outlive the call.
        unsafe {
            plugin.call(
                slot::TOPOLOGY_CREATE,
                "PJRT_TopologyDescription_Create",
                &mut a,
            )
        }?;
        if a.topology.is_null() {
            return Err(Error::Pjrt {
                code: ErrorCode::Internal,
                function: "PJRT_TopologyDescription_Create",
                message: format!("the plugin returned no topology for {name:?}"),
            });
        }
        let mut inner = TopologyInner {
            plugin: plugin.clone(),
            raw: a.topology,
            kind,
            name: name.to_string(),
            devices: Vec::new(),
        };
        // From here on, `inner`'s Drop destroys the topology on error.
        inner.devices = read_devices(&inner)?;
        if inner.devices.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "topology {name:?} has no devices"
            )));
        }
        Ok(Topology {
            inner: Arc::new(inner),
        })
    }

    /// The plugin the topology came from.
    pub fn plugin(&self) -> &Plugin {
        &self.inner.plugin
    }

    /// TPU or GPU.
    pub fn kind(&self) -> TopologyKind {
        self.inner.kind
    }

    /// The name it was created with (TPU: the topology name; GPU: the spec's device string).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn string_query(&self, s: usize, function: &'static str) -> Result<String> {
        let mut a = sys::HandleStringArgs::new();
        a.handle = self.inner.raw;
        // SAFETY: the slot takes (topology, string out, size out) in this layout; the string is
        // owned by the topology, alive here.
        unsafe { self.inner.plugin.call(s, function, &mut a) }?;
        // SAFETY: valid for value_size bytes while the topology lives.
        Ok(unsafe { copy_string(a.value, a.value_size) })
    }

    /// The platform name: `"tpu"` or `"cuda"`.
    pub fn platform_name(&self) -> Result<String> {
        self.string_query(
            slot::TOPOLOGY_PLATFORM_NAME,
            "PJRT_TopologyDescription_PlatformName",
        )
    }

    /// The platform version (libtpu build; GPU: the spec's device string).
    pub fn platform_version(&self) -> Result<String> {
        self.string_query(
            slot::TOPOLOGY_PLATFORM_VERSION,
            "PJRT_TopologyDescription_PlatformVersion",
        )
    }

    /// The devices, in the plugin's order.
    pub fn devices(&self) -> &[DeviceDescription] {
        &self.inner.devices
    }

    /// The smallest `device_memory_bytes_limit` over the devices, if the plugin reports it.
    pub fn device_memory_bytes(&self) -> Option<i64> {
        self.inner
            .devices
            .iter()
            .filter_map(DeviceDescription::memory_bytes_limit)
            .min()
    }

    /// Topology attributes (TPU: `wrap`, `twist`, `device_memory_bytes_limit`; GPU:
    /// `target_config`, `host_target_machine_options`).
    pub fn attributes(&self) -> Result<Vec<(String, NamedValue)>> {
        let mut a = sys::TopologyAttributesArgs::new();
        a.topology = self.inner.raw;
        // SAFETY: slot 88 takes PJRT_TopologyDescription_Attributes_Args.
        unsafe {
            self.inner.plugin.call(
                slot::TOPOLOGY_ATTRIBUTES,
                "PJRT_TopologyDescription_Attributes",
                &mut a,
            )
        }?;
        // SAFETY: the plugin returned `num_attributes` named values owned by the topology.
        Ok(unsafe { read_named_values(a.attributes, a.num_attributes) })
    }

    /// The plugin's serialized topology (usable as a cache key).
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let mut a = sys::TopologySerializeArgs::new();
        a.topology = self.inner.raw;
        // SAFETY: slot 87 takes PJRT_TopologyDescription_Serialize_Args.
        unsafe {
            self.inner.plugin.call(
                slot::TOPOLOGY_SERIALIZE,
                "PJRT_TopologyDescription_Serialize",
                &mut a,
            )
        }?;
        // SAFETY: the bytes live until the deleter runs.
        let bytes = unsafe { copy_bytes(a.serialized_bytes, a.serialized_bytes_size) };
        // SAFETY: the deleter (if any) frees `serialized_topology` exactly once.
        unsafe { run_deleter(a.serialized_topology_deleter, a.serialized_topology) };
        Ok(bytes)
    }

    /// Compiles `program` for this topology without a client (`PJRT_Compile`), after refusing
    /// the options that would abort the plugin (see the module docs).
    pub fn compile(&self, program: Program<'_>, options: &CompileOptions) -> Result<Executable> {
        let n = self.inner.devices.len();
        options.validate(n).map_err(|e| match e {
            Error::InvalidOptions(m) => Error::InvalidOptions(format!(
                "{m} (topology {:?} has {n} devices: {})",
                self.inner.name,
                self.inner
                    .devices
                    .first()
                    .map(|d| d.kind.as_str())
                    .unwrap_or("")
            )),
            other => other,
        })?;
        options.validate_for_program(&program)?;
        if let Some(da) = &options.device_assignment {
            for id in da.iter().flatten() {
                if !self.inner.devices.iter().any(|d| i64::from(d.id) == *id) {
                    return Err(Error::InvalidOptions(format!(
                        "device_assignment names device id {id}, which topology {:?} does not have (ids: {:?})",
                        self.inner.name,
                        self.inner.devices.iter().map(|d| d.id).collect::<Vec<_>>()
                    )));
                }
            }
        }
        let (code, format): (&[u8], &str) = match program {
            Program::Hlo(bytes) => (bytes, "hlo"),
            Program::Mlir(text) => (text.as_bytes(), "mlir"),
        };
        if code.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot compile an empty program".into(),
            ));
        }
        let encoded = options.encode();
        let mut p = sys::Program::new();
        p.code = code.as_ptr() as *mut u8;
        p.code_size = code.len();
        p.format = format.as_ptr();
        p.format_size = format.len();
        let mut a = sys::CompileArgs::new();
        a.topology = self.inner.raw;
        a.program = &p;
        a.compile_options = encoded.as_ptr();
        a.compile_options_size = encoded.len();
        // SAFETY: slot 89 takes PJRT_Compile_Args; program, options and topology outlive the
        // call, the client is null (allowed: client-less compile) and the plugin does not write
        // to `code`.
        let result = unsafe {
            self.inner
                .plugin
                .call(slot::COMPILE, "PJRT_Compile", &mut a)
        };
        if let Err(e) = result {
            return Err(self.explain_compile_error(e));
        }
        if a.executable.is_null() {
            return Err(Error::Pjrt {
                code: ErrorCode::Internal,
                function: "PJRT_Compile",
                message: "the plugin returned no executable".into(),
            });
        }
        let mut exe = Executable {
            inner: Arc::new(UnloadedInner {
                raw: a.executable,
                topology: self.inner.clone(),
                num_outputs: 0,
            }),
        };
        let num_outputs =
            exe.word_query(slot::EXECUTABLE_NUM_OUTPUTS, "PJRT_Executable_NumOutputs")?;
        Arc::get_mut(&mut exe.inner)
            .expect("not shared yet")
            .num_outputs = num_outputs;
        Ok(exe)
    }

    /// Adds context to compile errors whose plugin message is terse.
    fn explain_compile_error(&self, e: Error) -> Error {
        let Error::Pjrt {
            code,
            function,
            message,
        } = e
        else {
            return e;
        };
        let platform = match self.inner.kind {
            TopologyKind::Tpu => "TPU",
            TopologyKind::Gpu => "GPU",
        };
        let target = custom_call_target(&message);
        let message = match target {
            Some(t) => format!(
                "the program uses custom call {t:?}, which does not exist on {platform} (FFI handlers registered \
                 with the CPU plugin are CPU-only; keep such calls out of {platform} graphs). Plugin message: {message}"
            ),
            None if code == ErrorCode::ResourceExhausted => format!(
                "the program does not fit in the memory of a {} device ({} bytes). Plugin message: {message}",
                self.inner.devices.first().map(|d| d.kind.as_str()).unwrap_or(""),
                self.device_memory_bytes().unwrap_or(0)
            ),
            None => message,
        };
        Error::Pjrt {
            code,
            function,
            message,
        }
    }
}

/// The custom-call target named by a plugin's "unknown custom call" message, if it is one.
fn custom_call_target(message: &str) -> Option<String> {
    let after = |prefix: &str| -> Option<String> {
        let start = message.find(prefix)? + prefix.len();
        let rest = &message[start..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == '\'' || c == '"')
            .unwrap_or(rest.len());
        let t = rest[..end].trim_end_matches('.');
        (!t.is_empty()).then(|| t.to_string())
    };
    // libtpu: "Custom emitter for <target> not found"; CUDA: "No FFI handler registered for
    // <target> on a platform CUDA".
    after("Custom emitter for ").or_else(|| after("No FFI handler registered for "))
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

fn read_devices(inner: &TopologyInner) -> Result<Vec<DeviceDescription>> {
    let plugin = &inner.plugin;
    let mut a = sys::TopologyDeviceDescriptionsArgs::new();
    a.topology = inner.raw;
    // SAFETY: slot 86 takes PJRT_TopologyDescription_GetDeviceDescriptions_Args.
    unsafe {
        plugin.call(
            slot::TOPOLOGY_GET_DEVICE_DESCRIPTIONS,
            "PJRT_TopologyDescription_GetDeviceDescriptions",
            &mut a,
        )
    }?;
    let raws: Vec<Ptr> = if a.num_descriptions == 0 || a.descriptions.is_null() {
        Vec::new()
    } else {
        // SAFETY: an array of num_descriptions descriptions owned by the topology.
        unsafe { std::slice::from_raw_parts(a.descriptions, a.num_descriptions) }.to_vec()
    };
    raws.into_iter()
        .map(|desc| {
            let int = |s: usize, name: &'static str| -> Result<i32> {
                let mut a = sys::HandleIntArgs::new();
                a.handle = desc;
                // SAFETY: the slot takes (description, int out) in this layout.
                unsafe { plugin.call(s, name, &mut a) }?;
                Ok(a.value)
            };
            let string = |s: usize, name: &'static str| -> Result<String> {
                let mut a = sys::HandleStringArgs::new();
                a.handle = desc;
                // SAFETY: the slot takes (description, string out) in this layout.
                unsafe { plugin.call(s, name, &mut a) }?;
                // SAFETY: owned by the description, alive while the topology lives.
                Ok(unsafe { copy_string(a.value, a.value_size) })
            };
            let mut attrs = sys::DeviceDescriptionAttributesArgs::new();
            attrs.device_description = desc;
            // SAFETY: slot 25 takes PJRT_DeviceDescription_Attributes_Args.
            unsafe {
                plugin.call(
                    slot::DEVICE_DESCRIPTION_ATTRIBUTES,
                    "PJRT_DeviceDescription_Attributes",
                    &mut attrs,
                )
            }?;
            Ok(DeviceDescription {
                id: int(slot::DEVICE_DESCRIPTION_ID, "PJRT_DeviceDescription_Id")?,
                process_index: int(
                    slot::DEVICE_DESCRIPTION_PROCESS_INDEX,
                    "PJRT_DeviceDescription_ProcessIndex",
                )?,
                kind: string(slot::DEVICE_DESCRIPTION_KIND, "PJRT_DeviceDescription_Kind")?,
                debug_string: string(
                    slot::DEVICE_DESCRIPTION_DEBUG_STRING,
                    "PJRT_DeviceDescription_DebugString",
                )?,
                // SAFETY: num_attributes named values owned by the description.
                attributes: unsafe { read_named_values(attrs.attributes, attrs.num_attributes) },
            })
        })
        .collect()
}

/// Copies `n` PJRT named values.
///
/// # Safety
/// `ptr` must point to `n` valid `PJRT_NamedValue`s whose pointers are live (or `n == 0`).
unsafe fn read_named_values(ptr: *const sys::NamedValueRaw, n: usize) -> Vec<(String, NamedValue)> {
    use sys::named_value_type as t;
    if ptr.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: guaranteed by the caller.
    let values = unsafe { std::slice::from_raw_parts(ptr, n) };
    values
        .iter()
        .map(|nv| {
            // SAFETY: the name is (pointer, name_size), live per the caller.
            let name = unsafe { copy_string(nv.name, nv.name_size) };
            let value = match nv.value_type {
                // SAFETY: a string value is (pointer, value_size).
                t::STRING => NamedValue::Str(unsafe {
                    copy_string(nv.value as usize as *const u8, nv.value_size)
                }),
                t::INT64 => NamedValue::I64(nv.value as i64),
                t::INT64_LIST => {
                    let p = nv.value as usize as *const i64;
                    if p.is_null() || nv.value_size == 0 {
                        NamedValue::I64List(Vec::new())
                    } else {
                        // SAFETY: an int64 list is (pointer, value_size elements).
                        NamedValue::I64List(
                            unsafe { std::slice::from_raw_parts(p, nv.value_size) }.to_vec(),
                        )
                    }
                }
                t::FLOAT => NamedValue::F32(f32::from_bits(nv.value as u32)),
                t::BOOL => NamedValue::Bool(nv.value as u8 != 0),
                other => NamedValue::Str(format!("<unknown named value type {other}>")),
            };
            (name, value)
        })
        .collect()
}

/// The cost analysis of a compiled program (`PJRT_Executable_GetCostAnalysis`): named numbers
/// such as `flops`, `transcendentals`, `bytes accessed`, `optimal_seconds`. TPU only (the CUDA
/// plugin does not implement it).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CostAnalysis {
    /// Every property, in the plugin's order.
    pub properties: Vec<(String, f64)>,
}

impl CostAnalysis {
    /// The property `name`, if present.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
    /// Floating-point operations.
    pub fn flops(&self) -> Option<f64> {
        self.get("flops")
    }
    /// Transcendental operations (tanh, exp, ...).
    pub fn transcendentals(&self) -> Option<f64> {
        self.get("transcendentals")
    }
    /// Bytes read and written.
    pub fn bytes_accessed(&self) -> Option<f64> {
        self.get("bytes accessed")
    }
    /// The compiler's estimate of the run time in seconds on the target.
    pub fn optimal_seconds(&self) -> Option<f64> {
        self.get("optimal_seconds")
    }
}

/// An unloaded executable compiled for a [`Topology`] (`PJRT_Executable`). It cannot run here;
/// it can be inspected and serialized. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Executable {
    inner: Arc<UnloadedInner>,
}

struct UnloadedInner {
    raw: Ptr,
    topology: Arc<TopologyInner>,
    num_outputs: usize,
}

// SAFETY: a PJRT_Executable is immutable after compilation; the query functions are thread-safe.
unsafe impl Send for UnloadedInner {}
// SAFETY: see `Send`.
unsafe impl Sync for UnloadedInner {}

impl Drop for UnloadedInner {
    fn drop(&mut self) {
        let mut a = sys::HandleArgs::new();
        a.handle = self.raw;
        // SAFETY: PJRT_Compile's caller owns the executable; destroyed exactly once.
        let _ = unsafe {
            self.topology
                .plugin
                .call(slot::EXECUTABLE_DESTROY, "PJRT_Executable_Destroy", &mut a)
        };
    }
}

impl std::fmt::Debug for Executable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executable")
            .field("name", &self.name().unwrap_or_default())
            .field("topology", &self.inner.topology.name)
            .field("num_outputs", &self.inner.num_outputs)
            .finish()
    }
}

impl Executable {
    fn plugin(&self) -> &Plugin {
        &self.inner.topology.plugin
    }

    fn handle(&self) -> ExecHandle<'_> {
        ExecHandle {
            raw: self.inner.raw,
            plugin: self.plugin(),
        }
    }

    fn word_query(&self, s: usize, function: &'static str) -> Result<usize> {
        self.handle().word_query(s, function)
    }

    fn string_query(&self, s: usize, function: &'static str) -> Result<String> {
        self.handle().string_query(s, function)
    }

    /// The topology it was compiled for.
    pub fn topology(&self) -> Topology {
        Topology {
            inner: self.inner.topology.clone(),
        }
    }

    /// The module's name.
    pub fn name(&self) -> Result<String> {
        self.string_query(slot::EXECUTABLE_NAME, "PJRT_Executable_Name")
    }

    /// Outputs per device.
    pub fn num_outputs(&self) -> usize {
        self.inner.num_outputs
    }

    /// Replicas compiled for.
    pub fn num_replicas(&self) -> Result<usize> {
        self.word_query(slot::EXECUTABLE_NUM_REPLICAS, "PJRT_Executable_NumReplicas")
    }

    /// Partitions compiled for.
    pub fn num_partitions(&self) -> Result<usize> {
        self.word_query(
            slot::EXECUTABLE_NUM_PARTITIONS,
            "PJRT_Executable_NumPartitions",
        )
    }

    /// Per-device memory the compiled program needs. TPU fills every device field; the CUDA
    /// plugin reports `generated_code_size_in_bytes` and `total_size_in_bytes` as 0.
    pub fn memory_stats(&self) -> Result<CompiledMemoryStats> {
        self.handle().memory_stats()
    }

    /// Checks the peak memory per device against the topology's device memory and returns the
    /// headroom in bytes. Fails with [`ErrorCode::ResourceExhausted`] when it does not fit. This
    /// matters on GPU, where the compiler does not check memory itself.
    pub fn check_fits_in_device_memory(&self) -> Result<i64> {
        let stats = self.memory_stats()?;
        let limit = self
            .topology()
            .device_memory_bytes()
            .ok_or_else(|| Error::Pjrt {
                code: ErrorCode::Unimplemented,
                function: "Executable::check_fits_in_device_memory",
                message: "the topology's devices report no device_memory_bytes_limit".into(),
            })?;
        // The peak includes arguments and outputs; fall back to their sum where a plugin leaves
        // the peak at 0.
        let peak = stats.peak_memory_in_bytes.max(
            stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                - stats.alias_size_in_bytes,
        );
        if peak > limit {
            return Err(Error::Pjrt {
                code: ErrorCode::ResourceExhausted,
                function: "Executable::check_fits_in_device_memory",
                message: format!(
                    "{:?} needs {peak} bytes per device (arguments {}, outputs {}, temporaries {}) but a {} device \
                     has {limit} bytes",
                    self.name().unwrap_or_default(),
                    stats.argument_size_in_bytes,
                    stats.output_size_in_bytes,
                    stats.temp_size_in_bytes,
                    self.inner
                        .topology
                        .devices
                        .first()
                        .map(|d| d.kind.as_str())
                        .unwrap_or("")
                ),
            });
        }
        Ok(limit - peak)
    }

    /// The compiler's cost analysis. TPU only: the CUDA plugin answers
    /// [`ErrorCode::Unimplemented`].
    pub fn cost_analysis(&self) -> Result<CostAnalysis> {
        let mut a = sys::CostAnalysisArgs::new();
        a.executable = self.inner.raw;
        // SAFETY: slot 46 takes PJRT_Executable_GetCostAnalysis_Args.
        unsafe {
            self.plugin().call(
                slot::EXECUTABLE_GET_COST_ANALYSIS,
                "PJRT_Executable_GetCostAnalysis",
                &mut a,
            )
        }?;
        // SAFETY: num_properties named values owned by the executable.
        let values = unsafe { read_named_values(a.properties, a.num_properties) };
        let properties = values
            .into_iter()
            .filter_map(|(n, v)| {
                let x = match v {
                    NamedValue::F32(f) => f64::from(f),
                    NamedValue::I64(i) => i as f64,
                    NamedValue::Bool(b) => f64::from(u8::from(b)),
                    NamedValue::Str(_) | NamedValue::I64List(_) => return None,
                };
                Some((n, x))
            })
            .collect();
        Ok(CostAnalysis { properties })
    }

    /// The optimized program as the plugin returns it: `(format, bytes)`, normally
    /// `("hlo_with_config", <HloModuleProtoWithConfig>)`.
    pub fn optimized_program_raw(&self) -> Result<(String, Vec<u8>)> {
        self.handle().optimized_program_raw()
    }

    /// The optimized, target-specific program as a serialized `HloModuleProto` (TPU: tiled
    /// layouts and fusions; GPU: Triton/cuBLAS fusions).
    pub fn optimized_program(&self) -> Result<Vec<u8>> {
        self.handle().optimized_program()
    }

    /// The serialized executable (TPU: the compiled program; GPU: an `ExecutableAndOptionsProto`
    /// with the cubins). Loading it needs a client on the real hardware with the same plugin
    /// version, which was not tested here.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        self.handle().serialize()
    }

    /// The plugin's fingerprint (`PJRT_Executable_Fingerprint`; raw hash bytes shown as hex), else
    /// `sha256:<hex>` of [`Executable::serialize`].
    pub fn fingerprint(&self) -> Result<String> {
        self.handle().fingerprint()
    }
}

/// A minimal protobuf text-format reader: fields, nested messages and scalars (enough to check
/// a `GpuTargetConfigProto`; repeated-list syntax `[...]` is refused).
mod textproto {
    /// A field value.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) enum Value {
        /// A number, identifier or (unquoted) string.
        Scalar(String),
        /// A nested message.
        Message(Vec<(String, Value)>),
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Token {
        Word(String),
        Str(String),
        Open,
        Close,
        Colon,
    }

    fn tokenize(text: &str) -> Result<Vec<(Token, usize)>, String> {
        let mut out = Vec::new();
        let mut chars = text.chars().peekable();
        let mut line = 1;
        while let Some(c) = chars.next() {
            match c {
                '\n' => line += 1,
                c if c.is_whitespace() || c == ',' || c == ';' => {}
                '#' => {
                    for c in chars.by_ref() {
                        if c == '\n' {
                            line += 1;
                            break;
                        }
                    }
                }
                '{' | '<' => out.push((Token::Open, line)),
                '}' | '>' => out.push((Token::Close, line)),
                ':' => out.push((Token::Colon, line)),
                '"' | '\'' => {
                    let mut s = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(format!("line {line}: unterminated string")),
                            Some('\\') => match chars.next() {
                                Some('n') => s.push('\n'),
                                Some('t') => s.push('\t'),
                                Some(other) => s.push(other),
                                None => return Err(format!("line {line}: unterminated string")),
                            },
                            Some(q) if q == c => break,
                            Some('\n') => return Err(format!("line {line}: newline in string")),
                            Some(other) => s.push(other),
                        }
                    }
                    out.push((Token::Str(s), line));
                }
                c if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '+' || c == '.' => {
                    let mut w = String::from(c);
                    while let Some(&n) = chars.peek() {
                        if n.is_ascii_alphanumeric() || n == '_' || n == '-' || n == '+' || n == '.'
                        {
                            w.push(n);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    out.push((Token::Word(w), line));
                }
                other => return Err(format!("line {line}: unexpected character {other:?}")),
            }
        }
        Ok(out)
    }

    fn parse_fields(
        tokens: &[(Token, usize)],
        pos: &mut usize,
        nested: bool,
    ) -> Result<Vec<(String, Value)>, String> {
        let mut fields = Vec::new();
        loop {
            let Some((tok, line)) = tokens.get(*pos) else {
                return if nested {
                    Err("unclosed '{' at end of input".into())
                } else {
                    Ok(fields)
                };
            };
            let name = match tok {
                Token::Close if nested => {
                    *pos += 1;
                    return Ok(fields);
                }
                Token::Word(w) => w.clone(),
                other => {
                    return Err(format!(
                        "line {line}: expected a field name, found {other:?}"
                    ))
                }
            };
            *pos += 1;
            if matches!(tokens.get(*pos), Some((Token::Colon, _))) {
                *pos += 1;
            }
            match tokens.get(*pos) {
                Some((Token::Open, _)) => {
                    *pos += 1;
                    let inner = parse_fields(tokens, pos, true)?;
                    fields.push((name, Value::Message(inner)));
                }
                Some((Token::Word(w), _)) => {
                    *pos += 1;
                    fields.push((name, Value::Scalar(w.clone())));
                }
                Some((Token::Str(s), _)) => {
                    *pos += 1;
                    let mut s = s.clone();
                    // Adjacent string literals concatenate.
                    while let Some((Token::Str(more), _)) = tokens.get(*pos) {
                        s.push_str(more);
                        *pos += 1;
                    }
                    fields.push((name, Value::Scalar(s)));
                }
                Some((other, l)) => {
                    return Err(format!(
                        "line {l}: field {name:?} has no value (found {other:?})"
                    ))
                }
                None => return Err(format!("line {line}: field {name:?} has no value")),
            }
        }
    }

    /// Parses text-format fields.
    pub(crate) fn parse(text: &str) -> Result<Vec<(String, Value)>, String> {
        let tokens = tokenize(text)?;
        let mut pos = 0;
        parse_fields(&tokens, &mut pos, false)
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
    fn incomplete_specs_are_refused_with_the_missing_fields() {
        let only_platform = "platform_name: \"CUDA\"";
        let e = validate_gpu_spec(only_platform).unwrap_err().to_string();
        assert!(e.contains("gpu_device_info"), "{e}");
        let no_warp = H100_SXM.replace("threads_per_warp: 32", "");
        let e = validate_gpu_spec(&no_warp).unwrap_err().to_string();
        assert!(e.contains("threads_per_warp"), "{e}");
        let zero_cores = H100_SXM.replace("core_count: 132", "core_count: 0");
        let e = validate_gpu_spec(&zero_cores).unwrap_err().to_string();
        assert!(e.contains("core_count"), "{e}");
        let no_cc = H100_SXM.replace("cuda_compute_capability { major: 9 }", "");
        let e = validate_gpu_spec(&no_cc).unwrap_err().to_string();
        assert!(e.contains("cuda_compute_capability.major"), "{e}");
        let rocm = H100_SXM.replace("\"CUDA\"", "\"ROCM\"");
        assert!(validate_gpu_spec(&rocm).is_err());
        assert!(validate_gpu_spec("gpu_device_info { core_count: 1").is_err());
        assert!(validate_gpu_spec("gpu_device_info { core_count: [1, 2] }").is_err());
    }

    #[test]
    fn textproto_handles_comments_and_inline_messages() {
        use textproto::Value;
        let v = textproto::parse("# c\na { b: 1 c < d: \"x\" 'y' > }\ne: -2.5e3").unwrap();
        assert_eq!(
            v,
            vec![
                (
                    "a".into(),
                    Value::Message(vec![
                        ("b".into(), Value::Scalar("1".into())),
                        (
                            "c".into(),
                            Value::Message(vec![("d".into(), Value::Scalar("xy".into()))])
                        ),
                    ])
                ),
                ("e".into(), Value::Scalar("-2.5e3".into())),
            ]
        );
    }

    #[test]
    fn tpu_names_are_checked() {
        for ok in [
            "v5e:2x2",
            "v5p:2x2x1",
            "v6e:1x1",
            "v4_2x2x1",
            "TPU7x:2x2x1",
            "v5e=2x4",
            "v4:4x4x4_twisted",
        ] {
            check_tpu_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "bogus",
            "v7x:2x2",
            "v5litepod:2x2",
            "v5e:",
            "v5e:2",
            "v5e:2x0",
            "v5e:2x2x2x2",
            "v5e:axb",
        ] {
            let e = check_tpu_name(bad).unwrap_err().to_string();
            assert!(e.contains("v5e:2x2") && e.contains("tpu7x"), "{bad}: {e}");
        }
    }

    #[test]
    fn gpu_shapes_are_checked() {
        assert_eq!(parse_gpu_shape("1x1x8").unwrap(), [1, 1, 8]);
        for bad in ["", "8", "1x8", "1x1x0", "axbxc", "1x1x1x1"] {
            assert!(parse_gpu_shape(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn custom_call_targets_are_found_in_plugin_messages() {
        assert_eq!(
            custom_call_target("[code 3] Custom emitter for probe_scale not found").as_deref(),
            Some("probe_scale")
        );
        assert_eq!(
            custom_call_target(
                "No FFI handler registered for rattn_x on a platform CUDA (canonical cuda)"
            )
            .as_deref(),
            Some("rattn_x")
        );
        assert_eq!(custom_call_target("something else"), None);
    }
}
