//! VJP rules of shape ops: reshape, transpose, broadcast, reverse, slice, dynamic-slice,
//! dynamic-update-slice, concatenate, pad.

use super::Node;
use crate::builder::{Builder, Kind};
use crate::error::Result;
use crate::{ElementType, Op};

/// `perm` such that `transpose(transpose(x, p), perm) == x`.
pub(super) fn inverse_perm(p: &[i64]) -> Vec<i64> {
    let mut inv = vec![0; p.len()];
    for (i, &d) in p.iter().enumerate() {
        inv[d as usize] = i as i64;
    }
    inv
}

/// Dispatch on the shape-op kind; one entry per operand.
pub(super) fn vjp(b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
    let xs = &n.operand_shapes[0];
    let ty = xs.ty().unwrap_or(ElementType::F32);
    let xd = xs.dims();
    let mut out: Vec<Option<Op>> = vec![None; n.operands.len()];
    match &n.kind {
        Kind::Reshape => out[0] = Some(b.reshape(ct, xd)?),
        Kind::Transpose(perm) => out[0] = Some(b.transpose(ct, &inverse_perm(perm))?),
        Kind::Broadcast(bdims) => out[0] = Some(broadcast(b, ct, xd, n.shape.dims(), bdims)?),
        Kind::Reverse(dims) => out[0] = Some(b.reverse(ct, dims)?),
        Kind::Slice { start, strides, .. } => {
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
        Kind::DynamicSlice(_) => {
            // XLA clamps the starts the same way in dynamic-slice and dynamic-update-slice.
            let starts = &n.operands[1..];
            let zeros = b.zeros(ty, xd)?;
            out[0] = Some(b.dynamic_update_slice(zeros, ct, starts)?);
        }
        Kind::DynamicUpdateSlice => {
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
        Kind::Concatenate(dim) => {
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
        Kind::Pad(cfg) => {
            // Undo the edge padding (negative where the forward pad cropped), then take every
            // (interior + 1)-th element.
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
        _ => {}
    }
    Ok(out)
}

/// Transpose of HLO `broadcast`: sum over the new dims and over size-1 operand dims that were
/// expanded, then restore the operand's dim order and size-1 dims.
fn broadcast(b: &Builder, ct: Op, xd: &[i64], od: &[i64], bdims: &[i64]) -> Result<Op> {
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
