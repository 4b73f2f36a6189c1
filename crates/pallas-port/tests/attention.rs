//! The causal softmax attention kernels (`pallas_port::kernel::attention`) and their custom-call
//! pair on the CPU plugin against a naive f64 formula (full softmax over the visible keys).

use hlo_builder::{Builder, Op};
use pallas_port::attention::{attention_kernel, attention_kernel_at};
use pallas_port::kernel::{attn_bwd, attn_bwd_at, attn_fwd, attn_fwd_at, AttnPositions};
use pallas_port::RlaDims;

mod common;

use common::{dims, f32_shape, rel_err, run, Rng};

/// fp32 paths within 1e-5 of the f64 reference (norm-relative).
const TOL: f64 = 1e-5;

/// `(q, k, v, d_o)` for q, d_o `[B,Tq,N,H]` (Tq = `d.seq`) and k, v `[B,keys,G,H]`, drawn in
/// that order from `seed`.
fn inputs(d: &RlaDims, keys: usize, seed: u64) -> [Vec<f32>; 4] {
    let mut rng = Rng::new(seed);
    let kv_len = d.batch * keys * d.kv_heads * d.head_dim;
    [
        rng.vec(d.q_len(), 1.0),
        rng.vec(kv_len, 1.0),
        rng.vec(kv_len, 1.0),
        rng.vec(d.q_len(), 1.0),
    ]
}

/// `x` rounded to bf16 and back (what a bf16 graph input holds).
fn round_bf16(x: &mut [f32]) {
    x.iter_mut()
        .for_each(|y| *y = half::bf16::from_f32(*y).to_f32());
}

fn check(case: &str, names: &[&str], got: &[&[f32]], want: &[Vec<f64>]) {
    check_tol(case, names, got, want, &[TOL; 4]);
}

fn check_tol(case: &str, names: &[&str], got: &[&[f32]], want: &[Vec<f64>], tol: &[f64]) {
    for (((name, g), w), &t) in names.iter().zip(got).zip(want).zip(tol) {
        let e = rel_err(g, w);
        eprintln!("{case}: {name} rel err {e:.2e}");
        assert!(e <= t, "{case}: {name} relative error {e:.3e} > {t:e}");
    }
}

/// `[o, lse, dq, dk, dv]` of the kernel pair on `[q, k, v, d_o]` with `keys` keys: the plain
/// [`attn_fwd`]/[`attn_bwd`] when `at` is `None` (then `keys == d.seq`), else the `_at` pair at
/// those positions. Outputs start as NaN, so an element left unwritten shows.
fn kernel_outputs(
    d: &RlaDims,
    keys: usize,
    w: Option<usize>,
    at: Option<AttnPositions>,
    [q, k, v, d_o]: &[Vec<f32>; 4],
) -> [Vec<f32>; 5] {
    let mut o = vec![f32::NAN; d.q_len()];
    let mut lse = vec![f32::NAN; d.batch * d.seq * d.heads];
    let mut g = [
        vec![f32::NAN; d.q_len()],
        vec![f32::NAN; k.len()],
        vec![f32::NAN; v.len()],
    ];
    let [dq, dk, dv] = &mut g;
    match at {
        Some(p) => {
            attn_fwd_at(d, keys, w, p, q, k, v, &mut o, &mut lse).expect("attn_fwd_at");
            attn_bwd_at(d, keys, w, p, (q, k, v), &o, &lse, d_o, (dq, dk, dv))
                .expect("attn_bwd_at");
        }
        None => {
            attn_fwd(d, w, q, k, v, &mut o, &mut lse).expect("attn_fwd");
            attn_bwd(d, w, q, k, v, &o, &lse, d_o, dq, dk, dv).expect("attn_bwd");
        }
    }
    let [dq, dk, dv] = g;
    [o, lse, dq, dk, dv]
}

/// Checks `[o, dq, dk, dv]` of the kernel outputs against the reference.
fn check_kernel(case: &str, [o, _, dq, dk, dv]: &[Vec<f32>; 5], want: &[Vec<f64>]) {
    check(case, &["o", "dq", "dk", "dv"], &[o, dq, dk, dv], want);
}

/// The custom-call pair through the XLA CPU plugin on the inputs of `seed` (k, v `[B,keys,G,H]`,
/// q, k, v rounded to bf16 first when `bf16`, and fed as bf16): the forward `kernel(b, q, k, v)`
/// and the gradients of Σ o ⊙ c against the f64 reference at positions `(q0, k0)` (o within
/// [`TOL`]; with bf16 the gradients come back as bf16, within its 2^-8 relative rounding).
#[allow(clippy::too_many_arguments)]
fn check_custom_call(
    case: &str,
    d: &RlaDims,
    keys: usize,
    w: Option<usize>,
    (q0, k0): (i64, i64),
    bf16: bool,
    seed: u64,
    kernel: impl Fn(&Builder, Op, Op, Op) -> Op,
) {
    let [mut q, mut k, mut v, d_o] = inputs(d, keys, seed);
    if bf16 {
        for x in [&mut q, &mut k, &mut v] {
            round_bf16(x);
        }
    }
    let want = naive_at(d, keys, w, (q0, k0), &q, &k, &v, &d_o);
    let b = Builder::new("attn");
    let (qs, ks) = (d.q_shape(), [d.batch, keys, d.kv_heads, d.head_dim]);
    let qp = b.parameter(f32_shape(&qs), "q").unwrap();
    let kp = b.parameter(f32_shape(&ks), "k").unwrap();
    let vp = b.parameter(f32_shape(&ks), "v").unwrap();
    let cp = b.parameter(f32_shape(&qs), "c").unwrap();
    let lo = |x| {
        if bf16 {
            b.convert(x, hlo_builder::ElementType::Bf16).unwrap()
        } else {
            x
        }
    };
    let o = kernel(&b, lo(qp), lo(kp), lo(vp));
    let loss = b.reduce_sum(b.mul(o, cp).unwrap(), &[0, 1, 2, 3]).unwrap();
    let g = b.grad(loss, &[qp, kp, vp]).unwrap();
    let root = b.tuple(&[o, g[0], g[1], g[2]]).unwrap();
    let args = [(&q, &qs[..]), (&k, &ks), (&v, &ks), (&d_o, &qs)].map(|(x, s)| (&x[..], s));
    let outs = run(&b, root, &args);
    let got: Vec<&[f32]> = outs.iter().map(|x| x.as_slice()).collect();
    let g_tol = if bf16 { 8e-3 } else { TOL };
    check_tol(
        case,
        &["o", "dq", "dk", "dv"],
        &got,
        &want,
        &[TOL, g_tol, g_tol, g_tol],
    );
}

/// Global and windowed cases: W = 0, W below the block, W spanning several key blocks, T not a
/// multiple of the blocks, GQA N/G = 2, B = 2.
fn cases() -> Vec<(RlaDims, Option<usize>)> {
    vec![
        (dims(2, 150, 4, 2, 16), None),
        (dims(1, 200, 2, 2, 8), Some(0)),
        (dims(2, 150, 4, 2, 16), Some(5)),
        (dims(1, 333, 4, 2, 16), Some(150)),
        (dims(1, 300, 2, 1, 32), Some(299)),
    ]
}

#[test]
fn kernel_matches_f64_reference() {
    for (d, w) in cases() {
        let case = format!("{d} window {w:?}");
        let x = inputs(&d, d.seq, 7);
        let [q, k, v, d_o] = &x;
        let want = naive_at(&d, d.seq, w, (0, 0), q, k, v, d_o);
        check_kernel(&case, &kernel_outputs(&d, d.seq, w, None, &x), &want);
    }
}

#[test]
fn kernel_rejects_wrong_lengths() {
    let d = dims(1, 8, 2, 1, 4);
    let (q, k) = (vec![0.0; d.q_len()], vec![0.0; d.kv_len()]);
    let mut o = vec![0.0; d.q_len()];
    let mut lse = vec![0.0; 3];
    let err = attn_fwd(&d, None, &q, &k, &k, &mut o, &mut lse).unwrap_err();
    assert!(err.to_string().contains("lse"), "{err}");
}

/// The custom-call pair through the XLA CPU plugin: forward and the gradients of Σ o ⊙ c; also
/// with q, k, v fed as bf16 (host data rounded to bf16 first: o is f32 and within 1e-5, the
/// gradients come back as bf16, within its 2^-8 relative rounding).
#[test]
fn custom_call_matches_f64_reference() {
    // The handlers are process-global: `run`'s client finds them.
    let client = pjrt::Client::cpu().expect("CPU plugin");
    pallas_port::register_cpu_kernels(&client).expect("register kernels");
    for (d, w, bf16) in [
        (dims(2, 150, 4, 2, 16), None, false),
        (dims(1, 130, 4, 2, 8), Some(40), false),
        (dims(1, 130, 4, 2, 8), Some(40), true),
    ] {
        let case = format!("custom call {d} window {w:?} bf16 {bf16}");
        check_custom_call(&case, &d, d.seq, w, (0, 0), bf16, 11, |b, q, k, v| {
            attention_kernel(b, q, k, v, w).unwrap()
        });
    }
}

/// Naive f64 attention at runtime positions and its VJP: q `[B,Tq,N,H]` (Tq = `d.seq`) at global
/// positions `q0 ..`, k, v `[B,keys,G,H]` at `k0 ..`; key position p is visible to query
/// position t iff 0 ≤ p ≤ t and t − W ≤ p. A query that sees nothing gets o = 0 and no
/// gradient. Returns (o, dq, dk, dv).
#[allow(clippy::too_many_arguments)]
fn naive_at(
    d: &RlaDims,
    keys: usize,
    w: Option<usize>,
    (q0, k0): (i64, i64),
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
) -> [Vec<f64>; 4] {
    let (bs, tq, n, g, h) = (d.batch, d.seq, d.heads, d.kv_heads, d.head_dim);
    let r = n / g;
    let qi = |b: usize, i: usize, hd: usize| ((b * tq + i) * n + hd) * h;
    let ki = |b: usize, s: usize, gi: usize| ((b * keys + s) * g + gi) * h;
    let mut o = vec![0.0; q.len()];
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    for b in 0..bs {
        for hd in 0..n {
            let gi = hd / r;
            for i in 0..tq {
                let t = q0 + i as i64;
                let vis: Vec<usize> = (0..keys)
                    .filter(|&s| {
                        let p = k0 + s as i64;
                        p >= 0 && p <= t && w.is_none_or(|w| t - p <= w as i64)
                    })
                    .collect();
                if vis.is_empty() {
                    continue;
                }
                let dot = |a: &[f32], ai: usize, c: &[f32], ci: usize| -> f64 {
                    (0..h).map(|x| a[ai + x] as f64 * c[ci + x] as f64).sum()
                };
                let sc: Vec<f64> = vis
                    .iter()
                    .map(|&s| dot(q, qi(b, i, hd), k, ki(b, s, gi)))
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / z).collect();
                let dp: Vec<f64> = vis
                    .iter()
                    .map(|&s| dot(d_o, qi(b, i, hd), v, ki(b, s, gi)))
                    .collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(a, c)| a * c).sum();
                for (j, &s) in vis.iter().enumerate() {
                    let ds = p[j] * (dp[j] - pdp);
                    for x in 0..h {
                        o[qi(b, i, hd) + x] += p[j] * v[ki(b, s, gi) + x] as f64;
                        dq[qi(b, i, hd) + x] += ds * k[ki(b, s, gi) + x] as f64;
                        dk[ki(b, s, gi) + x] += ds * q[qi(b, i, hd) + x] as f64;
                        dv[ki(b, s, gi) + x] += p[j] * d_o[qi(b, i, hd) + x] as f64;
                    }
                }
            }
        }
    }
    [o, dq, dk, dv]
}

/// Cases at runtime positions `(dims with Tq, keys, window, (q0, k0))`: a sequence shard's
/// queries against `[halo; own]` keys (shard 0 with its halo before the sequence start masked,
/// a middle shard, W larger than one shard, W = 0), the dense global arm (queries at an offset
/// against all keys, later keys masked), key blocks crossing the query blocks, GQA, B = 2.
/// (dims with Tq, keys, window, (q0, k0)).
type CaseAt = (RlaDims, usize, Option<usize>, (i64, i64));

fn cases_at() -> Vec<CaseAt> {
    vec![
        // shard 0 of 4 (Tq 40), W 24: the halo of 24 zeros sits at −24 ..
        (dims(2, 40, 4, 2, 16), 64, Some(24), (0, -24)),
        // shard 2 of 4, W 24
        (dims(2, 40, 4, 2, 16), 64, Some(24), (80, 56)),
        // W 100 larger than a shard of 40: a halo of 80 (two shards) for shard 2, and shard 1
        // whose halo reaches 60 before the start
        (dims(1, 40, 4, 2, 8), 120, Some(100), (80, 0)),
        (dims(1, 40, 4, 2, 8), 140, Some(100), (40, -60)),
        // W = 0: only the own key; shard 1 with no halo
        (dims(1, 50, 2, 1, 8), 50, Some(0), (50, 50)),
        // several query and key blocks (bq 40, bk 64 at W 40), Tq 150 against 190 keys
        (dims(1, 150, 4, 2, 16), 190, Some(40), (300, 260)),
        // dense global: shard 1 of 3 (Tq 70) against all 210 keys; keys after it masked
        (dims(2, 70, 4, 2, 16), 210, None, (70, 0)),
        // global over a halo that starts before the sequence
        (dims(1, 33, 2, 2, 8), 50, None, (10, -17)),
    ]
}

#[test]
fn kernel_at_positions_matches_f64_reference() {
    for (d, keys, w, (q0, k0)) in cases_at() {
        let case = format!("{d} keys {keys} window {w:?} at ({q0}, {k0})");
        let x = inputs(&d, keys, 17);
        let [q, k, v, d_o] = &x;
        let want = naive_at(&d, keys, w, (q0, k0), q, k, v, d_o);
        let at = Some(AttnPositions { q0, k0 });
        check_kernel(&case, &kernel_outputs(&d, keys, w, at, &x), &want);
    }
}

/// Positions (0, 0) with as many keys as queries are the plain kernel, bit for bit.
#[test]
fn kernel_at_origin_is_the_plain_kernel() {
    for (d, w) in cases() {
        let x = inputs(&d, d.seq, 5);
        let a = kernel_outputs(&d, d.seq, w, Some(AttnPositions::default()), &x);
        let b = kernel_outputs(&d, d.seq, w, None, &x);
        for (x, y) in a.iter().zip(&b) {
            let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(
                same,
                "{d} window {w:?}: attn_*_at at (0, 0) differs from attn_*"
            );
        }
    }
}

/// The custom-call pair at runtime positions through the XLA CPU plugin (positions as an s32[2]
/// constant): forward and the gradients of Σ o ⊙ c against the f64 reference; also bf16 inputs.
#[test]
fn custom_call_at_positions_matches_f64_reference() {
    let client = pjrt::Client::cpu().expect("CPU plugin");
    pallas_port::register_cpu_kernels(&client).expect("register kernels");
    for (i, bf16) in [(0, false), (2, false), (6, false), (1, true)] {
        let (d, keys, w, (q0, k0)) = cases_at()[i];
        let case = format!("custom call {d} keys {keys} window {w:?} at ({q0}, {k0}) bf16 {bf16}");
        check_custom_call(&case, &d, keys, w, (q0, k0), bf16, 23, |b, q, k, v| {
            let pos = b.constant_vec(vec![q0 as i32, k0 as i32], &[2]).unwrap();
            attention_kernel_at(b, q, k, v, w, pos).unwrap()
        });
    }
}
