//! PJRT clients and devices.

use std::sync::Arc;

use crate::buffer::Buffer;
use crate::compile;
use crate::device::DeviceDescription;
use crate::dtype::{ElementType, NativeType, RuntimeCodes};
use crate::error::{Error, ErrorCode, Result};
use crate::executable::LoadedExecutable;
use crate::ffi::FfiHandlerFn;
use crate::options::{CompileOptions, Program};
use crate::plugin::{NamedValue, Plugin, RawNamedValues};
use crate::sys::{self, slot, Ptr};

/// A PJRT client: the entry point for devices, compilation and buffers.
///
/// Cheap to clone (an `Arc` inside); `Send + Sync`. The underlying `PJRT_Client` is destroyed when
/// the last clone and every object created from it (buffers, executables) are dropped.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    pub(crate) plugin: Plugin,
    pub(crate) raw: Ptr,
    /// The key-value store the plugin's callbacks reach (multi-process clients); dropped after
    /// the client is destroyed.
    _kv: Option<Box<crate::kv::KvState>>,
}

// SAFETY: PJRT clients are thread-safe by contract of the PJRT C API.
unsafe impl Send for ClientInner {}
// SAFETY: see `Send`.
unsafe impl Sync for ClientInner {}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // SAFETY: PJRT_Client_Destroy_Args has the handle layout; the client is live and
        // destroyed exactly once; every buffer/executable holds a clone of the `Arc`, so none
        // outlives it.
        unsafe {
            self.plugin
                .destroy(slot::CLIENT_DESTROY, "PJRT_Client_Destroy", self.raw)
        };
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("plugin", &self.inner.plugin.path())
            .finish()
    }
}

/// A device of a client, with its description read once when listed.
#[derive(Clone)]
pub struct Device {
    pub(crate) raw: Ptr,
    pub(crate) client: Client,
    description: DeviceDescription,
    is_addressable: bool,
    local_hardware_id: i32,
}

// SAFETY: a `PJRT_Device*` is an immutable handle owned by the client, usable from any thread.
unsafe impl Send for Device {}
// SAFETY: see `Send`.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.description.id)
            .field("kind", &self.description.kind)
            .field("process_index", &self.description.process_index)
            .field("is_addressable", &self.is_addressable)
            .field("local_hardware_id", &self.local_hardware_id)
            .field("debug_string", &self.description.debug_string)
            .finish()
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl Device {
    /// The global device id.
    pub fn id(&self) -> i32 {
        self.description.id
    }
    /// The device kind, e.g. `"cpu"`.
    pub fn kind(&self) -> &str {
        &self.description.kind
    }
    /// The index of the process that owns the device.
    pub fn process_index(&self) -> i32 {
        self.description.process_index
    }
    /// Whether this process can place buffers on the device.
    pub fn is_addressable(&self) -> bool {
        self.is_addressable
    }
    /// The local hardware id (-1 when not addressable).
    pub fn local_hardware_id(&self) -> i32 {
        self.local_hardware_id
    }
    /// The plugin's debug string, e.g. `"cpu:0"`.
    pub fn debug_string(&self) -> &str {
        &self.description.debug_string
    }
    /// The whole description, with the plugin's device attributes.
    pub fn description(&self) -> &DeviceDescription {
        &self.description
    }

    pub(crate) fn from_raw(client: &Client, raw: Ptr) -> Result<Device> {
        let plugin = &client.inner.plugin;
        let mut d = sys::DeviceGetDescriptionArgs::new();
        d.device = raw;
        // SAFETY: `raw` is a live PJRT_Device of this client.
        unsafe {
            plugin.call(
                slot::DEVICE_GET_DESCRIPTION,
                "PJRT_Device_GetDescription",
                &mut d,
            )
        }?;
        // SAFETY: the description is owned by the device, which the client keeps alive.
        let description = unsafe { DeviceDescription::read(plugin, d.description) }?;
        let mut a = sys::DeviceIsAddressableArgs::new();
        a.device = raw;
        // SAFETY: slot 30 takes PJRT_Device_IsAddressable_Args.
        unsafe {
            plugin.call(
                slot::DEVICE_IS_ADDRESSABLE,
                "PJRT_Device_IsAddressable",
                &mut a,
            )
        }?;
        let is_addressable = a.is_addressable;
        let local_hardware_id = if is_addressable {
            // SAFETY: slot 31 takes (device, int out) args; `raw` is a live device.
            unsafe {
                plugin.query_i32(
                    slot::DEVICE_LOCAL_HARDWARE_ID,
                    "PJRT_Device_LocalHardwareId",
                    raw,
                )
            }?
        } else {
            -1
        };
        Ok(Device {
            raw,
            client: client.clone(),
            description,
            is_addressable,
            local_hardware_id,
        })
    }
}

impl Client {
    /// Creates a client with plugin-specific create options, e.g.
    /// `[("cpu_device_count", NamedValue::I64(8))]` for the CPU plugin.
    pub fn new(plugin: &Plugin, options: &[(&str, NamedValue)]) -> Result<Client> {
        Client::create(plugin, options, None)
    }

    /// Creates a client of a multi-process run: the plugin reaches `store` through the
    /// `kv_get` / `kv_put` / `kv_try_get` callbacks of `PJRT_Client_Create` (the TPU and GPU
    /// plugins exchange topology there; pass `node_id` / `num_nodes` in `options` as JAX does).
    /// The store lives as long as the client.
    pub fn new_with_kv(
        plugin: &Plugin,
        options: &[(&str, NamedValue)],
        store: Arc<dyn crate::kv::KeyValueStore>,
    ) -> Result<Client> {
        Client::create(plugin, options, Some(store))
    }

    fn create(
        plugin: &Plugin,
        options: &[(&str, NamedValue)],
        store: Option<Arc<dyn crate::kv::KeyValueStore>>,
    ) -> Result<Client> {
        let values = RawNamedValues::new(options);
        let mut a = sys::ClientCreateArgs::new();
        a.create_options = values.raw.as_ptr();
        a.num_options = values.raw.len();
        // Boxed, so its address (the callbacks' user_arg) stays put when the box moves.
        let kv = store.map(|store| Box::new(crate::kv::KvState { store }));
        if let Some(k) = &kv {
            k.install(&mut a);
        }
        // SAFETY: slot 10 takes PJRT_Client_Create_Args; the options outlive the call.
        unsafe { plugin.call(slot::CLIENT_CREATE, "PJRT_Client_Create", &mut a) }?;
        if a.client.is_null() {
            return Err(Error::Pjrt {
                code: ErrorCode::Internal,
                function: "PJRT_Client_Create",
                message: "the plugin returned no client".into(),
            });
        }
        Ok(Client {
            inner: Arc::new(ClientInner {
                plugin: plugin.clone(),
                raw: a.client,
                _kv: kv,
            }),
        })
    }

    /// A client of the CPU plugin (installed and loaded by [`crate::cpu_plugin`]) with default
    /// options (4 devices).
    pub fn cpu() -> Result<Client> {
        Client::new(&crate::cpu_plugin()?, &[])
    }

    /// The plugin this client was created from.
    pub fn plugin(&self) -> &Plugin {
        &self.inner.plugin
    }

    fn string_query(&self, s: usize, name: &'static str) -> Result<String> {
        // SAFETY: the slot takes a (client, string out) args struct of the handle-string layout,
        // and the client is live.
        unsafe { self.inner.plugin.query_string(s, name, self.inner.raw) }
    }

    /// The platform name, e.g. `"cpu"`.
    pub fn platform_name(&self) -> Result<String> {
        self.string_query(slot::CLIENT_PLATFORM_NAME, "PJRT_Client_PlatformName")
    }

    /// The platform version string.
    pub fn platform_version(&self) -> Result<String> {
        self.string_query(slot::CLIENT_PLATFORM_VERSION, "PJRT_Client_PlatformVersion")
    }

    /// This process's index among the processes of the (possibly multi-host) client.
    pub fn process_index(&self) -> Result<i32> {
        let mut a = sys::ClientProcessIndexArgs::new();
        a.client = self.inner.raw;
        // SAFETY: slot 13 takes PJRT_Client_ProcessIndex_Args.
        unsafe {
            self.inner.plugin.call(
                slot::CLIENT_PROCESS_INDEX,
                "PJRT_Client_ProcessIndex",
                &mut a,
            )
        }?;
        Ok(a.process_index)
    }

    pub(crate) fn device_list(
        &self,
        s: usize,
        name: &'static str,
        owner: Ptr,
    ) -> Result<Vec<Device>> {
        let mut a = sys::DeviceListArgs::new();
        a.owner = owner;
        // SAFETY: the slot takes a (owner, device array out) args struct of this layout.
        unsafe { self.inner.plugin.call(s, name, &mut a) }?;
        let raws: Vec<Ptr> = if a.num_devices == 0 || a.devices.is_null() {
            Vec::new()
        } else {
            // SAFETY: the plugin returned an array of num_devices device pointers that it owns.
            unsafe { std::slice::from_raw_parts(a.devices, a.num_devices) }.to_vec()
        };
        raws.into_iter()
            .map(|d| Device::from_raw(self, d))
            .collect()
    }

    /// All devices (addressable or not).
    pub fn devices(&self) -> Result<Vec<Device>> {
        self.device_list(slot::CLIENT_DEVICES, "PJRT_Client_Devices", self.inner.raw)
    }

    /// The devices this process can use.
    pub fn addressable_devices(&self) -> Result<Vec<Device>> {
        self.device_list(
            slot::CLIENT_ADDRESSABLE_DEVICES,
            "PJRT_Client_AddressableDevices",
            self.inner.raw,
        )
    }

    /// Compiles `program` with `options` after validating the options against this client's
    /// devices (refusing every combination known to abort the plugin, see
    /// [`CompileOptions::validate`]). On the CPU plugin the options get
    /// [`CompileOptions::with_cpu_defaults`] (LLVM level
    /// [`crate::options::CPU_BACKEND_OPTIMIZATION_LEVEL`] unless the caller or `XLA_FLAGS` sets one).
    pub fn compile(
        &self,
        program: Program<'_>,
        options: &CompileOptions,
    ) -> Result<LoadedExecutable> {
        let ids: Vec<i32> = self.devices()?.iter().map(Device::id).collect();
        let cpu_options;
        let options = if self.platform_name()? == "cpu" {
            let flags = std::env::var("XLA_FLAGS").ok();
            cpu_options = options.with_cpu_defaults(flags.as_deref());
            &cpu_options
        } else {
            options
        };
        let prepared = compile::prepare(program, options, &ids, "this client", None)?;
        let p = prepared.program();
        let mut a = sys::ClientCompileArgs::new();
        a.client = self.inner.raw;
        a.program = &p;
        a.compile_options = prepared.options.as_ptr();
        a.compile_options_size = prepared.options.len();
        // SAFETY: slot 20 takes PJRT_Client_Compile_Args; the program and options outlive the
        // call and the plugin does not write to `code`.
        unsafe {
            self.inner
                .plugin
                .call(slot::CLIENT_COMPILE, "PJRT_Client_Compile", &mut a)
        }?;
        LoadedExecutable::from_raw(self, a.executable)
    }

    /// Loads an executable produced by [`LoadedExecutable::serialize`] (on the same plugin
    /// version and machine type; CPU executables are specific to the host CPU's features).
    pub fn deserialize_executable(&self, bytes: &[u8]) -> Result<LoadedExecutable> {
        if bytes.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot deserialize an empty executable".into(),
            ));
        }
        let mut a = sys::ExecutableDeserializeArgs::new();
        a.client = self.inner.raw;
        a.serialized_executable = bytes.as_ptr();
        a.serialized_executable_size = bytes.len();
        // SAFETY: slot 56 takes PJRT_Executable_DeserializeAndLoad_Args; bytes outlive the call.
        unsafe {
            self.inner.plugin.call(
                slot::EXECUTABLE_DESERIALIZE_AND_LOAD,
                "PJRT_Executable_DeserializeAndLoad",
                &mut a,
            )
        }?;
        LoadedExecutable::from_raw(self, a.loaded_executable)
    }

    /// Copies `data` (row-major, shape `dims`) to a new device buffer on `device` (default: the
    /// first addressable device).
    pub fn buffer_from_host<T: NativeType>(
        &self,
        data: &[T],
        dims: &[i64],
        device: Option<&Device>,
    ) -> Result<Buffer> {
        // SAFETY: `T: NativeType` types are plain-old-data of `T::TYPE.byte_size()` bytes each
        // (bool is one byte holding 0 or 1), so viewing them as bytes is valid.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data))
        };
        self.buffer_from_bytes(bytes, T::TYPE, dims, device)
    }

    /// Copies raw little-endian element bytes (row-major, shape `dims`) to a new device buffer.
    pub fn buffer_from_bytes(
        &self,
        bytes: &[u8],
        ty: ElementType,
        dims: &[i64],
        device: Option<&Device>,
    ) -> Result<Buffer> {
        let count = element_count(dims)?;
        let expected = count
            .checked_mul(ty.byte_size())
            .ok_or_else(|| Error::Shape(format!("{ty}{dims:?} is too large")))?;
        if bytes.len() != expected {
            return Err(Error::Shape(format!(
                "buffer_from_bytes: {ty}{dims:?} needs {expected} bytes ({count} elements), got {} bytes",
                bytes.len()
            )));
        }
        let device = match device {
            Some(d) => {
                if !Arc::ptr_eq(&d.client.inner, &self.inner) {
                    return Err(Error::InvalidArgument(format!(
                        "device {} belongs to another client",
                        d.id()
                    )));
                }
                d.raw
            }
            None => self.default_device_raw()?,
        };
        let mut a = sys::BufferFromHostArgs::new();
        a.client = self.inner.raw;
        // A zero-sized host slice may have a dangling pointer; give the plugin a real one.
        let one = 0u64;
        a.data = if bytes.is_empty() {
            &one as *const u64 as *const _
        } else {
            bytes.as_ptr() as *const _
        };
        a.element_type = ty.pjrt_code();
        a.dims = dims.as_ptr();
        a.num_dims = dims.len();
        a.host_buffer_semantics = 0; // kImmutableOnlyDuringCall
        a.device = device;
        // SAFETY: slot 22 takes PJRT_Client_BufferFromHostBuffer_Args; data and dims outlive the
        // call and the done event is awaited before returning.
        unsafe {
            self.inner.plugin.call(
                slot::CLIENT_BUFFER_FROM_HOST,
                "PJRT_Client_BufferFromHostBuffer",
                &mut a,
            )
        }?;
        let buffer = Buffer::from_raw(self, a.buffer);
        self.inner
            .plugin
            .await_event(a.done_with_host_buffer, "PJRT_Client_BufferFromHostBuffer")?;
        Ok(buffer)
    }

    pub(crate) fn default_device_raw(&self) -> Result<Ptr> {
        let mut a = sys::DeviceListArgs::new();
        a.owner = self.inner.raw;
        // SAFETY: slot 16 takes PJRT_Client_AddressableDevices_Args.
        unsafe {
            self.inner.plugin.call(
                slot::CLIENT_ADDRESSABLE_DEVICES,
                "PJRT_Client_AddressableDevices",
                &mut a,
            )
        }?;
        if a.num_devices == 0 || a.devices.is_null() {
            return Err(Error::InvalidArgument(
                "the client has no addressable devices".into(),
            ));
        }
        // SAFETY: the array has at least one element.
        Ok(unsafe { *a.devices })
    }

    /// Registers an FFI handler for `target` on this client's platform, then compiles a tiny probe
    /// module that calls `target` to prove XLA can find it (a handler XLA dropped silently would
    /// fail here with NOT_FOUND). See [`Plugin::register_ffi_handler`].
    pub fn register_ffi_handler(&self, target: &str, handler: FfiHandlerFn) -> Result<()> {
        let platform = self.platform_name()?;
        self.inner
            .plugin
            .register_ffi_handler(target, &platform, handler)?;
        self.check_ffi_target(target)
    }

    /// Compiles (does not run) a module with a typed-FFI custom call to `target`; a NOT_FOUND
    /// compile error means no handler is registered for this client's platform.
    pub fn check_ffi_target(&self, target: &str) -> Result<()> {
        if !target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            || target.is_empty()
        {
            // The probe spells the target as a symbol; other names cannot be probed this way.
            return Ok(());
        }
        let module = format!(
            "module @ffi_probe {{\n  func.func public @main(%arg0: tensor<f32>) -> tensor<f32> {{\n    \
             %0 = stablehlo.custom_call @{target}(%arg0) {{api_version = 4 : i32}} : (tensor<f32>) -> tensor<f32>\n    \
             return %0 : tensor<f32>\n  }}\n}}\n"
        );
        match self.compile(Program::Mlir(&module), &CompileOptions::default()) {
            Ok(_) => Ok(()),
            Err(Error::Pjrt { code: ErrorCode::NotFound, message, .. }) => Err(Error::Ffi(format!(
                "custom-call target {target:?} is not usable on platform {:?} after registration: {message}",
                self.platform_name().unwrap_or_default()
            ))),
            // Other compile errors (e.g. a dialect mismatch) say nothing about registration.
            Err(_) => Ok(()),
        }
    }
}

/// Number of elements of a shape, refusing negative dimensions and overflow.
pub(crate) fn element_count(dims: &[i64]) -> Result<usize> {
    let mut n: usize = 1;
    for &d in dims {
        let d = usize::try_from(d)
            .map_err(|_| Error::Shape(format!("negative dimension in {dims:?}")))?;
        n = n
            .checked_mul(d)
            .ok_or_else(|| Error::Shape(format!("shape {dims:?} overflows")))?;
    }
    Ok(n)
}
