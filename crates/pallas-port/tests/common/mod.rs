//! Shared helpers for the pallas-port tests.
#![allow(dead_code)]

use hlo_builder::{Builder, ElementType, Op, Shape};

pub mod spmd;
use pallas_port::{kernel, RlaConfig, RlaDims};

/// Deterministic splitmix64-based generator of f32 values in [-scale, scale).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1))
    }
    /// A generator started from the raw state `state` (for streams seeded another way).
    pub fn from_state(state: u64) -> Self {
        Rng(state)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.uniform() * 2.0 - 1.0) as f32) * scale)
            .collect()
    }
}

/// max |got − want| / max |want| (norm-relative error; 0 if both are all zero).
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// max |got − want|.
pub fn abs_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()))
}

/// Forward outputs (o, chunk_states, final_state) of the kernel.
pub fn run_fwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut o = vec![f32::NAN; d.q_len()];
    let mut cs = vec![f32::NAN; d.chunk_states_len(cfg)];
    let mut fs = vec![f32::NAN; d.final_state_len()];
    kernel::rla_fwd(cfg, d, q, k, v, &mut o, &mut cs, &mut fs).expect("rla_fwd");
    (o, cs, fs)
}

/// Backward outputs (dq, dk, dv) of the kernel.
pub fn run_bwd(
    cfg: &RlaConfig,
    d: &RlaDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cs: &[f32],
    d_o: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dq = vec![f32::NAN; d.q_len()];
    let mut dk = vec![f32::NAN; d.kv_len()];
    let mut dv = vec![f32::NAN; d.kv_len()];
    kernel::rla_bwd(cfg, d, q, k, v, cs, d_o, &mut dq, &mut dk, &mut dv).expect("rla_bwd");
    (dq, dk, dv)
}

/// The f32 array shape of dims `d`.
pub fn f32_shape(d: &[usize]) -> Shape {
    Shape::array(
        ElementType::F32,
        &d.iter().map(|&x| x as i64).collect::<Vec<_>>(),
    )
}

/// Compiles `root` and runs it on the CPU plugin with f32 arguments `(data, dims)`; returns
/// every output as f32.
pub fn run(b: &Builder, root: Op, args: &[(&[f32], &[usize])]) -> Vec<Vec<f32>> {
    let comp = b.build(root).expect("build");
    let client = pjrt::Client::cpu().expect("CPU plugin");
    let exe = client
        .compile(
            pjrt::Program::Hlo(&comp.to_bytes()),
            &pjrt::CompileOptions::default(),
        )
        .expect("compile");
    let bufs: Vec<pjrt::Buffer> = args
        .iter()
        .map(|(data, dims)| {
            let dims: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
            client.buffer_from_host(data, &dims, None).expect("upload")
        })
        .collect();
    let refs: Vec<&pjrt::Buffer> = bufs.iter().collect();
    exe.execute(&refs)
        .expect("execute")
        .iter()
        .map(|o| o.to_host::<f32>().expect("download"))
        .collect()
}
