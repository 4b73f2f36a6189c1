//! Small safe GEMM helpers over flat slices (ndarray + matrixmultiply underneath).

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};

/// A `[rows, cols]` view of `s` with row stride `rs` (column stride 1).
#[inline]
pub(crate) fn view(s: &[f32], rows: usize, cols: usize, rs: usize) -> ArrayView2<'_, f32> {
    let need = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + cols
    };
    ArrayView2::from_shape((rows, cols).strides((rs, 1)), &s[..need])
        .expect("internal: matrix view within its slice")
}

/// A mutable `[rows, cols]` view of `s` with row stride `rs` (column stride 1).
#[inline]
pub(crate) fn view_mut(
    s: &mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
) -> ArrayViewMut2<'_, f32> {
    let need = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + cols
    };
    ArrayViewMut2::from_shape((rows, cols).strides((rs, 1)), &mut s[..need])
        .expect("internal: matrix view within its slice")
}

/// `c = alpha · a · b + beta · c`; handles empty inner dimensions.
#[inline]
pub(crate) fn gemm(
    alpha: f32,
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    beta: f32,
    c: &mut ArrayViewMut2<'_, f32>,
) {
    if c.is_empty() {
        return;
    }
    if a.ncols() == 0 {
        if beta == 0.0 {
            c.fill(0.0);
        } else {
            c.mapv_inplace(|x| beta * x);
        }
        return;
    }
    general_mat_mul(alpha, a, b, beta, c);
}
