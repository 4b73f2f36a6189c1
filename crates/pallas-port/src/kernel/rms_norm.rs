//! RMS normalisation on the CPU, forward and backward: the model's norms as one kernel pair, so
//! XLA compiles none of their element-wise fusions (a norm's forward, its transposed copy for
//! the next matmul's weight gradient and its backward are ~10 distinct kernels of the train
//! step).
//!
//! For `x [R, D]` (rows of width `D`, normalised over `D`) and `scale` of `S = P·D` elements
//! (`P` ≥ 1: row `r` uses the `D` values at `(r mod P)·D`, as a scale over the last dims of `x`
//! broadcasts), as the HLO lowering (`model::layers::rms_norm`) writes it:
//!
//! ```text
//! inv_r = rsqrt(Σ_j x_rj² · (1/D) + eps)
//! y_rj  = x_rj · inv_r · s_j
//! dx_rj = inv_r · g_rj − x_rj · inv_r³ · (Σ_k g_rk x_rk) / D        g_rj = dy_rj · s_j
//! ds_j  = Σ_r dy_rj · x_rj · inv_r
//! ```
//!
//! Sums over a row and over rows are accumulated in f64 (rows in a fixed order of tasks, so the
//! results do not depend on the thread count); everything else is f32.

use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Checks the lengths of `x` (`rows × d`), `scale` (a multiple of `d`) and the per-row / per-`x`
/// buffers; the error names `op` and the lengths.
fn check(
    op: &str,
    rows: usize,
    d: usize,
    x: usize,
    scale: usize,
    others: &[(&str, usize, usize)],
) -> Result<(), String> {
    if d == 0 || x != rows * d || scale == 0 || !scale.is_multiple_of(d) {
        return Err(format!(
            "{op}: x of {x} elements and scale of {scale} do not fit {rows} rows × width {d} \
             (need {} and a positive multiple of {d})",
            rows * d
        ));
    }
    for &(what, got, want) in others {
        if got != want {
            return Err(format!(
                "{op}: {what} of {got} elements, expected {want} ({rows} rows × width {d})"
            ));
        }
    }
    Ok(())
}

/// Forward: `y [R, D]` and each row's `inv [R]` (the reciprocal RMS, kept for the backward).
/// Errors (naming `rms_norm_fwd` and the lengths) when the slices do not fit `rows × d`.
pub fn rms_norm_fwd(
    rows: usize,
    d: usize,
    eps: f32,
    x: &[f32],
    scale: &[f32],
    y: &mut [f32],
    inv: &mut [f32],
) -> Result<(), String> {
    check(
        "rms_norm_fwd",
        rows,
        d,
        x.len(),
        scale.len(),
        &[("y", y.len(), rows * d), ("inv", inv.len(), rows)],
    )?;
    let period = scale.len() / d;
    let inv_d = 1.0f32 / d as f32;
    y.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(inv.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, (y, inv))| {
            for (i, (y, inv)) in y.chunks_mut(d).zip(inv.iter_mut()).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let xr = &x[r * d..(r + 1) * d];
                let s = &scale[(r % period) * d..][..d];
                let ss: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
                let ir = 1.0 / ((ss as f32) * inv_d + eps).sqrt();
                *inv = ir;
                for ((yj, &xj), &sj) in y.iter_mut().zip(xr).zip(s) {
                    *yj = xj * ir * sj;
                }
            }
        });
    Ok(())
}

/// Backward: `dx [R, D]` and `dscale` (the scale's shape) from the forward's `inv` and the
/// cotangent `dy [R, D]`. Errors (naming `rms_norm_bwd` and the lengths) when the slices do not
/// fit `rows × d`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_bwd(
    rows: usize,
    d: usize,
    x: &[f32],
    scale: &[f32],
    inv: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dscale: &mut [f32],
) -> Result<(), String> {
    check(
        "rms_norm_bwd",
        rows,
        d,
        x.len(),
        scale.len(),
        &[
            ("inv", inv.len(), rows),
            ("dy", dy.len(), rows * d),
            ("dx", dx.len(), rows * d),
            ("dscale", dscale.len(), scale.len()),
        ],
    )?;
    let period = scale.len() / d;
    let inv_d = 1.0f64 / d as f64;
    // Per task: dx of its rows, and its partial dscale (f64), added in task order below.
    let partial: Vec<Vec<f64>> = dx
        .par_chunks_mut(ROWS_PER_TASK * d)
        .enumerate()
        .map(|(task, dx)| {
            let mut ds = vec![0.0f64; scale.len()];
            for (i, dx) in dx.chunks_mut(d).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let (xr, dyr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
                let off = (r % period) * d;
                let s = &scale[off..off + d];
                let ir = inv[r];
                let dot: f64 = dyr
                    .iter()
                    .zip(s)
                    .zip(xr)
                    .map(|((&g, &sj), &xj)| (g * sj) as f64 * xj as f64)
                    .sum();
                let c = (dot * inv_d) as f32 * ir * ir * ir;
                for (j, dxj) in dx.iter_mut().enumerate() {
                    *dxj = ir * (dyr[j] * s[j]) - xr[j] * c;
                    ds[off + j] += (dyr[j] * xr[j] * ir) as f64;
                }
            }
            ds
        })
        .collect();
    for (j, out) in dscale.iter_mut().enumerate() {
        *out = partial.iter().map(|p| p[j]).sum::<f64>() as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bench_util::{data_scaled as values, max_rel};

    /// y, dx and dscale by the naive formulas in f64 (dx by differentiating y·dy directly:
    /// ∂/∂x_i Σ_j dy_j x_j s_j (mean(x²) + eps)^-1/2).
    fn reference(
        d: usize,
        eps: f64,
        x: &[f32],
        s: &[f32],
        dy: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let rows = x.len() / d;
        let period = s.len() / d;
        let (mut y, mut dx, mut ds) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; s.len()]);
        for r in 0..rows {
            let xr: Vec<f64> = x[r * d..][..d].iter().map(|&v| v as f64).collect();
            let sr: Vec<f64> = s[(r % period) * d..][..d]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let ms = xr.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            let a: f64 = (0..d).map(|j| dy[r * d + j] as f64 * sr[j] * xr[j]).sum();
            for j in 0..d {
                y[r * d + j] = xr[j] * inv * sr[j];
                dx[r * d + j] =
                    dy[r * d + j] as f64 * sr[j] * inv - a * inv.powi(3) * xr[j] / d as f64;
                ds[(r % period) * d + j] += dy[r * d + j] as f64 * xr[j] * inv;
            }
        }
        (y, dx, ds)
    }

    #[test]
    fn matches_f64_naive_formula() {
        // 150 rows (not a multiple of the task size), width 40; a scale over one row and a scale
        // over the last two dims (period 3: rows cycle through 3 scale rows).
        for (period, eps) in [(1usize, 1e-6f32), (3, 1e-8)] {
            let (rows, d) = (150, 40);
            let x = values(rows * d, 5, 3.0);
            let s = values(period * d, 6, 2.0);
            let dy = values(rows * d, 7, 1.0);
            let (mut y, mut inv) = (vec![0.0; rows * d], vec![0.0; rows]);
            rms_norm_fwd(rows, d, eps, &x, &s, &mut y, &mut inv).unwrap();
            let (mut dx, mut ds) = (vec![0.0; rows * d], vec![0.0; period * d]);
            rms_norm_bwd(rows, d, &x, &s, &inv, &dy, &mut dx, &mut ds).unwrap();
            let (ry, rdx, rds) = reference(d, eps as f64, &x, &s, &dy);
            let (ey, edx, eds) = (max_rel(&y, &ry), max_rel(&dx, &rdx), max_rel(&ds, &rds));
            println!("period {period}: y {ey:.2e} dx {edx:.2e} dscale {eds:.2e}");
            assert!(
                ey < 1e-6 && edx < 1e-6 && eds < 1e-6,
                "period {period}: {ey} {edx} {eds}"
            );
        }
    }

    #[test]
    fn errors_name_op_and_lengths() {
        let (mut y, mut inv) = (vec![0.0; 8], vec![0.0; 2]);
        let e = rms_norm_fwd(2, 4, 1e-6, &[0.0; 8], &[1.0; 3], &mut y, &mut inv).unwrap_err();
        assert!(
            e.contains("rms_norm_fwd") && e.contains("scale of 3"),
            "{e}"
        );
        let (mut dx, mut ds) = (vec![0.0; 8], vec![0.0; 4]);
        let e = rms_norm_bwd(
            2, 4, &[0.0; 8], &[1.0; 4], &inv, &[0.0; 7], &mut dx, &mut ds,
        )
        .unwrap_err();
        assert!(e.contains("rms_norm_bwd") && e.contains("dy of 7"), "{e}");
    }
}
