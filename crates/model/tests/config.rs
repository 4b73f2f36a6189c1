//! Config checks and parameter counts of the paper's models.

use model::config::{LayerKind, ModelConfig};
use model::{param_count, param_specs};

fn load(name: &str) -> ModelConfig {
    let path = format!("{}/../../configs/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cfg: ModelConfig = t.remove("model").unwrap().try_into().unwrap();
    cfg.validate().unwrap();
    cfg
}

#[test]
fn paper_models_have_their_nominal_sizes() {
    // 3B: per layer 2·2048² + 2·2048·512 (attention) + 3·2048·6656 (SwiGLU) + norms, 56 layers,
    // plus untied 32768-vocab embedding and head.
    let c3 = load("3b");
    let per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 6656;
    let n3 = param_count(&c3);
    assert!(
        n3 > 56 * per_layer && n3 < 56 * per_layer + 2 * 32768 * 2048 + 56 * 100_000,
        "{n3}"
    );
    assert!(
        (2.9e9..3.1e9).contains(&(n3 as f64)),
        "3B config has {n3} parameters"
    );
    let n12 = param_count(&load("12b"));
    assert!(
        (12.5e9..13.2e9).contains(&(n12 as f64)),
        "12B config has {n12} parameters"
    );
}

#[test]
fn layer_pattern_expands_and_bad_configs_are_named() {
    let c = load("tiny");
    assert_eq!(
        c.layer_kinds().unwrap(),
        vec![
            LayerKind::Local,
            LayerKind::Local,
            LayerKind::Local,
            LayerKind::Global
        ]
    );
    assert!(param_specs(&c)
        .iter()
        .any(|p| p.name == "layers.0.attn.rla_norm.scale"));
    assert!(!param_specs(&c)
        .iter()
        .any(|p| p.name == "layers.3.attn.rla_norm.scale"));
    let mut bad = c.clone();
    bad.kv_heads = 3;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("heads (4) must be divisible by kv_heads (3)"));
    let mut bad = c.clone();
    bad.rla.chunk = 50;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("rla.chunk"));
    let mut bad = c;
    bad.layer_pattern = model::config::LayerPattern::Ratio("three".into());
    assert!(bad.validate().unwrap_err().to_string().contains("three"));
}
