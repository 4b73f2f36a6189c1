//! VJP rule of `dot_general`.
//!
//! With `out = dot_general(x, y)` laid out as `[batch, x free, y free]`, the cotangent of `x` is
//! `dot_general(ct, y)` contracting the y-free dims of `ct` with y's free dims and batching over
//! the batch dims; that yields `[batch, x free, x contracting (in y's contracting order sorted)]`,
//! which a transpose puts back into x's dim order. Symmetrically for `y`.

use super::Node;
use crate::builder::{Builder, Kind};
use crate::error::Result;
use crate::ops::dot::{DotDims, Precision};
use crate::{ElementType, Op};

/// Dims of a rank-`rank` operand that are neither batch nor contracting, in order.
fn free_dims(rank: usize, batch: &[i64], contracting: &[i64]) -> Vec<i64> {
    (0..rank as i64)
        .filter(|d| !batch.contains(d) && !contracting.contains(d))
        .collect()
}

/// `perm` with `perm[src[j]] = j`: moves result axis `j` (which is operand axis `src[j]`) home.
fn argsort_inverse(src: &[i64]) -> Vec<i64> {
    let mut perm = vec![0; src.len()];
    for (j, &s) in src.iter().enumerate() {
        perm[s as usize] = j as i64;
    }
    perm
}

/// The cotangent of one side. `other` is the other operand; `self_*`/`other_*` are the dims of the
/// side being differentiated / the other side. `ct_free` are the ct dims holding the other side's
/// free dims; `self_free` are this side's free dims.
#[allow(clippy::too_many_arguments)]
fn side(
    b: &Builder,
    ct: Op,
    other: Op,
    nb: usize,
    ct_other_free: Vec<i64>,
    self_batch: &[i64],
    self_contracting: &[i64],
    self_free: &[i64],
    other_batch: &[i64],
    other_contracting: &[i64],
    other_free: &[i64],
    precision: Option<Precision>,
    self_ty: ElementType,
) -> Result<Op> {
    let dims = DotDims {
        lhs_batch: (0..nb as i64).collect(),
        rhs_batch: other_batch.to_vec(),
        lhs_contracting: ct_other_free,
        rhs_contracting: other_free.to_vec(),
    };
    // Compute in the wider of the two types (they differ under a preferred element type).
    let ct_ty = b.shape(ct)?.ty().unwrap_or(self_ty);
    let other_ty = b.shape(other)?.ty().unwrap_or(self_ty);
    let wide = if ct_ty.byte_size() >= other_ty.byte_size() {
        ct_ty
    } else {
        other_ty
    };
    let r = b.dot_general(
        b.convert(ct, wide)?,
        b.convert(other, wide)?,
        &dims,
        precision,
        None,
    )?;
    // Result axes: batch (self_batch), self free, then the other side's remaining (= contracting)
    // dims in increasing order, each paired with this side's contracting dim.
    let mut sorted_oc: Vec<(i64, i64)> = other_contracting
        .iter()
        .copied()
        .zip(self_contracting.iter().copied())
        .collect();
    sorted_oc.sort_unstable();
    let mut src: Vec<i64> = self_batch.to_vec();
    src.extend_from_slice(self_free);
    src.extend(sorted_oc.iter().map(|&(_, sc)| sc));
    let r = b.transpose(r, &argsort_inverse(&src))?;
    b.convert(r, self_ty)
}

/// One entry per operand (`[lhs, rhs]`).
pub(super) fn vjp(b: &Builder, n: &Node, ct: Op) -> Result<Vec<Option<Op>>> {
    let Kind::Dot { dims, precision } = &n.kind else {
        return Ok(vec![None, None]);
    };
    let (x, y) = (n.operands[0], n.operands[1]);
    let (xs, ys) = (&n.operand_shapes[0], &n.operand_shapes[1]);
    let xf = free_dims(xs.rank(), &dims.lhs_batch, &dims.lhs_contracting);
    let yf = free_dims(ys.rank(), &dims.rhs_batch, &dims.rhs_contracting);
    let nb = dims.lhs_batch.len();
    let (nxf, nyf) = (xf.len() as i64, yf.len() as i64);
    let nb64 = nb as i64;
    let f32 = ElementType::F32;
    let gx = if n.need[0] {
        let ct_yfree: Vec<i64> = (nb64 + nxf..nb64 + nxf + nyf).collect();
        Some(side(
            b,
            ct,
            y,
            nb,
            ct_yfree,
            &dims.lhs_batch,
            &dims.lhs_contracting,
            &xf,
            &dims.rhs_batch,
            &dims.rhs_contracting,
            &yf,
            *precision,
            xs.ty().unwrap_or(f32),
        )?)
    } else {
        None
    };
    let gy = if n.need[1] {
        let ct_xfree: Vec<i64> = (nb64..nb64 + nxf).collect();
        Some(side(
            b,
            ct,
            x,
            nb,
            ct_xfree,
            &dims.rhs_batch,
            &dims.rhs_contracting,
            &yf,
            &dims.lhs_batch,
            &dims.lhs_contracting,
            &xf,
            *precision,
            ys.ty().unwrap_or(f32),
        )?)
    } else {
        None
    };
    Ok(vec![gx, gy])
}
