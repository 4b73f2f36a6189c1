//! The f64 reference (written from DESIGN §2) against AXLearn's own numbers: this checks the
//! reference, which the graph tests then trust.

use model::reference::local_layer;
use ndarray::ArrayD;
use ndarray_npy::NpzReader;

mod common;
use common::{axlearn_case, AXLEARN_CASES};

fn arr(z: &mut NpzReader<std::fs::File>, k: &str) -> Vec<f64> {
    let a: ArrayD<f32> = z.by_name(k).unwrap();
    a.iter().map(|&x| x as f64).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn reference_local_layer_matches_axlearn() {
    for (file, fm) in AXLEARN_CASES {
        let (mut z, d, window) = axlearn_case(file);
        let (q, k, v) = (arr(&mut z, "q"), arr(&mut z, "k"), arr(&mut z, "v"));
        let out = local_layer(&q, &k, &v, d, window, 5e5, fm);
        let e_swa = max_abs_diff(&out.swa, &arr(&mut z, "swa_out"));
        let e_rla = max_abs_diff(&out.rla, &arr(&mut z, "rla_out"));
        let e_mix = max_abs_diff(&out.mixed, &arr(&mut z, "local_out"));
        assert!(e_swa < 1e-5, "{file}: swa {e_swa}");
        assert!(e_rla < 2e-4, "{file}: rla {e_rla}");
        assert!(e_mix < 1e-4, "{file}: local {e_mix}");
    }
}
