//! The RLA decode step, one token at a time, beside the blocks it continues from.
//!
//! A decoder keeps the RLA state `S f32[B, G, 2H, H]` = Σ φ(k_s)ᵀ v_s over the tokens that have
//! left the sliding window (the blocks' `final_state` after a prefill). At step `t`:
//!
//! 1. [`absorb`] the token leaving the window (token `t − W − 1`, when `t ≥ W + 1`):
//!    `S += φ(k)ᵀ v`;
//! 2. [`read`] the query: `o_t = φ(q_t) · S`.
//!
//! Together they give the blocks' `o` for the last token ([`crate::reference::rla_scan_f64`] is
//! the same scan in f64). Both are plain HLO and run on every platform; the caller adds name
//! scopes.
//!
//! ```
//! use hlo_builder::{Builder, Cmp, ElementType, Shape};
//! use pallas_port::{decode, FeatureMap};
//! let b = Builder::new("step");
//! let f32 = |d: &[i64]| Shape::array(ElementType::F32, d);
//! let state = b.parameter(f32(&[1, 2, 16, 8]), "rla_state")?;
//! let (old_k, old_v) = (b.parameter(f32(&[1, 2, 8]), "old_k")?, b.parameter(f32(&[1, 2, 8]), "old_v")?);
//! let q = b.parameter(f32(&[1, 1, 4, 8]), "q")?;
//! let pos = b.parameter(Shape::scalar(ElementType::S32), "pos")?;
//! let leaving = b.compare(pos, b.scalar(33i32)?, Cmp::Ge)?; // W = 32
//! let state = decode::absorb(&b, state, old_k, old_v, leaving, FeatureMap::Softmax)?;
//! let o = decode::read(&b, q, state, FeatureMap::Softmax)?; // f32[1, 1, 4, 8]
//! # Ok::<(), hlo_builder::Error>(())
//! ```

use std::panic::Location;

use hlo_builder::{Builder, DotDims, ElementType, Error, Op, Result};

use crate::config::FeatureMap;
use crate::feature::feature_map;

const F32: ElementType = ElementType::F32;

#[track_caller]
fn invalid(b: &Builder, op: &'static str, message: String) -> Error {
    let loc = Location::caller();
    Error::Invalid {
        op,
        message,
        location: format!("{}:{}", loc.file(), loc.line()),
        scope: b.current_scope(),
    }
}

/// `S + φ(k)ᵀ v` where `leaving` is true, `S` otherwise: absorbs the token leaving the window.
///
/// `state f32[B, G, 2H, H]`; `old_k`, `old_v` `[B, G, H]` (f32, or bf16 converted to f32), the raw
/// key and value of that token; `leaving` a pred scalar (`pos ≥ W + 1` for a ring of `W + 1`
/// slots). Returns the new state `f32[B, G, 2H, H]`.
#[track_caller]
pub fn absorb(
    b: &Builder,
    state: Op,
    old_k: Op,
    old_v: Op,
    leaving: Op,
    fm: FeatureMap,
) -> Result<Op> {
    const OP: &str = "rla decode::absorb";
    let (ss, ks, vs, ls) = (
        b.shape(state)?,
        b.shape(old_k)?,
        b.shape(old_v)?,
        b.shape(leaving)?,
    );
    let kd = ks.dims();
    if kd.len() != 3 || vs.dims() != kd || ss.ty() != Some(F32) {
        return Err(invalid(
            b,
            OP,
            format!(
                "need state f32[B,G,2H,H] and old_k, old_v [B,G,H], got state {}, old_k {}, old_v {}",
                ss.short(),
                ks.short(),
                vs.short()
            ),
        ));
    }
    let sd = [kd[0], kd[1], 2 * kd[2], kd[2]];
    if ss.dims() != sd {
        return Err(invalid(
            b,
            OP,
            format!(
                "state {} must be [B,G,2H,H] = {sd:?} for old_k {}",
                ss.short(),
                ks.short()
            ),
        ));
    }
    if ls.ty() != Some(ElementType::Pred) || ls.rank() != 0 {
        return Err(invalid(
            b,
            OP,
            format!("`leaving` must be a pred scalar, got {}", ls.short()),
        ));
    }
    let old_v = if vs.ty() == Some(F32) {
        old_v
    } else {
        b.convert(old_v, F32)?
    };
    let outer = b.mul(
        b.broadcast_in_dim(feature_map(b, old_k, fm)?, &sd, &[0, 1, 2])?,
        b.broadcast_in_dim(old_v, &sd, &[0, 1, 3])?,
    )?;
    b.select(
        b.broadcast_in_dim(leaving, &sd, &[])?,
        b.add(state, outer)?,
        state,
    )
}

/// `φ(q) · S` for one query token: `q [B, 1, N, H]` (f32 or bf16), `state f32[B, G, 2H, H]`;
/// query head `n` reads the state of kv head `n / (N / G)`. Returns `f32[B, 1, N, H]`.
#[track_caller]
pub fn read(b: &Builder, q: Op, state: Op, fm: FeatureMap) -> Result<Op> {
    const OP: &str = "rla decode::read";
    let (qs, ss) = (b.shape(q)?, b.shape(state)?);
    let (qd, sd) = (qs.dims(), ss.dims());
    let ok = qd.len() == 4
        && qd[1] == 1
        && sd.len() == 4
        && ss.ty() == Some(F32)
        && sd[0] == qd[0]
        && sd[1] > 0
        && qd[2] % sd[1] == 0
        && sd[2] == 2 * qd[3]
        && sd[3] == qd[3];
    if !ok {
        return Err(invalid(
            b,
            OP,
            format!(
                "need q [B,1,N,H] and state f32[B,G,2H,H] with N a multiple of G, got q {}, state {}",
                qs.short(),
                ss.short()
            ),
        ));
    }
    let (bs, n, h, g) = (qd[0], qd[2], qd[3], sd[1]);
    let r = n / g;
    let fq = b.reshape(feature_map(b, q, fm)?, &[bs, g, r, 2 * h])?;
    let dd = DotDims {
        lhs_batch: vec![0, 1],
        rhs_batch: vec![0, 1],
        lhs_contracting: vec![3],
        rhs_contracting: vec![2],
    };
    b.reshape(
        b.dot_general(fq, state, &dd, None, Some(F32))?,
        &[bs, 1, n, h],
    )
}
