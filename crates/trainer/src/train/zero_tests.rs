//! ZeRO-1 (`mesh.shard_optimizer = true`): the Adam moments cut over the axes their parameters
//! are replicated over, each device updating only its slice of the parameters.

use super::tests::{
    assert_restores_bit_exactly, mesh_setup, norm_rel, run, save_distinct_state, tiny,
};
use super::*;

/// Bytes of the entry parameters `positions` of an optimized (per-device) HLO module's text:
/// the compiled per-device arguments at those positions.
fn entry_argument_bytes(hlo: &str, positions: &[std::ops::Range<usize>]) -> usize {
    let entry = hlo.split("\nENTRY ").nth(1).expect("an ENTRY computation");
    let body = &entry[..entry.find("\n}").unwrap_or(entry.len())];
    let mut total = 0;
    let mut seen = 0;
    for line in body.lines() {
        let Some(at) = line.find(" parameter(") else {
            continue;
        };
        let index: usize = line[at + 11..]
            .split(')')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("parameter index in {line}"));
        if !positions.iter().any(|r| r.contains(&index)) {
            continue;
        }
        // `name = f32[8,64]{1,0} parameter(k)`: the shape just before ` parameter(`.
        let shape = line[..at].rsplit(' ').next().unwrap();
        assert!(shape.starts_with("f32["), "{line}");
        let dims = &shape[4..shape.find(']').unwrap()];
        let numel: usize = dims
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.parse::<usize>().unwrap())
            .product();
        total += 4 * numel;
        seen += 1;
    }
    let want: usize = positions.iter().map(|r| r.len()).sum();
    assert_eq!(seen, want, "entry parameters found at {positions:?}");
    total
}

/// Data 8 with `mesh.shard_optimizer`: every moment is cut in 8 (replicated parameters get
/// `data` on their first dim that divides), so the compiled step's per-device moment arguments
/// are at most 1/6 of the 1-device step's (measured 1/8), the sharded AdamW kernel's update runs
/// on those eighths (no whole `[64, 64]` matrix among its operands), the parameters stay whole
/// on every device, and the updated eighths travel back in one packed all-gather.
#[test]
fn zero_1_on_data_8_holds_an_eighth_of_the_moments_per_device() {
    let cfg = tiny(
        1,
        &["mesh.data=8", "train.batch=8", "mesh.shard_optimizer=true"],
    );
    let (mesh, model, shardings, client, placement) = mesh_setup(&cfg);
    assert!(mesh.shard_optimizer());
    let n = model.param_specs().len();
    for (p, m) in shardings.state[..n].iter().zip(&shardings.state[n..2 * n]) {
        let whole: usize = p.shard_numel();
        assert_eq!(8 * m.shard_numel(), whole, "{}: {} / 8", m.name, p.spec);
    }
    let io = StepIo::new(n);
    let moments = [io.args.state.adam_m.clone(), io.args.state.adam_v.clone()];
    let comp = step::build_train_step(&cfg, "cpu", &mesh).unwrap();
    let exe = placement.compile(&client, &comp).unwrap();
    let hlo8 = hlo_builder::print_module_bytes(&exe.optimized_program().unwrap()).unwrap();
    let single = step::build_train_step(&cfg, "cpu", &model::Mesh::single()).unwrap();
    let one = Placement::new(&client, 1)
        .unwrap()
        .compile(&client, &single)
        .unwrap();
    let hlo1 = hlo_builder::print_module_bytes(&one.optimized_program().unwrap()).unwrap();
    let (m8, m1) = (
        entry_argument_bytes(&hlo8, &moments),
        entry_argument_bytes(&hlo1, &moments),
    );
    let (p8, p1) = (
        entry_argument_bytes(&hlo8, std::slice::from_ref(&io.args.state.params)),
        entry_argument_bytes(&hlo1, std::slice::from_ref(&io.args.state.params)),
    );
    eprintln!(
        "data 8 + shard_optimizer: moment arguments per device {m8} B, 1 device {m1} B \
         (1/{:.2}); parameters {p8} B vs {p1} B",
        m1 as f64 / m8 as f64
    );
    assert!(6 * m8 <= m1, "{m8} B of moments per device vs {m1} B");
    assert_eq!(p8, p1, "data 8 keeps every parameter whole");
    // Each device's update runs on its eighth: the in-place kernel's operands are pieces.
    let update = hlo8
        .lines()
        .find(|l| l.contains("rattention.adamw_scaled"))
        .expect("the sharded AdamW update");
    assert!(
        update.contains("f32[8,64]") && !update.contains("f32[64,64]"),
        "{update}"
    );
    // The updated slices come back in one all-gather (packed, every parameter), beside the one
    // of the per-device norm partials: not one collective per parameter.
    let gathers = hlo8.matches(" all-gather(").count();
    eprintln!("data 8 + shard_optimizer: {gathers} all-gathers in the optimized step");
    assert_eq!(gathers, 2, "all-gathers");
}

/// 20 steps of data 8 with `mesh.shard_optimizer` train like 20 without: the loss of every step
/// within 1e-5 relative, every parameter and moment within 1e-5 in norm (the gradient is
/// reduced into slices instead of whole, so sums may run in another order). With the moments cut
/// over `seq` too (embed → [fsdp] keeps the parameters whole over seq) the CPU kernel and the HLO
/// lowering of the update (`train.optimizer_lowering = "hlo"`, what TPUs run) train alike.
#[test]
fn zero_1_trains_like_whole_moments() {
    let cases: [(&str, usize, &[&str]); 3] = [
        ("data8", 20, &["mesh.data=8", "train.batch=8"]),
        (
            "data2xseq2",
            3,
            &["mesh.data=2", "mesh.seq=2", "mesh.rules.embed=[\"fsdp\"]"],
        ),
        (
            "data2xseq2-hlo",
            3,
            &[
                "mesh.data=2",
                "mesh.seq=2",
                "mesh.rules.embed=[\"fsdp\"]",
                "train.optimizer_lowering=\"hlo\"",
            ],
        ),
    ];
    for (name, steps, mesh) in cases {
        let (want_loss, want_state) = run(&format!("zero-off-{name}"), steps, mesh);
        let mut on = mesh.to_vec();
        on.push("mesh.shard_optimizer=true");
        let (loss, state) = run(&format!("zero-on-{name}"), steps, &on);
        assert_eq!(loss.len(), steps);
        let mut worst_loss = 0.0f64;
        for (s, (l, w)) in loss.iter().zip(&want_loss).enumerate() {
            let e = ((l - w) / w).abs() as f64;
            worst_loss = worst_loss.max(e);
            assert!(e <= 1e-5, "{name}: step {} loss {l} vs {w}", s + 1);
        }
        let mut worst = 0.0f64;
        for (p, w) in state.iter().zip(&want_state) {
            assert_eq!((&p.name, &p.shape), (&w.name, &w.shape));
            let e = norm_rel(&p.data, &w.data);
            worst = worst.max(e);
            assert!(e <= 1e-5, "{name}: {} differs by {e:e} in norm", p.name);
        }
        eprintln!(
            "{name}: {steps} steps with shard_optimizer: loss within {worst_loss:.1e} relative, \
             state within {worst:.1e} in norm of the run without"
        );
    }
}

/// A state saved on data 4 with `mesh.shard_optimizer` (parameters whole on every device, each
/// moment in four pieces) restores bit for bit onto fsdp 2 × tensor 2 without it, onto 1 device,
/// and onto data 2 × tensor 2 with it (other moment pieces again): the checkpoint stores each
/// tensor's own sharding, and loading reshards.
#[test]
fn a_zero_1_checkpoint_restores_bit_exactly_without_it_on_another_mesh() {
    let cfg_a = tiny(1, &["mesh.data=4", "mesh.shard_optimizer=true"]);
    let (_, model_a, sh_a, _, _) = mesh_setup(&cfg_a);
    let n = model_a.param_specs().len();
    assert_ne!(sh_a.state[0].sharding, sh_a.state[n].sharding);
    let saved = save_distinct_state(&cfg_a, "zero-restore", 3);
    let checkpoint::Stored::Sharded(s) = &saved.stored else {
        panic!("not sharded")
    };
    // A moment in 4 pieces, a parameter in 1.
    let pieces = |name: &str| s.tensors[name].pieces.len();
    assert_eq!(pieces("params.layers.0.attn.wq"), 1);
    assert_eq!(pieces("adam_m.layers.0.attn.wq"), 4);
    assert_eq!(pieces("adam_v.layers.0.attn.wq"), 4);
    assert_eq!(
        s.mesh_config.as_ref().map(|m| m.shard_optimizer),
        Some(true)
    );
    for mesh_b in [
        &["mesh.fsdp=2", "mesh.tensor=2"][..],
        &[][..],
        &["mesh.data=2", "mesh.tensor=2", "mesh.shard_optimizer=true"][..],
    ] {
        assert_restores_bit_exactly(&saved, mesh_b);
    }
    std::fs::remove_dir_all(&saved.dir).unwrap();
}
