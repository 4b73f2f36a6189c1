//! Criterion bench of the RLA CPU kernels at the design's benchmark shape:
//! B=1, N=8, G=2, H=128, W=512, chunk 512, T ∈ {1024, 4096}; forward and forward+backward.
//!
//! GFLOP/s use the nominal chunked-algorithm FLOP counts `kernel::flops_fwd` / `flops_bwd`
//! (dense sub-chunks, no credit for skipped masked work), printed once per shape.
//! `RLA_BENCH_SUB_CHUNKS=32,64,128` sweeps the sub-chunk size (default: the config default).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pallas_port::RlaConfig;

mod common;

use common::Case;
use pallas_port::bench_util::env_list;

fn bench(c: &mut Criterion) {
    let default = RlaConfig::default();
    let subs: Vec<usize> =
        env_list("RLA_BENCH_SUB_CHUNKS").unwrap_or_else(|| vec![default.sub_chunk]);
    let mut group = c.benchmark_group("rla_kernel");
    group.sample_size(10);
    for &t in &[1024usize, 4096] {
        for &sc in &subs {
            let mut case = Case::new(t, sc);
            let (ff, fb) = (case.flops_fwd, case.flops_bwd);
            eprintln!(
                "T={t} C={sc}: nominal GFLOP fwd {:.3}, bwd {:.3}, fwd+bwd {:.3}",
                ff / 1e9,
                fb / 1e9,
                (ff + fb) / 1e9
            );
            let id = format!("T{t}_C{sc}");
            group.throughput(Throughput::Elements(ff as u64));
            group.bench_function(BenchmarkId::new("fwd", &id), |bch| bch.iter(|| case.fwd()));
            group.throughput(Throughput::Elements((ff + fb) as u64));
            group.bench_function(BenchmarkId::new("fwd_bwd", &id), |bch| {
                bch.iter(|| {
                    case.fwd();
                    case.bwd();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
