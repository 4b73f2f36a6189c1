//! Causal softmax attention that never computes a key block the mask hides entirely.
//!
//! q `[B,T,N,H]`, k/v `[B,T,G,H]` (GQA: query head n reads kv head n / (N/G)), already rotated
//! and scaled. Key s is visible to query t iff s ≤ t (global layers) and also t − W ≤ s (a
//! window W). Queries are cut into blocks; each block attends to the keys its rows can see:
//!
//! * **global** ([`causal_attention`] with `window = None`, or a window ≥ T − 1): query block i
//!   (rows `i·Bq .. (i+1)·Bq`) attends to the key prefix `0 .. (i+1)·Bq`, one block of the
//!   static unroll per query block; the mask hides keys only inside the diagonal block. About
//!   (n+1)/(2n) of the T×T scores for n = ⌈T/Bq⌉ blocks, and no padding when T is not a
//!   multiple of Bq.
//! * **sliding window** (W < T − 1): all query blocks at once in a `[B,G,nb,Bq,R,S]` layout whose
//!   key span S = Bq + ⌈W/Bq⌉·Bq covers the band; Bq below W keeps S close to the W+1 keys each
//!   query needs.
//!
//! Each block is one softmax with its own VJP ([`Builder::custom_vjp`]). The forward keeps the
//! unnormalised e = exp(s − rowmax) and divides after the second dot, o = (e V) / z with
//! z = Σ e, so no probabilities are written out. The backward is the textbook one (dV = Pᵀ dO,
//! dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = dS K, dK = dSᵀ Q) with P = e / z folded into dO / z,
//! over the same blocks as the forward, so it never reintroduces the masked work; the row max is
//! a constant of the backward (softmax does not depend on it). [`causal_attention_dense`] is the
//! earlier whole-matrix version, kept as a reference for tests and benches.

use std::sync::Arc;

use crate::layers::{bcast, dims};
use crate::sharding::SeqGlobal;
use hlo_builder::{Builder, Cmp, DotDims, ElementType, Op, Result, Sharding};
use pallas_port::attention::{attention_kernel_at, AttentionLowering};
use pallas_port::seq::SeqShards;

const F32: ElementType = ElementType::F32;

/// Query-block sizes of [`causal_attention_with`]: `global` for causal attention over the whole
/// prefix, `banded` for a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionBlocks {
    /// Query (and key) block of global layers.
    pub global: usize,
    /// Query block of sliding-window layers (the key span is this plus ⌈W/block⌉ blocks).
    pub banded: usize,
}

impl AttentionBlocks {
    /// The sizes [`causal_attention`] uses for sequence length `t` and `window`, chosen by
    /// `cargo bench -p model --bench attention` on XLA CPU: global blocks of max(256, T/8) rows
    /// (256 runs fastest; T/8 keeps the unroll, and so the compile time, at ≤ 8 blocks), window
    /// blocks of W/4 clamped to 32..=256.
    pub fn for_shape(t: usize, window: Option<usize>) -> AttentionBlocks {
        AttentionBlocks {
            global: (t / 8).max(256),
            banded: window.map_or(256, |w| (w / 4).clamp(32, 256)),
        }
    }
}

/// Causal attention for q `[B,T,N,H]`, k/v `[B,T,G,H]` (GQA), already rotated and scaled, with
/// the block sizes of [`AttentionBlocks::for_shape`].
///
/// `window = Some(W)`: key s is visible to query t iff t − W ≤ s ≤ t (W+1 keys), computed over
/// the band's blocks only. `window = None`: full causal attention over the blocks on or below
/// the diagonal. Returns `[B,T,N,H]`.
pub fn causal_attention(b: &Builder, q: Op, k: Op, v: Op, window: Option<usize>) -> Result<Op> {
    let t = dims(b, q)?[1] as usize;
    causal_attention_with(b, q, k, v, window, AttentionBlocks::for_shape(t, window))
}

/// [`causal_attention`] with explicit block sizes (benches try several).
pub fn causal_attention_with(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    window: Option<usize>,
    blocks: AttentionBlocks,
) -> Result<Op> {
    let (qd, kd) = (dims(b, q)?, dims(b, k)?);
    if qd.len() != 4
        || kd.len() != 4
        || kd != dims(b, v)?
        || qd[..2] != kd[..2]
        || qd[3] != kd[3]
        || kd[2] == 0
        || qd[2] % kd[2] != 0
    {
        return Err(b.error(
            "causal_attention",
            format!(
                "q {:?} must be [B,T,N,H] and k, v {:?} [B,T,G,H] with G dividing N",
                qd, kd
            ),
        ));
    }
    if blocks.global == 0 || blocks.banded == 0 {
        return Err(b.error(
            "causal_attention",
            format!("block sizes must be positive, got {blocks:?}"),
        ));
    }
    let (bs, t, n, h) = (qd[0], qd[1], qd[2], qd[3]);
    let g = kd[2];
    let r = n / g;
    // Group-major layouts: q [B,G,T,R,H], k/v [B,G,T,H].
    let qt = b.transpose(b.reshape(q, &[bs, t, g, r, h])?, &[0, 2, 1, 3, 4])?;
    let kt = b.transpose(k, &[0, 2, 1, 3])?;
    let vt = b.transpose(v, &[0, 2, 1, 3])?;
    let o = match window {
        Some(w) if (w as i64) + 1 < t => {
            banded(b, qt, kt, vt, w as i64, blocks.banded as i64, None)?
        }
        _ => global(b, qt, kt, vt, blocks.global as i64)?,
    };
    // o [B,G,T,R,H] -> [B,T,N,H]
    b.reshape(b.transpose(o, &[0, 2, 1, 3, 4])?, &[bs, t, n, h])
}

/// [`causal_attention`] on q `[B,T,N,H]`, k/v `[B,T,G,H]` laid out by `qkv`, a sharding of the
/// `[B,T,heads,H]` arrays that cuts T into S sequence shards (and possibly the batch and the
/// heads, q's N and k/v's G into the same pieces): exact sequence parallelism in a manually
/// partitioned region ([`pallas_port::seq`]). Shard `i` holds queries `i·T/S ..`:
///
/// * **global** (`window = None`, or W + 1 ≥ T): keys and values are gathered over the shards
///   (`all-gather`) and attended load-balanced ([`SeqGlobal::Zigzag`], see
///   [`causal_attention_seq_with`]);
/// * **sliding window**: the W keys/values before the shard arrive as a halo
///   (`collective-permute`, from several shards when W > T/S); the banded blocks of
///   [`causal_attention`] run over `[halo; own]`, keys before the sequence start masked.
///
/// Returns `[B,T,N,H]` laid out by `qkv`. Gradients flow back through the collectives'
/// transposes (reduce-scatter, the reversed permutes).
pub fn causal_attention_seq(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    window: Option<usize>,
    qkv: &Sharding,
) -> Result<Op> {
    causal_attention_seq_with(b, q, k, v, window, qkv, SeqGlobal::default())
}

/// [`causal_attention_seq`] with the global layers' scheme chosen (`mesh.seq_global`):
///
/// * [`SeqGlobal::Dense`]: shard `i`'s T/S queries attend to all T gathered keys with the
///   causal mask at their global positions (T/S × T scores per shard, the upper half masked);
/// * [`SeqGlobal::Zigzag`] (load-balanced): T in 2S chunks of c = T/(2S) tokens (shard `i`
///   holds chunks 2i, 2i+1). Two `collective-permute`s bring shard `i` the queries of chunks
///   `i` and 2S−1−i; against the gathered keys, chunk j needs j whole key blocks and its
///   diagonal one, so each shard computes the same 2S−1 whole c × c blocks (which query chunk
///   each serves is picked from the shard index) plus 2 masked diagonal ones: (2S+1)·c²
///   scores instead of 4S·c². One softmax over each chunk's blocks (shared row max and sum,
///   `merged_blocks`), then two permutes take the outputs back to the contiguous layout.
///   T/S must be even (an error names T and S otherwise);
/// * [`SeqGlobal::Auto`]: zigzag or dense by [`SeqGlobal::pick`] (dense for odd T/S and for
///   chunks shorter than the head dim).
///
/// Sliding-window layers (W + 1 < T) are the same in both.
pub fn causal_attention_seq_with(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    window: Option<usize>,
    qkv: &Sharding,
    scheme: SeqGlobal,
) -> Result<Op> {
    causal_attention_seq_lowered(b, q, k, v, window, qkv, scheme, AttentionLowering::Hlo)
}

/// [`causal_attention_seq_with`] with the attention lowering chosen (`lowering` concrete, see
/// [`AttentionLowering::for_platform`]). [`AttentionLowering::Kernel`] runs each shard's
/// attention as one call of the CPU kernel at runtime positions
/// ([`pallas_port::attention::attention_kernel_at`], queries at the shard's offset):
///
/// * sliding window: against `[halo; own]` keys (the first at offset − halo length; the halo
///   before the sequence start masked by position);
/// * global with [`SeqGlobal::Dense`] or [`SeqGlobal::Auto`] (which picks dense with the
///   kernel, [`SeqGlobal::pick_for`]): against all gathered keys, the kernel skipping the key
///   blocks after the shard (no shard computes masked blocks; the work summed over the shards
///   is the 1-device kernel's); an explicit [`SeqGlobal::Zigzag`] stays HLO.
///
/// [`AttentionLowering::Hlo`] (and `Auto`) is [`causal_attention_seq_with`].
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_seq_lowered(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    window: Option<usize>,
    qkv: &Sharding,
    scheme: SeqGlobal,
    lowering: AttentionLowering,
) -> Result<Op> {
    let kernel = lowering == AttentionLowering::Kernel;
    let (qd, kd) = (dims(b, q)?, dims(b, k)?);
    if qd.len() != 4 || kd.len() != 4 || kd[2] == 0 || qd[2] % kd[2] != 0 {
        return Err(b.error(
            "causal_attention_seq",
            format!("q {qd:?} must be [B,T,N,H] and k, v {kd:?} [B,T,G,H] with G dividing N"),
        ));
    }
    let t = qd[1];
    let seq = SeqShards::new(b, qkv, 4, 1)?;
    let s = seq.shards() as i64;
    let Some(picked) = scheme.pick_for((t / s.max(1)) as usize, qd[3] as usize, kernel) else {
        return Err(b.error(
            "causal_attention_seq",
            format!(
                "the zigzag scheme needs an even shard length: T = {t} over {s} sequence \
                 shards gives {} tokens (q {qd:?})",
                t / s
            ),
        ));
    };
    let (ql, kl, vl) = (
        b.full_to_shard(q, qkv.clone())?,
        b.full_to_shard(k, qkv.clone())?,
        b.full_to_shard(v, qkv.clone())?,
    );
    let o = {
        let _m = b.manual_scope();
        let (qd, kd) = (dims(b, ql)?, dims(b, kl)?);
        let (bs, tl, n, h, g) = (qd[0], qd[1], qd[2], qd[3], kd[2]);
        let r = n / g;
        let offset = b.mul(seq.index(b)?, b.scalar(tl as i32)?)?;
        let qt = b.transpose(b.reshape(ql, &[bs, tl, g, r, h])?, &[0, 2, 1, 3, 4])?;
        let gm = |x: Op| b.transpose(x, &[0, 2, 1, 3]);
        // The HLO arms' group-major o [B,G,T,R,H] back to [B,T,N,H].
        let back = |o: Op| b.reshape(b.transpose(o, &[0, 2, 1, 3, 4])?, &[bs, tl, n, h]);
        match window {
            Some(w) if kernel && (w as i64) + 1 < t => {
                let hl = (w as i64).min((s - 1) * tl);
                let (k, v) = if hl > 0 {
                    let with_halo = |x: Op| b.concatenate(&[seq.halo(b, x, 1, hl as usize)?, x], 1);
                    (with_halo(kl)?, with_halo(vl)?)
                } else {
                    (kl, vl)
                };
                let pos = positions(b, offset, b.sub(offset, b.scalar(hl as i32)?)?)?;
                attention_kernel_at(b, ql, k, v, Some(w), pos)?
            }
            _ if kernel && picked == SeqGlobal::Dense => {
                let (kg, vg) = (seq.all_gather(b, kl, 1)?, seq.all_gather(b, vl, 1)?);
                let pos = positions(b, offset, b.scalar(0i32)?)?;
                attention_kernel_at(b, ql, kg, vg, None, pos)?
            }
            Some(w) if (w as i64) + 1 < t => {
                let w = w as i64;
                let hl = w.min((s - 1) * tl);
                let halo = if hl > 0 {
                    Some(Halo {
                        k: gm(seq.halo(b, kl, 1, hl as usize)?)?,
                        v: gm(seq.halo(b, vl, 1, hl as usize)?)?,
                        offset,
                    })
                } else {
                    None
                };
                let blk = AttentionBlocks::for_shape(tl as usize, Some(w as usize)).banded;
                back(banded(b, qt, gm(kl)?, gm(vl)?, w, blk as i64, halo)?)?
            }
            _ if picked == SeqGlobal::Zigzag => back(zigzag(b, &seq, qt, gm(kl)?, gm(vl)?)?)?,
            _ => {
                let kg = gm(seq.all_gather(b, kl, 1)?)?;
                let vg = gm(seq.all_gather(b, vl, 1)?)?;
                // Row a is query offset + a; key s is visible iff s − a ≤ offset.
                let md = [tl, t];
                let rel = b.sub(
                    b.iota(ElementType::S32, &md, 1)?,
                    b.iota(ElementType::S32, &md, 0)?,
                )?;
                let vis = b.compare(rel, b.broadcast_in_dim(offset, &md, &[])?, Cmp::Le)?;
                back(block(b, qt, kg, vg, 2, Some((vis, vec![2, 4])))?)?
            }
        }
    };
    b.shard_to_full(o, qkv.clone(), &qd)
}

/// The `s32[2]` positions operand of [`attention_kernel_at`]: the global positions of the first
/// query and the first key (both `s32[]`).
fn positions(b: &Builder, q0: Op, k0: Op) -> Result<Op> {
    b.concatenate(&[b.reshape(q0, &[1])?, b.reshape(k0, &[1])?], 0)
}

/// A RAttention local layer's SWA and RLA under sequence parallelism in **one** manual region,
/// so the keys and values before each shard travel once: `swa_qk` = (q, k) of SWA (rotated,
/// q scaled), `qkv` = the projected q, k, v RLA reads (v is SWA's too), all `[B,T,heads,H]`
/// laid out by `sharding` (T cut into S shards; see [`causal_attention_seq`] and
/// [`pallas_port::rla_in_region`]). The halo of the W tokens before a shard — SWA's rotated
/// keys, RLA's keys and the values they share — is packed along H and exchanged by one
/// `collective-permute` per shard it spans (one send of v instead of two, one collective
/// instead of four); SWA's banded blocks and RLA's shifted blocks then read their parts of it.
/// Requires W + 1 < T (else SWA is global: use the two separate regions).
///
/// Returns SWA's output `[B,T,N,H]` and RLA's outputs (full values), the separate regions'
/// bit for bit; in the backward pass the two cotangents of v's halo are added before they
/// travel back (the separate regions add them after), so dv may differ in the last bit.
pub fn local_attention_seq(
    b: &Builder,
    swa_qk: (Op, Op),
    qkv: (Op, Op, Op),
    rla: &pallas_port::RlaConfig,
    lowering: pallas_port::Lowering,
    sharding: &Sharding,
) -> Result<(Op, pallas_port::RlaOutputs)> {
    local_attention_seq_lowered(
        b,
        swa_qk,
        qkv,
        rla,
        (lowering, AttentionLowering::Hlo),
        sharding,
    )
}

/// [`local_attention_seq`] with SWA's lowering chosen too (`lowerings` = (RLA's, attention's),
/// both concrete): with [`AttentionLowering::Kernel`] SWA is one call of the CPU attention
/// kernel at runtime positions ([`attention_kernel_at`]) over `[halo; own]` keys (the first at
/// the shard's offset − halo length; the halo before the sequence start masked by position)
/// instead of the HLO banded blocks. RLA and the halo exchange are the same.
pub fn local_attention_seq_lowered(
    b: &Builder,
    (sq, sk): (Op, Op),
    (q, k, v): (Op, Op, Op),
    rla: &pallas_port::RlaConfig,
    (lowering, attention): (pallas_port::Lowering, AttentionLowering),
    sharding: &Sharding,
) -> Result<(Op, pallas_port::RlaOutputs)> {
    let d = pallas_port::graph::check_shapes(b, q, k, v, rla)?;
    let (qd, skd) = (dims(b, sq)?, dims(b, sk)?);
    let kd = dims(b, k)?;
    let (t, w) = (d.seq as i64, rla.window as i64);
    if qd != dims(b, q)? || skd != kd || w + 1 >= t {
        return Err(b.error(
            "local_attention_seq",
            format!(
                "SWA's q {qd:?}, k {skd:?} must match RLA's q, k {kd:?}, and W + 1 = {} must be \
                 below T = {t}",
                w + 1
            ),
        ));
    }
    let seq = SeqShards::new(b, sharding, 4, 1)?;
    let s = seq.shards();
    let enter = |x: Op| b.full_to_shard(x, sharding.clone());
    let (sql, skl) = (enter(sq)?, enter(sk)?);
    let (ql, kl, vl) = (enter(q)?, enter(k)?, enter(v)?);
    let (swa, local) = {
        let _m = b.manual_scope();
        let ld = dims(b, ql)?;
        let (bs, tl, n, h) = (ld[0], ld[1], ld[2], ld[3]);
        let g = dims(b, kl)?[2];
        let hl = pallas_port::rla_halo_len(rla, d.seq, s, tl as usize) as i64;
        debug_assert_eq!(hl, w.min((s as i64 - 1) * tl));
        // The halo of [SWA's k | RLA's k | v] in one exchange (the parts keep their types when
        // they differ: then one exchange per type).
        let halo = if hl > 0 {
            let parts = [skl, kl, vl];
            let tys: Vec<_> = parts
                .iter()
                .map(|&x| Ok(b.shape(x)?.ty()))
                .collect::<Result<_>>()?;
            let got: Vec<Op> = if tys.iter().all(|t| *t == tys[0]) {
                let packed = seq.halo(b, b.concatenate(&parts, 3)?, 1, hl as usize)?;
                split_even(b, packed, 3, 3)?
            } else {
                parts
                    .iter()
                    .map(|&x| seq.halo(b, x, 1, hl as usize))
                    .collect::<Result<_>>()?
            };
            Some((got[0], got[1], got[2]))
        } else {
            None
        };
        let gm = |x: Op| b.transpose(x, &[0, 2, 1, 3]);
        let offset = b.mul(seq.index(b)?, b.scalar(tl as i32)?)?;
        let r = n / g;
        let swa = if attention == AttentionLowering::Kernel {
            let (k, v) = match halo {
                Some((hk, _, hv)) => (b.concatenate(&[hk, skl], 1)?, b.concatenate(&[hv, vl], 1)?),
                None => (skl, vl),
            };
            let pos = positions(b, offset, b.sub(offset, b.scalar(hl as i32)?)?)?;
            attention_kernel_at(b, sql, k, v, Some(w as usize), pos)?
        } else {
            let qt = b.transpose(b.reshape(sql, &[bs, tl, g, r, h])?, &[0, 2, 1, 3, 4])?;
            let swa_halo = match halo {
                Some((hk, _, hv)) => Some(Halo {
                    k: gm(hk)?,
                    v: gm(hv)?,
                    offset,
                }),
                None => None,
            };
            let blk = AttentionBlocks::for_shape(tl as usize, Some(w as usize)).banded;
            let o = banded(b, qt, gm(skl)?, gm(vl)?, w, blk as i64, swa_halo)?;
            b.reshape(b.transpose(o, &[0, 2, 1, 3, 4])?, &[bs, tl, n, h])?
        };
        let local = pallas_port::rla_seq_shard(
            b,
            &seq,
            (ql, kl, vl),
            d.seq,
            rla,
            lowering,
            halo.map(|(_, hk, hv)| (hk, hv)),
        )?;
        (swa, local)
    };
    Ok((
        b.shard_to_full(swa, sharding.clone(), &qd)?,
        pallas_port::rla_region_outputs(b, local, sharding, &d)?,
    ))
}

/// `x` split into `n` equal parts along `dim`, whose VJP concatenates the parts' cotangents
/// (zeros for a part without one) in one copy, where the slices' own VJPs would pad each to
/// `x`'s shape and add them (the packed halo's backward held three such pads per layer).
fn split_even(b: &Builder, x: Op, dim: usize, n: usize) -> Result<Vec<Op>> {
    let xd = dims(b, x)?;
    let part = xd[dim] / n as i64;
    if part * n as i64 != xd[dim] {
        return Err(b.error(
            "split_even",
            format!("dim {dim} of {xd:?} does not split into {n} equal parts"),
        ));
    }
    let parts = (0..n as i64)
        .map(|i| b.slice_in_dim(x, i * part, (i + 1) * part, dim))
        .collect::<Result<Vec<_>>>()?;
    let tuple = b.tuple(&parts)?;
    let ty = b.shape(x)?.ty().unwrap_or(ElementType::F32);
    let mut pd = xd.clone();
    pd[dim] = part;
    let rule = move |b: &Builder, _ins: &[Op], _out: Op, ct: &[Option<Op>]| {
        if ct.iter().all(Option::is_none) {
            return Ok(vec![None]);
        }
        let cts = ct
            .iter()
            .map(|c| c.map_or_else(|| b.zeros(ty, &pd), Ok))
            .collect::<Result<Vec<_>>>()?;
        Ok(vec![Some(b.concatenate(&cts, dim as i64)?)])
    };
    b.custom_vjp(&[x], tuple, Arc::new(rule))?;
    (0..n).map(|i| b.get_tuple_element(tuple, i)).collect()
}

/// Global causal attention on group-major q `[B,G,T,R,H]`, k/v `[B,G,T,H]`: query block i sees
/// the key prefix up to the end of its own rows. Returns `[B,G,T,R,H]`.
fn global(b: &Builder, q: Op, k: Op, v: Op, blk: i64) -> Result<Op> {
    let t = dims(b, q)?[2];
    let mut outs = Vec::new();
    let mut start = 0;
    while start < t {
        let end = (start + blk).min(t);
        let qi = b.slice_in_dim(q, start, end, 2)?;
        let (ki, vi) = if end == t {
            (k, v)
        } else {
            (b.slice_in_dim(k, 0, end, 2)?, b.slice_in_dim(v, 0, end, 2)?)
        };
        // Row a is query start + a; key s is visible iff s ≤ start + a. Rows before the last
        // block of keys see all of them, so only blocks that reach the diagonal need a mask.
        let md = [end - start, end];
        let rel = b.sub(
            b.iota(ElementType::S32, &md, 1)?,
            b.iota(ElementType::S32, &md, 0)?,
        )?; // s − a
        let vis = b.compare(rel, b.scalar(start as i32)?, Cmp::Le)?;
        outs.push(block(b, qi, ki, vi, 2, Some((vis, vec![2, 4])))?);
        start = end;
    }
    concat_or_one(b, &outs, 2)
}

/// Load-balanced global attention of one sequence shard, inside the manual region: group-major
/// q `[B,G,2c,R,H]`, k/v `[B,G,2c,H]` of the shard's chunks 2i, 2i+1 (c tokens each) of the
/// 2S chunks of the sequence. Returns o `[B,G,2c,R,H]` for the same queries. See
/// [`causal_attention_seq_with`] ([`SeqGlobal::Zigzag`]).
///
/// Shard i attends for the near chunk i (i whole key blocks) and the far chunk 2S−1−i
/// (2S−1−i whole blocks). Whole-block slot m < 2S−1−i serves the far chunk with key chunk m,
/// slot m ≥ 2S−1−i the near one with key chunk 2S−2−m: the gathered chunks 0..2S−1 or their
/// reverse, picked per slot — no run-time offsets. Each chunk's own (diagonal) keys and values
/// travel with its queries.
fn zigzag(b: &Builder, seq: &SeqShards, q: Op, k: Op, v: Op) -> Result<Op> {
    const S32: ElementType = ElementType::S32;
    let qd = dims(b, q)?;
    let (bs, g, tl, r, h) = (qd[0], qd[1], qd[2], qd[3], qd[4]);
    let s = seq.shards() as i64;
    let c = tl / 2;
    let nf = 2 * s - 1; // whole key blocks per shard
    let nm = nf + 2; // and the two diagonal ones
                     // Chunk j is worked on by shard j (j < S) or 2S−1−j: the even chunk 2p and the odd chunk
                     // 2p+1 of shard p each travel in a permute of their own, [q | k | v] packed along the
                     // last dim ([B,G,c,(R+2)·H]).
    let worker = |j: i64| (if j < s { j } else { 2 * s - 1 - j }) as usize;
    let even: Vec<usize> = (0..s).map(|p| worker(2 * p)).collect();
    let odd: Vec<usize> = (0..s).map(|p| worker(2 * p + 1)).collect();
    let inverse = |to: &[usize]| {
        let mut inv = vec![0; to.len()];
        for (j, &t) in to.iter().enumerate() {
            inv[t] = j;
        }
        inv
    };
    let pack = |from: i64, to: &[usize]| -> Result<Op> {
        let part = |x: Op| b.slice_in_dim(x, from, from + c, 2);
        let qp = b.reshape(part(q)?, &[bs, g, c, r * h])?;
        seq.permute(b, b.concatenate(&[qp, part(k)?, part(v)?], 3)?, to)
    };
    let (pe, po) = (pack(0, &even)?, pack(c, &odd)?);
    let queries = |p: Op| b.reshape(b.slice_in_dim(p, 0, r * h, 3)?, &[bs, g, c, r, h]);
    let own_kv = |p: Op| {
        b.reshape(
            b.slice_in_dim(p, r * h, (r + 2) * h, 3)?,
            &[bs, g, 1, c, 2 * h],
        )
    };
    let (qe, qo) = (queries(pe)?, queries(po)?);
    // Shard i now holds chunks je (even) and jo (odd): the far chunk is the even one for odd i.
    // Keys and values of every chunk, [k | v] in one all-gather: [B,G,2S,c,2H].
    let i = seq.index(b)?;
    let i_odd = b.compare(b.rem(i, b.scalar(2i32)?)?, b.scalar(1i32)?, Cmp::Eq)?;
    let kv = seq.all_gather(b, b.concatenate(&[k, v], 3)?, 2)?;
    let kv = b.reshape(kv, &[bs, g, 2 * s, c, 2 * h])?;
    let first = b.slice_in_dim(kv, 0, nf, 2)?;
    let far_slots = b.sub(b.scalar(nf as i32)?, i)?; // 2S − 1 − i
    let slot = b.iota(S32, &[nf], 0)?;
    let far = b.compare(slot, b.broadcast_in_dim(far_slots, &[nf], &[])?, Cmp::Lt)?;
    let kvd = dims(b, first)?;
    let whole = b.select(bcast(b, far, &kvd, &[2])?, first, b.reverse(first, &[2])?)?;
    let kvb = b.concatenate(&[whole, own_kv(pe)?, own_kv(po)?], 2)?; // [B,G,M,c,2H]
    let (kb, vb) = (
        b.slice_in_dim(kvb, 0, h, 4)?,
        b.slice_in_dim(kvb, h, 2 * h, 4)?,
    );
    // Slot m serves the even chunk iff (it serves the far chunk) == (i is odd); the two
    // diagonal slots serve the even and the odd chunk.
    let whole_e = b.not(b.xor(far, b.broadcast_in_dim(i_odd, &[nf], &[])?)?)?;
    let diag_e = b.compare(b.iota(S32, &[2], 0)?, b.scalar(0i32)?, Cmp::Eq)?;
    let of_e = b.concatenate(&[whole_e, diag_e], 0)?;
    // Each slot's queries: its chunk's.
    let qwd = [bs, g, nf, c, r, h];
    let spread = |x: Op| bcast(b, x, &qwd, &[0, 1, 3, 4, 5]);
    let qwhole = b.select(bcast(b, whole_e, &qwd, &[2])?, spread(qe)?, spread(qo)?)?;
    let one = |x: Op| b.reshape(x, &[bs, g, 1, c, r, h]);
    let qb = b.concatenate(&[qwhole, one(qe)?, one(qo)?], 2)?;
    // Row a sees key j of every whole block, and j ≤ a in the two diagonal ones.
    let md = [nm, c, c];
    let (mi, a, j) = (
        b.iota(S32, &md, 0)?,
        b.iota(S32, &md, 1)?,
        b.iota(S32, &md, 2)?,
    );
    let vis = b.or(
        b.compare(mi, b.scalar(nf as i32)?, Cmp::Lt)?,
        b.compare(j, a, Cmp::Le)?,
    )?;
    let o = merged_blocks(b, qb, kb, vb, vis, of_e)?;
    // Back to the shards that hold the chunks.
    let back = |x: i64, to: &[usize]| -> Result<Op> {
        let ox = b.reshape(b.slice_in_dim(o, x, x + 1, 2)?, &[bs, g, c, r, h])?;
        seq.permute(b, ox, &inverse(to))
    };
    b.concatenate(&[back(0, &even)?, back(1, &odd)?], 2)
}

/// Per block m of `first` (pred `[M]`), the value of its group: `x0` where `first[m]`, else
/// `x1` (both `[B,G,…]`), as `[B,G,M,…]`.
fn per_block(b: &Builder, first: Op, x0: Op, x1: Op) -> Result<Op> {
    let d = dims(b, x0)?;
    let nm = dims(b, first)?[0];
    let mut out = vec![d[0], d[1], nm];
    out.extend_from_slice(&d[2..]);
    let map: Vec<i64> = [0, 1].into_iter().chain(3..out.len() as i64).collect();
    b.select(
        bcast(b, first, &out, &[2])?,
        bcast(b, x0, &out, &map)?,
        bcast(b, x1, &out, &map)?,
    )
}

/// Softmax attention over M key blocks of c keys, each serving one of two query chunks, with
/// one softmax per chunk over all of its blocks (shared row max and sum): q `[B,G,M,c,R,H]`
/// (block m's copy of its chunk's queries), k/v `[B,G,M,c,H]`, `vis` pred `[M,c,c]` (row a of
/// block m sees its key j), `first` pred `[M]` (block m serves chunk 0, else chunk 1; every
/// row sees at least one key of its chunk). Returns o `[B,G,2,c,R,H]`, with its VJP registered:
/// [`block`]'s, with the chunk's sum and output in place of the block's.
fn merged_blocks(b: &Builder, q: Op, k: Op, v: Op, vis: Op, first: Op) -> Result<Op> {
    // scores [B,G,M,c,R,c]
    let scores = b.dot_general(q, k, &dd(3, vec![5], vec![4]), None, Some(F32))?;
    let sd = dims(b, scores)?;
    let scores = b.select(
        bcast(b, vis, &sd, &[2, 3, 5])?,
        scores,
        b.full(F32, -1e30, &sd)?,
    )?;
    let rd = sd[..5].to_vec(); // [B,G,M,c,R]
    let rowmax = b.reduce_max(scores, &[5])?;
    let neg = b.full(F32, -1e30, &rd)?;
    let in_first = bcast(b, first, &rd, &[2])?;
    let max0 = b.reduce_max(b.select(in_first, rowmax, neg)?, &[2])?;
    let max1 = b.reduce_max(b.select(in_first, neg, rowmax)?, &[2])?;
    let rows: Vec<i64> = (0..5).collect();
    let gmax = bcast(b, per_block(b, first, max0, max1)?, &sd, &rows)?;
    let e = b.exp(b.sub(scores, gmax)?)?;
    let z = b.reduce_sum(e, &[5])?; // [B,G,M,c,R]
    let u = b.dot_general(e, v, &dd(3, vec![5], vec![3]), None, Some(F32))?; // [B,G,M,c,R,H]
                                                                             // The chunks' sums over their blocks as dots with the 0/1 matrix w [B,G,2,M] (w[c, m] = 1
                                                                             // iff block m serves chunk c); its transpose spreads a chunk's value over its blocks.
    let w0 = b.convert(first, F32)?;
    let w1 = b.sub(b.scalar(1.0f32)?, w0)?;
    let nm = rd[2];
    let w = b.concatenate(&[b.reshape(w0, &[1, nm])?, b.reshape(w1, &[1, nm])?], 0)?;
    let w = bcast(b, w, &[rd[0], rd[1], 2, nm], &[2, 3])?;
    let wt = b.transpose(w, &[0, 1, 3, 2])?; // [B,G,M,2]
    let gsum = |x: Op| b.dot_general(w, x, &dd(2, vec![3], vec![2]), None, None);
    let zc = gsum(z)?; // [B,G,2,c,R]
    let uc = gsum(u)?; // [B,G,2,c,R,H]
    let od = dims(b, uc)?;
    let o = b.div(uc, bcast(b, zc, &od, &[0, 1, 2, 3, 4])?)?;
    let rule =
        move |b: &Builder, ins: &[Op], o: Op, ct: &[Option<Op>]| -> Result<Vec<Option<Op>>> {
            let Some(d_o) = ct[0] else {
                return Ok(vec![None, None, None]);
            };
            let (q, k, v) = (ins[0], ins[1], ins[2]);
            let spread = |x: Op| b.dot_general(wt, x, &dd(2, vec![3], vec![2]), None, None);
            // With P = e / Z (Z the chunk's sum): dO/Z carries the normalisation into the dots.
            let dz = b.div(d_o, bcast(b, zc, &od, &[0, 1, 2, 3, 4])?)?;
            // rowsum(dP ⊙ P) = rowsum(dO ⊙ O), per chunk, divided by Z like dP.
            let delta = b.reduce_sum(b.mul(dz, o)?, &[5])?;
            let d_oz = spread(dz)?; // [B,G,M,c,R,H]
            let delta = bcast(b, spread(delta)?, &sd, &rows)?;
            // dV = Pᵀ dO  [B,G,M,c,H]
            let dv = b.dot_general(e, d_oz, &dd(3, vec![3, 4], vec![3, 4]), None, None)?;
            // dP/Z = (dO/Z) Vᵀ  [B,G,M,c,R,c];  dS = e ⊙ (dP/Z − δ/Z)
            let dpz = b.dot_general(d_oz, v, &dd(3, vec![5], vec![4]), None, None)?;
            let ds = b.mul(e, b.sub(dpz, delta)?)?;
            // dQ = dS K  [B,G,M,c,R,H];  dK = dSᵀ Q  [B,G,M,c,H]
            let dq = b.dot_general(ds, k, &dd(3, vec![5], vec![3]), None, None)?;
            let dk = b.dot_general(ds, q, &dd(3, vec![3, 4], vec![3, 4]), None, None)?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        };
    b.custom_vjp(&[q, k, v], o, Arc::new(rule))?;
    Ok(o)
}

/// The keys and values before a sequence shard (group-major k/v `[B,G,L,H]`, L ≤ W) and the
/// global position of the shard's first token (`s32[]`): keys at negative global positions
/// (zeros from the halo exchange) are masked.
struct Halo {
    k: Op,
    v: Op,
    offset: Op,
}

/// Sliding-window attention on group-major q `[B,G,T,R,H]`, k/v `[B,G,T,H]` with window `w`, in
/// blocks of `blk` queries that each see a key span of `blk + back` (back = ⌈w/blk⌉·blk).
/// With a `halo` the span before the first block holds the halo's keys instead of zeros.
/// Returns `[B,G,T,R,H]`.
fn banded(b: &Builder, q: Op, k: Op, v: Op, w: i64, blk: i64, halo: Option<Halo>) -> Result<Op> {
    let qd = dims(b, q)?;
    let (bs, g, t, r, h) = (qd[0], qd[1], qd[2], qd[3], qd[4]);
    let blk = blk.min(t);
    let back = (w + blk - 1) / blk * blk;
    let nb = (t + blk - 1) / blk;
    let tp = nb * blk;
    let zero = b.scalar(0.0f32)?;
    let qp = b.pad(
        q,
        zero,
        &[(0, 0, 0), (0, 0, 0), (0, tp - t, 0), (0, 0, 0), (0, 0, 0)],
    )?;
    let qb = b.reshape(qp, &[bs, g, nb, blk, r, h])?;
    // Key span of block i: padded key blocks i .. i + back/blk (absolute start i·blk − back).
    let span_of = |x: Op, front: Option<Op>| -> Result<Op> {
        let xp = match front {
            None => b.pad(
                x,
                zero,
                &[(0, 0, 0), (0, 0, 0), (back, tp - t, 0), (0, 0, 0)],
            )?,
            Some(f) => {
                let fl = dims(b, f)?[2];
                let f = b.pad(
                    f,
                    zero,
                    &[(0, 0, 0), (0, 0, 0), (back - fl, 0, 0), (0, 0, 0)],
                )?;
                let x = b.pad(x, zero, &[(0, 0, 0), (0, 0, 0), (0, tp - t, 0), (0, 0, 0)])?;
                b.concatenate(&[f, x], 2)?
            }
        };
        let xp = b.reshape(xp, &[bs, g, nb + back / blk, blk, h])?;
        key_spans(b, xp, nb, back / blk, 2)
    };
    let (ks, vs) = (
        span_of(k, halo.as_ref().map(|h| h.k))?,
        span_of(v, halo.as_ref().map(|h| h.v))?,
    );
    let s = blk + back;
    let md = [nb, blk, s];
    let Band { rel, abs_s } = Band::new(b, md, back)?;
    let vis = b.and(
        b.compare(rel, b.scalar(0i32)?, Cmp::Ge)?,
        b.compare(rel, b.scalar(w as i32)?, Cmp::Le)?,
    )?;
    // Keys before the sequence start: local position < 0, or < −offset in a sequence shard.
    let abs_s = match &halo {
        Some(hl) => b.add(abs_s, b.broadcast_in_dim(hl.offset, &md, &[])?)?,
        None => abs_s,
    };
    let vis = b.and(vis, b.compare(abs_s, b.scalar(0i32)?, Cmp::Ge)?)?;
    let o = block(b, qb, ks, vs, 3, Some((vis, vec![2, 3, 5])))?;
    let o = b.reshape(o, &[bs, g, tp, r, h])?;
    unpad(b, o, tp, t, 2)
}

/// The first `t` of the `tp` (padded) positions of `x` along `axis`.
fn unpad(b: &Builder, x: Op, tp: i64, t: i64, axis: usize) -> Result<Op> {
    if tp == t {
        Ok(x)
    } else {
        b.slice_in_dim(x, 0, t, axis)
    }
}

/// `parts` concatenated along `axis`; the part itself when there is one.
fn concat_or_one(b: &Builder, parts: &[Op], axis: i64) -> Result<Op> {
    if parts.len() == 1 {
        Ok(parts[0])
    } else {
        b.concatenate(parts, axis)
    }
}

/// The key spans of `nb` query blocks from `xp`, keys padded in front by `back_blocks` blocks
/// and cut into blocks along `axis`: block i gets the padded key blocks i ..= i + `back_blocks`
/// (absolute start i·blk − back), concatenated along `axis + 1`.
fn key_spans(b: &Builder, xp: Op, nb: i64, back_blocks: i64, axis: usize) -> Result<Op> {
    let parts: Vec<Op> = (0..=back_blocks)
        .map(|j| b.slice_in_dim(xp, j, j + nb, axis))
        .collect::<Result<_>>()?;
    concat_or_one(b, &parts, axis as i64 + 1)
}

/// Positions in a banded score block `md = [nb, blk, S]` (query block i, row a, span column j;
/// the span starts `back` keys before its block), from iotas: query t = i·blk + a, key
/// s = i·blk − back + j.
struct Band {
    /// t − s.
    rel: Op,
    /// s, the key's position in the (local) sequence; negative before its start.
    abs_s: Op,
}

impl Band {
    fn new(b: &Builder, md: [i64; 3], back: i64) -> Result<Band> {
        let (i, a, j) = (
            b.iota(ElementType::S32, &md, 0)?,
            b.iota(ElementType::S32, &md, 1)?,
            b.iota(ElementType::S32, &md, 2)?,
        );
        let rel = b.add(b.sub(a, j)?, b.scalar(back as i32)?)?;
        let abs_s = b.add(
            b.mul(i, b.scalar(md[1] as i32)?)?,
            b.sub(j, b.scalar(back as i32)?)?,
        )?;
        Ok(Band { rel, abs_s })
    }
}

/// Dot dims with `nb` leading batch dims on both sides.
fn dd(nb: i64, lc: Vec<i64>, rc: Vec<i64>) -> DotDims {
    DotDims {
        lhs_batch: (0..nb).collect(),
        rhs_batch: (0..nb).collect(),
        lhs_contracting: lc,
        rhs_contracting: rc,
    }
}

/// One block of softmax attention with `nb` leading batch dims: q `[..., M, R, H]`, k/v
/// `[..., S, H]`, `vis` a pred mask with the dims map into the scores `[..., M, R, S]` (`None`:
/// all visible). Returns o `[..., M, R, H]`, with the block's VJP registered.
fn block(b: &Builder, q: Op, k: Op, v: Op, nb: i64, vis: Option<(Op, Vec<i64>)>) -> Result<Op> {
    // scores [..., M, R, S]
    let scores = b.dot_general(q, k, &dd(nb, vec![nb + 2], vec![nb + 1]), None, Some(F32))?;
    let sd = dims(b, scores)?;
    let scores = match vis {
        Some((m, map)) => {
            let m = bcast(b, m, &sd, &map)?;
            b.select(m, scores, b.full(F32, -1e30, &sd)?)?
        }
        None => scores,
    };
    // Softmax with the normalisation moved past the second dot: e = exp(s − max), z = Σ e,
    // o = (e V) / z, so the [..., M, R, S] probabilities are never written out.
    let last = sd.len() as i64 - 1;
    let rows: Vec<i64> = (0..last).collect();
    let m = bcast(b, b.reduce_max(scores, &[last])?, &sd, &rows)?;
    let e = b.exp(b.sub(scores, m)?)?;
    let z = b.reduce_sum(e, &[last])?; // [..., M, R]
    let ev = b.dot_general(e, v, &dd(nb, vec![nb + 2], vec![nb]), None, Some(F32))?;
    let od = dims(b, ev)?;
    let o = b.div(ev, bcast(b, z, &od, &rows)?)?;
    let rule =
        move |b: &Builder, ins: &[Op], o: Op, ct: &[Option<Op>]| -> Result<Vec<Option<Op>>> {
            let Some(d_o) = ct[0] else {
                return Ok(vec![None, None, None]);
            };
            let (q, k, v) = (ins[0], ins[1], ins[2]);
            let dot = |x: Op, y: Op, lc: Vec<i64>, rc: Vec<i64>| {
                b.dot_general(x, y, &dd(nb, lc, rc), None, None)
            };
            // With P = e / z: dO/z [..., M, R, H] carries the normalisation into the dots.
            let d_oz = b.div(d_o, bcast(b, z, &od, &rows)?)?;
            // dV = Pᵀ dO = eᵀ (dO/z)  [..., S, H]
            let dv = dot(e, d_oz, vec![nb, nb + 1], vec![nb, nb + 1])?;
            // dP/z = (dO/z) Vᵀ  [..., M, R, S]
            let dpz = dot(d_oz, v, vec![nb + 2], vec![nb + 1])?;
            // rowsum(dP ⊙ P) = rowsum(dO ⊙ O)  [..., M, R], divided by z like dP
            let delta = b.reduce_sum(b.mul(d_oz, o)?, &[last])?;
            // dS = P ⊙ (dP − δ) = e ⊙ (dP/z − δ/z)
            let ds = b.mul(e, b.sub(dpz, bcast(b, delta, &sd, &rows)?)?)?;
            // dQ = dS K  [..., M, R, H];  dK = dSᵀ Q  [..., S, H]
            let dq = dot(ds, k, vec![nb + 2], vec![nb])?;
            let dk = dot(ds, q, vec![nb, nb + 1], vec![nb, nb + 1])?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        };
    b.custom_vjp(&[q, k, v], o, Arc::new(rule))?;
    Ok(o)
}

/// The earlier causal attention that computes every score of its blocks: `window = None` is the
/// whole T×T matrix with the upper half masked, a window W blocks of W queries against 2W keys.
/// Same arguments and result as [`causal_attention`]; kept as the reference the blocked version
/// is tested and benchmarked against.
pub fn causal_attention_dense(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    window: Option<usize>,
) -> Result<Op> {
    let qd = dims(b, q)?;
    let kd = dims(b, k)?;
    let (bs, t, n, h) = (qd[0], qd[1], qd[2], qd[3]);
    let g = kd[2];
    let r = n / g;
    // Block size and look-back (in tokens, a multiple of the block).
    let (blk, back) = match window {
        Some(w) if (w as i64) < t => {
            let blk = (w as i64).clamp(16, 512).min(t);
            (blk, (w as i64 + blk - 1) / blk * blk)
        }
        _ => (t, 0),
    };
    let nb = (t + blk - 1) / blk;
    let tp = nb * blk;
    let zero = b.scalar(0.0f32)?;
    let pad_t = |x: Op, front: i64, back_pad: i64| {
        b.pad(
            x,
            zero,
            &[(0, 0, 0), (front, back_pad, 0), (0, 0, 0), (0, 0, 0)],
        )
    };
    let qb = b.reshape(pad_t(q, 0, tp - t)?, &[bs, nb, blk, g, r, h])?;
    // Key/value spans: block i sees padded blocks i .. i + back/blk (absolute start i·blk − back).
    let span_of = |x: Op| -> Result<Op> {
        let xp = b.reshape(pad_t(x, back, tp - t)?, &[bs, nb + back / blk, blk, g, h])?;
        key_spans(b, xp, nb, back / blk, 1)
    };
    let (ks, vs) = (span_of(k)?, span_of(v)?);
    let s = blk + back;
    // scores [B, nb, G, blk, R, S]
    let dd = DotDims {
        lhs_batch: vec![0, 1, 3],
        rhs_batch: vec![0, 1, 3],
        lhs_contracting: vec![5],
        rhs_contracting: vec![4],
    };
    let scores = b.dot_general(qb, ks, &dd, None, Some(F32))?;
    let md = [nb, blk, s];
    let Band { rel, abs_s } = Band::new(b, md, back)?;
    let mut vis = b.compare(rel, b.scalar(0i32)?, Cmp::Ge)?;
    if let Some(w) = window {
        vis = b.and(vis, b.compare(rel, b.scalar(w as i32)?, Cmp::Le)?)?;
    }
    vis = b.and(vis, b.compare(abs_s, b.scalar(0i32)?, Cmp::Ge)?)?;
    let sd = [bs, nb, g, blk, r, s];
    let vis = bcast(b, vis, &sd, &[1, 3, 5])?;
    let neg = b.full(F32, -1e30, &sd)?;
    let p = b.softmax(b.select(vis, scores, neg)?, -1)?;
    // out [B, nb, G, blk, R, H]
    let dd = DotDims {
        lhs_batch: vec![0, 1, 2],
        rhs_batch: vec![0, 1, 3],
        lhs_contracting: vec![5],
        rhs_contracting: vec![2],
    };
    let o = b.dot_general(p, vs, &dd, None, Some(F32))?;
    let o = b.transpose(o, &[0, 1, 3, 2, 4, 5])?;
    let o = b.reshape(o, &[bs, tp, n, h])?;
    unpad(b, o, tp, t, 1)
}
