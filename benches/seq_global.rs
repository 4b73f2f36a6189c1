//! A global layer under sequence parallelism, dense against zigzag (`mesh.seq_global`), on 8 CPU
//! devices (the CPU plugin with `cpu_device_count = 8`, all in this process): the attention core
//! of one global layer of `configs/bench.toml` (4 heads / 2 kv heads, head dim 64), forward and
//! the gradients of q, k, v, against the same graph on 1 device. Dense: each shard's T/S queries
//! against all T keys (4S·c² scores per shard for chunks of c = T/(2S) tokens); zigzag: the
//! 2S+1 visible c × c blocks of two chunks per shard, with queries and outputs exchanged by
//! collective-permutes. The 8 "devices" share the host's cores, so this measures work and
//! overhead, not a speed-up.
//!
//! After criterion's runs one table per shape prints wall and CPU ms per call (medians; CPU
//! summed over all threads of the process) and throughput relative to 1 device, with the load.
//!
//! `cargo bench -p rattention-benches --bench seq_global -- --quick` (env
//! `RATTN_BENCH_SHAPES=256x8,1024x2` picks T × batch; default 256x8, 1024x2, 2048x1;
//! `RATTN_BENCH_LAYER=local` times a RAttention local layer (SWA + RLA, W = 64) instead, whose
//! program does not depend on the scheme, for comparison, plus a "1 device hlo" row with
//! `model.attention_lowering = "hlo"`; env `RATTN_BENCH_SEQ_HLO=1` adds "seq8 hlo", the seq
//! region with the HLO banded blocks instead of the attention kernel).

use std::collections::HashMap;

use criterion::BenchmarkId;
use hlo_builder::{Builder, ElementType, Op, Sharding};
use model::{Attention, MeshConfig, Model, ParamOps, SeqGlobal};
use pjrt::{Buffer, Client, LoadedExecutable};
use rattention_benches::{
    bench_config, compile_spmd, cpu_client, criterion, load, ratio_table, upload_pieces, Row,
    Timings,
};

const DEVICES: usize = 8;

/// `(data, seq)` sizes and the global layers' scheme of a mesh.
type SeqMesh = (i64, i64, SeqGlobal);

/// Label and mesh of each run (`None`: 1 device).
const RUNS: [(&str, Option<SeqMesh>); 5] = [
    ("1 device", None),
    ("seq8 dense", Some((1, 8, SeqGlobal::Dense))),
    ("seq8 zigzag", Some((1, 8, SeqGlobal::Zigzag))),
    ("data2xseq4 dense", Some((2, 4, SeqGlobal::Dense))),
    ("data2xseq4 zigzag", Some((2, 4, SeqGlobal::Zigzag))),
];

/// The compiled global layer (out and dq, dk, dv of `sum(out · w)`) and its per-device inputs.
struct Layer {
    exe: LoadedExecutable,
    args: Vec<Vec<Buffer>>,
}

/// The layer timed: global, or a RAttention local layer with env `RATTN_BENCH_LAYER=local`.
fn layer_kind() -> Attention {
    match std::env::var("RATTN_BENCH_LAYER").as_deref() {
        Ok("local") => Attention::Rattention,
        Ok("global") | Err(_) => Attention::Global,
        Ok(other) => panic!("RATTN_BENCH_LAYER = {other:?}: global or local"),
    }
}

fn setup(client: &Client, t: usize, batch: usize, mesh: Option<SeqMesh>, lowering: &str) -> Layer {
    let cfg = bench_config(&[
        format!("model.seq_len={t}"),
        "model.window=64".into(),
        "model.rla.chunk=32".into(),
        "model.rla.sub_chunk=16".into(),
        format!("model.attention_lowering=\"{lowering}\""),
    ]);
    let mut m = Model::new(cfg.model.clone()).expect("model");
    let n = if let Some((data, seq, scheme)) = mesh {
        let mc = MeshConfig {
            data,
            seq,
            seq_global: scheme,
            ..MeshConfig::default()
        };
        m = m
            .with_mesh(mc.resolve(DEVICES).expect("mesh"))
            .expect("mesh");
        DEVICES
    } else {
        1
    };
    let c = m.config();
    let (nh, g, h) = (c.heads, c.kv_heads, c.head_dim);
    let qd = [batch, t, nh, h];
    let kd = [batch, t, g, h];
    let dims = [qd, kd, kd, qd];
    let b = Builder::new("global_layer");
    let p: Vec<Op> = dims
        .iter()
        .zip(["q", "k", "v", "w"])
        .map(|(d, name)| {
            let d: Vec<i64> = d.iter().map(|&x| x as i64).collect();
            b.parameter(hlo_builder::Shape::array(ElementType::F32, &d), name)
                .unwrap()
        })
        .collect();
    let qdi: Vec<i64> = qd.iter().map(|&x| x as i64).collect();
    let sh = m.seq_region(&qdi).unwrap().unwrap_or(Sharding::Replicated);
    for &x in &p {
        b.set_sharding(x, sh.clone()).unwrap();
    }
    let pos = b.iota(ElementType::F32, &[t as i64], 0).unwrap();
    let mut scales: ParamOps = HashMap::new();
    for name in ["l.swa_norm.scale", "l.rla_norm.scale"] {
        let ones = b.ones(ElementType::F32, &[nh as i64, h as i64]).unwrap();
        scales.insert(name.into(), ones);
    }
    let qkv = (p[0], p[1], p[2]);
    let out = m
        .attention_core(&b, &scales, "l", layer_kind(), qkv, pos, "cpu")
        .unwrap();
    let l = b
        .reduce_sum(b.mul(out, p[3]).unwrap(), &[0, 1, 2, 3])
        .unwrap();
    let grads = b.grad(l, &p[..3]).unwrap();
    let root = b.tuple(&[out, grads[0], grads[1], grads[2]]).unwrap();
    if n > 1 {
        b.set_sharding(root, Sharding::Tuple(vec![sh.clone(); 4]))
            .unwrap();
    }
    let comp = b.build(root).unwrap();
    let exe = compile_spmd(client, &comp.to_bytes(), n);
    let mut args: Vec<Vec<Buffer>> = (0..n).map(|_| Vec::new()).collect();
    for (i, d) in dims.iter().enumerate() {
        let numel: usize = d.iter().product();
        let host: Vec<f32> = (0..numel)
            .map(|j| ((j * 37 + i * 11) % 101) as f32 / 101.0 - 0.5)
            .collect();
        for (dev, x) in upload_pieces(client, &host, d, &sh, n)
            .into_iter()
            .enumerate()
        {
            args[dev].push(x);
        }
    }
    Layer { exe, args }
}

impl Layer {
    fn call(&self) {
        let refs: Vec<Vec<&Buffer>> = self.args.iter().map(|a| a.iter().collect()).collect();
        let outs = self.exe.execute_sharded(&refs).expect("execute");
        outs[0][0].to_host::<f32>().unwrap();
    }
}

fn main() {
    let mut c = criterion(1, 3);
    let shapes: Vec<(usize, usize)> = std::env::var("RATTN_BENCH_SHAPES")
        .unwrap_or_else(|_| "256x8,1024x2,2048x1".into())
        .split(',')
        .map(|s| {
            let (t, b) = s.trim().split_once('x').expect("T x batch, e.g. 1024x2");
            (t.parse().expect("T"), b.parse().expect("batch"))
        })
        .collect();
    let client = cpu_client(DEVICES);
    let kind = layer_kind();
    let mut tables = Vec::new();
    for (t, batch) in shapes {
        let timings = Timings::default();
        let mut rows = Vec::new();
        let load_before = load();
        let mut group = c.benchmark_group(format!("seq_global_T{t}_B{batch}"));
        // The local layer also runs on 1 device with the HLO attention (what the seq region
        // used before the kernel took runtime positions): the kernel-vs-HLO gap.
        let hlo_row = (kind != Attention::Global).then_some(("1 device hlo", None, "hlo"));
        let runs = RUNS
            .iter()
            .map(|&(l, m)| (l, m, "auto"))
            .chain(hlo_row)
            .chain(std::env::var("RATTN_BENCH_SEQ_HLO").is_ok().then_some((
                "seq8 hlo",
                Some((1, 8, SeqGlobal::Dense)),
                "hlo",
            )));
        for (label, mesh, lowering) in runs {
            if kind != Attention::Global && mesh.is_some_and(|m| m.2 == SeqGlobal::Zigzag) {
                continue; // the local layer's program does not depend on the scheme
            }
            if mesh.is_some_and(|(data, _, _)| !batch.is_multiple_of(data as usize)) {
                eprintln!("{label}: skipped, batch {batch} does not split over data");
                continue;
            }
            let label = match kind {
                Attention::Global => label,
                _ => label.trim_end_matches(" dense"),
            };
            let layer = setup(&client, t, batch, mesh, lowering);
            let id = format!("T{t} {label}");
            group.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter_custom(|iters| timings.time(&id, iters, || layer.call()))
            });
            rows.extend(Row::median(&timings, &id, label));
        }
        group.finish();
        tables.push(ratio_table(
            &format!(
                "{} layer of configs/bench.toml (forward + dq, dk, dv), T={t} B={batch}, \
                 on {DEVICES} CPU devices (load {load_before} before, {} after)",
                if kind == Attention::Global {
                    "global"
                } else {
                    "local (W = 64)"
                },
                load()
            ),
            &rows,
            (batch * t) as f64,
            "1 device",
        ));
    }
    c.final_summary();
    for t in tables {
        println!("{t}");
    }
}
