//! Ahead-of-time compilation for hardware that is not attached: a [`Topology`] describes the
//! devices of a TPU slice (libtpu, by name: [`crate::tpu`]) or of GPUs (the CUDA plugin and a
//! target spec: [`crate::gpu`]), and compiles for them with the client-less `PJRT_Compile`.
//! Nothing is executed; the result is an unloaded [`Executable`] whose memory statistics, cost
//! analysis, optimized HLO and serialized form can be inspected.
//!
//! ```no_run
//! use pjrt::install::{PluginCache, PluginKind};
//! use pjrt::{CompileOptions, Program, Topology};
//! pjrt::tpu::set_environment()?; // first thing in main: libtpu reads it when loaded
//! let topo = Topology::tpu(&PluginCache::default().load(PluginKind::Tpu)?, "v5e:2x2")?;
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
//! * an incomplete GPU target spec (the CUDA plugin divides by zero at compile time:
//!   [`crate::gpu_spec::validate_gpu_spec`]);
//! * unknown TPU generations and the empty name (which libtpu silently turns into TPU v2).
//!
//! Known aborts are all covered by these checks; an unknown one would still end the process, as
//! for any in-process compiler. Callers that must survive that (CI drivers compiling untrusted
//! graphs) should run the compile in a child process; this module has no child mode yet.

use std::path::PathBuf;
use std::sync::Arc;

use crate::compile;
use crate::device::DeviceDescription;
use crate::error::{Error, ErrorCode, Result};
use crate::executable::{copy_bytes, run_deleter, Executable};
use crate::options::{CompileOptions, OptionOverride, Program};
use crate::plugin::{read_named_values, NamedValue, Plugin, RawNamedValues};
use crate::sys::{self, slot, Ptr};

/// Which kind of accelerator a topology describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyKind {
    /// A TPU topology from libtpu.
    Tpu,
    /// A GPU topology from the CUDA plugin and a target spec.
    Gpu,
}

/// A device topology (`PJRT_TopologyDescription`) to compile for, without the devices. Made by
/// [`Topology::tpu`] or [`Topology::gpu`] (and their variants).
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
    /// Where the compiler finds `ptxas` and libdevice when it would not find them itself; passed
    /// with every compile as the `xla_gpu_cuda_data_dir` option.
    cuda_data_dir: Option<PathBuf>,
}

// SAFETY: a PJRT_TopologyDescription is immutable after creation and the PJRT C API allows
// concurrent use from several threads (measured: concurrent PJRT_Compile on libtpu and CUDA).
unsafe impl Send for TopologyInner {}
// SAFETY: see `Send`.
unsafe impl Sync for TopologyInner {}

impl Drop for TopologyInner {
    fn drop(&mut self) {
        let (s, name) = (slot::TOPOLOGY_DESTROY, "PJRT_TopologyDescription_Destroy");
        // SAFETY: the topology is owned by us and destroyed exactly once; every executable holds
        // a clone of the `Topology`, so none outlives it.
        unsafe { self.plugin.destroy(s, name, self.raw) };
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

impl Topology {
    /// Creates a topology with the plugin's create options `values`, reads its devices and
    /// checks that the plugin made one of `kind` (libtpu for TPU, the CUDA plugin for GPU).
    pub(crate) fn create(
        plugin: &Plugin,
        name: &str,
        values: &[(&str, NamedValue)],
        kind: TopologyKind,
        cuda_data_dir: Option<PathBuf>,
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
            cuda_data_dir,
        };
        // From here on, `inner`'s Drop destroys the topology on error.
        inner.devices = read_devices(&inner)?;
        if inner.devices.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "topology {name:?} has no devices"
            )));
        }
        let topology = Topology {
            inner: Arc::new(inner),
        };
        let (platform, constructor, plugin_kind) = match kind {
            TopologyKind::Tpu => ("tpu", "Topology::tpu", "libtpu (PluginKind::Tpu)"),
            TopologyKind::Gpu => (
                "cuda",
                "Topology::gpu",
                "the CUDA plugin (PluginKind::Cuda)",
            ),
        };
        let made = topology.platform_name()?;
        if made != platform {
            return Err(Error::InvalidArgument(format!(
                "plugin {} made a {made:?} topology for {name:?}; {constructor} needs {plugin_kind}",
                plugin.path().display()
            )));
        }
        Ok(topology)
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
        // SAFETY: the slot takes (topology, string out) args of the handle-string layout; the
        // topology is live and owns the string.
        unsafe { self.inner.plugin.query_string(s, function, self.inner.raw) }
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

    /// The kind of the first device (`"TPU v5 lite"`, `"NVIDIA H100 80GB HBM3"`), for messages.
    pub(crate) fn device_kind(&self) -> &str {
        self.inner
            .devices
            .first()
            .map(|d| d.kind.as_str())
            .unwrap_or("")
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
        let ids: Vec<i32> = self.inner.devices.iter().map(|d| d.id).collect();
        let owner = format!("topology {:?}", self.inner.name);
        let context = format!(
            "topology {:?} has {} devices: {}",
            self.inner.name,
            ids.len(),
            self.device_kind()
        );
        let with_data_dir;
        let options = match &self.inner.cuda_data_dir {
            Some(dir) if !options.debug_overrides.contains_key(CUDA_DATA_DIR) => {
                let mut o = options.clone();
                o.debug_overrides.insert(
                    CUDA_DATA_DIR.into(),
                    OptionOverride::Str(dir.to_string_lossy().into_owned()),
                );
                with_data_dir = o;
                &with_data_dir
            }
            _ => options,
        };
        let prepared = compile::prepare(program, options, &ids, &owner, Some(&context))?;
        let p = prepared.program();
        let mut a = sys::CompileArgs::new();
        a.topology = self.inner.raw;
        a.program = &p;
        a.compile_options = prepared.options.as_ptr();
        a.compile_options_size = prepared.options.len();
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
        Executable::from_raw(self, a.executable)
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
                self.device_kind(),
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

/// The XLA debug option naming the CUDA root (with `bin/ptxas` and `nvvm/libdevice`).
const CUDA_DATA_DIR: &str = "xla_gpu_cuda_data_dir";

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

fn read_devices(inner: &TopologyInner) -> Result<Vec<DeviceDescription>> {
    let mut a = sys::TopologyDeviceDescriptionsArgs::new();
    a.topology = inner.raw;
    // SAFETY: slot 86 takes PJRT_TopologyDescription_GetDeviceDescriptions_Args.
    unsafe {
        inner.plugin.call(
            slot::TOPOLOGY_GET_DEVICE_DESCRIPTIONS,
            "PJRT_TopologyDescription_GetDeviceDescriptions",
            &mut a,
        )
    }?;
    if a.num_descriptions == 0 || a.descriptions.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: an array of num_descriptions descriptions owned by the topology.
    let raws = unsafe { std::slice::from_raw_parts(a.descriptions, a.num_descriptions) };
    raws.iter()
        // SAFETY: each description is owned by the topology, which is alive here.
        .map(|&desc| unsafe { DeviceDescription::read(&inner.plugin, desc) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
