//! Rematerialization ([`Builder::checkpoint`], JAX's `jax.checkpoint`): a block whose
//! intermediate values are not kept for the backward pass but computed again there from the
//! block's inputs — all of them ([`SavePolicy::Nothing`]), or all but the results of its
//! matmuls ([`SavePolicy::Dots`], [`SavePolicy::DotsWithNoBatchDims`], JAX's
//! `jax.checkpoint_policies`), which are kept from the forward.
//!
//! How dots are saved: while the block is traced forward, a *tape* on the builder records the
//! results of the `dot_general`s the policy selects, in trace order. The backward pass traces
//! the block again (on inputs fenced by an `opt-barrier`) with the tape in *replay*: the k-th
//! selected `dot_general` emits no dot but returns the k-th saved result (through the same
//! barrier), carrying a custom VJP that is the dot's transpose rule with respect to the
//! recomputed operands. Gradients are exact, every elementwise op of the block is computed once
//! more, and no selected dot is. Custom calls and loops in the block (kernels with their own
//! [`Builder::custom_vjp`]) are traced again like any other op: their results are not saved
//! (as `jax.checkpoint`, which saves a `pallas_call`'s result only when it is named).

use std::panic::Location;
use std::sync::Arc;

use super::VjpRule;
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::dot::{dot_transpose, DotDims, Precision};
use crate::shape::Shape;
use crate::Op;

/// A block's forward function, traced again (on fresh inputs) in the backward pass.
pub type BlockFn = Arc<dyn Fn(&Builder, &[Op]) -> Result<Op> + Send + Sync>;

/// What a checkpointed block keeps from its forward for the backward pass (the policies of
/// `jax.checkpoint_policies` that this builder has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SavePolicy {
    /// Nothing (`nothing_saveable`): the block is traced again from its inputs, matmuls too.
    #[default]
    Nothing,
    /// The result of every `dot_general` (`dots_saveable`, alias `checkpoint_dots`): projections
    /// and attention scores alike.
    Dots,
    /// The result of every `dot_general` without batch dimensions
    /// (`dots_with_no_batch_dims_saveable`, MaxText's `remat_policy = "minimal"`): the
    /// projections `x·W`, not the attention scores `q·kᵀ` batched over batch and heads, which are
    /// recomputed (they grow with T², the projections with T).
    DotsWithNoBatchDims,
}

impl SavePolicy {
    /// Whether a `dot_general` with dimension numbers `dims` is saved (outside manual regions;
    /// see [`Builder::checkpoint_with_policy`]).
    pub fn saves(self, dims: &DotDims) -> bool {
        match self {
            SavePolicy::Nothing => false,
            SavePolicy::Dots => true,
            SavePolicy::DotsWithNoBatchDims => dims.lhs_batch.is_empty(),
        }
    }
}

/// The dot tape of a block being traced (see the module docs).
#[derive(Debug)]
pub(crate) struct DotTape {
    policy: SavePolicy,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// The forward trace: the selected dots' results so far.
    Record(Vec<Op>),
    /// The backward re-trace: the saved results are elements `first..first + count` of the
    /// barrier tuple `fence`; `next` is the next one to hand out.
    Replay {
        fence: Op,
        first: usize,
        count: usize,
        next: usize,
    },
}

/// The VJP of a saved dot in the replay: the dot's transpose rule on the recomputed operands.
struct SavedDot {
    dims: DotDims,
    precision: Option<Precision>,
}

impl VjpRule for SavedDot {
    fn vjp(
        &self,
        b: &Builder,
        inputs: &[Op],
        _output: Op,
        cts: &[Option<Op>],
    ) -> Result<Vec<Option<Op>>> {
        let Some(ct) = cts.first().copied().flatten() else {
            return Ok(vec![None, None]);
        };
        let (xs, ys) = (b.shape(inputs[0])?, b.shape(inputs[1])?);
        let [gx, gy] = dot_transpose(
            b,
            (inputs[0], &xs),
            (inputs[1], &ys),
            &self.dims,
            self.precision,
            ct,
            [true, true],
        )?;
        Ok(vec![gx, gy])
    }
}

/// The VJP of a checkpointed block: trace the block again on its inputs passed through an
/// `opt-barrier` together with the cotangent and the saved dot results (so XLA neither reuses
/// the forward's other values nor runs the recomputation before the backward pass needs it),
/// replaying the saved dots, then differentiate the copy.
struct Remat {
    f: BlockFn,
    policy: SavePolicy,
    /// The forward's results of the dots the policy saves, in trace order.
    saved: Vec<Op>,
}

impl VjpRule for Remat {
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
        let (n, m) = (inputs.len(), self.saved.len());
        let mut fenced: Vec<Op> = inputs.to_vec();
        fenced.extend_from_slice(&self.saved);
        fenced.push(ct);
        let t = b.optimization_barrier(b.tuple(&fenced)?)?;
        let again = (0..n)
            .map(|i| b.get_tuple_element(t, i))
            .collect::<Result<Vec<_>>>()?;
        let ct = b.get_tuple_element(t, n + m)?;
        let out = if self.policy == SavePolicy::Nothing {
            (self.f)(b, &again)?
        } else {
            let tape = DotTape {
                policy: self.policy,
                mode: Mode::Replay {
                    fence: t,
                    first: n,
                    count: m,
                    next: 0,
                },
            };
            let (out, tape) = b.with_dot_tape(tape, || (self.f)(b, &again))?;
            if let Mode::Replay { next, .. } = tape.mode {
                if next != m {
                    return Err(b.error(
                        "checkpoint_with_policy",
                        format!(
                            "the block traced {next} saved dots in the backward pass but {m} in \
                             the forward; it must depend on nothing but its inputs"
                        ),
                    ));
                }
            }
            out
        };
        Ok(b.vjp(&[out], &[ct], &again)?
            .into_iter()
            .map(Some)
            .collect())
    }
}

impl Builder {
    /// `f(inputs)`, rematerialized: the backward pass does not keep `f`'s intermediate values
    /// but traces `f` again from `inputs` (behind an `opt-barrier`) and differentiates that
    /// copy, trading compute for memory. `f` must return one array and depend on nothing but
    /// `inputs` (it is called twice: now, and during [`Builder::vjp`]).
    /// [`Builder::checkpoint_with_policy`] with [`SavePolicy::Nothing`].
    pub fn checkpoint(&self, inputs: &[Op], f: BlockFn) -> Result<Op> {
        self.checkpoint_with_policy(inputs, f, SavePolicy::Nothing)
    }

    /// [`Builder::checkpoint`] that keeps the results of the `dot_general`s `policy` selects
    /// from the forward (JAX's `jax.checkpoint(f, policy=…)`): the backward pass traces `f`
    /// again but takes those results from the forward instead of computing them again, so it
    /// holds no second copy of a saved dot; the memory kept is the saved results. The same
    /// contract on `f`; blocks that save dots cannot nest (a plain [`Builder::checkpoint`]
    /// inside one can). Dots inside a manual region ([`Builder::manual_scope`], e.g. the
    /// sequence-parallel attention) are recomputed: their per-device values cannot leave the
    /// region to be saved. The saved dot's VJP emits both operand cotangents; one that is not
    /// needed is dead code, which XLA removes.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use hlo_builder::autodiff::{BlockFn, SavePolicy};
    /// use hlo_builder::{Builder, ElementType, Op, Shape};
    /// let b = Builder::new("f");
    /// let x = b.parameter(Shape::array(ElementType::F32, &[2, 3]), "x").unwrap();
    /// let w = b.parameter(Shape::array(ElementType::F32, &[3, 3]), "w").unwrap();
    /// let f: BlockFn = Arc::new(|b: &Builder, i: &[Op]| b.tanh(b.dot(i[0], i[1])?));
    /// let y = b.checkpoint_with_policy(&[x, w], f, SavePolicy::Dots).unwrap();
    /// let g = b.grad(b.reduce_sum(y, &[0, 1]).unwrap(), &[x, w]).unwrap();
    /// let text = b.build(b.tuple(&g).unwrap()).unwrap().to_text();
    /// // The forward dot and its two transposes; tanh once more in the backward pass.
    /// assert_eq!(text.matches(" dot(").count(), 3);
    /// assert_eq!(text.matches(" tanh(").count(), 2);
    /// ```
    pub fn checkpoint_with_policy(
        &self,
        inputs: &[Op],
        f: BlockFn,
        policy: SavePolicy,
    ) -> Result<Op> {
        let (out, saved) = if policy == SavePolicy::Nothing {
            (f(self, inputs)?, Vec::new())
        } else {
            let tape = DotTape {
                policy,
                mode: Mode::Record(Vec::new()),
            };
            let (out, tape) = self.with_dot_tape(tape, || f(self, inputs))?;
            match tape.mode {
                Mode::Record(saved) => (out, saved),
                Mode::Replay { .. } => unreachable!("the tape set above records"),
            }
        };
        self.custom_vjp(inputs, out, Arc::new(Remat { f, policy, saved }))?;
        Ok(out)
    }

    /// Run `trace` with `tape` on this builder; the tape is taken back (and returned) even when
    /// `trace` fails.
    fn with_dot_tape(
        &self,
        tape: DotTape,
        trace: impl FnOnce() -> Result<Op>,
    ) -> Result<(Op, DotTape)> {
        {
            let mut slot = self.dot_tape.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                return Err(self.error(
                    "checkpoint_with_policy",
                    "a block that saves dots is nested inside another one; nest plain \
                     checkpoints (SavePolicy::Nothing) instead",
                ));
            }
            *slot = Some(tape);
        }
        let out = trace();
        let tape = self
            .dot_tape
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("the dot tape set above");
        Ok((out?, tape))
    }

    /// Record `op`, a dot with `dims` just made, when a recording tape's policy saves it.
    pub(crate) fn record_dot(&self, op: Op, dims: &DotDims) {
        let mut slot = self.dot_tape.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(DotTape {
            policy,
            mode: Mode::Record(saved),
        }) = slot.as_mut()
        {
            if policy.saves(dims) && !self.in_manual_scope() {
                saved.push(op);
            }
        }
    }

    /// Under a replaying tape whose policy saves a dot with `dims`: the next saved result (a
    /// fresh element of the barrier tuple) with the dot's transpose rule on `operands` as its
    /// VJP. `None` (emit the dot) otherwise.
    pub(crate) fn replay_dot(
        &self,
        loc: &'static Location<'static>,
        operands: [Op; 2],
        dims: &DotDims,
        precision: Option<Precision>,
        shape: &Shape,
    ) -> Result<Option<Op>> {
        let (fence, index) = {
            let mut slot = self.dot_tape.lock().unwrap_or_else(|e| e.into_inner());
            let Some(DotTape {
                policy,
                mode:
                    Mode::Replay {
                        fence,
                        first,
                        count,
                        next,
                    },
            }) = slot.as_mut()
            else {
                return Ok(None);
            };
            if !policy.saves(dims) || self.in_manual_scope() {
                return Ok(None);
            }
            if *next >= *count {
                return Err(self.error_at(
                    loc,
                    "dot_general",
                    format!(
                        "the backward pass's trace of a checkpointed block made more saved dots \
                         than the forward's {count}; the block must depend on nothing but its inputs"
                    ),
                ));
            }
            *next += 1;
            (*fence, *first + *next - 1)
        };
        let saved = self.get_tuple_element(fence, index)?;
        let got = self.shape(saved)?;
        if &got != shape {
            return Err(self.error_at(
                loc,
                "dot_general",
                format!(
                    "the backward pass's trace of a checkpointed block made a dot of shape {} \
                     where the forward saved one of shape {}; the block must depend on nothing \
                     but its inputs",
                    shape.short(),
                    got.short()
                ),
            ));
        }
        self.custom_vjp(
            &operands,
            saved,
            Arc::new(SavedDot {
                dims: dims.clone(),
                precision,
            }),
        )?;
        Ok(Some(saved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::param;
    use crate::ElementType;

    #[test]
    fn the_backward_pass_recomputes_the_block_behind_a_barrier() {
        let b = Builder::new("remat");
        let x = param(&b, ElementType::F32, &[3], "x");
        let f: BlockFn = Arc::new(|b: &Builder, i: &[Op]| b.exp(b.sin(i[0])?));
        let y = b.checkpoint(&[x], f).unwrap();
        let l = b.reduce_sum(y, &[0]).unwrap();
        let g = b.grad(l, &[x]).unwrap();
        let text = b.build(b.tuple(&[l, g[0]]).unwrap()).unwrap().to_text();
        assert_eq!(text.matches(" sine(").count(), 2, "{text}");
        assert_eq!(text.matches(" exponential(").count(), 2, "{text}");
        assert_eq!(text.matches(" opt-barrier(").count(), 1, "{text}");
    }

    #[test]
    fn dots_in_manual_regions_are_recomputed() {
        let b = Builder::new("manual");
        let (x, w) = (
            param(&b, ElementType::F32, &[2, 3], "x"),
            param(&b, ElementType::F32, &[3, 3], "w"),
        );
        let f: BlockFn = Arc::new(|b: &Builder, i: &[Op]| {
            let d = {
                let _m = b.manual_scope();
                b.dot(i[0], i[1])?
            };
            b.tanh(b.dot(d, i[1])?)
        });
        let y = b
            .checkpoint_with_policy(&[x, w], f, SavePolicy::Dots)
            .unwrap();
        let g = b.grad(b.reduce_sum(y, &[0, 1]).unwrap(), &[x, w]).unwrap();
        let t = b.build(b.tuple(&g).unwrap()).unwrap().to_text();
        // 2 forward dots, the manual one again, 2 transposes each.
        assert_eq!(t.matches(" dot(").count(), 2 + 1 + 4, "{t}");
        // The barrier: x, w, the one saved dot, the cotangent (result and operand).
        let barrier = t.lines().find(|l| l.contains(" opt-barrier(")).unwrap();
        assert_eq!(barrier.matches("f32[").count(), 2 * 4, "{barrier}");
    }

    #[test]
    fn nested_dot_saving_blocks_are_refused() {
        let b = Builder::new("nest");
        let x = param(&b, ElementType::F32, &[2, 2], "x");
        let inner: BlockFn = Arc::new(|b: &Builder, i: &[Op]| b.dot(i[0], i[0]));
        let outer: BlockFn = Arc::new(move |b: &Builder, i: &[Op]| {
            b.checkpoint_with_policy(i, inner.clone(), SavePolicy::Dots)
        });
        let e = b
            .checkpoint_with_policy(&[x], outer, SavePolicy::Dots)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nested inside another one"), "{e}");
        // The tape is cleared: the builder still works.
        assert!(b.dot(x, x).is_ok());
    }
}
