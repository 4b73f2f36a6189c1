//! Sharded training on the CPU plugin's devices: the acceptance of issue 11 items 2 and 3.

use super::*;

/// The tiny model at T = 64, batch 4, a few steps: fast, and RLA, SWA and the global layer all
/// run (the RLA blocks in their manual regions when sharded).
pub(super) fn tiny(steps: usize, mesh: &[&str]) -> RunConfig {
    tiny_layers(2, steps, mesh)
}

/// The tiny model at T = 64, batch 4, `layers` layers alternating local and global, `steps`
/// steps, with the `--set` overrides `extra`.
pub(super) fn tiny_layers(layers: usize, steps: usize, extra: &[&str]) -> RunConfig {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/tiny.toml"
    ))
    .unwrap();
    let mut o: Vec<String> = [
        "model.seq_len=64",
        "model.layer_pattern=\"1:1\"",
        "train.batch=4",
        "train.warmup=2",
        "train.log_every=1000",
        "train.checkpoint_every=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.push(format!("model.layers={layers}"));
    o.push(format!("train.steps={steps}"));
    o.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::from_toml(&text, &o).unwrap()
}

/// A fresh temporary directory for the run `name` of this process.
pub(super) fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rattn-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Losses and the final parameters of a run on `mesh`.
pub(super) fn run(name: &str, steps: usize, mesh: &[&str]) -> (Vec<f32>, Vec<NamedTensor>) {
    let cfg = tiny(steps, mesh);
    let dir = tmp(name);
    let report = train(&cfg, None, &dir, false, true, None).unwrap();
    let ck = checkpoint::load(&report.last_checkpoint.unwrap(), None).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (report.losses, ck.tensors)
}

/// max |a − b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale.max(1e-30)
}

const STEPS: usize = 3;

/// Steps of the sequence-parallel runs (issue 11 asks for 20).
const SEQ_STEPS: usize = 20;

type Run = (Vec<f32>, Vec<NamedTensor>);

/// The 1-device run of `steps` steps every sharded run is compared with, made once per test
/// process.
fn baseline(steps: usize) -> &'static Run {
    static ONE: std::sync::OnceLock<Run> = std::sync::OnceLock::new();
    static SEQ: std::sync::OnceLock<Run> = std::sync::OnceLock::new();
    match steps {
        STEPS => ONE.get_or_init(|| run("mesh1", STEPS, &[])),
        SEQ_STEPS => SEQ.get_or_init(|| run("mesh1-seq", SEQ_STEPS, &[])),
        _ => unreachable!("no baseline of {steps} steps"),
    }
}

/// The acceptance of sharded training on `mesh`: the loss of every step equals the 1-device
/// run's within 1e-5 relative, and both Adam moments after the last step within 1e-4 (they are
/// linear in the gradients, so they check the sharded gradients). Every parameter tensor is
/// within 1e-5 of the 1-device one in norm (‖Δ‖₂ / ‖p‖₂, issue 11's bound). Element by element
/// the parameters are checked against the largest move AdamW can make, Σ lr: where a gradient
/// is close to 0, m/√v turns the last-bit differences of gradients summed in another order (a
/// cross-device all-reduce) into visible ones, up to lr per step; what the parameters must not
/// show is a real difference of the updates. Returns the largest element difference over each
/// tensor's largest value (what [`sequence_parallel_training_equals_one_device`] compares with
/// runs that differ from the 1-device one only in summation order).
fn sharded_equals_one_device(mesh: &[&str]) {
    sharded_equals_one_device_for(mesh, STEPS);
}

fn sharded_equals_one_device_for(mesh: &[&str], steps: usize) -> f64 {
    let (want_loss, want_state) = baseline(steps);
    let cfg = tiny(steps, &[]);
    let lr_sum: f64 = (0..steps).map(|s| step::lr_at(&cfg.train, s)).sum();
    let name = mesh.join(",");
    let (loss, state) = run(&name, steps, mesh);
    assert_eq!(loss.len(), steps);
    let mut worst_loss = 0.0f64;
    for (s, (l, w)) in loss.iter().zip(want_loss).enumerate() {
        let e = ((l - w) / w).abs() as f64;
        worst_loss = worst_loss.max(e);
        assert!(e <= 1e-5, "{name}: step {} loss {l} vs {w}", s + 1);
    }
    assert_eq!(state.len(), want_state.len());
    let (mut worst_moment, mut worst_param, mut worst_param_rel) = (0.0f64, 0.0f64, 0.0f64);
    let mut worst_norm = 0.0f64;
    for (p, w) in state.iter().zip(want_state) {
        assert_eq!((&p.name, &p.shape), (&w.name, &w.shape));
        if p.name.starts_with("params.") {
            let d = p
                .data
                .iter()
                .zip(&w.data)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs() as f64));
            worst_param = worst_param.max(d / lr_sum);
            worst_param_rel = worst_param_rel.max(rel(&p.data, &w.data));
            let norm = norm_rel(&p.data, &w.data);
            worst_norm = worst_norm.max(norm);
            assert!(
                norm <= 1e-5,
                "{name}: {} differs from the 1-device run by {norm:e} in norm (relative)",
                p.name
            );
            assert!(
                d <= 2e-3 * lr_sum,
                "{name}: {} moved {d:e} away from the 1-device run (Σ lr = {lr_sum:e})",
                p.name
            );
        } else {
            let e = rel(&p.data, &w.data);
            worst_moment = worst_moment.max(e);
            assert!(e <= 1e-4, "{name}: {} differs by {e:e} (relative)", p.name);
        }
    }
    eprintln!(
        "{name}: {steps} steps: loss within {worst_loss:.1e} relative, Adam moments within \
         {worst_moment:.1e}, parameters within {worst_norm:.1e} in norm, {worst_param:.1e} × Σ lr \
         ({worst_param_rel:.1e} of each tensor's largest value) of 1 device"
    );
    worst_param_rel
}

/// ‖a − b‖₂ / ‖b‖₂.
pub(super) fn norm_rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    (d / n.max(1e-300)).sqrt()
}

#[test]
fn data_parallel_training_equals_one_device() {
    sharded_equals_one_device(&["mesh.data=2"]);
}

#[test]
fn fsdp_training_equals_one_device() {
    sharded_equals_one_device(&["mesh.fsdp=2"]);
}

#[test]
fn tensor_parallel_training_equals_one_device() {
    // kv heads split: each device runs the RLA blocks on one of the two kv heads.
    sharded_equals_one_device(&["mesh.tensor=2"]);
}

#[test]
fn q_heads_cut_with_whole_kv_heads_trains_like_one_device() {
    // q's heads over tensor, k's and v's whole (what a model with fewer kv heads than the
    // tensor axis runs): XLA's layout assignment once handed the RLA kernels non-row-major
    // operands here (step 1 loss 5.7152 against 5.6622); their calls are row-major now.
    sharded_equals_one_device(&["mesh.tensor=2", "mesh.rules.kv_heads=[]"]);
}

#[test]
fn data_and_tensor_parallel_training_equals_one_device() {
    sharded_equals_one_device(&["mesh.data=2", "mesh.tensor=2"]);
}

#[test]
fn tensor_parallel_training_with_the_while_lowering_equals_one_device() {
    // The `while` lowering of the RLA blocks in the same manual regions, against the 1-device
    // custom-call run (the two lowerings agree to fp32 rounding).
    sharded_equals_one_device(&["mesh.tensor=2", "model.rla.lowering=\"hlo\""]);
}

#[test]
fn sequence_parallel_training_equals_one_device() {
    // Exact sequence parallelism (issue 11 item 4), 20 steps of the local + global tiny model
    // at T = 64: 2 shards of 32 tokens (W = 16 fits in one), 4 shards of 16 (the halo is a
    // whole shard), and data 2 × seq 2. The global layer runs zigzag on seq 2 (`auto`: chunks
    // of 16 tokens ≥ H = 16), dense on seq 4 (`auto`: chunks of 8), and zigzag on seq 4 when
    // asked for (`mesh.seq_global = "zigzag"`).
    //
    // Element by element the parameters after 20 steps differ from the 1-device run's by up to
    // 7.1e-5 of their tensor's largest value, not issue 11's 1e-5. The difference is made in
    // step 1 at elements whose gradient is float noise (layers.0.ffn.w_down[6716]: 4.2e-10 on
    // 1 device, 3.9e-10 sharded, below Adam's eps = 1e-8, where the update g / (|g| + eps)
    // follows g's noise with gain lr / eps) and then carried, not grown. Runs that differ from
    // the 1-device one only in the order of their sums differ as much: the same 1-device
    // program with the `while` lowering of the RLA blocks (4.0e-5) and data 2, which only splits
    // the batch's gradient sum into an all-reduce (6.7e-5). So the sequence-parallel runs must
    // stay within 1.5 × the larger of those two; in norm every tensor is within 1e-5 (measured
    // ≤ 5.3e-7 over all parameters).
    //
    // The sequence shards run attention through the CPU kernel at runtime positions, whose
    // blocks start at other keys than the 1-device kernel's, the loss, norms and embedding
    // as HLO (their CPU kernels run on one device unless asked for) and AdamW split over the
    // devices: two more
    // runs that differ only in the order of their sums are 1 device with the HLO attention blocks
    // and 1 device with every lowering as HLO (attention, loss, norms, embedding, optimizer;
    // measured 1.4e-4 of a tensor's largest value, 7.8e-6 in norm: as far from the default
    // 1-device run as the seq meshes are).
    let calibration = sharded_equals_one_device_for(&["model.rla.lowering=\"hlo\""], SEQ_STEPS)
        .max(sharded_equals_one_device_for(&["mesh.data=2"], SEQ_STEPS))
        .max(sharded_equals_one_device_for(
            &["model.attention_lowering=\"hlo\""],
            SEQ_STEPS,
        ))
        .max(sharded_equals_one_device_for(
            &[
                "model.loss_lowering=\"hlo\"",
                "model.norm_lowering=\"hlo\"",
                "model.embed_lowering=\"hlo\"",
                "model.attention_lowering=\"hlo\"",
                "train.optimizer_lowering=\"hlo\"",
            ],
            SEQ_STEPS,
        ));
    for mesh in [
        &["mesh.seq=2"][..],
        &["mesh.seq=4"],
        &["mesh.seq=4", "mesh.seq_global=zigzag"],
        &["mesh.data=2", "mesh.seq=2"],
    ] {
        let e = sharded_equals_one_device_for(mesh, SEQ_STEPS);
        eprintln!(
            "{mesh:?}: parameters {e:.1e} of each tensor's largest value; summation order \
             alone (1 device with the `while` lowering, HLO attention or all HLO lowerings; data 2): \
             {calibration:.1e}"
        );
        assert!(
            e <= 1.5 * calibration,
            "{mesh:?}: parameters differ by {e:e}, more than 1.5 × the {calibration:e} of \
             summation order alone"
        );
    }
}

/// The optimized train step on seq 4 (4 CPU devices) exchanges keys and values between the
/// sequence shards: collective-permutes (the local layer's one halo and its transpose), all-gathers
/// (the global layer's keys and values, the RLA states) and the RLA custom calls in the shards.
#[test]
fn a_sequence_parallel_step_holds_the_halo_and_gather_collectives() {
    let cfg = tiny(1, &["mesh.seq=4"]);
    let mesh = train_mesh(&cfg, None).unwrap();
    let client = spmd::open_client(None, 4).unwrap();
    let placement = Placement::new(&client, 4).unwrap();
    let comp = step::build_train_step(&cfg, "cpu", &mesh).unwrap();
    let exe = placement.compile(&client, &comp).unwrap();
    let hlo = hlo_builder::print_module_bytes(&exe.optimized_program().unwrap()).unwrap();
    let count = |op: &str| hlo.matches(&format!(" {op}(")).count();
    let (permutes, gathers) = (count("collective-permute"), count("all-gather"));
    // Ours, not the partitioner's.
    let ours: Vec<&str> = hlo
        .lines()
        .filter(|l| l.contains(" collective-permute(") && !l.contains("is_spmd_generated"))
        .collect();
    eprintln!(
        "seq 4 step: {permutes} collective-permutes ({} of the halo), {gathers} all-gathers",
        ours.len()
    );
    // The local layer's one halo exchange ([SWA k | RLA k | v] packed: 3 × H = 48 values per
    // kv head and token; W = 16 is one shard back) and its transpose: 2 (the separate SWA and
    // RLA regions took 8). The global layer gathers k and v, the RLA prefix gathers the states.
    assert_eq!(ours.len(), 2, "{ours:#?}");
    assert!(
        ours.iter().all(|l| l.contains("f32[4,16,2,48]")),
        "{ours:#?}"
    );
    assert!(gathers >= 3, "{gathers} all-gathers");
    // The inputs and targets keep the token batch's layout (`Model::token_columns`): no
    // collective-permute shifts token ids between shards (the partitioner did, after padding the
    // `[B, T+1]` batch to a multiple of the shards). The RMSNorm scales are whole on every
    // device (`norm → [tensor]`, tensor 1): no all-gather of a 1-D array.
    let moves_ids: Vec<&str> = hlo
        .lines()
        .filter(|l| l.contains(" collective-permute(s32["))
        .collect();
    assert!(moves_ids.is_empty(), "{moves_ids:#?}");
    assert_eq!(
        permutes,
        ours.len(),
        "the partitioner's own permutes: {hlo}"
    );
    let gathers_1d: Vec<&str> = hlo
        .lines()
        .filter(|l| {
            l.split_once(" all-gather(f32[")
                .and_then(|(_, rest)| rest.split_once(']'))
                .is_some_and(|(dims, _)| !dims.contains(','))
        })
        .collect();
    assert!(gathers_1d.is_empty(), "{gathers_1d:#?}");
    assert!(hlo.contains("source_target_pairs={{0,1},{1,2},{2,3}}"));
    assert!(hlo.contains("rattention.rla_fwd") && hlo.contains("rattention.rla_bwd"));
}

/// fsdp = 8 on 8 CPU devices: every device's state buffers have their shard's shape (not the
/// full one), the assembled state is the host's, the compiled step's per-device arguments are at
/// most 1/6 of the 1-device step's (issue 11's bound), its per-device state outputs are shards, and
/// the optimized program holds the collectives fsdp needs.
#[test]
fn each_device_holds_only_its_shard() {
    let mut cfg = tiny(1, &["mesh.fsdp=8"]);
    cfg.train.batch = 8;
    let mesh = train_mesh(&cfg, None).unwrap();
    assert_eq!(mesh.device_count(), 8);
    let model = Model::new(cfg.model.clone())
        .unwrap()
        .with_mesh(mesh.clone())
        .unwrap();
    let shardings = StepShardings::new(&cfg, &model, &mesh).unwrap();
    let tensors = step::state_tensors(model.param_specs());
    let client = spmd::open_client(None, 8).unwrap();
    let placement = Placement::new(&client, 8).unwrap();
    let host: Vec<Vec<f32>> = tensors
        .iter()
        .map(|t| (0..t.spec.numel()).map(|i| i as f32).collect())
        .collect();
    let state = upload_state(&client, &placement, &host, &tensors, &shardings).unwrap();
    let full: usize = tensors.iter().map(|t| t.spec.numel()).sum();
    for (d, bufs) in state.iter().enumerate() {
        let mut on_device = 0;
        for ((buf, t), s) in bufs.iter().zip(&tensors).zip(&shardings.state) {
            let dims: Vec<i64> = buf.dims().unwrap();
            let want: Vec<i64> = s.shard_shape.iter().map(|&x| x as i64).collect();
            assert_eq!(dims, want, "device {d}: {}", t.name);
            on_device += buf.element_count().unwrap();
            assert_eq!(buf.device().unwrap().id(), d as i32);
        }
        // Everything with an embed dim is cut in 8; only the mixing norms' scales
        // [q_heads, head_dim] are whole on every device.
        assert!(
            6 * on_device <= full,
            "device {d} holds {on_device} of {full} values"
        );
    }
    // The wq shard is an eighth of its rows: [embed/fsdp, q_heads·H].
    let wq = tensors
        .iter()
        .position(|t| t.name == "params.layers.0.attn.wq")
        .unwrap();
    assert_eq!(state[7][wq].dims().unwrap(), vec![8, 64]);
    // Round trip: the assembled state is the host state.
    for (i, (t, s)) in tensors.iter().zip(&shardings.state).enumerate() {
        let pieces: Vec<&Buffer> = state.iter().map(|l| &l[i]).collect();
        let back: Vec<f32> = Placement::download(&pieces, &t.spec.shape, &s.sharding).unwrap();
        assert_eq!(back, host[i], "{}", t.name);
    }
    let comp = step::build_train_step(&cfg, "cpu", &mesh).unwrap();
    let exe = placement.compile(&client, &comp).unwrap();
    let outs = exe.output_shapes().unwrap();
    let io = StepIo::new(model.param_specs().len());
    for ((_, r), s) in io.state_positions().into_iter().zip(&shardings.state) {
        let want: Vec<i64> = s.shard_shape.iter().map(|&x| x as i64).collect();
        assert_eq!(outs[r].1, want, "{}", s.name);
    }
    let single = step::build_train_step(&cfg, "cpu", &model::Mesh::single()).unwrap();
    let one = Placement::new(&client, 1)
        .unwrap()
        .compile(&client, &single)
        .unwrap();
    let (args8, args1) = (
        exe.memory_stats().unwrap().argument_size_in_bytes,
        one.memory_stats().unwrap().argument_size_in_bytes,
    );
    eprintln!("fsdp 8: arguments per device {args8} B, 1 device {args1} B");
    assert!(6 * args8 <= args1, "{args8} B per device vs {args1} B");
    let hlo = hlo_builder::print_module_bytes(&exe.optimized_program().unwrap()).unwrap();
    // fsdp gathers the parameters' shards for the matmuls and sums the gradients across devices.
    assert!(hlo.contains("all-gather"), "no all-gather");
    assert!(
        hlo.contains("all-reduce") || hlo.contains("reduce-scatter"),
        "no gradient reduction"
    );
    assert!(hlo.contains("rattention.rla_fwd") && hlo.contains("rattention.rla_bwd"));
}

/// Attention through our CPU kernels (`model.attention_lowering = "kernel"`, the CPU default)
/// and through the blocked HLO train alike: every step's loss within 1e-5 relative.
#[test]
fn attention_kernel_and_hlo_lowerings_train_alike() {
    for (lowering, calls) in [("kernel", 4), ("hlo", 0)] {
        let set = format!("model.attention_lowering=\"{lowering}\"");
        let cfg = tiny(STEPS, &[&set]);
        let text = step::build_train_step(&cfg, "cpu", &model::Mesh::single())
            .unwrap()
            .to_text();
        let n = text.matches("\"rattention.attn_fwd\"").count()
            + text.matches("\"rattention.attn_bwd\"").count();
        assert_eq!(n, calls, "{lowering}: attention custom calls in the step");
    }
    let (kernel, _) = run(
        "attn-kernel",
        STEPS,
        &["model.attention_lowering=\"kernel\""],
    );
    let (hlo, _) = run("attn-hlo", STEPS, &["model.attention_lowering=\"hlo\""]);
    assert_eq!(kernel.len(), STEPS);
    for (s, (a, b)) in kernel.iter().zip(&hlo).enumerate() {
        let e = ((a - b) / b).abs();
        eprintln!("step {}: loss kernel {a} hlo {b} (rel {e:.1e})", s + 1);
        assert!(e <= 1e-5, "step {}: loss kernel {a} vs hlo {b}", s + 1);
    }
}

/// The loss, the RMS norms and the embedding through our CPU kernels (`model.loss_lowering`,
/// `norm_lowering`, `embed_lowering` = "kernel", the default on one CPU device) and through the
/// HLO train
/// alike: every step's loss within 1e-6 relative, the final parameters and moments within 1e-5
/// of each tensor's norm; under a data mesh `auto` picks the HLO and `"kernel"` runs the
/// kernels in manual regions; under a tensor mesh `"kernel"` is refused for the norms and the
/// loss, whose feature dims it cuts.
#[test]
fn loss_norm_and_embed_kernels_and_hlo_lowerings_train_alike() {
    let all = |l: &str| ["loss", "norm", "embed"].map(|op| format!("model.{op}_lowering=\"{l}\""));
    for (lowering, on) in [("kernel", true), ("hlo", false), ("auto", true)] {
        let sets = all(lowering);
        let cfg = tiny(STEPS, &[&sets[0], &sets[1], &sets[2]]);
        let text = step::build_train_step(&cfg, "cpu", &model::Mesh::single())
            .unwrap()
            .to_text();
        for target in
            ["xent_bwd", "rms_norm_bwd", "embed_bwd"].map(|t| format!("\"rattention.{t}\""))
        {
            assert_eq!(
                text.contains(&target),
                on,
                "{lowering}: {target} in the step"
            );
        }
    }
    // Under a mesh `auto` lowers all three as HLO; "kernel" runs them in manual regions over
    // the rows where the mesh leaves d_model and the vocab whole, and is refused naming the
    // cut where tensor cuts them.
    let k = all("kernel");
    for (sets, on) in [
        (vec![], false),
        (k.iter().map(String::as_str).collect(), true),
    ] {
        let mut sets: Vec<&str> = sets;
        sets.push("mesh.data=2");
        let cfg = tiny(STEPS, &sets);
        let mesh = cfg.mesh.resolve(2).unwrap();
        let text = step::build_train_step(&cfg, "cpu", &mesh)
            .unwrap()
            .to_text();
        for t in ["xent_fwd", "rms_norm_fwd", "embed_fwd"] {
            assert_eq!(
                text.contains(&format!("rattention.{t}")),
                on,
                "{t} under a data 2 mesh with {sets:?}"
            );
        }
    }
    let tensor = |extra: &str| tiny(STEPS, &["mesh.tensor=2", extra]);
    let mesh = tiny(STEPS, &["mesh.tensor=2"]).mesh.resolve(2).unwrap();
    for (set, refused) in all("kernel").iter().zip([true, true, false]) {
        let got = step::build_train_step(&tensor(set), "cpu", &mesh);
        match got {
            Err(e) if refused => {
                let e = format!("{e:#}");
                assert!(
                    e.contains("_lowering = \"kernel\"") && e.contains("over tensor"),
                    "{e}"
                );
            }
            Ok(_) if !refused => {}
            other => panic!("{set} on tensor 2: {:?}", other.map(|_| ())),
        }
    }
    let (k, h) = (all("kernel"), all("hlo"));
    let (kernel, pk) = run("loss-norm-embed-kernel", STEPS, &[&k[0], &k[1], &k[2]]);
    let (hlo, ph) = run("loss-norm-embed-hlo", STEPS, &[&h[0], &h[1], &h[2]]);
    assert_eq!(kernel.len(), STEPS);
    for (s, (a, b)) in kernel.iter().zip(&hlo).enumerate() {
        let e = ((a - b) / b).abs();
        eprintln!("step {}: loss kernel {a} hlo {b} (rel {e:.1e})", s + 1);
        assert!(e <= 1e-6, "step {}: loss kernel {a} vs hlo {b}", s + 1);
    }
    let (mut worst_rel, mut worst_norm) = (0.0f64, 0.0f64);
    for (a, b) in pk.iter().zip(&ph) {
        let (e, n) = (rel(&a.data, &b.data), norm_rel(&a.data, &b.data));
        (worst_rel, worst_norm) = (worst_rel.max(e), worst_norm.max(n));
        // Max-relative is printed, not held: AdamW's update of an element whose gradient is
        // near 0 is ~±lr either way, so rounding-level gradient differences move single
        // elements by up to ~1e-4 of their tensor's largest value.
        assert!(
            n <= 1e-5,
            "{}: kernel vs hlo {n:.1e} in norm ({e:.1e} max)",
            a.name
        );
    }
    eprintln!("state: worst max-rel {worst_rel:.1e}, worst norm-rel {worst_norm:.1e}");
}

#[test]
fn a_mesh_that_does_not_fit_the_devices_is_refused_before_anything_runs() {
    let cfg = tiny(1, &["mesh.fsdp=2"]);
    let dir = tmp("mesh-refused");
    let e = format!(
        "{:#}",
        train(&cfg, None, &dir, false, true, Some(3)).unwrap_err()
    );
    assert!(e.contains("spans 2 devices but there are 3"), "{e}");
    let cfg = tiny(1, &["mesh.fsdp=-1"]);
    let e = format!(
        "{:#}",
        train(&cfg, None, &dir, false, true, None).unwrap_err()
    );
    assert!(e.contains("pass --devices N"), "{e}");
    // T = 64 does not split into 3 sequence shards.
    let cfg = tiny(1, &["mesh.seq=3"]);
    let e = format!(
        "{:#}",
        train(&cfg, None, &dir, false, true, None).unwrap_err()
    );
    assert!(
        e.contains("model.seq_len = 64 is not divisible by mesh.seq = 3"),
        "{e}"
    );
    let cfg = tiny(1, &["mesh.data=8"]);
    let e = format!(
        "{:#}",
        train(&cfg, None, &dir, false, true, None).unwrap_err()
    );
    assert!(
        e.contains("tokens (train.batch)") && e.contains("not divisible by 8"),
        "{e}"
    );
    assert!(!dir.exists(), "nothing is written");
}

/// The state layouts, shardings and a client + placement of `cfg`'s mesh.
pub(super) fn mesh_setup(
    cfg: &RunConfig,
) -> (model::Mesh, Model, StepShardings, pjrt::Client, Placement) {
    let mesh = train_mesh(cfg, None).unwrap();
    let model = Model::new(cfg.model.clone())
        .unwrap()
        .with_mesh(mesh.clone())
        .unwrap();
    let shardings = StepShardings::new(cfg, &model, &mesh).unwrap();
    let client = spmd::open_client(None, mesh.device_count()).unwrap();
    let placement = Placement::new(&client, mesh.device_count()).unwrap();
    (mesh, model, shardings, client, placement)
}

/// A state saved sharded on `cfg`'s mesh by [`save_distinct_state`], with what the tests
/// compare against.
pub(super) struct SavedState {
    pub model: Model,
    pub host: Vec<Vec<f32>>,
    pub meta: checkpoint::CheckpointMeta,
    pub dir: PathBuf,
    pub path: PathBuf,
    pub stored: checkpoint::Stored,
}

/// Uploads a train state of distinct values (every element and tensor differs, tiny and
/// negative ones included, so a misplaced element shows) onto `cfg`'s mesh, saves it sharded
/// under a fresh `tmp(name)` (each device writing its own pieces, from its buffers) and opens
/// it again. Asserts the commit marker and that every piece is stored exactly once.
pub(super) fn save_distinct_state(cfg: &RunConfig, name: &str, step: u64) -> SavedState {
    let (mesh, model, sh, client, pl) = mesh_setup(cfg);
    let tensors = step::state_tensors(model.param_specs());
    let host: Vec<Vec<f32>> = tensors
        .iter()
        .enumerate()
        .map(|(ti, t)| {
            (0..t.spec.numel())
                .map(|i| {
                    ((ti * 1_000_003 + i) as f32 * 0.618_034).sin() * 10f32.powi((i % 7) as i32 - 3)
                })
                .collect()
        })
        .collect();
    let state = upload_state(&client, &pl, &host, &tensors, &sh).unwrap();
    let dir = tmp(name);
    let layouts: Vec<checkpoint::sharded::TensorLayout> = tensors
        .iter()
        .zip(&sh.state)
        .map(|(t, s)| checkpoint::sharded::TensorLayout {
            name: t.name.clone(),
            shape: t.spec.shape.clone(),
            sharding: s.sharding.clone(),
        })
        .collect();
    let meta = checkpoint::CheckpointMeta {
        step,
        data_position: 4 * step,
        seed: 0,
        model_config: model_toml(cfg),
    };
    let path = save_sharded(&dir, &meta, &pl, &state, &layouts, &mesh, 3).unwrap();
    assert!(path.join(checkpoint::sharded::COMMIT).exists());
    let stored = checkpoint::Stored::open(&path, Some(&model_toml(cfg))).unwrap();
    let checkpoint::Stored::Sharded(s) = &stored else {
        panic!("not sharded")
    };
    // Every piece is stored once: the shard files hold exactly the state's bytes (plus headers).
    let stored_values: usize = s
        .tensors
        .values()
        .flat_map(|t| &t.pieces)
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let want_values: usize = tensors.iter().map(|t| t.spec.numel()).sum();
    assert_eq!(
        stored_values, want_values,
        "a piece stored twice or missing"
    );
    drop(tensors);
    SavedState {
        model,
        host,
        meta,
        dir,
        path,
        stored,
    }
}

impl SavedState {
    /// The state's tensors (parameters, then both moments), as the step lays them out.
    pub fn tensors(&self) -> Vec<step::StateTensor<'_>> {
        step::state_tensors(self.model.param_specs())
    }
}

/// Restores `saved` onto the mesh of `tiny(1, mesh_b)` and asserts every device's piece has
/// its shard shape and, assembled on the host, equals the saved state bit for bit.
pub(super) fn assert_restores_bit_exactly(saved: &SavedState, mesh_b: &[&str]) {
    let cfg_b = tiny(1, mesh_b);
    let (_, _, sh_b, client_b, pl_b) = mesh_setup(&cfg_b);
    let tensors = saved.tensors();
    let restored = restore_state(&client_b, &pl_b, &saved.stored, &tensors, &sh_b).unwrap();
    for (i, (t, s)) in tensors.iter().zip(&sh_b.state).enumerate() {
        let pieces: Vec<&Buffer> = restored.iter().map(|l| &l[i]).collect();
        let back: Vec<f32> = Placement::download(&pieces, &t.spec.shape, &s.sharding).unwrap();
        let same = back
            .iter()
            .zip(&saved.host[i])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{mesh_b:?}: {} differs after the restore", t.name);
        let dims: Vec<i64> = s.shard_shape.iter().map(|&d| d as i64).collect();
        assert_eq!(pieces[0].dims().unwrap(), dims, "{mesh_b:?}: {}", t.name);
    }
    eprintln!(
        "→ {mesh_b:?}: {} tensors restored bit for bit",
        tensors.len()
    );
}

/// Issue 11 item 7: a state saved sharded on fsdp = 4 (each device writes its own pieces, from
/// its buffers) restores bit for bit onto data 2 × tensor 2 and onto 1 device: every device's
/// restored piece, assembled on the host, is the state that was uploaded. The reference is the
/// host state itself (distinct values everywhere, so a misplaced element shows).
#[test]
fn a_sharded_checkpoint_restores_bit_exactly_onto_another_mesh() {
    let saved = save_distinct_state(&tiny(1, &["mesh.fsdp=4"]), "sharded-restore", 7);
    assert_eq!(saved.stored.meta(), saved.meta);
    for mesh_b in [&["mesh.data=2", "mesh.tensor=2"][..], &[][..]] {
        assert_restores_bit_exactly(&saved, mesh_b);
    }
    // The single-file loader assembles the same state (eval and generate read it that way).
    let whole = checkpoint::load(&saved.path, None).unwrap();
    for (t, h) in saved.tensors().iter().zip(&saved.host) {
        let w = whole.tensors.iter().find(|w| w.name == t.name).unwrap();
        assert!(w
            .data
            .iter()
            .zip(h)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    std::fs::remove_dir_all(&saved.dir).unwrap();
}

/// Resuming on another mesh continues the same run: the data position is global, so steps 3
/// and 4 resumed from fsdp = 4's step-2 checkpoint on data 2 × tensor 2, and on 1 device, see
/// the same batches and give the uninterrupted fsdp = 4 run's losses (within 1e-5 relative: the
/// meshes sum gradients in another order).
#[test]
fn resume_on_any_mesh_sees_the_same_batches() {
    let with = |mesh: &[&str]| {
        let mut v = vec!["train.checkpoint_every=2", "train.keep_checkpoints=5"];
        v.extend_from_slice(mesh);
        tiny(4, &v)
    };
    let dir = tmp("resume-any-mesh");
    let full = train(&with(&["mesh.fsdp=4"]), None, &dir, false, true, None).unwrap();
    assert_eq!(full.losses.len(), 4);
    let names: Vec<String> = checkpoint::list(&dir)
        .unwrap()
        .iter()
        .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["ckpt_00000002", "ckpt_00000004"],
        "sharded directories"
    );
    for mesh in [&["mesh.data=2", "mesh.tensor=2"][..], &[][..]] {
        let _ = std::fs::remove_dir_all(dir.join("ckpt_00000004"));
        let _ = std::fs::remove_file(dir.join("ckpt_00000004.safetensors"));
        let resumed = train(&with(mesh), None, &dir, true, true, None).unwrap();
        assert_eq!(resumed.losses.len(), 2, "{mesh:?}");
        for (s, (a, b)) in resumed.losses.iter().zip(&full.losses[2..]).enumerate() {
            let e = ((a - b) / b).abs();
            assert!(e <= 1e-5, "{mesh:?}: step {} loss {a} vs {b}", s + 3);
        }
        eprintln!(
            "resumed on {mesh:?}: steps 3, 4 losses {:?} vs {:?}",
            resumed.losses,
            &full.losses[2..]
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
