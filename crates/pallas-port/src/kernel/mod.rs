//! Fast fp32 CPU kernels for the RLA blocks (DESIGN §3), and causal softmax attention
//! ([`attention`]: [`attn_fwd`], [`attn_bwd`]).
//!
//! Algorithm: the chunked scan with one saved state per chunk of `cfg.chunk` tokens and the
//! sub-chunk (`cfg.sub_chunk`) states recomputed on the fly. The N/G query heads of a kv group are
//! stacked so each sub-chunk does `[R·C, 2H]×[2H, H]`-sized GEMMs (R = N/G). φ(q), φ(k) are computed
//! per sub-chunk into small scratch, never written to full-size arrays. The shift by W+1 is index
//! arithmetic: the shifted key of query position j is `k[j − W − 1]`, valid iff `j ≥ W + 1`.
//! Work whose keys are all masked is skipped.
//!
//! Parallelism (rayon):
//! - forward: phase 1 computes the chunk states per (batch, kv head) with chunk-sized GEMMs;
//!   phase 2 computes outputs in parallel over (batch, chunk, kv head). Given a sequence
//!   shard's own state contribution ([`rla_fwd_h0_with_contrib`]) and one chunk, phase 1 has
//!   nothing left to scan and runs inside phase 2's tasks (one parallel pass).
//! - backward: parallel over (batch, kv head), chunks in reverse carrying dS; results are
//!   scattered into the `[B, T, heads, H]` outputs in parallel.

/// `Deref<Target = Heads>` for a kernel geometry `$geo` with a `heads: Heads` field, so its
/// sizes and offsets read `geo.t`, `geo.kv_off(..)`.
macro_rules! deref_heads {
    ($geo:ty) => {
        impl std::ops::Deref for $geo {
            type Target = super::Heads;
            #[inline]
            fn deref(&self) -> &super::Heads {
                &self.heads
            }
        }
    };
}

pub mod adamw;
pub mod attention;
mod bwd;
pub mod cross_entropy;
pub mod embed;
pub(crate) mod feature;
mod fwd;
pub(crate) mod mm;
pub mod rms_norm;
mod state;

use std::cell::RefCell;

pub use attention::{attn_bwd, attn_bwd_at, attn_fwd, attn_fwd_at, AttnPositions};
pub use state::{rla_kv_state, rla_kv_state_bwd};

use crate::config::{check_len, RlaConfig, RlaDims, RlaError};

thread_local! {
    /// Per-thread scratch reused across calls (no fresh allocation and page faults per call).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a per-thread scratch slice of `len` floats whose contents are unspecified
/// (finite values left from earlier calls, or zeros). Re-entrant: a nested call on the same thread
/// (rayon work stealing) gets a fresh buffer instead of the one in use.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        let mut cur = s.borrow_mut();
        if cur.len() < buf.len() {
            *cur = buf;
        }
    });
    out
}

/// Splits `buf` into consecutive pieces of the given lengths.
pub(crate) fn split_scratch<const K: usize>(
    mut buf: &mut [f32],
    lens: [usize; K],
) -> [&mut [f32]; K] {
    lens.map(|n| {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        buf = tail;
        head
    })
}

/// Checks the config, the dims and the lengths of the inputs `q`, `k`, `v` both blocks take.
fn check_inputs(
    op: &'static str,
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<(), RlaError> {
    cfg.check(op)?;
    check_qkv(op, d, q, k, v)
}

/// Checks the dims and the lengths of q `[B,T,N,H]`, k, v `[B,T,G,H]` (every kernel's inputs).
pub(crate) fn check_qkv(
    op: &'static str,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<(), RlaError> {
    d.check(op)?;
    check_len(op, "q", q.len(), &d.q_shape(), d)?;
    check_len(op, "k", k.len(), &d.kv_shape(), d)?;
    check_len(op, "v", v.len(), &d.kv_shape(), d)
}

/// Checks the lengths of a backward's `d_o`, `dq` `[B,T,N,H]` and `dk`, `dv` `[B,T,G,H]`.
pub(crate) fn check_grads(
    op: &'static str,
    d: &RlaDims,
    d_o: &[f32],
    (dq, dk, dv): (&[f32], &[f32], &[f32]),
) -> Result<(), RlaError> {
    check_len(op, "d_o", d_o.len(), &d.q_shape(), d)?;
    check_len(op, "dq", dq.len(), &d.q_shape(), d)?;
    check_len(op, "dk", dk.len(), &d.kv_shape(), d)?;
    check_len(op, "dv", dv.len(), &d.kv_shape(), d)
}

/// The position and head sizes of q `[B,T,N,H]` and k/v `[B,T,G,H]` as the kernels index them
/// (R = N/G query heads per kv head); each kernel's geometry derefs to it.
#[derive(Clone, Copy)]
pub(crate) struct Heads {
    pub t: usize,
    pub n: usize,
    pub g: usize,
    pub h: usize,
    pub r: usize,
}

impl Heads {
    pub(crate) fn new(d: &RlaDims) -> Heads {
        Heads {
            t: d.seq,
            n: d.heads,
            g: d.kv_heads,
            h: d.head_dim,
            r: d.group_size(),
        }
    }

    /// Offset of k/v row (b, s, kv head gi).
    #[inline]
    pub(crate) fn kv_off(&self, b: usize, s: usize, gi: usize) -> usize {
        ((b * self.t + s) * self.g + gi) * self.h
    }

    /// Offset of q/o row (b, t, head n).
    #[inline]
    pub(crate) fn q_off(&self, b: usize, t: usize, n: usize) -> usize {
        ((b * self.t + t) * self.n + n) * self.h
    }
}

/// RLA forward block: `(q, k, v) -> (o, chunk_states, final_state)`.
///
/// Shapes: `q`/`o` `[B,T,N,H]`, `k`/`v` `[B,T,G,H]`, `chunk_states` `[B,G,ceil(T/chunk),2H,H]`
/// (the state entering each chunk), `final_state` `[B,G,2H,H]` (the state after all T tokens,
/// Σ_{s ≤ T−W−2} φ(k_s)ᵀ v_s). Every output element is written.
#[allow(clippy::too_many_arguments)]
pub fn rla_fwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    chunk_states: &mut [f32],
    final_state: &mut [f32],
) -> Result<(), RlaError> {
    let start = fwd::Start {
        h0: None,
        contrib: None,
    };
    checked_fwd(
        "rla_fwd",
        cfg,
        d,
        (q, k, v),
        start,
        (o, chunk_states, final_state),
    )
}

/// [`rla_fwd`] whose scan starts from the state `h0` `[B,G,2H,H]` instead of zero: RLA is
/// linear in its state, so `o_t = φ(q_t)·(h0 + Σ_{s ≤ t−W−1} φ(k_s)ᵀ v_s)`, every saved chunk
/// state and the final state include h0. What a sequence shard runs with the prefix of the
/// shards before it ([`crate::rla_seq_shard`]). With h0 = 0 the results equal [`rla_fwd`]'s.
#[allow(clippy::too_many_arguments)]
pub fn rla_fwd_h0(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    h0: &[f32],
    o: &mut [f32],
    chunk_states: &mut [f32],
    final_state: &mut [f32],
) -> Result<(), RlaError> {
    let outs = (o, chunk_states, final_state);
    let start = fwd::Start {
        h0: Some(h0),
        contrib: None,
    };
    checked_fwd("rla_fwd_h0", cfg, d, (q, k, v), start, outs)
}

/// [`rla_fwd_h0`] given also the keys' own contribution `contrib` `[B,G,2H,H]`,
/// `Σ_s φ(k_s)ᵀ v_s` over all T keys as [`rla_kv_state`] computes it for the same k, v and
/// feature map (what a sequence shard computed anyway for the shards after it). The final
/// state is then `h0 + contrib − Σ_{s ≥ T−W−1} φ(k_s)ᵀ v_s` (W + 1 keys) instead of a scan of
/// the last chunk's keys, when that is fewer keys: with one chunk and W = 0, one key instead of
/// T − 1. The same results as [`rla_fwd_h0`] up to fp32 rounding of the final state (o and
/// chunk_states are bit-identical).
#[allow(clippy::too_many_arguments)]
pub fn rla_fwd_h0_with_contrib(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (h0, contrib): (&[f32], &[f32]),
    o: &mut [f32],
    chunk_states: &mut [f32],
    final_state: &mut [f32],
) -> Result<(), RlaError> {
    const OP: &str = "rla_fwd_h0";
    check_len(OP, "contrib", contrib.len(), &d.final_state_shape(), d)?;
    let outs = (o, chunk_states, final_state);
    let start = fwd::Start {
        h0: Some(h0),
        contrib: Some(contrib),
    };
    checked_fwd(OP, cfg, d, (q, k, v), start, outs)
}

/// The one checked body of [`rla_fwd`] (from zero), [`rla_fwd_h0`] and
/// [`rla_fwd_h0_with_contrib`] (whose caller checked `contrib`): every length checked against
/// `d` with the errors naming `op`, then the scan.
fn checked_fwd(
    op: &'static str,
    cfg: &RlaConfig,
    d: &RlaDims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    start: fwd::Start<'_>,
    (o, chunk_states, final_state): (&mut [f32], &mut [f32], &mut [f32]),
) -> Result<(), RlaError> {
    check_inputs(op, cfg, d, q, k, v)?;
    let (cs, fs) = (d.chunk_states_shape(cfg), d.final_state_shape());
    if let Some(h0) = start.h0 {
        check_len(op, "h0", h0.len(), &fs, d)?;
    }
    check_len(op, "o", o.len(), &d.q_shape(), d)?;
    check_len(op, "chunk_states", chunk_states.len(), &cs, d)?;
    check_len(op, "final_state", final_state.len(), &fs, d)?;
    fwd::forward(cfg, d, q, k, v, start, o, chunk_states, final_state);
    Ok(())
}

/// RLA backward block: `(q, k, v, chunk_states, d_o) -> (dq, dk, dv)`.
///
/// `chunk_states` must be the one [`rla_fwd`] produced for the same inputs and config.
/// Shapes as in [`rla_fwd`]; `d_o`/`dq` `[B,T,N,H]`, `dk`/`dv` `[B,T,G,H]`. Every output element
/// is written.
#[allow(clippy::too_many_arguments)]
pub fn rla_bwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    chunk_states: &[f32],
    d_o: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<(), RlaError> {
    let grads = (dq, dk, dv);
    let none = bwd::StateGrads::none();
    checked_bwd("rla_bwd", cfg, d, (q, k, v), chunk_states, d_o, none, grads)
}

/// The backward of [`rla_fwd_h0`]: `(q, k, v, chunk_states, d_o, d_final) -> (dq, dk, dv,
/// dh0)`, the gradients of `⟨d_o, o⟩ + ⟨d_final, final_state⟩` (`d_final` `[B,G,2H,H]`,
/// `None` for zero). `chunk_states` must be the ones [`rla_fwd_h0`] saved (they include h0).
/// dh0 `[B,G,2H,H]` is `d_final + Σ_t φ(q_t)ᵀ d_o_t` (over the query heads of each kv head):
/// the reverse scan's dS after the first chunk. Every output element is written.
#[allow(clippy::too_many_arguments)]
pub fn rla_bwd_h0(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    chunk_states: &[f32],
    d_o: &[f32],
    d_final: Option<&[f32]>,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    dh0: &mut [f32],
) -> Result<(), RlaError> {
    const OP: &str = "rla_bwd_h0";
    let fs = d.final_state_shape();
    if let Some(x) = d_final {
        check_len(OP, "d_final", x.len(), &fs, d)?;
    }
    check_len(OP, "dh0", dh0.len(), &fs, d)?;
    let state = bwd::StateGrads {
        h0: true,
        d_final,
        dh0: Some(dh0),
    };
    checked_bwd(
        OP,
        cfg,
        d,
        (q, k, v),
        chunk_states,
        d_o,
        state,
        (dq, dk, dv),
    )
}

/// The one checked body of [`rla_bwd`] and [`rla_bwd_h0`] (whose state gradients `state`
/// carries, checked by the caller): the inputs', chunk_states' and gradients' lengths checked
/// against `d` with the errors naming `op`, then the reverse scan.
#[allow(clippy::too_many_arguments)]
fn checked_bwd(
    op: &'static str,
    cfg: &RlaConfig,
    d: &RlaDims,
    (q, k, v): (&[f32], &[f32], &[f32]),
    chunk_states: &[f32],
    d_o: &[f32],
    state: bwd::StateGrads,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) -> Result<(), RlaError> {
    check_inputs(op, cfg, d, q, k, v)?;
    let cs = d.chunk_states_shape(cfg);
    check_len(op, "chunk_states", chunk_states.len(), &cs, d)?;
    check_grads(op, d, d_o, (dq, dk, dv))?;
    bwd::backward(cfg, d, q, k, v, chunk_states, d_o, state, dq, dk, dv);
    Ok(())
}

fn sub_chunks_per_group(cfg: &RlaConfig, d: &RlaDims) -> f64 {
    (d.batch * d.kv_heads * d.seq.div_ceil(cfg.sub_chunk.max(1))) as f64
}

/// Nominal FLOPs of the chunked forward (as the Pallas kernel does it: every sub-chunk dense, no
/// skipping of masked work), per (batch, kv head, sub-chunk) with M = (N/G)·C stacked query rows:
/// `φQ·S` 4MH² + `φQ φK̃ᵀ` 4MCH + `(A⊙M)Ṽ` 2MCH + state update 4CH². Feature maps not counted.
pub fn flops_fwd(cfg: &RlaConfig, d: &RlaDims) -> f64 {
    let (c, h) = (cfg.sub_chunk as f64, d.head_dim as f64);
    let m = d.group_size() as f64 * c;
    sub_chunks_per_group(cfg, d) * (4.0 * m * h * h + 6.0 * m * c * h + 4.0 * c * h * h)
}

/// Nominal FLOPs of the chunked backward (DESIGN §3, dense sub-chunks, recomputation included):
/// per (batch, kv head, sub-chunk) with M = (N/G)·C: state recompute 4CH², `dO Sᵀ` 4MH²,
/// `dO Ṽᵀ` 2MCH, `P φK̃` 4MCH, `Pᵀ φQ` 4MCH, `Ṽ dSᵀ` 4CH², `φQ φK̃ᵀ` 4MCH, `Aᵀ dO` 2MCH,
/// `φK̃ dS` 4CH², `φQᵀ dO` 4MH²; total 8MH² + 16MCH + 12CH².
pub fn flops_bwd(cfg: &RlaConfig, d: &RlaDims) -> f64 {
    let (c, h) = (cfg.sub_chunk as f64, d.head_dim as f64);
    let m = d.group_size() as f64 * c;
    sub_chunks_per_group(cfg, d) * (8.0 * m * h * h + 16.0 * m * c * h + 12.0 * c * h * h)
}
