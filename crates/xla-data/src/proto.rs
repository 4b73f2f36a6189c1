//! Hand-written `prost` messages for the subset of XLA's `hlo.proto` / `xla_data.proto` that
//! the graph builder emits, the HLO text printer reads and the runtime's tests build.
//!
//! Field numbers follow `xla/service/hlo.proto` and `xla/xla_data.proto`. Fields that the builder
//! never sets are still declared where XLA's optimized modules use them (fusion kinds, windows,
//! gather/scatter numbers, ...) so that a printer can show them; everything else is skipped as an
//! unknown field when decoding. Enum-typed fields are plain `i32` so that values newer than this
//! file decode without error; element types are `PrimitiveType` numbers (see
//! [`ElementType::primitive_type`](crate::ElementType::primitive_type) and [`primitive_type`]).

use std::collections::BTreeMap;

pub use crate::dtype::{primitive_type, primitive_type_name};

/// `xla.HloModuleProto`: a whole module (entry computation plus everything it calls).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HloModuleProto {
    /// Module name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Name of the entry computation.
    #[prost(string, tag = "2")]
    pub entry_computation_name: String,
    /// All computations, callees before callers.
    #[prost(message, repeated, tag = "3")]
    pub computations: Vec<HloComputationProto>,
    /// Program shape of the entry computation, with layouts.
    #[prost(message, optional, tag = "4")]
    pub host_program_shape: Option<ProgramShapeProto>,
    /// Module id.
    #[prost(int64, tag = "5")]
    pub id: i64,
    /// Id of the entry computation.
    #[prost(int64, tag = "6")]
    pub entry_computation_id: i64,
    /// Outputs that reuse (alias) parameter buffers, for donation.
    #[prost(message, optional, tag = "8")]
    pub input_output_alias: Option<HloInputOutputAliasProto>,
    /// Whether the module has dynamic shapes.
    #[prost(bool, tag = "11")]
    pub is_dynamic: bool,
    /// Output sharding after SPMD partitioning.
    #[prost(message, optional, tag = "12")]
    pub spmd_output_sharding: Option<OpSharding>,
    /// Parameter shardings after SPMD partitioning.
    #[prost(message, repeated, tag = "14")]
    pub spmd_parameters_shardings: Vec<OpSharding>,
    /// Frontend attributes of the module.
    #[prost(message, optional, tag = "19")]
    pub frontend_attributes: Option<FrontendAttributes>,
}

impl HloModuleProto {
    /// The entry computation: by `entry_computation_id` when set, else by
    /// `entry_computation_name`, else the last computation (callees come first).
    pub fn entry_computation(&self) -> Option<&HloComputationProto> {
        let by_id = (self.entry_computation_id != 0)
            .then(|| {
                self.computations
                    .iter()
                    .find(|c| c.id == self.entry_computation_id)
            })
            .flatten();
        by_id
            .or_else(|| {
                self.computations
                    .iter()
                    .find(|c| c.name == self.entry_computation_name)
            })
            .or(self.computations.last())
    }
}

/// `xla.HloInputOutputAliasProto`: which outputs may live in which parameters' buffers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HloInputOutputAliasProto {
    /// One entry per aliased output.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<AliasEntryProto>,
}

/// `xla.HloInputOutputAliasProto.AliasEntryProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AliasEntryProto {
    /// Index of the output within the (tuple) result.
    #[prost(int64, repeated, tag = "1")]
    pub output_shape_index: Vec<i64>,
    /// The aliased parameter.
    #[prost(int64, tag = "2")]
    pub parameter_number: i64,
    /// Index within the parameter (empty for an array parameter).
    #[prost(int64, repeated, tag = "3")]
    pub parameter_shape_index: Vec<i64>,
    /// `xla.Kind`: 0 undefined, 1 may-alias, 2 must-alias.
    #[prost(int32, tag = "4")]
    pub kind: i32,
}

/// `xla.HloComputationProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HloComputationProto {
    /// Computation name (unique in the module).
    #[prost(string, tag = "1")]
    pub name: String,
    /// Instructions in a topological order (operands first).
    #[prost(message, repeated, tag = "2")]
    pub instructions: Vec<HloInstructionProto>,
    /// Parameter and result shapes.
    #[prost(message, optional, tag = "4")]
    pub program_shape: Option<ProgramShapeProto>,
    /// Computation id (unique in the module, non-zero).
    #[prost(int64, tag = "5")]
    pub id: i64,
    /// Id of the root instruction.
    #[prost(int64, tag = "6")]
    pub root_id: i64,
    /// Whether this is a fusion body.
    #[prost(bool, tag = "7")]
    pub is_fusion_computation: bool,
    /// Execution thread name (XLA's async threads).
    #[prost(string, tag = "8")]
    pub execution_thread: String,
}

/// `HloInstructionProto.SliceDimensions`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SliceDimensions {
    /// Inclusive start.
    #[prost(int64, tag = "1")]
    pub start: i64,
    /// Exclusive limit.
    #[prost(int64, tag = "2")]
    pub limit: i64,
    /// Stride (>= 1).
    #[prost(int64, tag = "3")]
    pub stride: i64,
}

/// `xla.HloInstructionProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HloInstructionProto {
    /// Instruction name (unique in the module).
    #[prost(string, tag = "1")]
    pub name: String,
    /// Opcode spelling, e.g. `"add"`, `"custom-call"`.
    #[prost(string, tag = "2")]
    pub opcode: String,
    /// Result shape with layout.
    #[prost(message, optional, tag = "3")]
    pub shape: Option<ShapeProto>,
    /// Source metadata.
    #[prost(message, optional, tag = "7")]
    pub metadata: Option<OpMetadata>,
    /// Literal of a `constant`.
    #[prost(message, optional, tag = "8")]
    pub literal: Option<LiteralProto>,
    /// Parameter number of a `parameter`.
    #[prost(int64, tag = "9")]
    pub parameter_number: i64,
    /// Fusion kind (`kLoop`, `kInput`, `kOutput`, `kCustom`).
    #[prost(string, tag = "11")]
    pub fusion_kind: String,
    /// Index of a `get-tuple-element`.
    #[prost(int64, tag = "13")]
    pub tuple_index: i64,
    /// Dimensions attribute (broadcast, transpose, reduce, concatenate, reverse, iota).
    #[prost(int64, repeated, tag = "14")]
    pub dimensions: Vec<i64>,
    /// Window of reduce-window / convolution.
    #[prost(message, optional, tag = "15")]
    pub window: Option<Window>,
    /// Slice bounds of a `slice`.
    #[prost(message, repeated, tag = "17")]
    pub slice_dimensions: Vec<SliceDimensions>,
    /// `reduce-precision` exponent bits.
    #[prost(int32, tag = "18")]
    pub exponent_bits: i32,
    /// `reduce-precision` mantissa bits.
    #[prost(int32, tag = "19")]
    pub mantissa_bits: i32,
    /// Sizes of a `dynamic-slice`.
    #[prost(int64, repeated, tag = "20")]
    pub dynamic_slice_sizes: Vec<i64>,
    /// Padding of a `pad`.
    #[prost(message, optional, tag = "21")]
    pub padding_config: Option<PaddingConfig>,
    /// `rng` distribution.
    #[prost(int32, tag = "23")]
    pub distribution: i32,
    /// Batch-norm epsilon.
    #[prost(float, tag = "24")]
    pub epsilon: f32,
    /// Batch-norm feature index.
    #[prost(int64, tag = "25")]
    pub feature_index: i64,
    /// Channel id of collectives.
    #[prost(int64, tag = "26")]
    pub channel_id: i64,
    /// Target of a `custom-call`.
    #[prost(string, tag = "28")]
    pub custom_call_target: String,
    /// Dot dimension numbers.
    #[prost(message, optional, tag = "30")]
    pub dot_dimension_numbers: Option<DotDimensionNumbers>,
    /// Gather dimension numbers.
    #[prost(message, optional, tag = "33")]
    pub gather_dimension_numbers: Option<GatherDimensionNumbers>,
    /// Gather slice sizes.
    #[prost(int64, repeated, tag = "34")]
    pub gather_slice_sizes: Vec<i64>,
    /// Instruction id (unique in the module, non-zero).
    #[prost(int64, tag = "35")]
    pub id: i64,
    /// Operand instruction ids.
    #[prost(int64, repeated, tag = "36")]
    pub operand_ids: Vec<i64>,
    /// Control predecessors.
    #[prost(int64, repeated, tag = "37")]
    pub control_predecessor_ids: Vec<i64>,
    /// Called computation ids (to_apply, condition/body, branches, fusion body).
    #[prost(int64, repeated, tag = "38")]
    pub called_computation_ids: Vec<i64>,
    /// Sharding annotation.
    #[prost(message, optional, tag = "40")]
    pub sharding: Option<OpSharding>,
    /// Backend config (for typed-FFI custom calls: an MLIR dictionary attribute string).
    #[prost(bytes = "vec", tag = "43")]
    pub backend_config: Vec<u8>,
    /// Scatter dimension numbers.
    #[prost(message, optional, tag = "48")]
    pub scatter_dimension_numbers: Option<ScatterDimensionNumbers>,
    /// Replica groups of collectives.
    #[prost(message, repeated, tag = "49")]
    pub replica_groups: Vec<ReplicaGroup>,
    /// Source/target pairs of a `collective-permute` (partition ids in SPMD programs).
    #[prost(message, repeated, tag = "52")]
    pub source_target_pairs: Vec<SourceTarget>,
    /// Convolution feature group count.
    #[prost(int64, tag = "50")]
    pub feature_group_count: i64,
    /// Operand precisions / dot algorithm.
    #[prost(message, optional, tag = "51")]
    pub precision_config: Option<PrecisionConfig>,
    /// Whether a custom call's operand layouts are constrained.
    #[prost(bool, tag = "56")]
    pub constrain_layout: bool,
    /// Operand shapes with layout of a custom call.
    #[prost(message, repeated, tag = "57")]
    pub operand_shapes_with_layout: Vec<ShapeProto>,
    /// Convolution batch group count.
    #[prost(int64, tag = "58")]
    pub batch_group_count: i64,
    /// Whether a `sort` is stable.
    #[prost(bool, tag = "60")]
    pub is_stable: bool,
    /// Comparison direction (`"EQ"`, `"LT"`, ...).
    #[prost(string, tag = "63")]
    pub comparison_direction: String,
    /// Whether a custom call has side effects.
    #[prost(bool, tag = "65")]
    pub custom_call_has_side_effect: bool,
    /// Iota-like delta (collective-permute / `rng-get-and-update-state`).
    #[prost(int64, tag = "66")]
    pub delta: i64,
    /// Gather/scatter: indices sorted.
    #[prost(bool, tag = "67")]
    pub indices_are_sorted: bool,
    /// Frontend attributes.
    #[prost(message, optional, tag = "68")]
    pub frontend_attributes: Option<FrontendAttributes>,
    /// Scatter: unique indices.
    #[prost(bool, tag = "69")]
    pub unique_indices: bool,
    /// RNG algorithm of `rng-bit-generator`.
    #[prost(int32, tag = "70")]
    pub rng_algorithm: i32,
    /// Whether the replica groups of a collective hold global device ids.
    #[prost(bool, tag = "71")]
    pub use_global_device_ids: bool,
    /// Comparison type (`"FLOAT"`, `"TOTALORDER"`, `"SIGNED"`, `"UNSIGNED"`).
    #[prost(string, tag = "72")]
    pub comparison_type: String,
    /// Custom-call outputs that reuse an operand's buffer.
    #[prost(message, repeated, tag = "74")]
    pub output_operand_aliasing: Vec<OutputOperandAliasing>,
    /// Custom-call API version (4 = typed FFI).
    #[prost(int32, tag = "77")]
    pub custom_call_api_version: i32,
    /// Top-k `k`.
    #[prost(int64, tag = "81")]
    pub k: i64,
    /// Top-k `largest`.
    #[prost(bool, tag = "85")]
    pub largest: bool,
}

impl HloInstructionProto {
    /// Opcodes XLA executes as nothing at run time: views and bookkeeping (`parameter`,
    /// `constant`, `tuple`, `get-tuple-element`, `bitcast`, `after-all`, `opt-barrier`).
    pub const FREE_OPCODES: [&'static str; 7] = [
        "parameter",
        "constant",
        "tuple",
        "get-tuple-element",
        "bitcast",
        "after-all",
        "opt-barrier",
    ];

    /// Whether this instruction costs nothing at run time ([`Self::FREE_OPCODES`]); at the top
    /// level of an optimized program every other instruction is one op the runtime executes.
    pub fn is_free_at_run_time(&self) -> bool {
        Self::FREE_OPCODES.contains(&self.opcode.as_str())
    }
}

/// `xla.OutputOperandAliasing`: the output at `output_shape_index` lives in the buffer of operand
/// `operand_index` at `operand_shape_index`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutputOperandAliasing {
    /// Index into the instruction's (tuple) result; empty for an array result.
    #[prost(int64, repeated, tag = "1")]
    pub output_shape_index: Vec<i64>,
    /// The aliased operand.
    #[prost(int64, tag = "2")]
    pub operand_index: i64,
    /// Index into the operand's shape; empty for an array operand.
    #[prost(int64, repeated, tag = "3")]
    pub operand_shape_index: Vec<i64>,
}

/// `xla.ProgramShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProgramShapeProto {
    /// Parameter shapes.
    #[prost(message, repeated, tag = "1")]
    pub parameters: Vec<ShapeProto>,
    /// Result shape.
    #[prost(message, optional, tag = "2")]
    pub result: Option<ShapeProto>,
    /// Parameter names.
    #[prost(string, repeated, tag = "3")]
    pub parameter_names: Vec<String>,
}

/// `xla.ShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShapeProto {
    /// `PrimitiveType` number (13 = tuple).
    #[prost(int32, tag = "2")]
    pub element_type: i32,
    /// Dimension sizes, major to minor.
    #[prost(int64, repeated, tag = "3")]
    pub dimensions: Vec<i64>,
    /// Element shapes of a tuple.
    #[prost(message, repeated, tag = "4")]
    pub tuple_shapes: Vec<ShapeProto>,
    /// Layout (arrays only).
    #[prost(message, optional, tag = "5")]
    pub layout: Option<LayoutProto>,
    /// Which dimensions are dynamic.
    #[prost(bool, repeated, tag = "6")]
    pub is_dynamic_dimension: Vec<bool>,
}

/// `xla.LayoutProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LayoutProto {
    /// Dimension order, minor first.
    #[prost(int64, repeated, tag = "1")]
    pub minor_to_major: Vec<i64>,
    /// Tiling.
    #[prost(message, repeated, tag = "6")]
    pub tiles: Vec<TileProto>,
    /// Element size in bits (0 = natural).
    #[prost(int64, tag = "7")]
    pub element_size_in_bits: i64,
    /// Memory space (0 = default).
    #[prost(int64, tag = "8")]
    pub memory_space: i64,
}

/// `xla.TileProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TileProto {
    /// Tile dimensions.
    #[prost(int64, repeated, tag = "1")]
    pub dimensions: Vec<i64>,
}

/// `xla.LiteralProto` (the element kinds this crate produces; others are skipped on decode).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteralProto {
    /// Shape of the literal.
    #[prost(message, optional, tag = "1")]
    pub shape: Option<ShapeProto>,
    /// pred values.
    #[prost(bool, repeated, tag = "2")]
    pub preds: Vec<bool>,
    /// u8 values.
    #[prost(bytes = "vec", tag = "3")]
    pub u8s: Vec<u8>,
    /// s32 values.
    #[prost(int32, repeated, tag = "4")]
    pub s32s: Vec<i32>,
    /// s64 values.
    #[prost(int64, repeated, tag = "5")]
    pub s64s: Vec<i64>,
    /// u32 values.
    #[prost(uint32, repeated, tag = "6")]
    pub u32s: Vec<u32>,
    /// u64 values.
    #[prost(uint64, repeated, tag = "7")]
    pub u64s: Vec<u64>,
    /// f32 values.
    #[prost(float, repeated, tag = "8")]
    pub f32s: Vec<f32>,
    /// f64 values.
    #[prost(double, repeated, tag = "9")]
    pub f64s: Vec<f64>,
    /// Tuple elements.
    #[prost(message, repeated, tag = "10")]
    pub tuple_literals: Vec<LiteralProto>,
    /// f16 values, little-endian bytes.
    #[prost(bytes = "vec", tag = "11")]
    pub f16s: Vec<u8>,
    /// bf16 values, little-endian bytes.
    #[prost(bytes = "vec", tag = "13")]
    pub bf16s: Vec<u8>,
    /// s8 values.
    #[prost(bytes = "vec", tag = "15")]
    pub s8s: Vec<u8>,
    /// u16 values, little-endian bytes.
    #[prost(bytes = "vec", tag = "16")]
    pub u16s: Vec<u8>,
    /// s16 values, little-endian bytes.
    #[prost(bytes = "vec", tag = "17")]
    pub s16s: Vec<u8>,
}

/// `xla.OpMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OpMetadata {
    /// Framework op type (`"add"`, `"dot_general"`).
    #[prost(string, tag = "1")]
    pub op_type: String,
    /// Scoped op name (`"layer_3/rla/fwd/dot.12"`).
    #[prost(string, tag = "2")]
    pub op_name: String,
    /// Source file of the builder call.
    #[prost(string, tag = "3")]
    pub source_file: String,
    /// Source line of the builder call.
    #[prost(int32, tag = "4")]
    pub source_line: i32,
    /// Deduplicated name (set by XLA).
    #[prost(string, tag = "12")]
    pub deduplicated_name: String,
    /// Scheduling name (set by XLA).
    #[prost(string, tag = "16")]
    pub scheduling_name: String,
}

/// `xla.OpSharding`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OpSharding {
    /// `Type`: REPLICATED=0, MAXIMAL=1, TUPLE=2, OTHER=3, MANUAL=4, UNKNOWN=5.
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    /// Tile shape (legacy).
    #[prost(message, optional, tag = "2")]
    pub tile_shape: Option<ShapeProto>,
    /// Tile assignment dimensions.
    #[prost(int64, repeated, tag = "3")]
    pub tile_assignment_dimensions: Vec<i64>,
    /// Tile assignment devices (row-major over the tile assignment).
    #[prost(int64, repeated, tag = "4")]
    pub tile_assignment_devices: Vec<i64>,
    /// Element shardings of a tuple.
    #[prost(message, repeated, tag = "5")]
    pub tuple_shardings: Vec<OpSharding>,
    /// Last tile dimension is replication.
    #[prost(bool, tag = "6")]
    pub replicate_on_last_tile_dim: bool,
    /// Types of trailing subgroup dimensions.
    #[prost(int32, repeated, tag = "8")]
    pub last_tile_dims: Vec<i32>,
    /// Iota tile assignment: reshape dims.
    #[prost(int64, repeated, tag = "9")]
    pub iota_reshape_dims: Vec<i64>,
    /// Iota tile assignment: transpose permutation.
    #[prost(int32, repeated, tag = "10")]
    pub iota_transpose_perm: Vec<i32>,
}

/// `xla.DotDimensionNumbers`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DotDimensionNumbers {
    /// Contracting dims of lhs.
    #[prost(int64, repeated, tag = "1")]
    pub lhs_contracting_dimensions: Vec<i64>,
    /// Contracting dims of rhs.
    #[prost(int64, repeated, tag = "2")]
    pub rhs_contracting_dimensions: Vec<i64>,
    /// Batch dims of lhs.
    #[prost(int64, repeated, tag = "3")]
    pub lhs_batch_dimensions: Vec<i64>,
    /// Batch dims of rhs.
    #[prost(int64, repeated, tag = "4")]
    pub rhs_batch_dimensions: Vec<i64>,
}

/// `xla.PrecisionConfig`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrecisionConfig {
    /// Per-operand precision: DEFAULT=0, HIGH=1, HIGHEST=2.
    #[prost(int32, repeated, tag = "1")]
    pub operand_precision: Vec<i32>,
    /// Dot algorithm.
    #[prost(int32, tag = "2")]
    pub algorithm: i32,
}

/// `xla.PaddingConfig`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PaddingConfig {
    /// One entry per operand dimension.
    #[prost(message, repeated, tag = "1")]
    pub dimensions: Vec<PaddingConfigDimension>,
}

/// `xla.PaddingConfig.PaddingConfigDimension`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PaddingConfigDimension {
    /// Low edge padding (may be negative).
    #[prost(int64, tag = "1")]
    pub edge_padding_low: i64,
    /// High edge padding (may be negative).
    #[prost(int64, tag = "2")]
    pub edge_padding_high: i64,
    /// Interior padding (>= 0).
    #[prost(int64, tag = "3")]
    pub interior_padding: i64,
}

/// `xla.Window`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Window {
    /// One entry per dimension.
    #[prost(message, repeated, tag = "1")]
    pub dimensions: Vec<WindowDimension>,
}

/// `xla.WindowDimension`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WindowDimension {
    /// Window size.
    #[prost(int64, tag = "1")]
    pub size: i64,
    /// Stride.
    #[prost(int64, tag = "2")]
    pub stride: i64,
    /// Low padding.
    #[prost(int64, tag = "3")]
    pub padding_low: i64,
    /// High padding.
    #[prost(int64, tag = "4")]
    pub padding_high: i64,
    /// Window dilation.
    #[prost(int64, tag = "5")]
    pub window_dilation: i64,
    /// Base dilation.
    #[prost(int64, tag = "6")]
    pub base_dilation: i64,
    /// Window reversal.
    #[prost(bool, tag = "7")]
    pub window_reversal: bool,
}

/// `xla.GatherDimensionNumbers`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GatherDimensionNumbers {
    /// Offset dims.
    #[prost(int64, repeated, tag = "1")]
    pub offset_dims: Vec<i64>,
    /// Collapsed slice dims.
    #[prost(int64, repeated, tag = "2")]
    pub collapsed_slice_dims: Vec<i64>,
    /// Start index map.
    #[prost(int64, repeated, tag = "3")]
    pub start_index_map: Vec<i64>,
    /// Index vector dim.
    #[prost(int64, tag = "4")]
    pub index_vector_dim: i64,
    /// Operand batching dims.
    #[prost(int64, repeated, tag = "5")]
    pub operand_batching_dims: Vec<i64>,
    /// Start indices batching dims.
    #[prost(int64, repeated, tag = "6")]
    pub start_indices_batching_dims: Vec<i64>,
}

/// `xla.ScatterDimensionNumbers`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScatterDimensionNumbers {
    /// Update window dims.
    #[prost(int64, repeated, tag = "1")]
    pub update_window_dims: Vec<i64>,
    /// Inserted window dims.
    #[prost(int64, repeated, tag = "2")]
    pub inserted_window_dims: Vec<i64>,
    /// Scatter dims to operand dims.
    #[prost(int64, repeated, tag = "3")]
    pub scatter_dims_to_operand_dims: Vec<i64>,
    /// Index vector dim.
    #[prost(int64, tag = "4")]
    pub index_vector_dim: i64,
    /// Input batching dims.
    #[prost(int64, repeated, tag = "5")]
    pub input_batching_dims: Vec<i64>,
    /// Scatter indices batching dims.
    #[prost(int64, repeated, tag = "6")]
    pub scatter_indices_batching_dims: Vec<i64>,
}

/// `xla.ReplicaGroup`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReplicaGroup {
    /// Replica ids in the group.
    #[prost(int64, repeated, tag = "1")]
    pub replica_ids: Vec<i64>,
}

/// `xla.SourceTarget`: one pair of a `collective-permute`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SourceTarget {
    /// The sending id.
    #[prost(int64, tag = "1")]
    pub source: i64,
    /// The receiving id.
    #[prost(int64, tag = "2")]
    pub target: i64,
}

/// `xla.FrontendAttributes`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FrontendAttributes {
    /// Key/value attributes.
    #[prost(btree_map = "string, string", tag = "1")]
    pub map: BTreeMap<String, String>,
}

/// `xla.DeviceAssignmentProto`: which device runs each (replica, computation) pair.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceAssignmentProto {
    /// Number of replicas.
    #[prost(int32, tag = "1")]
    pub replica_count: i32,
    /// Number of computations (SPMD partitions).
    #[prost(int32, tag = "2")]
    pub computation_count: i32,
    /// One entry per computation, listing the device of each replica.
    #[prost(message, repeated, tag = "3")]
    pub computation_devices: Vec<ComputationDevice>,
}

/// `xla.DeviceAssignmentProto.ComputationDevice`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ComputationDevice {
    /// Device id of each replica of this computation.
    #[prost(int64, repeated, tag = "1")]
    pub replica_device_ids: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(id: i64, name: &str) -> HloComputationProto {
        HloComputationProto {
            id,
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_entry_is_found_by_id_then_by_name_then_last() {
        let mut m = HloModuleProto {
            computations: vec![comp(3, "callee"), comp(7, "main"), comp(9, "other")],
            entry_computation_id: 7,
            entry_computation_name: "other".into(),
            ..Default::default()
        };
        assert_eq!(m.entry_computation().unwrap().name, "main");
        m.entry_computation_id = 0;
        m.entry_computation_name = "callee".into();
        assert_eq!(m.entry_computation().unwrap().name, "callee");
        m.entry_computation_name = "nowhere".into();
        assert_eq!(m.entry_computation().unwrap().name, "other");
        m.computations.clear();
        assert!(m.entry_computation().is_none());
    }

    #[test]
    fn only_views_and_bookkeeping_are_free_at_run_time() {
        let op = |opcode: &str| HloInstructionProto {
            opcode: opcode.into(),
            ..Default::default()
        };
        for free in HloInstructionProto::FREE_OPCODES {
            assert!(op(free).is_free_at_run_time(), "{free}");
        }
        for runs in ["fusion", "custom-call", "all-gather", "copy", "dot"] {
            assert!(!op(runs).is_free_at_run_time(), "{runs}");
        }
    }
}
