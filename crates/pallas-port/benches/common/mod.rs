//! Setup shared by the RLA benches: the design's benchmark shape (B=1, N=8, G=2, H=128, W=512,
//! chunk 512, softmax), deterministic inputs, the kernels' output buffers, CPU time of the
//! process, and the environment knobs.
#![allow(dead_code)]

use pallas_port::{FeatureMap, RlaConfig, RlaDims};

/// `n` deterministic values in `[-1, 1)` (xorshift64).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

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

/// Seconds on the CPU of all threads of this process so far, from
/// `/proc/self/task/*/schedstat` (Linux; NaN elsewhere). On a machine other jobs keep busy, wall
/// time measures the scheduler; CPU time still measures the work.
pub fn cpu_s() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ns = 0u64;
    for e in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 * 1e-9
}

/// The 1-minute load average, or `?`.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The comma-separated numbers in environment variable `name` (unparsable items skipped).
pub fn env_list(name: &str) -> Option<Vec<usize>> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
}
