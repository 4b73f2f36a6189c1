//! Causal softmax attention ([`crate::kernel::attention`]) as XLA FFI handlers (typed FFI,
//! api_version 4).
//!
//! Targets `rattention.attn_fwd` (`(q, k, v) -> (o, lse)`) and `rattention.attn_bwd`
//! (`(q, k, v, o, lse, d_o) -> (dq, dk, dv)`); attribute `window` (i64, −1 for global causal
//! attention). q, k, v, d_o may be f32 or bf16 (computed in f32); o, lse and the outputs are f32.
//!
//! At runtime positions ([`crate::kernel::attention::attn_fwd_at`]): `rattention.attn_fwd_at`
//! (`(q, k, v, pos) -> (o, lse)`) and `rattention.attn_bwd_at`
//! (`(q, k, v, o, lse, d_o, pos) -> (dq, dk, dv)`), with `pos` an `s32[2]` holding the global
//! positions of the first query and the first key, and k, v `[B,Tk,G,H]` of any length Tk.
//! Registered with the RLA blocks by [`crate::register_cpu_kernels`].

use crate::ffi::{f32_input, f32_rets, qkv_inputs, to_ffi};
use crate::kernel;
use crate::kernel::attention::AttnPositions;
use pjrt::ffi::{BufferArg, CallFrame, FfiError};

/// Custom-call target of the attention forward.
pub const ATTN_FWD_TARGET: &str = "rattention.attn_fwd";
/// Custom-call target of the attention backward.
pub const ATTN_BWD_TARGET: &str = "rattention.attn_bwd";

/// Custom-call target of the attention forward at runtime positions.
pub const ATTN_FWD_AT_TARGET: &str = "rattention.attn_fwd_at";
/// Custom-call target of the attention backward at runtime positions.
pub const ATTN_BWD_AT_TARGET: &str = "rattention.attn_bwd_at";

/// The `window` attribute: `None` (global) for a negative value.
fn window(frame: &CallFrame<'_>) -> Result<Option<usize>, FfiError> {
    let w = frame.attr_i64("window")?;
    Ok(usize::try_from(w).ok())
}

fn attn_fwd_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "attn_fwd";
    let w = window(frame)?;
    let (qa, ka, va) = (frame.arg(0)?, frame.arg(1)?, frame.arg(2)?);
    let (d, q, k, v) = qkv_inputs(OP, &qa, &ka, &va)?;
    let mut rets = frame.rets_mut()?;
    let [o, lse] = f32_rets(&mut rets, OP, "o, lse")?;
    kernel::attn_fwd(&d, w, &q, &k, &v, o, lse).map_err(to_ffi)
}

fn attn_bwd_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "attn_bwd";
    let w = window(frame)?;
    let args = (0..6)
        .map(|i| frame.arg(i))
        .collect::<Result<Vec<_>, _>>()?;
    let (d, q, k, v) = qkv_inputs(OP, &args[0], &args[1], &args[2])?;
    let (o, lse) = (args[3].as_slice::<f32>()?, args[4].as_slice::<f32>()?);
    let d_o = f32_input(&args[5], OP, "d_o")?;
    let mut rets = frame.rets_mut()?;
    let [dq, dk, dv] = f32_rets(&mut rets, OP, "dq, dk, dv")?;
    kernel::attn_bwd(&d, w, &q, &k, &v, o, lse, &d_o, dq, dk, dv).map_err(to_ffi)
}

/// The key count of k `[B,Tk,G,H]` after checking k, v against q `[B,Tq,N,H]` (equal B, H; v
/// shaped like k).
fn keys_of(
    op: &str,
    q: &BufferArg<'_>,
    k: &BufferArg<'_>,
    v: &BufferArg<'_>,
) -> Result<usize, FfiError> {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    if qd.len() != 4 || kd.len() != 4 || kd != vd || qd[0] != kd[0] || qd[3] != kd[3] {
        return Err(FfiError::invalid_argument(format!(
            "{op}: q {qd:?} must be [B,Tq,N,H] and k {kd:?}, v {vd:?} [B,Tk,G,H] with equal B, H"
        )));
    }
    Ok(kd[1] as usize)
}

/// The `pos` operand `s32[2]`: the global positions of the first query and the first key.
fn positions(op: &str, a: &BufferArg<'_>) -> Result<AttnPositions, FfiError> {
    match a.as_slice::<i32>()? {
        [q0, k0] => Ok(AttnPositions {
            q0: *q0 as i64,
            k0: *k0 as i64,
        }),
        p => Err(FfiError::invalid_argument(format!(
            "{op}: pos must be s32[2] (first query, first key), got {} values",
            p.len()
        ))),
    }
}

fn attn_fwd_at_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "attn_fwd_at";
    let w = window(frame)?;
    let args = (0..4)
        .map(|i| frame.arg(i))
        .collect::<Result<Vec<_>, _>>()?;
    let keys = keys_of(OP, &args[0], &args[1], &args[2])?;
    let at = positions(OP, &args[3])?;
    let (d, q, k, v) = qkv_inputs(OP, &args[0], &args[1], &args[2])?;
    let mut rets = frame.rets_mut()?;
    let [o, lse] = f32_rets(&mut rets, OP, "o, lse")?;
    kernel::attn_fwd_at(&d, keys, w, at, &q, &k, &v, o, lse).map_err(to_ffi)
}

fn attn_bwd_at_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "attn_bwd_at";
    let w = window(frame)?;
    let args = (0..7)
        .map(|i| frame.arg(i))
        .collect::<Result<Vec<_>, _>>()?;
    let keys = keys_of(OP, &args[0], &args[1], &args[2])?;
    let at = positions(OP, &args[6])?;
    let (d, q, k, v) = qkv_inputs(OP, &args[0], &args[1], &args[2])?;
    let (o, lse) = (args[3].as_slice::<f32>()?, args[4].as_slice::<f32>()?);
    let d_o = f32_input(&args[5], OP, "d_o")?;
    let mut rets = frame.rets_mut()?;
    let [dq, dk, dv] = f32_rets(&mut rets, OP, "dq, dk, dv")?;
    kernel::attn_bwd_at(&d, keys, w, at, (&q, &k, &v), o, lse, &d_o, (dq, dk, dv)).map_err(to_ffi)
}

pjrt::ffi_handler!(ATTN_FWD_AT_HANDLER, attn_fwd_at_handler);
pjrt::ffi_handler!(ATTN_BWD_AT_HANDLER, attn_bwd_at_handler);
pjrt::ffi_handler!(ATTN_FWD_HANDLER, attn_fwd_handler);
pjrt::ffi_handler!(ATTN_BWD_HANDLER, attn_bwd_handler);

/// Register the attention kernels for `client`'s platform (process-global; idempotent). Called
/// by [`crate::register_cpu_kernels`].
pub fn register_attention_kernels(client: &pjrt::Client) -> pjrt::Result<()> {
    client.register_ffi_handler(ATTN_FWD_TARGET, ATTN_FWD_HANDLER)?;
    client.register_ffi_handler(ATTN_BWD_TARGET, ATTN_BWD_HANDLER)?;
    client.register_ffi_handler(ATTN_FWD_AT_TARGET, ATTN_FWD_AT_HANDLER)?;
    client.register_ffi_handler(ATTN_BWD_AT_TARGET, ATTN_BWD_AT_HANDLER)
}
