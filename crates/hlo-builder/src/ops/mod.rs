//! Op families. As `jax/_src/lax/lax.py` keeps a primitive's rules together, each family's file
//! holds everything about its ops:
//!
//! * the pure shape rules (`(operand shapes, attributes) -> Result<Shape, ShapeError>`,
//!   re-exported in [`crate::shape_rules`]);
//! * the [`crate::Builder`] methods, which check operands with the rule and append the
//!   instruction;
//! * the emission: the family's attribute type (a variant of the crate-private `Kind`), its XLA
//!   opcode spelling and how its attributes are written into an `HloInstructionProto`;
//! * the VJP rule that [`crate::autodiff`] calls for the family's ops.
//!
//! | file | ops |
//! |---|---|
//! | [`constant`] | `parameter`, `constant`, `iota` (leaves), `full`/`zeros`/`ones` |
//! | [`elementwise`] | unary math, binary arithmetic/logic, `compare`, `select`, `clamp`, `convert`, `bitcast-convert` |
//! | [`shape_ops`] | `reshape`, `transpose`, `broadcast`, `reverse`, slices, `concatenate`, `pad` |
//! | [`reduce`] | `reduce` and `reduce_sum`/`max`/`min` |
//! | [`dot`] | `dot` (`dot_general`) |
//! | [`gather`], [`scatter`] | `gather`, `take_rows`; `scatter` (add / replace) |
//! | [`control`] | `while`, `conditional`, `call`, `tuple`, `get-tuple-element` |
//! | [`custom_call`] | typed-FFI `custom-call` |
//! | [`partition`] | the partitioner's `Sharding` / `SPMDFullToShardShape` / `SPMDShardToFullShape` custom calls (manual regions) |
//! | [`collective`] | `collective-permute`, `all-gather`, `reduce-scatter` (inside manual regions) |
//! | [`rng`] | Threefry random numbers (composite: no instruction of its own) |

pub mod collective;
pub mod constant;
pub mod control;
pub mod custom_call;
pub mod dot;
pub mod elementwise;
pub mod gather;
pub mod partition;
pub mod reduce;
pub mod rng;
pub mod scatter;
pub mod shape_ops;

use crate::autodiff::{Ct, Node};
use crate::builder::Builder;
use crate::error::Result;
use crate::{proto, Op};

/// The rules an op family provides for its instructions; implemented by the family's attribute
/// type, so builder and autodiff reach them through [`Kind::family`] instead of per-op matches.
pub(crate) trait Family: std::fmt::Debug {
    /// XLA's opcode spelling (also the base of the instruction's name).
    fn opcode(&self) -> &'static str;

    /// Write the op's attributes into its instruction proto. The builder has already written
    /// the fields every op has (name, opcode, shape, operands, called computations, metadata,
    /// sharding).
    fn emit(&self, _p: &mut proto::HloInstructionProto) {}

    /// Reverse-mode rule: given the cotangent of the result, one entry per operand (`None`: zero
    /// or not needed, see `n.need`). By default an array cotangent goes to
    /// [`Family::array_vjp`] and a tuple-shaped one is an error.
    fn vjp(&self, b: &Builder, n: &Node, ct: Ct) -> Result<Vec<Option<Ct>>> {
        match ct {
            Ct::Array(ct) => Ok(array_cts(self.array_vjp(b, n, ct)?)),
            Ct::Tuple(_) => Err(n.not_differentiable(b, &n.describe())),
        }
    }

    /// [`Family::vjp`] for an array-valued op; by default the op is not differentiable.
    fn array_vjp(&self, b: &Builder, n: &Node, _ct: Op) -> Result<Vec<Option<Op>>> {
        Err(n.not_differentiable(b, &n.describe()))
    }
}

/// Array cotangents as [`Ct`]s.
pub(crate) fn array_cts(grads: Vec<Option<Op>>) -> Vec<Option<Ct>> {
    grads.into_iter().map(|g| g.map(Ct::Array)).collect()
}

/// The opcode of an instruction together with its attributes: one variant per family.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// `parameter`, `constant`, `iota`.
    Leaf(constant::Leaf),
    /// Unary elementwise math.
    Unary(elementwise::UnaryOp),
    /// Binary elementwise arithmetic and logic.
    Binary(elementwise::BinaryOp),
    /// `compare`, `select`, `clamp`, `convert`, `bitcast-convert`.
    Elementwise(elementwise::Elementwise),
    /// Data movement without indices.
    Shape(shape_ops::ShapeOp),
    /// `reduce`.
    Reduce(reduce::Reduce),
    /// `dot`.
    Dot(dot::Dot),
    /// `gather`.
    Gather(gather::Gather),
    /// `scatter`.
    Scatter(scatter::Scatter),
    /// Control flow and tuples.
    Control(control::Control),
    /// `custom-call`.
    CustomCall(custom_call::CustomCall),
    /// The partitioner's custom calls.
    Partition(partition::Partition),
    /// Cross-device collectives.
    Collective(collective::Collective),
}

impl Kind {
    /// The family rules of this instruction.
    pub(crate) fn family(&self) -> &dyn Family {
        match self {
            Kind::Leaf(k) => k,
            Kind::Unary(k) => k,
            Kind::Binary(k) => k,
            Kind::Elementwise(k) => k,
            Kind::Shape(k) => k,
            Kind::Reduce(k) => k,
            Kind::Dot(k) => k,
            Kind::Gather(k) => k,
            Kind::Scatter(k) => k,
            Kind::Control(k) => k,
            Kind::CustomCall(k) => k,
            Kind::Partition(k) => k,
            Kind::Collective(k) => k,
        }
    }

    /// XLA's opcode spelling.
    pub(crate) fn opcode(&self) -> &'static str {
        self.family().opcode()
    }

    /// Whether this is a `parameter`.
    pub(crate) fn is_parameter(&self) -> bool {
        matches!(self, Kind::Leaf(constant::Leaf::Parameter(_)))
    }
}
