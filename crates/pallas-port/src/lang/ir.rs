//! The kernel IR: typed values, ops and nested blocks (shape rules in [`super::rules`], the builder in [`super::builder`]).
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
