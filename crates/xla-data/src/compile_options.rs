//! Hand-written `prost` messages for the subset of XLA's `xla/pjrt/compile_options.proto` and
//! `xla/xla.proto` that a PJRT compile call takes (`xla.CompileOptionsProto`).
//!
//! The runtime crate builds these from its typed, validated options; they live here so that the
//! wire format has one definition.

use crate::proto::DeviceAssignmentProto;

/// `xla.CompileOptionsProto`: the serialized options of `PJRT_Client_Compile`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CompileOptionsProto {
    /// Options of the executable build.
    #[prost(message, optional, tag = "3")]
    pub executable_build_options: Option<ExecutableBuildOptionsProto>,
}

/// `xla.ExecutableBuildOptionsProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecutableBuildOptionsProto {
    /// Number of replicas.
    #[prost(int64, tag = "4")]
    pub num_replicas: i64,
    /// Number of SPMD partitions.
    #[prost(int64, tag = "5")]
    pub num_partitions: i64,
    /// Run the SPMD partitioner.
    #[prost(bool, tag = "6")]
    pub use_spmd_partitioning: bool,
    /// Explicit device assignment (`None`: the plugin's default).
    #[prost(message, optional, tag = "9")]
    pub device_assignment: Option<DeviceAssignmentProto>,
    /// Per-output flags allowing sharding propagation to the outputs.
    #[prost(bool, repeated, tag = "12")]
    pub allow_spmd_sharding_propagation_to_output: Vec<bool>,
    /// Per-parameter flags allowing sharding propagation to the parameters.
    #[prost(bool, repeated, tag = "18")]
    pub allow_spmd_sharding_propagation_to_parameters: Vec<bool>,
    /// Use the Shardy partitioner instead of GSPMD.
    #[prost(bool, tag = "19")]
    pub use_shardy_partitioner: bool,
}
