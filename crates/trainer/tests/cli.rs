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
    fail_with(
        &rattn(&["train", "--seed", "3", "--set", "train.seed=5"]),
        "--seed and --set train.seed both give the seed",
    );
    // --mesh of compile: each axis once, known axes, before any plugin is needed.
    fail_with(
        &rattn(&[
            "compile",
            "--target",
            "tpu:v5p:2x2x1",
            "--mesh",
            "fsdp=4,fsdp=1",
        ]),
        "gives fsdp twice",
    );
    fail_with(
        &rattn(&["compile", "--target", "tpu:v5p:2x2x1", "--mesh", "bogus=4"]),
        "unknown mesh axis \"bogus\"",
    );
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

/// Flips the bytes of one value inside tensor `name` of a single-file checkpoint (the file stays
/// well-formed: only a checksum can tell).
fn overwrite_value(path: &Path, name: &str, value: f32) {
    let mut b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize + 40;
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn diverged_runs_corrupt_bytes_and_leftover_runs_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let base = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--out", out.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for s in [
            "model.seq_len=32",
            "train.batch=4",
            "train.steps=6",
            "train.checkpoint_every=1",
            "train.warmup=1",
        ] {
            a.extend(["--set".to_string(), s.to_string()]);
        }
        a.extend(["--eval-sequences".into(), "0".into(), "--quiet".into()]);
        a
    };
    let run = |args: &[String], extra: &[&str]| {
        let mut v: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        v.extend(extra);
        rattn(&v)
    };

    // A learning rate that diverges: the loss is NaN at step 3, so the parameters after step 2
    // gave it; their checkpoint moves aside and the message names the one --resume takes.
    let nan = dir.path().join("nan");
    let args = base(&nan);
    let out = run(&args, &["--set", "train.lr=1e6"]);
    fail_with(&out, "loss is NaN at step 3 (the parameters after step 2)");
    fail_with(&out, "ckpt_00000002.safetensors.nonfinite");
    fail_with(&out, "`--resume` continues from");
    assert_eq!(
        checkpoint_files(&nan),
        [
            "ckpt_00000001.safetensors",
            "ckpt_00000002.safetensors.nonfinite"
        ]
    );
    // eval refuses the diverged parameters, naming a tensor and the count.
    let aside = nan.join("ckpt_00000002.safetensors.nonfinite");
    fail_with(
        &rattn(&[
            "eval",
            "--checkpoint",
            aside.to_str().unwrap(),
            "--set",
            "model.seq_len=32",
        ]),
        "non-finite value",
    );
    // --resume with another seed would change the data order: refused.
    fail_with(
        &run(
            &args,
            &["--resume", "--set", "train.lr=1e-3", "--seed", "7"],
        ),
        "train.seed = 0, this command has 7",
    );

    // A good run, then one value of its newest checkpoint changed on disk: the checksum refuses
    // it in eval, and --resume moves it aside and continues from the previous one.
    let good = dir.path().join("good");
    let args = base(&good);
    ok(&run(&args, &[]));
    let newest = good.join("ckpt_00000006.safetensors");
    overwrite_value(&newest, "params.embed", 0.5);
    let g = good.to_str().unwrap();
    let out = rattn(&["eval", "--checkpoint", g, "--set", "model.seq_len=32"]);
    fail_with(&out, "tensor params.embed: its bytes have CRC-32");
    fail_with(&out, "the run's previous checkpoint is");
    let out = run(&args, &["--resume", "--set", "train.steps=7"]);
    let err = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ckpt_00000005.safetensors (step 5)"),
        "{err}\n{stderr}"
    );
    assert!(good.join("ckpt_00000006.safetensors.corrupt").exists());
    // The metrics of step 6 (logged before the fallback) moved aside: steps still increase.
    let steps: Vec<u64> = losses(&good).iter().map(|x| x.0).collect();
    assert_eq!(steps, [7], "{steps:?}");
    assert!(std::fs::read_to_string(good.join("metrics.jsonl.dropped"))
        .unwrap()
        .contains("\"step\":6"));

    // A run that stopped before its first metrics line leaves an empty metrics file: a fresh run
    // may use the directory. One with metrics but no checkpoint is refused, saying why.
    let left = dir.path().join("left");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join("metrics.jsonl"), "").unwrap();
    ok(&run(&base(&left), &["--set", "train.steps=1"]));
    let stale = dir.path().join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    fail_with(&run(&base(&stale), &[]), "left no checkpoint");

    // Bad training options name the key and the value.
    fail_with(
        &run(
            &base(&dir.path().join("x")),
            &["--set", "train.clip_norm=-1"],
        ),
        "train.clip_norm must be >= 0 (0 disables clipping) (got -1)",
    );
    fail_with(
        &run(
            &base(&dir.path().join("x")),
            &["--set", "train.log_every=0"],
        ),
        "train.log_every must be > 0",
    );
    fail_with(&rattn(&["train", "--plugin", "foo"]), "not a plugin kind");
    fail_with(
        &rattn(&["eval", "--sequences", "0", "--checkpoint", g]),
        "--sequences 0",
    );
}
