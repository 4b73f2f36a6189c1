//! The feature map φ as graph ops: the one definition the HLO lowering ([`crate::hlo`]), the
//! decode step ([`crate::decode`]) and the model use.
//!
//! ```
//! use hlo_builder::{Builder, ElementType, Shape};
//! use pallas_port::{feature_map, FeatureMap};
//! let b = Builder::new("phi");
//! let x = b.parameter(Shape::array(ElementType::F32, &[2, 3, 8]), "x")?;
//! let fx = feature_map(&b, x, FeatureMap::Softmax)?;
//! assert_eq!(b.shape(fx)?.dims(), &[2, 3, 16]);
//! # Ok::<(), hlo_builder::Error>(())
//! ```

use hlo_builder::{Builder, Cmp, ElementType, Op, Result};

use crate::config::FeatureMap;

const F32: ElementType = ElementType::F32;

/// Broadcasts a reduction over the last dim back to `dims`.
fn bcast_last(b: &Builder, red: Op, dims: &[i64]) -> Result<Op> {
    let keep: Vec<i64> = (0..dims.len() as i64 - 1).collect();
    b.broadcast_in_dim(red, dims, &keep)
}

/// φ over the last dim, `[..., H]` → `[..., 2H]` in f32: `[softmax(x), softmax(−x)]`
/// (max-subtracted) or `[relu(x), relu(−x)]`.
///
/// `x` may be f32 or bf16 (converted to f32 first; an f32 input adds no op). The f64 twin is
/// [`crate::reference::feature`].
pub fn feature_map(b: &Builder, x: Op, fm: FeatureMap) -> Result<Op> {
    let x = if b.shape(x)?.ty() == Some(F32) {
        x
    } else {
        b.convert(x, F32)?
    };
    let last = b.shape(x)?.rank() as i64 - 1;
    let nx = b.neg(x)?;
    let (p, n) = match fm {
        FeatureMap::Softmax => (b.softmax(x, -1)?, b.softmax(nx, -1)?),
        FeatureMap::Relu => {
            let zero = b.zeros(F32, b.shape(x)?.dims())?;
            (b.max(x, zero)?, b.max(nx, zero)?)
        }
    };
    b.concatenate(&[p, n], last)
}

/// VJP of [`feature_map`] at f32 `x` (`[..., H]`) for the cotangent `dy` (`[..., 2H]`): the
/// softmax Jacobian-vector product `y ⊙ (dy − ⟨dy, y⟩)` per half (second half negated), or the
/// relu masks.
pub(crate) fn feature_map_vjp(b: &Builder, x: Op, dy: Op, fm: FeatureMap) -> Result<Op> {
    let dims = b.shape(x)?.dims().to_vec();
    let last = dims.len() - 1;
    let h = dims[last];
    let dy1 = b.slice_in_dim(dy, 0, h, last)?;
    let dy2 = b.slice_in_dim(dy, h, 2 * h, last)?;
    match fm {
        FeatureMap::Softmax => {
            let half = |xs: Op, dys: Op| -> Result<Op> {
                let y = b.softmax(xs, -1)?;
                let dot = bcast_last(b, b.reduce_sum(b.mul(y, dys)?, &[last as i64])?, &dims)?;
                b.mul(y, b.sub(dys, dot)?)
            };
            let g1 = half(x, dy1)?;
            let g2 = half(b.neg(x)?, dy2)?;
            b.sub(g1, g2)
        }
        FeatureMap::Relu => {
            let zero = b.zeros(F32, &dims)?;
            let pos = b.select(b.compare(x, zero, Cmp::Gt)?, dy1, zero)?;
            let neg = b.select(b.compare(x, zero, Cmp::Lt)?, dy2, zero)?;
            b.sub(pos, neg)
        }
    }
}
