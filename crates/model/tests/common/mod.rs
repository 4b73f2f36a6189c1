//! Shared setup for the model tests: the CPU client with the RLA kernels registered, compiling,
//! deterministic inputs, the repository's configs and AXLearn data files, an error measure.
#![allow(dead_code)]

use std::sync::OnceLock;

use model::config::{FeatureMap, ModelConfig};
use model::reference::AttnDims;
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
