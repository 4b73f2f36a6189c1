//! The RLA blocks as kernel programs (DESIGN §3), the same math and saved-state layout as the
//! CPU kernels in [`crate::kernel`].
//!
//! φ is split into its two halves everywhere (φ(x) = [φ⁺(x), φ⁻(x)], each `[C, H]`), so the
//! state `S` (`[2H, H]`) is two `[H, H]` tiles `S⁺`, `S⁻` (rows `0..H` and `H..2H` of the
//! `chunk_states` layout) and nothing is ever concatenated:
//! `φQ S = φ⁺Q S⁺ + φ⁻Q S⁻`, `φQ φKᵀ = φ⁺Q φ⁺Kᵀ + φ⁻Q φ⁻Kᵀ`.
//!
//! Every kernel splits the head dim's *value columns* into `nv = H / value_block` blocks
//! ([`value_block`]: unsplit up to H 32, 32 columns above) over its second grid axis, and tiles
//! rows by [`tile_rows`] (the sub-chunk, capped at 4096 / H): at H 128 the unsplit backward
//! asked for more shared memory than a GPU has. `dq` and `dk` are linear in the per-block
//! contributions, so their kernels write per-block partial sums (a leading axis of `nv`,
//! [`partial_shape`]) that the graph (or [`interpret_bwd`]) sums.
//!
//! Forward (two kernels):
//! - `rla_fwd_states`, grid (B, G·nv): the chunk loop in order carrying S's value block;
//!   stores `chunk_states` and `final_state`.
//! - `rla_fwd_out`, grid (B, N·nv, chunks), all parallel: S from `chunk_states`, the sub-chunk
//!   loop carrying S; stores `o`'s value block.
//!
//! Backward (three kernels):
//! - `rla_bwd_dstates`, grid (B, G·nv): chunks in reverse carrying dS (summed over the group's
//!   query heads); stores `d_states[b, g, c]`, the dS of every query after key chunk `c`'s last
//!   query (position `(c+1)·chunk + W + 1` on), in the `chunk_states` layout.
//! - `rla_bwd_dq`, grid (B, N·nv, chunks): like `rla_fwd_out`, gives partial dq.
//! - `rla_bwd_dkdv`, grid (B, G·nv, chunks) over chunks of *keys*: sub-chunks in reverse
//!   carrying dS from `d_states`, an inner loop over the group's query heads; gives partial dk
//!   and dv's value block. Working in key space makes every key row the job of exactly one
//!   program per value block, so every result element is written (XLA's custom-call results
//!   start uninitialised).
//!
//! The shift by W + 1 is a load offset: the shifted keys of query rows `t0..t0+C` are key rows
//! `t0−W−1..`, and rows outside `[0, T)` load as 0 (their products with Ṽ vanish, although
//! φ(0) ≠ 0). Query rows past `T` load as 0 and are not stored; keys whose query position lies
//! past `T` are masked out of the forward states explicitly.

use super::builder::KernelBuilder;
use super::interp;
use super::ir::*;
use crate::config::{FeatureMap, RlaConfig, RlaDims};

/// Sizes of one RLA call as the kernels see them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geo {
    b: usize,
    t: usize,
    n: usize,
    g: usize,
    h: usize,
    r: usize,
    w: usize,
    c: usize,
    l: usize,
    nc: usize,
    fm: FeatureMap,
}

impl Geo {
    pub(super) fn new(cfg: &RlaConfig, d: &RlaDims) -> Self {
        Geo {
            b: d.batch,
            t: d.seq,
            n: d.heads,
            g: d.kv_heads,
            h: d.head_dim,
            r: d.group_size(),
            w: cfg.window,
            c: cfg.sub_chunk,
            l: cfg.chunk,
            nc: d.n_chunks(cfg),
            fm: cfg.feature_map,
        }
    }

    fn q_shape(&self) -> [usize; 4] {
        [self.b, self.t, self.n, self.h]
    }

    fn kv_shape(&self) -> [usize; 4] {
        [self.b, self.t, self.g, self.h]
    }

    fn cs_shape(&self) -> [usize; 5] {
        [self.b, self.g, self.nc, 2 * self.h, self.h]
    }

    fn fs_shape(&self) -> [usize; 4] {
        [self.b, self.g, 2 * self.h, self.h]
    }

    /// Warps per program: 8 when the `[H, H]` state tiles are large.
    fn warps(&self) -> u32 {
        if self.h >= 128 {
            8
        } else {
            4
        }
    }
}

/// Small composite helpers over the builder (not new primitives).
pub(super) struct K<'a> {
    pub(super) kb: &'a mut KernelBuilder,
    pub(super) geo: Geo,
}

impl K<'_> {
    /// The index of `[C, width]` rows `row0..row0+C`, columns `col0..col0+width` of head `head`
    /// of batch `b` of a `[B, T, heads, H]` array.
    fn cols_index(
        &self,
        b: Value,
        row0: Value,
        head: Value,
        col0: Value,
        width: usize,
    ) -> [Index; 4] {
        [
            Index::At(b),
            Index::Slice(row0, self.geo.c),
            Index::At(head),
            Index::Slice(col0, width),
        ]
    }

    /// `[C, H]` rows `row0..row0+C` of head `head` of batch `b` of a `[B, T, heads, H]` array.
    fn rows(&mut self, arr: Ref, b: Value, row0: Value, head: Value) -> LangResult<Value> {
        let zero = self.kb.int(0);
        self.cols(arr, b, row0, head, zero, self.geo.h)
    }

    /// Stores a `[C, H]` tile as rows `row0..` of head `head` of batch `b` (see [`K::rows`]).
    fn store_rows(
        &mut self,
        arr: Ref,
        b: Value,
        row0: Value,
        head: Value,
        x: Value,
    ) -> LangResult<()> {
        let zero = self.kb.int(0);
        self.store_cols(arr, b, row0, head, zero, x)
    }

    /// `[C, width]` rows `row0..row0+C`, columns `col0..col0+width` of head `head` of batch `b`
    /// of a `[B, T, heads, H]` array.
    fn cols(
        &mut self,
        arr: Ref,
        b: Value,
        row0: Value,
        head: Value,
        col0: Value,
        width: usize,
    ) -> LangResult<Value> {
        let ix = self.cols_index(b, row0, head, col0, width);
        self.kb.load(arr, &ix)
    }

    /// Stores a `[C, width]` tile at the place [`K::cols`] loads from.
    fn store_cols(
        &mut self,
        arr: Ref,
        b: Value,
        row0: Value,
        head: Value,
        col0: Value,
        x: Value,
    ) -> LangResult<()> {
        let width = self.kb.type_of(x)?.shape()[1];
        let ix = self.cols_index(b, row0, head, col0, width);
        self.kb.store(arr, &ix, x)
    }

    /// The index of columns `col0..col0+width` of state half `half` (rows `half·H..`) of a
    /// `[.., 2H, H]` state at leading indices `lead`.
    fn state_index(
        &mut self,
        lead: &[Value],
        half: usize,
        col0: Value,
        width: usize,
    ) -> Vec<Index> {
        let h = self.geo.h;
        let row0 = self.kb.int((half * h) as i64);
        let mut ix: Vec<Index> = lead.iter().map(|&v| Index::At(v)).collect();
        ix.push(Index::Slice(row0, h));
        ix.push(Index::Slice(col0, width));
        ix
    }

    /// Columns `col0..col0+width` of both halves of a `[.., 2H, H]` state: two `[H, width]`.
    fn load_state_cols(
        &mut self,
        arr: Ref,
        lead: &[Value],
        col0: Value,
        width: usize,
    ) -> LangResult<(Value, Value)> {
        let ip = self.state_index(lead, 0, col0, width);
        let p = self.kb.load(arr, &ip)?;
        let ineg = self.state_index(lead, 1, col0, width);
        let n = self.kb.load(arr, &ineg)?;
        Ok((p, n))
    }

    /// Stores two `[H, width]` tiles as columns `col0..` of both halves of a `[.., 2H, H]` state.
    fn store_state_cols(
        &mut self,
        arr: Ref,
        lead: &[Value],
        col0: Value,
        (p, n): (Value, Value),
    ) -> LangResult<()> {
        let width = self.kb.type_of(p)?.shape()[1];
        for (half, x) in [(0, p), (1, n)] {
            let ix = self.state_index(lead, half, col0, width);
            self.kb.store(arr, &ix, x)?;
        }
        Ok(())
    }

    /// Broadcasts a per-row `[M]` vector to `[M, N]`.
    pub(super) fn rows_bcast(&mut self, v: Value, n: usize) -> LangResult<Value> {
        let m = self.kb.type_of(v)?.shape()[0];
        let e = self.kb.expand_dims(v, 1)?;
        self.kb.broadcast(e, &[m, n])
    }

    /// φ⁺(x), φ⁻(x) of a `[C, H]` tile, row-wise.
    pub(super) fn phi(&mut self, x: Value) -> LangResult<(Value, Value)> {
        let h = self.geo.h;
        match self.geo.fm {
            FeatureMap::Softmax => {
                let mx = self.kb.reduce(ReduceOp::Max, x, 1)?;
                let mx = self.rows_bcast(mx, h)?;
                let mn = self.kb.reduce(ReduceOp::Min, x, 1)?;
                let mn = self.rows_bcast(mn, h)?;
                let dp = self.kb.sub(x, mx)?;
                let dn = self.kb.sub(mn, x)?;
                let mut out = Vec::new();
                for d in [dp, dn] {
                    let e = self.kb.exp(d)?;
                    let s = self.kb.reduce(ReduceOp::Sum, e, 1)?;
                    let s = self.rows_bcast(s, h)?;
                    out.push(self.kb.div(e, s)?);
                }
                Ok((out[0], out[1]))
            }
            FeatureMap::Relu => {
                let shape = [self.geo.c, h];
                let z = self.kb.zeros(&shape)?;
                let p = self.kb.max(x, z)?;
                let nx = self.kb.neg(x)?;
                let n = self.kb.max(nx, z)?;
                Ok((p, n))
            }
        }
    }

    /// dx from dφ⁺, dφ⁻ given x and φ⁺(x), φ⁻(x).
    pub(super) fn phi_vjp(
        &mut self,
        x: Value,
        (p, n): (Value, Value),
        (dp, dn): (Value, Value),
    ) -> LangResult<Value> {
        let h = self.geo.h;
        let shape = [self.geo.c, h];
        match self.geo.fm {
            FeatureMap::Softmax => {
                // y ⊙ (dy − ⟨dy, y⟩) for each half; the second half negated.
                let mut halves = Vec::new();
                for (y, dy) in [(p, dp), (n, dn)] {
                    let yd = self.kb.mul(y, dy)?;
                    let c = self.kb.reduce(ReduceOp::Sum, yd, 1)?;
                    let c = self.rows_bcast(c, h)?;
                    let diff = self.kb.sub(dy, c)?;
                    halves.push(self.kb.mul(y, diff)?);
                }
                self.kb.sub(halves[0], halves[1])
            }
            FeatureMap::Relu => {
                let z = self.kb.zeros(&shape)?;
                let pos = self.kb.cmp(CmpOp::Gt, x, z)?;
                let neg = self.kb.cmp(CmpOp::Lt, x, z)?;
                let a = self.kb.select(pos, dp, z)?;
                let b = self.kb.select(neg, dn, z)?;
                self.kb.sub(a, b)
            }
        }
    }

    /// Zeroes the entries above the diagonal of a `[C, C]` tile (query row i sees key col j ≤ i).
    pub(super) fn causal(&mut self, a: Value) -> LangResult<Value> {
        let c = self.geo.c;
        let i = self.kb.iota(&[c, c], 0)?;
        let j = self.kb.iota(&[c, c], 1)?;
        let keep = self.kb.cmp(CmpOp::Ge, i, j)?;
        let z = self.kb.zeros(&[c, c])?;
        self.kb.select(keep, a, z)
    }

    /// `a · bᵀ`.
    pub(super) fn dot_t(&mut self, a: Value, b: Value, acc: Option<Value>) -> LangResult<Value> {
        let bt = self.kb.transpose(b)?;
        self.kb.dot(a, bt, acc)
    }

    /// `aᵀ · b`.
    pub(super) fn t_dot(&mut self, a: Value, b: Value, acc: Option<Value>) -> LangResult<Value> {
        let at = self.kb.transpose(a)?;
        self.kb.dot(at, b, acc)
    }

    /// `x · k + y` on scalars.
    pub(super) fn affine(&mut self, x: Value, k: i64, y: Value) -> LangResult<Value> {
        let kv = self.kb.int(k);
        let xk = self.kb.mul(x, kv)?;
        self.kb.add(xk, y)
    }

    /// `x + k` on scalars.
    pub(super) fn plus(&mut self, x: Value, k: i64) -> LangResult<Value> {
        let kv = self.kb.int(k);
        self.kb.add(x, kv)
    }

    /// A loop `for i in 0..n` with carried values.
    pub(super) fn range(
        &mut self,
        n: usize,
        init: &[Value],
        body: impl FnOnce(&mut K<'_>, Value, &[Value]) -> LangResult<Vec<Value>>,
    ) -> LangResult<Vec<Value>> {
        let geo = self.geo;
        let lo = self.kb.int(0);
        let hi = self.kb.int(n as i64);
        let one = self.kb.int(1);
        self.kb.for_loop(lo, hi, one, init, |kb, i, args| {
            let mut k = K { kb, geo };
            body(&mut k, i, args)
        })
    }

    /// One query tile's output `φQ S + causal(φQ φKᵀ) V` from the φ halves of the queries
    /// (`phq`) and keys (`phk`), the state halves `s` and the values `vt`.
    pub(super) fn out_tile(
        &mut self,
        (pq, nq): (Value, Value),
        (pk, nk): (Value, Value),
        s: &[Value],
        vt: Value,
    ) -> LangResult<Value> {
        let a = self.dot_t(pq, pk, None)?;
        let a = self.dot_t(nq, nk, Some(a))?;
        let a = self.causal(a)?;
        let o = self.kb.dot(pq, s[0], None)?;
        let o = self.kb.dot(nq, s[1], Some(o))?;
        self.kb.dot(a, vt, Some(o))
    }

    /// The state halves after a sub-chunk: `S + φKᵀ V` for each half of `phk`.
    pub(super) fn state_step(
        &mut self,
        (pk, nk): (Value, Value),
        vt: Value,
        s: &[Value],
    ) -> LangResult<Vec<Value>> {
        let sp = self.t_dot(pk, vt, Some(s[0]))?;
        let sn = self.t_dot(nk, vt, Some(s[1]))?;
        Ok(vec![sp, sn])
    }

    /// One query tile's dq from the queries `qt` and their φ halves `phq`, the output cotangent
    /// `dot`, the keys' φ halves `phk`, the values `vt` and the state halves `s`.
    pub(super) fn dq_tile(
        &mut self,
        (qt, phq): (Value, (Value, Value)),
        dot: Value,
        (pk, nk): (Value, Value),
        vt: Value,
        s: &[Value],
    ) -> LangResult<Value> {
        let p = self.dot_t(dot, vt, None)?;
        let p = self.causal(p)?;
        let dpq = self.dot_t(dot, s[0], None)?;
        let dpq = self.kb.dot(p, pk, Some(dpq))?;
        let dnq = self.dot_t(dot, s[1], None)?;
        let dnq = self.kb.dot(p, nk, Some(dnq))?;
        self.phi_vjp(qt, phq, (dpq, dnq))
    }

    /// The zero accumulators of [`K::dkdv_acc`] for value blocks of `hv` columns: dφ⁺K, dφ⁻K
    /// (`[C, H]`), dv (`[C, hv]`) and the in-chunk dS halves (`[H, hv]`).
    pub(super) fn dkdv_init(&mut self, hv: usize) -> LangResult<Vec<Value>> {
        let (ch, cv, hx) = ([self.geo.c, self.geo.h], [self.geo.c, hv], [self.geo.h, hv]);
        Ok(vec![
            self.kb.zeros(&ch)?,
            self.kb.zeros(&ch)?,
            self.kb.zeros(&cv)?,
            self.kb.zeros(&hx)?,
            self.kb.zeros(&hx)?,
        ])
    }

    /// One query head's contribution to a key tile's gradients, added to `acc` (see
    /// [`K::dkdv_init`]): from the queries `qt` and output cotangent `dot` of the query rows
    /// that see the keys (φ halves `phk`) and values `vt` within the window.
    pub(super) fn dkdv_acc(
        &mut self,
        qt: Value,
        dot: Value,
        (pk, nk): (Value, Value),
        vt: Value,
        acc: &[Value],
    ) -> LangResult<Vec<Value>> {
        let (pq, nq) = self.phi(qt)?;
        let a = self.dot_t(pq, pk, None)?;
        let a = self.dot_t(nq, nk, Some(a))?;
        let a = self.causal(a)?;
        let p = self.dot_t(dot, vt, None)?;
        let p = self.causal(p)?;
        let dfp = self.t_dot(p, pq, Some(acc[0]))?;
        let dfn = self.t_dot(p, nq, Some(acc[1]))?;
        let dv = self.t_dot(a, dot, Some(acc[2]))?;
        let ip = self.t_dot(pq, dot, Some(acc[3]))?;
        let inn = self.t_dot(nq, dot, Some(acc[4]))?;
        Ok(vec![dfp, dfn, dv, ip, inn])
    }

    /// A key tile's `(dk, dv)` from its keys `kt` (φ halves `phk`), values `vt`, the dS halves
    /// `ds` of the later queries and the accumulated in-chunk terms `acc` ([`K::dkdv_acc`]).
    pub(super) fn dkdv_tile(
        &mut self,
        (kt, (pk, nk)): (Value, (Value, Value)),
        vt: Value,
        ds: &[Value],
        acc: &[Value],
    ) -> LangResult<(Value, Value)> {
        let dfp = self.dot_t(vt, ds[0], Some(acc[0]))?;
        let dfn = self.dot_t(vt, ds[1], Some(acc[1]))?;
        let dv = self.kb.dot(pk, ds[0], Some(acc[2]))?;
        let dv = self.kb.dot(nk, ds[1], Some(dv))?;
        let dk = self.phi_vjp(kt, (pk, nk), (dfp, dfn))?;
        Ok((dk, dv))
    }

    /// The dS halves before a key tile: `ds` plus the tile's in-chunk terms `acc[3..5]`.
    pub(super) fn ds_step(&mut self, ds: &[Value], acc: &[Value]) -> LangResult<Vec<Value>> {
        let dsp = self.kb.add(ds[0], acc[3])?;
        let dsn = self.kb.add(ds[1], acc[4])?;
        Ok(vec![dsp, dsn])
    }
}

/// Checks what the kernels need beyond [`RlaConfig::validate`] / [`RlaDims::validate`]: tiles of
/// power-of-two sizes ≥ 16 (Triton's `tt.make_range` and `tt.dot`).
pub fn check_tiles(cfg: &RlaConfig, d: &RlaDims) -> LangResult<()> {
    cfg.validate()
        .map_err(|e| LangError::new("rla", "config", e.to_string()))?;
    d.validate()
        .map_err(|e| LangError::new("rla", "dims", e.to_string()))?;
    for (what, x) in [("sub_chunk", cfg.sub_chunk), ("head_dim", d.head_dim)] {
        if !x.is_power_of_two() || x < 16 {
            return Err(LangError::new(
                "rla",
                "tiles",
                format!(
                    "{what} = {x}: the kernel language's RLA kernels need a power of two ≥ 16 \
                     (tile dims of tt.make_range / tt.dot); got {cfg:?} with {d}"
                ),
            ));
        }
    }
    Ok(())
}

/// The environment variable choosing the RLA kernels' matmul precision.
pub const DOT_PRECISION_VAR: &str = "RATTN_RLA_DOT_PRECISION";

/// The matmul precision of the RLA kernels: `RATTN_RLA_DOT_PRECISION` = `ieee` (default when
/// unset or empty), `tf32x3` or `tf32`, read when the kernels are built. Any other value is an
/// error naming the variable and the accepted values.
pub fn dot_precision() -> LangResult<Precision> {
    match std::env::var(DOT_PRECISION_VAR) {
        Err(std::env::VarError::NotPresent) => Ok(Precision::Ieee),
        Ok(v) => match v.as_str() {
            "" | "ieee" => Ok(Precision::Ieee),
            "tf32x3" => Ok(Precision::Tf32x3),
            "tf32" => Ok(Precision::Tf32),
            other => Err(LangError::new(
                "rla",
                DOT_PRECISION_VAR,
                format!(
                    "{DOT_PRECISION_VAR}={other:?} is not a matmul precision; accepted: \
                     ieee (default), tf32x3, tf32"
                ),
            )),
        },
        Err(e) => Err(LangError::new(
            "rla",
            DOT_PRECISION_VAR,
            format!("{DOT_PRECISION_VAR}: {e}; accepted: ieee (default), tf32x3, tf32"),
        )),
    }
}

fn sub_start(k: &mut K<'_>, c: Value, j: Value) -> LangResult<Value> {
    let (l, sc) = (k.geo.l as i64, k.geo.c as i64);
    let jc = {
        let scv = k.kb.int(sc);
        k.kb.mul(j, scv)?
    };
    k.affine(c, l, jc)
}

/// The width of the value-column blocks the kernels split the head dim into: the whole head up
/// to H 32 (the kernels measured on an H200), then 32 columns (H 64: 2 blocks, H 128: 4).
///
/// Every kernel splits by value columns `J`: the states `S[:, J] = Σ φKᵀ V[:, J]`, `o[:, J]`,
/// `dS[:, J]`, `dv[:, J]` have no cross terms, and `dq`, `dk` are linear in the per-block
/// `dφ` (`P = dO Vᵀ = Σ_J dO[:, J] V[:, J]ᵀ`, `dO Sᵀ = Σ_J dO[:, J] S[:, J]ᵀ`; both feature
/// maps' VJPs are linear in `dφ` for fixed input), so their kernels write per-block partial
/// sums (shape [`partial_shape`]) that the caller sums. At H 128 the unsplit `rla_bwd_dkdv`
/// asked for more shared memory than an H100/H200 has, and `rla_fwd_out` more than an A100's.
pub fn value_block(head_dim: usize) -> usize {
    head_dim.min(32)
}

/// The shape of a kernel result that holds per-value-block partial sums of a `[B, T, heads, H]`
/// array (`heads_shape`): itself with one block, else `[H / value_block, B, T, heads, H]`.
pub fn partial_shape(heads_shape: [usize; 4], value_block: usize) -> Vec<usize> {
    let nv = heads_shape[3] / value_block.max(1);
    if nv <= 1 {
        heads_shape.to_vec()
    } else {
        std::iter::once(nv).chain(heads_shape).collect()
    }
}

/// The rows of the kernels' `[C, H]` tiles: the sub-chunk, capped at 4096 / H (32 rows at
/// H 128, 64 at H 64) so that a `[C, H]` f32 tile stays ≤ 16 KiB. The sub-chunk is only a tiling
/// of the chunk (the saved states depend on the chunk), so any power of two dividing it gives
/// the same results; at H 128 with sub-chunk 64 the value-split `rla_bwd_dkdv` still asked for
/// 180,224 B of shared memory, more than an A100 has (166,912 B).
pub fn tile_rows(sub_chunk: usize, head_dim: usize) -> usize {
    sub_chunk.min((4096 / head_dim.max(1)).max(16))
}

/// [`Geo`] with the sub-chunk replaced by [`tile_rows`].
fn kernel_geo(cfg: &RlaConfig, d: &RlaDims) -> Geo {
    let mut geo = Geo::new(cfg, d);
    geo.c = tile_rows(geo.c, geo.h);
    geo
}

fn check_value_block(name: &str, geo: &Geo, hv: usize) -> LangResult<usize> {
    if hv == 0 || !geo.h.is_multiple_of(hv) || (hv < geo.h && hv < 16) {
        return Err(LangError::new(
            name,
            "value_block",
            format!(
                "value_block = {hv} must divide head_dim = {} and be ≥ 16 (tt.dot dims)",
                geo.h
            ),
        ));
    }
    Ok(geo.h / hv)
}

/// The start of value-block kernel `name` with value blocks of `hv` columns: its geometry
/// ([`kernel_geo`]), the number of value blocks `nv`, and a builder with the launch and matmul
/// precision set and the parallel grid (B, `heads`·nv) or, `per_chunk`, (B, `heads`·nv, chunks).
fn value_block_kernel(
    name: &str,
    cfg: &RlaConfig,
    d: &RlaDims,
    hv: usize,
    heads: usize,
    per_chunk: bool,
) -> LangResult<(KernelBuilder, Geo, usize)> {
    let geo = kernel_geo(cfg, d);
    let nv = check_value_block(name, &geo, hv)?;
    let mut grid = vec![GridAxis::parallel(geo.b), GridAxis::parallel(heads * nv)];
    if per_chunk {
        grid.push(GridAxis::parallel(geo.nc));
    }
    let mut kb = KernelBuilder::new(name, &grid);
    kb.launch(geo.warps(), 1);
    kb.set_precision(dot_precision()?);
    Ok((kb, geo, nv))
}

/// The program ids of a value-block kernel's `A` grid axes with axis 1 (`head · nv + j`) split:
/// `([b, head, ..], j, first column j · hv)`.
fn value_program<const A: usize>(
    k: &mut K<'_>,
    nv: usize,
    hv: usize,
) -> LangResult<([Value; A], Value, Value)> {
    let ids = (0..A)
        .map(|axis| k.kb.program_id(axis))
        .collect::<LangResult<Vec<_>>>()?;
    let nvv = k.kb.int(nv as i64);
    let head = k.kb.div(ids[1], nvv)?;
    let hn = k.kb.mul(head, nvv)?;
    let j = k.kb.sub(ids[1], hn)?;
    let hvv = k.kb.int(hv as i64);
    let col0 = k.kb.mul(j, hvv)?;
    Ok((
        std::array::from_fn(|a| if a == 1 { head } else { ids[a] }),
        j,
        col0,
    ))
}

/// The kv head of query head `n`.
fn kv_head(k: &mut K<'_>, n: Value) -> LangResult<Value> {
    let rv = k.kb.int(k.geo.r as i64);
    k.kb.div(n, rv)
}

/// The first query row `t0` of sub-chunk `j` of chunk `c` and the first row `t0 − W − 1` of its
/// shifted keys.
fn query_rows(k: &mut K<'_>, c: Value, j: Value) -> LangResult<(Value, Value)> {
    let t0 = sub_start(k, c, j)?;
    let s0 = k.plus(t0, -(k.geo.w as i64) - 1)?;
    Ok((t0, s0))
}

/// The first key row `s0` of sub-chunk `j` of key chunk `c` and the first row `s0 + W + 1` of
/// the queries that see them shifted.
fn key_rows(k: &mut K<'_>, c: Value, j: Value) -> LangResult<(Value, Value)> {
    let s0 = sub_start(k, c, j)?;
    let p0 = k.plus(s0, k.geo.w as i64 + 1)?;
    Ok((s0, p0))
}

/// Stores a `[C, H]` partial sum: rows `row0..` of head `head` of value block `j` (of `nv`).
#[allow(clippy::too_many_arguments)]
fn store_part(
    k: &mut K<'_>,
    arr: Ref,
    nv: usize,
    j: Value,
    b: Value,
    row0: Value,
    head: Value,
    x: Value,
) -> LangResult<()> {
    if nv == 1 {
        return k.store_rows(arr, b, row0, head, x);
    }
    let zero = k.kb.int(0);
    let ix: Vec<Index> = std::iter::once(Index::At(j))
        .chain(k.cols_index(b, row0, head, zero, k.geo.h))
        .collect();
    k.kb.store(arr, &ix, x)
}

/// A program of the kernels that carry a state over the chunks: batch `b`, kv head `g`, first
/// value column `col0`.
struct StateProgram {
    b: Value,
    g: Value,
    col0: Value,
}

/// The loop of the kernels that carry a state over the chunks (`rla_fwd_states` from the first
/// chunk, `rla_bwd_dstates` from the last; grid (B, G · nv)): program `(b, g·nv + j)` starts
/// from a zero state of value columns `j·hv..`, and at each chunk `c` stores the state into
/// `states` before `chunk` steps it past the chunk. Returns the program and the final state.
fn over_chunks(
    k: &mut K<'_>,
    states: Ref,
    nv: usize,
    hv: usize,
    reverse: bool,
    mut chunk: impl FnMut(&mut K<'_>, &StateProgram, Value, &[Value]) -> LangResult<Vec<Value>>,
) -> LangResult<(StateProgram, Vec<Value>)> {
    let ([b, g], _, col0) = value_program(k, nv, hv)?;
    let p = StateProgram { b, g, col0 };
    let hx = [k.geo.h, hv];
    let init = [k.kb.zeros(&hx)?, k.kb.zeros(&hx)?];
    let nc = k.geo.nc;
    let fin = k.range(nc, &init, |k, i, s| {
        let c = if reverse {
            let last = k.kb.int(nc as i64 - 1);
            k.kb.sub(last, i)?
        } else {
            i
        };
        k.store_state_cols(states, &[b, g, c], col0, (s[0], s[1]))?;
        chunk(k, &p, c, s)
    })?;
    Ok((p, fin))
}

/// `rla_fwd_states(k, v) -> (chunk_states, final_state)`, grid (B, G · H/value_block): program
/// `(b, g·nv + j)` carries the state's value columns `j·value_block..`.
pub fn fwd_states_kernel_tiled(
    cfg: &RlaConfig,
    d: &RlaDims,
    value_block: usize,
) -> LangResult<Kernel> {
    let hv = value_block;
    let (mut kb, geo, nv) = value_block_kernel("rla_fwd_states", cfg, d, hv, d.kv_heads, false)?;
    let kr = kb.input("k", &geo.kv_shape());
    let vr = kb.input("v", &geo.kv_shape());
    let csr = kb.output("chunk_states", &geo.cs_shape());
    let fsr = kb.output("final_state", &geo.fs_shape());
    let mut k = K { kb: &mut kb, geo };
    let (p, fin) = over_chunks(&mut k, csr, nv, hv, false, |k, p, c, s| {
        k.range(geo.l / geo.c, s, |k, j, s| {
            let (t0, s0) = query_rows(k, c, j)?;
            let kt = k.rows(kr, p.b, s0, p.g)?;
            let vt = k.cols(vr, p.b, s0, p.g, p.col0, hv)?;
            // Keys whose query position t0 + i lies past T never contribute.
            let shape = [geo.c, hv];
            let i = k.kb.iota(&shape, 0)?;
            let t0s = k.kb.splat(t0, &shape)?;
            let pos = k.kb.add(i, t0s)?;
            let tv = k.kb.int(geo.t as i64);
            let ts = k.kb.splat(tv, &shape)?;
            let valid = k.kb.cmp(CmpOp::Lt, pos, ts)?;
            let z = k.kb.zeros(&shape)?;
            let vt = k.kb.select(valid, vt, z)?;
            let phk = k.phi(kt)?;
            k.state_step(phk, vt, s)
        })
    })?;
    k.store_state_cols(fsr, &[p.b, p.g], p.col0, (fin[0], fin[1]))?;
    kb.finish()
}

/// `rla_bwd_dstates(q, d_o) -> d_states`, grid (B, G · H/value_block): program `(b, g·nv + j)`
/// carries dS's value columns `j·value_block..`.
pub fn bwd_dstates_kernel_tiled(
    cfg: &RlaConfig,
    d: &RlaDims,
    value_block: usize,
) -> LangResult<Kernel> {
    let hv = value_block;
    let (mut kb, geo, nv) = value_block_kernel("rla_bwd_dstates", cfg, d, hv, d.kv_heads, false)?;
    let qr = kb.input("q", &geo.q_shape());
    let dor = kb.input("d_o", &geo.q_shape());
    let dsr = kb.output("d_states", &geo.cs_shape());
    let mut k = K { kb: &mut kb, geo };
    over_chunks(&mut k, dsr, nv, hv, true, |k, p, c, s| {
        k.range(geo.l / geo.c, s, |k, j, s| {
            let (_, p0) = key_rows(k, c, j)?;
            k.range(geo.r, s, |k, r, s| {
                let n = k.affine(p.g, geo.r as i64, r)?;
                let qt = k.rows(qr, p.b, p0, n)?;
                let dot = k.cols(dor, p.b, p0, n, p.col0, hv)?;
                let phq = k.phi(qt)?;
                k.state_step(phq, dot, s)
            })
        })
    })?;
    kb.finish()
}

/// One sub-chunk of a query chunk, as the kernels over query chunks see it: its first query row
/// `t0`, the queries `qt` and their features `phq` (φ⁺, φ⁻), the shifted keys' features `phk` and the
/// shifted keys' value block `vt`.
struct QueryTile {
    t0: Value,
    qt: Value,
    phq: (Value, Value),
    phk: (Value, Value),
    vt: Value,
}

/// A program of a kernel over query chunks: batch `b`, query head `n`, value block `vj` of
/// first column `col0`.
struct QueryProgram {
    b: Value,
    n: Value,
    vj: Value,
    col0: Value,
}

/// The inputs `q, k, v, chunk_states` that the kernels over query chunks start with.
fn query_inputs(kb: &mut KernelBuilder, geo: &Geo) -> [Ref; 4] {
    [
        kb.input("q", &geo.q_shape()),
        kb.input("k", &geo.kv_shape()),
        kb.input("v", &geo.kv_shape()),
        kb.input("chunk_states", &geo.cs_shape()),
    ]
}

/// The loop of the kernels over query chunks (`rla_fwd_out`, `rla_bwd_dq`; grid (B, N · nv,
/// chunks), all parallel): program `(b, n·nv + j, c)` loads chunk `c`'s state (value columns
/// `j·hv..` of kv head `n / r`) and walks its sub-chunks, calling `tile` on each with the state
/// before the sub-chunk, then stepping the state past it.
fn over_query_chunk(
    k: &mut K<'_>,
    [qr, kr, vr, csr]: [Ref; 4],
    nv: usize,
    hv: usize,
    mut tile: impl FnMut(&mut K<'_>, &QueryProgram, &QueryTile, &[Value]) -> LangResult<()>,
) -> LangResult<()> {
    let ([b, n, c], vj, col0) = value_program(k, nv, hv)?;
    let g = kv_head(k, n)?;
    let (sp, sn) = k.load_state_cols(csr, &[b, g, c], col0, hv)?;
    let prog = QueryProgram { b, n, vj, col0 };
    k.range(k.geo.l / k.geo.c, &[sp, sn], |k, j, s| {
        let (t0, s0) = query_rows(k, c, j)?;
        let qt = k.rows(qr, b, t0, n)?;
        let kt = k.rows(kr, b, s0, g)?;
        let vt = k.cols(vr, b, s0, g, col0, hv)?;
        let phq = k.phi(qt)?;
        let phk = k.phi(kt)?;
        let t = QueryTile {
            t0,
            qt,
            phq,
            phk,
            vt,
        };
        tile(k, &prog, &t, s)?;
        k.state_step(phk, vt, s)
    })?;
    Ok(())
}

/// `rla_fwd_out(q, k, v, chunk_states) -> o`, grid (B, N · H/value_block, chunks), all
/// parallel: program `(b, n·nv + j, c)` gives `o`'s value columns `j·value_block..`.
pub fn fwd_out_kernel_tiled(
    cfg: &RlaConfig,
    d: &RlaDims,
    value_block: usize,
) -> LangResult<Kernel> {
    let hv = value_block;
    let (mut kb, geo, nv) = value_block_kernel("rla_fwd_out", cfg, d, hv, d.heads, true)?;
    let inputs = query_inputs(&mut kb, &geo);
    let or = kb.output("o", &geo.q_shape());
    let mut k = K { kb: &mut kb, geo };
    over_query_chunk(&mut k, inputs, nv, hv, |k, p, t, s| {
        let o = k.out_tile(t.phq, t.phk, s, t.vt)?;
        k.store_cols(or, p.b, t.t0, p.n, p.col0, o)
    })?;
    kb.finish()
}

/// `rla_bwd_dq(q, k, v, chunk_states, d_o) -> dq`, grid (B, N · H/value_block, chunks): program
/// `(b, n·nv + j, c)` writes value block `j`'s partial dq (shape [`partial_shape`]).
pub fn bwd_dq_kernel_tiled(cfg: &RlaConfig, d: &RlaDims, value_block: usize) -> LangResult<Kernel> {
    let hv = value_block;
    let (mut kb, geo, nv) = value_block_kernel("rla_bwd_dq", cfg, d, hv, d.heads, true)?;
    let inputs = query_inputs(&mut kb, &geo);
    let dor = kb.input("d_o", &geo.q_shape());
    let dqr = kb.output("dq", &partial_shape(geo.q_shape(), hv));
    let mut k = K { kb: &mut kb, geo };
    over_query_chunk(&mut k, inputs, nv, hv, |k, p, t, s| {
        let dot = k.cols(dor, p.b, t.t0, p.n, p.col0, hv)?;
        let dq = k.dq_tile((t.qt, t.phq), dot, t.phk, t.vt, s)?;
        store_part(k, dqr, nv, p.vj, p.b, t.t0, p.n, dq)
    })?;
    kb.finish()
}

/// `rla_bwd_dkdv(q, k, v, d_o, d_states) -> (dk, dv)`, grid (B, G · H/value_block, key chunks):
/// program `(b, g·nv + j, c)` handles value columns `j·value_block..` of kv head `g`, writing
/// `dv`'s columns and its partial dk (shape [`partial_shape`]).
pub fn bwd_dkdv_kernel_tiled(
    cfg: &RlaConfig,
    d: &RlaDims,
    value_block: usize,
) -> LangResult<Kernel> {
    let hv = value_block;
    let (mut kb, geo, nv) = value_block_kernel("rla_bwd_dkdv", cfg, d, hv, d.kv_heads, true)?;
    let qr = kb.input("q", &geo.q_shape());
    let kr = kb.input("k", &geo.kv_shape());
    let vr = kb.input("v", &geo.kv_shape());
    let dor = kb.input("d_o", &geo.q_shape());
    let dsr = kb.input("d_states", &geo.cs_shape());
    let dkr = kb.output("dk", &partial_shape(geo.kv_shape(), hv));
    let dvr = kb.output("dv", &geo.kv_shape());
    let mut k = K { kb: &mut kb, geo };
    let ([b, g, c], vj, col0) = value_program(&mut k, nv, hv)?;
    let (dsp, dsn) = k.load_state_cols(dsr, &[b, g, c], col0, hv)?;
    let m = geo.l / geo.c;
    k.range(m, &[dsp, dsn], |k, jj, ds| {
        let last = k.kb.int(m as i64 - 1);
        let sj = k.kb.sub(last, jj)?;
        let (s0, p0) = key_rows(k, c, sj)?;
        let kt = k.rows(kr, b, s0, g)?;
        let vt = k.cols(vr, b, s0, g, col0, hv)?;
        let phk = k.phi(kt)?;
        let init = k.dkdv_init(hv)?;
        let acc = k.range(geo.r, &init, |k, r, acc| {
            let n = k.affine(g, geo.r as i64, r)?;
            let qt = k.rows(qr, b, p0, n)?;
            let dot = k.cols(dor, b, p0, n, col0, hv)?;
            k.dkdv_acc(qt, dot, phk, vt, acc)
        })?;
        let (dk, dv) = k.dkdv_tile((kt, phk), vt, ds, &acc)?;
        store_part(k, dkr, nv, vj, b, s0, g, dk)?;
        k.store_cols(dvr, b, s0, g, col0, dv)?;
        k.ds_step(ds, &acc)
    })?;
    kb.finish()
}

/// Sums per-value-block partials (a leading axis, see [`partial_shape`]) into `len` elements
/// (a no-op for one block).
fn sum_parts(parts: Vec<f32>, len: usize) -> Vec<f32> {
    if parts.len() == len {
        return parts;
    }
    let mut out = vec![0f32; len];
    for part in parts.chunks(len) {
        for (a, x) in out.iter_mut().zip(part) {
            *a += x;
        }
    }
    out
}

/// The two forward kernels: `[rla_fwd_states, rla_fwd_out]`, with [`value_block`]'s tiling.
pub fn fwd_kernels(cfg: &RlaConfig, d: &RlaDims) -> LangResult<[Kernel; 2]> {
    fwd_kernels_tiled(cfg, d, value_block(d.head_dim))
}

/// The two forward kernels with value blocks of `value_block` columns.
pub fn fwd_kernels_tiled(
    cfg: &RlaConfig,
    d: &RlaDims,
    value_block: usize,
) -> LangResult<[Kernel; 2]> {
    Ok([
        fwd_states_kernel_tiled(cfg, d, value_block)?,
        fwd_out_kernel_tiled(cfg, d, value_block)?,
    ])
}

/// The three backward kernels: `[rla_bwd_dstates, rla_bwd_dq, rla_bwd_dkdv]`, with
/// [`value_block`]'s tiling (`dq` and `dk` come as per-block partials, [`partial_shape`]).
pub fn bwd_kernels(cfg: &RlaConfig, d: &RlaDims) -> LangResult<[Kernel; 3]> {
    bwd_kernels_tiled(cfg, d, value_block(d.head_dim))
}

/// The three backward kernels with value blocks of `value_block` columns.
pub fn bwd_kernels_tiled(
    cfg: &RlaConfig,
    d: &RlaDims,
    value_block: usize,
) -> LangResult<[Kernel; 3]> {
    Ok([
        bwd_dstates_kernel_tiled(cfg, d, value_block)?,
        bwd_dq_kernel_tiled(cfg, d, value_block)?,
        bwd_dkdv_kernel_tiled(cfg, d, value_block)?,
    ])
}

/// The forward block run by the interpreter: `(o, chunk_states, final_state)`.
pub fn interpret_fwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> LangResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    interpret_fwd_tiled(cfg, d, value_block(d.head_dim), q, k, v)
}

/// [`interpret_fwd`] with value blocks of `value_block` columns.
pub fn interpret_fwd_tiled(
    cfg: &RlaConfig,
    d: &RlaDims,
    value_block: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> LangResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let [ks, ko] = fwd_kernels_tiled(cfg, d, value_block)?;
    let mut st = interp::run(&ks, &[k, v])?.into_iter();
    let (cs, fs) = (st.next().unwrap_or_default(), st.next().unwrap_or_default());
    let o = interp::run(&ko, &[q, k, v, &cs])?.pop().unwrap_or_default();
    Ok((o, cs, fs))
}

/// The backward block run by the interpreter: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn interpret_bwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    chunk_states: &[f32],
    d_o: &[f32],
) -> LangResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    interpret_bwd_tiled(cfg, d, value_block(d.head_dim), q, k, v, chunk_states, d_o)
}

/// [`interpret_bwd`] with value blocks of `value_block` columns (partials summed here).
#[allow(clippy::too_many_arguments)]
pub fn interpret_bwd_tiled(
    cfg: &RlaConfig,
    d: &RlaDims,
    value_block: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    chunk_states: &[f32],
    d_o: &[f32],
) -> LangResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let [kds, kdq, kdkv] = bwd_kernels_tiled(cfg, d, value_block)?;
    let ds = interp::run(&kds, &[q, d_o])?.pop().unwrap_or_default();
    let dq = interp::run(&kdq, &[q, k, v, chunk_states, d_o])?
        .pop()
        .unwrap_or_default();
    let mut kv = interp::run(&kdkv, &[q, k, v, d_o, &ds])?.into_iter();
    let (dk, dv) = (kv.next().unwrap_or_default(), kv.next().unwrap_or_default());
    Ok((sum_parts(dq, d.q_len()), sum_parts(dk, d.kv_len()), dv))
}

/// Sums a kernel's per-value-block partials over their leading axis (rank 5 → 4) in the graph.
fn sum_parts_op(
    b: &hlo_builder::Builder,
    x: hlo_builder::Op,
) -> hlo_builder::Result<hlo_builder::Op> {
    if b.shape(x)?.rank() == 5 {
        b.reduce_sum(x, &[0])
    } else {
        Ok(x)
    }
}

pub(super) fn lang_err(b: &hlo_builder::Builder, e: LangError) -> hlo_builder::Error {
    b.error("rla", e.to_string())
}

/// `x` as f32 (the Triton kernels read f32; bf16 inputs are widened in the graph).
pub(super) fn as_f32(
    b: &hlo_builder::Builder,
    x: hlo_builder::Op,
) -> hlo_builder::Result<hlo_builder::Op> {
    use hlo_builder::ElementType;
    match b.shape(x)?.ty() {
        Some(ElementType::F32) => Ok(x),
        _ => b.convert(x, ElementType::F32),
    }
}

/// The forward block as Triton custom calls: `(o, chunk_states, final_state)` (a tuple op, the
/// contract of [`crate::graph::rla_fwd_block`]). Two calls: `rla_fwd_states` then `rla_fwd_out`.
pub fn triton_fwd(
    b: &hlo_builder::Builder,
    (q, k, v): (hlo_builder::Op, hlo_builder::Op, hlo_builder::Op),
    cfg: &RlaConfig,
    d: &RlaDims,
) -> hlo_builder::Result<hlo_builder::Op> {
    use super::triton::custom_call;
    check_tiles(cfg, d).map_err(|e| lang_err(b, e))?;
    let (q, k, v) = (as_f32(b, q)?, as_f32(b, k)?, as_f32(b, v)?);
    let [ks, ko] = fwd_kernels(cfg, d).map_err(|e| lang_err(b, e))?;
    let st = custom_call(b, &ks, &[k, v])?;
    let cs = b.get_tuple_element(st, 0)?;
    let fs = b.get_tuple_element(st, 1)?;
    let o = custom_call(b, &ko, &[q, k, v, cs])?;
    b.tuple(&[o, cs, fs])
}

/// The backward block as Triton custom calls: `(dq, dk, dv)` (a tuple op, the contract of
/// [`crate::graph::rla_bwd_block`]). Three calls: `rla_bwd_dstates`, `rla_bwd_dq`,
/// `rla_bwd_dkdv`.
pub fn triton_bwd(
    b: &hlo_builder::Builder,
    (q, k, v): (hlo_builder::Op, hlo_builder::Op, hlo_builder::Op),
    chunk_states: hlo_builder::Op,
    d_o: hlo_builder::Op,
    cfg: &RlaConfig,
    d: &RlaDims,
) -> hlo_builder::Result<hlo_builder::Op> {
    use super::triton::custom_call;
    check_tiles(cfg, d).map_err(|e| lang_err(b, e))?;
    let (q, k, v) = (as_f32(b, q)?, as_f32(b, k)?, as_f32(b, v)?);
    let (cs, d_o) = (as_f32(b, chunk_states)?, as_f32(b, d_o)?);
    let [kds, kdq, kdkv] = bwd_kernels(cfg, d).map_err(|e| lang_err(b, e))?;
    let ds = custom_call(b, &kds, &[q, d_o])?;
    let dq = sum_parts_op(b, custom_call(b, &kdq, &[q, k, v, cs, d_o])?)?;
    let dkdv = custom_call(b, &kdkv, &[q, k, v, d_o, ds])?;
    let dk = sum_parts_op(b, b.get_tuple_element(dkdv, 0)?)?;
    let dv = b.get_tuple_element(dkdv, 1)?;
    b.tuple(&[dq, dk, dv])
}
