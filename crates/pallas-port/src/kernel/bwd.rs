//! Backward chunked scan: chunks in reverse carrying dS, sub-chunk states recomputed from the
//! saved chunk state (pass 1, forward order), then key/value gradients (pass 2, reverse order).

use rayon::prelude::*;

use super::feature::{phi_rows, phi_vjp_rows};
use super::fwd::{causal_mask, phi_q, Geo, Sub};
use super::mm::{gemm, view, view_mut};
use super::{split_scratch, with_scratch};
use crate::config::{RlaConfig, RlaDims};

/// Splits the rows of a `[B, T, G·w]` output into per-(batch, group) lists of `T` pieces of `w`.
pub(crate) fn group_rows<'a>(
    out: &'a mut [f32],
    geo: &super::Heads,
    batch: usize,
    w: usize,
) -> Vec<Vec<&'a mut [f32]>> {
    let mut rows: Vec<Vec<&mut [f32]>> = (0..batch * geo.g)
        .map(|_| Vec::with_capacity(geo.t))
        .collect();
    for (bt, row) in out.chunks_mut(geo.g * w).enumerate() {
        let b = bt / geo.t;
        for (gi, piece) in row.chunks_mut(w).enumerate() {
            rows[b * geo.g + gi].push(piece);
        }
    }
    rows
}

/// The initial-state side of a backward scan: `h0` says the forward scan started from a given
/// state (its saved `chunk_states` include it); `d_final` `[B,G,2H,H]` is the cotangent of the
/// final state (the reverse scan's dS starts there; `None`: zero); `dh0` `[B,G,2H,H]` receives
/// the cotangent of h0 (dS after the first chunk) when given.
pub(crate) struct StateGrads<'a> {
    pub h0: bool,
    pub d_final: Option<&'a [f32]>,
    pub dh0: Option<&'a mut [f32]>,
}

impl StateGrads<'_> {
    /// The block's usual contract: from zero, no final-state cotangent, no dh0.
    pub(crate) fn none() -> Self {
        StateGrads {
            h0: false,
            d_final: None,
            dh0: None,
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    chunk_states: &[f32],
    d_o: &[f32],
    state: StateGrads<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let geo = Geo::new(cfg, d).with_h0(state.h0);
    let ss = geo.ss();
    let d_final = state.d_final;
    let dh0: Vec<Option<&mut [f32]>> = match state.dh0 {
        Some(x) => x.chunks_mut(ss).map(Some).collect(),
        None => (0..d.batch * geo.g).map(|_| None).collect(),
    };
    // Each (batch, kv head) task writes its own rows of dq/dk/dv directly.
    let dq_rows = group_rows(dq, &geo, d.batch, geo.r * geo.h);
    let dk_rows = group_rows(dk, &geo, d.batch, geo.h);
    let dv_rows = group_rows(dv, &geo, d.batch, geo.h);
    dq_rows
        .into_par_iter()
        .zip(dk_rows)
        .zip(dv_rows)
        .zip(dh0)
        .enumerate()
        .for_each(|(bg, (((dqr, dkr), dvr), dh0))| {
            let (b, gi) = (bg / geo.g, bg % geo.g);
            let cs = &chunk_states[bg * geo.nc * ss..(bg + 1) * geo.nc * ss];
            let out = GroupOut {
                dq: dqr,
                dk: dkr,
                dv: dvr,
                d_final: d_final.map(|x| &x[bg * ss..(bg + 1) * ss]),
                dh0,
            };
            group_backward(cfg, &geo, q, k, v, cs, d_o, b, gi, out)
        });
}

/// Output rows of one (batch, kv head): dq `T` pieces of `R·H`, dk and dv `T` pieces of `H`;
/// its final-state cotangent and its dh0 (`[2H, H]` each) when the scan has them.
struct GroupOut<'a> {
    dq: Vec<&'a mut [f32]>,
    dk: Vec<&'a mut [f32]>,
    dv: Vec<&'a mut [f32]>,
    d_final: Option<&'a [f32]>,
    dh0: Option<&'a mut [f32]>,
}

/// Copies `[n, w]` contiguous rows of `src` into the pieces `dst[first..first + n]`.
fn put_rows(dst: &mut [&mut [f32]], first: usize, src: &[f32], w: usize) {
    for (d, s) in dst[first..].iter_mut().zip(src.chunks_exact(w)) {
        d.copy_from_slice(s);
    }
}

#[allow(clippy::too_many_arguments)]
fn group_backward(
    cfg: &RlaConfig,
    geo: &Geo,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cs: &[f32],
    d_o: &[f32],
    b: usize,
    gi: usize,
    mut out: GroupOut<'_>,
) {
    let (h, r, sc, l) = (geo.h, geo.r, geo.c, geo.l);
    let (ss, gh, h2) = (geo.ss(), geo.g * h, 2 * h);
    let fm = cfg.feature_map;
    // Keys with no query after them keep a zero gradient; zero all key rows up front.
    for row in out.dk.iter_mut().chain(out.dv.iter_mut()) {
        row.fill(0.0);
    }
    // Per-chunk caches, indexed by sub-chunk i at i·(size for a full sub-chunk).
    let m_full = sc * r;
    let lens = [
        l * r * h2,  // fq: φQ [M, 2H] per sub-chunk
        l * r * h,   // dob: dO [M, H]
        l * h2,      // fk: φK̃ [nk, 2H]
        l * r * sc,  // p: (dO Ṽᵀ)⊙M [M, nk]
        m_full * sc, // a: (φQ φK̃ᵀ)⊙M [M, nk]
        m_full * h2, // dfq
        sc * h2,     // dfk
        ss,          // s_
        ss,          // ds
        m_full * h,  // dx: dq / dk / dv rows of one sub-chunk before they are put in place
    ];
    with_scratch(lens.iter().sum(), |buf| {
        let [fq, dob, fk, p, a, dfq, dfk, s_, ds, dx] = split_scratch(buf, lens);
        let mut ds_nonzero = false;
        if let Some(d_final) = out.d_final {
            ds.copy_from_slice(d_final);
            ds_nonzero = true;
        }

        for c in (0..geo.nc).rev() {
            let c0 = c * l;
            let rows = l.min(geo.t - c0);
            let n_sub = rows.div_ceil(sc);
            // The state is advanced only between sub-chunks: one sub-chunk reads it in place.
            let cs_c = &cs[c * ss..(c + 1) * ss];
            let own = n_sub > 1;
            if own {
                s_.copy_from_slice(cs_c);
            }
            let subs: Vec<Sub> = (0..n_sub).map(|i| Sub::new(geo, c0 + i * sc)).collect();

            // Pass 1 (forward order): dφQ = dO Sᵀ + P φK̃, S advanced sub-chunk by sub-chunk.
            for (i, sub) in subs.iter().enumerate() {
                if !sub.active() {
                    for row in &mut out.dq[sub.t0..sub.t0 + sub.ce] {
                        row.fill(0.0);
                    }
                    continue;
                }
                let mrows = sub.ce * r;
                let fq_i = &mut fq[i * m_full * h2..][..mrows * h2];
                phi_q(cfg, geo, q, b, gi, sub, fq_i);
                let do_i = &mut dob[i * m_full * h..][..mrows * h];
                for tl in 0..sub.ce {
                    let off = geo.q_off(b, sub.t0 + tl, gi * r);
                    do_i[tl * r * h..(tl + 1) * r * h].copy_from_slice(&d_o[off..off + r * h]);
                }
                let dov = view(do_i, mrows, h, h);
                let dfq_i = &mut dfq[..mrows * h2];
                if sub.has_state {
                    let sv = view(if own { s_ } else { cs_c }, h2, h, h);
                    gemm(1.0, &dov, &sv.t(), 0.0, &mut view_mut(dfq_i, mrows, h2, h2));
                } else {
                    dfq_i.fill(0.0);
                }
                if sub.nk > 0 {
                    let nk = sub.nk;
                    let off = geo.kv_off(b, sub.s_lo(geo), gi);
                    let fk_i = &mut fk[i * sc * h2..][..nk * h2];
                    phi_rows(fm, &k[off..], gh, nk, h, fk_i);
                    let vv = view(&v[off..], nk, h, gh);
                    let p_i = &mut p[i * m_full * sc..][..mrows * nk];
                    gemm(1.0, &dov, &vv.t(), 0.0, &mut view_mut(p_i, mrows, nk, nk));
                    causal_mask(p_i, sub, r);
                    let fkv = view(fk_i, nk, h2, h2);
                    gemm(
                        1.0,
                        &view(p_i, mrows, nk, nk),
                        &fkv,
                        1.0,
                        &mut view_mut(dfq_i, mrows, h2, h2),
                    );
                    if i + 1 < n_sub {
                        gemm(1.0, &fkv.t(), &vv, 1.0, &mut view_mut(s_, h2, h, h));
                    }
                }
                // Feature-map VJP into dq rows (t0 + tl, r): contiguous in the [T, R, H] buffer.
                let fq_i = &fq[i * m_full * h2..][..mrows * h2];
                let dq_i = &mut dx[..mrows * h];
                phi_vjp_rows(fm, fq_i, dfq_i, dq_i, mrows, h);
                put_rows(&mut out.dq, sub.t0, dq_i, r * h);
            }

            // Pass 2 (reverse order): dφK̃ = Pᵀ φQ + Ṽ dSᵀ, dṼ = Aᵀ dO + φK̃ dS, dS += φQᵀ dO.
            for (i, sub) in subs.iter().enumerate().rev() {
                if !sub.active() {
                    continue;
                }
                let mrows = sub.ce * r;
                let fqv = view(&fq[i * m_full * h2..], mrows, h2, h2);
                let dov = view(&dob[i * m_full * h..], mrows, h, h);
                if sub.nk > 0 {
                    let nk = sub.nk;
                    let s_lo = sub.s_lo(geo);
                    let off = geo.kv_off(b, s_lo, gi);
                    let vv = view(&v[off..], nk, h, gh);
                    let fk_i = &fk[i * sc * h2..][..nk * h2];
                    let fkv = view(fk_i, nk, h2, h2);
                    let pv = view(&p[i * m_full * sc..], mrows, nk, nk);
                    let dfk_i = &mut dfk[..nk * h2];
                    {
                        let mut dfkv = view_mut(dfk_i, nk, h2, h2);
                        gemm(1.0, &pv.t(), &fqv, 0.0, &mut dfkv);
                        if ds_nonzero {
                            gemm(1.0, &vv, &view(ds, h2, h, h).t(), 1.0, &mut dfkv);
                        }
                    }
                    let a_i = &mut a[..mrows * nk];
                    gemm(1.0, &fqv, &fkv.t(), 0.0, &mut view_mut(a_i, mrows, nk, nk));
                    causal_mask(a_i, sub, r);
                    {
                        let dv_i = &mut dx[..nk * h];
                        let mut dvv = view_mut(dv_i, nk, h, h);
                        gemm(1.0, &view(a_i, mrows, nk, nk).t(), &dov, 0.0, &mut dvv);
                        if ds_nonzero {
                            gemm(1.0, &fkv, &view(ds, h2, h, h), 1.0, &mut dvv);
                        }
                        put_rows(&mut out.dv, s_lo, dv_i, h);
                    }
                    let dk_i = &mut dx[..nk * h];
                    phi_vjp_rows(fm, fk_i, dfk_i, dk_i, nk, h);
                    put_rows(&mut out.dk, s_lo, dk_i, h);
                }
                let dsb = if ds_nonzero { 1.0 } else { 0.0 };
                gemm(1.0, &fqv.t(), &dov, dsb, &mut view_mut(ds, h2, h, h));
                ds_nonzero = true;
            }
        }
        // h0 is read by every query and carried into the final state: its cotangent is dS
        // after the first chunk.
        if let Some(dh0) = out.dh0.as_deref_mut() {
            if ds_nonzero {
                dh0.copy_from_slice(ds);
            } else {
                dh0.fill(0.0);
            }
        }
    });
}
