//! Shared setup for the model tests: the CPU client with the RLA kernels registered, compiling,
//! deterministic inputs, the repository's configs and AXLearn data files, an error measure, and
//! what the decode tests compare against (random parameters, full-forward logits, argmax).
#![allow(dead_code)]

use std::sync::OnceLock;

use hlo_builder::{Builder, ElementType, Shape};
use model::config::{FeatureMap, Lowering, ModelConfig};
use model::reference::AttnDims;
use model::Model;
use ndarray::ArrayD;
use ndarray_npy::NpzReader;

/// The process-wide CPU client, with pallas-port's RLA kernels registered.
pub fn client() -> &'static pjrt::Client {
    static C: OnceLock<pjrt::Client> = OnceLock::new();
    C.get_or_init(|| {
        let c = pjrt::Client::cpu().expect("CPU plugin");
        pallas_port::register_cpu_kernels(&c).expect("register RLA kernels");
        c
    })
}

/// Compiles `comp` on [`client`] with default options.
pub fn compile(comp: &hlo_builder::Computation) -> pjrt::LoadedExecutable {
    client()
        .compile(
            pjrt::Program::Hlo(&comp.to_bytes()),
            &pjrt::CompileOptions::default(),
        )
        .unwrap_or_else(|e| panic!("compiling {}: {e}", comp.name()))
}

/// `n` deterministic values in `[-scale, scale)` (an LCG).
pub fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The `[model]` table of `configs/{name}.toml`.
pub fn load_model(name: &str) -> ModelConfig {
    let text = std::fs::read_to_string(format!(
        "{}/../../configs/{name}.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut t: toml::Table = toml::from_str(&text).unwrap();
    t.remove("model").unwrap().try_into().unwrap()
}

/// The AXLearn reference files in `tests/data/` and the feature map each was made with.
pub const AXLEARN_CASES: [(&str, FeatureMap); 2] = [
    ("axlearn_rla_softmax_gqa_w37.npz", FeatureMap::Softmax),
    ("axlearn_rla_relu_mqa_w0.npz", FeatureMap::Relu),
];

/// Opens `tests/data/{file}` (an AXLearn reference file) and reads the attention dims and the
/// window from its `config` array (`[b, n, g, t, h, window]`).
pub fn axlearn_case(file: &str) -> (NpzReader<std::fs::File>, AttnDims, usize) {
    let p = format!("{}/../../tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut z = NpzReader::new(std::fs::File::open(p).unwrap()).unwrap();
    let c: ArrayD<i64> = z.by_name("config").unwrap();
    let c: Vec<usize> = c.iter().map(|&x| x as usize).collect();
    let d = AttnDims {
        b: c[0],
        n: c[1],
        g: c[2],
        t: c[3],
        h: c[4],
    };
    (z, d, c[5])
}

/// max |got − want| / max |want| (the scale floored at 1e-6).
pub fn max_rel<W: Copy + Into<f64>>(got: &[f32], want: &[W]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().map(|&x| x.into().abs()).fold(1e-6, f64::max);
    got.iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b.into()).abs())
        .fold(0.0, f64::max)
        / scale
}

/// `configs/tiny-3to1.toml` (W 32, [local ×3, global]) with the RLA blocks as custom calls: the
/// decode tests' model.
pub fn tiny_3to1() -> ModelConfig {
    let mut cfg = load_model("tiny-3to1");
    cfg.rla.lowering = Lowering::CustomCall;
    cfg
}

/// Random parameters on [`client`]: `init_param` scaled ×5 for matrices (so attention is far
/// from uniform and the logits far from flat); norm scales kept, or with `scale_noise` perturbed
/// by values in `[-scale_noise, scale_noise)` around them (so every scale is seen).
pub fn decode_params(m: &Model, seed: u64, scale_noise: Option<f32>) -> Vec<pjrt::Buffer> {
    let values: Vec<Vec<f32>> = m
        .param_specs()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = model::init_param(s, seed);
            if !s.name.ends_with(".scale") {
                v.iter_mut().for_each(|x| *x *= 5.0);
            } else if let Some(noise) = scale_noise {
                let r = rand(v.len(), 1000 + i as u64, noise);
                v.iter_mut().zip(r).for_each(|(x, r)| *x += r);
            }
            v
        })
        .collect();
    upload_params(m, &values)
}

/// An s32 buffer on [`client`].
pub fn upload_s32(x: &[i32], dims: &[i64]) -> pjrt::Buffer {
    client().buffer_from_host(x, dims, None).unwrap()
}

/// An s32 `tokens` parameter `[bs, t]`.
pub fn tokens_param(b: &Builder, bs: usize, t: usize) -> hlo_builder::Op {
    b.parameter(
        Shape::array(ElementType::S32, &[bs as i64, t as i64]),
        "tokens",
    )
    .unwrap()
}

/// `values` (one per parameter of `m`, in its order) as buffers on [`client`].
pub fn upload_params(m: &Model, values: &[Vec<f32>]) -> Vec<pjrt::Buffer> {
    m.param_specs()
        .iter()
        .zip(values)
        .map(|(s, v)| {
            let dims: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
            client().buffer_from_host(v, &dims, None).unwrap()
        })
        .collect()
}

/// The graph of `m`'s loss and its gradient in every parameter: its parameters, then
/// `tokens [bs, t + 1]`, to `(loss, gradients in the parameter order...)`.
pub fn loss_grad_graph(m: &Model, bs: usize, t: usize) -> hlo_builder::Computation {
    let b = Builder::new("loss");
    let (params, named) = m.declare_params(&b).unwrap();
    let tok = tokens_param(&b, bs, t + 1);
    let l = m.loss(&b, &named, tok, "cpu").unwrap();
    let g = b.grad(l, &params).unwrap();
    let mut outs = vec![l];
    outs.extend(g);
    b.build(b.tuple(&outs).unwrap()).unwrap()
}

/// Runs `exe` (a graph of `m`'s parameters, then `tokens [bs, len / bs]`) on parameter values
/// `values`; every output as f32.
pub fn run_on_params(
    exe: &pjrt::LoadedExecutable,
    m: &Model,
    values: &[Vec<f32>],
    tokens: &[i32],
    bs: usize,
) -> Vec<Vec<f32>> {
    let mut bufs = upload_params(m, values);
    bufs.push(upload_s32(tokens, &[bs as i64, (tokens.len() / bs) as i64]));
    execute_f32(exe, &bufs)
}

/// Runs `exe` on `args`; every output as f32.
pub fn execute_f32(exe: &pjrt::LoadedExecutable, args: &[pjrt::Buffer]) -> Vec<Vec<f32>> {
    let refs: Vec<&pjrt::Buffer> = args.iter().collect();
    exe.execute(&refs)
        .unwrap()
        .iter()
        .map(|o| o.to_host::<f32>().unwrap())
        .collect()
}

/// The graph of `m`'s forward: its parameters, then `tokens [bs, t]`, to logits `[bs, t, V]`.
pub fn forward_graph(m: &Model, bs: usize, t: usize) -> hlo_builder::Computation {
    let b = Builder::new("forward");
    let (_, named) = m.declare_params(&b).unwrap();
    let tok = tokens_param(&b, bs, t);
    let logits = m.forward(&b, &named, tok, "cpu").unwrap();
    b.build(logits).unwrap()
}

/// Full-forward logits `[B, T, V]` of `m` with parameters `p` for `tokens [B, T]`.
pub fn full_logits(m: &Model, p: &[pjrt::Buffer], tokens: &[i32], bs: usize) -> Vec<f32> {
    let t = tokens.len() / bs;
    let exe = compile(&forward_graph(m, bs, t));
    let tb = upload_s32(tokens, &[bs as i64, t as i64]);
    let mut args: Vec<&pjrt::Buffer> = p.iter().collect();
    args.push(&tb);
    exe.execute(&args).unwrap()[0].to_host::<f32>().unwrap()
}

/// The index of the largest of `xs` (the first on ties).
pub fn argmax(xs: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as i32
}
