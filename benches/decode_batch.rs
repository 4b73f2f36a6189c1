//! Decode throughput at batch 1 / 8 / 32 of the speed benchmark model (`configs/bench.toml`:
//! d_model 256, 4 layers 3 local : 1 global, 4 heads / 2 kv heads, head dim 64, FFN 768, f32) on
//! the XLA CPU plugin, for RAttention, SWA (same window, no RLA) and full attention (every layer
//! global), with a cache of T positions (T = 1024: W 64; T = 4096: W 512).
//!
//! - `loop/...`: one dispatch of [`model::Model::decode_loop`], `STEPS` greedy tokens per
//!   sequence produced on the device (argmax included), the cache donated and fed back call after
//!   call (updated in place).
//! - `step/...`: one dispatch of [`model::Model::decode_step`] (one token per sequence, logits
//!   copied to the host), the cache donated likewise: what a host-side sampler pays per token.
//!
//! Every dispatch decodes at positions just below T, so a global layer attends over the whole
//! cache (the decode step always reads all T slots, masked; the cost does not depend on the
//! position). After criterion's runs a table per T and batch prints wall and CPU ms per dispatch,
//! tokens/s (batch × tokens per dispatch / wall time), each kind relative to full attention, the
//! cache bytes the batch allocates, with the load average beside it, and tokens per CPU-second
//! (the work, when other jobs load the machine).
//!
//! `cargo bench -p rattention-benches --bench decode_batch` (add `-- --quick` for a short run;
//! env `RATTN_BENCH_T=1024` picks cache lengths, `RATTN_BENCH_B=1,8` batches).

use std::cell::RefCell;

use criterion::BenchmarkId;
use model::Model;
use pjrt::Client;
use rattention_benches::{
    bench_config, compile, criterion, env_list, init_params, load, ratio_table, zero_cache, Row,
    Timings, KINDS,
};

/// Greedy tokens per sequence in one dispatch of the loop.
const STEPS: usize = 32;

fn window(t: usize) -> usize {
    if t >= 4096 {
        512
    } else {
        64
    }
}

fn model(t: usize, kind: &[&str]) -> Model {
    let mut o: Vec<String> = vec![
        format!("model.seq_len={t}"),
        format!("model.window={}", window(t)),
    ];
    o.extend(kind.iter().map(|s| s.to_string()));
    Model::new(bench_config(&o).model).expect("model")
}

rattention_benches::jemalloc_allocator!();

fn main() {
    let mut c = criterion(1, 4);
    let ts = env_list("RATTN_BENCH_T").unwrap_or_else(|| vec![1024, 4096]);
    let batches = env_list("RATTN_BENCH_B").unwrap_or_else(|| vec![1, 8, 32]);
    let client = Client::cpu().expect("XLA CPU plugin (run `rattn plugin install cpu`)");
    let timings = Timings::default();
    let mut tables = Vec::new();
    for &t in &ts {
        for &bs in &batches {
            let mut group = c.benchmark_group(format!("decode_T{t}_W{}_B{bs}", window(t)));
            let (mut loop_rows, mut step_rows, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
            for (kind, overrides) in KINDS {
                let m = model(t, overrides);
                let io = m.decode_io(bs, t);
                let layout = m.cache_layout(bs, t);
                bytes.push((kind, layout.allocated_bytes()));
                let params = init_params(&client, &m);
                let donated: Vec<usize> = io.cache.clone().collect();
                let tokens: Vec<i32> = (0..bs).map(|i| (3 + 5 * i as i32) % 256).collect();
                let tok = client
                    .buffer_from_host(&tokens, &[bs as i64], None)
                    .unwrap();

                for (mode, exe, per_call) in [
                    (
                        "loop",
                        compile(
                            &client,
                            &m.decode_loop(bs, t, STEPS).expect("loop").to_bytes(),
                        ),
                        STEPS,
                    ),
                    (
                        "step",
                        compile(&client, &m.decode_step(bs, t).expect("step").to_bytes()),
                        1,
                    ),
                ] {
                    let pos = client
                        .buffer_from_host(&[(t - per_call) as i32], &[], None)
                        .unwrap();
                    let cache = RefCell::new(zero_cache(&client, &m, bs, t));
                    let id = format!("{mode}/{kind}");
                    group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                        b.iter_custom(|iters| {
                            timings.time(&format!("{t}/{bs}/{id}"), iters, || {
                                let cur = cache.take();
                                let args = io.step_arguments(
                                    params.iter().collect(),
                                    cur.iter().collect(),
                                    &tok,
                                    &pos,
                                );
                                let mut out = exe.execute_donating_some(&args, &donated).unwrap();
                                // Tokens (loop) or logits (step) to the host: the dispatch is done.
                                out[0].to_host_bytes().unwrap();
                                let first = out.len() - io.cache.len();
                                cache.replace(out.split_off(first));
                            })
                        })
                    });
                    if let Some(row) = Row::median(&timings, &format!("{t}/{bs}/{id}"), kind) {
                        if mode == "loop" {
                            loop_rows.push(row);
                        } else {
                            step_rows.push(row);
                        }
                    }
                }
            }
            group.finish();
            let l = load();
            let w = window(t);
            tables.push(ratio_table(
                &format!("decode loop, {STEPS} greedy tokens per dispatch, batch {bs}, cache T={t} W={w} (load {l})"),
                &loop_rows,
                (bs * STEPS) as f64,
                "full",
            ));
            tables.push(ratio_table(
                &format!(
                    "decode step, 1 token per dispatch, batch {bs}, cache T={t} W={w} (load {l})"
                ),
                &step_rows,
                bs as f64,
                "full",
            ));
            let mut s =
                format!("cache bytes, batch {bs}, T={t} W={w} (allocated: k/v + RLA state)\n");
            for (kind, b) in &bytes {
                s += &format!(
                    "  {kind:<14} {:>10.2} MB  (k/v {:.2} MB, RLA state {:.2} MB)\n",
                    b.total() as f64 / 1e6,
                    b.kv as f64 / 1e6,
                    b.rla_state as f64 / 1e6
                );
            }
            tables.push(s);
            // On a loaded machine wall time measures the scheduler too; tokens per CPU-second (all
            // threads of the process) measure the work.
            let mut s = format!(
                "tokens per CPU-second (batch × tokens / CPU s), batch {bs}, T={t} W={w}\n  {:<14} {:>10} {:>10}\n",
                "", "loop", "step"
            );
            for (kind, _) in &bytes {
                let per_cpu_s = |rows: &[Row], toks: usize| {
                    rows.iter()
                        .find(|r| r.label == *kind)
                        .map_or(f64::NAN, |r| toks as f64 / (r.cpu_ms * 1e-3))
                };
                s += &format!(
                    "  {kind:<14} {:>10.0} {:>10.0}\n",
                    per_cpu_s(&loop_rows, bs * STEPS),
                    per_cpu_s(&step_rows, bs)
                );
            }
            tables.push(s);
        }
    }
    c.final_summary();
    for tb in tables {
        println!("{tb}");
    }
}
