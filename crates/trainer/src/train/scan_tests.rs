//! `model.scan_layers` in training: a scanned run equals the unrolled run (losses, and the
//! parameters after stacking the unrolled ones), a scanned run under fsdp equals the
//! 1-device scanned run. Checkpoints of the other layout: `layout_tests.rs`.

use super::*;

/// The tiny model at T = 64, batch 4, 4 layers alternating local and global (period 2, two
/// periods in the scan).
fn tiny(steps: usize, extra: &[&str]) -> RunConfig {
    super::tests::tiny_layers(4, steps, extra)
}

fn tmp(name: &str) -> PathBuf {
    super::tests::tmp(&format!("scan-{name}"))
}

/// Losses and the final parameter values (in the run's model's order) of a run.
fn run(name: &str, cfg: &RunConfig) -> (Vec<f32>, Vec<Vec<f32>>) {
    let dir = tmp(name);
    let report = train(cfg, None, &dir, false, true, None).unwrap();
    let ck = checkpoint::load(&report.last_checkpoint.unwrap(), None).unwrap();
    let model = Model::new(cfg.model.clone()).unwrap();
    let params = ck
        .params(&model)
        .unwrap()
        .into_iter()
        .map(|t| t.data.clone())
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    (report.losses, params)
}

/// max |a − b| / max |b| over every tensor.
fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let scale = b.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
            let d = a
                .iter()
                .zip(b)
                .fold(0.0f64, |m, (&x, &y)| m.max((x - y).abs() as f64));
            d / scale.max(1e-30)
        })
        .fold(0.0, f64::max)
}

fn check_losses(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (s, (l, w)) in got.iter().zip(want).enumerate() {
        let e = ((l - w) / w).abs();
        assert!(e <= 1e-5, "{name}: step {} loss {l} vs {w}", s + 1);
    }
}

#[test]
fn scanned_training_equals_unrolled_and_sharded_scanned_equals_one_device() {
    let steps = 3;
    let unrolled = tiny(steps, &[]);
    let scanned = tiny(steps, &["model.scan_layers=true"]);
    let model = Model::new(scanned.model.clone()).unwrap();
    assert_eq!(model.scan_period(), Some(2));
    let (l0, p0) = run("unrolled", &unrolled);
    let (l1, p1) = run("scanned", &scanned);
    check_losses("scanned vs unrolled", &l1, &l0);
    // Parameters after 3 AdamW steps: where a gradient is near 0, m/√v turns last-bit
    // differences into moves of up to lr per step (see tests.rs); bound them by that.
    let lr_sum: f64 = (0..steps).map(|s| step::lr_at(&scanned.train, s)).sum();
    let p0 = model.stack_params(&p0).unwrap();
    let move_bound = p0
        .iter()
        .zip(&p1)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
        .fold(0.0, f64::max);
    assert!(
        move_bound <= 2e-3 * lr_sum,
        "parameters differ by {move_bound:e}"
    );
    let w = worst(&p1, &p0);
    // The same run under fsdp = 4 (stacked parameters sharded over their embed axis).
    let sharded = tiny(steps, &["model.scan_layers=true", "mesh.fsdp=4"]);
    let (l2, p2) = run("scanned-fsdp4", &sharded);
    check_losses("scanned fsdp=4 vs 1 device", &l2, &l1);
    let mb = p2
        .iter()
        .zip(&p1)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
        .fold(0.0, f64::max);
    assert!(mb <= 2e-3 * lr_sum, "fsdp parameters differ by {mb:e}");
    eprintln!(
        "scan: {steps} steps; losses {l1:?} vs unrolled {l0:?} / fsdp=4 {l2:?}; parameters \
         within {w:.1e} relative of unrolled, {mb:.1e} abs of fsdp=4"
    );
}
