//! The Triton back end: a [`Kernel`] as textual Triton IR (TTIR) in an XLA
//! `__gpu$xla.gpu.triton` custom call (typed-FFI api version 4), which the CUDA PJRT plugin
//! compiles with its bundled Triton from the HLO alone (reference/triton-facts.md).
//!
//! The function takes one `!tt.ptr<f32>` per operand, then one per result. Block loads become
//! pointer tensors (`tt.splat` + `tt.addptr` of `tt.make_range` offsets) with bounds masks;
//! matmuls are `tt.dot` with `inputPrecision = ieee` (full f32 products, f32 accumulation);
//! loops are `scf.for` with `iter_args`; reductions are `tt.reduce` with a combiner region.
//! Only long-stable TTIR syntax is used (the plugin's Triton version varies by release).
//!
//! Checks made here because the plugin would accept them silently or fail obscurely: at most 3
//! grid axes (y and z ≤ 65535), power-of-two tile dims (`tt.make_range`), dot dims ≥ 16, arrays
//! addressable with i32 offsets, no scratch buffers (Triton has no such memory in TTIR).

use std::fmt::Write as _;

use super::arith::{self, FloatMinMax};
use super::ir::*;
use hlo_builder::{Attr, Builder, Op as HloOp};

/// The custom-call target XLA's GPU back end compiles as a Triton kernel.
pub const TARGET: &str = "__gpu$xla.gpu.triton";

const AXES: [&str; 3] = ["x", "y", "z"];

fn ty(t: &Type) -> String {
    match t {
        Type::Scalar(d) => elem(*d).to_string(),
        Type::Tile(d, s) => tensor(s, elem(*d)),
    }
}

fn elem(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::I32 => "i32",
        DType::Bool => "i1",
    }
}

fn tensor(shape: &[usize], elem: &str) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("tensor<{}x{elem}>", dims.join("x"))
}

fn float(v: f32) -> String {
    let s = Attr::F32(v).to_mlir();
    s.trim_end_matches(" : f32").to_string()
}

/// Checks the kernel against what the Triton back end supports.
pub fn check(k: &Kernel) -> LangResult<()> {
    let err = |m: String| Err(LangError::new(&k.name, "triton", m));
    if k.grid.len() > 3 {
        return err(format!(
            "a Triton grid has at most 3 axes, got {}",
            k.grid.len()
        ));
    }
    for (i, a) in k.grid.iter().enumerate() {
        let limit = if i == 0 { i32::MAX as usize } else { 65_535 };
        if a.size > limit {
            return err(format!(
                "grid axis {i} ({}) has {} programs, more than the CUDA limit {limit}",
                AXES[i], a.size
            ));
        }
    }
    if !k.scratch.is_empty() {
        return err(format!(
            "scratch buffers ({}) have no Triton lowering; carry values through loops instead",
            k.scratch
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for a in k.inputs.iter().chain(&k.outputs) {
        let n: usize = a.shape.iter().product();
        if n >= i32::MAX as usize {
            return err(format!(
                "`{}` {:?} has {n} elements; i32 offsets address < 2^31",
                a.name, a.shape
            ));
        }
    }
    for t in &k.types {
        if let Type::Tile(_, s) = t {
            if s.iter().any(|d| !d.is_power_of_two()) {
                return err(format!("tile {t}: Triton tiles need power-of-two dims"));
            }
        }
    }
    let mut bad = None;
    walk(&k.body, &mut |op| {
        if let Op::Dot { a, b, .. } = op {
            let (sa, sb) = (k.ty(*a).shape(), k.ty(*b).shape());
            if sa.iter().chain(sb).any(|&d| d < 16) && bad.is_none() {
                bad = Some(format!(
                    "dot {} · {}: tt.dot needs every dim ≥ 16",
                    k.ty(*a),
                    k.ty(*b)
                ));
            }
        }
    });
    if let Some(m) = bad {
        return err(m);
    }
    Ok(())
}

fn walk(b: &Block, f: &mut impl FnMut(&Op)) {
    for i in &b.insts {
        f(&i.op);
        if let Op::For { body, .. } = &i.op {
            walk(body, f);
        }
    }
}

/// The kernel as a TTIR module (text).
pub fn emit(k: &Kernel) -> LangResult<String> {
    check(k)?;
    let mut e = Emitter {
        k,
        out: String::new(),
        depth: 2,
        names: vec![None; k.types.len()],
        tmp: 0,
    };
    let nargs = k.inputs.len() + k.outputs.len();
    let args: Vec<String> = (0..nargs)
        .map(|i| format!("%arg{i}: !tt.ptr<f32> {{tt.divisibility = 16 : i32}}"))
        .collect();
    let mut text = String::from("module {\n");
    let _ = writeln!(
        text,
        "  tt.func public @{}({}) attributes {{noinline = false}} {{",
        k.name,
        args.join(", ")
    );
    for (i, _) in k.grid.iter().enumerate() {
        e.line(format!("%pid{i} = tt.get_program_id {} : i32", AXES[i]));
    }
    e.block(&k.body)?;
    e.line("tt.return".to_string());
    text.push_str(&e.out);
    text.push_str("  }\n}\n");
    Ok(text)
}

struct Emitter<'a> {
    k: &'a Kernel,
    out: String,
    depth: usize,
    names: Vec<Option<String>>,
    tmp: usize,
}

impl Emitter<'_> {
    fn line(&mut self, s: String) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
        self.out.push_str(&s);
        self.out.push('\n');
    }

    fn fresh(&mut self) -> String {
        self.tmp += 1;
        format!("%t{}", self.tmp)
    }

    fn name(&self, v: Value) -> String {
        self.names[v.index()]
            .clone()
            .unwrap_or_else(|| format!("%v{}", v.0))
    }

    fn tyv(&self, v: Value) -> String {
        ty(self.k.ty(v))
    }

    /// `name = rhs`, returning the name.
    fn def(&mut self, rhs: String) -> String {
        let n = self.fresh();
        self.line(format!("{n} = {rhs}"));
        n
    }

    fn int(&mut self, v: i64) -> String {
        self.def(format!("arith.constant {v} : i32"))
    }

    fn block(&mut self, b: &Block) -> LangResult<()> {
        for inst in &b.insts {
            self.inst(inst)?;
        }
        Ok(())
    }

    fn inst(&mut self, inst: &Inst) -> LangResult<()> {
        let k = self.k;
        let res = inst.results.first().copied();
        let out = res.map(|v| format!("%v{}", v.0)).unwrap_or_default();
        let rt = res.map(|v| self.tyv(v)).unwrap_or_default();
        let rhs = match &inst.op {
            Op::ProgramId(a) => {
                self.names[res.expect("result").index()] = Some(format!("%pid{a}"));
                return Ok(());
            }
            Op::Int(v) => format!("arith.constant {v} : i32"),
            Op::Full { value, .. } => format!("arith.constant dense<{}> : {rt}", float(*value)),
            Op::Iota { shape, dim } => {
                let n = shape[*dim];
                let r = self.def(format!(
                    "tt.make_range {{end = {n} : i32, start = 0 : i32}} : {}",
                    tensor(&[n], "i32")
                ));
                if shape.len() == 1 {
                    self.names[res.expect("result").index()] = Some(r);
                    return Ok(());
                }
                let axis = 1 - dim;
                let mut es = vec![n];
                es.insert(axis, 1);
                let e = self.def(format!(
                    "tt.expand_dims {r} {{axis = {axis} : i32}} : {} -> {}",
                    tensor(&[n], "i32"),
                    tensor(&es, "i32")
                ));
                format!("tt.broadcast {e} : {} -> {rt}", tensor(&es, "i32"))
            }
            Op::Splat { x, .. } => format!("tt.splat {} : {} -> {rt}", self.name(*x), self.tyv(*x)),
            Op::Binary { op, a, b } => {
                let float = k.ty(*a).dtype() == DType::F32;
                let name = arith::binary(*op, float, FloatMinMax::Num);
                format!("{name} {}, {} : {rt}", self.name(*a), self.name(*b))
            }
            Op::Unary { op, x } => {
                format!("{} {} : {rt}", arith::unary(*op), self.name(*x))
            }
            Op::Compare { op, a, b } => {
                let float = k.ty(*a).dtype() == DType::F32;
                let (opname, pred, _) = arith::compare(*op, float);
                format!(
                    "{opname} {pred}, {}, {} : {}",
                    self.name(*a),
                    self.name(*b),
                    self.tyv(*a)
                )
            }
            Op::Select { cond, a, b } => {
                let ct = self.tyv(*cond);
                if k.ty(*cond).is_scalar() {
                    format!(
                        "arith.select {}, {}, {} : {rt}",
                        self.name(*cond),
                        self.name(*a),
                        self.name(*b)
                    )
                } else {
                    format!(
                        "arith.select {}, {}, {} : {ct}, {rt}",
                        self.name(*cond),
                        self.name(*a),
                        self.name(*b)
                    )
                }
            }
            Op::ExpandDims { x, axis } => format!(
                "tt.expand_dims {} {{axis = {axis} : i32}} : {} -> {rt}",
                self.name(*x),
                self.tyv(*x)
            ),
            Op::Broadcast { x, .. } => {
                if k.ty(*x) == k.ty(res.expect("result")) {
                    self.names[res.expect("result").index()] = Some(self.name(*x));
                    return Ok(());
                }
                format!("tt.broadcast {} : {} -> {rt}", self.name(*x), self.tyv(*x))
            }
            Op::Transpose { x } => format!(
                "tt.trans {} {{order = array<i32: 1, 0>}} : {} -> {rt}",
                self.name(*x),
                self.tyv(*x)
            ),
            Op::Reduce { op, x, axis } => {
                let (a, b, r) = (self.fresh(), self.fresh(), self.fresh());
                let comb = match op {
                    ReduceOp::Sum => "arith.addf",
                    ReduceOp::Max => "arith.maxnumf",
                    ReduceOp::Min => "arith.minnumf",
                };
                self.line(format!(
                    "{out} = \"tt.reduce\"({}) <{{axis = {axis} : i32}}> ({{",
                    self.name(*x)
                ));
                self.line(format!("^bb0({a}: f32, {b}: f32):"));
                self.line(format!("  {r} = {comb} {a}, {b} : f32"));
                self.line(format!("  tt.reduce.return {r} : f32"));
                self.line(format!("}}) : ({}) -> {rt}", self.tyv(*x)));
                return Ok(());
            }
            Op::Dot {
                a,
                b,
                acc,
                precision,
            } => {
                let c = match acc {
                    Some(c) => self.name(*c),
                    None => self.def(format!("arith.constant dense<0.000000e+00> : {rt}")),
                };
                let p = match precision {
                    Precision::Ieee => "ieee",
                    Precision::Tf32 => "tf32",
                    Precision::Tf32x3 => "tf32x3",
                };
                format!(
                    "tt.dot {}, {}, {c}, inputPrecision = {p} : {} * {} -> {rt}",
                    self.name(*a),
                    self.name(*b),
                    self.tyv(*a),
                    self.tyv(*b)
                )
            }
            Op::Load { src, index } => {
                let (ptrs, mask, shape) = self.access(*src, index)?;
                let other = self.def(format!(
                    "arith.constant dense<0.000000e+00> : {}",
                    tensor(&shape, "f32")
                ));
                format!(
                    "tt.load {ptrs}, {mask}, {other} : {}",
                    tensor(&shape, "!tt.ptr<f32>")
                )
            }
            Op::Store { dst, index, value } => {
                let (ptrs, mask, shape) = self.access(*dst, index)?;
                self.line(format!(
                    "tt.store {ptrs}, {}, {mask} : {}",
                    self.name(*value),
                    tensor(&shape, "!tt.ptr<f32>")
                ));
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
                self.tmp += 1;
                let lname = format!("%l{}", self.tmp);
                let types: Vec<String> = init.iter().map(|&v| self.tyv(v)).collect();
                let head = format!(
                    "scf.for %v{} = {} to {} step {}",
                    iv.0,
                    self.name(*lo),
                    self.name(*hi),
                    self.name(*step)
                );
                if init.is_empty() {
                    self.line(format!("{head} : i32 {{"));
                } else {
                    let iters: Vec<String> = args
                        .iter()
                        .zip(init)
                        .map(|(a, i)| format!("%v{} = {}", a.0, self.name(*i)))
                        .collect();
                    let lhs = if init.len() == 1 {
                        lname.clone()
                    } else {
                        format!("{lname}:{}", init.len())
                    };
                    self.line(format!(
                        "{lhs} = {head} iter_args({}) -> ({}) : i32 {{",
                        iters.join(", "),
                        types.join(", ")
                    ));
                }
                self.depth += 1;
                self.block(body)?;
                if !body.yields.is_empty() {
                    let ys: Vec<String> = body.yields.iter().map(|&v| self.name(v)).collect();
                    self.line(format!(
                        "scf.yield {} : {}",
                        ys.join(", "),
                        types.join(", ")
                    ));
                }
                self.depth -= 1;
                self.line("}".to_string());
                for (i, r) in inst.results.iter().enumerate() {
                    self.names[r.index()] = Some(if inst.results.len() == 1 {
                        lname.clone()
                    } else {
                        format!("{lname}#{i}")
                    });
                }
                return Ok(());
            }
        };
        self.line(format!("{out} = {rhs}"));
        Ok(())
    }

    /// Pointer tensor, mask and tile shape of a block access.
    fn access(&mut self, r: Ref, index: &[Index]) -> LangResult<(String, String, Vec<usize>)> {
        let k = self.k;
        let a = k.array(r);
        let arg = match r {
            Ref::Input(i) => i,
            Ref::Output(i) => k.inputs.len() + i,
            Ref::Scratch(_) => {
                return Err(LangError::new(
                    &k.name,
                    "triton",
                    "scratch buffers have no Triton lowering",
                ))
            }
        };
        let rank = a.shape.len();
        let mut strides = vec![1usize; rank];
        for d in (0..rank.saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * a.shape[d + 1];
        }
        let mut scalar_off: Option<String> = None;
        // Per sliced dim: (offsets [len] i32, mask [len] i1, len).
        let mut dims: Vec<(String, String, usize)> = Vec::new();
        for (d, ix) in index.iter().enumerate() {
            let origin = self.origin(&a.block, d);
            let (Index::At(v) | Index::Slice(v, _)) = ix;
            let local = self.name(*v);
            let global = match &origin {
                Some(o) => self.def(format!("arith.addi {o}, {local} : i32")),
                None => local.clone(),
            };
            match ix {
                Index::At(_) => {
                    let s = self.int(strides[d] as i64);
                    let term = self.def(format!("arith.muli {global}, {s} : i32"));
                    scalar_off = Some(match scalar_off {
                        Some(acc) => self.def(format!("arith.addi {acc}, {term} : i32")),
                        None => term,
                    });
                }
                Index::Slice(_, len) => {
                    let t1 = tensor(&[*len], "i32");
                    let b1 = tensor(&[*len], "i1");
                    let range = self.def(format!(
                        "tt.make_range {{end = {len} : i32, start = 0 : i32}} : {t1}"
                    ));
                    let gs = self.def(format!("tt.splat {global} : i32 -> {t1}"));
                    let idx = self.def(format!("arith.addi {gs}, {range} : {t1}"));
                    let st = self.def(format!("arith.constant dense<{}> : {t1}", strides[d]));
                    let offs = self.def(format!("arith.muli {idx}, {st} : {t1}"));
                    let zero = self.def(format!("arith.constant dense<0> : {t1}"));
                    let dim = self.def(format!("arith.constant dense<{}> : {t1}", a.shape[d]));
                    let ge = self.def(format!("arith.cmpi sge, {idx}, {zero} : {t1}"));
                    let lt = self.def(format!("arith.cmpi slt, {idx}, {dim} : {t1}"));
                    let mut mask = self.def(format!("arith.andi {ge}, {lt} : {b1}"));
                    if a.block.shape[d] != a.shape[d] {
                        let ls = self.def(format!("tt.splat {local} : i32 -> {t1}"));
                        let lidx = self.def(format!("arith.addi {ls}, {range} : {t1}"));
                        let bd =
                            self.def(format!("arith.constant dense<{}> : {t1}", a.block.shape[d]));
                        let ge = self.def(format!("arith.cmpi sge, {lidx}, {zero} : {t1}"));
                        let lt = self.def(format!("arith.cmpi slt, {lidx}, {bd} : {t1}"));
                        let inb = self.def(format!("arith.andi {ge}, {lt} : {b1}"));
                        mask = self.def(format!("arith.andi {mask}, {inb} : {b1}"));
                    }
                    dims.push((offs, mask, *len));
                }
            }
        }
        let shape: Vec<usize> = dims.iter().map(|d| d.2).collect();
        let ti = tensor(&shape, "i32");
        let tb = tensor(&shape, "i1");
        let (offs, mask) = if dims.len() == 1 {
            (dims[0].0.clone(), dims[0].1.clone())
        } else {
            let mut full = Vec::new();
            for (i, (o, m, len)) in dims.iter().enumerate() {
                let axis = 1 - i;
                let mut es = vec![*len];
                es.insert(axis, 1);
                let mut pair = Vec::new();
                for (x, e) in [(o, "i32"), (m, "i1")] {
                    let ex = self.def(format!(
                        "tt.expand_dims {x} {{axis = {axis} : i32}} : {} -> {}",
                        tensor(&[*len], e),
                        tensor(&es, e)
                    ));
                    pair.push(self.def(format!(
                        "tt.broadcast {ex} : {} -> {}",
                        tensor(&es, e),
                        tensor(&shape, e)
                    )));
                }
                full.push(pair);
            }
            let o = self.def(format!("arith.addi {}, {} : {ti}", full[0][0], full[1][0]));
            let m = self.def(format!("arith.andi {}, {} : {tb}", full[0][1], full[1][1]));
            (o, m)
        };
        let offs = match scalar_off {
            Some(s) => {
                let sp = self.def(format!("tt.splat {s} : i32 -> {ti}"));
                self.def(format!("arith.addi {offs}, {sp} : {ti}"))
            }
            None => offs,
        };
        let tp = tensor(&shape, "!tt.ptr<f32>");
        let base = self.def(format!("tt.splat %arg{arg} : !tt.ptr<f32> -> {tp}"));
        let ptrs = self.def(format!("tt.addptr {base}, {offs} : {tp}, {ti}"));
        Ok((ptrs, mask, shape))
    }

    /// The block origin along dim `d` (`index_map[d] · block[d]`), or None when it is 0.
    fn origin(&mut self, b: &BlockSpec, d: usize) -> Option<String> {
        let m = &b.index_map[d];
        if m.terms.iter().all(|&(_, c)| c == 0) && m.constant == 0 {
            return None;
        }
        let bs = b.shape[d] as i64;
        let mut acc = self.int(m.constant * bs);
        for &(axis, c) in &m.terms {
            let cv = self.int(c * bs);
            let t = self.def(format!("arith.muli %pid{axis}, {cv} : i32"));
            acc = self.def(format!("arith.addi {acc}, {t} : i32"));
        }
        Some(acc)
    }
}

/// The `backend_config` attributes of the custom call running `k` with TTIR `ir`.
pub fn backend_config(k: &Kernel, ir: &str) -> Vec<(&'static str, Attr)> {
    let g = |i: usize| k.grid.get(i).map_or(1, |a| a.size) as i32;
    vec![
        ("name", Attr::Str(k.name.clone())),
        ("ir", Attr::Str(ir.to_string())),
        ("grid_x", Attr::I32(g(0))),
        ("grid_y", Attr::I32(g(1))),
        ("grid_z", Attr::I32(g(2))),
        ("num_warps", Attr::I32(k.num_warps as i32)),
        ("num_stages", Attr::I32(k.num_stages as i32)),
        ("debug", Attr::Bool(false)),
    ]
}

/// Adds `k` to the graph as a `__gpu$xla.gpu.triton` custom call on `operands` (f32, the
/// kernel's operand shapes). Returns the result array, or a tuple when the kernel has several.
pub fn custom_call(b: &Builder, k: &Kernel, operands: &[HloOp]) -> hlo_builder::Result<HloOp> {
    let result = super::call_result_shape(b, "triton_call", k, operands)?;
    let ir = emit(k).map_err(|e| b.error("triton_call", e.to_string()))?;
    // Row-major layouts constrained: the kernel indexes its buffers row-major, and XLA's layout
    // assignment may otherwise pick others (inside the model it gave `o` and `d_o` the layout
    // {1,0,3,2}: wrong results on an H200, while a bench with parameter operands was right).
    b.custom_call(TARGET, operands, result, &backend_config(k, &ir))
}

/// Checks the Triton calls of an optimized GPU HLO text (the CUDA plugin's optimized program,
/// or XLA's `*.after_optimizations.txt` dump): every operand and result layout of every line
/// calling [`TARGET`] must be row-major (`{n-1,...,1,0}`), since the kernels index their buffers
/// row-major and the plugin runs them on other layouts without complaint. Returns the number of
/// Triton calls, or an error naming the first call line with another layout.
pub fn check_row_major_calls(optimized_hlo: &str) -> Result<usize, String> {
    let calls: Vec<&str> = optimized_hlo
        .lines()
        .filter(|l| l.contains(TARGET))
        .collect();
    for line in &calls {
        for part in line.split("]{").skip(1) {
            let text = part.split('}').next().unwrap_or_default();
            let layout: Vec<usize> = text
                .split(',')
                .filter(|x| !x.is_empty())
                .map(|x| x.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    format!("unreadable layout {{{text}}} ({e}) in Triton call: {line}")
                })?;
            if !layout.iter().rev().copied().eq(0..layout.len()) {
                return Err(format!(
                    "non-row-major Triton buffer (layout {layout:?}): {line}"
                ));
            }
        }
    }
    Ok(calls.len())
}
