//! The RLA blocks for the Mosaic (TPU) back end: one forward and one backward kernel in the
//! blocked form Mosaic needs, mirroring AXLearn's Pallas kernels (DESIGN §3).
//!
//! On TPU a program sees VMEM blocks that libtpu copies in and out for it, so the kernels index
//! blocks, never whole arrays, and never read out of range. The graph wrapper therefore lays the
//! operands out so that every block is a plain tile:
//! - q, d_o (and o, dq): `[B, N, T'/C, C, H]` (heads major, T padded with zeros to
//!   `T' = n_chunks · chunk`, sub-chunks split off: a free reshape);
//! - k̃, ṽ (and dk̃, dṽ): `[B, G, T'/C, C, H]`, the keys and values **already shifted** by W + 1
//!   (`k̃_t = k_{t−W−1}`, zero for `t ≤ W` and for `t ≥ T`), so query sub-chunk j pairs with
//!   key sub-chunk j; the shift is one `pad` in HLO;
//! - `chunk_states [B, G, n_chunks, 2H, H]` and `final_state [B, G, 2H, H]` in our layout.
//!
//! Kernels (grid `(B, G, n_chunks)`, batch and kv head parallel, chunks `arbitrary` i.e. in
//! order on one core, the state carried in a VMEM scratch buffer from chunk to chunk):
//! - `rla_fwd_mosaic(q, k̃, ṽ) -> (o, chunk_states, final_state)`: per chunk, S from scratch
//!   (zero on the first chunk) is saved to `chunk_states`, then the sub-chunk loop updates S in
//!   vregs, an inner loop over the group's R query heads writing o;
//! - `rla_bwd_mosaic(q, k̃, ṽ, chunk_states, d_o) -> (dq, dk̃, dṽ)`: chunks in reverse (the index
//!   maps read block `n_chunks−1−c`), dS carried in scratch; pass 1 over sub-chunks gives dq
//!   from the saved states, pass 2 in reverse gives dk̃, dṽ (summed over the group's heads).
//!
//! The wrapper un-shifts dk̃, dṽ (another `pad`) and transposes back. Tiles are `[C, H]`,
//! `[C, C]`, `[H, H]`; blocks hold one chunk (`chunk/C` sub-chunks) of R heads.

use super::builder::KernelBuilder;
use super::interp;
use super::ir::*;
use super::mosaic;
use super::rla::{as_f32, lang_err, Geo, K};
use crate::config::{RlaConfig, RlaDims};
use hlo_builder::{Builder, ElementType, Op as HloOp};

/// Sizes of one RLA call as the Mosaic kernels see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Batch.
    pub b: usize,
    /// Tokens (unpadded).
    pub t: usize,
    /// Query heads.
    pub n: usize,
    /// Kv heads.
    pub g: usize,
    /// Head dim.
    pub h: usize,
    /// Query heads per kv head.
    pub r: usize,
    /// Sub-chunk.
    pub c: usize,
    /// Sub-chunks per chunk.
    pub m: usize,
    /// Chunks.
    pub nc: usize,
    /// The shift of keys and values: window + 1.
    pub shift: usize,
}

impl Layout {
    /// The layout of `d` under `cfg` (checked: see [`check_config`]).
    pub fn new(cfg: &RlaConfig, d: &RlaDims) -> LangResult<Layout> {
        check_config(cfg, d)?;
        Ok(Layout {
            b: d.batch,
            t: d.seq,
            n: d.heads,
            g: d.kv_heads,
            h: d.head_dim,
            r: d.group_size(),
            c: cfg.sub_chunk,
            m: cfg.chunk / cfg.sub_chunk,
            nc: d.n_chunks(cfg),
            shift: cfg.window + 1,
        })
    }

    /// Padded tokens `T' = n_chunks · chunk`.
    pub fn tp(&self) -> usize {
        self.nc * self.m * self.c
    }

    /// `[B, heads, T'/C, C, H]`, the kernel layout of a `[B, T, heads, H]` array.
    pub fn rows_shape(&self, heads: usize) -> [usize; 5] {
        [self.b, heads, self.tp() / self.c, self.c, self.h]
    }

    fn cs_shape(&self) -> [usize; 5] {
        [self.b, self.g, self.nc, 2 * self.h, self.h]
    }

    fn fs_shape(&self) -> [usize; 4] {
        [self.b, self.g, 2 * self.h, self.h]
    }
}

/// What the Mosaic kernels need beyond the config's own rules: a sub-chunk that is a multiple of
/// 8 (the f32 sublane tile: `[C, ·]` tiles and the `[C, C]` mask) and a head dim that is a
/// multiple of 8 (the state halves start at row H of `[2H, H]`).
pub fn check_config(cfg: &RlaConfig, d: &RlaDims) -> LangResult<()> {
    cfg.validate()
        .map_err(|e| LangError::new("rla_mosaic", "config", e.to_string()))?;
    d.validate()
        .map_err(|e| LangError::new("rla_mosaic", "dims", e.to_string()))?;
    for (what, x) in [("sub_chunk", cfg.sub_chunk), ("head_dim", d.head_dim)] {
        if x % 8 != 0 {
            return Err(LangError::new(
                "rla_mosaic",
                "tiles",
                format!(
                    "{what} = {x}: the Mosaic RLA kernels need a multiple of 8 (the f32 sublane \
                     tile); got {cfg:?} with {d}; use the lowering \"hlo\" for this config"
                ),
            ));
        }
    }
    Ok(())
}

fn block(shape: &[usize], map: Vec<Affine>) -> BlockSpec {
    BlockSpec {
        shape: shape.to_vec(),
        index_map: map,
    }
}

/// Index maps `(b, head block, chunk, 0, 0)`; `reverse` reads chunk `nc − 1 − c`.
fn chunk_map(l: &Layout, rank: usize, reverse: bool) -> Vec<Affine> {
    let c = if reverse {
        Affine {
            terms: vec![(2, -1)],
            constant: l.nc as i64 - 1,
        }
    } else {
        Affine::program(2)
    };
    let mut m = vec![Affine::program(0), Affine::program(1), c];
    m.resize(rank, Affine::constant(0));
    m
}

fn grid(l: &Layout) -> Vec<GridAxis> {
    vec![
        GridAxis::parallel(l.b),
        GridAxis::parallel(l.g),
        GridAxis::arbitrary(l.nc),
    ]
}

/// The index of the `[C, H]` tile of sub-chunk `j`, head `head` (within the block) of a rows
/// block.
fn tile_index(k: &mut K<'_>, l: &Layout, head: Value, j: Value) -> [Index; 5] {
    let zero = k.kb.int(0);
    [
        Index::At(zero),
        Index::At(head),
        Index::At(j),
        Index::Slice(zero, l.c),
        Index::Slice(zero, l.h),
    ]
}

/// The `[C, H]` tile of sub-chunk `j`, head `head` (within the block) of a rows block.
fn tile(k: &mut K<'_>, l: &Layout, arr: Ref, head: Value, j: Value) -> LangResult<Value> {
    let ix = tile_index(k, l, head, j);
    k.kb.load(arr, &ix)
}

/// Stores `x` as the tile [`tile`] loads.
fn store_tile(
    k: &mut K<'_>,
    l: &Layout,
    arr: Ref,
    head: Value,
    j: Value,
    x: Value,
) -> LangResult<()> {
    let ix = tile_index(k, l, head, j);
    k.kb.store(arr, &ix, x)
}

/// The index of state half `half` (rows `half·H..`) of a `[.., 2H, H]` ref with `lead` zeros.
fn half_index(k: &mut K<'_>, l: &Layout, lead: usize, half: usize) -> Vec<Index> {
    let zero = k.kb.int(0);
    let row = k.kb.int((half * l.h) as i64);
    let mut ix = vec![Index::At(zero); lead];
    ix.push(Index::Slice(row, l.h));
    ix.push(Index::Slice(zero, l.h));
    ix
}

fn load_state(k: &mut K<'_>, l: &Layout, arr: Ref, lead: usize) -> LangResult<[Value; 2]> {
    let ip = half_index(k, l, lead, 0);
    let p = k.kb.load(arr, &ip)?;
    let ineg = half_index(k, l, lead, 1);
    let n = k.kb.load(arr, &ineg)?;
    Ok([p, n])
}

fn store_state(k: &mut K<'_>, l: &Layout, arr: Ref, lead: usize, s: [Value; 2]) -> LangResult<()> {
    for (half, v) in s.into_iter().enumerate() {
        let ix = half_index(k, l, lead, half);
        k.kb.store(arr, &ix, v)?;
    }
    Ok(())
}

/// The state carried in `scratch` from the previous program, or zeros on the first chunk
/// (Mosaic does not zero scratch at launch).
fn carried_state(k: &mut K<'_>, l: &Layout, scratch: Ref) -> LangResult<[Value; 2]> {
    let c = k.kb.program_id(2)?;
    let zero = k.kb.int(0);
    let first = k.kb.cmp(CmpOp::Eq, c, zero)?;
    let hh = [l.h, l.h];
    let first = k.kb.splat(first, &hh)?;
    let z = k.kb.zeros(&hh)?;
    let [p, n] = load_state(k, l, scratch, 0)?;
    Ok([k.kb.select(first, z, p)?, k.kb.select(first, z, n)?])
}

/// A program's block shapes: the queries of one kv head `[1, R, M, C, H]` (rows of `rows_q`),
/// a key/value chunk `[1, 1, M, C, H]` (rows of `rows_kv`), one chunk state `[1, 1, 1, 2H, H]`.
struct Blocks {
    rows_q: [usize; 5],
    rows_kv: [usize; 5],
    q: [usize; 5],
    kv: [usize; 5],
    state: [usize; 5],
}

impl Blocks {
    fn new(l: &Layout) -> Blocks {
        Blocks {
            rows_q: l.rows_shape(l.n),
            rows_kv: l.rows_shape(l.g),
            q: [1, l.r, l.m, l.c, l.h],
            kv: [1, 1, l.m, l.c, l.h],
            state: [1, 1, 1, 2 * l.h, l.h],
        }
    }

    /// The `q`, `k_shifted`, `v_shifted` inputs every kernel takes first, the chunks in order
    /// (`reverse` false) or from the last.
    fn qkv_inputs(
        &self,
        kb: &mut KernelBuilder,
        l: &Layout,
        reverse: bool,
    ) -> LangResult<[Ref; 3]> {
        let map = || chunk_map(l, 5, reverse);
        Ok([
            kb.input_block("q", &self.rows_q, block(&self.q, map()))?,
            kb.input_block("k_shifted", &self.rows_kv, block(&self.kv, map()))?,
            kb.input_block("v_shifted", &self.rows_kv, block(&self.kv, map()))?,
        ])
    }
}

/// The key and value tiles of sub-chunk `j` (head `zero` of the program's kv head) and φ(k)
/// (its positive and negative halves).
fn kv_tiles(
    k: &mut K<'_>,
    l: &Layout,
    (kr, vr): (Ref, Ref),
    zero: Value,
    j: Value,
) -> LangResult<(Value, Value, (Value, Value))> {
    let kt = tile(k, l, kr, zero, j)?;
    let vt = tile(k, l, vr, zero, j)?;
    let phk = k.phi(kt)?;
    Ok((kt, vt, phk))
}

/// `rla_fwd_mosaic(q, k̃, ṽ) -> (o, chunk_states, final_state)`, grid (B, G, chunks).
pub fn fwd_kernel(cfg: &RlaConfig, d: &RlaDims) -> LangResult<Kernel> {
    let l = Layout::new(cfg, d)?;
    let geo = Geo::new(cfg, d);
    let mut kb = KernelBuilder::new("rla_fwd_mosaic", &grid(&l));
    let bl = Blocks::new(&l);
    let fsb = [1, 1, 2 * l.h, l.h];
    let [qr, kr, vr] = bl.qkv_inputs(&mut kb, &l, false)?;
    let or = kb.output_block("o", &bl.rows_q, block(&bl.q, chunk_map(&l, 5, false)))?;
    let csr = kb.output_block(
        "chunk_states",
        &l.cs_shape(),
        block(&bl.state, chunk_map(&l, 5, false)),
    )?;
    let mut fs_map = chunk_map(&l, 4, false);
    fs_map[2] = Affine::constant(0);
    let fsr = kb.output_block("final_state", &l.fs_shape(), block(&fsb, fs_map))?;
    let sr = kb.scratch("state", &[2 * l.h, l.h]);
    let mut k = K { kb: &mut kb, geo };
    let s = carried_state(&mut k, &l, sr)?;
    store_state(&mut k, &l, csr, 3, s)?;
    let fin = k.range(l.m, &s, |k, j, s| {
        let zero = k.kb.int(0);
        let (_, vt, phk) = kv_tiles(k, &l, (kr, vr), zero, j)?;
        k.range(l.r, &[], |k, r, _| {
            let qt = tile(k, &l, qr, r, j)?;
            let phq = k.phi(qt)?;
            let o = k.out_tile(phq, phk, s, vt)?;
            store_tile(k, &l, or, r, j, o)?;
            Ok(vec![])
        })?;
        k.state_step(phk, vt, s)
    })?;
    let fin = [fin[0], fin[1]];
    store_state(&mut k, &l, sr, 0, fin)?;
    store_state(&mut k, &l, fsr, 2, fin)?;
    kb.finish()
}

/// `rla_bwd_mosaic(q, k̃, ṽ, chunk_states, d_o) -> (dq, dk̃, dṽ)`, grid (B, G, chunks in
/// reverse).
pub fn bwd_kernel(cfg: &RlaConfig, d: &RlaDims) -> LangResult<Kernel> {
    let l = Layout::new(cfg, d)?;
    let geo = Geo::new(cfg, d);
    let mut kb = KernelBuilder::new("rla_bwd_mosaic", &grid(&l));
    let bl = Blocks::new(&l);
    let map = |rank| chunk_map(&l, rank, true);
    let [qr, kr, vr] = bl.qkv_inputs(&mut kb, &l, true)?;
    let csr = kb.input_block("chunk_states", &l.cs_shape(), block(&bl.state, map(5)))?;
    let dor = kb.input_block("d_o", &bl.rows_q, block(&bl.q, map(5)))?;
    let dqr = kb.output_block("dq", &bl.rows_q, block(&bl.q, map(5)))?;
    let dkr = kb.output_block("dk_shifted", &bl.rows_kv, block(&bl.kv, map(5)))?;
    let dvr = kb.output_block("dv_shifted", &bl.rows_kv, block(&bl.kv, map(5)))?;
    let dsr = kb.scratch("d_state", &[2 * l.h, l.h]);
    let mut k = K { kb: &mut kb, geo };

    // Pass 1: dq, with S recomputed from the chunk's saved state.
    let s0 = load_state(&mut k, &l, csr, 3)?;
    k.range(l.m, &s0, |k, j, s| {
        let zero = k.kb.int(0);
        let (_, vt, phk) = kv_tiles(k, &l, (kr, vr), zero, j)?;
        k.range(l.r, &[], |k, r, _| {
            let qt = tile(k, &l, qr, r, j)?;
            let dot = tile(k, &l, dor, r, j)?;
            let phq = k.phi(qt)?;
            let dq = k.dq_tile((qt, phq), dot, phk, vt, s)?;
            store_tile(k, &l, dqr, r, j, dq)?;
            Ok(vec![])
        })?;
        k.state_step(phk, vt, s)
    })?;

    // Pass 2: dk̃, dṽ over the sub-chunks in reverse, dS carried from the later chunks.
    let ds = carried_state(&mut k, &l, dsr)?;
    let ds = k.range(l.m, &ds, |k, jj, ds| {
        let last = k.kb.int(l.m as i64 - 1);
        let j = k.kb.sub(last, jj)?;
        let zero = k.kb.int(0);
        let (kt, vt, phk) = kv_tiles(k, &l, (kr, vr), zero, j)?;
        let init = k.dkdv_init(l.h)?;
        let acc = k.range(l.r, &init, |k, r, acc| {
            let qt = tile(k, &l, qr, r, j)?;
            let dot = tile(k, &l, dor, r, j)?;
            k.dkdv_acc(qt, dot, phk, vt, acc)
        })?;
        let (dk, dv) = k.dkdv_tile((kt, phk), vt, ds, &acc)?;
        store_tile(k, &l, dkr, zero, j, dk)?;
        store_tile(k, &l, dvr, zero, j, dv)?;
        k.ds_step(ds, &acc)
    })?;
    store_state(&mut k, &l, dsr, 0, [ds[0], ds[1]])?;
    kb.finish()
}

// ---------------------------------------------------------------------------------------------
// The layout change, on the host (interpreter tests) and in HLO (the graph wrapper).

/// `[B, T, heads, H]` → `[B, heads, T'/C, C, H]`, row `t` taken from row `t − shift` of `x`
/// (zero where that is outside `[0, T)`, and for `t ≥ T`).
pub fn to_kernel_layout(l: &Layout, x: &[f32], heads: usize, shift: usize) -> Vec<f32> {
    let (t, tp, h) = (l.t, l.tp(), l.h);
    let mut out = vec![0.0; l.b * heads * tp * h];
    for b in 0..l.b {
        for n in 0..heads {
            for row in shift..t {
                let src = ((b * t + row - shift) * heads + n) * h;
                let dst = ((b * heads + n) * tp + row) * h;
                out[dst..dst + h].copy_from_slice(&x[src..src + h]);
            }
        }
    }
    out
}

/// The inverse of [`to_kernel_layout`]: row `s` of the result is row `s + shift` of `y` (zero
/// past `T'`).
pub fn from_kernel_layout(l: &Layout, y: &[f32], heads: usize, shift: usize) -> Vec<f32> {
    let (t, tp, h) = (l.t, l.tp(), l.h);
    let mut out = vec![0.0; l.b * t * heads * h];
    for b in 0..l.b {
        for n in 0..heads {
            for s in 0..t {
                if s + shift >= tp {
                    break;
                }
                let src = ((b * heads + n) * tp + s + shift) * h;
                let dst = ((b * t + s) * heads + n) * h;
                out[dst..dst + h].copy_from_slice(&y[src..src + h]);
            }
        }
    }
    out
}

/// [`to_kernel_layout`] in HLO: transpose, one `pad` (shift and padding; negative high padding
/// drops rows), reshape. `x` is f32 `[B, T, heads, H]`.
pub fn to_kernel_layout_hlo(
    b: &Builder,
    l: &Layout,
    x: HloOp,
    shift: usize,
) -> hlo_builder::Result<HloOp> {
    let s = b.shape(x)?;
    let heads = s.dims()[2];
    let xt = b.transpose(x, &[0, 2, 1, 3])?;
    let zero = b.scalar_typed(ElementType::F32, 0.0)?;
    let (t, tp, sh) = (l.t as i64, l.tp() as i64, shift as i64);
    // Rows past T are zero: keep only rows < T − shift of x, then shift and pad to T'.
    let kept = (t - sh).max(0);
    if kept == 0 {
        let dims = l.rows_shape(heads as usize).map(|d| d as i64);
        return b.zeros(ElementType::F32, &dims);
    }
    let xs = if kept < t {
        b.slice_in_dim(xt, 0, kept, 2)?
    } else {
        xt
    };
    let padded = b.pad(
        xs,
        zero,
        &[(0, 0, 0), (0, 0, 0), (sh, tp - kept - sh, 0), (0, 0, 0)],
    )?;
    b.reshape(padded, &l.rows_shape(heads as usize).map(|d| d as i64))
}

/// [`from_kernel_layout`] in HLO: reshape, one `pad` (negative low padding drops the first
/// `shift` rows), transpose back to `[B, T, heads, H]`.
pub fn from_kernel_layout_hlo(
    b: &Builder,
    l: &Layout,
    y: HloOp,
    shift: usize,
) -> hlo_builder::Result<HloOp> {
    let s = b.shape(y)?;
    let heads = s.dims()[1];
    let (t, tp, sh) = (l.t as i64, l.tp() as i64, shift as i64);
    let y4 = b.reshape(y, &[l.b as i64, heads, tp, l.h as i64])?;
    let zero = b.scalar_typed(ElementType::F32, 0.0)?;
    let y4 = if sh >= tp {
        b.zeros(ElementType::F32, &[l.b as i64, heads, t, l.h as i64])?
    } else {
        b.pad(
            y4,
            zero,
            &[(0, 0, 0), (0, 0, 0), (-sh, t - tp + sh, 0), (0, 0, 0)],
        )?
    };
    b.transpose(y4, &[0, 2, 1, 3])
}

// ---------------------------------------------------------------------------------------------
// Whole blocks: interpreter and graph.

/// q, k, v in the kernel layout on the host: q unshifted, k and v shifted by W + 1.
fn qkv_to_kernel_layout(l: &Layout, q: &[f32], k: &[f32], v: &[f32]) -> [Vec<f32>; 3] {
    [
        to_kernel_layout(l, q, l.n, 0),
        to_kernel_layout(l, k, l.g, l.shift),
        to_kernel_layout(l, v, l.g, l.shift),
    ]
}

/// [`qkv_to_kernel_layout`] in HLO, the inputs widened to f32 first.
fn qkv_to_kernel_layout_hlo(
    b: &Builder,
    l: &Layout,
    (q, k, v): (HloOp, HloOp, HloOp),
) -> hlo_builder::Result<[HloOp; 3]> {
    let (q, k, v) = (as_f32(b, q)?, as_f32(b, k)?, as_f32(b, v)?);
    Ok([
        to_kernel_layout_hlo(b, l, q, 0)?,
        to_kernel_layout_hlo(b, l, k, l.shift)?,
        to_kernel_layout_hlo(b, l, v, l.shift)?,
    ])
}

/// The forward block run by the interpreter on `[B, T, ·, H]` host arrays, through the same
/// layout change the graph makes: `(o, chunk_states, final_state)`.
pub fn interpret_fwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> LangResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let l = Layout::new(cfg, d)?;
    let kern = fwd_kernel(cfg, d)?;
    let [q5, k5, v5] = qkv_to_kernel_layout(&l, q, k, v);
    let mut out = interp::run(&kern, &[&q5, &k5, &v5])?.into_iter();
    let o5 = out.next().unwrap_or_default();
    let cs = out.next().unwrap_or_default();
    let fs = out.next().unwrap_or_default();
    Ok((from_kernel_layout(&l, &o5, l.n, 0), cs, fs))
}

/// The backward block run by the interpreter: `(dq, dk, dv)` as `[B, T, ·, H]` host arrays.
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
    let l = Layout::new(cfg, d)?;
    let kern = bwd_kernel(cfg, d)?;
    let [q5, k5, v5] = qkv_to_kernel_layout(&l, q, k, v);
    let do5 = to_kernel_layout(&l, d_o, l.n, 0);
    let mut out = interp::run(&kern, &[&q5, &k5, &v5, chunk_states, &do5])?.into_iter();
    let dq5 = out.next().unwrap_or_default();
    let dk5 = out.next().unwrap_or_default();
    let dv5 = out.next().unwrap_or_default();
    Ok((
        from_kernel_layout(&l, &dq5, l.n, 0),
        from_kernel_layout(&l, &dk5, l.g, l.shift),
        from_kernel_layout(&l, &dv5, l.g, l.shift),
    ))
}

/// VMEM use of the forward and backward kernels: `[(name, bytes); 2]`.
pub fn vmem_use(cfg: &RlaConfig, d: &RlaDims) -> LangResult<[(String, usize); 2]> {
    let f = fwd_kernel(cfg, d)?;
    let b = bwd_kernel(cfg, d)?;
    let rf = mosaic::check(&f, usize::MAX)?;
    let rb = mosaic::check(&b, usize::MAX)?;
    Ok([(f.name, rf.vmem_total()), (b.name, rb.vmem_total())])
}

/// The forward block as a Mosaic custom call: `(o, chunk_states, final_state)` (a tuple op, the
/// contract of [`crate::graph::rla_fwd_block`]). bf16 inputs are widened to f32 in the graph.
pub fn mosaic_fwd(
    b: &Builder,
    (q, k, v): (HloOp, HloOp, HloOp),
    cfg: &RlaConfig,
    d: &RlaDims,
) -> hlo_builder::Result<HloOp> {
    let l = Layout::new(cfg, d).map_err(|e| lang_err(b, e))?;
    let kern = fwd_kernel(cfg, d).map_err(|e| lang_err(b, e))?;
    let [q5, k5, v5] = qkv_to_kernel_layout_hlo(b, &l, (q, k, v))?;
    let out = mosaic::custom_call(b, &kern, &[q5, k5, v5], mosaic::DEFAULT_VMEM_BUDGET)?;
    let o = from_kernel_layout_hlo(b, &l, b.get_tuple_element(out, 0)?, 0)?;
    let cs = b.get_tuple_element(out, 1)?;
    let fs = b.get_tuple_element(out, 2)?;
    b.tuple(&[o, cs, fs])
}

/// The backward block as a Mosaic custom call: `(dq, dk, dv)` (a tuple op, the contract of
/// [`crate::graph::rla_bwd_block`]).
pub fn mosaic_bwd(
    b: &Builder,
    (q, k, v): (HloOp, HloOp, HloOp),
    chunk_states: HloOp,
    d_o: HloOp,
    cfg: &RlaConfig,
    d: &RlaDims,
) -> hlo_builder::Result<HloOp> {
    let l = Layout::new(cfg, d).map_err(|e| lang_err(b, e))?;
    let kern = bwd_kernel(cfg, d).map_err(|e| lang_err(b, e))?;
    let [q5, k5, v5] = qkv_to_kernel_layout_hlo(b, &l, (q, k, v))?;
    let (cs, d_o) = (as_f32(b, chunk_states)?, as_f32(b, d_o)?);
    let do5 = to_kernel_layout_hlo(b, &l, d_o, 0)?;
    let out = mosaic::custom_call(
        b,
        &kern,
        &[q5, k5, v5, cs, do5],
        mosaic::DEFAULT_VMEM_BUDGET,
    )?;
    let dq = from_kernel_layout_hlo(b, &l, b.get_tuple_element(out, 0)?, 0)?;
    let dk = from_kernel_layout_hlo(b, &l, b.get_tuple_element(out, 1)?, l.shift)?;
    let dv = from_kernel_layout_hlo(b, &l, b.get_tuple_element(out, 2)?, l.shift)?;
    b.tuple(&[dq, dk, dv])
}
