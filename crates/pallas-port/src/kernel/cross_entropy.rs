//! Weighted mean softmax cross-entropy on the CPU, forward and backward: the train step's loss
//! as one kernel pair, so XLA compiles none of its element-wise and reduction fusions (the
//! logsumexp, the target pick, `softmax − onehot`; ~10 distinct kernels of the train step).
//!
//! For `logits [R, V]`, `targets` (ids read through [`Columns`], one per row; one outside
//! `[0, V)` picks nothing, as a one-hot row of zeros does) and `weights [R]`, as the HLO lowering
//! (`model::layers::cross_entropy`) writes it:
//!
//! ```text
//! lse_r = log Σ_j exp(x_rj − m_r) + m_r          m_r = max_j x_rj
//! loss  = Σ_r w_r · (lse_r − x_r,t_r) / max(Σ_r w_r, 1)
//! dx_rj = g · w_r / max(Σ w, 1) · (exp(x_rj − lse_r) − [j = t_r])      g = ∂L/∂loss
//! ```
//!
//! Each row's exponential sum and the sums over rows are accumulated in f64 (rows in a fixed
//! order, so the loss does not depend on the thread count); everything else is f32.

use super::embed::Columns;
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Checks the slice lengths of `rows × vocab` logits and their per-row operands; the error names
/// `op` and the lengths.
fn check(
    op: &str,
    rows: usize,
    vocab: usize,
    logits: usize,
    (targets, cols): (usize, Columns),
    weights: usize,
) -> Result<(), String> {
    if vocab == 0 || logits != rows * vocab || weights != rows {
        return Err(format!(
            "{op}: logits of {logits} elements and weights of {weights} do not fit {rows} rows × \
             vocab {vocab} (need {} / {rows}, vocab ≥ 1)",
            rows * vocab
        ));
    }
    cols.check(op, rows, targets)
}

/// The target column of `t` in a vocabulary of `vocab`, `None` when out of range.
fn column(t: i32, vocab: usize) -> Option<usize> {
    usize::try_from(t).ok().filter(|&c| c < vocab)
}

/// `max(Σ w, 1)` in f64 (rows in order), rounded to f32 as the HLO's f32 division sees it.
fn count(weights: &[f32]) -> f32 {
    (weights.iter().map(|&w| w as f64).sum::<f64>() as f32).max(1.0)
}

/// Forward: writes each row's logsumexp to `lse [R]` and returns the weighted mean loss; row
/// `r`'s target is `targets[cols.index(r)]`. Errors (naming `xent_fwd` and the lengths) when the
/// slices do not fit `rows × vocab`.
pub fn xent_fwd(
    rows: usize,
    vocab: usize,
    logits: &[f32],
    (targets, cols): (&[i32], Columns),
    weights: &[f32],
    lse: &mut [f32],
) -> Result<f32, String> {
    check(
        "xent_fwd",
        rows,
        vocab,
        logits.len(),
        (targets.len(), cols),
        weights.len(),
    )?;
    if lse.len() != rows {
        return Err(format!(
            "xent_fwd: lse of {} elements for {rows} rows",
            lse.len()
        ));
    }
    // Per-task partial sums of w·nll, added in task order below.
    let partial: Vec<f64> = lse
        .par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .map(|(task, lse)| {
            let mut total = 0.0f64;
            for (i, l) in lse.iter_mut().enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let x = &logits[r * vocab..(r + 1) * vocab];
                let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s: f64 = x.iter().map(|&v| (v - m).exp() as f64).sum();
                *l = (s as f32).ln() + m;
                let picked = column(targets[cols.index(r)], vocab).map_or(0.0, |c| x[c]);
                total += ((*l - picked) * weights[r]) as f64;
            }
            total
        })
        .collect();
    Ok((partial.iter().sum::<f64>() as f32) / count(weights))
}

/// Backward: `d_logits [R, V]` from the forward's `lse` and the loss cotangent `g` (targets as
/// in [`xent_fwd`]). Errors (naming `xent_bwd` and the lengths) when the slices do not fit `rows
/// × vocab`.
#[allow(clippy::too_many_arguments)]
pub fn xent_bwd(
    rows: usize,
    vocab: usize,
    logits: &[f32],
    (targets, cols): (&[i32], Columns),
    weights: &[f32],
    lse: &[f32],
    g: f32,
    d_logits: &mut [f32],
) -> Result<(), String> {
    check(
        "xent_bwd",
        rows,
        vocab,
        logits.len(),
        (targets.len(), cols),
        weights.len(),
    )?;
    if lse.len() != rows || d_logits.len() != rows * vocab {
        return Err(format!(
            "xent_bwd: lse of {} and d_logits of {} elements for {rows} rows × vocab {vocab}",
            lse.len(),
            d_logits.len()
        ));
    }
    let scale = g / count(weights);
    d_logits
        .par_chunks_mut(ROWS_PER_TASK * vocab)
        .enumerate()
        .for_each(|(task, d)| {
            for (i, d) in d.chunks_mut(vocab).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let x = &logits[r * vocab..(r + 1) * vocab];
                let gr = scale * weights[r];
                for (dj, &xj) in d.iter_mut().zip(x) {
                    *dj = gr * (xj - lse[r]).exp();
                }
                if let Some(c) = column(targets[cols.index(r)], vocab) {
                    d[c] -= gr;
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bench_util::{data_scaled as values, max_rel};

    /// The loss and its gradient by the naive formulas in f64.
    fn reference(
        vocab: usize,
        x: &[f32],
        t: &[i32],
        w: &[f32],
        g: f64,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let rows = t.len();
        let wsum: f64 = w.iter().map(|&v| v as f64).sum::<f64>().max(1.0);
        let (mut loss, mut lses, mut d) = (0.0, vec![0.0; rows], vec![0.0; rows * vocab]);
        for r in 0..rows {
            let row: Vec<f64> = x[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            let lse = z.ln();
            lses[r] = lse;
            let tc = usize::try_from(t[r]).ok().filter(|&c| c < vocab);
            let picked = tc.map_or(0.0, |c| row[c]);
            loss += w[r] as f64 * (lse - picked) / wsum;
            for j in 0..vocab {
                let onehot = if Some(j) == tc { 1.0 } else { 0.0 };
                d[r * vocab + j] = g * w[r] as f64 / wsum * (row[j].exp() / z - onehot);
            }
        }
        (loss, lses, d)
    }

    #[test]
    fn matches_f64_naive_formula() {
        // 150 rows (not a multiple of the task size), vocab 37; large logits test the max shift;
        // targets include out-of-range ids (-1, vocab) that pick nothing; weights 0, 1 and 0.5.
        let (rows, vocab) = (150, 37);
        let x: Vec<f32> = values(rows * vocab, 3, 30.0);
        let t: Vec<i32> = (0..rows)
            .map(|r| match r % 23 {
                5 => -1,
                11 => vocab as i32,
                _ => ((r * 7) % vocab) as i32,
            })
            .collect();
        let w: Vec<f32> = (0..rows).map(|r| [1.0, 0.0, 0.5][r % 3]).collect();
        let mut lse = vec![0.0; rows];
        // The targets in columns 1..=rows of an id array with one more column (a shifted
        // token array); the first column holds ids that must not be read.
        let shifted: Vec<i32> = [vec![-7], t.clone()].concat();
        let cols = Columns {
            t: rows,
            stride: rows + 1,
            offset: 1,
        };
        let loss = xent_fwd(rows, vocab, &x, (&shifted, cols), &w, &mut lse).unwrap();
        let g = 0.75;
        let mut d = vec![0.0; rows * vocab];
        xent_bwd(rows, vocab, &x, (&shifted, cols), &w, &lse, g, &mut d).unwrap();
        let (rl, rlse, rd) = reference(vocab, &x, &t, &w, g as f64);
        let el = (loss as f64 - rl).abs() / rl.abs();
        let (e_lse, ed) = (max_rel(&lse, &rlse), max_rel(&d, &rd));
        println!("loss {loss} vs {rl}: rel {el:.2e}; lse {e_lse:.2e}; d_logits {ed:.2e}");
        assert!(el < 1e-6, "loss rel error {el}");
        assert!(e_lse < 1e-6, "lse rel error {e_lse}");
        assert!(ed < 1e-6, "d_logits error {ed} of the largest");
    }

    #[test]
    fn all_weights_zero_gives_zero_and_the_count_floor() {
        // Σ w = 0: the count is floored at 1, so the loss and gradient are 0, not NaN.
        let (rows, vocab) = (3, 4);
        let x = values(rows * vocab, 1, 2.0);
        let (t, w) = (vec![0, 1, 2], vec![0.0; rows]);
        let mut lse = vec![0.0; rows];
        let tc = (&t[..], Columns::all(rows));
        assert_eq!(xent_fwd(rows, vocab, &x, tc, &w, &mut lse).unwrap(), 0.0);
        let mut d = vec![1.0; rows * vocab];
        xent_bwd(rows, vocab, &x, tc, &w, &lse, 1.0, &mut d).unwrap();
        assert!(d.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn errors_name_op_and_lengths() {
        let mut lse = vec![0.0; 2];
        let tc = (&[0, 1][..], Columns::all(2));
        let e = xent_fwd(2, 4, &[0.0; 7], tc, &[1.0, 1.0], &mut lse).unwrap_err();
        assert!(
            e.contains("xent_fwd") && e.contains("7") && e.contains("8"),
            "{e}"
        );
        let mut d = vec![0.0; 8];
        let tc = (&[0][..], Columns::all(2));
        let e = xent_bwd(2, 4, &[0.0; 8], tc, &[1.0, 1.0], &lse, 1.0, &mut d).unwrap_err();
        assert!(e.contains("xent_bwd") && e.contains("ids of 1"), "{e}");
    }
}
