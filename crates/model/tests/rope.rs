//! RoPE at the static positions `0..T` (constant f64 tables) and at runtime positions (f32
//! angles) against the f64 naive rotation, forward and VJP, at positions up to 8192.

use hlo_builder::{Builder, ElementType, Shape};
use model::layers::rope;
use model::reference;

mod common;
use common::{client, compile, execute_f32, rand};

/// `rope(x)` and the VJP of `Σ w ⊙ rope(x)` with respect to `x` (`[1, t, heads, h]`), at the
/// static positions (an iota) or, with `runtime`, at the same positions passed as a parameter.
fn run_rope(t: usize, heads: usize, h: usize, theta: f64, runtime: bool) -> (Vec<f32>, Vec<f32>) {
    let b = Builder::new("rope");
    let dims = [1, t as i64, heads as i64, h as i64];
    let x = b
        .parameter(Shape::array(ElementType::F32, &dims), "x")
        .unwrap();
    let w = b
        .parameter(Shape::array(ElementType::F32, &dims), "w")
        .unwrap();
    let pos = if runtime {
        b.parameter(Shape::array(ElementType::F32, &[t as i64]), "pos")
            .unwrap()
    } else {
        b.iota(ElementType::F32, &[t as i64], 0).unwrap()
    };
    let y = rope(&b, x, pos, theta).unwrap();
    let loss = b.reduce_sum(b.mul(y, w).unwrap(), &[0, 1, 2, 3]).unwrap();
    let dx = b.grad(loss, &[x]).unwrap()[0];
    let comp = b.build(b.tuple(&[y, dx]).unwrap()).unwrap();
    let n = t * heads * h;
    let c = client();
    let mut bufs = vec![
        c.buffer_from_host(&rand(n, 1, 1.0), &dims, None).unwrap(),
        c.buffer_from_host(&rand(n, 2, 1.0), &dims, None).unwrap(),
    ];
    if runtime {
        let p: Vec<f32> = (0..t).map(|i| i as f32).collect();
        bufs.push(c.buffer_from_host(&p, &[t as i64], None).unwrap());
    }
    let mut out = execute_f32(&compile(&comp), &bufs);
    let dx = out.pop().unwrap();
    (out.pop().unwrap(), dx)
}

/// The f64 rotation of `x` and its transpose (rotation by the negative angle) applied to `w`.
fn reference_rope(t: usize, heads: usize, h: usize, theta: f64) -> (Vec<f64>, Vec<f64>) {
    let n = t * heads * h;
    let x: Vec<f64> = rand(n, 1, 1.0).iter().map(|&v| v as f64).collect();
    let w: Vec<f64> = rand(n, 2, 1.0).iter().map(|&v| v as f64).collect();
    let (mut y, mut dx) = (x.clone(), w.clone());
    for (row, (yr, dr)) in y.chunks_mut(h).zip(dx.chunks_mut(h)).enumerate() {
        let pos = row / heads;
        reference::rope(yr, pos, theta);
        // The transpose of a rotation is the rotation by −angle: F·R(angle)·F with the
        // reflection F: (a, b) → (a, −b).
        dr.iter_mut().skip(1).step_by(2).for_each(|v| *v = -*v);
        reference::rope(dr, pos, theta);
        dr.iter_mut().skip(1).step_by(2).for_each(|v| *v = -*v);
    }
    (y, dx)
}

/// Largest absolute difference.
fn max_abs(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn rope_tables_match_f64_rotation_at_large_positions() {
    // (T, heads, head dim, θ): the bench model's head dim and base at 8192 positions, and a
    // length that is not a square (the tables' split p = a·k + c with a ragged last row).
    for (t, heads, h, theta) in [(8192, 1, 64, 5e5), (1000, 2, 128, 1e4)] {
        let (y_ref, dx_ref) = reference_rope(t, heads, h, theta);
        let (y, dx) = run_rope(t, heads, h, theta, false);
        let (y_rt, dx_rt) = run_rope(t, heads, h, theta, true);
        let (e, e_dx) = (max_abs(&y, &y_ref), max_abs(&dx, &dx_ref));
        let (e_rt, e_dx_rt) = (max_abs(&y_rt, &y_ref), max_abs(&dx_rt, &dx_ref));
        eprintln!(
            "T {t}, H {h}, θ {theta}: max |error| vs f64: tables {e:.1e} (VJP {e_dx:.1e}), \
             f32 angles at runtime positions {e_rt:.1e} (VJP {e_dx_rt:.1e})"
        );
        assert!(e < 1e-6 && e_dx < 1e-6, "tables: {e}, VJP {e_dx}");
        // Runtime positions keep the f32 angle `p · freq`, whose rounding grows with p.
        assert!(
            e_rt < 1e-2 && e_dx_rt < 1e-2,
            "runtime: {e_rt}, VJP {e_dx_rt}"
        );
    }
}
