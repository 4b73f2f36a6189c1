//! Shape rules of the kernel IR: pure functions of operand types (and attributes) giving the
//! result type, or a message naming the shapes. The builder ([`super::builder`]) calls them.

use super::ir::*;

pub(crate) fn tile_of<'a>(
    op: &str,
    what: &str,
    t: &'a Type,
) -> Result<(DType, &'a [usize]), String> {
    match t {
        Type::Tile(d, s) => Ok((*d, s)),
        Type::Scalar(_) => Err(format!("{op}: {what} must be a tile, got {t}")),
    }
}

pub(crate) fn shape_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    )
}

/// Result type of a binary op.
pub fn binary_rule(op: BinOp, a: &Type, b: &Type) -> Result<Type, String> {
    if a != b {
        return Err(format!("operands must have one type, got {a} and {b}"));
    }
    let ok = match op {
        BinOp::And => a.dtype() == DType::Bool,
        BinOp::Div | BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Max | BinOp::Min => {
            a.dtype() != DType::Bool
        }
    };
    if !ok {
        return Err(format!("{op:?} is not defined on {a}"));
    }
    Ok(a.clone())
}

/// Result type of a unary op.
pub fn unary_rule(x: &Type) -> Result<Type, String> {
    match x {
        Type::Tile(DType::F32, _) => Ok(x.clone()),
        _ => Err(format!("operand must be an f32 tile, got {x}")),
    }
}

/// Result type of a comparison.
pub fn compare_rule(a: &Type, b: &Type) -> Result<Type, String> {
    if a != b || a.dtype() == DType::Bool {
        return Err(format!(
            "operands must be one i32 or f32 type, got {a} and {b}"
        ));
    }
    Ok(match a {
        Type::Scalar(_) => Type::Scalar(DType::Bool),
        Type::Tile(_, s) => Type::Tile(DType::Bool, s.clone()),
    })
}

/// Result type of a select.
pub fn select_rule(c: &Type, a: &Type, b: &Type) -> Result<Type, String> {
    if a != b || c.dtype() != DType::Bool || c.shape() != a.shape() {
        return Err(format!(
            "need a predicate and two values of one shape, got cond {c}, {a}, {b}"
        ));
    }
    Ok(a.clone())
}

/// Result type of a dot.
pub fn dot_rule(a: &Type, b: &Type, acc: Option<&Type>) -> Result<Type, String> {
    let (da, sa) = tile_of("dot", "lhs", a)?;
    let (db, sb) = tile_of("dot", "rhs", b)?;
    if da != DType::F32 || db != DType::F32 || sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
        return Err(format!(
            "need f32 [m,k] · [k,n], got {a} · {b} (contracting dims {} and {})",
            sa.get(1).map_or("-".into(), |x| x.to_string()),
            sb.first().map_or("-".into(), |x| x.to_string())
        ));
    }
    let out = Type::Tile(DType::F32, vec![sa[0], sb[1]]);
    if let Some(c) = acc {
        if *c != out {
            return Err(format!("accumulator must be {out} for {a} · {b}, got {c}"));
        }
    }
    Ok(out)
}

/// Result type of a reduction.
pub fn reduce_rule(x: &Type, axis: usize) -> Result<Type, String> {
    let (d, s) = tile_of("reduce", "operand", x)?;
    if d != DType::F32 || s.len() != 2 || axis > 1 {
        return Err(format!(
            "need a 2-D f32 tile and axis 0 or 1, got {x} axis {axis}"
        ));
    }
    Ok(Type::Tile(d, vec![s[1 - axis]]))
}

/// Result type of expand_dims.
pub fn expand_rule(x: &Type, axis: usize) -> Result<Type, String> {
    let (d, s) = tile_of("expand_dims", "operand", x)?;
    if s.len() != 1 || axis > 1 {
        return Err(format!(
            "need a 1-D tile and axis 0 or 1, got {x} axis {axis}"
        ));
    }
    let mut out = s.to_vec();
    out.insert(axis, 1);
    Ok(Type::Tile(d, out))
}

/// Result type of broadcast.
pub fn broadcast_rule(x: &Type, shape: &[usize]) -> Result<Type, String> {
    let (d, s) = tile_of("broadcast", "operand", x)?;
    if s.len() != shape.len() || s.iter().zip(shape).any(|(&a, &b)| a != b && a != 1) {
        return Err(format!(
            "cannot broadcast {x} to {}: dims must match or be 1",
            shape_str(shape)
        ));
    }
    Ok(Type::Tile(d, shape.to_vec()))
}

/// Result type of transpose.
pub fn transpose_rule(x: &Type) -> Result<Type, String> {
    let (d, s) = tile_of("transpose", "operand", x)?;
    if s.len() != 2 {
        return Err(format!("need a 2-D tile, got {x}"));
    }
    Ok(Type::Tile(d, vec![s[1], s[0]]))
}

/// Tile shape of a load or store of `array` (block `block`) through `index`.
pub fn access_rule(
    array: &ArrayDecl,
    index: &[Index],
    types: &[Type],
) -> Result<Vec<usize>, String> {
    if index.len() != array.shape.len() {
        return Err(format!(
            "`{}` {} has rank {}, got {} indices",
            array.name,
            shape_str(&array.shape),
            array.shape.len(),
            index.len()
        ));
    }
    let mut shape = Vec::new();
    for (d, ix) in index.iter().enumerate() {
        let v = match ix {
            Index::At(v) => v,
            Index::Slice(v, len) => {
                if *len == 0 || *len > array.block.shape[d] {
                    return Err(format!(
                        "`{}`: slice of {len} along dim {d} must be 1..={} (the block {})",
                        array.name,
                        array.block.shape[d],
                        shape_str(&array.block.shape)
                    ));
                }
                shape.push(*len);
                v
            }
        };
        let t = &types[v.index()];
        if *t != Type::Scalar(DType::I32) {
            return Err(format!(
                "`{}`: index along dim {d} must be a scalar i32, got {t}",
                array.name
            ));
        }
    }
    if shape.is_empty() || shape.len() > 2 {
        return Err(format!(
            "`{}`: a tile has 1 or 2 sliced dims, got {} ({index:?})",
            array.name,
            shape.len()
        ));
    }
    Ok(shape)
}
