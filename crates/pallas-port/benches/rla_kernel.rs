//! Criterion bench of the RLA CPU kernels at the design's benchmark shape:
//! B=1, N=8, G=2, H=128, W=512, chunk 512, T ∈ {1024, 4096}; forward and forward+backward.
//!
//! GFLOP/s use the nominal chunked-algorithm FLOP counts `kernel::flops_fwd` / `flops_bwd`
//! (dense sub-chunks, no credit for skipped masked work), printed once per shape.
//! `RLA_BENCH_SUB_CHUNKS=32,64,128` sweeps the sub-chunk size (default: the config default).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pallas_port::{kernel, FeatureMap, RlaConfig, RlaDims};

fn data(n: usize, seed: u64) -> Vec<f32> {
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

fn bench(c: &mut Criterion) {
    let default = RlaConfig::default();
    let subs: Vec<usize> = std::env::var("RLA_BENCH_SUB_CHUNKS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![default.sub_chunk]);
    let mut group = c.benchmark_group("rla_kernel");
    group.sample_size(10);
    for &t in &[1024usize, 4096] {
        for &sc in &subs {
            let cfg = RlaConfig {
                window: 512,
                sub_chunk: sc,
                chunk: 512,
                feature_map: FeatureMap::Softmax,
            };
            let d = RlaDims {
                batch: 1,
                seq: t,
                heads: 8,
                kv_heads: 2,
                head_dim: 128,
            };
            let q = data(d.q_len(), 1);
            let k = data(d.kv_len(), 2);
            let v = data(d.kv_len(), 3);
            let d_o = data(d.q_len(), 4);
            let mut o = vec![0.0; d.q_len()];
            let mut cs = vec![0.0; d.chunk_states_len(&cfg)];
            let mut fs = vec![0.0; d.final_state_len()];
            let (mut dq, mut dk, mut dv) = (
                vec![0.0; d.q_len()],
                vec![0.0; d.kv_len()],
                vec![0.0; d.kv_len()],
            );
            let ff = kernel::flops_fwd(&cfg, &d);
            let fb = kernel::flops_bwd(&cfg, &d);
            eprintln!(
                "T={t} C={sc}: nominal GFLOP fwd {:.3}, bwd {:.3}, fwd+bwd {:.3}",
                ff / 1e9,
                fb / 1e9,
                (ff + fb) / 1e9
            );
            let id = format!("T{t}_C{sc}");
            group.throughput(Throughput::Elements(ff as u64));
            group.bench_function(BenchmarkId::new("fwd", &id), |bch| {
                bch.iter(|| {
                    kernel::rla_fwd(&cfg, &d, &q, &k, &v, &mut o, &mut cs, &mut fs).unwrap()
                })
            });
            group.throughput(Throughput::Elements((ff + fb) as u64));
            group.bench_function(BenchmarkId::new("fwd_bwd", &id), |bch| {
                bch.iter(|| {
                    kernel::rla_fwd(&cfg, &d, &q, &k, &v, &mut o, &mut cs, &mut fs).unwrap();
                    kernel::rla_bwd(&cfg, &d, &q, &k, &v, &cs, &d_o, &mut dq, &mut dk, &mut dv)
                        .unwrap();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
