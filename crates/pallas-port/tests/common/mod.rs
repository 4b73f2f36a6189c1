//! Shared helpers for the pallas-port tests.
#![allow(dead_code)]

use hlo_builder::{Builder, ElementType, Op, Shape};

pub mod spmd;
use pallas_port::reference::{rla_naive_f64, rla_scan_f64, rla_vjp_f64, to_f64};
use pallas_port::{kernel, FeatureMap, RlaConfig, RlaDims};

/// [`RlaDims`] from its fields in order.
pub fn dims(batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize) -> RlaDims {
    RlaDims {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
    }
}

/// [`RlaConfig`] from its fields in order.
pub fn cfg(window: usize, sub_chunk: usize, chunk: usize, feature_map: FeatureMap) -> RlaConfig {
    RlaConfig {
        window,
        sub_chunk,
        chunk,
        feature_map,
        ..Default::default()
    }
}

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

/// Tolerance on the norm-relative error. Relu features are unbounded, so sums of products of
/// O(1)-sized features accumulate larger absolute rounding than softmax's simplex features.
pub fn tol(fm: FeatureMap) -> f64 {
    match fm {
        FeatureMap::Softmax => 1e-5,
        FeatureMap::Relu => 2e-5,
    }
}

/// Three outputs of an RLA block: forward `(o, chunk_states, final_state)` or backward
/// `(dq, dk, dv)`.
pub type Outputs = (Vec<f32>, Vec<f32>, Vec<f32>);

/// One output to check: `(name, got, f64 reference, the CPU kernel's)`.
type Compared<'a> = (&'a str, &'a [f32], &'a [f64], &'a [f32]);

/// Asserts each output within `t` (norm-relative) of both the reference and the CPU kernel's.
fn check_outputs(tag: &str, t: f64, outputs: [Compared<'_>; 3]) {
    for (name, got, want, cpu) in outputs {
        let e = rel_err(got, want);
        let ec = rel_err(got, &to_f64(cpu));
        eprintln!("{tag}: {name} vs f64 {e:.2e}, vs CPU kernel {ec:.2e}");
        assert!(e <= t, "{tag}: {name} rel err {e} vs the f64 reference");
        assert!(ec <= t, "{tag}: {name} rel err {ec} vs the CPU kernel");
    }
}

/// Runs an RLA implementation's forward `fwd(q, k, v)` and backward `bwd(q, k, v,
/// chunk_states, d_o)` (given its own forward's chunk states) on random inputs from `seed`
/// (q, k in ±2, v, d_o in ±1) and checks every output against the f64 references (naive output
/// and VJP, token-by-token scan for the states) and against the CPU kernels, within [`tol`]
/// (norm-relative); `tag` names the case. Also checks that the case is not trivially zero when
/// the window is shorter than the sequence.
pub fn check_blocks(
    tag: &str,
    d: &RlaDims,
    cfg: &RlaConfig,
    seed: u64,
    fwd: impl FnOnce(&[f32], &[f32], &[f32]) -> Outputs,
    bwd: impl FnOnce(&[f32], &[f32], &[f32], &[f32], &[f32]) -> Outputs,
) {
    let mut rng = Rng::new(seed);
    let q = rng.vec(d.q_len(), 2.0);
    let k = rng.vec(d.kv_len(), 2.0);
    let v = rng.vec(d.kv_len(), 1.0);
    let d_o = rng.vec(d.q_len(), 1.0);
    let (qf, kf, vf, dof) = (to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&d_o));
    let t = tol(cfg.feature_map);

    let (o, cs, fs) = fwd(&q, &k, &v);
    let o_ref = rla_naive_f64(cfg, d, &qf, &kf, &vf).unwrap();
    let scan = rla_scan_f64(cfg, d, &qf, &kf, &vf).unwrap();
    let (o_cpu, cs_cpu, fs_cpu) = run_fwd(cfg, d, &q, &k, &v);
    check_outputs(
        tag,
        t,
        [
            ("o", &o, &o_ref, &o_cpu),
            ("chunk_states", &cs, &scan.chunk_states, &cs_cpu),
            ("final_state", &fs, &scan.final_state, &fs_cpu),
        ],
    );

    let (dq, dk, dv) = bwd(&q, &k, &v, &cs, &d_o);
    let g = rla_vjp_f64(cfg, d, &qf, &kf, &vf, &dof).unwrap();
    let (dq_c, dk_c, dv_c) = run_bwd(cfg, d, &q, &k, &v, &cs_cpu, &d_o);
    check_outputs(
        tag,
        t,
        [
            ("dq", &dq, &g.dq, &dq_c),
            ("dk", &dk, &g.dk, &dk_c),
            ("dv", &dv, &g.dv, &dv_c),
        ],
    );
    if cfg.window + 1 < d.seq {
        assert!(o_ref.iter().any(|&x| x != 0.0), "{tag}: trivial case");
    }
}

/// The scan from an initial state, in f64 from the formulas: `o_t = φ(q_t)·(h0 + Σ_{s ≤ t−W−1}
/// φ(k_s)ᵀ v_s)`, the saved and final states plus h0, and the gradients of `⟨d_o, o⟩ +
/// ⟨d_f, final_state⟩` (dh0 = d_f + Σ_t φ(q_t)ᵀ d_o_t). The h0-free parts are the f64
/// references of the block; the h0 and d_f terms are written out here.
pub struct H0Ref {
    /// o, chunk_states, final_state.
    pub fwd: [Vec<f64>; 3],
    /// dq, dk, dv, dh0.
    pub grads: [Vec<f64>; 4],
}

#[allow(clippy::too_many_arguments)]
pub fn h0_reference(
    cfg: &RlaConfig,
    d: &RlaDims,
    (q, k, v): (&[f64], &[f64], &[f64]),
    h0: &[f64],
    d_o: &[f64],
    d_f: &[f64],
) -> H0Ref {
    use pallas_port::reference::{feature, feature_vjp, rla_naive_f64, rla_scan_f64, rla_vjp_f64};
    let (t_, n_, g_, h) = (d.seq, d.heads, d.kv_heads, d.head_dim);
    let (r, ss, nc) = (d.group_size(), 2 * h * h, d.n_chunks(cfg));
    let fm = cfg.feature_map;
    let mut o = rla_naive_f64(cfg, d, q, k, v).unwrap();
    let scan = rla_scan_f64(cfg, d, q, k, v).unwrap();
    let g = rla_vjp_f64(cfg, d, q, k, v, d_o).unwrap();
    let (mut dq, mut dk, mut dv) = (g.dq, g.dk, g.dv);
    let mut dh0 = d_f.to_vec();
    let mut cs = scan.chunk_states;
    let mut fs = scan.final_state;
    for b in 0..d.batch {
        for gi in 0..g_ {
            let st = (b * g_ + gi) * ss;
            let (h0g, dfg) = (&h0[st..st + ss], &d_f[st..st + ss]);
            for i in 0..ss {
                fs[st + i] += h0g[i];
                for c in 0..nc {
                    cs[(b * g_ + gi) * nc * ss + c * ss + i] += h0g[i];
                }
            }
            for t in 0..t_ {
                for n in gi * r..(gi + 1) * r {
                    let qi = ((b * t_ + t) * n_ + n) * h;
                    let fq = feature(&q[qi..qi + h], fm);
                    let mut dfq = vec![0.0; 2 * h];
                    for a in 0..2 * h {
                        for c in 0..h {
                            o[qi + c] += fq[a] * h0g[a * h + c];
                            dfq[a] += h0g[a * h + c] * d_o[qi + c];
                            dh0[st + a * h + c] += fq[a] * d_o[qi + c];
                        }
                    }
                    for (x, y) in
                        dq[qi..qi + h]
                            .iter_mut()
                            .zip(feature_vjp(&q[qi..qi + h], &dfq, fm))
                    {
                        *x += y;
                    }
                }
                // Key t is in the final state iff t ≤ T − W − 2.
                if t + cfg.window + 2 <= t_ {
                    let ki = ((b * t_ + t) * g_ + gi) * h;
                    let fk = feature(&k[ki..ki + h], fm);
                    let mut dfk = vec![0.0; 2 * h];
                    for a in 0..2 * h {
                        for c in 0..h {
                            dfk[a] += dfg[a * h + c] * v[ki + c];
                            dv[ki + c] += fk[a] * dfg[a * h + c];
                        }
                    }
                    for (x, y) in
                        dk[ki..ki + h]
                            .iter_mut()
                            .zip(feature_vjp(&k[ki..ki + h], &dfk, fm))
                    {
                        *x += y;
                    }
                }
            }
        }
    }
    H0Ref {
        fwd: [o, cs, fs],
        grads: [dq, dk, dv, dh0],
    }
}
