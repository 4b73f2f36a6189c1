//! Indexed reads: `gather` and the `take_rows` convenience, plus the index checks that
//! [`scatter`](super::scatter) shares.
//!
//! Semantics follow XLA's operation semantics. Batching dims (`operand_batching_dims`,
//! `input_batching_dims`) are not supported: every operand dim is either collapsed / inserted
//! or part of the slice window.

use std::panic::Location;

use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{expect_array, Shape, ShapeError, ShapeResult};
use crate::{ElementType, Op};

pub use super::scatter::{ScatterDims, ScatterUpdate};

/// Dimension numbers of a `gather` (XLA's `GatherDimensionNumbers` without batching dims).
///
/// The output has the batch dims of `indices` (all dims but `index_vector_dim`, in order) and
/// the slice dims that are not collapsed, the latter placed at `offset_dims`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatherDims {
    /// Output dims that hold the (non-collapsed) slice dims, increasing.
    pub offset_dims: Vec<i64>,
    /// Operand dims whose slice size is 1 and that are dropped from the output, increasing.
    pub collapsed_slice_dims: Vec<i64>,
    /// `start_index_map[k]`: the operand dim that component `k` of an index vector starts.
    pub start_index_map: Vec<i64>,
    /// The dim of `indices` that holds the index vectors; `indices.rank` means an implicit
    /// trailing dim of size 1.
    pub index_vector_dim: i64,
}

impl GatherDims {
    pub(crate) fn to_proto(&self) -> proto::GatherDimensionNumbers {
        proto::GatherDimensionNumbers {
            offset_dims: self.offset_dims.clone(),
            collapsed_slice_dims: self.collapsed_slice_dims.clone(),
            start_index_map: self.start_index_map.clone(),
            index_vector_dim: self.index_vector_dim,
            ..Default::default()
        }
    }
}

impl GatherDims {
    /// The dims by their roles shared with scatter.
    pub(super) fn roles(&self) -> DimRoles<'_> {
        DimRoles {
            window: ("offset_dims", &self.offset_dims),
            dropped: ("collapsed_slice_dims", &self.collapsed_slice_dims),
            index_map: ("start_index_map", &self.start_index_map),
        }
    }
}

/// The dimension numbers gather and scatter share under different names, each `(name, dims)`:
/// the window dims (`offset_dims` / `update_window_dims`), the dropped operand dims of size 1
/// (`collapsed_slice_dims` / `inserted_window_dims`) and the index map (`start_index_map` /
/// `scatter_dims_to_operand_dims`).
pub(super) struct DimRoles<'a> {
    pub(super) window: (&'static str, &'a [i64]),
    pub(super) dropped: (&'static str, &'a [i64]),
    pub(super) index_map: (&'static str, &'a [i64]),
}

impl DimRoles<'_> {
    /// Checks the window dims (increasing, below `window_rank`: the rank of gather's output or
    /// scatter's updates), the dropped dims (increasing operand dims) and the index map
    /// (distinct operand dims, one per component of the index vectors of length `index_len`).
    pub(super) fn check(
        &self,
        op: &'static str,
        window_rank: usize,
        operand_rank: usize,
        index_len: i64,
        context: &dyn Fn() -> String,
    ) -> Result<(), ShapeError> {
        let ((window, wd), (dropped, dd), (map, md)) = (self.window, self.dropped, self.index_map);
        check_sorted_in_range(op, window, wd, window_rank, context)?;
        check_sorted_in_range(op, dropped, dd, operand_rank, context)?;
        check_distinct_in_range(op, map, md, operand_rank, context)?;
        if md.len() as i64 != index_len {
            return Err(ShapeError::new(
                op,
                format!(
                    "{map} has {} entries but the index vectors have length {index_len} ({})",
                    md.len(),
                    context()
                ),
            ));
        }
        Ok(())
    }

    /// Checks that the window and dropped dims cover the operand's `operand_rank` dims (batching
    /// dims are not supported).
    pub(super) fn check_cover(
        &self,
        op: &'static str,
        operand_rank: usize,
        context: &dyn Fn() -> String,
    ) -> Result<(), ShapeError> {
        let ((window, wd), (dropped, dd)) = (self.window, self.dropped);
        if wd.len() + dd.len() != operand_rank {
            return Err(ShapeError::new(
                op,
                format!(
                    "{window} ({}) + {dropped} ({}) must cover the operand rank {operand_rank} \
                     (batching dims are not supported) ({})",
                    wd.len(),
                    dd.len(),
                    context()
                ),
            ));
        }
        Ok(())
    }
}

/// Check that the entry `d` of the dim list `v` (named `what`) lies in `[0, bound)`.
fn check_in_range(
    op: &'static str,
    what: &str,
    v: &[i64],
    d: i64,
    bound: usize,
    context: &dyn Fn() -> String,
) -> Result<(), ShapeError> {
    if d < 0 || d as usize >= bound {
        return Err(ShapeError::new(
            op,
            format!(
                "{what} {v:?}: {d} is out of range [0, {bound}) ({})",
                context()
            ),
        ));
    }
    Ok(())
}

/// Check that `v` is strictly increasing with entries in `[0, bound)`.
pub(super) fn check_sorted_in_range(
    op: &'static str,
    what: &str,
    v: &[i64],
    bound: usize,
    context: &dyn Fn() -> String,
) -> Result<(), ShapeError> {
    for (i, &d) in v.iter().enumerate() {
        check_in_range(op, what, v, d, bound, context)?;
        if i > 0 && d <= v[i - 1] {
            return Err(ShapeError::new(
                op,
                format!("{what} {v:?} must be strictly increasing ({})", context()),
            ));
        }
    }
    Ok(())
}

/// Check that `v` has distinct entries in `[0, bound)` (any order).
pub(super) fn check_distinct_in_range(
    op: &'static str,
    what: &str,
    v: &[i64],
    bound: usize,
    context: &dyn Fn() -> String,
) -> Result<(), ShapeError> {
    let mut seen = vec![false; bound];
    for &d in v {
        check_in_range(op, what, v, d, bound, context)?;
        if std::mem::replace(&mut seen[d as usize], true) {
            return Err(ShapeError::new(
                op,
                format!("{what} {v:?} repeats {d} ({})", context()),
            ));
        }
    }
    Ok(())
}

/// Check the integer index array and `index_vector_dim` (which may equal the rank: an implicit
/// trailing dim of size 1); returns (index vector length, batch dims in order).
pub(super) fn index_dims(
    op: &'static str,
    indices: &Shape,
    index_vector_dim: i64,
    context: &dyn Fn() -> String,
) -> Result<(i64, Vec<i64>), ShapeError> {
    let (ity, idims) = expect_array(op, "indices", indices)?;
    if !ity.is_integer() {
        return Err(ShapeError::new(
            op,
            format!(
                "indices must have an integer type, got {} ({})",
                indices.short(),
                context()
            ),
        ));
    }
    if index_vector_dim < 0 || index_vector_dim as usize > idims.len() {
        return Err(ShapeError::new(
            op,
            format!(
                "index_vector_dim {index_vector_dim} must be in [0, {}] for indices {} ({})",
                idims.len(),
                indices.short(),
                context()
            ),
        ));
    }
    let ivd = index_vector_dim as usize;
    let len = idims.get(ivd).copied().unwrap_or(1);
    let batch: Vec<i64> = idims
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != ivd)
        .map(|(_, &d)| d)
        .collect();
    Ok((len, batch))
}

/// Shape rule of `gather` (XLA semantics, no batching dims).
///
/// The output rank is `batch rank + offset_dims.len()`; output dim `offset_dims[k]` has the size
/// of the `k`-th non-collapsed entry of `slice_sizes`, the other output dims are the batch dims
/// of `indices` in order.
pub fn gather(
    operand: &Shape,
    indices: &Shape,
    dims: &GatherDims,
    slice_sizes: &[i64],
) -> ShapeResult {
    const OP: &str = "gather";
    let (ty, od) = expect_array(OP, "operand", operand)?;
    let ctx = || {
        format!(
            "operand {}, indices {}, {dims:?}, slice_sizes {slice_sizes:?}",
            operand.short(),
            indices.short()
        )
    };
    let (len, batch) = index_dims(OP, indices, dims.index_vector_dim, &ctx)?;
    let out_rank = batch.len() + dims.offset_dims.len();
    dims.roles().check(OP, out_rank, od.len(), len, &ctx)?;
    if slice_sizes.len() != od.len() {
        return Err(ShapeError::new(
            OP,
            format!(
                "slice_sizes must have one entry per operand dim ({}), got {} ({})",
                od.len(),
                slice_sizes.len(),
                ctx()
            ),
        ));
    }
    for (i, (&s, &d)) in slice_sizes.iter().zip(od).enumerate() {
        if s < 0 || s > d {
            return Err(ShapeError::new(
                OP,
                format!(
                    "slice size {s} of operand dim {i} is not in [0, {d}] ({})",
                    ctx()
                ),
            ));
        }
    }
    for &c in &dims.collapsed_slice_dims {
        if slice_sizes[c as usize] > 1 {
            return Err(ShapeError::new(
                OP,
                format!(
                    "collapsed dim {c} has slice size {} (must be 0 or 1) ({})",
                    slice_sizes[c as usize],
                    ctx()
                ),
            ));
        }
    }
    dims.roles().check_cover(OP, od.len(), &ctx)?;
    let mut window = (0..od.len())
        .filter(|i| !dims.collapsed_slice_dims.contains(&(*i as i64)))
        .map(|i| slice_sizes[i]);
    let mut batch_it = batch.iter().copied();
    let out: Vec<i64> = (0..out_rank as i64)
        .map(|i| {
            if dims.offset_dims.contains(&i) {
                window.next().unwrap_or(0)
            } else {
                batch_it.next().unwrap_or(0)
            }
        })
        .collect();
    Ok(Shape::array(ty, &out))
}

impl Builder {
    /// XLA `gather`: slices of `operand` of size `slice_sizes` starting at the index vectors in
    /// `indices` (start indices are clamped so that each slice lies inside the operand).
    ///
    /// ```
    /// use hlo_builder::{Builder, ElementType, GatherDims, Shape};
    /// let b = Builder::new("g");
    /// let t = b.parameter(Shape::array(ElementType::F32, &[10, 4]), "table").unwrap();
    /// let i = b.parameter(Shape::array(ElementType::S32, &[3]), "ids").unwrap();
    /// let dims = GatherDims {
    ///     offset_dims: vec![1],
    ///     collapsed_slice_dims: vec![0],
    ///     start_index_map: vec![0],
    ///     index_vector_dim: 1,
    /// };
    /// let g = b.gather(t, i, &dims, &[1, 4]).unwrap();
    /// assert_eq!(b.shape(g).unwrap(), Shape::array(ElementType::F32, &[3, 4]));
    /// ```
    #[track_caller]
    pub fn gather(
        &self,
        operand: Op,
        indices: Op,
        dims: &GatherDims,
        slice_sizes: &[i64],
    ) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "gather", &[operand, indices])?;
        let out = gather(&s[0], &s[1], dims, slice_sizes).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Gather(Gather {
                dims: dims.clone(),
                slice_sizes: slice_sizes.to_vec(),
            }),
            vec![operand, indices],
            out,
            Vec::new(),
        ))
    }

    /// Rows of `table` (`[V, D...]`) at the integer `ids` (any shape): result
    /// `ids.shape + [D...]`. Out-of-range ids are clamped to `[0, V - 1]` (XLA gather).
    ///
    /// ```
    /// use hlo_builder::{Builder, ElementType, Shape};
    /// let b = Builder::new("emb");
    /// let t = b.parameter(Shape::array(ElementType::F32, &[32, 8]), "table").unwrap();
    /// let ids = b.parameter(Shape::array(ElementType::S32, &[2, 5]), "ids").unwrap();
    /// let x = b.take_rows(t, ids).unwrap();
    /// assert_eq!(b.shape(x).unwrap(), Shape::array(ElementType::F32, &[2, 5, 8]));
    /// ```
    #[track_caller]
    pub fn take_rows(&self, table: Op, ids: Op) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "take_rows", &[table, ids])?;
        let td = s[0].dims();
        if !s[0].is_array() || td.is_empty() {
            return Err(self.shape_err(
                loc,
                ShapeError::new(
                    "take_rows",
                    format!(
                        "table must be an array of rank >= 1, got {} (ids {})",
                        s[0].short(),
                        s[1].short()
                    ),
                ),
            ));
        }
        let r = s[1].rank() as i64;
        let dims = GatherDims {
            offset_dims: (r..r + td.len() as i64 - 1).collect(),
            collapsed_slice_dims: vec![0],
            start_index_map: vec![0],
            index_vector_dim: r,
        };
        let mut sizes = td.to_vec();
        sizes[0] = 1;
        let out = gather(&s[0], &s[1], &dims, &sizes)
            .map_err(|e| self.shape_err(loc, ShapeError::new("take_rows", e.message)))?;
        Ok(self.push(
            loc,
            Kind::Gather(Gather {
                dims,
                slice_sizes: sizes,
            }),
            vec![table, ids],
            out,
            Vec::new(),
        ))
    }
}

/// Attributes of `gather`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Gather {
    pub(crate) dims: GatherDims,
    pub(crate) slice_sizes: Vec<i64>,
}

impl Family for Gather {
    fn opcode(&self) -> &'static str {
        "gather"
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        p.gather_dimension_numbers = Some(self.dims.to_proto());
        p.gather_slice_sizes = self.slice_sizes.clone();
    }

    /// The operand gets a scatter-add of the cotangent into zeros at the same start indices,
    /// clamped as the forward gather clamps them; the indices get none.
    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        let mut out: Vec<Option<Op>> = vec![None; n.operands.len()];
        if n.need[0] {
            let dims = &self.dims;
            let xs = &n.operand_shapes[0];
            let idx = clamp_starts(
                b,
                n.operands[1],
                xs.dims(),
                &self.slice_sizes,
                &dims.start_index_map,
                dims.index_vector_dim,
            )?;
            let zeros = b.zeros(xs.ty().unwrap_or(ElementType::F32), xs.dims())?;
            let sd = ScatterDims {
                update_window_dims: dims.offset_dims.clone(),
                inserted_window_dims: dims.collapsed_slice_dims.clone(),
                scatter_dims_to_operand_dims: dims.start_index_map.clone(),
                index_vector_dim: dims.index_vector_dim,
            };
            out[0] = Some(b.scatter(zeros, idx, ct, &sd, ScatterUpdate::Add)?);
        }
        Ok(out)
    }
}

/// Per index component `k`, the largest start that keeps the window inside the operand:
/// `operand[map[k]] - window[map[k]]`, broadcast to the indices' shape along `index_vector_dim`.
pub(super) fn upper_bounds(
    b: &Builder,
    indices: Op,
    operand_dims: &[i64],
    window: &[i64],
    map: &[i64],
    index_vector_dim: i64,
) -> Result<Op> {
    let is = b.shape(indices)?;
    let ity = is.ty().unwrap_or(ElementType::S32);
    let bounds: Vec<i64> = map
        .iter()
        .map(|&d| operand_dims[d as usize] - window[d as usize])
        .collect();
    let k = bounds.len() as i64;
    let v = b.convert(b.constant_vec(bounds, &[k])?, ity)?;
    if index_vector_dim as usize == is.rank() {
        // Implicit trailing index vector of length 1.
        b.broadcast_in_dim(b.reshape(v, &[])?, is.dims(), &[])
    } else {
        b.broadcast_in_dim(v, is.dims(), &[index_vector_dim])
    }
}

/// The start indices as XLA's gather uses them: clamped to `[0, operand - slice]` per component.
fn clamp_starts(
    b: &Builder,
    indices: Op,
    operand_dims: &[i64],
    slice_sizes: &[i64],
    map: &[i64],
    index_vector_dim: i64,
) -> Result<Op> {
    let is = b.shape(indices)?;
    let hi = upper_bounds(b, indices, operand_dims, slice_sizes, map, index_vector_dim)?;
    let lo = b.zeros(is.ty().unwrap_or(ElementType::S32), is.dims())?;
    b.clamp(lo, indices, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(d: &[i64]) -> Shape {
        Shape::array(ElementType::F32, d)
    }
    fn s32(d: &[i64]) -> Shape {
        Shape::array(ElementType::S32, d)
    }
    fn rows(r: i64) -> GatherDims {
        GatherDims {
            offset_dims: vec![r],
            collapsed_slice_dims: vec![0],
            start_index_map: vec![0],
            index_vector_dim: r,
        }
    }

    #[test]
    fn gather_rule() {
        // Embedding lookup with an implicit index vector dim.
        assert_eq!(
            gather(&f(&[10, 4]), &s32(&[2, 3]), &rows(2), &[1, 4]),
            Ok(f(&[2, 3, 4]))
        );
        // Explicit index vector dim in the middle, 2-d starts, window kept in front.
        let d = GatherDims {
            offset_dims: vec![0, 1],
            collapsed_slice_dims: vec![],
            start_index_map: vec![1, 0],
            index_vector_dim: 1,
        };
        assert_eq!(
            gather(&f(&[6, 7]), &s32(&[5, 2, 3]), &d, &[2, 3]),
            Ok(f(&[2, 3, 5, 3]))
        );
        let e = gather(&f(&[10, 4]), &f(&[3]), &rows(1), &[1, 4]).unwrap_err();
        assert!(
            e.to_string()
                .contains("indices must have an integer type, got f32[3]"),
            "{e}"
        );
        let e = gather(&f(&[10, 4]), &s32(&[3]), &rows(1), &[2, 4]).unwrap_err();
        assert!(
            e.to_string().contains("collapsed dim 0 has slice size 2"),
            "{e}"
        );
        let e = gather(&f(&[10, 4]), &s32(&[3]), &rows(1), &[1, 5]).unwrap_err();
        assert!(
            e.to_string()
                .contains("slice size 5 of operand dim 1 is not in [0, 4]"),
            "{e}"
        );
        let e = gather(&f(&[10, 4]), &s32(&[3]), &rows(2), &[1, 4]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("gather: index_vector_dim 2 must be in [0, 1]"),
            "{e}"
        );
        let mut bad = rows(1);
        bad.collapsed_slice_dims = vec![];
        let e = gather(&f(&[10, 4]), &s32(&[3]), &bad, &[1, 4]).unwrap_err();
        assert!(
            e.to_string().contains("must cover the operand rank 2"),
            "{e}"
        );
        bad = rows(1);
        bad.start_index_map = vec![0, 1];
        let e = gather(&f(&[10, 4]), &s32(&[3]), &bad, &[1, 4]).unwrap_err();
        assert!(
            e.to_string()
                .contains("start_index_map has 2 entries but the index vectors have length 1"),
            "{e}"
        );
    }
}
