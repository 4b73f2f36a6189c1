//! XLA FFI custom-call handlers written in safe Rust.
//!
//! A handler is a type implementing [`FfiHandler`] (a safe function
//! `fn(&mut CallFrame<'_>) -> Result<(), FfiError>`); [`handler_fn`] gives its C entry point,
//! which [`Client::register_ffi_handler`](crate::Client::register_ffi_handler) registers.
//! [`ffi_handler!`](crate::ffi_handler) writes both for a plain function. The entry point is a
//! generic `extern "C"` shim defined in this crate, so the crates that define handlers contain no
//! `unsafe` code (they can `#![forbid(unsafe_code)]`). The shim calls a dispatcher that
//!
//! * answers XLA's registration-time metadata query (FFI API version 0.3),
//! * ignores the instantiate/prepare/initialize stages (only EXECUTE runs the body),
//! * decodes the call frame into a [`CallFrame`] (buffers, attributes),
//! * runs the body under `catch_unwind` (a panic becomes an `INTERNAL` error),
//! * turns an `Err` into an `XLA_FFI_Error` whose code and message surface unchanged as the
//!   execute error.
//!
//! In the HLO or StableHLO the custom call must use the typed-FFI API (`api_version = 4`), and its
//! attributes come from the `backend_config` dictionary (`{scale = 2.0 : f32, name = "x"}`).

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use crate::dtype::{ElementType, NativeType, RuntimeCodes};
use crate::error::ErrorCode;
use crate::sys;

/// The C signature of an XLA FFI handler: `XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`.
pub type FfiHandlerFn = unsafe extern "C" fn(*mut c_void) -> *mut c_void;

/// Status codes of FFI errors (the absl codes; the same numbering as PJRT's).
pub type FfiErrorCode = ErrorCode;

/// The error a handler returns; its code and message come back through `execute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfiError {
    /// The status code.
    pub code: FfiErrorCode,
    /// The message.
    pub message: String,
}

impl FfiError {
    /// An error with an explicit code.
    pub fn new(code: FfiErrorCode, message: impl Into<String>) -> Self {
        FfiError {
            code,
            message: message.into(),
        }
    }
    /// `INVALID_ARGUMENT` (wrong shapes, types, attribute values).
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    /// `FAILED_PRECONDITION`.
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FailedPrecondition, message)
    }
    /// `NOT_FOUND` (e.g. a missing attribute).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    /// `UNIMPLEMENTED`.
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unimplemented, message)
    }
    /// `INTERNAL`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl std::fmt::Display for FfiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.code, self.message)
    }
}

impl std::error::Error for FfiError {}

/// A custom-call handler: a type whose [`call`](FfiHandler::call) is the safe body that runs
/// for each invocation. Get its C entry point with [`handler_fn`].
///
/// ```
/// use pjrt::ffi::{handler_fn, CallFrame, FfiError, FfiHandler};
/// use pjrt::FfiHandlerFn;
///
/// struct Negate;
/// impl FfiHandler for Negate {
///     fn call(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
///         let x = frame.arg(0)?.as_slice::<f32>()?;
///         let mut y = frame.ret(0)?;
///         for (o, i) in y.as_mut_slice::<f32>()?.iter_mut().zip(x) {
///             *o = -i;
///         }
///         Ok(())
///     }
/// }
/// const NEGATE: FfiHandlerFn = handler_fn::<Negate>();
/// ```
pub trait FfiHandler: 'static {
    /// Runs one custom-call invocation.
    fn call(frame: &mut CallFrame<'_>) -> Result<(), FfiError>;
}

/// The C entry point of handler `H`, for [`Client::register_ffi_handler`](crate::Client::register_ffi_handler).
///
/// Each `H` gets its own function (and so its own address, which the registration check uses to
/// see that XLA queried this handler's metadata).
pub const fn handler_fn<H: FfiHandler>() -> FfiHandlerFn {
    shim::<H>
}

/// The `extern "C"` entry point XLA calls; generic so that it is instantiated in the crate that
/// names `H` while its `unsafe` code stays in this crate.
///
/// # Safety
/// XLA calls it with a valid `XLA_FFI_CallFrame*` (or null).
unsafe extern "C" fn shim<H: FfiHandler>(frame: *mut c_void) -> *mut c_void {
    // SAFETY: XLA calls FFI handlers with a valid `XLA_FFI_CallFrame*`; the dispatcher
    // validates struct sizes before reading anything else.
    unsafe { dispatch(frame, H::call, shim::<H> as FfiHandlerFn) }
}

/// Defines a `const` [`FfiHandlerFn`] named `$name` that runs the safe function `$body`
/// (`fn(&mut CallFrame<'_>) -> Result<(), FfiError>`) through this crate's dispatcher. It expands
/// to safe code only (an [`FfiHandler`] impl and [`handler_fn`]).
///
/// ```
/// use pjrt::ffi::{CallFrame, FfiError};
/// fn scale(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
///     let k = frame.attr_f64("scale")? as f32;
///     let x = frame.arg(0)?;
///     let x = x.as_slice::<f32>()?;
///     let mut y = frame.ret(0)?;
///     for (o, i) in y.as_mut_slice::<f32>()?.iter_mut().zip(x) {
///         *o = k * i;
///     }
///     Ok(())
/// }
/// pjrt::ffi_handler!(pub SCALE_HANDLER, scale);
/// ```
#[macro_export]
macro_rules! ffi_handler {
    ($vis:vis $name:ident, $body:path) => {
        $vis const $name: $crate::ffi::FfiHandlerFn = {
            struct __PjrtFfiHandler;
            impl $crate::ffi::FfiHandler for __PjrtFfiHandler {
                fn call(
                    frame: &mut $crate::ffi::CallFrame<'_>,
                ) -> ::std::result::Result<(), $crate::ffi::FfiError> {
                    $body(frame)
                }
            }
            $crate::ffi::handler_fn::<__PjrtFfiHandler>()
        };
    };
}

fn metadata_answered() -> &'static Mutex<HashSet<usize>> {
    static SEEN: OnceLock<Mutex<HashSet<usize>>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(HashSet::new()))
}

pub(crate) fn reset_metadata_seen(handler: usize) {
    metadata_answered()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&handler);
}

pub(crate) fn metadata_seen(handler: usize) -> bool {
    metadata_answered()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&handler)
}

/// The FFI API version our handlers declare in the metadata query (the measured one).
const HANDLER_API_VERSION: (i32, i32) = (0, 3);

/// The dispatcher behind [`shim`].
///
/// # Safety
/// `frame` must be the `XLA_FFI_CallFrame*` XLA passed to the handler `this`.
unsafe fn dispatch(
    frame: *mut c_void,
    body: fn(&mut CallFrame<'_>) -> Result<(), FfiError>,
    this: FfiHandlerFn,
) -> *mut c_void {
    if frame.is_null() {
        return std::ptr::null_mut();
    }
    let frame = frame as *mut sys::FfiCallFrame;
    // SAFETY: XLA passes a valid call frame; struct_size and extension_start are the first
    // fields of every version.
    let (struct_size, ext) = unsafe { ((*frame).struct_size, (*frame).extension_start) };
    if !ext.is_null() {
        // SAFETY: a non-null extension starts with XLA_FFI_Extension_Base.
        let base = unsafe { *ext };
        if base.ext_type == sys::FFI_EXTENSION_METADATA {
            // SAFETY: a metadata extension is XLA_FFI_Metadata_Extension.
            let metadata = unsafe { (*(ext as *mut sys::FfiMetadataExtension)).metadata };
            if !metadata.is_null() {
                // SAFETY: XLA owns `metadata` for this call; we write only fields that its
                // struct_size covers.
                unsafe {
                    let m = &mut *metadata;
                    m.api_version = sys::FfiApiVersion::new();
                    m.api_version.major_version = HANDLER_API_VERSION.0;
                    m.api_version.minor_version = HANDLER_API_VERSION.1;
                    m.traits = 0;
                    if m.struct_size >= std::mem::size_of::<sys::FfiMetadata>() {
                        m.state_type_id = 0;
                    }
                }
                metadata_answered()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(this as usize);
            }
            return std::ptr::null_mut();
        }
    }
    if struct_size < sys::FfiCallFrame::STRUCT_SIZE {
        // An older frame layout than we understand; we cannot even create an error safely.
        return std::ptr::null_mut();
    }
    // SAFETY: struct_size covers the whole frame.
    let raw = unsafe { &*frame };
    if raw.stage != sys::FFI_STAGE_EXECUTE {
        return std::ptr::null_mut();
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut cf = CallFrame {
            raw,
            views: RefCell::new(Views::default()),
            _p: PhantomData,
        };
        body(&mut cf)
    }));
    let err = match result {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            FfiError::internal(format!("FFI handler panicked: {what}"))
        }
    };
    // SAFETY: `raw.api` is the XLA FFI API table for this call.
    unsafe { create_error(raw.api, &err) }
}

/// # Safety
/// `api` must be null or the `XLA_FFI_Api*` from a call frame.
unsafe fn create_error(api: *const sys::XlaFfiApi, err: &FfiError) -> *mut c_void {
    // SAFETY: guaranteed by the caller; we check struct_size before reading error_create.
    let create = unsafe {
        if api.is_null()
            || (*api).struct_size < sys::XlaFfiApi::STRUCT_SIZE
            || (*api).error_create.is_null()
        {
            None
        } else {
            Some((*api).error_create)
        }
    };
    let Some(create) = create else {
        eprintln!(
            "pjrt: FFI handler failed ({err}) but the XLA FFI API offers no Error_Create; aborting"
        );
        std::process::abort();
    };
    let msg = std::ffi::CString::new(err.message.replace('\0', "\\0")).unwrap_or_default();
    let mut args = sys::FfiErrorCreateArgs::new();
    args.message = msg.as_ptr();
    args.errc = err.code.code();
    // SAFETY: XLA_FFI_Error_Create has the PJRT-style signature and copies the message.
    let f: sys::PjrtFn = unsafe { std::mem::transmute::<sys::Ptr, sys::PjrtFn>(create) };
    // SAFETY: see above; `args` and `msg` outlive the call.
    unsafe { f(&mut args as *mut _ as *mut c_void) }
}

/// A safe view of one custom-call invocation: argument and result buffers and attributes.
pub struct CallFrame<'a> {
    raw: &'a sys::FfiCallFrame,
    views: RefCell<Views>,
    _p: PhantomData<&'a mut ()>,
}

/// Which buffers of a call have views that live as long as the call: arguments handed out by
/// [`CallFrame::arg`] (shared) and operand/result pairs handed out by
/// [`CallFrame::in_place_mut`] (exclusive). They keep the two kinds of view from overlapping.
#[derive(Debug, Default)]
struct Views {
    shared_args: Vec<usize>,
    in_place_args: Vec<usize>,
    in_place_rets: Vec<usize>,
}

/// The value of a decoded attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue<'a> {
    /// A scalar integer (any signed/unsigned width, or pred as 0/1).
    Int(i64),
    /// A scalar float (f16/bf16/f32/f64 widened).
    Float(f64),
    /// A string.
    Str(&'a str),
    /// An array of integers.
    IntArray(Vec<i64>),
    /// An array of floats.
    FloatArray(Vec<f64>),
    /// A nested dictionary (not decoded).
    Dictionary,
    /// Something this crate does not decode (with the raw type and dtype codes).
    Unsupported(u32, u32),
}

/// A read-only argument buffer of a custom call.
#[derive(Debug, Clone, Copy)]
pub struct BufferArg<'a> {
    ty: ElementType,
    dims: &'a [i64],
    data: *const u8,
    len: usize,
}

/// A writable result buffer of a custom call.
#[derive(Debug)]
pub struct BufferRet<'a> {
    ty: ElementType,
    dims: &'a [i64],
    data: *mut u8,
    len: usize,
    _p: PhantomData<&'a mut [u8]>,
}

fn typed_len<T: NativeType>(
    ty: ElementType,
    len: usize,
    data: *const u8,
    what: &str,
) -> Result<usize, FfiError> {
    if T::TYPE != ty {
        return Err(FfiError::invalid_argument(format!(
            "{what} has element type {ty}, read as {}",
            T::TYPE
        )));
    }
    if len > 0 && (data as usize) & (std::mem::align_of::<T>() - 1) != 0 {
        return Err(FfiError::internal(format!(
            "{what} data is not aligned for {}",
            T::TYPE
        )));
    }
    Ok(len)
}

impl<'a> BufferArg<'a> {
    /// Element type.
    pub fn dtype(&self) -> ElementType {
        self.ty
    }
    /// Dimensions (row-major).
    pub fn dims(&self) -> &'a [i64] {
        self.dims
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The elements, if `T` is the buffer's type.
    pub fn as_slice<T: NativeType>(&self) -> Result<&'a [T], FfiError> {
        let n = typed_len::<T>(self.ty, self.len, self.data, "argument")?;
        if n == 0 {
            return Ok(&[]);
        }
        if self.ty == ElementType::Pred {
            // SAFETY: the buffer holds n readable bytes for the duration of the call.
            let bytes = unsafe { std::slice::from_raw_parts(self.data, n) };
            if bytes.iter().any(|&b| b > 1) {
                return Err(FfiError::invalid_argument(
                    "pred argument holds bytes other than 0/1; use as_bytes",
                ));
            }
        }
        // SAFETY: XLA guarantees `len` elements of the declared type at `data` (checked aligned,
        // and for pred checked to be valid bools) that stay alive and unmodified during the call.
        Ok(unsafe { std::slice::from_raw_parts(self.data as *const T, n) })
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `len * byte_size` readable bytes during the call.
        unsafe { std::slice::from_raw_parts(self.data, self.len * self.ty.byte_size()) }
    }
}

impl BufferRet<'_> {
    /// Element type.
    pub fn dtype(&self) -> ElementType {
        self.ty
    }
    /// Dimensions (row-major).
    pub fn dims(&self) -> &[i64] {
        self.dims
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The elements to write, if `T` is the buffer's type (pred results start zeroed).
    pub fn as_mut_slice<T: NativeType>(&mut self) -> Result<&mut [T], FfiError> {
        let n = typed_len::<T>(self.ty, self.len, self.data, "result")?;
        if n == 0 {
            return Ok(&mut []);
        }
        if self.ty == ElementType::Pred {
            // SAFETY: n writable bytes; zero is a valid bool.
            unsafe { std::ptr::write_bytes(self.data, 0, n) };
        }
        // SAFETY: XLA gives `n` writable, aligned elements owned by this result for the call, and
        // `&mut self` makes this the only live view (results never overlap arguments: checked
        // when the result was handed out).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.data as *mut T, n) })
    }
    /// The raw bytes to write.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_mut_slice`; bytes accept any value.
        unsafe { std::slice::from_raw_parts_mut(self.data, self.len * self.ty.byte_size()) }
    }
}

impl<'a> CallFrame<'a> {
    /// Number of arguments.
    pub fn num_args(&self) -> usize {
        self.raw.args.size.max(0) as usize
    }

    /// Number of results.
    pub fn num_rets(&self) -> usize {
        self.raw.rets.size.max(0) as usize
    }

    fn buffer(
        list: &sys::FfiArgs,
        i: usize,
        what: &str,
    ) -> Result<(ElementType, &'a [i64], *mut u8, usize), FfiError> {
        let n = list.size.max(0) as usize;
        if i >= n {
            return Err(FfiError::invalid_argument(format!(
                "{what} {i} requested but the custom call has {n}"
            )));
        }
        // SAFETY: `types` and `args` hold `size` entries for the duration of the call.
        let (ty, ptr) = unsafe { (*list.types.add(i), *list.args.add(i)) };
        if ty != sys::FFI_BUFFER || ptr.is_null() {
            return Err(FfiError::invalid_argument(format!(
                "{what} {i} is not a buffer (type {ty})"
            )));
        }
        // SAFETY: a BUFFER entry points to an XLA_FFI_Buffer.
        let b = unsafe { &*(ptr as *const sys::FfiBuffer) };
        let et = ElementType::from_ffi_code(b.dtype).ok_or_else(|| {
            FfiError::unimplemented(format!(
                "{what} {i} has FFI dtype {} (unsupported)",
                b.dtype
            ))
        })?;
        let rank = b.rank.max(0) as usize;
        let dims: &'a [i64] = if rank == 0 {
            &[]
        } else {
            // SAFETY: `dims` has `rank` entries for the duration of the call.
            unsafe { std::slice::from_raw_parts(b.dims, rank) }
        };
        let mut len = 1usize;
        for &d in dims {
            len = len
                .checked_mul(
                    usize::try_from(d)
                        .map_err(|_| FfiError::internal(format!("{what} {i} dims {dims:?}")))?,
                )
                .ok_or_else(|| FfiError::internal(format!("{what} {i} dims {dims:?} overflow")))?;
        }
        if len > 0 && b.data.is_null() {
            return Err(FfiError::internal(format!("{what} {i} has null data")));
        }
        Ok((et, dims, b.data as *mut u8, len))
    }

    /// Argument `i` (read-only). The view borrows the call, not the frame, so it can be held
    /// while results are written.
    ///
    /// Errors if the argument was taken by [`CallFrame::in_place_mut`].
    pub fn arg(&self, i: usize) -> Result<BufferArg<'a>, FfiError> {
        {
            let mut v = self.views.borrow_mut();
            if v.in_place_args.contains(&i) {
                return Err(FfiError::invalid_argument(format!(
                    "argument {i} is updated in place (in_place_mut); it cannot also be read"
                )));
            }
            if !v.shared_args.contains(&i) {
                v.shared_args.push(i);
            }
        }
        let (ty, dims, data, len) = Self::buffer(&self.raw.args, i, "argument")?;
        Ok(BufferArg {
            ty,
            dims,
            data,
            len,
        })
    }

    fn ret_unchecked(&self, i: usize) -> Result<BufferRet<'a>, FfiError> {
        if self.views.borrow().in_place_rets.contains(&i) {
            return Err(FfiError::invalid_argument(format!(
                "result {i} is updated in place (in_place_mut); it cannot be handed out again"
            )));
        }
        let (ty, dims, data, len) = Self::buffer(&self.raw.rets, i, "result")?;
        let r = BufferRet {
            ty,
            dims,
            data,
            len,
            _p: PhantomData,
        };
        // Results must not overlap arguments (an aliased custom call would make the argument
        // slices and the result slice alias).
        let (lo, hi) = (data as usize, data as usize + len * ty.byte_size());
        for j in 0..self.num_args() {
            if let Ok((aty, _, adata, alen)) = Self::buffer(&self.raw.args, j, "argument") {
                let (alo, ahi) = (adata as usize, adata as usize + alen * aty.byte_size());
                if lo < ahi && alo < hi {
                    return Err(FfiError::unimplemented(format!(
                        "result {i} overlaps argument {j} (an aliased result is reached through \
                         in_place_mut)"
                    )));
                }
            }
        }
        Ok(r)
    }

    /// Whether argument `arg` and result `ret` are one buffer (XLA honoured an
    /// `output_operand_aliasing` pair). Makes no view of either.
    pub fn same_buffer(&self, arg: usize, ret: usize) -> Result<bool, FfiError> {
        let (_, _, a, alen) = Self::buffer(&self.raw.args, arg, "argument")?;
        let (_, _, r, rlen) = Self::buffer(&self.raw.rets, ret, "result")?;
        Ok(a == r && alen == rlen)
    }

    /// The elements of result `ret` holding, on entry, the value of argument `arg`, to update in
    /// place: for a custom call that declares `output_operand_aliasing` (operand `arg` → result
    /// `ret`), where XLA hands both the same buffer. Where XLA did not alias them (the
    /// declaration is a request), the argument is first copied into the result. The slice
    /// lives as long as the call, beside the other arguments' and results' views; argument
    /// `arg` and result `ret` cannot be handed out again (nor by [`CallFrame::rets_mut`]).
    ///
    /// Errors if `T` is not the type of both, their dims differ, the argument was already read
    /// through [`CallFrame::arg`], either was already taken, or the result overlaps another
    /// argument.
    pub fn in_place_mut<T: NativeType>(
        &mut self,
        arg: usize,
        ret: usize,
    ) -> Result<&'a mut [T], FfiError> {
        let what = format!("in_place_mut(argument {arg}, result {ret})");
        let (aty, adims, adata, alen) = Self::buffer(&self.raw.args, arg, "argument")?;
        let (rty, rdims, rdata, rlen) = Self::buffer(&self.raw.rets, ret, "result")?;
        if aty != rty || adims != rdims {
            return Err(FfiError::invalid_argument(format!(
                "{what}: argument {aty}{adims:?} and result {rty}{rdims:?} differ"
            )));
        }
        let n = typed_len::<T>(rty, rlen, rdata, &what)?;
        typed_len::<T>(aty, alen, adata, &what)?;
        if aty == ElementType::Pred {
            return Err(FfiError::unimplemented(format!(
                "{what}: pred buffers are not updated in place"
            )));
        }
        {
            let mut v = self.views.borrow_mut();
            if v.shared_args.contains(&arg) || v.in_place_args.contains(&arg) {
                return Err(FfiError::invalid_argument(format!(
                    "{what}: argument {arg} already has a view"
                )));
            }
            if v.in_place_rets.contains(&ret) {
                return Err(FfiError::invalid_argument(format!(
                    "{what}: result {ret} was already taken"
                )));
            }
            v.in_place_args.push(arg);
            v.in_place_rets.push(ret);
        }
        let bytes = n * rty.byte_size();
        let (lo, hi) = (rdata as usize, rdata as usize + bytes);
        for j in (0..self.num_args()).filter(|&j| j != arg) {
            if let Ok((oty, _, odata, olen)) = Self::buffer(&self.raw.args, j, "argument") {
                let (olo, ohi) = (odata as usize, odata as usize + olen * oty.byte_size());
                if lo < ohi && olo < hi {
                    return Err(FfiError::internal(format!(
                        "{what}: the result overlaps argument {j}"
                    )));
                }
            }
        }
        if n == 0 {
            return Ok(&mut []);
        }
        if adata != rdata {
            let alo = adata as usize;
            if lo < alo + bytes && alo < hi {
                return Err(FfiError::internal(format!(
                    "{what}: argument and result overlap without being the same buffer"
                )));
            }
            // SAFETY: both hold `bytes` bytes for the call and do not overlap (checked); no
            // view of either exists (argument never handed out, result taken only here).
            unsafe { std::ptr::copy_nonoverlapping(adata as *const u8, rdata, bytes) };
        }
        // SAFETY: `n` aligned elements of `T` (checked) that XLA owns for the call; the buffer is
        // the result's, and also the argument's when XLA aliased them. No other view of it
        // exists or can be made: the argument was never handed out by `arg` and is now refused
        // there, the result is refused by `ret`/`rets_mut`, and it overlaps no other argument
        // (checked) nor other result (XLA gives results distinct buffers).
        Ok(unsafe { std::slice::from_raw_parts_mut(rdata as *mut T, n) })
    }

    /// Result `i` (writable).
    pub fn ret(&mut self, i: usize) -> Result<BufferRet<'_>, FfiError> {
        self.ret_unchecked(i)
    }

    /// All results at once (they are distinct buffers), for kernels with several outputs.
    /// Errors if a result was taken by [`CallFrame::in_place_mut`].
    pub fn rets_mut(&mut self) -> Result<Vec<BufferRet<'_>>, FfiError> {
        let rets: Vec<BufferRet<'_>> = (0..self.num_rets())
            .map(|i| self.ret_unchecked(i))
            .collect::<Result<_, _>>()?;
        for (i, a) in rets.iter().enumerate() {
            for (j, b) in rets.iter().enumerate().skip(i + 1) {
                let (alo, ahi) = (a.data as usize, a.data as usize + a.len * a.ty.byte_size());
                let (blo, bhi) = (b.data as usize, b.data as usize + b.len * b.ty.byte_size());
                if alo < bhi && blo < ahi {
                    return Err(FfiError::internal(format!("results {i} and {j} overlap")));
                }
            }
        }
        Ok(rets)
    }

    fn attr_entries(&self) -> Vec<(&'a str, u32, *const c_void)> {
        let attrs = &self.raw.attrs;
        let n = attrs.size.max(0) as usize;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `types`, `names`, `attrs` hold `size` entries during the call; names are
            // byte spans.
            let (ty, name, ptr) = unsafe {
                (
                    *attrs.types.add(i),
                    *attrs.names.add(i),
                    *attrs.attrs.add(i),
                )
            };
            if name.is_null() {
                continue;
            }
            // SAFETY: as above.
            let span = unsafe { *name };
            let bytes: &'a [u8] = if span.len == 0 {
                &[]
            } else {
                // SAFETY: the span is valid during the call.
                unsafe { std::slice::from_raw_parts(span.ptr, span.len) }
            };
            if let Ok(s) = std::str::from_utf8(bytes) {
                out.push((s, ty, ptr as *const c_void));
            }
        }
        out
    }

    /// The attribute names (sorted, as XLA passes them).
    pub fn attr_names(&self) -> Vec<&'a str> {
        self.attr_entries().into_iter().map(|(n, _, _)| n).collect()
    }

    /// The decoded value of attribute `name`.
    pub fn attr(&self, name: &str) -> Result<AttrValue<'a>, FfiError> {
        let (_, ty, ptr) = self
            .attr_entries()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| FfiError::not_found(format!("custom call has no attribute {name:?}")))?;
        if ptr.is_null() {
            return Err(FfiError::internal(format!(
                "attribute {name:?} has a null value"
            )));
        }
        use sys::ffi_attr as a;
        Ok(match ty {
            a::SCALAR => {
                // SAFETY: a SCALAR attribute points to XLA_FFI_Scalar.
                let s = unsafe { *(ptr as *const sys::FfiScalar) };
                // SAFETY: `value` points to one element of `dtype`.
                match unsafe { read_number(s.dtype, s.value, 0) } {
                    Some(v) => v,
                    None => AttrValue::Unsupported(ty, s.dtype),
                }
            }
            a::STRING => {
                // SAFETY: a STRING attribute points to XLA_FFI_ByteSpan.
                let span = unsafe { *(ptr as *const sys::FfiByteSpan) };
                let bytes: &'a [u8] = if span.len == 0 {
                    &[]
                } else {
                    // SAFETY: valid during the call.
                    unsafe { std::slice::from_raw_parts(span.ptr, span.len) }
                };
                AttrValue::Str(std::str::from_utf8(bytes).map_err(|_| {
                    FfiError::invalid_argument(format!("attribute {name:?} is not UTF-8"))
                })?)
            }
            a::ARRAY => {
                // SAFETY: an ARRAY attribute points to XLA_FFI_Array.
                let arr = unsafe { *(ptr as *const sys::FfiArray) };
                let mut ints = Vec::new();
                let mut floats = Vec::new();
                for k in 0..arr.size {
                    // SAFETY: `data` holds `size` elements of `dtype`.
                    match unsafe { read_number(arr.dtype, arr.data, k) } {
                        Some(AttrValue::Int(v)) => ints.push(v),
                        Some(AttrValue::Float(v)) => floats.push(v),
                        _ => return Ok(AttrValue::Unsupported(ty, arr.dtype)),
                    }
                }
                let is_float = ElementType::from_ffi_code(arr.dtype).is_some_and(|t| t.is_float());
                if is_float {
                    AttrValue::FloatArray(floats)
                } else {
                    AttrValue::IntArray(ints)
                }
            }
            a::DICTIONARY => AttrValue::Dictionary,
            other => AttrValue::Unsupported(other, 0),
        })
    }

    /// An integer scalar attribute (any integer width, or pred).
    pub fn attr_i64(&self, name: &str) -> Result<i64, FfiError> {
        match self.attr(name)? {
            AttrValue::Int(v) => Ok(v),
            other => Err(FfiError::invalid_argument(format!(
                "attribute {name:?} is {other:?}, expected an integer"
            ))),
        }
    }

    /// A float scalar attribute (f16/bf16/f32/f64; integers are accepted and converted).
    pub fn attr_f64(&self, name: &str) -> Result<f64, FfiError> {
        match self.attr(name)? {
            AttrValue::Float(v) => Ok(v),
            AttrValue::Int(v) => Ok(v as f64),
            other => Err(FfiError::invalid_argument(format!(
                "attribute {name:?} is {other:?}, expected a float"
            ))),
        }
    }

    /// A boolean attribute (`true`/`false`, i.e. an i1/pred scalar, or a 0/1 integer).
    pub fn attr_bool(&self, name: &str) -> Result<bool, FfiError> {
        match self.attr(name)? {
            AttrValue::Int(0) => Ok(false),
            AttrValue::Int(1) => Ok(true),
            other => Err(FfiError::invalid_argument(format!(
                "attribute {name:?} is {other:?}, expected a bool"
            ))),
        }
    }

    /// A string attribute.
    pub fn attr_str(&self, name: &str) -> Result<&'a str, FfiError> {
        match self.attr(name)? {
            AttrValue::Str(s) => Ok(s),
            other => Err(FfiError::invalid_argument(format!(
                "attribute {name:?} is {other:?}, expected a string"
            ))),
        }
    }

    /// An integer array attribute (`array<i64: 1, 2, 3>`).
    pub fn attr_array_i64(&self, name: &str) -> Result<Vec<i64>, FfiError> {
        match self.attr(name)? {
            AttrValue::IntArray(v) => Ok(v),
            other => Err(FfiError::invalid_argument(format!(
                "attribute {name:?} is {other:?}, expected an int array"
            ))),
        }
    }

    /// A float array attribute (`array<f32: 1.0, 2.0>`).
    pub fn attr_array_f64(&self, name: &str) -> Result<Vec<f64>, FfiError> {
        match self.attr(name)? {
            AttrValue::FloatArray(v) => Ok(v),
            AttrValue::IntArray(v) => Ok(v.into_iter().map(|x| x as f64).collect()),
            other => Err(FfiError::invalid_argument(format!(
                "attribute {name:?} is {other:?}, expected a float array"
            ))),
        }
    }
}

/// Reads element `k` of FFI dtype `dtype` at `p`.
///
/// # Safety
/// `p` must point to at least `k + 1` elements of `dtype`.
unsafe fn read_number<'a>(dtype: u32, p: *const c_void, k: usize) -> Option<AttrValue<'a>> {
    if p.is_null() {
        return None;
    }
    let ty = ElementType::from_ffi_code(dtype)?;
    // SAFETY: guaranteed by the caller; unaligned reads cover any packing.
    unsafe {
        Some(match ty {
            ElementType::Pred => AttrValue::Int(i64::from(*(p as *const u8).add(k) != 0)),
            ElementType::S8 => AttrValue::Int(i64::from((p as *const i8).add(k).read_unaligned())),
            ElementType::S16 => {
                AttrValue::Int(i64::from((p as *const i16).add(k).read_unaligned()))
            }
            ElementType::S32 => {
                AttrValue::Int(i64::from((p as *const i32).add(k).read_unaligned()))
            }
            ElementType::S64 => AttrValue::Int((p as *const i64).add(k).read_unaligned()),
            ElementType::U8 => AttrValue::Int(i64::from(*(p as *const u8).add(k))),
            ElementType::U16 => {
                AttrValue::Int(i64::from((p as *const u16).add(k).read_unaligned()))
            }
            ElementType::U32 => {
                AttrValue::Int(i64::from((p as *const u32).add(k).read_unaligned()))
            }
            ElementType::U64 => {
                AttrValue::Int(i64::try_from((p as *const u64).add(k).read_unaligned()).ok()?)
            }
            ElementType::F16 => AttrValue::Float(
                half::f16::from_bits((p as *const u16).add(k).read_unaligned()).to_f64(),
            ),
            ElementType::Bf16 => AttrValue::Float(
                half::bf16::from_bits((p as *const u16).add(k).read_unaligned()).to_f64(),
            ),
            ElementType::F32 => {
                AttrValue::Float(f64::from((p as *const f32).add(k).read_unaligned()))
            }
            ElementType::F64 => AttrValue::Float((p as *const f64).add(k).read_unaligned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call frame over host buffers: `args` and `rets` as (data, dims).
    #[allow(clippy::vec_box)] // boxed: the buffers' addresses are taken while the list grows
    struct Frame {
        _bufs: Vec<Box<sys::FfiBuffer>>,
        _ptrs: Vec<Vec<sys::Ptr>>,
        _types: Vec<Vec<u32>>,
        raw: Box<sys::FfiCallFrame>,
    }

    fn frame(args: &[(*mut f32, &[i64])], rets: &[(*mut f32, &[i64])]) -> Frame {
        let mut bufs = Vec::new();
        let mut ptrs = Vec::new();
        let mut types = Vec::new();
        let mut list = |xs: &[(*mut f32, &[i64])]| {
            let mut p = Vec::new();
            for &(data, dims) in xs {
                let mut b = Box::new(sys::FfiBuffer::new());
                b.dtype = ElementType::F32.ffi_code();
                b.data = data as *mut c_void;
                b.rank = dims.len() as i64;
                b.dims = dims.as_ptr();
                p.push(&mut *b as *mut sys::FfiBuffer as sys::Ptr);
                bufs.push(b);
            }
            let mut l = sys::FfiArgs::new();
            l.size = xs.len() as i64;
            types.push(vec![sys::FFI_BUFFER; xs.len()]);
            l.types = types.last().unwrap().as_ptr();
            l.args = p.as_ptr();
            ptrs.push(p);
            l
        };
        let mut raw = Box::new(sys::FfiCallFrame::new());
        raw.args = list(args);
        raw.rets = list(rets);
        raw.stage = sys::FFI_STAGE_EXECUTE;
        Frame {
            _bufs: bufs,
            _ptrs: ptrs,
            _types: types,
            raw,
        }
    }

    fn call_frame(f: &Frame) -> CallFrame<'_> {
        CallFrame {
            raw: &f.raw,
            views: RefCell::new(Views::default()),
            _p: PhantomData,
        }
    }

    #[test]
    fn in_place_mut_shares_an_aliased_buffer_and_copies_otherwise() {
        let dims: &[i64] = &[2, 2];
        let (mut x, mut y, mut r, mut s) = (
            vec![1.0f32, 2.0, 3.0, 4.0],
            vec![5.0f32, 6.0, 7.0, 8.0],
            vec![0.0f32; 4],
            vec![0.0f32; 3],
        );
        // Argument 0 aliased with result 0 (one buffer); argument 1 and result 1 distinct. The
        // vectors are not touched while the frame's views live.
        let (xp, yp) = (x.as_mut_ptr(), y.as_mut_ptr());
        let f = frame(
            &[(xp, dims), (yp, dims)],
            &[(xp, dims), (r.as_mut_ptr(), dims), (s.as_mut_ptr(), &[3])],
        );
        let mut cf = call_frame(&f);
        assert!(cf.same_buffer(0, 0).unwrap() && !cf.same_buffer(1, 1).unwrap());
        // Shapes must agree; a result that overlaps an argument is refused by `ret`.
        assert!(cf.in_place_mut::<f32>(1, 2).is_err());
        assert!(cf.ret(0).is_err());
        let a = cf.in_place_mut::<f32>(0, 0).unwrap();
        let b = cf.in_place_mut::<f32>(1, 1).unwrap();
        assert_eq!(a, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(b, [5.0, 6.0, 7.0, 8.0]);
        a[0] = -1.0;
        b[0] = -5.0;
        // The pairs cannot be reached again.
        assert!(cf.arg(0).is_err() && cf.arg(1).is_err());
        assert!(cf.ret(1).is_err() && cf.rets_mut().is_err());
        assert!(cf.in_place_mut::<f32>(0, 0).is_err());
        cf.ret(2).unwrap().as_mut_slice::<f32>().unwrap()[0] = 9.0;
        drop(cf);
        assert_eq!(x, vec![-1.0, 2.0, 3.0, 4.0]);
        assert_eq!(r, vec![-5.0, 6.0, 7.0, 8.0]);
        assert_eq!(
            y,
            vec![5.0, 6.0, 7.0, 8.0],
            "the unaliased argument was written"
        );
        assert_eq!(s[0], 9.0);

        // An argument already read through `arg` cannot be updated in place.
        let yp = y.as_mut_ptr();
        let f = frame(&[(yp, dims)], &[(yp, dims)]);
        let mut cf = call_frame(&f);
        let _view = cf.arg(0).unwrap().as_slice::<f32>().unwrap();
        let e = cf.in_place_mut::<f32>(0, 0).unwrap_err().to_string();
        assert!(e.contains("argument 0 already has a view"), "{e}");
    }
}
