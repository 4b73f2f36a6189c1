//! The parameter tree: names, shapes, initialisers and counts, without allocating anything.

use crate::config::{LayerKind, LocalKind, ModelConfig};

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every element is 1 (norm scales).
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f32),
}

/// One named parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Dotted name, e.g. `layers.3.attn.wq`.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Initialiser.
    pub init: Init,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The parameters of a model, in a fixed order (the order of the train step's arguments).
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let d = cfg.d_model;
    let std = 0.02f32;
    let out_std = std / (2.0 * cfg.layers as f32).sqrt();
    let mut v = Vec::new();
    let mut push =
        |name: String, shape: Vec<usize>, init: Init| v.push(ParamSpec { name, shape, init });
    push("embed".into(), vec![cfg.vocab, d], Init::Normal(std));
    let kinds = cfg.layer_kinds().unwrap_or_default();
    for (i, kind) in kinds.iter().enumerate() {
        let p = format!("layers.{i}");
        push(format!("{p}.attn_norm.scale"), vec![d], Init::Ones);
        push(
            format!("{p}.attn.wq"),
            vec![d, cfg.q_dim()],
            Init::Normal(std),
        );
        push(
            format!("{p}.attn.wk"),
            vec![d, cfg.kv_dim()],
            Init::Normal(std),
        );
        push(
            format!("{p}.attn.wv"),
            vec![d, cfg.kv_dim()],
            Init::Normal(std),
        );
        push(
            format!("{p}.attn.wo"),
            vec![cfg.q_dim(), d],
            Init::Normal(out_std),
        );
        if cfg.qk_norm {
            push(
                format!("{p}.attn.q_norm.scale"),
                vec![cfg.head_dim],
                Init::Ones,
            );
            push(
                format!("{p}.attn.k_norm.scale"),
                vec![cfg.head_dim],
                Init::Ones,
            );
        }
        if *kind == LayerKind::Local && cfg.local_kind == LocalKind::Rattention {
            push(
                format!("{p}.attn.swa_norm.scale"),
                vec![cfg.heads, cfg.head_dim],
                Init::Ones,
            );
            push(
                format!("{p}.attn.rla_norm.scale"),
                vec![cfg.heads, cfg.head_dim],
                Init::Ones,
            );
        }
        push(format!("{p}.ffn_norm.scale"), vec![d], Init::Ones);
        push(
            format!("{p}.ffn.w_gate"),
            vec![d, cfg.ffn_dim],
            Init::Normal(std),
        );
        push(
            format!("{p}.ffn.w_up"),
            vec![d, cfg.ffn_dim],
            Init::Normal(std),
        );
        push(
            format!("{p}.ffn.w_down"),
            vec![cfg.ffn_dim, d],
            Init::Normal(out_std),
        );
    }
    push("final_norm.scale".into(), vec![d], Init::Ones);
    if !cfg.tied_embeddings {
        push("lm_head".into(), vec![d, cfg.vocab], Init::Normal(std));
    }
    v
}

/// Total number of parameters.
pub fn param_count(cfg: &ModelConfig) -> usize {
    param_specs(cfg).iter().map(ParamSpec::numel).sum()
}

/// SplitMix64: a tiny counter-based generator, so initialisation depends only on (seed, name, index).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across platforms and Rust versions (unlike DefaultHasher).
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Deterministic host initialisation of one parameter from `seed`: the same (seed, name) always gives
/// the same values, whatever else the model contains.
pub fn init_param(spec: &ParamSpec, seed: u64) -> Vec<f32> {
    let n = spec.numel();
    match spec.init {
        Init::Ones => vec![1.0; n],
        Init::Normal(std) => {
            let base = splitmix64(seed ^ name_hash(&spec.name));
            (0..n)
                .map(|i| {
                    // Box–Muller on two 53-bit uniforms in (0, 1].
                    let a = splitmix64(base ^ (2 * i as u64));
                    let b = splitmix64(base ^ (2 * i as u64 + 1));
                    let u1 = ((a >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                    let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (z * std as f64) as f32
                })
                .collect()
        }
    }
}
