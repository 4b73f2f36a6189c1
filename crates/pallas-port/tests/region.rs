//! The RLA blocks inside a manually partitioned region (`rla_in_region`), compiled with XLA's SPMD
//! partitioner for 4 CPU devices (batch cut in 2 × kv heads cut in 2) and run with one argument
//! list per device: o and the gradients of q, k, v equal the 1-device program's, and each device
//! receives only its piece. Both lowerings (custom call and `while`).

use hlo_builder::{Builder, Op, Sharding};
use pallas_port::{rla_in_region, rla_with_state, FeatureMap, Lowering, RlaConfig};

mod common;

use common::{f32_shape, rel_err, spmd, Rng};

const DEVICES: usize = 4;

/// `[B, T, heads, H]` cut 2 × 1 × 2 × 1 over devices 0..4 (batch-major).
fn qkv_sharding() -> Sharding {
    Sharding::tiled(&[2, 1, 2, 1])
}

/// (o, dq, dk, dv) of `sum(o · w)` for q `[2,T,4,H]`, k, v `[2,T,2,H]`, built with or without a
/// region, run on `devices` devices.
fn run(
    lowering: Lowering,
    sharded: bool,
    inputs: &[Vec<f32>; 4],
    dims: &[[usize; 4]; 4],
) -> Vec<Vec<f32>> {
    let cfg = RlaConfig {
        window: 5,
        sub_chunk: 4,
        chunk: 8,
        feature_map: FeatureMap::Softmax,
        ..Default::default()
    };
    let b = Builder::new("region");
    let names = ["q", "k", "v", "w"];
    let p: Vec<Op> = dims
        .iter()
        .zip(names)
        .map(|(d, n)| b.parameter(f32_shape(d), n).unwrap())
        .collect();
    let s = qkv_sharding();
    if sharded {
        for &x in &p {
            b.set_sharding(x, s.clone()).unwrap();
        }
    }
    let out = if sharded {
        rla_in_region(&b, (p[0], p[1], p[2]), &cfg, lowering, &s).unwrap()
    } else {
        rla_with_state(&b, p[0], p[1], p[2], &cfg, lowering).unwrap()
    };
    let l = b
        .reduce_sum(b.mul(out.o, p[3]).unwrap(), &[0, 1, 2, 3])
        .unwrap();
    let g = b.grad(l, &p[..3]).unwrap();
    let root = b.tuple(&[out.o, g[0], g[1], g[2]]).unwrap();
    if sharded {
        b.set_sharding(root, Sharding::Tuple(vec![s.clone(); 4]))
            .unwrap();
    }
    let comp = b.build(root).unwrap();
    let n = if sharded { DEVICES } else { 1 };
    let exe = spmd::compile(&comp, n);
    let sh = if sharded {
        s.clone()
    } else {
        Sharding::Replicated
    };
    // One argument list per device, each holding only that device's piece.
    let ins: Vec<(&[f32], &[usize], &Sharding)> = inputs
        .iter()
        .zip(dims)
        .map(|(x, d)| (x.as_slice(), d.as_slice(), &sh))
        .collect();
    let out_dims = [dims[0], dims[0], dims[1], dims[2]];
    let outs: Vec<(&[usize], &Sharding)> = out_dims.iter().map(|d| (d.as_slice(), &sh)).collect();
    spmd::run(&exe, n, &ins, &outs)
}

fn check(lowering: Lowering) {
    let (bs, t, n, g, h) = (2, 16, 4, 2, 4);
    let dims = [[bs, t, n, h], [bs, t, g, h], [bs, t, g, h], [bs, t, n, h]];
    let mut rng = Rng::new(11);
    let inputs = [
        rng.vec(bs * t * n * h, 1.0),
        rng.vec(bs * t * g * h, 1.0),
        rng.vec(bs * t * g * h, 1.0),
        rng.vec(bs * t * n * h, 1.0),
    ];
    let one = run(lowering, false, &inputs, &dims);
    let four = run(lowering, true, &inputs, &dims);
    for (i, name) in ["o", "dq", "dk", "dv"].iter().enumerate() {
        let want: Vec<f64> = one[i].iter().map(|&x| x as f64).collect();
        let e = rel_err(&four[i], &want);
        eprintln!("{lowering}: {name} on 4 devices vs 1: rel err {e:.2e}");
        assert!(e <= 1e-6, "{lowering}: {name} differs by {e:e}");
        assert!(want.iter().any(|&x| x != 0.0), "{name} is not all zero");
    }
}

#[test]
fn custom_call_blocks_in_a_manual_region_equal_the_one_device_program() {
    check(Lowering::CustomCall);
}

#[test]
fn while_lowering_in_a_manual_region_equals_the_one_device_program() {
    check(Lowering::Hlo);
}
