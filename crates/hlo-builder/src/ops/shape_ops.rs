//! Data-movement ops: reshape, transpose, broadcast, reverse, slices, concatenate, pad.

use std::panic::Location;

use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::constant::check_dims;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{check_dim, expect_array, Shape, ShapeError, ShapeResult};
use crate::{ElementType, Op};

/// Shape rule of `reshape`: same element count.
pub fn reshape(x: &Shape, dims: &[i64]) -> ShapeResult {
    let (ty, _) = expect_array("reshape", "operand", x)?;
    check_dims("reshape", dims)?;
    let n: i64 = dims.iter().product();
    if n != x.numel() {
        return Err(ShapeError::new(
            "reshape",
            format!(
                "cannot reshape {} ({} elements) to {dims:?} ({n} elements)",
                x.short(),
                x.numel()
            ),
        ));
    }
    Ok(Shape::array(ty, dims))
}

/// Shape rule of `transpose`: `out[i] = in[perm[i]]`.
pub fn transpose(x: &Shape, perm: &[i64]) -> ShapeResult {
    let (ty, dims) = expect_array("transpose", "operand", x)?;
    let mut seen = vec![false; dims.len()];
    if perm.len() != dims.len()
        || perm.iter().any(|&p| {
            p < 0 || p as usize >= dims.len() || std::mem::replace(&mut seen[p as usize], true)
        })
    {
        return Err(ShapeError::new(
            "transpose",
            format!("{perm:?} is not a permutation of the dims of {}", x.short()),
        ));
    }
    Ok(Shape::array(
        ty,
        &perm.iter().map(|&p| dims[p as usize]).collect::<Vec<_>>(),
    ))
}

/// Shape rule of `broadcast_in_dim`: operand dim `i` maps to output dim `broadcast_dims[i]`
/// (strictly increasing); sizes must be equal or 1.
pub fn broadcast_in_dim(x: &Shape, out_dims: &[i64], broadcast_dims: &[i64]) -> ShapeResult {
    let (ty, dims) = expect_array("broadcast_in_dim", "operand", x)?;
    check_dims("broadcast_in_dim", out_dims)?;
    if broadcast_dims.len() != dims.len() {
        return Err(ShapeError::new(
            "broadcast_in_dim",
            format!(
                "broadcast_dimensions {broadcast_dims:?} must have one entry per operand dim of {}",
                x.short()
            ),
        ));
    }
    for (i, &bd) in broadcast_dims.iter().enumerate() {
        if bd < 0 || bd as usize >= out_dims.len() || (i > 0 && bd <= broadcast_dims[i - 1]) {
            return Err(ShapeError::new(
                "broadcast_in_dim",
                format!("broadcast_dimensions {broadcast_dims:?} must be strictly increasing and < {} (output {:?})", out_dims.len(), out_dims),
            ));
        }
        let (a, b) = (dims[i], out_dims[bd as usize]);
        if a != b && a != 1 {
            return Err(ShapeError::new(
                "broadcast_in_dim",
                format!("operand dim {i} (size {a}) cannot broadcast to output dim {bd} (size {b}): operand {}, output {:?}", x.short(), out_dims),
            ));
        }
    }
    Ok(Shape::array(ty, out_dims))
}

/// Shape rule of `reverse`.
pub fn reverse(x: &Shape, rdims: &[i64]) -> ShapeResult {
    let (_, dims) = expect_array("reverse", "operand", x)?;
    for &d in rdims {
        check_dim("reverse", "dimension", d, dims.len(), x)?;
    }
    Ok(x.clone())
}

/// Shape rule of a static strided `slice`.
pub fn slice(x: &Shape, start: &[i64], limit: &[i64], strides: &[i64]) -> ShapeResult {
    let (ty, dims) = expect_array("slice", "operand", x)?;
    if start.len() != dims.len() || limit.len() != dims.len() || strides.len() != dims.len() {
        return Err(ShapeError::new("slice", format!("start {start:?}, limit {limit:?}, strides {strides:?} must each have rank {} of {}", dims.len(), x.short())));
    }
    let mut out = Vec::with_capacity(dims.len());
    for i in 0..dims.len() {
        let (s, l, st) = (start[i], limit[i], strides[i]);
        if s < 0 || l < s || l > dims[i] || st < 1 {
            return Err(ShapeError::new(
                "slice",
                format!(
                    "dim {i}: [{s}:{l}:{st}] is out of bounds for size {} of {}",
                    dims[i],
                    x.short()
                ),
            ));
        }
        out.push((l - s + st - 1) / st);
    }
    Ok(Shape::array(ty, &out))
}

/// Shape rule of `dynamic_slice` (start indices are scalar integers of one type).
pub fn dynamic_slice(x: &Shape, starts: &[Shape], sizes: &[i64]) -> ShapeResult {
    let (ty, dims) = expect_array("dynamic_slice", "operand", x)?;
    check_start_indices("dynamic_slice", x, starts)?;
    if sizes.len() != dims.len() {
        return Err(ShapeError::new(
            "dynamic_slice",
            format!(
                "sizes {sizes:?} must have rank {} of {}",
                dims.len(),
                x.short()
            ),
        ));
    }
    for (i, (&s, &d)) in sizes.iter().zip(dims).enumerate() {
        if s < 0 || s > d {
            return Err(ShapeError::new(
                "dynamic_slice",
                format!("size {s} of dim {i} exceeds {} of {}", d, x.short()),
            ));
        }
    }
    Ok(Shape::array(ty, sizes))
}

fn check_start_indices(op: &'static str, x: &Shape, starts: &[Shape]) -> Result<(), ShapeError> {
    if starts.len() != x.rank() {
        return Err(ShapeError::new(
            op,
            format!(
                "needs {} start indices for {}, got {}",
                x.rank(),
                x.short(),
                starts.len()
            ),
        ));
    }
    let first = starts.first().and_then(Shape::ty);
    for (i, s) in starts.iter().enumerate() {
        let ok = s.is_scalar() && s.ty().is_some_and(ElementType::is_integer) && s.ty() == first;
        if !ok {
            return Err(ShapeError::new(
                op,
                format!(
                    "start index {i} must be a scalar integer of the same type as index 0, got {}",
                    s.short()
                ),
            ));
        }
    }
    Ok(())
}

/// Shape rule of `dynamic_update_slice`.
pub fn dynamic_update_slice(x: &Shape, update: &Shape, starts: &[Shape]) -> ShapeResult {
    let (ty, dims) = expect_array("dynamic_update_slice", "operand", x)?;
    let (uty, udims) = expect_array("dynamic_update_slice", "update", update)?;
    check_start_indices("dynamic_update_slice", x, starts)?;
    if uty != ty || udims.len() != dims.len() || udims.iter().zip(dims).any(|(u, d)| u > d) {
        return Err(ShapeError::new(
            "dynamic_update_slice",
            format!(
                "update {} must have the type and rank of operand {} and fit inside it",
                update.short(),
                x.short()
            ),
        ));
    }
    Ok(x.clone())
}

/// Shape rule of `concatenate` along `dim`.
pub fn concatenate(xs: &[Shape], dim: i64) -> ShapeResult {
    let first = xs
        .first()
        .ok_or_else(|| ShapeError::new("concatenate", "needs at least one operand"))?;
    let (ty, dims) = expect_array("concatenate", "operand 0", first)?;
    let d = check_dim("concatenate", "dimension", dim, dims.len(), first)?;
    let mut out = dims.to_vec();
    for (i, s) in xs.iter().enumerate().skip(1) {
        let (t, ds) = expect_array("concatenate", "operand", s)?;
        let ok = t == ty
            && ds.len() == dims.len()
            && ds
                .iter()
                .zip(dims)
                .enumerate()
                .all(|(j, (a, b))| j == d || a == b);
        if !ok {
            return Err(ShapeError::new(
                "concatenate",
                format!(
                    "operand {i} {} does not match operand 0 {} outside dimension {d}",
                    s.short(),
                    first.short()
                ),
            ));
        }
        out[d] += ds[d];
    }
    Ok(Shape::array(ty, &out))
}

/// Shape rule of `pad`: per dim `(low, high, interior)`; low/high may be negative.
pub fn pad(x: &Shape, value: &Shape, config: &[(i64, i64, i64)]) -> ShapeResult {
    let (ty, dims) = expect_array("pad", "operand", x)?;
    if value.ty() != Some(ty) || !value.is_scalar() {
        return Err(ShapeError::new(
            "pad",
            format!(
                "padding value must be a scalar {ty}, got {} for operand {}",
                value.short(),
                x.short()
            ),
        ));
    }
    if config.len() != dims.len() {
        return Err(ShapeError::new(
            "pad",
            format!(
                "padding config has {} entries for rank-{} operand {}",
                config.len(),
                dims.len(),
                x.short()
            ),
        ));
    }
    let mut out = Vec::with_capacity(dims.len());
    for (i, (&(lo, hi, interior), &d)) in config.iter().zip(dims).enumerate() {
        let n = lo + hi + d + (d - 1).max(0) * interior;
        if interior < 0 || n < 0 {
            return Err(ShapeError::new(
                "pad",
                format!(
                    "dim {i}: padding ({lo}, {hi}, {interior}) of size {d} is invalid for {}",
                    x.short()
                ),
            ));
        }
        out.push(n);
    }
    Ok(Shape::array(ty, &out))
}

impl Builder {
    /// Reshape to `dims` (row-major element order).
    #[track_caller]
    pub fn reshape(&self, x: Op, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "reshape", x)?;
        let out = reshape(&s, dims).map_err(|e| self.shape_err(loc, e))?;
        if out == s {
            return Ok(x);
        }
        Ok(self.push(loc, Kind::Shape(ShapeOp::Reshape), vec![x], out, Vec::new()))
    }

    /// Permute dimensions: output dim `i` is input dim `perm[i]`.
    #[track_caller]
    pub fn transpose(&self, x: Op, perm: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "transpose", x)?;
        let out = transpose(&s, perm).map_err(|e| self.shape_err(loc, e))?;
        if perm.iter().enumerate().all(|(i, &p)| i as i64 == p) {
            return Ok(x);
        }
        Ok(self.push(
            loc,
            Kind::Shape(ShapeOp::Transpose(perm.to_vec())),
            vec![x],
            out,
            Vec::new(),
        ))
    }

    /// Broadcast to `out_dims`, operand dim `i` becoming output dim `broadcast_dims[i]`. Size-1
    /// operand dims may expand (they are reshaped away first, as HLO's broadcast needs).
    #[track_caller]
    pub fn broadcast_in_dim(&self, x: Op, out_dims: &[i64], broadcast_dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "broadcast_in_dim", x)?;
        let out =
            broadcast_in_dim(&s, out_dims, broadcast_dims).map_err(|e| self.shape_err(loc, e))?;
        if out == s {
            return Ok(x);
        }
        let dims = s.dims();
        let keep: Vec<usize> = (0..dims.len())
            .filter(|&i| dims[i] == out_dims[broadcast_dims[i] as usize])
            .collect();
        let (mut operand, mut bdims) = (x, broadcast_dims.to_vec());
        if keep.len() != dims.len() {
            let kept_dims: Vec<i64> = keep.iter().map(|&i| dims[i]).collect();
            operand = self.push(
                loc,
                Kind::Shape(ShapeOp::Reshape),
                vec![x],
                s.with_dims(&kept_dims),
                Vec::new(),
            );
            bdims = keep.iter().map(|&i| broadcast_dims[i]).collect();
        }
        Ok(self.push(
            loc,
            Kind::Shape(ShapeOp::Broadcast(bdims)),
            vec![operand],
            out,
            Vec::new(),
        ))
    }

    /// Reverse the order of elements along `dims`.
    #[track_caller]
    pub fn reverse(&self, x: Op, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "reverse", x)?;
        let out = reverse(&s, dims).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Shape(ShapeOp::Reverse(dims.to_vec())),
            vec![x],
            out,
            Vec::new(),
        ))
    }

    /// Static strided slice `[start, limit)` with `strides`.
    #[track_caller]
    pub fn slice(&self, x: Op, start: &[i64], limit: &[i64], strides: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "slice", x)?;
        let out = slice(&s, start, limit, strides).map_err(|e| self.shape_err(loc, e))?;
        let kind = Kind::Shape(ShapeOp::Slice {
            start: start.to_vec(),
            limit: limit.to_vec(),
            strides: strides.to_vec(),
        });
        Ok(self.push(loc, kind, vec![x], out, Vec::new()))
    }

    /// Slice `[start, limit)` of one dimension (unit stride).
    #[track_caller]
    pub fn slice_in_dim(&self, x: Op, start: i64, limit: i64, dim: usize) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "slice_in_dim", x)?;
        if dim >= s.rank() {
            return Err(self.shape_err(
                loc,
                ShapeError::new(
                    "slice_in_dim",
                    format!("dim {dim} out of range for {}", s.short()),
                ),
            ));
        }
        let mut st = vec![0; s.rank()];
        let mut li = s.dims().to_vec();
        st[dim] = start;
        li[dim] = limit;
        self.slice(x, &st, &li, &vec![1; s.rank()])
    }

    /// Slice of `sizes` at run-time `starts` (scalar integers; clamped into range by XLA).
    #[track_caller]
    pub fn dynamic_slice(&self, x: Op, starts: &[Op], sizes: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        let mut ops = vec![x];
        ops.extend_from_slice(starts);
        let s = self.shapes_of(loc, "dynamic_slice", &ops)?;
        let out = dynamic_slice(&s[0], &s[1..], sizes).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Shape(ShapeOp::DynamicSlice(sizes.to_vec())),
            ops,
            out,
            Vec::new(),
        ))
    }

    /// Overwrite the block of `x` at `starts` with `update`.
    #[track_caller]
    pub fn dynamic_update_slice(&self, x: Op, update: Op, starts: &[Op]) -> Result<Op> {
        let loc = Location::caller();
        let mut ops = vec![x, update];
        ops.extend_from_slice(starts);
        let s = self.shapes_of(loc, "dynamic_update_slice", &ops)?;
        let out =
            dynamic_update_slice(&s[0], &s[1], &s[2..]).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Shape(ShapeOp::DynamicUpdateSlice),
            ops,
            out,
            Vec::new(),
        ))
    }

    /// Concatenate along `dim`.
    #[track_caller]
    pub fn concatenate(&self, xs: &[Op], dim: i64) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "concatenate", xs)?;
        let out = concatenate(&s, dim).map_err(|e| self.shape_err(loc, e))?;
        if xs.len() == 1 {
            return Ok(xs[0]);
        }
        Ok(self.push(
            loc,
            Kind::Shape(ShapeOp::Concatenate(dim)),
            xs.to_vec(),
            out,
            Vec::new(),
        ))
    }

    /// Pad with `value` (a scalar): per dim `(low, high, interior)`.
    #[track_caller]
    pub fn pad(&self, x: Op, value: Op, config: &[(i64, i64, i64)]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "pad", &[x, value])?;
        let out = pad(&s[0], &s[1], config).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Shape(ShapeOp::Pad(config.to_vec())),
            vec![x, value],
            out,
            Vec::new(),
        ))
    }
}

/// Attributes of the data-movement ops.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ShapeOp {
    /// `reshape` (row-major).
    Reshape,
    /// `transpose` by the permutation.
    Transpose(Vec<i64>),
    /// `broadcast`: operand dim `i` becomes output dim `dims[i]` (sizes equal).
    Broadcast(Vec<i64>),
    /// `reverse` along the dims.
    Reverse(Vec<i64>),
    /// Static strided `slice`.
    Slice {
        /// First index per dim.
        start: Vec<i64>,
        /// One past the last index per dim.
        limit: Vec<i64>,
        /// Step per dim.
        strides: Vec<i64>,
    },
    /// `dynamic-slice` of these sizes.
    DynamicSlice(Vec<i64>),
    /// `dynamic-update-slice`.
    DynamicUpdateSlice,
    /// `concatenate` along the dim.
    Concatenate(i64),
    /// `pad` with `(low, high, interior)` per dim.
    Pad(Vec<(i64, i64, i64)>),
}

impl Family for ShapeOp {
    fn opcode(&self) -> &'static str {
        match self {
            ShapeOp::Reshape => "reshape",
            ShapeOp::Transpose(_) => "transpose",
            ShapeOp::Broadcast(_) => "broadcast",
            ShapeOp::Reverse(_) => "reverse",
            ShapeOp::Slice { .. } => "slice",
            ShapeOp::DynamicSlice(_) => "dynamic-slice",
            ShapeOp::DynamicUpdateSlice => "dynamic-update-slice",
            ShapeOp::Concatenate(_) => "concatenate",
            ShapeOp::Pad(_) => "pad",
        }
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        match self {
            ShapeOp::Transpose(d) | ShapeOp::Broadcast(d) | ShapeOp::Reverse(d) => {
                p.dimensions = d.clone()
            }
            ShapeOp::Concatenate(d) => p.dimensions = vec![*d],
            ShapeOp::Slice {
                start,
                limit,
                strides,
            } => {
                p.slice_dimensions = start
                    .iter()
                    .zip(limit)
                    .zip(strides)
                    .map(|((&start, &limit), &stride)| proto::SliceDimensions {
                        start,
                        limit,
                        stride,
                    })
                    .collect()
            }
            ShapeOp::DynamicSlice(sizes) => p.dynamic_slice_sizes = sizes.clone(),
            ShapeOp::Pad(cfg) => {
                p.padding_config = Some(proto::PaddingConfig {
                    dimensions: cfg
                        .iter()
                        .map(|&(lo, hi, interior)| proto::PaddingConfigDimension {
                            edge_padding_low: lo,
                            edge_padding_high: hi,
                            interior_padding: interior,
                        })
                        .collect(),
                })
            }
            ShapeOp::Reshape | ShapeOp::DynamicUpdateSlice => {}
        }
    }

    /// Each op's transpose: the cotangent is moved back to where the operand's elements came
    /// from (zeros elsewhere); one entry per operand.
    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        let xs = &n.operand_shapes[0];
        let ty = xs.ty().unwrap_or(ElementType::F32);
        let xd = xs.dims();
        let mut out: Vec<Option<Op>> = vec![None; n.operands.len()];
        match self {
            ShapeOp::Reshape => out[0] = Some(b.reshape(ct, xd)?),
            ShapeOp::Transpose(perm) => out[0] = Some(b.transpose(ct, &inverse_perm(perm))?),
            ShapeOp::Broadcast(bdims) => {
                out[0] = Some(unbroadcast(b, ct, xd, n.shape.dims(), bdims)?)
            }
            ShapeOp::Reverse(dims) => out[0] = Some(b.reverse(ct, dims)?),
            ShapeOp::Slice { start, strides, .. } => {
                let od = n.shape.dims();
                if od.contains(&0) {
                    out[0] = Some(b.zeros(ty, xd)?);
                } else {
                    // Scatter back: zeros before `start`, after the last taken element, and
                    // `stride - 1` zeros between taken elements.
                    let cfg: Vec<(i64, i64, i64)> = (0..xd.len())
                        .map(|i| {
                            (
                                start[i],
                                xd[i] - (start[i] + (od[i] - 1) * strides[i]) - 1,
                                strides[i] - 1,
                            )
                        })
                        .collect();
                    let zero = b.scalar_typed(ty, 0.0)?;
                    out[0] = Some(b.pad(ct, zero, &cfg)?);
                }
            }
            ShapeOp::DynamicSlice(_) => {
                // XLA clamps the starts the same way in dynamic-slice and dynamic-update-slice.
                let starts = &n.operands[1..];
                let zeros = b.zeros(ty, xd)?;
                out[0] = Some(b.dynamic_update_slice(zeros, ct, starts)?);
            }
            ShapeOp::DynamicUpdateSlice => {
                let starts = &n.operands[2..];
                let us = &n.operand_shapes[1];
                if n.need[0] {
                    let uz = b.zeros(us.ty().unwrap_or(ty), us.dims())?;
                    out[0] = Some(b.dynamic_update_slice(ct, uz, starts)?);
                }
                if n.need[1] {
                    out[1] = Some(b.dynamic_slice(ct, starts, us.dims())?);
                }
            }
            ShapeOp::Concatenate(dim) => {
                let d = *dim as usize;
                let mut offset = 0;
                for (j, s) in n.operand_shapes.iter().enumerate() {
                    let size = s.dims()[d];
                    if n.need[j] {
                        out[j] = Some(b.slice_in_dim(ct, offset, offset + size, d)?);
                    }
                    offset += size;
                }
            }
            ShapeOp::Pad(cfg) => {
                // Undo the edge padding (negative where the forward pad cropped), then take
                // every (interior + 1)-th element.
                let zero = b.scalar_typed(ty, 0.0)?;
                let unpad: Vec<(i64, i64, i64)> =
                    cfg.iter().map(|&(lo, hi, _)| (-lo, -hi, 0)).collect();
                let unpadded = b.pad(ct, zero, &unpad)?;
                let ud = b.shape(unpadded)?.dims().to_vec();
                let strides: Vec<i64> = cfg.iter().map(|&(_, _, interior)| interior + 1).collect();
                let gx = b.slice(unpadded, &vec![0; ud.len()], &ud, &strides)?;
                if n.need[0] {
                    out[0] = Some(gx);
                }
                if n.need[1] {
                    // The padding value appears at every position not taken from the operand.
                    let all: Vec<i64> = (0..n.shape.rank() as i64).collect();
                    out[1] = Some(b.sub(b.reduce_sum(ct, &all)?, b.reduce_sum(gx, &all)?)?);
                }
            }
        }
        Ok(out)
    }
}

/// `perm` such that `transpose(transpose(x, p), perm) == x` (`perm[p[i]] = i`).
pub(crate) fn inverse_perm(p: &[i64]) -> Vec<i64> {
    let mut inv = vec![0; p.len()];
    for (i, &d) in p.iter().enumerate() {
        inv[d as usize] = i as i64;
    }
    inv
}

/// Transpose of HLO `broadcast`: sum over the new dims and over size-1 operand dims that were
/// expanded, then restore the operand's dim order and size-1 dims.
fn unbroadcast(b: &Builder, ct: Op, xd: &[i64], od: &[i64], bdims: &[i64]) -> Result<Op> {
    let mut summed: Vec<i64> = (0..od.len() as i64)
        .filter(|d| !bdims.contains(d))
        .collect();
    let mut kept: Vec<usize> = Vec::new(); // operand dims that survive, by operand index
    for (i, &bd) in bdims.iter().enumerate() {
        if xd[i] == od[bd as usize] {
            kept.push(i);
        } else {
            summed.push(bd);
        }
    }
    summed.sort_unstable();
    let r = if summed.is_empty() {
        ct
    } else {
        b.reduce_sum(ct, &summed)?
    };
    // After the reduce, the kept dims appear in increasing output-dim order.
    let mut by_out = kept.clone();
    by_out.sort_by_key(|&i| bdims[i]);
    let perm: Vec<i64> = kept
        .iter()
        .map(|i| by_out.iter().position(|j| j == i).unwrap_or(0) as i64)
        .collect();
    let r = b.transpose(r, &perm)?;
    b.reshape(r, xd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(d: &[i64]) -> Shape {
        Shape::array(ElementType::F32, d)
    }

    #[test]
    fn rules() {
        assert_eq!(reshape(&f(&[2, 3]), &[3, 2]), Ok(f(&[3, 2])));
        assert_eq!(
            reshape(&f(&[2, 3]), &[4]).unwrap_err().to_string(),
            "reshape: cannot reshape f32[2,3] (6 elements) to [4] (4 elements)"
        );
        assert_eq!(transpose(&f(&[2, 3, 4]), &[2, 0, 1]), Ok(f(&[4, 2, 3])));
        assert!(transpose(&f(&[2, 3]), &[0, 0]).is_err());
        assert_eq!(broadcast_in_dim(&f(&[3]), &[2, 3], &[1]), Ok(f(&[2, 3])));
        assert_eq!(
            broadcast_in_dim(&f(&[1, 3]), &[2, 3], &[0, 1]),
            Ok(f(&[2, 3]))
        );
        let e = broadcast_in_dim(&f(&[3]), &[2, 4], &[1]).unwrap_err();
        assert_eq!(e.to_string(), "broadcast_in_dim: operand dim 0 (size 3) cannot broadcast to output dim 1 (size 4): operand f32[3], output [2, 4]");
        assert_eq!(
            slice(&f(&[10, 4]), &[1, 0], &[8, 4], &[3, 1]),
            Ok(f(&[3, 4]))
        );
        assert!(slice(&f(&[10]), &[2], &[11], &[1]).is_err());
        let s32 = Shape::scalar(ElementType::S32);
        assert_eq!(
            dynamic_slice(&f(&[5, 6]), &[s32.clone(), s32.clone()], &[2, 6]),
            Ok(f(&[2, 6]))
        );
        assert!(dynamic_slice(&f(&[5, 6]), std::slice::from_ref(&s32), &[2, 6]).is_err());
        assert_eq!(
            dynamic_update_slice(&f(&[5, 6]), &f(&[2, 6]), &[s32.clone(), s32]),
            Ok(f(&[5, 6]))
        );
        assert_eq!(concatenate(&[f(&[2, 3]), f(&[4, 3])], 0), Ok(f(&[6, 3])));
        assert!(concatenate(&[f(&[2, 3]), f(&[4, 2])], 0).is_err());
        assert_eq!(pad(&f(&[3]), &f(&[]), &[(1, 2, 1)]), Ok(f(&[8])));
        assert_eq!(pad(&f(&[3]), &f(&[]), &[(-1, 0, 0)]), Ok(f(&[2])));
    }
}
