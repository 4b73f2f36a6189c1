//! PJRT clients and devices.

use std::sync::Arc;

use crate::buffer::Buffer;
use crate::dtype::{ElementType, NativeType, RuntimeCodes};
use crate::error::{Error, ErrorCode, Result};
use crate::executable::LoadedExecutable;
use crate::ffi::FfiHandlerFn;
use crate::options::{CompileOptions, Program};
use crate::plugin::{copy_string, NamedValue, Plugin, RawNamedValues};
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
}

// SAFETY: PJRT clients are thread-safe by contract of the PJRT C API.
unsafe impl Send for ClientInner {}
// SAFETY: see `Send`.
unsafe impl Sync for ClientInner {}

impl Drop for ClientInner {
    fn drop(&mut self) {
        let mut a = sys::ClientDestroyArgs::new();
        a.client = self.raw;
        // SAFETY: the client is live and destroyed exactly once; every buffer/executable holds a
        // clone of the `Arc`, so none outlives it.
        let _ = unsafe {
            self.plugin
                .call(slot::CLIENT_DESTROY, "PJRT_Client_Destroy", &mut a)
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
    id: i32,
    kind: String,
    process_index: i32,
    is_addressable: bool,
    local_hardware_id: i32,
    debug_string: String,
}

// SAFETY: a `PJRT_Device*` is an immutable handle owned by the client, usable from any thread.
unsafe impl Send for Device {}
// SAFETY: see `Send`.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("process_index", &self.process_index)
            .field("is_addressable", &self.is_addressable)
            .field("local_hardware_id", &self.local_hardware_id)
            .field("debug_string", &self.debug_string)
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
        self.id
    }
    /// The device kind, e.g. `"cpu"`.
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// The index of the process that owns the device.
    pub fn process_index(&self) -> i32 {
        self.process_index
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
        &self.debug_string
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
        let desc = d.description;
        let int = |s: usize, name: &'static str, handle: Ptr| -> Result<i32> {
            let mut a = sys::HandleIntArgs::new();
            a.handle = handle;
            // SAFETY: the slot takes a (handle, int out) args struct of this layout.
            unsafe { plugin.call(s, name, &mut a) }?;
            Ok(a.value)
        };
        let string = |s: usize, name: &'static str| -> Result<String> {
            let mut a = sys::HandleStringArgs::new();
            a.handle = desc;
            // SAFETY: the slot takes a (description, string out) args struct of this layout; the
            // string is owned by the description.
            unsafe { plugin.call(s, name, &mut a) }?;
            // SAFETY: valid for value_size bytes while the client lives.
            Ok(unsafe { copy_string(a.value, a.value_size) })
        };
        let id = int(
            slot::DEVICE_DESCRIPTION_ID,
            "PJRT_DeviceDescription_Id",
            desc,
        )?;
        let process_index = int(
            slot::DEVICE_DESCRIPTION_PROCESS_INDEX,
            "PJRT_DeviceDescription_ProcessIndex",
            desc,
        )?;
        let kind = string(slot::DEVICE_DESCRIPTION_KIND, "PJRT_DeviceDescription_Kind")?;
        let debug_string = string(
            slot::DEVICE_DESCRIPTION_DEBUG_STRING,
            "PJRT_DeviceDescription_DebugString",
        )?;
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
            int(
                slot::DEVICE_LOCAL_HARDWARE_ID,
                "PJRT_Device_LocalHardwareId",
                raw,
            )?
        } else {
            -1
        };
        Ok(Device {
            raw,
            client: client.clone(),
            id,
            kind,
            process_index,
            is_addressable,
            local_hardware_id,
            debug_string,
        })
    }
}

impl Client {
    /// Creates a client with plugin-specific create options, e.g.
    /// `[("cpu_device_count", NamedValue::I64(8))]` for the CPU plugin.
    pub fn new(plugin: &Plugin, options: &[(&str, NamedValue)]) -> Result<Client> {
        let values = RawNamedValues::new(options);
        let mut a = sys::ClientCreateArgs::new();
        a.create_options = values.raw.as_ptr();
        a.num_options = values.raw.len();
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
        let mut a = sys::ClientStringArgs::new();
        a.client = self.inner.raw;
        // SAFETY: the slot takes a (client, string out) args struct of this layout.
        unsafe { self.inner.plugin.call(s, name, &mut a) }?;
        // SAFETY: the string is owned by the client and valid for value_size bytes.
        Ok(unsafe { copy_string(a.value, a.value_size) })
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
    /// [`CompileOptions::validate`]).
    pub fn compile(
        &self,
        program: Program<'_>,
        options: &CompileOptions,
    ) -> Result<LoadedExecutable> {
        let devices = self.devices()?;
        options.validate(devices.len())?;
        options.validate_for_program(&program)?;
        if let Some(da) = &options.device_assignment {
            for id in da.iter().flatten() {
                if !devices.iter().any(|d| i64::from(d.id()) == *id) {
                    return Err(Error::InvalidOptions(format!(
                        "device_assignment names device id {id}, which this client does not have (ids: {:?})",
                        devices.iter().map(|d| d.id()).collect::<Vec<_>>()
                    )));
                }
            }
        }
        let encoded = options.encode();
        let (code, format): (&[u8], &str) = match program {
            Program::Hlo(bytes) => (bytes, "hlo"),
            Program::Mlir(text) => (text.as_bytes(), "mlir"),
        };
        if code.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot compile an empty program".into(),
            ));
        }
        let mut p = sys::Program::new();
        p.code = code.as_ptr() as *mut u8;
        p.code_size = code.len();
        p.format = format.as_ptr();
        p.format_size = format.len();
        let mut a = sys::ClientCompileArgs::new();
        a.client = self.inner.raw;
        a.program = &p;
        a.compile_options = encoded.as_ptr();
        a.compile_options_size = encoded.len();
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
