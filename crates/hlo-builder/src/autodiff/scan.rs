//! A differentiable scan ([`Builder::scan`], JAX's `lax.scan` with a carry and stacked inputs,
//! MaxText's `scan_layers`): one `while` whose body is traced once, instead of `n` unrolled
//! copies of it, so the graph (and XLA's compile time) does not grow with `n`.
//!
//! Forward: a `while` over `i in 0..n` with state `(i, carry, saved, xs...)`; the body slices
//! `xs[j][i]`, records the carry entering iteration `i` into `saved [n, ...carry]` and runs the
//! user's body. The VJP is a reverse `while` over the same iterations: it reads the carry of
//! iteration `i` back from `saved`, traces the body again on `(carry_i, xs_i)` and
//! differentiates that copy inside the loop body ([`Builder::vjp`] of the sub-computation, so
//! custom VJPs, sharding constraints and manual regions inside the body keep working). The
//! carry's cotangent flows backwards through the loop; each `xs` cotangent of iteration `i` is
//! written into row `i` of a stacked buffer with `dynamic-update-slice`.
//!
//! So the backward pass always recomputes the body's intermediate values from the saved
//! carries (rematerialization at the granularity of one iteration, like
//! [`Builder::checkpoint`] of every iteration).

use std::panic::Location;
use std::sync::Arc;

use super::VjpRule;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::elementwise::Cmp;
use crate::shape::Shape;
use crate::{Computation, ElementType, Op};

/// The body of a [`Builder::scan`]: `(builder, carry, xs_i) -> new carry`, where `xs_i` holds
/// row `i` of each stacked input (its leading axis removed). It is traced twice (in the forward
/// loop and again in the backward loop), each time into a fresh sub-computation, so it must
/// depend on nothing but its arguments and constants it makes itself.
pub type ScanFn = Arc<dyn Fn(&Builder, Op, &[Op]) -> Result<Op> + Send + Sync>;

/// What the scan's VJP needs: the body, the trip count, shapes, and the saved carries.
struct ScanVjp {
    body: ScanFn,
    n: i64,
    /// Iterations per trip of the loop (see [`Builder::scan_unrolled`]).
    unroll: i64,
    carry: Shape,
    xs: Vec<Shape>,
    /// `saved [n, ...carry]`: the carry entering each iteration (an op of the caller's builder).
    saved: Op,
}

/// Row `i` of `x [n, ...]` without its leading axis.
fn row(b: &Builder, x: Op, shape: &Shape, i: Op) -> Result<Op> {
    let dims = shape.dims();
    let zero = b.scalar(0i32)?;
    let mut starts = vec![i];
    starts.extend(std::iter::repeat_n(zero, dims.len() - 1));
    let mut sizes = dims.to_vec();
    sizes[0] = 1;
    b.reshape(b.dynamic_slice(x, &starts, &sizes)?, &dims[1..])
}

/// `x [n, ...]` with row `i` replaced by `update [...]`.
fn put_row(b: &Builder, x: Op, update: Op, shape: &Shape, i: Op) -> Result<Op> {
    let dims = shape.dims();
    let zero = b.scalar(0i32)?;
    let mut starts = vec![i];
    starts.extend(std::iter::repeat_n(zero, dims.len() - 1));
    let mut one = dims.to_vec();
    one[0] = 1;
    b.dynamic_update_slice(x, b.reshape(update, &one)?, &starts)
}

/// `[n, ...dims]`, the stacked shape of `s`.
fn stacked(s: &Shape, n: i64) -> Shape {
    let ty = s.ty().unwrap_or(ElementType::F32);
    let mut d = vec![n];
    d.extend_from_slice(s.dims());
    Shape::array(ty, &d)
}

/// The condition `state.0 < n` of a loop whose state is `state`.
fn counter_below(b: &Builder, name: &str, state: &Shape, n: i64) -> Result<Computation> {
    let cb = b.sub_builder(name);
    let s = cb.parameter(state.clone(), "state")?;
    let i = cb.get_tuple_element(s, 0)?;
    let pred = cb.compare(i, cb.scalar(n as i32)?, Cmp::Lt)?;
    cb.build(pred)
}

impl VjpRule for ScanVjp {
    fn vjp(
        &self,
        b: &Builder,
        inputs: &[Op],
        _output: Op,
        cts: &[Option<Op>],
    ) -> Result<Vec<Option<Op>>> {
        let Some(ct) = cts.first().copied().flatten() else {
            return Ok(vec![None; inputs.len()]);
        };
        let xs = &inputs[1..];
        let n = self.n;
        let saved_shape = stacked(&self.carry, n);
        // Only float inputs get a cotangent buffer.
        let float: Vec<usize> = (0..xs.len())
            .filter(|&j| self.xs[j].ty().is_some_and(|t| t.is_float()))
            .collect();
        // State: (k, ct_carry, saved, xs..., dxs (float xs only)...).
        let mut init = vec![b.scalar(0i32)?, ct, self.saved];
        init.extend_from_slice(xs);
        for &j in &float {
            let ty = self.xs[j].ty().unwrap_or(ElementType::F32);
            init.push(b.zeros(ty, self.xs[j].dims())?);
        }
        let init = b.tuple(&init)?;
        let state = b.shape(init)?;
        let k0 = 3 + xs.len();
        let (u, trips) = (self.unroll, n / self.unroll);
        let body = {
            let sb = b.sub_builder("scan_bwd_body");
            let s = sb.parameter(state.clone(), "state")?;
            let e = (0..k0 + float.len())
                .map(|i| sb.get_tuple_element(s, i))
                .collect::<Result<Vec<_>>>()?;
            let (k, mut ct_c, saved) = (e[0], e[1], e[2]);
            let mut dxs = e[k0..].to_vec();
            // Trips in reverse: trip t = trips - 1 - k holds iterations t·u .. t·u + u - 1,
            // differentiated last to first.
            let t = sb.sub(sb.scalar((trips - 1) as i32)?, k)?;
            let mut last = None;
            for m in (0..u).rev() {
                let i = if u == 1 {
                    t
                } else {
                    sb.add(sb.mul(t, sb.scalar(u as i32)?)?, sb.scalar(m as i32)?)?
                };
                let c_i = row(&sb, saved, &saved_shape, i)?;
                let xs_i = (0..xs.len())
                    .map(|j| row(&sb, e[3 + j], &self.xs[j], i))
                    .collect::<Result<Vec<_>>>()?;
                let out = (self.body)(&sb, c_i, &xs_i)?;
                let mut wrt = vec![c_i];
                wrt.extend(float.iter().map(|&j| xs_i[j]));
                let g = sb.vjp(&[out], &[ct_c], &wrt)?;
                ct_c = g[0];
                if m == 0 {
                    // The last iteration's rows are written after the counter (the order of
                    // the graph without unrolling).
                    last = Some((g, i));
                } else {
                    for (q, &j) in float.iter().enumerate() {
                        dxs[q] = put_row(&sb, dxs[q], g[1 + q], &self.xs[j], i)?;
                    }
                }
            }
            let (g, i) = last.expect("unroll >= 1");
            let mut next = vec![sb.add(k, sb.scalar(1i32)?)?, ct_c, saved];
            next.extend_from_slice(&e[3..k0]);
            for (q, &j) in float.iter().enumerate() {
                next.push(put_row(&sb, dxs[q], g[1 + q], &self.xs[j], i)?);
            }
            let root = sb.tuple(&next)?;
            sb.build(root)?
        };
        let cond = counter_below(b, "scan_bwd_cond", &state, trips)?;
        let w = b.while_loop(&cond, &body, init)?;
        let mut grads = vec![Some(b.get_tuple_element(w, 1)?)];
        let mut m = 0;
        for j in 0..xs.len() {
            if float.contains(&j) {
                grads.push(Some(b.get_tuple_element(w, k0 + m)?));
                m += 1;
            } else {
                grads.push(None);
            }
        }
        Ok(grads)
    }
}

impl Builder {
    /// `carry = body(carry, xs[..][i])` for `i in 0..n`, as one `while` whose body is traced
    /// once; returns the final carry. Every `xs[j]` is stacked along a leading axis of the same
    /// length `n >= 1` (the trip count); the body sees row `i` of each with that axis removed.
    /// `carry` is an array and the body returns an array of the same shape.
    ///
    /// Differentiable in `carry` and every float `xs[j]`: the forward keeps the carry entering
    /// each iteration (`[n, ...carry]`) and the backward loop traces `body` again on it and
    /// differentiates it there, so the body's intermediate values are always recomputed. Custom
    /// VJPs inside the body are honoured.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use hlo_builder::{Builder, ElementType, Op, Shape};
    /// use hlo_builder::autodiff::ScanFn;
    /// let b = Builder::new("f");
    /// let x = b.parameter(Shape::array(ElementType::F32, &[3]), "x").unwrap();
    /// let w = b.parameter(Shape::array(ElementType::F32, &[5, 3]), "w").unwrap();
    /// let body: ScanFn = Arc::new(|b: &Builder, c: Op, w: &[Op]| b.tanh(b.mul(c, w[0])?));
    /// let y = b.scan(x, &[w], body).unwrap();
    /// let g = b.grad(b.reduce_sum(y, &[0]).unwrap(), &[x, w]).unwrap();
    /// assert_eq!(b.build(b.tuple(&[y, g[0], g[1]]).unwrap()).unwrap().to_text().matches(" while(").count(), 2);
    /// ```
    #[track_caller]
    pub fn scan(&self, carry: Op, xs: &[Op], body: ScanFn) -> Result<Op> {
        self.scan_impl(Location::caller(), carry, xs, body, 1)
    }

    /// [`Builder::scan`] whose loop runs `unroll` iterations per trip (JAX's
    /// `lax.scan(unroll=)`): the `while` body holds `unroll` copies of `body`, on rows
    /// `t·unroll .. t·unroll + unroll − 1`, and the loop makes `n / unroll` trips; the backward
    /// loop likewise. The result and the gradients are those of [`Builder::scan`]; `unroll = 1`
    /// builds exactly its graph. `unroll` must divide the trip count `n`.
    ///
    /// XLA's cost analysis counts a `while` body once, so the costs of `unroll = 1` and
    /// `unroll = u` differ by `u − 1` iterations' worth of both loops' bodies: this is how
    /// `rattn compile` estimates the cost of a scanned program.
    #[track_caller]
    pub fn scan_unrolled(&self, carry: Op, xs: &[Op], body: ScanFn, unroll: usize) -> Result<Op> {
        self.scan_impl(Location::caller(), carry, xs, body, unroll)
    }

    #[track_caller]
    fn scan_impl(
        &self,
        loc: &'static Location<'static>,
        carry: Op,
        xs: &[Op],
        body: ScanFn,
        unroll: usize,
    ) -> Result<Op> {
        const OP: &str = "scan";
        let carry_shape = self.shape_of(loc, OP, carry)?;
        let xs_shapes = self.shapes_of(loc, OP, xs)?;
        if carry_shape.tuple_elements().is_some() {
            return Err(self.error_at(
                loc,
                OP,
                format!("the carry must be an array, got {}", carry_shape.short()),
            ));
        }
        let Some(first) = xs_shapes.first() else {
            return Err(self.error_at(
                loc,
                OP,
                "needs at least one stacked input (its leading axis is the trip count)",
            ));
        };
        let n = first.dims().first().copied().unwrap_or(0);
        for (j, s) in xs_shapes.iter().enumerate() {
            if s.tuple_elements().is_some() || s.dims().first() != Some(&n) || n < 1 {
                let all: Vec<String> = xs_shapes.iter().map(Shape::short).collect();
                return Err(self.error_at(
                    loc,
                    OP,
                    format!(
                        "stacked input {j} is {}: every input needs the same leading axis n >= 1 \
                         (the trip count, {n} from input 0); inputs are ({})",
                        s.short(),
                        all.join(", ")
                    ),
                ));
            }
        }
        let u = unroll as i64;
        if u < 1 || n % u != 0 {
            return Err(self.error_at(
                loc,
                OP,
                format!("unroll {unroll} must be >= 1 and divide the trip count {n}"),
            ));
        }
        let saved_shape = stacked(&carry_shape, n);
        let ty = carry_shape.ty().unwrap_or(ElementType::F32);
        // State: (i, carry, saved, xs...).
        let mut init = vec![
            self.scalar(0i32)?,
            carry,
            self.zeros(ty, saved_shape.dims())?,
        ];
        init.extend_from_slice(xs);
        let init = self.tuple(&init)?;
        let state = self.shape(init)?;
        let fwd = {
            let sb = self.sub_builder("scan_body");
            let s = sb.parameter(state.clone(), "state")?;
            let e = (0..3 + xs.len())
                .map(|i| sb.get_tuple_element(s, i))
                .collect::<Result<Vec<_>>>()?;
            let (t, mut c, mut saved) = (e[0], e[1], e[2]);
            let mut last = None;
            for m in 0..u {
                // Iteration i = t·u + m of trip t.
                let i = if u == 1 {
                    t
                } else {
                    sb.add(sb.mul(t, sb.scalar(u as i32)?)?, sb.scalar(m as i32)?)?
                };
                let xs_i = (0..xs.len())
                    .map(|j| row(&sb, e[3 + j], &xs_shapes[j], i))
                    .collect::<Result<Vec<_>>>()?;
                let out = body(&sb, c, &xs_i)?;
                let got = sb.shape(out)?;
                if got != carry_shape {
                    return Err(self.error_at(
                        loc,
                        OP,
                        format!(
                            "the body returns {} but the carry is {}",
                            got.short(),
                            carry_shape.short()
                        ),
                    ));
                }
                if m + 1 < u {
                    saved = put_row(&sb, saved, c, &saved_shape, i)?;
                } else {
                    // The last carry is recorded after the counter (the graph without unrolling).
                    last = Some((c, i));
                }
                c = out;
            }
            let (c_last, i_last) = last.expect("unroll >= 1");
            let mut next = vec![
                sb.add(t, sb.scalar(1i32)?)?,
                c,
                put_row(&sb, saved, c_last, &saved_shape, i_last)?,
            ];
            next.extend_from_slice(&e[3..]);
            let root = sb.tuple(&next)?;
            sb.build(root)?
        };
        let cond = counter_below(self, "scan_cond", &state, n / u)?;
        let w = self.while_loop(&cond, &fwd, init)?;
        let saved = self.get_tuple_element(w, 2)?;
        let out = self.get_tuple_element(w, 1)?;
        let mut inputs = vec![carry];
        inputs.extend_from_slice(xs);
        self.custom_vjp(
            &inputs,
            out,
            Arc::new(ScanVjp {
                body,
                n,
                unroll: u,
                carry: carry_shape,
                xs: xs_shapes,
                saved,
            }),
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::param;

    #[test]
    fn mismatched_leading_axes_are_named() {
        let b = Builder::new("s");
        let x = param(&b, ElementType::F32, &[3], "x");
        let w = param(&b, ElementType::F32, &[4, 3], "w");
        let v = param(&b, ElementType::F32, &[5, 3], "v");
        let body: ScanFn = Arc::new(|b: &Builder, c: Op, _w: &[Op]| b.exp(c));
        let e = b.scan(x, &[w, v], body.clone()).unwrap_err().to_string();
        assert!(
            e.contains("scan: stacked input 1 is f32[5,3]")
                && e.contains("(the trip count, 4 from input 0); inputs are (f32[4,3], f32[5,3])"),
            "{e}"
        );
        let e = b.scan(x, &[], body).unwrap_err().to_string();
        assert!(e.contains("scan: needs at least one stacked input"), "{e}");
        let bad: ScanFn = Arc::new(|b: &Builder, _c: Op, w: &[Op]| b.reshape(w[0], &[1, 3]));
        let e = b.scan(x, &[w], bad).unwrap_err().to_string();
        assert!(
            e.contains("scan: the body returns f32[1,3] but the carry is f32[3]"),
            "{e}"
        );
    }
}
