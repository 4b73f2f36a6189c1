//! Array and tuple shapes, their `ShapeProto` form and their HLO text spelling.

use std::fmt;

use crate::proto;
use crate::ElementType;

/// The shape of an HLO value: a dense array (element type + dimensions, default row-major layout)
/// or a tuple of shapes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A dense array with a row-major (`{rank-1,...,0}`) layout.
    Array {
        /// Element type.
        ty: ElementType,
        /// Dimension sizes, major to minor.
        dims: Vec<i64>,
    },
    /// A tuple of shapes.
    Tuple(Vec<Shape>),
}

impl Shape {
    /// An array shape.
    pub fn array(ty: ElementType, dims: &[i64]) -> Shape {
        Shape::Array {
            ty,
            dims: dims.to_vec(),
        }
    }

    /// A rank-0 array shape.
    pub fn scalar(ty: ElementType) -> Shape {
        Shape::Array {
            ty,
            dims: Vec::new(),
        }
    }

    /// A tuple shape.
    pub fn tuple(elements: Vec<Shape>) -> Shape {
        Shape::Tuple(elements)
    }

    /// Dimensions of an array (empty for a tuple).
    pub fn dims(&self) -> &[i64] {
        match self {
            Shape::Array { dims, .. } => dims,
            Shape::Tuple(_) => &[],
        }
    }

    /// Element type of an array (`None` for a tuple).
    pub fn ty(&self) -> Option<ElementType> {
        match self {
            Shape::Array { ty, .. } => Some(*ty),
            Shape::Tuple(_) => None,
        }
    }

    /// Rank of an array (0 for a tuple).
    pub fn rank(&self) -> usize {
        self.dims().len()
    }

    /// Number of elements of an array (product of dims; 1 for a scalar, 0 for a tuple).
    pub fn numel(&self) -> i64 {
        match self {
            Shape::Array { dims, .. } => dims.iter().product(),
            Shape::Tuple(_) => 0,
        }
    }

    /// True for arrays.
    pub fn is_array(&self) -> bool {
        matches!(self, Shape::Array { .. })
    }

    /// True for rank-0 arrays.
    pub fn is_scalar(&self) -> bool {
        matches!(self, Shape::Array { dims, .. } if dims.is_empty())
    }

    /// Tuple elements (`None` for an array).
    pub fn tuple_elements(&self) -> Option<&[Shape]> {
        match self {
            Shape::Tuple(e) => Some(e),
            Shape::Array { .. } => None,
        }
    }

    /// Size in bytes of the array data (sum over tuple elements).
    pub fn byte_size(&self) -> usize {
        match self {
            Shape::Array { ty, dims } => ty.byte_size() * dims.iter().product::<i64>() as usize,
            Shape::Tuple(e) => e.iter().map(Shape::byte_size).sum(),
        }
    }

    /// The same dims with another element type (arrays only; tuples are returned unchanged).
    pub fn with_ty(&self, ty: ElementType) -> Shape {
        match self {
            Shape::Array { dims, .. } => Shape::Array {
                ty,
                dims: dims.clone(),
            },
            t => t.clone(),
        }
    }

    /// The same element type with other dims (arrays only; tuples are returned unchanged).
    pub fn with_dims(&self, dims: &[i64]) -> Shape {
        match self {
            Shape::Array { ty, .. } => Shape::Array {
                ty: *ty,
                dims: dims.to_vec(),
            },
            t => t.clone(),
        }
    }

    /// The shape without layout, as in error messages and computation headers: `f32[2,3]`.
    pub fn short(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, false);
        s
    }

    fn write(&self, out: &mut String, layout: bool) {
        use std::fmt::Write;
        match self {
            Shape::Array { ty, dims } => {
                let _ = write!(out, "{}[{}]", ty.name(), join(dims));
                if layout && !dims.is_empty() {
                    let m2m: Vec<i64> = (0..dims.len() as i64).rev().collect();
                    let _ = write!(out, "{{{}}}", join(&m2m));
                }
            }
            Shape::Tuple(e) => {
                out.push('(');
                for (i, s) in e.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    s.write(out, layout);
                }
                out.push(')');
            }
        }
    }

    /// The `ShapeProto`, with a default row-major layout on every array.
    pub fn to_proto(&self) -> proto::ShapeProto {
        match self {
            Shape::Array { ty, dims } => proto::ShapeProto {
                element_type: ty.primitive_type(),
                dimensions: dims.clone(),
                tuple_shapes: Vec::new(),
                layout: Some(proto::LayoutProto {
                    minor_to_major: (0..dims.len() as i64).rev().collect(),
                    ..Default::default()
                }),
                is_dynamic_dimension: Vec::new(),
            },
            Shape::Tuple(e) => proto::ShapeProto {
                element_type: proto::primitive_type::TUPLE,
                tuple_shapes: e.iter().map(Shape::to_proto).collect(),
                ..Default::default()
            },
        }
    }

    /// Parse a `ShapeProto` (layouts are ignored). `None` for element types this crate does not
    /// model (tokens, f8, complex, ...).
    pub fn from_proto(p: &proto::ShapeProto) -> Option<Shape> {
        if p.element_type == proto::primitive_type::TUPLE {
            return p
                .tuple_shapes
                .iter()
                .map(Shape::from_proto)
                .collect::<Option<Vec<_>>>()
                .map(Shape::Tuple);
        }
        let ty = ElementType::from_primitive_type(p.element_type)?;
        Some(Shape::Array {
            ty,
            dims: p.dimensions.clone(),
        })
    }
}

/// `f32[2,3]{1,0}` (scalars `f32[]`, tuples `(f32[2]{0}, s32[])`).
impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        self.write(&mut s, true);
        f.write_str(&s)
    }
}

fn join(v: &[i64]) -> String {
    let mut s = String::new();
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&x.to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_proto() {
        let s = Shape::array(ElementType::F32, &[2, 3]);
        assert_eq!(s.to_string(), "f32[2,3]{1,0}");
        assert_eq!(s.short(), "f32[2,3]");
        assert_eq!(Shape::scalar(ElementType::S32).to_string(), "s32[]");
        let t = Shape::tuple(vec![s.clone(), Shape::scalar(ElementType::Pred)]);
        assert_eq!(t.to_string(), "(f32[2,3]{1,0}, pred[])");
        let p = s.to_proto();
        assert_eq!(p.layout.as_ref().unwrap().minor_to_major, vec![1, 0]);
        assert_eq!(Shape::from_proto(&p), Some(s.clone()));
        assert_eq!(Shape::from_proto(&t.to_proto()), Some(t));
        assert_eq!(s.numel(), 6);
        assert_eq!(s.byte_size(), 24);
    }
}
