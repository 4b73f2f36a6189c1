//! The AdamW update's two lowerings (`train.optimizer_lowering`): the `rattention.adamw` custom
//! call against the element-wise HLO, over 20 steps of the tiny model.

use super::tests::{tiny_layers, tmp};
use super::*;
use crate::config::OptimizerLowering;

/// Losses and final state (parameters, both moments) of 20 steps with `lowering`.
fn run(lowering: &str) -> (Vec<f32>, Vec<NamedTensor>) {
    let cfg = tiny_layers(
        2,
        20,
        &[&format!("train.optimizer_lowering=\"{lowering}\"")],
    );
    let dir = tmp(&format!("adamw-{lowering}"));
    let report = train(&cfg, None, &dir, false, true, None).unwrap();
    let ck = checkpoint::load(&report.last_checkpoint.unwrap(), None).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (report.losses, ck.tensors)
}

#[test]
fn the_adamw_kernel_trains_like_the_hlo_update() {
    let (kl, kt) = run("kernel");
    let (hl, ht) = run("hlo");
    assert_eq!(kl.len(), 20);
    // The kernel does the HLO's operations in its order, but not bit for bit what XLA compiles:
    // the gradient norm is summed in another order (f64 blocks against XLA's f32 reduction), and
    // XLA fuses the gradients' last operations into the update's fusions and contracts
    // multiply-adds (FMA), so the two runs differ from step 1 in the last bits (measured: no
    // state tensor bit-equal after 20 steps).
    for (i, (k, h)) in kl.iter().zip(&hl).enumerate() {
        let r = ((k - h) / h).abs();
        assert!(r <= 1e-6, "step {i}: loss {k} (kernel) vs {h} (hlo): {r:e}");
    }
    assert_eq!(kt.len(), ht.len());
    // Per group (params, adam_m, adam_v): the largest ‖Δ‖₂ / ‖x‖₂ of a tensor, and the largest
    // element difference relative to its tensor's largest value.
    let (mut norm, mut elem) = ([0.0f64; 3], [0.0f64; 3]);
    for (k, h) in kt.iter().zip(&ht) {
        assert_eq!((&k.name, &k.shape), (&h.name, &h.shape));
        let (mut d2, mut x2, mut dmax, mut xmax) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&a, &b) in k.data.iter().zip(&h.data) {
            let d = (a as f64 - b as f64).abs();
            (d2, x2) = (d2 + d * d, x2 + (b as f64) * (b as f64));
            (dmax, xmax) = (dmax.max(d), xmax.max((b as f64).abs()));
        }
        let g = StateGroup::ALL
            .iter()
            .position(|g| k.name.starts_with(&format!("{}.", g.prefix())))
            .unwrap();
        norm[g] = norm[g].max((d2 / x2.max(1e-60)).sqrt());
        elem[g] = elem[g].max(dmax / xmax.max(1e-30));
    }
    eprintln!(
        "adamw kernel vs hlo after 20 steps: ‖Δ‖/‖x‖ params {:.1e}, m {:.1e}, v {:.1e}; largest \
         element difference / tensor max: params {:.1e}, m {:.1e}, v {:.1e}",
        norm[0], norm[1], norm[2], elem[0], elem[1], elem[2]
    );
    assert!(
        norm[0] <= 1e-6,
        "parameters differ by {:e} in norm",
        norm[0]
    );
    // Elements whose gradient is float noise below Adam's ε follow that noise with gain lr / ε
    // (see `sequence_parallel_training_equals_one_device`), so element-wise the bound is looser.
    for (g, e) in elem.iter().enumerate() {
        assert!(
            *e <= 1e-5,
            "{:?}: an element differs by {e:e}",
            StateGroup::ALL[g]
        );
    }
    for (g, n) in norm.iter().enumerate() {
        assert!(
            *n <= 1e-5,
            "{:?}: differs by {n:e} in norm",
            StateGroup::ALL[g]
        );
    }
}

#[test]
fn the_kernel_is_the_cpu_default_and_never_reaches_other_platforms_or_meshes() {
    let count = |cfg: &RunConfig, platform: &str, mesh: &model::Mesh| {
        step::build_train_step(cfg, platform, mesh)
            .unwrap()
            .to_text()
            .matches("\"rattention.adamw\"")
            .count()
    };
    let one = model::Mesh::single();
    let auto = tiny_layers(2, 1, &[]);
    assert_eq!(auto.train.optimizer_lowering, OptimizerLowering::Auto);
    assert_eq!(count(&auto, "cpu", &one), 1);
    assert_eq!(count(&auto, "tpu", &one), 0);
    assert_eq!(count(&auto, "cuda", &one), 0);
    let hlo = tiny_layers(2, 1, &["train.optimizer_lowering=\"hlo\""]);
    assert_eq!(count(&hlo, "cpu", &one), 0);
    let sharded = tiny_layers(2, 1, &["mesh.data=2"]);
    let mesh = train_mesh(&sharded, None).unwrap();
    // On a CPU mesh the single call gives way to the sharded pair (sums, then the update).
    assert_eq!(count(&sharded, "cpu", &mesh), 0);
    let text = step::build_train_step(&sharded, "cpu", &mesh)
        .unwrap()
        .to_text();
    assert_eq!(text.matches("\"rattention.adamw_sumsq\"").count(), 1);
    assert_eq!(text.matches("\"rattention.adamw_scaled\"").count(), 1);
    let kernel = tiny_layers(
        2,
        1,
        &["mesh.data=2", "train.optimizer_lowering=\"kernel\""],
    );
    let e = step::build_train_step(&kernel, "tpu", &mesh)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("optimizer_lowering") && e.contains("2") && e.contains("tpu"),
        "{e}"
    );
}

/// Losses, per-step gradient norms (`metrics.jsonl`) and final state of `steps` steps.
fn run_logged(name: &str, steps: usize, extra: &[&str]) -> (Vec<f32>, Vec<f64>, Vec<NamedTensor>) {
    let mut o = vec!["train.log_every=1"];
    o.extend_from_slice(extra);
    let cfg = tiny_layers(2, steps, &o);
    let dir = tmp(name);
    let report = train(&cfg, None, &dir, false, true, None).unwrap();
    let ck = checkpoint::load(&report.last_checkpoint.unwrap(), None).unwrap();
    let norms: Vec<f64> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("grad_norm").and_then(|g| g.as_f64()))
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    (report.losses, norms, ck.tensors)
}

#[test]
fn the_sharded_adamw_kernel_trains_like_the_hlo_update_with_the_global_norm() {
    // data 2 × fsdp 2 × tensor 2: matrices cut over fsdp and tensor and replicated over data,
    // norm scales cut over tensor and replicated over data and fsdp, so the norm's sum must
    // count each replicated piece once.
    const STEPS: usize = 4;
    let mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"];
    let with = |l: &str| -> Vec<String> {
        mesh.iter()
            .map(|s| s.to_string())
            .chain([format!("train.optimizer_lowering=\"{l}\"")])
            .collect()
    };
    let (kl, kn, kt) = run_logged(
        "adamw-mesh-kernel",
        STEPS,
        &with("kernel")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let (hl, hn, ht) = run_logged(
        "adamw-mesh-hlo",
        STEPS,
        &with("hlo").iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (_, one_n, _) = run_logged(
        "adamw-one-kernel",
        STEPS,
        &["train.optimizer_lowering=\"kernel\""],
    );
    assert_eq!((kl.len(), kn.len(), one_n.len()), (STEPS, STEPS, STEPS));
    for s in 0..STEPS {
        let r = ((kl[s] - hl[s]) / hl[s]).abs();
        assert!(
            r <= 1e-6,
            "step {s}: loss {} (kernel) vs {} (hlo): {r:e}",
            kl[s],
            hl[s]
        );
        // Step 1's gradients are the 1-device ones up to the order of the cross-device sums.
        let r1 = ((kn[s] - one_n[s]) / one_n[s]).abs();
        let rh = ((kn[s] - hn[s]) / hn[s]).abs();
        eprintln!(
            "step {s}: grad norm mesh kernel {} / mesh hlo {} / 1 device {}: rel {rh:.1e} {r1:.1e}",
            kn[s], hn[s], one_n[s]
        );
        assert!(
            r1 <= 1e-6,
            "step {s}: grad norm {} vs 1 device {}: {r1:e}",
            kn[s],
            one_n[s]
        );
        assert!(
            rh <= 1e-6,
            "step {s}: grad norm {} vs hlo {}: {rh:e}",
            kn[s],
            hn[s]
        );
    }
    let mut worst = [0.0f64; 3];
    for (k, h) in kt.iter().zip(&ht) {
        assert_eq!((&k.name, &k.shape), (&h.name, &h.shape));
        let (mut d2, mut x2) = (0.0f64, 0.0f64);
        for (&a, &b) in k.data.iter().zip(&h.data) {
            d2 += (a as f64 - b as f64).powi(2);
            x2 += (b as f64).powi(2);
        }
        let g = StateGroup::ALL
            .iter()
            .position(|g| k.name.starts_with(&format!("{}.", g.prefix())))
            .unwrap();
        worst[g] = worst[g].max((d2 / x2.max(1e-60)).sqrt());
    }
    eprintln!(
        "sharded adamw kernel vs hlo after {STEPS} steps: ‖Δ‖/‖x‖ params {:.1e}, m {:.1e}, v {:.1e}",
        worst[0], worst[1], worst[2]
    );
    assert!(
        worst[0] <= 1e-5,
        "parameters differ by {:e} in norm",
        worst[0]
    );
}
