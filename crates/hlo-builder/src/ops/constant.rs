//! Leaves (instructions without operands): `parameter` (declared by [`Builder::parameter`]),
//! constants, scalars, filled arrays and `iota`. Leaves end the backward walk: their VJP sends
//! nothing further.

use std::any::Any;
use std::panic::Location;

use crate::autodiff::{Ct, Node};
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::shape_ops::ShapeOp;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{Shape, ShapeError, ShapeResult};
use crate::{ElementType, NativeType, Op};

/// Attributes of a leaf instruction.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Leaf {
    /// `parameter(number)`.
    Parameter(i64),
    /// A dense literal.
    Constant(Literal),
    /// `iota` along the dimension.
    Iota(i64),
}

impl Family for Leaf {
    fn opcode(&self) -> &'static str {
        match self {
            Leaf::Parameter(_) => "parameter",
            Leaf::Constant(_) => "constant",
            Leaf::Iota(_) => "iota",
        }
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        match self {
            Leaf::Parameter(n) => p.parameter_number = *n,
            Leaf::Constant(l) => p.literal = Some(l.to_proto()),
            Leaf::Iota(d) => p.dimensions = vec![*d],
        }
    }

    /// No operands: the cotangent stops here (a parameter's is read off by the walk).
    fn vjp(&self, _b: &Builder, _n: &Node, _ct: Ct) -> Result<Vec<Option<Ct>>> {
        Ok(Vec::new())
    }
}

/// The values of a constant, one vector per element type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LiteralData {
    Pred(Vec<bool>),
    S8(Vec<i8>),
    S16(Vec<i16>),
    S32(Vec<i32>),
    S64(Vec<i64>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// A dense array constant (row-major values).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Literal {
    pub(crate) shape: Shape,
    pub(crate) data: LiteralData,
}

fn take<T: 'static, U: 'static>(v: Vec<T>) -> Option<Vec<U>> {
    let b: Box<dyn Any> = Box::new(v);
    b.downcast::<Vec<U>>().ok().map(|b| *b)
}

impl LiteralData {
    /// Wrap a vector of any [`NativeType`]; `None` if `T` is not the Rust type of `T::TYPE`.
    fn from_vec<T: NativeType>(v: Vec<T>) -> Option<LiteralData> {
        Some(match T::TYPE {
            ElementType::Pred => LiteralData::Pred(take(v)?),
            ElementType::S8 => LiteralData::S8(take(v)?),
            ElementType::S16 => LiteralData::S16(take(v)?),
            ElementType::S32 => LiteralData::S32(take(v)?),
            ElementType::S64 => LiteralData::S64(take(v)?),
            ElementType::U8 => LiteralData::U8(take(v)?),
            ElementType::U16 => LiteralData::U16(take(v)?),
            ElementType::U32 => LiteralData::U32(take(v)?),
            ElementType::U64 => LiteralData::U64(take(v)?),
            ElementType::F16 => LiteralData::F16(take(v)?),
            ElementType::Bf16 => LiteralData::Bf16(take(v)?),
            ElementType::F32 => LiteralData::F32(take(v)?),
            ElementType::F64 => LiteralData::F64(take(v)?),
        })
    }

    /// `n` copies of `v` converted to `ty` (saturating `as` casts for integers).
    fn splat(ty: ElementType, v: f64, n: usize) -> LiteralData {
        match ty {
            ElementType::Pred => LiteralData::Pred(vec![v != 0.0; n]),
            ElementType::S8 => LiteralData::S8(vec![v as i8; n]),
            ElementType::S16 => LiteralData::S16(vec![v as i16; n]),
            ElementType::S32 => LiteralData::S32(vec![v as i32; n]),
            ElementType::S64 => LiteralData::S64(vec![v as i64; n]),
            ElementType::U8 => LiteralData::U8(vec![v as u8; n]),
            ElementType::U16 => LiteralData::U16(vec![v as u16; n]),
            ElementType::U32 => LiteralData::U32(vec![v as u32; n]),
            ElementType::U64 => LiteralData::U64(vec![v as u64; n]),
            ElementType::F16 => LiteralData::F16(vec![half::f16::from_f64(v); n]),
            ElementType::Bf16 => LiteralData::Bf16(vec![half::bf16::from_f64(v); n]),
            ElementType::F32 => LiteralData::F32(vec![v as f32; n]),
            ElementType::F64 => LiteralData::F64(vec![v; n]),
        }
    }

    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        match self {
            LiteralData::Pred(v) => v.len(),
            LiteralData::S8(v) => v.len(),
            LiteralData::S16(v) => v.len(),
            LiteralData::S32(v) => v.len(),
            LiteralData::S64(v) => v.len(),
            LiteralData::U8(v) => v.len(),
            LiteralData::U16(v) => v.len(),
            LiteralData::U32(v) => v.len(),
            LiteralData::U64(v) => v.len(),
            LiteralData::F16(v) => v.len(),
            LiteralData::Bf16(v) => v.len(),
            LiteralData::F32(v) => v.len(),
            LiteralData::F64(v) => v.len(),
        }
    }

    /// Element `i` as f64 (for passes that fold constants).
    #[allow(dead_code)]
    pub(crate) fn get_f64(&self, i: usize) -> Option<f64> {
        Some(match self {
            LiteralData::Pred(v) => f64::from(u8::from(*v.get(i)?)),
            LiteralData::S8(v) => f64::from(*v.get(i)?),
            LiteralData::S16(v) => f64::from(*v.get(i)?),
            LiteralData::S32(v) => f64::from(*v.get(i)?),
            LiteralData::S64(v) => *v.get(i)? as f64,
            LiteralData::U8(v) => f64::from(*v.get(i)?),
            LiteralData::U16(v) => f64::from(*v.get(i)?),
            LiteralData::U32(v) => f64::from(*v.get(i)?),
            LiteralData::U64(v) => *v.get(i)? as f64,
            LiteralData::F16(v) => v.get(i)?.to_f64(),
            LiteralData::Bf16(v) => v.get(i)?.to_f64(),
            LiteralData::F32(v) => f64::from(*v.get(i)?),
            LiteralData::F64(v) => *v.get(i)?,
        })
    }
}

fn le_bytes<T, const N: usize>(v: &[T], f: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(f).collect()
}

impl Literal {
    /// The `LiteralProto`.
    pub(crate) fn to_proto(&self) -> proto::LiteralProto {
        let mut p = proto::LiteralProto {
            shape: Some(self.shape.to_proto()),
            ..Default::default()
        };
        match &self.data {
            LiteralData::Pred(v) => p.preds = v.clone(),
            LiteralData::S8(v) => p.s8s = v.iter().map(|x| *x as u8).collect(),
            LiteralData::S16(v) => p.s16s = le_bytes(v, |x| x.to_le_bytes()),
            LiteralData::S32(v) => p.s32s = v.clone(),
            LiteralData::S64(v) => p.s64s = v.clone(),
            LiteralData::U8(v) => p.u8s = v.clone(),
            LiteralData::U16(v) => p.u16s = le_bytes(v, |x| x.to_le_bytes()),
            LiteralData::U32(v) => p.u32s = v.clone(),
            LiteralData::U64(v) => p.u64s = v.clone(),
            LiteralData::F16(v) => p.f16s = le_bytes(v, |x| x.to_le_bytes()),
            LiteralData::Bf16(v) => p.bf16s = le_bytes(v, |x| x.to_le_bytes()),
            LiteralData::F32(v) => p.f32s = v.clone(),
            LiteralData::F64(v) => p.f64s = v.clone(),
        }
        p
    }
}

/// Shape rule of `iota`.
pub fn iota(ty: ElementType, dims: &[i64], iota_dim: usize) -> ShapeResult {
    if iota_dim >= dims.len() {
        return Err(ShapeError::new(
            "iota",
            format!(
                "iota_dimension {iota_dim} out of range for {}",
                Shape::array(ty, dims).short()
            ),
        ));
    }
    if ty == ElementType::Pred {
        return Err(ShapeError::new(
            "iota",
            "element type pred is not supported",
        ));
    }
    check_dims("iota", dims)?;
    Ok(Shape::array(ty, dims))
}

pub(crate) fn check_dims(op: &'static str, dims: &[i64]) -> Result<(), ShapeError> {
    if dims.iter().any(|&d| d < 0) {
        return Err(ShapeError::new(
            op,
            format!("negative dimension in {dims:?}"),
        ));
    }
    Ok(())
}

impl Builder {
    /// A constant array with the values of `array` (any memory order; stored row-major).
    #[track_caller]
    pub fn constant<T: NativeType>(&self, array: ndarray::ArrayViewD<T>) -> Result<Op> {
        let dims: Vec<i64> = array.shape().iter().map(|&d| d as i64).collect();
        self.constant_vec(array.iter().copied().collect(), &dims)
    }

    /// A constant from a flat row-major vector and dims.
    #[track_caller]
    pub fn constant_vec<T: NativeType>(&self, values: Vec<T>, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        check_dims("constant", dims).map_err(|e| self.shape_err(loc, e))?;
        let n: i64 = dims.iter().product();
        if n as usize != values.len() {
            return Err(self.shape_err(
                loc,
                ShapeError::new(
                    "constant",
                    format!(
                        "{} values do not fill dims {dims:?} ({n} elements)",
                        values.len()
                    ),
                ),
            ));
        }
        let data = LiteralData::from_vec(values).ok_or_else(|| {
            self.error_at(
                loc,
                "constant",
                format!(
                    "Rust type {} is not the native type of {}",
                    std::any::type_name::<T>(),
                    T::TYPE
                ),
            )
        })?;
        let shape = Shape::array(T::TYPE, dims);
        Ok(self.push(
            loc,
            Kind::Leaf(Leaf::Constant(Literal {
                shape: shape.clone(),
                data,
            })),
            Vec::new(),
            shape,
            Vec::new(),
        ))
    }

    /// A rank-0 constant.
    #[track_caller]
    pub fn scalar<T: NativeType>(&self, v: T) -> Result<Op> {
        self.constant_vec(vec![v], &[])
    }

    /// A rank-0 constant of element type `ty` holding `v` (converted with `as` semantics).
    #[track_caller]
    pub fn scalar_typed(&self, ty: ElementType, v: f64) -> Result<Op> {
        let loc = Location::caller();
        let shape = Shape::scalar(ty);
        let lit = Literal {
            shape: shape.clone(),
            data: LiteralData::splat(ty, v, 1),
        };
        Ok(self.push(
            loc,
            Kind::Leaf(Leaf::Constant(lit)),
            Vec::new(),
            shape,
            Vec::new(),
        ))
    }

    /// An array of `dims` filled with `v` (a scalar constant broadcast, so it stays small).
    #[track_caller]
    pub fn full(&self, ty: ElementType, v: f64, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        check_dims("full", dims).map_err(|e| self.shape_err(loc, e))?;
        let s = self.scalar_typed(ty, v)?;
        if dims.is_empty() {
            return Ok(s);
        }
        Ok(self.push(
            loc,
            Kind::Shape(ShapeOp::Broadcast(Vec::new())),
            vec![s],
            Shape::array(ty, dims),
            Vec::new(),
        ))
    }

    /// An array of zeros.
    #[track_caller]
    pub fn zeros(&self, ty: ElementType, dims: &[i64]) -> Result<Op> {
        self.full(ty, 0.0, dims)
    }

    /// An array of ones.
    #[track_caller]
    pub fn ones(&self, ty: ElementType, dims: &[i64]) -> Result<Op> {
        self.full(ty, 1.0, dims)
    }

    /// `0, 1, 2, ...` along `iota_dim`, repeated along the other dims.
    #[track_caller]
    pub fn iota(&self, ty: ElementType, dims: &[i64], iota_dim: usize) -> Result<Op> {
        let loc = Location::caller();
        let out = iota(ty, dims, iota_dim).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Leaf(Leaf::Iota(iota_dim as i64)),
            Vec::new(),
            out,
            Vec::new(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_protos() {
        let l = Literal {
            shape: Shape::array(ElementType::Bf16, &[2]),
            data: LiteralData::from_vec(vec![
                half::bf16::from_f32(1.0),
                half::bf16::from_f32(-2.0),
            ])
            .unwrap(),
        };
        let p = l.to_proto();
        assert_eq!(p.bf16s, vec![0x80, 0x3f, 0x00, 0xc0]);
        let l = Literal {
            shape: Shape::array(ElementType::S32, &[3]),
            data: LiteralData::from_vec(vec![1i32, -2, 3]).unwrap(),
        };
        assert_eq!(l.to_proto().s32s, vec![1, -2, 3]);
        assert_eq!(l.data.len(), 3);
        assert_eq!(l.data.get_f64(1), Some(-2.0));
        assert!(iota(ElementType::F32, &[2, 3], 2).is_err());
        assert_eq!(
            iota(ElementType::S32, &[4], 0),
            Ok(Shape::array(ElementType::S32, &[4]))
        );
    }
}
