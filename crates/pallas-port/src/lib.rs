//! pallas-port: the Residual Linear Attention (RLA) blocks of RAttention.
//!
//! - [`config`]: the block contract ([`RlaConfig`] attributes, [`RlaDims`] shapes, [`RlaError`]).
//! - [`kernel`]: fast fp32 CPU kernels `rla_fwd` / `rla_bwd` (chunked scan, DESIGN §3), their
//!   variants from an initial state (`rla_fwd_h0` / `rla_bwd_h0`) and the state a run of keys
//!   adds (`rla_kv_state`), for sequence shards.
//! - [`ffi`]: the kernels as XLA FFI handlers (`rattention.rla_fwd` / `rattention.rla_bwd`, ...).
//! - [`attention`]: causal softmax attention as the custom-call pair `rattention.attn_fwd` /
//!   `rattention.attn_bwd` ([`ffi_attention`], kernels in [`kernel::attention`]).
//! - [`lang`]: a small kernel language (IR, CPU interpreter, Triton back end) and the RLA
//!   kernels written in it ([`lang::rla`]), the GPU lowering [`Lowering::Triton`].
//! - [`graph`]: [`rla`] adds the block pair to a graph (custom call, Triton or HLO lowering, custom VJP);
//!   [`Lowering::for_platform`] picks the lowering for the platform the graph runs on.
//! - [`feature`]: [`feature_map`], the feature map φ as graph ops.
//! - [`decode`]: the one-token decode step ([`decode::absorb`], [`decode::read`]).
//! - [`seq`]: sequence parallelism in a manual region (halos, gathers, prefix sums over the
//!   sequence shards); [`rla_in_region`] uses it when the sequence is cut.
//! - [`adamw`]: the train step's AdamW update as one custom call (`rattention.adamw`) over
//!   [`kernel::adamw`].
//! - [`cross_entropy`], [`rms_norm`], [`embed`]: the train loss, RMS normalisation and the token
//!   embedding as custom-call pairs over [`kernel::cross_entropy`], [`kernel::rms_norm`],
//!   [`kernel::embed`], chosen per op by [`kernel_lowering::KernelLowering`]; under a mesh
//!   they run in manual regions over the rows ([`row_region`]).
//! - [`reference`](mod@reference): naive f64 formulas the kernels are tested against ([`reference::feature`]
//!   is φ).

#![forbid(unsafe_code)]

pub mod adamw;
pub mod attention;
pub mod bench_util;
pub mod config;
pub mod cross_entropy;
pub mod decode;
pub mod embed;
pub mod feature;
pub mod ffi;
pub mod ffi_attention;
pub mod graph;
pub mod hlo;
pub mod kernel;
pub mod kernel_lowering;
pub mod lang;
pub mod reference;
pub mod rms_norm;
pub mod row_region;
pub mod seq;

pub use config::{FeatureMap, RlaConfig, RlaDims, RlaError, SeqState};
pub use feature::feature_map;
pub use ffi::{kernels_registered, register_cpu_kernels};
pub use graph::{
    rla, rla_halo_len, rla_in_region, rla_kv_state, rla_region_outputs, rla_seq_shard,
    rla_with_state, rla_with_state_h0, Lowering, RlaOutputs,
};
