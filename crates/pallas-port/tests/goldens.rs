//! AXLearn's own RLA numbers (tests/data/axlearn_rla_*.npz, see tests/data/README.md).

mod common;

use std::fs::File;
use std::path::PathBuf;

use common::{abs_err, run_bwd, run_fwd};
use ndarray::{ArrayD, Ix1};
use ndarray_npy::NpzReader;
use pallas_port::{FeatureMap, RlaConfig, RlaDims};

fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

struct Golden {
    npz: NpzReader<File>,
}

impl Golden {
    fn open(name: &str) -> Self {
        let f = File::open(data_path(name)).unwrap_or_else(|e| panic!("open {name}: {e}"));
        Golden {
            npz: NpzReader::new(f).expect("npz"),
        }
    }
    fn f32(&mut self, key: &str) -> Vec<f32> {
        let a: ArrayD<f32> = self
            .npz
            .by_name(key)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        a.as_standard_layout().iter().copied().collect()
    }
    fn config(&mut self) -> Vec<i64> {
        let a: ndarray::Array<i64, Ix1> = self.npz.by_name("config").expect("config");
        a.to_vec()
    }
}

fn check_golden(name: &str, fm: FeatureMap, tol: f64, sub_chunks: &[(usize, usize)]) {
    let mut g = Golden::open(name);
    // config = [batch, heads, kv_heads, seq, head_dim, window, chunk, seed]
    let c = g.config();
    let d = RlaDims {
        batch: c[0] as usize,
        heads: c[1] as usize,
        kv_heads: c[2] as usize,
        seq: c[3] as usize,
        head_dim: c[4] as usize,
    };
    let window = c[5] as usize;
    let (q, k, v) = (g.f32("q"), g.f32("k"), g.f32("v"));
    let (rla_out, final_ax) = (g.f32("rla_out"), g.f32("rla_final_state"));
    let (cot, dq_ax, dk_ax, dv_ax) = (
        g.f32("d_rla_cot"),
        g.f32("rla_dq"),
        g.f32("rla_dk"),
        g.f32("rla_dv"),
    );
    let ss = 2 * d.head_dim * d.head_dim;
    for &(sub_chunk, chunk) in sub_chunks {
        let cfg = RlaConfig {
            window,
            sub_chunk,
            chunk,
            feature_map: fm,
            ..Default::default()
        };
        let tag = format!("{name} C={sub_chunk} chunk={chunk}");
        let (o, cs, fs) = run_fwd(&cfg, &d, &q, &k, &v);
        let e = abs_err(&o, &rla_out);
        assert!(e <= tol, "{tag}: rla_out abs err {e}");
        assert!(
            rla_out.iter().any(|&x| x.abs() > 1e-3),
            "{tag}: trivial golden"
        );
        // AXLearn keeps the state per query head [B, N, 2H, H]; ours is per kv head.
        let r = d.heads / d.kv_heads;
        for b in 0..d.batch {
            for n in 0..d.heads {
                let want = &final_ax[(b * d.heads + n) * ss..][..ss];
                let got = &fs[(b * d.kv_heads + n / r) * ss..][..ss];
                let e = abs_err(got, want);
                let scale = want.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
                assert!(
                    e <= tol * scale.max(1.0),
                    "{tag}: final_state b{b} n{n} abs err {e} (scale {scale})"
                );
            }
        }
        let (dq, dk, dv) = run_bwd(&cfg, &d, &q, &k, &v, &cs, &cot);
        for (gname, got, want) in [
            ("rla_dq", &dq, &dq_ax),
            ("rla_dk", &dk, &dk_ax),
            ("rla_dv", &dv, &dv_ax),
        ] {
            let e = abs_err(got, want);
            assert!(e <= tol, "{tag}: {gname} abs err {e}");
        }
    }
}

#[test]
fn axlearn_softmax_gqa_w37() {
    check_golden(
        "axlearn_rla_softmax_gqa_w37.npz",
        FeatureMap::Softmax,
        1e-5,
        &[(8, 32), (16, 64), (7, 21), (200, 200)],
    );
}

#[test]
fn axlearn_relu_mqa_w0() {
    check_golden(
        "axlearn_rla_relu_mqa_w0.npz",
        FeatureMap::Relu,
        2e-4,
        &[(8, 32), (5, 15), (96, 96)],
    );
}
