//! Rematerialization ([`Builder::checkpoint`], JAX's `jax.checkpoint`): a block whose
//! intermediate values are not kept for the backward pass but computed again there from the
//! block's inputs.

use std::sync::Arc;

use super::VjpRule;
use crate::builder::Builder;
use crate::error::Result;
use crate::Op;

/// A block's forward function, traced again (on fresh inputs) in the backward pass.
pub type BlockFn = Arc<dyn Fn(&Builder, &[Op]) -> Result<Op> + Send + Sync>;

/// The VJP of a checkpointed block: trace the block again on its inputs passed through an
/// `opt-barrier` together with the cotangent (so XLA neither reuses the forward's values nor
/// runs the recomputation before the backward pass needs it), then differentiate the copy.
struct Remat {
    f: BlockFn,
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
        let mut fenced: Vec<Op> = inputs.to_vec();
        fenced.push(ct);
        let t = b.optimization_barrier(b.tuple(&fenced)?)?;
        let again = (0..inputs.len())
            .map(|i| b.get_tuple_element(t, i))
            .collect::<Result<Vec<_>>>()?;
        let ct = b.get_tuple_element(t, inputs.len())?;
        let out = (self.f)(b, &again)?;
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
    pub fn checkpoint(&self, inputs: &[Op], f: BlockFn) -> Result<Op> {
        let out = f(self, inputs)?;
        self.custom_vjp(inputs, out, Arc::new(Remat { f }))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ElementType, Shape};

    #[test]
    fn the_backward_pass_recomputes_the_block_behind_a_barrier() {
        let b = Builder::new("remat");
        let x = b
            .parameter(Shape::array(ElementType::F32, &[3]), "x")
            .unwrap();
        let f: BlockFn = Arc::new(|b: &Builder, i: &[Op]| b.exp(b.sin(i[0])?));
        let y = b.checkpoint(&[x], f).unwrap();
        let l = b.reduce_sum(y, &[0]).unwrap();
        let g = b.grad(l, &[x]).unwrap();
        let text = b.build(b.tuple(&[l, g[0]]).unwrap()).unwrap().to_text();
        assert_eq!(text.matches(" sine(").count(), 2, "{text}");
        assert_eq!(text.matches(" exponential(").count(), 2, "{text}");
        assert_eq!(text.matches(" opt-barrier(").count(), 1, "{text}");
    }
}
