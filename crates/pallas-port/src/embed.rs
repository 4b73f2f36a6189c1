//! Token embedding as a custom-call pair in a graph: the forward `rattention.embed_fwd` (the
//! table rows of the ids) with the backward `rattention.embed_bwd` (their cotangents summed into
//! the table's rows) as its custom VJP, served by the CPU kernels of [`crate::kernel::embed`].
//! The portable lowering is the HLO gather (`Builder::take_rows`, whose VJP is a scatter-add);
//! the model's `embed_lowering` ([`crate::kernel_lowering::KernelLowering`]) picks between them.
//!
//! Forward: `(table f32[V, D], ids s32[..., L]) -> f32[..., T, D]`, attribute `columns` (i64 `T
//! ≤ L`: the first `T` columns of the ids, so the next-token loss's inputs are read from the
//! token array `[B, T+1]` itself, with no slice for XLA to compile); backward: `(ids, d_out) ->
//! d_table f32[V, D]`. Ids outside `[0, V)` are clamped, as the gather clamps them.
//!
//! The calls' operands and results are constrained to row-major layouts (the kernels index
//! them so): XLA's layout assignment is otherwise free to pick another (it gave the embedding's
//! result `{1,0,2}` under a tensor mesh, where its user is a transposing dot).
//!
//! ```no_run
//! use hlo_builder::{Builder, ElementType, Shape};
//! let b = Builder::new("embed");
//! let table = b.parameter(Shape::array(ElementType::F32, &[32, 16]), "table")?;
//! let tokens = b.parameter(Shape::array(ElementType::S32, &[2, 9]), "tokens")?;
//! let x = pallas_port::embed::embed_kernel(&b, table, tokens, 8)?; // f32[2, 8, 16]
//! let d_table = b.grad(b.reduce_sum(x, &[0, 1, 2])?, &[table])?; // rattention.embed_bwd
//! # Ok::<(), hlo_builder::Error>(())
//! ```

use crate::graph::CallVjp;
use crate::kernel::embed::{embed_bwd, embed_fwd, Columns};
use crate::row_region::Rows;
use hlo_builder::{Attr, Builder, ElementType, Op, Result, Shape, Sharding};
use pjrt::ffi::{CallFrame, FfiError};
use std::sync::Arc;

/// Custom-call target of the embedding forward.
pub const EMBED_FWD_TARGET: &str = "rattention.embed_fwd";
/// Custom-call target of the embedding backward.
pub const EMBED_BWD_TARGET: &str = "rattention.embed_bwd";

/// The `columns` attribute.
fn attrs(columns: usize) -> Vec<(&'static str, Attr)> {
    vec![("columns", Attr::I64(columns as i64))]
}

/// The backward call: the table's gradient (ids are data).
fn embed_backward(
    b: &Builder,
    inputs: &[Op],
    d_out: Op,
    columns: usize,
) -> Result<Vec<Option<Op>>> {
    let (table, ids) = (inputs[0], inputs[1]);
    let _s = b.name_scope("embed_bwd");
    let d_table = b.custom_call(
        EMBED_BWD_TARGET,
        &[ids, d_out],
        b.shape(table)?,
        &attrs(columns),
    )?;
    Ok(vec![Some(d_table), None])
}

/// The rows of `table f32[V, D]` picked by the first `columns` columns of `ids s32[..., L]` (ids
/// outside `[0, V)` clamped), `f32[..., columns, D]`, as the custom call
/// `rattention.embed_fwd`, whose gradient (the table's) is `rattention.embed_bwd`. Equals
/// `take_rows(table, ids[..., :columns])`. Runs only where the handlers are registered (the CPU
/// client, [`crate::register_cpu_kernels`]); errors name the op and the shapes.
pub fn embed_kernel(b: &Builder, table: Op, ids: Op, columns: usize) -> Result<Op> {
    let (ts, is) = (b.shape(table)?, b.shape(ids)?);
    let (td, id) = (ts.dims(), is.dims());
    let ok = td.len() == 2
        && !id.is_empty()
        && ts.ty() == Some(ElementType::F32)
        && is.ty() == Some(ElementType::S32)
        && columns >= 1
        && id[id.len() - 1] >= columns as i64;
    if !ok {
        return Err(b.error(
            "embed_kernel",
            format!(
                "expected table f32[V, D] and ids s32[..., L ≥ {columns}] (columns ≥ 1), got \
                 table {ts}, ids {is}"
            ),
        ));
    }
    let mut out = id.to_vec();
    *out.last_mut().expect("ids rank ≥ 1") = columns as i64;
    out.push(td[1]);
    let fwd = {
        let _s = b.name_scope("embed_fwd");
        b.custom_call(
            EMBED_FWD_TARGET,
            &[table, ids],
            Shape::array(ElementType::F32, &out),
            &attrs(columns),
        )?
    };
    let vjp = CallVjp {
        op: "embed_kernel",
        message: "the embedding has one output",
        backward: move |b: &Builder, inputs: &[Op], _output, d_out| {
            embed_backward(b, inputs, d_out, columns)
        },
    };
    b.custom_vjp(&[table, ids], fwd, Arc::new(vjp))?;
    Ok(fwd)
}

/// [`embed_kernel`] whose result `f32[..., columns, D]` is laid out across devices by
/// `sharding` (a mesh's layout of the embeddings: cuts of the row dims — batch, T — never of
/// D), as a manually partitioned region ([`crate::row_region`]): each device picks the rows of
/// its own ids from the whole table (the partitioner gathers it from its own layout), and the
/// table's gradient, scattered per device into a full-size table, is summed over the row
/// pieces. The ids' first `columns` columns are sliced out before the region. A sharding that
/// cuts nothing runs the kernel on the whole value on every device.
///
/// Errors: the shapes of [`embed_kernel`]; a sharding that cuts D or does not divide the
/// result.
pub fn embed_in_region(
    b: &Builder,
    table: Op,
    ids: Op,
    columns: usize,
    sharding: &Sharding,
) -> Result<Op> {
    const OP: &str = "embed_in_region";
    let (td, id) = (
        b.shape(table)?.dims().to_vec(),
        b.shape(ids)?.dims().to_vec(),
    );
    if td.len() != 2 || id.is_empty() || columns < 1 || id[id.len() - 1] < columns as i64 {
        // The shape errors of the kernel, which checks the same.
        return embed_kernel(b, table, ids, columns);
    }
    let mut out = id.clone();
    *out.last_mut().expect("ids rank ≥ 1") = columns as i64;
    out.push(td[1]);
    let region = Rows::new(b, OP, sharding, &out, id.len())?;
    let ids = if id[id.len() - 1] == columns as i64 {
        ids
    } else {
        b.slice_in_dim(ids, 0, columns as i64, id.len() - 1)?
    };
    let tp = region.param_piece(b, table, &[1, 1])?;
    let ip = b.full_to_shard(ids, region.row_sharding())?;
    let x = {
        let _m = b.manual_scope();
        let local = b.shape(ip)?.dims().to_vec();
        embed_kernel(b, tp, ip, local[local.len() - 1] as usize)?
    };
    b.shard_to_full(x, sharding.clone(), &out)
}

/// The [`Columns`] of the handler's ids (operand `ids_arg`, `[..., L]`) for attribute `columns`;
/// errors name `op`.
fn columns(
    op: &str,
    frame: &CallFrame<'_>,
    ids_arg: usize,
) -> std::result::Result<Columns, FfiError> {
    let id = frame.arg(ids_arg)?.dims().to_vec();
    let t = frame.attr_i64("columns")?;
    match id.last() {
        Some(&l) if t >= 1 && l >= t => Ok(Columns {
            t: t as usize,
            stride: l as usize,
            offset: 0,
        }),
        _ => Err(FfiError::invalid_argument(format!(
            "{op}: ids {id:?} must be [..., L] with L ≥ columns = {t} ≥ 1"
        ))),
    }
}

/// `(V, D)` of a table's dims; errors name `op`.
fn table_dims(op: &str, d: &[i64]) -> std::result::Result<(usize, usize), FfiError> {
    match d {
        &[v, w] if v > 0 && w > 0 => Ok((v as usize, w as usize)),
        _ => Err(FfiError::invalid_argument(format!(
            "{op}: table {d:?} must be [V, D] with V, D ≥ 1"
        ))),
    }
}

fn embed_fwd_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    const OP: &str = "embed_fwd";
    let cols = columns(OP, frame, 1)?;
    let (table, ids) = (frame.arg(0)?, frame.arg(1)?);
    let (v, d) = table_dims(OP, table.dims())?;
    let (table, ids) = (table.as_slice::<f32>()?, ids.as_slice::<i32>()?);
    let mut out = frame.ret(0)?;
    embed_fwd(v, d, table, ids, cols, out.as_mut_slice()?).map_err(FfiError::invalid_argument)
}

fn embed_bwd_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    const OP: &str = "embed_bwd";
    let cols = columns(OP, frame, 0)?;
    let (ids, d_out) = (frame.arg(0)?, frame.arg(1)?);
    let (ids, d_out) = (ids.as_slice::<i32>()?, d_out.as_slice::<f32>()?);
    let mut d_table = frame.ret(0)?;
    let (v, d) = table_dims(OP, d_table.dims())?;
    embed_bwd(v, d, ids, cols, d_out, d_table.as_mut_slice()?).map_err(FfiError::invalid_argument)
}

pjrt::ffi_handler!(EMBED_FWD_HANDLER, embed_fwd_handler);
pjrt::ffi_handler!(EMBED_BWD_HANDLER, embed_bwd_handler);

/// Registers the embedding kernels for `client`'s platform (process-global; idempotent). Called
/// by [`crate::register_cpu_kernels`].
pub fn register_cpu_kernels(client: &pjrt::Client) -> pjrt::Result<()> {
    client.register_ffi_handler(EMBED_FWD_TARGET, EMBED_FWD_HANDLER)?;
    client.register_ffi_handler(EMBED_BWD_TARGET, EMBED_BWD_HANDLER)
}
