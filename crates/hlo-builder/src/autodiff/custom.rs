//! User VJP rules: [`Builder::custom_vjp`] registers a rule for an opaque block (a custom call,
//! a loop, any subgraph), and the walk runs it instead of walking into the block.

use std::fmt;
use std::panic::Location;
use std::sync::Arc;

use super::{ct_from_op, materialize, Ct, Node};
use crate::builder::Builder;
use crate::error::Result;
use crate::Op;

/// A user-supplied vector–Jacobian product for a block registered with [`Builder::custom_vjp`].
///
/// Closures `Fn(&Builder, &[Op], Op, &[Option<Op>]) -> Result<Vec<Option<Op>>>` implement it.
pub trait VjpRule: Send + Sync {
    /// `cotangents[i]` is the cotangent of tuple element `i` of `output` (or of the array output
    /// when `i == 0`), `None` where it is zero. Returns one entry per input: `Some(cotangent)`
    /// with the input's shape, or `None` (zero / not differentiable).
    fn vjp(
        &self,
        b: &Builder,
        inputs: &[Op],
        output: Op,
        cotangents: &[Option<Op>],
    ) -> Result<Vec<Option<Op>>>;
}

impl<F> VjpRule for F
where
    F: Fn(&Builder, &[Op], Op, &[Option<Op>]) -> Result<Vec<Option<Op>>> + Send + Sync,
{
    fn vjp(
        &self,
        b: &Builder,
        inputs: &[Op],
        output: Op,
        cotangents: &[Option<Op>],
    ) -> Result<Vec<Option<Op>>> {
        self(b, inputs, output, cotangents)
    }
}

/// A registered custom VJP: the block's inputs and its rule.
#[derive(Clone)]
pub(crate) struct CustomVjp {
    pub(crate) inputs: Vec<Op>,
    pub(crate) rule: Arc<dyn VjpRule>,
}

impl fmt::Debug for CustomVjp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomVjp")
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

impl CustomVjp {
    /// Run the user rule on `node` (whose operands are the block's inputs) and check what it
    /// returns: contributions to the inputs that need one.
    pub(crate) fn run(&self, b: &Builder, node: &Node, ct: &Ct) -> Result<Vec<(Op, Ct)>> {
        let loc = node.vjp_caller;
        let cts: Vec<Option<Op>> = match (ct, node.shape.tuple_elements()) {
            (Ct::Array(op), None) => vec![Some(*op)],
            (Ct::Tuple(elems), Some(shapes)) => {
                let mut v = Vec::with_capacity(shapes.len());
                for (i, s) in shapes.iter().enumerate() {
                    v.push(match elems.get(i).and_then(Option::as_ref) {
                        Some(e) => Some(materialize(b, Some(e), s)?),
                        None => None,
                    });
                }
                v
            }
            _ => {
                return Err(b.error_at(
                    loc,
                    "vjp",
                    format!(
                        "internal error: cotangent structure does not match {} of `{}`",
                        node.shape.short(),
                        node.full_name
                    ),
                ))
            }
        };
        let grads = self.rule.vjp(b, &self.inputs, node.op, &cts)?;
        if grads.len() != self.inputs.len() {
            return Err(b.error_at(
                loc,
                "vjp",
                format!(
                    "custom VJP rule of `{}` (built at {}) returned {} cotangents for {} inputs",
                    node.full_name,
                    node.built_at,
                    grads.len(),
                    self.inputs.len()
                ),
            ));
        }
        let mut out = Vec::new();
        for (i, (g, want)) in grads.into_iter().zip(&node.operand_shapes).enumerate() {
            let Some(g) = g else { continue };
            let got = b.shape_of(loc, "vjp", g)?;
            if &got != want {
                return Err(b.error_at(
                    loc,
                    "vjp",
                    format!("custom VJP rule of `{}` (built at {}) returned cotangent {i} of shape {} for an input of shape {}", node.full_name, node.built_at, got.short(), want.short()),
                ));
            }
            if node.need[i] {
                out.push((self.inputs[i], ct_from_op(b, g, want)?));
            }
        }
        Ok(out)
    }
}

impl Builder {
    /// Mark `output` (an array, or a tuple-shaped op such as a custom call returning a tuple or a
    /// `tuple(...)` of a while's results) as computed from `inputs`, with `rule` as its VJP.
    /// Autodiff calls `rule` instead of differentiating whatever produced `output`, and never
    /// walks into that block.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use hlo_builder::{Builder, ElementType, Op, Shape};
    /// let b = Builder::new("f");
    /// let x = b.parameter(Shape::array(ElementType::F32, &[4]), "x").unwrap();
    /// let y = b.exp(x).unwrap(); // pretend this is an opaque kernel
    /// b.custom_vjp(&[x], y, Arc::new(|b: &Builder, _ins: &[Op], out: Op, ct: &[Option<Op>]| {
    ///     Ok(vec![match ct[0] { Some(c) => Some(b.mul(c, out)?), None => None }])
    /// })).unwrap();
    /// let g = b.grad(b.reduce_sum(y, &[0]).unwrap(), &[x]).unwrap();
    /// ```
    #[track_caller]
    pub fn custom_vjp(&self, inputs: &[Op], output: Op, rule: Arc<dyn VjpRule>) -> Result<()> {
        let loc = Location::caller();
        self.shapes_of(loc, "custom_vjp", inputs)?;
        self.shape_of(loc, "custom_vjp", output)?;
        if let Some(i) = inputs.iter().position(|x| x.index() > output.index()) {
            return Err(self.error_at(loc, "custom_vjp", format!("input {i} was made after the output; inputs must come before the block they feed")));
        }
        let mut map = self.custom_vjps.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&output.index()) {
            return Err(self.error_at(loc, "custom_vjp", "this output already has a custom VJP"));
        }
        map.insert(
            output.index(),
            CustomVjp {
                inputs: inputs.to_vec(),
                rule,
            },
        );
        Ok(())
    }
}
