//! `input_output_alias`: a donated parameter's buffer is reused for the aliased output.

use hlo_builder::{Builder, ElementType};
use hlo_tests::{compile, param, upload};

#[test]
fn aliased_output_reuses_the_donated_parameter() {
    let b = Builder::new("alias");
    let x = param(&b, ElementType::F32, &[1024], "x");
    let y = param(&b, ElementType::F32, &[4], "y");
    let x1 = b.add(x, b.scalar(1.0f32).unwrap()).unwrap();
    let s = b.reduce_sum(y, &[0]).unwrap();
    let comp = b.build(b.tuple(&[x1, s]).unwrap()).unwrap();
    // Shape mismatches and double aliasing are refused.
    assert!(comp
        .clone()
        .with_input_output_alias(0, 1)
        .unwrap_err()
        .to_string()
        .contains("f32[1024]"));
    assert!(comp.clone().with_input_output_alias(2, 0).is_err());
    let comp = comp.with_input_output_alias(0, 0).unwrap();
    assert!(comp.clone().with_input_output_alias(0, 0).is_err());
    let text = comp.to_text();
    assert!(
        text.contains("input_output_alias={ {0}: (0, {}, may-alias) }"),
        "{text}"
    );

    let exe = compile(&comp);
    let xs: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    let xb = upload(&xs, &[1024]);
    let yb = upload(&[1.0f32, 2.0, 3.0, 4.0], &[4]);
    let addr = xb.device_address().unwrap();
    let out = exe.execute_donating(vec![xb, yb]).unwrap();
    assert_eq!(
        out[0].device_address().unwrap(),
        addr,
        "the output did not reuse the donated input"
    );
    let got = out[0].to_host::<f32>().unwrap();
    assert!(got.iter().zip(&xs).all(|(g, x)| *g == x + 1.0));
    assert_eq!(out[1].to_host::<f32>().unwrap(), vec![10.0]);
}

/// Whether the last `hlo_tests_axpy_in_place` call saw its operand 2 and result 0 as one buffer.
static AXPY_SAME_BUFFER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `(a, x, y) → (y + a·x in y's buffer, Σ of it)`, refusing a second view of the pair.
fn axpy_in_place(frame: &mut pjrt::ffi::CallFrame<'_>) -> Result<(), pjrt::ffi::FfiError> {
    use std::sync::atomic::Ordering;
    if frame.same_buffer(2, 0)? {
        AXPY_SAME_BUFFER.fetch_add(1, Ordering::SeqCst);
    }
    let a = frame.arg(0)?.as_slice::<f32>()?[0];
    let x = frame.arg(1)?.as_slice::<f32>()?;
    let y = frame.in_place_mut::<f32>(2, 0)?;
    // The pair cannot be reached a second time, nor through the shared views.
    if frame.arg(2).is_ok() || frame.ret(0).is_ok() || frame.in_place_mut::<f32>(2, 0).is_ok() {
        return Err(pjrt::ffi::FfiError::internal("a second view of the pair"));
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
    let sum: f32 = y.iter().sum();
    frame.ret(1)?.as_mut_slice::<f32>()?[0] = sum;
    Ok(())
}
pjrt::ffi_handler!(AXPY_IN_PLACE, axpy_in_place);

#[test]
fn custom_call_output_updates_its_operand_in_place() {
    use std::sync::atomic::Ordering;
    hlo_tests::client()
        .register_ffi_handler("hlo_tests_axpy_in_place", AXPY_IN_PLACE)
        .unwrap();
    let n = 1000usize;
    let b = Builder::new("in_place");
    let a = param(&b, ElementType::F32, &[], "a");
    let x = param(&b, ElementType::F32, &[n as i64], "x");
    let y = param(&b, ElementType::F32, &[n as i64], "y");
    let out = hlo_builder::Shape::tuple(vec![
        hlo_builder::Shape::array(ElementType::F32, &[n as i64]),
        hlo_builder::Shape::scalar(ElementType::F32),
    ]);
    let t = "hlo_tests_axpy_in_place";
    // Shape checks name the op, the target and the pair.
    for (aliases, want) in [
        (vec![(1, 1)], "alias (output 1, operand 1)"),
        (vec![(0, 3)], "has 3 operands"),
        (vec![(2, 2)], "has 2 elements"),
        (vec![(0, 2), (0, 1)], "repeats"),
    ] {
        let e = b
            .custom_call_in_place(t, &[a, x, y], out.clone(), &[], &aliases)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("custom_call") && e.contains(t) && e.contains(want),
            "{e}"
        );
    }
    // On a (non-donated) parameter: XLA must copy y first. On an intermediate: no copy needed.
    let c1 = b
        .custom_call_in_place(t, &[a, x, y], out.clone(), &[], &[(0, 2)])
        .unwrap();
    let y2 = b.mul(y, b.scalar(2.0f32).unwrap()).unwrap();
    let c2 = b
        .custom_call_in_place(t, &[a, x, y2], out, &[], &[(0, 2)])
        .unwrap();
    let outs: Vec<_> = [(c1, 0), (c2, 0), (c2, 1)]
        .iter()
        .map(|&(c, k)| b.get_tuple_element(c, k).unwrap())
        .collect();
    let comp = b.build(b.tuple(&outs).unwrap()).unwrap();
    let text = comp.to_text();
    assert_eq!(
        text.matches("output_to_operand_aliasing={{0}: (2, {})}")
            .count(),
        2,
        "{text}"
    );
    let exe = compile(&comp);
    let xs = hlo_tests::values(n, -1.0, 1.0, 1);
    let ys = hlo_tests::values(n, -1.0, 1.0, 2);
    let yb = upload(&ys, &[n as i64]);
    let before = AXPY_SAME_BUFFER.load(Ordering::SeqCst);
    let res = exe
        .execute(&[&upload(&[0.5f32], &[]), &upload(&xs, &[n as i64]), &yb])
        .unwrap();
    assert_eq!(
        AXPY_SAME_BUFFER.load(Ordering::SeqCst) - before,
        2,
        "XLA did not give both results their operand's buffer"
    );
    // The parameter itself is untouched.
    assert_eq!(yb.to_host::<f32>().unwrap(), ys);
    let want1: Vec<f64> = (0..n).map(|i| ys[i] as f64 + 0.5 * xs[i] as f64).collect();
    let want2: Vec<f64> = (0..n)
        .map(|i| 2.0 * ys[i] as f64 + 0.5 * xs[i] as f64)
        .collect();
    hlo_tests::assert_close("y + a x", &res[0].to_host::<f32>().unwrap(), &want1, 1e-6);
    hlo_tests::assert_close("2y + a x", &res[1].to_host::<f32>().unwrap(), &want2, 1e-6);
    let sum: f64 = want2.iter().sum();
    let got = res[2].to_host::<f32>().unwrap()[0] as f64;
    assert!(
        (got - sum).abs() <= 1e-4 * want2.iter().map(|v| v.abs()).sum::<f64>(),
        "{got} vs {sum}"
    );
}
