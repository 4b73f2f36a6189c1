//! `rattn eval` at lengths beyond the training length (issue 12 item 4), against the f64
//! reference model run directly at that length.

use super::*;
use crate::data::Bucket;
use std::collections::HashMap;

/// Trained at T = 32: one RAttention layer (W = 16) and one global layer, so every kind of
/// attention runs at the longer length; batch 2.
fn cfg() -> RunConfig {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/tiny.toml"
    ))
    .unwrap();
    let o: Vec<String> = [
        "model.seq_len=32",
        "model.layer_pattern=\"1:1\"",
        "train.batch=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    RunConfig::from_toml(&text, &o).unwrap()
}

/// Mean answer NLL, and (correct, total) per bucket, of the f64 reference model on `seqs`
/// at their length.
fn reference(
    model: &Model,
    params: &HashMap<String, Vec<f32>>,
    seqs: &[crate::data::Sequence],
    len: usize,
    buckets: &[Bucket],
) -> (f64, Vec<(usize, usize)>) {
    let v = model.config().vocab;
    let (mut nll, mut weight) = (0.0, 0.0);
    let mut hits = vec![(0, 0); buckets.len()];
    for s in seqs {
        let logits = model::reference::logits(model, params, &s.tokens[..len], 1);
        let row = |pos: usize| &logits[pos * v..][..v];
        for (pos, &w) in s.weights.iter().enumerate() {
            if w > 0.0 {
                let r = row(pos);
                let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                nll += w as f64 * (lse - r[s.tokens[pos + 1] as usize]);
                weight += w as f64;
            }
        }
        for p in &s.probes {
            let r = row(p.pos - 1);
            let best = (0..v).fold(0, |b, i| if r[i] > r[b] { i } else { b });
            let k = buckets
                .iter()
                .position(|b| b.lo <= p.distance && p.distance <= b.hi)
                .unwrap();
            hits[k].1 += 1;
            hits[k].0 += usize::from(best as u32 == s.tokens[p.pos]);
        }
    }
    (nll / weight, hits)
}

#[test]
fn eval_beyond_the_training_length_matches_the_f64_reference_at_that_length() {
    let cfg = cfg();
    let model = Model::new(cfg.model.clone()).unwrap();
    // A random-init checkpoint, embedding and matrices scaled up so the logits are not flat.
    let mut params = HashMap::new();
    let mut tensors = Vec::new();
    for s in model.param_specs() {
        let mut v = model::init_param(s, 5);
        if s.name.starts_with("embed") || s.name.contains(".w") {
            v.iter_mut().for_each(|x| *x *= 4.0);
        }
        params.insert(s.name.clone(), v.clone());
        tensors.push(NamedTensor {
            name: format!("params.{}", s.name),
            shape: s.shape.clone(),
            data: v,
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpoint {
        step: 0,
        data_position: 0,
        seed: cfg.train.seed,
        model_config: model_toml(&cfg),
        tensors,
    };
    checkpoint::save(dir.path(), &ck, 1).unwrap();
    // 3 sequences: a full batch of 2 and a second batch (rounded up to 2 sequences).
    let lengths = [32, 80, 160];
    let reports = eval_lengths(&cfg, None, dir.path(), 3, &lengths).unwrap();
    let src = Source::held_out(&cfg.data, cfg.train.seed, cfg.model.vocab).unwrap();
    for (r, &len) in reports.iter().zip(&lengths) {
        assert_eq!((r.seq_len, r.sequences), (len, 4));
        let seqs: Vec<_> = (0..4)
            .map(|i| src.sequence(FIRST_EVAL_SEQUENCE + i, len))
            .collect();
        // One RAttention layer: LW = W = 16; at 32 the buckets end at > 4LW, beyond they double.
        let (buckets, _) = eval_buckets(&model, len);
        let (want_loss, want_hits) = reference(&model, &params, &seqs, len, &buckets);
        let rel = (r.loss - want_loss).abs() / want_loss;
        eprintln!(
            "T {len}: eval loss {:.6}, f64 reference {want_loss:.6} (rel {rel:.1e}), {} answers",
            r.loss, r.targets
        );
        assert!(rel < 1e-4, "T {len}: loss {} vs {want_loss}", r.loss);
        let got: Vec<(usize, usize)> = r.recall.iter().map(|b| (b.correct, b.total)).collect();
        assert_eq!(got, want_hits, "T {len}");
        let labels: Vec<&str> = r.recall.iter().map(|b| b.label.as_str()).collect();
        match len {
            32 => assert_eq!(
                labels,
                [
                    "<= W (16)",
                    "LW..2LW (17..32)",
                    "2LW..4LW (33..64)",
                    "> 4LW (> 64)"
                ]
            ),
            80 => assert_eq!(
                labels,
                [
                    "<= W (16)",
                    "LW..2LW (17..32)",
                    "T..2T (33..64)",
                    "2T..4T (65..128)"
                ]
            ),
            _ => assert_eq!(
                labels,
                [
                    "<= W (16)",
                    "LW..2LW (17..32)",
                    "T..2T (33..64)",
                    "2T..4T (65..128)",
                    "4T..8T (129..256)"
                ]
            ),
        }
        // Distances grow with the length: answers lie beyond the training length.
        let beyond: usize = buckets
            .iter()
            .zip(&got)
            .filter(|(b, _)| b.lo > 32)
            .map(|(_, h)| h.1)
            .sum();
        assert_eq!(beyond > 0, len > 32, "T {len}: {got:?}");
    }
}
