//! The fp32 kernels against the f64 references (naive O(T²) output and VJP, token-by-token scan
//! for the states). Errors are norm-relative: max |got − want| / max |want| per tensor.

mod common;

use common::{cfg, check_blocks, dims, h0_reference, rel_err, run_bwd, run_fwd, Rng};
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
        ..Default::default()
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

/// `rla_fwd_h0` / `rla_bwd_h0` against [`h0_reference`]; with `d_final` or without (zero).
fn check_h0(c: &Case, seed: u64, with_d_final: bool) {
    let (cfg, d) = (&c.cfg, &c.d);
    let mut rng = Rng::new(seed);
    let q = rng.vec(d.q_len(), 2.0);
    let k = rng.vec(d.kv_len(), 2.0);
    let v = rng.vec(d.kv_len(), 1.0);
    let h0 = rng.vec(d.final_state_len(), 1.0);
    let d_o = rng.vec(d.q_len(), 1.0);
    let d_f = if with_d_final {
        rng.vec(d.final_state_len(), 1.0)
    } else {
        vec![0.0; d.final_state_len()]
    };
    let mut o = vec![f32::NAN; d.q_len()];
    let mut cs = vec![f32::NAN; d.chunk_states_len(cfg)];
    let mut fs = vec![f32::NAN; d.final_state_len()];
    pallas_port::kernel::rla_fwd_h0(cfg, d, &q, &k, &v, &h0, &mut o, &mut cs, &mut fs).unwrap();
    let mut g: [Vec<f32>; 4] = [
        vec![f32::NAN; d.q_len()],
        vec![f32::NAN; d.kv_len()],
        vec![f32::NAN; d.kv_len()],
        vec![f32::NAN; d.final_state_len()],
    ];
    {
        let [dq, dk, dv, dh0] = &mut g;
        let df = with_d_final.then_some(d_f.as_slice());
        pallas_port::kernel::rla_bwd_h0(cfg, d, &q, &k, &v, &cs, &d_o, df, (dq, dk, dv), dh0)
            .unwrap();
    }
    let want = h0_reference(
        cfg,
        d,
        (&to_f64(&q), &to_f64(&k), &to_f64(&v)),
        &to_f64(&h0),
        &to_f64(&d_o),
        &to_f64(&d_f),
    );
    let tol = common::tol(cfg.feature_map);
    // Given the keys' contribution (rla_kv_state of the same k, v), o and chunk_states are the
    // same bits and the final state (derived from it when fewer keys follow it than the last
    // chunk scans) matches f64.
    let mut contrib = vec![f32::NAN; d.final_state_len()];
    pallas_port::kernel::rla_kv_state(cfg.feature_map, d, &k, &v, &mut contrib).unwrap();
    let (mut o_c, mut cs_c, mut fs_c) = (o.clone(), cs.clone(), vec![f32::NAN; fs.len()]);
    o_c.fill(f32::NAN);
    cs_c.fill(f32::NAN);
    let given = (&h0[..], &contrib[..]);
    pallas_port::kernel::rla_fwd_h0_with_contrib(
        cfg, d, &q, &k, &v, given, &mut o_c, &mut cs_c, &mut fs_c,
    )
    .unwrap();
    assert_eq!(
        (&o_c, &cs_c),
        (&o, &cs),
        "{d} {cfg:?}: o, chunk_states with contrib"
    );
    let e = rel_err(&fs_c, &want.fwd[2]);
    eprintln!("{d} {cfg:?}: final_state from contrib vs f64 {e:.2e}");
    assert!(
        e <= tol,
        "{d} {cfg:?}: final_state from contrib rel err {e}"
    );
    let got = [&o, &cs, &fs, &g[0], &g[1], &g[2], &g[3]];
    let wants = want.fwd.iter().chain(&want.grads);
    let names = ["o", "chunk_states", "final_state", "dq", "dk", "dv", "dh0"];
    for ((name, got), want) in names.iter().zip(got).zip(wants) {
        let e = rel_err(got, want);
        eprintln!("{d} {cfg:?} d_final {with_d_final}: {name} vs f64 {e:.2e}");
        assert!(
            e <= tol,
            "{d} {cfg:?}: {name} rel err {e} vs the f64 reference"
        );
    }
}

#[test]
fn scan_from_h0_matches_f64_with_its_gradients() {
    let gqa = (2, 37, 4, 2, 16);
    check_h0(&case(gqa, 5, 4, 8, FeatureMap::Softmax), 31, true);
    check_h0(&case(gqa, 5, 4, 8, FeatureMap::Relu), 32, false);
    check_h0(
        &case((1, 50, 3, 1, 16), 0, 8, 16, FeatureMap::Softmax),
        33,
        true,
    );
    // The shard shape of the sharded bench (window 0, 32 tokens, one chunk), head dim 64.
    check_h0(
        &case((2, 32, 4, 2, 64), 0, 16, 32, FeatureMap::Softmax),
        34,
        true,
    );
    // Relu, W = 2: the last chunk scans 5 keys, the contribution's tail is 3.
    check_h0(&case(gqa, 2, 4, 16, FeatureMap::Relu), 37, true);
    // W ≥ T: o is φ(q)·h0 only, the final state h0 (plus d_final's nothing on the keys).
    check_h0(
        &case((1, 20, 2, 1, 16), 25, 4, 8, FeatureMap::Softmax),
        35,
        true,
    );
}

#[test]
fn scan_from_a_zero_h0_equals_the_block() {
    let c = case((2, 37, 4, 2, 16), 3, 4, 8, FeatureMap::Softmax);
    let (cfg, d) = (&c.cfg, &c.d);
    let mut rng = Rng::new(36);
    let (q, k, v) = (
        rng.vec(d.q_len(), 2.0),
        rng.vec(d.kv_len(), 2.0),
        rng.vec(d.kv_len(), 1.0),
    );
    let d_o = rng.vec(d.q_len(), 1.0);
    let (o0, cs0, fs0) = run_fwd(cfg, d, &q, &k, &v);
    let (dq0, dk0, dv0) = run_bwd(cfg, d, &q, &k, &v, &cs0, &d_o);
    let zero = vec![0.0; d.final_state_len()];
    let mut o = vec![f32::NAN; d.q_len()];
    let mut cs = vec![f32::NAN; d.chunk_states_len(cfg)];
    let mut fs = vec![f32::NAN; d.final_state_len()];
    pallas_port::kernel::rla_fwd_h0(cfg, d, &q, &k, &v, &zero, &mut o, &mut cs, &mut fs).unwrap();
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; d.q_len()],
        vec![0.0; d.kv_len()],
        vec![0.0; d.kv_len()],
    );
    let mut dh0 = vec![f32::NAN; d.final_state_len()];
    let g = (&mut dq[..], &mut dk[..], &mut dv[..]);
    pallas_port::kernel::rla_bwd_h0(cfg, d, &q, &k, &v, &cs, &d_o, None, g, &mut dh0).unwrap();
    // Equal values (a zero state adds exact zeros; only the sign of a zero may differ).
    assert_eq!((o, cs, fs), (o0, cs0, fs0));
    assert_eq!((dq, dk, dv), (dq0, dk0, dv0));
    assert!(dh0.iter().all(|x| x.is_finite()) && dh0.iter().any(|&x| x != 0.0));
}

#[test]
fn kv_state_and_its_vjp_match_f64() {
    use pallas_port::kernel::{rla_kv_state, rla_kv_state_bwd};
    use pallas_port::reference::{feature, feature_vjp};
    // T = 300 spans three blocks of the kernel's 128 keys.
    for (fm, seed) in [(FeatureMap::Softmax, 41), (FeatureMap::Relu, 42)] {
        let d = dims(2, 300, 3, 3, 16);
        let (t_, g_, h) = (d.seq, d.kv_heads, d.head_dim);
        let mut rng = Rng::new(seed);
        let (k, v) = (rng.vec(d.kv_len(), 2.0), rng.vec(d.kv_len(), 1.0));
        let ds = rng.vec(d.final_state_len(), 1.0);
        let mut st = vec![f32::NAN; d.final_state_len()];
        rla_kv_state(fm, &d, &k, &v, &mut st).unwrap();
        let (mut dk, mut dv) = (vec![f32::NAN; d.kv_len()], vec![f32::NAN; d.kv_len()]);
        rla_kv_state_bwd(fm, &d, &k, &v, &ds, &mut dk, &mut dv).unwrap();
        let (kf, vf, dsf) = (to_f64(&k), to_f64(&v), to_f64(&ds));
        let mut st_ref = vec![0.0; st.len()];
        let (mut dk_ref, mut dv_ref) = (vec![0.0; dk.len()], vec![0.0; dv.len()]);
        for b in 0..d.batch {
            for gi in 0..g_ {
                let so = (b * g_ + gi) * 2 * h * h;
                for s in 0..t_ {
                    let ki = ((b * t_ + s) * g_ + gi) * h;
                    let fk = feature(&kf[ki..ki + h], fm);
                    let mut dfk = vec![0.0; 2 * h];
                    for a in 0..2 * h {
                        for c in 0..h {
                            st_ref[so + a * h + c] += fk[a] * vf[ki + c];
                            dfk[a] += vf[ki + c] * dsf[so + a * h + c];
                            dv_ref[ki + c] += fk[a] * dsf[so + a * h + c];
                        }
                    }
                    dk_ref[ki..ki + h].copy_from_slice(&feature_vjp(&kf[ki..ki + h], &dfk, fm));
                }
            }
        }
        for (name, got, want) in [
            ("state", &st, &st_ref),
            ("dk", &dk, &dk_ref),
            ("dv", &dv, &dv_ref),
        ] {
            let e = rel_err(got, want);
            eprintln!("kv_state {fm}: {name} vs f64 {e:.2e}");
            assert!(e <= common::tol(fm), "kv_state {fm}: {name} rel err {e}");
        }
    }
}
