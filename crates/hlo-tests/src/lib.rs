//! Test-only crate: its `tests/` run `hlo-builder` programs on the PJRT CPU plugin (every op
//! family against host references, VJPs against finite differences, gather/scatter, buffer
//! donation, FFI custom calls, SPMD sharding). It lives apart from `hlo-builder` so that the
//! builder does not depend on the runtime.
//!
//! The library holds what those tests share: one CPU client per test binary, compiling and
//! running a computation, deterministic inputs, a closeness assertion, and the VJP check
//! against f64 central differences.
//!
//! ```no_run
//! use hlo_builder::{Builder, ElementType, Shape};
//! use hlo_tests::{assert_close, compile, upload, values};
//!
//! let b = Builder::new("exp");
//! let x = b.parameter(Shape::array(ElementType::F32, &[4]), "x").unwrap();
//! let exe = compile(&b.build(b.exp(x).unwrap()).unwrap());
//! let xs = values(4, -1.0, 1.0, 1);
//! let got = exe.execute(&[&upload(&xs, &[4])]).unwrap()[0].to_host::<f32>().unwrap();
//! let want: Vec<f64> = xs.iter().map(|&x| (x as f64).exp()).collect();
//! assert_close("exp", &got, &want, 1e-6);
//! ```

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use hlo_builder::{Builder, Computation, ElementType, Op, Result, Shape};
use ndarray::ArrayD;

/// The process-wide PJRT CPU client (created on first use).
pub fn client() -> &'static pjrt::Client {
    static C: OnceLock<pjrt::Client> = OnceLock::new();
    C.get_or_init(|| pjrt::Client::cpu().expect("CPU PJRT client"))
}

/// Compiles `comp` on [`client`] with default options; panics with the HLO text on failure.
pub fn compile(comp: &Computation) -> pjrt::LoadedExecutable {
    client()
        .compile(
            pjrt::Program::Hlo(&comp.to_bytes()),
            &pjrt::CompileOptions::default(),
        )
        .unwrap_or_else(|e| panic!("compile failed: {e}\n{}", comp.to_text()))
}

/// A parameter of type `ty` and dims `dims` named `name`.
pub fn param(b: &Builder, ty: ElementType, dims: &[i64], name: &str) -> Op {
    b.parameter(Shape::array(ty, dims), name).unwrap()
}

/// Uploads `data` with dimensions `dims` to the CPU device.
pub fn upload<T: pjrt::NativeType>(data: &[T], dims: &[i64]) -> pjrt::Buffer {
    client().buffer_from_host::<T>(data, dims, None).unwrap()
}

/// Runs `exe` on f64 inputs `(data, dims)` and downloads every output as f64.
pub fn run_f64(exe: &pjrt::LoadedExecutable, args: &[(Vec<f64>, Vec<i64>)]) -> Vec<Vec<f64>> {
    let bufs: Vec<pjrt::Buffer> = args.iter().map(|(d, dims)| upload(d, dims)).collect();
    let refs: Vec<&pjrt::Buffer> = bufs.iter().collect();
    exe.execute(&refs)
        .unwrap()
        .iter()
        .map(|b| b.to_host::<f64>().unwrap())
        .collect()
}

/// The xorshift64 stream behind [`values`] and [`values_f64`].
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// `n` deterministic f32 values in `[lo, hi)` (24 random bits each).
pub fn values(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut next = xorshift(seed);
    (0..n)
        .map(|_| lo + (hi - lo) * ((next() >> 40) as f32 / (1u64 << 24) as f32))
        .collect()
}

/// `n` deterministic f64 values in `[lo, hi)` (53 random bits each).
pub fn values_f64(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut next = xorshift(seed);
    (0..n)
        .map(|_| lo + (hi - lo) * ((next() >> 11) as f64 / (1u64 << 53) as f64))
        .collect()
}

/// The elements of `a` in logical (row-major) order.
pub fn flat(a: &ArrayD<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

/// Asserts `|got − want| ≤ rtol · max(|want|, 1)` element-wise (NaN matches NaN); `name` and the
/// index appear in the failure message.
pub fn assert_close(name: &str, got: &[f32], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g as f64 - w).abs() <= rtol * w.abs().max(1.0) || (w.is_nan() && g.is_nan());
        assert!(ok, "{name}[{i}]: got {g}, want {w}");
    }
}

/// Builds `L = sum(f(params) ⊙ W)` and its gradients: the computation returns the tuple
/// `(L, dL/dparams[0], …)`. `weights(n)` gives the `n` fixed values of `W` (the shape of `f`'s
/// output).
pub fn loss_and_grads(
    name: &str,
    b: &Builder,
    params: &[Op],
    weights: impl FnOnce(usize) -> Vec<f64>,
    f: impl Fn(&Builder, &[Op]) -> Result<Op>,
) -> Computation {
    let y = f(b, params).unwrap_or_else(|e| panic!("{name}: forward: {e}"));
    let ys = b.shape(y).unwrap();
    let w = b
        .constant_vec(weights(ys.numel() as usize), ys.dims())
        .unwrap();
    let all: Vec<i64> = (0..ys.rank() as i64).collect();
    let loss = b.reduce_sum(b.mul(y, w).unwrap(), &all).unwrap();
    let grads = b
        .grad(loss, params)
        .unwrap_or_else(|e| panic!("{name}: grad: {e}"));
    let mut outs = vec![loss];
    outs.extend(&grads);
    b.build(b.tuple(&outs).unwrap()).unwrap()
}

/// Checks every gradient output of a [`loss_and_grads`] executable against f64 central
/// differences of its loss at `args` (step 1e-6, tolerance 1e-6 · (1 + |fd|)). Returns how many
/// finite differences exceed 1e-3 in magnitude, so that a caller can refuse a vacuous check.
pub fn assert_grads_match_finite_differences(
    name: &str,
    exe: &pjrt::LoadedExecutable,
    args: &[(Vec<f64>, Vec<i64>)],
) -> usize {
    let base = run_f64(exe, args);
    assert_eq!(
        base.len(),
        1 + args.len(),
        "{name}: one output per tuple element"
    );
    let h = 1e-6;
    let mut nonzero = 0;
    for k in 0..args.len() {
        for (e, &got) in base[1 + k].iter().enumerate() {
            let mut a = args.to_vec();
            a[k].0[e] += h;
            let lp = run_f64(exe, &a)[0][0];
            a[k].0[e] -= 2.0 * h;
            let lm = run_f64(exe, &a)[0][0];
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (got - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{name}: d/dx{k}[{e}]: autodiff {got}, finite difference {fd}"
            );
            nonzero += usize::from(fd.abs() > 1e-3);
        }
    }
    nonzero
}
