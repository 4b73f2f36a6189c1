//! The sharded train step against the 1-device one on 8 CPU devices (the CPU plugin with
//! `cpu_device_count = 8`, all in this process): issue 11's target is the sharded step's
//! throughput within 20 % of the 1-device step on this machine. The 8 "devices" share the
//! host's cores, so this measures the overhead of partitioning (collectives, smaller ops, the
//! per-device dispatch), not a speed-up.
//!
//! Model: `configs/bench.toml` (d_model 256, 4 layers 3 local : 1 global, 4 heads / 2 kv heads,
//! head dim 64, FFN 768) at T = 256, batch 8, W = 64. Meshes: 1 device; data 8; fsdp 8;
//! tensor 2 × data 4 (2 kv heads allow at most tensor 2); seq 8 (32-token shards, the W = 64
//! halo from 2 shards back); data 2 × seq 4; fsdp 4 × tensor 2. The seq meshes run their
//! global layer as `mesh.seq_global = "auto"` picks (here dense: chunks of T/(2S) = 16 and 32
//! tokens are below the head dim 64); `seq8-zigzag` and `data2xseq4-zigzag` run it
//! load-balanced, for comparison; `seq8-hlo` and `data2xseq4-hlo` run the sequence region's
//! attention as HLO blocks (`model.attention_lowering = "hlo"`) instead of the CPU kernel at
//! runtime positions (what `auto` picks on CPU); `seq8-rlahlo` and `data2xseq4-rlahlo` compose
//! RLA's prefix state in HLO (`model.rla.seq_state = "hlo"`, the composition before the kernels
//! took h0). `data8-rowkernel`, `seq8-rowkernel` and `data2xseq4-rowkernel` run the norms, the
//! loss and the embedding as their CPU kernels in manual regions over the rows instead of the
//! HLO `auto` picks on a mesh.
//! `data8-zero`, `seq8-zero` and
//! `data2xseq4-zero` turn on `mesh.shard_optimizer` (ZeRO-1: moments cut over the axes their
//! parameters are replicated over, each device updating its slice); `seq8-embedfsdp` and
//! `data2xseq4-embedfsdp` keep the parameters whole over `seq` (`mesh.rules.embed = ["fsdp"]`,
//! the default before embed → [fsdp, seq]), `seq8-embedfsdp-zero` with ZeRO-1. Each step is what `rattn train` runs: state donated and fed back, each device holding only its shard, the token batch split
//! on the host.
//!
//! After criterion's runs one table prints wall and CPU ms per step (medians; CPU summed over
//! all threads of the process) and each mesh's throughput relative to 1 device, with the load
//! average beside it.
//!
//! Then paired rounds: the 1-device step timed right before and after each mesh, the ratio taken
//! against the mean of the two, its median over `RATTN_BENCH_ROUNDS` rounds (default 3; 0 turns
//! them off) of `RATTN_BENCH_STEPS` steps (default 5): the 1-device step drifts between two modes
//! run to run on the machines we measured, which moves the criterion table's ratios; the paired
//! ones see both sides under the same conditions. Beside them, the median wall milliseconds each
//! mesh's step takes beyond the 1-device step, and the ops each device's program executes per
//! step (the excess follows that count on a 2-core machine).
//!
//! `cargo bench -p rattention-benches --bench sharded_step` (add `-- --quick` for a short run;
//! env `RATTN_BENCH_MESHES=data8,seq8` picks meshes by label, `RATTN_BENCH_T=1024` and
//! `RATTN_BENCH_BATCH=2` change T and the batch, `RATTN_BENCH_SET='model.local_kind="swa"'`
//! applies `;`-separated overrides to every run, the 1-device one included).

use std::cell::RefCell;

use criterion::BenchmarkId;
use hlo_builder::proto::HloModuleProto;
use model::{init_param, Model};
use pjrt::{Buffer, Client, LoadedExecutable};
use prost::Message;
use rattention_benches::{
    bench_config, compile_spmd, cpu_client, criterion, env_usize, load, piece_dims, ratio_table,
    upload_pieces, Row, Timings,
};
use trainer::config::RunConfig;
use trainer::step::{build_train_step, state_tensors, StepIo, StepShardings};

const DEVICES: usize = 8;
/// Tokens per sequence: 256, or env `RATTN_BENCH_T`.
fn seq_len() -> usize {
    env_usize("RATTN_BENCH_T", 256)
}

/// Sequences per step: 8, or env `RATTN_BENCH_BATCH`.
fn batch() -> usize {
    env_usize("RATTN_BENCH_BATCH", 8)
}

/// Label and `[mesh]` overrides of each run.
const MESHES: [(&str, &[&str]); 26] = [
    ("1 device", &[]),
    ("data8", &["mesh.data=8"]),
    ("fsdp8", &["mesh.fsdp=8"]),
    ("data4xtensor2", &["mesh.data=4", "mesh.tensor=2"]),
    ("seq8", &["mesh.seq=8"]),
    ("data2xseq4", &["mesh.data=2", "mesh.seq=4"]),
    ("seq8-zigzag", &["mesh.seq=8", "mesh.seq_global=zigzag"]),
    (
        "data2xseq4-zigzag",
        &["mesh.data=2", "mesh.seq=4", "mesh.seq_global=zigzag"],
    ),
    ("fsdp4xtensor2", &["mesh.fsdp=4", "mesh.tensor=2"]),
    // The sequence region with the HLO attention blocks instead of the kernel at positions.
    ("seq8-hlo", &["mesh.seq=8", "model.attention_lowering=hlo"]),
    (
        "data2xseq4-hlo",
        &["mesh.data=2", "mesh.seq=4", "model.attention_lowering=hlo"],
    ),
    // RLA's sequence composition in HLO (φ(q)·h0, the shard state, their VJPs as graph ops)
    // instead of the kernels from h0.
    ("seq8-rlahlo", &["mesh.seq=8", "model.rla.seq_state=hlo"]),
    (
        "data2xseq4-rlahlo",
        &["mesh.data=2", "mesh.seq=4", "model.rla.seq_state=hlo"],
    ),
    // The optimizer as element-wise HLO instead of the sharded AdamW kernel (the CPU default).
    (
        "data8-opthlo",
        &["mesh.data=8", "train.optimizer_lowering=hlo"],
    ),
    (
        "fsdp8-opthlo",
        &["mesh.fsdp=8", "train.optimizer_lowering=hlo"],
    ),
    (
        "seq8-opthlo",
        &["mesh.seq=8", "train.optimizer_lowering=hlo"],
    ),
    (
        "data2xseq4-opthlo",
        &["mesh.data=2", "mesh.seq=4", "train.optimizer_lowering=hlo"],
    ),
    // The norms, the loss and the embedding as their kernels in manual regions over the rows
    // instead of the HLO (`auto` on a mesh).
    (
        "data8-rowkernel",
        &[
            "mesh.data=8",
            "model.norm_lowering=kernel",
            "model.loss_lowering=kernel",
            "model.embed_lowering=kernel",
        ],
    ),
    (
        "seq8-rowkernel",
        &[
            "mesh.seq=8",
            "model.norm_lowering=kernel",
            "model.loss_lowering=kernel",
            "model.embed_lowering=kernel",
        ],
    ),
    (
        "data2xseq4-rowkernel",
        &[
            "mesh.data=2",
            "mesh.seq=4",
            "model.norm_lowering=kernel",
            "model.loss_lowering=kernel",
            "model.embed_lowering=kernel",
        ],
    ),
    // ZeRO-1: the Adam moments cut over the axes their parameters are replicated over, each
    // device updating its slice (`mesh.shard_optimizer`).
    ("data8-zero", &["mesh.data=8", "mesh.shard_optimizer=true"]),
    ("seq8-zero", &["mesh.seq=8", "mesh.shard_optimizer=true"]),
    (
        "data2xseq4-zero",
        &["mesh.data=2", "mesh.seq=4", "mesh.shard_optimizer=true"],
    ),
    // The earlier default rule embed → [fsdp]: parameters and moments whole on every seq shard.
    (
        "seq8-embedfsdp",
        &["mesh.seq=8", "mesh.rules.embed=[\"fsdp\"]"],
    ),
    (
        "data2xseq4-embedfsdp",
        &["mesh.data=2", "mesh.seq=4", "mesh.rules.embed=[\"fsdp\"]"],
    ),
    // That rule with ZeRO-1: parameters whole over seq, moments cut over it.
    (
        "seq8-embedfsdp-zero",
        &[
            "mesh.seq=8",
            "mesh.rules.embed=[\"fsdp\"]",
            "mesh.shard_optimizer=true",
        ],
    ),
];

fn config(mesh: &[&str]) -> RunConfig {
    let (t, b) = (seq_len(), batch());
    let mut o: Vec<String> = vec![
        format!("model.seq_len={t}"),
        format!("train.batch={b}"),
        "model.window=64".into(),
        "model.rla.chunk=32".into(),
        "model.rla.sub_chunk=16".into(),
    ];
    o.extend(extra_overrides());
    o.extend(mesh.iter().map(|s| s.to_string()));
    bench_config(&o)
}

/// Overrides applied to every run, the 1-device one included: env `RATTN_BENCH_SET`, separated
/// by `;` (e.g. `model.local_kind="swa"` to see what the sequence region costs without RLA).
fn extra_overrides() -> Vec<String> {
    std::env::var("RATTN_BENCH_SET")
        .map(|s| {
            s.split(';')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// One compiled step on `n` devices and its per-device state.
struct Sharded {
    exe: LoadedExecutable,
    n: usize,
    /// Ops the runtime executes per device and step ([`run_time_ops`]).
    ops: usize,
    io: StepIo,
    state: RefCell<Vec<Vec<Buffer>>>,
    /// Per device: its piece of the tokens and of the weights, and their dims.
    tokens: Vec<(Vec<i32>, Vec<i64>)>,
    weights: Vec<(Vec<f32>, Vec<i64>)>,
}

fn setup(client: &Client, mesh: &[&str]) -> Sharded {
    let cfg = config(mesh);
    let n = cfg.mesh.fixed_device_count().unwrap().unwrap_or(1);
    let m = cfg.mesh.resolve(n).expect("mesh");
    let model = Model::new(cfg.model.clone())
        .expect("model")
        .with_mesh(m.clone())
        .expect("model on the mesh");
    let shardings = StepShardings::new(&cfg, &model, &m).expect("shardings");
    let comp = build_train_step(&cfg, "cpu", &m).expect("train step");
    let exe = compile_spmd(client, &comp.to_bytes(), n);
    let tensors = state_tensors(model.param_specs());
    let mut state: Vec<Vec<Buffer>> = (0..n).map(|_| Vec::new()).collect();
    for (t, s) in tensors.iter().zip(&shardings.state) {
        let host = if t.name.starts_with("params.") {
            init_param(t.spec, 0)
        } else {
            vec![0.0; t.spec.numel()]
        };
        let pieces = upload_pieces(client, &host, &t.spec.shape, &s.sharding, n);
        for (d, p) in pieces.into_iter().enumerate() {
            state[d].push(p);
        }
    }
    let (tl, bsz) = (seq_len(), batch());
    let tok: Vec<i32> = (0..bsz * (tl + 1)).map(|i| (i * 7 % 256) as i32).collect();
    let w = vec![1.0f32; bsz * tl];
    let tdims = piece_dims(&shardings.tokens, &[bsz, tl + 1]);
    let wdims = piece_dims(&shardings.tokens, &[bsz, tl]);
    let tokens = shardings
        .tokens
        .split_host(&tok, &[bsz, tl + 1], n)
        .unwrap()
        .into_iter()
        .map(|p| (p, tdims.clone()))
        .collect();
    let weights = shardings
        .tokens
        .split_host(&w, &[bsz, tl], n)
        .unwrap()
        .into_iter()
        .map(|p| (p, wdims.clone()))
        .collect();
    Sharded {
        ops: run_time_ops(&exe),
        exe,
        n,
        io: StepIo::new(model.param_specs().len()),
        state: RefCell::new(state),
        tokens,
        weights,
    }
}

/// The ops XLA's CPU runtime executes per device and step: the top-level instructions of the
/// compiled per-device program that are not free at run time (views, tuples, parameters). The
/// meshes' excess over one device follows this count on a 2-core machine (11–14 µs per op and
/// device; `docs/results/seq-kernel/README.md`, section 8).
fn run_time_ops(exe: &LoadedExecutable) -> usize {
    let bytes = exe
        .optimized_program()
        .expect("the compiled step's optimized program");
    let m = HloModuleProto::decode(bytes.as_slice()).expect("an HloModuleProto");
    m.entry_computation().map_or(0, |c| {
        c.instructions
            .iter()
            .filter(|i| !i.is_free_at_run_time())
            .count()
    })
}

impl Sharded {
    /// One train step: the state donated, its per-device outputs kept for the next.
    fn step(&self, client: &Client) {
        let devices = client.addressable_devices().unwrap();
        let state = self.state.take();
        let args: Vec<Vec<Buffer>> = state
            .into_iter()
            .enumerate()
            .map(|(d, st)| {
                let dev = Some(&devices[d]);
                let step = client.buffer_from_host(&[1.0f32], &[], dev).unwrap();
                let (tp, td) = &self.tokens[d];
                let (wp, wd) = &self.weights[d];
                let tok = client.buffer_from_host(tp, td, dev).unwrap();
                let w = client.buffer_from_host(wp, wd, dev).unwrap();
                self.io.arguments(st, step, tok, w)
            })
            .collect();
        let outs = if self.n > 1 {
            self.exe.execute_sharded_donating(args).unwrap()
        } else {
            let one = args.into_iter().next().unwrap();
            vec![self.exe.execute_donating(one).unwrap()]
        };
        let mut next = Vec::with_capacity(self.n);
        for (d, o) in outs.into_iter().enumerate() {
            let out = self.io.outputs(o).unwrap();
            if d == 0 {
                out.loss.to_host::<f32>().unwrap();
            }
            next.push(out.state);
        }
        self.state.replace(next);
    }
}

rattention_benches::jemalloc_allocator!();

fn main() {
    let mut c = criterion(2, 5);
    let pick: Option<Vec<String>> = std::env::var("RATTN_BENCH_MESHES")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    let client = cpu_client(DEVICES);
    let timings = Timings::default();
    let mut rows = Vec::new();
    let load_before = load();
    let (tl, bsz) = (seq_len(), batch());
    let mut group = c.benchmark_group(format!("sharded_T{tl}_B{bsz}"));
    let mut setups = Vec::new();
    for (label, mesh) in MESHES {
        if label != "1 device" && pick.as_ref().is_some_and(|p| !p.iter().any(|x| x == label)) {
            continue;
        }
        let s = setup(&client, mesh);
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter_custom(|iters| timings.time(label, iters, || s.step(&client)))
        });
        rows.extend(Row::median(&timings, label, label));
        setups.push((label, s));
    }
    group.finish();
    c.final_summary();
    println!(
        "{}",
        ratio_table(
            &format!(
                "train step of configs/bench.toml, T={tl} B={bsz} W=64{}, on {DEVICES} CPU devices \
                 (load {load_before} before, {} after)",
                extra_overrides()
                    .iter()
                    .map(|o| format!(", {o}"))
                    .collect::<String>(),
                load()
            ),
            &rows,
            (bsz * tl) as f64,
            "1 device",
        )
    );
    let rounds = env_usize("RATTN_BENCH_ROUNDS", 3);
    if rounds > 0 {
        println!(
            "{}",
            paired(&client, &setups, rounds, env_usize("RATTN_BENCH_STEPS", 5))
        );
    }
}

/// Wall and CPU seconds per step of `steps` steps of `s`.
fn per_step(client: &Client, s: &Sharded, steps: usize) -> (f64, f64) {
    let (c0, t0) = (rattention_benches::cpu_s(), std::time::Instant::now());
    for _ in 0..steps {
        s.step(client);
    }
    let n = steps.max(1) as f64;
    (
        t0.elapsed().as_secs_f64() / n,
        (rattention_benches::cpu_s() - c0) / n,
    )
}

/// Paired rounds: the 1-device step is timed right before and right after each mesh (`steps`
/// steps each) and the mesh's ratio is the mean of those two over the mesh's time, so a drift of
/// the 1-device step between runs (it is bimodal on the machines we measured) moves both sides
/// alike. Per mesh, the median ratio over `rounds` rounds and its range, wall and CPU, and the
/// median wall milliseconds the mesh's step takes beyond the 1-device step (a seq mesh's excess
/// is about constant across step sizes, so this says more than the ratio when the shape changes).
fn paired(client: &Client, setups: &[(&str, Sharded)], rounds: usize, steps: usize) -> String {
    let Some((_, base)) = setups.iter().find(|(l, _)| *l == "1 device") else {
        return String::new();
    };
    let meshes: Vec<&(&str, Sharded)> = setups.iter().filter(|(l, _)| *l != "1 device").collect();
    let mut ratios: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); meshes.len()];
    for _ in 0..rounds {
        let mut before = per_step(client, base, steps);
        for (i, (_, s)) in meshes.iter().enumerate() {
            let m = per_step(client, s, steps);
            let after = per_step(client, base, steps);
            let (base_wall, base_cpu) = ((before.0 + after.0) / 2.0, (before.1 + after.1) / 2.0);
            ratios[i].push((base_wall / m.0, base_cpu / m.1, (m.0 - base_wall) * 1e3));
            before = after;
        }
    }
    let stats = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let mut out = format!(
        "paired rounds ({rounds} × {steps} steps; the 1-device step right before and after each \
         mesh; load {} now; the 1-device step runs {} ops)\n  {:<22} {:>22} {:>22} {:>16} {:>12}\n",
        load(),
        base.ops,
        "1 device / mesh",
        "wall: median (range)",
        "CPU: median (range)",
        "excess wall ms",
        "ops/device"
    );
    for ((label, s), r) in meshes.iter().zip(ratios) {
        let (w, w0, w1) = stats(r.iter().map(|x| x.0).collect());
        let (c, c0, c1) = stats(r.iter().map(|x| x.1).collect());
        let (e, _, _) = stats(r.iter().map(|x| x.2).collect());
        let ops = s.ops;
        out += &format!(
            "  {label:<22} {w:>8.2} ({w0:.2}–{w1:.2}) {c:>8.2} ({c0:.2}–{c1:.2}) {e:>16.1} \
             {ops:>12}\n"
        );
    }
    out
}
