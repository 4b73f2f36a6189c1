//! Programs and compile options: the typed, validated [`CompileOptions`], encoded as
//! `xla.CompileOptionsProto` (the prost messages of `xla_data::compile_options`).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use xla_data::compile_options as proto;
use xla_data::proto::{ComputationDevice, DeviceAssignmentProto};

/// A program to compile.
#[derive(Debug, Clone, Copy)]
pub enum Program<'a> {
    /// A binary serialized `xla.HloModuleProto` (PJRT format `"hlo"`).
    Hlo(&'a [u8]),
    /// StableHLO (or MHLO) MLIR text (PJRT format `"mlir"`).
    Mlir(&'a str),
}

/// Compile options. Build with `CompileOptions { num_partitions: 4, use_spmd_partitioning: true,
/// ..Default::default() }`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileOptions {
    /// Number of replicas (≥ 1).
    pub num_replicas: usize,
    /// Number of SPMD partitions (≥ 1; > 1 needs `use_spmd_partitioning`).
    pub num_partitions: usize,
    /// Run the SPMD partitioner (needed for sharded programs).
    pub use_spmd_partitioning: bool,
    /// Use the Shardy partitioner instead of GSPMD. Only for programs whose shardings are Shardy
    /// (`sdy`) annotations; with GSPMD shardings the plugin aborts the process, so this is
    /// refused for HLO protos and for MLIR text with `mhlo.sharding` attributes.
    pub use_shardy_partitioner: bool,
    /// Explicit device ids, indexed `[replica][partition]`; `None` uses the plugin's default.
    pub device_assignment: Option<Vec<Vec<i64>>>,
    /// Per-output flags allowing SPMD sharding propagation to the outputs (empty: plugin default).
    pub allow_spmd_sharding_propagation_to_output: Vec<bool>,
    /// Per-parameter flags allowing SPMD sharding propagation to the parameters.
    pub allow_spmd_sharding_propagation_to_parameters: Vec<bool>,
    /// XLA debug options for this compile only, by name (`xla_gpu_cuda_data_dir`, ...): sent as
    /// `CompileOptionsProto.env_option_overrides`, which the plugin applies on top of its
    /// defaults and `XLA_FLAGS` (an unknown name fails the compile).
    pub debug_overrides: BTreeMap<String, OptionOverride>,
}

/// The value of one entry of [`CompileOptions::debug_overrides`] (`xla.OptionOverrideProto`).
#[derive(Debug, Clone, PartialEq)]
pub enum OptionOverride {
    /// A string option.
    Str(String),
    /// A boolean option.
    Bool(bool),
    /// An integer or enum option.
    Int(i64),
    /// A floating-point option.
    Float(f64),
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            num_replicas: 1,
            num_partitions: 1,
            use_spmd_partitioning: false,
            use_shardy_partitioner: false,
            device_assignment: None,
            allow_spmd_sharding_propagation_to_output: Vec::new(),
            allow_spmd_sharding_propagation_to_parameters: Vec::new(),
            debug_overrides: BTreeMap::new(),
        }
    }
}

/// The LLVM optimisation level (`xla_backend_optimization_level`) that [`crate::Client::compile`]
/// asks of the XLA CPU plugin unless the caller sets one (in
/// [`CompileOptions::debug_overrides`] or `XLA_FLAGS`); XLA's default is 3.
///
/// Measured on the train step of `configs/bench.toml` (issue 13's compile target): level 1 cuts
/// the compile's CPU seconds by 12–20 % (T = 1024 and 4096), with the same step time and
/// bit-identical results after several steps. XLA's CPU fusion emitters vectorise the kernels
/// themselves, so LLVM's `-O3`-only passes (loop and SLP vectorisers, aggressive unrolling) add
/// compile time without speed; the dots and the RLA kernels are library or custom calls that no
/// LLVM level touches. Level 0 is not used: it slows the step by ~45 % and changes the last bit
/// of results (no FMA contraction of `llvm.fmuladd`).
pub const CPU_BACKEND_OPTIMIZATION_LEVEL: i64 = 1;

/// The debug option [`CPU_BACKEND_OPTIMIZATION_LEVEL`] sets.
pub const BACKEND_OPTIMIZATION_LEVEL: &str = "xla_backend_optimization_level";

impl CompileOptions {
    /// These options with the CPU defaults of this crate added: `xla_backend_optimization_level
    /// =` [`CPU_BACKEND_OPTIMIZATION_LEVEL`] unless the caller's overrides or `xla_flags` (the
    /// `XLA_FLAGS` environment variable) already set it.
    pub fn with_cpu_defaults(&self, xla_flags: Option<&str>) -> CompileOptions {
        let mut o = self.clone();
        let set_by_flags = xla_flags.is_some_and(|f| f.contains(BACKEND_OPTIMIZATION_LEVEL));
        if !set_by_flags {
            o.debug_overrides
                .entry(BACKEND_OPTIMIZATION_LEVEL.to_string())
                .or_insert(OptionOverride::Int(CPU_BACKEND_OPTIMIZATION_LEVEL));
        }
        o
    }

    /// Options for an SPMD program over `num_partitions` devices (GSPMD).
    pub fn spmd(num_partitions: usize) -> Self {
        CompileOptions {
            num_partitions,
            use_spmd_partitioning: true,
            ..Default::default()
        }
    }

    /// Checks the options against a client with `num_devices` devices, refusing everything known
    /// to make the plugin abort the process (zero replicas or partitions) or fail obscurely.
    pub fn validate(&self, num_devices: usize) -> Result<()> {
        if self.num_replicas == 0 {
            return Err(Error::InvalidOptions(
                "num_replicas must be at least 1 (the plugin aborts on 0)".into(),
            ));
        }
        if self.num_partitions == 0 {
            return Err(Error::InvalidOptions(
                "num_partitions must be at least 1 (the plugin aborts on 0)".into(),
            ));
        }
        if self.num_replicas > i32::MAX as usize || self.num_partitions > i32::MAX as usize {
            return Err(Error::InvalidOptions(format!(
                "num_replicas={} / num_partitions={} exceed the proto's int32 range",
                self.num_replicas, self.num_partitions
            )));
        }
        let total = self.num_replicas.saturating_mul(self.num_partitions);
        if total > num_devices {
            return Err(Error::InvalidOptions(format!(
                "num_replicas={} x num_partitions={} = {total} devices needed, but the client has {num_devices}",
                self.num_replicas, self.num_partitions
            )));
        }
        if self.num_partitions > 1 && !self.use_spmd_partitioning {
            return Err(Error::InvalidOptions(format!(
                "num_partitions={} requires use_spmd_partitioning=true",
                self.num_partitions
            )));
        }
        if let Some(da) = &self.device_assignment {
            if da.len() != self.num_replicas || da.iter().any(|r| r.len() != self.num_partitions) {
                return Err(Error::InvalidOptions(format!(
                    "device_assignment must be [num_replicas={}][num_partitions={}], got {} rows of lengths {:?}",
                    self.num_replicas,
                    self.num_partitions,
                    da.len(),
                    da.iter().map(Vec::len).collect::<Vec<_>>()
                )));
            }
            let mut seen = std::collections::HashSet::new();
            for &id in da.iter().flatten() {
                if id < 0 || id as u64 >= num_devices as u64 {
                    return Err(Error::InvalidOptions(format!(
                        "device_assignment id {id} is out of range for {num_devices} devices"
                    )));
                }
                if !seen.insert(id) {
                    return Err(Error::InvalidOptions(format!(
                        "device_assignment uses device {id} twice"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Program-dependent checks: the Shardy partitioner on GSPMD shardings aborts the plugin.
    pub fn validate_for_program(&self, program: &Program<'_>) -> Result<()> {
        if !self.use_shardy_partitioner {
            return Ok(());
        }
        match program {
            Program::Hlo(_) => Err(Error::InvalidOptions(
                "use_shardy_partitioner=true with an HLO proto: HLO protos carry GSPMD shardings, and the plugin \
                 aborts the process on that combination; use use_shardy_partitioner=false"
                    .into(),
            )),
            Program::Mlir(text) if text.contains("mhlo.sharding") => Err(Error::InvalidOptions(
                "use_shardy_partitioner=true with GSPMD `mhlo.sharding` attributes (the plugin aborts on that); \
                 use use_shardy_partitioner=false or Shardy `sdy.sharding` annotations"
                    .into(),
            )),
            Program::Mlir(_) => Ok(()),
        }
    }

    /// The serialized `xla.CompileOptionsProto`.
    pub fn encode(&self) -> Vec<u8> {
        use prost::Message;
        let device_assignment = self
            .device_assignment
            .as_ref()
            .map(|da| DeviceAssignmentProto {
                replica_count: self.num_replicas as i32,
                computation_count: self.num_partitions as i32,
                computation_devices: (0..self.num_partitions)
                    .map(|p| ComputationDevice {
                        replica_device_ids: da.iter().map(|r| r[p]).collect(),
                    })
                    .collect(),
            });
        let msg = proto::CompileOptionsProto {
            executable_build_options: Some(proto::ExecutableBuildOptionsProto {
                num_replicas: self.num_replicas as i64,
                num_partitions: self.num_partitions as i64,
                use_spmd_partitioning: self.use_spmd_partitioning,
                device_assignment,
                allow_spmd_sharding_propagation_to_output: self
                    .allow_spmd_sharding_propagation_to_output
                    .clone(),
                allow_spmd_sharding_propagation_to_parameters: self
                    .allow_spmd_sharding_propagation_to_parameters
                    .clone(),
                use_shardy_partitioner: self.use_shardy_partitioner,
            }),
            env_option_overrides: self
                .debug_overrides
                .iter()
                .map(|(k, v)| {
                    use proto::option_override::Value;
                    let value = match v {
                        OptionOverride::Str(s) => Value::String(s.clone()),
                        OptionOverride::Bool(b) => Value::Bool(*b),
                        OptionOverride::Int(i) => Value::Int(*i),
                        OptionOverride::Float(f) => Value::Double(*f),
                    };
                    (k.clone(), proto::OptionOverrideProto { value: Some(value) })
                })
                .collect(),
        };
        msg.encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_defaults_add_the_optimization_level_unless_the_caller_sets_one() {
        let level = |o: &CompileOptions| o.debug_overrides.get(BACKEND_OPTIMIZATION_LEVEL).cloned();
        let base = CompileOptions::default();
        assert_eq!(
            level(&base.with_cpu_defaults(None)),
            Some(OptionOverride::Int(CPU_BACKEND_OPTIMIZATION_LEVEL))
        );
        assert_eq!(
            level(&base.with_cpu_defaults(Some("--xla_dump_to=/tmp/x"))),
            Some(OptionOverride::Int(CPU_BACKEND_OPTIMIZATION_LEVEL))
        );
        // XLA_FLAGS wins: no override on top of it.
        let flags = "--xla_backend_optimization_level=3";
        assert_eq!(level(&base.with_cpu_defaults(Some(flags))), None);
        // An explicit override is kept.
        let mut own = CompileOptions::default();
        own.debug_overrides
            .insert(BACKEND_OPTIMIZATION_LEVEL.into(), OptionOverride::Int(3));
        assert_eq!(
            level(&own.with_cpu_defaults(None)),
            Some(OptionOverride::Int(3))
        );
        // Nothing else changes.
        let mut plain = base.with_cpu_defaults(None);
        plain.debug_overrides.clear();
        assert_eq!(plain, base);
    }

    #[test]
    fn default_options_encode_to_the_measured_minimal_proto() {
        // CompileOptionsProto{ executable_build_options(3) { num_replicas(4)=1, num_partitions(5)=1 } }
        assert_eq!(
            CompileOptions::default().encode(),
            vec![0x1a, 0x04, 0x20, 0x01, 0x28, 0x01]
        );
    }

    #[test]
    fn validation_refuses_aborting_combinations() {
        let ok = CompileOptions::default();
        assert!(ok.validate(4).is_ok());
        for bad in [
            CompileOptions {
                num_replicas: 0,
                ..Default::default()
            },
            CompileOptions {
                num_partitions: 0,
                ..Default::default()
            },
            CompileOptions {
                num_partitions: 8,
                use_spmd_partitioning: true,
                ..Default::default()
            },
            CompileOptions {
                num_partitions: 2,
                ..Default::default()
            },
            CompileOptions {
                device_assignment: Some(vec![vec![7]]),
                ..Default::default()
            },
            CompileOptions {
                device_assignment: Some(vec![vec![0, 1]]),
                ..Default::default()
            },
            CompileOptions {
                num_partitions: 2,
                use_spmd_partitioning: true,
                device_assignment: Some(vec![vec![1, 1]]),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(bad.validate(4), Err(Error::InvalidOptions(_))),
                "{bad:?} accepted"
            );
        }
        let shardy = CompileOptions {
            use_shardy_partitioner: true,
            ..Default::default()
        };
        assert!(shardy.validate_for_program(&Program::Hlo(&[1])).is_err());
        assert!(shardy
            .validate_for_program(&Program::Mlir("mhlo.sharding = \"{replicated}\""))
            .is_err());
        assert!(shardy
            .validate_for_program(&Program::Mlir("module {}"))
            .is_ok());
    }

    #[test]
    fn debug_overrides_encode_as_env_option_overrides() {
        use prost::Message;
        let mut o = CompileOptions::default();
        o.debug_overrides.insert(
            "xla_gpu_cuda_data_dir".into(),
            OptionOverride::Str("/opt/cu13".into()),
        );
        o.debug_overrides
            .insert("xla_dump_hlo_as_text".into(), OptionOverride::Bool(true));
        let decoded = proto::CompileOptionsProto::decode(o.encode().as_slice()).unwrap();
        let got = &decoded.env_option_overrides;
        assert_eq!(got.len(), 2);
        assert_eq!(
            got["xla_gpu_cuda_data_dir"].value,
            Some(proto::option_override::Value::String("/opt/cu13".into()))
        );
        assert_eq!(
            got["xla_dump_hlo_as_text"].value,
            Some(proto::option_override::Value::Bool(true))
        );
        // Field 7, after executable_build_options (field 3).
        assert_eq!(o.encode()[6], 0x3a);
    }

    #[test]
    fn device_assignment_is_transposed_to_computation_major() {
        use prost::Message;
        let o = CompileOptions {
            num_replicas: 1,
            num_partitions: 2,
            use_spmd_partitioning: true,
            device_assignment: Some(vec![vec![3, 1]]),
            ..Default::default()
        };
        let decoded = proto::CompileOptionsProto::decode(o.encode().as_slice()).unwrap();
        let da = decoded
            .executable_build_options
            .unwrap()
            .device_assignment
            .unwrap();
        assert_eq!(da.computation_devices.len(), 2);
        assert_eq!(da.computation_devices[0].replica_device_ids, vec![3]);
        assert_eq!(da.computation_devices[1].replica_device_ids, vec![1]);
    }
}
