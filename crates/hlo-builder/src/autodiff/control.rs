//! Control flow and opaque blocks: user VJP rules ([`crate::Builder::custom_vjp`]) and the error
//! for `while` / `conditional` / `call` / custom calls met without one. (`tuple` and
//! `get-tuple-element` are handled structurally by the walk in `mod.rs`.)

use std::panic::Location;

use super::{ct_from_op, materialize, Ct, CustomVjp, Node};
use crate::builder::{Builder, Kind};
use crate::error::{Error, Result};
use crate::Op;

/// The error for an instruction on the differentiation path that has no VJP rule.
pub(super) fn not_differentiable(
    b: &Builder,
    loc: &'static Location<'static>,
    node: &Node,
) -> Error {
    let what = match &node.kind {
        Kind::CustomCall { target, .. } => format!(
            "custom-call `{}` (target {target:?}, built at {})",
            node.full_name, node.built_at
        ),
        Kind::Reduce(_) => format!(
            "reduce `{}` (built at {}) with this reducer",
            node.full_name, node.built_at
        ),
        k => format!(
            "{} `{}` (built at {})",
            k.opcode(),
            node.full_name,
            node.built_at
        ),
    };
    b.invalid(
        loc,
        "vjp",
        format!("{what} is not differentiable; give the block a custom_vjp"),
    )
}

/// Run a user rule and check what it returns.
pub(super) fn custom(
    b: &Builder,
    loc: &'static Location<'static>,
    node: &Node,
    custom: &CustomVjp,
    ct: &Ct,
) -> Result<Vec<(Op, Ct)>> {
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
            return Err(b.invalid(
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
    let grads = custom.rule.vjp(b, &custom.inputs, node.op, &cts)?;
    if grads.len() != custom.inputs.len() {
        return Err(b.invalid(
            loc,
            "vjp",
            format!(
                "custom VJP rule of `{}` (built at {}) returned {} cotangents for {} inputs",
                node.full_name,
                node.built_at,
                grads.len(),
                custom.inputs.len()
            ),
        ));
    }
    let mut out = Vec::new();
    for (i, (g, want)) in grads.into_iter().zip(&node.operand_shapes).enumerate() {
        let Some(g) = g else { continue };
        let got = b.shape_of(loc, "vjp", g)?;
        if &got != want {
            return Err(b.invalid(
                loc,
                "vjp",
                format!("custom VJP rule of `{}` (built at {}) returned cotangent {i} of shape {} for an input of shape {}", node.full_name, node.built_at, got.short(), want.short()),
            ));
        }
        if node.need[i] {
            out.push((custom.inputs[i], ct_from_op(b, g, want)?));
        }
    }
    Ok(out)
}
