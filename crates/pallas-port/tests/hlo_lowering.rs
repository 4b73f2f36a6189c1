//! The pure-HLO lowering of the RLA blocks (`pallas_port::hlo`), run on the XLA CPU plugin and
//! compared with the f64 reference (`pallas_port::reference`) and with the CPU kernels
//! (`pallas_port::kernel`) on the same inputs.

use hlo_builder::{Builder, ElementType, Op, Shape};
use pallas_port::hlo::{rla_bwd_hlo, rla_fwd_hlo};
use pallas_port::reference::{rla_naive_f64, rla_scan_f64, rla_vjp_f64, to_f64};
use pallas_port::{FeatureMap, RlaConfig, RlaDims};

mod common;

use common::{f32_shape, rel_err, run, run_bwd, run_fwd, Rng};

/// DESIGN §7: fp32 paths within 1e-5 of the f64 reference (norm-relative).
const TOL: f64 = 1e-5;

fn check(what: &str, case: &str, got: &[f32], want: &[f64]) {
    let e = rel_err(got, want);
    eprintln!("{case}: {what} rel err {e:.2e}");
    assert!(e <= TOL, "{case}: {what} relative error {e:.3e} > {TOL:e}");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{case}: {what} has non-finite values"
    );
}

fn check_f32(what: &str, case: &str, got: &[f32], want: &[f32]) {
    check(what, case, got, &to_f64(want));
}

struct Case {
    d: RlaDims,
    cfg: RlaConfig,
    /// Feed q/k/v/d_o to the block as bf16 (the host data is rounded to bf16 first).
    bf16: bool,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        b: usize,
        t: usize,
        n: usize,
        g: usize,
        h: usize,
        w: usize,
        c: usize,
        l: usize,
        fm: FeatureMap,
    ) -> Case {
        Case {
            d: RlaDims {
                batch: b,
                seq: t,
                heads: n,
                kv_heads: g,
                head_dim: h,
            },
            cfg: RlaConfig {
                window: w,
                sub_chunk: c,
                chunk: l,
                feature_map: fm,
                ..Default::default()
            },
            bf16: false,
        }
    }

    fn name(&self) -> String {
        format!(
            "{} W={} C={} L={} {}{}",
            self.d,
            self.cfg.window,
            self.cfg.sub_chunk,
            self.cfg.chunk,
            self.cfg.feature_map,
            if self.bf16 { " bf16" } else { "" }
        )
    }

    fn param(&self, b: &Builder, dims: &[usize], name: &str) -> Op {
        let p = b.parameter(f32_shape(dims), name).expect("parameter");
        if self.bf16 {
            b.convert(p, ElementType::Bf16).expect("convert")
        } else {
            p
        }
    }
}

fn round_bf16(x: &mut [f32]) {
    for v in x {
        *v = half::bf16::from_f32(*v).to_f32();
    }
}

/// Runs the forward and backward lowerings for one case and checks every output against the f64
/// reference and the CPU kernel.
fn check_case(case: &Case, seed: u64) {
    let (d, cfg) = (&case.d, &case.cfg);
    let name = case.name();
    let mut rng = Rng::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
    // Scale 2 gives the softmax feature map peaked, not flat, rows.
    let mut q = rng.vec(d.q_len(), 2.0);
    let mut k = rng.vec(d.kv_len(), 2.0);
    let mut v = rng.vec(d.kv_len(), 1.0);
    let mut d_o = rng.vec(d.q_len(), 1.0);
    if case.bf16 {
        for x in [&mut q, &mut k, &mut v, &mut d_o] {
            round_bf16(x);
        }
    }
    let (qs, kvs, css) = (d.q_shape(), d.kv_shape(), d.chunk_states_shape(cfg));

    // Forward.
    let b = Builder::new("rla_fwd_test");
    let (qp, kp, vp) = (
        case.param(&b, &qs, "q"),
        case.param(&b, &kvs, "k"),
        case.param(&b, &kvs, "v"),
    );
    let root = rla_fwd_hlo(&b, qp, kp, vp, cfg).expect("rla_fwd_hlo");
    let outs = run(&b, root, &[(&q, &qs), (&k, &kvs), (&v, &kvs)]);
    assert_eq!(outs.len(), 3, "{name}: forward returns 3 buffers");
    let (o, cs, fs) = (&outs[0], &outs[1], &outs[2]);
    assert_eq!(
        cs.len(),
        d.chunk_states_len(cfg),
        "{name}: chunk_states length"
    );
    assert_eq!(fs.len(), d.final_state_len(), "{name}: final_state length");

    let (q64, k64, v64, do64) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&d_o));
    let scan = rla_scan_f64(cfg, d, &q64, &k64, &v64).expect("reference scan");
    let naive = rla_naive_f64(cfg, d, &q64, &k64, &v64).expect("reference naive");
    check("o (vs scan)", &name, o, &scan.o);
    check("o (vs naive)", &name, o, &naive);
    check("chunk_states", &name, cs, &scan.chunk_states);
    check("final_state", &name, fs, &scan.final_state);

    let (ko, kcs, kfs) = run_fwd(cfg, d, &q, &k, &v);
    check_f32("o (vs kernel)", &name, o, &ko);
    check_f32("chunk_states (vs kernel)", &name, cs, &kcs);
    check_f32("final_state (vs kernel)", &name, fs, &kfs);

    // Backward, fed the lowering's own chunk_states.
    let b = Builder::new("rla_bwd_test");
    let (qp, kp, vp) = (
        case.param(&b, &qs, "q"),
        case.param(&b, &kvs, "k"),
        case.param(&b, &kvs, "v"),
    );
    let csp = b
        .parameter(f32_shape(&css), "chunk_states")
        .expect("parameter");
    let dop = case.param(&b, &qs, "d_o");
    let root = rla_bwd_hlo(&b, qp, kp, vp, csp, dop, cfg).expect("rla_bwd_hlo");
    let outs = run(
        &b,
        root,
        &[(&q, &qs), (&k, &kvs), (&v, &kvs), (cs, &css), (&d_o, &qs)],
    );
    assert_eq!(outs.len(), 3, "{name}: backward returns 3 buffers");
    let (dq, dk, dv) = (&outs[0], &outs[1], &outs[2]);
    let grads = rla_vjp_f64(cfg, d, &q64, &k64, &v64, &do64).expect("reference vjp");
    check("dq", &name, dq, &grads.dq);
    check("dk", &name, dk, &grads.dk);
    check("dv", &name, dv, &grads.dv);

    let (kdq, kdk, kdv) = run_bwd(cfg, d, &q, &k, &v, &kcs, &d_o);
    check_f32("dq (vs kernel)", &name, dq, &kdq);
    check_f32("dk (vs kernel)", &name, dk, &kdk);
    check_f32("dv (vs kernel)", &name, dv, &kdv);
}

use FeatureMap::{Relu, Softmax};

#[test]
fn gqa_softmax_window_not_multiple_of_sub_chunk() {
    // N=4, G=2; W=5 (shift 6, not a multiple of C=4); T=45 not a multiple of the chunk 12.
    check_case(&Case::new(2, 45, 4, 2, 16, 5, 4, 12, Softmax), 1);
}

#[test]
fn mqa_relu_window_37() {
    // MQA (G=1, three query heads); W=37 is not a multiple of C=8; T=70 not a multiple of 16.
    check_case(&Case::new(1, 70, 3, 1, 16, 37, 8, 16, Relu), 2);
}

#[test]
fn gqa_softmax_h64_window_37() {
    check_case(&Case::new(1, 100, 4, 2, 64, 37, 16, 32, Softmax), 3);
}

#[test]
fn windows_0_and_1() {
    check_case(&Case::new(1, 33, 4, 2, 16, 0, 4, 8, Softmax), 4);
    check_case(&Case::new(2, 40, 2, 2, 64, 1, 8, 16, Relu), 5);
}

#[test]
fn window_at_or_beyond_t() {
    // W ≥ T and W = T − 1: no key is ever visible, every output and state is zero.
    check_case(&Case::new(1, 20, 4, 2, 16, 64, 4, 8, Softmax), 6);
    check_case(&Case::new(1, 20, 2, 1, 16, 19, 4, 8, Relu), 7);
    // W = T − 2: exactly one (key, query) pair.
    check_case(&Case::new(1, 20, 2, 1, 16, 18, 4, 8, Softmax), 8);
}

#[test]
fn one_sub_chunk_per_chunk_and_t_shorter_than_chunk() {
    // chunk == sub_chunk (no prefix sum inside a chunk), and a single padded chunk.
    check_case(&Case::new(1, 30, 4, 1, 16, 3, 8, 8, Relu), 9);
    check_case(&Case::new(2, 13, 4, 2, 16, 2, 4, 32, Softmax), 10);
}

#[test]
fn bf16_inputs() {
    let mut c = Case::new(1, 36, 4, 2, 16, 6, 4, 12, Softmax);
    c.bf16 = true;
    check_case(&c, 11);
}

#[test]
fn errors_name_the_op_and_shapes() {
    let b = Builder::new("bad");
    let f = |d: &[i64], n: &str| b.parameter(Shape::array(ElementType::F32, d), n).unwrap();
    let cfg = RlaConfig {
        window: 3,
        sub_chunk: 4,
        chunk: 8,
        feature_map: Softmax,
        ..Default::default()
    };
    let (q, k, v) = (
        f(&[1, 8, 3, 16], "q"),
        f(&[1, 8, 2, 16], "k"),
        f(&[1, 8, 2, 16], "v"),
    );
    let e = rla_fwd_hlo(&b, q, k, v, &cfg).unwrap_err().to_string();
    assert!(
        e.contains("rla_fwd_hlo") && e.contains("f32[1,8,3,16]"),
        "{e}"
    );

    let (q, k, v) = (
        f(&[1, 8, 4, 16], "q"),
        f(&[1, 8, 2, 16], "k"),
        f(&[1, 8, 2, 16], "v"),
    );
    let bad = RlaConfig { chunk: 6, ..cfg };
    let e = rla_fwd_hlo(&b, q, k, v, &bad).unwrap_err().to_string();
    assert!(e.contains("rla_fwd_hlo") && e.contains("chunk=6"), "{e}");

    let cs = f(&[1, 2, 2, 32, 16], "cs");
    let d_o = f(&[1, 8, 4, 16], "d_o");
    let e = rla_bwd_hlo(&b, q, k, v, cs, d_o, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rla_bwd_hlo") && e.contains("chunk_states"),
        "{e}"
    );
    let cs = f(&[1, 2, 1, 32, 16], "cs");
    assert!(rla_bwd_hlo(&b, q, k, v, cs, d_o, &cfg).is_ok());
}

#[test]
fn lowering_is_one_while_over_chunks() {
    let b = Builder::new("structure");
    let q = b
        .parameter(Shape::array(ElementType::F32, &[1, 64, 4, 16]), "q")
        .unwrap();
    let k = b
        .parameter(Shape::array(ElementType::F32, &[1, 64, 2, 16]), "k")
        .unwrap();
    let v = b
        .parameter(Shape::array(ElementType::F32, &[1, 64, 2, 16]), "v")
        .unwrap();
    let cfg = RlaConfig {
        window: 7,
        sub_chunk: 8,
        chunk: 32,
        feature_map: Softmax,
        ..Default::default()
    };
    let root = rla_fwd_hlo(&b, q, k, v, &cfg).unwrap();
    let text = b.build(root).unwrap().to_text();
    assert_eq!(text.matches(" while(").count(), 1, "{text}");
    assert!(text.contains("dynamic-update-slice("), "{text}");
}
