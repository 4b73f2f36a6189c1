//! Every op family executed on the PJRT CPU plugin and compared with an independent host
//! reference (f64 formulas, ndarray, a host Threefry). Many ops share one compile.

use hlo_builder::{
    threefry2x32_host, Attr, Builder, Cmp, DotDims, ElementType, Op, Shape, Sharding,
};
use hlo_tests::{assert_close, client, compile, flat, upload, values};
use ndarray::{s, Array, ArrayD, Axis, IxDyn};

const F32: ElementType = ElementType::F32;

#[test]
fn elementwise_ops_match_f64() {
    let n = 12;
    let (x, y, sg) = (
        values(n, 0.2, 1.8, 1),
        values(n, 0.3, 1.5, 2),
        values(n, -2.5, 2.5, 3),
    );
    let b = Builder::new("elementwise");
    let d = [3i64, 4];
    let px = b.parameter(Shape::array(F32, &d), "x").unwrap();
    let py = b.parameter(Shape::array(F32, &d), "y").unwrap();
    let ps = b.parameter(Shape::array(F32, &d), "s").unwrap();
    type Ref = Box<dyn Fn(f64, f64, f64) -> f64>;
    let mut outs: Vec<(&str, Op, Ref)> = Vec::new();
    macro_rules! un {
        ($name:ident, $p:ident, $f:expr) => {
            outs.push((stringify!($name), b.$name($p).unwrap(), Box::new($f)));
        };
    }
    un!(neg, px, |x, _, _| -x);
    un!(exp, px, |x, _, _| x.exp());
    un!(expm1, px, |x, _, _| x.exp_m1());
    un!(log, px, |x, _, _| x.ln());
    un!(log1p, px, |x, _, _| x.ln_1p());
    un!(tanh, ps, |_, _, s| s.tanh());
    un!(logistic, ps, |_, _, s| 1.0 / (1.0 + (-s).exp()));
    un!(rsqrt, px, |x, _, _| 1.0 / x.sqrt());
    un!(sqrt, px, |x, _, _| x.sqrt());
    un!(cbrt, ps, |_, _, s| s.cbrt());
    un!(cos, ps, |_, _, s| s.cos());
    un!(sin, ps, |_, _, s| s.sin());
    un!(tan, px, |x, _, _| x.tan());
    un!(abs, ps, |_, _, s| s.abs());
    un!(sign, ps, |_, _, s| if s == 0.0 { 0.0 } else { s.signum() });
    un!(floor, ps, |_, _, s| s.floor());
    un!(ceil, ps, |_, _, s| s.ceil());
    un!(round_nearest_even, ps, |_, _, s| s.round_ties_even());
    macro_rules! bin {
        ($name:ident, $f:expr) => {
            outs.push((stringify!($name), b.$name(px, py).unwrap(), Box::new($f)));
        };
    }
    bin!(add, |x, y, _| x + y);
    bin!(sub, |x, y, _| x - y);
    bin!(mul, |x, y, _| x * y);
    bin!(div, |x, y, _| x / y);
    bin!(max, |x, y, _| x.max(y));
    bin!(min, |x, y, _| x.min(y));
    bin!(pow, |x, y, _| x.powf(y));
    bin!(rem, |x, y, _| x % y);
    bin!(atan2, |x, y, _| x.atan2(y));
    let neg = b.compare(ps, b.scalar(0.0f32).unwrap(), Cmp::Lt).unwrap();
    outs.push((
        "select",
        b.select(neg, px, py).unwrap(),
        Box::new(|x, y, s| if s < 0.0 { x } else { y }),
    ));
    let lo = b.scalar(-1.0f32).unwrap();
    let hi = b.scalar(1.0f32).unwrap();
    outs.push((
        "clamp",
        b.clamp(lo, ps, hi).unwrap(),
        Box::new(|_, _, s| s.clamp(-1.0, 1.0)),
    ));
    let as_int = b
        .convert(
            b.mul(ps, b.scalar(3.0f32).unwrap()).unwrap(),
            ElementType::S32,
        )
        .unwrap();
    outs.push((
        "convert",
        b.convert(as_int, F32).unwrap(),
        Box::new(|_, _, s| ((s as f32 * 3.0) as i32) as f64),
    ));
    let ge = b.compare(px, py, Cmp::Ge).unwrap();
    outs.push((
        "compare",
        b.convert(ge, F32).unwrap(),
        Box::new(|x, y, _| f64::from(u8::from(x >= y))),
    ));
    outs.push((
        "scalar_lhs",
        b.sub(b.scalar(2.0f32).unwrap(), px).unwrap(),
        Box::new(|x, _, _| 2.0 - x),
    ));
    let ops: Vec<Op> = outs.iter().map(|o| o.1).collect();
    let comp = b.build(b.tuple(&ops).unwrap()).unwrap();
    let exe = compile(&comp);
    let res = exe
        .execute(&[&upload(&x, &d), &upload(&y, &d), &upload(&sg, &d)])
        .unwrap();
    assert_eq!(res.len(), outs.len());
    for ((name, _, f), buf) in outs.iter().zip(&res) {
        let want: Vec<f64> = (0..n)
            .map(|i| f(x[i] as f64, y[i] as f64, sg[i] as f64))
            .collect();
        assert_close(name, &buf.to_host::<f32>().unwrap(), &want, 2e-6);
    }
}

fn nd(v: &[f32], d: &[usize]) -> ArrayD<f64> {
    Array::from_shape_vec(IxDyn(d), v.iter().map(|&x| x as f64).collect()).unwrap()
}

#[test]
fn data_movement_ops_match_ndarray() {
    let xv: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let x = nd(&xv, &[4, 6]);
    let b = Builder::new("moves");
    let px = b.parameter(Shape::array(F32, &[4, 6]), "x").unwrap();
    let pi = b.parameter(Shape::scalar(ElementType::S32), "i").unwrap();
    let zero = b.scalar(0i32).unwrap();
    let mut outs: Vec<(&str, Op, Vec<f64>)> = Vec::new();
    outs.push(("reshape", b.reshape(px, &[6, 4]).unwrap(), flat(&x)));
    outs.push((
        "transpose",
        b.transpose(px, &[1, 0]).unwrap(),
        x.t().iter().copied().collect(),
    ));
    let row = b.slice(px, &[1, 0], &[2, 6], &[1, 1]).unwrap(); // [1,6]
    let bc = b.broadcast_in_dim(row, &[3, 6], &[0, 1]).unwrap();
    let want_bc: Vec<f64> = (0..3).flat_map(|_| x.slice(s![1, ..]).to_vec()).collect();
    outs.push(("broadcast_size1", bc, want_bc));
    let col = b.slice_in_dim(px, 2, 3, 1).unwrap(); // [4,1]
    let col = b.reshape(col, &[4]).unwrap();
    let bc2 = b.broadcast_in_dim(col, &[4, 2], &[0]).unwrap();
    outs.push((
        "broadcast",
        bc2,
        (0..4).flat_map(|r| [x[[r, 2]], x[[r, 2]]]).collect(),
    ));
    outs.push((
        "slice_strided",
        b.slice(px, &[0, 1], &[4, 6], &[2, 2]).unwrap(),
        flat(&x.slice(s![0..4;2, 1..6;2]).to_owned().into_dyn()),
    ));
    outs.push((
        "reverse",
        b.reverse(px, &[1]).unwrap(),
        flat(&x.slice(s![.., ..;-1]).to_owned().into_dyn()),
    ));
    // i = 1 at run time; a start of 3 with size 2 is clamped to 2 by XLA.
    outs.push((
        "dynamic_slice",
        b.dynamic_slice(px, &[pi, zero], &[2, 6]).unwrap(),
        flat(&x.slice(s![1..3, ..]).to_owned().into_dyn()),
    ));
    let three = b.scalar(3i32).unwrap();
    outs.push((
        "dynamic_slice_clamped",
        b.dynamic_slice(px, &[three, zero], &[2, 6]).unwrap(),
        flat(&x.slice(s![2..4, ..]).to_owned().into_dyn()),
    ));
    let upd = b.full(F32, -1.0, &[2, 2]).unwrap();
    let dus = b.dynamic_update_slice(px, upd, &[pi, pi]).unwrap();
    let mut want_dus = x.clone();
    want_dus.slice_mut(s![1..3, 1..3]).fill(-1.0);
    outs.push(("dynamic_update_slice", dus, flat(&want_dus)));
    let cat = b.concatenate(&[px, upd], 1).unwrap_err(); // rows differ: 4 vs 2
    assert!(cat.to_string().contains("concatenate"), "{cat}");
    let top = b.slice_in_dim(px, 0, 2, 0).unwrap();
    outs.push(("concatenate", b.concatenate(&[top, upd], 1).unwrap(), {
        let t = x.slice(s![0..2, ..]).to_owned();
        ndarray::concatenate(
            Axis(1),
            &[t.view(), ndarray::Array2::from_elem((2, 2), -1.0).view()],
        )
        .unwrap()
        .iter()
        .copied()
        .collect()
    }));
    // pad: dim0 (1 low, -1 high), dim1 (0 low, 2 high, interior 1) on a [2,3] block.
    let blk = b.slice(px, &[0, 0], &[2, 3], &[1, 1]).unwrap();
    let pad = b
        .pad(blk, b.scalar(9.0f32).unwrap(), &[(1, -1, 0), (0, 2, 1)])
        .unwrap();
    let mut want_pad = ndarray::Array2::from_elem((2, 7), 9.0);
    for j in 0..3 {
        want_pad[[1, 2 * j]] = x[[0, j]];
    }
    outs.push(("pad", pad, want_pad.iter().copied().collect()));
    let io = b
        .convert(b.iota(ElementType::S32, &[2, 3], 0).unwrap(), F32)
        .unwrap();
    outs.push(("iota", io, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]));
    let ops: Vec<Op> = outs.iter().map(|o| o.1).collect();
    let comp = b.build(b.tuple(&ops).unwrap()).unwrap();
    let exe = compile(&comp);
    let i = upload::<i32>(&[1], &[]);
    let res = exe.execute(&[&upload(&xv, &[4, 6]), &i]).unwrap();
    for ((name, _, want), buf) in outs.iter().zip(&res) {
        assert_close(name, &buf.to_host::<f32>().unwrap(), want, 0.0);
    }
}

#[test]
fn reductions_and_dots_match_naive_loops() {
    let av = values(24, -1.0, 1.0, 5);
    let bv = values(40, -1.0, 1.0, 6);
    let a = nd(&av, &[2, 3, 4]);
    let bm = nd(&bv, &[2, 4, 5]);
    let b = Builder::new("reduce_dot");
    let pa = b.parameter(Shape::array(F32, &[2, 3, 4]), "a").unwrap();
    let pb = b.parameter(Shape::array(F32, &[2, 4, 5]), "b").unwrap();
    let mut outs: Vec<(&str, Op, Vec<f64>, f64)> = Vec::new();
    outs.push((
        "sum12",
        b.reduce_sum(pa, &[1, 2]).unwrap(),
        flat(&a.sum_axis(Axis(2)).sum_axis(Axis(1))),
        1e-6,
    ));
    outs.push((
        "max1",
        b.reduce_max(pa, &[1]).unwrap(),
        flat(&a.map_axis(Axis(1), |v| v.fold(f64::MIN, |m, &x| m.max(x)))),
        0.0,
    ));
    outs.push((
        "min0",
        b.reduce_min(pa, &[0]).unwrap(),
        flat(&a.map_axis(Axis(0), |v| v.fold(f64::MAX, |m, &x| m.min(x)))),
        0.0,
    ));
    // Variadic reduce: (sum, max) in one pass.
    let sc = Shape::scalar(F32);
    let red = {
        let r = b.sub_builder("sum_max");
        let p: Vec<Op> = (0..4)
            .map(|i| r.parameter(sc.clone(), &format!("p{i}")).unwrap())
            .collect();
        let t = r
            .tuple(&[r.add(p[0], p[2]).unwrap(), r.max(p[1], p[3]).unwrap()])
            .unwrap();
        r.build(t).unwrap()
    };
    let init0 = b.scalar(0.0f32).unwrap();
    let init1 = b.scalar(f32::NEG_INFINITY).unwrap();
    let v = b
        .reduce_variadic(&[pa, pa], &[init0, init1], &red, &[2])
        .unwrap();
    outs.push((
        "variadic_sum",
        b.get_tuple_element(v, 0).unwrap(),
        flat(&a.sum_axis(Axis(2))),
        1e-6,
    ));
    outs.push((
        "variadic_max",
        b.get_tuple_element(v, 1).unwrap(),
        flat(&a.map_axis(Axis(2), |v| v.fold(f64::MIN, |m, &x| m.max(x)))),
        0.0,
    ));
    let dims = DotDims {
        lhs_batch: vec![0],
        rhs_batch: vec![0],
        lhs_contracting: vec![2],
        rhs_contracting: vec![1],
    };
    let mut want = vec![0.0; 2 * 3 * 5];
    for n in 0..2 {
        for i in 0..3 {
            for j in 0..5 {
                want[n * 15 + i * 5 + j] = (0..4).map(|k| a[[n, i, k]] * bm[[n, k, j]]).sum();
            }
        }
    }
    outs.push((
        "dot_general",
        b.dot_general(pa, pb, &dims, Some(hlo_builder::Precision::Highest), None)
            .unwrap(),
        want,
        1e-6,
    ));
    let m = b.reshape(pa, &[6, 4]).unwrap();
    let vvec = b
        .slice(b.reshape(pb, &[40]).unwrap(), &[0], &[4], &[1])
        .unwrap();
    let want_mv: Vec<f64> = (0..6)
        .map(|r| (0..4).map(|k| av[r * 4 + k] as f64 * bv[k] as f64).sum())
        .collect();
    outs.push(("dot_mv", b.dot(m, vvec).unwrap(), want_mv, 1e-6));
    let ops: Vec<Op> = outs.iter().map(|o| o.1).collect();
    let comp = b.build(b.tuple(&ops).unwrap()).unwrap();
    let exe = compile(&comp);
    let res = exe
        .execute(&[&upload(&av, &[2, 3, 4]), &upload(&bv, &[2, 4, 5])])
        .unwrap();
    // The printer handles XLA's optimized module (fusions, copies, layouts) too.
    let optimized = hlo_builder::print_module_bytes(&exe.optimized_program().unwrap()).unwrap();
    assert!(
        optimized.contains("ENTRY %") && optimized.contains("ROOT %"),
        "{optimized}"
    );
    for ((name, _, want, tol), buf) in outs.iter().zip(&res) {
        assert_close(name, &buf.to_host::<f32>().unwrap(), want, *tol);
    }
}

#[test]
fn control_flow_runs() {
    let b = Builder::new("control");
    let n = b.parameter(Shape::scalar(ElementType::S32), "n").unwrap();
    let x = b.parameter(Shape::array(F32, &[3]), "x").unwrap();
    let st = Shape::tuple(vec![
        Shape::scalar(ElementType::S32),
        Shape::scalar(ElementType::S32),
        Shape::array(F32, &[3]),
    ]);
    let cond = {
        let c = b.sub_builder("cond");
        let p = c.parameter(st.clone(), "s").unwrap();
        let lt = c
            .compare(
                c.get_tuple_element(p, 0).unwrap(),
                c.get_tuple_element(p, 1).unwrap(),
                Cmp::Lt,
            )
            .unwrap();
        c.build(lt).unwrap()
    };
    let body = {
        let c = b.sub_builder("body");
        let p = c.parameter(st.clone(), "s").unwrap();
        let i = c.get_tuple_element(p, 0).unwrap();
        let v = c.get_tuple_element(p, 2).unwrap();
        // v = v * 2 + i
        let v2 = c
            .add(
                c.mul(v, c.scalar(2.0f32).unwrap()).unwrap(),
                c.convert(i, F32).unwrap(),
            )
            .unwrap();
        let t = c
            .tuple(&[
                c.add(i, c.scalar(1i32).unwrap()).unwrap(),
                c.get_tuple_element(p, 1).unwrap(),
                v2,
            ])
            .unwrap();
        c.build(t).unwrap()
    };
    let w = b
        .while_loop(
            &cond,
            &body,
            b.tuple(&[b.scalar(0i32).unwrap(), n, x]).unwrap(),
        )
        .unwrap();
    let looped = b.get_tuple_element(w, 2).unwrap();
    let branch = |name: &str, scale: f32| {
        let c = b.sub_builder(name);
        let p = c.parameter(Shape::array(F32, &[3]), "v").unwrap();
        let r = c.mul(p, c.scalar(scale).unwrap()).unwrap();
        c.build(r).unwrap()
    };
    let (br0, br1, br2) = (
        branch("times10", 10.0),
        branch("times100", 100.0),
        branch("neg", -1.0),
    );
    let pred = b.compare(n, b.scalar(3i32).unwrap(), Cmp::Gt).unwrap();
    let by_pred = b.conditional(pred, &[&br0, &br1], &[x, x]).unwrap();
    let by_index = b
        .conditional(b.scalar(2i32).unwrap(), &[&br0, &br1, &br2], &[x, x, x])
        .unwrap();
    let called = b.call(&br1, &[x]).unwrap();
    let comp = b
        .build(b.tuple(&[looped, by_pred, by_index, called]).unwrap())
        .unwrap();
    let exe = compile(&comp);
    let xv = [1.0f32, -2.0, 0.5];
    let nb = upload::<i32>(&[5], &[]);
    let res = exe.execute(&[&nb, &upload(&xv, &[3])]).unwrap();
    let mut want: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
    for i in 0..5 {
        for w in &mut want {
            *w = *w * 2.0 + i as f64;
        }
    }
    assert_close("while", &res[0].to_host::<f32>().unwrap(), &want, 1e-6);
    assert_close(
        "cond_pred",
        &res[1].to_host::<f32>().unwrap(),
        &xv.iter().map(|&v| v as f64 * 10.0).collect::<Vec<_>>(),
        1e-6,
    );
    assert_close(
        "cond_index",
        &res[2].to_host::<f32>().unwrap(),
        &xv.iter().map(|&v| -(v as f64)).collect::<Vec<_>>(),
        0.0,
    );
    assert_close(
        "call",
        &res[3].to_host::<f32>().unwrap(),
        &xv.iter().map(|&v| v as f64 * 100.0).collect::<Vec<_>>(),
        1e-6,
    );
}

#[test]
fn threefry_and_samplers() {
    let b = Builder::new("rng");
    let key = b.rng_key(0x0123_4567_89ab_cdef).unwrap();
    let bits = b.random_bits(key, &[5, 3]).unwrap();
    let key2 = b.random_fold_in(key, 7).unwrap();
    let n = 8192i64;
    let uni = b.random_uniform(key2, F32, &[n], -2.0, 3.0).unwrap();
    let nrm = b.random_normal(key2, F32, &[n]).unwrap();
    let nrm64 = b.random_normal(key, ElementType::F64, &[4]).unwrap();
    let comp = b
        .build(b.tuple(&[bits, key2, uni, nrm, nrm64]).unwrap())
        .unwrap();
    let exe = compile(&comp);
    let res = exe.execute(&[]).unwrap();
    // random_bits: counters (i, i + half) for i < half, outputs y0 then y1.
    let k = [0x0123_4567u32, 0x89ab_cdef];
    let half = 8u32;
    let mut want = Vec::new();
    let pairs: Vec<[u32; 2]> = (0..half)
        .map(|i| threefry2x32_host(k, [i, i + half]))
        .collect();
    want.extend(pairs.iter().map(|p| p[0]));
    want.extend(pairs.iter().map(|p| p[1]));
    want.truncate(15);
    assert_eq!(res[0].to_host::<u32>().unwrap(), want);
    let fk = threefry2x32_host(k, [0, 7]);
    assert_eq!(res[1].to_host::<u32>().unwrap(), fk.to_vec());
    let u = res[2].to_host::<f32>().unwrap();
    assert!(u.iter().all(|&v| (-2.0..3.0).contains(&v)));
    let mean = u.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!((mean - 0.5).abs() < 0.05, "uniform mean {mean}");
    let z = res[3].to_host::<f32>().unwrap();
    let m = z.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = z.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n as f64;
    assert!(
        m.abs() < 0.05 && (var.sqrt() - 1.0).abs() < 0.05,
        "normal mean {m} std {}",
        var.sqrt()
    );
    assert!(z.iter().all(|v| v.is_finite()));
    assert_eq!(res[4].to_host::<f64>().unwrap().len(), 4);
}

fn scale_add(frame: &mut pjrt::ffi::CallFrame<'_>) -> Result<(), pjrt::ffi::FfiError> {
    let scale = frame.attr_f64("scale")? as f32;
    let offset = frame.attr_i64("offset")? as f32;
    if frame.attr_str("mode")? != "affine" {
        return Err(pjrt::ffi::FfiError::invalid_argument("mode"));
    }
    let x = frame.arg(0)?.as_slice::<f32>()?.to_vec();
    let mut y = frame.ret(0)?;
    for (o, i) in y.as_mut_slice::<f32>()?.iter_mut().zip(x) {
        *o = scale * i + offset;
    }
    Ok(())
}
pjrt::ffi_handler!(SCALE_ADD, scale_add);

#[test]
fn custom_call_reaches_ffi_handler_with_attributes() {
    client()
        .register_ffi_handler("hlo_builder_test_scale_add", SCALE_ADD)
        .unwrap();
    let b = Builder::new("cc");
    let x = b.parameter(Shape::array(F32, &[4]), "x").unwrap();
    let attrs = [
        ("scale", Attr::F32(2.5)),
        ("offset", Attr::I64(-3)),
        ("mode", Attr::Str("affine".into())),
    ];
    let y = b
        .custom_call(
            "hlo_builder_test_scale_add",
            &[x],
            Shape::array(F32, &[4]),
            &attrs,
        )
        .unwrap();
    let z = b.add(y, b.scalar(1.0f32).unwrap()).unwrap();
    let exe = compile(&b.build(z).unwrap());
    let out = exe
        .execute(&[&upload::<f32>(&[1.0, 2.0, -1.0, 0.0], &[4])])
        .unwrap();
    assert_eq!(out[0].to_host::<f32>().unwrap(), vec![0.5, 3.0, -4.5, -2.0]);

    // A target without a handler is a NOT_FOUND compile error.
    let b = Builder::new("missing");
    let x = b.parameter(Shape::array(F32, &[4]), "x").unwrap();
    let y = b
        .custom_call(
            "hlo_builder_no_such_handler",
            &[x],
            Shape::array(F32, &[4]),
            &[],
        )
        .unwrap();
    let result = client().compile(
        pjrt::Program::Hlo(&b.build(y).unwrap().to_bytes()),
        &pjrt::CompileOptions::default(),
    );
    match result {
        Err(pjrt::Error::Pjrt { code, message, .. }) => {
            assert_eq!(code, pjrt::ErrorCode::NotFound, "{message}")
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("compiling a call to a missing FFI handler must fail"),
    }
}

#[test]
fn tiled_sharding_compiles_for_four_partitions() {
    let b = Builder::new("spmd");
    let x = b.parameter(Shape::array(F32, &[16]), "x").unwrap();
    b.set_sharding(x, Sharding::tiled(&[4])).unwrap();
    let y = b
        .add(
            b.mul(x, b.scalar(2.0f32).unwrap()).unwrap(),
            b.scalar(1.0f32).unwrap(),
        )
        .unwrap();
    b.set_sharding(y, Sharding::tiled(&[4])).unwrap();
    let comp = b.build(y).unwrap();
    let exe = client()
        .compile(
            pjrt::Program::Hlo(&comp.to_bytes()),
            &pjrt::CompileOptions::spmd(4),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", comp.to_text()));
    assert_eq!(exe.num_partitions().unwrap(), 4);
    let devices = exe.addressable_devices().to_vec();
    let shards: Vec<pjrt::Buffer> = devices
        .iter()
        .enumerate()
        .map(|(d, dev)| {
            client()
                .buffer_from_host::<f32>(
                    &[
                        4.0 * d as f32,
                        4.0 * d as f32 + 1.0,
                        4.0 * d as f32 + 2.0,
                        4.0 * d as f32 + 3.0,
                    ],
                    &[4],
                    Some(dev),
                )
                .unwrap()
        })
        .collect();
    let args: Vec<Vec<&pjrt::Buffer>> = shards.iter().map(|s| vec![s]).collect();
    let outs = exe.execute_sharded(&args).unwrap();
    let got: Vec<f32> = outs
        .iter()
        .flat_map(|o| o[0].to_host::<f32>().unwrap())
        .collect();
    assert_eq!(
        got,
        (0..16).map(|i| 2.0 * i as f32 + 1.0).collect::<Vec<_>>()
    );
}

#[test]
fn softmax_matches_f64_on_every_axis() {
    let (r, c) = (3usize, 5usize);
    let x = values(r * c, -4.0, 4.0, 11);
    let b = Builder::new("softmax");
    let p = b
        .parameter(Shape::array(F32, &[r as i64, c as i64]), "x")
        .unwrap();
    let rows = b.softmax(p, -1).unwrap();
    let cols = b.softmax(p, 0).unwrap();
    let comp = b.build(b.tuple(&[rows, cols]).unwrap()).unwrap();
    let res = compile(&comp)
        .execute(&[&upload(&x, &[r as i64, c as i64])])
        .unwrap();
    let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    // Plain exp/sum in f64 (no max subtraction): an independent formula.
    let mut want_rows = vec![0.0; r * c];
    let mut want_cols = vec![0.0; r * c];
    for i in 0..r {
        let z: f64 = (0..c).map(|j| xd[i * c + j].exp()).sum();
        for j in 0..c {
            want_rows[i * c + j] = xd[i * c + j].exp() / z;
        }
    }
    for j in 0..c {
        let z: f64 = (0..r).map(|i| xd[i * c + j].exp()).sum();
        for i in 0..r {
            want_cols[i * c + j] = xd[i * c + j].exp() / z;
        }
    }
    assert_close(
        "softmax(-1)",
        &res[0].to_host::<f32>().unwrap(),
        &want_rows,
        1e-6,
    );
    assert_close(
        "softmax(0)",
        &res[1].to_host::<f32>().unwrap(),
        &want_cols,
        1e-6,
    );
    let e = b.softmax(p, 2).unwrap_err().to_string();
    assert!(
        e.contains("softmax: axis 2 is out of range for f32[3,5]"),
        "{e}"
    );
}
