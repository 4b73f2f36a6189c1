//! RMS normalisation as a custom-call pair in a graph: the forward `rattention.rms_norm_fwd`
//! with the backward `rattention.rms_norm_bwd` as its custom VJP, served by the CPU kernels of
//! [`crate::kernel::rms_norm`]. The portable lowering is the model crate's `layers::rms_norm`;
//! the model's `norm_lowering` ([`crate::kernel_lowering::KernelLowering`]) picks between them.
//!
//! Forward: `(x f32[..., D], scale f32[<last dims of x>]) -> (y f32[..., D], inv f32[...])`
//! (attribute `eps`, f64); backward: `(x, scale, inv, dy) -> (dx, dscale)`. On the train step
//! this spares XLA ~10 distinct kernels to compile (each norm's scaling, its transposed copy for
//! the next matmul's weight gradient, and its backward).
//!
//! The calls' operands and results are constrained to row-major layouts (the kernels index
//! them so): XLA's layout assignment is otherwise free to pick another (it gave the embedding's
//! result `{1,0,2}` under a tensor mesh, where its user is a transposing dot).
//!
//! ```no_run
//! use hlo_builder::{Builder, ElementType, Shape};
//! let b = Builder::new("norm");
//! let x = b.parameter(Shape::array(ElementType::F32, &[2, 8, 32]), "x")?;
//! let scale = b.parameter(Shape::array(ElementType::F32, &[32]), "scale")?;
//! let y = pallas_port::rms_norm::rms_norm_kernel(&b, x, scale, 1e-6)?; // f32[2, 8, 32]
//! let grads = b.grad(b.reduce_sum(y, &[0, 1, 2])?, &[x, scale])?; // rattention.rms_norm_bwd
//! # Ok::<(), hlo_builder::Error>(())
//! ```

use crate::graph::CallVjp;
use crate::kernel::rms_norm::{rms_norm_bwd, rms_norm_fwd};
use crate::row_region::Rows;
use hlo_builder::{Attr, Builder, ElementType, Op, Result, Shape, Sharding};
use pjrt::ffi::{CallFrame, FfiError};
use std::sync::Arc;

/// Custom-call target of the norm forward.
pub const RMS_NORM_FWD_TARGET: &str = "rattention.rms_norm_fwd";
/// Custom-call target of the norm backward.
pub const RMS_NORM_BWD_TARGET: &str = "rattention.rms_norm_bwd";

/// The row dims of `x f32[..., D]` after checking `scale f32[...]` (the last `scale.rank() ≥ 1`
/// dims of `x`); errors name `op` and both shapes.
#[track_caller]
fn row_dims(b: &Builder, op: &'static str, x: Op, scale: Op) -> Result<Vec<i64>> {
    let (xs, ss) = (b.shape(x)?, b.shape(scale)?);
    let (xd, sd) = (xs.dims(), ss.dims());
    let ok = !sd.is_empty()
        && sd.len() <= xd.len()
        && xs.ty() == Some(ElementType::F32)
        && ss.ty() == Some(ElementType::F32)
        && xd[xd.len() - sd.len()..] == *sd;
    if !ok {
        return Err(b.error(
            op,
            format!(
                "expected x f32[..., D] and scale f32 of x's last dims (rank ≥ 1), got x {xs}, \
                 scale {ss}"
            ),
        ));
    }
    Ok(xd[..xd.len() - 1].to_vec())
}

/// The backward call: the gradients of x and the scale.
fn rms_norm_backward(b: &Builder, inputs: &[Op], output: Op, dy: Op) -> Result<Vec<Option<Op>>> {
    let (x, scale) = (inputs[0], inputs[1]);
    let inv = b.get_tuple_element(output, 1)?;
    let out = Shape::tuple(vec![b.shape(x)?, b.shape(scale)?]);
    let g = {
        let _s = b.name_scope("rms_norm_bwd");
        b.custom_call(RMS_NORM_BWD_TARGET, &[x, scale, inv, dy], out, &[])?
    };
    Ok(vec![
        Some(b.get_tuple_element(g, 0)?),
        Some(b.get_tuple_element(g, 1)?),
    ])
}

/// `x · rsqrt(mean(x²) + eps) · scale` over the last dim of `x f32[..., D]`, with `scale` of
/// `x`'s last dims (`[D]`, or e.g. `[N, H]` for `x [B, T, N, H]`), as the custom call
/// `rattention.rms_norm_fwd`, whose gradient is `rattention.rms_norm_bwd`. Returns `y` of `x`'s
/// shape. Runs only where the handlers are registered (the CPU client,
/// [`crate::register_cpu_kernels`]).
pub fn rms_norm_kernel(b: &Builder, x: Op, scale: Op, eps: f64) -> Result<Op> {
    let rows = row_dims(b, "rms_norm_kernel", x, scale)?;
    let out = Shape::tuple(vec![b.shape(x)?, Shape::array(ElementType::F32, &rows)]);
    let fwd = {
        let _s = b.name_scope("rms_norm_fwd");
        b.custom_call(
            RMS_NORM_FWD_TARGET,
            &[x, scale],
            out,
            &[("eps", Attr::F64(eps))],
        )?
    };
    let vjp = CallVjp {
        op: "rms_norm_kernel",
        message: "gradients flow only through y; the reciprocal RMS is not differentiable",
        backward: rms_norm_backward,
    };
    b.custom_vjp(&[x, scale], fwd, Arc::new(vjp))?;
    b.get_tuple_element(fwd, 0)
}

/// [`rms_norm_kernel`] on `x f32[..., D]` laid out across devices by `sharding` (a mesh's
/// layout of `x`: cuts of the row dims, and of the dims the scale shares with `x` where the
/// scale may be cut alike — the heads of an `[N, H]` scale; never of D), as a manually
/// partitioned region ([`crate::row_region`]): each device normalises its own rows with the
/// kernel pair, the scale reaches every row piece whole in D (the partitioner gathers it from
/// its own layout) and its gradient is summed over the row pieces. Returns `y` laid out by
/// `sharding`. A sharding that cuts nothing runs the kernel on the whole value on every device.
///
/// Errors: the shapes of [`rms_norm_kernel`]; a sharding that cuts D or does not divide `x`.
pub fn rms_norm_in_region(
    b: &Builder,
    x: Op,
    scale: Op,
    eps: f64,
    sharding: &Sharding,
) -> Result<Op> {
    const OP: &str = "rms_norm_in_region";
    row_dims(b, OP, x, scale)?;
    let xd = b.shape(x)?.dims().to_vec();
    let rows = xd.len() - b.shape(scale)?.dims().len();
    let region = Rows::new(b, OP, sharding, &xd, rows)?;
    let tiles = sharding
        .tiles_per_dim(xd.len())
        .map_err(|e| b.error(OP, e.message))?;
    let sp = region.param_piece(b, scale, &tiles[rows..])?;
    let xp = b.full_to_shard(x, sharding.clone())?;
    let y = {
        let _m = b.manual_scope();
        rms_norm_kernel(b, xp, sp, eps)?
    };
    b.shard_to_full(y, region.sharding().clone(), &xd)
}

/// `(rows, d)` of the handler's `x [..., D]`; errors name `op` and the dims.
fn rows_width(op: &str, frame: &CallFrame<'_>) -> std::result::Result<(usize, usize), FfiError> {
    let d = frame.arg(0)?.dims().to_vec();
    match d.split_last() {
        Some((&w, lead)) if w > 0 => Ok((lead.iter().product::<i64>() as usize, w as usize)),
        _ => Err(FfiError::invalid_argument(format!(
            "{op}: x {d:?} must be [..., D] with D ≥ 1"
        ))),
    }
}

fn rms_norm_fwd_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    const OP: &str = "rms_norm_fwd";
    let (rows, d) = rows_width(OP, frame)?;
    let eps = frame.attr_f64("eps")? as f32;
    let (x, s) = (frame.arg(0)?, frame.arg(1)?);
    let (x, s) = (x.as_slice::<f32>()?, s.as_slice::<f32>()?);
    let mut rets = frame.rets_mut()?;
    let [y, inv] = rets.as_mut_slice() else {
        return Err(FfiError::invalid_argument(
            "rms_norm_fwd: expected 2 results (y, inv)",
        ));
    };
    rms_norm_fwd(rows, d, eps, x, s, y.as_mut_slice()?, inv.as_mut_slice()?)
        .map_err(FfiError::invalid_argument)
}

fn rms_norm_bwd_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    const OP: &str = "rms_norm_bwd";
    let (rows, d) = rows_width(OP, frame)?;
    let args = (0..4)
        .map(|i| frame.arg(i))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut rets = frame.rets_mut()?;
    let [dx, ds] = rets.as_mut_slice() else {
        return Err(FfiError::invalid_argument(
            "rms_norm_bwd: expected 2 results (dx, dscale)",
        ));
    };
    rms_norm_bwd(
        rows,
        d,
        args[0].as_slice::<f32>()?,
        args[1].as_slice::<f32>()?,
        args[2].as_slice::<f32>()?,
        args[3].as_slice::<f32>()?,
        dx.as_mut_slice()?,
        ds.as_mut_slice()?,
    )
    .map_err(FfiError::invalid_argument)
}

pjrt::ffi_handler!(RMS_NORM_FWD_HANDLER, rms_norm_fwd_handler);
pjrt::ffi_handler!(RMS_NORM_BWD_HANDLER, rms_norm_bwd_handler);

/// Registers the norm kernels for `client`'s platform (process-global; idempotent). Called by
/// [`crate::register_cpu_kernels`].
pub fn register_cpu_kernels(client: &pjrt::Client) -> pjrt::Result<()> {
    client.register_ffi_handler(RMS_NORM_FWD_TARGET, RMS_NORM_FWD_HANDLER)?;
    client.register_ffi_handler(RMS_NORM_BWD_TARGET, RMS_NORM_BWD_HANDLER)
}
