//! Layers as builder functions: each takes graph handles and returns graph handles, and reads like
//! DESIGN §2. Composite ops (RMSNorm, softmax, RoPE) are built from hlo-builder primitives here.

use crate::config::{Dtype, FfnActivation};
use hlo_builder::{Builder, DotDims, ElementType, GatherDims, Op, Result};

const F32: ElementType = ElementType::F32;

/// Dims of an op (arrays only).
pub fn dims(b: &Builder, x: Op) -> Result<Vec<i64>> {
    Ok(b.shape(x)?.dims().to_vec())
}

/// Broadcast `x` to `out` with `x`'s dims mapped to `map` (XLA's broadcast_in_dim).
pub fn bcast(b: &Builder, x: Op, out: &[i64], map: &[i64]) -> Result<Op> {
    b.broadcast_in_dim(x, out, map)
}

/// Broadcast `x` (whose dims are a prefix of `out`) along trailing dims.
pub fn bcast_prefix(b: &Builder, x: Op, out: &[i64]) -> Result<Op> {
    let r = b.shape(x)?.rank() as i64;
    b.broadcast_in_dim(x, out, &(0..r).collect::<Vec<_>>())
}

/// Broadcast `x` (whose dims are a suffix of `out`) along leading dims.
pub fn bcast_suffix(b: &Builder, x: Op, out: &[i64]) -> Result<Op> {
    let r = b.shape(x)?.rank() as i64;
    let off = out.len() as i64 - r;
    b.broadcast_in_dim(x, out, &(off..off + r).collect::<Vec<_>>())
}

/// `x · w` contracting the last dim of `x` with the first of `w`. In bf16 mode both operands are
/// rounded to bf16 and the product accumulates in f32.
pub fn linear(b: &Builder, x: Op, w: Op, dtype: Dtype) -> Result<Op> {
    let r = b.shape(x)?.rank() as i64;
    let dd = DotDims {
        lhs_contracting: vec![r - 1],
        rhs_contracting: vec![0],
        ..Default::default()
    };
    match dtype {
        Dtype::F32 => b.dot_general(x, w, &dd, None, None),
        Dtype::Bf16 => {
            let (xb, wb) = (
                b.convert(x, ElementType::Bf16)?,
                b.convert(w, ElementType::Bf16)?,
            );
            b.dot_general(xb, wb, &dd, None, Some(F32))
        }
    }
}

/// RMS normalisation over the last `groups` dims of width given by `scale`'s shape:
/// `x · rsqrt(mean(x²) + eps) · scale`, in f32. `scale` has the shape of `x`'s last `scale.rank()` dims;
/// the mean is over the last dim only.
pub fn rms_norm(b: &Builder, x: Op, scale: Op, eps: f64) -> Result<Op> {
    let d = dims(b, x)?;
    let last = d.len() as i64 - 1;
    let width = d[d.len() - 1] as f32;
    let ms = b.mul(
        b.reduce_sum(b.mul(x, x)?, &[last])?,
        b.scalar(1.0f32 / width)?,
    )?;
    let inv = b.rsqrt(b.add(ms, b.scalar(eps as f32)?)?)?;
    let y = b.mul(x, bcast_prefix(b, inv, &d)?)?;
    b.mul(y, bcast_suffix(b, scale, &d)?)
}

/// The RoPE frequencies `θ^(−2i/H)` of head dim `h`, `i` in `0..h/2`, in f64.
fn rope_freqs(h: i64, theta: f64) -> Vec<f64> {
    (0..h / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / h as f64))
        .collect()
}

/// `cos` and `sin` of the RoPE angles `p · θ^(−2i/H)` at the static positions `p` in `0..t`,
/// each `f32[t, H/2]`, from constant tables computed in f64 and rounded to f32 (exact to a few
/// f32 roundings at any position, where an f32 angle `p · freq` loses digits as `p` grows).
///
/// Positions split as `p = a·k + c` with `k = ⌈√t⌉`: rows of the coarse table (angles `a·k·freq`,
/// `[⌈t/k⌉, H/2]`) and of the fine one (`c·freq`, `[k, H/2]`), gathered at an iota of positions,
/// meet by the angle-addition formulas; the graph carries O(√t · H) constants rather than
/// `t · H`, and on a sequence mesh each shard gathers its own rows from the replicated tables
/// (no exchange).
pub fn rope_table(b: &Builder, t: i64, h: i64, theta: f64) -> Result<(Op, Op)> {
    let half = h / 2;
    let freqs = rope_freqs(h, theta);
    let k = (1i64..).find(|k| k * k >= t).unwrap_or(1);
    let a_n = (t + k - 1) / k;
    let table = |rows: i64, step: i64, f: fn(f64) -> f64| -> Result<Op> {
        let v: Vec<f32> = (0..rows)
            .flat_map(|r| {
                freqs
                    .iter()
                    .map(move |&fr| f((r * step) as f64 * fr) as f32)
            })
            .collect();
        b.constant_vec(v, &[rows, half])
    };
    let p = b.iota(ElementType::S32, &[t], 0)?;
    let (a, c) = (
        b.div(p, b.scalar(k as i32)?)?,
        b.rem(p, b.scalar(k as i32)?)?,
    );
    let rows_dims = GatherDims {
        offset_dims: vec![1],
        collapsed_slice_dims: vec![0],
        start_index_map: vec![0],
        index_vector_dim: 1,
    };
    let rows = |tab: Op, idx: Op| b.gather(tab, idx, &rows_dims, &[1, half]);
    let coarse = |f| -> Result<Op> { rows(table(a_n, k, f)?, a) };
    let fine = |f| -> Result<Op> { rows(table(k, 1, f)?, c) };
    let (ca, sa) = (coarse(f64::cos)?, coarse(f64::sin)?);
    let (cc, sc) = (fine(f64::cos)?, fine(f64::sin)?);
    let cos = b.sub(b.mul(ca, cc)?, b.mul(sa, sc)?)?;
    let sin = b.add(b.mul(sa, cc)?, b.mul(ca, sc)?)?;
    Ok((cos, sin))
}

/// Interleaved RoPE on `x [B,T,heads,H]` at positions `pos [T]` (f32): dims (2i, 2i+1) rotate by
/// pos · θ^(−2i/H).
///
/// When `pos` is an iota (the static positions `0..T` of training and prefill) the angles'
/// cos/sin come from [`rope_table`] (f64 tables, no transcendental in the graph); at runtime
/// positions (decode) they are computed from f32 angles `pos · freq` on `[T, H/2]`, whose
/// rounding grows with the position (~5e-4 at 8192). (No optimization barrier fences the
/// tables: the remat policy's barriers are the only ones in a train step.)
pub fn rope(b: &Builder, x: Op, pos: Op, theta: f64) -> Result<Op> {
    let _s = b.name_scope("rope");
    let d = dims(b, x)?;
    let (t, h) = (d[1], d[3]);
    let static_positions = b.iota_dimension(pos) == Some(0) && dims(b, pos)? == [t];
    let (cos, sin) = if static_positions {
        rope_table(b, t, h, theta)?
    } else {
        let half = h / 2;
        let freqs: Vec<f32> = rope_freqs(h, theta).iter().map(|&f| f as f32).collect();
        let freq = b.constant_vec(freqs, &[half])?;
        let angle = b.mul(
            bcast(b, pos, &[t, half], &[0])?,
            bcast(b, freq, &[t, half], &[1])?,
        )?;
        (b.cos(angle)?, b.sin(angle)?)
    };
    rotate(b, x, cos, sin)
}

/// `x [B,T,heads,H]` with dims (2i, 2i+1) rotated by the angle whose cosine and sine at token t
/// are `cos[t, i]`, `sin[t, i]` (`f32[T, H/2]`).
pub fn rotate(b: &Builder, x: Op, cos: Op, sin: Op) -> Result<Op> {
    let d = dims(b, x)?;
    let (bt, t, nh, h) = (d[0], d[1], d[2], d[3]);
    let half = h / 2;
    let full = [bt, t, nh, half, 1];
    let cos = bcast(b, cos, &full, &[1, 3])?;
    let sin = bcast(b, sin, &full, &[1, 3])?;
    let x5 = b.reshape(x, &[bt, t, nh, half, 2])?;
    let x0 = b.slice_in_dim(x5, 0, 1, 4)?;
    let x1 = b.slice_in_dim(x5, 1, 2, 4)?;
    let y0 = b.sub(b.mul(x0, cos)?, b.mul(x1, sin)?)?;
    let y1 = b.add(b.mul(x0, sin)?, b.mul(x1, cos)?)?;
    b.reshape(b.concatenate(&[y0, y1], 4)?, &[bt, t, nh, h])
}

pub use crate::attention::causal_attention;

/// Gated feed-forward block: `(act(x·Wg) ⊙ x·Wu) · Wd`.
pub fn ffn(
    b: &Builder,
    x: Op,
    w_gate: Op,
    w_up: Op,
    w_down: Op,
    act: FfnActivation,
    dtype: Dtype,
) -> Result<Op> {
    let gate = linear(b, x, w_gate, dtype)?;
    let up = linear(b, x, w_up, dtype)?;
    let a = match act {
        FfnActivation::Swiglu => b.mul(gate, b.logistic(gate)?)?,
        FfnActivation::Geglu => {
            // 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))
            let g3 = b.mul(b.mul(gate, gate)?, gate)?;
            let inner = b.mul(
                b.add(gate, b.mul(g3, b.scalar(0.044715f32)?)?)?,
                b.scalar((2.0f32 / std::f32::consts::PI).sqrt())?,
            )?;
            b.mul(
                b.mul(gate, b.scalar(0.5f32)?)?,
                b.add(b.tanh(inner)?, b.scalar(1.0f32)?)?,
            )?
        }
    };
    linear(b, b.mul(a, up)?, w_down, dtype)
}

/// One-hot rows of `tokens` (s32, any shape) over `vocab`, as f32 with a trailing vocab dim.
pub fn one_hot(b: &Builder, tokens: Op, vocab: i64) -> Result<Op> {
    let mut d = dims(b, tokens)?;
    d.push(vocab);
    let ids = bcast_prefix(b, tokens, &d)?;
    let iota = b.iota(ElementType::S32, &d, d.len() - 1)?;
    b.convert(b.compare(ids, iota, hlo_builder::Cmp::Eq)?, F32)
}

/// Mean cross-entropy of `logits [B,T,V]` against `targets [B,T]` (s32) weighted by `mask [B,T]` (f32).
pub fn cross_entropy(b: &Builder, logits: Op, targets: Op, mask: Op) -> Result<Op> {
    let _s = b.name_scope("loss");
    let d = dims(b, logits)?;
    let m = b.reduce_max(logits, &[2])?;
    let shifted = b.sub(logits, bcast_prefix(b, m, &d)?)?;
    let lse = b.add(b.log(b.reduce_sum(b.exp(shifted)?, &[2])?)?, m)?;
    let tgt = b.reduce_sum(b.mul(one_hot(b, targets, d[2])?, logits)?, &[2])?;
    let nll = b.mul(b.sub(lse, tgt)?, mask)?;
    let total = b.reduce_sum(nll, &[0, 1])?;
    let count = b.max(b.reduce_sum(mask, &[0, 1])?, b.scalar(1.0f32)?)?;
    b.div(total, count)
}
