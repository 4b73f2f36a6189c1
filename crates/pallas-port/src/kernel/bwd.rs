//! Backward chunked scan: chunks in reverse carrying dS, sub-chunk states recomputed from the
//! saved chunk state (pass 1, forward order), then key/value gradients (pass 2, reverse order).

use rayon::prelude::*;

use super::feature::{phi_rows, phi_vjp_rows};
use super::fwd::{causal_mask, phi_q, Geo, Sub};
use super::mm::{gemm, view, view_mut};
use crate::config::{RlaConfig, RlaDims};

/// Gradients of one (batch, kv head): dq `[T, R, H]`, dk and dv `[T, H]`.
struct GroupGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
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
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let geo = Geo::new(cfg, d);
    let ss = geo.ss();
    let grads: Vec<GroupGrads> = (0..d.batch * geo.g)
        .into_par_iter()
        .map(|bg| {
            let (b, gi) = (bg / geo.g, bg % geo.g);
            let cs = &chunk_states[bg * geo.nc * ss..(bg + 1) * geo.nc * ss];
            group_backward(cfg, &geo, q, k, v, cs, d_o, b, gi)
        })
        .collect();

    // Scatter into the [B, T, heads, H] layouts.
    let (h, rh) = (geo.h, geo.r * geo.h);
    dq.par_chunks_mut(geo.n * h)
        .enumerate()
        .for_each(|(bt, row)| {
            let (b, t) = (bt / geo.t, bt % geo.t);
            for gi in 0..geo.g {
                let src = &grads[b * geo.g + gi].dq[t * rh..(t + 1) * rh];
                row[gi * rh..(gi + 1) * rh].copy_from_slice(src);
            }
        });
    dk.par_chunks_mut(geo.g * h)
        .zip(dv.par_chunks_mut(geo.g * h))
        .enumerate()
        .for_each(|(bt, (rk, rv))| {
            let (b, t) = (bt / geo.t, bt % geo.t);
            for gi in 0..geo.g {
                let gg = &grads[b * geo.g + gi];
                rk[gi * h..(gi + 1) * h].copy_from_slice(&gg.dk[t * h..(t + 1) * h]);
                rv[gi * h..(gi + 1) * h].copy_from_slice(&gg.dv[t * h..(t + 1) * h]);
            }
        });
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
) -> GroupGrads {
    let (h, r, sc, l) = (geo.h, geo.r, geo.c, geo.l);
    let (ss, gh, h2) = (geo.ss(), geo.g * h, 2 * h);
    let fm = cfg.feature_map;
    let mut out = GroupGrads {
        dq: vec![0.0; geo.t * r * h],
        dk: vec![0.0; geo.t * h],
        dv: vec![0.0; geo.t * h],
    };
    // Per-chunk caches, indexed by sub-chunk i at i·(size for a full sub-chunk).
    let m_full = sc * r;
    let mut fq = vec![0.0f32; l * r * h2]; // φQ     [M, 2H] per sub-chunk
    let mut dob = vec![0.0f32; l * r * h]; // dO     [M, H]
    let mut fk = vec![0.0f32; l * h2]; // φK̃    [nk, 2H]
    let mut p = vec![0.0f32; l * r * sc]; // (dO Ṽᵀ)⊙M [M, nk]
    let mut a = vec![0.0f32; m_full * sc]; // (φQ φK̃ᵀ)⊙M [M, nk]
    let mut dfq = vec![0.0f32; m_full * h2];
    let mut dfk = vec![0.0f32; sc * h2];
    let mut s_ = vec![0.0f32; ss];
    let mut ds = vec![0.0f32; ss];
    let mut ds_nonzero = false;

    for c in (0..geo.nc).rev() {
        let c0 = c * l;
        let rows = l.min(geo.t - c0);
        let n_sub = rows.div_ceil(sc);
        s_.copy_from_slice(&cs[c * ss..(c + 1) * ss]);
        let subs: Vec<Sub> = (0..n_sub).map(|i| Sub::new(geo, c0 + i * sc)).collect();

        // Pass 1 (forward order): dφQ = dO Sᵀ + P φK̃, S advanced sub-chunk by sub-chunk.
        for (i, sub) in subs.iter().enumerate() {
            if !sub.active() {
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
                let sv = view(&s_, h2, h, h);
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
                    gemm(1.0, &fkv.t(), &vv, 1.0, &mut view_mut(&mut s_, h2, h, h));
                }
            }
            // Feature-map VJP into dq rows (t0 + tl, r): contiguous in the [T, R, H] buffer.
            let fq_i = &fq[i * m_full * h2..][..mrows * h2];
            let dq_rows = &mut out.dq[sub.t0 * r * h..][..mrows * h];
            phi_vjp_rows(fm, fq_i, dfq_i, dq_rows, mrows, h);
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
                        gemm(1.0, &vv, &view(&ds, h2, h, h).t(), 1.0, &mut dfkv);
                    }
                }
                let a_i = &mut a[..mrows * nk];
                gemm(1.0, &fqv, &fkv.t(), 0.0, &mut view_mut(a_i, mrows, nk, nk));
                causal_mask(a_i, sub, r);
                {
                    let dv_rows = &mut out.dv[s_lo * h..][..nk * h];
                    let mut dvv = view_mut(dv_rows, nk, h, h);
                    gemm(1.0, &view(a_i, mrows, nk, nk).t(), &dov, 0.0, &mut dvv);
                    if ds_nonzero {
                        gemm(1.0, &fkv, &view(&ds, h2, h, h), 1.0, &mut dvv);
                    }
                }
                let dk_rows = &mut out.dk[s_lo * h..][..nk * h];
                phi_vjp_rows(fm, fk_i, dfk_i, dk_rows, nk, h);
            }
            gemm(1.0, &fqv.t(), &dov, 1.0, &mut view_mut(&mut ds, h2, h, h));
            ds_nonzero = true;
        }
    }
    out
}
