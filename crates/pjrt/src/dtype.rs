//! Element types at the runtime boundary.
//!
//! [`ElementType`] and [`NativeType`] come from `xla-data`, which owns the `PrimitiveType`
//! numbering. Two C APIs number element types on their own, and their tables live here:
//! the PJRT C API's `PJRT_Buffer_Type` (device buffers) and XLA FFI's `XLA_FFI_DataType`
//! (custom-call frames). FFI follows `PrimitiveType`; PJRT differs for BF16 (16 in
//! `PrimitiveType`/FFI, 13 in PJRT), so every conversion goes through [`ElementType`].

pub use xla_data::{ElementType, NativeType};

/// The runtime numberings of an [`ElementType`]; import it to call these on the type
/// (`ElementType::from_pjrt_code(11)`, `t.ffi_code()`).
pub trait RuntimeCodes: Sized {
    /// The PJRT C API `PJRT_Buffer_Type` code.
    fn pjrt_code(self) -> u32;
    /// The inverse of [`RuntimeCodes::pjrt_code`].
    fn from_pjrt_code(v: u32) -> Option<Self>;
    /// The XLA FFI `XLA_FFI_DataType` code (same numbering as `PrimitiveType`).
    fn ffi_code(self) -> u32;
    /// The inverse of [`RuntimeCodes::ffi_code`].
    fn from_ffi_code(v: u32) -> Option<Self>;
}

impl RuntimeCodes for ElementType {
    fn pjrt_code(self) -> u32 {
        match self {
            ElementType::Bf16 => 13,
            other => other.primitive_type() as u32,
        }
    }

    fn from_pjrt_code(v: u32) -> Option<Self> {
        ElementType::ALL.into_iter().find(|t| t.pjrt_code() == v)
    }

    fn ffi_code(self) -> u32 {
        self.primitive_type() as u32
    }

    fn from_ffi_code(v: u32) -> Option<Self> {
        i32::try_from(v)
            .ok()
            .and_then(ElementType::from_primitive_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numberings_round_trip_and_differ_where_xla_does() {
        for t in ElementType::ALL {
            assert_eq!(
                ElementType::from_primitive_type(t.primitive_type()),
                Some(t)
            );
            assert_eq!(ElementType::from_pjrt_code(t.pjrt_code()), Some(t));
            assert_eq!(ElementType::from_ffi_code(t.ffi_code()), Some(t));
            assert_eq!(ElementType::from_name(t.name()), Some(t));
        }
        assert_eq!(ElementType::Bf16.primitive_type(), 16);
        assert_eq!(ElementType::Bf16.pjrt_code(), 13);
        assert_eq!(ElementType::F32.pjrt_code(), 11);
    }
}
