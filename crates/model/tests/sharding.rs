//! Parameter shardings of the shipped configs under meshes: partition specs from the default
//! rules, per-device sizes, and the errors that name a parameter.

mod common;

use common::{forward_graph, load_model};
use model::{Mesh, MeshAxis, MeshConfig, MeshError, Model, ParamRole, PartitionSpec};
use MeshAxis::{Fsdp, Seq, Tensor};

fn mesh(data: i64, fsdp: i64, tensor: i64, devices: usize) -> Mesh {
    MeshConfig {
        data,
        fsdp,
        tensor,
        ..MeshConfig::default()
    }
    .resolve(devices)
    .unwrap()
}

fn spec_of(m: &Model, mesh: &Mesh, name: &str) -> PartitionSpec {
    m.param_shardings(mesh)
        .unwrap()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .spec
}

#[test]
fn tiny_specs_follow_the_default_rules() {
    let m = Model::new(load_model("tiny-3to1")).unwrap();
    let mesh = mesh(1, 2, 2, 4);
    let s = |n: &str| spec_of(&m, &mesh, n).to_string();
    assert_eq!(s("embed"), "[tensor, (fsdp, seq)]");
    assert_eq!(s("layers.0.attn.wq"), "[(fsdp, seq), tensor]");
    assert_eq!(s("layers.0.attn.wk"), "[(fsdp, seq), tensor]");
    assert_eq!(s("layers.0.attn.wo"), "[tensor, (fsdp, seq)]");
    assert_eq!(s("layers.0.attn.swa_norm.scale"), "[tensor, -]");
    assert_eq!(s("layers.0.ffn.w_down"), "[tensor, (fsdp, seq)]");
    assert_eq!(s("final_norm.scale"), "[tensor]");
    assert_eq!(s("layers.0.ffn_norm.scale"), "[tensor]");
    assert_eq!(
        spec_of(&m, &mesh, "layers.0.attn.wq"),
        PartitionSpec(vec![vec![Fsdp, Seq], vec![Tensor]])
    );
}

#[test]
fn the_1_device_mesh_replicates_everything() {
    let m = Model::new(load_model("3b")).unwrap();
    let shardings = m.param_shardings(&Mesh::single()).unwrap();
    assert_eq!(shardings.len(), m.param_specs().len());
    for (p, s) in m.param_specs().iter().zip(&shardings) {
        assert_eq!(s.sharding, hlo_builder::Sharding::Replicated, "{}", p.name);
        assert_eq!(s.shard_shape, p.shape, "{}", p.name);
    }
}

#[test]
fn three_b_on_fsdp_16_tensor_4() {
    let m = Model::new(load_model("3b")).unwrap();
    let mesh = mesh(1, 16, 4, 64);
    let by_name = |n: &str| {
        m.param_shardings(&mesh)
            .unwrap()
            .into_iter()
            .find(|p| p.name == n)
            .unwrap()
    };
    let wq = by_name("layers.0.attn.wq");
    assert_eq!(wq.spec.to_string(), "[(fsdp, seq), tensor]");
    assert_eq!(wq.shard_shape, vec![2048 / 16, 2048 / 4]);
    let wk = by_name("layers.0.attn.wk");
    assert_eq!(wk.shard_shape, vec![128, 512 / 4]);
    assert_eq!(by_name("lm_head").spec.to_string(), "[(fsdp, seq), tensor]");
    assert_eq!(by_name("lm_head").shard_shape, vec![128, 32768 / 4]);
    assert_eq!(
        by_name("layers.0.attn.q_norm.scale").spec.to_string(),
        "[-]"
    );
    // The mesh uses every non-trivial axis: fsdp × tensor tiles, replicated over data 1 × seq 1.
    match &wq.sharding {
        hlo_builder::Sharding::Tiled {
            tile_assignment_dims,
            last_tile_dim_replicate,
            devices,
        } => {
            assert_eq!(tile_assignment_dims, &[16, 4]);
            assert!(!last_tile_dim_replicate);
            // fsdp outer, tensor inner, as in the mesh's device order: devices in order.
            assert_eq!(devices, &(0..64).collect::<Vec<i64>>());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn three_b_errors_name_the_parameter() {
    let m = Model::new(load_model("3b")).unwrap();
    // 4 kv heads cannot split 8 ways although the flattened 512 can.
    let e = m.param_shardings(&mesh(1, 1, 8, 8)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "layers.0.attn.wk: dim 1 (kv_heads) holds 4 heads, not divisible by 8 = tensor 8 \
         (mesh.rules.kv_heads): a shard would split a head"
    );
    // 3 does not divide 2048.
    let e = m.param_shardings(&mesh(1, 3, 1, 3)).unwrap_err();
    assert!(matches!(e, MeshError::NotDivisible { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "embed: dim 1 (embed) of size 2048 is not divisible by 3 = fsdp 3 × seq 1 \
         (mesh.rules.embed)"
    );
}

#[test]
fn per_device_sizes_divide_the_total_as_the_specs_say() {
    let m = Model::new(load_model("tiny-3to1")).unwrap();
    let total: usize = m.param_count();
    // data only: every device holds everything.
    let per = |mesh: &Mesh| -> usize {
        m.param_shardings(mesh)
            .unwrap()
            .iter()
            .map(|s| s.shard_numel())
            .sum()
    };
    assert_eq!(per(&mesh(4, 1, 1, 4)), total);
    // fsdp 2 × tensor 2: matrices (both dims ruled) split 4 ways, norm scales 2 ways (norm →
    // tensor, or q_heads → tensor with head_dim unsharded).
    let (matrices, norms): (usize, usize) =
        m.param_specs()
            .iter()
            .fold((0, 0), |(a, b), p| match p.role {
                ParamRole::NormScale => (a, b + p.numel()),
                _ => (a + p.numel(), b),
            });
    assert_eq!(matrices + norms, total);
    assert_eq!(per(&mesh(1, 2, 2, 4)), matrices / 4 + norms / 2);
    // fsdp 4 alone: every matrix (each has an embed dim) splits 4 ways; the norm scales (norm
    // → tensor, the RAttention mixing norms [q_heads, head_dim]) stay whole.
    assert_eq!(per(&mesh(1, 4, 1, 4)), matrices / 4 + norms);
}

#[test]
fn cache_buffers_carry_logical_axes_and_shard_by_batch_and_kv_heads() {
    let m = Model::new(load_model("3b")).unwrap();
    let layout = model::CacheLayout::new(&m, 8, 4096);
    let mesh = mesh(2, 2, 2, 8);
    let bufs = layout.buffers();
    assert!(bufs.iter().any(|b| b.part == model::CachePart::RlaState));
    for b in &bufs {
        assert_eq!(b.axes.len(), b.shape.len(), "{}", b.name);
        let spec = mesh.partition_spec(&b.name, &b.shape, &b.axes).unwrap();
        // Batch over data × fsdp, kv heads over tensor; slots, φ features and H stay whole
        // (every buffer is [batch, kv_heads, ..]).
        let want = "[(data, fsdp), tensor, -, -]";
        assert_eq!(spec.to_string(), want, "{}", b.name);
    }
}

#[test]
fn a_model_under_a_mesh_constrains_its_activations_and_runs_rla_in_manual_regions() {
    // Attention as HLO: the regions counted below are the RLA blocks' alone (the attention
    // kernels' regions: `attention_kernels_run_in_manual_regions_under_a_mesh`).
    let mut cfg = load_model("tiny-3to1");
    cfg.attention_lowering = model::config::AttentionLowering::Hlo;
    // The norms and the embedding as HLO: their regions have a test of their own
    // (`norm_loss_and_embed_kernels_run_in_row_regions_under_a_mesh`).
    cfg.norm_lowering = model::config::KernelLowering::Hlo;
    cfg.embed_lowering = model::config::KernelLowering::Hlo;
    let m = Model::new(cfg)
        .unwrap()
        .with_mesh(mesh(2, 1, 2, 4))
        .unwrap();
    let text = forward_graph(&m, 4, 64).to_text();
    // The residual stream [batch, length, activation_embed]: batch over data (devices {0,1} ×
    // {2,3} rows), d_model over tensor.
    assert!(
        text.contains("f32[4,64,64]{2,1,0} custom-call(")
            && text.contains("sharding={devices=[2,1,2]0,1,2,3}"),
        "{text}"
    );
    // Three local layers: each RLA forward block runs {manual} on [B/2, T, N/2, H] pieces.
    assert_eq!(
        text.matches("custom_call_target=\"rattention.rla_fwd\"")
            .count(),
        3
    );
    let fwd = text
        .lines()
        .find(|l| l.contains("rattention.rla_fwd"))
        .unwrap();
    assert!(
        fwd.contains("(f32[2,64,2,16]{3,2,1,0}, f32[2,1,1,32,16]"),
        "{fwd}"
    );
    assert!(
        fwd.contains("sharding={{manual}, {manual}, {manual}}"),
        "{fwd}"
    );
    // q, k, v in, o / chunk_states / final_state out, per layer.
    assert_eq!(text.matches("SPMDFullToShardShape").count(), 9);
    assert_eq!(text.matches("SPMDShardToFullShape").count(), 9);
    // One device: no annotations at all.
    let one = Model::new(load_model("tiny-3to1")).unwrap();
    let text = forward_graph(&one, 4, 64).to_text();
    assert!(!text.contains("sharding="), "{text}");
}

/// With the CPU attention kernels (`attention_lowering = "kernel"`, the CPU default) under a
/// data × tensor mesh, SWA of the three local layers and the global layer each run their
/// custom call `{manual}` on [B/2, T, N/2, H] pieces, in a region of their own beside RLA's.
#[test]
fn attention_kernels_run_in_manual_regions_under_a_mesh() {
    use hlo_builder::{Builder, ElementType, Shape};
    let mut cfg = load_model("tiny-3to1");
    cfg.attention_lowering = model::config::AttentionLowering::Kernel;
    cfg.norm_lowering = model::config::KernelLowering::Hlo;
    cfg.embed_lowering = model::config::KernelLowering::Hlo;
    let m = Model::new(cfg)
        .unwrap()
        .with_mesh(mesh(2, 1, 2, 4))
        .unwrap();
    let b = Builder::new("forward");
    let (_, named) = m.declare_params(&b).unwrap();
    let tokens = b
        .parameter(Shape::array(ElementType::S32, &[4, 64]), "tokens")
        .unwrap();
    let text = b
        .build(m.forward(&b, &named, tokens, "cpu").unwrap())
        .unwrap()
        .to_text();
    let calls: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("custom_call_target=\"rattention.attn_fwd\""))
        .collect();
    assert_eq!(calls.len(), 4, "{text}");
    for l in &calls {
        assert!(l.contains("(f32[2,64,2,16]{3,2,1,0}, f32[2,64,2]"), "{l}");
        assert!(l.contains("sharding={{manual}, {manual}}"), "{l}");
    }
    // q, k, v in and o out per attention region, beside RLA's 3 + 3 per local layer.
    assert_eq!(text.matches("SPMDFullToShardShape").count(), 9 + 4 * 3);
    assert_eq!(text.matches("SPMDShardToFullShape").count(), 9 + 4);
}

/// The loss, the RMS norms and the embedding under meshes: `"auto"` lowers them as HLO on a
/// mesh; `"kernel"` runs each kernel `{manual}` on its device's rows in a region of its own
/// where the mesh leaves its feature dim whole, and is an error naming the cut where the mesh
/// cuts it (tensor cuts d_model and the vocab under the default rules; the embedding reads its
/// table whole on any mesh).
#[test]
fn norm_loss_and_embed_kernels_run_in_row_regions_under_a_mesh() {
    use hlo_builder::{Builder, ElementType, Shape};
    use model::config::KernelLowering;
    let text = |cfg: &model::ModelConfig, mesh: Mesh| -> Result<String, String> {
        let m = Model::new(cfg.clone()).unwrap().with_mesh(mesh).unwrap();
        let b = Builder::new("loss");
        let (_, named) = m.declare_params(&b).unwrap();
        let tokens = b
            .parameter(Shape::array(ElementType::S32, &[4, 65]), "tokens")
            .unwrap();
        let loss = m
            .loss(&b, &named, tokens, "cpu")
            .map_err(|e| e.to_string())?;
        Ok(b.build(loss).unwrap().to_text())
    };
    let calls = |text: &str, target: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains(&format!("custom_call_target=\"rattention.{target}\"")))
            .map(str::to_string)
            .collect()
    };
    let cfg = load_model("tiny-3to1");
    let kernels = model::ModelConfig {
        norm_lowering: KernelLowering::Kernel,
        loss_lowering: KernelLowering::Kernel,
        embed_lowering: KernelLowering::Kernel,
        ..cfg.clone()
    };
    let seq = |data: i64, seq: i64| {
        MeshConfig {
            data,
            seq,
            ..MeshConfig::default()
        }
        .resolve((data * seq) as usize)
        .unwrap()
    };
    // data 2 × seq 2: every norm (2 per layer, 2 per local layer's mixing, the final one), the
    // embedding and the loss in regions, on [B/2, T/2, ...] pieces.
    let t = text(&kernels, seq(2, 2)).unwrap();
    let norms = calls(&t, "rms_norm_fwd");
    assert_eq!(norms.len(), 4 * 2 + 3 * 2 + 1, "{t}");
    assert!(norms.iter().all(|l| l.contains("{manual}")), "{norms:#?}");
    assert!(
        norms
            .iter()
            .any(|l| l.contains("(f32[2,32,64]{2,1,0}, f32[2,32]")),
        "{norms:#?}"
    );
    let xent = calls(&t, "xent_fwd");
    assert_eq!(xent.len(), 1, "{t}");
    assert!(
        xent[0].contains("f32[2,32,") && xent[0].contains("{manual}"),
        "{xent:#?}"
    );
    let emb = calls(&t, "embed_fwd");
    assert_eq!(emb.len(), 1, "{t}");
    assert!(
        emb[0].contains("f32[2,32,64]") && emb[0].contains("{manual}"),
        "{emb:#?}"
    );
    // `auto` on a mesh: all three as HLO.
    let t = text(&cfg, seq(2, 2)).unwrap();
    for target in ["rms_norm_fwd", "xent_fwd", "embed_fwd"] {
        assert!(calls(&t, target).is_empty(), "{target} with auto: {t}");
    }
    // data 2 × tensor 2: d_model and the vocab are cut over tensor; the embedding still runs
    // (its table whole on every device).
    let emb_only = model::ModelConfig {
        embed_lowering: KernelLowering::Kernel,
        ..cfg.clone()
    };
    let t = text(&emb_only, mesh(2, 1, 2, 4)).unwrap();
    assert_eq!(calls(&t, "embed_fwd").len(), 1, "{t}");
    // Asked for there, the norm and the loss kernels are refused.
    for (which, key) in [(0, "norm_lowering"), (1, "loss_lowering")] {
        let mut c = cfg.clone();
        if which == 0 {
            c.norm_lowering = KernelLowering::Kernel;
        } else {
            c.loss_lowering = KernelLowering::Kernel;
        }
        let e = text(&c, mesh(2, 1, 2, 4)).unwrap_err();
        assert!(
            e.contains(&format!("model.{key} = \"kernel\"")) && e.contains("over tensor"),
            "{e}"
        );
    }
}

#[test]
fn with_mesh_refuses_what_it_cannot_run() {
    let m = Model::new(load_model("tiny")).unwrap();
    // tiny's T = 256 splits into 2 sequence shards but not into 3.
    let seq = |n: i64| {
        MeshConfig {
            seq: n,
            ..MeshConfig::default()
        }
        .resolve(n as usize)
        .unwrap()
    };
    assert!(m.clone().with_mesh(seq(2)).is_ok());
    let e = m.clone().with_mesh(seq(3)).unwrap_err().to_string();
    assert_eq!(
        e,
        "model.seq_len = 256 is not divisible by mesh.seq = 3: each sequence shard holds \
         seq_len / seq tokens"
    );
    // tiny has 2 kv heads: tensor 4 would split one.
    let e = m
        .clone()
        .with_mesh(mesh(1, 1, 4, 4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("kv_heads"), "{e}");
}
