//! Proto invariants (decoded from our own bytes), HLO text goldens and builder error messages.
//! No PJRT plugin needed.

use std::collections::{HashMap, HashSet};

use hlo_builder::proto::{HloModuleProto, ShapeProto};
use hlo_builder::{Attr, Builder, Cmp, Computation, DotDims, ElementType, Error, Shape, Sharding};
use prost::Message;

const F32: ElementType = ElementType::F32;

fn f32s(d: &[i64]) -> Shape {
    Shape::array(F32, d)
}

/// Compare `text` with `tests/golden/<name>`; rewrite it when `RATTN_REGEN_GOLDENS=1`.
fn golden(name: &str, text: &str) {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var("RATTN_REGEN_GOLDENS").as_deref() == Ok("1") {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing golden {path}; run with RATTN_REGEN_GOLDENS=1"));
    assert!(text == want, "golden {name} differs (regenerate with RATTN_REGEN_GOLDENS=1 after review):\n--- got ---\n{text}\n--- want ---\n{want}");
}

fn mlp() -> Computation {
    let b = Builder::new("mlp");
    let x = b.parameter(f32s(&[2, 3]), "x").unwrap();
    let w = b.parameter(f32s(&[3, 4]), "w").unwrap();
    let bias = b.parameter(f32s(&[4]), "bias").unwrap();
    let _l = b.name_scope("layer_0");
    let h = b.dot(x, w).unwrap();
    let hb = b
        .add(h, b.broadcast_in_dim(bias, &[2, 4], &[1]).unwrap())
        .unwrap();
    let a = b.tanh(hb).unwrap();
    let s = b.reduce_sum(a, &[1]).unwrap();
    let m = b.reduce_max(a, &[1]).unwrap();
    let r = b.tuple(&[s, m]).unwrap();
    b.build(r).unwrap()
}

fn counter_loop() -> Computation {
    let b = Builder::new("loop");
    let n = b.parameter(Shape::scalar(ElementType::S32), "n").unwrap();
    let st = Shape::tuple(vec![
        Shape::scalar(ElementType::S32),
        Shape::scalar(ElementType::S32),
        f32s(&[3]),
    ]);
    let cond = {
        let c = b.sub_builder("cond");
        let p = c.parameter(st.clone(), "state").unwrap();
        let i = c.get_tuple_element(p, 0).unwrap();
        let n = c.get_tuple_element(p, 1).unwrap();
        let lt = c.compare(i, n, Cmp::Lt).unwrap();
        c.build(lt).unwrap()
    };
    let body = {
        let c = b.sub_builder("body");
        let p = c.parameter(st.clone(), "state").unwrap();
        let i = c.get_tuple_element(p, 0).unwrap();
        let n = c.get_tuple_element(p, 1).unwrap();
        let v = c.get_tuple_element(p, 2).unwrap();
        let i1 = c.add(i, c.scalar(1i32).unwrap()).unwrap();
        let v1 = c.mul(v, c.scalar(2.0f32).unwrap()).unwrap();
        let t = c.tuple(&[i1, n, v1]).unwrap();
        c.build(t).unwrap()
    };
    let init = b
        .tuple(&[b.scalar(0i32).unwrap(), n, b.ones(F32, &[3]).unwrap()])
        .unwrap();
    let w = b.while_loop(&cond, &body, init).unwrap();
    let out = b.get_tuple_element(w, 2).unwrap();
    b.build(out).unwrap()
}

fn custom_and_sharding() -> Computation {
    let b = Builder::new("kernel");
    let x = b.parameter(f32s(&[8, 16]), "x").unwrap();
    b.set_sharding(x, Sharding::tiled(&[4, 1])).unwrap();
    let _s = b.name_scope("rla");
    let y = b
        .custom_call(
            "rla_fwd",
            &[x],
            f32s(&[8, 16]),
            &[
                ("scale", Attr::F32(2.0)),
                ("chunk", Attr::I64(512)),
                ("feature_map", Attr::Str("softmax".into())),
            ],
        )
        .unwrap();
    b.set_sharding(y, Sharding::Replicated).unwrap();
    let z = b.neg(y).unwrap();
    b.set_sharding(z, Sharding::Maximal { device: 0 }).unwrap();
    b.build(z).unwrap()
}

fn data_movement() -> Computation {
    let b = Builder::new("moves");
    let x = b.parameter(f32s(&[4, 6]), "x").unwrap();
    let i = b.parameter(Shape::scalar(ElementType::S32), "i").unwrap();
    let c = b
        .constant_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])
        .unwrap();
    let s = b.slice(x, &[0, 0], &[4, 6], &[2, 2]).unwrap();
    let cat = b.concatenate(&[s, c], 0).unwrap();
    let p = b
        .pad(cat, b.scalar(0.0f32).unwrap(), &[(1, -1, 0), (0, 2, 1)])
        .unwrap();
    let t = b.transpose(p, &[1, 0]).unwrap();
    let d = b
        .dynamic_slice(x, &[i, b.scalar(0i32).unwrap()], &[2, 6])
        .unwrap();
    let io = b.iota(ElementType::S32, &[2, 6], 1).unwrap();
    let mask = b
        .compare(
            b.convert(io, F32).unwrap(),
            b.scalar(2.5f32).unwrap(),
            Cmp::Gt,
        )
        .unwrap();
    let sel = b.select(mask, d, b.zeros(F32, &[2, 6]).unwrap()).unwrap();
    let r = b.reshape(sel, &[12]).unwrap();
    let bd = DotDims {
        lhs_batch: vec![],
        rhs_batch: vec![],
        lhs_contracting: vec![1],
        rhs_contracting: vec![0],
    };
    let dg = b
        .dot_general(t, x, &bd, Some(hlo_builder::Precision::Highest), None)
        .unwrap();
    let out = b.tuple(&[r, dg]).unwrap();
    b.build(out).unwrap()
}

fn all_arrays_have_layouts(s: &ShapeProto) -> bool {
    if s.element_type == 13 {
        return s.layout.is_none() && s.tuple_shapes.iter().all(all_arrays_have_layouts);
    }
    s.layout.as_ref().is_some_and(|l| {
        let mut m = l.minor_to_major.clone();
        m.sort();
        m == (0..s.dimensions.len() as i64).collect::<Vec<_>>()
    })
}

fn check_invariants(comp: &Computation) -> HloModuleProto {
    let bytes = comp.to_bytes();
    let m = HloModuleProto::decode(bytes.as_slice()).unwrap();
    assert_eq!(m, comp.to_proto(), "decode(encode(m)) == m");
    let mut ids = HashSet::new();
    let mut names = HashSet::new();
    let mut defined_comps = HashSet::new();
    for c in &m.computations {
        assert!(
            c.id != 0 && ids.insert(c.id),
            "computation id {} zero or duplicate",
            c.id
        );
        assert!(
            names.insert(c.name.clone()),
            "duplicate computation name {}",
            c.name
        );
        let local: HashMap<i64, usize> = c
            .instructions
            .iter()
            .enumerate()
            .map(|(i, x)| (x.id, i))
            .collect();
        assert!(
            local.contains_key(&c.root_id),
            "root id of {} missing",
            c.name
        );
        let ps = c.program_shape.as_ref().unwrap();
        let root = &c.instructions[local[&c.root_id]];
        assert_eq!(ps.result.as_ref(), root.shape.as_ref());
        let mut params: Vec<_> = c
            .instructions
            .iter()
            .filter(|i| i.opcode == "parameter")
            .collect();
        params.sort_by_key(|p| p.parameter_number);
        assert_eq!(
            params
                .iter()
                .map(|p| p.parameter_number)
                .collect::<Vec<_>>(),
            (0..params.len() as i64).collect::<Vec<_>>()
        );
        assert_eq!(
            ps.parameters,
            params
                .iter()
                .map(|p| p.shape.clone().unwrap())
                .collect::<Vec<_>>()
        );
        for (pos, ins) in c.instructions.iter().enumerate() {
            assert!(
                ins.id != 0 && ids.insert(ins.id),
                "instruction id {} zero or duplicate",
                ins.id
            );
            assert!(
                names.insert(ins.name.clone()),
                "duplicate name {}",
                ins.name
            );
            assert!(
                all_arrays_have_layouts(ins.shape.as_ref().unwrap()),
                "{} lacks a layout",
                ins.name
            );
            for o in &ins.operand_ids {
                assert!(
                    local.get(o).is_some_and(|&p| p < pos),
                    "{}: operand {o} not defined before use",
                    ins.name
                );
            }
            for cc in &ins.called_computation_ids {
                assert!(
                    defined_comps.contains(cc),
                    "{}: callee {cc} must come earlier",
                    ins.name
                );
            }
            let md = ins.metadata.as_ref().unwrap();
            assert!(
                md.source_file.ends_with("tests/proto_text.rs") && md.source_line > 0,
                "{md:?}"
            );
        }
        defined_comps.insert(c.id);
    }
    let entry = m.computations.last().unwrap();
    assert_eq!(entry.id, m.entry_computation_id);
    assert_eq!(entry.name, m.entry_computation_name);
    assert_eq!(m.host_program_shape, entry.program_shape);
    let (params, result) = comp.program_shape();
    let hps = m.host_program_shape.as_ref().unwrap();
    assert_eq!(
        hps.parameters,
        params.iter().map(Shape::to_proto).collect::<Vec<_>>()
    );
    assert_eq!(hps.result, Some(result.to_proto()));
    m
}

#[test]
fn proto_invariants_hold() {
    for comp in [
        mlp(),
        counter_loop(),
        custom_and_sharding(),
        data_movement(),
    ] {
        check_invariants(&comp);
    }
    let m = check_invariants(&mlp());
    // reduce_sum and reduce_max each call one cached scalar reducer; entry comes last.
    assert_eq!(m.computations.len(), 3);
    let m = check_invariants(&custom_and_sharding());
    let cc = m.computations[0]
        .instructions
        .iter()
        .find(|i| i.opcode == "custom-call")
        .unwrap();
    assert_eq!(cc.custom_call_target, "rla_fwd");
    assert_eq!(cc.custom_call_api_version, 4);
    assert_eq!(
        String::from_utf8(cc.backend_config.clone()).unwrap(),
        "{chunk = 512 : i64, feature_map = \"softmax\", scale = 2.000000e+00 : f32}"
    );
    let md = cc.metadata.as_ref().unwrap();
    assert_eq!(md.op_name, format!("rla/{}", cc.name));
    assert_eq!(md.op_type, "custom-call");
}

#[test]
fn text_goldens_are_stable() {
    for (name, make) in [
        ("mlp.hlo", mlp as fn() -> Computation),
        ("while_loop.hlo", counter_loop),
        ("custom_call_sharding.hlo", custom_and_sharding),
        ("data_movement.hlo", data_movement),
    ] {
        let t1 = make().to_text();
        let t2 = make().to_text();
        assert_eq!(t1, t2, "{name}: text differs between two identical builds");
        golden(name, &t1);
        // The printer also works from decoded bytes.
        assert_eq!(
            hlo_builder::print_module_bytes(&make().to_bytes()).unwrap(),
            t1
        );
    }
}

#[test]
fn text_spells_xla_attributes() {
    let t = custom_and_sharding().to_text();
    for s in [
        "sharding={devices=[4,1]0,1,2,3}",
        "sharding={replicated}",
        "sharding={maximal device=0}",
        "custom_call_target=\"rla_fwd\"",
        "api_version=API_VERSION_TYPED_FFI",
        "entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}",
    ] {
        assert!(t.contains(s), "missing {s} in\n{t}");
    }
    let t = counter_loop().to_text();
    assert!(
        t.contains("condition=%cond.") && t.contains("body=%body.") && t.contains("direction=LT"),
        "{t}"
    );
    let t = data_movement().to_text();
    for s in [
        "slice={[0:4:2], [0:6:2]}",
        "padding=1_-1x0_2_1",
        "dimensions={1,0}",
        "dynamic_slice_sizes={2,6}",
        "iota_dimension=1",
        "operand_precision={highest,highest}",
        "lhs_contracting_dims={1}",
        "rhs_contracting_dims={0}",
    ] {
        assert!(t.contains(s), "missing {s} in\n{t}");
    }
}

#[test]
fn errors_name_op_shapes_location_and_scope() {
    let b = Builder::new("err");
    let x = b.parameter(f32s(&[2, 3]), "x").unwrap();
    let y = b.parameter(f32s(&[4, 5]), "y").unwrap();
    let _a = b.name_scope("layer_3");
    let _b = b.name_scope("rla");
    let line = line!() + 1;
    let e = b.dot(x, y).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("dot_general: lhs contracting dim 1 (size 3) != rhs contracting dim 0 (size 4): lhs f32[2,3], rhs f32[4,5] (built at crates/hlo-builder/tests/proto_text.rs:{line} in layer_3/rla)")
    );
    assert!(matches!(e, Error::Shape { .. }));
    let e = b.add(x, y).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("add: incompatible shapes: lhs f32[2,3], rhs f32[4,5] (built at"),
        "{e}"
    );

    // An op of another builder is an error, not a panic.
    let other = Builder::new("other");
    let z = other.parameter(f32s(&[2, 3]), "z").unwrap();
    let e = b.add(x, z).unwrap_err();
    assert!(
        e.to_string().contains("does not belong to builder `err`"),
        "{e}"
    );
    // A computation of another module is refused.
    let foreign = other.build(z).unwrap();
    let e = b.call(&foreign, &[x]).unwrap_err();
    assert!(e.to_string().contains("belongs to another module"), "{e}");
    // A bad sharding.
    let e = b.set_sharding(x, Sharding::tiled(&[4])).unwrap_err();
    assert!(
        e.to_string()
            .contains("tile assignment dims [4] have rank 1 but the value f32[2,3] needs 2"),
        "{e}"
    );
    // Failed ops leave no instructions behind (scalar-broadcast checks come first).
    let before = b.instruction_count();
    let s = b.scalar(1i32).unwrap();
    assert!(b.add(x, s).is_err());
    assert_eq!(b.instruction_count(), before + 1);
}

#[test]
fn scalar_operands_broadcast_implicitly() {
    let b = Builder::new("bcast");
    let x = b.parameter(f32s(&[2, 3]), "x").unwrap();
    let y = b.mul(b.scalar(3.0f32).unwrap(), x).unwrap();
    assert_eq!(b.shape(y).unwrap(), f32s(&[2, 3]));
    let t = b.build(y).unwrap().to_text();
    assert!(
        t.contains("f32[2,3]{1,0} broadcast(f32[] %constant."),
        "{t}"
    );
    // Size-1 dims expand through a reshape + broadcast.
    let b = Builder::new("expand");
    let x = b.parameter(f32s(&[1, 3]), "x").unwrap();
    let y = b.broadcast_in_dim(x, &[5, 3], &[0, 1]).unwrap();
    assert_eq!(b.shape(y).unwrap(), f32s(&[5, 3]));
    let t = b.build(y).unwrap().to_text();
    assert!(
        t.contains("f32[3]{0} reshape(") && t.contains("dimensions={1}"),
        "{t}"
    );
}
