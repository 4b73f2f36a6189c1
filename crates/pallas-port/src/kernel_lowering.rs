//! The lowering choice of the ops that have a CPU kernel pair besides attention and the RLA
//! blocks: the train loss ([`crate::cross_entropy`]), RMS normalisation ([`crate::rms_norm`]) and
//! the token embedding ([`crate::embed`]). Each pair spares XLA CPU the compile of the op's
//! element-wise fusions; the kernels serve one CPU device, the HLO lowering runs anywhere.

use serde::{Deserialize, Serialize};
use std::fmt;

/// How an op that has a CPU kernel pair is lowered (the model config's `loss_lowering`,
/// `norm_lowering` and `embed_lowering`, serialized as `"auto"`, `"hlo"`, `"kernel"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelLowering {
    /// The op's HLO (element-wise ops, reductions, gather): runs anywhere, under any mesh.
    Hlo,
    /// The custom-call pair over our CPU kernels
    /// ([`crate::cross_entropy::cross_entropy_kernel`], [`crate::rms_norm::rms_norm_kernel`],
    /// [`crate::embed::embed_kernel`]);
    /// one CPU device (XLA's SPMD partitioner would replicate the operands), needs
    /// [`crate::register_cpu_kernels`].
    Kernel,
    /// [`KernelLowering::Kernel`] for a graph on one CPU device, [`KernelLowering::Hlo`] otherwise.
    /// Resolve with [`KernelLowering::resolve`].
    #[default]
    Auto,
}

impl KernelLowering {
    /// The concrete lowering for a graph on `devices` devices of the PJRT platform `platform`
    /// (`"cpu"`, `"cuda"`, `"tpu"`, ...; case-insensitive): `Auto` is `Kernel` on one CPU
    /// device and `Hlo` elsewhere; explicit choices are returned unchanged.
    ///
    /// ```
    /// use pallas_port::kernel_lowering::KernelLowering as L;
    /// assert_eq!(L::Auto.resolve("cpu", 1), L::Kernel);
    /// assert_eq!(L::Auto.resolve("cpu", 4), L::Hlo);
    /// assert_eq!(L::Auto.resolve("tpu", 1), L::Hlo);
    /// assert_eq!(L::Hlo.resolve("cpu", 1), L::Hlo);
    /// ```
    pub fn resolve(self, platform: &str, devices: usize) -> KernelLowering {
        let host = crate::graph::is_host_platform(platform);
        match self {
            KernelLowering::Auto if host && devices == 1 => KernelLowering::Kernel,
            KernelLowering::Auto => KernelLowering::Hlo,
            l => l,
        }
    }

    /// True for `Auto` (the default, which configs need not write out).
    pub fn is_auto(&self) -> bool {
        *self == KernelLowering::Auto
    }

    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            KernelLowering::Hlo => "hlo",
            KernelLowering::Kernel => "kernel",
            KernelLowering::Auto => "auto",
        }
    }
}

impl fmt::Display for KernelLowering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
