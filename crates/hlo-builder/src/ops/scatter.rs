//! Indexed writes: `scatter` of updates into an operand, combining by add or replace.
//!
//! Semantics follow XLA's operation semantics (one operand, no batching dims); the index checks
//! are shared with [`gather`](super::gather).
//!
//! VJP:
//! * add: the operand gets the cotangent; the updates get a gather of the cotangent at their
//!   windows (zero for windows that the forward scatter skipped as out of bounds).
//! * replace: as for add, but the operand's cotangent is zeroed where an update landed. With
//!   repeated indices the derivative is not unique (XLA keeps an unspecified one of the
//!   updates); every such update then gets the cotangent.

use std::panic::Location;

use super::gather::{index_dims, upper_bounds, DimRoles, GatherDims};
use crate::autodiff::Node;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::elementwise::{BinaryOp, Cmp};
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{expect_array, Shape, ShapeError, ShapeResult};
use crate::{ElementType, Op};

/// Dimension numbers of a `scatter` (XLA's `ScatterDimensionNumbers` without batching dims).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScatterDims {
    /// Dims of `updates` that hold the update window, increasing.
    pub update_window_dims: Vec<i64>,
    /// Operand dims of window size 1 that have no dim in `updates`, increasing.
    pub inserted_window_dims: Vec<i64>,
    /// `scatter_dims_to_operand_dims[k]`: the operand dim that index component `k` addresses.
    pub scatter_dims_to_operand_dims: Vec<i64>,
    /// The dim of `indices` that holds the index vectors; `indices.rank` means an implicit
    /// trailing dim of size 1.
    pub index_vector_dim: i64,
}

impl ScatterDims {
    /// The dims by their roles shared with gather.
    fn roles(&self) -> DimRoles<'_> {
        DimRoles {
            window: ("update_window_dims", &self.update_window_dims),
            dropped: ("inserted_window_dims", &self.inserted_window_dims),
            index_map: (
                "scatter_dims_to_operand_dims",
                &self.scatter_dims_to_operand_dims,
            ),
        }
    }

    pub(crate) fn to_proto(&self) -> proto::ScatterDimensionNumbers {
        proto::ScatterDimensionNumbers {
            update_window_dims: self.update_window_dims.clone(),
            inserted_window_dims: self.inserted_window_dims.clone(),
            scatter_dims_to_operand_dims: self.scatter_dims_to_operand_dims.clone(),
            index_vector_dim: self.index_vector_dim,
            ..Default::default()
        }
    }
}

/// How `scatter` combines an update with the operand element it lands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScatterUpdate {
    /// `operand + update`; repeated indices accumulate.
    Add,
    /// `update` replaces the element; with repeated indices XLA picks one update (unspecified).
    Replace,
}

/// Shape rule of `scatter` (XLA semantics, one operand, no batching dims): the result has the
/// operand's shape.
pub fn scatter(
    operand: &Shape,
    indices: &Shape,
    updates: &Shape,
    dims: &ScatterDims,
) -> ShapeResult {
    const OP: &str = "scatter";
    let (ty, od) = expect_array(OP, "operand", operand)?;
    let (uty, ud) = expect_array(OP, "updates", updates)?;
    let ctx = || {
        format!(
            "operand {}, indices {}, updates {}, {dims:?}",
            operand.short(),
            indices.short(),
            updates.short()
        )
    };
    if uty != ty {
        return Err(ShapeError::new(
            OP,
            format!("updates must have the operand's element type ({})", ctx()),
        ));
    }
    let (len, batch) = index_dims(OP, indices, dims.index_vector_dim, &ctx)?;
    let roles = dims.roles();
    roles.check(OP, ud.len(), od.len(), len, &ctx)?;
    roles.check_cover(OP, od.len(), &ctx)?;
    if ud.len() != dims.update_window_dims.len() + batch.len() {
        return Err(ShapeError::new(
            OP,
            format!(
                "updates must have rank {} (window dims) + {} (scatter dims of the indices) ({})",
                dims.update_window_dims.len(),
                batch.len(),
                ctx()
            ),
        ));
    }
    let window_operand_dims =
        (0..od.len()).filter(|i| !dims.inserted_window_dims.contains(&(*i as i64)));
    for (&w, o) in dims.update_window_dims.iter().zip(window_operand_dims) {
        if ud[w as usize] > od[o] {
            return Err(ShapeError::new(
                OP,
                format!(
                    "update window dim {w} (size {}) is larger than operand dim {o} (size {}) ({})",
                    ud[w as usize],
                    od[o],
                    ctx()
                ),
            ));
        }
    }
    let scatter_sizes: Vec<i64> = (0..ud.len())
        .filter(|i| !dims.update_window_dims.contains(&(*i as i64)))
        .map(|i| ud[i])
        .collect();
    if scatter_sizes != batch {
        return Err(ShapeError::new(
            OP,
            format!(
                "the scatter dims of updates {scatter_sizes:?} must equal the indices' dims without \
                 index_vector_dim {batch:?} ({})",
                ctx()
            ),
        ));
    }
    Ok(operand.clone())
}

impl Builder {
    /// XLA `scatter` of `updates` into `operand` at `indices`, combining with `update` (the
    /// reducer computation is built for you). Update windows that would fall outside the operand
    /// are skipped (XLA semantics).
    #[track_caller]
    pub fn scatter(
        &self,
        operand: Op,
        indices: Op,
        updates: Op,
        dims: &ScatterDims,
        update: ScatterUpdate,
    ) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "scatter", &[operand, indices, updates])?;
        let out = scatter(&s[0], &s[1], &s[2], dims).map_err(|e| self.shape_err(loc, e))?;
        let ty = out.ty().unwrap_or(ElementType::F32);
        let reducer = self.scatter_reducer(update, ty)?;
        Ok(self.push(
            loc,
            Kind::Scatter(Scatter {
                dims: dims.clone(),
                update,
            }),
            vec![operand, indices, updates],
            out,
            vec![reducer],
        ))
    }

    /// The `(T, T) -> T` computation of a scatter: the module's cached add reducer, or a fresh
    /// "take the update" computation.
    fn scatter_reducer(&self, update: ScatterUpdate, ty: ElementType) -> Result<i64> {
        match update {
            ScatterUpdate::Add => {
                let cached = self
                    .module
                    .reducers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(BinaryOp::Add, ty))
                    .copied();
                if let Some(id) = cached {
                    return Ok(id);
                }
                let r = self.sub_builder(&format!("region_add_{}", ty.name()));
                let a = r.parameter(Shape::scalar(ty), "Arg_0")?;
                let x = r.parameter(Shape::scalar(ty), "Arg_1")?;
                let c = r.build(r.add(a, x)?)?;
                self.module
                    .reducers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((BinaryOp::Add, ty), c.id());
                Ok(c.id())
            }
            ScatterUpdate::Replace => {
                let r = self.sub_builder(&format!("region_replace_{}", ty.name()));
                r.parameter(Shape::scalar(ty), "Arg_0")?;
                let x = r.parameter(Shape::scalar(ty), "Arg_1")?;
                Ok(r.build(x)?.id())
            }
        }
    }
}

/// Attributes of `scatter` (the combiner is the called computation).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scatter {
    pub(crate) dims: ScatterDims,
    pub(crate) update: ScatterUpdate,
}

impl Family for Scatter {
    fn opcode(&self) -> &'static str {
        "scatter"
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        p.scatter_dimension_numbers = Some(self.dims.to_proto());
    }

    /// One entry per operand (`[operand, indices, updates]`); the indices get none.
    fn array_vjp(&self, b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
        let mut out: Vec<Option<Op>> = vec![None; n.operands.len()];
        let (indices, us) = (n.operands[1], &n.operand_shapes[2]);
        if n.need[0] {
            out[0] = Some(match self.update {
                ScatterUpdate::Add => ct,
                ScatterUpdate::Replace => {
                    let uz = b.zeros(us.ty().unwrap_or(ElementType::F32), us.dims())?;
                    b.scatter(ct, indices, uz, &self.dims, ScatterUpdate::Replace)?
                }
            });
        }
        if n.need[2] {
            out[2] = Some(updates_cotangent(b, n, &self.dims, ct)?);
        }
        Ok(out)
    }
}

/// Operand dim sizes of the update window of a scatter (1 for inserted dims).
fn window_sizes(operand_rank: usize, dims: &ScatterDims, update_dims: &[i64]) -> Vec<i64> {
    let mut w = dims.update_window_dims.iter();
    (0..operand_rank as i64)
        .map(|d| {
            if dims.inserted_window_dims.contains(&d) {
                1
            } else {
                w.next().map_or(1, |&u| update_dims[u as usize])
            }
        })
        .collect()
}

/// Cotangent of a scatter's updates: the cotangent of the result at each update's position,
/// zero for windows that scatter skipped because they do not fit inside the operand.
fn updates_cotangent(b: &Builder, n: &Node, dims: &ScatterDims, ct: Op) -> Result<Op> {
    let indices = n.operands[1];
    let (xs, is, us) = (
        &n.operand_shapes[0],
        &n.operand_shapes[1],
        &n.operand_shapes[2],
    );
    let window = window_sizes(xs.rank(), dims, us.dims());
    let gd = GatherDims {
        offset_dims: dims.update_window_dims.clone(),
        collapsed_slice_dims: dims.inserted_window_dims.clone(),
        start_index_map: dims.scatter_dims_to_operand_dims.clone(),
        index_vector_dim: dims.index_vector_dim,
    };
    let g = b.gather(ct, indices, &gd, &window)?;
    // In-bounds test per index vector: 0 <= start[k] <= operand - window for every component.
    let hi = upper_bounds(
        b,
        indices,
        xs.dims(),
        &window,
        &dims.scatter_dims_to_operand_dims,
        dims.index_vector_dim,
    )?;
    let lo = b.zeros(is.ty().unwrap_or(ElementType::S32), is.dims())?;
    let ok = b.and(
        b.compare(indices, lo, Cmp::Ge)?,
        b.compare(indices, hi, Cmp::Le)?,
    )?;
    let ok = if dims.index_vector_dim as usize == is.rank() {
        ok
    } else {
        let all = b.reduce_min(b.convert(ok, ElementType::S32)?, &[dims.index_vector_dim])?;
        b.compare(all, b.scalar(1i32)?, Cmp::Eq)?
    };
    // `ok` has the scatter (batch) dims; they sit at the non-window dims of the updates.
    let scatter_dims: Vec<i64> = (0..us.rank() as i64)
        .filter(|d| !dims.update_window_dims.contains(d))
        .collect();
    let mask = b.broadcast_in_dim(ok, us.dims(), &scatter_dims)?;
    let zeros = b.zeros(us.ty().unwrap_or(ElementType::F32), us.dims())?;
    b.select(mask, g, zeros)
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

    #[test]
    fn scatter_rule() {
        let d = ScatterDims {
            update_window_dims: vec![2],
            inserted_window_dims: vec![0],
            scatter_dims_to_operand_dims: vec![0],
            index_vector_dim: 2,
        };
        assert_eq!(
            scatter(&f(&[10, 4]), &s32(&[2, 3]), &f(&[2, 3, 4]), &d),
            Ok(f(&[10, 4]))
        );
        let e = scatter(&f(&[10, 4]), &s32(&[2, 3]), &f(&[2, 3, 5]), &d).unwrap_err();
        assert!(
            e.to_string()
                .contains("update window dim 2 (size 5) is larger than operand dim 1 (size 4)"),
            "{e}"
        );
        let e = scatter(&f(&[10, 4]), &s32(&[2, 3]), &f(&[3, 2, 4]), &d).unwrap_err();
        assert!(e.to_string().contains("scatter dims of updates [3, 2] must equal the indices' dims without index_vector_dim [2, 3]"), "{e}");
        let e = scatter(&f(&[10, 4]), &s32(&[2, 3]), &s32(&[2, 3, 4]), &d).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("scatter: updates must have the operand's element type"),
            "{e}"
        );
    }
}
