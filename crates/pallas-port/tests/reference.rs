//! The f64 references checked against each other and against finite differences.

mod common;

use common::{dims, Rng};
use pallas_port::reference::{rla_naive_f64, rla_scan_f64, rla_vjp_f64, to_f64};
use pallas_port::{FeatureMap, RlaConfig};

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, &x| m.max(x.abs())).max(1e-300);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn naive_and_scan_agree_and_chunk_states_are_prefix_states() {
    for (fm, w) in [
        (FeatureMap::Softmax, 3),
        (FeatureMap::Relu, 0),
        (FeatureMap::Softmax, 11),
    ] {
        let d = dims(2, 23, 4, 2, 6);
        let cfg = RlaConfig {
            window: w,
            sub_chunk: 2,
            chunk: 4,
            feature_map: fm,
            ..Default::default()
        };
        let mut rng = Rng::new(7);
        let q = to_f64(&rng.vec(d.q_len(), 1.5));
        let k = to_f64(&rng.vec(d.kv_len(), 1.5));
        let v = to_f64(&rng.vec(d.kv_len(), 1.0));
        let naive = rla_naive_f64(&cfg, &d, &q, &k, &v).unwrap();
        let scan = rla_scan_f64(&cfg, &d, &q, &k, &v).unwrap();
        assert!(max_rel(&scan.o, &naive) < 1e-12, "{fm} w{w}");
        assert!(naive.iter().any(|&x| x != 0.0));
        // Rows t <= W are exactly zero.
        let row = d.heads * d.head_dim;
        for b in 0..d.batch {
            for t in 0..=w.min(d.seq - 1) {
                let s = (b * d.seq + t) * row;
                assert!(naive[s..s + row].iter().all(|&x| x == 0.0));
            }
        }
        // chunk_states[c] = Σ_{s <= c·chunk − W − 2} φ(k_s)ᵀ v_s: check via the final state of the
        // prefix of length c·chunk (which is exactly that sum).
        let (h, ss, nc) = (d.head_dim, 2 * d.head_dim * d.head_dim, d.n_chunks(&cfg));
        for c in 1..nc {
            let tp = c * cfg.chunk;
            let dp = dims(d.batch, tp, d.heads, d.kv_heads, h);
            let cut = |x: &[f64], hh: usize| -> Vec<f64> {
                (0..d.batch)
                    .flat_map(|b| x[b * d.seq * hh..(b * d.seq + tp) * hh].to_vec())
                    .collect()
            };
            let sp = rla_scan_f64(
                &cfg,
                &dp,
                &cut(&q, d.heads * h),
                &cut(&k, d.kv_heads * h),
                &cut(&v, d.kv_heads * h),
            )
            .unwrap();
            for bg in 0..d.batch * d.kv_heads {
                let got = &scan.chunk_states[(bg * nc + c) * ss..][..ss];
                let want = &sp.final_state[bg * ss..][..ss];
                assert!(
                    max_rel(got, want) < 1e-12
                        || want.iter().all(|&x| x == 0.0) && got.iter().all(|&x| x == 0.0)
                );
            }
        }
    }
}

#[test]
fn vjp_matches_finite_differences() {
    for (fm, w, d) in [
        (FeatureMap::Softmax, 1, dims(1, 9, 4, 2, 4)),
        (FeatureMap::Relu, 0, dims(2, 7, 2, 1, 3)),
        (FeatureMap::Softmax, 4, dims(1, 10, 2, 2, 5)),
    ] {
        let cfg = RlaConfig {
            window: w,
            sub_chunk: 1,
            chunk: 1,
            feature_map: fm,
            ..Default::default()
        };
        let mut rng = Rng::new(11 + w as u64);
        let q = to_f64(&rng.vec(d.q_len(), 1.5));
        let k = to_f64(&rng.vec(d.kv_len(), 1.5));
        let v = to_f64(&rng.vec(d.kv_len(), 1.0));
        let d_o = to_f64(&rng.vec(d.q_len(), 1.0));
        let g = rla_vjp_f64(&cfg, &d, &q, &k, &v, &d_o).unwrap();
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let o = rla_naive_f64(&cfg, &d, q, k, v).unwrap();
            o.iter().zip(&d_o).map(|(a, b)| a * b).sum()
        };
        let eps = 1e-6;
        let fd = |which: usize| -> Vec<f64> {
            let base = [q.clone(), k.clone(), v.clone()];
            (0..base[which].len())
                .map(|i| {
                    let mut p = base.clone();
                    let mut m = base.clone();
                    p[which][i] += eps;
                    m[which][i] -= eps;
                    (loss(&p[0], &p[1], &p[2]) - loss(&m[0], &m[1], &m[2])) / (2.0 * eps)
                })
                .collect()
        };
        for (name, which, got) in [("dq", 0, &g.dq), ("dk", 1, &g.dk), ("dv", 2, &g.dv)] {
            let want = fd(which);
            assert!(
                want.iter().any(|&x| x.abs() > 1e-3),
                "{fm} {name}: gradient is trivially zero"
            );
            let e = max_rel(got, &want);
            assert!(e < 1e-7, "{fm} w{w} {name}: rel err {e}");
        }
    }
}

#[test]
fn reference_rejects_bad_shapes() {
    let d = dims(1, 4, 3, 2, 2);
    let cfg = RlaConfig {
        window: 0,
        sub_chunk: 1,
        chunk: 2,
        feature_map: FeatureMap::Relu,
        ..Default::default()
    };
    let e = rla_naive_f64(&cfg, &d, &[0.0; 24], &[0.0; 16], &[0.0; 16]).unwrap_err();
    assert!(e.to_string().contains("rla_naive_f64"), "{e}");
    let d = dims(1, 4, 2, 1, 2);
    let e = rla_scan_f64(&cfg, &d, &[0.0; 15], &[0.0; 8], &[0.0; 8]).unwrap_err();
    assert!(
        e.to_string().contains("rla_scan_f64") && e.to_string().contains("`q`"),
        "{e}"
    );
}
