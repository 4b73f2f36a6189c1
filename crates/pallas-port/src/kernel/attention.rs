//! Causal softmax attention (FlashAttention-2 style) on the CPU: q `[B,T,N,H]`, k/v `[B,T,G,H]`
//! (GQA, query head n reads kv head n / (N/G)), already rotated and scaled.
//!
//! Key s is visible to query t iff s ≤ t and, with a window W, t − W ≤ s. Work is cut into
//! blocks of [`BQ`] query positions (the R = N/G query heads of a kv head stacked, so a block is
//! `[BQ·R, H]`) against blocks of [`BK`] keys; a key block is visited only if some key in it is
//! visible to some query of the block (the diagonal for global attention, the band for a window).
//!
//! - forward: online softmax over the visible key blocks (running row max m and sum l, the
//!   accumulator rescaled by exp(m_old − m_new)); writes o and the row logsumexp
//!   lse = m + ln l. Parallel over (batch, kv head, query block).
//! - backward: D = rowsum(dO ⊙ O); P = exp(S − lse) recomputed per block; dS = P ⊙ (dO Vᵀ − D).
//!   dQ = dS K in parallel over (batch, kv head, query block); dK = dSᵀ Q and dV = Pᵀ dO in
//!   parallel over (batch, kv head, key block), so no two tasks write the same rows.

use rayon::prelude::*;

use super::feature::fast_exp;
use super::mm::{gemm, view, view_mut};
use super::{split_scratch, with_scratch};
use crate::config::{check_len, RlaDims, RlaError};

/// Query positions per block (each stacks the R query heads of a kv head: BQ·R rows).
pub const BQ: usize = 64;
/// Keys per block.
pub const BK: usize = 128;

/// Geometry of one attention call.
#[derive(Clone, Copy)]
struct Geo {
    t: usize,
    n: usize,
    g: usize,
    h: usize,
    r: usize,
    w: Option<usize>,
}

impl Geo {
    fn new(d: &RlaDims, window: Option<usize>) -> Geo {
        Geo {
            t: d.seq,
            n: d.heads,
            g: d.kv_heads,
            h: d.head_dim,
            r: d.group_size(),
            w: window,
        }
    }

    fn kv_off(&self, b: usize, s: usize, gi: usize) -> usize {
        ((b * self.t + s) * self.g + gi) * self.h
    }

    fn q_off(&self, b: usize, t: usize, gi: usize) -> usize {
        ((b * self.t + t) * self.n + gi * self.r) * self.h
    }

    /// Offset in `[B,T,N]` (lse, D) of query head `gi·R` at (b, t).
    fn row_off(&self, b: usize, t: usize, gi: usize) -> usize {
        (b * self.t + t) * self.n + gi * self.r
    }

    /// The keys `[lo, hi)` some query in `[t0, t1)` sees.
    fn keys_of(&self, t0: usize, t1: usize) -> (usize, usize) {
        (self.w.map_or(0, |w| t0.saturating_sub(w)), t1)
    }

    /// The queries `[lo, hi)` that see some key in `[s0, s1)`.
    fn queries_of(&self, s0: usize, s1: usize) -> (usize, usize) {
        (s0, self.w.map_or(self.t, |w| (s1 + w).min(self.t)))
    }

    /// The visible columns `[lo, hi)` of query `t` in a key block starting at `s0` of `nk` keys.
    #[inline]
    fn cols(&self, t: usize, s0: usize, nk: usize) -> (usize, usize) {
        let first = self.w.map_or(0, |w| t.saturating_sub(w));
        let lo = first.saturating_sub(s0).min(nk);
        let hi = (t + 1).saturating_sub(s0).min(nk);
        (lo, hi.max(lo))
    }
}

/// Checks the dims and the lengths of q, k, v.
fn check_qkv(
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
    const OP: &str = "attn_fwd";
    check_qkv(OP, d, q, k, v)?;
    check_len(OP, "o", o.len(), &d.q_shape(), d)?;
    check_len(OP, "lse", lse.len(), &lse_shape(d), d)?;
    forward(&Geo::new(d, window), d.batch, q, k, v, o, lse);
    Ok(())
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
    const OP: &str = "attn_bwd";
    check_qkv(OP, d, q, k, v)?;
    check_len(OP, "o", o.len(), &d.q_shape(), d)?;
    check_len(OP, "lse", lse.len(), &lse_shape(d), d)?;
    check_len(OP, "d_o", d_o.len(), &d.q_shape(), d)?;
    check_len(OP, "dq", dq.len(), &d.q_shape(), d)?;
    check_len(OP, "dk", dk.len(), &d.kv_shape(), d)?;
    check_len(OP, "dv", dv.len(), &d.kv_shape(), d)?;
    backward(
        &Geo::new(d, window),
        d.batch,
        (q, k, v),
        o,
        lse,
        d_o,
        (dq, dk, dv),
    );
    Ok(())
}

/// Cuts `out` (rows of `per_row` = heads·`piece` values per (b, position)) into one list of
/// `piece`-sized pieces per task (b, kv head, position / `blk`), in position order.
fn pieces<'a>(
    out: &'a mut [f32],
    geo: &Geo,
    per_row: usize,
    piece: usize,
    blk: usize,
) -> Vec<Vec<&'a mut [f32]>> {
    let nb = geo.t.div_ceil(blk);
    let batch = out.len() / (per_row * geo.t).max(1);
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..batch * geo.g * nb)
        .map(|_| Vec::with_capacity(blk))
        .collect();
    if piece == 0 {
        return tasks;
    }
    for (bt, row) in out.chunks_mut(per_row).enumerate() {
        let (b, t) = (bt / geo.t, bt % geo.t);
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
        let off = geo.q_off(b, t0 + tl, gi);
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
    let kv = view(&k[geo.kv_off(b, s0, gi)..], nk, geo.h, geo.g * geo.h);
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
    let nqb = geo.t.div_ceil(BQ);
    let o_tasks = pieces(o, geo, geo.n * h, r * h, BQ);
    let l_tasks = pieces(lse, geo, geo.n, r, BQ);
    debug_assert_eq!(o_tasks.len(), batch * geo.g * nqb);
    o_tasks.into_par_iter().zip(l_tasks).enumerate().for_each(
        |(task, (mut o_rows, mut l_rows))| {
            let (bg, qb) = (task / nqb, task % nqb);
            let (b, gi) = (bg / geo.g, bg % geo.g);
            let t0 = qb * BQ;
            let ce = BQ.min(geo.t - t0);
            let m = ce * r;
            let lens = [m * h, m * h, m * BK, m, m];
            with_scratch(lens.iter().sum(), |buf| {
                let [qs, acc, s, mx, l] = split_scratch(buf, lens);
                gather_rows(geo, q, b, gi, t0, ce, qs);
                acc.fill(0.0);
                mx.fill(f32::NEG_INFINITY);
                l.fill(0.0);
                let (klo, khi) = geo.keys_of(t0, t0 + ce);
                let mut s0 = klo;
                while s0 < khi {
                    let nk = BK.min(khi - s0);
                    let s = &mut s[..m * nk];
                    scores(geo, qs, k, b, gi, s0, m, s);
                    for (row, srow) in s.chunks_exact_mut(nk).enumerate() {
                        let t = t0 + row / r;
                        let (lo, hi) = geo.cols(t, s0, nk);
                        if lo == hi {
                            srow.fill(0.0);
                            continue;
                        }
                        let vis = &mut srow[lo..hi];
                        let bmax = vis.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                        let m_new = mx[row].max(bmax);
                        let scale = if mx[row] == f32::NEG_INFINITY {
                            0.0
                        } else {
                            fast_exp(mx[row] - m_new)
                        };
                        let mut sum = 0.0f32;
                        for x in vis.iter_mut() {
                            *x = fast_exp(*x - m_new);
                            sum += *x;
                        }
                        srow[..lo].fill(0.0);
                        srow[hi..].fill(0.0);
                        mx[row] = m_new;
                        l[row] = l[row] * scale + sum;
                        if scale != 1.0 {
                            for a in &mut acc[row * h..(row + 1) * h] {
                                *a *= scale;
                            }
                        }
                    }
                    let vv = view(&v[geo.kv_off(b, s0, gi)..], nk, h, geo.g * h);
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

/// P = exp(S − lse) on the visible entries (0 elsewhere), then dS = P ⊙ (dP − D) in `dp`, for
/// the block of `m` rows from query position `t0` against keys from `s0`.
#[allow(clippy::too_many_arguments)]
fn probs_and_ds(
    geo: &Geo,
    t0: usize,
    s0: usize,
    nk: usize,
    s: &mut [f32],
    dp: &mut [f32],
    lse: &[f32],
    dd: &[f32],
) {
    let r = geo.r;
    for (row, (srow, dprow)) in s
        .chunks_exact_mut(nk)
        .zip(dp.chunks_exact_mut(nk))
        .enumerate()
    {
        let t = t0 + row / r;
        let (lo, hi) = geo.cols(t, s0, nk);
        let (ls, d) = (lse[row], dd[row]);
        for (x, g) in srow[lo..hi].iter_mut().zip(&mut dprow[lo..hi]) {
            let p = fast_exp(*x - ls);
            *x = p;
            *g = p * (*g - d);
        }
        srow[..lo].fill(0.0);
        srow[hi..].fill(0.0);
        dprow[..lo].fill(0.0);
        dprow[hi..].fill(0.0);
    }
}

#[allow(clippy::too_many_arguments)]
fn backward(
    geo: &Geo,
    batch: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
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

    // dQ per (b, kv head, query block).
    let nqb = geo.t.div_ceil(BQ);
    pieces(dq, geo, geo.n * h, r * h, BQ)
        .into_par_iter()
        .enumerate()
        .for_each(|(task, mut rows)| {
            let (bg, qb) = (task / nqb, task % nqb);
            let (b, gi) = (bg / geo.g, bg % geo.g);
            let t0 = qb * BQ;
            let ce = BQ.min(geo.t - t0);
            let m = ce * r;
            let lens = [m * h, m * h, m * h, m * BK, m * BK, m, m];
            with_scratch(lens.iter().sum(), |buf| {
                let [qs, dos, acc, s, dp, ls, ds_] = split_scratch(buf, lens);
                gather_rows(geo, q, b, gi, t0, ce, qs);
                gather_rows(geo, d_o, b, gi, t0, ce, dos);
                gather_stats(geo, lse, b, gi, t0, ce, ls);
                gather_stats(geo, dd, b, gi, t0, ce, ds_);
                acc.fill(0.0);
                let (klo, khi) = geo.keys_of(t0, t0 + ce);
                let mut s0 = klo;
                while s0 < khi {
                    let nk = BK.min(khi - s0);
                    let (s, dp) = (&mut s[..m * nk], &mut dp[..m * nk]);
                    scores(geo, qs, k, b, gi, s0, m, s);
                    // dP = dO Vᵀ
                    let vv = view(&v[geo.kv_off(b, s0, gi)..], nk, h, gh);
                    gemm(
                        1.0,
                        &view(dos, m, h, h),
                        &vv.t(),
                        0.0,
                        &mut view_mut(dp, m, nk, nk),
                    );
                    probs_and_ds(geo, t0, s0, nk, s, dp, ls, ds_);
                    let kk = view(&k[geo.kv_off(b, s0, gi)..], nk, h, gh);
                    gemm(
                        1.0,
                        &view(dp, m, nk, nk),
                        &kk,
                        1.0,
                        &mut view_mut(acc, m, h, h),
                    );
                    s0 += nk;
                }
                for (tl, row) in rows.iter_mut().enumerate() {
                    row.copy_from_slice(&acc[tl * r * h..(tl + 1) * r * h]);
                }
            });
        });

    // dK, dV per (b, kv head, key block).
    let nkb = geo.t.div_ceil(BK);
    let dk_tasks = pieces(dk, geo, gh, h, BK);
    let dv_tasks = pieces(dv, geo, gh, h, BK);
    dk_tasks.into_par_iter().zip(dv_tasks).enumerate().for_each(
        |(task, (mut dk_rows, mut dv_rows))| {
            let (bg, kb) = (task / nkb, task % nkb);
            let (b, gi) = (bg / geo.g, bg % geo.g);
            let s0 = kb * BK;
            let nk = BK.min(geo.t - s0);
            let mq = BQ * r;
            let lens = [mq * h, mq * h, nk * h, nk * h, mq * nk, mq * nk, mq, mq];
            with_scratch(lens.iter().sum(), |buf| {
                let [qs, dos, dka, dva, s, dp, ls, ds_] = split_scratch(buf, lens);
                dka.fill(0.0);
                dva.fill(0.0);
                let kk = view(&k[geo.kv_off(b, s0, gi)..], nk, h, gh);
                let vv = view(&v[geo.kv_off(b, s0, gi)..], nk, h, gh);
                let (qlo, qhi) = geo.queries_of(s0, s0 + nk);
                let mut t0 = qlo;
                while t0 < qhi {
                    let ce = BQ.min(qhi - t0);
                    let m = ce * r;
                    let (qs, dos) = (&mut qs[..m * h], &mut dos[..m * h]);
                    let (s, dp) = (&mut s[..m * nk], &mut dp[..m * nk]);
                    gather_rows(geo, q, b, gi, t0, ce, qs);
                    gather_rows(geo, d_o, b, gi, t0, ce, dos);
                    gather_stats(geo, lse, b, gi, t0, ce, ls);
                    gather_stats(geo, dd, b, gi, t0, ce, ds_);
                    let qv = view(qs, m, h, h);
                    let dov = view(dos, m, h, h);
                    gemm(1.0, &qv, &kk.t(), 0.0, &mut view_mut(s, m, nk, nk));
                    gemm(1.0, &dov, &vv.t(), 0.0, &mut view_mut(dp, m, nk, nk));
                    probs_and_ds(geo, t0, s0, nk, s, dp, ls, ds_);
                    // dV += Pᵀ dO, dK += dSᵀ Q
                    gemm(
                        1.0,
                        &view(s, m, nk, nk).t(),
                        &dov,
                        1.0,
                        &mut view_mut(dva, nk, h, h),
                    );
                    gemm(
                        1.0,
                        &view(dp, m, nk, nk).t(),
                        &qv,
                        1.0,
                        &mut view_mut(dka, nk, h, h),
                    );
                    t0 += ce;
                }
                for (j, (kr, vr)) in dk_rows.iter_mut().zip(dv_rows.iter_mut()).enumerate() {
                    kr.copy_from_slice(&dka[j * h..(j + 1) * h]);
                    vr.copy_from_slice(&dva[j * h..(j + 1) * h]);
                }
            });
        },
    );
}

/// Nominal FLOPs of the forward over the visible blocks (2 GEMMs of 2·M·nk·H per block pair).
pub fn flops_fwd(d: &RlaDims, window: Option<usize>) -> f64 {
    let geo = Geo::new(d, window);
    let mut f = 0.0;
    let mut t0 = 0;
    while t0 < geo.t {
        let ce = BQ.min(geo.t - t0);
        let (lo, hi) = geo.keys_of(t0, t0 + ce);
        f += 4.0 * (ce * geo.r * (hi - lo) * geo.h) as f64;
        t0 += ce;
    }
    f * (d.batch * geo.g) as f64
}
