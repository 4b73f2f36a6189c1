//! VJP rules of `gather` and `scatter`.
//!
//! * `gather`: the operand gets a scatter-add of the cotangent into zeros at the same (clamped,
//!   as the forward gather clamps them) start indices; indices get none.
//! * `scatter` (add): the operand gets the cotangent; the updates get a gather of the cotangent
//!   at their windows (zero for windows that the forward scatter skipped as out of bounds).
//! * `scatter` (replace): as for add, but the operand's cotangent is zeroed where an update
//!   landed. With repeated indices the derivative is not unique (XLA keeps an unspecified one of
//!   the updates); every such update then gets the cotangent.

use super::Node;
use crate::builder::{Builder, Kind};
use crate::error::Result;
use crate::ops::gather::{GatherDims, ScatterDims, ScatterUpdate};
use crate::{Cmp, ElementType, Op};

/// Dispatch on the gather/scatter kind; one entry per operand.
pub(super) fn vjp(b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
    let mut out: Vec<Option<Op>> = vec![None; n.operands.len()];
    match &n.kind {
        Kind::Gather { dims, slice_sizes } if n.need[0] => {
            let xs = &n.operand_shapes[0];
            let idx = clamp_starts(
                b,
                n.operands[1],
                xs.dims(),
                slice_sizes,
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
        Kind::Scatter { dims, update } => {
            let (indices, us) = (n.operands[1], &n.operand_shapes[2]);
            if n.need[0] {
                out[0] = Some(match update {
                    ScatterUpdate::Add => ct,
                    ScatterUpdate::Replace => {
                        let uz = b.zeros(us.ty().unwrap_or(ElementType::F32), us.dims())?;
                        b.scatter(ct, indices, uz, dims, ScatterUpdate::Replace)?
                    }
                });
            }
            if n.need[2] {
                out[2] = Some(updates_cotangent(b, n, dims, ct)?);
            }
        }
        _ => {}
    }
    Ok(out)
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

/// Per index component `k`, the largest start that keeps the window inside the operand:
/// `operand[map[k]] - window[map[k]]`, broadcast to the indices' shape along `index_vector_dim`.
fn upper_bounds(
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
