//! The kernel language's RLA programs, run by the CPU interpreter, against the f64 reference
//! (naive O(T²) output and VJP, token-by-token scan for the states) and the CPU kernels.

mod common;

use common::{cfg, check_blocks, dims};
use pallas_port::lang::rla::{
    check_tiles, interpret_bwd_tiled, interpret_fwd_tiled, tile_rows, value_block,
};
use pallas_port::{FeatureMap, RlaConfig, RlaDims};

fn check(d: RlaDims, cfg: RlaConfig, seed: u64) {
    check_tiled(d, cfg, value_block(d.head_dim), seed)
}

/// [`check`] with the kernels split into value blocks of `vb` columns.
fn check_tiled(d: RlaDims, cfg: RlaConfig, vb: usize, seed: u64) {
    let tag = format!("{d} {cfg:?} value block {vb}");
    check_blocks(
        &tag,
        &d,
        &cfg,
        seed,
        |q, k, v| interpret_fwd_tiled(&cfg, &d, vb, q, k, v).expect("interpret_fwd"),
        |q, k, v, cs, d_o| {
            interpret_bwd_tiled(&cfg, &d, vb, q, k, v, cs, d_o).expect("interpret_bwd")
        },
    );
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
