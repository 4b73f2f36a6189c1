//! Scratch timing (not committed).
use hlo_builder::{Builder, ElementType, Op, Sharding};
use model::{Attention, MeshConfig, Model, ParamOps, SeqGlobal};
use std::collections::HashMap;
mod common;
use common::{load_model, rand};
#[path = "../../pallas-port/tests/common/spmd.rs"]
mod spmd;

fn cpu_s() -> f64 {
    let t = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = t.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

#[test]
#[ignore]
fn time_global() {
    let ev = |k: &str, d: usize| std::env::var(k).map(|v| v.parse().unwrap()).unwrap_or(d);
    let (bb, t, n, g, h) = (ev("ZZ_B", 8), ev("ZZ_T", 256), 4usize, 2usize, 64usize);
    let seqs: Vec<(i64, i64)> = std::env::var("ZZ_MESH")
        .map(|s| {
            let v: Vec<i64> = s.split('x').map(|x| x.parse().unwrap()).collect();
            vec![(v[0], v[1])]
        })
        .unwrap_or(vec![(1, 8), (2, 4)]);
    for (data, seq) in seqs {
        let attn = if std::env::var("ZZ_LOCAL").is_ok() {
            Attention::Rattention
        } else {
            Attention::Global
        };
        for scheme in [None, Some(SeqGlobal::Dense), Some(SeqGlobal::Zigzag)] {
            let mut cfg = load_model("tiny-3to1");
            cfg.heads = n;
            cfg.kv_heads = g;
            cfg.head_dim = h;
            cfg.seq_len = t;
            cfg.window = 64;
            cfg.rla.chunk = 32;
            cfg.rla.sub_chunk = 16;
            let mut m = Model::new(cfg).unwrap();
            let nd = if let Some(s) = scheme {
                m = m
                    .with_mesh(
                        MeshConfig {
                            data,
                            seq,
                            seq_global: s,
                            ..MeshConfig::default()
                        }
                        .resolve(8)
                        .unwrap(),
                    )
                    .unwrap();
                8
            } else {
                1
            };
            let qd = [bb, t, n, h];
            let kd = [bb, t, g, h];
            let dims = [qd, kd, kd, qd];
            let b = Builder::new("g");
            let p: Vec<Op> = dims
                .iter()
                .zip(["q", "k", "v", "w"])
                .map(|(d, nm)| {
                    let d: Vec<i64> = d.iter().map(|&x| x as i64).collect();
                    b.parameter(hlo_builder::Shape::array(ElementType::F32, &d), nm)
                        .unwrap()
                })
                .collect();
            let qdi: Vec<i64> = qd.iter().map(|&x| x as i64).collect();
            let sh = m.seq_region(&qdi).unwrap().unwrap_or(Sharding::Replicated);
            for &x in &p {
                b.set_sharding(x, sh.clone()).unwrap();
            }
            let mut scales: ParamOps = HashMap::new();
            for name in ["l.swa_norm.scale", "l.rla_norm.scale"] {
                scales.insert(
                    name.into(),
                    b.ones(ElementType::F32, &[n as i64, h as i64]).unwrap(),
                );
            }
            let pos = b.iota(ElementType::F32, &[t as i64], 0).unwrap();
            let out = m
                .attention_core(&b, &scales, "l", attn, (p[0], p[1], p[2]), pos, "cpu")
                .unwrap();
            let l = b
                .reduce_sum(b.mul(out, p[3]).unwrap(), &[0, 1, 2, 3])
                .unwrap();
            let gr = b.grad(l, &p[..3]).unwrap();
            let root = b.tuple(&[out, gr[0], gr[1], gr[2]]).unwrap();
            if nd > 1 {
                b.set_sharding(root, Sharding::Tuple(vec![sh.clone(); 4]))
                    .unwrap();
            }
            let exe = spmd::compile(&b.build(root).unwrap(), nd);
            let hlo = spmd::optimized_hlo(&exe);
            std::fs::write(
                format!("/tmp/zz/{data}x{seq}-{scheme:?}-{attn:?}.hlo"),
                &hlo,
            )
            .unwrap();
            let inputs: Vec<Vec<f32>> = dims
                .iter()
                .enumerate()
                .map(|(i, d)| rand(d.iter().product(), i as u64, 1.0))
                .collect();
            let ins: Vec<(&[f32], &[usize], &Sharding)> = inputs
                .iter()
                .zip(&dims)
                .map(|(x, d)| (x.as_slice(), d.as_slice(), &sh))
                .collect();
            let od = [qd, qd, kd, kd];
            let outs: Vec<(&[usize], &Sharding)> = od.iter().map(|d| (d.as_slice(), &sh)).collect();
            spmd::run(&exe, nd, &ins, &outs);
            let reps = ev("ZZ_REPS", 20);
            let (w0, c0) = (std::time::Instant::now(), cpu_s());
            for _ in 0..reps {
                spmd::run(&exe, nd, &ins, &outs);
            }
            let (w, c) = (
                w0.elapsed().as_secs_f64() / reps as f64,
                (cpu_s() - c0) / reps as f64,
            );
            let fusions = hlo.matches(" fusion(").count();
            eprintln!("data {data} seq {seq} {scheme:?}: wall {:.2} ms, CPU {:.2} ms, fusions {fusions}, lines {}", w * 1e3, c * 1e3, hlo.lines().count());
        }
    }
}

#[test]
#[ignore]
fn time_dots() {
    use hlo_builder::DotDims;
    let shapes: Vec<(Vec<i64>, Vec<i64>, DotDims)> = vec![
        // zigzag scores: [8,2,17,32,64] x [8,2,17,16,64]
        (
            vec![8, 2, 17, 32, 64],
            vec![8, 2, 17, 16, 64],
            DotDims {
                lhs_batch: vec![0, 1, 2],
                rhs_batch: vec![0, 1, 2],
                lhs_contracting: vec![4],
                rhs_contracting: vec![4],
            },
        ),
        // dense scores: [8,2,64,64] x [8,2,256,64]
        (
            vec![8, 2, 64, 64],
            vec![8, 2, 256, 64],
            DotDims {
                lhs_batch: vec![0, 1],
                rhs_batch: vec![0, 1],
                lhs_contracting: vec![3],
                rhs_contracting: vec![3],
            },
        ),
        // zigzag with M folded away: [8*2*17, 32, 64]
        (
            vec![272, 32, 64],
            vec![272, 16, 64],
            DotDims {
                lhs_batch: vec![0],
                rhs_batch: vec![0],
                lhs_contracting: vec![2],
                rhs_contracting: vec![2],
            },
        ),
    ];
    for (a, bd, dd) in shapes {
        let b = Builder::new("d");
        let x = b
            .parameter(hlo_builder::Shape::array(ElementType::F32, &a), "x")
            .unwrap();
        let y = b
            .parameter(hlo_builder::Shape::array(ElementType::F32, &bd), "y")
            .unwrap();
        let mut o = b.dot_general(x, y, &dd, None, None).unwrap();
        for _ in 0..20 {
            let z = b
                .dot_general(
                    b.add(x, b.scalar(1e-3f32).unwrap()).unwrap(),
                    y,
                    &dd,
                    None,
                    None,
                )
                .unwrap();
            o = b.add(o, z).unwrap();
        }
        let exe = spmd::compile(&b.build(o).unwrap(), 1);
        let xa: Vec<f32> = rand(a.iter().product::<i64>() as usize, 1, 1.0);
        let ya: Vec<f32> = rand(bd.iter().product::<i64>() as usize, 2, 1.0);
        let au: Vec<usize> = a.iter().map(|&v| v as usize).collect();
        let bu: Vec<usize> = bd.iter().map(|&v| v as usize).collect();
        let od: Vec<usize> = spmd::optimized_hlo(&exe)
            .lines()
            .last()
            .map(|_| vec![])
            .unwrap();
        let _ = od;
        let ins: Vec<(&[f32], &[usize], &Sharding)> = vec![
            (&xa, &au, &Sharding::Replicated),
            (&ya, &bu, &Sharding::Replicated),
        ];
        let c = spmd::client();
        let dev = c.addressable_devices().unwrap();
        let xb = c.buffer_from_host(&xa, &a, Some(&dev[0])).unwrap();
        let yb = c.buffer_from_host(&ya, &bd, Some(&dev[0])).unwrap();
        let _ = ins;
        exe.execute_sharded(&[vec![&xb, &yb]]).unwrap();
        let (w0, c0) = (std::time::Instant::now(), cpu_s());
        for _ in 0..5 {
            let o = exe.execute_sharded(&[vec![&xb, &yb]]).unwrap();
            drop(o);
        }
        let flops = 2.0 * 21.0 * (a.iter().product::<i64>() as f64) * (bd[bd.len() - 2] as f64);
        let w = w0.elapsed().as_secs_f64() / 5.0;
        eprintln!(
            "{a:?} x {bd:?}: wall {:.2} ms CPU {:.2} ms, {:.1} GFLOP/s",
            w * 1e3,
            (cpu_s() - c0) / 5.0 * 1e3,
            flops / w / 1e9
        );
    }
}

#[test]
#[ignore]
fn time_permutes() {
    for (count, size) in [(1usize, 1024i64), (8, 1024), (32, 1024), (8, 262144)] {
        let b = Builder::new("p");
        let sh = Sharding::tiled(&[8, 1]);
        let x = b
            .parameter(hlo_builder::Shape::array(ElementType::F32, &[8, size]), "x")
            .unwrap();
        b.set_sharding(x, sh.clone()).unwrap();
        let xl = b.full_to_shard(x, sh.clone()).unwrap();
        let o = {
            let _m = b.manual_scope();
            let mut y = xl;
            for i in 0..count {
                let pairs: Vec<(i64, i64)> = (0..8).map(|d| (d, (d + 1 + i as i64) % 8)).collect();
                y = b
                    .collective_permute(b.mul(y, b.scalar(1.0001f32).unwrap()).unwrap(), &pairs)
                    .unwrap();
            }
            y
        };
        let o = b.shard_to_full(o, sh.clone(), &[8, size]).unwrap();
        b.set_sharding(o, sh.clone()).unwrap();
        let exe = spmd::compile(&b.build(o).unwrap(), 8);
        let xa = rand(8 * size as usize, 1, 1.0);
        let dims = [8usize, size as usize];
        let ins: Vec<(&[f32], &[usize], &Sharding)> = vec![(&xa, &dims, &sh)];
        let outs: Vec<(&[usize], &Sharding)> = vec![(&dims, &sh)];
        spmd::run(&exe, 8, &ins, &outs);
        let (w0, c0) = (std::time::Instant::now(), cpu_s());
        for _ in 0..20 {
            spmd::run(&exe, 8, &ins, &outs);
        }
        eprintln!(
            "{count} permutes of {size} floats: wall {:.2} ms CPU {:.2} ms",
            w0.elapsed().as_secs_f64() / 20.0 * 1e3,
            (cpu_s() - c0) / 20.0 * 1e3
        );
    }
}
