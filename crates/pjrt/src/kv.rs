//! The key-value store a multi-process client shares: the `kv_get` / `kv_put` / `kv_try_get`
//! callbacks of `PJRT_Client_Create`.
//!
//! The TPU and GPU plugins call them while the client is created (and may later) to exchange
//! each process's topology; the CPU plugin never calls them. The caller supplies the store (for
//! `rattn`, a TCP store served by process 0) as a [`KeyValueStore`]; [`Client::new_with_kv`]
//! hands the plugin C callbacks that forward to it, and keeps it alive as long as the client.
//!
//! [`Client::new_with_kv`]: crate::Client::new_with_kv

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use crate::error::ErrorCode;
use crate::sys::{self, CallbackErrorFn, Ptr};

/// Why a store operation failed: the code the plugin sees, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvError {
    /// The PJRT error code (`NotFound` for a missing key in `try_get`, `DeadlineExceeded` for a
    /// `get` that timed out).
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

/// A key-value store shared by the processes of one run. Implementations must be thread-safe
/// and `get` must block until the key is set or the timeout passes.
pub trait KeyValueStore: Send + Sync {
    /// The value of `key`, waiting up to `timeout` for another process to set it.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, KvError>;
    /// The value of `key` if it is set now.
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Set `key` to `value`.
    fn put(&self, key: &str, value: &[u8]) -> Result<(), KvError>;
}

/// What the callbacks' `user_arg` points to: the store, owned by the client.
pub(crate) struct KvState {
    pub(crate) store: Arc<dyn KeyValueStore>,
}

impl KvState {
    /// Fill the callback fields of `args` so that they forward to `self` (which must outlive
    /// the client: the client owns it).
    pub(crate) fn install(&self, args: &mut sys::ClientCreateArgs) {
        let me = self as *const KvState as *mut c_void;
        args.kv_get_callback = kv_get as *const () as Ptr;
        args.kv_get_user_arg = me;
        args.kv_put_callback = kv_put as *const () as Ptr;
        args.kv_put_user_arg = me;
        args.kv_try_get_callback = kv_try_get as *const () as Ptr;
        args.kv_try_get_user_arg = me;
    }
}

/// A value handed to the plugin: the bytes follow an 8-byte length, so the deleter can rebuild
/// the allocation from the data pointer alone. Never null, also for an empty value.
fn leak_value(v: &[u8]) -> (*mut u8, usize) {
    let mut b = Vec::with_capacity(8 + v.len());
    b.extend_from_slice(&(v.len() as u64).to_le_bytes());
    b.extend_from_slice(v);
    let raw = Box::into_raw(b.into_boxed_slice()) as *mut u8;
    // SAFETY: the allocation has at least 8 bytes.
    (unsafe { raw.add(8) }, v.len())
}

/// `PJRT_KeyValueGetCallback_ValueDeleter` for values made by [`leak_value`].
unsafe extern "C" fn free_value(value: *mut u8) {
    if value.is_null() {
        return;
    }
    // SAFETY: `value` came from `leak_value`: 8 bytes before it lie the length, and the whole
    // allocation is a boxed slice of 8 + length bytes, freed once (the plugin calls this once).
    unsafe {
        let base = value.sub(8);
        let mut n = [0u8; 8];
        std::ptr::copy_nonoverlapping(base, n.as_mut_ptr(), 8);
        let len = 8 + u64::from_le_bytes(n) as usize;
        drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(base, len)));
    }
}

/// The plugin's error for `e`, made with its `PJRT_CallbackError` (null if it gave none).
///
/// # Safety
/// `callback_error` is null or points to a valid `PJRT_CallbackError` function pointer.
unsafe fn plugin_error(callback_error: Ptr, e: &KvError) -> Ptr {
    if callback_error.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: by the caller, a pointer to a function pointer of type PJRT_CallbackError, which
    // copies the message.
    unsafe {
        let f: CallbackErrorFn = std::mem::transmute(*(callback_error as *const *const c_void));
        f(e.code.code(), e.message.as_ptr(), e.message.len())
    }
}

/// # Safety
/// `key` points to `size` readable bytes (or size is 0).
unsafe fn key_of(key: *const u8, size: usize) -> String {
    if size == 0 || key.is_null() {
        return String::new();
    }
    // SAFETY: by the caller.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(key, size) }).into_owned()
}

fn panicked() -> KvError {
    KvError {
        code: ErrorCode::Internal,
        message: "the key-value store panicked".into(),
    }
}

/// Runs a store operation; a panic in it becomes an `Internal` error instead of unwinding into
/// the plugin.
fn guarded<T>(op: impl FnOnce() -> Result<T, KvError>) -> Result<T, KvError> {
    catch_unwind(AssertUnwindSafe(op)).unwrap_or_else(|_| Err(panicked()))
}

/// The store of a callback's `user_arg` and its key.
///
/// # Safety
/// `user_arg` is the `KvState` we installed, alive as long as the client; `key` points to
/// `key_size` readable bytes (or `key_size` is 0).
unsafe fn state_and_key<'a>(
    user_arg: Ptr,
    key: *const u8,
    key_size: usize,
) -> (&'a KvState, String) {
    // SAFETY: by the caller.
    unsafe { (&*(user_arg as *const KvState), key_of(key, key_size)) }
}

/// Hands `v` to the plugin through a get callback's `value`, `value_size` and deleter fields.
fn hand_over(v: &[u8], value: &mut *mut u8, value_size: &mut usize, deleter: &mut Ptr) {
    (*value, *value_size) = leak_value(v);
    *deleter = free_value as *const () as Ptr;
}

/// A callback's return value: null on success, else the plugin's error for `r`'s error.
///
/// # Safety
/// As for [`plugin_error`].
unsafe fn reply(r: Result<(), KvError>, callback_error: Ptr) -> Ptr {
    match r {
        Ok(()) => std::ptr::null_mut(),
        // SAFETY: by the caller.
        Err(e) => unsafe { plugin_error(callback_error, &e) },
    }
}

/// `PJRT_KeyValueGetCallback`.
unsafe extern "C" fn kv_get(args: *mut sys::KvGetCallbackArgs) -> Ptr {
    // SAFETY: the plugin passes a valid, exclusive args struct for the duration of the call.
    let Some(a) = (unsafe { args.as_mut() }) else {
        return std::ptr::null_mut();
    };
    // SAFETY: `user_arg` is the `KvState` we installed, alive as long as the client; the key
    // has key_size bytes.
    let (state, key) = unsafe { state_and_key(a.user_arg, a.key, a.key_size) };
    let timeout = Duration::from_millis(a.timeout_in_ms.max(0) as u64);
    let r = guarded(|| state.store.get(&key, timeout)).map(|v| {
        hand_over(
            &v,
            &mut a.value,
            &mut a.value_size,
            &mut a.value_deleter_callback,
        )
    });
    // SAFETY: `callback_error` is the plugin's, per the C API.
    unsafe { reply(r, a.callback_error) }
}

/// `PJRT_KeyValueTryGetCallback`: a missing key is a NOT_FOUND error.
unsafe extern "C" fn kv_try_get(args: *mut sys::KvTryGetCallbackArgs) -> Ptr {
    // SAFETY: as in `kv_get`.
    let Some(a) = (unsafe { args.as_mut() }) else {
        return std::ptr::null_mut();
    };
    // SAFETY: as in `kv_get`.
    let (state, key) = unsafe { state_and_key(a.user_arg, a.key, a.key_size) };
    let r = guarded(|| state.store.try_get(&key)).and_then(|v| {
        let v = v.ok_or_else(|| KvError {
            code: ErrorCode::NotFound,
            message: format!("key {key:?} is not in the store"),
        })?;
        hand_over(
            &v,
            &mut a.value,
            &mut a.value_size,
            &mut a.value_deleter_callback,
        );
        Ok(())
    });
    // SAFETY: as in `kv_get`.
    unsafe { reply(r, a.callback_error) }
}

/// `PJRT_KeyValuePutCallback`.
unsafe extern "C" fn kv_put(args: *mut sys::KvPutCallbackArgs) -> Ptr {
    // SAFETY: as in `kv_get`.
    let Some(a) = (unsafe { args.as_mut() }) else {
        return std::ptr::null_mut();
    };
    // SAFETY: as in `kv_get`; the value has value_size bytes.
    let (state, key) = unsafe { state_and_key(a.user_arg, a.key, a.key_size) };
    let value = if a.value_size == 0 || a.value.is_null() {
        &[][..]
    } else {
        // SAFETY: the value has value_size bytes, per the C API.
        unsafe { std::slice::from_raw_parts(a.value, a.value_size) }
    };
    let r = guarded(|| state.store.put(&key, value));
    // SAFETY: as in `kv_get`.
    unsafe { reply(r, a.callback_error) }
}

#[cfg(test)]
mod tests {
    //! The callbacks called the way a plugin calls them, through the C structs.
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Mem(Mutex<HashMap<String, Vec<u8>>>);

    impl KeyValueStore for Mem {
        fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, KvError> {
            self.0.lock().unwrap().get(key).cloned().ok_or(KvError {
                code: ErrorCode::DeadlineExceeded,
                message: format!("{key} not set within {timeout:?}"),
            })
        }
        fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
            Ok(self.0.lock().unwrap().get(key).cloned())
        }
        fn put(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
            self.0.lock().unwrap().insert(key.into(), value.into());
            Ok(())
        }
    }

    // The plugin's PJRT_CallbackError stand-in: records the code and message, returns a
    // non-null marker.
    static LAST: Mutex<Option<(u32, String)>> = Mutex::new(None);
    unsafe extern "C" fn record_error(code: u32, msg: *const u8, size: usize) -> Ptr {
        // SAFETY: the callback passes its message's bytes.
        let m = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(msg, size) });
        *LAST.lock().unwrap() = Some((code, m.into_owned()));
        8 as Ptr
    }

    #[test]
    fn the_callbacks_forward_to_the_store_through_the_c_layouts() {
        let state = KvState {
            store: Arc::new(Mem::default()),
        };
        let mut create = sys::ClientCreateArgs::new();
        state.install(&mut create);
        let cb_err: CallbackErrorFn = record_error;
        let cb_err_ptr = &cb_err as *const CallbackErrorFn as Ptr;
        // SAFETY: the installed function pointers have these signatures.
        let (put, get, try_get) = unsafe {
            (
                std::mem::transmute::<Ptr, unsafe extern "C" fn(*mut sys::KvPutCallbackArgs) -> Ptr>(
                    create.kv_put_callback,
                ),
                std::mem::transmute::<Ptr, unsafe extern "C" fn(*mut sys::KvGetCallbackArgs) -> Ptr>(
                    create.kv_get_callback,
                ),
                std::mem::transmute::<
                    Ptr,
                    unsafe extern "C" fn(*mut sys::KvTryGetCallbackArgs) -> Ptr,
                >(create.kv_try_get_callback),
            )
        };
        let key = b"topology/1";
        let mut p = sys::KvPutCallbackArgs::new();
        p.key = key.as_ptr();
        p.key_size = key.len();
        p.value = b"\x00abc".as_ptr();
        p.value_size = 4;
        p.callback_error = cb_err_ptr;
        p.user_arg = create.kv_put_user_arg;
        // SAFETY: a valid args struct, as a plugin would pass.
        assert!(unsafe { put(&mut p) }.is_null());

        let mut g = sys::KvGetCallbackArgs::new();
        g.key = key.as_ptr();
        g.key_size = key.len();
        g.timeout_in_ms = 1000;
        g.callback_error = cb_err_ptr;
        g.user_arg = create.kv_get_user_arg;
        // SAFETY: as above.
        assert!(unsafe { get(&mut g) }.is_null());
        // SAFETY: the callback returned value_size bytes at value.
        let got = unsafe { std::slice::from_raw_parts(g.value, g.value_size) }.to_vec();
        assert_eq!(got, b"\x00abc");
        assert!(!g.value_deleter_callback.is_null());
        // SAFETY: the deleter the callback returned, called once on its value.
        unsafe {
            let del: unsafe extern "C" fn(*mut u8) = std::mem::transmute(g.value_deleter_callback);
            del(g.value);
        }

        // try_get of a missing key: NOT_FOUND through the plugin's error maker.
        let missing = b"nope";
        let mut t = sys::KvTryGetCallbackArgs::new();
        t.key = missing.as_ptr();
        t.key_size = missing.len();
        t.callback_error = cb_err_ptr;
        t.user_arg = create.kv_try_get_user_arg;
        // SAFETY: as above.
        let e = unsafe { try_get(&mut t) };
        assert!(!e.is_null());
        let (code, msg) = LAST.lock().unwrap().clone().unwrap();
        assert_eq!(code, 5, "{msg}");
        assert!(msg.contains("nope"), "{msg}");

        // try_get of a present, empty value: a non-null pointer and size 0.
        p.key = missing.as_ptr();
        p.key_size = missing.len();
        p.value_size = 0;
        // SAFETY: as above.
        assert!(unsafe { put(&mut p) }.is_null());
        // SAFETY: as above.
        assert!(unsafe { try_get(&mut t) }.is_null());
        assert!(!t.value.is_null());
        assert_eq!(t.value_size, 0);
        // SAFETY: as above.
        unsafe {
            let del: unsafe extern "C" fn(*mut u8) = std::mem::transmute(t.value_deleter_callback);
            del(t.value);
        }
    }
}
