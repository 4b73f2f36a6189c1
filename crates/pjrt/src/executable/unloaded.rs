//! Executables compiled for a [`Topology`] without a client (`PJRT_Compile`): inspected,
//! serialized and checked against the device memory, never run here.

use std::sync::Arc;

use super::{check_returned, CompiledMemoryStats, CostAnalysis, ExecHandle};
use crate::error::{Error, ErrorCode, Result};
use crate::plugin::Plugin;
use crate::sys::{slot, Ptr};
use crate::topology::Topology;

/// An unloaded executable compiled for a [`Topology`] (`PJRT_Executable`). It cannot run here;
/// it can be inspected and serialized. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Executable {
    inner: Arc<UnloadedInner>,
}

struct UnloadedInner {
    raw: Ptr,
    topology: Topology,
    num_outputs: usize,
}

// SAFETY: a PJRT_Executable is immutable after compilation; the query functions are thread-safe.
unsafe impl Send for UnloadedInner {}
// SAFETY: see `Send`.
unsafe impl Sync for UnloadedInner {}

impl Drop for UnloadedInner {
    fn drop(&mut self) {
        let (s, name) = (slot::EXECUTABLE_DESTROY, "PJRT_Executable_Destroy");
        // SAFETY: PJRT_Compile's caller owns the executable; destroyed exactly once, before the
        // topology (and with it the plugin's topology object) it holds.
        unsafe { self.topology.plugin().destroy(s, name, self.raw) };
    }
}

impl std::fmt::Debug for Executable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executable")
            .field("name", &self.name().unwrap_or_default())
            .field("topology", &self.inner.topology.name())
            .field("num_outputs", &self.inner.num_outputs)
            .finish()
    }
}

impl Executable {
    /// Takes ownership of `raw`, an executable that `PJRT_Compile` returned for `topology`.
    pub(crate) fn from_raw(topology: &Topology, raw: Ptr) -> Result<Executable> {
        check_returned(raw, "PJRT_Compile")?;
        let mut exe = Executable {
            inner: Arc::new(UnloadedInner {
                raw,
                topology: topology.clone(),
                num_outputs: 0,
            }),
        };
        let num_outputs = exe.handle().num_outputs()?;
        Arc::get_mut(&mut exe.inner)
            .expect("not shared yet")
            .num_outputs = num_outputs;
        Ok(exe)
    }

    fn plugin(&self) -> &Plugin {
        self.inner.topology.plugin()
    }

    fn handle(&self) -> ExecHandle<'_> {
        ExecHandle {
            raw: self.inner.raw,
            plugin: self.plugin(),
        }
    }

    /// The topology it was compiled for.
    pub fn topology(&self) -> Topology {
        self.inner.topology.clone()
    }

    /// The module's name.
    pub fn name(&self) -> Result<String> {
        self.handle()
            .string_query(slot::EXECUTABLE_NAME, "PJRT_Executable_Name")
    }

    /// Outputs per device.
    pub fn num_outputs(&self) -> usize {
        self.inner.num_outputs
    }

    /// Replicas compiled for.
    pub fn num_replicas(&self) -> Result<usize> {
        self.handle()
            .word_query(slot::EXECUTABLE_NUM_REPLICAS, "PJRT_Executable_NumReplicas")
    }

    /// Partitions compiled for.
    pub fn num_partitions(&self) -> Result<usize> {
        self.handle().word_query(
            slot::EXECUTABLE_NUM_PARTITIONS,
            "PJRT_Executable_NumPartitions",
        )
    }

    /// Per-device memory the compiled program needs. TPU fills every device field; the CUDA
    /// plugin reports `generated_code_size_in_bytes` and `total_size_in_bytes` as 0.
    pub fn memory_stats(&self) -> Result<CompiledMemoryStats> {
        self.handle().memory_stats()
    }

    /// Checks the peak memory per device ([`CompiledMemoryStats::peak_bytes`]) against the
    /// topology's device memory and returns the headroom in bytes. Fails with
    /// [`ErrorCode::ResourceExhausted`] when it does not fit. This matters on GPU, where the
    /// compiler does not check memory itself.
    pub fn check_fits_in_device_memory(&self) -> Result<i64> {
        let stats = self.memory_stats()?;
        let topology = &self.inner.topology;
        let limit = topology.device_memory_bytes().ok_or_else(|| Error::Pjrt {
            code: ErrorCode::Unimplemented,
            function: "Executable::check_fits_in_device_memory",
            message: "the topology's devices report no device_memory_bytes_limit".into(),
        })?;
        let peak = stats.peak_bytes();
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
                    topology.device_kind()
                ),
            });
        }
        Ok(limit - peak)
    }

    /// The compiler's cost analysis. TPU only: the CUDA plugin answers
    /// [`ErrorCode::Unimplemented`].
    pub fn cost_analysis(&self) -> Result<CostAnalysis> {
        self.handle().cost_analysis()
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
