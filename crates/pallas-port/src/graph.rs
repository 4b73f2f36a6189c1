//! Adding RLA to a graph: one call, three lowerings (CPU custom call, Triton, HLO), and the block
//! pair as the custom VJP.
//!
//! ```no_run
//! use hlo_builder::{Builder, ElementType, Shape};
//! use pallas_port::{rla, FeatureMap, Lowering, RlaConfig};
//! let b = Builder::new("rla");
//! let q = b.parameter(Shape::array(ElementType::F32, &[1, 64, 4, 16]), "q")?;
//! let k = b.parameter(Shape::array(ElementType::F32, &[1, 64, 2, 16]), "k")?;
//! let v = b.parameter(Shape::array(ElementType::F32, &[1, 64, 2, 16]), "v")?;
//! let cfg = RlaConfig { window: 8, sub_chunk: 16, chunk: 32, feature_map: FeatureMap::Softmax, ..RlaConfig::default() };
//! let o = rla(&b, q, k, v, &cfg, Lowering::Hlo)?;   // f32[1, 64, 4, 16]
//! let grads = b.grad(b.reduce_sum(o, &[0, 1, 2, 3])?, &[q, k, v])?; // uses rla_bwd, never the while loop
//! # Ok::<(), hlo_builder::Error>(())
//! ```

use crate::config::{RlaConfig, RlaDims, SeqState};
use crate::ffi::{
    BWD_H0_TARGET, BWD_TARGET, FWD_H0_TARGET, FWD_TARGET, KV_STATE_BWD_TARGET, KV_STATE_TARGET,
};
use crate::seq::{derived_sharding, SeqShards};
use hlo_builder::{Attr, Builder, ElementType, Op, Result, Shape, Sharding};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// How a block is lowered.
///
/// Serialized in snake_case (`"auto"`, `"custom_call"`, `"hlo"`, `"triton"`), the spelling of
/// the model config's `rla.lowering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lowering {
    /// Typed-FFI custom call served by our CPU kernels (registered with
    /// [`crate::register_cpu_kernels`] on the PJRT CPU client).
    CustomCall,
    /// Pure HLO (`while` over chunks): runs anywhere; the fallback everywhere.
    Hlo,
    /// Triton kernels written in the kernel language ([`crate::lang::rla`]) in
    /// `__gpu$xla.gpu.triton` custom calls, compiled by XLA's GPU back end (CUDA, Ampere or
    /// newer). Needs power-of-two `sub_chunk` and head dim ≥ 16.
    Triton,
    /// Mosaic kernels written in the kernel language ([`crate::lang::rla_mosaic`]) in
    /// `tpu_custom_call`s, compiled by libtpu (TPU). Needs `sub_chunk` and head dim multiples
    /// of 8.
    Mosaic,
    /// The custom call on the CPU platform, Mosaic on TPU, HLO elsewhere (CUDA included: the
    /// Triton kernels are opt-in until they fit and win at head dim 128). Resolve it with
    /// [`Lowering::for_platform`] before building: [`rla`] refuses an unresolved `Auto`.
    #[default]
    Auto,
}

impl Lowering {
    /// The concrete lowering for the PJRT platform the graph will run on (`platform_name()` of
    /// the client or topology: `"cpu"`, `"cuda"`, `"tpu"`, ...; case-insensitive).
    ///
    /// `Auto` becomes [`Lowering::CustomCall`] on the CPU platform (`"cpu"` or `"host"`), where
    /// the caller registers our kernels, [`Lowering::Mosaic`] on `"tpu"`, and [`Lowering::Hlo`] on
    /// every other platform, `"cuda"` included: the Triton kernels ([`Lowering::Triton`]) are
    /// chosen explicitly, because at head dim 128 their backward needs more shared memory than
    /// an H100/H200 block has, and at 64 the `while` lowering was faster on an H200. Explicit
    /// choices are returned unchanged.
    ///
    /// ```
    /// use pallas_port::Lowering;
    /// assert_eq!(Lowering::Auto.for_platform("cpu"), Lowering::CustomCall);
    /// assert_eq!(Lowering::Auto.for_platform("cuda"), Lowering::Hlo);
    /// assert_eq!(Lowering::Auto.for_platform("tpu"), Lowering::Mosaic);
    /// assert_eq!(Lowering::Hlo.for_platform("tpu"), Lowering::Hlo);
    /// assert_eq!(Lowering::CustomCall.for_platform("tpu"), Lowering::CustomCall);
    /// ```
    pub fn for_platform(self, platform: &str) -> Lowering {
        let host = is_host_platform(platform);
        match self {
            Lowering::Auto if host => Lowering::CustomCall,
            Lowering::Auto if platform.eq_ignore_ascii_case("tpu") => Lowering::Mosaic,
            Lowering::Auto => Lowering::Hlo,
            l => l,
        }
    }

    /// The config spelling: `"auto"`, `"custom_call"`, `"hlo"`, `"triton"` or `"mosaic"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Lowering::CustomCall => "custom_call",
            Lowering::Hlo => "hlo",
            Lowering::Triton => "triton",
            Lowering::Mosaic => "mosaic",
            Lowering::Auto => "auto",
        }
    }

    /// The concrete lowering; an error for `Auto`.
    fn resolved(self, op: &str) -> Result<Lowering> {
        match self {
            Lowering::Hlo | Lowering::CustomCall | Lowering::Triton | Lowering::Mosaic => Ok(self),
            Lowering::Auto => Err(hlo_builder::Error::invalid(
                "rla",
                format!(
                "{op}: the lowering is `Auto`, which depends on where the graph runs; resolve it \
                 for the target platform first with `lowering.for_platform(platform)` (custom \
                 call on \"cpu\", Triton on \"cuda\", HLO on \"tpu\", ...)"
            ),
            )),
        }
    }
}

/// True for the PJRT CPU platform (`"cpu"` or `"host"`, case-insensitive), where our custom
/// calls' handlers are registered.
pub fn is_host_platform(platform: &str) -> bool {
    ["cpu", "host"]
        .iter()
        .any(|p| platform.eq_ignore_ascii_case(p))
}

impl fmt::Display for Lowering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn attrs(cfg: &RlaConfig) -> Vec<(&'static str, Attr)> {
    vec![
        ("chunk", Attr::I64(cfg.chunk as i64)),
        (
            "feature_map",
            Attr::Str(cfg.feature_map.as_str().to_string()),
        ),
        ("sub_chunk", Attr::I64(cfg.sub_chunk as i64)),
        ("window", Attr::I64(cfg.window as i64)),
    ]
}

/// Check q `[B,T,N,H]`, k, v `[B,T,G,H]` and the config; return the dims.
pub fn check_shapes(b: &Builder, q: Op, k: Op, v: Op, cfg: &RlaConfig) -> Result<RlaDims> {
    let d = qkv_dims(b, "rla", q, k, v)?;
    cfg.validate().map_err(|e| b.error("rla", e.to_string()))?;
    Ok(d)
}

/// The dims of q `[B,T,N,H]`, k, v `[B,T,G,H]` (equal B, T, H; k and v alike; G dividing N),
/// checked for every custom call over q, k, v; errors name `op`.
#[track_caller]
pub(crate) fn qkv_dims(b: &Builder, op: &'static str, q: Op, k: Op, v: Op) -> Result<RlaDims> {
    let (qs, ks, vs) = (b.shape(q)?, b.shape(k)?, b.shape(v)?);
    let (qd, kd) = (qs.dims(), ks.dims());
    if qd.len() != 4
        || kd.len() != 4
        || ks != vs
        || qd[0] != kd[0]
        || qd[1] != kd[1]
        || qd[3] != kd[3]
    {
        return Err(b.error(
            op,
            format!(
                "q must be [B,T,N,H] and k, v [B,T,G,H] with equal B, T, H: got q {}, k {}, v {}",
                qs.short(),
                ks.short(),
                vs.short()
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
    d.validate().map_err(|e| b.error(op, e.to_string()))?;
    Ok(d)
}

fn f32_shape(dims: &[usize]) -> Shape {
    Shape::array(ElementType::F32, &dims_i64(dims))
}

/// The tuple of f32 arrays of dims `parts` (a block's outputs).
pub(crate) fn f32_tuple(parts: &[&[usize]]) -> Shape {
    Shape::tuple(parts.iter().map(|p| f32_shape(p)).collect())
}

/// The forward block as a tuple op `(o, chunk_states, final_state)`, without a VJP.
/// `lowering` must be concrete (not `Auto`).
pub fn rla_fwd_block(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    cfg: &RlaConfig,
    lowering: Lowering,
) -> Result<Op> {
    let d = check_shapes(b, q, k, v, cfg)?;
    let lowering = lowering.resolved("rla_fwd_block")?;
    let _s = b.name_scope("fwd");
    match lowering {
        Lowering::Hlo => return crate::hlo::rla_fwd_hlo(b, q, k, v, cfg),
        Lowering::Triton => return crate::lang::rla::triton_fwd(b, (q, k, v), cfg, &d),
        Lowering::Mosaic => return crate::lang::rla_mosaic::mosaic_fwd(b, (q, k, v), cfg, &d),
        _ => {}
    }
    let out = f32_tuple(&[
        &d.q_shape(),
        &d.chunk_states_shape(cfg),
        &d.final_state_shape(),
    ]);
    b.custom_call(FWD_TARGET, &[q, k, v], out, &attrs(cfg))
}

/// The backward block as a tuple op `(dq, dk, dv)` (f32). `lowering` must be concrete (not `Auto`).
pub fn rla_bwd_block(
    b: &Builder,
    (q, k, v): (Op, Op, Op),
    chunk_states: Op,
    d_o: Op,
    cfg: &RlaConfig,
    lowering: Lowering,
) -> Result<Op> {
    let d = check_shapes(b, q, k, v, cfg)?;
    let lowering = lowering.resolved("rla_bwd_block")?;
    let _s = b.name_scope("bwd");
    match lowering {
        Lowering::Hlo => return crate::hlo::rla_bwd_hlo(b, q, k, v, chunk_states, d_o, cfg),
        Lowering::Triton => {
            return crate::lang::rla::triton_bwd(b, (q, k, v), chunk_states, d_o, cfg, &d)
        }
        Lowering::Mosaic => {
            return crate::lang::rla_mosaic::mosaic_bwd(b, (q, k, v), chunk_states, d_o, cfg, &d)
        }
        _ => {}
    }
    let out = f32_tuple(&[&d.q_shape(), &d.kv_shape(), &d.kv_shape()]);
    b.custom_call(BWD_TARGET, &[q, k, v, chunk_states, d_o], out, &attrs(cfg))
}

/// The custom VJP of a forward custom call whose first output is the only differentiable one
/// (the others are saved state): `backward(b, inputs, forward_output, d_out)` builds one
/// gradient per input (`None` for data such as ids or positions). A cotangent on the saved
/// state is an error naming `op` with `message`; without a cotangent on the first output every
/// gradient is `None`. Inside a manual region the forward call is `{manual}`, and autodiff
/// builds this rule in a manual scope: the backward call runs on the same per-device pieces.
pub(crate) struct CallVjp<F> {
    /// The op errors name.
    pub(crate) op: &'static str,
    /// The error for a cotangent on the saved state.
    pub(crate) message: &'static str,
    /// Builds the gradients.
    pub(crate) backward: F,
}

impl<F> hlo_builder::autodiff::VjpRule for CallVjp<F>
where
    F: Fn(&Builder, &[Op], Op, Op) -> Result<Vec<Option<Op>>> + Send + Sync,
{
    fn vjp(
        &self,
        b: &Builder,
        inputs: &[Op],
        output: Op,
        cts: &[Option<Op>],
    ) -> Result<Vec<Option<Op>>> {
        match output_cotangent(b, self.op, self.message, cts)? {
            Some(d_out) => (self.backward)(b, inputs, output, d_out),
            None => Ok(vec![None; inputs.len()]),
        }
    }
}

/// [`CallVjp`] for a call over `(q, k, v)` (and possibly more non-differentiable inputs after
/// them) whose backward call returns the f32 tuple `(dq, dk, dv)`: `backward(b, (q, k, v),
/// forward_output, d_o)` builds that call; the gradients come back in each input's dtype.
pub(crate) fn qkv_vjp<F>(
    op: &'static str,
    message: &'static str,
    backward: F,
) -> impl hlo_builder::autodiff::VjpRule
where
    F: Fn(&Builder, (Op, Op, Op), Op, Op) -> Result<Op> + Send + Sync + 'static,
{
    CallVjp {
        op,
        message,
        backward: move |b: &Builder, inputs: &[Op], output: Op, d_o: Op| {
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            let g = backward(b, (q, k, v), output, d_o)?;
            let mut grads = qkv_grads(b, g, [q, k, v])?;
            grads.resize(inputs.len(), None);
            Ok(grads)
        },
    }
}

/// The cotangent of a custom call's first output (`None` when it has none), for a call whose
/// other outputs are saved state; a cotangent on those is an error naming `op` with `message`.
#[track_caller]
pub(crate) fn output_cotangent(
    b: &Builder,
    op: &'static str,
    message: &str,
    cts: &[Option<Op>],
) -> Result<Option<Op>> {
    if cts.iter().skip(1).any(Option::is_some) {
        return Err(b.error(op, message));
    }
    Ok(cts.first().copied().flatten())
}

/// The gradients of `inputs` from the f32 tuple `g` of a backward call, each converted to its
/// input's dtype.
pub(crate) fn qkv_grads(b: &Builder, g: Op, inputs: [Op; 3]) -> Result<Vec<Option<Op>>> {
    let mut out = Vec::new();
    for (i, x) in inputs.into_iter().enumerate() {
        let gi = b.get_tuple_element(g, i)?;
        let ty = b.shape(x)?.ty().unwrap_or(ElementType::F32);
        out.push(Some(if ty == ElementType::F32 {
            gi
        } else {
            b.convert(gi, ty)?
        }));
    }
    Ok(out)
}

/// RLA outputs with the block's saved state.
pub struct RlaOutputs {
    /// `o f32[B,T,N,H]` (differentiable).
    pub o: Op,
    /// `chunk_states f32[B,G,n_chunks,2H,H]`.
    pub chunk_states: Op,
    /// `final_state f32[B,G,2H,H]`: the state after all T tokens (what decode continues from).
    pub final_state: Op,
}

/// Add RLA to the graph and return all three outputs; `grad` through `o` uses `rla_bwd`.
///
/// `lowering` must be concrete (`CustomCall`, `Triton` or `Hlo`): resolve `Auto` for the platform the graph
/// will run on with [`Lowering::for_platform`]; an unresolved `Auto` is an error.
pub fn rla_with_state(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    cfg: &RlaConfig,
    lowering: Lowering,
) -> Result<RlaOutputs> {
    lowering.resolved("rla")?;
    let fwd = rla_fwd_block(b, q, k, v, cfg, lowering)?;
    let cfg = *cfg;
    let vjp = qkv_vjp(
        "rla",
        "gradients flow only through rla's output o; chunk_states and final_state are not \
         differentiable",
        move |b: &Builder, qkv, output, d_o| {
            let chunk_states = b.get_tuple_element(output, 1)?;
            rla_bwd_block(b, qkv, chunk_states, d_o, &cfg, lowering)
        },
    );
    b.custom_vjp(&[q, k, v], fwd, Arc::new(vjp))?;
    Ok(RlaOutputs {
        o: b.get_tuple_element(fwd, 0)?,
        chunk_states: b.get_tuple_element(fwd, 1)?,
        final_state: b.get_tuple_element(fwd, 2)?,
    })
}

/// Add residual linear attention over q `[B,T,N,H]`, k, v `[B,T,G,H]`; returns `o f32[B,T,N,H]`.
///
/// `lowering` must be concrete, as for [`rla_with_state`].
pub fn rla(b: &Builder, q: Op, k: Op, v: Op, cfg: &RlaConfig, lowering: Lowering) -> Result<Op> {
    Ok(rla_with_state(b, q, k, v, cfg, lowering)?.o)
}

/// [`rla_with_state`] on q `[B,T,N,H]`, k, v `[B,T,G,H]` laid out across devices by `qkv` (a
/// sharding of the `[B,T,heads,H]` arrays: cuts of the batch, the sequence and the heads), as a
/// manually partitioned region — the `shard_map` pattern: q, k, v go from full to per-device
/// pieces (`SPMDFullToShardShape`), both blocks run `{manual}` on each device's piece, and o,
/// chunk_states, final_state go back to full values (`SPMDShardToFullShape`). The XLA
/// partitioner cannot split the blocks' custom calls (nor see through the `while` lowering);
/// inside the region it does not have to.
///
/// Both q's `N` and k/v's `G` heads are cut into the same number of contiguous pieces, so
/// every query head sits with its kv head (`g = n / (N/G)`). With `qkv` replicated this is
/// [`rla_with_state`].
///
/// **Sequence parallelism** (T cut into S shards of T/S tokens) is exact: shard `i` at offset
/// `off = i·T/S` needs the keys s ≤ t − W − 1 of each of its queries t. It runs the blocks with
/// window 0 on k, v shifted by W tokens (k̃_j = k_{off+j−W}: the W tokens before the shard come
/// as a halo through `collective-permute`, from several shards when W > T/S, zeros before the
/// sequence start), which covers the keys off − W ≤ s ≤ t − W − 1; the earlier keys are the
/// state h0 = Σ_{shards r < i} Σ_j φ(k̃ʳ_j)ᵀ ṽʳ_j, an exclusive prefix sum over the shards
/// (all-gather of each shard's contribution, masked sum), and o = block(q, k̃, ṽ) + φ(q)·h0
/// (RLA is linear in its state). With the custom-call lowering the contribution is one kernel
/// call ([`rla_kv_state`]) and the block starts its scan from h0 ([`rla_with_state_h0`]: φ(q)·h0,
/// the saved states' h0 and dh0 inside the kernels); the other lowerings (and
/// `cfg.seq_state` = [`SeqState::Hlo`]) add φ(q)·h0 and the contribution as graph ops. Gradients flow
/// through h0 back into the earlier shards' k and v (the transposes of the collectives).
/// final_state is the last shard's, on every shard; chunk_states are each shard's saved states
/// plus its h0 (`[B, G, S·⌈(T/S)/chunk⌉, 2H, H]`, the unsharded ones when chunk divides T/S).
///
/// Errors: a cut of H, or a dim that does not divide.
pub fn rla_in_region(
    b: &Builder,
    (q, k, v): (Op, Op, Op),
    cfg: &RlaConfig,
    lowering: Lowering,
    qkv: &Sharding,
) -> Result<RlaOutputs> {
    let d = check_shapes(b, q, k, v, cfg)?;
    let tiles = region_tiles_cut(b, "rla_in_region", "RLA", qkv, [true, true, true, false])?;
    if tiles.iter().all(|&t| t == 1) {
        return rla_with_state(b, q, k, v, cfg, lowering);
    }
    let seq = if tiles[1] > 1 {
        Some(SeqShards::new(b, qkv, 4, 1)?)
    } else {
        None
    };
    let local = on_region_shards(b, (q, k, v), qkv, |ql, kl, vl| match &seq {
        None => rla_with_state(b, ql, kl, vl, cfg, lowering),
        Some(seq) => rla_seq_shard(b, seq, (ql, kl, vl), d.seq, cfg, lowering, None),
    })?;
    rla_region_outputs(b, local, qkv, &d)
}

/// The full values of a region's per-device RLA outputs `local` (made inside the manual scope
/// of q/k/v laid out by `qkv`, RLA dims `d` of the full arrays): o like q, chunk_states and
/// final_state cut by batch and heads (and the chunk_states by the sequence shards), copies
/// elsewhere. Call it outside the manual scope.
pub fn rla_region_outputs(
    b: &Builder,
    local: RlaOutputs,
    qkv: &Sharding,
    d: &RlaDims,
) -> Result<RlaOutputs> {
    let tiles = region_tiles(b, "rla_in_region", qkv)?;
    let full = |op: Op| -> Result<Vec<i64>> { Ok(b.shape(op)?.dims().to_vec()) };
    let mut cs_full = full(local.chunk_states)?;
    cs_full[0] *= tiles[0] as i64;
    cs_full[1] *= tiles[2] as i64;
    cs_full[2] *= tiles[1] as i64;
    let states = derived_sharding(qkv, &[Some(0), Some(2), None, None]);
    Ok(RlaOutputs {
        o: b.shard_to_full(local.o, qkv.clone(), &dims_i64(&d.q_shape()))?,
        chunk_states: b.shard_to_full(
            local.chunk_states,
            derived_sharding(qkv, &[Some(0), Some(2), Some(1), None, None]),
            &cs_full,
        )?,
        final_state: b.shard_to_full(
            local.final_state,
            states,
            &dims_i64(&d.final_state_shape()),
        )?,
    })
}

/// The number of tokens before a sequence shard whose keys and values [`rla_seq_shard`] needs
/// from the earlier shards: the shift W (capped at the sequence length `t`), at most the
/// (S − 1)·`tl` tokens of the shards before the last (S shards of `tl` tokens).
pub fn rla_halo_len(cfg: &RlaConfig, t: usize, shards: usize, tl: usize) -> usize {
    cfg.window.min(t).min(shards.saturating_sub(1) * tl)
}

/// `v` as HLO dims.
pub(crate) fn dims_i64(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// The tiles per dim of the `[B,T,heads,H]` sharding `qkv` of a manual region; errors name `op`.
#[track_caller]
pub(crate) fn region_tiles(b: &Builder, op: &'static str, qkv: &Sharding) -> Result<Vec<usize>> {
    qkv.tiles_per_dim(4)
        .map_err(|e| b.error(op, format!("q/k/v sharding: {}", e.message)))
}

/// [`region_tiles`], checked against the dims a region may cut (`may_cut`, over
/// `[B, T, heads, H]`): a cut of another dim is an error naming `op`, the `region` and the dims.
#[track_caller]
pub(crate) fn region_tiles_cut(
    b: &Builder,
    op: &'static str,
    region: &str,
    qkv: &Sharding,
    may_cut: [bool; 4],
) -> Result<Vec<usize>> {
    const DIMS: [&str; 4] = ["batch B", "sequence T", "heads", "head dim H"];
    let tiles = region_tiles(b, op, qkv)?;
    let bad: Vec<String> = (0..4)
        .filter(|&i| !may_cut[i] && tiles[i] != 1)
        .map(|i| format!("the {} into {} pieces", DIMS[i], tiles[i]))
        .collect();
    if bad.is_empty() {
        return Ok(tiles);
    }
    let allowed: Vec<&str> = (0..4).filter(|&i| may_cut[i]).map(|i| DIMS[i]).collect();
    Err(b.error(
        op,
        format!(
            "the {region} region splits only {}, but the q/k/v sharding cuts {}",
            allowed.join(", "),
            bad.join(" and ")
        ),
    ))
}

/// The body of a manual region (the `shard_map` pattern): q, k, v go from full values to the
/// per-device pieces laid out by `qkv` (`SPMDFullToShardShape`), and `local` builds on those
/// pieces in a manual scope. The caller brings its outputs back with `shard_to_full`, outside.
pub(crate) fn on_region_shards<T>(
    b: &Builder,
    (q, k, v): (Op, Op, Op),
    qkv: &Sharding,
    local: impl FnOnce(Op, Op, Op) -> Result<T>,
) -> Result<T> {
    let (ql, kl, vl) = (
        b.full_to_shard(q, qkv.clone())?,
        b.full_to_shard(k, qkv.clone())?,
        b.full_to_shard(v, qkv.clone())?,
    );
    let _m = b.manual_scope();
    local(ql, kl, vl)
}

/// `Σ_s φ(k_s)ᵀ v_s` `f32[B,G,2H,H]` over all T keys of k, v `[B,T,G,H]` as the custom call
/// `rattention.rla_kv_state`, whose VJP is `rattention.rla_kv_state_bwd` (CPU kernels,
/// [`crate::kernel::rla_kv_state`]): the state a sequence shard's keys add to the scan.
pub fn rla_kv_state(b: &Builder, k: Op, v: Op, fm: crate::FeatureMap) -> Result<Op> {
    let (ks, vs) = (b.shape(k)?, b.shape(v)?);
    let kd = ks.dims().to_vec();
    if kd.len() != 4 || ks.dims() != vs.dims() {
        return Err(b.error(
            "rla_kv_state",
            format!(
                "k and v must both be [B,T,G,H], got k {}, v {}",
                ks.short(),
                vs.short()
            ),
        ));
    }
    let attrs = [("feature_map", Attr::Str(fm.as_str().to_string()))];
    let state = Shape::array(ElementType::F32, &[kd[0], kd[2], 2 * kd[3], kd[3]]);
    let fwd = b.custom_call(KV_STATE_TARGET, &[k, v], state, &attrs)?;
    let vjp = move |b: &Builder, ins: &[Op], _out: Op, cts: &[Option<Op>]| {
        let Some(ds) = cts[0] else {
            return Ok(vec![None, None]);
        };
        let out = Shape::tuple(vec![f32_shape_i64(&kd), f32_shape_i64(&kd)]);
        let g = {
            let _s = b.name_scope("rla_kv_state_bwd");
            b.custom_call(KV_STATE_BWD_TARGET, &[ins[0], ins[1], ds], out, &attrs)?
        };
        let mut grads = Vec::with_capacity(2);
        for (i, &x) in ins.iter().enumerate() {
            let gi = b.get_tuple_element(g, i)?;
            let ty = b.shape(x)?.ty().unwrap_or(ElementType::F32);
            grads.push(Some(if ty == ElementType::F32 {
                gi
            } else {
                b.convert(gi, ty)?
            }));
        }
        Ok(grads)
    };
    b.custom_vjp(&[k, v], fwd, Arc::new(vjp))?;
    Ok(fwd)
}

fn f32_shape_i64(dims: &[i64]) -> Shape {
    Shape::array(ElementType::F32, dims)
}

/// [`rla_with_state`] whose scan starts from the state `h0` `f32[B,G,2H,H]` (custom-call
/// lowering only: `rattention.rla_fwd_h0`, [`crate::kernel::rla_fwd_h0`]): o includes
/// φ(q)·h0, chunk_states and final_state include h0. Differentiable in q, k, v and h0 through
/// o and final_state (`rattention.rla_bwd_h0`); a cotangent on chunk_states is an error.
///
/// `contrib`, when given, must be [`rla_kv_state`] of the same k, v and feature map (the keys'
/// own contribution `f32[B,G,2H,H]`): the kernel then derives the final state from it instead
/// of scanning the last chunk's keys again ([`crate::kernel::rla_fwd_h0_with_contrib`]). It is
/// a hint, not an input of the VJP: the gradients are those of the scan from k and v.
pub fn rla_with_state_h0(
    b: &Builder,
    (q, k, v): (Op, Op, Op),
    h0: Op,
    contrib: Option<Op>,
    cfg: &RlaConfig,
) -> Result<RlaOutputs> {
    let d = check_shapes(b, q, k, v, cfg)?;
    let fs_shape = f32_shape(&d.final_state_shape());
    for (x, what) in std::iter::once((h0, "h0")).chain(contrib.map(|c| (c, "contrib"))) {
        if b.shape(x)? != fs_shape {
            return Err(b.error(
                "rla_with_state_h0",
                format!(
                    "{what} must be f32[B,G,2H,H] = {}, got {}",
                    fs_shape.short(),
                    b.shape(x)?.short()
                ),
            ));
        }
    }
    let out = f32_tuple(&[
        &d.q_shape(),
        &d.chunk_states_shape(cfg),
        &d.final_state_shape(),
    ]);
    let fwd = {
        let _s = b.name_scope("fwd");
        let mut operands = vec![q, k, v, h0];
        operands.extend(contrib);
        b.custom_call(FWD_H0_TARGET, &operands, out, &attrs(cfg))?
    };
    let cfg = *cfg;
    let vjp = move |b: &Builder, ins: &[Op], output: Op, cts: &[Option<Op>]| {
        if cts.get(1).copied().flatten().is_some() {
            return Err(b.error(
                "rla_with_state_h0",
                "gradients flow through o and final_state; chunk_states are not differentiable",
            ));
        }
        let (d_o, d_fs) = (cts[0], cts.get(2).copied().flatten());
        if d_o.is_none() && d_fs.is_none() {
            return Ok(vec![None; 4]);
        }
        let d_o = match d_o {
            Some(x) => x,
            None => b.zeros(ElementType::F32, &dims_i64(&d.q_shape()))?,
        };
        let chunk_states = b.get_tuple_element(output, 1)?;
        let mut operands = vec![ins[0], ins[1], ins[2], chunk_states, d_o];
        operands.extend(d_fs);
        let ret = f32_tuple(&[
            &d.q_shape(),
            &d.kv_shape(),
            &d.kv_shape(),
            &d.final_state_shape(),
        ]);
        let g = {
            let _s = b.name_scope("bwd");
            b.custom_call(BWD_H0_TARGET, &operands, ret, &attrs(&cfg))?
        };
        let mut grads = qkv_grads(b, g, [ins[0], ins[1], ins[2]])?;
        grads.push(Some(b.get_tuple_element(g, 3)?));
        Ok(grads)
    };
    b.custom_vjp(&[q, k, v, h0], fwd, Arc::new(vjp))?;
    Ok(RlaOutputs {
        o: b.get_tuple_element(fwd, 0)?,
        chunk_states: b.get_tuple_element(fwd, 1)?,
        final_state: b.get_tuple_element(fwd, 2)?,
    })
}

/// One sequence shard of RLA, inside the manual scope (see [`rla_in_region`]): q `[B,Tl,N,H]`,
/// k, v `[B,Tl,G,H]` of the shard, `t` the full sequence length. `halo` is the keys and values
/// `[B,L,G,H]` of the L = [`rla_halo_len`] tokens before the shard, when the caller has already
/// exchanged them (a local layer shares one exchange between SWA and RLA); `None` exchanges them
/// here (`collective-permute`). `cfg.seq_state` picks how the prefix state is composed
/// ([`SeqState`]): the kernels from h0 (`Kernel`, or `Auto` with [`Lowering::CustomCall`]) or
/// graph ops (`Hlo`, or `Auto` with another lowering).
///
/// Errors: `cfg.seq_state` = `Kernel` with a lowering other than the custom call, a halo of the
/// wrong shape.
pub fn rla_seq_shard(
    b: &Builder,
    seq: &SeqShards,
    (q, k, v): (Op, Op, Op),
    t: usize,
    cfg: &RlaConfig,
    lowering: Lowering,
    halo: Option<(Op, Op)>,
) -> Result<RlaOutputs> {
    let kd = b.shape(k)?.dims().to_vec();
    let (bs, tl, g, h) = (kd[0], kd[1] as usize, kd[2], kd[3]);
    let qd = b.shape(q)?.dims().to_vec();
    let n = qd[2];
    let s = seq.shards();
    // Shifting by ≥ T leaves nothing: the shift is capped at T, the halo at the S − 1 shards
    // before the last.
    let shift = cfg.window.min(t);
    let hl = rla_halo_len(cfg, t, s, tl);
    let halos = match halo {
        Some((hk, hv)) => {
            for (x, what) in [(hk, "k"), (hv, "v")] {
                let got = b.shape(x)?.dims().to_vec();
                if got != [bs, hl as i64, g, h] {
                    return Err(b.error(
                        "rla_seq_shard",
                        format!(
                            "the {what} halo must be [B, L, G, H] = [{bs}, {hl}, {g}, {h}] \
                             (L = min(W, T, (S − 1)·T/S)), got {got:?}"
                        ),
                    ));
                }
            }
            Some((hk, hv))
        }
        None if hl > 0 => Some((seq.halo(b, k, 1, hl)?, seq.halo(b, v, 1, hl)?)),
        None => None,
    };
    let shifted = |x: Op, before: Option<Op>| -> Result<Op> {
        if shift == 0 {
            return Ok(x);
        }
        let mut parts = Vec::new();
        if shift > hl {
            let ty = b.shape(x)?.ty().unwrap_or(ElementType::F32);
            parts.push(b.zeros(ty, &[bs, (shift - hl) as i64, g, h])?);
        }
        if let Some(p) = before {
            parts.push(p);
        }
        parts.push(x);
        b.slice_in_dim(b.concatenate(&parts, 1)?, 0, tl as i64, 1)
    };
    let (ks, vs) = (
        shifted(k, halos.map(|h| h.0))?,
        shifted(v, halos.map(|h| h.1))?,
    );
    let cfg0 = RlaConfig { window: 0, ..*cfg };
    let in_kernels = match cfg.seq_state {
        SeqState::Auto => lowering == Lowering::CustomCall,
        SeqState::Hlo => false,
        SeqState::Kernel if lowering == Lowering::CustomCall => true,
        SeqState::Kernel => {
            return Err(b.error(
                "rla_seq_shard",
                format!(
                    "seq_state = \"kernel\" composes the prefix state in the CPU kernels \
                     (rla_kv_state, rla_fwd_h0) and needs the custom_call lowering, got \
                     lowering {lowering}; use seq_state = \"auto\" or \"hlo\""
                ),
            ))
        }
    };
    if in_kernels {
        // The shard's contribution, the prefix over the shards before it, and the scan from
        // that prefix: φ(q)·h0, the saved states' h0 and dh0 are the kernels' work. The scan
        // gets the contribution too, so it does not scan the shard's keys again for the final
        // state (one parallel pass at W = 0 with one chunk).
        let contrib = rla_kv_state(b, ks, vs, cfg.feature_map)?;
        let h0 = seq.exclusive_sum(b, contrib)?;
        let out = rla_with_state_h0(b, (q, ks, vs), h0, Some(contrib), &cfg0)?;
        return Ok(RlaOutputs {
            final_state: seq.last(b, out.final_state)?,
            ..out
        });
    }
    let out = rla_with_state(b, q, ks, vs, &cfg0, lowering)?;
    // This shard's state contribution Σ_j φ(k̃_j)ᵀ ṽ_j  [B, G, 2H, H].
    let f32 = |x: Op| -> Result<Op> {
        if b.shape(x)?.ty() == Some(ElementType::F32) {
            Ok(x)
        } else {
            b.convert(x, ElementType::F32)
        }
    };
    let fk = crate::feature_map(b, ks, cfg.feature_map)?;
    let batch_t = hlo_builder::DotDims {
        lhs_batch: vec![0, 2],
        rhs_batch: vec![0, 2],
        lhs_contracting: vec![1],
        rhs_contracting: vec![1],
    };
    let contrib = b.dot_general(fk, f32(vs)?, &batch_t, None, None)?;
    let h0 = seq.exclusive_sum(b, contrib)?;
    // o += φ(q)·h0, query head n reading kv head n / (N/G).
    let r = n / g;
    let fq = b.reshape(
        crate::feature_map(b, q, cfg.feature_map)?,
        &[bs, tl as i64, g, r, 2 * h],
    )?;
    let read = hlo_builder::DotDims {
        lhs_batch: vec![0, 2],
        rhs_batch: vec![0, 1],
        lhs_contracting: vec![4],
        rhs_contracting: vec![2],
    };
    let prior = b.dot_general(fq, h0, &read, None, None)?; // [B, G, Tl, R, H]
    let prior = b.reshape(
        b.transpose(prior, &[0, 2, 1, 3, 4])?,
        &[bs, tl as i64, n, h],
    )?;
    let o = b.add(out.o, prior)?;
    let cs_dims = b.shape(out.chunk_states)?.dims().to_vec();
    let chunk_states = b.add(
        out.chunk_states,
        b.broadcast_in_dim(h0, &cs_dims, &[0, 1, 3, 4])?,
    )?;
    let final_state = seq.last(b, b.add(out.final_state, h0)?)?;
    Ok(RlaOutputs {
        o,
        chunk_states,
        final_state,
    })
}
