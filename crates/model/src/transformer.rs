//! The stack: embedding, pre-norm blocks of [local, local, local, global] attention and a gated FFN,
//! the final norm, the LM head and the loss — one traced graph, as methods of [`Model`].

use crate::config::{AttentionLowering, KernelLowering};
use crate::layers::{causal_attention, cross_entropy, dims, ffn, linear, rms_norm, rope};
use crate::model::{Attention, Model, Remat, RowKernel};
use crate::params::LogicalAxis;
use crate::params::LogicalAxis::{ActivationEmbed, Batch, HeadDim, KvHeads, Length, QHeads, Vocab};
use hlo_builder::autodiff::BlockFn;
use hlo_builder::{Builder, DotDims, ElementType, Op, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// Named parameter handles (the leaves of the parameter tree as graph values).
pub type ParamOps = HashMap<String, Op>;

/// The handle of parameter `name`; an error naming it (and the model code that asked) when the
/// map lacks it.
#[track_caller]
pub(crate) fn param(p: &ParamOps, name: &str) -> Result<Op> {
    match p.get(name) {
        Some(&op) => Ok(op),
        None => Err(hlo_builder::Error::invalid(
            "model",
            format!("parameter {name:?} is missing"),
        )),
    }
}

/// RMS normalisation of `x` by `scale` ([`rms_norm`]'s formula): our CPU kernel pair
/// ([`pallas_port::rms_norm::rms_norm_kernel`]) when `kernel` and `x` is f32, else the HLO.
pub fn rms_norm_with(b: &Builder, x: Op, scale: Op, eps: f64, kernel: bool) -> Result<Op> {
    if kernel && b.shape(x)?.ty() == Some(ElementType::F32) {
        pallas_port::rms_norm::rms_norm_kernel(b, x, scale, eps)
    } else {
        rms_norm(b, x, scale, eps)
    }
}

/// The mixing of a RAttention layer: `GroupRMSNorm_swa(swa) + GroupRMSNorm_rla(rla)` over
/// `[..., N, H]` contexts; with `rla_norm` false (the `rla.norm = false` ablation) the RLA
/// branch enters unnormalised: `GroupRMSNorm_swa(swa) + rla`. `kernel_norm`: the norms as our
/// CPU kernels ([`rms_norm_with`]).
pub fn mix_local(
    b: &Builder,
    p: &ParamOps,
    prefix: &str,
    (swa, rla): (Op, Op),
    rla_norm: bool,
    kernel_norm: bool,
) -> Result<Op> {
    mix_local_with(b, p, prefix, (swa, rla), rla_norm, |x, scale| {
        rms_norm_with(b, x, scale, MIX_NORM_EPS, kernel_norm)
    })
}

/// The epsilon of the mixing's group norms.
const MIX_NORM_EPS: f64 = 1e-8;

/// [`mix_local`] with the group norms made by `norm(x, scale)` (eps [`MIX_NORM_EPS`]).
fn mix_local_with(
    b: &Builder,
    p: &ParamOps,
    prefix: &str,
    (swa, rla): (Op, Op),
    rla_norm: bool,
    norm: impl Fn(Op, Op) -> Result<Op>,
) -> Result<Op> {
    let _s = b.name_scope("mix");
    let scale = |n: &str| param(p, &format!("{prefix}.{n}.scale"));
    let a = norm(swa, scale("swa_norm")?)?;
    let c = if rla_norm {
        norm(rla, scale("rla_norm")?)?
    } else {
        rla
    };
    b.add(a, c)
}

impl Model {
    /// Parameters of a graph in [`Model::param_specs`] order, as f32 parameters of `b`, and the
    /// same handles by name.
    pub fn declare_params(&self, b: &Builder) -> Result<(Vec<Op>, ParamOps)> {
        let mut ops = Vec::new();
        let mut map = HashMap::new();
        for spec in self.param_specs() {
            let dims: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
            let op = b.parameter(
                hlo_builder::Shape::array(ElementType::F32, &dims),
                &spec.name,
            )?;
            ops.push(op);
            map.insert(spec.name.clone(), op);
        }
        Ok((ops, map))
    }

    /// RMS normalisation of `x` (named `name` in errors, logical `axes`, the last the normalised
    /// dim) by `scale` of `x`'s last dims: the HLO ([`rms_norm`]) unless `kernel` and `x` is
    /// f32; with `kernel` our CPU kernel pair on the whole value (one device), in a manual region
    /// over the rows as the mesh lays `x` out ([`pallas_port::rms_norm::rms_norm_in_region`]);
    /// a mesh that cuts the normalised dim is an error ([`Model::row_kernel`]).
    #[allow(clippy::too_many_arguments)]
    fn norm(
        &self,
        b: &Builder,
        (x, scale): (Op, Op),
        eps: f64,
        name: &str,
        axes: &[LogicalAxis],
        kernel: bool,
    ) -> Result<Op> {
        if !kernel || b.shape(x)?.ty() != Some(ElementType::F32) {
            return rms_norm(b, x, scale, eps);
        }
        let dims = b.shape(x)?.dims().to_vec();
        match self
            .row_kernel("rms_norm", "norm_lowering", name, &dims, axes, false)
            .map_err(|e| b.error("rms_norm", e))?
        {
            RowKernel::Hlo => rms_norm(b, x, scale, eps),
            RowKernel::Whole => pallas_port::rms_norm::rms_norm_kernel(b, x, scale, eps),
            RowKernel::Region(s) => pallas_port::rms_norm::rms_norm_in_region(b, x, scale, eps, &s),
        }
    }

    /// [`mix_local`] in [`Model::attention_core_with_state`]: the group norms over the
    /// `[B,T,N,H]` contexts through [`Model::norm`], laid out as the RLA regions lay out q
    /// (heads by the `kv_heads` rule, so a cut of the heads meets the `[N, H]` scales' own).
    fn mix(
        &self,
        b: &Builder,
        p: &ParamOps,
        prefix: &str,
        (swa, rla): (Op, Op),
        kernel_norm: bool,
    ) -> Result<Op> {
        let axes = [Batch, Length, KvHeads, HeadDim];
        let name = format!("{prefix}.mix");
        mix_local_with(
            b,
            p,
            prefix,
            (swa, rla),
            self.config().rla.norm,
            |x, scale| self.norm(b, (x, scale), MIX_NORM_EPS, &name, &axes, kernel_norm),
        )
    }

    /// `x` through the per-head RMSNorm `{prefix}.{which}.scale` when `qk_norm`, else `x`: the
    /// optional qk-norm, applied before RoPE in SWA and global attention (never in RLA).
    fn head_norm(&self, b: &Builder, p: &ParamOps, prefix: &str, which: &str, x: Op) -> Result<Op> {
        let cfg = self.config();
        if !cfg.qk_norm {
            return Ok(x);
        }
        let scale = param(p, &format!("{prefix}.{which}.scale"))?;
        rms_norm(b, x, scale, cfg.norm_eps)
    }

    /// `x [B,T,heads,H]` of a layer of kind `attn` rotated by RoPE at `pos [T]`: always in a
    /// local layer, in a global one only with `global_rope` (else `x`).
    fn rotation(&self, b: &Builder, attn: Attention, x: Op, pos: Op) -> Result<Op> {
        let cfg = self.config();
        if attn.is_local() || cfg.global_rope {
            rope(b, x, pos, cfg.rope_theta)
        } else {
            Ok(x)
        }
    }

    /// The keys a layer of kind `attn` attends with (SWA in a local layer, full attention in a
    /// global one), from projected `k [B,T,G,H]` at positions `pos [T]` (f32): after the optional
    /// qk-norm, rotated by RoPE at `pos` ([`Model::attention_core`]'s rule: a global layer only
    /// with `global_rope`). What the decode cache of the layer stores (its ring, or the global
    /// cache), so cached keys are already rotated at their absolute positions.
    pub fn attn_keys(
        &self,
        b: &Builder,
        p: &ParamOps,
        prefix: &str,
        attn: Attention,
        k: Op,
        pos: Op,
    ) -> Result<Op> {
        let kn = self.head_norm(b, p, prefix, "k_norm", k)?;
        self.rotation(b, attn, kn, pos)
    }

    /// The queries a layer of kind `attn` attends with, from projected `q [B,T,N,H]` at positions
    /// `pos [T]` (f32): after the optional qk-norm, rotated as [`Model::attn_keys`] and scaled by
    /// `H^-1/2`. (RLA reads the raw q.)
    pub fn attn_queries(
        &self,
        b: &Builder,
        p: &ParamOps,
        prefix: &str,
        attn: Attention,
        q: Op,
        pos: Op,
    ) -> Result<Op> {
        let qn = self.head_norm(b, p, prefix, "q_norm", q)?;
        let qr = self.rotation(b, attn, qn, pos)?;
        let inv_sqrt_h = 1.0 / (self.config().head_dim as f32).sqrt();
        b.mul(qr, b.scalar(inv_sqrt_h)?)
    }

    /// The attention core of one layer from projected `q [B,T,N,H]`, `k, v [B,T,G,H]` at
    /// positions `pos [T]`: SWA (+ RLA and the mixing) for local layers, full causal attention
    /// for global ones (RoPE at `pos` only with `global_rope`). `prefix` names the layer's attention parameters
    /// (`layers.{i}.attn`); `platform` is where the graph runs (it picks the RLA lowering, see
    /// [`Model::rla_lowering`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_core(
        &self,
        b: &Builder,
        p: &ParamOps,
        prefix: &str,
        attn: Attention,
        qkv: (Op, Op, Op),
        pos: Op,
        platform: &str,
    ) -> Result<Op> {
        Ok(self
            .attention_core_with_state(b, p, prefix, attn, qkv, pos, platform)?
            .0)
    }

    /// [`Model::attention_core`] that also returns the RLA block's `final_state f32[B,G,2H,H]` for
    /// RAttention layers (`None` for SWA-only and global layers): what decoding continues from.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_core_with_state(
        &self,
        b: &Builder,
        p: &ParamOps,
        prefix: &str,
        attn: Attention,
        (q, k, v): (Op, Op, Op),
        pos: Op,
        platform: &str,
    ) -> Result<(Op, Option<Op>)> {
        let cfg = self.config();
        // With the sequence cut (mesh.seq > 1) attention runs in a manual region that exchanges
        // keys and values between the sequence shards; otherwise the partitioner splits it.
        let seq_region = self
            .seq_region(b.shape(q)?.dims())
            .map_err(|e| b.error("attention", e.to_string()))?;
        let kernel = self.attention_lowering(platform) == AttentionLowering::Kernel;
        let kernel_norm = self.norm_lowering(platform) == KernelLowering::Kernel;
        let attend = |q: Op, k: Op, v: Op, window: Option<usize>| match &seq_region {
            Some(s) => crate::attention::causal_attention_seq_lowered(
                b,
                q,
                k,
                v,
                window,
                s,
                self.mesh().seq_global(),
                self.attention_lowering(platform),
            ),
            None if kernel => {
                // Under a mesh the custom calls run in a manual region over batch and kv heads.
                let region = self
                    .rla_sharding(b.shape(q)?.dims())
                    .map_err(|e| b.error("attention", e.to_string()))?;
                match region {
                    Some(s) => {
                        pallas_port::attention::attention_kernel_in_region(b, (q, k, v), window, &s)
                    }
                    None => pallas_port::attention::attention_kernel(b, q, k, v, window),
                }
            }
            None => causal_attention(b, q, k, v, window),
        };
        if attn == Attention::Global {
            let _s = b.name_scope("global");
            let qr = self.attn_queries(b, p, prefix, attn, q, pos)?;
            let kr = self.attn_keys(b, p, prefix, attn, k, pos)?;
            return Ok((attend(qr, kr, v, None)?, None));
        }
        let _s = b.name_scope("local");
        let (qr, kr) = {
            let _s = b.name_scope("swa");
            (
                self.attn_queries(b, p, prefix, attn, q, pos)?,
                self.attn_keys(b, p, prefix, attn, k, pos)?,
            )
        };
        // Sequence-parallel RAttention layers run SWA and RLA in one region that exchanges
        // the keys/values halo once (SWA over the whole sequence keeps two regions).
        let t = b.shape(q)?.dims()[1];
        if let Some(s) = seq_region.as_ref().filter(|_| attn.has_rla()) {
            if (cfg.window as i64) + 1 < t {
                let _s = b.name_scope("swa_rla");
                let (rla_cfg, lowering) = (self.rla_config(), self.rla_lowering(platform));
                let (swa, rla) = crate::attention::local_attention_seq_lowered(
                    b,
                    (qr, kr),
                    (q, k, v),
                    &rla_cfg,
                    (lowering, self.attention_lowering(platform)),
                    s,
                )?;
                return Ok((
                    self.mix(b, p, prefix, (swa, rla.o), kernel_norm)?,
                    Some(rla.final_state),
                ));
            }
        }
        let swa = {
            let _s = b.name_scope("swa");
            attend(qr, kr, v, Some(cfg.window))?
        };
        if !attn.has_rla() {
            return Ok((swa, None));
        }
        let rla = {
            let _s = b.name_scope("rla");
            let (cfg, lowering) = (self.rla_config(), self.rla_lowering(platform));
            // Under a mesh the blocks run in a manual region over batch, sequence and kv heads:
            // the partitioner cannot split them.
            let region = self
                .rla_sharding(b.shape(q)?.dims())
                .map_err(|e| b.error("rla", e.to_string()))?;
            match region {
                Some(s) => pallas_port::rla_in_region(b, (q, k, v), &cfg, lowering, &s)?,
                None => pallas_port::rla_with_state(b, q, k, v, &cfg, lowering)?,
            }
        };
        Ok((
            self.mix(b, p, prefix, (swa, rla.o), kernel_norm)?,
            Some(rla.final_state),
        ))
    }

    /// Token embedding: `tokens [B, T]` (s32) to `x [B, T, d_model]` (f32), a gather of rows of
    /// `embed [vocab, d_model]` (ids outside `[0, vocab)` are clamped; no `[B, T, vocab]` one-hot).
    pub fn embed(&self, b: &Builder, p: &ParamOps, tokens: Op) -> Result<Op> {
        let _s = b.name_scope("embed");
        b.take_rows(param(p, "embed")?, tokens)
    }

    /// [`Model::embed`] of the first `t` columns of `tokens [B, L ≥ t]`, in a graph that runs
    /// on `platform`: our CPU kernel pair ([`pallas_port::embed::embed_kernel`], which reads the
    /// columns in place) when [`Model::embed_lowering`] resolves to it — under a mesh in a
    /// manual region over the batch and sequence pieces with the table whole
    /// ([`pallas_port::embed::embed_in_region`]) — else the HLO gather of the slice.
    fn embed_prefix(
        &self,
        b: &Builder,
        p: &ParamOps,
        tokens: Op,
        t: i64,
        platform: &str,
    ) -> Result<Op> {
        let td = dims(b, tokens)?;
        let how = match self.embed_lowering(platform) {
            KernelLowering::Kernel => {
                let width = self.config().d_model as i64;
                let residual = [Batch, Length, ActivationEmbed];
                self.row_kernel(
                    "embed",
                    "embed_lowering",
                    "embed.out",
                    &[td[0], t, width],
                    &residual,
                    true,
                )
                .map_err(|e| b.error("embed", e))?
            }
            _ => RowKernel::Hlo,
        };
        let (table, cols) = (param(p, "embed")?, t as usize);
        match how {
            RowKernel::Whole => {
                let _s = b.name_scope("embed");
                pallas_port::embed::embed_kernel(b, table, tokens, cols)
            }
            RowKernel::Region(s) => {
                let _s = b.name_scope("embed");
                pallas_port::embed::embed_in_region(b, table, tokens, cols, &s)
            }
            RowKernel::Hlo if t == td[1] => self.embed(b, p, tokens),
            RowKernel::Hlo => self.embed(b, p, self.token_columns(b, tokens, (0, t))?),
        }
    }

    /// One pre-norm block `layers.{layer}` on `x [B, T, d_model]`: `y = x + Wo·attn(q, k, v)`, then
    /// `y + FFN(RMSNorm(y))`. `attn` maps the prefix of the layer's attention parameters
    /// (`layers.{layer}.attn`) and the projected `q [B,T,N,H]`, `k, v [B,T,G,H]` to the context
    /// `[B,T,N,H]` ([`Model::attention_core`] in the forward, cached attention when decoding). `kernel_norm`: both norms as our CPU kernels ([`rms_norm_with`]; the forward
    /// passes [`Model::norm_lowering`], decoding `false`).
    pub fn block(
        &self,
        b: &Builder,
        p: &ParamOps,
        layer: usize,
        x: Op,
        kernel_norm: bool,
        attn: impl FnOnce(&str, Op, Op, Op) -> Result<Op>,
    ) -> Result<Op> {
        let cfg = self.config();
        let xd = dims(b, x)?;
        let (bs, t) = (xd[0], xd[1]);
        let (n, g, h) = (cfg.heads as i64, cfg.kv_heads as i64, cfg.head_dim as i64);
        let pre = format!("layers.{layer}");
        let residual = [Batch, Length, ActivationEmbed];
        let xn = self.norm(
            b,
            (x, param(p, &format!("{pre}.attn_norm.scale"))?),
            cfg.norm_eps,
            &format!("{pre}.attn_norm.in"),
            &residual,
            kernel_norm,
        )?;
        let ap = format!("{pre}.attn");
        let proj = |w: &str, heads: i64| -> Result<Op> {
            b.reshape(
                linear(b, xn, param(p, &format!("{ap}.{w}"))?, cfg.dtype)?,
                &[bs, t, heads, h],
            )
        };
        let (q, k, v) = (proj("wq", n)?, proj("wk", g)?, proj("wv", g)?);
        let q = self.constrain(b, q, &format!("{ap}.q"), &[Batch, Length, QHeads, HeadDim])?;
        let k = self.constrain(b, k, &format!("{ap}.k"), &[Batch, Length, KvHeads, HeadDim])?;
        let v = self.constrain(b, v, &format!("{ap}.v"), &[Batch, Length, KvHeads, HeadDim])?;
        let ctx = attn(&ap, q, k, v)?;
        let o = linear(
            b,
            b.reshape(ctx, &[bs, t, n * h])?,
            param(p, &format!("{ap}.wo"))?,
            cfg.dtype,
        )?;
        let x = b.add(x, o)?;
        let _f = b.name_scope("ffn");
        let xn = self.norm(
            b,
            (x, param(p, &format!("{pre}.ffn_norm.scale"))?),
            cfg.norm_eps,
            &format!("{pre}.ffn_norm.in"),
            &residual,
            kernel_norm,
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
        b.add(x, f)
    }

    /// Block `layer` on `x` under a checkpointing [`Remat`] (`layer_inputs`, `dots_saveable`,
    /// `dots_with_no_batch_dims_saveable`): a checkpointed block whose inputs are `x` and the
    /// layer's parameters, traced again in the backward pass, where it takes the matmul results
    /// the policy saves from the forward ([`Remat::save_policy`]).
    fn remat_block(
        &self,
        b: &Builder,
        p: &ParamOps,
        layer: usize,
        x: Op,
        platform: &str,
    ) -> Result<Op> {
        let prefix = format!("layers.{layer}.");
        let names: Vec<String> = self
            .param_specs()
            .iter()
            .filter(|s| s.name.starts_with(&prefix))
            .map(|s| s.name.clone())
            .collect();
        let mut inputs = vec![x];
        for n in &names {
            inputs.push(param(p, n)?);
        }
        let (me, platform) = (self.clone(), platform.to_string());
        let attn = self.layers()[layer];
        let f: BlockFn = Arc::new(move |b: &Builder, ins: &[Op]| {
            let p: ParamOps = names
                .iter()
                .cloned()
                .zip(ins[1..].iter().copied())
                .collect();
            let t = dims(b, ins[0])?[1];
            let pos = b.iota(ElementType::F32, &[t], 0)?;
            let kernel_norm = me.norm_lowering(&platform) == KernelLowering::Kernel;
            me.block(b, &p, layer, ins[0], kernel_norm, |ap, q, k, v| {
                me.attention_core(b, &p, ap, attn, (q, k, v), pos, &platform)
            })
        });
        let policy = self.remat().save_policy().unwrap_or_default();
        b.checkpoint_with_policy(&inputs, f, policy)
    }

    /// The final norm and the LM head: `x [B, T, d_model]` to logits `[B, T, vocab]` (f32).
    pub fn head(&self, b: &Builder, p: &ParamOps, x: Op) -> Result<Op> {
        self.head_with(b, p, x, false)
    }

    /// [`Model::head`] with the final norm as our CPU kernels when `kernel_norm` (in a manual
    /// region under a mesh that leaves d_model whole, as HLO where it cuts it).
    pub fn head_with(&self, b: &Builder, p: &ParamOps, x: Op, kernel_norm: bool) -> Result<Op> {
        let cfg = self.config();
        let _s = b.name_scope("head");
        let scale = param(p, "final_norm.scale")?;
        let residual = [Batch, Length, ActivationEmbed];
        let xn = self.norm(
            b,
            (x, scale),
            cfg.norm_eps,
            "final_norm.in",
            &residual,
            kernel_norm,
        )?;
        if cfg.tied_embeddings {
            let dd = DotDims {
                lhs_contracting: vec![2],
                rhs_contracting: vec![1],
                ..Default::default()
            };
            b.dot_general(xn, param(p, "embed")?, &dd, None, None)
        } else {
            linear(b, xn, param(p, "lm_head")?, cfg.dtype)
        }
    }

    /// Logits `[B, T, vocab]` (f32) for `tokens [B, T]` (s32), in a graph that runs on
    /// `platform` (see [`Model::rla_lowering`]).
    pub fn forward(&self, b: &Builder, p: &ParamOps, tokens: Op, platform: &str) -> Result<Op> {
        let t = dims(b, tokens)?[1];
        self.forward_prefix(b, p, tokens, t, platform)
    }

    /// [`Model::forward`] of the first `t` columns of `tokens [B, L ≥ t]` (the next-token loss
    /// passes its whole token array: no slice when the embedding is our kernel).
    fn forward_prefix(
        &self,
        b: &Builder,
        p: &ParamOps,
        tokens: Op,
        t: i64,
        platform: &str,
    ) -> Result<Op> {
        if let Some(period) = self.scan_period() {
            return self.forward_scanned(b, p, (tokens, t), platform, period);
        }
        // Activations at layer boundaries are `[batch, length, activation_embed]` (a constraint
        // under a mesh, nothing on one device).
        let residual = [Batch, Length, ActivationEmbed];
        let x = self.embed_prefix(b, p, tokens, t, platform)?;
        let mut x = self.constrain(b, x, "embed.out", &residual)?;
        let pos = b.iota(ElementType::F32, &[t], 0)?;
        let kernel_norm = self.norm_lowering(platform) == KernelLowering::Kernel;
        for (i, &attn) in self.layers().iter().enumerate() {
            let _s = b.name_scope(&format!("layer_{i}"));
            x = match self.remat() {
                Remat::None => self.block(b, p, i, x, kernel_norm, |ap, q, k, v| {
                    self.attention_core(b, p, ap, attn, (q, k, v), pos, platform)
                })?,
                Remat::LayerInputs => self.remat_block(b, p, i, x, platform)?,
                Remat::Dots | Remat::DotsWithNoBatchDims => {
                    self.remat_block(b, p, i, x, platform)?
                }
            };
            x = self.constrain(b, x, &format!("layers.{i}.out"), &residual)?;
        }
        let logits = self.head_with(b, p, x, kernel_norm)?;
        self.constrain(b, logits, "logits", &[Batch, Length, Vocab])
    }

    /// [`Model::forward`] of a scanned model (`model.scan_layers`): one [`Builder::scan`] over
    /// the periods of the layer pattern, whose body is one period of blocks on row `i` of every
    /// stacked parameter. The scan's backward recomputes each period from its input, so the
    /// remat policy does not apply inside (every policy behaves as `layer_inputs` at the
    /// granularity of a period).
    fn forward_scanned(
        &self,
        b: &Builder,
        p: &ParamOps,
        (tokens, t): (Op, i64),
        platform: &str,
        period: usize,
    ) -> Result<Op> {
        let residual = [Batch, Length, ActivationEmbed];
        let x = self.embed_prefix(b, p, tokens, t, platform)?;
        let x = self.constrain(b, x, "embed.out", &residual)?;
        // The stacked parameters, and the unrolled name of row 0 of each: what the body's
        // blocks `0..period` ask for.
        let (mut xs, mut names) = (Vec::new(), Vec::new());
        for s in self.param_specs().iter().filter(|s| !s.stacked.is_empty()) {
            xs.push(param(p, &s.name)?);
            names.push(s.stacked[0].clone());
        }
        let kernel_norm = self.norm_lowering(platform) == KernelLowering::Kernel;
        let (me, platform) = (self.clone(), platform.to_string());
        let body: hlo_builder::autodiff::ScanFn =
            Arc::new(move |b: &Builder, x: Op, rows: &[Op]| {
                let p: ParamOps = names.iter().cloned().zip(rows.iter().copied()).collect();
                let t = dims(b, x)?[1];
                let pos = b.iota(ElementType::F32, &[t], 0)?;
                let mut x = x;
                for (j, &attn) in me.layers()[..period].iter().enumerate() {
                    let _s = b.name_scope(&format!("layer_{j}"));
                    x = me.block(b, &p, j, x, kernel_norm, |ap, q, k, v| {
                        me.attention_core(b, &p, ap, attn, (q, k, v), pos, &platform)
                    })?;
                    x = me.constrain(b, x, &format!("layers.{j}.out"), &residual)?;
                }
                Ok(x)
            });
        let x = {
            let _s = b.name_scope("scan_layers");
            b.scan_unrolled(x, &xs, body, self.config().scan_unroll)?
        };
        let logits = self.head_with(b, p, x, kernel_norm)?;
        self.constrain(b, logits, "logits", &[Batch, Length, Vocab])
    }

    /// The per-layer parameter handles (`layers.{i}.*`) of a scanned model: row `p` of every
    /// stacked parameter `scan.{j}.*` sliced out for layer `p·period + j` (for decoding, which
    /// walks the layers one by one). The map unchanged for an unrolled model.
    pub fn per_layer_params(&self, b: &Builder, p: &ParamOps) -> Result<ParamOps> {
        if self.scan_period().is_none() {
            return Ok(p.clone());
        }
        let mut out = p.clone();
        for s in self.param_specs().iter().filter(|s| !s.stacked.is_empty()) {
            let op = param(p, &s.name)?;
            let rest: Vec<i64> = s.shape[1..].iter().map(|&d| d as i64).collect();
            for (i, name) in s.stacked.iter().enumerate() {
                let row = b.slice_in_dim(op, i as i64, i as i64 + 1, 0)?;
                out.insert(name.clone(), b.reshape(row, &rest)?);
            }
        }
        Ok(out)
    }

    /// Mean next-token loss of `tokens [B, T+1]`: inputs are the first T, targets the last T, all
    /// weighted 1. `platform` is where the graph runs (see [`Model::rla_lowering`]).
    pub fn loss(&self, b: &Builder, p: &ParamOps, tokens: Op, platform: &str) -> Result<Op> {
        let td = dims(b, tokens)?;
        let weights = b.full(ElementType::F32, 1.0, &[td[0], td[1] - 1])?;
        self.weighted_loss(b, p, tokens, weights, platform)
    }

    /// Weighted mean next-token loss of `tokens [B, T+1]` with `weights f32[B, T]` (one per
    /// target): `Σ w·nll / max(Σ w, 1)`. Weights 0 and 1 score a subset of the targets, such as
    /// the answers of a recall task.
    pub fn weighted_loss(
        &self,
        b: &Builder,
        p: &ParamOps,
        tokens: Op,
        weights: Op,
        platform: &str,
    ) -> Result<Op> {
        let td = dims(b, tokens)?;
        let wd = dims(b, weights)?;
        if wd != [td[0], td[1] - 1] {
            return Err(hlo_builder::Error::invalid(
                "weighted_loss",
                format!(
                    "weights f32{wd:?} must be [batch, T] = [{}, {}] for tokens s32{td:?}",
                    td[0],
                    td[1] - 1
                ),
            ));
        }
        // The inputs are the first T columns, the targets the last T: the kernels read them in
        // place, the HLO lowerings slice.
        let logits = self.forward_prefix(b, p, tokens, td[1] - 1, platform)?;
        let how = match self.loss_lowering(platform) {
            KernelLowering::Kernel => {
                let ld = dims(b, logits)?;
                self.row_kernel(
                    "weighted_loss",
                    "loss_lowering",
                    "logits",
                    &ld,
                    &[Batch, Length, Vocab],
                    false,
                )
                .map_err(|e| b.error("weighted_loss", e))?
            }
            _ => RowKernel::Hlo,
        };
        use pallas_port::cross_entropy::{cross_entropy_in_region, cross_entropy_kernel};
        match how {
            RowKernel::Whole => cross_entropy_kernel(b, logits, (tokens, 1), weights),
            RowKernel::Region(s) => cross_entropy_in_region(b, logits, (tokens, 1), weights, &s),
            RowKernel::Hlo => {
                let targets = self.token_columns(b, tokens, (1, td[1]))?;
                cross_entropy(b, logits, targets, weights)
            }
        }
    }
}
