//! Device buffers.

use crate::client::{element_count, Client, Device};
use crate::dtype::{ElementType, NativeType, RuntimeCodes};
use crate::error::{Error, ErrorCode, Result};
use crate::sys::{self, slot, Ptr};

/// An array on a device. Dropping it destroys the `PJRT_Buffer`.
pub struct Buffer {
    pub(crate) raw: Ptr,
    pub(crate) client: Client,
}

// SAFETY: PJRT buffers are thread-safe handles (all access goes through the plugin, which
// synchronises internally).
unsafe impl Send for Buffer {}
// SAFETY: see `Send`; every method takes `&self` and only reads through the plugin.
unsafe impl Sync for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        let (s, name) = (slot::BUFFER_DESTROY, "PJRT_Buffer_Destroy");
        // SAFETY: the buffer is owned by `self` and destroyed exactly once.
        unsafe { self.client.inner.plugin.destroy(s, name, self.raw) };
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Buffer");
        if let Ok(t) = self.element_type() {
            d.field("type", &t);
        }
        if let Ok(dims) = self.dims() {
            d.field("dims", &dims);
        }
        d.finish()
    }
}

impl Buffer {
    pub(crate) fn from_raw(client: &Client, raw: Ptr) -> Buffer {
        Buffer {
            raw,
            client: client.clone(),
        }
    }

    /// Calls the buffer function `name` (slot `s`) with args `a`.
    ///
    /// # Safety
    /// Slot `s` takes args of type `A`, filled as that function needs.
    unsafe fn call<A>(&self, s: usize, name: &'static str, a: &mut A) -> Result<()> {
        // SAFETY: by the caller.
        unsafe { self.client.inner.plugin.call(s, name, a) }
    }

    /// The client that owns the buffer.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The element type.
    pub fn element_type(&self) -> Result<ElementType> {
        let mut a = sys::BufferElementTypeArgs::new();
        a.buffer = self.raw;
        // SAFETY: slot 59 takes PJRT_Buffer_ElementType_Args.
        unsafe { self.call(slot::BUFFER_ELEMENT_TYPE, "PJRT_Buffer_ElementType", &mut a) }?;
        ElementType::from_pjrt_code(a.element_type).ok_or_else(|| Error::Pjrt {
            code: ErrorCode::Unimplemented,
            function: "PJRT_Buffer_ElementType",
            message: format!(
                "PJRT buffer type {} is not supported by this crate",
                a.element_type
            ),
        })
    }

    /// The dimensions (row-major order).
    pub fn dims(&self) -> Result<Vec<i64>> {
        let mut a = sys::BufferDimensionsArgs::new();
        a.buffer = self.raw;
        // SAFETY: slot 60 takes PJRT_Buffer_Dimensions_Args.
        unsafe { self.call(slot::BUFFER_DIMENSIONS, "PJRT_Buffer_Dimensions", &mut a) }?;
        if a.num_dims == 0 || a.dims.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: the dims array is owned by the buffer and has num_dims elements.
        Ok(unsafe { std::slice::from_raw_parts(a.dims, a.num_dims) }.to_vec())
    }

    /// Number of elements (product of the dims).
    pub fn element_count(&self) -> Result<usize> {
        element_count(&self.dims()?)
    }

    /// Bytes the buffer occupies on the device.
    pub fn on_device_size(&self) -> Result<usize> {
        let (s, name) = (
            slot::BUFFER_ON_DEVICE_SIZE,
            "PJRT_Buffer_OnDeviceSizeInBytes",
        );
        // SAFETY: slot 64 takes PJRT_Buffer_OnDeviceSizeInBytes_Args (HandleWordArgs layout).
        unsafe { self.client.inner.plugin.query_word(s, name, self.raw) }
    }

    /// The device holding the buffer.
    pub fn device(&self) -> Result<Device> {
        let (s, name) = (slot::BUFFER_DEVICE, "PJRT_Buffer_Device");
        // SAFETY: slot 65 takes PJRT_Buffer_Device_Args {buffer, device out} (HandleWordArgs
        // layout).
        let device = unsafe { self.client.inner.plugin.query_word(s, name, self.raw) }?;
        Device::from_raw(&self.client, device as Ptr)
    }

    /// Whether the buffer was deleted (for example donated to an execution).
    pub fn is_deleted(&self) -> Result<bool> {
        let mut a = sys::BufferIsDeletedArgs::new();
        a.buffer = self.raw;
        // SAFETY: slot 68 takes PJRT_Buffer_IsDeleted_Args.
        unsafe { self.call(slot::BUFFER_IS_DELETED, "PJRT_Buffer_IsDeleted", &mut a) }?;
        Ok(a.is_deleted)
    }

    /// The device address of the buffer's data, as an integer (for identity checks such as
    /// verifying that donation reused an input's memory; never dereference it).
    pub fn device_address(&self) -> Result<usize> {
        let (s, name) = (slot::BUFFER_UNSAFE_POINTER, "PJRT_Buffer_UnsafePointer");
        // SAFETY: slot 73 takes PJRT_Buffer_UnsafePointer_Args {buffer, uintptr out}
        // (HandleWordArgs layout).
        unsafe { self.client.inner.plugin.query_word(s, name, self.raw) }
    }

    /// Copies the buffer to another device of the same client.
    pub fn copy_to_device(&self, device: &Device) -> Result<Buffer> {
        let mut a = sys::BufferCopyToDeviceArgs::new();
        a.buffer = self.raw;
        a.dst_device = device.raw;
        // SAFETY: slot 69 takes PJRT_Buffer_CopyToDevice_Args.
        unsafe {
            self.call(
                slot::BUFFER_COPY_TO_DEVICE,
                "PJRT_Buffer_CopyToDevice",
                &mut a,
            )
        }?;
        Ok(Buffer::from_raw(&self.client, a.dst_buffer))
    }

    /// Copies the buffer to the host as raw little-endian element bytes (row-major).
    pub fn to_host_bytes(&self) -> Result<Vec<u8>> {
        let ty = self.element_type()?;
        let n = self.element_count()?;
        let mut out = vec![0u8; n * ty.byte_size()];
        self.copy_into(out.as_mut_ptr(), out.len())?;
        Ok(out)
    }

    /// Copies the buffer to the host as a `Vec<T>`; fails if `T` is not the buffer's type.
    pub fn to_host<T: NativeType>(&self) -> Result<Vec<T>> {
        let ty = self.element_type()?;
        if ty != T::TYPE {
            return Err(Error::Shape(format!(
                "to_host::<{}>() on a {ty} buffer of shape {:?}",
                T::TYPE,
                self.dims().unwrap_or_default()
            )));
        }
        let n = self.element_count()?;
        if T::TYPE == ElementType::Pred {
            let bytes = self.to_host_bytes()?;
            let mut out = vec![T::default(); n];
            let normalized: Vec<u8> = bytes.iter().map(|&b| u8::from(b != 0)).collect();
            // SAFETY: T is bool (1 byte) and every byte is 0 or 1, a valid bool.
            unsafe {
                std::ptr::copy_nonoverlapping(normalized.as_ptr(), out.as_mut_ptr() as *mut u8, n)
            };
            return Ok(out);
        }
        let mut out = vec![T::default(); n];
        // SAFETY: non-bool NativeTypes accept every bit pattern; the Vec holds exactly the bytes.
        self.copy_into(
            out.as_mut_ptr() as *mut u8,
            std::mem::size_of_val(out.as_slice()),
        )?;
        Ok(out)
    }

    fn copy_into(&self, dst: *mut u8, len: usize) -> Result<()> {
        let to_host = |dst: *mut u8, dst_size: usize| {
            let mut a = sys::BufferToHostArgs::new();
            a.src = self.raw;
            a.dst = dst as *mut _;
            a.dst_size = dst_size;
            // SAFETY: slot 70 takes PJRT_Buffer_ToHostBuffer_Args; with dst = null it only
            // reports the required size, else `dst` is valid for `dst_size` writable bytes (see
            // below).
            unsafe { self.call(slot::BUFFER_TO_HOST, "PJRT_Buffer_ToHostBuffer", &mut a) }?;
            Ok::<_, Error>(a)
        };
        // Ask for the size first so a mismatch is an error, not an overrun.
        let a = to_host(std::ptr::null_mut(), 0)?;
        if a.dst_size != len {
            return Err(Error::Shape(format!(
                "PJRT_Buffer_ToHostBuffer needs {} bytes but the host array has {len}",
                a.dst_size
            )));
        }
        if len == 0 {
            return Ok(());
        }
        // `dst` is valid for `len` writable bytes and stays alive until the event has been
        // awaited below.
        let a = to_host(dst, len)?;
        self.client
            .inner
            .plugin
            .await_event(a.event, "PJRT_Buffer_ToHostBuffer")
    }
}
