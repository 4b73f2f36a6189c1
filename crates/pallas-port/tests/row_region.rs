//! The row-wise kernel pairs in manual regions over their rows (`rms_norm_in_region`,
//! `cross_entropy_in_region`, `embed_in_region`), compiled with XLA's SPMD partitioner for
//! CPU meshes of 4 and 8 devices (data 2 × seq 4 on `[B, T, ...]`; fsdp 2 × tensor 2 with the
//! rows replicated over tensor; a group norm's heads cut over tensor) and run with one argument
//! list per device: the forward values and the gradients (the parameter gradients summed over
//! the row pieces) equal f64 naive formulas within 1e-6 relative, and the compiled programs
//! hold the kernels' custom calls on the per-device pieces (no silent HLO fallback).

use hlo_builder::{Builder, ElementType, Op, Sharding};
use pallas_port::{cross_entropy, embed, rms_norm};

mod common;

use common::{f32_shape, rel_err, spmd, Rng};

/// A mesh of `n` devices and the layout of the op's `[B, T, ...]` operand over it.
struct Mesh {
    name: &'static str,
    n: usize,
    x: Sharding,
}

/// data 2 × seq 4 (8 devices) and fsdp 2 × tensor 2 (4 devices; the rows are cut over fsdp and
/// replicated over tensor) on an operand of rank `rank` (`[B, T, features...]`).
fn meshes(rank: usize) -> Vec<Mesh> {
    let mut data_seq = vec![2i64, 4];
    data_seq.resize(rank, 1);
    let mut fsdp_tensor = vec![2i64];
    fsdp_tensor.resize(rank, 1);
    fsdp_tensor.push(2);
    vec![
        Mesh {
            name: "data 2 × seq 4",
            n: 8,
            x: Sharding::tiled(&data_seq),
        },
        Mesh {
            name: "fsdp 2 × tensor 2",
            n: 4,
            x: Sharding::Tiled {
                tile_assignment_dims: fsdp_tensor,
                devices: (0..4).collect(),
                last_tile_dim_replicate: true,
            },
        },
    ]
}

/// The first `take` dims of a device's piece of `dims` under `s`, comma-separated (as the
/// compiled program prints a shape).
fn piece_dims(s: &Sharding, dims: &[usize], take: usize) -> String {
    let piece: Vec<String> = s
        .shard_dims(dims)
        .unwrap()
        .iter()
        .take(take)
        .map(|d| d.to_string())
        .collect();
    piece.join(",")
}

/// Compiles `root` of `b` (made under `mesh`) for its devices, checks that the optimized
/// program holds each of `targets` as a custom call whose operands include `piece`, and runs it.
fn compile_and_run(
    b: &Builder,
    root: Op,
    mesh: &Mesh,
    (targets, piece): (&[&str], &str),
    inputs: &[(&[f32], &[usize], &Sharding)],
    outputs: &[(&[usize], &Sharding)],
) -> Vec<Vec<f32>> {
    let comp = b.build(root).unwrap();
    let exe = spmd::compile(&comp, mesh.n);
    let hlo = spmd::optimized_hlo(&exe);
    for t in targets {
        let calls: Vec<&str> = hlo
            .lines()
            .filter(|l| l.contains(&format!("custom_call_target=\"{t}\"")))
            .collect();
        assert!(
            !calls.is_empty(),
            "{}: no {t} in the program:\n{hlo}",
            mesh.name
        );
        if t.ends_with("_fwd") {
            assert!(
                calls.iter().any(|l| l.contains(piece)),
                "{}: {t} does not run on the pieces {piece}: {calls:#?}",
                mesh.name
            );
        }
    }
    spmd::run(&exe, mesh.n, inputs, outputs)
}

fn check(what: &str, got: &[f32], want: &[f64]) {
    let e = rel_err(got, want);
    eprintln!("{what}: {e:.1e}");
    assert!(e <= 1e-6, "{what}: {e:e} relative");
}

/// f64 RMS norm over the last dim `d` of `x` by `scale` (repeating every `scale.len()`
/// elements), and the gradients of `Σ y·w`: (y, dx, dscale).
fn norm_reference(
    x: &[f32],
    scale: &[f32],
    w: &[f32],
    d: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut dx, mut ds) = (
        vec![0.0; x.len()],
        vec![0.0; x.len()],
        vec![0.0; scale.len()],
    );
    for r in 0..x.len() / d {
        let row = r * d..(r + 1) * d;
        let ms = x[row.clone()]
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            / d as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        let mut dot = 0.0;
        for i in row.clone() {
            let s = scale[i % scale.len()] as f64;
            y[i] = x[i] as f64 * inv * s;
            dot += w[i] as f64 * s * x[i] as f64;
            ds[i % scale.len()] += w[i] as f64 * x[i] as f64 * inv;
        }
        for i in row {
            let s = scale[i % scale.len()] as f64;
            dx[i] = inv * w[i] as f64 * s - inv.powi(3) / d as f64 * x[i] as f64 * dot;
        }
    }
    (y, dx, ds)
}

/// `y = rms_norm(x, scale)` on `x` of `xd` laid out by `xs`, the scale of `sd` (x's last dims)
/// laid out by `ss`: (y, dx, dscale) of `Σ y·w` against f64.
fn norm_case(mesh: &Mesh, xd: &[usize], sd: &[usize], ss: &Sharding) {
    let eps = 1e-6;
    let mut rng = Rng::new(7);
    let n = xd.iter().product();
    let x = rng.vec(n, 2.0);
    let w = rng.vec(n, 1.0);
    let scale: Vec<f32> = rng
        .vec(sd.iter().product(), 0.5)
        .iter()
        .map(|v| v + 1.0)
        .collect();
    let b = Builder::new("norm_region");
    let (xp, sp, wp) = (
        b.parameter(f32_shape(xd), "x").unwrap(),
        b.parameter(f32_shape(sd), "scale").unwrap(),
        b.parameter(f32_shape(xd), "w").unwrap(),
    );
    for (p, s) in [(xp, &mesh.x), (sp, ss), (wp, &mesh.x)] {
        b.set_sharding(p, s.clone()).unwrap();
    }
    let y = rms_norm::rms_norm_in_region(&b, xp, sp, eps, &mesh.x).unwrap();
    let all: Vec<i64> = (0..xd.len() as i64).collect();
    let l = b.reduce_sum(b.mul(y, wp).unwrap(), &all).unwrap();
    let g = b.grad(l, &[xp, sp]).unwrap();
    let root = b.tuple(&[y, g[0], g[1]]).unwrap();
    b.set_sharding(
        root,
        Sharding::Tuple(vec![mesh.x.clone(), mesh.x.clone(), ss.clone()]),
    )
    .unwrap();
    let piece = piece_dims(&mesh.x, xd, usize::MAX);
    let out = compile_and_run(
        &b,
        root,
        mesh,
        (
            &["rattention.rms_norm_fwd", "rattention.rms_norm_bwd"],
            &format!("(f32[{}]", piece),
        ),
        &[(&x, xd, &mesh.x), (&scale, sd, ss), (&w, xd, &mesh.x)],
        &[(xd, &mesh.x), (xd, &mesh.x), (sd, ss)],
    );
    let (ry, rdx, rds) = norm_reference(&x, &scale, &w, xd[xd.len() - 1], eps);
    let what = format!("rms norm {xd:?} on {}", mesh.name);
    check(&format!("{what}: y"), &out[0], &ry);
    check(&format!("{what}: dx"), &out[1], &rdx);
    check(&format!("{what}: dscale"), &out[2], &rds);
}

#[test]
fn rms_norm_region_equals_f64_on_meshes() {
    for mesh in meshes(3) {
        norm_case(&mesh, &[4, 8, 16], &[16], &Sharding::Replicated);
    }
}

/// The mixing's group norm over `[B, T, N, H]` with an `[N, H]` scale: rows cut over data and
/// seq, the heads over tensor (and the scale's heads alike).
#[test]
fn group_norm_region_with_heads_cut_equals_f64() {
    // data 2 × seq 2 × tensor 2 on [B, T, N, H].
    let x = Sharding::tiled(&[2, 2, 2, 1]);
    let scale = Sharding::Tiled {
        tile_assignment_dims: vec![2, 1, 4],
        devices: vec![0, 2, 4, 6, 1, 3, 5, 7],
        last_tile_dim_replicate: true,
    };
    let mesh = Mesh {
        name: "data 2 × seq 2 × tensor 2 (heads)",
        n: 8,
        x,
    };
    norm_case(&mesh, &[4, 8, 4, 8], &[4, 8], &scale);
    // tensor 2 alone: one row piece (G = 1), the heads cut.
    let heads = Mesh {
        name: "tensor 2 (heads)",
        n: 2,
        x: Sharding::tiled(&[1, 1, 2, 1]),
    };
    norm_case(&heads, &[4, 8, 4, 8], &[4, 8], &Sharding::tiled(&[2, 1]));
    for mesh in meshes(4) {
        norm_case(&mesh, &[4, 8, 4, 8], &[4, 8], &Sharding::Replicated);
    }
}

/// f64 weighted mean cross-entropy of `logits [R, V]` against `targets` (one per row; out of
/// range picks nothing) with `weights`: (loss, d_logits).
fn xent_reference(logits: &[f32], targets: &[i64], weights: &[f32], v: usize) -> (f64, Vec<f64>) {
    let count = weights.iter().map(|&w| w as f64).sum::<f64>().max(1.0);
    let (mut loss, mut d) = (0.0, vec![0.0; logits.len()]);
    for (r, (&t, &w)) in targets.iter().zip(weights).enumerate() {
        let x = &logits[r * v..(r + 1) * v];
        let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let lse = x.iter().map(|&b| (b as f64 - m).exp()).sum::<f64>().ln() + m;
        let hit = (0..v as i64).contains(&t);
        let picked = if hit { x[t as usize] as f64 } else { 0.0 };
        loss += w as f64 * (lse - picked);
        for j in 0..v {
            let onehot = if hit && j == t as usize { 1.0 } else { 0.0 };
            d[r * v + j] = w as f64 / count * ((x[j] as f64 - lse).exp() - onehot);
        }
    }
    (loss / count, d)
}

#[test]
fn cross_entropy_region_equals_f64_on_meshes() {
    let (bs, t, v) = (4usize, 8usize, 12usize);
    let mut rng = Rng::new(11);
    let logits = rng.vec(bs * t * v, 3.0);
    // Tokens [B, T+1] (f32 in the graph, converted): position t's target is column t + 1; a few
    // out of the vocabulary.
    let tokens: Vec<f32> = (0..bs * (t + 1))
        .map(|i| match i % 13 {
            5 => -2.0,
            8 => v as f32 + 3.0,
            _ => ((i * 7 + 1) % v) as f32,
        })
        .collect();
    // 0/1 weights with a fractional few: Σ w > 1.
    let weights: Vec<f32> = (0..bs * t)
        .map(|i| match i % 5 {
            0 => 0.0,
            3 => 0.5,
            _ => 1.0,
        })
        .collect();
    let targets: Vec<i64> = (0..bs * t)
        .map(|r| tokens[(r / t) * (t + 1) + r % t + 1] as i64)
        .collect();
    let (want_loss, want_d) = xent_reference(&logits, &targets, &weights, v);
    let (ld, td, wd) = ([bs, t, v], [bs, t + 1], [bs, t]);
    for mesh in meshes(3) {
        let b = Builder::new("xent_region");
        let (lp, tp, wp) = (
            b.parameter(f32_shape(&ld), "logits").unwrap(),
            b.parameter(f32_shape(&td), "tokens").unwrap(),
            b.parameter(f32_shape(&wd), "weights").unwrap(),
        );
        b.set_sharding(lp, mesh.x.clone()).unwrap();
        for p in [tp, wp] {
            b.set_sharding(p, Sharding::Replicated).unwrap();
        }
        let ids = b.convert(tp, ElementType::S32).unwrap();
        let loss = cross_entropy::cross_entropy_in_region(&b, lp, (ids, 1), wp, &mesh.x).unwrap();
        let g = b.grad(loss, &[lp]).unwrap();
        let root = b.tuple(&[b.reshape(loss, &[1]).unwrap(), g[0]]).unwrap();
        b.set_sharding(
            root,
            Sharding::Tuple(vec![Sharding::Replicated, mesh.x.clone()]),
        )
        .unwrap();
        let piece = piece_dims(&mesh.x, &ld, usize::MAX);
        let rep = Sharding::Replicated;
        let out = compile_and_run(
            &b,
            root,
            &mesh,
            (
                &["rattention.xent_fwd", "rattention.xent_bwd"],
                &format!("(f32[{}]", piece),
            ),
            &[
                (&logits, &ld, &mesh.x),
                (&tokens, &td, &rep),
                (&weights, &wd, &rep),
            ],
            &[(&[1], &rep), (&ld, &mesh.x)],
        );
        let what = format!("cross-entropy on {}", mesh.name);
        check(&format!("{what}: loss"), &out[0], &[want_loss]);
        check(&format!("{what}: d_logits"), &out[1], &want_d);
    }
}

#[test]
fn embed_region_equals_f64_on_meshes() {
    let (bs, t, v, d) = (4usize, 8usize, 12usize, 16usize);
    let mut rng = Rng::new(5);
    let table = rng.vec(v * d, 1.0);
    // Tokens [B, T+1]: the embedding reads the first T columns; ids out of range are clamped.
    let tokens: Vec<f32> = (0..bs * (t + 1))
        .map(|i| match i % 11 {
            4 => -1.0,
            7 => v as f32 + 2.0,
            _ => ((i * 5 + 3) % v) as f32,
        })
        .collect();
    let w = rng.vec(bs * t * d, 1.0);
    let (mut want_x, mut want_dt) = (vec![0.0f64; bs * t * d], vec![0.0f64; v * d]);
    for r in 0..bs * t {
        let id = (tokens[(r / t) * (t + 1) + r % t] as i64).clamp(0, v as i64 - 1) as usize;
        for j in 0..d {
            want_x[r * d + j] = table[id * d + j] as f64;
            want_dt[id * d + j] += w[r * d + j] as f64;
        }
    }
    let (tbd, td, xd) = ([v, d], [bs, t + 1], [bs, t, d]);
    let mut cases: Vec<(Mesh, Sharding)> = meshes(3)
        .into_iter()
        .map(|m| (m, Sharding::Replicated))
        .collect();
    // tensor 2 under the default rules: the rows are whole (the region's layout replicates
    // them), the table arrives cut over V.
    cases.push((
        Mesh {
            name: "tensor 2 (table cut over V)",
            n: 2,
            x: Sharding::Replicated,
        },
        Sharding::tiled(&[2, 1]),
    ));
    for (mesh, table_sharding) in cases {
        let b = Builder::new("embed_region");
        let (tab, tp, wp) = (
            b.parameter(f32_shape(&tbd), "table").unwrap(),
            b.parameter(f32_shape(&td), "tokens").unwrap(),
            b.parameter(f32_shape(&xd), "w").unwrap(),
        );
        for (p, s) in [
            (tab, table_sharding.clone()),
            (tp, Sharding::Replicated),
            (wp, mesh.x.clone()),
        ] {
            b.set_sharding(p, s).unwrap();
        }
        let ids = b.convert(tp, ElementType::S32).unwrap();
        let x = embed::embed_in_region(&b, tab, ids, t, &mesh.x).unwrap();
        let l = b.reduce_sum(b.mul(x, wp).unwrap(), &[0, 1, 2]).unwrap();
        let g = b.grad(l, &[tab]).unwrap();
        let root = b.tuple(&[x, g[0]]).unwrap();
        b.set_sharding(
            root,
            Sharding::Tuple(vec![mesh.x.clone(), table_sharding.clone()]),
        )
        .unwrap();
        let piece = piece_dims(&mesh.x, &xd, 2);
        let rep = Sharding::Replicated;
        let out = compile_and_run(
            &b,
            root,
            &mesh,
            (
                &["rattention.embed_fwd", "rattention.embed_bwd"],
                &format!("s32[{}]", piece),
            ),
            &[
                (&table, &tbd, &table_sharding),
                (&tokens, &td, &rep),
                (&w, &xd, &mesh.x),
            ],
            &[(&xd, &mesh.x), (&tbd, &table_sharding)],
        );
        let what = format!("embedding on {}", mesh.name);
        check(&format!("{what}: x"), &out[0], &want_x);
        check(&format!("{what}: d_table"), &out[1], &want_dt);
    }
}

/// A layout that cuts nothing on a mesh (every device holds the whole operand, the embedding
/// under tensor 2 whose D the region keeps whole) still runs the kernels in a region.
#[test]
fn a_replicated_layout_runs_the_kernels_on_every_device() {
    let mesh = Mesh {
        name: "2 devices, replicated",
        n: 2,
        x: Sharding::Replicated,
    };
    norm_case(&mesh, &[4, 8, 16], &[16], &Sharding::Replicated);
}

/// A layout that cuts the feature dim is refused, naming the op and the cut.
#[test]
fn a_cut_feature_dim_is_refused() {
    let b = Builder::new("cut");
    let x = b.parameter(f32_shape(&[4, 8, 16]), "x").unwrap();
    let s = b.parameter(f32_shape(&[16]), "scale").unwrap();
    let e = rms_norm::rms_norm_in_region(&b, x, s, 1e-6, &Sharding::tiled(&[2, 1, 2]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rms_norm_in_region") && e.contains("into 2 pieces"),
        "{e}"
    );
}
