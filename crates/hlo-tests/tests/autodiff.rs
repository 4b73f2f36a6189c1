//! Reverse-mode autodiff checked on the PJRT CPU plugin: every VJP rule against f64 central
//! differences of the forward graph, plus custom VJPs, error cases and a small MLP that trains.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hlo_builder::{Builder, Cmp, DotDims, ElementType, Op, Result, Shape};
use hlo_tests::{
    assert_grads_match_finite_differences, compile, loss_and_grads, param, run_f64, upload,
};

const F64: ElementType = ElementType::F64;

/// Deterministic uniform numbers in `[lo, hi)` (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: &str) -> Rng {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for c in seed.bytes() {
            h = (h ^ c as u64).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h | 1)
    }
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.next()).collect()
    }
}

/// An f64 input: dims and a value range.
struct In {
    dims: Vec<i64>,
    lo: f64,
    hi: f64,
}

fn inp(dims: &[i64], lo: f64, hi: f64) -> In {
    In {
        dims: dims.to_vec(),
        lo,
        hi,
    }
}

/// Check the gradient of `L = sum(f(x...) * W)` (W fixed random) against central differences.
fn check(name: &str, inputs: &[In], f: impl Fn(&Builder, &[Op]) -> Result<Op>) {
    let mut rng = Rng::new(name);
    let b = Builder::new(name);
    let params: Vec<Op> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            b.parameter(Shape::array(F64, &x.dims), &format!("x{i}"))
                .unwrap()
        })
        .collect();
    let comp = loss_and_grads(name, &b, &params, |n| rng.vec(n, -1.0, 1.0), f);
    let exe = compile(&comp);
    let args: Vec<(Vec<f64>, Vec<i64>)> = inputs
        .iter()
        .map(|x| {
            (
                rng.vec(x.dims.iter().product::<i64>() as usize, x.lo, x.hi),
                x.dims.clone(),
            )
        })
        .collect();
    assert_grads_match_finite_differences(name, &exe, &args);
}

#[test]
fn unary_rules() {
    let v = |d: &[i64]| inp(d, -1.5, 1.5);
    let pos = |d: &[i64]| inp(d, 0.2, 2.0);
    check("neg", &[v(&[5])], |b, x| b.neg(x[0]));
    check("exp", &[v(&[5])], |b, x| b.exp(x[0]));
    check("log", &[pos(&[5])], |b, x| b.log(x[0]));
    check("log1p", &[pos(&[5])], |b, x| b.log1p(x[0]));
    check("expm1", &[v(&[5])], |b, x| b.expm1(x[0]));
    check("tanh", &[v(&[5])], |b, x| b.tanh(x[0]));
    check("logistic", &[v(&[5])], |b, x| b.logistic(x[0]));
    check("rsqrt", &[pos(&[5])], |b, x| b.rsqrt(x[0]));
    check("sqrt", &[pos(&[5])], |b, x| b.sqrt(x[0]));
    check("cbrt", &[pos(&[5])], |b, x| b.cbrt(x[0]));
    check("abs", &[v(&[6])], |b, x| b.abs(x[0]));
    check("sin", &[v(&[5])], |b, x| b.sin(x[0]));
    check("cos", &[v(&[5])], |b, x| b.cos(x[0]));
    check("tan", &[v(&[5])], |b, x| b.tan(x[0]));
    // Piecewise-constant ops have zero gradient (random points are away from the jumps).
    check("sign_floor", &[v(&[6])], |b, x| {
        b.add(b.sign(x[0])?, b.floor(x[0])?)
    });
}

#[test]
fn binary_rules() {
    let v = |d: &[i64]| inp(d, -1.5, 1.5);
    let pos = |d: &[i64]| inp(d, 0.3, 2.0);
    check("add", &[v(&[2, 3]), v(&[2, 3])], |b, x| b.add(x[0], x[1]));
    check("sub", &[v(&[2, 3]), v(&[2, 3])], |b, x| b.sub(x[0], x[1]));
    check("mul", &[v(&[2, 3]), v(&[2, 3])], |b, x| b.mul(x[0], x[1]));
    check("mul_same_operand", &[v(&[4])], |b, x| b.mul(x[0], x[0]));
    check("div", &[v(&[2, 3]), pos(&[2, 3])], |b, x| b.div(x[0], x[1]));
    check("max", &[v(&[8]), v(&[8])], |b, x| b.max(x[0], x[1]));
    check("min", &[v(&[8]), v(&[8])], |b, x| b.min(x[0], x[1]));
    check("pow", &[pos(&[5]), v(&[5])], |b, x| b.pow(x[0], x[1]));
    check("atan2", &[v(&[6]), v(&[6])], |b, x| b.atan2(x[0], x[1]));
    check(
        "rem",
        &[inp(&[6], 1.0, 5.0), inp(&[6], 0.7, 1.3)],
        |b, x| b.rem(x[0], x[1]),
    );
    // A rank-0 operand is broadcast implicitly; its gradient sums over the broadcast.
    check("scalar_broadcast", &[v(&[2, 3]), v(&[])], |b, x| {
        b.mul(x[0], b.exp(x[1])?)
    });
}

#[test]
fn select_clamp_rules() {
    let v = |d: &[i64]| inp(d, -1.5, 1.5);
    check("select", &[v(&[8]), v(&[8])], |b, x| {
        let p = b.compare(x[0], x[1], Cmp::Gt)?;
        b.select(p, b.mul(x[0], x[0])?, b.exp(x[1])?)
    });
    check(
        "clamp",
        &[inp(&[8], -1.0, -0.2), v(&[8]), inp(&[8], 0.2, 1.0)],
        |b, x| b.clamp(x[0], x[1], x[2]),
    );
    check("clamp_scalar_bounds", &[v(&[8])], |b, x| {
        b.clamp(b.scalar(-0.5f64)?, x[0], b.scalar(0.5f64)?)
    });
}

#[test]
fn shape_op_rules() {
    let v = |d: &[i64]| inp(d, -1.0, 1.0);
    check("reshape", &[v(&[2, 6])], |b, x| {
        b.reshape(b.exp(x[0])?, &[3, 2, 2])
    });
    check("transpose", &[v(&[2, 3, 4])], |b, x| {
        b.transpose(b.sin(x[0])?, &[2, 0, 1])
    });
    check("broadcast_new_dims", &[v(&[3])], |b, x| {
        b.broadcast_in_dim(b.exp(x[0])?, &[2, 3, 4], &[1])
    });
    check("broadcast_size1_expand", &[v(&[3, 1])], |b, x| {
        b.broadcast_in_dim(b.exp(x[0])?, &[2, 3, 4], &[1, 2])
    });
    check("reverse", &[v(&[3, 4])], |b, x| {
        b.reverse(b.mul(x[0], x[0])?, &[0, 1])
    });
    check("slice_strided", &[v(&[7, 5])], |b, x| {
        b.slice(b.exp(x[0])?, &[1, 0], &[7, 5], &[2, 3])
    });
    check("slice_in_dim", &[v(&[4, 5])], |b, x| {
        b.slice_in_dim(b.tanh(x[0])?, 1, 3, 1)
    });
    check(
        "concatenate",
        &[v(&[2, 3]), v(&[1, 3]), v(&[3, 3])],
        |b, x| b.concatenate(&[x[0], b.exp(x[1])?, x[2]], 0),
    );
    check("pad_pos_interior", &[v(&[3, 2]), v(&[])], |b, x| {
        b.pad(b.exp(x[0])?, x[1], &[(1, 2, 1), (0, 1, 2)])
    });
    check("pad_negative_edges", &[v(&[5, 4]), v(&[])], |b, x| {
        b.pad(x[0], x[1], &[(-1, 2, 1), (2, -2, 0)])
    });
    check("dynamic_slice", &[v(&[5, 4])], |b, x| {
        let i = b.scalar(2i32)?;
        let j = b.scalar(1i32)?;
        b.dynamic_slice(b.exp(x[0])?, &[i, j], &[2, 3])
    });
    check("dynamic_slice_clamped_start", &[v(&[5])], |b, x| {
        b.dynamic_slice(b.exp(x[0])?, &[b.scalar(4i32)?], &[3])
    });
    check("dynamic_update_slice", &[v(&[5, 4]), v(&[2, 2])], |b, x| {
        let i = b.scalar(1i32)?;
        let j = b.scalar(2i32)?;
        b.dynamic_update_slice(b.sin(x[0])?, b.exp(x[1])?, &[i, j])
    });
}

#[test]
fn reduce_rules() {
    let v = |d: &[i64]| inp(d, -1.0, 1.0);
    check("reduce_sum", &[v(&[2, 3, 4])], |b, x| {
        b.reduce_sum(b.exp(x[0])?, &[0, 2])
    });
    check("reduce_sum_all", &[v(&[3, 4])], |b, x| {
        b.reduce_sum(b.mul(x[0], x[0])?, &[0, 1])
    });
    check("reduce_max", &[v(&[3, 5])], |b, x| b.reduce_max(x[0], &[1]));
    check("reduce_min", &[v(&[3, 5])], |b, x| b.reduce_min(x[0], &[0]));
    // Layer-norm style: broadcasting, reductions and rsqrt together.
    check("layernorm", &[v(&[3, 6])], |b, x| {
        let n = 6.0f64;
        let mean = b.div(b.reduce_sum(x[0], &[1])?, b.scalar(n)?)?;
        let xc = b.sub(x[0], b.broadcast_in_dim(mean, &[3, 6], &[0])?)?;
        let var = b.div(b.reduce_sum(b.mul(xc, xc)?, &[1])?, b.scalar(n)?)?;
        let inv = b.rsqrt(b.add(var, b.scalar(1e-3f64)?)?)?;
        b.mul(xc, b.broadcast_in_dim(inv, &[3, 6], &[0])?)
    });
    check("log_softmax", &[v(&[2, 5])], |b, x| {
        let m = b.broadcast_in_dim(b.reduce_max(x[0], &[1])?, &[2, 5], &[0])?;
        let z = b.sub(x[0], m)?;
        let lse = b.log(b.reduce_sum(b.exp(z)?, &[1])?)?;
        b.sub(z, b.broadcast_in_dim(lse, &[2, 5], &[0])?)
    });
}

#[test]
fn reduce_max_ties_split_evenly() {
    // x = [1, 3, 3, 2]: max is 3 at two positions, each gets half.
    let b = Builder::new("ties");
    let x = b.parameter(Shape::array(F64, &[4]), "x").unwrap();
    let m = b.reduce_max(x, &[0]).unwrap();
    let g = b.grad(m, &[x]).unwrap();
    let y = b.max(x, b.scalar(2.0f64).unwrap()).unwrap();
    let g2 = b.grad(b.reduce_sum(y, &[0]).unwrap(), &[x]).unwrap();
    let exe = compile(&b.build(b.tuple(&[g[0], g2[0]]).unwrap()).unwrap());
    let out = run_f64(&exe, &[(vec![1.0, 3.0, 3.0, 2.0], vec![4])]);
    assert_eq!(out[0], vec![0.0, 0.5, 0.5, 0.0]);
    // max(x, 2): x wins where x > 2, tie at x == 2 splits.
    assert_eq!(out[1], vec![0.0, 1.0, 1.0, 0.5]);
}

#[test]
fn dot_rules() {
    let v = |d: &[i64]| inp(d, -1.0, 1.0);
    check("matmul", &[v(&[3, 4]), v(&[4, 2])], |b, x| {
        b.dot(x[0], x[1])
    });
    check("matvec", &[v(&[3, 4]), v(&[4])], |b, x| b.dot(x[0], x[1]));
    check("dot_batch", &[v(&[2, 3, 4]), v(&[2, 4, 5])], |b, x| {
        let d = DotDims {
            lhs_batch: vec![0],
            rhs_batch: vec![0],
            lhs_contracting: vec![2],
            rhs_contracting: vec![1],
        };
        b.dot_general(x[0], x[1], &d, None, None)
    });
    // Batch dims not leading, two contracting dims in crossed order, free dims on both sides.
    check(
        "dot_general_multi",
        &[v(&[3, 2, 4, 5]), v(&[5, 2, 4, 6])],
        |b, x| {
            let d = DotDims {
                lhs_batch: vec![1],
                rhs_batch: vec![1],
                lhs_contracting: vec![3, 2],
                rhs_contracting: vec![0, 2],
            };
            b.dot_general(x[0], x[1], &d, None, None)
        },
    );
    check(
        "dot_general_lhs_no_free",
        &[v(&[2, 4]), v(&[4, 2, 3])],
        |b, x| {
            let d = DotDims {
                lhs_batch: vec![0],
                rhs_batch: vec![1],
                lhs_contracting: vec![1],
                rhs_contracting: vec![0],
            };
            b.dot_general(x[0], x[1], &d, None, None)
        },
    );
    check("dot_same_operand", &[v(&[3, 3])], |b, x| b.dot(x[0], x[0]));
}

#[test]
fn dot_preferred_element_type() {
    // f32 operands with an f64 result: the gradients come back as f32 and equal the exact
    // d/dx sum(W * (x @ y)) = W @ y^T and d/dy = x^T @ W, computed here on the host.
    let (m, k, n) = (3usize, 4usize, 2usize);
    let mut rng = Rng::new("pref");
    let xv: Vec<f32> = rng
        .vec(m * k, -1.0, 1.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let yv: Vec<f32> = rng
        .vec(k * n, -1.0, 1.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let wv = rng.vec(m * n, -1.0, 1.0);
    let b = Builder::new("pref");
    let x = param(&b, ElementType::F32, &[m as i64, k as i64], "x");
    let y = param(&b, ElementType::F32, &[k as i64, n as i64], "y");
    let z = b
        .dot_general(x, y, &DotDims::matmul(), None, Some(F64))
        .unwrap();
    let w = b.constant_vec(wv.clone(), &[m as i64, n as i64]).unwrap();
    let loss = b.reduce_sum(b.mul(z, w).unwrap(), &[0, 1]).unwrap();
    let g = b.grad(loss, &[x, y]).unwrap();
    assert_eq!(
        b.shape(g[0]).unwrap(),
        Shape::array(ElementType::F32, &[3, 4])
    );
    let exe = compile(&b.build(b.tuple(&g).unwrap()).unwrap());
    let bx = upload::<f32>(&xv, &[m as i64, k as i64]);
    let by = upload::<f32>(&yv, &[k as i64, n as i64]);
    let out = exe.execute(&[&bx, &by]).unwrap();
    let gx = out[0].to_host::<f32>().unwrap();
    let gy = out[1].to_host::<f32>().unwrap();
    for i in 0..m {
        for p in 0..k {
            let want: f64 = (0..n).map(|j| wv[i * n + j] * yv[p * n + j] as f64).sum();
            assert!(
                (gx[i * k + p] as f64 - want).abs() < 1e-5,
                "gx[{i},{p}] {} vs {want}",
                gx[i * k + p]
            );
        }
    }
    for p in 0..k {
        for j in 0..n {
            let want: f64 = (0..m).map(|i| xv[i * k + p] as f64 * wv[i * n + j]).sum();
            assert!(
                (gy[p * n + j] as f64 - want).abs() < 1e-5,
                "gy[{p},{j}] {} vs {want}",
                gy[p * n + j]
            );
        }
    }
}

#[test]
fn convert_between_float_types() {
    // L = sum(convert(convert(x, f32) * 2, f64) * W): dL/dx = 2 W exactly (up to f32 rounding).
    let b = Builder::new("convert");
    let x = b.parameter(Shape::array(F64, &[4]), "x").unwrap();
    let w = [0.5, -1.25, 2.0, 0.75];
    let y32 = b
        .mul(
            b.convert(x, ElementType::F32).unwrap(),
            b.scalar(2.0f32).unwrap(),
        )
        .unwrap();
    let y = b.convert(y32, F64).unwrap();
    let loss = b
        .reduce_sum(
            b.mul(y, b.constant_vec(w.to_vec(), &[4]).unwrap()).unwrap(),
            &[0],
        )
        .unwrap();
    let g = b.grad(loss, &[x]).unwrap();
    let exe = compile(&b.build(g[0]).unwrap());
    let out = run_f64(&exe, &[(vec![0.1, 0.2, 0.3, 0.4], vec![4])]);
    let want: Vec<f64> = w.iter().map(|v| 2.0 * v).collect();
    assert_eq!(out[0], want);
}

#[test]
fn tuples_distribute_cotangents() {
    let v = |d: &[i64]| inp(d, -1.0, 1.0);
    check("tuple_gte", &[v(&[3]), v(&[3])], |b, x| {
        let t = b.tuple(&[b.mul(x[0], x[1])?, b.exp(x[0])?, x[1]])?;
        let a = b.get_tuple_element(t, 0)?;
        let c = b.get_tuple_element(t, 1)?;
        // Element 2 is unused; element 0 is used twice.
        b.add(b.mul(a, c)?, b.get_tuple_element(t, 0)?)
    });
}

#[test]
fn integer_inputs_get_no_gradient() {
    let b = Builder::new("ints");
    let k = param(&b, ElementType::S32, &[3], "k");
    let i = b.parameter(Shape::scalar(ElementType::S32), "i").unwrap();
    let x = b.parameter(Shape::array(F64, &[5]), "x").unwrap();
    let xs = b.dynamic_slice(x, &[i], &[3]).unwrap();
    let y = b.mul(b.convert(k, F64).unwrap(), xs).unwrap();
    let loss = b.reduce_sum(y, &[0]).unwrap();
    let g = b.grad(loss, &[k, i, x]).unwrap();
    assert_eq!(b.shape(g[0]).unwrap(), Shape::array(ElementType::S32, &[3]));
    assert_eq!(b.shape(g[1]).unwrap(), Shape::scalar(ElementType::S32));
    let comp = b.build(b.tuple(&g).unwrap()).unwrap();
    let exe = compile(&comp);
    let bk = upload::<i32>(&[2, -1, 4], &[3]);
    let bi = upload::<i32>(&[1], &[]);
    let bx = upload::<f64>(&[0.0; 5], &[5]);
    let out = exe.execute(&[&bk, &bi, &bx]).unwrap();
    assert_eq!(out[0].to_host::<i32>().unwrap(), vec![0, 0, 0]);
    assert_eq!(out[1].to_host::<i32>().unwrap(), vec![0]);
    assert_eq!(
        out[2].to_host::<f64>().unwrap(),
        vec![0.0, 2.0, -1.0, 4.0, 0.0]
    );
}

/// `state = (i, x, z)`; loop 3 times: `x *= 2`, `z += x`. Returns the while op.
fn doubling_loop(b: &Builder, x: Op, z: Op) -> Op {
    let sh = Shape::array(F64, &[3]);
    let st = Shape::tuple(vec![
        Shape::scalar(ElementType::S32),
        sh.clone(),
        sh.clone(),
    ]);
    let c = b.sub_builder("cond");
    let p = c.parameter(st.clone(), "s").unwrap();
    let i = c.get_tuple_element(p, 0).unwrap();
    let cond = c
        .build(c.compare(i, c.scalar(3i32).unwrap(), Cmp::Lt).unwrap())
        .unwrap();
    let bb = b.sub_builder("body");
    let p = bb.parameter(st, "s").unwrap();
    let i = bb
        .add(
            bb.get_tuple_element(p, 0).unwrap(),
            bb.scalar(1i32).unwrap(),
        )
        .unwrap();
    let x2 = bb
        .mul(
            bb.get_tuple_element(p, 1).unwrap(),
            bb.scalar(2.0f64).unwrap(),
        )
        .unwrap();
    let z2 = bb.add(bb.get_tuple_element(p, 2).unwrap(), x2).unwrap();
    let body = bb.build(bb.tuple(&[i, x2, z2]).unwrap()).unwrap();
    let init = b.tuple(&[b.scalar(0i32).unwrap(), x, z]).unwrap();
    b.while_loop(&cond, &body, init).unwrap()
}

#[test]
fn while_without_custom_vjp_is_a_clear_error() {
    let b = Builder::new("w");
    let x = b.parameter(Shape::array(F64, &[3]), "x").unwrap();
    let z = b.zeros(F64, &[3]).unwrap();
    let w = doubling_loop(&b, x, z);
    let loss = b
        .reduce_sum(b.get_tuple_element(w, 2).unwrap(), &[0])
        .unwrap();
    let e = b.grad(loss, &[x]).unwrap_err().to_string();
    assert!(
        e.contains("while `while.")
            && e.contains("is not differentiable; give the block a custom_vjp"),
        "{e}"
    );
    assert!(
        e.contains("tests/autodiff.rs"),
        "error names where the while was built: {e}"
    );
    // A while that is not on the path is fine.
    let other = b.reduce_sum(b.exp(x).unwrap(), &[0]).unwrap();
    assert!(b.grad(other, &[x]).is_ok());
}

/// A `call` of `(x, z) -> (3, 8x, z + 14x)`: an opaque block returning a tuple.
fn opaque_call(b: &Builder, x: Op, z: Op) -> Op {
    let sh = Shape::array(F64, &[3]);
    let f = b.sub_builder("opaque");
    let px = f.parameter(sh.clone(), "x").unwrap();
    let pz = f.parameter(sh, "z").unwrap();
    let x8 = f.mul(px, f.scalar(8.0f64).unwrap()).unwrap();
    let z2 = f
        .add(pz, f.mul(px, f.scalar(14.0f64).unwrap()).unwrap())
        .unwrap();
    let callee = f
        .build(f.tuple(&[f.scalar(3i32).unwrap(), x8, z2]).unwrap())
        .unwrap();
    b.call(&callee, &[x, z]).unwrap()
}

#[test]
fn custom_vjp_replaces_the_block() {
    // The call computes (3, 8x, z + 14x). Its rule: dx = 8 ct_x + 14 ct_z, dz = ct_z.
    let calls = Arc::new(AtomicUsize::new(0));
    let b = Builder::new("custom");
    let x = b.parameter(Shape::array(F64, &[3]), "x").unwrap();
    let z = b.parameter(Shape::array(F64, &[3]), "z").unwrap();
    let w = opaque_call(&b, x, z);
    // Without the rule the call is not differentiable.
    let probe = b
        .reduce_sum(b.get_tuple_element(w, 1).unwrap(), &[0])
        .unwrap();
    let e = b.grad(probe, &[x]).unwrap_err().to_string();
    assert!(
        e.contains("call `call.") && e.contains("give the block a custom_vjp"),
        "{e}"
    );
    let seen = calls.clone();
    let rule =
        move |b: &Builder, inputs: &[Op], out: Op, ct: &[Option<Op>]| -> Result<Vec<Option<Op>>> {
            seen.fetch_add(1, Ordering::SeqCst);
            assert_eq!(inputs.len(), 2);
            assert_eq!(b.shape(out)?.tuple_elements().map(<[Shape]>::len), Some(3));
            assert!(ct[0].is_none(), "the integer counter has no cotangent");
            let zero = b.zeros(F64, &[3])?;
            let cx = ct[1].unwrap_or(zero);
            let cz = ct[2].unwrap_or(zero);
            let dx = b.add(
                b.mul(cx, b.scalar(8.0f64)?)?,
                b.mul(cz, b.scalar(14.0f64)?)?,
            )?;
            Ok(vec![Some(dx), Some(cz)])
        };
    b.custom_vjp(&[x, z], w, Arc::new(rule)).unwrap();
    let x8 = b.get_tuple_element(w, 1).unwrap();
    let zz = b.get_tuple_element(w, 2).unwrap();
    // loss = sum(x8 * x8) + sum(3 zz) = 64 |x|^2 + 3 sum(z + 14 x)
    let loss = b
        .add(
            b.reduce_sum(b.mul(x8, x8).unwrap(), &[0]).unwrap(),
            b.reduce_sum(b.mul(zz, b.scalar(3.0f64).unwrap()).unwrap(), &[0])
                .unwrap(),
        )
        .unwrap();
    let g = b.grad(loss, &[x, z]).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let exe = compile(&b.build(b.tuple(&[g[0], g[1]]).unwrap()).unwrap());
    let xv = vec![0.5, -1.0, 2.0];
    let out = run_f64(
        &exe,
        &[(xv.clone(), vec![3]), (vec![1.0, 2.0, 3.0], vec![3])],
    );
    let want_x: Vec<f64> = xv.iter().map(|v| 128.0 * v + 42.0).collect();
    assert_eq!(out[0], want_x);
    assert_eq!(out[1], vec![3.0; 3]);

    // On an array op with differentiable internals the rule still wins: exp(x) with a rule of 3 ct.
    let b = Builder::new("custom2");
    let x = b.parameter(Shape::array(F64, &[2]), "x").unwrap();
    let y = b.exp(b.mul(x, x).unwrap()).unwrap();
    b.custom_vjp(
        &[x],
        y,
        Arc::new(|b: &Builder, _: &[Op], _: Op, ct: &[Option<Op>]| {
            Ok(vec![ct[0]
                .map(|c| b.mul(c, b.scalar(3.0f64).unwrap()))
                .transpose()?])
        }),
    )
    .unwrap();
    let g = b.grad(b.reduce_sum(y, &[0]).unwrap(), &[x]).unwrap();
    let exe = compile(&b.build(g[0]).unwrap());
    assert_eq!(
        run_f64(&exe, &[(vec![0.3, -0.7], vec![2])])[0],
        vec![3.0, 3.0]
    );

    // A rule returning the wrong shape is reported.
    let b = Builder::new("custom3");
    let x = b.parameter(Shape::array(F64, &[2]), "x").unwrap();
    let y = b.exp(x).unwrap();
    b.custom_vjp(
        &[x],
        y,
        Arc::new(|b: &Builder, _: &[Op], _: Op, _: &[Option<Op>]| {
            Ok(vec![Some(b.zeros(F64, &[3])?)])
        }),
    )
    .unwrap();
    let e = b
        .grad(b.reduce_sum(y, &[0]).unwrap(), &[x])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("returned cotangent 0 of shape f64[3] for an input of shape f64[2]"),
        "{e}"
    );
}

#[test]
fn mlp_softmax_cross_entropy_trains_with_sgd() {
    // Three Gaussian blobs in 2-D, 60 points; a 2-16-3 tanh MLP; full-batch SGD in f32.
    let (n, d, hdim, c) = (60i64, 2i64, 16i64, 3i64);
    let mut rng = Rng::new("mlp");
    let centers = [(-2.0, 0.0), (2.0, 0.5), (0.0, 2.5)];
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for i in 0..n as usize {
        let k = i % 3;
        xs.push((centers[k].0 + rng.vec(1, -1.0, 1.0)[0]) as f32);
        xs.push((centers[k].1 + rng.vec(1, -1.0, 1.0)[0]) as f32);
        let mut onehot = [0.0f32; 3];
        onehot[k] = 1.0;
        ys.extend_from_slice(&onehot);
    }
    let f32t = ElementType::F32;
    let b = Builder::new("mlp_step");
    let xp = b.parameter(Shape::array(f32t, &[n, d]), "x").unwrap();
    let yp = b.parameter(Shape::array(f32t, &[n, c]), "y").unwrap();
    let w1 = b.parameter(Shape::array(f32t, &[d, hdim]), "w1").unwrap();
    let b1 = b.parameter(Shape::array(f32t, &[hdim]), "b1").unwrap();
    let w2 = b.parameter(Shape::array(f32t, &[hdim, c]), "w2").unwrap();
    let b2 = b.parameter(Shape::array(f32t, &[c]), "b2").unwrap();
    let step = || -> Result<Op> {
        let h = b.tanh(b.add(b.dot(xp, w1)?, b.broadcast_in_dim(b1, &[n, hdim], &[1])?)?)?;
        let logits = b.add(b.dot(h, w2)?, b.broadcast_in_dim(b2, &[n, c], &[1])?)?;
        let m = b.broadcast_in_dim(b.reduce_max(logits, &[1])?, &[n, c], &[0])?;
        let z = b.sub(logits, m)?;
        let lse = b.broadcast_in_dim(b.log(b.reduce_sum(b.exp(z)?, &[1])?)?, &[n, c], &[0])?;
        let logp = b.sub(z, lse)?;
        let loss = b.div(
            b.neg(b.reduce_sum(b.mul(yp, logp)?, &[0, 1])?)?,
            b.scalar(n as f32)?,
        )?;
        let params = [w1, b1, w2, b2];
        let grads = b.grad(loss, &params)?;
        let lr = b.scalar(0.5f32)?;
        let mut outs = vec![loss];
        for (p, g) in params.iter().zip(grads) {
            outs.push(b.sub(*p, b.mul(g, lr)?)?);
        }
        b.tuple(&outs)
    };
    let exe = compile(&b.build(step().unwrap()).unwrap());
    let bx = upload::<f32>(&xs, &[n, d]);
    let by = upload::<f32>(&ys, &[n, c]);
    let mut params: Vec<pjrt::Buffer> = [
        (vec![d, hdim], 0.5),
        (vec![hdim], 0.0),
        (vec![hdim, c], 0.5),
        (vec![c], 0.0),
    ]
    .iter()
    .map(|(dims, scale)| {
        let v: Vec<f32> = rng
            .vec(dims.iter().product::<i64>() as usize, -1.0, 1.0)
            .into_iter()
            .map(|v| (v * scale) as f32)
            .collect();
        upload::<f32>(&v, dims)
    })
    .collect();
    let mut losses = Vec::new();
    for _ in 0..50 {
        let mut args = vec![&bx, &by];
        args.extend(params.iter());
        let mut out = exe.execute(&args).unwrap();
        losses.push(out[0].to_host::<f32>().unwrap()[0]);
        params = out.split_off(1);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    eprintln!("mlp loss: step 0 {first}, step 49 {last}");
    assert!(first > 0.8, "initial loss near ln 3: {first}");
    assert!(last < 0.5 * first, "loss did not fall enough: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
}

#[test]
fn vjp_with_several_outputs_and_a_tuple_output() {
    // outputs: exp(x) and (x*x, sin(x)); cotangents c1 and (c2, c3):
    // dx = c1 exp(x) + 2 x c2 + cos(x) c3.
    let b = Builder::new("vjp_multi");
    let s = Shape::array(F64, &[3]);
    let x = b.parameter(s.clone(), "x").unwrap();
    let c: Vec<Op> = (1..=3)
        .map(|i| b.parameter(s.clone(), &format!("c{i}")).unwrap())
        .collect();
    let y1 = b.exp(x).unwrap();
    let t = b.tuple(&[b.mul(x, x).unwrap(), b.sin(x).unwrap()]).unwrap();
    let ct_t = b.tuple(&[c[1], c[2]]).unwrap();
    let g = b.vjp(&[y1, t], &[c[0], ct_t], &[x]).unwrap();
    let exe = compile(&b.build(g[0]).unwrap());
    let xv = vec![0.3, -0.8, 1.1];
    let cv = [
        vec![1.0, -2.0, 0.5],
        vec![0.25, 1.5, -1.0],
        vec![2.0, 0.0, -0.75],
    ];
    let mut args = vec![(xv.clone(), vec![3])];
    args.extend(cv.iter().map(|v| (v.clone(), vec![3])));
    let out = run_f64(&exe, &args);
    for i in 0..3 {
        let want = cv[0][i] * xv[i].exp() + 2.0 * xv[i] * cv[1][i] + xv[i].cos() * cv[2][i];
        assert!(
            (out[0][i] - want).abs() < 1e-12,
            "dx[{i}] {} vs {want}",
            out[0][i]
        );
    }
}
