//! `RATTN_RLA_DOT_PRECISION`: the accepted values pick the kernels' matmul precision, anything
//! else is an error naming the variable and the accepted values. Its own test binary: the
//! variable is process-wide.

mod common;

use common::{cfg, dims};
use pallas_port::lang::rla::{dot_precision, fwd_kernels, DOT_PRECISION_VAR};
use pallas_port::lang::Precision;
use pallas_port::FeatureMap;

#[test]
fn unknown_precision_is_an_error() {
    let d = dims(1, 40, 2, 1, 16);
    let cfg = cfg(3, 16, 32, FeatureMap::Softmax);
    std::env::remove_var(DOT_PRECISION_VAR);
    assert_eq!(dot_precision().unwrap(), Precision::Ieee);
    for (v, p) in [
        ("ieee", Precision::Ieee),
        ("", Precision::Ieee),
        ("tf32", Precision::Tf32),
        ("tf32x3", Precision::Tf32x3),
    ] {
        std::env::set_var(DOT_PRECISION_VAR, v);
        assert_eq!(dot_precision().unwrap(), p, "{v:?}");
    }
    std::env::set_var(DOT_PRECISION_VAR, "TF32");
    let e = fwd_kernels(&cfg, &d).unwrap_err().to_string();
    std::env::remove_var(DOT_PRECISION_VAR);
    assert!(
        e.contains("RATTN_RLA_DOT_PRECISION=\"TF32\"")
            && e.contains("ieee (default), tf32x3, tf32"),
        "{e}"
    );
}
