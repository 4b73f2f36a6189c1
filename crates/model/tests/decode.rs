//! Decoding against the full forward: prefill(L) followed by one-token steps must give the logits
//! `transformer::forward` gives at every position (CPU plugin, RLA kernels registered), for RAttention,
//! SWA-only, qk-norm, relu and W = 0 configs, prompts shorter and longer than the window. Plus the
//! cache-size accounting against the paper's figures.

use hlo_builder::{Builder, ElementType, Shape};
use model::config::{FeatureMapKind, LocalKind, ModelConfig, RlaLowering};
use model::decode::{build_decode_step, build_prefill, cache_bytes, cache_specs};
use model::transformer::{declare_params, forward};
use std::sync::OnceLock;

fn client() -> &'static pjrt::Client {
    static C: OnceLock<pjrt::Client> = OnceLock::new();
    C.get_or_init(|| {
        let c = pjrt::Client::cpu().expect("CPU plugin");
        pallas_port::register_cpu_kernels(&c).expect("register RLA kernels");
        c
    })
}

fn compile(comp: &hlo_builder::Computation) -> pjrt::LoadedExecutable {
    client()
        .compile(
            pjrt::Program::Hlo(&comp.to_bytes()),
            &pjrt::CompileOptions::default(),
        )
        .unwrap_or_else(|e| panic!("compiling {}: {e}", comp.name()))
}

fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn load_model(name: &str) -> ModelConfig {
    let text = std::fs::read_to_string(format!(
        "{}/../../configs/{name}.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut t: toml::Table = toml::from_str(&text).unwrap();
    t.remove("model").unwrap().try_into().unwrap()
}

fn tiny() -> ModelConfig {
    let mut cfg = load_model("tiny");
    cfg.rla.lowering = RlaLowering::CustomCall;
    cfg
}

/// Random parameters: init_param scaled ×5 for matrices (so attention is far from uniform) and
/// norm scales perturbed around 1 (so every scale is seen).
fn params(cfg: &ModelConfig, seed: u64) -> Vec<pjrt::Buffer> {
    model::param_specs(cfg)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = model::init_param(s, seed);
            if s.name.ends_with(".scale") {
                let r = rand(v.len(), 1000 + i as u64, 0.3);
                v.iter_mut().zip(r).for_each(|(x, r)| *x += r);
            } else {
                v.iter_mut().for_each(|x| *x *= 5.0);
            }
            let dims: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
            client().buffer_from_host(&v, &dims, None).unwrap()
        })
        .collect()
}

/// max |got − want| / max |want| over one row.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().map(|x| x.abs() as f64).fold(1e-6, f64::max);
    got.iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Full-forward logits `[B, T, V]` for `tokens [B, T]`.
fn full_logits(cfg: &ModelConfig, p: &[pjrt::Buffer], tokens: &[i32], bs: usize) -> Vec<f32> {
    let t = tokens.len() / bs;
    let b = Builder::new("forward");
    let (_, named) = declare_params(&b, cfg).unwrap();
    let tok = b
        .parameter(
            Shape::array(ElementType::S32, &[bs as i64, t as i64]),
            "tokens",
        )
        .unwrap();
    let logits = forward(&b, cfg, &named, tok, "cpu").unwrap();
    let exe = compile(&b.build(logits).unwrap());
    let tb = client()
        .buffer_from_host(tokens, &[bs as i64, t as i64], None)
        .unwrap();
    let mut args: Vec<&pjrt::Buffer> = p.iter().collect();
    args.push(&tb);
    exe.execute(&args).unwrap()[0].to_host::<f32>().unwrap()
}

/// Prefill the first `prompt` tokens, decode the rest one by one, and compare every position's
/// logits with the full forward. Returns the worst relative error.
fn check_decode(name: &str, cfg: &ModelConfig, bs: usize, total: usize, prompts: &[usize]) -> f64 {
    let v = cfg.vocab;
    let p = params(cfg, 7);
    let tokens: Vec<i32> = rand(bs * total, 42, 1.0)
        .iter()
        .map(|x| ((x.abs() * v as f32) as i32).min(v as i32 - 1))
        .collect();
    let want = full_logits(cfg, &p, &tokens, bs);
    let row = |bi: usize, t: usize| &want[(bi * total + t) * v..][..v];
    let step = compile(&build_decode_step(cfg, bs, total).unwrap());
    let n_cache = cache_specs(cfg, bs, total).len();
    let mut worst = 0.0f64;
    for &l in prompts {
        let prefill = compile(&build_prefill(cfg, bs, l, total, "cpu").unwrap());
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
                let e = rel_err(&logits[(bi * l + t) * v..][..v], row(bi, t));
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
                let e = rel_err(&logits[bi * v..][..v], row(bi, t));
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
    cfg.rla.feature_map = FeatureMapKind::Relu;
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
fn decode_errors_name_the_problem() {
    let cfg = tiny();
    let e = build_prefill(&cfg, 1, 65, 64, "cpu")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompt_len (65)") && e.contains("max_len (64)"),
        "{e}"
    );
    let e = build_decode_step(&cfg, 0, 64).unwrap_err().to_string();
    assert!(e.contains("batch (0)"), "{e}");
    let mut bad = cfg.clone();
    bad.heads = 3;
    let e = build_decode_step(&bad, 1, 64).unwrap_err().to_string();
    assert!(e.contains("kv_heads"), "{e}");
}

#[test]
fn cache_specs_shapes() {
    let cfg = tiny(); // W 32, G 2, H 16, [local ×3, global]
    let specs = cache_specs(&cfg, 3, 128);
    let names: Vec<&str> = specs.iter().map(|s| s.0.as_str()).collect();
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
    assert_eq!(specs[0].1, [3, 33, 2, 16]);
    assert_eq!(specs[2].1, [3, 2, 32, 16]);
    assert_eq!(specs[9].1, [3, 128, 2, 16]);
}

#[test]
fn cache_bytes_12b_at_4k() {
    let full = load_model("12b-full");
    let full_kv = cache_bytes(&full, 4096);
    // 40 layers × k and v × 4096 tokens × 8 kv heads × 128 × bf16.
    assert_eq!(full_kv.kv, 40 * 2 * 4096 * 8 * 128 * 2);
    assert_eq!(full_kv.rla_state, 0);
    for (w, saving) in [(1024usize, 0.5625f64), (512, 0.65625)] {
        let mut cfg = load_model("12b");
        cfg.window = w;
        let c = cache_bytes(&cfg, 4096);
        let s = 1.0 - c.kv as f64 / full_kv.kv as f64;
        assert!((s - saving).abs() < 1e-12, "W={w}: saving {s}");
        // 30 RAttention layers × 8 kv heads × f32 [256, 128].
        assert_eq!(c.rla_state, 30 * 8 * 256 * 128 * 4);
    }
    // Shorter contexts than the window cost the same as full attention.
    let cfg = load_model("12b");
    assert_eq!(cache_bytes(&cfg, 256).kv, cache_bytes(&full, 256).kv);
}
