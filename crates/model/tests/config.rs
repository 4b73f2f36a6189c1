//! Config checks and parameter counts of the paper's models.

use model::config::{LayerKind, ModelConfig};
use model::{LogicalAxis, Model, ParamRole};

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
    let n3 = Model::new(c3).unwrap().param_count();
    assert!(
        n3 > 56 * per_layer && n3 < 56 * per_layer + 2 * 32768 * 2048 + 56 * 100_000,
        "{n3}"
    );
    assert!(
        (2.9e9..3.1e9).contains(&(n3 as f64)),
        "3B config has {n3} parameters"
    );
    let n12 = Model::new(load("12b")).unwrap().param_count();
    assert!(
        (12.5e9..13.2e9).contains(&(n12 as f64)),
        "12B config has {n12} parameters"
    );
}

#[test]
fn layer_pattern_expands_and_bad_configs_are_named() {
    let c = load("tiny-3to1");
    assert_eq!(
        c.layer_kinds().unwrap(),
        vec![
            LayerKind::Local,
            LayerKind::Local,
            LayerKind::Local,
            LayerKind::Global
        ]
    );
    // The default tiny model is all local ("1:0"): RLA alone reaches beyond layers × W.
    let all_local = load("tiny");
    assert_eq!(all_local.layer_kinds().unwrap(), vec![LayerKind::Local; 2]);
    assert!(Model::new(all_local)
        .unwrap()
        .layers()
        .iter()
        .all(|a| *a == model::Attention::Rattention));
    let m = Model::new(c.clone()).unwrap();
    assert!(m
        .param_specs()
        .iter()
        .any(|p| p.name == "layers.0.attn.rla_norm.scale"));
    assert!(!m
        .param_specs()
        .iter()
        .any(|p| p.name == "layers.3.attn.rla_norm.scale"));
    let mut bad = c.clone();
    bad.kv_heads = 3;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("heads (4) must be divisible by kv_heads (3)"));
    assert!(Model::new(bad)
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

#[test]
fn every_parameter_has_a_role_and_one_logical_axis_per_dimension() {
    use LogicalAxis::*;
    for name in ["tiny", "tiny-3to1", "3b", "12b", "12b-full", "3b-swa4k"] {
        let mut cfg = load(name);
        for (qk_norm, tied) in [(false, true), (true, false)] {
            (cfg.qk_norm, cfg.tied_embeddings) = (qk_norm, tied);
            let m = Model::new(cfg.clone()).unwrap();
            for s in m.param_specs() {
                assert_eq!(s.axes.len(), s.shape.len(), "{name}: {}", s.name);
                assert_eq!(
                    s.role == ParamRole::NormScale,
                    s.name.ends_with(".scale"),
                    "{name}: {}",
                    s.name
                );
            }
        }
    }
    let m = Model::new(load("12b")).unwrap(); // qk-norm, untied
    let axes = |n: &str| {
        let s = m.param_specs().iter().find(|s| s.name == n).unwrap();
        (s.role, s.axes.clone())
    };
    assert_eq!(axes("embed"), (ParamRole::Embedding, vec![Vocab, Embed]));
    assert_eq!(axes("lm_head"), (ParamRole::Matrix, vec![Embed, Vocab]));
    assert_eq!(axes("layers.0.attn.wq").1, [Embed, QHeads]);
    assert_eq!(axes("layers.0.attn.wk").1, [Embed, KvHeads]);
    assert_eq!(axes("layers.0.attn.wv").1, [Embed, KvHeads]);
    assert_eq!(axes("layers.0.attn.wo").1, [QHeads, Embed]);
    assert_eq!(axes("layers.0.ffn.w_gate").1, [Embed, Mlp]);
    assert_eq!(axes("layers.0.ffn.w_down").1, [Mlp, Embed]);
    assert_eq!(axes("layers.0.attn_norm.scale").1, [Norm]);
    assert_eq!(axes("final_norm.scale").1, [Norm]);
    assert_eq!(axes("layers.0.attn.q_norm.scale").1, [HeadDim]);
    assert_eq!(
        axes("layers.0.attn.rla_norm.scale"),
        (ParamRole::NormScale, vec![QHeads, HeadDim])
    );
    for a in LogicalAxis::ALL {
        assert_eq!(a.name().parse::<LogicalAxis>().unwrap(), a);
    }
    assert_eq!(QHeads.name(), "q_heads");
    assert!("heads"
        .parse::<LogicalAxis>()
        .unwrap_err()
        .to_string()
        .contains("q_heads"));
}

#[test]
fn rla_norm_switch_defaults_on_and_is_written_only_when_off() {
    let on = load("tiny");
    assert!(on.rla.norm);
    // The default writes no `norm` key: the [model] text in checkpoints of default models is
    // unchanged by the switch.
    let text = toml::to_string(&on).unwrap();
    assert!(!text.lines().any(|l| l.starts_with("norm = ")), "{text}");
    let mut off = on.clone();
    off.rla.norm = false;
    let text = toml::to_string(&off).unwrap();
    assert!(text.lines().any(|l| l == "norm = false"), "{text}");
    let back: ModelConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, off);
    // Off: one scale fewer per RAttention layer ([heads, head_dim] each).
    let (n_on, n_off) = (
        Model::new(on.clone()).unwrap().param_count(),
        Model::new(off).unwrap().param_count(),
    );
    assert_eq!(n_on - n_off, on.layers * on.heads * on.head_dim);
}

#[test]
fn global_rope_defaults_off_is_written_only_when_on_and_bad_values_are_refused() {
    let off = load("tiny-3to1");
    assert!(!off.global_rope);
    // Off writes no key: the [model] text in checkpoints of default models is unchanged.
    let text = toml::to_string(&off).unwrap();
    assert!(!text.contains("global_rope"), "{text}");
    let mut on = off.clone();
    on.global_rope = true;
    on.validate().unwrap();
    let text = toml::to_string(&on).unwrap();
    assert!(text.lines().any(|l| l == "global_rope = true"), "{text}");
    let back: ModelConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, on);
    // The switch adds no parameter.
    assert_eq!(
        Model::new(on).unwrap().param_count(),
        Model::new(off.clone()).unwrap().param_count()
    );
    // A stack without global layers: the switch would do nothing, so it is refused.
    let mut local = load("tiny");
    local.global_rope = true;
    let e = local.validate().unwrap_err().to_string();
    assert!(
        e.contains("global_rope = true has no effect") && e.contains("\"1:0\""),
        "{e}"
    );
    // Not a boolean: serde names the key and what it expected.
    let mut t: toml::Table = toml::from_str(&toml::to_string(&off).unwrap()).unwrap();
    t.insert("global_rope".into(), toml::Value::String("yes".into()));
    let e = toml::Value::Table(t)
        .try_into::<ModelConfig>()
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected a boolean"), "{e}");
}

#[test]
fn rla_seq_state_defaults_to_auto_is_written_only_when_set_and_bad_values_list_the_choices() {
    use model::config::SeqState;
    let auto = load("tiny");
    assert_eq!(auto.rla.seq_state, SeqState::Auto);
    assert_eq!(
        Model::new(auto.clone()).unwrap().rla_config().seq_state,
        SeqState::Auto
    );
    // Auto writes no key: the [model] text in checkpoints of default models is unchanged.
    let text = toml::to_string(&auto).unwrap();
    assert!(!text.contains("seq_state"), "{text}");
    let with = |v: &str| {
        let mut t: toml::Table = toml::from_str(&toml::to_string(&auto).unwrap()).unwrap();
        t.get_mut("rla")
            .and_then(|r| r.as_table_mut())
            .unwrap()
            .insert("seq_state".into(), toml::Value::String(v.into()));
        toml::Value::Table(t).try_into::<ModelConfig>()
    };
    for (s, want) in [
        ("auto", SeqState::Auto),
        ("kernel", SeqState::Kernel),
        ("hlo", SeqState::Hlo),
    ] {
        let cfg = with(s).unwrap();
        assert_eq!(cfg.rla.seq_state, want);
        // Model::rla_config passes it on to the blocks.
        assert_eq!(
            Model::new(cfg.clone()).unwrap().rla_config().seq_state,
            want
        );
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(
            text.lines().any(|l| l == format!("seq_state = \"{s}\"")),
            s != "auto",
            "{text}"
        );
        assert_eq!(toml::from_str::<ModelConfig>(&text).unwrap(), cfg);
    }
    let e = with("kernels").unwrap_err().to_string();
    assert!(
        e.contains("kernels") && e.contains("auto") && e.contains("kernel") && e.contains("hlo"),
        "{e}"
    );
}
