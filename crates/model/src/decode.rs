//! Decoding (DESIGN §4): a prefill graph over the prompt and a one-token step graph, both carrying the
//! per-layer caches as explicit inputs and outputs so they stay on the device between steps.
//!
//! Caches, per layer, in [`cache_specs`] order (all f32):
//! - local layer: ring buffers `k_ring`, `v_ring` `[B, W+1, G, H]` of *raw* k and v (before qk-norm and
//!   RoPE: RLA needs the raw k). Token `p` lives in slot `p mod (W+1)`. RAttention layers also keep
//!   `rla_state [B, G, 2H, H]` = Σ φ(k_s)ᵀ v_s over the tokens that have left the window.
//! - global layer: `k`, `v` `[B, max_len, G, H]`; `k` is stored after qk-norm (what attention reads).
//!
//! At step `t` a local layer first absorbs the token leaving the window: if `t ≥ W+1`, slot
//! `t mod (W+1)` holds token `t−W−1`, so `S += φ(k)ᵀ v` for it; then the slot is overwritten with
//! token `t`. SWA attends over the W+1 slots (valid ones only) with RoPE at their true positions, RLA
//! reads `φ(q_t)·S` with the raw q, and the two outputs are mixed exactly as in
//! [`transformer::attention_core`](crate::transformer::attention_core).

use crate::config::{Dtype, FeatureMapKind, LayerKind, LocalKind, ModelConfig};
use crate::layers::{bcast, dims, rope, softmax_last};
use crate::transformer::{
    attention_core_with_state, block, declare_params, embed, head, mix_local, model_error, qk_norm,
    ParamOps,
};
use hlo_builder::{Builder, Cmp, Computation, DotDims, ElementType, Op, Result, Shape};

const F32: ElementType = ElementType::F32;
const S32: ElementType = ElementType::S32;

fn i64s(d: &[usize]) -> Vec<i64> {
    d.iter().map(|&x| x as i64).collect()
}

fn check(cfg: &ModelConfig, what: &str, batch: usize, max_len: usize) -> Result<Vec<LayerKind>> {
    cfg.validate()
        .map_err(|e| model_error(format!("{what}: {e}")))?;
    if batch == 0 || max_len == 0 {
        return Err(model_error(format!(
            "{what}: batch ({batch}) and max_len ({max_len}) must be > 0"
        )));
    }
    cfg.layer_kinds()
        .map_err(|e| model_error(format!("{what}: {e}")))
}

/// The cache buffers of a decode state, in order, all f32: per local layer a ring buffer of W+1 raw
/// k and v entries `[B, W+1, G, H]` each, plus the RLA state `S [B, G, 2H, H]` for RAttention
/// layers; per global layer a full k (after qk-norm) and v cache `[B, max_len, G, H]`.
///
/// Names are `layers.{i}.k_ring`, `layers.{i}.v_ring`, `layers.{i}.rla_state`, `layers.{i}.k`,
/// `layers.{i}.v`. An invalid config gives an empty list (the build functions report why).
pub fn cache_specs(cfg: &ModelConfig, batch: usize, max_len: usize) -> Vec<(String, Vec<usize>)> {
    let (g, h, m) = (cfg.kv_heads, cfg.head_dim, cfg.window + 1);
    let mut v = Vec::new();
    for (i, kind) in cfg
        .layer_kinds()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let p = format!("layers.{i}");
        match kind {
            LayerKind::Local => {
                v.push((format!("{p}.k_ring"), vec![batch, m, g, h]));
                v.push((format!("{p}.v_ring"), vec![batch, m, g, h]));
                if cfg.local_kind == LocalKind::Rattention {
                    v.push((format!("{p}.rla_state"), vec![batch, g, 2 * h, h]));
                }
            }
            LayerKind::Global => {
                v.push((format!("{p}.k"), vec![batch, max_len, g, h]));
                v.push((format!("{p}.v"), vec![batch, max_len, g, h]));
            }
        }
    }
    v
}

/// Ring buffer `[B, W+1, G, H]` holding the last `min(L, W+1)` tokens of `x [B, L, G, H]` in slot
/// `p mod (W+1)`; slots never written are zero.
fn ring_from_prompt(b: &Builder, x: Op, window: usize) -> Result<Op> {
    let d = dims(b, x)?;
    let (l, m) = (d[1], window as i64 + 1);
    if l < m {
        let zero = b.scalar(0.0f32)?;
        return b.pad(x, zero, &[(0, 0, 0), (0, m - l, 0), (0, 0, 0), (0, 0, 0)]);
    }
    // last[i] is position L−m+i, which belongs in slot (r + i) mod m with r = L mod m.
    let last = b.slice_in_dim(x, l - m, l, 1)?;
    let r = l % m;
    if r == 0 {
        return Ok(last);
    }
    b.concatenate(
        &[
            b.slice_in_dim(last, m - r, m, 1)?,
            b.slice_in_dim(last, 0, m - r, 1)?,
        ],
        1,
    )
}

/// `params..., tokens s32[B, L] -> tuple(logits f32[B, L, V], cache...)`: the prefill of `L` prompt
/// tokens. The logits equal [`transformer::forward`](crate::transformer::forward)'s; the caches are
/// what [`build_decode_step`] continues from at position `L`: ring buffers holding the last W+1
/// tokens in slot `t mod (W+1)`, the RLA state after token `L−W−2` (the block's `final_state`; zero
/// when `L ≤ W+1`), and the global caches filled up to position `L−1`. Needs `L ≤ max_len`.
/// `platform` is where the graph runs (it picks the RLA lowering, see
/// [`transformer::rla_lowering`](crate::transformer::rla_lowering)).
pub fn build_prefill(
    cfg: &ModelConfig,
    batch: usize,
    prompt_len: usize,
    max_len: usize,
    platform: &str,
) -> Result<Computation> {
    let kinds = check(cfg, "build_prefill", batch, max_len)?;
    if prompt_len == 0 || prompt_len > max_len {
        return Err(model_error(format!(
            "build_prefill: prompt_len ({prompt_len}) must be in 1..=max_len ({max_len})"
        )));
    }
    let b = Builder::new("prefill");
    let (_, p) = declare_params(&b, cfg)?;
    let tokens = b.parameter(
        Shape::array(S32, &[batch as i64, prompt_len as i64]),
        "tokens",
    )?;
    let mut x = embed(&b, cfg, &p, tokens)?;
    let pos = b.iota(F32, &[prompt_len as i64], 0)?;
    let mut caches = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let _s = b.name_scope(&format!("layer_{i}"));
        let ap = format!("layers.{i}.attn");
        x = block(&b, cfg, &p, i, x, |q, k, v| {
            let (ctx, state) =
                attention_core_with_state(&b, cfg, &p, &ap, kind, (q, k, v), pos, platform)?;
            let _c = b.name_scope("cache");
            match kind {
                LayerKind::Local => {
                    caches.push(ring_from_prompt(&b, k, cfg.window)?);
                    caches.push(ring_from_prompt(&b, v, cfg.window)?);
                    caches.extend(state);
                }
                LayerKind::Global => {
                    let (_, kn) = qk_norm(&b, cfg, &p, &ap, q, k)?;
                    let zero = b.scalar(0.0f32)?;
                    let pad = [
                        (0, 0, 0),
                        (0, (max_len - prompt_len) as i64, 0),
                        (0, 0, 0),
                        (0, 0, 0),
                    ];
                    caches.push(b.pad(kn, zero, &pad)?);
                    caches.push(b.pad(v, zero, &pad)?);
                }
            }
            Ok(ctx)
        })?;
    }
    let logits = head(&b, cfg, &p, x)?;
    let mut outs = vec![logits];
    outs.extend(caches);
    let root = b.tuple(&outs)?;
    b.build(root)
}

/// φ(x) over the last dim (H → 2H), f32: `[softmax(x), softmax(−x)]` or `[relu(x), relu(−x)]`.
fn feature_map(b: &Builder, fm: FeatureMapKind, x: Op) -> Result<Op> {
    let last = dims(b, x)?.len() as i64 - 1;
    let nx = b.neg(x)?;
    let (a, c) = match fm {
        FeatureMapKind::Softmax => (softmax_last(b, x)?, softmax_last(b, nx)?),
        FeatureMapKind::Relu => {
            let zero = b.zeros(F32, &dims(b, x)?)?;
            (b.max(x, zero)?, b.max(nx, zero)?)
        }
    };
    b.concatenate(&[a, c], last)
}

/// Attention of one query token `q [B,1,N,H]` (rotated and scaled) over `k, v [B,S,G,H]` where
/// key `s` is visible iff `visible[s]` (pred `[S]`); fp32 softmax. Returns `[B,1,N,H]`.
fn attend_one(b: &Builder, q: Op, k: Op, v: Op, visible: Op) -> Result<Op> {
    let (qd, kd) = (dims(b, q)?, dims(b, k)?);
    let (bs, n, h, s, g) = (qd[0], qd[2], qd[3], kd[1], kd[2]);
    let r = n / g;
    let qg = b.reshape(q, &[bs, g, r, h])?;
    let dd = DotDims {
        lhs_batch: vec![0, 1],
        rhs_batch: vec![0, 2],
        lhs_contracting: vec![3],
        rhs_contracting: vec![3],
    };
    let scores = b.dot_general(qg, k, &dd, None, Some(F32))?; // [B, G, R, S]
    let sd = [bs, g, r, s];
    let vis = bcast(b, visible, &sd, &[3])?;
    let p = softmax_last(b, b.select(vis, scores, b.full(F32, -1e30, &sd)?)?)?;
    let dd = DotDims {
        lhs_batch: vec![0, 1],
        rhs_batch: vec![0, 2],
        lhs_contracting: vec![3],
        rhs_contracting: vec![1],
    };
    let o = b.dot_general(p, v, &dd, None, Some(F32))?; // [B, G, R, H]
    b.reshape(o, &[bs, 1, n, h])
}

/// One local layer at position `pos` (s32 scalar) for projected `q [B,1,N,H]`, `k, v [B,1,G,H]`:
/// returns the context `[B,1,N,H]` and the updated caches (k_ring, v_ring[, rla_state]).
#[allow(clippy::too_many_arguments)]
fn local_step(
    b: &Builder,
    cfg: &ModelConfig,
    p: &ParamOps,
    prefix: &str,
    (q, k, v): (Op, Op, Op),
    cache: &[Op],
    pos: Op,
) -> Result<(Op, Vec<Op>)> {
    let qd = dims(b, q)?;
    let (bs, n, g, h) = (qd[0], qd[2], dims(b, k)?[2], qd[3]);
    let m = cfg.window as i64 + 1;
    let zero = b.scalar(0i32)?;
    let slot = b.rem(pos, b.scalar(m as i32)?)?;
    let at_slot = [zero, slot, zero, zero];
    let (k_ring, v_ring) = (cache[0], cache[1]);
    let mut new_cache = Vec::new();
    let state = if cfg.local_kind == LocalKind::Rattention {
        let _s = b.name_scope("absorb");
        // The slot about to be overwritten holds token pos − W − 1 when pos ≥ W + 1.
        let old_k = b.reshape(
            b.dynamic_slice(k_ring, &at_slot, &[bs, 1, g, h])?,
            &[bs, g, h],
        )?;
        let old_v = b.reshape(
            b.dynamic_slice(v_ring, &at_slot, &[bs, 1, g, h])?,
            &[bs, g, h],
        )?;
        let sd = [bs, g, 2 * h, h];
        let outer = b.mul(
            bcast(
                b,
                feature_map(b, cfg.rla.feature_map, old_k)?,
                &sd,
                &[0, 1, 2],
            )?,
            bcast(b, old_v, &sd, &[0, 1, 3])?,
        )?;
        let leaving = b.compare(pos, b.scalar(m as i32)?, Cmp::Ge)?;
        let s = b.select(
            bcast(b, leaving, &sd, &[])?,
            b.add(cache[2], outer)?,
            cache[2],
        )?;
        Some(s)
    } else {
        None
    };
    let k_ring = b.dynamic_update_slice(k_ring, k, &at_slot)?;
    let v_ring = b.dynamic_update_slice(v_ring, v, &at_slot)?;
    new_cache.extend([k_ring, v_ring]);
    let swa = {
        let _s = b.name_scope("swa");
        // Slot j holds token pos − ((pos − j) mod (W+1)); negative means never written.
        let j = b.iota(S32, &[m], 0)?;
        let back = b.rem(
            b.add(
                b.sub(bcast(b, pos, &[m], &[])?, j)?,
                b.full(S32, m as f64, &[m])?,
            )?,
            b.full(S32, m as f64, &[m])?,
        )?;
        let slot_pos = b.sub(bcast(b, pos, &[m], &[])?, back)?;
        let valid = b.compare(slot_pos, b.zeros(S32, &[m])?, Cmp::Ge)?;
        let (qn, kn) = qk_norm(b, cfg, p, prefix, q, k_ring)?;
        let inv_sqrt_h = b.scalar(1.0 / (h as f32).sqrt())?;
        let qpos = b.reshape(b.convert(pos, F32)?, &[1])?;
        let qr = b.mul(rope(b, qn, qpos, cfg.rope_theta)?, inv_sqrt_h)?;
        let kr = rope(b, kn, b.convert(slot_pos, F32)?, cfg.rope_theta)?;
        attend_one(b, qr, kr, v_ring, valid)?
    };
    let Some(s) = state else {
        return Ok((swa, new_cache));
    };
    new_cache.push(s);
    let rla = {
        let _s = b.name_scope("rla");
        let r = n / g;
        let fq = b.reshape(feature_map(b, cfg.rla.feature_map, q)?, &[bs, g, r, 2 * h])?;
        let dd = DotDims {
            lhs_batch: vec![0, 1],
            rhs_batch: vec![0, 1],
            lhs_contracting: vec![3],
            rhs_contracting: vec![2],
        };
        b.reshape(b.dot_general(fq, s, &dd, None, Some(F32))?, &[bs, 1, n, h])?
    };
    Ok((mix_local(b, p, prefix, swa, rla)?, new_cache))
}

/// One global layer at position `pos`: writes k (after qk-norm) and v into the full caches and
/// attends causally over positions `≤ pos`, no RoPE.
fn global_step(
    b: &Builder,
    cfg: &ModelConfig,
    p: &ParamOps,
    prefix: &str,
    (q, k, v): (Op, Op, Op),
    cache: &[Op],
    pos: Op,
) -> Result<(Op, Vec<Op>)> {
    let max_len = dims(b, cache[0])?[1];
    let (qn, kn) = qk_norm(b, cfg, p, prefix, q, k)?;
    let zero = b.scalar(0i32)?;
    let at = [zero, pos, zero, zero];
    let kc = b.dynamic_update_slice(cache[0], kn, &at)?;
    let vc = b.dynamic_update_slice(cache[1], v, &at)?;
    let visible = b.compare(
        b.iota(S32, &[max_len], 0)?,
        bcast(b, pos, &[max_len], &[])?,
        Cmp::Le,
    )?;
    let inv_sqrt_h = b.scalar(1.0 / (cfg.head_dim as f32).sqrt())?;
    let ctx = attend_one(b, b.mul(qn, inv_sqrt_h)?, kc, vc, visible)?;
    Ok((ctx, vec![kc, vc]))
}

/// `params..., cache..., token s32[B], pos s32[] -> tuple(logits f32[B, V], cache'...)`: one token
/// at position `pos` (its caches as [`cache_specs`] lists them, holding positions `< pos`).
/// Positions must stay below `max_len` (global caches clamp the write index otherwise).
pub fn build_decode_step(cfg: &ModelConfig, batch: usize, max_len: usize) -> Result<Computation> {
    let kinds = check(cfg, "build_decode_step", batch, max_len)?;
    let b = Builder::new("decode_step");
    let (_, p) = declare_params(&b, cfg)?;
    let cache_in: Vec<Op> = cache_specs(cfg, batch, max_len)
        .iter()
        .map(|(name, shape)| b.parameter(Shape::array(F32, &i64s(shape)), name))
        .collect::<Result<_>>()?;
    let token = b.parameter(Shape::array(S32, &[batch as i64]), "token")?;
    let pos = b.parameter(Shape::array(S32, &[]), "pos")?;
    let mut x = embed(&b, cfg, &p, b.reshape(token, &[batch as i64, 1])?)?;
    let mut cache_out = Vec::new();
    let mut next = 0;
    for (i, kind) in kinds.into_iter().enumerate() {
        let _s = b.name_scope(&format!("layer_{i}"));
        let ap = format!("layers.{i}.attn");
        let n_cache = match kind {
            LayerKind::Local if cfg.local_kind == LocalKind::Rattention => 3,
            _ => 2,
        };
        let cache = &cache_in[next..next + n_cache];
        next += n_cache;
        x = block(&b, cfg, &p, i, x, |q, k, v| {
            let (ctx, c) = match kind {
                LayerKind::Local => local_step(&b, cfg, &p, &ap, (q, k, v), cache, pos)?,
                LayerKind::Global => global_step(&b, cfg, &p, &ap, (q, k, v), cache, pos)?,
            };
            cache_out.extend(c);
            Ok(ctx)
        })?;
    }
    let logits = b.reshape(head(&b, cfg, &p, x)?, &[batch as i64, cfg.vocab as i64])?;
    let mut outs = vec![logits];
    outs.extend(cache_out);
    let root = b.tuple(&outs)?;
    b.build(root)
}

/// Per-sequence decode cache bytes at `context` tokens, for comparing RAttention, SWA and full
/// attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheBytes {
    /// k and v bytes at the activation dtype (2 for bf16, 4 for f32): a local layer counts its
    /// `min(W, context)`-token window, a global layer the full `context`. The ring buffer's extra
    /// slot (W+1 entries) holds the token being decoded, which every attention variant needs as
    /// well, so it is not counted (it adds 1/W to the local term in the actual buffers, which are
    /// f32 in this implementation).
    pub kv: u64,
    /// RLA state bytes, f32: `G · 2H · H · 4` per RAttention local layer, independent of `context`.
    pub rla_state: u64,
}

impl CacheBytes {
    /// `kv + rla_state`.
    pub fn total(&self) -> u64 {
        self.kv + self.rla_state
    }
}

/// Per-sequence cache bytes at `context` tokens (see [`CacheBytes`]).
pub fn cache_bytes(cfg: &ModelConfig, context: usize) -> CacheBytes {
    let (g, h) = (cfg.kv_heads as u64, cfg.head_dim as u64);
    let act = match cfg.dtype {
        Dtype::Bf16 => 2,
        Dtype::F32 => 4,
    };
    let mut out = CacheBytes {
        kv: 0,
        rla_state: 0,
    };
    for kind in cfg.layer_kinds().unwrap_or_default() {
        let tokens = match kind {
            LayerKind::Local => cfg.window.min(context),
            LayerKind::Global => context,
        } as u64;
        out.kv += 2 * tokens * g * h * act;
        if kind == LayerKind::Local && cfg.local_kind == LocalKind::Rattention {
            out.rla_state += g * 2 * h * h * 4;
        }
    }
    out
}
