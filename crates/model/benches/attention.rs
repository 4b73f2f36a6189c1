//! Causal attention forward+backward on XLA CPU: the blocked [`model::attention::causal_attention`]
//! against the whole-matrix [`model::attention::causal_attention_dense`], at the speed issue's
//! shapes (N 4, G 2, H 64; T 1024 B 4, T 4096 B 1; global and windows 64 / 512), and block sizes
//! to choose from. Prints wall ms and CPU ms per call (CPU time of all threads of the process,
//! from /proc/self/task/*/schedstat: it still measures the work when other jobs load the machine),
//! interleaving the variants round by round so that load changes hit them alike.
//!
//! `cargo bench -p model --bench attention` (env `ATTN_BENCH_ROUNDS`, default 5;
//! `ATTN_BENCH_CASES`, e.g. `1024g,4096w512`).

use std::time::Instant;

use hlo_builder::{Builder, ElementType, Op, Shape};
use model::attention::{causal_attention_dense, causal_attention_with, AttentionBlocks};
use pallas_port::bench_util::{cpu_s, data, env_usize, load};

/// `(q, k, v, d_o) -> (o, dq, dk, dv)` through `attn` and `grad`.
fn graph(
    bs: i64,
    t: i64,
    attn: &dyn Fn(&Builder, Op, Op, Op) -> hlo_builder::Result<Op>,
) -> Vec<u8> {
    let b = Builder::new("attention_bench");
    let p = |d: &[i64], name: &str| {
        b.parameter(Shape::array(ElementType::F32, d), name)
            .unwrap()
    };
    let q = p(&[bs, t, 4, 64], "q");
    let k = p(&[bs, t, 2, 64], "k");
    let v = p(&[bs, t, 2, 64], "v");
    let d_o = p(&[bs, t, 4, 64], "d_o");
    let o = attn(&b, q, k, v).unwrap();
    let loss = b.reduce_sum(b.mul(o, d_o).unwrap(), &[0, 1, 2, 3]).unwrap();
    let g = b.grad(loss, &[q, k, v]).unwrap();
    b.build(b.tuple(&[o, g[0], g[1], g[2]]).unwrap())
        .unwrap()
        .to_bytes()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = env_usize("ATTN_BENCH_ROUNDS", 5);
    let cases =
        std::env::var("ATTN_BENCH_CASES").unwrap_or_else(|_| "1024g,1024w64,4096g,4096w512".into());
    let client = pjrt::Client::cpu().expect("XLA CPU plugin (run `rattn plugin install cpu`)");
    let opts = pjrt::CompileOptions::default();
    for case in cases.split(',') {
        let (t, window): (i64, Option<usize>) = match case.split_once('w') {
            Some((t, w)) => (t.parse().unwrap(), Some(w.parse().unwrap())),
            None => (case.trim_end_matches('g').parse().unwrap(), None),
        };
        let bs = if t >= 4096 { 1 } else { 4096 / t };
        let sizes: Vec<usize> = match window {
            None => vec![128, 256, 512],
            Some(w) => vec![(w / 4).max(16), (w / 2).max(16), w],
        };
        let mut variants: Vec<(String, Vec<u8>)> = vec![(
            "dense".into(),
            graph(bs, t, &|b, q, k, v| {
                causal_attention_dense(b, q, k, v, window)
            }),
        )];
        for s in sizes {
            let blocks = AttentionBlocks {
                global: s,
                banded: s,
            };
            variants.push((
                format!("blocked{s}"),
                graph(bs, t, &|b, q, k, v| {
                    causal_attention_with(b, q, k, v, window, blocks)
                }),
            ));
        }
        let up = |x: &[f32], d: &[i64]| client.buffer_from_host::<f32>(x, d, None).unwrap();
        let nq = (bs * t * 4 * 64) as usize;
        let nk = nq / 2;
        let bufs = [
            up(&data(nq, 1), &[bs, t, 4, 64]),
            up(&data(nk, 2), &[bs, t, 2, 64]),
            up(&data(nk, 3), &[bs, t, 2, 64]),
            up(&data(nq, 4), &[bs, t, 4, 64]),
        ];
        let refs: Vec<&pjrt::Buffer> = bufs.iter().collect();
        let mut exes = Vec::new();
        for (name, hlo) in &variants {
            let c0 = Instant::now();
            let exe = client.compile(pjrt::Program::Hlo(hlo), &opts).unwrap();
            let compile_s = c0.elapsed().as_secs_f64();
            let out: Vec<Vec<f32>> = exe
                .execute(&refs)
                .unwrap()
                .iter()
                .map(|b| b.to_host::<f32>().unwrap())
                .collect();
            exes.push((name.clone(), exe, out, compile_s));
        }
        let mut best = vec![(f64::INFINITY, f64::INFINITY); exes.len()];
        for _ in 0..rounds {
            for (i, (_, exe, _, _)) in exes.iter().enumerate() {
                let (w0, c0) = (Instant::now(), cpu_s());
                exe.execute(&refs).unwrap();
                let (w, c) = (w0.elapsed().as_secs_f64(), cpu_s() - c0);
                best[i].0 = best[i].0.min(w * 1e3);
                best[i].1 = best[i].1.min(c * 1e3);
            }
        }
        println!("T={t} B={bs} window={window:?} load={}", load());
        let base = &exes[0].2;
        for (i, (name, _, out, cs)) in exes.iter().enumerate() {
            let err = out
                .iter()
                .zip(base)
                .map(|(a, r)| {
                    let scale = r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
                    a.iter().zip(r).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
                })
                .fold(0f32, f32::max);
            println!(
                "  {name:<12} wall {:8.1} ms  cpu {:8.1} ms  (cpu/dense {:.2})  compile {:.2} s  max rel diff vs dense {err:.1e}",
                best[i].0,
                best[i].1,
                best[i].1 / best[0].1,
                cs
            );
        }
    }
}
