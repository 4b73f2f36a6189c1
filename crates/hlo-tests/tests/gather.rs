//! `gather`, `scatter` and `take_rows` on the PJRT CPU plugin against ndarray references
//! (including clamped / skipped out-of-range indices and repeated indices), and their VJPs against
//! f64 central differences. Their HLO text and errors are tested in hlo-builder's tests/gather.rs.

use hlo_builder::{
    Builder, ElementType, GatherDims, Op, Result, ScatterDims, ScatterUpdate, Shape,
};
use hlo_tests::{
    assert_close, assert_grads_match_finite_differences, compile, flat, loss_and_grads, upload,
    values_f64,
};
use ndarray::{s, Array2, Array3, ArrayD, IxDyn};

const F32: ElementType = ElementType::F32;
const F64: ElementType = ElementType::F64;
const S32: ElementType = ElementType::S32;

/// [`values_f64`] rounded to f32 (inputs of the f32 tests).
fn values32(n: usize, seed: u64) -> Vec<f64> {
    values_f64(n, -2.0, 2.0, seed)
        .into_iter()
        .map(|x| x as f32 as f64)
        .collect()
}

fn clampi(i: i32, hi: i64) -> usize {
    (i as i64).clamp(0, hi) as usize
}

/// Uploads f64 values (already f32-exact, see [`values32`]) as f32.
fn upload_f32(v: &[f64], dims: &[i64]) -> pjrt::Buffer {
    upload(&v.iter().map(|&x| x as f32).collect::<Vec<_>>(), dims)
}

/// Builds the tuple of the named ops in `outs`, runs it on `args` and compares each output with
/// its reference (relative tolerance `rtol`).
fn run_and_compare(b: &Builder, outs: &[(&str, Op, Vec<f64>)], args: &[pjrt::Buffer], rtol: f64) {
    let ops: Vec<Op> = outs.iter().map(|o| o.1).collect();
    let exe = compile(&b.build(b.tuple(&ops).unwrap()).unwrap());
    let res = exe.execute(&args.iter().collect::<Vec<_>>()).unwrap();
    for ((name, _, want), buf) in outs.iter().zip(&res) {
        assert_close(name, &buf.to_host::<f32>().unwrap(), want, rtol);
    }
}

#[test]
fn gather_and_take_rows_match_ndarray() {
    let tv = values32(7 * 3, 1);
    let table = Array2::from_shape_vec((7, 3), tv.clone()).unwrap();
    let xv = values32(6 * 7, 2);
    let x = Array2::from_shape_vec((6, 7), xv.clone()).unwrap();
    // Repeated ids, and ids outside [0, 7) which XLA clamps.
    let ids: Vec<i32> = vec![3, 0, 3, 6, 9, -2, 1, 3, 5, 0];
    // 2-d starts, one per row: (row, col), some clamped.
    let starts: Vec<i32> = vec![0, 0, 4, 4, 5, 6, -1, 2];
    let b = Builder::new("gathers");
    let pt = b.parameter(Shape::array(F32, &[7, 3]), "table").unwrap();
    let px = b.parameter(Shape::array(F32, &[6, 7]), "x").unwrap();
    let pid = b.parameter(Shape::array(S32, &[2, 5]), "ids").unwrap();
    let ps = b.parameter(Shape::array(S32, &[4, 2]), "starts").unwrap();
    let mut outs: Vec<(&str, Op, Vec<f64>)> = Vec::new();

    // take_rows: [2, 5] ids -> [2, 5, 3].
    let mut want = ArrayD::zeros(IxDyn(&[2, 5, 3]));
    for (n, &id) in ids.iter().enumerate() {
        let r = clampi(id, 6);
        for c in 0..3 {
            want[[n / 5, n % 5, c]] = table[[r, c]];
        }
    }
    outs.push(("take_rows", b.take_rows(pt, pid).unwrap(), flat(&want)));

    // [2, 3] windows at 2-d starts, index vectors along dim 1: [4, 2, 3].
    let d = GatherDims {
        offset_dims: vec![1, 2],
        collapsed_slice_dims: vec![],
        start_index_map: vec![0, 1],
        index_vector_dim: 1,
    };
    let mut want = Array3::<f64>::zeros((4, 2, 3));
    for n in 0..4 {
        let (r, c) = (
            clampi(starts[2 * n], 6 - 2),
            clampi(starts[2 * n + 1], 7 - 3),
        );
        want.slice_mut(s![n, .., ..])
            .assign(&x.slice(s![r..r + 2, c..c + 3]));
    }
    outs.push((
        "gather_windows",
        b.gather(px, ps, &d, &[2, 3]).unwrap(),
        flat(&want.into_dyn()),
    ));

    // Same starts transposed to [2, 4] (index vectors along dim 0), components swapped
    // (component 0 addresses operand dim 1), batch dim placed between the window dims.
    let st = b.transpose(ps, &[1, 0]).unwrap();
    let d = GatherDims {
        offset_dims: vec![0, 2],
        collapsed_slice_dims: vec![],
        start_index_map: vec![1, 0],
        index_vector_dim: 0,
    };
    let mut want = Array3::<f64>::zeros((2, 4, 3));
    for n in 0..4 {
        // Component 0 (= starts[n][0]) is the column start, component 1 the row start.
        let (c, r) = (
            clampi(starts[2 * n], 7 - 3),
            clampi(starts[2 * n + 1], 6 - 2),
        );
        want.slice_mut(s![.., n, ..])
            .assign(&x.slice(s![r..r + 2, c..c + 3]));
    }
    outs.push((
        "gather_index_dim_0",
        b.gather(px, st, &d, &[2, 3]).unwrap(),
        flat(&want.into_dyn()),
    ));

    // Columns of x: collapse dim 1, keep all rows.
    let cols = b.slice_in_dim(pid, 0, 1, 0).unwrap(); // [1, 5]
    let cols = b.reshape(cols, &[5, 1]).unwrap();
    let d = GatherDims {
        offset_dims: vec![0],
        collapsed_slice_dims: vec![1],
        start_index_map: vec![1],
        index_vector_dim: 1,
    };
    let mut want = Array2::<f64>::zeros((6, 5));
    for n in 0..5 {
        let c = clampi(ids[n], 6);
        for r in 0..6 {
            want[[r, n]] = x[[r, c]];
        }
    }
    outs.push((
        "gather_columns",
        b.gather(px, cols, &d, &[6, 1]).unwrap(),
        flat(&want.into_dyn()),
    ));

    let args = [
        upload_f32(&tv, &[7, 3]),
        upload_f32(&xv, &[6, 7]),
        upload::<i32>(&ids, &[2, 5]),
        upload::<i32>(&starts, &[4, 2]),
    ];
    // Gather copies values: exact.
    run_and_compare(&b, &outs, &args, 0.0);
}

#[test]
fn scatter_matches_ndarray() {
    let xv = values32(5 * 3, 3);
    let x = Array2::from_shape_vec((5, 3), xv.clone()).unwrap();
    let uv = values32(6 * 3, 4);
    let u = Array2::from_shape_vec((6, 3), uv.clone()).unwrap();
    let gv = values32(6 * 7, 5);
    let g = Array2::from_shape_vec((6, 7), gv.clone()).unwrap();
    let wv = values32(3 * 2 * 3, 6);
    let w = Array3::from_shape_vec((3, 2, 3), wv.clone()).unwrap();
    // Repeated rows (1 three times), and rows 7 and -1 outside [0, 5), which scatter skips.
    let ids: Vec<i32> = vec![1, 3, 1, 7, -1, 1];
    // Overlapping [2, 3] windows; the last one (5, 0) does not fit in 6 rows and is skipped.
    let starts: Vec<i32> = vec![1, 2, 2, 3, 5, 0];

    let b = Builder::new("scatters");
    let px = b.parameter(Shape::array(F32, &[5, 3]), "x").unwrap();
    let pu = b.parameter(Shape::array(F32, &[6, 3]), "u").unwrap();
    let pid = b.parameter(Shape::array(S32, &[6]), "ids").unwrap();
    let pg = b.parameter(Shape::array(F32, &[6, 7]), "g").unwrap();
    let pw = b.parameter(Shape::array(F32, &[3, 2, 3]), "w").unwrap();
    let ps = b.parameter(Shape::array(S32, &[3, 2]), "starts").unwrap();
    let rows = ScatterDims {
        update_window_dims: vec![1],
        inserted_window_dims: vec![0],
        scatter_dims_to_operand_dims: vec![0],
        index_vector_dim: 1,
    };
    let mut outs: Vec<(&str, Op, Vec<f64>)> = Vec::new();

    let mut want = x.clone();
    for (j, &id) in ids.iter().enumerate() {
        if (0..5).contains(&id) {
            for c in 0..3 {
                want[[id as usize, c]] += u[[j, c]];
            }
        }
    }
    outs.push((
        "scatter_add_rows",
        b.scatter(px, pid, pu, &rows, ScatterUpdate::Add).unwrap(),
        flat(&want.into_dyn()),
    ));

    // Replace with unique in-range ids 4, 0, 2 (first three updates).
    let uid = b.constant_vec(vec![4i32, 0, 2], &[3]).unwrap();
    let u3 = b.slice_in_dim(pu, 0, 3, 0).unwrap();
    let mut want = x.clone();
    for (j, r) in [4usize, 0, 2].into_iter().enumerate() {
        want.slice_mut(s![r, ..]).assign(&u.slice(s![j, ..]));
    }
    outs.push((
        "scatter_replace_rows",
        b.scatter(px, uid, u3, &rows, ScatterUpdate::Replace)
            .unwrap(),
        flat(&want.into_dyn()),
    ));

    let win = ScatterDims {
        update_window_dims: vec![1, 2],
        inserted_window_dims: vec![],
        scatter_dims_to_operand_dims: vec![0, 1],
        index_vector_dim: 1,
    };
    let mut want = g.clone();
    for n in 0..3 {
        let (r, c) = (starts[2 * n] as usize, starts[2 * n + 1] as usize);
        if r + 2 <= 6 && c + 3 <= 7 {
            let mut blk = want.slice_mut(s![r..r + 2, c..c + 3]);
            blk += &w.slice(s![n, .., ..]);
        }
    }
    outs.push((
        "scatter_add_windows",
        b.scatter(pg, ps, pw, &win, ScatterUpdate::Add).unwrap(),
        flat(&want.into_dyn()),
    ));

    let args = [
        upload_f32(&xv, &[5, 3]),
        upload_f32(&uv, &[6, 3]),
        upload::<i32>(&ids, &[6]),
        upload_f32(&gv, &[6, 7]),
        upload_f32(&wv, &[3, 2, 3]),
        upload::<i32>(&starts, &[3, 2]),
    ];
    run_and_compare(&b, &outs, &args, 1e-6);
}

/// Gradient of `L = sum(f(x...) * W)` (W fixed random) against f64 central differences.
fn check(name: &str, dims: &[&[i64]], f: impl Fn(&Builder, &[Op]) -> Result<Op>) {
    let b = Builder::new(name);
    let params: Vec<Op> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| b.parameter(Shape::array(F64, d), &format!("x{i}")).unwrap())
        .collect();
    let comp = loss_and_grads(name, &b, &params, |n| values_f64(n, -1.0, 1.0, 7), f);
    let exe = compile(&comp);
    let args: Vec<(Vec<f64>, Vec<i64>)> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let n = d.iter().product::<i64>() as usize;
            (values_f64(n, -1.5, 1.5, 11 + i as u64), d.to_vec())
        })
        .collect();
    let nonzero = assert_grads_match_finite_differences(name, &exe, &args);
    assert!(
        nonzero > 0,
        "{name}: all gradients vanish; the check is vacuous"
    );
}

#[test]
fn gather_vjp_matches_finite_differences() {
    // Repeated rows accumulate; -3 and 11 are clamped to rows 0 and 6.
    check("take_rows", &[&[7, 3]], |b, x| {
        let ids = b.constant_vec(vec![2i32, 5, 2, -3, 11, 2, 0, 4], &[2, 4])?;
        let g = b.take_rows(x[0], ids)?;
        b.mul(g, g)
    });
    // Overlapping 2-d windows, one clamped, index vectors along dim 0.
    check("gather_windows", &[&[5, 6]], |b, x| {
        let starts = b.constant_vec(vec![0i32, 1, 4, 1, 3, 9], &[2, 3])?;
        let d = GatherDims {
            offset_dims: vec![1, 2],
            collapsed_slice_dims: vec![],
            start_index_map: vec![0, 1],
            index_vector_dim: 0,
        };
        b.exp(b.gather(x[0], starts, &d, &[2, 3])?)
    });
    // Collapsed column gather: [5, 6] -> columns 4, 1, 4 -> [5, 3].
    check("gather_columns", &[&[5, 6]], |b, x| {
        let cols = b.constant_vec(vec![4i32, 1, 4], &[3])?;
        let d = GatherDims {
            offset_dims: vec![0],
            collapsed_slice_dims: vec![1],
            start_index_map: vec![1],
            index_vector_dim: 1,
        };
        b.gather(x[0], cols, &d, &[5, 1])
    });
}

#[test]
fn scatter_vjp_matches_finite_differences() {
    let rows = ScatterDims {
        update_window_dims: vec![1],
        inserted_window_dims: vec![0],
        scatter_dims_to_operand_dims: vec![0],
        index_vector_dim: 1,
    };
    // Repeated row 1; 7 and -1 are skipped, so their updates get zero cotangent.
    check("scatter_add", &[&[5, 3], &[6, 3]], |b, x| {
        let ids = b.constant_vec(vec![1i32, 3, 1, 7, -1, 1], &[6])?;
        let y = b.scatter(x[0], ids, x[1], &rows, ScatterUpdate::Add)?;
        b.mul(y, y)
    });
    check("scatter_replace", &[&[5, 3], &[3, 3]], |b, x| {
        let ids = b.constant_vec(vec![4i32, 0, 2], &[3])?;
        let y = b.scatter(x[0], ids, x[1], &rows, ScatterUpdate::Replace)?;
        b.mul(y, y)
    });
    // 2-d windows, overlapping, index vectors along dim 0, one window out of bounds.
    check("scatter_add_windows", &[&[5, 6], &[2, 3, 3]], |b, x| {
        let starts = b.constant_vec(vec![0i32, 1, 4, 1, 2, 2], &[2, 3])?;
        let d = ScatterDims {
            update_window_dims: vec![0, 2],
            inserted_window_dims: vec![],
            scatter_dims_to_operand_dims: vec![0, 1],
            index_vector_dim: 0,
        };
        let y = b.scatter(x[0], starts, x[1], &d, ScatterUpdate::Add)?;
        b.exp(y)
    });
}
