//! Side-by-side criterion bench of the RLA blocks at the design's benchmark shape
//! (B=1, N=8, G=2, H=128, W=512, chunk 512, softmax feature map, T ∈ {1024, 4096}):
//!
//! - `custom_call`: the blocks as typed-FFI custom calls served by our CPU kernels, compiled and
//!   executed through PJRT on the XLA CPU plugin;
//! - `hlo`: the pure-HLO lowering (`Lowering::Hlo`), compiled and executed the same way;
//! - `kernel`: the raw kernel calls `kernel::rla_fwd` / `kernel::rla_bwd` on host slices.
//!
//! Forward graphs return `(o, chunk_states, final_state)`; forward+backward graphs are built the
//! way a model does it, `o = rla(q, k, v)` and `b.grad(sum(o ⊙ d_o), [q, k, v])`, so the backward
//! block comes in through the custom VJP; they return `(o, dq, dk, dv)`. Inputs stay on the device
//! between iterations; the timed call is `exe.execute`, which waits for completion.
//!
//! GFLOP/s use the nominal chunked-algorithm FLOPs `kernel::flops_fwd` / `flops_bwd` of each
//! config. After the criterion runs a table prints, per implementation, wall ms and CPU ms per
//! call (medians over criterion's samples; CPU time summed over all threads of the process, which
//! still measures the work when other jobs load the machine), GFLOP/s on wall time, and the
//! ratios HLO / custom call.
//!
//! Environment: `RLA_BENCH_T=1024,4096` (sequence lengths), `RLA_BENCH_SUB_CHUNK` (sub-chunk of the
//! custom call and the kernel, default the config default), `RLA_BENCH_HLO_SUB_CHUNK` (sub-chunk of
//! the HLO lowering, default 128: its fastest).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hlo_builder::{Builder, ElementType, Op, Shape};
use pallas_port::graph::rla_fwd_block;
use pallas_port::{kernel, rla, Lowering, RlaConfig, RlaDims};

mod common;

use common::{bench_config, bench_dims, inputs, outputs};
use pallas_port::bench_util::{env_list, load, Timings};

const SAMPLES: usize = 10;

fn f32_param(b: &Builder, dims: &[usize], name: &str) -> Op {
    let d: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
    b.parameter(Shape::array(ElementType::F32, &d), name)
        .expect("parameter")
}

/// The forward graph `(q, k, v) -> (o, chunk_states, final_state)`.
fn fwd_graph(cfg: &RlaConfig, d: &RlaDims, lowering: Lowering) -> Vec<u8> {
    let b = Builder::new("rla_fwd_bench");
    let q = f32_param(&b, &d.q_shape(), "q");
    let k = f32_param(&b, &d.kv_shape(), "k");
    let v = f32_param(&b, &d.kv_shape(), "v");
    let root = rla_fwd_block(&b, q, k, v, cfg, lowering).expect("rla_fwd_block");
    b.build(root).expect("build").to_bytes()
}

/// The forward+backward graph `(q, k, v, d_o) -> (o, dq, dk, dv)` through `rla` and `grad`.
fn fwd_bwd_graph(cfg: &RlaConfig, d: &RlaDims, lowering: Lowering) -> Vec<u8> {
    let b = Builder::new("rla_fwd_bwd_bench");
    let q = f32_param(&b, &d.q_shape(), "q");
    let k = f32_param(&b, &d.kv_shape(), "k");
    let v = f32_param(&b, &d.kv_shape(), "v");
    let d_o = f32_param(&b, &d.q_shape(), "d_o");
    let o = rla(&b, q, k, v, cfg, lowering).expect("rla");
    let loss = b
        .reduce_sum(b.mul(o, d_o).expect("mul"), &[0, 1, 2, 3])
        .expect("reduce_sum");
    let g = b.grad(loss, &[q, k, v]).expect("grad");
    let root = b.tuple(&[o, g[0], g[1], g[2]]).expect("tuple");
    b.build(root).expect("build").to_bytes()
}

/// Per-iteration (wall, CPU) seconds recorded by `iter_custom`, keyed by bench id.
static TIMES: Timings = Timings::new();

/// Times `iters` calls of `f`, records wall and CPU time per call under `id`, returns the wall time.
fn timed(id: &str, iters: u64, f: impl FnMut()) -> Duration {
    TIMES.time(id, iters, f)
}

/// Medians (wall ms, CPU ms) of the last `SAMPLES` recorded per-call times (criterion's
/// measurement samples; earlier entries are its warm-up).
fn median_ms(id: &str) -> Option<(f64, f64)> {
    TIMES.median_ms_last(id, SAMPLES)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale.max(f64::MIN_POSITIVE)
}

struct Row {
    t: usize,
    mode: &'static str,
    /// (id, FLOPs) per implementation: kernel, custom_call, hlo.
    entries: [(String, f64); 3],
}

fn bench(c: &mut Criterion) {
    let ts = env_list("RLA_BENCH_T").unwrap_or_else(|| vec![1024, 4096]);
    let sc = env_list("RLA_BENCH_SUB_CHUNK")
        .and_then(|v| v.first().copied())
        .unwrap_or(RlaConfig::default().sub_chunk);
    let sc_hlo = env_list("RLA_BENCH_HLO_SUB_CHUNK")
        .and_then(|v| v.first().copied())
        .unwrap_or(128);
    let client = pjrt::Client::cpu().expect("XLA CPU plugin (run `rattn plugin install cpu`)");
    pallas_port::register_cpu_kernels(&client).expect("register the RLA FFI handlers");
    let opts = pjrt::CompileOptions::default();

    let mut group = c.benchmark_group("rla_blocks");
    group.sample_size(SAMPLES);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(4));
    let mut rows = Vec::new();
    for &t in &ts {
        let d = bench_dims(t);
        let cfg = bench_config(sc);
        let cfg_hlo = bench_config(sc_hlo);
        let (q, k, v, d_o) = inputs(&d);
        let up = |x: &[f32], shape: &[usize]| {
            let s: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
            client.buffer_from_host::<f32>(x, &s, None).expect("upload")
        };
        let (bq, bk, bv, bdo) = (
            up(&q, &d.q_shape()),
            up(&k, &d.kv_shape()),
            up(&v, &d.kv_shape()),
            up(&d_o, &d.q_shape()),
        );
        let ff = kernel::flops_fwd(&cfg, &d);
        let fb = kernel::flops_bwd(&cfg, &d);
        let ff_h = kernel::flops_fwd(&cfg_hlo, &d);
        let fb_h = kernel::flops_bwd(&cfg_hlo, &d);

        // Raw kernels, and the reference outputs the compiled graphs are checked against once.
        let [mut o, mut cs, mut fs, mut dq, mut dk, mut dv] = outputs(&cfg, &d);
        kernel::rla_fwd(&cfg, &d, &q, &k, &v, &mut o, &mut cs, &mut fs).expect("rla_fwd");
        kernel::rla_bwd(&cfg, &d, &q, &k, &v, &cs, &d_o, &mut dq, &mut dk, &mut dv)
            .expect("rla_bwd");
        let want = [o.clone(), dq.clone(), dk.clone(), dv.clone()];

        let id = |what: &str, mode: &str, fl: f64, sub: usize| {
            format!("{what}/{mode}/T{t}_C{sub}_{:.1}GFLOP", fl / 1e9)
        };
        let k_fwd = id("kernel", "fwd", ff, sc);
        group.throughput(Throughput::Elements(ff as u64));
        group.bench_function(BenchmarkId::from_parameter(&k_fwd), |bch| {
            bch.iter_custom(|iters| {
                timed(&k_fwd, iters, || {
                    kernel::rla_fwd(&cfg, &d, &q, &k, &v, &mut o, &mut cs, &mut fs).unwrap()
                })
            })
        });
        let k_fb = id("kernel", "fwd_bwd", ff + fb, sc);
        group.throughput(Throughput::Elements((ff + fb) as u64));
        group.bench_function(BenchmarkId::from_parameter(&k_fb), |bch| {
            bch.iter_custom(|iters| {
                timed(&k_fb, iters, || {
                    kernel::rla_fwd(&cfg, &d, &q, &k, &v, &mut o, &mut cs, &mut fs).unwrap();
                    kernel::rla_bwd(&cfg, &d, &q, &k, &v, &cs, &d_o, &mut dq, &mut dk, &mut dv)
                        .unwrap();
                })
            })
        });

        // Compiled graphs: custom call and HLO lowering.
        let mut ids = Vec::new();
        for (name, lowering, c, f_fwd, f_fb) in [
            ("custom_call", Lowering::CustomCall, &cfg, ff, ff + fb),
            ("hlo", Lowering::Hlo, &cfg_hlo, ff_h, ff_h + fb_h),
        ] {
            let exe_f = client
                .compile(pjrt::Program::Hlo(&fwd_graph(c, &d, lowering)), &opts)
                .expect("compile fwd");
            let exe_fb = client
                .compile(pjrt::Program::Hlo(&fwd_bwd_graph(c, &d, lowering)), &opts)
                .expect("compile fwd+bwd");
            // Sanity: the compiled graphs compute what the kernels compute.
            let outs = exe_fb.execute(&[&bq, &bk, &bv, &bdo]).expect("execute");
            for (i, (out, w)) in outs.iter().zip(&want).enumerate() {
                let got = out.to_host::<f32>().expect("download");
                let e = max_rel_diff(&got, w);
                assert!(
                    e < 1e-4,
                    "{name} T={t}: output {i} of fwd+bwd differs from the kernel by {e:.2e}"
                );
            }

            let i_f = id(name, "fwd", f_fwd, c.sub_chunk);
            group.throughput(Throughput::Elements(f_fwd as u64));
            group.bench_function(BenchmarkId::from_parameter(&i_f), |bch| {
                bch.iter_custom(|iters| {
                    timed(&i_f, iters, || {
                        drop(exe_f.execute(&[&bq, &bk, &bv]).unwrap())
                    })
                })
            });
            let i_fb = id(name, "fwd_bwd", f_fb, c.sub_chunk);
            group.throughput(Throughput::Elements(f_fb as u64));
            group.bench_function(BenchmarkId::from_parameter(&i_fb), |bch| {
                bch.iter_custom(|iters| {
                    timed(&i_fb, iters, || {
                        drop(exe_fb.execute(&[&bq, &bk, &bv, &bdo]).unwrap())
                    })
                })
            });
            ids.push(((i_f, f_fwd), (i_fb, f_fb)));
        }
        let mut ids = ids.into_iter();
        let (Some((cc_f, cc_fb)), Some((h_f, h_fb))) = (ids.next(), ids.next()) else {
            unreachable!("two lowerings were benchmarked")
        };
        rows.push(Row {
            t,
            mode: "fwd",
            entries: [(k_fwd, ff), cc_f, h_f],
        });
        rows.push(Row {
            t,
            mode: "fwd+bwd",
            entries: [(k_fb, ff + fb), cc_fb, h_fb],
        });
    }
    group.finish();
    print_table(&rows, sc, sc_hlo);
}

fn print_table(rows: &[Row], sc: usize, sc_hlo: usize) {
    let load = load();
    println!();
    println!(
        "RLA blocks, B1 N8 G2 H128 W512 chunk 512 softmax; kernel and custom call sub_chunk {sc}, \
         HLO sub_chunk {sc_hlo}; median of {SAMPLES} samples; 1-min load {load}"
    );
    println!(
        "{:>5} {:>8} | {:>8} {:>7} {:>7} | {:>8} {:>7} {:>7} | {:>8} {:>7} {:>7} | {:>7} {:>7}",
        "T",
        "pass",
        "kern ms",
        "cpu ms",
        "GFLOP/s",
        "cc ms",
        "cpu ms",
        "GFLOP/s",
        "hlo ms",
        "cpu ms",
        "GFLOP/s",
        "hlo/cc",
        "cpu"
    );
    for r in rows {
        let cell = |(id, fl): &(String, f64)| {
            median_ms(id).map_or((f64::NAN, f64::NAN, f64::NAN), |(ms, cpu)| {
                (ms, cpu, fl / 1e9 / (ms / 1e3))
            })
        };
        let (km, kc, kg) = cell(&r.entries[0]);
        let (cm, cc, cg) = cell(&r.entries[1]);
        let (hm, hc, hg) = cell(&r.entries[2]);
        println!(
            "{:>5} {:>8} | {km:>8.1} {kc:>7.1} {kg:>7.1} | {cm:>8.1} {cc:>7.1} {cg:>7.1} | {hm:>8.1} {hc:>7.1} {hg:>7.1} | {:>6.2}x {:>6.2}x",
            r.t,
            r.mode,
            hm / cm,
            hc / cc
        );
    }
    println!(
        "(ms: wall time; cpu ms: CPU time of all threads of the process per call; GFLOP/s: each \
         config's nominal chunked FLOPs, kernel::flops_fwd/flops_bwd, per wall second; hlo/cc: \
         wall and CPU ratios. Targets at T=4096: custom call ≤ 45 ms fwd, ≤ 170 ms fwd+bwd, \
         ≥ 2× HLO, ≥ 95 GFLOP/s)"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
