//! Setup shared by the RLA benches: the design's benchmark shape (B=1, N=8, G=2, H=128, W=512,
//! chunk 512, softmax), deterministic inputs and the kernels' output buffers. CPU time, the load
//! and the environment knobs are [`pallas_port::bench_util`]'s.
#![allow(dead_code)]

use pallas_port::bench_util::data;
use pallas_port::{kernel, FeatureMap, RlaConfig, RlaDims};

/// The benchmark config (W=512, chunk 512, softmax) with sub-chunk `sub_chunk`.
pub fn bench_config(sub_chunk: usize) -> RlaConfig {
    RlaConfig {
        window: 512,
        sub_chunk,
        chunk: 512,
        feature_map: FeatureMap::Softmax,
        ..Default::default()
    }
}

/// The benchmark dims (B=1, N=8, G=2, H=128) at sequence length `t`.
pub fn bench_dims(t: usize) -> RlaDims {
    RlaDims {
        batch: 1,
        seq: t,
        heads: 8,
        kv_heads: 2,
        head_dim: 128,
    }
}

/// The kernels' inputs `(q, k, v, d_o)` for dims `d` (seeds 1 to 4).
pub fn inputs(d: &RlaDims) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        data(d.q_len(), 1),
        data(d.kv_len(), 2),
        data(d.kv_len(), 3),
        data(d.q_len(), 4),
    )
}

/// The kernels' outputs, zeroed: `(o, chunk_states, final_state)` of `kernel::rla_fwd` and
/// `(dq, dk, dv)` of `kernel::rla_bwd`, sized for `cfg` and `d`.
pub fn outputs(cfg: &RlaConfig, d: &RlaDims) -> [Vec<f32>; 6] {
    [
        vec![0.0; d.q_len()],
        vec![0.0; d.chunk_states_len(cfg)],
        vec![0.0; d.final_state_len()],
        vec![0.0; d.q_len()],
        vec![0.0; d.kv_len()],
        vec![0.0; d.kv_len()],
    ]
}

/// One benchmark case of the CPU kernels: the config and dims at (`t`, `sub_chunk`), their
/// inputs and output buffers, and the nominal FLOPs of a forward and a backward call.
pub struct Case {
    /// The config ([`bench_config`]).
    pub cfg: RlaConfig,
    /// The dims ([`bench_dims`]).
    pub d: RlaDims,
    /// Nominal FLOPs of [`Case::fwd`] (`kernel::flops_fwd`).
    pub flops_fwd: f64,
    /// Nominal FLOPs of [`Case::bwd`] (`kernel::flops_bwd`).
    pub flops_bwd: f64,
    qkv_do: (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>),
    outs: [Vec<f32>; 6],
}

impl Case {
    /// The case at sequence length `t` and sub-chunk `sub_chunk`.
    pub fn new(t: usize, sub_chunk: usize) -> Case {
        let (cfg, d) = (bench_config(sub_chunk), bench_dims(t));
        Case {
            flops_fwd: kernel::flops_fwd(&cfg, &d),
            flops_bwd: kernel::flops_bwd(&cfg, &d),
            qkv_do: inputs(&d),
            outs: outputs(&cfg, &d),
            cfg,
            d,
        }
    }

    /// One `kernel::rla_fwd` call.
    pub fn fwd(&mut self) {
        let (q, k, v, _) = &self.qkv_do;
        let [o, cs, fs, ..] = &mut self.outs;
        kernel::rla_fwd(&self.cfg, &self.d, q, k, v, o, cs, fs).unwrap();
    }

    /// One `kernel::rla_bwd` call, on the chunk states of the last [`Case::fwd`].
    pub fn bwd(&mut self) {
        let (q, k, v, d_o) = &self.qkv_do;
        let [_, cs, _, dq, dk, dv] = &mut self.outs;
        kernel::rla_bwd(&self.cfg, &self.d, q, k, v, cs, d_o, dq, dk, dv).unwrap();
    }
}
