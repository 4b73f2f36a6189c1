//! f64 reference implementations of RLA, written directly from the formulas (DESIGN §2) and
//! independent of the chunked kernels.
//!
//! All functions take flat row-major `f64` slices in the block layouts (`q` `[B,T,N,H]`, `k`, `v`
//! `[B,T,G,H]`) plus [`RlaDims`], and return flat `Vec<f64>` in the block output layouts. Use
//! [`to_f64`] to widen f32 inputs.

use crate::config::{check_len, FeatureMap, RlaConfig, RlaDims, RlaError};

/// Widens an f32 slice to f64.
pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// φ(x) in f64: `[softmax(x), softmax(−x)]` (max-subtracted) or `[relu(x), relu(−x)]`; length 2H.
///
/// The reference for the graph φ, [`crate::feature_map`].
pub fn feature(x: &[f64], fm: FeatureMap) -> Vec<f64> {
    let h = x.len();
    let mut out = vec![0.0; 2 * h];
    match fm {
        FeatureMap::Softmax => {
            for (sign, half) in [(1.0, 0usize), (-1.0, 1usize)] {
                let m = x
                    .iter()
                    .map(|&v| sign * v)
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = x.iter().map(|&v| (sign * v - m).exp()).collect();
                let s: f64 = e.iter().sum();
                for i in 0..h {
                    out[half * h + i] = e[i] / s;
                }
            }
        }
        FeatureMap::Relu => {
            for i in 0..h {
                out[i] = x[i].max(0.0);
                out[h + i] = (-x[i]).max(0.0);
            }
        }
    }
    out
}

/// VJP of φ at `x`: given dy (length 2H) returns dx (length H).
pub fn feature_vjp(x: &[f64], dy: &[f64], fm: FeatureMap) -> Vec<f64> {
    let h = x.len();
    let y = feature(x, fm);
    let mut dx = vec![0.0; h];
    match fm {
        FeatureMap::Softmax => {
            for (sign, half) in [(1.0, 0usize), (-1.0, 1usize)] {
                let ys = &y[half * h..(half + 1) * h];
                let dys = &dy[half * h..(half + 1) * h];
                let dot: f64 = ys.iter().zip(dys).map(|(a, b)| a * b).sum();
                for i in 0..h {
                    dx[i] += sign * ys[i] * (dys[i] - dot);
                }
            }
        }
        FeatureMap::Relu => {
            for i in 0..h {
                if x[i] > 0.0 {
                    dx[i] += dy[i];
                }
                if x[i] < 0.0 {
                    dx[i] -= dy[h + i];
                }
            }
        }
    }
    dx
}

fn check_inputs(
    op: &'static str,
    d: &RlaDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Result<(), RlaError> {
    d.check(op)?;
    check_len(op, "q", q.len(), &d.q_shape(), d)?;
    check_len(op, "k", k.len(), &d.kv_shape(), d)?;
    check_len(op, "v", v.len(), &d.kv_shape(), d)?;
    Ok(())
}

/// Features of every row: `x` is `[B,T,heads,H]`, the result `[B,T,heads,2H]`.
fn features(fm: FeatureMap, x: &[f64], h: usize) -> Vec<f64> {
    x.chunks(h).flat_map(|row| feature(row, fm)).collect()
}

/// O(T²) RLA output: `o_t = Σ_{s ≤ t−W−1} ⟨φ(q_t), φ(k_s)⟩ v_s`, returned as `[B,T,N,H]`.
///
/// Only `cfg.window` and `cfg.feature_map` are used.
pub fn rla_naive_f64(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Result<Vec<f64>, RlaError> {
    check_inputs("rla_naive_f64", d, q, k, v)?;
    let (b_, t_, n_, g_, h) = (d.batch, d.seq, d.heads, d.kv_heads, d.head_dim);
    let r = d.group_size();
    let fq = features(cfg.feature_map, q, h);
    let fk = features(cfg.feature_map, k, h);
    let mut o = vec![0.0; d.q_len()];
    for b in 0..b_ {
        for t in 0..t_ {
            for n in 0..n_ {
                let g = n / r;
                let qi = ((b * t_ + t) * n_ + n) * 2 * h;
                let oi = ((b * t_ + t) * n_ + n) * h;
                // s <= t - W - 1  <=>  s + W + 1 <= t
                for s in 0..t_ {
                    if s + cfg.window + 1 > t {
                        break;
                    }
                    let ki = ((b * t_ + s) * g_ + g) * 2 * h;
                    let vi = ((b * t_ + s) * g_ + g) * h;
                    let a: f64 = (0..2 * h).map(|i| fq[qi + i] * fk[ki + i]).sum();
                    for i in 0..h {
                        o[oi + i] += a * v[vi + i];
                    }
                }
            }
        }
    }
    Ok(o)
}

/// Output of [`rla_scan_f64`].
#[derive(Debug, Clone)]
pub struct ScanOutput {
    /// `[B,T,N,H]`.
    pub o: Vec<f64>,
    /// `[B,G,2H,H]`: Σ_{s ≤ T−W−2} φ(k_s)ᵀ v_s.
    pub final_state: Vec<f64>,
    /// `[B,G,n_chunks,2H,H]`: the state entering chunk c of `cfg.chunk` tokens,
    /// Σ_{s ≤ c·chunk−W−2} φ(k_s)ᵀ v_s (the final state of the first c·chunk tokens).
    pub chunk_states: Vec<f64>,
}

/// Token-by-token scan (as in decode): at step t absorb key t−W−1 into S, then `o_t = φ(q_t)·S`.
/// Before absorbing at step `c·chunk` the state is recorded as `chunk_states[.., c, ..]`.
pub fn rla_scan_f64(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Result<ScanOutput, RlaError> {
    check_inputs("rla_scan_f64", d, q, k, v)?;
    if cfg.chunk == 0 {
        return Err(RlaError::Config {
            op: "rla_scan_f64",
            message: "chunk must be > 0".into(),
        });
    }
    let (b_, t_, n_, g_, h) = (d.batch, d.seq, d.heads, d.kv_heads, d.head_dim);
    let r = d.group_size();
    let nc = d.n_chunks(cfg);
    let ss = 2 * h * h;
    let mut o = vec![0.0; d.q_len()];
    let mut final_state = vec![0.0; b_ * g_ * ss];
    let mut chunk_states = vec![0.0; b_ * g_ * nc * ss];
    for b in 0..b_ {
        for g in 0..g_ {
            let mut s_ = vec![0.0; ss];
            for t in 0..t_ {
                // The state entering chunk c is the state after token c·chunk − 1 (= the final
                // state of the prefix of c·chunk tokens), i.e. before absorbing at t = c·chunk.
                if t % cfg.chunk == 0 {
                    let ci = ((b * g_ + g) * nc + t / cfg.chunk) * ss;
                    chunk_states[ci..ci + ss].copy_from_slice(&s_);
                }
                // Absorb key s = t - W - 1 (if it exists) before reading at t.
                if t > cfg.window {
                    let s = t - cfg.window - 1;
                    let ki = ((b * t_ + s) * g_ + g) * h;
                    let fk = feature(&k[ki..ki + h], cfg.feature_map);
                    for a in 0..2 * h {
                        for c in 0..h {
                            s_[a * h + c] += fk[a] * v[ki + c];
                        }
                    }
                }
                for n in g * r..(g + 1) * r {
                    let qi = ((b * t_ + t) * n_ + n) * h;
                    let fq = feature(&q[qi..qi + h], cfg.feature_map);
                    for a in 0..2 * h {
                        for c in 0..h {
                            o[qi + c] += fq[a] * s_[a * h + c];
                        }
                    }
                }
            }
            let fi = (b * g_ + g) * ss;
            final_state[fi..fi + ss].copy_from_slice(&s_);
        }
    }
    Ok(ScanOutput {
        o,
        final_state,
        chunk_states,
    })
}

/// Gradients of [`rla_scan_f64`]/[`rla_naive_f64`]'s `o`.
#[derive(Debug, Clone)]
pub struct Grads {
    /// `[B,T,N,H]`.
    pub dq: Vec<f64>,
    /// `[B,T,G,H]`.
    pub dk: Vec<f64>,
    /// `[B,T,G,H]`.
    pub dv: Vec<f64>,
}

/// VJP of `o` (the naive formula) for cotangent `d_o` `[B,T,N,H]`, O(T²):
/// with `a_ts = ⟨φq_t, φk_s⟩` for `s ≤ t−W−1`: `dv_s = Σ_t a_ts do_t`,
/// `dφq_t = Σ_s ⟨do_t, v_s⟩ φk_s`, `dφk_s = Σ_t ⟨do_t, v_s⟩ φq_t`, then φ's VJP;
/// dk, dv sum over the query heads of each group.
pub fn rla_vjp_f64(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
) -> Result<Grads, RlaError> {
    check_inputs("rla_vjp_f64", d, q, k, v)?;
    check_len("rla_vjp_f64", "d_o", d_o.len(), &d.q_shape(), d)?;
    let (b_, t_, n_, g_, h) = (d.batch, d.seq, d.heads, d.kv_heads, d.head_dim);
    let r = d.group_size();
    let fq = features(cfg.feature_map, q, h);
    let fk = features(cfg.feature_map, k, h);
    let mut dfq = vec![0.0; fq.len()];
    let mut dfk = vec![0.0; fk.len()];
    let mut dv = vec![0.0; d.kv_len()];
    for b in 0..b_ {
        for t in 0..t_ {
            for n in 0..n_ {
                let g = n / r;
                let row = (b * t_ + t) * n_ + n;
                for s in 0..t_ {
                    if s + cfg.window + 1 > t {
                        break;
                    }
                    let krow = (b * t_ + s) * g_ + g;
                    let a: f64 = (0..2 * h)
                        .map(|i| fq[row * 2 * h + i] * fk[krow * 2 * h + i])
                        .sum();
                    let dov: f64 = (0..h).map(|i| d_o[row * h + i] * v[krow * h + i]).sum();
                    for i in 0..h {
                        dv[krow * h + i] += a * d_o[row * h + i];
                    }
                    for i in 0..2 * h {
                        dfq[row * 2 * h + i] += dov * fk[krow * 2 * h + i];
                        dfk[krow * 2 * h + i] += dov * fq[row * 2 * h + i];
                    }
                }
            }
        }
    }
    let vjp = |x: &[f64], dy: &[f64]| -> Vec<f64> {
        x.chunks(h)
            .zip(dy.chunks(2 * h))
            .flat_map(|(xr, dyr)| feature_vjp(xr, dyr, cfg.feature_map))
            .collect()
    };
    Ok(Grads {
        dq: vjp(q, &dfq),
        dk: vjp(k, &dfk),
        dv,
    })
}
