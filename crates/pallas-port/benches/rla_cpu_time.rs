//! CPU-time profile of the RLA kernels, for a machine that other jobs keep busy: wall-clock
//! numbers there measure the scheduler, but the CPU time our threads get (summed over all threads
//! of the process from `/proc/self/task/*/schedstat`, nanoseconds) still measures the work.
//!
//! Prints, at B1 N8 G2 H128 W512 chunk 512 (`RLA_BENCH_T`, default 4096; `RLA_BENCH_SUB_CHUNK`,
//! default the config default): per call of `kernel::rla_fwd` and of fwd+bwd, the wall time, the
//! CPU time and the nominal GFLOP per CPU-second; and the single-thread rate of the GEMM shapes
//! the kernels use. Linux only (returns no CPU time elsewhere).
//!
//! `cargo bench -p pallas-port --bench rla_cpu_time`

use std::time::Instant;

use pallas_port::RlaConfig;

mod common;

use common::Case;
use pallas_port::bench_util::{cpu_s, data, env_usize, load};

/// Runs `f` at least `min_iters` times and for at least `min_s` seconds of CPU time; returns
/// (wall ms, cpu ms) per call, the minimum over 5 rounds.
fn measure(min_s: f64, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        let (w0, c0) = (Instant::now(), cpu_s());
        let mut n = 0u32;
        while n < 2 || cpu_s() - c0 < min_s {
            f();
            n += 1;
        }
        let (w, c) = (w0.elapsed().as_secs_f64(), cpu_s() - c0);
        best.0 = best.0.min(w * 1e3 / n as f64);
        best.1 = best.1.min(c * 1e3 / n as f64);
    }
    best
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let t = env_usize("RLA_BENCH_T", 4096);
    let sc = env_usize("RLA_BENCH_SUB_CHUNK", RlaConfig::default().sub_chunk);
    let mut case = Case::new(t, sc);
    let (ff, fb) = (case.flops_fwd, case.flops_bwd);
    let threads = rayon::current_num_threads();
    println!(
        "T={t} C={sc} threads={threads} load(1 min)={} nominal GFLOP fwd {:.2} bwd {:.2}",
        load(),
        ff / 1e9,
        fb / 1e9
    );
    let (w, c) = measure(2.0, || case.fwd());
    println!(
        "fwd      wall {w:7.1} ms  cpu {c:7.1} ms  {:6.1} GFLOP/cpu-s",
        ff / 1e6 / c
    );
    let (w, c) = measure(2.0, || case.bwd());
    println!(
        "bwd      wall {w:7.1} ms  cpu {c:7.1} ms  {:6.1} GFLOP/cpu-s",
        fb / 1e6 / c
    );
    if std::env::var_os("RLA_BENCH_GEMMS").is_none() {
        return;
    }
    // Single-thread GEMM rates (ndarray → matrixmultiply) at the kernels' shapes.
    use ndarray::linalg::general_mat_mul;
    use ndarray::Array2;
    for &(m, kk, n, ta) in &[
        (256usize, 256usize, 128usize, false),
        (256, 256, 64, false),
        (256, 64, 128, false),
        (256, 64, 128, true),
        (2048, 256, 128, false),
        (512, 256, 128, true),
        (1024, 1024, 1024, false),
    ] {
        let a = if ta {
            Array2::from_shape_vec((kk, m), data(m * kk, 5)).unwrap()
        } else {
            Array2::from_shape_vec((m, kk), data(m * kk, 5)).unwrap()
        };
        let b = Array2::from_shape_vec((kk, n), data(kk * n, 6)).unwrap();
        let mut cm = Array2::<f32>::zeros((m, n));
        let (_, c) = measure(0.3, || {
            if ta {
                general_mat_mul(1.0, &a.t(), &b, 0.0, &mut cm)
            } else {
                general_mat_mul(1.0, &a, &b, 0.0, &mut cm)
            }
        });
        println!(
            "gemm [{m}x{kk}]{}x[{kk}x{n}]: {:6.1} GFLOP/cpu-s",
            if ta { "ᵀ" } else { "" },
            2.0 * (m * kk * n) as f64 / 1e6 / c
        );
    }
}
