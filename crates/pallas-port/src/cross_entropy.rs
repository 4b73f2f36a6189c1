//! Weighted mean softmax cross-entropy as a custom-call pair in a graph: the forward
//! `rattention.xent_fwd` with the backward `rattention.xent_bwd` as its custom VJP, served by the
//! CPU kernels of [`crate::kernel::cross_entropy`]. The portable lowering (element-wise HLO and
//! reductions) is the model crate's `layers::cross_entropy`; the model's `loss_lowering`
//! ([`crate::kernel_lowering::KernelLowering`]) picks between them.
//!
//! Forward: `(logits f32[..., T, V], targets s32[..., L], weights f32[..., T]) -> (loss f32[],
//! lse f32[..., T])`, attribute `target_offset` (i64 `k`, `k + T ≤ L`: position t's target is
//! column `k + t`, so the next-token loss reads the token array `[B, T+1]` itself at `k = 1`,
//! with no slice for XLA to compile); backward: `(logits, targets, weights, lse, d_loss f32[]) ->
//! d_logits f32[..., T, V]`. Only the logits get a gradient (targets and weights are data). On the train step this spares
//! XLA ~10 distinct kernels to compile (the logsumexp, the target pick, `softmax − onehot`).
//!
//! The calls' operands and results are constrained to row-major layouts (the kernels index
//! them so): XLA's layout assignment is otherwise free to pick another (it gave the embedding's
//! result `{1,0,2}` under a tensor mesh, where its user is a transposing dot).
//!
//! ```no_run
//! use hlo_builder::{Builder, ElementType, Shape};
//! let b = Builder::new("xent");
//! let logits = b.parameter(Shape::array(ElementType::F32, &[2, 8, 32]), "logits")?;
//! let tokens = b.parameter(Shape::array(ElementType::S32, &[2, 9]), "tokens")?;
//! let weights = b.parameter(Shape::array(ElementType::F32, &[2, 8]), "weights")?;
//! // Position t's target is tokens[:, t + 1].
//! let loss = pallas_port::cross_entropy::cross_entropy_kernel(&b, logits, (tokens, 1), weights)?;
//! let d_logits = b.grad(loss, &[logits])?; // rattention.xent_bwd
//! # Ok::<(), hlo_builder::Error>(())
//! ```

use crate::graph::CallVjp;
use crate::kernel::cross_entropy::{xent_bwd, xent_fwd};
use crate::kernel::embed::Columns;
use crate::row_region::Rows;
use hlo_builder::{Attr, Builder, ElementType, Op, Result, Shape, Sharding};
use pjrt::ffi::{CallFrame, FfiError};
use std::sync::Arc;

/// Custom-call target of the loss forward.
pub const XENT_FWD_TARGET: &str = "rattention.xent_fwd";
/// Custom-call target of the loss backward.
pub const XENT_BWD_TARGET: &str = "rattention.xent_bwd";

/// The row dims of `logits f32[..., T, V]` after checking `targets s32[..., L]` (read from column
/// `offset`, `offset + T ≤ L`) and `weights f32[..., T]` against them; errors name `op` and the
/// shapes.
#[track_caller]
fn row_dims(
    b: &Builder,
    op: &'static str,
    logits: Op,
    (targets, offset): (Op, usize),
    weights: Op,
) -> Result<Vec<i64>> {
    let (ls, ts, ws) = (b.shape(logits)?, b.shape(targets)?, b.shape(weights)?);
    let (ld, td) = (ls.dims(), ts.dims());
    let ok = ld.len() >= 2
        && td.len() == ld.len() - 1
        && ls.ty() == Some(ElementType::F32)
        && ts.ty() == Some(ElementType::S32)
        && ws.ty() == Some(ElementType::F32)
        && td[..td.len() - 1] == ld[..ld.len() - 2]
        && td[td.len() - 1] >= ld[ld.len() - 2] + offset as i64
        && ws.dims() == &ld[..ld.len() - 1];
    if !ok {
        return Err(b.error(
            op,
            format!(
                "expected logits f32[..., T, V], targets s32[..., L ≥ T + {offset}] and weights \
                 f32[..., T], got logits {ls}, targets {ts}, weights {ws}"
            ),
        ));
    }
    Ok(ld[..ld.len() - 1].to_vec())
}

/// The backward call: the logits' gradient (targets and weights are data).
fn xent_backward(
    b: &Builder,
    inputs: &[Op],
    output: Op,
    d_loss: Op,
    offset: usize,
) -> Result<Vec<Option<Op>>> {
    let (logits, targets, weights) = (inputs[0], inputs[1], inputs[2]);
    let lse = b.get_tuple_element(output, 1)?;
    let _s = b.name_scope("xent_bwd");
    let d_logits = b.custom_call(
        XENT_BWD_TARGET,
        &[logits, targets, weights, lse, d_loss],
        b.shape(logits)?,
        &attrs(offset),
    )?;
    Ok(vec![Some(d_logits), None, None])
}

/// The `target_offset` attribute.
fn attrs(offset: usize) -> Vec<(&'static str, Attr)> {
    vec![("target_offset", Attr::I64(offset as i64))]
}

/// The weighted mean cross-entropy `Σ w·(lse − logit[target]) / max(Σ w, 1)` of `logits f32[...,
/// T, V]` against `targets s32[..., L]` read from column `offset` (position t's target is
/// `targets[..., offset + t]`, `offset + T ≤ L`; an id outside `[0, V)` picks nothing) with
/// `weights f32[..., T]`, as the custom call `rattention.xent_fwd`, whose gradient (with respect
/// to the logits only) is `rattention.xent_bwd`. Returns the loss `f32[]`. Runs only where the
/// handlers are registered (the CPU client, [`crate::register_cpu_kernels`]).
pub fn cross_entropy_kernel(
    b: &Builder,
    logits: Op,
    (targets, offset): (Op, usize),
    weights: Op,
) -> Result<Op> {
    let rows = row_dims(
        b,
        "cross_entropy_kernel",
        logits,
        (targets, offset),
        weights,
    )?;
    let out = Shape::tuple(vec![
        Shape::array(ElementType::F32, &[]),
        Shape::array(ElementType::F32, &rows),
    ]);
    let fwd = {
        let _s = b.name_scope("xent_fwd");
        b.custom_call(
            XENT_FWD_TARGET,
            &[logits, targets, weights],
            out,
            &attrs(offset),
        )?
    };
    let vjp = CallVjp {
        op: "cross_entropy_kernel",
        message: "gradients flow only through the loss; the logsumexp is not differentiable",
        backward: move |b: &Builder, inputs: &[Op], output, d_loss| {
            xent_backward(b, inputs, output, d_loss, offset)
        },
    };
    b.custom_vjp(&[logits, targets, weights], fwd, Arc::new(vjp))?;
    b.get_tuple_element(fwd, 0)
}

/// [`cross_entropy_kernel`] on `logits f32[..., T, V]` laid out across devices by `sharding`
/// (a mesh's layout of the logits: cuts of the row dims — batch, T — never of V), as a manually
/// partitioned region ([`crate::row_region`]): each device runs the kernel pair on its own rows
/// and the pieces' losses are summed, equal to the one-device weighted mean `Σ w·nll / max(Σ w,
/// 1)`: the weights enter the region divided by `max(Σ w, 1)` over all rows, so each piece's
/// kernel (whose own `Σ w` is then at most 1, for weights ≥ 0) returns its share `Σ_piece w·nll
/// / max(Σ w, 1)`. The targets are sliced out of `targets` (columns `offset..offset + T`)
/// before the region. A sharding that cuts nothing runs the kernel on the whole value on
/// every device.
///
/// Errors: the shapes of [`cross_entropy_kernel`]; a sharding that cuts V or does not divide
/// the logits.
pub fn cross_entropy_in_region(
    b: &Builder,
    logits: Op,
    (targets, offset): (Op, usize),
    weights: Op,
    sharding: &Sharding,
) -> Result<Op> {
    const OP: &str = "cross_entropy_in_region";
    let rows = row_dims(b, OP, logits, (targets, offset), weights)?;
    let ld = b.shape(logits)?.dims().to_vec();
    let region = Rows::new(b, OP, sharding, &ld, ld.len() - 1)?;
    let t = ld[ld.len() - 2];
    let tr = b.shape(targets)?.dims().len();
    let targets = if offset == 0 && b.shape(targets)?.dims()[tr - 1] == t {
        targets
    } else {
        b.slice_in_dim(targets, offset as i64, offset as i64 + t, tr - 1)?
    };
    let all: Vec<i64> = (0..rows.len() as i64).collect();
    let count = b.max(b.reduce_sum(weights, &all)?, b.scalar(1.0f32)?)?;
    let scaled = b.div(weights, b.broadcast_in_dim(count, &rows, &[])?)?;
    let per_row = region.row_sharding();
    let (lp, tp, wp) = (
        b.full_to_shard(logits, sharding.clone())?,
        b.full_to_shard(targets, per_row.clone())?,
        b.full_to_shard(scaled, per_row)?,
    );
    let share = {
        let _m = b.manual_scope();
        cross_entropy_kernel(b, lp, (tp, 0), wp)?
    };
    region.sum_scalar(b, share)
}

/// `(rows, vocab)` of the handler's `logits [..., T, V]` and the [`Columns`] of its targets
/// `[..., L]` (attribute `target_offset`); errors name `op` and the dims.
fn rows_vocab(
    op: &str,
    frame: &CallFrame<'_>,
) -> std::result::Result<(usize, usize, Columns), FfiError> {
    let d = frame.arg(0)?.dims().to_vec();
    let td = frame.arg(1)?.dims().to_vec();
    let offset = usize::try_from(frame.attr_i64("target_offset")?).ok();
    match (d.as_slice(), td.last(), offset) {
        ([.., t, v], Some(&l), Some(offset)) if *v > 0 && *t > 0 => {
            let rows = d[..d.len() - 1].iter().product::<i64>() as usize;
            let cols = Columns {
                t: *t as usize,
                stride: l as usize,
                offset,
            };
            Ok((rows, *v as usize, cols))
        }
        _ => Err(FfiError::invalid_argument(format!(
            "{op}: logits {d:?} must be [..., T, V] with T, V ≥ 1 and targets {td:?} [..., L], \
             target_offset ≥ 0"
        ))),
    }
}

fn xent_fwd_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    const OP: &str = "xent_fwd";
    let (rows, vocab, cols) = rows_vocab(OP, frame)?;
    let (x, t, w) = (frame.arg(0)?, frame.arg(1)?, frame.arg(2)?);
    let (x, t, w) = (
        x.as_slice::<f32>()?,
        t.as_slice::<i32>()?,
        w.as_slice::<f32>()?,
    );
    let mut rets = frame.rets_mut()?;
    let [loss, lse] = rets.as_mut_slice() else {
        return Err(FfiError::invalid_argument(
            "xent_fwd: expected 2 results (loss, lse)",
        ));
    };
    let l = xent_fwd(rows, vocab, x, (t, cols), w, lse.as_mut_slice()?)
        .map_err(FfiError::invalid_argument)?;
    match loss.as_mut_slice::<f32>()? {
        [s] => *s = l,
        o => {
            return Err(FfiError::invalid_argument(format!(
                "xent_fwd: the loss result must be an f32 scalar, got {} elements",
                o.len()
            )))
        }
    }
    Ok(())
}

fn xent_bwd_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    const OP: &str = "xent_bwd";
    let (rows, vocab, cols) = rows_vocab(OP, frame)?;
    let args = (0..5)
        .map(|i| frame.arg(i))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let g = match args[4].as_slice::<f32>()? {
        [g] => *g,
        s => {
            return Err(FfiError::invalid_argument(format!(
                "xent_bwd: d_loss must be an f32 scalar, got {} elements",
                s.len()
            )))
        }
    };
    let mut d = frame.ret(0)?;
    xent_bwd(
        rows,
        vocab,
        args[0].as_slice::<f32>()?,
        (args[1].as_slice::<i32>()?, cols),
        args[2].as_slice::<f32>()?,
        args[3].as_slice::<f32>()?,
        g,
        d.as_mut_slice()?,
    )
    .map_err(FfiError::invalid_argument)
}

pjrt::ffi_handler!(XENT_FWD_HANDLER, xent_fwd_handler);
pjrt::ffi_handler!(XENT_BWD_HANDLER, xent_bwd_handler);

/// Registers the loss kernels for `client`'s platform (process-global; idempotent). Called by
/// [`crate::register_cpu_kernels`].
pub fn register_cpu_kernels(client: &pjrt::Client) -> pjrt::Result<()> {
    client.register_ffi_handler(XENT_FWD_TARGET, XENT_FWD_HANDLER)?;
    client.register_ffi_handler(XENT_BWD_TARGET, XENT_BWD_HANDLER)
}
