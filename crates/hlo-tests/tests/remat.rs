//! Rematerialization policies (`Builder::checkpoint_with_policy`) run on the PJRT CPU plugin: a
//! block of projections, batched dots and elementwise ops gives the same loss and gradients
//! under every policy as without a checkpoint, and both equal an f64 naive reference (the loss
//! by loops, the gradients by central differences of those loops). The graph's text shows which
//! dots each policy computes again.

use std::sync::Arc;

use hlo_builder::autodiff::SavePolicy;
use hlo_builder::{Builder, DotDims, ElementType, Op, Result, Shape};
use hlo_tests::{compile, loss_and_grads, run_f64, values_f64};

const X: [i64; 3] = [2, 4, 3];
const W1: [i64; 2] = [3, 5];
const W2: [i64; 2] = [5, 2];

/// `y = (sin(h·hᵀ)·h)·w2` with `h = tanh(x·w1)`, batched over x's first dim.
fn block(b: &Builder, i: &[Op]) -> Result<Op> {
    let batched = |lc: i64, rc: i64| DotDims {
        lhs_batch: vec![0],
        rhs_batch: vec![0],
        lhs_contracting: vec![lc],
        rhs_contracting: vec![rc],
    };
    let proj = DotDims {
        lhs_contracting: vec![2],
        rhs_contracting: vec![0],
        ..Default::default()
    };
    let h = b.tanh(b.dot_general(i[0], i[1], &proj, None, None)?)?;
    let s = b.dot_general(h, h, &batched(2, 2), None, None)?;
    let z = b.dot_general(b.sin(s)?, h, &batched(2, 1), None, None)?;
    b.dot_general(z, i[2], &proj, None, None)
}

/// The gradient graph's text of `Σ y²` under `policy` (`None`: no checkpoint at all), f32.
fn grad_text(policy: Option<SavePolicy>) -> String {
    let b = Builder::new("remat");
    let p = |d: &[i64], n: &str| b.parameter(Shape::array(ElementType::F32, d), n).unwrap();
    let ins = [p(&X, "x"), p(&W1, "w1"), p(&W2, "w2")];
    let y = match policy {
        None => block(&b, &ins).unwrap(),
        Some(pol) => b
            .checkpoint_with_policy(&ins, Arc::new(block), pol)
            .unwrap(),
    };
    let l = b.reduce_sum(b.mul(y, y).unwrap(), &[0, 1, 2]).unwrap();
    let mut outs = vec![l];
    outs.extend(b.grad(l, &ins).unwrap());
    b.build(b.tuple(&outs).unwrap()).unwrap().to_text()
}

#[test]
fn saved_dots_are_not_computed_again() {
    // (dots, tanh, sine, barriers): 4 forward dots and 2 transposes each; the policies
    // recompute the dots they do not save and every elementwise op once.
    let count =
        |t: &str| [" dot(", " tanh(", " sine(", " opt-barrier("].map(|op| t.matches(op).count());
    assert_eq!(count(&grad_text(None)), [12, 1, 1, 0]);
    assert_eq!(count(&grad_text(Some(SavePolicy::Nothing))), [16, 2, 2, 1]);
    assert_eq!(count(&grad_text(Some(SavePolicy::Dots))), [12, 2, 2, 1]);
    // The two batched dots are recomputed; the two projections are not.
    let t = grad_text(Some(SavePolicy::DotsWithNoBatchDims));
    assert_eq!(count(&t), [14, 2, 2, 1]);
    // The barrier fences the 3 inputs, the 2 saved dots and the cotangent (6 arrays, printed
    // twice: result and operand).
    let barrier = t.lines().find(|l| l.contains(" opt-barrier(")).unwrap();
    assert_eq!(barrier.matches("f32[").count(), 2 * 6, "{barrier}");
}

/// The same loss `Σ y ⊙ w`, naively in f64.
fn naive_loss(x: &[f64], w1: &[f64], w2: &[f64], w: &[f64]) -> f64 {
    let (nb, nt, nc, nj, no) = (2, 4, 3, 5, 2);
    let mut l = 0.0;
    for bi in 0..nb {
        let mut h = vec![0.0; nt * nj];
        for t in 0..nt {
            for j in 0..nj {
                let a: f64 = (0..nc)
                    .map(|c| x[(bi * nt + t) * nc + c] * w1[c * nj + j])
                    .sum();
                h[t * nj + j] = a.tanh();
            }
        }
        for t in 0..nt {
            let mut z = vec![0.0; nj];
            for u in 0..nt {
                let s: f64 = (0..nj).map(|j| h[t * nj + j] * h[u * nj + j]).sum();
                for (j, zj) in z.iter_mut().enumerate() {
                    *zj += s.sin() * h[u * nj + j];
                }
            }
            for o in 0..no {
                let y: f64 = (0..nj).map(|j| z[j] * w2[j * no + o]).sum();
                l += y * w[(bi * nt + t) * no + o];
            }
        }
    }
    l
}

/// (loss, gradients) of the graph under `policy` (`None`: no checkpoint).
fn run(policy: Option<SavePolicy>, args: &[(Vec<f64>, Vec<i64>)], w: &[f64]) -> Vec<Vec<f64>> {
    let b = Builder::new("remat");
    let params: Vec<Op> = [&X[..], &W1[..], &W2[..]]
        .iter()
        .enumerate()
        .map(|(i, d)| {
            b.parameter(Shape::array(ElementType::F64, d), &format!("p{i}"))
                .unwrap()
        })
        .collect();
    let comp = loss_and_grads(
        "remat",
        &b,
        &params,
        |_| w.to_vec(),
        |b, ins| match policy {
            None => block(b, ins),
            Some(p) => b.checkpoint_with_policy(ins, Arc::new(block), p),
        },
    );
    run_f64(&compile(&comp), args)
}

#[test]
fn every_policy_gives_the_naive_loss_and_gradients() {
    let dims = [&X[..], &W1[..], &W2[..]];
    let args: Vec<(Vec<f64>, Vec<i64>)> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let n = d.iter().product::<i64>() as usize;
            (values_f64(n, -0.8, 0.8, 7 + i as u64), d.to_vec())
        })
        .collect();
    let w = values_f64(2 * 4 * 2, -1.0, 1.0, 99);
    let loss = |a: &[(Vec<f64>, Vec<i64>)]| naive_loss(&a[0].0, &a[1].0, &a[2].0, &w);
    // Naive gradients: central differences of the naive loss.
    let h = 1e-5;
    let fd: Vec<Vec<f64>> = (0..3)
        .map(|k| {
            (0..args[k].0.len())
                .map(|e| {
                    let mut a = args.clone();
                    a[k].0[e] += h;
                    let lp = loss(&a);
                    a[k].0[e] -= 2.0 * h;
                    (lp - loss(&a)) / (2.0 * h)
                })
                .collect()
        })
        .collect();
    assert!(fd.iter().flatten().filter(|g| g.abs() > 1e-2).count() > 30);
    let plain = run(None, &args, &w);
    for policy in [
        None,
        Some(SavePolicy::Nothing),
        Some(SavePolicy::Dots),
        Some(SavePolicy::DotsWithNoBatchDims),
    ] {
        let got = run(policy, &args, &w);
        let want = loss(&args);
        assert!(
            (got[0][0] - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{policy:?}: loss {} vs naive {want}",
            got[0][0]
        );
        let (mut vs_fd, mut vs_plain) = (0.0f64, 0.0f64);
        for k in 0..3 {
            for (e, &g) in got[1 + k].iter().enumerate() {
                vs_fd = vs_fd.max((g - fd[k][e]).abs() / (1.0 + fd[k][e].abs()));
                vs_plain = vs_plain.max((g - plain[1 + k][e]).abs() / (1.0 + g.abs()));
            }
        }
        eprintln!(
            "{policy:?}: loss {:.12}, gradients within {vs_fd:.1e} of the naive ones, {vs_plain:.1e} \
             of the un-rematted graph's",
            got[0][0]
        );
        assert!(
            vs_fd <= 1e-8,
            "{policy:?}: gradients off the naive ones by {vs_fd:e}"
        );
        assert!(
            vs_plain <= 1e-12,
            "{policy:?}: gradients off the plain graph's by {vs_plain:e}"
        );
    }
}
