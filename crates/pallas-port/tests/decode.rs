//! The graph φ and the one-token decode step (`pallas_port::decode`) against the f64 reference,
//! run on the XLA CPU plugin; the lowering enum's config spellings and platform resolution.

mod common;

use common::{f32_shape, rel_err, run, Rng};
use hlo_builder::{Builder, Cmp, ElementType, Op};
use pallas_port::reference::{feature, rla_naive_f64, to_f64};
use pallas_port::{decode, feature_map, rla, FeatureMap, Lowering, RlaConfig, RlaDims};

#[test]
fn graph_feature_map_matches_the_f64_reference() {
    for fm in [FeatureMap::Softmax, FeatureMap::Relu] {
        let (rows, h) = (6, 8);
        let x = Rng::new(3).vec(rows * h, 3.0);
        let b = Builder::new("phi");
        let xp = b.parameter(f32_shape(&[2, 3, h]), "x").unwrap();
        let fx = feature_map(&b, xp, fm).unwrap();
        assert_eq!(b.shape(fx).unwrap().dims(), &[2, 3, 2 * h as i64]);
        let got = run(&b, fx, &[(&x, &[2, 3, h])]).remove(0);
        let want: Vec<f64> = to_f64(&x).chunks(h).flat_map(|r| feature(r, fm)).collect();
        let e = rel_err(&got, &want);
        assert!(e < 1e-6, "{fm}: φ relative error {e:.2e}");
    }
}

/// Absorbing the tokens one by one and reading each query gives the blocks' output at every
/// position (so for the last token too).
#[test]
fn absorb_then_read_matches_the_reference_rla() {
    for (fm, window) in [
        (FeatureMap::Softmax, 3),
        (FeatureMap::Relu, 0),
        (FeatureMap::Softmax, 20),
    ] {
        let d = RlaDims {
            batch: 2,
            seq: 9,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
        };
        let (t_, h) = (d.seq, d.head_dim);
        let mut rng = Rng::new(11 + window as u64);
        let (q, k, v) = (
            rng.vec(d.q_len(), 1.5),
            rng.vec(d.kv_len(), 1.5),
            rng.vec(d.kv_len(), 1.0),
        );
        let b = Builder::new("decode");
        let qp = b.parameter(f32_shape(&d.q_shape()), "q").unwrap();
        let kp = b.parameter(f32_shape(&d.kv_shape()), "k").unwrap();
        let vp = b.parameter(f32_shape(&d.kv_shape()), "v").unwrap();
        let kv_at = |x: Op, s: usize| -> Op {
            let one = b.slice_in_dim(x, s as i64, s as i64 + 1, 1).unwrap();
            b.reshape(one, &[2, 2, h as i64]).unwrap()
        };
        let mut state = b
            .zeros(ElementType::F32, &[2, 2, 2 * h as i64, h as i64])
            .unwrap();
        let mut outs = Vec::new();
        for t in 0..t_ {
            // The token leaving the window at step t is t − W − 1; before that, feed a real
            // token anyway so that a wrong `leaving` would show.
            let s = t.checked_sub(window + 1).unwrap_or(t);
            let pos = b.scalar(t as i32).unwrap();
            let leaving = b
                .compare(pos, b.scalar(window as i32 + 1).unwrap(), Cmp::Ge)
                .unwrap();
            state = decode::absorb(&b, state, kv_at(kp, s), kv_at(vp, s), leaving, fm).unwrap();
            let qt = b.slice_in_dim(qp, t as i64, t as i64 + 1, 1).unwrap();
            outs.push(decode::read(&b, qt, state, fm).unwrap());
        }
        let o = b.concatenate(&outs, 1).unwrap();
        let got = run(
            &b,
            o,
            &[(&q, &d.q_shape()), (&k, &d.kv_shape()), (&v, &d.kv_shape())],
        )
        .remove(0);
        let cfg = RlaConfig {
            window,
            sub_chunk: 1,
            chunk: 1,
            feature_map: fm,
            ..Default::default()
        };
        let want = rla_naive_f64(&cfg, &d, &to_f64(&q), &to_f64(&k), &to_f64(&v)).unwrap();
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "{fm} W={window}: decode relative error {e:.2e}");
        let last = d.q_len() - d.heads * h;
        let e_last = rel_err(&got[last..], &want[last..]);
        assert!(
            e_last < 1e-5,
            "{fm} W={window}: last token error {e_last:.2e}"
        );
    }
}

#[test]
fn decode_step_rejects_bad_shapes_naming_the_op() {
    let b = Builder::new("bad");
    let state = b.parameter(f32_shape(&[1, 2, 8, 4]), "s").unwrap();
    let k = b.parameter(f32_shape(&[1, 2, 4]), "k").unwrap();
    let k5 = b.parameter(f32_shape(&[1, 2, 5]), "k5").unwrap();
    let yes = b
        .compare(b.scalar(1i32).unwrap(), b.scalar(0i32).unwrap(), Cmp::Gt)
        .unwrap();
    let e = decode::absorb(&b, state, k5, k5, yes, FeatureMap::Relu).unwrap_err();
    assert!(e.to_string().contains("absorb"), "{e}");
    let not_pred = b.scalar(1i32).unwrap();
    let e = decode::absorb(&b, state, k, k, not_pred, FeatureMap::Relu).unwrap_err();
    assert!(e.to_string().contains("pred scalar"), "{e}");
    let q3 = b.parameter(f32_shape(&[1, 1, 3, 4]), "q3").unwrap();
    let e = decode::read(&b, q3, state, FeatureMap::Relu).unwrap_err();
    assert!(e.to_string().contains("read"), "{e}");
    assert!(e.to_string().contains("f32[1,1,3,4]"), "{e}");
}

#[test]
fn auto_resolves_from_the_named_platform_only() {
    assert_eq!(Lowering::Auto.for_platform("cpu"), Lowering::CustomCall);
    assert_eq!(Lowering::Auto.for_platform("Host"), Lowering::CustomCall);
    // TPU takes our Mosaic kernels (issue 14); the rest take HLO, CUDA too (the Triton kernels
    // of issue 15 are opt-in: at head dim 128 their backward overflows shared memory).
    assert_eq!(Lowering::Auto.for_platform("tpu"), Lowering::Mosaic);
    assert_eq!(Lowering::Auto.for_platform("TPU"), Lowering::Mosaic);
    for p in ["cuda", "CUDA", "gpu", "rocm", ""] {
        assert_eq!(Lowering::Auto.for_platform(p), Lowering::Hlo, "{p}");
    }
    for l in [
        Lowering::CustomCall,
        Lowering::Hlo,
        Lowering::Triton,
        Lowering::Mosaic,
    ] {
        assert_eq!(l.for_platform("cpu"), l);
        assert_eq!(l.for_platform("tpu"), l);
    }
}

#[test]
fn rla_refuses_an_unresolved_auto() {
    let b = Builder::new("auto");
    let q = b.parameter(f32_shape(&[1, 8, 2, 4]), "q").unwrap();
    let k = b.parameter(f32_shape(&[1, 8, 1, 4]), "k").unwrap();
    let cfg = RlaConfig {
        window: 2,
        sub_chunk: 4,
        chunk: 4,
        feature_map: FeatureMap::Softmax,
        ..Default::default()
    };
    let e = rla(&b, q, k, k, &cfg, Lowering::Auto)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Auto") && e.contains("for_platform"), "{e}");
    assert!(rla(&b, q, k, k, &cfg, Lowering::Auto.for_platform("rocm")).is_ok());
    // On TPU, auto means the Mosaic kernels, whose f32 tiles need multiples of 8: a clear error
    // pointing at the `hlo` fallback for this config (sub_chunk 4, head dim 4).
    let e = rla(&b, q, k, k, &cfg, Lowering::Auto.for_platform("tpu"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("sub_chunk = 4") && e.contains("\"hlo\""), "{e}");
}

#[test]
fn enums_use_the_model_config_spellings() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Rla {
        #[serde(default)]
        feature_map: FeatureMap,
        #[serde(default)]
        lowering: Lowering,
    }
    let parse = |s: &str| toml::from_str::<Rla>(s);
    for (text, fm, l) in [
        (
            "feature_map = \"softmax\"\nlowering = \"auto\"",
            FeatureMap::Softmax,
            Lowering::Auto,
        ),
        (
            "feature_map = \"relu\"\nlowering = \"custom_call\"",
            FeatureMap::Relu,
            Lowering::CustomCall,
        ),
        ("lowering = \"hlo\"", FeatureMap::Softmax, Lowering::Hlo),
        (
            "lowering = \"triton\"",
            FeatureMap::Softmax,
            Lowering::Triton,
        ),
        ("", FeatureMap::Softmax, Lowering::Auto),
    ] {
        let r = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(
            r,
            Rla {
                feature_map: fm,
                lowering: l
            },
            "{text:?}"
        );
        let back = toml::to_string(&r).unwrap();
        assert!(
            back.contains(fm.as_str()) && back.contains(l.as_str()),
            "{back}"
        );
    }
    for bad in [
        "lowering = \"Auto\"",
        "lowering = \"customcall\"",
        "feature_map = \"Softmax\"",
    ] {
        assert!(parse(bad).is_err(), "{bad:?} accepted");
    }
}
