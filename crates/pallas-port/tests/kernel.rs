//! The fp32 kernels against the f64 references (naive O(T²) output and VJP, token-by-token scan
//! for the states). Errors are norm-relative: max |got − want| / max |want| per tensor.

mod common;

use common::{cfg, check_blocks, dims, rel_err, run_bwd, run_fwd, Rng};
use pallas_port::reference::to_f64;
use pallas_port::{FeatureMap, RlaConfig, RlaDims};

struct Case {
    d: RlaDims,
    cfg: RlaConfig,
}

fn case(
    (batch, seq, heads, kv_heads, head_dim): (usize, usize, usize, usize, usize),
    window: usize,
    sub_chunk: usize,
    chunk: usize,
    feature_map: FeatureMap,
) -> Case {
    Case {
        d: dims(batch, seq, heads, kv_heads, head_dim),
        cfg: cfg(window, sub_chunk, chunk, feature_map),
    }
}

/// The CPU kernels against the f64 references ([`check_blocks`] with the kernels themselves as
/// the implementation).
fn check(c: &Case, seed: u64) {
    let (cfg, d) = (&c.cfg, &c.d);
    check_blocks(
        &format!("{d} {cfg:?}"),
        d,
        cfg,
        seed,
        |q, k, v| run_fwd(cfg, d, q, k, v),
        |q, k, v, cs, d_o| run_bwd(cfg, d, q, k, v, cs, d_o),
    );
}

#[test]
fn gqa_softmax_window_not_multiple_of_sub_chunk_t_not_multiple_of_chunk() {
    check(&case((2, 37, 4, 2, 16), 5, 4, 8, FeatureMap::Softmax), 1);
}

#[test]
fn gqa_relu() {
    check(&case((2, 37, 4, 2, 16), 5, 4, 8, FeatureMap::Relu), 2);
}

#[test]
fn mqa_window_zero_both_feature_maps() {
    check(&case((1, 50, 3, 1, 16), 0, 8, 16, FeatureMap::Relu), 3);
    check(&case((1, 50, 3, 1, 16), 0, 8, 16, FeatureMap::Softmax), 4);
}

#[test]
fn window_one_head_dim_64() {
    check(&case((1, 40, 2, 2, 64), 1, 8, 24, FeatureMap::Softmax), 5);
    check(&case((1, 40, 4, 1, 64), 1, 8, 24, FeatureMap::Relu), 6);
}

#[test]
fn head_dim_128() {
    check(&case((1, 24, 2, 1, 128), 3, 8, 16, FeatureMap::Softmax), 7);
    check(&case((1, 21, 2, 2, 128), 2, 4, 8, FeatureMap::Relu), 8);
}

#[test]
fn sub_chunk_equals_chunk_and_chunk_longer_than_sequence() {
    check(&case((1, 30, 2, 1, 16), 7, 6, 6, FeatureMap::Softmax), 9);
    check(&case((2, 30, 2, 1, 16), 7, 16, 64, FeatureMap::Softmax), 10);
    check(&case((1, 30, 2, 1, 16), 2, 1, 3, FeatureMap::Relu), 11);
}

#[test]
fn window_large_relative_to_sequence() {
    // Only the last query sees one key.
    check(&case((1, 20, 2, 1, 16), 18, 4, 8, FeatureMap::Softmax), 12);
    // W >= T: everything is zero, including the states.
    for w in [19, 20, 1000] {
        let c = case((1, 20, 2, 1, 16), w, 4, 8, FeatureMap::Softmax);
        check(&c, 13);
        let mut rng = Rng::new(14);
        let q = rng.vec(c.d.q_len(), 1.0);
        let k = rng.vec(c.d.kv_len(), 1.0);
        let v = rng.vec(c.d.kv_len(), 1.0);
        let (o, cs, fs) = run_fwd(&c.cfg, &c.d, &q, &k, &v);
        assert!(o.iter().chain(&cs).chain(&fs).all(|&x| x == 0.0), "w{w}");
        let (dq, dk, dv) = run_bwd(&c.cfg, &c.d, &q, &k, &v, &cs, &q);
        assert!(dq.iter().chain(&dk).chain(&dv).all(|&x| x == 0.0), "w{w}");
    }
}

#[test]
fn results_do_not_depend_on_sub_chunk_or_chunk() {
    let d = RlaDims {
        batch: 1,
        seq: 45,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
    };
    let mut rng = Rng::new(15);
    let q = rng.vec(d.q_len(), 2.0);
    let k = rng.vec(d.kv_len(), 2.0);
    let v = rng.vec(d.kv_len(), 1.0);
    let d_o = rng.vec(d.q_len(), 1.0);
    let base = RlaConfig {
        window: 6,
        sub_chunk: 45,
        chunk: 45,
        feature_map: FeatureMap::Softmax,
    };
    let (o0, _, f0) = run_fwd(&base, &d, &q, &k, &v);
    let (_, cs0, _) = run_fwd(&base, &d, &q, &k, &v);
    let (dq0, dk0, dv0) = run_bwd(&base, &d, &q, &k, &v, &cs0, &d_o);
    for (sc, ch) in [(1, 1), (3, 9), (5, 10), (8, 8), (64, 128)] {
        let cfg = RlaConfig {
            sub_chunk: sc,
            chunk: ch,
            ..base
        };
        let (o, cs, f) = run_fwd(&cfg, &d, &q, &k, &v);
        let (dq, dk, dv) = run_bwd(&cfg, &d, &q, &k, &v, &cs, &d_o);
        for (name, a, b) in [
            ("o", &o, &o0),
            ("final", &f, &f0),
            ("dq", &dq, &dq0),
            ("dk", &dk, &dk0),
            ("dv", &dv, &dv0),
        ] {
            let e = rel_err(a, &to_f64(b));
            assert!(e < 1e-5, "C={sc} chunk={ch} {name}: {e}");
        }
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_small_shapes_match_reference(
            batch in 1usize..3,
            seq in 1usize..40,
            kv_heads in 1usize..3,
            group in 1usize..4,
            head_dim in 1usize..12,
            window in 0usize..45,
            sub_chunk in 1usize..9,
            chunk_mul in 1usize..4,
            relu in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let fm = if relu { FeatureMap::Relu } else { FeatureMap::Softmax };
            let c = case((batch, seq, kv_heads * group, kv_heads, head_dim), window, sub_chunk, sub_chunk * chunk_mul, fm);
            check(&c, seed);
        }
    }
}
