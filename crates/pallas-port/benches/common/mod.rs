//! Setup shared by the RLA benches: the design's benchmark shape (B=1, N=8, G=2, H=128, W=512,
//! chunk 512, softmax), deterministic inputs and the kernels' output buffers. CPU time, the load
//! and the environment knobs are [`pallas_port::bench_util`]'s.
#![allow(dead_code)]

use pallas_port::bench_util::data;
use pallas_port::{FeatureMap, RlaConfig, RlaDims};

/// The benchmark config (W=512, chunk 512, softmax) with sub-chunk `sub_chunk`.
pub fn bench_config(sub_chunk: usize) -> RlaConfig {
    RlaConfig {
        window: 512,
        sub_chunk,
        chunk: 512,
        feature_map: FeatureMap::Softmax,
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
