//! Wall time of the RLA kernels one sequence shard runs against the 1-device block, at the
//! sharded bench's shape (`configs/bench.toml` at T 256, B 8 on `mesh.seq = 8`: N 4, G 2, H 64,
//! W 64, chunk 256, sub-chunk 64, softmax; a shard holds 32 tokens and scans at W = 0):
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release -p pallas-port --example rla_shard_time
//! ```
//! Fastest of `REPS` (default 30) calls each; `ONLY=text` times only the kernels whose label
//! contains it (the 1-device block only when unset); `T` and `B` change the sequence length
//! and the batch (default 256 and 8; a shard holds T/8 tokens). The shard's kernels ×8 are
//! one step's work of all 8 shards, comparable with the 1-device block over the T tokens.

use pallas_port::bench_util::data;
use pallas_port::{kernel, FeatureMap, RlaConfig, RlaDims};
use std::time::Instant;

/// Fastest of `reps` calls of `f` in ms (after one warm-up call), printed beside `name`.
fn time(name: &str, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("{name:44} {best:8.3} ms");
    best
}

fn main() {
    let env = pallas_port::bench_util::env_usize;
    let (reps, t, batch) = (env("REPS", 30), env("T", 256), env("B", 8));
    let only = std::env::var("ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || name.contains(only.as_str());
    let cfg = |window| RlaConfig {
        window,
        sub_chunk: 64,
        chunk: 256,
        feature_map: FeatureMap::Softmax,
        ..Default::default()
    };
    let dims = |seq| RlaDims {
        batch,
        seq,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let inputs = |d: &RlaDims| {
        let (q, k) = (data(d.q_len(), 1), data(d.kv_len(), 2));
        (q, k, data(d.kv_len(), 3), data(d.q_len(), 4))
    };

    let (c1, d1) = (cfg(64), dims(t));
    let (q, k, v, d_o) = inputs(&d1);
    let mut o = vec![0.0; d1.q_len()];
    let mut cs = vec![0.0; d1.chunk_states_len(&c1)];
    let mut fs = vec![0.0; d1.final_state_len()];
    let (mut dq, mut dk, mut dv) = (o.clone(), vec![0.0; d1.kv_len()], vec![0.0; d1.kv_len()]);
    if only.is_empty() {
        let fwd = time("1 device: rla_fwd", reps, || {
            kernel::rla_fwd(&c1, &d1, &q, &k, &v, &mut o, &mut cs, &mut fs).unwrap()
        });
        let bwd = time("1 device: rla_bwd", reps, || {
            let g = (&mut dq[..], &mut dk[..], &mut dv[..]);
            kernel::rla_bwd(&c1, &d1, &q, &k, &v, &cs, &d_o, g.0, g.1, g.2).unwrap()
        });
        println!("1 device (T {t}, B {batch}) total {:.3} ms", fwd + bwd);
    }

    let (c0, d0) = (cfg(0), dims(t / 8));
    let (q, k, v, d_o) = inputs(&d0);
    let h0 = data(d0.final_state_len(), 5);
    let mut o = vec![0.0; d0.q_len()];
    let mut cs = vec![0.0; d0.chunk_states_len(&c0)];
    let mut fs = vec![0.0; d0.final_state_len()];
    let mut contrib = vec![0.0; d0.final_state_len()];
    let mut dh0 = vec![0.0; d0.final_state_len()];
    let (mut dq, mut dk, mut dv) = (o.clone(), vec![0.0; d0.kv_len()], vec![0.0; d0.kv_len()]);
    let fm = c0.feature_map;
    let mut total = 0.0;
    let name = "shard: rla_kv_state";
    kernel::rla_kv_state(fm, &d0, &k, &v, &mut contrib).unwrap();
    if want(name) {
        total += time(name, reps, || {
            kernel::rla_kv_state(fm, &d0, &k, &v, &mut contrib).unwrap()
        });
    }
    let name = "shard: rla_fwd_h0 (no contribution)";
    if want(name) {
        time(name, reps, || {
            kernel::rla_fwd_h0(&c0, &d0, &q, &k, &v, &h0, &mut o, &mut cs, &mut fs).unwrap()
        });
    }
    let name = "shard: rla_fwd_h0 given the contribution";
    if want(name) {
        total += time(name, reps, || {
            let given = (&h0[..], &contrib[..]);
            kernel::rla_fwd_h0_with_contrib(&c0, &d0, &q, &k, &v, given, &mut o, &mut cs, &mut fs)
                .unwrap()
        });
    }
    let name = "shard: rla_bwd_h0";
    if want(name) {
        total += time(name, reps, || {
            let g = (&mut dq[..], &mut dk[..], &mut dv[..]);
            kernel::rla_bwd_h0(&c0, &d0, &q, &k, &v, &cs, &d_o, None, g, &mut dh0).unwrap()
        });
    }
    let name = "shard: rla_kv_state_bwd";
    if want(name) {
        total += time(name, reps, || {
            kernel::rla_kv_state_bwd(fm, &d0, &k, &v, &h0, &mut dk, &mut dv).unwrap()
        });
    }
    println!(
        "shard total (with the contribution) x8 {:.3} ms",
        total * 8.0
    );
}
