//! The stack: embedding, pre-norm blocks of [local, local, local, global] attention and a gated FFN,
//! the final norm, the LM head and the loss — one traced graph.

use crate::config::{FeatureMapKind, LayerKind, LocalKind, ModelConfig, RlaLowering};
use crate::layers::{causal_attention, cross_entropy, dims, ffn, linear, one_hot, rms_norm, rope};
use hlo_builder::{Builder, DotDims, ElementType, Op, Result};
use std::collections::HashMap;

/// Named parameter handles (the leaves of the parameter tree as graph values).
pub type ParamOps = HashMap<String, Op>;

/// A model-level error in the builder's error type.
pub fn model_error(message: String) -> hlo_builder::Error {
    hlo_builder::Error::Invalid {
        op: "model",
        message,
        location: String::new(),
        scope: String::new(),
    }
}

fn param(p: &ParamOps, name: &str) -> Result<Op> {
    p.get(name)
        .copied()
        .ok_or_else(|| model_error(format!("parameter {name:?} is missing")))
}

/// The RLA block configuration of local layers.
pub fn rla_config(cfg: &ModelConfig) -> pallas_port::RlaConfig {
    pallas_port::RlaConfig {
        window: cfg.window,
        sub_chunk: cfg.rla.sub_chunk,
        chunk: cfg.rla.chunk,
        feature_map: match cfg.rla.feature_map {
            FeatureMapKind::Softmax => pallas_port::FeatureMap::Softmax,
            FeatureMapKind::Relu => pallas_port::FeatureMap::Relu,
        },
    }
}

/// The lowering chosen for the RLA blocks.
pub fn rla_lowering(cfg: &ModelConfig) -> pallas_port::Lowering {
    match cfg.rla.lowering {
        RlaLowering::Auto => pallas_port::Lowering::Auto,
        RlaLowering::CustomCall => pallas_port::Lowering::CustomCall,
        RlaLowering::Hlo => pallas_port::Lowering::Hlo,
    }
}

/// What a local layer's attention returns besides its output (used by tests and dumps).
pub struct AttnParts {
    /// Context before the output projection `[B,T,N,H]`.
    pub ctx: Op,
    /// Projected q, k, v before any norm or rotation.
    pub qkv: (Op, Op, Op),
}

/// The attention core of one layer from projected `q [B,T,N,H]`, `k, v [B,T,G,H]`: SWA (+ RLA and the
/// mixing) for local layers, full causal attention without RoPE for global ones.
pub fn attention_core(
    b: &Builder,
    cfg: &ModelConfig,
    p: &ParamOps,
    prefix: &str,
    kind: LayerKind,
    (q, k, v): (Op, Op, Op),
    pos: Op,
) -> Result<Op> {
    let h = cfg.head_dim as f32;
    let (mut qn, mut kn) = (q, k);
    if cfg.qk_norm {
        qn = rms_norm(
            b,
            q,
            param(p, &format!("{prefix}.q_norm.scale"))?,
            cfg.norm_eps,
        )?;
        kn = rms_norm(
            b,
            k,
            param(p, &format!("{prefix}.k_norm.scale"))?,
            cfg.norm_eps,
        )?;
    }
    let inv_sqrt_h = b.scalar(1.0 / h.sqrt())?;
    match kind {
        LayerKind::Global => {
            let _s = b.name_scope("global");
            causal_attention(b, b.mul(qn, inv_sqrt_h)?, kn, v, None)
        }
        LayerKind::Local => {
            let _s = b.name_scope("local");
            let swa = {
                let _s = b.name_scope("swa");
                let qr = b.mul(rope(b, qn, pos, cfg.rope_theta)?, inv_sqrt_h)?;
                let kr = rope(b, kn, pos, cfg.rope_theta)?;
                causal_attention(b, qr, kr, v, Some(cfg.window))?
            };
            if cfg.local_kind == LocalKind::Swa {
                return Ok(swa);
            }
            let rla = {
                let _s = b.name_scope("rla");
                pallas_port::rla(b, q, k, v, &rla_config(cfg), rla_lowering(cfg))?
            };
            let _s = b.name_scope("mix");
            let a = rms_norm(b, swa, param(p, &format!("{prefix}.swa_norm.scale"))?, 1e-8)?;
            let c = rms_norm(b, rla, param(p, &format!("{prefix}.rla_norm.scale"))?, 1e-8)?;
            b.add(a, c)
        }
    }
}

/// Logits `[B, T, vocab]` (f32) for `tokens [B, T]` (s32).
pub fn forward(b: &Builder, cfg: &ModelConfig, p: &ParamOps, tokens: Op) -> Result<Op> {
    let td = dims(b, tokens)?;
    let (bs, t) = (td[0], td[1]);
    let (n, g, h, d) = (
        cfg.heads as i64,
        cfg.kv_heads as i64,
        cfg.head_dim as i64,
        cfg.d_model as i64,
    );
    let embed = param(p, "embed")?;
    let mut x = {
        let _s = b.name_scope("embed");
        linear(
            b,
            one_hot(b, tokens, cfg.vocab as i64)?,
            embed,
            crate::config::Dtype::F32,
        )?
    };
    let pos = b.iota(ElementType::F32, &[t], 0)?;
    let kinds = cfg.layer_kinds().map_err(|e| model_error(e.to_string()))?;
    for (i, kind) in kinds.into_iter().enumerate() {
        let _s = b.name_scope(&format!("layer_{i}"));
        let pre = format!("layers.{i}");
        let xn = rms_norm(
            b,
            x,
            param(p, &format!("{pre}.attn_norm.scale"))?,
            cfg.norm_eps,
        )?;
        let ap = format!("{pre}.attn");
        let q = b.reshape(
            linear(b, xn, param(p, &format!("{ap}.wq"))?, cfg.dtype)?,
            &[bs, t, n, h],
        )?;
        let k = b.reshape(
            linear(b, xn, param(p, &format!("{ap}.wk"))?, cfg.dtype)?,
            &[bs, t, g, h],
        )?;
        let v = b.reshape(
            linear(b, xn, param(p, &format!("{ap}.wv"))?, cfg.dtype)?,
            &[bs, t, g, h],
        )?;
        let ctx = attention_core(b, cfg, p, &ap, kind, (q, k, v), pos)?;
        let o = linear(
            b,
            b.reshape(ctx, &[bs, t, n * h])?,
            param(p, &format!("{ap}.wo"))?,
            cfg.dtype,
        )?;
        x = b.add(x, o)?;
        let _f = b.name_scope("ffn");
        let xn = rms_norm(
            b,
            x,
            param(p, &format!("{pre}.ffn_norm.scale"))?,
            cfg.norm_eps,
        )?;
        let f = ffn(
            b,
            xn,
            param(p, &format!("{pre}.ffn.w_gate"))?,
            param(p, &format!("{pre}.ffn.w_up"))?,
            param(p, &format!("{pre}.ffn.w_down"))?,
            cfg.ffn_activation,
            cfg.dtype,
        )?;
        x = b.add(x, f)?;
    }
    let _s = b.name_scope("head");
    let xn = rms_norm(b, x, param(p, "final_norm.scale")?, cfg.norm_eps)?;
    if cfg.tied_embeddings {
        let dd = DotDims {
            lhs_contracting: vec![2],
            rhs_contracting: vec![1],
            ..Default::default()
        };
        b.dot_general(xn, embed, &dd, None, None)
    } else {
        let _ = d;
        linear(b, xn, param(p, "lm_head")?, cfg.dtype)
    }
}

/// Parameters of the graph in [`crate::param_specs`] order, as f32 parameters of `b`.
pub fn declare_params(b: &Builder, cfg: &ModelConfig) -> Result<(Vec<Op>, ParamOps)> {
    let mut ops = Vec::new();
    let mut map = HashMap::new();
    for spec in crate::param_specs(cfg) {
        let dims: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
        let op = b.parameter(
            hlo_builder::Shape::array(ElementType::F32, &dims),
            &spec.name,
        )?;
        ops.push(op);
        map.insert(spec.name, op);
    }
    Ok((ops, map))
}

/// Mean next-token loss of `tokens [B, T+1]`: inputs are the first T, targets the last T, all weighted 1.
pub fn loss(b: &Builder, cfg: &ModelConfig, p: &ParamOps, tokens: Op) -> Result<Op> {
    let td = dims(b, tokens)?;
    let inputs = b.slice_in_dim(tokens, 0, td[1] - 1, 1)?;
    let targets = b.slice_in_dim(tokens, 1, td[1], 1)?;
    let logits = forward(b, cfg, p, inputs)?;
    let mask = b.full(ElementType::F32, 1.0, &[td[0], td[1] - 1])?;
    cross_entropy(b, logits, targets, mask)
}
