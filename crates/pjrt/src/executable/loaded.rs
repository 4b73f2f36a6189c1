//! Executables compiled by a client and loaded on its devices: queries and execution.

use std::sync::Arc;

use super::{check_returned, CompiledMemoryStats, ExecHandle};
use crate::buffer::Buffer;
use crate::client::{Client, Device};
use crate::dtype::{ElementType, RuntimeCodes};
use crate::error::{Error, ErrorCode, Result};
use crate::sys::{self, slot, Ptr};

/// A compiled program loaded on its devices. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct LoadedExecutable {
    inner: Arc<ExecInner>,
}

struct ExecInner {
    raw: Ptr,
    client: Client,
    num_outputs: usize,
    devices: Vec<Device>,
}

// SAFETY: PJRT loaded executables may be executed concurrently from several threads.
unsafe impl Send for ExecInner {}
// SAFETY: see `Send`.
unsafe impl Sync for ExecInner {}

impl Drop for ExecInner {
    fn drop(&mut self) {
        let (s, name) = (
            slot::LOADED_EXECUTABLE_DESTROY,
            "PJRT_LoadedExecutable_Destroy",
        );
        // SAFETY: owned by us and destroyed exactly once.
        unsafe { self.client.inner.plugin.destroy(s, name, self.raw) };
    }
}

impl std::fmt::Debug for LoadedExecutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedExecutable")
            .field("name", &self.name().unwrap_or_default())
            .field("num_outputs", &self.inner.num_outputs)
            .field(
                "devices",
                &self
                    .inner
                    .devices
                    .iter()
                    .map(Device::id)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A `PJRT_Executable` obtained from a loaded executable, destroyed on drop.
struct ExecutableRef<'a> {
    raw: Ptr,
    client: &'a Client,
}

impl Drop for ExecutableRef<'_> {
    fn drop(&mut self) {
        let (s, name) = (slot::EXECUTABLE_DESTROY, "PJRT_Executable_Destroy");
        // SAFETY: the caller of GetExecutable owns the returned executable and must destroy it.
        unsafe { self.client.inner.plugin.destroy(s, name, self.raw) };
    }
}

impl ExecutableRef<'_> {
    fn handle(&self) -> ExecHandle<'_> {
        ExecHandle {
            raw: self.raw,
            plugin: &self.client.inner.plugin,
        }
    }
}

impl LoadedExecutable {
    pub(crate) fn from_raw(client: &Client, raw: Ptr) -> Result<LoadedExecutable> {
        check_returned(raw, "PJRT_Client_Compile")?;
        let mut exe = LoadedExecutable {
            inner: Arc::new(ExecInner {
                raw,
                client: client.clone(),
                num_outputs: 0,
                devices: Vec::new(),
            }),
        };
        let num_outputs = exe.executable()?.handle().num_outputs()?;
        let devices = client.device_list(
            slot::LOADED_EXECUTABLE_ADDRESSABLE_DEVICES,
            "PJRT_LoadedExecutable_AddressableDevices",
            raw,
        )?;
        let inner = Arc::get_mut(&mut exe.inner).expect("not shared yet");
        inner.num_outputs = num_outputs;
        inner.devices = devices;
        Ok(exe)
    }

    fn plugin(&self) -> &crate::Plugin {
        &self.inner.client.inner.plugin
    }

    fn executable(&self) -> Result<ExecutableRef<'_>> {
        let (s, name) = (
            slot::LOADED_EXECUTABLE_GET_EXECUTABLE,
            "PJRT_LoadedExecutable_GetExecutable",
        );
        // SAFETY: slot 51 takes PJRT_LoadedExecutable_GetExecutable_Args (HandleWordArgs
        // layout).
        let raw = unsafe { self.plugin().query_word(s, name, self.inner.raw) }?;
        Ok(ExecutableRef {
            raw: raw as Ptr,
            client: &self.inner.client,
        })
    }

    fn word_query(&self, s: usize, name: &'static str) -> Result<usize> {
        self.executable()?.handle().word_query(s, name)
    }

    fn string_query(&self, s: usize, name: &'static str) -> Result<String> {
        self.executable()?.handle().string_query(s, name)
    }

    /// The client the executable belongs to.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The devices the executable runs on, in the order of `execute_sharded`'s argument lists.
    pub fn addressable_devices(&self) -> &[Device] {
        &self.inner.devices
    }

    /// The executable's (module's) name.
    pub fn name(&self) -> Result<String> {
        self.string_query(slot::EXECUTABLE_NAME, "PJRT_Executable_Name")
    }

    /// Number of outputs per device.
    pub fn num_outputs(&self) -> Result<usize> {
        Ok(self.inner.num_outputs)
    }

    /// Number of replicas the program was compiled for.
    pub fn num_replicas(&self) -> Result<usize> {
        self.word_query(slot::EXECUTABLE_NUM_REPLICAS, "PJRT_Executable_NumReplicas")
    }

    /// Number of partitions the program was compiled for.
    pub fn num_partitions(&self) -> Result<usize> {
        self.word_query(
            slot::EXECUTABLE_NUM_PARTITIONS,
            "PJRT_Executable_NumPartitions",
        )
    }

    /// Element type and (per-device) dims of every output.
    pub fn output_shapes(&self) -> Result<Vec<(ElementType, Vec<i64>)>> {
        let exe = self.executable()?;
        let mut t = sys::ExecutableOutputTypesArgs::new();
        t.executable = exe.raw;
        // SAFETY: slot 90 takes PJRT_Executable_OutputElementTypes_Args.
        unsafe {
            self.plugin().call(
                slot::EXECUTABLE_OUTPUT_ELEMENT_TYPES,
                "PJRT_Executable_OutputElementTypes",
                &mut t,
            )
        }?;
        let mut d = sys::ExecutableOutputDimsArgs::new();
        d.executable = exe.raw;
        // SAFETY: slot 91 takes PJRT_Executable_OutputDimensions_Args.
        unsafe {
            self.plugin().call(
                slot::EXECUTABLE_OUTPUT_DIMENSIONS,
                "PJRT_Executable_OutputDimensions",
                &mut d,
            )
        }?;
        if t.num_output_types != d.num_outputs {
            return Err(Error::Shape(format!(
                "the plugin reports {} output types but {} output shapes",
                t.num_output_types, d.num_outputs
            )));
        }
        let n = d.num_outputs;
        if n == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the arrays are owned by the executable (alive while `exe` lives) and have the
        // reported lengths.
        let types = unsafe { std::slice::from_raw_parts(t.output_types, n) };
        // SAFETY: as above.
        let sizes = unsafe { std::slice::from_raw_parts(d.dim_sizes, n) };
        let total: usize = sizes.iter().sum();
        let dims: &[i64] = if total == 0 {
            &[]
        } else {
            // SAFETY: as above; the flattened dims array holds sum(dim_sizes) entries.
            unsafe { std::slice::from_raw_parts(d.dims, total) }
        };
        let mut out = Vec::with_capacity(n);
        let mut offset = 0;
        for (&ty, &size) in types.iter().zip(sizes) {
            let et = ElementType::from_pjrt_code(ty).ok_or_else(|| Error::Pjrt {
                code: ErrorCode::Unimplemented,
                function: "PJRT_Executable_OutputElementTypes",
                message: format!("PJRT buffer type {ty} is not supported by this crate"),
            })?;
            out.push((et, dims[offset..offset + size].to_vec()));
            offset += size;
        }
        Ok(out)
    }

    /// The optimized program: a serialized `HloModuleProto` after XLA's passes (unwrapped from
    /// the `HloModuleProtoWithConfig` that the plugin returns as format `"hlo_with_config"`).
    pub fn optimized_program(&self) -> Result<Vec<u8>> {
        self.executable()?.handle().optimized_program()
    }

    /// The optimized program as the plugin returns it: `(format, bytes)`, e.g.
    /// `("hlo_with_config", <HloModuleProtoWithConfig>)`.
    pub fn optimized_program_raw(&self) -> Result<(String, Vec<u8>)> {
        self.executable()?.handle().optimized_program_raw()
    }

    /// Compile-time memory statistics.
    pub fn memory_stats(&self) -> Result<CompiledMemoryStats> {
        self.executable()?.handle().memory_stats()
    }

    /// Serializes the executable (reload with [`Client::deserialize_executable`]).
    pub fn serialize(&self) -> Result<Vec<u8>> {
        self.executable()?.handle().serialize()
    }

    /// A fingerprint of the executable: the plugin's (`PJRT_Executable_Fingerprint`) where it
    /// implements one, else `sha256:<hex>` of [`LoadedExecutable::serialize`].
    pub fn fingerprint(&self) -> Result<String> {
        self.executable()?.handle().fingerprint()
    }

    /// Runs a single-device program on its device with borrowed arguments (never donated) and
    /// returns its outputs.
    pub fn execute(&self, args: &[&Buffer]) -> Result<Vec<Buffer>> {
        let lists = [args.to_vec()];
        Ok(self
            .execute_raw(&lists, |_| false)?
            .pop()
            .unwrap_or_default())
    }

    /// Like [`LoadedExecutable::execute`], but the arguments at positions `donated` are given to
    /// the execution: where the program aliases one to an output (HLO `input_output_alias`) the
    /// output reuses its memory, so a decode cache is updated in place. The donated buffers are
    /// deleted by the call ([`Buffer::is_deleted`]); drop them. The other arguments stay usable
    /// (parameters reused call after call).
    pub fn execute_donating_some(
        &self,
        args: &[&Buffer],
        donated: &[usize],
    ) -> Result<Vec<Buffer>> {
        if let Some(&i) = donated.iter().find(|&&i| i >= args.len()) {
            return Err(Error::InvalidArgument(format!(
                "donated argument {i} of executable {:?} is out of range ({} arguments)",
                self.name().unwrap_or_default(),
                args.len()
            )));
        }
        let lists = [args.to_vec()];
        Ok(self
            .execute_raw(&lists, |i| donated.contains(&i))?
            .pop()
            .unwrap_or_default())
    }

    /// Like [`LoadedExecutable::execute`] but gives the arguments to the execution, so inputs that
    /// the program aliases to outputs (HLO `input_output_alias`, StableHLO `tf.aliasing_output`)
    /// are donated: their memory is reused for the outputs instead of copied. The input buffers are
    /// consumed either way.
    pub fn execute_donating(&self, args: Vec<Buffer>) -> Result<Vec<Buffer>> {
        let refs: Vec<&Buffer> = args.iter().collect();
        let out = self
            .execute_raw(&[refs], |_| true)?
            .pop()
            .unwrap_or_default();
        drop(args);
        Ok(out)
    }

    /// Runs an SPMD / multi-device program: one argument list per device (in
    /// [`LoadedExecutable::addressable_devices`] order), one output list per device back.
    /// Arguments are not donated.
    pub fn execute_sharded(&self, args: &[Vec<&Buffer>]) -> Result<Vec<Vec<Buffer>>> {
        self.execute_raw(args, |_| false)
    }

    /// [`LoadedExecutable::execute_sharded`] with donation (see
    /// [`LoadedExecutable::execute_donating`]).
    pub fn execute_sharded_donating(&self, args: Vec<Vec<Buffer>>) -> Result<Vec<Vec<Buffer>>> {
        let refs: Vec<Vec<&Buffer>> = args.iter().map(|l| l.iter().collect()).collect();
        let out = self.execute_raw(&refs, |_| true)?;
        drop(args);
        Ok(out)
    }

    fn execute_raw(
        &self,
        args: &[Vec<&Buffer>],
        donated: impl Fn(usize) -> bool,
    ) -> Result<Vec<Vec<Buffer>>> {
        let num_devices = args.len();
        if num_devices == 0 {
            return Err(Error::InvalidArgument(
                "execute needs at least one argument list".into(),
            ));
        }
        if num_devices != self.inner.devices.len() {
            return Err(Error::InvalidArgument(format!(
                "executable {:?} runs on {} devices but {num_devices} argument lists were given",
                self.name().unwrap_or_default(),
                self.inner.devices.len()
            )));
        }
        let num_args = args[0].len();
        if let Some((i, l)) = args.iter().enumerate().find(|(_, l)| l.len() != num_args) {
            return Err(Error::InvalidArgument(format!(
                "argument list {i} has {} buffers but list 0 has {num_args}",
                l.len()
            )));
        }
        for b in args.iter().flatten() {
            if !Arc::ptr_eq(&b.client.inner, &self.inner.client.inner) {
                return Err(Error::InvalidArgument(
                    "an argument buffer belongs to another client".into(),
                ));
            }
        }
        let raw_lists: Vec<Vec<Ptr>> = args
            .iter()
            .map(|l| l.iter().map(|b| b.raw).collect())
            .collect();
        let list_ptrs: Vec<*const Ptr> = raw_lists.iter().map(|l| l.as_ptr()).collect();
        let n_out = self.inner.num_outputs;
        let mut outputs: Vec<Vec<Ptr>> = vec![vec![std::ptr::null_mut(); n_out]; num_devices];
        let out_ptrs: Vec<*mut Ptr> = outputs.iter_mut().map(|l| l.as_mut_ptr()).collect();
        let mut events: Vec<Ptr> = vec![std::ptr::null_mut(); num_devices];
        let non_donatable: Vec<i64> = (0..num_args)
            .filter(|&i| !donated(i))
            .map(|i| i as i64)
            .collect();
        let mut opts = sys::ExecuteOptions::new();
        opts.non_donatable_input_indices = non_donatable.as_ptr();
        opts.num_non_donatable_input_indices = non_donatable.len();
        let mut a = sys::ExecuteArgs::new();
        a.executable = self.inner.raw;
        a.options = &opts;
        a.argument_lists = list_ptrs.as_ptr();
        a.num_devices = num_devices;
        a.num_args = num_args;
        a.output_lists = out_ptrs.as_ptr();
        a.device_complete_events = events.as_mut_ptr();
        // SAFETY: slot 55 takes PJRT_LoadedExecutable_Execute_Args; every array outlives the call
        // and has the sizes given (num_devices lists of num_args inputs / num_outputs outputs).
        let result = unsafe {
            self.plugin().call(
                slot::LOADED_EXECUTABLE_EXECUTE,
                "PJRT_LoadedExecutable_Execute",
                &mut a,
            )
        };
        // Take ownership of whatever the plugin produced, even on error, so nothing leaks.
        let client = &self.inner.client;
        let buffers: Vec<Vec<Buffer>> = outputs
            .iter()
            .map(|l| {
                l.iter()
                    .filter(|p| !p.is_null())
                    .map(|&p| Buffer::from_raw(client, p))
                    .collect()
            })
            .collect();
        let mut first_err = result.err();
        for &ev in &events {
            if let Err(e) = self
                .plugin()
                .await_event(ev, "PJRT_LoadedExecutable_Execute")
            {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if buffers.iter().any(|l| l.len() != n_out) {
            return Err(Error::Pjrt {
                code: ErrorCode::Internal,
                function: "PJRT_LoadedExecutable_Execute",
                message: format!("expected {n_out} outputs per device, some were missing"),
            });
        }
        Ok(buffers)
    }
}
