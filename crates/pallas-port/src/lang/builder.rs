//! The builder of kernel programs: declare arrays, then add ops; each op checks its shape rule
//! ([`super::rules`]).

use super::ir::*;
use super::rules::*;

/// Builds a [`Kernel`]: declare arrays, then add ops; each op checks its shape rule.
///
/// ```
/// use pallas_port::lang::{GridAxis, Index, KernelBuilder};
/// let mut k = KernelBuilder::new("double", &[GridAxis::parallel(4)]);
/// let x = k.input("x", &[4, 32]);
/// let y = k.output("y", &[4, 32]);
/// let i = k.program_id(0)?;
/// let zero = k.int(0);
/// let t = k.load(x, &[Index::At(i), Index::Slice(zero, 32)])?;
/// let t2 = k.add(t, t)?;
/// k.store(y, &[Index::At(i), Index::Slice(zero, 32)], t2)?;
/// let kernel = k.finish()?;
/// assert_eq!(kernel.grid.len(), 1);
/// # Ok::<(), pallas_port::lang::LangError>(())
/// ```
pub struct KernelBuilder {
    kernel: Kernel,
    /// Open blocks: the kernel body, then each loop body being built.
    stack: Vec<Vec<Inst>>,
    /// The scope each value was defined in.
    scope_of: Vec<u32>,
    /// Scope ids of the open blocks.
    scopes: Vec<u32>,
    next_scope: u32,
    precision: Precision,
}

impl KernelBuilder {
    /// A kernel called `name` over `grid`.
    pub fn new(name: &str, grid: &[GridAxis]) -> Self {
        KernelBuilder {
            kernel: Kernel {
                name: name.to_string(),
                grid: grid.to_vec(),
                inputs: Vec::new(),
                outputs: Vec::new(),
                scratch: Vec::new(),
                types: Vec::new(),
                body: Block::default(),
                num_warps: 4,
                num_stages: 1,
            },
            stack: vec![Vec::new()],
            scope_of: Vec::new(),
            scopes: vec![0],
            next_scope: 1,
            precision: Precision::Ieee,
        }
    }

    fn err(&self, op: &str, message: impl Into<String>) -> LangError {
        LangError::new(&self.kernel.name, op, message)
    }

    /// Sets the Triton launch hints (warps per program, pipeline stages).
    pub fn launch(&mut self, num_warps: u32, num_stages: u32) {
        self.kernel.num_warps = num_warps;
        self.kernel.num_stages = num_stages;
    }

    /// Declares the next f32 operand (whole array visible to every program).
    pub fn input(&mut self, name: &str, shape: &[usize]) -> Ref {
        self.kernel.inputs.push(decl(name, shape, None));
        Ref::Input(self.kernel.inputs.len() - 1)
    }

    /// Declares the next f32 result (whole array visible to every program).
    pub fn output(&mut self, name: &str, shape: &[usize]) -> Ref {
        self.kernel.outputs.push(decl(name, shape, None));
        Ref::Output(self.kernel.outputs.len() - 1)
    }

    /// Declares an operand whose programs each see one block (checked: rank, block ≤ array,
    /// index map axes inside the grid).
    pub fn input_block(
        &mut self,
        name: &str,
        shape: &[usize],
        block: BlockSpec,
    ) -> LangResult<Ref> {
        self.check_block(name, shape, &block)?;
        self.kernel.inputs.push(decl(name, shape, Some(block)));
        Ok(Ref::Input(self.kernel.inputs.len() - 1))
    }

    /// Declares a result whose programs each write one block.
    pub fn output_block(
        &mut self,
        name: &str,
        shape: &[usize],
        block: BlockSpec,
    ) -> LangResult<Ref> {
        self.check_block(name, shape, &block)?;
        self.kernel.outputs.push(decl(name, shape, Some(block)));
        Ok(Ref::Output(self.kernel.outputs.len() - 1))
    }

    /// Declares an f32 scratch buffer (zero at launch, kept across programs).
    pub fn scratch(&mut self, name: &str, shape: &[usize]) -> Ref {
        self.kernel.scratch.push(decl(name, shape, None));
        Ref::Scratch(self.kernel.scratch.len() - 1)
    }

    fn check_block(&self, name: &str, shape: &[usize], b: &BlockSpec) -> LangResult<()> {
        let bad = b.shape.len() != shape.len()
            || b.index_map.len() != shape.len()
            || b.shape.iter().zip(shape).any(|(&x, &a)| x == 0 || x > a)
            || b.index_map
                .iter()
                .flat_map(|m| &m.terms)
                .any(|&(axis, _)| axis >= self.kernel.grid.len());
        if bad {
            return Err(self.err(
                "block_spec",
                format!(
                    "`{name}` {}: block {} with index map {:?} must have the array's rank, \
                     dims 1..=array dims, and grid axes < {}",
                    shape_str(shape),
                    shape_str(&b.shape),
                    b.index_map,
                    self.kernel.grid.len()
                ),
            ));
        }
        Ok(())
    }

    fn ty(&self, op: &str, v: Value) -> LangResult<Type> {
        let i = v.index();
        if i >= self.kernel.types.len() {
            return Err(self.err(op, format!("unknown value {v:?}")));
        }
        if !self.scopes.contains(&self.scope_of[i]) {
            return Err(self.err(
                op,
                format!(
                    "value {v:?} ({}) is used outside the loop body that defined it",
                    self.kernel.types[i]
                ),
            ));
        }
        Ok(self.kernel.types[i].clone())
    }

    /// The type of a value built so far (an error for a value out of scope).
    pub fn type_of(&self, v: Value) -> LangResult<Type> {
        self.ty("type_of", v)
    }

    fn new_value(&mut self, t: Type) -> Value {
        self.kernel.types.push(t);
        self.scope_of.push(*self.scopes.last().unwrap_or(&0));
        Value(self.kernel.types.len() as u32 - 1)
    }

    fn push(&mut self, op: Op, t: Type) -> Value {
        let v = self.new_value(t);
        self.stack.last_mut().expect("open block").push(Inst {
            results: vec![v],
            op,
        });
        v
    }

    fn rule<T>(&self, op: &str, r: Result<T, String>) -> LangResult<T> {
        r.map_err(|m| self.err(op, m))
    }

    /// The program id along grid axis `axis`.
    pub fn program_id(&mut self, axis: usize) -> LangResult<Value> {
        if axis >= self.kernel.grid.len() {
            return Err(self.err(
                "program_id",
                format!(
                    "axis {axis} outside the grid of {} axes",
                    self.kernel.grid.len()
                ),
            ));
        }
        Ok(self.push(Op::ProgramId(axis), Type::Scalar(DType::I32)))
    }

    /// An i32 scalar constant.
    pub fn int(&mut self, v: i64) -> Value {
        self.push(Op::Int(v), Type::Scalar(DType::I32))
    }

    /// An f32 tile filled with `value`.
    pub fn full(&mut self, value: f32, shape: &[usize]) -> LangResult<Value> {
        check_tile_shape(shape).map_err(|m| self.err("full", m))?;
        Ok(self.push(
            Op::Full {
                value,
                shape: shape.to_vec(),
            },
            Type::Tile(DType::F32, shape.to_vec()),
        ))
    }

    /// An f32 tile of zeros.
    pub fn zeros(&mut self, shape: &[usize]) -> LangResult<Value> {
        self.full(0.0, shape)
    }

    /// An i32 tile holding each element's index along `dim`.
    pub fn iota(&mut self, shape: &[usize], dim: usize) -> LangResult<Value> {
        check_tile_shape(shape).map_err(|m| self.err("iota", m))?;
        if dim >= shape.len() {
            return Err(self.err("iota", format!("dim {dim} outside {}", shape_str(shape))));
        }
        Ok(self.push(
            Op::Iota {
                shape: shape.to_vec(),
                dim,
            },
            Type::Tile(DType::I32, shape.to_vec()),
        ))
    }

    /// A scalar repeated into a tile.
    pub fn splat(&mut self, x: Value, shape: &[usize]) -> LangResult<Value> {
        let t = self.ty("splat", x)?;
        check_tile_shape(shape).map_err(|m| self.err("splat", m))?;
        let Type::Scalar(d) = t else {
            return Err(self.err("splat", format!("operand must be a scalar, got {t}")));
        };
        Ok(self.push(
            Op::Splat {
                x,
                shape: shape.to_vec(),
            },
            Type::Tile(d, shape.to_vec()),
        ))
    }

    /// Elementwise binary op.
    pub fn binary(&mut self, op: BinOp, a: Value, b: Value) -> LangResult<Value> {
        let name = format!("{op:?}").to_lowercase();
        let (ta, tb) = (self.ty(&name, a)?, self.ty(&name, b)?);
        let t = self.rule(&name, binary_rule(op, &ta, &tb))?;
        Ok(self.push(Op::Binary { op, a, b }, t))
    }

    /// a + b.
    pub fn add(&mut self, a: Value, b: Value) -> LangResult<Value> {
        self.binary(BinOp::Add, a, b)
    }

    /// a − b.
    pub fn sub(&mut self, a: Value, b: Value) -> LangResult<Value> {
        self.binary(BinOp::Sub, a, b)
    }

    /// a · b.
    pub fn mul(&mut self, a: Value, b: Value) -> LangResult<Value> {
        self.binary(BinOp::Mul, a, b)
    }

    /// a / b.
    pub fn div(&mut self, a: Value, b: Value) -> LangResult<Value> {
        self.binary(BinOp::Div, a, b)
    }

    /// max(a, b).
    pub fn max(&mut self, a: Value, b: Value) -> LangResult<Value> {
        self.binary(BinOp::Max, a, b)
    }

    /// Elementwise unary op.
    pub fn unary(&mut self, op: UnOp, x: Value) -> LangResult<Value> {
        let name = format!("{op:?}").to_lowercase();
        let tx = self.ty(&name, x)?;
        let t = self.rule(&name, unary_rule(&tx))?;
        Ok(self.push(Op::Unary { op, x }, t))
    }

    /// eˣ.
    pub fn exp(&mut self, x: Value) -> LangResult<Value> {
        self.unary(UnOp::Exp, x)
    }

    /// −x.
    pub fn neg(&mut self, x: Value) -> LangResult<Value> {
        self.unary(UnOp::Neg, x)
    }

    /// Comparison (i32 or f32).
    pub fn cmp(&mut self, op: CmpOp, a: Value, b: Value) -> LangResult<Value> {
        let (ta, tb) = (self.ty("compare", a)?, self.ty("compare", b)?);
        let t = self.rule("compare", compare_rule(&ta, &tb))?;
        Ok(self.push(Op::Compare { op, a, b }, t))
    }

    /// `cond ? a : b`.
    pub fn select(&mut self, cond: Value, a: Value, b: Value) -> LangResult<Value> {
        let (tc, ta, tb) = (
            self.ty("select", cond)?,
            self.ty("select", a)?,
            self.ty("select", b)?,
        );
        let t = self.rule("select", select_rule(&tc, &ta, &tb))?;
        Ok(self.push(Op::Select { cond, a, b }, t))
    }

    /// Inserts a size-1 dim at `axis`.
    pub fn expand_dims(&mut self, x: Value, axis: usize) -> LangResult<Value> {
        let tx = self.ty("expand_dims", x)?;
        let t = self.rule("expand_dims", expand_rule(&tx, axis))?;
        Ok(self.push(Op::ExpandDims { x, axis }, t))
    }

    /// Repeats size-1 dims up to `shape`.
    pub fn broadcast(&mut self, x: Value, shape: &[usize]) -> LangResult<Value> {
        let tx = self.ty("broadcast", x)?;
        let t = self.rule("broadcast", broadcast_rule(&tx, shape))?;
        Ok(self.push(
            Op::Broadcast {
                x,
                shape: shape.to_vec(),
            },
            t,
        ))
    }

    /// 2-D transpose.
    pub fn transpose(&mut self, x: Value) -> LangResult<Value> {
        let tx = self.ty("transpose", x)?;
        let t = self.rule("transpose", transpose_rule(&tx))?;
        Ok(self.push(Op::Transpose { x }, t))
    }

    /// Reduction along `axis` of a 2-D f32 tile.
    pub fn reduce(&mut self, op: ReduceOp, x: Value, axis: usize) -> LangResult<Value> {
        let tx = self.ty("reduce", x)?;
        let t = self.rule("reduce", reduce_rule(&tx, axis))?;
        Ok(self.push(Op::Reduce { op, x, axis }, t))
    }

    /// `a · b (+ acc)` with f32 accumulation at the builder's precision
    /// ([`KernelBuilder::set_precision`], [`Precision::Ieee`] unless set).
    pub fn dot(&mut self, a: Value, b: Value, acc: Option<Value>) -> LangResult<Value> {
        self.dot_with(a, b, acc, self.precision)
    }

    /// Sets the precision [`KernelBuilder::dot`] uses.
    pub fn set_precision(&mut self, p: Precision) {
        self.precision = p;
    }

    /// `a · b (+ acc)` with f32 accumulation at the given input precision.
    pub fn dot_with(
        &mut self,
        a: Value,
        b: Value,
        acc: Option<Value>,
        precision: Precision,
    ) -> LangResult<Value> {
        let (ta, tb) = (self.ty("dot", a)?, self.ty("dot", b)?);
        let tc = acc.map(|c| self.ty("dot", c)).transpose()?;
        let t = self.rule("dot", dot_rule(&ta, &tb, tc.as_ref()))?;
        Ok(self.push(
            Op::Dot {
                a,
                b,
                acc,
                precision,
            },
            t,
        ))
    }

    fn check_ref(&self, op: &str, r: Ref, write: bool) -> LangResult<()> {
        let ok = match r {
            Ref::Input(i) => !write && i < self.kernel.inputs.len(),
            Ref::Output(i) => write && i < self.kernel.outputs.len(),
            Ref::Scratch(i) => i < self.kernel.scratch.len(),
        };
        if !ok {
            return Err(self.err(
                op,
                format!("{r:?} cannot be {}", if write { "written" } else { "read" }),
            ));
        }
        Ok(())
    }

    /// A tile read from `src`'s block; elements outside the block or the array read as 0.
    pub fn load(&mut self, src: Ref, index: &[Index]) -> LangResult<Value> {
        self.check_ref("load", src, false)?;
        for ix in index {
            let (Index::At(v) | Index::Slice(v, _)) = ix;
            self.ty("load", *v)?;
        }
        let arr = self.kernel.array(src).clone();
        let shape = self.rule("load", access_rule(&arr, index, &self.kernel.types))?;
        Ok(self.push(
            Op::Load {
                src,
                index: index.to_vec(),
            },
            Type::Tile(DType::F32, shape),
        ))
    }

    /// Writes `value` to `dst`'s block; elements outside the block or the array are dropped.
    pub fn store(&mut self, dst: Ref, index: &[Index], value: Value) -> LangResult<()> {
        self.check_ref("store", dst, true)?;
        for ix in index {
            let (Index::At(v) | Index::Slice(v, _)) = ix;
            self.ty("store", *v)?;
        }
        let arr = self.kernel.array(dst).clone();
        let shape = self.rule("store", access_rule(&arr, index, &self.kernel.types))?;
        let tv = self.ty("store", value)?;
        if tv != Type::Tile(DType::F32, shape.clone()) {
            return Err(self.err(
                "store",
                format!(
                    "`{}`: value {tv} does not match the indexed tile f32{}",
                    arr.name,
                    shape_str(&shape)
                ),
            ));
        }
        self.stack.last_mut().expect("open block").push(Inst {
            results: Vec::new(),
            op: Op::Store {
                dst,
                index: index.to_vec(),
                value,
            },
        });
        Ok(())
    }

    /// A counted loop `for iv in lo..hi step step` carrying `init`; `body(builder, iv, args)`
    /// returns the next carried values (same types). Returns the values after the last step.
    pub fn for_loop(
        &mut self,
        lo: Value,
        hi: Value,
        step: Value,
        init: &[Value],
        body: impl FnOnce(&mut Self, Value, &[Value]) -> LangResult<Vec<Value>>,
    ) -> LangResult<Vec<Value>> {
        for v in [lo, hi, step] {
            let t = self.ty("for", v)?;
            if t != Type::Scalar(DType::I32) {
                return Err(self.err(
                    "for",
                    format!("bounds and step must be i32 scalars, got {t}"),
                ));
            }
        }
        let init_types: Vec<Type> = init
            .iter()
            .map(|&v| self.ty("for", v))
            .collect::<LangResult<_>>()?;
        let scope = self.next_scope;
        self.next_scope += 1;
        self.scopes.push(scope);
        self.stack.push(Vec::new());
        let iv = self.new_value(Type::Scalar(DType::I32));
        let args: Vec<Value> = init_types
            .iter()
            .map(|t| self.new_value(t.clone()))
            .collect();
        let result = body(self, iv, &args);
        let insts = self.stack.pop().expect("loop block");
        let yields = match result {
            Ok(y) => y,
            Err(e) => {
                self.scopes.pop();
                return Err(e);
            }
        };
        let yield_types: LangResult<Vec<Type>> =
            yields.iter().map(|&v| self.ty("for", v)).collect();
        self.scopes.pop();
        let yield_types = yield_types?;
        if yield_types != init_types {
            return Err(self.err(
                "for",
                format!(
                    "the body yields ({}) but carries ({})",
                    yield_types
                        .iter()
                        .map(Type::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    init_types
                        .iter()
                        .map(Type::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let results: Vec<Value> = init_types.into_iter().map(|t| self.new_value(t)).collect();
        self.stack.last_mut().expect("open block").push(Inst {
            results: results.clone(),
            op: Op::For {
                lo,
                hi,
                step,
                init: init.to_vec(),
                iv,
                args,
                body: Block { insts, yields },
            },
        });
        Ok(results)
    }

    /// The finished kernel (checks the grid is non-empty and every axis ≥ 1).
    pub fn finish(mut self) -> LangResult<Kernel> {
        if self.kernel.grid.is_empty() || self.kernel.grid.iter().any(|a| a.size == 0) {
            return Err(self.err(
                "finish",
                format!(
                    "the grid must have ≥ 1 axis of size ≥ 1, got {:?}",
                    self.kernel.grid
                ),
            ));
        }
        if self.stack.len() != 1 {
            return Err(self.err("finish", "a loop body is still open"));
        }
        self.kernel.body.insts = self.stack.pop().unwrap_or_default();
        Ok(self.kernel)
    }
}

fn decl(name: &str, shape: &[usize], block: Option<BlockSpec>) -> ArrayDecl {
    ArrayDecl {
        name: name.to_string(),
        shape: shape.to_vec(),
        block: block.unwrap_or_else(|| BlockSpec::whole(shape)),
    }
}

fn check_tile_shape(shape: &[usize]) -> Result<(), String> {
    if shape.is_empty() || shape.len() > 2 || shape.contains(&0) {
        return Err(format!(
            "a tile has rank 1 or 2 and non-zero dims, got {}",
            shape_str(shape)
        ));
    }
    Ok(())
}
