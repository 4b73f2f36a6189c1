//! The state a run of keys and values adds to RLA's scan, `S = Σ_s φ(k_s)ᵀ v_s` per (batch,
//! kv head), and its VJP: what one sequence shard contributes to the prefix state of the
//! shards after it ([`crate::rla_seq_shard`]). Parallel over (batch, kv head); the keys in
//! blocks of [`ROWS`] rows, φ computed per block into small scratch.

use rayon::prelude::*;

use super::bwd::group_rows;
use super::feature::{phi_rows, phi_vjp_rows};
use super::mm::{gemm, view, view_mut};
use super::{split_scratch, with_scratch, Heads};
use crate::config::{check_len, FeatureMap, RlaDims, RlaError};

/// Keys per GEMM block.
const ROWS: usize = 128;

/// Checks the dims and the lengths of k, v `[B,T,G,H]` and a state `[B,G,2H,H]` named `state`.
fn check(
    op: &'static str,
    d: &RlaDims,
    (k, v): (&[f32], &[f32]),
    (state, len): (&'static str, usize),
) -> Result<(), RlaError> {
    d.check(op)?;
    check_len(op, "k", k.len(), &d.kv_shape(), d)?;
    check_len(op, "v", v.len(), &d.kv_shape(), d)?;
    check_len(op, state, len, &d.final_state_shape(), d)
}

/// `state[b, g] = Σ_s φ(k[b, s, g])ᵀ v[b, s, g]` over all T keys: k, v `[B,T,G,H]`, state
/// `[B,G,2H,H]` (`d.heads` is not read). Every output element is written.
pub fn rla_kv_state(
    fm: FeatureMap,
    d: &RlaDims,
    k: &[f32],
    v: &[f32],
    state: &mut [f32],
) -> Result<(), RlaError> {
    check("rla_kv_state", d, (k, v), ("state", state.len()))?;
    let geo = Heads::new(d);
    let (h, gh, h2) = (geo.h, geo.g * geo.h, 2 * geo.h);
    state
        .par_chunks_mut(h2 * h)
        .enumerate()
        .for_each(|(bg, st)| {
            let (b, gi) = (bg / geo.g, bg % geo.g);
            st.fill(0.0);
            with_scratch(ROWS * h2, |fk| {
                for s0 in (0..geo.t).step_by(ROWS) {
                    let nk = ROWS.min(geo.t - s0);
                    let off = geo.kv_off(b, s0, gi);
                    phi_rows(fm, &k[off..], gh, nk, h, fk);
                    let fkv = view(fk, nk, h2, h2);
                    let vv = view(&v[off..], nk, h, gh);
                    gemm(1.0, &fkv.t(), &vv, 1.0, &mut view_mut(st, h2, h, h));
                }
            });
        });
    Ok(())
}

/// The VJP of [`rla_kv_state`] for the cotangent `d_state` `[B,G,2H,H]`: `dv_s = φ(k_s)·dS`,
/// `dk_s = φ'(k_s)ᵀ (v_s dSᵀ)`. Every output element is written.
pub fn rla_kv_state_bwd(
    fm: FeatureMap,
    d: &RlaDims,
    k: &[f32],
    v: &[f32],
    d_state: &[f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<(), RlaError> {
    const OP: &str = "rla_kv_state_bwd";
    check(OP, d, (k, v), ("d_state", d_state.len()))?;
    check_len(OP, "dk", dk.len(), &d.kv_shape(), d)?;
    check_len(OP, "dv", dv.len(), &d.kv_shape(), d)?;
    let geo = Heads::new(d);
    let (h, gh, h2) = (geo.h, geo.g * geo.h, 2 * geo.h);
    let dk_rows = group_rows(dk, &geo, d.batch, h);
    let dv_rows = group_rows(dv, &geo, d.batch, h);
    dk_rows
        .into_par_iter()
        .zip(dv_rows)
        .enumerate()
        .for_each(|(bg, (mut dkr, mut dvr))| {
            let (b, gi) = (bg / geo.g, bg % geo.g);
            let ds = view(&d_state[bg * h2 * h..], h2, h, h);
            with_scratch(ROWS * (2 * h2 + h), |buf| {
                let [fk, dfk, dx] = split_scratch(buf, [ROWS * h2, ROWS * h2, ROWS * h]);
                for s0 in (0..geo.t).step_by(ROWS) {
                    let nk = ROWS.min(geo.t - s0);
                    let off = geo.kv_off(b, s0, gi);
                    phi_rows(fm, &k[off..], gh, nk, h, fk);
                    let vv = view(&v[off..], nk, h, gh);
                    gemm(1.0, &vv, &ds.t(), 0.0, &mut view_mut(dfk, nk, h2, h2));
                    let dvb = &mut dx[..nk * h];
                    gemm(
                        1.0,
                        &view(fk, nk, h2, h2),
                        &ds,
                        0.0,
                        &mut view_mut(dvb, nk, h, h),
                    );
                    for (row, src) in dvr[s0..s0 + nk].iter_mut().zip(dvb.chunks_exact(h)) {
                        row.copy_from_slice(src);
                    }
                    let dkb = &mut dx[..nk * h];
                    phi_vjp_rows(fm, fk, dfk, dkb, nk, h);
                    for (row, src) in dkr[s0..s0 + nk].iter_mut().zip(dkb.chunks_exact(h)) {
                        row.copy_from_slice(src);
                    }
                }
            });
        });
    Ok(())
}
