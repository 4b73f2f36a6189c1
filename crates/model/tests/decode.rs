//! Decoding against the full forward: prefill(L) followed by one-token steps must give the logits
//! `transformer::forward` gives at every position (CPU plugin, RLA kernels registered), for RAttention,
//! SWA-only, qk-norm, relu and W = 0 configs, prompts shorter and longer than the window. Plus the
//! cache-size accounting against the paper's figures.

use hlo_builder::Shape;
use model::config::{FeatureMap, LocalKind, ModelConfig};
use model::Model;

mod common;
use common::{client, compile, decode_params, full_logits, load_model, max_rel, rand};

fn tiny() -> ModelConfig {
    common::tiny_3to1()
}

/// Random parameters: matrices ×5, norm scales perturbed around 1 ([`common::decode_params`]).
fn params(m: &Model, seed: u64) -> Vec<pjrt::Buffer> {
    decode_params(m, seed, Some(0.3))
}

/// Prefill the first `prompt` tokens, decode the rest one by one, and compare every position's
/// logits with the full forward. Returns the worst relative error.
fn check_decode(name: &str, cfg: &ModelConfig, bs: usize, total: usize, prompts: &[usize]) -> f64 {
    let m = Model::new(cfg.clone()).unwrap();
    let v = cfg.vocab;
    let p = params(&m, 7);
    let tokens: Vec<i32> = rand(bs * total, 42, 1.0)
        .iter()
        .map(|x| ((x.abs() * v as f32) as i32).min(v as i32 - 1))
        .collect();
    let want = full_logits(&m, &p, &tokens, bs);
    let row = |bi: usize, t: usize| &want[(bi * total + t) * v..][..v];
    let step = compile(&m.decode_step(bs, total).unwrap());
    let n_cache = m.cache_layout(bs, total).buffers().len();
    let mut worst = 0.0f64;
    for &l in prompts {
        let prefill = compile(&m.prefill(bs, l, total, "cpu").unwrap());
        let prompt: Vec<i32> = (0..bs)
            .flat_map(|bi| tokens[bi * total..bi * total + l].to_vec())
            .collect();
        let tb = client()
            .buffer_from_host(&prompt, &[bs as i64, l as i64], None)
            .unwrap();
        let mut args: Vec<&pjrt::Buffer> = p.iter().collect();
        args.push(&tb);
        let mut outs = prefill.execute(&args).unwrap();
        assert_eq!(outs.len(), 1 + n_cache, "{name}: prefill outputs");
        let logits = outs.remove(0).to_host::<f32>().unwrap();
        for bi in 0..bs {
            for t in 0..l {
                let e = max_rel(&logits[(bi * l + t) * v..][..v], row(bi, t));
                assert!(
                    e <= 1e-4,
                    "{name} L={l}: prefill logits at b={bi} t={t}: rel err {e:.2e}"
                );
                worst = worst.max(e);
            }
        }
        let mut cache = outs;
        for t in l..total {
            let tok: Vec<i32> = (0..bs).map(|bi| tokens[bi * total + t]).collect();
            let tokb = client().buffer_from_host(&tok, &[bs as i64], None).unwrap();
            let posb = client().buffer_from_host(&[t as i32], &[], None).unwrap();
            let mut args: Vec<&pjrt::Buffer> = p.iter().collect();
            args.extend(cache.iter());
            args.push(&tokb);
            args.push(&posb);
            let mut outs = step.execute(&args).unwrap();
            let logits = outs.remove(0).to_host::<f32>().unwrap();
            for bi in 0..bs {
                let e = max_rel(&logits[bi * v..][..v], row(bi, t));
                assert!(
                    e <= 1e-4,
                    "{name} L={l}: decode logits at b={bi} t={t}: rel err {e:.2e}"
                );
                worst = worst.max(e);
            }
            cache = outs;
        }
    }
    eprintln!("{name}: worst relative logit error {worst:.2e}");
    worst
}

#[test]
fn decode_matches_forward_tiny() {
    // W = 32: prompts shorter than the window, exactly W+1 (state still empty) and longer (RLA active,
    // ring wrapped), then decoding across many absorptions.
    let cfg = tiny();
    check_decode("tiny", &cfg, 2, 100, &[1, 20, 33, 34, 70]);
}

#[test]
fn decode_matches_forward_qk_norm_relu_w0() {
    let mut cfg = tiny();
    cfg.qk_norm = true;
    cfg.rla.feature_map = FeatureMap::Relu;
    cfg.window = 0;
    cfg.tied_embeddings = false;
    cfg.ffn_activation = model::config::FfnActivation::Geglu;
    check_decode("qk_norm+relu+W0", &cfg, 2, 40, &[1, 2, 17]);
}

#[test]
fn decode_matches_forward_qk_norm_softmax_w5() {
    let mut cfg = tiny();
    cfg.qk_norm = true;
    cfg.window = 5;
    cfg.layers = 5; // local, local, local, global, local
    check_decode("qk_norm+W5", &cfg, 1, 48, &[3, 6, 7, 23]);
}

#[test]
fn decode_matches_forward_swa_only() {
    let mut cfg = tiny();
    cfg.local_kind = LocalKind::Swa;
    cfg.window = 8;
    check_decode("swa", &cfg, 2, 40, &[4, 9, 25]);
}

#[test]
fn decode_matches_forward_global_rope() {
    // RoPE on the global layer of the 3:1 stack (with qk-norm): the cache keeps keys rotated at
    // their absolute positions; prompts inside and beyond the window. Then a stack of global
    // layers only (the full-attention baseline) with a small RoPE base, so rotations wrap many
    // times over the 48 positions.
    let mut cfg = tiny();
    cfg.global_rope = true;
    cfg.qk_norm = true;
    check_decode("3:1 global_rope", &cfg, 2, 48, &[1, 40]);
    let mut full = tiny();
    full.global_rope = true;
    full.layer_pattern = model::config::LayerPattern::Ratio("0:1".into());
    full.rope_theta = 100.0;
    check_decode("full global_rope", &full, 2, 48, &[7, 33]);
}

#[test]
fn decode_errors_name_the_problem() {
    let m = Model::new(tiny()).unwrap();
    let e = m.prefill(1, 65, 64, "cpu").unwrap_err().to_string();
    assert!(
        e.contains("prompt_len (65)") && e.contains("max_len (64)"),
        "{e}"
    );
    let e = m.decode_step(0, 64).unwrap_err().to_string();
    assert!(e.contains("batch (0)"), "{e}");
    let mut bad = tiny();
    bad.heads = 3;
    let e = Model::new(bad).unwrap_err().to_string();
    assert!(e.contains("kv_heads"), "{e}");
}

#[test]
fn cache_specs_shapes() {
    let m = Model::new(tiny()).unwrap(); // W 32, G 2, H 16, [local ×3, global]
    let specs = m.cache_layout(3, 128).buffers();
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "layers.0.k_ring",
            "layers.0.v_ring",
            "layers.0.rla_state",
            "layers.1.k_ring",
            "layers.1.v_ring",
            "layers.1.rla_state",
            "layers.2.k_ring",
            "layers.2.v_ring",
            "layers.2.rla_state",
            "layers.3.k",
            "layers.3.v",
        ]
    );
    // Head-major caches [B, G, slots, H] (the decode step's dots read them without a transpose).
    assert_eq!(specs[0].shape, [3, 2, 33, 16]);
    assert_eq!(specs[2].shape, [3, 2, 32, 16]);
    assert_eq!(specs[9].shape, [3, 2, 128, 16]);
}

#[test]
fn qk_norm_rattention_keeps_raw_keys_for_rla() {
    // With qk-norm the ring's keys (normalised, rotated) cannot give back the raw key RLA absorbs,
    // so RAttention layers keep k_raw too; SWA-only layers never need it.
    let mut cfg = tiny();
    cfg.qk_norm = true;
    let m = Model::new(cfg.clone()).unwrap();
    let names: Vec<String> = m
        .cache_layout(1, 64)
        .buffers()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names[..4],
        [
            "layers.0.k_ring",
            "layers.0.v_ring",
            "layers.0.k_raw",
            "layers.0.rla_state"
        ]
    );
    assert_eq!(names.len(), 3 * 4 + 2);
    let raw = m
        .cache_layout(1, 64)
        .buffers()
        .into_iter()
        .find(|b| b.part == model::CachePart::RawKey)
        .unwrap();
    assert_eq!(raw.shape, [1, 2, 33, 16]);
    // The paper's accounting counts k and v only.
    let plain = Model::new(tiny()).unwrap();
    assert_eq!(m.cache_bytes(64), plain.cache_bytes(64));
    cfg.local_kind = LocalKind::Swa;
    let swa = Model::new(cfg).unwrap();
    assert!(swa
        .cache_layout(1, 64)
        .buffers()
        .iter()
        .all(|b| b.part != model::CachePart::RawKey));
}

#[test]
fn cache_bytes_12b_at_4k() {
    let full = Model::new(load_model("12b-full")).unwrap();
    let full_kv = full.cache_bytes(4096);
    // 40 layers × k and v × 4096 tokens × 8 kv heads × 128 × bf16.
    assert_eq!(full_kv.kv, 40 * 2 * 4096 * 8 * 128 * 2);
    assert_eq!(full_kv.rla_state, 0);
    for (w, saving) in [(1024usize, 0.5625f64), (512, 0.65625)] {
        let mut cfg = load_model("12b");
        cfg.window = w;
        let c = Model::new(cfg).unwrap().cache_bytes(4096);
        let s = 1.0 - c.kv as f64 / full_kv.kv as f64;
        assert!((s - saving).abs() < 1e-12, "W={w}: saving {s}");
        // 30 RAttention layers × 8 kv heads × f32 [256, 128].
        assert_eq!(c.rla_state, 30 * 8 * 256 * 128 * 4);
    }
    // Shorter contexts than the window cost the same as full attention.
    let m = Model::new(load_model("12b")).unwrap();
    assert_eq!(m.cache_bytes(256).kv, full.cache_bytes(256).kv);
}

#[test]
fn decode_io_names_the_arguments_and_results_of_both_graphs() {
    use hlo_builder::ElementType::{F32, S32};
    let m = Model::new(tiny()).unwrap();
    let (bs, l, max_len) = (2, 5, 40);
    let io = m.decode_io(bs, max_len);
    let layout = m.cache_layout(bs, max_len);
    let buffers = layout.buffers();
    let cache_shapes: Vec<Shape> = buffers
        .iter()
        .map(|c| {
            let d: Vec<i64> = c.shape.iter().map(|&x| x as i64).collect();
            Shape::array(c.dtype, &d)
        })
        .collect();
    let (args, res) = m.decode_step(bs, max_len).unwrap().program_shape();
    assert_eq!(args.len(), io.pos.max(io.token) + 1);
    assert_eq!(args[io.token], Shape::array(S32, &[bs as i64]));
    assert_eq!(args[io.pos], Shape::array(S32, &[]));
    assert_eq!(args[io.cache.clone()], cache_shapes[..]);
    for (i, s) in io.params.clone().zip(m.param_specs()) {
        let d: Vec<i64> = s.shape.iter().map(|&x| x as i64).collect();
        assert_eq!(args[i], Shape::array(F32, &d), "{}", s.name);
    }
    let res = res.tuple_elements().unwrap();
    // tiny-3to1's vocabulary: 288.
    assert_eq!(res[io.logits], Shape::array(F32, &[bs as i64, 288]));
    assert_eq!(res[io.cache_out.clone()], cache_shapes[..]);
    let (args, res) = m.prefill(bs, l, max_len, "cpu").unwrap().program_shape();
    assert_eq!(args.len(), io.prompt + 1);
    assert_eq!(args[io.prompt], Shape::array(S32, &[bs as i64, l as i64]));
    let res = res.tuple_elements().unwrap();
    assert_eq!(
        res[io.logits],
        Shape::array(F32, &[bs as i64, l as i64, 288])
    );
    assert_eq!(res[io.cache_out.clone()], cache_shapes[..]);
    // Both byte counts derive from the same buffers.
    let alloc = layout.allocated_bytes();
    let state: u64 = buffers
        .iter()
        .filter(|b| b.part == model::CachePart::RlaState)
        .map(|b| b.bytes())
        .sum();
    assert_eq!(alloc.rla_state, state);
    assert_eq!(
        alloc.rla_state,
        m.cache_bytes(max_len).rla_state * bs as u64
    );
    assert_eq!(
        alloc.kv,
        (2 * 3 * 33 + 2 * max_len as u64) * bs as u64 * 2 * 16 * 4
    );
}

#[test]
fn costs_compare_the_model_with_its_baselines() {
    let m = Model::new(load_model("12b")).unwrap();
    let c = m.costs(4096);
    let full = Model::new(load_model("12b-full")).unwrap();
    assert_eq!(c.model.cache, m.cache_bytes(4096));
    assert_eq!(c.full.cache, full.cache_bytes(4096));
    assert_eq!(c.full.parameters, full.param_count() as u64);
    assert_eq!(
        (c.swa.cache.kv, c.swa.cache.rla_state),
        (c.model.cache.kv, 0)
    );
    assert_eq!(
        (c.swa.flops_per_token.rla, c.full.flops_per_token.rla),
        (0.0, 0.0)
    );
    assert!(c.model.flops_per_token.rla > 0.0);
    // The baselines lose only the mixing norms of the 30 RAttention layers.
    assert_eq!(c.model.parameters - c.swa.parameters, 30 * 2 * 40 * 128);
    assert_eq!(c.model.matmul_parameters, c.swa.matmul_parameters);
    assert_eq!(
        c.model.cache_allocated,
        m.cache_layout(1, 4096).allocated_bytes()
    );
}
