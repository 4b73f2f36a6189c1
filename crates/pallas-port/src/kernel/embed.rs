//! Token embedding on the CPU, forward and backward: the rows of a table picked by ids (the
//! forward, a gather) and the sum of the output cotangent's rows into the table's rows (the
//! backward, a scatter-add), so XLA compiles neither (with the index clamping and the layout
//! copies around them, ~3 distinct kernels of the train step).
//!
//! Ids outside `[0, V)` are clamped into it, as XLA's gather clamps its start indices (and the
//! HLO lowering's VJP clamps before its scatter). The ids are read through [`Columns`], so a
//! graph can pass the whole token array `[B, T+1]` and use its first `T` columns as inputs (and
//! the loss its last `T` as targets) without a slice that XLA would compile as a kernel.

use rayon::prelude::*;

/// Which ids of an id array `[outer, stride]` belong to the rows `[outer, t]` of a result: row
/// `r = o·t + i` reads the id at `o·stride + offset + i` (`offset + t ≤ stride`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    /// Columns used per outer row (the result's last row dim).
    pub t: usize,
    /// Columns of the id array.
    pub stride: usize,
    /// The first column used.
    pub offset: usize,
}

impl Columns {
    /// Every column of an id array with `t` columns.
    pub fn all(t: usize) -> Columns {
        Columns {
            t,
            stride: t,
            offset: 0,
        }
    }

    /// The index into the id array of result row `r`.
    pub fn index(&self, r: usize) -> usize {
        (r / self.t) * self.stride + self.offset + r % self.t
    }

    /// Checks the window against `rows` result rows and an id array of `ids` elements; the error
    /// names `op`.
    pub fn check(&self, op: &str, rows: usize, ids: usize) -> Result<(), String> {
        let ok = self.t > 0
            && self.offset + self.t <= self.stride
            && rows.is_multiple_of(self.t)
            && ids == rows / self.t * self.stride;
        if !ok {
            return Err(format!(
                "{op}: {rows} rows in groups of {} from ids of {ids} elements in rows of {} \
                 starting at column {} (need offset + t ≤ stride and rows / t rows of ids)",
                self.t, self.stride, self.offset
            ));
        }
        Ok(())
    }
}

/// Rows per parallel task of the forward.
const ROWS_PER_TASK: usize = 64;

/// The table row of id `id` (clamped into `[0, vocab)`).
fn clamp(id: i32, vocab: usize) -> usize {
    (id.max(0) as usize).min(vocab - 1)
}

/// Checks a table (`(name, elements)`) of `vocab × d` and rows (`(name, elements)`) of whole
/// rows of width `d`; returns the row count. The error names `op` and the lengths.
fn check_rows(
    op: &str,
    (vocab, d): (usize, usize),
    (table, table_len): (&str, usize),
    (rows, rows_len): (&str, usize),
) -> Result<usize, String> {
    if vocab == 0 || d == 0 || table_len != vocab * d || !rows_len.is_multiple_of(d) {
        return Err(format!(
            "{op}: {table} of {table_len} elements for vocab {vocab} × width {d}, {rows} of \
             {rows_len}"
        ));
    }
    Ok(rows_len / d)
}

/// Forward: `out [R, D]` = the table rows `[V, D]` of the ids (through `cols`). Errors (naming
/// `embed_fwd` and the lengths) when the slices do not fit.
pub fn embed_fwd(
    vocab: usize,
    d: usize,
    table: &[f32],
    ids: &[i32],
    cols: Columns,
    out: &mut [f32],
) -> Result<(), String> {
    let table_len = ("table", table.len());
    let rows = check_rows("embed_fwd", (vocab, d), table_len, ("result", out.len()))?;
    cols.check("embed_fwd", rows, ids.len())?;
    out.par_chunks_mut(ROWS_PER_TASK * d)
        .enumerate()
        .for_each(|(task, out)| {
            for (i, row) in out.chunks_mut(d).enumerate() {
                let v = clamp(ids[cols.index(task * ROWS_PER_TASK + i)], vocab);
                row.copy_from_slice(&table[v * d..(v + 1) * d]);
            }
        });
    Ok(())
}

/// Backward: `d_table [V, D]` = for each table row, the sum of the cotangent rows `d_out [R, D]`
/// whose (clamped) id picks it, added in row order (each table row is one task's, so the sums do
/// not depend on the thread count). Errors (naming `embed_bwd` and the lengths) when the slices
/// do not fit.
pub fn embed_bwd(
    vocab: usize,
    d: usize,
    ids: &[i32],
    cols: Columns,
    d_out: &[f32],
    d_table: &mut [f32],
) -> Result<(), String> {
    let table_len = ("d_table", d_table.len());
    let rows = check_rows("embed_bwd", (vocab, d), table_len, ("d_out", d_out.len()))?;
    cols.check("embed_bwd", rows, ids.len())?;
    // The rows of each table row, in row order.
    let mut by_id: Vec<Vec<usize>> = vec![Vec::new(); vocab];
    for r in 0..rows {
        by_id[clamp(ids[cols.index(r)], vocab)].push(r);
    }
    d_table
        .par_chunks_mut(d)
        .zip(by_id.par_iter())
        .for_each(|(acc, rs)| {
            acc.fill(0.0);
            for &r in rs {
                for (a, &g) in acc.iter_mut().zip(&d_out[r * d..(r + 1) * d]) {
                    *a += g;
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_and_scatter_add_match_naive_loops() {
        // ids [3, 6] with out-of-range values, using columns 1..5 (t 4, offset 1).
        let (vocab, d) = (7usize, 3usize);
        let table: Vec<f32> = (0..vocab * d).map(|i| i as f32 * 0.5 - 3.0).collect();
        let ids: Vec<i32> = vec![2, 0, 9, -4, 6, 1, 3, 3, 3, 5, 0, 2, 6, 1, 7, 2, 2, 4];
        let cols = Columns {
            t: 4,
            stride: 6,
            offset: 1,
        };
        let rows = 12;
        let mut out = vec![0.0; rows * d];
        embed_fwd(vocab, d, &table, &ids, cols, &mut out).unwrap();
        let d_out: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut d_table = vec![f32::NAN; vocab * d];
        embed_bwd(vocab, d, &ids, cols, &d_out, &mut d_table).unwrap();
        let mut want = vec![0.0f64; vocab * d];
        for o in 0..3 {
            for i in 0..4 {
                let r = o * 4 + i;
                let v = ids[o * 6 + 1 + i].clamp(0, vocab as i32 - 1) as usize;
                assert_eq!(
                    &out[r * d..(r + 1) * d],
                    &table[v * d..(v + 1) * d],
                    "row {r}"
                );
                for j in 0..d {
                    want[v * d + j] += d_out[r * d + j] as f64;
                }
            }
        }
        for (k, (&g, &w)) in d_table.iter().zip(&want).enumerate() {
            assert!((g as f64 - w).abs() < 1e-6, "d_table[{k}] {g} vs {w}");
        }
    }

    #[test]
    fn errors_name_op_and_lengths() {
        let cols = Columns::all(4);
        let mut out = vec![0.0; 8];
        let e = embed_fwd(3, 2, &[0.0; 6], &[0, 1, 2], cols, &mut out).unwrap_err();
        assert!(e.contains("embed_fwd") && e.contains("ids of 3"), "{e}");
        let mut dt = vec![0.0; 5];
        let e = embed_bwd(3, 2, &[0; 4], cols, &[0.0; 8], &mut dt).unwrap_err();
        assert!(e.contains("embed_bwd") && e.contains("d_table of 5"), "{e}");
    }
}
