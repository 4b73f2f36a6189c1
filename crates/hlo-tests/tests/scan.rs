//! `Builder::scan` on the PJRT CPU plugin: the scanned loop against the same body unrolled and a
//! naive f64 host loop (values), gradients against f64 central differences, n = 1 and n > 1,
//! custom VJPs, a checkpoint and a nested scan inside the body.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hlo_builder::autodiff::{BlockFn, ScanFn};
use hlo_builder::{Builder, ElementType, Op, Result, Shape};
use hlo_tests::{
    assert_grads_match_finite_differences, compile, loss_and_grads, run_f64, values_f64,
};

const F64: ElementType = ElementType::F64;
const D: i64 = 3;

/// One step of the recurrence: `tanh(c · W + b) * s` for `c [D]`, `W [D, D]`, `b [D]`, `s []`.
fn step(b: &Builder, c: Op, w: Op, bias: Op, s: Op) -> Result<Op> {
    let cw = b.dot_general(
        c,
        w,
        &hlo_builder::DotDims {
            lhs_contracting: vec![0],
            rhs_contracting: vec![0],
            ..Default::default()
        },
        None,
        None,
    )?;
    let y = b.tanh(b.add(cw, bias)?)?;
    b.mul(y, b.broadcast_in_dim(s, &[D], &[])?)
}

fn step_fn() -> ScanFn {
    Arc::new(|b: &Builder, c: Op, xs: &[Op]| step(b, c, xs[0], xs[1], xs[2]))
}

/// The same loop written out: row `i` of every stacked input sliced statically.
fn unrolled(b: &Builder, x: Op, xs: &[Op], n: i64) -> Result<Op> {
    let mut c = x;
    for i in 0..n {
        let rows = xs
            .iter()
            .map(|&a| {
                let s = b.shape(a)?;
                let r = b.slice_in_dim(a, i, i + 1, 0)?;
                b.reshape(r, &s.dims()[1..])
            })
            .collect::<Result<Vec<_>>>()?;
        c = step(b, c, rows[0], rows[1], rows[2])?;
    }
    Ok(c)
}

fn shapes(n: i64) -> Vec<Vec<i64>> {
    vec![vec![D], vec![n, D, D], vec![n, D], vec![n]]
}

fn args(n: i64, seed: u64) -> Vec<(Vec<f64>, Vec<i64>)> {
    shapes(n)
        .into_iter()
        .enumerate()
        .map(|(k, d)| {
            let len = d.iter().product::<i64>() as usize;
            (values_f64(len, -1.0, 1.0, seed + k as u64), d)
        })
        .collect()
}

fn params(b: &Builder, n: i64) -> Vec<Op> {
    shapes(n)
        .iter()
        .enumerate()
        .map(|(k, d)| b.parameter(Shape::array(F64, d), &format!("x{k}")).unwrap())
        .collect()
}

/// The naive host loop in f64.
fn naive(a: &[(Vec<f64>, Vec<i64>)], n: usize) -> Vec<f64> {
    let d = D as usize;
    let mut c = a[0].0.clone();
    for i in 0..n {
        let w = &a[1].0[i * d * d..(i + 1) * d * d];
        let bias = &a[2].0[i * d..(i + 1) * d];
        let s = a[3].0[i];
        c = (0..d)
            .map(|k| {
                let z: f64 = (0..d).map(|j| c[j] * w[j * d + k]).sum::<f64>() + bias[k];
                z.tanh() * s
            })
            .collect();
    }
    c
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

#[test]
fn scan_equals_the_unrolled_loop_and_the_naive_loop() {
    for n in [1i64, 4] {
        let a = args(n, 10 + n as u64);
        // Value and gradients of the scanned and the unrolled graph, loss = sum(c_n ⊙ W).
        let run = |scanned: bool| -> Vec<Vec<f64>> {
            let name = format!("scan_{n}_{scanned}");
            let b = Builder::new(&name);
            let p = params(&b, n);
            let comp = loss_and_grads(
                &name,
                &b,
                &p,
                |m| values_f64(m, -1.0, 1.0, 99),
                |b, x| {
                    if scanned {
                        b.scan(x[0], &x[1..], step_fn())
                    } else {
                        unrolled(b, x[0], &x[1..], n)
                    }
                },
            );
            let text = comp.to_text();
            assert_eq!(
                text.matches(" while(").count(),
                if scanned { 2 } else { 0 },
                "{name}"
            );
            let exe = compile(&comp);
            if scanned {
                let live = assert_grads_match_finite_differences(&name, &exe, &a);
                assert!(
                    live > 5,
                    "{name}: only {live} finite differences are non-zero"
                );
            }
            run_f64(&exe, &a)
        };
        let (s, u) = (run(true), run(false));
        for k in 0..s.len() {
            let r = max_rel(&s[k], &u[k]);
            assert!(
                r < 1e-12,
                "n {n}: output {k} scanned vs unrolled differs by {r}"
            );
        }
        // The forward value alone against the naive loop.
        let b = Builder::new("scan_value");
        let p = params(&b, n);
        let y = b.scan(p[0], &p[1..], step_fn()).unwrap();
        let got = run_f64(&compile(&b.build(y).unwrap()), &a);
        let r = max_rel(&got[0], &naive(&a, n as usize));
        assert!(r < 1e-12, "n {n}: scan vs naive differs by {r}");
    }
}

#[test]
fn custom_vjps_checkpoints_and_nested_scans_inside_the_body() {
    static RULE_CALLS: AtomicUsize = AtomicUsize::new(0);
    let n = 3i64;
    let a = args(n, 7);
    // The body: a custom-VJP block (y = x³ with its hand-written rule), a checkpointed tanh,
    // and an inner scan over the rows of W (c += 0.5·sin(W[r]·c)).
    let body: ScanFn = Arc::new(|b: &Builder, c: Op, xs: &[Op]| {
        let cube = b.mul(c, b.mul(c, c)?)?;
        b.custom_vjp(
            &[c],
            cube,
            Arc::new(|b: &Builder, ins: &[Op], _o: Op, ct: &[Option<Op>]| {
                RULE_CALLS.fetch_add(1, Ordering::Relaxed);
                let three = b.full(F64, 3.0, &[D])?;
                Ok(vec![match ct[0] {
                    Some(g) => Some(b.mul(g, b.mul(three, b.mul(ins[0], ins[0])?)?)?),
                    None => None,
                }])
            }),
        )?;
        let f: BlockFn = Arc::new(|b: &Builder, i: &[Op]| b.tanh(b.add(i[0], i[1])?));
        let t = b.checkpoint(&[cube, xs[1]], f)?;
        let inner: ScanFn = Arc::new(|b: &Builder, c: Op, r: &[Op]| {
            let h = b.reduce_sum(b.mul(c, r[0])?, &[0])?;
            let h = b.broadcast_in_dim(b.sin(h)?, &[D], &[])?;
            b.add(c, b.mul(h, b.full(F64, 0.5, &[D])?)?)
        });
        let u = b.scan(t, &[xs[0]], inner)?;
        b.mul(u, b.broadcast_in_dim(xs[2], &[D], &[])?)
    });
    let b = Builder::new("scan_nested");
    let p = params(&b, n);
    let comp = loss_and_grads(
        "scan_nested",
        &b,
        &p,
        |m| values_f64(m, -1.0, 1.0, 5),
        |b, x| b.scan(x[0], &x[1..], body.clone()),
    );
    assert!(
        RULE_CALLS.load(Ordering::Relaxed) >= 1,
        "the custom rule ran"
    );
    let exe = compile(&comp);
    let live = assert_grads_match_finite_differences("scan_nested", &exe, &a);
    assert!(live > 5, "only {live} finite differences are non-zero");
}

/// The loss-and-gradients graph of the scan over `n` steps with `unroll` iterations per trip
/// (`None`: [`Builder::scan`] itself).
fn scan_graph(name: &str, n: i64, unroll: Option<usize>) -> hlo_builder::Computation {
    let b = Builder::new(name);
    let p = params(&b, n);
    loss_and_grads(
        name,
        &b,
        &p,
        |m| values_f64(m, -1.0, 1.0, 99),
        |b, x| match unroll {
            Some(u) => b.scan_unrolled(x[0], &x[1..], step_fn(), u),
            None => b.scan(x[0], &x[1..], step_fn()),
        },
    )
}

/// HLO text without the `source_line=N` of its metadata.
fn without_source_lines(text: &str) -> String {
    text.split("source_line=")
        .enumerate()
        .map(|(i, part)| {
            if i == 0 {
                part
            } else {
                part.trim_start_matches(|c: char| c.is_ascii_digit())
            }
        })
        .collect()
}

#[test]
fn an_unrolled_scan_equals_the_scan_and_unroll_1_is_its_graph() {
    let n = 6i64;
    let a = args(n, 21);
    let plain = scan_graph("scan_u", n, None);
    // unroll = 1 builds the very graph of `scan`, instruction for instruction (the two calls sit
    // on different source lines, which the metadata records).
    assert_eq!(
        without_source_lines(&scan_graph("scan_u", n, Some(1)).to_text()),
        without_source_lines(&plain.to_text())
    );
    let want = run_f64(&compile(&plain), &a);
    for u in [2usize, 3, 6] {
        let comp = scan_graph("scan_u", n, Some(u));
        let text = comp.to_text();
        // Two loops (forward, backward) of n / u trips, u copies of the step's dot in the
        // forward body, and in the backward body u recomputed steps with their transposes.
        assert_eq!(text.matches(" while(").count(), 2, "unroll {u}");
        assert!(
            text.contains(&format!("constant({})", n / u as i64)),
            "unroll {u}: no trip count {} in\n{text}",
            n / u as i64
        );
        let got = run_f64(&compile(&comp), &a);
        for k in 0..want.len() {
            let r = max_rel(&got[k], &want[k]);
            assert!(r < 1e-12, "unroll {u}: output {k} differs from scan by {r}");
        }
        let live =
            assert_grads_match_finite_differences(&format!("unroll {u}"), &compile(&comp), &a);
        assert!(
            live > 5,
            "unroll {u}: only {live} finite differences are non-zero"
        );
    }
    // An unroll that does not divide the trip count is refused, naming both.
    let b = Builder::new("scan_bad");
    let p = params(&b, n);
    let e = b
        .scan_unrolled(p[0], &p[1..], step_fn(), 4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scan: unroll 4 must be >= 1 and divide the trip count 6"),
        "{e}"
    );
}
