//! The lowering choice of the ops that have a CPU kernel pair besides attention and the RLA
//! blocks: the train loss ([`crate::cross_entropy`]), RMS normalisation ([`crate::rms_norm`]) and
//! the token embedding ([`crate::embed`]). Each pair spares XLA CPU the compile and the run of
//! the op's element-wise fusions. On one device the kernels run on the whole operand; under a
//! mesh in manual regions over its rows ([`crate::row_region`]), where the mesh leaves the
//! feature dim (D of a norm, V of the loss) whole. The HLO lowering runs anywhere.

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
    /// on the CPU platform only ([`crate::register_cpu_kernels`]); under a mesh in manual
    /// regions over the rows ([`crate::rms_norm::rms_norm_in_region`],
    /// [`crate::cross_entropy::cross_entropy_in_region`], [`crate::embed::embed_in_region`]),
    /// which need the feature dim whole on each device: the model refuses `Kernel` for a norm or
    /// the loss on a mesh that cuts D or V (the embedding gathers its table whole, any mesh).
    Kernel,
    /// [`KernelLowering::Kernel`] for a graph on one device of the CPU platform,
    /// [`KernelLowering::Hlo`] elsewhere (on a CPU mesh the row regions measured no faster than
    /// the HLO: `docs/results/seq-kernel/README.md` §4). Resolve with [`KernelLowering::resolve`].
    #[default]
    Auto,
}

impl KernelLowering {
    /// The concrete lowering for a graph on `devices` devices of the PJRT platform `platform`
    /// (`"cpu"`, `"cuda"`, `"tpu"`, ...; case-insensitive): `Auto` is `Kernel` on one CPU
    /// device and `Hlo` elsewhere; explicit choices are returned unchanged (an explicit
    /// `Kernel` on a CPU mesh runs the kernels in manual regions over the rows, or is an error
    /// where the mesh cuts the op's feature dim).
    ///
    /// ```
    /// use pallas_port::kernel_lowering::KernelLowering as L;
    /// assert_eq!(L::Auto.resolve("cpu", 1), L::Kernel);
    /// assert_eq!(L::Auto.resolve("Host", 1), L::Kernel);
    /// assert_eq!(L::Auto.resolve("cpu", 8), L::Hlo);
    /// assert_eq!(L::Auto.resolve("tpu", 1), L::Hlo);
    /// assert_eq!(L::Hlo.resolve("cpu", 1), L::Hlo);
    /// assert_eq!(L::Kernel.resolve("cpu", 8), L::Kernel);
    /// ```
    pub fn resolve(self, platform: &str, devices: usize) -> KernelLowering {
        match self {
            KernelLowering::Auto if crate::graph::is_host_platform(platform) && devices == 1 => {
                KernelLowering::Kernel
            }
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
