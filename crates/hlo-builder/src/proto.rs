//! XLA's HLO protos (`HloModuleProto` and the messages it holds), re-exported from
//! [`xla_data::proto`] so that `hlo_builder::proto::...` paths keep working.

pub use xla_data::proto::*;
