//! Micro-timing of the RLA kernels a sequence shard runs against the 1-device block.
use pallas_port::bench_util::data;
use pallas_port::{kernel, FeatureMap, RlaConfig, RlaDims};
use std::time::Instant;

fn time(name: &str, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("{name:40} {best:8.3} ms");
    best
}

fn timeif(only: &str, name: &str, reps: usize, f: impl FnMut()) -> f64 {
    if only.is_empty() || name.contains(only) {
        time(name, reps, f)
    } else {
        0.0
    }
}

fn main() {
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(30);
    let cfg = |w| RlaConfig {
        window: w,
        sub_chunk: 64,
        chunk: 256,
        feature_map: FeatureMap::Softmax,
        ..Default::default()
    };
    let dims = |t| RlaDims {
        batch: 8,
        seq: t,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let (c1, d1) = (cfg(64), dims(256));
    let (q, k, v, d_o) = (
        data(d1.q_len(), 1),
        data(d1.kv_len(), 2),
        data(d1.kv_len(), 3),
        data(d1.q_len(), 4),
    );
    let mut o = vec![0.0; d1.q_len()];
    let mut cs = vec![0.0; d1.chunk_states_len(&c1)];
    let mut fs = vec![0.0; d1.final_state_len()];
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; d1.q_len()],
        vec![0.0; d1.kv_len()],
        vec![0.0; d1.kv_len()],
    );
    let only = std::env::var("ONLY").unwrap_or_default();
    if only.is_empty() {
        time("1dev rla_fwd T256", reps, || {
            kernel::rla_fwd(&c1, &d1, &q, &k, &v, &mut o, &mut cs, &mut fs).unwrap()
        });
        time("1dev rla_bwd T256", reps, || {
            kernel::rla_bwd(&c1, &d1, &q, &k, &v, &cs, &d_o, &mut dq, &mut dk, &mut dv).unwrap()
        });
    }
    let (c0, d0) = (cfg(0), dims(32));
    let (q, k, v, d_o) = (
        data(d0.q_len(), 1),
        data(d0.kv_len(), 2),
        data(d0.kv_len(), 3),
        data(d0.q_len(), 4),
    );
    let h0 = data(d0.final_state_len(), 5);
    let mut o = vec![0.0; d0.q_len()];
    let mut cs = vec![0.0; d0.chunk_states_len(&c0)];
    let mut fs = vec![0.0; d0.final_state_len()];
    let mut dh0 = vec![0.0; d0.final_state_len()];
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; d0.q_len()],
        vec![0.0; d0.kv_len()],
        vec![0.0; d0.kv_len()],
    );
    let mut tot = 0.0;
    tot += timeif(&only, "shard rla_kv_state T32 (x8)", reps, || {
        kernel::rla_kv_state(c0.feature_map, &d0, &k, &v, &mut fs).unwrap()
    });
    tot += timeif(&only, "shard rla_fwd_h0 T32 (x8)", reps, || {
        kernel::rla_fwd_h0(&c0, &d0, &q, &k, &v, &h0, &mut o, &mut cs, &mut fs).unwrap()
    });
    let contrib = fs.clone();
    timeif(
        &only,
        "shard rla_fwd_h0_with_contrib T32 (x8)",
        reps,
        || {
            kernel::rla_fwd_h0_with_contrib(
                &c0,
                &d0,
                &q,
                &k,
                &v,
                (&h0, &contrib),
                &mut o,
                &mut cs,
                &mut fs,
            )
            .unwrap()
        },
    );
    tot += timeif(&only, "shard rla_bwd_h0 T32 (x8)", reps, || {
        kernel::rla_bwd_h0(
            &c0,
            &d0,
            &q,
            &k,
            &v,
            &cs,
            &d_o,
            None,
            (&mut dq, &mut dk, &mut dv),
            &mut dh0,
        )
        .unwrap()
    });
    tot += timeif(&only, "shard rla_kv_state_bwd T32 (x8)", reps, || {
        kernel::rla_kv_state_bwd(c0.feature_map, &d0, &k, &v, &h0, &mut dk, &mut dv).unwrap()
    });
    println!("shard total x8 {:.3}", tot * 8.0);
}
