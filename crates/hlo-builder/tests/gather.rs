//! `gather`, `scatter` and `take_rows` without a runtime: their HLO text and their errors.
//! (Execution against ndarray references and the VJPs are in crates/hlo-tests/tests/gather.rs.)

use hlo_builder::{Builder, ElementType, ScatterDims, ScatterUpdate, Shape};

const F32: ElementType = ElementType::F32;
const S32: ElementType = ElementType::S32;

#[test]
fn text_uses_xla_attribute_spellings() {
    let b = Builder::new("text");
    let t = b.parameter(Shape::array(F32, &[10, 4]), "table").unwrap();
    let ids = b.parameter(Shape::array(S32, &[2, 3]), "ids").unwrap();
    let g = b.take_rows(t, ids).unwrap();
    let d = ScatterDims {
        update_window_dims: vec![2],
        inserted_window_dims: vec![0],
        scatter_dims_to_operand_dims: vec![0],
        index_vector_dim: 2,
    };
    let z = b.zeros(F32, &[10, 4]).unwrap();
    let sc = b.scatter(z, ids, g, &d, ScatterUpdate::Add).unwrap();
    let text = b.build(b.tuple(&[g, sc]).unwrap()).unwrap().to_text();
    for want in [
        "f32[2,3,4]{2,1,0} gather(f32[10,4]{1,0} %table.1, s32[2,3]{1,0} %ids.2), offset_dims={2}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=2, slice_sizes={1,4}",
        "scatter(f32[10,4]{1,0} %",
        "update_window_dims={2}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=2, to_apply=%region_add_f32",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
}

#[test]
fn errors_name_op_shapes_and_call_site() {
    let b = Builder::new("err");
    let t = b.parameter(Shape::array(F32, &[10, 4]), "table").unwrap();
    let ids = b.parameter(Shape::array(F32, &[3]), "ids").unwrap();
    let e = b.take_rows(t, ids).unwrap_err().to_string();
    assert!(
        e.contains("take_rows") && e.contains("indices must have an integer type, got f32[3]"),
        "{e}"
    );
    assert!(e.contains("tests/gather.rs"), "{e}");
    let ids = b.parameter(Shape::array(S32, &[3]), "ids2").unwrap();
    let u = b.parameter(Shape::array(F32, &[3, 5]), "u").unwrap();
    let d = ScatterDims {
        update_window_dims: vec![1],
        inserted_window_dims: vec![0],
        scatter_dims_to_operand_dims: vec![0],
        index_vector_dim: 1,
    };
    let e = b
        .scatter(t, ids, u, &d, ScatterUpdate::Add)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scatter: update window dim 1 (size 5) is larger than operand dim 1 (size 4)"),
        "{e}"
    );
    let s = b.parameter(Shape::scalar(F32), "s").unwrap();
    let e = b.take_rows(s, ids).unwrap_err().to_string();
    assert!(
        e.contains("table must be an array of rank >= 1, got f32[]"),
        "{e}"
    );
}
