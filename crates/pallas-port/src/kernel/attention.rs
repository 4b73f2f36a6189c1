//! Causal softmax attention (FlashAttention-2 style) on the CPU: q `[B,T,N,H]`, k/v `[B,T,G,H]`
//! (GQA, query head n reads kv head n / (N/G)), already rotated and scaled.
//!
//! Key s is visible to query t iff s ≤ t and, with a window W, t − W ≤ s. Work is cut into
//! blocks of bq query positions (the R = N/G query heads of a kv head stacked, so a block is
//! `[bq·R, H]`) against blocks of bk keys ([`block_sizes`]); a key block is visited only if some
//! key in it is visible to some query of the block (on or below the diagonal for global
//! attention, the band for a window).
//!
//! - forward: online softmax over the visible key blocks (running row max m and sum l, the
//!   accumulator rescaled by exp(m_old − m_new)); writes o and the row logsumexp
//!   lse = m + ln l. Parallel over (batch, kv head, query block).
//! - backward: D = rowsum(dO ⊙ O); per key block, over the query blocks that see it,
//!   P = exp(S − lse) and dS = P ⊙ (dO Vᵀ − D) recomputed, dV += Pᵀ dO, dK += dSᵀ Q (the key
//!   block's own rows) and dQ += dS K (five GEMMs per block pair). Parallel over (batch, kv
//!   head, group of interleaved key blocks); each group adds into its own dQ buffer, and the
//!   buffers are summed at the end, so no two tasks write the same memory.
//!
//! **Runtime positions** ([`attn_fwd_at`], [`attn_bwd_at`]): the queries and keys of a call may
//! sit anywhere in the whole sequence, query row t at global position q0 + t and key row s at
//! k0 + s, with Tq queries and Tk keys: key s is visible to query t iff its global position p
//! satisfies 0 ≤ p ≤ q0 + t (and q0 + t − W ≤ p with a window). A sequence shard calls it with
//! its own queries against `[halo; own]` keys (k0 = q0 − halo length; the halo before the
//! sequence start, at negative positions, is masked). Block skipping follows the positions, so
//! (q0, k0) = (0, 0) with Tq = Tk is [`attn_fwd`] itself, bit for bit. A query that sees no key
//! at all gets o = 0 and lse = −∞.
//!
//! Exponentials use the branch-free polynomial `fast_exp` (relative error ~5e-9) and the row
//! max/sum explicit SIMD reductions (`pulp`).

use rayon::prelude::*;

use super::feature::{fast_exp, max_min, scale, sum};
use super::mm::{gemm, view, view_mut};
use super::{split_scratch, with_scratch, Heads};
use crate::config::{check_len, RlaDims, RlaError};

/// The (query, key) block sizes for a window: query blocks of up to 128 positions (each stacks
/// the R query heads of a kv head: bq·R rows), key blocks of up to 256 keys; with a window W
/// both shrink towards W so a block pair is not mostly masked.
pub fn block_sizes(window: Option<usize>) -> (usize, usize) {
    match window {
        None => (128, 256),
        Some(w) => (w.clamp(32, 128), w.clamp(64, 256)),
    }
}

/// The global positions of the first query and the first key of an attention call
/// ([`attn_fwd_at`]): query row t sits at `q0 + t`, key row s at `k0 + s`; keys at negative
/// positions are masked. `Default` (0, 0) is the plain causal call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttnPositions {
    /// Global position of query row 0.
    pub q0: i64,
    /// Global position of key row 0 (negative: a halo reaching before the sequence start).
    pub k0: i64,
}

/// Geometry of one attention call (derefs to its [`Heads`], whose `t` is the query length).
#[derive(Clone, Copy)]
struct Geo {
    heads: Heads,
    w: Option<usize>,
    bq: usize,
    bk: usize,
    /// Keys (rows of k, v).
    tk: usize,
    /// q0 − k0: query row t is at key row t + dq.
    dq: i64,
    /// The first key row at a non-negative position, max(0, −k0).
    first_key: i64,
}

deref_heads!(Geo);

impl Geo {
    fn new(d: &RlaDims, window: Option<usize>) -> Geo {
        Geo::at(d, d.seq, window, AttnPositions::default())
    }

    fn at(d: &RlaDims, keys: usize, window: Option<usize>, pos: AttnPositions) -> Geo {
        Geo {
            heads: Heads::new(d),
            w: window,
            bq: block_sizes(window).0,
            bk: block_sizes(window).1,
            tk: keys,
            dq: pos.q0 - pos.k0,
            first_key: (-pos.k0).max(0),
        }
    }

    /// Offset of k/v row (b, s, kv head gi) (`[B,Tk,G,H]`).
    #[inline]
    fn key_off(&self, b: usize, s: usize, gi: usize) -> usize {
        ((b * self.tk + s) * self.g + gi) * self.h
    }

    /// Offset in `[B,T,N]` (lse, D) of query head `gi·R` at (b, t).
    fn row_off(&self, b: usize, t: usize, gi: usize) -> usize {
        (b * self.t + t) * self.n + gi * self.r
    }

    /// The first key row query row `t` sees (before clamping to the key rows).
    #[inline(always)]
    fn first_col(&self, t: usize) -> i64 {
        let first = self.w.map_or(0, |w| t as i64 + self.dq - w as i64);
        first.max(self.first_key)
    }

    /// The keys `[lo, hi)` some query in `[t0, t1)` sees (`lo == hi`: none).
    fn keys_of(&self, t0: usize, t1: usize) -> (usize, usize) {
        let tk = self.tk as i64;
        let lo = self.first_col(t0).clamp(0, tk);
        let hi = (t1 as i64 + self.dq).clamp(lo, tk);
        (lo as usize, hi as usize)
    }

    /// The queries `[lo, hi)` that see some key in `[s0, s1)` (`lo == hi`: none).
    fn queries_of(&self, s0: usize, s1: usize) -> (usize, usize) {
        let (tq, s0, s1) = (self.t as i64, (s0 as i64).max(self.first_key), s1 as i64);
        if s0 >= s1 {
            return (0, 0);
        }
        let lo = (s0 - self.dq).clamp(0, tq);
        let hi = self.w.map_or(tq, |w| s1 + w as i64 - self.dq).clamp(lo, tq);
        (lo as usize, hi as usize)
    }

    /// The visible columns `[lo, hi)` of query `t` in a key block starting at `s0` of `nk` keys.
    #[inline]
    fn cols(&self, t: usize, s0: usize, nk: usize) -> (usize, usize) {
        let (s0, nk) = (s0 as i64, nk as i64);
        let lo = (self.first_col(t) - s0).clamp(0, nk);
        let hi = (t as i64 + self.dq + 1 - s0).clamp(lo, nk);
        (lo as usize, hi as usize)
    }
}

/// The `[B,T,N]` shape of the row statistics (logsumexp).
pub fn lse_shape(d: &RlaDims) -> Vec<usize> {
    vec![d.batch, d.seq, d.heads]
}

/// Causal attention forward: `(q, k, v) -> (o, lse)`.
///
/// Shapes: `q`/`o` `[B,T,N,H]`, `k`/`v` `[B,T,G,H]`, `lse` `[B,T,N]` (the natural log of each
/// query row's softmax denominator, max included). `window = Some(W)`: key s is visible to query
/// t iff t − W ≤ s ≤ t; `None`: s ≤ t. Every output element is written.
#[allow(clippy::too_many_arguments)]
pub fn attn_fwd(
    d: &RlaDims,
    window: Option<usize>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) -> Result<(), RlaError> {
    let at = (d.seq, window, AttnPositions::default());
    checked_fwd("attn_fwd", d, at, (q, k, v), o, lse)
}

/// Checks `q` `[B,Tq,N,H]` (Tq = `d.seq`) and `k`, `v` `[B,keys,G,H]` of an `_at` call.
fn check_qkv_at(
    op: &'static str,
    d: &RlaDims,
    keys: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> Result<[usize; 4], RlaError> {
    d.check(op)?;
    if keys == 0 {
        return Err(RlaError::Dims {
            op,
            message: format!("need at least one key, got 0 for {d}"),
        });
    }
    let kv = [d.batch, keys, d.kv_heads, d.head_dim];
    check_len(op, "q", q.len(), &d.q_shape(), d)?;
    check_len(op, "k", k.len(), &kv, d)?;
    check_len(op, "v", v.len(), &kv, d)?;
    Ok(kv)
}

/// [`attn_fwd`] at runtime positions: q `[B,Tq,N,H]` (Tq = `d.seq`) against k, v
/// `[B,keys,G,H]`, query row t at global position `at.q0 + t` and key row s at `at.k0 + s`
/// (see [`AttnPositions`]): key s is visible to query t iff 0 ≤ k0 + s ≤ q0 + t and, with
/// `window = Some(W)`, q0 + t − W ≤ k0 + s. `o` `[B,Tq,N,H]`, `lse` `[B,Tq,N]` (−∞ and o = 0
/// for a query that sees no key). With `keys == d.seq` and `at` = (0, 0) this is [`attn_fwd`]
/// bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn attn_fwd_at(
    d: &RlaDims,
    keys: usize,
    window: Option<usize>,
    at: AttnPositions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) -> Result<(), RlaError> {
    checked_fwd("attn_fwd_at", d, (keys, window, at), (q, k, v), o, lse)
}

/// The forward of [`attn_fwd`] and [`attn_fwd_at`] (`(keys, window, positions)`), its errors
/// naming `op`.
fn checked_fwd(
    op: &'static str,
    d: &RlaDims,
    (keys, window, at): (usize, Option<usize>, AttnPositions),
    (q, k, v): (&[f32], &[f32], &[f32]),
    o: &mut [f32],
    lse: &mut [f32],
) -> Result<(), RlaError> {
    check_qkv_at(op, d, keys, (q, k, v))?;
    check_len(op, "o", o.len(), &d.q_shape(), d)?;
    check_len(op, "lse", lse.len(), &lse_shape(d), d)?;
    forward(&Geo::at(d, keys, window, at), d.batch, q, k, v, o, lse);
    Ok(())
}

/// [`attn_bwd`] at runtime positions (shapes and masking as in [`attn_fwd_at`]; `o`, `lse` from
/// it). `dq` `[B,Tq,N,H]`, `dk`, `dv` `[B,keys,G,H]` (zero for keys no query sees).
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd_at(
    d: &RlaDims,
    keys: usize,
    window: Option<usize>,
    at: AttnPositions,
    qkv: (&[f32], &[f32], &[f32]),
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    grads: (&mut [f32], &mut [f32], &mut [f32]),
) -> Result<(), RlaError> {
    let at = (keys, window, at);
    checked_bwd("attn_bwd_at", d, at, qkv, (o, lse, d_o), grads)
}

/// Causal attention backward: `(q, k, v, o, lse, d_o) -> (dq, dk, dv)`.
///
/// `o` and `lse` must be what [`attn_fwd`] produced for the same inputs and window. Shapes as in
/// [`attn_fwd`]; `d_o`/`dq` `[B,T,N,H]`, `dk`/`dv` `[B,T,G,H]`. Every output element is written.
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd(
    d: &RlaDims,
    window: Option<usize>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<(), RlaError> {
    let at = (d.seq, window, AttnPositions::default());
    checked_bwd("attn_bwd", d, at, (q, k, v), (o, lse, d_o), (dq, dk, dv))
}

/// The backward of [`attn_bwd`] and [`attn_bwd_at`] (`(keys, window, positions)`), its errors
/// naming `op`.
fn checked_bwd(
    op: &'static str,
    d: &RlaDims,
    (keys, window, at): (usize, Option<usize>, AttnPositions),
    (q, k, v): (&[f32], &[f32], &[f32]),
    (o, lse, d_o): (&[f32], &[f32], &[f32]),
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) -> Result<(), RlaError> {
    let kv = check_qkv_at(op, d, keys, (q, k, v))?;
    check_len(op, "o", o.len(), &d.q_shape(), d)?;
    check_len(op, "lse", lse.len(), &lse_shape(d), d)?;
    check_len(op, "d_o", d_o.len(), &d.q_shape(), d)?;
    check_len(op, "dq", dq.len(), &d.q_shape(), d)?;
    check_len(op, "dk", dk.len(), &kv, d)?;
    check_len(op, "dv", dv.len(), &kv, d)?;
    backward(
        &Geo::at(d, keys, window, at),
        d.batch,
        (q, k, v),
        (o, lse, d_o),
        (dq, dk, dv),
    );
    Ok(())
}

/// Cuts `out` (`rows` positions of `per_row` = heads·`piece` values per (b, position)) into one list of
/// `piece`-sized pieces per task (b, kv head, position / `blk`), in position order.
fn pieces<'a>(
    out: &'a mut [f32],
    geo: &Geo,
    (rows, per_row): (usize, usize),
    piece: usize,
    blk: usize,
) -> Vec<Vec<&'a mut [f32]>> {
    let nb = rows.div_ceil(blk);
    let batch = out.len() / (per_row * rows).max(1);
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..batch * geo.g * nb)
        .map(|_| Vec::with_capacity(blk))
        .collect();
    if piece == 0 {
        return tasks;
    }
    for (bt, row) in out.chunks_mut(per_row).enumerate() {
        let (b, t) = (bt / rows, bt % rows);
        for (gi, p) in row.chunks_mut(piece).enumerate() {
            tasks[(b * geo.g + gi) * nb + t / blk].push(p);
        }
    }
    tasks
}

/// Copies the rows of the R query heads of group `gi` at positions `[t0, t0 + ce)` of `x`
/// (`[B,T,N,H]`) into `dst` (`[ce·R, H]`, rows ordered (position, head)).
fn gather_rows(geo: &Geo, x: &[f32], b: usize, gi: usize, t0: usize, ce: usize, dst: &mut [f32]) {
    let rh = geo.r * geo.h;
    for tl in 0..ce {
        let off = geo.q_off(b, t0 + tl, gi * geo.r);
        dst[tl * rh..(tl + 1) * rh].copy_from_slice(&x[off..off + rh]);
    }
}

/// Copies the `[B,T,N]` row statistics of group `gi` at positions `[t0, t0 + ce)` into `dst`.
#[allow(clippy::too_many_arguments)]
fn gather_stats(geo: &Geo, x: &[f32], b: usize, gi: usize, t0: usize, ce: usize, dst: &mut [f32]) {
    let r = geo.r;
    for tl in 0..ce {
        let off = geo.row_off(b, t0 + tl, gi);
        dst[tl * r..(tl + 1) * r].copy_from_slice(&x[off..off + r]);
    }
}

/// Scores `s = qs · K[s0 .. s0+nk]ᵀ` (`[M, nk]`) of group `gi`.
#[allow(clippy::too_many_arguments)]
fn scores(
    geo: &Geo,
    qs: &[f32],
    k: &[f32],
    b: usize,
    gi: usize,
    s0: usize,
    m: usize,
    s: &mut [f32],
) {
    let nk = s.len() / m.max(1);
    let kv = view(&k[geo.key_off(b, s0, gi)..], nk, geo.h, geo.g * geo.h);
    gemm(
        1.0,
        &view(qs, m, geo.h, geo.h),
        &kv.t(),
        0.0,
        &mut view_mut(s, m, nk, nk),
    );
}

#[allow(clippy::too_many_arguments)]
fn forward(
    geo: &Geo,
    batch: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (h, r) = (geo.h, geo.r);
    let nqb = geo.t.div_ceil(geo.bq);
    let o_tasks = pieces(o, geo, (geo.t, geo.n * h), r * h, geo.bq);
    let l_tasks = pieces(lse, geo, (geo.t, geo.n), r, geo.bq);
    debug_assert_eq!(o_tasks.len(), batch * geo.g * nqb);
    o_tasks.into_par_iter().zip(l_tasks).enumerate().for_each(
        |(task, (mut o_rows, mut l_rows))| {
            let (bg, qb) = (task / nqb, task % nqb);
            let (b, gi) = (bg / geo.g, bg % geo.g);
            let t0 = qb * geo.bq;
            let ce = geo.bq.min(geo.t - t0);
            let m = ce * r;
            let lens = [m * h, m * h, m * geo.bk, m, m];
            with_scratch(lens.iter().sum(), |buf| {
                let [qs, acc, s, mx, l] = split_scratch(buf, lens);
                gather_rows(geo, q, b, gi, t0, ce, qs);
                acc.fill(0.0);
                mx.fill(f32::NEG_INFINITY);
                l.fill(0.0);
                let (klo, khi) = geo.keys_of(t0, t0 + ce);
                let mut s0 = klo;
                while s0 < khi {
                    let nk = geo.bk.min(khi - s0);
                    let s = &mut s[..m * nk];
                    scores(geo, qs, k, b, gi, s0, m, s);
                    pulp::Arch::new().dispatch(OnlineSoftmax {
                        at: BlockPair { geo, t0, s0, nk },
                        s,
                        mx,
                        l,
                        acc,
                    });
                    let vv = view(&v[geo.key_off(b, s0, gi)..], nk, h, geo.g * h);
                    gemm(
                        1.0,
                        &view(s, m, nk, nk),
                        &vv,
                        1.0,
                        &mut view_mut(acc, m, h, h),
                    );
                    s0 += nk;
                }
                for row in 0..m {
                    if l[row] == 0.0 {
                        // No visible key (only with runtime positions): o = 0, lse = −∞.
                        acc[row * h..(row + 1) * h].fill(0.0);
                        mx[row] = f32::NEG_INFINITY;
                        continue;
                    }
                    let inv = 1.0 / l[row];
                    for a in &mut acc[row * h..(row + 1) * h] {
                        *a *= inv;
                    }
                    mx[row] += l[row].ln();
                }
                for (tl, (orow, lrow)) in o_rows.iter_mut().zip(l_rows.iter_mut()).enumerate() {
                    orow.copy_from_slice(&acc[tl * r * h..(tl + 1) * r * h]);
                    lrow.copy_from_slice(&mx[tl * r..(tl + 1) * r]);
                }
            });
        },
    );
}

/// A block pair: rows of the R stacked query heads from query position `t0` against the `nk`
/// keys from `s0`.
#[derive(Clone, Copy)]
struct BlockPair<'a> {
    geo: &'a Geo,
    t0: usize,
    s0: usize,
    nk: usize,
}

impl BlockPair<'_> {
    /// The visible columns `[lo, hi)` of block row `row`.
    #[inline(always)]
    fn cols(&self, row: usize) -> (usize, usize) {
        self.geo.cols(self.t0 + row / self.geo.r, self.s0, self.nk)
    }
}

/// Zeroes `row` outside its visible columns `[lo, hi)`.
#[inline(always)]
fn zero_outside(row: &mut [f32], lo: usize, hi: usize) {
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}

/// One key block of the online softmax: turns the scores `s` (`[M, nk]` of the block pair `at`)
/// into exp(s − m_new) on the visible entries (0 elsewhere), updates the running row max `mx`
/// and sum `l`, and rescales the accumulator rows `acc` (`[M, H]`) by exp(m_old − m_new).
/// Vectorised through `pulp` (max and sum as explicit SIMD reductions).
struct OnlineSoftmax<'a> {
    at: BlockPair<'a>,
    s: &'a mut [f32],
    mx: &'a mut [f32],
    l: &'a mut [f32],
    acc: &'a mut [f32],
}

impl pulp::WithSimd for OnlineSoftmax<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let OnlineSoftmax { at, s, mx, l, acc } = self;
        let h = at.geo.h;
        for (row, srow) in s.chunks_exact_mut(at.nk).enumerate() {
            let (lo, hi) = at.cols(row);
            if lo == hi {
                srow.fill(0.0);
                continue;
            }
            let vis = &mut srow[lo..hi];
            let m_new = mx[row].max(max_min(simd, vis).0);
            let rescale = if mx[row] == f32::NEG_INFINITY {
                0.0
            } else {
                fast_exp(mx[row] - m_new)
            };
            for x in vis.iter_mut() {
                *x = fast_exp(*x - m_new);
            }
            let add = sum(simd, vis);
            zero_outside(srow, lo, hi);
            mx[row] = m_new;
            l[row] = l[row] * rescale + add;
            if rescale != 1.0 {
                scale(simd, &mut acc[row * h..(row + 1) * h], rescale);
            }
        }
    }
}

/// P = exp(S − lse) on the visible entries (0 elsewhere) in `s`, then dS = P ⊙ (dP − D) in
/// `dp`, for the block pair `at` (vectorised through `pulp`).
struct ProbsAndDs<'a> {
    at: BlockPair<'a>,
    s: &'a mut [f32],
    dp: &'a mut [f32],
    lse: &'a [f32],
    dd: &'a [f32],
}

impl pulp::WithSimd for ProbsAndDs<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let ProbsAndDs { at, s, dp, lse, dd } = self;
        let nk = at.nk;
        for (row, (srow, dprow)) in s
            .chunks_exact_mut(nk)
            .zip(dp.chunks_exact_mut(nk))
            .enumerate()
        {
            let (lo, hi) = at.cols(row);
            let (ls, d) = (lse[row], dd[row]);
            for (x, g) in srow[lo..hi].iter_mut().zip(&mut dprow[lo..hi]) {
                let p = fast_exp(*x - ls);
                *x = p;
                *g = p * (*g - d);
            }
            zero_outside(srow, lo, hi);
            zero_outside(dprow, lo, hi);
        }
    }
}

/// How many interleaved groups of key blocks the backward runs per (batch, kv head): enough
/// tasks for every rayon thread twice over, at most 8 (each group accumulates its own dQ of
/// the whole sequence) and at most the number of key blocks.
fn key_groups(bg: usize, nkb: usize) -> usize {
    let want = (2 * rayon::current_num_threads()).div_ceil(bg.max(1));
    want.clamp(1, 8).min(nkb.max(1))
}

/// One key block's share of the backward: dK and dV rows of keys `[s0, s0 + nk)` into
/// `dk_rows`, `dv_rows`, and its dQ contributions added to `dq_part` (`[T, R, H]` of this
/// (batch, kv head)).
struct KeyBlock<'a, 'b> {
    s0: usize,
    dk_rows: Vec<&'a mut [f32]>,
    dv_rows: Vec<&'b mut [f32]>,
}

#[allow(clippy::too_many_arguments)]
fn backward(
    geo: &Geo,
    batch: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (o, lse, d_o): (&[f32], &[f32], &[f32]),
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (h, r, gh) = (geo.h, geo.r, geo.g * geo.h);
    // D = rowsum(dO ⊙ O)  [B,T,N]
    let mut dd = vec![0.0f32; batch * geo.t * geo.n];
    dd.par_chunks_mut(geo.n)
        .zip(o.par_chunks(geo.n * h))
        .zip(d_o.par_chunks(geo.n * h))
        .for_each(|((d, orow), grow)| {
            for ((x, oh), gh_) in d
                .iter_mut()
                .zip(orow.chunks_exact(h))
                .zip(grow.chunks_exact(h))
            {
                *x = oh.iter().zip(gh_).map(|(a, b)| a * b).sum();
            }
        });
    let dd = &dd[..];

    // Tasks: (b, kv head, group p) runs the key blocks kb ≡ p (mod groups), writing their dK,
    // dV rows and adding dS·K into the group's own dQ buffer; the buffers are summed after.
    let nkb = geo.tk.div_ceil(geo.bk);
    let bgs = batch * geo.g;
    let groups = key_groups(bgs, nkb);
    let part_len = geo.t * r * h;
    // The dQ buffers live in the calling thread's scratch, kept between calls: a fresh zeroed
    // allocation of this size (8 MiB at B 1, T 4096, GQA 4/2, H 64) came from pages the OS maps
    // on first write, each with a TLB flush on every core (25,000 page faults per train step
    // there, 11 % of the step).
    with_scratch(bgs * groups * part_len, |dq_parts| {
        dq_parts.par_chunks_mut(part_len).for_each(|p| p.fill(0.0));
        let mut work: Vec<Vec<KeyBlock<'_, '_>>> = (0..bgs * groups).map(|_| Vec::new()).collect();
        let dk_tasks = pieces(dk, geo, (geo.tk, gh), h, geo.bk);
        let dv_tasks = pieces(dv, geo, (geo.tk, gh), h, geo.bk);
        for (task, (dk_rows, dv_rows)) in dk_tasks.into_iter().zip(dv_tasks).enumerate() {
            let (bg, kb) = (task / nkb, task % nkb);
            work[bg * groups + kb % groups].push(KeyBlock {
                s0: kb * geo.bk,
                dk_rows,
                dv_rows,
            });
        }
        work.into_par_iter()
            .zip(dq_parts.par_chunks_mut(part_len))
            .enumerate()
            .for_each(|(task, (blocks, dq_part))| {
                let bg = task / groups;
                let (b, gi) = (bg / geo.g, bg % geo.g);
                for blk in blocks {
                    key_block(geo, (q, k, v), d_o, lse, dd, b, gi, blk, dq_part);
                }
            });

        // dQ = Σ over the groups.
        let parts = &*dq_parts;
        dq.par_chunks_mut(geo.n * h)
            .enumerate()
            .for_each(|(bt, row)| {
                let (b, t) = (bt / geo.t, bt % geo.t);
                for (gi, piece) in row.chunks_mut(r * h).enumerate() {
                    let base = (b * geo.g + gi) * groups;
                    piece.fill(0.0);
                    for p in 0..groups {
                        let src = &parts[(base + p) * part_len + t * r * h..][..r * h];
                        for (x, y) in piece.iter_mut().zip(src) {
                            *x += y;
                        }
                    }
                }
            });
    });
}

/// The backward of one key block (see [`KeyBlock`]) over the query blocks that see it.
#[allow(clippy::too_many_arguments)]
fn key_block(
    geo: &Geo,
    (q, k, v): (&[f32], &[f32], &[f32]),
    d_o: &[f32],
    lse: &[f32],
    dd: &[f32],
    b: usize,
    gi: usize,
    blk: KeyBlock<'_, '_>,
    dq_part: &mut [f32],
) {
    let (h, r, gh) = (geo.h, geo.r, geo.g * geo.h);
    let KeyBlock {
        s0,
        mut dk_rows,
        mut dv_rows,
    } = blk;
    let nk = geo.bk.min(geo.tk - s0);
    let mq = geo.bq * r;
    let lens = [mq * h, mq * h, nk * h, nk * h, mq * nk, mq * nk, mq, mq];
    with_scratch(lens.iter().sum(), |buf| {
        let [qs, dos, dka, dva, s, dp, ls, ds_] = split_scratch(buf, lens);
        dka.fill(0.0);
        dva.fill(0.0);
        let kk = view(&k[geo.key_off(b, s0, gi)..], nk, h, gh);
        let vv = view(&v[geo.key_off(b, s0, gi)..], nk, h, gh);
        let (qlo, qhi) = geo.queries_of(s0, s0 + nk);
        let mut t0 = qlo;
        while t0 < qhi {
            let ce = geo.bq.min(qhi - t0);
            let m = ce * r;
            let (qs, dos) = (&mut qs[..m * h], &mut dos[..m * h]);
            let (s, dp) = (&mut s[..m * nk], &mut dp[..m * nk]);
            let (ls, ds_) = (&mut ls[..m], &mut ds_[..m]);
            gather_rows(geo, q, b, gi, t0, ce, qs);
            gather_rows(geo, d_o, b, gi, t0, ce, dos);
            gather_stats(geo, lse, b, gi, t0, ce, ls);
            gather_stats(geo, dd, b, gi, t0, ce, ds_);
            let qv = view(qs, m, h, h);
            let dov = view(dos, m, h, h);
            gemm(1.0, &qv, &kk.t(), 0.0, &mut view_mut(s, m, nk, nk));
            gemm(1.0, &dov, &vv.t(), 0.0, &mut view_mut(dp, m, nk, nk));
            pulp::Arch::new().dispatch(ProbsAndDs {
                at: BlockPair { geo, t0, s0, nk },
                s,
                dp,
                lse: ls,
                dd: ds_,
            });
            // dV += Pᵀ dO, dK += dSᵀ Q, dQ += dS K
            let (sv, dsv) = (view(s, m, nk, nk), view(dp, m, nk, nk));
            gemm(1.0, &sv.t(), &dov, 1.0, &mut view_mut(dva, nk, h, h));
            gemm(1.0, &dsv.t(), &qv, 1.0, &mut view_mut(dka, nk, h, h));
            let dqv = &mut dq_part[t0 * r * h..(t0 + ce) * r * h];
            gemm(1.0, &dsv, &kk, 1.0, &mut view_mut(dqv, m, h, h));
            t0 += ce;
        }
        for (j, (kr, vr)) in dk_rows.iter_mut().zip(dv_rows.iter_mut()).enumerate() {
            kr.copy_from_slice(&dka[j * h..(j + 1) * h]);
            vr.copy_from_slice(&dva[j * h..(j + 1) * h]);
        }
    });
}

/// Nominal FLOPs of the forward over the visible blocks (2 GEMMs of 2·M·nk·H per block pair).
pub fn flops_fwd(d: &RlaDims, window: Option<usize>) -> f64 {
    let geo = Geo::new(d, window);
    let mut f = 0.0;
    let mut t0 = 0;
    while t0 < geo.t {
        let ce = geo.bq.min(geo.t - t0);
        let (lo, hi) = geo.keys_of(t0, t0 + ce);
        f += 4.0 * (ce * geo.r * (hi - lo) * geo.h) as f64;
        t0 += ce;
    }
    f * (d.batch * geo.g) as f64
}
