//! Causal softmax attention ([`crate::kernel::attention`]) as XLA FFI handlers (typed FFI,
//! api_version 4).
//!
//! Targets `rattention.attn_fwd` (`(q, k, v) -> (o, lse)`) and `rattention.attn_bwd`
//! (`(q, k, v, o, lse, d_o) -> (dq, dk, dv)`); attribute `window` (i64, −1 for global causal
//! attention). q, k, v, d_o may be f32 or bf16 (computed in f32); o, lse and the outputs are f32.
//! Registered with the RLA blocks by [`crate::register_cpu_kernels`].

use crate::config::RlaDims;
use crate::kernel;
use pjrt::ffi::{BufferArg, CallFrame, FfiError};
use pjrt::ElementType;
use std::borrow::Cow;

/// Custom-call target of the attention forward.
pub const ATTN_FWD_TARGET: &str = "rattention.attn_fwd";
/// Custom-call target of the attention backward.
pub const ATTN_BWD_TARGET: &str = "rattention.attn_bwd";

/// The `window` attribute: `None` (global) for a negative value.
fn window(frame: &CallFrame<'_>) -> Result<Option<usize>, FfiError> {
    let w = frame.attr_i64("window")?;
    Ok(usize::try_from(w).ok())
}

fn f32_input<'a>(a: &BufferArg<'a>, op: &str, what: &str) -> Result<Cow<'a, [f32]>, FfiError> {
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

fn dims_of(op: &str, q: &BufferArg<'_>, k: &BufferArg<'_>) -> Result<RlaDims, FfiError> {
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

fn to_ffi(e: crate::RlaError) -> FfiError {
    FfiError::invalid_argument(e.to_string())
}

fn attn_fwd_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "attn_fwd";
    let w = window(frame)?;
    let (qa, ka, va) = (frame.arg(0)?, frame.arg(1)?, frame.arg(2)?);
    let d = dims_of(OP, &qa, &ka)?;
    let (q, k, v) = (
        f32_input(&qa, OP, "q")?,
        f32_input(&ka, OP, "k")?,
        f32_input(&va, OP, "v")?,
    );
    let mut rets = frame.rets_mut()?;
    let [o, lse] = rets.as_mut_slice() else {
        return Err(FfiError::invalid_argument(
            "attn_fwd: expected 2 results (o, lse)",
        ));
    };
    kernel::attn_fwd(&d, w, &q, &k, &v, o.as_mut_slice()?, lse.as_mut_slice()?).map_err(to_ffi)
}

fn attn_bwd_handler(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    const OP: &str = "attn_bwd";
    let w = window(frame)?;
    let args = (0..6)
        .map(|i| frame.arg(i))
        .collect::<Result<Vec<_>, _>>()?;
    let d = dims_of(OP, &args[0], &args[1])?;
    let (q, k, v) = (
        f32_input(&args[0], OP, "q")?,
        f32_input(&args[1], OP, "k")?,
        f32_input(&args[2], OP, "v")?,
    );
    let (o, lse) = (args[3].as_slice::<f32>()?, args[4].as_slice::<f32>()?);
    let d_o = f32_input(&args[5], OP, "d_o")?;
    let mut rets = frame.rets_mut()?;
    let [dq, dk, dv] = rets.as_mut_slice() else {
        return Err(FfiError::invalid_argument(
            "attn_bwd: expected 3 results (dq, dk, dv)",
        ));
    };
    kernel::attn_bwd(
        &d,
        w,
        &q,
        &k,
        &v,
        o,
        lse,
        &d_o,
        dq.as_mut_slice()?,
        dk.as_mut_slice()?,
        dv.as_mut_slice()?,
    )
    .map_err(to_ffi)
}

pjrt::ffi_handler!(ATTN_FWD_HANDLER, attn_fwd_handler);
pjrt::ffi_handler!(ATTN_BWD_HANDLER, attn_bwd_handler);

/// Register the attention kernels for `client`'s platform (process-global; idempotent). Called
/// by [`crate::register_cpu_kernels`].
pub fn register_attention_kernels(client: &pjrt::Client) -> pjrt::Result<()> {
    client.register_ffi_handler(ATTN_FWD_TARGET, ATTN_FWD_HANDLER)?;
    client.register_ffi_handler(ATTN_BWD_TARGET, ATTN_BWD_HANDLER)
}
