//! Control flow and tuples: `while`, `conditional`, `call`, `tuple`, `get-tuple-element`.
//!
//! VJP: `tuple` hands each element's cotangent to its operand and `get-tuple-element` adds into
//! its element (cotangents of tuples are kept per element). `while`, `conditional` and `call`
//! need a [`Builder::custom_vjp`] on the block.

use std::panic::Location;

use crate::autodiff::{Ct, Node};
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{Shape, ShapeError, ShapeResult};
use crate::{Computation, ElementType, Op};

fn sig(params: &[Shape], result: &Shape) -> String {
    let p: Vec<String> = params.iter().map(Shape::short).collect();
    format!("({}) -> {}", p.join(", "), result.short())
}

/// Shape rule of `while`: `cond: (T) -> pred[]`, `body: (T) -> T`, `init: T`.
pub fn while_loop(cond: (&[Shape], &Shape), body: (&[Shape], &Shape), init: &Shape) -> ShapeResult {
    let pred = Shape::scalar(ElementType::Pred);
    if cond.0 != std::slice::from_ref(init) || cond.1 != &pred {
        return Err(ShapeError::new(
            "while_loop",
            format!(
                "condition must be ({}) -> pred[], got {}",
                init.short(),
                sig(cond.0, cond.1)
            ),
        ));
    }
    if body.0 != std::slice::from_ref(init) || body.1 != init {
        return Err(ShapeError::new(
            "while_loop",
            format!(
                "body must be ({}) -> {}, got {}",
                init.short(),
                init.short(),
                sig(body.0, body.1)
            ),
        ));
    }
    Ok(init.clone())
}

/// Shape rule of `conditional`: a `pred[]` selector with 2 branches (true, false) or an `s32[]`
/// index with N branches; branch `i` takes `operands[i]`; all branches return the same shape.
pub fn conditional(
    selector: &Shape,
    branches: &[(&[Shape], &Shape)],
    operands: &[Shape],
) -> ShapeResult {
    const OP: &str = "conditional";
    match selector.ty() {
        Some(ElementType::Pred) if selector.is_scalar() && branches.len() == 2 => {}
        Some(ElementType::S32) if selector.is_scalar() && !branches.is_empty() => {}
        _ => {
            return Err(ShapeError::new(OP, format!("selector must be pred[] with 2 branches or s32[] with >= 1 branches, got {} with {}", selector.short(), branches.len())));
        }
    }
    if operands.len() != branches.len() {
        return Err(ShapeError::new(
            OP,
            format!(
                "needs one operand per branch: {} branches, {} operands",
                branches.len(),
                operands.len()
            ),
        ));
    }
    let result = branches[0].1;
    for (i, ((params, res), operand)) in branches.iter().zip(operands).enumerate() {
        if *params != std::slice::from_ref(operand) {
            return Err(ShapeError::new(
                OP,
                format!(
                    "branch {i} is {} but its operand is {}",
                    sig(params, res),
                    operand.short()
                ),
            ));
        }
        if *res != result {
            return Err(ShapeError::new(
                OP,
                format!(
                    "branch {i} returns {} but branch 0 returns {}",
                    res.short(),
                    result.short()
                ),
            ));
        }
    }
    Ok(result.clone())
}

/// Shape rule of `call`.
pub fn call(params: &[Shape], result: &Shape, operands: &[Shape]) -> ShapeResult {
    if params != operands {
        let o: Vec<String> = operands.iter().map(Shape::short).collect();
        return Err(ShapeError::new(
            "call",
            format!(
                "callee is {} but the operands are ({})",
                sig(params, result),
                o.join(", ")
            ),
        ));
    }
    Ok(result.clone())
}

/// Shape rule of `get-tuple-element`.
pub fn get_tuple_element(t: &Shape, index: usize) -> ShapeResult {
    match t {
        Shape::Tuple(e) if index < e.len() => Ok(e[index].clone()),
        _ => Err(ShapeError::new(
            "get_tuple_element",
            format!("index {index} out of range for {}", t.short()),
        )),
    }
}

impl Builder {
    /// `while (cond(state)) state = body(state)`, starting from `init` (usually a tuple).
    #[track_caller]
    pub fn while_loop(&self, cond: &Computation, body: &Computation, init: Op) -> Result<Op> {
        let loc = Location::caller();
        let c = self.check_comp(loc, "while_loop", cond)?;
        let b = self.check_comp(loc, "while_loop", body)?;
        let s = self.shape_of(loc, "while_loop", init)?;
        let out = while_loop(
            (&c.param_shapes(), c.result_shape()),
            (&b.param_shapes(), b.result_shape()),
            &s,
        )
        .map_err(|e| self.shape_err(loc, e))?;
        // XLA stores a while's called computations as [body, condition].
        Ok(self.push(
            loc,
            Kind::Control(Control::While),
            vec![init],
            out,
            vec![b.id, c.id],
        ))
    }

    /// Run one of `branches` on its operand: `selector` is `pred[]` (branches = [true, false]) or
    /// an `s32[]` index (out-of-range picks the last branch).
    #[track_caller]
    pub fn conditional(
        &self,
        selector: Op,
        branches: &[&Computation],
        operands: &[Op],
    ) -> Result<Op> {
        let loc = Location::caller();
        let datas = branches
            .iter()
            .map(|c| self.check_comp(loc, "conditional", c))
            .collect::<Result<Vec<_>>>()?;
        let mut ops = vec![selector];
        ops.extend_from_slice(operands);
        let s = self.shapes_of(loc, "conditional", &ops)?;
        let params: Vec<Vec<Shape>> = datas.iter().map(|d| d.param_shapes()).collect();
        let sigs: Vec<(&[Shape], &Shape)> = params
            .iter()
            .zip(&datas)
            .map(|(p, d)| (p.as_slice(), d.result_shape()))
            .collect();
        let out = conditional(&s[0], &sigs, &s[1..]).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Control(Control::Conditional),
            ops,
            out,
            datas.iter().map(|d| d.id).collect(),
        ))
    }

    /// Call a computation of this module on `operands`.
    #[track_caller]
    pub fn call(&self, callee: &Computation, operands: &[Op]) -> Result<Op> {
        let loc = Location::caller();
        let d = self.check_comp(loc, "call", callee)?;
        let s = self.shapes_of(loc, "call", operands)?;
        let out =
            call(&d.param_shapes(), d.result_shape(), &s).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Control(Control::Call),
            operands.to_vec(),
            out,
            vec![d.id],
        ))
    }

    /// Make a tuple.
    #[track_caller]
    pub fn tuple(&self, elements: &[Op]) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shapes_of(loc, "tuple", elements)?;
        Ok(self.push(
            loc,
            Kind::Control(Control::Tuple),
            elements.to_vec(),
            Shape::Tuple(s),
            Vec::new(),
        ))
    }

    /// Element `index` of a tuple.
    #[track_caller]
    pub fn get_tuple_element(&self, t: Op, index: usize) -> Result<Op> {
        let loc = Location::caller();
        let s = self.shape_of(loc, "get_tuple_element", t)?;
        let out = get_tuple_element(&s, index).map_err(|e| self.shape_err(loc, e))?;
        Ok(self.push(
            loc,
            Kind::Control(Control::GetTupleElement(index as i64)),
            vec![t],
            out,
            Vec::new(),
        ))
    }
    /// `opt-barrier(x)`: `x` unchanged (array or tuple), a fence XLA's passes do not optimize
    /// across: what is computed from the result is not merged with (or hoisted above) what
    /// was computed before it.
    #[track_caller]
    pub fn optimization_barrier(&self, x: Op) -> Result<Op> {
        let loc = Location::caller();
        let shape = self.shape_of(loc, "optimization_barrier", x)?;
        Ok(self.push(
            loc,
            Kind::Control(Control::OptBarrier),
            vec![x],
            shape,
            Vec::new(),
        ))
    }
}

/// Attributes of control flow and tuple ops (the called computations are the instruction's).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Control {
    /// `while` (called: body, condition).
    While,
    /// `conditional` (called: the branches).
    Conditional,
    /// `call` (called: the callee).
    Call,
    /// `tuple`.
    Tuple,
    /// `get-tuple-element` of the index.
    GetTupleElement(i64),
    /// `opt-barrier`: the value unchanged, but XLA may neither move computations across it nor
    /// merge what follows with what precedes (used by rematerialization).
    OptBarrier,
}

impl Family for Control {
    fn opcode(&self) -> &'static str {
        match self {
            Control::While => "while",
            Control::Conditional => "conditional",
            Control::Call => "call",
            Control::Tuple => "tuple",
            Control::GetTupleElement(_) => "get-tuple-element",
            Control::OptBarrier => "opt-barrier",
        }
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        if let Control::GetTupleElement(i) = self {
            p.tuple_index = *i;
        }
    }

    fn vjp(&self, b: &Builder, n: &Node, ct: Ct) -> Result<Vec<Option<Ct>>> {
        match (self, ct) {
            (Control::Tuple, Ct::Tuple(elems)) => Ok(elems),
            // The identity: the cotangent passes through (no barrier on the way back).
            (Control::OptBarrier, ct) => Ok(vec![Some(ct)]),
            (Control::GetTupleElement(k), ct) => {
                let len = n.operand_shapes[0]
                    .tuple_elements()
                    .map_or(0, <[Shape]>::len);
                let mut v: Vec<Option<Ct>> = vec![None; len];
                v[*k as usize] = Some(ct);
                Ok(vec![Some(Ct::Tuple(v))])
            }
            _ => Err(n.not_differentiable(b, &n.describe())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_rules() {
        let f = Shape::array(ElementType::F32, &[3]);
        let s = Shape::scalar(ElementType::S32);
        let t = Shape::Tuple(vec![s.clone(), f.clone()]);
        let p = Shape::scalar(ElementType::Pred);
        let tt = [t.clone()];
        assert_eq!(while_loop((&tt, &p), (&tt, &t), &t), Ok(t.clone()));
        let e = while_loop((&tt, &s), (&tt, &t), &t).unwrap_err();
        assert_eq!(e.to_string(), "while_loop: condition must be ((s32[], f32[3])) -> pred[], got ((s32[], f32[3])) -> s32[]");
        let ff = [f.clone()];
        assert_eq!(
            conditional(&p, &[(&ff, &f), (&ff, &f)], &[f.clone(), f.clone()]),
            Ok(f.clone())
        );
        assert!(conditional(&p, &[(&ff, &f)], std::slice::from_ref(&f)).is_err());
        assert!(call(&ff, &f, std::slice::from_ref(&s)).is_err());
        assert_eq!(get_tuple_element(&t, 1), Ok(f));
        assert!(get_tuple_element(&t, 2).is_err());
    }
}
