//! Forward chunked scan.

use rayon::prelude::*;

use super::feature::phi_rows;
use super::mm::{gemm, view, view_mut};
use super::{split_scratch, with_scratch, Heads};
use crate::config::{RlaConfig, RlaDims};

/// Geometry shared by the forward and backward passes (derefs to its [`Heads`]).
#[derive(Clone, Copy)]
pub(crate) struct Geo {
    pub heads: Heads,
    pub w: usize,
    pub c: usize,
    pub l: usize,
    pub nc: usize,
    /// The scan starts from a given state h0 (every sub-chunk then has a state to read).
    pub h0: bool,
}

deref_heads!(Geo);

impl Geo {
    pub(crate) fn new(cfg: &RlaConfig, d: &RlaDims) -> Self {
        Geo {
            heads: Heads::new(d),
            w: cfg.window,
            c: cfg.sub_chunk,
            l: cfg.chunk,
            nc: d.n_chunks(cfg),
            h0: false,
        }
    }

    /// This geometry for a scan that starts from a given state h0 (`with`) or from zero.
    pub(crate) fn with_h0(self, with: bool) -> Self {
        Geo { h0: with, ..self }
    }

    /// Size of one state, 2H·H.
    pub(crate) fn ss(&self) -> usize {
        2 * self.h * self.h
    }

    /// First query position whose shifted key is valid: W + 1.
    pub(crate) fn first_key(&self) -> usize {
        self.w.saturating_add(1)
    }
}

/// One sub-chunk of query positions `[t0, t0 + ce)` and its valid shifted keys `[j_lo, t0 + ce)`.
#[derive(Clone, Copy)]
pub(crate) struct Sub {
    pub t0: usize,
    pub ce: usize,
    /// State entering the sub-chunk may be nonzero (a given h0, or some valid key before t0).
    pub has_state: bool,
    /// First query position with a valid shifted key inside the sub-chunk.
    pub j_lo: usize,
    /// Number of valid shifted keys (0 if none).
    pub nk: usize,
}

impl Sub {
    pub(crate) fn new(geo: &Geo, t0: usize) -> Self {
        let ce = geo.c.min(geo.t - t0);
        let fk = geo.first_key();
        let j_lo = t0.max(fk);
        let nk = (t0 + ce).saturating_sub(j_lo);
        Sub {
            t0,
            ce,
            has_state: geo.h0 || t0 > fk,
            j_lo,
            nk,
        }
    }

    /// Key index `s = j_lo − W − 1` of the first valid shifted key.
    pub(crate) fn s_lo(&self, geo: &Geo) -> usize {
        self.j_lo - geo.first_key()
    }

    pub(crate) fn active(&self) -> bool {
        self.has_state || self.nk > 0
    }
}

/// Zeroes entries of `a` (`[M, nk]`, rows ordered (tl, r)) whose key comes after the query.
pub(crate) fn causal_mask(a: &mut [f32], sub: &Sub, r: usize) {
    let nk = sub.nk;
    for (m, row) in a.chunks_exact_mut(nk).take(sub.ce * r).enumerate() {
        let tq = sub.t0 + m / r;
        // key jj (position j_lo + jj) is visible iff j_lo + jj <= tq
        let keep = if tq < sub.j_lo {
            0
        } else {
            (tq - sub.j_lo + 1).min(nk)
        };
        row[keep..].fill(0.0);
    }
}

/// Gathers φ of the R query heads of group `gi` at positions `[t0, t0+ce)` into `fq`
/// (`[ce·R, 2H]`, rows ordered (tl, r)).
pub(crate) fn phi_q(
    cfg: &RlaConfig,
    geo: &Geo,
    q: &[f32],
    b: usize,
    gi: usize,
    sub: &Sub,
    fq: &mut [f32],
) {
    let (h, r) = (geo.h, geo.r);
    for tl in 0..sub.ce {
        let off = geo.q_off(b, sub.t0 + tl, gi * r);
        phi_rows(
            cfg.feature_map,
            &q[off..off + r * h],
            h,
            r,
            h,
            &mut fq[tl * r * 2 * h..],
        );
    }
}

/// Where a forward scan starts: from zero (the block's usual contract), or from a state h0
/// `[B,G,2H,H]`, optionally with the keys' own contribution `Σ_s φ(k_s)ᵀ v_s` over all T keys
/// (`[B,G,2H,H]`, as [`super::rla_kv_state`] computes it), from which the final state is
/// derived (`h0 + contrib − Σ_{s ≥ T−W−1}`) instead of scanned when that is less work.
#[derive(Clone, Copy)]
pub(crate) struct Start<'a> {
    pub h0: Option<&'a [f32]>,
    pub contrib: Option<&'a [f32]>,
}

/// The scan from `start` (see [`Start`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<'a>(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: Start<'a>,
    o: &mut [f32],
    chunk_states: &mut [f32],
    final_state: &mut [f32],
) {
    let h0 = start.h0;
    let geo = Geo::new(cfg, d).with_h0(h0.is_some());
    let ss = geo.ss();
    let h = geo.h;
    // Keys of the last chunk's state update, and the keys after the final state's last one
    // (s ≥ T − W − 1): with the contribution given, the final state is h0 + contrib minus the
    // latter when they are fewer (a sequence shard at W = 0: one key instead of all).
    let keys_in = |c: usize| {
        let j0 = (c * geo.l).max(geo.first_key());
        (j0..((c + 1) * geo.l).min(geo.t)).len()
    };
    let tail = geo.first_key().min(geo.t);
    let contrib = start
        .contrib
        .filter(|_| h0.is_some() && tail < keys_in(geo.nc - 1));

    let bg_of = |x: Option<&'a [f32]>, bg: usize| x.map(|x| &x[bg * ss..(bg + 1) * ss]);
    let states = |bg: usize, cs: &mut [f32], fs: &mut [f32]| {
        let start = (bg_of(h0, bg), bg_of(contrib, bg));
        scan_states(cfg, &geo, (k, v), start, tail, bg, (cs, fs));
    };
    // One chunk and the final state from the contribution (a sequence shard): the chunk
    // state is h0 and the final state a rank-(W+1) update, done in the output tasks (one
    // parallel pass instead of two).
    let one_pass = contrib.is_some() && geo.nc == 1;
    if !one_pass {
        // Phase 1: chunk states per (b, kv head), chunk-sized GEMMs S += φK̃ᵀ Ṽ.
        chunk_states
            .par_chunks_mut(geo.nc * ss)
            .zip(final_state.par_chunks_mut(ss))
            .enumerate()
            .for_each(|(bg, (cs, fs))| states(bg, cs, fs));
    }

    // Phase 2: outputs, parallel over (b, kv head, chunk); each task writes its own rows of o.
    let rh = geo.r * h;
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..d.batch * geo.g * geo.nc)
        .map(|_| Vec::with_capacity(geo.l))
        .collect();
    for (bt, row) in o.chunks_mut(geo.n * h).enumerate() {
        let (b, t) = (bt / geo.t, bt % geo.t);
        for (gi, piece) in row.chunks_mut(rh).enumerate() {
            tasks[(b * geo.g + gi) * geo.nc + t / geo.l].push(piece);
        }
    }
    if one_pass {
        tasks
            .into_par_iter()
            .zip(chunk_states.par_chunks_mut(ss))
            .zip(final_state.par_chunks_mut(ss))
            .enumerate()
            .for_each(|(bg, ((rows, cs), fs))| {
                states(bg, cs, fs);
                let (b, gi) = (bg / geo.g, bg % geo.g);
                chunk_group(cfg, &geo, q, k, v, b, 0, gi, cs, rows);
            });
        return;
    }
    let cs_ro: &[f32] = chunk_states;
    tasks.into_par_iter().enumerate().for_each(|(bgc, rows)| {
        let (bg, c) = (bgc / geo.nc, bgc % geo.nc);
        let (b, gi) = (bg / geo.g, bg % geo.g);
        let st = &cs_ro[(bg * geo.nc + c) * ss..][..ss];
        chunk_group(cfg, &geo, q, k, v, b, c, gi, st, rows);
    });
}

/// The chunk states `cs` (`[nc, 2H, H]`) and the final state `fs` of one (batch, kv head)
/// `bg` from its h0 and contribution slices (`[2H, H]` each): every chunk's keys scanned, or
/// (contribution given) all but the last chunk's, the final state then `h0 + contrib` minus
/// the `tail` keys after it.
fn scan_states(
    cfg: &RlaConfig,
    geo: &Geo,
    (k, v): (&[f32], &[f32]),
    (h0, contrib): (Option<&[f32]>, Option<&[f32]>),
    tail: usize,
    bg: usize,
    (cs, fs): (&mut [f32], &mut [f32]),
) {
    let (b, gi) = (bg / geo.g, bg % geo.g);
    let (ss, h, gh) = (geo.ss(), geo.h, geo.g * geo.h);
    let scanned = geo.nc - usize::from(contrib.is_some());
    with_scratch(ss + geo.l * 2 * h, |buf| {
        let [s_, fk] = split_scratch(buf, [ss, geo.l * 2 * h]);
        let (first, rest) = cs.split_at_mut(ss);
        match h0 {
            Some(h0) => first.copy_from_slice(h0),
            None => first.fill(0.0),
        }
        if scanned > 0 {
            s_.copy_from_slice(first);
        }
        for c in 0..scanned {
            let j0 = c * geo.l;
            let j1 = (j0 + geo.l).min(geo.t);
            let j_lo = j0.max(geo.first_key());
            if j_lo < j1 {
                let nk = j1 - j_lo;
                let off = geo.kv_off(b, j_lo - geo.first_key(), gi);
                phi_rows(cfg.feature_map, &k[off..], gh, nk, h, fk);
                let fkv = view(fk, nk, 2 * h, 2 * h);
                let vv = view(&v[off..], nk, h, gh);
                gemm(1.0, &fkv.t(), &vv, 1.0, &mut view_mut(s_, 2 * h, h, h));
            }
            if c + 1 < geo.nc {
                rest[c * ss..(c + 1) * ss].copy_from_slice(s_);
            }
        }
        let (Some(contrib), Some(h0)) = (contrib, h0) else {
            fs.copy_from_slice(s_);
            return;
        };
        for ((f, a), c) in fs.iter_mut().zip(h0).zip(contrib) {
            *f = a + c;
        }
        let off = geo.kv_off(b, geo.t - tail, gi);
        phi_rows(cfg.feature_map, &k[off..], gh, tail, h, fk);
        let fkv = view(fk, tail, 2 * h, 2 * h);
        let vv = view(&v[off..], tail, h, gh);
        gemm(-1.0, &fkv.t(), &vv, 1.0, &mut view_mut(fs, 2 * h, h, h));
    });
}

/// Outputs of chunk `c` for the query heads of group `gi` into `out` (one piece of `R·H` per
/// position of the chunk).
#[allow(clippy::too_many_arguments)]
fn chunk_group(
    cfg: &RlaConfig,
    geo: &Geo,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    c: usize,
    gi: usize,
    state: &[f32],
    mut out_rows: Vec<&mut [f32]>,
) {
    let (h, r, sc) = (geo.h, geo.r, geo.c);
    let gh = geo.g * h;
    let c0 = c * geo.l;
    let rows = geo.l.min(geo.t - c0);
    let lens = [
        state.len(),
        sc * r * 2 * h,
        sc * 2 * h,
        sc * r * sc,
        sc * r * h,
    ];
    with_scratch(lens.iter().sum(), |buf| {
        let [s_, fq, fk, a, ob] = split_scratch(buf, lens);
        let n_sub = rows.div_ceil(sc);
        // The state is advanced only between sub-chunks: one sub-chunk reads `state` in place.
        let own = n_sub > 1;
        if own {
            s_.copy_from_slice(state);
        }
        for i in 0..n_sub {
            let sub = Sub::new(geo, c0 + i * sc);
            let out_i = &mut out_rows[i * sc..i * sc + sub.ce];
            if !sub.active() {
                for row in out_i.iter_mut() {
                    row.fill(0.0);
                }
                continue;
            }
            let mrows = sub.ce * r;
            phi_q(cfg, geo, q, b, gi, &sub, fq);
            let fqv = view(fq, mrows, 2 * h, 2 * h);
            let out = &mut ob[..mrows * h];
            if sub.has_state {
                let sv = view(if own { s_ } else { state }, 2 * h, h, h);
                gemm(1.0, &fqv, &sv, 0.0, &mut view_mut(out, mrows, h, h));
            }
            if sub.nk > 0 {
                let nk = sub.nk;
                let off = geo.kv_off(b, sub.s_lo(geo), gi);
                phi_rows(cfg.feature_map, &k[off..], gh, nk, h, fk);
                let fkv = view(fk, nk, 2 * h, 2 * h);
                let vv = view(&v[off..], nk, h, gh);
                let a = &mut a[..mrows * nk];
                gemm(1.0, &fqv, &fkv.t(), 0.0, &mut view_mut(a, mrows, nk, nk));
                causal_mask(a, &sub, r);
                let av = view(a, mrows, nk, nk);
                let beta = if sub.has_state { 1.0 } else { 0.0 };
                gemm(1.0, &av, &vv, beta, &mut view_mut(out, mrows, h, h));
                if i + 1 < n_sub {
                    gemm(1.0, &fkv.t(), &vv, 1.0, &mut view_mut(s_, 2 * h, h, h));
                }
            }
            for (row, src) in out_i.iter_mut().zip(out.chunks_exact(r * h)) {
                row.copy_from_slice(src);
            }
        }
    });
}
