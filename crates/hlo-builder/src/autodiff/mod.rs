//! Reverse-mode automatic differentiation traced into the same builder (JAX style).
//!
//! [`Builder::vjp`] walks the instructions made so far in reverse creation order, starting from
//! the outputs, and emits the backward pass as new instructions of the same builder. Only
//! instructions on a path from one of `wrt` to one of the outputs are visited; values of integer
//! or `pred` element type (indices, masks, compare results) never carry a cotangent.
//!
//! Cotangents of tuple-shaped values are kept per element: `get-tuple-element` adds into its
//! element, `tuple` hands each element's cotangent to its operand.
//!
//! This module is only the backward walk: which instructions lie on a path (the plan), the
//! cotangent accumulation, and user rules of [`Builder::custom_vjp`] (in `custom.rs`). The VJP
//! rule of each op sits in its family's file under [`crate::ops`], beside the op's shape rule
//! and emission; the walk reaches it through one trait call. `while`, `conditional`, `call` and
//! custom calls need a [`Builder::custom_vjp`].
//!
//! Choices where the derivative is not unique:
//! * `max`/`min` (binary): on ties each operand gets half of the cotangent.
//! * `reduce` with a max/min reducer: the cotangent is split evenly among all positions equal to
//!   the result; the init value gets none.
//! * `abs` at 0, `sign`, `floor`, `ceil`, `round`: zero.
//! * `clamp(lo, x, hi)`: `x` gets the cotangent where `lo <= x <= hi`, `lo` where `x < lo`, `hi`
//!   where `x > hi`.
//! * `dot_general` whose cotangent type differs from an operand's type (a preferred element
//!   type): the backward dots run in the wider of the two types and are converted to the
//!   operand's type.
//!
//! ```
//! use hlo_builder::{Builder, ElementType, Shape};
//! let b = Builder::new("f");
//! let x = b.parameter(Shape::array(ElementType::F32, &[3]), "x").unwrap();
//! let y = b.reduce_sum(b.mul(x, x).unwrap(), &[0]).unwrap(); // sum(x^2)
//! let g = b.grad(y, &[x]).unwrap(); // 2x
//! let comp = b.build(b.tuple(&[y, g[0]]).unwrap()).unwrap();
//! assert!(comp.to_text().contains("multiply"));
//! ```

mod custom;
mod remat;
mod scan;

use std::collections::HashMap;
use std::panic::Location;
use std::sync::Arc;

use crate::builder::Builder;
use crate::error::{Error, Result};
use crate::ops::Kind;
use crate::shape::Shape;
use crate::Op;

pub(crate) use custom::CustomVjp;
pub use custom::VjpRule;
pub(crate) use remat::DotTape;
pub use remat::{BlockFn, SavePolicy};
pub use scan::ScanFn;

/// A cotangent: an array op, or per-element cotangents of a tuple value (`None` = zero).
#[derive(Debug, Clone)]
pub(crate) enum Ct {
    Array(Op),
    Tuple(Vec<Option<Ct>>),
}

/// What a rule needs to know about the instruction it differentiates.
#[derive(Debug)]
pub(crate) struct Node {
    /// The instruction itself.
    pub(crate) op: Op,
    pub(crate) kind: Kind,
    pub(crate) operands: Vec<Op>,
    pub(crate) operand_shapes: Vec<Shape>,
    pub(crate) shape: Shape,
    /// Ids of called computations.
    pub(crate) called: Vec<i64>,
    /// Which operands need a cotangent (on a path from `wrt`, differentiable dtype).
    pub(crate) need: Vec<bool>,
    /// `name.id` of the instruction, for error messages.
    pub(crate) full_name: String,
    /// Where the instruction was built, for error messages.
    pub(crate) built_at: String,
    /// Name scope of the instruction.
    pub(crate) scope: Arc<str>,
    /// The caller of [`Builder::vjp`], where errors of the walk are reported.
    pub(crate) vjp_caller: &'static Location<'static>,
}

impl Node {
    /// Element type of the (array) result.
    pub(crate) fn ty(&self) -> crate::ElementType {
        self.shape.ty().unwrap_or(crate::ElementType::F32)
    }

    /// ``opcode `name.id` (built at file:line in scope)``, to name the instruction in errors.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} `{}` (built at {})",
            self.kind.opcode(),
            self.full_name,
            self.built_at
        )
    }

    /// The error for an instruction on the path that has no VJP rule; `what` names it (usually
    /// [`Node::describe`]).
    pub(crate) fn not_differentiable(&self, b: &Builder, what: &str) -> Error {
        b.error_at(
            self.vjp_caller,
            "vjp",
            format!("{what} is not differentiable; give the block a custom_vjp"),
        )
    }
}

/// True for float arrays and tuples holding at least one float array.
pub(crate) fn differentiable(s: &Shape) -> bool {
    match s {
        Shape::Array { ty, .. } => ty.is_float(),
        Shape::Tuple(e) => e.iter().any(differentiable),
    }
}

/// Add `new` into `slot`.
pub(crate) fn accumulate(b: &Builder, slot: &mut Option<Ct>, new: Ct) -> Result<()> {
    let merged = match (slot.take(), new) {
        (None, n) => n,
        (Some(Ct::Array(a)), Ct::Array(c)) => Ct::Array(b.add(a, c)?),
        (Some(Ct::Tuple(mut a)), Ct::Tuple(c)) => {
            for (ai, ci) in a.iter_mut().zip(c) {
                if let Some(ci) = ci {
                    accumulate(b, ai, ci)?;
                }
            }
            Ct::Tuple(a)
        }
        (Some(old), new) => {
            // Shapes are checked before seeding, so this is an internal inconsistency.
            return Err(b.error(
                "vjp",
                format!("internal error: cotangent kinds differ ({old:?} vs {new:?})"),
            ));
        }
    };
    *slot = Some(merged);
    Ok(())
}

/// A concrete op for a cotangent of `shape` (zeros where it is absent).
pub(crate) fn materialize(b: &Builder, ct: Option<&Ct>, shape: &Shape) -> Result<Op> {
    match (ct, shape) {
        (Some(Ct::Array(op)), _) => Ok(*op),
        (None, Shape::Array { ty, dims }) => b.zeros(*ty, dims),
        (Some(Ct::Tuple(e)), Shape::Tuple(s)) => {
            let ops = s
                .iter()
                .enumerate()
                .map(|(i, si)| materialize(b, e.get(i).and_then(Option::as_ref), si))
                .collect::<Result<Vec<_>>>()?;
            b.tuple(&ops)
        }
        (None, Shape::Tuple(s)) => {
            let ops = s
                .iter()
                .map(|si| materialize(b, None, si))
                .collect::<Result<Vec<_>>>()?;
            b.tuple(&ops)
        }
        (Some(Ct::Tuple(_)), Shape::Array { .. }) => Err(b.error(
            "vjp",
            format!(
                "internal error: tuple cotangent for array shape {}",
                shape.short()
            ),
        )),
    }
}

/// Split a user-given (possibly tuple-shaped) cotangent op into a [`Ct`].
pub(crate) fn ct_from_op(b: &Builder, op: Op, shape: &Shape) -> Result<Ct> {
    match shape {
        Shape::Array { .. } => Ok(Ct::Array(op)),
        Shape::Tuple(e) => {
            let mut v = Vec::with_capacity(e.len());
            for (i, s) in e.iter().enumerate() {
                v.push(Some(ct_from_op(b, b.get_tuple_element(op, i)?, s)?));
            }
            Ok(Ct::Tuple(v))
        }
    }
}

/// `{manual}`, or a tuple of only `{manual}` elements.
fn is_manual(s: &crate::Sharding) -> bool {
    match s {
        crate::Sharding::Manual => true,
        crate::Sharding::Tuple(e) => !e.is_empty() && e.iter().all(is_manual),
        _ => false,
    }
}

/// The scope (below the current one) for the backward ops of a forward op made in scope `fwd`.
fn backward_scope(current: &str, fwd: &str) -> String {
    let rel = if current.is_empty() {
        fwd
    } else if fwd == current {
        ""
    } else {
        fwd.strip_prefix(current)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(fwd)
    };
    if rel.is_empty() {
        "vjp".to_string()
    } else {
        format!("vjp/{rel}")
    }
}

/// The forward-graph facts the walk needs, taken under one lock.
struct Plan {
    /// Instruction count when the walk started (backward ops come after).
    n: usize,
    /// Per instruction: on a path from `wrt` to the outputs.
    active: Vec<bool>,
    /// Per instruction: inside a manual region (annotated `{manual}`); its backward ops and
    /// the sums of its cotangents are made in a [`Builder::manual_scope`] too.
    manual: Vec<bool>,
    /// Snapshot of the active instructions, by index.
    nodes: HashMap<usize, Node>,
}

impl Builder {
    /// Vector–Jacobian product: the cotangents of `wrt` given the cotangents of `outputs`.
    ///
    /// `cotangents[i]` must have the shape of `outputs[i]` (a tuple-shaped op for a tuple
    /// output). The backward pass is emitted into this builder; a `wrt` with no path to any
    /// output (or of integer type) gets zeros. Errors name any op on the path that cannot be
    /// differentiated (`while`, `conditional`, `call`, custom calls without a
    /// [`Builder::custom_vjp`], non-add/max/min reducers).
    #[track_caller]
    pub fn vjp(&self, outputs: &[Op], cotangents: &[Op], wrt: &[Op]) -> Result<Vec<Op>> {
        let loc = Location::caller();
        if outputs.len() != cotangents.len() {
            return Err(self.error_at(
                loc,
                "vjp",
                format!(
                    "{} outputs but {} cotangents",
                    outputs.len(),
                    cotangents.len()
                ),
            ));
        }
        let out_shapes = self.shapes_of(loc, "vjp", outputs)?;
        let ct_shapes = self.shapes_of(loc, "vjp", cotangents)?;
        let wrt_shapes = self.shapes_of(loc, "vjp", wrt)?;
        for (i, (o, c)) in out_shapes.iter().zip(&ct_shapes).enumerate() {
            if o != c {
                return Err(self.error_at(
                    loc,
                    "vjp",
                    format!(
                        "cotangent {i} has shape {} but output {i} has shape {}",
                        c.short(),
                        o.short()
                    ),
                ));
            }
        }
        let customs: HashMap<usize, CustomVjp> = self
            .custom_vjps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let plan = self.plan(loc, outputs, wrt, &customs);

        let mut cts: Vec<Option<Ct>> = vec![None; plan.n];
        for ((o, c), s) in outputs.iter().zip(cotangents).zip(&out_shapes) {
            if plan.active[o.index()] {
                let ct = ct_from_op(self, *c, s)?;
                accumulate(self, &mut cts[o.index()], ct)?;
            }
        }
        let current = self.current_scope();
        for i in (0..plan.n).rev() {
            if !plan.active[i] {
                continue;
            }
            let Some(ct) = cts[i].clone() else { continue };
            let node = &plan.nodes[&i];
            // Backward ops of a forward op made in scope `s` go to `vjp/s` (relative to the
            // scope active now), so profiles attribute them to their layer.
            let _scope = self.name_scope(&backward_scope(&current, &node.scope));
            let manual = plan.manual[i].then(|| self.manual_scope());
            let contributions: Vec<(Op, Ct)> = if let Some(custom) = customs.get(&i) {
                custom.run(self, node, &ct)?
            } else {
                // The family's rule: one entry per operand; keep those that need one.
                let grads = node.kind.family().vjp(self, node, ct)?;
                node.operands
                    .iter()
                    .zip(grads)
                    .zip(&node.need)
                    .filter_map(|((o, g), &need)| g.filter(|_| need).map(|g| (*o, g)))
                    .collect()
            };
            drop(manual);
            for (operand, c) in contributions {
                let k = operand.index();
                if k < plan.n && plan.active[k] {
                    let _manual = plan.manual[k].then(|| self.manual_scope());
                    accumulate(self, &mut cts[k], c)?;
                }
            }
        }
        wrt.iter()
            .zip(&wrt_shapes)
            .map(|(w, s)| materialize(self, cts.get(w.index()).and_then(Option::as_ref), s))
            .collect()
    }

    /// Gradient of a scalar floating-point `loss` w.r.t. each of `wrt` (zeros where `loss` does
    /// not depend on it).
    #[track_caller]
    pub fn grad(&self, loss: Op, wrt: &[Op]) -> Result<Vec<Op>> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "grad", loss)?;
        let ty = match s.ty() {
            Some(ty) if ty.is_float() && s.is_scalar() => ty,
            _ => {
                return Err(self.error_at(
                    loc,
                    "grad",
                    format!("loss must be a floating-point scalar, got {}", s.short()),
                ))
            }
        };
        let one = self.scalar_typed(ty, 1.0)?;
        self.vjp(&[loss], &[one], wrt)
    }

    /// Reachability from `wrt` and to `outputs`; snapshot of the instructions on those paths.
    fn plan(
        &self,
        vjp_caller: &'static Location<'static>,
        outputs: &[Op],
        wrt: &[Op],
        customs: &HashMap<usize, CustomVjp>,
    ) -> Plan {
        self.with_instrs(|instrs| {
            let n = instrs.len();
            let deps = |i: usize| -> &[Op] {
                customs
                    .get(&i)
                    .map(|c| c.inputs.as_slice())
                    .unwrap_or(&instrs[i].operands)
            };
            let mut from = vec![false; n];
            for w in wrt {
                from[w.index()] = differentiable(&instrs[w.index()].shape);
            }
            for i in 0..n {
                if !from[i] && differentiable(&instrs[i].shape) {
                    from[i] = deps(i).iter().any(|o| from[o.index()]);
                }
            }
            let mut to = vec![false; n];
            for o in outputs {
                to[o.index()] = true;
            }
            let mut active = vec![false; n];
            for i in (0..n).rev() {
                if to[i] && from[i] {
                    active[i] = true;
                    for d in deps(i) {
                        to[d.index()] = true;
                    }
                }
            }
            let mut nodes = HashMap::new();
            for i in (0..n).filter(|&i| active[i]) {
                let ins = &instrs[i];
                let operands = deps(i).to_vec();
                let operand_shapes: Vec<Shape> = operands
                    .iter()
                    .map(|o| instrs[o.index()].shape.clone())
                    .collect();
                let need = operands
                    .iter()
                    .zip(&operand_shapes)
                    .map(|(o, s)| active[o.index()] && differentiable(s))
                    .collect();
                let scope = if ins.scope.is_empty() {
                    String::new()
                } else {
                    format!(" in {}", ins.scope)
                };
                nodes.insert(
                    i,
                    Node {
                        op: self.op_at(i),
                        kind: ins.kind.clone(),
                        operands,
                        operand_shapes,
                        shape: ins.shape.clone(),
                        called: ins.called.clone(),
                        need,
                        full_name: ins.full_name(),
                        built_at: format!("{}:{}{scope}", ins.location.file(), ins.location.line()),
                        scope: ins.scope.clone(),
                        vjp_caller,
                    },
                );
            }
            let manual = instrs
                .iter()
                .map(|ins| ins.sharding.as_ref().is_some_and(is_manual))
                .collect();
            Plan {
                n,
                active,
                manual,
                nodes,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::param;
    use crate::ElementType;

    #[test]
    fn pruning_visits_only_paths() {
        let b = Builder::new("p");
        let x = param(&b, ElementType::F32, &[3], "x");
        let y = param(&b, ElementType::F32, &[3], "y");
        let unrelated = b.exp(y).unwrap();
        let l = b.reduce_sum(b.mul(x, x).unwrap(), &[0]).unwrap();
        let customs = HashMap::new();
        let plan = b.plan(Location::caller(), &[l], &[x], &customs);
        assert!(plan.active[x.index()]);
        assert!(!plan.active[y.index()]);
        assert!(!plan.active[unrelated.index()]);
        // Gradient w.r.t. y (no path) is zeros of its shape.
        let g = b.grad(l, &[x, y]).unwrap();
        assert_eq!(b.shape(g[1]).unwrap(), Shape::array(ElementType::F32, &[3]));
    }

    #[test]
    fn backward_ops_are_scoped_under_vjp() {
        assert_eq!(backward_scope("", ""), "vjp");
        assert_eq!(backward_scope("", "layer_0/mlp"), "vjp/layer_0/mlp");
        assert_eq!(backward_scope("train", "train/layer_0"), "vjp/layer_0");
        assert_eq!(backward_scope("train", "train"), "vjp");
        assert_eq!(backward_scope("train", "other"), "vjp/other");
        let b = Builder::new("s");
        let x = param(&b, ElementType::F32, &[3], "x");
        let y = {
            let _g = b.name_scope("layer_0");
            b.reduce_sum(b.exp(x).unwrap(), &[0]).unwrap()
        };
        let g = b.grad(y, &[x]).unwrap();
        let text = b.build(g[0]).unwrap().to_text();
        assert!(text.contains("op_name=\"vjp/layer_0/multiply."), "{text}");
    }

    #[test]
    fn errors_name_the_problem() {
        let b = Builder::new("e");
        let x = param(&b, ElementType::F32, &[3], "x");
        let e = b.grad(x, &[x]).unwrap_err().to_string();
        assert!(
            e.contains("loss must be a floating-point scalar, got f32[3]"),
            "{e}"
        );
        let c = param(&b, ElementType::F32, &[2], "c");
        let e = b.vjp(&[x], &[c], &[x]).unwrap_err().to_string();
        assert!(
            e.contains("cotangent 0 has shape f32[2] but output 0 has shape f32[3]"),
            "{e}"
        );
    }
}
