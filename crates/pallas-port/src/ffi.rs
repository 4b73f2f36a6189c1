//! The RLA blocks as XLA FFI handlers (typed FFI, api_version 4) over the CPU kernels.
//!
//! Targets `rattention.rla_fwd` and `rattention.rla_bwd`; attributes `window`, `sub_chunk`,
//! `chunk` (i64) and `feature_map` (string), delivered by XLA from the custom call's
//! `backend_config` dictionary. The scan from a given state for sequence shards:
//! `rattention.rla_fwd_h0` (q, k, v, h0[, contrib]) and `rattention.rla_bwd_h0` (q, k, v, chunk_states,
//! d_o[, d_final]) -> (dq, dk, dv, dh0), same attributes; the state a shard's keys add,
//! `rattention.rla_kv_state` (k, v) -> state and `rattention.rla_kv_state_bwd` (k, v,
//! d_state) -> (dk, dv), attribute `feature_map`. Inputs may be f32 or bf16 (computed in f32); outputs are f32.
//! No `unsafe` here: `pjrt::ffi_handler!` implements `pjrt::ffi::FfiHandler` for each body, and
//! pjrt's generic shim is the C entry point that decodes the frame.

use crate::config::{FeatureMap, RlaConfig, RlaDims};
use crate::kernel;
use pjrt::ffi::{BufferArg, BufferRet, CallFrame, FfiError};
use pjrt::ElementType;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

/// Custom-call target of the forward block.
pub const FWD_TARGET: &str = "rattention.rla_fwd";
/// Custom-call target of the backward block.
pub const BWD_TARGET: &str = "rattention.rla_bwd";

/// Custom-call target of the forward block from an initial state h0 ([`kernel::rla_fwd_h0`]).
pub const FWD_H0_TARGET: &str = "rattention.rla_fwd_h0";
/// Custom-call target of its backward ([`kernel::rla_bwd_h0`]).
pub const BWD_H0_TARGET: &str = "rattention.rla_bwd_h0";
/// Custom-call target of the state the keys and values add ([`kernel::rla_kv_state`]).
pub const KV_STATE_TARGET: &str = "rattention.rla_kv_state";
/// Custom-call target of its VJP ([`kernel::rla_kv_state_bwd`]).
pub const KV_STATE_BWD_TARGET: &str = "rattention.rla_kv_state_bwd";

/// The op name the RLA handlers' errors start with.
const OP: &str = "rla";

static REGISTERED: AtomicBool = AtomicBool::new(false);

/// True once [`register_cpu_kernels`] succeeded in this process (the registry is process-global).
pub fn kernels_registered() -> bool {
    REGISTERED.load(Ordering::Acquire)
}

fn usize_attr(frame: &CallFrame<'_>, name: &str) -> Result<usize, FfiError> {
    let v = frame.attr_i64(name)?;
    usize::try_from(v).map_err(|_| {
        FfiError::invalid_argument(format!("rla: attribute {name} = {v} must be >= 0"))
    })
}

fn feature_map_attr(frame: &CallFrame<'_>) -> Result<FeatureMap, FfiError> {
    frame
        .attr_str("feature_map")?
        .parse()
        .map_err(|e| FfiError::invalid_argument(format!("rla: feature_map: {e}")))
}

fn config(frame: &CallFrame<'_>) -> Result<RlaConfig, FfiError> {
    let fm = feature_map_attr(frame)?;
    Ok(RlaConfig {
        window: usize_attr(frame, "window")?,
        sub_chunk: usize_attr(frame, "sub_chunk")?,
        chunk: usize_attr(frame, "chunk")?,
        feature_map: fm,
        // Graph building only: the kernels never read it.
        seq_state: Default::default(),
    })
}

/// `a` as f32 values: borrowed when it is f32, converted when it is bf16; any other dtype is an
/// error naming `op` and the operand `what`. Shared by every CPU kernel's handler.
pub(crate) fn f32_input<'a>(
    a: &BufferArg<'a>,
    op: &str,
    what: &str,
) -> Result<Cow<'a, [f32]>, FfiError> {
    match a.dtype() {
        ElementType::F32 => Ok(Cow::Borrowed(a.as_slice::<f32>()?)),
        ElementType::Bf16 => Ok(Cow::Owned(
            a.as_slice::<half::bf16>()?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        )),
        t => Err(FfiError::invalid_argument(format!(
            "{op}: {what} must be f32 or bf16, got {t}"
        ))),
    }
}

/// The [`RlaDims`] of `[B,T,heads,H]` operands `q` and `k` (`kv_heads` from `k`); errors name `op`.
pub(crate) fn dims_of(op: &str, q: &BufferArg<'_>, k: &BufferArg<'_>) -> Result<RlaDims, FfiError> {
    let (qd, kd) = (q.dims(), k.dims());
    if qd.len() != 4 || kd.len() != 4 {
        return Err(FfiError::invalid_argument(format!(
            "{op}: q {qd:?} and k {kd:?} must be [B,T,heads,H]"
        )));
    }
    Ok(RlaDims {
        batch: qd[0] as usize,
        seq: qd[1] as usize,
        heads: qd[2] as usize,
        kv_heads: kd[2] as usize,
        head_dim: qd[3] as usize,
    })
}

/// Dims and f32 values of the `q`, `k`, `v` operands every attention-like handler takes first.
pub(crate) type Qkv<'a> = (RlaDims, Cow<'a, [f32]>, Cow<'a, [f32]>, Cow<'a, [f32]>);

/// [`dims_of`] and [`f32_input`] for the `q`, `k`, `v` operands of `op`.
pub(crate) fn qkv_inputs<'a>(
    op: &str,
    q: &BufferArg<'a>,
    k: &BufferArg<'a>,
    v: &BufferArg<'a>,
) -> Result<Qkv<'a>, FfiError> {
    Ok((
        dims_of(op, q, k)?,
        f32_input(q, op, "q")?,
        f32_input(k, op, "k")?,
        f32_input(v, op, "v")?,
    ))
}

/// The `N` f32 result buffers of `op` (from `CallFrame::rets_mut`), named `names` in the error
/// when the call has another number of results.
pub(crate) fn f32_rets<'r, const N: usize>(
    rets: &'r mut [BufferRet<'_>],
    op: &str,
    names: &str,
) -> Result<[&'r mut [f32]; N], FfiError> {
    let count = || FfiError::invalid_argument(format!("{op}: expected {N} results ({names})"));
    if rets.len() != N {
        return Err(count());
    }
    let slices = rets
        .iter_mut()
        .map(|r| r.as_mut_slice::<f32>())
        .collect::<Result<Vec<_>, _>>()?;
    slices.try_into().map_err(|_| count())
}

/// A kernel error as an FFI `invalid_argument` error.
pub(crate) fn to_ffi(e: crate::RlaError) -> FfiError {
    FfiError::invalid_argument(e.to_string())
}

fn rla_fwd_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    let cfg = config(frame)?;
    let (qa, ka, va) = (frame.arg(0)?, frame.arg(1)?, frame.arg(2)?);
    let (d, q, k, v) = qkv_inputs(OP, &qa, &ka, &va)?;
    let mut rets = frame.rets_mut()?;
    let [o, cs, fs] = f32_rets(&mut rets, "rla_fwd", "o, chunk_states, final_state")?;
    kernel::rla_fwd(&cfg, &d, &q, &k, &v, o, cs, fs).map_err(to_ffi)
}

/// The first five operands both backward blocks take, read: dims, q, k, v (f32 or bf16),
/// chunk_states (f32) and d_o (f32 or bf16).
struct BwdInputs<'a> {
    qkv: Qkv<'a>,
    cs: &'a [f32],
    d_o: Cow<'a, [f32]>,
}

/// Reads (q, k, v, chunk_states, d_o), operands 0 to 4 of a backward block's frame.
fn bwd_inputs<'a>(frame: &CallFrame<'a>) -> Result<BwdInputs<'a>, FfiError> {
    let (qa, ka, va, csa, doa) = (
        frame.arg(0)?,
        frame.arg(1)?,
        frame.arg(2)?,
        frame.arg(3)?,
        frame.arg(4)?,
    );
    Ok(BwdInputs {
        qkv: qkv_inputs(OP, &qa, &ka, &va)?,
        cs: csa.as_slice::<f32>()?,
        d_o: f32_input(&doa, OP, "d_o")?,
    })
}

fn rla_bwd_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    let cfg = config(frame)?;
    let BwdInputs { qkv, cs, d_o } = bwd_inputs(frame)?;
    let (d, q, k, v) = qkv;
    let mut rets = frame.rets_mut()?;
    let [dq, dk, dv] = f32_rets(&mut rets, "rla_bwd", "dq, dk, dv")?;
    kernel::rla_bwd(&cfg, &d, &q, &k, &v, cs, &d_o, dq, dk, dv).map_err(to_ffi)
}

/// (q, k, v, h0) or (…, contrib): with the fifth operand the final state is derived from the
/// keys' contribution ([`kernel::rla_fwd_h0_with_contrib`]).
fn rla_fwd_h0_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "rla_fwd_h0";
    let cfg = config(frame)?;
    let contrib = match frame.num_args() {
        4 => None,
        5 => Some(frame.arg(4)?.as_slice::<f32>()?),
        n => {
            return Err(FfiError::invalid_argument(format!(
                "{OP}: expected 4 or 5 operands (q, k, v, h0[, contrib]), got {n}"
            )))
        }
    };
    let (qa, ka, va, ha) = (frame.arg(0)?, frame.arg(1)?, frame.arg(2)?, frame.arg(3)?);
    let (d, q, k, v) = qkv_inputs(OP, &qa, &ka, &va)?;
    let h0 = ha.as_slice::<f32>()?;
    let mut rets = frame.rets_mut()?;
    let [o, cs, fs] = f32_rets(&mut rets, OP, "o, chunk_states, final_state")?;
    match contrib {
        None => kernel::rla_fwd_h0(&cfg, &d, &q, &k, &v, h0, o, cs, fs),
        Some(c) => kernel::rla_fwd_h0_with_contrib(&cfg, &d, &q, &k, &v, (h0, c), o, cs, fs),
    }
    .map_err(to_ffi)
}

/// (q, k, v, chunk_states, d_o) or (…, d_final): without the sixth operand the final state has
/// no cotangent.
fn rla_bwd_h0_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    let cfg = config(frame)?;
    let d_final = match frame.num_args() {
        5 => None,
        6 => Some(frame.arg(5)?.as_slice::<f32>()?),
        n => {
            return Err(FfiError::invalid_argument(format!(
                "rla_bwd_h0: expected 5 or 6 operands (q, k, v, chunk_states, d_o[, d_final]), \
                 got {n}"
            )))
        }
    };
    let BwdInputs { qkv, cs, d_o } = bwd_inputs(frame)?;
    let (d, q, k, v) = qkv;
    let mut rets = frame.rets_mut()?;
    let [dq, dk, dv, dh0] = f32_rets(&mut rets, "rla_bwd_h0", "dq, dk, dv, dh0")?;
    kernel::rla_bwd_h0(&cfg, &d, &q, &k, &v, cs, &d_o, d_final, (dq, dk, dv), dh0).map_err(to_ffi)
}

/// The [`RlaDims`] of k/v `[B,T,G,H]` alone (heads = kv heads).
fn kv_dims(op: &str, k: &BufferArg<'_>) -> Result<RlaDims, FfiError> {
    dims_of(op, k, k)
}

fn rla_kv_state_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "rla_kv_state";
    let fm = feature_map_attr(frame)?;
    let (ka, va) = (frame.arg(0)?, frame.arg(1)?);
    let d = kv_dims(OP, &ka)?;
    let (k, v) = (f32_input(&ka, OP, "k")?, f32_input(&va, OP, "v")?);
    let mut rets = frame.rets_mut()?;
    let [state] = f32_rets(&mut rets, OP, "state")?;
    kernel::rla_kv_state(fm, &d, &k, &v, state).map_err(to_ffi)
}

fn rla_kv_state_bwd_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "rla_kv_state_bwd";
    let fm = feature_map_attr(frame)?;
    let (ka, va, dsa) = (frame.arg(0)?, frame.arg(1)?, frame.arg(2)?);
    let d = kv_dims(OP, &ka)?;
    let (k, v) = (f32_input(&ka, OP, "k")?, f32_input(&va, OP, "v")?);
    let ds = dsa.as_slice::<f32>()?;
    let mut rets = frame.rets_mut()?;
    let [dk, dv] = f32_rets(&mut rets, OP, "dk, dv")?;
    kernel::rla_kv_state_bwd(fm, &d, &k, &v, ds, dk, dv).map_err(to_ffi)
}

pjrt::ffi_handler!(RLA_FWD_HANDLER, rla_fwd_handler);
pjrt::ffi_handler!(RLA_BWD_HANDLER, rla_bwd_handler);
pjrt::ffi_handler!(RLA_FWD_H0_HANDLER, rla_fwd_h0_handler);
pjrt::ffi_handler!(RLA_BWD_H0_HANDLER, rla_bwd_h0_handler);
pjrt::ffi_handler!(RLA_KV_STATE_HANDLER, rla_kv_state_handler);
pjrt::ffi_handler!(RLA_KV_STATE_BWD_HANDLER, rla_kv_state_bwd_handler);

/// Register both blocks' CPU kernels for `client`'s platform (process-global; idempotent).
pub fn register_cpu_kernels(client: &pjrt::Client) -> pjrt::Result<()> {
    client.register_ffi_handler(FWD_TARGET, RLA_FWD_HANDLER)?;
    client.register_ffi_handler(BWD_TARGET, RLA_BWD_HANDLER)?;
    client.register_ffi_handler(FWD_H0_TARGET, RLA_FWD_H0_HANDLER)?;
    client.register_ffi_handler(BWD_H0_TARGET, RLA_BWD_H0_HANDLER)?;
    client.register_ffi_handler(KV_STATE_TARGET, RLA_KV_STATE_HANDLER)?;
    client.register_ffi_handler(KV_STATE_BWD_TARGET, RLA_KV_STATE_BWD_HANDLER)?;
    crate::adamw::register_cpu_kernel(client)?;
    crate::ffi_attention::register_attention_kernels(client)?;
    crate::cross_entropy::register_cpu_kernels(client)?;
    crate::rms_norm::register_cpu_kernels(client)?;
    crate::embed::register_cpu_kernels(client)?;
    REGISTERED.store(true, Ordering::Release);
    Ok(())
}
