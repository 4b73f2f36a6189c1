//! The compiled train step and decode of the speed benchmark model (`configs/bench.toml`: d_model
//! 256, 4 layers 3 local : 1 global, 4 heads / 2 kv heads, head dim 64, FFN 768, vocab 256, f32,
//! AdamW) on the XLA CPU plugin, for RAttention, SWA (same window, no RLA) and full attention (every
//! layer global), side by side at T = 1024 (B 4, W 64) and T = 4096 (B 1, W 512).
//!
//! - `train/...`: one call of the train step `rattn train` runs (forward, backward, AdamW), with
//!   the state donated and fed back call after call as `rattn train` does.
//! - `decode/...`: one decode step of one sequence at position T − 1 with a cache of T positions
//!   (the token the model would produce after T − 1 tokens).
//!
//! After criterion's runs a table per T prints wall and CPU ms per call (medians of criterion's
//! samples; CPU time summed over all threads of the process, which still measures the work when
//! other jobs load the machine), tokens/s, and each kind's speed relative to full attention, with
//! the load average beside it.
//!
//! `cargo bench -p rattention-benches --bench train_decode` (add `-- --quick` for a short run;
//! env `RATTN_BENCH_T=1024` picks sequence lengths).

use std::cell::RefCell;

use criterion::BenchmarkId;
use model::Model;
use pjrt::{Buffer, Client};
use rattention_benches::{
    bench_config, compile, criterion, env_list, init_params, load, ratio_table, upload, zero_cache,
    Row, Timings, KINDS,
};
use trainer::config::RunConfig;
use trainer::step::{build_train_step, StepIo};

/// `(T, batch, window)` of the two shapes.
fn shape(t: usize) -> (usize, usize) {
    if t >= 4096 {
        (1, 512)
    } else {
        (4096 / t, 64)
    }
}

fn config(t: usize, kind: &[&str]) -> RunConfig {
    let (batch, w) = shape(t);
    let mut o: Vec<String> = vec![
        format!("model.seq_len={t}"),
        format!("train.batch={batch}"),
        format!("model.window={w}"),
    ];
    o.extend(kind.iter().map(|s| s.to_string()));
    bench_config(&o)
}

/// The train state: parameters from their initialisers, zero Adam moments.
fn train_state(client: &Client, model: &Model) -> Vec<Buffer> {
    let mut state = init_params(client, model);
    for _ in 0..2 {
        for s in model.param_specs() {
            state.push(upload(client, &vec![0.0; s.numel()], &s.shape));
        }
    }
    state
}

rattention_benches::jemalloc_allocator!();

fn main() {
    let mut c = criterion(2, 5);
    let ts = env_list("RATTN_BENCH_T").unwrap_or_else(|| vec![1024, 4096]);
    let client = Client::cpu().expect("XLA CPU plugin (run `rattn plugin install cpu`)");
    pallas_port::register_cpu_kernels(&client).expect("register the RLA FFI handlers");
    let timings = Timings::default();
    let mut tables = Vec::new();
    for &t in &ts {
        let (batch, w) = shape(t);
        let mut group = c.benchmark_group(format!("T{t}_B{batch}_W{w}"));
        let (mut train_rows, mut decode_rows) = (Vec::new(), Vec::new());
        for (kind, overrides) in KINDS {
            let cfg = config(t, overrides);
            let model = Model::new(cfg.model.clone()).expect("model");
            let io = StepIo::new(model.param_specs().len());
            let step = build_train_step(&cfg, "cpu", &model::Mesh::single()).expect("train step");
            let exe = compile(&client, &step.to_bytes());
            let tokens: Vec<i32> = (0..batch * (t + 1)).map(|i| (i * 7 % 256) as i32).collect();
            // Loss on every target (as for text data).
            let weights = vec![1.0f32; batch * t];
            let state = RefCell::new(train_state(&client, &model));
            let id = format!("train/{kind}");
            group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                b.iter_custom(|iters| {
                    timings.time(&format!("{t}/{id}"), iters, || {
                        let step_buf = client.buffer_from_host(&[1.0f32], &[], None).unwrap();
                        let tok = client
                            .buffer_from_host(&tokens, &[batch as i64, t as i64 + 1], None)
                            .unwrap();
                        let w = client
                            .buffer_from_host(&weights, &[batch as i64, t as i64], None)
                            .unwrap();
                        let args = io.arguments(state.take(), step_buf, tok, w);
                        let out = io.outputs(exe.execute_donating(args).unwrap()).unwrap();
                        out.loss.to_host::<f32>().unwrap();
                        state.replace(out.state);
                    })
                })
            });
            train_rows.extend(Row::median(&timings, &format!("{t}/{id}"), kind));
            drop(state);

            // Decode: one token at position T − 1, cache of T positions, batch 1.
            let dio = model.decode_io(1, t);
            let dexe = compile(
                &client,
                &model.decode_step(1, t).expect("decode step").to_bytes(),
            );
            let params = init_params(&client, &model);
            let cache = zero_cache(&client, &model, 1, t);
            let token = client.buffer_from_host(&[3i32], &[1], None).unwrap();
            let pos = client.buffer_from_host(&[t as i32 - 1], &[], None).unwrap();
            let args = dio.step_arguments(
                params.iter().collect(),
                cache.iter().collect(),
                &token,
                &pos,
            );
            let id = format!("decode/{kind}");
            group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                b.iter_custom(|iters| {
                    timings.time(&format!("{t}/{id}"), iters, || {
                        let out = dexe.execute(&args).unwrap();
                        out[dio.logits].to_host::<f32>().unwrap();
                    })
                })
            });
            decode_rows.extend(Row::median(&timings, &format!("{t}/{id}"), kind));
        }
        group.finish();
        let l = load();
        tables.push(ratio_table(
            &format!("train step, T={t} B={batch} W={w} (load {l})"),
            &train_rows,
            (batch * t) as f64,
            "full",
        ));
        tables.push(ratio_table(
            &format!(
                "decode, one token at position {} of a {t}-token cache, batch 1 (load {l})",
                t - 1
            ),
            &decode_rows,
            1.0,
            "full",
        ));
    }
    c.final_summary();
    for tb in tables {
        println!("{tb}");
    }
}
