//! Fused fp32 feature map φ and its VJP, written so the compiler vectorises them.

use crate::config::FeatureMap;

/// exp(x) for x ≤ 88 (inputs below −87 are clamped, giving ~1e−38 instead of a smaller value).
/// Range reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-7 Taylor polynomial
/// (relative error ≈ 5e−9 before fp32 rounding). Branch-free so loops over it vectorise.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
                                     // Branch-free clamp (no NaN special-casing so it maps to plain min/max instructions).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    // t = round(x·log2 e) + 1.5·2^23: its low mantissa bits hold the integer n.
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    p * scale
}

/// (max, min) of `x` with explicit SIMD max/min (the compiler's own vectorisation of a scalar
/// compare-and-select loop produced slow mask shuffling).
#[inline(always)]
pub(crate) fn max_min<S: pulp::Simd>(simd: S, x: &[f32]) -> (f32, f32) {
    let (head, tail) = S::as_simd_f32s(x);
    let mut mx = simd.splat_f32s(f32::NEG_INFINITY);
    let mut mn = simd.splat_f32s(f32::INFINITY);
    for &v in head {
        mx = simd.max_f32s(mx, v);
        mn = simd.min_f32s(mn, v);
    }
    let (mut m, mut n) = (simd.reduce_max_f32s(mx), simd.reduce_min_f32s(mn));
    for &v in tail {
        m = m.max(v);
        n = n.min(v);
    }
    (m, n)
}

#[inline(always)]
pub(crate) fn sum<S: pulp::Simd>(simd: S, x: &[f32]) -> f32 {
    let (head, tail) = S::as_simd_f32s(x);
    let mut acc = simd.splat_f32s(0.0);
    for &v in head {
        acc = simd.add_f32s(acc, v);
    }
    simd.reduce_sum_f32s(acc) + tail.iter().sum::<f32>()
}

#[inline(always)]
fn dot<S: pulp::Simd>(simd: S, x: &[f32], y: &[f32]) -> f32 {
    let (hx, tx) = S::as_simd_f32s(x);
    let (hy, ty) = S::as_simd_f32s(y);
    let mut acc = simd.splat_f32s(0.0);
    for (&a, &b) in hx.iter().zip(hy) {
        acc = simd.mul_add_f32s(a, b, acc);
    }
    simd.reduce_sum_f32s(acc) + tx.iter().zip(ty).map(|(a, b)| a * b).sum::<f32>()
}

/// `x *= s` for every element.
#[inline(always)]
pub(crate) fn scale<S: pulp::Simd>(simd: S, x: &mut [f32], s: f32) {
    let (head, tail) = S::as_mut_simd_f32s(x);
    let sv = simd.splat_f32s(s);
    for v in head {
        *v = simd.mul_f32s(*v, sv);
    }
    for v in tail {
        *v *= s;
    }
}

/// φ of one row: `x` has H values, `out` gets 2H.
#[inline(always)]
fn phi_row<S: pulp::Simd>(simd: S, fm: FeatureMap, x: &[f32], out: &mut [f32]) {
    let h = x.len();
    let (pos, neg) = out[..2 * h].split_at_mut(h);
    match fm {
        FeatureMap::Softmax => {
            let (mx, mn) = max_min(simd, x);
            for (o, &v) in pos.iter_mut().zip(x) {
                *o = fast_exp(v - mx);
            }
            for (o, &v) in neg.iter_mut().zip(x) {
                *o = fast_exp(mn - v);
            }
            let sp = 1.0 / sum(simd, pos);
            let sn = 1.0 / sum(simd, neg);
            scale(simd, pos, sp);
            scale(simd, neg, sn);
        }
        FeatureMap::Relu => {
            for ((p, n), &v) in pos.iter_mut().zip(neg.iter_mut()).zip(x) {
                *p = v.max(0.0);
                *n = (-v).max(0.0);
            }
        }
    }
}

/// φ of `rows` rows of H values taken from `src` with row stride `stride`, into `dst` `[rows, 2H]`.
/// Runs with AVX2/FMA code generation where the CPU has it (runtime dispatch through `pulp`).
pub(crate) fn phi_rows(
    fm: FeatureMap,
    src: &[f32],
    stride: usize,
    rows: usize,
    h: usize,
    dst: &mut [f32],
) {
    struct Op<'a> {
        fm: FeatureMap,
        src: &'a [f32],
        stride: usize,
        rows: usize,
        h: usize,
        dst: &'a mut [f32],
    }
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) {
            let Op {
                fm,
                src,
                stride,
                rows,
                h,
                dst,
            } = self;
            for (r, out) in dst.chunks_exact_mut(2 * h).take(rows).enumerate() {
                phi_row(simd, fm, &src[r * stride..r * stride + h], out);
            }
        }
    }
    pulp::Arch::new().dispatch(Op {
        fm,
        src,
        stride,
        rows,
        h,
        dst,
    });
}

/// VJP of φ for `rows` rows: `y`, `dy` `[rows, 2H]` (contiguous), `dx` `[rows, H]` (contiguous).
pub(crate) fn phi_vjp_rows(
    fm: FeatureMap,
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    rows: usize,
    h: usize,
) {
    struct Op<'a> {
        fm: FeatureMap,
        y: &'a [f32],
        dy: &'a [f32],
        dx: &'a mut [f32],
        rows: usize,
        h: usize,
    }
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) {
            let Op {
                fm,
                y,
                dy,
                dx,
                rows,
                h,
            } = self;
            for (m, dxr) in dx.chunks_exact_mut(h).take(rows).enumerate() {
                phi_vjp_row(
                    simd,
                    fm,
                    &y[m * 2 * h..(m + 1) * 2 * h],
                    &dy[m * 2 * h..(m + 1) * 2 * h],
                    dxr,
                );
            }
        }
    }
    pulp::Arch::new().dispatch(Op {
        fm,
        y,
        dy,
        dx,
        rows,
        h,
    });
}

/// VJP of φ for one row given its output `y` (2H) and cotangent `dy` (2H): writes dx (H).
/// softmax half: y ⊙ (dy − ⟨dy, y⟩), the second half negated; relu: the mask of each half.
#[inline(always)]
fn phi_vjp_row<S: pulp::Simd>(simd: S, fm: FeatureMap, y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let h = dx.len();
    let (y1, y2) = y[..2 * h].split_at(h);
    let (d1, d2) = dy[..2 * h].split_at(h);
    match fm {
        FeatureMap::Softmax => {
            let c1 = dot(simd, y1, d1);
            let c2 = dot(simd, y2, d2);
            for i in 0..h {
                dx[i] = y1[i] * (d1[i] - c1) - y2[i] * (d2[i] - c2);
            }
        }
        FeatureMap::Relu => {
            for i in 0..h {
                let a = if y1[i] > 0.0 { d1[i] } else { 0.0 };
                let b = if y2[i] > 0.0 { d2[i] } else { 0.0 };
                dx[i] = a - b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let e = fast_exp(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max(((e - r) / r).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
    }
}
