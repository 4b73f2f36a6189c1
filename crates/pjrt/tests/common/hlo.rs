//! A minimal `xla.HloModuleProto` shared by the pjrt tests, built from `xla_data`'s protos.
#![allow(dead_code)]

use xla_data::proto::{
    HloComputationProto, HloInstructionProto, HloModuleProto, LayoutProto, ProgramShapeProto,
    ShapeProto,
};
use xla_data::ElementType;

/// `f32[n]` with the default layout.
pub fn vec_f32(n: i64) -> ShapeProto {
    ShapeProto {
        element_type: ElementType::F32.primitive_type(),
        dimensions: vec![n],
        layout: Some(LayoutProto {
            minor_to_major: vec![0],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `(p0 + p1) * p1` over `f32[n]`.
pub fn add_mul_module(n: i64) -> Vec<u8> {
    use prost::Message;
    let s = vec_f32(n);
    let inst = |id: i64, name: &str, opcode: &str, param: i64, ops: Vec<i64>| HloInstructionProto {
        name: name.into(),
        opcode: opcode.into(),
        shape: Some(s.clone()),
        parameter_number: param,
        id,
        operand_ids: ops,
        ..Default::default()
    };
    let ps = ProgramShapeProto {
        parameters: vec![s.clone(), s.clone()],
        result: Some(s.clone()),
        parameter_names: vec!["p0".into(), "p1".into()],
    };
    let comp = HloComputationProto {
        name: "main.5".into(),
        instructions: vec![
            inst(1, "p0", "parameter", 0, vec![]),
            inst(2, "p1", "parameter", 1, vec![]),
            inst(3, "sum", "add", 0, vec![1, 2]),
            inst(4, "prod", "multiply", 0, vec![3, 2]),
        ],
        program_shape: Some(ps.clone()),
        id: 5,
        root_id: 4,
        ..Default::default()
    };
    HloModuleProto {
        name: "add_mul".into(),
        entry_computation_name: "main.5".into(),
        computations: vec![comp],
        host_program_shape: Some(ps),
        id: 1,
        entry_computation_id: 5,
        ..Default::default()
    }
    .encode_to_vec()
}
