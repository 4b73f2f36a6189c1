//! `rattn` end to end on the CPU plugin: training lowers the loss, resume is bit-exact, corrupt
//! checkpoints are refused, and CLI mistakes give clear errors.

mod common;

use common::{ok, rattn};
use std::path::Path;
use std::process::Output;

fn fail_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure mentioning {needle:?}"
    );
    assert!(
        err.contains(needle),
        "stderr does not mention {needle:?}:\n{err}"
    );
}

/// (step, loss) pairs of a metrics file.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Short sequences; 16 of them per step and a high learning rate, so that 40 steps learn enough
/// of the recall task's answers (a few per sequence, the only scored tokens) to show in the loss.
const SMALL: &[&str] = &[
    "--set",
    "model.seq_len=64",
    "--set",
    "train.batch=16",
    "--set",
    "train.lr=1e-2",
    "--set",
    "train.log_every=1",
    "--quiet",
];

/// The checkpoint file names in `dir`, sorted.
fn checkpoint_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt_"))
        .collect();
    v.sort();
    v
}

#[test]
fn training_lowers_the_loss_and_resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    // 40 steps with a checkpoint at 20 and 40, from scratch or resumed from the newest checkpoint.
    // The run ends with an evaluation of its last checkpoint unless --eval-sequences is 0.
    let train_40 = |resume: bool| {
        let mut args = vec!["train"];
        if resume {
            args.extend(["--resume", "--eval-sequences", "0"]);
        } else {
            args.extend(["--eval-sequences", "4"]);
        }
        args.extend([
            "--out",
            r,
            "--set",
            "train.steps=40",
            "--set",
            "train.warmup=5",
            "--set",
            "train.checkpoint_every=20",
        ]);
        args.extend(SMALL);
        ok(&rattn(&args))
    };
    let stdout = train_40(false);
    assert!(
        stdout.contains("final loss")
            && stdout.contains("eval loss")
            && stdout.contains("recall by distance from the fact's last appearance")
            && stdout.contains("(W = 16, 2 local layers: LW = 32; chance 6.2 % = 1/16)"),
        "train did not end with its evaluation:\n{stdout}"
    );
    // The loss is over the answers, and every answer falls in one distance bucket.
    let answers: usize = stdout
        .split(" answer tokens")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no answer count in:\n{stdout}"));
    let bucket_totals: Vec<usize> = stdout
        .lines()
        .filter(|l| l.starts_with("  ") && l.ends_with('%'))
        .map(|l| {
            let frac = l.split_whitespace().rev().nth(2).unwrap();
            frac.split('/').nth(1).unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(bucket_totals.len(), 5, "{stdout}");
    assert!(answers > 4 * 5, "{stdout}");
    assert_eq!(bucket_totals.iter().sum::<usize>(), answers, "{stdout}");
    let full = losses(&run);
    assert_eq!(full.len(), 40);
    let first: f64 = full[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let last: f64 = full[35..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(
        last < first - 1.0,
        "loss did not fall clearly: {first} -> {last}"
    );

    // Drop the final checkpoint and resume from step 20: steps 21..40 must repeat bit for bit.
    std::fs::remove_file(run.join("ckpt_00000040.safetensors")).unwrap();
    std::fs::rename(run.join("metrics.jsonl"), run.join("first.jsonl")).unwrap();
    let stdout = train_40(true);
    assert!(!stdout.contains("eval loss"), "{stdout}");
    let resumed = losses(&run);
    assert_eq!(resumed.first().map(|x| x.0), Some(21));
    assert_eq!(
        &resumed[..],
        &full[20..],
        "resumed losses differ from the uninterrupted run"
    );

    // A fresh run into a directory holding an earlier run is refused, naming both ways out, and
    // nothing there changes.
    let before = checkpoint_files(&run);
    let mut args = vec!["train", "--out", r, "--set", "train.steps=60"];
    args.extend(SMALL);
    fail_with(&rattn(&args), "holds an earlier run");
    fail_with(&rattn(&args), "--resume, or train into a fresh --out");
    assert_eq!(checkpoint_files(&run), before);

    // A truncated newest checkpoint does not block --resume: it is moved aside (kept, byte for
    // byte) and the run resumes from the previous one, saying so.
    let ck = run.join("ckpt_00000040.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::rename(run.join("metrics.jsonl"), run.join("second.jsonl")).unwrap();
    let mut args = vec!["train", "--resume", "--eval-sequences", "0", "--out", r];
    args.extend(["--set", "train.steps=60"]);
    args.extend(SMALL);
    let out = rattn(&args);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is truncated or corrupt")
            && err.contains("ckpt_00000020.safetensors (step 20)"),
        "{err}"
    );
    let aside = run.join("ckpt_00000040.safetensors.corrupt");
    assert_eq!(std::fs::read(&aside).unwrap().len(), bytes.len() / 2);
    let again = losses(&run);
    assert_eq!(again.first().map(|x| x.0), Some(21));
    assert_eq!(again.last().map(|x| x.0), Some(60));

    // A checkpoint from another model configuration is refused.
    let mut args = vec![
        "train",
        "--resume",
        "--out",
        r,
        "--set",
        "train.steps=60",
        "--set",
        "model.window=8",
    ];
    args.extend(SMALL);
    fail_with(&rattn(&args), "another model configuration");

    // eval reads the checkpoint and reports loss, perplexity and recall buckets.
    let out = rattn(&[
        "eval",
        "--checkpoint",
        r,
        "--sequences",
        "8",
        "--set",
        "model.seq_len=64",
        "--set",
        "train.batch=4",
    ]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("perplexity") && text.contains("recall"),
        "{text}"
    );
    // The same checkpoint at twice its training length: extra buckets beyond T.
    let out = rattn(&[
        "eval",
        "--checkpoint",
        r,
        "--sequences",
        "4",
        "--seq-len",
        "64,128",
        "--set",
        "model.seq_len=64",
        "--set",
        "train.batch=4",
    ]);
    let text = ok(&out);
    assert!(
        text.contains("at seq_len 128 (2× the training length 64), 4 sequences:")
            && text.contains("T..2T (65..128)"),
        "{text}"
    );
}

#[test]
fn cli_errors_are_clear() {
    fail_with(&rattn(&["train", "--set", "model.windw=3"]), "windw");
    fail_with(&rattn(&["train", "--set", "train.steps"]), "key=value");
    fail_with(
        &rattn(&["train", "--config", "configs/nope.toml"]),
        "cannot read config file",
    );
    fail_with(
        &rattn(&[
            "train",
            "--set",
            "data.kind=\"text\"",
            "--set",
            "data.path=\"/nonexistent/corpus.txt\"",
        ]),
        "/nonexistent/corpus.txt",
    );
    fail_with(
        &rattn(&["train", "--plugin", "/nonexistent/plugin.so"]),
        "/nonexistent/plugin.so",
    );
    fail_with(&rattn(&["plugin", "install", "gpu"]), "cpu, cuda or tpu");
    // A missing corpus names the script that installs it (before anything is compiled).
    fail_with(
        &rattn(&[
            "train",
            "--config",
            "configs/text-tiny.toml",
            "--set",
            "data.path=\"/nonexistent/shakespeare\"",
        ]),
        "data.path /nonexistent/shakespeare (data.kind = \"text\") does not exist; \
         `scripts/get_text.sh` installs it",
    );
}

#[test]
fn doctor_reports_the_cpu_plugin() {
    let out = rattn(&["doctor"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PJRT API: 0.115"), "{text}");
    assert!(text.contains("platform: cpu"), "{text}");
    assert!(text.contains("device 3"), "{text}");
}

#[test]
fn plugin_list_keeps_what_plugins_log_while_loading_out_of_its_output() {
    // The CUDA plugin prints absl warnings to stderr when it is loaded (before its logging is
    // configured); `plugin list` loads each plugin in a child process and drops those lines.
    let out = rattn(&["plugin", "list"]);
    let text = ok(&out);
    assert!(text.contains("plugin cache:"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.trim().is_empty(), "stderr of plugin list: {err}");
    for line in text.lines().skip(1) {
        assert!(line.contains("PJRT API 0.1"), "{line}");
    }
}
