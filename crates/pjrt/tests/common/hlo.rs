//! A minimal hand-derived `xla.HloModuleProto` shared by the pjrt tests (field numbers from
//! hlo.proto / xla_data.proto). hlo-builder cannot be used here: it depends on this crate.
#![allow(dead_code)]

#[derive(Clone, PartialEq, prost::Message)]
pub struct LayoutProto {
    #[prost(int64, repeated, tag = "1")]
    pub minor_to_major: Vec<i64>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShapeProto {
    #[prost(int32, tag = "2")]
    pub element_type: i32,
    #[prost(int64, repeated, tag = "3")]
    pub dimensions: Vec<i64>,
    #[prost(message, optional, tag = "5")]
    pub layout: Option<LayoutProto>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProgramShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub parameters: Vec<ShapeProto>,
    #[prost(message, optional, tag = "2")]
    pub result: Option<ShapeProto>,
    #[prost(string, repeated, tag = "3")]
    pub parameter_names: Vec<String>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct HloInstructionProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub opcode: String,
    #[prost(message, optional, tag = "3")]
    pub shape: Option<ShapeProto>,
    #[prost(int64, tag = "9")]
    pub parameter_number: i64,
    #[prost(int64, tag = "35")]
    pub id: i64,
    #[prost(int64, repeated, tag = "36")]
    pub operand_ids: Vec<i64>,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct HloComputationProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub instructions: Vec<HloInstructionProto>,
    #[prost(message, optional, tag = "4")]
    pub program_shape: Option<ProgramShapeProto>,
    #[prost(int64, tag = "5")]
    pub id: i64,
    #[prost(int64, tag = "6")]
    pub root_id: i64,
}
#[derive(Clone, PartialEq, prost::Message)]
pub struct HloModuleProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub entry_computation_name: String,
    #[prost(message, repeated, tag = "3")]
    pub computations: Vec<HloComputationProto>,
    #[prost(message, optional, tag = "4")]
    pub host_program_shape: Option<ProgramShapeProto>,
    #[prost(int64, tag = "5")]
    pub id: i64,
    #[prost(int64, tag = "6")]
    pub entry_computation_id: i64,
}

/// `f32[n]` with the default layout.
pub fn vec_f32(n: i64) -> ShapeProto {
    ShapeProto {
        element_type: 11,
        dimensions: vec![n],
        layout: Some(LayoutProto {
            minor_to_major: vec![0],
        }),
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
    };
    HloModuleProto {
        name: "add_mul".into(),
        entry_computation_name: "main.5".into(),
        computations: vec![comp],
        host_program_shape: Some(ps),
        id: 1,
        entry_computation_id: 5,
    }
    .encode_to_vec()
}

/// Just the name of a module (field 1), to read back optimized programs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModuleName {
    #[prost(string, tag = "1")]
    pub name: String,
}
