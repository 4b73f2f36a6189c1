//! An independent f64 reference of the model, written straight from DESIGN §2 with naive loops.
//!
//! Nothing here shares code with the traced graph: it exists so tests can compare the graph (and
//! the RLA kernels) against the math. φ is pallas-port's f64 reference
//! ([`pallas_port::reference::feature`]). Tensors are flat row-major `Vec<f64>` with explicit dims.

use crate::config::{FeatureMap, FfnActivation};
use crate::model::{Attention, Model};
use pallas_port::reference::feature;
use std::collections::HashMap;

/// Interleaved RoPE at position `pos`: dims (2i, 2i+1) rotate by pos · θ^(−2i/H).
pub fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let h = x.len();
    for i in 0..h / 2 {
        let freq = theta.powf(-((2 * i) as f64) / h as f64);
        let (s, c) = (pos as f64 * freq).sin_cos();
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * c - b * s;
        x[2 * i + 1] = a * s + b * c;
    }
}

/// Per-head RMSNorm over the last `h` values with a per-(head, dim) scale (`scale` has n·h values).
pub fn group_rms_norm(x: &[f64], n: usize, h: usize, scale: &[f64], eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for (row, o) in x
        .chunks(h)
        .zip(out.chunks_mut(h))
        .enumerate()
        .map(|(i, (r, o))| ((i, r), o))
    {
        let (i, r) = row;
        let head = i % n;
        let ms = r.iter().map(|v| v * v).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for d in 0..h {
            o[d] = r[d] * inv * scale[head * h + d];
        }
    }
    out
}

/// Dims of one attention problem: q `[B,T,N,H]`, k/v `[B,T,G,H]`.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    /// Batch.
    pub b: usize,
    /// Tokens.
    pub t: usize,
    /// Query heads.
    pub n: usize,
    /// KV heads.
    pub g: usize,
    /// Head dim.
    pub h: usize,
}

impl AttnDims {
    fn q(&self, b: usize, t: usize, n: usize) -> usize {
        ((b * self.t + t) * self.n + n) * self.h
    }
    fn kv(&self, b: usize, t: usize, g: usize) -> usize {
        ((b * self.t + t) * self.g + g) * self.h
    }
}

/// Softmax attention where key s is visible to query t iff `visible(t, s)`; RoPE at true positions if
/// `theta` is given; q scaled by H^−1/2. Returns `[B,T,N,H]`.
pub fn attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d: AttnDims,
    theta: Option<f64>,
    visible: impl Fn(usize, usize) -> bool,
) -> Vec<f64> {
    let mut out = vec![0.0; d.b * d.t * d.n * d.h];
    let rep = d.n / d.g;
    let rot = |x: &[f64], pos: usize| {
        let mut x = x.to_vec();
        if let Some(th) = theta {
            rope(&mut x, pos, th);
        }
        x
    };
    for b in 0..d.b {
        for n in 0..d.n {
            let g = n / rep;
            let keys: Vec<Vec<f64>> = (0..d.t)
                .map(|s| rot(&k[d.kv(b, s, g)..][..d.h], s))
                .collect();
            for t in 0..d.t {
                let qt = rot(&q[d.q(b, t, n)..][..d.h], t);
                let scale = 1.0 / (d.h as f64).sqrt();
                let scores: Vec<(usize, f64)> = (0..d.t)
                    .filter(|&s| visible(t, s))
                    .map(|s| {
                        (
                            s,
                            scale * qt.iter().zip(&keys[s]).map(|(a, b)| a * b).sum::<f64>(),
                        )
                    })
                    .collect();
                let m = scores.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x.1 - m).exp()).sum();
                let o = &mut out[d.q(b, t, n)..][..d.h];
                for &(s, sc) in &scores {
                    let p = (sc - m).exp() / z;
                    for (oi, vi) in o.iter_mut().zip(&v[d.kv(b, s, g)..][..d.h]) {
                        *oi += p * vi;
                    }
                }
            }
        }
    }
    out
}

/// Sliding-window attention: keys t − W ≤ s ≤ t.
pub fn swa(q: &[f64], k: &[f64], v: &[f64], d: AttnDims, w: usize, theta: f64) -> Vec<f64> {
    attention(q, k, v, d, Some(theta), |t, s| s <= t && t - s <= w)
}

/// Residual linear attention, naive O(T²): o_t = Σ_{s ≤ t−W−1} ⟨φ(q_t), φ(k_s)⟩ v_s (raw q, k).
pub fn rla(q: &[f64], k: &[f64], v: &[f64], d: AttnDims, w: usize, fm: FeatureMap) -> Vec<f64> {
    let mut out = vec![0.0; d.b * d.t * d.n * d.h];
    let rep = d.n / d.g;
    for b in 0..d.b {
        for n in 0..d.n {
            let g = n / rep;
            let fk: Vec<Vec<f64>> = (0..d.t)
                .map(|s| feature(&k[d.kv(b, s, g)..][..d.h], fm))
                .collect();
            for t in 0..d.t {
                let fq = feature(&q[d.q(b, t, n)..][..d.h], fm);
                let o = &mut out[d.q(b, t, n)..][..d.h];
                for s in 0..(t + 1).saturating_sub(w + 1) {
                    let a: f64 = fq.iter().zip(&fk[s]).map(|(x, y)| x * y).sum();
                    for (oi, vi) in o.iter_mut().zip(&v[d.kv(b, s, g)..][..d.h]) {
                        *oi += a * vi;
                    }
                }
            }
        }
    }
    out
}

/// Outputs of one local layer's attention core (before the output projection).
pub struct LocalOut {
    /// SWA branch, before its norm.
    pub swa: Vec<f64>,
    /// RLA branch, before its norm.
    pub rla: Vec<f64>,
    /// GroupRMSNorm_swa(swa) + GroupRMSNorm_rla(rla).
    pub mixed: Vec<f64>,
}

/// One RAttention local layer from projected q, k, v with unit norm scales (AXLearn's defaults).
pub fn local_layer(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d: AttnDims,
    w: usize,
    theta: f64,
    fm: FeatureMap,
) -> LocalOut {
    let swa_o = swa(q, k, v, d, w, theta);
    let rla_o = rla(q, k, v, d, w, fm);
    let ones = vec![1.0; d.n * d.h];
    let a = group_rms_norm(&swa_o, d.n, d.h, &ones, 1e-8);
    let b = group_rms_norm(&rla_o, d.n, d.h, &ones, 1e-8);
    LocalOut {
        mixed: a.iter().zip(&b).map(|(x, y)| x + y).collect(),
        swa: swa_o,
        rla: rla_o,
    }
}

fn matmul(x: &[f64], rows: usize, w: &[f64], k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * n];
    for r in 0..rows {
        for i in 0..k {
            let a = x[r * k + i];
            if a != 0.0 {
                for j in 0..n {
                    out[r * n + j] += a * w[i * n + j];
                }
            }
        }
    }
    out
}

fn rms_norm(x: &[f64], width: usize, scale: &[f64], eps: f64) -> Vec<f64> {
    group_rms_norm(x, 1, width, scale, eps)
}

/// Logits `[B, T, vocab]` of the whole model for `tokens` `[B, T]`, from named f32 parameters.
pub fn logits(
    model: &Model,
    params: &HashMap<String, Vec<f32>>,
    tokens: &[u32],
    batch: usize,
) -> Vec<f64> {
    let p = |name: &str| -> Vec<f64> {
        params
            .get(name)
            .unwrap_or_else(|| panic!("missing parameter {name}"))
            .iter()
            .map(|&x| x as f64)
            .collect()
    };
    let cfg = model.config();
    let (t, dm, h) = (tokens.len() / batch, cfg.d_model, cfg.head_dim);
    let rows = batch * t;
    let emb = p("embed");
    let mut x: Vec<f64> = tokens
        .iter()
        .flat_map(|&tok| emb[tok as usize * dm..][..dm].to_vec())
        .collect();
    let d = AttnDims {
        b: batch,
        t,
        n: cfg.heads,
        g: cfg.kv_heads,
        h,
    };
    let fm = cfg.rla.feature_map;
    for (i, &attn) in model.layers().iter().enumerate() {
        let pre = format!("layers.{i}");
        let xn = rms_norm(&x, dm, &p(&format!("{pre}.attn_norm.scale")), cfg.norm_eps);
        let mut q = matmul(&xn, rows, &p(&format!("{pre}.attn.wq")), dm, cfg.q_dim());
        let mut k = matmul(&xn, rows, &p(&format!("{pre}.attn.wk")), dm, cfg.kv_dim());
        let v = matmul(&xn, rows, &p(&format!("{pre}.attn.wv")), dm, cfg.kv_dim());
        let (raw_q, raw_k) = (q.clone(), k.clone());
        if cfg.qk_norm {
            q = group_rms_norm(
                &q,
                1,
                h,
                &p(&format!("{pre}.attn.q_norm.scale")),
                cfg.norm_eps,
            );
            k = group_rms_norm(
                &k,
                1,
                h,
                &p(&format!("{pre}.attn.k_norm.scale")),
                cfg.norm_eps,
            );
        }
        let ctx = match attn {
            Attention::Global => {
                let theta = cfg.global_rope.then_some(cfg.rope_theta);
                attention(&q, &k, &v, d, theta, |t, s| s <= t)
            }
            Attention::Swa => swa(&q, &k, &v, d, cfg.window, cfg.rope_theta),
            Attention::Rattention => {
                let s = swa(&q, &k, &v, d, cfg.window, cfg.rope_theta);
                let r = rla(&raw_q, &raw_k, &v, d, cfg.window, fm);
                let a = group_rms_norm(&s, d.n, h, &p(&format!("{pre}.attn.swa_norm.scale")), 1e-8);
                let b = if cfg.rla.norm {
                    group_rms_norm(&r, d.n, h, &p(&format!("{pre}.attn.rla_norm.scale")), 1e-8)
                } else {
                    r
                };
                a.iter().zip(&b).map(|(x, y)| x + y).collect()
            }
        };
        let o = matmul(&ctx, rows, &p(&format!("{pre}.attn.wo")), cfg.q_dim(), dm);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let xn = rms_norm(&x, dm, &p(&format!("{pre}.ffn_norm.scale")), cfg.norm_eps);
        let gate = matmul(&xn, rows, &p(&format!("{pre}.ffn.w_gate")), dm, cfg.ffn_dim);
        let up = matmul(&xn, rows, &p(&format!("{pre}.ffn.w_up")), dm, cfg.ffn_dim);
        let act: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let a = match cfg.ffn_activation {
                    FfnActivation::Swiglu => g / (1.0 + (-g).exp()),
                    FfnActivation::Geglu => {
                        0.5 * g
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (g + 0.044715 * g * g * g))
                                    .tanh())
                    }
                };
                a * u
            })
            .collect();
        let f = matmul(
            &act,
            rows,
            &p(&format!("{pre}.ffn.w_down")),
            cfg.ffn_dim,
            dm,
        );
        x.iter_mut().zip(&f).for_each(|(a, b)| *a += b);
    }
    let xn = rms_norm(&x, dm, &p("final_norm.scale"), cfg.norm_eps);
    if cfg.tied_embeddings {
        // logits = xn · embedᵀ
        let mut out = vec![0.0; rows * cfg.vocab];
        for r in 0..rows {
            for vtok in 0..cfg.vocab {
                out[r * cfg.vocab + vtok] =
                    (0..dm).map(|i| xn[r * dm + i] * emb[vtok * dm + i]).sum();
            }
        }
        out
    } else {
        matmul(&xn, rows, &p("lm_head"), dm, cfg.vocab)
    }
}
