//! The traced model against the independent f64 reference (DESIGN §2) and AXLearn's numbers, run on
//! the CPU plugin with our RLA kernels registered.

use hlo_builder::{Builder, ElementType, Op, Shape};
use model::config::{FeatureMap, KernelLowering, LayerKind, LocalKind, Lowering, ModelConfig};
use model::reference::{self, AttnDims};
use model::{Attention, Model, ParamOps};
use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use std::collections::HashMap;

mod common;
use common::{
    axlearn_case, client, compile, execute_f32, forward_graph, load_model, loss_grad_graph,
    max_rel, rand, tokens_param, AXLEARN_CASES,
};

/// Compile `comp` and run it on f32/s32 inputs; returns every output as f32.
fn run(
    comp: &hlo_builder::Computation,
    inputs: &[(Vec<f32>, Vec<i64>)],
    ints: &[(Vec<i32>, Vec<i64>)],
) -> Vec<Vec<f32>> {
    let c = client();
    let exe = compile(comp);
    let mut bufs: Vec<pjrt::Buffer> = inputs
        .iter()
        .map(|(d, s)| c.buffer_from_host(d, s, None).unwrap())
        .collect();
    bufs.extend(
        ints.iter()
            .map(|(d, s)| c.buffer_from_host(d, s, None).unwrap()),
    );
    execute_f32(&exe, &bufs)
}

/// [`run`] on host parameters `params`, then `toks` as s32 `[bs, len / bs]`.
fn run_with_tokens(
    comp: &hlo_builder::Computation,
    params: &[(Vec<f32>, Vec<i64>)],
    toks: &[u32],
    bs: usize,
) -> Vec<Vec<f32>> {
    let dims = vec![bs as i64, (toks.len() / bs) as i64];
    run(
        comp,
        params,
        &[(toks.iter().map(|&x| x as i32).collect(), dims)],
    )
}

fn tiny(window: usize, fm: FeatureMap) -> ModelConfig {
    let mut cfg = load_model("tiny-3to1");
    cfg.window = window;
    cfg.rla.feature_map = fm;
    cfg.rla.lowering = Lowering::CustomCall;
    cfg
}

/// Attention dims: batch `b`, length `t`, and `[n, g, h]` (query heads, kv heads, head dim).
fn attn_dims(b: usize, t: usize, [n, g, h]: [usize; 3]) -> AttnDims {
    AttnDims { b, t, n, g, h }
}

/// [`tiny`] with the heads and head dim of `d`.
fn tiny_for(window: usize, fm: FeatureMap, d: AttnDims) -> ModelConfig {
    let mut cfg = tiny(window, fm);
    (cfg.heads, cfg.kv_heads, cfg.head_dim) = (d.n, d.g, d.h);
    cfg
}

/// An f32 parameter of dims `dims`.
fn f32_param(b: &Builder, dims: &[usize], name: &str) -> Op {
    let dims: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
    b.parameter(Shape::array(ElementType::F32, &dims), name)
        .unwrap()
}

/// Parameters q `[b, t, n, h]`, k and v `[b, t, g, h]`.
fn qkv_params(b: &Builder, d: AttnDims) -> [Op; 3] {
    [
        f32_param(b, &[d.b, d.t, d.n, d.h], "q"),
        f32_param(b, &[d.b, d.t, d.g, d.h], "k"),
        f32_param(b, &[d.b, d.t, d.g, d.h], "v"),
    ]
}

/// Random q `[b, t, n, h]`, k and v `[b, t, g, h]` in [-1, 1) from seeds `seed`, `seed + 1`,
/// `seed + 2`.
fn rand_qkv(d: AttnDims, seed: u64) -> [Vec<f32>; 3] {
    [
        rand(d.b * d.t * d.n * d.h, seed, 1.0),
        rand(d.b * d.t * d.g * d.h, seed + 1, 1.0),
        rand(d.b * d.t * d.g * d.h, seed + 2, 1.0),
    ]
}

/// q, k, v as the inputs of [`run`] for the graphs of [`qkv_params`].
fn qkv_inputs(d: AttnDims, [q, k, v]: &[Vec<f32>; 3]) -> Vec<(Vec<f32>, Vec<i64>)> {
    let dims = |x: [usize; 4]| x.iter().map(|&v| v as i64).collect::<Vec<_>>();
    vec![
        (q.clone(), dims([d.b, d.t, d.n, d.h])),
        (k.clone(), dims([d.b, d.t, d.g, d.h])),
        (v.clone(), dims([d.b, d.t, d.g, d.h])),
    ]
}

fn f64v(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// −log softmax(`row`)[`target`] in f64.
fn nll(row: &[f64], target: u32) -> f64 {
    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
    lse - row[target as usize]
}

/// Unit norm scales of layer `l` (both branches) and positions `0..t`: the inputs
/// `attention_core` takes besides q, k, v.
fn unit_scales_and_positions(b: &Builder, d: AttnDims) -> (ParamOps, Op) {
    let mut p: ParamOps = HashMap::new();
    for name in ["l.swa_norm.scale", "l.rla_norm.scale"] {
        p.insert(
            name.into(),
            b.ones(ElementType::F32, &[d.n as i64, d.h as i64]).unwrap(),
        );
    }
    let pos = b.iota(ElementType::F32, &[d.t as i64], 0).unwrap();
    (p, pos)
}

/// Build the local attention core from q, k, v parameters with unit norm scales as parameters.
fn local_core_graph(
    cfg: &ModelConfig,
    d: AttnDims,
    kind: LayerKind,
) -> (hlo_builder::Computation, [Op; 3]) {
    let b = Builder::new("local_core");
    let [q, k, v] = qkv_params(&b, d);
    let (p, pos) = unit_scales_and_positions(&b, d);
    let m = Model::new(cfg.clone()).unwrap();
    let attn = Attention::resolve(kind, cfg.local_kind);
    let out = m
        .attention_core(&b, &p, "l", attn, (q, k, v), pos, "cpu")
        .unwrap();
    (b.build(out).unwrap(), [q, k, v])
}

#[test]
fn local_layer_matches_f64_reference() {
    // GQA, windows that leave RLA active (not multiples of the sub-chunk), both feature maps.
    for (w, fm, t) in [
        (5, FeatureMap::Softmax, 48),
        (17, FeatureMap::Relu, 70),
        (0, FeatureMap::Softmax, 33),
    ] {
        let d = attn_dims(2, t, [4, 2, 8]);
        let cfg = tiny_for(w, fm, d);
        let qkv = rand_qkv(d, 1);
        let [q, k, v] = &qkv;
        let (comp, _) = local_core_graph(&cfg, d, LayerKind::Local);
        let got = run(&comp, &qkv_inputs(d, &qkv), &[]);
        let want = reference::local_layer(&f64v(q), &f64v(k), &f64v(v), d, w, cfg.rope_theta, fm);
        let err = max_rel(&got[0], &want.mixed);
        assert!(err < 1e-4, "w={w} {fm:?}: local layer error {err}");
    }
}

#[test]
fn global_layer_with_rope_matches_f64_reference() {
    // `global_rope`: full causal attention with RoPE at true positions (GQA, T = 70, a small
    // base so the rotation wraps many times) against the naive f64 attention; without the
    // switch the same layer is the NoPE attention, and the two differ.
    let d = attn_dims(2, 70, [4, 2, 8]);
    let qkv = rand_qkv(d, 11);
    let [q, k, v] = &qkv;
    let mut outs = Vec::new();
    for global_rope in [true, false] {
        let mut cfg = tiny_for(5, FeatureMap::Softmax, d);
        cfg.rope_theta = 50.0;
        cfg.global_rope = global_rope;
        let (comp, _) = local_core_graph(&cfg, d, LayerKind::Global);
        let got = run(&comp, &qkv_inputs(d, &qkv), &[]);
        let theta = global_rope.then_some(cfg.rope_theta);
        let want = reference::attention(&f64v(q), &f64v(k), &f64v(v), d, theta, |t, s| s <= t);
        let err = max_rel(&got[0], &want);
        eprintln!("global layer, global_rope = {global_rope}: max rel error {err:.1e}");
        assert!(err < 1e-5, "global_rope = {global_rope}: error {err}");
        outs.push(want);
    }
    let diff = outs[0]
        .iter()
        .zip(&outs[1])
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff > 0.1,
        "RoPE changed the global layer's output by only {diff}"
    );
}

#[test]
fn full_rope_model_logits_match_f64_reference() {
    // Every layer global with RoPE (the paper's full-attention baseline), qk-norm on.
    let mut cfg = tiny(6, FeatureMap::Softmax);
    cfg.seq_len = 40;
    cfg.qk_norm = true;
    cfg.global_rope = true;
    cfg.rope_theta = 100.0;
    cfg.layer_pattern = model::config::LayerPattern::Ratio("0:1".into());
    let m = Model::new(cfg.clone()).unwrap();
    assert!(m.layers().iter().all(|&a| a == Attention::Global));
    let (got, want) = logits_and_reference(&cfg);
    let e = max_rel(&got, &want);
    assert!(e < 1e-4, "logits relative error {e}");
}

fn get(z: &mut NpzReader<std::fs::File>, k: &str) -> Vec<f32> {
    let a: ArrayD<f32> = z.by_name(k).unwrap();
    a.iter().copied().collect()
}

#[test]
fn local_layer_and_its_vjp_match_axlearn() {
    for (file, fm) in AXLEARN_CASES {
        let (mut z, d, window) = axlearn_case(file);
        let cfg = tiny_for(window, fm, d);
        // Forward + VJP in one graph: outputs (local_out, swa_out, dq, dk, dv).
        let b = Builder::new("local_vjp");
        let [q, k, v] = qkv_params(&b, d);
        let cot = f32_param(&b, &[d.b, d.t, d.n, d.h], "cot");
        let (p, pos) = unit_scales_and_positions(&b, d);
        let m = Model::new(cfg.clone()).unwrap();
        let out = m
            .attention_core(&b, &p, "l", Attention::Rattention, (q, k, v), pos, "cpu")
            .unwrap();
        let swa = m.swa_baseline();
        let swa = swa
            .attention_core(&b, &p, "s", Attention::Swa, (q, k, v), pos, "cpu")
            .unwrap();
        let g = b.vjp(&[out], &[cot], &[q, k, v]).unwrap();
        let root = b.tuple(&[out, swa, g[0], g[1], g[2]]).unwrap();
        let comp = b.build(root).unwrap();
        let qkv = ["q", "k", "v"].map(|key| get(&mut z, key));
        let mut inputs = qkv_inputs(d, &qkv);
        inputs.push((get(&mut z, "d_local_cot"), inputs[0].1.clone()));
        let got = run(&comp, &inputs, &[]);
        let abs = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        let tol_fwd = 1e-4;
        assert!(
            abs(&got[1], &get(&mut z, "swa_out")) < 1e-5,
            "{file}: swa_out"
        );
        assert!(
            abs(&got[0], &get(&mut z, "local_out")) < tol_fwd,
            "{file}: local_out {}",
            abs(&got[0], &get(&mut z, "local_out"))
        );
        for (i, key) in [(2, "local_dq"), (3, "local_dk"), (4, "local_dv")] {
            let want = get(&mut z, key);
            let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            let e = abs(&got[i], &want) / scale;
            assert!(e < 1e-4, "{file}: {key} relative error {e}");
        }
    }
}

#[test]
fn window_at_least_t_gives_full_attention_and_zero_rla() {
    let t = 40;
    let d = attn_dims(1, t, [2, 1, 8]);
    let mut cfg = tiny_for(t + 3, FeatureMap::Softmax, d);
    let qkv = rand_qkv(d, 7);
    let [q, k, v] = &qkv;
    let ins = qkv_inputs(d, &qkv);
    // RAttention with W >= T: RLA sees nothing, so the layer is GroupRMSNorm(SWA) = GroupRMSNorm(full causal, RoPE).
    let (comp, _) = local_core_graph(&cfg, d, LayerKind::Local);
    let got = run(&comp, &ins, &[]);
    let full = reference::attention(
        &f64v(q),
        &f64v(k),
        &f64v(v),
        d,
        Some(cfg.rope_theta),
        |t, s| s <= t,
    );
    let want = reference::group_rms_norm(&full, d.n, d.h, &vec![1.0; d.n * d.h], 1e-8);
    assert!(max_rel(&got[0], &want) < 1e-4);
    // SWA-only layer with W >= T equals full causal attention with RoPE.
    cfg.local_kind = LocalKind::Swa;
    let (comp, _) = local_core_graph(&cfg, d, LayerKind::Local);
    assert!(max_rel(&run(&comp, &ins, &[])[0], &full) < 1e-5);
}

type HostParams = (Vec<(Vec<f32>, Vec<i64>)>, HashMap<String, Vec<f32>>);

fn tiny_params(cfg: &ModelConfig, seed: u64) -> HostParams {
    let m = Model::new(cfg.clone()).unwrap();
    let specs = m.param_specs();
    let mut map = HashMap::new();
    let mut list = Vec::new();
    for s in specs {
        let mut v = model::init_param(s, seed);
        if s.name.ends_with(".scale") {
            // Non-trivial norm scales so the test sees them.
            let r = rand(v.len(), 99, 0.3);
            v.iter_mut().zip(r).for_each(|(x, r)| *x += r);
        }
        if s.name.starts_with("embed") || s.name.contains(".w") {
            v.iter_mut().for_each(|x| *x *= 5.0);
        }
        map.insert(s.name.clone(), v.clone());
        list.push((v, s.shape.iter().map(|&d| d as i64).collect()));
    }
    (list, map)
}

/// Logits of `cfg`'s model (batch 2, T = `cfg.seq_len`, [`tiny_params`] of seed 3, fixed tokens)
/// on the CPU plugin and from the f64 reference.
fn logits_and_reference(cfg: &ModelConfig) -> (Vec<f32>, Vec<f64>) {
    let (bs, t) = (2usize, cfg.seq_len);
    let m = Model::new(cfg.clone()).unwrap();
    let comp = forward_graph(&m, bs, t);
    let (params, map) = tiny_params(cfg, 3);
    let toks: Vec<u32> = (0..bs * t)
        .map(|i| ((i * 37 + 11) % cfg.vocab) as u32)
        .collect();
    let got = run_with_tokens(&comp, &params, &toks, bs);
    let want = reference::logits(&m, &map, &toks, bs);
    (got.into_iter().next().unwrap(), want)
}

#[test]
fn tiny_model_logits_match_f64_reference() {
    let mut cfg = tiny(6, FeatureMap::Softmax);
    cfg.seq_len = 40;
    cfg.qk_norm = true;
    let (got, want) = logits_and_reference(&cfg);
    let e = max_rel(&got, &want);
    assert!(e < 1e-4, "logits relative error {e}");
}

/// Logits of the tiny 3:1 model (W = 6, T = 40, qk-norm, non-trivial norm scales) on the CPU
/// plugin and from the f64 reference, for one `rla.norm` setting.
fn tiny_logits_and_reference(rla_norm: bool) -> (Vec<f32>, Vec<f64>) {
    let mut cfg = tiny(6, FeatureMap::Softmax);
    cfg.seq_len = 40;
    cfg.qk_norm = true;
    cfg.rla.norm = rla_norm;
    logits_and_reference(&cfg)
}

#[test]
fn rla_norm_off_logits_match_f64_reference_and_differ_from_norm_on() {
    // The ablation `rla.norm = false`: ctx = GroupRMSNorm_swa(o_swa) + o_rla, no rla_norm.scale.
    let (got, want) = tiny_logits_and_reference(false);
    let e = max_rel(&got, &want);
    assert!(e < 1e-4, "norm-off logits relative error {e}");
    // The switch changes the model: the same weights (minus rla_norm.scale) give other logits.
    let (on, _) = tiny_logits_and_reference(true);
    let diff = max_rel(&got, &on);
    assert!(
        diff > 1e-3,
        "norm on and off gave the same logits (rel diff {diff})"
    );
    let names: Vec<String> = {
        let mut cfg = tiny(6, FeatureMap::Softmax);
        cfg.rla.norm = false;
        let m = Model::new(cfg).unwrap();
        m.param_specs().iter().map(|s| s.name.clone()).collect()
    };
    assert!(names.iter().any(|n| n.ends_with("swa_norm.scale")));
    assert!(!names.iter().any(|n| n.ends_with("rla_norm.scale")));
}

#[test]
fn weighted_loss_matches_the_f64_reference_and_checks_its_weights() {
    let mut cfg = tiny(5, FeatureMap::Softmax);
    cfg.seq_len = 20;
    let (bs, t) = (2usize, 20usize);
    let model = Model::new(cfg.clone()).unwrap();
    let b = Builder::new("weighted_loss");
    let (_, named) = model.declare_params(&b).unwrap();
    let tokens = tokens_param(&b, bs, t + 1);
    let weights = b
        .parameter(
            Shape::array(ElementType::F32, &[bs as i64, t as i64]),
            "weights",
        )
        .unwrap();
    let l = model
        .weighted_loss(&b, &named, tokens, weights, "cpu")
        .unwrap();
    let (plist, map) = tiny_params(&cfg, 5);
    let toks: Vec<u32> = (0..bs * (t + 1))
        .map(|i| ((i * 29 + 7) % cfg.vocab) as u32)
        .collect();
    // f64: logits of each sequence's first t tokens, nll of the next token, weighted mean.
    let nlls: Vec<f64> = (0..bs)
        .flat_map(|s| {
            let seq = &toks[s * (t + 1)..][..t + 1];
            let logits = reference::logits(&model, &map, &seq[..t], 1);
            let v = cfg.vocab;
            (0..t)
                .map(|p| nll(&logits[p * v..][..v], seq[p + 1]))
                .collect::<Vec<_>>()
        })
        .collect();
    // Parameters, tokens, then the weights: the builder's parameter order.
    let c = client();
    let exe = compile(&b.build(l).unwrap());
    let mut bufs: Vec<pjrt::Buffer> = plist
        .iter()
        .map(|(d, s)| c.buffer_from_host(d, s, None).unwrap())
        .collect();
    let tok: Vec<i32> = toks.iter().map(|&x| x as i32).collect();
    bufs.push(
        c.buffer_from_host(&tok, &[bs as i64, t as i64 + 1], None)
            .unwrap(),
    );
    // Every third target scored, a few with weight 2.5; then no target scored at all (loss 0).
    let some: Vec<f32> = (0..bs * t)
        .map(|i| match i % 7 {
            0 => 2.5,
            _ if i % 3 == 0 => 1.0,
            _ => 0.0,
        })
        .collect();
    for w in [some, vec![0.0; bs * t]] {
        let total: f64 = w.iter().map(|&x| x as f64).sum();
        let want = nlls.iter().zip(&w).map(|(n, &x)| n * x as f64).sum::<f64>() / total.max(1.0);
        let wb = c
            .buffer_from_host(&w, &[bs as i64, t as i64], None)
            .unwrap();
        let mut args: Vec<&pjrt::Buffer> = bufs.iter().collect();
        args.push(&wb);
        let got = exe.execute(&args).unwrap()[0].to_host::<f32>().unwrap()[0] as f64;
        assert!(
            (got - want).abs() < 1e-4 * want.abs().max(1.0),
            "weighted loss {got} vs f64 {want} (total weight {total})"
        );
    }
    // Weights of the wrong shape are refused, naming both shapes.
    let b = Builder::new("bad_weights");
    let (_, named) = model.declare_params(&b).unwrap();
    let tokens = b
        .parameter(Shape::array(ElementType::S32, &[2, 21]), "tokens")
        .unwrap();
    let weights = b
        .parameter(Shape::array(ElementType::F32, &[2, 21]), "weights")
        .unwrap();
    let e = model
        .weighted_loss(&b, &named, tokens, weights, "cpu")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("weights f32[2, 21] must be [batch, T] = [2, 20] for tokens s32[2, 21]"),
        "{e}"
    );
}

/// The loss, the RMS norms and the embedding as our CPU kernel pairs (`model.loss_lowering`,
/// `norm_lowering`, `embed_lowering` = "kernel": `rattention.xent_*`, `rattention.rms_norm_*`,
/// `rattention.embed_*`, each alone and all three) against the HLO lowerings on the same model
/// (RAttention and global layers) and tokens (a few out of the vocabulary, which both clamp or
/// skip alike): the loss within 1e-6 relative and every parameter's gradient within 1e-5 of its
/// largest value (the kernels themselves are tested against f64 naive formulas in
/// `pallas_port::kernel::{cross_entropy, rms_norm, embed}`).
#[test]
fn loss_norm_and_embed_kernels_match_hlo_with_gradients() {
    use KernelLowering::{Hlo, Kernel};
    let mut cfg = tiny(5, FeatureMap::Softmax);
    cfg.seq_len = 24;
    let (bs, t) = (2usize, 24usize);
    let (plist, _) = tiny_params(&cfg, 9);
    let values: Vec<Vec<f32>> = plist.iter().map(|(d, _)| d.clone()).collect();
    let toks: Vec<i32> = (0..bs * (t + 1))
        .map(|i| match i % 17 {
            4 => -3,
            9 => cfg.vocab as i32 + 5,
            _ => ((i * 31 + 3) % cfg.vocab) as i32,
        })
        .collect();
    let mut outs = Vec::new();
    let cases = [
        [Hlo, Hlo, Hlo],
        [Kernel, Hlo, Hlo],
        [Hlo, Kernel, Hlo],
        [Hlo, Hlo, Kernel],
        [Kernel, Kernel, Kernel],
    ];
    for [loss, norm, embed] in cases {
        (cfg.loss_lowering, cfg.norm_lowering, cfg.embed_lowering) = (loss, norm, embed);
        let m = Model::new(cfg.clone()).unwrap();
        let comp = loss_grad_graph(&m, bs, t);
        let text = comp.to_text();
        assert_eq!(
            text.contains("rattention.xent_bwd"),
            loss == Kernel,
            "loss {loss}"
        );
        assert_eq!(
            text.contains("rattention.rms_norm_bwd"),
            norm == Kernel,
            "norm {norm}"
        );
        assert_eq!(
            text.contains("rattention.embed_bwd"),
            embed == Kernel,
            "embed {embed}"
        );
        outs.push(common::run_on_params(
            &compile(&comp),
            &m,
            &values,
            &toks,
            bs,
        ));
    }
    let h = &outs[0];
    let m = Model::new(cfg.clone()).unwrap();
    for (case, k) in cases.iter().zip(&outs).skip(1) {
        let e = ((k[0][0] - h[0][0]) / h[0][0]).abs();
        eprintln!(
            "loss/norm/embed {case:?}: {} vs hlo {} (rel {e:.1e})",
            k[0][0], h[0][0]
        );
        assert!(e < 1e-6, "{case:?}: loss {} vs hlo {}", k[0][0], h[0][0]);
        for (spec, (gk, gh)) in m.param_specs().iter().zip(k[1..].iter().zip(&h[1..])) {
            let scale = gh.iter().fold(0.0f32, |a, x| a.max(x.abs())).max(1e-30);
            let diff = gk
                .iter()
                .zip(gh)
                .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            let e = diff / scale;
            assert!(e < 1e-5, "{case:?}: {} gradient vs hlo {e:.1e}", spec.name);
        }
    }
}

#[test]
fn loss_gradients_match_finite_differences_of_the_f64_reference() {
    let mut cfg = tiny(5, FeatureMap::Softmax);
    cfg.seq_len = 24;
    cfg.layers = 4;
    let (bs, t) = (1usize, 24usize);
    let model = Model::new(cfg.clone()).unwrap();
    let comp = loss_grad_graph(&model, bs, t);
    let (plist, map) = tiny_params(&cfg, 4);
    let toks: Vec<u32> = (0..bs * (t + 1))
        .map(|i| ((i * 53 + 5) % cfg.vocab) as u32)
        .collect();
    let got = run_with_tokens(&comp, &plist, &toks, bs);
    // f64 loss from the reference logits.
    let loss64 = |m: &HashMap<String, Vec<f32>>, delta: Option<(&str, usize, f64)>| -> f64 {
        let mut m64: HashMap<String, Vec<f32>> = m.clone();
        let mut bump = 0.0;
        if let Some((name, i, h)) = delta {
            // Perturb in f64 by scaling: keep the f32 value and add the residual through a second key.
            let x = &mut m64.get_mut(name).unwrap()[i];
            let new = *x as f64 + h;
            bump = new - (new as f32) as f64;
            *x = new as f32;
        }
        let _ = bump;
        let inputs: Vec<u32> = toks[..t].to_vec();
        let logits = reference::logits(&model, &m64, &inputs, bs);
        let v = cfg.vocab;
        (0..t)
            .map(|p| nll(&logits[p * v..][..v], toks[p + 1]))
            .sum::<f64>()
            / t as f64
    };
    let l0 = loss64(&map, None);
    assert!(
        (got[0][0] as f64 - l0).abs() < 1e-4 * l0.abs().max(1.0),
        "loss {} vs {l0}",
        got[0][0]
    );
    let specs = model.param_specs();
    // Spot-check entries of a local layer's projections (through SWA + RLA), the mixing norm, the FFN and the embedding.
    for name in [
        "layers.0.attn.wq",
        "layers.1.attn.wk",
        "layers.2.attn.wv",
        "layers.0.attn.rla_norm.scale",
        "layers.3.attn.wq",
        "layers.1.ffn.w_up",
        "embed",
    ] {
        let pi = specs.iter().position(|s| s.name == name).unwrap();
        let g = &got[1 + pi];
        // The entry with the largest analytic gradient: well above FD noise.
        let (i, &gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let h = 1e-3;
        let fd = (loss64(&map, Some((name, i, h))) - loss64(&map, Some((name, i, -h)))) / (2.0 * h);
        let err = (gi as f64 - fd).abs() / fd.abs().max(1e-3);
        assert!(
            err < 2e-2,
            "{name}[{i}]: autodiff {gi} vs finite difference {fd} (rel {err})"
        );
    }
}
