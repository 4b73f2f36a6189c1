//! Bad inputs give errors that name the op and the shapes; nothing panics.

use pallas_port::{kernel, FeatureMap, RlaConfig, RlaDims, RlaError};

fn setup() -> (RlaConfig, RlaDims) {
    (
        RlaConfig {
            window: 2,
            sub_chunk: 4,
            chunk: 8,
            feature_map: FeatureMap::Softmax,
            ..Default::default()
        },
        RlaDims {
            batch: 1,
            seq: 10,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        },
    )
}

fn fwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: usize,
    kv: usize,
    cs: usize,
    fs: usize,
) -> Result<(), RlaError> {
    let (qv, kk, vv) = (vec![0.0; q], vec![0.0; kv], vec![0.0; kv]);
    let mut o = vec![0.0; q];
    let (mut c, mut f) = (vec![0.0; cs], vec![0.0; fs]);
    kernel::rla_fwd(cfg, d, &qv, &kk, &vv, &mut o, &mut c, &mut f)
}

/// `rla_bwd` on zero inputs of lengths q, kv, kv, cs, q with outputs of lengths q, kv, dv.
fn bwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: usize,
    kv: usize,
    cs: usize,
    dv: usize,
) -> Result<(), RlaError> {
    let z = |n: usize| vec![0.0f32; n];
    let (mut dq, mut dk, mut dvv) = (z(q), z(kv), z(dv));
    kernel::rla_bwd(
        cfg,
        d,
        &z(q),
        &z(kv),
        &z(kv),
        &z(cs),
        &z(q),
        &mut dq,
        &mut dk,
        &mut dvv,
    )
}

#[test]
fn wrong_buffer_lengths_name_op_buffer_and_shape() {
    let (cfg, d) = setup();
    let (q, kv, cs, fs) = (
        d.q_len(),
        d.kv_len(),
        d.chunk_states_len(&cfg),
        d.final_state_len(),
    );
    assert_eq!(cs, 2 * 2 * 16 * 8);
    assert!(fwd(&cfg, &d, q, kv, cs, fs).is_ok());
    let e = fwd(&cfg, &d, q - 1, kv, cs, fs).unwrap_err().to_string();
    assert!(
        e.contains("rla_fwd") && e.contains("`q`") && e.contains("[1, 10, 4, 8]"),
        "{e}"
    );
    let e = fwd(&cfg, &d, q, kv, cs + 3, fs).unwrap_err().to_string();
    assert!(
        e.contains("chunk_states") && e.contains("[1, 2, 2, 16, 8]"),
        "{e}"
    );
    let e = fwd(&cfg, &d, q, kv, cs, fs - 1).unwrap_err().to_string();
    assert!(
        e.contains("final_state") && e.contains("[1, 2, 16, 8]"),
        "{e}"
    );

    let e = bwd(&cfg, &d, q, kv, cs, kv + 1).unwrap_err().to_string();
    assert!(
        e.contains("rla_bwd") && e.contains("`dv`") && e.contains("[1, 10, 2, 8]"),
        "{e}"
    );
    let e = bwd(&cfg, &d, q, kv, cs - 1, kv).unwrap_err().to_string();
    assert!(e.contains("rla_bwd") && e.contains("chunk_states"), "{e}");
}

#[test]
fn heads_not_multiple_of_kv_heads() {
    let (cfg, mut d) = setup();
    d.heads = 3;
    let e = fwd(
        &cfg,
        &d,
        d.q_len(),
        d.kv_len(),
        d.chunk_states_len(&cfg),
        d.final_state_len(),
    )
    .unwrap_err();
    assert!(matches!(e, RlaError::Dims { op: "rla_fwd", .. }), "{e:?}");
    assert!(
        e.to_string().contains("N=3") && e.to_string().contains("G=2"),
        "{e}"
    );
    assert!(d.validate().is_err());
    d.heads = 4;
    d.seq = 0;
    assert!(d.validate().is_err());
}

#[test]
fn chunk_not_multiple_of_sub_chunk() {
    let (mut cfg, d) = setup();
    cfg.chunk = 10;
    let e = fwd(
        &cfg,
        &d,
        d.q_len(),
        d.kv_len(),
        2 * 2 * 16 * 8,
        d.final_state_len(),
    )
    .unwrap_err();
    assert!(matches!(e, RlaError::Config { op: "rla_fwd", .. }), "{e:?}");
    assert!(e.to_string().contains("sub_chunk=4 chunk=10"), "{e}");
    assert!(cfg.validate().is_err());
    cfg.sub_chunk = 0;
    assert!(cfg.validate().is_err());
}

#[test]
fn feature_map_names_round_trip() {
    for fm in [FeatureMap::Softmax, FeatureMap::Relu] {
        assert_eq!(fm.to_string().parse::<FeatureMap>().unwrap(), fm);
    }
    assert_eq!("relu".parse::<FeatureMap>().unwrap(), FeatureMap::Relu);
    let e = "gelu".parse::<FeatureMap>().unwrap_err();
    assert!(e.to_string().contains("gelu"));
}
