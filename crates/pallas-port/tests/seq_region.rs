//! Exact sequence parallelism of the RLA blocks (`rla_in_region` with T cut), on 8 CPU devices
//! (`cpu_device_count = 8`): o, the gradients of q, k, v and final_state equal the f64 naive
//! formulas (independent of the kernels) and the 1-device program, for windows 0, below one
//! shard, above one shard (a halo over several shards) and beyond T; on a batch × seq × heads
//! mesh; and with the `while` lowering. With the custom-call lowering a shard runs the scan from
//! its prefix state in the kernels (`rla_with_state_h0`, `rla_kv_state`); the HLO composition
//! (`RlaConfig::seq_state` = `SeqState::Hlo`) is checked too, and `SeqState::Kernel` with
//! another lowering is refused.

use hlo_builder::{Builder, Op, Sharding};
use pallas_port::reference::{rla_naive_f64, rla_scan_f64, rla_vjp_f64, to_f64};
use pallas_port::{
    rla_in_region, rla_with_state, FeatureMap, Lowering, RlaConfig, RlaDims, SeqState,
};

mod common;

use common::{f32_shape, h0_reference, rel_err, spmd, Rng};

use spmd::DEVICES;

/// (o, dq, dk, dv, final_state) of `sum(o · w)` built in a region laid out by `s` on 8
/// devices, or without one on 1 device (`s = None`).
fn run(
    cfg: &RlaConfig,
    lowering: Lowering,
    s: Option<&Sharding>,
    inputs: &[Vec<f32>; 4],
    d: &RlaDims,
) -> (Vec<Vec<f32>>, String) {
    let qd = d.q_shape();
    let kd = d.kv_shape();
    let dims = [qd, kd, kd, qd];
    let b = Builder::new("seq_region");
    let p: Vec<Op> = dims
        .iter()
        .zip(["q", "k", "v", "w"])
        .map(|(d, n)| b.parameter(f32_shape(d), n).unwrap())
        .collect();
    let out = match s {
        Some(s) => {
            for &x in &p {
                b.set_sharding(x, s.clone()).unwrap();
            }
            rla_in_region(&b, (p[0], p[1], p[2]), cfg, lowering, s).unwrap()
        }
        None => rla_with_state(&b, p[0], p[1], p[2], cfg, lowering).unwrap(),
    };
    let l = b
        .reduce_sum(b.mul(out.o, p[3]).unwrap(), &[0, 1, 2, 3])
        .unwrap();
    let g = b.grad(l, &p[..3]).unwrap();
    let root = b
        .tuple(&[out.o, g[0], g[1], g[2], out.final_state])
        .unwrap();
    let state_sh =
        s.map(|s| pallas_port::seq::derived_sharding(s, &[Some(0), Some(2), None, None]));
    if let (Some(s), Some(st)) = (s, &state_sh) {
        b.set_sharding(
            root,
            Sharding::Tuple(vec![s.clone(), s.clone(), s.clone(), s.clone(), st.clone()]),
        )
        .unwrap();
    }
    let comp = b.build(root).unwrap();
    let n = if s.is_some() { DEVICES } else { 1 };
    let exe = spmd::compile(&comp, n);
    let hlo = spmd::optimized_hlo(&exe);
    let sh = s.cloned().unwrap_or(Sharding::Replicated);
    let st = state_sh.unwrap_or(Sharding::Replicated);
    let ins: Vec<(&[f32], &[usize], &Sharding)> = inputs
        .iter()
        .zip(&dims)
        .map(|(x, d)| (x.as_slice(), d.as_slice(), &sh))
        .collect();
    let out_dims = [qd, qd, kd, kd, d.final_state_shape()];
    let outs: Vec<(&[usize], &Sharding)> = out_dims
        .iter()
        .enumerate()
        .map(|(i, d)| (d.as_slice(), if i == 4 { &st } else { &sh }))
        .collect();
    (spmd::run(&exe, n, &ins, &outs), hlo)
}

/// Checks one layout and window against the f64 formulas and the 1-device program; returns
/// the optimized HLO of the sharded program.
fn check(s: &Sharding, window: usize, lowering: Lowering) -> String {
    check_with(s, window, lowering, SeqState::Auto)
}

/// [`check`] with the prefix-state composition `seq_state`.
fn check_with(s: &Sharding, window: usize, lowering: Lowering, seq_state: SeqState) -> String {
    let d = RlaDims {
        batch: 2,
        seq: 32,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let cfg = RlaConfig {
        window,
        sub_chunk: 4,
        chunk: 8,
        feature_map: FeatureMap::Softmax,
        seq_state,
    };
    let mut rng = Rng::new(5 + window as u64);
    let inputs = [
        rng.vec(d.q_len(), 1.0),
        rng.vec(d.kv_len(), 1.0),
        rng.vec(d.kv_len(), 1.0),
        rng.vec(d.q_len(), 1.0),
    ];
    let (sharded, hlo) = run(&cfg, lowering, Some(s), &inputs, &d);
    let (one, _) = run(&cfg, lowering, None, &inputs, &d);
    let (q, k, v, w) = (
        to_f64(&inputs[0]),
        to_f64(&inputs[1]),
        to_f64(&inputs[2]),
        to_f64(&inputs[3]),
    );
    let o = rla_naive_f64(&cfg, &d, &q, &k, &v).unwrap();
    let gr = rla_vjp_f64(&cfg, &d, &q, &k, &v, &w).unwrap();
    let fs = rla_scan_f64(&cfg, &d, &q, &k, &v).unwrap().final_state;
    let want = [o, gr.dq, gr.dk, gr.dv, fs];
    for (i, name) in ["o", "dq", "dk", "dv", "final_state"].iter().enumerate() {
        let e_ref = rel_err(&sharded[i], &want[i]);
        let e_one = rel_err(&sharded[i], &to_f64(&one[i]));
        eprintln!(
            "{lowering} W={window} {s:?}: {name}: vs f64 {e_ref:.1e}, vs 1 device {e_one:.1e}"
        );
        assert!(
            e_ref <= 1e-6,
            "W={window}: {name} differs from f64 by {e_ref:e}"
        );
        assert!(
            e_one <= 1e-6,
            "W={window}: {name} differs from 1 device by {e_one:e}"
        );
        if window < d.seq {
            assert!(want[i].iter().any(|&x| x != 0.0), "{name} is all zero");
        }
    }
    hlo
}

#[test]
fn rla_over_8_sequence_shards_is_exact_for_every_window() {
    let s = Sharding::tiled(&[1, 8, 1, 1]); // T = 32 in 8 shards of 4 tokens
                                            // W = 0: no halo, the prefix does everything; 3: a halo within one shard; 9: a halo over
                                            // three shards; 40 ≥ T: nothing is visible.
    let hlo = check(&s, 9, Lowering::CustomCall);
    assert!(
        hlo.contains("collective-permute"),
        "no halo permute:\n{hlo}"
    );
    assert!(hlo.contains("all-gather"), "no state gather");
    for w in [0, 3, 40] {
        check(&s, w, Lowering::CustomCall);
    }
}

#[test]
fn rla_over_batch_seq_and_heads_is_exact() {
    // batch 2 × seq 2 × kv heads 2; the `while` lowering too.
    let s = Sharding::tiled(&[2, 2, 2, 1]);
    check(&s, 20, Lowering::CustomCall);
    check(&s, 7, Lowering::Hlo);
}

#[test]
fn rla_over_4_sequence_shards_and_the_hlo_composition() {
    // batch 2 × seq 4 with W = 0 (no halo: the prefix state does everything) through the
    // kernels from h0 (2 shards with W beyond a shard: `rla_over_batch_seq_and_heads_is_exact`).
    let hlo = check(&Sharding::tiled(&[2, 4, 1, 1]), 0, Lowering::CustomCall);
    for target in ["rattention.rla_fwd_h0", "rattention.rla_kv_state_bwd"] {
        assert!(hlo.contains(target), "no {target} in:\n{hlo}");
    }
    // The composition in HLO (what the other lowerings build), selected in the config.
    let hlo = check_with(
        &Sharding::tiled(&[1, 4, 2, 1]),
        5,
        Lowering::CustomCall,
        SeqState::Hlo,
    );
    assert!(!hlo.contains("rla_fwd_h0") && hlo.contains("rattention.rla_fwd"));
    // Asked for explicitly, the kernels from h0 are what `Auto` builds with the custom call.
    let hlo = check_with(
        &Sharding::tiled(&[2, 4, 1, 1]),
        2,
        Lowering::CustomCall,
        SeqState::Kernel,
    );
    assert!(
        hlo.contains("rattention.rla_fwd_h0"),
        "no rla_fwd_h0 in:\n{hlo}"
    );
}

#[test]
fn kernel_seq_state_needs_the_custom_call_lowering() {
    let d = RlaDims {
        batch: 1,
        seq: 16,
        heads: 2,
        kv_heads: 1,
        head_dim: 8,
    };
    let cfg = RlaConfig {
        window: 2,
        sub_chunk: 4,
        chunk: 8,
        feature_map: FeatureMap::Softmax,
        seq_state: SeqState::Kernel,
    };
    let s = Sharding::tiled(&[1, 4, 1, 1]);
    let b = Builder::new("seq_state");
    let (qd, kd) = (d.q_shape(), d.kv_shape());
    let p: Vec<Op> = [(&qd, "q"), (&kd, "k"), (&kd, "v")]
        .iter()
        .map(|(d, n)| b.parameter(f32_shape(*d), n).unwrap())
        .collect();
    for &x in &p {
        b.set_sharding(x, s.clone()).unwrap();
    }
    let err = rla_in_region(&b, (p[0], p[1], p[2]), &cfg, Lowering::Hlo, &s)
        .err()
        .expect("seq_state = kernel with the hlo lowering must be refused")
        .to_string();
    assert!(
        err.contains("rla_seq_shard") && err.contains("kernel") && err.contains("lowering hlo"),
        "{err}"
    );
    assert_eq!("hlo".parse::<SeqState>().unwrap(), SeqState::Hlo);
    let bad = "kernels".parse::<SeqState>().unwrap_err().to_string();
    assert!(
        bad.contains("kernels") && bad.contains("auto, kernel or hlo"),
        "{bad}"
    );
}

/// `rla_with_state_h0` as a graph (custom calls through the FFI, on one device): o and
/// final_state, and the gradients of q, k, v, h0 of `Σ o·w + Σ final_state·wf` (the final
/// state's cotangent travels as the backward call's sixth operand) against the f64 formulas.
#[test]
fn scan_from_h0_in_a_graph_with_a_final_state_cotangent() {
    scan_from_h0_in_a_graph(false);
}

/// The same with the keys' contribution (`rla_kv_state` of k, v) given to the forward call
/// as its fifth operand: the final state derived from it (W = 3: 4 keys subtracted instead of
/// the last chunk's 8 scanned), and the gradients still exactly the scan's (the hint carries
/// no cotangent, so k and v are not counted twice).
#[test]
fn scan_from_h0_in_a_graph_given_the_keys_contribution() {
    scan_from_h0_in_a_graph(true);
}

fn scan_from_h0_in_a_graph(with_contrib: bool) {
    let d = RlaDims {
        batch: 2,
        seq: 24,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let cfg = RlaConfig {
        window: 3,
        sub_chunk: 4,
        chunk: 8,
        feature_map: FeatureMap::Softmax,
        ..Default::default()
    };
    let (qd, kd, sd) = (d.q_shape(), d.kv_shape(), d.final_state_shape());
    let dims: [&[usize]; 6] = [&qd, &kd, &kd, &sd, &qd, &sd];
    let b = Builder::new("h0");
    let p: Vec<Op> = dims
        .iter()
        .zip(["q", "k", "v", "h0", "w", "wf"])
        .map(|(d, n)| b.parameter(f32_shape(d), n).unwrap())
        .collect();
    let contrib =
        with_contrib.then(|| pallas_port::rla_kv_state(&b, p[1], p[2], cfg.feature_map).unwrap());
    let out = pallas_port::rla_with_state_h0(&b, (p[0], p[1], p[2]), p[3], contrib, &cfg).unwrap();
    let all = [0, 1, 2, 3];
    let l = b
        .add(
            b.reduce_sum(b.mul(out.o, p[4]).unwrap(), &all).unwrap(),
            b.reduce_sum(b.mul(out.final_state, p[5]).unwrap(), &all)
                .unwrap(),
        )
        .unwrap();
    let g = b.grad(l, &p[..4]).unwrap();
    let root = b
        .tuple(&[out.o, out.final_state, g[0], g[1], g[2], g[3]])
        .unwrap();
    let exe = spmd::compile(&b.build(root).unwrap(), 1);
    let mut rng = Rng::new(51);
    let scales = [2.0, 2.0, 1.0, 1.0, 1.0, 1.0];
    let inputs: Vec<Vec<f32>> = dims
        .iter()
        .zip(scales)
        .map(|(d, a)| rng.vec(d.iter().product(), a))
        .collect();
    let rep = Sharding::Replicated;
    let ins: Vec<(&[f32], &[usize], &Sharding)> = inputs
        .iter()
        .zip(dims)
        .map(|(x, d)| (x.as_slice(), d, &rep))
        .collect();
    let out_dims: [&[usize]; 6] = [&qd, &sd, &qd, &kd, &kd, &sd];
    let outs: Vec<(&[usize], &Sharding)> = out_dims.iter().map(|&d| (d, &rep)).collect();
    let got = spmd::run(&exe, 1, &ins, &outs);
    let f = |i: usize| to_f64(&inputs[i]);
    let want = h0_reference(&cfg, &d, (&f(0), &f(1), &f(2)), &f(3), &f(4), &f(5));
    let wants = [
        &want.fwd[0],
        &want.fwd[2],
        &want.grads[0],
        &want.grads[1],
        &want.grads[2],
        &want.grads[3],
    ];
    for ((name, got), want) in ["o", "final_state", "dq", "dk", "dv", "dh0"]
        .iter()
        .zip(&got)
        .zip(wants)
    {
        let e = rel_err(got, want);
        eprintln!("rla_with_state_h0 (contrib given: {with_contrib}): {name} vs f64 {e:.1e}");
        assert!(e <= 1e-6, "{name} differs from f64 by {e:e}");
    }
}
