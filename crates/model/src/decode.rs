//! Decoding (DESIGN §4): a prefill graph over the prompt and a one-token step graph, both carrying the
//! per-layer caches ([`CacheLayout`]) as explicit inputs and outputs so they stay on the device
//! between steps.
//!
//! At step `t` a local layer first absorbs the token leaving the window: if `t ≥ W+1`, slot
//! `t mod (W+1)` holds token `t−W−1`, so `S += φ(k)ᵀ v` for its raw key (the ring's rotated key
//! turned back by RoPE at position `t−W−1`, or the `k_raw` ring with qk-norm); then the slot is
//! overwritten with token `t`, its key normalised and rotated once, at write. SWA attends over the
//! W+1 slots (valid ones only) as stored, RLA reads `φ(q_t)·S` with the raw q, and the two outputs
//! are mixed exactly as in [`Model::attention_core`]. Caches are head-major `[B, G, slots, H]`
//! ([`crate::cache`]).

use crate::cache::{CacheBytes, CacheLayout, LayerCache, LayerCacheOps};
use crate::layers::{bcast, dims, rope};
use crate::model::{Attention, Model};
use crate::transformer::{mix_local, ParamOps};
use hlo_builder::Error;
use hlo_builder::{Builder, Cmp, Computation, DotDims, ElementType, Op, Result, Shape};
use pallas_port::decode::{absorb, read};
use std::ops::Range;

const F32: ElementType = ElementType::F32;
const S32: ElementType = ElementType::S32;

/// Where the arguments and results of [`Model::prefill`] and [`Model::decode_step`] sit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeIo {
    /// Parameters, the leading arguments of both graphs ([`Model::param_specs`] order).
    pub params: Range<usize>,
    /// The prompt `s32[B, L]`, the prefill's last argument.
    pub prompt: usize,
    /// The cache among the decode step's arguments ([`CacheLayout::buffers`] order).
    pub cache: Range<usize>,
    /// The token `s32[B]` among the decode step's arguments.
    pub token: usize,
    /// The position `s32[]` among the decode step's arguments.
    pub pos: usize,
    /// The logits among the results of both graphs.
    pub logits: usize,
    /// The cache among the results of both graphs.
    pub cache_out: Range<usize>,
}

impl DecodeIo {
    /// Split the results of either graph into the logits and the cache.
    pub fn split_results<T>(&self, results: Vec<T>) -> Option<(T, Vec<T>)> {
        if results.len() != 1 + self.cache_out.len() {
            return None;
        }
        let mut slots: Vec<Option<T>> = results.into_iter().map(Some).collect();
        let logits = slots[self.logits].take()?;
        let cache = self
            .cache_out
            .clone()
            .map(|i| slots[i].take())
            .collect::<Option<Vec<T>>>()?;
        Some((logits, cache))
    }

    /// The decode step's arguments from the parameters, the cache, the token and the position.
    pub fn step_arguments<T>(&self, params: Vec<T>, cache: Vec<T>, token: T, pos: T) -> Vec<T> {
        assert_eq!(params.len(), self.params.len(), "parameters");
        assert_eq!(cache.len(), self.cache.len(), "cache buffers");
        let mut slots: Vec<Option<T>> = (0..self.pos.max(self.token) + 1).map(|_| None).collect();
        for (i, p) in self.params.clone().zip(params) {
            slots[i] = Some(p);
        }
        for (i, c) in self.cache.clone().zip(cache) {
            slots[i] = Some(c);
        }
        slots[self.token] = Some(token);
        slots[self.pos] = Some(pos);
        slots
            .into_iter()
            .map(|s| s.expect("every argument position is filled once"))
            .collect()
    }
}

#[track_caller]
fn check_sizes(what: &'static str, batch: usize, max_len: usize) -> Result<()> {
    if batch == 0 || max_len == 0 {
        return Err(Error::invalid(
            what,
            format!("batch ({batch}) and max_len ({max_len}) must be > 0"),
        ));
    }
    Ok(())
}

/// `[B, T, G, H]` to the caches' head-major `[B, G, T, H]`.
fn head_major(b: &Builder, x: Op) -> Result<Op> {
    b.transpose(x, &[0, 2, 1, 3])
}

/// One token's `[B, 1, G, H]` as a cache slot `[B, G, 1, H]` (the same elements in the same
/// order, so a reshape).
fn as_slot(b: &Builder, x: Op) -> Result<Op> {
    let d = dims(b, x)?;
    b.reshape(x, &[d[0], d[2], 1, d[3]])
}

/// Ring buffer `[B, G, W+1, H]` holding the last `min(L, W+1)` tokens of `x [B, L, G, H]` in slot
/// `p mod (W+1)`; slots never written are zero.
fn ring_from_prompt(b: &Builder, x: Op, window: usize) -> Result<Op> {
    let d = dims(b, x)?;
    let (l, m) = (d[1], window as i64 + 1);
    if l < m {
        let zero = b.scalar(0.0f32)?;
        return head_major(
            b,
            b.pad(x, zero, &[(0, 0, 0), (0, m - l, 0), (0, 0, 0), (0, 0, 0)])?,
        );
    }
    // last[i] is position L−m+i, which belongs in slot (r + i) mod m with r = L mod m.
    let last = b.slice_in_dim(x, l - m, l, 1)?;
    let r = l % m;
    if r == 0 {
        return head_major(b, last);
    }
    head_major(
        b,
        b.concatenate(
            &[
                b.slice_in_dim(last, m - r, m, 1)?,
                b.slice_in_dim(last, 0, m - r, 1)?,
            ],
            1,
        )?,
    )
}

impl Model {
    /// The layout of the decode cache for `batch` sequences of up to `max_len` tokens.
    pub fn cache_layout(&self, batch: usize, max_len: usize) -> CacheLayout {
        CacheLayout::new(self, batch, max_len)
    }

    /// The signature of [`Model::prefill`] and [`Model::decode_step`].
    pub fn decode_io(&self, batch: usize, max_len: usize) -> DecodeIo {
        let (np, nc) = (
            self.param_specs().len(),
            self.cache_layout(batch, max_len).buffers().len(),
        );
        DecodeIo {
            params: 0..np,
            prompt: np,
            cache: np..np + nc,
            token: np + nc,
            pos: np + nc + 1,
            logits: 0,
            cache_out: 1..1 + nc,
        }
    }

    /// Per-sequence cache bytes at `context` tokens in the paper's accounting
    /// ([`CacheLayout::nominal_bytes`]).
    pub fn cache_bytes(&self, context: usize) -> CacheBytes {
        self.cache_layout(1, context).nominal_bytes()
    }

    /// `params..., tokens s32[B, L] -> tuple(logits f32[B, L, V], cache...)`: the prefill of `L`
    /// prompt tokens. The logits equal [`Model::forward`]'s; the caches (in
    /// [`CacheLayout::buffers`] order) are what [`Model::decode_step`] continues from at position
    /// `L`: ring buffers holding the last W+1 tokens in slot `t mod (W+1)` (keys after qk-norm and
    /// RoPE at their positions; raw keys in `k_raw` where the layout has it), the RLA state after
    /// token `L−W−2` (the block's `final_state`; zero when `L ≤ W+1`), and the global caches
    /// filled up to position `L−1`. Needs `L ≤ max_len`. `platform` is where the graph runs (it
    /// picks the RLA lowering, see [`Model::rla_lowering`]); the decode step has no RLA block and
    /// runs anywhere.
    pub fn prefill(
        &self,
        batch: usize,
        prompt_len: usize,
        max_len: usize,
        platform: &str,
    ) -> Result<Computation> {
        check_sizes("prefill", batch, max_len)?;
        if prompt_len == 0 || prompt_len > max_len {
            return Err(Error::invalid(
                "prefill",
                format!("prompt_len ({prompt_len}) must be in 1..=max_len ({max_len})"),
            ));
        }
        let cfg = self.config();
        let layout = self.cache_layout(batch, max_len);
        let b = Builder::new("prefill");
        let (_, p) = self.declare_params(&b)?;
        let p = self.per_layer_params(&b, &p)?;
        let tokens = b.parameter(
            Shape::array(S32, &[batch as i64, prompt_len as i64]),
            "tokens",
        )?;
        let mut x = self.embed(&b, &p, tokens)?;
        let pos = b.iota(F32, &[prompt_len as i64], 0)?;
        let mut caches = Vec::new();
        for (i, &attn) in self.layers().iter().enumerate() {
            let _s = b.name_scope(&format!("layer_{i}"));
            x = self.block(&b, &p, i, x, false, |ap, q, k, v| {
                let (ctx, state) =
                    self.attention_core_with_state(&b, &p, ap, attn, (q, k, v), pos, platform)?;
                let _c = b.name_scope("cache");
                let kr = self.attn_keys(&b, &p, ap, attn, k, pos)?;
                caches.push(if attn.is_local() {
                    let raw = matches!(layout.layers[i], LayerCache::Ring { raw_keys: true, .. });
                    LayerCacheOps {
                        k: ring_from_prompt(&b, kr, cfg.window)?,
                        v: ring_from_prompt(&b, v, cfg.window)?,
                        k_raw: if raw {
                            Some(ring_from_prompt(&b, k, cfg.window)?)
                        } else {
                            None
                        },
                        rla_state: state,
                    }
                } else {
                    let zero = b.scalar(0.0f32)?;
                    let pad = [
                        (0, 0, 0),
                        (0, (max_len - prompt_len) as i64, 0),
                        (0, 0, 0),
                        (0, 0, 0),
                    ];
                    LayerCacheOps {
                        k: head_major(&b, b.pad(kr, zero, &pad)?)?,
                        v: head_major(&b, b.pad(v, zero, &pad)?)?,
                        k_raw: None,
                        rla_state: None,
                    }
                });
                Ok(ctx)
            })?;
        }
        let logits = self.head(&b, &p, x)?;
        let mut outs = vec![logits];
        outs.extend(layout.flatten(&caches)?);
        let root = b.tuple(&outs)?;
        b.build(root)
    }

    /// `params..., cache..., token s32[B], pos s32[] -> tuple(logits f32[B, V], cache'...)`: one
    /// token at position `pos` (its caches in [`CacheLayout::buffers`] order, holding positions
    /// `< pos`). Positions must stay below `max_len` (global caches clamp the write index
    /// otherwise). Each cache output aliases its cache parameter (`input_output_alias`), so a
    /// caller that donates the cache (`LoadedExecutable::execute_donating_some`) has it updated in
    /// place; a caller that does not donate gets a copy.
    pub fn decode_step(&self, batch: usize, max_len: usize) -> Result<Computation> {
        check_sizes("decode_step", batch, max_len)?;
        let layout = self.cache_layout(batch, max_len);
        let b = Builder::new("decode_step");
        let (_, p) = self.declare_params(&b)?;
        let cache_in = layout.declare(&b)?;
        let token = b.parameter(Shape::array(S32, &[batch as i64]), "token")?;
        let pos = b.parameter(Shape::array(S32, &[]), "pos")?;
        let (logits, cache_out) = self.step_core(&b, &p, &cache_in, token, pos)?;
        let mut outs = vec![logits];
        outs.extend(layout.flatten(&cache_out)?);
        let root = b.tuple(&outs)?;
        let io = self.decode_io(batch, max_len);
        alias_cache(b.build(root)?, io.cache, io.cache_out.start)
    }

    /// `params..., cache..., token s32[B], pos s32[] -> tuple(tokens s32[B, steps], logits f32[B,
    /// steps, V], cache'...)`: `steps` greedy decode steps in one dispatch, an HLO `while` around
    /// the step of [`Model::decode_step`] that carries the caches, the position and the token
    /// buffer. Step `i` feeds the token of step `i − 1` (`token` for `i = 0`) at position
    /// `pos + i`, writes its logits to `logits[:, i]` and their argmax (the first maximum, as the
    /// host's greedy pick) to `tokens[:, i]`. The arguments are those of [`Model::decode_step`]
    /// ([`DecodeIo::step_arguments`]); the results sit where [`LoopIo`] says. Every sequence of
    /// the batch is at the same position; `pos + steps ≤ max_len`. The cache outputs alias the
    /// cache parameters, as in [`Model::decode_step`].
    pub fn decode_loop(&self, batch: usize, max_len: usize, steps: usize) -> Result<Computation> {
        check_sizes("decode_loop", batch, max_len)?;
        if steps == 0 || steps > max_len {
            return Err(Error::invalid(
                "decode_loop",
                format!("steps ({steps}) must be in 1..=max_len ({max_len})"),
            ));
        }
        let layout = self.cache_layout(batch, max_len);
        let (bs, n, v) = (batch as i64, steps as i64, self.config().vocab as i64);
        let b = Builder::new("decode_loop");
        let (params, _) = self.declare_params(&b)?;
        let cache_in = layout.flatten(&layout.declare(&b)?)?;
        let token = b.parameter(Shape::array(S32, &[bs]), "token")?;
        let pos = b.parameter(Shape::array(S32, &[]), "pos")?;
        // Carry: (i, pos, token, tokens, logits, params..., cache...).
        const FIXED: usize = 5;
        let mut init = vec![
            b.scalar(0i32)?,
            pos,
            token,
            b.zeros(S32, &[bs, n])?,
            b.zeros(F32, &[bs, n, v])?,
        ];
        init.extend(&params);
        init.extend(&cache_in);
        let init = b.tuple(&init)?;
        let carry = b.shape(init)?;
        let np = params.len();
        let body = {
            let sb = b.sub_builder("decode_loop_body");
            let c = sb.parameter(carry.clone(), "carry")?;
            let e = (0..FIXED + np + cache_in.len())
                .map(|i| sb.get_tuple_element(c, i))
                .collect::<Result<Vec<Op>>>()?;
            let (i, pos, token, toks, lgs) = (e[0], e[1], e[2], e[3], e[4]);
            let p: ParamOps = self
                .param_specs()
                .iter()
                .zip(&e[FIXED..FIXED + np])
                .map(|(s, &op)| (s.name.clone(), op))
                .collect();
            let cache = layout.unflatten(&e[FIXED + np..])?;
            let (logits, cache) = self.step_core(&sb, &p, &cache, token, pos)?;
            let next = argmax_last(&sb, logits)?;
            let zero = sb.scalar(0i32)?;
            let toks = sb.dynamic_update_slice(toks, sb.reshape(next, &[bs, 1])?, &[zero, i])?;
            let lgs =
                sb.dynamic_update_slice(lgs, sb.reshape(logits, &[bs, 1, v])?, &[zero, i, zero])?;
            let one = sb.scalar(1i32)?;
            let mut out = vec![sb.add(i, one)?, sb.add(pos, one)?, next, toks, lgs];
            out.extend(&e[FIXED..FIXED + np]);
            out.extend(layout.flatten(&cache)?);
            let root = sb.tuple(&out)?;
            sb.build(root)?
        };
        let cond = {
            let cb = b.sub_builder("decode_loop_cond");
            let c = cb.parameter(carry, "carry")?;
            let i = cb.get_tuple_element(c, 0)?;
            let pred = cb.compare(i, cb.scalar(steps as i32)?, Cmp::Lt)?;
            cb.build(pred)?
        };
        let out = b.while_loop(&cond, &body, init)?;
        let mut outs = vec![b.get_tuple_element(out, 3)?, b.get_tuple_element(out, 4)?];
        for j in 0..cache_in.len() {
            outs.push(b.get_tuple_element(out, FIXED + np + j)?);
        }
        let root = b.tuple(&outs)?;
        let io = self.loop_io(batch, max_len);
        alias_cache(
            b.build(root)?,
            self.decode_io(batch, max_len).cache,
            io.cache_out.start,
        )
    }

    /// The results of [`Model::decode_loop`].
    pub fn loop_io(&self, batch: usize, max_len: usize) -> LoopIo {
        let nc = self.cache_layout(batch, max_len).buffers().len();
        LoopIo {
            tokens: 0,
            logits: 1,
            cache_out: 2..2 + nc,
        }
    }

    /// One decode step on graph values: the token `s32[B]` at position `pos` (`s32[]`) through
    /// every layer with its cache; returns the logits `[B, V]` and the updated caches.
    fn step_core(
        &self,
        b: &Builder,
        p: &ParamOps,
        cache_in: &[LayerCacheOps],
        token: Op,
        pos: Op,
    ) -> Result<(Op, Vec<LayerCacheOps>)> {
        let p = &self.per_layer_params(b, p)?;
        let batch = dims(b, token)?[0];
        let mut x = self.embed(b, p, b.reshape(token, &[batch, 1])?)?;
        let mut cache_out = Vec::new();
        for (i, (&attn, cache)) in self.layers().iter().zip(cache_in).enumerate() {
            let _s = b.name_scope(&format!("layer_{i}"));
            x = self.block(b, p, i, x, false, |ap, q, k, v| {
                let (ctx, c) = if attn.is_local() {
                    self.local_step(b, p, (ap, attn), (q, k, v), cache, pos)?
                } else {
                    self.global_step(b, p, (ap, attn), (q, k, v), cache, pos)?
                };
                cache_out.push(c);
                Ok(ctx)
            })?;
        }
        let vocab = self.config().vocab as i64;
        let logits = b.reshape(self.head(b, p, x)?, &[batch, vocab])?;
        Ok((logits, cache_out))
    }
}

/// Where the results of [`Model::decode_loop`] sit (its arguments are [`DecodeIo`]'s step
/// arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopIo {
    /// The greedy tokens `s32[B, steps]`.
    pub tokens: usize,
    /// The logits of every step `f32[B, steps, V]`.
    pub logits: usize,
    /// The cache, in [`CacheLayout::buffers`] order.
    pub cache_out: Range<usize>,
}

impl LoopIo {
    /// Split the loop's results into tokens, logits and the cache.
    pub fn split_results<T>(&self, results: Vec<T>) -> Option<(T, T, Vec<T>)> {
        if results.len() != 2 + self.cache_out.len() {
            return None;
        }
        let mut it = results.into_iter();
        let tokens = it.next()?;
        let logits = it.next()?;
        Some((tokens, logits, it.collect()))
    }
}

/// Let cache output `first_out + j` alias cache parameter `params.start + j`.
fn alias_cache(
    mut comp: Computation,
    params: Range<usize>,
    first_out: usize,
) -> Result<Computation> {
    for (j, param) in params.enumerate() {
        comp = comp.with_input_output_alias(first_out + j, param)?;
    }
    Ok(comp)
}

/// The index of the first maximum along the last dim of `x [B, V]`, `s32[B]` (greedy decoding;
/// the same tie rule as a host argmax that keeps the first of equal values).
fn argmax_last(b: &Builder, x: Op) -> Result<Op> {
    let d = dims(b, x)?;
    let (bs, v) = (d[0], d[1]);
    let max = bcast(b, b.reduce_max(x, &[1])?, &[bs, v], &[0])?;
    let idx = b.iota(S32, &[bs, v], 1)?;
    let at_max = b.compare(x, max, Cmp::Eq)?;
    let cand = b.select(at_max, idx, b.full(S32, v as f64, &[bs, v])?)?;
    b.reduce_min(cand, &[1])
}

/// Attention of one query token `q [B,1,N,H]` (rotated and scaled) over head-major
/// `k, v [B,G,S,H]` where key `s` is visible iff `visible[s]` (pred `[S]`); fp32 softmax. Both dots
/// take the cache as it lies (scores contract the minor dims, values read rows). Returns
/// `[B,1,N,H]`.
fn attend_one(b: &Builder, q: Op, k: Op, v: Op, visible: Op) -> Result<Op> {
    let (qd, kd) = (dims(b, q)?, dims(b, k)?);
    let (bs, n, h, g, s) = (qd[0], qd[2], qd[3], kd[1], kd[2]);
    let r = n / g;
    let qg = b.reshape(q, &[bs, g, r, h])?;
    let dd = DotDims {
        lhs_batch: vec![0, 1],
        rhs_batch: vec![0, 1],
        lhs_contracting: vec![3],
        rhs_contracting: vec![3],
    };
    let scores = b.dot_general(qg, k, &dd, None, Some(F32))?; // [B, G, R, S]
    let sd = [bs, g, r, s];
    let vis = bcast(b, visible, &sd, &[3])?;
    let p = b.softmax(b.select(vis, scores, b.full(F32, -1e30, &sd)?)?, -1)?;
    let dd = DotDims {
        lhs_batch: vec![0, 1],
        rhs_batch: vec![0, 1],
        lhs_contracting: vec![3],
        rhs_contracting: vec![2],
    };
    let o = b.dot_general(p, v, &dd, None, Some(F32))?; // [B, G, R, H]
    b.reshape(o, &[bs, 1, n, h])
}

impl Model {
    /// One local layer (parameters under `prefix`, kind `attn`) at position `pos` (s32 scalar)
    /// for projected `q [B,1,N,H]`, `k, v [B,1,G,H]`: returns the context `[B,1,N,H]` and the
    /// updated cache. The new key is normalised and rotated here, once; the ring's keys are used
    /// as stored.
    fn local_step(
        &self,
        b: &Builder,
        p: &ParamOps,
        (prefix, attn): (&str, Attention),
        (q, k, v): (Op, Op, Op),
        cache: &LayerCacheOps,
        pos: Op,
    ) -> Result<(Op, LayerCacheOps)> {
        let cfg = self.config();
        let fm = cfg.rla.feature_map;
        let qd = dims(b, q)?;
        let (bs, g, h) = (qd[0], dims(b, k)?[2], qd[3]);
        let m = cfg.window as i64 + 1;
        let zero = b.scalar(0i32)?;
        let slot = b.rem(pos, b.scalar(m as i32)?)?;
        let at_slot = [zero, zero, slot, zero];
        let qpos = b.reshape(b.convert(pos, F32)?, &[1])?;
        let state = match cache.rla_state {
            Some(state) => {
                let _s = b.name_scope("absorb");
                // The slot about to be overwritten holds token pos − W − 1 when pos ≥ W + 1.
                let old = |ring: Op| {
                    b.reshape(
                        b.dynamic_slice(ring, &at_slot, &[bs, g, 1, h])?,
                        &[bs, 1, g, h],
                    )
                };
                let old_k = match cache.k_raw {
                    Some(raw) => old(raw)?,
                    None => {
                        // Without qk-norm the ring holds RoPE(k) at the token's position: turn it
                        // back with the opposite angle (one position's cos/sin).
                        // −(pos − W − 1), exact in f32; the angle is exactly the negated one.
                        let minus = b.sub(b.constant_vec(vec![m as f32], &[1])?, qpos)?;
                        rope(b, old(cache.k)?, minus, cfg.rope_theta)?
                    }
                };
                let flat = |x: Op| b.reshape(x, &[bs, g, h]);
                let leaving = b.compare(pos, b.scalar(m as i32)?, Cmp::Ge)?;
                Some(absorb(
                    b,
                    state,
                    flat(old_k)?,
                    flat(old(cache.v)?)?,
                    leaving,
                    fm,
                )?)
            }
            None => None,
        };
        let kr = self.attn_keys(b, p, prefix, attn, k, qpos)?;
        let write = |ring: Op, x: Op| b.dynamic_update_slice(ring, as_slot(b, x)?, &at_slot);
        let new_cache = LayerCacheOps {
            k: write(cache.k, kr)?,
            v: write(cache.v, v)?,
            k_raw: match cache.k_raw {
                Some(raw) => Some(write(raw, k)?),
                None => None,
            },
            rla_state: state,
        };
        let swa = {
            let _s = b.name_scope("swa");
            // Slot j holds token pos − ((pos − j) mod (W+1)); negative means never written.
            let j = b.iota(S32, &[m], 0)?;
            let back = b.rem(
                b.add(
                    b.sub(bcast(b, pos, &[m], &[])?, j)?,
                    b.full(S32, m as f64, &[m])?,
                )?,
                b.full(S32, m as f64, &[m])?,
            )?;
            let slot_pos = b.sub(bcast(b, pos, &[m], &[])?, back)?;
            let valid = b.compare(slot_pos, b.zeros(S32, &[m])?, Cmp::Ge)?;
            let qr = self.attn_queries(b, p, prefix, attn, q, qpos)?;
            attend_one(b, qr, new_cache.k, new_cache.v, valid)?
        };
        let Some(s) = state else {
            return Ok((swa, new_cache));
        };
        let rla = {
            let _s = b.name_scope("rla");
            read(b, q, s, fm)?
        };
        let norm = self.config().rla.norm;
        Ok((mix_local(b, p, prefix, (swa, rla), norm, false)?, new_cache))
    }

    /// One global layer (parameters under `prefix`, kind `attn`) at position `pos`: writes k
    /// (after qk-norm, and RoPE at `pos` with `global_rope`) and v into the full caches and
    /// attends causally over positions `≤ pos`.
    fn global_step(
        &self,
        b: &Builder,
        p: &ParamOps,
        (prefix, attn): (&str, Attention),
        (q, k, v): (Op, Op, Op),
        cache: &LayerCacheOps,
        pos: Op,
    ) -> Result<(Op, LayerCacheOps)> {
        let max_len = dims(b, cache.k)?[2];
        let fpos = b.reshape(b.convert(pos, F32)?, &[1])?;
        let (qr, kn) = (
            self.attn_queries(b, p, prefix, attn, q, fpos)?,
            self.attn_keys(b, p, prefix, attn, k, fpos)?,
        );
        let zero = b.scalar(0i32)?;
        let at = [zero, zero, pos, zero];
        let kc = b.dynamic_update_slice(cache.k, as_slot(b, kn)?, &at)?;
        let vc = b.dynamic_update_slice(cache.v, as_slot(b, v)?, &at)?;
        let visible = b.compare(
            b.iota(S32, &[max_len], 0)?,
            bcast(b, pos, &[max_len], &[])?,
            Cmp::Le,
        )?;
        let ctx = attend_one(b, qr, kc, vc, visible)?;
        let new_cache = LayerCacheOps {
            k: kc,
            v: vc,
            k_raw: None,
            rla_state: None,
        };
        Ok((ctx, new_cache))
    }
}
