//! Criterion bench of the RLA CPU kernels at the design's benchmark shape:
//! B=1, N=8, G=2, H=128, W=512, chunk 512, T ∈ {1024, 4096}; forward and forward+backward.
//!
//! GFLOP/s use the nominal chunked-algorithm FLOP counts `kernel::flops_fwd` / `flops_bwd`
//! (dense sub-chunks, no credit for skipped masked work), printed once per shape.
//! `RLA_BENCH_SUB_CHUNKS=32,64,128` sweeps the sub-chunk size (default: the config default).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pallas_port::{kernel, RlaConfig};

mod common;

use common::{bench_config, bench_dims, inputs, outputs};
use pallas_port::bench_util::env_list;

fn bench(c: &mut Criterion) {
    let default = RlaConfig::default();
    let subs: Vec<usize> =
        env_list("RLA_BENCH_SUB_CHUNKS").unwrap_or_else(|| vec![default.sub_chunk]);
    let mut group = c.benchmark_group("rla_kernel");
    group.sample_size(10);
    for &t in &[1024usize, 4096] {
        for &sc in &subs {
            let cfg = bench_config(sc);
            let d = bench_dims(t);
            let (q, k, v, d_o) = inputs(&d);
            let [mut o, mut cs, mut fs, mut dq, mut dk, mut dv] = outputs(&cfg, &d);
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
