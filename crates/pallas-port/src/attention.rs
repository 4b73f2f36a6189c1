//! Causal softmax attention as a custom-call pair in a graph: the forward
//! `rattention.attn_fwd` with the backward `rattention.attn_bwd` as its custom VJP, served by the
//! CPU kernels of [`crate::kernel::attention`]. The portable lowering (blocked HLO) lives in the
//! model crate; [`AttentionLowering`] picks between them per platform.
//!
//! ```no_run
//! use hlo_builder::{Builder, ElementType, Shape};
//! let b = Builder::new("attn");
//! let q = b.parameter(Shape::array(ElementType::F32, &[1, 64, 4, 16]), "q")?;
//! let k = b.parameter(Shape::array(ElementType::F32, &[1, 64, 2, 16]), "k")?;
//! let v = b.parameter(Shape::array(ElementType::F32, &[1, 64, 2, 16]), "v")?;
//! let o = pallas_port::attention::attention_kernel(&b, q, k, v, Some(8))?; // f32[1, 64, 4, 16]
//! let grads = b.grad(b.reduce_sum(o, &[0, 1, 2, 3])?, &[q, k, v])?; // rattention.attn_bwd
//! # Ok::<(), hlo_builder::Error>(())
//! ```

use crate::config::RlaDims;
use crate::ffi_attention::{
    ATTN_BWD_AT_TARGET, ATTN_BWD_TARGET, ATTN_FWD_AT_TARGET, ATTN_FWD_TARGET,
};
use crate::graph::{
    dims_i64, f32_tuple, on_region_shards, qkv_dims, qkv_grads, qkv_vjp, region_tiles_cut, CallVjp,
};
use hlo_builder::{Attr, Builder, ElementType, Op, Result, Sharding};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// How causal softmax attention is lowered (the model config's `attention_lowering`, serialized
/// as `"auto"`, `"hlo"`, `"kernel"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionLowering {
    /// Blocked HLO (the model crate's `causal_attention`): runs anywhere.
    Hlo,
    /// The custom-call pair over our CPU kernels ([`attention_kernel`]); needs
    /// [`crate::register_cpu_kernels`] on the PJRT CPU client.
    Kernel,
    /// [`AttentionLowering::Kernel`] on the CPU platform, [`AttentionLowering::Hlo`] elsewhere
    /// (no GPU or TPU handler exists). Resolve with [`AttentionLowering::for_platform`].
    #[default]
    Auto,
}

impl AttentionLowering {
    /// The concrete lowering for the PJRT platform `platform` (`"cpu"`, `"cuda"`, `"tpu"`, ...;
    /// case-insensitive): `Auto` is `Kernel` on `"cpu"`/`"host"` and `Hlo` elsewhere; explicit
    /// choices are returned unchanged.
    ///
    /// ```
    /// use pallas_port::attention::AttentionLowering as L;
    /// assert_eq!(L::Auto.for_platform("cpu"), L::Kernel);
    /// assert_eq!(L::Auto.for_platform("cuda"), L::Hlo);
    /// assert_eq!(L::Auto.for_platform("tpu"), L::Hlo);
    /// assert_eq!(L::Hlo.for_platform("cpu"), L::Hlo);
    /// ```
    pub fn for_platform(self, platform: &str) -> AttentionLowering {
        let host = crate::graph::is_host_platform(platform);
        match self {
            AttentionLowering::Auto if host => AttentionLowering::Kernel,
            AttentionLowering::Auto => AttentionLowering::Hlo,
            l => l,
        }
    }

    /// True for `Auto` (the default, which configs need not write out).
    pub fn is_auto(&self) -> bool {
        *self == AttentionLowering::Auto
    }

    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            AttentionLowering::Hlo => "hlo",
            AttentionLowering::Kernel => "kernel",
            AttentionLowering::Auto => "auto",
        }
    }
}

impl fmt::Display for AttentionLowering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The i64 `window` attribute: −1 for global attention.
fn attrs(window: Option<usize>) -> Vec<(&'static str, Attr)> {
    vec![("window", Attr::I64(window.map_or(-1, |w| w as i64)))]
}

/// Causal softmax attention over q `[B,T,N,H]`, k, v `[B,T,G,H]` (already rotated and scaled;
/// query head n reads kv head n / (N/G)) as the custom call `rattention.attn_fwd`, whose
/// gradient is `rattention.attn_bwd`. `window = Some(W)`: key s is visible to query t iff
/// t − W ≤ s ≤ t; `None`: s ≤ t. Returns `o f32[B,T,N,H]`. Runs only where the handlers are
/// registered (the CPU client, [`crate::register_cpu_kernels`]).
pub fn attention_kernel(b: &Builder, q: Op, k: Op, v: Op, window: Option<usize>) -> Result<Op> {
    let d = qkv_dims(b, "attention_kernel", q, k, v)?;
    let out = f32_tuple(&[&d.q_shape(), &crate::kernel::attention::lse_shape(&d)]);
    let fwd = {
        let _s = b.name_scope("attn_fwd");
        b.custom_call(ATTN_FWD_TARGET, &[q, k, v], out, &attrs(window))?
    };
    let vjp = qkv_vjp(
        "attention_kernel",
        LSE_MESSAGE,
        move |b: &Builder, (q, k, v), output, d_o| {
            let out = f32_tuple(&[&d.q_shape(), &d.kv_shape(), &d.kv_shape()]);
            let (o, lse) = (
                b.get_tuple_element(output, 0)?,
                b.get_tuple_element(output, 1)?,
            );
            let _s = b.name_scope("attn_bwd");
            let operands = [q, k, v, o, lse, d_o];
            b.custom_call(ATTN_BWD_TARGET, &operands, out, &attrs(window))
        },
    );
    b.custom_vjp(&[q, k, v], fwd, Arc::new(vjp))?;
    b.get_tuple_element(fwd, 0)
}

/// The error for a cotangent on the saved logsumexp.
const LSE_MESSAGE: &str =
    "gradients flow only through the output o; the logsumexp is not differentiable";

/// The backward call of [`attention_kernel_at`] (no gradient for the positions).
fn attention_at_backward(
    b: &Builder,
    inputs: &[Op],
    output: Op,
    d_o: Op,
    window: Option<usize>,
) -> Result<Vec<Option<Op>>> {
    let (q, k, v, pos) = (inputs[0], inputs[1], inputs[2], inputs[3]);
    let (d, keys) = qkv_dims_at(b, q, k, v, pos)?;
    let kv = [d.batch, keys, d.kv_heads, d.head_dim];
    let (o, lse) = (
        b.get_tuple_element(output, 0)?,
        b.get_tuple_element(output, 1)?,
    );
    let g = {
        let _s = b.name_scope("attn_bwd_at");
        b.custom_call(
            ATTN_BWD_AT_TARGET,
            &[q, k, v, o, lse, d_o, pos],
            f32_tuple(&[&d.q_shape(), &kv, &kv]),
            &attrs(window),
        )?
    };
    let mut grads = qkv_grads(b, g, [q, k, v])?;
    grads.push(None);
    Ok(grads)
}

/// The dims of q `[B,Tq,N,H]` (`seq` = Tq) and the key count Tk of k, v `[B,Tk,G,H]`, checked
/// with `pos` `s32[2]`.
fn qkv_dims_at(b: &Builder, q: Op, k: Op, v: Op, pos: Op) -> Result<(RlaDims, usize)> {
    const OP: &str = "attention_kernel_at";
    let (qs, ks, vs, ps) = (b.shape(q)?, b.shape(k)?, b.shape(v)?, b.shape(pos)?);
    let (qd, kd) = (qs.dims(), ks.dims());
    let pos_ok = ps.dims() == [2] && ps.ty() == Some(ElementType::S32);
    if qd.len() != 4 || kd.len() != 4 || ks != vs || qd[0] != kd[0] || qd[3] != kd[3] || !pos_ok {
        return Err(b.error(
            OP,
            format!(
                "q must be [B,Tq,N,H], k, v [B,Tk,G,H] with equal B, H, and pos s32[2]: got q \
                 {}, k {}, v {}, pos {}",
                qs.short(),
                ks.short(),
                vs.short(),
                ps.short()
            ),
        ));
    }
    let d = RlaDims {
        batch: qd[0] as usize,
        seq: qd[1] as usize,
        heads: qd[2] as usize,
        kv_heads: kd[2] as usize,
        head_dim: qd[3] as usize,
    };
    d.validate().map_err(|e| b.error(OP, e.to_string()))?;
    Ok((d, kd[1] as usize))
}

/// [`attention_kernel`] at runtime positions, as the custom call `rattention.attn_fwd_at`
/// (gradient `rattention.attn_bwd_at`): q `[B,Tq,N,H]` against k, v `[B,Tk,G,H]` (any Tk), with
/// `pos` an `s32[2]` op holding the global positions of the first query and the first key (see
/// [`crate::kernel::attention::AttnPositions`]): key s is visible to query t iff
/// 0 ≤ k0 + s ≤ q0 + t and, with `window = Some(W)`, q0 + t − W ≤ k0 + s. A sequence shard
/// attends its queries (q0 = its offset) to `[halo; own]` keys (k0 = offset − halo length);
/// the kernel skips the key blocks the positions hide. Returns `o f32[B,Tq,N,H]`. Operand and
/// result layouts are pinned to row-major (`custom_call`): inside a sequence region
/// XLA's layout assignment otherwise hands the backward's dk, dv the layout of the
/// reduce-scatter that consumes them, which the kernel does not read.
///
/// ```no_run
/// use hlo_builder::{Builder, ElementType, Shape};
/// let b = Builder::new("attn_at");
/// let q = b.parameter(Shape::array(ElementType::F32, &[1, 32, 4, 16]), "q")?;
/// let k = b.parameter(Shape::array(ElementType::F32, &[1, 40, 2, 16]), "k")?;
/// let v = b.parameter(Shape::array(ElementType::F32, &[1, 40, 2, 16]), "v")?;
/// // queries at 32.., keys at 24.. (8 halo keys, then the shard's own 32)
/// let pos = b.constant_vec(vec![32i32, 24], &[2])?;
/// let o = pallas_port::attention::attention_kernel_at(&b, q, k, v, Some(8), pos)?;
/// # Ok::<(), hlo_builder::Error>(())
/// ```
pub fn attention_kernel_at(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    window: Option<usize>,
    pos: Op,
) -> Result<Op> {
    let (d, _) = qkv_dims_at(b, q, k, v, pos)?;
    let out = f32_tuple(&[&d.q_shape(), &crate::kernel::attention::lse_shape(&d)]);
    let fwd = {
        let _s = b.name_scope("attn_fwd_at");
        b.custom_call(ATTN_FWD_AT_TARGET, &[q, k, v, pos], out, &attrs(window))?
    };
    let vjp = CallVjp {
        op: "attention_kernel_at",
        message: LSE_MESSAGE,
        backward: move |b: &Builder, inputs: &[Op], output, d_o| {
            attention_at_backward(b, inputs, output, d_o, window)
        },
    };
    b.custom_vjp(&[q, k, v, pos], fwd, Arc::new(vjp))?;
    b.get_tuple_element(fwd, 0)
}

/// [`attention_kernel`] on q, k, v laid out across devices by `qkv` (a sharding of the
/// `[B,T,heads,H]` arrays that cuts the batch and the heads, q's N and k/v's G into the same
/// number of pieces), in a manually partitioned region like [`crate::rla_in_region`]: each
/// device runs the custom calls on its own sequences and kv heads. The sequence must not be cut
/// (sequence-parallel attention stays HLO) nor H. With `qkv` replicated this is
/// [`attention_kernel`].
pub fn attention_kernel_in_region(
    b: &Builder,
    (q, k, v): (Op, Op, Op),
    window: Option<usize>,
    qkv: &Sharding,
) -> Result<Op> {
    let op = "attention_kernel_in_region";
    let d = qkv_dims(b, op, q, k, v)?;
    let tiles = region_tiles_cut(b, op, "attention", qkv, [true, false, true, false])?;
    if tiles.iter().all(|&t| t == 1) {
        return attention_kernel(b, q, k, v, window);
    }
    let o = on_region_shards(b, (q, k, v), qkv, |ql, kl, vl| {
        attention_kernel(b, ql, kl, vl, window)
    })?;
    b.shard_to_full(o, qkv.clone(), &dims_i64(&d.q_shape()))
}
