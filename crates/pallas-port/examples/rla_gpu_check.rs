//! GPU check of the Triton RLA blocks: runs `rla` built with `Lowering::Triton` (and, for
//! timing, `Lowering::Hlo`) on a CUDA PJRT client and compares forward outputs and gradients
//! with the CPU kernels (`pallas_port::kernel`) on the same inputs.
//!
//! ```text
//! cargo build --release -p pallas-port --example rla_gpu_check
//! target/release/examples/rla_gpu_check [--plugin /path/to/xla_cuda_plugin.so] [--cases small,bench] [--hlo] [--iters 10]
//! ```
//! Without `--plugin`, the plugin of the `jax-cuda13-pjrt` (or cu12) wheel python3 imports is used.
//! Prints one line per case and tensor (`rel_err` = max |gpu − cpu| / max |cpu|, limit 1e-4)
//! and per lowering the forward and forward+backward times (median of `--iters` runs, each
//! ending with a device→host copy of one small output). Exit status 1 when a check fails.

use std::time::{Duration, Instant};

use hlo_builder::{Builder, ElementType, Shape};
use pallas_port::{kernel, rla_with_state, FeatureMap, Lowering, RlaConfig, RlaDims};

fn f32s(dims: &[usize]) -> Shape {
    Shape::array(
        ElementType::F32,
        &dims.iter().map(|&x| x as i64).collect::<Vec<_>>(),
    )
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Graphs: forward `(o, chunk_states, final_state)` and forward+backward `(o, dq, dk, dv)` of
/// `sum(o ⊙ w)` (so d_o = w).
fn graphs(d: &RlaDims, cfg: &RlaConfig, lowering: Lowering) -> (Vec<u8>, Vec<u8>) {
    let fwd = {
        let b = Builder::new("rla_fwd");
        let q = b.parameter(f32s(&d.q_shape()), "q").unwrap();
        let k = b.parameter(f32s(&d.kv_shape()), "k").unwrap();
        let v = b.parameter(f32s(&d.kv_shape()), "v").unwrap();
        let r = rla_with_state(&b, q, k, v, cfg, lowering).unwrap();
        let root = b.tuple(&[r.o, r.chunk_states, r.final_state]).unwrap();
        b.build(root).unwrap().to_bytes()
    };
    let fb = {
        let b = Builder::new("rla_fwd_bwd");
        let q = b.parameter(f32s(&d.q_shape()), "q").unwrap();
        let k = b.parameter(f32s(&d.kv_shape()), "k").unwrap();
        let v = b.parameter(f32s(&d.kv_shape()), "v").unwrap();
        let w = b.parameter(f32s(&d.q_shape()), "w").unwrap();
        let o = rla_with_state(&b, q, k, v, cfg, lowering).unwrap().o;
        let ow = b.mul(o, w).unwrap();
        let loss = b.reduce_sum(ow, &[0, 1, 2, 3]).unwrap();
        let g = b.grad(loss, &[q, k, v]).unwrap();
        let root = b.tuple(&[o, g[0], g[1], g[2]]).unwrap();
        b.build(root).unwrap().to_bytes()
    };
    (fwd, fb)
}

struct Case {
    name: &'static str,
    d: RlaDims,
    cfg: RlaConfig,
}

fn cases(which: &str) -> Vec<Case> {
    let mut out = Vec::new();
    for w in which.split(',') {
        match w {
            "small" => {
                out.push(Case {
                    name: "small-softmax-h64",
                    d: RlaDims {
                        batch: 2,
                        seq: 300,
                        heads: 4,
                        kv_heads: 2,
                        head_dim: 64,
                    },
                    cfg: RlaConfig {
                        window: 37,
                        sub_chunk: 32,
                        chunk: 64,
                        feature_map: FeatureMap::Softmax,
                    },
                });
                out.push(Case {
                    name: "small-relu-h32",
                    d: RlaDims {
                        batch: 1,
                        seq: 200,
                        heads: 2,
                        kv_heads: 1,
                        head_dim: 32,
                    },
                    cfg: RlaConfig {
                        window: 20,
                        sub_chunk: 16,
                        chunk: 64,
                        feature_map: FeatureMap::Relu,
                    },
                });
            }
            "bench" => out.push(Case {
                name: "bench-B1-N8-G2-H128-W512-T4096",
                d: RlaDims {
                    batch: 1,
                    seq: 4096,
                    heads: 8,
                    kv_heads: 2,
                    head_dim: 128,
                },
                cfg: RlaConfig {
                    window: 512,
                    sub_chunk: 64,
                    chunk: 512,
                    feature_map: FeatureMap::Softmax,
                },
            }),
            other => panic!("unknown case set {other:?} (small, bench)"),
        }
    }
    out
}

/// The CUDA plugin of an installed `jax-cuda13-pjrt` (or cu12) wheel, asked from `python3`.
fn find_plugin() -> String {
    let script = "import importlib, os\nfor m in ('jax_plugins.xla_cuda13', 'jax_plugins.xla_cuda12'):\n    try:\n        d = os.path.dirname(importlib.import_module(m).__file__)\n        print(os.path.join(d, 'xla_cuda_plugin.so')); break\n    except Exception: pass\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("no --plugin given and python3 could not be run to find jax_plugins.xla_cuda13");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "no --plugin given and no jax_plugins.xla_cuda13 / xla_cuda12 module found by python3"
    );
    println!("plugin {path}");
    path
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let plugin_path = arg("--plugin").unwrap_or_else(find_plugin);
    let which = arg("--cases").unwrap_or_else(|| "small,bench".into());
    let iters: usize = arg("--iters").map_or(10, |s| s.parse().expect("--iters N"));
    let with_hlo = args.iter().any(|a| a == "--hlo");
    let plugin = pjrt::Plugin::load(&plugin_path).expect("loading the plugin");
    let client = pjrt::Client::new(&plugin, &[]).expect("creating the client");
    println!(
        "platform {} ({}), devices: {}",
        client.platform_name().unwrap_or_default(),
        client.platform_version().unwrap_or_default(),
        client
            .devices()
            .map(|d| d
                .iter()
                .map(|x| x.description().kind.clone())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    let mut failed = false;
    for c in cases(&which) {
        let (d, cfg) = (&c.d, &c.cfg);
        let q = values(d.q_len(), 1, 2.0);
        let k = values(d.kv_len(), 2, 2.0);
        let v = values(d.kv_len(), 3, 1.0);
        let w = values(d.q_len(), 4, 1.0);
        let t = Instant::now();
        let mut o = vec![0.0; d.q_len()];
        let mut cs = vec![0.0; d.chunk_states_len(cfg)];
        let mut fs = vec![0.0; d.final_state_len()];
        kernel::rla_fwd(cfg, d, &q, &k, &v, &mut o, &mut cs, &mut fs).unwrap();
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; d.q_len()],
            vec![0.0; d.kv_len()],
            vec![0.0; d.kv_len()],
        );
        kernel::rla_bwd(cfg, d, &q, &k, &v, &cs, &w, &mut dq, &mut dk, &mut dv).unwrap();
        println!("{}: {d} {cfg:?}; CPU kernels {:?}", c.name, t.elapsed());
        let up = |x: &[f32], dims: &[usize]| {
            let dims: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
            client.buffer_from_host(x, &dims, None).expect("upload")
        };
        let (bq, bk, bv, bw) = (
            up(&q, &d.q_shape()),
            up(&k, &d.kv_shape()),
            up(&v, &d.kv_shape()),
            up(&w, &d.q_shape()),
        );
        let mut lowerings = vec![Lowering::Triton];
        if with_hlo {
            lowerings.push(Lowering::Hlo);
        }
        for l in lowerings {
            let (gf, gfb) = graphs(d, cfg, l);
            let t = Instant::now();
            let opts = pjrt::CompileOptions::default();
            let ef = match client.compile(pjrt::Program::Hlo(&gf), &opts) {
                Ok(e) => e,
                Err(e) => {
                    println!("{} {l}: forward compile FAILED: {e}", c.name);
                    failed = true;
                    continue;
                }
            };
            let efb = match client.compile(pjrt::Program::Hlo(&gfb), &opts) {
                Ok(e) => e,
                Err(e) => {
                    println!("{} {l}: fwd+bwd compile FAILED: {e}", c.name);
                    failed = true;
                    continue;
                }
            };
            println!("{} {l}: compiled both in {:?}", c.name, t.elapsed());
            let run = |e: &pjrt::LoadedExecutable, a: &[&pjrt::Buffer]| -> Vec<Vec<f32>> {
                e.execute(a)
                    .expect("execute")
                    .iter()
                    .map(|b| b.to_host::<f32>().expect("download"))
                    .collect()
            };
            let outs = run(&ef, &[&bq, &bk, &bv]);
            let outs_fb = run(&efb, &[&bq, &bk, &bv, &bw]);
            for (name, got, want) in [
                ("o", &outs[0], &o),
                ("chunk_states", &outs[1], &cs),
                ("final_state", &outs[2], &fs),
                ("dq", &outs_fb[1], &dq),
                ("dk", &outs_fb[2], &dk),
                ("dv", &outs_fb[3], &dv),
            ] {
                let e = rel_err(got, want);
                let ok = e <= 1e-4;
                failed |= !ok;
                println!(
                    "{} {l}: {name} rel_err {e:.2e} {}",
                    c.name,
                    if ok { "ok" } else { "FAIL (> 1e-4)" }
                );
            }
            let time = |e: &pjrt::LoadedExecutable, a: &[&pjrt::Buffer]| {
                let mut ts = Vec::new();
                for _ in 0..iters.max(1) + 1 {
                    let t = Instant::now();
                    let out = e.execute(a).expect("execute");
                    let _ = out
                        .last()
                        .expect("an output")
                        .to_host::<f32>()
                        .expect("sync");
                    ts.push(t.elapsed());
                }
                ts.remove(0); // warm-up
                median(ts)
            };
            println!(
                "{} {l}: forward {:?}, forward+backward {:?} (median of {iters})",
                c.name,
                time(&ef, &[&bq, &bk, &bv]),
                time(&efb, &[&bq, &bk, &bv, &bw])
            );
        }
    }
    if failed {
        println!("RESULT: FAIL");
        std::process::exit(1);
    }
    println!("RESULT: ok");
}
