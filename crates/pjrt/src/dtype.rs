//! Element types and their three numberings.
//!
//! XLA numbers element types three ways: `xla_data.proto`'s `PrimitiveType` (used in HLO protos),
//! the PJRT C API's `PJRT_Buffer_Type` (used for device buffers), and XLA FFI's `XLA_FFI_DataType`
//! (used in custom-call frames; it follows `PrimitiveType`). They agree for most types but not for
//! all (BF16 is 16 in `PrimitiveType`/FFI and 13 in PJRT), so every conversion goes through
//! [`ElementType`].

use std::fmt;

/// An array element type known to the whole workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElementType {
    /// Boolean (`pred`).
    Pred,
    /// Signed 8-bit integer.
    S8,
    /// Signed 16-bit integer.
    S16,
    /// Signed 32-bit integer.
    S32,
    /// Signed 64-bit integer.
    S64,
    /// Unsigned 8-bit integer.
    U8,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

impl ElementType {
    /// Every element type, in `PrimitiveType` order.
    pub const ALL: [ElementType; 13] = [
        Self::Pred,
        Self::S8,
        Self::S16,
        Self::S32,
        Self::S64,
        Self::U8,
        Self::U16,
        Self::U32,
        Self::U64,
        Self::F16,
        Self::Bf16,
        Self::F32,
        Self::F64,
    ];

    /// The `xla_data.proto` `PrimitiveType` number (also XLA FFI's `XLA_FFI_DataType`).
    pub const fn primitive_type(self) -> i32 {
        match self {
            Self::Pred => 1,
            Self::S8 => 2,
            Self::S16 => 3,
            Self::S32 => 4,
            Self::S64 => 5,
            Self::U8 => 6,
            Self::U16 => 7,
            Self::U32 => 8,
            Self::U64 => 9,
            Self::F16 => 10,
            Self::F32 => 11,
            Self::F64 => 12,
            Self::Bf16 => 16,
        }
    }

    /// The inverse of [`ElementType::primitive_type`].
    pub fn from_primitive_type(v: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.primitive_type() == v)
    }

    /// The XLA FFI `XLA_FFI_DataType` code (same numbering as `PrimitiveType`).
    pub const fn ffi_code(self) -> u32 {
        self.primitive_type() as u32
    }

    /// The inverse of [`ElementType::ffi_code`].
    pub fn from_ffi_code(v: u32) -> Option<Self> {
        Self::from_primitive_type(v as i32)
    }

    /// The PJRT C API `PJRT_Buffer_Type` code.
    pub const fn pjrt_code(self) -> u32 {
        match self {
            Self::Bf16 => 13,
            other => other.primitive_type() as u32,
        }
    }

    /// The inverse of [`ElementType::pjrt_code`].
    pub fn from_pjrt_code(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.pjrt_code() == v)
    }

    /// Size of one element in bytes (pred is stored as one byte).
    pub const fn byte_size(self) -> usize {
        match self {
            Self::Pred | Self::S8 | Self::U8 => 1,
            Self::S16 | Self::U16 | Self::F16 | Self::Bf16 => 2,
            Self::S32 | Self::U32 | Self::F32 => 4,
            Self::S64 | Self::U64 | Self::F64 => 8,
        }
    }

    /// True for floating-point types (the differentiable ones).
    pub const fn is_float(self) -> bool {
        matches!(self, Self::F16 | Self::Bf16 | Self::F32 | Self::F64)
    }

    /// True for signed and unsigned integer types.
    pub const fn is_integer(self) -> bool {
        !self.is_float() && !matches!(self, Self::Pred)
    }

    /// True for signed integer types.
    pub const fn is_signed_integer(self) -> bool {
        matches!(self, Self::S8 | Self::S16 | Self::S32 | Self::S64)
    }

    /// XLA's lowercase spelling, as in HLO text (`f32`, `bf16`, `pred`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pred => "pred",
            Self::S8 => "s8",
            Self::S16 => "s16",
            Self::S32 => "s32",
            Self::S64 => "s64",
            Self::U8 => "u8",
            Self::U16 => "u16",
            Self::U32 => "u32",
            Self::U64 => "u64",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
            Self::F64 => "f64",
        }
    }

    /// Parse XLA's lowercase spelling.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that maps to an [`ElementType`] and can cross the host/device boundary as raw bytes.
///
/// Implemented for `bool` (pred), `i8`..`i64`, `u8`..`u64`, `half::f16`, `half::bf16`, `f32`, `f64`.
pub trait NativeType: Copy + Default + Send + Sync + 'static {
    /// The element type of this Rust type.
    const TYPE: ElementType;
}

macro_rules! native {
    ($($t:ty => $e:ident),* $(,)?) => { $(impl NativeType for $t { const TYPE: ElementType = ElementType::$e; })* };
}
native!(bool => Pred, i8 => S8, i16 => S16, i32 => S32, i64 => S64, u8 => U8, u16 => U16,
        u32 => U32, u64 => U64, half::f16 => F16, half::bf16 => Bf16, f32 => F32, f64 => F64);

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
