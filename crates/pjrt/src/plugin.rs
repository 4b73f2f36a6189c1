//! Loading a PJRT plugin and calling into its function table.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, ErrorCode, Result};
use crate::ffi::FfiHandlerFn;
use crate::sys::{self, slot, Ptr};

/// A value in a PJRT name/value list (plugin attributes, client create options).
#[derive(Debug, Clone, PartialEq)]
pub enum NamedValue {
    /// A string.
    Str(String),
    /// A 64-bit integer.
    I64(i64),
    /// A list of 64-bit integers.
    I64List(Vec<i64>),
    /// A 32-bit float.
    F32(f32),
    /// A boolean.
    Bool(bool),
}

/// A loaded PJRT plugin (a `GetPjrtApi` function table).
///
/// Cheap to clone. A given path is loaded once per process and never unloaded (plugins keep
/// process-global state such as the FFI handler registry).
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

pub(crate) struct PluginInner {
    path: PathBuf,
    _lib: libloading::Library,
    api: *const sys::ApiHeader,
    api_struct_size: usize,
    version: (i32, i32),
    /// Registered FFI handlers: (target, canonical platform) -> handler address.
    ffi_registry: Mutex<HashMap<(String, String), usize>>,
}

// SAFETY: the PJRT API table is immutable after `GetPjrtApi` and its functions are thread-safe
// (PJRT requires plugins to support concurrent calls); the registry is behind a mutex.
unsafe impl Send for PluginInner {}
// SAFETY: see `Send`.
unsafe impl Sync for PluginInner {}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.inner.path)
            .field("api_version", &self.inner.version)
            .finish()
    }
}

fn loaded_plugins() -> &'static Mutex<HashMap<PathBuf, Plugin>> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Plugin>>> = OnceLock::new();
    LOADED.get_or_init(|| Mutex::new(HashMap::new()))
}

impl Plugin {
    /// Opens the plugin shared library at `path`, calls `GetPjrtApi` and `PJRT_Plugin_Initialize`.
    ///
    /// Loading the same path again returns the already-loaded plugin. Fails with
    /// [`Error::Load`] if the file is missing or is not a PJRT plugin, and with
    /// [`Error::Version`] if its function table lacks functions this crate calls.
    pub fn load(path: impl AsRef<Path>) -> Result<Plugin> {
        let path = path.as_ref();
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::Load {
            path: path.to_path_buf(),
            message: format!("the plugin file cannot be found or read ({e})"),
        })?;
        let mut loaded = loaded_plugins().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = loaded.get(&canonical) {
            return Ok(p.clone());
        }
        let plugin = Self::load_uncached(&canonical)?;
        loaded.insert(canonical, plugin.clone());
        Ok(plugin)
    }

    fn load_uncached(path: &Path) -> Result<Plugin> {
        let load_err = |message: String| Error::Load {
            path: path.to_path_buf(),
            message,
        };
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("libtpu"))
        {
            // libtpu reads its environment while it initialises; refuse to load it into an
            // environment that would make it hang (see `crate::tpu::set_environment`).
            crate::tpu::check_environment()?;
        }
        // SAFETY: loading a shared library runs its initialisers; PJRT plugins are ordinary
        // shared libraries whose initialisers only set up their own state.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| load_err(format!("dlopen failed: {e}")))?;
        type GetApi = unsafe extern "C" fn() -> *const sys::ApiHeader;
        // SAFETY: `GetPjrtApi` has this signature in every PJRT plugin.
        let get_api: libloading::Symbol<'_, GetApi> = unsafe { lib.get(b"GetPjrtApi\0") }
            .map_err(|e| load_err(format!("no GetPjrtApi symbol, not a PJRT plugin ({e})")))?;
        // SAFETY: calling the plugin's entry point, which takes no arguments.
        let api = unsafe { get_api() };
        if api.is_null() {
            return Err(load_err("GetPjrtApi returned null".into()));
        }
        // SAFETY: `api` is non-null and points to a `PJRT_Api`, which starts with this header.
        let header = unsafe { *api };
        let version = (
            header.pjrt_api_version.major_version,
            header.pjrt_api_version.minor_version,
        );
        let api_struct_size = header.struct_size;
        let slots = api_struct_size.saturating_sub(sys::API_TABLE_OFFSET) / 8;
        let need = slot::REQUIRED_MAX + 1;
        if version.0 != 0 || slots < need {
            return Err(Error::Version {
                path: path.to_path_buf(),
                major: version.0,
                minor: version.1,
                slots,
                message: format!(
                    "this crate needs API major version 0 with at least {need} function slots"
                ),
            });
        }
        let plugin = Plugin {
            inner: Arc::new(PluginInner {
                path: path.to_path_buf(),
                _lib: lib,
                api,
                api_struct_size,
                version,
                ffi_registry: Mutex::new(HashMap::new()),
            }),
        };
        let mut args = sys::PluginInitializeArgs::new();
        // SAFETY: slot 3 is PJRT_Plugin_Initialize, taking PJRT_Plugin_Initialize_Args.
        unsafe { plugin.call(slot::PLUGIN_INITIALIZE, "PJRT_Plugin_Initialize", &mut args) }?;
        Ok(plugin)
    }

    /// The path the plugin was loaded from (canonicalised).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The plugin's PJRT C API version `(major, minor)`, e.g. `(0, 115)`.
    pub fn api_version(&self) -> (i32, i32) {
        self.inner.version
    }

    /// Number of function slots in the plugin's `PJRT_Api`.
    pub fn num_slots(&self) -> usize {
        (self.inner.api_struct_size - sys::API_TABLE_OFFSET) / 8
    }

    /// The function pointer in `slot`, or an error if the plugin's table is too short or the slot
    /// is null.
    pub(crate) fn fn_at(&self, slot: usize, name: &'static str) -> Result<sys::PjrtFn> {
        if sys::API_TABLE_OFFSET + 8 * slot + 8 > self.inner.api_struct_size {
            return Err(Error::Pjrt {
                code: ErrorCode::Unimplemented,
                function: name,
                message: format!("the plugin's API table has no slot {slot}"),
            });
        }
        // SAFETY: the slot lies within `struct_size` bytes of the API table (checked above).
        let raw = unsafe {
            *((self.inner.api as *const u8).add(sys::API_TABLE_OFFSET + 8 * slot) as *const Ptr)
        };
        if raw.is_null() {
            return Err(Error::Pjrt {
                code: ErrorCode::Unimplemented,
                function: name,
                message: "the plugin leaves this function null".into(),
            });
        }
        // SAFETY: every PJRT API slot holds a function `PJRT_Error* f(Args*)`.
        Ok(unsafe { std::mem::transmute::<Ptr, sys::PjrtFn>(raw) })
    }

    /// Calls the PJRT function in `slot` with `args` and converts a returned `PJRT_Error`.
    ///
    /// # Safety
    /// `A` must be the `*_Args` struct that the function in `slot` expects, with valid pointers.
    pub(crate) unsafe fn call<A>(
        &self,
        slot: usize,
        name: &'static str,
        args: &mut A,
    ) -> Result<()> {
        let f = self.fn_at(slot, name)?;
        // SAFETY: guaranteed by the caller.
        let err = unsafe { f(args as *mut A as *mut c_void) };
        if err.is_null() {
            Ok(())
        } else {
            Err(self.take_error(err, name))
        }
    }

    /// Reads code and message of a `PJRT_Error` and destroys it.
    fn take_error(&self, err: Ptr, function: &'static str) -> Error {
        let mut code_args = sys::ErrorGetCodeArgs::new();
        code_args.error = err;
        let code = match self.fn_at(slot::ERROR_GET_CODE, "PJRT_Error_GetCode") {
            // SAFETY: `err` is a live PJRT_Error; the args struct matches the slot.
            Ok(f) => match unsafe { f(&mut code_args as *mut _ as *mut c_void) } {
                e if e.is_null() => ErrorCode::from_code(code_args.code),
                _ => ErrorCode::Unknown,
            },
            Err(_) => ErrorCode::Unknown,
        };
        let mut msg_args = sys::ErrorMessageArgs::new();
        msg_args.error = err;
        let message = match self.fn_at(slot::ERROR_MESSAGE, "PJRT_Error_Message") {
            Ok(f) => {
                // SAFETY: PJRT_Error_Message fills message/message_size (owned by the error).
                unsafe { f(&mut msg_args as *mut _ as *mut c_void) };
                // SAFETY: the message is valid until the error is destroyed (below).
                unsafe { copy_string(msg_args.message, msg_args.message_size) }
            }
            Err(_) => "(no message)".into(),
        };
        if let Ok(f) = self.fn_at(slot::ERROR_DESTROY, "PJRT_Error_Destroy") {
            let mut d = sys::ErrorDestroyArgs::new();
            d.error = err;
            // SAFETY: destroys the error exactly once; nothing refers to it afterwards.
            unsafe { f(&mut d as *mut _ as *mut c_void) };
        }
        Error::Pjrt {
            code,
            function,
            message,
        }
    }

    /// Awaits and destroys a PJRT event (null is a no-op).
    pub(crate) fn await_event(&self, event: Ptr, function: &'static str) -> Result<()> {
        if event.is_null() {
            return Ok(());
        }
        let mut a = sys::EventArgs::new();
        a.event = event;
        // SAFETY: `event` is a live PJRT_Event owned by us.
        let awaited = unsafe { self.call(slot::EVENT_AWAIT, "PJRT_Event_Await", &mut a) };
        let mut d = sys::EventArgs::new();
        d.event = event;
        // SAFETY: destroys the event exactly once.
        let _ = unsafe { self.call(slot::EVENT_DESTROY, "PJRT_Event_Destroy", &mut d) };
        awaited.map_err(|e| match e {
            Error::Pjrt { code, message, .. } => Error::Pjrt {
                code,
                function,
                message,
            },
            other => other,
        })
    }

    /// The plugin's attributes (`PJRT_Plugin_Attributes`), e.g. `xla_version`,
    /// `stablehlo_current_version`.
    pub fn attributes(&self) -> Result<Vec<(String, NamedValue)>> {
        let mut a = sys::PluginAttributesArgs::new();
        // SAFETY: slot 4 takes PJRT_Plugin_Attributes_Args.
        unsafe { self.call(slot::PLUGIN_ATTRIBUTES, "PJRT_Plugin_Attributes", &mut a) }?;
        // SAFETY: the plugin returned an array of `num_attributes` named values that live as long
        // as the plugin.
        Ok(unsafe { read_named_values(a.attributes, a.num_attributes) })
    }

    /// Calls the one-handle function in `slot` with an args struct of layout `A` built for
    /// `handle`, and returns the struct the plugin filled in.
    ///
    /// # Safety
    /// The function in `slot` must take an args struct of layout `A`, and `handle` must be a
    /// live object of this plugin of the kind that function expects.
    pub(crate) unsafe fn query<A: sys::HandleQuery>(
        &self,
        slot: usize,
        name: &'static str,
        handle: Ptr,
    ) -> Result<A> {
        let mut a = A::for_handle(handle);
        // SAFETY: guaranteed by the caller.
        unsafe { self.call(slot, name, &mut a) }?;
        Ok(a)
    }

    /// Calls a PJRT query that takes a handle and returns a string it owns (`*_Name`,
    /// `*_PlatformName`, `PJRT_DeviceDescription_Kind`, ...) and copies the string.
    ///
    /// # Safety
    /// As for [`Plugin::query`] with the `HandleStringArgs` layout.
    pub(crate) unsafe fn query_string(
        &self,
        slot: usize,
        name: &'static str,
        handle: Ptr,
    ) -> Result<String> {
        // SAFETY: guaranteed by the caller.
        let a: sys::HandleStringArgs = unsafe { self.query(slot, name, handle) }?;
        // SAFETY: the string is owned by `handle`, alive during this call, and valid for
        // `value_size` bytes.
        Ok(unsafe { copy_string(a.value, a.value_size) })
    }

    /// Destroys `handle` with the plugin's destroy function in `slot` (`PJRT_Buffer_Destroy`,
    /// `PJRT_Client_Destroy`, ...). An error is dropped: a destructor has nobody to report it to.
    ///
    /// # Safety
    /// As for [`Plugin::query`] with the `HandleArgs` layout; `handle` must be owned by the
    /// caller and is invalid afterwards.
    pub(crate) unsafe fn destroy(&self, slot: usize, name: &'static str, handle: Ptr) {
        // SAFETY: guaranteed by the caller.
        let _ = unsafe { self.query::<sys::HandleArgs>(slot, name, handle) };
    }

    /// Calls a PJRT query that takes a handle and returns an `int` (`PJRT_DeviceDescription_Id`,
    /// `PJRT_Device_LocalHardwareId`, ...).
    ///
    /// # Safety
    /// As for [`Plugin::query`] with the `HandleIntArgs` layout.
    pub(crate) unsafe fn query_i32(
        &self,
        slot: usize,
        name: &'static str,
        handle: Ptr,
    ) -> Result<i32> {
        // SAFETY: guaranteed by the caller.
        Ok(unsafe { self.query::<sys::HandleIntArgs>(slot, name, handle) }?.value)
    }

    /// Calls a PJRT query that takes a handle and returns a `size_t` or a pointer
    /// (`PJRT_Executable_NumOutputs`, `PJRT_Buffer_Device`, ...).
    ///
    /// # Safety
    /// As for [`Plugin::query`] with the `HandleWordArgs` layout.
    pub(crate) unsafe fn query_word(
        &self,
        slot: usize,
        name: &'static str,
        handle: Ptr,
    ) -> Result<usize> {
        // SAFETY: guaranteed by the caller.
        Ok(unsafe { self.query::<sys::HandleWordArgs>(slot, name, handle) }?.value)
    }

    /// The extension type ids in the plugin's `PJRT_Api` extension chain (5 = FFI, 24 =
    /// XlaTransform, ...).
    pub fn extensions(&self) -> Vec<u32> {
        let mut out = Vec::new();
        // SAFETY: the API header is valid for the plugin's lifetime.
        let mut ext = unsafe { (*self.inner.api).extension_start };
        while !ext.is_null() && out.len() < 256 {
            // SAFETY: each extension starts with PJRT_Extension_Base and links to the next.
            let base = unsafe { *ext };
            out.push(base.ext_type);
            ext = base.next;
        }
        out
    }

    fn find_extension(&self, ty: u32) -> Option<*const sys::ExtensionBase> {
        // SAFETY: see `extensions`.
        let mut ext = unsafe { (*self.inner.api).extension_start };
        let mut n = 0;
        while !ext.is_null() && n < 256 {
            // SAFETY: see `extensions`.
            let base = unsafe { *ext };
            if base.ext_type == ty {
                return Some(ext);
            }
            ext = base.next;
            n += 1;
        }
        None
    }

    /// Registers an XLA FFI handler for custom-call `target` on `platform` (`"cpu"`/`"host"`,
    /// `"cuda"`, ...) through the plugin's FFI extension.
    ///
    /// `handler` must come from [`crate::ffi_handler!`], whose dispatcher answers XLA's
    /// registration-time metadata query; registration is refused otherwise, because XLA would
    /// silently drop the handler. Registration is process-global and permanent: registering the
    /// same `(target, platform)` again with the same handler is a no-op, with a different handler
    /// an error. A platform the plugin does not serve is not detected here; use
    /// [`crate::Client::register_ffi_handler`], which also compiles a probe module.
    pub fn register_ffi_handler(
        &self,
        target: &str,
        platform: &str,
        handler: FfiHandlerFn,
    ) -> Result<()> {
        if target.is_empty() || target.contains('\0') {
            return Err(Error::Ffi(format!(
                "invalid custom-call target name {target:?}"
            )));
        }
        if platform.is_empty() || platform.contains('\0') {
            return Err(Error::Ffi(format!("invalid platform name {platform:?}")));
        }
        let canonical = canonical_platform(platform);
        let key = (target.to_string(), canonical.clone());
        let addr = handler as usize;
        let mut registry = self
            .inner
            .ffi_registry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(&existing) = registry.get(&key) {
            return if existing == addr {
                Ok(())
            } else {
                Err(Error::Ffi(format!(
                    "custom-call target {target:?} is already registered on platform {canonical:?} with a \
                     different handler; XLA keeps the first registration for the life of the process"
                )))
            };
        }
        let ext = self
            .find_extension(sys::EXTENSION_TYPE_FFI)
            .ok_or_else(|| {
                Error::Ffi(format!(
                    "plugin {} has no FFI extension",
                    self.inner.path.display()
                ))
            })?;
        // SAFETY: an extension of type FFI is a PJRT_FFI_Extension.
        let ffi_ext = unsafe { *(ext as *const sys::FfiExtension) };
        if ffi_ext.struct_size < sys::FfiExtension::STRUCT_SIZE
            || ffi_ext.register_handler.is_null()
        {
            return Err(Error::Ffi(
                "the plugin's FFI extension has no register_handler".into(),
            ));
        }
        let mut args = sys::FfiRegisterHandlerArgs::new();
        args.target_name = target.as_ptr();
        args.target_name_size = target.len();
        args.handler = handler as *mut c_void;
        args.platform_name = platform.as_ptr();
        args.platform_name_size = platform.len();
        crate::ffi::reset_metadata_seen(addr);
        // SAFETY: register_handler has the PJRT function signature and takes these args; the
        // strings outlive the call (XLA copies them).
        let f: sys::PjrtFn =
            unsafe { std::mem::transmute::<Ptr, sys::PjrtFn>(ffi_ext.register_handler) };
        // SAFETY: see above.
        let err = unsafe { f(&mut args as *mut _ as *mut c_void) };
        if !err.is_null() {
            return Err(self.take_error(err, "PJRT_FFI_Register_Handler"));
        }
        if !crate::ffi::metadata_seen(addr) {
            return Err(Error::Ffi(format!(
                "registering {target:?} on {platform:?}: the handler did not answer XLA's metadata query, so \
                 XLA silently ignored it; define handlers with pjrt::ffi_handler!"
            )));
        }
        registry.insert(key, addr);
        Ok(())
    }
}

/// XLA canonicalises `cpu`/`host` (any case) to `host`; other platforms are lower-cased.
pub(crate) fn canonical_platform(platform: &str) -> String {
    let p = platform.to_ascii_lowercase();
    if p == "cpu" {
        "host".into()
    } else {
        p
    }
}

/// Copies a (pointer, length) string from the plugin.
///
/// # Safety
/// `ptr` must be valid for `len` bytes (or null).
pub(crate) unsafe fn copy_string(ptr: *const u8, len: usize) -> String {
    if ptr.is_null() || len == 0 {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// Copies `n` PJRT named values (plugin, device and topology attributes, cost analyses).
///
/// # Safety
/// `ptr` must point to `n` valid `PJRT_NamedValue`s whose pointers are live (or `n == 0`).
pub(crate) unsafe fn read_named_values(
    ptr: *const sys::NamedValueRaw,
    n: usize,
) -> Vec<(String, NamedValue)> {
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

/// Sets each of `vars` that is unset in the process environment, for a plugin that reads them
/// when it is loaded. Refuses (changing nothing) when the process already runs other threads:
/// `setenv` while another thread reads the environment is undefined behaviour, and plugins read
/// it from their own threads.
pub(crate) fn set_unset_env(vars: &[(&str, &str)], caller: &str) -> Result<()> {
    let missing: Vec<&(&str, &str)> = vars
        .iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if let Some(n) = other_threads() {
        return Err(Error::Environment(format!(
            "{caller} must run before any thread is started (at the top of main), but this process \
             already runs {n} other threads; set {} in the environment instead",
            missing
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        )));
    }
    for (k, v) in missing {
        std::env::set_var(k, v);
    }
    Ok(())
}

/// How many threads besides the calling one the process runs, where the system says (Linux:
/// `/proc/self/status`); `None` when it is only this one or cannot be told.
fn other_threads() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let n: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()?;
    (n > 1).then(|| n - 1)
}

/// Named values converted to the C layout, keeping the storage they point into alive.
pub(crate) struct RawNamedValues {
    pub(crate) raw: Vec<sys::NamedValueRaw>,
    _names: Vec<String>,
    _lists: Vec<Vec<i64>>,
    _strings: Vec<String>,
}

impl RawNamedValues {
    pub(crate) fn new(values: &[(&str, NamedValue)]) -> RawNamedValues {
        let names: Vec<String> = values.iter().map(|(n, _)| n.to_string()).collect();
        let mut lists = Vec::new();
        let mut strings = Vec::new();
        let mut raw = Vec::with_capacity(values.len());
        for ((_, v), name) in values.iter().zip(&names) {
            let mut nv = sys::NamedValueRaw::new();
            nv.name = name.as_ptr();
            nv.name_size = name.len();
            use sys::named_value_type as t;
            match v {
                NamedValue::Str(s) => {
                    strings.push(s.clone());
                    let s = strings.last().expect("just pushed");
                    nv.value_type = t::STRING;
                    nv.value = s.as_ptr() as usize as u64;
                    nv.value_size = s.len();
                }
                NamedValue::I64(i) => {
                    nv.value_type = t::INT64;
                    nv.value = *i as u64;
                    nv.value_size = 1;
                }
                NamedValue::I64List(l) => {
                    lists.push(l.clone());
                    let l = lists.last().expect("just pushed");
                    nv.value_type = t::INT64_LIST;
                    nv.value = l.as_ptr() as usize as u64;
                    nv.value_size = l.len();
                }
                NamedValue::F32(f) => {
                    nv.value_type = t::FLOAT;
                    nv.value = f.to_bits() as u64;
                    nv.value_size = 1;
                }
                NamedValue::Bool(b) => {
                    nv.value_type = t::BOOL;
                    nv.value = *b as u64;
                    nv.value_size = 1;
                }
            }
            raw.push(nv);
        }
        // Moving a Vec<String>/Vec<Vec<i64>> does not move the heap data the pointers refer to.
        RawNamedValues {
            raw,
            _names: names,
            _lists: lists,
            _strings: strings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_not_changed_while_other_threads_run() {
        let key = "PJRT_TEST_SET_UNSET_ENV";
        // A second thread that is alive while the variable would be set.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let result = set_unset_env(&[(key, "1")], "the test");
        match other_threads() {
            Some(_) => {
                let e = result.unwrap_err();
                assert!(matches!(e, Error::Environment(_)), "{e}");
                assert!(e.to_string().contains("PJRT_TEST_SET_UNSET_ENV=1"), "{e}");
                assert!(std::env::var_os(key).is_none());
            }
            // Systems that cannot count threads: set as asked.
            None => assert!(result.is_ok()),
        }
        drop(tx);
        let _ = other.join();
    }
}
