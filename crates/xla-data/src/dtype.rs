//! Element types: the one table of XLA's `PrimitiveType` numbers, names and sizes.
//!
//! XLA numbers element types in `xla_data.proto`'s `PrimitiveType`; HLO protos carry that number.
//! [`ElementType`] covers the array types this workspace computes with, and [`primitive_type`]
//! names the numbers it does not model (tuples, tokens, complex, f8, ...) so that any module can
//! be printed. Runtime numberings that differ (the PJRT C API's `PJRT_Buffer_Type`) are converted
//! in the runtime crate.

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

/// `PrimitiveType` numbers of the types that [`ElementType`] does not model.
pub mod primitive_type {
    /// `PRIMITIVE_TYPE_INVALID`.
    pub const INVALID: i32 = 0;
    /// `TUPLE`.
    pub const TUPLE: i32 = 13;
    /// `OPAQUE_TYPE`.
    pub const OPAQUE_TYPE: i32 = 14;
    /// `C64`.
    pub const C64: i32 = 15;
    /// `TOKEN`.
    pub const TOKEN: i32 = 17;
    /// `C128`.
    pub const C128: i32 = 18;
    /// `F8E5M2`.
    pub const F8E5M2: i32 = 19;
    /// `F8E4M3FN`.
    pub const F8E4M3FN: i32 = 20;
    /// `S4`.
    pub const S4: i32 = 21;
    /// `U4`.
    pub const U4: i32 = 22;
    /// `F8E4M3B11FNUZ`.
    pub const F8E4M3B11FNUZ: i32 = 23;
    /// `F8E5M2FNUZ`.
    pub const F8E5M2FNUZ: i32 = 24;
    /// `F8E4M3FNUZ`.
    pub const F8E4M3FNUZ: i32 = 25;
    /// `S2`.
    pub const S2: i32 = 26;
    /// `U2`.
    pub const U2: i32 = 27;
}

/// XLA's lowercase spelling of any `PrimitiveType` number, for printing any module (`f32`,
/// `tuple`, `f8e4m3fn`; `type{N}` for numbers newer than this table).
pub fn primitive_type_name(t: i32) -> String {
    if let Some(e) = ElementType::from_primitive_type(t) {
        return e.name().to_string();
    }
    use primitive_type as p;
    let s = match t {
        p::INVALID => "invalid",
        p::TUPLE => "tuple",
        p::OPAQUE_TYPE => "opaque",
        p::C64 => "c64",
        p::TOKEN => "token",
        p::C128 => "c128",
        p::F8E5M2 => "f8e5m2",
        p::F8E4M3FN => "f8e4m3fn",
        p::S4 => "s4",
        p::U4 => "u4",
        p::F8E4M3B11FNUZ => "f8e4m3b11fnuz",
        p::F8E5M2FNUZ => "f8e5m2fnuz",
        p::F8E4M3FNUZ => "f8e4m3fnuz",
        p::S2 => "s2",
        p::U2 => "u2",
        _ => return format!("type{t}"),
    };
    s.to_string()
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
    fn numberings_round_trip() {
        for t in ElementType::ALL {
            assert_eq!(
                ElementType::from_primitive_type(t.primitive_type()),
                Some(t)
            );
            assert_eq!(ElementType::from_name(t.name()), Some(t));
            assert_eq!(primitive_type_name(t.primitive_type()), t.name());
        }
        assert_eq!(ElementType::Bf16.primitive_type(), 16);
    }

    #[test]
    fn every_primitive_type_number_has_one_name() {
        let names: Vec<String> = (0..=27).map(primitive_type_name).collect();
        let unique: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with("type")), "{names:?}");
        assert_eq!(primitive_type_name(primitive_type::TUPLE), "tuple");
        assert_eq!(primitive_type_name(28), "type28");
    }
}
