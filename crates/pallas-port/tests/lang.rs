//! The kernel language's RLA programs, run by the CPU interpreter, against the f64 reference
//! (naive O(T²) output and VJP, token-by-token scan for the states) and the CPU kernels.

mod common;

use common::{rel_err, run_bwd, run_fwd, Rng};
use pallas_port::lang::rla::{
    check_tiles, interpret_bwd_tiled, interpret_fwd_tiled, tile_rows, value_block,
};
use pallas_port::reference::{rla_naive_f64, rla_scan_f64, rla_vjp_f64, to_f64};
use pallas_port::{FeatureMap, RlaConfig, RlaDims};

fn tol(fm: FeatureMap) -> f64 {
    match fm {
        FeatureMap::Softmax => 1e-5,
        FeatureMap::Relu => 2e-5,
    }
}

fn check(d: RlaDims, cfg: RlaConfig, seed: u64) {
    check_tiled(d, cfg, value_block(d.head_dim), seed)
}

/// [`check`] with the kernels split into value blocks of `vb` columns.
fn check_tiled(d: RlaDims, cfg: RlaConfig, vb: usize, seed: u64) {
    let tag = format!("{d} {cfg:?} value block {vb}");
    let mut rng = Rng::new(seed);
    let q = rng.vec(d.q_len(), 2.0);
    let k = rng.vec(d.kv_len(), 2.0);
    let v = rng.vec(d.kv_len(), 1.0);
    let d_o = rng.vec(d.q_len(), 1.0);
    let (qf, kf, vf, dof) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&d_o));
    let t = tol(cfg.feature_map);

    let (o, cs, fs) = interpret_fwd_tiled(&cfg, &d, vb, &q, &k, &v).expect("interpret_fwd");
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

    let (dq, dk, dv) =
        interpret_bwd_tiled(&cfg, &d, vb, &q, &k, &v, &cs, &d_o).expect("interpret_bwd");
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

mod builder {
    use pallas_port::lang::{interp, triton, GridAxis, Index, KernelBuilder};

    #[test]
    fn shape_rules_name_the_op_and_shapes() {
        let mut k = KernelBuilder::new("bad", &[GridAxis::parallel(1)]);
        let a = k.zeros(&[16, 32]).unwrap();
        let b = k.zeros(&[16, 32]).unwrap();
        let e = k.dot(a, b, None).unwrap_err().to_string();
        assert!(
            e.contains("kernel bad: dot:") && e.contains("f32[16,32] · f32[16,32]"),
            "{e}"
        );
        let e = k.broadcast(a, &[32, 32]).unwrap_err().to_string();
        assert!(e.contains("broadcast") && e.contains("f32[16,32]"), "{e}");
        let x = k.input("x", &[4, 8]);
        let zero = k.int(0);
        let e = k
            .load(x, &[Index::Slice(zero, 4), Index::Slice(zero, 16)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("load") && e.contains("slice of 16 along dim 1"),
            "{e}"
        );
        // A loop-body value used after the loop.
        let (lo, hi, one) = (k.int(0), k.int(2), k.int(1));
        let mut inner = None;
        k.for_loop(lo, hi, one, &[], |k, _, _| {
            inner = Some(k.zeros(&[16])?);
            Ok(vec![])
        })
        .unwrap();
        let e = k.neg(inner.unwrap()).unwrap_err().to_string();
        assert!(e.contains("outside the loop body"), "{e}");
    }

    #[test]
    fn interpreter_loops_masks_and_unwritten_results() {
        // y[i, :] = sum over j < 3 of (x[i, :] + j), rows past the array end masked.
        let mut k = KernelBuilder::new("acc", &[GridAxis::parallel(2)]);
        let x = k.input("x", &[3, 16]);
        let y = k.output("y", &[3, 16]);
        let i = k.program_id(0).unwrap();
        let two = k.int(2);
        let row0 = k.mul(i, two).unwrap();
        let zero = k.int(0);
        let ix = [Index::Slice(row0, 2), Index::Slice(zero, 16)];
        let t = k.load(x, &ix).unwrap();
        let init = k.zeros(&[2, 16]).unwrap();
        let (lo, hi, one) = (k.int(0), k.int(3), k.int(1));
        let out = k
            .for_loop(lo, hi, one, &[init], |k, j, acc| {
                let js = k.splat(j, &[2, 16])?;
                let jf = k.iota(&[2, 16], 0)?; // an i32 tile: compare, then select 1.0 / 0.0
                let _ = k.cmp(pallas_port::lang::CmpOp::Ge, js, jf)?;
                let s = k.add(acc[0], t)?;
                Ok(vec![s])
            })
            .unwrap();
        k.store(y, &ix, out[0]).unwrap();
        let kernel = k.finish().unwrap();
        let xs: Vec<f32> = (0..48).map(|v| v as f32).collect();
        let ys = interp::run(&kernel, &[&xs]).unwrap().pop().unwrap();
        assert_eq!(ys, xs.iter().map(|v| 3.0 * v).collect::<Vec<_>>());
        // Triton refuses a dot below 16 and a grid axis y above 65535, naming them.
        let mut k =
            KernelBuilder::new("tiny", &[GridAxis::parallel(1), GridAxis::parallel(70_000)]);
        let a = k.zeros(&[8, 16]).unwrap();
        let b = k.zeros(&[16, 16]).unwrap();
        k.dot(a, b, None).unwrap();
        let e = triton::emit(&k.finish().unwrap()).unwrap_err().to_string();
        assert!(e.contains("70000") && e.contains("65535"), "{e}");
        let mut k = KernelBuilder::new("tiny", &[GridAxis::parallel(1)]);
        let a = k.zeros(&[8, 16]).unwrap();
        let b = k.zeros(&[16, 16]).unwrap();
        k.dot(a, b, None).unwrap();
        let e = triton::emit(&k.finish().unwrap()).unwrap_err().to_string();
        assert!(e.contains("tt.dot needs every dim ≥ 16"), "{e}");
        // A result element nobody writes is an error.
        let mut k = KernelBuilder::new("half", &[GridAxis::parallel(1)]);
        let y = k.output("y", &[32]);
        let zero = k.int(0);
        let z = k.zeros(&[16]).unwrap();
        k.store(y, &[Index::Slice(zero, 16)], z).unwrap();
        let e = interp::run(&k.finish().unwrap(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("result `y`") && e.contains("[16]") && e.contains("never written"),
            "{e}"
        );
    }
}

#[test]
fn interpreter_matches_reference_at_the_tiny_model_shape() {
    check(
        dims(8, 256, 4, 2, 16),
        cfg(32, 16, 64, FeatureMap::Softmax),
        9,
    );
}

#[test]
fn interpreter_matches_reference_at_head_dim_128() {
    // H 128: every kernel in 4 value-column blocks of 32 (dq and dk partials summed), small T.
    assert_eq!(value_block(128), 32);
    check(
        dims(1, 70, 2, 1, 128),
        cfg(9, 16, 32, FeatureMap::Softmax),
        11,
    );
    check(
        dims(1, 50, 2, 2, 128),
        cfg(20, 16, 32, FeatureMap::Relu),
        12,
    );
    // Sub-chunk 64 runs as tiles of 32 rows at H 128 (the benchmark's sub-chunk).
    assert_eq!(
        (tile_rows(64, 128), tile_rows(64, 64), tile_rows(16, 128)),
        (32, 64, 16)
    );
    check(
        dims(1, 150, 2, 1, 128),
        cfg(40, 64, 128, FeatureMap::Softmax),
        13,
    );
}

#[test]
fn value_blocks_give_the_same_results() {
    // Unsplit at H ≤ 32 by default; forced splits here, and H 64's default (2 blocks).
    assert_eq!(
        (value_block(16), value_block(32), value_block(64)),
        (16, 32, 32)
    );
    check_tiled(
        dims(2, 100, 4, 2, 32),
        cfg(5, 16, 32, FeatureMap::Softmax),
        16,
        21,
    );
    check_tiled(
        dims(1, 90, 2, 1, 32),
        cfg(7, 16, 32, FeatureMap::Relu),
        16,
        22,
    );
    check_tiled(
        dims(1, 80, 4, 2, 64),
        cfg(40, 16, 64, FeatureMap::Softmax),
        16,
        23,
    );
    check(
        dims(1, 80, 2, 1, 64),
        cfg(3, 32, 64, FeatureMap::Softmax),
        24,
    );
    let e = pallas_port::lang::rla::bwd_kernels_tiled(
        &cfg(5, 16, 32, FeatureMap::Softmax),
        &dims(1, 8, 1, 1, 32),
        24,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("value_block = 24") && e.contains("head_dim = 32"),
        "{e}"
    );
}
