//! Decoding at batch > 1 with donated caches and the on-device greedy loop
//! ([`Model::decode_loop`]): for every sequence of a batch, the tokens the loop produces in one
//! dispatch equal those of the step-by-step batch-1 decode with a host argmax, and the loop's logits
//! match the full forward over the whole sequence (prompt + generated tokens). RAttention (the ring
//! wraps and the RLA state absorbs tokens during the loop), SWA and full attention.

use hlo_builder::{ElementType, Shape};
use model::config::{LocalKind, ModelConfig};
use model::Model;

mod common;
use common::{argmax, compile, decode_params, full_logits, max_rel, rand, upload_s32};

fn tiny() -> ModelConfig {
    common::tiny_3to1() // W 32, [local ×3, global]
}

/// Random parameters, matrices ×5 so the logits are far from flat (no argmax near-ties).
fn params(m: &Model, seed: u64) -> Vec<pjrt::Buffer> {
    decode_params(m, seed, None)
}

/// Prefill `prompt [bs, l]` and return (its last logits' argmax per sequence, the cache).
fn prefill(
    m: &Model,
    p: &[pjrt::Buffer],
    prompt: &[i32],
    bs: usize,
    max_len: usize,
) -> (Vec<i32>, Vec<pjrt::Buffer>) {
    let (l, v) = (prompt.len() / bs, m.config().vocab);
    let exe = compile(&m.prefill(bs, l, max_len, "cpu").unwrap());
    let tb = upload_s32(prompt, &[bs as i64, l as i64]);
    let mut args: Vec<&pjrt::Buffer> = p.iter().collect();
    args.push(&tb);
    let io = m.decode_io(bs, max_len);
    let (logits, cache) = io.split_results(exe.execute(&args).unwrap()).unwrap();
    let logits = logits.to_host::<f32>().unwrap();
    let first = (0..bs)
        .map(|b| argmax(&logits[((b + 1) * l - 1) * v..][..v]))
        .collect();
    (first, cache)
}

/// Greedy tokens of one sequence decoded step by step at batch 1 with a host argmax: the first
/// from the prefill, then `steps` more.
fn step_by_step(m: &Model, p: &[pjrt::Buffer], prompt: &[i32], steps: usize) -> Vec<i32> {
    let max_len = prompt.len() + steps + 1;
    let v = m.config().vocab;
    let (first, mut cache) = prefill(m, p, prompt, 1, max_len);
    let exe = compile(&m.decode_step(1, max_len).unwrap());
    let io = m.decode_io(1, max_len);
    let mut out = first;
    for i in 0..steps {
        let tok = upload_s32(&out[i..i + 1], &[1]);
        let pos = upload_s32(&[(prompt.len() + i) as i32], &[]);
        let args = io.step_arguments(p.iter().collect(), cache.iter().collect(), &tok, &pos);
        let (logits, next) = io.split_results(exe.execute(&args).unwrap()).unwrap();
        out.push(argmax(&logits.to_host::<f32>().unwrap()[..v]));
        cache = next;
    }
    out
}

/// Batch `bs` with different prompts of `l` tokens: prefill, then `steps` greedy tokens in one
/// dispatch of the loop with the cache donated. Checks tokens against [`step_by_step`] per
/// sequence, logits against the full forward, and that the cache was updated in place. Returns
/// the worst relative logit error.
fn check_loop(name: &str, cfg: &ModelConfig, bs: usize, l: usize, steps: usize) -> f64 {
    let m = Model::new(cfg.clone()).unwrap();
    let v = cfg.vocab;
    let p = params(&m, 11);
    let max_len = l + steps + 1;
    let prompts: Vec<i32> = rand(bs * l, 5, 1.0)
        .iter()
        .map(|x| ((x.abs() * v as f32) as i32).min(v as i32 - 1))
        .collect();
    let (first, cache) = prefill(&m, &p, &prompts, bs, max_len);
    let exe = compile(&m.decode_loop(bs, max_len, steps).unwrap());
    let io = m.decode_io(bs, max_len);
    let lio = m.loop_io(bs, max_len);
    let tok = upload_s32(&first, &[bs as i64]);
    let pos = upload_s32(&[l as i32], &[]);
    let addrs: Vec<usize> = cache.iter().map(|c| c.device_address().unwrap()).collect();
    let args = io.step_arguments(p.iter().collect(), cache.iter().collect(), &tok, &pos);
    let donated: Vec<usize> = io.cache.clone().collect();
    let out = exe.execute_donating_some(&args, &donated).unwrap();
    let (tokens, logits, new_cache) = lio.split_results(out).unwrap();
    // Donated: the inputs are gone and the outputs live in their memory.
    assert!(cache.iter().all(|c| c.is_deleted().unwrap()), "{name}");
    assert!(p.iter().all(|c| !c.is_deleted().unwrap()), "{name}");
    let new_addrs: Vec<usize> = new_cache
        .iter()
        .map(|c| c.device_address().unwrap())
        .collect();
    assert_eq!(
        new_addrs, addrs,
        "{name}: the cache was not updated in place"
    );
    let tokens = tokens.to_host::<i32>().unwrap();
    let logits = logits.to_host::<f32>().unwrap();
    assert_eq!(tokens.len(), bs * steps);

    let mut full = Vec::new();
    for b in 0..bs {
        let prompt = &prompts[b * l..(b + 1) * l];
        let want = step_by_step(&m, &p, prompt, steps);
        let mut got = vec![first[b]];
        got.extend(&tokens[b * steps..(b + 1) * steps]);
        assert_eq!(
            got, want,
            "{name}: sequence {b} (batch {bs}) vs batch-1 steps"
        );
        full.extend(prompt);
        full.extend(&got);
    }
    // Full forward over prompt + every generated token: step i of the loop is position l + i.
    let t = l + steps + 1;
    let fwd = full_logits(&m, &p, &full, bs);
    let mut worst = 0.0f64;
    for b in 0..bs {
        for i in 0..steps {
            let got = &logits[(b * steps + i) * v..][..v];
            let want = &fwd[(b * t + l + i) * v..][..v];
            worst = worst.max(max_rel(got, want));
        }
    }
    eprintln!(
        "{name}: batch {bs}, {steps} steps in one dispatch, worst relative logit error {worst:.2e}"
    );
    worst
}

#[test]
fn loop_matches_steps_and_forward_rattention() {
    // Prompt 12 < W+1 = 33; 30 steps reach position 42: the ring wraps and the RLA state absorbs
    // tokens inside the loop.
    let e = check_loop("rattention", &tiny(), 3, 12, 30);
    assert!(e <= 1e-5, "rel err {e:.2e}");
}

#[test]
fn loop_matches_steps_and_forward_swa_and_full() {
    let mut swa = tiny();
    swa.local_kind = LocalKind::Swa;
    swa.window = 8;
    let e = check_loop("swa", &swa, 2, 5, 12);
    assert!(e <= 1e-5, "rel err {e:.2e}");
    let mut full = tiny();
    full.layer_pattern = model::config::LayerPattern::List(vec![model::config::LayerKind::Global]);
    let e = check_loop("full", &full, 2, 5, 12);
    assert!(e <= 1e-5, "rel err {e:.2e}");
}

#[test]
fn loop_signature_and_errors() {
    let m = Model::new(tiny()).unwrap();
    let (bs, max_len, steps) = (4, 50, 7);
    let (args, res) = m.decode_loop(bs, max_len, steps).unwrap().program_shape();
    let (step_args, _) = m.decode_step(bs, max_len).unwrap().program_shape();
    assert_eq!(args, step_args);
    let lio = m.loop_io(bs, max_len);
    let res = res.tuple_elements().unwrap();
    assert_eq!(
        res[lio.tokens],
        Shape::array(ElementType::S32, &[bs as i64, steps as i64])
    );
    assert_eq!(
        res[lio.logits],
        Shape::array(ElementType::F32, &[bs as i64, steps as i64, 288])
    );
    assert_eq!(
        res[lio.cache_out.clone()],
        args[m.decode_io(bs, max_len).cache]
    );
    let e = m.decode_loop(2, 10, 11).unwrap_err().to_string();
    assert!(
        e.contains("steps (11)") && e.contains("max_len (10)"),
        "{e}"
    );
    // Both graphs declare the cache aliases (the text shows XLA's input_output_alias).
    for comp in [
        m.decode_step(bs, max_len).unwrap(),
        m.decode_loop(bs, max_len, steps).unwrap(),
    ] {
        assert!(
            comp.to_text().contains("input_output_alias"),
            "{}",
            comp.name()
        );
    }
}
