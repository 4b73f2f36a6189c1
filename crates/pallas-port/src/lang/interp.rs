//! CPU interpreter: runs a [`Kernel`] on host f32 slices, one program after another in grid
//! order (row-major over the axes), so a kernel's numerics are testable without an accelerator.
//!
//! It checks what the back ends cannot: every index of an `At` access lies inside its block and
//! array, every element of every result is written at least once, and loop steps are positive.
//! Matmuls accumulate in f32, like the GPU/TPU kernels.

use super::ir::*;

#[derive(Debug, Clone)]
enum Val {
    Int(i64),
    Bool(bool),
    F(Vec<usize>, Vec<f32>),
    I(Vec<usize>, Vec<i64>),
    B(Vec<usize>, Vec<bool>),
}

struct Machine<'a> {
    k: &'a Kernel,
    inputs: &'a [&'a [f32]],
    outputs: Vec<Vec<f32>>,
    written: Vec<Vec<bool>>,
    scratch: Vec<Vec<f32>>,
    env: Vec<Option<Val>>,
    pids: Vec<usize>,
}

/// Runs `kernel` over its whole grid on `inputs` (one slice per operand, row-major) and returns
/// the results (one vector per result). Errors name the kernel, the op and the offending values.
pub fn run(kernel: &Kernel, inputs: &[&[f32]]) -> LangResult<Vec<Vec<f32>>> {
    let err = |op: &str, m: String| LangError::new(&kernel.name, op, m);
    if inputs.len() != kernel.inputs.len() {
        return Err(err(
            "run",
            format!(
                "{} inputs given, the kernel takes {}",
                inputs.len(),
                kernel.inputs.len()
            ),
        ));
    }
    for (a, x) in kernel.inputs.iter().zip(inputs) {
        let n: usize = a.shape.iter().product();
        if x.len() != n {
            return Err(err(
                "run",
                format!(
                    "input `{}` {:?} needs {n} elements, got {}",
                    a.name,
                    a.shape,
                    x.len()
                ),
            ));
        }
    }
    let size = |a: &ArrayDecl| a.shape.iter().product::<usize>();
    let mut m = Machine {
        k: kernel,
        inputs,
        outputs: kernel.outputs.iter().map(|a| vec![0.0; size(a)]).collect(),
        written: kernel
            .outputs
            .iter()
            .map(|a| vec![false; size(a)])
            .collect(),
        scratch: kernel.scratch.iter().map(|a| vec![0.0; size(a)]).collect(),
        env: vec![None; kernel.types.len()],
        pids: vec![0; kernel.grid.len()],
    };
    let total: usize = kernel.grid.iter().map(|a| a.size).product();
    for flat in 0..total {
        let mut rem = flat;
        for (ax, g) in kernel.grid.iter().enumerate().rev() {
            m.pids[ax] = rem % g.size;
            rem /= g.size;
        }
        m.block(&kernel.body)?;
    }
    for ((a, w), _) in kernel.outputs.iter().zip(&m.written).zip(&m.outputs) {
        if let Some(i) = w.iter().position(|&x| !x) {
            return Err(err(
                "run",
                format!(
                    "result `{}` {:?}: element {:?} (flat {i}) is never written",
                    a.name,
                    a.shape,
                    unflatten(i, &a.shape)
                ),
            ));
        }
    }
    Ok(m.outputs)
}

fn unflatten(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        out[d] = i % shape[d];
        i /= shape[d];
    }
    out
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

impl Machine<'_> {
    fn err(&self, op: &str, m: impl Into<String>) -> LangError {
        LangError::new(&self.k.name, op, m)
    }

    fn get(&self, v: Value) -> &Val {
        self.env[v.index()]
            .as_ref()
            .expect("value defined before use")
    }

    fn int(&self, v: Value) -> i64 {
        match self.get(v) {
            Val::Int(x) => *x,
            other => panic!("scalar i32 expected, got {other:?}"),
        }
    }

    fn f(&self, v: Value) -> (&[usize], &[f32]) {
        match self.get(v) {
            Val::F(s, d) => (s, d),
            other => panic!("f32 tile expected, got {other:?}"),
        }
    }

    fn set(&mut self, v: Value, x: Val) {
        self.env[v.index()] = Some(x);
    }

    fn block(&mut self, b: &Block) -> LangResult<()> {
        for inst in &b.insts {
            self.inst(inst)?;
        }
        Ok(())
    }

    fn inst(&mut self, inst: &Inst) -> LangResult<()> {
        let out = inst.results.first().copied();
        let val = match &inst.op {
            Op::ProgramId(a) => Val::Int(self.pids[*a] as i64),
            Op::Int(x) => Val::Int(*x),
            Op::Full { value, shape } => {
                Val::F(shape.clone(), vec![*value; shape.iter().product()])
            }
            Op::Iota { shape, dim } => {
                let n: usize = shape.iter().product();
                let st = strides(shape);
                Val::I(
                    shape.clone(),
                    (0..n)
                        .map(|i| ((i / st[*dim]) % shape[*dim]) as i64)
                        .collect(),
                )
            }
            Op::Splat { x, shape } => {
                let n = shape.iter().product();
                match self.get(*x) {
                    Val::Int(v) => Val::I(shape.clone(), vec![*v; n]),
                    Val::Bool(v) => Val::B(shape.clone(), vec![*v; n]),
                    other => panic!("splat of {other:?}"),
                }
            }
            Op::Binary { op, a, b } => binary(*op, self.get(*a), self.get(*b)),
            Op::Unary { op, x } => {
                let (s, d) = self.f(*x);
                let f: fn(f32) -> f32 = match op {
                    UnOp::Exp => f32::exp,
                    UnOp::Neg => |v| -v,
                };
                Val::F(s.to_vec(), d.iter().map(|&v| f(v)).collect())
            }
            Op::Compare { op, a, b } => compare(*op, self.get(*a), self.get(*b)),
            Op::Select { cond, a, b } => match (self.get(*cond), self.get(*a), self.get(*b)) {
                (Val::B(s, c), Val::F(_, x), Val::F(_, y)) => Val::F(
                    s.clone(),
                    c.iter()
                        .zip(x.iter().zip(y))
                        .map(|(&c, (&x, &y))| if c { x } else { y })
                        .collect(),
                ),
                (Val::B(s, c), Val::I(_, x), Val::I(_, y)) => Val::I(
                    s.clone(),
                    c.iter()
                        .zip(x.iter().zip(y))
                        .map(|(&c, (&x, &y))| if c { x } else { y })
                        .collect(),
                ),
                (Val::Bool(c), Val::Int(x), Val::Int(y)) => Val::Int(if *c { *x } else { *y }),
                other => panic!("select of {other:?}"),
            },
            Op::ExpandDims { x, axis } => {
                let t = self.get(*x).clone();
                map_shape(t, |s| {
                    let mut s = s.to_vec();
                    s.insert(*axis, 1);
                    s
                })
            }
            Op::Broadcast { x, shape } => broadcast(self.get(*x), shape),
            Op::Transpose { x } => {
                let (s, d) = self.f(*x);
                let (r, c) = (s[0], s[1]);
                let mut out = vec![0.0; r * c];
                for i in 0..r {
                    for j in 0..c {
                        out[j * r + i] = d[i * c + j];
                    }
                }
                Val::F(vec![c, r], out)
            }
            Op::Reduce { op, x, axis } => {
                let (s, d) = self.f(*x);
                let (r, c) = (s[0], s[1]);
                let n = if *axis == 0 { c } else { r };
                let init = match op {
                    ReduceOp::Sum => 0.0,
                    ReduceOp::Max => f32::NEG_INFINITY,
                    ReduceOp::Min => f32::INFINITY,
                };
                let mut out = vec![init; n];
                for i in 0..r {
                    for j in 0..c {
                        let o = &mut out[if *axis == 0 { j } else { i }];
                        let v = d[i * c + j];
                        *o = match op {
                            ReduceOp::Sum => *o + v,
                            ReduceOp::Max => o.max(v),
                            ReduceOp::Min => o.min(v),
                        };
                    }
                }
                Val::F(vec![n], out)
            }
            Op::Dot { a, b, acc, .. } => {
                let (sa, da) = self.f(*a);
                let (sb, db) = self.f(*b);
                let (m, kk, n) = (sa[0], sa[1], sb[1]);
                let mut out = match acc {
                    Some(c) => self.f(*c).1.to_vec(),
                    None => vec![0.0; m * n],
                };
                for i in 0..m {
                    for p in 0..kk {
                        let x = da[i * kk + p];
                        let row = &db[p * n..(p + 1) * n];
                        for (o, &y) in out[i * n..(i + 1) * n].iter_mut().zip(row) {
                            *o += x * y;
                        }
                    }
                }
                Val::F(vec![m, n], out)
            }
            Op::Load { src, index } => self.load(*src, index)?,
            Op::Store { dst, index, value } => {
                self.store(*dst, index, *value)?;
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
                let (lo, hi, step) = (self.int(*lo), self.int(*hi), self.int(*step));
                if step <= 0 {
                    return Err(self.err("for", format!("step must be > 0, got {step}")));
                }
                let mut carried: Vec<Val> = init.iter().map(|&v| self.get(v).clone()).collect();
                let mut i = lo;
                while i < hi {
                    self.set(*iv, Val::Int(i));
                    for (a, c) in args.iter().zip(carried) {
                        self.set(*a, c);
                    }
                    self.block(body)?;
                    carried = body.yields.iter().map(|&v| self.get(v).clone()).collect();
                    i += step;
                }
                for (r, c) in inst.results.iter().zip(carried) {
                    self.set(*r, c);
                }
                return Ok(());
            }
        };
        if let Some(o) = out {
            self.set(o, val);
        }
        Ok(())
    }

    /// Resolves an access to `(tile shape, per-element flat array offset or None when masked)`.
    fn access(
        &self,
        r: Ref,
        index: &[Index],
        op: &str,
    ) -> LangResult<(Vec<usize>, Vec<Option<usize>>)> {
        let a = self.k.array(r);
        let st = strides(&a.shape);
        let mut base: i64 = 0;
        let mut slices = Vec::new(); // (global start, len, block start, block dim, array dim, stride)
        for (d, ix) in index.iter().enumerate() {
            let origin = a.block.index_map[d].eval(&self.pids) * a.block.shape[d] as i64;
            match ix {
                Index::At(v) => {
                    let local = self.int(*v);
                    let g = origin + local;
                    if local < 0
                        || local >= a.block.shape[d] as i64
                        || g < 0
                        || g >= a.shape[d] as i64
                    {
                        return Err(self.err(
                            op,
                            format!(
                                "`{}` {:?}: index {local} along dim {d} is outside the block {:?} at {origin} \
                                 (program {:?})",
                                a.name, a.shape, a.block.shape, self.pids
                            ),
                        ));
                    }
                    base += g * st[d] as i64;
                }
                Index::Slice(v, len) => {
                    let local = self.int(*v);
                    slices.push((
                        origin,
                        local,
                        *len,
                        a.block.shape[d] as i64,
                        a.shape[d] as i64,
                        st[d] as i64,
                    ));
                }
            }
        }
        let shape: Vec<usize> = slices.iter().map(|s| s.2).collect();
        let n: usize = shape.iter().product();
        let mut offs = Vec::with_capacity(n);
        for flat in 0..n {
            let idx = unflatten(flat, &shape);
            let mut off = base;
            let mut ok = true;
            for (&(origin, local, _, bdim, adim, stride), &i) in slices.iter().zip(&idx) {
                let l = local + i as i64;
                let g = origin + l;
                ok &= l >= 0 && l < bdim && g >= 0 && g < adim;
                off += g * stride;
            }
            offs.push(ok.then_some(off as usize));
        }
        Ok((shape, offs))
    }

    fn load(&self, src: Ref, index: &[Index]) -> LangResult<Val> {
        let (shape, offs) = self.access(src, index, "load")?;
        let data: &[f32] = match src {
            Ref::Input(i) => self.inputs[i],
            Ref::Scratch(i) => &self.scratch[i],
            Ref::Output(_) => return Err(self.err("load", "results are write-only")),
        };
        Ok(Val::F(
            shape,
            offs.iter().map(|o| o.map_or(0.0, |o| data[o])).collect(),
        ))
    }

    fn store(&mut self, dst: Ref, index: &[Index], value: Value) -> LangResult<()> {
        let (_, offs) = self.access(dst, index, "store")?;
        let vals = self.f(value).1.to_vec();
        for (o, v) in offs.iter().zip(vals) {
            if let Some(o) = *o {
                match dst {
                    Ref::Output(i) => {
                        self.outputs[i][o] = v;
                        self.written[i][o] = true;
                    }
                    Ref::Scratch(i) => self.scratch[i][o] = v,
                    Ref::Input(_) => return Err(self.err("store", "operands are read-only")),
                }
            }
        }
        Ok(())
    }
}

fn map_shape(v: Val, f: impl Fn(&[usize]) -> Vec<usize>) -> Val {
    match v {
        Val::F(s, d) => Val::F(f(&s), d),
        Val::I(s, d) => Val::I(f(&s), d),
        Val::B(s, d) => Val::B(f(&s), d),
        other => other,
    }
}

fn bcast<T: Copy>(s: &[usize], d: &[T], shape: &[usize]) -> Vec<T> {
    let n: usize = shape.iter().product();
    let st = strides(s);
    (0..n)
        .map(|flat| {
            let idx = unflatten(flat, shape);
            let off: usize = idx
                .iter()
                .enumerate()
                .map(|(k, &i)| if s[k] == 1 { 0 } else { i * st[k] })
                .sum();
            d[off]
        })
        .collect()
}

fn broadcast(v: &Val, shape: &[usize]) -> Val {
    match v {
        Val::F(s, d) => Val::F(shape.to_vec(), bcast(s, d, shape)),
        Val::I(s, d) => Val::I(shape.to_vec(), bcast(s, d, shape)),
        Val::B(s, d) => Val::B(shape.to_vec(), bcast(s, d, shape)),
        other => panic!("broadcast of {other:?}"),
    }
}

fn int_op(op: BinOp, a: i64, b: i64) -> i64 {
    match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div => {
            if b == 0 {
                0
            } else {
                a / b
            }
        }
        BinOp::Max => a.max(b),
        BinOp::Min => a.min(b),
        BinOp::And => panic!("and on integers"),
    }
}

fn binary(op: BinOp, a: &Val, b: &Val) -> Val {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Val::Int(int_op(op, *x, *y)),
        (Val::Bool(x), Val::Bool(y)) => Val::Bool(*x && *y),
        (Val::I(s, x), Val::I(_, y)) => Val::I(
            s.clone(),
            x.iter().zip(y).map(|(&x, &y)| int_op(op, x, y)).collect(),
        ),
        (Val::B(s, x), Val::B(_, y)) => {
            Val::B(s.clone(), x.iter().zip(y).map(|(&x, &y)| x && y).collect())
        }
        (Val::F(s, x), Val::F(_, y)) => {
            let f: fn(f32, f32) -> f32 = match op {
                BinOp::Add => |a, b| a + b,
                BinOp::Sub => |a, b| a - b,
                BinOp::Mul => |a, b| a * b,
                BinOp::Div => |a, b| a / b,
                BinOp::Max => f32::max,
                BinOp::Min => f32::min,
                BinOp::And => panic!("and on floats"),
            };
            Val::F(s.clone(), x.iter().zip(y).map(|(&x, &y)| f(x, y)).collect())
        }
        other => panic!("binary op on {other:?}"),
    }
}

fn cmp<T: PartialOrd>(op: CmpOp, a: T, b: T) -> bool {
    match op {
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
    }
}

fn compare(op: CmpOp, a: &Val, b: &Val) -> Val {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Val::Bool(cmp(op, *x, *y)),
        (Val::I(s, x), Val::I(_, y)) => Val::B(
            s.clone(),
            x.iter().zip(y).map(|(&x, &y)| cmp(op, x, y)).collect(),
        ),
        (Val::F(s, x), Val::F(_, y)) => Val::B(
            s.clone(),
            x.iter().zip(y).map(|(&x, &y)| cmp(op, x, y)).collect(),
        ),
        other => panic!("compare of {other:?}"),
    }
}
