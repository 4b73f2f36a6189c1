//! AdamW with global-norm clipping on the CPU: the train step's optimizer as one kernel, so XLA
//! compiles no element-wise fusions for it (they were ~20 % of the train step's compile time).
//!
//! The arithmetic is the HLO version's (`trainer::step::build_train_step`), operation by
//! operation in f32, with the same constants (each rounded from f64 once):
//!
//! ```text
//! g  = grad · scale                        scale = min(1, clip / (‖grad‖ + 1e-6)), or 1
//! m' = m·β1 + g·(1−β1)
//! v' = v·β2 + (g·g)·(1−β2)
//! u  = (m'/bc1) / (√(v'/bc2) + ε)  [+ p·wd]  bc1 = 1 − β1^t, bc2 = 1 − β2^t (from the graph)
//! p' = p − u·lr
//! ```
//!
//! The global norm is the one thing summed in another order: in f64, over fixed blocks of
//! [`NORM_BLOCK`] elements added in order, so it does not depend on the thread count.

use rayon::prelude::*;

/// Elements per block of the gradient sum of squares (and of the parallel update).
pub const NORM_BLOCK: usize = 1 << 14;

/// The optimizer's constants, each an f32 as the HLO version's constants are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwHyper {
    /// β1.
    pub beta1: f32,
    /// 1 − β1, rounded from f64.
    pub one_minus_beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 − β2, rounded from f64.
    pub one_minus_beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay (for the parameters that decay).
    pub weight_decay: f32,
    /// Global-norm clip; 0 (or less) disables clipping.
    pub clip_norm: f32,
}

impl AdamwHyper {
    /// The constants from f64 settings, rounded as the graph's `scalar(v as f32)` does.
    pub fn from_f64(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        clip_norm: f64,
    ) -> AdamwHyper {
        AdamwHyper {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            clip_norm: clip_norm as f32,
        }
    }

    /// The gradient scale for global norm `gnorm`: `min(1, clip / (gnorm + 1e-6))`, or 1 when
    /// clipping is off.
    pub fn clip_scale(&self, gnorm: f32) -> f32 {
        if self.clip_norm > 0.0 {
            1.0f32.min(self.clip_norm / (gnorm + 1e-6))
        } else {
            1.0
        }
    }
}

/// The step's scalars, computed in the graph: learning rate and both bias corrections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwStep {
    /// Learning rate of the step.
    pub lr: f32,
    /// `1 − β1^t`.
    pub bc1: f32,
    /// `1 − β2^t`.
    pub bc2: f32,
}

/// One parameter's tensors: inputs and the buffers its updated values go to (all equal length).
#[derive(Debug)]
pub struct AdamwTensor<'a> {
    /// Whether decoupled weight decay applies.
    pub decay: bool,
    /// Parameter.
    pub p: &'a [f32],
    /// Gradient.
    pub g: &'a [f32],
    /// First moment.
    pub m: &'a [f32],
    /// Second moment.
    pub v: &'a [f32],
    /// Updated parameter.
    pub p_out: &'a mut [f32],
    /// Updated first moment.
    pub m_out: &'a mut [f32],
    /// Updated second moment.
    pub v_out: &'a mut [f32],
}

/// One parameter's tensors updated in place: the parameter and both moments are read and
/// overwritten (all equal length).
#[derive(Debug)]
pub struct AdamwInPlace<'a> {
    /// Whether decoupled weight decay applies.
    pub decay: bool,
    /// Gradient.
    pub g: &'a [f32],
    /// Parameter, replaced by its update.
    pub p: &'a mut [f32],
    /// First moment, replaced by its update.
    pub m: &'a mut [f32],
    /// Second moment, replaced by its update.
    pub v: &'a mut [f32],
}

/// Σ g² over every gradient, in f64: blocks of [`NORM_BLOCK`] summed in parallel, the block
/// sums added in order (deterministic for any thread count).
pub fn grad_sum_squares(grads: &[&[f32]]) -> f64 {
    let blocks: Vec<&[f32]> = grads.iter().flat_map(|g| g.chunks(NORM_BLOCK)).collect();
    let sums: Vec<f64> = blocks
        .par_iter()
        .map(|b| b.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .collect();
    sums.iter().sum()
}

/// Σ x² in f64 over eight interleaved partial sums (so the loop vectorizes), added at the end.
fn sum_squares_lanes(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v as f64) * (v as f64);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += (v as f64) * (v as f64);
    }
    acc.iter().sum()
}

/// The part of a tensor of `len` elements that replica `k` of `r` identical copies sums in a
/// sharded norm: the k-th of r contiguous ranges of ⌈len / r⌉ elements (the last shorter or
/// empty), so the r copies together count every element once.
pub fn replica_range(len: usize, k: usize, r: usize) -> std::ops::Range<usize> {
    let c = len.div_ceil(r.max(1));
    (k * c).min(len)..((k + 1) * c).min(len)
}

/// Per tensor, Σ g² in f64 over its [`replica_range`] `(k, r)` (`shares[i]`): the partial sums
/// of one device of a mesh, where `r` devices hold identical copies of a gradient piece and
/// this one is copy `k`. Blocks of [`NORM_BLOCK`] summed in parallel (eight lanes each).
pub fn grad_sum_squares_shared(grads: &[&[f32]], shares: &[(usize, usize)]) -> Vec<f64> {
    let blocks: Vec<(usize, &[f32])> = grads
        .iter()
        .zip(shares)
        .enumerate()
        .flat_map(|(i, (g, &(k, r)))| {
            g[replica_range(g.len(), k, r)]
                .chunks(NORM_BLOCK)
                .map(move |b| (i, b))
        })
        .collect();
    let sums: Vec<(usize, f64)> = blocks
        .par_iter()
        .map(|&(i, b)| (i, sum_squares_lanes(b)))
        .collect();
    let mut out = vec![0.0f64; grads.len()];
    for (i, s) in sums {
        out[i] += s;
    }
    out
}

/// The update of one element: `(p', m', v')` (the HLO version's operations, in its order).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn update_element(
    h: &AdamwHyper,
    s: &AdamwStep,
    scale: f32,
    wd: bool,
    p: f32,
    g: f32,
    m: f32,
    v: f32,
) -> (f32, f32, f32) {
    let g = g * scale;
    let m1 = m * h.beta1 + g * h.one_minus_beta1;
    let v1 = v * h.beta2 + (g * g) * h.one_minus_beta2;
    let mhat = m1 / s.bc1;
    let vhat = v1 / s.bc2;
    let mut upd = mhat / (vhat.sqrt() + h.eps);
    if wd {
        upd += p * h.weight_decay;
    }
    (p - upd * s.lr, m1, v1)
}

/// The update of one block of elements.
#[allow(clippy::too_many_arguments)]
fn update_block(
    h: &AdamwHyper,
    s: &AdamwStep,
    scale: f32,
    decay: bool,
    (p, g, m, v): (&[f32], &[f32], &[f32], &[f32]),
    p_out: &mut [f32],
    m_out: &mut [f32],
    v_out: &mut [f32],
) {
    let wd = decay && h.weight_decay > 0.0;
    let outs = p_out.iter_mut().zip(m_out.iter_mut()).zip(v_out.iter_mut());
    for ((((po, mo), vo), &p), ((&g, &m), &v)) in outs.zip(p).zip(g.iter().zip(m).zip(v)) {
        (*po, *mo, *vo) = update_element(h, s, scale, wd, p, g, m, v);
    }
}

/// The update of one block of elements in place.
fn update_block_in_place(
    h: &AdamwHyper,
    s: &AdamwStep,
    scale: f32,
    decay: bool,
    g: &[f32],
    (p, m, v): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let wd = decay && h.weight_decay > 0.0;
    // Zipped (no bounds checks), so the loop vectorizes; the operations per element are
    // unchanged.
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        (*p, *m, *v) = update_element(h, s, scale, wd, *p, g, *m, *v);
    }
}

/// Checks that every tensor's seven slices have one length; the error names the parameter.
fn check(tensors: &[AdamwTensor<'_>]) -> Result<(), String> {
    for (i, t) in tensors.iter().enumerate() {
        let n = t.p.len();
        let lens = [
            t.g.len(),
            t.m.len(),
            t.v.len(),
            t.p_out.len(),
            t.m_out.len(),
            t.v_out.len(),
        ];
        if lens.iter().any(|&l| l != n) {
            return Err(format!(
                "adamw: parameter {i}: p has {n} elements but g, m, v, p', m', v' have {lens:?}"
            ));
        }
    }
    Ok(())
}

/// AdamW over every parameter: computes the global gradient norm, clips by it, updates the
/// parameters and both moments into the `*_out` buffers; returns the norm (before clipping),
/// `√(Σ g²)` rounded to f32 then square-rooted in f32 as the graph does.
pub fn adamw(
    h: &AdamwHyper,
    s: &AdamwStep,
    tensors: &mut [AdamwTensor<'_>],
) -> Result<f32, String> {
    check(tensors)?;
    let grads: Vec<&[f32]> = tensors.iter().map(|t| t.g).collect();
    let gnorm = (grad_sum_squares(&grads) as f32).sqrt();
    let scale = h.clip_scale(gnorm);
    let mut blocks = Vec::new();
    for t in tensors.iter_mut() {
        let ins =
            t.p.chunks(NORM_BLOCK)
                .zip(t.g.chunks(NORM_BLOCK))
                .zip(t.m.chunks(NORM_BLOCK))
                .zip(t.v.chunks(NORM_BLOCK));
        let outs = t
            .p_out
            .chunks_mut(NORM_BLOCK)
            .zip(t.m_out.chunks_mut(NORM_BLOCK))
            .zip(t.v_out.chunks_mut(NORM_BLOCK));
        for ((((p, g), m), v), ((po, mo), vo)) in ins.zip(outs) {
            blocks.push((t.decay, (p, g, m, v), po, mo, vo));
        }
    }
    blocks
        .into_par_iter()
        .for_each(|(decay, ins, po, mo, vo)| update_block(h, s, scale, decay, ins, po, mo, vo));
    Ok(gnorm)
}

/// [`adamw`] updating the parameters and moments in place (the same arithmetic, bit for bit):
/// for the custom call whose results alias its operands. Returns the norm before clipping.
pub fn adamw_in_place(
    h: &AdamwHyper,
    s: &AdamwStep,
    tensors: &mut [AdamwInPlace<'_>],
) -> Result<f32, String> {
    // The norm reads only the gradients; the update below checks every length before it
    // writes anything.
    let grads: Vec<&[f32]> = tensors.iter().map(|t| t.g).collect();
    let gnorm = (grad_sum_squares(&grads) as f32).sqrt();
    adamw_in_place_with_norm(h, s, gnorm, tensors)?;
    Ok(gnorm)
}

/// [`adamw_in_place`] with the global gradient norm given (computed elsewhere, e.g. from the
/// partial sums of every device of a mesh, [`grad_sum_squares_shared`]): clips by `gnorm` and
/// updates the parameters and both moments in place, the same arithmetic per element.
pub fn adamw_in_place_with_norm(
    h: &AdamwHyper,
    s: &AdamwStep,
    gnorm: f32,
    tensors: &mut [AdamwInPlace<'_>],
) -> Result<(), String> {
    for (i, t) in tensors.iter().enumerate() {
        let n = t.p.len();
        let lens = [t.g.len(), t.m.len(), t.v.len()];
        if lens.iter().any(|&l| l != n) {
            return Err(format!(
                "adamw: parameter {i}: p has {n} elements but g, m, v have {lens:?}"
            ));
        }
    }
    let scale = h.clip_scale(gnorm);
    let mut blocks = Vec::new();
    for t in tensors.iter_mut() {
        let state =
            t.p.chunks_mut(NORM_BLOCK)
                .zip(t.m.chunks_mut(NORM_BLOCK))
                .zip(t.v.chunks_mut(NORM_BLOCK));
        for (g, ((p, m), v)) in t.g.chunks(NORM_BLOCK).zip(state) {
            blocks.push((t.decay, g, (p, m, v)));
        }
    }
    blocks
        .into_par_iter()
        .for_each(|(decay, g, pmv)| update_block_in_place(h, s, scale, decay, g, pmv));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream in [-1, 1).
    fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f64 / (1u64 << 23) as f64 - 1.0) as f32
            })
            .collect()
    }

    /// Runs [`adamw`] on parameters, gradients and moments `[p, g, m, v]` into NaN-filled
    /// outputs; returns each parameter's `[p', m', v']` and the global gradient norm.
    fn out_of_place(
        h: &AdamwHyper,
        s: &AdamwStep,
        decay: &[bool],
        [p, g, m, v]: [&[Vec<f32>]; 4],
    ) -> (Vec<[Vec<f32>; 3]>, f32) {
        let mut outs: Vec<[Vec<f32>; 3]> = p
            .iter()
            .map(|t| {
                [
                    vec![f32::NAN; t.len()],
                    vec![f32::NAN; t.len()],
                    vec![f32::NAN; t.len()],
                ]
            })
            .collect();
        let mut tensors: Vec<AdamwTensor<'_>> = outs
            .iter_mut()
            .enumerate()
            .map(|(i, [po, mo, vo])| AdamwTensor {
                decay: decay[i],
                p: &p[i],
                g: &g[i],
                m: &m[i],
                v: &v[i],
                p_out: po,
                m_out: mo,
                v_out: vo,
            })
            .collect();
        let norm = adamw(h, s, &mut tensors).unwrap();
        (outs, norm)
    }

    /// Per parameter: updated values, first and second moments; and the global norm.
    type Reference = (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<Vec<f64>>, f64);

    /// AdamW in f64, written from the formula (bias corrections from β and the step here).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        (b1, b2, eps, wd, clip): (f64, f64, f64, f64, f64),
        lr: f64,
        t: f64,
        decay: &[bool],
        p: &[Vec<f32>],
        g: &[Vec<f32>],
        m: &[Vec<f32>],
        v: &[Vec<f32>],
    ) -> Reference {
        let norm = g
            .iter()
            .flatten()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = if clip > 0.0 {
            (clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        let (mut po, mut mo, mut vo) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..p.len() {
            let (mut pp, mut mm, mut vv) = (Vec::new(), Vec::new(), Vec::new());
            for j in 0..p[i].len() {
                let gj = g[i][j] as f64 * scale;
                let m1 = b1 * m[i][j] as f64 + (1.0 - b1) * gj;
                let v1 = b2 * v[i][j] as f64 + (1.0 - b2) * gj * gj;
                let mut u = (m1 / bc1) / ((v1 / bc2).sqrt() + eps);
                if decay[i] {
                    u += wd * p[i][j] as f64;
                }
                pp.push(p[i][j] as f64 - lr * u);
                mm.push(m1);
                vv.push(v1);
            }
            po.push(pp);
            mo.push(mm);
            vo.push(vv);
        }
        (po, mo, vo, norm)
    }

    fn run_case(clip: f64, grad_scale: f32, sizes: &[usize]) {
        let (b1, b2, eps, wd, lr, t) = (0.9, 0.95, 1e-8, 0.1, 3e-3, 7.0);
        let decay: Vec<bool> = (0..sizes.len()).map(|i| i % 2 == 0).collect();
        let p: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| noise(i as u64 + 1, n))
            .collect();
        let g: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                noise(i as u64 + 100, n)
                    .into_iter()
                    .map(|x| x * grad_scale)
                    .collect()
            })
            .collect();
        let m: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| noise(i as u64 + 200, n).iter().map(|x| x * 0.1).collect())
            .collect();
        let v: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                noise(i as u64 + 300, n)
                    .iter()
                    .map(|x| x * x * 0.01)
                    .collect()
            })
            .collect();
        let h = AdamwHyper::from_f64(b1, b2, eps, wd, clip);
        let s = AdamwStep {
            lr: lr as f32,
            bc1: (1.0 - b1.powf(t)) as f32,
            bc2: (1.0 - b2.powf(t)) as f32,
        };
        let (outs, gnorm) = out_of_place(&h, &s, &decay, [&p, &g, &m, &v]);
        let (rp, rm, rv, rnorm) = reference((b1, b2, eps, wd, clip), lr, t, &decay, &p, &g, &m, &v);
        assert!(
            ((gnorm as f64) - rnorm).abs() <= 1e-6 * rnorm,
            "norm {gnorm} vs {rnorm}"
        );
        let close = |what: &str, got: f32, want: f64, scale: f64| {
            assert!(
                (got as f64 - want).abs() <= 2e-6 * scale,
                "{what}: {got} vs {want} (scale {scale})"
            );
        };
        for i in 0..sizes.len() {
            for j in 0..sizes[i] {
                let [po, mo, vo] = &outs[i];
                // m' may cancel: its rounding is relative to its terms.
                close(
                    "m'",
                    mo[j],
                    rm[i][j],
                    (m[i][j].abs() + g[i][j].abs()) as f64,
                );
                close("v'", vo[j], rv[i][j], rv[i][j].abs().max(1e-30));
                // The update is lr·O(1); its rounding is relative to lr, the parameter's to |p|.
                close("p'", po[j], rp[i][j], rp[i][j].abs() + lr);
            }
        }
    }

    #[test]
    fn matches_an_f64_adamw_with_clipping() {
        // Gradients large enough that the norm clips (scale < 1), across block boundaries.
        run_case(1.0, 0.5, &[3, NORM_BLOCK + 5, 256, 1]);
    }

    #[test]
    fn matches_an_f64_adamw_without_clipping() {
        run_case(0.0, 0.5, &[NORM_BLOCK * 2, 17]);
        // Clip on but norm below it: scale 1.
        run_case(1e6, 1e-3, &[1000, 10]);
    }

    #[test]
    fn in_place_matches_out_of_place_bit_for_bit() {
        let sizes = [NORM_BLOCK + 3, 7, 100];
        let (h, s) = (
            AdamwHyper::from_f64(0.9, 0.95, 1e-8, 0.1, 1.0),
            AdamwStep {
                lr: 3e-3,
                bc1: 0.3,
                bc2: 0.05,
            },
        );
        let vecs = |seed: u64, k: f32| -> Vec<Vec<f32>> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| noise(seed + i as u64, n).iter().map(|x| x * k).collect())
                .collect()
        };
        let (p, g, m) = (vecs(1, 1.0), vecs(10, 0.5), vecs(20, 0.1));
        let v: Vec<Vec<f32>> = vecs(30, 0.1)
            .into_iter()
            .map(|t| t.iter().map(|x| x * x).collect())
            .collect();
        let decay: Vec<bool> = (0..sizes.len()).map(|i| i != 1).collect();
        let (outs, norm) = out_of_place(&h, &s, &decay, [&p, &g, &m, &v]);
        let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
        let mut state: Vec<AdamwInPlace<'_>> = p2
            .iter_mut()
            .zip(m2.iter_mut())
            .zip(v2.iter_mut())
            .enumerate()
            .map(|(i, ((p, m), v))| AdamwInPlace {
                decay: i != 1,
                g: &g[i],
                p,
                m,
                v,
            })
            .collect();
        let norm2 = adamw_in_place(&h, &s, &mut state).unwrap();
        assert_eq!(norm.to_bits(), norm2.to_bits());
        let bits = |t: &[f32]| t.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (i, [po, mo, vo]) in outs.iter().enumerate() {
            assert_eq!(bits(po), bits(&p2[i]), "p' of parameter {i}");
            assert_eq!(bits(mo), bits(&m2[i]), "m' of parameter {i}");
            assert_eq!(bits(vo), bits(&v2[i]), "v' of parameter {i}");
            assert_ne!(bits(po), bits(&p[i]), "parameter {i} did not change");
        }
    }

    #[test]
    fn the_norm_does_not_depend_on_the_thread_count() {
        let g = noise(9, 3 * NORM_BLOCK + 11);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| grad_sum_squares(&[&g, &g[..5]]));
        let many = grad_sum_squares(&[&g, &g[..5]]);
        assert_eq!(one.to_bits(), many.to_bits());
    }

    #[test]
    fn the_zipped_loop_is_the_indexed_one_bit_for_bit() {
        let (h, s) = (
            AdamwHyper::from_f64(0.9, 0.95, 1e-8, 0.1, 1.0),
            AdamwStep {
                lr: 3e-3,
                bc1: 0.3,
                bc2: 0.05,
            },
        );
        let n = 1003;
        let (p, g, m) = (noise(1, n), noise(2, n), noise(3, n));
        let v: Vec<f32> = noise(4, n).iter().map(|x| x * x).collect();
        let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
        update_block_in_place(&h, &s, 0.7, true, &g, (&mut p2, &mut m2, &mut v2));
        for i in 0..n {
            let want = update_element(&h, &s, 0.7, true, p[i], g[i], m[i], v[i]);
            let got = (p2[i], m2[i], v2[i]);
            assert_eq!(
                [got.0.to_bits(), got.1.to_bits(), got.2.to_bits()],
                [want.0.to_bits(), want.1.to_bits(), want.2.to_bits()],
                "element {i}"
            );
        }
    }

    #[test]
    fn replica_shares_count_every_element_once() {
        let g = noise(5, NORM_BLOCK + 13);
        let f64_sum = |g: &[f32]| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let want = f64_sum(&g);
        for r in [1, 2, 3, 8] {
            let total: f64 = (0..r)
                .map(|k| grad_sum_squares_shared(&[&g, &g[..5]], &[(k, r), (k, r)]))
                .map(|s| s[0] + s[1])
                .sum();
            let want = want + f64_sum(&g[..5]);
            assert!(
                (total - want).abs() <= 1e-12 * want,
                "r {r}: {total} vs {want}"
            );
        }
        assert_eq!(replica_range(5, 3, 4), 5..5);
        assert_eq!(replica_range(5, 1, 4), 2..4);
    }

    #[test]
    fn mismatched_lengths_name_the_parameter() {
        let (p, g) = (vec![0.0; 4], vec![0.0; 3]);
        let (mut a, mut b, mut c) = (vec![0.0; 4], vec![0.0; 4], vec![0.0; 4]);
        let mut t = [AdamwTensor {
            decay: false,
            p: &p,
            g: &g,
            m: &p,
            v: &p,
            p_out: &mut a,
            m_out: &mut b,
            v_out: &mut c,
        }];
        let h = AdamwHyper::from_f64(0.9, 0.95, 1e-8, 0.0, 1.0);
        let s = AdamwStep {
            lr: 1.0,
            bc1: 1.0,
            bc2: 1.0,
        };
        let e = adamw(&h, &s, &mut t).unwrap_err();
        assert!(
            e.contains("parameter 0") && e.contains("[3, 4, 4, 4, 4, 4]"),
            "{e}"
        );
    }
}
