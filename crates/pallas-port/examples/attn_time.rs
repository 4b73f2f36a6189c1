//! CPU time of the attention kernels (`pallas_port::kernel::attention`) on one shape:
//!
//! ```sh
//! cargo run --release -p pallas-port --example attn_time -- [B T N G H W|-1] [reps]
//! ```
//! Prints wall and process CPU ms (all threads) per forward and per backward, the
//! forward's GFLOP/s over its visible blocks, and the page faults per call of each (a kernel that
//! takes fresh zeroed memory every call shows up here: the backward's dQ buffers did until they
//! moved into the thread's scratch).

use pallas_port::kernel::{attention, attn_bwd, attn_fwd};
use pallas_port::{bench_util, RlaDims};
use std::time::Instant;

/// This process's (CPU seconds of all threads, minor page faults) so far.
fn cpu_and_faults() -> (f64, f64) {
    (bench_util::cpu_s(), bench_util::minor_faults())
}

fn main() {
    let a: Vec<i64> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("integer arguments"))
        .collect();
    let get = |i: usize, d: i64| a.get(i).copied().unwrap_or(d);
    let d = RlaDims {
        batch: get(0, 1) as usize,
        seq: get(1, 4096) as usize,
        heads: get(2, 4) as usize,
        kv_heads: get(3, 2) as usize,
        head_dim: get(4, 64) as usize,
    };
    let w = usize::try_from(get(5, -1)).ok();
    let reps = get(6, 5) as usize;
    let fill = |n: usize, s: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) as f32
                    / (1u32 << 24) as f32
                    - 0.5
            })
            .collect()
    };
    let (q, k, v, d_o) = (
        fill(d.q_len(), 1),
        fill(d.kv_len(), 2),
        fill(d.kv_len(), 3),
        fill(d.q_len(), 4),
    );
    let mut o = vec![0.0; d.q_len()];
    let mut lse = vec![0.0; d.batch * d.seq * d.heads];
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; d.q_len()],
        vec![0.0; d.kv_len()],
        vec![0.0; d.kv_len()],
    );
    let (mut fw, mut fc, mut bw, mut bc) = (0.0, 0.0, 0.0, 0.0);
    let (mut ff, mut bf) = (0.0, 0.0);
    for r in 0..=reps {
        let (t0, (c0, p0)) = (Instant::now(), cpu_and_faults());
        attn_fwd(&d, w, &q, &k, &v, &mut o, &mut lse).unwrap();
        let (t1, (c1, p1)) = (Instant::now(), cpu_and_faults());
        attn_bwd(&d, w, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv).unwrap();
        let (t2, (c2, p2)) = (Instant::now(), cpu_and_faults());
        if r > 0 {
            fw += (t1 - t0).as_secs_f64();
            bw += (t2 - t1).as_secs_f64();
            fc += c1 - c0;
            bc += c2 - c1;
            ff += p1 - p0;
            bf += p2 - p1;
        }
    }
    let n = reps as f64;
    let f = attention::flops_fwd(&d, w);
    println!(
        "{d} window {w:?}: fwd wall {:.1} ms cpu {:.1} ms ({:.1} GFLOP/cpu-s, {:.0} page faults), \
         bwd wall {:.1} ms cpu {:.1} ms ({:.0} page faults)",
        fw / n * 1e3,
        fc / n * 1e3,
        f / (fc / n) / 1e9,
        ff / n,
        bw / n * 1e3,
        bc / n * 1e3,
        bf / n
    );
}
