//! Sharded checkpoints and multi-process runs, end to end through `rattn`: a process killed
//! with SIGKILL in the middle of a sharded save leaves the previous checkpoint loadable and the
//! unfinished one is skipped with a message; processes rendezvous through process 0's key-value
//! store on loopback, and a missing process or an unreachable coordinator is a clear error
//! before anything is compiled.

mod common;

use common::{ok, rattn};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tiny sharded run: fsdp = 2 on 2 CPU devices, 4 sequences of 64 tokens.
const SMALL: &[&str] = &[
    "--set",
    "model.seq_len=64",
    "--set",
    "train.batch=4",
    "--set",
    "mesh.fsdp=2",
    "--set",
    "train.checkpoint_every=2",
    "--eval-sequences",
    "0",
    "--quiet",
];

fn train_args<'a>(out: &'a str, steps: &'a str, resume: bool) -> Vec<&'a str> {
    let mut v = vec!["train", "--out", out, "--set", steps];
    if resume {
        v.push("--resume");
    }
    v.extend(SMALL);
    v
}

fn committed(dir: &Path) -> bool {
    dir.join("COMMITTED").exists()
}

#[test]
fn kill_9_during_a_sharded_save_leaves_the_previous_checkpoint_loadable() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    ok(&rattn(&train_args(r, "train.steps=2", false)));
    let (c2, c4) = (run.join("ckpt_00000002"), run.join("ckpt_00000004"));
    assert!(committed(&c2), "step 2 is a committed sharded checkpoint");
    let mut shards: Vec<String> = std::fs::read_dir(&c2)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    shards.sort();
    assert_eq!(
        shards,
        [
            "COMMITTED",
            "index_00000.json",
            "shard_00000.safetensors",
            "shard_00001.safetensors"
        ]
    );

    // Resume towards step 4, sleeping after each shard file of the save, and SIGKILL the process
    // once the first shard of step 4 is on disk.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rattn"))
        .current_dir(root)
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .env("RATTN_TEST_CKPT_SHARD_DELAY_MS", "60000")
        .args(train_args(r, "train.steps=4", true))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !c4.join("shard_00000.safetensors").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it saved step 4");
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no step-4 shard");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        c4.exists() && !committed(&c4),
        "step 4 is an unfinished save"
    );

    // eval and --resume pass over it, saying so, and use step 2.
    let out = rattn(&train_args(r, "train.steps=4", true));
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ckpt_00000004 has no commit marker (COMMITTED): its save did not finish")
            && err.contains("ckpt_00000002 (step 2)")
            && err.contains("saved on 2 devices"),
        "{err}"
    );
    assert!(committed(&c4), "the resumed run saved step 4 again");

    // A truncated shard of the newest checkpoint: moved aside, and the run resumes from step 2.
    let shard = c4.join("shard_00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let out = rattn(&train_args(r, "train.steps=6", true));
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is truncated or corrupt") && err.contains("ckpt_00000002 (step 2)"),
        "{err}"
    );
    assert!(run.join("ckpt_00000004.corrupt").is_dir());
    assert!(committed(&run.join("ckpt_00000006")));

    // A 1-device eval reads the sharded checkpoint whole.
    let out = rattn(&[
        "eval",
        "--checkpoint",
        r,
        "--sequences",
        "4",
        "--set",
        "model.seq_len=64",
        "--set",
        "train.batch=4",
    ]);
    let text = ok(&out);
    assert!(
        text.contains("ckpt_00000006 (step 6)") && text.contains("perplexity"),
        "{text}"
    );
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_process(
    id: usize,
    n: usize,
    addr: &str,
    timeout: &str,
    dir: &Path,
) -> std::process::Child {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    Command::new(env!("CARGO_BIN_EXE_rattn"))
        .current_dir(root)
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        // The process id comes from the environment, the rest from flags: both paths are used.
        .env("RATTN_PROCESS_ID", id.to_string())
        .args(["train", "--quiet", "--eval-sequences", "0"])
        .args(["--coordinator-address", addr])
        .args(["--num-processes", &n.to_string()])
        .args(["--distributed-timeout", timeout])
        .arg("--out")
        .arg(dir.join(format!("p{id}")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn processes_rendezvous_on_loopback_and_a_missing_one_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    // Three processes meet at process 0's store (started last, so the others wait for it), then
    // stop at the CPU plugin, which cannot run multi-process programs: before compiling.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut kids: Vec<_> = [2, 1, 0]
        .into_iter()
        .map(|id| {
            let k = start_process(id, 3, &addr, "60", tmp.path());
            std::thread::sleep(Duration::from_millis(300));
            k
        })
        .collect();
    for (k, id) in kids.drain(..).zip([2, 1, 0]) {
        let out = k.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "process {id}: {err}");
        assert!(
            err.contains(&format!(
                "process {id} of 3: joining the coordinator {addr}, waiting up to 60 s"
            )),
            "process {id}: {err}"
        );
        assert!(
            err.contains(&format!(
                "process {id} of 3: every process arrived at the coordinator {addr}"
            )),
            "process {id}: {err}"
        );
        assert!(
            err.contains("the CPU plugin cannot run multi-process programs"),
            "process {id}: {err}"
        );
        assert!(
            !tmp.path().join(format!("p{id}")).exists(),
            "nothing written"
        );
    }

    // Process 1 of 2 never starts: process 0 names it after its timeout.
    let addr = format!("127.0.0.1:{}", free_port());
    let t0 = Instant::now();
    let out = start_process(0, 2, &addr, "2", tmp.path())
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("timed out after 2.0 s waiting for processes [1] of 2")
            && err.contains("arrived: [0]"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));

    // Nobody serves the coordinator: process 1 says it cannot reach it.
    let addr = format!("127.0.0.1:{}", free_port());
    let out = start_process(1, 2, &addr, "1", tmp.path())
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "cannot reach the coordinator at {addr} within 1.0 s"
        )),
        "{err}"
    );
}
