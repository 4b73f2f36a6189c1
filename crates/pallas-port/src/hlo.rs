//! Pure-HLO lowering of the RLA blocks (DESIGN §3), for backends where our CPU FFI kernels are
//! not registered (TPU first). Both functions emit plain HLO through [`hlo_builder::Builder`] and
//! agree with [`crate::kernel::rla_fwd`] / [`crate::kernel::rla_bwd`] to fp32 rounding.
//!
//! # Structure
//!
//! - **Padding and shift (materialised once).** `q` (and `d_o`) are zero-padded at the end to
//!   `T_p = n_chunks · chunk`. The shifted keys/values `k̃_j = k_{j−W−1}` are built once as
//!   `[B, T_p, G, H]` arrays by padding `k`, `v` at the front with `min(W+1, T)` zeros and
//!   cutting them at `T` (so keys whose shifted position is `≥ T` never enter a state), then
//!   zero-padding to `T_p`. This is one copy of `k` and `v`, not a per-query gather. Positions
//!   `j ≤ W` and `j ≥ T` carry `ṽ = 0`, so their products `φ(k̃)ᵀṽ` vanish even though
//!   `φ(0) ≠ 0` for the softmax map.
//! - **A `while` over chunks** (forward in order, backward in reverse). The carry holds the
//!   chunk index (`s32`), the state `S` (forward) or its cotangent `dS` (backward),
//!   `[B, G, 2H, H]` f32, the output accumulators (written with `dynamic-update-slice`) and the
//!   loop-invariant inputs (an HLO body cannot see values of the enclosing computation).
//! - **Sub-chunks of a chunk are batched, not looped.** The chunk's `m = chunk / sub_chunk`
//!   sub-chunks become a batch dimension: every product is a `dot_general` batched over
//!   `(B, G, m)`, with the `N/G` query heads of a kv head stacked into the rows
//!   (`[B, G, m, C·R, ·]`, rows ordered (position, head)). The sub-chunk states inside the chunk
//!   are the chunk's entering state plus an exclusive prefix sum of the sub-chunk updates
//!   `φK̃ᵢᵀṼᵢ`, computed as one `dot` with the `m×m` strictly lower-triangular 0/1 matrix; the
//!   backward's `dS` inside a chunk is the carried `dS` plus an exclusive suffix sum of
//!   `φQᵢᵀ dOᵢ` (strictly upper-triangular). This replaces the Pallas kernel's sequential
//!   sub-chunk loop by a few large batched products, which XLA schedules much better than an
//!   inner `while`; the state memory per chunk is `B·G·m·2H·H·4` bytes.
//! - **Feature maps** ([`crate::feature_map`]) are computed per chunk inside the loop body (never
//!   on full-size arrays), and recomputed in the backward; their VJP is the softmax
//!   Jacobian-vector product `y ⊙ (dy − ⟨dy, y⟩)` (second half negated) or the relu masks.
//! - **Precision.** Every `dot` asks for `Precision::Highest` so that TPUs do true fp32 products
//!   (the block contract is fp32); inputs may be f32 or bf16 and are converted to f32.
//!
//! # Outputs
//!
//! [`rla_fwd_hlo`] returns the tuple `(o f32[B,T,N,H], chunk_states f32[B,G,n_chunks,2H,H],
//! final_state f32[B,G,2H,H])` with `chunk_states[:, :, c]` the state entering chunk `c` (the
//! layout of [`crate::kernel::rla_fwd`]); [`rla_bwd_hlo`] returns `(dq f32[B,T,N,H],
//! dk f32[B,T,G,H], dv f32[B,T,G,H])`.

use std::panic::Location;

use hlo_builder::{Builder, Cmp, DotDims, ElementType, Error, Op, Precision, Result, Shape};

use crate::config::{FeatureMap, RlaConfig};
use crate::feature::{feature_map, feature_map_vjp};

const F32: ElementType = ElementType::F32;
const S32: ElementType = ElementType::S32;
const PREC: Option<Precision> = Some(Precision::Highest);

/// Sizes of one lowering, derived from the operand shapes and the config.
#[derive(Debug, Clone, Copy)]
struct Geo {
    b: i64,
    t: i64,
    n: i64,
    g: i64,
    h: i64,
    /// Query heads per kv head, N / G.
    r: i64,
    /// Sub-chunk C.
    c: i64,
    /// Chunk L.
    l: i64,
    /// Sub-chunks per chunk, L / C.
    m: i64,
    /// Number of chunks, ceil(T / L).
    nc: i64,
    /// Padded length nc · L.
    tp: i64,
    /// Effective shift min(W + 1, T).
    sh: i64,
}

impl Geo {
    fn kv_dims(&self) -> [i64; 4] {
        [self.b, self.t, self.g, self.h]
    }
    fn state_dims(&self) -> [i64; 4] {
        [self.b, self.g, 2 * self.h, self.h]
    }
    fn chunk_states_dims(&self) -> [i64; 5] {
        [self.b, self.g, self.nc, 2 * self.h, self.h]
    }
    /// `[B, G, m, 2H, H]`: one state per sub-chunk of a chunk.
    fn sub_state_dims(&self) -> [i64; 5] {
        [self.b, self.g, self.m, 2 * self.h, self.h]
    }
}

fn invalid(
    b: &Builder,
    loc: &'static Location<'static>,
    op: &'static str,
    message: String,
) -> Error {
    Error::Invalid {
        op,
        message,
        location: format!("{}:{}", loc.file(), loc.line()),
        scope: b.current_scope(),
    }
}

/// Checks the config and operand shapes and derives the sizes.
fn geometry(
    b: &Builder,
    loc: &'static Location<'static>,
    op: &'static str,
    q: Op,
    k: Op,
    v: Op,
    cfg: &RlaConfig,
) -> Result<Geo> {
    cfg.validate()
        .map_err(|e| invalid(b, loc, op, e.to_string()))?;
    let (qs, ks, vs) = (b.shape(q)?, b.shape(k)?, b.shape(v)?);
    for (name, s) in [("q", &qs), ("k", &ks), ("v", &vs)] {
        check_float(b, loc, op, name, s)?;
        if s.rank() != 4 {
            return Err(invalid(
                b,
                loc,
                op,
                format!(
                    "`{name}` must have rank 4 ([B,T,heads,H]), got {}",
                    s.short()
                ),
            ));
        }
    }
    let (qd, kd) = (qs.dims(), ks.dims());
    if kd != vs.dims() {
        return Err(invalid(
            b,
            loc,
            op,
            format!(
                "`k` {} and `v` {} must have the same shape [B,T,G,H]",
                ks.short(),
                vs.short()
            ),
        ));
    }
    if qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] {
        return Err(invalid(
            b,
            loc,
            op,
            format!(
                "`q` {} and `k` {} must agree on B, T and H (q [B,T,N,H], k [B,T,G,H])",
                qs.short(),
                ks.short()
            ),
        ));
    }
    if qd.iter().chain(kd).any(|&d| d == 0) || qd[2] % kd[2] != 0 {
        return Err(invalid(
            b,
            loc,
            op,
            format!(
                "sizes must be >= 1 and N a multiple of G, got q {} and k {}",
                qs.short(),
                ks.short()
            ),
        ));
    }
    let (t, l, c) = (qd[1], cfg.chunk as i64, cfg.sub_chunk as i64);
    let nc = (t + l - 1) / l;
    let sh = (cfg.window as u64).saturating_add(1).min(t as u64) as i64;
    Ok(Geo {
        b: qd[0],
        t,
        n: qd[2],
        g: kd[2],
        h: qd[3],
        r: qd[2] / kd[2],
        c,
        l,
        m: l / c,
        nc,
        tp: nc * l,
        sh,
    })
}

fn check_float(
    b: &Builder,
    loc: &'static Location<'static>,
    op: &'static str,
    name: &str,
    s: &Shape,
) -> Result<()> {
    match s.ty() {
        Some(ElementType::F32) | Some(ElementType::Bf16) => Ok(()),
        _ => Err(invalid(
            b,
            loc,
            op,
            format!("`{name}` must be an f32 or bf16 array, got {}", s.short()),
        )),
    }
}

fn to_f32(b: &Builder, x: Op) -> Result<Op> {
    if b.shape(x)?.ty() == Some(F32) {
        Ok(x)
    } else {
        b.convert(x, F32)
    }
}

/// Zero-pads `x` (`[B, T, heads, H]`) at the end of the time axis to `tp`.
fn pad_time(b: &Builder, x: Op, t: i64, tp: i64) -> Result<Op> {
    if tp == t {
        return Ok(x);
    }
    let zero = b.scalar(0.0f32)?;
    b.pad(x, zero, &[(0, 0, 0), (0, tp - t, 0), (0, 0, 0), (0, 0, 0)])
}

/// The shifted copy `x̃_j = x_{j − sh}` for `sh ≤ j < T`, zero elsewhere, padded to `T_p`.
fn shift_kv(b: &Builder, x: Op, geo: &Geo) -> Result<Op> {
    if geo.sh >= geo.t {
        return b.zeros(F32, &[geo.b, geo.tp, geo.g, geo.h]);
    }
    let zero = b.scalar(0.0f32)?;
    let shifted = b.pad(
        x,
        zero,
        &[(0, 0, 0), (geo.sh, -geo.sh, 0), (0, 0, 0), (0, 0, 0)],
    )?;
    pad_time(b, shifted, geo.t, geo.tp)
}

/// The inverse of [`shift_kv`] for cotangents: `dx_s = dx̃_{s + sh}` for `s + sh < T`, else 0.
fn unshift_kv(b: &Builder, acc: Op, geo: &Geo) -> Result<Op> {
    if geo.sh >= geo.t {
        return b.zeros(F32, &geo.kv_dims());
    }
    let cut = b.slice_in_dim(acc, 0, geo.t, 1)?;
    let zero = b.scalar(0.0f32)?;
    b.pad(
        cut,
        zero,
        &[(0, 0, 0), (-geo.sh, geo.sh, 0), (0, 0, 0), (0, 0, 0)],
    )
}

/// `[B, L, N, H]` → `[B, G, m, C·R, H]` (rows ordered (position, head of the group)).
fn q_to_grouped(b: &Builder, x: Op, g: &Geo) -> Result<Op> {
    let x = b.reshape(x, &[g.b, g.m, g.c, g.g, g.r, g.h])?;
    let x = b.transpose(x, &[0, 3, 1, 2, 4, 5])?;
    b.reshape(x, &[g.b, g.g, g.m, g.c * g.r, g.h])
}

/// Inverse of [`q_to_grouped`].
fn grouped_to_q(b: &Builder, x: Op, g: &Geo) -> Result<Op> {
    let x = b.reshape(x, &[g.b, g.g, g.m, g.c, g.r, g.h])?;
    let x = b.transpose(x, &[0, 2, 3, 1, 4, 5])?;
    b.reshape(x, &[g.b, g.l, g.n, g.h])
}

/// `[B, L, G, H]` → `[B, G, m, C, H]`.
fn kv_to_grouped(b: &Builder, x: Op, g: &Geo) -> Result<Op> {
    let x = b.reshape(x, &[g.b, g.m, g.c, g.g, g.h])?;
    b.transpose(x, &[0, 3, 1, 2, 4])
}

/// Inverse of [`kv_to_grouped`].
fn grouped_to_kv(b: &Builder, x: Op, g: &Geo) -> Result<Op> {
    let x = b.transpose(x, &[0, 2, 3, 1, 4])?;
    b.reshape(x, &[g.b, g.l, g.g, g.h])
}

/// `dot_general` batched over the leading `(B, G, m)` dims.
fn bdot(b: &Builder, lhs: Op, rhs: Op, lc: i64, rc: i64) -> Result<Op> {
    let dims = DotDims {
        lhs_batch: vec![0, 1, 2],
        rhs_batch: vec![0, 1, 2],
        lhs_contracting: vec![lc],
        rhs_contracting: vec![rc],
    };
    b.dot_general(lhs, rhs, &dims, PREC, None)
}

/// The intra-sub-chunk causal mask `[B, G, m, C·R, C]`: row `(t, r)` sees key `j` iff `j ≤ t`.
fn causal_mask(b: &Builder, g: &Geo) -> Result<Op> {
    let rows = b.iota(S32, &[g.c * g.r, g.c], 0)?;
    let pos = b.div(rows, b.full(S32, g.r as f64, &[g.c * g.r, g.c])?)?;
    let key = b.iota(S32, &[g.c * g.r, g.c], 1)?;
    let m = b.compare(key, pos, Cmp::Le)?;
    b.broadcast_in_dim(m, &[g.b, g.g, g.m, g.c * g.r, g.c], &[3, 4])
}

/// `select(mask, x, 0)`.
fn apply_mask(b: &Builder, mask: Op, x: Op) -> Result<Op> {
    let zero = b.zeros(F32, b.shape(x)?.dims())?;
    b.select(mask, x, zero)
}

/// Exclusive prefix (`upper = false`: `Σ_{i<j} u_i`) or suffix (`upper = true`: `Σ_{i>j} u_i`)
/// sums over the sub-chunk axis 2 of `u` `[B, G, m, 2H, H]`, as one dot with a 0/1 matrix.
fn exclusive_scan(b: &Builder, u: Op, g: &Geo, upper: bool) -> Result<Op> {
    let mut tri = vec![0.0f32; (g.m * g.m) as usize];
    for j in 0..g.m {
        for i in 0..g.m {
            if (upper && i > j) || (!upper && i < j) {
                tri[(j * g.m + i) as usize] = 1.0;
            }
        }
    }
    let tri = b.constant_vec(tri, &[g.m, g.m])?;
    let dims = DotDims {
        lhs_contracting: vec![1],
        rhs_contracting: vec![2],
        ..Default::default()
    };
    let s = b.dot_general(tri, u, &dims, PREC, None)?; // [m, B, G, 2H, H]
    b.transpose(s, &[1, 2, 0, 3, 4])
}

/// The per-sub-chunk states `S_j = S + Σ_{i<j} U_i` and the sub-chunk updates `U_i = φK̃ᵢᵀṼᵢ`.
fn sub_states(b: &Builder, g: &Geo, s: Op, fk: Op, vg: Op) -> Result<(Op, Op)> {
    let u = bdot(b, fk, vg, 3, 3)?; // [B, G, m, 2H, H]
    let sb = b.broadcast_in_dim(s, &g.sub_state_dims(), &[0, 1, 3, 4])?;
    let sj = if g.m > 1 {
        b.add(sb, exclusive_scan(b, u, g, false)?)?
    } else {
        sb
    };
    Ok((sj, u))
}

/// One chunk's inputs in the grouped layout.
struct ChunkIn {
    /// Raw queries `[B, G, m, C·R, H]`.
    qg: Op,
    /// φ(q) `[B, G, m, C·R, 2H]`.
    fq: Op,
    /// Raw shifted keys `[B, G, m, C, H]`.
    kg: Op,
    /// φ(k̃) `[B, G, m, C, 2H]`.
    fk: Op,
    /// Shifted values `[B, G, m, C, H]`.
    vg: Op,
}

/// Slices chunk `start / L` out of the padded `[qp, kp, vp]` and maps the features.
fn load_chunk(
    b: &Builder,
    g: &Geo,
    fm: FeatureMap,
    [qp, kp, vp]: [Op; 3],
    start: Op,
    zero: Op,
) -> Result<ChunkIn> {
    let qc = b.dynamic_slice(qp, &[zero, start, zero, zero], &[g.b, g.l, g.n, g.h])?;
    let kc = b.dynamic_slice(kp, &[zero, start, zero, zero], &[g.b, g.l, g.g, g.h])?;
    let vc = b.dynamic_slice(vp, &[zero, start, zero, zero], &[g.b, g.l, g.g, g.h])?;
    let qg = q_to_grouped(b, qc, g)?;
    let kg = kv_to_grouped(b, kc, g)?;
    let vg = kv_to_grouped(b, vc, g)?;
    Ok(ChunkIn {
        fq: feature_map(b, qg, fm)?,
        fk: feature_map(b, kg, fm)?,
        qg,
        kg,
        vg,
    })
}

/// `c < limit` (forward) or `c >= 0` (backward) on element 0 of the carry.
fn loop_cond(
    b: &Builder,
    carry: &Shape,
    forward: bool,
    limit: i64,
) -> Result<hlo_builder::Computation> {
    let cb = b.sub_builder(if forward {
        "rla_fwd_cond"
    } else {
        "rla_bwd_cond"
    });
    let p = cb.parameter(carry.clone(), "carry")?;
    let c = cb.get_tuple_element(p, 0)?;
    let pred = if forward {
        cb.compare(c, cb.scalar(limit as i32)?, Cmp::Lt)?
    } else {
        cb.compare(c, cb.scalar(0i32)?, Cmp::Ge)?
    };
    cb.build(pred)
}

fn get_all(b: &Builder, p: Op, n: usize) -> Result<Vec<Op>> {
    (0..n).map(|i| b.get_tuple_element(p, i)).collect()
}

/// Forward RLA block lowered to HLO.
///
/// `q` `[B,T,N,H]`, `k`, `v` `[B,T,G,H]` (f32 or bf16; converted to f32). Returns a tuple op
/// `(o f32[B,T,N,H], chunk_states f32[B,G,ceil(T/chunk),2H,H], final_state f32[B,G,2H,H])`,
/// the same values as [`crate::kernel::rla_fwd`] up to fp32 rounding. Any `T ≥ 1` (padded
/// internally to the chunk multiple) and any window (0, not a multiple of the sub-chunk, `≥ T`).
///
/// Errors name `rla_fwd_hlo` and the offending shapes or config (bad ranks, mismatched B/T/H,
/// `N % G != 0`, non-float inputs, `chunk % sub_chunk != 0`).
#[track_caller]
pub fn rla_fwd_hlo(b: &Builder, q: Op, k: Op, v: Op, cfg: &RlaConfig) -> Result<Op> {
    const OP: &str = "rla_fwd_hlo";
    let loc = Location::caller();
    let g = geometry(b, loc, OP, q, k, v, cfg)?;
    let _scope = b.name_scope("rla_fwd");
    let (q, k, v) = (to_f32(b, q)?, to_f32(b, k)?, to_f32(b, v)?);
    let qp = pad_time(b, q, g.t, g.tp)?;
    let kp = shift_kv(b, k, &g)?;
    let vp = shift_kv(b, v, &g)?;

    let init = b.tuple(&[
        b.scalar(0i32)?,
        b.zeros(F32, &g.state_dims())?,
        b.zeros(F32, &[g.b, g.tp, g.n, g.h])?,
        b.zeros(F32, &g.chunk_states_dims())?,
        qp,
        kp,
        vp,
    ])?;
    let carry = b.shape(init)?;

    let body = {
        let sb = b.sub_builder("rla_fwd_body");
        let p = sb.parameter(carry.clone(), "carry")?;
        let e = get_all(&sb, p, 7)?;
        let (c, s, o, cs, qp, kp, vp) = (e[0], e[1], e[2], e[3], e[4], e[5], e[6]);
        let zero = sb.scalar(0i32)?;
        let start = sb.mul(c, sb.scalar(g.l as i32)?)?;
        let s5 = sb.reshape(s, &[g.b, g.g, 1, 2 * g.h, g.h])?;
        let cs = sb.dynamic_update_slice(cs, s5, &[zero, zero, c, zero, zero])?;
        let ch = load_chunk(&sb, &g, cfg.feature_map, [qp, kp, vp], start, zero)?;
        let (sj, u) = sub_states(&sb, &g, s, ch.fk, ch.vg)?;
        let inter = bdot(&sb, ch.fq, sj, 4, 3)?; // [B, G, m, C·R, H]
        let a = apply_mask(&sb, causal_mask(&sb, &g)?, bdot(&sb, ch.fq, ch.fk, 4, 4)?)?;
        let intra = bdot(&sb, a, ch.vg, 4, 3)?;
        let oc = grouped_to_q(&sb, sb.add(inter, intra)?, &g)?;
        let o = sb.dynamic_update_slice(o, oc, &[zero, start, zero, zero])?;
        let s = sb.add(s, sb.reduce_sum(u, &[2])?)?;
        let c = sb.add(c, sb.scalar(1i32)?)?;
        let root = sb.tuple(&[c, s, o, cs, qp, kp, vp])?;
        sb.build(root)?
    };
    let cond = loop_cond(b, &carry, true, g.nc)?;
    let out = b.while_loop(&cond, &body, init)?;
    let s = b.get_tuple_element(out, 1)?;
    let o = b.get_tuple_element(out, 2)?;
    let cs = b.get_tuple_element(out, 3)?;
    let o = if g.tp == g.t {
        o
    } else {
        b.slice_in_dim(o, 0, g.t, 1)?
    };
    b.tuple(&[o, cs, s])
}

/// Backward RLA block lowered to HLO.
///
/// `q`, `d_o` `[B,T,N,H]`, `k`, `v` `[B,T,G,H]` (f32 or bf16), `chunk_states`
/// `[B,G,ceil(T/chunk),2H,H]` as returned by [`rla_fwd_hlo`] (or the kernel) for the same inputs
/// and config. Returns a tuple op `(dq f32[B,T,N,H], dk f32[B,T,G,H], dv f32[B,T,G,H])`, the
/// same values as [`crate::kernel::rla_bwd`] up to fp32 rounding (dk, dv summed over the query
/// heads of each group).
///
/// Errors name `rla_bwd_hlo` and the offending shapes or config.
#[track_caller]
pub fn rla_bwd_hlo(
    b: &Builder,
    q: Op,
    k: Op,
    v: Op,
    chunk_states: Op,
    d_o: Op,
    cfg: &RlaConfig,
) -> Result<Op> {
    const OP: &str = "rla_bwd_hlo";
    let loc = Location::caller();
    let g = geometry(b, loc, OP, q, k, v, cfg)?;
    let (qs, ds, css) = (b.shape(q)?, b.shape(d_o)?, b.shape(chunk_states)?);
    check_float(b, loc, OP, "d_o", &ds)?;
    check_float(b, loc, OP, "chunk_states", &css)?;
    if ds.dims() != qs.dims() {
        return Err(invalid(
            b,
            loc,
            OP,
            format!(
                "`d_o` {} must have the shape of `q` {}",
                ds.short(),
                qs.short()
            ),
        ));
    }
    if css.dims() != g.chunk_states_dims() {
        return Err(invalid(
            b,
            loc,
            OP,
            format!(
                "`chunk_states` {} must be [B,G,n_chunks,2H,H] = {:?} for q {} and chunk {}",
                css.short(),
                g.chunk_states_dims(),
                qs.short(),
                cfg.chunk
            ),
        ));
    }
    let _scope = b.name_scope("rla_bwd");
    let (q, k, v) = (to_f32(b, q)?, to_f32(b, k)?, to_f32(b, v)?);
    let (cs, d_o) = (to_f32(b, chunk_states)?, to_f32(b, d_o)?);
    let qp = pad_time(b, q, g.t, g.tp)?;
    let dop = pad_time(b, d_o, g.t, g.tp)?;
    let kp = shift_kv(b, k, &g)?;
    let vp = shift_kv(b, v, &g)?;

    let init = b.tuple(&[
        b.scalar(g.nc as i32 - 1)?,
        b.zeros(F32, &g.state_dims())?,
        b.zeros(F32, &[g.b, g.tp, g.n, g.h])?,
        b.zeros(F32, &[g.b, g.tp, g.g, g.h])?,
        b.zeros(F32, &[g.b, g.tp, g.g, g.h])?,
        qp,
        kp,
        vp,
        dop,
        cs,
    ])?;
    let carry = b.shape(init)?;

    let body = {
        let sb = b.sub_builder("rla_bwd_body");
        let p = sb.parameter(carry.clone(), "carry")?;
        let e = get_all(&sb, p, 10)?;
        let (c, ds, dq, dk, dv) = (e[0], e[1], e[2], e[3], e[4]);
        let (qp, kp, vp, dop, cs) = (e[5], e[6], e[7], e[8], e[9]);
        let zero = sb.scalar(0i32)?;
        let start = sb.mul(c, sb.scalar(g.l as i32)?)?;
        let s = sb.dynamic_slice(
            cs,
            &[zero, zero, c, zero, zero],
            &[g.b, g.g, 1, 2 * g.h, g.h],
        )?;
        let s = sb.reshape(s, &g.state_dims())?;
        let ch = load_chunk(&sb, &g, cfg.feature_map, [qp, kp, vp], start, zero)?;
        let doc = sb.dynamic_slice(dop, &[zero, start, zero, zero], &[g.b, g.l, g.n, g.h])?;
        let dog = q_to_grouped(&sb, doc, &g)?; // [B, G, m, C·R, H]
        let (sj, _) = sub_states(&sb, &g, s, ch.fk, ch.vg)?;

        // dS entering each sub-chunk from the right: carried dS + Σ_{i>j} φQᵢᵀ dOᵢ.
        let vq = bdot(&sb, ch.fq, dog, 3, 3)?; // [B, G, m, 2H, H]
        let dsb = sb.broadcast_in_dim(ds, &g.sub_state_dims(), &[0, 1, 3, 4])?;
        let dsj = if g.m > 1 {
            sb.add(dsb, exclusive_scan(&sb, vq, &g, true)?)?
        } else {
            dsb
        };

        let mask = causal_mask(&sb, &g)?;
        let a = apply_mask(&sb, mask, bdot(&sb, ch.fq, ch.fk, 4, 4)?)?; // [B, G, m, C·R, C]
        let pm = apply_mask(&sb, mask, bdot(&sb, dog, ch.vg, 4, 4)?)?; // (dO Ṽᵀ) ⊙ M

        let dfq = sb.add(bdot(&sb, dog, sj, 4, 4)?, bdot(&sb, pm, ch.fk, 4, 3)?)?; // [B, G, m, C·R, 2H]
        let dfk = sb.add(bdot(&sb, pm, ch.fq, 3, 3)?, bdot(&sb, ch.vg, dsj, 4, 4)?)?; // [B, G, m, C, 2H]
        let dvg = sb.add(bdot(&sb, a, dog, 3, 3)?, bdot(&sb, ch.fk, dsj, 4, 3)?)?; // [B, G, m, C, H]

        let dqc = grouped_to_q(&sb, feature_map_vjp(&sb, ch.qg, dfq, cfg.feature_map)?, &g)?;
        let dkc = grouped_to_kv(&sb, feature_map_vjp(&sb, ch.kg, dfk, cfg.feature_map)?, &g)?;
        let dvc = grouped_to_kv(&sb, dvg, &g)?;
        let at = [zero, start, zero, zero];
        let dq = sb.dynamic_update_slice(dq, dqc, &at)?;
        let dk = sb.dynamic_update_slice(dk, dkc, &at)?;
        let dv = sb.dynamic_update_slice(dv, dvc, &at)?;
        let ds = sb.add(ds, sb.reduce_sum(vq, &[2])?)?;
        let c = sb.sub(c, sb.scalar(1i32)?)?;
        let root = sb.tuple(&[c, ds, dq, dk, dv, qp, kp, vp, dop, cs])?;
        sb.build(root)?
    };
    let cond = loop_cond(b, &carry, false, 0)?;
    let out = b.while_loop(&cond, &body, init)?;
    let dq = b.get_tuple_element(out, 2)?;
    let dk = b.get_tuple_element(out, 3)?;
    let dv = b.get_tuple_element(out, 4)?;
    let dq = if g.tp == g.t {
        dq
    } else {
        b.slice_in_dim(dq, 0, g.t, 1)?
    };
    let dk = unshift_kv(b, dk, &g)?;
    let dv = unshift_kv(b, dv, &g)?;
    b.tuple(&[dq, dk, dv])
}
