//! The blocked causal attention (`model::attention`) against an f64 naive formula (forward and
//! VJP, written here) and against the earlier whole-matrix version `causal_attention_dense`
//! (forward and autodiff gradients): GQA, sequence lengths that are not multiples of the blocks,
//! window 0, small windows, windows ≥ T, the default block sizes and small ones.

use hlo_builder::{Builder, ElementType, Op, Shape};
use model::attention::{causal_attention_dense, causal_attention_with, AttentionBlocks};
use model::reference::{self, AttnDims};

mod common;
use common::{client, compile, rand};

/// max |got − want| / max(max |want|, 0.1): relative, except that a cotangent which is exactly
/// zero in exact arithmetic (dq with one visible key per query) is held to 1e-5 absolute.
fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().map(|x| x.abs()).fold(0.1, f64::max);
    got.iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max)
        / scale
}

/// f64 naive causal attention (q already scaled) and its VJP for cotangent `d_o`:
/// returns `(o, dq, dk, dv)`. Key s is visible to query t iff s ≤ t and t − s ≤ window.
#[allow(clippy::type_complexity)]
fn naive(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
    d: AttnDims,
    window: Option<usize>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut o, mut dq) = (vec![0.0; q.len()], vec![0.0; q.len()]);
    let (mut dk, mut dv) = (vec![0.0; k.len()], vec![0.0; k.len()]);
    let qi = |b: usize, t: usize, n: usize| ((b * d.t + t) * d.n + n) * d.h;
    let ki = |b: usize, t: usize, g: usize| ((b * d.t + t) * d.g + g) * d.h;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for b in 0..d.b {
        for n in 0..d.n {
            let g = n / (d.n / d.g);
            for t in 0..d.t {
                let keys: Vec<usize> = (0..=t)
                    .filter(|&s| window.is_none_or(|w| t - s <= w))
                    .collect();
                let qt = &q[qi(b, t, n)..][..d.h];
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&s| dot(qt, &k[ki(b, s, g)..][..d.h]))
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
                let dot_ = &d_o[qi(b, t, n)..][..d.h];
                for (j, &s) in keys.iter().enumerate() {
                    for e in 0..d.h {
                        o[qi(b, t, n) + e] += p[j] * v[ki(b, s, g) + e];
                        dv[ki(b, s, g) + e] += p[j] * dot_[e];
                    }
                }
                // dS_j = p_j (dO·v_j − Σ_i p_i dO·v_i)
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&s| dot(dot_, &v[ki(b, s, g)..][..d.h]))
                    .collect();
                let mean: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (j, &s) in keys.iter().enumerate() {
                    let ds = p[j] * (dp[j] - mean);
                    for e in 0..d.h {
                        dq[qi(b, t, n) + e] += ds * k[ki(b, s, g) + e];
                        dk[ki(b, s, g) + e] += ds * q[qi(b, t, n) + e];
                    }
                }
            }
        }
    }
    (o, dq, dk, dv)
}

/// Builds one graph with parameters q, k, v and c that computes, for `attn(b, 0, q, k, v)` and
/// then `attn(b, 1, q, k, v)`, the output o and the gradients of Σ o ⊙ c, and runs it through the
/// CPU plugin on the host `[q, k, v, c]`: returns o, dq, dk, dv of the first, then of the second.
fn run_pair(
    name: &str,
    d: AttnDims,
    host: [&[f32]; 4],
    attn: impl Fn(&Builder, usize, Op, Op, Op) -> Op,
) -> Vec<Vec<f32>> {
    let b = Builder::new(name);
    let p = |dims: [usize; 4], name: &str| {
        let dims: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
        b.parameter(Shape::array(ElementType::F32, &dims), name)
            .unwrap()
    };
    let q = p([d.b, d.t, d.n, d.h], "q");
    let k = p([d.b, d.t, d.g, d.h], "k");
    let v = p([d.b, d.t, d.g, d.h], "v");
    let c = p([d.b, d.t, d.n, d.h], "c");
    let mut outs = Vec::new();
    for i in 0..2 {
        let o = attn(&b, i, q, k, v);
        let loss = b.reduce_sum(b.mul(o, c).unwrap(), &[0, 1, 2, 3]).unwrap();
        let g = b.grad(loss, &[q, k, v]).unwrap();
        outs.extend([o, g[0], g[1], g[2]]);
    }
    let comp = b.build(b.tuple(&outs).unwrap()).unwrap();
    let cl = client();
    let sh = |x: usize| vec![d.b as i64, d.t as i64, x as i64, d.h as i64];
    let bufs: Vec<pjrt::Buffer> = host
        .iter()
        .zip([d.n, d.g, d.g, d.n])
        .map(|(x, heads)| cl.buffer_from_host(x, &sh(heads), None).unwrap())
        .collect();
    let refs: Vec<&pjrt::Buffer> = bufs.iter().collect();
    compile(&comp)
        .execute(&refs)
        .unwrap()
        .iter()
        .map(|x| x.to_host::<f32>().unwrap())
        .collect()
}

/// Runs blocked and dense attention (forward and gradients of Σ o ⊙ d_o) in one graph and checks
/// both against [`naive`], and the blocked against the dense.
fn check(d: AttnDims, window: Option<usize>, blocks: AttentionBlocks) {
    let (nq, nk) = (d.b * d.t * d.n * d.h, d.b * d.t * d.g * d.h);
    let hq = rand(nq, 1, 1.5);
    let hk = rand(nk, 2, 1.5);
    let hv = rand(nk, 3, 1.0);
    let hd = rand(nq, 4, 1.0);
    let got = run_pair(
        "attention_test",
        d,
        [&hq, &hk, &hv, &hd],
        |b, i, q, k, v| {
            if i == 1 {
                causal_attention_dense(b, q, k, v, window).unwrap()
            } else {
                causal_attention_with(b, q, k, v, window, blocks).unwrap()
            }
        },
    );
    let f64s = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let (o, dq, dk, dv) = naive(&f64s(&hq), &f64s(&hk), &f64s(&hv), &f64s(&hd), d, window);
    // The forward also against the model's reference (which scales q by H^-1/2 itself).
    let sq: Vec<f64> = hq.iter().map(|&a| a as f64 * (d.h as f64).sqrt()).collect();
    let o_ref = reference::attention(&sq, &f64s(&hk), &f64s(&hv), d, None, |t, s| {
        s <= t && window.is_none_or(|w| t - s <= w)
    });
    let what = format!("{d:?} window {window:?} {blocks:?}");
    assert!(
        max_rel(&got[0], &o_ref) < 1e-5,
        "{what}: o vs reference::attention"
    );
    for (impl_, off) in [("blocked", 0), ("dense", 4)] {
        for (name, i, want, tol) in [
            ("o", 0, &o, 1e-5),
            ("dq", 1, &dq, 1e-4),
            ("dk", 2, &dk, 1e-4),
            ("dv", 3, &dv, 1e-5),
        ] {
            let e = max_rel(&got[off + i], want);
            assert!(e < tol, "{what}: {impl_} {name} vs f64 naive: {e:.2e}");
        }
    }
    for (name, i) in [("o", 0), ("dq", 1), ("dk", 2), ("dv", 3)] {
        let dense: Vec<f64> = f64s(&got[4 + i]);
        let e = max_rel(&got[i], &dense);
        assert!(e < 1e-5, "{what}: blocked {name} vs dense: {e:.2e}");
    }
}

const SMALL: AttentionBlocks = AttentionBlocks {
    global: 16,
    banded: 8,
};

#[test]
fn global_attention_matches_naive_and_dense() {
    for t in [1, 37, 100] {
        let d = AttnDims {
            b: 2,
            t,
            n: 4,
            g: 2,
            h: 16,
        };
        check(d, None, SMALL);
    }
    // Default sizes: two blocks, the last one ragged.
    let d = AttnDims {
        b: 1,
        t: 300,
        n: 4,
        g: 2,
        h: 16,
    };
    check(d, None, AttentionBlocks::for_shape(300, None));
}

#[test]
fn windowed_attention_matches_naive_and_dense() {
    let d = AttnDims {
        b: 2,
        t: 37,
        n: 4,
        g: 2,
        h: 16,
    };
    // Window 0 (each query sees itself), windows smaller and larger than the block, W = T − 2
    // (the last banded case), and windows ≥ T − 1 (global).
    for w in [0, 5, 13, 35, 36, 50] {
        check(d, Some(w), SMALL);
    }
    let d = AttnDims {
        b: 1,
        t: 100,
        n: 4,
        g: 1,
        h: 16,
    };
    for w in [7, 32] {
        check(d, Some(w), AttentionBlocks::for_shape(100, Some(w)));
    }
}

/// The CPU kernels' custom-call pair (`pallas_port::attention::attention_kernel`) against the
/// HLO lowering ([`causal_attention`]) through the CPU plugin: the output and the gradients of
/// Σ o ⊙ c agree within 1e-5 (norm-relative), global and windowed, with a ragged T.
#[test]
fn kernel_lowering_matches_hlo_lowering() {
    let d = AttnDims {
        b: 2,
        t: 300,
        n: 4,
        g: 2,
        h: 16,
    };
    for window in [None, Some(0), Some(20), Some(150)] {
        let (nq, nk) = (d.b * d.t * d.n * d.h, d.b * d.t * d.g * d.h);
        let host = [
            rand(nq, 11, 1.5),
            rand(nk, 12, 1.5),
            rand(nk, 13, 1.0),
            rand(nq, 14, 1.0),
        ];
        let inputs = [&host[0][..], &host[1], &host[2], &host[3]];
        let got = run_pair("attention_kernel_vs_hlo", d, inputs, |b, i, q, k, v| {
            if i == 0 {
                pallas_port::attention::attention_kernel(b, q, k, v, window).unwrap()
            } else {
                model::attention::causal_attention(b, q, k, v, window).unwrap()
            }
        });
        for (i, name) in ["o", "dq", "dk", "dv"].iter().enumerate() {
            let hlo: Vec<f64> = got[4 + i].iter().map(|&x| x as f64).collect();
            let scale = hlo.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let diff = got[i]
                .iter()
                .zip(&hlo)
                .fold(0.0f64, |m, (&a, b)| m.max((a as f64 - b).abs()));
            // With W = 0 each query sees one key: dq = dk = 0 exactly, and the lowerings return
            // rounding noise of dO·V − dO·O summed in different orders (≤ 2e-6), so the scale is
            // floored at 1 (the other gradients are O(1)).
            let e = diff / scale.max(1.0);
            eprintln!("window {window:?}: {name} kernel vs hlo {e:.2e} (scale {scale:.1e})");
            assert!(e < 1e-5, "window {window:?}: {name} kernel vs hlo: {e:.2e}");
        }
    }
}
