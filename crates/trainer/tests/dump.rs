//! `rattn dump` and `rattn plot` end to end: the dumped modules parse and carry what they should,
//! the summary's numbers match an independent count, and the plot is a PNG of the requested size
//! with both runs' lines in it.

mod common;

use common::{ok, rattn};
use prost::Message;
use std::path::Path;

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

/// Parameters of a config counted from its dimensions alone.
#[allow(clippy::too_many_arguments)]
fn count_params(
    vocab: u64,
    d: u64,
    layers: &[bool], // true = local RAttention layer
    heads: u64,
    kv_heads: u64,
    hd: u64,
    ffn: u64,
    qk_norm: bool,
    tied: bool,
) -> u64 {
    let mut n = vocab * d + d; // embedding + final norm
    if !tied {
        n += d * vocab;
    }
    for &rla in layers {
        n += 2 * d; // two pre-norms
        n += d * heads * hd * 2 + d * kv_heads * hd * 2; // wq, wo, wk, wv
        n += 3 * d * ffn;
        if qk_norm {
            n += 2 * hd;
        }
        if rla {
            n += 2 * heads * hd; // swa_norm, rla_norm
        }
    }
    n
}

#[test]
fn dump_of_the_tiny_config_writes_parsable_modules_and_a_checked_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump");
    // The tiny model in the 3:1 layout, so both kinds of layer are dumped.
    let stdout = ok(&rattn(&[
        "dump",
        "--config",
        "configs/tiny-3to1.toml",
        "--set",
        "model.seq_len=64",
        "--set",
        "train.batch=2",
        "--out",
        out.to_str().unwrap(),
    ]));
    let text = |name: &str| {
        std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let before = text("module_0000.train_step.before_optimizations.txt");
    assert!(before.starts_with("HloModule"), "{}", &before[..80]);
    assert!(before.contains("ENTRY"));
    assert!(before.contains("layer_0/local/rla"), "no name scopes");
    assert!(before.contains("layer_3/global"), "no global layer scope");
    let after = text("module_0000.train_step.cpu_after_optimizations.txt");
    assert!(after.starts_with("HloModule"));
    assert!(
        after.contains("custom-call"),
        "no custom call after optimizations"
    );
    assert!(after.contains("rattention.rla_fwd") && after.contains("rattention.rla_bwd"));
    assert!(after.contains("fusion"), "XLA fused nothing?");
    // The decode step: the ring buffers are updated with dynamic-update-slice, before and after XLA.
    let dec = text("module_0001.decode_step.before_optimizations.txt");
    assert!(dec.starts_with("HloModule") && dec.contains("dynamic-update-slice"));
    let dec_after = text("module_0001.decode_step.cpu_after_optimizations.txt");
    assert!(dec_after.starts_with("HloModule"));
    for pb in [
        "module_0000.train_step.before_optimizations.hlo.pb",
        "module_0000.train_step.cpu_after_optimizations.hlo.pb",
        "module_0001.decode_step.before_optimizations.hlo.pb",
        "module_0001.decode_step.cpu_after_optimizations.hlo.pb",
    ] {
        let bytes = std::fs::read(out.join(pb)).unwrap();
        let m = hlo_builder::proto::HloModuleProto::decode(bytes.as_slice())
            .unwrap_or_else(|e| panic!("{pb} does not decode: {e}"));
        assert!(!m.computations.is_empty(), "{pb} has no computations");
        assert!(hlo_builder::print_module_bytes(&bytes)
            .unwrap()
            .starts_with("HloModule"));
    }
    assert_eq!(text("summary.txt"), stdout);

    let s = summary(&out);
    // tiny-3to1: vocab 288, d 64, 4 layers [L L L G], 4/2 heads of 16, ffn 192, no qk-norm, tied.
    let layers = [true, true, true, false];
    let params = count_params(288, 64, &layers, 4, 2, 16, 192, false, true);
    assert_eq!(s["parameters"].as_u64().unwrap(), params);
    assert!(stdout.contains(&format!("parameters: {params} ")));
    // Dense FLOPs: 6 × matmul weights (tied embedding counts once, as the LM head).
    let matmul = 288 * 64 + 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 192);
    let f = &s["flops_per_token"];
    assert_eq!(f["dense"].as_f64().unwrap(), 6.0 * matmul as f64);
    // Attention at T = 64: local layers see min(32, 64) keys, the global layer 64; 12·heads·H·k
    // (forward + backward) halved for the causal mask, as MaxText counts.
    assert_eq!(
        f["attention"].as_f64().unwrap(),
        6.0 * 64.0 * (3.0 * 32.0 + 64.0)
    );
    assert!(f["rla"].as_f64().unwrap() > 0.0);
    // KV at context 64, f32: 2 × 2 kv heads × 16 × 4 B = 256 B per token per layer.
    let c = &s["cache"];
    assert_eq!(c["model"]["kv"].as_u64().unwrap(), 256 * (3 * 32 + 64));
    assert_eq!(c["full"]["kv"].as_u64().unwrap(), 256 * 4 * 64);
    assert_eq!(
        c["model"]["rla_state"].as_u64().unwrap(),
        3 * 2 * 32 * 16 * 4
    );
    // Compiled memory: the arguments are params, both moments, the step, the tokens [2, 65] and
    // their loss weights [2, 64].
    let m = &s["modules"][0]["memory"]["Ok"];
    assert_eq!(
        m["argument_bytes"].as_u64().unwrap(),
        3 * 4 * params + 4 + 4 * 2 * 65 + 4 * 2 * 64,
        "{m}"
    );
    // The default mesh: one device holding everything.
    let mesh = &s["mesh"];
    assert_eq!(mesh["devices"].as_u64().unwrap(), 1);
    assert_eq!(mesh["param_bytes_per_device"].as_u64().unwrap(), 4 * params);
    assert_eq!(mesh["adam_bytes_per_device"].as_u64().unwrap(), 8 * params);
    assert!(
        stdout.contains("mesh: 1 device = data 1 × fsdp 1 × seq 1 × tensor 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "  rules: activation_embed → [tensor], batch → [data, fsdp], cache_length → [], \
             embed → [fsdp, seq], feature → [], head_dim → [], kv_heads → [tensor], \
             layers → [], length → [seq], mlp → [tensor], norm → [tensor], q_heads → [tensor], \
             vocab → [tensor]\n"
        ),
        "{stdout}"
    );
}

#[test]
fn dump_of_12b_without_compiling_reports_the_paper_kv_savings() {
    let dir = tempfile::tempdir().unwrap();
    for (window, want) in [(1024u64, 56.25), (512, 65.625)] {
        let out = dir.path().join(format!("w{window}"));
        let stdout = ok(&rattn(&[
            "dump",
            "--config",
            "configs/12b.toml",
            "--set",
            &format!("model.window={window}"),
            "--context",
            "4096",
            "--no-compile",
            // fsdp takes the rest of 16 devices.
            "--set",
            "mesh.fsdp=-1",
            "--devices",
            "16",
            "--out",
            out.to_str().unwrap(),
        ]));
        assert!(out
            .join("module_0000.train_step.before_optimizations.hlo.pb")
            .exists());
        assert!(!out
            .join("module_0000.train_step.cpu_after_optimizations.txt")
            .exists());
        let s = summary(&out);
        // 40 layers = 30 local (W tokens) + 10 global (4096), vs 40 × 4096; bf16 K and V of
        // 8 kv heads × 128 = 4096 B per token per layer.
        let kv = (30 * window + 10 * 4096) * 4096;
        let full = 40 * 4096 * 4096u64;
        let c = &s["cache"];
        assert_eq!(c["model"]["kv"].as_u64().unwrap(), kv);
        assert_eq!(c["full"]["kv"].as_u64().unwrap(), full);
        let saving = c["kv_saving_vs_full_pct"].as_f64().unwrap();
        assert!((saving - want).abs() < 1e-9, "W={window}: {saving}");
        assert!((saving - 100.0 * (1.0 - kv as f64 / full as f64)).abs() < 1e-9);
        assert!(
            stdout.contains(&format!("KV saving vs full attention: {want:.2} %")),
            "{stdout}"
        );
        // RLA state: 30 layers × 8 kv heads × (2·128 × 128) f32.
        assert_eq!(
            c["model"]["rla_state"].as_u64().unwrap(),
            30 * 8 * 256 * 128 * 4
        );
        let layers: Vec<bool> = (0..40).map(|i| i % 4 != 3).collect();
        let params = count_params(32768, 5120, &layers, 40, 8, 128, 16384, true, false);
        assert_eq!(s["parameters"].as_u64().unwrap(), params);
        // fsdp 16 shards every parameter with an embed dim 16 ways; the norm scales (the
        // pre-norms and the final norm [norm], q/k norms [head_dim], the mixing norms [q_heads,
        // head_dim] with tensor 1) stay whole.
        let whole = 40 * 2 * 128 + 30 * 2 * 40 * 128 + (40 * 2 + 1) * 5120;
        let mesh = &s["mesh"];
        assert_eq!(mesh["sizes"]["fsdp"].as_u64().unwrap(), 16);
        assert_eq!(mesh["param_bytes"].as_u64().unwrap(), 4 * params);
        let per = 4 * ((params - whole) / 16 + whole);
        assert_eq!(mesh["param_bytes_per_device"].as_u64().unwrap(), per);
        assert_eq!(mesh["adam_bytes_per_device"].as_u64().unwrap(), 2 * per);
        assert!(
            stdout.contains("mesh: 16 devices = data 1 × fsdp 16 × seq 1 × tensor 1"),
            "{stdout}"
        );
    }
}

fn write_metrics(dir: &Path, run: &str, losses: &[f64]) -> std::path::PathBuf {
    let d = dir.join(run);
    std::fs::create_dir_all(&d).unwrap();
    let lines: Vec<String> = losses
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "{{\"step\": {}, \"loss\": {l}, \"lr\": 0.001}}",
                (i + 1) * 10
            )
        })
        .collect();
    let p = d.join("metrics.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// Width, height and RGB pixels of a PNG, checked by a real decoder.
fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    let px = img.pixels().map(|p| p.0).collect();
    (img.width(), img.height(), px)
}

/// Columns (x) holding a pixel of `rgb`.
fn columns_with(w: u32, px: &[[u8; 3]], rgb: [u8; 3]) -> std::collections::BTreeSet<u32> {
    px.iter()
        .enumerate()
        .filter(|(_, p)| **p == rgb)
        .map(|(i, _)| i as u32 % w)
        .collect()
}

fn hex(stdout: &str, label: &str) -> [u8; 3] {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{label}: #")))
        .unwrap_or_else(|| panic!("no colour for {label} in {stdout}"));
    let h = &line[label.len() + 3..label.len() + 9];
    let b = |i: usize| u8::from_str_radix(&h[i..i + 2], 16).unwrap();
    [b(0), b(2), b(4)]
}

#[test]
fn plot_writes_a_png_of_the_requested_size_with_one_line_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_metrics(dir.path(), "run-a", &[5.0, 4.0, 3.2, 2.9, 2.5, 2.4]);
    let b = write_metrics(dir.path(), "run-b", &[5.1, 4.5, 4.0, 3.7, 3.5, 3.3]);
    for (extra, name) in [(None, "text.png"), (Some("--no-text"), "plain.png")] {
        let png = dir.path().join(name);
        let mut args = vec![
            "plot",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
            "--width",
            "640",
            "--height",
            "360",
        ];
        args.extend(extra);
        let stdout = ok(&rattn(&args));
        assert!(
            stdout.contains("run-a: #") && stdout.contains("6 points"),
            "{stdout}"
        );
        let (w, h, px) = decode_png(&png);
        assert_eq!((w, h), (640, 360));
        let (ca, cb) = (hex(&stdout, "run-a"), hex(&stdout, "run-b"));
        assert_ne!(ca, cb);
        // Each run's line spans most of the width (steps 10..60 fill the x range).
        for c in [ca, cb] {
            let cols = columns_with(w, &px, c);
            let span = cols.last().unwrap() - cols.first().unwrap();
            assert!(span > w / 2, "{name}: colour {c:?} spans only {span} px");
        }
    }
}

#[test]
fn plot_names_a_missing_metric_and_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_metrics(dir.path(), "run-a", &[1.0, 0.5]);
    let out = rattn(&[
        "plot",
        a.to_str().unwrap(),
        "--metric",
        "accuracy",
        "--out",
        dir.path().join("x.png").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"accuracy\"") && err.contains("loss, lr, step"),
        "{err}"
    );
}
