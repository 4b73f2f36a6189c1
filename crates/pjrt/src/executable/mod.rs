//! Compiled programs: [`LoadedExecutable`] (compiled by a client, runs on its devices) and
//! [`Executable`] (compiled for a topology without a client: inspected, serialized, checked
//! against the device memory, never run here). Both answer the same queries through one handle
//! on the plugin's `PJRT_Executable`.

mod loaded;
mod unloaded;

pub use loaded::LoadedExecutable;
pub use unloaded::Executable;

use crate::error::{Error, ErrorCode, Result};
use crate::plugin::{read_named_values, NamedValue};
use crate::sys::{self, slot, Ptr};

/// Compile-time memory statistics (`PJRT_Executable_GetCompiledMemoryStats`), in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompiledMemoryStats {
    /// Generated code size (bytes, or a count for `indefinite_allocations`).
    pub generated_code_size_in_bytes: i64,
    /// Argument size (bytes, or a count for `indefinite_allocations`).
    pub argument_size_in_bytes: i64,
    /// Output size (bytes, or a count for `indefinite_allocations`).
    pub output_size_in_bytes: i64,
    /// Alias size (bytes, or a count for `indefinite_allocations`).
    pub alias_size_in_bytes: i64,
    /// Temp size (bytes, or a count for `indefinite_allocations`).
    pub temp_size_in_bytes: i64,
    /// Host generated code size (bytes, or a count for `indefinite_allocations`).
    pub host_generated_code_size_in_bytes: i64,
    /// Host argument size (bytes, or a count for `indefinite_allocations`).
    pub host_argument_size_in_bytes: i64,
    /// Host output size (bytes, or a count for `indefinite_allocations`).
    pub host_output_size_in_bytes: i64,
    /// Host alias size (bytes, or a count for `indefinite_allocations`).
    pub host_alias_size_in_bytes: i64,
    /// Host temp size (bytes, or a count for `indefinite_allocations`).
    pub host_temp_size_in_bytes: i64,
    /// Peak memory (bytes, or a count for `indefinite_allocations`).
    pub peak_memory_in_bytes: i64,
    /// Total size (bytes, or a count for `indefinite_allocations`).
    pub total_size_in_bytes: i64,
    /// Total allocation bytes (bytes, or a count for `indefinite_allocations`).
    pub total_allocation_bytes: i64,
    /// Indefinite allocations (bytes, or a count for `indefinite_allocations`).
    pub indefinite_allocations: i64,
    /// Peak unpadded heap bytes (bytes, or a count for `indefinite_allocations`).
    pub peak_unpadded_heap_bytes: i64,
}

impl CompiledMemoryStats {
    /// Peak memory per device in bytes, arguments and outputs included: the plugin's peak, or
    /// arguments + outputs + temporaries − aliased outputs where that is larger (a plugin may
    /// leave the peak at 0).
    pub fn peak_bytes(&self) -> i64 {
        self.peak_memory_in_bytes.max(
            self.argument_size_in_bytes + self.output_size_in_bytes + self.temp_size_in_bytes
                - self.alias_size_in_bytes,
        )
    }
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

/// A borrowed `PJRT_Executable` (loaded executables hand one out; client-less compiles own one):
/// the queries both kinds of executable share, written once.
pub(crate) struct ExecHandle<'a> {
    pub(crate) raw: Ptr,
    pub(crate) plugin: &'a crate::Plugin,
}

/// Refuses a null executable handle that the compile function `function` returned.
pub(crate) fn check_returned(raw: Ptr, function: &'static str) -> Result<()> {
    if raw.is_null() {
        return Err(Error::Pjrt {
            code: ErrorCode::Internal,
            function,
            message: "the plugin returned no executable".into(),
        });
    }
    Ok(())
}

impl ExecHandle<'_> {
    /// Number of outputs per device (`PJRT_Executable_NumOutputs`).
    pub(crate) fn num_outputs(&self) -> Result<usize> {
        self.word_query(slot::EXECUTABLE_NUM_OUTPUTS, "PJRT_Executable_NumOutputs")
    }

    pub(crate) fn word_query(&self, s: usize, name: &'static str) -> Result<usize> {
        // SAFETY: the slot takes a (executable, size_t out) args struct of the HandleWordArgs
        // layout; the executable outlives `self`.
        unsafe { self.plugin.query_word(s, name, self.raw) }
    }

    pub(crate) fn string_query(&self, s: usize, name: &'static str) -> Result<String> {
        // SAFETY: the slot takes a (executable, string out) args struct of the handle-string
        // layout; the executable outlives `self`.
        unsafe { self.plugin.query_string(s, name, self.raw) }
    }

    pub(crate) fn cost_analysis(&self) -> Result<CostAnalysis> {
        let mut a = sys::CostAnalysisArgs::new();
        a.executable = self.raw;
        // SAFETY: slot 46 takes PJRT_Executable_GetCostAnalysis_Args.
        unsafe {
            self.plugin.call(
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

    pub(crate) fn optimized_program_raw(&self) -> Result<(String, Vec<u8>)> {
        let mut p = sys::Program::new();
        let optimized_program = |p: &mut sys::Program| {
            let mut a = sys::ExecutableOptimizedProgramArgs::new();
            a.executable = self.raw;
            a.program = p;
            // SAFETY: slot 48 takes PJRT_Executable_OptimizedProgram_Args; with program.code =
            // null it reports the required code_size, else the code has code_size writable
            // bytes (see below).
            unsafe {
                self.plugin.call(
                    slot::EXECUTABLE_OPTIMIZED_PROGRAM,
                    "PJRT_Executable_OptimizedProgram",
                    &mut a,
                )
            }
        };
        optimized_program(&mut p)?;
        let mut code = vec![0u8; p.code_size];
        p.code = code.as_mut_ptr();
        // `code` has code_size writable bytes.
        optimized_program(&mut p)?;
        code.truncate(p.code_size);
        // SAFETY: the format string is a static string of the plugin, valid for format_size bytes.
        let format = unsafe { crate::plugin::copy_string(p.format, p.format_size) };
        Ok((format, code))
    }

    pub(crate) fn optimized_program(&self) -> Result<Vec<u8>> {
        let (format, code) = self.optimized_program_raw()?;
        match format.as_str() {
            "hlo" => Ok(code),
            "hlo_with_config" => {
                use prost::Message;
                /// `xla.HloModuleProtoWithConfig { HloModuleProto hlo_module = 1; ... }`.
                #[derive(Clone, PartialEq, prost::Message)]
                struct WithConfig {
                    #[prost(bytes = "vec", tag = "1")]
                    hlo_module: Vec<u8>,
                }
                WithConfig::decode(code.as_slice())
                    .map(|w| w.hlo_module)
                    .map_err(|e| Error::Pjrt {
                        code: ErrorCode::Internal,
                        function: "PJRT_Executable_OptimizedProgram",
                        message: format!("cannot decode HloModuleProtoWithConfig: {e}"),
                    })
            }
            other => Err(Error::Pjrt {
                code: ErrorCode::Unimplemented,
                function: "PJRT_Executable_OptimizedProgram",
                message: format!("unexpected optimized program format {other:?}"),
            }),
        }
    }

    pub(crate) fn memory_stats(&self) -> Result<CompiledMemoryStats> {
        let mut a = sys::ExecutableMemoryStatsArgs::new();
        a.executable = self.raw;
        // SAFETY: slot 96 takes PJRT_Executable_GetCompiledMemoryStats_Args.
        unsafe {
            self.plugin.call(
                slot::EXECUTABLE_COMPILED_MEMORY_STATS,
                "PJRT_Executable_GetCompiledMemoryStats",
                &mut a,
            )
        }?;
        Ok(CompiledMemoryStats {
            generated_code_size_in_bytes: a.generated_code_size_in_bytes,
            argument_size_in_bytes: a.argument_size_in_bytes,
            output_size_in_bytes: a.output_size_in_bytes,
            alias_size_in_bytes: a.alias_size_in_bytes,
            temp_size_in_bytes: a.temp_size_in_bytes,
            host_generated_code_size_in_bytes: a.host_generated_code_size_in_bytes,
            host_argument_size_in_bytes: a.host_argument_size_in_bytes,
            host_output_size_in_bytes: a.host_output_size_in_bytes,
            host_alias_size_in_bytes: a.host_alias_size_in_bytes,
            host_temp_size_in_bytes: a.host_temp_size_in_bytes,
            peak_memory_in_bytes: a.peak_memory_in_bytes,
            total_size_in_bytes: a.total_size_in_bytes,
            total_allocation_bytes: a.total_allocation_bytes,
            indefinite_allocations: a.indefinite_allocations,
            peak_unpadded_heap_bytes: a.peak_unpadded_heap_bytes,
        })
    }

    pub(crate) fn serialize(&self) -> Result<Vec<u8>> {
        let mut a = sys::ExecutableSerializeArgs::new();
        a.executable = self.raw;
        // SAFETY: slot 49 takes PJRT_Executable_Serialize_Args.
        unsafe {
            self.plugin.call(
                slot::EXECUTABLE_SERIALIZE,
                "PJRT_Executable_Serialize",
                &mut a,
            )
        }?;
        // SAFETY: valid until the deleter runs.
        let bytes = unsafe { copy_bytes(a.serialized_bytes, a.serialized_bytes_size) };
        // SAFETY: the deleter frees the serialized executable exactly once.
        unsafe { run_deleter(a.serialized_executable_deleter, a.serialized_executable) };
        Ok(bytes)
    }

    /// The plugin's fingerprint (printable as is, else hex: libtpu returns raw hash bytes), or
    /// `sha256:<hex>` of the serialized executable where the plugin has none.
    pub(crate) fn fingerprint(&self) -> Result<String> {
        let mut a = sys::HandleStringArgs::new();
        a.handle = self.raw;
        // SAFETY: slot 94 takes PJRT_Executable_Fingerprint_Args (executable, bytes out, size
        // out); the bytes are owned by the executable, alive here.
        let result = unsafe {
            self.plugin.call(
                slot::EXECUTABLE_FINGERPRINT,
                "PJRT_Executable_Fingerprint",
                &mut a,
            )
        }
        // SAFETY: valid for value_size bytes while the executable lives.
        .map(|()| unsafe { copy_bytes(a.value, a.value_size) });
        match result {
            Ok(bytes) if !bytes.is_empty() => Ok(if bytes.iter().all(|b| b.is_ascii_graphic()) {
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                crate::install::hex(&bytes)
            }),
            Ok(_)
            | Err(Error::Pjrt {
                code: ErrorCode::Unimplemented,
                ..
            }) => {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(self.serialize()?);
                Ok(format!("sha256:{}", crate::install::hex(&digest)))
            }
            Err(e) => Err(e),
        }
    }
}

/// # Safety
/// `ptr` must be valid for `len` bytes (or null).
pub(crate) unsafe fn copy_bytes(ptr: *const u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()
}

/// # Safety
/// `deleter` must be null or a plugin function `void(T*)` that frees `object`, called once.
pub(crate) unsafe fn run_deleter(deleter: Ptr, object: Ptr) {
    if deleter.is_null() {
        return;
    }
    type Deleter = unsafe extern "C" fn(Ptr);
    // SAFETY: guaranteed by the caller.
    let f: Deleter = unsafe { std::mem::transmute::<Ptr, Deleter>(deleter) };
    // SAFETY: guaranteed by the caller.
    unsafe { f(object) };
}
