//! The kernel IR: typed values, ops with their shape rules, nested blocks, and the builder.
//!
//! A [`Kernel`] is a grid of programs; each program runs the same [`Block`] of instructions with
//! its own program ids. Memory is reached only through *blocks* of the operands ([`BlockSpec`]:
//! a block shape and an index map from program ids to block indices) and *tiles* loaded from them
//! with element offsets relative to the block ([`Index`]); out-of-range elements read as 0 and are
//! not written. Nothing here is a pointer, so a Triton back end (pointers) and a Mosaic back end
//! (refs and VMEM blocks) both read the same program.

use std::fmt;

/// Element types of values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float (tiles only).
    F32,
    /// 32-bit signed integer (scalars and tiles).
    I32,
    /// Predicate (results of comparisons).
    Bool,
}

impl DType {
    /// The short name: `f32`, `i32`, `bool`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::Bool => "bool",
        }
    }
}

/// The type of a value: a scalar or a tile (rank 1 or 2) of one element type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Type {
    /// A scalar (index arithmetic, loop bounds).
    Scalar(DType),
    /// A tile held by one program (registers on GPU, vregs on TPU).
    Tile(DType, Vec<usize>),
}

impl Type {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Type::Scalar(d) | Type::Tile(d, _) => *d,
        }
    }

    /// The tile shape (empty for scalars).
    pub fn shape(&self) -> &[usize] {
        match self {
            Type::Scalar(_) => &[],
            Type::Tile(_, s) => s,
        }
    }

    /// True for scalars.
    pub fn is_scalar(&self) -> bool {
        matches!(self, Type::Scalar(_))
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Scalar(d) => f.write_str(d.as_str()),
            Type::Tile(d, s) => write!(
                f,
                "{}[{}]",
                d.as_str(),
                s.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
            ),
        }
    }
}

/// An error of the kernel language: the op and what is wrong with its shapes or arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel {kernel}: {op}: {message}")]
pub struct LangError {
    /// The kernel being built, run or emitted.
    pub kernel: String,
    /// The op or stage (`dot`, `load`, `triton`, ...).
    pub op: String,
    /// What is wrong, with the shapes involved.
    pub message: String,
}

impl LangError {
    /// A new error.
    pub fn new(kernel: &str, op: &str, message: impl Into<String>) -> Self {
        LangError {
            kernel: kernel.to_string(),
            op: op.to_string(),
            message: message.into(),
        }
    }
}

/// Result of the kernel language.
pub type LangResult<T> = Result<T, LangError>;

/// A value of the kernel program (cheap handle; its type lives in [`Kernel::types`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(pub(crate) u32);

impl Value {
    /// The value's index in [`Kernel::types`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// How the programs along one grid axis relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Semantics {
    /// Programs are independent and may run in any order or at once.
    Parallel,
    /// Programs run in order, one after another (state may flow through scratch buffers).
    Arbitrary,
}

/// One grid axis: its size and semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GridAxis {
    /// Number of programs along the axis (≥ 1).
    pub size: usize,
    /// Parallel or arbitrary (sequential).
    pub semantics: Semantics,
}

impl GridAxis {
    /// A parallel axis of `size` programs.
    pub fn parallel(size: usize) -> Self {
        GridAxis {
            size,
            semantics: Semantics::Parallel,
        }
    }

    /// An arbitrary (sequential) axis of `size` programs.
    pub fn arbitrary(size: usize) -> Self {
        GridAxis {
            size,
            semantics: Semantics::Arbitrary,
        }
    }
}

/// A block index as an affine function of the program ids: `Σ coef·program_id(axis) + constant`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Affine {
    /// `(grid axis, coefficient)` terms.
    pub terms: Vec<(usize, i64)>,
    /// The constant term.
    pub constant: i64,
}

impl Affine {
    /// The constant `c`.
    pub fn constant(c: i64) -> Self {
        Affine {
            terms: Vec::new(),
            constant: c,
        }
    }

    /// `program_id(axis)`.
    pub fn program(axis: usize) -> Self {
        Affine {
            terms: vec![(axis, 1)],
            constant: 0,
        }
    }

    /// The value at the program ids `pids`.
    pub fn eval(&self, pids: &[usize]) -> i64 {
        self.constant
            + self
                .terms
                .iter()
                .map(|&(a, c)| c * pids.get(a).copied().unwrap_or(0) as i64)
                .sum::<i64>()
    }
}

/// The part of an operand one program sees: a block of `shape` whose block index along each
/// dim is `index_map[d]` (so its first element is `index_map[d] · shape[d]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockSpec {
    /// The block shape (same rank as the array, each ≤ the array dim).
    pub shape: Vec<usize>,
    /// One block index per dim, affine in the program ids.
    pub index_map: Vec<Affine>,
}

impl BlockSpec {
    /// The whole array as one block (index map all zero).
    pub fn whole(shape: &[usize]) -> Self {
        BlockSpec {
            shape: shape.to_vec(),
            index_map: vec![Affine::constant(0); shape.len()],
        }
    }
}

/// An f32 operand, result or scratch buffer of a kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArrayDecl {
    /// Name (for errors and the emitted signature).
    pub name: String,
    /// The array shape (row-major).
    pub shape: Vec<usize>,
    /// The block each program sees.
    pub block: BlockSpec,
}

/// Which array a load or store reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ref {
    /// Kernel operand `i` (read-only).
    Input(usize),
    /// Kernel result `i` (write-only).
    Output(usize),
    /// Scratch buffer `i` (read-write, lives across the programs of one launch).
    Scratch(usize),
}

/// One dim of a load or store, relative to the program's block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Index {
    /// A single element at this (scalar) offset; the dim does not appear in the tile.
    At(Value),
    /// `len` elements from this (scalar) offset; the dim appears in the tile. Elements outside
    /// the block or the array read as 0 and are not written.
    Slice(Value, usize),
}

/// Binary elementwise ops (both operands of one type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinOp {
    /// a + b.
    Add,
    /// a − b.
    Sub,
    /// a · b.
    Mul,
    /// a / b (integers: truncating, operands expected ≥ 0).
    Div,
    /// max(a, b).
    Max,
    /// min(a, b).
    Min,
    /// Logical and (predicates only).
    And,
}

/// Unary elementwise ops on f32 tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnOp {
    /// eˣ.
    Exp,
    /// −x.
    Neg,
}

/// Comparisons of i32 (scalars or tiles) or f32 tiles, giving predicates (ordered for floats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    /// a < b.
    Lt,
    /// a ≤ b.
    Le,
    /// a > b.
    Gt,
    /// a ≥ b.
    Ge,
    /// a = b.
    Eq,
    /// a ≠ b.
    Ne,
}

/// Reductions along one axis of an f32 tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Σ.
    Sum,
    /// max.
    Max,
    /// min.
    Min,
}

/// Input precision of a matmul (accumulation is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// Full f32 products (no TF32 tensor-core rounding): what the RLA kernels use.
    #[default]
    Ieee,
    /// TF32 products (10-bit mantissa inputs) on tensor cores; faster, ~1e-3 relative error.
    Tf32,
    /// Three TF32 products per f32 product (hi/lo splitting) on tensor cores: close to f32
    /// accuracy at tensor-core speed and code size.
    Tf32x3,
}

/// The operation of an instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// The program id along grid axis `.0` (scalar i32).
    ProgramId(usize),
    /// An i32 scalar constant.
    Int(i64),
    /// An f32 tile filled with one value.
    Full {
        /// The fill value.
        value: f32,
        /// The tile shape.
        shape: Vec<usize>,
    },
    /// An i32 tile whose element is its index along `dim`.
    Iota {
        /// The tile shape.
        shape: Vec<usize>,
        /// The dim whose index is the value.
        dim: usize,
    },
    /// A scalar repeated into a tile of `shape`.
    Splat {
        /// The scalar.
        x: Value,
        /// The tile shape.
        shape: Vec<usize>,
    },
    /// Elementwise binary op.
    Binary {
        /// The op.
        op: BinOp,
        /// Left operand.
        a: Value,
        /// Right operand (same type).
        b: Value,
    },
    /// Elementwise unary op.
    Unary {
        /// The op.
        op: UnOp,
        /// The operand.
        x: Value,
    },
    /// Comparison (i32 or f32).
    Compare {
        /// The predicate.
        op: CmpOp,
        /// Left operand.
        a: Value,
        /// Right operand (same type).
        b: Value,
    },
    /// `cond ? a : b` elementwise.
    Select {
        /// Predicate (same shape as a and b).
        cond: Value,
        /// Taken where true.
        a: Value,
        /// Taken where false.
        b: Value,
    },
    /// Inserts a dim of size 1 at `axis` (rank 1 → 2).
    ExpandDims {
        /// The tile.
        x: Value,
        /// Where the new dim goes (0 or 1).
        axis: usize,
    },
    /// Repeats size-1 dims up to `shape` (same rank).
    Broadcast {
        /// The tile.
        x: Value,
        /// The result shape.
        shape: Vec<usize>,
    },
    /// 2-D transpose.
    Transpose {
        /// The tile.
        x: Value,
    },
    /// Reduction of a 2-D tile along `axis` (result rank 1).
    Reduce {
        /// The op.
        op: ReduceOp,
        /// The tile.
        x: Value,
        /// The reduced axis.
        axis: usize,
    },
    /// `a [m,k] · b [k,n] (+ acc [m,n])` with f32 accumulation.
    Dot {
        /// Left operand.
        a: Value,
        /// Right operand.
        b: Value,
        /// Optional accumulator.
        acc: Option<Value>,
        /// Input precision.
        precision: Precision,
    },
    /// A tile read from a block.
    Load {
        /// The array.
        src: Ref,
        /// One entry per array dim.
        index: Vec<Index>,
    },
    /// A tile written to a block (no result).
    Store {
        /// The array.
        dst: Ref,
        /// One entry per array dim.
        index: Vec<Index>,
        /// The tile.
        value: Value,
    },
    /// `for iv in (lo..hi).step_by(step)` carrying `args` (initially `init`); the instruction's
    /// results are the carried values after the last iteration.
    For {
        /// Start (scalar i32).
        lo: Value,
        /// End, exclusive (scalar i32).
        hi: Value,
        /// Step (scalar i32, > 0).
        step: Value,
        /// Initial carried values.
        init: Vec<Value>,
        /// The induction variable inside `body`.
        iv: Value,
        /// The carried values inside `body`.
        args: Vec<Value>,
        /// The body; its yields are the next carried values.
        body: Block,
    },
}

/// One instruction: an op and the values it defines.
#[derive(Debug, Clone, PartialEq)]
pub struct Inst {
    /// The defined values (none for a store, one per carried value for a loop).
    pub results: Vec<Value>,
    /// The op.
    pub op: Op,
}

/// A straight-line list of instructions and the values it yields (loop bodies).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Block {
    /// The instructions, in order.
    pub insts: Vec<Inst>,
    /// Yielded values (a loop body's next carried values; empty for the kernel body).
    pub yields: Vec<Value>,
}

/// A kernel program: grid, operands, results, scratch, body and launch hints.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    /// Kernel name (the emitted function name).
    pub name: String,
    /// The grid (at most 3 axes for Triton).
    pub grid: Vec<GridAxis>,
    /// Operands, in call order.
    pub inputs: Vec<ArrayDecl>,
    /// Results, in call order.
    pub outputs: Vec<ArrayDecl>,
    /// Scratch buffers (VMEM on TPU; the Triton back end has none).
    pub scratch: Vec<ArrayDecl>,
    /// The type of every value, indexed by [`Value::index`].
    pub types: Vec<Type>,
    /// The program body.
    pub body: Block,
    /// GPU warps per program (Triton).
    pub num_warps: u32,
    /// Software-pipelining stages (Triton).
    pub num_stages: u32,
}

impl Kernel {
    /// The type of `v`.
    pub fn ty(&self, v: Value) -> &Type {
        &self.types[v.index()]
    }

    /// The declaration behind a ref.
    pub fn array(&self, r: Ref) -> &ArrayDecl {
        match r {
            Ref::Input(i) => &self.inputs[i],
            Ref::Output(i) => &self.outputs[i],
            Ref::Scratch(i) => &self.scratch[i],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shape rules: pure functions of operand types (and attributes) giving the result type.

fn tile_of<'a>(op: &str, what: &str, t: &'a Type) -> Result<(DType, &'a [usize]), String> {
    match t {
        Type::Tile(d, s) => Ok((*d, s)),
        Type::Scalar(_) => Err(format!("{op}: {what} must be a tile, got {t}")),
    }
}

fn shape_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    )
}

/// Result type of a binary op.
pub fn binary_rule(op: BinOp, a: &Type, b: &Type) -> Result<Type, String> {
    if a != b {
        return Err(format!("operands must have one type, got {a} and {b}"));
    }
    let ok = match op {
        BinOp::And => a.dtype() == DType::Bool,
        BinOp::Div | BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Max | BinOp::Min => {
            a.dtype() != DType::Bool
        }
    };
    if !ok {
        return Err(format!("{op:?} is not defined on {a}"));
    }
    Ok(a.clone())
}

/// Result type of a unary op.
pub fn unary_rule(x: &Type) -> Result<Type, String> {
    match x {
        Type::Tile(DType::F32, _) => Ok(x.clone()),
        _ => Err(format!("operand must be an f32 tile, got {x}")),
    }
}

/// Result type of a comparison.
pub fn compare_rule(a: &Type, b: &Type) -> Result<Type, String> {
    if a != b || a.dtype() == DType::Bool {
        return Err(format!(
            "operands must be one i32 or f32 type, got {a} and {b}"
        ));
    }
    Ok(match a {
        Type::Scalar(_) => Type::Scalar(DType::Bool),
        Type::Tile(_, s) => Type::Tile(DType::Bool, s.clone()),
    })
}

/// Result type of a select.
pub fn select_rule(c: &Type, a: &Type, b: &Type) -> Result<Type, String> {
    if a != b || c.dtype() != DType::Bool || c.shape() != a.shape() {
        return Err(format!(
            "need a predicate and two values of one shape, got cond {c}, {a}, {b}"
        ));
    }
    Ok(a.clone())
}

/// Result type of a dot.
pub fn dot_rule(a: &Type, b: &Type, acc: Option<&Type>) -> Result<Type, String> {
    let (da, sa) = tile_of("dot", "lhs", a)?;
    let (db, sb) = tile_of("dot", "rhs", b)?;
    if da != DType::F32 || db != DType::F32 || sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
        return Err(format!(
            "need f32 [m,k] · [k,n], got {a} · {b} (contracting dims {} and {})",
            sa.get(1).map_or("-".into(), |x| x.to_string()),
            sb.first().map_or("-".into(), |x| x.to_string())
        ));
    }
    let out = Type::Tile(DType::F32, vec![sa[0], sb[1]]);
    if let Some(c) = acc {
        if *c != out {
            return Err(format!("accumulator must be {out} for {a} · {b}, got {c}"));
        }
    }
    Ok(out)
}

/// Result type of a reduction.
pub fn reduce_rule(x: &Type, axis: usize) -> Result<Type, String> {
    let (d, s) = tile_of("reduce", "operand", x)?;
    if d != DType::F32 || s.len() != 2 || axis > 1 {
        return Err(format!(
            "need a 2-D f32 tile and axis 0 or 1, got {x} axis {axis}"
        ));
    }
    Ok(Type::Tile(d, vec![s[1 - axis]]))
}

/// Result type of expand_dims.
pub fn expand_rule(x: &Type, axis: usize) -> Result<Type, String> {
    let (d, s) = tile_of("expand_dims", "operand", x)?;
    if s.len() != 1 || axis > 1 {
        return Err(format!(
            "need a 1-D tile and axis 0 or 1, got {x} axis {axis}"
        ));
    }
    let mut out = s.to_vec();
    out.insert(axis, 1);
    Ok(Type::Tile(d, out))
}

/// Result type of broadcast.
pub fn broadcast_rule(x: &Type, shape: &[usize]) -> Result<Type, String> {
    let (d, s) = tile_of("broadcast", "operand", x)?;
    if s.len() != shape.len() || s.iter().zip(shape).any(|(&a, &b)| a != b && a != 1) {
        return Err(format!(
            "cannot broadcast {x} to {}: dims must match or be 1",
            shape_str(shape)
        ));
    }
    Ok(Type::Tile(d, shape.to_vec()))
}

/// Result type of transpose.
pub fn transpose_rule(x: &Type) -> Result<Type, String> {
    let (d, s) = tile_of("transpose", "operand", x)?;
    if s.len() != 2 {
        return Err(format!("need a 2-D tile, got {x}"));
    }
    Ok(Type::Tile(d, vec![s[1], s[0]]))
}

/// Tile shape of a load or store of `array` (block `block`) through `index`.
pub fn access_rule(
    array: &ArrayDecl,
    index: &[Index],
    types: &[Type],
) -> Result<Vec<usize>, String> {
    if index.len() != array.shape.len() {
        return Err(format!(
            "`{}` {} has rank {}, got {} indices",
            array.name,
            shape_str(&array.shape),
            array.shape.len(),
            index.len()
        ));
    }
    let mut shape = Vec::new();
    for (d, ix) in index.iter().enumerate() {
        let v = match ix {
            Index::At(v) => v,
            Index::Slice(v, len) => {
                if *len == 0 || *len > array.block.shape[d] {
                    return Err(format!(
                        "`{}`: slice of {len} along dim {d} must be 1..={} (the block {})",
                        array.name,
                        array.block.shape[d],
                        shape_str(&array.block.shape)
                    ));
                }
                shape.push(*len);
                v
            }
        };
        let t = &types[v.index()];
        if *t != Type::Scalar(DType::I32) {
            return Err(format!(
                "`{}`: index along dim {d} must be a scalar i32, got {t}",
                array.name
            ));
        }
    }
    if shape.is_empty() || shape.len() > 2 {
        return Err(format!(
            "`{}`: a tile has 1 or 2 sliced dims, got {} ({index:?})",
            array.name,
            shape.len()
        ));
    }
    Ok(shape)
}

// ---------------------------------------------------------------------------------------------
// The builder.

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
