//! The Mosaic (TPU) back end: a [`Kernel`] as Mosaic MLIR in a `tpu_custom_call`.
//!
//! What libtpu 0.0.52 takes (measured, `shared/reference/mosaic-facts.md`):
//! - the body is MLIR **text in the serialized form** ("mode A"): every op in generic syntax with
//!   the `stable_mosaic.` prefix, the module carrying `stable_mosaic.version`; libtpu upgrades
//!   the op schemas from that version to its own. We pin [`MOSAIC_VERSION`] = 11, the version
//!   JAX writes for exported (forward-compatible) kernels, and emit that version's schemas
//!   (`tpu.iota {dimensions}`, `tpu.matmul` without `transpose_lhs_hint`);
//! - the `backend_config` is proto3 JSON of `{"custom_call_config": {"body": <base64>,
//!   "serialization_format": 1, "needs_layout_passes": true}}` (plus our `cost_estimate`);
//! - the kernel is one `func.func` with `tpu.core_type = #tpu.core_type<tc>`, arguments
//!   `i32 × grid rank`, then one VMEM memref per operand and per result shaped like its
//!   **block**, then the scratch memrefs; attributes `dimension_semantics`, `iteration_bounds`,
//!   `window_params` (one transform function per operand and result returning block indices),
//!   `scalar_prefetch`, `scratch_operands`.
//!
//! libtpu pipelines the blocks (double-buffered HBM↔VMEM copies) from `window_params`; the body
//! sees only VMEM. It accepts some broken kernels silently (a block larger than its array, a grid
//! that runs past an operand) and reads or writes out of range where a body indexes past its
//! block, so [`check`] refuses these before emission, with errors naming the kernel and array:
//! - every block fits its array and has the (8, 128) f32 tiling on its last two dims (or equals
//!   the array there);
//! - every block the grid visits starts inside its array;
//! - every load and store lies inside its block for every program id and loop index (interval
//!   analysis of the scalar index arithmetic), and its last two dims start at constant, tile
//!   aligned offsets (Mosaic has no masked access; the interpreter's "out of range reads 0"
//!   does not exist here);
//! - VMEM use (2 buffers per operand/result block + scratch, padded to tiles) fits the budget
//!   (libtpu checks its own total, which adds Mosaic's internal scratch, against its scoped
//!   limit and fails cleanly with `E1001 CompileTimeScopedVmemOom`).
//!
//! Semantics that differ from the interpreter: scratch is **not** zeroed at launch (a kernel
//! initialises it itself, as the RLA kernels do on their first chunk), and the parallel grid
//! axes may be split over the two TensorCores of a v4/v5p megacore chip, each with its own
//! scratch. Nothing here ran on a TPU: libtpu compiles these kernels ahead of time (CI), the
//! interpreter checks the programs' numerics, and numerics on hardware are unverified.

use std::collections::HashMap;
use std::fmt::Write as _;

use hlo_builder::{Builder, Op as HloOp};

use super::arith::{self, FloatMinMax};
use super::ir::*;

/// The `custom_call_target` of Mosaic kernels.
pub const TARGET: &str = "tpu_custom_call";

/// The `stable_mosaic.version` we emit (libtpu 0.0.52 accepts ≤ 20 and upgrades older ones).
pub const MOSAIC_VERSION: i64 = 11;

/// The VMEM budget a kernel is checked against when no chip is named: 16 MiB, libtpu's default
/// scoped VMEM limit on v5e and v5p ([`scoped_vmem_limit`]).
pub const DEFAULT_VMEM_BUDGET: usize = 16 << 20;

/// VMEM per TensorCore of a TPU generation (the name as in topology names: `v4`, `v5e`, `v5p`,
/// `v6e`, `tpu7x`), from jax `_src/tpu_info.py`; `None` for other names.
pub fn vmem_capacity(generation: &str) -> Option<usize> {
    let mib = match generation.to_ascii_lowercase().as_str() {
        "v4" => 16,
        "v5e" => 128,
        "v5p" | "v5" => 64,
        "v6e" => 128,
        "tpu7x" => 64,
        _ => return None,
    };
    Some(mib << 20)
}

/// libtpu 0.0.52's default scoped VMEM limit, the most a kernel may use without raising it
/// (`scoped_memory_configs`), measured by compiling kernels of 16, 32 and 64 MiB of blocks:
/// 16 MiB on v5e and v5p, 32 MiB on v6e (`E1001 CompileTimeScopedVmemOom … limit 16.00M`).
/// It covers our blocks and scratch plus Mosaic's internal scratch. `None` where unmeasured.
pub fn scoped_vmem_limit(generation: &str) -> Option<usize> {
    let mib = match generation.to_ascii_lowercase().as_str() {
        "v5e" | "v5p" | "v5" => 16,
        "v6e" => 32,
        _ => return None,
    };
    Some(mib << 20)
}

/// Sublane and lane tile of an f32 array in VMEM (bf16 would be (16, 128)).
pub const F32_TILE: (usize, usize) = (8, 128);

/// What [`check`] found: VMEM use and a static cost estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosaicReport {
    /// Bytes of VMEM for the operand and result blocks (two buffers each, padded to tiles).
    pub vmem_blocks: usize,
    /// Bytes of VMEM for the scratch buffers (padded to tiles).
    pub vmem_scratch: usize,
    /// Matmul and elementwise f32 operations over the whole grid.
    pub flops: u64,
    /// `exp` evaluations over the whole grid.
    pub transcendentals: u64,
    /// Bytes of the operands and results (each element moves between HBM and VMEM at least
    /// once; a block revisited by consecutive programs is not fetched again).
    pub bytes_accessed: u64,
}

impl MosaicReport {
    /// Total VMEM bytes of the blocks and scratch. libtpu's own figure for the kernel
    /// (`used_scoped_memory_configs` in the compiled program) adds Mosaic's internal scratch:
    /// measured 1.1 to 3.0 MiB more for the RLA kernels (tests/mosaic.rs).
    pub fn vmem_total(&self) -> usize {
        self.vmem_blocks + self.vmem_scratch
    }
}

fn shape_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    )
}

/// Bytes of an f32 buffer of `shape` in VMEM: the last two dims padded to the (8, 128) tile.
pub fn vmem_bytes(shape: &[usize]) -> usize {
    let (sub, lane) = F32_TILE;
    let n = shape.len();
    let mut padded = shape.to_vec();
    if n >= 1 {
        padded[n - 1] = padded[n - 1].div_ceil(lane) * lane;
    }
    if n >= 2 {
        padded[n - 2] = padded[n - 2].div_ceil(sub) * sub;
    }
    4 * padded.iter().product::<usize>()
}

/// An inclusive integer interval of a scalar (`None`: not bounded statically).
type Range = Option<(i64, i64)>;

struct Checker<'a> {
    k: &'a Kernel,
    ranges: Vec<Range>,
    /// Exact values of scalar constants (and values derived from them only).
    consts: Vec<Option<i64>>,
    flops: u64,
    transcendentals: u64,
}

fn span(r: Range) -> String {
    match r {
        Some((lo, hi)) if lo == hi => lo.to_string(),
        Some((lo, hi)) => format!("{lo}..={hi}"),
        None => "unbounded".into(),
    }
}

impl Checker<'_> {
    fn err(&self, op: &str, m: impl Into<String>) -> LangError {
        LangError::new(&self.k.name, op, m)
    }

    fn block(&mut self, b: &Block, mult: u64) -> LangResult<()> {
        for inst in &b.insts {
            self.inst(inst, mult)?;
        }
        Ok(())
    }

    fn set(&mut self, v: Value, r: Range, c: Option<i64>) {
        self.ranges[v.index()] = r;
        self.consts[v.index()] = c;
    }

    fn numel(&self, v: Value) -> u64 {
        self.k.ty(v).shape().iter().product::<usize>() as u64
    }

    fn inst(&mut self, inst: &Inst, mult: u64) -> LangResult<()> {
        let out = inst.results.first().copied();
        match &inst.op {
            Op::ProgramId(a) => {
                let hi = self.k.grid[*a].size as i64 - 1;
                self.set(out.expect("result"), Some((0, hi)), None);
            }
            Op::Int(x) => self.set(out.expect("result"), Some((*x, *x)), Some(*x)),
            Op::Binary { op, a, b } if self.k.ty(*a).is_scalar() => {
                let (ra, rb) = (self.ranges[a.index()], self.ranges[b.index()]);
                let r = match (ra, rb) {
                    (Some(x), Some(y)) => interval(*op, x, y),
                    _ => None,
                };
                let c = match (self.consts[a.index()], self.consts[b.index()]) {
                    (Some(x), Some(y)) => interval(*op, (x, x), (y, y)).map(|r| r.0),
                    _ => None,
                };
                self.set(out.expect("result"), r, c);
            }
            Op::Dot { a, b, .. } => {
                let (sa, sb) = (self.k.ty(*a).shape(), self.k.ty(*b).shape());
                self.flops += mult * 2 * (sa[0] * sa[1] * sb[1]) as u64;
            }
            Op::Load { src, index } => self.access("load", *src, index)?,
            Op::Store { dst, index, .. } => self.access("store", *dst, index)?,
            Op::For {
                lo,
                hi,
                step,
                iv,
                body,
                ..
            } => {
                let (rl, rh) = (self.ranges[lo.index()], self.ranges[hi.index()]);
                let step_c = self.consts[step.index()];
                let Some(st) = step_c.filter(|&s| s > 0) else {
                    return Err(self.err(
                        "for",
                        "Mosaic needs a loop step that is a positive constant",
                    ));
                };
                let r = match (rl, rh) {
                    (Some((l0, _)), Some((_, h1))) if h1 > l0 => Some((l0, h1 - 1)),
                    (Some((l0, _)), Some(_)) => Some((l0, l0)),
                    _ => None,
                };
                self.set(*iv, r, None);
                let trips = match (self.consts[lo.index()], self.consts[hi.index()]) {
                    (Some(l), Some(h)) if h > l => ((h - l) as u64).div_ceil(st as u64),
                    (Some(_), Some(_)) => 0,
                    // Unknown trip count: the estimate counts one trip.
                    _ => 1,
                };
                self.block(body, mult * trips)?;
            }
            _ => {}
        }
        // Elementwise work and transcendentals for the cost estimate.
        if let Some(o) = out.filter(|&o| !self.k.ty(o).is_scalar()) {
            match &inst.op {
                Op::Binary { .. } | Op::Select { .. } | Op::Compare { .. } => {
                    self.flops += mult * self.numel(o)
                }
                Op::Unary { op: UnOp::Exp, .. } => self.transcendentals += mult * self.numel(o),
                Op::Unary { .. } => self.flops += mult * self.numel(o),
                Op::Reduce { x, .. } => self.flops += mult * self.numel(*x),
                _ => {}
            }
        }
        Ok(())
    }

    fn access(&mut self, op: &str, r: Ref, index: &[Index]) -> LangResult<()> {
        let a = self.k.array(r);
        let n = index.len();
        let (sub, lane) = F32_TILE;
        for (d, ix) in index.iter().enumerate() {
            let bdim = a.block.shape[d] as i64;
            let (v, len) = match ix {
                Index::At(v) => (*v, 1),
                Index::Slice(v, len) => (*v, *len as i64),
            };
            let range = self.ranges[v.index()];
            let ok = matches!(range, Some((lo, hi)) if lo >= 0 && hi + len <= bdim);
            if !ok {
                return Err(self.err(
                    op,
                    format!(
                        "`{}` block {}: along dim {d}, {} element(s) from offset {} may leave \
                         the block (Mosaic has no masked access; every offset must be \
                         provably inside the block)",
                        a.name,
                        shape_str(&a.block.shape),
                        len,
                        span(range)
                    ),
                ));
            }
            if d + 2 >= n {
                let minor = d + 1 == n;
                let tile = if minor { lane } else { sub };
                let full = len == bdim;
                match (ix, self.consts[v.index()]) {
                    (Index::At(_), _) => {
                        return Err(self.err(
                            op,
                            format!(
                                "`{}`: a single index along dim {d}, one of the last two (tiled) \
                                 dims, is not supported by the Mosaic back end; slice it",
                                a.name
                            ),
                        ))
                    }
                    (Index::Slice(..), Some(c)) if full || c % tile as i64 == 0 => {}
                    (Index::Slice(..), c) => {
                        return Err(self.err(
                            op,
                            format!(
                                "`{}`: the slice along dim {d} (a tiled dim) starts at {}; Mosaic \
                                 needs a constant multiple of {tile} there",
                                a.name,
                                c.map_or_else(|| span(range), |c| c.to_string())
                            ),
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

fn interval(op: BinOp, (a0, a1): (i64, i64), (b0, b1): (i64, i64)) -> Range {
    let corners = |f: &dyn Fn(i64, i64) -> Option<i64>| -> Range {
        let v = [f(a0, b0)?, f(a0, b1)?, f(a1, b0)?, f(a1, b1)?];
        Some((*v.iter().min()?, *v.iter().max()?))
    };
    match op {
        BinOp::Add => corners(&|x, y| x.checked_add(y)),
        BinOp::Sub => corners(&|x, y| x.checked_sub(y)),
        BinOp::Mul => corners(&|x, y| x.checked_mul(y)),
        BinOp::Div if b0 > 0 => corners(&|x, y| x.checked_div(y)),
        BinOp::Div => None,
        BinOp::Max => Some((a0.max(b0), a1.max(b1))),
        BinOp::Min => Some((a0.min(b0), a1.min(b1))),
        BinOp::And => None,
    }
}

/// Checks what libtpu would accept silently or fail on late (see the module docs) against
/// `vmem_budget` bytes, and returns the kernel's VMEM use and cost estimate.
pub fn check(k: &Kernel, vmem_budget: usize) -> LangResult<MosaicReport> {
    let err = |op: &str, m: String| LangError::new(&k.name, op, m);
    if k.grid.is_empty() {
        return Err(err("grid", "the Mosaic back end needs a grid".into()));
    }
    let (sub, lane) = F32_TILE;
    let arrays = k.inputs.iter().chain(&k.outputs);
    let mut vmem_blocks = 0;
    let mut bytes_accessed = 0u64;
    for a in arrays {
        let (s, b) = (&a.shape, &a.block.shape);
        let n = s.len();
        if n == 0 || b.len() != n || a.block.index_map.len() != n {
            return Err(err(
                "block_spec",
                format!(
                    "`{}` {}: block {} needs the array's rank ≥ 1",
                    a.name,
                    shape_str(s),
                    shape_str(b)
                ),
            ));
        }
        if let Some(d) = (0..n).find(|&d| b[d] == 0 || b[d] > s[d]) {
            return Err(err(
                "block_spec",
                format!(
                    "`{}` {}: block {} is larger than the array along dim {d} (libtpu accepts \
                     this silently and reads past the array)",
                    a.name,
                    shape_str(s),
                    shape_str(b)
                ),
            ));
        }
        for d in n.saturating_sub(2)..n {
            let tile = if d + 1 == n { lane } else { sub };
            if b[d] != s[d] && b[d] % tile != 0 {
                return Err(err(
                    "block_spec",
                    format!(
                        "`{}` {}: block {} is misaligned along dim {d}: one of the last two dims \
                         must be a multiple of {tile} (the f32 ({sub}, {lane}) VMEM tile) or the \
                         whole array dim",
                        a.name,
                        shape_str(s),
                        shape_str(b)
                    ),
                ));
            }
        }
        for (d, m) in a.block.index_map.iter().enumerate() {
            if let Some(&(axis, _)) = m.terms.iter().find(|t| t.0 >= k.grid.len()) {
                return Err(err(
                    "block_spec",
                    format!(
                        "`{}`: the index map of dim {d} uses grid axis {axis}, the grid has {}",
                        a.name,
                        k.grid.len()
                    ),
                ));
            }
            let (mut lo, mut hi) = (m.constant, m.constant);
            for &(axis, c) in &m.terms {
                let top = c * (k.grid[axis].size as i64 - 1);
                lo += top.min(0);
                hi += top.max(0);
            }
            let blocks = s[d].div_ceil(b[d]) as i64;
            if lo < 0 || hi >= blocks {
                return Err(err(
                    "grid",
                    format!(
                        "`{}` {}: the grid {:?} visits blocks {lo}..={hi} along dim {d}, the array \
                         holds {blocks} block(s) of {} there (libtpu accepts a grid that overruns \
                         silently)",
                        a.name,
                        shape_str(s),
                        k.grid.iter().map(|g| g.size).collect::<Vec<_>>(),
                        b[d]
                    ),
                ));
            }
        }
        vmem_blocks += 2 * vmem_bytes(b);
        bytes_accessed += 4 * s.iter().product::<usize>() as u64;
    }
    let vmem_scratch: usize = k.scratch.iter().map(|a| vmem_bytes(&a.shape)).sum();
    let mut c = Checker {
        k,
        ranges: vec![None; k.types.len()],
        consts: vec![None; k.types.len()],
        flops: 0,
        transcendentals: 0,
    };
    let programs: u64 = k.grid.iter().map(|g| g.size as u64).product();
    c.block(&k.body, programs)?;
    let report = MosaicReport {
        vmem_blocks,
        vmem_scratch,
        flops: c.flops,
        transcendentals: c.transcendentals,
        bytes_accessed,
    };
    if report.vmem_total() > vmem_budget {
        return Err(err(
            "vmem",
            format!(
                "needs {} bytes of VMEM ({} for double-buffered blocks, {} scratch), over the \
                 budget of {} bytes; use smaller blocks",
                report.vmem_total(),
                vmem_blocks,
                vmem_scratch,
                vmem_budget
            ),
        ));
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// Emission.

fn elem(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::I32 => "i32",
        DType::Bool => "i1",
    }
}

fn vector(shape: &[usize], e: &str) -> String {
    format!(
        "vector<{}x{e}>",
        shape
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("x")
    )
}

fn mlir_type(t: &Type) -> String {
    match t {
        Type::Scalar(d) => elem(*d).to_string(),
        Type::Tile(d, s) => vector(s, elem(*d)),
    }
}

fn memref(shape: &[usize]) -> String {
    format!(
        "memref<{}xf32, #tpu.memory_space<vmem>>",
        shape
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("x")
    )
}

/// An f32 in MLIR attribute syntax (decimal with a point, or the bit pattern for inf/nan).
fn float(v: f32) -> String {
    if v.is_finite() {
        format!("{v:.9e}")
    } else {
        format!("0x{:08X}", v.to_bits())
    }
}

/// Op names with the serialized-form prefix.
fn op(name: &str) -> String {
    format!("\"stable_mosaic.{name}\"")
}

struct Emitter<'a> {
    k: &'a Kernel,
    out: String,
    indent: usize,
    next: usize,
    /// MLIR name of each kernel value.
    names: HashMap<Value, String>,
    /// `index`-typed casts of i32 scalars, per scope depth.
    index_cache: Vec<HashMap<Value, String>>,
    /// Values used by something other than a matmul operand (transposes feeding only matmuls are
    /// folded into the matmul's dimension numbers).
    other_use: Vec<bool>,
    /// The defining transpose's operand, for values defined by a transpose.
    transposed: HashMap<Value, Value>,
}

impl Emitter<'_> {
    fn line(&mut self, s: &str) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%t{}", self.next)
    }

    fn name(&self, v: Value) -> &str {
        self.names
            .get(&v)
            .map(String::as_str)
            .expect("value emitted before use")
    }

    fn ty(&self, v: Value) -> String {
        mlir_type(self.k.ty(v))
    }

    /// `%r = "op"(operands) {attrs} : (types) -> result` with a fresh name.
    fn def(
        &mut self,
        name: &str,
        operands: &[&str],
        types: &[String],
        attrs: &str,
        result: &str,
    ) -> String {
        let r = self.fresh();
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" {{{attrs}}}")
        };
        let line = format!(
            "{r} = {}({}){attrs} : ({}) -> {result}",
            op(name),
            operands.join(", "),
            types.join(", ")
        );
        self.line(&line);
        r
    }

    fn constant(&mut self, value: &str, ty: &str) -> String {
        self.def(
            "arith.constant",
            &[],
            &[],
            &format!("value = {value} : {ty}"),
            ty,
        )
    }

    fn index_of(&mut self, v: Value) -> String {
        for scope in self.index_cache.iter().rev() {
            if let Some(n) = scope.get(&v) {
                return n.clone();
            }
        }
        let src = self.name(v).to_string();
        let n = self.def("arith.index_cast", &[&src], &["i32".into()], "", "index");
        self.index_cache
            .last_mut()
            .expect("scope")
            .insert(v, n.clone());
        n
    }

    fn block(&mut self, b: &Block) -> LangResult<()> {
        for inst in &b.insts {
            self.inst(inst)?;
        }
        Ok(())
    }

    fn set(&mut self, v: Value, name: String) {
        self.names.insert(v, name);
    }

    fn inst(&mut self, inst: &Inst) -> LangResult<()> {
        let out = inst.results.first().copied();
        let name = match &inst.op {
            Op::ProgramId(a) => format!("%pid{a}"),
            Op::Int(x) => self.constant(&x.to_string(), "i32"),
            Op::Full { value, shape } => {
                let t = vector(shape, "f32");
                self.constant(&format!("dense<{}>", float(*value)), &t)
            }
            Op::Iota { shape, dim } => self.def(
                "tpu.iota",
                &[],
                &[],
                &format!("dimensions = array<i32: {dim}>"),
                &vector(shape, "i32"),
            ),
            Op::Splat { x, shape } => {
                let xt = self.k.ty(*x).clone();
                let src = self.name(*x).to_string();
                if xt.dtype() == DType::Bool {
                    // i1 → i32 → vector → compare with 0: broadcasts of i1 masks are avoided.
                    let w = self.def("arith.extui", &[&src], &["i1".into()], "", "i32");
                    let vt = vector(shape, "i32");
                    let b = self.def("vector.broadcast", &[&w], &["i32".into()], "", &vt);
                    let z = self.constant("dense<0>", &vt);
                    self.def(
                        "arith.cmpi",
                        &[&b, &z],
                        &[vt.clone(), vt],
                        "predicate = 1 : i64",
                        &vector(shape, "i1"),
                    )
                } else {
                    let rt = mlir_type(&Type::Tile(xt.dtype(), shape.clone()));
                    self.def("vector.broadcast", &[&src], &[mlir_type(&xt)], "", &rt)
                }
            }
            Op::Binary { op: bop, a, b } => {
                let float = self.k.ty(*a).dtype() == DType::F32;
                let name = arith::binary(*bop, float, FloatMinMax::Propagating);
                let t = self.ty(*a);
                let (na, nb) = (self.name(*a).to_string(), self.name(*b).to_string());
                self.def(name, &[&na, &nb], &[t.clone(), t.clone()], "", &t)
            }
            Op::Unary { op: uop, x } => {
                let t = self.ty(*x);
                let nx = self.name(*x).to_string();
                self.def(arith::unary(*uop), &[&nx], std::slice::from_ref(&t), "", &t)
            }
            Op::Compare { op: cop, a, b } => {
                let ta = self.k.ty(*a).clone();
                let float = ta.dtype() == DType::F32;
                let (cmp, _, pred) = arith::compare(*cop, float);
                let t = mlir_type(&ta);
                let rt = mlir_type(&Type::Tile(DType::Bool, ta.shape().to_vec()));
                let rt = if ta.is_scalar() { "i1".to_string() } else { rt };
                let (na, nb) = (self.name(*a).to_string(), self.name(*b).to_string());
                self.def(
                    cmp,
                    &[&na, &nb],
                    &[t.clone(), t],
                    &format!("predicate = {pred} : i64"),
                    &rt,
                )
            }
            Op::Select { cond, a, b } => {
                let (tc, t) = (self.ty(*cond), self.ty(*a));
                let (nc, na, nb) = (
                    self.name(*cond).to_string(),
                    self.name(*a).to_string(),
                    self.name(*b).to_string(),
                );
                self.def(
                    "arith.select",
                    &[&nc, &na, &nb],
                    &[tc, t.clone(), t.clone()],
                    "",
                    &t,
                )
            }
            Op::ExpandDims { x, .. } => {
                let o = out.expect("result");
                let (tx, to) = (self.ty(*x), self.ty(o));
                let nx = self.name(*x).to_string();
                self.def("vector.shape_cast", &[&nx], &[tx], "", &to)
            }
            Op::Broadcast { x, .. } => {
                let o = out.expect("result");
                let (tx, to) = (self.ty(*x), self.ty(o));
                let nx = self.name(*x).to_string();
                if tx == to {
                    nx
                } else {
                    self.def("vector.broadcast", &[&nx], &[tx], "", &to)
                }
            }
            Op::Transpose { x } => {
                let o = out.expect("result");
                self.transposed.insert(o, *x);
                if !self.other_use[o.index()] {
                    // Only matmuls use it: folded into their dimension numbers.
                    return Ok(());
                }
                let (tx, to) = (self.ty(*x), self.ty(o));
                let nx = self.name(*x).to_string();
                self.def(
                    "vector.transpose",
                    &[&nx],
                    &[tx],
                    "permutation = array<i64: 1, 0>",
                    &to,
                )
            }
            Op::Reduce { op: rop, x, axis } => {
                let o = out.expect("result");
                let (tx, to) = (self.ty(*x), self.ty(o));
                let (kind, init) = match rop {
                    ReduceOp::Sum => ("add", 0.0f32),
                    ReduceOp::Max => ("maximumf", f32::NEG_INFINITY),
                    ReduceOp::Min => ("minimumf", f32::INFINITY),
                };
                let acc = self.constant(&format!("dense<{}>", float(init)), &to);
                let nx = self.name(*x).to_string();
                self.def(
                    "vector.multi_reduction",
                    &[&nx, &acc],
                    &[tx, to.clone()],
                    &format!("kind = #vector.kind<{kind}>, reduction_dims = array<i64: {axis}>"),
                    &to,
                )
            }
            Op::Dot {
                a,
                b,
                acc,
                precision,
            } => {
                let o = out.expect("result");
                let to = self.ty(o);
                // Fold transposed operands into the dimension numbers.
                let (lhs, lhs_t) = match self.transposed.get(a) {
                    Some(&x) => (x, true),
                    None => (*a, false),
                };
                let (rhs, rhs_t) = match self.transposed.get(b) {
                    Some(&x) => (x, true),
                    None => (*b, false),
                };
                let (lc, lnc) = if lhs_t { (0, 1) } else { (1, 0) };
                let (rc, rnc) = if rhs_t { (1, 0) } else { (0, 1) };
                let acc_name = match acc {
                    Some(c) => self.name(*c).to_string(),
                    None => self.constant(&format!("dense<{}>", float(0.0)), &to),
                };
                let (nl, nr) = (self.name(lhs).to_string(), self.name(rhs).to_string());
                let prec = match precision {
                    // The TPU has no tf32: the cheap GPU mode maps to bf16x3, the 3-pass one to
                    // full fp32.
                    Precision::Ieee | Precision::Tf32x3 => "fp32",
                    Precision::Tf32 => "bf16x3",
                };
                self.def(
                    "tpu.matmul",
                    &[&nl, &nr, &acc_name],
                    &[self.ty(lhs), self.ty(rhs), to.clone()],
                    &format!(
                        "dimension_numbers = #tpu.dot_dimension_numbers<[{lc}], [{rc}], [{lnc}], \
                         [{rnc}], [0, {lnc}, 1, {rnc}], [], []>, precision = \
                         #tpu.contract_precision<{prec}>"
                    ),
                    &to,
                )
            }
            Op::Load { src, index } => {
                let o = out.expect("result");
                let (mem, idx, full) = self.access(*src, index);
                let full_t = vector(&full, "f32");
                let mut operands = vec![mem.as_str()];
                operands.extend(idx.iter().map(String::as_str));
                let mut types = vec![memref(&self.k.array(*src).block_or_scratch_shape(*src))];
                types.extend(idx.iter().map(|_| "index".to_string()));
                let l = self.def("vector.load", &operands, &types, "", &full_t);
                let to = self.ty(o);
                if to == full_t {
                    l
                } else {
                    self.def("vector.shape_cast", &[&l], &[full_t], "", &to)
                }
            }
            Op::Store { dst, index, value } => {
                let (mem, idx, full) = self.access(*dst, index);
                let full_t = vector(&full, "f32");
                let tv = self.ty(*value);
                let mut v = self.name(*value).to_string();
                if tv != full_t {
                    v = self.def("vector.shape_cast", &[&v], &[tv], "", &full_t);
                }
                let mut operands = vec![v.as_str(), mem.as_str()];
                operands.extend(idx.iter().map(String::as_str));
                let mut types = vec![
                    full_t,
                    memref(&self.k.array(*dst).block_or_scratch_shape(*dst)),
                ];
                types.extend(idx.iter().map(|_| "index".to_string()));
                let line = format!(
                    "{}({}) : ({}) -> ()",
                    op("vector.store"),
                    operands.join(", "),
                    types.join(", ")
                );
                self.line(&line);
                return Ok(());
            }
            Op::For {
                lo,
                hi,
                step,
                init,
                iv,
                args,
                body,
            } => {
                let r = self.fresh().replace("%t", "%for");
                let mut operands: Vec<String> = [lo, hi, step]
                    .iter()
                    .map(|v| self.name(**v).to_string())
                    .collect();
                operands.extend(init.iter().map(|v| self.name(*v).to_string()));
                let mut types = vec!["i32".to_string(); 3];
                types.extend(init.iter().map(|v| self.ty(*v)));
                let res_types: Vec<String> = init.iter().map(|v| self.ty(*v)).collect();
                let lhs = match inst.results.len() {
                    0 => String::new(),
                    1 => format!("{r} = "),
                    n => format!("{r}:{n} = "),
                };
                self.line(&format!(
                    "{lhs}{}({}) ({{",
                    op("scf.for"),
                    operands.join(", ")
                ));
                let ivn = format!("%iv{}", iv.index());
                let mut params = vec![format!("{ivn}: i32")];
                self.set(*iv, ivn);
                for a in args {
                    let n = format!("%arg{}", a.index());
                    params.push(format!("{n}: {}", self.ty(*a)));
                    self.set(*a, n);
                }
                self.line(&format!("^bb0({}):", params.join(", ")));
                self.indent += 1;
                self.index_cache.push(HashMap::new());
                self.block(body)?;
                self.index_cache.pop();
                let ys: Vec<String> = body
                    .yields
                    .iter()
                    .map(|v| self.name(*v).to_string())
                    .collect();
                let yts: Vec<String> = body.yields.iter().map(|v| self.ty(*v)).collect();
                self.line(&format!(
                    "{}({}) : ({}) -> ()",
                    op("scf.yield"),
                    ys.join(", "),
                    yts.join(", ")
                ));
                self.indent -= 1;
                self.line(&format!(
                    "}}) : ({}) -> ({})",
                    types.join(", "),
                    res_types.join(", ")
                ));
                match inst.results.len() {
                    0 => {}
                    1 => self.set(inst.results[0], r),
                    _ => {
                        for (i, v) in inst.results.iter().enumerate() {
                            self.set(*v, format!("{r}#{i}"));
                        }
                    }
                }
                return Ok(());
            }
        };
        if let Some(o) = out {
            self.set(o, name);
        }
        Ok(())
    }

    /// The memref argument, index operands and full-rank vector shape of an access.
    fn access(&mut self, r: Ref, index: &[Index]) -> (String, Vec<String>, Vec<usize>) {
        let mem = match r {
            Ref::Input(i) => format!("%in{i}"),
            Ref::Output(i) => format!("%out{i}"),
            Ref::Scratch(i) => format!("%scratch{i}"),
        };
        let mut idx = Vec::new();
        let mut full = Vec::new();
        for ix in index {
            let (v, len) = match ix {
                Index::At(v) => (*v, 1),
                Index::Slice(v, len) => (*v, *len),
            };
            idx.push(self.index_of(v));
            full.push(len);
        }
        (mem, idx, full)
    }
}

impl ArrayDecl {
    /// The shape of the memref the kernel body sees: the block for operands and results, the
    /// whole buffer for scratch.
    fn block_or_scratch_shape(&self, r: Ref) -> Vec<usize> {
        match r {
            Ref::Scratch(_) => self.shape.clone(),
            _ => self.block.shape.clone(),
        }
    }
}

fn mark_uses(b: &Block, other: &mut [bool]) {
    for inst in &b.insts {
        let mut used: Vec<Value> = Vec::new();
        match &inst.op {
            Op::Dot { acc, .. } => used.extend(acc),
            Op::Splat { x, .. }
            | Op::Unary { x, .. }
            | Op::ExpandDims { x, .. }
            | Op::Broadcast { x, .. }
            | Op::Transpose { x }
            | Op::Reduce { x, .. } => used.push(*x),
            Op::Binary { a, b, .. } | Op::Compare { a, b, .. } => used.extend([*a, *b]),
            Op::Select { cond, a, b } => used.extend([*cond, *a, *b]),
            Op::Load { index, .. } => used.extend(index.iter().map(index_value)),
            Op::Store { index, value, .. } => {
                used.push(*value);
                used.extend(index.iter().map(index_value));
            }
            Op::For {
                lo,
                hi,
                step,
                init,
                body,
                ..
            } => {
                used.extend([*lo, *hi, *step]);
                used.extend(init);
                used.extend(&body.yields);
                mark_uses(body, other);
            }
            Op::ProgramId(_) | Op::Int(_) | Op::Full { .. } | Op::Iota { .. } => {}
        }
        for v in used {
            other[v.index()] = true;
        }
    }
}

fn index_value(ix: &Index) -> Value {
    let (Index::At(v) | Index::Slice(v, _)) = ix;
    *v
}

fn affine_fn(out: &mut String, name: &str, grid: usize, maps: &[Affine]) {
    let params: Vec<String> = (0..grid).map(|a| format!("%g{a}: i32")).collect();
    let _ = writeln!(out, "  {}() ({{", op("func.func"));
    let _ = writeln!(out, "  ^bb0({}):", params.join(", "));
    let mut next = 0;
    let mut fresh = || {
        next += 1;
        format!("%a{next}")
    };
    let mut rets = Vec::new();
    let konst = |out: &mut String, r: &str, c: i64| {
        let _ = writeln!(
            out,
            "    {r} = {}() {{value = {c} : i32}} : () -> i32",
            op("arith.constant")
        );
    };
    for m in maps {
        let mut acc = fresh();
        konst(out, &acc, m.constant);
        for &(axis, c) in &m.terms {
            let g = format!("%g{axis}");
            let term = if c == 1 {
                g
            } else {
                let k = fresh();
                konst(out, &k, c);
                let t = fresh();
                let _ = writeln!(
                    out,
                    "    {t} = {}({g}, {k}) : (i32, i32) -> i32",
                    op("arith.muli")
                );
                t
            };
            let s = fresh();
            let _ = writeln!(
                out,
                "    {s} = {}({acc}, {term}) : (i32, i32) -> i32",
                op("arith.addi")
            );
            acc = s;
        }
        rets.push(acc);
    }
    let _ = writeln!(
        out,
        "    {}({}) : ({}) -> ()",
        op("func.return"),
        rets.join(", "),
        vec!["i32"; rets.len()].join(", ")
    );
    let _ = writeln!(
        out,
        "  }}) {{function_type = ({}) -> ({}), sym_name = \"{name}\"}} : () -> ()",
        vec!["i32"; grid].join(", "),
        vec!["i32"; maps.len()].join(", ")
    );
}

/// The Mosaic module (serialized-form MLIR text, version [`MOSAIC_VERSION`]) of `k`. Call
/// [`check`] first: emission assumes a checked kernel.
pub fn emit(k: &Kernel) -> LangResult<String> {
    let mut other = vec![false; k.types.len()];
    mark_uses(&k.body, &mut other);
    let mut e = Emitter {
        k,
        out: String::new(),
        indent: 2,
        next: 0,
        names: HashMap::new(),
        index_cache: vec![HashMap::new()],
        other_use: other,
        transposed: HashMap::new(),
    };
    e.block(&k.body)?;
    let body = std::mem::take(&mut e.out);

    let mut params: Vec<String> = (0..k.grid.len()).map(|a| format!("%pid{a}: i32")).collect();
    let mut types: Vec<String> = vec!["i32".into(); k.grid.len()];
    let mut window = Vec::new();
    let arrays = k
        .inputs
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("%in{i}"), a, format!("transform_in{i}")))
        .chain(
            k.outputs
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("%out{i}"), a, format!("transform_out{i}"))),
        )
        .collect::<Vec<_>>();
    for (n, a, f) in &arrays {
        let t = memref(&a.block.shape);
        params.push(format!("{n}: {t}"));
        types.push(t);
        window.push(format!(
            "{{transform_indices = @{f}, window_bounds = array<i64: {}>}}",
            a.block
                .shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (i, a) in k.scratch.iter().enumerate() {
        let t = memref(&a.shape);
        params.push(format!("%scratch{i}: {t}"));
        types.push(t);
    }
    let semantics: Vec<String> = k
        .grid
        .iter()
        .map(|g| {
            format!(
                "#tpu.dimension_semantics<{}>",
                match g.semantics {
                    Semantics::Parallel => "parallel",
                    Semantics::Arbitrary => "arbitrary",
                }
            )
        })
        .collect();
    let bounds: Vec<String> = k.grid.iter().map(|g| g.size.to_string()).collect();

    let mut out = String::new();
    let _ = writeln!(out, "\"builtin.module\"() ({{");
    let _ = writeln!(out, "  {}() ({{", op("func.func"));
    let _ = writeln!(out, "  ^bb0({}):", params.join(", "));
    out.push_str(&body);
    let _ = writeln!(out, "    {}() : () -> ()", op("func.return"));
    let _ = writeln!(
        out,
        "  }}) {{dimension_semantics = [{}], function_type = ({}) -> (), iteration_bounds = \
         array<i64: {}>, scalar_prefetch = 0 : i64, scratch_operands = {} : i64, sym_name = \
         \"{}\", tpu.core_type = #tpu.core_type<tc>, window_params = [{}]}} : () -> ()",
        semantics.join(", "),
        types.join(", "),
        bounds.join(", "),
        k.scratch.len(),
        k.name,
        window.join(", ")
    );
    for (_, a, f) in &arrays {
        affine_fn(&mut out, f, k.grid.len(), &a.block.index_map);
    }
    let _ = writeln!(
        out,
        "}}) {{stable_mosaic.version = {MOSAIC_VERSION} : i64}} : () -> ()"
    );
    Ok(out)
}

/// Standard base64 (RFC 4648, with padding): the `body` field is proto `bytes` in proto3 JSON.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The `backend_config` JSON of a Mosaic custom call with module text `body` and, when given,
/// the report's cost estimate (XLA's cost model cannot look inside the kernel: without an
/// estimate the kernel counts as no work).
pub fn backend_config(body: &str, report: Option<&MosaicReport>) -> String {
    let cost = report.map_or(String::new(), |r| {
        format!(
            ", \"cost_estimate\": {{\"bytes_accessed\":{},\"flops\":{},\"transcendentals\":{}}}",
            r.bytes_accessed, r.flops, r.transcendentals
        )
    });
    format!(
        "{{\"custom_call_config\": {{\"body\": \"{}\"{cost}, \"serialization_format\": 1, \
         \"needs_layout_passes\": true}}}}",
        base64(body.as_bytes()),
    )
}

/// libtpu's VMEM figure for every Mosaic kernel of a compiled program, in order: the
/// `used_scoped_memory_configs` size that libtpu writes into each `tpu_custom_call`'s backend
/// config (our blocks and scratch plus Mosaic's internal scratch). `optimized_program` is the
/// serialized optimized `HloModuleProto` (`Executable::optimized_program`).
pub fn compiled_vmem(optimized_program: &[u8]) -> Vec<usize> {
    let text = String::from_utf8_lossy(optimized_program);
    let mut out = Vec::new();
    let mut rest: &str = &text;
    while let Some(call) = rest.find("custom_call_config") {
        rest = &rest[call + "custom_call_config".len()..];
        // The next call's config starts a new search; stay inside this one.
        let end = rest.find("custom_call_config").unwrap_or(rest.len());
        let this = &rest[..end];
        let size = this.find("used_scoped_memory_configs").and_then(|at| {
            let cfg = &this[at..];
            let s = cfg.find("\"size\"")? + "\"size\"".len();
            let digits: String = cfg[s..]
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        });
        if let Some(v) = size {
            out.push(v);
        }
    }
    out
}

/// `k` as a `tpu_custom_call` over `operands` (f32 arrays shaped like the kernel's inputs):
/// checks it against `vmem_budget` ([`check`]), emits it ([`emit`]) and returns the result
/// (an array for one output, else a tuple).
pub fn custom_call(
    b: &Builder,
    k: &Kernel,
    operands: &[HloOp],
    vmem_budget: usize,
) -> hlo_builder::Result<HloOp> {
    let lang = |e: LangError| b.error("mosaic", e.to_string());
    let result = super::call_result_shape(b, "mosaic", k, operands)?;
    let report = check(k, vmem_budget).map_err(lang)?;
    let body = emit(k).map_err(lang)?;
    let _s = b.name_scope(&k.name);
    b.custom_call_with_config(
        TARGET,
        operands,
        result,
        &backend_config(&body, Some(&report)),
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn vmem_bytes_pad_to_tiles() {
        assert_eq!(vmem_bytes(&[8, 128]), 4096);
        assert_eq!(vmem_bytes(&[1, 1, 4, 100, 64]), 4 * 4 * 104 * 128);
        assert_eq!(vmem_bytes(&[3]), 512);
    }
}
