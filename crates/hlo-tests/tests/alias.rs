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
