//! The kernel language's RLA programs, run by the CPU interpreter, against the f64 reference
//! (naive O(T²) output and VJP, token-by-token scan for the states) and the CPU kernels.

mod common;

use common::{rel_err, run_bwd, run_fwd, Rng};
use pallas_port::lang::rla::{check_tiles, interpret_bwd, interpret_fwd};
use pallas_port::reference::{rla_naive_f64, rla_scan_f64, rla_vjp_f64, to_f64};
use pallas_port::{FeatureMap, RlaConfig, RlaDims};

fn tol(fm: FeatureMap) -> f64 {
    match fm {
        FeatureMap::Softmax => 1e-5,
        FeatureMap::Relu => 2e-5,
    }
}

fn check(d: RlaDims, cfg: RlaConfig, seed: u64) {
    let tag = format!("{d} {cfg:?}");
    let mut rng = Rng::new(seed);
    let q = rng.vec(d.q_len(), 2.0);
    let k = rng.vec(d.kv_len(), 2.0);
    let v = rng.vec(d.kv_len(), 1.0);
    let d_o = rng.vec(d.q_len(), 1.0);
    let (qf, kf, vf, dof) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&d_o));
    let t = tol(cfg.feature_map);

    let (o, cs, fs) = interpret_fwd(&cfg, &d, &q, &k, &v).expect("interpret_fwd");
    let o_ref = rla_naive_f64(&cfg, &d, &qf, &kf, &vf).unwrap();
    let scan = rla_scan_f64(&cfg, &d, &qf, &kf, &vf).unwrap();
    let (o_cpu, cs_cpu, fs_cpu) = run_fwd(&cfg, &d, &q, &k, &v);
    for (name, got, want, cpu) in [
        ("o", &o, &o_ref, &o_cpu),
        ("chunk_states", &cs, &scan.chunk_states, &cs_cpu),
        ("final_state", &fs, &scan.final_state, &fs_cpu),
    ] {
        let e = rel_err(got, want);
        let ec = rel_err(got, &to_f64(cpu));
        eprintln!("{tag}: {name} vs f64 {e:.2e}, vs CPU kernel {ec:.2e}");
        assert!(e <= t, "{tag}: {name} rel err {e} vs the f64 reference");
        assert!(ec <= t, "{tag}: {name} rel err {ec} vs the CPU kernel");
    }

    let (dq, dk, dv) = interpret_bwd(&cfg, &d, &q, &k, &v, &cs, &d_o).expect("interpret_bwd");
    let g = rla_vjp_f64(&cfg, &d, &qf, &kf, &vf, &dof).unwrap();
    let (dq_c, dk_c, dv_c) = run_bwd(&cfg, &d, &q, &k, &v, &cs_cpu, &d_o);
    for (name, got, want, cpu) in [
        ("dq", &dq, &g.dq, &dq_c),
        ("dk", &dk, &g.dk, &dk_c),
        ("dv", &dv, &g.dv, &dv_c),
    ] {
        let e = rel_err(got, want);
        let ec = rel_err(got, &to_f64(cpu));
        eprintln!("{tag}: {name} vs f64 {e:.2e}, vs CPU kernel {ec:.2e}");
        assert!(e <= t, "{tag}: {name} rel err {e} vs the f64 reference");
        assert!(ec <= t, "{tag}: {name} rel err {ec} vs the CPU kernel");
    }
    if cfg.window + 1 < d.seq {
        assert!(o_ref.iter().any(|&x| x != 0.0), "{tag}: trivial case");
    }
}

fn dims(batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize) -> RlaDims {
    RlaDims {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
    }
}

fn cfg(window: usize, sub_chunk: usize, chunk: usize, feature_map: FeatureMap) -> RlaConfig {
    RlaConfig {
        window,
        sub_chunk,
        chunk,
        feature_map,
    }
}

#[test]
fn interpreter_matches_reference_softmax() {
    // T not a multiple of the chunk; windows inside one sub-chunk, across chunks, beyond T.
    check(
        dims(2, 100, 4, 2, 16),
        cfg(5, 16, 32, FeatureMap::Softmax),
        1,
    );
    check(
        dims(1, 77, 2, 1, 16),
        cfg(40, 16, 48, FeatureMap::Softmax),
        2,
    );
    check(
        dims(1, 64, 2, 2, 32),
        cfg(0, 16, 16, FeatureMap::Softmax),
        3,
    );
    check(
        dims(1, 20, 1, 1, 16),
        cfg(30, 16, 32, FeatureMap::Softmax),
        4,
    );
}

#[test]
fn interpreter_matches_reference_relu() {
    check(dims(1, 90, 4, 1, 16), cfg(7, 16, 32, FeatureMap::Relu), 5);
}

#[test]
fn tiles_must_be_powers_of_two() {
    let e = check_tiles(&cfg(4, 24, 48, FeatureMap::Softmax), &dims(1, 8, 1, 1, 16))
        .unwrap_err()
        .to_string();
    assert!(e.contains("sub_chunk = 24"), "{e}");
    let e = check_tiles(&cfg(4, 16, 32, FeatureMap::Softmax), &dims(1, 8, 1, 1, 80))
        .unwrap_err()
        .to_string();
    assert!(e.contains("head_dim = 80"), "{e}");
}
